/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* process.bpf.c: selection follows processes, in the kernel, before they can
 * run a single instruction of the new image or child, and it sticks:
 *  - exec of a selected executable selects the tgid (sched_process_exec);
 *  - a process that opens a selected script named on its command line is
 *    selected as open() returns, before it can read a byte of the script
 *    (sys_exit of open/openat/openat2). Every interpreter opens the script
 *    it runs, so this covers `#!/usr/bin/env node` scripts (script -> env ->
 *    node, one tgid) as well as `python3 ./agent.py`;
 *  - a process seen with a selected uid or in a selected cgroup is recorded
 *    in the sticky set at fork, exec, connect and a move into a selected
 *    cgroup (cgroup_attach_task), so it stays selected after it changes uid
 *    or cgroup;
 *  - a new process (not a thread) forked by a selected tgid is selected
 *    (sched_process_fork, in the parent's context);
 *  - the tgid is forgotten when its last thread exits, so a recycled pid
 *    cannot select a stranger (sched_process_exit).
 * The exec tracepoint also records the image every process runs (device,
 * inode, and the path it was exec'd by), which connect copies into the
 * origin of a connection.
 * Only raw tracepoints: they exist on every kernel kya supports, need no
 * tracefs, no kprobes and no BPF trampolines.
 * Kernel structs are read with CO-RE, so only the fields used are declared
 * here (relocated against the running kernel's BTF at load). */
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
	const char *interp;
} __attribute__((preserve_access_index));

struct fdtable {
	unsigned int max_fds;
	struct file **fd;
} __attribute__((preserve_access_index));

struct files_struct {
	struct fdtable *fdt;
} __attribute__((preserve_access_index));

typedef struct {
	int counter;
} kya_atomic_t;

struct signal_struct {
	kya_atomic_t live;
} __attribute__((preserve_access_index));

struct kernfs_node {
	__u64 id;
} __attribute__((preserve_access_index));

struct cgroup;

struct cgroup_subsys_state {
	struct cgroup *cgroup;
	struct cgroup_subsys_state *parent;
} __attribute__((preserve_access_index));

struct cgroup {
	struct cgroup_subsys_state self;
	struct kernfs_node *kn;
} __attribute__((preserve_access_index));

struct css_set {
	struct cgroup *dfl_cgrp;
} __attribute__((preserve_access_index));

struct mm_struct {
	unsigned long arg_start;
	unsigned long arg_end;
} __attribute__((preserve_access_index));

struct task_struct {
	int pid;
	int tgid;
	struct signal_struct *signal;
	struct css_set *cgroups;
	struct mm_struct *mm;
	struct files_struct *files;
} __attribute__((preserve_access_index));

/* The syscall number in the registers sys_exit hands over. */
#if defined(__TARGET_ARCH_x86)
struct pt_regs {
	long orig_ax;
} __attribute__((preserve_access_index));
#define KYA_SYSCALL_NR(regs) BPF_CORE_READ(regs, orig_ax)
#define KYA_NR_OPEN 2
#define KYA_NR_OPENAT 257
#elif defined(__TARGET_ARCH_arm64)
struct pt_regs {
	int syscallno;
} __attribute__((preserve_access_index));
#define KYA_SYSCALL_NR(regs) BPF_CORE_READ(regs, syscallno)
#define KYA_NR_OPEN -1 /* no open(2) on arm64 */
#define KYA_NR_OPENAT 56
#elif defined(__TARGET_ARCH_riscv)
struct pt_regs {
	unsigned long a7;
} __attribute__((preserve_access_index));
#define KYA_SYSCALL_NR(regs) BPF_CORE_READ(regs, a7)
#define KYA_NR_OPEN -1
#define KYA_NR_OPENAT 56
#else
#error "kya: unsupported target architecture"
#endif
#define KYA_NR_OPENAT2 437

/* FNV-1a, 64 bits: the hash of a file name, as userspace computes it for
 * kya_script_names. */
#define KYA_FNV_INIT 14695981039346656037ULL
#define KYA_FNV_PRIME 1099511628211ULL

static __always_inline struct kya_exe_key kya_file_key(struct file *f)
{
	struct kya_exe_key k = {};

	k.ino = BPF_CORE_READ(f, f_inode, i_ino);
	k.dev = BPF_CORE_READ(f, f_inode, i_sb, s_dev);
	return k;
}

/* Is this cgroup, or an ancestor, selected? Fills *sel if so. */
static __always_inline int kya_cgroup_selected(struct cgroup *cg, struct kya_sel *sel)
{
	for (int i = 0; i < KYA_MAX_CGROUP_DEPTH; i++) {
		struct cgroup_subsys_state *parent;
		__u64 id;
		__u32 *idx;

		if (!cg)
			return 0;
		id = BPF_CORE_READ(cg, kn, id);
		idx = bpf_map_lookup_elem(&kya_sel_cgroups, &id);
		if (idx) {
			sel->reason = KYA_SEL_CGROUP;
			sel->kind = KYA_KIND_CGROUP;
			sel->index = *idx;
			return 1;
		}
		parent = BPF_CORE_READ(cg, self.parent);
		if (!parent)
			return 0;
		cg = BPF_CORE_READ(parent, cgroup);
	}
	return 0;
}

SEC("raw_tracepoint/sched_process_exec")
int kya_exec(struct bpf_raw_tracepoint_args *ctx)
{
	struct linux_binprm *bprm = (struct linux_binprm *)ctx->args[2];
	struct kya_exe_key k = kya_file_key(BPF_CORE_READ(bprm, file));
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct kya_sel sel = {};
	__u32 *idx;

	__u32 zero = 0;
	struct kya_scratch *s;

	bpf_map_update_elem(&kya_tgid_exes, &tgid, &k, BPF_ANY);
	/* bprm->interp: the path of bprm->file as it was exec'd (for `#!`
	 * scripts, the interpreter's path as the `#!` line names it) */
	s = bpf_map_lookup_elem(&kya_scratch, &zero);
	if (s && bpf_probe_read_kernel_str(s->path.path, sizeof(s->path.path),
					   BPF_CORE_READ(bprm, interp)) > 0)
		bpf_map_update_elem(&kya_exe_paths, &k, &s->path, BPF_ANY);
	if (bpf_map_lookup_elem(&kya_sel_tgids, &tgid))
		return 0;
	idx = bpf_map_lookup_elem(&kya_exes, &k);
	if (idx) {
		sel.reason = KYA_SEL_EXEC;
		sel.kind = KYA_KIND_EXE;
		sel.index = *idx & ~KYA_EXE_SCRIPT;
		kya_select_tgid(tgid, &sel, KYA_CNT_SELECTED_EXEC);
		kya_emit(KYA_EV_EXE_SELECTED, 0, k.dev, k.ino);
		return 0;
	}
	/* the uid here is the new image's (setuid binaries) */
	if (kya_current_matches(&sel))
		kya_select_tgid(tgid, &sel, KYA_CNT_SELECTED_STICKY);
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
	struct kya_exe_key *exe;
	struct kya_sel *psel;
	struct kya_sel sel = {};

	if (child_pid != child_tgid)
		return 0; /* a new thread: covered by its tgid already */
	parent_tgid = BPF_CORE_READ(parent, tgid);
	/* until it execs, the child runs its parent's image */
	exe = bpf_map_lookup_elem(&kya_tgid_exes, &parent_tgid);
	if (exe) {
		struct kya_exe_key copy = *exe;

		bpf_map_update_elem(&kya_tgid_exes, &child_tgid, &copy, BPF_ANY);
	}
	psel = bpf_map_lookup_elem(&kya_sel_tgids, &parent_tgid);
	if (psel) {
		sel = *psel;
	} else if (kya_current_matches(&sel)) {
		/* this runs in the parent: record it too (sticky) */
		kya_select_tgid(parent_tgid, &sel, KYA_CNT_SELECTED_STICKY);
	} else if (!kya_cgroup_selected(BPF_CORE_READ(child, cgroups, dfl_cgrp), &sel)) {
		return 0; /* not even clone3(CLONE_INTO_CGROUP) into a selected one */
	}
	sel.reason = KYA_SEL_FORK;
	kya_select_tgid(child_tgid, &sel, KYA_CNT_SELECTED_FORK);
	return 0;
}

/* A task moved into a selected cgroup is recorded at once, so that moving on
 * to an unselected cgroup later does not unselect it. (Moving out of a
 * selected cgroup needs nothing: whoever is in one was recorded when it got
 * there, by fork, this hook or the start-up scan.) */
SEC("raw_tracepoint/cgroup_attach_task")
int kya_cgroup_attach(struct bpf_raw_tracepoint_args *ctx)
{
	struct cgroup *dst = (struct cgroup *)ctx->args[0];
	struct task_struct *task = (struct task_struct *)ctx->args[2];
	__u32 tgid = BPF_CORE_READ(task, tgid);
	struct kya_sel sel = {};

	if (bpf_map_lookup_elem(&kya_sel_tgids, &tgid))
		return 0;
	if (kya_cgroup_selected(dst, &sel)) {
		kya_select_tgid(tgid, &sel, KYA_CNT_SELECTED_STICKY);
		/* a container's first process gets here before it runs: tell
		 * userspace, which opens a listener in its network namespace */
		kya_emit(KYA_EV_SELECTED_CGROUP, 0, tgid, 0);
	}
	return 0;
}

/* Does the current process's command line hold an argument whose last path
 * component is one of the selected scripts' names (kya_script_names, FNV-1a
 * hashes)? One pass, no nested loop for the verifier. A command line that
 * cannot be read, or not all of it, answers yes: failing closed selects a
 * process, never lets one go. */
static __always_inline int kya_argv_names_script(struct kya_scratch *s)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	unsigned long start, end, len;
	__u64 h = KYA_FNV_INIT;

	start = BPF_CORE_READ(task, mm, arg_start);
	end = BPF_CORE_READ(task, mm, arg_end);
	if (end <= start)
		return 1;
	len = end - start;
	if (len > KYA_ARGV_LEN)
		len = KYA_ARGV_LEN;
	if (bpf_probe_read_user(s->argv, len, (void *)start) != 0)
		return 1;
	for (int i = 0; i < KYA_ARGV_LEN; i++) {
		__u8 c;

		if (i >= len)
			break;
		c = s->argv[i];
		if (c == 0) {
			if (bpf_map_lookup_elem(&kya_script_names, &h))
				return 1;
			h = KYA_FNV_INIT;
		} else if (c == '/') {
			h = KYA_FNV_INIT;
		} else {
			h = (h ^ c) * KYA_FNV_PRIME;
		}
	}
	if (bpf_map_lookup_elem(&kya_script_names, &h))
		return 1;
	return end - start > KYA_ARGV_LEN; /* not all of it was seen */
}

/* A successful open of a selected script by a process that names it on its
 * command line selects the process before open() returns to it. */
SEC("raw_tracepoint/sys_exit")
int kya_sys_exit(struct bpf_raw_tracepoint_args *ctx)
{
	long ret = (long)ctx->args[1];
	struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
	struct task_struct *task;
	struct fdtable *fdt;
	struct file **fds;
	struct file *file = 0;
	struct kya_exe_key k;
	struct kya_scratch *s;
	struct kya_sel sel = {};
	__u32 tgid, zero = 0;
	__u32 *idx;
	long nr;

	if (ret < 0)
		return 0;
	nr = KYA_SYSCALL_NR(regs);
	if (nr != KYA_NR_OPENAT && nr != KYA_NR_OPENAT2 && nr != KYA_NR_OPEN)
		return 0;
	task = (struct task_struct *)bpf_get_current_task();
	fdt = BPF_CORE_READ(task, files, fdt);
	if (!fdt || ret >= BPF_CORE_READ(fdt, max_fds))
		return 0;
	fds = BPF_CORE_READ(fdt, fd);
	if (bpf_probe_read_kernel(&file, sizeof(file), &fds[ret]) != 0 || !file)
		return 0;
	k = kya_file_key(file);
	idx = bpf_map_lookup_elem(&kya_exes, &k);
	if (!idx || !(*idx & KYA_EXE_SCRIPT))
		return 0; /* opening a binary (ldd, sha256sum) selects nobody */
	tgid = bpf_get_current_pid_tgid() >> 32;
	if (bpf_map_lookup_elem(&kya_sel_tgids, &tgid))
		return 0;
	s = bpf_map_lookup_elem(&kya_scratch, &zero);
	if (s && !kya_argv_names_script(s))
		return 0;
	sel.reason = KYA_SEL_SCRIPT;
	sel.kind = KYA_KIND_EXE;
	sel.index = *idx & ~KYA_EXE_SCRIPT;
	kya_select_tgid(tgid, &sel, KYA_CNT_SELECTED_SCRIPT);
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
	bpf_map_delete_elem(&kya_tgid_exes, &tgid);
	return 0;
}
