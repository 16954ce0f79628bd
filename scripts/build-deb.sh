#!/usr/bin/env bash
# Build the Debian package: target/debian/cache-invalidator_<version>-1_<arch>.deb, with the binary,
# the systemd unit, the maintainer scripts of debian/ and the docs ([package.metadata.deb] in
# Cargo.toml says what goes where).
#
#   scripts/build-deb.sh              release build of the binary (minutes on 2 cores), then package
#   scripts/build-deb.sh --no-build   package the release binary already built
#                                     (target/release/cache-invalidator; fails naming it if absent)
#
# Extra arguments go to cargo deb (e.g. --deb-version 0.1.0-2). Needs cargo-deb
# (`cargo install cargo-deb --locked`); it prints the path of the .deb last.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { printf 'build-deb: error: %s\n' "$*" >&2; exit 1; }

build=1
if [ "${1:-}" = --no-build ]; then
  build=0
  shift
fi
command -v cargo-deb >/dev/null 2>&1 ||
  die "cargo-deb is not installed: cargo install cargo-deb --locked"
binary=${CARGO_TARGET_DIR:-target}/release/cache-invalidator
if [ "$build" -eq 1 ]; then
  # Only the daemon: the benchmark binary is not packaged.
  cargo build --release --locked --bin cache-invalidator
fi
# cargo deb would otherwise fail on a missing asset with a message about globs and paths.
[ -x "$binary" ] ||
  die "no release binary at $binary: build it first (cargo build --release --locked --bin cache-invalidator), or run this script without --no-build"
cargo deb -p cache-invalidator --no-build --locked "$@"
