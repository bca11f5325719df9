"""`agentwatch report --html` of a real run, rendered by headless Chromium:
the numbers in the rendered DOM are those the run's log says, counted here
straight from its JSON (events per kind, violations, drops, processes)."""
import collections
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

import pytest

from conftest import aw, read_events

pytestmark = pytest.mark.kernel
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(*args, timeout=120):
    """Chromium with a profile of its own, thrown away after."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is not installed (scripts/setup.sh test installs Debian's chromium)")
    profile = tempfile.mkdtemp(prefix="aw-chromium-")
    try:
        return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


class Marked(HTMLParser):
    """The text of every element with an id or a data- attribute of those the report marks."""
    MARKS = ("data-kind", "data-category", "data-rule", "data-drop", "data-denial-rule")

    def __init__(self):
        super().__init__()
        self.ids, self.data = {}, collections.defaultdict(dict)
        self._open = []          # [(key, text parts)] of marked elements still open
        self.pids = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "li" and "data-pid" in a:
            self.pids.append(int(a["data-pid"]))
        key = ("id", a["id"]) if "id" in a else next(((m, a[m]) for m in self.MARKS if m in a), None)
        self._open.append((tag, key, []))

    def handle_data(self, data):
        for _, key, parts in self._open:
            if key:
                parts.append(data)

    def handle_endtag(self, tag):
        while self._open:
            t, key, parts = self._open.pop()
            if key:
                text = "".join(parts).strip()
                if key[0] == "id":
                    self.ids[key[1]] = text
                else:
                    self.data[key[0]][key[1]] = text
            if t == tag:
                break


def test_report_html_in_chromium_matches_the_log(state_dir, tmp_path):
    events_file = tmp_path / "events.jsonl"
    p = aw("run", "--no-daemon", "--policy", "policies/coding-agent.yaml", "--events", str(events_file),
           "--", "examples/demo-agent.sh")
    assert p.returncode == 0, p.stderr
    (run_id,) = os.listdir(state_dir / "runs")
    log = read_events(state_dir / "runs" / run_id / "events.jsonl")

    page = tmp_path / "report.html"
    r = aw("report", run_id[:15], "--html", str(page))
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    dom = chromium("--dump-dom", f"file://{page}")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "total-events" in dom.stdout, dom.stdout[:2000]
    m = Marked()
    m.feed(dom.stdout)

    # the numbers, counted here from the log's JSON
    kinds = collections.Counter(e["kind"] for e in log)
    violations = [e for e in log if e["kind"] == "violation"]
    end = next(e["detail"] for e in log if e["kind"] == "lifecycle" and e["phase"] == "end")
    start = next(e["detail"] for e in log if e["kind"] == "lifecycle" and e["phase"] == "start")
    pids = ({start["root_pid"]} | {e["child"] for e in log if e["kind"] == "fork"}
            | {e["pid"] for e in log if e["kind"] not in ("lifecycle", "llm", "msg") and e["pid"] > 0})

    assert int(m.ids["total-events"]) == len(log)
    assert {k: int(v) for k, v in m.data["data-kind"].items()} == dict(kinds)
    assert int(m.ids["total-violations"]) == sum(v["count"] for v in violations) \
        == end["violations"]["violations"]
    by_rule = collections.Counter()
    for v in violations:
        by_rule[v["rule"]] += v["count"]
    assert {k: int(v) for k, v in m.data["data-rule"].items()} == dict(by_rule) == end["violations"]["by_rule"]
    assert {k: int(v) for k, v in m.data["data-category"].items()} == end["violations"]["by_category"]
    for name in ("lost_events", "lost_stash", "unmatched_repeats", "records_submitted", "records_received"):
        assert int(m.data["data-drop"][name]) == end[name], name
    assert int(m.ids["total-lost"]) == end["lost_events"] + end["lost_stash"] + end["unmatched_repeats"]
    assert int(m.ids["total-processes"]) == len(pids)
    assert sorted(m.pids) == sorted(pids)                # every process drawn in the tree, once
    assert m.ids["enforcement-path"] == start["enforcement"]["path"]
    assert dom.stdout.count('class="proc"') == len(pids)

    # the terminal summary of the same run, from the same lookup
    t = aw("report", run_id)
    assert t.returncode == 0, t.stderr
    assert f"processes ({len(pids)})" in t.stdout
    assert f"violations {end['violations']['violations']}" in t.stdout
    shot = tmp_path / "report.png"
    s = chromium(f"--screenshot={shot}", "--window-size=1280,1600", f"file://{page}")
    assert s.returncode == 0 and shot.stat().st_size > 10000, s.stderr[-2000:]
