"""Python mirror of bpf/guards.h: the records, map keys and constants of the
kernel guards (egress.py, lsm.py).

Every ``AW_X`` constant of the header is ``X`` here, and every struct is a
ctypes structure in ``RECORDS``, field by field. ctypes lays fields out with
C's natural alignment, as the header's fixed-width types do on the BPF target,
and bcc takes ctypes values as map keys. tests/unit/test_guard_records.py
compiles the header with the host gcc and checks every struct, field (name,
order, offset, size) and constant against this module, as
tests/unit/test_records.py checks sensors/records.py against bpf/events.h.
Pure: no bcc.
"""
import ctypes

u8, u16, u32, s32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_int32, ctypes.c_uint64
COMM_LEN = 16       # AW_COMM_LEN of bpf/events.h (TASK_COMM_LEN)

# ---- cgroup BPF egress (bpf/egress.bpf.c) ----------------------------------------------
EG_MAX_RANGES = 16                              # port ranges per prefix
EG_P_TCP, EG_P_UDP, EG_P_OTHER, EG_P_ANY = 0x1, 0x2, 0x4, 0x7   # protocol classes
EG_F_LOOPBACK = 0x1                             # allow-map value: prefix in a loopback zone
EG_CFG_INET, EG_CFG_INET6, EG_CFG_GUARD = 0x1, 0x2, 0x4   # egress_cfg[EG_CFG_FLAGS]
(EG_CFG_FLAGS, EG_CFG_PROXY4, EG_CFG_PROXY6, EG_CFG_DNS4, EG_CFG_DNS6,
 EG_CFG_MAX) = range(6)                         # egress_cfg indexes: flags, the guard's ports
EG_FLOWS_MAX = 65536                            # entries of egress_orig, egress_flows
(EG_OP_CONNECT4, EG_OP_CONNECT6, EG_OP_SENDMSG4, EG_OP_SENDMSG6, EG_OP_SOCKET,
 EG_OP_CONNECT_UNIX, EG_OP_SENDMSG_UNIX, EG_OP_BIND4, EG_OP_BIND6) = range(1, 10)
(EG_R_NO_RULE, EG_R_PORT, EG_R_LOOPBACK, EG_R_RAW, EG_R_FAMILY, EG_R_PROTOCOL,
 EG_R_UNIX, EG_R_BIND) = range(1, 9)
EG_CNT_DENIED, EG_CNT_LOST, EG_CNT_PROXIED, EG_CNT_DNS = range(4)   # egress_counters indexes


class EgKey4(ctypes.Structure):
    """struct aw_eg_key4: LPM trie key, prefix length then address (network order)."""
    _fields_ = [("prefixlen", u32), ("addr", u32)]


class EgKey6(ctypes.Structure):
    """struct aw_eg_key6."""
    _fields_ = [("prefixlen", u32), ("addr", u32 * 4)]


class EgRange(ctypes.Structure):
    """struct aw_eg_range: ports lo..hi (host order, inclusive) for the EG_P_* classes in protos."""
    _fields_ = [("lo", u16), ("hi", u16), ("protos", u8), ("pad", u8 * 3)]


class EgAllow(ctypes.Structure):
    """struct aw_eg_allow: the value of one allowed prefix."""
    _fields_ = [("n", u32), ("flags", u32), ("r", EgRange * EG_MAX_RANGES)]


class EgressEvent(ctypes.Structure):
    """struct aw_egress_event: one refused connect, sendmsg, bind or socket."""
    _fields_ = [("ts", u64), ("cgroup", u64), ("pid", u32), ("tid", u32), ("uid", u32),
                ("sock_type", u32), ("protocol", u32), ("family", u16), ("port", u16),
                ("op", u8), ("reason", u8), ("pad", u8 * 6), ("addr", u8 * 16),
                ("comm", ctypes.c_char * COMM_LEN)]


class EgFlow(ctypes.Structure):
    """struct aw_eg_flow: a redirected socket's original destination and who connected."""
    _fields_ = [("ts", u64), ("cgroup", u64), ("pid", u32), ("tid", u32), ("uid", u32),
                ("family", u16), ("port", u16), ("addr", u8 * 16),
                ("comm", ctypes.c_char * COMM_LEN)]


class EgFlowKey(ctypes.Structure):
    """struct aw_eg_flow_key: the local end of an agent's redirected TCP socket."""
    _fields_ = [("port", u32), ("addr", u8 * 16)]


# ---- BPF LSM (bpf/lsm.bpf.c) -------------------------------------------------------------
(LSM_H_EXEC, LSM_H_OPEN, LSM_H_CONNECT, LSM_H_MMAP, LSM_H_MPROTECT, LSM_H_KILL,
 LSM_H_SENDMSG) = range(1, 8)                   # aw_lsm_event.hook
LSM_CFG_EXEC, LSM_CFG_OPEN, LSM_CFG_CONNECT, LSM_CFG_SIGNAL, LSM_CFG_UNIX = 0x1, 0x2, 0x4, 0x8, 0x10
LSM_CNT_DENIED, LSM_CNT_LOST = 0, 1             # lsm_counters indexes
LSM_NAME_LEN = 64
LSM_MAX_ALLOW, LSM_MAX_DENY = 65536, 4096       # entries of lsm_exec_allow, lsm_file_deny


class LsmKey(ctypes.Structure):
    """struct aw_lsm_key: a file, by inode number and kernel dev_t of its superblock."""
    _fields_ = [("ino", u64), ("dev", u32), ("pad", u32)]


class LsmEvent(ctypes.Structure):
    """struct aw_lsm_event: one refusal by an LSM hook."""
    _fields_ = [("ts", u64), ("cgroup", u64), ("ino", u64), ("dev", u32), ("pid", u32),
                ("tid", u32), ("uid", u32), ("hook", u32), ("ret", s32),
                ("prot", u64), ("flags", u64), ("family", u16), ("port", u16),
                ("addr", u8 * 16), ("pad", u8 * 4), ("comm", ctypes.c_char * COMM_LEN),
                ("name", ctypes.c_char * LSM_NAME_LEN)]


# struct name in bpf/guards.h -> its mirror
RECORDS = {"aw_eg_key4": EgKey4, "aw_eg_key6": EgKey6, "aw_eg_range": EgRange,
           "aw_eg_allow": EgAllow, "aw_egress_event": EgressEvent,
           "aw_eg_flow": EgFlow, "aw_eg_flow_key": EgFlowKey,
           "aw_lsm_key": LsmKey, "aw_lsm_event": LsmEvent}


def decode(cls, data):
    """A record of type cls from the start of data (a ring buffer record may
    be longer: its size is rounded up to 8 bytes)."""
    return cls.from_buffer_copy(bytes(data)[:ctypes.sizeof(cls)])
