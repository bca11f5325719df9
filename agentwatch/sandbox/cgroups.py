"""cgroup v2 leaves for runs.

Each run gets <cgroup2 mount>/agentwatch/<run_id>. The mount is found from
/proc/mounts, so unified hosts (/sys/fs/cgroup) and hybrid ones
(/sys/fs/cgroup/unified, next to v1 controllers) both work. The leaf's inode
number is the id bpf_get_current_cgroup_id() returns for its members.
"""
import errno
import os
import signal
import time

from ..core.procfs import RUN_CGROUP_ROOT as ROOT_NAME
from ..core import procfs
from ..core.procfs import cgroup2_mount, run_of_cgroup
from ..core.errors import KernelFeatureError, PrivilegeError


def root_path():
    return os.path.join(cgroup2_mount(), ROOT_NAME)


def delegate_controllers(path, wanted):
    """Enable the wanted cgroup v2 controllers (e.g. pids, memory, cpu) for
    path: in cgroup.subtree_control of each ancestor, from the mount down.
    A host whose init does not delegate them (no systemd, e.g. a minimal VM)
    leaves every cgroup without limits otherwise. Controllers the hierarchy
    does not have (bound to cgroup v1 on hybrid hosts) and writes the kernel
    refuses are skipped: the caller falls back or reports them missing."""
    mount = cgroup2_mount()
    rel = os.path.relpath(os.path.dirname(path), mount)
    parts = [] if rel == "." else rel.split(os.sep)
    d = mount
    for part in [None] + parts:
        if part is not None:
            d = os.path.join(d, part)
        try:
            with open(os.path.join(d, "cgroup.controllers")) as f:
                have = set(f.read().split())
            with open(os.path.join(d, "cgroup.subtree_control")) as f:
                on = set(f.read().split())
        except OSError:
            return
        for ctl in sorted(set(wanted) & have - on):
            try:
                with open(os.path.join(d, "cgroup.subtree_control"), "w") as f:
                    f.write(f"+{ctl}")
            except OSError:
                pass


class RunCgroup:
    def __init__(self, path):
        self.path = path
        self.id = os.stat(path).st_ino

    @classmethod
    def create(cls, run_id):
        root = root_path()
        try:
            os.makedirs(root, exist_ok=True)
            os.mkdir(os.path.join(root, run_id))
        except PermissionError:
            raise PrivilegeError(f"cannot create a cgroup under {root}: run agentwatch as root") from None
        return cls(os.path.join(root, run_id))

    def _file(self, name):
        return os.path.join(self.path, name)

    def add(self, pid):
        with open(self._file("cgroup.procs"), "w") as f:
            f.write(str(pid))

    def pids(self):
        try:
            with open(self._file("cgroup.procs")) as f:
                return [int(x) for x in f.read().split()]
        except FileNotFoundError:
            return []

    def signal_all(self, sig):
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill(self):
        """SIGKILL every process in the cgroup, forks in flight included."""
        try:
            with open(self._file("cgroup.kill"), "w") as f:
                f.write("1")
            return
        except FileNotFoundError:
            if not os.path.isdir(self.path):
                return
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOENT):
                raise
        # kernels before 5.14: freeze, kill what is there, thaw
        freeze = self._file("cgroup.freeze")
        have_freeze = os.path.exists(freeze)
        if have_freeze:
            with open(freeze, "w") as f:
                f.write("1")
        for _ in range(100):
            if not self.pids():
                break
            self.signal_all(signal.SIGKILL)
            time.sleep(0.01)
        if have_freeze:
            with open(freeze, "w") as f:
                f.write("0")

    def remove(self, timeout=5.0):
        """Kill what is left and remove the directory. True when it is gone."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(self.path)
                return True
            except FileNotFoundError:
                return True
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    return False
            self.kill()
            time.sleep(0.02)


def run_of_pid(pid):
    """The run id whose cgroup holds process pid (any depth below it), or
    None: not an agent's process, or gone."""
    return run_of_cgroup(procfs.cgroup(pid))


def leftover_cgroups():
    """Run cgroups that exist under the agentwatch root (names are run ids)."""
    try:
        root = root_path()
        return sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))
    except (FileNotFoundError, KernelFeatureError):
        return []
