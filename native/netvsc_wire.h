/*
 * Synthetic NIC wire layouts: NVSP (network VSP protocol), RNDIS, per-packet
 * info (PPI) and the NDIS objects carried in OID requests.
 *
 * Read twice, like vmbus_wire.h: by the C compiler inside
 * `#pragma pack(push, 1)` (native/uvmbus.h) and by cffi's cdef(packed=True).
 * Keep it to integer #defines and plain structs.  Every padding byte is an
 * explicit field, so the packed layout equals the documented one.
 *
 * Source: ../shared/reference/netvsc.md (§2 NVSP, §4 RNDIS/NDIS, §6 RX,
 * §9 sizes).  Every NVSP struct starts with its u32 msg_type, so field
 * offsets equal the "@N" offsets of the reference tables.  Sizes and offsets
 * are pinned by _Static_asserts in native/netvsc_wire.c.  Little-endian.
 */

/* ---- NVSP versions (§2.1) -------------------------------------------- */
#define NVSP_PROTOCOL_VERSION_1     0x00000002
#define NVSP_PROTOCOL_VERSION_2     0x00030002
#define NVSP_PROTOCOL_VERSION_4     0x00040000
#define NVSP_PROTOCOL_VERSION_5     0x00050000
#define NVSP_PROTOCOL_VERSION_6     0x00060000
#define NVSP_PROTOCOL_VERSION_61    0x00060001
#define NVSP_INVALID_PROTOCOL_VERSION 0xFFFFFFFF

/* ---- NVSP message types (§2.2) --------------------------------------- */
#define NVSP_MSG_TYPE_NONE                  0
#define NVSP_MSG_TYPE_INIT                  1
#define NVSP_MSG_TYPE_INIT_COMPLETE         2
#define NVSP_MSG1_TYPE_SEND_NDIS_VER        100
#define NVSP_MSG1_TYPE_SEND_RECV_BUF        101
#define NVSP_MSG1_TYPE_SEND_RECV_BUF_COMPLETE 102
#define NVSP_MSG1_TYPE_REVOKE_RECV_BUF      103
#define NVSP_MSG1_TYPE_SEND_SEND_BUF        104
#define NVSP_MSG1_TYPE_SEND_SEND_BUF_COMPLETE 105
#define NVSP_MSG1_TYPE_REVOKE_SEND_BUF      106
#define NVSP_MSG1_TYPE_SEND_RNDIS_PKT       107
#define NVSP_MSG1_TYPE_SEND_RNDIS_PKT_COMPLETE 108
#define NVSP_MSG2_TYPE_SEND_NDIS_CONFIG     125
#define NVSP_MSG4_TYPE_SEND_VF_ASSOCIATION  128
#define NVSP_MSG4_TYPE_SWITCH_DATA_PATH     129
#define NVSP_MSG5_TYPE_OID_QUERY_EX         131
#define NVSP_MSG5_TYPE_OID_QUERY_EX_COMP    132
#define NVSP_MSG5_TYPE_SUBCHANNEL           133
#define NVSP_MSG5_TYPE_SEND_INDIRECTION_TABLE 134

/* ---- NVSP status (§2.2) ---------------------------------------------- */
#define NVSP_STAT_NONE                0
#define NVSP_STAT_SUCCESS             1
#define NVSP_STAT_FAIL                2
#define NVSP_STAT_PROTOCOL_TOO_NEW    3
#define NVSP_STAT_PROTOCOL_TOO_OLD    4
#define NVSP_STAT_INVALID_RNDIS_PKT   5
#define NVSP_STAT_BUSY                6
#define NVSP_STAT_PROTOCOL_UNSUPPORTED 7

/* ---- NVSP sizes and constants (§2.3, §6, §9) ------------------------- */
#define NVSP_MSG_SIZE_V1              28    /* legacy union size + header */
#define NVSP_MSG_SIZE_V61             40    /* v6.1: what guests always send */
#define NVSP_HOST_MSG_SIZE_V1         32    /* host pads legacy messages to 8 */
#define NVSP_RECV_BUF_ID              0xCAFE
#define NVSP_SEND_BUF_ID              0
#define NVSP_SECTION_INDEX_NONE       0xFFFFFFFF
#define NVSP_CHANNEL_TYPE_DATA        0     /* RMC_DATA */
#define NVSP_CHANNEL_TYPE_CONTROL     1     /* RMC_CONTROL */
#define NVSP_SUBCHANNEL_OP_ALLOCATE   1
#define NVSP_SEND_TABLE_ENTRIES       16
#define NVSP_MAX_PACKETS_PER_RECEIVE  375   /* NDIS >= 6.0 */
#define NVSP_MAX_PACKETS_PER_RECEIVE_NDIS5 64
#define NVSP_MAX_PACKETS_PER_RECEIVE_RSC 562
#define NVSP_RSC_MAX                  562   /* fragments of one coalesced frame (L-h) */
#define NVSP_DATA_PATH_SYNTHETIC      0
#define NVSP_DATA_PATH_VF             1

/* NDIS config capability bits (§2.4 type 125) */
#define NVSP_NDIS_CAP_VMQ             0x01
#define NVSP_NDIS_CAP_CHIMNEY         0x02
#define NVSP_NDIS_CAP_SRIOV           0x04
#define NVSP_NDIS_CAP_IEEE8021Q       0x08
#define NVSP_NDIS_CAP_CORRELATION_ID  0x10
#define NVSP_NDIS_CAP_TEAMING         0x20
#define NVSP_NDIS_CAP_VSUBNETID       0x40
#define NVSP_NDIS_CAP_RSC             0x80

/* ---- NVSP messages ----------------------------------------------------- */
struct nvsp_msg_header {
    uint32_t msg_type;
};

/* the full message as guests send it: always 40 bytes (§2.3) */
struct nvsp_message {
    uint32_t msg_type;
    uint8_t  body[36];
};

struct nvsp_init {                         /* 1 */
    uint32_t msg_type;
    uint32_t min_protocol_ver;
    uint32_t max_protocol_ver;
};

struct nvsp_init_complete {                /* 2 */
    uint32_t msg_type;
    uint32_t negotiated_protocol_ver;
    uint32_t max_mdl_chain_len;
    uint32_t status;
};

struct nvsp_send_ndis_ver {                /* 100 */
    uint32_t msg_type;
    uint32_t ndis_major_ver;
    uint32_t ndis_minor_ver;
};

struct nvsp_send_recv_buf {                /* 101 */
    uint32_t msg_type;
    uint32_t gpadl_handle;
    uint16_t id;
    uint16_t reserved;
};

struct nvsp_recv_buf_section {
    uint32_t offset;
    uint32_t sub_alloc_size;
    uint32_t num_sub_allocs;
    uint32_t end_offset;
};

struct nvsp_send_recv_buf_complete {       /* 102 */
    uint32_t msg_type;
    uint32_t status;
    uint32_t num_sections;
    struct nvsp_recv_buf_section section;
};

struct nvsp_revoke_buf {                   /* 103, 106 */
    uint32_t msg_type;
    uint16_t id;
    uint16_t reserved;
};

struct nvsp_send_send_buf {                /* 104 */
    uint32_t msg_type;
    uint32_t gpadl_handle;
    uint16_t id;
    uint16_t reserved;
};

struct nvsp_send_send_buf_complete {       /* 105 */
    uint32_t msg_type;
    uint32_t status;
    uint32_t section_size;
};

struct nvsp_send_rndis_pkt {               /* 107 */
    uint32_t msg_type;
    uint32_t channel_type;
    uint32_t send_buf_section_index;
    uint32_t send_buf_section_size;
};

struct nvsp_send_rndis_pkt_complete {      /* 108 */
    uint32_t msg_type;
    uint32_t status;
};

struct nvsp_send_ndis_config {             /* 125 */
    uint32_t msg_type;
    uint32_t mtu;
    uint32_t reserved;
    uint64_t capability;
};

struct nvsp_vf_association {               /* 128 */
    uint32_t msg_type;
    uint32_t allocated;
    uint32_t serial;
};

struct nvsp_switch_data_path {             /* 129 */
    uint32_t msg_type;
    uint32_t active_datapath;
};

struct nvsp_oid_query_ex {                 /* 131 */
    uint32_t msg_type;
    uint8_t  hdr_type;                     /* NDIS object header */
    uint8_t  hdr_revision;
    uint16_t hdr_size;
    uint32_t oid;
};

struct nvsp_oid_query_ex_complete {        /* 132 */
    uint32_t msg_type;
    uint32_t status;
    uint32_t bytes;
};

struct nvsp_subchannel_request {           /* 133 (request) */
    uint32_t msg_type;
    uint32_t op;
    uint32_t num_subchannels;
};

struct nvsp_subchannel_complete {          /* 133 (completion) */
    uint32_t msg_type;
    uint32_t status;
    uint32_t num_subchannels;
};

struct nvsp_send_indirection_table {       /* 134: u32 table[count] at `offset` */
    uint32_t msg_type;
    uint32_t count;
    uint32_t offset;
};

/* ---- RNDIS message types (§4.1) ------------------------------------------ */
#define RNDIS_MSG_PACKET              0x00000001
#define RNDIS_MSG_INIT                0x00000002
#define RNDIS_MSG_INIT_C              0x80000002
#define RNDIS_MSG_HALT                0x00000003
#define RNDIS_MSG_QUERY               0x00000004
#define RNDIS_MSG_QUERY_C             0x80000004
#define RNDIS_MSG_SET                 0x00000005
#define RNDIS_MSG_SET_C               0x80000005
#define RNDIS_MSG_RESET               0x00000006
#define RNDIS_MSG_RESET_C             0x80000006
#define RNDIS_MSG_INDICATE            0x00000007
#define RNDIS_MSG_KEEPALIVE           0x00000008
#define RNDIS_MSG_KEEPALIVE_C         0x80000008
#define RNDIS_MSG_SET_EX              0x00000009
#define RNDIS_MSG_SET_EX_C            0x80000009
#define RNDIS_MSG_COMPLETION          0x80000000

/* ---- RNDIS status (§4.2) -------------------------------------------------- */
#define RNDIS_STATUS_SUCCESS          0x00000000
#define RNDIS_STATUS_PENDING          0x00000103
#define RNDIS_STATUS_MEDIA_CONNECT    0x4001000B
#define RNDIS_STATUS_MEDIA_DISCONNECT 0x4001000C
#define RNDIS_STATUS_LINK_SPEED_CHANGE 0x40010013
#define RNDIS_STATUS_NETWORK_CHANGE   0x40010018
#define RNDIS_STATUS_TASK_OFFLOAD_CURRENT_CONFIG 0x40020006
#define RNDIS_STATUS_BUFFER_OVERFLOW  0x80000005
#define RNDIS_STATUS_FAILURE          0xC0000001
#define RNDIS_STATUS_RESOURCES        0xC000009A
#define RNDIS_STATUS_NOT_SUPPORTED    0xC00000BB
#define RNDIS_STATUS_BAD_VERSION      0xC0010004
#define RNDIS_STATUS_INVALID_PACKET   0xC001000F
#define RNDIS_STATUS_INVALID_LENGTH   0xC0010014
#define RNDIS_STATUS_INVALID_DATA     0xC0010015
#define RNDIS_STATUS_INVALID_OID      0xC0010017

/* ---- RNDIS constants ------------------------------------------------------- */
#define RNDIS_MAJOR_VERSION           1
#define RNDIS_MINOR_VERSION           0
#define RNDIS_GUEST_MAX_XFER_SIZE     0x4000
#define RNDIS_DF_CONNECTIONLESS       1
#define RNDIS_MEDIUM_802_3            0
#define RNDIS_HEADER_SIZE             8     /* msg_type + msg_len */
#define RNDIS_PACKET_SIZE             44
#define RNDIS_PPI_OFFSET_DEFAULT      36    /* relative to byte 8 */
#define RNDIS_PPI_HDR_SIZE            12
#define RNDIS_PPI_SIZE_U32            16    /* 12-byte header + u32 payload */

/* ---- per-packet info types (§4.4) ------------------------------------------- */
#define PPI_TCPIP_CHKSUM              0
#define PPI_IPSEC                     1
#define PPI_TCP_LARGESEND             2
#define PPI_CLASSIFICATION_HANDLE     3
#define PPI_IEEE_8021Q                6
#define PPI_HASH_VALUE                8
#define PPI_HASH_INFO                 9
#define PPI_SHORT_PKT_PADINFO         11
#define PPI_INTERNAL_FLAG             0x80000000
#define PPI_RNDIS_PKTINFO_ID          0x80000001
#define PPI_TYPE_MASK                 0x7FFFFFFF

/* checksum PPI, TX view (bits) */
#define CSUM_TX_IS_IPV4               0x00000001
#define CSUM_TX_IS_IPV6               0x00000002
#define CSUM_TX_TCP                   0x00000004
#define CSUM_TX_UDP                   0x00000008
#define CSUM_TX_IP_HDR                0x00000010
#define CSUM_TX_TCP_HDR_OFFSET_SHIFT  16
#define CSUM_TX_TCP_HDR_OFFSET_MASK   0x03FF0000
/* checksum PPI, RX view (bits) */
#define CSUM_RX_TCP_FAILED            0x00000001
#define CSUM_RX_UDP_FAILED            0x00000002
#define CSUM_RX_IP_FAILED             0x00000004
#define CSUM_RX_TCP_OK                0x00000008
#define CSUM_RX_UDP_OK                0x00000010
#define CSUM_RX_IP_OK                 0x00000020
#define CSUM_RX_LOOPBACK              0x00000040
#define CSUM_RX_TCP_VALUE_INVALID     0x00000080
#define CSUM_RX_IP_VALUE_INVALID      0x00000100

/* LSOv2 PPI (type 2), TX view (L-h struct ndis_tcp_lso_info .lso_v2_transmit; D hn_rndis.h
 * NDIS_LSO2_INFO_MAKE*): bits 0-19 MSS, 20-29 TCP header offset from the frame start, bit 30
 * type (1 = LSOv2), bit 31 IP version (0 IPv4, 1 IPv6) */
#define LSO_V2_MSS_MASK               0x000FFFFF
#define LSO_V2_TCP_OFFSET_SHIFT       20
#define LSO_V2_TCP_OFFSET_MASK        0x3FF00000
#define LSO_V2_TYPE                   0x40000000
#define LSO_V2_IPV6                   0x80000000
#define LSO_V2_MAX_MSS                0x000FFFFF

/* VLAN PPI bits */
#define VLAN_PPI_PRIORITY_MASK        0x00000007
#define VLAN_PPI_CFI                  0x00000008
#define VLAN_PPI_VID_SHIFT            4
#define VLAN_PPI_VID_MASK             0x0000FFF0

/* ---- OIDs (§4.5) ------------------------------------------------------------ */
#define OID_GEN_SUPPORTED_LIST        0x00010101
#define OID_GEN_HARDWARE_STATUS       0x00010102
#define OID_GEN_MEDIA_SUPPORTED       0x00010103
#define OID_GEN_MEDIA_IN_USE          0x00010104
#define OID_GEN_MAXIMUM_LOOKAHEAD     0x00010105
#define OID_GEN_MAXIMUM_FRAME_SIZE    0x00010106
#define OID_GEN_LINK_SPEED            0x00010107
#define OID_GEN_TRANSMIT_BUFFER_SPACE 0x00010108
#define OID_GEN_RECEIVE_BUFFER_SPACE  0x00010109
#define OID_GEN_TRANSMIT_BLOCK_SIZE   0x0001010A
#define OID_GEN_RECEIVE_BLOCK_SIZE    0x0001010B
#define OID_GEN_VENDOR_ID             0x0001010C
#define OID_GEN_VENDOR_DESCRIPTION    0x0001010D
#define OID_GEN_CURRENT_PACKET_FILTER 0x0001010E
#define OID_GEN_CURRENT_LOOKAHEAD     0x0001010F
#define OID_GEN_DRIVER_VERSION        0x00010110
#define OID_GEN_MAXIMUM_TOTAL_SIZE    0x00010111
#define OID_GEN_MAC_OPTIONS           0x00010113
#define OID_GEN_MEDIA_CONNECT_STATUS  0x00010114
#define OID_GEN_MAXIMUM_SEND_PACKETS  0x00010115
#define OID_GEN_VENDOR_DRIVER_VERSION 0x00010116
#define OID_GEN_NETWORK_LAYER_ADDRESSES 0x00010118
#define OID_GEN_RECEIVE_SCALE_CAPABILITIES 0x00010203
#define OID_GEN_RECEIVE_SCALE_PARAMETERS 0x00010204
#define OID_GEN_MAX_LINK_SPEED        0x00010206
#define OID_GEN_LINK_STATE            0x00010207
#define OID_GEN_RNDIS_CONFIG_PARAMETER 0x0001021B
#define OID_GEN_FRIENDLY_NAME         0x00020216
#define OID_802_3_PERMANENT_ADDRESS   0x01010101
#define OID_802_3_CURRENT_ADDRESS     0x01010102
#define OID_802_3_MULTICAST_LIST      0x01010103
#define OID_802_3_MAXIMUM_LIST_SIZE   0x01010104
#define OID_GEN_PROTOCOL_OPTIONS      0x00010112
/* statistics OIDs (values: O rndisprot.rs; answers: docs/netvsc.md "Filters, MAC, statistics") */
#define OID_GEN_XMIT_OK               0x00020101
#define OID_GEN_RCV_OK                0x00020102
#define OID_GEN_XMIT_ERROR            0x00020103
#define OID_GEN_RCV_ERROR             0x00020104
#define OID_GEN_RCV_NO_BUFFER         0x00020105
#define OID_GEN_BYTES_RCV             0x00020219
#define OID_GEN_BYTES_XMIT            0x0002021A
#define OID_GEN_RCV_DISCARDS          0x0002021B
#define OID_GEN_XMIT_DISCARDS         0x0002021C
#define OID_GEN_LINK_PARAMETERS       0x00010208
#define OID_802_3_RCV_ERROR_ALIGNMENT 0x01020101
#define OID_802_3_XMIT_ONE_COLLISION  0x01020102
#define OID_802_3_XMIT_MORE_COLLISIONS 0x01020103
#define OID_OFFLOAD_ENCAPSULATION     0x0101010A
#define OID_TCP_OFFLOAD_CURRENT_CONFIG 0xFC01020B
#define OID_TCP_OFFLOAD_PARAMETERS    0xFC01020C
#define OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES 0xFC01020D

/* packet filter bits */
#define NDIS_PACKET_TYPE_DIRECTED     0x00000001
#define NDIS_PACKET_TYPE_MULTICAST    0x00000002
#define NDIS_PACKET_TYPE_ALL_MULTICAST 0x00000004
#define NDIS_PACKET_TYPE_BROADCAST    0x00000008
#define NDIS_PACKET_TYPE_PROMISCUOUS  0x00000020

/* media connect status values */
#define NDIS_MEDIA_STATE_CONNECTED    0
#define NDIS_MEDIA_STATE_DISCONNECTED 1

/* ---- NDIS objects (§4.6–4.8) ------------------------------------------------- */
#define NDIS_OBJTYPE_DEFAULT          0x80
#define NDIS_OBJTYPE_RSS_CAPS         0x88
#define NDIS_OBJTYPE_RSS_PARAMS       0x89
#define NDIS_OBJTYPE_OFFLOAD          0xA7

#define NDIS_OFFLOAD_SIZE_REV1        112
#define NDIS_OFFLOAD_SIZE_REV2        144
#define NDIS_OFFLOAD_SIZE_REV3        156
#define NDIS_OFFLOAD_PARAMS_SIZE      28
#define NDIS_OFFLOAD_PARAMS_SIZE_V4   22    /* NVSP <= v4 */
#define NDIS_RSS_CAPS_SIZE_REV2       18
#define NDIS_RSS_CAPS_SIZE_REV1       16
#define NDIS_RSS_PARAMS_SIZE          40

/* NDIS_OFFLOAD csum flag bits */
#define NDIS_TXCSUM_CAP_IP4OPT        0x001
#define NDIS_TXCSUM_CAP_TCP4OPT       0x004
#define NDIS_TXCSUM_CAP_TCP4          0x010
#define NDIS_TXCSUM_CAP_UDP4          0x040
#define NDIS_TXCSUM_CAP_IP4           0x100
#define NDIS_TXCSUM_CAP_IP6EXT        0x001
#define NDIS_TXCSUM_CAP_TCP6OPT       0x004
#define NDIS_TXCSUM_CAP_TCP6          0x010
#define NDIS_TXCSUM_CAP_UDP6          0x040
#define NDIS_OFFLOAD_ENCAP_8023       2
/* NDIS_OFFLOAD lsov2.ip6_opts: IPv6 extension headers | TCP options (L-h NDIS_LSOV2_CAP_IP6 =
 * both; Linux enables IPv6 LSO only when the host offers both) */
#define NDIS_LSOV2_CAP_IP6EXT         0x001
#define NDIS_LSOV2_CAP_TCP6OPT        0x004
#define NDIS_LSOV2_CAP_IP6            0x005

/* NDIS_OFFLOAD_PARAMETERS values */
#define NDIS_OFFLOAD_PARAM_NO_CHANGE  0
#define NDIS_OFFLOAD_PARAM_TX_RX_DISABLED 1
#define NDIS_OFFLOAD_PARAM_TX_ENABLED_RX_DISABLED 2
#define NDIS_OFFLOAD_PARAM_RX_ENABLED_TX_DISABLED 3
#define NDIS_OFFLOAD_PARAM_TX_RX_ENABLED 4
#define NDIS_OFFLOAD_PARAM_LSO_DISABLED 1
#define NDIS_OFFLOAD_PARAM_LSO_ENABLED 2
#define NDIS_OFFLOAD_PARAM_RSC_DISABLED 1
#define NDIS_OFFLOAD_PARAM_RSC_ENABLED 2

/* RSS */
#define NDIS_RSS_CAP_TOEPLITZ         0x00000001
#define NDIS_RSS_CAP_TCP_IPV4         0x00000100
#define NDIS_RSS_CAP_TCP_IPV6         0x00000200
#define NDIS_HASH_FUNC_TOEPLITZ       0x00000001
#define NDIS_HASH_FUNC_MASK           0x000000FF
#define NDIS_HASH_IPV4                0x00000100
#define NDIS_HASH_TCP_IPV4            0x00000200
#define NDIS_HASH_IPV6                0x00000400
#define NDIS_HASH_IPV6_EX             0x00000800
#define NDIS_HASH_TCP_IPV6            0x00001000
#define NDIS_HASH_TCP_IPV6_EX         0x00002000
#define NDIS_HASH_UDP_IPV4            0x00004000
#define NDIS_HASH_UDP_IPV6            0x00008000
#define NDIS_HASH_UDP_IPV6_EX         0x00010000
#define NDIS_RSS_FLAG_BASE_CPU_UNCHANGED 0x0001
#define NDIS_RSS_FLAG_HASH_INFO_UNCHANGED 0x0002
#define NDIS_RSS_FLAG_ITABLE_UNCHANGED 0x0004
#define NDIS_RSS_FLAG_HASH_KEY_UNCHANGED 0x0008
#define NDIS_RSS_FLAG_DISABLE_RSS     0x0010
#define NDIS_RSS_KEY_SIZE             40
#define NDIS_RSS_TABLE_ENTRIES        128
#define NDIS_RSS_MAX_QUEUES           64

struct ndis_object_header {
    uint8_t  type;
    uint8_t  revision;
    uint16_t size;
};

/* ---- RNDIS messages ----------------------------------------------------------- */
struct rndis_msg_header {
    uint32_t msg_type;
    uint32_t msg_len;
};

struct rndis_packet {                      /* 44 bytes; offsets relative to byte 8 */
    uint32_t msg_type;
    uint32_t msg_len;
    uint32_t data_offset;
    uint32_t data_len;
    uint32_t oob_data_offset;
    uint32_t oob_data_len;
    uint32_t num_oob_data_elements;
    uint32_t per_pkt_info_offset;
    uint32_t per_pkt_info_len;
    uint32_t vc_handle;
    uint32_t reserved;
};

struct rndis_initialize_request {          /* 24 */
    uint32_t msg_type;
    uint32_t msg_len;
    uint32_t req_id;
    uint32_t major_ver;
    uint32_t minor_ver;
    uint32_t max_xfer_size;
};

struct rndis_initialize_complete {         /* 52 */
    uint32_t msg_type;
    uint32_t msg_len;
    uint32_t req_id;
    uint32_t status;
    uint32_t major_ver;
    uint32_t minor_ver;
    uint32_t dev_flags;
    uint32_t medium;
    uint32_t max_pkt_per_msg;
    uint32_t max_xfer_size;
    uint32_t pkt_alignment_factor;
    uint32_t af_list_offset;
    uint32_t af_list_size;
};

struct rndis_halt_request {                /* 12 */
    uint32_t msg_type;
    uint32_t msg_len;
    uint32_t req_id;
};

struct rndis_query_request {               /* 28 (+ input at 8 + info_buf_offset) */
    uint32_t msg_type;
    uint32_t msg_len;
    uint32_t req_id;
    uint32_t oid;
    uint32_t info_buflen;
    uint32_t info_buf_offset;
    uint32_t dev_vc_handle;
};

struct rndis_query_complete {              /* 24 (+ data at 8 + info_buf_offset) */
    uint32_t msg_type;
    uint32_t msg_len;
    uint32_t req_id;
    uint32_t status;
    uint32_t info_buflen;
    uint32_t info_buf_offset;
};

struct rndis_set_request {                 /* 28 (+ info) */
    uint32_t msg_type;
    uint32_t msg_len;
    uint32_t req_id;
    uint32_t oid;
    uint32_t info_buflen;
    uint32_t info_buf_offset;
    uint32_t dev_vc_handle;
};

/* info buffer of SET OID_GEN_RNDIS_CONFIG_PARAMETER; offsets from its start (L-r
 * rndis_filter_set_device_mac, O oid_set_rndis_config_parameter) */
#define RNDIS_CONFIG_PARAM_TYPE_INTEGER 0
#define RNDIS_CONFIG_PARAM_TYPE_STRING  2
struct rndis_config_parameter_info {       /* 20 (+ UTF-16LE name and value) */
    uint32_t name_offset;
    uint32_t name_length;                  /* bytes */
    uint32_t parameter_type;
    uint32_t value_offset;
    uint32_t value_length;                 /* bytes */
};

struct rndis_set_complete {                /* 16 */
    uint32_t msg_type;
    uint32_t msg_len;
    uint32_t req_id;
    uint32_t status;
};

struct rndis_reset_request {               /* 12 */
    uint32_t msg_type;
    uint32_t msg_len;
    uint32_t reserved;
};

struct rndis_reset_complete {              /* 16 */
    uint32_t msg_type;
    uint32_t msg_len;
    uint32_t status;
    uint32_t addressing_reset;
};

struct rndis_indicate_status {             /* 20 (+ buffer at 8 + status_buf_offset) */
    uint32_t msg_type;
    uint32_t msg_len;
    uint32_t status;
    uint32_t status_buflen;
    uint32_t status_buf_offset;
};

struct rndis_keepalive_request {           /* 12 */
    uint32_t msg_type;
    uint32_t msg_len;
    uint32_t req_id;
};

struct rndis_keepalive_complete {          /* 16 */
    uint32_t msg_type;
    uint32_t msg_len;
    uint32_t req_id;
    uint32_t status;
};

/* per-packet info element header (payload at ppi_offset from the element start) */
struct rndis_ppi {
    uint32_t size;
    uint32_t type;
    uint32_t ppi_offset;
};

/* a PPI element with a u32 payload (checksum, VLAN, hash): 16 bytes */
struct rndis_ppi_u32 {
    uint32_t size;
    uint32_t type;
    uint32_t ppi_offset;
    uint32_t value;
};

/* RSC fragment id (internal PPI 0x80000001): one coalesced segment spans several ranges of
 * one XFER_PAGES packet, each an RNDIS PACKET carrying this PPI (L-h RNDIS_PKTINFO_*, O
 * rndisprot.rs PACKET_INFO_FLAGS_MULTI_SUBALLOC*) */
#define RNDIS_PKTINFO_ID_V1           1
#define RNDIS_PKTINFO_SUBALLOC        0x01  /* part of a multi-sub-allocation frame */
#define RNDIS_PKTINFO_1ST_FRAG        0x02
#define RNDIS_PKTINFO_LAST_FRAG       0x04
struct rndis_pktinfo_id {
    uint8_t  ver;
    uint8_t  flag;
    uint16_t pkt_id;
};

/* ---- NDIS_OFFLOAD (§4.6; 156 bytes at revision 3) ------------------------------ */
struct ndis_csum_offload {
    uint32_t ip4_txenc;
    uint32_t ip4_txcsum;
    uint32_t ip4_rxenc;
    uint32_t ip4_rxcsum;
    uint32_t ip6_txenc;
    uint32_t ip6_txcsum;
    uint32_t ip6_rxenc;
    uint32_t ip6_rxcsum;
};

struct ndis_lsov1_offload {
    uint32_t encap;
    uint32_t maxsize;
    uint32_t minsegs;
    uint32_t opts;
};

struct ndis_ipsecv1_offload {
    uint32_t encap;
    uint32_t ah_esp;
    uint32_t xport_tun;
    uint32_t ip4_opts;
    uint32_t flags;
    uint32_t ip4_ah;
    uint32_t ip4_esp;
};

struct ndis_lsov2_offload {
    uint32_t ip4_encap;
    uint32_t ip4_maxsz;
    uint32_t ip4_minsg;
    uint32_t ip6_encap;
    uint32_t ip6_maxsz;
    uint32_t ip6_minsg;
    uint32_t ip6_opts;
};

struct ndis_ipsecv2_offload {
    uint32_t encap;
    uint8_t  ip6;
    uint8_t  ip4opt;
    uint8_t  ip6ext;
    uint8_t  ah;
    uint8_t  esp;
    uint8_t  ah_esp;
    uint8_t  xport;
    uint8_t  tun;
    uint8_t  xport_tun;
    uint8_t  lso;
    uint8_t  extseq;
    uint8_t  pad0;
    uint32_t udp_esp;
    uint32_t auth;
    uint32_t crypto;
    uint32_t sa_caps;
};

struct ndis_rsc_offload {
    uint8_t  ip4;
    uint8_t  ip6;
    uint8_t  pad[2];
};

struct ndis_encap_offload {
    uint32_t flags;
    uint32_t maxhdr;
};

struct ndis_offload {
    struct ndis_object_header hdr;         /* type 0xA7 */
    struct ndis_csum_offload csum;         /* @4 */
    struct ndis_lsov1_offload lsov1;       /* @36 */
    struct ndis_ipsecv1_offload ipsecv1;   /* @52 */
    struct ndis_lsov2_offload lsov2;       /* @80 */
    uint32_t flags;                        /* @108 */
    struct ndis_ipsecv2_offload ipsecv2;   /* @112 (NDIS >= 6.1) */
    struct ndis_rsc_offload rsc;           /* @144 */
    struct ndis_encap_offload encap_gre;   /* @148 */
};

/* ---- NDIS_OFFLOAD_PARAMETERS (§4.7; 28 bytes, 22 for NVSP <= v4) --------------- */
struct ndis_offload_params {
    struct ndis_object_header hdr;         /* type 0x80 */
    uint8_t  ip_v4_csum;                   /* @4 */
    uint8_t  tcp_ip_v4_csum;
    uint8_t  udp_ip_v4_csum;
    uint8_t  tcp_ip_v6_csum;
    uint8_t  udp_ip_v6_csum;               /* @8 */
    uint8_t  lso_v1;
    uint8_t  ipsec_v1;
    uint8_t  lso_v2_ipv4;
    uint8_t  lso_v2_ipv6;                  /* @12 */
    uint8_t  tcp_connection_ip_v4;
    uint8_t  tcp_connection_ip_v6;
    uint8_t  reserved;
    uint32_t flags;                        /* @16 */
    uint8_t  ipsec_v2;                     /* @20 */
    uint8_t  ipsec_v2_ip_v4;
    uint8_t  rsc_ip_v4;
    uint8_t  rsc_ip_v6;
    uint8_t  encapsulated_packet_task_offload;  /* @24 */
    uint8_t  encapsulation_types;
    uint8_t  pad[2];
};

/* ---- RSS (§4.8) --------------------------------------------------------------- */
struct ndis_recv_scale_cap {               /* 18 at revision 2 */
    struct ndis_object_header hdr;         /* type 0x88 */
    uint32_t cap_flags;
    uint32_t num_int_msg;
    uint32_t num_recv_que;
    uint16_t num_indirect_tabent;
};

struct ndis_recv_scale_param {             /* 40; table and key follow at their offsets */
    struct ndis_object_header hdr;         /* type 0x89 rev 2 */
    uint16_t flags;
    uint16_t base_cpu_number;
    uint32_t hashinfo;
    uint16_t indirect_tabsize;             /* bytes */
    uint16_t pad0;
    uint32_t indirect_taboffset;
    uint16_t hashkey_size;
    uint16_t pad1;
    uint32_t hashkey_offset;
    uint32_t processor_masks_offset;
    uint32_t num_processor_masks;
    uint32_t processor_masks_entry_size;
};
