"""A run's log: every event the run writes goes through RunLog.emit, which
links it into the integrity hash chain, writes it to the sinks (the run's
JSONL log, --events, --show's console) and publishes it on the run's
EventBus for other layers. Also the run's state record (run.json) and its
stats (stats.json, and a `drops` lifecycle event whenever the kernel lost
more events)."""
import os
import time

from .. import integrity
from ..core import state
from ..core.errors import UsageError
from ..core.events import LifecycleEvent
from ..engine.bus import EventBus
from ..sinks.console import ConsoleSink, use_color
from ..sinks.jsonl import JsonlSink


class RunLog:
    def __init__(self, run_id):
        self.run_id = run_id
        self.agent = None                # set once the run is prepared
        self.chain = integrity.Chain(run_id)
        self.sinks = []
        self.bus = EventBus()            # every logged event, for other layers (engine/bus.py)
        self.record = {}                 # run.json, once saved
        self._last_lost = 0

    def open(self, events_path=None, console=None, environ=None):
        """The run's JSONL log, --events FILE, and --show (console: a stream,
        coloured when a terminal, unless environ, the client's environment
        on the daemon, sets NO_COLOR)."""
        self.sinks.append(JsonlSink(state.run_path(self.run_id, "events.jsonl")))
        if events_path:
            try:
                self.sinks.append(JsonlSink(events_path, "w"))
            except OSError as e:
                raise UsageError(f"--events {events_path}: {e.strerror}") from None
        if console is not None:
            self.sinks.append(ConsoleSink(console, color=use_color(console, environ)))

    def emit(self, ev):
        ev.prev = self.chain.prev
        line = ev.to_json()
        self.chain.advance(line)
        for s in self.sinks:
            s.write(ev, line)
        if self.bus.subscribers:         # nobody subscribed: nothing to do (the common case)
            self.bus.publish(ev)

    def lifecycle(self, phase, detail, pid=None):
        ev = LifecycleEvent(phase=phase, detail=detail, ts=round(time.time(), 6),
                            run_id=self.run_id, agent=self.agent, pid=pid or os.getpid(),
                            ppid=os.getppid(), uid=os.getuid(), comm="agentwatch")
        self.emit(ev)

    def seal(self, counts):
        """The last line: the chain's head signed with the host key."""
        self.lifecycle("seal", integrity.seal(self.chain, self.run_id, counts, integrity.host_key()))

    def flush(self):
        for s in self.sinks:
            s.flush()

    def close(self):
        for s in self.sinks:
            s.close()

    # -- the state directory ----------------------------------------------------------
    def save_record(self, **changes):
        self.record.update(changes)
        state.write_json_atomic(state.run_path(self.run_id, "run.json"), self.record)

    def stats(self, sensors, ctx, pids, progress=None):
        """The run's counters now (sensors' and the run context's; pids: how
        many processes the run has; progress: the terminator's signals,
        engine/termination.py), into stats.json; a `drops` event when the
        kernel lost more events since the last time."""
        c = sensors.counters()
        stats = {"events": ctx.events, "lost_events": c["lost_events"],
                 "lost_events_per_cpu": c["lost_events_per_cpu"], "lost_stash": c["lost_stash"],
                 "records_submitted": c["submitted"], "records_received": c["received"],
                 "rings": c["rings"], "killed_in_kernel": c["killed_in_kernel"],
                 "repeated": ctx.repeated, "unmatched_repeats": ctx.unmatched_repeats,
                 "folded": c["folded"],
                 "decode_errors": len(sensors.errors), "pids": pids,
                 "progress": progress, "updated": time.time()}
        state.write_json_atomic(state.run_path(self.run_id, "stats.json"), stats)
        lost = c["lost_events"] + c["lost_stash"]
        if lost != self._last_lost:
            self.lifecycle("drops", {"lost_events": c["lost_events"], "lost_stash": c["lost_stash"],
                                     "lost_events_per_cpu": c["lost_events_per_cpu"],
                                     "lost_priority": c["rings"]["priority"]["lost"],
                                     "message": f"{lost - self._last_lost} new events lost in the kernel"})
            self._last_lost = lost
        return stats


# the `end` event's copy of the final stats
END_STATS = ("lost_events", "lost_stash", "lost_events_per_cpu", "records_submitted",
             "records_received", "repeated", "unmatched_repeats", "folded", "rings",
             "decode_errors")


def summary_line(run_id, agent, exit_status, events, lost, stats, verdict):
    """The one line a run ends with: exit status, events, losses (per CPU
    and ring), violations by category, where the log is."""
    out = f"agentwatch: run {run_id} ({agent}) exited {exit_status}: {events} events, {lost} lost"
    if stats["lost_events"]:
        per_cpu = ", ".join(f"{n} on CPU #{i}" for i, n in enumerate(stats["lost_events_per_cpu"]) if n)
        rings = stats["rings"]
        out += (f" (ring buffers full: {per_cpu}; {rings['bulk']['lost']} bulk, "
                f"{rings['priority']['lost']} priority)")
    if verdict is not None:
        cats = ", ".join(f"{c} {n}" for c, n in sorted(verdict["by_category"].items())) or "none"
        out += f"; violations: {verdict['violations']} ({cats})"
    return out + f"; log: {state.run_path(run_id, 'events.jsonl')}"
