/*
 * Small helpers shared by the C sources.  Internal: not listed in uvmbus.h, so
 * cffi never sees it.
 */
#ifndef UVB_UTIL_H
#define UVB_UTIL_H

#include <stdint.h>
#include <time.h>

/* ring framing: every packet is followed by an 8-byte trailer; descriptors are 16 bytes */
#define TRAILER 8u
#define DESC 16u

/* a polite busy-wait step */
static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* a tiny spin lock for short critical sections shared by host threads */
static inline void spin_lock(uint32_t *l)
{
    while (__atomic_exchange_n(l, 1u, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(l, __ATOMIC_RELAXED))
            cpu_relax();
}

static inline void spin_unlock(uint32_t *l)
{
    __atomic_store_n(l, 0u, __ATOMIC_RELEASE);
}

/* monotonic clock in nanoseconds */
static inline uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* RFC 1071 one's-complement sum of len bytes (big-endian 16-bit words) added to sum; fold
 * and complement it for a checksum.  Shared by the guest's and the simulated host's C. */
static inline uint32_t uvb_csum_add(uint32_t sum, const uint8_t *p, uint32_t len)
{
    while (len >= 2) {
        sum += (uint32_t)(p[0] << 8 | p[1]);
        p += 2;
        len -= 2;
    }
    if (len)
        sum += (uint32_t)(p[0] << 8);
    return sum;
}

#endif
