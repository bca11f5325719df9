#!/usr/bin/env bash
# Vagrant provisioning, step 2 (after the reboot): check that the kernel came
# up with the LSMs tests/vm/lsm.conf requires, then the README's set-up
# (scripts/setup.sh), nothing else.
set -euo pipefail

REPO=/agentwatch
say() { printf 'provision: %s\n' "$*" >&2; }
# shellcheck source=../scripts/lib.sh
. "$REPO/scripts/lib.sh"
# shellcheck source=../tests/vm/lsm.conf
. "$REPO/tests/vm/lsm.conf"

for l in ${AGENTWATCH_LSM_REQUIRED//,/ }; do
    lsm_active "$l" || { say "error: LSM $l is not active (lsm: $(cat /sys/kernel/security/lsm), cmdline: $(cat /proc/cmdline)); see vagrant/README.md"; exit 1; }
done
say "active LSMs: $(cat /sys/kernel/security/lsm)"
bash "$REPO/scripts/setup.sh"
echo "agentwatch ready: vagrant ssh -c 'sudo /agentwatch/vagrant/test.sh' | 'sudo /agentwatch/scripts/setup.sh demo'"
