"""`agentwatch run` end to end on the real kernel: real cgroups, real BPF."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, aw, aw_cmd, read_events, wait_for

sys.path.insert(0, REPO)
from bench.lib import process_gone  # noqa: E402

pytestmark = pytest.mark.kernel
AGENTS = os.path.join(REPO, "tests", "kernel", "agents")


def start_event(events):
    starts = [e for e in events if e["kind"] == "lifecycle" and e["phase"] == "start"]
    assert len(starts) == 1
    return starts[0]


def end_event(events):
    ends = [e for e in events if e["kind"] == "lifecycle" and e["phase"] == "end"]
    assert len(ends) == 1
    return ends[0]


@pytest.fixture
def loopback_server():
    """A TCP listener on 127.0.0.1 that accepts and closes connections."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                c, _ = srv.accept()
                c.close()
            except OSError:
                pass
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


def test_child_and_setsid_grandchild_attributed_with_ancestry(state_dir, tmp_path, loopback_server):
    m_child, m_gc = tmp_path / "marker-child", tmp_path / "marker-grandchild"
    m_child.write_text("c")
    m_gc.write_text("g")
    ev_file = tmp_path / "events.jsonl"
    r = aw("run", "--name", "tree-agent", "--events", str(ev_file), "--",
           sys.executable, os.path.join(AGENTS, "tree_agent.py"),
           str(m_child), str(m_gc), str(loopback_server), str(tmp_path / "done"))
    assert r.returncode == 0, r.stderr
    events = read_events(ev_file)
    start = start_event(events)
    ident = start["detail"]
    run_id, root = start["run_id"], ident["root_pid"]
    assert ident["agent"] == "tree-agent" and ident["uid"] == 0 and ident["start_time"] > 0
    assert "policy_digest" in ident
    # every event carries the run's identity
    assert {e["run_id"] for e in events} == {run_id}
    assert {e["agent"] for e in events} == {"tree-agent"}

    execs = [e for e in events if e["kind"] == "exec" and e["ret"] == 0]
    cat_child = [e for e in execs if e["filename"] == "/bin/cat" and str(m_child) in e["argv"]]
    cat_gc = [e for e in execs if e["filename"] == "/bin/cat" and str(m_gc) in e["argv"]]
    assert len(cat_child) == 1 and len(cat_gc) == 1
    # the child's ancestry ends at the agent; the grandchild's goes through
    # the setsid'd intermediate (which exited long before) up to the agent
    assert cat_child[0]["ancestry"][-1] == root and len(cat_child[0]["ancestry"]) == 2
    anc = cat_gc[0]["ancestry"]
    assert anc[-1] == root and len(anc) == 4, anc
    forks = {(e["pid"], e["child"]) for e in events if e["kind"] == "fork"}
    assert (anc[2], anc[1]) in forks and (root, anc[2]) in forks

    opens = [e for e in events if e["kind"] == "file" and e["op"] == "open"]
    assert any(e["abspath"] == str(m_child) and e["pid"] == cat_child[0]["pid"] for e in opens)
    assert any(e["abspath"] == str(m_gc) and e["pid"] == cat_gc[0]["pid"] for e in opens)

    conns = [e for e in events if e["kind"] == "net" and e["op"] == "connect"
             and e["addr"] == "127.0.0.1" and e["port"] == loopback_server]
    # create_connection with a timeout connects non-blocking: EINPROGRESS is success here
    assert len(conns) == 2 and all(e["error"] in (None, "EINPROGRESS") for e in conns)
    # one of the connects came from below the grandchild
    gc_pid = anc[1]
    procs = {}
    for e in events:
        if e["kind"] == "fork":
            procs[e["child"]] = e["pid"]
    def descends(pid, ancestor):
        while pid in procs:
            if pid == ancestor:
                return True
            pid = procs[pid]
        return pid == ancestor
    assert sum(descends(e["pid"], gc_pid) for e in conns) == 1
    # the same events are in the run's own log under the state dir
    assert len(read_events(state_dir / "runs" / run_id / "events.jsonl")) == len(events)


def test_processes_outside_the_cgroup_are_not_seen(state_dir, tmp_path):
    inside, outside = tmp_path / "inside-marker", tmp_path / "outside-marker"
    inside.write_text("i")
    outside.write_text("o")
    noise = subprocess.Popen(["/bin/sh", "-c", f"while :; do /bin/cat {outside} >/dev/null; sleep 0.01; done"])
    try:
        ev_file = tmp_path / "events.jsonl"
        r = aw("run", "--events", str(ev_file), "--", "/bin/sh", "-c",
               f"for i in 1 2 3 4 5 6 7 8 9 10; do /bin/cat {inside} >/dev/null; sleep 0.05; done")
    finally:
        noise.kill()
        noise.wait()
    assert r.returncode == 0, r.stderr
    text = ev_file.read_text()
    assert text.count(str(inside)) >= 20          # 10 execs (argv) + 10 opens
    assert str(outside) not in text
    assert str(noise.pid) not in {str(e["pid"]) for e in read_events(ev_file)}


@pytest.mark.parametrize("argv,status,exit_fields", [
    (["/bin/sh", "-c", "exit 0"], 0, {"code": 0, "signal": None}),
    (["/bin/sh", "-c", "exit 3"], 3, {"code": 3, "signal": None}),
    (["/bin/sh", "-c", "kill -9 $$"], 137, {"code": None, "signal": 9}),
    # a default-fatal SIGTERM: the kernel delivers it as a group SIGKILL, the
    # exit event must still name SIGTERM
    ([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"], 143,
     {"code": None, "signal": 15}),
])
def test_exit_status_is_the_agents(state_dir, tmp_path, argv, status, exit_fields):
    ev_file = tmp_path / "events.jsonl"
    r = aw("run", "--events", str(ev_file), "--", *argv)
    assert r.returncode == status, r.stderr
    assert f"exited {status}" in r.stderr
    events = read_events(ev_file)
    root = start_event(events)["detail"]["root_pid"]
    exits = [e for e in events if e["kind"] == "exit" and e["pid"] == root]
    assert len(exits) == 1
    assert {k: exits[0][k] for k in exit_fields} == exit_fields
    assert end_event(events)["detail"]["exit_status"] == status


def test_command_not_found_is_127_and_starts_nothing(state_dir):
    r = aw("run", "--", "/nonexistent/agent-binary")
    assert r.returncode == 127
    assert "command not found: /nonexistent/agent-binary" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (state_dir / "runs").exists() or not os.listdir(state_dir / "runs")


def test_bpf_lsm_path_is_chosen_by_the_host_and_on_refuses_without_it(state_dir, tmp_path):
    """--bpf-lsm auto takes the BPF LSM layer only where it loads (never on
    the CI kernel: its headers are another version's); on refuses to start
    without it, in one line, before anything exists."""
    from agentwatch.sandbox.plan import PATH_BPF_LSM, PATH_FALLBACK
    from agentwatch.guards.lsm import LsmGuard
    here = PATH_FALLBACK if LsmGuard.unavailable() else PATH_BPF_LSM
    policy = os.path.join(REPO, "policies", "sandboxed-agent.yaml")
    ev = tmp_path / "ev.jsonl"
    r = aw("run", "--policy", policy, "--allow-downgrade", "--events", str(ev), "--", "true",
           cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    start = [e for e in read_events(ev) if e.get("phase") == "start"][0]
    assert start["detail"]["enforcement"]["path"] == here
    assert (start["detail"]["enforcement"]["bpf_lsm"] is None) == (here == PATH_FALLBACK)
    off = aw("run", "--bpf-lsm", "off", "--policy", policy, "--allow-downgrade", "--", "true",
             cwd=str(tmp_path))
    assert off.returncode == 0 and f"enforcement: {PATH_FALLBACK};" in off.stderr, off.stderr
    if here == PATH_FALLBACK:
        on = aw("run", "--bpf-lsm", "on", "--policy", policy, "--allow-downgrade", "--", "true",
                cwd=str(tmp_path))
        assert on.returncode != 0 and "--bpf-lsm on:" in on.stderr, on.stderr
        assert "Traceback" not in on.stderr and len(on.stderr.strip().splitlines()) == 1
        runs = state_dir / "runs"
        assert len(os.listdir(runs)) == 2          # the two runs above; nothing for this one


def test_first_exec_captured_over_50_consecutive_runs(state_dir, tmp_path):
    """Races between the child's exec and the cgroup filter would lose the
    first exec now and then; 50 runs in a row must all have it. The runs share
    one loaded monitor (as a daemon would), so this checks the launch order,
    not the BPF compile."""
    script = f"""
import json, sys
sys.path.insert(0, {REPO!r})
from agentwatch.run import Monitor, Run, RunOptions
results = []
with Monitor() as m:
    for i in range(50):
        ev = {str(tmp_path)!r} + f"/ev{{i}}.jsonl"
        run = Run(RunOptions(argv=["/bin/true"], events_path=ev), monitor=m)
        code = run.execute()
        events = [json.loads(l) for l in open(ev)]
        root = [e for e in events if e["kind"] == "lifecycle"][0]["detail"]["root_pid"]
        execs = [e for e in events if e["kind"] == "exec" and e["pid"] == root
                 and e["filename"] == "/bin/true" and e["ret"] == 0]
        results.append((code, len(execs)))
print(json.dumps(results))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(results) == 50
    assert results == [[0, 1]] * 50


def test_burst_of_100k_events_all_logged_or_counted(state_dir, tmp_path, cbin):
    """100k opens of two files in turn (no two the same in a row, so the
    kernel folds none): each is a line of the log or counted lost."""
    burst = cbin("burst")
    ev_file = tmp_path / "events.jsonl"
    n = 100_000
    r = aw("run", "--events", str(ev_file), "--", burst, str(n), "/dev/null", "/dev/zero", timeout=300)
    assert r.returncode == 0, r.stderr
    events = read_events(ev_file)
    end = end_event(events)["detail"]
    opens = sum(1 for e in events if e["kind"] == "file" and e["path"] in ("/dev/null", "/dev/zero"))
    lost = end["lost_events"]
    assert end["repeated"] == 0 and not any(e.get("repeat") for e in events)
    # the kernel attempted exactly n opens + exec entry + exec return + exit
    assert end["records_submitted"] + lost == n + 3
    # userspace lost nothing the kernel delivered
    assert end["records_received"] == end["records_submitted"]
    assert opens <= n and opens + lost >= n
    assert end["lost_stash"] == 0
    if lost:
        assert f"{lost} lost" in r.stderr
        assert any(e["kind"] == "lifecycle" and e["phase"] == "drops" for e in events)
    print(f"burst: {opens} of {n} opens logged, {lost} lost")


def _running_run(state_dir):
    from agentwatch.core import state
    runs = [r for r in state.list_runs() if r.get("status") == "running"]
    return runs[0] if runs else None


def _cgroup_pids(rec):
    try:
        with open(os.path.join(rec["identity"]["cgroup"], "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except (OSError, KeyError):
        return []


def _spawn_aw(*args):
    return subprocess.Popen(aw_cmd() + list(args), cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.mark.parametrize("sig,expect", [(signal.SIGTERM, {143}), (signal.SIGINT, {130, 137})])
def test_signal_stops_the_whole_tree_and_cleans_up(state_dir, sig, expect):
    p = _spawn_aw("run", "--name", "sleeper", "--", "/bin/sh", "-c", "sleep 300 & sleep 300 & wait")
    try:
        rec = wait_for(lambda: _running_run(state_dir), what="run to start")
        pids = wait_for(lambda: len(_cgroup_pids(rec)) >= 3 and _cgroup_pids(rec), what="agent tree")
        ps = aw("ps", "--json")
        rows = json.loads(ps.stdout)
        assert [r["run_id"] for r in rows] == [rec["run_id"]]
        assert rows[0]["agent"] == "sleeper"
        wait_for(lambda: json.loads(aw("ps", "--json").stdout)[0]["pids"] >= 3, what="ps pid count")
        p.send_signal(sig)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode in expect, err
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"agent process {pid} outlived the run"
    assert not os.path.exists(rec["identity"]["cgroup"])
    from agentwatch.core import state
    assert state.find_run(rec["run_id"])["status"] == "exited"


def test_crashed_agentwatch_is_swept_by_gc(state_dir):
    from agentwatch.core import state
    from agentwatch.sensors.inventory import agentwatch_programs
    before = set(agentwatch_programs())     # other runs on the host may have theirs
    p = _spawn_aw("run", "--", "/bin/sh", "-c", "sleep 300 & wait")
    rec = wait_for(lambda: _running_run(state_dir), what="run to start")
    pids = wait_for(lambda: len(_cgroup_pids(rec)) >= 2 and _cgroup_pids(rec), what="agent tree")
    ours = set(agentwatch_programs()) - before
    assert ours
    os.kill(rec["identity"]["keeper"], signal.SIGKILL)   # no keeper (agentwatch/keeper.py) either:
    wait_for(lambda: process_gone(rec["identity"]["keeper"]), timeout=5, what="keeper gone")
    p.kill()                       # agentwatch dies without cleaning up
    p.wait()
    # the kernel freed the dead monitor's programs with its fds
    assert not ours & set(agentwatch_programs())
    assert state.find_run(rec["run_id"])["status"] == "crashed"
    r = aw("gc")
    assert r.returncode == 0 and "swept 1" in r.stdout, r.stdout + r.stderr
    assert not os.path.exists(rec["identity"]["cgroup"])
    for pid in pids:
        # a zombie is gone too: re-parented to this process when an earlier
        # in-process run (tests/kernel/test_api_runs.py) made it a subreaper
        wait_for(lambda: process_gone(pid), timeout=5, what=f"pid {pid} gone")
    assert state.read_json(state.run_path(rec["run_id"], "run.json"))["status"] == "crashed"


def test_tail_follows_a_live_run_and_replays_it(state_dir, tmp_path):
    tail = _spawn_aw("tail", "--json", "--kind", "exec")
    try:
        time.sleep(1.5)                 # tail is following before the run starts
        r = aw("run", "--name", "tailed", "--", "/bin/echo", "hello-tail")
        assert r.returncode == 0, r.stderr
        lines = []

        def got_echo():
            import select
            while select.select([tail.stdout], [], [], 0.1)[0]:
                line = tail.stdout.readline()
                if not line:
                    break
                lines.append(json.loads(line))
            return any(d["filename"] == "/bin/echo" for d in lines)
        wait_for(got_echo, timeout=15, what="tail to print the exec")
    finally:
        tail.send_signal(signal.SIGINT)
        _, err = tail.communicate(timeout=10)
    assert tail.returncode == 0 and "Traceback" not in err
    assert all(d["kind"] == "exec" and d["agent"] == "tailed" for d in lines)
    run_id = lines[0]["run_id"]
    replay = aw("tail", "--run", run_id, "--no-follow")
    assert replay.returncode == 0
    assert "exec /bin/echo [/bin/echo hello-tail]" in replay.stdout
    assert "tailed[" in replay.stdout
    assert aw("tail", "--run", run_id, "--violations", "--no-follow").stdout == ""


def test_installed_package_finds_its_bpf_sources(state_dir, tmp_path):
    """`pip install .` (not editable) must ship bpf/; setup.sh installs it into .venv."""
    exe = os.path.join(REPO, ".venv", "bin", "agentwatch")
    if not os.path.exists(exe):
        pytest.skip("no .venv: run scripts/setup.sh")
    py = os.path.join(REPO, ".venv", "bin", "python")
    where = subprocess.run([py, "-c", "import agentwatch.sensors as s; print(s.bpf_dir())"],
                           cwd=str(tmp_path), capture_output=True, text=True, check=True).stdout.strip()
    assert "site-packages" in where and os.path.exists(os.path.join(where, "syscalls.bpf.c"))
    r = subprocess.run([exe, "run", "--", "/bin/true"], cwd=str(tmp_path), capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=""))
    assert r.returncode == 0, r.stderr


def test_not_root_gets_a_one_line_error(state_dir, tmp_path):
    r = subprocess.run(aw_cmd() + ["run", "--", "/bin/true"], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REPO), preexec_fn=lambda: os.setuid(65534),
                       timeout=60)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs root" in lines[0], r.stderr
