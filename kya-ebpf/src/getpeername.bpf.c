/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* getpeername.bpf.c: a redirected socket reports the peer the agent asked
 * for, not the interceptor (the agent sees the truth about its request). */
#include "select.h"

SEC("cgroup/getpeername4")
int kya_getpeername4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct kya_origin *o = bpf_map_lookup_elem(&kya_sockets, &cookie);

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
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct kya_origin *o = bpf_map_lookup_elem(&kya_sockets, &cookie);

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
