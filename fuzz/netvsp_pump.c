/*
 * Simulated NetVSP (host side) against a hostile guest: the input writes the guest TX ring
 * (NVSP SEND_RNDIS_PKT messages naming fuzzed send-buffer sections and sizes, GPA-direct
 * sends with fuzzed ranges and PFNs, completions/acks for any transaction id, other packet
 * types, index corruption), the send buffer (RNDIS PACKETs with fuzzed lengths and PPIs)
 * and guest RAM, and toggles NIC state (filter, link, data_ready, queues); the host pump and
 * service (loopback backend: TX frames come back as RX) run in between, and the guest drains
 * its RX ring.  Oracle: the pump returns a host.h code; guard pages around every shared
 * region turn an access outside it into a crash.
 *
 * Speed: the NIC, its buffers, guest RAM, rings and the queue are set up once; per input the
 * rings are cleared, the receive buffer re-connected (which resets its pools) and the queue
 * reset (uvb_nvsp_queue_reset; an init per input ran ~300 inputs/s).
 */
#include "common.h"

#define TXDS (32u << 10)
#define RXDS (32u << 10)
#define RECV (64u << 10)
#define SECTIONS 4u
#define RAM_PAGES 8u
#define BASE_PFN 0x200u
#define MTU 1514u

static uint8_t *txm, *rxm, *recv, *sendb, *ram;
static struct uvb_nvsp nic;
static uint32_t last_free;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!txm) {
        txm = fz_map(FZ_HDR + TXDS);
        rxm = fz_map(FZ_HDR + RXDS);
        recv = fz_map(RECV);
        sendb = fz_map(SECTIONS * UVB_NVSP_SECTION_SIZE);
        ram = fz_map(RAM_PAGES * 4096u);
        nic.backend = UVB_NVSP_BACKEND_LOOPBACK;
        nic.backend_fd = -1;
        nic.max_ranges = NVSP_MAX_PACKETS_PER_RECEIVE;
        nic.msg_size = 40;
        nic.recv_buf_id = NVSP_RECV_BUF_ID;
        nic.send_buf = sendb;
        nic.send_size = SECTIONS * UVB_NVSP_SECTION_SIZE;
        nic.section_size = UVB_NVSP_SECTION_SIZE;
        nic.section_count = SECTIONS;
        nic.guest_ram = ram;
        nic.ram_size = RAM_PAGES * 4096u;
        nic.ram_base_pfn = BASE_PFN;
        nic.rx_hash_ppi = 1;
        nic.rx_verify_csum = 1;
    }
    struct fz f = {data, size};
    fz_ring_fresh(txm, TXDS);
    fz_ring_fresh(rxm, RXDS);
    static struct uvb_nvsp_queue q;
    if (q.priv && uvb_nvsp_queue_reset(&q))   /* before the pools are reset below */
        __builtin_trap();
    uint8_t cfg = fz_u8(&f);
    /* re-connecting the receive buffer rebuilds every pool (most of an input's cost): only
     * when the last input left sub-allocations with the guest or control messages queued */
    if (!nic.priv || uvb_nvsp_guest_owned(&nic) || uvb_nvsp_ctrl_pending(&nic) ||
        uvb_nvsp_free_ids(&nic, 0) != last_free) {
        if (uvb_nvsp_set_recv_buf(&nic, recv, RECV, MTU))
            __builtin_trap();
        uvb_nvsp_set_queues(&nic, 1);
        last_free = uvb_nvsp_free_ids(&nic, 0);
    }
    nic.data_ready = 1;
    nic.filter = cfg & 1 ? 0x0D : 0;
    nic.link_up = !(cfg & 2);
    nic.rss_enabled = 0;
    nic.rsc_ip4 = nic.rsc_ip6 = (cfg >> 2) & 1u;          /* RSC coalescing (netvsp_rsc.c) */
    nic.rsc_max_segs = (cfg >> 3) & 3u;
    nic.max_ranges = nic.rsc_ip4 ? NVSP_MAX_PACKETS_PER_RECEIVE_RSC : NVSP_MAX_PACKETS_PER_RECEIVE;
    nic.dead = 0;
    nic.fault_kind = cfg >> 5;
    nic.fault_count = cfg >> 5 ? 1 : 0;

    static struct uvb_ring gtx, grx, htx, hrx;
    if (uvb_ring_attach(&gtx, txm, FZ_HDR + TXDS, FZ_HDR, UVB_RING_OUT) ||
        uvb_ring_attach(&grx, rxm, FZ_HDR + RXDS, FZ_HDR, UVB_RING_IN) ||
        uvb_ring_attach(&htx, txm, FZ_HDR + TXDS, FZ_HDR, UVB_RING_IN) ||
        uvb_ring_attach(&hrx, rxm, FZ_HDR + RXDS, FZ_HDR, UVB_RING_OUT))
        __builtin_trap();
    static struct uvb_host_notify notify;
    static struct uvb_host_irq irq;
    memset(&irq, 0, sizeof irq);
    irq.notify = &notify;
    irq.rx_header = rxm;
    static uint32_t kick;
    if (!q.priv) {
        if (uvb_nvsp_queue_init(&q, &nic, 0, &htx, &hrx, &irq, &kick))
            __builtin_trap();
        uvb_nvsp_attach_queue(&nic, &q);
    }
    uint64_t tids[64];
    uint32_t ntids = 0;

    for (int op = 0; op < 40 && fz_left(&f); op++) {
        switch (fz_u8(&f) % 12) {
        case 0: {                       /* guest: NVSP SEND_RNDIS_PKT naming a section */
            struct nvsp_msg_header hd = {NVSP_MSG1_TYPE_SEND_RNDIS_PKT};
            uint32_t body[3] = {fz_u8(&f) & 7 ? 0u : fz_u32(&f),
                                fz_u8(&f) & 7 ? fz_u8(&f) % (SECTIONS + 1) : fz_u32(&f),
                                fz_u16(&f) % (UVB_NVSP_SECTION_SIZE + 64)};
            uint8_t msg[40] = {0};
            memcpy(msg, &hd, sizeof hd);
            memcpy(msg + sizeof hd, body, sizeof body);
            uint8_t m = fz_u8(&f);
            if (m & 0x80)
                memcpy(msg, &(uint32_t){fz_u32(&f)}, 4);
            uvb_out_inband(&gtx, VMBUS_PKT_INBAND, m & 1, fz_u16(&f), msg, m & 0x40 ? fz_u8(&f) % 41 : 40);
            uvb_out_commit(&gtx);
            break;
        }
        case 1: {                       /* guest: an RNDIS message in a section */
            uint32_t sec = fz_u8(&f) % SECTIONS, at = fz_u8(&f) & 0xF8;
            uint8_t *d = sendb + sec * UVB_NVSP_SECTION_SIZE + at;
            struct rndis_packet p;
            memset(&p, 0, sizeof p);
            uint8_t mode = fz_u8(&f);
            uint32_t flen = fz_u16(&f) % 1600, ppi = (mode >> 5 & 3) * 16;
            p.msg_type = mode & 1 ? RNDIS_MSG_PACKET : fz_u32(&f);
            p.msg_len = 44 + ppi + flen;
            p.data_offset = 36 + ppi;
            p.data_len = flen;
            p.per_pkt_info_offset = ppi ? 36 : 0;
            p.per_pkt_info_len = ppi;
            if (mode & 2)
                for (uint32_t i = 0; i < 11; i++)
                    ((uint32_t *)&p)[i] ^= fz_u8(&f) & 1 ? fz_u32(&f) : 0;
            memcpy(d, &p, sizeof p);
            for (uint32_t i = 0; i < ppi / 16; i++) {
                struct rndis_ppi e = {mode & 4 ? fz_u8(&f) : 16u, fz_u8(&f) % 12, 12};
                memcpy(d + 44 + 16 * i, &e, 12);
                memcpy(d + 56 + 16 * i, &(uint32_t){fz_u32(&f)}, 4);
            }
            /* a frame header the loopback RSS and checksum code will parse */
            uint32_t n;
            const uint8_t *b = fz_bytes(&f, 64, &n);
            if (44 + ppi + n <= UVB_NVSP_SECTION_SIZE - at)
                memcpy(d + 44 + ppi, b, n);
            break;
        }
        case 2: {                       /* guest: GPA-direct send */
            struct uvb_gpa g[2] = {{fz_u16(&f), fz_u16(&f) % 4096}, {fz_u16(&f), fz_u16(&f) % 4096}};
            uint64_t pfns[8];
            uint32_t np = fz_u8(&f) % 9;
            for (uint32_t i = 0; i < np; i++)
                pfns[i] = fz_u8(&f) & 1 ? fz_u64(&f) : BASE_PFN + fz_u8(&f) % (RAM_PAGES + 2);
            uint8_t msg[40] = {0};
            uint32_t hdr[4] = {NVSP_MSG1_TYPE_SEND_RNDIS_PKT, fz_u8(&f) & 1, NVSP_SECTION_INDEX_NONE, 0};
            memcpy(msg, hdr, sizeof hdr);
            struct uvb_iov iov = {msg, 40};
            uvb_out_gpa_direct(&gtx, fz_u8(&f) & 1, fz_u16(&f), g, fz_u8(&f) % 2 + 1, pfns, np, &iov, 1);
            uvb_out_commit(&gtx);
            break;
        }
        case 3: {                       /* guest: RAM contents (RNDIS headers of GPA sends) */
            uint32_t off = fz_u16(&f) % (RAM_PAGES * 4096u), n;
            const uint8_t *b = fz_bytes(&f, fz_u8(&f), &n);
            if (off + n > RAM_PAGES * 4096u)
                n = RAM_PAGES * 4096u - off;
            memcpy(ram + off, b, n);
            break;
        }
        case 4: {                       /* guest: ack (completion) of an RX transfer */
            uint8_t m = fz_u8(&f);
            uint64_t tid = (m & 0x80 || !ntids) ? fz_u64(&f) : tids[fz_u8(&f) % ntids];
            uint32_t msg[2] = {NVSP_MSG1_TYPE_SEND_RNDIS_PKT_COMPLETE, m & 2 ? fz_u32(&f) : 1u};
            if (m & 4)
                msg[0] = fz_u32(&f);
            uvb_out_inband(&gtx, VMBUS_PKT_COMP, 0, tid, msg, m & 8 ? fz_u8(&f) % 9 : 8);
            uvb_out_commit(&gtx);
            break;
        }
        case 5: {                       /* guest: any other packet */
            uint32_t n;
            const uint8_t *b = fz_bytes(&f, fz_u8(&f) % 64, &n);
            uvb_out_inband(&gtx, fz_u16(&f), fz_u8(&f) & 1, fz_u16(&f), b, n);
            uvb_out_commit(&gtx);
            break;
        }
        case 6: {                       /* host: pump and service */
            int rc = uvb_nvsp_pump(&q, 0);
            FZ_CHECK(rc == UVB_HOST_IDLE || rc == UVB_HOST_RXFULL || rc == UVB_HOST_SLOWPATH ||
                     rc == UVB_HOST_KICKED || rc < 0, "pump returned an unknown code");
            if (rc == UVB_HOST_SLOWPATH) {   /* the Python model's job: consume that packet */
                struct uvb_pkt k;
                static uint8_t one[TXDS];
                if (uvb_in_read(&htx, one, sizeof one, &k, 1) > 0) {
                    uvb_nvsp_process(&q, one, &k);
                    uvb_in_commit(&htx);
                }
            }
            uvb_nvsp_service(&q);
            break;
        }
        case 7: {                       /* guest drains RX, remembering transaction ids */
            static uint8_t buf[RXDS];
            struct uvb_pkt k[32];
            int n = uvb_in_read(&grx, buf, sizeof buf, k, 32);
            for (int i = 0; i < n && ntids < 64; i++)
                tids[ntids++] = k[i].trans_id;
            if (n > 0)
                uvb_in_commit(&grx);
            break;
        }
        case 8:
            fz_poke_index(&f, fz_u8(&f) & 1 ? rxm : txm);
            break;
        case 9: {                       /* outside world: a frame, a control message */
            uint32_t n;
            const uint8_t *b = fz_bytes(&f, fz_u16(&f) % 2048, &n);
            if (fz_u8(&f) & 1)
                uvb_nvsp_inject(&nic, b, n, fz_u8(&f) & 3, fz_u16(&f));
            else
                uvb_nvsp_post_ctrl(&nic, b, n);
            break;
        }
        case 11: {                      /* a TCP stream for the RSC coalescer (netvsp_rsc.c) */
            static uint8_t seg[1514];
            uint8_t m = fz_u8(&f);
            uint32_t nseg = m % 24 + 1, seq = fz_u32(&f);
            for (uint32_t i = 0; i < nseg; i++) {
                uint8_t how = fz_u8(&f);
                uint32_t pl = fz_u16(&f) % 1461, v6 = how & 1, l3 = v6 ? 40 : 20;
                uint32_t len = 14 + l3 + 20 + pl;
                memset(seg, 0, 14 + l3 + 20);
                seg[12] = v6 ? 0x86 : 0x08;
                seg[13] = v6 ? 0xDD : 0x00;
                uint8_t *ip = seg + 14, *t = ip + l3;
                if (v6) {
                    ip[0] = 0x60;
                    ip[4] = (uint8_t)((20 + pl) >> 8);
                    ip[5] = (uint8_t)(20 + pl);
                    ip[6] = (how & 2) ? 17 : 6;
                    ip[7] = 64;
                } else {
                    ip[0] = (how & 2) ? 0x46 : 0x45;
                    ip[2] = (uint8_t)((20 + 20 + pl) >> 8);
                    ip[3] = (uint8_t)(20 + 20 + pl);
                    ip[8] = 64;
                    ip[9] = 6;
                }
                ip[v6 ? 23 : 15] = (uint8_t)(m >> 5);       /* a few flows */
                t[12] = 0x50;
                t[13] = (how & 4) ? fz_u8(&f) : 0x10;       /* ACK, or any flags */
                uint32_t s2 = seq + ((how & 8) ? fz_u16(&f) : 0);
                t[4] = (uint8_t)(s2 >> 24); t[5] = (uint8_t)(s2 >> 16);
                t[6] = (uint8_t)(s2 >> 8); t[7] = (uint8_t)s2;
                seq = s2 + pl;
                /* checksums not filled: the CSUM_OK flag (bit 1) says "known good" */
                uvb_nvsp_inject(&nic, seg, len < 60 ? 60 : len, 0x2 | (how >> 7), fz_u16(&f));
            }
            break;
        }
        case 10: {                      /* NIC state changes (what the model does) */
            uint8_t m = fz_u8(&f);
            nic.filter = m & 1 ? 0x0D : 0;
            nic.link_up = !(m & 2);
            nic.data_ready = !(m & 4);
            nic.rsc_ip4 = (m >> 4) & 1u;
            nic.rsc_ip6 = (m >> 5) & 1u;
            nic.max_ranges = nic.rsc_ip4 || nic.rsc_ip6 ? NVSP_MAX_PACKETS_PER_RECEIVE_RSC
                                                        : NVSP_MAX_PACKETS_PER_RECEIVE;
            if (m & 8) {
                nic.rss_enabled = 1;
                nic.hash_info = fz_u32(&f);
                for (int i = 0; i < 40; i++)
                    nic.rss_key[i] = (uint8_t)(i * 7 + m);
            }
            break;
        }
        }
    }
    return 0;
}
