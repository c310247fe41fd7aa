#!/usr/bin/env bash
# Photos held out from the INT8 model's calibration: Debian's Tux Paint stamps
# (`tuxpaint-stamps-default`, 161 MB, no dependencies), read by ics_service.models.heldout.
# `make test` and `make bench` call this; without the package the held-out tests skip and
# the benchmark says why. Needs root or sudo to install; does nothing when installed.
set -euo pipefail

STAMPS=/usr/share/tuxpaint/stamps
[ -d "$STAMPS" ] && exit 0

log() { echo "heldout-photos.sh: $*" >&2; }
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo "$@"
    else
        return 1
    fi
}

if ! command -v apt-get >/dev/null 2>&1; then
    log "apt-get not found: the INT8 held-out tests and figures are skipped"
    exit 1
fi
log "installing Debian's tuxpaint-stamps-default (the INT8 held-out photos)"
if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    tuxpaint-stamps-default >&2; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends tuxpaint-stamps-default >&2 || {
        log "could not install it (root or sudo and apt-get are needed): the INT8 held-out" \
            "tests and figures are skipped"
        exit 1
    }
fi
