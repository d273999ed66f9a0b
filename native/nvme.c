/* NVMe queue-pair fast path and VFIO/MMIO helpers: see nvme.h. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>

#include "uvmbus.h"

_Static_assert(sizeof(struct uvb_nvme_sqe) == 64, "SQE is 64 bytes");
_Static_assert(sizeof(struct uvb_nvme_cqe) == 16, "CQE is 16 bytes");
_Static_assert(sizeof(struct uvb_nvme_id_ctrl) == 4096, "Identify Controller is 4096 bytes");
_Static_assert(sizeof(struct uvb_nvme_id_ns) == 4096, "Identify Namespace is 4096 bytes");
_Static_assert(offsetof(struct uvb_nvme_id_ctrl, oacs) == 256, "oacs at 256");
_Static_assert(offsetof(struct uvb_nvme_id_ctrl, sqes) == 512, "sqes at 512");
_Static_assert(offsetof(struct uvb_nvme_id_ctrl, oncs) == 520, "oncs at 520");
_Static_assert(offsetof(struct uvb_nvme_id_ctrl, sgls) == 536, "sgls at 536");
_Static_assert(offsetof(struct uvb_nvme_id_ctrl, subnqn) == 768, "subnqn at 768");
_Static_assert(offsetof(struct uvb_nvme_id_ns, lbaf) == 128, "lbaf at 128");
_Static_assert(sizeof(struct vfio_region_info) == 32, "vfio_region_info");
_Static_assert(sizeof(struct vfio_iommu_type1_dma_map) == 32, "dma_map");
_Static_assert(sizeof(struct vfio_irq_set) == 20, "vfio_irq_set header");
_Static_assert(sizeof(struct iommu_ioas_map) == 40, "iommu_ioas_map");
_Static_assert(sizeof(struct iommu_ioas_unmap) == 24, "iommu_ioas_unmap");
_Static_assert(sizeof(struct vfio_device_bind_iommufd) == 16, "bind_iommufd");

#define BARRIER() __atomic_thread_fence(__ATOMIC_SEQ_CST)

void uvb_nvme_qp_reset(struct uvb_nvme_qp *qp)
{
    qp->sq_tail = 0;
    qp->cq_head = 0;
    qp->phase = 1;
    qp->inflight = 0;
    qp->dead = 0;
    qp->nfree = 0;
    /* at most depth - 1 commands in flight: a full SQ has one empty slot */
    for (uint32_t i = qp->depth - 1; i-- > 0;) {
        qp->cid_busy[i] = 0;
        qp->free_cids[qp->nfree++] = (uint16_t)i;
    }
    qp->cid_busy[qp->depth - 1] = 0;
    qp->errmsg[0] = 0;
}

static int take_cid(struct uvb_nvme_qp *qp)
{
    if (!qp->nfree)
        return -1;
    int cid = qp->free_cids[--qp->nfree];
    qp->cid_busy[cid] = 1;
    return cid;
}

static void ring_sq(struct uvb_nvme_qp *qp)
{
    BARRIER();                       /* SQEs visible before the doorbell */
    *qp->sq_db = qp->sq_tail;
    qp->sq_doorbells++;
}

/* Fill PRP1/PRP2 of `e` for `len` bytes at page `pfns[0]` + `off`, using cid's list page. */
static int build_prps(struct uvb_nvme_qp *qp, struct uvb_nvme_sqe *e, uint16_t cid,
                      const uint64_t *pfns, uint32_t off, uint32_t len)
{
    if (off >= 4096 || (off & 3)) {
        snprintf(qp->errmsg, sizeof qp->errmsg, "data offset %u in page not dword aligned or >= 4096", off);
        return -1;
    }
    uint32_t pages = (off + len + 4095) / 4096;
    if (pages > qp->max_pages) {
        snprintf(qp->errmsg, sizeof qp->errmsg, "transfer of %u bytes needs %u pages, more than %u",
                 len, pages, qp->max_pages);
        return -1;
    }
    e->prp1 = (pfns[0] << 12) + off;
    if (pages == 1) {
        e->prp2 = 0;
    } else if (pages == 2) {
        e->prp2 = pfns[1] << 12;
    } else {
        uint64_t *list = qp->prp_va + (size_t)cid * UVB_NVME_PRP_PER_PAGE;
        for (uint32_t i = 1; i < pages; i++)
            list[i - 1] = pfns[i] << 12;
        e->prp2 = qp->prp_dma + (uint64_t)cid * 4096;
    }
    return 0;
}

static int build_io(struct uvb_nvme_qp *qp, const struct uvb_nvme_io *io, uint16_t cid)
{
    struct uvb_nvme_sqe *e = &qp->sq[qp->sq_tail];
    struct uvb_nvme_sqe s;
    memset(&s, 0, sizeof s);
    s.cid = cid;
    s.nsid = io->nsid;
    switch (io->kind) {
    case UVB_NVME_IO_READ:
    case UVB_NVME_IO_WRITE:
        if (!io->length || !io->nlb || io->nlb > 65536 || !io->pfns) {
            snprintf(qp->errmsg, sizeof qp->errmsg, "read/write of %u blocks, %u bytes", io->nlb, io->length);
            return -1;
        }
        s.opc = io->kind == UVB_NVME_IO_READ ? UVB_NVME_CMD_READ : UVB_NVME_CMD_WRITE;
        s.cdw10 = (uint32_t)io->slba;
        s.cdw11 = (uint32_t)(io->slba >> 32);
        s.cdw12 = (io->nlb - 1) | ((io->flags & UVB_NVME_IO_FUA) ? (1u << 30) : 0);
        if (build_prps(qp, &s, cid, io->pfns, io->byte_offset, io->length))
            return -1;
        break;
    case UVB_NVME_IO_FLUSH:
        s.opc = UVB_NVME_CMD_FLUSH;
        break;
    case UVB_NVME_IO_ZEROES:
        if (!io->nlb || io->nlb > 65536) {
            snprintf(qp->errmsg, sizeof qp->errmsg, "write zeroes of %u blocks", io->nlb);
            return -1;
        }
        s.opc = UVB_NVME_CMD_WRITE_ZEROES;
        s.cdw10 = (uint32_t)io->slba;
        s.cdw11 = (uint32_t)(io->slba >> 32);
        s.cdw12 = io->nlb - 1;
        break;
    case UVB_NVME_IO_DSM:
        if (!io->nlb || io->nlb > 256 || !io->pfns || io->length < io->nlb * 16) {
            snprintf(qp->errmsg, sizeof qp->errmsg, "DSM with %u ranges in %u bytes", io->nlb, io->length);
            return -1;
        }
        s.opc = UVB_NVME_CMD_DSM;
        s.cdw10 = io->nlb - 1;
        s.cdw11 = 1u << 2;           /* AD: deallocate */
        if (build_prps(qp, &s, cid, io->pfns, io->byte_offset, io->length))
            return -1;
        break;
    default:
        snprintf(qp->errmsg, sizeof qp->errmsg, "unknown request kind %u", io->kind);
        return -1;
    }
    memcpy(e, &s, sizeof s);
    return 0;
}

static void commit_one(struct uvb_nvme_qp *qp, uint16_t cid, uint64_t tag)
{
    qp->cid_tag[cid] = tag;
    qp->sq_tail = qp->sq_tail + 1 == qp->depth ? 0 : qp->sq_tail + 1;
    qp->inflight++;
    qp->submitted++;
}

static void give_back(struct uvb_nvme_qp *qp, uint16_t cid)
{
    qp->cid_busy[cid] = 0;
    qp->free_cids[qp->nfree++] = cid;
}

int uvb_nvme_submit(struct uvb_nvme_qp *qp, const struct uvb_nvme_io *ios, uint32_t n)
{
    if (qp->dead)
        return UVB_NVME_EDEAD;
    uint32_t done = 0;
    int rc = 0;
    for (; done < n; done++) {
        int cid = take_cid(qp);
        if (cid < 0)
            break;
        if (build_io(qp, &ios[done], (uint16_t)cid)) {
            give_back(qp, (uint16_t)cid);
            rc = UVB_NVME_EREQ;
            break;
        }
        commit_one(qp, (uint16_t)cid, ios[done].tag);
    }
    if (done)
        ring_sq(qp);
    return done ? (int)done : rc;
}

int uvb_nvme_submit_slots(struct uvb_nvme_qp *qp, struct uvb_nvme_io *table,
                          const uint64_t *slots, const uint64_t *lbas, const uint8_t *kinds,
                          uint32_t n)
{
    if (qp->dead)
        return UVB_NVME_EDEAD;
    uint32_t done = 0;
    int rc = 0;
    for (; done < n; done++) {
        struct uvb_nvme_io *io = &table[slots[done]];
        io->slba = lbas[done];
        if (kinds)
            io->kind = kinds[done];
        int cid = take_cid(qp);
        if (cid < 0)
            break;
        if (build_io(qp, io, (uint16_t)cid)) {
            give_back(qp, (uint16_t)cid);
            rc = UVB_NVME_EREQ;
            break;
        }
        commit_one(qp, (uint16_t)cid, io->tag);
    }
    if (done)
        ring_sq(qp);
    return done ? (int)done : rc;
}

int uvb_nvme_submit_raw(struct uvb_nvme_qp *qp, const struct uvb_nvme_sqe *sqe, uint64_t tag)
{
    if (qp->dead)
        return UVB_NVME_EDEAD;
    int cid = take_cid(qp);
    if (cid < 0)
        return UVB_NVME_EFULL;
    struct uvb_nvme_sqe s;
    memcpy(&s, sqe, sizeof s);
    s.cid = (uint16_t)cid;
    memcpy(&qp->sq[qp->sq_tail], &s, sizeof s);
    commit_one(qp, (uint16_t)cid, tag);
    ring_sq(qp);
    return 0;
}

int uvb_nvme_reap(struct uvb_nvme_qp *qp, uint64_t *tags, uint16_t *status, uint32_t *dw0,
                  uint32_t max)
{
    if (qp->dead)
        return UVB_NVME_EDEAD;
    uint32_t n = 0;
    while (n < max) {
        volatile struct uvb_nvme_cqe *c = &qp->cq[qp->cq_head];
        uint16_t st = c->status;
        if ((st & 1) != qp->phase)
            break;
        BARRIER();                   /* read the entry only after its phase tag */
        struct uvb_nvme_cqe e;
        e.dw0 = c->dw0;
        e.sq_head = c->sq_head;
        e.cid = c->cid;
        if (e.cid >= qp->depth || !qp->cid_busy[e.cid] || e.sq_head >= qp->depth) {
            snprintf(qp->errmsg, sizeof qp->errmsg,
                     "queue %u: completion names command id %u (busy=%d), SQ head %u of %u",
                     qp->qid, e.cid, e.cid < qp->depth ? qp->cid_busy[e.cid] : -1, e.sq_head, qp->depth);
            qp->dead = 1;
            return UVB_NVME_ECQE;
        }
        tags[n] = qp->cid_tag[e.cid];
        status[n] = st >> 1;
        if (dw0)
            dw0[n] = e.dw0;
        give_back(qp, e.cid);
        qp->inflight--;
        qp->completed++;
        n++;
        if (++qp->cq_head == qp->depth) {
            qp->cq_head = 0;
            qp->phase ^= 1;
        }
    }
    if (n) {
        BARRIER();
        *qp->cq_db = qp->cq_head;
        qp->cq_doorbells++;
    }
    return (int)n;
}

long uvb_ioctl_ptr(int fd, unsigned long request, void *arg)
{
    long rc = ioctl(fd, request, arg);
    return rc < 0 ? -errno : rc;
}

long uvb_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
    long rc = ioctl(fd, request, arg);
    return rc < 0 ? -errno : rc;
}

uint32_t uvb_mmio_read32(const uint8_t *base, uint32_t off)
{
    return *(const volatile uint32_t *)(base + off);
}

void uvb_mmio_write32(uint8_t *base, uint32_t off, uint32_t value)
{
    BARRIER();
    *(volatile uint32_t *)(base + off) = value;
}

uint64_t uvb_mmio_read64(const uint8_t *base, uint32_t off)
{
    uint32_t lo = *(const volatile uint32_t *)(base + off);
    uint32_t hi = *(const volatile uint32_t *)(base + off + 4);
    return ((uint64_t)hi << 32) | lo;
}

void uvb_mmio_write64(uint8_t *base, uint32_t off, uint64_t value)
{
    BARRIER();
    *(volatile uint32_t *)(base + off) = (uint32_t)value;
    *(volatile uint32_t *)(base + off + 4) = (uint32_t)(value >> 32);
}
