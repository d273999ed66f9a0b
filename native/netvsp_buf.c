/*
 * Simulated NetVSP data plane — receive-buffer sub-allocation pools and queue set-up.
 * Host side only (uvmbus sim); see netvsp.h and netvsp_priv.h.
 *
 * Written from ../shared/reference/netvsc.md §5–§7 and §10; everything read from guest
 * memory (TX ring packets are already private copies; send-buffer sections and GPA pages
 * are not) is copied into locals before it is checked.
 */
#define _GNU_SOURCE
#include "netvsp_priv.h"

/* ------------------------------------------------------------------------ */
/* pools                                                                     */

void nvsp_pool_push(struct pool *p, uint32_t id)
{
    spin_lock(&p->lock);
    p->ids[p->n++] = id;
    spin_unlock(&p->lock);
}

uint32_t nvsp_pool_pop_many(struct pool *p, uint32_t *out, uint32_t want)
{
    spin_lock(&p->lock);
    uint32_t k = p->n < want ? p->n : want;
    for (uint32_t i = 0; i < k; i++)
        out[i] = p->ids[--p->n];
    spin_unlock(&p->lock);
    return k;
}

struct pool *nvsp_pool_of(struct nic_priv *np, uint32_t id)
{
    if (id < UVB_NVSP_CTRL_IDS)
        return &np->ctrl;
    uint32_t q = np->per_queue ? (id - UVB_NVSP_CTRL_IDS) / np->per_queue : 0;
    if (q >= np->nq)
        q = np->nq - 1;
    return &np->pools[q];
}

static void free_priv(struct uvb_nvsp *n)
{
    struct nic_priv *np = NP(n);
    if (!np)
        return;
    free(np->state);
    free(np->next);
    free(np->ctrl.ids);
    for (uint32_t i = 0; i < UVB_NVSP_MAX_QUEUES; i++)
        free(np->pools[i].ids);
    struct ctrl_rec *r = np->cq_head;
    while (r) {
        struct ctrl_rec *nx = r->next;
        free(r);
        r = nx;
    }
    free(np);
    n->priv = NULL;
}

static void rebuild_pools(struct uvb_nvsp *n, uint32_t nq)
{
    struct nic_priv *np = NP(n);
    spin_lock(&np->ctrl.lock);
    for (uint32_t i = 0; i < UVB_NVSP_MAX_QUEUES; i++)
        spin_lock(&np->pools[i].lock);
    uint32_t data = n->sub_count > UVB_NVSP_CTRL_IDS ? n->sub_count - UVB_NVSP_CTRL_IDS : 0;
    np->nq = nq;
    np->per_queue = data / nq;
    np->ctrl.n = 0;
    for (uint32_t i = 0; i < UVB_NVSP_MAX_QUEUES; i++)
        np->pools[i].n = 0;
    /* push in descending order so pops hand out ascending ids */
    for (uint32_t id = n->sub_count; id-- > 0;) {
        if (np->state[id] != ST_FREE)
            continue;
        struct pool *p = nvsp_pool_of(np, id);
        p->ids[p->n++] = id;
    }
    for (uint32_t i = UVB_NVSP_MAX_QUEUES; i-- > 0;)
        spin_unlock(&np->pools[i].lock);
    spin_unlock(&np->ctrl.lock);
}

int uvb_nvsp_set_recv_buf(struct uvb_nvsp *n, uint8_t *buf, uint64_t size, uint32_t mtu)
{
    if (!buf || mtu < 1514 || mtu > 9216)
        return UVB_EINVAL;
    uint32_t sub = UVB_NVSP_SUB_OVERHEAD + mtu;
    uint64_t count = size / sub;
    if (count <= UVB_NVSP_CTRL_IDS || count > 0x7fffffffull)
        return UVB_EINVAL;
    free_priv(n);
    struct nic_priv *np = calloc(1, sizeof *np);
    if (!np)
        return UVB_EINVAL;
    n->priv = np;
    np->state = calloc(count, 1);
    np->next = calloc(count, sizeof(uint32_t));
    np->ctrl.ids = calloc(UVB_NVSP_CTRL_IDS, sizeof(uint32_t));
    int ok = np->state && np->next && np->ctrl.ids;
    for (uint32_t i = 0; ok && i < UVB_NVSP_MAX_QUEUES; i++) {
        np->pools[i].ids = calloc(count, sizeof(uint32_t));
        ok = np->pools[i].ids != NULL;
    }
    if (!ok) {
        free_priv(n);
        return UVB_EINVAL;
    }
    n->recv_buf = buf;
    n->recv_size = size;
    n->mtu = mtu;
    n->sub_size = sub;
    n->sub_count = (uint32_t)count;
    if (!n->max_ranges || n->max_ranges > NVSP_MAX_PACKETS_PER_RECEIVE_RSC)
        n->max_ranges = NVSP_MAX_PACKETS_PER_RECEIVE;
    if (!n->num_queues)
        n->num_queues = 1;
    rebuild_pools(n, n->num_queues);
    return 0;
}

int uvb_nvsp_set_queues(struct uvb_nvsp *n, uint32_t count)
{
    if (count == 0 || count > UVB_NVSP_MAX_QUEUES)
        return UVB_EINVAL;
    n->num_queues = count;
    if (NP(n))
        rebuild_pools(n, count);
    __atomic_fetch_add(&n->cfg_epoch, 1, __ATOMIC_RELEASE);
    return 0;
}

uint32_t uvb_nvsp_free_ids(struct uvb_nvsp *n, uint32_t queue)
{
    struct nic_priv *np = NP(n);
    if (!np || queue >= UVB_NVSP_MAX_QUEUES)
        return 0;
    return __atomic_load_n(&np->pools[queue].n, __ATOMIC_RELAXED);
}

uint32_t uvb_nvsp_guest_owned(struct uvb_nvsp *n)
{
    struct nic_priv *np = NP(n);
    if (!np)
        return 0;
    uint32_t c = 0;
    for (uint32_t i = 0; i < n->sub_count; i++)
        c += np->state[i] == ST_HEAD || np->state[i] == ST_MEMBER;
    return c;
}

void uvb_nvsp_fini(struct uvb_nvsp *n)
{
    free_priv(n);
}

/* ------------------------------------------------------------------------ */
/* queue setup                                                               */

int uvb_nvsp_queue_init(struct uvb_nvsp_queue *q, struct uvb_nvsp *n, uint32_t index,
                        struct uvb_ring *in, struct uvb_ring *out, struct uvb_host_irq *irq,
                        const uint32_t *kick)
{
    if (index >= UVB_NVSP_MAX_QUEUES)
        return UVB_EINVAL;
    memset(q, 0, sizeof *q);
    q->nic = n;
    q->index = index;
    q->in = in;
    q->out = out;
    q->irq = irq;
    q->kick = kick;
    struct queue_priv *qp = calloc(1, sizeof *qp);
    if (!qp)
        return UVB_EINVAL;
    q->priv = qp;
    qp->scratch = malloc(SCRATCH_BYTES);
    qp->pkts = calloc(MAX_PKTS, sizeof *qp->pkts);
    qp->stream = malloc(STREAM_BYTES);
    qp->frame = malloc(UVB_NVSP_MAX_FRAME + 64);
    qp->seg = malloc(UVB_NVSP_MAX_FRAME + 64);
    qp->batch = calloc(NVSP_MAX_PACKETS_PER_RECEIVE_RSC, sizeof(uint32_t));
    qp->ranges = calloc(NVSP_MAX_PACKETS_PER_RECEIVE_RSC, sizeof *qp->ranges);
    qp->ib = malloc(INBOX_BYTES);
    qp->payload = calloc(1, UVB_NVSP_MAX_FRAME);
    if (!qp->scratch || !qp->pkts || !qp->stream || !qp->frame || !qp->seg || !qp->batch || !qp->ranges ||
        !qp->ib || !qp->payload) {
        uvb_nvsp_queue_fini(q);
        return UVB_EINVAL;
    }
    for (uint32_t i = 0; i < UVB_NVSP_MAX_FRAME; i++)
        qp->payload[i] = (uint8_t)(i * 7u + 1u);
    qp->epoch = ~0u;
    return 0;
}


void uvb_nvsp_queue_fini(struct uvb_nvsp_queue *q)
{
    struct queue_priv *qp = QP(q);
    if (!qp)
        return;
    if (q->nic && NP(q->nic))
        nvsp_release_batch(q);
    free(qp->scratch);
    free(qp->pkts);
    free(qp->stream);
    free(qp->frame);
    free(qp->seg);
    free(qp->batch);
    free(qp->ranges);
    free(qp->ib);
    free(qp->flows);
    free(qp->payload);
    nvsp_rsc_free(qp);
    free(qp);
    q->priv = NULL;
}

int uvb_nvsp_queue_reset(struct uvb_nvsp_queue *q)
{
    struct queue_priv *qp = QP(q);
    if (!qp)
        return UVB_EINVAL;
    if (q->nic && NP(q->nic))
        nvsp_release_batch(q);
    qp->batch_n = 0;
    nvsp_rsc_free(qp);
    qp->ib_head = qp->ib_tail = 0;
    qp->nflows = qp->flow_cursor = qp->have_flows = 0;
    qp->epoch = ~0u;
    qp->quota = qp->made = 0;
    q->poke_mask = 0;
    q->punt_fatal = 0;
    memset(q->punt_msg, 0, sizeof q->punt_msg);
    memset(&q->tx_msgs, 0, sizeof *q - offsetof(struct uvb_nvsp_queue, tx_msgs));
    return 0;
}

void uvb_nvsp_attach_queue(struct uvb_nvsp *n, struct uvb_nvsp_queue *q)
{
    struct nic_priv *np = NP(n);
    if (!np || q->index >= UVB_NVSP_MAX_QUEUES)
        return;
    spin_lock(&np->qlock);
    np->queues[q->index] = q;
    spin_unlock(&np->qlock);
}

void uvb_nvsp_detach_queue(struct uvb_nvsp *n, struct uvb_nvsp_queue *q)
{
    struct nic_priv *np = NP(n);
    if (!np || q->index >= UVB_NVSP_MAX_QUEUES)
        return;
    spin_lock(&np->qlock);
    if (np->queues[q->index] == q)
        np->queues[q->index] = NULL;
    spin_unlock(&np->qlock);
}
