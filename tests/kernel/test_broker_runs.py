"""Issue #18 end to end: the daemon's agent-to-agent broker between real
runs under real policies. Three agents, a, b and c, run at once on one
daemon; the policies allow a <-> b only, and a's policy declares a tool
(wc) it may grant to b. Each agent is a script using the standard-library
client (AGENTWATCH_BROKER_CLIENT) and nothing it says about itself.

Asserted, from what the agents got back and from their runs' logs:
- b sees a's message with a's run identity, named by the kernel;
- c, which no policy allows, is refused (protocol.peer); a's message to c too;
- a's message that claims to come from c is refused (identity.sender);
- b's forward of a's message with one fact changed is refused (protocol.facts),
  the unchanged forward passes;
- a's token for b works within its scope, ran inside a's sandbox (a's run
  logs the tool's exec), and is refused outside its scope, widened,
  replayed, after expiry, tampered with, presented by c (stolen), and after
  a's run ended (revoked), each with its own rule on the presenting run.
Then a kill -9 of the daemon while an agent sends: after a restart, every
message the broker acknowledged is in the store."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import REPO, aw, aw_cmd, own_daemon, read_events, wait_for

sys.path.insert(0, REPO)
from bench.lib import process_gone  # noqa: E402  (a zombie counts: we may be its subreaper)

pytestmark = pytest.mark.kernel

POLICY = """\
apiVersion: agentwatch/v1
kind: AgentPolicy
metadata: {{name: peer-{name}}}
filesystem:
  read: ["/usr/**", "/lib/**", "/lib64/**", "/etc/**", "/bin/**", "/dev/null", "/proc/**",
         "{shared}/**", "{repo}/**", "{prefix}/**"]
  write: ["{shared}/**"]
network:
  allow: []
  loopback: false
  unix: true
peers:
{peers}
on_violation:
  default: alert
"""

PEERS = {
    "a": """  skills: [planning]
  send: [b, c]
  receive: [b]
  grant: [wc]
  tools:
    wc: {argv: [/usr/bin/wc, -c], timeout: 20s}""",
    "b": """  skills: [{name: review, description: reviews patches}]
  send: [a]
  receive: [a]
  accept: [wc]""",
    "c": """  send: [b]
  receive: [a]
  accept: [wc]""",
}

AGENT = r'''
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.environ["AGENTWATCH_BROKER_CLIENT"]))
import broker_client as bc
me, shared = sys.argv[1], sys.argv[2]
c = bc.Client()
out = {"whoami": c.whoami()}
def path(n): return os.path.join(shared, n)
def put(n, data):
    with open(path(n) + ".tmp", "w") as f: json.dump(data, f)
    os.replace(path(n) + ".tmp", path(n))
def wait(n, t=90):
    end = time.time() + t
    while not os.path.exists(path(n)):
        if time.time() > end: raise SystemExit(f"{me}: no {n}")
        time.sleep(0.05)
    with open(path(n)) as f: return json.load(f)
def attempt(fn, *a, **k):
    try:
        return {"ok": fn(*a, **k)}
    except bc.BrokerError as e:
        return {"code": e.code, "rule": e.rule, "message": e.message}
def live(name):
    try: c.card(name); return True
    except bc.BrokerError: return False
def done():
    put(me, out)
if me == "a":
    while not (live("b") and live("c")): time.sleep(0.05)
    out["card_b"] = c.card("b")
    out["to_b"] = attempt(c.send, "b", "please review", facts={"ticket": 42, "branch": "fix-1"},
                          context="long background that may be summarised")
    out["to_c"] = attempt(c.send, "c", "hello c")
    msg = {"messageId": "claims-c", "role": "ROLE_USER", "parts": [{"text": "from c, honest"}],
           "metadata": {"sender": "c"}}
    out["claim_c"] = attempt(c.call, "SendMessage", message=msg, recipient="b")
    ws = os.environ["AW_WS"]
    t1 = c.mint("b", "wc", paths=[ws + "/**"], uses=3, ttl=120)
    t2 = c.mint("b", "wc", paths=[ws + "/**"], uses=1, ttl=1)
    out["grant_sh"] = attempt(c.mint, "b", "sh")
    put("tokens", {"t1": t1, "t2": t2, "file": ws + "/data.txt"})
    wait("b-phase1")
    done()
elif me == "b":
    msgs = []
    while not msgs:
        msgs = [m for m in c.inbox()["messages"] if m["metadata"]["agentwatch"]["sender"]["agent"] == "a"]
        time.sleep(0.05)
    m = msgs[0]
    out["got"] = m
    changed = [dict(p, data={"ticket": 43}) if p.get("data") == {"ticket": 42} else p
               for p in m["parts"] if (p.get("metadata") or {}).get("tag") == "fact"]
    out["forward_changed"] = attempt(c.send, "a", parts=changed, forward_of=m["messageId"])
    out["forward_same"] = attempt(c.forward, m, "a", extra_text="summary: review it")
    tk = wait("tokens")
    t1, t2, f = tk["t1"], tk["t2"], tk["file"]
    out["use_ok"] = attempt(c.call_tool, t1, [f])
    out["use_outside"] = attempt(c.call_tool, t1, ["/etc/passwd"])
    out["widen"] = attempt(c.attenuate, t1, scope={"tool": "wc", "paths": ["/**"]})
    narrow = attempt(c.attenuate, t1, scope={"tool": "wc", "paths": [f]}, uses=1)
    out["narrow"] = narrow
    out["narrow_use"] = attempt(c.call_tool, narrow.get("ok"), [f]) if "ok" in narrow else None
    out["first"] = attempt(c.call_tool, t1, [f], nonce="n-0123456789")
    out["replay"] = attempt(c.call_tool, t1, [f], nonce="n-0123456789")
    time.sleep(1.5)
    out["expired"] = attempt(c.call_tool, t2, [f])
    head, payload, sig = t1.split(".")
    import base64
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["scope"]["paths"] = ["/**"]
    forged = ".".join([head, base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("="), sig])
    out["tampered"] = attempt(c.call_tool, forged, ["/etc/passwd"])
    out["garbage"] = attempt(c.call_tool, "not-a-token", [])
    put("stolen", {"t1": t1, "file": f})
    wait("c")
    put("b-phase1", {})
    while live("a"): time.sleep(0.05)
    out["after_a"] = attempt(c.call_tool, t1, [f])
    done()
elif me == "c":
    while not live("b"): time.sleep(0.05)
    out["to_b"] = attempt(c.send, "b", "let me in")
    st = wait("stolen")
    out["stolen"] = attempt(c.call_tool, st["t1"], [st["file"]])
    done()
'''


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    yield from own_daemon(tmp_path_factory, "brokerd")


def _start(name, tmp_path, env, shared, extra=()):
    ws = tmp_path / f"ws-{name}"
    ws.mkdir(exist_ok=True)
    (ws / "data.txt").write_text("twelve bytes")
    pol = tmp_path / f"{name}.yaml"
    pol.write_text(POLICY.format(name=name, shared=shared, repo=REPO, peers=PEERS[name],
                                 prefix=sys.prefix if sys.prefix != "/usr" else "/usr"))
    pol = pol.read_text().replace(f'"{shared}/**"]', f'"{shared}/**", "{ws}/**"]', 1)
    (tmp_path / f"{name}.yaml").write_text(pol)
    ev = tmp_path / f"{name}.events.jsonl"
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    cmd = aw_cmd() + ["run", "--daemon", "--name", name, "--policy", str(tmp_path / f"{name}.yaml"),
                      "--workspace", str(ws), "--events", str(ev), "--allow-downgrade", *extra, "--",
                      sys.executable, str(script), name, str(shared)]
    p = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, AW_WS=str(ws), **env),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p, ev


def _violations(ev):
    return [e for e in read_events(ev) if e["kind"] == "violation" and e["detail"].get("layer") == "broker"]


def test_three_runs_messages_and_tokens(tmp_path, daemon):
    _state, env = daemon
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    procs = {n: _start(n, tmp_path, env, shared) for n in ("b", "c", "a")}
    outs = {}
    for n, (p, _ev) in procs.items():
        try:
            so, se = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q, _ in procs.values():
                q.kill()
            raise
        outs[n] = (p.returncode, so, se)
    for n, (rc, so, se) in outs.items():
        assert rc == 0, f"{n}: {so}\n{se}"
    res = {n: json.loads((shared / n).read_text()) for n in ("a", "b", "c")}
    a, b, c = res["a"], res["b"], res["c"]
    ev = {n: procs[n][1] for n in procs}
    run = {n: read_events(ev[n])[0]["run_id"] for n in ev}

    # who is who: the kernel's word
    assert a["whoami"]["agent"] == "a" and a["whoami"]["run_id"] == run["a"]
    assert a["whoami"]["cgroup"].endswith(run["a"])
    assert a["card_b"]["name"] == "b" and a["card_b"]["agentwatch"]["run_id"] == run["b"]
    assert a["card_b"]["skills"][0]["name"] == "review"
    # a -> b delivered; b sees a's run identity
    assert "ok" in a["to_b"], a["to_b"]
    sender = b["got"]["metadata"]["agentwatch"]["sender"]
    assert sender["agent"] == "a" and sender["run_id"] == run["a"] and sender["cgroup"].endswith(run["a"])
    assert b["got"]["metadata"]["agentwatch"]["facts_digest"].startswith("sha256:")
    # not allowed: a -> c (b only receives... c's policy does receive a, a's send lists c: allowed),
    # c -> b (b's receive lists only a)
    assert "ok" in a["to_c"], a["to_c"]
    assert c["to_b"]["rule"] == "protocol.peer", c["to_b"]
    assert a["claim_c"]["rule"] == "identity.sender", a["claim_c"]
    # facts: changed refused, unchanged passes
    assert b["forward_changed"]["rule"] == "protocol.facts", b["forward_changed"]
    assert "ok" in b["forward_same"], b["forward_same"]
    # tokens
    assert b["use_ok"]["ok"]["exitCode"] == 0 and b["use_ok"]["ok"]["stdout"].startswith("12"), b["use_ok"]
    assert b["use_ok"]["ok"]["ranIn"]["run_id"] == run["a"]
    assert b["use_outside"]["rule"] == "protocol.token_scope", b["use_outside"]
    assert b["widen"]["rule"] == "protocol.token_widened", b["widen"]
    assert "ok" in b["narrow"] and b["narrow_use"]["ok"]["exitCode"] == 0, (b["narrow"], b["narrow_use"])
    assert "ok" in b["first"], b["first"]
    assert b["replay"]["rule"] == "protocol.token_replayed", b["replay"]
    assert b["expired"]["rule"] == "protocol.token_expired", b["expired"]
    assert b["tampered"]["rule"] == "protocol.token_invalid", b["tampered"]
    assert b["garbage"]["rule"] == "protocol.token_invalid", b["garbage"]
    assert c["stolen"]["rule"] == "protocol.token_holder", c["stolen"]
    assert b["after_a"]["rule"] == "protocol.token_revoked", b["after_a"]
    assert a["grant_sh"]["rule"] == "protocol.grant", a["grant_sh"]

    # each refusal is a violation on the presenting run, with its rule
    rules = {n: sorted({v["rule"] for v in _violations(ev[n])}) for n in ev}
    assert rules["a"] == ["identity.sender", "protocol.grant"], rules
    assert rules["b"] == ["protocol.facts", "protocol.token_expired", "protocol.token_invalid",
                          "protocol.token_replayed", "protocol.token_revoked", "protocol.token_scope",
                          "protocol.token_widened"], rules
    assert rules["c"] == ["protocol.peer", "protocol.token_holder"], rules
    # the tool ran inside a's sandbox: a's run saw its exec, and logged the call
    a_events = read_events(ev["a"])
    assert any(e["kind"] == "exec" and e.get("filename") == "/usr/bin/wc" for e in a_events)
    assert any(e["kind"] == "msg" and e["op"] == "tool" and e["peer"] == "b" for e in a_events)
    b_events = read_events(ev["b"])
    assert any(e["kind"] == "msg" and e["op"] == "receive" and e["peer_run"] == run["a"] for e in b_events)
    # a's run end revoked its tokens: its end event counts them
    a_end = next(e for e in a_events if e["kind"] == "lifecycle" and e["phase"] == "end")
    assert a_end["detail"]["kernel_denials"]["broker"]["tokens_revoked"] >= 2, a_end["detail"]

    # the operator's command line: every agent's inbox and tasks, tokens offline
    r = aw("msg", "inbox", "--agent", "b", env=env)
    assert r.returncode == 0 and f"from a (run {run['a']})" in r.stdout, r.stdout + r.stderr
    r = aw("msg", "tasks", "--agent", "a", "--json", env=env)
    assert r.returncode == 0 and any(t["metadata"]["agentwatch"]["assignee"] == "b" for t in json.loads(r.stdout))
    t1 = json.loads((shared / "tokens").read_text())["t1"]
    r = aw("token", "inspect", t1, env=env)
    assert r.returncode == 0 and "signature: valid" in r.stdout and f"run {run['b']}" in r.stdout, r.stdout
    forged = t1[:-4] + ("AAAA" if not t1.endswith("AAAA") else "BBBB")
    assert "signature: invalid" in aw("token", "inspect", forged, env=env).stdout
    r = aw("msg", "send", "b", "hello", env=env)           # no live run of b any more
    assert r.returncode != 0 and "no live run of agent 'b'" in r.stderr, r.stderr
    st = aw("daemon", "status", env=env)
    assert "broker: " in st.stdout and "message(s) stored" in st.stdout, st.stdout


DURABLE = r'''
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.environ["AGENTWATCH_BROKER_CLIENT"]))
import broker_client as bc
c = bc.Client()
while True:
    try: c.card("sink"); break
    except bc.BrokerError: time.sleep(0.05)
acked = open(sys.argv[1], "a")
i = 0
while True:
    mid = f"m-{i:06d}"
    try:
        c.call("SendMessage", recipient="sink", message={"messageId": mid, "role": "ROLE_USER",
                                                         "parts": [{"text": f"n {i}"}]})
    except Exception:
        break
    acked.write(mid + "\n"); acked.flush(); os.fsync(acked.fileno())
    i += 1
'''


def test_kill_9_of_the_daemon_loses_no_acknowledged_message(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    env = {"AGENTWATCH_STATE_DIR": str(state)}
    r = aw("daemon", "start", env=env, timeout=180)
    assert r.returncode == 0, r.stderr
    try:
        ids = _send_until_killed(tmp_path, env)
        r = aw("daemon", "start", env=env, timeout=180)
        assert r.returncode == 0, r.stderr
        got = set()
        after = 0
        while True:
            r = aw("msg", "inbox", "--agent", "sink", "--after", str(after), "--limit", "1000", "--json", env=env)
            assert r.returncode == 0, r.stderr
            rows = [json.loads(ln) for ln in r.stdout.splitlines() if ln.strip()]
            if not rows:
                break
            got |= {m["messageId"] for m in rows}
            after = rows[-1]["seq"]
        missing = [m for m in ids if m not in got]
        assert not missing, f"{len(missing)} of {len(ids)} acknowledged messages lost: {missing[:5]}"
        assert len(ids) >= 200
    finally:
        aw("daemon", "stop", env=env, timeout=60)


def _send_until_killed(tmp_path, env):
    """An agent sends to another until the daemon is killed (-9) under it;
    the messageIds the broker acknowledged."""
    pid = int(re.search(r"pid (\d+)", aw("daemon", "status", env=env).stdout).group(1))
    shared = tmp_path / "shared"
    shared.mkdir()
    pol = tmp_path / "p.yaml"
    pol.write_text("apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: durable}\n"
                   "peers: {send: [sink], receive: ['*'], rate: 100000}\n")
    (tmp_path / "d.py").write_text(DURABLE)
    acked = shared / "acked"
    base = aw_cmd() + ["run", "--daemon", "--policy", str(pol), "--allow-downgrade"]
    full = dict(os.environ, PYTHONPATH=REPO, **env)
    sink = subprocess.Popen(base + ["--name", "sink", "--", "sleep", "120"], cwd=REPO, env=full,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sender = subprocess.Popen(base + ["--name", "sender", "--", sys.executable, str(tmp_path / "d.py"),
                                      str(acked)], cwd=REPO, env=full,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: acked.exists() and len(acked.read_text().split()) >= 200, timeout=120,
                 what="200 acknowledged messages")
        os.kill(pid, signal.SIGKILL)           # our own daemon, by its pid
        wait_for(lambda: process_gone(pid), timeout=30, what="the daemon's end")
    finally:
        for p in (sender, sink):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return acked.read_text().split()


FLOOD = r'''
import json, os, socket, sys, time
sys.path.insert(0, os.path.dirname(os.environ["AGENTWATCH_BROKER_CLIENT"]))
import broker_client as bc
me, shared = sys.argv[1], sys.argv[2]
out = {}
def live(c, name):
    try: c.card(name); return True
    except bc.BrokerError: return False
if me == "flood":
    c = bc.Client()
    while not live(c, "calm"): time.sleep(0.05)
    s = socket.socket(socket.AF_UNIX); s.connect(os.environ["AGENTWATCH_BROKER"]); f = s.makefile("rb")
    def raw(data):
        s.sendall(data); return json.loads(f.readline())
    out["malformed"] = raw(b"{oops\n")["error"]["code"]
    out["deep"] = raw(b'{"jsonrpc":"2.0","id":1,"method":"SendMessage","params":' + b"[" * 50000
                      + b"]" * 50000 + b"}\n")["error"]["code"]
    out["garbage_token"] = raw(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "agentwatch.CallTool",
                                           "params": {"token": "x" * 9000, "nonce": "n" * 16}}).encode()
                               + b"\n")["error"]["data"]["rule"]
    codes = {}
    end = time.time() + 3
    while time.time() < end:
        try:
            c.whoami(); codes["ok"] = codes.get("ok", 0) + 1
        except bc.BrokerError as e:
            codes[str(e.code)] = codes.get(str(e.code), 0) + 1
    out["codes"] = codes
    big = {"jsonrpc": "2.0", "id": 3, "method": "SendMessage",
           "params": {"recipient": "calm", "message": {"messageId": "big", "role": "ROLE_USER",
                                                        "parts": [{"text": "x" * (2 << 20)}]}}}
    try:
        s.sendall(json.dumps(big).encode() + b"\n")
    except OSError:
        pass
    out["oversized"] = json.loads(f.readline())["error"]["code"]
else:
    c = bc.Client(url=os.environ["AGENTWATCH_BROKER_URL"])    # the HTTP binding, through the relay
    while not live(c, "flood"): time.sleep(0.05)
    out["whoami"] = c.whoami()
    lat = []
    end = time.time() + 2.5
    while time.time() < end:
        t0 = time.monotonic(); c.whoami(); lat.append(time.monotonic() - t0)
    lat.sort()
    out["n"], out["p50"] = len(lat), lat[len(lat) // 2]
with open(os.path.join(shared, me), "w") as fh:
    json.dump(out, fh)
'''

FLOOD_POLICY = """\
apiVersion: agentwatch/v1
kind: AgentPolicy
metadata: {{name: {name}}}
network:
  allow: []
  loopback: false
  unix: {unix}
peers: {{send: ['*'], receive: ['*'], rate: {rate}}}
"""


def test_bad_input_and_a_flood_from_one_run_leave_the_others_served(tmp_path, daemon):
    """Real runs: one sends malformed, deeply nested, oversized requests and
    a garbage token, then floods past its peers.rate; each gets its JSON-RPC
    error, the flood is refused and reported (protocol.rate), and another
    run, on the HTTP binding through its network namespace's relay (its
    policy refuses unix sockets), is served throughout, named by the kernel."""
    _state, env = daemon
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    (tmp_path / "f.py").write_text(FLOOD)
    procs = {}
    for name, unix, rate in (("flood", "true", 20), ("calm", "false", 100000)):
        pol = tmp_path / f"{name}.yaml"
        pol.write_text(FLOOD_POLICY.format(name=name, unix=unix, rate=rate))
        ev = tmp_path / f"{name}.jsonl"
        cmd = aw_cmd() + ["run", "--daemon", "--name", name, "--policy", str(pol), "--events", str(ev),
                          "--allow-downgrade", "--", sys.executable, str(tmp_path / "f.py"), name, str(shared)]
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, **env),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), ev)
    for name, (p, _ev) in procs.items():
        so, se = p.communicate(timeout=180)
        assert p.returncode == 0, f"{name}: {so}\n{se}"
    flood = json.loads((shared / "flood").read_text())
    calm = json.loads((shared / "calm").read_text())
    assert flood["malformed"] == -32700 and flood["deep"] == -32600, flood
    assert flood["garbage_token"] == "protocol.token_invalid", flood
    assert flood["oversized"] == -32015, flood
    codes = flood["codes"]
    assert codes.get("-32011", 0) > 10 * codes.get("ok", 0), codes      # rate 20/s over 3 s
    assert codes.get("ok", 0) <= 20 + 20 * 4, codes
    calm_run = read_events(procs["calm"][1])[0]["run_id"]
    assert calm["whoami"]["run_id"] == calm_run and calm["whoami"]["transport"] == "http", calm
    assert calm["n"] > 100 and calm["p50"] < 0.05, calm
    rules = [v["rule"] for v in _violations(procs["flood"][1])]
    assert "protocol.rate" in rules and "protocol.token_invalid" in rules, rules
    assert 1 <= rules.count("protocol.rate") <= 6, "reported at most once a second"
    assert not _violations(procs["calm"][1])


DONE_BY_MESSAGE = r'''
import os, sys, time
sys.path.insert(0, os.path.dirname(os.environ["AGENTWATCH_BROKER_CLIENT"]))
import broker_client as bc
me, flag = sys.argv[1], sys.argv[2]
c = bc.Client()
if me == "boss":
    while not os.path.exists(flag): time.sleep(0.05)
else:
    while True:
        try: c.card("boss"); break
        except bc.BrokerError: time.sleep(0.05)
    c.send("boss", "progress so far")                 # not the tag: the run goes on
    c.call("SendMessage", recipient="boss", message={"messageId": "result-1", "role": "ROLE_AGENT",
           "parts": [{"text": "all tests pass"}], "metadata": {"tag": "result"}})
    time.sleep(60)                                    # the run must end without this
'''


def test_a_tagged_message_to_the_named_recipient_ends_the_run_as_done(tmp_path, daemon):
    """termination.done's message condition (issue #20): the worker's run is
    over once its message tagged 'result' reached boss, although its agent
    would sleep on; exit status 0, reason done, the message as evidence."""
    _state, env = daemon
    flag = tmp_path / "boss-may-go"
    (tmp_path / "agent.py").write_text(DONE_BY_MESSAGE)
    policies = {
        "boss": "peers: {receive: [worker]}\n",
        "worker": "peers: {send: [boss]}\ntermination: {done: [{message: {to: boss, tag: result}}], grace: 1s}\n"}
    procs = {}
    for name, body in policies.items():
        pol = tmp_path / f"{name}.yaml"
        pol.write_text(f"apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {{name: {name}}}\n{body}")
        ev = tmp_path / f"{name}.jsonl"
        cmd = aw_cmd() + ["run", "--daemon", "--name", name, "--policy", str(pol), "--events", str(ev),
                          "--allow-downgrade", "--", sys.executable, str(tmp_path / "agent.py"), name, str(flag)]
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, **env),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), ev)
    try:
        worker, wev = procs["worker"]
        so, se = worker.communicate(timeout=50)
        assert worker.returncode == 0, so + se
    finally:
        flag.write_text("")
        for p, _ in procs.values():
            try:
                p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    end = next(e for e in read_events(wev) if e["kind"] == "lifecycle" and e["phase"] == "end")
    term = end["detail"]["termination"]
    assert term["reason"] == "done" and term["condition"] == "termination.done[0]", term
    assert term["evidence"]["message_id"] == "result-1" and term["evidence"]["to"] == "boss", term
