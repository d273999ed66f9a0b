/*
 * Simulated NetVSP (synthetic NIC host) fast path, used by uvmbus/sim/models/netvsp.py.
 * Read by the C compiler and by cffi's cdef.
 *
 * Written from ../shared/reference/netvsc.md §5, §6, §7 and §10 (the host behaviour of
 * openvmm's NetVSP), independently of the guest driver (native/netvsc.c).
 *
 * Split of work: Python (the model) runs the control plane — the NVSP state machine,
 * RNDIS INIT/QUERY/SET/KEEPALIVE/HALT, sub-channel grants, RSS parameters, link state —
 * and decides every fatal error.  C runs the data plane of each channel:
 *   - guest RX acks (COMPLETION {108}) returning receive sub-allocations,
 *   - guest TX (NVSP 107, channel_type 0, RNDIS PACKETs from a send-buffer section or
 *     GPA-direct ranges) handed to the backend, with the TX completion,
 *   - RX: frames from the backend written into receive-buffer sub-allocations as RNDIS
 *     PACKETs and sent as XFER_PAGES packets of up to 375 ranges,
 *   - control messages the model posted (RNDIS responses/indications in the 16 reserved
 *     control sub-allocations, in-band NVSP messages such as the send table).
 * Anything else — or anything invalid — is left in the ring for Python: the pump returns
 * UVB_HOST_SLOWPATH with `punt_msg` set (and `punt_fatal` = 1 for protocol violations
 * that are fatal on a real host).  The pump follows the contract of host.h.
 *
 * Threads: each channel is served by its own simulator worker thread, which alone writes
 * that channel's RX ring.  Frames for another queue (RSS) go through that queue's inbox
 * (spinlock) and its worker is poked (`poke_mask`).  Receive-buffer pools are per queue
 * with a spinlock (acks may come back on another channel).
 */

#define UVB_NVSP_MAX_QUEUES     64
#define UVB_NVSP_CTRL_IDS       16      /* receive sub-allocations reserved for control */
#define UVB_NVSP_RX_DATA_OFFSET 256     /* frame position in a sub-allocation */
#define UVB_NVSP_SUB_OVERHEAD   292     /* 256 + 36 unused bytes (§6) */
#define UVB_NVSP_CTRL_QUEUE_MAX 102400  /* queued control bytes before FAILURE (§6) */
#define UVB_NVSP_SECTION_SIZE   6144
#define UVB_NVSP_MAX_FRAME      65536
#define UVB_NVSP_RSC_FLOWS      8       /* coalescing units open at once per queue */
#define UVB_NVSP_RSC_MAX_FRAME  65549   /* an SCU: 14 + one IP datagram (65535) */

/* backends */
#define UVB_NVSP_BACKEND_NONE       0   /* TX frames dropped silently, no RX */
#define UVB_NVSP_BACKEND_LOOPBACK   1   /* TX frames come back as RX (RSS-steered) */
#define UVB_NVSP_BACKEND_SINK       2   /* TX frames counted and dropped */
#define UVB_NVSP_BACKEND_GENERATOR  3   /* RX frames synthesized; TX sunk */
#define UVB_NVSP_BACKEND_FD         4   /* TX frames written to backend_fd (TAP) */

/* injected malformations of host->guest messages (model option "fault") */
#define UVB_NVSP_FAULT_NONE         0
#define UVB_NVSP_FAULT_BAD_RANGE    1   /* a range beyond the receive buffer */
#define UVB_NVSP_FAULT_BAD_RNDIS_LEN 2  /* RNDIS msg_len larger than its range */
#define UVB_NVSP_FAULT_BAD_NVSP_TYPE 3  /* XFER_PAGES carrying NVSP type 0x7777 */
#define UVB_NVSP_FAULT_BAD_PAGESET  4   /* wrong xfer_pageset_id */
#define UVB_NVSP_FAULT_BAD_DATA_OFFSET 5 /* RNDIS data_offset beyond the message */
#define UVB_NVSP_FAULT_BAD_PPI      6   /* a PPI element of size 0 */

/* inbox record flags / frame metadata flags */
#define UVB_NVSP_META_VLAN      0x1     /* vlan_tci valid */
#define UVB_NVSP_META_CSUM_OK   0x2     /* checksums known good (no verification needed) */

/* generator protocols */
#define UVB_NVSP_GEN_UDP4       0
#define UVB_NVSP_GEN_TCP4       1

struct uvb_nvsp_gen {
    uint32_t size;              /* frame length incl. 14-byte Ethernet header (60..mtu) */
    uint32_t flows;             /* distinct 4-tuples (src ip/port vary) */
    uint32_t proto;             /* UVB_NVSP_GEN_* */
    uint32_t burst;             /* frames per XFER_PAGES packet (<= max_ranges) */
    uint64_t limit;             /* total frames to generate (0 = unlimited) */
    uint64_t generated;         /* frames generated so far (all queues) */
    uint8_t  dst_mac[6];
    uint8_t  src_mac[6];
    uint32_t src_ip;            /* host order; flow f uses src_ip + f */
    uint32_t dst_ip;
    uint16_t src_port;          /* flow f uses src_port + f */
    uint16_t dst_port;
};

/* Where frames go while the guest has switched the data path to the VF (SWITCH_DATA_PATH):
 * the synthetic queues get nothing of what the VF takes (counted in rx_to_vf). */
#define UVB_NVSP_VF_OFF       0   /* synthetic data path: every frame to the queues */
#define UVB_NVSP_VF_UNICAST   1   /* Hyper-V: unicast to the VF; broadcast/multicast stay synthetic */
#define UVB_NVSP_VF_ALL       2   /* OpenHCL/MANA: the MAC filter moves to the VF, every frame */

struct uvb_nvsp {
    /* ---- configuration (written by the model) ---- */
    uint8_t  *recv_buf;
    uint64_t  recv_size;
    uint32_t  sub_size;         /* set by uvb_nvsp_set_recv_buf */
    uint32_t  sub_count;
    uint8_t  *send_buf;
    uint64_t  send_size;
    uint32_t  section_size;
    uint32_t  section_count;
    uint8_t  *guest_ram;        /* for GPA-direct TX; NULL = not available */
    uint64_t  ram_size;
    uint64_t  ram_base_pfn;
    uint32_t  recv_buf_id;
    uint32_t  msg_size;         /* NVSP message size the host sends: 32 or 40 */
    uint32_t  max_ranges;       /* ranges per XFER_PAGES packet (375) */
    uint32_t  data_ready;       /* 1: buffers connected and RNDIS operational */
    uint32_t  filter;           /* RNDIS packet filter: 0 = deliver nothing */
    uint32_t  link_up;
    uint32_t  mtu;              /* NDIS mtu incl. the 14-byte header */
    uint32_t  backend;
    int32_t   backend_fd;
    uint32_t  num_queues;       /* active queues (1 + granted sub-channels) */
    uint32_t  rss_enabled;
    uint32_t  hash_info;
    uint32_t  rx_hash_ppi;      /* 1: add hash value/info PPIs when RSS is on */
    uint32_t  rx_verify_csum;   /* 1: verify checksums of delivered frames for the csum PPI */
    uint32_t  lso_v4;           /* 1: the guest enabled LSOv2 for IPv4 (OID_TCP_OFFLOAD_PARAMETERS) */
    uint32_t  lso_v6;           /* 1: ... for IPv6 */
    uint32_t  lso_max;          /* largest large send the host announced (counted above it) */
    uint32_t  reserved_lso;
    uint8_t   rss_key[40];
    uint32_t  rss_table[128];   /* queue index per hash bucket (replicated to 128) */
    uint32_t  fault_kind;       /* UVB_NVSP_FAULT_* applied to the next fault_count packets */
    uint32_t  fault_count;
    uint32_t  cfg_epoch;        /* bump after changing RSS / generator settings */
    uint32_t  reserved0;
    /* RSC (receive segment coalescing): set by the model once the guest enabled it */
    uint32_t  rsc_ip4;          /* coalesce TCP/IPv4 segments */
    uint32_t  rsc_ip6;          /* coalesce TCP/IPv6 segments */
    uint32_t  rsc_max_segs;     /* segments per coalesced unit (0: only the datagram limit) */
    uint32_t  rsc_reserved;
    uint32_t  vf_steer;         /* data path on the VF: UVB_NVSP_VF_* (who still gets frames) */
    struct uvb_nvsp_gen gen;
    /* ---- state (C) ---- */
    void     *priv;             /* pools and sub-allocation states (uvb_nvsp_set_recv_buf) */
    uint32_t  dead;
    uint32_t  ctrl_lock;
    char      errmsg[192];
    /* ---- NIC-wide statistics ---- */
    uint64_t  ctrl_sent;
    uint64_t  ctrl_queued_bytes;
    uint64_t  faults_injected;
};

struct uvb_nvsp_queue {
    struct uvb_nvsp *nic;
    uint32_t  index;            /* queue = sub-channel index (0 = primary) */
    uint32_t  reserved0;
    struct uvb_ring *in;        /* guest TX, read by the host */
    struct uvb_ring *out;       /* guest RX, written by the host */
    struct uvb_host_irq *irq;
    const uint32_t *kick;
    void     *priv;             /* scratch, inbox, batch (uvb_nvsp_queue_init) */
    uint64_t  poke_mask;        /* queues whose inbox got frames: poke their workers */
    uint32_t  punt_fatal;       /* SLOWPATH because of a fatal protocol violation */
    uint32_t  reserved1;
    char      punt_msg[192];
    /* ---- statistics ---- */
    uint64_t  tx_msgs;          /* NVSP 107 data messages from the guest */
    uint64_t  tx_frames;
    uint64_t  tx_bytes;
    uint64_t  tx_failed;        /* completed with NVSP FAILURE (RNDIS-level errors) */
    uint64_t  tx_dropped;       /* oversize / backend errors */
    uint64_t  rx_frames;
    uint64_t  rx_bytes;
    uint64_t  rx_xfer;          /* XFER_PAGES packets sent */
    uint64_t  rx_acks;
    uint64_t  rx_nobuf;         /* frames dropped: no free sub-allocation */
    uint64_t  rx_filtered;      /* frames dropped: filter 0, link down, not ready */
    uint64_t  rx_oversize;
    uint64_t  rx_ring_full;     /* flushes refused because the guest RX ring was full */
    uint64_t  inbox_drops;
    uint64_t  gen_frames;
    uint64_t  sink_frames;
    uint64_t  tx_lso;           /* large sends (LSOv2 PPI) segmented */
    uint64_t  tx_lso_segments;  /* segments they became */
    uint64_t  tx_lso_invalid;   /* large sends refused (bad offsets / MSS): completed FAILURE */
    uint64_t  tx_lso_not_enabled; /* LSO PPI while the guest had not enabled LSO (counted, segmented) */
    uint64_t  tx_lso_oversize;  /* larger than lso_max (counted, segmented: not strictly enforced) */
    uint64_t  completions;
    uint64_t  punts;
    uint64_t  polls;
    uint64_t  rsc_units;        /* coalesced frames sent (two segments or more) */
    uint64_t  rsc_segments;     /* segments that went into them */
    uint64_t  rsc_fragments;    /* receive ranges (fragments) they took */
    uint64_t  rx_to_vf;         /* frames the host gave the VF (data path switched), not the queue */
};

/* ---- NIC ---------------------------------------------------------------- */
/* Connect the receive buffer: sub-allocation size 256 + mtu + 36 (mtu incl. header),
 * count = size / sub_size.  Sets sub_size/sub_count, resets pools.  0 or UVB_EINVAL. */
int uvb_nvsp_set_recv_buf(struct uvb_nvsp *n, uint8_t *buf, uint64_t size, uint32_t mtu);
/* Active queue count: redistributes the non-control sub-allocations (§7). */
int uvb_nvsp_set_queues(struct uvb_nvsp *n, uint32_t count);
/* Free sub-allocations a given queue could use now (for tests/stats). */
uint32_t uvb_nvsp_free_ids(struct uvb_nvsp *n, uint32_t queue);
/* Receive sub-allocations currently owned by the guest (sent, not acked). */
uint32_t uvb_nvsp_guest_owned(struct uvb_nvsp *n);
void uvb_nvsp_fini(struct uvb_nvsp *n);
/* Toeplitz hash of `len` input bytes with a 40-byte key. */
uint32_t uvb_nvsp_toeplitz(const uint8_t *key, const uint8_t *data, uint32_t len);
/* RSS hash of an Ethernet frame under hash_info (0 when no hash type applies);
 * *type receives the NDIS hash type bit used. */
uint32_t uvb_nvsp_frame_hash(const struct uvb_nvsp *n, const uint8_t *frame, uint32_t len,
                             uint32_t *type);
/* The queue RSS picks for a frame (0 when RSS is off). */
uint32_t uvb_nvsp_frame_queue(const struct uvb_nvsp *n, const uint8_t *frame, uint32_t len);

/* ---- control messages (channel 0) -------------------------------------- */
/* Queue an RNDIS control message (response / indication) for the guest.  It is written
 * to a free control sub-allocation and sent by queue 0's pump as XFER_PAGES (channel_type 1,
 * transaction id = sub-allocation index).  Returns 0, or UVB_EAGAIN when 100 KiB of control
 * messages are already waiting (the request must then be failed). */
int uvb_nvsp_post_ctrl(struct uvb_nvsp *n, const uint8_t *msg, uint32_t len);
/* Queue an in-band NVSP message for queue 0 (send table, ...). */
int uvb_nvsp_post_inband(struct uvb_nvsp *n, const uint8_t *msg, uint32_t len,
                         uint64_t trans_id, uint16_t flags);
/* Control messages still waiting for a free control sub-allocation / ring space. */
uint32_t uvb_nvsp_ctrl_pending(struct uvb_nvsp *n);

/* ---- queues -------------------------------------------------------------- */
int uvb_nvsp_queue_init(struct uvb_nvsp_queue *q, struct uvb_nvsp *n, uint32_t index,
                        struct uvb_ring *in, struct uvb_ring *out, struct uvb_host_irq *irq,
                        const uint32_t *kick);
void uvb_nvsp_queue_fini(struct uvb_nvsp_queue *q);
/* Back to the state right after uvb_nvsp_queue_init (same NIC, rings re-attached by the
 * caller): inbox and pending batch empty, statistics zero; the buffers are kept.  (The
 * fuzz harness uses it: an init per input costs megabytes of fresh memory.) */
int uvb_nvsp_queue_reset(struct uvb_nvsp_queue *q);
/* Register / unregister a queue so other queues can reach its inbox. */
void uvb_nvsp_attach_queue(struct uvb_nvsp *n, struct uvb_nvsp_queue *q);
void uvb_nvsp_detach_queue(struct uvb_nvsp *n, struct uvb_nvsp_queue *q);
/* The channel pump (host.h contract). */
int uvb_nvsp_pump(struct uvb_nvsp_queue *q, uint64_t spin_ns);
/* Handle one packet already read from the TX ring (the Python path while simulator packet
 * faults are active).  `pkt` is the buffer uvb_in_read filled, `info` its entry.  Returns 0
 * handled, 0x100 | status when a completion {108, status} is owed (the caller sends it),
 * UVB_HOST_SLOWPATH (not a data-path packet: punt_msg says why), or < 0. */
int uvb_nvsp_process(struct uvb_nvsp_queue *q, const uint8_t *pkt, const struct uvb_pkt *info);
/* Move inbox frames, pending control messages and generator frames into the RX ring,
 * flush and commit (interrupting the guest when due).  Returns frames delivered or < 0. */
int uvb_nvsp_service(struct uvb_nvsp_queue *q);

/* ---- large send offload --------------------------------------------------- */
/* Segment one large send like the host's NIC (netvsc.md §4.4, docs/simulator.md "LSO"):
 * frame f (len bytes) with LSOv2 PPI value `ppi`; the segments are written back to back
 * into out (cap bytes), their lengths into seg_len (room for max_segs).  Returns the segment
 * count, UVB_EINVAL for a large send the host refuses (offsets, MSS, headers), UVB_ENOBUFS
 * when out / seg_len are too small. */
int uvb_nvsp_lso_segment(const uint8_t *f, uint32_t len, uint32_t ppi, uint8_t *out, uint32_t cap,
                         uint32_t *seg_len, uint32_t max_segs);

/* ---- backends ------------------------------------------------------------ */
/* Deliver a frame from outside (TAP reader, tests): RSS picks the queue, the frame goes to
 * its inbox.  Returns the queue index, or < 0 when dropped.  Poke that queue's worker. */
int uvb_nvsp_inject(struct uvb_nvsp *n, const uint8_t *frame, uint32_t len, uint32_t flags,
                    uint32_t vlan_tci);
/* Read up to `max` frames from a non-blocking fd (TAP, IFF_NO_PI) and inject them.
 * Returns frames read (>= 0) and ORs the touched queues into *mask; < 0 = -errno. */
int uvb_nvsp_fd_rx(struct uvb_nvsp *n, int fd, uint32_t max, uint64_t *mask);
