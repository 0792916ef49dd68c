/* libFuzzer target over the native loader and one forward pass (src/fuzz_entry.c); built by
 * native/fuzz/CMakeLists.txt (scripts/fuzz.sh). Its kept corpus is native/fuzz/corpus, replayed
 * by tests/test_native_model.py. */
#include <stddef.h>
#include <stdint.h>

int32_t tern_fuzz_model(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    tern_fuzz_model(data, size);
    return 0;
}
