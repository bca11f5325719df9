"""Watch a set of files and report, at once, when any process changes one.

``FileWatcher`` calls ``on_change(Change)`` on its own thread when a watched
file is written, truncated, renamed away, replaced by a rename onto its
path, unlinked or created again. It serves stores that must mark what they
derived from a file stale the moment the file changes.

Two kernel interfaces, through ctypes over libc (no dependency):

fanotify (root; the default where it works) names the process: every event
carries the writer's pid. The group is made with FAN_REPORT_FID |
FAN_REPORT_DFID_NAME, so events identify objects by file handle (no fd is
opened per event) and directory events carry the entry's name. Each watched
file gets an inode mark for FAN_MODIFY (writes and truncates both), and each
parent directory one for FAN_CREATE | FAN_DELETE | FAN_MOVED_FROM |
FAN_MOVED_TO. Events are matched back to watched paths by the object's
handle (name_to_handle_at of the path, taken when it was marked), and
directory events by the directory's handle and the entry name.

inotify (no pid) is the fallback: when fanotify cannot be set up, when
backend="inotify", or for a file that fanotify refuses to mark (a
filesystem without file handles, EXDEV, ...): those files are watched by
inotify alongside, and ``fallback`` lists them.

A rename onto a watched path or its re-creation puts a new inode there: the
file mark is moved to the new inode (re-added by path) BEFORE on_change is
called, so a caller that re-reads the file after being told misses no later
write. After an overflow of the kernel's queue the same is done for every
path, and on_change gets Change(None, "overflow", ...): re-verify everything.

Coalescing: the kernel already merges identical events still queued; here
identical (path, op, pid) read in the same batch are reported once. There is
deliberately no time window: a write that followed a caller's re-read within
the window would be hidden, and the store would keep a stale record.

Limits (both backends unless said):
- writes through a shared mmap() make no event (the kernel sends none);
  nor do changes made on another machine to a network filesystem;
- a path is watched as a name in its parent directory: renaming or
  replacing a directory above it, or retargeting a symlink on the way, is
  not seen (the file mark stays on the inode it named);
- pid is the writer's process (thread group) in our pid namespace: None
  when it has none there; exe is None when it exited before we read it;
- after a rename away, fanotify cannot remove the mark from the inode that
  moved (marks are removed by path): it stays until that inode is freed or
  the watcher closes, and its events are ignored;
- truncate is told from write by the size going down (see FileWatcher._op).
"""
import ctypes
import errno
import os
import select
import struct
import threading
import time
from dataclasses import dataclass

from ..core import procfs

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]

AT_FDCWD = -100
AT_SYMLINK_FOLLOW = 0x400
AT_HANDLE_FID = 0x200          # Linux 6.5: a handle for identification only
MAX_HANDLE_SZ = 128

# include/uapi/linux/fanotify.h
FAN_CLOEXEC, FAN_NONBLOCK, FAN_CLASS_NOTIF = 0x1, 0x2, 0x0
FAN_REPORT_FID, FAN_REPORT_DIR_FID, FAN_REPORT_NAME = 0x200, 0x400, 0x800
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME
FAN_MARK_ADD, FAN_MARK_REMOVE, FAN_MARK_ONLYDIR = 0x1, 0x2, 0x8
FAN_MODIFY, FAN_MOVED_FROM, FAN_MOVED_TO = 0x2, 0x40, 0x80
FAN_CREATE, FAN_DELETE, FAN_Q_OVERFLOW = 0x100, 0x200, 0x4000
FAN_EVENT_INFO_TYPE_FID, FAN_EVENT_INFO_TYPE_DFID_NAME = 1, 2
FAN_EVENT_INFO_TYPE_DFID = 3
FAN_FILE_MASK = FAN_MODIFY
FAN_DIR_MASK = FAN_CREATE | FAN_DELETE | FAN_MOVED_FROM | FAN_MOVED_TO
_FAN_META = struct.Struct("=IBBHQii")      # struct fanotify_event_metadata (24 bytes)
_FAN_INFO = struct.Struct("=BBH")          # struct fanotify_event_info_header

# include/uapi/linux/inotify.h
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
IN_MODIFY, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_Q_OVERFLOW, IN_IGNORED = 0x100, 0x200, 0x4000, 0x8000
IN_ONLYDIR = 0x1000000
IN_DIR_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ONLYDIR
_IN_EVENT = struct.Struct("=iIII")          # struct inotify_event, then the name

READ_SIZE = 256 * 1024
# errnos with which fanotify refuses a mark that inotify may still place
_FAN_REFUSALS = {errno.EXDEV, errno.ENODEV, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM,
                 errno.ENOSYS, errno.ESTALE}


@dataclass(frozen=True)
class Change:
    """What happened to a watched path. op: "write", "truncate", "rename"
    (moved away, or replaced by a rename onto it), "unlink", "create" (the
    path exists again, after an unlink or rename away) or "overflow" (path
    None: events were lost, re-verify everything)."""
    path: str | None
    op: str
    pid: int | None       # who did it (fanotify); None under inotify
    exe: str | None       # /proc/<pid>/exe read when the event was read; None if gone
    ts: float             # time.time() when read


def _oserror(what, path=None):
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}", path)


def file_handle(path):
    """(fsid, handle type, handle bytes) of what path names (symlinks
    followed), as fanotify reports it in an event's fid record."""
    buf = ctypes.create_string_buffer(8 + MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    p = os.fsencode(path)
    for flags in (AT_SYMLINK_FOLLOW, AT_SYMLINK_FOLLOW | AT_HANDLE_FID):
        struct.pack_into("=I", buf, 0, MAX_HANDLE_SZ)
        if _libc.name_to_handle_at(AT_FDCWD, p, buf, ctypes.byref(mount_id), flags) == 0:
            break
        if ctypes.get_errno() != errno.EOPNOTSUPP:
            raise _oserror("name_to_handle_at", path)
    else:
        raise _oserror("name_to_handle_at", path)
    nbytes, htype = struct.unpack_from("=Ii", buf, 0)
    # struct statfs (64-bit): seven longs, then f_fsid (two ints)
    sfs = ctypes.create_string_buffer(120)
    if _libc.statfs(p, sfs) != 0:
        raise _oserror("statfs", path)
    return sfs.raw[56:64], htype, buf.raw[8:8 + nbytes]


class _Backend:
    """The tables every backend keeps: which paths a kernel object (a mark's
    key: a handle or a watch descriptor) stands for, and which watched
    names each marked directory holds. Subclasses place and remove marks
    and decode the kernel's events into (kind, pid, file key, dir key,
    name); kind is "modify", "create", "delete", "moved_from", "moved_to"
    or "overflow". Called with the watcher's lock held."""
    name = ""

    def __init__(self):
        self.fd = -1
        self.by_key = {}       # file key -> {paths}
        self.key_of = {}       # path -> file key (None: no inode there now)
        self.dirs = {}         # dir path -> [dir key, {names}]
        self.by_entry = {}     # (dir key, name) -> path

    def add(self, path):
        d, name = os.path.split(path)
        key = self._mark_file(path)
        if d not in self.dirs:
            try:
                self.dirs[d] = [self._mark_dir(d), set()]
            except OSError:
                self._unmark_file(path, key)
                raise
        entry = self.dirs[d]
        entry[1].add(name)
        self.by_entry[(entry[0], name)] = path
        self._bind(path, key)

    def remove(self, path):
        self.forget(path, unmark=True)
        d, name = os.path.split(path)
        entry = self.dirs.get(d)
        if entry:
            entry[1].discard(name)
            self.by_entry.pop((entry[0], name), None)
            if not entry[1]:
                del self.dirs[d]
                self._unmark_dir(d, entry[0])

    def _bind(self, path, key):
        self.key_of[path] = key
        self.by_key.setdefault(key, set()).add(path)

    def forget(self, path, unmark=True):
        """The inode at path is gone from it (unlinked, renamed away):
        stop taking its events for path."""
        key = self.key_of.get(path)
        self.key_of[path] = None
        paths = self.by_key.get(key)
        if paths is not None:
            paths.discard(path)
            if not paths:
                del self.by_key[key]
                if unmark:
                    self._unmark_file(path, key)

    def refresh(self, path):
        """A new inode may be at path: mark it, then drop the old one's
        mark. The same inode (after an overflow, mostly) keeps its mark."""
        key = self._mark_file(path)
        if key != self.key_of.get(path):
            self.forget(path)
            self._bind(path, key)

    def paths(self, key):
        return self.by_key.get(key, ())

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Fanotify(_Backend):
    name = "fanotify"

    def __init__(self):
        super().__init__()
        flags = FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_FID | FAN_REPORT_DFID_NAME
        fd = _libc.fanotify_init(flags, os.O_RDONLY | os.O_CLOEXEC)
        if fd < 0:
            raise _oserror("fanotify_init")
        self.fd = fd

    def _mark(self, flags, mask, path):
        if _libc.fanotify_mark(self.fd, flags, mask, AT_FDCWD, os.fsencode(path)) != 0:
            raise _oserror("fanotify_mark", path)

    def _mark_file(self, path):
        key = file_handle(path)
        self._mark(FAN_MARK_ADD, FAN_FILE_MASK, path)
        return key

    def _unmark_file(self, path, key):
        # a mark is removed by path: only if path still names the marked
        # inode. Otherwise the mark stays on the old inode (events on it are
        # ignored) until that inode is freed or the watcher closes.
        try:
            if file_handle(path) == key:
                self._mark(FAN_MARK_REMOVE, FAN_FILE_MASK, path)
        except OSError:
            pass

    def _mark_dir(self, d):
        key = file_handle(d)
        self._mark(FAN_MARK_ADD | FAN_MARK_ONLYDIR, FAN_DIR_MASK, d)
        return key

    def _unmark_dir(self, d, key):
        try:
            if file_handle(d) == key:
                self._mark(FAN_MARK_REMOVE | FAN_MARK_ONLYDIR, FAN_DIR_MASK, d)
        except OSError:
            pass

    def read(self):
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return None
        out, off = [], 0
        while off + _FAN_META.size <= len(data):
            event_len, _vers, _res, meta_len, mask, fd, pid = _FAN_META.unpack_from(data, off)
            if event_len < _FAN_META.size:
                break
            if fd >= 0:
                os.close(fd)        # not in FID mode, but never leak one
            end = off + event_len
            fid = dfid = name = None
            info = off + meta_len
            while info + _FAN_INFO.size <= end:
                itype, _pad, ilen = _FAN_INFO.unpack_from(data, info)
                if ilen < _FAN_INFO.size:
                    break
                if itype in (FAN_EVENT_INFO_TYPE_FID, FAN_EVENT_INFO_TYPE_DFID,
                             FAN_EVENT_INFO_TYPE_DFID_NAME):
                    # header, fsid (8), struct file_handle, [name NUL]
                    fsid = data[info + 4:info + 12]
                    nbytes, htype = struct.unpack_from("=Ii", data, info + 12)
                    h0 = info + 20
                    key = (fsid, htype, data[h0:h0 + nbytes])
                    if itype == FAN_EVENT_INFO_TYPE_FID:
                        fid = key
                    else:
                        dfid = key
                        if itype == FAN_EVENT_INFO_TYPE_DFID_NAME:
                            raw = data[h0 + nbytes:info + ilen]
                            name = os.fsdecode(raw.split(b"\0", 1)[0])
                info += ilen
            pid = pid if pid > 0 else None     # 0: not in our pid namespace
            if mask & FAN_Q_OVERFLOW:
                out.append(("overflow", None, None, None, None))
            for bit, kind in ((FAN_MODIFY, "modify"), (FAN_CREATE, "create"),
                              (FAN_DELETE, "delete"), (FAN_MOVED_FROM, "moved_from"),
                              (FAN_MOVED_TO, "moved_to")):
                if mask & bit:
                    out.append((kind, pid, fid, dfid, name))
            off = end
        return out


class _Inotify(_Backend):
    name = "inotify"

    def __init__(self):
        super().__init__()
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise _oserror("inotify_init1")
        self.fd = fd

    def _add_watch(self, path, mask):
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            raise _oserror("inotify_add_watch", path)
        return wd

    def _mark_file(self, path):
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "a directory, not a file", path)
        return self._add_watch(path, IN_MODIFY)

    def _unmark_file(self, path, wd):
        _libc.inotify_rm_watch(self.fd, wd)     # EINVAL if the inode is gone already: fine

    def _mark_dir(self, d):
        return self._add_watch(d, IN_DIR_MASK)

    def _unmark_dir(self, d, wd):
        _libc.inotify_rm_watch(self.fd, wd)

    def read(self):
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return None
        out, off = [], 0
        while off + _IN_EVENT.size <= len(data):
            wd, mask, _cookie, nlen = _IN_EVENT.unpack_from(data, off)
            start = off + _IN_EVENT.size
            name = os.fsdecode(data[start:start + nlen].split(b"\0", 1)[0]) if nlen else None
            off = start + nlen
            if mask & IN_Q_OVERFLOW:
                out.append(("overflow", None, None, None, None))
            if mask & IN_IGNORED:
                # the watch is gone (inode freed, or removed): its paths
                # have no live mark until a create or rename puts one back
                for path in list(self.by_key.get(wd, ())):
                    self.forget(path, unmark=False)
                continue
            for bit, kind in ((IN_MODIFY, "modify"), (IN_CREATE, "create"), (IN_DELETE, "delete"),
                              (IN_MOVED_FROM, "moved_from"), (IN_MOVED_TO, "moved_to")):
                if mask & bit:
                    # one wd numbering for files and directories
                    out.append((kind, None, wd if name is None else None, wd, name))
        return out


_OPS = {"delete": "unlink", "moved_from": "rename", "moved_to": "rename", "create": "create"}


class FileWatcher:
    """Reports changes to watched files to on_change(Change), on its own
    thread (on_change must not block long; it may call watch/unwatch).

    backend "auto": fanotify, else inotify; "fanotify" or "inotify" force
    one. ``backend`` says which after start(); ``fallback`` lists the paths
    that fanotify would not mark and inotify watches instead."""

    def __init__(self, on_change, backend="auto"):
        if backend not in ("auto", "fanotify", "inotify"):
            raise ValueError(f"backend must be auto, fanotify or inotify, not {backend!r}")
        self.on_change = on_change
        self.wanted = backend
        self.backend = None
        self.counters = {"events": 0, "changes": 0, "errors": 0, "overflows": 0}
        self.last_error = None
        self._lock = threading.RLock()
        self._fan = None
        self._ino = None
        self._where = {}             # path -> the backend watching it
        self._size = {}              # path -> size at the last event (truncate detection)
        self._wake = None
        self._thread = None
        self._closed = False

    # -- life cycle --------------------------------------------------------------
    def start(self):
        with self._lock:
            if self._thread or self._closed:
                raise RuntimeError("FileWatcher.start(): already started or closed")
            try:
                if self.wanted != "inotify":
                    try:
                        self._fan = _Fanotify()
                    except OSError:
                        if self.wanted == "fanotify":
                            raise
                if self.wanted != "fanotify":
                    self._ino = _Inotify()
                self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            except BaseException:
                self._close_fds()
                raise
            self.backend = "fanotify" if self._fan else "inotify"
            self._thread = threading.Thread(target=self._loop, name="aw-fswatch", daemon=True)
            self._thread.start()
        return self

    def close(self):
        """Stop the thread and close every fd. Idempotent; from on_change
        too (the thread then ends after this callback)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._wake:
                os.write(self._wake[1], b"x")
            thread = self._thread
        if thread and thread is not threading.current_thread():
            thread.join()
        if not thread or thread is not threading.current_thread():
            self._close_fds()

    def _close_fds(self):
        with self._lock:
            for b in (self._fan, self._ino):
                if b:
                    b.close()
            if self._wake:
                for fd in self._wake:
                    os.close(fd)
                self._wake = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the watched set -----------------------------------------------------------
    def watch(self, path):
        """Watch the file at path (made absolute; symlinks are followed for
        its content, the name is watched in its parent directory).
        FileNotFoundError if there is nothing there. Idempotent."""
        path = os.path.abspath(os.fsdecode(path))
        with self._lock:
            if not self._thread or self._closed:
                raise RuntimeError("FileWatcher.watch(): not started, or closed")
            if path in self._where:
                return
            st = os.stat(path)          # FileNotFoundError, as promised
            if os.path.isdir(path):
                raise IsADirectoryError(errno.EISDIR, "a directory, not a file", path)
            backend = self._fan or self._ino
            try:
                backend.add(path)
            except OSError as e:
                if backend is not self._fan or e.errno not in _FAN_REFUSALS or not self._ino:
                    raise
                backend = self._ino      # e.g. a filesystem fanotify cannot mark
                backend.add(path)
            self._where[path] = backend
            self._size[path] = st.st_size

    def unwatch(self, path):
        path = os.path.abspath(os.fsdecode(path))
        with self._lock:
            backend = self._where.pop(path, None)
            self._size.pop(path, None)
            if backend and not self._closed:
                backend.remove(path)

    def watched(self):
        with self._lock:
            return set(self._where)

    @property
    def fallback(self):
        """Watched paths that inotify watches although fanotify is in use."""
        with self._lock:
            return {p for p, b in self._where.items() if self._fan and b is self._ino}

    # -- the thread ----------------------------------------------------------------
    def _loop(self):
        poller = select.poll()
        backends = [b for b in (self._fan, self._ino) if b]
        for b in backends:
            poller.register(b.fd, select.POLLIN)
        poller.register(self._wake[0], select.POLLIN)
        try:
            while not self._closed:
                poller.poll()
                for b in backends:
                    self._drain(b)
        finally:
            if self._closed:
                self._close_fds()

    def _drain(self, backend):
        while not self._closed:
            try:
                with self._lock:
                    raw = backend.read()
                    if raw is None:
                        return
                    changes = self._match(backend, raw)
            except Exception as e:         # counted; the next poll tries again
                self._error(e)
                return
            for change in changes:
                try:
                    self.counters["changes"] += 1
                    self.on_change(change)
                except Exception as e:     # a caller's bug must not end the watcher
                    self._error(e)

    def _error(self, e):
        self.counters["errors"] += 1
        self.last_error = f"{type(e).__name__}: {e}"

    def _match(self, backend, raw):
        """Changes for one batch of decoded events; identical (path, op, pid)
        once. Re-marks a path that got a new inode before reporting it."""
        now = time.time()
        seen, out = set(), []
        for kind, pid, fkey, dkey, name in raw:
            self.counters["events"] += 1
            if kind == "overflow":
                self.counters["overflows"] += 1
                for path, b in list(self._where.items()):
                    self._refresh(b, path)
                out.append(Change(None, "overflow", None, None, now))
                continue
            if kind == "modify":       # by the inode: a handle, or the file's own wd
                paths = backend.paths(fkey) if fkey is not None else ()
            else:                      # by the directory and the entry's name
                p = backend.by_entry.get((dkey, name))
                paths = (p,) if p else ()
            for path in list(paths):
                op = self._op(backend, kind, path)
                if op and (path, op, pid) not in seen:
                    seen.add((path, op, pid))
                    out.append(Change(path, op, pid, procfs.exe(pid), now))
        return out

    def _op(self, backend, kind, path):
        if kind == "modify":
            # truncate vs write: the size went down since the last event
            # seen. Good enough for staleness: a truncate that is followed
            # at once by a longer write reads as a write, and both are changes.
            size = _size(path)
            last = self._size.get(path)
            self._size[path] = size
            return "truncate" if size is not None and last is not None and size < last else "write"
        if kind in ("delete", "moved_from"):
            backend.forget(path)
        else:          # create, moved_to: a new inode at path: follow it
            self._refresh(backend, path)
        return _OPS[kind]

    def _refresh(self, backend, path):
        try:
            backend.refresh(path)
            self._size[path] = _size(path)
        except FileNotFoundError:
            backend.forget(path)        # gone again already: its events follow
        except OSError as e:
            self._error(e)


def _size(path):
    try:
        return os.stat(path).st_size
    except OSError:
        return None
