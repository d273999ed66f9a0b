/*
 * Simulated NetVSP data plane — RSC (receive segment coalescing, NVSP 6.1 / NDIS 6.30).
 * Host side only (uvmbus sim); see netvsp.h and netvsp_priv.h.
 *
 * Once the guest enabled RSC (model: OID_TCP_OFFLOAD_PARAMETERS rsc_ip_v4 / rsc_ip_v6 after
 * declaring NVSP_NDIS_CAP_RSC at NVSP 6.1), consecutive in-order TCP segments of one
 * connection that reach a queue during one pump pass are joined into one "single coalesced
 * unit" (SCU).  Rules, from the NDIS RSC pages (learn.microsoft.com "Exception conditions
 * that terminate coalescing", "Rules for coalescing TCP/IP segments", "Indicating coalesced
 * segments", "Updating the IP headers for coalesced segments"):
 *   - only TCP over IPv4 without options and unfragmented, or IPv6 without extension headers;
 *   - no TCP flag but ACK and PSH (SYN/FIN/RST/URG/ECE/CWR end coalescing), no ECN codepoint,
 *     no TCP option but the timestamp, a payload (pure ACKs are not coalesced), a checksum
 *     that verifies;
 *   - the next segment continues the unit: same addresses, ports, Ethernet header and VLAN,
 *     SEQ == the unit's next sequence number, same ACK number, same timestamp-option use;
 *   - an SCU is at most one IP datagram (65535 bytes) and, with rsc_max_segs, that many
 *     segments; a PSH segment is the last one of its unit;
 *   - the SCU looks like one segment received from the wire: IPv4 total length / IPv6
 *     payload length rewritten, IP ID of the first segment, TTL the minimum, IPv4 header and
 *     TCP checksums recomputed, ACK/window of the last segment, PSH if any segment had it;
 *     the checksum PPI says IP/TCP checksum succeeded.
 * A frame that cannot be coalesced first flushes the open unit of its connection (order
 * within a connection is kept).  Units never outlive the pump pass.
 *
 * On the wire (netvsc.md §6; L-c netvsc_receive, L-r rndis_filter_receive_data, O rndisprot.rs
 * PacketIdInfo): an SCU larger than one receive sub-allocation is sent as consecutive ranges
 * of ONE XFER_PAGES packet, each a complete RNDIS PACKET carrying its part of the frame and
 * the internal PPI RNDIS_PKTINFO_ID {ver 1, SUBALLOC | 1ST_FRAG / - / LAST_FRAG, packet id};
 * the checksum / VLAN / hash PPIs ride on the first fragment (what Linux reads,
 * rsc_add_data).  At most NVSP_RSC_MAX fragments; packets of up to 562 ranges.
 */
#define _GNU_SOURCE
#include "netvsp_priv.h"

struct rsc_unit {
    uint32_t len;               /* bytes in buf; 0: the unit is free */
    uint32_t segs;
    uint32_t next_seq;
    uint32_t ack;
    uint32_t l4;                /* TCP header offset */
    uint32_t hlen;              /* payload offset (headers of the first segment) */
    uint32_t age;               /* opening order (the oldest is flushed when all are busy) */
    uint16_t meta;              /* UVB_NVSP_META_* of the first segment */
    uint16_t tci;
    uint8_t  v6, ts, closed, psh, ttl;
    uint8_t *buf;               /* UVB_NVSP_RSC_MAX_FRAME bytes */
};

struct seg {
    uint32_t l4, hlen, end, plen, seq, ack;
    uint8_t flags, v6, ts;
};

static inline uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline void put_be16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

int nvsp_rsc_on(const struct uvb_nvsp *n)
{
    return n->rsc_ip4 || n->rsc_ip6;
}

void nvsp_rsc_free(struct queue_priv *qp)
{
    if (!qp->rsc)
        return;
    for (uint32_t i = 0; i < UVB_NVSP_RSC_FLOWS; i++)
        free(qp->rsc[i].buf);
    free(qp->rsc);
    qp->rsc = NULL;
}

static int units(struct queue_priv *qp)
{
    if (qp->rsc)
        return 1;
    struct rsc_unit *u = calloc(UVB_NVSP_RSC_FLOWS, sizeof *u);
    if (!u)
        return 0;
    for (uint32_t i = 0; i < UVB_NVSP_RSC_FLOWS; i++) {
        u[i].buf = malloc(UVB_NVSP_RSC_MAX_FRAME);
        if (!u[i].buf) {
            for (uint32_t k = 0; k <= i; k++)
                free(u[k].buf);
            free(u);
            return 0;
        }
    }
    qp->rsc = u;
    return 1;
}

/* The TCP connection of a frame: 1 when it is TCP over IPv4/IPv6 (any header), with the L3
 * offset of its addresses and the TCP header offset. */
static int tcp_of(const uint8_t *f, uint32_t len, uint8_t *v6, uint32_t *l4)
{
    if (len < 14 + 40)
        return 0;
    uint16_t et = be16(f + 12);
    if (et == 0x0800 && f[14 + 9] == 6) {
        uint32_t ihl = (f[14] & 0xfu) * 4u;
        if ((f[14] >> 4) != 4 || ihl < 20 || len < 14 + ihl + 20)
            return 0;
        *v6 = 0;
        *l4 = 14 + ihl;
        return 1;
    }
    if (et == 0x86DD && len >= 14 + 40 + 20 && (f[14] >> 4) == 6 && f[14 + 6] == 6) {
        *v6 = 1;
        *l4 = 54;
        return 1;
    }
    return 0;
}

/* Same connection, Ethernet header and VLAN as the unit's first segment. */
static int same_flow(const struct rsc_unit *u, const uint8_t *f, uint8_t v6, uint32_t l4,
                     uint32_t meta, uint32_t tci)
{
    if (u->v6 != v6 || u->l4 != l4 || memcmp(u->buf, f, 14) != 0)
        return 0;
    if ((u->meta & UVB_NVSP_META_VLAN) != (meta & UVB_NVSP_META_VLAN) ||
        ((meta & UVB_NVSP_META_VLAN) && u->tci != (uint16_t)tci))
        return 0;
    const uint8_t *a = u->buf + 14, *b = f + 14;
    if (v6 ? memcmp(a + 8, b + 8, 32) != 0 : memcmp(a + 12, b + 12, 8) != 0)
        return 0;
    return memcmp(u->buf + l4, f + l4, 4) == 0;         /* ports */
}

/* A segment that may be coalesced (no exception condition). */
static int eligible(const struct uvb_nvsp *n, const uint8_t *f, uint32_t len, uint32_t meta,
                    struct seg *s)
{
    if (!tcp_of(f, len, &s->v6, &s->l4))
        return 0;
    const uint8_t *ip = f + 14;
    if (!s->v6) {
        if (!n->rsc_ip4 || ip[0] != 0x45 || (ip[1] & 3u))       /* IPv4 options, ECN */
            return 0;
        uint32_t tot = be16(ip + 2);
        if (tot < 40 || 14u + tot > len || (be16(ip + 6) & 0x3fffu))   /* a fragment */
            return 0;
        s->end = 14 + tot;
    } else {
        if (!n->rsc_ip6 || ((((uint32_t)ip[0] << 8 | ip[1]) >> 4) & 3u))  /* ECN */
            return 0;
        uint32_t pl = be16(ip + 4);
        if (pl < 20 || 54u + pl > len)
            return 0;
        s->end = 54 + pl;
    }
    const uint8_t *t = f + s->l4;
    uint32_t doff = (t[12] >> 4) * 4u;
    if (doff < 20 || s->l4 + doff > s->end)
        return 0;
    s->flags = t[13];
    if ((s->flags & ~0x18u) || !(s->flags & 0x10u))           /* only ACK, PSH; ACK set */
        return 0;
    if (doff == 32 && t[20] == 1 && t[21] == 1 && t[22] == 8 && t[23] == 10)
        s->ts = 1;                                            /* NOP NOP timestamp */
    else if (doff == 20)
        s->ts = 0;
    else
        return 0;
    s->hlen = s->l4 + doff;
    s->plen = s->end - s->hlen;
    if (!s->plen)
        return 0;
    s->seq = be32(t + 4);
    s->ack = be32(t + 8);
    if (!(meta & UVB_NVSP_META_CSUM_OK) && n->rx_verify_csum) {
        uint32_t c = nvsp_rx_csum_info(f, s->end, 0);
        if (!(c & CSUM_RX_TCP_OK) || (!s->v6 && !(c & CSUM_RX_IP_OK)))
            return 0;
    }
    return 1;
}

static void put_ppi(uint8_t *p, uint32_t type, uint32_t value)
{
    struct rndis_ppi_u32 e = {RNDIS_PPI_SIZE_U32, type, RNDIS_PPI_HDR_SIZE, value};
    memcpy(p, &e, sizeof e);
}

/* Room for a frame of `len` bytes in fragments: ids popped into ids[], *nfrag set.
 * 0 ok; 1 the frame can never be sent (counted, dropped); -1 no sub-allocation; -2 ring full. */
static int rsc_reserve(struct uvb_nvsp_queue *q, uint32_t len, uint32_t *ids, uint32_t *nfrag)
{
    struct uvb_nvsp *n = q->nic;
    struct queue_priv *qp = QP(q);
    uint32_t room = n->sub_size - UVB_NVSP_RX_DATA_OFFSET;
    uint32_t k = (len + room - 1) / room;
    if (len < 14 || len > UVB_NVSP_RSC_MAX_FRAME || k > NVSP_RSC_MAX || k > n->max_ranges) {
        q->rx_oversize++;
        return 1;
    }
    if (qp->batch_n + k > n->max_ranges && nvsp_flush_batch(q))
        return -2;
    uint32_t got = nvsp_pool_pop_many(&NP(n)->pools[q->index], ids, k);
    if (got < k) {
        while (got)
            nvsp_pool_push(&NP(n)->pools[q->index], ids[--got]);
        return -1;
    }
    *nfrag = k;
    return 0;
}

/* RNDIS headers + PPIs of the fragments of a `len`-byte frame; the sub-allocations join the
 * batch.  The frame's bytes are written by the caller (at sub + 256, `room` per fragment). */
static void rsc_headers(struct uvb_nvsp_queue *q, const uint32_t *ids, uint32_t nfrag, uint32_t len,
                        uint32_t csum, int vlan, uint32_t tci, int hashed, uint32_t hash, uint32_t htype,
                        uint32_t segs)
{
    struct uvb_nvsp *n = q->nic;
    struct queue_priv *qp = QP(q);
    struct nic_priv *np = NP(n);
    uint32_t room = n->sub_size - UVB_NVSP_RX_DATA_OFFSET;
    uint16_t pid = qp->rsc_pkt_id++;
    for (uint32_t i = 0, off = 0; i < nfrag; i++, off += room) {
        uint32_t chunk = len - off < room ? len - off : room;
        uint8_t *sub = n->recv_buf + (uint64_t)ids[i] * n->sub_size;
        uint8_t *ppi = sub + RNDIS_PACKET_SIZE;
        uint32_t np_ = 0;
        if (i == 0) {
            put_ppi(ppi + 16 * np_++, PPI_TCPIP_CHKSUM, csum);
            if (vlan) {
                uint32_t v = ((tci >> 13) & 7u) | (((tci >> 12) & 1u) << 3) |
                             ((tci & 0xfffu) << VLAN_PPI_VID_SHIFT);
                put_ppi(ppi + 16 * np_++, PPI_IEEE_8021Q, v);
            }
            if (hashed) {
                put_ppi(ppi + 16 * np_++, PPI_HASH_VALUE, hash);
                put_ppi(ppi + 16 * np_++, PPI_HASH_INFO, htype | NDIS_HASH_FUNC_TOEPLITZ);
            }
        }
        if (nfrag > 1) {
            struct rndis_pktinfo_id id = {RNDIS_PKTINFO_ID_V1, RNDIS_PKTINFO_SUBALLOC, pid};
            if (i == 0)
                id.flag |= RNDIS_PKTINFO_1ST_FRAG;
            if (i == nfrag - 1)
                id.flag |= RNDIS_PKTINFO_LAST_FRAG;
            uint32_t v;
            memcpy(&v, &id, 4);
            put_ppi(ppi + 16 * np_++, PPI_RNDIS_PKTINFO_ID, v);
        }
        struct rndis_packet h = {
            .msg_type = RNDIS_MSG_PACKET,
            .msg_len = n->sub_size,
            .data_offset = UVB_NVSP_RX_DATA_OFFSET - RNDIS_HEADER_SIZE,
            .data_len = chunk,
            .per_pkt_info_offset = RNDIS_PPI_OFFSET_DEFAULT,
            .per_pkt_info_len = 16u * np_,
        };
        memcpy(sub, &h, sizeof h);
        np->state[ids[i]] = ST_BATCH;
        qp->batch[qp->batch_n++] = ids[i];
    }
    q->rx_frames++;
    q->rx_bytes += len;
    if (segs >= 2) {
        q->rsc_units++;
        q->rsc_segments += segs;
        q->rsc_fragments += nfrag;
    }
}

int nvsp_rsc_write(struct uvb_nvsp_queue *q, const uint8_t *f, uint32_t len, uint32_t csum, int vlan,
                   uint32_t tci, uint32_t segs)
{
    struct uvb_nvsp *n = q->nic;
    uint32_t ids[NVSP_RSC_MAX], nfrag;
    int rc = rsc_reserve(q, len, ids, &nfrag);
    if (rc)
        return rc > 0 ? 0 : rc;
    uint32_t htype = 0, hash = 0;
    int hashed = 0;
    if (n->rss_enabled && n->rx_hash_ppi) {
        hash = uvb_nvsp_frame_hash(n, f, len, &htype);
        hashed = htype != 0;
    }
    rsc_headers(q, ids, nfrag, len, csum, vlan, tci, hashed, hash, htype, segs);
    uint32_t room = n->sub_size - UVB_NVSP_RX_DATA_OFFSET;
    for (uint32_t i = 0, off = 0; i < nfrag; i++, off += room) {
        uint32_t chunk = len - off < room ? len - off : room;
        memcpy(n->recv_buf + (uint64_t)ids[i] * n->sub_size + UVB_NVSP_RX_DATA_OFFSET, f + off, chunk);
    }
    return 1;
}

/* The generator's coalesced segment, written straight into its fragments (no staging copy):
 * `hdr` (hdr_len bytes: Ethernet + IPv4 + TCP, lengths and checksums filled here), then `k`
 * payloads of `pl` bytes, each `payload` with its 8-byte stream number seq0 + i in front.
 * 1 written, 0 dropped, < 0 no room (nothing taken). */
int nvsp_rsc_write_gen(struct uvb_nvsp_queue *q, const uint8_t *hdr, uint32_t hdr_len, uint32_t tcp_seq,
                       const uint8_t *payload, uint32_t pl, uint32_t k, uint64_t seq0, int hashed,
                       uint32_t hash, uint32_t htype)
{
    struct uvb_nvsp *n = q->nic;
    uint32_t len = hdr_len + k * pl;
    uint32_t ids[NVSP_RSC_MAX], nfrag;
    int rc = rsc_reserve(q, len, ids, &nfrag);
    if (rc)
        return rc > 0 ? 0 : rc;
    uint32_t room = n->sub_size - UVB_NVSP_RX_DATA_OFFSET;
    rsc_headers(q, ids, nfrag, len, CSUM_RX_IP_OK | CSUM_RX_TCP_OK, 0, 0, hashed, hash, htype, k);
    uint8_t *base[NVSP_RSC_MAX];
    for (uint32_t i = 0; i < nfrag; i++)
        base[i] = n->recv_buf + (uint64_t)ids[i] * n->sub_size + UVB_NVSP_RX_DATA_OFFSET;
    /* frame bytes [off, off + cnt) from src, across fragment boundaries */
#define PUT(off_, src_, cnt_)                                                       \
    do {                                                                            \
        uint32_t o_ = (off_), c_ = (cnt_);                                          \
        const uint8_t *s_ = (src_);                                                 \
        while (c_) {                                                                \
            uint32_t fi_ = o_ / room, at_ = o_ % room;                              \
            uint32_t m_ = room - at_ < c_ ? room - at_ : c_;                        \
            memcpy(base[fi_] + at_, s_, m_);                                        \
            o_ += m_;                                                               \
            s_ += m_;                                                               \
            c_ -= m_;                                                               \
        }                                                                           \
    } while (0)
    uint8_t h[64];
    memcpy(h, hdr, hdr_len);
    uint8_t *ip = h + 14, *l4 = ip + 20;
    uint32_t tot = len - 14;
    put_be16(ip + 2, tot);
    ip[10] = ip[11] = 0;
    put_be16(ip + 10, nvsp_csum_fold(nvsp_csum_add(0, ip, 20)));
    l4[4] = (uint8_t)(tcp_seq >> 24);
    l4[5] = (uint8_t)(tcp_seq >> 16);
    l4[6] = (uint8_t)(tcp_seq >> 8);
    l4[7] = (uint8_t)tcp_seq;
    l4[16] = l4[17] = 0;
    for (uint32_t i = 0; i < k; i++) {
        uint64_t seq = seq0 + i;
        uint32_t at = hdr_len + i * pl;
        PUT(at, payload, pl);
        if (pl >= 8)
            PUT(at, (const uint8_t *)&seq, 8);
    }
#undef PUT
    /* TCP checksum: pseudo header, the TCP header, then the payload as it lies in the
     * fragments (a fragment may end on an odd byte: the sum goes on with the next) */
    uint32_t sum = nvsp_csum_add(0, ip + 12, 8) + 6u + (tot - 20u);
    sum = nvsp_csum_add(sum, l4, hdr_len - 34);
    uint32_t odd = 0, carry = 0;
    for (uint32_t i = 0, off = 0; i < nfrag; i++, off += room) {
        uint32_t chunk = len - off < room ? len - off : room;
        const uint8_t *p = base[i];
        uint32_t c = chunk;
        if (off < hdr_len) {            /* the header was summed above */
            uint32_t skip = hdr_len - off < c ? hdr_len - off : c;
            p += skip;
            c -= skip;
        }
        if (odd && c) {
            sum += (uint32_t)(carry << 8 | p[0]);
            p++;
            c--;
            odd = 0;
        }
        sum = nvsp_csum_add(sum, p, c & ~1u);
        if (c & 1u) {
            carry = p[c - 1];
            odd = 1;
        }
        while (sum >> 28)
            sum = (sum & 0xffffu) + (sum >> 16);
    }
    if (odd)
        sum += carry << 8;
    put_be16(l4 + 16, nvsp_csum_fold(sum));
    memcpy(base[0], h, hdr_len);        /* fragment 0 holds the whole header (room >= 1550) */
    return 1;
}

/* Send a unit: its one segment as it came, or the SCU.  >= 0 done (unit free), < 0 blocked. */
static int flush_unit(struct uvb_nvsp_queue *q, struct rsc_unit *u)
{
    int rc;
    if (u->segs == 1) {
        rc = nvsp_deliver(q, u->buf, u->len, u->meta, u->tci);
    } else {
        uint8_t *f = u->buf, *ip = f + 14, *t = f + u->l4;
        if (!u->v6) {
            put_be16(ip + 2, u->len - 14);
            ip[8] = u->ttl;
            ip[10] = ip[11] = 0;
            put_be16(ip + 10, nvsp_csum_fold(nvsp_csum_add(0, ip, 20)));
        } else {
            put_be16(ip + 4, u->len - 54);
            ip[7] = u->ttl;
        }
        if (u->psh)
            t[13] |= 0x08;
        t[16] = t[17] = 0;
        put_be16(t + 16, nvsp_l4_csum(ip, u->v6, t, u->len - u->l4, 6));
        uint32_t csum = CSUM_RX_TCP_OK | (u->v6 ? 0u : CSUM_RX_IP_OK);
        rc = nvsp_rsc_write(q, f, u->len, csum, (u->meta & UVB_NVSP_META_VLAN) != 0, u->tci, u->segs);
    }
    if (rc >= 0)
        u->len = 0;
    return rc;
}

int nvsp_rsc_flush_all(struct uvb_nvsp_queue *q)
{
    struct queue_priv *qp = QP(q);
    if (!qp->rsc)
        return 0;
    for (;;) {
        struct rsc_unit *old = NULL;
        for (uint32_t i = 0; i < UVB_NVSP_RSC_FLOWS; i++)
            if (qp->rsc[i].len && (!old || qp->rsc[i].age < old->age))
                old = &qp->rsc[i];
        if (!old)
            return 0;
        int rc = flush_unit(q, old);
        if (rc < 0)
            return rc;
    }
}

/* Offer a frame from the backend.  1: taken into a unit; 0: not coalescible, deliver it as
 * usual (the open unit of its connection, if any, was sent first); < 0: blocked (no
 * sub-allocation / ring full): nothing taken, retry later. */
int nvsp_rsc_offer(struct uvb_nvsp_queue *q, const uint8_t *f, uint32_t len, uint32_t flags, uint32_t tci)
{
    struct uvb_nvsp *n = q->nic;
    struct queue_priv *qp = QP(q);
    uint8_t v6;
    uint32_t l4;
    if (!tcp_of(f, len, &v6, &l4) || !units(qp))
        return 0;
    struct seg s = {0};
    int ok = eligible(n, f, len, flags, &s);
    struct rsc_unit *u = NULL;
    uint32_t newest = 0;
    for (uint32_t i = 0; i < UVB_NVSP_RSC_FLOWS; i++) {
        struct rsc_unit *c = &qp->rsc[i];
        if (c->len && c->age >= newest)
            newest = c->age + 1;
        if (c->len && same_flow(c, f, v6, l4, flags, tci))
            u = c;
    }
    if (u) {
        uint32_t nseg = u->segs + 1;
        if (ok && !u->closed && s.seq == u->next_seq && s.ack == u->ack && s.ts == u->ts &&
            s.hlen - s.l4 == u->hlen - u->l4 && u->len + s.plen - 14 <= 65535u &&
            (!n->rsc_max_segs || nseg <= n->rsc_max_segs)) {
            memcpy(u->buf + u->len, f + s.hlen, s.plen);
            u->len += s.plen;
            u->segs = nseg;
            u->next_seq += s.plen;
            const uint8_t *ip = f + 14;
            uint8_t ttl = s.v6 ? ip[7] : ip[8];
            if (ttl < u->ttl)
                u->ttl = ttl;
            memcpy(u->buf + u->l4 + 14, f + s.l4 + 14, 2);    /* window of the last segment */
            if (s.flags & 0x08u) {
                u->psh = 1;
                u->closed = 1;
            }
            if (n->rsc_max_segs && nseg >= n->rsc_max_segs)
                u->closed = 1;
            if (u->closed)
                (void)flush_unit(q, u);         /* blocked: it stays, closed, until flushed */
            return 1;
        }
        int rc = flush_unit(q, u);
        if (rc < 0)
            return rc;
    }
    if (!ok || (s.flags & 0x08u))
        return 0;
    u = NULL;
    for (uint32_t i = 0; i < UVB_NVSP_RSC_FLOWS && !u; i++)
        if (!qp->rsc[i].len)
            u = &qp->rsc[i];
    if (!u) {
        struct rsc_unit *old = &qp->rsc[0];
        for (uint32_t i = 1; i < UVB_NVSP_RSC_FLOWS; i++)
            if (qp->rsc[i].age < old->age)
                old = &qp->rsc[i];
        int rc = flush_unit(q, old);
        if (rc < 0)
            return rc;
        u = old;
    }
    memcpy(u->buf, f, s.end);                   /* without Ethernet padding */
    u->len = s.end;
    u->segs = 1;
    u->next_seq = s.seq + s.plen;
    u->ack = s.ack;
    u->l4 = s.l4;
    u->hlen = s.hlen;
    u->age = newest;
    u->meta = (uint16_t)flags;
    u->tci = (uint16_t)tci;
    u->v6 = s.v6;
    u->ts = s.ts;
    u->closed = 0;
    u->psh = 0;
    u->ttl = s.v6 ? f[14 + 7] : f[14 + 8];
    return 1;
}
