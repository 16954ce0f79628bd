#!/usr/bin/env bash
# Find (or start) the PostgreSQL and Redis that the integration tests and the quickstart use, and
# write their URLs to target/services.env for scripts/test.sh, scripts/quickstart.sh and .ci/run:
#
#   TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres   (a superuser, no password)
#   TEST_REDIS_URL=redis://127.0.0.1:6379/0
#   TEST_VALKEY_URL=redis://127.0.0.1:56380/0                        (scripts/test.sh runs the
#                                                 data-path, index-mode and fault suites on it too)
#
# Valkey: always a private valkey-server of this project's own on a port of its own (56380), next
# to whatever Redis runs on 6379 (never touched). valkey-server is installed with apt-get when
# missing: Debian's package, from bookworm-backports on Debian 12 (the backports source is added
# when apt knows no valkey-server).
#
# Order, for each server:
#   1. TEST_DATABASE_URL / TEST_REDIS_URL already set: used as they are (checked, never changed).
#   2. A server on the usual local port (5432 / 6379) that accepts the connection as it is
#      (Postgres: user postgres without a password): used as it is.
#   3. Otherwise a private server of this project's own, in target/services/ on a port of its own
#      (55432 / 56379): initdb + pg_ctl (as the postgres OS user when run as root), redis-server.
#      A second run finds it running and reuses it.
#
# It never changes the configuration or authentication of a server it did not create: a server
# that refuses the passwordless login is left alone and a private one is started next to it.
# Redis is never flushed. When programs are missing it installs them with apt-get (root only; else
# it says what to run). openssl is installed too (the TLS tests generate certificates with it).
#
# `scripts/ensure-services.sh --stop` stops the private servers (and only those).
#
# Settings (environment): ENSURE_PG_HOST/ENSURE_PG_PORT and ENSURE_REDIS_HOST/ENSURE_REDIS_PORT
# (where to look first, default 127.0.0.1:5432 and 127.0.0.1:6379); ENSURE_PRIVATE_PG_PORT and
# ENSURE_PRIVATE_REDIS_PORT and ENSURE_PRIVATE_VALKEY_PORT (the private servers' ports, default
# 55432, 56379 and 56380).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

PG_HOST=${ENSURE_PG_HOST:-127.0.0.1}
PG_PORT=${ENSURE_PG_PORT:-5432}
REDIS_HOST=${ENSURE_REDIS_HOST:-127.0.0.1}
REDIS_PORT=${ENSURE_REDIS_PORT:-6379}
# Ports of the private servers: unusual ones, so they do not collide with a system's own servers.
PRIVATE_PG_PORT=${ENSURE_PRIVATE_PG_PORT:-55432}
PRIVATE_REDIS_PORT=${ENSURE_PRIVATE_REDIS_PORT:-56379}
PRIVATE_VALKEY_PORT=${ENSURE_PRIVATE_VALKEY_PORT:-56380}
target_dir=${CARGO_TARGET_DIR:-$repo/target}
services_dir=$target_dir/services
services_env=$target_dir/services.env
# How long a freshly started server gets to accept connections. Postgres needs a few seconds after a
# crash (recovery); 30 s is generous on a 2-core machine and still fails fast enough to read the log.
READY_TIMEOUT_S=30

say() { printf 'ensure-services: %s\n' "$*"; }
die() { printf 'ensure-services: error: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

need_root() {
  is_root || die "$1 (not root: run this script with sudo, or run: $2)"
}

apt_updated=0
apt_install() {
  need_root "missing packages: $*" "sudo apt-get update && sudo apt-get install -y $*"
  if [ "$apt_updated" -eq 0 ]; then
    # A fresh machine's package lists may be empty or stale; update once per run, not per package.
    say "apt-get update"
    apt-get update -qq
    apt_updated=1
  fi
  say "installing $*"
  # policy-rc.d-less containers: the packages' own servers may start; they are not used unless
  # they accept the connection as they are (step 2 above).
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Poll a readiness probe for READY_TIMEOUT_S seconds; the caller names what failed.
wait_until() {
  local what=$1 logfile=$2
  shift 2
  local deadline=$((SECONDS + READY_TIMEOUT_S))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      printf 'ensure-services: error: %s not ready after %ss' "$what" "$READY_TIMEOUT_S" >&2
      if [ -r "$logfile" ]; then
        printf '; last lines of %s:\n' "$logfile" >&2
        tail -n 20 "$logfile" >&2
      else
        printf '\n' >&2
      fi
      exit 1
    fi
    sleep 0.5
  done
}

# ---------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------

# A server program: on PATH, else in the newest Debian server package (kept off PATH by Debian).
pg_program() {
  if command -v "$1" >/dev/null 2>&1; then
    command -v "$1"
    return 0
  fi
  local dir
  dir=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$dir" ] && [ -x "/usr/lib/postgresql/$dir/bin/$1" ]; then
    printf '%s\n' "/usr/lib/postgresql/$dir/bin/$1"
    return 0
  fi
  return 1
}

# Connect the way the tests do: over TCP, with no password available from anywhere (a PGPASSWORD
# or ~/.pgpass would hide an auth the tests' clean environment would hit). $1: a connection URL.
pg_accepts() {
  timeout 10 env -u PGPASSWORD PGPASSFILE=/dev/null PGCONNECT_TIMEOUT=5 \
    psql -w -X -q -d "$1" -Atc 'select 1' >/dev/null 2>&1
}

# The private cluster runs as the postgres OS user when this script runs as root (initdb refuses
# root), so its directory must be reachable by that user: under a repository in /root it is not,
# and then a directory under /var/tmp named after the repository's path is used instead.
pg_private_dir() {
  local dir=$services_dir/pg
  if is_root; then
    mkdir -p "$services_dir"
    if ! runuser -u postgres -- test -x "$services_dir" 2>/dev/null; then
      dir=/var/tmp/cache-invalidator-pg-$(printf '%s' "$repo" | md5sum | cut -c1-12)
    fi
  fi
  printf '%s\n' "$dir"
}

as_pg_owner() {
  if is_root; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

start_private_postgres() {
  local dir data log url initdb pg_ctl
  dir=$(pg_private_dir)
  data=$dir/data
  log=$dir/server.log
  url="postgres://postgres@127.0.0.1:$PRIVATE_PG_PORT/postgres"
  if pg_accepts "$url"; then
    if [ -f "$data/postmaster.pid" ]; then
      say "postgres: private cluster already running on 127.0.0.1:$PRIVATE_PG_PORT ($data)"
      pg_url=$url
      return 0
    fi
    die "something else accepts postgres connections on port $PRIVATE_PG_PORT: set ENSURE_PRIVATE_PG_PORT to a free port"
  fi
  initdb=$(pg_program initdb) && pg_ctl=$(pg_program pg_ctl) || {
    apt_install postgresql
    initdb=$(pg_program initdb) && pg_ctl=$(pg_program pg_ctl) || die "postgresql installed, but no initdb/pg_ctl found"
  }
  command -v psql >/dev/null 2>&1 || apt_install postgresql-client
  if is_root; then
    id postgres >/dev/null 2>&1 || die "no postgres OS user to run the private cluster as (install the postgresql package)"
    mkdir -p "$dir"
    chown postgres: "$dir"
  else
    mkdir -p "$dir"
  fi
  if [ ! -f "$data/PG_VERSION" ]; then
    say "postgres: creating a private cluster in $data (trust auth, listening on 127.0.0.1 only)"
    # Trust is safe here only because this cluster is ours alone: loopback only, a port of its own,
    # throwaway data.
    as_pg_owner "$initdb" -D "$data" --auth=trust -U postgres --no-sync >"$dir/initdb.log" 2>&1 ||
      { cat "$dir/initdb.log" >&2; die "initdb failed"; }
  fi
  say "postgres: starting the private cluster on 127.0.0.1:$PRIVATE_PG_PORT (log: $log)"
  # Durability off: test and demo data only. The socket goes into the cluster's own directory.
  as_pg_owner "$pg_ctl" -D "$data" -l "$log" -w -t "$READY_TIMEOUT_S" start \
    -o "-p $PRIVATE_PG_PORT -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=200" \
    >/dev/null || { tail -n 20 "$log" >&2 2>/dev/null; die "the private postgres did not start"; }
  wait_until "private postgres on 127.0.0.1:$PRIVATE_PG_PORT" "$log" pg_accepts "$url"
  pg_url=$url
}

ensure_postgres() {
  if ! command -v psql >/dev/null 2>&1 || ! command -v pg_isready >/dev/null 2>&1; then
    apt_install postgresql-client
  fi
  if [ -n "${TEST_DATABASE_URL:-}" ]; then
    pg_accepts "$TEST_DATABASE_URL" ||
      die "TEST_DATABASE_URL is set but that server does not accept the connection without a password"
    say "postgres: using TEST_DATABASE_URL as it is"
    pg_url=$TEST_DATABASE_URL
    return 0
  fi
  local usual="postgres://postgres@$PG_HOST:$PG_PORT/postgres"
  if pg_accepts "$usual"; then
    say "postgres: using the server on $PG_HOST:$PG_PORT as it is"
    pg_url=$usual
    return 0
  fi
  if pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null; then
    say "postgres: the server on $PG_HOST:$PG_PORT refuses user postgres without a password; left as it is, using a private one"
  else
    say "postgres: nothing answers on $PG_HOST:$PG_PORT; using a private one"
  fi
  start_private_postgres
}

# ---------------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------------

# timeout: redis-cli has no connect/read timeout of its own and waits forever on a port held by
# something that accepts but never answers.
redis_answers() { [ "$(timeout 3 redis-cli -u "$1" ping 2>/dev/null)" = PONG ]; }

start_private_redis() {
  local dir=$services_dir/redis url="redis://127.0.0.1:$PRIVATE_REDIS_PORT/0"
  if redis_answers "$url"; then
    if [ -f "$dir/redis.pid" ] && kill -0 "$(cat "$dir/redis.pid")" 2>/dev/null; then
      say "redis: private server already running on 127.0.0.1:$PRIVATE_REDIS_PORT"
      redis_url=$url
      return 0
    fi
    die "another Redis answers on port $PRIVATE_REDIS_PORT: set ENSURE_PRIVATE_REDIS_PORT to a free port"
  fi
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  mkdir -p "$dir"
  say "redis: starting a private server on 127.0.0.1:$PRIVATE_REDIS_PORT (log: $dir/redis.log)"
  # No persistence: test data is throwaway, and snapshots would only add latency spikes to the
  # sweep measurements. Loopback only.
  redis-server --daemonize yes --bind 127.0.0.1 --port "$PRIVATE_REDIS_PORT" --save "" \
    --appendonly no --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
  wait_until "private redis on 127.0.0.1:$PRIVATE_REDIS_PORT" "$dir/redis.log" redis_answers "$url"
  redis_url=$url
}

ensure_redis() {
  # redis-server too: the fault tests start private servers of their own.
  if ! command -v redis-cli >/dev/null 2>&1 || ! command -v redis-server >/dev/null 2>&1; then
    apt_install redis-server
  fi
  if [ -n "${TEST_REDIS_URL:-}" ]; then
    redis_answers "$TEST_REDIS_URL" || die "TEST_REDIS_URL is set but that server does not answer PING"
    say "redis: using TEST_REDIS_URL as it is"
    redis_url=$TEST_REDIS_URL
    return 0
  fi
  local usual="redis://$REDIS_HOST:$REDIS_PORT/0"
  if redis_answers "$usual"; then
    say "redis: using the server on $REDIS_HOST:$REDIS_PORT as it is"
    redis_url=$usual
    return 0
  fi
  say "redis: nothing answers PING on $REDIS_HOST:$REDIS_PORT; using a private one"
  start_private_redis
}

# ---------------------------------------------------------------------------------------------
# Valkey
# ---------------------------------------------------------------------------------------------

# The apt source of Debian 12's backports, where valkey-server is (the release itself lacks it).
BACKPORTS_SOURCES=/etc/apt/sources.list.d/bookworm-backports.sources

install_valkey() {
  need_root "valkey-server is missing" "sudo apt-get install valkey-server (from bookworm-backports on Debian 12)"
  if [ "$apt_updated" -eq 0 ]; then
    say "apt-get update"
    apt-get update -qq
    apt_updated=1
  fi
  if [ -n "$(apt-cache policy valkey-server 2>/dev/null | awk '/Candidate:/ && $2 != "(none)" { print $2 }')" ]; then
    apt_install valkey-server
    return 0
  fi
  local codename
  codename=$(. /etc/os-release 2>/dev/null && printf '%s' "${VERSION_CODENAME:-}")
  [ "$codename" = bookworm ] ||
    die "apt knows no valkey-server on this release (${codename:-unknown}): install Valkey 8.0 and put valkey-server on PATH"
  if [ ! -f "$BACKPORTS_SOURCES" ]; then
    say "adding bookworm-backports to apt's sources ($BACKPORTS_SOURCES), for valkey-server"
    printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
      'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' >"$BACKPORTS_SOURCES"
    apt-get update -qq
  fi
  # Backports are never chosen unless asked for: -t picks valkey-server (and valkey-tools) there.
  apt_install -t bookworm-backports valkey-server
}

start_private_valkey() {
  local dir=$services_dir/valkey url="redis://127.0.0.1:$PRIVATE_VALKEY_PORT/0"
  if redis_answers "$url"; then
    if [ -f "$dir/valkey.pid" ] && kill -0 "$(cat "$dir/valkey.pid")" 2>/dev/null; then
      say "valkey: private server already running on 127.0.0.1:$PRIVATE_VALKEY_PORT"
      valkey_url=$url
      return 0
    fi
    die "another server answers on port $PRIVATE_VALKEY_PORT: set ENSURE_PRIVATE_VALKEY_PORT to a free port"
  fi
  command -v valkey-server >/dev/null 2>&1 || install_valkey
  mkdir -p "$dir"
  say "valkey: starting a private server on 127.0.0.1:$PRIVATE_VALKEY_PORT (log: $dir/valkey.log)"
  # As for the private Redis: no persistence, loopback only.
  valkey-server --daemonize yes --bind 127.0.0.1 --port "$PRIVATE_VALKEY_PORT" --save "" \
    --appendonly no --dir "$dir" --pidfile "$dir/valkey.pid" --logfile "$dir/valkey.log"
  wait_until "private valkey on 127.0.0.1:$PRIVATE_VALKEY_PORT" "$dir/valkey.log" redis_answers "$url"
  valkey_url=$url
}

# ---------------------------------------------------------------------------------------------
# Tools and directories the tests use
# ---------------------------------------------------------------------------------------------

ensure_tools() {
  command -v openssl >/dev/null 2>&1 || apt_install openssl
  # The fault and TLS tests start private Postgres clusters of their own.
  pg_program initdb >/dev/null || apt_install postgresql
  # promtool checks and unit-tests the shipped alerting rules (deploy/prometheus).
  command -v promtool >/dev/null 2>&1 || apt_install prometheus
}

# TLS tests write certificates to a temp dir and point the postgres server at them, so the postgres
# OS user must be able to reach /tmp. It normally can (mode 1777); a locked-down /tmp breaks those
# tests with a confusing "could not load server certificate" instead.
ensure_tmp_reachable() {
  local mode
  mode=$(stat -c '%a' /tmp)
  if [ "$mode" != 1777 ]; then
    need_root "/tmp has mode $mode, the postgres user cannot write there" "sudo chmod 1777 /tmp"
    say "chmod 1777 /tmp (was $mode)"
    chmod 1777 /tmp
  fi
  local tmp=${TMPDIR:-/tmp}
  if [ "$tmp" != /tmp ] && id postgres >/dev/null 2>&1 && is_root; then
    if ! runuser -u postgres -- test -w "$tmp" -a -x "$tmp"; then
      say "warning: TMPDIR=$tmp is not writable by the postgres user; TLS tests may fail (unset TMPDIR or chmod it)"
    fi
  fi
}

# `--stop`: stop the private servers this script started (the others are not its to stop).
stop_private() {
  local dir pg_ctl
  dir=$(pg_private_dir)
  if [ -f "$dir/data/postmaster.pid" ] && pg_ctl=$(pg_program pg_ctl); then
    say "postgres: stopping the private cluster in $dir/data"
    as_pg_owner "$pg_ctl" -D "$dir/data" -w stop -m fast >/dev/null
  fi
  local name pidfile
  for name in redis valkey; do
    pidfile=$services_dir/$name/$name.pid
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      say "$name: stopping the private server (pid $(cat "$pidfile"))"
      kill "$(cat "$pidfile")"
    fi
  done
  rm -f "$services_env"
}

case ${1:-} in
  '') ;;
  --stop) stop_private; exit 0 ;;
  *) die "unknown argument $1 (usage: $0 [--stop])" ;;
esac

pg_url=
redis_url=
valkey_url=
ensure_postgres
ensure_redis
start_private_valkey
ensure_tools
ensure_tmp_reachable

mkdir -p "$target_dir"
# 0600: a TEST_DATABASE_URL given by the caller may hold a password.
(
  umask 077
  {
    printf '# Written by scripts/ensure-services.sh: the servers the tests and the quickstart use.\n'
    printf 'TEST_DATABASE_URL=%q\n' "$pg_url"
    printf 'TEST_REDIS_URL=%q\n' "$redis_url"
    printf 'TEST_VALKEY_URL=%q\n' "$valkey_url"
  } >"$services_env"
)
say "servers written to $services_env"
