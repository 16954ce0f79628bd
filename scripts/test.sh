#!/usr/bin/env bash
# The project's whole test gate, in the order that fails fastest on a typical mistake:
# compile everything (tests, the bench and the test support crate too: --workspace), then
# formatting, then lints, then the alerting rules (promtool), then the tests.
# CI runs exactly this (through .ci/run, which first starts Postgres and Redis); so can you.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The servers scripts/ensure-services.sh found or started (target/services.env), unless the caller
# chose some with TEST_DATABASE_URL / TEST_REDIS_URL; without either, the tests' defaults
# (127.0.0.1:5432 and 127.0.0.1:6379).
services_env=${CARGO_TARGET_DIR:-target}/services.env
if [ -z "${TEST_DATABASE_URL:-}${TEST_REDIS_URL:-}" ] && [ -f "$services_env" ]; then
  # shellcheck source=/dev/null
  . "$services_env"
  export TEST_DATABASE_URL TEST_REDIS_URL
fi
# Valkey (TEST_VALKEY_URL, from the same file unless set): the data-path, index-mode and fault
# suites run on it too. TEST_VALKEY_URL=none skips them, said at the end.
if [ -z "${TEST_VALKEY_URL:-}" ] && [ -f "$services_env" ]; then
  TEST_VALKEY_URL=$(
    # shellcheck source=/dev/null
    . "$services_env"
    printf '%s' "${TEST_VALKEY_URL:-}"
  )
fi
[ -n "${TEST_VALKEY_URL:-}" ] ||
  { echo "test.sh: no Valkey to test against: run scripts/ensure-services.sh (it starts one), set TEST_VALKEY_URL, or TEST_VALKEY_URL=none to skip" >&2; exit 1; }
printf 'test.sh: postgres %s, redis %s\n' "${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres (default)}" \
  "${TEST_REDIS_URL:-redis://127.0.0.1:6379/0 (default)}"

# --locked everywhere: CI must build the dependency versions that Cargo.lock records, and fail
# loudly if Cargo.toml changed without the lock file being updated and committed.
cargo build --workspace --all-targets --locked
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The alerting rules that ship (deploy/prometheus): valid, and their unit tests pass.
command -v promtool >/dev/null 2>&1 ||
  { echo "test.sh: promtool not found: run scripts/ensure-services.sh (it installs Debian's prometheus package) or apt-get install prometheus" >&2; exit 1; }
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml
# Integration tests share one Postgres and one Redis; they isolate themselves with their own
# databases and key prefixes, so they may run in parallel. 4 threads keeps a 2-core machine busy
# while waiting on I/O without piling up timeouts.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Every suite with the daemon in index mode, then the data-path, fault, cluster, refill and
# key-fidelity and sentinel suites again in sweep mode: both ways of finding keys must pass them (tests/common:
# TEST_MODE).
TEST_MODE=index cargo test --locked -- --test-threads=4 2>&1 | tee "$log"
# The bench's own unit tests (how it judges and where it measures): no server needed.
cargo test --locked -p cache-invalidator-bench 2>&1 | tee -a "$log"
TEST_MODE=sweep cargo test --locked --test data_path --test faults --test cluster --test refill --test key_fidelity \
    --test sentinel     -- --test-threads=4 2>&1 | tee -a "$log"
# Valkey, both modes: the same suites, the daemon's Redis and the fault tests' private servers
# (valkey-server, test-support: TEST_REDIS_SERVER_BIN) being Valkey.
if [ "$TEST_VALKEY_URL" != none ]; then
  for mode in index sweep; do
    TEST_REDIS_URL=$TEST_VALKEY_URL TEST_REDIS_SERVER_BIN=valkey-server TEST_MODE=$mode \
      cargo test --locked --test data_path --test index_mode --test faults -- --test-threads=4 2>&1 | tee -a "$log"
  done
fi
# One closing line for the whole run: cargo prints a summary per test binary, and the last one
# (an empty doc-test run, for instance) says nothing about the suite.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
[ "$TEST_VALKEY_URL" != none ] || echo "test.sh: Valkey suites skipped (TEST_VALKEY_URL=none)"
