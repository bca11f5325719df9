"""agentwatch.api on the real kernel, in this process: a background run
whose events arrive by subscription and that stop() ends, blocking runs
that return the agent's exit status and their violations, and runs at the
same time on one shared monitor."""
import os
import signal
import threading
import time

import pytest

from agentwatch import api

pytestmark = pytest.mark.kernel
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODING = os.path.join(REPO, "policies", "coding-agent.yaml")


def _prog_fds():
    """BPF programs this process holds open."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += "bpf-prog" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return n


@pytest.fixture(autouse=True)
def no_programs_kept():
    """Every run (and monitor) of the API gives its programs back."""
    before = _prog_fds()
    yield
    assert _prog_fds() == before


def _quiet(tmp_path):
    """stdio for the agent and a file for agentwatch's own messages."""
    err = open(tmp_path / "agentwatch.err", "w")
    null = os.open(os.devnull, os.O_RDWR)
    return err, (null, null, null)


def test_background_run_events_stop_and_result(state_dir, tmp_path):
    marker = tmp_path / "marker"
    err, stdio = _quiet(tmp_path)
    opts = api.RunOptions(argv=["/bin/sh", "-c", f"echo x > {marker}; exec sleep 60"],
                          name="bg-agent", stdio=stdio, stderr=err)
    t0 = time.monotonic()
    handle = api.start(opts, maxsize=100000)
    try:
        assert isinstance(handle, api.RunHandle) and not handle.done
        assert handle.log_path == api.log_path(handle.run_id)
        # a run of this process: subscribe() by its id is live, so is a callback
        live = api.subscribe(handle.run_id, kinds={"exec"})
        seen = []
        api.subscribe(handle, callback=seen.append)
        # one monitor of its own per process at a time (a monitor reaps every child)
        with pytest.raises(api.UsageError, match="share one"):
            api.run(api.RunOptions(argv=["/bin/true"]), daemon=False)
        got, wrote = [], False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ev = handle.events.get(timeout=0.5)
            if ev is None:
                continue
            got.append(ev)
            if ev.kind == "exec" and ev.filename.endswith("sleep"):
                break
            wrote |= ev.kind == "file" and ev.path == str(marker) and "write" in ev.access
        else:
            pytest.fail(f"no exec of sleep among {len(got)} events")
        assert got[0].kind == "lifecycle" and got[0].phase == "start"
        assert got[0].detail["agent"] == "bg-agent" and wrote
        first = live.get(timeout=5)
        assert first is not None and first.kind == "exec"
        with pytest.raises(TimeoutError):
            handle.wait(timeout=0.1)
        handle.stop()
        result = handle.wait(timeout=30)
    finally:
        if not handle.done:
            handle.stop(signal.SIGKILL)
            handle.stop(signal.SIGKILL)
            handle.wait(timeout=30)
        err.close()
    assert time.monotonic() - t0 < 30
    assert handle.done and result.exit_status == 128 + signal.SIGTERM
    assert result.run_id == handle.run_id and result.agent == "bg-agent" and not result.on_daemon
    assert result.events > 0 and result.violations == 0 and result.summary.startswith(
        f"agentwatch: run {handle.run_id} (bg-agent) exited {128 + signal.SIGTERM}")
    # the subscription ends with the run: the rest of its events, the end last but the seal
    rest = list(handle.events)
    assert [e.phase for e in rest if e.kind == "lifecycle"][-2:] == ["end", "seal"]
    assert handle.events.missed == 0
    assert [e.phase for e in seen if e.kind == "lifecycle"][-1] == "seal"
    assert len(seen) == len(got) + len(rest) - 1       # subscribed after the start event
    assert api.find_run(handle.run_id).status == "exited"
    assert api.verify_log(handle.run_id).ok
    assert api._OWN_MONITORS == [0]


def test_blocking_run_returns_the_agents_exit_status_and_violations(state_dir, tmp_path):
    home, ws = tmp_path / "home", tmp_path / "ws"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("-----BEGIN FAKE KEY-----\n")
    ws.mkdir()
    err, stdio = _quiet(tmp_path)
    env = {"HOME": str(home), "TMPDIR": "/tmp", "PATH": "/usr/bin:/bin"}
    try:
        res = api.run(api.RunOptions(argv=["/bin/sh", "-c", "exit 7"], stdio=stdio, stderr=err),
                      daemon=False)
        assert res.exit_status == 7 and res.violations == 0 and os.path.isfile(res.log_path)
        res = api.run(api.RunOptions(argv=["/bin/sh", "-c", f"cat {home}/.ssh/id_rsa; exit 3"],
                                     policy_path=CODING, workspace=str(ws), cwd=str(ws), env=env,
                                     stdio=stdio, stderr=err), daemon=False)
    finally:
        err.close()
    assert res.exit_status == 3
    assert res.violations >= 1 and res.violations_by_category.get("filesystem", 0) >= 1
    kinds = [d["kind"] for d in api.read_log(res.run_id)]
    assert kinds.count("violation") == res.violations
    text = (tmp_path / "agentwatch.err").read_text()
    assert res.summary in text and "violations:" in res.summary


def test_an_in_process_run_leaves_the_caller_no_subreaper(state_dir, tmp_path):
    """While it runs, the monitor is a subreaper (it reaps the agent's
    orphans); after it, orphans of the caller's own children go to init
    again, as before the run, rather than piling up as zombies."""
    from agentwatch.sandbox import launcher
    was = launcher.set_child_subreaper(False)
    err, stdio = _quiet(tmp_path)
    try:
        res = api.run(api.RunOptions(argv=["/bin/sh", "-c", "(sleep 0.2 &) ; exit 0"], stdio=stdio,
                                     stderr=err), daemon=False)
        assert res.exit_status == 0
        assert launcher.set_child_subreaper(was) is False
    finally:
        err.close()
        launcher.set_child_subreaper(was)


def test_runs_at_the_same_time_share_a_monitor(state_dir, tmp_path):
    err, stdio = _quiet(tmp_path)
    gate = tmp_path / "gate"
    script = f"while [ ! -e {gate} ]; do sleep 0.05; done; exit $1"
    try:
        with api.open_monitor() as monitor:
            handles = [api.start(api.RunOptions(argv=["/bin/sh", "-c", script, "sh", str(code)],
                                                stdio=stdio, stderr=err), monitor=monitor)
                       for code in (4, 5)]
            assert not any(h.done for h in handles)      # both live at once
            gate.write_text("")
            results = [h.wait(timeout=60) for h in handles]
    finally:
        err.close()
    assert [r.exit_status for r in results] == [4, 5]
    assert len({r.run_id for r in results}) == 2
