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
#ifndef AW_MAX_RUNS
#define AW_MAX_RUNS 1024
#endif

/* cgroup v2 id -> run slot. Filled by userspace before the agent may exec;
 * every program checks it first so other processes cost one hash lookup. */
BPF_HASH(watched, u64, u32, AW_MAX_RUNS);
BPF_RINGBUF_OUTPUT(events, AW_RINGBUF_PAGES);
/* tgids of the agents' processes (added at fork and exec, removed at exit),
 * so probes running in another process (signal_generate runs in the
 * sender) can tell whether their target is an agent's */
BPF_HASH(live, u32, u8, 65536);
BPF_PERCPU_ARRAY(counters, u64, AW_CNT_MAX);

static __always_inline int aw_watched(void)
{
	u64 cg = bpf_get_current_cgroup_id();
	return watched.lookup(&cg) != NULL;
}

static __always_inline void aw_count(u32 idx)
{
	u64 *c = counters.lookup(&idx);
	if (c)
		(*c)++;
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

/* Reserve a record in the ring buffer or count the loss. Inlined, so the
 * size stays a constant the verifier can check. */
static __always_inline void *aw_reserve(u32 size)
{
	void *p = events.ringbuf_reserve(size);
	if (!p)
		aw_count(AW_CNT_LOST_EVENTS);
	return p;
}
#define AW_RESERVE(ptr) (ptr = aw_reserve(sizeof(*ptr)))

static __always_inline void aw_submit(void *e)
{
	u32 idx = AW_CNT_SEEN;
	u64 *c = counters.lookup(&idx);
	u64 n = 0;
	if (c)
		n = ++(*c);
	/* Wake the reader on every 64th record of this CPU only: a wake-up per
	 * event costs the agent microseconds of kernel time (measured: +17% on a
	 * file-heavy workload). The reader also drains on its own every 100 ms. */
	events.ringbuf_submit(e, (n & 63) ? BPF_RB_NO_WAKEUP : BPF_RB_FORCE_WAKEUP);
}
