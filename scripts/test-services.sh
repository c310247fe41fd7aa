#!/usr/bin/env bash
# Runs a command (make test's checks and tests) with what they need around them, says what
# it starts, and stops what it started when the command ends, however it ends; exits with
# the command's status.
#
#   PostgreSQL for the store tests: ICS_TEST_POSTGRES_URL names a server, or
#   scripts/postgres.sh starts the local one (and it is stopped again at the end unless it
#   was running already). ICS_SKIP_POSTGRES=1 skips those tests on purpose.
#   A models folder shared by the install check and the tests, so that the model is
#   converted once (ICS_TEST_MODELS_DIR: unless set, a temporary folder removed at the end).
set -uo pipefail
cd "$(dirname "$0")/.."

say() { echo "make test: $*" >&2; }
stop_pg=0
models=""
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ "$stop_pg" = 1 ]; then
        say "stopping the PostgreSQL it started (scripts/postgres.sh stop)"
        scripts/postgres.sh stop || say "scripts/postgres.sh stop failed"
    fi
    [ -z "$models" ] || rm -rf "$models"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -n "${ICS_TEST_POSTGRES_URL:-}" ]; then
    say "PostgreSQL for the store tests: ICS_TEST_POSTGRES_URL"
elif [ "${ICS_SKIP_POSTGRES:-}" = 1 ]; then
    say "ICS_SKIP_POSTGRES=1: the PostgreSQL store tests are skipped"
else
    if scripts/postgres.sh running; then
        say "PostgreSQL is running already: using it, and leaving it running"
    else
        say "starting a local PostgreSQL (scripts/postgres.sh start); stopped at the end"
        stop_pg=1
    fi
    url="$(scripts/postgres.sh start)" || {
        say "cannot start a local PostgreSQL for the store tests (see above)."
        say "  Set ICS_TEST_POSTGRES_URL=postgresql://USER:PASSWORD@HOST/DB (a role that may"
        say "  create databases), or ICS_SKIP_POSTGRES=1 to skip those tests on purpose."
        exit 1
    }
    export ICS_TEST_POSTGRES_URL="$url"
fi

if [ -z "${ICS_TEST_MODELS_DIR:-}" ]; then
    models="$(mktemp -d -t ics-test-models.XXXXXX)"
    export ICS_TEST_MODELS_DIR="$models"
fi
say "the tests start their own servers (S3/SNS protocol, SMTP, HTTP) on 127.0.0.1 and stop them"

"$@"
