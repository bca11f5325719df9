#!/usr/bin/env bash
# Run tests/vm/guest (the BPF LSM layer's own tests), then the Landlock,
# seccomp and egress tests and the whole adversarial suite a second time
# (its runs go through one agentwatch daemon there: tests/adversarial/advkit.py),
# inside Debian's stock kernel booted with BPF LSM under QEMU, over this
# machine's root filesystem.
#
#   tests/vm/run_vm_tests.sh [--out DIR] [-- PYTEST_ARGS...]   (host, as root)
#   tests/vm/run_vm_tests.sh --guest DIR [PYTEST_ARGS...]       (what runs inside the VM)
#
# Host mode boots the kernel once with virtme-ng (vng): --disable-kvm because
# KVM aborts on this machine kind (QEMU TCG instead), lsm=...,bpf on the
# command line (tests/vm/lsm.conf), the host's / shared read-only and DIR
# shared read-write. DIR receives: junit.xml (one testcase per guest test),
# pytest.log, guest-rc (pytest's exit status inside the VM), guest-info,
# vm.log (console), timing.
# Exit status: the guest pytest's, or 3 when the VM did not get that far.
#
# The kernel: $AGENTWATCH_VM_KERNEL (a version such as 6.1.0-56-amd64), else
# the newest /boot/vmlinuz-* other than the running kernel whose
# /lib/modules/<version>/build holds headers of exactly that version (the BPF
# LSM programs read kernel structs; lsm.py refuses other headers).
# tests/vm/setup.sh installs qemu, the kernel, its headers, busybox and vng.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${AGENTWATCH_VENV:-$ROOT/.venv}"
say() { printf 'vm: %s\n' "$*" >&2; }
die() { printf 'vm: error: %s\n' "$*" >&2; exit 3; }

# The kernel command line and the tests to run in the VM: tests/vm/lsm.conf,
# shared with tests/vm/test_lsm_vm.py and vagrant/.
# shellcheck source=lsm.conf
. "$ROOT/tests/vm/lsm.conf"
# shellcheck source=../../scripts/lib.sh
. "$ROOT/scripts/lib.sh"
LSM_CMDLINE="lsm=$(lsm_list "$AGENTWATCH_LSM_VM_BASE" "$AGENTWATCH_LSM_REQUIRED")"

# ---- inside the VM ------------------------------------------------------------------
if [ "${1:-}" = "--guest" ]; then
    OUT="$2"
    shift 2
    {
        echo "kernel: $(uname -r) $(uname -v)"
        echo "lsm: $(cat /sys/kernel/security/lsm 2>/dev/null)"
        echo "cgroup2: $(awk '$3 == "cgroup2" {print $2}' /proc/mounts | head -n 1)"
        echo "cpus: $(nproc)  mem: $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"
    } >"$OUT/guest-info"
    ip link set lo up 2>/dev/null || true
    export AGENTWATCH_VM_GUEST=1 PYTHONDONTWRITEBYTECODE=1
    [ -x "$OUT/awprobe" ] && export AGENTWATCH_VM_AWPROBE="$OUT/awprobe"
    export AGENTWATCH_ADV_PROGRESS="$OUT/adversarial.log"   # the scenarios' runs, as they go
    py="$VENV/bin/python"
    [ -x "$py" ] || py=python3
    cd "$ROOT"
    start=$(date +%s.%N)
    set +e
    # the layer's own tests, then the enforcement and adversarial suites a
    # second time on this path (tests/conftest.py: which escape attempts)
    # (unless PYTEST_ARGS name others)
    # shellcheck disable=SC2086   # space-separated lists of paths
    [ "$#" -gt 0 ] || set -- $AGENTWATCH_LSM_PATH_TESTS
    # the guest's busiest processes once a minute (what a slow run spends its time on)
    ( while sleep 60; do { date +%T; top -b -n 1 -w 200 2>/dev/null | sed -n '7,18p'; } >>"$OUT/ps.log"; done ) &
    sampler=$!
    # shellcheck disable=SC2086
    PYTHONPATH="$ROOT" "$py" -m pytest -p no:cacheprovider -p no:hypothesispytest -o addopts="" -v -rA --durations=0 \
        --junitxml="$OUT/junit.xml" $AGENTWATCH_LSM_LAYER_TESTS "$@" >"$OUT/pytest.log" 2>&1
    rc=$?
    kill "$sampler" 2>/dev/null
    set -e
    end=$(date +%s.%N)
    echo "guest pytest: $(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.1f", b - a}') s" >>"$OUT/guest-info"
    echo "$rc" >"$OUT/guest-rc"
    dmesg 2>/dev/null | tail -n 200 >"$OUT/dmesg" || true   # OOM kills and the like
    exit 0
fi

# ---- on the host ----------------------------------------------------------------------
OUT=""
if [ "${1:-}" = "--out" ]; then
    OUT="$2"
    shift 2
fi
[ "${1:-}" = "--" ] && shift
[ "$(id -u)" -eq 0 ] || die "run as root (the guest loads BPF programs as the same user)"

export PATH="$VENV/bin:$PATH"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found: run tests/vm/setup.sh"
command -v vng >/dev/null || die "vng (virtme-ng) not found in $VENV/bin or PATH: run tests/vm/setup.sh"
command -v busybox >/dev/null || die "busybox not found: run tests/vm/setup.sh"

find_kernel() {
    local v
    if [ -n "${AGENTWATCH_VM_KERNEL:-}" ]; then
        echo "$AGENTWATCH_VM_KERNEL"
        return
    fi
    for img in $(ls /boot/vmlinuz-* 2>/dev/null | sort -V -r); do
        v="${img#/boot/vmlinuz-}"
        [ "$v" = "$(uname -r)" ] && continue
        if grep -qs "\"$v\"" "/lib/modules/$v/build/include/generated/utsrelease.h"; then
            echo "$v"
            return
        fi
    done
}
KVER="$(find_kernel)"
[ -n "$KVER" ] || die "no /boot/vmlinuz-* with matching headers in /lib/modules/<version>/build: run tests/vm/setup.sh"
[ -r "/boot/vmlinuz-$KVER" ] || die "/boot/vmlinuz-$KVER not found"
[ -d "/lib/modules/$KVER/kernel" ] || die "/lib/modules/$KVER has no modules (install linux-image-$KVER)"

if [ -z "$OUT" ]; then
    OUT="$(mktemp -d /tmp/agentwatch-vm.XXXXXX)"
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT/junit.xml" "$OUT/guest-rc" "$OUT/pytest.log" "$OUT/guest-info"

# Built here (native speed) rather than in the guest (TCG).
if command -v gcc >/dev/null; then
    gcc -O2 -static -o "$OUT/awprobe" "$ROOT/tests/vm/guest/awprobe.c" \
        || die "could not build tests/vm/guest/awprobe.c (needs gcc and libc6-dev)"
fi

KVM_OPT="--disable-kvm"
[ "${AGENTWATCH_VM_KVM:-0}" = "1" ] && KVM_OPT=""
say "booting $KVER with $LSM_CMDLINE (QEMU ${KVM_OPT:+TCG}); results in $OUT"
start=$(date +%s)
set +e
# shellcheck disable=SC2086
timeout "${AGENTWATCH_VM_TIMEOUT:-3300}" vng $KVM_OPT --memory 2G --cpus 2 \
    --rwdir "$OUT" --cwd "$ROOT" \
    --run "/boot/vmlinuz-$KVER" --append "$LSM_CMDLINE" \
    -- "bash $ROOT/tests/vm/run_vm_tests.sh --guest $OUT $*" \
    </dev/null >"$OUT/vm.log" 2>&1
vrc=$?
set -e
end=$(date +%s)
echo "vm wall: $((end - start)) s (vng exit $vrc)" >"$OUT/timing"
say "VM finished in $((end - start)) s (vng exit status $vrc)"
[ -f "$OUT/guest-info" ] && sed 's/^/vm: guest /' "$OUT/guest-info" >&2
if [ ! -f "$OUT/guest-rc" ]; then
    say "the guest did not finish; last lines of $OUT/vm.log:"
    tail -n 30 "$OUT/vm.log" >&2 || true
    [ -f "$OUT/pytest.log" ] && tail -n 30 "$OUT/pytest.log" >&2
    exit 3
fi
tail -n 15 "$OUT/pytest.log" >&2 || true
exit "$(cat "$OUT/guest-rc")"
