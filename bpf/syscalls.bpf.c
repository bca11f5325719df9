/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Syscall sensor: one generic entry and one generic exit program, attached
 * by agentwatch/sensors/syscalls.py to exactly the syscalls:sys_{enter,exit}_*
 * tracepoints the run needs (file, network, sensitive and process syscalls).
 * What to copy for each syscall (which argument is a path, a sockaddr, ...)
 * comes from the "specs" map, so the C stays the same whatever is watched.
 *
 * Entry stashes the arguments per thread; exit reads the user strings (the
 * kernel has faulted them in by then) and emits one record with the return
 * value, so a denied call (-EACCES, -EPERM) is visible as such.
 */

struct aw_stash {
	s32 nr;
	u32 pad;
	u64 args[6];
	u64 extra[2];
};

/* Largest syscall number we can describe (x86_64 ends below 512). */
#define AW_NR_MAX 512
BPF_ARRAY(specs, struct aw_spec, AW_NR_MAX);
BPF_HASH(stash, u32, struct aw_stash, 16384);        /* tid -> entry args */
BPF_HASH(exit_codes, u32, s32, 16384);               /* tgid -> exit_group() status */
BPF_PERCPU_ARRAY(repeat_new, struct aw_repeat, 1);   /* a thread's first kept record: too big for the stack */

struct user_msghdr_head {   /* leading fields of uapi struct user_msghdr */
	u64 msg_name;
	s32 msg_namelen;
};

static __always_inline u64 aw_arg(const u64 *args, u8 idx)
{
	if (idx < 6)
		return args[idx];
	return 0;
}

static __always_inline void aw_emit_exec(const u64 *args, struct aw_spec *sp)
{
	struct aw_exec_event *e;
	if (!AW_RESERVE_PRIO(e))
		return;
	aw_fill_hdr(&e->h, AW_EV_EXEC);
	e->argc = 0;
	e->truncated = 0;
	bpf_probe_read_user_str(e->filename, sizeof(e->filename),
				(void *)aw_arg(args, sp->path1));
	const char *const *argv = (const char *const *)aw_arg(args, sp->argv);
#pragma unroll
	for (int i = 0; i < AW_ARGC_MAX; i++) {
		const char *p = NULL;
		if (bpf_probe_read_user(&p, sizeof(p), &argv[i]) || !p)
			goto out;
		bpf_probe_read_user_str(e->argv[i], AW_ARG_LEN, p);
		e->argc = i + 1;
	}
	{
		const char *p = NULL;
		if (!bpf_probe_read_user(&p, sizeof(p), &argv[AW_ARGC_MAX]) && p)
			e->truncated = 1;
	}
out:
	aw_submit_prio(e);
}

static __always_inline int aw_enter(struct aw_sys_enter_args *ctx, const int nargs)
{
	if (!aw_watched())
		return 0;
	u32 nr = ctx->nr;
	struct aw_spec *sp = specs.lookup(&nr);
	if (!sp || !sp->flags)
		return 0;
	u64 id = bpf_get_current_pid_tgid();
	if (sp->flags & AW_SPEC_EXIT_GROUP) {
		u32 tgid = id >> 32;
		s32 code = nargs > 0 ? (s32)ctx->args[0] : 0;
		exit_codes.update(&tgid, &code);
		return 0;
	}
	/* copy the arguments to the stack first: the verifier refuses a
	 * variable index into the tracepoint context */
	struct aw_stash st = {};
	st.nr = ctx->nr;
#pragma unroll
	for (int i = 0; i < 6; i++)
		if (i < nargs)
			st.args[i] = ctx->args[i];
	if (sp->flags & AW_SPEC_EXEC) {
		u32 tgid = id >> 32;
		u8 one = 1;
		live.update(&tgid, &one);   /* the run's first process is first seen here */
		aw_emit_exec(st.args, sp);
	}
	if (sp->deref != AW_NOARG)
		bpf_probe_read_user(&st.extra, sizeof(st.extra), (void *)aw_arg(st.args, sp->deref));
	u32 tid = (u32)id;
	if (stash.update(&tid, &st))
		aw_count(AW_CNT_LOST_STASH);
	return 0;
}

/* One entry program per argument count: the kernel refuses to attach a
 * program that reads past the end of a tracepoint's record, and a syscall
 * with two arguments has a shorter record than one with six. */
#define AW_ENTER(n) \
	int aw_sys_enter##n(struct aw_sys_enter_args *ctx) { return aw_enter(ctx, n); }
AW_ENTER(0)
AW_ENTER(1)
AW_ENTER(2)
AW_ENTER(3)
AW_ENTER(4)
AW_ENTER(5)
AW_ENTER(6)

#define AW_EPERM 1

/* A return that a sandbox layer other than seccomp gives a syscall with no
 * record of its own (spec.refuse): EAGAIN of clone & co at the pids limit,
 * EACCES of a device ioctl Landlock (IOCTL_DEV) refuses. The judge decides
 * whether the run's plan explains it. */
static __always_inline int aw_refused(struct aw_spec *sp, s64 ret)
{
	return (ret == -13 && (sp->refuse & AW_REFUSE_EACCES)) ||
	       (ret == -11 && (sp->refuse & AW_REFUSE_EAGAIN));
}
#define AW_SOCKADDR_MAX 110     /* sizeof(struct sockaddr_un), the largest we decode */

/* Reserve a syscall record on the bulk (prio 0) or priority ring and fill
 * its fixed part; st NULL: no arguments seen. */
static __always_inline struct aw_syscall_event *aw_syscall_record(u32 type, s32 nr, s64 ret,
								   struct aw_stash *st, int prio)
{
	struct aw_syscall_event *e;
	if (!AW_RESERVE_ON(e, prio))
		return NULL;
	aw_fill_hdr(&e->h, type);
	e->nr = nr;
	e->ret = ret;
	e->len2 = 0;
#pragma unroll
	for (int i = 0; i < 6; i++)
		e->args[i] = st ? st->args[i] : 0;
	e->extra[0] = st ? st->extra[0] : 0;
	e->extra[1] = st ? st->extra[1] : 0;
	e->str1[0] = 0;
	e->data2[0] = 0;
	return e;
}

/* Repeats (see common.bpf.c). A record may be folded into when it is a
 * bulk file record with one path, absolute as written, read whole, and no
 * address: the same bytes then name the same file whatever the thread's cwd
 * (a relative path is never folded, so a chdir by another thread cannot
 * change what a repeat meant). */
static __always_inline int aw_foldable(struct aw_spec *sp, int prio, struct aw_path_buf *p1,
				       struct aw_path_buf *p2, u64 addr)
{
	if (prio || !p1 || p2 || addr || (sp->flags & AW_SPEC_EXEC) ||
	    p1->n <= 1 || p1->n >= AW_STR_LEN || p1->path[0] != '/')
		return 0;
	u32 slot = aw_slot();
	u8 *off = no_fold.lookup(&slot);
	return !off || !*off;
}

/* The call is the same as the thread's kept record (syscall, the other
 * arguments, the struct behind deref, result and path bytes; not where the
 * path was in memory, which a language runtime may change from call to call):
 * count it. */
static __always_inline int aw_fold(u32 tid, struct aw_spec *sp, struct aw_stash *st, s64 ret,
				   struct aw_path_buf *p1)
{
	struct aw_repeat *r = repeats.lookup(&tid);
	if (!r || !r->n || r->nr != st->nr || r->ret != ret || r->n != p1->n)
		return 0;
#pragma unroll
	for (int i = 0; i < 6; i++)
		if (i != sp->path1 && r->args[i] != st->args[i])
			return 0;
	if (r->extra[0] != st->extra[0] || r->extra[1] != st->extra[1])
		return 0;
	long n = p1->n;
#pragma unroll
	for (int i = 0; i < AW_STR_LEN / 8; i++) {
		long left = n - i * 8;
		if (left <= 0)
			break;
		u64 a = ((u64 *)r->path)[i], b = ((u64 *)p1->path)[i];
		if (left < 8) {    /* bytes after the NUL are stale: compare up to it */
			u64 mask = (1ULL << (left * 8)) - 1;
			a &= mask;
			b &= mask;
		}
		if (a != b)
			return 0;
	}
	u64 now = bpf_ktime_get_ns();
	if (!r->count)
		r->first = now;
	r->count++;
	r->last = now;
	if (now - r->first >= AW_REPEAT_NS)
		aw_repeat_out(r);   /* a long run of calls: once a second */
	return 1;
}

/* Keep the record just reserved (stamped ts) as the thread's record to fold into. */
static __always_inline void aw_fold_start(u32 tid, struct aw_stash *st, s64 ret,
					  struct aw_path_buf *p1, u64 ts)
{
	struct aw_repeat *r = repeats.lookup(&tid);
	int fresh = !r;
	if (fresh) {
		u32 zero = 0;
		r = repeat_new.lookup(&zero);
		if (!r)
			return;
	}
	r->nr = st->nr;
	r->count = 0;
	r->ret = ret;
#pragma unroll
	for (int i = 0; i < 6; i++)
		r->args[i] = st->args[i];
	r->extra[0] = st->extra[0];
	r->extra[1] = st->extra[1];
	r->ts = ts;
	r->first = r->last = 0;
	r->n = p1->n;
	__builtin_memcpy(r->path, p1->path, sizeof(r->path));
	if (fresh)
		repeats.update(&tid, r);   /* map full: this thread's records are not folded */
}

/* A syscall the seccomp filter refused with EPERM: seccomp runs before the
 * sys_enter tracepoint (syscall_trace_enter returns at once), so there is no
 * stash, but sys_exit still fires with the errno. Only syscalls whose spec
 * says the filter denies them are reported, and only -EPERM: a lost stash
 * (counted) of a call that failed otherwise is not taken for a denial. A
 * syscall the filter refuses only for some arguments (socket by family,
 * ioctl by request) can fail with EPERM for its own reasons too: with
 * AW_EXIT_ARGS the record carries the arguments, which the judge checks
 * against the run's filter; without, its entry probe is attached too
 * (stash only, no AW_SPEC_EMIT), so the calls it let through have a stash.
 * The same exit reports the refusals of other layers that leave no record
 * (AW_EV_REFUSED: see aw_refused), when their arguments are known. */

static __always_inline int aw_exit_no_entry(struct aw_sys_exit_args *ctx)
{
	u32 nr = ctx->nr;
	struct aw_spec *sp = specs.lookup(&nr);
	if (!sp)
		return 0;
	int denied = ctx->ret == -AW_EPERM && (sp->flags & AW_SPEC_DENIED);
	if (!denied && !aw_refused(sp, ctx->ret))
		return 0;
	struct aw_stash *args = NULL;
#ifdef AW_EXIT_ARGS
	/* The call's arguments, which no tracepoint record carries: the
	 * registers saved at syscall entry (struct pt_regs, the uapi layout
	 * of asm/ptrace.h), which a refused call leaves as they were but for
	 * ax. With them the judge tells a refusal (a terminal ioctl, a socket
	 * family) from an ordinary EPERM of the same syscall, and says what
	 * was refused, without an entry probe on every call. */
	struct aw_stash regs = {};
	struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
	const u64 *r = (const u64 *)bpf_task_pt_regs(task);
	/* di, si, dx, r10, r8, r9: the syscall argument registers, by index */
	bpf_probe_read_kernel(&regs.args[0], 8, &r[14]);
	bpf_probe_read_kernel(&regs.args[1], 8, &r[13]);
	bpf_probe_read_kernel(&regs.args[2], 8, &r[12]);
	bpf_probe_read_kernel(&regs.args[3], 8, &r[7]);
	bpf_probe_read_kernel(&regs.args[4], 8, &r[9]);
	bpf_probe_read_kernel(&regs.args[5], 8, &r[8]);
	regs.extra[0] = AW_NOENTRY_ARGS;
	args = &regs;
#endif
	if (!denied && !args)
		return 0;       /* a refusal record says what was refused, or is not sent */
	struct aw_syscall_event *e = aw_syscall_record(denied ? AW_EV_NOENTRY : AW_EV_REFUSED,
						       ctx->nr, ctx->ret, args, 1);
	if (e)
		aw_submit_prio(e);     /* a denial: never behind a benign flood */
	return 0;
}

int aw_sys_exit(struct aw_sys_exit_args *ctx)
{
	if (!aw_watched())
		return 0;
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct aw_stash *st = stash.lookup(&tid);
	/* none, or one left by an earlier call whose exit is not watched (clone) */
	if (!st || st->nr != ctx->nr)
		return aw_exit_no_entry(ctx);
	u32 nr = st->nr;
	struct aw_spec *sp = specs.lookup(&nr);
	if (!sp || !(sp->flags & AW_SPEC_EMIT)) {
		/* no record of its own (clone & co, a conditional seccomp
		 * syscall's entry): only a refusal by a sandbox layer is sent */
		if (sp && aw_refused(sp, ctx->ret)) {
			struct aw_syscall_event *e = aw_syscall_record(AW_EV_REFUSED, st->nr, ctx->ret,
								       st, 1);
			if (e)
				aw_submit_prio(e);
		}
		stash.delete(&tid);
		return 0;
	}
	/* Where the socket address is, if this syscall has one. */
	u64 addr = aw_arg(st->args, sp->addr);
	u32 len = (u32)aw_arg(st->args, sp->addrlen);
	if (sp->msghdr != AW_NOARG) {
		struct user_msghdr_head mh = {};
		bpf_probe_read_user(&mh, sizeof(mh), (void *)aw_arg(st->args, sp->msghdr));
		addr = mh.msg_name;
		len = mh.msg_namelen;
	}
	/* send on a connected socket names no address: nothing new to see */
	if ((sp->flags & AW_SPEC_NEED_ADDR) && !addr) {
		stash.delete(&tid);
		return 0;
	}
	/* each path read once: routing, the mapping kill and the record use it
	 * (after a successful exec the old image's strings are gone: the entry
	 * record already carried them) */
	struct aw_path_buf *p1 = NULL, *p2 = NULL;
	if (!(sp->flags & AW_SPEC_EXEC)) {
		if (sp->path1 != AW_NOARG)
			p1 = aw_read_path(0, aw_arg(st->args, sp->path1));
		if (sp->path2 != AW_NOARG)
			p2 = aw_read_path(1, aw_arg(st->args, sp->path2));
	}
	int route = aw_priority(sp, ctx->ret, p1, p2);
	if ((route & AW_ROUTE_KILL) && (sp->flags & AW_SPEC_OPEN) && ctx->ret >= 0) {
		/* The policy kills on this path and nothing denied the open (a
		 * glob like any-dir/.env cannot be masked): SIGKILL now is delivered before
		 * the open returns to user space, so the file's content never
		 * reaches the agent. The record still goes out and is judged. */
		bpf_send_signal(9);
		aw_count(AW_CNT_KILLED);
	}
	int prio = route & AW_ROUTE_PRIO;
	int fold = aw_foldable(sp, prio, p1, p2, addr);
	if (fold && aw_fold(tid, sp, st, ctx->ret, p1)) {
		if ((sp->flags & AW_SPEC_OPEN) && ctx->ret >= 0)
			aw_mapexec_open(p1, ctx->ret);
		stash.delete(&tid);
		return 0;
	}
	struct aw_syscall_event *e = aw_syscall_record(AW_EV_SYSCALL, st->nr, ctx->ret, st, prio);
	if (!e) {
		stash.delete(&tid);
		return 0;
	}
	if (fold)
		aw_fold_start(tid, st, ctx->ret, p1, e->h.ts);
	if (p1)
		__builtin_memcpy(e->str1, p1->path, sizeof(e->str1));
	if (p2) {
		__builtin_memcpy(e->data2, p2->path, sizeof(e->data2));
	} else if (addr && !(sp->flags & AW_SPEC_EXEC)) {
		/* exactly the caller's sockaddr, at most a sockaddr_un (110
		 * bytes): a short unix name ("s", 5 bytes with the family) is
		 * copied whole. The mask gives the verifier the bound it needs
		 * for a variable size (a no-op after the clamp). */
		u64 n = len > AW_SOCKADDR_MAX ? AW_SOCKADDR_MAX : len;
		asm volatile("%0 &= 0x7f" : "+r"(n));   /* clang drops a plain C mask */
		if (n && !bpf_probe_read_user(e->data2, n, (void *)addr))
			e->len2 = n;
	}
	/* last: it reuses p1's buffer for the mark it stores */
	if ((sp->flags & AW_SPEC_OPEN) && ctx->ret >= 0 && p1)
		aw_mapexec_open(p1, ctx->ret);
	else if ((sp->flags & AW_SPEC_EXEC) && ctx->ret == 0)
		aw_mapexec_new_gen();   /* close-on-exec fds are gone with the old image */
	stash.delete(&tid);
	aw_submit_on(e, prio);
	return 0;
}
