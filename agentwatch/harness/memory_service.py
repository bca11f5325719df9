"""Keeping agents' memory honest: a record derived from files goes stale
the moment one of them changes, with the evidence of who changed it
(harness/memory.py is the store; the broker's socket is how agents reach
it, harness/broker_rpc.py's memory.* methods).

Two witnesses, whichever speaks first:
- a monitored agent's write, rename, truncate or unlink is one of its
  run's own `file` events, on the run's event bus (engine/bus.py): the
  evidence names the run, the pid and the program;
- any process's change is seen by the kernel's file watcher
  (sensors/fswatch.py: fanotify, which names the pid, whose cgroup may be a
  run's; inotify where fanotify is unavailable, which names nobody).

A record's first evidence is kept; only an explicit verify() makes it
valid again (the store re-hashes its files). The bus callback runs on the
sensors' reader thread under the monitor's lock: it only checks an
in-memory set and queues; a worker thread of ours writes the store.
"""
import queue
import threading
import time

from ..core import procfs

# file event ops and accesses that change a file's content or name
_CHANGING_OPS = {"unlink", "rename", "truncate"}
_WRITE_ACCESS = {"write", "truncate", "create"}


class MemoryKeeper:
    """The watchers of one MemoryStore's provenance files."""

    def __init__(self, store, log=None, watcher_backend="auto"):
        self.store = store
        self.log = log or (lambda msg: None)
        self._paths = set()              # watched provenance paths (real paths)
        self._lock = threading.Lock()
        self._queue = queue.SimpleQueue()
        self.counters = {"staled": 0, "by_agent": 0, "by_outsider": 0, "watch_errors": 0,
                         "overflows": 0}
        self.watcher = None
        self._backend = watcher_backend
        self._worker = None

    def start(self):
        from ..sensors.fswatch import FileWatcher
        self.watcher = FileWatcher(self._on_change, backend=self._backend).start()
        self._worker = threading.Thread(target=self._work, name="aw-memory-keeper", daemon=True)
        self._worker.start()
        self.track(self.store.watched_paths())
        return self

    @property
    def backend(self):
        return self.watcher.backend if self.watcher else None

    def track(self, paths):
        """Watch these provenance files (a record was put)."""
        for p in paths:
            with self._lock:
                if p in self._paths:
                    continue
                self._paths.add(p)
            try:
                self.watcher.watch(p)
            except OSError as e:        # not there (yet): a later track() tries again; verify() tells
                with self._lock:
                    self._paths.discard(p)
                self.counters["watch_errors"] += 1
                self.log(f"memory: cannot watch {p}: {e}")

    def close(self):
        if self.watcher is not None:
            self.watcher.close()
        self._queue.put(None)
        if self._worker is not None:
            self._worker.join(10)

    # -- witnesses -----------------------------------------------------------------------
    def subscribe_run(self, run_id, agent, subscribe):
        """Follow a run's own file events (its bus: subscribe(maxsize, kinds, callback))."""
        def on_event(ev):
            hit = self._changed_path(ev)
            if hit is not None:
                path, op = hit
                self._queue.put((path, {"by": "agent", "run": run_id, "agent": agent, "pid": ev.pid,
                                        "exe": procfs.exe(ev.pid) or ev.comm, "comm": ev.comm, "op": op,
                                        "path": path, "seen_by": "run events", "ts": ev.ts}))
        return subscribe(maxsize=1, kinds={"file"}, callback=on_event)

    def _changed_path(self, ev):
        op = ev.op if ev.op in _CHANGING_OPS else None
        if op is None and ev.op == "open" and _WRITE_ACCESS & set(ev.access or ()):
            op = "truncate" if "truncate" in (ev.access or ()) else "write"
        if op is None:
            return None
        for p in (getattr(ev, "abspath", None), getattr(ev, "path2", None)):
            if p and p in self._paths:
                return p, op
        return None

    def _on_change(self, change):
        """The file watcher's report (its thread)."""
        if change.op == "overflow":          # events were lost: every record must be re-checked
            self.counters["overflows"] += 1
            self._queue.put(("*", None))
            return
        ev = {"by": "outsider", "pid": change.pid, "exe": change.exe, "op": change.op, "path": change.path,
              "seen_by": self.backend, "ts": change.ts}
        if change.pid:
            run = procfs.run_of_cgroup(procfs.cgroup(change.pid))
            if run is not None:
                ev.update(by="agent", run=run)
        self._queue.put((change.path, ev))

    def _work(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            path, evidence = item
            try:
                if path == "*":
                    self._recheck_all()
                    continue
                ids = self.store.mark_stale(path, evidence, time.time())
            except Exception as e:          # a store error must not end the keeper
                self.log(f"memory: marking records of {path} stale failed: {e}")
                continue
            if ids:
                self.counters["staled"] += len(ids)
                self.counters["by_agent" if evidence.get("by") == "agent" else "by_outsider"] += len(ids)

    def _recheck_all(self):
        """After lost events: re-hash every valid record's files (verify()
        leaves a mismatch stale, with the check recorded)."""
        for rec in self.store.records(validity="valid", limit=1 << 30):
            self.store.verify(rec.id, time.time())

    def stats(self):
        return dict(self.counters, watched=len(self._paths), backend=self.backend)
