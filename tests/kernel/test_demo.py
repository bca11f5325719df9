"""The README's first command: scripts/demo.sh (what `scripts/setup.sh demo`
runs), for real, on this checkout's CLI. Its agent is refused in the kernel
and killed at the SSH key, and the whole demo reads on one screen."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.kernel
SCREEN_LINES = 60     # rows of a terminal; the report's long lines wrap on a narrow one


def test_the_demo_shows_what_the_agent_did_and_what_the_kernel_denied(state_dir, tmp_path):
    cli = tmp_path / "agentwatch"
    cli.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m cli.main \"$@\"\n")
    cli.chmod(0o755)
    r = subprocess.run(["bash", os.path.join(REPO, "scripts", "demo.sh")], cwd=REPO,
                       env=dict(os.environ, AGENTWATCH=str(cli)), capture_output=True, text=True,
                       timeout=300)
    out = r.stderr + r.stdout
    assert r.returncode == 0, out
    lines = out.splitlines()
    assert len(lines) <= SCREEN_LINES, out
    # what was denied, in words, with the rule and what the kernel did
    assert re.search(r"DENIED connect tcp 127\.0\.0\.1:8081  network\.loopback  kernel: EACCES", out), out
    assert re.search(r"KILLED read \S+/home/\.ssh/id_rsa  filesystem\.deny \$\{HOME\}/\.ssh/\*\*", out), out
    assert "policy         sandboxed-agent" in out and "enforcement    landlock+seccomp+cgroup-bpf" in out
    # what it tried: the process tree names its commands
    for tried in ("cat /etc/os-release", "python3 main.py", "sleep 0.3"):
        assert tried in out, out
    # the totals are the run log's
    run_id = re.search(r"agentwatch report (\d{8}-\d{6}-[0-9a-f]{6}):", out).group(1)
    with open(state_dir / "runs" / run_id / "events.jsonl") as f:
        events = [json.loads(line) for line in f]
    assert f"events {len(events)}: " in out
    violations = sum(e.get("count", 1) for e in events if e["kind"] == "violation")
    assert f"violations {violations}: " in out and violations >= 2
    end = [e for e in events if e["kind"] == "lifecycle" and e["phase"] == "end"]
    assert end and end[0]["detail"]["exit_status"] == 137          # killed at the key
    demo_dir = os.path.dirname(re.search(r"demo agent: workspace (\S+)", out).group(1))
    assert demo_dir.startswith("/tmp/agentwatch-demo.") and not os.path.exists(demo_dir)
