/* libFuzzer harness for tern_model_create over fuzzed parameters (and, for inputs that load, one
 * session + forward). Complements fuzz_model.c (src/fuzz_entry.c), which keeps hparams small
 * and shapes nearly right: here every hparam, pointer, size, type, shape and scale is free.
 *
 * The fuzzed bytes describe a tern_model_params over a "file" buffer the harness allocates
 * with exactly blob_len bytes, so AddressSanitizer sees any read outside it. Input layout
 * (little-endian, packed; bytes past the end of the input read as zero):
 *
 *   header      fuzz_header below
 *   matrices    token_embd, output, then 7 per layer (wq wk wv wo w_gate w_up w_down) for
 *               min(n_layer, DESC_LAYERS) layers; layer i >= DESC_LAYERS reuses layer
 *               i % DESC_LAYERS. Each is a fuzz_matrix.
 *   overlay     the rest of the input, copied to the start of the buffer after the fills
 *
 * A matrix's offset is signed and relative to the buffer, so pointers before, inside and after
 * it are all tried; `fill` synthesises plausible contents for its range (valid ternary codes,
 * small floats, ...) so that small inputs describe models that load and run.
 * scripts/fuzz_seeds.py writes seeds from real model files.
 *
 * What the harness promises the library, as a real caller would: file_size never exceeds the
 * buffer, every layers[] entry exists, every norm array has the length its name implies. Norms
 * are allocated exactly, filled from the buffer, so a norm over-read is caught too. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tern.h"

#define DESC_LAYERS 4
#define MAX_LAYERS 4096           /* the harness's own allocation bound for layers[] */
#define MAX_BLOB (1u << 20)       /* buffer bytes */
#define MAX_NORM (1 << 20)        /* floats per norm array the harness will allocate */

/* How far the last input got (read by fuzz_main.c's report): 0 refused at create, 1 loaded,
 * 2 a forward pass ran. */
int fuzz_outcome;

#pragma pack(push, 1)
typedef struct fuzz_header {
    int32_t n_vocab, n_embd, n_layer, n_head, n_head_kv, n_ff;
    float rope_theta, rms_eps;
    int32_t activation, lm_head;
    uint32_t flags;      /* bit 0: run a forward; bit 1: 2 threads; bit 2: all logits;
                          * bit 3: output matrix present; bit 4: null output_norm;
                          * bits 5-6: tokens in the first forward - 1; bits 7-8: truncate to */
    uint32_t blob_len;   /* buffer bytes (mod MAX_BLOB + 1) */
    uint32_t size_cut;   /* file_size = blob_len - min(size_cut, blob_len) */
    uint32_t norm_off;   /* norms are filled cyclically from the buffer from here */
    int32_t kv_type, n_ctx;
    int32_t tokens[3];
} fuzz_header;

typedef struct fuzz_matrix {
    int64_t offset;      /* relative to the buffer start; may point outside it */
    uint64_t size;
    int32_t type;
    int64_t cols, rows;
    float scale;
    uint32_t fill;       /* low 3 bits: kind (fill_range); the rest seeds the generator */
} fuzz_matrix;
#pragma pack(pop)

typedef struct reader {
    const uint8_t *p;
    size_t n, at;
} reader;

static void take(reader *r, void *dst, size_t len)
{
    memset(dst, 0, len);
    if (r->at < r->n) {
        const size_t have = r->n - r->at < len ? r->n - r->at : len;
        memcpy(dst, r->p + r->at, have);
    }
    r->at += len;
}

static uint32_t next_random(uint32_t *s)
{
    uint32_t x = *s ? *s : 0x9e3779b9u;
    x ^= x << 13; x ^= x >> 17; x ^= x << 5;
    return *s = x;
}

static uint8_t ternary_byte(uint32_t r)
{
    return (uint8_t)(((r % 3) << 6) | (((r >> 8) % 3) << 4) | (((r >> 16) % 3) << 2) | ((r >> 24) % 3));
}

/* Fill [at, at + len) of the buffer with contents of one kind: 1 random bytes, 2 valid 2-bit
 * codes (I2_S / T2), 3 TQ2_0 blocks (codes + f16 scale 0.5), 4 f16 in (-1, 1), 5 f32 in
 * (-1, 1), 6 bf16 in (-1, 1), 7 random bytes (block types: any scale, NaN included). */
static void fill_range(uint8_t *buf, uint64_t at, uint64_t len, uint32_t fill)
{
    uint32_t s = fill >> 3;
    const unsigned kind = fill & 7;
    if (kind == 0)
        return;
    for (uint64_t i = 0; i < len; i++) {
        const uint32_t r = next_random(&s);
        uint8_t b = (uint8_t)r;
        switch (kind) {
        case 2: b = ternary_byte(r); break;
        case 3: b = i % 66 == 64 ? 0x00 : i % 66 == 65 ? 0x38 : ternary_byte(r); break;
        case 4: b = i % 2 ? (uint8_t)(0x30 | (r & 0x83)) : b; break; /* exponent 2^-3..2^-1 */
        case 5: b = i % 4 == 3 ? (uint8_t)(0x3e | (r & 0x80)) : b; break;
        case 6: b = i % 2 ? (uint8_t)(0x3e | (r & 0x80)) : b; break;
        default: break;
        }
        buf[at + i] = b;
    }
}

static void fill_matrix(uint8_t *buf, uint64_t blob_len, const fuzz_matrix *m)
{
    if (m->offset < 0 || (uint64_t)m->offset >= blob_len)
        return;
    const uint64_t room = blob_len - (uint64_t)m->offset;
    fill_range(buf, (uint64_t)m->offset, m->size < room ? m->size : room, m->fill);
}

static tern_matrix to_matrix(const uint8_t *buf, const fuzz_matrix *m)
{
    /* Through uintptr_t: the pointer may lie outside the buffer, which only the library's
     * range check may notice -- it must never be dereferenced. */
    const tern_matrix t = {(const void *)((uintptr_t)buf + (uintptr_t)m->offset), m->size, m->type,
                           m->cols, m->rows, m->scale};
    return t;
}

/* A norm array of n floats (exactly), its bytes taken cyclically from the buffer; NULL (which
 * the library must refuse) when n is out of the harness's range. */
static float *make_norm(const uint8_t *buf, uint64_t blob_len, uint32_t off, int64_t n)
{
    if (n <= 0 || n > MAX_NORM || blob_len == 0)
        return NULL;
    float *f = malloc((size_t)n * sizeof(float));
    if (!f)
        return NULL;
    uint8_t *dst = (uint8_t *)f;
    for (int64_t i = 0; i < n * 4; i++)
        dst[i] = buf[(off + (uint64_t)i) % blob_len];
    return f;
}

static void run_session(tern_model *model, const fuzz_header *h)
{
    tern_session *s = NULL;
    if (tern_session_create(model, h->n_ctx % 8, h->kv_type, (h->flags & 2) ? 2 : 1, &s) != TERN_OK)
        return;
    float *logits = malloc((size_t)h->n_vocab * 3 * sizeof(float)); /* n_vocab > 0: it loaded */
    if (logits) {
        const int32_t n = 1 + (int32_t)((h->flags >> 5) % 3);
        if (tern_forward(s, h->tokens, n, logits, (h->flags & 4) != 0) == TERN_OK)
            fuzz_outcome = 2;
        tern_forward(s, h->tokens + 2, 1, logits, 0);
        tern_session_truncate(s, (int32_t)((h->flags >> 7) % 3));
    }
    free(logits);
    tern_session_free(s);
}

static void describe(tern_model_params *p, const fuzz_header *h, const uint8_t *buf, uint64_t blob_len,
                     const fuzz_matrix *embd, const fuzz_matrix *out, fuzz_matrix desc[][7],
                     tern_layer_params *layers, float *norms[4])
{
    memset(p, 0, sizeof *p);
    p->n_vocab = h->n_vocab; p->n_embd = h->n_embd; p->n_layer = h->n_layer;
    p->n_head = h->n_head; p->n_head_kv = h->n_head_kv; p->n_ff = h->n_ff;
    p->rope_theta = h->rope_theta; p->rms_eps = h->rms_eps;
    p->activation = h->activation; p->lm_head = h->lm_head;
    p->file_base = buf;
    p->file_size = blob_len - (h->size_cut < blob_len ? h->size_cut : blob_len);
    p->release_sources = 0; /* the buffer is heap memory, not a file mapping */
    p->token_embd = to_matrix(buf, embd);
    if (h->flags & 8)
        p->output = to_matrix(buf, out);
    /* One array per norm kind, shared by the layers (the library copies them at create). */
    const int64_t lens[4] = {h->n_embd, h->n_embd, h->n_embd, h->n_ff};
    for (int k = 0; k < 4; k++)
        norms[k] = make_norm(buf, blob_len, h->norm_off + 4096u * (uint32_t)k, lens[k]);
    for (int32_t i = 0; i < h->n_layer; i++) {
        const fuzz_matrix *d = desc[i % DESC_LAYERS];
        tern_layer_params *l = &layers[i];
        l->wq = to_matrix(buf, &d[0]); l->wk = to_matrix(buf, &d[1]); l->wv = to_matrix(buf, &d[2]);
        l->wo = to_matrix(buf, &d[3]); l->w_gate = to_matrix(buf, &d[4]);
        l->w_up = to_matrix(buf, &d[5]); l->w_down = to_matrix(buf, &d[6]);
        l->attn_norm = norms[0]; l->attn_sub_norm = norms[1];
        l->ffn_norm = norms[2]; l->ffn_sub_norm = norms[3];
    }
    p->layers = layers;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    reader r = {data, size, 0};
    fuzz_outcome = 0;
    fuzz_header h;
    take(&r, &h, sizeof h);
    if (h.n_layer > MAX_LAYERS)
        return 0; /* a caller with that many layers holds their arrays: not ours to allocate */
    fuzz_matrix embd, out, desc[DESC_LAYERS][7];
    take(&r, &embd, sizeof embd);
    take(&r, &out, sizeof out);
    const int32_t n_desc = h.n_layer < 0 ? 0 : h.n_layer < DESC_LAYERS ? h.n_layer : DESC_LAYERS;
    for (int32_t i = 0; i < n_desc; i++)
        take(&r, desc[i], sizeof desc[i]);

    const uint64_t blob_len = h.blob_len % (MAX_BLOB + 1);
    uint8_t *buf = calloc(1, blob_len ? blob_len : 1);
    tern_layer_params *layers = calloc(h.n_layer > 0 ? (size_t)h.n_layer : 1, sizeof *layers);
    float *norms[4] = {NULL, NULL, NULL, NULL}, *out_norm = NULL;
    if (buf && layers) {
        fill_matrix(buf, blob_len, &embd);
        if (h.flags & 8)
            fill_matrix(buf, blob_len, &out);
        for (int32_t i = 0; i < n_desc; i++)
            for (int j = 0; j < 7; j++)
                fill_matrix(buf, blob_len, &desc[i][j]);
        if (r.at < size)
            memcpy(buf, data + r.at, size - r.at < blob_len ? size - r.at : blob_len);

        tern_model_params p;
        describe(&p, &h, buf, blob_len, &embd, &out, desc, layers, norms);
        if (!(h.flags & 16))
            out_norm = make_norm(buf, blob_len, h.norm_off + 123u, h.n_embd);
        p.output_norm = out_norm;

        tern_model *model = NULL;
        if (tern_model_create(&p, &model) == TERN_OK) {
            fuzz_outcome = 1;
            if (h.flags & 1)
                run_session(model, &h);
            tern_model_free(model);
        } else if (!tern_last_error() || !tern_last_error()[0]) {
            __builtin_trap(); /* a failure must say why */
        }
    }
    for (int k = 0; k < 4; k++)
        free(norms[k]);
    free(out_norm);
    free(layers);
    free(buf);
    return 0;
}
