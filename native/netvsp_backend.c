/*
 * Simulated NetVSP data plane — frame sources: the traffic generator and external frames (TAP fd, injection).
 * Host side only (uvmbus sim); see netvsp.h and netvsp_priv.h.
 *
 * Written from ../shared/reference/netvsc.md §5–§7 and §10; everything read from guest
 * memory (TX ring packets are already private copies; send-buffer sections and GPA pages
 * are not) is copied into locals before it is checked.
 */
#define _GNU_SOURCE
#include "netvsp_priv.h"

/* ------------------------------------------------------------------------ */
/* generator                                                                 */

/* Reserve up to `want` sequence numbers of the generator (and, with a limit, of its quota):
 * queues generate concurrently, so this is one compare-and-swap. Returns how many were
 * reserved (0 once the limit is reached), the first one in *seq0. */
static uint32_t gen_reserve(struct uvb_nvsp_gen *g, uint32_t want, uint64_t *seq0)
{
    uint64_t s = __atomic_load_n(&g->generated, __ATOMIC_RELAXED);
    uint32_t take;
    do {
        take = want;
        if (g->limit) {
            if (s >= g->limit)
                take = 0;
            else if (g->limit - s < take)
                take = (uint32_t)(g->limit - s);
        }
    } while (take && !__atomic_compare_exchange_n(&g->generated, &s, s + take, 1,
                                                  __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    *seq0 = s;
    return take;
}

static void build_flows(struct uvb_nvsp_queue *q)
{
    struct uvb_nvsp *n = q->nic;
    struct queue_priv *qp = QP(q);
    struct uvb_nvsp_gen *g = &n->gen;
    uint32_t total = g->flows ? g->flows : 1;
    if (total > MAX_GEN_FLOWS)
        total = MAX_GEN_FLOWS;
    if (!qp->flows) {
        qp->flows = calloc(MAX_GEN_FLOWS, sizeof *qp->flows);
        if (!qp->flows)
            return;
    }
    uint32_t size = g->size < 60 ? 60 : g->size;
    if (size > n->mtu)
        size = n->mtu;
    int tcp = g->proto == UVB_NVSP_GEN_TCP4;
    uint32_t l4h = tcp ? 20u : 8u;
    if (size < 14 + 20 + l4h + 8)
        size = 14 + 20 + l4h + 8;
    qp->nflows = 0;
    /* With a limit, frame k of the stream belongs to flow k % total (round-robin over all
     * flows, as mixed traffic arrives): this queue's share is fixed by its flows, not by
     * whose worker happens to run first. */
    uint64_t per_flow = g->limit / total, extra = g->limit % total;
    qp->quota = 0;
    qp->made = 0;
    for (uint32_t f = 0; f < total; f++) {
        struct flow fl;
        memset(&fl, 0, sizeof fl);
        uint8_t *h = fl.hdr;
        memcpy(h, g->dst_mac, 6);
        memcpy(h + 6, g->src_mac, 6);
        h[12] = 0x08;
        h[13] = 0x00;
        uint8_t *ip = h + 14;
        uint32_t tot = size - 14;
        uint32_t sip = g->src_ip + f, dip = g->dst_ip;
        uint16_t sport = (uint16_t)(g->src_port + f), dport = g->dst_port;
        ip[0] = 0x45;
        ip[2] = (uint8_t)(tot >> 8);
        ip[3] = (uint8_t)tot;
        ip[6] = 0x40;
        ip[8] = 64;
        ip[9] = tcp ? 6 : 17;
        ip[12] = (uint8_t)(sip >> 24); ip[13] = (uint8_t)(sip >> 16); ip[14] = (uint8_t)(sip >> 8); ip[15] = (uint8_t)sip;
        ip[16] = (uint8_t)(dip >> 24); ip[17] = (uint8_t)(dip >> 16); ip[18] = (uint8_t)(dip >> 8); ip[19] = (uint8_t)dip;
        uint16_t c = nvsp_csum_fold(nvsp_csum_add(0, ip, 20));
        ip[10] = (uint8_t)(c >> 8);
        ip[11] = (uint8_t)c;
        uint8_t *l4 = ip + 20;
        l4[0] = (uint8_t)(sport >> 8); l4[1] = (uint8_t)sport;
        l4[2] = (uint8_t)(dport >> 8); l4[3] = (uint8_t)dport;
        if (tcp) {
            l4[12] = 0x50;          /* data offset 5 */
            l4[13] = 0x10;          /* ACK */
            l4[14] = 0xff; l4[15] = 0xff;
        } else {
            uint32_t ul = tot - 20;
            l4[4] = (uint8_t)(ul >> 8);
            l4[5] = (uint8_t)ul;    /* UDP checksum 0: none (IPv4) */
        }
        fl.hdr_len = (uint16_t)(14 + 20 + l4h);
        uint32_t htype = 0;
        /* hash over a header-only frame (lengths are not part of the hash input) */
        fl.hash = uvb_nvsp_frame_hash(n, h, fl.hdr_len, &htype);
        fl.hash_type = htype;
        if (nvsp_queue_for_hash(n, fl.hash, htype) == q->index) {
            qp->flows[qp->nflows++] = fl;
            qp->quota += per_flow + (f < extra ? 1u : 0u);
        }
    }
    qp->flow_cursor = 0;
    qp->have_flows = 1;
}

/* RSC on and a TCP stream: the host coalesced each flow's in-order segments, so they arrive
 * as SCUs of up to rsc_max_segs segments (as many as one IP datagram holds when 0), each built
 * as the coalescer would (netvsp_rsc.c) and sent in fragments.  Segments count as frames for
 * gen_count.  Returns segments generated. */
static uint32_t generate_rsc(struct uvb_nvsp_queue *q, uint32_t max, int *blocked)
{
    struct uvb_nvsp *n = q->nic;
    struct queue_priv *qp = QP(q);
    struct uvb_nvsp_gen *g = &n->gen;
    struct nic_priv *np = NP(n);
    uint32_t size = g->size < 60 ? 60 : g->size;
    if (size > n->mtu)
        size = n->mtu;
    uint32_t made = 0;
    while (made < max) {
        struct flow *fl = &qp->flows[qp->flow_cursor];
        uint32_t pl = size - fl->hdr_len;
        uint32_t k = (65535u - 40u) / pl;
        if (n->rsc_max_segs && k > n->rsc_max_segs)
            k = n->rsc_max_segs;
        if (k > max - made)
            k = max - made;
        if (g->limit) {
            uint64_t done = __atomic_load_n(&g->generated, __ATOMIC_RELAXED);
            if (done >= g->limit || qp->made >= qp->quota)
                break;
            if (k > qp->quota - qp->made)
                k = (uint32_t)(qp->quota - qp->made);
        }
        uint32_t len = fl->hdr_len + k * pl;
        uint32_t room = n->sub_size - UVB_NVSP_RX_DATA_OFFSET;
        uint32_t nfrag = (len + room - 1) / room;
        if (qp->batch_n + nfrag > n->max_ranges && nvsp_flush_batch(q)) {
            *blocked = 1;
            break;
        }
        if (__atomic_load_n(&np->pools[q->index].n, __ATOMIC_RELAXED) < nfrag)
            break;
        uint64_t seq0;
        uint32_t take = gen_reserve(g, k, &seq0);
        if (!take)
            break;
        k = take;
        if (++qp->flow_cursor >= qp->nflows)
            qp->flow_cursor = 0;
        int hashed = n->rss_enabled && n->rx_hash_ppi && fl->hash_type;
        if (nvsp_rsc_write_gen(q, fl->hdr, fl->hdr_len, fl->seq, qp->payload, pl, k, seq0, hashed,
                               fl->hash, fl->hash_type) <= 0) {
            /* cannot happen (room was checked, only this worker takes this pool's ids) */
            q->rx_nobuf++;
            break;
        }
        fl->seq += k * pl;
        qp->made += k;
        made += k;
        q->gen_frames += k;
    }
    return made;
}

/* Generate up to `max` frames into this queue.  Returns frames generated. */
uint32_t nvsp_generate(struct uvb_nvsp_queue *q, uint32_t max, int *blocked)
{
    struct uvb_nvsp *n = q->nic;
    struct queue_priv *qp = QP(q);
    struct uvb_nvsp_gen *g = &n->gen;
    uint32_t epoch = __atomic_load_n(&n->cfg_epoch, __ATOMIC_ACQUIRE);
    if (qp->epoch != epoch || !qp->have_flows) {
        qp->epoch = epoch;
        build_flows(q);
    }
    if (!qp->nflows)
        return 0;
    if (g->proto == UVB_NVSP_GEN_TCP4 && n->rsc_ip4)
        return generate_rsc(q, max, blocked);
    uint32_t size = g->size < 60 ? 60 : g->size;
    if (size > n->mtu)
        size = n->mtu;
    uint32_t ids[64];
    uint32_t made = 0;
    int tcp = g->proto == UVB_NVSP_GEN_TCP4;
    uint32_t csum = CSUM_RX_IP_OK | (tcp ? CSUM_RX_TCP_OK : CSUM_RX_UDP_OK);
    uint32_t maxr = g->burst && g->burst < n->max_ranges ? g->burst : n->max_ranges;
    struct nic_priv *np = NP(n);
    while (made < max) {
        if (g->limit) {
            uint64_t done = __atomic_load_n(&g->generated, __ATOMIC_RELAXED);
            if (done >= g->limit || qp->made >= qp->quota)
                break;
        }
        if (qp->batch_n >= maxr) {
            if (nvsp_flush_batch(q)) {
                *blocked = 1;
                break;
            }
        }
        uint32_t want = maxr - qp->batch_n;
        if (want > 64)
            want = 64;
        if (want > max - made)
            want = max - made;
        if (g->limit) {
            uint64_t left = g->limit - __atomic_load_n(&g->generated, __ATOMIC_RELAXED);
            if (want > left)
                want = (uint32_t)left;
            if (want > qp->quota - qp->made)
                want = (uint32_t)(qp->quota - qp->made);
        }
        uint32_t got = nvsp_pool_pop_many(&np->pools[q->index], ids, want);
        if (!got)
            break;
        /* reserve sequence numbers (and, with a limit, the quota) for what we popped; queues
         * generate concurrently, so this is one compare-and-swap */
        uint64_t seq0;
        uint32_t take = gen_reserve(g, got, &seq0);
        for (uint32_t i = take; i < got; i++)
            nvsp_pool_push(&np->pools[q->index], ids[i]);
        got = take;
        if (!got)
            break;
        qp->made += got;
        for (uint32_t i = 0; i < got; i++) {
            if (i + 4 < got) {
                uint8_t *nx = n->recv_buf + (uint64_t)ids[i + 4] * n->sub_size;
                __builtin_prefetch(nx, 1, 3);
                __builtin_prefetch(nx + UVB_NVSP_RX_DATA_OFFSET, 1, 3);
            }
            struct flow *fl = &qp->flows[qp->flow_cursor];
            if (++qp->flow_cursor >= qp->nflows)
                qp->flow_cursor = 0;
            uint8_t *sub = n->recv_buf + (uint64_t)ids[i] * n->sub_size;
            int hashed = n->rss_enabled && n->rx_hash_ppi && fl->hash_type;
            nvsp_write_rx_header(n, sub, size, csum, 0, 0, hashed, fl->hash, fl->hash_type);
            uint8_t *f = sub + UVB_NVSP_RX_DATA_OFFSET;
            memcpy(f, fl->hdr, fl->hdr_len);
            uint64_t seq = seq0 + i;
            uint32_t pl = size - fl->hdr_len;
            memcpy(f + fl->hdr_len, qp->payload, pl);
            if (pl >= 8)
                memcpy(f + fl->hdr_len, &seq, 8);
            if (tcp) {
                uint8_t *ip = f + 14, *l4 = ip + 20;
                /* in-order segments of the flow (sequence numbers advance by the payload) */
                l4[4] = (uint8_t)(fl->seq >> 24); l4[5] = (uint8_t)(fl->seq >> 16);
                l4[6] = (uint8_t)(fl->seq >> 8); l4[7] = (uint8_t)fl->seq;
                fl->seq += pl;
                uint16_t c = nvsp_l4_csum(ip, 0, l4, size - 34, 6);
                l4[16] = (uint8_t)(c >> 8);
                l4[17] = (uint8_t)c;
            }
            np->state[ids[i]] = ST_BATCH;
            qp->batch[qp->batch_n++] = ids[i];
        }
        made += got;
        q->rx_frames += got;
        q->rx_bytes += (uint64_t)got * size;
        q->gen_frames += got;
    }
    return made;
}

/* ------------------------------------------------------------------------ */
/* external frames                                                           */

int uvb_nvsp_inject(struct uvb_nvsp *n, const uint8_t *frame, uint32_t len, uint32_t flags,
                    uint32_t vlan_tci)
{
    struct nic_priv *np = NP(n);
    if (!np || len < 14 || len > UVB_NVSP_MAX_FRAME)
        return UVB_EINVAL;
    if (!rx_open(n))
        return UVB_EAGAIN;
    uint32_t k = uvb_nvsp_frame_queue(n, frame, len);
    spin_lock(&np->qlock);
    struct uvb_nvsp_queue *t = np->queues[k];
    int ok = t && t->priv && nvsp_inbox_push(QP(t), frame, len, flags, vlan_tci) == 0;
    spin_unlock(&np->qlock);
    if (!ok) {
        if (t)
            t->inbox_drops++;
        return UVB_EAGAIN;
    }
    return (int)k;
}

int uvb_nvsp_fd_rx(struct uvb_nvsp *n, int fd, uint32_t max, uint64_t *mask)
{
    uint8_t buf[UVB_NVSP_MAX_FRAME];
    uint32_t got = 0;
    while (got < max) {
        ssize_t r = read(fd, buf, sizeof buf);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            return got ? (int)got : -errno;
        }
        if (r == 0)
            break;
        got++;
        const uint8_t *f = buf;
        uint32_t len = (uint32_t)r;
        uint32_t flags = 0, tci = 0;
        if (len >= 18 && buf[12] == 0x81 && buf[13] == 0x00) {
            /* strip the 802.1Q tag: the guest gets it as a VLAN PPI (§4.4) */
            tci = be16(buf + 14);
            memmove(buf + 4, buf, 12);
            f = buf + 4;
            len -= 4;
            flags |= UVB_NVSP_META_VLAN;
        }
        int k = uvb_nvsp_inject(n, f, len, flags, tci);
        if (k >= 0 && mask)
            *mask |= 1ull << k;
    }
    return (int)got;
}
