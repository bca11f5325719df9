"""agentwatch up | down | ps: a manifest's agents (docs/manifest.md) as
daemon runs, and every run on this host.

A daemon run lives as long as its client's connection: a client that
dies stops its run (README, "daemon"). So `up` starts one supervisor per
manifest, a process of its own (`up --foreground`, detached: its own
session, its log in <state dir>/up/NAME.log) that holds one connection per
agent (api.daemon_launch) and stays until its agents end or `down` sends
it SIGTERM, which it forwards to each run (the run's own stop path, as
`agentwatch run` forwards its SIGTERM). Killed any other way, its
connections close and the daemon stops every run it held.

The supervisor keeps <state dir>/up/NAME.json: its pid and kernel start
time (so that `down` signals that process and no other that took its pid),
its state, and per agent the run id once the daemon made the run. The
supervisor lives here rather than in agentwatch/harness/ because it is a
client of the public API (api.py sits above the harness in the layer
table, tests/unit/test_imports.py)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import click

from agentwatch import api

START_TIMEOUT_S = 120        # for every agent's run to log its start
STOP_TIMEOUT_S = 30          # for the runs to end after SIGTERM (they SIGKILL after 3 s)
POLL_S = 0.1


# ---------------------------------------------------------------- records

def _up_dir():
    return api.state_path("up")


def _record_path(name):
    return os.path.join(_up_dir(), f"{name}.json")


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write(rec):
    os.makedirs(_up_dir(), exist_ok=True)
    path = _record_path(rec["manifest"])
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=1)
    os.replace(tmp, path)


def _records():
    try:
        names = sorted(n for n in os.listdir(_up_dir()) if n.endswith(".json"))
    except FileNotFoundError:
        return []
    return [r for r in (_read(os.path.join(_up_dir(), n)) for n in names) if r and "manifest" in r]


def _alive(rec):
    """Whether the record's supervisor still runs: its pid, started when
    the record says (a reused pid is another process)."""
    pid = rec.get("pid")
    return bool(pid) and api.process_start_time(pid) == rec.get("start_time")


def _remove(rec):
    try:
        os.unlink(_record_path(rec["manifest"]))
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------- the supervisor

class Supervisor:
    """One manifest's agents as daemon runs, held by this process."""

    def __init__(self, manifest):
        self.m = manifest
        self.handles = {}                     # agent name -> api.DaemonRunHandle
        self.stop_asked = threading.Event()
        now = time.time()
        self.rec = {"manifest": manifest.name, "path": manifest.path, "pid": os.getpid(),
                    "start_time": api.process_start_time(os.getpid()), "started": now,
                    "state": "starting", "log": _record_path(manifest.name)[:-5] + ".log",
                    "agents": [{"name": a.name, "run_id": None, "weight": a.weight, "state": "starting",
                                "exit_status": None, "error": None, "log": self._log(a)}
                               for a in manifest.agents]}

    def _log(self, agent):
        return os.path.join(_up_dir(), self.m.name, f"{agent.name}.log")

    def _entry(self, name):
        return next(e for e in self.rec["agents"] if e["name"] == name)

    def _options(self, agent):
        env = dict(os.environ)
        # what `up` had, not the PYTHONPATH it gave this process to find agentwatch
        pp = env.pop("_AGENTWATCH_UP_PYTHONPATH", None)
        if pp is not None:
            if pp:
                env["PYTHONPATH"] = pp
            else:
                env.pop("PYTHONPATH", None)
        env.update(agent.env)
        cwd = agent.workspace or os.path.dirname(self.m.path)
        return api.RunOptions(argv=list(agent.command), policy_path=agent.policy, name=agent.name,
                              events_path=os.path.join(_up_dir(), self.m.name, f"{agent.name}.events.jsonl"),
                              workspace=cwd, cwd=cwd, env=env, weight=agent.weight,
                              prompt_path=agent.prompt, allow_downgrade=agent.allow_downgrade,
                              **{f"budget_{k}": float(v) if k == "cost" else v
                                 for k, v in agent.budgets.items()})

    def _launch(self, agent):
        os.makedirs(os.path.join(_up_dir(), self.m.name), exist_ok=True)
        out = os.open(self._log(agent), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return api.daemon_launch(self._options(agent), stdio=(null, out, out))
        finally:                              # the daemon has its own copies
            os.close(out)
            os.close(null)

    def _find_runs(self):
        """Run ids of our agents' runs (the daemon records who asked: this
        process) and whether each has started."""
        mine = {}
        for r in api.list_runs():
            client = (r.identity or {}).get("client") or {}
            if client.get("pid") == os.getpid() and r.status != "starting":
                mine[r.agent] = r
        return mine

    def _note_ended(self, name, handle):
        e = self._entry(name)
        try:
            result = handle.wait(0)
            e.update(state="exited", exit_status=result.exit_status, run_id=result.run_id or e["run_id"])
        except api.AgentwatchError as err:
            e.update(state="failed", error=str(err))

    def start(self):
        """Launch every agent; True once each run has started (its start
        logged), False (the record says why) when one could not."""
        _write(self.rec)
        for agent in self.m.agents:
            if self.stop_asked.is_set():
                break
            try:
                self.handles[agent.name] = self._launch(agent)
            except api.AgentwatchError as err:
                self._entry(agent.name).update(state="failed", error=str(err))
                break
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.stop_asked.is_set():
            runs = self._find_runs()
            for name, h in self.handles.items():
                e = self._entry(name)
                if name in runs and e["run_id"] is None:
                    e.update(run_id=runs[name].run_id, state="running")
                if h.done and e["state"] in ("starting", "running"):
                    self._note_ended(name, h)
            states = [e["state"] for e in self.rec["agents"]]
            if "failed" in states or all(s != "starting" for s in states):
                break
            if time.monotonic() > deadline:
                for e in self.rec["agents"]:
                    if e["state"] == "starting":
                        e.update(state="failed", error=f"its run did not start within {START_TIMEOUT_S} s")
                break
            time.sleep(POLL_S)
        failed = [e for e in self.rec["agents"] if e["state"] in ("failed", "starting")]
        if failed or self.stop_asked.is_set():
            for e in failed:
                if e["state"] == "starting":
                    e.update(state="failed", error=e["error"] or "not started: stopped while starting")
            self.stop_all()
            self.rec["state"] = "failed" if failed else "stopped"
            _write(self.rec)
            return False
        self.rec["state"] = "running"
        _write(self.rec)
        return True

    def stop_all(self):
        """SIGTERM to every run (each stops its agent tree, SIGKILL after
        3 s), then wait for their ends."""
        for h in self.handles.values():
            h.stop(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for name, h in self.handles.items():
            try:
                h.wait(max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                self._entry(name).update(error=f"still running {STOP_TIMEOUT_S} s after SIGTERM")
                continue
            except api.AgentwatchError:
                pass
            if self._entry(name)["state"] in ("starting", "running"):
                self._note_ended(name, h)

    def serve(self):
        """Until every agent ended, or a stop signal: then stop them all."""
        while not self.stop_asked.wait(POLL_S * 5):
            changed = False
            for name, h in self.handles.items():
                if h.done and self._entry(name)["state"] == "running":
                    self._note_ended(name, h)
                    changed = True
            if changed:
                _write(self.rec)
            if all(h.done for h in self.handles.values()):
                self.rec["state"] = "exited"
                _write(self.rec)
                return
        self.rec["state"] = "stopping"
        _write(self.rec)
        self.stop_all()
        self.rec["state"] = "stopped"
        _write(self.rec)


def _supervise(manifest):
    sup = Supervisor(manifest)

    def on_signal(signum, _frame):
        sup.stop_asked.set()
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    ok = sup.start()
    for e in sup.rec["agents"]:
        if e["error"]:
            click.echo(f"agentwatch up: {manifest.name}/{e['name']}: {e['error']}", err=True)
    if not ok:
        return 1
    click.echo(f"agentwatch up: {manifest.name}: {len(manifest.agents)} agent(s) running", err=True)
    sup.serve()
    click.echo(f"agentwatch up: {manifest.name}: {sup.rec['state']}", err=True)
    return 0


# ---------------------------------------------------------------- commands

def _ensure_daemon(gateway=None):
    """A daemon answers, serving the manifest's LLM gateway when it names one."""
    st = api.daemon_status()
    if st is None:
        t0 = time.monotonic()
        click.echo("agentwatch: starting the daemon (compiling and loading the BPF sensors)...", err=True)
        st = api.daemon_start(gateway=gateway)
        click.echo(f"agentwatch daemon running: pid {st.pid}, ready in {time.monotonic() - t0:.1f} s",
                   err=True)
    running = (st.raw.get("gateway") or {}).get("config")
    if gateway and running != os.path.abspath(gateway):
        raise click.ClickException(
            f"the manifest's gateway.config is {gateway}, but the running daemon serves "
            + (f"the gateway of {running}" if running else "no LLM gateway")
            + ": stop it ('agentwatch daemon stop', once its runs ended) and run 'up' again")


def _spawn_supervisor(manifest):
    """`agentwatch up --foreground MANIFEST` in a session of its own, from /,
    importing this very agentwatch; its output in <state dir>/up/NAME.log."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))          # holds cli/
    lib = os.path.dirname(os.path.dirname(os.path.abspath(api.__file__)))       # holds agentwatch/
    env = dict(os.environ, _AGENTWATCH_UP_PYTHONPATH=os.environ.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
        [here, lib] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env["AGENTWATCH_STATE_DIR"] = api.state_path()
    os.makedirs(_up_dir(), exist_ok=True)
    log_path = _record_path(manifest.name)[:-5] + ".log"
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", f"{__package__}.main", "up", "--foreground",
                                 manifest.path], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, cwd="/", env=env), log_path


def _tail(path, lines=10):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


@click.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--check", "check_only", is_flag=True,
              help="Only validate the manifest (and its policies): every problem as FILE:LINE:COL.")
@click.option("--foreground", is_flag=True,
              help="Supervise the agents in this process, until they end or it gets SIGTERM "
                   "(what 'up' runs in the background).")
@click.pass_context
def up(ctx, manifest, check_only, foreground):
    """Start every agent of MANIFEST as a run on the daemon.

    Returns once every agent's run has started (exit 0), or says which
    could not and why, stops the others and exits 1. 'agentwatch down NAME'
    stops them; 'agentwatch ps' lists them."""
    if check_only:
        result = api.check_manifest(manifest)
        for p in result.problems:
            click.echo(str(p))
        if result.ok:
            click.echo(f"{manifest}: {len(result.manifest.agents)} agent(s), ok", err=True)
        ctx.exit(0 if result.ok else 1)
    m = api.load_manifest(manifest)
    old = _read(_record_path(m.name))
    if old and _alive(old):
        raise click.ClickException(f"manifest {m.name!r} is already up (supervisor pid {old['pid']}); "
                                   f"'agentwatch down {m.name}' first")
    _ensure_daemon(m.gateway_config)
    if foreground:
        ctx.exit(_supervise(m))
    proc, log_path = _spawn_supervisor(m)
    deadline = time.monotonic() + START_TIMEOUT_S + 30
    rec = None
    while time.monotonic() < deadline:
        rec = _read(_record_path(m.name))
        mine = rec is not None and rec.get("pid") == proc.pid
        if mine and rec["state"] != "starting":
            break
        if proc.poll() is not None:
            rec = _read(_record_path(m.name)) if mine else None
            break
        time.sleep(POLL_S)
    if rec is None or rec.get("pid") != proc.pid:
        proc.poll()
        raise click.ClickException(f"the supervisor of {m.name!r} exited ({proc.returncode}) before "
                                   f"its agents started; its log ({log_path}):\n{_tail(log_path)}")
    if rec["state"] != "running":
        for e in rec["agents"]:
            why = e["error"] or ("stopped: another agent failed" if e["state"] != "failed" else "failed")
            click.echo(f"agentwatch up: {m.name}/{e['name']}: {why}", err=True)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            click.echo(f"agentwatch up: the supervisor (pid {proc.pid}) still runs; see {log_path}",
                       err=True)
        _remove(rec)
        ctx.exit(1)
    click.echo(f"{m.name}: {len(rec['agents'])} agent(s) running (supervisor pid {proc.pid}, "
               f"log {log_path})")
    for e in rec["agents"]:
        click.echo(f"  {e['name']:<20} {e['run_id'] or '-':<24} weight {e['weight']}")


def _wait_gone(rec, timeout):
    deadline = time.monotonic() + timeout
    while _alive(rec) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return not _alive(rec)


@click.command()
@click.argument("name", required=False)
def down(name):
    """Stop a manifest's agents (NAME: its metadata.name; default: every
    manifest that is up) and wait for them to end."""
    recs = _records()
    if name is not None:
        recs = [r for r in recs if r["manifest"] == name]
        if not recs:
            raise click.ClickException(f"no manifest {name!r} is up (agentwatch ps lists them)")
    if not recs:
        click.echo("no manifest is up", err=True)
        return
    failed = False
    for rec in recs:
        if _alive(rec):
            click.echo(f"{rec['manifest']}: stopping {len(rec['agents'])} agent(s) "
                       f"(supervisor pid {rec['pid']})...", err=True)
            try:
                os.kill(rec["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
            if not _wait_gone(rec, STOP_TIMEOUT_S + 15):
                click.echo(f"{rec['manifest']}: the supervisor (pid {rec['pid']}) did not stop within "
                           f"{STOP_TIMEOUT_S + 15} s; see {rec.get('log')}", err=True)
                failed = True
                continue
            rec = _read(_record_path(rec["manifest"])) or rec
        for e in rec["agents"]:
            run = api.find_run(e["run_id"]) if e.get("run_id") else None
            status, code = (run.status, run.exit_status) if run else (e["state"], e.get("exit_status"))
            click.echo(f"  {e['name']:<20} {e.get('run_id') or '-':<24} {status}"
                       + (f" ({code})" if code is not None else ""))
        _remove(rec)
        click.echo(f"{rec['manifest']}: down")
    if failed:
        raise SystemExit(1)


# ---------------------------------------------------------------- ps

def _uptime(seconds):
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _row(run, manifest=None, agent=None, weight=None):
    """One line of ps: a run (api.RunInfo or None: an agent whose run
    never started) and, for a manifest's agent, its record entry."""
    now = time.time()
    if run is None:
        return {"run_id": None, "agent": agent["name"], "status": agent["state"], "root_pid": None,
                "pids": 0, "events": 0, "lost": 0, "started": None, "policy": None, "policy_digest": None,
                "command": "", "crash": None, "exit_status": agent.get("exit_status"),
                "manifest": manifest, "weight": weight, "uptime": None, "stats": {},
                "error": agent.get("error")}
    if weight is None:
        weight = ((run.identity or {}).get("enforcement") or {}).get("weight")
    return {"run_id": run.run_id, "agent": run.agent, "status": run.status, "root_pid": run.root_pid,
            "pids": run.pids, "events": run.events, "lost": run.lost, "started": run.started,
            "policy": run.policy, "policy_digest": run.policy_digest, "command": " ".join(run.command),
            "crash": run.crash, "exit_status": run.exit_status, "manifest": manifest, "weight": weight,
            "uptime": now - run.started if run.started and run.status == "running" else None,
            # the harness's live figures (the gateway's queue depth and wait), {} until it gives some
            "stats": api.run_stats(run.run_id)}


def _progress(stats):
    """The IDLE/EXECS/REP/WSREP columns: the run's progress signals
    (seconds since its last workspace write or exec, execs, the most
    repeated argv's count, workspace states that came back)."""
    p = (stats or {}).get("progress")
    if not p:
        return "-", "-", "-", "-"
    ws = p.get("workspace_returns") if p.get("workspace_states") is not None else "-"
    return f"{p['idle_seconds']:.0f}s", p["execs"], p["top_exec_repeats"], ws


def _queue(stats):
    """The QUEUE column: the gateway's queue depth / wait, once it reports them."""
    if not stats or "queue_depth" not in stats:
        return "-"
    wait = stats.get("queue_wait_ms")
    return f"{stats['queue_depth']}" + (f"/{wait:.0f}ms" if wait is not None else "")


@click.command()
@click.option("--all", "show_all", is_flag=True, help="Include finished runs that are not a manifest's.")
@click.option("--json", "as_json", is_flag=True)
def ps(show_all, as_json):
    """List the agents of every manifest that is up, then the other runs
    (running ones; --all: finished too): identity, state, weight, uptime."""
    rows, seen = [], set()
    for rec in _records():
        for e in rec["agents"]:
            run = api.find_run(e["run_id"]) if e.get("run_id") else None
            rows.append(_row(run, rec["manifest"], e, e.get("weight")))
            seen.add(e.get("run_id"))
    rows += [_row(r) for r in api.list_runs(running_only=not show_all) if r.run_id not in seen]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo("no running agents" if not show_all else "no runs", err=True)
        return
    fmt = "{:<24} {:<16} {:<11} {:<12} {:>6} {:>7} {:>7} {:>5} {:>9} {:>6} {:>6} {:>6} {:>6} {:>4} {:>5}  {}"
    click.echo(fmt.format("RUN_ID", "AGENT", "STATUS", "MANIFEST", "WEIGHT", "UPTIME", "PID", "PIDS",
                          "EVENTS", "LOST", "QUEUE", "IDLE", "EXECS", "REP", "WSREP", "COMMAND"))
    for r in rows:
        status = r["status"] + (f"({r['exit_status']})" if r["exit_status"] is not None else "")
        click.echo(fmt.format(r["run_id"] or "-", str(r["agent"])[:16], status,
                              (r["manifest"] or "-")[:12], r["weight"] or "-", _uptime(r["uptime"]),
                              r["root_pid"] or "-", r["pids"], r["events"], r["lost"], _queue(r["stats"]),
                              *_progress(r["stats"]),
                              r["command"][:60] or (r.get("error") or "")[:60]))
