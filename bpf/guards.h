/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Records, map keys and constants of the kernel guards: cgroup BPF egress
 * (bpf/egress.bpf.c) and BPF LSM (bpf/lsm.bpf.c), each with its own maps
 * and ring buffer. Both programs include this header; nothing else of them
 * is shared.
 *
 * agentwatch/guards/records.py mirrors these structs field by field and
 * these constants by name (AW_X is records.X); tests/unit/test_guard_records.py
 * compiles this header with the host compiler and checks that every struct,
 * field offset, size and constant agrees, as tests/unit/test_records.py does
 * for events.h.
 *
 * Only fixed-width types are used so the layout is the same for the BPF
 * target and for the host compiler.
 */
#ifndef AW_GUARDS_H
#define AW_GUARDS_H

/* ---- cgroup BPF egress (bpf/egress.bpf.c, agentwatch/guards/egress.py) ---- */

#define AW_EG_MAX_RANGES 16     /* port ranges per prefix (allow-map value) */

/* protocol classes, as bits: a range allows the classes in its mask */
#define AW_EG_P_TCP   0x1       /* IPPROTO_TCP, IPPROTO_MPTCP */
#define AW_EG_P_UDP   0x2       /* IPPROTO_UDP, IPPROTO_UDPLITE */
#define AW_EG_P_OTHER 0x4
#define AW_EG_P_ANY   0x7

/* allow-map value flags */
#define AW_EG_F_LOOPBACK 0x1    /* prefix lies in the loopback zone */

/* egress_cfg[AW_EG_CFG_FLAGS] flags: socket families the agent may create,
 * and whether connects go to the egress guard (guards/guard.py) */
#define AW_EG_CFG_INET  0x1
#define AW_EG_CFG_INET6 0x2
#define AW_EG_CFG_GUARD 0x4

/* egress_cfg indexes: the flags, then the run's guard ports (host order;
 * 0: none, e.g. no ::1 on this host, and then that family is denied) */
#define AW_EG_CFG_FLAGS  0
#define AW_EG_CFG_PROXY4 1      /* TCP proxy on 127.0.0.1 */
#define AW_EG_CFG_PROXY6 2      /* TCP proxy on ::1 */
#define AW_EG_CFG_DNS4   3      /* DNS responder (UDP and TCP) on 127.0.0.1 */
#define AW_EG_CFG_DNS6   4      /* DNS responder on ::1 */
#define AW_EG_CFG_MAX    5

/* redirected sockets remembered at once (LRU maps egress_orig, egress_flows) */
#define AW_EG_FLOWS_MAX 65536

/* operation that was refused */
#define AW_EG_OP_CONNECT4 1
#define AW_EG_OP_CONNECT6 2
#define AW_EG_OP_SENDMSG4 3
#define AW_EG_OP_SENDMSG6 4
#define AW_EG_OP_SOCKET   5
#define AW_EG_OP_CONNECT_UNIX 6
#define AW_EG_OP_SENDMSG_UNIX 7
#define AW_EG_OP_BIND4    8
#define AW_EG_OP_BIND6    9

/* why */
#define AW_EG_R_NO_RULE   1     /* destination in no allowed prefix */
#define AW_EG_R_PORT      2     /* prefix allowed, not this port/protocol */
#define AW_EG_R_LOOPBACK  3     /* loopback destination, no loopback port allowed */
#define AW_EG_R_RAW       4     /* SOCK_RAW inet socket */
#define AW_EG_R_FAMILY    5     /* inet/inet6 not in allow_families */
#define AW_EG_R_PROTOCOL  6     /* inet socket that is neither TCP nor UDP */
#define AW_EG_R_UNIX      7     /* unix socket address, no unix sockets allowed */
#define AW_EG_R_BIND      8     /* bind to a non-loopback address network.allow does not allow */

/* per-CPU counters (map egress_counters) */
#define AW_EG_CNT_DENIED 0
#define AW_EG_CNT_LOST   1      /* denial record lost: ring buffer full */
#define AW_EG_CNT_PROXIED 2     /* TCP connects sent to the guard's proxy */
#define AW_EG_CNT_DNS    3      /* port-53 connects and sends sent to the guard's DNS */
#define AW_EG_CNT_MAX    4

struct aw_eg_key4 {             /* LPM trie key: prefix length, then address */
	__u32 prefixlen;
	__u32 addr;             /* network byte order */
};

struct aw_eg_key6 {
	__u32 prefixlen;
	__u32 addr[4];          /* network byte order */
};

struct aw_eg_range {
	__u16 lo;               /* host byte order, inclusive */
	__u16 hi;
	__u8 protos;            /* AW_EG_P_* mask */
	__u8 pad[3];
};

/* One value per prefix: every range that applies to it, those of the
 * enclosing prefixes included (userspace merges them, because an LPM lookup
 * returns only the longest match). */
struct aw_eg_allow {
	__u32 n;
	__u32 flags;            /* AW_EG_F_* */
	struct aw_eg_range r[AW_EG_MAX_RANGES];
};

struct aw_egress_event {
	__u64 ts;               /* bpf_ktime_get_ns() */
	__u64 cgroup;           /* cgroup v2 id of the calling task */
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u32 sock_type;        /* SOCK_STREAM, SOCK_DGRAM, SOCK_RAW ... */
	__u32 protocol;         /* IPPROTO_* */
	__u16 family;           /* AF_INET / AF_INET6 */
	__u16 port;             /* host byte order */
	__u8 op;                /* AW_EG_OP_* */
	__u8 reason;            /* AW_EG_R_* */
	__u8 pad[6];
	__u8 addr[16];          /* 4 bytes for AF_INET; as given (mapped too) */
	char comm[16];
};

/* A socket the guard took over: the destination its connect() or send
 * named, and who asked. Kept by socket cookie (egress_orig) from connect4/6
 * and sendmsg4/6, and for TCP also by the socket's local end (egress_flows)
 * once sock_ops sees it established, which is what the guard's accepted
 * socket shows as its peer. */
struct aw_eg_flow {
	__u64 ts;               /* bpf_ktime_get_ns() at connect */
	__u64 cgroup;           /* cgroup v2 id of the connecting task */
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u16 family;           /* AF_INET / AF_INET6, as connect() named it */
	__u16 port;             /* original port, host byte order */
	__u8 addr[16];          /* original address, network order; AF_INET: 4 bytes */
	char comm[16];
};

struct aw_eg_flow_key {         /* the local end of the agent's socket */
	__u32 port;             /* host byte order */
	__u8 addr[16];          /* IPv6 or IPv4-mapped (::ffff:a.b.c.d), network order */
};

/* ---- BPF LSM (bpf/lsm.bpf.c, agentwatch/guards/lsm.py) ---- */

/* hooks, as recorded in aw_lsm_event.hook */
#define AW_LSM_H_EXEC     1
#define AW_LSM_H_OPEN     2
#define AW_LSM_H_CONNECT  3
#define AW_LSM_H_MMAP     4
#define AW_LSM_H_MPROTECT 5
#define AW_LSM_H_KILL     6
#define AW_LSM_H_SENDMSG  7

/* lsm_cfg[0] flags: which rules are enforced */
#define AW_LSM_CFG_EXEC    0x1  /* exec/mmap/mprotect allow-list by inode */
#define AW_LSM_CFG_OPEN    0x2  /* open deny-list by inode */
#define AW_LSM_CFG_CONNECT 0x4  /* connect port allow-list */
#define AW_LSM_CFG_SIGNAL  0x8  /* signals only within the watched cgroups */
#define AW_LSM_CFG_UNIX    0x10 /* no connect/sendmsg to a unix socket address */

/* per-CPU counters (map lsm_counters) */
#define AW_LSM_CNT_DENIED 0
#define AW_LSM_CNT_LOST   1     /* denial record lost: ring buffer full */
#define AW_LSM_CNT_MAX    2

#define AW_LSM_NAME_LEN 64

/* map sizes; userspace refuses rules that would need more entries */
#define AW_LSM_MAX_ALLOW 65536  /* lsm_exec_allow */
#define AW_LSM_MAX_DENY  4096   /* lsm_file_deny */

struct aw_lsm_key {             /* a file: inode number and superblock device */
	__u64 ino;
	__u32 dev;              /* kernel dev_t: MAJOR << 20 | MINOR */
	__u32 pad;
};

struct aw_lsm_event {
	__u64 ts;               /* bpf_ktime_get_ns() */
	__u64 cgroup;           /* cgroup v2 id of the calling task */
	__u64 ino;              /* file hooks: the file's inode */
	__u32 dev;
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u32 hook;             /* AW_LSM_H_* */
	__s32 ret;              /* what the hook returned: -EPERM */
	__u64 prot;             /* mmap/mprotect: prot; open: f_flags */
	__u64 flags;            /* mmap: flags */
	__u16 family;           /* connect: AF_INET / AF_INET6 */
	__u16 port;             /* connect: host byte order */
	__u8 addr[16];          /* connect: network order, 4 bytes for AF_INET */
	__u8 pad[4];
	char comm[16];
	char name[AW_LSM_NAME_LEN]; /* exec: the name as given; files: basename */
};

#endif /* AW_GUARDS_H */
