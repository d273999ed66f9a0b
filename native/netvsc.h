/*
 * netvsc guest data path (read by the C compiler and by cffi's cdef).
 *
 * One `struct uvb_nvsc_queue` is one NIC queue = one VMBus channel (primary = queue 0,
 * sub-channel k = queue k), owned by ONE thread.  The Python driver (uvmbus/netvsc) does
 * the bring-up, then hands each channel's rings to a queue; from then on every packet of
 * that channel goes through these functions:
 *
 *   rx:   uvb_nvsc_rx_burst walks XFER_PAGES packets (RNDIS PACKETs in receive-buffer
 *         sub-allocations), validates every range and header (netvsc.md §6), parses the PPIs
 *         (VLAN, checksum, RSS hash) and returns a batch of frames — zero-copy (offsets into
 *         the receive buffer, acked when the batch is released) or copied into the caller's
 *         buffer (acked at once).  Acks are batched: one ring commit per burst.
 *   tx:   uvb_nvsc_tx_burst packs RNDIS PACKETs into send-buffer sections (up to the host's
 *         max_pkt_per_msg, aligned to its pkt_alignment), one NVSP SEND_RNDIS_PKT per section
 *         with COMPLETION_REQUESTED; frames too large for a section go GPA-direct through
 *         optional bounce slots in DMA memory.  It stops (returning fewer) when sections,
 *         slots or ring space run out.
 *   ctrl: RNDIS control messages (responses, indications), in-band NVSP messages and
 *         completions that are not data completions become records for Python
 *         (uvb_nvsc_ctrl_next); Python sends control messages with uvb_nvsc_send_ctrl /
 *         uvb_nvsc_send_inband.
 *
 * Transaction ids of the sends this code makes: TID_DATA | section, TID_CTRL | section,
 * TID_GPA | slot.  Completions carrying other ids go to Python.
 */

#define UVB_NVSC_TID_DATA   0x4000000000000000
#define UVB_NVSC_TID_CTRL   0x2000000000000000
#define UVB_NVSC_TID_GPA    0x1000000000000000
#define UVB_NVSC_TID_KIND   0x7000000000000000
#define UVB_NVSC_TID_INDEX  0x00000000FFFFFFFF

/* frame flags */
#define UVB_NVSC_F_VLAN     0x0001      /* vlan holds the 802.1Q TCI (RX: from the PPI; TX: insert) */
#define UVB_NVSC_F_HASH     0x0002      /* RX: hash holds the RSS hash value */
#define UVB_NVSC_F_CSUM     0x0004      /* RX: csum holds the host's checksum PPI (info) */
#define UVB_NVSC_F_TX_CSUM  0x0008      /* TX: csum holds a checksum-offload request PPI */
#define UVB_NVSC_F_TX_LSO   0x0010      /* TX: a TCP large send; mss holds the MSS (LSOv2 PPI) */
/* RX: joined from RSC fragments (several ranges of one XFER_PAGES packet); in a zero-copy
 * burst its offset indexes the queue's rsc_buf, not the receive buffer */
#define UVB_NVSC_F_RSC      0x0020

/* why tx stopped at a frame (tx_bad_why, with tx_reject) */
#define UVB_NVSC_BAD_SIZE       1       /* shorter than 14, longer than max_frame, no GPA memory */
#define UVB_NVSC_BAD_LSO_OFF    2       /* large send, but LSO is not enabled for its IP version */
#define UVB_NVSC_BAD_LSO_HDR    3       /* large send that is not Ethernet + IPv4/IPv6 + TCP */
#define UVB_NVSC_BAD_LSO_MSS    4       /* MSS 0, above 2^20 - 1, or headers + MSS > max_frame */
#define UVB_NVSC_BAD_LSO_SIZE   5       /* larger than the host's maximum large-send size */
#define UVB_NVSC_BAD_LSO_SEGS   6       /* fewer segments than the host's minimum */

/* control record kinds */
#define UVB_NVSC_CTRL_RNDIS     1       /* an RNDIS message that is not a PACKET */
#define UVB_NVSC_CTRL_INBAND    2       /* an in-band NVSP message from the host */
#define UVB_NVSC_CTRL_COMP      3       /* a completion whose transaction id is not ours */
#define UVB_NVSC_CTRL_SENDFAIL  4       /* a control send completed with a failure status */

#define UVB_NVSC_MAX_FRAME  65535
#define UVB_NVSC_MAX_RSC_FRAME 65549   /* a coalesced segment: 14 + one IP datagram (65535) */
#define UVB_NVSC_RSC_BUF    1048576     /* zero-copy reassembly area per queue (1 MiB) */

struct uvb_nvsc_frame {
    uint64_t offset;            /* RX: into the receive buffer (zero-copy) or the copy buffer;
                                   TX: into the caller's buffer */
    uint32_t len;
    union {
        uint32_t hash;          /* RX: RSS hash (F_HASH) */
        uint32_t mss;           /* TX: maximum segment size of a large send (F_TX_LSO) */
    };
    uint32_t csum;
    uint16_t vlan;
    uint16_t flags;
};

struct uvb_nvsc_ctrl {
    uint32_t kind;              /* UVB_NVSC_CTRL_* */
    uint32_t len;               /* bytes copied to the caller's buffer */
    uint64_t trans_id;
    uint32_t status;            /* SENDFAIL: NVSP status */
    uint32_t reserved;
};

struct uvb_nvsc_queue {
    /* ---- set up by Python before uvb_nvsc_queue_init ---- */
    struct uvb_ring *tx;
    struct uvb_ring *rx;
    struct uvb_signal *sig;
    uint8_t  *recv_buf;
    uint64_t  recv_size;
    uint8_t  *send_buf;
    uint64_t  send_size;
    uint32_t  section_size;
    uint32_t  section_first;    /* this queue's sections: [first, first + count) */
    uint32_t  section_count;
    uint32_t  max_pkt_per_msg;  /* from RNDIS INIT_CMPLT (1 before) */
    uint32_t  pkt_align;        /* 1 << pkt_alignment_factor (>= 4 enforced) */
    uint32_t  max_xfer;         /* aggregation byte limit (INIT_CMPLT max_xfer_size) */
    uint32_t  recv_buf_id;
    uint32_t  queue_id;
    uint32_t  max_frame;        /* largest frame we send (mtu + 14) */
    uint32_t  ack_size;         /* bytes of an RX ack (8 = {108, status}) */
    /* LSOv2 as negotiated (OID_TCP_OFFLOAD_PARAMETERS): largest large send per IP version
     * (0 = LSO off for that version) and the host's minimum segment count */
    uint32_t  lso4_max;
    uint32_t  lso6_max;
    uint32_t  lso_min_segs;
    /* optional GPA-direct bounce slots (DMA memory); slots == 0: none */
    uint8_t  *gpa_base;
    const uint64_t *gpa_pfns;   /* PFN of each 4 KiB page of gpa_base */
    uint32_t  gpa_slot_size;    /* multiple of 4096 */
    uint32_t  gpa_slots;
    /* ---- private ---- */
    void     *priv;
    uint32_t  strict;           /* reserved for Python */
    uint32_t  tx_reject;        /* 1: tx stops at a frame that can never be sent (too short, too
                                 * large) and reports it in tx_bad_*; 0: drop it, count tx_drops */
    char      errmsg[192];      /* last host error */
    /* ---- RSC reassembly (set by C) ---- */
    uint8_t  *rsc_buf;          /* zero-copy bursts: coalesced frames are copied here (allocated
                                 * at the first one, UVB_NVSC_RSC_BUF bytes, kept until fini) */
    uint64_t  rsc_size;
    uint32_t  rsc_in_burst;     /* coalesced frames in the last rx_burst */
    uint32_t  rsc_reserved;
    /* ---- statistics ---- */
    uint64_t  rx_packets;
    uint64_t  rx_bytes;
    uint64_t  rx_xfer;          /* XFER_PAGES packets consumed */
    uint64_t  rx_acks;          /* acks written */
    uint64_t  rx_drops;         /* frames dropped: invalid, or discarded while waiting */
    uint64_t  rx_ctrl;          /* control records produced */
    uint64_t  tx_packets;
    uint64_t  tx_bytes;
    uint64_t  tx_msgs;          /* NVSP SEND_RNDIS_PKT messages */
    uint64_t  tx_gpa;           /* frames sent GPA-direct */
    uint64_t  tx_lso;           /* large sends (frames with an LSOv2 PPI) */
    uint64_t  tx_completions;
    uint64_t  tx_failed;        /* frames in sends the host completed with a failure */
    uint64_t  tx_drops;         /* frames refused: too short/too large */
    uint64_t  tx_ring_full;     /* bursts cut short: no ring space */
    uint64_t  tx_no_section;    /* bursts cut short: no free section / slot */
    uint64_t  host_errors;      /* malformed host packets (see errmsg) */
    uint64_t  ctrl_dropped;     /* control records lost (record queue full) */
    uint64_t  rx_rsc_frames;    /* frames reassembled from more than one RSC fragment */
    uint64_t  rx_rsc_frags;     /* fragments that went into them */
    uint64_t  rx_rsc_errors;    /* broken fragment chains (dropped; also in rx_drops) */
    /* ---- tx_reject: the frame the last tx call stopped at (tx_bad_hit = 1) ---- */
    uint32_t  tx_bad_hit;       /* set by C, cleared by the caller */
    uint32_t  tx_bad_len;       /* its length in bytes */
    uint32_t  tx_bad_why;       /* UVB_NVSC_BAD_* */
};

int uvb_nvsc_queue_init(struct uvb_nvsc_queue *q);
void uvb_nvsc_queue_fini(struct uvb_nvsc_queue *q);
/* Back to the state right after uvb_nvsc_queue_init (same configuration and rings, which
 * the caller re-attaches): nothing queued or in flight, statistics zero.  For reuse of a
 * queue's memory over a new channel session (and by the fuzz harnesses). 0 or UVB_EINVAL. */
int uvb_nvsc_queue_reset(struct uvb_nvsc_queue *q);

/* Receive up to `max` frames.  copy_buf == NULL: zero-copy, frame offsets index the receive
 * buffer (a frame joined from RSC fragments, flag F_RSC: the queue's rsc_buf, where it was
 * copied) and stay valid until the next rx_burst or uvb_nvsc_rx_release; otherwise frames are
 * copied to copy_buf (offsets into it, 8-aligned) and their packets acked now.  Returns the
 * frame count or < 0 (ring corrupt). */
int uvb_nvsc_rx_burst(struct uvb_nvsc_queue *q, struct uvb_nvsc_frame *frames, uint32_t max,
                      uint8_t *copy_buf, uint64_t copy_cap);
/* Ack the packets of the last zero-copy burst. Returns 0 or < 0. */
int uvb_nvsc_rx_release(struct uvb_nvsc_queue *q);
/* Bytes / packets received but not yet returned by rx_burst (0 = would block). */
int uvb_nvsc_rx_pending(struct uvb_nvsc_queue *q);

/* Send frames[i] = (offset into base, len, flags/csum/vlan).  Returns how many were taken
 * (frames refused as too short/large count as taken and in tx_drops), or < 0. */
int uvb_nvsc_tx_burst(struct uvb_nvsc_queue *q, const uint8_t *base,
                      const struct uvb_nvsc_frame *frames, uint32_t n);
/* Same, frames given as (pointer, length) pairs, no offloads. */
int uvb_nvsc_tx_ptrs(struct uvb_nvsc_queue *q, const uint8_t *const *ptrs, const uint32_t *lens,
                     uint32_t n);
/* Forward: send the frames of the last zero-copy rx burst (offsets into the receive buffer). */
int uvb_nvsc_tx_fwd(struct uvb_nvsc_queue *q, const struct uvb_nvsc_frame *frames, uint32_t n);
/* Frames read from a TAP with IFF_VNET_HDR: each descriptor covers a 10-byte virtio_net_hdr
 * followed by the frame.  Rewrites the descriptors in place for uvb_nvsc_tx_burst: the
 * header is skipped; a GSO TCPv4/TCPv6 frame of at least lso_min_segs segments becomes a
 * large send (F_TX_LSO, mss = gso_size); a partial checksum (NEEDS_CSUM, also on GSO frames
 * too small to be a large send) is completed in software.  Returns how many frames became
 * large sends; a descriptor shorter than the header gets len 0 (refused by tx_burst). */
int uvb_nvsc_vnet_prep(const struct uvb_nvsc_queue *q, uint8_t *base, struct uvb_nvsc_frame *frames,
                       uint32_t n);
/* Read the RX ring for completions (frees sections/slots); data packets are kept for rx. */
int uvb_nvsc_reap(struct uvb_nvsc_queue *q);
/* Sends not completed yet (sections + slots in flight). */
uint32_t uvb_nvsc_tx_inflight(struct uvb_nvsc_queue *q);

/* ---- control plane -------------------------------------------------------- */
/* Read the ring, extract control messages and completions (data packets stay queued;
 * if the queue of received packets is full they are dropped, so control can progress). */
int uvb_nvsc_poll_ctrl(struct uvb_nvsc_queue *q);
/* Next control record: returns its length (copied to buf, truncated to buflen), 0 when
 * none, < 0 on error. */
int uvb_nvsc_ctrl_next(struct uvb_nvsc_queue *q, struct uvb_nvsc_ctrl *rec, uint8_t *buf,
                       uint32_t buflen);
/* Send an RNDIS control message through a send-buffer section (channel_type 1).
 * Returns 0, UVB_EAGAIN (no section / ring space) or < 0. */
int uvb_nvsc_send_ctrl(struct uvb_nvsc_queue *q, const uint8_t *msg, uint32_t len);
/* Send an in-band NVSP message (commit + signal).  0, UVB_EAGAIN or < 0. */
int uvb_nvsc_send_inband(struct uvb_nvsc_queue *q, const uint8_t *msg, uint32_t len,
                         uint64_t trans_id, uint16_t flags);
/* Flush pending acks (commit + signal).  0 or < 0. */
int uvb_nvsc_flush(struct uvb_nvsc_queue *q);
