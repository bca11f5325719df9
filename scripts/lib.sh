# Shell helpers shared by scripts/setup.sh and tests/vm/setup.sh (sourced;
# the caller defines say()).

# installed PKG: the Debian package is installed
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# apt_install PKG...: install quietly, running apt-get update once per script
apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        say "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
    say "installing: $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
