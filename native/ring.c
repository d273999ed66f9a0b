/*
 * VMBus ring buffer fast path: writer, reader, commit/signal decisions,
 * validation of everything the peer controls.  See ring.h for the contract
 * and ../shared/reference/uio_vmbus.md §2 for the protocol.
 *
 * Memory ordering: indices, mask and pending size are accessed with __atomic
 * builtins.  A writer publishes write_index with a release store after the
 * packet bytes; a reader loads write_index with acquire before touching the
 * bytes and publishes read_index with a release store after copying them.
 * Signal decisions need store->load ordering and use a seq_cst fence.
 */
#define _GNU_SOURCE
#include "uvmbus.h"
#include "util.h"
#include "trace_int.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

_Static_assert(sizeof(struct vmpacket_descriptor) == 16, "descriptor layout");
_Static_assert(sizeof(struct vmtransfer_page_header) == 24, "xfer header layout");
_Static_assert(sizeof(struct vmgpa_direct_header) == 24, "gpa header layout");
_Static_assert(sizeof(struct vmbus_ring_ctl) == 68, "ring control layout");
_Static_assert(offsetof(struct vmbus_ring_ctl, feature_bits) == 64, "feature bits offset");
_Static_assert(sizeof(struct hv_monitor_page) == 4096, "monitor page layout");
_Static_assert(offsetof(struct hv_monitor_page, latency) == 576, "monitor latency offset");
_Static_assert(offsetof(struct hv_monitor_page, parameter) == 1088, "monitor parameter offset");


static inline uint32_t ld_acq(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint32_t ld_rlx(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void st_rel(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void full_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* bytes between index `from` and index `to` going forward */
static inline uint32_t dist(uint32_t from, uint32_t to, uint32_t dsize)
{
    return to >= from ? to - from : dsize - from + to;
}

static inline uint32_t wrap(uint64_t pos, uint32_t dsize)
{
    return (uint32_t)(pos >= dsize ? pos - dsize : pos);
}

static int die(struct uvb_ring *r, const char *fmt, ...)
{
    if (r->error == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(r->errmsg, sizeof r->errmsg, fmt, ap);
        va_end(ap);
        r->error = UVB_ECORRUPT;
    }
    return UVB_ECORRUPT;
}

static const char *dir_name(const struct uvb_ring *r)
{
    return r->kind == UVB_RING_OUT ? "outgoing ring" : "incoming ring";
}

/* Load and validate an index the peer owns (or that lives in shared memory). */
static inline int load_index(struct uvb_ring *r, uint32_t *field, const char *what, uint32_t *out)
{
    uint32_t v = ld_acq(field);
    if (__builtin_expect(v >= r->dsize || (v & 7u), 0))
        return die(r, "%s: %s %#x is invalid (data area %#x bytes; must be < size and 8-aligned)",
                   dir_name(r), what, v, r->dsize);
    *out = v;
    return 0;
}

const char *uvb_strerror(int code)
{
    switch (code) {
    case UVB_OK: return "ok";
    case UVB_EAGAIN: return "would block";
    case UVB_EINVAL: return "invalid argument";
    case UVB_ENOBUFS: return "buffer too small";
    case UVB_ECORRUPT: return "ring corrupt";
    case UVB_EIO: return "signal failed (channel revoked?)";
    default: return "unknown error";
    }
}

int uvb_ring_attach(struct uvb_ring *r, void *header, uint64_t ring_bytes,
                    uint32_t header_bytes, uint32_t kind)
{
    memset(r, 0, sizeof *r);
    r->kind = kind;
    if (!header || (kind != UVB_RING_OUT && kind != UVB_RING_IN)) {
        snprintf(r->errmsg, sizeof r->errmsg, "attach: null mapping or bad direction");
        return UVB_EINVAL;
    }
    if (header_bytes < 4096 || (header_bytes & (header_bytes - 1))) {
        snprintf(r->errmsg, sizeof r->errmsg,
                 "attach: header page size %u is not a power of two >= 4096", header_bytes);
        return UVB_EINVAL;
    }
    if (ring_bytes <= (uint64_t)header_bytes + 64 || ring_bytes - header_bytes > 0x7ffffff8ull ||
        ((ring_bytes - header_bytes) & 7u)) {
        snprintf(r->errmsg, sizeof r->errmsg,
                 "attach: ring size %llu with a %u-byte header leaves no valid data area",
                 (unsigned long long)ring_bytes, header_bytes);
        return UVB_EINVAL;
    }
    r->ctl = (struct vmbus_ring_ctl *)header;
    r->data = (uint8_t *)header + header_bytes;
    r->dsize = (uint32_t)(ring_bytes - header_bytes);
    uint32_t idx = 0;
    int rc = load_index(r, kind == UVB_RING_OUT ? &r->ctl->write_index : &r->ctl->read_index,
                        kind == UVB_RING_OUT ? "write_index at attach" : "read_index at attach",
                        &idx);
    if (rc)
        return rc;
    r->cursor = r->committed = idx;
    return UVB_OK;
}

void uvb_ring_reset(void *header)
{
    struct vmbus_ring_ctl *c = header;
    st_rel(&c->write_index, 0);
    st_rel(&c->read_index, 0);
    st_rel(&c->pending_send_sz, 0);
    st_rel(&c->feature_bits, VMBUS_RING_FEAT_PENDING_SEND_SZ);
}

static uint32_t *field_ptr(void *header, uint32_t field)
{
    struct vmbus_ring_ctl *c = header;
    switch (field) {
    case 0: return &c->write_index;
    case 1: return &c->read_index;
    case 2: return &c->interrupt_mask;
    case 3: return &c->pending_send_sz;
    case 4: return &c->feature_bits;
    default: return NULL;
    }
}

uint32_t uvb_ring_load(const void *header, uint32_t field)
{
    uint32_t *p = field_ptr((void *)header, field);
    return p ? __atomic_load_n(p, __ATOMIC_SEQ_CST) : 0;
}

void uvb_ring_store(void *header, uint32_t field, uint32_t value)
{
    uint32_t *p = field_ptr(header, field);
    if (p)
        __atomic_store_n(p, value, __ATOMIC_SEQ_CST);
}

/* ------------------------------------------------------------------------ */
/* copies with wrap-around                                                   */

static inline uint32_t copy_in(struct uvb_ring *r, uint32_t pos, const void *src, uint32_t len)
{
    uint32_t first = r->dsize - pos;
    if (len <= first) {
        memcpy(r->data + pos, src, len);
    } else {
        memcpy(r->data + pos, src, first);
        memcpy(r->data, (const uint8_t *)src + first, len - first);
    }
    return wrap((uint64_t)pos + len, r->dsize);
}

static inline uint32_t zero_in(struct uvb_ring *r, uint32_t pos, uint32_t len)
{
    uint32_t first = r->dsize - pos;
    if (len <= first) {
        memset(r->data + pos, 0, len);
    } else {
        memset(r->data + pos, 0, first);
        memset(r->data, 0, len - first);
    }
    return wrap((uint64_t)pos + len, r->dsize);
}

static inline void copy_out(const struct uvb_ring *r, uint32_t pos, void *dst, uint32_t len)
{
    uint32_t first = r->dsize - pos;
    if (len <= first) {
        memcpy(dst, r->data + pos, len);
    } else {
        memcpy(dst, r->data + pos, first);
        memcpy((uint8_t *)dst + first, r->data, len - first);
    }
}

/* ------------------------------------------------------------------------ */
/* recording (trace.h): every packet a commit publishes or releases          */

/* Writer: record the packets in [from, to) at commit (ours: no peer writes
 * them).  The walk still re-checks every length and stops at the first that
 * does not fit.  Readers record each packet from its validated private copy
 * as uvb_in_read hands it out (record_in). */
static void __attribute__((noinline)) record_span(struct uvb_ring *r, uint32_t from, uint32_t to)
{
    struct uvb_rec_port *p = r->rec;
    uint32_t dir = (r->kind == UVB_RING_OUT) == (p->side == UVB_TRACE_SIDE_GUEST)
                       ? UVB_TRACE_DIR_G2H : UVB_TRACE_DIR_H2G;
    uint64_t ts = uvb_rec_clock();
    uint32_t left = dist(from, to, r->dsize), pos = from;
    while (left >= DESC + TRAILER) {
        struct vmpacket_descriptor d;
        copy_out(r, pos, &d, DESC);
        uint32_t pktlen = (uint32_t)d.len8 * 8u;
        if (pktlen < DESC || pktlen + TRAILER > left)
            break;
        uint32_t first = r->dsize - pos;
        if (first >= pktlen)
            uvb_rec_ring_packet(p, dir, ts, r->data + pos, pktlen, NULL, 0);
        else
            uvb_rec_ring_packet(p, dir, ts, r->data + pos, first, r->data, pktlen - first);
        pos = wrap((uint64_t)pos + pktlen + TRAILER, r->dsize);
        left -= pktlen + TRAILER;
    }
}

static void __attribute__((noinline)) record_in(struct uvb_ring *r, const uint8_t *pkt, uint32_t len,
                                                uint64_t *ts)
{
    struct uvb_rec_port *p = r->rec;
    uint32_t dir = p->side == UVB_TRACE_SIDE_GUEST ? UVB_TRACE_DIR_H2G : UVB_TRACE_DIR_G2H;
    if (*ts == 0)
        *ts = uvb_rec_clock();                     /* one clock read per batch */
    uvb_rec_ring_packet(p, dir, *ts, pkt, len, NULL, 0);
}

/* ------------------------------------------------------------------------ */
/* writer                                                                    */

/* Free bytes (after our private cursor) and whether a packet of `total`
 * bytes (trailer included) fits: the ring must never become exactly full. */
static inline int out_room(struct uvb_ring *r, uint32_t *free_out)
{
    uint32_t rd = 0;
    int rc = load_index(r, &r->ctl->read_index, "read_index", &rd);
    if (rc)
        return rc;
    *free_out = r->dsize - dist(rd, r->cursor, r->dsize);
    return 0;
}

uint32_t uvb_out_free(const struct uvb_ring *rc)
{
    struct uvb_ring *r = (struct uvb_ring *)rc;
    uint32_t f;
    if (r->error || out_room(r, &f))
        return 0;
    return f > TRAILER ? f - TRAILER : 0;
}

uint32_t uvb_out_max_payload(const struct uvb_ring *r, uint32_t ext_len)
{
    uint64_t hdr = DESC + (uint64_t)ext_len;
    uint64_t by_ring = r->dsize > hdr + 2 * TRAILER ? r->dsize - hdr - 2 * TRAILER : 0;
    uint64_t by_len8 = 0xFFFFull * 8 > hdr ? 0xFFFFull * 8 - hdr : 0;
    uint64_t m = by_ring < by_len8 ? by_ring : by_len8;
    return (uint32_t)(m & ~7ull);
}

/* Size checks shared by every writer. Returns total ring bytes or < 0. */
static inline int64_t out_sizes(struct uvb_ring *r, uint32_t ext_len, uint64_t payload,
                                uint32_t *pktlen_out)
{
    if (ext_len & 7u)
        return UVB_EINVAL;
    uint64_t hdr = DESC + (uint64_t)ext_len;
    uint64_t pktlen = (hdr + payload + 7u) & ~7ull;
    if (pktlen / 8 > 0xFFFF || pktlen + TRAILER >= r->dsize)
        return UVB_EINVAL;
    *pktlen_out = (uint32_t)pktlen;
    return (int64_t)(pktlen + TRAILER);
}

int uvb_out_put(struct uvb_ring *r, uint16_t type, uint16_t flags, uint64_t trans_id,
                const void *ext, uint32_t ext_len, const struct uvb_iov *iov, uint32_t iovcnt)
{
    if (r->error)
        return r->error;
    if (r->kind != UVB_RING_OUT)
        return UVB_EINVAL;
    uint64_t payload = 0;
    for (uint32_t i = 0; i < iovcnt; i++)
        payload += iov[i].len;
    uint32_t pktlen;
    int64_t total = out_sizes(r, ext_len, payload, &pktlen);
    if (total < 0)
        return (int)total;
    uint32_t free_bytes;
    int rc = out_room(r, &free_bytes);
    if (rc)
        return rc;
    if (free_bytes <= (uint64_t)total) {
        r->full++;
        return UVB_EAGAIN;
    }
    uint32_t start = r->cursor;
    struct vmpacket_descriptor d = {
        .type = type,
        .offset8 = (uint16_t)((DESC + ext_len) / 8),
        .len8 = (uint16_t)(pktlen / 8),
        .flags = flags,
        .trans_id = trans_id,
    };
    uint32_t pos = copy_in(r, start, &d, DESC);
    if (ext_len)
        pos = copy_in(r, pos, ext, ext_len);
    for (uint32_t i = 0; i < iovcnt; i++)
        if (iov[i].len)
            pos = copy_in(r, pos, iov[i].base, iov[i].len);
    uint32_t pad = pktlen - (uint32_t)(DESC + ext_len + payload);
    if (pad)
        pos = zero_in(r, pos, pad);
    uint64_t trailer = (uint64_t)start << 32;
    r->cursor = copy_in(r, pos, &trailer, TRAILER);
    r->packets++;
    r->bytes += payload;
    return UVB_OK;
}

/* In-band/completion fast path: one descriptor + one payload, no ext header.
 * `free_bytes` is the caller's running view of free space. */
static inline int put_inband(struct uvb_ring *r, uint16_t type, uint16_t flags, uint64_t tid,
                             const void *payload, uint32_t len, uint32_t *free_bytes)
{
    uint32_t pktlen = (DESC + len + 7u) & ~7u;
    uint32_t total = pktlen + TRAILER;
    if (pktlen / 8 > 0xFFFF || total >= r->dsize)
        return UVB_EINVAL;
    if (*free_bytes <= total) {
        int rc = out_room(r, free_bytes);       /* reader may have moved: reload */
        if (rc)
            return rc;
        if (*free_bytes <= total) {
            r->full++;
            return UVB_EAGAIN;
        }
    }
    uint32_t start = r->cursor;
    struct vmpacket_descriptor d = {type, DESC / 8, (uint16_t)(pktlen / 8), flags, tid};
    if ((uint64_t)start + total <= r->dsize) {
        /* contiguous: the common case */
        uint8_t *p = r->data + start;
        memcpy(p, &d, DESC);
        memcpy(p + DESC, payload, len);
        uint32_t pad = pktlen - DESC - len;
        if (pad)
            memset(p + DESC + len, 0, pad);
        uint64_t trailer = (uint64_t)start << 32;
        memcpy(p + pktlen, &trailer, TRAILER);
        r->cursor = wrap((uint64_t)start + total, r->dsize);
    } else {
        uint32_t pos = copy_in(r, start, &d, DESC);
        pos = copy_in(r, pos, payload, len);
        if (pktlen - DESC - len)
            pos = zero_in(r, pos, pktlen - DESC - len);
        uint64_t trailer = (uint64_t)start << 32;
        r->cursor = copy_in(r, pos, &trailer, TRAILER);
    }
    *free_bytes -= total;
    r->packets++;
    r->bytes += len;
    return UVB_OK;
}

int uvb_out_inband(struct uvb_ring *r, uint16_t type, uint16_t flags, uint64_t trans_id,
                   const void *payload, uint32_t len)
{
    if (r->error)
        return r->error;
    if (r->kind != UVB_RING_OUT)
        return UVB_EINVAL;
    uint32_t free_bytes = 0;
    return put_inband(r, type, flags, trans_id, payload, len, &free_bytes);
}

int uvb_out_inband_burst(struct uvb_ring *r, uint16_t type, uint16_t flags,
                         const uint8_t *buf, const uint32_t *lens,
                         const uint64_t *trans_ids, uint64_t tid_base, uint32_t n)
{
    if (r->error)
        return r->error;
    if (r->kind != UVB_RING_OUT)
        return UVB_EINVAL;
    uint32_t free_bytes = 0;
    uint64_t off = 0;
    uint32_t i;
    for (i = 0; i < n; i++) {
        uint64_t tid = trans_ids ? trans_ids[i] : tid_base + i;
        int rc = put_inband(r, type, flags, tid, buf + off, lens[i], &free_bytes);
        if (rc == UVB_EAGAIN)
            break;
        if (rc < 0)
            return i ? (int)i : rc;
        off += lens[i];
    }
    return (int)i;
}

int uvb_out_gpa_direct(struct uvb_ring *r, uint16_t flags, uint64_t trans_id,
                       const struct uvb_gpa *ranges, uint32_t nranges,
                       const uint64_t *pfns, uint32_t npfns,
                       const struct uvb_iov *iov, uint32_t iovcnt)
{
    if (r->error)
        return r->error;
    if (nranges == 0)
        return UVB_EINVAL;
    /* ext = {reserved u32, range_cnt u32} + ranges with their pfns */
    uint64_t need_pfns = 0;
    for (uint32_t i = 0; i < nranges; i++) {
        if (ranges[i].byte_count == 0 || ranges[i].byte_offset >= HV_HYP_PAGE_SIZE)
            return UVB_EINVAL;
        need_pfns += ((uint64_t)ranges[i].byte_offset + ranges[i].byte_count + HV_HYP_PAGE_SIZE - 1) /
                     HV_HYP_PAGE_SIZE;
    }
    if (need_pfns != npfns)
        return UVB_EINVAL;
    uint64_t ext_len = 8 + 8ull * nranges + 8ull * npfns;
    if (ext_len > 0xFFFF * 8ull)
        return UVB_EINVAL;
    uint8_t stackbuf[1024];
    uint8_t *ext = ext_len <= sizeof stackbuf ? stackbuf : malloc(ext_len);
    if (!ext)
        return UVB_EINVAL;
    uint32_t hdr[2] = {0, nranges};
    memcpy(ext, hdr, 8);
    uint64_t off = 8, pi = 0;
    for (uint32_t i = 0; i < nranges; i++) {
        memcpy(ext + off, &ranges[i], 8);
        off += 8;
        uint64_t n = ((uint64_t)ranges[i].byte_offset + ranges[i].byte_count + HV_HYP_PAGE_SIZE - 1) /
                     HV_HYP_PAGE_SIZE;
        memcpy(ext + off, pfns + pi, 8 * n);
        off += 8 * n;
        pi += n;
    }
    int rc = uvb_out_put(r, VMBUS_PKT_GPA_DIRECT, flags, trans_id, ext, (uint32_t)ext_len, iov, iovcnt);
    if (ext != stackbuf)
        free(ext);
    return rc;
}

int uvb_out_xfer_pages(struct uvb_ring *r, uint16_t flags, uint64_t trans_id,
                       uint16_t pageset_id, uint8_t sender_owns,
                       const struct vmtransfer_page_range *ranges, uint32_t nranges,
                       const void *payload, uint32_t len)
{
    if (r->error)
        return r->error;
    uint64_t ext_len = 8 + 8ull * nranges;
    if (ext_len > 0xFFFF * 8ull)
        return UVB_EINVAL;
    uint8_t stackbuf[4096];
    uint8_t *ext = ext_len <= sizeof stackbuf ? stackbuf : malloc(ext_len);
    if (!ext)
        return UVB_EINVAL;
    struct {
        uint16_t id;
        uint8_t owns;
        uint8_t rsvd;
        uint32_t cnt;
    } h = {pageset_id, sender_owns, 0, nranges};
    memcpy(ext, &h, 8);
    memcpy(ext + 8, ranges, 8ull * nranges);
    struct uvb_iov iov = {payload, len};
    int rc = uvb_out_put(r, VMBUS_PKT_XFER_PAGES, flags, trans_id, ext, (uint32_t)ext_len, &iov, 1);
    if (ext != stackbuf)
        free(ext);
    return rc;
}

int uvb_out_commit(struct uvb_ring *r)
{
    if (r->error)
        return r->error;
    uint32_t old = r->committed;
    if (r->cursor == old)
        return 0;
    if (__builtin_expect(r->rec != NULL, 0))
        record_span(r, old, r->cursor);
    st_rel(&r->ctl->write_index, r->cursor);     /* packet bytes before the index */
    r->committed = r->cursor;
    r->commits++;
    full_mb();                                    /* index store before mask/read loads */
    if (ld_rlx(&r->ctl->interrupt_mask))
        return 0;                                 /* reader asked not to be interrupted */
    uint32_t rd = ld_acq(&r->ctl->read_index);
    if (rd == old) {                              /* ring was empty before this commit */
        r->signals++;
        return 1;
    }
    return 0;
}

void uvb_out_rollback(struct uvb_ring *r)
{
    r->cursor = r->committed;
}

int uvb_out_pending(const struct uvb_ring *r)
{
    return r->cursor != r->committed;
}

int uvb_out_want_space(struct uvb_ring *r, uint32_t bytes)
{
    if (r->error)
        return r->error;
    uint32_t f;
    int rc = out_room(r, &f);
    if (rc)
        return rc;
    if (f > bytes) {
        uvb_out_clear_want(r);
        return 1;
    }
    /* The reader signals when free space rises above pending_send_sz. Ask for
     * at least a quarter of the ring so we are not woken for every packet. */
    uint32_t want = bytes;
    if (want < r->dsize / 4)
        want = r->dsize / 4;
    if (want >= r->dsize - TRAILER)
        want = r->dsize - 2 * TRAILER;
    want &= ~7u;
    r->pending_wanted = want;
    __atomic_store_n(&r->ctl->pending_send_sz, want, __ATOMIC_SEQ_CST);
    full_mb();
    rc = out_room(r, &f);                         /* the reader may have raced us */
    if (rc)
        return rc;
    if (f > bytes) {
        uvb_out_clear_want(r);
        return 1;
    }
    return 0;
}

void uvb_out_clear_want(struct uvb_ring *r)
{
    if (r->pending_wanted) {
        __atomic_store_n(&r->ctl->pending_send_sz, 0, __ATOMIC_SEQ_CST);
        r->pending_wanted = 0;
    }
}

/* ------------------------------------------------------------------------ */
/* reader                                                                    */

int uvb_in_avail(struct uvb_ring *r)
{
    if (r->error)
        return r->error;
    uint32_t w = 0;
    int rc = load_index(r, &r->ctl->write_index, "write_index", &w);
    if (rc)
        return rc;
    return (int)dist(r->cursor, w, r->dsize);
}

/* Validate the type-specific extended header of a packet already copied to
 * private memory at `p` (pktlen bytes). */
static int check_ext(struct uvb_ring *r, const uint8_t *p, const struct vmpacket_descriptor *d,
                     uint32_t at)
{
    uint32_t hdr = (uint32_t)d->offset8 * 8u;
    if (d->type == VMBUS_PKT_XFER_PAGES) {
        uint32_t cnt;
        if (hdr < sizeof(struct vmtransfer_page_header))
            return die(r, "%s: transfer-page packet at %#x has header %u < 24 bytes", dir_name(r), at, hdr);
        memcpy(&cnt, p + 20, 4);
        if ((uint64_t)cnt * 8u > hdr - 24u)
            return die(r, "%s: transfer-page packet at %#x claims %u ranges but its header holds %u",
                       dir_name(r), at, cnt, (hdr - 24u) / 8u);
    } else if (d->type == VMBUS_PKT_GPA_DIRECT) {
        uint32_t cnt;
        if (hdr < sizeof(struct vmgpa_direct_header))
            return die(r, "%s: GPA-direct packet at %#x has header %u < 24 bytes", dir_name(r), at, hdr);
        memcpy(&cnt, p + 20, 4);
        if (cnt == 0)
            return die(r, "%s: GPA-direct packet at %#x has no ranges", dir_name(r), at);
        uint32_t off = 24;
        for (uint32_t i = 0; i < cnt; i++) {
            struct vmgpa_range g;
            if (off + 8u > hdr)
                return die(r, "%s: GPA-direct packet at %#x: range %u outside the header", dir_name(r), at, i);
            memcpy(&g, p + off, 8);
            if (g.byte_count == 0 || g.byte_offset >= HV_HYP_PAGE_SIZE)
                return die(r, "%s: GPA-direct packet at %#x: range %u has count %u offset %#x",
                           dir_name(r), at, i, g.byte_count, g.byte_offset);
            uint64_t n = ((uint64_t)g.byte_offset + g.byte_count + HV_HYP_PAGE_SIZE - 1) / HV_HYP_PAGE_SIZE;
            if (off + 8u + 8u * n > hdr)
                return die(r, "%s: GPA-direct packet at %#x: range %u needs %llu PFNs beyond the header",
                           dir_name(r), at, i, (unsigned long long)n);
            off += 8u + 8u * (uint32_t)n;
        }
    }
    return 0;
}

/* Copy the packet at the cursor into dst (which has room `room`), validate it
 * and fill `pkt`. `avail` = bytes published after the cursor.  Does not move
 * the cursor. Returns 0, UVB_ENOBUFS (pkt->pkt_len = bytes needed) or error. */
static int fetch_one(struct uvb_ring *r, uint32_t avail, uint8_t *dst, uint32_t room,
                     struct uvb_pkt *pkt)
{
    uint32_t at = r->cursor;
    if (avail < DESC + TRAILER)
        return die(r, "%s: only %u bytes published at %#x: less than a descriptor and trailer",
                   dir_name(r), avail, at);
    if (room < DESC) {
        pkt->pkt_len = DESC;
        return UVB_ENOBUFS;
    }
    struct vmpacket_descriptor d;
    copy_out(r, at, dst, DESC);                   /* one fetch; validate the copy */
    memcpy(&d, dst, DESC);
    if (d.offset8 < 2 || d.len8 < d.offset8)
        return die(r, "%s: packet at %#x has offset8 %u len8 %u (need 2 <= offset8 <= len8)",
                   dir_name(r), at, d.offset8, d.len8);
    if (d.flags & ~VMBUS_PKT_FLAG_COMPLETION_REQUESTED)
        return die(r, "%s: packet at %#x has unknown flags %#x", dir_name(r), at, d.flags);
    if (d.type != VMBUS_PKT_INBAND && d.type != VMBUS_PKT_XFER_PAGES &&
        d.type != VMBUS_PKT_GPA_DIRECT && d.type != VMBUS_PKT_COMP)
        return die(r, "%s: packet at %#x has unknown type %u", dir_name(r), at, d.type);
    uint32_t pktlen = (uint32_t)d.len8 * 8u;
    if ((uint64_t)pktlen + TRAILER > avail)
        return die(r, "%s: packet at %#x is %u bytes but only %u are published",
                   dir_name(r), at, pktlen, avail);
    if (room < pktlen) {
        pkt->pkt_len = pktlen;
        return UVB_ENOBUFS;
    }
    copy_out(r, wrap((uint64_t)at + DESC, r->dsize), dst + DESC, pktlen - DESC);
    int rc = check_ext(r, dst, &d, at);
    if (rc)
        return rc;
    pkt->type = d.type;
    pkt->flags = d.flags;
    pkt->pkt_len = pktlen;
    pkt->data_offset = (uint32_t)d.offset8 * 8u;
    pkt->data_len = pktlen - pkt->data_offset;
    pkt->reserved = 0;
    pkt->trans_id = d.trans_id;
    return 0;
}

int uvb_in_peek(struct uvb_ring *r, struct uvb_pkt *pkt)
{
    if (r->error)
        return r->error;
    int avail = uvb_in_avail(r);
    if (avail <= 0)
        return avail;
    struct vmpacket_descriptor d;
    if ((uint32_t)avail < DESC + TRAILER)
        return die(r, "%s: only %d bytes published at %#x", dir_name(r), avail, r->cursor);
    copy_out(r, r->cursor, &d, DESC);
    if (d.offset8 < 2 || d.len8 < d.offset8 || (uint64_t)d.len8 * 8u + TRAILER > (uint32_t)avail)
        return die(r, "%s: packet at %#x has offset8 %u len8 %u with %d bytes published",
                   dir_name(r), r->cursor, d.offset8, d.len8, avail);
    if (d.flags & ~VMBUS_PKT_FLAG_COMPLETION_REQUESTED)
        return die(r, "%s: packet at %#x has unknown flags %#x", dir_name(r), r->cursor, d.flags);
    if (d.type != VMBUS_PKT_INBAND && d.type != VMBUS_PKT_XFER_PAGES &&
        d.type != VMBUS_PKT_GPA_DIRECT && d.type != VMBUS_PKT_COMP)
        return die(r, "%s: packet at %#x has unknown type %u", dir_name(r), r->cursor, d.type);
    pkt->type = d.type;
    pkt->flags = d.flags;
    pkt->pkt_offset = 0;
    pkt->pkt_len = (uint32_t)d.len8 * 8u;
    pkt->data_offset = (uint32_t)d.offset8 * 8u;
    pkt->data_len = pkt->pkt_len - pkt->data_offset;
    pkt->trans_id = d.trans_id;
    return 1;
}

int uvb_in_read(struct uvb_ring *r, uint8_t *buf, uint32_t buflen, struct uvb_pkt *pkts, uint32_t max)
{
    if (r->error)
        return r->error;
    if (r->kind != UVB_RING_IN)
        return UVB_EINVAL;
    int a = uvb_in_avail(r);
    if (a <= 0)
        return a;
    uint32_t avail = (uint32_t)a, used = 0, n = 0;
    uint64_t ts = 0;
    while (n < max && avail > 0) {
        struct uvb_pkt *p = &pkts[n];
        int rc = fetch_one(r, avail, buf + used, buflen - used, p);
        if (rc == UVB_ENOBUFS)
            return n ? (int)n : UVB_ENOBUFS;
        if (rc < 0)
            return rc;
        p->pkt_offset = used;
        p->data_offset += used;
        if (__builtin_expect(r->rec != NULL, 0)) {
            /* record the validated private copy, once: a reader may hand packets back
             * (cursor moved back) and read them again before it commits */
            uint32_t off = dist(r->committed, r->cursor, r->dsize);
            if (off >= r->rec_ahead) {
                record_in(r, buf + used, p->pkt_len, &ts);
                r->rec_ahead = off + p->pkt_len + TRAILER;
            }
        }
        uint32_t adv = p->pkt_len + TRAILER;
        r->cursor = wrap((uint64_t)r->cursor + adv, r->dsize);
        avail -= adv;
        used += (p->pkt_len + 7u) & ~7u;
        r->packets++;
        r->bytes += p->data_len;
        n++;
    }
    return (int)n;
}

int uvb_in_commit(struct uvb_ring *r)
{
    if (r->error)
        return r->error;
    uint32_t old = r->committed;
    if (r->cursor == old)
        return 0;
    uint32_t bytes_read = dist(old, r->cursor, r->dsize);
    r->rec_ahead = r->rec_ahead > bytes_read ? r->rec_ahead - bytes_read : 0;
    st_rel(&r->ctl->read_index, r->cursor);      /* after all reads of packet data */
    r->committed = r->cursor;
    r->commits++;
    if (!(ld_rlx(&r->ctl->feature_bits) & VMBUS_RING_FEAT_PENDING_SEND_SZ))
        return 0;
    full_mb();
    uint32_t pending = ld_rlx(&r->ctl->pending_send_sz);
    if (pending == 0)
        return 0;
    uint32_t w = 0;
    int rc = load_index(r, &r->ctl->write_index, "write_index", &w);
    if (rc)
        return rc;
    int64_t cur_free = (int64_t)r->dsize - dist(r->cursor, w, r->dsize);
    if (cur_free <= (int64_t)pending)
        return 0;                                  /* still not enough for the writer */
    /* Free space before this commit.  Negative when the writer already wrote into the
     * space we just freed (it ran after our publish, so it is not waiting on us): the
     * kernel's u32 arithmetic wraps to "more than pending" there, i.e. no signal. */
    if (cur_free < (int64_t)bytes_read || cur_free - (int64_t)bytes_read > (int64_t)pending)
        return 0;                                  /* it already had enough: not blocked on us */
    r->signals++;
    return 1;
}

void uvb_in_rollback(struct uvb_ring *r)
{
    r->cursor = r->committed;
}

void uvb_in_set_mask(struct uvb_ring *r, uint32_t masked)
{
    __atomic_store_n(&r->ctl->interrupt_mask, masked ? 1u : 0u, __ATOMIC_SEQ_CST);
}

uint32_t uvb_in_mask(const struct uvb_ring *r)
{
    return __atomic_load_n(&r->ctl->interrupt_mask, __ATOMIC_SEQ_CST);
}

int uvb_in_arm(struct uvb_ring *r)
{
    if (r->error)
        return r->error;
    if (r->cursor != r->committed)
        return UVB_EINVAL;                         /* commit reads before sleeping */
    __atomic_store_n(&r->ctl->interrupt_mask, 0u, __ATOMIC_SEQ_CST);
    full_mb();
    int a = uvb_in_avail(r);
    if (a < 0)
        return a;
    return a > 0;
}

/* ------------------------------------------------------------------------ */
/* signalling                                                                */

void uvb_monitor_trigger(void *monitor_page, uint32_t monitor_id)
{
    if (!monitor_page || monitor_id >= HV_MONITOR_IDS)
        return;
    struct hv_monitor_page *m = monitor_page;
    __atomic_fetch_or(&m->trigger_group[monitor_id / 32].pending, 1u << (monitor_id % 32),
                      __ATOMIC_SEQ_CST);
}

uint32_t uvb_monitor_take(void *monitor_page, uint32_t group)
{
    if (!monitor_page || group >= 4)
        return 0;
    struct hv_monitor_page *m = monitor_page;
    return __atomic_exchange_n(&m->trigger_group[group].pending, 0u, __ATOMIC_SEQ_CST);
}

void uvb_intpage_set(void *bitmap, uint32_t relid)
{
    uint32_t *w = (uint32_t *)bitmap + relid / 32;
    __atomic_fetch_or(w, 1u << (relid % 32), __ATOMIC_SEQ_CST);
}

int uvb_intpage_test_clear(void *bitmap, uint32_t relid)
{
    uint32_t *w = (uint32_t *)bitmap + relid / 32;
    uint32_t bit = 1u << (relid % 32);
    return (__atomic_fetch_and(w, ~bit, __ATOMIC_SEQ_CST) & bit) != 0;
}

int uvb_signal(struct uvb_signal *s)
{
    if (s->monitor_page) {
        uvb_monitor_trigger(s->monitor_page, s->monitor_id);
        s->count++;
        return 0;
    }
    if (s->int_page_send && s->relid < 8 * 2048)
        uvb_intpage_set(s->int_page_send, s->relid);
    if (s->fd >= 0) {
        uint32_t one = 1;
        for (;;) {
            ssize_t n = s->fd_is_socket ? send(s->fd, &one, 4, MSG_NOSIGNAL) : write(s->fd, &one, 4);
            if (n == 4)
                break;
            if (n < 0 && errno == EINTR)
                continue;
            return UVB_EIO;
        }
    }
    s->count++;
    return 0;
}

int uvb_out_commit_signal(struct uvb_ring *r, struct uvb_signal *s)
{
    int rc = uvb_out_commit(r);
    if (rc <= 0)
        return rc;
    rc = uvb_signal(s);
    return rc < 0 ? rc : 1;
}

int uvb_in_commit_signal(struct uvb_ring *r, struct uvb_signal *s)
{
    int rc = uvb_in_commit(r);
    if (rc <= 0)
        return rc;
    rc = uvb_signal(s);
    return rc < 0 ? rc : 1;
}

/* ------------------------------------------------------------------------ */
/* benchmark reference loop                                                  */

int64_t uvb_bench_loop(struct uvb_ring *out, struct uvb_ring *in, uint32_t size,
                       uint64_t count, uint32_t burst, uint8_t *scratch, uint32_t scratch_len)
{
    if (burst == 0 || burst > 4096 || !scratch)
        return UVB_EINVAL;
    uint8_t *payload = calloc(1, size ? size : 1);
    struct uvb_pkt *pk = calloc(burst, sizeof *pk);
    if (!payload || !pk) {
        free(payload);
        free(pk);
        return UVB_EINVAL;
    }
    uint64_t done = 0;
    int64_t result = 0;
    while (done < count) {
        uint32_t n = (uint32_t)(count - done < burst ? count - done : burst);
        uint32_t free_bytes = 0, put = 0;
        for (; put < n; put++) {
            int rc = put_inband(out, VMBUS_PKT_INBAND, 0, done + put, payload, size, &free_bytes);
            if (rc == UVB_EAGAIN)
                break;
            if (rc < 0) {
                result = rc;
                goto out;
            }
        }
        uvb_out_commit(out);
        int got = uvb_in_read(in, scratch, scratch_len, pk, put ? put : 1);
        if (got < 0) {
            result = got;
            goto out;
        }
        uvb_in_commit(in);
        done += (uint64_t)got;
        if (got == 0 && put == 0) {
            result = UVB_EINVAL;                   /* no progress: ring too small */
            goto out;
        }
    }
    result = (int64_t)done;
out:
    free(payload);
    free(pk);
    return result;
}

uint64_t uvb_now_ns(void)
{
    return mono_ns();
}
