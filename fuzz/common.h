/*
 * Shared helpers of the libFuzzer harnesses (the C files of fuzz/).
 *
 * Speed rule: every harness maps its memory (rings, buffers, guest RAM) ONCE, in a static
 * arena, and per input only re-initialises the few bytes an input can have touched (ring
 * headers, the used part of the data areas).  Inputs are decoded by a small cursor: a
 * harness reads "operations" from the input, so the fuzzer mutates a program of host (or
 * guest) actions instead of raw memory it would need millions of tries to make well-formed.
 * Running out of input reads zeros, which ends the op loop.
 */
#ifndef UVB_FUZZ_COMMON_H
#define UVB_FUZZ_COMMON_H
#include "uvmbus.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <stdio.h>

/* An oracle violation: say which, then crash (libFuzzer saves the input). */
#define FZ_CHECK(cond, what)                                                         \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "fuzz oracle: %s (%s:%d)\n", what, __FILE__, __LINE__);  \
            abort();                                                                  \
        }                                                                             \
    } while (0)

struct fz {
    const uint8_t *p;
    size_t n;
};

static inline int fz_left(const struct fz *f) { return f->n > 0; }

static inline uint8_t fz_u8(struct fz *f)
{
    if (!f->n)
        return 0;
    f->n--;
    return *f->p++;
}

static inline uint16_t fz_u16(struct fz *f)
{
    uint16_t v = fz_u8(f);
    return (uint16_t)(v | (uint16_t)fz_u8(f) << 8);
}

static inline uint32_t fz_u32(struct fz *f)
{
    uint32_t v = fz_u16(f);
    return v | (uint32_t)fz_u16(f) << 16;
}

static inline uint64_t fz_u64(struct fz *f)
{
    uint64_t v = fz_u32(f);
    return v | (uint64_t)fz_u32(f) << 32;
}

/* Up to `max` bytes of input (fewer when the input ends); *len gets the count. */
static inline const uint8_t *fz_bytes(struct fz *f, size_t max, uint32_t *len)
{
    size_t n = max < f->n ? max : f->n;
    const uint8_t *p = f->p;
    f->p += n;
    f->n -= n;
    *len = (uint32_t)n;
    return p;
}

/* A page-aligned arena with an inaccessible guard page on each side, mapped once (never
 * freed: the process is the fuzzer).  ASan does not watch mmap'd memory; the guard pages
 * turn any access past the map (what an untrusted peer would aim for) into a crash. */
static inline uint8_t *fz_map(size_t bytes)
{
    size_t len = (bytes + 4095u) & ~(size_t)4095u;
    uint8_t *p = mmap(NULL, len + 2 * 4096u, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED || mprotect(p + 4096u, len, PROT_READ | PROT_WRITE))
        abort();
    return p + 4096u;
}

/* One channel ring (one direction): header page + data area, in the arena. */
#define FZ_HDR 4096u

static inline void fz_ring_fresh(uint8_t *hdr, uint32_t dsize)
{
    memset(hdr, 0, FZ_HDR);
    uvb_ring_reset(hdr);
    (void)dsize;
}

/* A signal that goes nowhere (no monitor page, no int page, no fd): counts only. */
static inline void fz_signal(struct uvb_signal *s)
{
    memset(s, 0, sizeof *s);
    s->fd = -1;
}

/* Ring writer ops a hostile host (or guest) uses on the ring it writes: the well-formed
 * writer of ring.c puts packets; raw stores corrupt indices afterwards. */
static inline void fz_poke_index(struct fz *f, uint8_t *hdr)
{
    uint32_t field = fz_u8(f) % 5;
    uvb_ring_store(hdr, field, fz_u32(f));
}
#endif
