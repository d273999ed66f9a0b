/*
 * Packet recorder: pcapng Enhanced Packet Blocks built in C (see trace.h and
 * trace_wire.h; docs/trace.md describes the file format).
 */
#define _GNU_SOURCE
#include "uvmbus.h"
#include "trace_int.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sched.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define EPB_HEAD 28u                       /* type, len, iface, ts hi/lo, cap, orig */
#define EPB_TAIL 4u
#define HDR      ((uint32_t)sizeof(struct uvb_trace_hdr))
#define CHUNK    ((uint32_t)sizeof(struct uvb_trace_chunk))

_Static_assert(sizeof(struct uvb_trace_hdr) == 32, "trace header layout");
_Static_assert(sizeof(struct uvb_trace_chunk) == 16, "trace chunk layout");
_Static_assert(sizeof(struct uvb_trace_event) == 24, "trace event layout");

static inline uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

uint64_t uvb_rec_clock(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int uvb_rec_init(struct uvb_rec *rec, uint8_t *buf, uint32_t cap, int fd)
{
    memset(rec, 0, sizeof *rec);
    rec->buf = buf;
    rec->cap = cap & ~3u;
    rec->fd = fd;
    rec->dirfd = -1;
    return buf && cap >= 4096 ? 0 : UVB_EINVAL;
}

void uvb_rec_lock(struct uvb_rec *rec)
{
    unsigned spins = 0;
    while (__atomic_exchange_n(&rec->lock, 1u, __ATOMIC_ACQUIRE)) {
        if (++spins > 64)
            sched_yield();
    }
}

void uvb_rec_unlock(struct uvb_rec *rec)
{
    __atomic_store_n(&rec->lock, 0u, __ATOMIC_RELEASE);
}

/* Write len bytes at p to the current file. Lock held. */
static int write_all(struct uvb_rec *rec, const uint8_t *p, uint32_t len)
{
    uint32_t done = 0;
    while (done < len) {
        ssize_t n = write(rec->fd, p + done, len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            rec->write_errors++;
            rec->last_errno = n < 0 ? errno : EIO;
            rec->dropped++;
            rec->file_bytes += done;
            return -rec->last_errno;
        }
        done += (uint32_t)n;
    }
    rec->file_bytes += done;
    return 0;
}

/* Bytes of the whole blocks at buf[from, upto) that fit in `room` (at least the first
 * block when `first` is set: a block larger than a file still goes somewhere). */
static uint32_t whole_blocks(const struct uvb_rec *rec, uint32_t from, uint32_t upto, uint64_t space, int first)
{
    uint32_t at = from;
    while (upto - at >= 8) {
        uint32_t len = get32(rec->buf + at + 4);
        if (len < 12 || len > upto - at)
            break;                          /* not a block boundary: never split here */
        if (at + len - from > space && !(first && at == from))
            break;
        at += len;
    }
    return at - from;
}

/* Start the next file of the series: create it, write its head, close the old one.
 * Returns 1 on success; 0 leaves the current file in place. Lock held. */
static int next_file(struct uvb_rec *rec)
{
    char name[sizeof rec->stem + 48];
    int n = snprintf(name, sizeof name, "%s.%llu.pcapng.part", rec->stem,
                     (unsigned long long)rec->file_index + 1);
    if (n <= 0 || (size_t)n >= sizeof name)
        goto fail_errno_name;
    int fd = openat(rec->dirfd, name, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
    if (fd < 0)
        goto fail;
    uint32_t done = 0;
    while (done < rec->head_len) {
        ssize_t w = write(fd, rec->head + done, rec->head_len - done);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            int e = w < 0 ? errno : EIO;
            close(fd);
            unlinkat(rec->dirfd, name, 0);
            errno = e;
            goto fail;
        }
        done += (uint32_t)w;
    }
    close(rec->fd);
    rec->fd = fd;
    rec->file_bytes = rec->head_len;
    __atomic_store_n(&rec->file_index, rec->file_index + 1, __ATOMIC_RELEASE);
    return 1;
fail_errno_name:
    errno = ENAMETOOLONG;
fail:
    rec->rotate_errors++;
    rec->last_errno = errno;
    return 0;
}

/* Remove the Interface Description Blocks from buf[from, *upto): the new file's head
 * already holds every IDB handed over so far. Lock held. */
static void drop_idbs(struct uvb_rec *rec, uint32_t from, uint32_t *upto)
{
    uint32_t at = from;
    while (*upto - at >= 8) {
        uint32_t len = get32(rec->buf + at + 4);
        if (len < 12 || len > *upto - at)
            break;
        if (get32(rec->buf + at) == 1u) {
            memmove(rec->buf + at, rec->buf + at + len, rec->used - at - len);
            rec->used -= len;
            *upto -= len;
        } else {
            at += len;
        }
    }
}

/* Write buf[0, upto) out (whole blocks only: callers cut at block boundaries), starting
 * the next file of a rotation where the current one would pass rotate_bytes; keep
 * buf[upto, used). Lock held. */
static int write_out(struct uvb_rec *rec, uint32_t upto)
{
    int rc = 0;
    uint32_t done = 0;
    while (done < upto && rc == 0) {
        uint32_t n = upto - done;
        if (rec->rotate_bytes && rec->dirfd >= 0 && rec->file_bytes + n > rec->rotate_bytes) {
            uint64_t space = rec->file_bytes < rec->rotate_bytes ? rec->rotate_bytes - rec->file_bytes : 0;
            int fresh = rec->file_bytes <= rec->head_len;      /* nothing but its head yet */
            n = whole_blocks(rec, done, upto, space, fresh);
            if (n == 0) {
                if (!fresh && next_file(rec)) {
                    drop_idbs(rec, done, &upto);
                    continue;
                }
                n = upto - done;            /* no next file: never lose records, grow this one */
            }
        }
        rc = write_all(rec, rec->buf + done, n);
        done += n;
    }
    memmove(rec->buf, rec->buf + upto, rec->used - upto);
    rec->used -= upto;
    return rc;
}

int uvb_rec_flush(struct uvb_rec *rec)
{
    uvb_rec_lock(rec);
    int rc = rec->used ? write_out(rec, rec->used) : 0;
    uvb_rec_unlock(rec);
    return rc;
}

/* Append a whole block in stream order; `head`: make it (and its length) what the next
 * file starts with once the block is in the buffer. */
static int raw_locked(struct uvb_rec *rec, const void *data, uint32_t len, const uint8_t *head, uint32_t head_len)
{
    if (rec->cap - rec->used < len && rec->used)
        write_out(rec, rec->used);       /* may start the next file with the old head */
    if (rec->cap - rec->used < len) {
        rec->dropped++;
        return UVB_ENOBUFS;
    }
    memcpy(rec->buf + rec->used, data, len);
    rec->used += len;
    rec->bytes += len;
    if (head) {
        rec->head = head;
        rec->head_len = head_len;
    }
    return 0;
}

int uvb_rec_raw(struct uvb_rec *rec, const void *data, uint32_t len)
{
    uvb_rec_lock(rec);
    int rc = raw_locked(rec, data, len, NULL, 0);
    uvb_rec_unlock(rec);
    return rc;
}

int uvb_rec_idb(struct uvb_rec *rec, const void *idb, uint32_t len, const uint8_t *head, uint32_t head_len)
{
    if (!head)
        return UVB_EINVAL;
    uvb_rec_lock(rec);
    int rc = raw_locked(rec, idb, len, head, head_len);
    uvb_rec_unlock(rec);
    return rc;
}

/* Make `need` more bytes free after rec->used, keeping the open record that
 * starts at *start (bytes [*start, used) move with it).  Lock held. */
static int room(struct uvb_rec *rec, uint32_t *start, uint32_t need)
{
    if (rec->cap - rec->used >= need)
        return 1;
    if (*start)
        write_out(rec, *start);
    *start = 0;
    return rec->cap - rec->used >= need;
}

static inline void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

/* Open a block for interface `iface`; returns its start offset, or -1 (dropped). */
static int64_t open_block(struct uvb_rec *rec, uint32_t first)
{
    uint32_t start = rec->used;
    if (!room(rec, &start, EPB_HEAD + HDR + first + EPB_TAIL + 4)) {
        rec->dropped++;
        return -1;
    }
    start = rec->used;
    rec->used += EPB_HEAD;
    return start;
}

static void close_block(struct uvb_rec *rec, uint32_t start, uint32_t iface, uint64_t ts)
{
    uint32_t cap = rec->used - start - EPB_HEAD;
    uint32_t pad = (4u - (cap & 3u)) & 3u;
    memset(rec->buf + rec->used, 0, pad);
    rec->used += pad;
    uint32_t total = rec->used - start + EPB_TAIL;
    uint8_t *b = rec->buf + start;
    put32(b, 6);
    put32(b + 4, total);
    put32(b + 8, iface);
    put32(b + 12, (uint32_t)(ts >> 32));
    put32(b + 16, (uint32_t)ts);
    put32(b + 20, cap);
    put32(b + 24, cap);
    put32(rec->buf + rec->used, total);
    rec->used += EPB_TAIL;
    rec->records++;
    rec->bytes += total;
}

static void fill_hdr(uint8_t *at, const struct uvb_rec_port *p, uint32_t kind, uint32_t dir, uint32_t len)
{
    struct uvb_trace_hdr h = {
        .version = UVB_TRACE_VERSION, .kind = (uint8_t)kind, .dir = (uint8_t)dir, .side = p->side,
        .devclass = p->devclass, .flags = 0, .subchan = p->subchan, .relid = p->relid,
        .pkt_len = len, .pkt_cap = len,
    };
    memcpy(at, &h, HDR);
}

/* Append one attachment chunk of `src` (len bytes, `cap` of them copied). */
static int add_chunk(struct uvb_rec *rec, uint32_t *start, uint16_t source, uint16_t index,
                     uint32_t offset, uint32_t len, const uint8_t *src, uint32_t cap)
{
    if (!room(rec, start, CHUNK + cap + EPB_TAIL + 4))
        return 0;
    struct uvb_trace_chunk c = {source, index, offset, len, cap};
    memcpy(rec->buf + rec->used, &c, CHUNK);
    memcpy(rec->buf + rec->used + CHUNK, src, cap);
    rec->used += CHUNK + cap;
    return 1;
}

/* How much of a referenced buffer to keep. */
static uint32_t snap(const struct uvb_rec *rec, const struct uvb_rec_port *p, const uint8_t *src,
                     uint32_t len)
{
    uint32_t cap = len < rec->snaplen ? len : rec->snaplen;
    if (rec->no_payload) {
        if (p->devclass != UVB_TRACE_CLASS_NET)
            return 0;
        /* RNDIS data messages: headers and per-packet info only, never the frame */
        if (len >= sizeof(struct rndis_packet) && get32(src) == RNDIS_MSG_PACKET) {
            uint32_t keep = 8u + get32(src + 8);
            if (keep < cap)
                cap = keep;
        }
    }
    return cap;
}

/* Attach what the packet at buf[pkt, pkt+len) refers to. Lock held. */
static void attach(struct uvb_rec *rec, const struct uvb_rec_port *p, uint32_t dir, uint32_t *start,
                   uint32_t hdr_at_rel, uint32_t len)
{
    /* hdr/packet live at buf[*start + hdr_at_rel ...]: re-derive after every room() */
#define PKT() (rec->buf + *start + hdr_at_rel + HDR)
    uint8_t flags = 0;
    uint32_t att_orig = 0;
    uint16_t type = get16(PKT());
    uint32_t off8 = (uint32_t)get16(PKT() + 2) * 8u;
    if (type == VMBUS_PKT_XFER_PAGES && len >= 24) {
        uint16_t id = get16(PKT() + 16);
        uint32_t cnt = get32(PKT() + 20);
        const struct uvb_rec_region *reg = NULL;
        for (uint32_t i = 0; i < p->npagesets && i < UVB_REC_MAX_PAGESETS; i++)
            if (p->pagesets[i].id == id)
                reg = &p->pagesets[i];
        for (uint32_t i = 0; i < cnt && 24u + 8u * (i + 1) <= len && 24u + 8u * (i + 1) <= off8; i++) {
            uint32_t bc = get32(PKT() + 24 + 8 * i), bo = get32(PKT() + 28 + 8 * i);
            att_orig += bc;
            if (!reg || (uint64_t)bo + bc > reg->len) {
                flags |= UVB_TRACE_F_ATT_LOST;
                continue;
            }
            uint32_t cap = snap(rec, p, reg->base + bo, bc);
            if (cap < bc)
                flags |= UVB_TRACE_F_ATT_TRUNC;
            if (!add_chunk(rec, start, UVB_TRACE_CHUNK_XFER, (uint16_t)i, bo, bc, reg->base + bo, cap)) {
                flags |= UVB_TRACE_F_ATT_TRUNC;
                break;
            }
        }
    } else if (type == VMBUS_PKT_INBAND && p->devclass == UVB_TRACE_CLASS_NET && dir == UVB_TRACE_DIR_G2H &&
               off8 + sizeof(struct nvsp_send_rndis_pkt) <= len &&
               get32(PKT() + off8) == NVSP_MSG1_TYPE_SEND_RNDIS_PKT) {
        uint32_t idx = get32(PKT() + off8 + 8), sz = get32(PKT() + off8 + 12);
        const struct uvb_rec_region *sb = &p->sendbuf;
        if (idx != NVSP_SECTION_INDEX_NONE) {
            att_orig = sz;
            uint64_t o = (uint64_t)idx * sb->section_size;
            if (!sb->base || sz > sb->section_size || o + sz > sb->len) {
                flags |= UVB_TRACE_F_ATT_LOST;
            } else {
                uint32_t cap = snap(rec, p, sb->base + o, sz);
                if (cap < sz)
                    flags |= UVB_TRACE_F_ATT_TRUNC;
                if (!add_chunk(rec, start, UVB_TRACE_CHUNK_SECTION, 0, (uint32_t)o, sz, sb->base + o, cap))
                    flags |= UVB_TRACE_F_ATT_TRUNC;
            }
        }
    }
    /* learn the section size from the host's answer to the send buffer (both sides) */
    if ((type == VMBUS_PKT_COMP || type == VMBUS_PKT_INBAND) && p->devclass == UVB_TRACE_CLASS_NET &&
        dir == UVB_TRACE_DIR_H2G && off8 + sizeof(struct nvsp_send_send_buf_complete) <= len &&
        get32(PKT() + off8) == NVSP_MSG1_TYPE_SEND_SEND_BUF_COMPLETE &&
        get32(PKT() + off8 + 4) == NVSP_STAT_SUCCESS)
        ((struct uvb_rec_port *)p)->sendbuf.section_size = get32(PKT() + off8 + 8);
    if (rec->no_payload)
        flags |= UVB_TRACE_F_NO_PAYLOAD;
    /* a room() may have moved the block to the start of the buffer */
    uint8_t *h = rec->buf + *start + hdr_at_rel;
    struct uvb_trace_hdr hd;
    memcpy(&hd, h, HDR);
    hd.flags |= flags;
    hd.att_orig = att_orig;
    hd.att_len = rec->used - (*start + hdr_at_rel + HDR + len);
    memcpy(h, &hd, HDR);
#undef PKT
}

/* Record one ring packet given as up to two segments (ring wrap). */
void uvb_rec_ring_packet(struct uvb_rec_port *p, uint32_t dir, uint64_t ts,
                         const uint8_t *a, uint32_t alen, const uint8_t *b, uint32_t blen)
{
    struct uvb_rec *rec = p->rec;
    uint32_t len = alen + blen;
    uvb_rec_lock(rec);
    int64_t s = open_block(rec, len);
    if (s >= 0) {
        uint32_t start = (uint32_t)s;
        fill_hdr(rec->buf + rec->used, p, UVB_TRACE_KIND_PACKET, dir, len);
        memcpy(rec->buf + rec->used + HDR, a, alen);      /* one copy; parse the copy only */
        if (blen)
            memcpy(rec->buf + rec->used + HDR + alen, b, blen);
        rec->used += HDR + len;
        if (rec->snaplen && len >= 16)
            attach(rec, p, dir, &start, EPB_HEAD, len);
        close_block(rec, start, p->iface, ts);
    }
    uvb_rec_unlock(rec);
}

int uvb_rec_packet(struct uvb_rec_port *p, uint32_t dir, const void *pkt, uint32_t len)
{
    if (!p || !p->rec)
        return UVB_EINVAL;
    uint64_t dropped = p->rec->dropped;
    uvb_rec_ring_packet(p, dir, uvb_rec_clock(), pkt, len, NULL, 0);
    return p->rec->dropped == dropped ? 0 : UVB_ENOBUFS;
}

int uvb_rec_event(struct uvb_rec_port *p, uint32_t dir, uint32_t code, uint32_t arg0, uint64_t arg1,
                  const char *text, uint32_t text_len)
{
    if (!p || !p->rec)
        return UVB_EINVAL;
    struct uvb_rec *rec = p->rec;
    if (text_len > 1024)
        text_len = 1024;
    uint32_t len = (uint32_t)sizeof(struct uvb_trace_event) + text_len;
    uint64_t ts = uvb_rec_clock();
    int rc = 0;
    uvb_rec_lock(rec);
    int64_t s = open_block(rec, len);
    if (s >= 0) {
        fill_hdr(rec->buf + rec->used, p, UVB_TRACE_KIND_EVENT, dir, len);
        struct uvb_trace_event e = {code, arg0, arg1, text_len, 0};
        memcpy(rec->buf + rec->used + HDR, &e, sizeof e);
        if (text_len)
            memcpy(rec->buf + rec->used + HDR + sizeof e, text, text_len);
        rec->used += HDR + len;
        close_block(rec, (uint32_t)s, p->iface, ts);
    } else {
        rc = UVB_ENOBUFS;
    }
    uvb_rec_unlock(rec);
    return rc;
}
