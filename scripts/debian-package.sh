#!/usr/bin/env bash
# Installs one Debian package that some tests or benchmarks need, unless PATH (a file or
# folder the package provides) is there already:
#
#   scripts/debian-package.sh PATH PACKAGE WHAT
#
# WHAT names what goes without it ("the browser tests"). Needs root or sudo and apt-get;
# where it cannot install, it says that WHAT are skipped and exits 1. `make test` and
# `make bench` call it through scripts/heldout-photos.sh and for Chromium.
set -euo pipefail

[ $# -eq 3 ] || { echo "usage: $0 PATH PACKAGE WHAT" >&2; exit 2; }
path=$1 package=$2 what=$3
[ -e "$path" ] && exit 0

log() { echo "debian-package.sh: $*" >&2; }
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo "$@"
    else
        return 1
    fi
}
apt() { as_root env DEBIAN_FRONTEND=noninteractive apt-get "$@" >&2; }

if ! command -v apt-get >/dev/null 2>&1; then
    log "apt-get not found: $what are skipped"
    exit 1
fi
log "installing Debian's $package ($what)"
# A machine whose package lists are missing or old needs an update first.
if ! apt install -y -q --no-install-recommends "$package"; then
    apt update -q && apt install -y -q --no-install-recommends "$package" || {
        log "could not install $package (root or sudo and apt-get are needed): $what are skipped"
        exit 1
    }
fi
