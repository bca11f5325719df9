"""What the harness's SQLite stores share (the broker's, broker_store.py;
agents' memory, memory.py): one file, private (0600 in a 0700 directory),
in WAL mode; a schema version in PRAGMA user_version; one write connection
behind a lock and one for reads beside it; group commit.

- Writes: every write method runs in _tx(), committed before it returns.
  Inside a transaction already open (the writer's batch, an outer _tx) it
  is a savepoint of that, so that one write's error undoes only it.
- Group commit: submit(fn, ...) runs fn (a write method of the store) in
  a writer thread of the store's, with as many others as are waiting, in
  one transaction and one commit (one fsync under synchronous=FULL); each
  caller's future is resolved only after that commit.
- Reads: on a connection of their own, so that WAL lets them run beside
  the writer's open batch and its fsync instead of waiting behind them; a
  read inside a write transaction uses the writer's connection (it sees
  what is not committed yet).
- synchronous: FULL fsyncs the WAL at every commit (an acknowledged write
  survives a power loss); NORMAL only at checkpoints (it survives a crash
  or kill -9 of the daemon, not of the machine).
"""
import concurrent.futures
import os
import queue
import sqlite3
import threading
from contextlib import contextmanager

SYNC_MODES = ("FULL", "NORMAL")


class SqliteStore:
    """A subclass sets WHAT (its name in messages), SCHEMA and SCHEMA_VERSION."""

    WHAT = "store"
    SCHEMA = ""
    SCHEMA_VERSION = 1

    def __init__(self, path, synchronous="FULL"):
        if synchronous not in SYNC_MODES:
            raise ValueError(f"synchronous: one of {', '.join(SYNC_MODES)}, not {synchronous!r}")
        self.path = path
        self.synchronous = synchronous
        if path != ":memory:":
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, mode=0o700, exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))   # private before sqlite opens it
        self._lock = threading.RLock()
        self._savepoints = 0
        self._jobs = queue.SimpleQueue()
        self._writer = None
        self._local = threading.local()     # .writing: this thread is inside a write transaction
        self._db = self._connect()
        with self._lock:
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal" and path != ":memory:":
                raise RuntimeError(f"{path}: SQLite refused WAL mode (journal_mode is {mode})")
            self._db.execute(f"PRAGMA synchronous = {synchronous}")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > self.SCHEMA_VERSION:
                raise RuntimeError(f"{path}: {self.WHAT} schema {version} is newer than this "
                                   f"agentwatch's ({self.SCHEMA_VERSION}); upgrade agentwatch")
            if version < self.SCHEMA_VERSION:
                self._create_schema()
        if path == ":memory:":
            self._rdb, self._rlock = self._db, self._lock
        else:
            self._rdb, self._rlock = self._connect(), threading.Lock()

    def _connect(self):
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout = 5000")
        return db

    def _create_schema(self):
        self._db.executescript("BEGIN IMMEDIATE;" + self.SCHEMA +
                               f"PRAGMA user_version = {self.SCHEMA_VERSION}; COMMIT;")

    def close(self):
        if self._writer is not None:
            self._jobs.put(None)
            self._writer.join(10)
            self._writer = None
        with self._lock:
            self._db.close()
        if self._rdb is not self._db:
            with self._rlock:
                self._rdb.close()

    # -- transactions ---------------------------------------------------------------------
    @contextmanager
    def _writing(self):
        depth = getattr(self._local, "writing", 0)
        self._local.writing = depth + 1
        try:
            yield
        finally:
            self._local.writing = depth

    @contextmanager
    def _tx(self):
        """One write transaction under the lock: committed, or rolled back
        on any error. Inside a transaction already open, a savepoint of it."""
        with self._lock, self._writing():
            if self._db.in_transaction:
                self._savepoints += 1
                name = f"w{self._savepoints}"
                self._db.execute(f"SAVEPOINT {name}")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute(f"ROLLBACK TO {name}")
                    self._db.execute(f"RELEASE {name}")
                    raise
                self._db.execute(f"RELEASE {name}")
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _reading(self):
        """The connection a read uses: a writer's own (it sees what it has
        not committed yet), else the readers' (what is committed)."""
        if getattr(self._local, "writing", 0):
            with self._lock:
                yield self._db
        else:
            with self._rlock:
                yield self._rdb

    def _all(self, sql, args=()):
        with self._reading() as db:
            return db.execute(sql, args).fetchall()

    def _one(self, sql, args=()):
        with self._reading() as db:
            return db.execute(sql, args).fetchone()

    # -- group commit ---------------------------------------------------------------------
    def submit(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) (a write method of this store) in the writer's
        next batch: a concurrent.futures.Future of its result, resolved
        once the batch has committed."""
        if self._writer is None:
            with self._lock:
                if self._writer is None:
                    self._writer = threading.Thread(target=self._write_loop, name="aw-" + self.WHAT.replace(" ", "-"),
                                                    daemon=True)
                    self._writer.start()
        fut = concurrent.futures.Future()
        self._jobs.put((fut, fn, args, kwargs))
        return fut

    def _write_loop(self, most=512):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            jobs = [job]
            while len(jobs) < most:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._jobs.put(None)          # stop after this batch
                    break
                jobs.append(job)
            done = []
            with self._lock, self._writing():
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    for fut, fn, args, kwargs in jobs:
                        try:
                            done.append((fut, True, fn(*args, **kwargs)))
                        except BaseException as e:     # its savepoint is undone; the others stand
                            done.append((fut, False, e))
                    self._db.execute("COMMIT")
                except BaseException as e:             # the commit failed: nobody's write stands
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                    done = [(fut, False, e) for fut, *_ in jobs]
            for fut, ok, value in done:
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)

    def file_bytes(self):
        """The database's size on disk: the file and its WAL."""
        total = 0
        if self.path != ":memory:":
            for suffix in ("", "-wal"):
                try:
                    total += os.path.getsize(self.path + suffix)
                except OSError:
                    pass
        return total
