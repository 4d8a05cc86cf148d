/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* sockops.bpf.c: once a redirected connection is established, publish its
 * origin under the 4-tuple the interceptor sees on the accepted socket, and
 * forget the per-socket record when the socket closes.
 *
 * No current-task helper here, on any kernel: socket-ops callbacks run when
 * the handshake completes (usually in softirq), so "the current task" is
 * whoever happened to be interrupted; and older kernels refuse these
 * helpers in this program type (6.1 bpf_get_current_pid_tgid, 6.12 still
 * bpf_get_current_comm). The task that connected was recorded at connect,
 * in its own context, in the origin this program publishes. */
#include "select.h"

#define KYA_TCP_CLOSE 7

/* kya_map_failed for a program without a task context: the event carries no
 * pid, tid or comm (all zero); the map and the error say what failed. */
static __always_inline void kya_sk_map_failed(__u32 map, long err)
{
	struct kya_event *ev;

	kya_count(KYA_CNT_MAP_FULL);
	ev = bpf_ringbuf_reserve(&kya_events, sizeof(*ev), 0);
	if (!ev) {
		kya_count(KYA_CNT_EVENTS_LOST);
		return;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->kind = KYA_EV_MAP_UPDATE_FAILED;
	ev->err = (__s32)err;
	ev->arg0 = map;
	bpf_ringbuf_submit(ev, 0);
}

static __always_inline void kya_established(struct bpf_sock_ops *skops)
{
	struct kya_config *cfg = kya_cfg();
	struct kya_conn_key k = {};
	struct kya_origin *o;
	__u64 cookie;
	long err;

	/* A redirected socket's peer is the interceptor's port: any other is
	 * not ours, and costs no socket lookup. */
	if (!cfg || (__u16)bpf_ntohl(skops->remote_port) != (__u16)cfg->listen_port)
		return;
	cookie = bpf_get_socket_cookie(skops);
	o = bpf_map_lookup_elem(&kya_sockets, &cookie);
	if (!o)
		return; /* not ours */
	if (skops->family == KYA_AF_INET) {
		k.family = KYA_FAMILY_INET;
		*(__u32 *)&k.src_addr[0] = skops->local_ip4;
		*(__u32 *)&k.dst_addr[0] = skops->remote_ip4;
	} else if (skops->family == KYA_AF_INET6) {
		__u32 r0 = skops->remote_ip6[0], r1 = skops->remote_ip6[1];
		__u32 r2 = skops->remote_ip6[2], r3 = skops->remote_ip6[3];

		if (r0 == 0 && r1 == 0 && r2 == bpf_htonl(0xffff)) {
			/* v4-mapped: the IPv4 listener sees plain IPv4 */
			k.family = KYA_FAMILY_INET;
			*(__u32 *)&k.src_addr[0] = skops->local_ip6[3];
			*(__u32 *)&k.dst_addr[0] = r3;
		} else {
			k.family = KYA_FAMILY_INET6;
			*(__u32 *)&k.src_addr[0] = skops->local_ip6[0];
			*(__u32 *)&k.src_addr[4] = skops->local_ip6[1];
			*(__u32 *)&k.src_addr[8] = skops->local_ip6[2];
			*(__u32 *)&k.src_addr[12] = skops->local_ip6[3];
			*(__u32 *)&k.dst_addr[0] = r0;
			*(__u32 *)&k.dst_addr[4] = r1;
			*(__u32 *)&k.dst_addr[8] = r2;
			*(__u32 *)&k.dst_addr[12] = r3;
		}
	} else {
		return;
	}
	/* the namespace recorded at connect: no netns helper is needed here */
	k.netns_cookie = o->netns_cookie;
	k.src_port = (__u16)skops->local_port; /* host order */
	k.dst_port = (__u16)bpf_ntohl(skops->remote_port); /* network order, shifted */
	err = bpf_map_update_elem(&kya_conns, &k, o, BPF_ANY);
	if (err) {
		kya_sk_map_failed(KYA_MAP_CONNS, err);
		return;
	}
	kya_count(KYA_CNT_ESTABLISHED);
	/* Ask for state callbacks on this socket only, to drop the per-socket
	 * record when it closes. */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

SEC("sockops")
int kya_sockops(struct bpf_sock_ops *skops)
{
	__u64 cookie;

	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		kya_established(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == KYA_TCP_CLOSE) {
			cookie = bpf_get_socket_cookie(skops);
			bpf_map_delete_elem(&kya_sockets, &cookie);
		}
		break;
	default:
		break;
	}
	return 1;
}
