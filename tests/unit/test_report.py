"""agentwatch/sinks/report.py and `agentwatch report`: the Report of a
run's event dicts (process tree, totals, caps), its HTML (escaped,
self-contained) and text, and the CLI's lookup errors. No root, no kernel;
tests/kernel/test_report_html.py renders a real run's page in Chromium."""
import json
from html.parser import HTMLParser

import pytest

from agentwatch import api
from agentwatch.sinks import report as R
from cli.main import main
from test_cli import make_run

RUN = "20261204-100000-abcdef"
T0 = 1796400000.0


def ev(kind, pid, ts, **kw):
    return dict(kind=kind, ts=T0 + ts, run_id=RUN, agent="coder", pid=pid, tid=pid, ppid=kw.pop("ppid", 0),
                uid=1000, comm=kw.pop("comm", "sh"), **kw)


def start(**enforcement):
    return ev("lifecycle", 7, 0, comm="agentwatch", phase="start", detail={
        "run_id": RUN, "agent": "coder", "policy_name": "p", "policy_digest": "sha256:ab12",
        "user": "dev", "uid": 1000, "command": ["sh", "agent.sh"], "cgroup": "/sys/fs/cgroup/agentwatch/x",
        "start_time": T0 - 1, "root_pid": 100,
        "enforcement": dict({"path": "bpf-lsm+landlock+seccomp+cgroup-bpf", "enforced": ["filesystem"],
                             "downgrades": [], "notes": [], "namespaces": ["pid"],
                             "limits_applied": {"pids": "v2"}}, **enforcement)})


def end(**kw):
    return ev("lifecycle", 7, 9, comm="agentwatch", phase="end", detail=dict({
        "exit_status": 0, "events": 9, "violations": {"violations": 3}, "killed_for": None,
        "lost_events": 2, "lost_stash": 1, "unmatched_repeats": 0, "decode_errors": 0,
        "bus": {"missed": 0}, "kernel_denials": {"cgroup-bpf": {"denials": 1}},
        "termination": {"reason": "exit", "condition": None}}, **kw))


def sample():
    """root 100 forks 101 (execs cat, reads files) and 102 (forks 103, which connects)."""
    return [
        start(),
        ev("exec", 100, 0.1, filename="/bin/sh", argv=["sh", "agent.sh"]),
        ev("fork", 100, 0.2, child=101),
        ev("exec", 101, 0.3, ppid=100, comm="cat", filename="/bin/cat", argv=["cat", "/etc/passwd"]),
        ev("file", 101, 0.4, ppid=100, comm="cat", op="open", path="/etc/passwd", access=["read"]),
        ev("file", 101, 0.41, ppid=100, comm="cat", op="open", path="/etc/passwd", access=["read"], repeat=4),
        ev("file", 101, 0.42, ppid=100, comm="cat", op="open", path="/etc/shadow", error="EACCES"),
        ev("exit", 101, 0.5, ppid=100, comm="cat", code=0),
        ev("fork", 100, 0.6, child=102),
        ev("fork", 102, 0.7, ppid=100, child=103),
        ev("net", 103, 0.8, ppid=102, op="connect", family="inet", addr="10.0.0.1", port=443, error="EPERM"),
        ev("net", 103, 0.81, ppid=102, op="socket", family="inet"),
        ev("violation", 103, 0.8, ppid=102, category="network", rule="network.egress", action="deny",
           detail={"kernel": "denied (EPERM)", "addr": "10.0.0.1"}, count=1),
        ev("violation", 101, 0.42, category="filesystem", rule="filesystem.read", action="alert",
           detail={"kernel": "allowed"}, count=1),
        ev("violation", 103, 1.0, category="network", rule="network.egress", action="deny",
           detail={"repeat": True, "message": "1 more"}, count=1),
        ev("llm", 0, 1.1, api="openai", path="/v1/chat/completions", model="m", status=200),
        ev("flow", 103, 1.2, proto="tcp", name="pypi.org", source="sni", addr="1.2.3.4", port=443,
           decision="deny", reason="not allowed"),
        end(),
    ]


def test_process_tree_from_fork_exec_exit():
    r = R.build(sample())
    assert r.process_count == 4
    by_pid = {p.pid: p for p in r.processes.values()}
    assert [by_pid[100].key] == r.roots
    assert [r.processes[k].pid for k in by_pid[100].children] == [101, 102]
    assert [r.processes[k].pid for k in by_pid[102].children] == [103]
    cat = by_pid[101]
    assert cat.title == "cat /etc/passwd" and cat.exit == "code 0" and cat.comm == "cat"
    files = cat.lists["files"].items
    assert files["/etc/passwd"]["count"] == 6           # a folded line counts its repeats
    assert files["/etc/shadow"]["errors"] == {"EACCES"}
    conns = by_pid[103].lists["connections"].items
    assert list(conns) == [("connect", "inet", "10.0.0.1:443")]      # socket() is not a connection
    assert by_pid[103].lists["flows"].items and by_pid[103].violations == 1
    assert by_pid[102].exit is None                     # no exit logged: still running at the end
    assert [it["text"] for it in r.run_llm.items.values()][0].startswith("llm openai")


def test_totals_violations_denials_drops():
    events = sample()
    r = R.build(events)
    assert dict(r.kinds) == dict(__import__("collections").Counter(e["kind"] for e in events))
    assert r.violations == 3
    assert r.by_category == {"network": 2, "filesystem": 1}
    assert r.by_rule == {"network.egress": 2, "filesystem.read": 1}
    # the refused connect and its repeat line; the allowed read is not a denial
    assert r.denials == 2 and r.denials_by_rule == {"network.egress": 2}
    assert r.lost == 3 and r.exit_status == 0
    rows = dict(R.drop_rows(r))
    assert rows["lost_events"] == 2 and rows["lost_stash"] == 1 and rows["cgroup-bpf.denials"] == 1
    assert [t["rule"] for t in r.timeline] == ["filesystem.read", "network.egress", "network.egress"]  # by time
    assert json.loads(json.dumps(r.to_dict(), default=str))["process_count"] == 4


def test_refused_reads_the_kernel_evidence():
    for kernel, want in (("denied (EACCES)", True), ("killed (seccomp)", True), ("OOM-killed (memory limit)", True),
                         ("refused by the LLM gateway (HTTP 403)", True), ("allowed", False),
                         ("not refused: mapped PROT_EXEC", False),
                         ("passed on by the LLM gateway", False), ("", False)):
        assert R.refused({"detail": {"kernel": kernel}}) is want, kernel


def test_enforcement_layers():
    on = {name: used for name, used, _ in R.layers(R.build([start()]))}
    assert on == {"Landlock": True, "seccomp": True, "cgroup BPF": True, "BPF LSM": True,
                  "egress guard": False, "namespaces": True, "resource limits": True}
    on = {name: used for name, used, _ in R.layers(R.build([start(path="monitor-only", namespaces=[],
                                                                  limits_applied={})]))}
    assert not any(on.values())


def test_a_reused_pid_is_a_new_process():
    r = R.build([ev("fork", 100, 0, child=101), ev("exit", 101, 1, code=0),
                 ev("fork", 100, 2, child=101), ev("exec", 101, 3, filename="/bin/true", argv=["true"])])
    assert r.process_count == 3
    first, second = [p for p in r.processes.values() if p.pid == 101]
    assert first.exit == "code 0" and second.title == "true" and second.exit is None


def test_caps_bound_each_process_but_totals_stay_exact(monkeypatch):
    n = R.CAPS["files"] + 25
    events = [ev("file", 100, i * 0.001, op="open", path=f"/w/f{i}") for i in range(n)]
    events += [ev("exec", 100, 1 + i * 0.001, filename="/bin/x", argv=["x", str(i)])
               for i in range(R.CAPS["execs"] + 3)]
    r = R.build(events)
    files = r.processes[0].lists["files"]
    assert len(files.items) == R.CAPS["files"] and files.more == 25
    assert r.processes[0].lists["execs"].more == 3
    assert r.kinds["file"] == n
    page = R.render_html(r)
    assert '<li class="more" data-more="files">+25 more</li>' in page
    monkeypatch.setattr(R, "MAX_PROCESSES", 2)
    monkeypatch.setattr(R, "MAX_TIMELINE", 1)
    r = R.build([ev("fork", 100, i, child=200 + i) for i in range(5)]
                + [ev("violation", 100, 9, category="process", rule="process.exec", detail={})] * 3)
    assert r.process_count == 6 and len(r.processes) == 2
    assert r.violations == 3 and len(r.timeline) == 1 and r.timeline_more == 2


def test_deep_tree_renders_without_recursion():
    depth = 3000
    events = [ev("fork", 100 + i, i, child=101 + i) for i in range(depth)]
    r = R.build(events)
    assert r.process_count == depth + 1
    page = R.render_html(r)
    parser = _Tags()
    parser.feed(page)
    assert parser.stack == [] and parser.errors == []
    assert page.count('class="proc"') == depth + 1
    assert R.render_text(r).count("\n") > R.TEXT_PROCESSES


class _Tags(HTMLParser):
    """Checks that every element the page opens it closes, in order."""
    VOID = {"meta", "br", "hr", "img", "input", "link"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.scripts, self.attrs = [], [], 0, set()

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts += 1
        for name, value in attrs:
            self.attrs.add(name)
            if name.startswith("on") or (value or "").strip().lower().startswith("javascript:"):
                self.errors.append((tag, name, value))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(("unbalanced", tag, self.stack[-3:]))
        else:
            self.stack.pop()


def test_hostile_argv_and_paths_are_escaped():
    evil = '<script>alert(1)</script><img src=x onerror=alert(2)>"\''
    events = [start(downgrades=[evil]),
              ev("exec", 100, 0.1, comm=evil, filename=evil, argv=[evil, "\x1b[2J"]),
              ev("file", 100, 0.2, op="open", path=evil),
              ev("net", 100, 0.3, op="connect", family="unix", addr=evil),
              ev("violation", 100, 0.4, comm=evil, category="filesystem", rule=evil, detail={"path": evil}),
              ev(evil, 100, 0.5)]
    page = R.render_html(R.build(events))
    assert "<script" not in page.lower() and "<img" not in page.lower()
    assert "&lt;script&gt;" in page
    parser = _Tags()
    parser.feed(page)
    assert parser.errors == [] and parser.scripts == 0 and parser.stack == []
    # nothing fetched: no element with a URL, and a CSP that forbids it anyway
    assert not parser.attrs & {"src", "href", "action", "srcset", "data"}
    assert "default-src 'none'" in page
    text = R.render_text(R.build(events))
    assert "\x1b" not in text and "\\x1b[2J" in text


def test_numbers_are_marked_for_tests():
    page = R.render_html(R.build(sample()))
    assert '<b id="total-events">18</b>' in page
    assert '<b id="total-processes">4</b>' in page
    assert '<b id="total-violations">3</b>' in page
    assert '<b id="total-denials">2</b>' in page
    assert '<b id="total-lost">3</b>' in page
    assert 'data-kind="file">3<' in page and 'data-drop="lost_events">2<' in page
    assert 'data-rule="network.egress">2<' in page and 'data-category="network">2<' in page


def test_a_log_without_an_end():
    r = R.build([start(), ev("exec", 100, 1, filename="/bin/sh", argv=["sh"]), None])
    assert r.end == {} and r.bad_lines == 1 and r.exit_status is None
    assert "did not end" in R.render_text(r)
    assert "did not end" in R.render_html(r)


# ---------------------------------------------------------------- api and CLI

def test_api_report_by_prefix_file_and_progress(state_dir, tmp_path):
    make_run(RUN, "exited", sample())
    with open(api.log_path(RUN), "a") as f:
        f.write("not json\n")
    seen = []
    r = api.report(RUN[:12], progress=lambda done, size: seen.append((done, size)))
    assert r.run_id == RUN and r.process_count == 4 and r.bad_lines == 1
    assert seen and seen[-1][0] == seen[-1][1]
    assert api.report(api.log_path(RUN)).violations == 3
    assert api.render_report_html(r).startswith("<!DOCTYPE html>")
    assert "processes (4)" in api.render_report_text(r)


def test_cli_report_text_json_and_html(state_dir, tmp_path, capsys):
    make_run(RUN, "exited", sample())
    assert main(["report", RUN[:10]]) == 0
    out = capsys.readouterr().out
    assert "processes (4)" in out and "violations 3" in out and "└─" in out
    assert main(["report", "--json", RUN]) == 0
    assert json.loads(capsys.readouterr().out)["violations"] == 3
    page = tmp_path / "r.html"
    assert main(["report", RUN, "--html", str(page)]) == 0
    assert 'id="total-violations">3<' in page.read_text()
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("target", ["nope", "2026"])
def test_cli_report_unknown_or_ambiguous_is_one_line(state_dir, capsys, target):
    make_run(RUN, "exited", sample())
    make_run("20261204-110000-fedcba", "exited", sample())
    assert main(["report", target]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.startswith("Error: ") and "no single run" in err and len(err.strip().splitlines()) == 1


def test_terminal_text_wraps_to_the_width_and_keeps_every_word():
    long_arg = "x" * 30
    events = sample()
    events.insert(2, ev("exec", 100, 0.15, filename="/bin/sh", argv=["sh", "-c", " ".join([long_arg] * 8)]))
    events[0]["detail"]["enforcement"]["downgrades"] = ["filesystem.deny '**/.env': " + "detected only " * 12]
    r = R.build(events)
    wide = R.render_text(r)
    narrow = R.render_text(r, width=72)
    assert max(map(len, wide.splitlines())) > 72            # else the test shows nothing
    assert max(map(len, narrow.splitlines())) <= 72, narrow
    assert narrow.split() != wide.split() or narrow.count("\n") > wide.count("\n")
    # wrapping moves words, it drops none (but a process title, cut to fit its line)
    words = lambda text: [w for w in text.split() if set(w) != {"x"}]  # noqa: E731
    assert sorted(words(narrow)) == sorted(words(wide))
    assert "  downgrade      filesystem.deny '**/.env': detected only" in narrow
    assert "\n                 detected only" in narrow               # continued, indented
    coloured = R.render_text(r, color=True, width=72)
    assert "\033[1mevents " in coloured and "\033[1;31m" in coloured


def test_the_timeline_is_in_time_order():
    events = sample()
    late = ev("lifecycle", 7, 0.9, comm="agentwatch", phase="warning", detail={"message": "killing"})
    events.insert(-1, late)                                  # logged last, happened at 0.9
    r = R.build(events)
    assert [t["ts"] for t in r.timeline] == sorted(t["ts"] for t in r.timeline)
    assert [t["action"] for t in r.timeline][-2:] == ["warning", "deny"]
    assert "lost 3; counters: lost_events 2" in R.render_text(r)
