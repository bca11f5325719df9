/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Process sensor: process creation and exit from the scheduler tracepoints,
 * plus the fatal signal that ended a process. Exec is recorded by the syscall
 * sensor at execve/execveat entry (the only moment argv is readable).
 *
 * sched:sched_process_fork fires for threads too; the clone flags stashed by
 * the syscall sensor at clone/clone3 entry tell the two apart, and kernel-made
 * workers (io_uring) that no fork syscall created are not processes either.
 */

#define AW_NR_FORK   57
#define AW_NR_VFORK  58
#define AW_NR_CLONE  56
#define AW_NR_CLONE3 435
#define AW_CLONE_THREAD 0x00010000

BPF_HASH(fatal_sigs, u32, s32, 16384);   /* tgid -> fatal signal delivered */

TRACEPOINT_PROBE(sched, sched_process_fork)
{
	if (!aw_watched())
		return 0;
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct aw_stash *st = stash.lookup(&tid);
	if (!st)
		return 0;
	if (st->nr == AW_NR_CLONE && (st->args[0] & AW_CLONE_THREAD))
		return 0;
	if (st->nr == AW_NR_CLONE3 && (st->extra[0] & AW_CLONE_THREAD))
		return 0;
	if (st->nr != AW_NR_CLONE && st->nr != AW_NR_CLONE3 &&
	    st->nr != AW_NR_FORK && st->nr != AW_NR_VFORK)
		return 0;
	struct aw_fork_event *e;
	if (!AW_RESERVE(e))
		return 0;
	aw_fill_hdr(&e->h, AW_EV_FORK);
	e->child = args->child_pid;
	e->pad = 0;
	aw_submit(e);
	return 0;
}

/* Signals whose default action ends the process (not ignore or stop). */
static __always_inline int aw_default_fatal(int sig)
{
	switch (sig) {
	case 17: /* SIGCHLD */
	case 18: /* SIGCONT */
	case 19: case 20: case 21: case 22: /* stop signals */
	case 23: /* SIGURG */
	case 28: /* SIGWINCH */
		return 0;
	}
	return sig > 0 && sig < 65;
}

TRACEPOINT_PROBE(signal, signal_deliver)
{
	if (!aw_watched())
		return 0;
	if (args->sa_handler != 0 || !aw_default_fatal(args->sig))
		return 0;
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	s32 sig = args->sig;
	/* A group exit shows up as SIGKILL on every thread; keep the first,
	 * more specific signal when there was one. */
	s32 *old = fatal_sigs.lookup(&tgid);
	if (old && sig == 9)
		return 0;
	fatal_sigs.update(&tgid, &sig);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
	if (!aw_watched())
		return 0;
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = (u32)id, tgid = id >> 32;
	stash.delete(&tid);
	if (!args->group_dead)
		return 0;
	struct aw_exit_event *e;
	if (!AW_RESERVE(e)) {
		exit_codes.delete(&tgid);
		fatal_sigs.delete(&tgid);
		return 0;
	}
	aw_fill_hdr(&e->h, AW_EV_EXIT);
	s32 *code = exit_codes.lookup(&tgid);
	s32 *sig = fatal_sigs.lookup(&tgid);
	e->code = code ? *code : -1;
	e->sig = sig ? *sig : 0;
	exit_codes.delete(&tgid);
	fatal_sigs.delete(&tgid);
	aw_submit(e);
	return 0;
}
