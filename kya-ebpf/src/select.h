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

/* Records tgid in the sticky set (never the daemon's own tgid). An existing
 * entry is kept: the first selector to hold a process keeps it. */
static __always_inline void kya_select_tgid(__u32 tgid, struct kya_sel *sel, __u32 counter)
{
	long err;

	if (bpf_map_lookup_elem(&kya_skip_tgids, &tgid))
		return;
	err = bpf_map_update_elem(&kya_sel_tgids, &tgid, sel, BPF_NOEXIST);
	if (err == 0)
		kya_count(counter);
	else if (err != -KYA_EEXIST)
		kya_map_failed(KYA_MAP_SEL_TGIDS, err);
}

/* Does the current task match a uid or cgroup selector right now (its
 * cgroup or any ancestor)? Fills *sel with the selector that does. */
static __always_inline int kya_current_matches(struct kya_sel *sel)
{
	__u32 uid = (__u32)bpf_get_current_uid_gid();
	__u32 *idx;
	__u64 cg;

	idx = bpf_map_lookup_elem(&kya_sel_uids, &uid);
	if (idx) {
		sel->reason = KYA_SEL_UID;
		sel->kind = KYA_KIND_UID;
		sel->index = *idx;
		return 1;
	}
	cg = bpf_get_current_cgroup_id();
	idx = bpf_map_lookup_elem(&kya_sel_cgroups, &cg);
	/* Ancestors: level 0 is the root; a level deeper than the task's own
	 * cgroup yields 0. Bounded for the verifier. */
	for (int level = 0; !idx && level < KYA_MAX_CGROUP_DEPTH; level++) {
		cg = bpf_get_current_ancestor_cgroup_id(level);
		if (cg == 0)
			break;
		idx = bpf_map_lookup_elem(&kya_sel_cgroups, &cg);
	}
	if (!idx)
		return 0;
	sel->reason = KYA_SEL_CGROUP;
	sel->kind = KYA_KIND_CGROUP;
	sel->index = *idx;
	return 1;
}

/* Selected by the sticky tgid set, uid or cgroup. A task that matches a uid
 * or cgroup selector is recorded in the sticky set on the way, so that it
 * stays selected after it changes uid or cgroup. The daemon's own tgid is
 * never selected, even inside a selected cgroup. */
static __always_inline int kya_task_selected(void)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct kya_sel sel = {};

	if (bpf_map_lookup_elem(&kya_skip_tgids, &tgid)) {
		kya_count(KYA_CNT_SKIPPED_TGID);
		return 0;
	}
	if (bpf_map_lookup_elem(&kya_sel_tgids, &tgid))
		return 1;
	if (!kya_current_matches(&sel))
		return 0;
	kya_select_tgid(tgid, &sel, KYA_CNT_SELECTED_STICKY);
	return 1;
}

#endif /* KYA_SELECT_H */
