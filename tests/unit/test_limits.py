"""sandbox/limits: a limit the kernel refuses stops the launch with one
LaunchError naming it, not an OSError traceback (issue #15: cpu 0.001 and
pids 10**30 passed lint and then made `agentwatch run` crash; the validator
now refuses both, this is the net under it)."""
import pytest

from agentwatch.core.errors import LaunchError
from agentwatch.sandbox.limits import Limits


def test_a_refused_write_is_a_launch_error_naming_the_limit(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")   # a v2 cgroup with all three
    (tmp_path / "cpu.max").mkdir()                  # so the write fails (EISDIR) as the kernel's EINVAL would
    lim = Limits("r1", str(tmp_path), cpu=0.001)
    with pytest.raises(LaunchError) as e:
        lim.setup()
    assert str(e.value).startswith("agent not started: the kernel refused the cpu limit 0.001 "
                                   f"(writing '100 100000' to {tmp_path}/cpu.max: ")
    assert "\n" not in str(e.value)


def test_limits_are_written_as_parsed(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    lim = Limits("r1", str(tmp_path), pids=64, memory="1P", cpu=1.5)
    lim.setup()
    assert lim.applied == {"pids": "v2", "memory": "v2", "cpu": "v2"}
    assert (tmp_path / "memory.max").read_text() == str(1 << 50)
    assert (tmp_path / "pids.max").read_text() == "64"
    assert (tmp_path / "cpu.max").read_text() == "150000 100000"


def test_weight_is_cpu_weight_on_v2(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    lim = Limits("r1", str(tmp_path), cpu=1.5, weight=300)
    lim.setup()
    assert lim.applied == {"cpu": "v2", "weight": "v2"} and lim.missing == []
    assert (tmp_path / "cpu.weight").read_text() == "300"


@pytest.mark.parametrize("weight, shares", [(1, 10), (100, 1024), (300, 3072), (10000, 102400)])
def test_v1_shares_keep_the_weights_share_of_the_default(weight, shares):
    from agentwatch.sandbox.limits import v1_shares
    assert v1_shares(weight) == shares


def test_v1_shares_stay_in_the_kernels_range():
    from agentwatch.sandbox.limits import V1_SHARES, v1_shares
    assert V1_SHARES == (2, 262144)
    assert v1_shares(0) == 2 and v1_shares(10 ** 6) == 262144


def test_weight_without_a_cpu_controller_is_missing(tmp_path, monkeypatch):
    from agentwatch.sandbox import limits
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    monkeypatch.setattr(limits, "v1_mounts", lambda: {})
    monkeypatch.setattr("agentwatch.sandbox.cgroups.delegate_controllers", lambda *a: None)
    lim = Limits("r1", str(tmp_path), weight=50)
    lim.setup()
    assert lim.applied == {} and lim.missing == ["weight"]


def test_weight_on_v1_goes_to_cpu_shares_in_the_runs_group(tmp_path, monkeypatch):
    from agentwatch.sandbox import limits
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("memory pids\n")
    cpu = tmp_path / "cpu"
    monkeypatch.setattr(limits, "v1_mounts", lambda: {"cpu": str(cpu)})
    monkeypatch.setattr("agentwatch.sandbox.cgroups.delegate_controllers", lambda *a: None)
    lim = Limits("r1", str(v2), cpu=0.5, weight=300)
    lim.setup()
    group = cpu / "agentwatch" / "r1"
    assert lim.applied == {"cpu": "v1", "weight": "v1"} and lim.dirs == [str(group)]
    assert (group / "cpu.shares").read_text() == "3072"
    assert (group / "cpu.cfs_quota_us").read_text() == "50000"
