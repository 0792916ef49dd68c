/* The float parts of the decoder step, written to match engine/reference.py's arithmetic. */
#ifndef TERN_OPS_H
#define TERN_OPS_H

#include <math.h>
#include <stdint.h>

/* y = x / sqrt(mean(x^2) + eps) * w (float32 throughout; y is scratch first: y != x). */
void tern_rms_norm(const float *x, const float *w, int64_t n, float eps, float *y);

/* Sum in numpy's pairwise order (np.sum / np.mean of float32 rows). */
float tern_sum(const float *a, int64_t n);

/* Per-token absmax int8: s = 127 / max(max|x|, 1e-5), q = clamp(rint(x * s), -128, 127).
 * Returns s. Rounds half to even under the default rounding mode (nearbyintf). */
float tern_quantize_row(const float *x, int64_t n, int8_t *q);

/* NeoX rotate-half RoPE of one head in place: element i pairs with i + d/2. cos/sin: d/2. */
void tern_rope_head(float *x, int32_t d, const float *cos_t, const float *sin_t);

/* cos/sin of pos * theta^(-2i/d), computed in double and rounded to float. */
void tern_rope_table(int64_t pos, int32_t d, double theta, float *cos_t, float *sin_t);

/* Inline so that the per-element epilogues around the GEMMs vectorize (H4b, measured: the
 * out-of-line call was 7% of a 2B4T prompt). */
static inline float tern_relu2(float x)
{
    const float r = x > 0.0f ? x : 0.0f;
    return r * r;
}

float tern_silu(float x);

#endif
