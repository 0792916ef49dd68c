/* The KV cache in one of three types (tern.h TERN_KV_*): f16 (default), f32 (the reference's
 * precision) or int8 (each head's row quantized absmax with its own f32 scale: half of f16).
 * Layout: value i of KV head g at position p of layer l is element
 * ((l * n_head_kv + g) * n_ctx + p) * head_dim + i: each head's rows are one contiguous stream,
 * which decode attention reads front to back (with position-major rows, 256 bytes out of every
 * 1280 of a 2B4T row, it ran 10-25% slower at 3584 positions). int8 scales are indexed
 * (l * n_ctx + p) * n_head_kv + g. */
#ifndef TERN_KV_CACHE_H
#define TERN_KV_CACHE_H

#include "session.h"

/* Where row (layer, pos, head g) starts, in elements of the cache's type. */
int64_t tern_kv_row(const tern_session *s, int32_t layer, int32_t pos, int64_t g);

/* Where the int8 scale of row (layer, pos, head g) is in k_scale / v_scale. */
int64_t tern_kv_scale_at(const tern_session *s, int32_t layer, int32_t pos, int64_t g);

/* Store one head row (hd floats) of K (is_v false) or V. */
void tern_kv_store(tern_session *s, bool is_v, int32_t layer, int32_t pos, int64_t g, const float *x);

/* q . K[layer][pos][g] */
float tern_kv_dot(const tern_session *s, int32_t layer, int32_t pos, int64_t g, const float *q);

/* y += a * V[layer][pos][g] */
void tern_kv_axpy(const tern_session *s, int32_t layer, int32_t pos, int64_t g, float a, float *y);

#endif
