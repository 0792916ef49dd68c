/* Thread-local error text behind tern_last_error(). */
#ifndef TERN_ERROR_H
#define TERN_ERROR_H

#include <stdint.h>

/* Formats the message into this thread's error buffer and returns status (for `return`). */
int32_t tern_fail(int32_t status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

void tern_clear_error(void);

#endif
