/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* kya.bpf.c: the single BPF object kya loads. One file per hook, included
 * here so that they share one copy of the maps (maps.h). */
#include "common.h"
#include "kya.h"
#include "maps.h"
#include "select.h"

#include "connect.bpf.c"
#include "sockops.bpf.c"
#include "getpeername.bpf.c"
#include "process.bpf.c"

/* GPL-compatible: probe_read_kernel and friends are GPL-only helpers. */
char _license[] SEC("license") = "Dual MIT/GPL";
