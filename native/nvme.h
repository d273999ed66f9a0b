/*
 * NVMe queue-pair fast path and VFIO/MMIO helpers (read by the C compiler and by cffi).
 *
 * A `struct uvb_nvme_qp` is one submission/completion queue pair.  Python allocates the
 * queue memory (DMA), one 4 KiB PRP-list page per command id, and the per-cid tables, fills
 * the struct and creates the queues on the controller; from then on C does the hot path:
 *
 * - uvb_nvme_submit() builds one SQE per `struct uvb_nvme_io` (command id from a free
 *   list, PRP1/PRP2 or a PRP list from the buffer's DMA page numbers), and writes the SQ
 *   tail doorbell ONCE for the whole batch;
 * - uvb_nvme_reap() consumes completion entries while their phase tag matches, validates
 *   each (command id in range and outstanding, SQ head in range: the device is not
 *   trusted to be sane), returns tag + status per completion and writes the CQ head
 *   doorbell once;
 * - uvb_nvme_submit_slots() resubmits prebuilt requests at new LBAs (the IoBatch path).
 *
 * DMA addresses are 4 KiB page numbers (`pfns`, as in uvmbus.dma: IOVA >> 12 with an
 * IOMMU, guest-physical >> 12 without), so the controller's memory page size is 4 KiB.
 */

#define UVB_NVME_MAX_DEPTH   4096
#define UVB_NVME_PRP_PER_PAGE 512

/* uvb_nvme_io.kind */
#define UVB_NVME_IO_READ     0
#define UVB_NVME_IO_WRITE    1
#define UVB_NVME_IO_FLUSH    2
#define UVB_NVME_IO_ZEROES   3
#define UVB_NVME_IO_DSM      4   /* data = DSM ranges, nlb = number of ranges */

/* uvb_nvme_io.flags */
#define UVB_NVME_IO_FUA      1

/* return codes (< 0) */
#define UVB_NVME_EFULL      -1101   /* no free command id / SQ slot: reap first */
#define UVB_NVME_EREQ       -1102   /* malformed request (errmsg says which) */
#define UVB_NVME_ECQE       -1103   /* the controller posted an invalid completion */
#define UVB_NVME_EDEAD      -1104   /* the queue was marked dead (fatal status, removal) */

struct uvb_nvme_io {
    uint64_t tag;                /* caller's id, returned by reap */
    const uint64_t *pfns;        /* DMA page numbers (4 KiB) of the data, first page first */
    uint64_t slba;
    uint32_t nlb;                /* blocks (1-based count; DSM: ranges) */
    uint32_t length;             /* data bytes (0: none) */
    uint32_t byte_offset;        /* data start inside its first page, < 4096 */
    uint32_t nsid;
    uint8_t  kind;
    uint8_t  flags;
    uint8_t  rsvd[6];
};

struct uvb_nvme_qp {
    struct uvb_nvme_sqe *sq;
    volatile struct uvb_nvme_cqe *cq;
    volatile uint32_t *sq_db;
    volatile uint32_t *cq_db;
    uint64_t *cid_tag;           /* [depth] caller tag per command id */
    uint8_t  *cid_busy;          /* [depth] */
    uint16_t *free_cids;         /* [depth] stack */
    uint64_t *prp_va;            /* PRP list pages: cid i at prp_va + i * 512 */
    uint64_t prp_dma;            /* DMA address of the first PRP list page */
    uint32_t depth;              /* entries in each queue (<= CAP.MQES + 1) */
    uint32_t nfree;
    uint32_t sq_tail;
    uint32_t cq_head;
    uint32_t phase;
    uint32_t inflight;
    uint32_t max_pages;          /* largest transfer in 4 KiB pages (MDTS, PRP list) */
    uint16_t qid;
    uint16_t dead;
    uint64_t submitted;
    uint64_t completed;
    uint64_t sq_doorbells;
    uint64_t cq_doorbells;
    char errmsg[160];
};

/* Reset the ring state and the cid free list of a filled-in queue pair. */
void uvb_nvme_qp_reset(struct uvb_nvme_qp *qp);

/* Build and queue `n` I/O commands; one SQ doorbell.  Returns how many were queued
 * (fewer when command ids ran out), or UVB_NVME_EREQ/EDEAD. */
int uvb_nvme_submit(struct uvb_nvme_qp *qp, const struct uvb_nvme_io *ios, uint32_t n);

/* Queue one raw SQE (admin commands); cid set by C.  0, or UVB_NVME_EFULL/EDEAD. */
int uvb_nvme_submit_raw(struct uvb_nvme_qp *qp, const struct uvb_nvme_sqe *sqe, uint64_t tag);

/* Resubmit table[slots[i]] at lbas[i] (kinds[i] when kinds != NULL) for i < n; one doorbell. */
int uvb_nvme_submit_slots(struct uvb_nvme_qp *qp, struct uvb_nvme_io *table,
                          const uint64_t *slots, const uint64_t *lbas, const uint8_t *kinds,
                          uint32_t n);

/* Up to `max` completions: tags[i], status[i] (status field without the phase bit: 0 =
 * success), dw0[i] (may be NULL).  One CQ doorbell.  Returns the count or UVB_NVME_ECQE. */
int uvb_nvme_reap(struct uvb_nvme_qp *qp, uint64_t *tags, uint16_t *status, uint32_t *dw0,
                  uint32_t max);

/* ioctl(2): the result (>= 0) or -errno. */
long uvb_ioctl_ptr(int fd, unsigned long request, void *arg);
long uvb_ioctl_int(int fd, unsigned long request, unsigned long arg);

/* 32/64-bit MMIO accesses (volatile, no tearing of 32-bit accesses). */
uint32_t uvb_mmio_read32(const uint8_t *base, uint32_t off);
void uvb_mmio_write32(uint8_t *base, uint32_t off, uint32_t value);
uint64_t uvb_mmio_read64(const uint8_t *base, uint32_t off);
void uvb_mmio_write64(uint8_t *base, uint32_t off, uint64_t value);   /* low dword first */
