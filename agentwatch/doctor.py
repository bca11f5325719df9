"""Probe the running kernel for the features agentwatch uses.

Every check tries the feature for real (load a BPF program, call a syscall,
read a kernel file) instead of trusting kernel config, and never raises: a
failure becomes ``Check(ok=False)`` with the reason in ``detail``.

Imports without root and without bcc; bcc is loaded (by
agentwatch.sensors.import_bcc, the one place that imports it) only inside
the BPF probes, which report "needs root" when run unprivileged.

One module (~700 lines) on purpose: a flat list of independent probes, one
function each, read top to bottom as the report prints them. The last,
egress-guard, probes several pieces (``egress_guard_result`` words them).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field

from .core.errors import KernelFeatureError

BTF_VMLINUX = "/sys/kernel/btf/vmlinux"
TRACEFS = "/sys/kernel/tracing"
SECURITYFS_LSM = "/sys/kernel/security/lsm"
SECCOMP_ACTIONS = "/proc/sys/kernel/seccomp/actions_avail"
KHEADERS = "/sys/kernel/kheaders.tar.xz"  # CONFIG_IKHEADERS, used by bcc
NEEDED_CONTROLLERS = ("cpu", "memory", "pids")

SYS_LANDLOCK_CREATE_RULESET = 444  # same number on every architecture
LANDLOCK_CREATE_RULESET_VERSION = 1
SYS_LSM_LIST_MODULES = 461  # also the same everywhere
LSM_IDS = {100: "capability", 101: "selinux", 102: "smack", 103: "tomoyo",
           104: "apparmor", 105: "yama", 106: "loadpin", 107: "safesetid",
           108: "lockdown", 109: "bpf", 110: "landlock", 111: "ima", 112: "evm",
           113: "ipe"}  # uapi linux/lsm.h

ENFORCE_BPF_LSM = "bpf-lsm"
ENFORCE_FALLBACK = "landlock+seccomp+cgroup-bpf"
ENFORCE_NONE = "monitor-only"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    disables: str
    seconds: float = field(default=0.0, compare=False)  # time the probe took


class _Fail(Exception):
    """A probe failure whose message is the whole detail."""


# --- helpers ---------------------------------------------------------------

def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _unescape_mount(field_: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal.
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field_ = field_.replace(code, ch)
    return field_


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, options) for each line of /proc/mounts."""
    out = []
    for line in _read("/proc/mounts").splitlines():
        parts = line.split()
        if len(parts) >= 4:
            out.append((_unescape_mount(parts[1]), parts[2], parts[3]))
    return out


def _cgroup2_mount() -> str | None:
    for point, fstype, _ in _mounts():
        if fstype == "cgroup2":
            return point
    return None


def _v1_controllers() -> list[str]:
    """Controllers bound to a cgroup v1 hierarchy (hierarchy id != 0)."""
    found = []
    try:
        lines = _read("/proc/cgroups").splitlines()[1:]
    except OSError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 4 and parts[1] != "0" and parts[3] == "1":
            found.append(parts[0])
    if not found:  # no /proc/cgroups: read controllers from v1 mount options
        for _, fstype, opts in _mounts():
            if fstype == "cgroup":
                found += [o for o in opts.split(",")
                          if o not in ("rw", "ro", "relatime", "noatime", "nosuid",
                                       "nodev", "noexec") and "=" not in o]
    return found


def _cgroup2_controllers(mount: str) -> list[str]:
    return _read(os.path.join(mount, "cgroup.controllers")).split()


@contextlib.contextmanager
def _capture_fd2():
    """Send fd 2 (bcc/clang/libbpf chatter) to a temp file; yield a reader.

    Process-wide: other threads' stderr is captured too while this runs.
    """
    import sys
    sys.stderr.flush()
    saved = os.dup(2)
    tmp = tempfile.TemporaryFile(mode="w+b")
    os.dup2(tmp.fileno(), 2)

    def text() -> str:
        tmp.seek(0)
        return tmp.read().decode(errors="replace")
    try:
        yield text
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        tmp.close()


def _last_line(text: str, limit: int = 200) -> str:
    """The most telling line of bcc/clang/verifier output."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]  # clang
    if errors:
        return errors[0][:limit]
    lines = [ln for ln in lines  # verifier: drop its summary and bcc's errno echo
             if not ln.startswith(("processed ", "bpf: Failed to load program"))]
    return lines[-1][:limit] if lines else ""


def _bpf(text: str, use):
    """Compile `text` with bcc, run use(b, bcc) and always clean up.

    Returns what `use` returns; raises _Fail with a readable reason.
    """
    if os.geteuid() != 0:
        raise _Fail("needs root")
    try:
        from .sensors import import_bcc   # here: importing doctor loads neither bcc nor the policy code
        bcc = import_bcc()
    except KernelFeatureError:
        raise _Fail("needs bcc (see the bcc check)") from None
    b = None
    with _capture_fd2() as chatter:
        try:
            b = bcc.BPF(text=text.encode())
            return use(b, bcc)
        except Exception as e:  # noqa: BLE001
            err = ctypes.get_errno()  # bcc's libbcc sets errno (use_errno=True)
            msg = str(e)
            if msg.startswith("Need super-user privileges"):
                # bcc says this for any EPERM; as root it means the kernel refused.
                msg = "program load refused by the kernel: EPERM (as root)"
            elif err and "Failed to load" in msg:
                msg += f" [{errno.errorcode.get(err, err)}]"
            if msg.startswith("Failed to compile"):
                msg = "bcc compile failed"
            extra = _last_line(chatter())
            raise _Fail(f"{msg}: {extra}" if extra and extra not in msg else msg) from None
        finally:
            if b is not None:
                try:
                    b.cleanup()
                except Exception:  # noqa: BLE001 - cleanup must not mask the result
                    pass


# --- probes: each returns (ok, detail) or raises -------------------------

def _probe_root():
    euid = os.geteuid()
    return euid == 0, f"euid {euid}"


def _probe_btf():
    if os.path.exists(BTF_VMLINUX):
        return True, f"{BTF_VMLINUX} ({os.path.getsize(BTF_VMLINUX)} bytes)"
    return False, f"{BTF_VMLINUX} absent (kernel built without CONFIG_DEBUG_INFO_BTF)"


def _tracefs_mount() -> str | None:
    points = [m for m, fstype, _ in _mounts() if fstype == "tracefs"]
    return TRACEFS if TRACEFS in points else (points[0] if points else None)


def _probe_tracefs():
    mount = _tracefs_mount()
    if mount is None:
        return False, f"not mounted: mount -t tracefs tracefs {TRACEFS}"
    try:
        n = len(os.listdir(os.path.join(mount, "events", "syscalls")))
    except PermissionError:
        return True, f"mounted at {mount} (not readable without root)"
    except FileNotFoundError:
        n = 0
    return True, f"mounted at {mount} ({n} syscall tracepoint entries)"


def _probe_bcc():
    try:
        from .sensors import import_bcc   # here: importing doctor loads neither bcc nor the policy code
        bcc = import_bcc()
    except KernelFeatureError as e:
        return False, str(e)
    version = getattr(bcc, "__version__", "?")
    return True, f"bcc {version} ({os.path.dirname(bcc.__file__)})"


def _headers_version(build: str) -> str | None:
    """UTS_RELEASE from the headers tree, if it says."""
    path = os.path.join(build, "include/generated/utsrelease.h")
    try:
        for line in _read(path).splitlines():
            if "UTS_RELEASE" in line and '"' in line:
                return line.split('"')[1]
    except OSError:
        pass
    return None


def _probe_kernel_headers():
    release = platform.release()
    build = f"/lib/modules/{release}/build"
    if not os.path.exists(build):
        if os.path.exists(KHEADERS):
            return True, f"no {build}; bcc will use {KHEADERS} (CONFIG_IKHEADERS)"
        return False, f"no {build} and no {KHEADERS}"
    real = os.path.realpath(build)
    version = _headers_version(real)
    matches = version == release if version else release in real
    if matches:
        return True, f"{build} -> {real} (matches {release})"
    shown = version or os.path.basename(real)
    return True, (f"{build} -> {real}; headers are for {shown}, kernel is {release}: "
                  "BPF code must not read kernel structs")


def _probe_bpf_syscall():
    def use(b, bcc):
        b.load_func(b"f", bcc.BPF.SOCKET_FILTER)
        return True, "loaded a socket filter program"
    return _bpf("int f(void *ctx) { return 0; }", use)


def _probe_raw_tracepoint():
    def use(b, bcc):
        b.load_func(b"f", bcc.BPF.RAW_TRACEPOINT)
        return True, "loaded a raw tracepoint program"
    return _bpf("int f(struct bpf_raw_tracepoint_args *ctx) { return 0; }", use)


def _probe_tracepoint():
    text = """
BPF_ARRAY(hits, u64, 1);
int f(void *ctx) { hits.increment(0); return 0; }
"""
    tp = b"syscalls:sys_enter_getppid"

    def use(b, bcc):
        b.load_func(b"f", bcc.BPF.TRACEPOINT)
        b.attach_tracepoint(tp=tp, fn_name=b"f")
        os.getppid()
        b.detach_tracepoint(tp=tp)
        n = b[b"hits"][0].value
        if n < 1:
            return False, f"attached to {tp.decode()} but it never fired"
        return True, f"attached to {tp.decode()}, fired {n} time(s), detached"
    return _bpf(text, use)


def _probe_ringbuf():
    text = """
BPF_RINGBUF_OUTPUT(events, 1);
int f(void *ctx) { u32 x = 1; events.ringbuf_output(&x, sizeof(x), 0); return 0; }
"""

    def use(b, bcc):
        b.load_func(b"f", bcc.BPF.SOCKET_FILTER)
        b[b"events"].open_ring_buffer(lambda *args: None)
        b.ring_buffer_poll(0)
        return True, "created a ring buffer map, loaded a writer and polled it"
    return _bpf(text, use)


def _probe_cgroup_v2():
    mount = _cgroup2_mount()
    if mount is None:
        return False, "no cgroup2 mount in /proc/mounts"
    controllers = " ".join(_cgroup2_controllers(mount)) or "(none)"
    v1 = [m for m, fstype, _ in _mounts() if fstype == "cgroup"]
    layout = f"hybrid ({len(v1)} cgroup v1 hierarchies also mounted)" if v1 else "unified"
    return True, f"{mount}, {layout}; cgroup.controllers: {controllers}"


def _probe_cgroup_controllers():
    mount = _cgroup2_mount()
    if mount is None:
        return False, "no cgroup2 mount"
    have = set(_cgroup2_controllers(mount))
    missing = [c for c in NEEDED_CONTROLLERS if c not in have]
    if not missing:
        return True, f"{', '.join(NEEDED_CONTROLLERS)} available in {mount}"
    v1 = set(_v1_controllers())
    parts = []
    v1_only = [c for c in missing if c in v1]
    absent = [c for c in missing if c not in v1]
    if v1_only:
        parts.append(f"v1-only: {', '.join(v1_only)}")
    if absent:
        parts.append(f"absent: {', '.join(absent)}")
    return False, f"not in {mount}/cgroup.controllers ({'; '.join(parts)})"


def _probe_cgroup_bpf():
    def use(b, bcc):
        b.load_func(b"f", bcc.BPF.CGROUP_SOCK_ADDR,
                    attach_type=bcc.BPFAttachType.CGROUP_INET4_CONNECT)
        return True, "loaded a cgroup_sock_addr (inet4 connect) program; not attached"
    return _bpf("int f(struct bpf_sock_addr *ctx) { return 1; }", use)


def _lsm_list_modules() -> list[str] | None:
    """Active LSMs from the lsm_list_modules syscall (Linux 6.8+), else None."""
    libc = ctypes.CDLL(None, use_errno=True)
    ids = (ctypes.c_uint64 * 64)()
    size = ctypes.c_uint32(ctypes.sizeof(ids))
    n = libc.syscall(ctypes.c_long(SYS_LSM_LIST_MODULES), ids, ctypes.byref(size),
                     ctypes.c_uint32(0))
    if n < 0:
        return None
    return [LSM_IDS.get(i, str(i)) for i in ids[:n]]


def _active_lsms() -> tuple[list[str] | None, str]:
    """(active LSM names or None if unknown, where they came from)."""
    lsms = _lsm_list_modules()
    if lsms is not None:
        return lsms, "lsm_list_modules"
    if os.path.exists(SECURITYFS_LSM):
        return _read(SECURITYFS_LSM).split(","), SECURITYFS_LSM
    for arg in _read("/proc/cmdline").split():
        if arg.startswith("lsm="):
            return arg[4:].split(","), "lsm= on /proc/cmdline"
    return None, "unknown: securityfs not mounted and no lsm= on /proc/cmdline"


def _probe_bpf_lsm():
    lsms, source = _active_lsms()
    listed = lsms is not None and "bpf" in lsms
    if lsms is None:
        where = f"active LSMs {source}"
    else:
        where = (f"bpf {'is' if listed else 'NOT'} in active LSMs "
                 f"({source}: {','.join(lsms)})")

    def use(b, bcc):
        b.load_func(b"lsm__file_open", bcc.BPF.LSM)  # bcc already loaded+attached it
        return "LSM_PROBE loads"
    try:
        loaded = _bpf("LSM_PROBE(file_open, struct file *file) { return 0; }", use)
        ok = True
    except _Fail as e:
        loaded, ok = f"LSM_PROBE: {e}", False
    # agentwatch's LSM programs read kernel structs: usable only with headers
    # of exactly this kernel (guards/lsm.py refuses others)
    from .guards.lsm import check_headers
    hdr_ok, hdr = check_headers()
    if ok and listed and not hdr_ok:
        return False, f"{where}; {loaded}; but {hdr}"
    return ok and listed, f"{where}; {loaded}"


def _probe_fentry():
    def use(b, bcc):
        return True, "KFUNC_PROBE(do_nanosleep) loaded and attached"
    # bcc loads and attaches kfunc__* programs while constructing BPF().
    return _bpf("KFUNC_PROBE(do_nanosleep) { return 0; }", use)


def _probe_kprobes():
    mount = _tracefs_mount()
    if mount is None:
        return False, "tracefs not mounted, cannot tell"
    path = os.path.join(mount, "kprobe_events")
    try:
        os.stat(path)
        return True, f"{path} present"
    except PermissionError:
        return False, f"cannot read {mount}: needs root"
    except FileNotFoundError:
        return False, f"no {path} (kernel built without CONFIG_KPROBES)"


def _probe_landlock():
    libc = ctypes.CDLL(None, use_errno=True)
    abi = libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None,
                       ctypes.c_size_t(0), ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    if abi >= 1:
        tcp = "TCP bind/connect rules" if abi >= 4 else "no TCP rules (ABI < 4)"
        return True, f"ABI {abi} (filesystem rules, {tcp})"
    err = ctypes.get_errno()
    why = {errno.ENOSYS: "kernel built without Landlock",
           errno.EOPNOTSUPP: "Landlock disabled at boot (add landlock to lsm=)"}
    return False, f"landlock_create_ruleset: {errno.errorcode.get(err, err)} ({why.get(err, os.strerror(err))})"


def _probe_seccomp():
    actions = _read(SECCOMP_ACTIONS).split()
    problems = []
    if "kill_process" not in actions:
        problems.append("no kill_process action")
    try:
        import seccomp  # noqa: F401 - Debian python3-seccomp
        binding = "python seccomp bindings ok"
    except Exception as e:  # noqa: BLE001
        binding = f"import seccomp failed ({e}); install Debian python3-seccomp"
        problems.append("no python bindings")
    return not problems, f"actions: {' '.join(actions)}; {binding}"


# --- the egress guard (guards/guard.py): several pieces, each probed ---------

# what the egress guard needs, in the order the check reports them
GUARD_CGROUP = "cgroup v2"
GUARD_REWRITE = "cgroup sock_addr connect4/6 with address rewrite"
GUARD_SOCK_OPS = "cgroup sock_ops (BPF_PROG_TYPE_SOCK_OPS on CGROUP_SOCK_OPS)"
GUARD_RECVMSG = "UDP recvmsg4/6 hooks (attach types 19/20)"
GUARD_GETPEER = "getpeername4/6 hooks (attach types 29/30)"
GUARD_LO4 = "127.0.0.1 bindable (TCP and UDP on one port)"
GUARD_MODULES = ("dnslib", "h11")     # guards/dns.py, guards/wire.py
GUARD_PIECES = (GUARD_CGROUP, GUARD_REWRITE, GUARD_SOCK_OPS, GUARD_RECVMSG, GUARD_GETPEER,
                GUARD_LO4) + tuple(f"python {m}" for m in GUARD_MODULES)
GUARD_NO_LO6 = ("::1 not bindable ({why}): the guard listens on 127.0.0.1 only, so IPv6 "
                "connects no CIDR rule allows are refused (EPERM) rather than proxied")

# One tiny function per hook the guard attaches (guards/egress.py connect4/6
# and GUARD_PROGRAMS), using the context writes and helpers the real ones do
_GUARD_TEXT = """
BPF_TABLE("lru_hash", u64, u32, aw_doc_seen, 16);
static __always_inline void seen(void *ctx) {
    u64 c = bpf_get_socket_cookie(ctx); u32 one = 1; aw_doc_seen.update(&c, &one);
}
int aw_doc_connect4(struct bpf_sock_addr *ctx) {
    seen(ctx);
    if (ctx->user_port == bpf_htons(1)) { ctx->user_ip4 = bpf_htonl(0x7f000001); ctx->user_port = bpf_htons(2); }
    return 1;
}
int aw_doc_connect6(struct bpf_sock_addr *ctx) {
    seen(ctx);
    if (ctx->user_port == bpf_htons(1)) { ctx->user_ip6[3] = bpf_htonl(1); ctx->user_port = bpf_htons(2); }
    return 1;
}
int aw_doc_sock_ops(struct bpf_sock_ops *skops) {
    if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) return 1;
    u64 c = bpf_get_socket_cookie(skops);
    u32 *v = aw_doc_seen.lookup(&c);
    return v ? 1 : 1;
}
static __always_inline int restore4(struct bpf_sock_addr *ctx) {
    seen(ctx);
    if (ctx->user_port == bpf_htons(2)) { ctx->user_ip4 = bpf_htonl(0x7f000002); ctx->user_port = bpf_htons(1); }
    return 1;
}
static __always_inline int restore6(struct bpf_sock_addr *ctx) {
    seen(ctx);
    if (ctx->user_port == bpf_htons(2)) { ctx->user_ip6[3] = bpf_htonl(2); ctx->user_port = bpf_htons(1); }
    return 1;
}
int aw_doc_recvmsg4(struct bpf_sock_addr *ctx) { return restore4(ctx); }
int aw_doc_recvmsg6(struct bpf_sock_addr *ctx) { return restore6(ctx); }
int aw_doc_getpeername4(struct bpf_sock_addr *ctx) { return restore4(ctx); }
int aw_doc_getpeername6(struct bpf_sock_addr *ctx) { return restore6(ctx); }
"""
# piece -> ((function, bcc program type, enum bpf_attach_type), ...)
_GUARD_HOOKS = (
    (GUARD_REWRITE, (("aw_doc_connect4", "CGROUP_SOCK_ADDR", 10),
                     ("aw_doc_connect6", "CGROUP_SOCK_ADDR", 11))),
    (GUARD_SOCK_OPS, (("aw_doc_sock_ops", "SOCK_OPS", 3),)),
    (GUARD_RECVMSG, (("aw_doc_recvmsg4", "CGROUP_SOCK_ADDR", 19),
                     ("aw_doc_recvmsg6", "CGROUP_SOCK_ADDR", 20))),
    (GUARD_GETPEER, (("aw_doc_getpeername4", "CGROUP_SOCK_ADDR", 29),
                     ("aw_doc_getpeername6", "CGROUP_SOCK_ADDR", 30))),
)


def egress_guard_result(missing, notes=()):
    """(ok, detail) of the egress-guard check (pure). missing: {piece: why}
    for each piece of GUARD_PIECES that is not there; notes: what works
    with a limit (no ::1). Pieces missing for the same reason share it."""
    if not missing:
        return True, "; ".join(["cgroup v2, sock_addr rewrite, sock_ops, recvmsg4/6 and "
                                "getpeername4/6 attach to a cgroup; 127.0.0.1 bindable; "
                                f"{', '.join(GUARD_MODULES)} import", *notes])
    by_why = {}
    for piece in sorted(missing, key=lambda p: GUARD_PIECES.index(p) if p in GUARD_PIECES else 99):
        by_why.setdefault(missing[piece], []).append(piece)
    parts = [f"{', '.join(pieces)}: {why}" for why, pieces in by_why.items()]
    return False, "; ".join([f"missing: {'; '.join(parts)}", *notes])


def _bind_loopback(host, family):
    """None when host binds TCP and UDP on one port (the guard's DNS
    responder needs both), else why not."""
    import socket
    last = None
    for _ in range(5):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as t:
                t.bind((host, 0))
                port = t.getsockname()[1]
                with socket.socket(family, socket.SOCK_DGRAM) as u:
                    u.bind((host, port))
            return None
        except OSError as e:
            last = e
            if e.errno != errno.EADDRINUSE:
                break
    return f"bind: {errno.errorcode.get(last.errno, last.errno) if last.errno else last}"


def _guard_hooks(mount, missing):
    """Load each guard hook and attach it to a cgroup v2 directory made
    for this and removed after; records in missing what fails."""
    def use(b, bcc):
        cg = tempfile.mkdtemp(prefix="agentwatch-doctor-", dir=mount)
        fd, attached = None, []
        try:
            fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
            for piece, hooks in _GUARD_HOOKS:
                for name, ptype, at in hooks:
                    try:
                        fn = b.load_func(name.encode(), getattr(bcc.BPF, ptype), attach_type=at)
                    except Exception as e:  # noqa: BLE001
                        err = ctypes.get_errno()
                        missing[piece] = f"load {name}: {e}" + (
                            f" [{errno.errorcode.get(err, err)}]" if err else "")
                        break
                    try:
                        bcc.BPF.attach_func(fn, fd, at, flags=2)   # BPF_F_ALLOW_MULTI, as Egress
                    except Exception as e:  # noqa: BLE001
                        missing[piece] = f"attach {name}: {e}"
                        break
                    attached.append((fn, at))
        finally:
            for fn, at in reversed(attached):
                try:
                    bcc.BPF.detach_func(fn, fd, at)
                except Exception:  # noqa: BLE001 - rmdir below detaches what is left
                    pass
            if fd is not None:
                os.close(fd)
            os.rmdir(cg)
    _bpf(_GUARD_TEXT, use)


def _probe_egress_guard():
    missing, notes = {}, []
    mount = _cgroup2_mount()
    if mount is None:
        missing[GUARD_CGROUP] = "no cgroup2 mount in /proc/mounts"
        for piece, _ in _GUARD_HOOKS:
            missing[piece] = "no cgroup v2 to attach to"
    else:
        try:
            _guard_hooks(mount, missing)
        except _Fail as e:
            for piece, _ in _GUARD_HOOKS:
                missing.setdefault(piece, str(e))
        except OSError as e:           # the temporary cgroup
            for piece, _ in _GUARD_HOOKS:
                missing.setdefault(piece, f"temporary cgroup in {mount}: {e.strerror or e}")
    import socket
    why = _bind_loopback("127.0.0.1", socket.AF_INET)
    if why:
        missing[GUARD_LO4] = why
    why6 = _bind_loopback("::1", socket.AF_INET6)
    notes.append(GUARD_NO_LO6.format(why=why6) if why6 else "::1 bindable too (IPv6 is proxied)")
    import importlib
    for mod in GUARD_MODULES:
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001
            missing[f"python {mod}"] = f"import {mod}: {type(e).__name__}: {e}"
    return egress_guard_result(missing, notes)


# name, probe, what its absence disables
PROBES = [
    ("root", _probe_root,
     "everything kernel-side: BPF sensors, cgroup BPF, BPF LSM"),
    ("btf", _probe_btf,
     "BTF-typed programs: fentry/fexit, BPF LSM"),
    ("tracefs", _probe_tracefs,
     "all sensors (tracepoints are found through tracefs)"),
    ("bcc", _probe_bcc,
     "all sensors (BPF programs are compiled and loaded by bcc)"),
    ("kernel-headers", _probe_kernel_headers,
     "all sensors (bcc cannot compile BPF C)"),
    ("bpf-syscall", _probe_bpf_syscall,
     "all BPF sensors and cgroup BPF enforcement"),
    ("raw-tracepoint", _probe_raw_tracepoint,
     "the raw sys_enter syscall sensor"),
    ("tracepoint", _probe_tracepoint,
     "tracepoint sensors: process, file and network events"),
    ("ringbuf", _probe_ringbuf,
     "ring-buffer event delivery used by the sensors"),
    ("cgroup-v2", _probe_cgroup_v2,
     "per-agent cgroups, in-kernel cgroup-id filtering, cgroup BPF enforcement"),
    ("cgroup-controllers", _probe_cgroup_controllers,
     "resource limits use v1/rlimit fallback"),
    ("cgroup-bpf", _probe_cgroup_bpf,
     "kernel-enforced network rules (connect/bind/sendmsg deny)"),
    ("bpf-lsm", _probe_bpf_lsm,
     "in-kernel deny by BPF LSM hooks (falls back to Landlock+seccomp+cgroup BPF)"),
    ("fentry", _probe_fentry,
     "fentry/fexit sensors (low-overhead kernel function hooks)"),
    ("kprobes", _probe_kprobes,
     "kprobe sensors and bpf_override_return"),
    ("landlock", _probe_landlock,
     "kernel-enforced filesystem/TCP allow lists"),
    ("seccomp", _probe_seccomp,
     "seccomp syscall filters for the agent"),
    ("egress-guard", _probe_egress_guard,
     "network.allow domain rules decided by name (the egress guard): a run whose enforced "
     "policy turns the guard on (any domain rule, or network.guard: true) does not start; "
     "with network.guard: false runs fall back to domain rules judged by the addresses "
     "they resolve to at start, and DNS judged by address like any traffic"),
]


def run_check(name: str, probe, disables: str) -> Check:
    """Run one probe; never raises."""
    start = time.monotonic()
    try:
        ok, detail = probe()
    except _Fail as e:
        ok, detail = False, str(e)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - a probe must never break doctor
        ok, detail = False, f"probe error: {type(e).__name__}: {e}"
    return Check(name, bool(ok), detail or "(no detail)", disables,
                 seconds=time.monotonic() - start)


def run_checks() -> list[Check]:
    return [run_check(name, probe, disables) for name, probe, disables in PROBES]


def enforcement_path(checks: list[Check]) -> str:
    ok = {c.name for c in checks if c.ok}
    if "bpf-lsm" in ok:
        return ENFORCE_BPF_LSM
    if {"landlock", "seccomp", "cgroup-bpf"} <= ok:
        return ENFORCE_FALLBACK
    return ENFORCE_NONE


def format_table(checks: list[Check]) -> str:
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for c in checks:
        line = f"{'ok' if c.ok else 'MISSING':<7}  {c.name:<{width}}  {c.detail}"
        if not c.ok:
            line += f"  -> disables: {c.disables}"
        lines.append(line)
    return "\n".join(lines)


def to_json(checks: list[Check]) -> list[dict]:
    return [{"name": c.name, "ok": c.ok, "detail": c.detail, "disables": c.disables}
            for c in checks]


def report(checks: list[Check]) -> dict:
    return {"enforcement_path": enforcement_path(checks), "checks": to_json(checks)}
