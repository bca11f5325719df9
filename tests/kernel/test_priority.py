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
from agentwatch.runner import Run, RunOptions
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
    # exact accounting: the bulk ring had exactly the /dev/null opens; the
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
