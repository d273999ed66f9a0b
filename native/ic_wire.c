/*
 * Layout pins for native/ic_wire.h: sizes and offsets from
 * ../shared/reference/storvsc_ic.md §7.2-7.9 and Linux's uapi hyperv.h.
 * This file has no code; a wrong layout fails the build.
 */
#include "uvmbus.h"

#define OFF(s, f, v) _Static_assert(offsetof(struct s, f) == (v), #s "." #f " offset")
#define SIZE(s, v) _Static_assert(sizeof(struct s) == (v), #s " size")

SIZE(ic_pipe_hdr, IC_PIPE_HDR_SIZE);
SIZE(ic_msg_hdr, IC_MSG_HDR_SIZE);
OFF(ic_msg_hdr, icmsgtype, 4);
OFF(ic_msg_hdr, icvermsg, 6);
OFF(ic_msg_hdr, icmsgsize, 10);
OFF(ic_msg_hdr, status, 12);
OFF(ic_msg_hdr, ictransaction_id, 16);
OFF(ic_msg_hdr, icflags, 17);
SIZE(ic_negotiate, 8);
SIZE(ic_heartbeat, 40);
SIZE(ic_shutdown, 2060);
OFF(ic_shutdown, flags, 8);
SIZE(ic_timesync, 25);
SIZE(ic_timesync_ref, 22);
OFF(ic_timesync_ref, flags, 16);
SIZE(ic_kvp_value, 2572);
OFF(ic_kvp_value, value, 524);
SIZE(ic_kvp_msg_enumerate, 2580);
SIZE(ic_kvp_msg_delete, 520);
SIZE(ic_kvp_ipaddr_value, 7426);
OFF(ic_kvp_ipaddr_value, ip_addr, 258);
SIZE(ic_kvp_ip_msg, 7428);
SIZE(ic_fcopy_hdr, 36);
SIZE(ic_fcopy_start, 1088);
OFF(ic_fcopy_start, path_name, 556);
OFF(ic_fcopy_start, copy_flags, 1076);
SIZE(ic_fcopy_write, 6196);
OFF(ic_fcopy_write, data, 52);
