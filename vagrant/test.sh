#!/usr/bin/env bash
# The whole suite inside the Vagrant VM, on its own kernel booted with BPF LSM
# (vagrant/README.md):
#
#   sudo /agentwatch/vagrant/test.sh [PYTEST_ARGS...]
#
# 1. scripts/setup.sh test with AGENTWATCH_SKIP_VM=1: unit, kernel and
#    adversarial suites on this kernel, with AGENTWATCH_EXPECT_BPF_LSM=1 so that
#    every escape attempt must run, and assert, the BPF LSM path
#    (tests/adversarial/advkit.py) rather than quietly testing the fallback.
#    tests/vm is skipped: it boots Debian's kernel under QEMU to get a BPF LSM
#    kernel, which this VM already is (and its set-up installs Debian's
#    linux-image-amd64, which Ubuntu does not have).
# 2. The BPF LSM layer's own tests (tests/vm/lsm.conf AGENTWATCH_LSM_LAYER_TESTS),
#    which tests/vm would have run in its guest, here on this kernel.
# Exit status: 0 when both passed, else the first failing step's.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AGENTWATCH_VENV:-$REPO/.venv}"
say() { printf 'vagrant-test: %s\n' "$*" >&2; }
# shellcheck source=../scripts/lib.sh
. "$REPO/scripts/lib.sh"
# shellcheck source=../tests/vm/lsm.conf
. "$REPO/tests/vm/lsm.conf"

lsm_active bpf || { say "error: BPF LSM is not active (lsm: $(cat /sys/kernel/security/lsm)); run 'vagrant provision' (vagrant/README.md)"; exit 1; }

set +e
AGENTWATCH_SKIP_VM=1 AGENTWATCH_EXPECT_BPF_LSM=1 bash "$REPO/scripts/setup.sh" test "$@"
suite=$?
cd "$REPO"
# shellcheck disable=SC2086   # a space-separated list of paths
AGENTWATCH_VM_GUEST=1 AGENTWATCH_EXPECT_BPF_LSM=1 "$VENV/bin/python" -m pytest -ra $AGENTWATCH_LSM_LAYER_TESTS
layer=$?
set -e
say "whole suite (BPF LSM path): exit $suite; BPF LSM layer's own tests: exit $layer"
[ "$suite" -ne 0 ] && exit "$suite"
exit "$layer"
