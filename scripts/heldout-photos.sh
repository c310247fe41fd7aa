#!/usr/bin/env bash
# Photos held out from the INT8 model's calibration: Debian's Tux Paint stamps
# (`tuxpaint-stamps-default`, 161 MB, no dependencies), read by ics_service.models.heldout.
# `make test` and `make bench` call this; without the package the held-out tests skip and
# the benchmark says why. Needs root or sudo to install; does nothing when installed.
exec "$(dirname "$0")/debian-package.sh" /usr/share/tuxpaint/stamps tuxpaint-stamps-default \
    "the INT8 held-out tests and figures"
