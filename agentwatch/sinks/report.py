"""A run's report (`agentwatch report`): one pass over its log's event
dicts builds a Report (who ran what under which policy and enforcement,
the process tree with what each process did, the violations in order, the
totals and what was lost), rendered for a terminal or as one
self-contained HTML page (inline CSS, no scripts, nothing fetched).

Memory is bounded whatever the log's size: per process at most CAPS
entries of each list (files and connections are distinct targets with a
count; the rest is counted as "+N more"), at most MAX_PROCESSES processes
kept in detail and MAX_TIMELINE timeline entries; every total is exact.
Everything in a log may come from the agent (argv, paths, names): the
HTML escapes all of it, the terminal text replaces control characters.
"""
import html
import re
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field

from .console import clean, describe

CAPS = {"execs": 20, "files": 50, "connections": 30, "flows": 30, "llm": 30}
MAX_PROCESSES = 20000        # processes kept in detail; the rest are counted
MAX_TIMELINE = 1000          # violations and warnings listed; the rest are counted
RUN_LLM_CAP = 200            # LLM calls without a process (the gateway names the run only)
ARGV_CHARS = 400             # an exec's argv as listed (the log has it whole)
HTML_PROCESSES = 5000        # processes drawn in the HTML tree (the text: TEXT_PROCESSES)
TEXT_PROCESSES = 200

# a violation's evidence says what the kernel (or a guard) did; these were refused
_REFUSED = re.compile(r"\b(denied|refused|killed)\b")
_CONNECT_OPS = ("connect", "bind", "sendto", "sendmsg")
DROP_COUNTERS = ("lost_events", "lost_stash", "unmatched_repeats", "decode_errors", "folded",
                 "repeated", "records_submitted", "records_received", "killed_in_kernel")


class Capped:
    """At most cap distinct entries (key -> dict with a count); calls past
    the cap with a new key are counted in more."""

    def __init__(self, cap):
        self.cap = cap
        self.items = {}
        self.more = 0

    def add(self, key, n=1, **value):
        entry = self.items.get(key)
        if entry is not None:
            entry["count"] += n
            return entry
        if len(self.items) >= self.cap:
            self.more += n
            return None
        entry = self.items[key] = dict(value, count=n)
        return entry

    def to_dict(self):
        return {"items": [_plain(v) for v in self.items.values()], "more": self.more}


def _plain(v):
    return {k: sorted(x) if isinstance(x, set) else x for k, x in v.items()}


@dataclass
class Process:
    """One process of the run (a pid reused later is another Process)."""
    key: int                  # its index in Report.processes
    pid: int
    parent: int = None        # the parent's key, None for a root of the tree
    comm: str = ""
    start: float = None
    end: float = None
    exit: str = None          # "code 0", "signal 9"
    violations: int = 0
    children: list = field(default_factory=list)
    lists: dict = field(default_factory=lambda: {name: Capped(cap) for name, cap in CAPS.items()})

    @property
    def title(self):
        """Its last exec's argv, else its command name."""
        execs = self.lists["execs"].items
        for e in reversed(list(execs.values())):
            if not e.get("error"):
                return e["argv"] or e["filename"]
        return self.comm or "?"

    def to_dict(self):
        return {"key": self.key, "pid": self.pid, "parent": self.parent, "comm": self.comm,
                "start": self.start, "end": self.end, "exit": self.exit,
                "violations": self.violations, "children": list(self.children),
                **{name: c.to_dict() for name, c in self.lists.items()}}


@dataclass
class Report:
    """A run's log, read once. identity: the start event's detail (run.json's
    identity); end: the end event's detail ({} when the run did not end)."""
    run_id: str = None
    agent: str = None
    identity: dict = field(default_factory=dict)
    end: dict = field(default_factory=dict)
    sealed: dict = None                   # the seal event's detail
    lines: int = 0                        # log lines read
    bad_lines: int = 0                    # not JSON objects
    kinds: Counter = field(default_factory=Counter)        # log lines per kind
    violations: int = 0                   # the sum of the violation lines' counts
    by_category: Counter = field(default_factory=Counter)
    by_rule: Counter = field(default_factory=Counter)
    denials: int = 0                      # violations the kernel or a guard refused
    denials_by_rule: Counter = field(default_factory=Counter)
    drops: list = field(default_factory=list)    # `drops` events' details (the last MAX_TIMELINE)
    timeline: list = field(default_factory=list)  # violations and warnings, in time order
    timeline_more: int = 0
    processes: dict = field(default_factory=dict)  # key -> Process
    process_count: int = 0                # every process seen, kept in detail or not
    run_llm: Capped = field(default_factory=lambda: Capped(RUN_LLM_CAP))
    first_ts: float = None
    last_ts: float = None

    @property
    def roots(self):
        return [p.key for p in self.processes.values() if p.parent is None]

    @property
    def enforcement(self):
        return self.identity.get("enforcement") or {}

    @property
    def lost(self):
        """Records lost in the kernel or unmatched: the end event's, else the last drops event's."""
        e = self.end or (self.drops[-1] if self.drops else {})
        return sum(e.get(k) or 0 for k in ("lost_events", "lost_stash", "unmatched_repeats"))

    @property
    def exit_status(self):
        return self.end.get("exit_status")

    @property
    def termination(self):
        return self.end.get("termination") or {}

    def to_dict(self):
        return {"run_id": self.run_id, "agent": self.agent, "identity": self.identity, "end": self.end,
                "sealed": self.sealed, "lines": self.lines, "bad_lines": self.bad_lines,
                "kinds": dict(self.kinds), "violations": self.violations,
                "by_category": dict(self.by_category), "by_rule": dict(self.by_rule),
                "denials": self.denials, "denials_by_rule": dict(self.denials_by_rule),
                "lost": self.lost, "drops": self.drops, "timeline": self.timeline,
                "timeline_more": self.timeline_more, "process_count": self.process_count,
                "processes": [p.to_dict() for p in self.processes.values()],
                "run_llm": self.run_llm.to_dict(), "first_ts": self.first_ts, "last_ts": self.last_ts}


def refused(d):
    """True when a violation's act was refused (its evidence's kernel text:
    "denied (EACCES)", "killed (seccomp)", "refused by the LLM gateway", ...)."""
    kernel = str((d.get("detail") or {}).get("kernel") or "")
    return bool(_REFUSED.search(kernel)) and not kernel.startswith("not ")


class Builder:
    """Feed it a run's event dicts in log order (add), then take the Report (finish)."""

    def __init__(self):
        self.r = Report()
        self._by_pid = {}         # pid -> the key of its current Process (None: not kept)
        self._denied_rules = set()

    def add(self, d):
        r = self.r
        r.lines += 1
        if not isinstance(d, dict):
            r.bad_lines += 1
            return
        kind = d.get("kind")
        r.kinds[kind] += 1
        ts = d.get("ts")
        if isinstance(ts, (int, float)):
            r.first_ts = ts if r.first_ts is None else min(r.first_ts, ts)
            r.last_ts = ts if r.last_ts is None else max(r.last_ts, ts)
        if r.run_id is None and d.get("run_id"):
            r.run_id, r.agent = d.get("run_id"), d.get("agent")
        if kind == "lifecycle":
            self._lifecycle(d)
            return
        pid = d.get("pid") or 0
        if kind == "violation":
            self._violation(d)
        proc = self._proc(pid, d) if pid > 0 else None
        if kind == "fork":
            self._fork(proc, d)
        elif proc is None:
            if kind == "llm":
                r.run_llm.add(r.kinds["llm"], text=describe(d), ts=ts)
        elif kind == "exec":
            argv = " ".join(str(a) for a in d.get("argv") or [])
            if d.get("argv_truncated"):
                argv += " ..."
            proc.lists["execs"].add(r.kinds["exec"], ts=ts, filename=d.get("filename"),
                                    argv=argv[:ARGV_CHARS], error=d.get("error"))
            if not d.get("error") and d.get("comm"):
                proc.comm = d["comm"]
        elif kind == "exit":
            proc.end = ts
            proc.exit = (f"code {d['code']}" if d.get("code") is not None
                         else f"signal {d['signal']}" if d.get("signal") else "exited")
        elif kind == "file":
            path = d.get("abspath") or d.get("path")
            e = proc.lists["files"].add(path, 1 + (d.get("repeat") or 0), path=path, ops=set(),
                                        errors=set())
            if e is not None:
                e["ops"].add(d.get("op"))
                if d.get("error"):
                    e["errors"].add(d["error"])
        elif kind == "net" and d.get("op") in _CONNECT_OPS:
            where = str(d.get("addr") or "")
            if d.get("port") is not None:
                where = f"[{where}]:{d['port']}" if ":" in where else f"{where}:{d['port']}"
            e = proc.lists["connections"].add((d.get("op"), d.get("family"), where), op=d.get("op"),
                                              family=d.get("family"), where=where, errors=set())
            if e is not None and d.get("error"):
                e["errors"].add(d["error"])
        elif kind == "flow":
            proc.lists["flows"].add(r.kinds["flow"], ts=ts, text=describe(d),
                                    decision=d.get("decision"))
        elif kind == "llm":
            proc.lists["llm"].add(r.kinds["llm"], ts=ts, text=describe(d))
        elif kind == "violation" and not (d.get("detail") or {}).get("repeat"):
            proc.violations += 1

    def _proc(self, pid, d):
        """The current Process of pid, created when the log has not named it yet."""
        if pid in self._by_pid:
            key = self._by_pid[pid]
            return None if key is None else self.r.processes[key]
        parent = self._by_pid.get(d.get("ppid"))
        return self._new(pid, parent, d.get("comm"), d.get("ts"))

    def _new(self, pid, parent_key, comm, ts):
        r = self.r
        r.process_count += 1
        if len(r.processes) >= MAX_PROCESSES:
            self._by_pid[pid] = None
            return None
        key = len(r.processes)
        p = r.processes[key] = Process(key=key, pid=pid, parent=parent_key, comm=comm or "", start=ts)
        if parent_key is not None:
            r.processes[parent_key].children.append(key)
        self._by_pid[pid] = key
        return p

    def _fork(self, parent, d):
        child = d.get("child")
        if isinstance(child, int) and child > 0:
            # a fork names a new process, also when its pid was another's before
            self._new(child, None if parent is None else parent.key, d.get("comm"), d.get("ts"))

    def _violation(self, d):
        r = self.r
        n = d.get("count") or 1
        rule = d.get("rule") or "?"
        r.violations += n
        r.by_category[d.get("category") or "?"] += n
        r.by_rule[rule] += n
        repeat = (d.get("detail") or {}).get("repeat")
        denied = rule in self._denied_rules if repeat else refused(d)
        if denied:
            self._denied_rules.add(rule)
            r.denials += n
            r.denials_by_rule[rule] += n
        self._note(d, rule=rule, action=d.get("action"), denied=denied, count=n)

    def _note(self, d, **extra):
        r = self.r
        if len(r.timeline) >= MAX_TIMELINE:
            r.timeline_more += 1
            return
        r.timeline.append(dict(ts=d.get("ts"), pid=d.get("pid"), comm=d.get("comm"), kind=d.get("kind"),
                               text=describe(d), **extra))

    def _lifecycle(self, d):
        r = self.r
        phase, detail = d.get("phase"), d.get("detail") or {}
        if phase == "start":
            r.identity = detail
            r.run_id = detail.get("run_id") or r.run_id
            r.agent = detail.get("agent") or r.agent
        elif phase == "end":
            r.end = detail
        elif phase == "seal":
            r.sealed = detail
        elif phase == "drops":
            r.drops = (r.drops + [detail])[-MAX_TIMELINE:]
            self._note(d, rule=None, action="drops", denied=False, count=1)
        elif phase == "warning":
            self._note(d, rule=None, action="warning", denied=False, count=1)

    def finish(self):
        # in time order: agentwatch's own warning about an event may be logged
        # after later events of the agent (stable: equal times keep log order)
        self.r.timeline.sort(key=lambda t: t["ts"] or 0)
        return self.r


def build(events):
    """A Report of an iterable of event dicts (a non-dict: a line that was not JSON)."""
    b = Builder()
    for d in events:
        b.add(d)
    return b.finish()


def walk(report, limit=None):
    """(depth, Process) of the tree, depth first, children in order of
    their fork; iterative (a chain of forks may be deeper than Python's
    recursion). limit: at most this many."""
    stack = [(0, k) for k in reversed(report.roots)]
    n = 0
    while stack and (limit is None or n < limit):
        depth, key = stack.pop()
        p = report.processes[key]
        yield depth, p
        n += 1
        stack.extend((depth + 1, c) for c in reversed(p.children))


# ---------------------------------------------------------------- shared text

def _when(ts):
    if not isinstance(ts, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def _rel(report, ts):
    base = report.first_ts        # the start event's: the agent's start (the set-up before it is not counted)
    if not isinstance(ts, (int, float)) or not isinstance(base, (int, float)):
        return "-"
    return f"+{ts - base:.3f}s"


def _command(report):
    return " ".join(str(a) for a in report.identity.get("command") or []) or "-"


def _exit_text(report):
    if not report.end:
        return "did not end in this log (still running, or agentwatch crashed)"
    out = f"exited {report.exit_status}"
    term = report.termination
    if term.get("reason") and term["reason"] != "exit":
        out += f", ended by the policy's termination: {term['reason']}"
        if term.get("condition"):
            out += f" ({term['condition']})"
    if report.end.get("killed_for"):
        out += f", killed for {report.end['killed_for']}"
    if report.end.get("stopped_by_signal"):
        out += f", stopped by signal {report.end['stopped_by_signal']}"
    return out


def identity_rows(report):
    """(label, text) of the run's identity, as both renderings show it."""
    i = report.identity
    started = i.get("start_time") or report.first_ts
    ended = report.last_ts if report.end else None
    took = f" ({ended - started:.2f} s)" if isinstance(started, (int, float)) and ended else ""
    return [("run id", report.run_id or "-"), ("agent", report.agent or "-"),
            ("command", _command(report)), ("user", f"{i.get('user', '-')} (uid {i.get('uid', '-')})"),
            ("host", f"{i.get('host', '-')}, kernel {i.get('kernel', '-')}"),
            ("cgroup", i.get("cgroup") or "-"),
            ("policy", f"{i.get('policy_name') or '-'} ({i.get('policy') or 'no policy file'})"),
            ("policy digest", i.get("policy_digest") or "-"),
            ("signer", i.get("signer") or "unsigned"),
            ("started", _when(started)), ("ended", _when(ended) + took),
            ("exit", _exit_text(report)),
            ("termination", (report.termination.get("reason") or "-") if report.end else "-"),
            ("log seal", (f"sealed by {report.sealed.get('host_key')} (check it: agentwatch log verify)"
                          if report.sealed else "not sealed"))]


def layers(report):
    """(layer, on, how) of the enforcement path the run got (run/enforcement.py records it)."""
    e = report.enforcement
    path = str(e.get("path") or "monitor-only").split("+")
    ns = e.get("namespaces") or []
    limits = e.get("limits_applied") or {}
    return [("Landlock", "landlock" in path, "filesystem and TCP ports, per process"),
            ("seccomp", "seccomp" in path, "syscall filter"),
            ("cgroup BPF", "cgroup-bpf" in path, "egress and sockets on the run's cgroup"),
            ("BPF LSM", "bpf-lsm" in path or bool(e.get("bpf_lsm")), "exec and denied files by inode"),
            ("egress guard", bool(e.get("egress_guard")), "TCP and DNS allowed by name"),
            ("namespaces", bool(ns), ", ".join(ns) or "the host's"),
            ("resource limits", bool(limits), ", ".join(f"{k} ({v})" for k, v in limits.items()) or "none")]


def drop_rows(report):
    """(name, value) of what was lost or folded: the end event's counters
    (else the last drops event's), lines not JSON, drops events."""
    src = report.end or (report.drops[-1] if report.drops else {})
    rows = [(k, src.get(k) or 0) for k in DROP_COUNTERS if k in src or k in ("lost_events", "lost_stash")]
    bus = (report.end.get("bus") or {}).get("missed")
    if bus is not None:
        rows.append(("bus_missed", bus))
    rows += [("drops_events", len(report.drops)), ("bad_lines", report.bad_lines)]
    for layer, c in sorted((report.end.get("kernel_denials") or {}).items()):
        if isinstance(c, dict):
            rows += [(f"{layer}.{k}", v) for k, v in sorted(c.items()) if isinstance(v, int)]
    return rows


def _counts(counter):
    return sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))


# ---------------------------------------------------------------- terminal

def _text_tree(report, limit=TEXT_PROCESSES):
    """(the branch drawing before it, Process), depth first, at most limit."""
    stack = [("", "", k) for k in reversed(report.roots)]
    n = 0
    while stack and n < limit:
        lead, indent, key = stack.pop()
        p = report.processes[key]
        yield lead, p
        n += 1
        kids = p.children
        for i, c in enumerate(reversed(kids)):
            last = i == 0
            stack.append((indent + ("└─ " if last else "├─ "), indent + ("   " if last else "│  "), c))


def _wrap(text, width, indent):
    """text as lines of at most width (None: one line), continued indent spaces in."""
    if not width or len(text) <= width:
        return [text]
    return textwrap.wrap(text, width, subsequent_indent=" " * indent, break_on_hyphens=False,
                         drop_whitespace=True) or [text]


def render_text(report, color=False, width=None):
    """The terminal summary: identity, enforcement, the process tree, totals,
    violations; lines longer than width (a terminal's columns) wrap, indented."""
    red, dim, bold, off = ("\033[1;31m", "\033[2m", "\033[1m", "\033[0m") if color else ("",) * 4
    out = []

    def add(text, indent=0, style="", label=None):
        """text wrapped; style colours each line, or only label (its start) in bold."""
        for i, line in enumerate(_wrap(text, width, indent)):
            if label and i == 0 and line.startswith(label):
                line = f"{bold}{label}{off}{line[len(label):]}"
            elif style:
                line = f"{style}{line}{off}"
            out.append(line)

    add(f"run {clean(report.run_id)} ({clean(report.agent)})", style=bold)
    for label, text in identity_rows(report)[2:]:
        add(f"  {label:<14} {clean(text)}", 17)
    e = report.enforcement
    on = [name for name, used, _ in layers(report) if used]
    add(f"  {'enforcement':<14} {clean(e.get('path') or 'monitor-only')}; "
        f"kernel holds: {', '.join(e.get('enforced') or []) or 'nothing'}; layers: {', '.join(on) or 'none'}", 17)
    for x in e.get("downgrades") or []:
        add(f"  {'downgrade':<14} {clean(x)}", 17)
    out.append("")
    add(f"processes ({report.process_count})", style=bold)
    shown = 0
    for lead, p in _text_tree(report):
        shown += 1
        c = p.lists
        bits = [p.exit or "running"]
        bits += [f"{len(c[n].items) + c[n].more} {n}" for n in ("files", "connections", "flows", "llm")
                 if c[n].items]
        tail = f" [{', '.join(bits)}]"
        v = f" {p.violations} violation(s)" if p.violations else ""
        head = f"  {lead}{p.pid} "
        room = max(20, (width or 10**6) - len(head) - len(tail) - len(v))
        title = clean(p.title)[:min(100, room)]
        out.append(f"{head}{title}{dim}{tail}{off}" + (f"{red}{v}{off}" if v else ""))
    if report.process_count > shown:
        out.append(f"  +{report.process_count - shown} more processes (the HTML report lists more)")
    out.append("")
    events = f"events {sum(report.kinds.values())}"
    add(f"{events}: " + ", ".join(f"{clean(k)} {n}" for k, n in _counts(report.kinds)), 2, label=events)
    cats = ", ".join(f"{clean(k)} {n}" for k, n in _counts(report.by_category)) or "none"
    add(f"violations {report.violations}: {cats}", 2, label=f"violations {report.violations}")
    if report.by_rule:
        add("  rules: " + ", ".join(f"{clean(k)} {n}" for k, n in _counts(report.by_rule)), 4)
    denials = f"denials {report.denials}"
    add(denials + (": " + ", ".join(f"{clean(k)} {n}" for k, n in _counts(report.denials_by_rule))
                   if report.denials else ""), 2, label=denials)
    lost = f"lost {report.lost}"
    counters = ", ".join(f"{k} {v}" for k, v in drop_rows(report) if v)
    add(lost + (f"; counters: {counters}" if counters else ""), 2, label=lost)
    if report.timeline:
        out.append("")
        add("timeline", style=bold)
        for t in report.timeline:
            add(f"  {_rel(report, t['ts'])} pid {t['pid']} {clean(t['text'])}", 6,
                style=red if t["kind"] == "violation" else "")
        if report.timeline_more:
            out.append(f"  +{report.timeline_more} more")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d232a;background:#f4f6f8}
main{max-width:1200px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 10px;border-bottom:2px solid #d5dbe1;padding-bottom:4px}
.sub{color:#5b6670;margin-bottom:16px}
code,.mono{font:12.5px/1.4 ui-monospace,"DejaVu Sans Mono",monospace;word-break:break-all}
table{border-collapse:collapse;background:#fff;width:100%}
td,th{padding:4px 10px;border-bottom:1px solid #e6eaee;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600} td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.id th{width:150px;background:#fff;color:#5b6670;font-weight:500}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{background:#fff;border:1px solid #d5dbe1;border-radius:8px;padding:10px 18px;min-width:120px}
.card b{display:block;font-size:26px} .card.bad b{color:#b3261e} .card.warn b{color:#a15c00}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:14px}
.chip{display:inline-block;border-radius:12px;padding:2px 10px;margin:2px 4px 2px 0;font-size:12.5px;border:1px solid}
.on{background:#e5f4ea;border-color:#78b98a;color:#1c5a2e} .off{background:#f1f1f1;border-color:#c8c8c8;color:#777}
.viol{color:#b3261e;font-weight:600} .denied{background:#fdecea}
ul.tree{list-style:none;padding-left:18px;margin:0;border-left:1px dashed #c5ccd3}
ul.tree.top{border-left:0;padding-left:0}
li.proc{margin:4px 0} details>summary{cursor:pointer}
.proc>details>summary{background:#fff;border:1px solid #d5dbe1;border-radius:6px;padding:3px 8px}
.what{margin:4px 0 6px 18px;font-size:13px} .what h4{margin:6px 0 2px;font-size:12.5px;color:#5b6670}
.what ul{margin:0;padding-left:18px} .what h4{display:inline} .more{color:#5b6670;font-style:italic}
.dim{color:#5b6670} .err{color:#a15c00} td.when{white-space:nowrap}
"""


def _e(text):
    return html.escape(str(text), quote=True)


def _table(rows, head, attr):
    """A two-column count table; attr: the data- attribute naming each count."""
    body = "".join(f'<tr><td class="mono">{_e(k)}</td><td class="n" data-{attr}="{_e(k)}">{n}</td></tr>'
                   for k, n in rows) or '<tr><td colspan="2" class="dim">none</td></tr>'
    return f'<table><tr><th>{_e(head[0])}</th><th class="n">{_e(head[1])}</th></tr>{body}</table>'


def _proc_html(p):
    c = p.lists
    parts = []
    for name, label in (("execs", "execs"), ("files", "files"), ("connections", "connections"),
                        ("flows", "egress-guard flows"), ("llm", "LLM calls")):
        items = c[name].items.values()
        if not items:
            continue
        lis = []
        for it in items:
            if name == "execs":
                text = it["argv"] or it["filename"]
                err = f' <span class="err">{_e(it["error"])}</span>' if it.get("error") else ""
                lis.append(f'<li><code>{_e(text)}</code>{err}</li>')
            elif name == "files":
                err = f' <span class="err">{_e(", ".join(sorted(it["errors"])))}</span>' if it["errors"] else ""
                lis.append(f'<li><code>{_e(it["path"])}</code> <span class="dim">'
                           f'{_e(",".join(sorted(str(o) for o in it["ops"])))} x{it["count"]}</span>{err}</li>')
            elif name == "connections":
                err = f' <span class="err">{_e(", ".join(sorted(it["errors"])))}</span>' if it["errors"] else ""
                lis.append(f'<li><code>{_e(it["op"])} {_e(it["family"])} {_e(it["where"])}</code> '
                           f'<span class="dim">x{it["count"]}</span>{err}</li>')
            else:
                lis.append(f'<li><code>{_e(it["text"])}</code></li>')
        if c[name].more:
            lis.append(f'<li class="more" data-more="{name}">+{c[name].more} more</li>')
        # files are many and dull: folded, one click away; the rest shown
        parts.append(f'<details{"" if name == "files" else " open"}><summary><h4>{label} '
                     f'({len(c[name].items) + c[name].more})</h4></summary><ul>{"".join(lis)}</ul></details>')
    viol = f' <span class="viol">{p.violations} violation(s)</span>' if p.violations else ""
    return (f'<details open><summary><b>{p.pid}</b> <code>{_e(p.title[:160])}</code> '
            f'<span class="dim">{_e(p.exit or "running")}</span>{viol}</summary>'
            f'<div class="what">{"".join(parts) or "<span class=dim>nothing else logged</span>"}</div>')


def _tree_html(report):
    out, depth, shown = ['<ul class="tree top">'], 0, 0
    for d, p in walk(report, HTML_PROCESSES):
        while depth > d:                      # close the deeper levels
            out.append("</details></li></ul>")
            depth -= 1
        if d > depth:                         # first child: open a level inside the parent's <li>
            out.append('<ul class="tree">')
            depth = d
        elif shown:
            out.append("</details></li>")
        out.append(f'<li class="proc" data-pid="{p.pid}">{_proc_html(p)}')
        shown += 1
    if shown:
        out.append("</details></li>")
    out.append("</ul></details></li>" * depth + "</ul>")
    if report.process_count > shown:
        out.append(f'<p class="more" data-more="processes">+{report.process_count - shown} more '
                   f'processes not drawn (counted in the totals)</p>')
    return "".join(out)


def render_html(report):
    """One self-contained page: inline CSS, no scripts, nothing fetched."""
    e = report.enforcement
    ident = "".join(f'<tr><th>{_e(k)}</th><td class="mono" data-identity="{_e(k)}">{_e(v)}</td></tr>'
                    for k, v in identity_rows(report))
    chips = "".join(f'<span class="chip {"on" if used else "off"}" data-layer="{_e(name)}" '
                    f'title="{_e(how)}">{_e(name)}: {"on" if used else "off"}</span>'
                    for name, used, how in layers(report))
    notes = "".join(f"<li>downgrade: {_e(x)}</li>" for x in e.get("downgrades") or [])
    notes += "".join(f"<li>note: {_e(x)}</li>" for x in e.get("notes") or [])
    total = sum(report.kinds.values())

    def card(label, ident_, value, cls=""):
        return f'<div class="card {cls}">{_e(label)}<b id="{ident_}">{value}</b></div>'
    cards = (card("events", "total-events", total) + card("processes", "total-processes", report.process_count)
             + card("violations", "total-violations", report.violations, "bad" if report.violations else "")
             + card("denials", "total-denials", report.denials, "bad" if report.denials else "")
             + card("lost", "total-lost", report.lost, "warn" if report.lost else ""))
    rows = []
    for t in report.timeline:
        cls = ' class="denied"' if t.get("denied") else ""
        rows.append(f'<tr{cls} data-timeline="{_e(t["kind"])}"><td class="mono when">{_e(_rel(report, t["ts"]))}</td>'
                    f'<td class="n">{_e(t["pid"])}</td><td class="mono">{_e(t["comm"] or "")}</td>'
                    f'<td>{_e(t["action"] or "")}{" (refused)" if t.get("denied") else ""}</td>'
                    f'<td class="mono">{_e(t["text"])}</td></tr>')
    if report.timeline_more:
        rows.append(f'<tr><td colspan="5" class="more" data-more="timeline">+{report.timeline_more} more</td></tr>')
    timeline = ('<table><tr><th>when</th><th class="n">pid</th><th>comm</th><th>action</th><th>what</th></tr>'
                + ("".join(rows) or '<tr><td colspan="5" class="dim">no violations</td></tr>') + "</table>")
    llm = ""
    if report.run_llm.items:
        lis = "".join(f"<li><code>{_e(it['text'])}</code></li>" for it in report.run_llm.items.values())
        more = f'<li class="more">+{report.run_llm.more} more</li>' if report.run_llm.more else ""
        llm = ("<h2>LLM calls of the run</h2><p class=dim>The gateway names the run (its socket's cgroup), "
               f"not a process.</p><ul>{lis}{more}</ul>")
    title = f"agentwatch report: {report.agent or '?'} {report.run_id or ''}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>{_e(title)}</title><style>{_CSS}</style></head>
<body><main>
<h1>{_e(report.agent or "?")} <span class="dim mono">{_e(report.run_id or "")}</span></h1>
<div class="sub">{_e(_command(report))} &middot; {_e(_exit_text(report))}</div>
<div class="cards">{cards}</div>
<h2>Run</h2><table class="id">{ident}</table>
<h2>Enforcement</h2>
<p>path <code id="enforcement-path">{_e(e.get("path") or "monitor-only")}</code>; the kernel holds:
<b>{_e(", ".join(e.get("enforced") or []) or "nothing")}</b></p><p>{chips}</p>
<ul>{notes}</ul>
<h2>Violations and denials</h2>{timeline}
<h2>Totals</h2><div class="grid">
<div><h3>events by kind</h3>{_table(_counts(report.kinds), ("kind", "events"), "kind")}</div>
<div><h3>violations by category</h3>{_table(_counts(report.by_category), ("category", "violations"), "category")}
<h3>by rule</h3>{_table(_counts(report.by_rule), ("rule", "violations"), "rule")}</div>
<div><h3>denials by rule</h3>{_table(_counts(report.denials_by_rule), ("rule", "denials"), "denial-rule")}
<h3>drops and counters</h3>{_table(drop_rows(report), ("counter", "value"), "drop")}</div>
</div>
<h2>Processes ({report.process_count})</h2>{_tree_html(report)}
{llm}
<p class="dim">{report.lines} log lines read; made by agentwatch report.</p>
</main></body></html>
"""
