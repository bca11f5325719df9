"""agentwatch trial: run one command N times under one policy and report
every kernel-observed rate with a Wilson 95% interval (docs/trials.md).

  agentwatch trial [run] -n N [--parallel P] [--policy FILE | --manifest FILE --agent NAME]
                   [--pass EXPR | --pass-cmd CMD] [--baseline TRIAL_ID] [--json] [--name NAME]
                   -- CMD [ARG...]
  agentwatch trial ls [--json]
  agentwatch trial show TRIAL_ID [--json]

`trial` is a group whose default subcommand is `run`: anything after
`trial` that is not `run`, `ls` or `show` is the run's (so `agentwatch
trial -n 5 -- ls` runs ls five times; `agentwatch trial ls` lists trials).

The runs go through agentwatch.api: on the daemon when one answers
(api.daemon_launch: P at a time, each on its own connection), else in
this process on one shared monitor (api.open_monitor + api.start: a
process may hold one run with a monitor of its own, and api.run installs
signal handlers, which only the main thread may). The statistics are
agentwatch/harness/trials.py (api.trials); the runner lives here, like
cli/up.py's supervisor, because it is a client of the public API, which
sits above the harness in the layer table (tests/unit/test_imports.py).

Stored: <state dir>/trials/TRIAL_ID/trial.json (command, policy, N, the
per-run records, the report) and out/NNN.log (each run's stdout and
stderr, and agentwatch's lines about it).

Exit status: 0 when the trial ran (whatever its pass rate), 1 when it
could not (bad input, checked before any run starts; a refused run),
130 when interrupted (the runs that finished are saved)."""
import json
import os
import secrets
import shutil
import subprocess
import sys
import time

import click

from agentwatch import api
from .run import AGENT_COMMAND, agent_command_argument

KS = (1, 2, 4, 8)                 # pass^k and pass@k for these k (k <= N)
POLL_S = 0.05
WRITES = frozenset(("write", "create", "truncate"))
# errors that every run of the trial would hit again: stop the trial
FATAL = (api.PrivilegeError, api.KernelFeatureError, api.PolicyError, api.UsageError)


# ---------------------------------------------------------------- the store

def new_trial_id():
    """Time-sortable and unique, like run ids: 20261203-153000-3f9a1c."""
    return time.strftime("%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)


def trials_dir():
    return api.state_path("trials")


def trial_path(trial_id, *parts):
    return api.state_path("trials", trial_id, *parts)


def save_trial(trial):
    path = trial_path(trial["trial_id"], "trial.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(trial, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def list_trials():
    """Every stored trial, oldest first."""
    try:
        ids = sorted(os.listdir(trials_dir()))
    except FileNotFoundError:
        return []
    out = [t for t in (_read(trial_path(i, "trial.json")) for i in ids) if t and "trial_id" in t]
    for t in out:
        # a trial whose agentwatch died (kill -9) never saved its end
        pid = t.get("pid")
        alive = bool(pid) and api.process_start_time(pid) == t.get("start_time")
        if t.get("state") == "running" and not alive:
            t["state"] = "crashed"
    return out


def load_trial(trial_id):
    """The stored trial with this id or unique id prefix; ClickException otherwise."""
    ids = [t["trial_id"] for t in list_trials()]
    found = [i for i in ids if i == trial_id] or [i for i in ids if i.startswith(trial_id)]
    if len(found) != 1:
        why = "no trial has" if not found else f"{len(found)} trials have"
        raise click.ClickException(f"{why} the id {trial_id!r} under {trials_dir()} "
                                   "('agentwatch trial ls' lists them)")
    return _read(trial_path(found[0], "trial.json"))


# ---------------------------------------------------------------- one run's record

def _host(e):
    addr, port = e.get("addr"), e.get("port")
    if e.get("family") == "inet6":
        return f"[{addr}]:{port}"
    return f"{addr}:{port}"


def run_record(events, index=0, run_id=None, exit_status=None, duration=None):
    """The fields of one run (what --pass sees, what the report counts)
    from its log's event dicts: exit, reason, violations (category ->
    count), rules, denials (kernel denials, the end event's
    kernel_denials summed), hosts (addr:port of connects that did not
    fail), names (the egress guard's allowed flows), files (written:
    abspaths of file events with write, create or truncate access that
    succeeded), duration (s, start to end event), tokens (LLM, in + out)."""
    start = end = None
    hosts, names, files = set(), set(), set()
    tokens = 0
    for e in events:
        kind = e.get("kind")
        if kind == "lifecycle":
            if e.get("phase") == "start" and start is None:
                start = e
            elif e.get("phase") == "end":
                end = e
        elif kind == "net" and e.get("op") == "connect" and e.get("family") in ("inet", "inet6"):
            if e.get("error") in (None, "EINPROGRESS") and e.get("addr"):
                hosts.add(_host(e))
        elif kind == "flow" and e.get("decision") == "allow" and e.get("name"):
            names.add(e["name"])
        elif kind == "file" and e.get("abspath") and not e.get("error"):
            if WRITES & set(e.get("access") or ()):
                files.add(e["abspath"])
        elif kind == "llm":
            tokens += int(e.get("tokens_in") or 0) + int(e.get("tokens_out") or 0)
    d = (end or {}).get("detail") or {}
    verdict = d.get("violations") or {}
    rules = dict(verdict.get("by_rule") or {})
    denials_by = {k: int(v.get("denials") or 0) for k, v in (d.get("kernel_denials") or {}).items()
                  if isinstance(v, dict)}
    term = d.get("termination")
    if isinstance(term, dict) and term.get("reason"):
        reason = str(term["reason"])
    elif d.get("killed_for") == "resources.wall_time" or rules.get("resources.wall_time"):
        reason = "timeout"
    else:
        reason = "exit"
    if exit_status is None:
        exit_status = d.get("exit_status")
    if start is not None and end is not None:
        duration = round(end["ts"] - start["ts"], 6)
    return {"index": index, "run_id": run_id or (end or start or {}).get("run_id"),
            "exit": exit_status, "reason": reason,
            "violations": dict(verdict.get("by_category") or {}), "rules": rules,
            "denials": sum(denials_by.values()), "denials_by": denials_by,
            "hosts": sorted(hosts), "names": sorted(names), "files": sorted(files),
            "duration": duration, "tokens": tokens, "killed_for": d.get("killed_for"),
            "pass": None, "error": None}


def error_record(index, message, run_id=None, duration=None):
    """A run that did not get to its end event (refused, or its log is gone)."""
    return {"index": index, "run_id": run_id, "exit": None, "reason": "error", "violations": {},
            "rules": {}, "denials": 0, "denials_by": {}, "hosts": [], "names": [], "files": [],
            "duration": duration, "tokens": 0, "killed_for": None, "pass": None, "error": message}


def pass_fields(rec):
    return {k: rec[k] for k in api.trials.PASS_FIELDS}


# ---------------------------------------------------------------- the report

def _rate_keys(records):
    """(key, label) of every rate the records give, in report order."""
    reasons, cats, rules, hosts, names = set(), set(), set(), set(), set()
    for r in records:
        reasons.add(r["reason"])
        cats.update(k for k, v in r["violations"].items() if v)
        rules.update(k for k, v in r["rules"].items() if v)
        hosts.update(r["hosts"])
        names.update(r["names"])
    keys = [("exit:0", "exit status 0")]
    keys += [(f"reason:{x}", f"ended: {x}") for x in sorted(reasons)]
    keys += [("violation:any", "any violation")]
    keys += [(f"category:{x}", f"violation {x}") for x in sorted(cats)]
    keys += [(f"rule:{x}", f"  rule {x}") for x in sorted(rules)]
    keys += [("denial:any", "any kernel denial"), ("files:any", "wrote a file")]
    keys += [(f"host:{x}", f"connected {x}") for x in sorted(hosts)]
    keys += [(f"name:{x}", f"reached {x}") for x in sorted(names)]
    return keys


def _holds(key, r):
    kind, _, value = key.partition(":")
    if kind == "exit":
        return r["exit"] == 0
    if kind == "reason":
        return r["reason"] == value
    if kind == "violation":
        return sum(r["violations"].values()) > 0
    if kind == "category":
        return r["violations"].get(value, 0) > 0
    if kind == "rule":
        return r["rules"].get(value, 0) > 0
    if kind == "denial":
        return r["denials"] > 0
    if kind == "files":
        return bool(r["files"])
    if kind == "host":
        return value in r["hosts"]
    if kind == "name":
        return value in r["names"]
    raise ValueError(key)


def _count(key, records):
    return sum(1 for r in records if _holds(key, r)), len(records)


def _pass_counts(records):
    judged = [r for r in records if r.get("pass") is not None]
    return sum(1 for r in judged if r["pass"]), len(judged)


def make_report(records, pass_spec=None, baseline=None):
    """The report of a trial's per-run records (a dict, stored in
    trial.json and printed by format_report). baseline: a stored trial,
    whose runs are counted for the same rates and compared."""
    T = api.trials
    base_records = (baseline or {}).get("runs") or []
    keys = dict(_rate_keys(base_records))
    keys.update(_rate_keys(records))                       # this trial's labels and order win
    order = [k for k, _ in _rate_keys(records)] + [k for k, _ in _rate_keys(base_records)
                                                  if k not in dict(_rate_keys(records))]
    rows = []
    for key in order:
        k, n = _count(key, records)
        row = dict(T.rate(k, n), key=key, label=keys[key])
        if baseline is not None:
            bk, bn = _count(key, base_records)
            row["base"] = T.rate(bk, bn)
            row["compare"] = T.compare((bk, bn), (k, n))
        rows.append(row)
    out = {"runs": len(records), "rates": rows, "pass": None, "pass_k": [],
           "duration": None, "tokens": sum(r["tokens"] for r in records),
           "baseline": (baseline or {}).get("trial_id")}
    c, n = _pass_counts(records)
    if pass_spec and n:
        out["pass"] = dict(T.rate(c, n), key="pass", label="pass", spec=pass_spec)
        out["pass_k"] = [{"k": k, "pass_hat_k": T.pass_hat_k(c, n, k), "pass_at_k": T.pass_at_k(c, n, k)}
                         for k in KS if k <= n]
        bc, bn = _pass_counts(base_records)
        if baseline is not None and bn:
            out["pass"]["base"] = T.rate(bc, bn)
            out["pass"]["compare"] = T.compare((bc, bn), (c, n))
            out["pass"]["base_spec"] = baseline.get("pass")
    durations = [r["duration"] for r in records if r.get("duration") is not None]
    if durations:
        q = T.quantiles(durations, (0.5, 0.9, 1.0))
        out["duration"] = {"p50": q[0.5], "p90": q[0.9], "max": q[1.0]}
    out["errors"] = sum(1 for r in records if r.get("error"))
    return out


def _p(x):
    return "-" if x is None else f"{x:.2f}"


def _ci(r):
    return f"[{r['lo']:.2f}, {r['hi']:.2f}]"


def _table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = []
    for row in [header] + rows:
        cells = [str(x).ljust(w) if i == 0 or i == len(row) - 1 else str(x).rjust(w)
                 for i, (x, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_report(trial):
    """A stored trial's report as the terminal table (plain text)."""
    rep = trial["report"]
    lines = [f"trial {trial['trial_id']}" + (f" ({trial['name']})" if trial.get("name") else "")
             + f": {rep['runs']} of {trial['n']} runs" + (" (interrupted)" if trial.get("state") ==
                                                        "interrupted" else ""),
             f"command: {' '.join(trial['command'])}",
             f"policy: {trial.get('policy') or '(none)'}"]
    if rep.get("errors"):
        lines.append(f"errors: {rep['errors']} run(s) did not reach their end (counted, exit none)")
    base = rep.get("baseline")
    if base:
        lines.append(f"baseline: {base} (p: Fisher exact when an expected cell < 5, else the "
                     "two-proportion z-test; * p < 0.05)")
    rows = list(rep["rates"]) + ([rep["pass"]] if rep.get("pass") else [])
    header = ["RATE", "K/N", "P", "95% CI"]
    if base:
        header += ["BASE", "DIFF", "H", "P-VALUE", ""]
    header += ["NOTE"]
    table = []
    for r in rows:
        cells = [r["label"], f"{r['k']}/{r['n']}", _p(r["p"]), _ci(r)]
        if base:
            c = r.get("compare")
            if c is None:
                cells += ["-", "-", "-", "-", ""]
            else:
                b = r["base"]
                cells += [f"{b['k']}/{b['n']}", "-" if c["diff"] is None else f"{c['diff']:+.2f}",
                          "-" if c["cohens_h"] is None else f"{c['cohens_h']:+.2f}",
                          f"{c['p']:.3g} {c['test']}", "*" if c["flag"] else ""]
        cells.append(r.get("note") or "")
        table.append(cells)
    lines += [""] + _table(header, table)
    if rep.get("pass"):
        spec = rep["pass"]["spec"]
        lines += ["", f"pass: {spec}"]
        if rep["pass_k"]:
            lines += _table(["K", "PASS^K", "PASS@K"],
                            [[x["k"], f"{x['pass_hat_k']:.3f}", f"{x['pass_at_k']:.3f}"]
                             for x in rep["pass_k"]])
    d = rep.get("duration")
    if d:
        lines += ["", f"duration: p50 {d['p50']:.2f} s, p90 {d['p90']:.2f} s, max {d['max']:.2f} s"]
    if rep.get("tokens"):
        lines.append(f"LLM tokens: {rep['tokens']} in all, {rep['tokens'] / max(rep['runs'], 1):.0f} a run")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- checks before any run

def resolve_command(argv, env):
    """ClickException unless argv[0] is an executable file (a path, or a
    name on env's PATH)."""
    cmd = argv[0]
    if "/" in cmd:
        ok = os.path.isfile(cmd) and os.access(cmd, os.X_OK)
    else:
        ok = shutil.which(cmd, path=env.get("PATH", os.defpath)) is not None
    if not ok:
        where = "no executable file" if "/" in cmd else "not found on PATH"
        raise click.ClickException(f"{cmd}: {where}")


def check_pass(expr):
    try:
        return api.trials.compile_pass(expr)
    except ValueError as e:
        raise click.ClickException(f"--pass {expr!r}: {e}") from None


# ---------------------------------------------------------------- the runner

def run_pass_cmd(cmd, run_id, log, out_fd, env):
    """Run the --pass-cmd with AGENTWATCH_RUN_ID and AGENTWATCH_RUN_LOG;
    True when it exits 0. Its status comes back on a pipe, not from
    waitpid: an in-process monitor reaps every child of this process."""
    env = dict(env, AGENTWATCH_RUN_ID=run_id or "", AGENTWATCH_RUN_LOG=log or "")
    p = subprocess.Popen(["/bin/sh", "-c", 'sh -c "$1" >&2 </dev/null; echo "$?"', "sh", cmd],
                         stdout=subprocess.PIPE, stderr=out_fd, stdin=subprocess.DEVNULL, env=env)
    status = p.stdout.read().decode(errors="replace").strip().splitlines()
    p.stdout.close()
    try:
        p.wait()
    except ChildProcessError:
        pass
    return bool(status) and status[-1] == "0"


class Runner:
    """N runs of one command, P at a time, through the API."""

    def __init__(self, trial, options_of, on_daemon, parallel, pass_fn=None, pass_cmd=None,
                 progress=None):
        self.trial, self.options_of, self.on_daemon, self.parallel = trial, options_of, on_daemon, parallel
        self.pass_fn, self.pass_cmd, self.progress = pass_fn, pass_cmd, progress
        self.records, self.stopped = [], []
        self.live = {}                # index -> (handle, fds, started)
        self.monitor = None

    def out_path(self, i):
        return trial_path(self.trial["trial_id"], "out", f"{i:03d}.log")

    def _launch(self, i):
        os.makedirs(os.path.dirname(self.out_path(i)), exist_ok=True)
        out = os.open(self.out_path(i), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        opts = self.options_of(i)
        started = time.monotonic()
        try:
            if self.on_daemon:
                handle = api.daemon_launch(opts, stdio=(null, out, out))
                os.close(null)
                os.close(out)
                fds = ()
            else:
                opts.stdio = (null, out, out)
                opts.stderr = open(os.dup(out), "w", buffering=1)
                fds = (null, out, opts.stderr)
                handle = api.start(opts, monitor=self.monitor)
        except BaseException:
            for fd in (null, out):
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise
        self.live[i] = (handle, fds, started)

    def _close(self, fds):
        for fd in fds:
            try:
                fd.close() if hasattr(fd, "close") else os.close(fd)
            except OSError:
                pass

    def _collect(self, i):
        handle, fds, started = self.live.pop(i)
        took = round(time.monotonic() - started, 6)
        run_id = getattr(handle, "run_id", None)
        try:
            result = handle.wait()
        except FATAL:
            self._close(fds)
            raise
        except api.AgentwatchError as e:
            rec = error_record(i, str(e), run_id, took)
        else:
            try:
                events = list(api.read_log(result.run_id))
                rec = run_record(events, i, result.run_id, result.exit_status, took)
            except (api.AgentwatchError, OSError) as e:
                rec = error_record(i, f"its log: {e}", result.run_id, took)
                rec["exit"] = result.exit_status
        self._close(fds)
        rec["output"] = self.out_path(i)
        if self.pass_fn is not None and rec["error"] is None:
            try:
                rec["pass"] = bool(self.pass_fn(pass_fields(rec)))
            except Exception as e:        # noqa: BLE001 - a type error on this run's values
                rec["pass"] = False
                rec["pass_error"] = f"{type(e).__name__}: {e}"
        elif self.pass_cmd is not None:
            log = api.log_path(rec["run_id"]) if rec["run_id"] else ""
            with open(self.out_path(i), "a") as f:
                f.write(f"--- agentwatch trial: --pass-cmd {self.pass_cmd}\n")
                f.flush()
                rec["pass"] = run_pass_cmd(self.pass_cmd, rec["run_id"], log, f.fileno(),
                                           self.options_of(i).env)
        self.records.append(rec)
        if self.progress is not None:
            self.progress.update(1)

    def _stop_all(self):
        for handle, _, _ in self.live.values():
            try:
                handle.stop()
            except Exception:              # noqa: BLE001 - ended meanwhile
                pass

    def _drain_stopped(self):
        """Wait for every stopped run (a second Ctrl-C: SIGKILL at once)."""
        while self.live:
            i, (handle, fds, _) = next(iter(self.live.items()))
            try:
                result = handle.wait()
                rid = result.run_id if result is not None else getattr(handle, "run_id", None)
            except KeyboardInterrupt:
                self._stop_all()           # the second stop kills
                continue
            except Exception:              # noqa: BLE001 - stopped runs are not counted
                rid = getattr(handle, "run_id", None)
            self._close(fds)
            del self.live[i]
            self.stopped.append({"index": i, "run_id": rid})

    def run(self, n):
        """Run all n; returns True when interrupted (what finished is kept)."""
        pending = list(range(n))
        try:
            while pending or self.live:
                while pending and len(self.live) < self.parallel:
                    self._launch(pending.pop(0))
                for i in [i for i, (h, _, _) in self.live.items() if h.done]:
                    self._collect(i)
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            self._stop_all()
            self._drain_stopped()
            return True
        except BaseException:
            self._stop_all()
            self._drain_stopped()
            raise
        return False


# ---------------------------------------------------------------- the commands

class TrialGroup(click.Group):
    """`trial ARGS`: ARGS starting with a subcommand's name go to it; any
    other go to `trial run` (so `trial -n 5 -- CMD` is `trial run -n 5 -- CMD`)."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run"] + list(args)
        return super().parse_args(ctx, args)


@click.group("trial", cls=TrialGroup)
def trial_group():
    """Run a command N times under one policy: every rate with a Wilson 95%
    interval, pass^k, and a comparison with a baseline trial.

    agentwatch trial -n N [OPTIONS] -- CMD [ARG...] (that is `trial run`);
    agentwatch trial ls; agentwatch trial show TRIAL_ID. docs/trials.md
    says how to read the report."""


def _manifest_options(manifest, agent_name):
    m = api.load_manifest(manifest)
    names = [a.name for a in m.agents]
    if agent_name is None:
        if len(m.agents) != 1:
            raise click.ClickException(f"--manifest {manifest}: name one of its agents with --agent "
                                       f"({', '.join(names)})")
        agent_name = names[0]
    spec = next((a for a in m.agents if a.name == agent_name), None)
    if spec is None:
        raise click.ClickException(f"--agent {agent_name}: not an agent of {manifest} ({', '.join(names)})")
    return m, spec


@trial_group.command("run", context_settings=AGENT_COMMAND)
@click.option("-n", "n", type=int, required=True, help="How many runs (>= 1).")
@click.option("--parallel", "parallel", type=int, default=1, show_default=True,
              help="Runs at the same time.")
@click.option("--policy", "policy", type=click.Path(dir_okay=False),
              help="The policy every run gets.")
@click.option("--manifest", type=click.Path(dir_okay=False),
              help="Take the agent (command, policy, weight, budgets, env...) from a manifest.")
@click.option("--agent", "agent_name", help="The manifest's agent (default: its only one).")
@click.option("--pass", "pass_expr", metavar="EXPR",
              help="A run passes when EXPR holds over its fields: exit, reason, violations, rules, "
                   "denials, hosts, names, files, duration, tokens (docs/trials.md).")
@click.option("--pass-cmd", "pass_cmd", metavar="CMD",
              help="A run passes when this shell command exits 0 (run after it, with "
                   "AGENTWATCH_RUN_ID and AGENTWATCH_RUN_LOG set).")
@click.option("--baseline", metavar="TRIAL_ID", help="Compare every rate with this stored trial.")
@click.option("--json", "as_json", is_flag=True, help="The stored trial as JSON on stdout.")
@click.option("--name", help="The trial's name (and the agent name of its runs).")
@click.option("--daemon/--no-daemon", "use_daemon", default=None,
              help="Run on the daemon (it must answer) or in this process; default: the daemon "
                   "when one answers.")
@agent_command_argument(required=False)
@click.pass_context
def trial_run(ctx, n, parallel, policy, manifest, agent_name, pass_expr, pass_cmd, baseline, as_json,
              name, use_daemon, command):
    """Run COMMAND N times: agentwatch trial -n N [OPTIONS] -- CMD [ARG...]

    Exit status 0 when the trial ran, whatever its pass rate; 1 when it
    could not; 130 when interrupted (the finished runs are saved)."""
    # every check before any run starts
    if n < 1:
        raise click.ClickException(f"-n {n}: a trial needs at least one run")
    if parallel < 1:
        raise click.ClickException(f"--parallel {parallel}: at least 1")
    if policy and manifest:
        raise click.ClickException("--policy and --manifest: give one (a manifest's agent has its policy)")
    if agent_name and not manifest:
        raise click.ClickException("--agent names an agent of a --manifest")
    if pass_expr is not None and pass_cmd is not None:
        raise click.ClickException("--pass and --pass-cmd: give one")
    pass_fn = check_pass(pass_expr) if pass_expr is not None else None
    if pass_cmd is not None and not pass_cmd.strip():
        raise click.ClickException("--pass-cmd: an empty command")
    base = load_trial(baseline) if baseline else None
    spec = None
    env = dict(os.environ)
    cwd = os.getcwd()
    try:
        if manifest:
            m, spec = _manifest_options(manifest, agent_name)
            policy = spec.policy
            env.update(spec.env)
            cwd = spec.workspace or os.path.dirname(m.path)
            command = tuple(command) or tuple(spec.command)
        if not command:
            raise click.ClickException("no command: agentwatch trial -n N [OPTIONS] -- CMD [ARG...]")
        if policy:
            api.load_policy(policy)
    except api.AgentwatchError as e:
        raise click.ClickException(str(e)) from None
    resolve_command(list(command), env)
    on_daemon = bool(use_daemon) if use_daemon is not None else api.daemon_status() is not None
    if use_daemon and api.daemon_status() is None:
        raise click.ClickException(f"--daemon: no agentwatch daemon answers on {api.daemon_socket()}")
    if not on_daemon and os.geteuid() != 0:
        raise click.ClickException("agentwatch trial runs agents: it needs root, or a running daemon "
                                   "('agentwatch daemon start')")

    policy = os.path.abspath(policy) if policy else None
    trial_id = new_trial_id()
    trial = {"trial_id": trial_id, "name": name, "started": time.time(), "ended": None,
             "state": "running", "command": list(command), "cwd": cwd, "policy": policy,
             "policy_sha256": _sha256(policy), "manifest": os.path.abspath(manifest) if manifest else None,
             "agent": spec.name if spec else None, "n": n, "parallel": parallel, "on_daemon": on_daemon,
             "pass": (f"--pass {pass_expr}" if pass_expr is not None else
                      f"--pass-cmd {pass_cmd}" if pass_cmd is not None else None),
             "baseline": base["trial_id"] if base else None, "runs": [], "stopped": [], "report": None,
             "pid": os.getpid(), "start_time": api.process_start_time(os.getpid())}
    save_trial(trial)

    def options_of(i):
        run_env = dict(env, AGENTWATCH_TRIAL_ID=trial_id, AGENTWATCH_TRIAL_RUN=str(i))
        opts = api.RunOptions(argv=list(command), policy_path=policy, name=name, cwd=cwd, env=run_env,
                              workspace=cwd)
        if spec is not None:
            opts.name = name or spec.name
            opts.weight = spec.weight
            opts.prompt_path = spec.prompt
            opts.allow_downgrade = spec.allow_downgrade
            for k, v in spec.budgets.items():
                setattr(opts, f"budget_{k}", float(v) if k == "cost" else v)
        return opts

    bar = None
    if sys.stderr.isatty() and not as_json:
        bar = click.progressbar(length=n, label=f"trial {trial_id}", file=sys.stderr)
    runner = Runner(trial, options_of, on_daemon, min(parallel, n), pass_fn, pass_cmd, bar)
    error = None
    try:
        if bar is not None:
            bar.__enter__()
        if on_daemon:
            interrupted = runner.run(n)
        else:
            with api.open_monitor() as mon:
                runner.monitor = mon
                interrupted = runner.run(n)
    except KeyboardInterrupt:                  # while the monitor loaded: no run yet
        interrupted = True
    except api.AgentwatchError as e:
        interrupted, error = False, e
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    records = sorted(runner.records, key=lambda r: r["index"])
    trial.update(runs=records, stopped=runner.stopped, ended=time.time(),
                 state="failed" if error else "interrupted" if interrupted else "done",
                 report=make_report(records, trial["pass"], base))
    if error:
        trial["error"] = str(error)
    save_trial(trial)
    if error:
        raise click.ClickException(f"{error} (trial {trial_id}: {len(records)} run(s) saved)")
    if as_json:
        click.echo(json.dumps(trial, indent=1, sort_keys=True))
    else:
        click.echo(format_report(trial), nl=False)
    if interrupted:
        click.echo(f"agentwatch: trial {trial_id} interrupted: {len(records)} of {n} runs saved", err=True)
        ctx.exit(130)


def _sha256(path):
    if not path:
        return None
    import hashlib
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


@trial_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per trial (no runs).")
def trial_ls(as_json):
    """List stored trials: id, when, runs, pass rate, command."""
    rows = []
    for t in list_trials():
        rep = t.get("report") or {}
        p = rep.get("pass")
        summary = {"trial_id": t["trial_id"], "name": t.get("name"), "started": t.get("started"),
                   "state": t.get("state"), "runs": len(t.get("runs") or []), "n": t.get("n"),
                   "pass": f"{p['k']}/{p['n']}" if p else None, "command": t.get("command")}
        if as_json:
            click.echo(json.dumps(summary, sort_keys=True))
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t["started"])) if t.get("started") else "-"
        rows.append([t["trial_id"], when, f"{summary['runs']}/{summary['n']}", summary["pass"] or "-",
                     summary["state"] or "-", " ".join(summary["command"] or [])])
    if not as_json:
        if not rows:
            click.echo(f"no trials under {trials_dir()}")
            return
        for line in _table(["TRIAL", "WHEN (UTC)", "RUNS", "PASS", "STATE", "COMMAND"], rows):
            click.echo(line)


@trial_group.command("show")
@click.argument("trial_id")
@click.option("--json", "as_json", is_flag=True, help="The stored trial as JSON.")
def trial_show(trial_id, as_json):
    """Print a stored trial's report (TRIAL_ID or a unique prefix)."""
    t = load_trial(trial_id)
    if as_json:
        click.echo(json.dumps(t, indent=1, sort_keys=True))
    elif not t.get("report"):
        click.echo(f"trial {t['trial_id']}: {t.get('state')}, no report yet")
    else:
        click.echo(format_report(t), nl=False)
