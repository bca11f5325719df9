"""Issue #5, violation under flood: records a verdict depends on travel a
ring buffer of their own (bpf/common.bpf.c, bpf/priority.bpf.c), so a benign
flood that overflows the bulk ring cannot make a violation go unreported."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, read_events

pytestmark = pytest.mark.kernel

FLOODS = 8            # violations, each after its own flood
FLOOD_N = 20_000      # opens per flood: ~200x what the small bulk ring below holds


def test_violations_in_a_flood_are_all_reported(state_dir, tmp_path, cbin):
    flood = cbin("flood_secrets")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    paths = []
    for i in range(FLOODS):
        p = secrets / f"key{i}"
        p.write_text("not a key\n")
        paths.append(str(p))
    work = tmp_path / "work"
    work.mkdir()
    (work / ".env").write_text("TOKEN=x\n")
    policy = tmp_path / "flood.yaml"
    policy.write_text(f"""apiVersion: agentwatch/v1
kind: AgentPolicy
metadata: {{name: flood}}
filesystem:
  deny: ["{secrets}/**", "**/.env"]
""")
    events_path = tmp_path / "events.jsonl"
    # one run on a 64 KiB bulk ring (~100 file records): the floods overflow
    # it over and over; the absolute paths are routed by the deny prefix, the
    # relative .env (the cwd is not known in BPF) by its basename
    argv = [flood, str(FLOOD_N)] + paths + [".env"]
    script = f"""
import json, sys
sys.path.insert(0, {REPO!r})
from agentwatch.run import Run, RunOptions
run = Run(RunOptions(argv={argv!r}, policy_path={str(policy)!r}, cwd={str(work)!r},
                     events_path={str(events_path)!r}, ringbuf_pages=16))
print(json.dumps({{"exit": run.execute()}}))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["exit"] == 0, "the agent could not open its targets"
    events = read_events(events_path)
    end = [e for e in events if e["kind"] == "lifecycle" and e["phase"] == "end"][0]["detail"]
    rings = end["rings"]
    # the flood really overflowed the bulk ring, and not the priority ring
    assert rings["bulk"]["lost"] > FLOODS * FLOOD_N // 2, rings
    assert rings["priority"]["lost"] == 0, rings
    # exact accounting: the bulk ring had exactly the /dev/null and /dev/zero opens; the
    # priority ring the violations, exec entry and return, exit and the
    # launcher's chdir into the cwd, none lost
    assert rings["bulk"]["submitted"] + rings["bulk"]["lost"] == (FLOODS + 1) * FLOOD_N
    assert rings["priority"]["submitted"] >= FLOODS + 1 + 3
    assert end["records_submitted"] + end["lost_events"] == sum(
        r["submitted"] + r["lost"] for r in rings.values())
    assert all(r["received"] == r["submitted"] for r in rings.values()), rings
    reported = {v["detail"]["path"] for v in events
                if v["kind"] == "violation" and v["rule"] == "filesystem.deny"}
    assert reported == set(paths) | {str(work / ".env")}


def test_kill_on_open_lands_before_the_open_returns(state_dir, tmp_path):
    """A deny path the kernel cannot refuse (a `**/.env` glob is not
    maskable) under a kill action: the sys_exit program sends SIGKILL at the
    open's return, so the agent never reads the file, even though it would
    print it at once and userspace could not kill it that fast. Paths that
    only look alike (.envrc, ~/.sshfoo) are left alone."""
    work = tmp_path / "work"
    work.mkdir()
    (work / ".env").write_text("TOKEN=do-not-leak\n")
    (work / ".envrc").write_text("ok\n")
    home = tmp_path / "home"
    (home / ".sshfoo").mkdir(parents=True)
    (home / ".sshfoo" / "x").write_text("ok\n")
    policy = tmp_path / "kill.yaml"
    policy.write_text(f"""apiVersion: agentwatch/v1
kind: AgentPolicy
metadata: {{name: kill-on-open}}
filesystem:
  read: ["/**"]
  write: ["{tmp_path}/**"]
  exec: ["/usr/**"]
  deny: ["**/.env", "{home}/.ssh/**"]
on_violation: {{default: alert, rules: {{filesystem.deny: kill}}}}
""")
    out = tmp_path / "out.txt"
    events_path = tmp_path / "events.jsonl"
    # python reads and writes in one go after open(): no window for a userspace kill
    agent = (f"import sys\nopen({str(out)!r}, 'w').write(open('.envrc').read() + "
             f"open({str(home / '.sshfoo' / 'x')!r}).read())\n"
             f"data = open('.env').read()\nopen({str(out)!r}, 'a').write(data)\n")
    r = subprocess.run([sys.executable, "-m", "cli.main", "run", "--policy", str(policy),
                        "--allow-downgrade", "--events", str(events_path), "--", "/usr/bin/python3", "-c", agent],
                       cwd=str(work), env=dict(__import__("os").environ, PYTHONPATH=REPO),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 137, r.stderr[-2000:]
    assert out.read_text() == "ok\nok\n"               # the look-alikes were read, .env never
    events = read_events(events_path)
    v = [e for e in events if e["kind"] == "violation" and e["rule"] == "filesystem.deny"]
    assert len(v) == 1 and v[0]["action"] == "kill", v
    assert v[0]["detail"]["path"] == str(work / ".env")
    assert v[0]["detail"]["kernel"].startswith("killed at the open's return"), v[0]["detail"]
    end = [e for e in events if e["kind"] == "lifecycle" and e["phase"] == "end"][0]["detail"]
    assert end["killed_in_kernel"] >= 1
