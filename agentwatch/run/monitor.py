"""The loaded sensors of one agentwatch process, and the correlator that
attributes their records to runs: a run loads its own Monitor, or several
runs share one (the daemon, tests, the warm bench runner). Its Keeper
starts first, so that the runs' processes die with us even by SIGKILL
(agentwatch/keeper.py)."""
import os
import threading

from ..engine import Correlator
from ..keeper import Keeper
from ..policy.model import SENSOR_GROUPS


class Monitor:
    """Loaded sensors plus the correlator that attributes their records. A
    run embeds one; several runs can share one, one after the other (tests)
    or at the same time, each in its own thread (agentwatch/daemon/server.py).

    Shared state (the rings, the correlator, every run's judge) is touched
    only under `lock`; whichever run holds it reads the rings for all. Child
    exit statuses are reaped here, for every run, and kept in `exits` until
    the run whose agent it was takes its own."""

    def __init__(self, groups=SENSOR_GROUPS, ringbuf_pages=4096, denied=(), map_exec=False):
        """denied: syscalls a run's seccomp filter refuses with EPERM; their
        exit tracepoints report each refusal (see sensors/syscalls.specs_for).
        map_exec: attach the mmap(PROT_EXEC) probes (bpf/mapexec.bpf.c)."""
        # first: kills the runs' processes if we die by a signal (agentwatch/keeper.py)
        self.keeper = Keeper()
        try:
            from ..sensors import Sensors   # bcc is imported only here, after input checks
            self.sensors = Sensors(groups, ringbuf_pages, denied, map_exec)
        except BaseException:
            self.keeper.close()
            raise
        self.correlator = Correlator(self.sensors.nr_to_spec)
        self.lock = threading.RLock()
        self.children = set()            # the runs' agent pids
        self.exits = {}                  # agent pid -> wait status, until its run takes it
        self.idle_guards = []            # enforcement objects (LsmGuard, Egress) runs gave back
        self._egress_guard = None        # guards.guard.EgressGuard, started by the first run needing it
        self.services = []               # run/services.py RunService: the gateway, from the layer above
        self.closed = False

    def reap(self):
        """Reap every exited child (agents, and orphans re-parented to us as
        subreaper) and keep each status for its run. Call with the lock held."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.children:     # an orphan's status is nobody's
                self.exits[pid] = status

    def take_exit(self, pid):
        """The wait status of agent pid once it exited, else None."""
        with self.lock:
            self.reap()
            status = self.exits.pop(pid, None)
            if status is not None:
                self.children.discard(pid)
            return status

    def take_guard(self, cls, *policy):
        """An enforcement object of class cls for this policy: a released one
        when a run gave one back (its programs are compiled and loaded
        already: about 1 s saved per layer here, 10 s and more under QEMU
        TCG), else None."""
        with self.lock:
            guard = next((g for g in self.idle_guards if type(g) is cls), None)
            if guard is None:
                return None
            self.idle_guards.remove(guard)
        try:
            return guard.use(*policy)
        except Exception:
            self.give_back(guard)
            raise

    def give_back(self, guard):
        """Release a run's enforcement object for the next run, once the
        run's agent is dead. One that cannot be released cleanly is closed
        instead: it is never reused with anything of the old run left."""
        try:
            guard.release()
        except Exception:
            guard.close()
            return
        with self.lock:
            if not self.closed:
                self.idle_guards.append(guard)
                return
        guard.close()              # the monitor closed while the run ended

    def egress_guard(self):
        """The egress guard proxy and DNS responder every run of this
        monitor shares (each run has listeners of its own), started on first use."""
        with self.lock:
            if self._egress_guard is None:
                from ..guards.guard import EgressGuard
                self._egress_guard = EgressGuard().start()
            return self._egress_guard

    def add_service(self, service):
        """A service (run/services.py) every later run of this monitor uses."""
        with self.lock:
            self.services.append(service)

    def service_ports(self):
        from .services import service_ports
        return service_ports(self.services)

    def open(self):
        self.sensors.open(self.correlator.handle)
        return self

    def close(self):
        with self.lock:
            self.closed = True
            guards, self.idle_guards = self.idle_guards, []
        for g in guards:
            g.close()
        if self._egress_guard is not None:
            self._egress_guard.close()
        self.sensors.close()
        self.keeper.close()          # only now: it guards the runs until the very end

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()
