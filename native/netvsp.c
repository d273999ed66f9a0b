/*
 * Simulated NetVSP data plane: see netvsp.h.  Host side only (uvmbus sim).
 *
 * Written from ../shared/reference/netvsc.md §5–§7 and §10; everything read from guest
 * memory (TX ring packets are already private copies; send-buffer sections and GPA pages
 * are not) is copied into locals before it is checked.
 */
#define _GNU_SOURCE
#include "uvmbus.h"
#include "util.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define END_ID 0xFFFFFFFFu

#define ST_FREE   0
#define ST_BATCH  1     /* written, waiting in a queue's pending batch */
#define ST_HEAD   2     /* sent: first id of a batch (the transaction id) */
#define ST_MEMBER 3     /* sent: another id of a batch */

#define SCRATCH_BYTES (1u << 20)
#define MAX_PKTS 256u
#define STREAM_BYTES (256u * 1024u)
#define INBOX_BYTES (4u << 20)
#define MAX_GEN_FLOWS 4096u
#define NEED_SPACE 1000     /* internal: completion does not fit in the RX ring */


static inline uint32_t ring_bytes(uint32_t payload, uint32_t ext)
{
    return ((DESC + ext + payload + 7u) & ~7u) + TRAILER;
}

static inline uint32_t rd32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static inline void wr32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

/* ------------------------------------------------------------------------ */
/* private state                                                             */

struct pool {
    uint32_t lock;
    uint32_t n;
    uint32_t *ids;
};

struct ctrl_rec {
    struct ctrl_rec *next;
    uint32_t kind;              /* 0 RNDIS control message, 1 in-band NVSP */
    uint32_t len;
    uint64_t tid;
    uint16_t flags;
    uint8_t data[];
};

struct nic_priv {
    uint8_t *state;
    uint32_t *next;
    struct pool ctrl;
    struct pool pools[UVB_NVSP_MAX_QUEUES];
    uint32_t nq;
    uint32_t per_queue;
    struct uvb_nvsp_queue *queues[UVB_NVSP_MAX_QUEUES];
    uint32_t qlock;
    struct ctrl_rec *cq_head, *cq_tail;
    uint32_t cq_count;
};

struct flow {
    uint8_t hdr[54];            /* Ethernet + IPv4 + UDP/TCP header template */
    uint16_t hdr_len;
    uint32_t hash;
    uint32_t hash_type;
};

struct queue_priv {
    uint8_t *scratch;
    struct uvb_pkt *pkts;
    uint8_t *stream;            /* gathered GPA-direct bytes */
    uint8_t *frame;             /* modified frame copy (offloads, VLAN insert) */
    uint32_t *batch;
    uint32_t batch_n;
    struct vmtransfer_page_range *ranges;
    /* inbox: single consumer (this queue's worker), producers serialised by ib_lock */
    uint32_t ib_lock;
    uint8_t *ib;
    uint64_t ib_head;           /* consumer position (bytes, monotonic) */
    uint64_t ib_tail;           /* producer position */
    /* generator */
    struct flow *flows;
    uint32_t nflows;
    uint32_t flow_cursor;
    uint32_t epoch;
    uint32_t have_flows;
    uint64_t quota;             /* with a frame limit: this queue's share of it */
    uint64_t made;              /* frames this queue generated since its flows were built */
    uint8_t *payload;           /* generator payload pattern */
};

static struct nic_priv *NP(const struct uvb_nvsp *n) { return (struct nic_priv *)n->priv; }
static struct queue_priv *QP(const struct uvb_nvsp_queue *q) { return (struct queue_priv *)q->priv; }

static int punt(struct uvb_nvsp_queue *q, int fatal, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(q->punt_msg, sizeof q->punt_msg, fmt, ap);
    va_end(ap);
    q->punt_fatal = fatal ? 1u : 0u;
    return UVB_HOST_SLOWPATH;
}

/* ------------------------------------------------------------------------ */
/* pools                                                                     */

static void pool_push(struct pool *p, uint32_t id)
{
    spin_lock(&p->lock);
    p->ids[p->n++] = id;
    spin_unlock(&p->lock);
}

static uint32_t pool_pop_many(struct pool *p, uint32_t *out, uint32_t want)
{
    spin_lock(&p->lock);
    uint32_t k = p->n < want ? p->n : want;
    for (uint32_t i = 0; i < k; i++)
        out[i] = p->ids[--p->n];
    spin_unlock(&p->lock);
    return k;
}

static struct pool *pool_of(struct nic_priv *np, uint32_t id)
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
        struct pool *p = pool_of(np, id);
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
/* RSS                                                                       */

uint32_t uvb_nvsp_toeplitz(const uint8_t *key, const uint8_t *data, uint32_t len)
{
    uint32_t result = 0;
    uint32_t window = (uint32_t)key[0] << 24 | (uint32_t)key[1] << 16 | (uint32_t)key[2] << 8 | key[3];
    uint32_t kbit = 32;                     /* next key bit to shift into the window */
    for (uint32_t i = 0; i < len; i++) {
        for (int b = 7; b >= 0; b--) {
            if (data[i] & (1u << b))
                result ^= window;
            uint32_t nb = kbit < 320 ? (key[kbit / 8] >> (7 - kbit % 8)) & 1u : 0u;
            window = window << 1 | nb;
            kbit++;
        }
    }
    return result;
}

/* Parse an Ethernet frame for RSS: fills `in` with the hash input, returns its length
 * and the hash type, or 0. */
static uint32_t rss_input(uint32_t hash_info, const uint8_t *f, uint32_t len, uint8_t *in,
                          uint32_t *type)
{
    *type = 0;
    if (len < 14)
        return 0;
    uint16_t et = be16(f + 12);
    uint32_t l3 = 14;
    if (et == 0x8100 && len >= 18) {
        et = be16(f + 16);
        l3 = 18;
    }
    if (et == 0x0800) {
        if (len < l3 + 20)
            return 0;
        const uint8_t *ip = f + l3;
        uint32_t ihl = (ip[0] & 0xfu) * 4u;
        if ((ip[0] >> 4) != 4 || ihl < 20 || len < l3 + ihl)
            return 0;
        memcpy(in, ip + 12, 8);
        int frag = (be16(ip + 6) & 0x3fffu) != 0;
        uint8_t proto = ip[9];
        if (!frag && len >= l3 + ihl + 4) {
            if (proto == 6 && (hash_info & NDIS_HASH_TCP_IPV4)) {
                memcpy(in + 8, f + l3 + ihl, 4);
                *type = NDIS_HASH_TCP_IPV4;
                return 12;
            }
            if (proto == 17 && (hash_info & NDIS_HASH_UDP_IPV4)) {
                memcpy(in + 8, f + l3 + ihl, 4);
                *type = NDIS_HASH_UDP_IPV4;
                return 12;
            }
        }
        if (hash_info & NDIS_HASH_IPV4) {
            *type = NDIS_HASH_IPV4;
            return 8;
        }
        return 0;
    }
    if (et == 0x86DD) {
        if (len < l3 + 40)
            return 0;
        const uint8_t *ip = f + l3;
        memcpy(in, ip + 8, 32);
        uint8_t nh = ip[6];
        if (len >= l3 + 44) {
            if (nh == 6 && (hash_info & NDIS_HASH_TCP_IPV6)) {
                memcpy(in + 32, ip + 40, 4);
                *type = NDIS_HASH_TCP_IPV6;
                return 36;
            }
            if (nh == 17 && (hash_info & NDIS_HASH_UDP_IPV6)) {
                memcpy(in + 32, ip + 40, 4);
                *type = NDIS_HASH_UDP_IPV6;
                return 36;
            }
        }
        if (hash_info & NDIS_HASH_IPV6) {
            *type = NDIS_HASH_IPV6;
            return 32;
        }
    }
    return 0;
}

uint32_t uvb_nvsp_frame_hash(const struct uvb_nvsp *n, const uint8_t *frame, uint32_t len,
                             uint32_t *type)
{
    uint8_t in[40];
    uint32_t t = 0;
    uint32_t k = rss_input(n->hash_info, frame, len, in, &t);
    if (type)
        *type = t;
    return k ? uvb_nvsp_toeplitz(n->rss_key, in, k) : 0;
}

static uint32_t queue_for_hash(const struct uvb_nvsp *n, uint32_t hash, uint32_t type)
{
    if (!n->rss_enabled || !type)
        return 0;
    uint32_t q = n->rss_table[hash & 127u];
    return q < n->num_queues ? q : 0;
}

uint32_t uvb_nvsp_frame_queue(const struct uvb_nvsp *n, const uint8_t *frame, uint32_t len)
{
    if (!n->rss_enabled)
        return 0;
    uint32_t type;
    uint32_t h = uvb_nvsp_frame_hash(n, frame, len, &type);
    return queue_for_hash(n, h, type);
}

/* ------------------------------------------------------------------------ */
/* checksums                                                                 */

static uint32_t csum_add(uint32_t sum, const uint8_t *p, uint32_t len)
{
    while (len >= 2) {
        sum += (uint32_t)(p[0] << 8 | p[1]);
        p += 2;
        len -= 2;
    }
    if (len)
        sum += (uint32_t)(p[0] << 8);
    return sum;
}

static uint16_t csum_fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffffu) + (sum >> 16);
    return (uint16_t)~sum;
}

/* L4 checksum over [l4, l4+l4len) with the pseudo header of the IP header at ip. */
static uint16_t l4_csum(const uint8_t *ip, int v6, const uint8_t *l4, uint32_t l4len, uint8_t proto)
{
    uint32_t sum = 0;
    if (v6) {
        sum = csum_add(sum, ip + 8, 32);
        sum += l4len >> 16;
        sum += l4len & 0xffffu;
    } else {
        sum = csum_add(sum, ip + 12, 8);
        sum += l4len;
    }
    sum += proto;
    sum = csum_add(sum, l4, l4len);
    return csum_fold(sum);
}

/* RX checksum PPI value for a frame (0 = no information). */
static uint32_t rx_csum_info(const uint8_t *f, uint32_t len, int known_good)
{
    if (len < 14)
        return 0;
    uint16_t et = be16(f + 12);
    uint32_t l3 = 14;
    if (et == 0x0800 && len >= l3 + 20) {
        const uint8_t *ip = f + l3;
        uint32_t ihl = (ip[0] & 0xfu) * 4u;
        if ((ip[0] >> 4) != 4 || ihl < 20 || len < l3 + ihl)
            return 0;
        uint32_t tot = be16(ip + 2);
        uint32_t v = 0;
        if (known_good || csum_fold(csum_add(0, ip, ihl)) == 0)
            v |= CSUM_RX_IP_OK;
        else
            return CSUM_RX_IP_FAILED;
        if (tot < ihl || l3 + tot > len || (be16(ip + 6) & 0x3fffu))
            return v;
        const uint8_t *l4 = ip + ihl;
        uint32_t l4len = tot - ihl;
        if (ip[9] == 6 && l4len >= 20)
            v |= (known_good || l4_csum(ip, 0, l4, l4len, 6) == 0) ? CSUM_RX_TCP_OK : CSUM_RX_TCP_FAILED;
        else if (ip[9] == 17 && l4len >= 8) {
            uint16_t c = be16(l4 + 6);
            v |= (known_good || c == 0 || l4_csum(ip, 0, l4, l4len, 17) == 0) ? CSUM_RX_UDP_OK
                                                                              : CSUM_RX_UDP_FAILED;
        }
        return v;
    }
    if (et == 0x86DD && len >= l3 + 40) {
        const uint8_t *ip = f + l3;
        uint32_t plen = be16(ip + 4);
        if (l3 + 40 + plen > len)
            return 0;
        const uint8_t *l4 = ip + 40;
        if (ip[6] == 6 && plen >= 20)
            return (known_good || l4_csum(ip, 1, l4, plen, 6) == 0) ? CSUM_RX_TCP_OK : CSUM_RX_TCP_FAILED;
        if (ip[6] == 17 && plen >= 8)
            return (known_good || l4_csum(ip, 1, l4, plen, 17) == 0) ? CSUM_RX_UDP_OK : CSUM_RX_UDP_FAILED;
    }
    return 0;
}

/* Apply a TX checksum PPI to a private frame copy.  0, or -1 when the request is invalid
 * (offsets outside the frame, §5: completed with FAILURE). */
static int tx_csum_offload(uint8_t *f, uint32_t len, uint32_t info)
{
    int v4 = (info & CSUM_TX_IS_IPV4) != 0, v6 = (info & CSUM_TX_IS_IPV6) != 0;
    int want_l4 = (info & (CSUM_TX_TCP | CSUM_TX_UDP)) != 0;
    if (!(info & (CSUM_TX_TCP | CSUM_TX_UDP | CSUM_TX_IP_HDR)))
        return 0;
    if (v4 == v6)
        return -1;
    uint32_t l3 = 14;
    if (len < l3 + (v4 ? 20u : 40u))
        return -1;
    uint8_t *ip = f + l3;
    if (v4) {
        uint32_t ihl = (ip[0] & 0xfu) * 4u;
        if (ihl < 20 || l3 + ihl > len)
            return -1;
        if (info & CSUM_TX_IP_HDR) {
            ip[10] = ip[11] = 0;
            uint16_t c = csum_fold(csum_add(0, ip, ihl));
            ip[10] = (uint8_t)(c >> 8);
            ip[11] = (uint8_t)c;
        }
    }
    if (!want_l4)
        return 0;
    uint32_t off = (info & CSUM_TX_TCP_HDR_OFFSET_MASK) >> CSUM_TX_TCP_HDR_OFFSET_SHIFT;
    if (off < l3 + (v4 ? 20u : 40u) || off >= len)
        return -1;
    int tcp = (info & CSUM_TX_TCP) != 0;
    uint32_t need = tcp ? 20u : 8u;
    if (off + need > len)
        return -1;
    uint32_t l4len = len - off;
    if (v4) {
        uint32_t tot = be16(ip + 2);
        if (l3 + tot <= len && l3 + tot > off)
            l4len = l3 + tot - off;
    } else {
        uint32_t plen = be16(ip + 4);
        if (l3 + 40 + plen <= len && l3 + 40 + plen > off)
            l4len = l3 + 40 + plen - off;
    }
    uint8_t *l4 = f + off;
    uint32_t co = tcp ? 16u : 6u;
    l4[co] = l4[co + 1] = 0;
    uint16_t c = l4_csum(ip, v6, l4, l4len, tcp ? 6 : 17);
    if (!tcp && c == 0)
        c = 0xffff;
    l4[co] = (uint8_t)(c >> 8);
    l4[co + 1] = (uint8_t)c;
    return 0;
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
    qp->batch = calloc(NVSP_MAX_PACKETS_PER_RECEIVE_RSC, sizeof(uint32_t));
    qp->ranges = calloc(NVSP_MAX_PACKETS_PER_RECEIVE_RSC, sizeof *qp->ranges);
    qp->ib = malloc(INBOX_BYTES);
    qp->payload = calloc(1, UVB_NVSP_MAX_FRAME);
    if (!qp->scratch || !qp->pkts || !qp->stream || !qp->frame || !qp->batch || !qp->ranges ||
        !qp->ib || !qp->payload) {
        uvb_nvsp_queue_fini(q);
        return UVB_EINVAL;
    }
    for (uint32_t i = 0; i < UVB_NVSP_MAX_FRAME; i++)
        qp->payload[i] = (uint8_t)(i * 7u + 1u);
    qp->epoch = ~0u;
    return 0;
}

static void release_batch(struct uvb_nvsp_queue *q);

void uvb_nvsp_queue_fini(struct uvb_nvsp_queue *q)
{
    struct queue_priv *qp = QP(q);
    if (!qp)
        return;
    if (q->nic && NP(q->nic))
        release_batch(q);
    free(qp->scratch);
    free(qp->pkts);
    free(qp->stream);
    free(qp->frame);
    free(qp->batch);
    free(qp->ranges);
    free(qp->ib);
    free(qp->flows);
    free(qp->payload);
    free(qp);
    q->priv = NULL;
}

int uvb_nvsp_queue_reset(struct uvb_nvsp_queue *q)
{
    struct queue_priv *qp = QP(q);
    if (!qp)
        return UVB_EINVAL;
    if (q->nic && NP(q->nic))
        release_batch(q);
    qp->batch_n = 0;
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

/* ------------------------------------------------------------------------ */
/* inbox                                                                     */

struct ib_rec {
    uint32_t len;               /* 0xFFFFFFFF: padding to the end of the buffer */
    uint16_t flags;
    uint16_t tci;
};

static int inbox_push(struct queue_priv *qp, const uint8_t *f, uint32_t len, uint32_t flags,
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

static inline int inbox_empty(struct queue_priv *qp)
{
    return __atomic_load_n(&qp->ib_tail, __ATOMIC_ACQUIRE) == qp->ib_head;
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

static inline int rx_open(const struct uvb_nvsp *n)
{
    return n->data_ready && n->filter && n->link_up && !n->dead;
}

static void put_ppi(uint8_t *p, uint32_t type, uint32_t value)
{
    struct rndis_ppi_u32 e = {RNDIS_PPI_SIZE_U32, type, RNDIS_PPI_HDR_SIZE, value};
    memcpy(p, &e, sizeof e);
}

/* Write the RNDIS PACKET header + PPIs of a received frame at `sub` (§6 layout).  The frame
 * itself is at sub + 256.  Returns nothing: the caller checked the size. */
static void write_rx_header(const struct uvb_nvsp *n, uint8_t *sub, uint32_t len, uint32_t csum,
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
static void apply_fault(struct uvb_nvsp *n, struct vmtransfer_page_range *rg, uint32_t nr,
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
static int flush_batch(struct uvb_nvsp_queue *q)
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
    apply_fault(n, qp->ranges, k, nvsp, &pageset);
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
static void release_batch(struct uvb_nvsp_queue *q)
{
    struct queue_priv *qp = QP(q);
    struct nic_priv *np = NP(q->nic);
    for (uint32_t i = 0; i < qp->batch_n; i++) {
        uint32_t id = qp->batch[i];
        if (id < q->nic->sub_count) {
            np->state[id] = ST_FREE;
            pool_push(pool_of(np, id), id);
        }
    }
    qp->batch_n = 0;
}

/* Deliver one frame into this queue: 1 delivered, 0 dropped (counted), -1 no free
 * sub-allocation, -2 batch full and the ring full (caller decides). */
static int deliver(struct uvb_nvsp_queue *q, const uint8_t *f, uint32_t len, uint32_t flags,
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
    uint32_t maxr = n->max_ranges;
    if (qp->batch_n >= maxr) {
        int rc = flush_batch(q);
        if (rc)
            return -2;
    }
    uint32_t id;
    if (pool_pop_many(&NP(n)->pools[q->index], &id, 1) == 0)
        return -1;
    uint8_t *sub = n->recv_buf + (uint64_t)id * n->sub_size;
    uint32_t htype = 0, hash = 0;
    int hashed = 0;
    if (n->rss_enabled && n->rx_hash_ppi) {
        hash = uvb_nvsp_frame_hash(n, f, len, &htype);
        hashed = htype != 0;
    }
    uint32_t csum = rx_csum_info(f, len, (flags & UVB_NVSP_META_CSUM_OK) || !n->rx_verify_csum);
    write_rx_header(n, sub, len, csum, (flags & UVB_NVSP_META_VLAN) != 0, tci, hashed, hash, htype);
    memcpy(sub + UVB_NVSP_RX_DATA_OFFSET, f, len);
    NP(n)->state[id] = ST_BATCH;
    qp->batch[qp->batch_n++] = id;
    q->rx_frames++;
    q->rx_bytes += len;
    return 1;
}

/* Move inbox frames into the RX ring.  Returns frames moved; *blocked = 1 when frames
 * remain that could not be placed (no sub-allocation or ring full). */
static uint32_t drain_inbox(struct uvb_nvsp_queue *q, int *blocked)
{
    struct queue_priv *qp = QP(q);
    uint32_t moved = 0;
    const struct ib_rec *r;
    while ((r = inbox_peek(qp)) != NULL) {
        int rc = deliver(q, (const uint8_t *)(r + 1), r->len, r->flags, r->tci);
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
static void route_frame(struct uvb_nvsp_queue *q, const uint8_t *f, uint32_t len, uint32_t flags,
                        uint32_t tci)
{
    struct uvb_nvsp *n = q->nic;
    struct nic_priv *np = NP(n);
    uint32_t k = uvb_nvsp_frame_queue(n, f, len);
    if (k == q->index) {
        if (inbox_empty(QP(q)) && deliver(q, f, len, flags, tci) >= 0)
            return;
        if (inbox_push(QP(q), f, len, flags, tci))
            q->inbox_drops++;
        return;
    }
    spin_lock(&np->qlock);
    struct uvb_nvsp_queue *t = np->queues[k];
    int ok = t && t->priv && inbox_push(QP(t), f, len, flags, tci) == 0;
    spin_unlock(&np->qlock);
    if (!ok)
        q->inbox_drops++;
    else
        q->poke_mask |= 1ull << k;
}

/* ------------------------------------------------------------------------ */
/* generator                                                                 */

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
        uint16_t c = csum_fold(csum_add(0, ip, 20));
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
        if (queue_for_hash(n, fl.hash, htype) == q->index) {
            qp->flows[qp->nflows++] = fl;
            qp->quota += per_flow + (f < extra ? 1u : 0u);
        }
    }
    qp->flow_cursor = 0;
    qp->have_flows = 1;
}

/* Generate up to `max` frames into this queue.  Returns frames generated. */
static uint32_t generate(struct uvb_nvsp_queue *q, uint32_t max, int *blocked)
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
            if (flush_batch(q)) {
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
        uint32_t got = pool_pop_many(&np->pools[q->index], ids, want);
        if (!got)
            break;
        /* reserve sequence numbers (and, with a limit, the quota) for what we popped; queues
         * generate concurrently, so this is one compare-and-swap */
        uint64_t seq0 = __atomic_load_n(&g->generated, __ATOMIC_RELAXED);
        uint32_t take;
        do {
            take = got;
            if (g->limit) {
                if (seq0 >= g->limit)
                    take = 0;
                else if (g->limit - seq0 < take)
                    take = (uint32_t)(g->limit - seq0);
            }
        } while (take && !__atomic_compare_exchange_n(&g->generated, &seq0, seq0 + take, 1,
                                                      __ATOMIC_RELAXED, __ATOMIC_RELAXED));
        for (uint32_t i = take; i < got; i++)
            pool_push(&np->pools[q->index], ids[i]);
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
            write_rx_header(n, sub, size, csum, 0, 0, hashed, fl->hash, fl->hash_type);
            uint8_t *f = sub + UVB_NVSP_RX_DATA_OFFSET;
            memcpy(f, fl->hdr, fl->hdr_len);
            uint64_t seq = seq0 + i;
            uint32_t pl = size - fl->hdr_len;
            memcpy(f + fl->hdr_len, qp->payload, pl);
            if (pl >= 8)
                memcpy(f + fl->hdr_len, &seq, 8);
            if (tcp) {
                uint8_t *ip = f + 14, *l4 = ip + 20;
                uint16_t c = l4_csum(ip, 0, l4, size - 34, 6);
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
static uint32_t send_ctrl(struct uvb_nvsp_queue *q, int *blocked)
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
            if (pool_pop_many(&np->ctrl, &id, 1) == 0)
                break;                  /* all 16 control buffers are with the guest */
            memcpy(n->recv_buf + (uint64_t)id * n->sub_size, r->data, r->len);
            struct vmtransfer_page_range rg = {r->len, id * n->sub_size};
            uint8_t nvsp[40] = {0};
            struct nvsp_send_rndis_pkt m = {NVSP_MSG1_TYPE_SEND_RNDIS_PKT, NVSP_CHANNEL_TYPE_CONTROL,
                                            NVSP_SECTION_INDEX_NONE, 0};
            memcpy(nvsp, &m, sizeof m);
            uint16_t pageset = (uint16_t)n->recv_buf_id;
            apply_fault(n, &rg, 1, nvsp, &pageset);
            rc = uvb_out_xfer_pages(q->out, VMBUS_PKT_FLAG_COMPLETION_REQUESTED, id, pageset, 0, &rg, 1,
                                    nvsp, n->msg_size ? n->msg_size : 40u);
            if (rc == 0) {
                np->next[id] = END_ID;
                __atomic_store_n(&np->state[id], (uint8_t)ST_HEAD, __ATOMIC_RELEASE);
            } else {
                pool_push(&np->ctrl, id);
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
        struct pool *p = pool_of(np, id);
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
 * rejects (the message then completes with FAILURE). */
static int tx_frame(struct uvb_nvsp_queue *q, const uint8_t *f, uint32_t len, uint32_t csum_info,
                    int has_csum, int vlan, uint32_t tci)
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
    uint32_t flags = 0;
    const uint8_t *out = f;
    if (has_csum && (csum_info & (CSUM_TX_TCP | CSUM_TX_UDP | CSUM_TX_IP_HDR))) {
        memcpy(qp->frame, f, len);
        if (tx_csum_offload(qp->frame, len, csum_info))
            return -1;
        out = qp->frame;
        flags |= UVB_NVSP_META_CSUM_OK;
    }
    if (backend == UVB_NVSP_BACKEND_LOOPBACK) {
        if (vlan)
            flags |= UVB_NVSP_META_VLAN;
        route_frame(q, out, len, flags, tci);
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
        uint32_t csum = 0, tci = 0;
        int has_csum = 0, vlan = 0;
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
                    } else if (t == PPI_TCP_LARGESEND && v) {
                        return NVSP_STAT_FAIL;  /* LSO is not offered by this host */
                    }
                }
                p += e.size;
                left -= e.size;
            }
        } else if (first && (8ull + RNDIS_PPI_OFFSET_DEFAULT > first_contig ||
                             8ull + RNDIS_PPI_OFFSET_DEFAULT > first_page_room)) {
            return NVSP_STAT_FAIL;
        }
        if (tx_frame(q, s + off + 8 + h.data_offset, h.data_len, csum, has_csum, vlan, tci))
            return NVSP_STAT_FAIL;
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
static int handle_packet(struct uvb_nvsp_queue *q, const uint8_t *buf, const struct uvb_pkt *p,
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
    int rc = handle_packet(q, pkt, &p, &comp, &status);
    if (rc)
        return rc;
    return comp ? (int)(0x100u | status) : 0;
}

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
        work += send_ctrl(q, &ring_full);
    if (!inbox_empty(QP(q))) {
        work += drain_inbox(q, &nobuf);
        if (nobuf == 2)
            ring_full = 1;
    }
    if (n->backend == UVB_NVSP_BACKEND_GENERATOR && rx_open(n) && !ring_full)
        work += generate(q, 1024, &ring_full);
    if (QP(q)->batch_n) {
        int rc = flush_batch(q);
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
                rc = handle_packet(q, qp->scratch, p, &comp, &status);
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
                    crc = uvb_out_want_space(out, comp_need + 4096);
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
                rc = uvb_out_want_space(out, 8192);
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
        cpu_relax();
    next_round:;
    }
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
    int ok = t && t->priv && inbox_push(QP(t), frame, len, flags, vlan_tci) == 0;
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
