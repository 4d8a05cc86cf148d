/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* process.bpf.c: selection follows processes, in the kernel, before they can
 * run a single instruction of the new image or child:
 *  - exec of a selected executable selects the tgid (sched_process_exec),
 *  - a new process (not a thread) forked by a selected tgid is selected
 *    (sched_process_fork),
 *  - the tgid is forgotten when its last thread exits, so a recycled pid
 *    cannot select a stranger (sched_process_exit).
 * Raw tracepoints: they need no tracefs and read the task/bprm pointers
 * directly. Kernel structs are read with CO-RE, so only the fields used are
 * declared here (relocated against the running kernel's BTF at load). */
#include "select.h"

struct super_block {
	__u32 s_dev;
} __attribute__((preserve_access_index));

struct inode {
	unsigned long i_ino;
	struct super_block *i_sb;
} __attribute__((preserve_access_index));

struct file {
	struct inode *f_inode;
} __attribute__((preserve_access_index));

struct linux_binprm {
	struct file *file;
} __attribute__((preserve_access_index));

typedef struct {
	int counter;
} kya_atomic_t;

struct signal_struct {
	kya_atomic_t live;
} __attribute__((preserve_access_index));

struct task_struct {
	int pid;
	int tgid;
	struct signal_struct *signal;
} __attribute__((preserve_access_index));

static __always_inline void kya_select_tgid(__u32 tgid, __u8 reason, __u32 counter)
{
	long err = bpf_map_update_elem(&kya_sel_tgids, &tgid, &reason, BPF_NOEXIST);

	if (err == 0)
		kya_count(counter);
	else if (err != -KYA_EEXIST)
		kya_map_failed(KYA_MAP_SEL_TGIDS, err);
}

SEC("raw_tracepoint/sched_process_exec")
int kya_exec(struct bpf_raw_tracepoint_args *ctx)
{
	struct linux_binprm *bprm = (struct linux_binprm *)ctx->args[2];
	struct kya_exe_key k = {};
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;

	k.ino = BPF_CORE_READ(bprm, file, f_inode, i_ino);
	k.dev = BPF_CORE_READ(bprm, file, f_inode, i_sb, s_dev);
	if (!bpf_map_lookup_elem(&kya_exes, &k))
		return 0;
	if (bpf_map_lookup_elem(&kya_sel_tgids, &tgid))
		return 0;
	kya_select_tgid(tgid, KYA_SEL_EXEC, KYA_CNT_SELECTED_EXEC);
	kya_emit(KYA_EV_EXE_SELECTED, 0, k.dev, k.ino);
	return 0;
}

SEC("raw_tracepoint/sched_process_fork")
int kya_fork(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *parent = (struct task_struct *)ctx->args[0];
	struct task_struct *child = (struct task_struct *)ctx->args[1];
	__u32 child_pid = BPF_CORE_READ(child, pid);
	__u32 child_tgid = BPF_CORE_READ(child, tgid);
	__u32 parent_tgid;

	if (child_pid != child_tgid)
		return 0; /* a new thread: covered by its tgid already */
	parent_tgid = BPF_CORE_READ(parent, tgid);
	if (!bpf_map_lookup_elem(&kya_sel_tgids, &parent_tgid))
		return 0;
	kya_select_tgid(child_tgid, KYA_SEL_FORK, KYA_CNT_SELECTED_FORK);
	return 0;
}

SEC("raw_tracepoint/sched_process_exit")
int kya_exit(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *task = (struct task_struct *)ctx->args[0];
	__u32 tgid;

	/* signal->live reaches 0 when the last thread of the group exits
	 * (decremented before this tracepoint fires). */
	if (BPF_CORE_READ(task, signal, live.counter) != 0)
		return 0;
	tgid = BPF_CORE_READ(task, tgid);
	if (bpf_map_delete_elem(&kya_sel_tgids, &tgid) == 0)
		kya_count(KYA_CNT_TGID_EXITED);
	bpf_map_delete_elem(&kya_skip_tgids, &tgid);
	return 0;
}
