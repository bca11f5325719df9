"""No silent refusals: every call a layer of the sandbox refuses is in the
run's log as a violation naming the rule and the kernel layer.

tests/kernel/csrc/refusals.c tries, with raw syscalls, each thing Landlock,
seccomp, cgroup BPF, the pids limit and the mount namespace refuse, and a few
calls the policy allows; the test runs it under one policy that enforces
every section (action deny, so the agent goes on after each refusal) and
matches each refused attempt with its violation.
"""
import json
import os
import shutil
import socket

import pytest

from agentwatch.sandbox import landlock
from conftest import aw, free_port, read_events

pytestmark = pytest.mark.kernel

POLICY = """\
apiVersion: agentwatch/v1
kind: AgentPolicy
metadata: {{name: refusals}}
filesystem:
  read: ["/usr/**", "/lib/**", "/lib64/**", "/etc/**", "/bin/**", "/dev/null", "/dev/zero",
         "${{WORKSPACE}}/**",
         "{ro}/**", "{bindir}/**"]
  write: ["${{WORKSPACE}}/**"]
  exec: ["{bindir}/**"]
  deny: ["${{WORKSPACE}}/.git/hooks/**"]
network:
  allow: []
  loopback: [{allowed_port}]
  unix: false
process:
  ptrace: false
  namespaces: false
  change_uid: false
syscalls:
  deny: [mount]
resources: {{pids: {pids}}}
on_violation:
  default: deny
"""

# attempt -> (rule, layer) of the violation it must produce
REFUSED = {
    "landlock-open-read": ("filesystem.read", "landlock"),
    "landlock-open-legacy": ("filesystem.read", "landlock"),
    "landlock-open-write": ("filesystem.write", "landlock"),
    "landlock-creat": ("filesystem.write", "landlock"),
    "landlock-truncate": ("filesystem.write", "landlock"),
    "landlock-unlink": ("filesystem.write", "landlock"),
    "landlock-rmdir": ("filesystem.write", "landlock"),
    "landlock-mkdir": ("filesystem.write", "landlock"),
    "landlock-mknod-fifo": ("filesystem.write", "landlock"),
    "landlock-mknod-char": ("filesystem.write", "landlock"),
    "landlock-symlink": ("filesystem.write", "landlock"),
    "landlock-link": ("filesystem.write", "landlock"),
    "landlock-rename": ("filesystem.write", "landlock"),
    "landlock-exec": ("filesystem.exec", "landlock"),
    "landlock-ioctl-dev": ("filesystem.write", "landlock"),
    "landlock-tcp-connect": ("network.loopback", "landlock"),
    "landlock-abstract-unix": ("network.unix", "landlock"),
    "egress-udp-sendto": ("network.egress", "cgroup-bpf"),
    "egress-udp-connect": ("network.egress", "cgroup-bpf"),
    "seccomp-ptrace": ("process.ptrace", "seccomp"),
    "seccomp-unshare": ("process.namespaces", "seccomp"),
    "seccomp-clone-newns": ("process.namespaces", "seccomp"),
    "seccomp-socket-vsock": ("network.socket", "seccomp"),
    "seccomp-ioctl-tiocsti": ("process.terminal", "seccomp"),
    "seccomp-mount": ("syscalls.deny", "seccomp"),
    "mount-pinned-rename": ("filesystem.deny", "mount"),
    "mount-masked-create": ("filesystem.deny", "mount"),
    "clone-pids-limit": ("resources.pids", "pids"),
}
# Landlock ABI a refusal needs (the BPF LSM guest's 6.1 kernel has ABI 2):
# below it the call is not refused, and not expected to be
NEEDS_ABI = {"landlock-truncate": 3, "landlock-tcp-connect": 4, "landlock-ioctl-dev": 5,
             "landlock-abstract-unix": 6}
ABI = landlock.abi_version()
REFUSED = {n: v for n, v in REFUSED.items() if ABI >= NEEDS_ABI.get(n, 1)}
ALLOWED = ("allowed-open-ws", "allowed-mkdir-ws", "allowed-rename-ws", "allowed-mknod-fifo-ws",
           "allowed-read-ro", "allowed-socket-inet")
# what a violation's detail says of each attempt, to tell which one it is
EVIDENCE = {
    "landlock-open-read": lambda d: d.get("path", "").endswith("/outside/secret") and d.get("op") == "open",
    "landlock-open-legacy": lambda d: d.get("path", "").endswith("/outside/secret2"),
    "landlock-open-write": lambda d: d.get("path", "").endswith("/ro/file") and "write" in d.get("access", ()),
    "landlock-creat": lambda d: d.get("path", "").endswith("/ro/new"),
    "landlock-truncate": lambda d: d.get("path", "").endswith("/ro/t") and d.get("op") == "truncate",
    "landlock-unlink": lambda d: d.get("path", "").endswith("/ro/u") and d.get("op") == "unlink",
    "landlock-rmdir": lambda d: d.get("path", "").endswith("/ro/dir"),
    "landlock-mkdir": lambda d: d.get("path", "").endswith("/ro/newdir"),
    "landlock-mknod-fifo": lambda d: d.get("path", "").endswith("/ro/fifo"),
    "landlock-mknod-char": lambda d: d.get("path", "").endswith("/ws/null"),
    "landlock-symlink": lambda d: d.get("path", "").endswith("/ro/link"),
    "landlock-link": lambda d: d.get("op") == "link",
    "landlock-rename": lambda d: d.get("op") == "rename" and d.get("path", "").endswith("/ro/r"),
    "landlock-exec": lambda d: d.get("path", "").endswith("/ro/prog"),
    # the fd's path is read from /proc while it is open: best effort
    "landlock-ioctl-dev": lambda d: d.get("syscall") == "ioctl" and d.get("request") == "0x541b",
    "landlock-tcp-connect": lambda d: d.get("op") == "connect" and d.get("family") == "inet",
    "landlock-abstract-unix": lambda d: str(d.get("addr", "")).startswith("@"),
    "egress-udp-sendto": lambda d: d.get("addr") == "192.0.2.1",
    "egress-udp-connect": lambda d: d.get("addr") == "192.0.2.2",
    "seccomp-ptrace": lambda d: d.get("syscall") == "ptrace",
    "seccomp-unshare": lambda d: d.get("syscall") == "unshare",
    "seccomp-clone-newns": lambda d: d.get("syscall") == "clone",
    "seccomp-socket-vsock": lambda d: d.get("syscall") == "socket",
    "seccomp-ioctl-tiocsti": lambda d: d.get("syscall") == "ioctl" and "TIOCSTI" in str(d.get("refused")),
    "seccomp-mount": lambda d: d.get("syscall") == "mount",
    "mount-pinned-rename": lambda d: d.get("path", "").endswith("/ws/.git"),
    "mount-masked-create": lambda d: d.get("path", "").endswith("/.git/hooks/pre-commit"),
    "clone-pids-limit": lambda d: True,
}


@pytest.fixture
def world(tmp_path, cbin):
    ws, ro, out, bindir = (tmp_path / n for n in ("ws", "ro", "outside", "bin"))
    for d in (ws, ro, out, bindir, ws / ".git" / "hooks", ro / "dir"):
        d.mkdir(parents=True)
    for f in (out / "secret", out / "secret2", ro / "file", ro / "t", ro / "u", ro / "r"):
        f.write_text("data\n")
    shutil.copy("/bin/true", ro / "prog")
    agent = bindir / "refusals"
    shutil.copy(cbin("refusals"), agent)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"aw-refusals-{os.getpid()}"
    listener.bind("\0" + name)
    listener.listen(4)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(ro=ro, bindir=bindir, allowed_port=free_port(), pids=12))
    yield dict(ws=ws, ro=ro, out=out, agent=agent, policy=policy, abstract=name, tmp=tmp_path)
    listener.close()


def run(world, state_dir):
    ev = world["tmp"] / "events.jsonl"
    # --allow-downgrade: an older kernel's Landlock ABI holds less (the
    # guest's 6.1: ABI 2); the attempts it cannot refuse are skipped below
    r = aw("run", "--policy", str(world["policy"]), "--workspace", str(world["ws"]),
           "--allow-downgrade", "--events", str(ev), "--", str(world["agent"]), str(world["ws"]), str(world["ro"]),
           str(world["out"]), str(free_port()), world["abstract"], cwd=str(world["ws"]))
    attempts = {}
    for line in r.stdout.splitlines():
        if line.startswith("ATTEMPT "):
            _, name, result = line.split()
            attempts[name] = result
    assert ev.exists(), f"the run did not start:\n{r.stderr[-3000:]}"
    return r, attempts, read_events(ev)


def test_every_refusal_is_reported_with_rule_and_layer(world, state_dir):
    r, attempts, events = run(world, state_dir)
    assert "DONE" in r.stdout, r.stdout + r.stderr
    vs = [e for e in events if e["kind"] == "violation" and not e["detail"].get("repeat")]
    # every refused attempt was refused (else the test proves nothing), ...
    not_refused = {n: attempts.get(n) for n in REFUSED if attempts.get(n) == "ok" or n not in attempts}
    assert not not_refused, f"not refused: {not_refused}\n{r.stdout}"
    for n in ALLOWED:
        assert attempts.get(n) == "ok", (n, attempts.get(n))
    # ... and reported, with the rule and the layer
    missing = {}
    for name, (rule, layer) in REFUSED.items():
        match = EVIDENCE.get(name, lambda d: True)
        got = [v for v in vs if v["rule"] == rule and match(v["detail"])
               and v["detail"].get("layer") == layer and v["action"] == "deny"]
        if not got:
            missing[name] = (attempts[name], rule, layer)
    assert not missing, ("refusals with no violation naming rule and layer: "
                         + json.dumps(missing, indent=1) + "\n"
                         + "\n".join(json.dumps(v) for v in vs))
    # the allowed calls produced none
    ws = str(world["ws"])
    for v in vs:
        path = str(v["detail"].get("path") or "")
        assert not path.startswith((f"{ws}/mine", f"{ws}/d", f"{ws}/fifo")), v
        assert not path.startswith(str(world["ro"]) + "/file") or v["detail"].get("op") != "open" \
            or "write" in v["detail"].get("access", ()), v
