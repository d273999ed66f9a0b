/*
 * Simulated-host fast path: see host.h.  Used only by `uvmbus sim`.
 */
#define _GNU_SOURCE
#include "uvmbus.h"
#include "util.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

_Static_assert(sizeof(((struct uvb_host_monitor *)0)->tx) / sizeof(void *) == HV_MONITOR_IDS,
               "one ring pointer per monitor id");


/* ------------------------------------------------------------------------ */
/* monitor page                                                              */

int uvb_host_set_timerslack(uint64_t ns)
{
    return prctl(PR_SET_TIMERSLACK, (unsigned long)(ns ? ns : 1), 0, 0, 0) == 0 ? 0 : errno;
}

void uvb_host_monitor_clear(void *monitor_page, uint32_t id)
{
    if (!monitor_page || id >= HV_MONITOR_IDS)
        return;
    struct hv_monitor_page *pg = monitor_page;
    __atomic_fetch_and(&pg->trigger_group[id / 32].pending, ~(1u << (id % 32)), __ATOMIC_SEQ_CST);
}

static uint64_t scan_interval(const struct uvb_host_monitor *m)
{
    uint64_t best = m->latency_ns ? m->latency_ns : 50000u;
    if (!m->honour_page_latency)
        return best;
    const struct hv_monitor_page *pg = m->page;
    for (uint32_t g = 0; g < 4; g++) {
        uint32_t mask = __atomic_load_n(&m->mask[g], __ATOMIC_RELAXED);
        while (mask) {
            uint32_t b = (uint32_t)__builtin_ctz(mask);
            mask &= mask - 1;
            uint16_t lat = __atomic_load_n(&pg->latency[g][b], __ATOMIC_RELAXED);
            if (lat && (uint64_t)lat * 100u < best)
                best = (uint64_t)lat * 100u;
        }
    }
    return best < 1000u ? 1000u : best;
}

/* Sleep up to `ns`, or until *word no longer holds `seen` (a kick). */
static void futex_sleep_ns(uint32_t *word, uint32_t seen, uint64_t ns)
{
    struct timespec ts = {(time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull)};
    syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, seen, &ts, NULL, 0);
}

static void kick(struct uvb_host_monitor *m)
{
    __atomic_fetch_add(&m->kick, 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, &m->kick, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

int uvb_host_monitor_watch(struct uvb_host_monitor *m, uint32_t id, void *tx, void *rx)
{
    if (id >= HV_MONITOR_IDS)
        return UVB_EINVAL;
    /* a bit left from a previous open of the channel is not a signal to this one */
    uvb_host_monitor_clear(m->page, id);
    __atomic_store_n(&m->tx[id], tx, __ATOMIC_SEQ_CST);
    __atomic_store_n(&m->rx[id], rx, __ATOMIC_SEQ_CST);
    __atomic_fetch_or(&m->mask[id / 32], 1u << (id % 32), __ATOMIC_SEQ_CST);
    kick(m);
    return 0;
}

void uvb_host_monitor_unwatch(struct uvb_host_monitor *m, uint32_t id)
{
    if (id >= HV_MONITOR_IDS)
        return;
    __atomic_fetch_and(&m->mask[id / 32], ~(1u << (id % 32)), __ATOMIC_SEQ_CST);
    __atomic_store_n(&m->tx[id], NULL, __ATOMIC_SEQ_CST);
    __atomic_store_n(&m->rx[id], NULL, __ATOMIC_SEQ_CST);
    /* a scan that loaded the old pointers sets in_scan before loading them: once it is
     * clear, no scan reads the rings (they may be unmapped after we return) */
    while (__atomic_load_n(&m->in_scan, __ATOMIC_SEQ_CST))
        sched_yield();
    kick(m);
}

void uvb_host_monitor_stop(struct uvb_host_monitor *m)
{
    __atomic_store_n(&m->stop, 1u, __ATOMIC_SEQ_CST);
    kick(m);
}

static uint32_t ring_indices(void *hdr)
{
    if (!hdr)
        return 0;
    const struct vmbus_ring_ctl *c = hdr;
    return __atomic_load_n(&c->write_index, __ATOMIC_RELAXED) +
           __atomic_load_n(&c->read_index, __ATOMIC_RELAXED);
}

/* Sum of every index of every watched ring: it changes whenever either side moved. */
static uint64_t ring_activity(struct uvb_host_monitor *m)
{
    uint64_t sum = 0;
    __atomic_store_n(&m->in_scan, 1u, __ATOMIC_SEQ_CST);
    for (uint32_t g = 0; g < 4; g++) {
        uint32_t mask = __atomic_load_n(&m->mask[g], __ATOMIC_SEQ_CST);
        while (mask) {
            uint32_t id = 32 * g + (uint32_t)__builtin_ctz(mask);
            mask &= mask - 1;
            sum += ring_indices(__atomic_load_n(&m->tx[id], __ATOMIC_SEQ_CST));
            sum += ring_indices(__atomic_load_n(&m->rx[id], __ATOMIC_SEQ_CST));
        }
    }
    __atomic_store_n(&m->in_scan, 0u, __ATOMIC_SEQ_CST);
    return sum;
}

int uvb_host_monitor_wait(struct uvb_host_monitor *m, uint64_t timeout_ns, uint32_t *fired)
{
    struct hv_monitor_page *pg = m->page;
    uint64_t deadline = mono_ns() + timeout_ns;
    for (uint32_t g = 0; g < 4; g++)
        fired[g] = 0;
    if (!pg)
        return 0;
    for (;;) {
        int any = 0;
        uint32_t k = __atomic_load_n(&m->kick, __ATOMIC_SEQ_CST);
        for (uint32_t g = 0; g < 4; g++) {
            uint32_t mask = __atomic_load_n(&m->mask[g], __ATOMIC_ACQUIRE);
            if (!mask)
                continue;
            uint32_t *word = &pg->trigger_group[g].pending;
            uint32_t pend = __atomic_load_n(word, __ATOMIC_RELAXED) & mask;
            if (!pend)
                continue;
            /* clear only the bits we own that we saw set */
            uint32_t old = __atomic_fetch_and(word, ~pend, __ATOMIC_SEQ_CST);
            fired[g] |= old & pend;
            if (old & pend)
                any = 1;
        }
        __atomic_fetch_add(&m->scans, 1, __ATOMIC_RELAXED);
        uint64_t now = mono_ns();
        if (any) {
            __atomic_fetch_add(&m->hits, 1, __ATOMIC_RELAXED);
            m->busy_ns = now;
            m->cur_idle_ns = 0;
            return 1;
        }
        if (__atomic_load_n(&m->stop, __ATOMIC_ACQUIRE))
            return 0;
        uint64_t iv = scan_interval(m);
        if (m->idle_ns > iv) {
            uint64_t sum = ring_activity(m);
            if (sum != m->ring_sum || k != m->kick_seen) {
                m->ring_sum = sum;
                m->kick_seen = k;
                m->busy_ns = now;
                m->cur_idle_ns = 0;
            } else if (now - m->busy_ns >= m->idle_after_ns) {
                /* idle: double the interval up to idle_ns */
                uint64_t cur = m->cur_idle_ns ? 2 * m->cur_idle_ns : 2 * iv;
                m->cur_idle_ns = cur < m->idle_ns ? cur : m->idle_ns;
                iv = m->cur_idle_ns;
                __atomic_fetch_add(&m->idle_scans, 1, __ATOMIC_RELAXED);
            }
        }
        if (now >= deadline)
            return 0;
        if (iv > deadline - now)
            iv = deadline - now;
        futex_sleep_ns(&m->kick, k, iv);
    }
}

/* ------------------------------------------------------------------------ */
/* interrupts                                                                */


int uvb_host_notify_set(struct uvb_host_notify *n, const int32_t *fds, uint32_t count)
{
    if (count > UVB_HOST_MAX_NOTIFY)
        return UVB_EINVAL;
    /* writer: take the update flag, then wait for the deliveries under way (they
     * may be inside write(): yield, do not spin against a preempted thread) */
    while (__atomic_exchange_n(&n->lock, 1u, __ATOMIC_SEQ_CST))
        sched_yield();
    while (__atomic_load_n(&n->readers, __ATOMIC_SEQ_CST))
        sched_yield();
    for (uint32_t i = 0; i < count; i++)
        n->fds[i] = fds[i];
    n->count = count;
    __atomic_store_n(&n->lock, 0u, __ATOMIC_RELEASE);
    return 0;
}

/* A delivery enters as a reader: announce, then check for an update (both
 * sequentially consistent, so the update sees us or we see it). */
static void notify_enter(struct uvb_host_notify *n)
{
    for (;;) {
        __atomic_fetch_add(&n->readers, 1u, __ATOMIC_SEQ_CST);
        if (!__atomic_load_n(&n->lock, __ATOMIC_SEQ_CST))
            return;
        __atomic_fetch_sub(&n->readers, 1u, __ATOMIC_SEQ_CST);
        while (__atomic_load_n(&n->lock, __ATOMIC_ACQUIRE))
            sched_yield();
    }
}

static void notify_leave(struct uvb_host_notify *n)
{
    __atomic_fetch_sub(&n->readers, 1u, __ATOMIC_RELEASE);
}

int uvb_host_interrupt(struct uvb_host_irq *irq)
{
    if (irq->rec)
        uvb_rec_event(irq->rec, UVB_TRACE_DIR_H2G, UVB_TRACE_EV_INTERRUPT,
                      irq->disabled ? 0u : irq->crashes ? 2u : 1u, 0, NULL, 0);
    if (__atomic_load_n(&irq->disabled, __ATOMIC_RELAXED)) {
        __atomic_fetch_add(&irq->dropped, 1, __ATOMIC_RELAXED);
        return 0;
    }
    if (irq->crashes) {
        __atomic_fetch_add(&irq->oops, 1, __ATOMIC_RELAXED);
        return -1;
    }
    if (irq->set_mask && irq->rx_header) {
        struct vmbus_ring_ctl *c = irq->rx_header;
        __atomic_store_n(&c->interrupt_mask, 1u, __ATOMIC_SEQ_CST);
    }
    struct uvb_host_notify *n = irq->notify;
    if (n) {
        uint64_t one = 1;
        notify_enter(n);
        uint32_t count = n->count;
        for (uint32_t i = 0; i < count; i++) {
            ssize_t w;
            do {
                w = write(n->fds[i], &one, sizeof one);
            } while (w < 0 && errno == EINTR);
            if (w == (ssize_t)sizeof one)
                __atomic_fetch_add(&n->delivered, 1, __ATOMIC_RELAXED);
        }
        notify_leave(n);
    }
    __atomic_fetch_add(&irq->count, 1, __ATOMIC_RELAXED);
    return 1;
}

/* ------------------------------------------------------------------------ */
/* ring helpers                                                              */

uint32_t uvb_host_disarm(struct uvb_ring *in)
{
    __atomic_store_n(&in->ctl->interrupt_mask, 1u, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return __atomic_load_n(&in->ctl->write_index, __ATOMIC_SEQ_CST);
}

int uvb_host_want_space(struct uvb_ring *out, uint32_t bytes, struct uvb_host_irq *irq)
{
    if (out->error)
        return out->error;
    uint32_t fr = uvb_out_free(out);          /* free - 8 (0 when <= 8 or on error) */
    if (out->error)
        return out->error;
    if (fr && fr + TRAILER > bytes) {
        uvb_out_clear_want(out);
        return 1;
    }
    /* as uvb_out_want_space: ask for at least a quarter of the ring */
    uint32_t want = bytes < out->dsize / 4 ? out->dsize / 4 : bytes;
    if (want >= out->dsize - TRAILER)
        want = out->dsize - 2 * TRAILER;
    want &= ~7u;
    out->pending_wanted = want;
    if (irq) {
        __atomic_store_n(&irq->pending_threshold, want, __ATOMIC_RELAXED);
        __atomic_fetch_add(&irq->pending_sets, 1, __ATOMIC_RELEASE);
    }
    __atomic_store_n(&out->ctl->pending_send_sz, want, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    fr = uvb_out_free(out);                   /* the guest may have raced us */
    if (out->error)
        return out->error;
    if (fr && fr + TRAILER > bytes) {
        uvb_out_clear_want(out);
        return 1;
    }
    return 0;
}

uint32_t uvb_host_out_space(const struct uvb_ring *out)
{
    uint32_t rd = __atomic_load_n(&out->ctl->read_index, __ATOMIC_SEQ_CST);
    uint32_t w = out->committed;
    if (rd >= out->dsize)
        return 0;
    uint32_t used = w >= rd ? w - rd : out->dsize - rd + w;
    return out->dsize - used;
}

int uvb_host_poke_desc(struct uvb_ring *out, uint32_t at, uint32_t field, uint16_t value)
{
    if (at >= out->dsize || (at & 7u) || field > 3)
        return UVB_EINVAL;
    uint32_t pos = at + 2u * field;     /* a u16 never straddles the wrap: at is 8-aligned */
    memcpy(out->data + pos, &value, 2);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* echo pump                                                                 */

static inline uint32_t ring_bytes(uint32_t payload)
{
    return ((DESC + payload + 7u) & ~7u) + TRAILER;
}

/* Commit both directions; interrupt the guest if either commit says so. */
static int commit_both(struct uvb_host_echo *e)
{
    int sig = 0;
    int rc = uvb_out_commit(e->rx);      /* answers first: the guest may be waiting */
    if (rc < 0)
        return rc;
    sig |= rc;
    rc = uvb_in_commit(e->tx);            /* then free TX space (pending_send_sz) */
    if (rc < 0)
        return rc;
    sig |= rc;
    if (sig)
        uvb_host_interrupt(e->irq);
    return 0;
}

int uvb_host_echo_pump(struct uvb_host_echo *e)
{
    struct uvb_ring *in = e->tx, *out = e->rx;
    uint64_t idle_since = 0;
    uint32_t cached_free = 0;
    for (;;) {
        if (__atomic_load_n(e->kick, __ATOMIC_ACQUIRE)) {
            int rc = commit_both(e);
            return rc < 0 ? rc : UVB_HOST_KICKED;
        }
        uint32_t start = in->cursor;
        int n = uvb_in_read(in, e->scratch, e->scratch_len, e->pkts, e->max_pkts);
        e->polls++;
        if (n == UVB_ENOBUFS) {
            int rc = commit_both(e);
            return rc < 0 ? rc : UVB_HOST_SLOWPATH;
        }
        if (n < 0)
            return n;
        if (n == 0) {
            int rc = commit_both(e);
            if (rc < 0)
                return rc;
            if (!e->spin_ns)
                return UVB_HOST_IDLE;
            uint64_t now = mono_ns();
            if (!idle_since)
                idle_since = now;
            else if (now - idle_since >= e->spin_ns)
                return UVB_HOST_IDLE;
            sched_yield();          /* poll on idle cycles only (the guest may need this CPU) */
            continue;
        }
        idle_since = 0;
        uint32_t pos = start;
        for (int i = 0; i < n; i++) {
            struct uvb_pkt *p = &e->pkts[i];
            const uint8_t *payload = e->scratch + p->data_offset;
            int slow = p->type != VMBUS_PKT_INBAND ||
                       (p->data_len >= 8 && memcmp(payload, &e->magic, 8) == 0);
            int want_comp = (p->flags & VMBUS_PKT_FLAG_COMPLETION_REQUESTED) != 0;
            uint32_t need = ring_bytes(p->data_len) + (want_comp ? ring_bytes(8) : 0);
            if (!slow && cached_free < need) {
                cached_free = uvb_out_free(out);
                if (out->error)
                    return out->error;
            }
            if (slow || cached_free < need) {
                /* give packet i (and the rest of the batch) back to the ring */
                in->cursor = pos;
                in->packets -= (uint64_t)(n - i);
                int rc = commit_both(e);
                if (rc < 0)
                    return rc;
                if (slow)
                    return UVB_HOST_SLOWPATH;
                rc = uvb_host_want_space(out, need, e->irq);
                if (rc < 0)
                    return rc;
                if (rc == 0)
                    return UVB_HOST_RXFULL;
                cached_free = 0;
                goto next_batch;          /* space appeared meanwhile: re-read from packet i */
            }
            int rc = uvb_out_inband(out, VMBUS_PKT_INBAND, 0, p->trans_id, payload, p->data_len);
            if (rc < 0)
                return rc;
            if (want_comp) {
                uint32_t comp[2] = {0, p->data_len};
                rc = uvb_out_inband(out, VMBUS_PKT_COMP, 0, p->trans_id, comp, sizeof comp);
                if (rc < 0)
                    return rc;
                e->completions++;
            }
            cached_free -= need;
            e->echoed++;
            pos += p->pkt_len + TRAILER;
            if (pos >= in->dsize)
                pos -= in->dsize;
        }
        {
            int rc = commit_both(e);
            if (rc < 0)
                return rc;
        }
    next_batch:;
    }
}
