"""bench/pipeline.py (the monitor's per-event Python cost, README
"Performance") keeps working: it builds a Run by hand, so a new attribute
the per-event path reads breaks it (as `lsm` once did, unnoticed)."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("mode", ["burst", "mix"])
def test_pipeline_benchmark_runs_every_record_through(mode):
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", "pipeline.py"), "300", mode],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"N=300: ([\d.]+) us/event cpu.*lines=(\d+)", r.stdout)
    assert m and float(m.group(1)) > 0 and int(m.group(2)) >= 300, r.stdout
