"""agentwatch.sandbox.landlock against the real kernel.

Landlock is irreversible, so every sandbox lives in a child made by os.fork:
the child applies the plan, runs the probes, writes {probe: "ok" | errno
name} as JSON to a pipe and leaves with os._exit. The pytest process itself
is never restricted. Each probe is paired with a control (the same operation
on an allowed object succeeds) so a denial proves the rule, not a typo.
"""
import errno
import fcntl
import json
import os
import shutil
import socket
import termios

import pytest

from agentwatch.sandbox import landlock
from agentwatch.sandbox.landlock import LandlockRules, apply, plan

ABI = landlock.abi_version()
pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(ABI < 1, reason="Landlock not supported by this kernel"),
]
need = lambda n: pytest.mark.skipif(ABI < n, reason=f"needs Landlock ABI {n} (have {ABI})")  # noqa: E731

# What a dynamically linked /usr/bin/true needs: its binary and the ELF
# interpreter need EXECUTE; /bin and /lib are symlinks into /usr on Debian.
SYSTEM_EXEC = sorted({os.path.realpath(p) for p in ("/usr", "/bin", "/lib", "/lib64")
                      if os.path.exists(p)})
TRUE = os.path.realpath("/bin/true")


def sandboxed(p, probes):
    """Apply plan ``p`` in a forked child, run ``probes()`` there, return its dict."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # child: never return into pytest
        try:
            os.close(r)
            try:
                apply(p)
                out = probes()
            except BaseException as e:  # noqa: BLE001
                out = {"error": f"{type(e).__name__}: {e}"}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(data)


def attempt(fn, *args):
    """'ok' or the errno name ('EACCES') of the OSError ``fn`` raised."""
    try:
        fn(*args)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def read(path):
    with open(path, "rb") as f:
        f.read(1)


def write(path):
    with open(path, "wb") as f:
        f.write(b"x")


def run(path):
    """fork+execve ``path``; 'ok' when it exits 0, else the execve errno name."""
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(path, [path])
        except OSError as e:
            os._exit(100 + e.errno)
        os._exit(99)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return "ok" if code == 0 else errno.errorcode.get(code - 100, f"exit {code}")


@pytest.fixture
def tree(tmp_path):
    """ro/ (read), rw/ (write), out/ (no rule) with a file in each."""
    d = {name: tmp_path / name for name in ("ro", "rw", "out")}
    for name, path in d.items():
        path.mkdir()
        (path / "file").write_bytes(b"data")
    shutil.copy2(TRUE, d["rw"] / "true")
    os.chmod(d["rw"] / "true", 0o755)
    return {k: str(v) for k, v in d.items()}


def fs_rules(t, **kw):
    return LandlockRules(read=[t["ro"]], write=[t["rw"]], exec=SYSTEM_EXEC, **kw)


def test_abi_version():
    assert ABI >= 1
    assert ABI == landlock.abi_version()


def test_read_and_write_allow_lists(tree):
    t = tree
    res = sandboxed(plan(fs_rules(t)), lambda: {
        "read ro": attempt(read, f"{t['ro']}/file"),
        "list ro": attempt(os.listdir, t["ro"]),
        "read out": attempt(read, f"{t['out']}/file"),
        "list out": attempt(os.listdir, t["out"]),
        "write ro": attempt(write, f"{t['ro']}/file"),
        "write rw": attempt(write, f"{t['rw']}/new"),
        "mkdir rw": attempt(os.mkdir, f"{t['rw']}/sub"),
        "unlink rw": attempt(os.unlink, f"{t['rw']}/file"),
        "write out": attempt(write, f"{t['out']}/new"),
        "unlink ro": attempt(os.unlink, f"{t['ro']}/file"),
    })
    assert res == {"read ro": "ok", "list ro": "ok", "read out": "EACCES", "list out": "EACCES",
                   "write ro": "EACCES", "write rw": "ok", "mkdir rw": "ok", "unlink rw": "ok",
                   "write out": "EACCES", "unlink ro": "EACCES"}
    assert os.path.exists(f"{t['rw']}/new") and not os.path.exists(f"{t['out']}/new")


def test_exec_only_from_exec_paths(tree):
    """W^X: a binary copied into the write dir cannot be executed."""
    t = tree
    res = sandboxed(plan(fs_rules(t)), lambda: {
        "system true": run(TRUE),
        "rw true": run(f"{t['rw']}/true"),
    })
    assert res == {"system true": "ok", "rw true": "EACCES"}


def test_symlink_hardlink_and_proc_root_detours(tree):
    t = tree
    secret = f"{t['out']}/file"
    os.symlink(secret, f"{t['rw']}/link")
    res = sandboxed(plan(fs_rules(t)), lambda: {
        "symlink to outside": attempt(read, f"{t['rw']}/link"),
        "new symlink to outside": attempt(read, _symlink(secret, f"{t['rw']}/link2")),
        "hardlink outside into rw": attempt(os.link, secret, f"{t['rw']}/hard"),
        "rename outside into rw": attempt(os.rename, secret, f"{t['rw']}/moved"),
        # would gain write rights through the new name: REFER forbids it
        "hardlink ro into rw": attempt(os.link, f"{t['ro']}/file", f"{t['rw']}/ro-hard"),
        "proc root detour": attempt(read, f"/proc/self/root{secret}"),
        "proc root control": attempt(read, f"/proc/self/root{t['ro']}/file"),
    })
    assert res["symlink to outside"] == "EACCES"
    assert res["new symlink to outside"] == "EACCES"   # making it is allowed, following is not
    assert res["hardlink outside into rw"] in ("EXDEV", "EACCES")
    assert res["rename outside into rw"] in ("EXDEV", "EACCES")
    assert res["hardlink ro into rw"] in ("EXDEV", "EACCES")
    assert res["proc root detour"] == "EACCES"
    assert res["proc root control"] == "ok"
    assert not os.path.exists(f"{t['rw']}/hard") and os.path.exists(secret)


def _symlink(target, path):
    os.symlink(target, path)
    return path


@need(2)
def test_refer_allows_links_and_renames_within_write_paths(tree):
    t = tree
    os.mkdir(f"{t['rw']}/a")
    res = sandboxed(plan(fs_rules(t)), lambda: {
        "rename across dirs in rw": attempt(os.rename, f"{t['rw']}/file", f"{t['rw']}/a/file"),
        "link across dirs in rw": attempt(os.link, f"{t['rw']}/a/file", f"{t['rw']}/file2"),
    })
    assert res == {"rename across dirs in rw": "ok", "link across dirs in rw": "ok"}


@need(3)
def test_truncate_outside_write_paths_denied(tree):
    t = tree
    res = sandboxed(plan(fs_rules(t)), lambda: {
        "truncate ro": attempt(os.truncate, f"{t['ro']}/file", 0),
        "truncate out": attempt(os.truncate, f"{t['out']}/file", 0),
        "truncate rw": attempt(os.truncate, f"{t['rw']}/file", 0),
    })
    assert res == {"truncate ro": "EACCES", "truncate out": "EACCES", "truncate rw": "ok"}
    assert os.path.getsize(f"{t['ro']}/file") == 4


@need(5)
def test_ioctl_dev_only_beneath_ioctl_paths():
    """TCGETS on /dev/null: Landlock says EACCES before the driver can say ENOTTY."""
    def probe():
        fd = os.open("/dev/null", os.O_RDONLY)
        return {"ioctl": attempt(fcntl.ioctl, fd, termios.TCGETS, bytes(64))}
    denied = sandboxed(plan(LandlockRules(read=["/dev/null"])), probe)
    allowed = sandboxed(plan(LandlockRules(read=["/dev/null"], ioctl_dev=["/dev/null"])), probe)
    assert denied == {"ioctl": "EACCES"}
    assert allowed == {"ioctl": "ENOTTY"}


@pytest.fixture
def listeners():
    """Two TCP listeners on 127.0.0.1 in the (unrestricted) test process."""
    socks = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        socks.append(s)
    yield [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(port):
    # A raw socket, not create_connection: its getaddrinfo imports the idna
    # codec, and the sandbox cannot read Python's stdlib.
    with socket.socket() as s:
        s.settimeout(5)
        s.connect(("127.0.0.1", port))


def bind(port):
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@need(4)
def test_tcp_connect_and_bind_ports(listeners):
    allowed, other = listeners
    bind_ok, bind_no = free_port(), free_port()
    p = plan(LandlockRules(read=[], write=[], exec=[], tcp_connect=[allowed], tcp_bind=[bind_ok]))
    res = sandboxed(p, lambda: {
        "connect allowed": attempt(connect, allowed),
        "connect other": attempt(connect, other),
        "bind allowed": attempt(bind, bind_ok),
        "bind other": attempt(bind, bind_no),
    })
    assert res == {"connect allowed": "ok", "connect other": "EACCES",
                   "bind allowed": "ok", "bind other": "EACCES"}


@need(4)
def test_no_tcp_at_all_and_none_means_unrestricted(listeners):
    port = listeners[0]
    no_tcp = sandboxed(plan(LandlockRules(read=[], write=[], exec=[], tcp_connect=[])),
                       lambda: {"connect": attempt(connect, port), "bind": attempt(bind, 0)})
    assert no_tcp == {"connect": "EACCES", "bind": "ok"}   # bind not handled: tcp_bind is None
    free = sandboxed(plan(LandlockRules(read=[], write=[], exec=[])),
                     lambda: {"connect": attempt(connect, port)})
    assert free == {"connect": "ok"}


@need(6)
def test_scope_abstract_unix_socket():
    name = f"\0agentwatch-landlock-test-{os.getpid()}"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(name)
    srv.listen(8)

    def probe():
        def conn():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.connect(name)
        return {"connect": attempt(conn)}
    try:
        scoped = sandboxed(plan(LandlockRules(read=[], write=[], exec=[],
                                              scope_abstract_unix=True)), probe)
        control = sandboxed(plan(LandlockRules(read=[], write=[], exec=[])), probe)
    finally:
        srv.close()
    assert scoped == {"connect": "EPERM"}
    assert control == {"connect": "ok"}


@need(6)
def test_scope_signals():
    parent = os.getpid()
    p = plan(LandlockRules(read=[], write=[], exec=[], scope_signals=True))
    res = sandboxed(p, lambda: {"kill parent": attempt(os.kill, parent, 0),
                                "kill self": attempt(os.kill, os.getpid(), 0)})
    assert res == {"kill parent": "EPERM", "kill self": "ok"}


def test_pretend_abi1_downgrades_are_named_and_really_unenforced(tree, listeners):
    """A plan for ABI 1 runs on this kernel and enforces only ABI-1 rights."""
    t = tree
    rules = fs_rules(t, tcp_connect=[listeners[0]], scope_signals=True,
                     ioctl_dev=["/dev/null"])
    p = plan(rules, abi=1)
    text = " ".join(p.downgrades)
    for word in ("TRUNCATE", "TCP connect", "REFER", "IOCTL_DEV", "signal"):
        assert word in text, (word, p.downgrades)
    assert p.handled_net == 0 and p.scoped == 0 and p.ports == []
    assert p.handled_fs == landlock.FS_ABI1
    os.mkdir(f"{t['rw']}/a")
    res = sandboxed(p, lambda: {
        "truncate ro": attempt(os.truncate, f"{t['ro']}/file", 0),
        "connect unlisted": attempt(connect, listeners[1]),
        "read out": attempt(read, f"{t['out']}/file"),
        "rename across dirs in rw": attempt(os.rename, f"{t['rw']}/file", f"{t['rw']}/a/file"),
    })
    assert res == {"truncate ro": "ok", "connect unlisted": "ok", "read out": "EACCES",
                   "rename across dirs in rw": "EXDEV"}


def test_missing_paths_are_listed_not_fatal(tree):
    t = tree
    gone = f"{t['out']}/does-not-exist"
    p = plan(LandlockRules(read=[t["ro"], gone], write=[], exec=[]))
    assert p.missing == [gone]
    assert [path for path, _ in p.paths] == [t["ro"]]
    res = sandboxed(p, lambda: {"read ro": attempt(read, f"{t['ro']}/file")})
    assert res == {"read ro": "ok"}


def test_apply_error_names_step_and_path(tree):
    t = tree
    victim = f"{t['out']}/vanishes"
    os.mkdir(victim)
    p = plan(LandlockRules(read=[victim], write=[], exec=[]))
    os.rmdir(victim)   # gone between plan() and apply()
    res = sandboxed(p, lambda: {"unreachable": "apply should have raised"})
    assert "error" in res
    assert "open(O_PATH)" in res["error"] and victim in res["error"]
    assert "No such file" in res["error"]


def test_file_rules_get_file_rights_only(tree):
    """A rule on a single file must not carry directory rights (kernel: EINVAL)."""
    t = tree
    p = plan(LandlockRules(read=[], write=[f"{t['out']}/file"], exec=[]))
    (path, access), = p.paths
    assert access & ~landlock.FS_FILE_RIGHTS == 0
    res = sandboxed(p, lambda: {"write file": attempt(write, f"{t['out']}/file"),
                                "create sibling": attempt(write, f"{t['out']}/sibling")})
    assert res == {"write file": "ok", "create sibling": "EACCES"}
