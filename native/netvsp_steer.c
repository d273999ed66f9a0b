/*
 * Simulated NetVSP data plane — RSS steering (Toeplitz over the guest key/table) and checksums.
 * Host side only (uvmbus sim); see netvsp.h and netvsp_priv.h.
 *
 * Written from ../shared/reference/netvsc.md §5–§7 and §10; everything read from guest
 * memory (TX ring packets are already private copies; send-buffer sections and GPA pages
 * are not) is copied into locals before it is checked.
 */
#define _GNU_SOURCE
#include "netvsp_priv.h"

/* ------------------------------------------------------------------------ */
/* RSS                                                                       */

uint32_t uvb_nvsp_toeplitz(const uint8_t *key, const uint8_t *data, uint32_t len)
{
    uint32_t result = 0;
    uint32_t window = (uint32_t)key[0] << 24 | (uint32_t)key[1] << 16 | (uint32_t)key[2] << 8 | key[3];
    uint32_t kbit = 32;                     /* next key bit to shift into the window */
    for (uint32_t i = 0; i < len; i++) {
        for (int b = 7; b >= 0; b--) {
            if (data[i] & (1u << b))
                result ^= window;
            uint32_t nb = kbit < 320 ? (key[kbit / 8] >> (7 - kbit % 8)) & 1u : 0u;
            window = window << 1 | nb;
            kbit++;
        }
    }
    return result;
}

/* Parse an Ethernet frame for RSS: fills `in` with the hash input, returns its length
 * and the hash type, or 0. */
static uint32_t rss_input(uint32_t hash_info, const uint8_t *f, uint32_t len, uint8_t *in,
                          uint32_t *type)
{
    *type = 0;
    if (len < 14)
        return 0;
    uint16_t et = be16(f + 12);
    uint32_t l3 = 14;
    if (et == 0x8100 && len >= 18) {
        et = be16(f + 16);
        l3 = 18;
    }
    if (et == 0x0800) {
        if (len < l3 + 20)
            return 0;
        const uint8_t *ip = f + l3;
        uint32_t ihl = (ip[0] & 0xfu) * 4u;
        if ((ip[0] >> 4) != 4 || ihl < 20 || len < l3 + ihl)
            return 0;
        memcpy(in, ip + 12, 8);
        int frag = (be16(ip + 6) & 0x3fffu) != 0;
        uint8_t proto = ip[9];
        if (!frag && len >= l3 + ihl + 4) {
            if (proto == 6 && (hash_info & NDIS_HASH_TCP_IPV4)) {
                memcpy(in + 8, f + l3 + ihl, 4);
                *type = NDIS_HASH_TCP_IPV4;
                return 12;
            }
            if (proto == 17 && (hash_info & NDIS_HASH_UDP_IPV4)) {
                memcpy(in + 8, f + l3 + ihl, 4);
                *type = NDIS_HASH_UDP_IPV4;
                return 12;
            }
        }
        if (hash_info & NDIS_HASH_IPV4) {
            *type = NDIS_HASH_IPV4;
            return 8;
        }
        return 0;
    }
    if (et == 0x86DD) {
        if (len < l3 + 40)
            return 0;
        const uint8_t *ip = f + l3;
        memcpy(in, ip + 8, 32);
        uint8_t nh = ip[6];
        if (len >= l3 + 44) {
            if (nh == 6 && (hash_info & NDIS_HASH_TCP_IPV6)) {
                memcpy(in + 32, ip + 40, 4);
                *type = NDIS_HASH_TCP_IPV6;
                return 36;
            }
            if (nh == 17 && (hash_info & NDIS_HASH_UDP_IPV6)) {
                memcpy(in + 32, ip + 40, 4);
                *type = NDIS_HASH_UDP_IPV6;
                return 36;
            }
        }
        if (hash_info & NDIS_HASH_IPV6) {
            *type = NDIS_HASH_IPV6;
            return 32;
        }
    }
    return 0;
}

uint32_t uvb_nvsp_frame_hash(const struct uvb_nvsp *n, const uint8_t *frame, uint32_t len,
                             uint32_t *type)
{
    uint8_t in[40];
    uint32_t t = 0;
    uint32_t k = rss_input(n->hash_info, frame, len, in, &t);
    if (type)
        *type = t;
    return k ? uvb_nvsp_toeplitz(n->rss_key, in, k) : 0;
}

uint32_t nvsp_queue_for_hash(const struct uvb_nvsp *n, uint32_t hash, uint32_t type)
{
    if (!n->rss_enabled || !type)
        return 0;
    uint32_t q = n->rss_table[hash & 127u];
    return q < n->num_queues ? q : 0;
}

uint32_t uvb_nvsp_frame_queue(const struct uvb_nvsp *n, const uint8_t *frame, uint32_t len)
{
    if (!n->rss_enabled)
        return 0;
    uint32_t type;
    uint32_t h = uvb_nvsp_frame_hash(n, frame, len, &type);
    return nvsp_queue_for_hash(n, h, type);
}

/* ------------------------------------------------------------------------ */
/* checksums                                                                 */

uint32_t nvsp_csum_add(uint32_t sum, const uint8_t *p, uint32_t len)
{
    return uvb_csum_add(sum, p, len);
}

uint16_t nvsp_csum_fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffffu) + (sum >> 16);
    return (uint16_t)~sum;
}

/* L4 checksum over [l4, l4+l4len) with the pseudo header of the IP header at ip. */
uint16_t nvsp_l4_csum(const uint8_t *ip, int v6, const uint8_t *l4, uint32_t l4len, uint8_t proto)
{
    uint32_t sum = 0;
    if (v6) {
        sum = nvsp_csum_add(sum, ip + 8, 32);
        sum += l4len >> 16;
        sum += l4len & 0xffffu;
    } else {
        sum = nvsp_csum_add(sum, ip + 12, 8);
        sum += l4len;
    }
    sum += proto;
    sum = nvsp_csum_add(sum, l4, l4len);
    return nvsp_csum_fold(sum);
}

/* RX checksum PPI value for a frame (0 = no information). */
uint32_t nvsp_rx_csum_info(const uint8_t *f, uint32_t len, int known_good)
{
    if (len < 14)
        return 0;
    uint16_t et = be16(f + 12);
    uint32_t l3 = 14;
    if (et == 0x0800 && len >= l3 + 20) {
        const uint8_t *ip = f + l3;
        uint32_t ihl = (ip[0] & 0xfu) * 4u;
        if ((ip[0] >> 4) != 4 || ihl < 20 || len < l3 + ihl)
            return 0;
        uint32_t tot = be16(ip + 2);
        uint32_t v = 0;
        if (known_good || nvsp_csum_fold(nvsp_csum_add(0, ip, ihl)) == 0)
            v |= CSUM_RX_IP_OK;
        else
            return CSUM_RX_IP_FAILED;
        if (tot < ihl || l3 + tot > len || (be16(ip + 6) & 0x3fffu))
            return v;
        const uint8_t *l4 = ip + ihl;
        uint32_t l4len = tot - ihl;
        if (ip[9] == 6 && l4len >= 20)
            v |= (known_good || nvsp_l4_csum(ip, 0, l4, l4len, 6) == 0) ? CSUM_RX_TCP_OK : CSUM_RX_TCP_FAILED;
        else if (ip[9] == 17 && l4len >= 8) {
            uint16_t c = be16(l4 + 6);
            v |= (known_good || c == 0 || nvsp_l4_csum(ip, 0, l4, l4len, 17) == 0) ? CSUM_RX_UDP_OK
                                                                              : CSUM_RX_UDP_FAILED;
        }
        return v;
    }
    if (et == 0x86DD && len >= l3 + 40) {
        const uint8_t *ip = f + l3;
        uint32_t plen = be16(ip + 4);
        if (l3 + 40 + plen > len)
            return 0;
        const uint8_t *l4 = ip + 40;
        if (ip[6] == 6 && plen >= 20)
            return (known_good || nvsp_l4_csum(ip, 1, l4, plen, 6) == 0) ? CSUM_RX_TCP_OK : CSUM_RX_TCP_FAILED;
        if (ip[6] == 17 && plen >= 8)
            return (known_good || nvsp_l4_csum(ip, 1, l4, plen, 17) == 0) ? CSUM_RX_UDP_OK : CSUM_RX_UDP_FAILED;
    }
    return 0;
}

/* Apply a TX checksum PPI to a private frame copy.  0, or -1 when the request is invalid
 * (offsets outside the frame, §5: completed with FAILURE). */
int nvsp_tx_csum_offload(uint8_t *f, uint32_t len, uint32_t info)
{
    int v4 = (info & CSUM_TX_IS_IPV4) != 0, v6 = (info & CSUM_TX_IS_IPV6) != 0;
    int want_l4 = (info & (CSUM_TX_TCP | CSUM_TX_UDP)) != 0;
    if (!(info & (CSUM_TX_TCP | CSUM_TX_UDP | CSUM_TX_IP_HDR)))
        return 0;
    if (v4 == v6)
        return -1;
    uint32_t l3 = 14;
    if (len < l3 + (v4 ? 20u : 40u))
        return -1;
    uint8_t *ip = f + l3;
    if (v4) {
        uint32_t ihl = (ip[0] & 0xfu) * 4u;
        if (ihl < 20 || l3 + ihl > len)
            return -1;
        if (info & CSUM_TX_IP_HDR) {
            ip[10] = ip[11] = 0;
            uint16_t c = nvsp_csum_fold(nvsp_csum_add(0, ip, ihl));
            ip[10] = (uint8_t)(c >> 8);
            ip[11] = (uint8_t)c;
        }
    }
    if (!want_l4)
        return 0;
    uint32_t off = (info & CSUM_TX_TCP_HDR_OFFSET_MASK) >> CSUM_TX_TCP_HDR_OFFSET_SHIFT;
    if (off < l3 + (v4 ? 20u : 40u) || off >= len)
        return -1;
    int tcp = (info & CSUM_TX_TCP) != 0;
    uint32_t need = tcp ? 20u : 8u;
    if (off + need > len)
        return -1;
    uint32_t l4len = len - off;
    if (v4) {
        uint32_t tot = be16(ip + 2);
        if (l3 + tot <= len && l3 + tot > off)
            l4len = l3 + tot - off;
    } else {
        uint32_t plen = be16(ip + 4);
        if (l3 + 40 + plen <= len && l3 + 40 + plen > off)
            l4len = l3 + 40 + plen - off;
    }
    uint8_t *l4 = f + off;
    uint32_t co = tcp ? 16u : 6u;
    l4[co] = l4[co + 1] = 0;
    uint16_t c = nvsp_l4_csum(ip, v6, l4, l4len, tcp ? 6 : 17);
    if (!tcp && c == 0)
        c = 0xffff;
    l4[co] = (uint8_t)(c >> 8);
    l4[co + 1] = (uint8_t)c;
    return 0;
}
