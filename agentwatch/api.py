"""The public API: what the CLI (cli/) and the harness use, and nothing else.

Runs
    run(options) -> RunResult            blocking: on the daemon when one answers, else here
    start(options) -> RunHandle          in the background, in this process: wait(), stop(), events
    subscribe(run) -> a run's decoded events, live (a run of this process) or from its log
    follow_events(...) -> the event dicts every run logs (`agentwatch tail`)
    list_runs(), find_run(), read_log(), log_path(), verify_log(), gc()
    report() -> Report of a run's log; render_report_html(), render_report_text()
    run_stats(run_id) -> the harness's live figures of a run ({} until the gateway gives some)
Manifests (`agentwatch up`)
    check_manifest(), load_manifest(), state_path(), process_start_time()
Policies
    check_policy(), load_policy(), lint_policies(), explain_policy(),
    enforcement_plan(), describe_enforcement(), diff_policies(), policy_variables()
Keys and signatures
    generate_key(), sign_files(), verify_files(), keys_dir(), trusted_dir()
Host and daemon
    doctor(), daemon_status(), daemon_start(), daemon_stop(), daemon_serve(),
    daemon_submit(), daemon_launch() -> DaemonRunHandle, daemon_socket()
Agent-to-agent broker (the daemon serves it)
    broker() -> BrokerClient (the standard-library client agents use too),
    broker_socket(), inspect_token() -> the claims of a scope token, offline
Trials (`agentwatch trial`)
    trials: the statistics module (agentwatch/harness/trials.py: Wilson
    intervals, pass^k, Fisher exact, compare(), compile_pass()), imported
    on first use

Every failure a user can cause raises an agentwatch.core.errors type (re-exported
here) whose message is one line for the user. Return values are dataclasses
(or the documented types of the layers below: Policy, LintResult, Check,
EnforcementPlan, Event). Importing this module is cheap: the runner, the
policy engine and bcc are imported when a function needs them, so that
`agentwatch run` on the daemon stays a thin client (tests/unit/test_cli.py).

About 750 lines, and one file on purpose: it is the whole public surface
read in one place (a facade: each function a few lines over the layer that
does the work, each result a dataclass), and tests/unit/test_api.py pins it
as one list. The work itself lives below; nothing here is worth a module.
"""
import contextlib
import os
import signal
import sys
import threading
from dataclasses import dataclass, field

from .core import state
from .core.options import RunOptions, cli_fields
from .core.errors import (AgentwatchError, IntegrityError, KernelFeatureError, LaunchError, NotFoundError,
                     PolicyError, PrivilegeError, UsageError)
from .follow import Filter as _Filter
from .follow import parse_since

__all__ = [
    # errors
    "AgentwatchError", "IntegrityError", "KernelFeatureError", "LaunchError", "NotFoundError",
    "PolicyError", "PrivilegeError", "UsageError",
    # runs
    "RunOptions", "run_option_fields", "RunResult", "RunHandle", "run", "start", "open_monitor",
    "subscribe", "LogSubscription", "follow_events", "parse_since", "format_event", "use_color",
    "RunInfo", "list_runs", "find_run", "log_path", "read_log", "LogVerification", "verify_log", "gc",
    "run_stats", "Report", "report", "render_report_html", "render_report_text",
    # manifests
    "Manifest", "AgentSpec", "ManifestCheck", "check_manifest", "load_manifest", "state_path",
    "process_start_time",
    # policies
    "Policy", "Problem", "LintResult", "EnforcementPlan", "PolicyCheck", "check_policy",
    "load_policy", "lint_policies", "explain_policy", "enforcement_plan", "describe_enforcement",
    "diff_policies", "policy_variables",
    # keys and signatures
    "KeyPair", "Signed", "FileVerification", "generate_key", "sign_files", "verify_files",
    "keys_dir", "trusted_dir",
    # host and daemon
    "Check", "DoctorReport", "doctor", "DaemonRun", "DaemonStatus", "daemon_socket",
    "daemon_status", "daemon_start", "daemon_stop", "daemon_serve", "daemon_submit", "export_env",
    "DaemonRunHandle", "daemon_launch",
    # agent-to-agent broker
    "BrokerClient", "BrokerError", "broker", "broker_socket", "inspect_token", "parse_duration",
    # trials
    "trials",
]

# Types of the layers below, imported on first use (PEP 562): name -> (module, attribute)
_LAZY_TYPES = {
    "Policy": ("agentwatch.policy", "Policy"),
    "Problem": ("agentwatch.policy", "Problem"),
    "LintResult": ("agentwatch.policy.lint", "LintResult"),
    "EnforcementPlan": ("agentwatch.sandbox.plan", "EnforcementPlan"),
    "Check": ("agentwatch.doctor", "Check"),
    "Report": ("agentwatch.sinks.report", "Report"),
    "Manifest": ("agentwatch.harness.manifest", "Manifest"),
    "AgentSpec": ("agentwatch.harness.manifest", "AgentSpec"),
    "BrokerClient": ("agentwatch.harness.broker_client", "Client"),
    "BrokerError": ("agentwatch.harness.broker_client", "BrokerError"),
}


# Modules of the layers below, imported on first use: name -> module
_LAZY_MODULES = {
    "trials": "agentwatch.harness.trials",
}


def __getattr__(name):
    if name in _LAZY_MODULES:
        import importlib
        return importlib.import_module(_LAZY_MODULES[name])
    if name in _LAZY_TYPES:
        import importlib
        module, attr = _LAZY_TYPES[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_option_fields():
    """The RunOptions fields `agentwatch run` has a command line option for
    (dataclasses.Field, with metadata help, flag, path, choices, show_default)."""
    return cli_fields()


# ---------------------------------------------------------------- runs

@dataclass(frozen=True)
class RunResult:
    """How a run ended, from its log's end event."""
    exit_status: int            # the agent's own (128+N when signal N killed it)
    run_id: str
    log_path: str               # runs/<run_id>/events.jsonl in the state directory
    agent: str = ""
    events: int = 0             # events logged
    lost: int = 0               # records lost in the kernel or unmatched
    violations: int = 0
    violations_by_category: dict = field(default_factory=dict)
    killed_for: str = None      # the rule whose action kill ended the run
    summary: str = None         # the one line the run printed at its end
    on_daemon: bool = False     # served by `agentwatch daemon`
    termination: dict = None    # the end event's {reason, condition, evidence} (docs/policy.md)

    @property
    def run_status(self):
        """The exit status `agentwatch run` gives: per termination reason
        (done 0, loop 81, no_progress 82, budget 83, timeout 124), else
        the agent's own."""
        from .engine.termination import exit_status
        return exit_status(self.termination, self.exit_status)


def log_path(run_id):
    """Where run run_id logs its events (whether or not it exists)."""
    return state.run_path(run_id, "events.jsonl")


def _end_event(path, chunk=1 << 16):
    """The last lifecycle end event of a log, or None (read from its end)."""
    import json
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            back = min(size, chunk)
            while True:
                f.seek(size - back)
                lines = f.read(back).splitlines()
                if back < size:
                    lines = lines[1:]             # the first may be cut
                for line in reversed(lines):
                    if b'"phase":"end"' in line or b'"phase": "end"' in line:
                        try:
                            d = json.loads(line)
                        except ValueError:
                            continue
                        if d.get("kind") == "lifecycle" and d.get("phase") == "end":
                            return d
                if back >= size:
                    return None
                back = min(size, back * 4)
    except OSError:
        return None


def _result(run_id, exit_status, summary=None, on_daemon=False):
    path = log_path(run_id)
    end = _end_event(path) or {}
    d = end.get("detail") or {}
    verdict = d.get("violations") or {}
    return RunResult(exit_status=exit_status, run_id=run_id, log_path=path, agent=end.get("agent", ""),
                     events=d.get("events", 0),
                     lost=d.get("lost_events", 0) + d.get("lost_stash", 0) + d.get("unmatched_repeats", 0),
                     violations=verdict.get("violations", 0),
                     violations_by_category=dict(verdict.get("by_category") or {}),
                     killed_for=d.get("killed_for"), summary=summary, on_daemon=on_daemon,
                     termination=d.get("termination"))


_LIVE = {}                 # run id -> RunHandle, while it runs in this process
_LIVE_LOCK = threading.Lock()
_OWN_MONITORS = [0]        # runs of this process with a monitor of their own, now


def _own_monitor_slot():
    """Two runs with monitors of their own in one process would reap each
    other's agents (a monitor reaps every child): refuse the second."""
    with _LIVE_LOCK:
        if _OWN_MONITORS[0]:
            raise UsageError("another run of this process has a monitor of its own: runs at the "
                             "same time in one process share one (api.open_monitor()), or use "
                             "the daemon")
        _OWN_MONITORS[0] += 1


def _release_monitor_slot():
    with _LIVE_LOCK:
        _OWN_MONITORS[0] -= 1


def _say(options, text):
    if text:
        print(text, file=options.stderr or sys.stderr, flush=True)


def run(options, *, daemon=None):
    """Run an agent to its end; a RunResult. daemon: None, on the daemon when
    one answers, else in this process; True, on the daemon (UsageError when
    none answers); False, in this process (root needed). On the daemon the
    agent gets our stdin, stdout and stderr, so options with stdio or
    stderr set run in this process unless daemon is True. The run's
    messages (its enforcement plan, --show events, the summary line) go to
    options.stderr (default and on the daemon: our stderr). Bad input
    raises before anything is created; SIGINT, SIGTERM and SIGHUP stop the
    agent."""
    if daemon or (daemon is None and options.stdio is None and options.stderr is None):
        result = daemon_submit(options, require=bool(daemon))
        if result is not None:
            return result
    from .run import Run
    _own_monitor_slot()
    try:
        r = Run(options)
        code = r.execute()
    finally:
        _release_monitor_slot()
    _say(options, r.summary)
    return _result(r.run_id, code, r.summary)


@contextlib.contextmanager
def open_monitor(ringbuf_pages=4096):
    """with open_monitor() as m: sensors loaded once (every group, the
    executable-mapping probes) for runs of this process at the same time,
    start(options, monitor=m); closed at the end of the block, once its
    runs ended. Needs root."""
    from .run import Monitor
    monitor = Monitor(ringbuf_pages=ringbuf_pages, map_exec=True).open()
    try:
        yield monitor
    finally:
        monitor.close()


class RunHandle:
    """A run in the background of this process (see start()).

    run_id, log_path, options: what it is. events: its decoded events
    (agentwatch.core.events.Event objects) from its start, a Subscription to
    iterate (it ends when the run ends; .missed counts what did not fit).
    subscribe(): more subscribers, from now on. stop(): stop the agent
    (signal, SIGKILL after a grace period). wait(timeout): its RunResult."""

    def __init__(self, options, monitor=None, kinds=None, maxsize=10000):
        from .run import Run
        self.options = options
        self._run = Run(options, monitor=monitor)
        self.run_id = self._run.run_id
        self.log_path = log_path(self.run_id)
        self.events = self._run.bus.subscribe(maxsize, kinds)
        self._started = threading.Event()
        self._watch = self._run.bus.subscribe(1, {"lifecycle"}, callback=self._on_lifecycle)
        self._own = monitor is None
        self._result = self._error = None
        self._thread = threading.Thread(target=self._execute, name=f"agentwatch run {self.run_id}",
                                        daemon=True)

    def _on_lifecycle(self, ev):
        if ev.phase == "start":
            self._started.set()
            self._watch.cancel()

    def _start(self):
        if self._own:
            _own_monitor_slot()
        with _LIVE_LOCK:
            _LIVE[self.run_id] = self
        self._thread.start()
        while not self._started.wait(0.02) and self._thread.is_alive():
            pass
        if self._error is not None:
            raise self._error

    def _execute(self):
        try:
            code = self._run.execute()
            _say(self.options, self._run.summary)
            self._result = _result(self.run_id, code, self._run.summary)
        except BaseException as e:       # noqa: BLE001 - handed to wait()
            self._error = e if isinstance(e, Exception) else AgentwatchError(f"run ended: {e!r}")
        finally:
            self._run.bus.close()        # subscribers end, also when the input was refused
            with _LIVE_LOCK:
                _LIVE.pop(self.run_id, None)
            if self._own:
                _release_monitor_slot()

    @property
    def done(self):
        """True once the run ended (its result or error is ready)."""
        return self._thread.ident is not None and not self._thread.is_alive()

    def subscribe(self, kinds=None, maxsize=10000, callback=None):
        """Its events from now on: a Subscription (engine/bus.py) of at most
        maxsize queued events, or callback(event) on the reader's thread
        (quick, never blocking)."""
        return self._run.bus.subscribe(maxsize, kinds, callback)

    def stop(self, signum=signal.SIGTERM):
        """Stop the agent: signum to its processes, SIGKILL after a grace
        period or at a second stop(). Returns at once; wait() for the end."""
        if not self.done:
            self._run.stop(signum)

    def wait(self, timeout=None):
        """The RunResult once the run ended; raises what ended it otherwise
        (an agentwatch error), or TimeoutError when timeout seconds pass."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"run {self.run_id} still runs after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result


def start(options, *, monitor=None, kinds=None, maxsize=10000):
    """Start a run in the background of this process; returns a RunHandle
    once its agent runs (its start event is logged). Refused input raises
    here, before anything is created. monitor: a shared one (open_monitor())
    for runs at the same time; else the run loads its own, and only one
    such run may be live in a process. kinds, maxsize: of handle.events.
    Signals to this process are not forwarded: call stop(). Needs root."""
    handle = RunHandle(options, monitor, kinds, maxsize)
    handle._start()
    return handle


class LogSubscription:
    """A run's events read from its log (a run of another process or of the
    daemon): agentwatch.core.events.Event objects, from the run's start, until the
    run ended. Lines of unknown kinds are skipped (and counted)."""

    def __init__(self, run_id, kinds=None, poll_interval=0.1):
        self.run_id = run_id
        self.kinds = frozenset(kinds) if kinds else None
        self.poll_interval = poll_interval
        self.skipped = 0
        self.missed = 0           # nothing is missed from a log; the name matches Subscription's
        self._cancelled = False

    def __iter__(self):
        from .core.events import from_dict
        flt = _Filter(run=self.run_id, kinds=tuple(self.kinds or ()))
        for d in _follow(flt, True, lambda: self._cancelled, self.poll_interval):
            try:
                yield from_dict(d)
            except (ValueError, TypeError):
                self.skipped += 1

    def cancel(self):
        """Stop at the next poll of the log."""
        self._cancelled = True


def subscribe(run, kinds=None, maxsize=10000, callback=None):
    """A run's decoded events. run: a RunHandle or the id of a run of this
    process: live, from now on (a Subscription; callback as in
    RunHandle.subscribe). Any other run id (or unique prefix): a
    LogSubscription that replays its log and follows it to the run's end."""
    if isinstance(run, RunHandle):
        return run.subscribe(kinds, maxsize, callback)
    with _LIVE_LOCK:
        handle = _LIVE.get(run)
    if handle is not None:
        return handle.subscribe(kinds, maxsize, callback)
    if callback is not None:
        raise UsageError(f"run {run}: not a run of this process; a callback needs one "
                         "(iterate the subscription instead)")
    rec = find_run(run)
    if rec is None:
        raise NotFoundError(f"no run {run!r} under {state.runs_dir()}")
    return LogSubscription(rec.run_id, kinds)


def _follow(flt, follow, stop=None, poll_interval=0.2, progress=None):
    from .follow import follow as follow_logs
    try:
        yield from follow_logs(flt, follow=follow, stop=stop, poll_interval=poll_interval,
                               progress=progress)
    except LookupError as e:
        if isinstance(e, NotFoundError):
            raise
        raise NotFoundError(str(e)) from None


def follow_events(run=None, agent=None, kinds=(), violations=False, since=None, follow=True,
                  stop=None, progress=None):
    """The event dicts runs log, as logged (what `agentwatch tail` prints).
    run: one run (id or unique prefix), replayed from its start, until it
    ended; else every run, new events only (since: also those newer than
    this Unix time; parse_since() reads '10m'), until stop() is true.
    agent: a name glob. A run id that names no run: NotFoundError.
    progress(done, total): bytes of the logs' past read of what they held
    at the start, while replaying it; done == total once, when it is over."""
    flt = _Filter(run=run, agent=agent, kinds=tuple(kinds), violations=violations, since=since)
    return _follow(flt, follow, stop, progress=progress)


def format_event(event, color=False):
    """One event (dict) as the console shows it (--show, `agentwatch tail`)."""
    from .sinks.console import format_line
    return format_line(event, color)


def use_color(stream):
    """Whether format_event(..., color=True) suits stream: a terminal, and
    NO_COLOR unset or empty."""
    from .sinks.console import use_color as console_use_color
    return console_use_color(stream)


@dataclass(frozen=True)
class RunInfo:
    """One run of the state directory, as `agentwatch ps` lists it."""
    run_id: str
    agent: str
    status: str                 # starting, running, exited, failed, crashed
    root_pid: int = None
    pids: int = 0               # live processes (at the last stats refresh)
    events: int = 0
    lost: int = 0
    started: float = None       # Unix time
    policy: str = None          # the policy's name
    policy_digest: str = None
    command: list = field(default_factory=list)
    exit_status: int = None
    log_path: str = ""
    identity: dict = field(default_factory=dict)
    crash: dict = None          # crashed: what its keeper knew (agentwatch/keeper.py), if it saw it


def _run_info(rec):
    stats = state.read_json(state.run_path(rec["run_id"], "stats.json"), {}) or {}
    ident = rec.get("identity") or {}
    return RunInfo(run_id=rec["run_id"], agent=rec.get("agent"), status=rec.get("status"),
                   root_pid=rec.get("root_pid"), pids=stats.get("pids", 0),
                   events=stats.get("events", 0),
                   lost=stats.get("lost_events", 0) + stats.get("lost_stash", 0),
                   started=ident.get("start_time"), policy=ident.get("policy_name"),
                   policy_digest=ident.get("policy_digest"), command=list(ident.get("command") or []),
                   exit_status=rec.get("exit_status"), log_path=log_path(rec["run_id"]),
                   identity=ident, crash=rec.get("crash"))


def list_runs(running_only=False):
    """The runs of the state directory ($AGENTWATCH_STATE_DIR), oldest
    first; running_only: only those whose agentwatch still runs them."""
    return [_run_info(r) for r in state.list_runs()
            if not running_only or r.get("status") == "running"]


def find_run(run_id):
    """The run with this id or unique id prefix, else None."""
    rec = state.find_run(run_id)
    return None if rec is None else _run_info(rec)


def _log_of(target):
    """(log path, run id or None): an existing file is a log; else a run id."""
    if os.path.isfile(target):
        return target, None
    rec = state.find_run(target)
    if rec is None:
        raise NotFoundError(f"{target}: no such file, and no single run has this id or prefix "
                            "(agentwatch ps --all lists runs)")
    return log_path(rec["run_id"]), rec["run_id"]


def _log_dicts(path, progress=None, every=1 << 20):
    """The JSON objects of a log's lines, None for a line that is not one;
    progress(bytes read, size) every `every` bytes and at the end."""
    import json
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        done = told = 0
        for line in f:
            done += len(line)
            if progress is not None and done - told >= every:
                progress(done, size)
                told = done
            if line.strip():
                try:
                    d = json.loads(line)
                except ValueError:
                    d = None
                yield d if isinstance(d, dict) else None
        if progress is not None:
            progress(done, max(size, done))


def read_log(target):
    """The event dicts of a run's log (RUN_ID, a unique prefix, or a log
    file), in order, as logged; lines that are not JSON are skipped."""
    path, _ = _log_of(target)
    yield from (d for d in _log_dicts(path) if d is not None)


def report(target, progress=None):
    """A Report of a run's log (RUN_ID, a unique prefix, or a log file),
    read in one pass (agentwatch/sinks/report.py: identity, enforcement,
    process tree, violations, totals, drops; lists capped per process,
    totals exact). progress(bytes read, size): called as it reads. A
    target that names nothing: NotFoundError."""
    from .sinks.report import build
    path, _ = _log_of(target)
    return build(_log_dicts(path, progress))


def render_report_html(report):
    """A Report as one self-contained HTML page (no scripts, nothing fetched)."""
    from .sinks.report import render_html
    return render_html(report)


def render_report_text(report, color=False, width=None):
    """A Report as the terminal summary (process tree, totals, violations);
    width: wrap longer lines (a terminal's columns), None: never."""
    from .sinks.report import render_text
    return render_text(report, color, width)


@dataclass(frozen=True)
class LogVerification:
    """A log's hash chain and signed seal, checked (`agentwatch log verify`)."""
    path: str
    run_id: str                 # None when a file was named
    ok: bool
    lines: int
    signer: str = None          # the host key that sealed it, when trusted
    problems: list = field(default_factory=list)   # [(line number, message)]


def verify_log(target, trust=()):
    """Check a run log (RUN_ID, a unique prefix, or a file). trust: extra
    public key files; this host's key and keys/trusted/*.pub are trusted.
    A target that names nothing: IntegrityError."""
    from . import integrity
    try:
        path, run_id = _log_of(target)
    except NotFoundError as e:
        raise IntegrityError(str(e)) from None
    report = integrity.verify_log(path, integrity.trusted_keys(trust, include_host=True), run_id=run_id)
    return LogVerification(path=path, run_id=run_id, ok=report.ok, lines=report.lines,
                           signer=report.signer, problems=[] if report.ok else report.located())


def gc(log=None):
    """Remove what a crashed agentwatch left (cgroups, records marked
    crashed); the run ids swept. log(message) hears each removal."""
    from .run import gc as gc_runs
    return gc_runs(log=log)


def run_stats(run_id, status=None):
    """The live figures of a run, for `agentwatch ps`: the LLM gateway's
    queue depth, calls in flight and waits, from the daemon (status: a
    DaemonStatus already fetched), and under "progress" the run's own
    progress signals from its stats.json (seconds since the last workspace
    write or exec, execs, the most repeated argv's count, workspace states
    that came back: engine/termination.py); {} when there are neither."""
    st = status if status is not None else daemon_status()
    gw = (st.raw.get("gateway") if st is not None else None) or {}
    out = dict((gw.get("runs") or {}).get(run_id) or {})
    progress = (state.read_json(state.run_path(run_id, "stats.json"), {}) or {}).get("progress")
    if progress:
        out["progress"] = progress
    return out


# ---------------------------------------------------------------- manifests

@dataclass(frozen=True)
class ManifestCheck:
    """A manifest read and validated: the Manifest (None on any error) and
    every problem (str() is FILE:LINE:COL: message), its policies' included."""
    manifest: object
    problems: list

    @property
    def ok(self):
        return self.manifest is not None


def check_manifest(path):
    """Read and validate a manifest (docs/manifest.md) without raising for
    its problems."""
    from .harness.manifest import check
    manifest, problems = check(path)
    return ManifestCheck(manifest, list(problems))


def load_manifest(path):
    """A valid Manifest (agents: AgentSpec, paths absolute); PolicyError
    listing its errors (FILE:LINE:COL each)."""
    from .harness.manifest import load
    return load(path)


def state_path(*parts):
    """A path in the state directory ($AGENTWATCH_STATE_DIR, default
    /var/lib/agentwatch): `agentwatch up` keeps its records in up/."""
    return os.path.join(state.state_dir(), *parts)


def process_start_time(pid):
    """The kernel's start time of pid (clock ticks since boot), None when
    it is gone or exiting (a zombie included: nobody may have reaped it
    yet). With the pid, it names one process whatever pids get reused."""
    from .core import procfs
    return None if procfs.exiting(pid) else procfs.start_time(pid)


# ---------------------------------------------------------------- policies

@dataclass(frozen=True)
class PolicyCheck:
    """A policy file read and validated: the Policy (None on any error) and
    every problem (agentwatch.policy.Problem: str() is FILE:LINE:COL: ...)."""
    policy: object
    problems: list

    @property
    def ok(self):
        return self.policy is not None


def check_policy(path):
    """Read and validate a policy file without raising for its problems."""
    from .policy import check
    policy, problems = check(path)
    return PolicyCheck(policy, list(problems))


def load_policy(path):
    """A valid Policy; PolicyError listing its errors (FILE:LINE:COL each)."""
    from .policy import load
    return load(path)


def _policy(policy):
    return load_policy(policy) if isinstance(policy, (str, os.PathLike)) else policy


def lint_policies(paths):
    """Lint policy files: a LintResult (problems, lines(), summary(),
    exit_code(strict))."""
    from .policy.lint import lint
    return lint(list(paths))


def policy_variables(workspace=None):
    """${WORKSPACE} (default: the current directory), ${HOME}, ${TMPDIR}."""
    from .policy.matchers import default_variables
    return default_variables(workspace)


def explain_policy(policy, workspace=None):
    """What a policy (a Policy or a path) allows, in plain language, after
    extends and variables; text ending in a newline."""
    from .policy.explain import explain
    return explain(_policy(policy), policy_variables(workspace))


def _our_ttys():
    out = []
    for fd in (0, 1, 2):
        name = os.ttyname(fd) if os.isatty(fd) else None
        if name and name not in out:
            out.append(name)
    return out


def enforcement_plan(policy, workspace=None, ttys=None, bpf_lsm=False):
    """The EnforcementPlan a run of the policy would get on this host
    (ttys: the agent's terminals, default those on our stdin, stdout and
    stderr)."""
    from .sandbox.plan import make_plan
    pol = _policy(policy)
    return make_plan(pol.data, policy_variables(workspace), [pol.path],
                     ttys=_our_ttys() if ttys is None else ttys, bpf_lsm=bpf_lsm)


def describe_enforcement(policy, workspace=None, ttys=None):
    """What the kernel would hold for a run of the policy on this host: a
    heading, the plan's summary, its namespaces and every grant it adds
    beyond the policy's own lists (issue #14: no silent widening)."""
    plan = enforcement_plan(policy, workspace, ttys)
    lines = ["Kernel enforcement on this host (a run of this policy)"]
    lines += [f"  {line}" for line in plan.describe()]
    if plan.path != "monitor-only" and not plan.widened:
        lines.append("  added beyond the policy: nothing")
    return lines


def diff_policies(old, new):
    """What changing old into new (Policy objects or paths) grants (+),
    revokes (-) or changes (~): one line each, "no permission changes"
    when none."""
    from .policy.diff import diff
    return list(diff(_policy(old), _policy(new)))


# ---------------------------------------------------------------- keys and signatures

@dataclass(frozen=True)
class KeyPair:
    """A signing key pair written by generate_key()."""
    key_id: str                 # ed25519:...
    private_path: str           # mode 0600
    public_path: str


@dataclass(frozen=True)
class Signed:
    """A file signed by sign_files()."""
    path: str
    sig_path: str
    signer: str


@dataclass(frozen=True)
class FileVerification:
    """A file checked against its .sig by verify_files()."""
    path: str
    ok: bool
    reason: str                 # one line: why not, or "signed by ID (trusted)"
    signer: str = None


def keys_dir():
    """Where keys live: $AGENTWATCH_STATE_DIR/keys."""
    from . import integrity
    return integrity.keys_dir()


def trusted_dir():
    """Public keys trusted wherever files are verified: keys/trusted/*.pub."""
    from . import integrity
    return integrity.trusted_dir()


def generate_key(directory=None, name="signing", force=False):
    """Write NAME.key and NAME.pub (default directory: keys_dir());
    IntegrityError when the key exists and not force."""
    from . import integrity
    kid, key_path, pub_path = integrity.generate_key(directory or keys_dir(), name, force)
    return KeyPair(kid, key_path, pub_path)


def sign_files(paths, key_file=None):
    """Sign each file (FILE.sig next to it) with key_file (default
    keys/signing.key)."""
    from . import integrity
    key = integrity.load_private_key(key_file or os.path.join(keys_dir(), "signing.key"))
    out = []
    for path in paths:
        sig = integrity.sign_file(path, key)
        out.append(Signed(path, f"{path}.sig", sig["signer"]))
    return out


def verify_files(paths, trust=(), signer=None):
    """Check each file's signature: trusted (keys/trusted/*.pub, plus the
    trust public key files) and, with signer, by that key id."""
    from . import integrity
    trusted = integrity.trusted_keys(trust)
    out = []
    for path in paths:
        info = integrity.verify_file(path, trusted, signer)
        out.append(FileVerification(path, info.ok, info.reason, info.signer))
    return out


# ---------------------------------------------------------------- host and daemon

@dataclass(frozen=True)
class DaemonRun:
    """A run the daemon serves."""
    run_id: str
    agent: str
    root_pid: int
    client: dict                # who asked: pid, uid, gid (SO_PEERCRED)


@dataclass(frozen=True)
class DaemonStatus:
    """What a running daemon says of itself."""
    pid: int
    started: float              # Unix time
    socket: str
    runs: list                  # [DaemonRun]
    sensors: dict               # tracepoints, groups, map_exec
    counters: dict              # received, lost_events, ...
    raw: dict = field(default_factory=dict, repr=False, compare=False)   # the answer as sent

    @classmethod
    def from_dict(cls, d):
        runs = [DaemonRun(r.get("run_id"), r.get("agent"), r.get("root_pid"), r.get("client") or {})
                for r in d.get("runs") or ()]
        return cls(pid=d.get("pid"), started=d.get("started"), socket=d.get("socket"), runs=runs,
                   sensors=d.get("sensors") or {}, counters=d.get("counters") or {}, raw=dict(d))

    def to_dict(self):
        """The status as the daemon sent it (for JSON output)."""
        return dict(self.raw)


def daemon_socket():
    """The daemon's socket: <state dir>/daemon.sock."""
    from . import daemon
    return daemon.socket_path()


def daemon_status():
    """The running daemon's DaemonStatus, or None when none answers."""
    from . import daemon
    st = daemon.ping()
    return None if st is None else DaemonStatus.from_dict(st)


def daemon_start(log_path=None, gateway=None):
    """Start the daemon in the background (its output in log_path, default
    <state dir>/daemon.log; gateway: an LLM gateway config file, whose
    gateway the daemon serves its runs); its DaemonStatus once it answers."""
    from . import daemon
    if gateway:
        from .harness.gateway_config import GatewayConfig
        GatewayConfig.load(gateway)          # told here, with FILE:LINE, not in the daemon's log
    return DaemonStatus.from_dict(daemon.start(log_path, gateway=gateway))


def export_env(metrics=None, otlp=None, otlp_events=None, bpf_stats=False):
    """The environment that asks the daemon for export (docs/export.md),
    as `daemon start --metrics ...` sets it before starting one, and as a
    systemd unit's Environment= would: {variable: value} of those given."""
    from .daemon.server import ENV
    values = {"metrics": metrics, "otlp": otlp, "otlp_events": otlp_events,
              "bpf_stats": "1" if bpf_stats else None}
    return {ENV[key]: value for key, value in values.items() if value}


def daemon_stop():
    """Stop the daemon and wait until it is gone (its runs' agents get
    SIGTERM, then SIGKILL); False when none was running."""
    from . import daemon
    return daemon.shutdown()


def daemon_serve(gateway=None):
    """Serve as the daemon in this process, in the foreground, until stopped
    (gateway: an LLM gateway config file, as for daemon_start)."""
    from . import daemon
    daemon.Daemon(gateway=os.path.abspath(gateway) if gateway else None).serve()


def daemon_submit(options, require=True):
    """Run an agent on the daemon, with our stdin, stdout and stderr, to its
    end: its RunResult, or None when no daemon answers (require: a
    UsageError instead). Our SIGINT, SIGTERM and SIGHUP reach the run."""
    from . import daemon
    reply = daemon.submit(options, require=require)
    if reply is None:
        return None
    return _result(reply.get("run_id"), reply["exit"], reply.get("summary"), on_daemon=True)


class DaemonRunHandle:
    """A run on the daemon started by daemon_launch(): wait(timeout) for
    its RunResult, stop(signum) forwards a stop signal, done. From any
    thread; several at once. The run lives while this process holds its
    connection: the process ending (even by SIGKILL) stops the run."""

    def __init__(self, submission, options):
        self.options = options
        self._sub = submission
        self._result = self._error = None
        self._thread = threading.Thread(target=self._wait, daemon=True,
                                        name=f"agentwatch daemon run {options.name or options.argv[0]}")

    def _wait(self):
        try:
            reply = self._sub.wait()
            self._result = _result(reply.get("run_id"), reply["exit"], reply.get("summary"),
                                   on_daemon=True)
        except BaseException as e:       # noqa: BLE001 - handed to wait()
            self._error = e if isinstance(e, Exception) else AgentwatchError(f"run ended: {e!r}")

    @property
    def done(self):
        """True once the run ended (its result or error is ready)."""
        return not self._thread.is_alive()

    def stop(self, signum=signal.SIGTERM):
        """Forward signum (SIGTERM, SIGINT or SIGHUP) to the run: the
        run's own stop (the agent tree gets it, SIGKILL 3 s later)."""
        if not self.done:
            self._sub.signal(signum)

    def wait(self, timeout=None):
        """The RunResult once the run ended; raises what ended it otherwise,
        or TimeoutError when timeout seconds pass."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the daemon run of {self.options.name or self.options.argv[0]} "
                               f"still runs after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result


def daemon_launch(options, stdio=None):
    """Start a run on the daemon and return at once: a DaemonRunHandle.
    stdio: the agent's stdin, stdout and stderr (fds; default ours). No
    signal handler is installed (daemon_submit's are the main thread's):
    call stop(). UsageError when no daemon answers; the run's own errors
    (a bad policy, a command not found) come from wait()."""
    from . import daemon
    sub = daemon.Submission.connect(require=True)
    try:
        sub.send(options, stdio)
    except BaseException:
        sub.close()
        raise
    handle = DaemonRunHandle(sub, options)
    handle._thread.start()
    return handle


@dataclass(frozen=True)
class DoctorReport:
    """Each kernel feature agentwatch uses, and what its absence disables."""
    checks: list                # [Check]: name, ok, detail, disables
    enforcement_path: str       # bpf-lsm, landlock+seccomp+cgroup-bpf or monitor-only
    daemon: DaemonStatus = None

    def table(self):
        """The checks as `agentwatch doctor` prints them."""
        from .doctor import format_table
        return format_table(self.checks)

    def to_dict(self):
        """`agentwatch doctor --json`."""
        from .doctor import report
        return dict(report(self.checks), daemon=self.daemon.to_dict() if self.daemon else None)


def doctor():
    """Probe the host (some probes load small BPF programs: root gives the
    whole answer) and ask whether a daemon runs."""
    from .doctor import enforcement_path, run_checks
    checks = run_checks()
    return DoctorReport(checks, enforcement_path(checks), daemon_status())


# ---------------------------------------------------------------- agent-to-agent broker

def broker_socket():
    """The daemon's broker socket: <state dir>/broker/broker.sock."""
    return state_path("broker", "broker.sock")


def broker(timeout=60.0):
    """A BrokerClient on the daemon's broker (the caller is whoever the
    kernel says: root outside every run is the operator, a process of a
    run is that run). NotFoundError when no broker listens."""
    from .harness.broker_client import Client
    path = os.environ.get("AGENTWATCH_BROKER") or broker_socket()
    if not os.path.exists(path):
        raise NotFoundError(f"no agentwatch broker at {path}: start the daemon "
                            "(`agentwatch daemon start`), which serves it")
    return Client(path=path, timeout=timeout)


def parse_duration(text):
    """'90s', '5m', '1h30m' or a number of seconds -> seconds (float), as
    policies write durations; UsageError for anything else."""
    from .core import units
    try:
        return units.parse_duration(text)
    except (ValueError, units.UnitError) as e:
        raise UsageError(str(e)) from None


def inspect_token(text, public_key=None):
    """A scope token's claims, decoded offline: {"claims", "signature"}
    where signature is "valid" or "invalid" against public_key (hex; by
    default this host's broker key), or "unchecked" when there is none."""
    from .harness import tokens
    try:
        claims = tokens.decode_unverified(text)
    except tokens.TokenError as e:
        raise UsageError(f"not a scope token: {e}") from None
    if public_key is None:
        key = state_path("broker", "token-key.pem")
        if os.path.exists(key):
            try:
                public_key = tokens.Signer.load_or_create(key).public_hex
            except (OSError, ValueError):
                public_key = None
    if public_key is None:
        return {"claims": claims, "signature": "unchecked"}
    try:
        tokens.verify_with(public_key, text)
        return {"claims": claims, "signature": "valid"}
    except tokens.TokenError:
        return {"claims": claims, "signature": "invalid"}
