#!/usr/bin/env bash
# The Debian package's life cycle on this machine, as an operator meets it (root; CI runs it from
# .ci/run): build it once, refuse to package without the binary, install with dpkg -i, check the
# binary, the unit, the user and the configuration file, upgrade over an edited configuration
# (kept), remove (configuration and user kept), purge (both gone).
#
# It installs and purges the package `cache-invalidator` on this machine: run it where that is
# fine (CI, a container), not on a host that runs the service. cargo-deb is installed when missing
# (`cargo install cargo-deb --locked`, a few minutes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

package=cache-invalidator
env_file=/etc/cache-invalidator/env
target_dir=${CARGO_TARGET_DIR:-target}

say() { printf 'deb-test: %s\n' "$*"; }
die() { printf 'deb-test: FAIL: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root: it installs and purges the package on this machine"
command -v dpkg >/dev/null 2>&1 || die "no dpkg here: the package cannot be tested (systemd/install.sh is for such machines)"
if ! command -v cargo-deb >/dev/null 2>&1; then
  say "installing cargo-deb 3.8.0 (cargo install cargo-deb --locked, a few minutes)"
  # The version the package was tested with; --locked: the versions its own lock file records.
  cargo install cargo-deb --locked --quiet --version 3.8.0
fi
if dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q installed; then
  die "$package is installed on this machine already: purge it first (dpkg -P $package) if this is a test machine"
fi

# Bad input: packaging without the binary names what is missing (an empty target directory).
empty=$(mktemp -d)
trap 'rm -rf "$empty"' EXIT
if out=$(CARGO_TARGET_DIR=$empty scripts/build-deb.sh --no-build 2>&1); then
  die "build-deb.sh --no-build packaged without a binary: $out"
fi
grep -q "no release binary at $empty/release/cache-invalidator" <<<"$out" ||
  die "build-deb.sh --no-build without a binary said: $out"
say "ok: packaging without the binary fails naming it"

# The release build, once; both packages below reuse it.
scripts/build-deb.sh
version=$(cargo metadata --no-deps --format-version 1 --locked |
  sed -n 's/.*"name":"cache-invalidator","version":"\([^"]*\)".*/\1/p')
[ -n "$version" ] || die "no version in cargo metadata"
arch=$(dpkg --print-architecture)
deb=$target_dir/debian/${package}_${version}-1_${arch}.deb
[ -f "$deb" ] || die "no $deb after building"
say "ok: built $deb"

dpkg -i "$deb" >/dev/null
out=$(cache-invalidator --version)
grep -q "$version" <<<"$out" || die "cache-invalidator --version says '$out', not $version"
[ "$(command -v cache-invalidator)" = /usr/bin/cache-invalidator ] || die "the binary is not /usr/bin/cache-invalidator"
say "ok: installed; cache-invalidator --version: $out"

getent passwd cache-invalidator >/dev/null || die "no system user cache-invalidator after install"
[ "$(stat -c '%a %U' "$env_file")" = "600 root" ] || die "$env_file is $(stat -c '%a %U' "$env_file"), not 600 root"
dpkg-query -W -f='${Conffiles}\n' "$package" | grep -q " $env_file " || die "$env_file is not a conffile"
unit=$(dpkg -L "$package" | grep '/systemd/system/cache-invalidator.service$') || die "the package has no unit"
grep -q '^ExecStart=/usr/bin/cache-invalidator run$' "$unit" || die "$unit does not start /usr/bin/cache-invalidator"
grep -q '^User=cache-invalidator$' "$unit" || die "$unit does not run as the package's user"
[ -f /usr/share/doc/$package/README.md ] || die "no README in /usr/share/doc/$package"
if command -v systemd-analyze >/dev/null 2>&1; then
  systemd-analyze verify "$unit" || die "systemd-analyze verify $unit failed"
  say "ok: systemd-analyze verify $unit"
else
  say "note: no systemd-analyze here; the unit was not verified"
fi
say "ok: user, unit, conffile $env_file (0600), docs"

# Upgrade over an edited configuration: dpkg keeps the operator's file (the package's version of
# it is the same, so dpkg does not even ask).
printf '# edited by deb-test\n' >>"$env_file"
scripts/build-deb.sh --no-build --deb-version "$version-2" >/dev/null
dpkg -i --force-confold "$target_dir/debian/${package}_${version}-2_${arch}.deb" >/dev/null
grep -q '^# edited by deb-test$' "$env_file" || die "the upgrade overwrote $env_file"
say "ok: upgraded to $version-2, $env_file kept as edited"

dpkg -r "$package" >/dev/null
[ ! -e /usr/bin/cache-invalidator ] || die "the binary stayed after remove"
grep -q '^# edited by deb-test$' "$env_file" || die "remove lost $env_file"
getent passwd cache-invalidator >/dev/null || die "remove deleted the user"
say "ok: removed; configuration and user kept"

dpkg -P "$package" >/dev/null
[ ! -e /etc/cache-invalidator ] || die "purge left /etc/cache-invalidator"
! getent passwd cache-invalidator >/dev/null || die "purge left the user"
say "ok: purged; configuration and user gone"
