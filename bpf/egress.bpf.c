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
BPF_ARRAY(egress_cfg, u32, 1);
BPF_PERCPU_ARRAY(egress_counters, u64, AW_EG_CNT_MAX);
BPF_RINGBUF_OUTPUT(egress_events, AW_EG_RINGBUF_PAGES);

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

/* connect, sendmsg and bind of an inet address: judged, recorded when refused */
static __always_inline int aw_eg_addr4(struct bpf_sock_addr *ctx, u8 op)
{
	u32 addr = ctx->user_ip4;
	u16 port = bpf_ntohs(ctx->user_port);
	u32 type = ctx->type, protocol = ctx->protocol;
	u8 pclass = aw_eg_pclass(protocol);
	u8 reason = op == AW_EG_OP_BIND4 ? aw_eg_bind_judge4(addr, port, pclass)
					 : aw_eg_judge4(addr, port, pclass);
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
	if (!reason)
		return 1;
	aw_eg_record(op, reason, AW_EG_AF_INET6, a0, a1, a2, a3, port, type, protocol);
	return 0;
}

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
	u32 zero = 0, cfg = 0;
	u32 *c = egress_cfg.lookup(&zero);
	if (c)
		cfg = *c;
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
