"""Semantic termination: when a run is over although its agent still runs.

A ``Terminator`` is fed every event of its run (``feed``: O(1), on the
sensors' reader thread under the monitor lock, see engine/bus.py) and asked
``check(now)`` by the run loop every ~150 ms. It keeps the run's progress
signals, all from what the kernel saw (never from what the agent says):

- the last write in the workspace (a file event that creates, writes,
  truncates, renames, links or removes a path under it) and the last exec;
- exec counts by argv, and failing-command counts by (argv, exit status),
  both since the workspace content last changed: "the same command again
  with nothing changed in between" is a loop, `make test` after each edit
  is not;
- the workspace-content hash: a hash of the workspace tree (each regular
  file's relative path and content hash; symlinks by target) recomputed
  when a write under it was seen, at most every HASH_EVERY_S; a file's
  content is re-read only when it was written since the last hash or its
  (size, mtime, inode, ctime) changed. A state that comes back K times
  (A-B-A-B, undo/redo; staying at the same state does not count) is a loop;
- bytes written: the sizes of the regular files the run wrote to (anywhere),
  added each time a sample finds one changed (size, mtime or inode) since
  the last sample. The sensors see opens, not write(2) byte counts, so this
  counts a file's size once per change seen (at most every HASH_EVERY_S):
  a 1 MB file rewritten 100 times in 100 samples is 100 MB, a 1 GB file
  appended a byte at a time in one second is 1 GB once;
- processes started (fork events), execs (successful ones), LLM tokens
  (tokens_in + tokens_out of the gateway's llm events).

``check`` answers None or a ``Termination(reason, condition, evidence)``;
reason is done, loop, no_progress, budget or timeout (REASONS). The I/O it
needs (stat and read files, walk the workspace, start a done command) is
the ``io`` object's the caller gives (``LocalIO`` by default; a done
command is started through ``io.start_command`` and reported back with
``command_result``), so this module is testable without a kernel.

The run adds the reasons of its own ends (``exit``, ``stopped``,
``violation``, and ``timeout`` for resources.wall_time) and the exit status
``agentwatch run`` gives for each (``exit_status``)."""
import hashlib
import os
import re
import stat as stat_mod
from dataclasses import dataclass

REASONS = ("done", "loop", "no_progress", "budget", "timeout")
# every reason an end event's termination may have (the run adds the last three)
ALL_REASONS = REASONS + ("exit", "stopped", "violation")
# `agentwatch run`'s exit status per reason; None: the agent's own
EXIT_STATUS = {"done": 0, "loop": 81, "no_progress": 82, "budget": 83, "timeout": 124,
               "exit": None, "stopped": None, "violation": None}

HASH_EVERY_S = 0.5           # the workspace hash at most this often
DIRTY_S = 1.0                # ... and for this long after the last write seen (an open precedes its writes)
FILE_CHECK_S = 1.0           # done files: on every write seen, and at least this often
COMMAND_QUIET_S = 1.0        # a done command after a workspace change: once writes paused this long
MAX_TREE_FILES = 20000       # the workspace walk stops here (evidence says so)
MAX_HASH_BYTES = 16 << 20    # a bigger file is hashed by (size, mtime), not content
MAX_MATCH_BYTES = 1 << 20    # a done file's regex sees its first MiB
MAX_TRACKED = 65536          # argv/pid tables: bounded (the oldest entries go)
WRITE_OPS = frozenset(("unlink", "rename", "mkdir", "rmdir", "truncate", "link", "symlink", "mknod"))


@dataclass(frozen=True)
class Termination:
    """Why a run ended: reason (ALL_REASONS), the condition (the policy key
    that fired, e.g. "termination.loop.exec", or "resources.wall_time"),
    and the evidence (a small JSON-able dict)."""
    reason: str
    condition: str = None
    evidence: dict = None

    def to_dict(self):
        return {"reason": self.reason, "condition": self.condition, "evidence": self.evidence or {}}


def exit_status(termination, agent_status):
    """The exit status of `agentwatch run` for a termination (a dict as in
    the end event, a Termination, or None) and the agent's own status."""
    if termination is None:
        return agent_status
    reason = termination.get("reason") if isinstance(termination, dict) else termination.reason
    code = EXIT_STATUS.get(reason)
    return agent_status if code is None else code


def expand(path, variables):
    """'${WORKSPACE}/DONE' -> '/work/ws/DONE' (a literal path, no glob escaping)."""
    m = re.match(r"\$\{([A-Z]+)\}", path)
    if m:
        path = variables[m.group(1)].rstrip("/") + path[m.end():]
    return os.path.normpath(path)


# --------------------------------------------------------------- the I/O the caller gives

class LocalIO:
    """What a Terminator reads of the machine. start_command: a callable
    (index, argv, timeout) -> None that starts a done command and later
    reports it with Terminator.command_result; None: commands never run."""

    def __init__(self, start_command=None):
        self.start_command = start_command

    def stat(self, path):
        try:
            return os.stat(path)
        except OSError:
            return None

    def read(self, path, limit):
        try:
            with open(path, "rb") as f:
                return f.read(limit)
        except OSError:
            return None

    def walk(self, root, limit):
        """(relpath, os.stat_result or link target) of every entry under
        root (not following symlinks), at most limit; -> (entries, truncated)."""
        out, stack = [], [root]
        while stack:
            d = stack.pop()
            try:
                it = os.scandir(d)
            except OSError:
                continue
            with it:
                for e in it:
                    if len(out) >= limit:
                        return out, True
                    rel = os.path.relpath(e.path, root)
                    try:
                        if e.is_symlink():
                            out.append((rel, "->" + os.readlink(e.path)))
                        elif e.is_dir(follow_symlinks=False):
                            out.append((rel, None))
                            stack.append(e.path)
                        elif e.is_file(follow_symlinks=False):
                            out.append((rel, e.stat(follow_symlinks=False)))
                    except OSError:
                        continue
        return out, False

    def file_digest(self, path, size):
        h = hashlib.blake2b(digest_size=16)
        try:
            with open(path, "rb") as f:
                while True:
                    chunk = f.read(1 << 20)
                    if not chunk:
                        break
                    h.update(chunk)
        except OSError:
            return None
        return h.hexdigest()


def _key(st):
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


# --------------------------------------------------------------- the terminator

class Terminator:
    """A run's progress signals and termination conditions.

    rules: policy.model.TerminationRules, or None (only the signals are kept,
    for `agentwatch ps`; no workspace hash). workspace: the run's workspace
    (absolute). variables: for the done files' ${...}. now: the clock's time
    at the run's start (time.monotonic's, as check's)."""

    def __init__(self, rules, workspace, variables=None, now=0.0, io=None):
        self.rules = rules
        self.io = io or LocalIO()
        self.workspace = os.path.normpath(workspace)
        self._ws_prefix = self.workspace.rstrip("/") + "/"
        variables = dict(variables or {}, WORKSPACE=self.workspace)
        self.started = now
        loop = rules.loop if rules else {}
        budget = rules.budget if rules else {}
        self.loop, self.budget = dict(loop), dict(budget)
        self.no_progress = rules.no_progress if rules else None
        done = rules.done if rules else ()
        self.files = [(i, c, expand(c.file, variables)) for i, c in enumerate(done) if c.file]
        self.commands = [(i, c) for i, c in enumerate(done) if c.command]
        self.messages = [(i, c) for i, c in enumerate(done) if c.message]
        self._message_done = None       # (index, evidence) once a message condition held
        self._regex = {i: re.compile(c.matches, re.MULTILINE) for i, c, _ in self.files if c.matches}
        # hashing the workspace costs a walk: only when something needs it
        self.hashing = "workspace" in self.loop or "exec" in self.loop or "failing" in self.loop
        # progress signals
        self.last_write = self.last_exec = None      # clock times (as feed's now, see feed)
        self.execs = self.processes = self.tokens = 0
        self.bytes_written = 0
        self.writes = 0
        self.exec_counts = {}          # argv tuple -> count since the workspace last changed
        self.fail_counts = {}          # (argv tuple, status) -> count since then
        self.top_exec = (0, None)      # (count, argv) the most repeated since then
        self._pid_argv = {}            # pid -> argv of its last exec (for its exit status)
        self.ignored = set()           # pids of the run's own done commands (and their children)
        # the workspace state
        self.state = None              # the current workspace hash
        self.state_returns = {}        # hash -> times it came back
        self.states_seen = set()
        self.top_return = 0
        self._tree = {}                # relpath -> (stat key, digest)
        self._tree_truncated = False
        self._dirty_until = None       # hash again until then (writes seen)
        self._written = set()          # abspaths written since the last sample
        self._sizes = {}               # abspath -> stat key at the last sample (bytes_written)
        self._last_hash = None
        self._last_files = None
        self._files_due = bool(self.files)
        # done commands: index -> state
        self._cmd_last = {i: now for i, _ in self.commands}
        self._cmd_running = set()
        self._cmd_result = {}          # index -> (status, seconds) reported, not yet seen by check
        self._cmd_runs = {i: 0 for i, _ in self.commands}
        self._last_ws_write_for_cmd = None
        self._clock = now
        self.fired = None

    # -- feed: every event of the run, O(1) -------------------------------------------
    def feed(self, ev, now=None):
        """One event (core.events.Event). now: the clock's time (default: the
        last check's, so a caller on the reader thread needs no clock)."""
        kind = ev.kind
        t = self._clock if now is None else now
        if kind == "file":
            if ev.pid in self.ignored or ev.ret < 0:
                return
            op = ev.op
            if op == "open":
                acc = ev.access
                if "write" not in acc and "create" not in acc and "truncate" not in acc:
                    return
            elif op not in WRITE_OPS:
                return
            path = ev.abspath or ev.path
            self.writes += 1
            if len(self._written) < 4096:
                self._written.add(path)
                if ev.path2 and op in ("rename", "link"):
                    self._written.add(ev.path2)
            if path.startswith(self._ws_prefix) or path == self.workspace or (
                    ev.path2 and ev.path2.startswith(self._ws_prefix)):
                self.last_write = t
                self._dirty_until = t + DIRTY_S
                self._last_ws_write_for_cmd = t
            self._files_due = True
        elif kind == "exec":
            if ev.pid in self.ignored:
                return
            argv = tuple(ev.argv) or (ev.filename,)
            if ev.ret < 0:
                self._fail(argv, ev.error or ev.ret)
                return
            self.execs += 1
            self.last_exec = t
            n = self.exec_counts.get(argv, 0) + 1
            if n == 1 and len(self.exec_counts) >= MAX_TRACKED:
                self.exec_counts.clear()
            self.exec_counts[argv] = n
            if n > self.top_exec[0]:
                self.top_exec = (n, argv)
            if len(self._pid_argv) >= MAX_TRACKED:
                self._pid_argv.clear()
            self._pid_argv[ev.pid] = argv
        elif kind == "exit":
            if ev.pid in self.ignored:
                self.ignored.discard(ev.pid)
                return
            argv = self._pid_argv.pop(ev.pid, None)
            if argv is not None and (ev.code or ev.signal):
                self._fail(argv, ev.code if ev.code else f"signal {ev.signal}")
        elif kind == "fork":
            if ev.pid in self.ignored:
                self.ignored.add(ev.child)
                return
            self.processes += 1
        elif kind == "llm":
            self.tokens += (ev.tokens_in or 0) + (ev.tokens_out or 0)
        elif kind == "msg" and self.messages and self._message_done is None:
            if ev.op in ("send", "forward") and ev.status == "ok":
                for i, cond in self.messages:
                    if ev.peer == cond.message["to"] and cond.message["tag"] in (ev.tags or ()):
                        self._message_done = (i, {"message_id": ev.message_id, "to": ev.peer,
                                                  "to_run": ev.peer_run, "tag": cond.message["tag"],
                                                  "task_id": ev.task_id})
                        break

    def _fail(self, argv, status):
        key = (argv, status)
        if len(self.fail_counts) >= MAX_TRACKED:
            self.fail_counts.clear()
        self.fail_counts[key] = self.fail_counts.get(key, 0) + 1

    def ignore(self, pid):
        """pid is the run's own (a done command): its events and its
        children's are no progress and no budget."""
        self.ignored.add(pid)

    def command_result(self, index, status, seconds):
        """A done command (termination.done[index]) ended with status."""
        self._cmd_result[index] = (status, seconds)

    # -- check: from the run loop --------------------------------------------------------
    def check(self, now):
        """None, or the Termination that holds now (once one fired, the same)."""
        self._clock = now
        if self.fired is not None:
            return self.fired
        self._sample(now)
        for check in (self._check_done, self._check_budget, self._check_loop, self._check_idle):
            t = check(now)
            if t is not None:
                self.fired = t
                return t
        return None

    def _sample(self, now):
        """Recompute the workspace hash and the bytes written when due."""
        if self._dirty_until is None and not self._written and not (self.hashing and self.state is None):
            return
        if self._last_hash is not None and now - self._last_hash < HASH_EVERY_S:
            return
        self._last_hash = now
        written, self._written = self._written, set()
        for path in written:
            st = self.io.stat(path)
            if st is None or not stat_mod.S_ISREG(st.st_mode):
                continue
            key = _key(st)
            if self._sizes.get(path) != key:
                if len(self._sizes) >= MAX_TRACKED:
                    self._sizes.clear()
                self._sizes[path] = key
                self.bytes_written += st.st_size
        if self._dirty_until is not None and now > self._dirty_until:
            self._dirty_until = None
        if self.hashing:
            self._hash_tree(written)

    def _hash_tree(self, written):
        entries, self._tree_truncated = self.io.walk(self.workspace, MAX_TREE_FILES)
        h = hashlib.blake2b(digest_size=16)
        tree = {}
        for rel, st in sorted(entries, key=lambda e: e[0]):
            if st is None or isinstance(st, str):
                part = st or "/"
            else:
                key = _key(st)
                old = self._tree.get(rel)
                path = os.path.join(self.workspace, rel)
                if old is not None and old[0] == key and path not in written:
                    digest = old[1]
                elif st.st_size > MAX_HASH_BYTES:
                    digest = f"{st.st_size}:{st.st_mtime_ns}"
                else:
                    digest = self.io.file_digest(path, st.st_size) or "?"
                tree[rel] = (key, digest)
                part = digest
            h.update(rel.encode("utf-8", "surrogateescape") + b"\0" + part.encode() + b"\n")
        self._tree = tree
        state = h.hexdigest()
        if state == self.state:
            return
        if self.state is not None:
            self.exec_counts.clear()           # the workspace changed: commands count anew
            self.fail_counts.clear()
            self.top_exec = (0, None)
        if state in self.states_seen:
            n = self.state_returns.get(state, 0) + 1
            self.state_returns[state] = n
            self.top_return = max(self.top_return, n)
        else:
            if len(self.states_seen) >= MAX_TRACKED:
                self.states_seen.clear()
            self.states_seen.add(state)
        self.state = state

    def _check_done(self, now):
        if self._message_done is not None:
            i, evidence = self._message_done
            return Termination("done", f"termination.done[{i}]", evidence)
        if self.files and (self._files_due or self._last_files is None
                           or now - self._last_files >= FILE_CHECK_S):
            self._files_due = False
            self._last_files = now
            for i, cond, path in self.files:
                t = self._check_file(i, cond, path)
                if t is not None:
                    return t
        for i, cond in self.commands:
            if i in self._cmd_result:
                status, seconds = self._cmd_result.pop(i)
                self._cmd_running.discard(i)
                if status == 0:
                    return Termination("done", f"termination.done[{i}]",
                                       {"command": list(cond.command), "exit_status": 0,
                                        "seconds": round(seconds, 3), "checks": self._cmd_runs[i]})
            if i in self._cmd_running or self.io.start_command is None:
                continue
            changed = (self._last_ws_write_for_cmd is not None
                       and self._last_ws_write_for_cmd > self._cmd_last[i]
                       and now - self._last_ws_write_for_cmd >= COMMAND_QUIET_S)
            if changed or now - self._cmd_last[i] >= cond.every:
                self._cmd_last[i] = now
                self._cmd_running.add(i)
                self._cmd_runs[i] += 1
                self.io.start_command(i, list(cond.command), cond.timeout)
        return None

    def _check_file(self, i, cond, path):
        st = self.io.stat(path)
        if st is None:
            return None
        evidence = {"file": path}
        if cond.matches:
            data = self.io.read(path, MAX_MATCH_BYTES)
            if data is None:
                return None
            text = data.decode("utf-8", "replace")
            m = self._regex[i].search(text)
            if m is None:
                return None
            start = text.rfind("\n", 0, m.start()) + 1
            end = text.find("\n", m.end())
            evidence["matched"] = text[start:end if end >= 0 else len(text)][:200]   # the line(s)
        return Termination("done", f"termination.done[{i}]", evidence)

    def _check_budget(self, now):
        b = self.budget
        for key, value in (("execs", self.execs), ("processes", self.processes),
                           ("llm_tokens", self.tokens), ("bytes_written", self.bytes_written)):
            if key in b and value >= b[key]:
                return Termination("budget", f"termination.budget.{key}", {key: value, "limit": b[key]})
        if "wall_time" in b and now - self.started >= b["wall_time"]:
            return Termination("timeout", "termination.budget.wall_time",
                               {"seconds": round(now - self.started, 3), "limit": b["wall_time"]})
        return None

    def _check_loop(self, now):
        loop = self.loop
        k = loop.get("exec")
        if k and self.top_exec[0] >= k:
            return Termination("loop", "termination.loop.exec",
                               {"argv": list(self.top_exec[1]), "count": self.top_exec[0], "limit": k})
        k = loop.get("failing")
        if k:
            for (argv, status), n in self.fail_counts.items():
                if n >= k:
                    return Termination("loop", "termination.loop.failing",
                                       {"argv": list(argv), "exit_status": status, "count": n, "limit": k})
        k = loop.get("workspace")
        if k and self.top_return >= k:
            return Termination("loop", "termination.loop.workspace",
                               {"state": self.state, "returns": self.top_return, "limit": k,
                                "distinct_states": len(self.states_seen)})
        return None

    def _check_idle(self, now):
        if self.no_progress is None:
            return None
        idle = now - self._last_progress()
        if idle >= self.no_progress:
            return Termination("no_progress", "termination.no_progress",
                               {"idle_seconds": round(idle, 3), "limit": self.no_progress,
                                "execs": self.execs, "writes": self.writes})
        return None

    def _last_progress(self):
        return max(t for t in (self.started, self.last_write, self.last_exec) if t is not None)

    # -- for stats.json / agentwatch ps ------------------------------------------------
    def progress(self, now):
        """The live progress signals (JSON-able)."""
        return {"idle_seconds": round(now - self._last_progress(), 1), "execs": self.execs,
                "processes": self.processes, "writes": self.writes,
                "bytes_written": self.bytes_written, "llm_tokens": self.tokens,
                "top_exec_repeats": self.top_exec[0],
                "top_exec": list(self.top_exec[1]) if self.top_exec[1] else None,
                "workspace_returns": self.top_return,
                "workspace_states": len(self.states_seen) if self.hashing else None}
