"""agentwatch.sensors.fswatch on the real kernel, for both backends: changes
by other processes (shell commands) are reported within a second, with the
writer's pid under fanotify; a file replaced by a rename is followed; close()
leaves no fd behind."""
import os
import queue
import subprocess
import threading
import time

import pytest

from agentwatch.sensors.fswatch import Change, FileWatcher

pytestmark = pytest.mark.kernel

BACKENDS = ["fanotify", "inotify"]


class Recorder:
    """Collects the Changes a watcher reports."""

    def __init__(self):
        self.q = queue.Queue()
        self.all = []

    def __call__(self, change):
        self.all.append(change)
        self.q.put(change)

    def wait(self, pred, timeout=1.0):
        """The first change (read from now on) with pred(change) true, within timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching change within {timeout}s; saw {self.all}")
            try:
                c = self.q.get(timeout=left)
            except queue.Empty:
                continue
            if pred(c):
                return c

    def quiet(self, pred, for_s=0.3):
        """No change with pred(change) true for for_s seconds."""
        deadline = time.monotonic() + for_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                c = self.q.get(timeout=left)
            except queue.Empty:
                return
            assert not pred(c), f"unexpected {c}"

    def drain(self, settle=0.2):
        """Drop what was reported so far, and what still arrives until no change
        came for settle seconds: an earlier command's late event (a create's
        write, read after the create) must not be taken for the next one's."""
        while True:
            try:
                self.q.get(timeout=settle)
            except queue.Empty:
                return


@pytest.fixture(params=BACKENDS)
def watcher(request):
    rec = Recorder()
    w = FileWatcher(rec, backend=request.param).start()
    assert w.backend == request.param
    w.rec = rec
    yield w
    w.close()


@pytest.fixture
def target(tmp_path):
    f = tmp_path / "source.txt"
    f.write_text("hello world\n")
    return str(f)


def sh(cmd):
    """Run cmd in a shell; returns its pid: the writer, for a builtin (echo)
    or a command it execs (sh -c 'exec mv ...')."""
    p = subprocess.Popen(["sh", "-c", cmd])
    assert p.wait(timeout=10) == 0
    return p.pid


def on(path, op):
    return lambda c: c.path == path and c.op == op


def check_pid(w, change, pid):
    if w.backend == "fanotify":
        assert change.pid == pid
    else:
        assert change.pid is None and change.exe is None


def test_write_by_another_process(watcher, target):
    watcher.watch(target)
    assert watcher.watched() == {target}
    t0 = time.time()
    pid = sh(f"echo x >> {target}")
    c = watcher.rec.wait(on(target, "write"))
    assert isinstance(c, Change) and c.ts >= t0 - 0.01
    check_pid(watcher, c, pid)


def test_exe_of_a_live_writer(watcher, target):
    """exe is read at once: a writer still alive is named."""
    watcher.watch(target)
    p = subprocess.Popen(["sh", "-c", f"echo x >> {target}; sleep 2"])
    try:
        c = watcher.rec.wait(on(target, "write"))
        check_pid(watcher, c, p.pid)
        if watcher.backend == "fanotify":
            assert c.exe and os.path.basename(c.exe) in ("sh", "dash", "bash", "busybox")
    finally:
        p.kill()
        p.wait()


def test_own_writes_are_reported(watcher, target):
    watcher.watch(target)
    with open(target, "a") as f:
        f.write("more\n")
    c = watcher.rec.wait(on(target, "write"))
    check_pid(watcher, c, os.getpid())


def test_truncate(watcher, target):
    watcher.watch(target)
    pid = sh(f"exec truncate -s 0 {target}")
    c = watcher.rec.wait(lambda c: c.path == target)
    assert c.op == "truncate"
    check_pid(watcher, c, pid)


def test_unlink(watcher, target):
    watcher.watch(target)
    pid = sh(f"exec rm {target}")
    c = watcher.rec.wait(on(target, "unlink"))
    check_pid(watcher, c, pid)


def test_rename_away(watcher, target):
    watcher.watch(target)
    pid = sh(f"exec mv {target} {target}.2")
    c = watcher.rec.wait(on(target, "rename"))
    check_pid(watcher, c, pid)
    # the inode that moved away is no longer the watched file
    watcher.rec.drain()
    sh(f"echo x >> {target}.2")
    watcher.rec.quiet(lambda c: c.path == target)
    # and a new file at the path is followed
    sh(f"echo y > {target}")
    watcher.rec.wait(on(target, "create"))
    watcher.rec.drain()
    pid = sh(f"echo z >> {target}")
    check_pid(watcher, watcher.rec.wait(on(target, "write")), pid)


def test_rename_onto_then_write(watcher, target, tmp_path):
    watcher.watch(target)
    tmp = tmp_path / "tmp"
    pid = sh(f"echo y > {tmp}; exec mv {tmp} {target}")
    c = watcher.rec.wait(on(target, "rename"))
    check_pid(watcher, c, pid)
    watcher.rec.drain()
    pid = sh(f"echo again >> {target}")
    c = watcher.rec.wait(on(target, "write"))
    check_pid(watcher, c, pid)
    # twice: the second replacement is followed too
    sh(f"echo w > {tmp}; mv {tmp} {target}")
    watcher.rec.wait(on(target, "rename"))
    watcher.rec.drain()
    sh(f"echo again >> {target}")
    watcher.rec.wait(on(target, "write"))


def test_editor_style_save(watcher, target, tmp_path):
    """Write a temp file in the same directory, rename it over: one rename,
    no report for the temp file's own writes."""
    watcher.watch(target)
    sh(f"printf 'new\\n' > {target}.swp && mv {target}.swp {target}")
    watcher.rec.wait(on(target, "rename"))
    assert all(c.path == target for c in watcher.rec.all)


def test_other_files_in_the_directory_are_not_reported(watcher, target, tmp_path):
    watcher.watch(target)
    sh(f"echo x >> {tmp_path}/other; mv {tmp_path}/other {tmp_path}/other2; rm {tmp_path}/other2")
    watcher.rec.quiet(lambda c: True)


def test_unwatch_stops_reports(watcher, target):
    watcher.watch(target)
    watcher.watch(target)              # idempotent
    sh(f"echo x >> {target}")
    watcher.rec.wait(on(target, "write"))
    watcher.unwatch(target)
    assert watcher.watched() == set()
    watcher.rec.drain()
    sh(f"echo x >> {target}; truncate -s 0 {target}; rm {target}")
    watcher.rec.quiet(lambda c: True)


def test_watch_missing_file(watcher, tmp_path):
    with pytest.raises(FileNotFoundError):
        watcher.watch(str(tmp_path / "nope"))
    with pytest.raises(IsADirectoryError):
        watcher.watch(str(tmp_path))
    assert watcher.watched() == set()


def test_many_files_in_one_directory(watcher, tmp_path):
    paths = []
    for i in range(200):
        p = tmp_path / f"f{i:03d}"
        p.write_text("x\n")
        paths.append(str(p))
        watcher.watch(str(p))
    assert watcher.watched() == set(paths)
    sh(" ".join(f"echo y >> {p};" for p in paths))
    want = set(paths)
    deadline = time.monotonic() + 2
    while want and time.monotonic() < deadline:
        try:
            c = watcher.rec.q.get(timeout=0.1)
        except queue.Empty:
            continue
        if c.op == "write":
            want.discard(c.path)
    assert not want, f"{len(want)} of 200 writes not reported"
    # a rename onto one of them is told apart from the others
    watcher.rec.drain()
    sh(f"echo n > {tmp_path}/new; mv {tmp_path}/new {paths[117]}")
    watcher.rec.wait(on(paths[117], "rename"))
    for p in paths[:100]:
        watcher.unwatch(p)
    watcher.rec.drain()
    mark = len(watcher.rec.all)
    sh(f"echo y >> {paths[5]}; echo y >> {paths[150]}")
    watcher.rec.wait(on(paths[150], "write"))
    assert paths[5] not in {c.path for c in watcher.rec.all[mark:]}


def fd_count():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_ends_the_thread_and_closes_every_fd(backend, target):
    before = fd_count()
    threads = set(threading.enumerate())
    rec = Recorder()
    w = FileWatcher(rec, backend=backend).start()
    w.watch(target)
    sh(f"echo x >> {target}")
    rec.wait(on(target, "write"))
    assert fd_count() > before
    w.close()
    w.close()                      # idempotent
    assert w._thread and not w._thread.is_alive()
    assert set(threading.enumerate()) <= threads
    assert fd_count() == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_from_the_callback(backend, target):
    before = fd_count()
    box = {}

    def cb(change):
        box["change"] = change
        w.close()
    w = FileWatcher(cb, backend=backend).start()
    w.watch(target)
    sh(f"echo x >> {target}")
    w._thread.join(timeout=2)
    assert not w._thread.is_alive() and box["change"].op == "write"
    assert fd_count() == before


def test_a_raising_callback_is_counted(target):
    def cb(change):
        raise RuntimeError("caller bug")
    w = FileWatcher(cb).start()
    try:
        w.watch(target)
        sh(f"echo x >> {target}; echo x >> {target}")
        deadline = time.monotonic() + 1
        while w.counters["errors"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w.counters["errors"] >= 1 and w.counters["changes"] >= 1
        assert "caller bug" in w.last_error and w._thread.is_alive()
    finally:
        w.close()


def test_auto_is_fanotify_as_root():
    w = FileWatcher(lambda c: None).start()
    try:
        assert w.backend == "fanotify"
    finally:
        w.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_latency(backend, tmp_path):
    """Time from a write (this process) to its on_change: printed, not asserted."""
    f = tmp_path / "lat"
    f.write_text("")
    got = threading.Event()
    stamp = {}

    def cb(change):
        if change.op == "write":
            stamp["t"] = time.perf_counter()
            got.set()
    w = FileWatcher(cb, backend=backend).start()
    lat = []
    try:
        w.watch(str(f))
        fd = os.open(f, os.O_WRONLY | os.O_APPEND)
        try:
            for _ in range(200):
                got.clear()
                t0 = time.perf_counter()
                os.write(fd, b"x")
                assert got.wait(1.0), "a write was not reported within 1 s"
                lat.append(stamp["t"] - t0)
        finally:
            os.close(fd)
    finally:
        w.close()
    lat.sort()
    p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99)]
    print(f"\nfswatch {backend}: write -> on_change over {len(lat)} writes: "
          f"p50 {p50 * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us, max {lat[-1] * 1e6:.0f} us")


def queue_limit(backend):
    with open(f"/proc/sys/fs/{backend}/max_queued_events") as f:
        return int(f.read())


def test_overflow_is_reported_and_marks_are_renewed(watcher, target, tmp_path):
    """While on_change blocks, more directory events than the kernel queues
    (distinct names: the kernel cannot merge them), then a rename onto the
    watched path whose event is lost: on_change gets an "overflow", and the
    new inode at the path is watched all the same."""
    release = threading.Event()
    blocked = threading.Event()
    rec = watcher.rec

    def cb(change):
        if not blocked.is_set():
            blocked.set()
            release.wait(30)
        rec(change)
    watcher.on_change = cb
    watcher.watch(target)
    sh(f"echo x >> {target}")
    assert blocked.wait(1)
    for i in range(queue_limit(watcher.backend) + 1000):
        os.close(os.open(tmp_path / f"n{i}", os.O_CREAT | os.O_WRONLY, 0o600))
    (tmp_path / "tmp").write_text("replaced\n")
    os.rename(tmp_path / "tmp", target)
    release.set()
    rec.wait(lambda c: c.op == "overflow" and c.path is None, timeout=10)
    assert watcher.counters["overflows"] >= 1
    rec.drain()
    pid = sh(f"echo after >> {target}")
    check_pid(watcher, rec.wait(on(target, "write")), pid)
