"""agentwatch/sensors/syscalls.py: specs, sockaddr and flag decoding, records
to events, path resolution. No bcc, no kernel."""
import ipaddress
import os
import platform
import re
import socket
import struct
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from agentwatch.core.events import FileEvent, NetEvent, SyscallEvent
from agentwatch.sensors import records as R
from agentwatch.sensors import syscalls as S

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
U64_AT_FDCWD = S.AT_FDCWD & 0xFFFFFFFFFFFFFFFF

# Deterministic examples and no example database: nothing is written to the
# checkout (.hypothesis/), and a failure reproduces on every run.
HYP = settings(database=None, derandomize=True, deadline=None)
# Hypothesis caches under ./.hypothesis by default, from collection on: keep
# it out of the checkout (set at import, before its pytest plugin writes).
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), f"agentwatch-hypothesis-{os.getuid()}"))


def u64(v):
    return v & 0xFFFFFFFFFFFFFFFF


# ---- parse_sockaddr -------------------------------------------------------------

def sockaddr_in(ip, port):
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(ip) + bytes(8)


def sockaddr_in6(ip, port, flowinfo=0, scope=0):
    return (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", port) + struct.pack("=I", flowinfo)
            + socket.inet_pton(socket.AF_INET6, ip) + struct.pack("=I", scope))


def sockaddr_un(path_bytes):
    return struct.pack("=H", socket.AF_UNIX) + path_bytes


def test_sockaddr_inet():
    assert S.parse_sockaddr(sockaddr_in("93.184.216.34", 443)) == ("inet", "93.184.216.34", 443)
    assert S.parse_sockaddr(sockaddr_in("0.0.0.0", 0)) == ("inet", "0.0.0.0", 0)
    assert S.parse_sockaddr(sockaddr_in("255.255.255.255", 65535)) == ("inet", "255.255.255.255", 65535)


def test_sockaddr_inet6():
    raw = sockaddr_in6("2001:db8::1", 8080, flowinfo=0x12345, scope=3)
    assert len(raw) == 28
    assert S.parse_sockaddr(raw) == ("inet6", "2001:db8::1", 8080)
    assert S.parse_sockaddr(sockaddr_in6("::1", 53)) == ("inet6", "::1", 53)


def test_sockaddr_ipv4_mapped_ipv6_kept_in_dotted_form():
    # documented: IPv4-mapped addresses are kept as written, ::ffff:a.b.c.d
    raw = sockaddr_in6("::ffff:127.0.0.1", 22)
    assert S.parse_sockaddr(raw) == ("inet6", "::ffff:127.0.0.1", 22)
    raw = sockaddr_in6("::ffff:93.184.216.34", 443)
    assert S.parse_sockaddr(raw) == ("inet6", "::ffff:93.184.216.34", 443)


def test_sockaddr_unix_path():
    raw = sockaddr_un(b"/run/docker.sock\0" + b"\xaa" * 20)   # sun_path is NUL-terminated
    assert S.parse_sockaddr(raw) == ("unix", "/run/docker.sock", None)


def test_sockaddr_unix_abstract_uses_the_length():
    # abstract names may contain NULs; only the length says where they end
    raw = sockaddr_un(b"\0my\0sock")
    assert S.parse_sockaddr(raw) == ("unix", "@my\0sock", None)
    assert S.parse_sockaddr(sockaddr_un(b"\0dbus-abc")) == ("unix", "@dbus-abc", None)


def test_sockaddr_unix_unnamed():
    assert S.parse_sockaddr(sockaddr_un(b"")) == ("unix", "", None)


def test_sockaddr_unix_invalid_utf8_path():
    family, addr, port = S.parse_sockaddr(sockaddr_un(b"/tmp/\xff\0"))
    assert (family, port) == ("unix", None)
    assert addr.encode("utf-8", "surrogateescape") == b"/tmp/\xff"


@pytest.mark.parametrize("raw", [b"", b"\x02"])
def test_sockaddr_shorter_than_family(raw):
    assert S.parse_sockaddr(raw) == (None, None, None)


def test_sockaddr_short_inet_buffers_give_family_only():
    assert S.parse_sockaddr(sockaddr_in("1.2.3.4", 80)[:6]) == ("inet", None, None)
    assert S.parse_sockaddr(sockaddr_in6("::1", 80)[:20]) == ("inet6", None, None)
    assert S.parse_sockaddr(struct.pack("=H", socket.AF_INET)) == ("inet", None, None)


def test_sockaddr_other_families():
    assert S.parse_sockaddr(struct.pack("=H", socket.AF_NETLINK) + bytes(10)) == ("netlink", None, None)
    assert S.parse_sockaddr(struct.pack("=H", 0) + bytes(14)) == ("unspec", None, None)
    assert S.parse_sockaddr(struct.pack("=H", 250) + bytes(14)) == ("af250", None, None)


@settings(HYP)
@given(st.ip_addresses(v=4), st.integers(0, 65535))
def test_sockaddr_inet_round_trip(ip, port):
    assert S.parse_sockaddr(sockaddr_in(str(ip), port)) == ("inet", str(ip), port)


@settings(HYP)
@given(st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None), st.integers(0, 65535))
def test_sockaddr_inet6_round_trip(ip, port):
    family, addr, p = S.parse_sockaddr(sockaddr_in6(str(ip), port))
    assert (family, p) == ("inet6", port)
    assert ipaddress.IPv6Address(addr) == ip


@settings(HYP)
@given(st.binary(max_size=128))
def test_sockaddr_never_raises(raw):
    family, addr, port = S.parse_sockaddr(raw)
    assert port is None or 0 <= port <= 65535


# ---- open_access ----------------------------------------------------------------

@pytest.mark.parametrize("flags, access", [
    (os.O_RDONLY, ["read"]),
    (os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY, ["read"]),
    (os.O_WRONLY, ["write"]),
    (os.O_WRONLY | os.O_CREAT | os.O_TRUNC, ["write", "create", "truncate"]),
    (os.O_RDWR, ["read", "write"]),
    (os.O_RDWR | os.O_CREAT | os.O_EXCL, ["read", "write", "create"]),
    (os.O_WRONLY | os.O_APPEND, ["write"]),
    (os.O_PATH, ["path"]),
    (os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW, ["path"]),
    (os.O_TMPFILE | os.O_RDWR, ["read", "write", "create"]),
    (os.O_TMPFILE | os.O_WRONLY, ["write", "create"]),
])
def test_open_access(flags, access):
    assert S.open_access(flags) == access


def test_o_directory_alone_is_not_tmpfile():
    # O_TMPFILE includes the O_DIRECTORY bit; O_DIRECTORY alone creates nothing
    assert "create" not in S.open_access(os.O_RDONLY | os.O_DIRECTORY)


# ---- specs -------------------------------------------------------------------------

def test_spec_packed_layout():
    p = S.BY_NAME["openat"].packed()
    assert len(p) == R.size("aw_spec") == 16
    # flags, path1, path2, addr, addrlen, msghdr, deref, argv, refuse, 7 pad bytes
    pad = bytes(7)
    assert p == bytes([R.SPEC_WATCH | R.SPEC_EMIT | R.SPEC_OPEN, 1, R.NOARG, R.NOARG, R.NOARG, R.NOARG,
                       R.NOARG, R.NOARG, 0]) + pad
    assert S.BY_NAME["execve"].packed() == bytes(
        [R.SPEC_WATCH | R.SPEC_EMIT | R.SPEC_EXEC | R.SPEC_PRIORITY, 0, R.NOARG, R.NOARG, R.NOARG,
         R.NOARG, R.NOARG, 1, 0]) + pad
    assert S.BY_NAME["sendto"].packed() == bytes(
        [R.SPEC_WATCH | R.SPEC_EMIT | R.SPEC_NEED_ADDR | R.SPEC_PRIORITY, R.NOARG, R.NOARG, 4, 5,
         R.NOARG, R.NOARG, R.NOARG, 0]) + pad
    assert S.BY_NAME["sendmsg"].packed()[5] == 1
    assert S.BY_NAME["clone3"].packed() == bytes(
        [R.SPEC_WATCH | R.SPEC_PRIORITY, R.NOARG, R.NOARG, R.NOARG, R.NOARG, R.NOARG, 0, R.NOARG, 0]) + pad
    # the run's specs ask the fork family's exits for EAGAIN (the pids limit)
    clone3 = next(s for s in S.specs_for(["process"]) if s.name == "clone3")
    assert clone3.packed()[8] == R.REFUSE_EAGAIN and clone3.attach_exit
    assert S.BY_NAME["exit_group"].packed()[0] == (R.SPEC_WATCH | R.SPEC_EMIT | R.SPEC_EXIT_GROUP
                                                   | R.SPEC_PRIORITY)
    assert S.BY_NAME["rename"].packed()[:3] == bytes([R.SPEC_WATCH | R.SPEC_EMIT, 0, 1])


def test_priority_ring_takes_all_but_plain_file_operations():
    """bpf/common.bpf.c: a flood of file records cannot starve the others;
    chdir rides with them because relative paths after it depend on it."""
    prio = {s.name for s in S.SPECS if R.SPEC.unpack(s.packed())[0] & R.SPEC_PRIORITY}
    assert {"execve", "connect", "sendto", "ptrace", "chdir", "fchdir"} <= prio
    assert not {"open", "openat", "unlink", "rename", "chmod"} & prio


@pytest.mark.parametrize("spec", S.SPECS, ids=lambda s: s.name)
def test_every_spec_packs_valid_argument_indexes(spec):
    flags, *idx, refuse, pad = R.SPEC.unpack(spec.packed())
    assert refuse == spec.refuse and pad == bytes(7)
    assert flags & R.SPEC_WATCH
    assert bool(flags & R.SPEC_EMIT) == spec.emit
    for i in idx:
        assert i == R.NOARG or 0 <= i <= 5
    for i in (spec.dirfd, spec.dirfd2, spec.flags_arg, spec.mode_arg):
        assert i is None or 0 <= i <= 5


def test_spec_names_unique_and_groups_known():
    names = [s.name for s in S.SPECS]
    assert len(names) == len(set(names))
    assert set(S.BY_NAME) == set(names)
    assert {s.group for s in S.SPECS} == set(S.GROUPS)
    assert all(s.why for s in S.SPECS)


@pytest.mark.parametrize("spec", S.SPECS, ids=lambda s: s.name)
def test_every_spec_resolves_to_a_syscall_number(spec):
    nr = S.syscall_number(spec.name)
    assert isinstance(nr, int)
    assert 0 <= nr < 512           # the BPF "specs" map has 512 slots


def test_syscall_numbers_are_distinct():
    nrs = [S.syscall_number(s.name) for s in S.SPECS]
    assert len(nrs) == len(set(nrs))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="process.bpf.c numbers are x86_64's")
def test_process_probe_syscall_numbers_match_bpf_source():
    with open(os.path.join(REPO, "bpf", "process.bpf.c")) as f:
        defines = dict(re.findall(r"#define AW_NR_(\w+)\s+(\d+)", f.read()))
    assert defines, "no AW_NR_* defines in process.bpf.c"
    for name, nr in defines.items():
        assert S.syscall_number(name.lower()) == int(nr), name


def test_specs_for_always_includes_process():
    for groups in ([], ["file"], ["net"], ["sensitive"], list(S.GROUPS)):
        got = S.specs_for(groups)
        assert {s.name for s in S.SPECS if s.group == "process"} <= {s.name for s in got}
        assert {s.group for s in got} == set(groups) | {"process"}


def test_specs_for_selects_only_the_groups_asked():
    names = {s.name for s in S.specs_for(["net"])}
    assert "connect" in names and "execve" in names
    assert "openat" not in names and "ptrace" not in names


def test_specs_for_rejects_unknown_groups():
    with pytest.raises(ValueError) as e:
        S.specs_for(["file", "bogus", "netz"])
    msg = str(e.value)
    assert "bogus" in msg and "netz" in msg
    for g in S.GROUPS:
        assert g in msg


# ---- decode -----------------------------------------------------------------------

def rec(name, args=(0, 0, 0, 0, 0, 0), ret=0, str1="", data2=b"", len2=0, extra=(0, 0)):
    data2 = bytes(data2).ljust(R.STR_LEN, b"\0")
    return {"type": R.EV_SYSCALL, "pid": 4000, "tid": 4001, "uid": 1000, "ts": 1, "cgroup": 9,
            "comm": "agent", "nr": 0, "len2": len2, "ret": ret,
            "args": tuple(u64(a) for a in args) + (0,) * (6 - len(args)),
            "extra": extra, "str1": str1, "data2": data2}


def test_decode_openat_relative_create():
    r = rec("openat", args=(U64_AT_FDCWD, 0x7FFF1000, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o100644),
            ret=3, str1="out/result.txt")
    ev = S.decode(r, S.BY_NAME["openat"])
    assert isinstance(ev, FileEvent)
    assert ev.op == "open" and ev.path == "out/result.txt"
    assert ev.abspath is None                         # the engine resolves it
    assert ev.flags == os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    assert ev.access == ["write", "create", "truncate"]
    assert ev.mode == 0o644
    assert (ev.pid, ev.tid, ev.uid, ev.comm, ev.ret, ev.error) == (4000, 4001, 1000, "agent", 3, None)


def test_decode_openat_read_has_no_mode_and_reports_errno():
    r = rec("openat", args=(U64_AT_FDCWD, 0, os.O_RDONLY | os.O_CLOEXEC, 0o777), ret=-2, str1="/etc/shadow")
    ev = S.decode(r, S.BY_NAME["openat"])
    assert ev.access == ["read"]
    assert ev.mode is None                          # mode is garbage without O_CREAT
    assert (ev.ret, ev.error) == (-2, "ENOENT")


def test_decode_creat():
    ev = S.decode(rec("creat", args=(0, 0o600), ret=4, str1="new.txt"), S.BY_NAME["creat"])
    assert ev.op == "open" and ev.path == "new.txt"
    assert ev.access == ["write", "create", "truncate"]
    assert ev.mode == 0o600


def test_decode_openat2_flags_from_open_how():
    spec = S.BY_NAME["openat2"]
    ev = S.decode(rec("openat2", args=(U64_AT_FDCWD, 0, 0x7FFF, 24), str1="/srv/x",
                      extra=(os.O_RDWR | os.O_CREAT, 0o100640)), spec)
    assert ev.flags == os.O_RDWR | os.O_CREAT
    assert ev.access == ["read", "write", "create"]
    assert ev.mode == 0o640
    ev = S.decode(rec("openat2", str1="/srv/y", extra=(os.O_PATH, 0)), spec)
    assert ev.access == ["path"]


def test_decode_fd_based_variant_names_the_fd():
    ev = S.decode(rec("fchmod", args=(7, 0o4755), str1="stale"), S.BY_NAME["fchmod"])
    assert ev.op == "chmod" and ev.path == "fd:7" and ev.mode == 0o4755
    ev = S.decode(rec("ftruncate", args=(u64(-9), 0), ret=-9), S.BY_NAME["ftruncate"])
    assert ev.path == "fd:-9" and ev.error == "EBADF"


def test_decode_rename_second_path():
    r = rec("renameat2", args=(U64_AT_FDCWD, 0, U64_AT_FDCWD, 0, 0), str1="a.tmp",
            data2=b"/home/u/.bashrc\0garbage")
    ev = S.decode(r, S.BY_NAME["renameat2"])
    assert (ev.op, ev.path, ev.path2) == ("rename", "a.tmp", "/home/u/.bashrc")
    assert ev.access == []


def test_decode_connect_inet():
    raw = sockaddr_in("10.1.2.3", 8443)
    r = rec("connect", args=(3, 0x1000, 16), ret=-115, data2=raw + b"\xee" * 30, len2=len(raw))
    ev = S.decode(r, S.BY_NAME["connect"])
    assert isinstance(ev, NetEvent)
    assert (ev.op, ev.family, ev.addr, ev.port) == ("connect", "inet", "10.1.2.3", 8443)
    assert ev.error == "EINPROGRESS"


def test_decode_connect_uses_len2_for_abstract_unix():
    raw = sockaddr_un(b"\0name")
    r = rec("connect", args=(3, 0, len(raw)), data2=raw + b"\0\0tail", len2=len(raw))
    ev = S.decode(r, S.BY_NAME["connect"])
    assert (ev.family, ev.addr, ev.port) == ("unix", "@name", None)


def test_decode_socket_family_and_type():
    spec = S.BY_NAME["socket"]
    ev = S.decode(rec("socket", args=(socket.AF_INET6, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
                                      | socket.SOCK_NONBLOCK, 0), ret=3), spec)
    assert (ev.op, ev.family, ev.sock_type, ev.protocol) == ("socket", "inet6", "stream", 0)
    ev = S.decode(rec("socket", args=(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))), spec)
    assert (ev.family, ev.sock_type, ev.protocol) == ("packet", "raw", socket.htons(3))
    ev = S.decode(rec("socket", args=(socket.AF_NETLINK, socket.SOCK_DGRAM, 0)), spec)
    assert (ev.family, ev.sock_type) == ("netlink", "dgram")
    assert ev.addr is None and ev.port is None


def test_decode_sensitive_with_path():
    r = rec("mount", args=(1, 2, 3, 4, 5, 6), ret=-1, str1="/mnt/target")
    r["nr"] = 165
    ev = S.decode(r, S.BY_NAME["mount"])
    assert isinstance(ev, SyscallEvent)
    assert (ev.name, ev.nr, ev.path, ev.error) == ("mount", 165, "/mnt/target", "EPERM")
    assert ev.args == [1, 2, 3, 4, 5, 6]


def test_decode_sensitive_without_path():
    ev = S.decode(rec("ptrace", args=(16, 1234), str1="ignored"), S.BY_NAME["ptrace"])
    assert isinstance(ev, SyscallEvent)
    assert ev.name == "ptrace" and ev.path is None and ev.args[:2] == [16, 1234]


# ---- dirfd_of / resolve ---------------------------------------------------------

def test_dirfd_of():
    r = rec("renameat", args=(5, 0, U64_AT_FDCWD, 0))
    assert S.dirfd_of(S.BY_NAME["renameat"], r) == 5
    assert S.dirfd_of(S.BY_NAME["renameat"], r, second=True) == S.AT_FDCWD
    assert S.dirfd_of(S.BY_NAME["open"], r) == S.AT_FDCWD
    assert S.dirfd_of(S.BY_NAME["openat"], rec("openat", args=(U64_AT_FDCWD,))) == S.AT_FDCWD


@pytest.mark.parametrize("path, cwd, expected", [
    ("/etc/../etc//passwd", None, "/etc/passwd"),
    ("/a/./b/", "/ignored", "/a/b"),
    ("//etc/shadow", None, "/etc/shadow"),      # POSIX normpath keeps a leading "//"
    ("///etc/shadow", None, "/etc/shadow"),
    ("f", "//tmp", "/tmp/f"),
    ("notes.txt", "/home/u", "/home/u/notes.txt"),
    ("./x/../y", "/home/u", "/home/u/y"),
    ("../../z", "/home/u/w", "/home/z"),
    ("../../../..", "/a", "/"),
    ("rel", None, None),
    ("rel", "", None),
    ("", "/home/u", None),
])
def test_resolve(path, cwd, expected):
    assert S.resolve(path, cwd, S.AT_FDCWD, os.getpid()) == expected


def test_resolve_against_a_dirfd(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert S.resolve("sub/f", "/elsewhere", fd, os.getpid()) == str(tmp_path / "sub" / "f")
    finally:
        os.close(fd)
    assert S.resolve("f", "/elsewhere", 99999, os.getpid()) is None   # fd unknown


_seg = st.sampled_from(["a", "b", ".", "..", "", "c d", "\udcff"])


@settings(HYP)
@given(st.lists(_seg, max_size=8), st.lists(st.sampled_from(["x", "y", ".."]), max_size=4))
def test_resolve_always_absolute_and_normal(parts, cwd_parts):
    path = "/".join(parts)
    cwd = "/" + "/".join(cwd_parts)
    out = S.resolve(path, cwd, S.AT_FDCWD, os.getpid())
    if not path:
        assert out is None
    else:
        assert out.startswith("/") and os.path.normpath(out) == out
        assert "/../" not in out + "/" and not out.startswith("//")


def test_specs_for_follows_the_seccomp_deny_list():
    got = {s.name: s for s in S.specs_for(["file"], denied=["ptrace", "clone", "kcmp", "openat"])}
    assert got["clone"].denied and got["clone"].enter and got["clone"].attach_exit
    assert not S.BY_NAME["clone"].attach_exit                 # without seccomp: entry only
    assert got["openat"].denied and got["openat"].enter      # watched anyway: flagged
    for name in ("ptrace", "kcmp"):                          # not in the groups: exit only
        assert got[name].denied and not got[name].enter and got[name].attach_exit
    assert got["kcmp"].group == "seccomp" and got["ptrace"].group == "sensitive"
    assert R.SPEC.unpack(got["kcmp"].packed())[0] & R.SPEC_DENIED
    assert not R.SPEC.unpack(S.BY_NAME["ptrace"].packed())[0] & R.SPEC_DENIED
    assert len(S.specs_for([], denied=["kcmp", "kcmp"])) == len(S.specs_for([])) + 1


@pytest.mark.parametrize("name, args, target, tid, pidfd, sig", [
    ("kill", (u64(-1), 9), -1, None, None, 9),
    ("tgkill", (10, 11, 15), 10, 11, None, 15),
    ("pidfd_send_signal", (4, 2, 0, 0), None, None, 4, 2),
])
def test_decode_signals(name, args, target, tid, pidfd, sig):
    ev = S.decode(rec(name, args=args, ret=-1), S.BY_NAME[name])
    assert ev.kind == "signal" and ev.op == name and ev.error == "EPERM"
    assert (ev.target, ev.target_tid, ev.pidfd, ev.signal) == (target, tid, pidfd, sig)
    assert ev.signal_name == {9: "SIGKILL", 15: "SIGTERM", 2: "SIGINT"}[sig]
