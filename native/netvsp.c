/*
 * Simulated NetVSP data plane — the pump (host.h contract).
 * Host side only (uvmbus sim); see netvsp.h and netvsp_priv.h.
 *
 * Written from ../shared/reference/netvsc.md §5–§7 and §10; everything read from guest
 * memory (TX ring packets are already private copies; send-buffer sections and GPA pages
 * are not) is copied into locals before it is checked.
 */
#define _GNU_SOURCE
#include "netvsp_priv.h"

#include <sched.h>

/* ------------------------------------------------------------------------ */
/* pump                                                                      */

static int commit_all(struct uvb_nvsp_queue *q)
{
    int sig = 0;
    int rc = uvb_out_commit(q->out);
    if (rc < 0)
        return rc;
    sig |= rc;
    rc = uvb_in_commit(q->in);
    if (rc < 0)
        return rc;
    sig |= rc;
    if (sig && q->irq)
        uvb_host_interrupt(q->irq);
    return 0;
}

/* RX-side work: control posts, inbox, generator, flush.  Returns work done; *blocked set
 * when RX work is waiting for ring space. */
static uint32_t rx_work(struct uvb_nvsp_queue *q, int *blocked)
{
    struct uvb_nvsp *n = q->nic;
    uint32_t work = 0;
    int ring_full = 0, nobuf = 0;
    if (q->index == 0 && NP(n)->cq_head)
        work += nvsp_send_ctrl(q, &ring_full);
    if (!inbox_empty(QP(q))) {
        work += nvsp_drain_inbox(q, &nobuf);
        if (nobuf == 2)
            ring_full = 1;
    }
    if (n->backend == UVB_NVSP_BACKEND_GENERATOR && rx_open(n) && !ring_full)
        work += nvsp_generate(q, 1024, &ring_full);
    if (QP(q)->rsc) {
        /* coalescing units never outlive the pass (RSC, netvsp_rsc.c) */
        int rc = nvsp_rsc_flush_all(q);
        if (rc == -2)
            ring_full = 1;
    }
    if (QP(q)->batch_n) {
        int rc = nvsp_flush_batch(q);
        if (rc == UVB_EAGAIN)
            ring_full = 1;
    }
    *blocked = ring_full;
    return work;
}

int uvb_nvsp_service(struct uvb_nvsp_queue *q)
{
    if (!q->priv || !NP(q->nic))
        return UVB_EINVAL;
    int blocked = 0;
    uint32_t w = rx_work(q, &blocked);
    int rc = commit_all(q);
    return rc < 0 ? rc : (int)w;
}

int uvb_nvsp_pump(struct uvb_nvsp_queue *q, uint64_t spin_ns)
{
    struct uvb_nvsp *n = q->nic;
    struct queue_priv *qp = QP(q);
    if (!qp || !NP(n))
        return UVB_EINVAL;
    struct uvb_ring *in = q->in, *out = q->out;
    uint64_t idle_since = 0;
    uint32_t comp_len = n->msg_size ? n->msg_size : 40u;
    uint32_t comp_need = ring_bytes(comp_len, 0);
    q->punt_fatal = 0;
    for (;;) {
        if (__atomic_load_n(q->kick, __ATOMIC_ACQUIRE) || q->poke_mask) {
            int rc = commit_all(q);
            return rc < 0 ? rc : UVB_HOST_KICKED;
        }
        uint32_t work = 0;
        uint32_t start = in->cursor;
        int cnt = uvb_in_read(in, qp->scratch, SCRATCH_BYTES, qp->pkts, MAX_PKTS);
        q->polls++;
        if (cnt == UVB_ENOBUFS) {
            int rc = commit_all(q);
            return rc < 0 ? rc : punt(q, 0, "packet larger than the pump's buffer");
        }
        if (cnt < 0)
            return cnt;
        uint32_t pos = start;
        uint32_t cached_free = 0;
        for (int i = 0; i < cnt; i++) {
            struct uvb_pkt *p = &qp->pkts[i];
            int needs_comp = p->type != VMBUS_PKT_COMP && (p->flags & VMBUS_PKT_FLAG_COMPLETION_REQUESTED);
            if (needs_comp && cached_free < comp_need) {
                cached_free = uvb_out_free(out);
                if (out->error)
                    return out->error;
            }
            int rc;
            int comp = 0;
            uint32_t status = NVSP_STAT_SUCCESS;
            if (needs_comp && cached_free < comp_need)
                rc = NEED_SPACE;
            else
                rc = nvsp_handle_packet(q, qp->scratch, p, &comp, &status);
            if (rc == 0 && comp) {
                uint8_t c[40] = {0};
                struct nvsp_send_rndis_pkt_complete cm = {NVSP_MSG1_TYPE_SEND_RNDIS_PKT_COMPLETE, status};
                memcpy(c, &cm, sizeof cm);
                rc = uvb_out_inband(out, VMBUS_PKT_COMP, 0, p->trans_id, c, comp_len);
                if (rc < 0)
                    return rc;              /* space was checked: a real error */
                cached_free -= comp_need;
                q->completions++;
            }
            if (rc) {
                /* give packet i and the rest back to the ring */
                in->cursor = pos;
                in->packets -= (uint64_t)(cnt - i);
                int brc = 0;
                (void)rx_work(q, &brc);
                int crc = commit_all(q);
                if (crc < 0)
                    return crc;
                if (rc == NEED_SPACE) {
                    crc = uvb_host_want_space(out, comp_need + 4096, q->irq);
                    if (crc < 0)
                        return crc;
                    if (crc == 0)
                        return UVB_HOST_RXFULL;
                    goto next_round;
                }
                q->punts++;
                return rc;
            }
            pos += p->pkt_len + TRAILER;
            if (pos >= in->dsize)
                pos -= in->dsize;
        }
        work += (uint32_t)cnt;
        {
            int blocked = 0;
            work += rx_work(q, &blocked);
            int rc = commit_all(q);
            if (rc < 0)
                return rc;
            if (blocked && !work) {
                rc = uvb_host_want_space(out, 8192, q->irq);
                if (rc < 0)
                    return rc;
                if (rc == 0)
                    return UVB_HOST_RXFULL;
            }
        }
        if (work) {
            idle_since = 0;
            continue;
        }
        if (!spin_ns)
            return UVB_HOST_IDLE;
        {
            uint64_t now = mono_ns();
            if (!idle_since)
                idle_since = now;
            else if (now - idle_since >= spin_ns)
                return UVB_HOST_IDLE;
        }
        sched_yield();              /* poll on idle cycles only (the guest may need this CPU) */
    next_round:;
    }
}
