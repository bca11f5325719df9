/* SPDX-License-Identifier: GPL-2.0 */
/*
 * BPF LSM enforcement for agent cgroups (agentwatch/guards/lsm.py).
 *
 * Programs (BPF_PROG_TYPE_LSM, attach type BPF_LSM_MAC), loaded by lsm.py
 * under these names so the kernel lists them as aw_* like every agentwatch
 * program (bcc's LSM_PROBE would name them after the hook, "bprm_check_secu"
 * and so on, because bcc finds the attach target from the function name):
 *   aw_lsm_exec      bprm_check_security  exec of a file that is not in
 *                                          lsm_exec_allow, by its inode or an
 *                                          ancestor directory's (also runs for
 *                                          the script of a #! exec and memfd
 *                                          fexecve)
 *   aw_lsm_open      file_open            open of an inode in lsm_file_deny, or
 *                                          of a file below a directory in it
 *   aw_lsm_connect   socket_connect       AF_INET/AF_INET6 connect to a port
 *                                          not in lsm_port_allow; AF_UNIX
 *                                          connect (pathname or abstract)
 *                                          under AW_LSM_CFG_UNIX
 *   aw_lsm_sendmsg   socket_sendmsg       a datagram to a unix socket
 *                                          address, under AW_LSM_CFG_UNIX
 *                                          (the cgroup unix hooks' job on
 *                                          Linux 6.7+)
 *   aw_lsm_mmap      mmap_file            PROT_EXEC mapping of a file not in
 *                                          lsm_exec_allow, as for exec (exec
 *                                          through the dynamic loader: ld.so
 *                                          maps the program itself)
 *   aw_lsm_mprotect  file_mprotect        making a file mapping executable
 *                                          later (mmap PROT_READ + mprotect)
 *   aw_lsm_kill      task_kill            a signal to a process outside the
 *                                          watched cgroups (agentwatch, the
 *                                          daemon, another run, the host),
 *                                          as Landlock's signal scope does
 *                                          from ABI 6 (Linux 6.12)
 * Each program first looks up the caller's cgroup id in lsm_watched; every
 * other process pays one hash lookup and is never denied. A refused call
 * fails with EPERM and one record goes to the lsm_events ring buffer.
 *
 * KERNEL STRUCTS: unlike the other agentwatch BPF sources, this file reads
 * kernel structs (linux_binprm, file, inode, super_block, dentry,
 * vm_area_struct) at offsets taken from the kernel headers bcc compiles
 * against. That is only correct when those headers belong to exactly the
 * running kernel; lsm.py refuses to load otherwise (check_headers()). The
 * sockaddr read by aw_lsm_connect is a uapi struct.
 *
 * Files are identified by (inode number, device of its superblock), as the
 * kernel sees them: inode->i_ino and inode->i_sb->s_dev (kernel dev_t,
 * MAJOR << 20 | MINOR). Userspace derives the same pair from fstat() and the
 * mount's major:minor in /proc/self/mountinfo (they differ from st_dev on
 * overlayfs, whose st_dev is the lower layer's).
 *
 * Records, map keys and the constants userspace shares are in guards.h.
 */
#ifndef AW_LSM_BPF_C
#define AW_LSM_BPF_C

#include "guards.h"
#include <linux/binfmts.h>
#include <linux/dcache.h>
#include <linux/fs.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/mm_types.h>
#include <linux/sched.h>
#include <linux/socket.h>
#include <linux/cgroup-defs.h>
#include <linux/kernfs.h>

struct socket;                  /* only passed through: <linux/net.h> costs compile time */

#ifndef AW_LSM_RINGBUF_PAGES
#define AW_LSM_RINGBUF_PAGES 64 /* 256 KiB: denials are rare, and each is refused anyway */
#endif
#ifndef AW_LSM_MAX_DEPTH
#define AW_LSM_MAX_DEPTH 24     /* ancestor directories looked up per judged file */
#endif
#ifndef AW_LSM_MAX_CGROUPS
#define AW_LSM_MAX_CGROUPS 1024
#endif

#define AW_LSM_EPERM 1
#define AW_LSM_AF_INET  2
#define AW_LSM_AF_INET6 10
#define AW_LSM_AF_UNIX  1
#define AW_LSM_PROT_EXEC 0x4

BPF_HASH(lsm_watched, u64, u32, AW_LSM_MAX_CGROUPS);
BPF_HASH(lsm_exec_allow, struct aw_lsm_key, u8, AW_LSM_MAX_ALLOW);
BPF_HASH(lsm_file_deny, struct aw_lsm_key, u8, AW_LSM_MAX_DENY);
BPF_ARRAY(lsm_port_allow, u8, 65536);
BPF_ARRAY(lsm_cfg, u32, 1);
BPF_PERCPU_ARRAY(lsm_counters, u64, AW_LSM_CNT_MAX);
BPF_RINGBUF_OUTPUT(lsm_events, AW_LSM_RINGBUF_PAGES);

static __always_inline void aw_lsm_count(u32 idx)
{
	u64 *c = lsm_counters.lookup(&idx);
	if (c)
		(*c)++;
}

/* lsm_cfg flags, or 0 when the caller's cgroup is not watched */
static __always_inline u32 aw_lsm_cfg(void)
{
	u64 cg = bpf_get_current_cgroup_id();
	if (!lsm_watched.lookup(&cg))
		return 0;
	u32 zero = 0;
	u32 *c = lsm_cfg.lookup(&zero);
	return c ? *c : 0;
}

/* (ino, dev) of an inode; 0 when there is none */
static __always_inline int aw_lsm_inode_key(struct inode *inode, struct aw_lsm_key *k)
{
	struct super_block *sb = NULL;
	dev_t dev = 0;
	unsigned long ino = 0;
	if (!inode)
		return 0;
	bpf_probe_read_kernel(&ino, sizeof(ino), &inode->i_ino);
	bpf_probe_read_kernel(&sb, sizeof(sb), &inode->i_sb);
	if (sb)
		bpf_probe_read_kernel(&dev, sizeof(dev), &sb->s_dev);
	k->ino = ino;
	k->dev = dev;
	k->pad = 0;
	return 1;
}

/* (ino, dev) of a file */
static __always_inline int aw_lsm_file_key(struct file *file, struct aw_lsm_key *k)
{
	struct inode *inode = NULL;
	if (!file)
		return 0;
	bpf_probe_read_kernel(&inode, sizeof(inode), &file->f_inode);
	return aw_lsm_inode_key(inode, k);
}

/* (ino, dev) of a dentry's inode; 0 for a negative dentry */
static __always_inline int aw_lsm_dentry_key(struct dentry *d, struct aw_lsm_key *k)
{
	struct inode *inode = NULL;
	bpf_probe_read_kernel(&inode, sizeof(inode), &d->d_inode);
	return aw_lsm_inode_key(inode, k);
}

static __always_inline int aw_lsm_in_set(int deny, struct aw_lsm_key *k)
{
	if (deny)
		return lsm_file_deny.lookup(k) != NULL;
	return lsm_exec_allow.lookup(k) != NULL;
}

/* Is the file (key k), or one of its AW_LSM_MAX_DEPTH nearest ancestor
 * directories, in the allow (deny=0) or deny (deny=1) set? Directories are
 * keyed like files, so userspace names /usr/lib with one entry instead of
 * enumerating ~100,000 files. The walk follows the name the file was opened
 * by (f_path) up its filesystem's dentry tree and stops at that
 * filesystem's root: a hard link elsewhere is judged by where it is, which
 * is why the deny set also holds every file's own inode. */
static __always_inline int aw_lsm_under(int deny, struct file *file, struct aw_lsm_key *k)
{
	if (aw_lsm_in_set(deny, k))
		return 1;
	struct dentry *d = NULL, *parent = NULL;
	struct aw_lsm_key dk = {};
	bpf_probe_read_kernel(&d, sizeof(d), &file->f_path.dentry);
#pragma unroll
	for (int i = 0; i < AW_LSM_MAX_DEPTH; i++) {
		if (!d)
			return 0;
		parent = NULL;
		bpf_probe_read_kernel(&parent, sizeof(parent), &d->d_parent);
		if (!parent || parent == d)
			return 0;       /* the filesystem's root */
		d = parent;
		if (aw_lsm_dentry_key(d, &dk) && aw_lsm_in_set(deny, &dk))
			return 1;
	}
	return 0;
}

/* the file's basename (dentry name) as evidence */
static __always_inline void aw_lsm_file_name(struct file *file, char *dst)
{
	struct dentry *d = NULL;
	const unsigned char *name = NULL;
	bpf_probe_read_kernel(&d, sizeof(d), &file->f_path.dentry);
	if (!d)
		return;
	bpf_probe_read_kernel(&name, sizeof(name), &d->d_name.name);
	if (name)
		bpf_probe_read_kernel_str(dst, AW_LSM_NAME_LEN, name);
}

/* Reserve a denial record (zeroed, header filled) or count the loss. */
static __always_inline struct aw_lsm_event *aw_lsm_reserve(u32 hook)
{
	aw_lsm_count(AW_LSM_CNT_DENIED);
	struct aw_lsm_event *e = lsm_events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		aw_lsm_count(AW_LSM_CNT_LOST);
		return NULL;
	}
	__builtin_memset(e, 0, sizeof(*e));
	u64 id = bpf_get_current_pid_tgid();
	e->ts = bpf_ktime_get_ns();
	e->cgroup = bpf_get_current_cgroup_id();
	e->pid = id >> 32;
	e->tid = (u32)id;
	e->uid = (u32)bpf_get_current_uid_gid();
	e->hook = hook;
	e->ret = -AW_LSM_EPERM;
	bpf_get_current_comm(&e->comm, sizeof(e->comm));
	return e;
}

static __always_inline int aw_lsm_deny_file(u32 hook, struct file *file,
					    struct aw_lsm_key *k, u64 prot, u64 flags)
{
	struct aw_lsm_event *e = aw_lsm_reserve(hook);
	if (e) {
		e->ino = k->ino;
		e->dev = k->dev;
		e->prot = prot;
		e->flags = flags;
		aw_lsm_file_name(file, e->name);
		lsm_events.ringbuf_submit(e, 0);
	}
	return -AW_LSM_EPERM;
}

/* exec: the file must be in the allow set. Runs once per binfmt round, so a
 * #! script is judged, then its interpreter. */
BPF_PROG(aw_lsm_exec, struct linux_binprm *bprm, int ret)
{
	if (ret)
		return ret;
	u32 cfg = aw_lsm_cfg();
	if (!(cfg & AW_LSM_CFG_EXEC))
		return 0;
	struct file *file = NULL;
	struct aw_lsm_key k = {};
	bpf_probe_read_kernel(&file, sizeof(file), &bprm->file);
	if (aw_lsm_file_key(file, &k) && aw_lsm_under(0, file, &k))
		return 0;
	struct aw_lsm_event *e = aw_lsm_reserve(AW_LSM_H_EXEC);
	if (e) {
		const char *fname = NULL;
		e->ino = k.ino;
		e->dev = k.dev;
		bpf_probe_read_kernel(&fname, sizeof(fname), &bprm->filename);
		if (fname)
			bpf_probe_read_kernel_str(e->name, sizeof(e->name), fname);
		lsm_events.ringbuf_submit(e, 0);
	}
	return -AW_LSM_EPERM;
}

/* open: inodes in the deny set cannot be opened (any name, hard links,
 * /proc/self/root detours, and the open done by exec all reach this hook) */
BPF_PROG(aw_lsm_open, struct file *file, int ret)
{
	if (ret)
		return ret;
	u32 cfg = aw_lsm_cfg();
	if (!(cfg & AW_LSM_CFG_OPEN))
		return 0;
	struct aw_lsm_key k = {};
	if (!aw_lsm_file_key(file, &k) || !aw_lsm_under(1, file, &k))
		return 0;
	unsigned int fl = 0;
	bpf_probe_read_kernel(&fl, sizeof(fl), &file->f_flags);
	return aw_lsm_deny_file(AW_LSM_H_OPEN, file, &k, fl, 0);
}

/* connect: AF_INET / AF_INET6 destinations whose port is not allowed. The
 * sockaddr is the kernel's copy of the caller's (uapi layout). */
static __always_inline int aw_lsm_deny_unix(u32 hook)
{
	struct aw_lsm_event *e = aw_lsm_reserve(hook);
	if (e) {
		e->family = AW_LSM_AF_UNIX;
		lsm_events.ringbuf_submit(e, 0);
	}
	return -AW_LSM_EPERM;
}

BPF_PROG(aw_lsm_connect, struct socket *sock, struct sockaddr *address, int addrlen, int ret)
{
	if (ret)
		return ret;
	u32 cfg = aw_lsm_cfg();
	if (!(cfg & (AW_LSM_CFG_CONNECT | AW_LSM_CFG_UNIX)))
		return 0;
	u16 family = 0;
	if (addrlen < (int)sizeof(family))
		return 0;       /* no family: the kernel refuses it */
	bpf_probe_read_kernel(&family, sizeof(family), &address->sa_family);
	if (family == AW_LSM_AF_UNIX)
		return (cfg & AW_LSM_CFG_UNIX) ? aw_lsm_deny_unix(AW_LSM_H_CONNECT) : 0;
	if (!(cfg & AW_LSM_CFG_CONNECT))
		return 0;
	if (addrlen < (int)sizeof(struct sockaddr_in))
		return 0;       /* too short for an inet address: the kernel refuses it */
	if (family != AW_LSM_AF_INET && family != AW_LSM_AF_INET6)
		return 0;
	struct sockaddr_in6 sa = {};
	if (family == AW_LSM_AF_INET6) {
		if (addrlen < (int)sizeof(struct sockaddr_in6))
			return 0;
		bpf_probe_read_kernel(&sa, sizeof(sa), address);
	} else {
		bpf_probe_read_kernel(&sa, sizeof(struct sockaddr_in), address);
	}
	u32 port = bpf_ntohs(sa.sin6_port);   /* same offset in sockaddr_in */
	u8 *ok = lsm_port_allow.lookup(&port);
	if (ok && *ok)
		return 0;
	struct aw_lsm_event *e = aw_lsm_reserve(AW_LSM_H_CONNECT);
	if (e) {
		e->family = family;
		e->port = port;
		if (family == AW_LSM_AF_INET)
			__builtin_memcpy(e->addr, &((struct sockaddr_in *)&sa)->sin_addr, 4);
		else
			__builtin_memcpy(e->addr, &sa.sin6_addr, 16);
		lsm_events.ringbuf_submit(e, 0);
	}
	return -AW_LSM_EPERM;
}

/* mmap: an executable mapping of a file must be of an allowed inode.
 * Anonymous executable memory (JITs) is not judged here. */
BPF_PROG(aw_lsm_mmap, struct file *file, unsigned long reqprot, unsigned long prot,
	 unsigned long flags, int ret)
{
	if (ret)
		return ret;
	if (!file || !(prot & AW_LSM_PROT_EXEC))
		return 0;
	u32 cfg = aw_lsm_cfg();
	if (!(cfg & AW_LSM_CFG_EXEC))
		return 0;
	struct aw_lsm_key k = {};
	if (aw_lsm_file_key(file, &k) && aw_lsm_under(0, file, &k))
		return 0;
	return aw_lsm_deny_file(AW_LSM_H_MMAP, file, &k, prot, flags);
}

/* mprotect: turning a file mapping executable later is judged like mmap */
BPF_PROG(aw_lsm_mprotect, struct vm_area_struct *vma, unsigned long reqprot,
	 unsigned long prot, int ret)
{
	if (ret)
		return ret;
	if (!(prot & AW_LSM_PROT_EXEC))
		return 0;
	u32 cfg = aw_lsm_cfg();
	if (!(cfg & AW_LSM_CFG_EXEC))
		return 0;
	struct file *file = NULL;
	bpf_probe_read_kernel(&file, sizeof(file), &vma->vm_file);
	if (!file)
		return 0;
	struct aw_lsm_key k = {};
	if (aw_lsm_file_key(file, &k) && aw_lsm_under(0, file, &k))
		return 0;
	return aw_lsm_deny_file(AW_LSM_H_MPROTECT, file, &k, prot, 0);
}

/* sendmsg: a datagram addressed to a unix socket (sendto, sendmsg with a
 * name). msg_name is the kernel's copy of the caller's address. */
BPF_PROG(aw_lsm_sendmsg, struct socket *sock, struct msghdr *msg, int size, int ret)
{
	if (ret)
		return ret;
	u32 cfg = aw_lsm_cfg();
	if (!(cfg & AW_LSM_CFG_UNIX))
		return 0;
	void *name = NULL;
	int namelen = 0;
	u16 family = 0;
	bpf_probe_read_kernel(&name, sizeof(name), &msg->msg_name);
	bpf_probe_read_kernel(&namelen, sizeof(namelen), &msg->msg_namelen);
	if (!name || namelen < (int)sizeof(family))
		return 0;
	bpf_probe_read_kernel(&family, sizeof(family), name);
	return family == AW_LSM_AF_UNIX ? aw_lsm_deny_unix(AW_LSM_H_SENDMSG) : 0;
}

/* kill: a user signal (kill, tkill, tgkill, pidfd_send_signal, sigqueue)
 * to a task whose cgroup v2 is not one this guard watches. Signals the
 * kernel sends itself (SIGCHLD to the parent, SIGPIPE) do not come here. */
BPF_PROG(aw_lsm_kill, struct task_struct *p, struct kernel_siginfo *info, int sig,
	 const struct cred *cred, int ret)
{
	if (ret)
		return ret;
	u32 cfg = aw_lsm_cfg();
	if (!(cfg & AW_LSM_CFG_SIGNAL))
		return 0;
	struct css_set *cset = NULL;
	struct cgroup *cgrp = NULL;
	struct kernfs_node *kn = NULL;
	u64 target = 0;
	pid_t tgid = 0;
	bpf_probe_read_kernel(&cset, sizeof(cset), &p->cgroups);
	if (cset)
		bpf_probe_read_kernel(&cgrp, sizeof(cgrp), &cset->dfl_cgrp);
	if (cgrp)
		bpf_probe_read_kernel(&kn, sizeof(kn), &cgrp->kn);
	if (kn)
		bpf_probe_read_kernel(&target, sizeof(target), &kn->id);
	if (target && lsm_watched.lookup(&target))
		return 0;
	bpf_probe_read_kernel(&tgid, sizeof(tgid), &p->tgid);
	struct aw_lsm_event *e = aw_lsm_reserve(AW_LSM_H_KILL);
	if (e) {
		e->prot = (u32)sig;
		e->flags = (u32)tgid;
		e->ino = target;
		lsm_events.ringbuf_submit(e, 0);
	}
	return -AW_LSM_EPERM;
}

#endif /* AW_LSM_BPF_C */
