"""Who is on the other end of a socket, as the kernel says: socket peer ->
process or cgroup -> run.

This is how the harness's servers (egress guard, LLM gateway, broker) learn
which run a client belongs to. Nothing here reads what the client says about
itself:

- a unix-domain peer is named by the kernel's SO_PEERCRED (pid, uid, gid as
  of connect). Its cgroup is read from /proc while a pidfd (SO_PEERPIDFD on
  Linux 6.5+, else pidfd_open of that pid) shows the same process still
  lives, so a recycled pid cannot be taken for it;
- a TCP peer on this host is looked up with the kernel's inet_diag (the
  socket's 4-tuple), which reports the peer socket's owner uid and the
  cgroup the socket was created in (INET_DIAG_CGROUP_ID, Linux 5.7+). No
  pid is needed; a socket passed to another process keeps its creator's
  cgroup, as the kernel's cgroup BPF hooks see it too.

A peer whose run cannot be named gets run_id None: callers refuse it or
treat it as "not an agent", never guess.
A run with a network namespace of its own reaches a host loopback port
through agentwatch's relay (sandbox/netns.py): the TCP peer is then the
relay's socket, in agentwatch's cgroup, and gets run_id None (its uid is
the agent's).
"""

import os
import select
import socket
import struct
from dataclasses import dataclass

from . import procfs

SO_PEERPIDFD = 77          # include/uapi/asm-generic/socket.h, Linux 6.5+
_UCRED = struct.Struct("iII")


@dataclass(frozen=True)
class Peer:
    """The kernel's account of a socket peer."""
    uid: int | None
    pid: int | None = None        # unix peers only; in agentwatch's PID namespace
    cgroup: str | None = None     # cgroup v2 path, "/agentwatch/<run_id>/..."
    run_id: str | None = None

    @property
    def is_agent(self):
        return self.run_id is not None


def of_socket(sock):
    """The Peer of a connected unix or TCP socket."""
    if sock.family == socket.AF_UNIX:
        return _unix_peer(sock)
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        return _tcp_peer(sock)
    raise ValueError(f"cannot name the peer of a socket of family {sock.family!r}")


# -- unix ------------------------------------------------------------------------
def _pidfd(sock, pid):
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        pass
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None


def _alive(pidfd):
    """A pidfd turns readable when its process exits."""
    poller = select.poll()         # not select(): servers hold descriptors beyond 1024
    poller.register(pidfd, select.POLLIN)
    return not poller.poll(0)


def _unix_peer(sock):
    pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                   _UCRED.size))
    if pid <= 0:        # a peer outside our PID namespace, or none
        return Peer(uid=uid)
    pidfd = _pidfd(sock, pid)
    if pidfd is None:
        return Peer(uid=uid, pid=pid)
    try:
        cg = procfs.cgroup(pid)
        if not _alive(pidfd):   # pid may name another process by now
            return Peer(uid=uid, pid=pid)
    finally:
        os.close(pidfd)
    return Peer(uid=uid, pid=pid, cgroup=cg, run_id=procfs.run_of_cgroup(cg))


# -- tcp -------------------------------------------------------------------------
def _tcp_peer(sock):
    local, remote = sock.getsockname(), sock.getpeername()
    found = _inet_diag(sock.family, src=remote, dst=local)
    if found is None:
        return Peer(uid=None)
    uid, cgroup_id = found
    cg = cgroup_path(cgroup_id) if cgroup_id else None
    return Peer(uid=uid, cgroup=cg, run_id=procfs.run_of_cgroup(cg))


def _inet_diag(family, src, dst):
    """(uid, cgroup id) of the TCP socket bound to src and connected to dst."""
    from pyroute2 import DiagSocket    # netlink sock_diag; imported only when used
    with DiagSocket() as ds:
        ds.bind()
        for rec in ds.get_sock_stats(family=family, states=0xfff):
            if (rec["idiag_sport"], rec["idiag_dport"]) != (src[1], dst[1]):
                continue
            if (_addr(rec["idiag_src"]), _addr(rec["idiag_dst"])) != (_addr(src[0]), _addr(dst[0])):
                continue
            return rec["idiag_uid"], rec.get_attr("INET_DIAG_CGROUP_ID")
    return None


def _addr(a):
    a = str(a)
    return a[7:] if a.startswith("::ffff:") else a


def cgroup_path(cgroup_id, root=None):
    """The cgroup v2 path ("/agentwatch/...") whose id (directory inode) is
    cgroup_id, searched under the runs' root; None if it is not a run's."""
    mount = root or procfs.cgroup2_mount()
    top = os.path.join(mount, procfs.RUN_CGROUP_ROOT)
    for d, subdirs, _files in os.walk(top):
        try:
            if os.stat(d).st_ino == cgroup_id:
                return "/" + os.path.relpath(d, mount)
        except OSError:
            subdirs[:] = []
    return None
