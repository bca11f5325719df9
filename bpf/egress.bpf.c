/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Network egress enforcement with cgroup BPF (agentwatch/guards/egress.py).
 *
 * Attached to one agent's cgroup, these programs run for the sockets created
 * in it (the cgroup a socket belongs to is fixed when it is created) and
 * return 0 to refuse the operation (the syscall fails with EPERM) or 1 to let
 * it go on:
 *   aw_connect4/6       connect() of TCP and UDP sockets (and TCP fast open)
 *   aw_sendmsg4/6       sendto()/sendmsg() with a destination (unconnected UDP)
 *   aw_sock_create      socket(): raw and non-TCP/UDP inet sockets, families
 * With the egress guard on (AW_EG_CFG_GUARD, agentwatch/guards/guard.py),
 * connect4/6 rewrite every TCP connect that no CIDR or loopback rule allows
 * to the run's guard proxy, and connect4/6 and sendmsg4/6 rewrite every
 * port-53 destination to the run's DNS responder, instead of refusing them:
 *   aw_sock_ops         TCP established: file the redirected socket's
 *                       original destination under its local end, where the
 *                       guard finds it for the socket it accepted
 *   aw_recvmsg4/6       a DNS answer from the responder reads as coming from
 *   aw_getpeername4/6   the resolver the agent asked, and a proxied socket's
 *                       peer as the address it connected to
 * Self-contained: its own maps and its own ring buffer, so a flood of
 * monitoring events can never starve the record of a denial.
 *
 * Nothing here reads a kernel struct: only the uapi contexts
 * struct bpf_sock_addr / struct bpf_sock and helpers (the kernel headers on
 * the build machines belong to another kernel version).
 *
 * Records, map keys and the constants userspace shares are in guards.h.
 */
#ifndef AW_EGRESS_BPF_C
#define AW_EGRESS_BPF_C

#include "guards.h"

#ifndef AW_EG_RINGBUF_PAGES
#define AW_EG_RINGBUF_PAGES 64  /* 256 KiB: denials are rare, and each is refused anyway */
#endif
#define AW_EG_SOCK_RAW   3
#define AW_EG_IPPROTO_TCP     6
#define AW_EG_IPPROTO_UDP     17
#define AW_EG_IPPROTO_UDPLITE 136
#define AW_EG_IPPROTO_MPTCP   262
#define AW_EG_AF_UNIX  1
#define AW_EG_AF_INET  2
#define AW_EG_AF_INET6 10

BPF_LPM_TRIE(egress_allow4, struct aw_eg_key4, struct aw_eg_allow, 4096);
BPF_LPM_TRIE(egress_allow6, struct aw_eg_key6, struct aw_eg_allow, 4096);
/* bind: the allow rules alone, without the loopback zones (always allowed) */
BPF_LPM_TRIE(egress_bind4, struct aw_eg_key4, struct aw_eg_allow, 4096);
BPF_LPM_TRIE(egress_bind6, struct aw_eg_key6, struct aw_eg_allow, 4096);
BPF_ARRAY(egress_cfg, u32, AW_EG_CFG_MAX);
BPF_PERCPU_ARRAY(egress_counters, u64, AW_EG_CNT_MAX);
BPF_RINGBUF_OUTPUT(egress_events, AW_EG_RINGBUF_PAGES);
/* redirected sockets: by cookie (connect to established, and the rewrites
 * back), and by local end (what the guard looks up); LRU, so a socket
 * the guard never accepted ages out instead of filling the map */
BPF_TABLE("lru_hash", u64, struct aw_eg_flow, egress_orig, AW_EG_FLOWS_MAX);
BPF_TABLE("lru_hash", struct aw_eg_flow_key, struct aw_eg_flow, egress_flows, AW_EG_FLOWS_MAX);

static __always_inline u32 aw_eg_cfg(u32 idx)
{
	u32 *c = egress_cfg.lookup(&idx);
	return c ? *c : 0;
}

static __always_inline void aw_eg_count(u32 idx)
{
	u64 *c = egress_counters.lookup(&idx);
	if (c)
		(*c)++;
}

static __always_inline u8 aw_eg_pclass(u32 protocol)
{
	if (protocol == AW_EG_IPPROTO_TCP || protocol == AW_EG_IPPROTO_MPTCP)
		return AW_EG_P_TCP;
	if (protocol == AW_EG_IPPROTO_UDP || protocol == AW_EG_IPPROTO_UDPLITE)
		return AW_EG_P_UDP;
	return AW_EG_P_OTHER;
}

/* 0 = allowed; otherwise the AW_EG_R_* reason */
static __always_inline u8 aw_eg_match(struct aw_eg_allow *v, u16 port, u8 pclass)
{
	if (!v)
		return AW_EG_R_NO_RULE;
	for (int i = 0; i < AW_EG_MAX_RANGES; i++) {
		if (i >= v->n)
			break;
		if ((v->r[i].protos & pclass) && port >= v->r[i].lo && port <= v->r[i].hi)
			return 0;
	}
	if (v->n)
		return AW_EG_R_PORT;
	return (v->flags & AW_EG_F_LOOPBACK) ? AW_EG_R_LOOPBACK : AW_EG_R_NO_RULE;
}

static __always_inline u8 aw_eg_judge4(u32 addr, u16 port, u8 pclass)
{
	struct aw_eg_key4 k = {.prefixlen = 32, .addr = addr};
	return aw_eg_match(egress_allow4.lookup(&k), port, pclass);
}

/* IPv4-mapped destinations (::ffff:a.b.c.d) are judged as the IPv4 address */
static __always_inline u8 aw_eg_judge6(u32 a0, u32 a1, u32 a2, u32 a3, u16 port, u8 pclass)
{
	if (a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff))
		return aw_eg_judge4(a3, port, pclass);
	struct aw_eg_key6 k = {.prefixlen = 128, .addr = {a0, a1, a2, a3}};
	return aw_eg_match(egress_allow6.lookup(&k), port, pclass);
}

/* Count the denial and record it; a full ring buffer is counted, never silent. */
static __always_inline void aw_eg_record(u8 op, u8 reason, u16 family, u32 a0, u32 a1,
					 u32 a2, u32 a3, u16 port, u32 type, u32 protocol)
{
	aw_eg_count(AW_EG_CNT_DENIED);
	struct aw_egress_event *e = egress_events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		aw_eg_count(AW_EG_CNT_LOST);
		return;
	}
	u64 id = bpf_get_current_pid_tgid();
	e->ts = bpf_ktime_get_ns();
	e->cgroup = bpf_get_current_cgroup_id();
	e->pid = id >> 32;
	e->tid = (u32)id;
	e->uid = (u32)bpf_get_current_uid_gid();
	e->sock_type = type;
	e->protocol = protocol;
	e->family = family;
	e->port = port;
	e->op = op;
	e->reason = reason;
	__builtin_memset(e->pad, 0, sizeof(e->pad));
	u32 *w = (u32 *)e->addr;
	w[0] = a0;
	w[1] = a1;
	w[2] = a2;
	w[3] = a3;
	bpf_get_current_comm(&e->comm, sizeof(e->comm));
	egress_events.ringbuf_submit(e, 0);
}

/* bind(): allowed to port 0 (an ephemeral port: a client), on loopback,
 * and to an address and port network.allow allows; like the engine's
 * network.bind rule. IPv4-mapped addresses are judged as IPv4. */
static __always_inline u8 aw_eg_bind_judge4(u32 addr, u16 port, u8 pclass)
{
	if (!port || (bpf_ntohl(addr) >> 24) == 127)
		return 0;
	struct aw_eg_key4 k = {.prefixlen = 32, .addr = addr};
	return aw_eg_match(egress_bind4.lookup(&k), port, pclass) ? AW_EG_R_BIND : 0;
}

static __always_inline u8 aw_eg_bind_judge6(u32 a0, u32 a1, u32 a2, u32 a3, u16 port, u8 pclass)
{
	if (a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff))
		return aw_eg_bind_judge4(a3, port, pclass);
	if (!port || (a0 == 0 && a1 == 0 && a2 == 0 && a3 == bpf_htonl(1)))
		return 0;
	struct aw_eg_key6 k = {.prefixlen = 128, .addr = {a0, a1, a2, a3}};
	return aw_eg_match(egress_bind6.lookup(&k), port, pclass) ? AW_EG_R_BIND : 0;
}

/* Remember where a socket the guard takes over was going, and who sent it. */
static __always_inline void aw_eg_remember(void *ctx, u16 family, u32 a0, u32 a1, u32 a2,
					   u32 a3, u16 port)
{
	struct aw_eg_flow f = {};
	u64 id = bpf_get_current_pid_tgid();
	f.ts = bpf_ktime_get_ns();
	f.cgroup = bpf_get_current_cgroup_id();
	f.pid = id >> 32;
	f.tid = (u32)id;
	f.uid = (u32)bpf_get_current_uid_gid();
	f.family = family;
	f.port = port;
	u32 *w = (u32 *)f.addr;
	w[0] = a0;
	w[1] = a1;
	w[2] = a2;
	w[3] = a3;
	bpf_get_current_comm(&f.comm, sizeof(f.comm));
	u64 cookie = bpf_get_socket_cookie(ctx);
	egress_orig.update(&cookie, &f);
}

/* The guard port this destination goes to instead (0: none, judge it).
 * Port 53 always goes to the DNS responder: names are decided there, and a
 * lookup is data leaving the host. TCP that no rule allows goes to the proxy,
 * which decides by name. Other UDP stays refused unless a CIDR allows it. */
static __always_inline u16 aw_eg_guard_port(u8 reason, u16 port, u8 pclass, u8 op, int v6)
{
	if (!(aw_eg_cfg(AW_EG_CFG_FLAGS) & AW_EG_CFG_GUARD))
		return 0;
	if (port == 53 && (pclass & (AW_EG_P_TCP | AW_EG_P_UDP)))
		return aw_eg_cfg(v6 ? AW_EG_CFG_DNS6 : AW_EG_CFG_DNS4);
	if (reason && pclass == AW_EG_P_TCP && (op == AW_EG_OP_CONNECT4 || op == AW_EG_OP_CONNECT6))
		return aw_eg_cfg(v6 ? AW_EG_CFG_PROXY6 : AW_EG_CFG_PROXY4);
	return 0;
}

/* connect, sendmsg and bind of an inet address: judged, recorded when
 * refused, or handed to the guard */
static __always_inline int aw_eg_addr4(struct bpf_sock_addr *ctx, u8 op)
{
	u32 addr = ctx->user_ip4;
	u16 port = bpf_ntohs(ctx->user_port);
	u32 type = ctx->type, protocol = ctx->protocol;
	u8 pclass = aw_eg_pclass(protocol);
	u8 reason = op == AW_EG_OP_BIND4 ? aw_eg_bind_judge4(addr, port, pclass)
					 : aw_eg_judge4(addr, port, pclass);
	if (op != AW_EG_OP_BIND4) {
		u16 to = aw_eg_guard_port(reason, port, pclass, op, 0);
		if (to) {
			aw_eg_remember(ctx, AW_EG_AF_INET, addr, 0, 0, 0, port);
			aw_eg_count(port == 53 ? AW_EG_CNT_DNS : AW_EG_CNT_PROXIED);
			ctx->user_ip4 = bpf_htonl(0x7f000001);
			ctx->user_port = bpf_htons(to);
			return 1;
		}
	}
	if (!reason)
		return 1;
	aw_eg_record(op, reason, AW_EG_AF_INET, addr, 0, 0, 0, port, type, protocol);
	return 0;
}

static __always_inline int aw_eg_addr6(struct bpf_sock_addr *ctx, u8 op)
{
	u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1];
	u32 a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];
	u16 port = bpf_ntohs(ctx->user_port);
	u32 type = ctx->type, protocol = ctx->protocol;
	u8 pclass = aw_eg_pclass(protocol);
	u8 reason = op == AW_EG_OP_BIND6 ? aw_eg_bind_judge6(a0, a1, a2, a3, port, pclass)
					 : aw_eg_judge6(a0, a1, a2, a3, port, pclass);
	if (op != AW_EG_OP_BIND6) {
		/* an IPv4-mapped destination travels as IPv4: the IPv4 listener takes it */
		int mapped = a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff);
		u16 to = aw_eg_guard_port(reason, port, pclass, op, !mapped);
		if (to) {
			aw_eg_remember(ctx, AW_EG_AF_INET6, a0, a1, a2, a3, port);
			aw_eg_count(port == 53 ? AW_EG_CNT_DNS : AW_EG_CNT_PROXIED);
			ctx->user_ip6[0] = 0;
			ctx->user_ip6[1] = 0;
			ctx->user_ip6[2] = mapped ? bpf_htonl(0xffff) : 0;
			ctx->user_ip6[3] = mapped ? bpf_htonl(0x7f000001) : bpf_htonl(1);
			ctx->user_port = bpf_htons(to);
			return 1;
		}
	}
	if (!reason)
		return 1;
	aw_eg_record(op, reason, AW_EG_AF_INET6, a0, a1, a2, a3, port, type, protocol);
	return 0;
}

/* TCP established on a socket connect4/6 redirected: file its original
 * destination under the socket's local end (IPv4 as ::ffff:a.b.c.d), which
 * is the peer address of the socket the guard accepts. */
int aw_sock_ops(struct bpf_sock_ops *skops)
{
	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	u64 cookie = bpf_get_socket_cookie(skops);
	struct aw_eg_flow *f = egress_orig.lookup(&cookie);
	if (!f)
		return 1;
	/* every context field read once, before any branch: the verifier refuses
	 * a context pointer the compiler offsets to share the loads */
	u32 family = skops->family, port = skops->local_port, ip4 = skops->local_ip4;
	u32 l0 = skops->local_ip6[0], l1 = skops->local_ip6[1];
	u32 l2 = skops->local_ip6[2], l3 = skops->local_ip6[3];
	struct aw_eg_flow_key k = {.port = port};
	u32 *w = (u32 *)k.addr;
	if (family == AW_EG_AF_INET) {
		w[2] = bpf_htonl(0xffff);
		w[3] = ip4;
	} else {
		w[0] = l0;
		w[1] = l1;
		w[2] = l2;
		w[3] = l3;
	}
	struct aw_eg_flow v = *f;
	egress_flows.update(&k, &v);
	return 1;
}

/* recvmsg (the source of a datagram) and getpeername: a socket the guard
 * took over reads as talking to the address the agent named, so resolvers
 * that check where an answer came from (glibc does) accept the responder's. */
static __always_inline int aw_eg_is_guard(u16 port, int v6)
{
	return port && (port == aw_eg_cfg(v6 ? AW_EG_CFG_DNS6 : AW_EG_CFG_DNS4) ||
			port == aw_eg_cfg(v6 ? AW_EG_CFG_PROXY6 : AW_EG_CFG_PROXY4));
}

static __always_inline int aw_eg_restore4(struct bpf_sock_addr *ctx)
{
	if (ctx->user_ip4 != bpf_htonl(0x7f000001) || !aw_eg_is_guard(bpf_ntohs(ctx->user_port), 0))
		return 1;
	u64 cookie = bpf_get_socket_cookie(ctx);
	struct aw_eg_flow *f = egress_orig.lookup(&cookie);
	if (!f || f->family != AW_EG_AF_INET)
		return 1;
	ctx->user_ip4 = *(u32 *)f->addr;
	ctx->user_port = bpf_htons(f->port);
	return 1;
}

static __always_inline int aw_eg_restore6(struct bpf_sock_addr *ctx)
{
	u32 a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];
	if (ctx->user_ip6[0] || ctx->user_ip6[1])
		return 1;
	int mapped = a2 == bpf_htonl(0xffff) && a3 == bpf_htonl(0x7f000001);
	if (!((a2 == 0 && a3 == bpf_htonl(1)) || mapped) ||
	    !aw_eg_is_guard(bpf_ntohs(ctx->user_port), !mapped))
		return 1;
	u64 cookie = bpf_get_socket_cookie(ctx);
	struct aw_eg_flow *f = egress_orig.lookup(&cookie);
	if (!f || f->family != AW_EG_AF_INET6)
		return 1;
	u32 *w = (u32 *)f->addr;
	ctx->user_ip6[0] = w[0];
	ctx->user_ip6[1] = w[1];
	ctx->user_ip6[2] = w[2];
	ctx->user_ip6[3] = w[3];
	ctx->user_port = bpf_htons(f->port);
	return 1;
}

int aw_recvmsg4(struct bpf_sock_addr *ctx) { return aw_eg_restore4(ctx); }
int aw_recvmsg6(struct bpf_sock_addr *ctx) { return aw_eg_restore6(ctx); }
int aw_getpeername4(struct bpf_sock_addr *ctx) { return aw_eg_restore4(ctx); }
int aw_getpeername6(struct bpf_sock_addr *ctx) { return aw_eg_restore6(ctx); }

/* connect() or sendmsg() naming a unix socket (pathname or abstract), from
 * the cgroup unix hooks of Linux 6.7+. Attached only when the policy allows
 * no unix sockets, so every one is refused. The name is not readable here:
 * the syscall sensor reports it, and the runner does not report these
 * records a second time (they are counted). */
static __always_inline int aw_eg_unix(struct bpf_sock_addr *ctx, u8 op)
{
	aw_eg_record(op, AW_EG_R_UNIX, AW_EG_AF_UNIX, 0, 0, 0, 0, 0, ctx->type, ctx->protocol);
	return 0;
}

int aw_connect_unix(struct bpf_sock_addr *ctx) { return aw_eg_unix(ctx, AW_EG_OP_CONNECT_UNIX); }
int aw_sendmsg_unix(struct bpf_sock_addr *ctx) { return aw_eg_unix(ctx, AW_EG_OP_SENDMSG_UNIX); }
int aw_bind4(struct bpf_sock_addr *ctx) { return aw_eg_addr4(ctx, AW_EG_OP_BIND4); }
int aw_bind6(struct bpf_sock_addr *ctx) { return aw_eg_addr6(ctx, AW_EG_OP_BIND6); }
int aw_connect4(struct bpf_sock_addr *ctx) { return aw_eg_addr4(ctx, AW_EG_OP_CONNECT4); }
int aw_connect6(struct bpf_sock_addr *ctx) { return aw_eg_addr6(ctx, AW_EG_OP_CONNECT6); }
int aw_sendmsg4(struct bpf_sock_addr *ctx) { return aw_eg_addr4(ctx, AW_EG_OP_SENDMSG4); }
int aw_sendmsg6(struct bpf_sock_addr *ctx) { return aw_eg_addr6(ctx, AW_EG_OP_SENDMSG6); }

/* socket(): the kernel runs this hook for inet and inet6 sockets only
 * (inet_create/inet6_create), after the protocol was chosen. Raw sockets
 * would send packets no connect/sendmsg hook sees, and protocols other than
 * TCP and UDP (ICMP ping sockets, SCTP) are not all covered by those hooks:
 * refuse them here. */
int aw_sock_create(struct bpf_sock *ctx)
{
	u32 family = ctx->family, type = ctx->type, protocol = ctx->protocol;
	u32 cfg = aw_eg_cfg(AW_EG_CFG_FLAGS);
	u8 reason = 0;
	if ((family == AW_EG_AF_INET && !(cfg & AW_EG_CFG_INET)) ||
	    (family == AW_EG_AF_INET6 && !(cfg & AW_EG_CFG_INET6)))
		reason = AW_EG_R_FAMILY;
	else if (type == AW_EG_SOCK_RAW)
		reason = AW_EG_R_RAW;
	else if (aw_eg_pclass(protocol) == AW_EG_P_OTHER)
		reason = AW_EG_R_PROTOCOL;
	if (!reason)
		return 1;
	aw_eg_record(AW_EG_OP_SOCKET, reason, family, 0, 0, 0, 0, 0, type, protocol);
	return 0;
}

#endif /* AW_EGRESS_BPF_C */
