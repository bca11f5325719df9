"""Run cgroups are owned machine-wide, whatever state dir a run uses, so a
sweep never touches another agentwatch's live run."""
import os
import subprocess
import sys

from agentwatch.core import state


def test_owner_registry(tmp_path, monkeypatch):
    monkeypatch.setattr(state, "OWNERS_DIR", str(tmp_path / "owners"))
    assert not state.run_owner_alive("r1")
    state.register_owner("r1")
    assert state.run_owner_alive("r1")                  # this process owns it
    state.unregister_owner("r1")
    assert not state.run_owner_alive("r1")


def test_dead_owner_is_not_alive(tmp_path, monkeypatch):
    monkeypatch.setattr(state, "OWNERS_DIR", str(tmp_path / "owners"))
    code = (f"import sys; sys.path.insert(0, {os.getcwd()!r}); from agentwatch.core import state; "
            f"state.OWNERS_DIR = {str(tmp_path / 'owners')!r}; state.register_owner('r2')")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert os.path.exists(tmp_path / "owners" / "r2.json")
    assert not state.run_owner_alive("r2")              # its owner has exited
