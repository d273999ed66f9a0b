/* dpdk_peer: a small DPDK program driven line by line on stdin, the independent guest of
 * tests/dpdk/ and tests/bench/dpdk_side_by_side.py.  Built by the tests against the system's
 * DPDK (pkg-config libdpdk) and run through `uvmbus sim exec --guest-ram`.
 *
 *   dpdk_peer EAL-ARGS... -- [--rxd N] [--txd N]
 *
 * Commands (one per line; every answer is one line "OK {json}" or "ERR {json}"):
 *   start Q [tso]        configure the first port with Q rx/tx queues (RSS when Q > 1), start it;
 *                        "tso": ask for TCP segmentation offload (+ TCP/IPv4 checksum, multi-segment)
 *   link                 link status now (rte_eth_link_get_nowait)
 *   waitlink up|down S   poll the link until it is up/down (S seconds at most)
 *   mtu N                rte_eth_dev_set_mtu
 *   loop N SIZE [S]      send N numbered frames of SIZE bytes (spread over the queues and
 *                        flows), receive until all came back (loopback backend) or S seconds
 *                        passed; every frame's bytes are checked
 *   tx N SIZE            send N frames (sink backend)
 *   bounce N SIZE R      send N frames, send each received frame back (zero-copy) until every
 *                        one came back R times (loopback backend); every reception checked
 *   txfor S SIZE         send copies of one frame for S seconds (benchmark)
 *   rx S                 receive for S seconds, count frames and bytes
 *   fwd S                receive and send each burst straight back out for S seconds
 *   lso N PAYLOAD MSS    send N TCP/IPv4 large sends (chained mbufs, RTE_MBUF_F_TX_TCP_SEG,
 *                        tso_segsz MSS) of PAYLOAD bytes each and receive the segments the host
 *                        sends back (loopback backend); every segment's lengths, checksums,
 *                        sequence number, flags and payload bytes are checked
 *   stats                rte_eth_stats of the port
 *   stop / close / quit
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <rte_cycles.h>
#include <rte_eal.h>
#include <rte_ethdev.h>
#include <rte_ip.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>

#define BURST 32
#define MAGIC 0x55564d42u          /* "UVMB" */
#define MAX_Q 16

static uint16_t port;
static uint16_t nq;
static struct rte_mempool *pool;
static struct rte_ether_addr mac;
static unsigned rxd = 512, txd = 512;
static int started;

static double now(void)
{
    return (double)rte_get_timer_cycles() / (double)rte_get_timer_hz();
}

static void reply(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void reply(int ok, const char *fmt, ...)
{
    va_list ap;
    printf("%s {", ok ? "OK" : "ERR");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("}\n");
    fflush(stdout);
}

static int cmd_start(unsigned q, int tso)
{
    struct rte_eth_dev_info info;
    struct rte_eth_conf conf;
    int r;

    if (rte_eth_dev_count_avail() == 0) {
        reply(0, "\"error\": \"no ethernet port probed\"");
        return -1;
    }
    port = 0;
    while (!rte_eth_dev_is_valid_port(port))
        port++;
    r = rte_eth_dev_info_get(port, &info);
    if (r) {
        reply(0, "\"error\": \"dev_info_get %d\"", r);
        return -1;
    }
    if (q < 1 || q > MAX_Q || q > info.max_rx_queues || q > info.max_tx_queues) {
        reply(0, "\"error\": \"%u queues asked, the port has at most %u rx / %u tx\"", q,
              info.max_rx_queues, info.max_tx_queues);
        return -1;
    }
    memset(&conf, 0, sizeof(conf));
    if (q > 1) {
        conf.rxmode.mq_mode = RTE_ETH_MQ_RX_RSS;
        conf.rx_adv_conf.rss_conf.rss_hf =
            (RTE_ETH_RSS_IP | RTE_ETH_RSS_UDP | RTE_ETH_RSS_TCP) & info.flow_type_rss_offloads;
    }
    if (tso) {
        uint64_t want = RTE_ETH_TX_OFFLOAD_TCP_TSO | RTE_ETH_TX_OFFLOAD_TCP_CKSUM |
                        RTE_ETH_TX_OFFLOAD_IPV4_CKSUM | RTE_ETH_TX_OFFLOAD_MULTI_SEGS;
        if ((info.tx_offload_capa & want) != want) {
            reply(0, "\"error\": \"the port offers tx offloads %#" PRIx64 ", TSO needs %#" PRIx64 "\"",
                  info.tx_offload_capa, want);
            return -1;
        }
        conf.txmode.offloads = want;
    }
    r = rte_eth_dev_configure(port, (uint16_t)q, (uint16_t)q, &conf);
    if (r) {
        reply(0, "\"error\": \"configure %d\"", r);
        return -1;
    }
    for (unsigned i = 0; i < q; i++) {
        r = rte_eth_rx_queue_setup(port, (uint16_t)i, (uint16_t)rxd, rte_eth_dev_socket_id(port),
                                   NULL, pool);
        if (r) {
            reply(0, "\"error\": \"rx_queue_setup %u: %d\"", i, r);
            return -1;
        }
        r = rte_eth_tx_queue_setup(port, (uint16_t)i, (uint16_t)txd, rte_eth_dev_socket_id(port),
                                   NULL);
        if (r) {
            reply(0, "\"error\": \"tx_queue_setup %u: %d\"", i, r);
            return -1;
        }
    }
    r = rte_eth_dev_start(port);
    if (r) {
        reply(0, "\"error\": \"dev_start %d\"", r);
        return -1;
    }
    rte_eth_promiscuous_enable(port);
    rte_eth_macaddr_get(port, &mac);
    nq = (uint16_t)q;
    started = 1;
    struct rte_eth_link link;
    rte_eth_link_get_nowait(port, &link);
    reply(1, "\"port\": %u, \"queues\": %u, \"driver\": \"%s\", \"mac\": \"%02x:%02x:%02x:%02x:%02x:%02x\", "
          "\"link\": \"%s\", \"speed\": %u, \"max_rx_queues\": %u, \"tx_offload_capa\": %" PRIu64
          ", \"tso\": %d",
          port, q, info.driver_name, mac.addr_bytes[0], mac.addr_bytes[1], mac.addr_bytes[2],
          mac.addr_bytes[3], mac.addr_bytes[4], mac.addr_bytes[5],
          link.link_status ? "up" : "down", link.link_speed, info.max_rx_queues,
          info.tx_offload_capa, tso);
    return 0;
}

/* An IPv4/UDP frame: flow = seq % 64 (source port), payload {magic, seq, size, pattern}. */
static void fill_frame(uint8_t *p, unsigned size, uint32_t seq)
{
    static const uint8_t hdr[14] = {0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00};
    memcpy(p, hdr, 14);
    memcpy(p, mac.addr_bytes, 6);
    unsigned iplen = size - 14;
    uint8_t *ip = p + 14;
    memset(ip, 0, 28);
    ip[0] = 0x45;
    ip[2] = (uint8_t)(iplen >> 8);
    ip[3] = (uint8_t)iplen;
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = 17;
    ip[12] = 10; ip[13] = 0; ip[14] = 1; ip[15] = (uint8_t)(seq % 64);
    ip[16] = 10; ip[17] = 0; ip[18] = 0; ip[19] = 1;
    uint32_t sum = 0;
    for (int i = 0; i < 20; i += 2)
        sum += (uint32_t)(ip[i] << 8 | ip[i + 1]);
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    ip[10] = (uint8_t)(~sum >> 8);
    ip[11] = (uint8_t)~sum;
    uint8_t *udp = ip + 20;
    uint16_t sport = (uint16_t)(5000 + seq % 64), ulen = (uint16_t)(iplen - 20);
    udp[0] = (uint8_t)(sport >> 8); udp[1] = (uint8_t)sport;
    udp[2] = 0; udp[3] = 9;
    udp[4] = (uint8_t)(ulen >> 8); udp[5] = (uint8_t)ulen;
    uint8_t *pl = udp + 8;
    unsigned plen = size - 42;
    uint32_t w[3] = {MAGIC, seq, size};
    memcpy(pl, w, plen < 12 ? plen : 12);
    for (unsigned i = 12; i < plen; i++)
        pl[i] = (uint8_t)(seq * 7 + i);
}

/* 0 = a frame of ours with every byte right; *seq set when the header is readable */
static int check_frame(const struct rte_mbuf *m, unsigned size, uint32_t *seq)
{
    uint8_t want[9100], got[9100];
    if (m->pkt_len != size || size > sizeof(got))
        return -1;
    const uint8_t *p = rte_pktmbuf_read(m, 0, size, got);
    if (!p)
        return -1;
    uint32_t w[2];
    memcpy(w, p + 42, sizeof(w));
    if (w[0] != MAGIC)
        return -1;
    *seq = w[1];
    fill_frame(want, size, w[1]);
    return memcmp(want, p, size) ? -2 : 0;
}

static struct rte_mbuf *make_frame(unsigned size, uint32_t seq)
{
    struct rte_mbuf *m = rte_pktmbuf_alloc(pool);
    if (!m)
        return NULL;
    uint8_t *p = (uint8_t *)rte_pktmbuf_append(m, (uint16_t)size);
    if (!p) {
        rte_pktmbuf_free(m);
        return NULL;
    }
    fill_frame(p, size, seq);
    return m;
}

static void cmd_loop(unsigned n, unsigned size, double secs)
{
    uint8_t *seen = calloc(n ? n : 1, 1);
    uint64_t sent = 0, received = 0, bad = 0, dup = 0, foreign = 0, tx_full = 0;
    double deadline = now() + secs;
    uint32_t next = 0;
    /* at most `window` frames in flight: the loopback host answers as fast as we send, and
     * what the rx queues cannot hold is dropped by the PMD (imissed), not by the host */
    uint64_t window = rxd / 2 > BURST ? rxd / 2 : BURST;
    while ((received < n || next < n) && now() < deadline) {
        for (uint16_t q = 0; q < nq && next < n; q++) {
            struct rte_mbuf *burst[BURST];
            unsigned k = 0;
            while (k < BURST && next + k < n && next + k < received + foreign + bad + dup + window) {
                burst[k] = make_frame(size, next + k);
                if (!burst[k])
                    break;
                k++;
            }
            uint16_t s = rte_eth_tx_burst(port, q, burst, (uint16_t)k);
            for (unsigned i = s; i < k; i++)
                rte_pktmbuf_free(burst[i]);
            if (s < k)
                tx_full++;
            next += s;
            sent += s;
        }
        for (uint16_t q = 0; q < nq; q++) {
            struct rte_mbuf *burst[BURST];
            uint16_t r = rte_eth_rx_burst(port, q, burst, BURST);
            for (uint16_t i = 0; i < r; i++) {
                uint32_t seq = UINT32_MAX;
                int c = check_frame(burst[i], size, &seq);
                if (c == -1)
                    foreign++;
                else if (c < 0 || seq >= n)
                    bad++;
                else if (seen[seq]++)
                    dup++;
                else
                    received++;
                rte_pktmbuf_free(burst[i]);
            }
        }
    }
    free(seen);
    reply(received == n && !bad && !dup, "\"sent\": %" PRIu64 ", \"received\": %" PRIu64
          ", \"bad\": %" PRIu64 ", \"dup\": %" PRIu64 ", \"foreign\": %" PRIu64
          ", \"tx_full\": %" PRIu64 ", \"size\": %u", sent, received, bad, dup, foreign, tx_full, size);
}

/* send N numbered frames, then send every frame received straight back (the received mbuf
 * itself: with rx_extmbuf_enable=1 its data is in the NIC's receive buffer, so the PMD sends
 * it GPA-direct from there) until each came back ROUNDS times; every reception is checked */
static void cmd_bounce(unsigned n, unsigned size, unsigned rounds, double secs)
{
    uint8_t *seen = calloc(n ? n : 1, 1);
    uint64_t received = 0, bad = 0, extbuf = 0, sent = 0, want = (uint64_t)n * rounds;
    double deadline = now() + secs;
    for (uint32_t i = 0; i < n;) {
        struct rte_mbuf *m = make_frame(size, i);
        if (!m)
            break;
        if (rte_eth_tx_burst(port, (uint16_t)(i % nq), &m, 1) == 1) {
            i++;
            sent++;
        } else {
            rte_pktmbuf_free(m);
            if (now() > deadline)
                break;
        }
    }
    while (received < want && now() < deadline) {
        for (uint16_t q = 0; q < nq; q++) {
            struct rte_mbuf *burst[BURST];
            uint16_t r = rte_eth_rx_burst(port, q, burst, BURST);
            for (uint16_t i = 0; i < r; i++) {
                struct rte_mbuf *m = burst[i];
                uint32_t seq = UINT32_MAX;
                if (RTE_MBUF_HAS_EXTBUF(m))
                    extbuf++;
                if (check_frame(m, size, &seq) != 0 || seq >= n) {
                    bad++;
                    rte_pktmbuf_free(m);
                    continue;
                }
                received++;
                if (++seen[seq] < rounds) {
                    if (rte_eth_tx_burst(port, q, &m, 1) == 1)
                        sent++;
                    else
                        rte_pktmbuf_free(m);
                } else {
                    rte_pktmbuf_free(m);
                }
            }
        }
    }
    free(seen);
    reply(received == want && !bad, "\"sent\": %" PRIu64 ", \"received\": %" PRIu64
          ", \"bad\": %" PRIu64 ", \"extbuf\": %" PRIu64 ", \"size\": %u", sent, received,
          bad, extbuf, size);
}

static void cmd_tx(unsigned n, unsigned size)
{
    uint64_t sent = 0;
    double t0 = now(), deadline = t0 + 30;
    struct rte_mbuf *burst[BURST];
    while (sent < n && now() < deadline) {
        for (uint16_t q = 0; q < nq && sent < n; q++) {
            unsigned k = 0;
            while (k < BURST && sent + k < n && (burst[k] = make_frame(size, (uint32_t)(sent + k))))
                k++;
            uint16_t s = rte_eth_tx_burst(port, q, burst, (uint16_t)k);
            for (unsigned i = s; i < k; i++)
                rte_pktmbuf_free(burst[i]);
            sent += s;
        }
    }
    reply(sent == n, "\"sent\": %" PRIu64 ", \"seconds\": %.6f", sent, now() - t0);
}

/* send copies of one frame for S seconds (the benchmark's tx: a prebuilt frame per mbuf) */
static void cmd_txfor(double secs, unsigned size)
{
    uint8_t tmpl[9100];
    uint64_t sent = 0;
    double t0 = now(), end = t0 + secs;
    struct rte_mbuf *burst[BURST];
    if (size < 60 || size > sizeof(tmpl)) {
        reply(0, "\"error\": \"size %u\"", size);
        return;
    }
    fill_frame(tmpl, size, 0);
    while (now() < end) {
        for (uint16_t q = 0; q < nq; q++) {
            if (rte_pktmbuf_alloc_bulk(pool, burst, BURST) != 0)
                continue;
            for (unsigned i = 0; i < BURST; i++)
                memcpy(rte_pktmbuf_append(burst[i], (uint16_t)size), tmpl, size);
            uint16_t s = rte_eth_tx_burst(port, q, burst, BURST);
            if (s < BURST)
                rte_pktmbuf_free_bulk(burst + s, BURST - s);
            sent += s;
        }
    }
    reply(1, "\"sent\": %" PRIu64 ", \"seconds\": %.6f", sent, now() - t0);
}

static void cmd_rx(double secs)
{
    uint64_t frames = 0, bytes = 0;
    double t0 = now(), end = t0 + secs;
    struct rte_mbuf *burst[BURST];
    while (now() < end) {
        for (uint16_t q = 0; q < nq; q++) {
            uint16_t r = rte_eth_rx_burst(port, q, burst, BURST);
            for (uint16_t i = 0; i < r; i++) {
                bytes += burst[i]->pkt_len;
                rte_pktmbuf_free(burst[i]);
            }
            frames += r;
        }
    }
    reply(1, "\"frames\": %" PRIu64 ", \"bytes\": %" PRIu64 ", \"seconds\": %.6f", frames, bytes,
          now() - t0);
}

static void cmd_fwd(double secs)
{
    uint64_t rx = 0, tx = 0;
    double t0 = now(), end = t0 + secs;
    struct rte_mbuf *burst[BURST];
    while (now() < end) {
        for (uint16_t q = 0; q < nq; q++) {
            uint16_t r = rte_eth_rx_burst(port, q, burst, BURST);
            if (!r)
                continue;
            uint16_t s = rte_eth_tx_burst(port, q, burst, r);
            for (uint16_t i = s; i < r; i++)
                rte_pktmbuf_free(burst[i]);
            rx += r;
            tx += s;
        }
    }
    reply(1, "\"rx\": %" PRIu64 ", \"tx\": %" PRIu64 ", \"seconds\": %.6f", rx, tx, now() - t0);
}

static void cmd_link(void)
{
    struct rte_eth_link link;
    int r = rte_eth_link_get_nowait(port, &link);
    reply(r == 0, "\"link\": \"%s\", \"speed\": %u, \"rc\": %d", link.link_status ? "up" : "down",
          link.link_speed, r);
}

static void cmd_waitlink(const char *want, double secs)
{
    struct rte_eth_link link;
    double t0 = now(), end = t0 + secs;
    int up = strcmp(want, "up") == 0;
    do {
        rte_eth_link_get_nowait(port, &link);
        if ((int)link.link_status == up)
            break;
        rte_delay_ms(20);
    } while (now() < end);
    reply((int)link.link_status == up, "\"link\": \"%s\", \"waited\": %.3f",
          link.link_status ? "up" : "down", now() - t0);
}

static void cmd_stats(void)
{
    struct rte_eth_stats st;
    int r = rte_eth_stats_get(port, &st);
    reply(r == 0, "\"ipackets\": %" PRIu64 ", \"opackets\": %" PRIu64 ", \"imissed\": %" PRIu64
          ", \"ierrors\": %" PRIu64 ", \"oerrors\": %" PRIu64 ", \"rx_nombuf\": %" PRIu64,
          st.ipackets, st.opackets, st.imissed, st.ierrors, st.oerrors, st.rx_nombuf);
}

/* ---- large sends ------------------------------------------------------------------------ */
#define LSO_PORT 5201
#define LSO_SEQ(i) (0x10000000u + (uint32_t)(i) * 0x100000u)
static inline uint8_t lso_byte(uint32_t i, uint32_t k) { return (uint8_t)(i * 13u + k * 7u + 1u); }

static uint32_t sum16(uint32_t s, const uint8_t *p, uint32_t n)
{
    for (; n >= 2; p += 2, n -= 2)
        s += (uint32_t)(p[0] << 8 | p[1]);
    if (n)
        s += (uint32_t)(p[0] << 8);
    return s;
}

static uint16_t fold(uint32_t s)
{
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint16_t)s;
}

/* large send i: Ethernet + IPv4 + TCP headers (lengths/checksums as DPDK's TSO convention:
 * IPv4 checksum 0, TCP checksum = pseudo header without length) + payload, in chained mbufs */
static struct rte_mbuf *make_lso(uint32_t i, unsigned payload, unsigned mss)
{
    struct rte_mbuf *head = rte_pktmbuf_alloc(pool);
    if (!head)
        return NULL;
    uint8_t *p = (uint8_t *)rte_pktmbuf_append(head, 54);
    memcpy(p, mac.addr_bytes, 6);
    static const uint8_t src[6] = {0x02, 0, 0, 0, 0, 0x03};
    memcpy(p + 6, src, 6);
    p[12] = 0x08; p[13] = 0x00;
    uint8_t *ip = p + 14, *th = p + 34;
    memset(ip, 0, 40);
    ip[0] = 0x45;
    uint32_t tot = 40 + payload;
    ip[2] = (uint8_t)(tot >> 8); ip[3] = (uint8_t)tot;
    ip[4] = (uint8_t)(i >> 8); ip[5] = (uint8_t)i;
    ip[6] = 0x40; ip[8] = 64; ip[9] = 6;
    ip[12] = 10; ip[13] = 0; ip[14] = 3; ip[15] = (uint8_t)(i % 64);
    ip[16] = 10; ip[17] = 0; ip[18] = 0; ip[19] = 1;
    uint16_t sport = (uint16_t)(6000 + i % 64);
    th[0] = (uint8_t)(sport >> 8); th[1] = (uint8_t)sport;
    th[2] = LSO_PORT >> 8; th[3] = LSO_PORT & 0xff;
    uint32_t seq = LSO_SEQ(i);
    th[4] = (uint8_t)(seq >> 24); th[5] = (uint8_t)(seq >> 16); th[6] = (uint8_t)(seq >> 8); th[7] = (uint8_t)seq;
    th[12] = 0x50; th[13] = 0x18;                  /* ACK | PSH */
    th[14] = 0xff; th[15] = 0xff;
    uint16_t ph = fold(sum16(6, ip + 12, 8));
    th[16] = (uint8_t)(ph >> 8); th[17] = (uint8_t)ph;
    struct rte_mbuf *last = head;
    unsigned done = 0;
    while (done < payload) {
        struct rte_mbuf *m = last;
        unsigned room = rte_pktmbuf_tailroom(m);
        if (room == 0) {
            m = rte_pktmbuf_alloc(pool);
            if (!m || rte_pktmbuf_chain(head, m)) {
                rte_pktmbuf_free(m);
                rte_pktmbuf_free(head);
                return NULL;
            }
            last = m;
            room = rte_pktmbuf_tailroom(m);
        }
        unsigned k = payload - done < room ? payload - done : room;
        uint8_t *d = (uint8_t *)rte_pktmbuf_append(head, (uint16_t)k);    /* to the last segment */
        if (!d) {
            rte_pktmbuf_free(head);
            return NULL;
        }
        for (unsigned j = 0; j < k; j++)
            d[j] = lso_byte(i, done + j);
        done += k;
    }
    head->ol_flags |= RTE_MBUF_F_TX_TCP_SEG | RTE_MBUF_F_TX_IPV4 | RTE_MBUF_F_TX_IP_CKSUM |
                      RTE_MBUF_F_TX_TCP_CKSUM;
    head->l2_len = 14;
    head->l3_len = 20;
    head->l4_len = 20;
    head->tso_segsz = (uint16_t)mss;
    return head;
}

/* one received segment: 0 and *i, *off, *len set, or -1 */
static int check_segment(const struct rte_mbuf *m, unsigned payload, unsigned mss, unsigned n,
                         uint32_t *i, uint32_t *off, uint32_t *len)
{
    uint8_t buf[2048];
    if (m->pkt_len < 54 || m->pkt_len > sizeof(buf))
        return -1;
    const uint8_t *p = rte_pktmbuf_read(m, 0, m->pkt_len, buf);
    const uint8_t *ip = p + 14, *th = p + 34;
    if (p[12] != 0x08 || p[13] != 0x00 || ip[0] != 0x45 || ip[9] != 6 || (th[2] << 8 | th[3]) != LSO_PORT)
        return -1;
    uint32_t tot = (uint32_t)(ip[2] << 8 | ip[3]);
    if (tot + 14 != m->pkt_len || fold(sum16(0, ip, 20)) != 0xffff)
        return -2;                                  /* length or IPv4 header checksum */
    uint32_t l4 = tot - 20;
    if (fold(sum16(sum16(6 + l4, ip + 12, 8), th, l4)) != 0xffff)
        return -3;                                  /* TCP checksum */
    uint32_t seq = (uint32_t)th[4] << 24 | (uint32_t)th[5] << 16 | (uint32_t)th[6] << 8 | th[7];
    uint32_t sport = (uint32_t)(th[0] << 8 | th[1]) - 6000;
    *i = sport;
    if (sport >= n || seq < LSO_SEQ(sport) || (th[12] >> 4) != 5)
        return -4;
    *off = seq - LSO_SEQ(sport);
    *len = l4 - 20;
    if (*len > mss || *off + *len > payload || (*off % mss) != 0)
        return -5;
    int last = *off + *len == payload;
    if (((th[13] & 0x08) != 0) != last)
        return -6;                                  /* PSH on the last segment only */
    for (uint32_t j = 0; j < *len; j++)
        if (th[20 + j] != lso_byte(sport, *off + j))
            return -7;
    return 0;
}

static void cmd_lso(unsigned n, unsigned payload, unsigned mss, double secs)
{
    if (n == 0 || n > 64 || mss == 0) {
        reply(0, "\"error\": \"lso N (1..64) PAYLOAD MSS\"");
        return;
    }
    unsigned per = (payload + mss - 1) / mss;
    uint64_t want = (uint64_t)n * per, got = 0, bad = 0, bytes = 0, sent = 0;
    int64_t firstbad = 0;
    uint8_t *seen = calloc((size_t)want, 1);
    double deadline = now() + secs;
    for (uint32_t i = 0; i < n;) {
        struct rte_mbuf *m = make_lso(i, payload, mss);
        if (!m)
            break;
        if (rte_eth_tx_burst(port, (uint16_t)(i % nq), &m, 1) == 1) {
            i++;
            sent++;
        } else {
            rte_pktmbuf_free(m);
            if (now() > deadline)
                break;
        }
    }
    while (got < want && now() < deadline) {
        for (uint16_t q = 0; q < nq; q++) {
            struct rte_mbuf *burst[BURST];
            uint16_t r = rte_eth_rx_burst(port, q, burst, BURST);
            for (uint16_t k = 0; k < r; k++) {
                uint32_t i = 0, off = 0, len = 0;
                int rc = check_segment(burst[k], payload, mss, n, &i, &off, &len);
                if (rc == 0 && !seen[i * per + off / mss]) {
                    seen[i * per + off / mss] = 1;
                    got++;
                    bytes += len;
                } else if (rc != -1) {
                    bad++;
                    if (!firstbad)
                        firstbad = rc;
                }
                rte_pktmbuf_free(burst[k]);
            }
        }
    }
    free(seen);
    reply(got == want && !bad && bytes == (uint64_t)n * payload,
          "\"sent\": %" PRIu64 ", \"segments\": %" PRIu64 ", \"expected\": %" PRIu64
          ", \"bytes\": %" PRIu64 ", \"bad\": %" PRIu64 ", \"first_bad\": %" PRId64,
          sent, got, want, bytes, bad, firstbad);
}

int main(int argc, char **argv)
{
    int r = rte_eal_init(argc, argv);
    if (r < 0) {
        reply(0, "\"error\": \"rte_eal_init failed: %s\"", rte_strerror(rte_errno));
        return 1;
    }
    argc -= r;
    argv += r;
    for (int i = 1; i + 1 < argc; i++) {
        if (!strcmp(argv[i], "--rxd"))
            rxd = (unsigned)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--txd"))
            txd = (unsigned)atoi(argv[++i]);
    }
    /* The PMD keeps up to rxd mbufs per queue in its staging ring and up to txd in flight:
     * size the pool for two queues of each, or a large --rxd drains it (rx_nombuf) and
     * txfor finds no mbuf to send.  2^k - 1 elements is the mempool's best size. */
    unsigned nb = 8191;
    while (nb < 2 * (rxd + txd) + 2048)
        nb = nb * 2 + 1;
    pool = rte_pktmbuf_pool_create("peer_pool", nb, 256, 0, RTE_MBUF_DEFAULT_BUF_SIZE,
                                   (int)rte_socket_id());
    if (!pool) {
        reply(0, "\"error\": \"mbuf pool: %s\"", rte_strerror(rte_errno));
        return 1;
    }
    reply(1, "\"ready\": 1, \"ports\": %u", rte_eth_dev_count_avail());
    char line[256];
    while (fgets(line, sizeof(line), stdin)) {
        char cmd[32] = "", a1[32] = "", a2[32] = "", a3[32] = "";
        if (sscanf(line, "%31s %31s %31s %31s", cmd, a1, a2, a3) < 1)
            continue;
        if (!strcmp(cmd, "quit"))
            break;
        if (!strcmp(cmd, "start")) {
            cmd_start((unsigned)atoi(a1[0] ? a1 : "1"), !strcmp(a2, "tso"));
            continue;
        }
        if (!started) {
            reply(0, "\"error\": \"start the port first\"");
            continue;
        }
        if (!strcmp(cmd, "link"))
            cmd_link();
        else if (!strcmp(cmd, "waitlink"))
            cmd_waitlink(a1, atof(a2[0] ? a2 : "10"));
        else if (!strcmp(cmd, "mtu")) {
            r = rte_eth_dev_set_mtu(port, (uint16_t)atoi(a1));
            uint16_t m = 0;
            rte_eth_dev_get_mtu(port, &m);
            reply(r == 0, "\"rc\": %d, \"mtu\": %u", r, m);
        } else if (!strcmp(cmd, "loop"))
            cmd_loop((unsigned)atoi(a1), (unsigned)atoi(a2), atof(a3[0] ? a3 : "20"));
        else if (!strcmp(cmd, "tx"))
            cmd_tx((unsigned)atoi(a1), (unsigned)atoi(a2));
        else if (!strcmp(cmd, "bounce"))
            cmd_bounce((unsigned)atoi(a1), (unsigned)atoi(a2), (unsigned)atoi(a3[0] ? a3 : "3"), 30);
        else if (!strcmp(cmd, "txfor"))
            cmd_txfor(atof(a1), (unsigned)atoi(a2));
        else if (!strcmp(cmd, "rx"))
            cmd_rx(atof(a1));
        else if (!strcmp(cmd, "fwd"))
            cmd_fwd(atof(a1));
        else if (!strcmp(cmd, "stats"))
            cmd_stats();
        else if (!strcmp(cmd, "lso"))
            cmd_lso((unsigned)atoi(a1), (unsigned)atoi(a2), (unsigned)atoi(a3), 30);
        else if (!strcmp(cmd, "stop")) {
            r = rte_eth_dev_stop(port);
            reply(r == 0, "\"rc\": %d", r);
        } else if (!strcmp(cmd, "close")) {
            r = rte_eth_dev_close(port);
            started = 0;
            reply(r == 0, "\"rc\": %d", r);
        } else
            reply(0, "\"error\": \"unknown command %s\"", cmd);
    }
    if (started) {
        rte_eth_dev_stop(port);
        rte_eth_dev_close(port);
    }
    rte_eal_cleanup();
    return 0;
}
