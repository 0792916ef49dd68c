/* libFuzzer target over the native loader and one forward pass (src/fuzz_entry.c).
 * Build: cmake -S native -B /tmp/tern-fuzz -DTERN_FUZZ=ON -DCMAKE_C_COMPILER=clang
 * Run:   /tmp/tern-fuzz/tern_fuzz_model native/fuzz/corpus -max_total_time=600 */
#include <stddef.h>
#include <stdint.h>

int32_t tern_fuzz_model(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    tern_fuzz_model(data, size);
    return 0;
}
