/* The persistent decode step (persist.cu): its arguments and host entry points. */
#ifndef TERN_CUDA_PERSIST_H
#define TERN_CUDA_PERSIST_H

#include <algorithm>

#include "model.h"

enum { P_QKV = 0, P_WO = 1, P_GU = 2, P_DOWN = 3, P_KINDS = 4 }; /* the matrices of a layer, in order */

struct persist_layer {
    const uint8_t *w[P_KINDS]; /* T2 rows */
    const float *pscale[P_KINDS]; /* row scales packed per block (persist_init) */
    const float *norm[P_KINDS]; /* the RMSNorm weights of each matrix's input */
};

struct persist_args {
    const persist_layer *layers;
    int n_layer, e, ff, n_head, n_head_kv, head_dim, relu2;
    float eps, att_scale;
    float *x, *qkv, *h, *att, *partial;
    int *counters;
    unsigned *bar; /* [0] barrier arrivals, [1] blocks done (reset by the last) */
    const float *rope_cos, *rope_sin;
    const int32_t *pos;
    void *k_cache, *v_cache;
    int64_t cache_stride; /* cache elements per layer */
    int nsplit;           /* attention splits: blocks / n_head_kv */
    int slots, only;      /* shared-memory slots; only < 0: decode, else only that kind's steps */
    int64_t units[P_KINDS];
    int R[P_KINDS], rb[P_KINDS], U[P_KINDS]; /* rows per unit, row bytes, units per block */
    int sstride[P_KINDS];                    /* packed scales per block (floats, a multiple of 4) */
    int slot_w[4], slot_s[4], slot_n[4];     /* shared-memory offsets of the slots' rows, scales, norm weights */
    int xs_off, y_off, att_off;
};

struct persist_state {
    int blocks; /* one per SM */
    persist_layer *layers; /* device */
    unsigned *bar;         /* device */
    float *pscale;         /* device: every layer's packed scales */
};

/* TERN_CUDA_PERSISTENT=1 (measured no faster than the per-operation graph: opt-in). */
bool persist_enabled(void);
/* *out = NULL (not an error) where the path does not apply: disabled, shape not covered, no
 * cooperative launch, or too little shared memory. */
int32_t persist_init(tern_cuda_session *s, persist_state **out);
void persist_free(persist_state *p);
/* Every layer of one token (only < 0), or only the steps of one matrix kind (measurement). */
int32_t launch_persist(tern_cuda_session *s, const persist_state *p, int only);

#endif
