/*
 * Guest ring reader against a corrupt ring: read/peek/commit/arm on an RX ring whose
 * header and data the (hostile) host controls, including index changes between calls.
 * Oracle besides ASan/UBSan: every packet reported lies inside the caller's buffer, and a
 * ring once dead stays dead.
 */
#include "common.h"

#include <stdio.h>

#define DS 8192u

static uint8_t *mem;
static uint8_t buf[DS + 64];
static struct uvb_pkt pkts[32];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!mem)
        mem = fz_map(FZ_HDR + DS);
    struct fz f = {data, size};
    uint8_t *hdr = mem, *d = mem + FZ_HDR;
    memset(hdr, 0, 128);
    memset(d, 0, DS);
    for (uint32_t i = 0; i < 4; i++)
        uvb_ring_store(hdr, i, fz_u32(&f));
    uvb_ring_store(hdr, 4, fz_u8(&f) & 1);
    /* raw packet bytes, starting at the read index (wrapping like the ring does) */
    uint32_t at = uvb_ring_load(hdr, 1) % DS & ~7u, n;
    const uint8_t *raw = fz_bytes(&f, fz_u16(&f) % (DS + 1), &n);
    for (uint32_t i = 0; i < n; i++)
        d[(at + i) % DS] = raw[i];

    struct uvb_ring r;
    if (uvb_ring_attach(&r, hdr, FZ_HDR + DS, FZ_HDR, UVB_RING_IN) < 0)
        return 0;
    int dead = 0;
    for (int op = 0; op < 64 && fz_left(&f); op++) {
        int rc = 0;
        switch (fz_u8(&f) % 9) {
        case 0:
            rc = uvb_in_avail(&r);
            break;
        case 1: {
            struct uvb_pkt k;
            rc = uvb_in_peek(&r, &k);
            break;
        }
        case 2: {
            uint32_t len = fz_u16(&f) % (sizeof buf + 1), max = fz_u8(&f) % 32 + 1;
            rc = uvb_in_read(&r, buf, len, pkts, max);
            for (int i = 0; i < rc; i++)
                FZ_CHECK((uint64_t)pkts[i].pkt_offset + pkts[i].pkt_len <= len &&
                         (uint64_t)pkts[i].data_offset + pkts[i].data_len <= len &&
                         pkts[i].data_offset >= pkts[i].pkt_offset, "packet outside the caller's buffer");
            break;
        }
        case 3:
            rc = uvb_in_commit(&r);
            break;
        case 4:
            uvb_in_rollback(&r);
            break;
        case 5:
            uvb_in_set_mask(&r, fz_u8(&f) & 1);
            rc = uvb_in_arm(&r);
            break;
        case 6:                       /* the host moves an index behind our back */
            fz_poke_index(&f, hdr);
            break;
        case 7: {                     /* the host rewrites ring data after we validated it */
            uint32_t off = fz_u16(&f) % DS;
            d[off] = fz_u8(&f);
            break;
        }
        case 8: {
            struct uvb_signal s;
            fz_signal(&s);
            rc = uvb_in_commit_signal(&r, &s);
            break;
        }
        }
        if (rc == UVB_ECORRUPT)
            dead = 1;
        FZ_CHECK(!dead || r.error, "a dead ring came back to life");
    }
    return 0;
}
