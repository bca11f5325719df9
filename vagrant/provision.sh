#!/usr/bin/env bash
# Vagrant provisioning: the README's set-up, nothing else.
set -euo pipefail
bash /agentwatch/scripts/setup.sh
echo "agentwatch ready: sudo /agentwatch/scripts/setup.sh demo | test"
