/* The one file with OS-specific calls (the rest of native/ is portable C11 + pthreads). */
#if !defined(_WIN32) && !defined(_DEFAULT_SOURCE)
#define _DEFAULT_SOURCE /* madvise, syscall under -std=c11 */
#endif
#include "kernels.h"

#if defined(__linux__) && (defined(__x86_64__) || defined(__i386__))
#include <sys/syscall.h>
#include <unistd.h>

/* Linux keeps AMX tile data off until a process asks for it (kernel >= 5.16); without this
 * the first tile instruction raises SIGILL even though XCR0 advertises the state. */
#define TERN_ARCH_REQ_XCOMP_PERM 0x1023
#define TERN_XFEATURE_XTILEDATA 18

bool tern_os_enable_amx(void)
{
    return syscall(SYS_arch_prctl, TERN_ARCH_REQ_XCOMP_PERM, TERN_XFEATURE_XTILEDATA) == 0;
}
#else
/* Elsewhere the OS either enables tile state with XCR0 (Windows) or has no AMX at all. */
bool tern_os_enable_amx(void) { return true; }
#endif

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#define TERN_HWCAP_ASIMDDP (1UL << 20)
bool tern_os_arm_dotprod(void) { return (getauxval(AT_HWCAP) & TERN_HWCAP_ASIMDDP) != 0; }
#elif defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
bool tern_os_arm_dotprod(void)
{
    int value = 0;
    size_t size = sizeof value;
    return sysctlbyname("hw.optional.arm.FEAT_DotProd", &value, &size, NULL, 0) == 0 && value;
}
#else
bool tern_os_arm_dotprod(void) { return false; }
#endif

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>

int tern_os_cpu_count(void)
{
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

void tern_os_release_pages(const void *p, uint64_t n)
{
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    const uintptr_t start = ((uintptr_t)p + page - 1) / page * page;
    const uintptr_t end = ((uintptr_t)p + (uintptr_t)n) / page * page;
    if (end > start)
        madvise((void *)start, end - start, MADV_DONTNEED); /* advisory: failure changes nothing */
}
#else
int tern_os_cpu_count(void) { return 1; }

void tern_os_release_pages(const void *p, uint64_t n)
{
    (void)p;
    (void)n;
}
#endif
