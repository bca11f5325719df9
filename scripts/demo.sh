#!/usr/bin/env bash
# The demo: a stand-in coding agent under the shipped coding-agent policy,
# then, on one screen, what it tried, what was flagged or denied and the
# totals, every number counted from the run log (agentwatch/sinks/console.py
# summarize). Every event: agentwatch tail --run ID --no-follow.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
AW="${AGENTWATCH:-$ROOT/.venv/bin/agentwatch}"
PY="$ROOT/.venv/bin/python"
EVENTS="$(mktemp /tmp/agentwatch-demo-events.XXXXXX.jsonl)"
echo "== agentwatch run --policy policies/coding-agent.yaml -- examples/demo-agent.sh" >&2
set +e
"$AW" run --policy "$ROOT/policies/coding-agent.yaml" --events "$EVENTS" -- "$ROOT/examples/demo-agent.sh"
rc=$?
set -e
echo "== agent exited $rc; the run log, summarised ($EVENTS):" >&2
"$PY" -c 'import json, sys
from agentwatch.sinks.console import summarize
events = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print("\n".join(summarize(events)))
print("every event: agentwatch tail --run %s --no-follow" % events[0].get("run_id"))' "$EVENTS"
