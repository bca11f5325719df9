"""Paths as the judge sees them: symlinks resolved (with a cache of the
paths that resolve to themselves), /proc/self as the agent's own process,
the program an explicitly run ELF interpreter loads, and file digests.
"""
import hashlib
import os
import re
import time

# the ELF interpreter: run by hand, it maps the program named in its argv
# with PROT_EXEC, which Landlock's EXECUTE right (execve only) never sees
LOADER = re.compile(r"^ld(-linux)?([-.].*)?\.so(\.\d+)*$")
_LOADER_OPTS_WITH_ARG = frozenset(("--library-path", "--preload", "--audit", "--argv0",
                                   "--inhibit-rpath", "--glibc-hwcaps-prepend",
                                   "--glibc-hwcaps-mask"))


def file_sha256(path, limit=256 << 20):
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
                limit -= len(chunk)
                if limit < 0:
                    return None
        return h.hexdigest()
    except OSError:
        return None


def _realpath(path, follow=True):
    """The path with symlinks resolved now (what the kernel followed, unless
    the link changed since): a symlink in the workspace to a secret is judged
    as the secret. follow=False resolves the directories only, for calls
    that act on a link itself (symlink, unlink, rename, link, mkdir)."""
    try:
        if follow:
            return os.path.realpath(path)
        head, tail = os.path.split(path)
        return os.path.join(os.path.realpath(head), tail) if tail else os.path.realpath(path)
    except (OSError, ValueError):
        return path


# _realpath costs an lstat per path component (~4 us for /dev/null), on every
# file event. Paths that resolve to themselves (no symlink on the way: most
# of them) are remembered: such a path only resolves elsewhere once a symlink
# appears on it (symlink, rename, link) or a mount changes the tree. Those
# operations by any run's agent clear the cache as they are judged (in
# timestamp order, so before the events that follow them); changes made
# outside the runs are seen within REAL_CACHE_S. /proc is never cached: its
# magic links change with a process's fds and cwd, not with the tree.
REAL_CACHE_S = 0.5
REAL_CACHE_MAX = 1 << 16
RELINKING_OPS = frozenset(("symlink", "rename", "link"))
_canonical = set()          # (path, follow) that resolved to path itself
_canonical_until = 0.0      # time.monotonic() when _canonical is emptied


def real(path, follow=True):
    """_realpath(), from the cache of canonical paths when it holds the path."""
    global _canonical_until
    key = (path, follow)
    now = time.monotonic()
    if now >= _canonical_until or len(_canonical) >= REAL_CACHE_MAX:
        _canonical.clear()
        _canonical_until = now + REAL_CACHE_S
    elif key in _canonical:
        return path
    resolved = _realpath(path, follow)
    if resolved == path and not path.startswith("/proc/"):
        _canonical.add(key)
    return resolved


def forget_resolved():
    """Empty the canonical-path cache (a symlink, rename, link or mount)."""
    _canonical.clear()


def own_proc(path, pid):
    """/proc/self and /proc/thread-self name the agent's process, not ours."""
    if path and path.startswith("/proc/"):
        for alias in ("/proc/self", "/proc/thread-self"):
            if path == alias or path.startswith(alias + "/"):
                return f"/proc/{pid}" + path[len(alias):]
    return path


def loaded_program(argv):
    """The program an explicitly run ELF interpreter loads, or None."""
    args = list(argv[1:])
    while args:
        a = args.pop(0)
        if a == "--":
            return args[0] if args else None
        if a in _LOADER_OPTS_WITH_ARG:
            if args:
                args.pop(0)
            continue
        if a.startswith("--"):
            continue
        return a
    return None
