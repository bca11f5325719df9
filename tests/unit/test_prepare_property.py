"""Bad input never ends in a traceback (issue #15): policies built from every
key the schema accepts (policies/agentpolicy.schema.json, policy/schema.py),
with edge values of each type, go through the whole preparation that needs
no root: load, compile_policy, make_plan (a given Landlock ABI, no BPF LSM),
and the plan's record as the run identity stores it. Each step either
succeeds or raises an AgentwatchError (which the CLI prints as
`agentwatch: error: ...`); anything else is a bug.

Name resolution is stubbed here (documentation addresses, or a failure):
the generated domains are under .test and .invalid, and no query leaves
the machine. Crashes this test found are pinned as examples below."""
import json
import os
import re
import socket
from unittest import mock

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agentwatch.core.errors import AgentwatchError
from agentwatch.policy import load
from agentwatch.policy.compile import compile_policy
from agentwatch.core.events import ACTIONS
from agentwatch.policy.model import RULES, SECTIONS, SENSOR_GROUPS, TOGGLES
from agentwatch.sandbox.plan import make_plan

# ---------------------------------------------------------------- edge values

HUGE = 10 ** 30
UNICODE = ["ü", "日本語", "\u200b", "e\u0301", "🙂", " ", "a b"]

roots = st.sampled_from(["/", "${WORKSPACE}", "${HOME}", "${TMPDIR}", "**"])
segments = st.one_of(
    st.sampled_from(["**", "*", "?", "[ab]", "[!a]", "[a-z]*", ".", "..", "", ".env", ".ssh", "*.pem",
                     "usr", "lib", "bin", "etc", "tmp", "dev", "null", "proc", "self", "root", "x"]),
    st.sampled_from(UNICODE),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/"),
            min_size=1, max_size=6))
globs = st.one_of(
    st.sampled_from(["/", "/**", "**", "**/.env", "/usr/**", "/usr/lib/**", "/etc/passwd", "/dev/null",
                     "/proc/**", "/tmp/", "${WORKSPACE}/**", "${HOME}/.ssh/**", "${TMPDIR}", "/a//b",
                     "/usr/bin/python3", "/bin/sh", "/nonexistent/ü/**"]),
    st.builds(lambda r, s: r + "".join("/" + x for x in s), roots, st.lists(segments, max_size=5)))
ports = st.one_of(st.sampled_from([1, 53, 443, 65535, 0, 65536, HUGE, "1-65535", "8000-8100", "5-5",
                                   "443", "100-1", "00443", "1-"]),
                  st.integers(1, 65535))
cidrs = st.sampled_from(["10.0.0.0/8", "0.0.0.0/0", "::/0", "127.0.0.1", "127.0.0.0/8", "::1",
                         "::ffff:1.2.3.4", "::ffff:10.0.0.0/104", "2001:db8::/32", "192.0.2.1/32",
                         "0.0.0.0", "::", "fe80::1%eth0", "10.0.0.1/8", "1.2.3.4/33"])
labels = st.one_of(st.sampled_from(["a", "xn--bcher-kva", "A-B", "0", "ü"]),
                   st.text(alphabet="abc-0", min_size=1, max_size=5))
domains = st.builds(lambda star, ls, tld, dot: star + ".".join(ls + [tld]) + dot,
                    st.sampled_from(["", "*."]), st.lists(labels, min_size=0, max_size=3),
                    st.sampled_from(["test", "invalid", "TEST"]), st.sampled_from(["", "."]))
_rule_options = {"ports": st.lists(ports, max_size=3), "protocol": st.sampled_from(["tcp", "udp", "any"])}
net_rules = st.one_of(st.fixed_dictionaries({"cidr": cidrs}, optional=_rule_options),
                      st.fixed_dictionaries({"domain": domains}, optional=_rule_options))
unix_globs = st.one_of(st.sampled_from(["@", "@name*", "@*", "@\u00e9", "/run/*.sock", "**",
                                        "${TMPDIR}/**"]), globs)
accounts = st.sampled_from([0, "0", "root", "nobody", 65534, 4294967294, "4294967294", "nogroup",
                            "no-such-user", "_x$"])
syscall_names = st.sampled_from(["keyctl", "perf_event_open", "ptrace", "bpf", "unshare", "setuid",
                                 "io_uring_setup", "memfd_create", "mount", "open", "socketcall", "read"])
hexes = st.text(alphabet="0123456789abcdefABCDEF", min_size=64, max_size=64)
sizes = st.one_of(st.sampled_from(["512M", "2G", "1P", "1.5GiB", "4096", "100B", "0.5", "8191P", "1 K",
                                   1, HUGE, 2 ** 63 - 1]), st.integers(1, 2 ** 40))
durations = st.one_of(st.sampled_from(["90s", "1h30m", "2.5h", "2d", "36500d", "0.001s", "90", 0.001,
                                       3153600000, 1, 1e-300]),
                      st.floats(min_value=1e-9, max_value=3e9))
cpus = st.one_of(st.sampled_from([0.01, 0.001, 1, 1.5, 4096, 4096.0, 1e-300]), st.floats(1e-6, 4096))
pids = st.sampled_from([1, 64, 4194304, 4194305, HUGE])
actions = st.sampled_from(ACTIONS)


def lists(elements):
    return st.lists(elements, max_size=4)


process = st.fixed_dictionaries({}, optional={
    "exec": lists(st.one_of(globs, st.fixed_dictionaries({"path": globs}, optional={"sha256": hexes}))),
    "max_processes": pids,
    "run_as": st.fixed_dictionaries({"user": accounts},
                                    optional={"group": accounts, "groups": lists(accounts)}),
    **{t: st.booleans() for t in TOGGLES}})

policies = st.fixed_dictionaries(
    {"apiVersion": st.just("agentwatch/v1"), "kind": st.just("AgentPolicy"),
     "metadata": st.fixed_dictionaries({"name": st.sampled_from(["t", "a" * 63, "x.y_z-1"])},
                                       optional={"description": st.sampled_from(["", "ü" * 100])})},
    optional={
        "identity": st.fixed_dictionaries({}, optional={
            "name": st.sampled_from(["t", "*", "coding-*", "[ab]", "ü"]),
            "owner": st.sampled_from(["", "team", "日本"]),
            "required_signer": st.builds(lambda h: "ed25519:" + h, hexes)}),
        "filesystem": st.fixed_dictionaries({}, optional={k: lists(globs) for k in ("read", "write", "exec",
                                                                                       "deny")}),
        "network": st.fixed_dictionaries({}, optional={
            "allow": lists(net_rules),
            "loopback": st.one_of(st.booleans(), lists(ports)),
            "unix": st.one_of(st.booleans(), lists(unix_globs))}),
        "process": process,
        "syscalls": st.fixed_dictionaries({}, optional={"deny": lists(syscall_names)}),
        "resources": st.fixed_dictionaries({}, optional={"memory": sizes, "cpu": cpus,
                                                         "pids": pids,
                                                         "wall_time": durations}),
        "on_violation": st.fixed_dictionaries({}, optional={
            "default": actions, **{s: actions for s in SECTIONS},
            "rules": st.dictionaries(st.sampled_from(RULES), actions, max_size=4)}),
        "monitor": st.lists(st.sampled_from(SENSOR_GROUPS), max_size=5, unique=True),
        # base.yaml is written when the test draws a base policy (see prepare)
        "extends": st.sampled_from(["base.yaml", "./base.yaml", "sub/../base.yaml", "policy.yaml",
                                    "missing.yaml", "/nonexistent/ü.yaml", "."]),
    })
workspaces = st.sampled_from(["ws", "ws ü", "ws[1]*?", "${HOME}", "a/../b", "日本"])


# ---------------------------------------------------------------- the preparation path

HEAD = {"apiVersion": "agentwatch/v1", "kind": "AgentPolicy", "metadata": {"name": "t"}}

def _fake_getaddrinfo(host, *args, **kw):
    """Documentation addresses for names under .test, failure for the rest."""
    if not host.lower().rstrip(".").endswith(".test"):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    n = sum(host.encode()) % 250 + 1
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (f"192.0.2.{n}", 0)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (f"2001:db8::{n:x}", 0, 0, 0))]


def _write(path, doc):
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")


def prepare(tmp_path, doc, abi, base=None, workspace="ws"):
    """load -> compile -> plan -> the plan's record, as `agentwatch run`
    does before it forks. Returns the step reached."""
    path = tmp_path / "policy.yaml"
    _write(path, doc)
    if base is not None:
        _write(tmp_path / "base.yaml", base)
    else:
        (tmp_path / "base.yaml").unlink(missing_ok=True)
    variables = {"WORKSPACE": str(tmp_path / workspace), "HOME": str(tmp_path / "home"), "TMPDIR": "/tmp"}
    step = "load"
    try:
        policy = load(str(path))
        step = "compile"
        compiled = compile_policy(policy, variables)
        compiled.sensor_groups()
        step = "plan"
        with mock.patch("socket.getaddrinfo", _fake_getaddrinfo):
            plan = make_plan(policy.data, variables, [policy.path], landlock_abi=abi, bpf_lsm=False)
        plan.describe()
        json.dumps(plan.record(), allow_nan=False)       # the run identity is strict JSON
        return "ok"
    except AgentwatchError as e:
        assert str(e).strip(), f"{step}: {type(e).__name__} with no message"
        if step == "load":          # every line is FILE:LINE:COL: message, FILE one of the chain
            files = (str(path), str(tmp_path / "base.yaml"))
            for line in str(e).splitlines():
                m = re.match(r"(.+?):\d+:\d+: ", line)
                assert m and os.path.normpath(m[1]) in files, str(e)
        return step


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(doc=policies, abi=st.integers(0, 7), base=st.none() | policies, workspace=workspaces)
# network.loopback ranges ("lo-hi", which lint accepts) reached Landlock as
# strings: sorted() with int ports raised TypeError, int("8000-8002") ValueError
@example(doc=dict(HEAD, network={"allow": [{"cidr": "10.0.0.0/8", "ports": [443]}],
                                 "loopback": ["8000-8100", 53]},
                  on_violation={"network": "deny"}), abi=7, base=None, workspace="ws")
@example(doc=dict(HEAD, network={"loopback": ["8000-8002"]}, on_violation={"network": "deny"}), abi=7,
         base=None, workspace="ws")
def test_preparation_succeeds_or_refuses_with_an_agentwatch_error(tmp_path, doc, abi, base, workspace):
    assert prepare(tmp_path, doc, abi, base, workspace) in ("ok", "load", "compile", "plan")


def test_the_generator_reaches_the_plan(tmp_path):
    """Most generated policies must load, or the property above tests little
    beyond the validator."""
    reached = []

    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(doc=policies, abi=st.integers(0, 7), base=st.none() | policies, workspace=workspaces)
    def count(doc, abi, base, workspace):
        reached.append(prepare(tmp_path, doc, abi, base, workspace))
    count()
    assert reached.count("ok") >= len(reached) // 3, reached
