/*
 * netvsc guest data path against a hostile host: the input is a program of host actions
 * (XFER_PAGES packets with fuzzed ranges and page sets, RNDIS messages and PPIs written into
 * the receive buffer, in-band NVSP messages, completions for our sends or for nothing,
 * index corruption, floods that fill the receive queue) interleaved with guest calls
 * (rx_burst copy and zero-copy, forwarding, release, poll_ctrl/ctrl_next, reap, tx_burst,
 * control sends).  Oracle besides ASan/UBSan: every frame returned lies inside the receive
 * buffer (zero-copy) or the copy buffer, and no frame is longer than the limit.
 *
 * Speed: the rings, receive/send buffers, bounce slots and the queue are set up once; per
 * input only the ring headers and the dirty parts are cleared and the queue is reset
 * (uvb_nvsc_queue_reset): an init per input (megabytes of fresh pages) ran ~700 inputs/s.
 */
#include "common.h"

#define TXDS (16u << 10)
#define RXDS (64u << 10)
#define RECV (128u << 10)
#define SUB 2048u                   /* the host's sub-allocation size used by op 1 */
#define SECTION 6144u
#define SECTIONS 8u
#define SLOT (12u << 10)
#define SLOTS 2u
#define RECV_ID 0xCAFE

static uint8_t *txm, *rxm, *recv, *sendb, *gpa;
static uint64_t gpa_pfns[SLOTS * SLOT / 4096];
static uint8_t copybuf[256u << 10];
static uint8_t frames_src[16u << 10];
static uint8_t ctrlbuf[4096];
static uint32_t recv_dirty;

struct host {
    struct uvb_ring w;              /* host writes the guest RX ring */
    struct uvb_ring r;              /* host reads the guest TX ring */
    int wok, rok;
    /* the last XFER packet, for floods */
    struct vmtransfer_page_range rg[8];
    uint32_t nrg;
    uint8_t msg[16];
};

static void host_commit(struct host *h, struct fz *f)
{
    if (h->wok && (fz_u8(f) & 3) != 3)
        uvb_out_commit(&h->w);
}

static int put_xfer(struct host *h, uint16_t pageset, uint64_t tid)
{
    return uvb_out_xfer_pages(&h->w, 0, tid, pageset, 0, h->rg, h->nrg, h->msg, sizeof h->msg);
}

static void rndis_at(struct fz *f, uint32_t off)
{
    struct rndis_packet p;
    memset(&p, 0, sizeof p);
    uint8_t mode = fz_u8(f);
    uint32_t flen = fz_u16(f) % 1600, nppi = mode >> 5 & 3;
    uint8_t body[44 + 4 * 16];
    uint32_t ppi_len = 16 * nppi;
    p.msg_type = (mode & 3) == 0 ? fz_u32(f) : (mode & 3) == 1 ? RNDIS_MSG_INDICATE : RNDIS_MSG_PACKET;
    p.msg_len = 44 + ppi_len + flen;
    p.per_pkt_info_offset = ppi_len ? 36 : 0;
    p.per_pkt_info_len = ppi_len;
    p.data_offset = 36 + ppi_len;
    p.data_len = flen;
    if (mode & 4)                   /* let the input override every header field */
        for (uint32_t i = 0; i < 11; i++)
            ((uint32_t *)&p)[i] = (mode & 8) ? fz_u32(f) : ((uint32_t *)&p)[i] ^ fz_u8(f);
    memcpy(body, &p, 44);
    for (uint32_t i = 0; i < nppi; i++) {
        uint8_t t = fz_u8(f) % 14;      /* 12, 13: the RSC fragment id (chains, rsc_chain) */
        struct rndis_ppi e = {16, t < 12 ? t : PPI_RNDIS_PKTINFO_ID, 12};
        if (mode & 0x80)
            e.size = fz_u8(f);
        memcpy(body + 44 + 16 * i, &e, 12);
        uint32_t v = fz_u32(f);
        memcpy(body + 44 + 16 * i + 12, &v, 4);
    }
    uint32_t n = 44 + ppi_len;
    if (off + n > RECV)
        return;
    memcpy(recv + off, body, n);
    if (off + n + flen > recv_dirty)
        recv_dirty = off + n + flen < RECV ? off + n + flen : RECV;
}

static void check_frames(const struct uvb_nvsc_queue *q, const struct uvb_nvsc_frame *fr, int n,
                         uint64_t cap, int zc)
{
    for (int i = 0; i < n; i++) {
        int rsc = (fr[i].flags & UVB_NVSC_F_RSC) != 0;    /* joined: zero-copy ones in rsc_buf */
        uint64_t c = zc && rsc ? q->rsc_size : cap;
        FZ_CHECK(fr[i].offset + fr[i].len <= c &&
                 fr[i].len <= (rsc ? UVB_NVSC_MAX_RSC_FRAME : UVB_NVSC_MAX_FRAME),
                 "frame outside its buffer");
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!txm) {
        txm = fz_map(FZ_HDR + TXDS);
        rxm = fz_map(FZ_HDR + RXDS);
        recv = fz_map(RECV);
        sendb = fz_map(SECTION * SECTIONS);
        gpa = fz_map(SLOTS * SLOT);
        for (uint32_t i = 0; i < SLOTS * SLOT / 4096; i++)
            gpa_pfns[i] = 0x1000 + i;
    }
    struct fz f = {data, size};
    fz_ring_fresh(txm, TXDS);
    fz_ring_fresh(rxm, RXDS);
    memset(rxm + FZ_HDR, 0, RXDS);
    memset(recv, 0, recv_dirty);
    recv_dirty = 0;

    static struct uvb_ring tx, rx;
    static struct uvb_signal sig;
    static struct uvb_nvsc_queue q;
    fz_signal(&sig);
    if (uvb_ring_attach(&tx, txm, FZ_HDR + TXDS, FZ_HDR, UVB_RING_OUT) ||
        uvb_ring_attach(&rx, rxm, FZ_HDR + RXDS, FZ_HDR, UVB_RING_IN))
        __builtin_trap();
    struct host h;
    memset(&h, 0, sizeof h);
    h.wok = uvb_ring_attach(&h.w, rxm, FZ_HDR + RXDS, FZ_HDR, UVB_RING_OUT) == 0;
    h.rok = uvb_ring_attach(&h.r, txm, FZ_HDR + TXDS, FZ_HDR, UVB_RING_IN) == 0;

    /* the queue is set up once (its buffers are megabytes) and reset per input */
    if (!q.priv) {
        q.tx = &tx;
        q.rx = &rx;
        q.sig = &sig;
        q.recv_buf = recv;
        q.recv_size = RECV;
        q.send_buf = sendb;
        q.send_size = SECTION * SECTIONS;
        q.section_size = SECTION;
        q.section_count = SECTIONS;
        q.pkt_align = 8;
        q.recv_buf_id = RECV_ID;
        q.gpa_base = gpa;
        q.gpa_pfns = gpa_pfns;
        q.gpa_slot_size = SLOT;
        q.gpa_slots = SLOTS;
        if (uvb_nvsc_queue_init(&q))
            __builtin_trap();
    } else if (uvb_nvsc_queue_reset(&q)) {
        __builtin_trap();
    }
    uint8_t cfg = fz_u8(&f);
    q.max_pkt_per_msg = cfg & 1 ? 8 : 1;
    q.max_frame = cfg & 2 ? 9014 : 1514;
    q.ack_size = cfg & 4 ? 40 : 8;
    q.max_xfer = cfg & 8 ? 2048 : SECTION;

    static struct uvb_nvsc_frame fr[64];
    int flooded = 0;
    for (int op = 0; op < 48 && fz_left(&f); op++) {
        switch (fz_u8(&f) % 18) {
        case 0: {                   /* an XFER_PAGES packet of RNDIS messages */
            uint8_t m = fz_u8(&f);
            h.nrg = m % 8 + 1;
            for (uint32_t i = 0; i < h.nrg; i++) {
                if (m & 0x80) {
                    h.rg[i].byte_offset = fz_u32(&f);
                    h.rg[i].byte_count = fz_u32(&f);
                } else {
                    h.rg[i].byte_offset = (fz_u8(&f) % (RECV / SUB)) * SUB;
                    h.rg[i].byte_count = fz_u16(&f) % (SUB + 1);
                }
            }
            uint32_t hdr[4] = {NVSP_MSG1_TYPE_SEND_RNDIS_PKT, (m & 0x40) ? 1u : 0u, 0, 0};
            if ((m & 0x30) == 0x30)
                hdr[0] = fz_u32(&f);
            memcpy(h.msg, hdr, sizeof hdr);
            if (h.wok)
                put_xfer(&h, (m & 0x38) == 0x08 ? fz_u16(&f) : RECV_ID, fz_u16(&f));
            host_commit(&h, &f);
            break;
        }
        case 1:                     /* an RNDIS message in a sub-allocation */
            rndis_at(&f, (fz_u8(&f) % (RECV / SUB)) * SUB);
            break;
        case 2: {                   /* raw bytes anywhere in the receive buffer */
            uint32_t off = fz_u32(&f) % RECV, n;
            const uint8_t *b = fz_bytes(&f, fz_u8(&f), &n);
            if (off + n > RECV)
                n = RECV - off;
            memcpy(recv + off, b, n);
            if (off + n > recv_dirty)
                recv_dirty = off + n;
            break;
        }
        case 3: {                   /* an in-band NVSP message */
            uint32_t n;
            const uint8_t *b = fz_bytes(&f, fz_u8(&f) % 64, &n);
            if (h.wok)
                uvb_out_inband(&h.w, VMBUS_PKT_INBAND, fz_u8(&f) & 1, fz_u16(&f), b, n);
            host_commit(&h, &f);
            break;
        }
        case 4: {                   /* a completion: for one of our sends, or for anything */
            uint8_t m = fz_u8(&f);
            static const uint64_t kinds[4] = {UVB_NVSC_TID_DATA, UVB_NVSC_TID_CTRL, UVB_NVSC_TID_GPA, 0};
            uint64_t tid = (m & 0x80) ? fz_u64(&f) : kinds[m & 3] | fz_u8(&f) % 12;
            uint32_t msg[2] = {NVSP_MSG1_TYPE_SEND_RNDIS_PKT_COMPLETE, m & 4 ? fz_u32(&f) : 1u};
            if (m & 8)
                msg[0] = fz_u32(&f);
            if (h.wok)
                uvb_out_inband(&h.w, VMBUS_PKT_COMP, 0, tid, msg, m & 0x10 ? fz_u8(&f) % 9 : 8);
            host_commit(&h, &f);
            break;
        }
        case 5:
            fz_poke_index(&f, rxm);
            break;
        case 6: {                   /* a packet of another type */
            uint8_t b[24] = {0};
            if (h.wok)
                uvb_out_inband(&h.w, fz_u16(&f), fz_u8(&f) & 1, fz_u16(&f), b, fz_u8(&f) % 25);
            host_commit(&h, &f);
            break;
        }
        case 7: {                   /* guest: copy-mode burst */
            static const uint64_t caps[4] = {0, 64, 2048, sizeof copybuf};
            uint64_t cap = caps[fz_u8(&f) & 3];
            int n = uvb_nvsc_rx_burst(&q, fr, fz_u8(&f) % 64 + 1, copybuf, cap);
            check_frames(&q, fr, n, cap, 0);
            break;
        }
        case 8: {                   /* guest: zero-copy burst, maybe forward, release */
            uint8_t m = fz_u8(&f);
            int n = uvb_nvsc_rx_burst(&q, fr, m % 64 + 1, NULL, 0);
            check_frames(&q, fr, n, RECV, 1);
            if (n > 0 && (m & 0x40))
                uvb_nvsc_tx_fwd(&q, fr, (uint32_t)n);
            if (m & 0x80)
                uvb_nvsc_rx_release(&q);
            break;
        }
        case 9: {                   /* guest: control plane */
            uvb_nvsc_poll_ctrl(&q);
            struct uvb_nvsc_ctrl rec;
            uint32_t len = fz_u16(&f) % (sizeof ctrlbuf + 1);
            for (int i = 0; i < 64 && uvb_nvsc_ctrl_next(&q, &rec, ctrlbuf, len) > 0; i++)
                ;
            break;
        }
        case 10:
            uvb_nvsc_reap(&q);
            break;
        case 11: {                  /* guest: send frames */
            uint32_t n = fz_u8(&f) % 16 + 1, at = 0;
            struct uvb_nvsc_frame tf[16];
            for (uint32_t i = 0; i < n; i++) {
                tf[i].offset = at;
                tf[i].len = fz_u16(&f) % 9100;
                if (at + tf[i].len > sizeof frames_src)
                    tf[i].len = 0;
                at += tf[i].len;
                tf[i].flags = fz_u8(&f) & (UVB_NVSC_F_VLAN | UVB_NVSC_F_TX_CSUM);
                tf[i].vlan = fz_u16(&f);
                tf[i].csum = fz_u32(&f);
            }
            uvb_nvsc_tx_burst(&q, frames_src, tf, n);
            break;
        }
        case 12: {
            uint32_t n;
            const uint8_t *b = fz_bytes(&f, fz_u16(&f) % 8192, &n);
            if (fz_u8(&f) & 1)
                uvb_nvsc_send_ctrl(&q, b, n);
            else
                uvb_nvsc_send_inband(&q, b, n, fz_u16(&f), 1);
            break;
        }
        case 13:                    /* host: drain the guest TX ring */
            if (h.rok) {
                static uint8_t buf[TXDS];
                struct uvb_pkt k[64];
                if (uvb_in_read(&h.r, buf, sizeof buf, k, 64) > 0)
                    uvb_in_commit(&h.r);
            }
            break;
        case 14:
            fz_poke_index(&f, txm);
            break;
        case 15:                    /* host: flood the last XFER packet until the guest's
                                       packet queue is full (drop-oldest path) */
            if (!flooded && h.wok && h.nrg) {
                flooded = 1;
                /* the fuzz build's queue holds 64 packets (build.py DEFINES) */
                for (int round = 0; round < 4; round++) {
                    int put = 0;
                    while (put < 48 && put_xfer(&h, RECV_ID, 7) >= 0)
                        put++;
                    uvb_out_commit(&h.w);
                    if (uvb_nvsc_poll_ctrl(&q) < 0 || !put)
                        break;
                }
            }
            break;
        case 16:
            uvb_nvsc_rx_pending(&q);
            uvb_nvsc_tx_inflight(&q);
            uvb_nvsc_flush(&q);
            break;
        case 17:
            host_commit(&h, &f);
            break;
        }
    }
    return 0;
}
