/*
 * Simulated NetVSP data plane — control messages posted by the model (RNDIS responses/indications, in-band NVSP).
 * Host side only (uvmbus sim); see netvsp.h and netvsp_priv.h.
 *
 * Written from ../shared/reference/netvsc.md §5–§7 and §10; everything read from guest
 * memory (TX ring packets are already private copies; send-buffer sections and GPA pages
 * are not) is copied into locals before it is checked.
 */
#define _GNU_SOURCE
#include "netvsp_priv.h"

/* ------------------------------------------------------------------------ */
/* control / in-band posts (queue 0)                                          */

static int post(struct uvb_nvsp *n, uint32_t kind, const uint8_t *msg, uint32_t len,
                uint64_t tid, uint16_t flags)
{
    struct nic_priv *np = NP(n);
    if (!np || !len)
        return UVB_EINVAL;
    if (kind == 0 && len > n->sub_size)
        return UVB_EINVAL;
    spin_lock(&n->ctrl_lock);
    if (kind == 0 && n->ctrl_queued_bytes + len > UVB_NVSP_CTRL_QUEUE_MAX) {
        spin_unlock(&n->ctrl_lock);
        return UVB_EAGAIN;
    }
    struct ctrl_rec *r = malloc(sizeof *r + len);
    if (!r) {
        spin_unlock(&n->ctrl_lock);
        return UVB_EINVAL;
    }
    r->next = NULL;
    r->kind = kind;
    r->len = len;
    r->tid = tid;
    r->flags = flags;
    memcpy(r->data, msg, len);
    if (np->cq_tail)
        np->cq_tail->next = r;
    else
        np->cq_head = r;
    np->cq_tail = r;
    np->cq_count++;
    if (kind == 0)
        n->ctrl_queued_bytes += len;
    spin_unlock(&n->ctrl_lock);
    return 0;
}

int uvb_nvsp_post_ctrl(struct uvb_nvsp *n, const uint8_t *msg, uint32_t len)
{
    return post(n, 0, msg, len, 0, 0);
}

int uvb_nvsp_post_inband(struct uvb_nvsp *n, const uint8_t *msg, uint32_t len,
                         uint64_t trans_id, uint16_t flags)
{
    return post(n, 1, msg, len, trans_id, flags);
}

uint32_t uvb_nvsp_ctrl_pending(struct uvb_nvsp *n)
{
    struct nic_priv *np = NP(n);
    return np ? __atomic_load_n(&np->cq_count, __ATOMIC_RELAXED) : 0;
}

/* Send queued control messages (queue 0 only).  Returns messages sent; *blocked = 1 if the
 * ring is full. */
uint32_t nvsp_send_ctrl(struct uvb_nvsp_queue *q, int *blocked)
{
    struct uvb_nvsp *n = q->nic;
    struct nic_priv *np = NP(n);
    uint32_t sent = 0;
    if (q->index != 0 || !np)
        return 0;
    for (;;) {
        spin_lock(&n->ctrl_lock);
        struct ctrl_rec *r = np->cq_head;
        spin_unlock(&n->ctrl_lock);
        if (!r)
            break;
        int rc;
        uint32_t id = END_ID;
        if (r->kind == 0) {
            if (nvsp_pool_pop_many(&np->ctrl, &id, 1) == 0)
                break;                  /* all 16 control buffers are with the guest */
            memcpy(n->recv_buf + (uint64_t)id * n->sub_size, r->data, r->len);
            struct vmtransfer_page_range rg = {r->len, id * n->sub_size};
            uint8_t nvsp[40] = {0};
            struct nvsp_send_rndis_pkt m = {NVSP_MSG1_TYPE_SEND_RNDIS_PKT, NVSP_CHANNEL_TYPE_CONTROL,
                                            NVSP_SECTION_INDEX_NONE, 0};
            memcpy(nvsp, &m, sizeof m);
            uint16_t pageset = (uint16_t)n->recv_buf_id;
            nvsp_apply_fault(n, &rg, 1, nvsp, &pageset);
            rc = uvb_out_xfer_pages(q->out, VMBUS_PKT_FLAG_COMPLETION_REQUESTED, id, pageset, 0, &rg, 1,
                                    nvsp, n->msg_size ? n->msg_size : 40u);
            if (rc == 0) {
                np->next[id] = END_ID;
                __atomic_store_n(&np->state[id], (uint8_t)ST_HEAD, __ATOMIC_RELEASE);
            } else {
                nvsp_pool_push(&np->ctrl, id);
            }
        } else {
            rc = uvb_out_inband(q->out, VMBUS_PKT_INBAND, r->flags, r->tid, r->data, r->len);
        }
        if (rc == UVB_EAGAIN) {
            *blocked = 1;
            break;
        }
        if (rc < 0)
            return sent;
        spin_lock(&n->ctrl_lock);
        np->cq_head = r->next;
        if (!np->cq_head)
            np->cq_tail = NULL;
        np->cq_count--;
        if (r->kind == 0)
            n->ctrl_queued_bytes -= r->len;
        spin_unlock(&n->ctrl_lock);
        free(r);
        n->ctrl_sent++;
        sent++;
    }
    return sent;
}
