/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Event records and constants shared by every agentwatch sensor.
 *
 * agentwatch/sensors/records.py mirrors these structs field by field;
 * tests/unit/test_records.py compiles this header with the host compiler and
 * checks that sizes and offsets agree, so the two cannot drift apart.
 *
 * Only fixed-width types are used so the layout is the same for the BPF
 * target and for the host compiler.
 */
#ifndef AW_EVENTS_H
#define AW_EVENTS_H

#define AW_EV_SYSCALL 1  /* a watched syscall returned (file, net, sensitive) */
#define AW_EV_EXEC    2  /* execve/execveat entered: filename and argv */
#define AW_EV_FORK    3  /* a new process (not a thread) was created */
#define AW_EV_EXIT    4  /* the last thread of a process exited */
#define AW_EV_NOENTRY 5  /* aw_syscall_event of a watched syscall that returned -EPERM
                          * with no entry seen: seccomp refused it before the
                          * sys_enter tracepoint; str1 and data2 are empty; args
                          * are the call's arguments, read from the task's saved
                          * registers, when extra[0] is AW_NOENTRY_ARGS (built
                          * with -DAW_EXIT_ARGS: x86_64, Linux 5.15+, BTF), else 0 */
#define AW_NOENTRY_ARGS 1
#define AW_EV_MAPKILL 6  /* aw_syscall_event of an mmap(PROT_EXEC) of a file opened outside
                          * the exec roots (bpf/mapexec.bpf.c): the mmap's args, str1 the
                          * path the fd was opened by, ret 1 when the process was killed
                          * at it (AW_MAPX_KILL), 0 when only reported */
#define AW_EV_REFUSED 8  /* aw_syscall_event of a syscall with no record of its own (stash
                          * only, or exit only) that returned an errno of its spec's refuse
                          * mask: -EAGAIN of a fork at the pids limit, -EACCES of a device
                          * ioctl Landlock refuses. args are the call's (from the entry's
                          * stash, or read at exit as for AW_EV_NOENTRY); never sent when
                          * neither was possible */
#define AW_EV_REPEAT  7  /* aw_repeat_event: the thread's last record (a bulk file record)
                          * happened count more times, identically (bpf/common.bpf.c) */

#define AW_COMM_LEN  16
#define AW_STR_LEN   256  /* paths are cut here; the event says so */
#define AW_ARGC_MAX  20
#define AW_ARG_LEN   128

/* Per-CPU counters (map "counters"): every event the kernel could not
 * deliver is counted here, never dropped silently. Each ring buffer has its
 * own pair (bulk: "events", priority: "priority"; see common.bpf.c). */
#define AW_CNT_LOST_EVENTS 0  /* bulk ring buffer full: event lost (a repeat count: its calls) */
#define AW_CNT_LOST_STASH  1  /* syscall-entry stash full: syscall not recorded */
#define AW_CNT_SEEN        2  /* events submitted to the bulk ring buffer */
#define AW_CNT_LOST_PRIO   3  /* priority ring buffer full: event lost */
#define AW_CNT_SEEN_PRIO   4  /* events submitted to the priority ring buffer */
#define AW_CNT_KILLED      5  /* processes killed in the kernel (bpf_send_signal): at an open's
                              * return, or at an mmap(PROT_EXEC) (mapexec.bpf.c) */
#define AW_CNT_FOLDED      6  /* calls folded into the count of an aw_repeat_event written
                              * (a lost one's calls count in AW_CNT_LOST_EVENTS instead) */

/* values of the sensitive_prefixes / sensitive_names maps (priority.bpf.c) */
#define AW_ROUTE_PRIO 0x1       /* the record travels the priority ring */
#define AW_ROUTE_KILL 0x2       /* an exact match of a kill-on-open path */

/* values of the mapexec_on map (mapexec.bpf.c), per run slot */
#define AW_MAPX_REPORT 1        /* report an mmap(PROT_EXEC) of a marked fd */
#define AW_MAPX_KILL   2        /* ... and SIGKILL the process at it */
#define AW_CNT_MAX         8

/* Per-syscall spec (map "specs", indexed by syscall number), written by
 * agentwatch/sensors/syscalls.py. Argument indexes are 0..5; AW_NOARG
 * means "none". */
#define AW_NOARG 0xff
#define AW_SPEC_EMIT       0x01  /* emit an event when the syscall returns */
#define AW_SPEC_WATCH      0x10  /* set for every watched syscall: stash its arguments */
#define AW_SPEC_NEED_ADDR  0x02  /* ... but only when the address argument is set */
#define AW_SPEC_EXEC       0x04  /* emit filename + argv at entry */
#define AW_SPEC_EXIT_GROUP 0x08  /* remember args[0] as the process exit code */
#define AW_SPEC_DENIED     0x20  /* the seccomp filter refuses it with EPERM: report an
                                  * exit with -EPERM and no entry as AW_EV_NOENTRY */
#define AW_SPEC_OPEN       0x80  /* open/openat/openat2/creat: a kill-on-open path may apply */
#define AW_SPEC_PRIORITY   0x40  /* records go to the priority ring buffer (process, net, sensitive, chdir) */

/* refuse mask of struct aw_spec: the errnos a sandbox layer other than
 * seccomp answers a syscall that has no record of its own */
#define AW_REFUSE_EACCES 0x01
#define AW_REFUSE_EAGAIN 0x02

struct aw_spec {
	__u8 flags;
	__u8 path1;    /* user string: path or name */
	__u8 path2;    /* second user string (rename, link, symlink target) */
	__u8 addr;     /* struct sockaddr * */
	__u8 addrlen;  /* its length */
	__u8 msghdr;   /* struct user_msghdr * (sendmsg): its msg_name */
	__u8 deref;    /* pointer to a struct whose first 16 bytes are copied (open_how, clone_args) */
	__u8 argv;     /* char **argv (exec) */
	__u8 refuse;   /* AW_REFUSE_*: report these returns as AW_EV_REFUSED */
	__u8 pad[7];
};

struct aw_hdr {
	__u32 type;
	__u32 pid;     /* thread group id */
	__u32 tid;
	__u32 uid;
	__u64 ts;      /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 cgroup;  /* cgroup v2 id */
	char comm[AW_COMM_LEN];
};

struct aw_syscall_event {
	struct aw_hdr h;
	__s32 nr;
	__u32 len2;            /* bytes valid in data2 when it holds a sockaddr */
	__s64 ret;
	__u64 args[6];
	__u64 extra[2];        /* first 16 bytes behind spec.deref */
	char str1[AW_STR_LEN];
	__u8 data2[AW_STR_LEN]; /* second path, or the raw sockaddr */
};

struct aw_exec_event {
	struct aw_hdr h;
	__u32 argc;            /* arguments copied */
	__u32 truncated;       /* 1 when argv had more than AW_ARGC_MAX entries */
	char filename[AW_STR_LEN];
	char argv[AW_ARGC_MAX][AW_ARG_LEN];
};

/* Repeats (bpf/common.bpf.c): calls identical to the record stamped orig_ts
 * (same thread, syscall, arguments, absolute path and result), with no other
 * record of the thread in between, folded into a count. h.ts is when this
 * record was written: just before the thread's next record, at its exit, or
 * once a second while it keeps repeating. */
struct aw_repeat_event {
	struct aw_hdr h;
	__s32 nr;
	__u32 count;           /* identical calls after the record stamped orig_ts */
	__u64 orig_ts;         /* h.ts of the record they repeat */
	__u64 first;           /* the first of them */
	__u64 last;            /* the last of them */
};

struct aw_fork_event {
	struct aw_hdr h;
	__u32 child;
	__u32 pad;
};

struct aw_exit_event {
	struct aw_hdr h;
	__s32 code;    /* exit_group() status & 0xff, or -1 when the process did not call it */
	__s32 sig;     /* fatal signal seen delivered, or 0 */
};

/* Sensitive paths, per run slot (maps "sensitive_prefixes", an LPM trie,
 * and "sensitive_names", a hash), filled by agentwatch/sensors/__init__.py
 * from the policy's filesystem.deny patterns: a file record whose path has
 * one of the prefixes, or one of the basenames, travels the priority ring
 * (bpf/priority.bpf.c).
 * An LPM trie key holds at most 256 bytes of data: the slot, then the path. */
#define AW_PREFIX_LEN 248

struct aw_prefix_key {
	__u32 prefixlen;   /* in bits: 32 (the slot) + 8 per path byte */
	__u32 slot;
	char path[AW_PREFIX_LEN];
};

struct aw_name_key {
	__u32 slot;
	__u32 pad;
	__u64 hash;        /* FNV-1a 64 of the basename's bytes */
};

#endif
