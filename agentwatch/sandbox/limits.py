"""Resource limits for a run: cgroup v2 controllers where the run's cgroup
has them, else the cgroup v1 hierarchies of hybrid hosts (the CI host has
cpu, memory and pids only as v1), else nothing (and the plan says so).

Sizes are parsed by agentwatch.core.units, the parser the policy validator
uses. wall_time is enforced by the runner (it stops the agent tree).

weight (a run option, not a policy limit: `--weight`, a manifest's agent
weight) is the cpu controller's share: cpu.weight on v2, cpu.shares on v1,
where the kernel's defaults (100 and 1024) are the same share."""
import os

from ..core.units import parse_size
from ..core.errors import LaunchError

CONTROLLER = {"weight": "cpu"}    # a limit -> the controller that holds it (default: its own name)
V1_SHARES = (2, 262144)           # cpu.shares the kernel takes (MIN_SHARES, MAX_SHARES)


def v1_shares(weight):
    """cpu.shares for a cpu.weight: the same share of the v1 default 1024
    as weight is of the v2 default 100, within the kernel's range."""
    lo, hi = V1_SHARES
    return max(lo, min(hi, int(weight) * 1024 // 100))


def v1_mounts(mounts="/proc/mounts"):
    """controller -> mount point of its cgroup v1 hierarchy."""
    out = {}
    with open(mounts) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and parts[2] == "cgroup":
                for opt in parts[3].split(","):
                    if opt in ("cpu", "memory", "pids"):
                        out[opt] = parts[1]
    return out


def _write(ctl, val, directory, files):
    """Write a limit's files; a value the kernel refuses is a LaunchError
    naming it (the caller removes what was made)."""
    for name, content in files:
        path = os.path.join(directory, name)
        try:
            with open(path, "w") as f:
                f.write(content)
        except OSError as e:
            raise LaunchError(f"agent not started: the kernel refused the {ctl} limit {val!r} "
                              f"(writing {content!r} to {path}: {e.strerror})") from None


class Limits:
    """Applies {pids, memory, cpu, weight} to one run; remove() undoes it."""

    def __init__(self, run_id, v2_path, pids=None, memory=None, cpu=None, weight=None):
        self.run_id = run_id
        self.v2_path = v2_path
        self.want = {k: v for k, v in (("pids", pids), ("memory", memory), ("cpu", cpu),
                                       ("weight", weight)) if v}
        self.dirs = []          # v1 cgroup dirs we created
        self.applied = {}       # controller -> how ("v2" | "v1")
        self.missing = []

    def _v2_has(self, ctl):
        try:
            with open(os.path.join(self.v2_path, "cgroup.controllers")) as f:
                return ctl in f.read().split()
        except OSError:
            return False

    def setup(self):
        """Parent side, before the agent exists: create/limit the cgroups."""
        from .cgroups import delegate_controllers
        controllers = {CONTROLLER.get(k, k) for k in self.want}
        if self.v2_path and not all(self._v2_has(c) for c in controllers):
            delegate_controllers(self.v2_path, controllers)
        v1 = v1_mounts()
        for name, val in self.want.items():
            ctl = CONTROLLER.get(name, name)
            files = self._files(name, val)
            if self._v2_has(ctl):
                _write(name, val, self.v2_path, files["v2"])
                self.applied[name] = "v2"
            elif ctl in v1:
                d = os.path.join(v1[ctl], "agentwatch", self.run_id)
                os.makedirs(d, exist_ok=True)
                if d not in self.dirs:        # cpu and weight share the cpu hierarchy's group
                    self.dirs.append(d)
                _write(name, val, d, files["v1"])
                self.applied[name] = "v1"
            else:
                self.missing.append(name)

    @staticmethod
    def _files(ctl, val):
        if ctl == "pids":
            n = str(int(val))
            return {"v2": [("pids.max", n)], "v1": [("pids.max", n)]}
        if ctl == "memory":
            b = str(parse_size(val))
            return {"v2": [("memory.max", b), ("memory.swap.max", "0")],
                    "v1": [("memory.limit_in_bytes", b)]}
        if ctl == "weight":
            return {"v2": [("cpu.weight", str(int(val)))], "v1": [("cpu.shares", str(v1_shares(val)))]}
        period = 100000
        quota = str(int(float(val) * period))
        return {"v2": [("cpu.max", f"{quota} {period}")],
                "v1": [("cpu.cfs_period_us", str(period)), ("cpu.cfs_quota_us", quota)]}

    def add(self, pid):
        """Put the (not yet exec'ed) agent into the v1 cgroups too."""
        for d in self.dirs:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(pid))

    def remove(self):
        for d in self.dirs:
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    for pid in f.read().split():
                        try:
                            os.kill(int(pid), 9)
                        except ProcessLookupError:
                            pass
                os.rmdir(d)
            except OSError:
                pass


def leftover_v1():
    out = []
    for ctl, mnt in v1_mounts().items():
        root = os.path.join(mnt, "agentwatch")
        if os.path.isdir(root):
            out += [os.path.join(root, n) for n in os.listdir(root)
                    if os.path.isdir(os.path.join(root, n))]
    return out
