/*
 * StorVSP host model fast path (read by the C compiler and by cffi's cdef).
 * Used only by the simulator's storvsp model (uvmbus/sim/models/storvsp.py).
 *
 * The pump follows the device-model contract of host.h: it drains the
 * guest's TX ring of one channel, answers on the guest's RX ring, commits
 * both, interrupts the guest when a commit says so, and returns a
 * UVB_HOST_* code.  It handles only the common, error-free case in C:
 *
 *   EXECUTE_SRB (in-band or GPA-direct with one range, completion requested,
 *   well-formed per storvsc_ic.md §5.1/§3.2) on a Ready controller, to a
 *   present LUN at path 0 / target 0 that is not in "slow" mode, with
 *   READ/WRITE(10/16) fully inside the disk and the buffer, TEST UNIT READY
 *   or SYNCHRONIZE CACHE(10/16).
 *
 * Everything else -- negotiation, fatal packets, other commands, every error
 * -- returns UVB_HOST_SLOWPATH with the packet left in the ring, and the
 * Python model handles it.  Data moves between the image file and guest RAM
 * with preadv/pwritev straight into the guest-RAM mapping, after every PFN
 * has been bounds-checked.
 */

#define UVB_VSP_MAX_LUNS     256

/* uvb_vsp_rw return codes (besides 0) */
#define UVB_VSP_ERANGE      -34     /* malformed GPA range */
#define UVB_VSP_EFAULT      -14     /* a PFN lies outside guest RAM (*bad = its index) */
#define UVB_VSP_EIO         -5      /* preadv/pwritev/fdatasync failed (*bad = errno) */

/* uvb_vsp_rw flags */
#define UVB_VSP_WRITE        1      /* guest memory -> image (else image -> guest memory) */
#define UVB_VSP_FUA          2      /* write through (RWF_DSYNC) */

struct uvb_vsp_disk {
    int32_t  fd;                    /* image file */
    uint32_t present;               /* 1: LUN attached (atomic; set last, cleared first) */
    uint32_t block_shift;           /* 9 (512) or 12 (4096) */
    uint32_t readonly;
    uint32_t slow;                  /* 1: every command to this LUN takes the Python path */
    uint32_t reserved;
    uint64_t nblocks;
    const uint8_t *map;             /* read-only shared mapping of the image (or NULL) */
    uint64_t map_len;
    /* statistics of the C path */
    uint64_t reads;
    uint64_t writes;
    uint64_t read_bytes;
    uint64_t write_bytes;
    uint64_t flushes;
};

/* One controller (shared by all its channels). */
struct uvb_vsp {
    uint8_t  *ram;                  /* the whole guest RAM mapping */
    uint64_t  ram_size;
    uint64_t  base_pfn;
    uint32_t  ready;                /* controller reached Ready (atomic) */
    uint32_t  max_luns;             /* disks[] entries (LUNs at path 0 / target 0) */
    struct uvb_vsp_disk *disks;
};

/* One channel's pump state. */
struct uvb_vsp_chan {
    struct uvb_vsp   *vsp;
    struct uvb_ring  *tx;           /* guest TX, read by the host */
    struct uvb_ring  *rx;           /* guest RX, written by the host */
    struct uvb_host_irq *irq;
    const uint32_t   *kick;         /* non-zero: return UVB_HOST_KICKED */
    uint8_t          *scratch;
    uint32_t          scratch_len;
    uint32_t          max_pkts;
    struct uvb_pkt   *pkts;
    uint64_t          spin_ns;      /* keep polling this long after the last packet */
    uint64_t          poll_ns;      /* ... or this long while the guest has completions to
                                       read (it will send more soon: OpenVMM's poll mode) */
    uint32_t          slow_all;     /* 1: every packet takes the Python path */
    uint32_t          commit_every; /* publish completions every N requests (0: per batch),
                                       so the guest reaps while the host works */
    /* statistics */
    uint64_t          fast;         /* requests completed in C */
    uint64_t          polls;
    uint64_t          batches;
};

/* The pump (host.h contract).  Runs without the GIL. */
int uvb_vsp_pump(struct uvb_vsp_chan *c);

/* Move `len` bytes between the image (at byte `file_off`) and the guest
 * memory described by one GPA range (pfns, byte_offset).  Every PFN is
 * checked against guest RAM before any byte moves.  Reads come from `map`
 * (a read-only shared mapping of `map_len` bytes, the page cache itself:
 * one memcpy, no syscall) when it covers the range, else preadv; writes use
 * pwritev (pwritev2 RWF_DSYNC with UVB_VSP_FUA), so a full filesystem fails
 * the request instead of raising SIGBUS.  Reads past the end of the file
 * give zeros.  Returns 0 or UVB_VSP_E* (*bad: PFN index / errno). */
int uvb_vsp_rw(const struct uvb_vsp *v, int fd, const uint8_t *map, uint64_t map_len,
               uint32_t flags, uint64_t file_off, uint32_t len,
               const uint64_t *pfns, uint32_t npfns, uint32_t byte_offset, uint32_t *bad);

/* mmap(PROT_READ, MAP_SHARED) of an image: the pointer, or NULL (errno in *err). */
const uint8_t *uvb_vsp_map(int fd, uint64_t len, int32_t *err);
int uvb_vsp_unmap(const uint8_t *map, uint64_t len);

/* Attach / detach a LUN with the ordering the pump relies on. */
int uvb_vsp_disk_attach(struct uvb_vsp *v, uint32_t lun, int fd, uint32_t block_shift,
                        uint64_t nblocks, uint32_t readonly, uint32_t slow,
                        const uint8_t *map, uint64_t map_len);
int uvb_vsp_disk_detach(struct uvb_vsp *v, uint32_t lun);
void uvb_vsp_set_slow(struct uvb_vsp *v, uint32_t lun, uint32_t slow);
void uvb_vsp_set_ready(struct uvb_vsp *v, uint32_t ready);
