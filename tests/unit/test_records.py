"""agentwatch/sensors/records.py against bpf/events.h.

The header is compiled with the host gcc so that sizes, offsets and #define
constants of the C side are compared with the Python mirror; decode() is then
checked on buffers packed by hand.
"""
import os
import re
import shutil
import struct
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

import ckit
from agentwatch.sensors import records as R

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EVENTS_H = os.path.join(REPO, "bpf", "events.h")

# Deterministic examples and no example database: nothing is written to the
# checkout (.hypothesis/), and a failure reproduces on every run.
HYP = settings(database=None, derandomize=True, deadline=None)
# Hypothesis caches under ./.hypothesis by default, from collection on: keep
# it out of the checkout (set at import, before its pytest plugin writes).
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), f"agentwatch-hypothesis-{os.getuid()}"))


def raw_bytes(s):
    """The bytes a decoded string came from (records decode with surrogateescape)."""
    return s.encode("utf-8", "surrogateescape")


needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="host gcc not installed")


# ---- layout: compile the header ---------------------------------------------

@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    """{struct: {field: (offset, size)}, plus "sizeof": (size, 0)} as gcc sees them."""
    return ckit.layout(EVENTS_H, {name: [f for f, _ in fields] for name, fields in R.RECORDS.items()},
                       str(tmp_path_factory.mktemp("layout")))


@pytest.fixture(scope="module")
def c_defines():
    """Every AW_* #define in events.h, as gcc's preprocessor sees it."""
    return ckit.defines(EVENTS_H)


def test_records_lists_every_struct_of_the_header():
    with open(EVENTS_H) as f:
        structs = set(re.findall(r"^struct (aw_\w+) \{", f.read(), re.M))
    assert structs == set(R.RECORDS)


@needs_gcc
@pytest.mark.parametrize("name", sorted(R.RECORDS))
def test_field_offsets_and_sizes_match_c(c_layout, name):
    c = c_layout[name]
    py = {field: (off, size) for field, off, size in R.layout(name)}
    assert [f for f, _, _ in R.layout(name)] == [f for f, _ in R.RECORDS[name]]
    for field, _ in R.RECORDS[name]:
        assert py[field] == c[field], f"struct {name}.{field}: python (offset, size) != C"


@needs_gcc
@pytest.mark.parametrize("name", sorted(R.RECORDS))
def test_struct_size_matches_c(c_layout, name):
    assert R.size(name) == c_layout[name]["sizeof"][0]


# Defines with no Python counterpart, on purpose.
C_ONLY = {"AW_EVENTS_H",    # include guard
          "AW_CNT_MAX"}     # size of the per-CPU counters array, BPF side only


@needs_gcc
def test_every_define_has_its_python_constant(c_defines):
    for cname, value in c_defines.items():
        if cname in C_ONLY:
            continue
        pyname = cname[len("AW_"):]
        assert hasattr(R, pyname), f"{cname} has no records.{pyname}"
        assert getattr(R, pyname) == int(value, 0), f"{cname}={value} but records.{pyname}={getattr(R, pyname)}"


@needs_gcc
@pytest.mark.parametrize("prefix", ["EV_", "CNT_", "SPEC_"])
def test_python_constants_all_exist_in_header(c_defines, prefix):
    py = {n for n in vars(R) if n.startswith(prefix) and isinstance(getattr(R, n), int)}
    c = {n[len("AW_"):] for n in c_defines if n.startswith("AW_" + prefix)} - {n[3:] for n in C_ONLY}
    assert py == c
    assert py, f"no {prefix}* constants at all"


@needs_gcc
def test_named_constants(c_defines):
    expected = {"AW_NOARG": R.NOARG, "AW_STR_LEN": R.STR_LEN, "AW_ARGC_MAX": R.ARGC_MAX,
                "AW_ARG_LEN": R.ARG_LEN, "AW_COMM_LEN": R.COMM_LEN,
                "AW_EV_SYSCALL": R.EV_SYSCALL, "AW_EV_EXEC": R.EV_EXEC,
                "AW_EV_FORK": R.EV_FORK, "AW_EV_EXIT": R.EV_EXIT, "AW_EV_NOENTRY": R.EV_NOENTRY,
                "AW_EV_MAPKILL": R.EV_MAPKILL, "AW_EV_REFUSED": R.EV_REFUSED,
                "AW_REFUSE_EACCES": R.REFUSE_EACCES, "AW_REFUSE_EAGAIN": R.REFUSE_EAGAIN,
                "AW_CNT_LOST_EVENTS": R.CNT_LOST_EVENTS, "AW_CNT_LOST_STASH": R.CNT_LOST_STASH,
                "AW_CNT_SEEN": R.CNT_SEEN, "AW_CNT_LOST_PRIO": R.CNT_LOST_PRIO,
                "AW_CNT_SEEN_PRIO": R.CNT_SEEN_PRIO, "AW_SPEC_EMIT": R.SPEC_EMIT,
                "AW_SPEC_WATCH": R.SPEC_WATCH, "AW_SPEC_NEED_ADDR": R.SPEC_NEED_ADDR,
                "AW_SPEC_EXEC": R.SPEC_EXEC, "AW_SPEC_EXIT_GROUP": R.SPEC_EXIT_GROUP,
                "AW_SPEC_DENIED": R.SPEC_DENIED,
                "AW_SPEC_PRIORITY": R.SPEC_PRIORITY, "AW_PREFIX_LEN": R.PREFIX_LEN,
                "AW_SPEC_OPEN": R.SPEC_OPEN, "AW_CNT_KILLED": R.CNT_KILLED,
                "AW_ROUTE_PRIO": R.ROUTE_PRIO, "AW_ROUTE_KILL": R.ROUTE_KILL,
                "AW_MAPX_REPORT": R.MAPX_REPORT, "AW_MAPX_KILL": R.MAPX_KILL,
                "AW_NOENTRY_ARGS": R.NOENTRY_ARGS}
    for cname, pyval in expected.items():
        assert int(c_defines[cname], 0) == pyval, cname
    # counters indexes must fit the array the BPF side declares
    assert max(R.CNT_LOST_EVENTS, R.CNT_LOST_STASH, R.CNT_SEEN, R.CNT_LOST_PRIO,
               R.CNT_SEEN_PRIO) < int(c_defines["AW_CNT_MAX"], 0)


def test_spec_flags_are_distinct_bits():
    flags = [R.SPEC_EMIT, R.SPEC_NEED_ADDR, R.SPEC_EXEC, R.SPEC_EXIT_GROUP, R.SPEC_WATCH,
             R.SPEC_DENIED, R.SPEC_PRIORITY, R.SPEC_OPEN]
    for f in flags:
        assert f and f & (f - 1) == 0
    assert len(set(flags)) == len(flags)


# ---- decode(): hand-packed buffers --------------------------------------------
# Formats written out independently of records.py (little-endian, no padding:
# the C structs have none, which the gcc test above proves).

HDR = "<IIIIQQ16s"
SYSCALL = HDR + "iIq6Q2Q256s256s"
EXEC = HDR + "II256s2560s"
FORK = HDR + "II"
EXIT = HDR + "ii"
REPEAT = HDR + "iIQQQ"


def hdr(etype, pid=4242, tid=4243, uid=1000, ts=123456789, cgroup=777, comm=b"agent"):
    return (etype, pid, tid, uid, ts, cgroup, comm)


def test_hand_formats_have_the_record_sizes():
    assert struct.calcsize(SYSCALL) == R.size("aw_syscall_event")
    assert struct.calcsize(EXEC) == R.size("aw_exec_event")
    assert struct.calcsize(FORK) == R.size("aw_fork_event")
    assert struct.calcsize(EXIT) == R.size("aw_exit_event")
    assert struct.calcsize(REPEAT) == R.size("aw_repeat_event")


def test_decode_header_fields():
    buf = struct.pack(FORK, *hdr(R.EV_FORK, pid=1, tid=2, uid=3, ts=2**63 + 5, cgroup=2**40), 9, 0)
    etype, rec = R.decode(buf)
    assert etype == R.EV_FORK
    assert {k: rec[k] for k in ("type", "pid", "tid", "uid", "ts", "cgroup", "comm")} == {
        "type": R.EV_FORK, "pid": 1, "tid": 2, "uid": 3, "ts": 2**63 + 5, "cgroup": 2**40,
        "comm": "agent"}


def test_decode_comm_filling_all_16_bytes():
    buf = struct.pack(FORK, *hdr(R.EV_FORK, comm=b"abcdefghijklmnop"), 9, 0)
    assert R.decode(buf)[1]["comm"] == "abcdefghijklmnop"


def test_decode_syscall():
    sockaddr = struct.pack("=H", 2) + struct.pack("!H", 443) + bytes([1, 2, 3, 4]) + bytes(8)
    args = (0xFFFFFFFFFFFFFF9C, 0x7FFF0000, 0o1101, 0o644, 0, 2**64 - 1)
    buf = struct.pack(SYSCALL, *hdr(R.EV_SYSCALL), 257, 16, -13, *args, 0o100, 0o600,
                      b"/etc/passwd\0leftover bytes", sockaddr)
    etype, rec = R.decode(buf)
    assert etype == R.EV_SYSCALL
    assert rec["nr"] == 257 and rec["len2"] == 16 and rec["ret"] == -13
    assert tuple(rec["args"]) == args
    assert tuple(rec["extra"]) == (0o100, 0o600)
    assert rec["str1"] == "/etc/passwd"            # cut at the first NUL
    assert len(rec["data2"]) == R.STR_LEN          # raw bytes, sockaddr first
    assert rec["data2"][:16] == sockaddr


def test_decode_syscall_negative_nr_and_large_ret():
    buf = struct.pack(SYSCALL, *hdr(R.EV_SYSCALL), -1, 0, 2**62, *([0] * 6), 0, 0, b"", b"")
    rec = R.decode(buf)[1]
    assert rec["nr"] == -1 and rec["ret"] == 2**62 and rec["str1"] == ""


def test_decode_syscall_refused_before_entry():
    buf = struct.pack(SYSCALL, *hdr(R.EV_NOENTRY), 101, 0, -1, *([0] * 6), 0, 0, b"", b"")
    etype, rec = R.decode(buf)
    assert etype == R.EV_NOENTRY and rec["nr"] == 101 and rec["ret"] == -1


def _argv_blob(args):
    blob = bytearray(R.ARGC_MAX * R.ARG_LEN)
    for i, a in enumerate(args):
        blob[i * R.ARG_LEN:i * R.ARG_LEN + len(a)] = a
    return bytes(blob)


def test_decode_exec_splits_argv_by_argc():
    # slot 3 holds bytes beyond argc (left over in a reused buffer): not an argument
    blob = _argv_blob([b"python3", b"-c", b"print(1)", b"stale"])
    buf = struct.pack(EXEC, *hdr(R.EV_EXEC), 3, 0, b"/usr/bin/python3", blob)
    etype, rec = R.decode(buf)
    assert etype == R.EV_EXEC
    assert rec["filename"] == "/usr/bin/python3"
    assert rec["argc"] == 3
    assert rec["argv"] == ["python3", "-c", "print(1)"]
    assert rec["truncated"] is False


def test_decode_exec_full_length_argument_and_empty_one():
    long_arg = b"x" * R.ARG_LEN            # fills its slot: no NUL inside the slot
    blob = _argv_blob([long_arg, b"", b"y"])
    buf = struct.pack(EXEC, *hdr(R.EV_EXEC), 3, 0, b"/bin/echo", blob)
    assert R.decode(buf)[1]["argv"] == ["x" * R.ARG_LEN, "", "y"]


def test_decode_exec_truncated_and_argc_clamped():
    blob = _argv_blob([b"a%d" % i for i in range(R.ARGC_MAX)])
    buf = struct.pack(EXEC, *hdr(R.EV_EXEC), 1000, 1, b"/bin/true", blob)
    rec = R.decode(buf)[1]
    assert rec["truncated"] is True
    assert rec["argc"] == R.ARGC_MAX
    assert rec["argv"] == ["a%d" % i for i in range(R.ARGC_MAX)]


def test_decode_invalid_utf8_is_kept_losslessly():
    name = b"/tmp/\xff\xfeevil\x80"
    blob = _argv_blob([b"\xc3(", b"ok"])
    buf = struct.pack(EXEC, *hdr(R.EV_EXEC, comm=b"c\xffm"), 2, 0, name + b"\0junk", blob)
    rec = R.decode(buf)[1]
    assert raw_bytes(rec["filename"]) == name
    assert [raw_bytes(a) for a in rec["argv"]] == [b"\xc3(", b"ok"]
    assert raw_bytes(rec["comm"]) == b"c\xffm"


def test_decode_fork_child_is_unsigned():
    buf = struct.pack(FORK, *hdr(R.EV_FORK), 0xFFFFFFF0, 0)
    rec = R.decode(buf)[1]
    assert rec["child"] == 0xFFFFFFF0
    assert "code" not in rec


def test_decode_exit_signed_code_and_signal():
    rec = R.decode(struct.pack(EXIT, *hdr(R.EV_EXIT), -1, 9))[1]
    assert (rec["code"], rec["sig"]) == (-1, 9)
    rec = R.decode(struct.pack(EXIT, *hdr(R.EV_EXIT), 3, 0))[1]
    assert (rec["code"], rec["sig"]) == (3, 0)
    assert "child" not in rec


def test_decode_accepts_trailing_bytes():
    # ring buffer records are rounded up to 8 bytes; decode must not care
    buf = struct.pack(EXIT, *hdr(R.EV_EXIT), 0, 0) + bytes(8)
    assert R.decode(buf)[1]["code"] == 0


def test_decode_repeat():
    rec = R.decode(struct.pack(REPEAT, *hdr(R.EV_REPEAT, tid=7), 257, 2**32 - 1, 11, 12, 2**63))[1]
    assert {k: rec[k] for k in ("tid", "nr", "count", "orig_ts", "first", "last")} == {
        "tid": 7, "nr": 257, "count": 2**32 - 1, "orig_ts": 11, "first": 12, "last": 2**63}


@pytest.mark.parametrize("etype", [0, 9, 0xFFFFFFFF])
def test_decode_unknown_type_raises(etype):
    buf = struct.pack(EXIT, *hdr(etype), 0, 0)
    with pytest.raises(ValueError, match=str(etype)):
        R.decode(buf)


# ---- properties ---------------------------------------------------------------

@settings(HYP)
@given(st.binary(max_size=300))
def test_cstr_never_fails_and_is_lossless_up_to_nul(raw):
    s = R.cstr(raw)
    assert "\0" not in s
    assert raw_bytes(s) == raw.split(b"\0", 1)[0]


_arg = st.binary(max_size=R.ARG_LEN - 1).filter(lambda b: b"\0" not in b)


@settings(HYP, max_examples=60)
@given(st.lists(_arg, max_size=R.ARGC_MAX), st.booleans())
def test_decode_exec_argv_round_trip(args, truncated):
    buf = struct.pack(EXEC, *hdr(R.EV_EXEC), len(args), int(truncated), b"/bin/x", _argv_blob(args))
    rec = R.decode(buf)[1]
    assert [raw_bytes(a) for a in rec["argv"]] == args
    assert rec["truncated"] is truncated


# ---- sensitive-path keys (bpf/priority.bpf.c) ------------------------------------

def test_fnv_constants_match_the_bpf_side():
    with open(os.path.join(REPO, "bpf", "priority.bpf.c")) as f:
        src = f.read()
    assert int(re.search(r"#define AW_FNV_BASIS (0x[0-9a-f]+)ULL", src).group(1), 16) == R.FNV_BASIS
    assert int(re.search(r"#define AW_FNV_PRIME (0x[0-9a-f]+)ULL", src).group(1), 16) == R.FNV_PRIME


def test_fnv1a_reference_values():
    # published FNV-1a 64 test vectors
    assert R.fnv1a(b"") == 0xCBF29CE484222325
    assert R.fnv1a(b"a") == 0xAF63DC4C8601EC8C
    assert R.fnv1a(b"foobar") == 0x85944171F73967E8


def test_prefix_key_counts_bits_of_slot_and_path():
    raw = R.prefix_key(3, "/home/u/.ssh")
    prefixlen, slot, path = R.PREFIX_KEY.unpack(raw)
    assert (prefixlen, slot) == (32 + 8 * len("/home/u/.ssh"), 3)
    assert path.rstrip(b"\0") == b"/home/u/.ssh"


def test_long_prefix_is_cut_to_fit_the_key():
    prefixlen, _, path = R.PREFIX_KEY.unpack(R.prefix_key(1, "/" + "a" * 400))
    assert prefixlen == 32 + 8 * (R.PREFIX_LEN - 1)   # the BPF side reads at most this many bytes
    assert len(R.prefix_key(1, "/x")) == R.size("aw_prefix_key")


def test_name_key_is_slot_and_hash():
    assert R.NAME_KEY.unpack(R.name_key(2, ".env")) == (2, 0, R.fnv1a(b".env"))
