/* Library-wide entry points: version and the kernel variant in use. */
#include "tern.h"

#include "kernels.h"

const char *tern_version(void) { return "0.2.0"; }

const char *tern_kernel_name(void)
{
    const tern_kernels *k = tern_kernels_select();
    return k ? k->name : NULL;
}
