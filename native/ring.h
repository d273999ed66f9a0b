/*
 * Ring fast path API (read by the C compiler and by cffi's cdef).
 *
 * One `struct uvb_ring` describes ONE direction of a VMBus channel ring as
 * seen by one side: either the side that writes it (an "out" ring) or the
 * side that reads it (an "in" ring).  The guest writes TX (first half of the
 * mapping) and reads RX (second half); the simulated host does the opposite
 * with the same functions.
 *
 * Writers put packets at a private cursor and publish them with one commit,
 * which returns whether the peer must be signalled.  Readers copy packets out
 * at a private cursor and publish the read index with one commit, which
 * returns whether the (blocked) writer must be signalled.  Everything read
 * from shared memory is copied first and then validated; a violation marks
 * the ring dead (error < 0) with a message, and every later call fails.
 *
 * Return conventions: >= 0 success (count, or a boolean "signal"),
 * UVB_E* (< 0) failure.
 */

#define UVB_OK          0
#define UVB_EAGAIN     -11   /* ring full (write) / nothing to read */
#define UVB_EINVAL     -22   /* caller error: packet can never fit, bad argument */
#define UVB_ENOBUFS    -105  /* caller buffer too small for the next packet */
#define UVB_ECORRUPT   -74   /* ring declared dead (EBADMSG): see errmsg */
#define UVB_EIO        -5    /* signalling the peer failed: channel revoked */

#define UVB_RING_OUT    1
#define UVB_RING_IN     2

#define UVB_ERRMSG_LEN  192

struct uvb_ring {
    struct vmbus_ring_ctl *ctl;   /* start of the header page */
    uint8_t  *data;               /* data area (header page + header_size) */
    uint32_t  dsize;              /* data area size in bytes (multiple of 8) */
    uint32_t  kind;               /* UVB_RING_OUT or UVB_RING_IN */
    uint32_t  cursor;             /* private: next write (out) / next read (in) */
    uint32_t  committed;          /* index value last published by us */
    int32_t   error;              /* 0, or UVB_ECORRUPT once dead */
    uint32_t  pending_wanted;     /* out: bytes we asked the reader to free (0 = none) */
    /* statistics (plain counters, owned by the single user of this struct) */
    uint64_t  packets;            /* packets written (out) / read (in) */
    uint64_t  bytes;              /* payload bytes written / read */
    uint64_t  commits;            /* commits that published something */
    uint64_t  signals;            /* commits that returned "signal the peer" */
    uint64_t  full;               /* out: writes refused because the ring was full */
    char      errmsg[192];        /* UVB_ERRMSG_LEN */
    struct uvb_rec_port *rec;     /* recorder of this channel, or NULL (uvmbus.trace) */
    uint32_t  rec_ahead;          /* in: bytes after `committed` already recorded */
    uint32_t  rec_reserved;
};

/* Per-packet result of a batch read. Offsets are into the caller's buffer. */
struct uvb_pkt {
    uint16_t type;
    uint16_t flags;
    uint32_t pkt_offset;          /* where the copied descriptor starts */
    uint32_t pkt_len;             /* len8 * 8 (whole packet, trailer excluded) */
    uint32_t data_offset;         /* payload start (pkt_offset + offset8*8) */
    uint32_t data_len;            /* (len8 - offset8) * 8, includes padding */
    uint32_t reserved;
    uint64_t trans_id;
};

/* A gather element for writes. */
struct uvb_iov {
    const void *base;
    uint32_t len;
};

/* A GPA range for type-9 packets: pfns are taken in order from a flat array. */
struct uvb_gpa {
    uint32_t byte_count;
    uint32_t byte_offset;
};

/* ---- setup -------------------------------------------------------------- */
/* Attach to one direction.  `header` is the start of its header page,
 * `ring_bytes` the whole direction (header page + data), `header_bytes` the
 * header page size (the guest page size).  Returns 0 or UVB_EINVAL/ECORRUPT. */
int uvb_ring_attach(struct uvb_ring *r, void *header, uint64_t ring_bytes,
                    uint32_t header_bytes, uint32_t kind);
/* Zero indices / set feature bit (what the kernel does at channel open).  Only
 * for owners of fresh memory (simulated host, tests). */
void uvb_ring_reset(void *header);
const char *uvb_strerror(int code);

/* ---- writer ------------------------------------------------------------- */
uint32_t uvb_out_free(const struct uvb_ring *r);      /* bytes free for new packets (after cursor) */
uint32_t uvb_out_max_payload(const struct uvb_ring *r, uint32_t ext_len);
int uvb_out_put(struct uvb_ring *r, uint16_t type, uint16_t flags, uint64_t trans_id,
                const void *ext, uint32_t ext_len,
                const struct uvb_iov *iov, uint32_t iovcnt);
int uvb_out_inband(struct uvb_ring *r, uint16_t type, uint16_t flags, uint64_t trans_id,
                   const void *payload, uint32_t len);
int uvb_out_inband_burst(struct uvb_ring *r, uint16_t type, uint16_t flags,
                         const uint8_t *buf, const uint32_t *lens,
                         const uint64_t *trans_ids, uint64_t tid_base, uint32_t n);
int uvb_out_gpa_direct(struct uvb_ring *r, uint16_t flags, uint64_t trans_id,
                       const struct uvb_gpa *ranges, uint32_t nranges,
                       const uint64_t *pfns, uint32_t npfns,
                       const struct uvb_iov *iov, uint32_t iovcnt);
int uvb_out_xfer_pages(struct uvb_ring *r, uint16_t flags, uint64_t trans_id,
                       uint16_t pageset_id, uint8_t sender_owns,
                       const struct vmtransfer_page_range *ranges, uint32_t nranges,
                       const void *payload, uint32_t len);
int uvb_out_commit(struct uvb_ring *r);               /* 1 = signal the reader */
void uvb_out_rollback(struct uvb_ring *r);
int uvb_out_want_space(struct uvb_ring *r, uint32_t bytes);  /* 1 = already free */
void uvb_out_clear_want(struct uvb_ring *r);
int uvb_out_pending(const struct uvb_ring *r);        /* uncommitted bytes present */

/* ---- reader ------------------------------------------------------------- */
int uvb_in_avail(struct uvb_ring *r);                 /* bytes after cursor, or < 0 */
int uvb_in_peek(struct uvb_ring *r, struct uvb_pkt *pkt);  /* 1 packet / 0 empty / < 0 */
int uvb_in_read(struct uvb_ring *r, uint8_t *buf, uint32_t buflen,
                struct uvb_pkt *pkts, uint32_t max);
int uvb_in_commit(struct uvb_ring *r);                /* 1 = signal the writer */
void uvb_in_rollback(struct uvb_ring *r);
void uvb_in_set_mask(struct uvb_ring *r, uint32_t masked);
int uvb_in_arm(struct uvb_ring *r);                   /* unmask; 1 = data present, don't sleep */
uint32_t uvb_in_mask(const struct uvb_ring *r);

/* ---- peer-state helpers (used by the simulated host and by tests) ------- */
uint32_t uvb_ring_load(const void *header, uint32_t field);  /* 0..4: w, r, mask, pending, features */
void uvb_ring_store(void *header, uint32_t field, uint32_t value);

/* ---- signalling --------------------------------------------------------- */
/* Set monitor trigger bit `monitor_id` (atomic OR) in a monitor page. */
void uvb_monitor_trigger(void *monitor_page, uint32_t monitor_id);
/* Atomically fetch and clear the pending bits of trigger group `group`. */
uint32_t uvb_monitor_take(void *monitor_page, uint32_t group);
/* Set bit `relid` in an interrupt bitmap (e.g. int page + 2048). */
void uvb_intpage_set(void *bitmap, uint32_t relid);
int uvb_intpage_test_clear(void *bitmap, uint32_t relid);

struct uvb_signal {
    void    *monitor_page;        /* NULL when the channel is not monitored */
    uint32_t monitor_id;
    uint32_t relid;
    void    *int_page_send;       /* guest->host half of the int page, or NULL */
    int32_t  fd;                  /* endpoint fd for write(1) (irqcontrol), or -1 */
    uint32_t fd_is_socket;        /* 1: use send(MSG_NOSIGNAL) instead of write */
    uint64_t count;               /* signals issued */
};
/* Signal the peer: monitor bit, or int-page bit + 4-byte write(1) to fd.
 * Returns 0, or UVB_EIO if the write failed (revoked). */
int uvb_signal(struct uvb_signal *s);
/* Commit a writer and signal through `s` when the ring protocol says so.
 * Returns 1 signalled, 0 not needed, < 0 error. */
int uvb_out_commit_signal(struct uvb_ring *r, struct uvb_signal *s);
int uvb_in_commit_signal(struct uvb_ring *r, struct uvb_signal *s);

/* ---- reference loop for benchmarks -------------------------------------- */
/* Write and read `count` in-band packets of `size` payload bytes through one
 * ring (out and in attached to the same memory), `burst` packets per commit.
 * Returns packets moved, or < 0. */
int64_t uvb_bench_loop(struct uvb_ring *out, struct uvb_ring *in, uint32_t size,
                       uint64_t count, uint32_t burst, uint8_t *scratch, uint32_t scratch_len);

/* ---- clocks --------------------------------------------------------------- */
uint64_t uvb_now_ns(void);
