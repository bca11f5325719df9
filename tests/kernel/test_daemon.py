"""agentwatch daemon: one loaded monitor that `agentwatch run` shares.

Real daemon, real CLI clients, real BPF: runs go through the socket at the
same time, each keeps its own events, stdio and exit status; the sandbox and
the seccomp refusals hold as in an embedded run; Ctrl-C, a vanished client
and `daemon stop` leave no agent, cgroup or BPF program behind."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, aw, aw_cmd, read_events, wait_for

sys.path.insert(0, REPO)
from bench.lib import process_gone  # noqa: E402

POLICIES = os.path.join(REPO, "policies")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """A daemon on its own state dir for this module; stopped at the end."""
    d = tmp_path_factory.mktemp("daemon") / "state"
    d.mkdir()
    env = {"AGENTWATCH_STATE_DIR": str(d)}
    r = aw("daemon", "start", env=env, timeout=180)
    assert r.returncode == 0, r.stderr + r.stdout
    pid = int(r.stdout.split("pid ")[1].split(",")[0])
    yield d, env
    stop = aw("daemon", "stop", env=env, timeout=60)
    _assert_gone(pid, d)
    assert stop.returncode == 0, stop.stderr


def _assert_gone(pid, state_dir):
    deadline = time.monotonic() + 30
    while not process_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not process_gone(pid):
        os.kill(pid, signal.SIGKILL)      # the daemon we started, by its id
        pytest.fail("the daemon did not stop")
    assert not os.path.exists(state_dir / "daemon.sock")


def _client(env, *args, **kw):
    return subprocess.Popen(aw_cmd() + ["run"] + list(args), cwd=kw.pop("cwd", REPO),
                            env=dict(os.environ, PYTHONPATH=REPO, **env), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _status(env):
    from agentwatch import daemon
    return daemon.ping(os.path.join(env["AGENTWATCH_STATE_DIR"], "daemon.sock"))


def _run_record(state_dir, run_id):
    with open(state_dir / "runs" / run_id / "run.json") as f:
        return json.load(f)


def test_concurrent_runs_keep_their_own_stdio_events_and_exit(daemon):
    state_dir, env = daemon
    a = _client(env, "--daemon", "--name", "agent-a", "--",
                "/bin/sh", "-c", "echo A-out; echo A-err >&2; sleep 2; exit 3")
    b = _client(env, "--daemon", "--name", "agent-b", "--", "/bin/sh", "-c", "cat; exit 5")
    # both runs live on the daemon at once (b waits for its stdin)
    st = wait_for(lambda: (lambda s: s if s and len(s["runs"]) == 2 else None)(_status(env)),
                   what="two runs on the daemon")
    assert {r["client"]["pid"] for r in st["runs"]} == {a.pid, b.pid}
    out_b, err_b = b.communicate("B-in\n", timeout=60)
    out_a, err_a = a.communicate(timeout=60)
    assert (a.returncode, b.returncode) == (3, 5), err_a + err_b
    assert out_a == "A-out\n" and "A-err" in err_a
    assert out_b == "B-in\n"
    runs = {}
    for line in (err_a, err_b):
        run_id = line.split("agentwatch: run ")[1].split()[0]
        runs[run_id] = read_events(state_dir / "runs" / run_id / "events.jsonl")
    by_agent = {evs[0]["agent"]: evs for evs in runs.values()}
    assert set(by_agent) == {"agent-a", "agent-b"}
    for agent, evs in by_agent.items():
        assert {e["agent"] for e in evs} == {agent}
        start = next(e for e in evs if e["kind"] == "lifecycle" and e["phase"] == "start")
        # who asked is the kernel's word (SO_PEERCRED), recorded in the identity
        client = start["detail"]["client"]
        assert client["pid"] == (a.pid if agent == "agent-a" else b.pid) and client["uid"] == 0
        execs = {os.path.basename(e["filename"]) for e in evs if e["kind"] == "exec" and e["ret"] == 0}
        # each log holds its own agent's programs, not the other's
        assert execs == ({"sh", "sleep"} if agent == "agent-a" else {"sh", "cat"}), execs
        end = next(e for e in evs if e["kind"] == "lifecycle" and e["phase"] == "end")
        assert end["detail"]["exit_status"] == (3 if agent == "agent-a" else 5)


def test_sandbox_holds_and_refusals_are_reported_on_the_daemon(daemon, tmp_path):
    """The client's HOME is the policy's ${HOME} (the daemon's is /root); a
    seccomp refusal is reported though the daemon loaded without it."""
    state_dir, env = daemon
    home, ws = tmp_path / "home", tmp_path / "ws"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("SECRET-KEY\n")
    ws.mkdir()
    p = _client(dict(env, HOME=str(home)), "--daemon", "--allow-downgrade",
                "--policy", os.path.join(POLICIES, "sandboxed-agent.yaml"), "--",
                "/bin/sh", "-c", f"unshare -U /bin/true; echo unshare=$?; cat {home}/.ssh/id_rsa; "
                                 "echo cat=$?", cwd=str(ws))
    out, err = p.communicate(timeout=120)
    assert "SECRET-KEY" not in out, out
    assert "unshare=1" in out, out + err           # refused by seccomp (EPERM)
    run_id = err.split("agentwatch: run ")[1].split()[0]
    evs = read_events(state_dir / "runs" / run_id / "events.jsonl")
    viol = [e for e in evs if e["kind"] == "violation"]
    assert any(v["category"] == "process" and "unshare" in json.dumps(v["detail"]) for v in viol), viol
    assert any(v["category"] == "filesystem" and v["rule"] == "filesystem.deny" for v in viol), viol
    ident = _run_record(state_dir, run_id)["identity"]
    assert ident["variables"]["HOME"] == str(home)
    assert ident["enforcement"]["path"] != "monitor-only"


def _loopback_policy(path, port):
    path.write_text(f"""apiVersion: agentwatch/v1
kind: AgentPolicy
metadata: {{name: loopback-{port}}}
network: {{allow: [], loopback: [{port}], unix: true}}
on_violation: {{network: deny}}
""")
    return str(path)


def _egress_programs():
    from agentwatch.sensors.inventory import agentwatch_programs
    return {i for i, n in agentwatch_programs() if n == "aw_connect4"}


def test_sandboxed_runs_reuse_the_enforcement_programs_with_their_own_rules(daemon, tmp_path):
    """The daemon compiles a run's cgroup BPF egress programs once and gives
    the next sandboxed run the same programs with that run's rules only:
    a port the first run's policy allowed is refused under the second's (UDP:
    Landlock judges TCP connects before cgroup BPF would)."""
    import socket
    state_dir, env = daemon
    servers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    for s in servers:
        s.bind(("127.0.0.1", 0))
    try:
        a, b = (s.getsockname()[1] for s in servers)
        probe = ("import socket,sys\n"
                 "for p in sys.argv[1:]:\n"
                 "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                 "    print(p, s.connect_ex(('127.0.0.1', int(p))), flush=True)\n")

        def run(port):
            p = _client(env, "--daemon", "--policy", _loopback_policy(tmp_path / f"p{port}.yaml", port),
                        "--", sys.executable, "-c", probe, str(a), str(b))
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            return dict(line.split() for line in out.splitlines()), err
        got, _ = run(a)
        assert got == {str(a): "0", str(b): "1"}, got           # EPERM for the other port
        kept = _egress_programs()
        assert kept, "the daemon did not keep the released egress programs"
        got, err = run(b)
        assert got == {str(a): "1", str(b): "0"}, got           # the first rules are gone
        assert _egress_programs() == kept, "a second run compiled its own programs"
        run_id = err.split("agentwatch: run ")[1].split()[0]
        evs = read_events(state_dir / "runs" / run_id / "events.jsonl")
        denied = [e for e in evs if e["kind"] == "violation" and e["category"] == "network"]
        assert [v["detail"].get("port") for v in denied] == [a], denied
        end = next(e for e in evs if e["kind"] == "lifecycle" and e["phase"] == "end")
        assert end["detail"]["kernel_denials"]["cgroup-bpf"]["denials"] == 1   # its own only
    finally:
        for s in servers:
            s.close()


def test_sandboxed_runs_starting_at_once_all_run(daemon, tmp_path):
    """Four sandboxed runs asked for at the same moment: at least two compile
    their enforcement programs at once (bcc's compiler is not thread-safe:
    this crashed the daemon before compiles were serialised)."""
    state_dir, env = daemon
    pid = _status(env)["pid"]
    clients = []
    for i in range(4):
        ws = tmp_path / f"ws{i}"
        ws.mkdir()
        clients.append(_client(env, "--daemon", "--allow-downgrade",
                               "--policy", os.path.join(POLICIES, "sandboxed-agent.yaml"),
                               "--", "/bin/sh", "-c", f"echo run-{i}", cwd=str(ws)))
    for i, c in enumerate(clients):
        out, err = c.communicate(timeout=180)
        assert (c.returncode, out) == (0, f"run-{i}\n"), err
    assert _status(env)["pid"] == pid, "the daemon went away"


def test_an_agents_stop_signal_does_not_stop_the_daemon(daemon, tmp_path):
    """An agent with no kernel layer in its way (an alert-only policy: no
    Landlock signal scope) sends SIGTERM and SIGHUP to the daemon: the daemon
    knows the sender (sigwaitinfo), refuses, reports it on the run, and
    serves on."""
    state_dir, env = daemon
    pid = _status(env)["pid"]
    policy = tmp_path / "alert.yaml"
    policy.write_text("apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: alert-only}\n"
                      "on_violation: {default: alert}\n")
    p = _client(env, "--daemon", "--policy", str(policy), "--", "/bin/sh", "-c",
                f"kill -TERM {pid}; kill -HUP {pid}; sleep 0.3; echo alive")
    out, err = p.communicate(timeout=60)
    assert (p.returncode, out) == (0, "alive\n"), err
    assert _status(env)["pid"] == pid, "the daemon stopped for an agent's signal"
    run_id = err.split("agentwatch: run ")[1].split()[0]
    evs = read_events(state_dir / "runs" / run_id / "events.jsonl")
    refused = sorted(v["detail"]["op"] for v in evs
                     if v["kind"] == "violation" and v["rule"] == "identity.daemon")
    assert refused == ["signal SIGHUP", "signal SIGTERM"], refused
    log = (state_dir / "daemon.log").read_text()
    assert "refused 'signal SIGTERM'" in log and "refused 'signal SIGHUP'" in log


def test_ctrl_c_stops_the_agent_and_a_vanished_client_stops_its_run(daemon):
    state_dir, env = daemon
    from agentwatch.sandbox.cgroups import leftover_cgroups
    before = set(leftover_cgroups())
    # Ctrl-C: the client forwards SIGINT, the agent (not in the client's
    # process group) gets it from the daemon
    p = _client(env, "--daemon", "--", "/bin/sleep", "300")
    run = wait_for(lambda: (lambda s: s and s["runs"] and s["runs"][0]["root_pid"] and s["runs"][0])(
        _status(env)), what="the run to start")
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=30)
    assert p.returncode == 130
    assert not os.path.exists(f"/proc/{run['root_pid']}")
    # a client killed outright: the daemon stops its run (as SIGHUP would)
    q = _client(env, "--daemon", "--", "/bin/sh", "-c", "sleep 300 & sleep 300 & wait")
    run = wait_for(lambda: (lambda s: s and s["runs"] and s["runs"][0]["root_pid"] and s["runs"][0])(
        _status(env)), what="the second run to start")
    q.kill()
    q.communicate(timeout=30)
    wait_for(lambda: not _status(env)["runs"], what="the daemon to end the orphaned run")
    assert not os.path.exists(f"/proc/{run['root_pid']}")
    rec = _run_record(state_dir, run["run_id"])
    assert rec["status"] == "exited" and rec["exit_status"] == 128 + signal.SIGTERM
    assert set(leftover_cgroups()) <= before


def test_daemon_stop_ends_its_runs_and_unloads(tmp_path):
    """Its own daemon: stopping it ends a running agent (the client gets
    143), and the socket, the cgroup and every aw_* program are gone."""
    from agentwatch.sandbox.cgroups import leftover_cgroups
    from agentwatch.sensors.inventory import agentwatch_programs
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    env = {"AGENTWATCH_STATE_DIR": str(state_dir)}
    before = set(agentwatch_programs())
    r = aw("daemon", "start", env=env, timeout=180)
    assert r.returncode == 0, r.stderr
    pid = _status(env)["pid"]
    try:
        p = _client(env, "--daemon", "--", "/bin/sleep", "300")
        run = wait_for(lambda: (lambda s: s and s["runs"] and s["runs"][0]["root_pid"] and s["runs"][0])(
            _status(env)), what="the run to start")
        stop = aw("daemon", "stop", env=env, timeout=120)
        assert stop.returncode == 0, stop.stderr
        assert process_gone(pid)              # `stop` returns once the daemon is gone
        assert set(agentwatch_programs()) <= before
        p.communicate(timeout=30)
        assert p.returncode == 143
        assert not os.path.exists(f"/proc/{run['root_pid']}")
        assert run["run_id"] not in leftover_cgroups()
    finally:
        _assert_gone(pid, state_dir)
    assert set(agentwatch_programs()) <= before
    log = (state_dir / "daemon.log").read_text()
    assert "stopping 1 run(s)" in log and "stopped" in log


def test_daemon_flag_without_a_daemon_says_how_to_start_one(tmp_path):
    r = aw("run", "--daemon", "--", "/bin/true", env={"AGENTWATCH_STATE_DIR": str(tmp_path)})
    assert r.returncode == 2
    assert "no agentwatch daemon answers" in r.stderr and "agentwatch daemon start" in r.stderr
    assert "Traceback" not in r.stderr


def test_an_agent_gets_nothing_from_the_daemon(daemon, tmp_path):
    """An agent running as root under a permissive policy asks the daemon
    for a run of its own (outside its sandbox and monitoring) and to shut
    down: both refused by its cgroup (kernel's word), reported on its run."""
    state_dir, env = daemon
    inner = " ".join(aw_cmd())
    script = (f"{inner} run --daemon -- /bin/true; echo run=$?; "
              f"{inner} daemon stop; echo stop=$?")
    p = _client(env, "--daemon", "--policy",
                os.path.join(POLICIES, "coding-agent.yaml"), "--", "/bin/sh", "-c", script,
                cwd=str(tmp_path))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "run=1" in out and "stop=1" in out, out + err
    assert err.count("the agentwatch daemon refuses requests from agents") == 2, err
    assert _status(env) is not None                     # still serving
    run_id = err.split("agentwatch: run ")[1].split()[0]
    viol = [e for e in read_events(state_dir / "runs" / run_id / "events.jsonl")
            if e["kind"] == "violation"]
    got = sorted((v["rule"], v["detail"]["op"]) for v in viol if v["category"] == "identity")
    assert got == [("identity.daemon", "run"), ("identity.daemon", "shutdown")], viol


def test_a_flood_in_one_run_does_not_hide_anothers_violation(daemon, tmp_path, cbin):
    """Runs on the daemon share its rings: while one agent floods them with
    200k opens (of two files in turn, so none is folded into a repeat),
    another's read of a denied file is still reported (its record travels
    the priority ring) and the flooding run's own log holds its records or
    the kernel counted them lost."""
    state_dir, env = daemon
    burst = cbin("burst")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("k\n")
    flood = _client(env, "--daemon", "--name", "flooder", "--", burst, "200000", "/dev/null", "/dev/zero")
    wait_for(lambda: (lambda s: s and any(r["agent"] == "flooder" and r["root_pid"] for r in s["runs"]))(
        _status(env)), what="the flood to start")
    p = _client(dict(env, HOME=str(home)), "--daemon", "--policy",
                os.path.join(POLICIES, "coding-agent.yaml"), "--", "/bin/cat", f"{home}/.ssh/id_rsa",
                cwd=str(tmp_path))
    _, err = p.communicate(timeout=120)
    _, ferr = flood.communicate(timeout=300)
    assert p.returncode == 0 and flood.returncode == 0, err + ferr
    run_id = err.split("agentwatch: run ")[1].split()[0]
    viol = [e for e in read_events(state_dir / "runs" / run_id / "events.jsonl") if e["kind"] == "violation"]
    assert any(v["rule"] == "filesystem.deny" and "id_rsa" in json.dumps(v["detail"]) for v in viol), viol
    fid = ferr.split("agentwatch: run ")[1].split()[0]
    fev = read_events(state_dir / "runs" / fid / "events.jsonl")
    end = next(e for e in fev if e["kind"] == "lifecycle" and e["phase"] == "end")["detail"]
    opens = sum(e["repeat"] or 1 for e in fev if e["kind"] == "file" and e["path"] in ("/dev/null", "/dev/zero"))
    assert opens <= 200000 and opens + end["lost_events"] >= 200000   # lost: counted per daemon


def test_doctor_says_whether_a_daemon_serves(daemon, tmp_path):
    _, env = daemon
    on = json.loads(aw("doctor", "--json", env=env).stdout)["daemon"]
    assert on["pid"] == _status(env)["pid"] and on["sensors"]["tracepoints"] > 0
    off = aw("doctor", env={"AGENTWATCH_STATE_DIR": str(tmp_path)})
    assert "agentwatch daemon: not running" in off.stdout


def test_a_stopped_show_terminal_does_not_stall_other_runs(daemon):
    """--show on the daemon writes every event to the client's stderr. A
    client whose stderr nobody reads (a stopped terminal) must not hold up
    the monitor: another run still starts and ends at once."""
    state_dir, env = daemon
    r, w = os.pipe()
    try:
        shown = subprocess.Popen(aw_cmd() + ["run", "--daemon", "--show", "--", "/bin/sh", "-c",
                                             "for i in $(seq 300); do /bin/true; done; sleep 2"],
                                 cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, **env),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=w)
        os.close(w)
        w = None
        time.sleep(1.5)                       # its --show output now fills the unread pipe
        t0 = time.monotonic()
        other = _client(env, "--daemon", "--", "/bin/true")
        other.communicate(timeout=60)
        took = time.monotonic() - t0
        assert other.returncode == 0 and took < 10, took
        out = b""
        while True:                           # read it now: the shown run completes
            chunk = os.read(r, 65536)
            if not chunk:
                break
            out += chunk
        assert shown.wait(timeout=60) == 0
        assert b"exec /bin/true" in out or b"/bin/true" in out
    finally:
        os.close(r)
        if w is not None:
            os.close(w)
