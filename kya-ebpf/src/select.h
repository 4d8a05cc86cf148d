/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* select.h: is the current task selected, and is this destination guarded? */
#ifndef KYA_SELECT_H
#define KYA_SELECT_H

#include "maps.h"

static __always_inline struct kya_config *kya_cfg(void)
{
	__u32 zero = 0;
	struct kya_config *cfg = bpf_map_lookup_elem(&kya_config, &zero);

	if (!cfg || cfg->listen_port == 0)
		return 0;
	return cfg;
}

static __always_inline int kya_port_guarded(__u16 port)
{
	return bpf_map_lookup_elem(&kya_ports, &port) != 0;
}

/* Selected by tgid, uid or cgroup (the current cgroup or any ancestor). The
 * daemon's own tgid is never selected, even inside a selected cgroup. */
static __always_inline int kya_task_selected(void)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32;
	__u32 uid = (__u32)bpf_get_current_uid_gid();
	__u64 cg;

	if (bpf_map_lookup_elem(&kya_skip_tgids, &tgid)) {
		kya_count(KYA_CNT_SKIPPED_TGID);
		return 0;
	}
	if (bpf_map_lookup_elem(&kya_sel_tgids, &tgid))
		return 1;
	if (bpf_map_lookup_elem(&kya_sel_uids, &uid))
		return 1;
	cg = bpf_get_current_cgroup_id();
	if (bpf_map_lookup_elem(&kya_sel_cgroups, &cg))
		return 1;
	/* Ancestors: level 0 is the root; a level deeper than the task's own
	 * cgroup yields 0. Bounded for the verifier. */
	for (int level = 0; level < KYA_MAX_CGROUP_DEPTH; level++) {
		cg = bpf_get_current_ancestor_cgroup_id(level);
		if (cg == 0)
			break;
		if (bpf_map_lookup_elem(&kya_sel_cgroups, &cg))
			return 1;
	}
	return 0;
}

#endif /* KYA_SELECT_H */
