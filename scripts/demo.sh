#!/usr/bin/env bash
# The demo: a stand-in coding agent under the shipped coding-agent policy,
# its events printed live, then its violations replayed from the run log.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
AW="${AGENTWATCH:-$ROOT/.venv/bin/agentwatch}"
EVENTS="$(mktemp /tmp/agentwatch-demo-events.XXXXXX.jsonl)"
echo "== agentwatch run --policy policies/coding-agent.yaml -- examples/demo-agent.sh" >&2
set +e
"$AW" run --policy "$ROOT/policies/coding-agent.yaml" --events "$EVENTS" --show -- "$ROOT/examples/demo-agent.sh"
rc=$?
set -e
RUN_ID="$(head -n 1 "$EVENTS" | "$ROOT/.venv/bin/python" -c 'import json,sys; print(json.loads(sys.stdin.readline())["run_id"])')"
echo "== agent exited $rc; $(wc -l < "$EVENTS") events in $EVENTS" >&2
echo "== violations (agentwatch tail --run $RUN_ID --violations --no-follow):" >&2
"$AW" tail --run "$RUN_ID" --violations --no-follow
echo "== event counts by kind:" >&2
"$ROOT/.venv/bin/python" -c 'import collections,json,sys; c=collections.Counter(json.loads(l)["kind"] for l in open(sys.argv[1])); print(dict(c))' "$EVENTS"
