"""Who the agent runs as, and with which capabilities (issue #4).

Parent side (before anything is created): ``resolve`` turns the policy's
``process.run_as`` into numeric ids on this host, or refuses with a message
naming the step; ``inherited`` describes what the agent gets without it.

Child side (between fork and exec, each a named launcher step, in this
order; see run/enforcement.py, Enforcement.child_steps):
  mounts (need CAP_SYS_ADMIN) -> Landlock (as root: it opens every rule path)
  -> ``set_no_new_privs`` -> ``drop_bounding_set`` (needs CAP_SETPCAP, so
  before the switch) -> ``switch`` (setgroups, setresgid, setresuid: needs
  CAP_SETGID/CAP_SETUID, and must run before seccomp refuses the set*id
  family) -> parent-death signal again (a credential change clears it) ->
  ``clear_capabilities`` -> workspace check -> seccomp -> ``verify`` -> exec.

agentwatch itself stays root; only the child changes.
"""
import ctypes
import errno
import os
from dataclasses import dataclass, field

from ..core.errors import LaunchError

_libc = ctypes.CDLL(None, use_errno=True)
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def prctl(option, arg):
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@dataclass
class Credentials:
    """What the agent runs with. uid/gid/groups numeric; user: the name
    (None for an id without a passwd entry); source: where they come from."""
    uid: int
    gid: int
    groups: list = field(default_factory=list)
    user: str = None
    source: str = "agentwatch"        # "process.run_as" | "agentwatch" (inherited)

    def describe(self):
        who = f"{self.user} (uid {self.uid})" if self.user else f"uid {self.uid}"
        groups = ", ".join(map(str, self.groups)) or "none"
        return f"{who}, gid {self.gid}, supplementary groups: {groups}"


def _lookup_group(value, what):
    import grp
    if isinstance(value, int):
        return value
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise LaunchError(f"agent did not start: resolve process.run_as failed: {what}: "
                          f"no group {value!r} on this host") from None


def resolve(run_as, where=""):
    """policy.model.RunAs -> Credentials on this host; LaunchError naming
    the step when the user or a group does not exist here. A numeric uid
    needs no passwd entry, but then needs an explicit group."""
    import pwd
    where = f" ({where})" if where else ""
    user = run_as.user
    try:
        pw = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    except KeyError:
        if not isinstance(user, int):
            raise LaunchError(f"agent did not start: resolve process.run_as failed: no user "
                              f"{user!r} on this host{where}") from None
        pw = None
    uid = user if isinstance(user, int) else pw.pw_uid
    if run_as.group is not None:
        gid = _lookup_group(run_as.group, "process.run_as.group")
    elif pw is not None:
        gid = pw.pw_gid
    else:
        raise LaunchError(f"agent did not start: resolve process.run_as failed: uid {uid} has no "
                          f"passwd entry on this host, so no primary group: give "
                          f"process.run_as.group{where}")
    groups = [_lookup_group(g, "process.run_as.groups") for g in run_as.groups or ()]
    return Credentials(uid=uid, gid=gid, groups=sorted(set(groups)),
                       user=pw.pw_name if pw else None, source="process.run_as")


def inherited():
    """What a child of agentwatch runs as when the policy says nothing."""
    import pwd
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = None
    return Credentials(uid=uid, gid=os.getgid(), groups=sorted(os.getgroups()), user=name)


def read_status(pid="self"):
    """Uid, Gid, Groups, the capability sets and NoNewPrivs of a process,
    from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups"):
                out[key] = [int(x) for x in value.split()]
            elif key in CAP_SETS:
                out[key] = int(value.strip(), 16)
            elif key == "NoNewPrivs":
                out[key] = int(value.strip())
    return out


def capability_record(status):
    """The capability sets of read_status, as /proc shows them (hex)."""
    names = {"CapInh": "inheritable", "CapPrm": "permitted", "CapEff": "effective",
             "CapBnd": "bounding", "CapAmb": "ambient"}
    return {names[k]: f"{status.get(k, 0):016x}" for k in CAP_SETS}


def no_capabilities():
    return capability_record({})


# ----------------------------------------------------------------- child side

class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def cap_last_cap():
    """The highest capability number this kernel knows (read by the parent:
    the sandboxed child may not be able to)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 63


def set_no_new_privs():
    """No exec may grant privileges again (setuid-root and file-capability
    binaries such as su or ping run without them)."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def drop_bounding_set(last):
    """Empty the bounding set (as root, execve would otherwise grant it all
    again) and the ambient set. Needs CAP_SETPCAP: before any uid switch."""
    for cap in range(last + 1):
        if _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) != 0:
            e = ctypes.get_errno()
            if e != errno.EINVAL:          # a capability this kernel does not know
                raise OSError(e, f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(e)}")
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def clear_capabilities():
    """Empty the ambient, inheritable, permitted and effective sets."""
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    hdr, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    if _libc.capset(ctypes.byref(hdr), data) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"capset: {os.strerror(e)}")


def drop_capabilities(last):
    """Every set, bounding and ambient included: a sandboxed agent running as
    root must not keep CAP_NET_RAW (packet sockets no cgroup hook sees),
    CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH (open_by_handle_at) and the rest."""
    drop_bounding_set(last)
    clear_capabilities()


def switch(creds):
    """Supplementary groups, then gid, then uid (real, effective, saved;
    the fs ids follow). From root to another uid the kernel also empties the
    permitted and effective sets."""
    os.setgroups(creds.groups)
    os.setresgid(creds.gid, creds.gid, creds.gid)
    os.setresuid(creds.uid, creds.uid, creds.uid)


def verify(creds=None):
    """Child side, the last step before exec: read /proc/self/status and
    refuse to exec unless every capability set is empty, no_new_privs is set
    and (with creds) every uid, gid and the groups are the expected ones."""
    st = read_status()
    wrong = [f"{k} {st.get(k, 0):016x}" for k in CAP_SETS if st.get(k, 0)]
    if st.get("NoNewPrivs") != 1:
        wrong.append("NoNewPrivs 0")
    if creds is not None:
        if set(st.get("Uid", ())) != {creds.uid}:
            wrong.append(f"Uid {st.get('Uid')} (expected {creds.uid})")
        if set(st.get("Gid", ())) != {creds.gid}:
            wrong.append(f"Gid {st.get('Gid')} (expected {creds.gid})")
        if sorted(st.get("Groups", ())) != sorted(creds.groups):
            wrong.append(f"Groups {st.get('Groups')} (expected {creds.groups})")
    if wrong:
        raise OSError(errno.EPERM, "still " + ", ".join(wrong))


def check_usable(path, mode, what, creds):
    """Child side, after the switch: path must allow mode (os.R_OK...) to
    the agent's user, by the kernel's own permission check."""
    if not os.access(path, mode):
        need = "".join(c for c, bit in (("r", os.R_OK), ("w", os.W_OK), ("x", os.X_OK)) if mode & bit)
        raise OSError(errno.EACCES, f"{what} {path} is not usable by {creds.describe()} "
                                    f"(needs {need}); chown it or pick a workspace the user owns")
