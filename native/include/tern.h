/* Tern native library: ternary (W1.58 A8) kernels and the BitNet decoder step.
 * Knows nothing about Python. Every function returns a status; the error text
 * is fetched with tern_last_error(). Nothing here prints, exits or aborts. */
#ifndef TERN_H
#define TERN_H
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

#define TERN_OK 0
#define TERN_ERR_INVALID 1

const char *tern_version(void);
const char *tern_last_error(void);

#ifdef __cplusplus
}
#endif
#endif
