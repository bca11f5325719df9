#!/usr/bin/env bash
# agentwatch set-up, idempotent: installs only what is missing, says what it did.
#
#   scripts/setup.sh demo   # set up, then run the demo agent under a shipped policy
#   scripts/setup.sh test   # set up, then run the whole test suite
#   scripts/setup.sh        # set up only
# As root (as another user: sudo scripts/setup.sh MODE, or su -c where there is no sudo).
#
# Installs: Debian/Ubuntu python3-bpfcc (bcc), python3-seccomp, python3-venv,
# gcc, kernel headers; a venv at .venv made with --system-site-packages (so
# bcc and seccomp import) holding agentwatch and its Python dependencies.
# Applies the kernel workarounds (README "Kernel requirements") when needed: links the
# distribution's kernel headers if none match the running kernel, mounts tracefs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AGENTWATCH_VENV:-$ROOT/.venv}"
MODE="${1:-setup}"
shift || true

say() { printf 'setup: %s\n' "$*" >&2; }
# shellcheck source=lib.sh
. "$ROOT/scripts/lib.sh"
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    why="run as root (it installs packages, mounts tracefs and loads BPF)"
    if command -v sudo >/dev/null 2>&1; then
        die "$why: sudo $0 $MODE"
    fi
    die "$why: there is no sudo here, so as root, e.g. su -c '$0 $MODE'"
fi

# ---- distribution packages ---------------------------------------------------
ARCH="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
KREL="$(uname -r)"
pkgs=(python3 python3-venv python3-bpfcc python3-seccomp gcc libc6-dev iproute2)
# the test mode also checks that vagrant/Vagrantfile parses (tests/unit/test_deploy.py)
if [ "$MODE" = test ]; then pkgs+=(ruby); fi
missing=()
for p in "${pkgs[@]}"; do
    installed "$p" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
else
    say "packages present: ${pkgs[*]}"
fi

# ---- kernel headers for bcc ----------------------------------------------------
# bcc compiles against /lib/modules/$(uname -r)/build. When the running kernel
# has no matching headers (custom or VM kernels), link the distribution's own:
# the sensors read only tracepoint args, helpers and uapi structs, so headers
# of another version are safe for them.
if [ -e "/lib/modules/$KREL/build/include" ]; then
    say "kernel headers present for $KREL"
elif [ -e /sys/kernel/kheaders.tar.xz ]; then
    say "kernel provides its own headers (CONFIG_IKHEADERS)"
else
    if ! ls -d /usr/src/linux-headers-*-"$ARCH" >/dev/null 2>&1; then
        if apt-cache show "linux-headers-$KREL" >/dev/null 2>&1; then
            apt_install "linux-headers-$KREL"
        else
            apt_install "linux-headers-$ARCH" || apt_install linux-headers-generic
        fi
    fi
    if [ ! -e "/lib/modules/$KREL/build/include" ]; then
        hdr="$(ls -d /usr/src/linux-headers-*-"$ARCH" 2>/dev/null | sort -V | tail -n 1)"
        [ -n "$hdr" ] || hdr="$(ls -d /usr/src/linux-headers-*-generic 2>/dev/null | sort -V | tail -n 1)"
        [ -n "$hdr" ] || die "no kernel headers found under /usr/src after installing them"
        common="${hdr%-"$ARCH"}-common"
        mkdir -p "/lib/modules/$KREL"
        ln -sfn "$hdr" "/lib/modules/$KREL/build"
        [ -d "$common" ] && ln -sfn "$common" "/lib/modules/$KREL/source"
        say "workaround: no headers for kernel $KREL; linked /lib/modules/$KREL/build -> $hdr"
    fi
fi

# ---- tracefs ---------------------------------------------------------------------
if [ -d /sys/kernel/tracing/events ]; then
    say "tracefs mounted"
else
    mount -t tracefs tracefs /sys/kernel/tracing
    say "workaround: mounted tracefs at /sys/kernel/tracing"
fi

# ---- venv and the project ---------------------------------------------------------
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import bcc, seccomp" 2>/dev/null; then
    rm -rf "$VENV"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
    say "created venv $VENV (with system site-packages for bcc and seccomp)"
fi
say "installing agentwatch into $VENV"
piplog="$(mktemp)"
if ! "$VENV/bin/pip" install -q --disable-pip-version-check "${ROOT}[test]" >"$piplog" 2>&1; then
    cat "$piplog" >&2
    rm -f "$piplog"
    die "pip install failed (see above)"
fi
rm -f "$piplog"
"$VENV/bin/agentwatch" --version >/dev/null || die "agentwatch did not install into $VENV"

case "$MODE" in
setup)
    say "ready: $VENV/bin/agentwatch"
    ;;
demo)
    exec "$ROOT/scripts/demo.sh" "$@"
    ;;
test)
    cd "$ROOT"
    # tests/kernel/test_report_html.py renders `agentwatch report --html` in headless Chromium
    # (Debian's package; Ubuntu ships Chromium only as a snap: there the test says it skipped)
    if [ ! -x /usr/bin/chromium ]; then
        if grep -qs '^ID=debian' /etc/os-release; then
            apt_install chromium
        else
            apt_install chromium || say "chromium is not an apt package here: the HTML report test skips"
        fi
    fi
    # the BPF LSM path is tested in a VM booting Debian's own kernel (tests/vm)
    if [ "${AGENTWATCH_SKIP_VM:-0}" != 1 ]; then
        bash "$ROOT/tests/vm/setup.sh"
    fi
    set +e
    "$VENV/bin/python" -m pytest -ra "$@"
    rc=$?
    set -e
    [ "$rc" -eq 5 ] && { say "pytest collected no tests"; rc=1; }
    exit "$rc"
    ;;
*)
    die "unknown mode '$MODE': use demo, test or nothing"
    ;;
esac
