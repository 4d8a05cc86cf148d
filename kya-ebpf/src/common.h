/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* common.h: includes and the few constants the UAPI headers don't give us
 * without pulling in libc headers (which don't exist for the BPF target). */
#ifndef KYA_COMMON_H
#define KYA_COMMON_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

#define KYA_AF_INET 2
#define KYA_AF_INET6 10
#define KYA_SOCK_STREAM 1
#define KYA_SOCK_RAW 3
#define KYA_IPPROTO_ICMP 1
#define KYA_IPPROTO_TCP 6
#define KYA_IPPROTO_ICMPV6 58
#define KYA_EPERM 1
#define KYA_EEXIST 17
#define KYA_ECONNREFUSED 111

/* cgroup/sock_addr verdicts */
#define KYA_ALLOW 1
#define KYA_REJECT 0

#endif /* KYA_COMMON_H */
