/*
 * Simulated NetVSP data plane — large send offload: one LSOv2 packet from the guest becomes
 * the MSS-sized TCP segments the host's NIC would put on the wire.
 * Host side only (uvmbus sim); see netvsp.h and netvsp_priv.h.
 *
 * The request (netvsc.md §4.4, §5 "Offload PPIs on TX"; O `handle_rndis_packet_message`):
 * PPI type 2, bits 0-19 MSS, 20-29 TCP header offset from the frame start, bit 30 LSOv2,
 * bit 31 IPv6.  The host takes the IP header at 14 (its L2 header is always 14 bytes), the
 * TCP header at the PPI's offset and its length from the data-offset nibble; an offset
 * below 14 + 20 (IPv4) / 14 + 40 (IPv6), a data-offset byte outside the frame, or an MSS of
 * 0 is refused (the message completes with FAILURE).
 *
 * Segmentation (what a TSO engine does: RFC 9293 sequence numbers, RFC 791 / RFC 8200
 * lengths, RFC 1071 checksums; Microsoft's LSO rules and Linux `tcp_gso_segment` for the
 * flags): every segment carries the Ethernet, IP (with options) and TCP (with options)
 * headers of the large packet and the next MSS bytes of payload (the last one the rest);
 * IPv4 total length / IPv6 payload length match the segment; IPv4 identification counts up
 * from the large packet's; sequence number = first + payload offset; FIN and PSH only on
 * the last segment, CWR only on the first; IPv4 header and TCP checksums computed from
 * scratch (whatever the guest left in them — Linux leaves a pseudo-header seed).
 */
#define _GNU_SOURCE
#include "netvsp_priv.h"

struct lso_req {
    uint32_t mss;
    uint32_t tcp;       /* TCP header offset */
    uint32_t hdr;       /* bytes of headers copied into every segment */
    uint32_t payload;   /* payload bytes after the headers */
    uint32_t v6;
};

/* Check a large send; 0 or UVB_EINVAL. */
static int lso_parse(const uint8_t *f, uint32_t len, uint32_t ppi, struct lso_req *r)
{
    r->mss = ppi & LSO_V2_MSS_MASK;
    r->tcp = (ppi & LSO_V2_TCP_OFFSET_MASK) >> LSO_V2_TCP_OFFSET_SHIFT;
    r->v6 = (ppi & LSO_V2_IPV6) != 0;
    if (r->mss == 0 || len < 14)
        return UVB_EINVAL;
    if (r->tcp < 14u + (r->v6 ? 40u : 20u) || r->tcp + 12u >= len)
        return UVB_EINVAL;
    uint32_t et = be16(f + 12);
    const uint8_t *ip = f + 14;
    if (r->v6) {
        if (et != 0x86DD || (ip[0] >> 4) != 6)
            return UVB_EINVAL;
    } else {
        uint32_t ihl = (ip[0] & 0xfu) * 4u;
        if (et != 0x0800 || (ip[0] >> 4) != 4 || ihl < 20 || 14 + ihl > r->tcp)
            return UVB_EINVAL;
    }
    uint32_t thl = (uint32_t)(f[r->tcp + 12] >> 4) * 4u;
    if (thl < 20 || r->tcp + thl > len)
        return UVB_EINVAL;
    r->hdr = r->tcp + thl;
    r->payload = len - r->hdr;
    return 0;
}

static inline void put16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

/* Segment k of a parsed large send into out (room for hdr + mss); returns its length. */
static uint32_t lso_build(const uint8_t *f, const struct lso_req *r, uint32_t k, uint32_t nsegs, uint8_t *out)
{
    uint32_t off = k * r->mss;
    uint32_t seg = r->payload - off < r->mss ? r->payload - off : r->mss;
    memcpy(out, f, r->hdr);
    memcpy(out + r->hdr, f + r->hdr + off, seg);
    uint8_t *ip = out + 14, *th = out + r->tcp;
    uint32_t l4len = r->hdr - r->tcp + seg;
    if (r->v6) {
        put16(ip + 4, r->hdr - 14 - 40 + seg);
    } else {
        uint32_t ihl = (ip[0] & 0xfu) * 4u;
        put16(ip + 2, r->hdr - 14 + seg);
        put16(ip + 4, (uint32_t)be16(f + 14 + 4) + k);
        ip[10] = ip[11] = 0;
        put16(ip + 10, nvsp_csum_fold(nvsp_csum_add(0, ip, ihl)));
    }
    uint32_t seq = (uint32_t)f[r->tcp + 4] << 24 | (uint32_t)f[r->tcp + 5] << 16 |
                   (uint32_t)f[r->tcp + 6] << 8 | f[r->tcp + 7];
    seq += off;
    th[4] = (uint8_t)(seq >> 24);
    th[5] = (uint8_t)(seq >> 16);
    th[6] = (uint8_t)(seq >> 8);
    th[7] = (uint8_t)seq;
    if (k + 1 < nsegs)
        th[13] &= (uint8_t)~0x09u;          /* FIN 0x01, PSH 0x08: last segment only */
    if (k > 0)
        th[13] &= (uint8_t)~0x80u;          /* CWR: first segment only */
    th[16] = th[17] = 0;
    put16(th + 16, nvsp_l4_csum(ip, (int)r->v6, th, l4len, 6));
    return r->hdr + seg;
}

static inline uint32_t lso_nsegs(const struct lso_req *r)
{
    return r->payload ? (r->payload + r->mss - 1) / r->mss : 1u;
}

int uvb_nvsp_lso_segment(const uint8_t *f, uint32_t len, uint32_t ppi, uint8_t *out, uint32_t cap,
                         uint32_t *seg_len, uint32_t max_segs)
{
    struct lso_req r;
    if (!f || lso_parse(f, len, ppi, &r))
        return UVB_EINVAL;
    uint32_t n = lso_nsegs(&r);
    if (n > max_segs || (uint64_t)n * r.hdr + r.payload > cap)
        return UVB_ENOBUFS;
    uint32_t pos = 0;
    for (uint32_t k = 0; k < n; k++) {
        seg_len[k] = lso_build(f, &r, k, n, out + pos);
        pos += seg_len[k];
    }
    return (int)n;
}

/* The data path: segment a large send from the guest and hand each segment to `emit`
 * (tx_frame).  Returns 0, or -1 when the host refuses the request (FAILURE). */
int nvsp_tx_lso(struct uvb_nvsp_queue *q, const uint8_t *f, uint32_t len, uint32_t ppi, int vlan,
                uint32_t tci, nvsp_emit_fn emit)
{
    struct uvb_nvsp *n = q->nic;
    struct queue_priv *qp = QP(q);
    int v6 = (ppi & LSO_V2_IPV6) != 0;
    if (!(v6 ? n->lso_v6 : n->lso_v4))
        q->tx_lso_not_enabled++;            /* an error the host counts (docs/simulator.md) */
    if (n->lso_max && len > n->lso_max)
        q->tx_lso_oversize++;               /* O: "not strictly enforced" */
    struct lso_req r;
    if (lso_parse(f, len, ppi, &r)) {
        q->tx_lso_invalid++;
        return -1;
    }
    uint32_t nsegs = lso_nsegs(&r);
    uint32_t first = r.payload < r.mss ? r.payload : r.mss;     /* the largest segment's payload */
    if (r.hdr + first > UVB_NVSP_MAX_FRAME) {
        q->tx_lso_invalid++;
        return -1;
    }
    q->tx_lso++;
    for (uint32_t k = 0; k < nsegs; k++) {
        uint32_t sl = lso_build(f, &r, k, nsegs, qp->seg);
        q->tx_lso_segments++;
        if (emit(q, qp->seg, sl, vlan, tci))
            return -1;
    }
    return 0;
}
