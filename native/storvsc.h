/*
 * storvsc guest fast path (read by the C compiler and by cffi's cdef).
 *
 * A `struct uvb_stor_queue` is the request table of ONE channel (primary or
 * sub-channel): it owns the channel's rings while I/O runs.  Python fills an
 * array of `struct uvb_stor_req` and calls uvb_stor_submit() once; C builds
 * every VSTOR EXECUTE_SRB packet (64 bytes, completion requested, GPA-direct
 * with one range when there is data, storvsc_ic.md §2.9/§3.1), gives each a
 * non-zero transaction id naming its slot, commits once and signals the host
 * only when the ring protocol says so.  uvb_stor_reap() reads a batch of host
 * packets, matches completions to slots by transaction id, validates them
 * (type, size, operation) and fills `struct uvb_stor_cpl`; unsolicited host
 * packets (ENUMERATE_BUS, REMOVE_DEVICE) and bogus ones are reported too.
 *
 * Transaction id = (generation << 32) | (slot + 1): never 0 (reserved for
 * unsolicited host packets), and a completion for a slot that was reused or
 * is free is recognised instead of being matched to the wrong request.
 */

#define UVB_STOR_MAX_DEPTH      4096

/* uvb_stor_req.kind */
#define UVB_STOR_CDB            0      /* send cdb[] as given */
#define UVB_STOR_READ16         1      /* C builds READ(16) from lba/blocks */
#define UVB_STOR_WRITE16        2      /* C builds WRITE(16) from lba/blocks */
#define UVB_STOR_VSTOR_OP       3      /* a bare VSTOR operation (RESET_LUN/BUS...) in `operation` */

/* uvb_stor_req.flags */
#define UVB_STOR_FUA            1      /* READ16/WRITE16: set the FUA bit */

/* uvb_stor_cpl.kind */
#define UVB_STOR_CPL_DONE       0      /* completion of the request `tag` */
#define UVB_STOR_CPL_UNSOLICITED 1     /* in-band host packet with trans_id 0 (operation set) */
#define UVB_STOR_CPL_BOGUS      2      /* completion matching no outstanding request (dropped) */
#define UVB_STOR_CPL_LATE       3      /* completion of an abandoned request (tag set; slot freed now) */

/* uvb_stor_cpl.error (kind DONE or BOGUS) */
#define UVB_STOR_OK             0
#define UVB_STOR_ESHORT         1      /* completion payload shorter than 64 bytes */
#define UVB_STOR_EOP            2      /* completion operation is not COMPLETE_IO */
#define UVB_STOR_ETID           3      /* trans_id names no outstanding request */
#define UVB_STOR_ETYPE          4      /* host sent a packet type storvsc never gets */

/* uvb_stor_submit error codes (< 0; ring codes UVB_E* also possible) */
#define UVB_STOR_EFULL          -1001  /* no free slot (queue depth reached) */
#define UVB_STOR_EREQ           -1002  /* a request is malformed (see errmsg) */

struct uvb_stor_req {
    uint64_t tag;                 /* caller's id, returned in the completion */
    const uint64_t *pfns;         /* Hyper-V PFN of each page the data touches, first page first */
    uint64_t lba;                 /* READ16/WRITE16 */
    uint32_t blocks;              /* READ16/WRITE16 */
    uint32_t length;              /* data bytes (0 = no data: in-band packet) */
    uint32_t byte_offset;         /* data start inside the first page, < 4096 */
    uint32_t operation;           /* VSTOR_VSTOR_OP: the VSTOR operation */
    uint8_t  kind;                /* UVB_STOR_CDB / READ16 / WRITE16 / VSTOR_OP */
    uint8_t  flags;               /* UVB_STOR_FUA */
    uint8_t  data_in;             /* VSTOR_DATA_IN / OUT / NONE (CDB kind) */
    uint8_t  path_id;
    uint8_t  target_id;
    uint8_t  lun;
    uint8_t  cdb_length;
    uint8_t  reserved;
    uint8_t  cdb[16];
};

struct uvb_stor_cpl {
    uint64_t tag;                 /* DONE: the request's tag */
    uint64_t trans_id;
    uint64_t latency_ns;          /* DONE: submit -> reap */
    uint32_t kind;                /* UVB_STOR_CPL_* */
    uint32_t error;               /* UVB_STOR_OK or UVB_STOR_E* */
    uint32_t operation;           /* vstor operation of the host packet */
    uint32_t status;              /* NTSTATUS from the packet header */
    uint32_t transferred;         /* data_transfer_length */
    uint32_t payload_len;         /* payload bytes of the host packet */
    uint8_t  srb_status;          /* raw (flags included) */
    uint8_t  scsi_status;
    uint8_t  sense_len;           /* valid sense bytes (0 unless AUTOSENSE_VALID) */
    uint8_t  reserved;
    uint8_t  sense[20];
};

struct uvb_stor_slot {
    uint64_t tag;
    uint64_t submit_ns;
    uint32_t gen;
    uint32_t busy;                /* 0 free, 1 in flight, 2 abandoned (reserved until completed) */
};

struct uvb_stor_queue {
    struct uvb_ring   *tx;        /* guest -> host */
    struct uvb_ring   *rx;        /* host -> guest */
    struct uvb_signal *sig;
    uint8_t           *rxbuf;     /* scratch for uvb_in_read */
    uint32_t           rxbuf_len;
    uint32_t           max_pkts;
    struct uvb_pkt    *pkts;      /* max_pkts entries */
    struct uvb_stor_slot *slots;  /* depth entries */
    uint32_t          *free_list; /* stack of free slot indices */
    uint32_t           depth;
    uint32_t           nfree;
    uint32_t           srb_flags; /* extra srb_flags for every SRB (tagged queueing) */
    uint32_t           timeout_s; /* time_out_value sent in every SRB */
    uint8_t            port_number;
    uint8_t            pad[3];
    uint32_t           unsolicited_pending;
    /* statistics */
    uint64_t submitted;
    uint64_t completed;
    uint64_t bogus;
    uint64_t unsolicited;
    uint64_t submit_calls;
    uint64_t reap_calls;
    uint64_t signals;             /* host signals issued by submit/reap */
    uint64_t ring_full;
    char     errmsg[160];
};

/* Set up a queue over a channel's rings.  `slots`/`free_list` have `depth`
 * entries, `pkts` `max_pkts`, `rxbuf` `rxbuf_len` bytes (>= 4096): all owned
 * by the caller.  Returns 0 or UVB_EINVAL. */
int uvb_stor_queue_init(struct uvb_stor_queue *q, struct uvb_ring *tx, struct uvb_ring *rx,
                        struct uvb_signal *sig, struct uvb_stor_slot *slots, uint32_t *free_list,
                        uint32_t depth, struct uvb_pkt *pkts, uint32_t max_pkts,
                        uint8_t *rxbuf, uint32_t rxbuf_len);

/* Queue up to n requests, commit once, signal if needed.  Returns how many
 * were queued (fewer when the ring or the slot table filled), or < 0 when
 * nothing could be queued: UVB_STOR_EFULL, UVB_EAGAIN (ring full),
 * UVB_STOR_EREQ (reqs[0] malformed; later malformed requests stop the batch
 * early) or a ring error. */
int uvb_stor_submit(struct uvb_stor_queue *q, const struct uvb_stor_req *reqs, uint32_t n);

/* Like uvb_stor_submit for table[slots[i]], i < n, after setting its lba to lbas[i]
 * (lbas may be NULL) and its kind to kinds[i] (kinds may be NULL): a fixed table of
 * requests (one per buffer) resubmitted with new positions, without Python per request. */
int uvb_stor_submit_slots(struct uvb_stor_queue *q, struct uvb_stor_req *table,
                          const uint64_t *slots, const uint64_t *lbas, const uint8_t *kinds,
                          uint32_t n);

/* Group slots[i] / lbas[i] / kinds[i] (i < n; lbas and kinds may be NULL) by channel for an
 * IoBatch spread over nq channels: entry i belongs to channel slots[i] % nq.  Writes the
 * entries of channel 0 first, then channel 1, ..., keeping their order, into out_* (out_lbas /
 * out_kinds only when the input has them) and the number per channel into counts[0..nq). */
void uvb_stor_route_slots(const uint64_t *slots, const uint64_t *lbas, const uint8_t *kinds,
                          uint32_t n, uint32_t nq, uint64_t *out_slots, uint64_t *out_lbas,
                          uint8_t *out_kinds, uint32_t *counts);

/* Read up to max host packets, commit the read index once (signalling the host
 * if it waits for space) and describe each in out[].  Returns the number of
 * entries filled (0 = nothing there) or a ring error (< 0). */
int uvb_stor_reap(struct uvb_stor_queue *q, struct uvb_stor_cpl *out, uint32_t max);

/* uvb_stor_reap plus compact results: tags[i] (UINT64_MAX for entries that are not a
 * request's completion) and ok[i] = 1 when the request completed with SRB SUCCESS and a
 * well-formed completion; *nbad (optional) counts the others (look at out[i]). */
int uvb_stor_reap_tags(struct uvb_stor_queue *q, struct uvb_stor_cpl *out, uint64_t *tags,
                       uint8_t *ok, uint32_t max, uint32_t *nbad);

/* Give up on an in-flight request without a completion (after a timeout and
 * reset).  With release == 0 the slot stays reserved: a late completion is
 * reported as UVB_STOR_CPL_LATE (with the tag) and frees it, so the caller may
 * keep the request's data buffer quarantined until then.  With release != 0
 * the slot is freed at once and a late completion is reported as BOGUS
 * (the transaction id's generation no longer matches).
 * Returns 0, or -1 if the tag is not in flight. */
int uvb_stor_abandon(struct uvb_stor_queue *q, uint64_t tag, uint32_t release);

/* Poll the RX rings of `n` queues for up to `spin_ns`: 1 as soon as one has data, 0 when
 * the time is up, < 0 on a ring error.  Yields the CPU between polls (sched_yield), so a
 * spinning guest does not starve a host that shares its CPUs.  Runs without the GIL. */
int uvb_stor_spin(struct uvb_stor_queue **queues, uint32_t n, uint64_t spin_ns);

/* Submit time (uvb_now_ns) of the oldest request in flight, 0 if none. */
uint64_t uvb_stor_oldest(const struct uvb_stor_queue *q);
uint32_t uvb_stor_inflight(const struct uvb_stor_queue *q);

/* Decode fixed or descriptor-format sense: sense key, ASC, ASCQ (0 if absent).
 * Returns 1 if the data held a sense key, 0 otherwise. */
int uvb_stor_sense(const uint8_t *sense, uint32_t len, uint8_t *key, uint8_t *asc, uint8_t *ascq);

/* ---- benchmark reference: pread loop over a file ------------------------- */
/* Random (random != 0) or sequential reads of `bs` bytes from fd inside
 * [0, span) for `seconds`, `qd` ignored (synchronous pread).  The buffer must
 * hold bs bytes and be suitably aligned for O_DIRECT if the fd uses it.
 * Returns operations done (>= 0) or -errno; *ns gets the elapsed time. */
/* n random starting LBAs: base_lba + k * unit_blocks, k uniform in [0, units). */
void uvb_stor_random_lbas(uint64_t *out, uint32_t n, uint64_t units, uint32_t unit_blocks,
                          uint64_t base_lba, uint64_t *state);
int64_t uvb_stor_pread_loop(int fd, uint8_t *buf, uint32_t bs, uint64_t span, uint32_t random,
                            double seconds, uint64_t seed, uint64_t *ns);
