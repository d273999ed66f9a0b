/*
 * storvsc guest completion path against a hostile host: the guest submits requests (so
 * slots are in flight), the host answers with completions whose transaction ids, sizes,
 * operations, SRB/SCSI status and sense bytes come from the input (for live slots, reused
 * slots, abandoned slots or nothing), unsolicited in-band packets, packets of other types
 * and index corruption; the guest reaps (both entry points) and abandons.  Sense decoding
 * gets raw bytes.  Oracle: a DONE completion names a tag that was submitted and is reported
 * once, sense_len never exceeds the sense field.
 */
#include "common.h"

#define TXDS (16u << 10)
#define RXDS (16u << 10)
#define DEPTH 16u

static uint8_t *txm, *rxm;
static uint8_t rxbuf[RXDS];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!txm) {
        txm = fz_map(FZ_HDR + TXDS);
        rxm = fz_map(FZ_HDR + RXDS);
    }
    struct fz f = {data, size};
    fz_ring_fresh(txm, TXDS);
    fz_ring_fresh(rxm, RXDS);
    struct uvb_ring tx, rx, hw, hr;
    struct uvb_signal sig;
    fz_signal(&sig);
    if (uvb_ring_attach(&tx, txm, FZ_HDR + TXDS, FZ_HDR, UVB_RING_OUT) ||
        uvb_ring_attach(&rx, rxm, FZ_HDR + RXDS, FZ_HDR, UVB_RING_IN))
        __builtin_trap();
    int wok = uvb_ring_attach(&hw, rxm, FZ_HDR + RXDS, FZ_HDR, UVB_RING_OUT) == 0;
    int rok = uvb_ring_attach(&hr, txm, FZ_HDR + TXDS, FZ_HDR, UVB_RING_IN) == 0;

    struct uvb_stor_queue q;
    struct uvb_stor_slot slots[DEPTH];
    uint32_t free_list[DEPTH];
    struct uvb_pkt pkts[32];
    memset(&q, 0, sizeof q);
    if (uvb_stor_queue_init(&q, &tx, &rx, &sig, slots, free_list, DEPTH, pkts, 32, rxbuf, sizeof rxbuf))
        __builtin_trap();
    uint8_t done[64] = {0};             /* tags 1..63: 1 = submitted, 2 = completed */
    uint64_t next_tag = 1;
    uint64_t tids[DEPTH * 4];
    uint32_t ntids = 0;

    for (int op = 0; op < 48 && fz_left(&f); op++) {
        switch (fz_u8(&f) % 9) {
        case 0: {                       /* guest submits a few requests */
            struct uvb_stor_req r[4];
            uint64_t pfns[4] = {0x100, 0x101, 0x102, 0x103};
            uint32_t n = fz_u8(&f) % 4 + 1;
            memset(r, 0, sizeof r);
            for (uint32_t i = 0; i < n; i++) {
                r[i].tag = next_tag + i < 64 ? next_tag + i : 0;
                r[i].kind = fz_u8(&f) % 4;
                r[i].pfns = pfns;
                r[i].lba = fz_u32(&f);
                r[i].blocks = fz_u8(&f) % 9;
                r[i].length = fz_u8(&f) & 1 ? r[i].blocks * 512u : 0;
                r[i].byte_offset = fz_u16(&f) % 4096;
                r[i].operation = fz_u8(&f);
                r[i].data_in = fz_u8(&f) % 3;
                r[i].cdb_length = fz_u8(&f) % 17;
                r[i].cdb[0] = fz_u8(&f);
            }
            int k = uvb_stor_submit(&q, r, n);
            for (int i = 0; i < k; i++)
                if (r[i].tag)
                    done[r[i].tag] = 1;
            next_tag += n;
            break;
        }
        case 1:                         /* host reads the requests and learns their ids */
            if (rok) {
                static uint8_t buf[TXDS];
                struct uvb_pkt k[32];
                int n = uvb_in_read(&hr, buf, sizeof buf, k, 32);
                for (int i = 0; i < n && ntids < DEPTH * 4; i++)
                    tids[ntids++] = k[i].trans_id;
                if (n > 0)
                    uvb_in_commit(&hr);
            }
            break;
        case 2: {                       /* host: a completion */
            struct vstor_packet p;
            memset(&p, 0, sizeof p);
            uint8_t m = fz_u8(&f);
            uint64_t tid = (m & 0x80 || !ntids) ? fz_u64(&f) : tids[fz_u8(&f) % ntids];
            p.operation = m & 0x40 ? fz_u32(&f) : VSTOR_OP_COMPLETE_IO;
            p.status = m & 0x20 ? fz_u32(&f) : 0;
            p.u.srb.length = VSTOR_SRB_LEN_V2;
            p.u.srb.srb_status = fz_u8(&f);
            p.u.srb.scsi_status = fz_u8(&f);
            p.u.srb.sense_info_length = fz_u8(&f);
            p.u.srb.data_transfer_length = fz_u32(&f);
            uint32_t n;
            const uint8_t *s = fz_bytes(&f, 20, &n);
            memcpy(p.u.srb.payload, s, n);
            uint32_t len = m & 0x10 ? fz_u8(&f) % 80 : sizeof p;
            static uint8_t big[80];
            memcpy(big, &p, sizeof p);
            if (wok)
                uvb_out_inband(&hw, m & 8 ? fz_u16(&f) : VMBUS_PKT_COMP, 0, tid, big, len);
            if (wok && (m & 4) == 0)
                uvb_out_commit(&hw);
            break;
        }
        case 3: {                       /* host: an unsolicited in-band packet */
            struct vstor_packet p;
            memset(&p, 0, sizeof p);
            p.operation = fz_u8(&f) % 16;
            if (wok)
                uvb_out_inband(&hw, VMBUS_PKT_INBAND, 0, fz_u8(&f) & 1 ? 0 : fz_u64(&f), &p, sizeof p);
            if (wok)
                uvb_out_commit(&hw);
            break;
        }
        case 4: {                       /* guest reaps */
            struct uvb_stor_cpl c[16];
            uint64_t tags[16];
            uint8_t ok[16];
            uint32_t nbad = 0, max = fz_u8(&f) % 16 + 1;
            int n = fz_u8(&f) & 1 ? uvb_stor_reap(&q, c, max) : uvb_stor_reap_tags(&q, c, tags, ok, max, &nbad);
            for (int i = 0; i < n; i++) {
                FZ_CHECK(c[i].sense_len <= sizeof c[i].sense, "sense_len beyond the sense field");
                if (c[i].kind == UVB_STOR_CPL_DONE && c[i].tag) {
                    FZ_CHECK(c[i].tag < 64 && done[c[i].tag] == 1, "completion of an unknown tag, or twice");
                    done[c[i].tag] = 2;
                }
                if (c[i].kind == UVB_STOR_CPL_LATE && c[i].tag < 64)
                    done[c[i].tag] = 2;
            }
            break;
        }
        case 5: {                       /* guest gives up on a request */
            uint64_t tag = fz_u8(&f) % 64;
            uint32_t rel = fz_u8(&f) & 1;
            if (uvb_stor_abandon(&q, tag, rel) == 0 && rel)
                done[tag] = 2;          /* released: a late completion is BOGUS, not DONE */
            else if (tag && done[tag] == 1 && !rel)
                ;                       /* reserved: a late completion comes as LATE */
            break;
        }
        case 6:
            fz_poke_index(&f, fz_u8(&f) & 1 ? rxm : txm);
            break;
        case 7: {
            uint8_t key, asc, ascq;
            uint32_t n;
            const uint8_t *s = fz_bytes(&f, fz_u8(&f) % 64, &n);
            uint8_t copy[64];
            memcpy(copy, s, n);
            uvb_stor_sense(copy, n, &key, &asc, &ascq);
            break;
        }
        case 8: {
            struct uvb_stor_queue *qs = &q;
            uvb_stor_spin(&qs, 1, 0);
            uvb_stor_oldest(&q);
            uvb_stor_inflight(&q);
            break;
        }
        }
    }
    return 0;
}
