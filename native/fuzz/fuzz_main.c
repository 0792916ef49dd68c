/* The harnesses as a plain program (no libFuzzer): runs LLVMFuzzerTestOneInput once on each
 * file named on the command line, for the corpus regression test and for reproducing a crash
 * under any compiler. Exit status 0 when every input ran; a crash aborts the process. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
/* Set by harnesses that say how far an input got; printed as "outcome N path" when present. */
extern int fuzz_outcome __attribute__((weak));

static int run_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return -1;
    uint8_t *data = NULL;
    size_t size = 0, cap = 0;
    for (;;) {
        if (size == cap) {
            cap = cap ? 2 * cap : 65536;
            uint8_t *grown = realloc(data, cap);
            if (!grown) {
                free(data);
                fclose(f);
                return -1;
            }
            data = grown;
        }
        const size_t got = fread(data + size, 1, cap - size, f);
        if (got == 0)
            break;
        size += got;
    }
    fclose(f);
    /* An exact-size copy, so that ASan sees reads past the input's end as libFuzzer would. */
    uint8_t *exact = malloc(size ? size : 1);
    if (!exact) {
        free(data);
        return -1;
    }
    for (size_t i = 0; i < size; i++)
        exact[i] = data[i];
    free(data);
    LLVMFuzzerTestOneInput(exact, size);
    free(exact);
    if (&fuzz_outcome)
        printf("outcome %d %s\n", fuzz_outcome, path);
    return 0;
}

/* The peak resident set of this program alone, as "peak_rss_kb N" (Linux). getrusage's maxrss
 * would not do: it keeps the high-water mark of the process image before exec, i.e. of the
 * (large) test process that forked this one. */
static void print_peak_rss(void)
{
#ifdef __linux__
    FILE *f = fopen("/proc/self/status", "r");
    if (!f)
        return;
    char line[256];
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %255[0-9]", line) == 1) {
            printf("peak_rss_kb %s\n", line);
            break;
        }
    fclose(f);
#endif
}

int main(int argc, char **argv)
{
    int failed = 0;
    for (int i = 1; i < argc; i++)
        if (run_file(argv[i]) != 0) {
            fprintf(stderr, "cannot read %s\n", argv[i]);
            failed = 1;
        }
    print_peak_rss();
    return failed;
}
