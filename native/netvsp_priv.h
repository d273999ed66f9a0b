/*
 * Private declarations shared by the NetVSP fast-path sources (not part of the cffi API:
 * native/uvmbus.h does not include this file).  The data plane is split by concept:
 *
 *   netvsp_buf.c      receive-buffer sub-allocation pools, queue set-up
 *   netvsp_steer.c    RSS (Toeplitz, queue choice) and checksums (RX verification, TX offload)
 *   netvsp_rx.c       per-queue inbox, RX frames written into sub-allocations, XFER_PAGES batches
 *   netvsp_ctrl.c     control messages the model posted (RNDIS responses/indications, in-band NVSP)
 *   netvsp_tx.c       packets from the guest: RX acks, SEND_RNDIS_PKT data (sections, GPA ranges)
 *   netvsp_lso.c      large sends (LSOv2 PPI) cut into TCP segments as the host's NIC would
 *   netvsp_backend.c  frame sources: the generator, external frames (TAP fd, injection)
 *   netvsp.c          the pump (host.h contract) tying them together
 *
 * See netvsp.h for the design and the reference sections.
 */
#ifndef UVB_NETVSP_PRIV_H
#define UVB_NETVSP_PRIV_H

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
    uint32_t seq;               /* TCP: next sequence number of this flow */
};

struct queue_priv {
    uint8_t *scratch;
    struct uvb_pkt *pkts;
    uint8_t *stream;            /* gathered GPA-direct bytes */
    uint8_t *frame;             /* modified frame copy (offloads, VLAN insert) */
    uint8_t *seg;               /* the segment of a large send being emitted */
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
    /* RSC: coalescing units open during one pump pass (netvsp_rsc.c) */
    struct rsc_unit *rsc;       /* UVB_NVSP_RSC_FLOWS of them, allocated when RSC is first used */
    uint16_t rsc_pkt_id;
};

static inline struct nic_priv *NP(const struct uvb_nvsp *n) { return (struct nic_priv *)n->priv; }
static inline struct queue_priv *QP(const struct uvb_nvsp_queue *q) { return (struct queue_priv *)q->priv; }

static inline int punt(struct uvb_nvsp_queue *q, int fatal, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(q->punt_msg, sizeof q->punt_msg, fmt, ap);
    va_end(ap);
    q->punt_fatal = fatal ? 1u : 0u;
    return UVB_HOST_SLOWPATH;
}

/* ---- shared between the sources ---------------------------------------- */

static inline int inbox_empty(struct queue_priv *qp)
{
    return __atomic_load_n(&qp->ib_tail, __ATOMIC_ACQUIRE) == qp->ib_head;
}

static inline int rx_open(const struct uvb_nvsp *n)
{
    return n->data_ready && n->filter && n->link_up && !n->dead;
}

/* hands one frame to the backend: 0, or -1 (the message completes with FAILURE) */
typedef int (*nvsp_emit_fn)(struct uvb_nvsp_queue *q, const uint8_t *f, uint32_t len, int vlan,
                            uint32_t tci);
int nvsp_tx_lso(struct uvb_nvsp_queue *q, const uint8_t *f, uint32_t len, uint32_t ppi, int vlan,
                uint32_t tci, nvsp_emit_fn emit);
void nvsp_apply_fault(struct uvb_nvsp *n, struct vmtransfer_page_range *rg, uint32_t nr,
                        uint8_t *nvsp, uint16_t *pageset);
uint32_t nvsp_csum_add(uint32_t sum, const uint8_t *p, uint32_t len);
uint16_t nvsp_csum_fold(uint32_t sum);
uint32_t nvsp_drain_inbox(struct uvb_nvsp_queue *q, int *blocked);
int nvsp_rsc_on(const struct uvb_nvsp *n);
int nvsp_rsc_offer(struct uvb_nvsp_queue *q, const uint8_t *f, uint32_t len, uint32_t flags, uint32_t tci);
int nvsp_rsc_flush_all(struct uvb_nvsp_queue *q);
int nvsp_rsc_write(struct uvb_nvsp_queue *q, const uint8_t *f, uint32_t len, uint32_t csum, int vlan,
                   uint32_t tci, uint32_t segs);
int nvsp_rsc_write_gen(struct uvb_nvsp_queue *q, const uint8_t *hdr, uint32_t hdr_len, uint32_t tcp_seq,
                       const uint8_t *payload, uint32_t pl, uint32_t k, uint64_t seq0, int hashed,
                       uint32_t hash, uint32_t htype);
void nvsp_rsc_free(struct queue_priv *qp);
int nvsp_deliver(struct uvb_nvsp_queue *q, const uint8_t *f, uint32_t len, uint32_t flags, uint32_t tci);
int nvsp_flush_batch(struct uvb_nvsp_queue *q);
uint32_t nvsp_generate(struct uvb_nvsp_queue *q, uint32_t max, int *blocked);
int nvsp_handle_packet(struct uvb_nvsp_queue *q, const uint8_t *buf, const struct uvb_pkt *p,
                         int *comp, uint32_t *status);
int nvsp_inbox_push(struct queue_priv *qp, const uint8_t *f, uint32_t len, uint32_t flags,
                      uint32_t tci);
uint16_t nvsp_l4_csum(const uint8_t *ip, int v6, const uint8_t *l4, uint32_t l4len, uint8_t proto);
struct pool *nvsp_pool_of(struct nic_priv *np, uint32_t id);
uint32_t nvsp_pool_pop_many(struct pool *p, uint32_t *out, uint32_t want);
void nvsp_pool_push(struct pool *p, uint32_t id);
uint32_t nvsp_queue_for_hash(const struct uvb_nvsp *n, uint32_t hash, uint32_t type);
void nvsp_release_batch(struct uvb_nvsp_queue *q);
void nvsp_route_frame(struct uvb_nvsp_queue *q, const uint8_t *f, uint32_t len, uint32_t flags,
                        uint32_t tci);
uint32_t nvsp_rx_csum_info(const uint8_t *f, uint32_t len, int known_good);
uint32_t nvsp_send_ctrl(struct uvb_nvsp_queue *q, int *blocked);
int nvsp_tx_csum_offload(uint8_t *f, uint32_t len, uint32_t info);
void nvsp_write_rx_header(const struct uvb_nvsp *n, uint8_t *sub, uint32_t len, uint32_t csum,
                            int vlan, uint32_t tci, int hashed, uint32_t hash, uint32_t htype);

#endif
