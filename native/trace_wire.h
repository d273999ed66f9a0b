/*
 * Trace record layout (uvmbus pcapng traces, see docs/trace.md).
 *
 * Every pcapng Enhanced Packet Block of a uvmbus trace carries, as its packet
 * data, one `struct uvb_trace_hdr` followed by
 *   - kind PACKET: the VMBus packet exactly as it lay in the ring (descriptor,
 *     extended header with transfer-page or GPA ranges, payload, padding;
 *     `pkt_cap` of its `pkt_len` bytes), then `att_len` bytes of attachment
 *     chunks: the memory the packet points at (transfer-page ranges in the
 *     receive buffer, the send-buffer section of an NVSP RNDIS packet), each
 *     chunk a `struct uvb_trace_chunk` and `cap` bytes;
 *   - kind EVENT: one `struct uvb_trace_event` and `text_len` bytes of text.
 * The link type is LINKTYPE_USER0 (147); the interface (one per channel) is
 * described by its IDB name "<class>/<relid>" and description.
 * Read by the C compiler and by cffi (packed): integer #defines and plain
 * structs only.  All fields little-endian.
 */

#define UVB_TRACE_LINKTYPE        147    /* LINKTYPE_USER0 */
#define UVB_TRACE_VERSION         1

#define UVB_TRACE_KIND_PACKET     1
#define UVB_TRACE_KIND_EVENT      2

#define UVB_TRACE_DIR_G2H         0      /* guest -> host: the guest's outgoing ring */
#define UVB_TRACE_DIR_H2G         1      /* host -> guest */

#define UVB_TRACE_SIDE_GUEST      0      /* recorded by the guest driver */
#define UVB_TRACE_SIDE_HOST       1      /* recorded by the (simulated) host */

#define UVB_TRACE_CLASS_OTHER     0
#define UVB_TRACE_CLASS_NET       1
#define UVB_TRACE_CLASS_SCSI      2
#define UVB_TRACE_CLASS_IC        3

#define UVB_TRACE_F_PKT_TRUNC     1      /* pkt_cap < pkt_len */
#define UVB_TRACE_F_ATT_TRUNC     2      /* a chunk holds fewer bytes than it points at */
#define UVB_TRACE_F_NO_PAYLOAD    4      /* recorded with --no-payload */
#define UVB_TRACE_F_ATT_LOST      8      /* a reference pointed outside the known buffers */

#define UVB_TRACE_CHUNK_XFER      1      /* one transfer-page range (receive buffer) */
#define UVB_TRACE_CHUNK_SECTION   2      /* a send-buffer section (NVSP RNDIS packet) */

/* events (host side mostly) */
#define UVB_TRACE_EV_SIGNAL       1      /* the guest signalled the host (arg0: 1 = needless) */
#define UVB_TRACE_EV_INTERRUPT    2      /* the host interrupted the guest (arg0: 1 delivered, 0 dropped by a fault, 2 crashed the guest kernel) */
#define UVB_TRACE_EV_IRQCONTROL   3      /* a write to the uio irqcontrol file (arg0: value) */
#define UVB_TRACE_EV_MASK         4      /* a ring interrupt_mask change (arg0: new value) */
#define UVB_TRACE_EV_FAULT        5      /* a fault injected or detected (text says which) */
#define UVB_TRACE_EV_OPEN         6      /* channel opened */
#define UVB_TRACE_EV_CLOSE        7      /* channel closed */
#define UVB_TRACE_EV_NOTE         8      /* free text */
#define UVB_TRACE_EV_DATA         9      /* data a read put in the guest's buffer (storvsc): arg0 bytes transferred, arg1 the request's transaction id; its first bytes (up to the snap length) are the text */

struct uvb_trace_hdr {
    uint8_t  version;
    uint8_t  kind;
    uint8_t  dir;
    uint8_t  side;
    uint8_t  devclass;
    uint8_t  flags;
    uint16_t subchan;        /* sub-channel index (0 = primary) */
    uint32_t relid;
    uint32_t pkt_len;        /* ring packet bytes (len8 * 8), or event bytes */
    uint32_t pkt_cap;        /* of them recorded here */
    uint32_t att_len;        /* attachment bytes after the packet (chunks) */
    uint32_t att_orig;       /* bytes the packet referenced in all */
    uint32_t reserved;
};

struct uvb_trace_chunk {
    uint16_t source;         /* UVB_TRACE_CHUNK_* */
    uint16_t index;          /* range number in the packet */
    uint32_t offset;         /* byte offset in the buffer */
    uint32_t len;            /* bytes referenced */
    uint32_t cap;            /* bytes that follow (<= len) */
};

struct uvb_trace_event {
    uint32_t code;           /* UVB_TRACE_EV_* */
    uint32_t arg0;
    uint64_t arg1;
    uint32_t text_len;
    uint32_t reserved;
};
