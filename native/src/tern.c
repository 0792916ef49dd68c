/* Library-wide entry points: one-time init, version and the kernel variant in use. */
#include <pthread.h>

#include "f16.h"
#include "kernels.h"
#include "tern.h"

static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static void init(void)
{
    tern_f16_init();
    tern_cpu_features();
    tern_kernels_by_name("scalar"); /* fills the variant table */
}

void tern_lib_init(void) { pthread_once(&init_once, init); }

const char *tern_version(void) { return "0.2.0"; }

const char *tern_kernel_name(void)
{
    tern_lib_init();
    const tern_kernels *k = tern_kernels_select();
    return k ? k->name : NULL;
}
