"""engine/judge.py Judge, fed synthetic records through the correlator (as a
run does): signals to processes outside the run, and syscalls seccomp
refused before their entry tracepoint.

Pids are above the kernel's pid_max (2**22), so /proc look-ups for them
can never hit a real process of the test host.
"""
import os

import pytest

from agentwatch.engine import judge as J
from agentwatch.engine import paths
from agentwatch.sensors import syscalls as S
from agentwatch.policy import load
from agentwatch.policy.compile import compile_policy
from test_engine import CHILD, LAUNCHER, NR, ROOT, env, feed, fork, repeat, syscall  # noqa: F401 (env: fixture)

HEAD = "apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata:\n  name: t\n"
OUTSIDE = 5_000_999
STRICT = HEAD + """process: {ptrace: false, namespaces: false}
syscalls: {deny: [keyctl]}
on_violation: {default: deny}
"""


@pytest.fixture
def judged(env, tmp_path):
    """(correlator, violations) for a run judged under STRICT (or a body given
    with judged.policy(body))."""
    c, run, events = env
    state = {}

    def make(body=STRICT):
        p = tmp_path / "p.yaml"
        p.write_text(body)
        compiled = compile_policy(load(str(p)), {"WORKSPACE": "/w", "HOME": "/h", "TMPDIR": "/t"})
        state["judge"] = J.Judge(compiled, c, run, events.append)
        run.emit = lambda ev: (events.append(ev), state["judge"](ev))
        run.procs[ROOT].launching = False
        return state["judge"]

    make()
    feed(c, fork(ROOT, CHILD))

    class Judged:
        correlator = c
        policy = staticmethod(make)
        judge = property(lambda self: state["judge"])

        @staticmethod
        def violations():
            return [e for e in events if e.kind == "violation"]
    return Judged()


def sig(name, pid, *args, ret=0):
    return syscall(name, pid, args=args, ret=ret)


# ------------------------------------------------------------------ signals

def test_signal_to_agentwatch_is_a_process_violation(judged):
    me = os.getpid()
    feed(judged.correlator, sig("kill", CHILD, me, 15, ret=-1))
    [v] = judged.violations()
    assert (v.category, v.rule, v.action) == ("process", "process.signal", "deny")
    d = v.detail
    assert d["target_pid"] == me and d["signal_name"] == "SIGTERM" and d["signal"] == 15
    assert d["target"] == f"agentwatch (pid {me})"
    assert d["kernel"] == "denied (EPERM)"
    assert d["ancestry"] == [CHILD, ROOT]


@pytest.mark.parametrize("name, args", [
    ("kill", (CHILD, 9)), ("kill", (ROOT, 15)), ("tgkill", (CHILD, CHILD, 10)),
    ("tkill", (CHILD, 2)), ("rt_sigqueueinfo", (ROOT, 34, 0)),
    ("rt_tgsigqueueinfo", (ROOT, ROOT, 35, 0)),
])
def test_signals_within_the_run_are_not_reported(judged, name, args):
    feed(judged.correlator, sig(name, ROOT if args[0] == CHILD else CHILD, *args))
    assert judged.violations() == []


@pytest.mark.parametrize("name, args, target", [
    ("kill", (OUTSIDE, 9), OUTSIDE), ("tgkill", (OUTSIDE, OUTSIDE + 1, 10), OUTSIDE),
    ("rt_sigqueueinfo", (OUTSIDE, 34, 0), OUTSIDE), ("rt_tgsigqueueinfo", (OUTSIDE, OUTSIDE, 35, 0), OUTSIDE),
])
def test_signals_to_other_processes_are_reported(judged, name, args, target):
    feed(judged.correlator, sig(name, CHILD, *args))
    [v] = judged.violations()
    assert v.rule == "process.signal" and v.detail["target_pid"] == target
    assert v.detail["op"] == name and v.detail["kernel"] == "allowed"


def test_signal_names(judged):
    feed(judged.correlator, sig("kill", CHILD, OUTSIDE, 34), sig("kill", CHILD, OUTSIDE, 40))
    assert [v.detail["signal_name"] for v in judged.violations()] == ["SIGRTMIN", "SIGRTMIN+6"]


def test_probe_and_failed_signals_are_not_judged(judged):
    feed(judged.correlator,
         sig("kill", CHILD, OUTSIDE, 0),             # existence probe: nothing delivered
         sig("kill", CHILD, OUTSIDE, 15, ret=-3),    # ESRCH: no such process
         sig("kill", CHILD, OUTSIDE, 99, ret=-22))   # EINVAL
    assert judged.violations() == []


def test_kill_minus_one_is_every_process(judged):
    feed(judged.correlator, sig("kill", CHILD, -1, 9))
    [v] = judged.violations()
    assert v.detail["target"].startswith("every process") and v.detail["target_pid"] is None
    assert v.detail["kernel"].startswith("delivered to at least one")


def test_process_groups(judged, monkeypatch):
    monkeypatch.setattr(J.procfs, "pgid", lambda pid: LAUNCHER)     # still in agentwatch's group
    feed(judged.correlator, sig("kill", CHILD, 0, 15), sig("kill", CHILD, -CHILD, 15))
    [v] = judged.violations()                        # -CHILD: a group the run made
    assert v.detail["target"] == f"process group {LAUNCHER}"
    monkeypatch.setattr(J.procfs, "pgid", lambda pid: ROOT)         # the agent made its own group
    feed(judged.correlator, sig("kill", CHILD, 0, 1), sig("kill", CHILD, -OUTSIDE, 1))
    assert [v.detail["target"] for v in judged.violations()][1:] == [f"process group {OUTSIDE}"]


def test_unknown_targets_are_counted_not_reported(judged):
    # the caller's group (the caller is gone), a thread that is gone, a closed pidfd
    feed(judged.correlator, sig("kill", CHILD, 0, 15), sig("tkill", CHILD, OUTSIDE, 15),
         sig("pidfd_send_signal", CHILD, 7, 15, 0, 0))
    assert judged.violations() == []
    assert judged.judge.unjudged == 3


def test_pidfd_is_resolved_through_fdinfo(judged, monkeypatch):
    from agentwatch.sensors import syscalls as S
    monkeypatch.setattr(S, "pidfd_pid", lambda pid, fd: OUTSIDE if (pid, fd) == (CHILD, 7) else None)
    feed(judged.correlator, sig("pidfd_send_signal", CHILD, 7, 15, 0, 0, ret=-1))
    [v] = judged.violations()
    assert v.detail["target_pid"] == OUTSIDE and v.detail["pidfd"] == 7
    assert v.detail["kernel"] == "denied (EPERM)"


def test_pidfd_of_a_live_process_reads_fdinfo():
    from agentwatch.sensors import syscalls as S
    if not hasattr(os, "pidfd_open"):
        pytest.skip("no os.pidfd_open")
    fd = os.pidfd_open(os.getppid())
    try:
        assert S.pidfd_pid(os.getpid(), fd) == os.getppid()
    finally:
        os.close(fd)
    assert S.pidfd_pid(os.getpid(), S.PIDFD_SELF_THREAD_GROUP) == os.getpid()


def test_repeats_are_counted_not_reported_again(judged):
    feed(judged.correlator, *[sig("kill", CHILD, OUTSIDE, 15, ret=-1)] * 3)
    assert len(judged.violations()) == 1
    assert judged.judge.by_rule["process.signal"] == 3


@pytest.mark.parametrize("before", [1, 3])
def test_a_folded_repeat_counts_every_call_it_stands_for(judged, before):
    """The kernel folds identical calls into one line with repeat=N: the
    verdict counts N, and the sum of count over the rule's violations is
    the number of calls (the first reported in full, the rest as totals)."""
    judged.policy(HEAD + "filesystem: {read: ['/**'], write: ['/w/**']}\non_violation: {default: alert}\n")
    write = syscall("openat", CHILD, (S.AT_FDCWD, 0, os.O_WRONLY), ret=3, str1="/etc/x", ts=1_000)
    feed(judged.correlator, *[write] * before, repeat(CHILD, 1_000, 9, last=5_000))
    assert judged.judge.by_rule["filesystem.write"] == before + 9
    judged.judge.tick(final=True)
    viol = judged.violations()
    assert len(viol) == 2 and viol[0].count == 1 and viol[1].detail["repeat"]
    assert sum(v.count for v in viol) == before + 9


def test_a_folded_line_seen_first_is_one_report_and_the_rest_a_total(judged):
    from agentwatch.core.events import FileEvent
    judged.policy(HEAD + "filesystem: {read: ['/**'], write: ['/w/**']}\non_violation: {default: alert}\n")
    judged.judge(FileEvent(op="open", path="/etc/x", abspath="/etc/x", access=["write"],
                           flags=os.O_WRONLY, ret=3, pid=CHILD, repeat=5))
    judged.judge.tick(final=True)
    assert [v.count for v in judged.violations()] == [1, 4]
    assert judged.judge.by_rule["filesystem.write"] == 5


def test_signals_are_not_judged_without_a_process_section(judged):
    judged.policy(HEAD + "filesystem: {read: ['/**'], write: []}\n")
    feed(judged.correlator, sig("kill", CHILD, OUTSIDE, 9))
    assert judged.violations() == []


def test_signal_action_follows_on_violation(judged):
    judged.policy(HEAD + "process: {max_processes: 10}\non_violation: {rules: {process.signal: kill}}\n")
    killed = []
    judged.judge.on_kill = killed.append
    feed(judged.correlator, sig("kill", CHILD, OUTSIDE, 9))
    [v] = judged.violations()
    assert v.action == "kill" and killed and killed[0].rule == "process.signal"


# ------------------------------------------------------------------ seccomp EPERM before entry

def refused(name, pid):
    from agentwatch.sensors import records as R
    etype, r = syscall(name, pid, ret=-1)
    return R.EV_NOENTRY, r


@pytest.mark.parametrize("name, rule, category", [
    ("ptrace", "process.ptrace", "process"), ("unshare", "process.namespaces", "process"),
    ("keyctl", "syscalls.deny", "syscall"),
    ("io_uring_setup", "syscalls.deny", "syscall"),      # io_uring is not false in STRICT
])
def test_seccomp_refusal_is_one_deny_violation(judged, name, rule, category):
    feed(judged.correlator, refused(name, CHILD))
    [v] = judged.violations()
    assert (v.rule, v.category, v.action) == (rule, category, "deny")
    assert v.detail["syscall"] == name and v.detail["args"] is None
    assert v.detail["kernel"] == "denied (EPERM, seccomp)"
    assert v.detail["ancestry"] == [CHILD, ROOT]


def test_seccomp_refusal_of_a_name_no_rule_names(judged, monkeypatch):
    """The filter's always-denied list and the mount family (process.namespaces)."""
    from agentwatch.sensors import syscalls as S
    for spec in S.specs_for([], denied=["kcmp", "fsopen"])[-2:]:
        nr = S.syscall_number(spec.name)
        monkeypatch.setitem(judged.correlator.nr_to_spec, nr, spec)
        monkeypatch.setitem(NR, spec.name, nr)
    feed(judged.correlator, refused("kcmp", CHILD), refused("fsopen", CHILD))
    got = [(v.rule, v.category, v.action) for v in judged.violations()]
    assert got == [("syscalls.deny", "syscall", "deny"), ("process.namespaces", "process", "deny")]
    assert "always denied" in judged.violations()[0].detail["reason"]


def test_seccomp_refusal_with_a_kill_rule_kills(judged):
    judged.policy(STRICT.replace("{default: deny}", "{default: deny, rules: {process.ptrace: kill}}"))
    killed = []
    judged.judge.on_kill = killed.append
    feed(judged.correlator, refused("ptrace", CHILD))
    [v] = judged.violations()
    assert v.action == "kill" and killed


def test_refusals_are_counted_once_each(judged):
    feed(judged.correlator, *[refused("ptrace", CHILD)] * 4, refused("bpf", CHILD))
    assert [v.detail["syscall"] for v in judged.violations()] == ["ptrace", "bpf"]
    assert judged.judge.by_rule["process.ptrace"] == 4


# ------------------------------------------------------------------ path resolution cache

SECRETS = HEAD + """filesystem:
  read: ["/**"]
  deny: ["{secret}/**"]
on_violation: {{default: alert}}
"""


def _open(pid, path):
    return syscall("openat", pid, (S.AT_FDCWD, 0, os.O_RDONLY), str1=path, ret=3)


@pytest.fixture
def linkable(judged, tmp_path):
    """(judged under a policy denying tmp_path/secret, a plain file, the secret)."""
    paths.forget_resolved()
    (tmp_path / "secret").mkdir()
    secret = tmp_path / "secret" / "key"
    secret.write_text("k")
    plain = tmp_path / "plain"
    plain.write_text("p")
    judged.policy(SECRETS.format(secret=tmp_path / "secret"))
    return judged, str(plain), str(secret)


def test_a_symlink_the_agent_makes_on_a_resolved_path_is_followed_at_once(linkable):
    judged, plain, secret = linkable
    feed(judged.correlator, _open(CHILD, plain))
    assert (plain, True) in paths._canonical           # resolved to itself: remembered
    os.unlink(plain)
    os.symlink(secret, plain)                      # what the agent's symlink record reports
    feed(judged.correlator, syscall("symlinkat", CHILD, (0, S.AT_FDCWD & 0xFFFFFFFFFFFFFFFF, 0),
                                    str1=plain, data2=secret.encode(), ret=0),
         _open(CHILD, plain))
    [v] = judged.violations()
    assert v.rule == "filesystem.deny" and v.detail["path"] == secret


def test_a_symlink_made_outside_the_run_is_followed_within_the_cache_time(linkable, monkeypatch):
    judged, plain, secret = linkable
    now = [1000.0]
    monkeypatch.setattr(paths.time, "monotonic", lambda: now[0])
    paths._canonical_until = 0.0
    feed(judged.correlator, _open(CHILD, plain))
    os.unlink(plain)
    os.symlink(secret, plain)                      # no record of it: not the agent's doing
    feed(judged.correlator, _open(CHILD, plain))
    assert judged.violations() == []               # the remembered resolution, for now
    now[0] += paths.REAL_CACHE_S
    feed(judged.correlator, _open(CHILD, plain))
    [v] = judged.violations()
    assert v.detail["path"] == secret


def test_only_paths_that_resolve_to_themselves_outside_proc_are_remembered(linkable, tmp_path):
    judged, plain, secret = linkable
    link = tmp_path / "link"
    link.symlink_to(secret)
    for _ in range(2):
        feed(judged.correlator, _open(CHILD, str(link)), _open(CHILD, f"/proc/{os.getpid()}/status"))
    assert (str(link), True) not in paths._canonical
    assert not any(p.startswith("/proc/") for p, _ in paths._canonical)
    assert [v.detail["path"] for v in judged.violations()] == [secret]   # then counted as a repeat


def test_refusal_of_a_syscall_this_runs_filter_allows_is_not_its_own(judged):
    """On a shared monitor (the daemon) another run's filter may have the
    exit tracepoint of a syscall watched: an EPERM from it in this run is not
    this run's seccomp refusal."""
    judged.judge.seccomp_denied = {"ptrace"}
    feed(judged.correlator, refused("unshare", CHILD), refused("ptrace", CHILD))
    assert [v.detail["syscall"] for v in judged.violations()] == ["ptrace"]
