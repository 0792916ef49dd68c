/* Standalone exactness check of every kernel variant this CPU runs against the scalar one, for
 * targets where Python cannot run the tests (AArch64 under qemu-user, cross-compiled):
 * row counts and ranges 1..257, int8 lengths 1..257, and the real BitNet shapes.
 * Exit status 0 when every variant equals scalar exactly. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "tern.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint32_t next(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)rng_state;
}

static void fill_t2(uint8_t *w, size_t n)
{
    for (size_t i = 0; i < n; i++) { /* four codes in 0..2 */
        uint8_t b = 0;
        for (int j = 0; j < 4; j++)
            b = (uint8_t)((b << 2) | (next() % 3));
        w[i] = b;
    }
}

static void fill_i8(int8_t *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = (int8_t)(next() & 0xff);
}

static int compare(const char *variant, int op, const void *w, int64_t rows, int64_t k,
                   const int8_t *x, int64_t r0, int64_t r1, int32_t *y0, int32_t *y1)
{
    memset(y0, 0, sizeof(int32_t) * (size_t)rows);
    memset(y1, 0, sizeof(int32_t) * (size_t)rows);
    const uint64_t wsize = (uint64_t)rows * (uint64_t)(op == 0 ? k / 4 : k);
    if (tern_kernel_test("scalar", op, w, wsize, rows, k, x, 1, y0, r0, r1) != TERN_OK ||
        tern_kernel_test(variant, op, w, wsize, rows, k, x, 1, y1, r0, r1) != TERN_OK) {
        fprintf(stderr, "%s op %d: %s\n", variant, op, tern_last_error());
        return 1;
    }
    for (int64_t r = r0; r < r1; r++)
        if (y0[r] != y1[r]) {
            fprintf(stderr, "%s op %d rows=%lld k=%lld: row %lld got %d want %d\n", variant, op,
                    (long long)rows, (long long)k, (long long)r, y1[r], y0[r]);
            return 1;
        }
    return 0;
}

static int check_variant(const char *v)
{
    const int64_t kmax = 6912, rmax = 6912;
    uint8_t *w = malloc((size_t)(rmax * kmax));
    int8_t *x = malloc((size_t)kmax);
    int32_t *y0 = malloc(sizeof(int32_t) * (size_t)rmax), *y1 = malloc(sizeof(int32_t) * (size_t)rmax);
    int bad = !w || !x || !y0 || !y1;
    for (int64_t rows = 1; rows <= 257 && !bad; rows++) { /* T2: row tails and ranges */
        const int64_t k = 128 * (1 + rows % 6), r0 = next() % rows, r1 = r0 + next() % (rows - r0 + 1);
        fill_t2(w, (size_t)(rows * k / 4));
        fill_i8(x, (size_t)k);
        bad |= compare(v, 0, w, rows, k, x, r0, r1, y0, y1);
    }
    for (int64_t k = 1; k <= 257 && !bad; k++) { /* int8: length tails */
        const int64_t rows = 1 + k % 11;
        fill_i8((int8_t *)w, (size_t)(rows * k));
        fill_i8(x, (size_t)k);
        bad |= compare(v, 2, w, rows, k, x, 0, rows, y0, y1);
    }
    const int64_t shapes[5][2] = {{2560, 2560}, {640, 2560}, {6912, 2560}, {2560, 6912}, {4099, 2560}};
    for (int i = 0; i < 5 && !bad; i++) {
        const int64_t rows = shapes[i][0], k = shapes[i][1];
        fill_t2(w, (size_t)(rows * k / 4));
        fill_i8(x, (size_t)k);
        bad |= compare(v, 0, w, rows, k, x, 0, rows, y0, y1);
        fill_i8((int8_t *)w, (size_t)(rows * k));
        bad |= compare(v, 2, w, rows, k, x, 0, rows, y0, y1);
    }
    free(w); free(x); free(y0); free(y1);
    return bad;
}

int main(void)
{
    static const char *names[] = {"avx2", "avx512-vnni", "amx", "neon", "neon-dotprod"};
    int bad = 0, ran = 0;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (!tern_kernels_by_name(names[i]))
            continue;
        ran++;
        const int b = check_variant(names[i]);
        printf("%s: %s\n", names[i], b ? "MISMATCH" : "equal to scalar");
        bad |= b;
    }
    printf("kernel: %s, variants checked: %d\n", tern_kernel_name(), ran);
    return bad || ran == 0;
}
