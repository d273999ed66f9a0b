/*
 * storvsc guest fast path: EXECUTE_SRB packets out, completions in, in
 * batches.  See storvsc.h for the contract and storvsc_ic.md §2.9, §3.1,
 * §10 for the protocol rules followed here.
 */
#define _GNU_SOURCE
#include "uvmbus.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sched.h>
#include <unistd.h>

/* ---- layouts pinned to storvsc_ic.md §2.2-§2.4 and §3.1 ------------------ */
_Static_assert(sizeof(struct vstor_packet) == 64, "vstor_packet is 64 bytes (§2.2)");
_Static_assert(offsetof(struct vstor_packet, operation) == 0, "operation @0");
_Static_assert(offsetof(struct vstor_packet, flags) == 4, "flags @4");
_Static_assert(offsetof(struct vstor_packet, status) == 8, "status @8");
_Static_assert(offsetof(struct vstor_packet, u) == 12, "union @12");
_Static_assert(sizeof(union vstor_body) == 52, "union is 52 bytes");
_Static_assert(sizeof(struct vstor_srb) == 52, "vmscsi_request is 0x34 bytes (§2.3)");
_Static_assert(offsetof(struct vstor_srb, length) == 0, "srb length @0");
_Static_assert(offsetof(struct vstor_srb, srb_status) == 2, "srb_status @2");
_Static_assert(offsetof(struct vstor_srb, scsi_status) == 3, "scsi_status @3");
_Static_assert(offsetof(struct vstor_srb, port_number) == 4, "port_number @4");
_Static_assert(offsetof(struct vstor_srb, path_id) == 5, "path_id @5");
_Static_assert(offsetof(struct vstor_srb, target_id) == 6, "target_id @6");
_Static_assert(offsetof(struct vstor_srb, lun) == 7, "lun @7");
_Static_assert(offsetof(struct vstor_srb, cdb_length) == 8, "cdb_length @8");
_Static_assert(offsetof(struct vstor_srb, sense_info_length) == 9, "sense_info_length @9");
_Static_assert(offsetof(struct vstor_srb, data_in) == 10, "data_in @10");
_Static_assert(offsetof(struct vstor_srb, reserved) == 11, "reserved @11");
_Static_assert(offsetof(struct vstor_srb, data_transfer_length) == 12, "data_transfer_length @12");
_Static_assert(offsetof(struct vstor_srb, payload) == 16, "cdb/sense @16");
_Static_assert(offsetof(struct vstor_srb, reserve) == 36, "win8 extension @36 (V1 length 0x24)");
_Static_assert(offsetof(struct vstor_srb, queue_tag) == 38, "queue_tag @38");
_Static_assert(offsetof(struct vstor_srb, queue_action) == 39, "queue_action @39");
_Static_assert(offsetof(struct vstor_srb, srb_flags) == 40, "srb_flags @40");
_Static_assert(offsetof(struct vstor_srb, time_out_value) == 44, "time_out_value @44");
_Static_assert(offsetof(struct vstor_srb, queue_sort_key) == 48, "queue_sort_key @48");
_Static_assert(sizeof(struct vstor_protocol_version) == 4, "protocol version is 4 bytes");
_Static_assert(sizeof(struct vstor_channel_properties) == 24, "channel properties are 24 bytes");
_Static_assert(offsetof(struct vstor_channel_properties, max_channel_cnt) == 4, "max_channel_cnt @4");
_Static_assert(offsetof(struct vstor_channel_properties, flags) == 8, "props flags @8");
_Static_assert(offsetof(struct vstor_channel_properties, max_transfer_bytes) == 12, "max_transfer @12");
_Static_assert(offsetof(struct vstor_channel_properties, reserved2) == 16, "reserved2 @16");
_Static_assert(sizeof(struct vstor_fc_wwn) == 36, "FC WWN packet is 36 bytes");
_Static_assert(sizeof(struct vmgpa_direct_header) + sizeof(struct vmgpa_range) == 32,
               "GPA-direct packet: pfns start at 32 (§3.1)");

#define HV_PAGE 4096u
#define STACK_PFNS 512u

static int qerr(struct uvb_stor_queue *q, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int qerr(struct uvb_stor_queue *q, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(q->errmsg, sizeof q->errmsg, fmt, ap);
    va_end(ap);
    return code;
}


int uvb_stor_queue_init(struct uvb_stor_queue *q, struct uvb_ring *tx, struct uvb_ring *rx,
                        struct uvb_signal *sig, struct uvb_stor_slot *slots, uint32_t *free_list,
                        uint32_t depth, struct uvb_pkt *pkts, uint32_t max_pkts,
                        uint8_t *rxbuf, uint32_t rxbuf_len)
{
    memset(q, 0, sizeof *q);
    if (!tx || !rx || !sig || !slots || !free_list || !pkts || !rxbuf || depth == 0 ||
        depth > UVB_STOR_MAX_DEPTH || max_pkts == 0 || rxbuf_len < 4096 ||
        tx->kind != UVB_RING_OUT || rx->kind != UVB_RING_IN)
        return qerr(q, UVB_EINVAL, "queue init: bad arguments");
    q->tx = tx;
    q->rx = rx;
    q->sig = sig;
    q->slots = slots;
    q->free_list = free_list;
    q->depth = depth;
    q->pkts = pkts;
    q->max_pkts = max_pkts;
    q->rxbuf = rxbuf;
    q->rxbuf_len = rxbuf_len;
    q->timeout_s = 60;
    memset(slots, 0, sizeof *slots * depth);
    /* pop order: slot 0 first */
    for (uint32_t i = 0; i < depth; i++)
        free_list[i] = depth - 1 - i;
    q->nfree = depth;
    return UVB_OK;
}

static inline void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

static inline void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* Build the 64-byte VSTOR packet for one request (§2.9). */
static int build_packet(struct uvb_stor_queue *q, const struct uvb_stor_req *r,
                        struct vstor_packet *pk)
{
    memset(pk, 0, sizeof *pk);
    pk->flags = VSTOR_FLAG_REQUEST_COMPLETION;
    if (r->kind == UVB_STOR_VSTOR_OP) {
        if (r->operation == VSTOR_OP_EXECUTE_SRB || r->operation == 0 ||
            r->operation > VSTOR_OP_EVENT_NOTIFICATION || r->length)
            return qerr(q, UVB_STOR_EREQ, "request %#llx: VSTOR operation %u cannot be sent bare",
                        (unsigned long long)r->tag, r->operation);
        pk->operation = r->operation;
        if (r->operation == VSTOR_OP_RESET_LUN) {   /* name the LUN (hosts may ignore it) */
            pk->u.srb.length = VSTOR_SRB_LEN_V2;
            pk->u.srb.path_id = r->path_id;
            pk->u.srb.target_id = r->target_id;
            pk->u.srb.lun = r->lun;
        }
        return 0;
    }
    pk->operation = VSTOR_OP_EXECUTE_SRB;
    struct vstor_srb *s = &pk->u.srb;
    s->length = VSTOR_SRB_LEN_V2;
    s->sense_info_length = VSTOR_SENSE_SIZE;
    s->port_number = q->port_number;
    s->path_id = r->path_id;
    s->target_id = r->target_id;
    s->lun = r->lun;
    s->time_out_value = q->timeout_s;
    s->srb_flags = SRB_FLAGS_DISABLE_SYNCH_TRANSFER | q->srb_flags;
    if (q->srb_flags & SRB_FLAGS_QUEUE_ACTION_ENABLE) {
        s->queue_tag = SP_UNTAGGED;
        s->queue_action = SRB_SIMPLE_TAG_REQUEST;
    }
    uint8_t data_in;
    switch (r->kind) {
    case UVB_STOR_READ16:
    case UVB_STOR_WRITE16:
        if (r->blocks == 0 || r->length == 0)
            return qerr(q, UVB_STOR_EREQ, "request %#llx: READ/WRITE of 0 blocks",
                        (unsigned long long)r->tag);
        s->payload[0] = r->kind == UVB_STOR_READ16 ? 0x88 : 0x8A;
        s->payload[1] = (r->flags & UVB_STOR_FUA) ? 0x08 : 0;
        put_be64(s->payload + 2, r->lba);
        put_be32(s->payload + 10, r->blocks);
        s->cdb_length = 16;
        data_in = r->kind == UVB_STOR_READ16 ? VSTOR_DATA_IN : VSTOR_DATA_OUT;
        break;
    case UVB_STOR_CDB:
        if (r->cdb_length == 0 || r->cdb_length > VSTOR_MAX_CDB_LEN)
            return qerr(q, UVB_STOR_EREQ, "request %#llx: CDB length %u (1..16)",
                        (unsigned long long)r->tag, r->cdb_length);
        memcpy(s->payload, r->cdb, r->cdb_length);
        s->cdb_length = r->cdb_length;
        data_in = r->data_in;
        if (data_in > VSTOR_DATA_NONE)
            return qerr(q, UVB_STOR_EREQ, "request %#llx: data_in %u", (unsigned long long)r->tag,
                        data_in);
        if (data_in == VSTOR_DATA_NONE && r->length)
            return qerr(q, UVB_STOR_EREQ, "request %#llx: %u data bytes without a direction",
                        (unsigned long long)r->tag, r->length);
        break;
    default:
        return qerr(q, UVB_STOR_EREQ, "request %#llx: unknown kind %u", (unsigned long long)r->tag,
                    r->kind);
    }
    if (r->length == 0)
        data_in = VSTOR_DATA_NONE;
    s->data_in = data_in;
    if (data_in == VSTOR_DATA_IN)
        s->srb_flags |= SRB_FLAGS_DATA_IN;
    else if (data_in == VSTOR_DATA_OUT)
        s->srb_flags |= SRB_FLAGS_DATA_OUT;
    s->data_transfer_length = r->length;   /* 0 without a buffer (§2.9) */
    return 0;
}

/* Put one request into the TX ring (not committed). */
static int put_request(struct uvb_stor_queue *q, const struct uvb_stor_req *r, uint64_t tid)
{
    struct vstor_packet pk;
    int rc = build_packet(q, r, &pk);
    if (rc)
        return rc;
    struct uvb_iov iov = {&pk, sizeof pk};
    if (r->length == 0)
        return uvb_out_put(q->tx, VMBUS_PKT_INBAND, VMBUS_PKT_FLAG_COMPLETION_REQUESTED, tid,
                           NULL, 0, &iov, 1);
    if (r->byte_offset >= HV_PAGE || !r->pfns)
        return qerr(q, UVB_STOR_EREQ, "request %#llx: byte_offset %u (must be < 4096) or no PFNs",
                    (unsigned long long)r->tag, r->byte_offset);
    uint32_t npfn = (uint32_t)(((uint64_t)r->byte_offset + r->length + HV_PAGE - 1) / HV_PAGE);
    /* ext = {reserved u32, range_count u32, byte_count u32, byte_offset u32, pfn[npfn]} */
    uint64_t stackbuf[2 + STACK_PFNS];
    uint64_t *ext = npfn <= STACK_PFNS ? stackbuf : malloc(8ull * (2 + npfn));
    if (!ext)
        return qerr(q, UVB_STOR_EREQ, "request %#llx: out of memory for %u PFNs",
                    (unsigned long long)r->tag, npfn);
    uint32_t *h = (uint32_t *)ext;
    h[0] = 0;
    h[1] = 1;
    h[2] = r->length;
    h[3] = r->byte_offset;
    memcpy(ext + 2, r->pfns, 8ull * npfn);
    rc = uvb_out_put(q->tx, VMBUS_PKT_GPA_DIRECT, VMBUS_PKT_FLAG_COMPLETION_REQUESTED, tid,
                     ext, 8u * (2 + npfn), &iov, 1);
    if (ext != stackbuf)
        free(ext);
    return rc;
}

/* Take a slot, put the request, account it.  0 or an error (nothing consumed). */
static inline int submit_one(struct uvb_stor_queue *q, const struct uvb_stor_req *r, uint64_t now)
{
    if (q->nfree == 0)
        return UVB_STOR_EFULL;
    uint32_t slot = q->free_list[q->nfree - 1];
    struct uvb_stor_slot *s = &q->slots[slot];
    uint32_t gen = s->gen + 1;
    if (gen == 0)
        gen = 1;
    uint64_t tid = ((uint64_t)gen << 32) | (uint64_t)(slot + 1);
    int rc = put_request(q, r, tid);
    if (rc) {
        if (rc == UVB_EAGAIN)
            q->ring_full++;
        return rc;
    }
    q->nfree--;
    s->gen = gen;
    s->tag = r->tag;
    s->submit_ns = now;
    s->busy = 1;
    q->submitted++;
    return 0;
}

static int finish_submit(struct uvb_stor_queue *q, uint32_t done, int err)
{
    if (done) {
        int rc = uvb_out_commit_signal(q->tx, q->sig);
        if (rc < 0)
            return rc;
        if (rc == 1)
            q->signals++;
        return (int)done;
    }
    return err;
}

int uvb_stor_submit(struct uvb_stor_queue *q, const struct uvb_stor_req *reqs, uint32_t n)
{
    q->submit_calls++;
    uint32_t done = 0;
    int err = 0;
    uint64_t now = uvb_now_ns();
    for (; done < n; done++) {
        err = submit_one(q, &reqs[done], now);
        if (err)
            break;
    }
    return finish_submit(q, done, err);
}

int uvb_stor_submit_slots(struct uvb_stor_queue *q, struct uvb_stor_req *table,
                          const uint64_t *slots, const uint64_t *lbas, const uint8_t *kinds,
                          uint32_t n)
{
    q->submit_calls++;
    uint32_t done = 0;
    int err = 0;
    uint64_t now = uvb_now_ns();
    for (; done < n; done++) {
        struct uvb_stor_req *r = &table[slots[done]];
        if (lbas)
            r->lba = lbas[done];
        if (kinds)
            r->kind = kinds[done];
        err = submit_one(q, r, now);
        if (err)
            break;
    }
    return finish_submit(q, done, err);
}

static inline int lookup(struct uvb_stor_queue *q, uint64_t tid)
{
    uint32_t slot = (uint32_t)(tid & 0xffffffffu);
    uint32_t gen = (uint32_t)(tid >> 32);
    if (slot == 0 || slot > q->depth)
        return -1;
    struct uvb_stor_slot *s = &q->slots[slot - 1];
    if (!s->busy || s->gen != gen)
        return -1;
    return (int)(slot - 1);
}

static inline void free_slot(struct uvb_stor_queue *q, uint32_t slot)
{
    q->slots[slot].busy = 0;
    q->free_list[q->nfree++] = slot;
}

int uvb_stor_reap(struct uvb_stor_queue *q, struct uvb_stor_cpl *out, uint32_t max)
{
    q->reap_calls++;
    if (max == 0)
        return 0;
    uint32_t want = max < q->max_pkts ? max : q->max_pkts;
    int got = uvb_in_read(q->rx, q->rxbuf, q->rxbuf_len, q->pkts, want);
    if (got < 0)
        return got;
    if (got == 0)
        return 0;
    uint64_t now = uvb_now_ns();
    for (int i = 0; i < got; i++) {
        const struct uvb_pkt *p = &q->pkts[i];
        const uint8_t *data = q->rxbuf + p->data_offset;
        struct uvb_stor_cpl *c = &out[i];
        memset(c, 0, sizeof *c);
        c->trans_id = p->trans_id;
        c->payload_len = p->data_len;
        uint32_t op = 0;
        if (p->data_len >= 4)
            memcpy(&op, data, 4);
        c->operation = op;
        if (p->trans_id == 0) {
            /* unsolicited (§2.10); COMPLETE_IO/FCHBA with id 0 are bogus (§2.9) */
            if (p->data_len < 4 || op == VSTOR_OP_COMPLETE_IO || p->type != VMBUS_PKT_INBAND) {
                c->kind = UVB_STOR_CPL_BOGUS;
                c->error = p->data_len < 4 ? UVB_STOR_ESHORT
                           : p->type != VMBUS_PKT_INBAND ? UVB_STOR_ETYPE : UVB_STOR_EOP;
                q->bogus++;
            } else {
                c->kind = UVB_STOR_CPL_UNSOLICITED;
                q->unsolicited++;
                q->unsolicited_pending++;
            }
            continue;
        }
        int slot = lookup(q, p->trans_id);
        if (slot < 0) {
            c->kind = UVB_STOR_CPL_BOGUS;
            c->error = UVB_STOR_ETID;
            q->bogus++;
            continue;
        }
        struct uvb_stor_slot *s = &q->slots[slot];
        c->tag = s->tag;
        c->latency_ns = now - s->submit_ns;
        c->kind = s->busy == 2 ? UVB_STOR_CPL_LATE : UVB_STOR_CPL_DONE;
        free_slot(q, (uint32_t)slot);
        q->completed++;
        if (p->type != VMBUS_PKT_COMP) {
            c->error = UVB_STOR_ETYPE;
            continue;
        }
        if (p->data_len < VSTOR_PACKET_SIZE) {
            c->error = UVB_STOR_ESHORT;
            continue;
        }
        const struct vstor_packet *pk = (const struct vstor_packet *)data;
        if (pk->operation != VSTOR_OP_COMPLETE_IO) {
            c->error = UVB_STOR_EOP;
            continue;
        }
        c->status = pk->status;
        c->srb_status = pk->u.srb.srb_status;
        c->scsi_status = pk->u.srb.scsi_status;
        c->transferred = pk->u.srb.data_transfer_length;
        if (c->srb_status & SRB_STATUS_AUTOSENSE_VALID) {
            uint32_t sl = pk->u.srb.sense_info_length;
            if (sl == 0 || sl > VSTOR_SENSE_SIZE)
                sl = VSTOR_SENSE_SIZE;
            memcpy(c->sense, pk->u.srb.payload, sl);
            c->sense_len = (uint8_t)sl;
        }
    }
    int rc = uvb_in_commit_signal(q->rx, q->sig);
    if (rc < 0)
        return rc;
    if (rc == 1)
        q->signals++;
    return got;
}

int uvb_stor_reap_tags(struct uvb_stor_queue *q, struct uvb_stor_cpl *out, uint64_t *tags,
                       uint8_t *ok, uint32_t max, uint32_t *nbad)
{
    int n = uvb_stor_reap(q, out, max);
    uint32_t bad = 0;
    for (int i = 0; i < n; i++) {
        const struct uvb_stor_cpl *c = &out[i];
        int good = c->kind == UVB_STOR_CPL_DONE && c->error == UVB_STOR_OK &&
                   (c->srb_status & SRB_STATUS_MASK) == SRB_STATUS_SUCCESS;
        tags[i] = c->kind == UVB_STOR_CPL_DONE ? c->tag : UINT64_MAX;
        ok[i] = (uint8_t)good;
        bad += !good;
    }
    if (nbad)
        *nbad = bad;
    return n;
}

int uvb_stor_abandon(struct uvb_stor_queue *q, uint64_t tag, uint32_t release)
{
    for (uint32_t i = 0; i < q->depth; i++) {
        struct uvb_stor_slot *s = &q->slots[i];
        if (s->busy == 1 && s->tag == tag) {
            if (release) {
                s->gen++;
                if (s->gen == 0)
                    s->gen = 1;
                free_slot(q, i);
            } else {
                s->busy = 2;
            }
            return 0;
        }
    }
    return -1;
}

int uvb_stor_spin(struct uvb_stor_queue **queues, uint32_t n, uint64_t spin_ns)
{
    uint64_t end = uvb_now_ns() + spin_ns;
    for (;;) {
        for (uint32_t i = 0; i < n; i++) {
            int a = uvb_in_avail(queues[i]->rx);
            if (a != 0)
                return a > 0 ? 1 : a;
        }
        if (uvb_now_ns() >= end)
            return 0;
        sched_yield();
    }
}

uint64_t uvb_stor_oldest(const struct uvb_stor_queue *q)
{
    uint64_t oldest = 0;
    for (uint32_t i = 0; i < q->depth; i++) {
        const struct uvb_stor_slot *s = &q->slots[i];
        if (s->busy == 1 && (oldest == 0 || s->submit_ns < oldest))
            oldest = s->submit_ns;
    }
    return oldest;
}

uint32_t uvb_stor_inflight(const struct uvb_stor_queue *q)
{
    return q->depth - q->nfree;
}

int uvb_stor_sense(const uint8_t *sense, uint32_t len, uint8_t *key, uint8_t *asc, uint8_t *ascq)
{
    *key = *asc = *ascq = 0;
    if (!sense || len < 1)
        return 0;
    uint8_t code = sense[0] & 0x7F;
    if (code == 0x70 || code == 0x71) {
        if (len < 3)
            return 0;
        *key = sense[2] & 0x0F;
        if (len >= 13)
            *asc = sense[12];
        if (len >= 14)
            *ascq = sense[13];
        return 1;
    }
    if (code == 0x72 || code == 0x73) {
        if (len < 2)
            return 0;
        *key = sense[1] & 0x0F;
        if (len >= 3)
            *asc = sense[2];
        if (len >= 4)
            *ascq = sense[3];
        return 1;
    }
    return 0;
}

/* ---- benchmark reference -------------------------------------------------- */

static inline uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

void uvb_stor_route_slots(const uint64_t *slots, const uint64_t *lbas, const uint8_t *kinds,
                          uint32_t n, uint32_t nq, uint64_t *out_slots, uint64_t *out_lbas,
                          uint8_t *out_kinds, uint32_t *counts)
{
    if (nq == 0)
        return;
    for (uint32_t k = 0; k < nq; k++)
        counts[k] = 0;
    for (uint32_t i = 0; i < n; i++)
        counts[slots[i] % nq]++;
    /* counts -> start offsets, walked with a second pass per channel (nq is small) */
    uint32_t pos = 0;
    for (uint32_t k = 0; k < nq; k++) {
        for (uint32_t i = 0; i < n; i++) {
            if (slots[i] % nq != k)
                continue;
            out_slots[pos] = slots[i];
            if (lbas && out_lbas)
                out_lbas[pos] = lbas[i];
            if (kinds && out_kinds)
                out_kinds[pos] = kinds[i];
            pos++;
        }
    }
}

void uvb_stor_random_lbas(uint64_t *out, uint32_t n, uint64_t units, uint32_t unit_blocks,
                          uint64_t base_lba, uint64_t *state)
{
    uint64_t st = *state ? *state : 0x9E3779B97F4A7C15ull;
    for (uint32_t i = 0; i < n; i++)
        out[i] = base_lba + (units ? xorshift64(&st) % units : 0) * unit_blocks;
    *state = st;
}

int64_t uvb_stor_pread_loop(int fd, uint8_t *buf, uint32_t bs, uint64_t span, uint32_t random,
                            double seconds, uint64_t seed, uint64_t *ns)
{
    if (bs == 0 || span < bs || !buf)
        return -EINVAL;
    uint64_t nblocks = span / bs;
    uint64_t state = seed ? seed : 0x9E3779B97F4A7C15ull;
    uint64_t start = uvb_now_ns();
    uint64_t stop = start + (uint64_t)(seconds * 1e9);
    uint64_t ops = 0, seq = 0, now = start;
    for (;;) {
        for (int k = 0; k < 64; k++) {
            uint64_t blk = random ? xorshift64(&state) % nblocks : seq++ % nblocks;
            ssize_t n = pread(fd, buf, bs, (off_t)(blk * bs));
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                return -errno;
            }
            ops++;
        }
        now = uvb_now_ns();
        if (now >= stop)
            break;
    }
    if (ns)
        *ns = now - start;
    return (int64_t)ops;
}
