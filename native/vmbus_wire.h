/*
 * VMBus wire layouts: ring control page, channel packet descriptors, monitor page.
 *
 * This file is the single definition of these layouts.  It is read twice:
 *   - by the C compiler, inside `#pragma pack(push, 1)` (see uvmbus.h);
 *   - by cffi's cdef(packed=True) in native/build.py, so Python code uses the
 *     very same structs through `ffi` (sizeof/offsetof/new).
 * Keep it to what cdef can parse: integer #defines and plain struct
 * declarations (no other preprocessor lines, no attributes, no expressions).
 *
 * Sources: uio_vmbus.md §2.1 (ring header), §3.1-3.4 (descriptors),
 * §1.7 (monitor page).  All fields little-endian.
 */

/* ---- packet types (vmbus_packet_type) ---------------------------------- */
#define VMBUS_PKT_INBAND         6
#define VMBUS_PKT_XFER_PAGES     7
#define VMBUS_PKT_GPA_DIRECT     9
#define VMBUS_PKT_COMP           11

/* descriptor flags: bit 0 is the only defined flag */
#define VMBUS_PKT_FLAG_COMPLETION_REQUESTED 1

/* ring feature bits */
#define VMBUS_RING_FEAT_PENDING_SEND_SZ 1

/* Hyper-V page size: PFNs in GPA ranges are always in 4 KiB units */
#define HV_HYP_PAGE_SIZE   4096
#define HV_HYP_PAGE_SHIFT  12

/* max monitor id + 1 (4 trigger groups x 32) */
#define HV_MONITOR_IDS     128

/* the int page: first half host->guest bits, second half guest->host bits */
#define HV_INT_PAGE_SEND_OFFSET 2048

/* ---- ring control page (first bytes of the header page) --------------- */
struct vmbus_ring_ctl {
    uint32_t write_index;      /* producer: byte offset of the next write */
    uint32_t read_index;       /* consumer: byte offset of the next read */
    uint32_t interrupt_mask;   /* consumer: 1 = "do not interrupt me" */
    uint32_t pending_send_sz;  /* producer: "signal me when this many bytes are free" */
    uint32_t reserved1[12];
    uint32_t feature_bits;     /* bit 0: pending_send_sz supported */
};

/* ---- channel packet descriptor (16 bytes) ------------------------------ */
struct vmpacket_descriptor {
    uint16_t type;
    uint16_t offset8;          /* header length / 8: payload starts at offset8*8 */
    uint16_t len8;             /* total length / 8, trailer excluded */
    uint16_t flags;
    uint64_t trans_id;
};

/* ---- transfer-page packet (type 7) -------------------------------------- */
struct vmtransfer_page_range {
    uint32_t byte_count;
    uint32_t byte_offset;
};

struct vmtransfer_page_header {
    struct vmpacket_descriptor d;
    uint16_t xfer_pageset_id;
    uint8_t  sender_owns_set;
    uint8_t  reserved;
    uint32_t range_cnt;
    /* struct vmtransfer_page_range ranges[range_cnt] follow */
};

/* ---- GPA-direct packet (type 9) ----------------------------------------- */
struct vmgpa_range {
    uint32_t byte_count;
    uint32_t byte_offset;      /* offset into the first page, < 4096 */
    /* uint64_t pfn[ceil((byte_offset + byte_count) / 4096)] follow */
};

struct vmgpa_direct_header {
    struct vmpacket_descriptor d;
    uint32_t reserved;
    uint32_t range_cnt;
    /* ranges follow */
};

/* ---- monitor page (4096 bytes, map 2) ----------------------------------- */
struct hv_monitor_trigger_group {
    uint32_t pending;
    uint32_t armed;
};

struct hv_monitor_parameter {
    uint32_t connection_id;
    uint16_t flag_number;
    uint16_t rsvd;
};

struct hv_monitor_page {
    uint32_t trigger_state;
    uint32_t reserved1;
    struct hv_monitor_trigger_group trigger_group[4];
    uint8_t  reserved2[24];
    int32_t  next_checktime[4][32];
    uint16_t latency[4][32];               /* 100 ns units */
    uint8_t  reserved3[256];
    struct hv_monitor_parameter parameter[4][32];
    uint8_t  reserved4[1984];
};
