"""Probe the running kernel for the features agentwatch uses.

Every check tries the feature for real (load a BPF program, call a syscall,
read a kernel file) instead of trusting kernel config, and never raises: a
failure becomes ``Check(ok=False)`` with the reason in ``detail``.

Imports without root and without bcc; bcc is loaded (by
agentwatch.sensors.import_bcc, the one place that imports it) only inside
the BPF probes, which report "needs root" when run unprivileged.

One module (~520 lines) on purpose: a flat list of independent probes, one
function each, read top to bottom as the report prints them.
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
