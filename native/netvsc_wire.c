/*
 * Layout pins for native/netvsc_wire.h: sizes and offsets from the tables of
 * ../shared/reference/netvsc.md (§2.3, §2.4, §4.1, §4.3, §4.4, §4.6–4.8).
 * This file has no code; a wrong layout fails the build.
 */
#include "uvmbus.h"

#define OFF(s, f, v) _Static_assert(offsetof(struct s, f) == (v), #s "." #f " offset")
#define SIZE(s, v) _Static_assert(sizeof(struct s) == (v), #s " size")

/* NVSP (§2.3, §2.4) */
SIZE(nvsp_message, 40);
SIZE(nvsp_init, 12);
OFF(nvsp_init, min_protocol_ver, 4);
OFF(nvsp_init, max_protocol_ver, 8);
SIZE(nvsp_init_complete, 16);
OFF(nvsp_init_complete, negotiated_protocol_ver, 4);
OFF(nvsp_init_complete, max_mdl_chain_len, 8);
OFF(nvsp_init_complete, status, 12);
OFF(nvsp_send_ndis_ver, ndis_major_ver, 4);
OFF(nvsp_send_ndis_ver, ndis_minor_ver, 8);
OFF(nvsp_send_recv_buf, gpadl_handle, 4);
OFF(nvsp_send_recv_buf, id, 8);
SIZE(nvsp_send_recv_buf_complete, 28);
OFF(nvsp_send_recv_buf_complete, status, 4);
OFF(nvsp_send_recv_buf_complete, num_sections, 8);
OFF(nvsp_send_recv_buf_complete, section.offset, 12);
OFF(nvsp_send_recv_buf_complete, section.sub_alloc_size, 16);
OFF(nvsp_send_recv_buf_complete, section.num_sub_allocs, 20);
OFF(nvsp_send_recv_buf_complete, section.end_offset, 24);
OFF(nvsp_revoke_buf, id, 4);
OFF(nvsp_send_send_buf, gpadl_handle, 4);
OFF(nvsp_send_send_buf, id, 8);
OFF(nvsp_send_send_buf_complete, status, 4);
OFF(nvsp_send_send_buf_complete, section_size, 8);
SIZE(nvsp_send_rndis_pkt, 16);
OFF(nvsp_send_rndis_pkt, channel_type, 4);
OFF(nvsp_send_rndis_pkt, send_buf_section_index, 8);
OFF(nvsp_send_rndis_pkt, send_buf_section_size, 12);
SIZE(nvsp_send_rndis_pkt_complete, 8);
OFF(nvsp_send_rndis_pkt_complete, status, 4);
SIZE(nvsp_send_ndis_config, 20);
OFF(nvsp_send_ndis_config, mtu, 4);
OFF(nvsp_send_ndis_config, capability, 12);
OFF(nvsp_vf_association, allocated, 4);
OFF(nvsp_vf_association, serial, 8);
OFF(nvsp_switch_data_path, active_datapath, 4);
OFF(nvsp_oid_query_ex, oid, 8);
OFF(nvsp_oid_query_ex_complete, bytes, 8);
OFF(nvsp_subchannel_request, op, 4);
OFF(nvsp_subchannel_request, num_subchannels, 8);
OFF(nvsp_subchannel_complete, status, 4);
OFF(nvsp_subchannel_complete, num_subchannels, 8);
SIZE(nvsp_send_indirection_table, 12);
OFF(nvsp_send_indirection_table, count, 4);
OFF(nvsp_send_indirection_table, offset, 8);

/* RNDIS (§4.1, §4.3) */
SIZE(rndis_msg_header, 8);
SIZE(rndis_packet, 44);
OFF(rndis_packet, data_offset, 8);
OFF(rndis_packet, data_len, 12);
OFF(rndis_packet, oob_data_offset, 16);
OFF(rndis_packet, oob_data_len, 20);
OFF(rndis_packet, num_oob_data_elements, 24);
OFF(rndis_packet, per_pkt_info_offset, 28);
OFF(rndis_packet, per_pkt_info_len, 32);
OFF(rndis_packet, vc_handle, 36);
OFF(rndis_packet, reserved, 40);
SIZE(rndis_initialize_request, 24);
SIZE(rndis_initialize_complete, 52);
OFF(rndis_initialize_complete, max_pkt_per_msg, 32);
OFF(rndis_initialize_complete, pkt_alignment_factor, 40);
SIZE(rndis_halt_request, 12);
SIZE(rndis_query_request, 28);
OFF(rndis_query_request, info_buf_offset, 20);
SIZE(rndis_query_complete, 24);
OFF(rndis_query_complete, info_buf_offset, 20);
SIZE(rndis_set_request, 28);
SIZE(rndis_config_parameter_info, 20);
OFF(rndis_config_parameter_info, value_length, 16);
SIZE(rndis_set_complete, 16);
SIZE(rndis_reset_request, 12);
SIZE(rndis_reset_complete, 16);
SIZE(rndis_indicate_status, 20);
OFF(rndis_indicate_status, status_buf_offset, 16);
SIZE(rndis_keepalive_request, 12);
SIZE(rndis_keepalive_complete, 16);

/* PPI (§4.4) */
SIZE(rndis_ppi, 12);
SIZE(rndis_ppi_u32, 16);
SIZE(rndis_pktinfo_id, 4);

/* NDIS objects (§4.6–4.8) */
SIZE(ndis_object_header, 4);
SIZE(ndis_offload, 156);
OFF(ndis_offload, csum, 4);
OFF(ndis_offload, lsov1, 36);
OFF(ndis_offload, ipsecv1, 52);
OFF(ndis_offload, lsov2, 80);
OFF(ndis_offload, flags, 108);
OFF(ndis_offload, ipsecv2, 112);
OFF(ndis_offload, rsc, 144);
OFF(ndis_offload, encap_gre, 148);
SIZE(ndis_offload_params, 28);
OFF(ndis_offload_params, ip_v4_csum, 4);
OFF(ndis_offload_params, tcp_ip_v4_csum, 5);
OFF(ndis_offload_params, udp_ip_v4_csum, 6);
OFF(ndis_offload_params, tcp_ip_v6_csum, 7);
OFF(ndis_offload_params, udp_ip_v6_csum, 8);
OFF(ndis_offload_params, lso_v1, 9);
OFF(ndis_offload_params, ipsec_v1, 10);
OFF(ndis_offload_params, lso_v2_ipv4, 11);
OFF(ndis_offload_params, lso_v2_ipv6, 12);
OFF(ndis_offload_params, tcp_connection_ip_v4, 13);
OFF(ndis_offload_params, tcp_connection_ip_v6, 14);
OFF(ndis_offload_params, flags, 16);
OFF(ndis_offload_params, ipsec_v2, 20);
OFF(ndis_offload_params, ipsec_v2_ip_v4, 21);
OFF(ndis_offload_params, rsc_ip_v4, 22);
OFF(ndis_offload_params, rsc_ip_v6, 23);
OFF(ndis_offload_params, encapsulated_packet_task_offload, 24);
OFF(ndis_offload_params, encapsulation_types, 25);
SIZE(ndis_recv_scale_cap, 18);
OFF(ndis_recv_scale_cap, cap_flags, 4);
OFF(ndis_recv_scale_cap, num_int_msg, 8);
OFF(ndis_recv_scale_cap, num_recv_que, 12);
OFF(ndis_recv_scale_cap, num_indirect_tabent, 16);
SIZE(ndis_recv_scale_param, 40);
OFF(ndis_recv_scale_param, flags, 4);
OFF(ndis_recv_scale_param, base_cpu_number, 6);
OFF(ndis_recv_scale_param, hashinfo, 8);
OFF(ndis_recv_scale_param, indirect_tabsize, 12);
OFF(ndis_recv_scale_param, indirect_taboffset, 16);
OFF(ndis_recv_scale_param, hashkey_size, 20);
OFF(ndis_recv_scale_param, hashkey_offset, 24);
OFF(ndis_recv_scale_param, processor_masks_offset, 28);
OFF(ndis_recv_scale_param, num_processor_masks, 32);
OFF(ndis_recv_scale_param, processor_masks_entry_size, 36);
