"""The policies in policies/: each lints clean (no warnings either), has a
header comment, compiles, matches the JSON Schema, and judges the events it
is written for the way its header says."""
import glob
import json
import os

import pytest
import yaml

from agentwatch.policy import load
from agentwatch.policy import matchers as M
from agentwatch.policy.compile import compile_policy
from agentwatch.policy.lint import lint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POLICIES = os.path.join(REPO, "policies")
SHIPPED = sorted(glob.glob(os.path.join(POLICIES, "*.yaml")))
NAMES = [os.path.basename(p) for p in SHIPPED]
VARS = {"WORKSPACE": "/work/ws", "HOME": "/home/u", "TMPDIR": "/tmp/aw"}


def compiled(name):
    return compile_policy(load(os.path.join(POLICIES, name)), VARS)


def rule(decision):
    return decision.rule if decision else None


def _raw(name):
    with open(os.path.join(POLICIES, name)) as f:
        return yaml.safe_load(f)


def test_the_shipped_set():
    """Every policy in policies/ is checked by the tests below; these are
    the ones this file also judges in detail."""
    assert {"base.yaml", "coding-agent.yaml", "read-only-analyst.yaml", "offline.yaml",
            "tool-runner.yaml"} <= set(NAMES)
    for name in ("read-only-analyst.yaml", "offline.yaml", "tool-runner.yaml"):
        assert _raw(name)["extends"] == "base.yaml"
        assert load(os.path.join(POLICIES, name)).data != _raw(name)
    assert "extends" not in _raw("coding-agent.yaml")          # one file is the whole policy


@pytest.mark.parametrize("name", NAMES)
def test_lints_clean_without_warnings(name):
    result = lint([os.path.join(POLICIES, name)])
    assert result.problems == [] and result.exit_code(strict=True) == 0


@pytest.mark.parametrize("name", NAMES)
def test_has_a_header_comment_naming_the_file(name):
    with open(os.path.join(POLICIES, name)) as f:
        first = f.readline()
    assert first.startswith(f"# {name}: ")


@pytest.mark.parametrize("name", NAMES)
def test_compiles_and_names_itself(name):
    p = load(os.path.join(POLICIES, name))
    cp = compile_policy(p, VARS)
    assert p.name == name[:-5]
    assert cp.sensor_groups() == p.sensors and "process" in p.sensors
    assert p.agent_name in ("", p.name)


@pytest.mark.parametrize("name", NAMES)
def test_matches_the_json_schema(name):
    jsonschema = pytest.importorskip("jsonschema")
    with open(os.path.join(POLICIES, "agentpolicy.schema.json")) as f:
        schema = json.load(f)
    jsonschema.Draft202012Validator.check_schema(schema)
    with open(os.path.join(POLICIES, name)) as f:
        jsonschema.validate(yaml.safe_load(f), schema, cls=jsonschema.Draft202012Validator)


# ---------------------------------------------------------------- coding-agent

@pytest.fixture(scope="module")
def coding():
    cp = compiled("coding-agent.yaml")
    cp.domain_ips = {"pypi.org": {"151.101.0.223"}, "api.anthropic.com": {"160.79.104.10"}}
    return cp


@pytest.mark.parametrize("path, access, expected", [
    ("/home/u/.ssh/id_rsa", {"read"}, "filesystem.deny"),
    ("/home/u/.aws/credentials", {"read"}, "filesystem.deny"),
    ("/work/ws/app/.env", {"read"}, "filesystem.deny"),
    ("/proc/self/root/home/u/.ssh/id_rsa", {"read"}, "filesystem.deny"),      # detour
    ("/work/ws/../../home/u/.ssh/config", {"read"}, "filesystem.deny"),       # dot-dot
    ("/etc/passwd", {"write"}, "filesystem.write"),
    ("/usr/bin/python3", {"write", "truncate"}, "filesystem.write"),
    ("/var/log/syslog", {"read"}, "filesystem.read"),
    ("/usr/lib/x.so", {"read"}, None),
    ("/lib64/ld-linux-x86-64.so.2", {"read"}, None),
    ("/work/ws/src/main.py", {"write", "create"}, None),
    ("/work/ws", {"mkdir"}, None),
    ("/tmp/aw/pip-build/x", {"delete"}, None),
    ("/home/u/.bashrc", {"read"}, None),
    ("/home/u/.bashrc", {"write"}, "filesystem.write"),
    ("/dev/null", {"write"}, None),
])
def test_coding_agent_files(coding, path, access, expected):
    assert rule(coding.check_file(path, access)) == expected


@pytest.mark.parametrize("family, addr, port, expected", [
    ("inet", "127.0.0.1", 8081, "network.loopback"),
    ("inet6", "::1", 8081, "network.loopback"),
    ("inet6", "::ffff:127.0.0.1", 8081, "network.loopback"),
    ("inet", "0.0.0.0", 8081, "network.loopback"),                            # reaches this host
    ("inet", "151.101.0.223", 443, None),                                     # pypi.org
    ("inet6", "::ffff:151.101.0.223", 443, None),
    ("inet", "151.101.0.223", 80, "network.egress"),
    ("inet", "160.79.104.10", 443, None),
    ("inet", "8.8.8.8", 53, "network.egress"),
    ("unix", "/var/run/docker.sock", None, "network.unix"),
    ("unix", "@/tmp/.X11-unix/X0", None, "network.unix"),
])
def test_coding_agent_network(coding, family, addr, port, expected):
    assert rule(coding.check_connect(family, addr, port, "tcp", "connect")) == expected


def test_coding_agent_protocol_and_socket_types(coding):
    assert rule(coding.check_connect("inet", "151.101.0.223", 443, "udp", "sendto")) == "network.egress"
    assert coding.check_connect("inet", "151.101.0.223", 443, None, "connect") is None    # unknown: by port
    assert rule(coding.check_socket("inet", "raw")) == "network.socket"
    assert rule(coding.check_socket("packet", "raw")) == "network.socket"
    assert coding.check_socket("netlink", "raw", 0) is None          # NETLINK_ROUTE: address look-ups
    assert rule(coding.check_socket("netlink", "raw", 2)) == "network.socket"   # NETLINK_USERSOCK
    assert rule(coding.check_socket("vsock", "stream")) == "network.socket"
    assert coding.check_socket("inet6", "stream") is None


@pytest.mark.parametrize("path, expected", [
    ("/usr/sbin/iptables", "process.exec"),
    ("/work/ws/.venv/bin/python", "process.exec"),
    ("/tmp/aw/payload", "process.exec"),
    ("/home/u/.ssh/evil", "filesystem.deny"),
    ("/usr/bin/git", None),
    ("/usr/lib/git-core/git-remote-https", None),
    ("/usr/local/bin/node", None),
])
def test_coding_agent_exec(coding, path, expected):
    assert rule(coding.check_exec(path)) == expected


@pytest.mark.parametrize("name, expected", [
    ("ptrace", "process.ptrace"), ("process_vm_readv", "process.ptrace"), ("setuid", "process.change_uid"),
    ("unshare", "process.namespaces"), ("setns", "process.namespaces"), ("bpf", "process.bpf"),
    ("finit_module", "process.modules"), ("kexec_load", "process.modules"),
    ("io_uring_setup", "process.io_uring"), ("memfd_create", "process.memfd_exec"),
    ("keyctl", "syscalls.deny"), ("read", None), ("openat", None),
])
def test_coding_agent_syscalls(coding, name, expected):
    d = coding.check_syscall(name)
    assert rule(d) == expected
    if d:
        assert d.category == ("syscall" if expected == "syscalls.deny" else "process")
        assert d.action == "alert"


def test_coding_agent_decisions_carry_the_pattern_and_action(coding):
    d = coding.check_file("/home/u/.ssh/id_rsa", {"read"})
    assert d.category == "filesystem" and d.action == "alert" and d.pattern == "${HOME}/.ssh/**"
    assert "/home/u/.ssh/id_rsa" in d.reason


# ---------------------------------------------------------------- the others

def test_read_only_analyst():
    cp = compiled("read-only-analyst.yaml")
    assert cp.check_file("/work/ws/report.md", {"read"}) is None
    assert rule(cp.check_file("/work/ws/report.md", {"write"})) == "filesystem.write"
    assert cp.check_file("/tmp/aw/notes", {"write", "create"}) is None
    assert rule(cp.check_file("/home/u/.bashrc", {"read"})) == "filesystem.read"
    assert rule(cp.check_file("/etc/shadow", {"read"})) == "filesystem.deny"                 # from base.yaml
    assert rule(cp.check_connect("inet", "151.101.0.223", 443, "tcp")) == "network.egress"
    assert rule(cp.check_exec("/tmp/aw/a.out")) == "filesystem.exec"
    assert cp.check_exec("/usr/bin/grep") is None
    assert cp.action_for("filesystem", "filesystem.write") == "deny"
    assert cp.action_for("network", "network.egress") == "alert"


def test_offline():
    cp = compiled("offline.yaml")
    for args in [("inet", "1.1.1.1", 443), ("inet", "127.0.0.1", 8080), ("inet6", "::1", 22),
                 ("unix", "/run/dbus/system_bus_socket", None), ("unix", "@abstract", None)]:
        d = cp.check_connect(*args)
        assert d is not None and d.category == "network" and d.action == "deny", args
    assert cp.check_file("/anything/at/all", {"write"}) is None
    assert rule(cp.check_file("/home/u/.ssh/id_rsa", {"read"})) == "filesystem.deny"
    assert rule(cp.check_syscall("ptrace")) == "process.ptrace"


def test_tool_runner_is_execute_only_and_w_xor_x():
    p = load(os.path.join(POLICIES, "tool-runner.yaml"))
    fs = p.spec.filesystem
    for w in fs.write:
        for x in fs.exec:
            assert not M.overlap(w.value, x.value), (w.value, x.value)
    cp = compile_policy(p, VARS)
    for tool in ["/usr/bin/jq", "/usr/bin/grep", "/usr/bin/sed", "/bin/cat", "/usr/bin/python3",
                 "/usr/bin/python3.11"]:
        assert cp.check_exec(tool) is None, tool
    d = cp.check_exec("/usr/bin/curl")
    assert d.rule == "process.exec" and d.action == "kill"
    assert rule(cp.check_exec("/tmp/aw/out/script")) == "process.exec"
    assert cp.check_file("/tmp/aw/out/result.json", {"write", "create"}) is None
    assert rule(cp.check_file("/tmp/aw/other", {"write"})) == "filesystem.write"
    assert cp.check_file("/home/u/.ssh/id_rsa", {"read"}).action == "kill"
    assert cp.action_for("network", "network.egress") == "deny"


def test_base_on_its_own_restricts_only_secrets_and_kernel_powers():
    cp = compiled("base.yaml")
    assert cp.check_file("/etc/passwd", {"write"}) is None
    assert rule(cp.check_file("/home/u/.kube/config", {"read"})) == "filesystem.deny"
    assert cp.check_connect("inet", "1.1.1.1", 443, "tcp") is None
    assert cp.check_exec("/anything") is None
    assert rule(cp.check_syscall("mount")) == "syscalls.deny"
    assert rule(cp.check_syscall("bpf")) == "process.bpf"
