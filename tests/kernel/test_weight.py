"""A run's weight (`--weight`, issue #17) in its cgroup, on the real
kernel: cpu.weight where the cpu controller is cgroup v2's, cpu.shares
(weight * 1024 / 100) on the v1 fallback of hybrid hosts. The agent reads
its own cgroup's file, as only it can see it while the run lives."""
import json
import sys

import pytest

from conftest import aw, read_events

pytestmark = pytest.mark.kernel

# prints {"cpu.weight" or "cpu.shares": value} of the agent's own cgroup
PRINT_CPU_WEIGHT = r"""
import json, os
mounts = {}
for line in open("/proc/self/mounts"):
    dev, mnt, fstype, opts = line.split()[:4]
    if fstype == "cgroup2":
        mounts.setdefault("v2", mnt)
    elif fstype == "cgroup" and "cpu" in opts.split(","):
        mounts["v1"] = mnt
out = {}
for line in open("/proc/self/cgroup"):
    _, ctls, path = line.rstrip("\n").split(":", 2)
    if ctls == "" and "v2" in mounts:
        f = os.path.join(mounts["v2"] + path, "cpu.weight")
        if os.path.exists(f):
            out["cpu.weight"] = open(f).read().strip()
    elif "cpu" in ctls.split(",") and "v1" in mounts:
        out["cpu.shares"] = open(os.path.join(mounts["v1"] + path, "cpu.shares")).read().strip()
        out["v1_path"] = path
print(json.dumps(out))
"""


def expected(applied, weight):
    return ({"cpu.weight": str(weight)} if applied == "v2"
            else {"cpu.shares": str(min(262144, max(2, weight * 1024 // 100)))})


@pytest.mark.parametrize("weight", [300, 1, 10000])
def test_the_weight_is_the_runs_cpu_weight(state_dir, tmp_path, weight):
    ev = tmp_path / "events.jsonl"
    r = aw("run", "--no-daemon", "--weight", str(weight), "--events", str(ev), "--",
           sys.executable, "-c", PRINT_CPU_WEIGHT)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    start = [e for e in read_events(ev) if e["kind"] == "lifecycle" and e["phase"] == "start"][0]
    enf = start["detail"]["enforcement"]
    assert enf["weight"] == weight
    applied = enf["limits_applied"]["weight"]
    assert applied in ("v1", "v2")
    want = expected(applied, weight)
    assert {k: got[k] for k in want} == want, got
    if applied == "v1":
        assert got["v1_path"] == f"/agentwatch/{start['run_id']}"


def test_without_a_weight_the_kernel_default_stays(state_dir, tmp_path):
    ev = tmp_path / "events.jsonl"
    r = aw("run", "--no-daemon", "--events", str(ev), "--", sys.executable, "-c", PRINT_CPU_WEIGHT)
    assert r.returncode == 0, r.stderr
    start = [e for e in read_events(ev) if e["kind"] == "lifecycle" and e["phase"] == "start"][0]
    enf = start["detail"]["enforcement"]
    assert "weight" not in enf and "limits_applied" not in enf


@pytest.mark.parametrize("value", ["0", "10001", "x"])
def test_a_weight_out_of_range_is_refused_before_anything_starts(state_dir, value):
    r = aw("run", "--weight", value, "--", "/bin/true")
    assert r.returncode == 2 and "--weight" in r.stderr and "Traceback" not in r.stderr, r.stderr
