/*
 * Packet recorder (read by the C compiler and by cffi's cdef).
 *
 * A `struct uvb_rec` is one output: a buffer of finished pcapng Enhanced
 * Packet Blocks and the file descriptor they go to.  Python (uvmbus.trace)
 * allocates the buffer, writes the first file's Section Header, hands every
 * Interface Description Block over (uvb_rec_idb), flushes the buffer from time to
 * time and at close, and renames the files of a size-rotated series once they are
 * complete.  When a write-out would take the current file
 * past `rotate_bytes`, writes the whole blocks that fit, creates the next file
 * (STEM.N.pcapng.part in `dirfd`, starting with `head`), closes the old one and
 * goes on there (a block is never split; a file exceeds the size only when one
 * block alone does, or the next file cannot be created).  C fills the buffer: the ring
 * commits append every packet they publish (write side) or release (read
 * side) of a ring whose `rec` port is set, so recording costs one copy per
 * packet on the fast path, with no Python per packet.  One spin lock per
 * recorder serialises the rings of all channels (records stay in time order);
 * a full buffer is written out by whoever fills it.
 *
 * A `struct uvb_rec_port` is one channel (one pcapng interface): both rings
 * of the channel point at it.  It also knows the buffers packets refer to,
 * so the recorder can attach the bytes of transfer-page ranges and NVSP
 * send-buffer sections (up to `snaplen` bytes each).
 */

#define UVB_REC_MAX_PAGESETS 4

struct uvb_rec {
    uint32_t lock;
    int32_t  fd;              /* current output file */
    int32_t  dirfd;           /* rotation: directory of the files (-1: no rotation) */
    uint32_t snaplen;         /* attachment bytes per chunk; 0 = none */
    uint32_t no_payload;      /* 1: attach RNDIS headers only, never frame/disk data */
    uint32_t cap;
    uint32_t used;
    uint32_t head_len;        /* rotation: bytes of `head` */
    uint8_t *buf;
    uint64_t file_bytes;      /* bytes in the current file (headers included) */
    uint64_t rotate_bytes;    /* 0: one file; else start the next file before this size */
    uint64_t file_index;      /* number of the current file (FILE, FILE.1, ...); C advances it */
    uint64_t records;
    uint64_t bytes;           /* block bytes produced */
    uint64_t dropped;         /* records lost (too large, or the write failed) */
    uint64_t write_errors;
    int32_t  last_errno;
    uint32_t rotate_errors;   /* next file could not be started: the current one grew on */
    const uint8_t *head;      /* rotation: a new file's first blocks (section header + all IDBs) */
    char     stem[224];       /* rotation: file STEM.N.pcapng.part is created in dirfd */
};

struct uvb_rec_region {
    uint8_t *base;
    uint64_t len;
    uint32_t id;              /* transfer pageset id */
    uint32_t section_size;    /* send buffer: bytes per section */
};

struct uvb_rec_port {
    struct uvb_rec *rec;
    uint32_t iface;           /* pcapng interface id */
    uint32_t relid;
    uint16_t subchan;
    uint8_t  devclass;        /* UVB_TRACE_CLASS_* */
    uint8_t  side;            /* UVB_TRACE_SIDE_* */
    uint32_t npagesets;
    struct uvb_rec_region pagesets[4];   /* UVB_REC_MAX_PAGESETS */
    struct uvb_rec_region sendbuf;
};

int uvb_rec_init(struct uvb_rec *rec, uint8_t *buf, uint32_t cap, int fd);
void uvb_rec_lock(struct uvb_rec *rec);
void uvb_rec_unlock(struct uvb_rec *rec);
/* Write out the buffer (takes the lock). Returns 0 or -errno of a failed write. */
int uvb_rec_flush(struct uvb_rec *rec);
/* Append raw bytes (a whole pcapng block, e.g. an IDB) in stream order. */
int uvb_rec_raw(struct uvb_rec *rec, const void *data, uint32_t len);
/* Append an Interface Description Block and make `head` (the section header and every
 * IDB, this one included) what the next rotated file starts with. */
int uvb_rec_idb(struct uvb_rec *rec, const void *idb, uint32_t len, const uint8_t *head, uint32_t head_len);
/* Record a packet given in memory (control-plane paths, tests). */
int uvb_rec_packet(struct uvb_rec_port *p, uint32_t dir, const void *pkt, uint32_t len);
/* Record an event (UVB_TRACE_EV_*), with optional text. */
int uvb_rec_event(struct uvb_rec_port *p, uint32_t dir, uint32_t code, uint32_t arg0, uint64_t arg1,
                  const char *text, uint32_t text_len);
uint64_t uvb_rec_clock(void);
