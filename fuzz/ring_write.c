/*
 * Guest ring writer against a hostile reader: puts of every packet kind on a TX ring whose
 * read_index, pending_send_sz and feature bits the (hostile) host sets, including changes
 * between calls.  Guard pages around the ring turn any write past it into a crash; oracle:
 * uvb_out_free never claims more than the data area.
 */
#include "common.h"

#define DS 8192u

static uint8_t *mem;
static uint8_t payload[DS + 64];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!mem)
        mem = fz_map(FZ_HDR + DS);
    struct fz f = {data, size};
    uint8_t *hdr = mem;
    memset(hdr, 0, 128);
    for (uint32_t i = 0; i < 5; i++)
        uvb_ring_store(hdr, i, fz_u8(&f) & 1 ? fz_u32(&f) : 0);

    struct uvb_ring r;
    if (uvb_ring_attach(&r, hdr, FZ_HDR + DS, FZ_HDR, UVB_RING_OUT) < 0)
        return 0;
    struct uvb_signal s;
    fz_signal(&s);
    for (int op = 0; op < 64 && fz_left(&f); op++) {
        uint32_t len = fz_u16(&f) % (DS + 64);
        switch (fz_u8(&f) % 11) {
        case 0:
            uvb_out_inband(&r, VMBUS_PKT_INBAND, fz_u8(&f) & 1, fz_u64(&f), payload, len);
            break;
        case 1: {
            struct uvb_iov iov[3] = {{payload, len}, {payload, fz_u16(&f) % 512}, {payload, fz_u8(&f)}};
            uint32_t ext = fz_u8(&f) % 64;
            uvb_out_put(&r, fz_u16(&f), 0, fz_u64(&f), ext ? payload : NULL, ext, iov, fz_u8(&f) % 4);
            break;
        }
        case 2: {
            struct uvb_gpa g[2] = {{fz_u32(&f), fz_u32(&f)}, {fz_u32(&f), fz_u32(&f)}};
            uint64_t pfns[8] = {1, 2, 3, 4, 5, 6, 7, 8};
            struct uvb_iov iov = {payload, len % 128};
            uvb_out_gpa_direct(&r, 1, fz_u64(&f), g, fz_u8(&f) % 3, pfns, fz_u8(&f) % 9, &iov, 1);
            break;
        }
        case 3: {
            struct vmtransfer_page_range rg[4];
            for (int i = 0; i < 4; i++) {
                rg[i].byte_count = fz_u32(&f);
                rg[i].byte_offset = fz_u32(&f);
            }
            uvb_out_xfer_pages(&r, 0, fz_u64(&f), fz_u16(&f), fz_u8(&f), rg, fz_u8(&f) % 5, payload,
                               len % 256);
            break;
        }
        case 4: {
            uint32_t lens[8], nb = fz_u8(&f) % 9, tot = 0;
            for (uint32_t i = 0; i < nb; i++) {
                lens[i] = fz_u16(&f) % 1024;
                tot += lens[i];
            }
            if (tot <= sizeof payload)
                uvb_out_inband_burst(&r, VMBUS_PKT_INBAND, 0, payload, lens, NULL, fz_u32(&f), nb);
            break;
        }
        case 5:
            uvb_out_commit_signal(&r, &s);
            break;
        case 6:
            uvb_out_rollback(&r);
            break;
        case 7:
            uvb_out_want_space(&r, fz_u32(&f));
            if (fz_u8(&f) & 1)
                uvb_out_clear_want(&r);
            break;
        case 8:                       /* the host moves read_index / pending_send_sz / ... */
            fz_poke_index(&f, hdr);
            break;
        case 9:
            FZ_CHECK(uvb_out_free(&r) <= DS && uvb_out_max_payload(&r, fz_u8(&f)) <= DS,
                     "more free space than the data area");
            uvb_out_pending(&r);
            break;
        case 10: {                    /* the host reads what we wrote (a well-behaved reader) */
            struct uvb_ring in;
            if (uvb_ring_attach(&in, hdr, FZ_HDR + DS, FZ_HDR, UVB_RING_IN) == 0) {
                static uint8_t buf[DS];
                struct uvb_pkt k[16];
                if (uvb_in_read(&in, buf, sizeof buf, k, 16) > 0)
                    uvb_in_commit(&in);
            }
            break;
        }
        }
    }
    return 0;
}
