#!/usr/bin/env bash
# Install cache-invalidator as a systemd service on this host, or upgrade it in place, on machines
# without dpkg (with dpkg, the Debian package is simpler: see README.md).
#
#   sudo systemd/install.sh [BINARY]      (default: target/release/cache-invalidator)
#
# Steps, each safe to repeat: a dedicated system user (no login, no home); the binary in
# /usr/local/bin; the unit in /etc/systemd/system; /etc/cache-invalidator/env from env.example,
# only if there is none yet (never overwrites your settings); `cache-invalidator install` (creates
# or updates the triggers; idempotent); then enable and (re)start the service.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${1:-${CARGO_TARGET_DIR:-$repo/target}/release/cache-invalidator}
user=cache-invalidator
unit=cache-invalidator.service
conf_dir=/etc/cache-invalidator
env_file=$conf_dir/env

say() { printf 'install: %s\n' "$*"; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 $*)"
[ -x "$bin" ] || die "no executable at $bin: build it first (cargo build --release --locked) or pass its path"

# A fixed system user rather than DynamicUser=: operators can run `check`/`status` as the same
# identity (runuser -u $user), and the env file can be group-readable by it.
if ! getent passwd "$user" >/dev/null; then
  say "creating system user $user"
  useradd --system --user-group --home-dir /nonexistent --no-create-home \
    --shell /usr/sbin/nologin --comment "cache-invalidator daemon" "$user"
fi

say "installing $bin -> /usr/local/bin/cache-invalidator"
install -m 0755 -o root -g root "$bin" /usr/local/bin/cache-invalidator
say "installing $unit -> /etc/systemd/system/$unit"
# The unit names /usr/bin, where the Debian package puts the binary; this script's copy is in
# /usr/local/bin (the path for what the package manager does not own).
sed 's|^ExecStart=/usr/bin/cache-invalidator |ExecStart=/usr/local/bin/cache-invalidator |' \
  "$repo/systemd/$unit" >"/etc/systemd/system/$unit.tmp"
grep -q '^ExecStart=/usr/local/bin/cache-invalidator ' "/etc/systemd/system/$unit.tmp" ||
  die "systemd/$unit has no ExecStart=/usr/bin/cache-invalidator line to point at /usr/local/bin"
chmod 0644 "/etc/systemd/system/$unit.tmp"
mv "/etc/systemd/system/$unit.tmp" "/etc/systemd/system/$unit"

install -d -m 0750 -o root -g "$user" "$conf_dir"
if [ ! -e "$env_file" ]; then
  # 0640 root:$user: the URLs may hold passwords; the service user may read, not change them.
  say "creating $env_file from systemd/env.example: review DATABASE_URL and REDIS_URL"
  install -m 0640 -o root -g "$user" "$repo/systemd/env.example" "$env_file"
fi

# Run `install` with exactly the settings the service will get: the env file read the way
# systemd's EnvironmentFile= reads it (KEY=value, # comments, one pair of quotes stripped, no shell
# expansion, so a '$' in a password stays a '$'), as the service user.
#
# The values reach the program through its environment, never its command line: `export` is a shell
# builtin (no process, nothing in `ps`), and runuser passes the environment on. A process's
# environment is readable only by its own user and root (/proc/PID/environ is mode 0400), its
# command line by everyone.
settings=()
while IFS= read -r line || [ -n "$line" ]; do
  line=${line#"${line%%[![:space:]]*}"}
  case $line in '' | '#'* | ';'*) continue ;; esac
  [[ $line == *=* ]] || die "$env_file: a line is not KEY=value (its text is not shown: it may hold a password)"
  key=${line%%=*}
  key=${key%"${key##*[![:space:]]}"}
  [[ $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "$env_file: '$key' is not a variable name"
  value=${line#*=}
  value=${value#"${value%%[![:space:]]*}"}
  value=${value%"${value##*[![:space:]]}"}
  case $value in \"*\" | \'*\') value=${value:1:${#value}-2} ;; esac
  settings+=("$key=$value")
done <"$env_file"

say "running cache-invalidator install (schema, outbox, triggers)"
if ! (
  # Only the env file's settings: none of the caller's own DATABASE_URL, CACHE_INVALIDATOR_*, …
  while IFS= read -r name; do
    unset "$name"
  done < <(compgen -e | grep -E '^(DATABASE_URL|REDIS_URL|CACHE_INVALIDATOR_.*|RUST_LOG|PG.*)$' || true)
  for setting in "${settings[@]}"; do
    export "$setting"
  done
  exec runuser -u "$user" -- /usr/local/bin/cache-invalidator install
); then
  die "cache-invalidator install failed: check DATABASE_URL in $env_file (the user must be allowed to create the schema and triggers), then run this script again"
fi

# systemd's own test for "booted with systemd": without it (a container, a chroot) there is
# nothing to enable; say so rather than pretend.
if [ ! -d /run/systemd/system ]; then
  die "systemd is not running on this host (PID 1 is $(cat /proc/1/comm 2>/dev/null || echo unknown)): files are installed, but the service could not be enabled or started"
fi
was_active=0
systemctl is-active --quiet "$unit" && was_active=1
say "systemctl daemon-reload && systemctl enable --now $unit"
systemctl daemon-reload
systemctl enable --now "$unit"
if [ "$was_active" -eq 1 ]; then
  # enable --now leaves a running service alone: restart so it runs the binary just installed.
  say "restarting $unit (it was running the previous binary)"
  systemctl restart "$unit"
fi
systemctl --no-pager --lines=5 status "$unit" || true
