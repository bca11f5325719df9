"""Python mirror of bpf/events.h, described as data.

Each record is a list of (field, struct format) pairs; offsets follow C
natural alignment exactly as in the header (tests/unit/test_records.py
compiles the header and compares). Decoding is pure Python: no bcc here.
"""
import struct

COMM_LEN = 16
STR_LEN = 256
ARGC_MAX = 20
ARG_LEN = 128
PREFIX_LEN = 248   # path bytes of a sensitive-prefix key (LPM trie data is at most 256 bytes)
FNV_BASIS, FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3   # bpf/priority.bpf.c

EV_SYSCALL, EV_EXEC, EV_FORK, EV_EXIT, EV_NOENTRY, EV_MAPKILL, EV_REPEAT = 1, 2, 3, 4, 5, 6, 7
EV_REFUSED = 8

CNT_LOST_EVENTS, CNT_LOST_STASH, CNT_SEEN = 0, 1, 2    # bulk ring ("events"), stash
CNT_LOST_PRIO, CNT_SEEN_PRIO = 3, 4                     # priority ring ("priority")
CNT_KILLED = 5                                          # killed in the kernel (open, mmap)
CNT_FOLDED = 6                                          # calls folded into repeat records written
ROUTE_PRIO, ROUTE_KILL = 0x1, 0x2                       # sensitive path map values
MAPX_REPORT, MAPX_KILL = 1, 2                           # mapexec_on map values
NOARG = 0xFF
NOENTRY_ARGS = 1    # extra[0] of an EV_NOENTRY record whose args were read (-DAW_EXIT_ARGS)

SPEC_EMIT = 0x01
SPEC_NEED_ADDR = 0x02
SPEC_EXEC = 0x04
SPEC_EXIT_GROUP = 0x08
SPEC_WATCH = 0x10
SPEC_DENIED = 0x20
SPEC_PRIORITY = 0x40
SPEC_OPEN = 0x80
REFUSE_EACCES, REFUSE_EAGAIN = 0x01, 0x02   # aw_spec.refuse

HDR_FIELDS = [
    ("type", "I"), ("pid", "I"), ("tid", "I"), ("uid", "I"),
    ("ts", "Q"), ("cgroup", "Q"), ("comm", f"{COMM_LEN}s"),
]

RECORDS = {
    "aw_hdr": HDR_FIELDS,
    "aw_syscall_event": [
        ("h", HDR_FIELDS), ("nr", "i"), ("len2", "I"), ("ret", "q"),
        ("args", "6Q"), ("extra", "2Q"), ("str1", f"{STR_LEN}s"), ("data2", f"{STR_LEN}s"),
    ],
    "aw_exec_event": [
        ("h", HDR_FIELDS), ("argc", "I"), ("truncated", "I"),
        ("filename", f"{STR_LEN}s"), ("argv", f"{ARGC_MAX * ARG_LEN}s"),
    ],
    "aw_repeat_event": [("h", HDR_FIELDS), ("nr", "i"), ("count", "I"), ("orig_ts", "Q"),
                        ("first", "Q"), ("last", "Q")],
    "aw_fork_event": [("h", HDR_FIELDS), ("child", "I"), ("pad", "I")],
    "aw_exit_event": [("h", HDR_FIELDS), ("code", "i"), ("sig", "i")],
    "aw_spec": [(name, "B") for name in
                ("flags", "path1", "path2", "addr", "addrlen", "msghdr", "deref", "argv", "refuse")]
               + [("pad", "7s")],
    "aw_prefix_key": [("prefixlen", "I"), ("slot", "I"), ("path", f"{PREFIX_LEN}s")],
    "aw_name_key": [("slot", "I"), ("pad", "I"), ("hash", "Q")],
}


def _flatten(fields):
    fmt = ""
    for _, f in fields:
        fmt += _flatten(f) if isinstance(f, list) else f
    return fmt


def layout(name):
    """[(field, offset, size)] for a record, using C alignment ('@' mode)."""
    out, fmt = [], "@"
    for field, f in RECORDS[name]:
        sub = _flatten(f) if isinstance(f, list) else f
        # align the field as C would: to its first member's alignment
        first = struct.Struct("@" + sub.lstrip("0123456789")[0])
        pad = (-struct.calcsize(fmt)) % first.size if first.size > 1 else 0
        fmt += "x" * pad
        off = struct.calcsize(fmt)
        fmt += sub
        out.append((field, off, struct.calcsize(fmt) - off))
    return out


def size(name):
    fmt = "@" + _flatten(RECORDS[name])
    return struct.calcsize(fmt + "0Q")  # trailing padding to 8-byte alignment


_HDR = struct.Struct("<" + _flatten(HDR_FIELDS))
_TYPE = struct.Struct("<I")
_SYSCALL = struct.Struct("<" + _flatten(RECORDS["aw_syscall_event"]))
_EXEC = struct.Struct("<" + _flatten(RECORDS["aw_exec_event"]))
_FORK_EXIT = struct.Struct("<" + _HDR.format[1:] + "ii")
_REPEAT = struct.Struct("<" + _flatten(RECORDS["aw_repeat_event"]))
SPEC = struct.Struct("<" + _flatten(RECORDS["aw_spec"]))
PREFIX_KEY = struct.Struct("<" + _flatten(RECORDS["aw_prefix_key"]))
NAME_KEY = struct.Struct("<" + _flatten(RECORDS["aw_name_key"]))


def prefix_key(slot, prefix):
    """struct aw_prefix_key bytes for a sensitive path prefix of a run slot.
    A prefix longer than the key is cut: it then matches more paths, never fewer."""
    raw = prefix.encode("utf-8", "surrogateescape")[:PREFIX_LEN - 1]
    return PREFIX_KEY.pack(32 + 8 * len(raw), slot, raw)


def fnv1a(data):
    """FNV-1a 64, as bpf/priority.bpf.c hashes a basename."""
    h = FNV_BASIS
    for c in data:
        h = ((h ^ c) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def name_key(slot, name):
    """struct aw_name_key bytes for a sensitive basename."""
    return NAME_KEY.pack(slot, 0, fnv1a(name.encode("utf-8", "surrogateescape")))


def cstr(raw):
    """Bytes up to the first NUL, decoded without ever failing."""
    return raw.partition(b"\0")[0].decode("utf-8", "surrogateescape")


def decode(buf):
    """Raw ring-buffer record -> (type, dict). Unknown types raise ValueError."""
    etype = _TYPE.unpack_from(buf)[0]
    if etype in (EV_SYSCALL, EV_NOENTRY, EV_MAPKILL, EV_REFUSED):   # one layout (events.h)
        # the bulk of all records: one dict display, no helper calls
        v = _SYSCALL.unpack_from(buf)
        return etype, {"type": etype, "pid": v[1], "tid": v[2], "uid": v[3], "ts": v[4],
                       "cgroup": v[5], "comm": v[6].partition(b"\0")[0].decode("utf-8", "surrogateescape"),
                       "nr": v[7], "len2": v[8], "ret": v[9], "args": v[10:16], "extra": v[16:18],
                       "str1": v[18].partition(b"\0")[0].decode("utf-8", "surrogateescape"),
                       "data2": v[19]}
    if etype == EV_EXEC:
        v = _EXEC.unpack_from(buf)
        rec = _hdr(v)
        argc = min(v[7], ARGC_MAX)
        argv_raw = v[10]
        rec.update(argc=argc, truncated=bool(v[8]), filename=cstr(v[9]),
                   argv=[cstr(argv_raw[i * ARG_LEN:(i + 1) * ARG_LEN]) for i in range(argc)])
    elif etype == EV_REPEAT:
        v = _REPEAT.unpack_from(buf)
        rec = _hdr(v)
        rec.update(nr=v[7], count=v[8], orig_ts=v[9], first=v[10], last=v[11])
    elif etype in (EV_FORK, EV_EXIT):
        v = _FORK_EXIT.unpack_from(buf)
        rec = _hdr(v)
        if etype == EV_FORK:
            rec["child"] = v[7] & 0xFFFFFFFF
        else:
            rec.update(code=v[7], sig=v[8])
    else:
        raise ValueError(f"unknown record type {etype}")
    return etype, rec


def _hdr(v):
    return {"type": v[0], "pid": v[1], "tid": v[2], "uid": v[3], "ts": v[4],
            "cgroup": v[5], "comm": cstr(v[6])}
