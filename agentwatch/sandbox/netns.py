"""A network namespace of its own for an enforced run that allows no remote
egress, and the relay that keeps its loopback ports working (issue #14).

In the run's namespace there is only `lo`, brought up: /proc/net/* and
/proc/<pid>/net/* list the run's own sockets, not the host's, abstract unix
sockets are the run's own, and no address outside the host exists. The
policy's network.loopback ports are relayed to the host's loopback by
agentwatch (`RunNetwork`):

- a short-lived set-up thread unshares CLONE_NEWNET (only that thread moves),
  brings lo up (SIOCSIFFLAGS), opens the namespace (an O_CLOEXEC
  fd, for the child's setns) and creates one listening socket per port,
  0.0.0.0:PORT and [::]:PORT (IPV6_V6ONLY): in a namespace with only lo they
  catch every loopback address. A socket stays in the namespace it was made
  in, so the thread then simply exits; nothing of agentwatch ever runs in
  the run's namespace after that.
- one relay thread per run (it was never in the namespace) accepts there and
  connects, in the host's namespace, to the very address and port the agent
  connected to (getsockname() of the accepted socket: 127.0.0.1, 127.0.0.53,
  ::1), then copies bytes both ways with one selector: bounded buffers per
  direction (a full one stops reading that side), half-closes passed on,
  at most MAX_CONNECTIONS at once per run (more are reset and counted), a
  connect that does not complete within CONNECT_TIMEOUT_S is reset. A
  host port nobody listens on resets the agent's connection (ECONNRESET at
  its first read) where the host's namespace would have refused the connect.
  The host-side socket is created with the agent's uid as its owner
  (setfsuid, this thread only), so the host's /proc/net/tcp and `ss -e` show
  who it is for; its cgroup is agentwatch's.
- close() (run end) stops the thread and closes every socket and the fd; the
  namespace goes when the run's last process does.

What the agent's own connect() meets is unchanged: the run's cgroup BPF
programs and Landlock judge the connect inside the namespace, before it
reaches the relay (a port not allowed is refused and reported there, and
nothing listens on it anyway). UDP is not relayed: a datagram to a loopback
port reaches only the run's own sockets (docs/policy.md says so).
"""
import ctypes
import errno
import fcntl
import os
import selectors
import socket
import struct
import threading
import time

from ..core import peer
from ..core.errors import KernelFeatureError

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
MAX_CONNECTIONS = 64          # relayed connections of one run at once
BUFFER = 64 * 1024            # bytes held per direction of a connection
CONNECT_TIMEOUT_S = 5.0
BACKLOG = 16
_ACCEPTS_PER_WAKE = 16
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = "16sH22x"            # struct ifreq: ifr_name, ifr_flags (the 24-byte union)


def _link_up(name):
    """Bring the interface up (this thread's network namespace): two ioctls
    on a datagram socket. Not pyroute2's rtnetlink: importing it (asyncio
    and all) took 0.2 s here and ~10 s of a run's set-up under QEMU TCG (tests/vm)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        ifr = struct.pack(_IFREQ, name.encode(), 0)
        try:
            flags = struct.unpack(_IFREQ, fcntl.ioctl(s, _SIOCGIFFLAGS, ifr))[1]
        except OSError as e:
            if e.errno == errno.ENODEV:
                raise OSError(errno.ENODEV, f"the new namespace has no {name}") from None
            raise
        if not flags & _IFF_UP:
            fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack(_IFREQ, name.encode(), flags | _IFF_UP))
    finally:
        s.close()


def _reset(sock):
    """Close with a RST (SO_LINGER 0): the peer sees ECONNRESET, not an EOF
    that would look like a clean, empty answer."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _Pair:
    """One relayed connection: the agent's end (accepted in the run's
    namespace) and the host's end (connected from agentwatch)."""

    def __init__(self, agent, host, connected):
        self.agent, self.host = agent, host
        self.peer = {agent: host, host: agent}
        self.out = {agent: bytearray(), host: bytearray()}   # waiting to be written to that socket
        self.eof = set()             # ends we read EOF from
        self.shut = set()            # ends we shut down for writing
        self.connected = connected
        self.deadline = time.monotonic() + CONNECT_TIMEOUT_S

    def done(self):
        return self.eof == {self.agent, self.host} and not any(self.out.values())


class RunNetwork:
    """The run's network namespace (fd: for setns in the child) and its
    loopback relay. ports: the network.loopback ports; uid: the agent's, as
    owner of the host-side sockets (None: agentwatch's own)."""

    def __init__(self, ports, uid=None, max_connections=MAX_CONNECTIONS, run_id=None):
        self.ports = sorted(set(ports))
        self.uid = uid
        self.run_id = run_id         # filed with core.peer for each host-side socket
        self.max_connections = max_connections
        self.fd = None
        self.listening = []          # (address, port) inside the run's namespace
        self._listeners = []
        self._pairs = {}             # socket -> _Pair (both ends)
        self._counts = {"connections": 0, "refused": 0, "over_limit": 0, "timed_out": 0,
                        "reset": 0, "errors": 0, "bytes_to_host": 0, "bytes_to_agent": 0}
        self._thread = None
        self._closing = False
        self._wake_r = self._wake_w = None
        self._sel = None

    # -- set-up ---------------------------------------------------------------------
    def open(self):
        """Make the namespace and its listeners, start the relay. Raises
        KernelFeatureError naming the step that failed."""
        result = {}
        t = threading.Thread(target=self._make, args=(result,), name="aw-netns-setup", daemon=True)
        t.start()
        t.join()
        if "error" in result:
            self.close()
            step, e = result["error"]
            raise KernelFeatureError(f"private network namespace: {step}: "
                                     f"{getattr(e, 'strerror', None) or e}")
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        for ls in self._listeners:
            self._sel.register(ls, selectors.EVENT_READ, "listen")
        self._thread = threading.Thread(target=self._serve, name="aw-loopback-relay", daemon=True)
        self._thread.start()
        return self

    def _make(self, result):
        """In a thread of its own, which moves into the new namespace and
        then ends (never back into the host's: nothing to undo)."""
        step = "unshare(CLONE_NEWNET)"
        try:
            if _libc.unshare(ctypes.c_int(CLONE_NEWNET)) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
            step = "open the namespace"
            self.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            step = "bring lo up (SIOCSIFFLAGS)"
            _link_up("lo")
            for port in self.ports:
                step = f"listen on loopback port {port}"
                self._listen(socket.AF_INET, "0.0.0.0", port)
                if socket.has_ipv6:
                    try:
                        self._listen(socket.AF_INET6, "::", port)
                    except OSError as e:
                        if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                            raise
        except BaseException as e:   # noqa: BLE001 - reported to open(), in the caller's thread
            result["error"] = (step, e)

    def _listen(self, family, addr, port):
        s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr, port))
            s.listen(BACKLOG)
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        self._listeners.append(s)
        self.listening.append((addr, port))

    # -- the relay thread -----------------------------------------------------------------
    def _serve(self):
        while not self._closing:
            for key, mask in self._sel.select(timeout=1.0):
                if key.data is None:
                    try:
                        os.read(self._wake_r, 64)
                    except BlockingIOError:
                        pass
                    continue
                try:
                    if key.data == "listen":
                        self._accept(key.fileobj)
                    else:
                        self._ready(key.fileobj, mask)
                except Exception:       # noqa: BLE001 - one connection's bug must not end the relay
                    self._counts["errors"] += 1
                    if key.data != "listen" and key.fileobj in self._pairs:
                        self._drop(key.data, reset=True)
            now = time.monotonic()
            for pair in {p for p in self._pairs.values() if not p.connected and now > p.deadline}:
                self._counts["timed_out"] += 1
                self._drop(pair, reset=True)

    def _accept(self, listener):
        for _ in range(_ACCEPTS_PER_WAKE):
            try:
                conn, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return                   # ECONNABORTED and the like: the client is gone
            if len(self._pairs) // 2 >= self.max_connections:
                self._counts["over_limit"] += 1
                _reset(conn)
                continue
            self._connect(conn)

    def _connect(self, conn):
        conn.setblocking(False)
        try:
            target = conn.getsockname()[:2]     # where the agent connected: the same, on the host
            host = self._host_socket(conn.family)
        except OSError:
            _reset(conn)
            self._counts["refused"] += 1
            return
        if self.run_id is not None:
            # filed before the connect, which on loopback completes at once:
            # the server (the LLM gateway) names its caller by this socket
            try:
                host.bind(("::1" if conn.family == socket.AF_INET6 else "127.0.0.1", 0))
                peer.relayed(host.getsockname(), self.run_id)
            except OSError:
                pass
        err = host.connect_ex(target)
        if err not in (0, errno.EINPROGRESS):
            self._counts["refused"] += 1
            if self.run_id is not None:
                peer.relayed(host.getsockname(), None)
            host.close()
            _reset(conn)
            return
        self._counts["connections"] += 1
        pair = _Pair(conn, host, connected=err == 0)
        self._pairs[conn] = self._pairs[host] = pair
        self._interest(pair)

    def _host_socket(self, family):
        """A socket of the host's namespace (this thread never left it),
        owned by the agent's uid where it is known."""
        if self.uid is None:
            s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        else:
            old = _libc.setfsuid(self.uid)      # this thread only (not broadcast like setuid)
            try:
                s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            finally:
                _libc.setfsuid(old)
        s.setblocking(False)
        return s

    def _ready(self, sock, mask):
        pair = self._pairs.get(sock)
        if pair is None:
            return
        try:
            if sock is pair.host and not pair.connected:
                if not mask & selectors.EVENT_WRITE:
                    return
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._counts["refused"] += 1
                    self._drop(pair, reset=True)
                    return
                pair.connected = True
            elif mask & selectors.EVENT_READ:
                self._read(pair, sock)
            if sock.fileno() >= 0 and mask & selectors.EVENT_WRITE and pair.connected:
                self._write(pair, sock)
        except OSError:
            self._counts["reset"] += 1
            self._drop(pair, reset=True)
            return
        if pair.done():
            self._drop(pair)
        elif sock in self._pairs:
            self._interest(pair)

    def _read(self, pair, sock):
        peer = pair.peer[sock]
        room = BUFFER - len(pair.out[peer])
        if room <= 0:
            return
        data = sock.recv(room)
        if not data:
            pair.eof.add(sock)
        else:
            pair.out[peer] += data
            self._counts["bytes_to_host" if sock is pair.agent else "bytes_to_agent"] += len(data)
        self._write(pair, peer)

    def _write(self, pair, sock):
        if sock is pair.host and not pair.connected:
            return                       # flushed once the connect completes
        buf = pair.out[sock]
        if buf:
            try:
                n = sock.send(buf, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                n = 0
            del buf[:n]
        if not buf and pair.peer[sock] in pair.eof and sock not in pair.shut:
            pair.shut.add(sock)
            sock.shutdown(socket.SHUT_WR)       # pass the half-close on

    def _interest(self, pair):
        """Wait on each end for what it can do now: the host's end for its
        connect to finish; else write where bytes wait, read where the other
        direction's buffer has room and no EOF came."""
        for sock in (pair.agent, pair.host):
            if sock is pair.host and not pair.connected:
                mask = selectors.EVENT_WRITE
            else:
                mask = selectors.EVENT_WRITE if pair.out[sock] else 0
                if sock not in pair.eof and len(pair.out[pair.peer[sock]]) < BUFFER:
                    mask |= selectors.EVENT_READ
            key = self._sel.get_map().get(sock)
            if not mask:
                if key is not None:
                    self._sel.unregister(sock)
            elif key is None:
                self._sel.register(sock, mask, pair)
            elif key.events != mask:
                self._sel.modify(sock, mask, pair)

    def _drop(self, pair, reset=False):
        if self.run_id is not None:
            try:
                peer.relayed(pair.host.getsockname(), None)
            except OSError:
                pass
        for sock in (pair.agent, pair.host):
            self._pairs.pop(sock, None)
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            if reset:
                _reset(sock)
            else:
                sock.close()

    # -- the run's end ----------------------------------------------------------------------
    def counters(self):
        """What the relay did for the run (the end event's loopback_relay)."""
        return dict(self._counts, ports=self.ports,
                    open=len(self._pairs) // 2)

    def close(self):
        """Stop the relay, close every socket and the namespace fd. Safe to
        call twice and after a failed open()."""
        self._closing = True
        if self._wake_w is not None:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for pair in set(self._pairs.values()):
            self._drop(pair)
        for s in self._listeners:
            s.close()
        self._listeners = []
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        for fd in (self._wake_r, self._wake_w, self.fd):
            if fd is not None:
                os.close(fd)
        self._wake_r = self._wake_w = self.fd = None
