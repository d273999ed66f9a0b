/*
 * DMA memory helpers: see dma.h.
 */
#define _GNU_SOURCE
#include "uvmbus.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>

#define HV_PAGE 4096u

int uvb_dma_mlock(void *addr, size_t len)
{
    return mlock(addr, len) == 0 ? 0 : errno;
}

int uvb_dma_munlock(void *addr, size_t len)
{
    return munlock(addr, len) == 0 ? 0 : errno;
}

int uvb_dma_punch(int fd, uint64_t off, uint64_t len)
{
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
        return 0;
    return errno;
}

void *uvb_dma_reserve(uint64_t len)
{
    void *p = mmap(NULL, (size_t)len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

int uvb_dma_map_fixed(void *addr, uint64_t len, int fd, uint64_t off)
{
    void *p = mmap(addr, (size_t)len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, (off_t)off);
    return p == MAP_FAILED ? errno : 0;
}

int uvb_dma_zero_fixed(void *addr, uint64_t len)
{
    void *p = mmap(addr, (size_t)len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? errno : 0;
}

int uvb_dma_unmap(void *addr, uint64_t len)
{
    return munmap(addr, (size_t)len) == 0 ? 0 : errno;
}

int uvb_gpa_check(uint64_t ram_size, uint64_t base_pfn,
                  const uint64_t *pfns, uint32_t npfns,
                  uint32_t byte_offset, uint32_t byte_count, uint32_t *bad)
{
    if (byte_count == 0 || byte_offset >= HV_PAGE)
        return UVB_GPA_ERANGE;
    uint64_t need = ((uint64_t)byte_offset + byte_count + HV_PAGE - 1) / HV_PAGE;
    if (need > npfns)
        return UVB_GPA_ERANGE;
    uint64_t npages = ram_size / HV_PAGE;
    for (uint64_t i = 0; i < need; i++) {
        /* unsigned wrap makes pfn < base_pfn fail the same test */
        if (pfns[i] - base_pfn >= npages) {
            if (bad)
                *bad = (uint32_t)i;
            return UVB_GPA_EFAULT;
        }
    }
    return UVB_GPA_OK;
}

int uvb_gpa_copy(uint8_t *ram, uint64_t ram_size, uint64_t base_pfn,
                 const uint64_t *pfns, uint32_t npfns,
                 uint32_t byte_offset, uint32_t byte_count,
                 uint8_t *buf, int dir, uint32_t *bad)
{
    int rc = uvb_gpa_check(ram_size, base_pfn, pfns, npfns, byte_offset, byte_count, bad);
    if (rc != UVB_GPA_OK)
        return rc;
    uint32_t done = 0, in_page = byte_offset;
    for (uint32_t i = 0; done < byte_count; i++) {
        uint32_t n = HV_PAGE - in_page;
        if (n > byte_count - done)
            n = byte_count - done;
        uint8_t *page = ram + (pfns[i] - base_pfn) * HV_PAGE + in_page;
        if (dir == UVB_GPA_TO_RAM)
            memcpy(page, buf + done, n);
        else
            memcpy(buf + done, page, n);
        done += n;
        in_page = 0;
    }
    return UVB_GPA_OK;
}
