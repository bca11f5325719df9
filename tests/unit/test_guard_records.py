"""agentwatch/guards/records.py against bpf/guards.h.

Driven from the header: its structs and their fields are read from the text,
compiled with the host gcc (sizeof, offsetof) and compared with the ctypes
mirror, and every AW_* constant gcc's preprocessor sees must be the mirror's
constant of the same name. Then each guard's decoder is checked on a record
packed by hand, independently of the mirror.
"""
import ctypes
import errno
import ipaddress
import os
import re
import struct

import pytest

import ckit
from agentwatch.guards import denials, egress, lsm
from agentwatch.guards import records as R

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BPF = os.path.join(REPO, "bpf")
GUARDS_H = os.path.join(BPF, "guards.h")
PROGRAMS = ("egress.bpf.c", "lsm.bpf.c")

# Defines with no Python counterpart, on purpose.
C_ONLY = {"AW_GUARDS_H",                        # include guard
          "AW_EG_CNT_MAX", "AW_LSM_CNT_MAX"}    # sizes of the counter arrays, BPF side only

def _strip_comments(text):
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def header_structs():
    """{struct name: [field names in order]} as written in guards.h."""
    with open(GUARDS_H) as f:
        text = _strip_comments(f.read())
    out = {}
    for name, body in re.findall(r"^struct (aw_\w+) \{(.*?)^\};", text, re.M | re.S):
        out[name] = re.findall(r"^\s*(?:struct\s+)?\w+\s+(\w+)\s*(?:\[[^\]]*\]\s*)*;", body, re.M)
    return out


HEADER = header_structs()


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    """{struct: {field: (offset, size), "sizeof": (size, 0)}} as gcc sees them."""
    return ckit.layout(GUARDS_H, HEADER, str(tmp_path_factory.mktemp("guards_layout")))


@pytest.fixture(scope="module")
def c_defines():
    """Every AW_* #define of guards.h, as gcc's preprocessor sees it."""
    return {name: int(value, 0) for name, value in ckit.defines(GUARDS_H).items()}


# ---- layout ------------------------------------------------------------------------------

def test_header_is_read():
    assert {"aw_egress_event", "aw_lsm_event", "aw_lsm_key", "aw_eg_allow"} <= set(HEADER)
    assert HEADER["aw_lsm_key"] == ["ino", "dev", "pad"]
    assert HEADER["aw_eg_allow"] == ["n", "flags", "r"]


def test_records_lists_every_struct_of_the_header():
    assert set(R.RECORDS) == set(HEADER)


@pytest.mark.parametrize("name", sorted(HEADER))
def test_fields_are_the_headers_in_order(name):
    assert [f for f, *_ in R.RECORDS[name]._fields_] == HEADER[name]


@pytest.mark.parametrize("name", sorted(HEADER))
def test_field_offsets_and_sizes_match_c(c_layout, name):
    cls = R.RECORDS[name]
    for field in HEADER[name]:
        py = (getattr(cls, field).offset, getattr(cls, field).size)
        assert py == c_layout[name][field], f"struct {name}.{field}: python (offset, size) != C"
    assert ctypes.sizeof(cls) == c_layout[name]["sizeof"][0]


def test_the_programs_define_no_record_of_their_own():
    """What userspace reads or writes is in the header, so the test above sees it."""
    for prog in PROGRAMS:
        with open(os.path.join(BPF, prog)) as f:
            text = _strip_comments(f.read())
        assert '#include "guards.h"' in text, prog
        assert re.findall(r"^struct (aw_\w+) \{", text, re.M) == [], prog


# ---- constants ---------------------------------------------------------------------------

def test_every_define_has_its_python_constant(c_defines):
    for cname, value in c_defines.items():
        if cname in C_ONLY:
            continue
        pyname = cname[len("AW_"):]
        assert getattr(R, pyname, None) == value, f"{cname}={value} but records.{pyname}={getattr(R, pyname, None)}"


def test_every_python_constant_is_in_the_header(c_defines):
    py = {n for n, v in vars(R).items() if n.startswith(("EG_", "LSM_")) and isinstance(v, int)}
    assert py == {n[len("AW_"):] for n in c_defines} - {n[len("AW_"):] for n in C_ONLY}


def test_counter_indexes_fit_and_are_shared(c_defines):
    for guard in ("EG", "LSM"):
        assert (c_defines[f"AW_{guard}_CNT_DENIED"], c_defines[f"AW_{guard}_CNT_LOST"]) == (
            denials.CNT_DENIED, denials.CNT_LOST)
        assert max(denials.CNT_DENIED, denials.CNT_LOST) < c_defines[f"AW_{guard}_CNT_MAX"]


def test_every_op_reason_and_hook_has_a_name():
    assert sorted(egress.OPS) == sorted(v for n, v in vars(R).items() if n.startswith("EG_OP_"))
    assert sorted(egress.REASONS) == sorted(v for n, v in vars(R).items() if n.startswith("EG_R_"))
    assert sorted(lsm.HOOKS) == sorted(v for n, v in vars(R).items() if n.startswith("LSM_H_"))
    for num, (hook, _, _) in lsm.HOOKS.items():
        assert any(p[1] == hook for p in lsm.PROGRAMS), hook


def test_egress_op_names_follow_the_header():
    """AW_EG_OP_CONNECT4 is ("connect", "inet"), AW_EG_OP_SENDMSG_UNIX ("sendmsg", "unix")."""
    names = {v: n[len("EG_OP_"):].lower() for n, v in vars(R).items() if n.startswith("EG_OP_")}
    suffix = {"inet": "4", "inet6": "6", "unix": "_unix", None: ""}
    assert {k: op + suffix[fam] for k, (op, fam) in egress.OPS.items()} == names
    for num, name in egress.REASONS.items():
        cname = next(n for n, v in vars(R).items() if n.startswith("EG_R_") and v == num)
        assert cname[len("EG_R_"):].lower().split("_")[0] in name


def test_map_keys_and_values_are_the_mirrors_size():
    """The bytes egress.Entry writes into the allow maps (their content:
    tests/unit/test_egress_rules.py)."""
    e4 = egress.Entry(ipaddress.ip_network("10.1.0.0/16"), ((80, 443, R.EG_P_TCP),))
    e6 = egress.Entry(ipaddress.ip_network("fd00::/8"), ())
    assert len(e4.key_bytes()) == ctypes.sizeof(R.EgKey4)
    assert len(e6.key_bytes()) == ctypes.sizeof(R.EgKey6)
    assert len(e4.value_bytes()) == len(e6.value_bytes()) == ctypes.sizeof(R.EgAllow)


# ---- decoding, on records packed by hand ---------------------------------------------------
# Written out independently of records.py (native order, the header's layout).

LSM_EVENT = "=QQQIIIIIiQQHH16s4x16s64s"


def lsm_event(hook, ino=0, dev=0, prot=0, flags=0, family=0, port=0, addr=b"", name=b""):
    return struct.pack(LSM_EVENT, 99, 4567, ino, dev, 10, 11, 1000, hook, -errno.EPERM,
                       prot, flags, family, port, addr, b"agent", name)


def test_hand_format_has_the_record_size():
    assert struct.calcsize(LSM_EVENT) == ctypes.sizeof(R.LsmEvent)


def test_decode_lsm_file_denial():
    dev = (8 << 20) | 3
    d = lsm.decode_denial(lsm_event(R.LSM_H_MMAP, ino=77, dev=dev, prot=0x5, flags=0x2,
                                    name=b"libevil.so") + bytes(8), paths={(77, dev): "/tmp/libevil.so"})
    assert {k: d[k] for k in ("enforcement", "hook", "op", "rule", "ret", "error", "pid", "tid",
                              "uid", "cgroup", "comm", "ts", "ino", "dev", "name", "path",
                              "prot", "flags")} == {
        "enforcement": "bpf-lsm", "hook": "mmap_file", "op": "mmap",
        "rule": "exec-mapping-not-allowed", "ret": -errno.EPERM, "error": "EPERM", "pid": 10,
        "tid": 11, "uid": 1000, "cgroup": 4567, "comm": "agent", "ts": 99, "ino": 77,
        "dev": "8:3", "name": "libevil.so", "path": "/tmp/libevil.so", "prot": 0x5, "flags": 0x2}
    d = lsm.decode_denial(lsm_event(R.LSM_H_OPEN, ino=5, prot=0o100002, name=b"id_rsa"))
    assert (d["op"], d["rule"], d["flags"], d["path"]) == ("open", "file-denied", 0o100002, None)


def test_decode_lsm_connect_and_unix():
    d = lsm.decode_denial(lsm_event(R.LSM_H_CONNECT, family=2, port=8080, addr=bytes([10, 0, 0, 9])))
    assert (d["family"], d["addr"], d["port"], d["rule"]) == ("inet", "10.0.0.9", 8080, "port-not-allowed")
    d = lsm.decode_denial(lsm_event(R.LSM_H_CONNECT, family=10, port=443,
                                    addr=bytes(15) + b"\1"))
    assert (d["family"], d["addr"]) == ("inet6", "::1")
    d = lsm.decode_denial(lsm_event(R.LSM_H_SENDMSG, family=1))
    assert (d["op"], d["family"], d["rule"]) == ("sendmsg", "unix", "unix-not-allowed")


def test_decode_lsm_kill():
    d = lsm.decode_denial(lsm_event(R.LSM_H_KILL, ino=31337, prot=15, flags=4242))
    assert (d["op"], d["signal"], d["target_pid"], d["target_cgroup"]) == ("kill", 15, 4242, 31337)
