#!/usr/bin/env bash
# A real local PostgreSQL for the store tests (Debian's `postgresql` package).
#
#   scripts/postgres.sh start    install if needed, start the cluster, create the test role and
#                                database, and print the URL for ICS_TEST_POSTGRES_URL
#   scripts/postgres.sh stop     stop the cluster
#   scripts/postgres.sh status   show the cluster (pg_lsclusters)
#   scripts/postgres.sh running  exit 0 when the cluster is installed and running, 1 if not
#   scripts/postgres.sh url      print the URL without touching anything
#
# Idempotent: running `start` again on a machine where it is installed and running only
# checks that everything is there. Needs root or sudo (apt-get, pg_ctlcluster, the postgres
# superuser). Fails loudly (non-zero exit) when PostgreSQL cannot be installed or started.
#
# Settings (environment): ICS_PG_USER (ics), ICS_PG_PASSWORD (ics), ICS_PG_DB (ics_test),
# ICS_PG_VERSION (the newest installed major version), ICS_PG_CLUSTER (main).
# The role gets CREATEDB (the tests create a scratch database or schema per test) and
# pg_signal_backend (their DROP DATABASE ... WITH (FORCE) may meet an autovacuum worker).
set -euo pipefail

PG_USER="${ICS_PG_USER:-ics}"
PG_PASSWORD="${ICS_PG_PASSWORD:-ics}"
PG_DB="${ICS_PG_DB:-ics_test}"
PG_CLUSTER="${ICS_PG_CLUSTER:-main}"

log() { echo "postgres.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# Run a command as root (directly, or through sudo when we are not root).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root or sudo to run: $*"
    fi
}

# Run a command as the postgres superuser (peer authentication over the local socket).
as_postgres() {
    if [ "$(id -un)" = postgres ]; then
        "$@"
    elif [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        sudo -u postgres "$@"
    fi
}

# The newest installed PostgreSQL major version (or ICS_PG_VERSION), empty when none.
pg_version() {
    if [ -n "${ICS_PG_VERSION:-}" ]; then
        echo "$ICS_PG_VERSION"
        return
    fi
    local d versions=()
    for d in /usr/lib/postgresql/*/bin/postgres; do
        [ -x "$d" ] || continue
        d="${d#/usr/lib/postgresql/}"
        versions+=("${d%%/*}")
    done
    [ "${#versions[@]}" -gt 0 ] || return 0
    printf '%s\n' "${versions[@]}" | sort -n | tail -n 1
}

install_pg() {
    if [ -n "$(pg_version)" ] && command -v pg_ctlcluster >/dev/null 2>&1; then
        return
    fi
    log "installing PostgreSQL (Debian package postgresql)"
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install PostgreSQL yourself"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 ||
        die "apt-get update failed"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        postgresql postgresql-client >&2 || die "apt-get install postgresql failed"
    [ -n "$(pg_version)" ] || die "PostgreSQL was installed but no server binary was found"
}

# The port of the cluster, from pg_lsclusters (empty when the cluster does not exist).
cluster_port() {
    pg_lsclusters -h 2>/dev/null | awk -v v="$1" -v c="$PG_CLUSTER" '$1 == v && $2 == c {print $3}'
}

start_pg() {
    install_pg
    local version port
    version="$(pg_version)"
    [ -n "$version" ] || die "no PostgreSQL server installed"
    if [ -z "$(cluster_port "$version")" ]; then
        log "creating cluster $version/$PG_CLUSTER"
        as_root pg_createcluster "$version" "$PG_CLUSTER" >&2 ||
            die "pg_createcluster $version $PG_CLUSTER failed"
    fi
    port="$(cluster_port "$version")"
    if ! as_root pg_ctlcluster "$version" "$PG_CLUSTER" status >/dev/null 2>&1; then
        log "starting cluster $version/$PG_CLUSTER on port $port"
        as_root pg_ctlcluster "$version" "$PG_CLUSTER" start >&2 ||
            die "pg_ctlcluster $version $PG_CLUSTER start failed; see /var/log/postgresql/"
    fi
    local i
    for i in $(seq 1 60); do
        if pg_isready -q -h 127.0.0.1 -p "$port"; then
            break
        fi
        [ "$i" -lt 60 ] || die "PostgreSQL $version/$PG_CLUSTER is not accepting connections on 127.0.0.1:$port"
        sleep 0.5
    done

    psql_su() { as_postgres psql -p "$port" -X -q -A -t -v ON_ERROR_STOP=1 "$@"; }
    # Role and database, created once; the role's password and CREATEDB are (re)set every time.
    if [ "$(psql_su -c "SELECT 1 FROM pg_roles WHERE rolname = '$PG_USER'")" != 1 ]; then
        log "creating role $PG_USER"
        psql_su -c "CREATE ROLE \"$PG_USER\" LOGIN CREATEDB PASSWORD '$PG_PASSWORD'" >&2
    else
        psql_su -c "ALTER ROLE \"$PG_USER\" LOGIN CREATEDB PASSWORD '$PG_PASSWORD'" >&2
    fi
    # pg_signal_backend: a test's DROP DATABASE ... WITH (FORCE) may then end any process
    # on that database, an autovacuum worker too, not only the role's own sessions.
    if [ "$(psql_su -c "SELECT pg_has_role('$PG_USER', 'pg_signal_backend', 'member')")" != t ]; then
        psql_su -c "GRANT pg_signal_backend TO \"$PG_USER\"" >&2
    fi
    if [ "$(psql_su -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != 1 ]; then
        log "creating database $PG_DB"
        psql_su -c "CREATE DATABASE \"$PG_DB\" OWNER \"$PG_USER\"" >&2
    fi

    local url="postgresql://$PG_USER:$PG_PASSWORD@127.0.0.1:$port/$PG_DB"
    # Check what the tests will do: a password login over TCP.
    psql "$url" -X -q -A -t -v ON_ERROR_STOP=1 -c "SELECT 1" >/dev/null ||
        die "cannot log in as $PG_USER over TCP ($url); check pg_hba.conf"
    echo "$url"
}

case "${1:-}" in
start)
    start_pg
    ;;
stop)
    version="$(pg_version)"
    [ -n "$version" ] || die "no PostgreSQL server installed"
    if as_root pg_ctlcluster "$version" "$PG_CLUSTER" status >/dev/null 2>&1; then
        as_root pg_ctlcluster "$version" "$PG_CLUSTER" stop
    fi
    ;;
status)
    pg_lsclusters
    ;;
running)
    version="$(pg_version)"
    [ -n "$version" ] && command -v pg_ctlcluster >/dev/null 2>&1 &&
        as_root pg_ctlcluster "$version" "$PG_CLUSTER" status >/dev/null 2>&1
    ;;
url)
    version="$(pg_version)"
    [ -n "$version" ] || die "no PostgreSQL server installed"
    echo "postgresql://$PG_USER:$PG_PASSWORD@127.0.0.1:$(cluster_port "$version")/$PG_DB"
    ;;
*)
    echo "usage: $0 start|stop|status|running|url" >&2
    exit 2
    ;;
esac
