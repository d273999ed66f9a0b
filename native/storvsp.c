/*
 * StorVSP host model fast path: see storvsp.h.  Written from
 * ../shared/reference/storvsc_ic.md §5 (host behaviour) and §3.2 (ranges).
 */
#define _GNU_SOURCE
#include "uvmbus.h"
#include "util.h"

#include <errno.h>
#include <sched.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define HV_PAGE 4096u
#define IOV_BATCH 256u

static inline uint32_t be16(const uint8_t *p) { return (uint32_t)p[0] << 8 | p[1]; }
static inline uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t be64(const uint8_t *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }

static inline uint32_t ring_bytes(uint32_t payload)
{
    return ((DESC + payload + 7u) & ~7u) + TRAILER;
}

/* ------------------------------------------------------------------------ */
/* LUN table                                                                 */

int uvb_vsp_disk_attach(struct uvb_vsp *v, uint32_t lun, int fd, uint32_t block_shift,
                        uint64_t nblocks, uint32_t readonly, uint32_t slow,
                        const uint8_t *map, uint64_t map_len)
{
    if (lun >= v->max_luns || fd < 0 || (block_shift != 9 && block_shift != 12))
        return UVB_EINVAL;
    struct uvb_vsp_disk *d = &v->disks[lun];
    __atomic_store_n(&d->present, 0u, __ATOMIC_SEQ_CST);
    d->fd = fd;
    d->block_shift = block_shift;
    d->nblocks = nblocks;
    d->readonly = readonly;
    d->slow = slow;
    d->map = map;
    d->map_len = map ? map_len : 0;
    d->reads = d->writes = d->read_bytes = d->write_bytes = d->flushes = 0;
    __atomic_store_n(&d->present, 1u, __ATOMIC_SEQ_CST);   /* publish last */
    return 0;
}

int uvb_vsp_disk_detach(struct uvb_vsp *v, uint32_t lun)
{
    if (lun >= v->max_luns)
        return UVB_EINVAL;
    __atomic_store_n(&v->disks[lun].present, 0u, __ATOMIC_SEQ_CST);
    return 0;
}

void uvb_vsp_set_slow(struct uvb_vsp *v, uint32_t lun, uint32_t slow)
{
    if (lun < v->max_luns)
        __atomic_store_n(&v->disks[lun].slow, slow, __ATOMIC_SEQ_CST);
}

void uvb_vsp_set_ready(struct uvb_vsp *v, uint32_t ready)
{
    __atomic_store_n(&v->ready, ready, __ATOMIC_SEQ_CST);
}

/* ------------------------------------------------------------------------ */
/* data mover                                                                */

/* Do the whole iovec list at `off`, resuming after short transfers. */
static int xfer_iov(int fd, int write, int fua, struct iovec *iov, int cnt, uint64_t off,
                    uint32_t *err)
{
    while (cnt > 0) {
        ssize_t n;
        if (write && fua) {
            n = pwritev2(fd, iov, cnt, (off_t)off, RWF_DSYNC);
            if (n < 0 && (errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL)) {
                n = pwritev(fd, iov, cnt, (off_t)off);
                if (n >= 0 && fdatasync(fd) != 0)
                    n = -1;
            }
        } else if (write) {
            n = pwritev(fd, iov, cnt, (off_t)off);
        } else {
            n = preadv(fd, iov, cnt, (off_t)off);
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            *err = (uint32_t)errno;
            return UVB_VSP_EIO;
        }
        if (n == 0) {
            if (write) {
                *err = EIO;
                return UVB_VSP_EIO;
            }
            for (int i = 0; i < cnt; i++)      /* past the end of the image: zeros */
                memset(iov[i].iov_base, 0, iov[i].iov_len);
            return 0;
        }
        off += (uint64_t)n;
        size_t left = (size_t)n;
        while (cnt > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0 && left) {
            iov->iov_base = (uint8_t *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return 0;
}

const uint8_t *uvb_vsp_map(int fd, uint64_t len, int32_t *err)
{
    void *p = mmap(NULL, (size_t)len, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        if (err)
            *err = errno;
        return NULL;
    }
    return p;
}

int uvb_vsp_unmap(const uint8_t *map, uint64_t len)
{
    return map && munmap((void *)map, (size_t)len) != 0 ? errno : 0;
}

int uvb_vsp_rw(const struct uvb_vsp *v, int fd, const uint8_t *map, uint64_t map_len,
               uint32_t flags, uint64_t file_off, uint32_t len,
               const uint64_t *pfns, uint32_t npfns, uint32_t byte_offset, uint32_t *bad)
{
    uint32_t dummy;
    if (!bad)
        bad = &dummy;
    if (len == 0)
        return 0;
    int rc = uvb_gpa_check(v->ram_size, v->base_pfn, pfns, npfns, byte_offset, len, bad);
    if (rc == UVB_GPA_EFAULT)
        return UVB_VSP_EFAULT;
    if (rc != UVB_GPA_OK)
        return UVB_VSP_ERANGE;
    int write = (flags & UVB_VSP_WRITE) != 0, fua = (flags & UVB_VSP_FUA) != 0;
    if (!write && map && file_off <= map_len && len <= map_len - file_off) {
        /* page cache mapping: copy page by page into guest RAM */
        uint32_t done = 0, in_page = byte_offset;
        for (uint32_t i = 0; done < len; i++) {
            uint32_t n = HV_PAGE - in_page;
            if (n > len - done)
                n = len - done;
            memcpy(v->ram + (pfns[i] - v->base_pfn) * HV_PAGE + in_page, map + file_off + done, n);
            done += n;
            in_page = 0;
        }
        return 0;
    }
    struct iovec iov[IOV_BATCH];
    int cnt = 0;
    uint64_t batch_off = file_off, batch_len = 0;
    uint32_t done = 0, in_page = byte_offset;
    for (uint32_t i = 0; done < len; i++) {
        uint32_t n = HV_PAGE - in_page;
        if (n > len - done)
            n = len - done;
        uint8_t *p = v->ram + (pfns[i] - v->base_pfn) * HV_PAGE + in_page;
        if (cnt && (uint8_t *)iov[cnt - 1].iov_base + iov[cnt - 1].iov_len == p) {
            iov[cnt - 1].iov_len += n;          /* physically contiguous: extend the run */
        } else {
            if (cnt == (int)IOV_BATCH) {
                rc = xfer_iov(fd, write, fua, iov, cnt, batch_off, bad);
                if (rc)
                    return rc;
                batch_off += batch_len;
                batch_len = 0;
                cnt = 0;
            }
            iov[cnt].iov_base = p;
            iov[cnt].iov_len = n;
            cnt++;
        }
        batch_len += n;
        done += n;
        in_page = 0;
    }
    return cnt ? xfer_iov(fd, write, fua, iov, cnt, batch_off, bad) : 0;
}

/* ------------------------------------------------------------------------ */
/* pump                                                                      */

static int commit_both(struct uvb_vsp_chan *c)
{
    int sig = 0;
    int rc = uvb_out_commit(c->rx);       /* completions first: the guest may be waiting */
    if (rc < 0)
        return rc;
    sig |= rc;
    rc = uvb_in_commit(c->tx);             /* then free TX space (pending_send_sz) */
    if (rc < 0)
        return rc;
    sig |= rc;
    if (sig)
        uvb_host_interrupt(c->irq);
    return 0;
}

/* What the fast path decided for one packet. */
struct decision {
    uint32_t reply_len;         /* payload bytes of the completion */
    uint32_t xfer;              /* data_transfer_length of the completion */
    uint32_t lun;
    uint32_t kind;              /* 0 none, 1 read, 2 write, 3 flush */
    uint32_t fua;
    uint64_t lba;
    uint32_t bytes;
    uint32_t byte_offset;
    const uint64_t *pfns;
    uint32_t npfns;
};

/* Classify one packet; 1 = the fast path takes it (filled `d`), 0 = Python. */
static int classify(struct uvb_vsp_chan *c, const struct uvb_pkt *p, struct decision *d)
{
    struct uvb_vsp *v = c->vsp;
    if (!(p->flags & VMBUS_PKT_FLAG_COMPLETION_REQUESTED))
        return 0;
    if (p->type != VMBUS_PKT_INBAND && p->type != VMBUS_PKT_GPA_DIRECT)
        return 0;
    if (p->data_len < VSTOR_HEADER_SIZE)
        return 0;
    const uint8_t *payload = c->scratch + p->data_offset;
    uint32_t op;
    memcpy(&op, payload, 4);
    if (op != VSTOR_OP_EXECUTE_SRB || !__atomic_load_n(&v->ready, __ATOMIC_ACQUIRE))
        return 0;
    uint32_t req = p->data_len - VSTOR_HEADER_SIZE;
    if (req > VSTOR_SRB_LEN_V2)
        req = VSTOR_SRB_LEN_V2;
    struct vstor_srb srb;
    memset(&srb, 0, sizeof srb);
    memcpy(&srb, payload + VSTOR_HEADER_SIZE, req);
    d->reply_len = VSTOR_HEADER_SIZE + req;
    uint32_t dtl = srb.data_transfer_length;
    d->pfns = NULL;
    d->npfns = 0;
    d->byte_offset = 0;
    if (p->type == VMBUS_PKT_GPA_DIRECT) {
        const uint8_t *h = c->scratch + p->pkt_offset + DESC;   /* {reserved, count, ranges} */
        uint32_t cnt, bc, bo;
        memcpy(&cnt, h + 4, 4);
        if (cnt != 1)
            return 0;
        memcpy(&bc, h + 8, 4);
        memcpy(&bo, h + 12, 4);
        if (dtl > bc)
            return 0;
        d->byte_offset = bo;
        d->pfns = (const uint64_t *)(h + 16);
        d->npfns = (bo + bc + HV_PAGE - 1) / HV_PAGE;
    } else if (dtl != 0) {
        return 0;
    }
    if (srb.path_id || srb.target_id || srb.lun >= v->max_luns)
        return 0;
    struct uvb_vsp_disk *disk = &v->disks[srb.lun];
    if (!__atomic_load_n(&disk->present, __ATOMIC_ACQUIRE) ||
        __atomic_load_n(&disk->slow, __ATOMIC_RELAXED))
        return 0;
    d->lun = srb.lun;
    const uint8_t *cdb = srb.payload;
    uint64_t lba;
    uint32_t blocks;
    switch (cdb[0]) {
    case 0x00:                                  /* TEST UNIT READY */
        d->kind = 0;
        d->xfer = 0;
        return 1;
    case 0x35:                                  /* SYNCHRONIZE CACHE(10) */
    case 0x91:                                  /* SYNCHRONIZE CACHE(16) */
        d->kind = 3;
        d->xfer = 0;
        return 1;
    case 0x28:                                  /* READ(10) */
    case 0x2A:                                  /* WRITE(10) */
        if (cdb[1] & 0x01)                      /* RelAdr */
            return 0;
        lba = be32(cdb + 2);
        blocks = be16(cdb + 7);
        break;
    case 0x88:                                  /* READ(16) */
    case 0x8A:                                  /* WRITE(16) */
        lba = be64(cdb + 2);
        blocks = be32(cdb + 10);
        break;
    default:
        return 0;
    }
    int write = cdb[0] == 0x2A || cdb[0] == 0x8A;
    if (blocks == 0 || lba >= disk->nblocks || blocks > disk->nblocks - lba)
        return 0;
    uint64_t bytes = (uint64_t)blocks << disk->block_shift;
    if (bytes > dtl || !d->pfns)
        return 0;
    if (write ? (srb.data_in != VSTOR_DATA_OUT || disk->readonly) : srb.data_in == VSTOR_DATA_OUT)
        return 0;
    d->kind = write ? 2 : 1;
    d->fua = (cdb[1] & 0x08) != 0;
    d->lba = lba;
    d->bytes = (uint32_t)bytes;
    d->xfer = (uint32_t)bytes;
    return 1;
}

/* Execute a classified request; 0 done, else leave it to Python. */
static int execute(struct uvb_vsp_chan *c, struct decision *d)
{
    struct uvb_vsp_disk *disk = &c->vsp->disks[d->lun];
    uint32_t bad = 0;
    switch (d->kind) {
    case 0:
        return 0;
    case 3:
        if (fdatasync(disk->fd) != 0)
            return -1;
        __atomic_fetch_add(&disk->flushes, 1, __ATOMIC_RELAXED);
        return 0;
    default: {
        uint32_t flags = (d->kind == 2 ? UVB_VSP_WRITE : 0) | (d->fua ? UVB_VSP_FUA : 0);
        int rc = uvb_vsp_rw(c->vsp, disk->fd, disk->map, disk->map_len, flags,
                            d->lba << disk->block_shift, d->bytes, d->pfns, d->npfns,
                            d->byte_offset, &bad);
        if (rc)
            return -1;
        if (d->kind == 2) {
            __atomic_fetch_add(&disk->writes, 1, __ATOMIC_RELAXED);
            __atomic_fetch_add(&disk->write_bytes, d->bytes, __ATOMIC_RELAXED);
        } else {
            __atomic_fetch_add(&disk->reads, 1, __ATOMIC_RELAXED);
            __atomic_fetch_add(&disk->read_bytes, d->bytes, __ATOMIC_RELAXED);
        }
        return 0;
    }
    }
}

static int put_success(struct uvb_vsp_chan *c, uint64_t tid, const struct decision *d)
{
    struct vstor_packet r;
    memset(&r, 0, sizeof r);
    r.operation = VSTOR_OP_COMPLETE_IO;
    r.status = NT_STATUS_SUCCESS;
    r.u.srb.length = VSTOR_SRB_LEN_V2;
    r.u.srb.srb_status = SRB_STATUS_SUCCESS;
    r.u.srb.scsi_status = SCSI_STATUS_GOOD;
    r.u.srb.cdb_length = VSTOR_MAX_CDB_LEN;
    r.u.srb.sense_info_length = VSTOR_SENSE_SIZE;
    r.u.srb.data_transfer_length = d->xfer;
    return uvb_out_inband(c->rx, VMBUS_PKT_COMP, 0, tid, &r, d->reply_len);
}

int uvb_vsp_pump(struct uvb_vsp_chan *c)
{
    struct uvb_ring *in = c->tx, *out = c->rx;
    uint64_t idle_since = 0;
    uint32_t cached_free = 0, since_commit = 0;
    for (;;) {
        if (__atomic_load_n(c->kick, __ATOMIC_ACQUIRE)) {
            int rc = commit_both(c);
            return rc < 0 ? rc : UVB_HOST_KICKED;
        }
        uint32_t start = in->cursor;
        int n = uvb_in_read(in, c->scratch, c->scratch_len, c->pkts, c->max_pkts);
        c->polls++;
        if (n == UVB_ENOBUFS) {
            int rc = commit_both(c);
            return rc < 0 ? rc : UVB_HOST_SLOWPATH;
        }
        if (n < 0)
            return n;
        if (n == 0) {
            int rc = commit_both(c);
            if (rc < 0)
                return rc;
            uint64_t limit = c->spin_ns;
            if (c->poll_ns > limit &&
                __atomic_load_n(&out->ctl->read_index, __ATOMIC_ACQUIRE) != out->committed)
                limit = c->poll_ns;             /* completions unread: more requests coming */
            if (!limit)
                return UVB_HOST_IDLE;
            uint64_t now = mono_ns();
            if (!idle_since)
                idle_since = now;
            else if (now - idle_since >= limit)
                return UVB_HOST_IDLE;
            sched_yield();          /* poll on idle cycles only */
            continue;
        }
        idle_since = 0;
        c->batches++;
        uint32_t pos = start;
        for (int i = 0; i < n; i++) {
            struct uvb_pkt *p = &c->pkts[i];
            struct decision d;
            int fast = !c->slow_all && classify(c, p, &d);
            uint32_t need = fast ? ring_bytes(d.reply_len) : 0;
            if (fast && cached_free < need) {
                cached_free = uvb_out_free(out);
                if (out->error)
                    return out->error;
            }
            if (fast && cached_free >= need && execute(c, &d) != 0)
                fast = 0;
            if (!fast || cached_free < need) {
                /* give packet i (and the rest of the batch) back to the ring */
                in->cursor = pos;
                in->packets -= (uint64_t)(n - i);
                int rc = commit_both(c);
                if (rc < 0)
                    return rc;
                if (!fast)
                    return UVB_HOST_SLOWPATH;
                rc = uvb_host_want_space(out, need, c->irq);
                if (rc < 0)
                    return rc;
                if (rc == 0)
                    return UVB_HOST_RXFULL;
                cached_free = 0;
                goto next_batch;                 /* space appeared meanwhile: re-read */
            }
            int rc = put_success(c, p->trans_id, &d);
            if (rc < 0)
                return rc;
            cached_free -= need;
            c->fast++;
            if (c->commit_every && ++since_commit >= c->commit_every) {
                since_commit = 0;
                rc = uvb_out_commit(out);       /* completions out early: pipelining */
                if (rc < 0)
                    return rc;
                if (rc == 1)
                    uvb_host_interrupt(c->irq);
            }
            pos += p->pkt_len + TRAILER;
            if (pos >= in->dsize)
                pos -= in->dsize;
        }
        {
            int rc = commit_both(c);
            if (rc < 0)
                return rc;
        }
    next_batch:;
    }
}
