/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* getpeername.bpf.c: a redirected socket reports the peer the agent asked
 * for, not the interceptor (the agent sees the truth about its request).
 *
 * The kernel hands the program the socket's real peer: for a redirected
 * socket always the interceptor's port (on loopback, in whichever
 * namespace). Any other peer port is a socket kya never redirected, so the
 * program returns before it looks the socket up: the common case, for
 * every process in the cgroup tree, costs one array lookup. */
#include "select.h"

/* The origin of a socket kya redirected; 0 for any other (its real peer
 * port is not the interceptor's, or kya has no record of it). */
static __always_inline struct kya_origin *kya_redirected_origin(struct bpf_sock_addr *ctx)
{
	struct kya_config *cfg = kya_cfg();
	__u64 cookie;

	if (!cfg || ctx->user_port != bpf_htons((__u16)cfg->listen_port))
		return 0;
	cookie = bpf_get_socket_cookie(ctx);
	return bpf_map_lookup_elem(&kya_sockets, &cookie);
}

SEC("cgroup/getpeername4")
int kya_getpeername4(struct bpf_sock_addr *ctx)
{
	struct kya_origin *o = kya_redirected_origin(ctx);

	if (!o || o->dst_family != KYA_FAMILY_INET)
		return KYA_ALLOW;
	ctx->user_ip4 = *(__u32 *)&o->dst_addr[0];
	ctx->user_port = bpf_htons(o->dst_port);
	kya_count(KYA_CNT_GETPEERNAME);
	return KYA_ALLOW;
}

SEC("cgroup/getpeername6")
int kya_getpeername6(struct bpf_sock_addr *ctx)
{
	struct kya_origin *o = kya_redirected_origin(ctx);

	if (!o)
		return KYA_ALLOW;
	if (o->dst_family == KYA_FAMILY_INET) {
		/* an AF_INET6 socket that connected to ::ffff:a.b.c.d */
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = *(__u32 *)&o->dst_addr[0];
	} else {
		ctx->user_ip6[0] = *(__u32 *)&o->dst_addr[0];
		ctx->user_ip6[1] = *(__u32 *)&o->dst_addr[4];
		ctx->user_ip6[2] = *(__u32 *)&o->dst_addr[8];
		ctx->user_ip6[3] = *(__u32 *)&o->dst_addr[12];
	}
	ctx->user_port = bpf_htons(o->dst_port);
	kya_count(KYA_CNT_GETPEERNAME);
	return KYA_ALLOW;
}
