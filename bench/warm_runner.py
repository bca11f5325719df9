"""One loaded agentwatch Monitor serving many runs: what a daemon would do.

Started by bench/lib.py:WarmRunner. Loads the Monitor (compile + attach) once,
answers {"ready": ...}, then reads one JSON request a line on stdin:

  {"op": "run", "argv": [...], "policy": P, "cwd": D, "home": H}
      Run(RunOptions(...), monitor=m).execute(), as in
      tests/kernel/test_run.py::test_first_exec_captured_over_50_consecutive_runs
  {"op": "plain", "argv": [...], "cwd": D}
      the same command as a plain subprocess of this process

and answers one JSON line each. At end of input it unloads the Monitor and
answers {"close_s": ...}. The protocol uses private copies of stdin/stdout:
agents get /dev/null as stdin and stdout (they inherit fds 0-2).
"""
import json
import os
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agentwatch.run import sweep  # noqa: E402
from agentwatch.run import Monitor, Run, RunOptions  # noqa: E402

# no start-up sweep: it would remove other agentwatch instances' run cgroups
# (see bench/aw_cli.py)
sweep.gc = lambda log=None: []

COUNTERS = ("submitted", "received", "lost_events", "lost_stash")


class TimedRun(Run):
    """A Run that notes when it saw the agent exit (in _reap), so set-up +
    agent time and teardown can be told apart."""
    t_agent_exit = None

    def _reap(self):
        super()._reap()
        if self.exit_status is not None and self.t_agent_exit is None:
            self.t_agent_exit = time.monotonic()


def do_run(m, req):
    old_home = os.environ.get("HOME")
    if req.get("home"):
        os.environ["HOME"] = req["home"]     # ${HOME} in the policy, and the agent's HOME
    try:
        before = m.sensors.counters()
        run = TimedRun(RunOptions(argv=req["argv"], policy_path=req.get("policy"),
                                  cwd=req.get("cwd"), workspace=req.get("cwd")), monitor=m)
        t0 = time.monotonic()
        code = run.execute()
        t1 = time.monotonic()
        after = m.sensors.counters()
    finally:
        if old_home is not None:
            os.environ["HOME"] = old_home
    to_exit = run.t_agent_exit - t0 if run.t_agent_exit else None
    return {"exit": code, "run_id": run.run_id, "to_exit_s": to_exit, "total_s": t1 - t0,
            "teardown_s": (t1 - run.t_agent_exit) if run.t_agent_exit else None,
            "events": run.ctx.events if run.ctx else None,
            "counters": dict({k: after[k] - before[k] for k in COUNTERS},
                             lost_priority=after["rings"]["priority"]["lost"]
                             - before["rings"]["priority"]["lost"])}


def do_plain(req):
    t0 = time.monotonic()
    p = subprocess.run(req["argv"], cwd=req.get("cwd"), stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL)
    return {"exit": p.returncode, "total_s": time.monotonic() - t0}


def main():
    proto_in = os.fdopen(os.dup(0), "r")
    proto_out = os.fdopen(os.dup(1), "w", buffering=1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)

    def send(obj):
        proto_out.write(json.dumps(obj) + "\n")

    t0 = time.monotonic()
    try:
        m = Monitor()
        t1 = time.monotonic()
        m.open()
    except Exception:
        send({"ready": False, "error": traceback.format_exc()})
        return 1
    t2 = time.monotonic()
    send({"ready": True, "pid": os.getpid(), "construct_s": t1 - t0, "open_s": t2 - t1,
          "tracepoints": len(m.sensors.attached)})
    try:
        for line in proto_in:
            if not line.strip():
                continue
            req = json.loads(line)
            try:
                resp = do_run(m, req) if req["op"] == "run" else do_plain(req)
            except Exception as e:
                resp = {"error": traceback.format_exc(), "message": str(e)}
            send(resp)
    finally:
        t = time.monotonic()
        m.close()
        send({"closed": True, "close_s": time.monotonic() - t})
    return 0


if __name__ == "__main__":
    sys.exit(main())
