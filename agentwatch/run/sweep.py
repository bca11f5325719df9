"""The start-up sweep (and `agentwatch gc`): what a crashed agentwatch left."""
import os

from ..core import state
from ..sandbox.cgroups import RunCgroup, leftover_cgroups, root_path


def gc(log=None):
    """Remove what a crashed agentwatch left: kill and remove run cgroups whose
    owner is gone, and mark their records 'crashed'. Returns the run ids swept."""
    swept = []
    records = {r["run_id"]: r for r in state.list_runs()}
    from ..sandbox.limits import Limits, leftover_v1
    for d in leftover_v1():          # v1 limit groups of runs whose owner is gone
        if not state.run_owner_alive(os.path.basename(d)):
            lim = Limits(os.path.basename(d), None)
            lim.dirs = [d]
            lim.remove()
    for run_id in leftover_cgroups():
        if state.run_owner_alive(run_id):
            continue                 # a live run, maybe of another agentwatch / state dir
        cg = RunCgroup(os.path.join(root_path(), run_id))
        if cg.remove():
            state.unregister_owner(run_id)
            swept.append(run_id)
            if log:
                log(f"removed stale cgroup of run {run_id}")
    for run_id, rec in records.items():
        if rec.get("status") == "crashed":
            raw = state.read_json(state.run_path(run_id, "run.json")) or rec
            if raw.get("status") == "running":
                raw["status"] = "crashed"
                state.write_json_atomic(state.run_path(run_id, "run.json"), raw)
                if run_id not in swept:
                    swept.append(run_id)
    return swept
