/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Maps and helpers shared by the sensors; joined in front of them into one
 * BPF text (bcc rewrites map calls only in the main text, so this is not a
 * header). Event layouts live in events.h.
 *
 * Nothing here reads a kernel struct: the kernel headers on the build machines do not match the running kernel, so every field we use comes
 * from tracepoint records (tracefs formats), BPF helpers or uapi structs.
 */
#include "events.h"

#ifndef AW_RINGBUF_PAGES
#define AW_RINGBUF_PAGES 2048   /* 8 MiB with 4 KiB pages */
#endif
#ifndef AW_PRIO_PAGES
#define AW_PRIO_PAGES 256       /* 1 MiB */
#endif
#ifndef AW_MAX_RUNS
#define AW_MAX_RUNS 1024
#endif

/* cgroup v2 id -> run slot. Filled by userspace before the agent may exec;
 * every program checks it first so other processes cost one hash lookup. */
BPF_HASH(watched, u64, u32, AW_MAX_RUNS);
/* Two ring buffers, so that a flood of benign file records cannot starve
 * the records a verdict or the process tree depends on:
 *  - "events" (bulk): ordinary file records, the bulk of any workload, and
 *    the repeat counts folded from them (see "Repeats" below);
 *  - "priority": process lifecycle (fork, exec, exit), chdir, network and
 *    sensitive syscalls, any syscall the kernel refused (-EACCES, -EPERM)
 *    and file records whose path the policy denies (aw_sensitive_path).
 * Each has its own lost/submitted counters. The reader drains both every
 * poll and merges them by timestamp (agentwatch/sensors/__init__.py). */
BPF_RINGBUF_OUTPUT(events, AW_RINGBUF_PAGES);
BPF_RINGBUF_OUTPUT(priority, AW_PRIO_PAGES);
/* tgids of the agents' processes (added at fork and exec, removed at exit),
 * so probes running in another process (signal_generate runs in the
 * sender) can tell whether their target is an agent's */
BPF_HASH(live, u32, u8, 65536);
BPF_PERCPU_ARRAY(counters, u64, AW_CNT_MAX);

/* Layout of every syscalls:sys_enter_* / sys_exit_* record (see the tracefs
 * "format" files; checked by tests/kernel/test_mapexec.py). */
struct aw_sys_enter_args {
	u64 common;
	s32 nr;
	u32 pad;
	u64 args[6];
};

struct aw_sys_exit_args {
	u64 common;
	s32 nr;
	u32 pad;
	s64 ret;
};

static __always_inline int aw_watched(void)
{
	u64 cg = bpf_get_current_cgroup_id();
	return watched.lookup(&cg) != NULL;
}

/* The current process's run slot, 0 when it is not watched. */
static __always_inline u32 aw_slot(void)
{
	u64 cg = bpf_get_current_cgroup_id();
	u32 *slot = watched.lookup(&cg);
	return slot ? *slot : 0;
}

static __always_inline void aw_count_n(u32 idx, u64 n)
{
	u64 *c = counters.lookup(&idx);
	if (c)
		*c += n;
}

static __always_inline void aw_count(u32 idx)
{
	aw_count_n(idx, 1);
}

static __always_inline void aw_fill_hdr(struct aw_hdr *h, u32 type)
{
	u64 id = bpf_get_current_pid_tgid();
	h->type = type;
	h->pid = id >> 32;
	h->tid = (u32)id;
	h->uid = (u32)bpf_get_current_uid_gid();
	h->ts = bpf_ktime_get_ns();
	h->cgroup = bpf_get_current_cgroup_id();
	bpf_get_current_comm(&h->comm, sizeof(h->comm));
}

/* Repeats: a thread making the same file call over and over (a loop opening
 * /dev/null, a build polling a lock file) costs one record and a count, not
 * a record per call: the monitor's cost is per record (issue #5). Per thread,
 * the last bulk file record that may be repeated (aw_fold_start in
 * syscalls.bpf.c: absolute path, one path, no address) is kept here; an
 * identical call adds to its count (aw_fold). The count goes out as an
 * aw_repeat_event on the bulk ring before any other record of the thread
 * (aw_reserve_on), at the thread's exit (aw_repeat_end), and once a second
 * while the calls go on, so the thread's records stay in their order and no
 * count waits longer than the thread's next record. */
#ifndef AW_REPEAT_THREADS
#define AW_REPEAT_THREADS 8192   /* threads folding at once; beyond, records are not folded */
#endif
#define AW_REPEAT_NS 1000000000ULL
struct aw_repeat {
	s32 nr;
	u32 count;          /* calls folded since the last aw_repeat_event */
	s64 ret;
	u64 args[6];
	u64 extra[2];
	u64 ts;             /* the record the calls repeat */
	u64 first;          /* the first and last call in count */
	u64 last;
	long n;             /* path length with its NUL; 0: nothing to fold into */
	char path[AW_STR_LEN];
};
BPF_HASH(repeats, u32, struct aw_repeat, AW_REPEAT_THREADS);
BPF_ARRAY(no_fold, u8, AW_MAX_RUNS + 1);   /* per run slot: 1 = a record per call (--no-fold) */

/* Write r's count as an aw_repeat_event (or count its calls lost). */
static __always_inline void aw_repeat_out(struct aw_repeat *r)
{
	struct aw_repeat_event *e = events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		aw_count_n(AW_CNT_LOST_EVENTS, r->count);
	} else {
		aw_fill_hdr(&e->h, AW_EV_REPEAT);
		e->nr = r->nr;
		e->count = r->count;
		e->orig_ts = r->ts;
		e->first = r->first;
		e->last = r->last;
		aw_count_n(AW_CNT_FOLDED, r->count);
		aw_count(AW_CNT_SEEN);
		events.ringbuf_submit(e, 0);
	}
	r->count = 0;
}

/* The thread writes another record: out with its count, nothing to fold into. */
static __always_inline void aw_repeat_break(void)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct aw_repeat *r = repeats.lookup(&tid);
	if (r && r->n) {
		if (r->count)
			aw_repeat_out(r);
		r->n = 0;
	}
}

/* The thread exits: out with its count, forget it. */
static __always_inline void aw_repeat_end(u32 tid)
{
	aw_repeat_break();
	repeats.delete(&tid);
}

/* Reserve a record in the bulk (prio 0) or priority ring buffer, or count
 * the loss against that ring. Inlined, so the size stays a constant the
 * verifier can check. Every record of a thread goes through here, so its
 * pending repeat count goes out first. */
static __always_inline void *aw_reserve_on(u32 size, int prio)
{
	aw_repeat_break();
	void *p = prio ? priority.ringbuf_reserve(size) : events.ringbuf_reserve(size);
	if (!p)
		aw_count(prio ? AW_CNT_LOST_PRIO : AW_CNT_LOST_EVENTS);
	return p;
}
#define AW_RESERVE(ptr) (ptr = aw_reserve_on(sizeof(*ptr), 0))
#define AW_RESERVE_ON(ptr, prio) (ptr = aw_reserve_on(sizeof(*ptr), prio))
#define AW_RESERVE_PRIO(ptr) AW_RESERVE_ON(ptr, 1)

static __always_inline void aw_submit_on(void *e, int prio)
{
	u32 idx = prio ? AW_CNT_SEEN_PRIO : AW_CNT_SEEN;
	u64 *c = counters.lookup(&idx);
	u64 n = 0;
	if (c)
		n = ++(*c);
	/* Bulk: wake the reader on every 64th record of this CPU only: a wake-up
	 * per event costs the agent microseconds of kernel time (measured: +17%
	 * on a file-heavy workload). The reader also drains on its own every
	 * 100 ms. Priority records are rare and may be a violation to act on:
	 * each wakes the reader. (bpf_ringbuf_submit finds its ring from the
	 * record, so either map name would do here.) */
	if (prio)
		priority.ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
	else
		events.ringbuf_submit(e, (n & 63) ? BPF_RB_NO_WAKEUP : BPF_RB_FORCE_WAKEUP);
}
#define aw_submit(e) aw_submit_on(e, 0)
#define aw_submit_prio(e) aw_submit_on(e, 1)
