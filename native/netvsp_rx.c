/*
 * Simulated NetVSP data plane — per-queue inbox and RX: frames into receive sub-allocations, XFER_PAGES batches.
 * Host side only (uvmbus sim); see netvsp.h and netvsp_priv.h.
 *
 * Written from ../shared/reference/netvsc.md §5–§7 and §10; everything read from guest
 * memory (TX ring packets are already private copies; send-buffer sections and GPA pages
 * are not) is copied into locals before it is checked.
 */
#define _GNU_SOURCE
#include "netvsp_priv.h"

/* ------------------------------------------------------------------------ */
/* inbox                                                                     */

struct ib_rec {
    uint32_t len;               /* 0xFFFFFFFF: padding to the end of the buffer */
    uint16_t flags;
    uint16_t tci;
};

int nvsp_inbox_push(struct queue_priv *qp, const uint8_t *f, uint32_t len, uint32_t flags,
                      uint32_t tci)
{
    uint32_t need = 8u + ((len + 7u) & ~7u);
    spin_lock(&qp->ib_lock);
    uint64_t head = __atomic_load_n(&qp->ib_head, __ATOMIC_ACQUIRE);
    uint64_t tail = qp->ib_tail;
    uint32_t pos = (uint32_t)(tail % INBOX_BYTES);
    uint32_t pad = 0;
    if (pos + need > INBOX_BYTES)
        pad = INBOX_BYTES - pos;
    if (tail - head + pad + need > INBOX_BYTES) {
        spin_unlock(&qp->ib_lock);
        return -1;
    }
    if (pad) {
        struct ib_rec r = {0xFFFFFFFFu, 0, 0};
        memcpy(qp->ib + pos, &r, 8);
        tail += pad;
        pos = 0;
    }
    struct ib_rec r = {len, (uint16_t)flags, (uint16_t)tci};
    memcpy(qp->ib + pos, &r, 8);
    memcpy(qp->ib + pos + 8, f, len);
    __atomic_store_n(&qp->ib_tail, tail + need, __ATOMIC_RELEASE);
    spin_unlock(&qp->ib_lock);
    return 0;
}


/* Peek the next inbox record (consumer only).  NULL when empty. */
static const struct ib_rec *inbox_peek(struct queue_priv *qp)
{
    for (;;) {
        uint64_t tail = __atomic_load_n(&qp->ib_tail, __ATOMIC_ACQUIRE);
        if (tail == qp->ib_head)
            return NULL;
        uint32_t pos = (uint32_t)(qp->ib_head % INBOX_BYTES);
        const struct ib_rec *r = (const struct ib_rec *)(qp->ib + pos);
        if (r->len == 0xFFFFFFFFu) {
            __atomic_store_n(&qp->ib_head, qp->ib_head + (INBOX_BYTES - pos), __ATOMIC_RELEASE);
            continue;
        }
        return r;
    }
}

static void inbox_pop(struct queue_priv *qp, const struct ib_rec *r)
{
    uint32_t need = 8u + ((r->len + 7u) & ~7u);
    __atomic_store_n(&qp->ib_head, qp->ib_head + need, __ATOMIC_RELEASE);
}

/* ------------------------------------------------------------------------ */
/* RX: writing frames into sub-allocations                                   */


static void put_ppi(uint8_t *p, uint32_t type, uint32_t value)
{
    struct rndis_ppi_u32 e = {RNDIS_PPI_SIZE_U32, type, RNDIS_PPI_HDR_SIZE, value};
    memcpy(p, &e, sizeof e);
}

/* Write the RNDIS PACKET header + PPIs of a received frame at `sub` (§6 layout).  The frame
 * itself is at sub + 256.  Returns nothing: the caller checked the size. */
void nvsp_write_rx_header(const struct uvb_nvsp *n, uint8_t *sub, uint32_t len, uint32_t csum,
                            int vlan, uint32_t tci, int hashed, uint32_t hash, uint32_t htype)
{
    uint32_t nppi = 1;
    uint8_t *ppi = sub + RNDIS_PACKET_SIZE;
    put_ppi(ppi, PPI_TCPIP_CHKSUM, csum);
    if (vlan) {
        uint32_t v = ((tci >> 13) & 7u) | (((tci >> 12) & 1u) << 3) | ((tci & 0xfffu) << VLAN_PPI_VID_SHIFT);
        put_ppi(ppi + 16 * nppi++, PPI_IEEE_8021Q, v);
    }
    if (hashed) {
        put_ppi(ppi + 16 * nppi++, PPI_HASH_VALUE, hash);
        put_ppi(ppi + 16 * nppi++, PPI_HASH_INFO, htype | NDIS_HASH_FUNC_TOEPLITZ);
    }
    struct rndis_packet h = {
        .msg_type = RNDIS_MSG_PACKET,
        .msg_len = n->sub_size,
        .data_offset = UVB_NVSP_RX_DATA_OFFSET - RNDIS_HEADER_SIZE,
        .data_len = len,
        .per_pkt_info_offset = RNDIS_PPI_OFFSET_DEFAULT,
        .per_pkt_info_len = 16u * nppi,
    };
    memcpy(sub, &h, sizeof h);
}

/* Apply the injected malformation (if armed) to an XFER_PAGES packet being built. */
void nvsp_apply_fault(struct uvb_nvsp *n, struct vmtransfer_page_range *rg, uint32_t nr,
                        uint8_t *nvsp, uint16_t *pageset)
{
    uint32_t c = __atomic_load_n(&n->fault_count, __ATOMIC_RELAXED);
    if (!c || !n->fault_kind || !nr)
        return;
    if (!__atomic_compare_exchange_n(&n->fault_count, &c, c - 1, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        return;
    n->faults_injected++;
    uint8_t *sub = n->recv_buf + rg[0].byte_offset;
    switch (n->fault_kind) {
    case UVB_NVSP_FAULT_BAD_RANGE:
        rg[0].byte_offset = (uint32_t)(n->recv_size - 8u);
        break;
    case UVB_NVSP_FAULT_BAD_RNDIS_LEN:
        wr32(sub + 4, rg[0].byte_count + 64u);
        break;
    case UVB_NVSP_FAULT_BAD_NVSP_TYPE:
        wr32(nvsp, 0x7777u);
        break;
    case UVB_NVSP_FAULT_BAD_PAGESET:
        *pageset ^= 0x1111u;
        break;
    case UVB_NVSP_FAULT_BAD_DATA_OFFSET:
        if (rd32(sub) == RNDIS_MSG_PACKET)
            wr32(sub + 8, rg[0].byte_count);
        break;
    case UVB_NVSP_FAULT_BAD_PPI:
        if (rd32(sub) == RNDIS_MSG_PACKET)
            wr32(sub + RNDIS_PACKET_SIZE, 0);
        break;
    default:
        break;
    }
}

/* Send the pending batch as one XFER_PAGES packet.  0 sent (or nothing to send),
 * UVB_EAGAIN ring full (batch kept), < 0 error. */
int nvsp_flush_batch(struct uvb_nvsp_queue *q)
{
    struct queue_priv *qp = QP(q);
    struct uvb_nvsp *n = q->nic;
    struct nic_priv *np = NP(n);
    uint32_t k = qp->batch_n;
    if (!k)
        return 0;
    for (uint32_t i = 0; i < k; i++) {
        qp->ranges[i].byte_count = n->sub_size;
        qp->ranges[i].byte_offset = qp->batch[i] * n->sub_size;
    }
    uint8_t nvsp[40] = {0};
    struct nvsp_send_rndis_pkt m = {NVSP_MSG1_TYPE_SEND_RNDIS_PKT, NVSP_CHANNEL_TYPE_DATA,
                                    NVSP_SECTION_INDEX_NONE, 0};
    memcpy(nvsp, &m, sizeof m);
    uint16_t pageset = (uint16_t)n->recv_buf_id;
    nvsp_apply_fault(n, qp->ranges, k, nvsp, &pageset);
    int rc = uvb_out_xfer_pages(q->out, VMBUS_PKT_FLAG_COMPLETION_REQUESTED, qp->batch[0], pageset, 0,
                                qp->ranges, k, nvsp, n->msg_size ? n->msg_size : 40u);
    if (rc == UVB_EAGAIN) {
        q->rx_ring_full++;
        return UVB_EAGAIN;
    }
    if (rc < 0)
        return rc;
    for (uint32_t i = 0; i < k; i++) {
        uint32_t id = qp->batch[i];
        np->next[id] = i + 1 < k ? qp->batch[i + 1] : END_ID;
        __atomic_store_n(&np->state[id], (uint8_t)(i ? ST_MEMBER : ST_HEAD), __ATOMIC_RELEASE);
    }
    qp->batch_n = 0;
    q->rx_xfer++;
    return 0;
}

/* Put ids of a batch that can never be sent back into their pools. */
void nvsp_release_batch(struct uvb_nvsp_queue *q)
{
    struct queue_priv *qp = QP(q);
    struct nic_priv *np = NP(q->nic);
    for (uint32_t i = 0; i < qp->batch_n; i++) {
        uint32_t id = qp->batch[i];
        if (id < q->nic->sub_count) {
            np->state[id] = ST_FREE;
            nvsp_pool_push(nvsp_pool_of(np, id), id);
        }
    }
    qp->batch_n = 0;
}

/* Deliver one frame into this queue: 1 delivered, 0 dropped (counted), -1 no free
 * sub-allocation, -2 batch full and the ring full (caller decides). */
int nvsp_deliver(struct uvb_nvsp_queue *q, const uint8_t *f, uint32_t len, uint32_t flags,
                 uint32_t tci)
{
    struct uvb_nvsp *n = q->nic;
    struct queue_priv *qp = QP(q);
    if (!rx_open(n)) {
        q->rx_filtered++;
        return 0;
    }
    if (len < 14 || len > n->mtu) {
        q->rx_oversize++;
        return 0;
    }
    if (n->vf_steer == UVB_NVSP_VF_ALL || (n->vf_steer == UVB_NVSP_VF_UNICAST && !(f[0] & 1))) {
        q->rx_to_vf++;          /* the VF's, not this queue's (docs/simulator.md, VF) */
        return 0;
    }
    uint32_t maxr = n->max_ranges;
    if (qp->batch_n >= maxr) {
        int rc = nvsp_flush_batch(q);
        if (rc)
            return -2;
    }
    uint32_t id;
    if (nvsp_pool_pop_many(&NP(n)->pools[q->index], &id, 1) == 0)
        return -1;
    uint8_t *sub = n->recv_buf + (uint64_t)id * n->sub_size;
    uint32_t htype = 0, hash = 0;
    int hashed = 0;
    if (n->rss_enabled && n->rx_hash_ppi) {
        hash = uvb_nvsp_frame_hash(n, f, len, &htype);
        hashed = htype != 0;
    }
    uint32_t csum = nvsp_rx_csum_info(f, len, (flags & UVB_NVSP_META_CSUM_OK) || !n->rx_verify_csum);
    nvsp_write_rx_header(n, sub, len, csum, (flags & UVB_NVSP_META_VLAN) != 0, tci, hashed, hash, htype);
    memcpy(sub + UVB_NVSP_RX_DATA_OFFSET, f, len);
    NP(n)->state[id] = ST_BATCH;
    qp->batch[qp->batch_n++] = id;
    q->rx_frames++;
    q->rx_bytes += len;
    return 1;
}

/* Move inbox frames into the RX ring.  Returns frames moved; *blocked = 1 when frames
 * remain that could not be placed (no sub-allocation or ring full). */
uint32_t nvsp_drain_inbox(struct uvb_nvsp_queue *q, int *blocked)
{
    struct queue_priv *qp = QP(q);
    uint32_t moved = 0;
    const struct ib_rec *r;
    int rsc = nvsp_rsc_on(q->nic);
    while ((r = inbox_peek(qp)) != NULL) {
        int rc = 0;
        if (rsc && rx_open(q->nic)) {
            /* RSC (netvsp_rsc.c): consecutive segments of a connection join an open unit */
            rc = nvsp_rsc_offer(q, (const uint8_t *)(r + 1), r->len, r->flags, r->tci);
            if (rc < 0) {
                *blocked = rc == -2 ? 2 : 1;
                break;
            }
        }
        if (!rc)
            rc = nvsp_deliver(q, (const uint8_t *)(r + 1), r->len, r->flags, r->tci);
        if (rc < 0) {
            /* no sub-allocation (-1: the guest's acks will free some) or ring full (-2):
             * the frames wait in the inbox */
            *blocked = rc == -2 ? 2 : 1;
            break;
        }
        inbox_pop(qp, r);
        moved += (uint32_t)rc;
    }
    return moved;
}

/* Route one frame from the backend to its RSS queue. */
void nvsp_route_frame(struct uvb_nvsp_queue *q, const uint8_t *f, uint32_t len, uint32_t flags,
                        uint32_t tci)
{
    struct uvb_nvsp *n = q->nic;
    struct nic_priv *np = NP(n);
    uint32_t k = uvb_nvsp_frame_queue(n, f, len);
    if (k == q->index) {
        /* with RSC the frame waits in the inbox: the pass's frames are coalesced together */
        if (!nvsp_rsc_on(n) && inbox_empty(QP(q)) && nvsp_deliver(q, f, len, flags, tci) >= 0)
            return;
        if (nvsp_inbox_push(QP(q), f, len, flags, tci))
            q->inbox_drops++;
        return;
    }
    spin_lock(&np->qlock);
    struct uvb_nvsp_queue *t = np->queues[k];
    int ok = t && t->priv && nvsp_inbox_push(QP(t), f, len, flags, tci) == 0;
    spin_unlock(&np->qlock);
    if (!ok)
        q->inbox_drops++;
    else
        q->poke_mask |= 1ull << k;
}
