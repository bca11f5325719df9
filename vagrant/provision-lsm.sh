#!/usr/bin/env bash
# Vagrant provisioning, step 1 (before the reboot): put BPF LSM on the kernel
# command line through GRUB. lsm= replaces the kernel's built-in list, so it is
# the running kernel's own list (Ubuntu 24.04: lockdown,capability,landlock,
# yama,apparmor,...) with each LSM of AGENTWATCH_LSM_REQUIRED it lacks added
# (tests/vm/lsm.conf, the same source tests/vm boots its QEMU guest from):
# the distribution's LSMs stay, bpf is added. Idempotent.
#
#   provision-lsm.sh [REPO]     (as root; REPO defaults to /agentwatch)
# AGENTWATCH_GRUB_DROPIN and AGENTWATCH_LSM_FILE (the running list) and
# AGENTWATCH_UPDATE_GRUB (the command run after writing) exist for the tests.
set -euo pipefail

REPO="${1:-/agentwatch}"
DROPIN="${AGENTWATCH_GRUB_DROPIN:-/etc/default/grub.d/99-agentwatch-lsm.cfg}"
say() { printf 'provision-lsm: %s\n' "$*" >&2; }
# shellcheck source=../scripts/lib.sh
. "$REPO/scripts/lib.sh"
# shellcheck source=../tests/vm/lsm.conf
. "$REPO/tests/vm/lsm.conf"

running="$(tr -d '[:space:]' <"${AGENTWATCH_LSM_FILE:-/sys/kernel/security/lsm}")"
lsm="$(lsm_list "$running" "$AGENTWATCH_LSM_REQUIRED")"
mkdir -p "$(dirname "$DROPIN")"
# Sourced by update-grub after /etc/default/grub and the drop-ins before it
# (Ubuntu's 50-cloudimg-settings.cfg sets GRUB_CMDLINE_LINUX_DEFAULT): appended
# to that, so this lsm= comes last on the line, and the last lsm= is the one
# the kernel takes. Expanded by update-grub, not here.
# shellcheck disable=SC2016
printf '# agentwatch (vagrant/provision-lsm.sh, from tests/vm/lsm.conf): BPF LSM\nGRUB_CMDLINE_LINUX_DEFAULT="${GRUB_CMDLINE_LINUX_DEFAULT:-} lsm=%s"\n' \
    "$lsm" >"$DROPIN"
say "wrote $DROPIN: lsm=$lsm (running: ${running:-none})"
${AGENTWATCH_UPDATE_GRUB:-update-grub}
say "rebooting into lsm=$lsm"
