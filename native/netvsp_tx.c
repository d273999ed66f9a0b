/*
 * Simulated NetVSP data plane — packets from the guest: RX acks and SEND_RNDIS_PKT data (sections, GPA ranges).
 * Host side only (uvmbus sim); see netvsp.h and netvsp_priv.h.
 *
 * Written from ../shared/reference/netvsc.md §5–§7 and §10; everything read from guest
 * memory (TX ring packets are already private copies; send-buffer sections and GPA pages
 * are not) is copied into locals before it is checked.
 */
#define _GNU_SOURCE
#include "netvsp_priv.h"

/* ------------------------------------------------------------------------ */
/* TX: packets from the guest                                                */

/* Guest ack of an XFER_PAGES packet: return its sub-allocations.  0 or SLOWPATH (fatal). */
static int handle_ack(struct uvb_nvsp_queue *q, uint64_t tid)
{
    struct uvb_nvsp *n = q->nic;
    struct nic_priv *np = NP(n);
    if (!np || tid >= n->sub_count)
        return punt(q, 1, "RX ack (completion) with transaction id %llu: no such receive "
                    "sub-allocation (%u exist)", (unsigned long long)tid, n->sub_count);
    uint32_t id = (uint32_t)tid;
    uint8_t st = __atomic_load_n(&np->state[id], __ATOMIC_ACQUIRE);
    if (st != ST_HEAD)
        return punt(q, 1, "RX ack with transaction id %u: that sub-allocation is %s "
                    "(double ack, or an id the host never sent as a transaction)", id,
                    st == ST_FREE ? "free" : st == ST_MEMBER ? "inside another transfer" : "not sent yet");
    if (id < UVB_NVSP_CTRL_IDS && q->index != 0)
        return punt(q, 1, "RX ack of control buffer %u on sub-channel %u (control buffers are "
                    "acked on the primary channel)", id, q->index);
    struct pool *cur = NULL;
    uint32_t guard = 0;
    while (id != END_ID && guard++ <= n->sub_count) {
        uint32_t nx = np->next[id];
        np->state[id] = ST_FREE;
        struct pool *p = nvsp_pool_of(np, id);
        if (p != cur) {
            if (cur)
                spin_unlock(&cur->lock);
            cur = p;
            spin_lock(&cur->lock);
        }
        cur->ids[cur->n++] = id;
        id = nx;
    }
    if (cur)
        spin_unlock(&cur->lock);
    q->rx_acks++;
    return 0;
}

/* Hand one TX frame to the backend.  Returns 0, or -1 for an offload request the host
 * rejects (the message then completes with FAILURE).  `good`: the checksums are known
 * right (a segment the host built). */
static int tx_frame(struct uvb_nvsp_queue *q, const uint8_t *f, uint32_t len, uint32_t csum_info,
                    int has_csum, int vlan, uint32_t tci, int good)
{
    struct uvb_nvsp *n = q->nic;
    struct queue_priv *qp = QP(q);
    if (len < 14)
        return -1;
    if (len > n->mtu || len > UVB_NVSP_MAX_FRAME) {
        q->tx_dropped++;
        return 0;
    }
    q->tx_frames++;
    q->tx_bytes += len;
    uint32_t backend = n->backend;
    if (backend == UVB_NVSP_BACKEND_SINK || backend == UVB_NVSP_BACKEND_GENERATOR ||
        backend == UVB_NVSP_BACKEND_NONE) {
        if (has_csum && (csum_info & (CSUM_TX_TCP | CSUM_TX_UDP | CSUM_TX_IP_HDR))) {
            /* validate the request like a real host would, without copying */
            uint32_t off = (csum_info & CSUM_TX_TCP_HDR_OFFSET_MASK) >> CSUM_TX_TCP_HDR_OFFSET_SHIFT;
            int v4 = (csum_info & CSUM_TX_IS_IPV4) != 0;
            if ((csum_info & (CSUM_TX_TCP | CSUM_TX_UDP)) && (off < 14u + (v4 ? 20u : 40u) || off >= len))
                return -1;
        }
        q->sink_frames++;
        return 0;
    }
    uint32_t flags = good ? UVB_NVSP_META_CSUM_OK : 0u;
    const uint8_t *out = f;
    if (has_csum && (csum_info & (CSUM_TX_TCP | CSUM_TX_UDP | CSUM_TX_IP_HDR))) {
        memcpy(qp->frame, f, len);
        if (nvsp_tx_csum_offload(qp->frame, len, csum_info))
            return -1;
        out = qp->frame;
        flags |= UVB_NVSP_META_CSUM_OK;
    }
    if (backend == UVB_NVSP_BACKEND_LOOPBACK) {
        if (vlan)
            flags |= UVB_NVSP_META_VLAN;
        nvsp_route_frame(q, out, len, flags, tci);
        return 0;
    }
    if (backend == UVB_NVSP_BACKEND_FD && n->backend_fd >= 0) {
        const uint8_t *w = out;
        uint32_t wlen = len;
        if (vlan) {
            if (out != qp->frame)
                memcpy(qp->frame, f, len);
            memmove(qp->frame + 16, qp->frame + 12, len - 12);
            qp->frame[12] = 0x81;
            qp->frame[13] = 0x00;
            qp->frame[14] = (uint8_t)(tci >> 8);
            qp->frame[15] = (uint8_t)tci;
            w = qp->frame;
            wlen = len + 4;
        }
        ssize_t r;
        do {
            r = write(n->backend_fd, w, wlen);
        } while (r < 0 && errno == EINTR);
        if (r != (ssize_t)wlen)
            q->tx_dropped++;
    }
    return 0;
}

/* A segment of a large send (netvsp_lso.c): its checksums are right. */
static int emit_segment(struct uvb_nvsp_queue *q, const uint8_t *f, uint32_t len, int vlan, uint32_t tci)
{
    return tx_frame(q, f, len, 0, 0, vlan, tci, 1);
}

/* Walk the RNDIS messages of a TX stream.  Returns NVSP status (1 success, 2 failure). */
static uint32_t tx_stream(struct uvb_nvsp_queue *q, const uint8_t *s, uint32_t total,
                          uint32_t first_contig, uint32_t first_page_room)
{
    uint32_t off = 0;
    int first = 1;
    while (off + RNDIS_HEADER_SIZE <= total) {
        struct rndis_packet h;
        memset(&h, 0, sizeof h);
        memcpy(&h, s + off, total - off < sizeof h ? total - off : sizeof h);
        if (h.msg_type != RNDIS_MSG_PACKET)
            return NVSP_STAT_FAIL;      /* a control message after a PACKET (§5) */
        if (h.msg_len < RNDIS_PACKET_SIZE || h.msg_len > total - off)
            return NVSP_STAT_FAIL;
        if (h.oob_data_offset || h.oob_data_len || h.num_oob_data_elements || h.vc_handle || !h.data_len)
            return NVSP_STAT_FAIL;
        uint64_t dend = 8ull + h.data_offset + h.data_len;
        if (h.data_offset < RNDIS_PPI_OFFSET_DEFAULT || dend > h.msg_len)
            return NVSP_STAT_FAIL;
        uint32_t csum = 0, tci = 0, lso = 0;
        int has_csum = 0, vlan = 0, has_lso = 0;
        if (h.per_pkt_info_len) {
            uint64_t pend = 8ull + h.per_pkt_info_offset + h.per_pkt_info_len;
            if (h.per_pkt_info_offset < RNDIS_PPI_OFFSET_DEFAULT || pend > h.msg_len ||
                (h.per_pkt_info_offset & 3u))
                return NVSP_STAT_FAIL;
            if (first && (pend > first_contig || pend > first_page_room))
                return NVSP_STAT_FAIL;  /* header + PPIs must lie in the first range/page (§5) */
            const uint8_t *p = s + off + 8 + h.per_pkt_info_offset;
            uint32_t left = h.per_pkt_info_len;
            while (left) {
                struct rndis_ppi e;
                if (left < sizeof e)
                    return NVSP_STAT_FAIL;
                memcpy(&e, p, sizeof e);
                if (e.size < sizeof e || e.size > left || e.ppi_offset < sizeof e || e.ppi_offset > e.size)
                    return NVSP_STAT_FAIL;
                uint32_t t = e.type & PPI_TYPE_MASK;
                int internal = (e.type & PPI_INTERNAL_FLAG) != 0;
                if (!internal && e.ppi_offset + 4 <= e.size) {
                    uint32_t v = rd32(p + e.ppi_offset);
                    if (t == PPI_TCPIP_CHKSUM) {
                        csum = v;
                        has_csum = 1;
                    } else if (t == PPI_IEEE_8021Q) {
                        vlan = 1;
                        tci = ((v & VLAN_PPI_PRIORITY_MASK) << 13) | (((v & VLAN_PPI_CFI) ? 1u : 0u) << 12) |
                              ((v & VLAN_PPI_VID_MASK) >> VLAN_PPI_VID_SHIFT);
                    } else if (t == PPI_TCP_LARGESEND) {
                        lso = v;
                        has_lso = 1;
                    }
                }
                p += e.size;
                left -= e.size;
            }
        } else if (first && (8ull + RNDIS_PPI_OFFSET_DEFAULT > first_contig ||
                             8ull + RNDIS_PPI_OFFSET_DEFAULT > first_page_room)) {
            return NVSP_STAT_FAIL;
        }
        const uint8_t *fr = s + off + 8 + h.data_offset;
        if (has_lso) {
            /* a large send: the host segments it (O takes the LSO PPI over a checksum PPI) */
            if (nvsp_tx_lso(q, fr, h.data_len, lso, vlan, tci, emit_segment))
                return NVSP_STAT_FAIL;
        } else if (tx_frame(q, fr, h.data_len, csum, has_csum, vlan, tci, 0)) {
            return NVSP_STAT_FAIL;
        }
        first = 0;
        off += h.msg_len;
    }
    return NVSP_STAT_SUCCESS;
}

/* A data packet (INBAND or GPA_DIRECT carrying NVSP 107).  Returns 0 with *status set,
 * SLOWPATH, or < 0. */
static int handle_data(struct uvb_nvsp_queue *q, const uint8_t *pkt, const struct uvb_pkt *info,
                       const uint8_t *payload, uint32_t *status)
{
    struct uvb_nvsp *n = q->nic;
    struct queue_priv *qp = QP(q);
    struct nvsp_send_rndis_pkt m;
    memcpy(&m, payload, sizeof m);
    if (!n->data_ready)
        return punt(q, 0, "RNDIS packet while the NIC is not ready");
    if (m.channel_type != NVSP_CHANNEL_TYPE_DATA)
        return punt(q, 0, "RNDIS control message");
    const uint8_t *sec = NULL;
    uint32_t sec_len = 0;
    if (m.send_buf_section_index != NVSP_SECTION_INDEX_NONE) {
        if (!n->send_buf || m.send_buf_section_index >= n->section_count)
            return punt(q, 1, "SEND_RNDIS_PKT with send-buffer section %u: only %u sections exist",
                        m.send_buf_section_index, n->section_count);
        if (m.send_buf_section_size == 0 || m.send_buf_section_size > n->section_size)
            return punt(q, 1, "SEND_RNDIS_PKT with section %u size %u: must be 1..%u (the section size)",
                        m.send_buf_section_index, m.send_buf_section_size, n->section_size);
        sec = n->send_buf + (uint64_t)m.send_buf_section_index * n->section_size;
        sec_len = m.send_buf_section_size;
    } else if (m.send_buf_section_size != 0) {
        return punt(q, 1, "SEND_RNDIS_PKT without a section (index 0xFFFFFFFF) but size %u",
                    m.send_buf_section_size);
    }
    q->tx_msgs++;
    if (info->type == VMBUS_PKT_INBAND) {
        if (!sec) {
            *status = NVSP_STAT_FAIL;   /* nothing to send */
            return 0;
        }
        /* the section is guest memory: work on a private copy */
        memcpy(qp->stream, sec, sec_len);
        struct rndis_msg_header h;
        memcpy(&h, qp->stream, sizeof h < sec_len ? sizeof h : sec_len);
        if (sec_len < sizeof h || h.msg_type != RNDIS_MSG_PACKET)
            return punt(q, 0, "RNDIS control message over the data channel");
        *status = tx_stream(q, qp->stream, sec_len, sec_len, ~0u);
        return 0;
    }
    /* GPA direct: section bytes first, then the ranges in order (§5 "mixed") */
    if (!n->guest_ram) {
        *status = NVSP_STAT_FAIL;
        return 0;
    }
    const uint8_t *ext = pkt + info->pkt_offset + DESC;
    uint32_t cnt = rd32(ext + 4);
    uint32_t off = 8, total = 0, first_contig = 0, first_room = ~0u;
    if (sec) {
        memcpy(qp->stream, sec, sec_len);
        total = sec_len;
        first_contig = sec_len;
    }
    for (uint32_t i = 0; i < cnt; i++) {
        struct vmgpa_range g;
        memcpy(&g, ext + off, 8);
        uint32_t np = (uint32_t)(((uint64_t)g.byte_offset + g.byte_count + HV_HYP_PAGE_SIZE - 1) / HV_HYP_PAGE_SIZE);
        const uint64_t *pfns = (const uint64_t *)(ext + off + 8);
        if ((uint64_t)total + g.byte_count > STREAM_BYTES) {
            *status = NVSP_STAT_FAIL;
            return 0;
        }
        uint32_t bad = 0;
        int rc = uvb_gpa_copy(n->guest_ram, n->ram_size, n->ram_base_pfn, pfns, np,
                              g.byte_offset, g.byte_count, qp->stream + total, UVB_GPA_FROM_RAM, &bad);
        if (rc) {
            *status = NVSP_STAT_FAIL;   /* a PFN outside guest RAM fails the request */
            return 0;
        }
        if (!sec && i == 0) {
            first_contig = g.byte_count;
            first_room = HV_HYP_PAGE_SIZE - g.byte_offset;
        }
        total += g.byte_count;
        off += 8 + 8 * np;
    }
    struct rndis_msg_header h;
    memcpy(&h, qp->stream, sizeof h);
    if (total < sizeof h || h.msg_type != RNDIS_MSG_PACKET)
        return punt(q, 0, "RNDIS control message (GPA direct)");
    *status = tx_stream(q, qp->stream, total, first_contig, first_room);
    return 0;
}

/* Classify and handle one TX packet. 0 = handled (completion owed when *comp), SLOWPATH. */
int nvsp_handle_packet(struct uvb_nvsp_queue *q, const uint8_t *buf, const struct uvb_pkt *p,
                         int *comp, uint32_t *status)
{
    const uint8_t *payload = buf + p->data_offset;
    *comp = 0;
    if (q->nic->dead)
        return punt(q, 0, "NIC is dead");
    if (p->type == VMBUS_PKT_COMP) {
        if (p->data_len < 8 || rd32(payload) != NVSP_MSG1_TYPE_SEND_RNDIS_PKT_COMPLETE)
            return punt(q, 0, "completion that is not an RX ack");
        return handle_ack(q, p->trans_id);
    }
    if (p->type != VMBUS_PKT_INBAND && p->type != VMBUS_PKT_GPA_DIRECT)
        return punt(q, 0, "packet type %u", p->type);
    if (p->data_len < sizeof(struct nvsp_send_rndis_pkt) ||
        rd32(payload) != NVSP_MSG1_TYPE_SEND_RNDIS_PKT)
        return punt(q, 0, "NVSP message that is not SEND_RNDIS_PKT");
    int rc = handle_data(q, buf, p, payload, status);
    if (rc)
        return rc;
    if (*status != NVSP_STAT_SUCCESS)
        q->tx_failed++;
    *comp = (p->flags & VMBUS_PKT_FLAG_COMPLETION_REQUESTED) != 0;
    return 0;
}

int uvb_nvsp_process(struct uvb_nvsp_queue *q, const uint8_t *pkt, const struct uvb_pkt *info)
{
    if (!q->priv || !NP(q->nic))
        return punt(q, 0, "not set up");
    q->punt_fatal = 0;
    struct uvb_pkt p = *info;
    p.data_offset = info->data_offset - info->pkt_offset;
    p.pkt_offset = 0;
    int comp;
    uint32_t status = NVSP_STAT_SUCCESS;
    int rc = nvsp_handle_packet(q, pkt, &p, &comp, &status);
    if (rc)
        return rc;
    return comp ? (int)(0x100u | status) : 0;
}
