#!/usr/bin/env bash
# The demo: a stand-in coding agent (examples/demo-agent.sh) in the shipped
# execute-only sandbox, policies/sandboxed-agent.yaml, whose every section the
# kernel holds; then, on one screen, the run's report (agentwatch report):
# who ran what under which policy, the process tree (what the agent tried),
# the timeline of what was denied or killed, and the totals, every number
# counted from the run log. Every event: agentwatch tail --run ID --no-follow.
#
# The agent gets a workspace and a home of its own under a fresh temporary
# directory, with a stand-in SSH key (a fixture: no real key is read), and
# runs from a copy in its workspace (the sandbox reads nothing else of it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
AW="${AGENTWATCH:-$ROOT/.venv/bin/agentwatch}"
POLICY="$ROOT/policies/sandboxed-agent.yaml"
DEMO="$(mktemp -d /tmp/agentwatch-demo.XXXXXX)"
trap 'rm -rf "$DEMO"' EXIT
mkdir -p "$DEMO/ws" "$DEMO/home/.ssh" "$DEMO/tmp"
echo "-----BEGIN OPENSSH PRIVATE KEY----- a stand-in for the demo" > "$DEMO/home/.ssh/id_rsa"
chmod 600 "$DEMO/home/.ssh/id_rsa"
cp "$ROOT/examples/demo-agent.sh" "$DEMO/ws/agent.sh"
EVENTS="$DEMO/events.jsonl"
PLAN_LINES='^agentwatch: (enforcement|downgrade|namespaces|/dev|added beyond the policy|filesystem\.exec|network|limits|mounts)[: ]'

echo "== agentwatch run --policy policies/sandboxed-agent.yaml -- sh agent.sh (examples/demo-agent.sh)" >&2
set +e
# --allow-downgrade: a kernel without BPF LSM cannot mask the wildcard rule
# '**/.env'; agentwatch kills an open of such a name in the kernel instead,
# and says so (the 'downgrade' line below)
# (the sandbox's plan lines are left out here: the report below shows its
# enforcement; `agentwatch run` prints them in full)
HOME="$DEMO/home" TMPDIR="$DEMO/tmp" WORKSPACE="$DEMO/ws" \
    "$AW" run --policy "$POLICY" --workspace "$DEMO/ws" --allow-downgrade --events "$EVENTS" \
    -- /bin/sh "$DEMO/ws/agent.sh" 2>&1 >/dev/null | grep -v -E "$PLAN_LINES" >&2
rc=${PIPESTATUS[0]}
set -e
RUN_ID="$(head -n 1 "$EVENTS" | sed -n 's/.*"run_id": *"\([^"]*\)".*/\1/p')"
echo "== the agent exited $rc; agentwatch report $RUN_ID:" >&2
"$AW" report "$RUN_ID"
echo "== every event: agentwatch tail --run $RUN_ID --no-follow;" \
     "a page: agentwatch report $RUN_ID --html report.html" >&2
