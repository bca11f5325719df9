"""A minimal /dev for an enforced run, as bubblewrap's --dev makes one.

The host's /dev holds raw disks (/dev/vda, /dev/nvme0n1), the kernel log
(/dev/kmsg), consoles and other ttys, /dev/kvm, /dev/fuse... A policy that
reads "/dev/**" (so that a shell finds /dev/null and /dev/tty) would hand
a root agent the raw disk, and with it every file Landlock was told to keep
from it. So the run's mount namespace gets a tmpfs on /dev holding only:

- the devices every program expects (BASE: null, zero, full, random,
  urandom, tty, ptmx), the host's own nodes bound in;
- /dev/pts (the host's devpts bound in: the agent's terminal is one of its
  ptys; Landlock grants the agent only its own), and mount points for the
  run's own /dev/shm and /dev/mqueue (sandbox/namespaces.py mounts them);
- the symlinks fd, stdin, stdout, stderr into /proc/self/fd;
- every device the policy names by exact path (e.g. "/dev/kvm",
  "/dev/net/tun"): a policy that needs one says so, and `policy explain`
  lists the run's /dev.

It is then made read-only. Each host node is opened (O_PATH) before the
tmpfs hides it and bound from /proc/self/fd/N after, so no device is
re-created by number.
"""
import ctypes
import os

from ..core.errors import KernelFeatureError
from ..policy.matchers import has_wildcards

BASE = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty", "/dev/ptmx")
LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
         "stderr": "/proc/self/fd/2"}
DIRS = ("pts", "shm", "mqueue")

_libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 8, 32, 4096, 16384


def plan(named):
    """The device paths of the run's /dev: BASE and every existing /dev path
    the policy names without wildcards (named: expanded read/write/exec)."""
    own = {p for p in named if p.startswith("/dev/") and not has_wildcards(p)
           and os.path.normpath(p) == p and _is_device(p)}
    return sorted(set(BASE) | own)


def _is_device(path):
    import stat
    try:
        return stat.S_ISCHR(os.lstat(path).st_mode) or stat.S_ISBLK(os.lstat(path).st_mode)
    except OSError:
        return False


def _mount(src, target, fstype, flags, data=None):
    if _libc.mount(src and src.encode(), target.encode(), fstype and fstype.encode(),
                   ctypes.c_ulong(flags), data and data.encode()) != 0:
        e = ctypes.get_errno()
        raise KernelFeatureError(f"the run's /dev: mount {target}: {os.strerror(e)}")


def mount_minimal(devices, host_ipc=False):
    """Child side, in the run's mount namespace (after its procfs): replace
    /dev by a read-only tmpfs holding devices (from plan()) and DIRS, LINKS.
    host_ipc: the run shares the host's IPC namespace, so the host's
    /dev/shm and /dev/mqueue are bound in too (else the run mounts its own)."""
    held = {}
    shared = ["/dev/pts"] + (["/dev/shm", "/dev/mqueue"] if host_ipc else [])
    for path in list(devices) + shared:
        try:
            held[path] = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue                 # not on this host (a minimal VM has no /dev/pts)
    try:
        _mount("agentwatch-dev", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
        for d in DIRS:
            os.mkdir(f"/dev/{d}", 0o755)
        for name, target in LINKS.items():
            os.symlink(target, f"/dev/{name}")
        for path, fd in held.items():
            if path not in shared:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | (MS_REC if path in shared else 0))
        _mount(None, "/dev", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    finally:
        for fd in held.values():
            os.close(fd)
