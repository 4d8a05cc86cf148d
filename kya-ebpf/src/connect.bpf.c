/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* connect.bpf.c: cgroup/connect4|6 and cgroup/sendmsg4|6.
 *
 * TCP from a selected task to a guarded port (or to any port when the
 * configuration says KYA_CFG_ALL_TCP_PORTS): remember the original
 * destination and the task (kya_sockets, by socket cookie) and rewrite the
 * destination to this instance's interceptor on loopback.
 *
 * Anything else with ports (UDP, UDP-Lite, SCTP, MPTCP) from a selected task
 * to a guarded port is refused with EPERM, the errno a local firewall's
 * OUTPUT drop gives: it says "policy, not network", and QUIC clients fall
 * back to TCP on it, which is then inspected. With KYA_CFG_ALL_TCP_PORTS a
 * stream socket that is not TCP (MPTCP, SCTP) is refused on every port, so it
 * is no way around the redirect; datagrams stay refused on listed ports only.
 *
 * A selected task in another network namespace (a container) is redirected
 * to the kya listener in *its* namespace, at the same loopback address and
 * port, once userspace has one ready there (kya_netns). Until then its
 * guarded TCP connects are refused with ECONNREFUSED (counted, and reported
 * so userspace serves the namespace): never let through unjudged. The origin
 * carries the namespace's cookie, so identical loopback 4-tuples in two
 * namespaces never share a kya_conns key. */
#include "select.h"

static __always_inline int kya_is_dgram_refusable(struct bpf_sock_addr *ctx)
{
	if (ctx->type == KYA_SOCK_RAW)
		return 0;
	if (ctx->protocol == KYA_IPPROTO_ICMP || ctx->protocol == KYA_IPPROTO_ICMPV6)
		return 0; /* ping sockets: the "port" is an ICMP id */
	return 1;
}

static __always_inline int kya_refuse(__u16 port, __u32 protocol)
{
	kya_count(KYA_CNT_REFUSED_DGRAM);
	kya_emit(KYA_EV_REFUSED_DGRAM, -KYA_EPERM, port, protocol);
	bpf_set_retval(-KYA_EPERM);
	return KYA_REJECT;
}

/* Common gate: configured, guarded port (any port for a stream socket in
 * all-ports mode), not the interceptor's own socket, selected task. Cheapest
 * checks first: an unselected task's connect to an unguarded port costs one
 * array and one hash lookup. On a pass, *netns is the socket's netns cookie
 * (0 for the host's) and *served whether the interceptor listens there. */
static __always_inline struct kya_config *kya_gate(struct bpf_sock_addr *ctx, __u16 port, int stream,
						  __u64 *netns, int *served)
{
	struct kya_config *cfg = kya_cfg();
	struct kya_netns *ns;
	struct bpf_sock *sk;
	__u64 cookie;

	if (!cfg)
		return 0;
	if (!(stream && (cfg->flags & KYA_CFG_ALL_TCP_PORTS)) && !kya_port_guarded(port))
		return 0;
	sk = ctx->sk;
	if (sk && sk->mark == cfg->skip_mark) {
		kya_count(KYA_CNT_SKIPPED_MARK);
		return 0;
	}
	if (!kya_task_selected())
		return 0;
	*netns = 0;
	*served = 1;
	if (!cfg->netns_cookie)
		return cfg;
	cookie = bpf_get_netns_cookie(ctx);
	if (cookie == cfg->netns_cookie)
		return cfg;
	*netns = cookie;
	ns = bpf_map_lookup_elem(&kya_netns, &cookie);
	*served = ns && ns->state == KYA_NETNS_READY;
	return cfg;
}

/* A selected task's TCP connect in a namespace kya does not serve (yet):
 * refused, counted, and reported (userspace serves the namespace). */
static __always_inline int kya_refuse_unserved(__u64 netns, __u16 port)
{
	kya_count(KYA_CNT_REFUSED_NETNS);
	kya_emit(KYA_EV_NETNS_UNSERVED, -KYA_ECONNREFUSED, netns, port);
	bpf_set_retval(-KYA_ECONNREFUSED);
	return KYA_REJECT;
}

static __always_inline int kya_record(struct bpf_sock_addr *ctx, struct kya_origin *o, __u64 netns)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u64 uid_gid = bpf_get_current_uid_gid();
	__u64 cookie = bpf_get_socket_cookie(ctx);
	__u32 tgid = pid_tgid >> 32;
	struct kya_exe_key *exe;
	long err;

	o->cgroup_id = bpf_get_current_cgroup_id();
	o->netns_cookie = netns;
	o->pid = tgid;
	o->tid = (__u32)pid_tgid;
	o->uid = (__u32)uid_gid;
	o->gid = uid_gid >> 32;
	bpf_get_current_comm(o->comm, sizeof(o->comm));
	/* The image the process runs now, as the exec tracepoint recorded it:
	 * the identity belongs to the connect, not to whoever holds the socket
	 * later. */
	exe = bpf_map_lookup_elem(&kya_tgid_exes, &tgid);
	if (exe) {
		o->exe_dev = exe->dev;
		o->exe_ino = exe->ino;
	}
	err = bpf_map_update_elem(&kya_sockets, &cookie, o, BPF_ANY);
	if (err) {
		/* Without a record the interceptor could not attribute the
		 * connection: refuse rather than let it through unattributed. */
		kya_map_failed(KYA_MAP_SOCKETS, err);
		bpf_set_retval(-KYA_ECONNREFUSED);
		return KYA_REJECT;
	}
	return KYA_ALLOW;
}

SEC("cgroup/connect4")
int kya_connect4(struct bpf_sock_addr *ctx)
{
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	__u32 ip = ctx->user_ip4;
	struct kya_origin o = {};
	struct kya_config *cfg;
	__u64 netns = 0;
	int served = 0;

	cfg = kya_gate(ctx, port, ctx->type == KYA_SOCK_STREAM, &netns, &served);
	if (!cfg)
		return KYA_ALLOW;
	if (ctx->protocol != KYA_IPPROTO_TCP || ctx->type != KYA_SOCK_STREAM) {
		if (kya_is_dgram_refusable(ctx))
			return kya_refuse(port, ctx->protocol);
		return KYA_ALLOW;
	}
	if (!served)
		return kya_refuse_unserved(netns, port);
	if (ip == bpf_htonl(0x7f000001) && port == cfg->listen_port)
		return KYA_ALLOW; /* already the interceptor */

	*(__u32 *)&o.dst_addr[0] = ip;
	o.dst_port = port;
	o.dst_family = KYA_FAMILY_INET;
	if (kya_record(ctx, &o, netns) != KYA_ALLOW)
		return KYA_REJECT;
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons((__u16)cfg->listen_port);
	kya_count(KYA_CNT_REDIRECTED4);
	return KYA_ALLOW;
}

SEC("cgroup/connect6")
int kya_connect6(struct bpf_sock_addr *ctx)
{
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	__u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1];
	__u32 w2 = ctx->user_ip6[2], w3 = ctx->user_ip6[3];
	int v4mapped = w0 == 0 && w1 == 0 && w2 == bpf_htonl(0xffff);
	struct kya_origin o = {};
	struct kya_config *cfg;
	__u64 netns = 0;
	int served = 0;

	cfg = kya_gate(ctx, port, ctx->type == KYA_SOCK_STREAM, &netns, &served);
	if (!cfg)
		return KYA_ALLOW;
	if (ctx->protocol != KYA_IPPROTO_TCP || ctx->type != KYA_SOCK_STREAM) {
		if (kya_is_dgram_refusable(ctx))
			return kya_refuse(port, ctx->protocol);
		return KYA_ALLOW;
	}
	if (!served)
		return kya_refuse_unserved(netns, port);
	if (port == cfg->listen_port &&
	    ((v4mapped && w3 == bpf_htonl(0x7f000001)) ||
	     (w0 == 0 && w1 == 0 && w2 == 0 && w3 == bpf_htonl(1))))
		return KYA_ALLOW; /* already the interceptor */

	if (v4mapped) {
		/* ::ffff:a.b.c.d never reaches connect4; it is IPv4 on the
		 * wire and the interceptor's IPv4 listener accepts it. */
		*(__u32 *)&o.dst_addr[0] = w3;
		o.dst_family = KYA_FAMILY_INET;
	} else {
		*(__u32 *)&o.dst_addr[0] = w0;
		*(__u32 *)&o.dst_addr[4] = w1;
		*(__u32 *)&o.dst_addr[8] = w2;
		*(__u32 *)&o.dst_addr[12] = w3;
		o.dst_family = KYA_FAMILY_INET6;
	}
	o.dst_port = port;
	if (kya_record(ctx, &o, netns) != KYA_ALLOW)
		return KYA_REJECT;
	if (v4mapped) {
		ctx->user_ip6[3] = bpf_htonl(0x7f000001);
		kya_count(KYA_CNT_REDIRECTED_V4MAPPED);
	} else {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
		kya_count(KYA_CNT_REDIRECTED6);
	}
	ctx->user_port = bpf_htons((__u16)cfg->listen_port);
	return KYA_ALLOW;
}

/* Unconnected UDP (sendto/sendmsg with an address) never passes connect. */
static __always_inline int kya_sendmsg(struct bpf_sock_addr *ctx)
{
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	__u64 netns = 0;
	int served = 0;

	if (!kya_gate(ctx, port, 0, &netns, &served))
		return KYA_ALLOW;
	return kya_refuse(port, ctx->protocol);
}

SEC("cgroup/sendmsg4")
int kya_sendmsg4(struct bpf_sock_addr *ctx)
{
	return kya_sendmsg(ctx);
}

SEC("cgroup/sendmsg6")
int kya_sendmsg6(struct bpf_sock_addr *ctx)
{
	return kya_sendmsg(ctx);
}
