/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * kya.h: every BPF map key and value kya's kernel side shares with userspace.
 *
 * This header is the single source of truth for the layouts. The Rust mirrors
 * live in kya-common/src/maps.rs and a test there parses the _Static_assert
 * lines below and compares them with size_of/offset_of!, so the two cannot
 * drift silently. Keep one assertion per line, in the exact forms
 *   _Static_assert(sizeof(struct NAME) == N, "...");
 *   _Static_assert(__builtin_offsetof(struct NAME, FIELD) == N, "...");
 *
 * Only fixed-width types, explicit padding, no bitfields: the layout must be
 * identical for the BPF target and x86_64/aarch64 userspace.
 */
#ifndef KYA_H
#define KYA_H

#include <linux/types.h>

/* SO_MARK that kya's interceptor puts on its upstream sockets; such sockets
 * are never redirected (loop avoidance). Userspace default, overridable per
 * instance through kya_config.skip_mark. Its bits avoid the masks other
 * firewall users match marks with (kube-proxy 0x4000/0x8000, netavark 0x2000,
 * Cilium 0x0f00, Calico 0xffff0000, 0x1), so their rules never rewrite kya's
 * connections. */
#define KYA_SKIP_MARK 0x0000106a

#define KYA_COMM_LEN 16
/* Bytes of an executable's path kept (d_path, NUL-terminated). */
#define KYA_PATH_LEN 256
/* Deepest cgroup level that is checked against the selected cgroups. */
#define KYA_MAX_CGROUP_DEPTH 32

/* Sizes of the maps (bounded everything). */
#define KYA_MAX_PORTS 256
#define KYA_MAX_SEL_CGROUPS 1024
#define KYA_MAX_SEL_UIDS 1024
#define KYA_MAX_SEL_TGIDS 65536
#define KYA_MAX_SKIP_TGIDS 64
#define KYA_MAX_EXES 4096
#define KYA_MAX_SOCKETS 65536
/* Executable of every process (tgid), for the identity at connect time. */
#define KYA_MAX_TGID_EXES 65536
/* Paths of recently exec'd files, by (device, inode). */
#define KYA_MAX_EXE_PATHS 8192
/* Names (hashed) that selected scripts are run by. */
#define KYA_MAX_SCRIPT_NAMES 8192
/* Network namespaces other than the host's that kya serves at once. */
#define KYA_MAX_NETNS 1024
#define KYA_RINGBUF_BYTES (256 * 1024)

/* kya_config.flags: every TCP connection (SOCK_STREAM) of a selected task is
 * redirected, whatever its port; kya_ports then only names the ports where
 * other protocols (UDP, QUIC) are refused. */
#define KYA_CFG_ALL_TCP_PORTS 0x1

/* kya_config[0]: per-instance settings. listen_port == 0 disables redirection
 * (the state between load and the end of configuration). */
struct kya_config {
	__u32 listen_port; /* host byte order */
	__u32 skip_mark;
	__u32 flags; /* KYA_CFG_* */
	__u32 _reserved;
	/* The host's network namespace (where the daemon runs). A socket in
	 * another netns is redirected only if that netns is in kya_netns with a
	 * ready listener of its own (127.0.0.1 there is not the host's
	 * interceptor); otherwise its guarded connects are refused. 0 = no check
	 * (kernel without SO_NETNS_COOKIE): every socket is treated as the
	 * host's. */
	__u64 netns_cookie;
};
_Static_assert(sizeof(struct kya_config) == 24, "kya_config size");
_Static_assert(__builtin_offsetof(struct kya_config, listen_port) == 0, "kya_config.listen_port");
_Static_assert(__builtin_offsetof(struct kya_config, skip_mark) == 4, "kya_config.skip_mark");
_Static_assert(__builtin_offsetof(struct kya_config, flags) == 8, "kya_config.flags");
_Static_assert(__builtin_offsetof(struct kya_config, netns_cookie) == 16, "kya_config.netns_cookie");

/* Key of kya_exes: the executable's inode. Matching by (device, inode) rather
 * than by path means symlinks (/usr/bin/python3 -> python3.11), relative exec
 * paths, `exec -a` and /proc/self/exe re-execs all select the same binary, and
 * no path string has to be copied and compared in the kernel. The device is
 * the kernel's encoding (major << 20 | minor), which userspace converts from
 * stat's st_dev. */
struct kya_exe_key {
	__u64 dev;
	__u64 ino;
};
_Static_assert(sizeof(struct kya_exe_key) == 16, "kya_exe_key size");
_Static_assert(__builtin_offsetof(struct kya_exe_key, dev) == 0, "kya_exe_key.dev");
_Static_assert(__builtin_offsetof(struct kya_exe_key, ino) == 8, "kya_exe_key.ino");

/* Why a tgid is in kya_sel_tgids (kya_sel.reason). Once in, a process stays
 * selected until it exits, whatever cgroup, uid or image it moves to. */
#define KYA_SEL_PID 1 /* named by the operator (--pid) */
#define KYA_SEL_EXEC 2 /* exec'd a selected executable or script */
#define KYA_SEL_FORK 3 /* forked from a selected tgid */
#define KYA_SEL_SCAN 4 /* matched a selector when kya started or reloaded */
#define KYA_SEL_CGROUP 5 /* was seen in a selected cgroup */
#define KYA_SEL_UID 6 /* was seen with a selected uid */
#define KYA_SEL_SCRIPT 7 /* opened a selected script named on its command line */

/* Which kind of selector holds a selected tgid (kya_sel.kind); the index is
 * the selector's position in the operator's list of that kind, and is the
 * value userspace stores in kya_sel_cgroups, kya_sel_uids and kya_exes. */
#define KYA_KIND_PID 1
#define KYA_KIND_CGROUP 2
#define KYA_KIND_UID 3
#define KYA_KIND_EXE 4

/* In a kya_exes value: the file is a script (not ELF), run by an
 * interpreter that opens it; the rest of the value is the selector index. */
#define KYA_EXE_SCRIPT 0x80000000

/* Value of kya_sel_tgids. A child inherits its parent's kind and index. */
struct kya_sel {
	__u8 reason; /* KYA_SEL_* */
	__u8 kind; /* KYA_KIND_* */
	__u16 _pad;
	__u32 index;
};
_Static_assert(sizeof(struct kya_sel) == 8, "kya_sel size");
_Static_assert(__builtin_offsetof(struct kya_sel, reason) == 0, "kya_sel.reason");
_Static_assert(__builtin_offsetof(struct kya_sel, kind) == 1, "kya_sel.kind");
_Static_assert(__builtin_offsetof(struct kya_sel, index) == 4, "kya_sel.index");

/* Value of kya_exe_paths: the path an executable was last exec'd by
 * (bprm->interp, as the caller or the `#!` line spelled it; relative if the
 * exec was relative), NUL-terminated. */
struct kya_exe_path {
	__u8 path[KYA_PATH_LEN];
};
_Static_assert(sizeof(struct kya_exe_path) == 256, "kya_exe_path size");
_Static_assert(__builtin_offsetof(struct kya_exe_path, path) == 0, "kya_exe_path.path");

#define KYA_FAMILY_INET 4
#define KYA_FAMILY_INET6 6

/* The origin of a redirected connection: what the agent asked for and who it
 * is. Stored per socket (by cookie) at connect time and copied under the
 * client's 4-tuple once the connection is established. Everything here is
 * the connecting task's at the moment of connect: a later exec, a move to
 * another cgroup or a socket handed to another process changes nothing.
 * exe_dev/exe_ino: the image the process runs (0/0: unknown, e.g. a process
 * whose exec kya did not see and that the start-up scan missed); its path is
 * in kya_exe_paths under the same key. */
struct kya_origin {
	__u64 cgroup_id;
	__u32 pid; /* tgid */
	__u32 tid;
	__u32 uid;
	__u32 gid;
	__u8 dst_addr[16]; /* network order; IPv4 in the first 4 bytes */
	__u16 dst_port; /* host byte order */
	__u8 dst_family; /* KYA_FAMILY_* */
	__u8 _pad0;
	__u8 comm[KYA_COMM_LEN];
	__u32 _pad1;
	__u64 exe_dev; /* kernel encoding, as kya_exe_key.dev */
	__u64 exe_ino;
	/* The netns cookie of the connecting socket; 0 for the host's netns. */
	__u64 netns_cookie;
};
_Static_assert(sizeof(struct kya_origin) == 88, "kya_origin size");
_Static_assert(__builtin_offsetof(struct kya_origin, cgroup_id) == 0, "kya_origin.cgroup_id");
_Static_assert(__builtin_offsetof(struct kya_origin, pid) == 8, "kya_origin.pid");
_Static_assert(__builtin_offsetof(struct kya_origin, tid) == 12, "kya_origin.tid");
_Static_assert(__builtin_offsetof(struct kya_origin, uid) == 16, "kya_origin.uid");
_Static_assert(__builtin_offsetof(struct kya_origin, gid) == 20, "kya_origin.gid");
_Static_assert(__builtin_offsetof(struct kya_origin, dst_addr) == 24, "kya_origin.dst_addr");
_Static_assert(__builtin_offsetof(struct kya_origin, dst_port) == 40, "kya_origin.dst_port");
_Static_assert(__builtin_offsetof(struct kya_origin, dst_family) == 42, "kya_origin.dst_family");
_Static_assert(__builtin_offsetof(struct kya_origin, comm) == 44, "kya_origin.comm");
_Static_assert(__builtin_offsetof(struct kya_origin, exe_dev) == 64, "kya_origin.exe_dev");
_Static_assert(__builtin_offsetof(struct kya_origin, exe_ino) == 72, "kya_origin.exe_ino");
_Static_assert(__builtin_offsetof(struct kya_origin, netns_cookie) == 80, "kya_origin.netns_cookie");

/* Key of kya_conns: a redirected connection as the interceptor sees it on the
 * accepted socket: src = its peer (the agent), dst = its local address (the
 * listener), in the network namespace whose listener accepted it. A v4-mapped
 * IPv6 socket is keyed as IPv4, because the IPv4 listener accepts it and sees
 * plain IPv4 addresses. Two namespaces can hold the very same loopback
 * 4-tuple at once; the netns cookie keeps them apart. */
struct kya_conn_key {
	__u8 src_addr[16]; /* network order; IPv4 in the first 4 bytes, rest 0 */
	__u8 dst_addr[16];
	__u16 src_port; /* host byte order */
	__u16 dst_port; /* host byte order */
	__u8 family; /* KYA_FAMILY_* */
	__u8 _pad[3];
	__u64 netns_cookie; /* as kya_origin.netns_cookie: 0 = the host's */
};
_Static_assert(sizeof(struct kya_conn_key) == 48, "kya_conn_key size");
_Static_assert(__builtin_offsetof(struct kya_conn_key, src_addr) == 0, "kya_conn_key.src_addr");
_Static_assert(__builtin_offsetof(struct kya_conn_key, dst_addr) == 16, "kya_conn_key.dst_addr");
_Static_assert(__builtin_offsetof(struct kya_conn_key, src_port) == 32, "kya_conn_key.src_port");
_Static_assert(__builtin_offsetof(struct kya_conn_key, dst_port) == 34, "kya_conn_key.dst_port");
_Static_assert(__builtin_offsetof(struct kya_conn_key, family) == 36, "kya_conn_key.family");
_Static_assert(__builtin_offsetof(struct kya_conn_key, netns_cookie) == 40, "kya_conn_key.netns_cookie");

/* kya_netns.state: the namespace has a kya listener bound on 127.0.0.1 at
 * the instance's listen port; its selected processes are redirected there. */
#define KYA_NETNS_READY 1

/* Value of kya_netns (key: netns cookie): a network namespace other than the
 * host's that kya serves. Absent or not ready: the guarded connects of
 * selected processes in it are refused. */
struct kya_netns {
	__u32 state; /* KYA_NETNS_* */
	__u32 _reserved;
};
_Static_assert(sizeof(struct kya_netns) == 8, "kya_netns size");
_Static_assert(__builtin_offsetof(struct kya_netns, state) == 0, "kya_netns.state");

/* Indexes of the per-CPU counter array kya_counters. */
enum kya_counter {
	KYA_CNT_REDIRECTED4 = 0,
	KYA_CNT_REDIRECTED6 = 1,
	KYA_CNT_REDIRECTED_V4MAPPED = 2,
	KYA_CNT_REFUSED_DGRAM = 3,
	KYA_CNT_SKIPPED_MARK = 4,
	KYA_CNT_SKIPPED_TGID = 5,
	KYA_CNT_SELECTED_EXEC = 6,
	KYA_CNT_SELECTED_FORK = 7,
	KYA_CNT_TGID_EXITED = 8,
	KYA_CNT_MAP_FULL = 9,
	KYA_CNT_ESTABLISHED = 10,
	KYA_CNT_GETPEERNAME = 11,
	KYA_CNT_EVENTS_LOST = 12,
	KYA_CNT_REFUSED_NETNS = 13,
	KYA_CNT_SELECTED_STICKY = 14,
	KYA_CNT_SELECTED_SCRIPT = 15,
	KYA_CNT_MAX = 16,
};

/* Ring buffer event kinds. */
#define KYA_EV_MAP_UPDATE_FAILED 1 /* arg0 = KYA_MAP_* */
#define KYA_EV_EXE_SELECTED 2 /* arg0 = dev, arg1 = ino */
#define KYA_EV_REFUSED_DGRAM 3 /* arg0 = dst port, arg1 = protocol */
/* a selected process's connect in a netns kya does not serve (yet) was
 * refused: arg0 = netns cookie, arg1 = dst port */
#define KYA_EV_NETNS_UNSERVED 4
/* a task moved into a selected cgroup was selected (a container starting):
 * arg0 = its tgid; userspace looks at its network namespace at once */
#define KYA_EV_SELECTED_CGROUP 5

/* Map identifiers used in KYA_EV_MAP_UPDATE_FAILED. */
#define KYA_MAP_SOCKETS 1
#define KYA_MAP_CONNS 2
#define KYA_MAP_SEL_TGIDS 3

struct kya_event {
	__u32 kind;
	__u32 pid; /* tgid */
	__u32 tid;
	__s32 err;
	__u64 arg0;
	__u64 arg1;
	__u8 comm[KYA_COMM_LEN];
};
_Static_assert(sizeof(struct kya_event) == 48, "kya_event size");
_Static_assert(__builtin_offsetof(struct kya_event, kind) == 0, "kya_event.kind");
_Static_assert(__builtin_offsetof(struct kya_event, pid) == 4, "kya_event.pid");
_Static_assert(__builtin_offsetof(struct kya_event, tid) == 8, "kya_event.tid");
_Static_assert(__builtin_offsetof(struct kya_event, err) == 12, "kya_event.err");
_Static_assert(__builtin_offsetof(struct kya_event, arg0) == 16, "kya_event.arg0");
_Static_assert(__builtin_offsetof(struct kya_event, arg1) == 24, "kya_event.arg1");
_Static_assert(__builtin_offsetof(struct kya_event, comm) == 32, "kya_event.comm");

#endif /* KYA_H */
