#include "error.h"

#include <stdarg.h>
#include <stdio.h>

#include "tern.h"

static _Thread_local char last_error[512];

int32_t tern_fail(int32_t status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return status;
}

void tern_clear_error(void) { last_error[0] = '\0'; }

const char *tern_last_error(void) { return last_error; }
