#!/usr/bin/env bash
# The project's whole test gate, in the order that fails fastest on a typical mistake:
# compile everything (tests, benches, examples too), then formatting, then lints, then the tests.
# CI runs exactly this (through .ci/run, which first starts Postgres and Redis); so can you.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# --locked everywhere: CI must build the dependency versions that Cargo.lock records, and fail
# loudly if Cargo.toml changed without the lock file being updated and committed.
cargo build --all-targets --locked
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# Integration tests share one Postgres and one Redis; they isolate themselves with their own
# databases and key prefixes, so they may run in parallel. 4 threads keeps a 2-core machine busy
# while waiting on I/O without piling up timeouts.
cargo test --locked -- --test-threads=4
