/*
 * VSTOR (synthetic SCSI, storvsc <-> storvsp) wire layouts.
 *
 * Single definition of these layouts: included by uvmbus.h inside
 * `#pragma pack(push, 1)` for the C compiler and handed to cffi's
 * cdef(packed=True) by native/build.py.  Keep it to what cdef parses:
 * integer #defines and plain struct/union declarations.
 *
 * Source: ../shared/reference/storvsc_ic.md §2.1-2.6 (packet, SRB, union
 * members, versions, status codes), §3.1 (GPA-direct framing).  All fields
 * little-endian; SCSI payloads (CDB, sense, INQUIRY data...) are big-endian.
 * Size and offset checks: native/storvsc.c (_Static_assert) and
 * tests/test_storvsc_wire.py.
 */

/* ---- operations (vstor_packet.operation) §2.1 --------------------------- */
#define VSTOR_OP_COMPLETE_IO            1
#define VSTOR_OP_REMOVE_DEVICE          2
#define VSTOR_OP_EXECUTE_SRB            3
#define VSTOR_OP_RESET_LUN              4
#define VSTOR_OP_RESET_ADAPTER          5
#define VSTOR_OP_RESET_BUS              6
#define VSTOR_OP_BEGIN_INITIALIZATION   7
#define VSTOR_OP_END_INITIALIZATION     8
#define VSTOR_OP_QUERY_PROTOCOL_VERSION 9
#define VSTOR_OP_QUERY_PROPERTIES       10
#define VSTOR_OP_ENUMERATE_BUS          11
#define VSTOR_OP_FCHBA_DATA             12
#define VSTOR_OP_CREATE_SUB_CHANNELS    13
#define VSTOR_OP_EVENT_NOTIFICATION     14

/* vstor_packet.flags */
#define VSTOR_FLAG_REQUEST_COMPLETION   1

/* ---- sizes §2.2/§2.3 ----------------------------------------------------- */
#define VSTOR_PACKET_SIZE               64     /* 12-byte header + 52-byte union */
#define VSTOR_HEADER_SIZE               12
#define VSTOR_SRB_LEN_V2                52     /* 0x34: with the Win8 extension */
#define VSTOR_SRB_LEN_V1                36     /* 0x24: pre-Win8 */
#define VSTOR_MAX_CDB_LEN               16
#define VSTOR_SENSE_SIZE                20     /* 0x14, Win8+ */
#define VSTOR_SENSE_SIZE_PRE_WIN8       18     /* 0x12 */
#define VSTOR_CHANNEL_PROPERTIES_SIZE   24
#define VSTOR_MAX_PKT_SIZE              80     /* descriptor + packet */

/* ---- protocol versions (major << 8 | minor) §2.5 ------------------------- */
#define VSTOR_PROTO_WIN6                0x0200
#define VSTOR_PROTO_WIN7                0x0402
#define VSTOR_PROTO_WIN8                0x0501
#define VSTOR_PROTO_WIN8_1              0x0600
#define VSTOR_PROTO_WIN10               0x0602

/* ---- vmscsi_request.data_in §2.3 ---------------------------------------- */
#define VSTOR_DATA_OUT                  0      /* WRITE_TYPE: guest -> device */
#define VSTOR_DATA_IN                   1      /* READ_TYPE: device -> guest */
#define VSTOR_DATA_NONE                 2      /* UNKNOWN_TYPE */

/* ---- channel property flags §2.4 ---------------------------------------- */
#define VSTOR_PROP_MULTI_CHANNEL        1
#define VSTOR_PROP_REMOVABLE            1
#define VSTOR_PROP_EMULATED_IDE         2

/* ---- NTSTATUS (vstor_packet.status) §2.6 ---------------------------------- */
#define NT_STATUS_SUCCESS               0x00000000
#define NT_STATUS_BUFFER_OVERFLOW       0x80000005
#define NT_STATUS_DEVICE_BUSY           0x80000011
#define NT_STATUS_UNSUCCESSFUL          0xC0000001
#define NT_STATUS_INVALID_PARAMETER     0xC000000D
#define NT_STATUS_INVALID_DEVICE_REQUEST 0xC0000010
#define NT_STATUS_REVISION_MISMATCH     0xC0000059
#define NT_STATUS_DEVICE_NOT_CONNECTED  0xC000009D
#define NT_STATUS_IO_TIMEOUT            0xC00000B5
#define NT_STATUS_DEVICE_DOES_NOT_EXIST 0xC00000C0
#define NT_STATUS_CANCELLED             0xC0000120
#define NT_STATUS_INVALID_DEVICE_STATE  0xC0000184
#define NT_STATUS_IO_DEVICE_ERROR       0xC0000185

/* ---- SRB status (low 6 bits of srb_status) §2.6 --------------------------- */
#define SRB_STATUS_PENDING              0x00
#define SRB_STATUS_SUCCESS              0x01
#define SRB_STATUS_ABORTED              0x02
#define SRB_STATUS_ABORT_FAILED         0x03
#define SRB_STATUS_ERROR                0x04
#define SRB_STATUS_BUSY                 0x05
#define SRB_STATUS_INVALID_REQUEST      0x06
#define SRB_STATUS_INVALID_PATH_ID      0x07
#define SRB_STATUS_NO_DEVICE            0x08
#define SRB_STATUS_TIMEOUT              0x09
#define SRB_STATUS_SELECTION_TIMEOUT    0x0A
#define SRB_STATUS_COMMAND_TIMEOUT      0x0B
#define SRB_STATUS_MESSAGE_REJECTED     0x0D
#define SRB_STATUS_BUS_RESET            0x0E
#define SRB_STATUS_PARITY_ERROR         0x0F
#define SRB_STATUS_REQUEST_SENSE_FAILED 0x10
#define SRB_STATUS_NO_HBA               0x11
#define SRB_STATUS_DATA_OVERRUN         0x12
#define SRB_STATUS_UNEXPECTED_BUS_FREE  0x13
#define SRB_STATUS_PHASE_SEQUENCE_FAILURE 0x14
#define SRB_STATUS_BAD_SRB_BLOCK_LENGTH 0x15
#define SRB_STATUS_REQUEST_FLUSHED      0x16
#define SRB_STATUS_INVALID_LUN          0x20
#define SRB_STATUS_INVALID_TARGET_ID    0x21
#define SRB_STATUS_BAD_FUNCTION         0x22
#define SRB_STATUS_ERROR_RECOVERY       0x23
#define SRB_STATUS_NOT_POWERED          0x24
#define SRB_STATUS_LINK_DOWN            0x25
#define SRB_STATUS_INTERNAL_ERROR       0x30
#define SRB_STATUS_QUEUE_FROZEN         0x40
#define SRB_STATUS_AUTOSENSE_VALID      0x80
#define SRB_STATUS_MASK                 0x3F

/* ---- SRB flags (Win8 extension) §2.6 ------------------------------------ */
#define SRB_FLAGS_QUEUE_ACTION_ENABLE   0x00000002
#define SRB_FLAGS_DISABLE_DISCONNECT    0x00000004
#define SRB_FLAGS_DISABLE_SYNCH_TRANSFER 0x00000008
#define SRB_FLAGS_BYPASS_FROZEN_QUEUE   0x00000010
#define SRB_FLAGS_DISABLE_AUTOSENSE     0x00000020
#define SRB_FLAGS_DATA_IN               0x00000040
#define SRB_FLAGS_DATA_OUT              0x00000080
#define SRB_FLAGS_NO_DATA_TRANSFER      0x00000000
#define SRB_FLAGS_NO_QUEUE_FREEZE       0x00000100
#define SRB_FLAGS_ADAPTER_CACHE_ENABLE  0x00000200
#define SRB_FLAGS_FREE_SENSE_BUFFER     0x00000400
#define SRB_FLAGS_D3_PROCESSING         0x00000800
#define SRB_FLAGS_MS_SPECIAL_BEHAVIOR   0x00008000
#define SRB_FLAGS_IS_ACTIVE             0x00010000
#define SP_UNTAGGED                     0xFF
#define SRB_SIMPLE_TAG_REQUEST          0x20

/* ---- SAM status (vmscsi_request.scsi_status) ------------------------------ */
#define SCSI_STATUS_GOOD                0x00
#define SCSI_STATUS_CHECK_CONDITION     0x02
#define SCSI_STATUS_BUSY                0x08
#define SCSI_STATUS_RESERVATION_CONFLICT 0x18
#define SCSI_STATUS_TASK_ABORTED        0x40

/* ---- SCSI operation codes (CDB byte 0; SPC-4 / SBC-3) ---------------------
 * Carried in vstor_srb's CDB.  The guest's Opcode enum (storvsc/scsi.py) and the
 * trace decoder's names (trace/decode.py, the Lua dissector) are built from these. */
#define SCSI_OP_TEST_UNIT_READY         0x00
#define SCSI_OP_REQUEST_SENSE           0x03
#define SCSI_OP_FORMAT_UNIT             0x04
#define SCSI_OP_READ6                   0x08
#define SCSI_OP_WRITE6                  0x0A
#define SCSI_OP_INQUIRY                 0x12
#define SCSI_OP_MODE_SELECT6            0x15
#define SCSI_OP_RESERVE6                0x16
#define SCSI_OP_RELEASE6                0x17
#define SCSI_OP_MODE_SENSE6             0x1A
#define SCSI_OP_START_STOP_UNIT         0x1B
#define SCSI_OP_SEND_DIAGNOSTIC         0x1D
#define SCSI_OP_PREVENT_ALLOW           0x1E
#define SCSI_OP_READ_CAPACITY10         0x25
#define SCSI_OP_READ10                  0x28
#define SCSI_OP_WRITE10                 0x2A
#define SCSI_OP_WRITE_VERIFY10          0x2E
#define SCSI_OP_VERIFY10                0x2F
#define SCSI_OP_SYNCHRONIZE_CACHE10     0x35
#define SCSI_OP_WRITE_SAME10            0x41
#define SCSI_OP_UNMAP                   0x42
#define SCSI_OP_MODE_SELECT10           0x55
#define SCSI_OP_MODE_SENSE10            0x5A
#define SCSI_OP_PERSISTENT_RESERVE_IN   0x5E
#define SCSI_OP_PERSISTENT_RESERVE_OUT  0x5F
#define SCSI_OP_THIRD_PARTY_COPY_OUT    0x83
#define SCSI_OP_THIRD_PARTY_COPY_IN     0x84
#define SCSI_OP_READ16                  0x88
#define SCSI_OP_WRITE16                 0x8A
#define SCSI_OP_WRITE_VERIFY16          0x8E
#define SCSI_OP_VERIFY16                0x8F
#define SCSI_OP_SYNCHRONIZE_CACHE16     0x91
#define SCSI_OP_WRITE_SAME16            0x93
#define SCSI_OP_SERVICE_ACTION_IN16     0x9E
#define SCSI_OP_REPORT_LUNS             0xA0
#define SCSI_OP_MAINTENANCE_IN          0xA3
#define SCSI_OP_READ12                  0xA8
#define SCSI_OP_WRITE12                 0xAA
#define SCSI_OP_WRITE_VERIFY12          0xAE
#define SCSI_OP_VERIFY12                0xAF

/* ---- vmscsi_request (52 bytes; offsets relative to the union) §2.3 -------- */
struct vstor_srb {
    uint16_t length;                /* 0x34 (0x24 pre-Win8) */
    uint8_t  srb_status;
    uint8_t  scsi_status;
    uint8_t  port_number;           /* OpenVMM: reserved1 */
    uint8_t  path_id;
    uint8_t  target_id;
    uint8_t  lun;
    uint8_t  cdb_length;
    uint8_t  sense_info_length;     /* sense_info_ex_length */
    uint8_t  data_in;               /* VSTOR_DATA_* */
    uint8_t  reserved;              /* OpenVMM: properties */
    uint32_t data_transfer_length;  /* request: buffer length; reply: bytes moved */
    uint8_t  payload[20];           /* request: CDB (16 used); reply: sense data */
    /* Win8 extension (16 bytes) */
    uint16_t reserve;
    uint8_t  queue_tag;
    uint8_t  queue_action;
    uint32_t srb_flags;
    uint32_t time_out_value;
    uint32_t queue_sort_key;
};

/* §2.4 */
struct vstor_protocol_version {
    uint16_t major_minor;
    uint16_t revision;
};

struct vstor_channel_properties {
    uint32_t reserved;
    uint16_t max_channel_cnt;
    uint16_t reserved1;
    uint32_t flags;                 /* VSTOR_PROP_MULTI_CHANNEL */
    uint32_t max_transfer_bytes;
    uint64_t reserved2;
};

struct vstor_fc_wwn {
    uint8_t  primary_active;
    uint8_t  reserved1[3];
    uint8_t  primary_port_wwn[8];
    uint8_t  primary_node_wwn[8];
    uint8_t  secondary_port_wwn[8];
    uint8_t  secondary_node_wwn[8];
};

union vstor_body {
    struct vstor_srb srb;
    struct vstor_channel_properties props;
    struct vstor_protocol_version version;
    struct vstor_fc_wwn wwn;
    uint16_t sub_channel_count;
    uint8_t  buffer[52];
};

/* §2.2: 12-byte header + 52-byte union = 64 bytes */
struct vstor_packet {
    uint32_t operation;             /* VSTOR_OP_* */
    uint32_t flags;                 /* VSTOR_FLAG_REQUEST_COMPLETION */
    uint32_t status;                /* NTSTATUS on replies, 0 in requests */
    union vstor_body u;
};

/* §3.1: the GPA-direct packet storvsc sends for one range of N pfns is
 * struct vmgpa_direct_header (24) + struct vmgpa_range (8) + N * u64 pfn,
 * then the 64-byte vstor_packet. */
