/*
 * Simulated-host fast path (read by the C compiler and by cffi's cdef).
 *
 * Host-only loops of `uvmbus sim` (uvmbus/sim/): waiting for monitor-page
 * trigger bits with the GIL released, delivering guest interrupts (eventfd
 * writes) from C, and the echo device model's batch pump.  The ring itself is
 * driven with the uvb_* functions of ring.h: the host reads the guest's TX
 * ring (an "in" ring for it) and writes the guest's RX ring (an "out" ring).
 *
 * Contract for C pumps of device models (see docs/simulator.md):
 *   - the host channel has set the guest TX ring's interrupt_mask while the
 *     pump runs; the pump drains the TX ring, writes answers to the RX ring
 *     and commits both; when a commit answers "signal", it calls
 *     uvb_host_interrupt() at once (never batch an interrupt the guest waits for);
 *   - when the RX ring is full it calls uvb_host_want_space() (which records
 *     the pending_send_sz it stores, so the guest's answering signal counts as
 *     needed; plain uvb_out_want_space() works but loses that in a race);
 *   - it returns UVB_HOST_IDLE after `spin_ns` without work, UVB_HOST_KICKED
 *     as soon as *kick != 0, UVB_HOST_RXFULL when the RX ring is full (after
 *     the want-space call answered 0: pending_send_sz is set), UVB_HOST_SLOWPATH
 *     when the next packet needs Python (nothing consumed for it), or < 0 on a
 *     ring error; it never blocks.
 */

#define UVB_HOST_IDLE       0
#define UVB_HOST_KICKED     1
#define UVB_HOST_RXFULL     2
#define UVB_HOST_SLOWPATH   3

#define UVB_HOST_MAX_NOTIFY 32

/* ---- monitor page scanning ---------------------------------------------- */
struct uvb_host_monitor {
    void    *page;              /* the VM's monitor page (map 2) */
    uint32_t mask[4];           /* bits the host watches, per trigger group */
    uint32_t stop;              /* non-zero: uvb_host_monitor_wait returns at once */
    uint32_t latency_ns;        /* default scan interval (Hyper-V: 50 us) */
    uint32_t honour_page_latency; /* 1: use the page's latency[][] (100 ns units) when set */
    uint32_t idle_ns;           /* scan interval once idle (0: never back off) */
    uint64_t scans;             /* statistics */
    uint64_t hits;
    uint64_t idle_after_ns;     /* idle: no signal, no ring index moved, for this long */
    uint64_t idle_scans;        /* statistics: scans made while backed off */
    uint32_t kick;              /* futex word: bumped by watch/unwatch/stop (wakes the scan) */
    uint32_t in_scan;           /* 1 while the scanner may read watched rings */
    uint64_t busy_ns;           /* scanner state: last time something happened */
    uint64_t ring_sum;          /* scanner state: sum of the watched rings' indices */
    uint64_t cur_idle_ns;       /* scanner state: current backed-off interval (0: not idle) */
    uint32_t kick_seen;         /* scanner state */
    uint32_t reserved;
    void    *tx[128];           /* HV_MONITOR_IDS: per id, the channel's guest-TX ring header */
    void    *rx[128];           /* ... and its guest-RX ring header (NULL: not watched) */
};
/* Scan every `latency` until a watched bit is pending (test-and-clear of the
 * watched bits only; other bits of the shared word are left alone), `stop`
 * is set or `timeout_ns` passes.  fired[g] receives the bits taken from group
 * g.  Returns 1 if any bit fired, 0 otherwise.  Runs without the GIL.
 * Idle back-off: once no bit fired and no index of a watched ring moved for
 * `idle_after_ns`, the interval doubles up to `idle_ns`; a fired bit, a moving
 * ring or a watch/unwatch returns it to `latency` at once. */
int uvb_host_monitor_wait(struct uvb_host_monitor *m, uint64_t timeout_ns, uint32_t *fired);
/* Watch monitor id `id` (its stale trigger bit cleared first); `tx`/`rx` are the
 * channel's ring headers, whose indices the idle detection reads (may be NULL). */
int uvb_host_monitor_watch(struct uvb_host_monitor *m, uint32_t id, void *tx, void *rx);
/* Stop watching `id`; returns once the scanner no longer reads its rings. */
void uvb_host_monitor_unwatch(struct uvb_host_monitor *m, uint32_t id);
/* Make uvb_host_monitor_wait return 0 at once, now and until `stop` is cleared. */
void uvb_host_monitor_stop(struct uvb_host_monitor *m);
/* Clear monitor id `id`'s trigger bit (atomic AND; other bits untouched). */
void uvb_host_monitor_clear(void *monitor_page, uint32_t id);
/* Per-thread timer slack (prctl PR_SET_TIMERSLACK) so short sleeps are short. */
int uvb_host_set_timerslack(uint64_t ns);

/* ---- guest interrupts --------------------------------------------------- */
/* The eventfds of every open connection of one device (one event counter per
 * device, each open file its own "last seen" count).  Update only through
 * uvb_host_notify_set.  Deliveries are readers: the channels of a device
 * interrupt the guest independently and concurrently (as each channel's
 * interrupt is its own event on a real host), never one after the other
 * behind a lock held across the eventfd write; an update (a writer, rare)
 * waits until no delivery is under way, so an fd is never written after it
 * was removed.  Nobody busy-spins on the other: a waiting side yields. */
struct uvb_host_notify {
    int32_t  fds[32];           /* UVB_HOST_MAX_NOTIFY */
    uint32_t count;
    uint32_t lock;              /* 1 while an update is under way */
    uint32_t readers;           /* deliveries under way */
    uint32_t reserved;
    uint64_t delivered;         /* eventfd writes done */
};
int uvb_host_notify_set(struct uvb_host_notify *n, const int32_t *fds, uint32_t count);

/* What the kernel does when the host interrupts one channel. */
struct uvb_host_irq {
    struct uvb_host_notify *notify;
    void    *rx_header;         /* the guest RX ring header of this channel */
    uint32_t set_mask;          /* kernel < 6.18: ISR sets RX interrupt_mask = 1 first */
    uint32_t crashes;           /* kernel < 6.16, sub-channel: NULL deref in the ISR */
    uint32_t disabled;          /* fault injection: drop every interrupt */
    uint32_t reserved;
    uint64_t count;             /* interrupts delivered */
    uint64_t oops;              /* interrupts that crashed the (simulated) guest kernel */
    uint64_t dropped;           /* interrupts dropped by fault injection */
    /* set by uvb_host_want_space: the host stored RX pending_send_sz = pending_threshold
     * (the guest may signal when its reads free more than that) */
    uint64_t pending_sets;
    uint32_t pending_threshold;
    uint32_t reserved2;
    struct uvb_rec_port *rec;   /* `uvmbus sim --record`: interrupts become trace events */
};
/* Deliver one interrupt: returns 1 delivered, 0 dropped, -1 "guest kernel oops". */
int uvb_host_interrupt(struct uvb_host_irq *irq);

/* ---- host ring helpers -------------------------------------------------- */
/* Host TX reader: set the guest TX ring's interrupt_mask (we are draining)
 * with a full fence, then return the guest's current write_index. */
uint32_t uvb_host_disarm(struct uvb_ring *in);
/* uvb_out_want_space for the host's RX ring, recording in `irq` every time it
 * stores pending_send_sz (for the signal accounting).  C pumps should use this. */
int uvb_host_want_space(struct uvb_ring *out, uint32_t bytes, struct uvb_host_irq *irq);
/* Free bytes in an out ring counting only published data (read_index to
 * committed write index). */
uint32_t uvb_host_out_space(const struct uvb_ring *out);
/* Fault injection: overwrite u16 field `field` (0 type, 1 offset8, 2 len8,
 * 3 flags) of the descriptor at data offset `at` of an out ring. */
int uvb_host_poke_desc(struct uvb_ring *out, uint32_t at, uint32_t field, uint16_t value);

/* ---- echo device model pump --------------------------------------------- */
struct uvb_host_echo {
    struct uvb_ring *tx;        /* guest TX ring, read by the host */
    struct uvb_ring *rx;        /* guest RX ring, written by the host */
    struct uvb_host_irq *irq;
    const uint32_t *kick;       /* non-zero: return UVB_HOST_KICKED */
    uint8_t *scratch;
    uint32_t scratch_len;
    uint32_t max_pkts;
    struct uvb_pkt *pkts;       /* max_pkts entries */
    uint64_t spin_ns;           /* keep polling this long after the last packet */
    uint64_t magic;             /* in-band payloads starting with these 8 bytes go to Python */
    uint64_t echoed;            /* statistics */
    uint64_t completions;
    uint64_t polls;
};
/* Echo every in-band packet back (same trans id) plus a completion
 * {u32 status 0, u32 length} when one was requested.  Non-in-band packets
 * and control messages (payload starting with `magic`) return SLOWPATH. */
int uvb_host_echo_pump(struct uvb_host_echo *e);
