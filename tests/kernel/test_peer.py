"""core.peer on the real kernel: a socket peer is named by the kernel
(SO_PEERCRED + pidfd for unix sockets, inet_diag's cgroup id for TCP), and
an agent's connection is tied to its run, a host process's to none."""
import os
import socket
import sys
import threading

import pytest

from conftest import aw, read_events

from agentwatch.core import peer

pytestmark = pytest.mark.kernel

CLIENT = r"""
import socket, sys
kind, where = sys.argv[1], sys.argv[2]
if kind == "unix":
    s = socket.socket(socket.AF_UNIX); s.connect(where)
else:
    s = socket.create_connection(("127.0.0.1", int(where)))
s.recv(1)   # wait until the server has named us
"""


class Server:
    """Accepts one connection and records the kernel's account of its peer."""

    def __init__(self, sock):
        self.sock, self.peer, self.error = sock, None, None
        sock.settimeout(60)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            c, _ = self.sock.accept()
            with c:
                self.peer = peer.of_socket(c)
                c.sendall(b"x")
        except Exception as e:   # reported by the test, not lost in the thread
            self.error = e

    def result(self):
        self.thread.join(60)
        self.sock.close()
        assert self.error is None, self.error
        return self.peer


def _unix_server(tmp_path):
    path = str(tmp_path / "peer.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    os.chmod(path, 0o777)
    s.listen(1)
    return Server(s), path


def _tcp_server():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return Server(s), str(s.getsockname()[1])


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_an_agents_connection_is_named_by_its_run(kind, state_dir, tmp_path):
    srv, where = _unix_server(tmp_path) if kind == "unix" else _tcp_server()
    ev = tmp_path / "events.jsonl"
    r = aw("run", "--name", "peer-agent", "--events", str(ev), "--",
           sys.executable, "-c", CLIENT, kind, where)
    assert r.returncode == 0, r.stderr
    p = srv.result()
    run_id = read_events(ev)[0]["run_id"]
    assert p.run_id == run_id and p.is_agent
    assert p.cgroup.startswith(f"/agentwatch/{run_id}")
    assert p.uid == 0
    if kind == "unix":
        assert p.pid and p.pid != os.getpid()


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_a_host_process_is_no_run(kind, tmp_path):
    srv, where = _unix_server(tmp_path) if kind == "unix" else _tcp_server()
    if kind == "unix":
        c = socket.socket(socket.AF_UNIX)
        c.connect(where)
    else:
        c = socket.create_connection(("127.0.0.1", int(where)))
    with c:
        c.recv(1)
        p = srv.result()
    assert p.run_id is None and not p.is_agent
    assert p.uid == os.getuid()
    if kind == "unix":
        assert p.pid == os.getpid()


UDP_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(60)
s.sendto(b"who", ("127.0.0.1", int(sys.argv[1])))
s.recv(1)   # wait until the server has named us
"""


def _udp_named(send):
    """The Peer of the first datagram to a loopback UDP socket; send(port)
    makes it arrive."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.settimeout(60)
    with srv:
        got = {}

        def serve():
            _, addr = srv.recvfrom(16)
            got["peer"] = peer.of_datagram(socket.AF_INET, srv.getsockname(), addr)
            srv.sendto(b"x", addr)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        send(srv.getsockname()[1])
        t.join(60)
    return got["peer"]


def test_a_datagrams_sender_is_named_by_its_run(state_dir, tmp_path):
    ev = tmp_path / "events.jsonl"
    result = {}

    def send(port):
        result["r"] = aw("run", "--events", str(ev), "--", sys.executable, "-c", UDP_CLIENT, str(port))

    p = _udp_named(send)
    assert result["r"].returncode == 0, result["r"].stderr
    run_id = read_events(ev)[0]["run_id"]
    assert p.run_id == run_id and p.cgroup.startswith(f"/agentwatch/{run_id}")


def test_a_datagram_from_a_host_process_or_a_closed_socket_is_no_run():
    def send(port):
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.sendto(b"who", ("127.0.0.1", port))
        c.settimeout(60)
        c.recv(1)
        c.close()
    p = _udp_named(send)
    assert p.run_id is None and p.uid == os.getuid()
    gone = peer.of_datagram(socket.AF_INET, ("127.0.0.1", 9), ("127.0.0.1", 1))
    assert gone == peer.Peer(uid=None)
