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
