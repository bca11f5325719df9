"""Issue #19 end to end: agents' memory on the daemon's broker socket, with
validity the kernel keeps apart from recency. Real runs, real files:

- a record derived from a file goes stale within 1 s after a process
  outside any run (this test) changes the file, with that evidence;
- and within 1 s after the agent itself changes one, the evidence naming
  its run;
- reading a stale record leaves it stale (its recency moves);
- only an explicit verify makes it valid again, once the hash matches;
- provenance on a file the agent's policy does not let it read is refused;
- another agent can read nothing of it through the broker."""
import json
import os
import subprocess
import sys
import time

import pytest

from agentwatch.harness.broker_client import Client
from conftest import REPO, aw, aw_cmd, own_daemon, read_events

pytestmark = pytest.mark.kernel

POLICY = """\
apiVersion: agentwatch/v1
kind: AgentPolicy
metadata: {{name: mem-{name}}}
filesystem:
  read: ["/usr/**", "/lib/**", "/lib64/**", "/etc/**", "/bin/**", "/dev/null", "/proc/**",
         "{shared}/**", "{repo}/**", "{prefix}/**"]
  write: ["{shared}/**"]
network: {{allow: [], loopback: false, unix: true}}
"""

AGENT = r'''
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.environ["AGENTWATCH_BROKER_CLIENT"]))
import broker_client as bc
me, shared, secret = sys.argv[1], sys.argv[2], sys.argv[3]
c = bc.Client()
out = {}
def path(n): return os.path.join(shared, n)
def put(n, data):
    with open(path(n) + ".tmp", "w") as f: json.dump(data, f)
    os.replace(path(n) + ".tmp", path(n))
def wait(n, t=60):
    end = time.time() + t
    while not os.path.exists(path(n)):
        if time.time() > end: raise SystemExit(f"{me}: no {n}")
        time.sleep(0.02)
    with open(path(n)) as f: return json.load(f)
def attempt(fn, *a, **k):
    try: return {"ok": fn(*a, **k)}
    except bc.BrokerError as e: return {"code": e.code, "rule": e.rule, "message": e.message}
if me == "m":
    r1 = c.call("memory.put", text="the build uses make", tag="fact",
                provenance={"files": [{"path": path("f1.txt")}]})
    r2 = c.call("memory.put", text="tests live in tests/", provenance={"files": [{"path": path("f2.txt")}]})
    out["r1"], out["r2"] = r1, r2
    out["secret"] = attempt(c.call, "memory.put", text="x", provenance={"files": [{"path": secret}]})
    put("ids", {"r1": r1["id"], "r2": r2["id"]})
    # the agent changes f2 itself: stale within 1 s, naming this run
    t0 = time.monotonic()
    with open(path("f2.txt"), "a") as f: f.write("more\n")
    while c.call("memory.get", id=r2["id"])["validity"] == "valid" and time.monotonic() - t0 < 5:
        time.sleep(0.01)
    out["self_stale_s"] = time.monotonic() - t0
    out["r2_after"] = c.call("memory.get", id=r2["id"])
    wait("outsider-done")
    a = c.call("memory.get", id=r1["id"]); b = c.call("memory.get", id=r1["id"])
    out["r1_read_twice"] = [a, b]
    out["search"] = c.call("memory.search", query="build make")["records"]
    out["search_valid"] = c.call("memory.search", query="build make", valid_only=True)["records"]
    put("m-done", {})
    wait("n-done")
else:
    ids = wait("ids")
    out["get_other"] = attempt(c.call, "memory.get", id=ids["r1"])
    out["get_other_named"] = attempt(c.call, "memory.get", id=ids["r1"], agent="m")
    out["search_other"] = c.call("memory.search", query="build make")["records"]
    put("n-done", {})
put(me, out)
'''


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    yield from own_daemon(tmp_path_factory, "memd")


def _start(name, tmp_path, env, shared, secret):
    pol = tmp_path / f"{name}.yaml"
    pol.write_text(POLICY.format(name=name, shared=shared, repo=REPO,
                                 prefix=sys.prefix if sys.prefix != "/usr" else "/usr"))
    ev = tmp_path / f"{name}.jsonl"
    cmd = aw_cmd() + ["run", "--daemon", "--name", name, "--policy", str(pol), "--events", str(ev),
                      "--allow-downgrade", "--", sys.executable, str(tmp_path / "agent.py"), name, str(shared),
                      str(secret)]
    return subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), ev


def test_records_go_stale_when_their_files_change_and_only_verify_brings_them_back(tmp_path, daemon):
    _state, env = daemon
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    (shared / "f1.txt").write_text("all: build\n")
    (shared / "f2.txt").write_text("tests/\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for agents\n")
    (tmp_path / "agent.py").write_text(AGENT)
    m, m_ev = _start("m", tmp_path, env, shared, secret)
    n, _n_ev = _start("n", tmp_path, env, shared, secret)
    try:
        deadline = time.monotonic() + 120
        while not (shared / "ids").exists():
            assert m.poll() is None, m.communicate()
            assert time.monotonic() < deadline, "the agent put no records"
            time.sleep(0.05)
        r1 = json.loads((shared / "ids").read_text())["r1"]
        # an outsider (this test: in no run) changes f1
        t0 = time.monotonic()
        with open(shared / "f1.txt", "a") as f:
            f.write("more\n")
        shown = None
        with Client(path=str(_state / "broker" / "broker.sock")) as op:      # the operator: root, in no run
            while time.monotonic() - t0 < 5:
                shown = op.call("memory.get", id=r1)
                if shown["validity"] != "valid":
                    break
                time.sleep(0.005)
        outsider_s = time.monotonic() - t0
        (shared / "outsider-done").write_text("{}")
        for p in (m, n):
            so, se = p.communicate(timeout=120)
            assert p.returncode == 0, so + se
    finally:
        for p in (m, n):
            if p.poll() is None:
                p.kill()
                p.wait()
    out_m = json.loads((shared / "m").read_text())
    out_n = json.loads((shared / "n").read_text())
    run_m = read_events(m_ev)[0]["run_id"]

    # an outsider's write: stale within 1 s (the CLI round trips are in that second too)
    assert shown["validity"] == "stale" and outsider_s < 1.0, (outsider_s, shown)
    ev = shown["stale_event"]
    assert ev["by"] == "outsider" and ev["op"] in ("write", "truncate") and ev["path"] == str(shared / "f1.txt")
    # the agent's own write: stale within 1 s, naming its run
    assert out_m["self_stale_s"] < 1.0, out_m["self_stale_s"]
    ev2 = out_m["r2_after"]["stale_event"]
    assert out_m["r2_after"]["validity"] == "stale" and ev2["by"] == "agent" and ev2["run"] == run_m, ev2
    # reads never refresh validity; recency moves
    a, b = out_m["r1_read_twice"]
    assert a["validity"] == b["validity"] == "stale" and b["last_accessed_at"] >= a["last_accessed_at"]
    assert [r["id"] for r in out_m["search"]] == [r1] and out_m["search"][0]["validity"] == "stale"
    assert out_m["search_valid"] == []
    # provenance outside the agent's read rights is refused
    assert out_m["secret"]["rule"] == "filesystem.read", out_m["secret"]
    # another agent reads nothing of m's
    assert "code" in out_n["get_other"] and "code" in out_n["get_other_named"], out_n
    assert out_n["search_other"] == []
    # verify: still stale while the file differs; valid once its hash matches again
    r = aw("memory", "verify", r1, env=env)
    assert r.returncode == 1 and "stale" in r.stdout, r.stdout + r.stderr
    (shared / "f1.txt").write_text("all: build\n")
    r = aw("memory", "verify", r1, env=env)
    assert r.returncode == 0 and "valid" in r.stdout, r.stdout + r.stderr
    shown = json.loads(aw("memory", "show", r1, env=env).stdout)
    assert shown["validity"] == "valid" and [c["result"] for c in shown["checks"]] == ["stale", "valid"]
    r = aw("memory", "ls", "--agent", "m", env=env)
    assert r.returncode == 0 and "stale" in r.stdout and "valid" in r.stdout, r.stdout
