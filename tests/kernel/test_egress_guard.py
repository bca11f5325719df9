"""Issue #16: egress by name, forced by the kernel (guards/guard.py).

Real runs, real BPF redirect, real servers. Every server is this test's
own, on loopback (127.0.0.2, 127.0.0.3, ::1, 127.0.0.77:53); the agent
names only those addresses. The policy allows one name, allowed.test,
pinned with --resolve to 127.0.0.2. Each case asserts two things: what the
agent must not reach saw nothing, and the refusal is a network.domain
violation naming the run, the process, the name, the address and why.
"""
import datetime
import os
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import REPO, aw, own_daemon, read_events, wait_for

pytestmark = pytest.mark.kernel

ALLOWED, OTHER = "allowed.test", "other.test"
SECRET = "s3cr3tt0k3n"


# -- servers --------------------------------------------------------------------------------
def _cert(tmp):
    """A self-signed certificate for allowed.test and other.test."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ALLOWED)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(ALLOWED), x509.DNSName(OTHER)]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cpath, kpath = tmp / "cert.pem", tmp / "key.pem"
    cpath.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kpath.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    return str(cpath), str(kpath)


class Server:
    """An HTTP(S) server on one loopback address that answers every request
    with 'hello <label> <sni> <host>' and records each connection it got."""

    def __init__(self, label, host, port=0, tls=None):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=fam, backlog=128)
        self.port = self.sock.getsockname()[1]
        self.label, self.tls = label, tls
        self.seen = []            # (sni, first request line, Host)
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._one, args=(c,), daemon=True).start()

    def _one(self, c):
        sni = [None]
        try:
            c.settimeout(5)
            if self.tls:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.load_cert_chain(*self.tls)
                ctx.sni_callback = lambda _s, name, _c: sni.__setitem__(0, name) and None
                c = ctx.wrap_socket(c, server_side=True)
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = c.recv(4096)
                if not chunk:
                    break
                data += chunk
            lines = data.split(b"\r\n")
            host = next((ln.split(b":", 1)[1].strip().decode() for ln in lines[1:]
                         if ln.lower().startswith(b"host:")), None)
            self.seen.append((sni[0], lines[0].decode(errors="replace"), host))
            body = f"hello {self.label} {sni[0]} {host}\n".encode()
            if b"GET /big" in lines[0]:
                body = b"x" * (1 << 20)
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        except (OSError, ssl.SSLError) as e:
            self.seen.append((sni[0], f"error {e}", None))
        finally:
            c.close()

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()


class Dns:
    """A DNS server on 127.0.0.77:53 that counts what reaches it (nothing should)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.77", 53))
        self.got = []
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                self.got.append(self.sock.recvfrom(4096))
            except (socket.timeout, OSError):
                continue

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tls = _cert(tmp_path_factory.mktemp("tls"))
    https = Server("https", "127.0.0.2", tls=tls)
    s = {"https": https, "http": Server("http", "127.0.0.2"),
         "elsewhere": Server("elsewhere", "127.0.0.3", https.port, tls=tls),
         "v6": Server("v6", "::1", https.port, tls=tls), "dns": Dns()}
    yield s
    for v in s.values():
        v.close()


def _policy(tmp, servers, extra=""):
    p = tmp / "guard.yaml"
    p.write_text(textwrap.dedent(f"""\
        apiVersion: agentwatch/v1
        kind: AgentPolicy
        metadata: {{name: guard-test}}
        network:
          allow:
            - {{domain: {ALLOWED}, ports: [{servers['https'].port}, {servers['http'].port}], protocol: tcp}}
        {extra}
        on_violation: {{network: deny}}
        """))
    return str(p)


# -- what the agent does ---------------------------------------------------------------------
AGENT = r"""
import json, os, socket, ssl, struct, subprocess, sys, time
HTTPS, HTTP = int(sys.argv[1]), int(sys.argv[2])
out = {}

def tls_get(addr, port, sni, family=socket.AF_INET):
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.socket(family) as s:
            s.settimeout(10); s.connect((addr, port))
            with ctx.wrap_socket(s, server_hostname=sni) as t:
                t.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % (sni or "x").encode())
                return t.recv(4096).decode().split("\r\n\r\n")[-1].strip()
    except ConnectionResetError:
        return "reset"
    except (OSError, ssl.SSLError) as e:
        return f"error {type(e).__name__} {e}"

def http_get(addr, port, host, first=None):
    try:
        with socket.socket() as s:
            s.settimeout(10); s.connect((addr, port))
            s.sendall(first or b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
            data = b""
            while True:
                c = s.recv(4096)
                if not c: break
                data += c
            return data.decode(errors="replace").split("\r\n")[0] + " | " + data.decode(errors="replace").split("\r\n\r\n")[-1].strip()
    except ConnectionResetError:
        return "reset"
    except OSError as e:
        return f"error {e}"

def connect_tunnel(target_host, port):
    # an HTTPS_PROXY-style client: CONNECT through a proxy address nothing listens on
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
    try:
        s = socket.create_connection(("127.0.0.9", 3128), timeout=10)
        s.sendall(b"CONNECT %s:%d HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (target_host.encode(), port, target_host.encode(), port))
        head = s.recv(4096).decode()
        if " 200 " not in head.split("\r\n")[0]:
            return head.split("\r\n")[0]
        with ctx.wrap_socket(s, server_hostname=target_host) as t:
            t.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % target_host.encode())
            return "tunnel " + t.recv(4096).decode().split("\r\n\r\n")[-1].strip()
    except OSError as e:
        return f"error {e}"

def dns_raw(name, qtype, server=("127.0.0.77", 53)):
    q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    q += struct.pack("!HH", qtype, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5); s.sendto(q, server)
        data, frm = s.recvfrom(4096)
        return {"rcode": data[3] & 0xF, "answers": struct.unpack("!H", data[6:8])[0], "from": list(frm)}

out["pid"] = os.getpid()
out["resolve_allowed"] = sorted({a[4][0] for a in socket.getaddrinfo("allowed.test", HTTPS, socket.AF_INET)})
out["https_allowed"] = tls_get("allowed.test", HTTPS, "allowed.test")
out["http_allowed"] = http_get("allowed.test", HTTP, "allowed.test")
out["https_other"] = tls_get("127.0.0.2", HTTPS, "other.test")
out["http_other"] = http_get("127.0.0.2", HTTP, "other.test")
out["tls_no_sni"] = tls_get("127.0.0.2", HTTPS, None)
out["raw_bytes"] = http_get("127.0.0.2", HTTP, None, first=b"\x00\x01\x02 hello")
out["v6"] = tls_get("::1", HTTPS, "allowed.test", socket.AF_INET6)
out["elsewhere"] = tls_get("127.0.0.3", HTTPS, "allowed.test")
out["connect_allowed"] = connect_tunnel("allowed.test", HTTPS)
out["connect_other"] = connect_tunnel("other.test", HTTPS)
with socket.socket() as s:   # connected, closed without a byte, to this host: still a refusal
    s.connect(("127.0.0.4", HTTP))
try:
    socket.getaddrinfo("other.test", 443); out["resolve_other"] = "resolved"
except socket.gaierror as e:
    out["resolve_other"] = e.errno == socket.EAI_NONAME and "NXDOMAIN"
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:   # QUIC: UDP to an allowed name's port
    try:
        u.sendto(b"\xc0quic", ("127.0.0.2", HTTPS)); out["quic"] = 0
    except OSError as e:
        out["quic"] = e.errno
out["txt_secret"] = dns_raw("%s.other.test" % os.environ["SECRET"], 16)
env = dict(os.environ, HTTPS_PROXY="http://127.0.0.9:1", https_proxy="http://127.0.0.9:1")
r = subprocess.run(["curl", "-sk", "--noproxy", "*", "--max-time", "10", "https://allowed.test:%d/" % HTTPS],
                   capture_output=True, text=True, env=env)
out["curl"] = r.stdout.strip() or f"rc {r.returncode} {r.stderr.strip()}"
print("RESULT " + json.dumps(out), flush=True)
"""


def _scenario(tmp_path, servers, daemon_env=None):
    """Run the agent once (embedded, or through a daemon); (results, events, run_id)."""
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT)
    events = tmp_path / "events.jsonl"
    for s in servers.values():
        if isinstance(s, Server):
            s.seen.clear()
    servers["dns"].got.clear()
    args = ["run", "--policy", _policy(tmp_path, servers), "--resolve", f"{ALLOWED}:127.0.0.2",
            "--events", str(events), "--name", "guard-agent"]
    if daemon_env is not None:
        args.append("--daemon")
    args += ["--", sys.executable, str(agent), str(servers["https"].port), str(servers["http"].port)]
    env = dict(daemon_env or {}, SECRET=SECRET)
    r = aw(*args, env=env, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))
    import json
    res = json.loads(line[len("RESULT "):])
    evs = read_events(events)
    run_id = evs[0]["run_id"]
    return res, evs, run_id


def _check_scenario(res, evs, run_id, servers):
    https, http = servers["https"], servers["http"]
    # allowed: reached, by name, through the kernel redirect and our DNS
    assert res["resolve_allowed"] == ["127.0.0.2"]
    assert res["https_allowed"] == "hello https allowed.test allowed.test", res
    assert res["http_allowed"].endswith("hello http None allowed.test"), res
    assert res["connect_allowed"] == "tunnel hello https allowed.test allowed.test", res
    assert res["curl"].startswith("hello https allowed.test allowed.test"), res   # Host: name:port
    # refused, each its protocol's way
    assert res["https_other"] == "reset" and res["tls_no_sni"] == "reset", res
    assert res["raw_bytes"] == "reset", res
    assert res["http_other"].startswith("HTTP/1.1 403"), res
    assert res["connect_other"].startswith("HTTP/1.1 403"), res
    assert res["v6"] == "reset" and res["elsewhere"] == "reset", res
    assert res["resolve_other"] == "NXDOMAIN"
    assert res["quic"] == 1, "QUIC is refused (EPERM): clients fall back to TCP"
    assert res["txt_secret"]["rcode"] == 3 and res["txt_secret"]["answers"] == 0
    assert res["txt_secret"]["from"] == ["127.0.0.77", 53], "the answer reads as from the server asked"
    # the forbidden effect did not happen: the servers saw only the allowed requests
    assert len(https.seen) == 3 and all(sni == ALLOWED and line == "GET / HTTP/1.1" and host.startswith(ALLOWED)
                                        for sni, line, host in https.seen), https.seen
    assert http.seen == [(None, "GET / HTTP/1.1", ALLOWED)], http.seen
    assert servers["elsewhere"].seen == [] and servers["v6"].seen == []
    assert servers["dns"].got == [], "no DNS query left for a server"
    # and each refusal is a violation with the run's identity and the evidence;
    # pids are the host's (the agent has a PID namespace of its own)
    pid = next(e["pid"] for e in evs if e["kind"] == "exec" and e["ret"] == 0
               and any(a.endswith("agent.py") for a in e["argv"]))
    viol = [e for e in evs if e["kind"] == "violation" and e["rule"] in ("network.domain", "network.loopback")
            and not e["detail"].get("repeat")]
    assert {e["run_id"] for e in viol} == {run_id} and {e["agent"] for e in viol} == {"guard-agent"}
    tcp = {(v["detail"].get("name"), v["detail"]["addr"], v["detail"]["port"]): v for v in viol
           if v["detail"]["proto"] == "tcp"}
    hp, tp = https.port, http.port
    assert set(tcp) == {(OTHER, "127.0.0.2", hp), (OTHER, "127.0.0.2", tp), (None, "127.0.0.2", hp),
                        (None, "127.0.0.2", tp), (ALLOWED, "::1", hp), (ALLOWED, "127.0.0.3", hp),
                        (OTHER, "127.0.0.9", 3128), (None, "127.0.0.4", tp)}, sorted(tcp, key=str)
    for v in tcp.values():
        assert v["pid"] == pid and v["action"] == "deny" and v["category"] == "network"
        assert v["detail"]["layer"] == "egress-guard" and v["detail"]["reason"]
    # named: network.domain; unnamed to a loopback address: what network.loopback forbids
    assert {k for k, v in tcp.items() if v["rule"] == "network.loopback"} == {
        (None, "127.0.0.2", hp), (None, "127.0.0.2", tp), (None, "127.0.0.4", tp)}
    assert tcp[(None, "127.0.0.4", tp)]["detail"]["reason"] == "closed before naming a destination"
    assert tcp[(OTHER, "127.0.0.2", hp)]["detail"]["source"] == "sni"
    assert tcp[(OTHER, "127.0.0.2", tp)]["detail"]["source"] == "host"
    assert tcp[(OTHER, "127.0.0.9", 3128)]["detail"]["source"] == "connect"
    assert "not an address of allowed.test" in tcp[(ALLOWED, "127.0.0.3", hp)]["detail"]["reason"]
    assert tcp[(ALLOWED, "::1", hp)]["detail"]["family"] == "inet6"
    dns = {(v["detail"]["name"], v["detail"]["qtype"]) for v in viol if v["detail"]["proto"] == "dns"}
    assert (f"{SECRET}.other.test", "TXT") in dns and (OTHER, "A") in dns
    # one record per flow: allowed ones carry bytes, the DNS answer behind the address, the process
    flows = [e for e in evs if e["kind"] == "flow" and e["proto"] == "tcp"]
    ok = [f for f in flows if f["decision"] == "allow"]
    assert len(ok) == 4 and all(f["bytes_in"] > 0 and f["bytes_out"] > 0 for f in ok), ok
    by_dns = [f for f in ok if (f["dns"] or {}).get("by") == "agentwatch-dns"]
    assert by_dns and all(f["dns"]["name"] == ALLOWED for f in by_dns)
    assert {f["exe"] for f in ok if f["pid"] == pid} <= {sys.executable, os.path.realpath(sys.executable)}
    assert len([f for f in ok if f["pid"] == pid]) == 3
    assert any(f["comm"] == "curl" for f in ok)
    assert len([f for f in flows if f["decision"] == "deny"]) == 8
    end = next(e for e in evs if e["kind"] == "lifecycle" and e["phase"] == "end")
    g = end["detail"]["kernel_denials"]["egress-guard"]
    assert g["allowed"] == 4 and g["denied"] == 8 and g["busy"] == 0 and g["unknown_socket"] == 0
    # the run's listeners are gone with it
    start = next(e for e in evs if e["kind"] == "lifecycle" and e["phase"] == "start")
    ports = start["detail"]["enforcement"]["egress_guard"]["ports"]
    assert ports["proxy4"] and ports["dns4"]
    for port in (ports["proxy4"], ports["dns4"]):
        with socket.socket() as c:
            assert c.connect_ex(("127.0.0.1", port)) != 0, f"guard port {port} still listens"


def test_egress_by_name_embedded(tmp_path, servers):
    res, evs, run_id = _scenario(tmp_path, servers)
    _check_scenario(res, evs, run_id, servers)


@pytest.fixture(scope="module")
def guard_daemon(tmp_path_factory):
    yield from own_daemon(tmp_path_factory, "gdaemon")


def test_egress_by_name_through_the_daemon(tmp_path, servers, guard_daemon):
    _state, env = guard_daemon
    res, evs, run_id = _scenario(tmp_path, servers, env)
    _check_scenario(res, evs, run_id, servers)


# -- bad input --------------------------------------------------------------------------------
HOSTILE = r"""
import json, os, resource, socket, sys, time
HTTP = int(sys.argv[1]); N = int(sys.argv[2])
out = {}
def talk(first, wait=10):
    with socket.socket() as s:
        s.settimeout(wait); s.connect(("127.0.0.2", HTTP))
        if first: s.sendall(first)
        t = time.monotonic()
        try:
            data = s.recv(4096)
            return [data[:12].decode(errors="replace") or "eof", round(time.monotonic() - t, 1)]
        except ConnectionResetError:
            return ["reset", round(time.monotonic() - t, 1)]
        except socket.timeout:
            return ["timeout", round(time.monotonic() - t, 1)]
# a ClientHello whose lengths lie
out["bad_hello"] = talk(b"\x16\x03\x01\x00\x40\x01\x00\xff\xff" + b"\x03\x03" + b"\x00" * 60)
out["garbage"] = talk(b"GET\x00\x01 / HTTP/9.9\r\n\r\n")
out["huge_host"] = talk(b"GET / HTTP/1.1\r\nHost: " + b"a" * 100000 + b"\r\n\r\n")
out["silent"] = talk(None, wait=20)
# many connections at once, held open without a byte
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
socks, refused = [], 0
for i in range(N):
    s = socket.socket(); s.setblocking(False)
    try:
        s.connect(("127.0.0.2", HTTP))
    except BlockingIOError:
        pass
    except OSError:
        refused += 1; s.close(); continue
    socks.append(s)
print("FLOOD", len(socks), flush=True)
time.sleep(3)
reset = 0
for s in socks:
    try:
        s.recv(1)
    except BlockingIOError:
        pass
    except ConnectionResetError:
        reset += 1
    except OSError:
        pass
out["flood"] = {"opened": len(socks), "refused_at_connect": refused, "reset": reset}
for s in socks: s.close()
time.sleep(1)
out["after_flood"] = talk(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
print("RESULT " + json.dumps(out), flush=True)
"""


def test_the_guard_survives_hostile_input_and_one_flooding_agent_stalls_no_other(tmp_path, servers,
                                                                                 guard_daemon):
    """Through the daemon, so a second run shares the guard: while the first
    holds ten thousand connections open, the second is served at once."""
    import json
    _state, env = guard_daemon
    http = servers["http"]
    http.seen.clear()
    agent = tmp_path / "hostile.py"
    agent.write_text(HOSTILE)
    pol = _policy(tmp_path, servers)
    ev1 = tmp_path / "hostile.jsonl"
    env_full = dict(os.environ, PYTHONPATH=REPO, **env)
    from conftest import aw_cmd
    flood = subprocess.Popen(aw_cmd() + ["run", "--daemon", "--policy", pol, "--resolve", f"{ALLOWED}:127.0.0.2",
                                         "--events", str(ev1), "--", sys.executable, str(agent),
                                         str(http.port), "10000"],
                             cwd=REPO, env=env_full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out = []

        def reader():
            for line in flood.stdout:
                out.append(line)
        t = threading.Thread(target=reader, daemon=True)
        t.start()
        wait_for(lambda: any(ln.startswith("FLOOD") for ln in out), timeout=120, what="the flood")
        # the other agent, while the flood holds its connections
        t0 = time.monotonic()
        ev2 = tmp_path / "calm.jsonl"
        r = aw("run", "--daemon", "--policy", pol, "--resolve", f"{ALLOWED}:127.0.0.2", "--events", str(ev2),
               "--", "curl", "-s", "--max-time", "10", f"http://{ALLOWED}:{http.port}/calm", env=env, timeout=120)
        calm_s = time.monotonic() - t0
        assert r.returncode == 0 and "hello http None allowed.test" in r.stdout, r.stdout + r.stderr
        flood.wait(timeout=120)
        t.join(5)
    finally:
        if flood.poll() is None:
            flood.kill()          # the client we started, by its id
            flood.wait()
    res = json.loads(next(ln for ln in out if ln.startswith("RESULT "))[7:])
    assert res["bad_hello"][0] == "reset" and res["garbage"][0] == "HTTP/1.1 403"
    assert res["huge_host"][0] in ("HTTP/1.1 403", "reset"), res
    assert res["silent"][0] == "reset" and 4 <= res["silent"][1] <= 8, "closed after 5 s without a name"
    f = res["flood"]
    assert f["opened"] + f["refused_at_connect"] == 10000
    assert f["reset"] > 0, "the excess over the per-run bound is reset"
    assert res["after_flood"][0] == "HTTP/1.1 200", "the guard still serves the flooding run"
    assert calm_s < 60
    # the servers saw only the allowed requests
    assert sorted(line for _, line, _ in http.seen) == ["GET / HTTP/1.1", "GET /calm HTTP/1.1"], http.seen
    evs = read_events(ev1)
    end = next(e for e in evs if e["kind"] == "lifecycle" and e["phase"] == "end")
    g = end["detail"]["kernel_denials"]["egress-guard"]
    assert g["busy"] > 0 and g["busy"] >= f["reset"] * 0.5, g
    assert any(e["kind"] == "violation" and e["rule"] == "network.loopback"   # unnamed, to 127.0.0.2
               and e["detail"]["layer"] == "egress-guard" for e in evs)
    reasons = " | ".join(e["reason"] for e in evs if e["kind"] == "flow" and e["decision"] == "deny")
    assert "TLS ClientHello" in reasons and "HTTP request" in reasons and "within 5 s" in reasons, reasons


# -- another run at this run's guard ports ----------------------------------------------------
INTRUDER = r"""
import json, socket, struct, sys
DNS, PROXY = int(sys.argv[1]), int(sys.argv[2])
q = struct.pack("!HHHHHH", 0x4321, 0x0100, 1, 0, 0, 0) + b"\x05other\x04test\x00" + struct.pack("!HH", 1, 1)
out = {}
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
    u.settimeout(3); u.sendto(q, ("127.0.0.1", DNS))
    try:
        out["udp"] = u.recv(512).hex()
    except socket.timeout:
        out["udp"] = "no answer"
def tcp(first):
    with socket.create_connection(("127.0.0.1", first[0]), timeout=5) as s:
        s.sendall(first[1])
        try:
            return s.recv(512).hex() or "eof"
        except ConnectionResetError:
            return "reset"
        except socket.timeout:
            return "timeout"
out["tcp_dns"] = tcp((DNS, struct.pack("!H", len(q)) + q))
out["proxy"] = tcp((PROXY, b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n"))
print("RESULT " + json.dumps(out), flush=True)
"""


def test_another_run_at_this_runs_guard_ports_is_neither_served_nor_taken_for_it(tmp_path, servers):
    """The guard's ports are on loopback, so a run allowed all of loopback
    can send to another run's listeners without the redirect. The kernel,
    not the port, says whose a client is: the intruder gets no answer, and
    nothing lands in the other run's log or on the servers."""
    import json
    from conftest import aw_cmd
    http = servers["http"]
    http.seen.clear()
    done = tmp_path / "done"
    ev1 = tmp_path / "victim.jsonl"
    victim = subprocess.Popen(
        aw_cmd() + ["run", "--policy", _policy(tmp_path, servers), "--resolve", f"{ALLOWED}:127.0.0.2",
                    "--events", str(ev1), "--", sys.executable, "-c",
                    "import os, sys, time\nt = time.monotonic()\n"
                    "while not os.path.exists(sys.argv[1]) and time.monotonic() - t < 120: time.sleep(0.1)",
                    str(done)],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def ports():
            try:
                evs = read_events(ev1)
            except (OSError, ValueError):
                return None
            start = [e for e in evs if e["kind"] == "lifecycle" and e["phase"] == "start"]
            return start and start[0]["detail"]["enforcement"]["egress_guard"]["ports"]
        p = wait_for(ports, timeout=120, what="the victim run's start")
        intruder = tmp_path / "intruder.py"
        intruder.write_text(INTRUDER)
        pol = tmp_path / "loopback.yaml"
        pol.write_text("apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: intruder}\n"
                       "network: {allow: [], loopback: true}\non_violation: {network: deny}\n")
        r = aw("run", "--policy", str(pol), "--", sys.executable, str(intruder), str(p["dns4"]),
               str(p["proxy4"]), timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        res = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    finally:
        done.touch()
        try:
            victim.wait(timeout=120)
        finally:
            if victim.poll() is None:
                victim.kill()          # the run we started, by its id
                victim.wait()
    assert victim.returncode == 0, victim.stderr.read()[-3000:]
    # closed unanswered: a reset, or an end if it closed before the query came in
    assert res["udp"] == "no answer" and res["tcp_dns"] in ("reset", "eof") and res["proxy"] == "reset", res
    assert http.seen == []
    evs = read_events(ev1)
    assert not [e for e in evs if e["kind"] in ("flow", "violation")], "nothing was taken for the victim's"
    end = next(e for e in evs if e["kind"] == "lifecycle" and e["phase"] == "end")
    g = end["detail"]["kernel_denials"]["egress-guard"]
    assert g["dns_unknown_socket"] == 2 and g["unknown_socket"] == 1 and g["dns_queries"] == 0, json.dumps(g)
