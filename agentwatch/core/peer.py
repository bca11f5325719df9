"""Who is on the other end of a socket, as the kernel says: socket peer ->
process or cgroup -> run.

This is how the harness's servers (egress guard, LLM gateway, broker) learn
which run a client belongs to. Nothing here reads what the client says about
itself:

- a unix-domain peer is named by the kernel's SO_PEERCRED (pid, uid, gid as
  of connect). Its cgroup is read from /proc while a pidfd (SO_PEERPIDFD on
  Linux 6.5+, else pidfd_open of that pid) shows the same process still
  lives, so a recycled pid cannot be taken for it;
- a TCP peer on this host, and the sender of a UDP datagram
  (of_datagram), is looked up with the kernel's inet_diag (the socket's
  4-tuple), which reports the peer socket's owner uid and the
  cgroup the socket was created in (INET_DIAG_CGROUP_ID, Linux 5.7+). No
  pid is needed; a socket passed to another process keeps its creator's
  cgroup, as the kernel's cgroup BPF hooks see it too.

A peer whose run cannot be named gets run_id None: callers refuse it or
treat it as "not an agent", never guess.
A run with a network namespace of its own reaches a host loopback port
through agentwatch's relay (sandbox/netns.py): the TCP peer is then the
relay's socket, in agentwatch's cgroup. The relay files each of its
sockets here (relayed()) under the local end the kernel gave it, for the
run it carries; such a peer, found by inet_diag in this process's own
cgroup, is that run's. Any other peer in agentwatch's cgroup gets run_id
None (the relay socket's uid is the agent's).
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


_RELAYED = {}           # (addr, port) of a relay socket of this process -> the run it carries


def relayed(local, run_id):
    """The relay (sandbox/netns.py) connected a socket whose local end is
    local for run_id; run_id None: that socket is closed."""
    key = (_addr(local[0]), local[1])
    if run_id is None:
        _RELAYED.pop(key, None)
    else:
        _RELAYED[key] = run_id


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
    p = _peer_of(found)
    relay = _RELAYED.get((_addr(remote[0]), remote[1]))
    if p.run_id is None and relay and p.cgroup is None and p.uid is not None \
            and _in_own_cgroup(found[1]):
        return Peer(uid=p.uid, cgroup=None, run_id=relay)
    return p


def _in_own_cgroup(cgroup_id):
    """cgroup_id is this process's own cgroup: the socket is one of the
    relay's, not a host process's on a reused port."""
    mine = procfs.cgroup(os.getpid())
    if not cgroup_id or mine is None:
        return False
    try:
        return os.stat(os.path.join(procfs.cgroup2_mount(), mine.lstrip("/"))).st_ino == cgroup_id
    except OSError:
        return False


def of_datagram(family, local, remote):
    """The Peer of a datagram from remote to our UDP socket at local: the
    socket the kernel delivers our answer to (inet_diag's lookup of the
    socket bound at remote), so a process cannot claim another's port."""
    found = _inet_diag(family, src=local, dst=remote, protocol=socket.IPPROTO_UDP)
    return _peer_of(found)


def _peer_of(found):
    if found is None:
        return Peer(uid=None)
    uid, cgroup_id = found
    cg = cgroup_path(cgroup_id) if cgroup_id else None
    return Peer(uid=uid, cgroup=cg, run_id=procfs.run_of_cgroup(cg))


INET_DIAG_NOCOOKIE = 0xFFFF_FFFF_FFFF_FFFF
NETLINK_SOCK_DIAG = 4


def _inet_diag(family, src, dst, protocol=socket.IPPROTO_TCP):
    """(uid, cgroup id) of one socket, looked up by the kernel from its
    4-tuple (not a dump: one hash lookup, however many sockets there are).
    TCP: the socket bound to src and connected to dst. UDP (the kernel
    swaps the two "for historical reasons"): the socket at dst that would
    receive a datagram from src. None when there is none."""
    # pyroute2's messages over a plain netlink socket: its DiagSocket runs an
    # asyncio loop of its own, which cannot be used from inside one (the
    # guard's); the lookup is one request and one answer, microseconds
    from pyroute2.netlink import NLM_F_REQUEST
    from pyroute2.netlink.diag import SOCK_DIAG_BY_FAMILY, inet_diag_msg, inet_diag_req
    req = inet_diag_req()
    req["header"]["type"], req["header"]["flags"] = SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST
    req["sdiag_family"], req["sdiag_protocol"] = family, protocol
    req["idiag_states"] = 0xFFFF_FFFF
    req["idiag_src"], req["idiag_sport"] = _words(family, src[0]), src[1]
    req["idiag_dst"], req["idiag_dport"] = _words(family, dst[0]), dst[1]
    req["idiag_cookie"] = INET_DIAG_NOCOOKIE
    req.encode()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1)
        nl.sendto(req.data, (0, 0))
        data = nl.recv(65536)
    msg = inet_diag_msg(data)
    msg.decode()
    if msg["header"]["type"] != SOCK_DIAG_BY_FAMILY:     # NLMSG_ERROR: ENOENT, no such socket
        return None
    return msg["idiag_uid"], msg.get_attr("INET_DIAG_CGROUP_ID")


def _words(family, addr):
    """An address as inet_diag's four big-endian 32-bit words."""
    packed = socket.inet_pton(family, _addr(addr) if family == socket.AF_INET else str(addr))
    return struct.unpack(">4I", packed.ljust(16, b"\0"))


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
