/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* maps.h: every map of the kya object, declared once (BTF-defined maps).
 * Each daemon instance loads its own copy of the object, so each instance has
 * its own maps: one instance never sees or redirects another's selection. */
#ifndef KYA_MAPS_H
#define KYA_MAPS_H

#include "common.h"
#include "kya.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct kya_config);
} kya_config SEC(".maps");

/* Guarded destination ports (host byte order). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KYA_MAX_PORTS);
	__type(key, __u16);
	__type(value, __u8);
} kya_ports SEC(".maps");

/* Selected cgroup ids; a cgroup selects all its descendants. Value: the
 * selector's index (struct kya_sel). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KYA_MAX_SEL_CGROUPS);
	__type(key, __u64);
	__type(value, __u32);
} kya_sel_cgroups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KYA_MAX_SEL_UIDS);
	__type(key, __u32);
	__type(value, __u32);
} kya_sel_uids SEC(".maps");

/* Selected thread groups: the sticky set. Keyed by tgid, so every thread of
 * a selected process is selected. Not LRU: evicting an entry would silently
 * unselect an agent; a full map is counted and reported instead. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KYA_MAX_SEL_TGIDS);
	__type(key, __u32);
	__type(value, struct kya_sel);
} kya_sel_tgids SEC(".maps");

/* Thread groups that are never redirected: the daemon itself. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KYA_MAX_SKIP_TGIDS);
	__type(key, __u32);
	__type(value, __u8);
} kya_skip_tgids SEC(".maps");

/* Selected executables and scripts by (device, inode); value: the
 * selector's index. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KYA_MAX_EXES);
	__type(key, struct kya_exe_key);
	__type(value, __u32);
} kya_exes SEC(".maps");

/* tgid -> the image it runs (set at exec, inherited at fork, filled for
 * running processes by the start-up scan, removed at exit). LRU: a missing
 * entry only costs the identity's exe (userspace then says so), never a
 * selection. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, KYA_MAX_TGID_EXES);
	__type(key, __u32);
	__type(value, struct kya_exe_key);
} kya_tgid_exes SEC(".maps");

/* (device, inode) -> the path it was last exec'd by. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, KYA_MAX_EXE_PATHS);
	__type(key, struct kya_exe_key);
	__type(value, struct kya_exe_path);
} kya_exe_paths SEC(".maps");

/* FNV-1a hashes of the names a selected script is run by (the last path
 * component of the path the operator gave, and of the file it resolves to):
 * an open of a selected script selects the opener only if its command line
 * names the script. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KYA_MAX_SCRIPT_NAMES);
	__type(key, __u64);
	__type(value, __u8);
} kya_script_names SEC(".maps");

/* Per-CPU scratch space (too big for the 512-byte BPF stack). */
#define KYA_ARGV_LEN 512
struct kya_scratch {
	struct kya_exe_path path;
	__u8 argv[KYA_ARGV_LEN];
};
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct kya_scratch);
} kya_scratch SEC(".maps");

/* Socket cookie -> origin, written at connect, read by sockops and
 * getpeername, removed when the socket closes. LRU: a connect that never
 * completes leaves an entry that is simply aged out. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, KYA_MAX_SOCKETS);
	__type(key, __u64);
	__type(value, struct kya_origin);
} kya_sockets SEC(".maps");

/* Client 4-tuple -> origin, written when the redirected connection is
 * established, taken (lookup-and-delete) by the interceptor on accept. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, KYA_MAX_SOCKETS);
	__type(key, struct kya_conn_key);
	__type(value, struct kya_origin);
} kya_conns SEC(".maps");

/* Network namespaces (by cookie) other than the host's with a ready kya
 * listener. Written by userspace only. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KYA_MAX_NETNS);
	__type(key, __u64);
	__type(value, struct kya_netns);
} kya_netns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KYA_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} kya_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, KYA_RINGBUF_BYTES);
} kya_events SEC(".maps");

static __always_inline void kya_count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&kya_counters, &idx);

	if (v)
		*v += 1; /* per-CPU slot: no atomic needed */
}

static __always_inline void kya_emit(__u32 kind, __s32 err, __u64 arg0, __u64 arg1)
{
	struct kya_event *ev = bpf_ringbuf_reserve(&kya_events, sizeof(*ev), 0);
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	if (!ev) {
		kya_count(KYA_CNT_EVENTS_LOST);
		return;
	}
	ev->kind = kind;
	ev->pid = pid_tgid >> 32;
	ev->tid = (__u32)pid_tgid;
	ev->err = err;
	ev->arg0 = arg0;
	ev->arg1 = arg1;
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	bpf_ringbuf_submit(ev, 0);
}

/* A failed map update is never silent: counted and reported. */
static __always_inline void kya_map_failed(__u32 map, long err)
{
	kya_count(KYA_CNT_MAP_FULL);
	kya_emit(KYA_EV_MAP_UPDATE_FAILED, (__s32)err, map, 0);
}

#endif /* KYA_MAPS_H */
