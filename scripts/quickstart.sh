#!/usr/bin/env bash
# One command that shows the whole data path on a fresh machine:
#   services up -> release build -> demo database with the reports tables -> `install` (triggers)
#   -> django-redis style keys in Redis -> daemon running -> writes made with plain psql
#   -> the keys those writes concern disappear, the decoys stay.
#
# The writes deliberately bypass any ORM (raw UPDATE, an owner change, a DELETE with a cascade):
# the point of the daemon is that every committed write invalidates, however it was made.
#
# Safe to re-run: the demo database is dropped and recreated, and in Redis only the demo keys
# listed below are written (SET per key; no FLUSHDB), so other data on the server is left alone.
# Exits non-zero if a key that should have been cleared is still there, or a decoy was deleted.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DB=cache_invalidator_demo
BIN="${CARGO_TARGET_DIR:-target}/release/cache-invalidator"
LOG_DIR="${CARGO_TARGET_DIR:-target}/quickstart"
LOG="$LOG_DIR/daemon.log"
# How long the daemon gets to clear the keys. It reacts to NOTIFY within milliseconds; 10 s leaves
# room for a slow first connection without letting a broken build hang the script.
CLEAR_TIMEOUT_S=10
# How long SIGTERM may take: the daemon finishes the batch in flight, then exits 0.
STOP_TIMEOUT_S=15

section() { printf '\n=== %s ===\n' "$*"; }
fail() { printf '\nquickstart: FAILED: %s\n' "$*" >&2; exit 1; }

# Set once the servers are known (step 1): the admin URL, the demo database's URL, Redis' URL.
ADMIN_URL=
psql_admin() { psql -X -q -v ON_ERROR_STOP=1 -d "$ADMIN_URL" "$@"; }
psql_demo() { psql -X -q -v ON_ERROR_STOP=1 -d "$DATABASE_URL" "$@"; }
rcli() { redis-cli -u "$REDIS_URL" "$@"; }

# Logical django-redis keys (KEY_PREFIX='', VERSION=1 -> ":1:" in front).
# Each of these is named by a default rule for one of the writes below.
EXPECTED_CLEARED=(
  ":1:report:1:1:abc"                       # UPDATE reports_report id=1 -> report:1:*
  ":1:reportlist:reports:1:abc"             # ... and its author's list (author_id=1)
  ":1:studentreport:1:2:x"                  # owner change of studentreport 1 -> studentreport:1:*
  ":1:reportlist:student-reports:2:x"       # ... the old student's list (OLD.student_id=2)
  ":1:reportlist:student-reports:3:x"       # ... the new student's list (NEW.student_id=3)
  ":1:reportlist:student-reports:5:x"       # ... the teacher's list (teacher_id=5)
  ":1:tutorreport:1:4:x"                    # DELETE tutorweeklyreport 1 -> tutorreport:1:*
  ":1:reportlist:tutor-reports:4:x"         # ... its tutor's list
  ":1:teacherreport:2:5:x"                  # DELETE user 6 cascades to teacherweeklyreport 2
  ":1:reportlist:teacher-reports:6:x"       # ... whose student was user 6
)
# Keys that look close but no write concerns: they must survive.
DECOYS=(
  ":1:report:12:1:h"                        # report 12, not report 1: `report:1:*` must not match
  ":1:report:123:1:h"                       # same, longer id
  ":2:report:1:1:abc"                       # another cache VERSION
  ":1:reportlist:reports:2:abc"             # another user's list
  ":1:studentreport:12:2:x"                 # studentreport 12, not 1
  ":1:cache_stats:1"                        # hit/miss counters: never invalidated
)

daemon_pid=
stop_daemon() {
  [ -n "$daemon_pid" ] || return 0
  local pid=$daemon_pid
  daemon_pid=
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -TERM "$pid"
  local deadline=$((SECONDS + STOP_TIMEOUT_S))
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "daemon (pid $pid) still running ${STOP_TIMEOUT_S}s after SIGTERM: sending SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.2
  done
  local rc=0
  wait "$pid" || rc=$?
  return "$rc"
}
# Whatever happens (a failed step, Ctrl-C), don't leave a daemon running behind us.
trap 'stop_daemon || true' EXIT

# Rust first, before anything is installed or started: an older rustc (Debian 12 packages 1.63)
# would otherwise fail minutes into the build on some dependency's newer syntax, naming neither
# version. The minimum is Cargo.toml's `rust-version`, read from there so it is written once.
version_at_least() { # FOUND REQUIRED: dotted numbers; a suffix such as "-nightly" is ignored
  local -a have want
  local i h w
  IFS=. read -r -a have <<<"${1%%-*}"
  IFS=. read -r -a want <<<"$2"
  for i in 0 1 2; do
    h=${have[i]:-0} w=${want[i]:-0}
    [[ $h =~ ^[0-9]+$ && $w =~ ^[0-9]+$ ]] || return 1
    ((10#$h > 10#$w)) && return 0
    ((10#$h < 10#$w)) && return 1
  done
  return 0
}
RUST_REQUIRED=$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' Cargo.toml)
[ -n "$RUST_REQUIRED" ] || fail "no rust-version found in Cargo.toml"
RUSTUP_HINT="install or update Rust with rustup: https://rustup.rs (Debian 12's packaged rustc, 1.63, is too old)"
if ! command -v rustc >/dev/null 2>&1 || ! command -v cargo >/dev/null 2>&1; then
  fail "Rust $RUST_REQUIRED or newer is required, but rustc or cargo was not found on PATH; $RUSTUP_HINT"
fi
# `rustc --version` prints "rustc 1.88.0 (6b00bc388 2025-06-23)"; it fails when rustup has no
# default toolchain, which must not end the script without a word (set -e).
rust_found=$(rustc --version 2>/dev/null | awk '{ print $2 }') || rust_found=
[ -n "$rust_found" ] ||
  fail "Rust $RUST_REQUIRED or newer is required, but \`rustc --version\` failed ($(command -v rustc)); $RUSTUP_HINT"
version_at_least "$rust_found" "$RUST_REQUIRED" ||
  fail "Rust $RUST_REQUIRED or newer is required, found rustc $rust_found ($(command -v rustc)); $RUSTUP_HINT"
echo "rustc $rust_found (Cargo.toml asks for $RUST_REQUIRED or newer)"

section "1/8 services (Postgres and Redis: the running ones if they accept us, else private ones)"
scripts/ensure-services.sh
# shellcheck source=/dev/null
. "${CARGO_TARGET_DIR:-target}/services.env"
ADMIN_URL=$TEST_DATABASE_URL
# The demo database on the same server: the admin URL with its database name replaced.
[[ $ADMIN_URL =~ ^(postgres(ql)?://[^/?]*)(/[^?]*)?(\?.*)?$ ]] ||
  fail "cannot read the database URL ensure-services.sh chose"
export DATABASE_URL="${BASH_REMATCH[1]}/$DB${BASH_REMATCH[4]}"
export REDIS_URL=$TEST_REDIS_URL
# Not printed: a URL the caller gave may hold a password.
echo "demo database $DB on the servers listed in ${CARGO_TARGET_DIR:-target}/services.env"

section "2/8 build (cargo build --release)"
cargo build --release
[ -x "$BIN" ] || fail "no binary at $BIN after the build"

section "3/8 demo database $DB"
# WITH (FORCE) also ends connections left over from an interrupted earlier run.
psql_admin \
  -c "SET client_min_messages = warning" \
  -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" \
  -c "CREATE DATABASE $DB"
psql_demo <<'SQL'
CREATE TABLE auth_user (id serial PRIMARY KEY, username text NOT NULL);
CREATE TABLE reports_report (
  id serial PRIMARY KEY, title text, body text,
  author_id int REFERENCES auth_user(id) ON DELETE CASCADE,
  updated_at timestamptz DEFAULT now());
CREATE TABLE reports_studentreport (
  id serial PRIMARY KEY, title text,
  student_id int REFERENCES auth_user(id) ON DELETE CASCADE,
  teacher_id int REFERENCES auth_user(id) ON DELETE CASCADE);
CREATE TABLE reports_tutorweeklyreport (
  id serial PRIMARY KEY, week date, notes text,
  tutor_id int REFERENCES auth_user(id) ON DELETE CASCADE,
  student_id int REFERENCES auth_user(id) ON DELETE CASCADE);
CREATE TABLE reports_teacherweeklyreport (
  id serial PRIMARY KEY, week date, notes text,
  teacher_id int REFERENCES auth_user(id) ON DELETE CASCADE,
  student_id int REFERENCES auth_user(id) ON DELETE CASCADE);

-- Explicit ids so the keys above name real rows; setval keeps later inserts from colliding.
INSERT INTO auth_user (id, username) VALUES
  (1, 'alice'), (2, 'bob'), (3, 'carol'), (4, 'dave'), (5, 'erin'), (6, 'frank');
INSERT INTO reports_report (id, title, body, author_id) VALUES
  (1, 'Q1 summary', 'first draft', 1), (2, 'Q2 summary', 'draft', 2), (12, 'Q12', 'old', 1);
INSERT INTO reports_studentreport (id, title, student_id, teacher_id) VALUES
  (1, 'Algebra', 2, 5), (12, 'Geometry', 3, 5);
INSERT INTO reports_tutorweeklyreport (id, week, notes, tutor_id, student_id) VALUES
  (1, '2024-09-02', 'good progress', 4, 2), (2, '2024-09-09', 'needs practice', 4, 3);
INSERT INTO reports_teacherweeklyreport (id, week, notes, teacher_id, student_id) VALUES
  (1, '2024-09-02', 'attentive', 5, 2), (2, '2024-09-02', 'absent twice', 5, 6);
\o /dev/null
SELECT setval('auth_user_id_seq', max(id)) FROM auth_user;
SELECT setval('reports_report_id_seq', max(id)) FROM reports_report;
SELECT setval('reports_studentreport_id_seq', max(id)) FROM reports_studentreport;
SELECT setval('reports_tutorweeklyreport_id_seq', max(id)) FROM reports_tutorweeklyreport;
SELECT setval('reports_teacherweeklyreport_id_seq', max(id)) FROM reports_teacherweeklyreport;
\o
SQL
psql_demo -c "SELECT 'auth_user' AS table, count(*) FROM auth_user
  UNION ALL SELECT 'reports_report', count(*) FROM reports_report
  UNION ALL SELECT 'reports_studentreport', count(*) FROM reports_studentreport
  UNION ALL SELECT 'reports_tutorweeklyreport', count(*) FROM reports_tutorweeklyreport
  UNION ALL SELECT 'reports_teacherweeklyreport', count(*) FROM reports_teacherweeklyreport"

section "4/8 cache-invalidator install (schema, outbox, triggers)"
"$BIN" install

section "5/8 demo keys in Redis (only these keys are written)"
for key in "${EXPECTED_CLEARED[@]}" "${DECOYS[@]}"; do
  rcli SET "$key" "demo value" >/dev/null
done
printf 'to be cleared: %s\n' "${EXPECTED_CLEARED[@]}"
printf 'decoys:        %s\n' "${DECOYS[@]}"

section "6/8 daemon: cache-invalidator run (log: $LOG)"
mkdir -p "$LOG_DIR"
# NO_COLOR: keep ANSI escapes out of the log file we print below.
RUST_LOG=cache_invalidator=debug,info NO_COLOR=1 "$BIN" run >"$LOG" 2>&1 &
daemon_pid=$!
echo "started, pid $daemon_pid"
sleep 1
if ! kill -0 "$daemon_pid" 2>/dev/null; then
  rc=0
  wait "$daemon_pid" || rc=$?
  daemon_pid=
  cat "$LOG"
  fail "the daemon exited at start (exit code $rc); its log is above"
fi

section "7/8 writes made with psql (no ORM involved)"
# -e echoes each statement, and without -q psql prints what it did ("UPDATE 1").
psql -X -e -v ON_ERROR_STOP=1 -d "$DATABASE_URL" <<'SQL'
-- raw SQL update of one report
UPDATE reports_report SET title = 'Q1 summary (final)', updated_at = now() WHERE id = 1;
-- owner change: the old student's (2) and the new student's (3) lists must both go
UPDATE reports_studentreport SET student_id = 3 WHERE id = 1;
-- delete a weekly report
DELETE FROM reports_tutorweeklyreport WHERE id = 1;
-- delete a user: the cascade removes their teacher weekly report, which counts too
DELETE FROM auth_user WHERE id = 6;
SQL

section "8/8 waiting up to ${CLEAR_TIMEOUT_S}s for the keys to be cleared"
deadline=$((SECONDS + CLEAR_TIMEOUT_S))
while :; do
  left=$(rcli EXISTS "${EXPECTED_CLEARED[@]}")
  [ "$left" -eq 0 ] && break
  kill -0 "$daemon_pid" 2>/dev/null || break
  [ "$SECONDS" -ge "$deadline" ] && break
  sleep 0.2
done

# Stop before printing, so the log is complete (the last batches and the shutdown lines).
echo "--- stopping the daemon (SIGTERM) ---"
rc=0
stop_daemon || rc=$?
echo "daemon exited with code $rc"
echo "--- daemon log ---"
cat "$LOG"
echo "--- remaining demo keys ---"
status=0
for key in "${EXPECTED_CLEARED[@]}"; do
  if [ "$(rcli EXISTS "$key")" -ne 0 ]; then
    echo "NOT CLEARED  $key"
    status=1
  fi
done
for key in "${DECOYS[@]}"; do
  if [ "$(rcli EXISTS "$key")" -ne 0 ]; then
    echo "kept (decoy) $key"
  else
    echo "DELETED      $key   <- a decoy: nothing should have touched it"
    status=1
  fi
done

[ "$status" -eq 0 ] || fail "keys were not invalidated as expected (see the list above)"
[ "$rc" -eq 0 ] || fail "the daemon did not exit 0 on SIGTERM"
printf '\nquickstart: OK: all %d keys cleared, %d decoys kept, daemon stopped cleanly\n' \
  "${#EXPECTED_CLEARED[@]}" "${#DECOYS[@]}"
