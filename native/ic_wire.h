/*
 * Integration components (ICs) wire layouts: the pipe header, icmsg_hdr,
 * version negotiation and the message bodies of heartbeat, shutdown, time
 * sync, KVP and file copy.
 *
 * Single definition of these layouts: included by uvmbus.h inside
 * `#pragma pack(push, 1)` for the C compiler and handed to cffi's
 * cdef(packed=True) by native/build.py.  Keep it to what cdef parses:
 * integer #defines and plain struct declarations.
 *
 * Source: ../shared/reference/storvsc_ic.md §7 (framing, icmsg_hdr,
 * negotiation, heartbeat, shutdown, time sync, KVP, fcopy), Linux
 * include/uapi/linux/hyperv.h (KVP/fcopy structs) and include/linux/hyperv.h
 * (icmsg_hdr, icmsg_negotiate).  All fields little-endian; strings from the
 * host are UTF-16LE.  Sizes pinned by native/ic_wire.c (_Static_assert) and tests/test_ic_wire.py.
 */

/* ---- framing §7.1 --------------------------------------------------------- */
#define IC_PIPE_HDR_SIZE            8
#define IC_MSG_HDR_SIZE             20
#define IC_HDR_SIZE                 28      /* ICMSG_HDR: pipe header + icmsg_hdr */
#define IC_PIPE_TYPE_DATA           1       /* vmbuspipe_hdr.flags */
#define IC_MAX_MESSAGE_SIZE         13312   /* OpenVMM host MAX_MESSAGE_SIZE */

/* ---- icmsg_hdr.icmsgtype §7.2 ---------------------------------------------- */
#define IC_MSGTYPE_NEGOTIATE        0
#define IC_MSGTYPE_HEARTBEAT        1
#define IC_MSGTYPE_KVPEXCHANGE      2
#define IC_MSGTYPE_SHUTDOWN         3
#define IC_MSGTYPE_TIMESYNC         4
#define IC_MSGTYPE_VSS              5
#define IC_MSGTYPE_FCOPY            7

/* ---- icmsg_hdr.icflags ----------------------------------------------------- */
#define IC_FLAG_TRANSACTION         0x1
#define IC_FLAG_REQUEST             0x2
#define IC_FLAG_RESPONSE            0x4

/* ---- icmsg_hdr.status (HRESULT) -------------------------------------------- */
#define IC_S_OK                     0x00000000
#define IC_E_FAIL                   0x80004005
#define IC_S_CONT                   0x80070103   /* enumeration: no more items */
#define IC_ERROR_NOT_SUPPORTED      0x80070032
#define IC_ERROR_MACHINE_LOCKED     0x800704F7
#define IC_ERROR_DEVICE_NOT_CONNECTED 0x8007048F
#define IC_INVALIDARG               0x80070057
#define IC_GUID_NOTFOUND            0x80041002
#define IC_ERROR_ALREADY_EXISTS     0x80070050
#define IC_ERROR_DISK_FULL          0x80070070

/* ---- negotiation §7.3 -------------------------------------------------------- */
#define IC_MAX_VERSION_COUNT        100      /* IC_VERSION_NEGOTIATION_MAX_VER_COUNT */
#define IC_NEGOTIATE_RESP_SIZE      16       /* icmsgsize of a negotiate reply */

struct ic_version {
    uint16_t major;
    uint16_t minor;
};

struct ic_pipe_hdr {
    uint32_t flags;
    uint32_t msgsize;                /* bytes after this header */
};

struct ic_msg_hdr {
    struct ic_version icverframe;    /* framework version */
    uint16_t icmsgtype;
    struct ic_version icvermsg;      /* message (service) version */
    uint16_t icmsgsize;              /* body length */
    uint32_t status;
    uint8_t  ictransaction_id;
    uint8_t  icflags;
    uint8_t  reserved[2];
};

/* followed by icframe_vercnt + icmsg_vercnt struct ic_version entries */
struct ic_negotiate {
    uint16_t icframe_vercnt;
    uint16_t icmsg_vercnt;
    uint32_t reserved;
};

/* ---- heartbeat (type 1) §7.4 ------------------------------------------------- */
struct ic_heartbeat {
    uint64_t seq_num;
    uint32_t reserved[8];
};
#define IC_HEARTBEAT_MIN_SIZE       8        /* Linux: only seq_num must be present */

/* ---- shutdown (type 3) §7.5 -------------------------------------------------- */
#define IC_SHUTDOWN_FLAG_FORCE      0x1
#define IC_SHUTDOWN_FLAG_RESTART    0x2      /* >= 3.1 */
#define IC_SHUTDOWN_FLAG_HIBERNATE  0x4      /* >= 3.2 */
#define IC_SHUTDOWN_MSG_SIZE        2048
struct ic_shutdown {
    uint32_t reason_code;
    uint32_t timeout_seconds;
    uint32_t flags;
    uint8_t  display_message[2048];
};

/* ---- time sync (type 4) §7.6 ------------------------------------------------- */
#define IC_TIMESYNC_FLAG_PROBE      0
#define IC_TIMESYNC_FLAG_SYNC       1
#define IC_TIMESYNC_FLAG_SAMPLE     2
struct ic_timesync {                 /* versions 1.0 / 3.0 */
    uint64_t parenttime;             /* 100 ns since 1601-01-01 UTC */
    uint64_t childtime;
    uint64_t roundtriptime;
    uint8_t  flags;
};
struct ic_timesync_ref {             /* version 4.0 */
    uint64_t parenttime;
    uint64_t vmreferencetime;        /* guest reference counter (100 ns) at sampling */
    uint8_t  flags;
    uint8_t  leapflags;
    uint8_t  stratum;
    uint8_t  reserved[3];
};

/* ---- KVP (type 2) §7.7, uapi hv_kvp_* ---------------------------------------- */
#define IC_KVP_OP_GET               0
#define IC_KVP_OP_SET               1
#define IC_KVP_OP_DELETE            2
#define IC_KVP_OP_ENUMERATE         3
#define IC_KVP_OP_GET_IP_INFO       4
#define IC_KVP_OP_SET_IP_INFO       5
#define IC_KVP_POOL_EXTERNAL        0
#define IC_KVP_POOL_GUEST           1
#define IC_KVP_POOL_AUTO            2
#define IC_KVP_POOL_AUTO_EXTERNAL   3
#define IC_KVP_POOL_AUTO_INTERNAL   4
#define IC_KVP_POOL_COUNT           5
#define IC_KVP_MAX_KEY_SIZE         512      /* bytes, UTF-16 NUL included */
#define IC_KVP_MAX_VALUE_SIZE       2048
#define IC_REG_SZ                   1
#define IC_REG_EXPAND_SZ            2
#define IC_REG_U32                  4
#define IC_REG_U64                  8        /* Linux uapi; OpenVMM uses 11 (QWORD) */
#define IC_REG_QWORD                11
#define IC_KVP_ADAPTER_ID_SIZE      128      /* UTF-16 units */
#define IC_KVP_IP_ADDR_SIZE         1024
#define IC_KVP_GATEWAY_SIZE         512
#define IC_ADDR_FAMILY_NONE         0
#define IC_ADDR_FAMILY_IPV4         1
#define IC_ADDR_FAMILY_IPV6         2

struct ic_kvp_hdr {
    uint8_t  operation;
    uint8_t  pool;
    uint16_t pad;
};

struct ic_kvp_value {                /* hv_kvp_exchg_msg_value, 2572 bytes */
    uint32_t value_type;
    uint32_t key_size;
    uint32_t value_size;
    uint8_t  key[512];
    uint8_t  value[2048];
};

struct ic_kvp_msg_value {            /* GET / SET */
    struct ic_kvp_hdr hdr;
    struct ic_kvp_value data;
};

struct ic_kvp_msg_enumerate {
    struct ic_kvp_hdr hdr;
    uint32_t index;
    struct ic_kvp_value data;
};

struct ic_kvp_msg_delete {
    struct ic_kvp_hdr hdr;
    uint32_t key_size;
    uint8_t  key[512];
};

struct ic_kvp_ipaddr_value {         /* hv_kvp_ipaddr_value (UTF-16 strings) */
    uint16_t adapter_id[128];
    uint8_t  addr_family;
    uint8_t  dhcp_enabled;
    uint16_t ip_addr[1024];
    uint16_t sub_net[1024];
    uint16_t gate_way[512];
    uint16_t dns_addr[1024];
};

struct ic_kvp_ip_msg {               /* hv_kvp_ip_msg: a 2-byte header, no pad */
    uint8_t  operation;
    uint8_t  pool;
    struct ic_kvp_ipaddr_value kvp_ip_val;
};

/* ---- file copy (type 7) §7.9 ------------------------------------------------- */
#define IC_FCOPY_START_FILE_COPY    0
#define IC_FCOPY_WRITE_TO_FILE      1
#define IC_FCOPY_COMPLETE           2
#define IC_FCOPY_CANCEL             3
#define IC_FCOPY_OVER_WRITE         0x1
#define IC_FCOPY_CREATE_PATH        0x2
#define IC_FCOPY_MAX_PATH           260      /* W_MAX_PATH, UTF-16 units */
#define IC_FCOPY_DATA_FRAGMENT      6144     /* 6 * 1024 */

struct ic_fcopy_hdr {
    uint32_t operation;
    uint8_t  service_id0[16];
    uint8_t  service_id1[16];
};

struct ic_fcopy_start {
    struct ic_fcopy_hdr hdr;
    uint16_t file_name[260];
    uint16_t path_name[260];
    uint32_t copy_flags;
    uint64_t file_size;
};

struct ic_fcopy_write {
    struct ic_fcopy_hdr hdr;
    uint32_t pad;
    uint64_t offset;
    uint32_t size;
    uint8_t  data[6144];
};
