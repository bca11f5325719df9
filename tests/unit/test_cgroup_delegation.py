"""delegate_controllers: enabling cgroup v2 controllers down to a run's
cgroup on a host whose init did not (a fake hierarchy of plain files)."""
from agentwatch.sandbox import cgroups


def _cg(d, controllers, on=""):
    d.mkdir(parents=True, exist_ok=True)
    (d / "cgroup.controllers").write_text(controllers + "\n")
    (d / "cgroup.subtree_control").write_text(on + "\n")
    return d


def test_enables_each_wanted_controller_from_the_mount_down(tmp_path, monkeypatch):
    monkeypatch.setattr(cgroups, "cgroup2_mount", lambda: str(tmp_path))
    _cg(tmp_path, "cpuset cpu io memory pids")          # the root delegates none
    _cg(tmp_path / "agentwatch", "cpu memory pids")
    run = _cg(tmp_path / "agentwatch" / "run1", "")
    real_open = open

    def appending(path, mode="r", *a, **kw):   # the kernel adds; a plain file would be replaced
        return real_open(path, "a" if "w" in mode else mode, *a, **kw)
    monkeypatch.setattr("builtins.open", appending)
    cgroups.delegate_controllers(str(run), {"pids", "memory", "cpu"})
    monkeypatch.undo()
    assert (tmp_path / "cgroup.subtree_control").read_text().strip() == "+cpu+memory+pids"
    assert (tmp_path / "agentwatch" / "cgroup.subtree_control").read_text().strip() == \
        "+cpu+memory+pids"
    assert (run / "cgroup.subtree_control").read_text().split() == []   # the leaf: never


def test_skips_what_the_hierarchy_lacks_or_already_delegates(tmp_path, monkeypatch):
    monkeypatch.setattr(cgroups, "cgroup2_mount", lambda: str(tmp_path))
    _cg(tmp_path, "memory pids", on="memory")     # cpu is bound to cgroup v1 (hybrid)
    _cg(tmp_path / "agentwatch", "memory pids", on="memory pids")
    run = _cg(tmp_path / "agentwatch" / "run1", "memory pids")
    cgroups.delegate_controllers(str(run), {"pids", "memory", "cpu"})
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+pids"
    assert (tmp_path / "agentwatch" / "cgroup.subtree_control").read_text().split() == ["memory", "pids"]
