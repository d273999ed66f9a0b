/*
 * netvsc guest data path: see netvsc.h.  Protocol: ../shared/reference/netvsc.md §4–§6.
 *
 * Everything the host controls is validated from private copies: ring packets are copied
 * out by uvb_in_read; RNDIS headers and PPIs in the receive buffer are copied into locals
 * before any offset derived from them is used.  A malformed packet is acked with status 2
 * (so the host gets its buffers back), counted in host_errors and described in errmsg.
 */
#define _GNU_SOURCE
#include "uvmbus.h"
#include "util.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The receive queue's bounds.  The fuzz build (fuzz/build.py) makes them small so that its
 * floods reach the full-queue paths (drop_oldest_data) in a few hundred packets. */
#ifndef IB_BYTES
#define IB_BYTES (4u << 20)
#endif
#ifndef IB_PKTS
#define IB_PKTS 8192u
#endif
#define ACK_CAP 16384u
#define CTRL_MAX_RECORDS 4096u
#define CTRL_MAX_LEN (64u << 10)   /* one control record (Python reads records into 64 KiB) */
#define CTRL_MAX_BYTES (16u << 20) /* all queued control records together */
#define RX_FILL_BUDGET 8u          /* ring batches one rx_burst may read (bounded work per call) */
#define SEC_MAX_FRAMES 0xFFFEu     /* sec_frames is 16-bit and 0xFFFF means "free" */
#define NVSP_LEN 40u
#define CONSUMED 0u
#define RANGE_BAD 0x80000000u      /* uvb_pkt.reserved: packet had an invalid range */
#define RANGE_MASK 0x0000FFFFu

struct ctrl_node {
    struct ctrl_node *next;
    struct uvb_nvsc_ctrl rec;
    uint8_t data[];
};

struct nvsc_priv {
    uint8_t *ib;
    uint32_t ib_used;
    struct uvb_pkt *pk;
    uint32_t npk, cur;
    uint32_t scanned;           /* poll_ctrl examined [cur, scanned): only data packets left */
    uint64_t *acks;
    uint32_t *ack_status;
    uint32_t nacks;
    uint64_t *held;
    uint32_t *held_status;
    uint32_t nheld;
    uint32_t *sec_free;
    uint32_t nsec_free;
    uint16_t *sec_frames;       /* frames in each in-flight section (0xFFFF = free) */
    uint32_t *slot_free;
    uint32_t nslot_free;
    uint8_t *slot_busy;
    struct ctrl_node *cq_head, *cq_tail;
    uint32_t cq_count;
    uint64_t cq_bytes;
    uint64_t rsc_used;          /* bytes of q->rsc_buf used by the current zero-copy burst */
};

static struct nvsc_priv *P(struct uvb_nvsc_queue *q) { return (struct nvsc_priv *)q->priv; }

static inline uint32_t rd32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint32_t ring_bytes(uint32_t payload, uint32_t ext)
{
    return ((DESC + ext + payload + 7u) & ~7u) + TRAILER;
}

static void host_error(struct uvb_nvsc_queue *q, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(q->errmsg, sizeof q->errmsg, fmt, ap);
    va_end(ap);
    q->host_errors++;
}

/* ------------------------------------------------------------------------ */
/* setup                                                                     */

static void free_ctrl_records(struct nvsc_priv *p)
{
    struct ctrl_node *c = p->cq_head;
    while (c) {
        struct ctrl_node *n = c->next;
        free(c);
        c = n;
    }
    p->cq_head = p->cq_tail = NULL;
    p->cq_count = 0;
    p->cq_bytes = 0;
}

/* Every section and bounce slot free, nothing queued (the state right after init). */
static void reset_lists(struct uvb_nvsc_queue *q)
{
    struct nvsc_priv *p = P(q);
    p->ib_used = p->npk = p->cur = p->nacks = p->nheld = p->scanned = 0;
    p->nsec_free = p->nslot_free = 0;
    for (uint32_t i = q->section_count; i-- > 0;) {
        p->sec_free[p->nsec_free++] = q->section_first + i;
        p->sec_frames[i] = 0xFFFF;
    }
    for (uint32_t i = q->gpa_slots; i-- > 0;) {
        p->slot_free[p->nslot_free++] = i;
        p->slot_busy[i] = 0;
    }
}

int uvb_nvsc_queue_init(struct uvb_nvsc_queue *q)
{
    if (!q->tx || !q->rx || !q->sig || !q->recv_buf || !q->send_buf || !q->section_size ||
        (uint64_t)(q->section_first + (uint64_t)q->section_count) * q->section_size > q->send_size ||
        q->section_count == 0 || q->section_count > 0xFFFFFF)
        return UVB_EINVAL;
    if (q->gpa_slots && (!q->gpa_base || !q->gpa_pfns || q->gpa_slot_size < 4096 || (q->gpa_slot_size & 4095u)))
        return UVB_EINVAL;
    if (!q->max_pkt_per_msg)
        q->max_pkt_per_msg = 1;
    if (q->pkt_align < 4)
        q->pkt_align = 4;
    if (q->pkt_align & (q->pkt_align - 1))
        return UVB_EINVAL;
    if (!q->max_xfer)
        q->max_xfer = q->section_size;
    if (q->ack_size < 8 || q->ack_size > NVSP_LEN)
        q->ack_size = 8;
    if (!q->max_frame)
        q->max_frame = 1514;
    struct nvsc_priv *p = calloc(1, sizeof *p);
    if (!p)
        return UVB_EINVAL;
    q->priv = p;
    p->ib = malloc(IB_BYTES);
    p->pk = calloc(IB_PKTS, sizeof *p->pk);
    p->acks = calloc(ACK_CAP, sizeof *p->acks);
    p->ack_status = calloc(ACK_CAP, sizeof *p->ack_status);
    p->held = calloc(ACK_CAP, sizeof *p->held);
    p->held_status = calloc(ACK_CAP, sizeof *p->held_status);
    p->sec_free = calloc(q->section_count, sizeof *p->sec_free);
    p->sec_frames = calloc(q->section_count, sizeof *p->sec_frames);
    if (q->gpa_slots) {
        p->slot_free = calloc(q->gpa_slots, sizeof *p->slot_free);
        p->slot_busy = calloc(q->gpa_slots, 1);
    }
    if (!p->ib || !p->pk || !p->acks || !p->ack_status || !p->held || !p->held_status ||
        !p->sec_free || !p->sec_frames || (q->gpa_slots && (!p->slot_free || !p->slot_busy))) {
        uvb_nvsc_queue_fini(q);
        return UVB_EINVAL;
    }
    reset_lists(q);
    return 0;
}

void uvb_nvsc_queue_fini(struct uvb_nvsc_queue *q)
{
    struct nvsc_priv *p = P(q);
    if (!p)
        return;
    free(p->ib);
    free(p->pk);
    free(p->acks);
    free(p->ack_status);
    free(p->held);
    free(p->held_status);
    free(p->sec_free);
    free(p->sec_frames);
    free(p->slot_free);
    free(p->slot_busy);
    free_ctrl_records(p);
    free(p);
    q->priv = NULL;
    free(q->rsc_buf);
    q->rsc_buf = NULL;
    q->rsc_size = 0;
}

int uvb_nvsc_queue_reset(struct uvb_nvsc_queue *q)
{
    struct nvsc_priv *p = P(q);
    if (!p)
        return UVB_EINVAL;
    free_ctrl_records(p);
    reset_lists(q);
    memset(q->errmsg, 0, sizeof q->errmsg);
    q->rsc_in_burst = 0;
    memset(&q->rx_packets, 0, sizeof *q - offsetof(struct uvb_nvsc_queue, rx_packets));
    return 0;
}

uint32_t uvb_nvsc_tx_inflight(struct uvb_nvsc_queue *q)
{
    struct nvsc_priv *p = P(q);
    if (!p)
        return 0;
    return (q->section_count - p->nsec_free) + (q->gpa_slots - p->nslot_free);
}

/* ------------------------------------------------------------------------ */
/* control records                                                           */

/* Queue a control record (a private copy of `data`).  The host picks `len` (up to a whole
 * receive-buffer range), so records are truncated to CTRL_MAX_LEN and the queue is bounded
 * in records and bytes.  Returns the node, or NULL when the record was dropped. */
static struct ctrl_node *ctrl_push(struct uvb_nvsc_queue *q, uint32_t kind, uint64_t tid,
                                   uint32_t status, const uint8_t *data, uint32_t len)
{
    struct nvsc_priv *p = P(q);
    if (len > CTRL_MAX_LEN)
        len = CTRL_MAX_LEN;
    if (p->cq_count >= CTRL_MAX_RECORDS || p->cq_bytes + len > CTRL_MAX_BYTES) {
        q->ctrl_dropped++;
        return NULL;
    }
    struct ctrl_node *c = malloc(sizeof *c + len);
    if (!c) {
        q->ctrl_dropped++;
        return NULL;
    }
    c->next = NULL;
    c->rec.kind = kind;
    c->rec.len = len;
    c->rec.trans_id = tid;
    c->rec.status = status;
    c->rec.reserved = 0;
    if (len)
        memcpy(c->data, data, len);
    if (p->cq_tail)
        p->cq_tail->next = c;
    else
        p->cq_head = c;
    p->cq_tail = c;
    p->cq_count++;
    p->cq_bytes += len;
    q->rx_ctrl++;
    return c;
}

int uvb_nvsc_ctrl_next(struct uvb_nvsc_queue *q, struct uvb_nvsc_ctrl *rec, uint8_t *buf,
                       uint32_t buflen)
{
    struct nvsc_priv *p = P(q);
    if (!p)
        return UVB_EINVAL;
    struct ctrl_node *c = p->cq_head;
    if (!c)
        return 0;
    p->cq_head = c->next;
    if (!p->cq_head)
        p->cq_tail = NULL;
    p->cq_count--;
    p->cq_bytes -= c->rec.len;
    *rec = c->rec;
    uint32_t n = c->rec.len < buflen ? c->rec.len : buflen;
    if (n)
        memcpy(buf, c->data, n);
    rec->len = n;
    free(c);
    return (int)(n ? n : 1);
}

/* ------------------------------------------------------------------------ */
/* acks                                                                      */

static int flush_acks(struct uvb_nvsc_queue *q)
{
    struct nvsc_priv *p = P(q);
    uint32_t done = 0;
    uint8_t msg[NVSP_LEN] = {0};
    struct nvsp_send_rndis_pkt_complete c = {NVSP_MSG1_TYPE_SEND_RNDIS_PKT_COMPLETE, NVSP_STAT_SUCCESS};
    while (done < p->nacks) {
        c.status = p->ack_status[done];
        memcpy(msg, &c, sizeof c);
        int rc = uvb_out_inband(q->tx, VMBUS_PKT_COMP, 0, p->acks[done], msg, q->ack_size);
        if (rc == UVB_EAGAIN)
            break;                          /* ring full: keep the rest for later */
        if (rc < 0)
            return rc;
        done++;
    }
    q->rx_acks += done;
    if (done) {
        memmove(p->acks, p->acks + done, (p->nacks - done) * sizeof *p->acks);
        memmove(p->ack_status, p->ack_status + done, (p->nacks - done) * sizeof *p->ack_status);
        p->nacks -= done;
    }
    int rc = uvb_out_commit_signal(q->tx, q->sig);
    return rc < 0 ? rc : 0;
}

static int ack(struct uvb_nvsc_queue *q, uint64_t tid, uint32_t status)
{
    struct nvsc_priv *p = P(q);
    if (p->nacks >= ACK_CAP) {
        int rc = flush_acks(q);
        if (rc < 0)
            return rc;
        if (p->nacks >= ACK_CAP)
            return UVB_EAGAIN;
    }
    p->acks[p->nacks] = tid;
    p->ack_status[p->nacks++] = status;
    return 0;
}

int uvb_nvsc_rx_release(struct uvb_nvsc_queue *q)
{
    struct nvsc_priv *p = P(q);
    if (!p)
        return UVB_EINVAL;
    uint32_t i = 0;
    for (; i < p->nheld && p->nacks < ACK_CAP; i++) {
        p->acks[p->nacks] = p->held[i];
        p->ack_status[p->nacks++] = p->held_status[i];
    }
    if (i < p->nheld) {
        memmove(p->held, p->held + i, (p->nheld - i) * sizeof *p->held);
        memmove(p->held_status, p->held_status + i, (p->nheld - i) * sizeof *p->held_status);
    }
    p->nheld -= i;
    return flush_acks(q);
}

int uvb_nvsc_flush(struct uvb_nvsc_queue *q)
{
    if (!P(q))
        return UVB_EINVAL;
    return flush_acks(q);
}

/* ------------------------------------------------------------------------ */
/* completions                                                               */

static void handle_comp(struct uvb_nvsc_queue *q, const uint8_t *payload, uint32_t len, uint64_t tid)
{
    struct nvsc_priv *p = P(q);
    uint64_t kind = tid & UVB_NVSC_TID_KIND;
    uint32_t idx = (uint32_t)(tid & UVB_NVSC_TID_INDEX);
    if (kind != UVB_NVSC_TID_DATA && kind != UVB_NVSC_TID_CTRL && kind != UVB_NVSC_TID_GPA) {
        ctrl_push(q, UVB_NVSC_CTRL_COMP, tid, 0, payload, len);
        return;
    }
    if (len < 8 || rd32(payload) != NVSP_MSG1_TYPE_SEND_RNDIS_PKT_COMPLETE) {
        host_error(q, "completion for transaction %#llx is not SEND_RNDIS_PKT_COMPLETE (type %u, %u bytes)",
                   (unsigned long long)tid, len >= 4 ? rd32(payload) : 0u, len);
        return;
    }
    uint32_t status = rd32(payload + 4);
    if (tid & ~(uint64_t)(UVB_NVSC_TID_KIND | UVB_NVSC_TID_INDEX)) {
        host_error(q, "completion with malformed transaction id %#llx", (unsigned long long)tid);
        return;
    }
    if (kind == UVB_NVSC_TID_GPA) {
        if (idx >= q->gpa_slots || !p->slot_busy[idx]) {
            host_error(q, "completion for GPA slot %u that is not in flight", idx);
            return;
        }
        p->slot_busy[idx] = 0;
        p->slot_free[p->nslot_free++] = idx;
        q->tx_completions++;
        if (status != NVSP_STAT_SUCCESS)
            q->tx_failed++;
        return;
    }
    if (idx < q->section_first || idx - q->section_first >= q->section_count ||
        p->sec_frames[idx - q->section_first] == 0xFFFF) {
        host_error(q, "completion for send section %u that is not in flight on this queue", idx);
        return;
    }
    uint32_t frames = p->sec_frames[idx - q->section_first];
    p->sec_frames[idx - q->section_first] = 0xFFFF;
    p->sec_free[p->nsec_free++] = idx;
    q->tx_completions++;
    if (kind == UVB_NVSC_TID_CTRL) {
        if (status != NVSP_STAT_SUCCESS)
            ctrl_push(q, UVB_NVSC_CTRL_SENDFAIL, tid, status, NULL, 0);
    } else if (status != NVSP_STAT_SUCCESS) {
        q->tx_failed += frames;
    }
}

/* ------------------------------------------------------------------------ */
/* reading the ring                                                          */

static void compact(struct nvsc_priv *p)
{
    if (p->cur == 0)
        return;
    if (p->cur >= p->npk) {
        p->npk = p->cur = p->scanned = 0;
        p->ib_used = 0;
        return;
    }
    p->scanned = p->scanned > p->cur ? p->scanned - p->cur : 0;
    uint32_t base = p->pk[p->cur].pkt_offset;
    memmove(p->ib, p->ib + base, p->ib_used - base);
    uint32_t k = p->npk - p->cur;
    memmove(p->pk, p->pk + p->cur, k * sizeof *p->pk);
    for (uint32_t i = 0; i < k; i++) {
        p->pk[i].pkt_offset -= base;
        p->pk[i].data_offset -= base;
    }
    p->ib_used -= base;
    p->npk = k;
    p->cur = 0;
}

/* Read the RX ring into the packet queue; completions are handled at once.  Returns packets
 * read (>= 0), or < 0.  *full = 1 when the queue had no room while the ring had data. */
static int fill(struct uvb_nvsc_queue *q, int *full)
{
    struct nvsc_priv *p = P(q);
    *full = 0;
    while (p->cur < p->npk && p->pk[p->cur].type == CONSUMED)
        p->cur++;                       /* completions handled by an earlier fill */
    if (p->cur >= p->npk) {
        p->npk = p->cur = p->scanned = 0;
        p->ib_used = 0;
    } else if (p->cur > 0 && (IB_BYTES - p->ib_used < IB_BYTES / 4 || p->npk > IB_PKTS / 2)) {
        compact(p);
    }
    uint32_t room = IB_BYTES - p->ib_used, proom = IB_PKTS - p->npk;
    if (!proom || room < 4096) {
        *full = uvb_in_avail(q->rx) > 0;
        return 0;
    }
    int n = uvb_in_read(q->rx, p->ib + p->ib_used, room, p->pk + p->npk, proom);
    if (n == UVB_ENOBUFS) {
        *full = 1;
        return 0;
    }
    if (n <= 0)
        return n;
    uint32_t base = p->ib_used;
    for (int i = 0; i < n; i++) {
        struct uvb_pkt *k = &p->pk[p->npk + i];
        k->pkt_offset += base;
        k->data_offset += base;
        k->reserved = 0;
        if (k->type == VMBUS_PKT_COMP) {
            handle_comp(q, p->ib + k->data_offset, k->data_len, k->trans_id);
            k->type = CONSUMED;
        }
    }
    struct uvb_pkt *last = &p->pk[p->npk + n - 1];
    p->ib_used = last->pkt_offset + ((last->pkt_len + 7u) & ~7u);
    p->npk += (uint32_t)n;
    int rc = uvb_in_commit_signal(q->rx, q->sig);
    if (rc < 0)
        return rc;
    return n;
}

int uvb_nvsc_reap(struct uvb_nvsc_queue *q)
{
    if (!P(q))
        return UVB_EINVAL;
    int full;
    int n = fill(q, &full);
    return n;
}

int uvb_nvsc_rx_pending(struct uvb_nvsc_queue *q)
{
    struct nvsc_priv *p = P(q);
    if (!p)
        return UVB_EINVAL;
    for (uint32_t i = p->cur; i < p->npk; i++)
        if (p->pk[i].type != CONSUMED)
            return 1;
    if (p->nacks)
        flush_acks(q);
    int a = uvb_in_avail(q->rx);
    return a < 0 ? a : a > 0;
}

/* ------------------------------------------------------------------------ */
/* transfer-page packets                                                     */

struct xfer {
    uint16_t pageset;
    uint32_t count;
    const struct vmtransfer_page_range *ranges;
    uint32_t channel_type;
};

/* Validate the header of an XFER_PAGES packet.  0 or -1 (host error recorded). */
static int xfer_header(struct uvb_nvsc_queue *q, const struct uvb_pkt *k, struct xfer *x)
{
    struct nvsc_priv *p = P(q);
    const uint8_t *pkt = p->ib + k->pkt_offset;
    const uint8_t *payload = p->ib + k->data_offset;
    memcpy(&x->pageset, pkt + 16, 2);
    memcpy(&x->count, pkt + 20, 4);
    x->ranges = (const struct vmtransfer_page_range *)(pkt + 24);
    if (k->data_len < 8 || rd32(payload) != NVSP_MSG1_TYPE_SEND_RNDIS_PKT) {
        host_error(q, "transfer-page packet (tid %llu) carries NVSP message type %u, not SEND_RNDIS_PKT (107)",
                   (unsigned long long)k->trans_id, k->data_len >= 4 ? rd32(payload) : 0u);
        return -1;
    }
    x->channel_type = rd32(payload + 4);
    if (x->pageset != q->recv_buf_id) {
        host_error(q, "transfer-page packet (tid %llu) names page set %#x, the receive buffer is %#x",
                   (unsigned long long)k->trans_id, x->pageset, q->recv_buf_id);
        return -1;
    }
    if (x->count == 0) {
        host_error(q, "transfer-page packet (tid %llu) has no ranges", (unsigned long long)k->trans_id);
        return -1;
    }
    return 0;
}

/* Validate one range and copy its RNDIS header.  Returns the message length, or 0 (host
 * error recorded).  *hdr receives up to 44 bytes. */
static uint32_t range_msg(struct uvb_nvsc_queue *q, const struct vmtransfer_page_range *r,
                          uint64_t tid, struct rndis_packet *hdr)
{
    struct vmtransfer_page_range g;
    memcpy(&g, r, sizeof g);
    if ((uint64_t)g.byte_offset + g.byte_count > q->recv_size || g.byte_count < RNDIS_HEADER_SIZE) {
        host_error(q, "transfer-page packet (tid %llu): range [%#x, +%u) is outside the %llu-byte "
                   "receive buffer or too short", (unsigned long long)tid, g.byte_offset, g.byte_count,
                   (unsigned long long)q->recv_size);
        return 0;
    }
    memset(hdr, 0, sizeof *hdr);
    uint32_t n = g.byte_count < sizeof *hdr ? g.byte_count : (uint32_t)sizeof *hdr;
    memcpy(hdr, q->recv_buf + g.byte_offset, n);
    if (hdr->msg_len < RNDIS_HEADER_SIZE || hdr->msg_len > g.byte_count) {
        host_error(q, "transfer-page packet (tid %llu): RNDIS message type %#x claims %u bytes in a "
                   "%u-byte range", (unsigned long long)tid, hdr->msg_type, hdr->msg_len, g.byte_count);
        return 0;
    }
    return hdr->msg_len;
}

/* Parse an RNDIS PACKET at `off` (validated length msg_len) into a frame.  0 or -1.
 * *frag receives the RSC fragment flags of its RNDIS_PKTINFO_ID PPI (0: a whole frame);
 * a fragment may carry fewer than 14 bytes (the frame's length is checked once joined). */
static int parse_packet(struct uvb_nvsc_queue *q, uint64_t off, const struct rndis_packet *h,
                        uint64_t tid, struct uvb_nvsc_frame *f, uint32_t *frag)
{
    *frag = 0;
    if (h->msg_len < RNDIS_PACKET_SIZE) {
        host_error(q, "RNDIS PACKET (tid %llu) of %u bytes: shorter than its 44-byte header",
                   (unsigned long long)tid, h->msg_len);
        return -1;
    }
    uint64_t dend = 8ull + h->data_offset + h->data_len;
    if (h->data_offset < RNDIS_PPI_OFFSET_DEFAULT || h->data_len == 0 || dend > h->msg_len ||
        h->data_len > UVB_NVSC_MAX_FRAME) {
        host_error(q, "RNDIS PACKET (tid %llu): data offset %u length %u do not fit its %u-byte message",
                   (unsigned long long)tid, h->data_offset, h->data_len, h->msg_len);
        return -1;
    }
    f->offset = off + 8 + h->data_offset;
    f->len = h->data_len;
    f->hash = 0;
    f->csum = 0;
    f->vlan = 0;
    f->flags = 0;
    if (!h->per_pkt_info_len)
        goto whole;
    uint64_t pend = 8ull + h->per_pkt_info_offset + h->per_pkt_info_len;
    if (h->per_pkt_info_offset < RNDIS_PPI_OFFSET_DEFAULT || (h->per_pkt_info_offset & 3u) ||
        pend > h->msg_len || h->per_pkt_info_len > 1024) {
        host_error(q, "RNDIS PACKET (tid %llu): per-packet info at %u (+%u) outside its %u-byte message",
                   (unsigned long long)tid, h->per_pkt_info_offset, h->per_pkt_info_len, h->msg_len);
        return -1;
    }
    uint8_t ppi[1024];
    int seen_id = 0;
    uint32_t left = h->per_pkt_info_len;
    memcpy(ppi, q->recv_buf + off + 8 + h->per_pkt_info_offset, left);
    const uint8_t *e = ppi;
    while (left) {
        struct rndis_ppi hd;
        if (left < sizeof hd) {
            host_error(q, "RNDIS PACKET (tid %llu): %u stray bytes after the per-packet info",
                       (unsigned long long)tid, left);
            return -1;
        }
        memcpy(&hd, e, sizeof hd);
        if (hd.size < sizeof hd || hd.size > left || hd.ppi_offset < sizeof hd || hd.ppi_offset > hd.size) {
            host_error(q, "RNDIS PACKET (tid %llu): per-packet info element of size %u offset %u "
                       "(%u bytes left)", (unsigned long long)tid, hd.size, hd.ppi_offset, left);
            return -1;
        }
        if (hd.type == PPI_RNDIS_PKTINFO_ID && hd.ppi_offset + sizeof(struct rndis_pktinfo_id) <= hd.size) {
            /* RSC fragment id (L-r rndis_filter_receive_data): the first such element counts
             * (rndis_get_ppi), only its flags matter */
            if (!seen_id) {
                struct rndis_pktinfo_id id;
                memcpy(&id, e + hd.ppi_offset, sizeof id);
                seen_id = 1;
                if (id.flag & RNDIS_PKTINFO_SUBALLOC)
                    *frag = id.flag & (RNDIS_PKTINFO_SUBALLOC | RNDIS_PKTINFO_1ST_FRAG | RNDIS_PKTINFO_LAST_FRAG);
            }
        } else if (!(hd.type & PPI_INTERNAL_FLAG) && hd.ppi_offset + 4 <= hd.size) {
            uint32_t v = rd32(e + hd.ppi_offset);
            switch (hd.type) {
            case PPI_TCPIP_CHKSUM:
                f->csum = v;
                f->flags |= UVB_NVSC_F_CSUM;
                break;
            case PPI_IEEE_8021Q:
                f->vlan = (uint16_t)(((v & VLAN_PPI_PRIORITY_MASK) << 13) | ((v & VLAN_PPI_CFI) ? 0x1000u : 0u) |
                                     ((v & VLAN_PPI_VID_MASK) >> VLAN_PPI_VID_SHIFT));
                f->flags |= UVB_NVSC_F_VLAN;
                break;
            case PPI_HASH_VALUE:
                f->hash = v;
                f->flags |= UVB_NVSC_F_HASH;
                break;
            default:
                break;
            }
        }
        e += hd.size;
        left -= hd.size;
    }
whole:
    if (!*frag && h->data_len < 14) {
        host_error(q, "RNDIS PACKET (tid %llu): frame of %u bytes, shorter than an Ethernet header",
                   (unsigned long long)tid, h->data_len);
        return -1;
    }
    return 0;
}

/* Copy a non-PACKET RNDIS message (validated header *h, length len) to a control record.
 * 0, or -1 when the message is too large to be a control message (host error recorded). */
static int ctrl_msg(struct uvb_nvsc_queue *q, uint64_t off, uint32_t len, const struct rndis_packet *h,
                    uint64_t tid)
{
    if (len > CTRL_MAX_LEN) {
        host_error(q, "transfer-page packet (tid %llu): RNDIS control message type %#x of %u bytes "
                   "(more than %u)", (unsigned long long)tid, h->msg_type, len, CTRL_MAX_LEN);
        return -1;
    }
    struct ctrl_node *c = ctrl_push(q, UVB_NVSC_CTRL_RNDIS, 0, 0, q->recv_buf + off, len);
    if (c)      /* the buffer is shared: keep the type and length that were validated */
        memcpy(c->data, h, RNDIS_HEADER_SIZE);
    return 0;
}

/* Finish a transfer-page packet: queue (or hold) its ack. */
static int finish_xfer(struct uvb_nvsc_queue *q, struct uvb_pkt *k, int hold)
{
    struct nvsc_priv *p = P(q);
    uint32_t status = (k->reserved & RANGE_BAD) ? NVSP_STAT_FAIL : NVSP_STAT_SUCCESS;
    k->type = CONSUMED;
    q->rx_xfer++;
    if (hold && p->nheld < ACK_CAP) {
        p->held[p->nheld] = k->trans_id;
        p->held_status[p->nheld++] = status;
        return 0;
    }
    return ack(q, k->trans_id, status);
}

/* A control-channel transfer packet: every message becomes a record. */
static int control_xfer(struct uvb_nvsc_queue *q, struct uvb_pkt *k, const struct xfer *x)
{
    for (uint32_t r = 0; r < x->count; r++) {
        struct rndis_packet h;
        uint32_t len = range_msg(q, &x->ranges[r], k->trans_id, &h);
        if (!len) {
            k->reserved |= RANGE_BAD;
            continue;
        }
        if (h.msg_type == RNDIS_MSG_PACKET) {
            host_error(q, "RNDIS PACKET on the control channel (tid %llu)", (unsigned long long)k->trans_id);
            k->reserved |= RANGE_BAD;
            q->rx_drops++;
            continue;
        }
        struct vmtransfer_page_range g;
        memcpy(&g, &x->ranges[r], sizeof g);
        if (ctrl_msg(q, g.byte_offset, len, &h, k->trans_id))
            k->reserved |= RANGE_BAD;
    }
    return finish_xfer(q, k, 0);
}

/* RSC (netvsc.md §6; L-c netvsc_receive, L-r rndis_filter_receive_data, O rndisprot.rs
 * PacketIdInfo): one coalesced TCP segment arrives as consecutive ranges of ONE transfer-page
 * packet, each a complete RNDIS PACKET whose RNDIS_PKTINFO_ID PPI says SUBALLOC | 1ST_FRAG,
 * SUBALLOC, ..., SUBALLOC | LAST_FRAG.  The guest joins the fragments' data in order; the
 * frame's VLAN / checksum / hash come from the first fragment (L-r rsc_add_data).  A chain
 * that does not start with 1ST_FRAG, is interrupted (a plain packet, a new 1ST_FRAG, a control
 * message, an invalid fragment), runs past the packet's last range, holds more than
 * NVSP_RSC_MAX fragments or more than one IP datagram is dropped whole (counted in
 * rx_rsc_errors and rx_drops, the packet acked with status FAIL, like Linux).
 *
 * rsc_chain handles the chain whose first fragment (range r) parse_packet put in *f.
 * Returns 2: a one-fragment chain, *f is an ordinary frame; 1: *f is the joined frame (copied
 * to `out` at *used, or to q->rsc_buf for zero-copy); 0: dropped; -1: no room left in this
 * call (the caller stops and resumes at range r).  *next: the range to go on with. */
static int rsc_chain(struct uvb_nvsc_queue *q, struct uvb_pkt *k, const struct xfer *x, uint32_t r,
                     struct uvb_nvsc_frame *f, uint32_t frag, uint8_t *out, uint64_t cap,
                     uint64_t *used, uint32_t *next)
{
    struct nvsc_priv *p = P(q);
    uint64_t foff[NVSP_RSC_MAX];
    uint32_t flen[NVSP_RSC_MAX];
    uint32_t n = 0, j = r;
    uint64_t total = 0;
    int too_many = 0;
    const char *why;
    *next = r + 1;
    if (!(frag & RNDIS_PKTINFO_1ST_FRAG)) {
        why = "is a fragment of no chain (no 1ST_FRAG before it)";
        goto drop;
    }
    foff[n] = f->offset;
    flen[n++] = f->len;
    total = f->len;
    while (!(frag & RNDIS_PKTINFO_LAST_FRAG)) {
        if (++j >= x->count) {
            *next = j;
            why = "runs past the last range of its packet (no LAST_FRAG)";
            goto drop;
        }
        struct rndis_packet h;
        struct uvb_nvsc_frame g;
        uint32_t len = range_msg(q, &x->ranges[j], k->trans_id, &h);
        if (len && h.msg_type != RNDIS_MSG_PACKET) {
            *next = j;                  /* the control message is handled as usual */
            why = "is interrupted by an RNDIS control message";
            goto drop;
        }
        struct vmtransfer_page_range rg;
        memcpy(&rg, &x->ranges[j], sizeof rg);
        if (!len || parse_packet(q, rg.byte_offset, &h, k->trans_id, &g, &frag)) {
            *next = j + 1;              /* already reported by range_msg / parse_packet */
            why = "has an invalid fragment";
            goto drop;
        }
        if (!frag || (frag & RNDIS_PKTINFO_1ST_FRAG)) {
            *next = j;                  /* that packet / new chain is handled as usual */
            why = frag ? "is interrupted by a new chain (1ST_FRAG)" : "is interrupted by a whole frame";
            goto drop;
        }
        if (n >= NVSP_RSC_MAX) {
            too_many = 1;               /* walk on to its end, then drop it whole */
            continue;
        }
        foff[n] = g.offset;
        flen[n++] = g.len;
        total += g.len;
    }
    *next = j + 1;
    if (too_many) {
        why = "has more than NVSP_RSC_MAX (562) fragments";
        goto drop;
    }
    if (total > UVB_NVSC_MAX_RSC_FRAME) {
        why = "joins to more than one IP datagram (65549 bytes)";
        goto drop;
    }
    if (total < 14) {
        why = "joins to a frame shorter than an Ethernet header";
        goto drop;
    }
    if (n == 1)
        return 2;
    uint8_t *dst;
    if (out) {
        uint64_t at = (*used + 7u) & ~7ull;
        if (total > cap) {
            why = "joins to a frame larger than the copy buffer";
            goto drop;
        }
        if (at + total > cap)
            return -1;
        dst = out + at;
        f->offset = at;
        *used = at + total;
    } else {
        if (!q->rsc_buf) {
            q->rsc_buf = malloc(UVB_NVSC_RSC_BUF);
            if (!q->rsc_buf) {
                why = "cannot be joined (no memory for the reassembly buffer)";
                goto drop;
            }
            q->rsc_size = UVB_NVSC_RSC_BUF;
        }
        uint64_t at = (p->rsc_used + 7u) & ~7ull;
        if (at + total > q->rsc_size)
            return -1;
        dst = q->rsc_buf + at;
        f->offset = at;
        p->rsc_used = at + total;
    }
    /* offsets and lengths were validated against the ranges (private copies): the host can
     * change the bytes under us, never the bounds */
    for (uint32_t i = 0, pos = 0; i < n; pos += flen[i], i++)
        memcpy(dst + pos, q->recv_buf + foff[i], flen[i]);
    f->len = (uint32_t)total;
    f->flags |= UVB_NVSC_F_RSC;
    q->rx_rsc_frames++;
    q->rx_rsc_frags += n;
    return 1;
drop:
    host_error(q, "RSC fragment chain at range %u of transfer-page packet (tid %llu) %s: dropped",
               r, (unsigned long long)k->trans_id, why);
    q->rx_rsc_errors++;
    q->rx_drops++;
    k->reserved |= RANGE_BAD;
    return 0;
}

int uvb_nvsc_rx_burst(struct uvb_nvsc_queue *q, struct uvb_nvsc_frame *frames, uint32_t max,
                      uint8_t *copy_buf, uint64_t copy_cap)
{
    struct nvsc_priv *p = P(q);
    if (!p)
        return UVB_EINVAL;
    int zc = copy_buf == NULL;
    if (p->nheld) {
        int rc = uvb_nvsc_rx_release(q);
        if (rc < 0)
            return rc;
    }
    p->rsc_used = 0;                    /* the last zero-copy burst was given back */
    q->rsc_in_burst = 0;
    uint32_t nf = 0, fills = 0;
    uint64_t used = 0;
    int stop = 0;
    while (nf < max && !stop) {
        if (p->cur >= p->npk) {
            /* bounded work per call: a host that keeps the ring full of packets that are
             * not frames (completions, control, malformed) must not pin us here forever */
            if (fills++ >= RX_FILL_BUDGET)
                break;
            int full;
            int rc = fill(q, &full);
            if (rc < 0)
                return rc;
            if (rc == 0)
                break;
            continue;
        }
        struct uvb_pkt *k = &p->pk[p->cur];
        if (k->type == CONSUMED) {
            p->cur++;
            continue;
        }
        if (k->type == VMBUS_PKT_INBAND) {
            ctrl_push(q, UVB_NVSC_CTRL_INBAND, k->trans_id, 0, p->ib + k->data_offset, k->data_len);
            k->type = CONSUMED;
            p->cur++;
            continue;
        }
        if (k->type != VMBUS_PKT_XFER_PAGES) {
            host_error(q, "unexpected packet type %u from the host (tid %llu)", k->type,
                       (unsigned long long)k->trans_id);
            if (k->flags & VMBUS_PKT_FLAG_COMPLETION_REQUESTED)
                ack(q, k->trans_id, NVSP_STAT_FAIL);
            k->type = CONSUMED;
            p->cur++;
            continue;
        }
        struct xfer x;
        if (xfer_header(q, k, &x)) {
            k->reserved |= RANGE_BAD;
            q->rx_drops++;
            int rc = finish_xfer(q, k, 0);
            if (rc < 0)
                return rc;
            p->cur++;
            continue;
        }
        if (x.channel_type == NVSP_CHANNEL_TYPE_CONTROL) {
            int rc = control_xfer(q, k, &x);
            if (rc < 0)
                return rc;
            p->cur++;
            continue;
        }
        uint32_t r = k->reserved & RANGE_MASK;
        int gave = 0;
        for (; r < x.count; r++) {
            if (nf >= max) {
                stop = 1;
                break;
            }
            if (r + 4 < x.count) {
                /* the host wrote these lines on another CPU: start fetching early */
                struct vmtransfer_page_range nx;
                memcpy(&nx, &x.ranges[r + 4], sizeof nx);
                if ((uint64_t)nx.byte_offset + 320 <= q->recv_size) {
                    __builtin_prefetch(q->recv_buf + nx.byte_offset, 0, 3);
                    __builtin_prefetch(q->recv_buf + nx.byte_offset + 256, 0, 3);
                }
            }
            struct rndis_packet h;
            uint32_t len = range_msg(q, &x.ranges[r], k->trans_id, &h);
            if (!len) {
                k->reserved |= RANGE_BAD;
                q->rx_drops++;
                continue;
            }
            struct vmtransfer_page_range g;
            memcpy(&g, &x.ranges[r], sizeof g);
            if (h.msg_type != RNDIS_MSG_PACKET) {
                if (ctrl_msg(q, g.byte_offset, len, &h, k->trans_id)) {
                    k->reserved |= RANGE_BAD;
                    q->rx_drops++;
                }
                continue;
            }
            struct uvb_nvsc_frame *f = &frames[nf];
            uint32_t frag;
            if (parse_packet(q, g.byte_offset, &h, k->trans_id, f, &frag)) {
                k->reserved |= RANGE_BAD;
                q->rx_drops++;
                continue;
            }
            if (frag) {
                uint32_t next;
                int rc = rsc_chain(q, k, &x, r, f, frag, zc ? NULL : copy_buf, copy_cap, &used, &next);
                if (rc < 0) {
                    stop = 1;                   /* resume at this chain's first range */
                    break;
                }
                if (rc != 2) {
                    if (rc == 1) {
                        q->rx_packets++;
                        q->rx_bytes += f->len;
                        q->rsc_in_burst++;
                        nf++;
                        gave = 1;
                    }
                    r = next - 1;               /* the loop steps to `next` */
                    continue;
                }
            }
            if (!zc) {
                uint64_t at = (used + 7u) & ~7ull;
                if (f->len > copy_cap) {
                    /* can never fit: dropping it is the only way forward (stopping here would
                     * leave this packet unacked and every later call stuck on it) */
                    host_error(q, "RNDIS PACKET (tid %llu): frame of %u bytes exceeds the %llu-byte "
                               "copy buffer", (unsigned long long)k->trans_id, f->len,
                               (unsigned long long)copy_cap);
                    q->rx_drops++;
                    continue;
                }
                if (at + f->len > copy_cap) {
                    stop = 1;
                    break;
                }
                memcpy(copy_buf + at, q->recv_buf + f->offset, f->len);
                f->offset = at;
                used = at + f->len;
            }
            q->rx_packets++;
            q->rx_bytes += f->len;
            nf++;
            gave = 1;
        }
        k->reserved = (k->reserved & ~RANGE_MASK) | (r & RANGE_MASK);
        if (r < x.count)
            break;                              /* resume this packet next time */
        /* zero-copy: frames of this packet are in the caller's hands until released */
        int rc = finish_xfer(q, k, zc && gave);
        if (rc < 0)
            return rc;
        p->cur++;
    }
    int rc = flush_acks(q);
    if (rc < 0)
        return rc;
    return (int)nf;
}

/* ------------------------------------------------------------------------ */
/* control plane                                                             */

/* Drop the oldest data packet in the queue (acking it) to make room. 1 dropped, 0 none. */
static int drop_oldest_data(struct uvb_nvsc_queue *q)
{
    struct nvsc_priv *p = P(q);
    for (uint32_t i = p->cur; i < p->npk; i++) {
        struct uvb_pkt *k = &p->pk[i];
        if (k->type != VMBUS_PKT_XFER_PAGES)
            continue;
        struct xfer x;
        if (xfer_header(q, k, &x) == 0 && x.channel_type == NVSP_CHANNEL_TYPE_CONTROL)
            continue;
        q->rx_drops += xfer_header(q, k, &x) == 0 ? x.count - (k->reserved & RANGE_MASK) : 1;
        finish_xfer(q, k, 0);
        while (p->cur < p->npk && p->pk[p->cur].type == CONSUMED)
            p->cur++;
        return 1;
    }
    return 0;
}

int uvb_nvsc_poll_ctrl(struct uvb_nvsc_queue *q)
{
    struct nvsc_priv *p = P(q);
    if (!p)
        return UVB_EINVAL;
    for (int round = 0; round < 64; round++) {
        int full;
        int rc = fill(q, &full);
        if (rc < 0)
            return rc;
        /* packets an earlier call examined are data packets waiting for rx_burst: looking
         * at them again finds nothing, and would make a flood cost O(queue) per call */
        for (uint32_t i = p->scanned > p->cur ? p->scanned : p->cur; i < p->npk; i++) {
            struct uvb_pkt *k = &p->pk[i];
            if (k->type == VMBUS_PKT_INBAND) {
                ctrl_push(q, UVB_NVSC_CTRL_INBAND, k->trans_id, 0, p->ib + k->data_offset, k->data_len);
                k->type = CONSUMED;
            } else if (k->type == VMBUS_PKT_XFER_PAGES && !(k->reserved & RANGE_MASK)) {
                struct xfer x;
                if (xfer_header(q, k, &x)) {
                    k->reserved |= RANGE_BAD;
                    q->rx_drops++;
                    int r2 = finish_xfer(q, k, 0);
                    if (r2 < 0)
                        return r2;                  /* the real cause (e.g. no ring space) */
                } else if (x.channel_type == NVSP_CHANNEL_TYPE_CONTROL) {
                    int r2 = control_xfer(q, k, &x);
                    if (r2 < 0)
                        return r2;
                }
            } else if (k->type != CONSUMED && k->type != VMBUS_PKT_XFER_PAGES) {
                host_error(q, "unexpected packet type %u from the host", k->type);
                k->type = CONSUMED;
            }
        }
        p->scanned = p->npk;
        while (p->cur < p->npk && p->pk[p->cur].type == CONSUMED)
            p->cur++;
        if (full) {
            /* drop a quarter of the waiting data at once: one compaction then frees room
             * for many packets (dropping one at a time moved the whole queue per packet) */
            uint32_t want = (p->npk - p->cur) / 4 + 1, dropped = 0;
            while (dropped < want && drop_oldest_data(q))
                dropped++;
            if (!dropped)
                break;
            continue;
        }
        if (rc == 0)
            break;
    }
    int rc = flush_acks(q);
    return rc < 0 ? rc : (int)p->cq_count;
}

static int take_section(struct uvb_nvsc_queue *q, uint32_t *sec)
{
    struct nvsc_priv *p = P(q);
    if (!p->nsec_free) {
        int full;
        int rc = fill(q, &full);
        if (rc < 0)
            return rc;
        if (!p->nsec_free)
            return UVB_EAGAIN;
    }
    *sec = p->sec_free[--p->nsec_free];
    return 0;
}

static void give_section(struct uvb_nvsc_queue *q, uint32_t sec)
{
    struct nvsc_priv *p = P(q);
    p->sec_frames[sec - q->section_first] = 0xFFFF;
    p->sec_free[p->nsec_free++] = sec;
}

static int send_section(struct uvb_nvsc_queue *q, uint32_t sec, uint32_t used, uint32_t chtype,
                        uint64_t kind, uint32_t frames)
{
    uint8_t msg[NVSP_LEN] = {0};
    struct nvsp_send_rndis_pkt m = {NVSP_MSG1_TYPE_SEND_RNDIS_PKT, chtype, sec, used};
    memcpy(msg, &m, sizeof m);
    int rc = uvb_out_inband(q->tx, VMBUS_PKT_INBAND, VMBUS_PKT_FLAG_COMPLETION_REQUESTED, kind | sec,
                            msg, NVSP_LEN);
    if (rc == 0) {
        P(q)->sec_frames[sec - q->section_first] = (uint16_t)frames;
        q->tx_msgs++;
    }
    return rc;
}

int uvb_nvsc_send_ctrl(struct uvb_nvsc_queue *q, const uint8_t *msg, uint32_t len)
{
    if (!P(q))
        return UVB_EINVAL;
    if (len > q->section_size || len < RNDIS_HEADER_SIZE)
        return UVB_EINVAL;
    uint32_t sec;
    int rc = take_section(q, &sec);
    if (rc)
        return rc;
    memcpy(q->send_buf + (uint64_t)sec * q->section_size, msg, len);
    rc = send_section(q, sec, len, NVSP_CHANNEL_TYPE_CONTROL, UVB_NVSC_TID_CTRL, 0);
    if (rc) {
        give_section(q, sec);
        return rc;
    }
    rc = uvb_out_commit_signal(q->tx, q->sig);
    return rc < 0 ? rc : 0;
}

int uvb_nvsc_send_inband(struct uvb_nvsc_queue *q, const uint8_t *msg, uint32_t len,
                         uint64_t trans_id, uint16_t flags)
{
    int rc = uvb_out_inband(q->tx, VMBUS_PKT_INBAND, flags, trans_id, msg, len);
    if (rc)
        return rc;
    rc = uvb_out_commit_signal(q->tx, q->sig);
    return rc < 0 ? rc : 0;
}

/* ------------------------------------------------------------------------ */
/* TX                                                                        */

/* RNDIS PACKET header + PPIs for a frame at `dst`; returns the header+PPI length.  With
 * F_TX_LSO, `csum` holds the LSOv2 PPI value (a large send carries no checksum PPI: the
 * host fills every checksum of every segment, L-d netvsc_xmit). */
static uint32_t write_tx_header(uint8_t *dst, uint32_t len, uint32_t flags, uint32_t csum, uint32_t tci)
{
    uint32_t ppi = 0;
    uint8_t *e = dst + RNDIS_PACKET_SIZE;
    if (flags & (UVB_NVSC_F_TX_CSUM | UVB_NVSC_F_TX_LSO)) {
        uint32_t type = (flags & UVB_NVSC_F_TX_LSO) ? PPI_TCP_LARGESEND : PPI_TCPIP_CHKSUM;
        struct rndis_ppi_u32 c = {RNDIS_PPI_SIZE_U32, type, RNDIS_PPI_HDR_SIZE, csum};
        memcpy(e + ppi, &c, sizeof c);
        ppi += RNDIS_PPI_SIZE_U32;
    }
    if (flags & UVB_NVSC_F_VLAN) {
        uint32_t v = ((tci >> 13) & 7u) | (((tci >> 12) & 1u) << 3) | ((tci & 0xfffu) << VLAN_PPI_VID_SHIFT);
        struct rndis_ppi_u32 c = {RNDIS_PPI_SIZE_U32, PPI_IEEE_8021Q, RNDIS_PPI_HDR_SIZE, v};
        memcpy(e + ppi, &c, sizeof c);
        ppi += RNDIS_PPI_SIZE_U32;
    }
    struct rndis_packet h = {
        .msg_type = RNDIS_MSG_PACKET,
        .msg_len = RNDIS_PACKET_SIZE + ppi + len,
        .data_offset = RNDIS_PPI_OFFSET_DEFAULT + ppi,
        .data_len = len,
        .per_pkt_info_offset = RNDIS_PPI_OFFSET_DEFAULT,
        .per_pkt_info_len = ppi,
    };
    memcpy(dst, &h, sizeof h);
    return RNDIS_PACKET_SIZE + ppi;
}

static inline uint32_t ppi_bytes(uint32_t flags)
{
    return ((flags & (UVB_NVSC_F_TX_CSUM | UVB_NVSC_F_TX_LSO)) ? RNDIS_PPI_SIZE_U32 : 0u) +
           ((flags & UVB_NVSC_F_VLAN) ? RNDIS_PPI_SIZE_U32 : 0u);
}

/* Byte i of a frame as sent: with `strip`, bytes 12..15 of f (an inline 802.1Q tag) are
 * left out. */
static inline uint8_t fb(const uint8_t *f, uint32_t i, int strip)
{
    return f[i < 12 || !strip ? i : i + 4];
}

/* Check a large send (frame of `len` bytes as sent) and build its LSOv2 PPI value
 * (netvsc.md §4.4).  0 or UVB_NVSC_BAD_*.  *l3 gets the IP header offset, *l4 the TCP one. */
static uint32_t lso_check(const struct uvb_nvsc_queue *q, const uint8_t *f, uint32_t len, int strip,
                          uint32_t mss, uint32_t *ppi, uint32_t *l4)
{
    if (len < 14 + 20 + 20)
        return UVB_NVSC_BAD_LSO_HDR;
    uint32_t et = (uint32_t)fb(f, 12, strip) << 8 | fb(f, 13, strip);
    uint32_t tcp, v6, max;
    if (et == 0x0800) {
        uint32_t vihl = fb(f, 14, strip);
        uint32_t ihl = (vihl & 0xfu) * 4u;
        if ((vihl >> 4) != 4 || ihl < 20 || fb(f, 14 + 9, strip) != 6)
            return UVB_NVSC_BAD_LSO_HDR;
        tcp = 14 + ihl;
        v6 = 0;
        max = q->lso4_max;
    } else if (et == 0x86DD) {
        /* TCP right after the fixed header: no extension headers */
        if ((fb(f, 14, strip) >> 4) != 6 || fb(f, 14 + 6, strip) != 6)
            return UVB_NVSC_BAD_LSO_HDR;
        tcp = 14 + 40;
        v6 = 1;
        max = q->lso6_max;
    } else {
        return UVB_NVSC_BAD_LSO_HDR;
    }
    if (!max)
        return UVB_NVSC_BAD_LSO_OFF;
    if (tcp + 20 > len)
        return UVB_NVSC_BAD_LSO_HDR;
    uint32_t thl = (uint32_t)(fb(f, tcp + 12, strip) >> 4) * 4u;
    if (thl < 20 || tcp + thl > len)
        return UVB_NVSC_BAD_LSO_HDR;
    uint32_t hdr = tcp + thl;
    if (mss == 0 || mss > LSO_V2_MAX_MSS || hdr + mss > q->max_frame)
        return UVB_NVSC_BAD_LSO_MSS;
    if (len > max || len > UVB_NVSC_MAX_FRAME)
        return UVB_NVSC_BAD_LSO_SIZE;
    uint32_t segs = (len - hdr + mss - 1) / mss;
    if (segs < (q->lso_min_segs ? q->lso_min_segs : 1u))
        return UVB_NVSC_BAD_LSO_SEGS;
    *ppi = (mss & LSO_V2_MSS_MASK) | (tcp << LSO_V2_TCP_OFFSET_SHIFT) | LSO_V2_TYPE | (v6 ? LSO_V2_IPV6 : 0u);
    *l4 = tcp;
    return 0;
}

/* Prepare the copied headers of a large send the way Linux's netvsc_xmit does: IPv4 total
 * length and header checksum 0 (IPv6 payload length 0), TCP checksum = the pseudo-header
 * sum without a length (not complemented). */
static void lso_prep(uint8_t *fr, uint32_t l4)
{
    uint8_t *ip = fr + 14;
    uint32_t sum;
    if ((ip[0] >> 4) == 4) {
        ip[2] = ip[3] = 0;
        ip[10] = ip[11] = 0;
        sum = uvb_csum_add(0, ip + 12, 8);
    } else {
        ip[4] = ip[5] = 0;
        sum = uvb_csum_add(0, ip + 8, 32);
    }
    sum += 6;
    while (sum >> 16)
        sum = (sum & 0xffffu) + (sum >> 16);
    fr[l4 + 16] = (uint8_t)(sum >> 8);
    fr[l4 + 17] = (uint8_t)sum;
}

/* Copy a frame, leaving out an inline 802.1Q tag (bytes 12..15) when `strip`. */
static inline void copy_frame(uint8_t *dst, const uint8_t *f, uint32_t len, int strip)
{
    if (strip) {
        memcpy(dst, f, 12);
        memcpy(dst + 12, f + 16, len - 16);
    } else {
        memcpy(dst, f, len);
    }
}

/* Send one large frame GPA-direct through a bounce slot. 0, UVB_EAGAIN (no slot / ring), < 0.
 * `len` is the frame length as sent (without a stripped tag). */
static int send_gpa(struct uvb_nvsc_queue *q, const uint8_t *f, uint32_t len, uint32_t flags,
                    uint32_t csum, uint32_t tci, int strip)
{
    struct nvsc_priv *p = P(q);
    uint32_t total = RNDIS_PACKET_SIZE + ppi_bytes(flags) + len;
    if (total > q->gpa_slot_size)
        return UVB_EINVAL;
    if (!p->nslot_free) {
        int full;
        int rc = fill(q, &full);
        if (rc < 0)
            return rc;
        if (!p->nslot_free)
            return UVB_EAGAIN;
    }
    uint32_t npfn = (total + 4095u) / 4096u;
    if (uvb_out_free(q->tx) <= ring_bytes(NVSP_LEN, 16u + 8u * npfn) + 64u)
        return UVB_EAGAIN;
    uint32_t slot = p->slot_free[--p->nslot_free];
    uint8_t *dst = q->gpa_base + (uint64_t)slot * q->gpa_slot_size;
    uint32_t hl = write_tx_header(dst, len, flags, csum, tci);
    copy_frame(dst + hl, f, len + (strip ? 4u : 0u), strip);
    if (flags & UVB_NVSC_F_TX_LSO)
        lso_prep(dst + hl, (csum & LSO_V2_TCP_OFFSET_MASK) >> LSO_V2_TCP_OFFSET_SHIFT);
    uint8_t msg[NVSP_LEN] = {0};
    struct nvsp_send_rndis_pkt m = {NVSP_MSG1_TYPE_SEND_RNDIS_PKT, NVSP_CHANNEL_TYPE_DATA,
                                    NVSP_SECTION_INDEX_NONE, 0};
    memcpy(msg, &m, sizeof m);
    struct uvb_gpa g = {total, 0};
    struct uvb_iov iov = {msg, NVSP_LEN};
    const uint64_t *pfns = q->gpa_pfns + (uint64_t)slot * (q->gpa_slot_size / 4096u);
    int rc = uvb_out_gpa_direct(q->tx, VMBUS_PKT_FLAG_COMPLETION_REQUESTED, UVB_NVSC_TID_GPA | slot,
                                &g, 1, pfns, npfn, &iov, 1);
    if (rc) {
        p->slot_free[p->nslot_free++] = slot;
        return rc;
    }
    p->slot_busy[slot] = 1;
    q->tx_msgs++;
    q->tx_gpa++;
    return 0;
}

/* The packing loop shared by every TX entry point.  get(i) yields frame i. */
struct txsrc {
    const uint8_t *base;
    const uint8_t *rsc;         /* tx_fwd: F_RSC frames of a zero-copy burst live in rsc_buf */
    const struct uvb_nvsc_frame *frames;
    const uint8_t *const *ptrs;
    const uint32_t *lens;
};

static inline void src_get(const struct txsrc *s, uint32_t i, const uint8_t **f, uint32_t *len,
                           uint32_t *flags, uint32_t *csum, uint32_t *tci)
{
    if (s->frames) {
        const struct uvb_nvsc_frame *fr = &s->frames[i];
        *f = (s->rsc && (fr->flags & UVB_NVSC_F_RSC) ? s->rsc : s->base) + fr->offset;
        *len = fr->len;
        /* RX metadata (F_CSUM, F_HASH) is never taken as a TX request: forwarding a received
         * burst keeps only its VLAN tag */
        *flags = fr->flags & (UVB_NVSC_F_TX_CSUM | UVB_NVSC_F_TX_LSO | UVB_NVSC_F_VLAN);
        *csum = (*flags & UVB_NVSC_F_TX_LSO) ? fr->mss : fr->csum;
        *tci = fr->vlan;
    } else {
        *f = s->ptrs[i];
        *len = s->lens[i];
        *flags = 0;
        *csum = 0;
        *tci = 0;
    }
}

/* Send the open section as one NVSP message. 0: sent, its frames count as taken;
 * -1: no ring space, the section goes back and its frames are not taken. */
static int flush_section(struct uvb_nvsc_queue *q, uint32_t sec, uint32_t used, uint32_t npk,
                         uint64_t bytes, uint32_t frames, uint32_t lso, uint32_t *taken)
{
    if (send_section(q, sec, used, NVSP_CHANNEL_TYPE_DATA, UVB_NVSC_TID_DATA, npk)) {
        give_section(q, sec);
        q->tx_ring_full++;
        return -1;
    }
    q->tx_packets += npk;
    q->tx_bytes += bytes;
    q->tx_lso += lso;
    *taken += frames;
    return 0;
}

static int tx_pack(struct uvb_nvsc_queue *q, const struct txsrc *s, uint32_t n)
{
    struct nvsc_priv *p = P(q);
    if (!p)
        return UVB_EINVAL;
    uint32_t limit = q->section_size < q->max_xfer ? q->section_size : q->max_xfer;
    uint32_t align = q->pkt_align;
    /* max_pkt_per_msg comes from the host (INIT_CMPLT) and may be set after init: a section's
     * frame count must stay below the 16-bit "free" marker of sec_frames */
    uint32_t max_pkts = q->max_pkt_per_msg ? q->max_pkt_per_msg : 1u;
    if (max_pkts > SEC_MAX_FRAMES)
        max_pkts = SEC_MAX_FRAMES;
    uint32_t msg_need = ring_bytes(NVSP_LEN, 0);
    uint32_t ring_free = uvb_out_free(q->tx);
    if (q->tx->error)
        return q->tx->error;
    uint32_t sec = 0, used = 0, npk = 0, last = 0;
    int open = 0;
    uint32_t taken = 0, in_sec = 0, lso_in_sec = 0;
    int err = 0;
    uint64_t bytes_in_sec = 0;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *f;
        uint32_t len, flags, csum, tci;
        if (s->frames && i + 4 < n)
            __builtin_prefetch(s->base + s->frames[i + 4].offset, 0, 3);
        src_get(s, i, &f, &len, &flags, &csum, &tci);
        /* an inline 802.1Q tag travels as a VLAN PPI: the host's L2 header is 14 bytes (§4.4) */
        int strip = 0;
        if (len >= 18 && f[12] == 0x81 && f[13] == 0x00 && !(flags & UVB_NVSC_F_VLAN)) {
            tci = (uint32_t)f[14] << 8 | f[15];
            flags |= UVB_NVSC_F_VLAN;
            strip = 1;
            len -= 4;
        }
        uint32_t why = 0;
        if (flags & UVB_NVSC_F_TX_LSO) {
            /* csum carries the MSS in; the LSOv2 PPI value out (a large send has no csum PPI) */
            uint32_t l4 = 0, ppi = 0;
            flags &= ~(uint32_t)UVB_NVSC_F_TX_CSUM;
            why = lso_check(q, f, len, strip, csum, &ppi, &l4);
            csum = ppi;
        } else if (len < 14 || len > q->max_frame) {
            why = UVB_NVSC_BAD_SIZE;
        }
        if (why) {
            q->tx_drops++;
            if (q->tx_reject) {                 /* the caller raises: stop in front of it */
                q->tx_bad_hit = 1;
                q->tx_bad_len = len + (strip ? 4u : 0u);
                q->tx_bad_why = why;
                break;
            }
            if (!open)
                taken++;
            else
                in_sec++;
            continue;
        }
        uint32_t msg = RNDIS_PACKET_SIZE + ppi_bytes(flags) + len;
        if (msg > limit) {
            /* GPA direct: keep frame order, flush the open section first */
            if (open) {
                open = 0;
                if (flush_section(q, sec, used, npk, bytes_in_sec, in_sec, lso_in_sec, &taken))
                    break;
                ring_free -= msg_need;
            }
            if (!q->gpa_slots || msg > q->gpa_slot_size) {
                q->tx_drops++;
                if (q->tx_reject) {
                    q->tx_bad_hit = 1;
                    q->tx_bad_len = len + (strip ? 4u : 0u);
                    q->tx_bad_why = UVB_NVSC_BAD_SIZE;
                    break;
                }
                taken++;
                continue;
            }
            int rc = send_gpa(q, f, len, flags, csum, tci, strip);
            if (rc == UVB_EAGAIN) {
                if (P(q)->nslot_free)
                    q->tx_ring_full++;
                else
                    q->tx_no_section++;
                break;
            }
            if (rc < 0) {
                err = rc;
                break;
            }
            ring_free = uvb_out_free(q->tx);
            q->tx_packets++;
            q->tx_bytes += len;
            if (flags & UVB_NVSC_F_TX_LSO)
                q->tx_lso++;
            taken++;
            continue;
        }
        if (open) {
            uint32_t at = (used + align - 1) & ~(align - 1);
            if (npk >= max_pkts || at + msg > limit) {
                open = 0;
                if (flush_section(q, sec, used, npk, bytes_in_sec, in_sec, lso_in_sec, &taken))
                    break;
                ring_free -= msg_need;
            }
        }
        if (!open) {
            if (ring_free <= msg_need + 64u) {
                ring_free = uvb_out_free(q->tx);
                if (ring_free <= msg_need + 64u) {
                    q->tx_ring_full++;
                    break;
                }
            }
            int rc = take_section(q, &sec);
            if (rc == UVB_EAGAIN) {
                q->tx_no_section++;
                break;
            }
            if (rc < 0) {
                err = rc;
                break;
            }
            open = 1;
            used = 0;
            npk = 0;
            in_sec = 0;
            lso_in_sec = 0;
            bytes_in_sec = 0;
        }
        uint8_t *base = q->send_buf + (uint64_t)sec * q->section_size;
        if (npk) {
            uint32_t at = (used + align - 1) & ~(align - 1);
            if (at > used)
                memset(base + used, 0, at - used);
            uint32_t ml = at - last;
            memcpy(base + last + 4, &ml, 4);       /* pad the previous message */
            used = at;
        }
        uint32_t hl = write_tx_header(base + used, len, flags, csum, tci);
        copy_frame(base + used + hl, f, len + (strip ? 4u : 0u), strip);
        if (flags & UVB_NVSC_F_TX_LSO) {
            lso_prep(base + used + hl, (csum & LSO_V2_TCP_OFFSET_MASK) >> LSO_V2_TCP_OFFSET_SHIFT);
            lso_in_sec++;
        }
        last = used;
        used += msg;
        npk++;
        in_sec++;
        bytes_in_sec += len;
    }
    if (open)
        flush_section(q, sec, used, npk, bytes_in_sec, in_sec, lso_in_sec, &taken);
    int rc = uvb_out_commit_signal(q->tx, q->sig);
    if (rc < 0)
        return rc;
    if (err && !taken)
        return err;
    return (int)taken;
}

/* ---- frames from a TAP with IFF_VNET_HDR (struct virtio_net_hdr, native endian) ---- */
#define VNET_HDR_LEN            10
#define VNET_F_NEEDS_CSUM       1
#define VNET_GSO_TCPV4          1
#define VNET_GSO_TCPV6          4
#define VNET_GSO_ECN            0x80

/* Complete a partial checksum: the field at start + off holds the pseudo-header seed. */
static void vnet_csum(uint8_t *f, uint32_t len, uint32_t start, uint32_t off)
{
    if (start >= len || start + off + 2 > len)
        return;
    uint32_t sum = uvb_csum_add(0, f + start, len - start);
    while (sum >> 16)
        sum = (sum & 0xffffu) + (sum >> 16);
    uint16_t c = (uint16_t)~sum;
    if (off == 6 && c == 0)
        c = 0xffff;                     /* UDP: 0 means "no checksum" */
    f[start + off] = (uint8_t)(c >> 8);
    f[start + off + 1] = (uint8_t)c;
}

int uvb_nvsc_vnet_prep(const struct uvb_nvsc_queue *q, uint8_t *base, struct uvb_nvsc_frame *frames,
                       uint32_t n)
{
    int lso = 0;
    for (uint32_t i = 0; i < n; i++) {
        struct uvb_nvsc_frame *d = &frames[i];
        if (d->len < VNET_HDR_LEN) {
            d->len = 0;
            d->flags = 0;
            continue;
        }
        uint8_t *h = base + d->offset;
        uint8_t vflags = h[0], gso = h[1] & (uint8_t)~VNET_GSO_ECN;
        uint16_t gso_size, cstart, coff;
        memcpy(&gso_size, h + 4, 2);
        memcpy(&cstart, h + 6, 2);
        memcpy(&coff, h + 8, 2);
        d->offset += VNET_HDR_LEN;
        d->len -= VNET_HDR_LEN;
        d->flags &= UVB_NVSC_F_VLAN;
        uint8_t *f = base + d->offset;
        uint32_t len = d->len;
        if ((gso == VNET_GSO_TCPV4 || gso == VNET_GSO_TCPV6) && gso_size) {
            /* large enough to be a large send? (headers from the frame, as the host reads them) */
            uint32_t ppi = 0, l4 = 0;
            if (lso_check(q, f, len, 0, gso_size, &ppi, &l4) == 0) {
                d->mss = gso_size;
                d->flags |= UVB_NVSC_F_TX_LSO;
                lso++;
                continue;
            }
        }
        if (vflags & VNET_F_NEEDS_CSUM)
            vnet_csum(f, len, cstart, coff);
    }
    return lso;
}

int uvb_nvsc_tx_burst(struct uvb_nvsc_queue *q, const uint8_t *base,
                      const struct uvb_nvsc_frame *frames, uint32_t n)
{
    struct txsrc s = {base, NULL, frames, NULL, NULL};
    return tx_pack(q, &s, n);
}

int uvb_nvsc_tx_ptrs(struct uvb_nvsc_queue *q, const uint8_t *const *ptrs, const uint32_t *lens,
                     uint32_t n)
{
    struct txsrc s = {NULL, NULL, NULL, ptrs, lens};
    return tx_pack(q, &s, n);
}

int uvb_nvsc_tx_fwd(struct uvb_nvsc_queue *q, const struct uvb_nvsc_frame *frames, uint32_t n)
{
    struct txsrc s = {q->recv_buf, q->rsc_buf, frames, NULL, NULL};
    return tx_pack(q, &s, n);
}
