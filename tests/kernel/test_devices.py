"""An enforced run's /dev is a minimal one of its own (sandbox/devices.py).

Under the strict shipped policy, which reads "/dev/**", a root agent must
not reach the host's raw disk (the block device / is on), the kernel log or
other consoles: they do not exist in its /dev. The devices every program
uses still work, a device the policy names by exact path is there, and
`policy explain` lists the run's /dev."""
import os
import stat
import sys

import pytest

from conftest import REPO, aw, read_events

pytestmark = pytest.mark.kernel
STRICT = os.path.join(REPO, "policies", "sandboxed-agent.yaml")

PROBE = r"""
import os, sys
try:
    print("LS", " ".join(sorted(os.listdir("/dev"))), flush=True)
except OSError as e:
    print("LS", os.strerror(e.errno), flush=True)
for path in sys.argv[1:]:
    try:
        with open(path, "rb") as f:
            print("READ", path, len(f.read(512)), flush=True)
    except OSError as e:
        print("READ", path, os.strerror(e.errno), flush=True)
with open("/dev/null", "w") as f:
    f.write("x")
print("URANDOM", len(open("/dev/urandom", "rb").read(16)), flush=True)
try:
    open("/dev/aw-new", "w")
    print("CREATE ok", flush=True)
except OSError as e:
    print("CREATE", os.strerror(e.errno), flush=True)
"""


def _root_disk():
    """The host's block device node that / lives on, if it has one."""
    dev = os.stat("/").st_dev
    try:
        with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/uevent") as f:
            name = dict(line.strip().split("=", 1) for line in f if "=" in line).get("DEVNAME")
    except OSError:
        name = None
    path = f"/dev/{name}" if name else None
    return path if path and os.path.exists(path) and stat.S_ISBLK(os.stat(path).st_mode) else None


def _host_block_devices():
    return [f"/dev/{n}" for n in os.listdir("/dev")
            if stat.S_ISBLK(os.lstat(f"/dev/{n}").st_mode)]


def _run(tmp_path, policy, paths):
    ws = tmp_path / "ws"
    ws.mkdir()
    (tmp_path / "tmp").mkdir()
    (ws / "probe.py").write_text(PROBE)
    ev = tmp_path / "events.jsonl"
    r = aw("run", "--policy", str(policy), "--workspace", str(ws), "--allow-downgrade", "--no-daemon",
           "--events", str(ev), "--", "/usr/bin/python3", "-I", str(ws / "probe.py"), *paths,
           cwd=str(ws), env={"HOME": str(tmp_path), "TMPDIR": str(tmp_path / "tmp")})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = {}
    for line in r.stdout.splitlines():
        tag, _, rest = line.partition(" ")
        lines.setdefault(tag, []).append(rest)
    return lines, read_events(ev)


def test_no_raw_disk_or_kernel_log_under_the_strict_policy(state_dir, tmp_path):
    disks = _host_block_devices()
    if not disks:
        pytest.skip("this host's /dev has no block device to hide")
    root = _root_disk()
    wanted = sorted(set(disks[:3] + ([root] if root else []) + ["/dev/kmsg", "/dev/tty1"]))
    lines, events = _run(tmp_path, STRICT, wanted)
    listed = set(lines["LS"][0].split())
    assert not listed & {os.path.basename(d) for d in disks}, listed
    assert {"null", "zero", "urandom", "tty", "pts", "shm", "fd", "stdin"} <= listed
    assert "kmsg" not in listed and "tty1" not in listed
    assert lines["READ"] == [f"{p} No such file or directory" for p in wanted]
    assert lines["URANDOM"] == ["16"]
    assert lines["CREATE"][0] != "ok"                  # read-only, and Landlock refuses it too
    start = [e for e in events if e["kind"] == "lifecycle" and e["phase"] == "start"][0]["detail"]
    assert "/dev/null" in start["enforcement"]["dev"]
    assert not set(start["enforcement"]["dev"]) & set(disks)


def test_a_device_the_policy_names_is_in_the_runs_dev(state_dir, tmp_path):
    disks = _host_block_devices()
    if not disks:
        pytest.skip("this host's /dev has no block device to name")
    named = sorted(disks)[0]
    policy = tmp_path / "p.yaml"
    policy.write_text("apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: dev}\n"
                      f"filesystem: {{read: ['/usr/**', '/lib/**', '/etc/**', '/proc/**', '{named}',"
                      " '${WORKSPACE}/**'], write: ['/dev/null']}\non_violation: {default: deny}\n")
    lines, _ = _run(tmp_path, policy, [named, "/dev/kmsg"])
    assert lines["READ"][0].split()[1].isdigit(), lines     # opened and read (an idle loop device: 0)
    assert lines["READ"][1] == "/dev/kmsg No such file or directory"


def test_explain_lists_the_runs_dev(tmp_path):
    r = aw("policy", "explain", STRICT)
    assert r.returncode == 0, r.stderr
    assert "/dev: a tmpfs of the run's own with" in r.stdout
