"""Repeats (issue #5, bpf/common.bpf.c): identical file calls by one thread,
with no other record of it in between, are one record plus a count. The
log must still account for every call, in the thread's order."""
import os
import sys

import pytest

from conftest import aw, read_events

pytestmark = pytest.mark.kernel


def _lifecycle(events, phase):
    return next(e for e in events if e["kind"] == "lifecycle" and e["phase"] == phase)["detail"]


def _run_py(tmp_path, code, *args):
    agent = tmp_path / "agent.py"
    agent.write_text("import os, sys, threading, time\n"
                     "def opens(path, k, flags=os.O_RDONLY):\n"
                     "    for _ in range(k):\n"
                     "        try:\n"
                     "            os.close(os.open(path, flags, 0o644))\n"
                     "        except OSError:\n"
                     "            pass\n" + code)
    ev = tmp_path / "events.jsonl"
    r = aw("run", "--events", str(ev), *args, "--", sys.executable, str(agent), cwd=str(tmp_path),
           timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return read_events(ev)


def _lines(events, paths, tid=None):
    return [(e["path"], e["flags"], e["repeat"]) for e in events
            if e["kind"] == "file" and e["path"] in paths and (tid is None or e["tid"] == tid)]


def test_identical_opens_are_one_line_and_an_exact_count(state_dir, tmp_path, cbin):
    burst = cbin("burst")
    n = 100_000
    ev = tmp_path / "events.jsonl"
    r = aw("run", "--events", str(ev), "--", burst, str(n), "/dev/null", timeout=300)
    assert r.returncode == 0, r.stderr
    events = read_events(ev)
    end = _lifecycle(events, "end")
    lines = [e for e in events if e["kind"] == "file" and e["path"] == "/dev/null"]
    assert lines[0]["repeat"] is None and all(e["repeat"] for e in lines[1:]), lines
    assert sum(e["repeat"] or 1 for e in lines) == n
    assert end["repeated"] == n - 1 and end["unmatched_repeats"] == 0
    assert end["folded"] == n - 1      # the kernel's count of calls folded into counts written
    assert end["lost_events"] == 0
    # records: exec entry and return, exit, the first open and one per repeat line
    assert end["records_submitted"] == 3 + 1 + (len(lines) - 1)
    assert len(lines) - 1 <= 5, "a 100k burst takes well under 5 s here: one count a second at most"
    exit_ev = next(e for e in events if e["kind"] == "exit")
    assert lines[0]["ts"] <= lines[-1]["ts"] <= exit_ev["ts"]
    assert {k: lines[-1][k] for k in ("op", "abspath", "flags", "ret", "access")} == \
        {k: lines[0][k] for k in ("op", "abspath", "flags", "ret", "access")}


def test_only_the_same_call_in_a_row_is_folded_in_the_threads_order(state_dir, tmp_path):
    events = _run_py(tmp_path, """
opens("/dev/null", 50)
opens("/etc/hostname", 1)
opens("/dev/null", 30)
opens("/dev/null", 3, os.O_WRONLY)           # other flags: another call
opens("/nonexistent-aw/x", 4)                # failures fold too (same errno)
os.chdir("/dev")                             # a record of the thread: ends the run of calls
opens("/dev/null", 20)
opens("null", 5)                             # relative: never folded
opens("/dev/null", 2)
opens("/dev/zero", 1); opens("/dev/null", 1); opens("/dev/zero", 1)   # in turn: nothing to fold
""")
    root = _lifecycle(events, "start")["root_pid"]
    got = _lines(events, {"/dev/null", "/etc/hostname", "/nonexistent-aw/x", "null", "/dev/zero"}, root)
    ro, wo = os.O_RDONLY | os.O_CLOEXEC, os.O_WRONLY | os.O_CLOEXEC
    # Python's os.open adds O_CLOEXEC; the interpreter's own start-up opens other paths
    assert got == ([("/dev/null", ro, None), ("/dev/null", ro, 49), ("/etc/hostname", ro, None),
                    ("/dev/null", ro, None), ("/dev/null", ro, 29),
                    ("/dev/null", wo, None), ("/dev/null", wo, 2),
                    ("/nonexistent-aw/x", ro, None), ("/nonexistent-aw/x", ro, 3),
                    ("/dev/null", ro, None), ("/dev/null", ro, 19)]
                   + [("null", ro, None)] * 5
                   + [("/dev/null", ro, None), ("/dev/null", ro, 1),
                      ("/dev/zero", ro, None), ("/dev/null", ro, None), ("/dev/zero", ro, None)]), got
    failed = [e for e in events if e["kind"] == "file" and e["path"] == "/nonexistent-aw/x"]
    assert {e["error"] for e in failed} == {"ENOENT"}
    end = _lifecycle(events, "end")
    assert end["repeated"] == 49 + 29 + 2 + 3 + 19 + 1 and end["unmatched_repeats"] == 0


def test_threads_fold_their_own_calls(state_dir, tmp_path):
    events = _run_py(tmp_path, """
ts = [threading.Thread(target=opens, args=("/nonexistent-aw/x", 2000)) for _ in range(3)]
for t in ts: t.start()
for t in ts: t.join()
print(" ".join(str(t.native_id) for t in ts), file=open("tids", "w"))
""")
    # A failing open returns the same errno every time. A successful one
    # would not do here: the threads share one fd table, so the fd number
    # each gets (part of what must match) depends on how they interleave.
    tids = [int(t) for t in (tmp_path / "tids").read_text().split()]
    for tid in tids:
        lines = _lines(events, {"/nonexistent-aw/x"}, tid)
        assert sum(r or 1 for _, _, r in lines) == 2000, (tid, lines)
        # folded per thread: the others' calls in between do not break its
        # run; only the once-a-second count adds a line
        assert lines[0][2] is None and len(lines) <= 6, (tid, lines)


def test_a_long_run_of_calls_is_counted_once_a_second(state_dir, tmp_path):
    """A thread that keeps repeating does not hold its count back until it
    stops: a count goes out once a second."""
    events = _run_py(tmp_path, """
n, t0 = 0, time.monotonic()
while time.monotonic() - t0 < 2.6:
    opens("/dev/null", 100)
    n += 100
open("count", "w").write(str(n))
""")
    n = int((tmp_path / "count").read_text())
    lines = [e for e in events if e["kind"] == "file" and e["path"] == "/dev/null"
             and e["flags"] == os.O_RDONLY | os.O_CLOEXEC]
    assert sum(e["repeat"] or 1 for e in lines) == n
    # the first record, one count at ~1 s and ~2 s, the rest before "count" is opened
    assert len(lines) >= 4, [(e["ts"], e["repeat"]) for e in lines]
    spans = [b["ts"] - a["ts"] for a, b in zip(lines[1:], lines[2:])]
    assert all(0.9 < s < 1.5 for s in spans[:-1]), spans


def test_a_repeated_violation_counts_every_call(state_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    outside = tmp_path / "outside.txt"
    policy = tmp_path / "p.yaml"
    policy.write_text(f"""apiVersion: agentwatch/v1
kind: AgentPolicy
metadata: {{name: repeats}}
filesystem:
  write: ["{work}/**"]
on_violation: {{default: alert}}
""")
    events = _run_py(tmp_path, f"opens({str(outside)!r}, 10, os.O_WRONLY | os.O_CREAT)\n",
                     "--policy", str(policy))
    writes = [e for e in events if e["kind"] == "file" and e["path"] == str(outside)]
    assert [e["repeat"] for e in writes] == [None, 9], writes
    viol = [v for v in events if v["kind"] == "violation" and v["rule"] == "filesystem.write"]
    assert sum(v["count"] for v in viol) == 10, viol
    assert _lifecycle(events, "end")["violations"]["by_rule"]["filesystem.write"] == 10


def test_no_fold_writes_a_line_per_call(state_dir, tmp_path, cbin):
    burst = cbin("burst")
    ev = tmp_path / "events.jsonl"
    r = aw("run", "--no-fold", "--events", str(ev), "--", burst, "2000", "/dev/null", timeout=120)
    assert r.returncode == 0, r.stderr
    events = read_events(ev)
    lines = [e for e in events if e["kind"] == "file" and e["path"] == "/dev/null"]
    end = _lifecycle(events, "end")
    assert len(lines) + end["lost_events"] == 2000 and not any(e["repeat"] for e in lines)
    assert end["repeated"] == 0
