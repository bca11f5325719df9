"""agentwatch.api, the one surface cli/ and the harness use: its names,
signatures and return shapes are pinned here (a change to them is a change
of contract: update this file on purpose), and what needs no root is run.
tests/kernel/test_api_runs.py runs agents through it (a basename of its
own: pytest imports test modules by name)."""
import dataclasses
import inspect
import json
import os
import subprocess
import sys

import click
import pytest

from agentwatch import api
from agentwatch.core import state
from agentwatch.core import options as options_mod
from agentwatch.core.events import Event
from test_cli import make_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POLICIES = os.path.join(REPO, "policies")

ALL = sorted([
    "AgentwatchError", "IntegrityError", "KernelFeatureError", "LaunchError", "NotFoundError",
    "PolicyError", "PrivilegeError", "UsageError",
    "RunOptions", "run_option_fields", "RunResult", "RunHandle", "run", "start", "open_monitor",
    "subscribe", "LogSubscription", "follow_events", "parse_since", "format_event", "use_color",
    "RunInfo", "list_runs", "find_run", "log_path", "read_log", "LogVerification", "verify_log", "gc",
    "run_stats", "Report", "report", "render_report_html", "render_report_text",
    "Manifest", "AgentSpec", "ManifestCheck", "check_manifest", "load_manifest", "state_path",
    "process_start_time",
    "Policy", "Problem", "LintResult", "EnforcementPlan", "PolicyCheck", "check_policy",
    "load_policy", "lint_policies", "explain_policy", "enforcement_plan", "describe_enforcement",
    "diff_policies", "policy_variables",
    "KeyPair", "Signed", "FileVerification", "generate_key", "sign_files", "verify_files",
    "keys_dir", "trusted_dir",
    "Check", "DoctorReport", "doctor", "DaemonRun", "DaemonStatus", "daemon_socket",
    "daemon_status", "daemon_start", "daemon_stop", "daemon_serve", "daemon_submit", "export_env",
    "DaemonRunHandle", "daemon_launch",
    "BrokerClient", "BrokerError", "broker", "broker_socket", "inspect_token", "parse_duration",
    "trials",
])

SIGNATURES = {
    "run_option_fields": "()",
    "run": "(options, *, daemon=None)",
    "start": "(options, *, monitor=None, kinds=None, maxsize=10000)",
    "open_monitor": "(ringbuf_pages=4096)",
    "subscribe": "(run, kinds=None, maxsize=10000, callback=None)",
    "follow_events": "(run=None, agent=None, kinds=(), violations=False, since=None, follow=True, "
                     "stop=None, progress=None)",
    "parse_since": "(text, now=None)",
    "format_event": "(event, color=False)",
    "use_color": "(stream)",
    "list_runs": "(running_only=False)",
    "find_run": "(run_id)",
    "log_path": "(run_id)",
    "read_log": "(target)",
    "report": "(target, progress=None)",
    "render_report_html": "(report)",
    "render_report_text": "(report, color=False, width=None)",
    "verify_log": "(target, trust=())",
    "gc": "(log=None)",
    "check_policy": "(path)",
    "load_policy": "(path)",
    "lint_policies": "(paths)",
    "explain_policy": "(policy, workspace=None)",
    "enforcement_plan": "(policy, workspace=None, ttys=None, bpf_lsm=False)",
    "describe_enforcement": "(policy, workspace=None, ttys=None)",
    "diff_policies": "(old, new)",
    "policy_variables": "(workspace=None)",
    "generate_key": "(directory=None, name='signing', force=False)",
    "sign_files": "(paths, key_file=None)",
    "verify_files": "(paths, trust=(), signer=None)",
    "keys_dir": "()",
    "trusted_dir": "()",
    "doctor": "()",
    "daemon_socket": "()",
    "daemon_status": "()",
    "daemon_start": "(log_path=None, gateway=None)",
    "daemon_stop": "()",
    "daemon_serve": "(gateway=None)",
    "export_env": "(metrics=None, otlp=None, otlp_events=None, bpf_stats=False)",
    "daemon_submit": "(options, require=True)",
    "daemon_launch": "(options, stdio=None)",
    "run_stats": "(run_id, status=None)",
    "check_manifest": "(path)",
    "load_manifest": "(path)",
    "state_path": "(*parts)",
    "process_start_time": "(pid)",
    "broker": "(timeout=60.0)",
    "broker_socket": "()",
    "inspect_token": "(text, public_key=None)",
    "parse_duration": "(text)",
    # methods
    "RunHandle.wait": "(self, timeout=None)",
    "RunHandle.stop": "(self, signum=<Signals.SIGTERM: 15>)",
    "RunHandle.subscribe": "(self, kinds=None, maxsize=10000, callback=None)",
    "DaemonRunHandle.wait": "(self, timeout=None)",
    "DaemonRunHandle.stop": "(self, signum=<Signals.SIGTERM: 15>)",
    "LogSubscription.cancel": "(self)",
    "DaemonStatus.to_dict": "(self)",
    "DoctorReport.to_dict": "(self)",
    "DoctorReport.table": "(self)",
    "Report.to_dict": "(self)",
}

FIELDS = {
    "RunResult": ["exit_status", "run_id", "log_path", "agent", "events", "lost", "violations",
                  "violations_by_category", "killed_for", "summary", "on_daemon", "termination"],
    "RunInfo": ["run_id", "agent", "status", "root_pid", "pids", "events", "lost", "started", "policy",
                "policy_digest", "command", "exit_status", "log_path", "identity", "crash"],
    "LogVerification": ["path", "run_id", "ok", "lines", "signer", "problems"],
    "Report": ["run_id", "agent", "identity", "end", "sealed", "lines", "bad_lines", "kinds", "violations",
               "by_category", "by_rule", "denials", "denials_by_rule", "drops", "timeline",
               "timeline_more", "processes", "process_count", "run_llm", "first_ts", "last_ts"],
    "PolicyCheck": ["policy", "problems"],
    "ManifestCheck": ["manifest", "problems"],
    "Manifest": ["path", "name", "agents", "description", "gateway_config"],
    "AgentSpec": ["name", "command", "policy", "weight", "budgets", "workspace", "env", "prompt",
                  "allow_downgrade", "loc"],
    "KeyPair": ["key_id", "private_path", "public_path"],
    "Signed": ["path", "sig_path", "signer"],
    "FileVerification": ["path", "ok", "reason", "signer"],
    "DoctorReport": ["checks", "enforcement_path", "daemon"],
    "DaemonRun": ["run_id", "agent", "root_pid", "client"],
    "DaemonStatus": ["pid", "started", "socket", "runs", "sensors", "counters", "raw"],
    "RunOptions": ["argv", "policy_path", "name", "events_path", "show", "workspace", "prompt_path",
                   "require_signed", "allow_downgrade", "bpf_lsm", "trust", "resolve", "fold", "weight",
                   "budget_tokens", "budget_requests", "budget_cost", "cwd", "env",
                   "ringbuf_pages", "sensors", "seccomp_denied", "stdio", "stderr", "client"],
    # types of the layers below that the API returns
    "Check": ["name", "ok", "detail", "disables", "seconds"],
    "LintResult": ["problems", "files"],
}


# ---------------------------------------------------------------- the contract

def test_all_is_pinned():
    assert sorted(api.__all__) == ALL
    assert len(set(api.__all__)) == len(api.__all__)


@pytest.mark.parametrize("name", ALL)
def test_every_public_name_resolves_and_says_what_it_is(name):
    obj = getattr(api, name)
    assert (inspect.getdoc(obj) or "").strip(), f"api.{name} has no docstring"


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signatures_are_pinned(name):
    obj = api
    for part in name.split("."):
        obj = getattr(obj, part)
    assert str(inspect.signature(obj)) == SIGNATURES[name]


def test_every_public_function_has_a_pinned_signature():
    funcs = {n for n in api.__all__ if inspect.isfunction(getattr(api, n))}
    assert funcs <= set(SIGNATURES)


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_return_shapes_are_pinned(name):
    cls = getattr(api, name)
    assert dataclasses.is_dataclass(cls)
    assert [f.name for f in dataclasses.fields(cls)] == FIELDS[name]


def test_errors_are_agentwatch_errors():
    for name in ("IntegrityError", "KernelFeatureError", "LaunchError", "NotFoundError",
                 "PolicyError", "PrivilegeError", "UsageError"):
        assert issubclass(getattr(api, name), api.AgentwatchError)
    assert issubclass(api.NotFoundError, LookupError)
    from agentwatch import integrity
    assert integrity.IntegrityError is api.IntegrityError


def test_importing_the_api_is_cheap():
    """The thin daemon client imports the API: not the runner, the engine,
    the policy code, the crypto library or bcc."""
    code = ("import sys, agentwatch.api; print([m for m in ('agentwatch.run', 'agentwatch.engine', "
            "'agentwatch.policy', 'agentwatch.integrity', 'cryptography', 'bcc') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.stdout.strip() == "[]", r.stderr


def test_lazy_types_are_the_layers_own():
    from agentwatch.doctor import Check
    from agentwatch.policy import Policy, Problem
    from agentwatch.policy.lint import LintResult
    from agentwatch.sandbox.plan import EnforcementPlan
    assert (api.Policy, api.Problem, api.LintResult, api.EnforcementPlan, api.Check) == \
        (Policy, Problem, LintResult, EnforcementPlan, Check)
    with pytest.raises(AttributeError):
        api.NoSuchName


# ---------------------------------------------------------------- run options, declared once

def test_run_options_are_declared_once():
    from agentwatch import daemon, run
    assert run.RunOptions is api.RunOptions is options_mod.RunOptions
    assert not hasattr(daemon, "_FIELDS")


def test_every_option_field_says_what_it_is():
    for f in dataclasses.fields(api.RunOptions):
        assert f.metadata["help"], f.name
        assert f.type in (list, str, bool, dict, int, float, tuple, object), f.name
        if f.metadata["path"]:
            assert f.type in (str, list) and f.metadata["path"] in ("file", "dir"), f.name
        if f.metadata["flag"]:
            assert f.metadata["wire"], f"{f.name}: on the command line but not to the daemon"


def test_cli_run_options_are_the_run_option_fields():
    """`agentwatch run` has exactly one option per field with a flag (and
    --daemon, which picks where the run happens), each with that field's
    help, default and kind."""
    from cli.run import run
    params = {p.name: p for p in run.params if isinstance(p, click.Option)}
    assert set(params) == {f.name for f in api.run_option_fields()} | {"use_daemon"}
    for f in api.run_option_fields():
        p, m = params[f.name], f.metadata
        assert p.help == m["help"]
        assert m["flag"].split("/")[0] in p.opts
        if f.type is bool:
            assert p.is_flag and p.default == f.default
        if f.type is list:
            assert p.multiple
        if m["choices"]:
            assert list(p.type.choices) == list(m["choices"]) and p.default == f.default
        if m.get("range"):
            kind = click.FloatRange if f.type is float else click.IntRange
            assert isinstance(p.type, kind) and (p.type.min, p.type.max) == m["range"]
        if m["path"]:
            assert isinstance(p.type, click.Path)
            assert p.type.dir_okay == (m["path"] == "dir") and p.type.file_okay == (m["path"] == "file")


def test_the_daemon_protocol_carries_every_wire_field(tmp_path):
    from agentwatch import daemon
    values = {list: ["a"], str: "x", bool: True, dict: {"K": "v"}, int: 7, float: 2.5}
    opts = api.RunOptions(**{f.name: values[f.type] for f in options_mod.wire_fields()})
    opts.argv = ["tool"]
    req = daemon.request_options(opts)
    assert set(req) == {f.name for f in options_mod.wire_fields()}
    back = daemon.options_from_request(req)
    for f in options_mod.wire_fields():
        if not f.metadata["path"]:
            assert getattr(back, f.name) == getattr(opts, f.name), f.name
    for f in dataclasses.fields(api.RunOptions):
        if not f.metadata["wire"]:
            with pytest.raises(api.UsageError, match="unknown run option"):
                daemon.options_from_request({"argv": ["x"], f.name: None})


# ---------------------------------------------------------------- policies

def test_policy_check_load_lint_explain_diff(tmp_path):
    good = os.path.join(POLICIES, "coding-agent.yaml")
    checked = api.check_policy(good)
    assert checked.ok and isinstance(checked.policy, api.Policy)
    pol = api.load_policy(good)
    assert pol.digest.startswith("sha256:") and pol.digest == checked.policy.digest
    lint = api.lint_policies([good])
    assert isinstance(lint, api.LintResult) and lint.errors == 0 and lint.files == 1
    text = api.explain_policy(good, workspace=str(tmp_path))
    assert text.endswith("\n") and str(tmp_path) in text
    assert api.explain_policy(pol, workspace=str(tmp_path)) == text
    assert api.diff_policies(good, good) == ["no permission changes"]
    other = os.path.join(POLICIES, "read-only-analyst.yaml")
    assert any(line[:1] in "+-~" for line in api.diff_policies(pol, other))


def test_bad_policy_is_problems_or_a_policy_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: AgentPolicy\nmetadata:\n  name: x\n   oops: 1\n")
    checked = api.check_policy(str(bad))
    assert not checked.ok and checked.policy is None
    assert str(checked.problems[0]).startswith(f"{bad}:4:")
    with pytest.raises(api.PolicyError, match=f"{bad}:4:"):
        api.load_policy(str(bad))
    assert api.lint_policies([str(bad)]).exit_code() == 1
    with pytest.raises(api.PolicyError):
        api.explain_policy(str(bad))


def test_describe_enforcement(tmp_path):
    lines = api.describe_enforcement(os.path.join(POLICIES, "sandboxed-agent.yaml"),
                                     workspace=str(tmp_path), ttys=[])
    assert lines[0] == "Kernel enforcement on this host (a run of this policy)"
    assert all(line.startswith("  ") for line in lines[1:]) and len(lines) > 1
    plan = api.enforcement_plan(os.path.join(POLICIES, "sandboxed-agent.yaml"), str(tmp_path), ttys=[])
    assert isinstance(plan, api.EnforcementPlan)
    assert [f"  {line}" for line in plan.describe()] == lines[1:len(plan.describe()) + 1]


def test_policy_variables(tmp_path):
    v = api.policy_variables(str(tmp_path))
    assert v["WORKSPACE"] == str(tmp_path) and set(v) == {"WORKSPACE", "HOME", "TMPDIR"}


# ---------------------------------------------------------------- runs on disk

def _make_run(run_id, status, events=(), exit_status=None):
    make_run(run_id, status, events)          # test_cli's, plus an exit status
    rec = state.read_json(state.run_path(run_id, "run.json"))
    state.write_json_atomic(state.run_path(run_id, "run.json"), dict(rec, exit_status=exit_status))


EVENTS = [
    {"kind": "lifecycle", "phase": "start", "ts": 1.0, "run_id": "r1", "agent": "coder", "pid": 1,
     "detail": {}},
    {"kind": "exec", "ts": 2.0, "run_id": "r1", "agent": "coder", "pid": 2, "filename": "/bin/true"},
    {"kind": "nosuchkind", "ts": 2.5, "run_id": "r1", "agent": "coder", "pid": 2},
    {"kind": "lifecycle", "phase": "end", "ts": 3.0, "run_id": "r1", "agent": "coder", "pid": 1,
     "detail": {"exit_status": 3, "events": 2, "lost_events": 1, "lost_stash": 0,
                "unmatched_repeats": 2, "killed_for": None,
                "violations": {"violations": 4, "by_category": {"filesystem": 4}}}},
]


def test_list_and_find_runs(state_dir):
    assert api.list_runs() == []
    _make_run("20260101-000000-aaaaaa", "exited", exit_status=0)
    _make_run("20260101-000001-bbbbbb", "running")
    runs = api.list_runs()
    assert [r.run_id for r in runs] == ["20260101-000000-aaaaaa", "20260101-000001-bbbbbb"]
    r = runs[1]
    assert isinstance(r, api.RunInfo)
    assert (r.agent, r.status, r.root_pid, r.pids, r.lost, r.policy, r.command) == \
        ("coder", "running", 99, 3, 3, "p", ["python3", "agent.py"])
    assert r.log_path == api.log_path(r.run_id) == str(state_dir / "runs" / r.run_id / "events.jsonl")
    assert [x.run_id for x in api.list_runs(running_only=True)] == ["20260101-000001-bbbbbb"]
    assert api.find_run("20260101-000000").exit_status == 0
    assert api.find_run("20260101") is None          # not unique
    assert api.find_run("zzz") is None


def test_read_log_follow_and_subscribe_a_finished_run(state_dir):
    _make_run("r1", "exited", EVENTS)
    assert list(api.read_log("r1")) == EVENTS
    assert list(api.read_log(api.log_path("r1"))) == EVENTS
    assert [d["kind"] for d in api.follow_events(run="r1", kinds=("exec",))] == ["exec"]
    sub = api.subscribe("r1")
    assert isinstance(sub, api.LogSubscription)
    got = list(sub)
    assert all(isinstance(e, Event) for e in got) and [e.kind for e in got] == \
        ["lifecycle", "exec", "lifecycle"]
    assert sub.skipped == 1
    for call in (lambda: list(api.read_log("nope")), lambda: list(api.follow_events(run="nope")),
                 lambda: api.subscribe("nope")):
        with pytest.raises(api.NotFoundError):
            call()
    with pytest.raises(api.UsageError, match="callback"):
        api.subscribe("r1", callback=print)
    with pytest.raises(api.IntegrityError, match="no single run"):
        api.verify_log("nope")


def test_result_comes_from_the_logs_end_event(state_dir):
    _make_run("r1", "exited", EVENTS)
    res = api._result("r1", 3, "summary line")
    assert res == api.RunResult(exit_status=3, run_id="r1", log_path=api.log_path("r1"), agent="coder",
                                events=2, lost=3, violations=4,
                                violations_by_category={"filesystem": 4}, killed_for=None,
                                summary="summary line", on_daemon=False)
    # a long log: the end event is found from the end, past the first chunk read
    with open(api.log_path("r1"), "r+") as f:
        body = f.read()
        f.seek(0)
        f.write("".join(json.dumps(dict(EVENTS[1], ts=i)) + "\n" for i in range(3000)) + body)
    assert api._end_event(api.log_path("r1"), chunk=512)["detail"]["exit_status"] == 3
    assert api._result("nosuch", 1).events == 0


def test_format_event():
    line = api.format_event(EVENTS[1])
    assert "/bin/true" in line and "\x1b[" not in line


# ---------------------------------------------------------------- keys

def test_keys_sign_and_verify(tmp_path, state_dir):
    pair = api.generate_key(str(tmp_path), "k")
    assert pair.key_id.startswith("ed25519:") and os.path.exists(pair.public_path)
    with pytest.raises(api.IntegrityError, match="already exists"):
        api.generate_key(str(tmp_path), "k")
    f = tmp_path / "p.yaml"
    f.write_text("x: 1\n")
    [signed] = api.sign_files([str(f)], pair.private_path)
    assert signed == api.Signed(str(f), f"{f}.sig", pair.key_id)
    [v] = api.verify_files([str(f)])
    assert not v.ok and "not trusted" in v.reason and v.signer == pair.key_id
    [v] = api.verify_files([str(f)], trust=[pair.public_path])
    assert v.ok and v.reason == f"signed by {pair.key_id} (trusted)"
    assert api.keys_dir() == str(state_dir / "keys")
    assert api.trusted_dir() == str(state_dir / "keys" / "trusted")


# ---------------------------------------------------------------- daemon and doctor, without either

def test_daemon_status_round_trip():
    raw = {"pid": 7, "started": 1.5, "socket": "/s", "sensors": {"tracepoints": 3, "groups": ["file"]},
           "counters": {"received": 1}, "extra": True,
           "runs": [{"run_id": "r", "agent": "a", "root_pid": 9, "client": {"pid": 5}}]}
    st = api.DaemonStatus.from_dict(raw)
    assert st.runs == [api.DaemonRun("r", "a", 9, {"pid": 5})] and st.pid == 7
    assert st.to_dict() == raw


def test_no_daemon(state_dir):
    assert api.daemon_socket() == str(state_dir / "daemon.sock")
    assert api.daemon_status() is None
    assert api.daemon_submit(api.RunOptions(argv=["true"]), require=False) is None
    with pytest.raises(api.UsageError, match="no agentwatch daemon answers"):
        api.daemon_submit(api.RunOptions(argv=["true"]))
    assert api.daemon_stop() is False


def test_doctor_report_shape(monkeypatch, state_dir):
    from agentwatch import doctor
    checks = [doctor.Check("landlock", True, "ABI 4", "-"), doctor.Check("bpf-lsm", False, "no", "exec")]
    monkeypatch.setattr(doctor, "run_checks", lambda: checks)
    rep = api.doctor()
    assert rep.checks == checks and rep.daemon is None and rep.enforcement_path == "monitor-only"
    assert rep.to_dict() == dict(doctor.report(checks), daemon=None)
    assert rep.table() == doctor.format_table(checks)


def test_a_run_with_bad_input_raises_before_anything_exists(state_dir):
    with pytest.raises(api.UsageError, match="no command given"):
        api.run(api.RunOptions(argv=[]), daemon=False)
    with pytest.raises(api.PolicyError, match="/nonexistent.yaml"):
        api.run(api.RunOptions(argv=["true"], policy_path="/nonexistent.yaml"), daemon=False)
    with pytest.raises(api.PolicyError, match="/nonexistent.yaml"):
        api.start(api.RunOptions(argv=["true"], policy_path="/nonexistent.yaml"))
    assert os.listdir(state_dir) == []
    assert api._OWN_MONITORS == [0]


def test_run_goes_to_the_daemon_only_with_our_stdio(monkeypatch, state_dir):
    """daemon=None: the daemon when the options leave stdio and stderr ours
    (the daemon gives the agent our fds 0-2); True: always; False: never."""
    asked = []

    def submit(options, require=True):
        asked.append(require)
        return api.RunResult(exit_status=0, run_id="r", log_path="l", on_daemon=True)
    monkeypatch.setattr(api, "daemon_submit", submit)
    assert api.run(api.RunOptions(argv=["true"])).on_daemon and asked == [False]
    assert api.run(api.RunOptions(argv=["true"], stdio=(0, 1, 2)), daemon=True).on_daemon
    assert asked == [False, True]
    for opts, daemon in ((api.RunOptions(argv=[], stdio=(0, 1, 2)), None),
                         (api.RunOptions(argv=[], stderr=sys.stderr), None),
                         (api.RunOptions(argv=[]), False)):
        with pytest.raises(api.UsageError, match="no command given"):     # ran here
            api.run(opts, daemon=daemon)
    assert asked == [False, True]
