"""Which layer of a run's sandbox refused a call, from its errno and the
run's EnforcementPlan (what the kernel was given), so that every refusal is
reported with its layer and rule, and a refusal that is not the sandbox's
(a file mode, a host read-only filesystem) is told apart from one that is.

Pure: reads the plan and the event, never the kernel.

Layers: "landlock", "seccomp", "cgroup-bpf", "bpf-lsm", "pids" (the cgroup
pids controller), "memory", "mount" (the run's mount namespace: masks,
pins, read-only binds, noexec), and "dac" (the file's owner and mode, or a
capability the agent lacks: the kernel's own checks, not the sandbox's).
"""
import os
import stat

from ..sandbox import landlock as L

# the kernel (Landlock, seccomp, a read-only mask) said no; EXDEV is Landlock's
# answer to a link or rename it refuses (and a mount boundary's), EBUSY a
# mask or pinned directory that cannot be renamed or removed
DENIED = ("EACCES", "EPERM", "EROFS", "EXDEV", "EBUSY")

# access (as the judge names it) -> the Landlock rights it needs (any one for
# a directory-or-file ambiguity is resolved by the stricter: all of them)
_RIGHTS = {
    "read": L.FS_READ_FILE, "write": L.FS_WRITE_FILE, "create": L.FS_MAKE_REG,
    "truncate": L.FS_TRUNCATE, "delete": L.FS_REMOVE_FILE, "mkdir": L.FS_MAKE_DIR,
    "rename": L.FS_REFER, "link": L.FS_REFER | L.FS_MAKE_REG, "exec": L.FS_EXECUTE,
}
_MKNOD = {stat.S_IFCHR: L.FS_MAKE_CHAR, stat.S_IFBLK: L.FS_MAKE_BLOCK, stat.S_IFIFO: L.FS_MAKE_FIFO,
          stat.S_IFSOCK: L.FS_MAKE_SOCK, stat.S_IFREG: L.FS_MAKE_REG, 0: L.FS_MAKE_REG}


def _under(path, top):
    return path == top or path.startswith(top.rstrip("/") + "/")


def rights_for(access, op=None, mode=None):
    """The Landlock rights an access set needs (mknod: by the node's type)."""
    if op == "mknod":
        return _MKNOD.get((mode or 0) & 0o170000, L.FS_MAKE_REG)
    need = 0
    for a in access:
        need |= _RIGHTS.get(a, 0)
    if op == "rmdir":
        need = (need & ~L.FS_REMOVE_FILE) | L.FS_REMOVE_DIR
    return need


def rule_for(access, op=None):
    """The policy rule whose list would have to grant the access."""
    if op != "mknod" and set(access) <= {"read"}:
        return "filesystem.read"
    if "exec" in access:
        return "filesystem.exec"
    return "filesystem.write"


class Refusals:
    """The parts of a run's plan that explain a refusal."""

    def __init__(self, plan=None):
        ll = getattr(plan, "landlock", None)
        self.landlock = ll if ll is not None and ll.abi >= 1 else None
        self.masks = list(getattr(plan, "masks", None) or ())
        limits = getattr(plan, "limits", None) or {}
        self.pids = bool(limits.get("pids"))
        self.memory = bool(limits.get("memory"))
        self.seccomp = getattr(plan, "seccomp", None) is not None
        self.egress = getattr(plan, "egress", None) is not None
        self.lsm = getattr(plan, "lsm", None) is not None

    # -- files ---------------------------------------------------------------------
    def mask_of(self, path, kinds=("noexec", "pin", "dir", "file", "ro")):
        """(mounted path, kind) of the innermost mask, pin, noexec or
        read-only bind of `kinds` that path is under, or None."""
        best = None
        for mpath, kind in self.masks:
            if kind in kinds and path and _under(path, mpath) \
                    and (best is None or len(mpath) > len(best[0])):
                best = (mpath, kind)
        return best

    def landlock_grants(self, path, need):
        """True when the run's Landlock rules grant `need` on path (or Landlock
        does not handle those rights here), False when they refuse it."""
        if self.landlock is None:
            return True
        need &= self.landlock.handled_fs
        if not need:
            return True
        have = 0
        for rpath, access in self.landlock.paths:
            if _under(path, rpath):
                have |= access
        return need & have == need

    def file_layer(self, error, path, access, op=None, mode=None, lsm_enforced=False):
        """The layer that answered `error` to a file operation on path."""
        if error in ("EROFS", "EBUSY"):     # a read-only mask or bind, a mount point
            return "mount" if self.mask_of(path, ("pin", "dir", "file", "ro")) else "dac"
        mask = self.mask_of(path)
        if mask and mask[1] in ("dir", "file", "ro"):
            return "mount"         # the mask's own mode or read-only bind
        if error == "EPERM":
            return "bpf-lsm" if lsm_enforced or self.lsm else "dac"
        if error in ("EACCES", "EXDEV"):
            if mask and mask[1] == "noexec" and "exec" in access:
                return "mount"
            parent = os.path.dirname(path) if op in ("mkdir", "mknod", "symlink", "link") or \
                "create" in access else path
            need = rights_for(access, op, mode)
            if not self.landlock_grants(path, need) or not self.landlock_grants(parent, need):
                return "landlock"
        return "dac"

    def mask_rule(self, path, exec_=False):
        """(rule, why) for a refusal by the mount namespace (exec_: of an exec,
        which only a noexec mount refuses)."""
        mask = self.mask_of(path) if exec_ else self.mask_of(path, ("pin", "dir", "file", "ro"))
        kind = mask[1] if mask else None
        if kind == "pin":
            return ("filesystem.deny", f"{mask[0]} is pinned (a mount point) so that the masked "
                                       "filesystem.deny path beneath it cannot be moved aside")
        if kind == "noexec":
            return ("filesystem.exec", f"{mask[0]} is writable, so mounted noexec (W^X)")
        if kind == "ro":
            return ("identity.policy_write", f"{mask[0]} is the run's own file, bound read-only")
        return ("filesystem.deny", f"{mask[0] if mask else path} is masked (filesystem.deny)")

    # -- network -------------------------------------------------------------------
    def net_layer(self, error, family, addr, egress_enforced=False, lsm_enforced=False):
        """Landlock answers EACCES to a TCP port it does not grant (ABI 4) and
        EPERM to an abstract unix socket outside the run's domain (ABI 6); the
        cgroup BPF programs answer EPERM to addresses (their own report
        comes from their ring, Judge.kernel_denial) and unix sockets (6.7+)."""
        ll = self.landlock
        if error == "EACCES" and ll is not None and ll.handled_net:
            return "landlock"
        if error == "EPERM" and family == "unix" and (addr or "").startswith("@") \
                and ll is not None and ll.scoped & 1:      # SCOPE_ABSTRACT_UNIX_SOCKET
            return "landlock"
        if error == "EPERM" and (egress_enforced or lsm_enforced):
            return "bpf-lsm" if lsm_enforced and family == "unix" else "cgroup-bpf"
        return "dac"
