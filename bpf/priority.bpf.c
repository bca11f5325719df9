/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Which ring buffer a syscall record travels (see common.bpf.c): priority
 * for what a verdict or the process tree depends on, bulk for the rest.
 *
 * The policy's filesystem.deny patterns reach the kernel in the simplest form
 * that can be matched cheaply here, per run slot (written by
 * agentwatch/sensors/__init__.py from CompiledPolicy.kernel_routes()):
 *  - "sensitive_prefixes", an LPM trie of the literal leading directories of
 *    each pattern after variable expansion (${HOME}/.ssh/ and all below ->
 *    /home/u/.ssh): one lookup answers "is this absolute path under a denied
 *    prefix";
 *  - "sensitive_names", a hash set of the literal last segments of patterns
 *    (.env for a .env anywhere, .netrc for ${HOME}/.netrc), keyed by their
 *    FNV-1a hash: the only hint a relative path gives, since the process's
 *    cwd is not a tracepoint argument.
 * Both over-approximate (a prefix matches /home/u/.sshfoo too): routing only
 * decides the ring, userspace still judges every record. The match is lexical
 * on the path as written: "..", "//", symlinks, /proc/self/root detours and
 * relative paths without a listed basename travel the bulk ring, where a
 * loss is still counted.
 */

#define AW_EPERM  1
#define AW_EACCES 13
#define AW_FNV_BASIS 0xcbf29ce484222325ULL
#define AW_FNV_PRIME 0x100000001b3ULL

BPF_LPM_TRIE(sensitive_prefixes, struct aw_prefix_key, u8, 4096);
BPF_HASH(sensitive_names, struct aw_name_key, u8, 4096);
/* A record's paths, each read from user memory once per syscall exit (see
 * aw_sys_exit): routing, the mapping kill and the record copy all use it.
 * The first 256 bytes are an aw_prefix_key, for the LPM tries. */
struct aw_path_buf {
	u32 prefixlen;
	u32 slot;
	char path[AW_STR_LEN];
	long n;              /* bpf_probe_read_user_str's answer: length with the NUL, or < 0 */
};
BPF_PERCPU_ARRAY(path_bufs, struct aw_path_buf, 2);   /* [0] path1, [1] path2: too big for the stack */

/* Read user string upath into path buffer idx; NULL when there is no buffer. */
static __always_inline struct aw_path_buf *aw_read_path(u32 idx, u64 upath)
{
	struct aw_path_buf *b = path_bufs.lookup(&idx);
	if (!b)
		return NULL;
	b->n = upath ? bpf_probe_read_user_str(b->path, sizeof(b->path), (void *)upath) : 0;
	if (b->n <= 0)
		b->path[0] = 0;
	return b;
}

/* The map value of the path's match (AW_ROUTE_* bits), 0 when none. */
static __always_inline int aw_sensitive_path(u32 slot, struct aw_path_buf *k)
{
	long n = k->n;
	if (n <= 1 || n > AW_PREFIX_LEN)
		return 0;
	k->slot = slot;
	k->prefixlen = 32 + 8 * (n - 1);   /* the path's own length: bytes after its NUL are stale */
	u8 *v = NULL;
	if (k->path[0] == '/')
		v = sensitive_prefixes.lookup((struct aw_prefix_key *)k);
	if (v)
		return *v;
	/* The basename as a hash (FNV-1a, reset at each '/'), not a copy: a
	 * copy needs the basename's offset, a value the verifier must then
	 * track exactly on every path through this loop (too many states); a
	 * hash it never has to know. A collision only routes a record to the
	 * priority ring that did not need it. */
	u64 h = AW_FNV_BASIS;
#pragma clang loop unroll(disable)
	for (u32 i = 0; i < AW_PREFIX_LEN; i++) {
		u8 c = k->path[i];
		if (!c)
			break;
		h = c == '/' ? AW_FNV_BASIS : (h ^ c) * AW_FNV_PRIME;
	}
	struct aw_name_key nk = {};
	nk.slot = slot;
	nk.hash = h;
	v = sensitive_names.lookup(&nk);
	return v ? *v : 0;
}

/* AW_ROUTE_PRIO when a syscall exit record goes to the priority ring, plus
 * AW_ROUTE_KILL when one of its paths is an exact kill-on-open match (see
 * aw_sys_exit). path1/path2: the record's paths as read (NULL when none). */
static __always_inline int aw_priority(const struct aw_spec *sp, s64 ret,
				       struct aw_path_buf *path1, struct aw_path_buf *path2)
{
	if (sp->flags & AW_SPEC_PRIORITY)
		return 1;
	if (ret == -AW_EACCES || ret == -AW_EPERM)
		return 1;   /* a kernel denial */
	if (ret < 0)
		return 0;   /* ENOENT & co: nothing was touched */
	u32 slot = aw_slot();
	int r = path1 ? aw_sensitive_path(slot, path1) : 0;
	if (!r && path2)
		r = aw_sensitive_path(slot, path2);
	return r;
}
