/*
 * DMA memory helpers (read by the C compiler and by cffi's cdef).
 *
 * Guest side: pin memory (mlock) and release simulated guest RAM back to the
 * file (hole punch).  Host side: copy between a caller buffer and guest RAM
 * described by one GPA-direct range, with every PFN bounds-checked first, so
 * C host code (and uvmbus.dma.GuestRam) never touches memory outside the
 * guest RAM mapping.  See uvmbus/dma/sim.py for the guest-RAM file format.
 *
 * PFNs are Hyper-V 4 KiB page numbers (GPA >> 12); guest RAM PFN `base_pfn`
 * is byte 0 of the mapping.
 */

#define UVB_GPA_OK       0
#define UVB_GPA_ERANGE  -34   /* malformed range: count 0, offset > 0xfff, too few PFNs */
#define UVB_GPA_EFAULT  -14   /* a PFN lies outside guest RAM (*bad = its index) */

#define UVB_GPA_FROM_RAM 0    /* guest RAM -> buf (host reads guest memory) */
#define UVB_GPA_TO_RAM   1    /* buf -> guest RAM (host writes guest memory) */

/* mlock(2)/munlock(2) of [addr, addr+len): 0, or the errno value. */
int uvb_dma_mlock(void *addr, size_t len);
int uvb_dma_munlock(void *addr, size_t len);

/* Give [off, off+len) of a file back to the filesystem (reads as zeros
 * afterwards): fallocate(PUNCH_HOLE|KEEP_SIZE).  0, or the errno value. */
int uvb_dma_punch(int fd, uint64_t off, uint64_t len);

/* Host view of guest RAM made of several objects (the RAM file, then the NIC buffers
 * that the simulated kernel GPADL'd, which on Hyper-V are ordinary guest pages): reserve
 * one address range (no access, no memory), then map objects into it at fixed places.
 * uvb_dma_reserve returns NULL on failure (errno kept); the others 0 or the errno value.
 * uvb_dma_map_fixed maps fd [0, len) shared read/write at addr (inside a reservation);
 * uvb_dma_zero_fixed puts private zero pages there instead (memory given back). */
void *uvb_dma_reserve(uint64_t len);
int uvb_dma_map_fixed(void *addr, uint64_t len, int fd, uint64_t off);
int uvb_dma_zero_fixed(void *addr, uint64_t len);
int uvb_dma_unmap(void *addr, uint64_t len);

/* Check a GPA range against guest RAM [base_pfn, base_pfn + ram_size/4096):
 * byte_count != 0, byte_offset <= 0xfff, npfns >= ceil((offset+count)/4096),
 * and every PFN the range touches inside RAM.  Returns UVB_GPA_OK or an
 * UVB_GPA_* error; on EFAULT stores the offending index in *bad (if non-NULL). */
int uvb_gpa_check(uint64_t ram_size, uint64_t base_pfn,
                  const uint64_t *pfns, uint32_t npfns,
                  uint32_t byte_offset, uint32_t byte_count, uint32_t *bad);

/* uvb_gpa_check, then copy byte_count bytes between guest RAM and buf in the
 * direction `dir` (UVB_GPA_FROM_RAM / UVB_GPA_TO_RAM).  Nothing is copied
 * unless the whole range is valid. */
int uvb_gpa_copy(uint8_t *ram, uint64_t ram_size, uint64_t base_pfn,
                 const uint64_t *pfns, uint32_t npfns,
                 uint32_t byte_offset, uint32_t byte_count,
                 uint8_t *buf, int dir, uint32_t *bad);
