# shellcheck shell=bash
# Shell helpers shared by scripts/setup.sh, tests/vm/ and vagrant/ (sourced;
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

# lsm_list BASE REQUIRED: the comma-separated LSM list BASE, then each LSM of
# REQUIRED that BASE lacks (order kept, none twice): the value of lsm= that
# keeps a distribution's LSMs and adds ours (tests/vm/lsm.conf)
lsm_list() {
    local out="" l IFS=,
    for l in $1 $2; do
        l="${l//[[:space:]]/}"
        [ -n "$l" ] || continue
        case ",$out," in *",$l,"*) ;; *) out="${out:+$out,}$l" ;; esac
    done
    printf '%s\n' "$out"
}

# lsm_active NAME: the running kernel has LSM NAME active
lsm_active() {
    case ",$(tr -d '[:space:]' 2>/dev/null </sys/kernel/security/lsm)," in *",$1,"*) return 0 ;; esac
    return 1
}
