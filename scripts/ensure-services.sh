#!/usr/bin/env bash
# Make sure the servers the integration tests and the quickstart talk to are up:
#   - PostgreSQL on 127.0.0.1:5432, user postgres, trust auth (tests connect without a password)
#   - Redis on 127.0.0.1:6379
#   - openssl (the TLS tests generate throwaway certificates with it)
#
# Why a script and not "it's already there": CI and developer machines are usually handed over with
# both servers running, but a fresh machine may have neither, and there is no systemd (PID 1) or
# Docker engine to lean on. So we install from Debian's packages and start the servers by hand.
#
# Idempotent: a second run finds everything up and changes nothing. One line per action taken.
# Not root and something missing: say what to run, exit 1 (we cannot install or start it ourselves).
set -euo pipefail

PG_HOST=127.0.0.1
PG_PORT=5432
REDIS_HOST=127.0.0.1
REDIS_PORT=6379
# How long a freshly started server gets to accept connections. Postgres needs a few seconds after a
# crash (recovery); 30 s is generous on a 2-core machine and still fails fast enough to read the log.
READY_TIMEOUT_S=30

say() { printf 'ensure-services: %s\n' "$*"; }
die() { printf 'ensure-services: error: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# Root is needed for every fix below (apt-get, pg_ctlcluster as another user, /var/lib/redis...).
# Without it, tell the person exactly what to run instead of half-doing it.
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

pg_ready() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; }

# Connect the way the tests do: as postgres, over TCP, with no password available from anywhere
# (a PGPASSWORD or ~/.pgpass would hide a non-trust pg_hba that CI's clean environment would hit).
pg_trust_works() {
  timeout 10 env -u PGPASSWORD PGPASSFILE=/dev/null PGCONNECT_TIMEOUT=5 \
    psql -w -X -q -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1
}

# The Debian cluster ("VERSION NAME") configured for our port, if any. pg_lsclusters columns:
# Ver Cluster Port Status Owner Datadir Logfile.
pg_cluster_on_port() {
  pg_lsclusters -h 2>/dev/null | awk -v port="$PG_PORT" '$3 == port { print $1, $2; exit }'
}

pg_cluster_online() {
  pg_lsclusters -h 2>/dev/null | awk -v v="$1" -v c="$2" '$1 == v && $2 == c && $4 ~ /^online/ { found = 1 } END { exit !found }'
}

pg_logfile() {
  pg_lsclusters -h 2>/dev/null | awk -v v="$1" -v c="$2" '$1 == v && $2 == c { print $7 }'
}

# Put trust lines for local connections at the top of pg_hba.conf (the first matching line wins, so
# this overrides the peer/scram defaults without deleting anyone's other rules). Marked, so running
# twice adds nothing. Only ever called for a cluster we installed/created, or one whose auth already
# refuses the passwordless postgres login the tests depend on.
pg_trust_local() {
  local ver=$1 name=$2
  local hba="/etc/postgresql/$ver/$name/pg_hba.conf"
  local marker='# cache-invalidator: trust local connections (scripts/ensure-services.sh)'
  [ -f "$hba" ] || die "no $hba: cannot set trust auth for cluster $ver/$name"
  if grep -qF "$marker" "$hba"; then
    return 0
  fi
  say "setting trust auth for local, 127.0.0.1 and ::1 in $hba (backup: $hba.orig)"
  cp -p "$hba" "$hba.orig"
  {
    printf '%s\n' "$marker"
    printf 'local   all   all                 trust\n'
    printf 'host    all   all   127.0.0.1/32  trust\n'
    printf 'host    all   all   ::1/128       trust\n'
    printf '# cache-invalidator: end\n\n'
    cat "$hba.orig"
  } >"$hba"
  chown --reference="$hba.orig" "$hba"
  chmod --reference="$hba.orig" "$hba"
}

ensure_postgres() {
  local created=0 cluster ver name

  if command -v pg_isready >/dev/null 2>&1 && pg_ready; then
    if pg_trust_works; then
      say "postgres: already running on $PG_HOST:$PG_PORT"
      return 0
    fi
  else
    # Not answering: install what is missing, make sure a cluster exists for our port, start it.
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
      apt_install postgresql postgresql-contrib
      # Debian's postinst creates the "main" cluster with peer/scram auth: that one is ours to set.
      created=1
    fi

    cluster=$(pg_cluster_on_port)
    if [ -z "$cluster" ]; then
      # The newest installed server version (directory names like 15, 16).
      ver=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
      need_root "no PostgreSQL cluster on port $PG_PORT" "sudo pg_createcluster --port $PG_PORT $ver main"
      say "creating cluster $ver/main on port $PG_PORT"
      pg_createcluster --port "$PG_PORT" "$ver" main >/dev/null
      created=1
      cluster="$ver main"
    fi
    read -r ver name <<<"$cluster"

    if [ "$created" -eq 1 ]; then
      pg_trust_local "$ver" "$name"
    fi

    if ! pg_cluster_online "$ver" "$name"; then
      need_root "PostgreSQL cluster $ver/$name is down" \
        "sudo pg_ctlcluster --skip-systemctl-redirect $ver $name start"
      say "starting postgres cluster $ver/$name"
      # --skip-systemctl-redirect: there is no systemd as PID 1 here, start the server directly.
      pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start
    elif [ "$created" -eq 1 ]; then
      # apt's postinst may have started it already, with the old pg_hba: make it re-read the file.
      say "reloading postgres cluster $ver/$name"
      pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" reload
    fi
    wait_until "postgres on $PG_HOST:$PG_PORT" "$(pg_logfile "$ver" "$name")" pg_ready
    if pg_trust_works; then
      say "postgres: ready on $PG_HOST:$PG_PORT"
      return 0
    fi
  fi

  # Running, but the passwordless login as postgres is refused: an existing cluster whose auth is
  # not what the tests expect. Only now do we touch its pg_hba.
  cluster=$(pg_cluster_on_port)
  [ -n "$cluster" ] || die "postgres on $PG_HOST:$PG_PORT refuses user postgres without a password, and it is not a local Debian cluster this script can configure"
  read -r ver name <<<"$cluster"
  need_root "postgres on $PG_HOST:$PG_PORT refuses user postgres without a password" \
    "add 'host all all 127.0.0.1/32 trust' at the top of /etc/postgresql/$ver/$name/pg_hba.conf and reload"
  pg_trust_local "$ver" "$name"
  say "reloading postgres cluster $ver/$name"
  pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" reload
  wait_until "passwordless login as postgres on $PG_HOST:$PG_PORT" "$(pg_logfile "$ver" "$name")" pg_trust_works
  say "postgres: ready on $PG_HOST:$PG_PORT"
}

# ---------------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------------

# timeout: redis-cli has no connect/read timeout of its own and waits forever on a port held by
# something that accepts but never answers.
redis_ready() { [ "$(timeout 3 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }

ensure_redis() {
  if command -v redis-cli >/dev/null 2>&1 && redis_ready; then
    say "redis: already running on $REDIS_HOST:$REDIS_PORT"
    return 0
  fi
  if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    apt_install redis-server
    # The package's init script may have started its own server on 6379 (bind 127.0.0.1 -::1):
    # that serves the tests just as well, don't start a second one.
    if redis_ready; then
      say "redis: ready on $REDIS_HOST:$REDIS_PORT (started by the package)"
      return 0
    fi
  fi
  need_root "Redis is not running on $REDIS_HOST:$REDIS_PORT" \
    "sudo mkdir -p /var/lib/redis /var/log/redis && sudo redis-server --daemonize yes --bind 127.0.0.1 -::1 --port $REDIS_PORT --save '' --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log"
  mkdir -p /var/lib/redis /var/log/redis
  say "starting redis-server on $REDIS_HOST:$REDIS_PORT"
  # No persistence (--save "", --appendonly no): test data is throwaway and snapshots would only
  # add latency spikes to the sweep measurements. "-::1": listen on IPv6 loopback if it exists.
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
    --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_until "redis on $REDIS_HOST:$REDIS_PORT" /var/log/redis/ci.log redis_ready
  say "redis: ready on $REDIS_HOST:$REDIS_PORT"
}

# ---------------------------------------------------------------------------------------------
# Tools and directories the tests use
# ---------------------------------------------------------------------------------------------

ensure_openssl() {
  if command -v openssl >/dev/null 2>&1; then
    return 0
  fi
  apt_install openssl
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

ensure_postgres
ensure_redis
ensure_openssl
ensure_tmp_reachable
