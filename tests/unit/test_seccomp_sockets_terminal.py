"""The seccomp rules of issue #14, as pure logic: socket families and netlink
protocols (network.families, network.netlink), terminal-injection ioctls and
the *_USER priority calls; which runs get them (make_plan); how the sensor
watches them (specs_for) and how the judge names their refusals. The filter
itself is loaded in tests/kernel/test_seccomp.py."""
import os
import socket

import pytest

from agentwatch.policy import load
from agentwatch.policy.explain import explain
from agentwatch.sandbox import seccomp_filter as sf
from agentwatch.sandbox.plan import make_plan
from agentwatch.sandbox.seccomp_filter import SeccompPolicy, plan
from agentwatch.sensors import syscalls as S
from test_explain_diff import VARS, diff_bodies
from test_seccomp_plan import verdict
from test_judge import judged, refused  # noqa: F401 (fixture)
from test_engine import CHILD, NR, env, feed, syscall  # noqa: F401 (env: fixture)

HEAD = "apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: t}\n"
U64 = 2**64 - 1
DEFAULT_FAMILIES = (1, 2, 10, 16)     # unix, inet, inet6, netlink (route only)
POLICY = os.path.join(os.path.dirname(__file__), "..", "..", "policies", "sandboxed-agent.yaml")


SOCKETS = plan(SeccompPolicy(socket_families=DEFAULT_FAMILIES))


# ------------------------------------------------------------------ socket families

@pytest.mark.parametrize("name", ["socket", "socketpair"])
def test_default_families_pinned(name):
    allowed = {0, socket.AF_UNIX, socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK}
    for family in range(0, 200):
        refused_here = verdict(SOCKETS, name, family, socket.SOCK_STREAM, 0) == "errno"
        assert refused_here == (family not in allowed), family
    for family in (socket.AF_VSOCK, socket.AF_PACKET, socket.AF_BLUETOOTH, socket.AF_ALG, 45, 63, 64,
                   1000, 2**31, U64):        # -1 as the kernel would see it
        assert verdict(SOCKETS, name, family, 1, 0) == "errno"


def test_high_bits_cannot_hide_a_refused_family():
    """The kernel reads the family's low 32 bits: (1 << 32) | AF_VSOCK is AF_VSOCK.
    A value with high bits and an allowed family is refused too (no libc passes one)."""
    assert verdict(SOCKETS, "socket", (1 << 32) | socket.AF_VSOCK, 1, 0) == "errno"
    assert verdict(SOCKETS, "socket", (1 << 32) | socket.AF_PACKET, 3, 0) == "errno"
    assert verdict(SOCKETS, "socket", (1 << 32) | socket.AF_UNIX, 1, 0) == "errno"


def test_netlink_only_route():
    for proto in range(32):
        want = None if proto == 0 else "errno"
        assert verdict(SOCKETS, "socket", socket.AF_NETLINK, socket.SOCK_RAW, proto) == want, proto
        assert verdict(SOCKETS, "socket", socket.AF_NETLINK, socket.SOCK_DGRAM | 0o2000000, proto) == want
    # high bits on the protocol do not hide it either
    assert verdict(SOCKETS, "socket", socket.AF_NETLINK, socket.SOCK_RAW, (1 << 32) | 2) == "errno"
    more = plan(SeccompPolicy(socket_families=DEFAULT_FAMILIES, netlink_protocols=(0, 15)))
    assert verdict(more, "socket", socket.AF_NETLINK, socket.SOCK_RAW, 15) is None
    assert verdict(more, "socket", socket.AF_NETLINK, socket.SOCK_RAW, 4) == "errno"
    none = plan(SeccompPolicy(socket_families=(1, 2, 10)))
    assert verdict(none, "socket", socket.AF_NETLINK, socket.SOCK_RAW, 0) == "errno"


def test_sock_packet_is_a_packet_socket():
    """socket(AF_INET, SOCK_PACKET) is turned into AF_PACKET by the kernel."""
    assert verdict(SOCKETS, "socket", socket.AF_INET, 10, 0) == "errno"
    assert verdict(SOCKETS, "socket", socket.AF_INET, 10 | socket.SOCK_NONBLOCK, 0) == "errno"
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_RAW):   # raw: cgroup BPF's
        assert verdict(SOCKETS, "socket", socket.AF_INET, kind | socket.SOCK_CLOEXEC, 0) is None
    packet = plan(SeccompPolicy(socket_families=DEFAULT_FAMILIES + (17,)))
    assert verdict(packet, "socket", socket.AF_INET, 10, 0) is None
    assert verdict(packet, "socket", socket.AF_PACKET, 3, 0) is None


def test_no_family_rules_without_a_family_list():
    assert not {"socket", "socketpair"} & {r.syscall for r in plan(SeccompPolicy())}


def test_socket_rules_share_one_action():
    """libseccomp refuses two actions for one syscall: every socket rule takes
    the network.socket rule's."""
    rules = plan(SeccompPolicy(socket_families=DEFAULT_FAMILIES, actions={"socket": "kill"}))
    assert {r.action for r in rules if r.syscall in ("socket", "socketpair")} == {"kill"}
    assert "socket" not in sf.errno_denied(SeccompPolicy(socket_families=(1,), actions={"socket": "kill"}))


# ------------------------------------------------------------------ terminal ioctls, *_USER

TIOCSTI, TIOCLINUX, TIOCCONS, TIOCSETD = 0x5412, 0x541C, 0x541D, 0x5423
DEFAULT = plan(SeccompPolicy())


@pytest.mark.parametrize("req", [TIOCSTI, TIOCLINUX, TIOCCONS, TIOCSETD, 0x4B47, 0x4B49, 0x4B4D])
def test_terminal_ioctls_refused_whatever_the_high_bits(req):
    for high in (0, 1 << 32, 0xDEADBEEF << 32):      # CVE-2019-10063
        assert verdict(DEFAULT, "ioctl", 0, high | req, 0) == "errno"


@pytest.mark.parametrize("req", [0x5401, 0x5402, 0x5413, 0x5414, 0x540E, 0x540F, 0x5410, 0x541B,
                                 0x80045430, 0x5421, 0x5451])
def test_ordinary_terminal_ioctls_allowed(req):
    """TCGETS, TCSETS, TIOCGWINSZ, TIOCSWINSZ, TIOCSCTTY, TIOCGPGRP, TIOCSPGRP,
    FIONREAD, TIOCGPTN, FIONBIO, FIOCLEX: what shells, editors and ptys use."""
    assert verdict(DEFAULT, "ioctl", 0, req, 0) is None


def test_terminal_ioctls_use_the_local_termios_numbers():
    import termios
    assert sf.TERMINAL_IOCTLS["TIOCSTI"][0] == termios.TIOCSTI


def test_user_wide_priority_calls():
    PRIO_PROCESS, PRIO_PGRP, PRIO_USER = 0, 1, 2
    assert verdict(DEFAULT, "setpriority", PRIO_USER, 0, 19) == "errno"
    assert verdict(DEFAULT, "setpriority", (1 << 32) | PRIO_USER, 0, 19) == "errno"
    assert verdict(DEFAULT, "setpriority", PRIO_PROCESS, 0, 10) is None
    assert verdict(DEFAULT, "setpriority", PRIO_PGRP, 0, 10) is None
    IOPRIO_WHO_PROCESS, IOPRIO_WHO_PGRP, IOPRIO_WHO_USER = 1, 2, 3
    assert verdict(DEFAULT, "ioprio_set", IOPRIO_WHO_USER, 0, 0) == "errno"
    assert verdict(DEFAULT, "ioprio_set", IOPRIO_WHO_PROCESS, 0, 0) is None
    assert verdict(DEFAULT, "ioprio_set", IOPRIO_WHO_PGRP, 0, 0) is None
    assert verdict(DEFAULT, "getpriority", PRIO_USER, 0) is None


def test_toggles_lift_them():
    rules = plan(SeccompPolicy(terminal=True, prio_user=True))
    assert not {"ioctl", "setpriority", "ioprio_set"} & {r.syscall for r in rules}


def test_every_conditional_rule_is_listed_for_the_sensor():
    """The sensor attaches the entry probe of exactly these (specs_for), so a
    conditional rule missing from CONDITIONAL would report ordinary EPERMs."""
    p = SeccompPolicy(socket_families=DEFAULT_FAMILIES)
    conditional = {r.syscall for r in plan(p) if r.conds}
    assert conditional <= sf.CONDITIONAL
    assert set(sf.BY_ARGUMENT) <= conditional


def test_describe_names_them():
    text = "\n".join(sf.describe(SeccompPolicy(socket_families=DEFAULT_FAMILIES)))
    for words in ("TIOCSTI", "TIOCLINUX", "low 32 bits", "PRIO_USER", "IOPRIO_WHO_USER",
                  "only unix, inet, inet6, netlink (netlink: route only)"):
        assert words in text


# ------------------------------------------------------------------ which runs get them

def plan_of(tmp_path, body):
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + body)
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    variables = {"HOME": str(tmp_path), "WORKSPACE": str(ws), "TMPDIR": str(tmp_path)}
    return make_plan(load(str(path)).data, variables, landlock_abi=7)


@pytest.mark.parametrize("body", [
    "filesystem: {read: ['/**'], write: ['${WORKSPACE}/**']}\non_violation: {filesystem: deny}\n",
    "network: {allow: []}\non_violation: {network: deny}\n",
    "process: {ptrace: false}\non_violation: {process: deny}\n",
    "syscalls: {deny: [keyctl]}\non_violation: {syscalls: kill}\n",
])
def test_every_enforced_run_gets_the_terminal_rules(tmp_path, body):
    sc = plan_of(tmp_path, body).seccomp
    assert sc is not None and not sc.terminal and not sc.prio_user
    rules = plan(sc)
    assert verdict(rules, "ioctl", 0, TIOCSTI) in ("errno", "kill")
    assert verdict(rules, "setpriority", 2, 0, 19) in ("errno", "kill")


def test_a_filesystem_only_run_refuses_nothing_else(tmp_path):
    p = plan_of(tmp_path, "filesystem: {read: ['/**'], write: ['${WORKSPACE}/**']}\n"
                          "on_violation: {filesystem: deny}\n")
    assert {r.syscall for r in plan(p.seccomp)} == {"ioctl", "setpriority", "ioprio_set"}
    assert p.enforced == ["filesystem"]


def test_no_filter_without_enforcement(tmp_path):
    assert plan_of(tmp_path, "network: {allow: []}\nfilesystem: {write: []}\n").seccomp is None


def test_network_enforced_gets_the_family_rules(tmp_path):
    sc = plan_of(tmp_path, "network: {allow: []}\non_violation: {network: deny}\n").seccomp
    assert sc.socket_families == [1, 2, 10, 16] and sc.netlink_protocols == [0]
    sc = plan_of(tmp_path, "network: {families: [unix, inet, vsock], netlink: false}\n"
                           "on_violation: {network: deny}\n").seccomp
    assert sc.socket_families == [1, 2, 40]
    p = plan_of(tmp_path, "network: {netlink: [route, kobject_uevent]}\n"
                          "on_violation: {network: deny, rules: {network.socket: kill}}\n")
    assert p.seccomp.netlink_protocols == [0, 15] and p.seccomp.action_of("socket") == "kill"
    assert p.egress.allow_families == ("unix", "inet", "inet6")
    sc = plan_of(tmp_path, "network: {netlink: true}\non_violation: {network: deny}\n").seccomp
    assert sc.netlink_protocols == list(range(32))
    # judged only: no family rules, though the process section's filter is there
    sc = plan_of(tmp_path, "network: {allow: []}\nprocess: {ptrace: false}\n"
                           "on_violation: {process: deny}\n").seccomp
    assert sc.socket_families is None


def test_strict_policy_plan():
    data = load(POLICY).data
    p = make_plan(data, {"HOME": "/nonexistent", "WORKSPACE": "/nonexistent", "TMPDIR": "/tmp"},
                  [POLICY], landlock_abi=7)
    assert p.seccomp.socket_families == [1, 2, 10, 16] and p.seccomp.netlink_protocols == [0]
    names = set(sf.errno_denied(p.seccomp))
    assert {"socket", "socketpair", "ioctl", "setpriority", "ioprio_set"} <= names


# ------------------------------------------------------------------ the sensor and the judge

def test_conditional_refusals_keep_an_entry_probe_without_exit_args():
    specs = {s.name: s for s in S.specs_for(["process"], ["ioctl", "socket", "setpriority", "kcmp"])}
    for name in ("ioctl", "socket", "setpriority"):
        s = specs[name]
        assert s.enter and s.attach_exit and s.denied and not s.emit, name
    assert not specs["kcmp"].enter and specs["kcmp"].attach_exit   # refused whole: exit only
    net = {s.name: s for s in S.specs_for(["process", "net"], ["socket"])}
    assert net["socket"].enter and net["socket"].emit and net["socket"].denied


def test_with_exit_args_the_exit_tracepoint_alone_serves():
    specs = {s.name: s for s in S.specs_for(["process"], ["ioctl", "setpriority", "kcmp"], exit_args=True)}
    for name in ("ioctl", "setpriority", "kcmp"):
        assert not specs[name].enter and specs[name].attach_exit and specs[name].denied, name
    net = {s.name: s for s in S.specs_for(["process", "net"], ["socket"], exit_args=True)}
    assert net["socket"].enter and net["socket"].emit      # watched anyway: both ends


@pytest.fixture
def by_arg(judged, monkeypatch):
    for spec in S.specs_for([], denied=["ioctl", "socket", "socketpair", "setpriority", "ioprio_set"]):
        if spec.name in sf.BY_ARGUMENT:
            nr = S.syscall_number(spec.name)
            monkeypatch.setitem(judged.correlator.nr_to_spec, nr, spec)
            monkeypatch.setitem(NR, spec.name, nr)
    judged.policy(HEAD + "network: {allow: []}\non_violation: {default: deny}\n")
    return judged


@pytest.mark.parametrize("name, rule, category", [
    ("socket", "network.socket", "network"), ("socketpair", "network.socket", "network"),
    ("ioctl", "process.terminal", "process"),
    ("setpriority", "syscalls.deny", "syscall"), ("ioprio_set", "syscalls.deny", "syscall"),
])
def test_refusals_by_argument_are_named_by_their_rule(by_arg, name, rule, category):
    feed(by_arg.correlator, refused(name, CHILD), refused(name, CHILD))
    [v] = by_arg.violations()
    assert (v.rule, v.category, v.action) == (rule, category, "deny")
    assert v.detail["kernel"] == "denied (EPERM, seccomp)" and v.detail["args"] is None
    assert by_arg.judge.by_rule[rule] == 2          # each call counted


def test_terminal_rule_can_kill(by_arg):
    by_arg.policy(HEAD + "on_violation: {default: deny, rules: {process.terminal: kill}}\n")
    killed = []
    by_arg.judge.on_kill = killed.append
    feed(by_arg.correlator, refused("ioctl", CHILD))
    assert by_arg.violations()[0].action == "kill" and killed


def test_seen_sockets_are_judged_by_the_policy_lists(by_arg):
    """Where the sensor saw the call (network judged, not enforced): the same lists."""
    spec = S.BY_NAME["socket"]
    by_arg.correlator.nr_to_spec[S.syscall_number("socket")] = spec
    feed(by_arg.correlator,
         syscall("socket", CHILD, (socket.AF_NETLINK, socket.SOCK_RAW, 0), ret=3),     # route: fine
         syscall("socket", CHILD, (socket.AF_NETLINK, socket.SOCK_RAW, 2), ret=4),     # usersock
         syscall("socket", CHILD, (socket.AF_VSOCK, socket.SOCK_STREAM, 0), ret=5),
         syscall("socket", CHILD, (socket.AF_UNIX, socket.SOCK_STREAM, 0), ret=6))
    got = [(v.rule, v.detail["family"], v.detail.get("protocol")) for v in by_arg.violations()]
    assert got == [("network.socket", "netlink", 2), ("network.socket", "vsock", None)]


# ------------------------------------------------------------------ schema, explain, diff

def test_schema_defaults_and_values(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + "network: {}\n")
    net = load(str(path)).spec.network
    assert net.families == ("unix", "inet", "inet6") and net.netlink == ("route",)
    assert net.family_numbers() == [1, 2, 10, 16] and net.netlink_numbers() == [0]
    path.write_text(HEAD + "network: {families: [unix, vsock, unix], netlink: false}\n")
    net = load(str(path)).spec.network
    assert net.families == ("unix", "vsock") and net.netlink == () and net.family_numbers() == [1, 40]


def test_process_terminal_is_a_rule(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + "on_violation: {rules: {process.terminal: kill}}\n")
    assert load(str(path)).spec.on_violation.rules == {"process.terminal": "kill"}


def test_explain_says_which_families(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + "network: {families: [unix, inet, vsock], netlink: [route, audit]}\n")
    text = explain(load(str(path)), VARS)
    assert "  Socket families: only unix, inet, vsock; netlink (route, audit only)" in text
    path.write_text(HEAD + "network: {netlink: false}\n")
    assert "only unix, inet, inet6; no netlink;" in explain(load(str(path)), VARS)


def test_diff_families_and_netlink(tmp_path):
    old = "network: {allow: []}\n"
    new = "network: {allow: [], families: [unix, inet, vsock], netlink: [route, audit]}\n"
    assert diff_bodies(tmp_path, old, new) == [
        "+ grants: vsock sockets (network.families)",
        "- revokes: inet6 sockets (network.families)",
        "+ grants: netlink audit sockets (network.netlink)",
    ]
    assert diff_bodies(tmp_path, old, "network: {netlink: true}\n") == [
        "+ grants: netlink sockets of any protocol (network.netlink)"]
    assert diff_bodies(tmp_path, "network: {netlink: true}\n", "network: {netlink: false}\n") == [
        "- revokes: netlink sockets of any protocol (now only: none)"]


def test_a_socket_the_cgroup_program_refuses_is_reported_once(by_arg):
    """network.families without inet6: the filter refuses it first, but were
    the cgroup BPF program to refuse it (family-not-allowed, or raw-socket),
    the sensor's socket event is the one report, not the program's too."""
    from agentwatch.core.events import NetEvent
    by_arg.policy(HEAD + "network: {families: [unix, inet]}\non_violation: {default: deny}\n")
    spec = S.BY_NAME["socket"]
    by_arg.correlator.nr_to_spec[S.syscall_number("socket")] = spec
    for reason, kind in (("family-not-allowed", socket.SOCK_STREAM), ("raw-socket", socket.SOCK_RAW)):
        family = socket.AF_INET6 if kind == socket.SOCK_STREAM else socket.AF_INET
        ev = NetEvent(op="socket", family="inet6", pid=CHILD, tid=CHILD, ret=-1, error="EPERM")
        by_arg.judge.kernel_denial(ev, "network", "network.socket", f"cgroup BPF: {reason}", None,
                                   {"op": "socket", "family": "inet6"})
        feed(by_arg.correlator, syscall("socket", CHILD, (family, kind, 0), ret=-1))
    got = [(v.rule, v.detail["family"], v.detail["type"]) for v in by_arg.violations()]
    assert got == [("network.socket", "inet6", "stream"), ("network.socket", "inet", "raw")]


def test_the_sensor_names_families_as_the_policy_does():
    from agentwatch.policy.model import SOCKET_FAMILIES
    for name, number in SOCKET_FAMILIES.items():
        assert S.family_name(number) == name
    assert S.family_name(16) == "netlink" and S.family_name(0) == "unspec" and S.family_name(99) == "af99"


@pytest.mark.parametrize("body, valid", [
    ("network: {families: [unix, inet, inet6, vsock], netlink: [route, audit]}\n", True),
    ("network: {netlink: true}\n", True),
    ("network: {families: [vsok]}\n", False),
    ("network: {netlink: [uevent]}\n", False),
    ("network: {families: unix}\n", False),
])
def test_json_schema_agrees_on_the_new_keys(tmp_path, body, valid):
    import json
    jsonschema = pytest.importorskip("jsonschema")
    import yaml
    from agentwatch.policy import check
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + body)
    assert (check(str(path))[0] is not None) == valid
    with open(os.path.join(os.path.dirname(POLICY), "agentpolicy.schema.json")) as f:
        schema = json.load(f)
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid(yaml.safe_load(HEAD + body)) == valid


# ------------------------------------------------------------------ arguments read at exit

def refused_with_args(name, pid, *args):
    """An EV_NOENTRY record whose arguments the exit program read (R.NOENTRY_ARGS)."""
    from agentwatch.sensors import records as R
    _, r = syscall(name, pid, args, ret=-1, extra=(R.NOENTRY_ARGS, 0))
    return R.EV_NOENTRY, r


def test_arguments_tell_a_refusal_from_an_ordinary_eperm(by_arg):
    """With the run's filter rules, an EPERM exit without an entry is a
    refusal only if the filter refuses those arguments; the report says which."""
    by_arg.judge.seccomp_rules = list(plan(SeccompPolicy(socket_families=DEFAULT_FAMILIES)))
    feed(by_arg.correlator,
         refused_with_args("ioctl", CHILD, 0, 0x540E, 0),                  # TIOCSCTTY: its own EPERM
         refused_with_args("ioctl", CHILD, 0, (1 << 32) | TIOCSTI, 0),     # refused, high bits too
         refused_with_args("socket", CHILD, socket.AF_NETLINK, 3, 2),      # usersock: refused
         refused_with_args("socket", CHILD, socket.AF_INET, 3, 0),         # raw inet: not the filter's
         refused_with_args("setpriority", CHILD, 0, 1, 19))                # PRIO_PROCESS: its own
    got = [(v.rule, v.detail["args"], v.detail["refused"]) for v in by_arg.violations()]
    assert got == [("process.terminal", [0, (1 << 32) | TIOCSTI, 0],
                    "TIOCSTI: " + sf.TERMINAL_IOCTLS["TIOCSTI"][1]),
                   ("network.socket", [socket.AF_NETLINK, 3, 2],
                    "netlink protocol usersock: not in network.netlink")]


def test_without_rules_or_arguments_every_refusal_counts(by_arg):
    feed(by_arg.correlator, refused_with_args("ioctl", CHILD, 0, 0x540E, 0))   # no rules given
    by_arg.judge.seccomp_rules = list(plan(SeccompPolicy()))
    feed(by_arg.correlator, refused("setpriority", CHILD))                  # no arguments read
    assert [v.rule for v in by_arg.violations()] == ["process.terminal", "syscalls.deny"]
