#!/usr/bin/env bash
# Install what tests/vm needs, idempotently (Debian, as root):
#   qemu-system-x86, busybox-static        QEMU and virtme-ng's initramfs tools
#   linux-image-amd64 + linux-headers-*    a second kernel (Debian 12: 6.1) with BPF
#                                          LSM built in, and headers of exactly its
#                                          version (lsm.py refuses any others)
#   virtme-ng (PyPI) in the project venv   boots that kernel over this root filesystem
# It puts a kernel into /boot but touches no bootloader and reboots nothing.
#
#   tests/vm/setup.sh           (venv: $AGENTWATCH_VENV or ./.venv, made by scripts/setup.sh)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${AGENTWATCH_VENV:-$ROOT/.venv}"
say() { printf 'vm-setup: %s\n' "$*" >&2; }
die() { printf 'vm-setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it installs Debian packages)"
[ -x "$VENV/bin/pip" ] || die "no venv at $VENV: run scripts/setup.sh first"

# shellcheck source=../../scripts/lib.sh
. "$ROOT/scripts/lib.sh"

missing=()
for p in qemu-system-x86 busybox-static linux-image-amd64 linux-headers-amd64 gcc libc6-dev; do
    installed "$p" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
else
    say "packages present: qemu-system-x86 busybox-static linux-image-amd64 linux-headers-amd64"
fi

# The image the metapackage points at, and headers of exactly that version.
kver="$(dpkg-query -W -f='${Depends}' linux-image-amd64 | tr ',' '\n' \
        | sed -n 's/^ *linux-image-\([^ ]*\).*/\1/p' | head -n 1)"
[ -n "$kver" ] || die "cannot tell which kernel linux-image-amd64 installs"
[ -r "/boot/vmlinuz-$kver" ] || die "/boot/vmlinuz-$kver missing after installing linux-image-amd64"
if ! grep -qs "\"$kver\"" "/lib/modules/$kver/build/include/generated/utsrelease.h"; then
    apt_install "linux-headers-$kver"
fi
grep -qs "\"$kver\"" "/lib/modules/$kver/build/include/generated/utsrelease.h" \
    || die "/lib/modules/$kver/build does not hold headers of $kver"
say "VM kernel: $kver (headers $(readlink -f "/lib/modules/$kver/build"))"

if [ -x "$VENV/bin/vng" ]; then
    say "virtme-ng present in $VENV"
else
    say "pip install virtme-ng into $VENV"
    piplog="$(mktemp)"
    if ! "$VENV/bin/pip" install -q --disable-pip-version-check virtme-ng >"$piplog" 2>&1; then
        cat "$piplog" >&2
        rm -f "$piplog"
        die "pip install virtme-ng failed"
    fi
    rm -f "$piplog"
fi
say "ready: tests/vm/run_vm_tests.sh (or pytest tests/vm)"
