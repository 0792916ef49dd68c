#include "kv_cache.h"

#include <math.h>
#include <string.h>

#include "f16.h"

int64_t tern_kv_row(const tern_session *s, int32_t layer, int32_t pos, int64_t g)
{
    return (((int64_t)layer * s->m->n_head_kv + g) * s->n_ctx + pos) * s->m->head_dim;
}


int64_t tern_kv_scale_at(const tern_session *s, int32_t layer, int32_t pos, int64_t g)
{
    return ((int64_t)layer * s->n_ctx + pos) * s->m->n_head_kv + g;
}

void tern_kv_store(tern_session *s, bool is_v, int32_t layer, int32_t pos, int64_t g, const float *x)
{
    const int64_t hd = s->m->head_dim, at = tern_kv_row(s, layer, pos, g);
    void *cache = is_v ? s->v_cache : s->k_cache;
    if (s->kv_type == TERN_KV_F32) {
        memcpy((float *)cache + at, x, (size_t)hd * sizeof(float));
    } else if (s->kv_type == TERN_KV_F16) {
        uint16_t *dst = (uint16_t *)cache + at;
        for (int64_t i = 0; i < hd; i++)
            dst[i] = tern_f32_to_f16(x[i]);
    } else {
        float amax = 0.0f;
        for (int64_t i = 0; i < hd; i++)
            amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
        const float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        const float magic = 12582912.0f; /* round half to even, |x * inv| <= 127: see ops.c */
        int8_t *dst = (int8_t *)cache + at;
        for (int64_t i = 0; i < hd; i++) {
            const float v = (x[i] * inv + magic) - magic;
            dst[i] = (int8_t)(v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v));
        }
        (is_v ? s->v_scale : s->k_scale)[tern_kv_scale_at(s, layer, pos, g)] = scale;
    }
}

float tern_kv_dot(const tern_session *s, int32_t layer, int32_t pos, int64_t g, const float *q)
{
    const int64_t hd = s->m->head_dim, at = tern_kv_row(s, layer, pos, g);
    if (s->kv_type == TERN_KV_F16)
        return s->m->kern->dot_f16((const uint16_t *)s->k_cache + at, q, hd);
    float acc = 0.0f;
    if (s->kv_type == TERN_KV_F32) {
        const float *k = (const float *)s->k_cache + at;
        for (int64_t i = 0; i < hd; i++)
            acc += q[i] * k[i];
        return acc;
    }
    const int8_t *k = (const int8_t *)s->k_cache + at;
    for (int64_t i = 0; i < hd; i++)
        acc += q[i] * (float)k[i];
    return acc * s->k_scale[tern_kv_scale_at(s, layer, pos, g)];
}

void tern_kv_axpy(const tern_session *s, int32_t layer, int32_t pos, int64_t g, float a, float *y)
{
    const int64_t hd = s->m->head_dim, at = tern_kv_row(s, layer, pos, g);
    if (s->kv_type == TERN_KV_F16) {
        s->m->kern->axpy_f16(y, a, (const uint16_t *)s->v_cache + at, hd);
    } else if (s->kv_type == TERN_KV_F32) {
        const float *v = (const float *)s->v_cache + at;
        for (int64_t i = 0; i < hd; i++)
            y[i] += a * v[i];
    } else {
        const int8_t *v = (const int8_t *)s->v_cache + at;
        const float as = a * s->v_scale[tern_kv_scale_at(s, layer, pos, g)];
        for (int64_t i = 0; i < hd; i++)
            y[i] += as * (float)v[i];
    }
}
