"""Masking in a private mount namespace (child side, before Landlock).

Landlock only allows: it cannot carve a denied ~/.ssh out of a readable
$HOME. So, as bubblewrap does, the child gets its own mount namespace in
which each concrete denied path is covered: directories by an empty
read-only tmpfs, files by a read-only bind of /dev/null. The run's own
policy and prompt files are re-mounted read-only onto themselves. Mounting
is then denied by seccomp, so the agent cannot undo it.

Two more kinds of entry, applied first:
- "noexec": a writable directory bound onto itself with MS_NOEXEC, so no
  file written there can be mapped executable (the dynamic loader, dlopen),
  which Landlock's EXECUTE right (execve only) does not cover;
- "pin": a directory bound onto itself, so it is a mount point and cannot
  be renamed or removed (EBUSY): a mask beneath it cannot be moved aside.
"""
import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
_ORDER = {"noexec": 0, "pin": 1, "dir": 2, "file": 2, "ro": 3}


def _check(ret, step, path=None):
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{step}: {os.strerror(e)}", path)


def _mount(src, target, fstype, flags, data=None):
    return _libc.mount(src and src.encode(), target.encode(), fstype and fstype.encode(),
                       ctypes.c_ulong(flags), data and data.encode())


def plan_masks(deny_paths, readonly_files, noexec_dirs=(), pin_dirs=()):
    """[(path, 'noexec'|'pin'|'dir'|'file'|'ro')] for the paths that exist
    now, in the order they must be mounted (a noexec bind of a workspace
    would otherwise cover the masks inside it)."""
    out = []
    for p in noexec_dirs:
        if os.path.isdir(p):
            out.append((os.path.realpath(p), "noexec"))
    for p in pin_dirs:
        if os.path.isdir(p) and not os.path.islink(p):
            out.append((os.path.realpath(p), "pin"))
    for p in deny_paths:
        if os.path.isdir(p) and not os.path.islink(p):
            out.append((p, "dir"))
        elif os.path.exists(p):
            out.append((os.path.realpath(p), "file"))
    for p in readonly_files:
        if os.path.isfile(p):
            out.append((os.path.realpath(p), "ro"))
    return sorted(out, key=lambda m: _ORDER[m[1]])


def apply(masks, new_ns=True):
    """Child side: new mount namespace (unless the run's namespaces step
    made one already: sandbox/namespaces.enter), then cover each path."""
    if not masks:
        return
    if new_ns:
        _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _check(_mount(None, "/", None, MS_REC | MS_PRIVATE), "make / private")
    for path, how in masks:
        if how == "noexec":
            _check(_mount(path, path, None, MS_BIND | MS_REC), "bind", path)
            keep = os.statvfs(path).f_flag & MS_RDONLY      # never turn a read-only mount writable
            _check(_mount(None, path, None, MS_REMOUNT | MS_BIND | MS_NOEXEC | MS_NOSUID | MS_NODEV | keep),
                   "remount noexec", path)
        elif how == "pin":
            _check(_mount(path, path, None, MS_BIND | MS_REC), "pin (bind onto itself)", path)
        elif how == "dir":
            _check(_mount("agentwatch-mask", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                          "size=0,mode=000"), "mask directory", path)
        else:
            src = "/dev/null" if how == "file" else path
            _check(_mount(src, path, None, MS_BIND), "bind", path)
            _check(_mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV),
                   "remount read-only", path)
    # the working directory still points into the mounts it was in before:
    # look it up again so it is seen through the new ones (noexec included)
    try:
        os.chdir(os.getcwd())
    except OSError:
        pass
