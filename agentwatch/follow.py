"""Reading the live stream: the run logs under the state directory.

``follow()`` yields event dicts from every run's events.jsonl as they are
appended, picks up runs that start later, and can replay past events
(``since``) or one finished run. It is what `agentwatch tail` prints.
Logs are read a chunk at a time, so a long replay can report its progress.
"""
import fnmatch
import json
import os
import time
from dataclasses import dataclass

from .core import state


@dataclass
class Filter:
    run: str = None          # run id or unique prefix
    agent: str = None        # agent name or glob
    kinds: tuple = ()
    violations: bool = False
    since: float = None      # Unix time

    def match(self, d):
        if self.violations and d.get("kind") != "violation":
            return False
        if self.kinds and d.get("kind") not in self.kinds:
            return False
        if self.agent and not fnmatch.fnmatchcase(str(d.get("agent", "")), self.agent):
            return False
        if self.since is not None and d.get("ts", 0) < self.since:
            return False
        return True


@dataclass
class _Log:
    run_id: str
    path: str
    pos: int = 0
    partial: bytes = b""
    done: bool = False


def parse_since(text, now=None):
    """'30s', '10m', '2h', '1d', a Unix time, or an ISO date -> Unix time."""
    now = time.time() if now is None else now
    text = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units and text[:-1].replace(".", "", 1).isdigit():
        return now - float(text[:-1]) * units[text[-1]]
    try:
        return float(text)
    except ValueError:
        pass
    from datetime import datetime
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"cannot read --since {text!r}: use 30s, 10m, 2h, 1d, a Unix time "
                         "or an ISO date like 2026-11-28T10:00") from None
    return dt.timestamp()


CHUNK = 1 << 20     # bytes of a log read at once (and between progress reports)


def _read_new(log, limit=-1):
    """The complete lines appended since the last read (at most limit bytes
    more), as dicts."""
    try:
        with open(log.path, "rb") as f:
            f.seek(log.pos)
            data = f.read(limit)
    except FileNotFoundError:
        return []
    log.pos += len(data)
    data = log.partial + data
    lines = data.split(b"\n")
    log.partial = lines.pop()
    out = []
    for line in lines:
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _backlog(logs):
    """What the logs hold now beyond where reading stands: the replay, in bytes."""
    return sum(max(0, _size(log.path) - log.pos) for log in logs.values())


def follow(flt, follow=True, poll_interval=0.2, rescan_every=1.0, stop=None, progress=None):
    """Yield matching event dicts. With flt.run set, replays that run from its
    start and ends when the run has ended; otherwise follows every run
    (new events only, unless flt.since) until stop() is true or forever.
    progress(done, total): bytes of the replay (what the logs held when
    following began) read so far, called after every chunk of it and once
    with done == total when the replay is over (live following from there)."""
    logs = {}

    def scan(initial):
        if flt.run:
            rec = state.find_run(flt.run)
            recs = [rec] if rec else []
            if initial and not recs:
                raise LookupError(f"no run {flt.run!r} under {state.runs_dir()}")
        else:
            recs = state.list_runs()
        for rec in recs:
            rid = rec["run_id"]
            if rid in logs:
                logs[rid].done = rec.get("status") != "running"
                continue
            path = state.run_path(rid, "events.jsonl")
            log = _Log(rid, path, done=rec.get("status") != "running")
            if initial and not flt.run and flt.since is None:
                if log.done:
                    continue          # finished before we started and no replay asked
                log.pos = _size(path)   # live: only what comes next
            logs[rid] = log

    def read(log):
        """Everything new in log, a chunk at a time."""
        while True:
            before = log.pos
            yield from (d for d in _read_new(log, CHUNK) if flt.match(d))
            if replay is not None and log.pos > before:
                replay[0] = min(replay[1], replay[0] + log.pos - before)
                progress(*replay)
            if log.pos - before < CHUNK:
                return

    scan(initial=True)
    replay = [0, _backlog(logs)] if progress is not None else None
    next_scan = time.monotonic() + rescan_every
    while True:
        for log in list(logs.values()):
            yield from read(log)
        if replay is not None:
            progress(replay[1], replay[1])      # the replay is over: live from here on
            replay = None
        if not follow:
            return
        if flt.run and logs and all(l.done for l in logs.values()):
            # read what the run wrote while ending, then stop
            for log in logs.values():
                yield from read(log)
            return
        if stop and stop():
            return
        time.sleep(poll_interval)
        if time.monotonic() >= next_scan:
            scan(initial=False)
            next_scan = time.monotonic() + rescan_every
