-- uvmbus VMBus trace dissector for Wireshark / tshark (Lua plugin).
--
--   tshark -X lua_script:$(uvmbus trace dissector) -r trace.pcapng
--   uvmbus trace wireshark trace.pcapng
--
-- Dissects uvmbus traces (pcapng, LINKTYPE_USER0; docs/trace.md): the trace header, the
-- VMBus packet descriptor (type, flags, trans_id, offset8/len8, transfer-page and GPA ranges),
-- NVSP, RNDIS (message types, OIDs, per-packet info; the Ethernet frame goes to Wireshark's
-- Ethernet dissector), VSTOR (operation, SRB, CDB with SCSI command names, status, sense),
-- the integration-service ICMSG header, and host events.  Requests and completions are
-- paired by transaction id ("vmbus.response_to" / "vmbus.response_in"); protocol violations
-- become expert info (group "Protocol"), never a Lua error.
--
-- Layouts and names below come from the drivers' own wire headers (native/*_wire.h):
-- the generated block is rewritten by `python -m uvmbus.trace.wireshark.gen`.

-- BEGIN GENERATED (python -m uvmbus.trace.wireshark.gen; do not edit)
local C = { NVSP_MSG1_TYPE_SEND_RNDIS_PKT = 107, NVSP_MSG5_TYPE_SUBCHANNEL = 133, RNDIS_MSG_COMPLETION = 2147483648, RNDIS_MSG_INDICATE = 7, RNDIS_MSG_PACKET = 1, SRB_STATUS_AUTOSENSE_VALID = 128, SRB_STATUS_MASK = 63, UVB_TRACE_CHUNK_SECTION = 2, UVB_TRACE_CHUNK_XFER = 1, UVB_TRACE_CLASS_IC = 3, UVB_TRACE_CLASS_NET = 1, UVB_TRACE_CLASS_OTHER = 0, UVB_TRACE_CLASS_SCSI = 2, UVB_TRACE_DIR_G2H = 0, UVB_TRACE_DIR_H2G = 1, UVB_TRACE_EV_CLOSE = 7, UVB_TRACE_EV_DATA = 9, UVB_TRACE_EV_FAULT = 5, UVB_TRACE_EV_INTERRUPT = 2, UVB_TRACE_EV_IRQCONTROL = 3, UVB_TRACE_EV_MASK = 4, UVB_TRACE_EV_NOTE = 8, UVB_TRACE_EV_OPEN = 6, UVB_TRACE_EV_SIGNAL = 1, UVB_TRACE_F_ATT_LOST = 8, UVB_TRACE_F_ATT_TRUNC = 2, UVB_TRACE_F_NO_PAYLOAD = 4, UVB_TRACE_F_PKT_TRUNC = 1, UVB_TRACE_KIND_EVENT = 2, UVB_TRACE_KIND_PACKET = 1, UVB_TRACE_LINKTYPE = 147, UVB_TRACE_SIDE_GUEST = 0, UVB_TRACE_SIDE_HOST = 1, UVB_TRACE_VERSION = 1, VMBUS_PKT_COMP = 11, VMBUS_PKT_FLAG_COMPLETION_REQUESTED = 1, VMBUS_PKT_GPA_DIRECT = 9, VMBUS_PKT_INBAND = 6, VMBUS_PKT_XFER_PAGES = 7, VSTOR_OP_COMPLETE_IO = 1, VSTOR_OP_CREATE_SUB_CHANNELS = 13, VSTOR_OP_EXECUTE_SRB = 3, VSTOR_OP_QUERY_PROPERTIES = 10, VSTOR_OP_QUERY_PROTOCOL_VERSION = 9, VSTOR_SRB_LEN_V1 = 36, VSTOR_SRB_LEN_V2 = 52 }
local PKT_TYPES = { [6] = "INBAND", [7] = "XFER_PAGES", [9] = "GPA_DIRECT", [11] = "COMP" }
local NVSP_TYPES = { [0] = "NONE", [1] = "INIT", [2] = "INIT_COMPLETE", [100] = "SEND_NDIS_VER", [101] = "SEND_RECV_BUF", [102] = "SEND_RECV_BUF_COMPLETE", [103] = "REVOKE_RECV_BUF", [104] = "SEND_SEND_BUF", [105] = "SEND_SEND_BUF_COMPLETE", [106] = "REVOKE_SEND_BUF", [107] = "SEND_RNDIS_PKT", [108] = "SEND_RNDIS_PKT_COMPLETE", [125] = "SEND_NDIS_CONFIG", [128] = "SEND_VF_ASSOCIATION", [129] = "SWITCH_DATA_PATH", [131] = "OID_QUERY_EX", [132] = "OID_QUERY_EX_COMP", [133] = "SUBCHANNEL", [134] = "SEND_INDIRECTION_TABLE" }
local NVSP_STATUS = { [0] = "NONE", [1] = "SUCCESS", [2] = "FAIL", [3] = "PROTOCOL_TOO_NEW", [4] = "PROTOCOL_TOO_OLD", [5] = "INVALID_RNDIS_PKT", [6] = "BUSY", [7] = "PROTOCOL_UNSUPPORTED" }
local RNDIS_TYPES = { [1] = "PACKET", [2] = "INIT", [3] = "HALT", [4] = "QUERY", [5] = "SET", [6] = "RESET", [7] = "INDICATE", [8] = "KEEPALIVE", [9] = "SET_EX", [2147483648] = "COMPLETION", [2147483650] = "INIT_C", [2147483652] = "QUERY_C", [2147483653] = "SET_C", [2147483654] = "RESET_C", [2147483656] = "KEEPALIVE_C", [2147483657] = "SET_EX_C" }
local RNDIS_STATUS = { [0] = "SUCCESS", [259] = "PENDING", [1073807371] = "MEDIA_CONNECT", [1073807372] = "MEDIA_DISCONNECT", [1073807379] = "LINK_SPEED_CHANGE", [1073807384] = "NETWORK_CHANGE", [1073872902] = "TASK_OFFLOAD_CURRENT_CONFIG", [2147483653] = "BUFFER_OVERFLOW", [3221225473] = "FAILURE", [3221225626] = "RESOURCES", [3221225659] = "NOT_SUPPORTED", [3221291012] = "BAD_VERSION", [3221291023] = "INVALID_PACKET", [3221291028] = "INVALID_LENGTH", [3221291029] = "INVALID_DATA", [3221291031] = "INVALID_OID" }
local OIDS = { [65793] = "OID_GEN_SUPPORTED_LIST", [65794] = "OID_GEN_HARDWARE_STATUS", [65795] = "OID_GEN_MEDIA_SUPPORTED", [65796] = "OID_GEN_MEDIA_IN_USE", [65797] = "OID_GEN_MAXIMUM_LOOKAHEAD", [65798] = "OID_GEN_MAXIMUM_FRAME_SIZE", [65799] = "OID_GEN_LINK_SPEED", [65800] = "OID_GEN_TRANSMIT_BUFFER_SPACE", [65801] = "OID_GEN_RECEIVE_BUFFER_SPACE", [65802] = "OID_GEN_TRANSMIT_BLOCK_SIZE", [65803] = "OID_GEN_RECEIVE_BLOCK_SIZE", [65804] = "OID_GEN_VENDOR_ID", [65805] = "OID_GEN_VENDOR_DESCRIPTION", [65806] = "OID_GEN_CURRENT_PACKET_FILTER", [65807] = "OID_GEN_CURRENT_LOOKAHEAD", [65808] = "OID_GEN_DRIVER_VERSION", [65809] = "OID_GEN_MAXIMUM_TOTAL_SIZE", [65810] = "OID_GEN_PROTOCOL_OPTIONS", [65811] = "OID_GEN_MAC_OPTIONS", [65812] = "OID_GEN_MEDIA_CONNECT_STATUS", [65813] = "OID_GEN_MAXIMUM_SEND_PACKETS", [65814] = "OID_GEN_VENDOR_DRIVER_VERSION", [65816] = "OID_GEN_NETWORK_LAYER_ADDRESSES", [66051] = "OID_GEN_RECEIVE_SCALE_CAPABILITIES", [66052] = "OID_GEN_RECEIVE_SCALE_PARAMETERS", [66054] = "OID_GEN_MAX_LINK_SPEED", [66055] = "OID_GEN_LINK_STATE", [66056] = "OID_GEN_LINK_PARAMETERS", [66075] = "OID_GEN_RNDIS_CONFIG_PARAMETER", [131329] = "OID_GEN_XMIT_OK", [131330] = "OID_GEN_RCV_OK", [131331] = "OID_GEN_XMIT_ERROR", [131332] = "OID_GEN_RCV_ERROR", [131333] = "OID_GEN_RCV_NO_BUFFER", [131606] = "OID_GEN_FRIENDLY_NAME", [131609] = "OID_GEN_BYTES_RCV", [131610] = "OID_GEN_BYTES_XMIT", [131611] = "OID_GEN_RCV_DISCARDS", [131612] = "OID_GEN_XMIT_DISCARDS", [16843009] = "OID_802_3_PERMANENT_ADDRESS", [16843010] = "OID_802_3_CURRENT_ADDRESS", [16843011] = "OID_802_3_MULTICAST_LIST", [16843012] = "OID_802_3_MAXIMUM_LIST_SIZE", [16843018] = "OID_OFFLOAD_ENCAPSULATION", [16908545] = "OID_802_3_RCV_ERROR_ALIGNMENT", [16908546] = "OID_802_3_XMIT_ONE_COLLISION", [16908547] = "OID_802_3_XMIT_MORE_COLLISIONS", [4227924491] = "OID_TCP_OFFLOAD_CURRENT_CONFIG", [4227924492] = "OID_TCP_OFFLOAD_PARAMETERS", [4227924493] = "OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES" }
local VSTOR_OPS = { [1] = "COMPLETE_IO", [2] = "REMOVE_DEVICE", [3] = "EXECUTE_SRB", [4] = "RESET_LUN", [5] = "RESET_ADAPTER", [6] = "RESET_BUS", [7] = "BEGIN_INITIALIZATION", [8] = "END_INITIALIZATION", [9] = "QUERY_PROTOCOL_VERSION", [10] = "QUERY_PROPERTIES", [11] = "ENUMERATE_BUS", [12] = "FCHBA_DATA", [13] = "CREATE_SUB_CHANNELS", [14] = "EVENT_NOTIFICATION" }
local SRB_STATUS = { [0] = "PENDING", [1] = "SUCCESS", [2] = "ABORTED", [3] = "ABORT_FAILED", [4] = "ERROR", [5] = "BUSY", [6] = "INVALID_REQUEST", [7] = "INVALID_PATH_ID", [8] = "NO_DEVICE", [9] = "TIMEOUT", [10] = "SELECTION_TIMEOUT", [11] = "COMMAND_TIMEOUT", [13] = "MESSAGE_REJECTED", [14] = "BUS_RESET", [15] = "PARITY_ERROR", [16] = "REQUEST_SENSE_FAILED", [17] = "NO_HBA", [18] = "DATA_OVERRUN", [19] = "UNEXPECTED_BUS_FREE", [20] = "PHASE_SEQUENCE_FAILURE", [21] = "BAD_SRB_BLOCK_LENGTH", [22] = "REQUEST_FLUSHED", [32] = "INVALID_LUN", [33] = "INVALID_TARGET_ID", [34] = "BAD_FUNCTION", [35] = "ERROR_RECOVERY", [36] = "NOT_POWERED", [37] = "LINK_DOWN", [48] = "INTERNAL_ERROR" }
local EVENTS = { [1] = "SIGNAL", [2] = "INTERRUPT", [3] = "IRQCONTROL", [4] = "MASK", [5] = "FAULT", [6] = "OPEN", [7] = "CLOSE", [8] = "NOTE", [9] = "DATA" }
local CLASSES = { [0] = "vmbus", [1] = "netvsc", [2] = "storvsc", [3] = "ic" }
local PPI_TYPES = { [0] = "TCPIP_CHKSUM", [1] = "IPSEC", [2] = "TCP_LARGESEND", [3] = "CLASSIFICATION_HANDLE", [6] = "IEEE_8021Q", [8] = "HASH_VALUE", [9] = "HASH_INFO", [11] = "SHORT_PKT_PADINFO", [2147483649] = "RNDIS_PKTINFO_ID" }
local IC_TYPES = { [0] = "NEGOTIATE", [1] = "HEARTBEAT", [2] = "KVPEXCHANGE", [3] = "SHUTDOWN", [4] = "TIMESYNC", [5] = "VSS", [7] = "FCOPY" }
local SCSI_OPS = { [0] = "TEST_UNIT_READY", [3] = "REQUEST_SENSE", [4] = "FORMAT_UNIT", [8] = "READ6", [10] = "WRITE6", [18] = "INQUIRY", [21] = "MODE_SELECT6", [22] = "RESERVE6", [23] = "RELEASE6", [26] = "MODE_SENSE6", [27] = "START_STOP_UNIT", [29] = "SEND_DIAGNOSTIC", [30] = "PREVENT_ALLOW", [37] = "READ_CAPACITY10", [40] = "READ10", [42] = "WRITE10", [46] = "WRITE_VERIFY10", [47] = "VERIFY10", [53] = "SYNCHRONIZE_CACHE10", [65] = "WRITE_SAME10", [66] = "UNMAP", [85] = "MODE_SELECT10", [90] = "MODE_SENSE10", [94] = "PERSISTENT_RESERVE_IN", [95] = "PERSISTENT_RESERVE_OUT", [131] = "THIRD_PARTY_COPY_OUT", [132] = "THIRD_PARTY_COPY_IN", [136] = "READ16", [138] = "WRITE16", [142] = "WRITE_VERIFY16", [143] = "VERIFY16", [145] = "SYNCHRONIZE_CACHE16", [147] = "WRITE_SAME16", [158] = "SERVICE_ACTION_IN16", [160] = "REPORT_LUNS", [163] = "MAINTENANCE_IN", [168] = "READ12", [170] = "WRITE12", [174] = "WRITE_VERIFY12", [175] = "VERIFY12" }
local NVSP_STRUCT = { [1] = "nvsp_init", [2] = "nvsp_init_complete", [100] = "nvsp_send_ndis_ver", [101] = "nvsp_send_recv_buf", [102] = "nvsp_send_recv_buf_complete", [103] = "nvsp_revoke_buf", [104] = "nvsp_send_send_buf", [105] = "nvsp_send_send_buf_complete", [106] = "nvsp_revoke_buf", [107] = "nvsp_send_rndis_pkt", [108] = "nvsp_send_rndis_pkt_complete", [125] = "nvsp_send_ndis_config", [128] = "nvsp_vf_association", [129] = "nvsp_switch_data_path", [131] = "nvsp_oid_query_ex", [132] = "nvsp_oid_query_ex_complete", [133] = "nvsp_subchannel_request", [134] = "nvsp_send_indirection_table" }
local RNDIS_STRUCT = { [1] = "rndis_packet", [2] = "rndis_initialize_request", [3] = "rndis_halt_request", [4] = "rndis_query_request", [5] = "rndis_set_request", [6] = "rndis_reset_request", [7] = "rndis_indicate_status", [8] = "rndis_keepalive_request", [2147483650] = "rndis_initialize_complete", [2147483652] = "rndis_query_complete", [2147483653] = "rndis_set_complete", [2147483654] = "rndis_reset_complete", [2147483656] = "rndis_keepalive_complete" }
local LAYOUT = {
  ["ic_msg_hdr"] = { size = 20, {"icverframe.major", 0, 2, "u"}, {"icverframe.minor", 2, 2, "u"}, {"icmsgtype", 4, 2, "u"}, {"icvermsg.major", 6, 2, "u"}, {"icvermsg.minor", 8, 2, "u"}, {"icmsgsize", 10, 2, "u"}, {"status", 12, 4, "u"}, {"ictransaction_id", 16, 1, "u"}, {"icflags", 17, 1, "u"}, {"reserved", 18, 2, "b"} },
  ["ic_pipe_hdr"] = { size = 8, {"flags", 0, 4, "u"}, {"msgsize", 4, 4, "u"} },
  ["nvsp_init"] = { size = 12, {"msg_type", 0, 4, "u"}, {"min_protocol_ver", 4, 4, "u"}, {"max_protocol_ver", 8, 4, "u"} },
  ["nvsp_init_complete"] = { size = 16, {"msg_type", 0, 4, "u"}, {"negotiated_protocol_ver", 4, 4, "u"}, {"max_mdl_chain_len", 8, 4, "u"}, {"status", 12, 4, "u"} },
  ["nvsp_oid_query_ex"] = { size = 12, {"msg_type", 0, 4, "u"}, {"hdr_type", 4, 1, "u"}, {"hdr_revision", 5, 1, "u"}, {"hdr_size", 6, 2, "u"}, {"oid", 8, 4, "u"} },
  ["nvsp_oid_query_ex_complete"] = { size = 12, {"msg_type", 0, 4, "u"}, {"status", 4, 4, "u"}, {"bytes", 8, 4, "u"} },
  ["nvsp_revoke_buf"] = { size = 8, {"msg_type", 0, 4, "u"}, {"id", 4, 2, "u"}, {"reserved", 6, 2, "u"} },
  ["nvsp_send_indirection_table"] = { size = 12, {"msg_type", 0, 4, "u"}, {"count", 4, 4, "u"}, {"offset", 8, 4, "u"} },
  ["nvsp_send_ndis_config"] = { size = 20, {"msg_type", 0, 4, "u"}, {"mtu", 4, 4, "u"}, {"reserved", 8, 4, "u"}, {"capability", 12, 8, "u"} },
  ["nvsp_send_ndis_ver"] = { size = 12, {"msg_type", 0, 4, "u"}, {"ndis_major_ver", 4, 4, "u"}, {"ndis_minor_ver", 8, 4, "u"} },
  ["nvsp_send_recv_buf"] = { size = 12, {"msg_type", 0, 4, "u"}, {"gpadl_handle", 4, 4, "u"}, {"id", 8, 2, "u"}, {"reserved", 10, 2, "u"} },
  ["nvsp_send_recv_buf_complete"] = { size = 28, {"msg_type", 0, 4, "u"}, {"status", 4, 4, "u"}, {"num_sections", 8, 4, "u"}, {"section.offset", 12, 4, "u"}, {"section.sub_alloc_size", 16, 4, "u"}, {"section.num_sub_allocs", 20, 4, "u"}, {"section.end_offset", 24, 4, "u"} },
  ["nvsp_send_rndis_pkt"] = { size = 16, {"msg_type", 0, 4, "u"}, {"channel_type", 4, 4, "u"}, {"send_buf_section_index", 8, 4, "u"}, {"send_buf_section_size", 12, 4, "u"} },
  ["nvsp_send_rndis_pkt_complete"] = { size = 8, {"msg_type", 0, 4, "u"}, {"status", 4, 4, "u"} },
  ["nvsp_send_send_buf"] = { size = 12, {"msg_type", 0, 4, "u"}, {"gpadl_handle", 4, 4, "u"}, {"id", 8, 2, "u"}, {"reserved", 10, 2, "u"} },
  ["nvsp_send_send_buf_complete"] = { size = 12, {"msg_type", 0, 4, "u"}, {"status", 4, 4, "u"}, {"section_size", 8, 4, "u"} },
  ["nvsp_subchannel_complete"] = { size = 12, {"msg_type", 0, 4, "u"}, {"status", 4, 4, "u"}, {"num_subchannels", 8, 4, "u"} },
  ["nvsp_subchannel_request"] = { size = 12, {"msg_type", 0, 4, "u"}, {"op", 4, 4, "u"}, {"num_subchannels", 8, 4, "u"} },
  ["nvsp_switch_data_path"] = { size = 8, {"msg_type", 0, 4, "u"}, {"active_datapath", 4, 4, "u"} },
  ["nvsp_vf_association"] = { size = 12, {"msg_type", 0, 4, "u"}, {"allocated", 4, 4, "u"}, {"serial", 8, 4, "u"} },
  ["rndis_halt_request"] = { size = 12, {"msg_type", 0, 4, "u"}, {"msg_len", 4, 4, "u"}, {"req_id", 8, 4, "u"} },
  ["rndis_indicate_status"] = { size = 20, {"msg_type", 0, 4, "u"}, {"msg_len", 4, 4, "u"}, {"status", 8, 4, "u"}, {"status_buflen", 12, 4, "u"}, {"status_buf_offset", 16, 4, "u"} },
  ["rndis_initialize_complete"] = { size = 52, {"msg_type", 0, 4, "u"}, {"msg_len", 4, 4, "u"}, {"req_id", 8, 4, "u"}, {"status", 12, 4, "u"}, {"major_ver", 16, 4, "u"}, {"minor_ver", 20, 4, "u"}, {"dev_flags", 24, 4, "u"}, {"medium", 28, 4, "u"}, {"max_pkt_per_msg", 32, 4, "u"}, {"max_xfer_size", 36, 4, "u"}, {"pkt_alignment_factor", 40, 4, "u"}, {"af_list_offset", 44, 4, "u"}, {"af_list_size", 48, 4, "u"} },
  ["rndis_initialize_request"] = { size = 24, {"msg_type", 0, 4, "u"}, {"msg_len", 4, 4, "u"}, {"req_id", 8, 4, "u"}, {"major_ver", 12, 4, "u"}, {"minor_ver", 16, 4, "u"}, {"max_xfer_size", 20, 4, "u"} },
  ["rndis_keepalive_complete"] = { size = 16, {"msg_type", 0, 4, "u"}, {"msg_len", 4, 4, "u"}, {"req_id", 8, 4, "u"}, {"status", 12, 4, "u"} },
  ["rndis_keepalive_request"] = { size = 12, {"msg_type", 0, 4, "u"}, {"msg_len", 4, 4, "u"}, {"req_id", 8, 4, "u"} },
  ["rndis_packet"] = { size = 44, {"msg_type", 0, 4, "u"}, {"msg_len", 4, 4, "u"}, {"data_offset", 8, 4, "u"}, {"data_len", 12, 4, "u"}, {"oob_data_offset", 16, 4, "u"}, {"oob_data_len", 20, 4, "u"}, {"num_oob_data_elements", 24, 4, "u"}, {"per_pkt_info_offset", 28, 4, "u"}, {"per_pkt_info_len", 32, 4, "u"}, {"vc_handle", 36, 4, "u"}, {"reserved", 40, 4, "u"} },
  ["rndis_ppi"] = { size = 12, {"size", 0, 4, "u"}, {"type", 4, 4, "u"}, {"ppi_offset", 8, 4, "u"} },
  ["rndis_query_complete"] = { size = 24, {"msg_type", 0, 4, "u"}, {"msg_len", 4, 4, "u"}, {"req_id", 8, 4, "u"}, {"status", 12, 4, "u"}, {"info_buflen", 16, 4, "u"}, {"info_buf_offset", 20, 4, "u"} },
  ["rndis_query_request"] = { size = 28, {"msg_type", 0, 4, "u"}, {"msg_len", 4, 4, "u"}, {"req_id", 8, 4, "u"}, {"oid", 12, 4, "u"}, {"info_buflen", 16, 4, "u"}, {"info_buf_offset", 20, 4, "u"}, {"dev_vc_handle", 24, 4, "u"} },
  ["rndis_reset_complete"] = { size = 16, {"msg_type", 0, 4, "u"}, {"msg_len", 4, 4, "u"}, {"status", 8, 4, "u"}, {"addressing_reset", 12, 4, "u"} },
  ["rndis_reset_request"] = { size = 12, {"msg_type", 0, 4, "u"}, {"msg_len", 4, 4, "u"}, {"reserved", 8, 4, "u"} },
  ["rndis_set_complete"] = { size = 16, {"msg_type", 0, 4, "u"}, {"msg_len", 4, 4, "u"}, {"req_id", 8, 4, "u"}, {"status", 12, 4, "u"} },
  ["rndis_set_request"] = { size = 28, {"msg_type", 0, 4, "u"}, {"msg_len", 4, 4, "u"}, {"req_id", 8, 4, "u"}, {"oid", 12, 4, "u"}, {"info_buflen", 16, 4, "u"}, {"info_buf_offset", 20, 4, "u"}, {"dev_vc_handle", 24, 4, "u"} },
  ["uvb_trace_chunk"] = { size = 16, {"source", 0, 2, "u"}, {"index", 2, 2, "u"}, {"offset", 4, 4, "u"}, {"len", 8, 4, "u"}, {"cap", 12, 4, "u"} },
  ["uvb_trace_event"] = { size = 24, {"code", 0, 4, "u"}, {"arg0", 4, 4, "u"}, {"arg1", 8, 8, "u"}, {"text_len", 16, 4, "u"}, {"reserved", 20, 4, "u"} },
  ["uvb_trace_hdr"] = { size = 32, {"version", 0, 1, "u"}, {"kind", 1, 1, "u"}, {"dir", 2, 1, "u"}, {"side", 3, 1, "u"}, {"devclass", 4, 1, "u"}, {"flags", 5, 1, "u"}, {"subchan", 6, 2, "u"}, {"relid", 8, 4, "u"}, {"pkt_len", 12, 4, "u"}, {"pkt_cap", 16, 4, "u"}, {"att_len", 20, 4, "u"}, {"att_orig", 24, 4, "u"}, {"reserved", 28, 4, "u"} },
  ["vmgpa_direct_header"] = { size = 24, {"d.type", 0, 2, "u"}, {"d.offset8", 2, 2, "u"}, {"d.len8", 4, 2, "u"}, {"d.flags", 6, 2, "u"}, {"d.trans_id", 8, 8, "u"}, {"reserved", 16, 4, "u"}, {"range_cnt", 20, 4, "u"} },
  ["vmpacket_descriptor"] = { size = 16, {"type", 0, 2, "u"}, {"offset8", 2, 2, "u"}, {"len8", 4, 2, "u"}, {"flags", 6, 2, "u"}, {"trans_id", 8, 8, "u"} },
  ["vmtransfer_page_header"] = { size = 24, {"d.type", 0, 2, "u"}, {"d.offset8", 2, 2, "u"}, {"d.len8", 4, 2, "u"}, {"d.flags", 6, 2, "u"}, {"d.trans_id", 8, 8, "u"}, {"xfer_pageset_id", 16, 2, "u"}, {"sender_owns_set", 18, 1, "u"}, {"reserved", 19, 1, "u"}, {"range_cnt", 20, 4, "u"} },
  ["vstor_channel_properties"] = { size = 24, {"reserved", 0, 4, "u"}, {"max_channel_cnt", 4, 2, "u"}, {"reserved1", 6, 2, "u"}, {"flags", 8, 4, "u"}, {"max_transfer_bytes", 12, 4, "u"}, {"reserved2", 16, 8, "u"} },
  ["vstor_protocol_version"] = { size = 4, {"major_minor", 0, 2, "u"}, {"revision", 2, 2, "u"} },
  ["vstor_srb"] = { size = 52, {"length", 0, 2, "u"}, {"srb_status", 2, 1, "u"}, {"scsi_status", 3, 1, "u"}, {"port_number", 4, 1, "u"}, {"path_id", 5, 1, "u"}, {"target_id", 6, 1, "u"}, {"lun", 7, 1, "u"}, {"cdb_length", 8, 1, "u"}, {"sense_info_length", 9, 1, "u"}, {"data_in", 10, 1, "u"}, {"reserved", 11, 1, "u"}, {"data_transfer_length", 12, 4, "u"}, {"payload", 16, 20, "b"}, {"reserve", 36, 2, "u"}, {"queue_tag", 38, 1, "u"}, {"queue_action", 39, 1, "u"}, {"srb_flags", 40, 4, "u"}, {"time_out_value", 44, 4, "u"}, {"queue_sort_key", 48, 4, "u"} },
}
-- END GENERATED

local band = (bit32 and bit32.band) or bit.band

-- ---- protocols and fields ------------------------------------------------------------------
local p_trace = Proto("uvmbus", "uvmbus VMBus trace")
local p_vmbus = Proto("vmbus", "VMBus packet")
local p_nvsp = Proto("nvsp", "Hyper-V NVSP (netvsc)")
local p_rndis = Proto("hv_rndis", "Hyper-V RNDIS")
local p_vstor = Proto("vstor", "Hyper-V VSTOR (storvsc)")
local p_icmsg = Proto("icmsg", "Hyper-V integration-service message")

local F = {}
local function uf(proto_fields, abbr, name, size, vs, basefmt)
    local b = basefmt or base.DEC_HEX
    local f
    if size == 1 then f = ProtoField.uint8(abbr, name, b, vs)
    elseif size == 2 then f = ProtoField.uint16(abbr, name, b, vs)
    elseif size == 4 then f = ProtoField.uint32(abbr, name, b, vs)
    elseif size == 8 then f = ProtoField.uint64(abbr, name, b, vs)
    else f = ProtoField.bytes(abbr, name) end
    F[abbr] = f
    table.insert(proto_fields, f)
    return f
end

local DIRS = { [0] = "guest -> host", [1] = "host -> guest" }
local SIDES = { [0] = "guest", [1] = "host" }
local KINDS = { [1] = "packet", [2] = "event" }

local trace_fields, vmbus_fields, nvsp_fields, rndis_fields, vstor_fields, icmsg_fields = {}, {}, {}, {}, {}, {}
uf(trace_fields, "uvmbus.kind", "Record kind", 1, KINDS)
uf(trace_fields, "uvmbus.dir", "Direction", 1, DIRS)
uf(trace_fields, "uvmbus.side", "Recorded by", 1, SIDES)
uf(trace_fields, "uvmbus.class", "Device class", 1, CLASSES)
uf(trace_fields, "uvmbus.flags", "Flags", 1, nil, base.HEX)
uf(trace_fields, "uvmbus.subchannel", "Sub-channel index", 2)
uf(trace_fields, "uvmbus.relid", "Channel relid", 4)
uf(trace_fields, "uvmbus.pkt_len", "Packet length in the ring", 4)
uf(trace_fields, "uvmbus.att_len", "Attached bytes", 4)
uf(trace_fields, "uvmbus.att_orig", "Referenced bytes", 4)
uf(trace_fields, "uvmbus.event", "Event", 4, EVENTS)
uf(trace_fields, "uvmbus.event.arg0", "Argument 0", 4)
uf(trace_fields, "uvmbus.event.arg1", "Argument 1", 8)
F["uvmbus.event.text"] = ProtoField.string("uvmbus.event.text", "Text")
table.insert(trace_fields, F["uvmbus.event.text"])
uf(trace_fields, "uvmbus.chunk.source", "Attachment source", 2, { [1] = "transfer-page range", [2] = "send-buffer section" })
uf(trace_fields, "uvmbus.chunk.index", "Range index", 2)
uf(trace_fields, "uvmbus.chunk.offset", "Buffer offset", 4)
uf(trace_fields, "uvmbus.chunk.len", "Referenced length", 4)
uf(trace_fields, "uvmbus.chunk.cap", "Captured length", 4)

uf(vmbus_fields, "vmbus.type", "Packet type", 2, PKT_TYPES)
uf(vmbus_fields, "vmbus.offset8", "Header length / 8", 2)
uf(vmbus_fields, "vmbus.len8", "Packet length / 8", 2)
uf(vmbus_fields, "vmbus.flags", "Flags", 2, { [0] = "none", [1] = "completion requested" }, base.HEX)
uf(vmbus_fields, "vmbus.trans_id", "Transaction id", 8, nil, base.HEX)
uf(vmbus_fields, "vmbus.pageset", "Transfer page set id", 2, nil, base.HEX)
uf(vmbus_fields, "vmbus.sender_owns", "Sender owns set", 1)
uf(vmbus_fields, "vmbus.range_count", "Range count", 4)
uf(vmbus_fields, "vmbus.range.byte_count", "Range byte count", 4)
uf(vmbus_fields, "vmbus.range.byte_offset", "Range byte offset", 4)
uf(vmbus_fields, "vmbus.gpa.pfn", "PFN", 8, nil, base.HEX)
F["vmbus.response_to"] = ProtoField.framenum("vmbus.response_to", "Completion of frame")
F["vmbus.response_in"] = ProtoField.framenum("vmbus.response_in", "Completed in frame")
table.insert(vmbus_fields, F["vmbus.response_to"])
table.insert(vmbus_fields, F["vmbus.response_in"])

uf(nvsp_fields, "nvsp.type", "Message type", 4, NVSP_TYPES)
uf(nvsp_fields, "nvsp.status_name", "Status", 4, NVSP_STATUS)
uf(rndis_fields, "hv_rndis.type", "Message type", 4, RNDIS_TYPES, base.HEX)
uf(rndis_fields, "hv_rndis.len", "Message length", 4)
uf(rndis_fields, "hv_rndis.oid", "OID", 4, OIDS, base.HEX)
uf(rndis_fields, "hv_rndis.status", "Status", 4, RNDIS_STATUS, base.HEX)
uf(rndis_fields, "hv_rndis.ppi.type", "Per-packet info type", 4, PPI_TYPES, base.HEX)
uf(rndis_fields, "hv_rndis.ppi.size", "Per-packet info size", 4)
uf(rndis_fields, "hv_rndis.ppi.value", "Per-packet info value", 4, nil, base.HEX)
F["hv_rndis.response_to"] = ProtoField.framenum("hv_rndis.response_to", "Answer to request in frame")
table.insert(rndis_fields, F["hv_rndis.response_to"])
uf(vstor_fields, "vstor.operation", "Operation", 4, VSTOR_OPS)
uf(vstor_fields, "vstor.flags", "Flags", 4, nil, base.HEX)
uf(vstor_fields, "vstor.status", "Status (NTSTATUS)", 4, nil, base.HEX)
uf(vstor_fields, "vstor.srb_status_name", "SRB status", 1, SRB_STATUS, base.HEX)
uf(vstor_fields, "vstor.scsi_opcode", "SCSI command", 1, SCSI_OPS, base.HEX)
F["vstor.cdb"] = ProtoField.bytes("vstor.cdb", "CDB")
F["vstor.sense"] = ProtoField.bytes("vstor.sense", "Sense data")
table.insert(vstor_fields, F["vstor.cdb"])
table.insert(vstor_fields, F["vstor.sense"])
uf(vstor_fields, "vstor.sense_key", "Sense key", 1)
uf(vstor_fields, "vstor.asc", "Additional sense code", 1, nil, base.HEX)
uf(vstor_fields, "vstor.ascq", "Additional sense code qualifier", 1, nil, base.HEX)

-- generated per-struct fields: <proto>.<struct>.<field>
local function struct_proto(sname)
    if sname:find("^nvsp_") then return "nvsp", nvsp_fields end
    if sname:find("^rndis_") then return "hv_rndis", rndis_fields end
    if sname:find("^vstor_") then return "vstor", vstor_fields end
    if sname:find("^uvb_") then return "uvmbus", trace_fields end
    if sname:find("^ic_") then return "icmsg", icmsg_fields end
    return "vmbus", vmbus_fields
end
for sname, lay in pairs(LAYOUT) do
    local pname, list = struct_proto(sname)
    for _, fd in ipairs(lay) do
        local abbr = pname .. "." .. sname .. "." .. fd[1]
        if fd[4] == "b" then uf(list, abbr, fd[1], 0) else uf(list, abbr, fd[1], fd[3]) end
    end
end

p_trace.fields = trace_fields
p_vmbus.fields = vmbus_fields
p_nvsp.fields = nvsp_fields
p_rndis.fields = rndis_fields
p_vstor.fields = vstor_fields
p_icmsg.fields = icmsg_fields

local E = {
    short = ProtoExpert.new("uvmbus.short", "Record shorter than its header says", expert.group.PROTOCOL, expert.severity.ERROR),
    len = ProtoExpert.new("vmbus.bad_length", "Lengths do not add up", expert.group.PROTOCOL, expert.severity.ERROR),
    unknown = ProtoExpert.new("uvmbus.unknown", "Unknown message type", expert.group.PROTOCOL, expert.severity.WARN),
    lost = ProtoExpert.new("uvmbus.att_lost", "Referenced bytes outside the known buffers", expert.group.PROTOCOL, expert.severity.WARN),
    trunc = ProtoExpert.new("uvmbus.truncated", "Referenced bytes cut at the snap length", expert.group.PROTOCOL, expert.severity.NOTE),
    unpaired = ProtoExpert.new("vmbus.unpaired", "Completion without a request", expert.group.SEQUENCE, expert.severity.NOTE),
    srb = ProtoExpert.new("vstor.error", "SRB or SCSI status reports an error", expert.group.RESPONSE_CODE, expert.severity.WARN),
}
p_trace.experts = { E.short, E.len, E.unknown, E.lost, E.trunc, E.unpaired, E.srb }

local eth = Dissector.get("eth_withoutfcs")

-- ---- helpers ----------------------------------------------------------------------------------
local function u(tvb, off, size)
    if size == 8 then return tvb(off, 8):le_uint64() end
    return tvb(off, size):le_uint()
end

-- add a generated struct at `off`; returns {field = value} for the fields that fit
local function add_struct(tree, tvb, off, sname, skip)
    local lay = LAYOUT[sname]
    local pname = struct_proto(sname)
    local vals = {}
    for _, fd in ipairs(lay) do
        local name, o, z, k = fd[1], fd[2], fd[3], fd[4]
        if off + o + z <= tvb:len() then
            if not (skip and skip[name]) then
                tree:add_le(F[pname .. "." .. sname .. "." .. name], tvb(off + o, z))
            end
            if k == "u" and z <= 4 then vals[name] = tvb(off + o, z):le_uint() end
        end
    end
    return vals
end

local function name_of(t, v, fmt) return t[v] or string.format(fmt or "%d", v) end

-- ---- pairing state (first pass fills it; later passes only read) ---------------------------------
local pending, pair, answer, rndis_pending, rndis_pair = {}, {}, {}, {}, {}
function p_trace.init()
    pending, pair, answer, rndis_pending, rndis_pair = {}, {}, {}, {}, {}
end

-- ---- RNDIS -----------------------------------------------------------------------------------------
local function dissect_rndis(tvb, pinfo, tree, chunk_complete, key)
    if tvb:len() < 8 then return nil end
    local t = tvb(0, 4):le_uint()
    local mlen = tvb(4, 4):le_uint()
    local sub = tree:add(p_rndis, tvb(), "RNDIS " .. name_of(RNDIS_TYPES, t, "0x%08x"))
    sub:add_le(F["hv_rndis.type"], tvb(0, 4))
    sub:add_le(F["hv_rndis.len"], tvb(4, 4))
    local label = "RNDIS " .. name_of(RNDIS_TYPES, t, "0x%08x")
    if chunk_complete and mlen > tvb:len() then
        sub:add_proto_expert_info(E.len, string.format("message length %d but only %d bytes referenced", mlen, tvb:len()))
    end
    local sname = RNDIS_STRUCT[t]
    if not sname then
        sub:add_proto_expert_info(E.unknown, string.format("unknown RNDIS message type 0x%08x", t))
        return label
    end
    local v = add_struct(sub, tvb, 0, sname, { msg_type = true, msg_len = true })
    if v.oid then
        sub:add_le(F["hv_rndis.oid"], tvb(12, 4))
        label = label .. " " .. name_of(OIDS, v.oid, "OID 0x%08x")
    end
    if v.status and (band(t, C.RNDIS_MSG_COMPLETION) ~= 0 or t == C.RNDIS_MSG_INDICATE) then
        local so = (t == C.RNDIS_MSG_INDICATE) and 8 or 12
        if so + 4 <= tvb:len() then sub:add_le(F["hv_rndis.status"], tvb(so, 4)) end
        if t == C.RNDIS_MSG_INDICATE then label = label .. " " .. name_of(RNDIS_STATUS, v.status, "0x%08x") end
    end
    -- request/answer pairing by req_id
    if v.req_id and t ~= C.RNDIS_MSG_PACKET and t ~= C.RNDIS_MSG_INDICATE then
        local k = key .. ":" .. v.req_id
        if not pinfo.visited then
            if band(t, C.RNDIS_MSG_COMPLETION) == 0 then rndis_pending[k] = pinfo.number
            elseif rndis_pending[k] then rndis_pair[pinfo.number] = rndis_pending[k]; rndis_pending[k] = nil end
        end
        if rndis_pair[pinfo.number] then sub:add(F["hv_rndis.response_to"], rndis_pair[pinfo.number]) end
    end
    if t == C.RNDIS_MSG_PACKET and v.data_offset then
        -- per-packet info
        local po, pl = 8 + (v.per_pkt_info_offset or 0), v.per_pkt_info_len or 0
        local pend = math.min(po + pl, tvb:len())
        while pl > 0 and po + 12 <= pend do
            local size = tvb(po, 4):le_uint()
            local ptree = sub:add(tvb(po, math.min(math.max(size, 12), pend - po)), "Per-packet info " ..
                name_of(PPI_TYPES, band(tvb(po + 4, 4):le_uint(), 0x7fffffff), "0x%x"))
            ptree:add_le(F["hv_rndis.ppi.size"], tvb(po, 4))
            ptree:add_le(F["hv_rndis.ppi.type"], tvb(po + 4, 4))
            local voff = tvb(po + 8, 4):le_uint()
            if po + voff + 4 <= pend and voff >= 12 then ptree:add_le(F["hv_rndis.ppi.value"], tvb(po + voff, 4)) end
            if size < 12 then
                ptree:add_proto_expert_info(E.len, "per-packet info size below its 12-byte header")
                break
            end
            po = po + size
        end
        local fo, fl = 8 + v.data_offset, v.data_len or 0
        if fl > 0 and fo < tvb:len() then
            local avail = math.min(fl, tvb:len() - fo)
            if avail == fl and eth then
                eth:call(tvb(fo, fl):tvb(), pinfo, tree)
            else
                sub:add(tvb(fo, avail), string.format("Frame: %d of %d bytes captured", avail, fl))
            end
        end
    end
    return label
end

-- ---- NVSP ------------------------------------------------------------------------------------------
local function dissect_nvsp(tvb, off, pinfo, tree, dir, is_comp)
    if tvb:len() - off < 4 then
        if not is_comp then tree:add_proto_expert_info(E.len, "NVSP message shorter than its type") end
        return "NVSP (empty)"
    end
    local t = tvb(off, 4):le_uint()
    local sub = tree:add(p_nvsp, tvb(off), "NVSP " .. name_of(NVSP_TYPES, t))
    sub:add_le(F["nvsp.type"], tvb(off, 4))
    local sname = NVSP_STRUCT[t]
    if t == C.NVSP_MSG5_TYPE_SUBCHANNEL and dir == C.UVB_TRACE_DIR_H2G then sname = "nvsp_subchannel_complete" end
    if not sname then
        sub:add_proto_expert_info(E.unknown, string.format("unknown NVSP message type %d", t))
        return "NVSP " .. name_of(NVSP_TYPES, t)
    end
    local v = add_struct(sub, tvb, off, sname, { msg_type = true })
    if v.status and LAYOUT[sname] then
        for _, fd in ipairs(LAYOUT[sname]) do
            if fd[1] == "status" and off + fd[2] + 4 <= tvb:len() then sub:add_le(F["nvsp.status_name"], tvb(off + fd[2], 4)) end
        end
    end
    return "NVSP " .. name_of(NVSP_TYPES, t)
end

-- ---- VSTOR -----------------------------------------------------------------------------------------
local function dissect_vstor(tvb, off, pinfo, tree, dir)
    local avail = tvb:len() - off
    if avail < 12 then
        tree:add_proto_expert_info(E.len, "VSTOR packet shorter than its 12-byte header")
        return "VSTOR (short)"
    end
    local op = tvb(off, 4):le_uint()
    local sub = tree:add(p_vstor, tvb(off), "VSTOR " .. name_of(VSTOR_OPS, op))
    sub:add_le(F["vstor.operation"], tvb(off, 4))
    sub:add_le(F["vstor.flags"], tvb(off + 4, 4))
    sub:add_le(F["vstor.status"], tvb(off + 8, 4))
    local label = "VSTOR " .. name_of(VSTOR_OPS, op)
    if not VSTOR_OPS[op] then sub:add_proto_expert_info(E.unknown, string.format("unknown VSTOR operation %d", op)) end
    local b = off + 12
    local srb_len = (avail >= 14) and tvb(b, 2):le_uint() or 0
    if op == C.VSTOR_OP_EXECUTE_SRB or (op == C.VSTOR_OP_COMPLETE_IO and (srb_len == C.VSTOR_SRB_LEN_V1 or srb_len == C.VSTOR_SRB_LEN_V2)) then
        local srb = sub:add(tvb(b, math.min(avail - 12, LAYOUT["vstor_srb"].size)), "SCSI request block")
        local v = add_struct(srb, tvb, b, "vstor_srb")
        if b + 3 <= tvb:len() then srb:add(F["vstor.srb_status_name"], tvb(b + 2, 1), band(v.srb_status or 0, C.SRB_STATUS_MASK)) end
        local payload = b + 16
        if op == C.VSTOR_OP_EXECUTE_SRB and dir == C.UVB_TRACE_DIR_G2H then
            local cl = math.min(v.cdb_length or 0, 16)
            if cl > 0 and payload + cl <= tvb:len() then
                srb:add(F["vstor.cdb"], tvb(payload, cl))
                srb:add(F["vstor.scsi_opcode"], tvb(payload, 1))
                label = label .. " " .. name_of(SCSI_OPS, tvb(payload, 1):uint(), "SCSI 0x%02x")
            end
        else
            local srbst = band(v.srb_status or 0, C.SRB_STATUS_MASK)
            label = label .. " " .. name_of(SRB_STATUS, srbst, "SRB 0x%02x")
            if (v.scsi_status or 0) ~= 0 or (srbst ~= 1 and srbst ~= 0) then
                srb:add_proto_expert_info(E.srb, string.format("SRB status 0x%02x, SCSI status 0x%02x", v.srb_status or 0, v.scsi_status or 0))
            end
            local sl = math.min(v.sense_info_length or 0, 20)
            if (v.scsi_status or 0) ~= 0 and sl >= 14 and payload + sl <= tvb:len() then
                srb:add(F["vstor.sense"], tvb(payload, sl))
                srb:add(F["vstor.sense_key"], tvb(payload + 2, 1), band(tvb(payload + 2, 1):uint(), 15))
                srb:add(F["vstor.asc"], tvb(payload + 12, 1))
                srb:add(F["vstor.ascq"], tvb(payload + 13, 1))
            end
        end
    elseif op == C.VSTOR_OP_QUERY_PROTOCOL_VERSION then
        add_struct(sub, tvb, b, "vstor_protocol_version")
    elseif op == C.VSTOR_OP_QUERY_PROPERTIES then
        add_struct(sub, tvb, b, "vstor_channel_properties")
    end
    return label
end

-- ---- ICMSG -----------------------------------------------------------------------------------------
local function dissect_icmsg(tvb, off, pinfo, tree)
    local ps, ms = LAYOUT["ic_pipe_hdr"].size, LAYOUT["ic_msg_hdr"].size
    if tvb:len() - off < ps + ms then
        tree:add_proto_expert_info(E.len, "integration-service message shorter than its headers")
        return "ICMSG (short)"
    end
    local sub = tree:add(p_icmsg, tvb(off), "Integration-service message")
    add_struct(sub, tvb, off, "ic_pipe_hdr")
    local v = add_struct(sub, tvb, off + ps, "ic_msg_hdr", { reserved = true })
    local name = name_of(IC_TYPES, v.icmsgtype or 0, "type %d")
    if not IC_TYPES[v.icmsgtype or -1] then sub:add_proto_expert_info(E.unknown, "unknown ICMSG type " .. (v.icmsgtype or 0)) end
    return "ICMSG " .. name
end

-- ---- VMBus descriptor --------------------------------------------------------------------------------
local function dissect_vmbus(tvb, pinfo, tree, key, dir)
    local sub = tree:add(p_vmbus, tvb(), "VMBus packet")
    if tvb:len() < 16 then
        sub:add_proto_expert_info(E.short, "packet shorter than a descriptor")
        return nil
    end
    local t = tvb(0, 2):le_uint()
    local off8, len8, flags = tvb(2, 2):le_uint(), tvb(4, 2):le_uint(), tvb(6, 2):le_uint()
    sub:add_le(F["vmbus.type"], tvb(0, 2))
    sub:add_le(F["vmbus.offset8"], tvb(2, 2))
    sub:add_le(F["vmbus.len8"], tvb(4, 2))
    sub:add_le(F["vmbus.flags"], tvb(6, 2))
    sub:add_le(F["vmbus.trans_id"], tvb(8, 8))
    sub:append_text(", " .. name_of(PKT_TYPES, t, "type %d"))
    if not PKT_TYPES[t] then sub:add_proto_expert_info(E.unknown, string.format("unknown VMBus packet type %d", t)) end
    if off8 < 2 or off8 > len8 or len8 * 8 ~= tvb:len() then
        sub:add_proto_expert_info(E.len, string.format("offset8 %d len8 %d do not fit %d bytes", off8, len8, tvb:len()))
        off8 = math.max(2, math.min(off8, math.floor(tvb:len() / 8)))
    end
    if t == C.VMBUS_PKT_XFER_PAGES and tvb:len() >= 24 then
        sub:add_le(F["vmbus.pageset"], tvb(16, 2))
        sub:add_le(F["vmbus.sender_owns"], tvb(18, 1))
        sub:add_le(F["vmbus.range_count"], tvb(20, 4))
        local n = tvb(20, 4):le_uint()
        if 24 + 8 * n > off8 * 8 then sub:add_proto_expert_info(E.len, "more ranges than the header holds") end
        for i = 0, n - 1 do
            local o = 24 + 8 * i
            if o + 8 > off8 * 8 or o + 8 > tvb:len() then break end
            local r = sub:add(tvb(o, 8), string.format("Range %d: %d bytes at %d", i, tvb(o, 4):le_uint(), tvb(o + 4, 4):le_uint()))
            r:add_le(F["vmbus.range.byte_count"], tvb(o, 4))
            r:add_le(F["vmbus.range.byte_offset"], tvb(o + 4, 4))
        end
    elseif t == C.VMBUS_PKT_GPA_DIRECT and tvb:len() >= 24 then
        sub:add_le(F["vmbus.range_count"], tvb(20, 4))
        local n, o = tvb(20, 4):le_uint(), 24
        for i = 0, n - 1 do
            if o + 8 > off8 * 8 or o + 8 > tvb:len() then
                sub:add_proto_expert_info(E.len, "GPA range outside the header")
                break
            end
            local cnt, boff = tvb(o, 4):le_uint(), tvb(o + 4, 4):le_uint()
            local np = math.floor((boff + cnt + 4095) / 4096)
            local r = sub:add(tvb(o, math.min(8 + 8 * np, tvb:len() - o)), string.format("GPA range %d: %d bytes at offset %d, %d page(s)", i, cnt, boff, np))
            r:add_le(F["vmbus.range.byte_count"], tvb(o, 4))
            r:add_le(F["vmbus.range.byte_offset"], tvb(o + 4, 4))
            for j = 0, np - 1 do
                if o + 16 + 8 * j > tvb:len() then break end
                r:add_le(F["vmbus.gpa.pfn"], tvb(o + 8 + 8 * j, 8))
            end
            o = o + 8 + 8 * np
        end
    end
    -- pairing: a request asks for completion; the completion comes back the other way
    local tid = tostring(tvb(8, 8):le_uint64())
    if not pinfo.visited then
        if band(flags, C.VMBUS_PKT_FLAG_COMPLETION_REQUESTED) ~= 0 then
            pending[key .. ":" .. dir .. ":" .. tid] = pinfo.number
        elseif t == C.VMBUS_PKT_COMP then
            local k = key .. ":" .. (1 - dir) .. ":" .. tid
            if pending[k] then
                pair[pinfo.number] = pending[k]
                answer[pending[k]] = pinfo.number
                pending[k] = nil
            end
        end
    end
    if pair[pinfo.number] then sub:add(F["vmbus.response_to"], pair[pinfo.number])
    elseif t == C.VMBUS_PKT_COMP and pinfo.visited then sub:add_proto_expert_info(E.unpaired) end
    if answer[pinfo.number] then sub:add(F["vmbus.response_in"], answer[pinfo.number]) end
    return off8 * 8, t, flags
end

-- ---- the trace record --------------------------------------------------------------------------------
function p_trace.dissector(tvb, pinfo, tree)
    pinfo.cols.protocol = "VMBus"
    local root = tree:add(p_trace, tvb(), "uvmbus trace record")
    local HS = LAYOUT["uvb_trace_hdr"].size
    if tvb:len() < HS then
        root:add_proto_expert_info(E.short, "record shorter than the trace header")
        return
    end
    local h = add_struct(root, tvb, 0, "uvb_trace_hdr", { kind = true, dir = true, side = true, devclass = true,
        subchan = true, relid = true, version = true, reserved = true })
    root:add(F["uvmbus.kind"], tvb(1, 1))
    root:add(F["uvmbus.dir"], tvb(2, 1))
    root:add(F["uvmbus.side"], tvb(3, 1))
    root:add(F["uvmbus.class"], tvb(4, 1))
    root:add_le(F["uvmbus.subchannel"], tvb(6, 2))
    root:add_le(F["uvmbus.relid"], tvb(8, 4))
    local arrow = (h.dir == C.UVB_TRACE_DIR_G2H) and "G->H" or "H->G"
    local cls = CLASSES[h.devclass] or "vmbus"
    local where = string.format("%s %s/%d.%d", SIDES[h.side] or "?", cls, h.relid, h.subchan)
    pinfo.cols.src = (h.dir == C.UVB_TRACE_DIR_G2H) and "guest" or "host"
    pinfo.cols.dst = (h.dir == C.UVB_TRACE_DIR_G2H) and "host" or "guest"
    if h.kind == C.UVB_TRACE_KIND_EVENT then
        local ES = LAYOUT["uvb_trace_event"].size
        if tvb:len() < HS + ES then
            root:add_proto_expert_info(E.short, "event shorter than its header")
            return
        end
        local ev = add_struct(root, tvb, HS, "uvb_trace_event")
        root:add_le(F["uvmbus.event"], tvb(HS, 4))
        local tl = math.min(ev.text_len or 0, tvb:len() - HS - ES)
        local text = ""
        if tl > 0 then
            root:add(F["uvmbus.event.text"], tvb(HS + ES, tl))
            text = " " .. tvb(HS + ES, tl):string()
        end
        pinfo.cols.info = string.format("%s EVENT %s arg %d%s", where, name_of(EVENTS, ev.code), ev.arg0 or 0, text)
        return
    end
    if HS + h.pkt_cap + h.att_len > tvb:len() then
        root:add_proto_expert_info(E.short, string.format("header claims %d + %d bytes, record holds %d",
            h.pkt_cap, h.att_len, tvb:len() - HS))
        return
    end
    if band(h.flags, C.UVB_TRACE_F_ATT_LOST) ~= 0 then root:add_proto_expert_info(E.lost) end
    if band(h.flags, C.UVB_TRACE_F_ATT_TRUNC) ~= 0 then root:add_proto_expert_info(E.trunc) end
    local ptvb = tvb(HS, h.pkt_cap):tvb()
    local key = h.side .. ":" .. h.relid
    local poff, ptype = dissect_vmbus(ptvb, pinfo, root, key, h.dir)
    local labels = {}
    if poff then
        if h.devclass == C.UVB_TRACE_CLASS_NET then
            table.insert(labels, dissect_nvsp(ptvb, poff, pinfo, root, h.dir, ptype == C.VMBUS_PKT_COMP))
        elseif h.devclass == C.UVB_TRACE_CLASS_SCSI then
            table.insert(labels, dissect_vstor(ptvb, poff, pinfo, root, h.dir))
        elseif h.devclass == C.UVB_TRACE_CLASS_IC then
            table.insert(labels, dissect_icmsg(ptvb, poff, pinfo, root))
        end
    end
    -- attachments: the bytes the packet points at
    local CS = LAYOUT["uvb_trace_chunk"].size
    local o, stop = HS + h.pkt_cap, HS + h.pkt_cap + h.att_len
    while o + CS <= stop do
        local c = add_struct(root, tvb, o, "uvb_trace_chunk")
        if o + CS + c.cap > stop then
            root:add_proto_expert_info(E.len, "attachment chunk runs past the record")
            break
        end
        -- a send section or receive range may hold several RNDIS messages back to back
        local m, mend = o + CS, o + CS + c.cap
        while h.devclass == C.UVB_TRACE_CLASS_NET and m + 8 <= mend do
            local mlen = tvb(m + 4, 4):le_uint()
            local take = math.min(mlen, mend - m)
            if mlen < 8 then take = mend - m end
            local l = dissect_rndis(tvb(m, take):tvb(), pinfo, root, c.cap == c.len, key)
            if l then table.insert(labels, l) end
            if mlen < 8 then break end
            m = m + mlen
        end
        o = o + CS + c.cap
    end
    pinfo.cols.protocol = "VMBus"
    local tid = tvb(HS + 8, 8):le_uint64()
    pinfo.cols.info = string.format("%s %s %s tid=0x%s %s", where, arrow, name_of(PKT_TYPES, ptype or 0, "?"),
        tid:tohex():gsub("^0+(.)", "%1"), table.concat(labels, " / "))
end

DissectorTable.get("wtap_encap"):add(wtap_encaps and wtap_encaps.USER0 or wtap.USER0, p_trace)
