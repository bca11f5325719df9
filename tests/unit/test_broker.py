"""The broker's server and methods on real sockets, with the kernel's
naming of callers replaced by a table (each test client binds its unix
socket to an abstract name the table maps to a run). The kernel path
(SO_PEERCRED -> cgroup -> run) is tests/kernel/test_broker_runs.py's.

Covered: delivery with the attested sender, peers refusals, sender claims,
facts on forward, tasks, the operator, tokens (scope, widening, replay,
holder, revocation), bad input (malformed JSON-RPC, oversized, deep
nesting, garbage tokens, a flood) answered with JSON-RPC errors while the
other clients are served, and the HTTP binding."""
import http.client
import json
import socket
import threading
import time

import pytest

from agentwatch.core.peer import Peer
from agentwatch.harness import a2a
from agentwatch.harness.broker import Broker, BrokerRun, Limits
from agentwatch.harness.broker_store import Store
from agentwatch.harness.tokens import Signer
from agentwatch.policy.model import Item, Peers, Tool


def _items(*names):
    return tuple(Item(n, None) for n in names)


class Table:
    """caller socket's peer name -> Peer (stands in for core.peer.of_socket)."""

    def __init__(self):
        self.peers = {}

    def __call__(self, sock):
        if sock.family == socket.AF_UNIX:
            return self.peers.get(sock.getpeername())
        return self.peers.get(("tcp", sock.getpeername()[1]))


@pytest.fixture
def broker(tmp_path):
    table = Table()
    store = Store(str(tmp_path / "b.db"))
    b = Broker(store, Signer.load_or_create(str(tmp_path / "k.pem")), str(tmp_path / "b.sock"),
               limits=Limits(default_rate=100000), resolve_caller=table).start()
    b.table = table
    b.records = {}
    b.tool_calls = []
    yield b
    b.close()
    store.close()


def add_run(b, name, peers=None, policed=True):
    recs = b.records.setdefault(name, [])

    def spawn(argv, timeout):
        b.tool_calls.append((name, argv))
        return 0, ("ran " + " ".join(argv)).encode(), b"", False
    run = BrokerRun(run_id=f"run-{name}", agent=name, cgroup=f"/agentwatch/run-{name}", peers=peers,
                    policed=policed, spawn=spawn, emit=recs.append)
    b.register_run(run)
    return run


class Conn:
    """A JSON-RPC client on the unix socket, named `as_run` for the table."""

    def __init__(self, b, as_run=None, uid=0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        name = f"\0aw-test-{id(self)}-{time.monotonic_ns()}".encode()
        self.sock.bind(name)
        b.table.peers[name] = Peer(uid=uid, pid=1, cgroup=as_run and f"/agentwatch/{as_run}", run_id=as_run)
        self.sock.settimeout(10)
        self.sock.connect(b.socket_path)
        self.f = self.sock.makefile("rb")
        self.n = 0

    def raw(self, data):
        self.sock.sendall(data)
        line = self.f.readline()
        return json.loads(line) if line else None

    def call(self, method, **params):
        self.n += 1
        return self.raw(json.dumps({"jsonrpc": "2.0", "id": self.n, "method": method,
                                    "params": params}).encode() + b"\n")

    def ok(self, method, **params):
        out = self.call(method, **params)
        assert "result" in out, out
        return out["result"]

    def close(self):
        self.f.close()
        self.sock.close()


def msg(text="hi", mid=None, **extra):
    return {"messageId": mid or f"m-{time.monotonic_ns()}", "role": "ROLE_USER", "parts": [{"text": text}],
            **extra}


def pair(b):
    a = add_run(b, "a", Peers(send=_items("b"), receive=_items("b"), grant=_items("wc"),
                              tools={"wc": Tool("wc", ("/usr/bin/wc", "-c"))}))
    bb = add_run(b, "b", Peers(send=_items("a"), receive=_items("a"), accept=_items("wc")))
    c = add_run(b, "c", Peers(send=_items("b"), accept=_items("wc")))
    return a, bb, c


def findings(b, name):
    return [r["finding"]["rule"] for r in b.records.get(name, []) if r.get("finding")]


def test_delivery_names_the_sender_from_the_caller_table(broker):
    pair(broker)
    ca, cb = Conn(broker, "run-a"), Conn(broker, "run-b")
    m = msg(parts=None)
    m["parts"] = [{"text": "review"}, {"data": {"ticket": 42}, "metadata": {"tag": "fact"}}]
    task = ca.ok("SendMessage", message=m, recipient="b")["task"]
    assert task["status"]["state"] == "TASK_STATE_SUBMITTED"
    box = cb.ok("agentwatch.Inbox")
    (got,) = box["messages"]
    aw = got["metadata"]["agentwatch"]
    assert aw["sender"]["agent"] == "a" and aw["sender"]["run_id"] == "run-a"
    assert aw["facts_digest"] == a2a.facts_digest(m)
    assert got["taskId"] == task["id"]
    # b answers in the task and completes it; a sees the state
    cb.ok("SendMessage", message=msg("done", taskId=task["id"]), state="TASK_STATE_COMPLETED")
    t = ca.ok("GetTask", id=task["id"])
    assert t["status"]["state"] == "TASK_STATE_COMPLETED" and len(t["history"]) == 2
    assert ca.call("CancelTask", id=task["id"])["error"]["code"] == a2a.TASK_NOT_CANCELABLE
    assert [r["op"] for r in broker.records["b"]][:1] == ["receive"]
    # c is no party to the task
    cc = Conn(broker, "run-c")
    assert cc.call("GetTask", id=task["id"])["error"]["code"] == a2a.TASK_NOT_FOUND


def test_peers_and_claims_are_refused_and_reported(broker):
    pair(broker)
    ca, cc = Conn(broker, "run-a"), Conn(broker, "run-c")
    e = cc.call("SendMessage", message=msg(), recipient="b")["error"]
    assert e["code"] == a2a.PERMISSION_DENIED and e["data"]["rule"] == "protocol.peer"
    assert "peers.receive of 'b'" in e["message"]
    e = ca.call("SendMessage", message=msg(metadata={"sender": "c"}), recipient="b")["error"]
    assert e["code"] == a2a.IDENTITY_MISMATCH and e["data"]["rule"] == "identity.sender"
    e = ca.call("SendMessage", message=msg(), recipient="b", sender={"agent": "c"})["error"]
    assert e["data"]["rule"] == "identity.sender"
    assert findings(broker, "c") == ["protocol.peer"]
    assert findings(broker, "a") == ["identity.sender", "identity.sender"]
    assert ca.call("SendMessage", message=msg(), recipient="nobody")["error"]["code"] == a2a.UNKNOWN_AGENT
    # a claim of one's own name is no lie
    assert "result" in ca.call("SendMessage", message=msg(metadata={"sender": "a"}), recipient="b")


def test_a_forward_must_keep_the_facts(broker):
    pair(broker)
    ca, cb = Conn(broker, "run-a"), Conn(broker, "run-b")
    m = msg()
    m["parts"] = [{"data": {"ticket": 42}, "metadata": {"tag": "fact"}},
                  {"text": "long context", "metadata": {"tag": "context"}}]
    ca.ok("SendMessage", message=m, recipient="b")
    changed = msg()
    changed["parts"] = [{"data": {"ticket": 43}, "metadata": {"tag": "fact"}}]
    e = cb.call("SendMessage", message=changed, recipient="a", forwardOf=m["messageId"])["error"]
    assert e["code"] == a2a.FACTS_CHANGED and e["data"]["rule"] == "protocol.facts"
    dropped = msg("summary only")
    assert cb.call("SendMessage", message=dropped, recipient="a",
                   forwardOf=m["messageId"])["error"]["data"]["rule"] == "protocol.facts"
    same = msg()     # the facts in another key order: the same canonical bytes; context summarised
    same["parts"] = [{"metadata": {"tag": "fact"}, "data": {"ticket": 42}},
                     {"text": "short", "metadata": {"tag": "context"}}]
    cb.ok("SendMessage", message=same, recipient="a", forwardOf=m["messageId"])
    fwd = ca.ok("agentwatch.Inbox")["messages"][-1]
    assert fwd["metadata"]["agentwatch"]["forwarded_from"]["sender"] == "a"
    # only a message that reached you can be forwarded
    e = ca.call("SendMessage", message=msg(), recipient="b", forwardOf="never-seen")["error"]
    assert e["code"] == a2a.INVALID_PARAMS


def test_tokens_scope_widen_replay_holder_revocation(broker):
    a, _b, _c = pair(broker)
    ca, cb, cc = Conn(broker, "run-a"), Conn(broker, "run-b"), Conn(broker, "run-c")
    tok = ca.ok("agentwatch.MintToken", holder="b", scope={"tool": "wc", "paths": ["/ws/**"]},
                ttlSeconds=60, uses=2)["token"]
    out = cb.ok("agentwatch.CallTool", token=tok, args=["/ws/f"], nonce="nonce-0001")
    assert out["exitCode"] == 0 and broker.tool_calls == [("a", ["/usr/bin/wc", "-c", "/ws/f"])]

    def refused(conn, **params):
        e = conn.call("agentwatch.CallTool", **params)["error"]
        assert e["code"] == a2a.TOKEN_REFUSED, e
        return e["data"]["rule"]
    assert refused(cb, token=tok, args=["/etc/passwd"], nonce="nonce-0002") == "protocol.token_scope"
    assert refused(cb, token=tok, args=["/ws/f"], nonce="nonce-0001") == "protocol.token_replayed"
    assert refused(cc, token=tok, args=["/ws/f"], nonce="nonce-0003") == "protocol.token_holder"
    assert refused(cb, token="aw1.garbage.x", args=[], nonce="nonce-0004") == "protocol.token_invalid"
    assert refused(cb, token={"not": "a string"}, nonce="nonce-0005") == "protocol.token_invalid"
    e = cb.call("agentwatch.AttenuateToken", token=tok, scope={"tool": "wc", "paths": ["/**"]})["error"]
    assert e["data"]["rule"] == "protocol.token_widened"
    cb.ok("agentwatch.CallTool", token=tok, args=["/ws/g"], nonce="nonce-0006")
    assert refused(cb, token=tok, args=["/ws/g"], nonce="nonce-0007") == "protocol.token_exhausted"
    # minting: the issuer must grant it, the holder accept it
    e = cc.call("agentwatch.MintToken", holder="b", scope={"tool": "wc"})["error"]
    assert e["data"]["rule"] == "protocol.grant"
    tok2 = ca.ok("agentwatch.MintToken", holder="b", scope={"tool": "wc", "paths": ["/ws/**"]})["token"]
    broker.unregister_run(a.run_id)
    assert refused(cb, token=tok2, args=["/ws/f"], nonce="nonce-0008") == "protocol.token_revoked"
    assert set(findings(broker, "b")) == {"protocol.token_scope", "protocol.token_replayed",
                                          "protocol.token_invalid", "protocol.token_widened",
                                          "protocol.token_exhausted", "protocol.token_revoked"}
    assert findings(broker, "c") == ["protocol.token_holder", "protocol.grant"]


def test_the_operator_reads_any_inbox_and_strangers_are_refused(broker):
    pair(broker)
    Conn(broker, "run-a").ok("SendMessage", message=msg("x"), recipient="b")
    op = Conn(broker, None, uid=0)
    assert op.ok("agentwatch.Whoami")["agent"] == "operator"
    assert len(op.ok("agentwatch.Inbox", agent="b")["messages"]) == 1
    assert len(op.ok("ListTasks", agent="a")["tasks"]) == 1
    assert {c["name"] for c in op.ok("agentwatch.ListAgentCards")["cards"]} == {"a", "b", "c"}
    stranger = Conn(broker, None, uid=1000)
    out = json.loads(stranger.f.readline())
    assert out["error"]["code"] == a2a.PERMISSION_DENIED and "uid 1000" in out["error"]["message"]
    # a run reads only its own inbox
    e = Conn(broker, "run-c").call("agentwatch.Inbox", agent="b")["error"]
    assert e["code"] == a2a.PERMISSION_DENIED


def test_bad_input_gets_json_rpc_errors_and_the_connection_lives(broker):
    pair(broker)
    c = Conn(broker, "run-a")
    assert c.raw(b"{not json\n")["error"]["code"] == a2a.PARSE_ERROR
    assert c.raw(b'{"jsonrpc": "1.0", "id": 1, "method": "x"}\n')["error"]["code"] == a2a.INVALID_REQUEST
    assert c.raw(b'[{"jsonrpc": "2.0", "id": 1, "method": "x"}]\n')["error"]["code"] == a2a.INVALID_REQUEST
    deep = b'{"jsonrpc":"2.0","id":1,"method":"SendMessage","params":' + b"[" * 100000 + b"]" * 100000 + b"}\n"
    assert c.raw(deep)["error"]["code"] == a2a.INVALID_REQUEST
    assert c.call("NoSuchMethod")["error"]["code"] == a2a.METHOD_NOT_FOUND
    bad = c.call("SendMessage", message={"messageId": "x", "role": "ROLE_USER",
                                         "parts": [{"text": "a", "colour": "red"}]}, recipient="b")
    assert "parts[0].colour" in bad["error"]["message"]
    assert c.call("Whoami")["error"]["code"] == a2a.METHOD_NOT_FOUND
    assert c.ok("agentwatch.Whoami")["agent"] == "a"          # still served
    # oversized: an error, then the connection is closed; a new one is served
    big = json.dumps({"jsonrpc": "2.0", "id": 9, "method": "SendMessage",
                      "params": {"message": msg("x" * (2 << 20)), "recipient": "b"}}).encode() + b"\n"
    try:
        c.sock.sendall(big)
    except (BrokenPipeError, ConnectionResetError):
        pass                           # the broker stopped reading past the limit
    out = json.loads(c.f.readline())
    assert out["error"]["code"] == a2a.TOO_LARGE
    assert Conn(broker, "run-a").ok("agentwatch.Whoami")["agent"] == "a"
    assert broker.counters["too_large"] == 1


def test_a_flood_is_rate_limited_and_the_others_are_served(tmp_path):
    table = Table()
    store = Store(str(tmp_path / "b.db"))
    b = Broker(store, Signer.load_or_create(str(tmp_path / "k.pem")), str(tmp_path / "b.sock"),
               resolve_caller=table).start()
    b.table, b.records, b.tool_calls = table, {}, []
    try:
        add_run(b, "flood", Peers(send=_items("b"), rate=50))
        add_run(b, "b", Peers(receive=_items("flood", "calm")))
        add_run(b, "calm", Peers(send=_items("b"), rate=1000))
        flood, calm = Conn(b, "run-flood"), Conn(b, "run-calm")
        stop = threading.Event()
        codes = []

        def hammer():
            while not stop.is_set():
                out = flood.call("agentwatch.Whoami")
                codes.append(out.get("error", {}).get("code"))
        t = threading.Thread(target=hammer)
        started = time.monotonic()
        t.start()
        lat = []
        for i in range(40):
            t0 = time.monotonic()
            calm.ok("SendMessage", message=msg(f"calm {i}"), recipient="b")
            lat.append(time.monotonic() - t0)
        wait_until = time.monotonic() + 10
        while len(codes) < 600 and time.monotonic() < wait_until:
            time.sleep(0.01)            # the flood well past its burst
        stop.set()
        t.join()
        assert codes.count(a2a.RATE_LIMITED) > len(codes) // 2, "the flood is mostly refused"
        took = time.monotonic() - started
        assert codes.count(None) <= 50 + 50 * took + 5, "at most the rate (plus its burst) passes"
        assert b.counters["rate_limited"] == codes.count(a2a.RATE_LIMITED)
        assert sorted(lat)[len(lat) // 2] < 0.5, "the calm run is served while the flood runs"
        assert "protocol.rate" in findings(b, "flood")
    finally:
        b.close()
        store.close()


def test_the_http_binding_posts_json_rpc_and_serves_cards(broker):
    pair(broker)
    h = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=10)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))          # named in the table before the broker sees it
    broker.table.peers[("tcp", s.getsockname()[1])] = Peer(uid=0, cgroup="/agentwatch/run-a", run_id="run-a")
    s.connect(("127.0.0.1", broker.port))
    h.sock = s
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": msg()}})
    h.request("POST", "/a2a/b", body, {"Content-Type": "application/json"})
    r = h.getresponse()
    out = json.loads(r.read())
    assert r.status == 200 and out["result"]["task"]["metadata"]["agentwatch"]["assignee"] == "b", out
    h.request("GET", "/a2a/b/.well-known/agent-card.json")
    r = h.getresponse()
    card = json.loads(r.read())
    assert r.status == 200 and card["name"] == "b" and card["agentwatch"]["run_id"] == "run-b"
    h.request("POST", "/", b"{broken", {"Content-Type": "application/json"})
    r = h.getresponse()
    assert json.loads(r.read())["error"]["code"] == a2a.PARSE_ERROR
    h.close()


@pytest.fixture
def mem_broker(broker, tmp_path):
    from agentwatch.harness.memory import MemoryStore
    broker.memory = MemoryStore(str(tmp_path / "m.db"))
    yield broker
    broker.memory.close()


def test_memory_on_the_socket_namespaces_checks_and_bad_input(mem_broker, tmp_path):
    b = mem_broker
    ok_file, secret = tmp_path / "ok.txt", tmp_path / "secret.txt"
    ok_file.write_text("fine")
    secret.write_text("hidden")
    (tmp_path / "link").symlink_to(secret)
    a = add_run(b, "a", Peers())
    a.check_read = lambda p: "outside filesystem.read" if "secret" in p else None
    add_run(b, "b", Peers())
    ca, cb = Conn(b, "run-a"), Conn(b, "run-b")
    rec = ca.ok("memory.put", text="the build uses make", tag="fact",
                provenance={"files": [{"path": str(ok_file)}]})
    assert rec["agent"] == "a" and rec["validity"] == "valid"
    assert rec["provenance"]["files"][0]["sha256"] == __import__("hashlib").sha256(b"fine").hexdigest()
    # provenance the agent may not read: refused, also through a symlink, and reported
    for path in (secret, tmp_path / "link"):
        e = ca.call("memory.put", text="x", provenance={"files": [{"path": str(path)}]})["error"]
        assert e["code"] == a2a.PERMISSION_DENIED and e["data"]["rule"] == "filesystem.read", e
    assert findings(b, "a") == ["filesystem.read", "filesystem.read"]
    # isolation: b gets nothing of a's
    assert "error" in cb.call("memory.get", id=rec["id"])
    assert "error" in cb.call("memory.get", id=rec["id"], agent="a")
    assert cb.ok("memory.search", query="build make")["records"] == []
    assert [r["id"] for r in ca.ok("memory.search", query="build make")["records"]] == [rec["id"]]
    # bad input: a huge record, an unknown tag, malformed JSON-RPC; the connection lives on
    e = ca.call("memory.put", text="x" * (65 * 1024))["error"]
    assert e["code"] == a2a.INVALID_PARAMS and "65536" in e["message"].replace(",", ""), e
    e = ca.call("memory.put", text="x", tag="rumour")["error"]
    assert e["code"] == a2a.INVALID_PARAMS and "rumour" in e["message"], e
    assert ca.raw(b'{"jsonrpc": "2.0", "id": 1, "method": "memory.put", "params": [1]}\n')["error"]["code"] \
        == a2a.INVALID_REQUEST
    assert ca.ok("memory.get", id=rec["id"])["validity"] == "valid"
    # concurrent writers through the socket: every put is stored once
    def writer(k):
        c = Conn(b, "run-b")
        for i in range(25):
            c.ok("memory.put", text=f"note {k} {i}")
        c.close()
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cb.ok("memory.list", pageSize=1000)["records"]) == 100
    # the operator only may gc
    assert cb.call("memory.gc")["error"]["code"] == a2a.PERMISSION_DENIED


def test_memory_writes_commit_in_the_memory_stores_own_writer(mem_broker):
    """memory.put goes through the memory store's group commit, not the
    broker store's (whose batches and fsyncs it would otherwise wait on)."""
    b = mem_broker
    add_run(b, "a", Peers())
    Conn(b, "run-a").ok("memory.put", text="a note")
    assert b.memory._writer is not None and b.memory._writer.name == "aw-memory-store"
    assert b.store._writer is None, "the broker store's writer was not needed"


def test_memory_put_bounds_what_it_reads_and_tells_missing_from_forbidden(mem_broker, tmp_path):
    """The broker hashes provenance as the caller may read it: the list is
    bounded before any file is read, each file is read once, and a file
    that is not there is bad input, not a policy violation."""
    b = mem_broker
    a = add_run(b, "a", Peers())
    a.check_read = lambda p: None
    f = tmp_path / "f.txt"
    f.write_text("x")
    c = Conn(b, "run-a")
    e = c.call("memory.put", text="x", provenance={"files": [{"path": str(f)}] * 257})["error"]
    assert e["code"] == a2a.INVALID_PARAMS and "257 files, more than the 256" in e["message"], e
    rec = c.ok("memory.put", text="x", provenance={"files": [{"path": str(f)}] * 256})
    assert len(rec["provenance"]["files"]) == 1
    e = c.call("memory.put", text="x", provenance={"files": [{"path": str(tmp_path / "gone")}]})["error"]
    assert e["code"] == a2a.INVALID_PARAMS and "cannot be read" in e["message"], e
    e = c.call("memory.put", text="x", provenance={"files": [{"path": str(tmp_path)}]})["error"]
    assert e["code"] == a2a.INVALID_PARAMS and "not a regular file" in e["message"], e
    assert findings(b, "a") == [], "bad input is no violation"


def test_a_client_that_never_reads_its_answers_is_closed_and_stalls_no_other(tmp_path):
    """Requests sent flat out by a client that reads nothing: once the
    answers fill the socket and the broker's buffer, the broker waits
    write_timeout_s for the client to take them, then closes it (counted
    slow_closed); another client is served meanwhile."""
    table = Table()
    store = Store(str(tmp_path / "b.db"))
    b = Broker(store, Signer.load_or_create(str(tmp_path / "k.pem")), str(tmp_path / "b.sock"),
               limits=Limits(default_rate=10 ** 6, write_timeout_s=0.5), resolve_caller=table).start()
    b.table, b.records, b.tool_calls = table, {}, []
    try:
        add_run(b, "mute")
        add_run(b, "calm")
        mute, calm = Conn(b, "run-mute"), Conn(b, "run-calm")
        mute.sock.setblocking(False)
        req = b'{"jsonrpc":"2.0","id":1,"method":"agentwatch.Whoami","params":{}}\n' * 100
        sent, deadline = 0, time.monotonic() + 20
        while b.counters.get("slow_closed", 0) == 0 and time.monotonic() < deadline:
            try:
                sent += mute.sock.send(req)
            except BlockingIOError:             # the broker stopped reading us: it waits to write
                time.sleep(0.05)
                assert calm.ok("agentwatch.Whoami")["run_id"] == "run-calm"
            except (BrokenPipeError, ConnectionResetError):
                break
        wait_until = time.monotonic() + 5
        while b.counters.get("slow_closed", 0) == 0 and time.monotonic() < wait_until:
            time.sleep(0.05)
        assert b.counters.get("slow_closed") == 1, (sent, dict(b.counters))
        assert calm.ok("agentwatch.Whoami")["run_id"] == "run-calm"
        mute.close()
        calm.close()
    finally:
        b.close()
        store.close()
