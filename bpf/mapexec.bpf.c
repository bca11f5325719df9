/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Kill (or report) at an executable mapping of a file the policy does not
 * let run.
 *
 * `ld.so /dev/shm/tool` (or dlopen of a library from there) runs a file
 * without exec'ing it: the loader opens it and maps it with PROT_EXEC, which
 * Landlock's EXECUTE right (execve only) never sees, and no LSM hook loads on
 * the CI kernel. For a run whose filesystem section the kernel enforces,
 * this file remembers which of the agent's fds were opened by a path outside
 * the exec roots and, at the entry of an mmap(PROT_EXEC) of such an fd,
 * reports it; where filesystem.exec's action is kill (AW_MAPX_KILL) it sends
 * SIGKILL there, which is delivered before the mmap returns to user space,
 * so none of the file's code runs.
 *
 *  - at an open's return (aw_mapexec_open, from aw_sys_exit): the path as
 *    written is looked up in "exec_roots" (an LPM trie per run slot: the
 *    policy's exec roots and the library dirs, as written and resolved). An
 *    absolute, lexically clean path with no root marks (tgid, fd); any other
 *    open of that fd number clears its mark. A relative path, one with "..",
 *    "." or "//" components, or one longer than a key cannot be judged
 *    lexically: no mark (the userspace judge still sees the loader's argv).
 *  - close(), dup2()/dup3() onto an fd: its mark is cleared; close_range()
 *    and a successful exec start a new generation of the process's fd table
 *    (marks of an older generation are void), so a mark never outlives the
 *    open file it was made for and lands on another one;
 *  - mmap(PROT_EXEC, fd) of a marked fd of this generation: an AW_EV_MAPKILL
 *    record naming the path goes out on the priority ring (ret 1 when the
 *    process was killed at it: SIGKILL, counted in AW_CNT_KILLED).
 *
 * A forked child's inherited fds carry no mark (its fd table is a copy under
 * another tgid), a path that reaches an allowed file through a symlink is
 * judged as written, and mprotect(PROT_EXEC) of an existing mapping is not
 * watched: the BPF LSM path (bpf/lsm.bpf.c) judges all three by inode. The
 * marks live in an LRU map: under more open fds than it holds, the oldest
 * lose their mark (no kill in the kernel, the loader's argv is still judged).
 */

#define AW_PROT_EXEC     0x4
#define AW_MAP_ANONYMOUS 0x20

struct aw_fd_key {
	u32 tgid;
	s32 fd;
};

struct aw_fd_mark {
	u64 gen;                    /* fd_gen of the process when the fd was opened */
	char path[AW_PREFIX_LEN];   /* as the process wrote it */
};

BPF_ARRAY(mapexec_on, u8, AW_MAX_RUNS + 1);                     /* slot -> AW_MAPX_* or 0 */
BPF_LPM_TRIE(exec_roots, struct aw_prefix_key, u8, 4096);
/* sized by Sensors(map_exec=...): ~4 MB of kernel memory when a run needs
 * them, next to nothing otherwise (an LRU map is allocated in full) */
#ifndef AW_MAPEXEC_FDS
#define AW_MAPEXEC_FDS 64
#endif
BPF_TABLE("lru_hash", struct aw_fd_key, struct aw_fd_mark, fd_marks, AW_MAPEXEC_FDS);
BPF_HASH(fd_gen, u32, u64, AW_MAPEXEC_FDS);                     /* tgid -> fd table generation */

/* No "//", "/./", "/../" and no trailing "/", "/." or "/..": a lexical prefix
 * match of such a path says where the kernel resolved it. w holds the last
 * four bytes read, the latest lowest. The loop has the shape of the FNV loop
 * in priority.bpf.c: Linux 6.1's verifier refuses loops that clang enters by
 * falling through from inside them, and a flag carried through the loop
 * would multiply the verifier's states. p holds a NUL (the caller checks). */
static __always_inline int aw_clean_path(const char *p)
{
	u32 w = 0;
#pragma clang loop unroll(disable)
	for (u32 i = 0; i < AW_PREFIX_LEN; i++) {
		u8 c = p[i];
		if (!c)
			break;
		w = (w << 8) | c;
		if ((w & 0xffff) == 0x2f2f || (w & 0xffffff) == 0x2f2e2f || w == 0x2f2e2e2f)
			return 0;
	}
	return !((w & 0xff) == '/' || (w & 0xffff) == 0x2f2e || (w & 0xffffff) == 0x2f2e2e);
}

static __always_inline u64 aw_fd_gen_now(u32 tgid)
{
	u64 *gen = fd_gen.lookup(&tgid);
	if (gen)
		return *gen;
	u64 now = bpf_ktime_get_ns();
	fd_gen.update(&tgid, &now);
	return now;
}

/* A new generation of the process's fd table: every mark made so far is void. */
static __always_inline void aw_mapexec_new_gen(void)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (!fd_gen.lookup(&tgid))
		return;          /* no mark was ever made for this process */
	u64 now = bpf_ktime_get_ns();
	fd_gen.update(&tgid, &now);
}

/* An open returned fd: mark it when its path (b, as aw_sys_exit read it)
 * is outside every exec root. b's key header is overwritten. */
static __always_inline void aw_mapexec_open(struct aw_path_buf *b, s64 fd)
{
	u32 slot = aw_slot();
	u8 *on = mapexec_on.lookup(&slot);
	if (!on || !*on)
		return;
	struct aw_fd_key fk = {};
	fk.tgid = bpf_get_current_pid_tgid() >> 32;
	fk.fd = (s32)fd;
	long n = b->n;
	if (n <= 1 || n > AW_PREFIX_LEN || b->path[0] != '/' || !aw_clean_path(b->path)) {
		fd_marks.delete(&fk);
		return;
	}
	b->slot = slot;
	b->prefixlen = 32 + 8 * (n - 1);
	if (exec_roots.lookup((struct aw_prefix_key *)b)) {
		fd_marks.delete(&fk);
		return;
	}
	/* the key's slot and prefix length make room for the mark's
	 * generation: the path stays where it is (same layout from there) */
	struct aw_fd_mark *m = (struct aw_fd_mark *)b;
	m->gen = aw_fd_gen_now(fk.tgid);
	fd_marks.update(&fk, m);
}

static __always_inline void aw_mapexec_forget_fd(s32 fd)
{
	struct aw_fd_key fk = {};
	fk.tgid = bpf_get_current_pid_tgid() >> 32;
	fk.fd = fd;
	fd_marks.delete(&fk);
}

/* The programs below are attached only when a run needs them
 * (agentwatch/sensors/__init__.py, MAPEXEC_PROBES). */
int aw_mapx_close(struct aw_sys_enter_args *ctx)
{
	if (aw_watched())
		aw_mapexec_forget_fd((s32)ctx->args[0]);
	return 0;
}

int aw_mapx_dup(struct aw_sys_enter_args *ctx)    /* dup2, dup3: newfd is closed first */
{
	if (aw_watched())
		aw_mapexec_forget_fd((s32)ctx->args[1]);
	return 0;
}

int aw_mapx_crange(struct aw_sys_enter_args *ctx)
{
	if (aw_watched())
		aw_mapexec_new_gen();
	return 0;
}

int aw_mapx_mmap(struct aw_sys_enter_args *ctx)
{
	if (!(ctx->args[2] & AW_PROT_EXEC) || (ctx->args[3] & AW_MAP_ANONYMOUS))
		return 0;
	u32 slot = aw_slot();
	u8 *mode = mapexec_on.lookup(&slot);
	if (!mode || !*mode)
		return 0;
	struct aw_fd_key fk = {};
	fk.tgid = bpf_get_current_pid_tgid() >> 32;
	fk.fd = (s32)ctx->args[4];
	struct aw_fd_mark *m = fd_marks.lookup(&fk);
	if (!m)
		return 0;
	u64 *gen = fd_gen.lookup(&fk.tgid);
	if (!gen || *gen != m->gen)
		return 0;
	int kill = *mode == AW_MAPX_KILL;
	if (kill) {
		bpf_send_signal(9);
		aw_count(AW_CNT_KILLED);
	}
	struct aw_syscall_event *e;
	if (!AW_RESERVE_PRIO(e))
		return 0;
	aw_fill_hdr(&e->h, AW_EV_MAPKILL);
	e->nr = ctx->nr;
	e->ret = kill;     /* 1: killed at it, 0: reported only */
	e->len2 = 0;
#pragma unroll
	for (int i = 0; i < 6; i++)
		e->args[i] = ctx->args[i];
	e->extra[0] = 0;
	e->extra[1] = 0;
	bpf_probe_read_kernel_str(e->str1, sizeof(m->path), m->path);
	e->data2[0] = 0;
	aw_submit_prio(e);
	return 0;
}
