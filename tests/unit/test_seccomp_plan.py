"""The seccomp plan as pure logic: which rules a policy produces. No filter is
loaded here (tests/kernel/test_seccomp.py loads them)."""
import platform
import struct
import tempfile

import pytest
import seccomp
from hypothesis import given, strategies as st

from agentwatch.sandbox import seccomp_filter as sf
from agentwatch.sandbox.seccomp_filter import GROUPS, SeccompPolicy, plan

x86_64_only = pytest.mark.skipif(platform.machine() != "x86_64", reason="x86_64 names and ABIs")


def verdict(rules, syscall, *args):
    """What the planned filter does with syscall(args): an action, or None (allowed).
    Mirrors libseccomp: rules for one syscall are OR'ed, conds in a rule AND'ed."""
    args = [a & (2**64 - 1) for a in args] + [0] * (6 - len(args))   # registers: -1 is 2**64 - 1
    for r in rules:
        if r.syscall == syscall and all(c.matches(args) for c in r.conds):
            return r.action
    return None


def names(rules):
    return {r.syscall for r in rules}


def test_default_policy_denies_every_group_but_change_uid():
    rules = plan(SeccompPolicy())
    for toggle, (group, _) in GROUPS.items():
        present = set(group) & names(rules)
        if toggle == "change_uid":
            assert not present
        else:   # open_tree_attr may be unknown to this libseccomp: then it is a warning
            assert present | {w.split(":")[0] for w in rules.warnings} >= set(group)
    assert set(SeccompPolicy().other) - {"iopl", "ioperm"} <= names(rules)
    assert all(r.action in ("errno", "enosys") for r in rules)


def test_toggles_remove_their_group():
    everything = {t: True for t in GROUPS} | {"personality": True, "memfd_exec": True,
                                              "terminal": True, "prio_user": True}
    rules = plan(SeccompPolicy(other=(), **everything))
    assert list(rules) == []
    rules = plan(SeccompPolicy(other=(), **(everything | {"change_uid": False})))
    assert names(rules) == set(GROUPS["change_uid"][0])


def test_namespaces():
    rules = plan(SeccompPolicy())
    assert verdict(rules, "clone3") == "enosys"
    for flag in sf.CLONE_NEW_FLAGS.values():
        assert verdict(rules, "clone", flag | 17) == "errno"           # 17 = SIGCHLD
    glibc_fork = 0x01200000 | 17   # CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD
    glibc_thread = 0x003d0f00      # CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|*_TID
    assert verdict(rules, "clone", glibc_fork) is None
    assert verdict(rules, "clone", glibc_thread) is None
    assert verdict(rules, "clone", 0x80 | 17) is None   # 0x80 is CSIGNAL in clone, not CLONE_NEWTIME
    rules = plan(SeccompPolicy(namespaces=True))
    assert not names(rules) & {"clone", "clone3", "unshare", "setns"}


DEFAULT_RULES = plan(SeccompPolicy())


def check_personality(value):
    allowed = value & 0xFFFFFFFF in (sf.PER_LINUX, sf.PER_QUERY)   # the kernel takes an unsigned int
    assert (verdict(DEFAULT_RULES, "personality", value) is None) == allowed


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_personality_allows_only_per_linux_and_query(value):
    check_personality(value)


@pytest.mark.parametrize("value", [0, 0xFFFFFFFF, 0x0040000, 1, 0x80000000, 0x7FFFFFFF,
                                   0xFFFFFFFE, 1 << 32, (1 << 32) | 0x0040000, 2**64 - 1])
def test_personality_edges(value):
    check_personality(value)


def test_memfd_create():
    rules = plan(SeccompPolicy())
    assert verdict(rules, "memfd_create", 0, sf.MFD_EXEC | 1) == "errno"
    assert verdict(rules, "memfd_create", 0, 1) is None
    assert verdict(rules, "memfd_create", 0, 0x8) is None   # MFD_NOEXEC_SEAL
    assert "memfd_create" not in names(plan(SeccompPolicy(memfd_exec=True)))


def test_kill_action_keeps_clone3_enosys():
    rules = plan(SeccompPolicy(action="kill"))
    assert verdict(rules, "ptrace") == "kill"
    assert verdict(rules, "personality", 8) == "kill"
    assert verdict(rules, "clone3") == "enosys"
    with pytest.raises(ValueError, match="action"):
        plan(SeccompPolicy(action="trap"))


def test_extra_deny_and_other():
    rules = plan(SeccompPolicy(deny=["getcwd"], other=["reboot"]))
    assert verdict(rules, "getcwd") == "errno"
    assert verdict(rules, "reboot") == "errno"
    assert verdict(rules, "kcmp") is None


def test_unknown_names_are_all_named():
    with pytest.raises(ValueError) as e:
        plan(SeccompPolicy(deny=["getcwd", "nosuchcall", "alsobogus"], other=["frobnicate"]))
    assert "alsobogus, frobnicate, nosuchcall" in str(e.value)


@x86_64_only
def test_names_not_filterable_here_are_warnings():
    rules = plan(SeccompPolicy(deny=["set_tls"]))   # ARM only
    assert "set_tls" not in names(rules)
    assert any(w.startswith("set_tls:") for w in rules.warnings)
    rules = plan(SeccompPolicy(deny=["mseal"]))     # newer than libseccomp 2.5.4's table
    assert "mseal" in names(rules) or any(w.startswith("mseal:") for w in rules.warnings)


def test_one_unconditional_rule_per_syscall():
    rules = plan(SeccompPolicy(deny=["clone", "personality", "clone3", "ptrace"]))
    for n in ("clone", "personality", "clone3", "ptrace"):
        assert [r.conds for r in rules if r.syscall == n] == [()]
    assert verdict(rules, "clone3") == "enosys"   # first rule wins: glibc threads keep working
    assert verdict(rules, "clone", 17) == "errno"


def test_describe():
    text = "\n".join(sf.describe(SeccompPolicy(deny=["getcwd"])))
    for words in ("EPERM", "i386", "x32", "ptrace", "clone3 -> ENOSYS", "0xffffffff", "MFD_EXEC",
                  "fexecve", "denied by policy: getcwd"):
        assert words in text
    assert "kill" in sf.describe(SeccompPolicy(action="kill"))[0]


@x86_64_only
def test_build_kills_other_abis_without_loading():
    """libseccomp (2.5.4 here) adds the x32 check itself when SCMP_ARCH_X32 is
    not in the filter: `nr >= 0x40000000 and nr != -1 -> ACT_BADARCH`."""
    f = sf.build(SeccompPolicy())
    assert f.get_attr(seccomp.Attr.ACT_BADARCH) == seccomp.KILL_PROCESS & 0xFFFFFFFF  # unsigned here
    assert f.get_attr(seccomp.Attr.CTL_NNP) == 1
    assert f.exist_arch(seccomp.Arch.X86_64)
    assert not f.exist_arch(seccomp.Arch.X86) and not f.exist_arch(seccomp.Arch.X32)
    with tempfile.TemporaryFile() as t:
        f.export_bpf(t)
        t.seek(0)
        prog = t.read()
    insns = [struct.unpack("HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    BPF_JMP_JGE_K = 0x35
    assert any(code == BPF_JMP_JGE_K and k == 0x40000000 for code, _, _, k in insns[:6])


def test_actions_per_group_override_the_default():
    p = SeccompPolicy(actions={"ptrace": "kill", "deny": "kill"}, deny=["getcwd"])
    rules = plan(p)
    assert verdict(rules, "ptrace") == "kill" and verdict(rules, "process_vm_writev") == "kill"
    assert verdict(rules, "getcwd") == "kill"
    assert verdict(rules, "bpf") == "errno" and verdict(rules, "unshare") == "errno"
    assert "ptrace: kill" in sf.describe(p)[0] or "deny, ptrace" in sf.describe(p)[0]
    with pytest.raises(ValueError, match="bpf"):
        plan(SeccompPolicy(actions={"bpf": "trap"}))


def test_no_memfd_at_all():
    rules = plan(SeccompPolicy(memfd=False, actions={"memfd_exec": "kill"}))
    assert verdict(rules, "memfd_create", 0, 0) == "kill"
    assert [r.conds for r in rules if r.syscall == "memfd_create"] == [()]


def test_errno_denied_lists_what_the_sensor_must_watch():
    """Every syscall some call of which gets EPERM; kills and ENOSYS need no exit probe."""
    got = sf.errno_denied(SeccompPolicy(actions={"ptrace": "kill"}, deny=["getcwd"]))
    assert "bpf" in got and "unshare" in got and "getcwd" in got and "io_uring_enter" in got
    assert "clone" in got and "personality" in got and "memfd_create" in got   # conditional rules
    assert "ptrace" not in got and "clone3" not in got
    assert len(got) == len(set(got))


def test_toggle_of():
    assert sf.toggle_of("io_uring_enter") == "io_uring"
    assert sf.toggle_of("fsopen") == "namespaces"      # the mount family follows namespaces
    assert sf.toggle_of("pidfd_getfd") == "ptrace"
    assert sf.toggle_of("keyctl") is None and sf.toggle_of("getcwd") is None


@pytest.mark.parametrize("ov, kills", [
    ({"default": "deny"}, set()),
    ({"process": "kill"}, {"ptrace", "change_uid", "namespaces", "mount", "bpf", "modules",
                           "io_uring", "memfd_exec", "terminal"}),
    ({"default": "deny", "rules": {"process.ptrace": "kill"}}, {"ptrace"}),
    ({"syscalls": "kill", "rules": {"process.bpf": "kill"}},
     {"keyring", "personality", "other", "deny", "prio_user", "bpf"}),
    ({"network": "kill"}, {"socket"}),
    ({"rules": {"process.terminal": "kill"}}, {"terminal"}),
])
def test_the_policy_chooses_kill_or_errno_per_rule(ov, kills):
    from agentwatch.sandbox.plan import seccomp_actions
    acts = seccomp_actions({"on_violation": ov})
    assert {g for g, a in acts.items() if a == "kill"} == kills
    assert set(acts.values()) <= {"kill", "errno"}
