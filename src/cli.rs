//! The command line (contract: DESIGN.md, "Command line"): subcommands, flags and their
//! environment variables. Values given neither as a flag nor in the environment come from the
//! optional config file (`--config`), then from the documented defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::settings::{
    parse_duration, Connections, LogFormat, Mode, RulesSource, SecretUrl, Settings,
    DEFAULT_CLAIM_TIMEOUT, DEFAULT_MAX_BACKLOG_AGE, DEFAULT_POLL_INTERVAL, DEFAULT_REDIS_TIMEOUT,
    DEFAULT_REFILL_GUARD, DEFAULT_REPLICA_WAIT_TIMEOUT,
};

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";

/// `--version`: the crate version and the git commit it was built from (`build.rs`).
const VERSION_LINE: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("CACHE_INVALIDATOR_COMMIT"),
    ")"
);

#[derive(Debug, Parser)]
#[command(
    name = "cache-invalidator",
    version = VERSION_LINE,
    about = "Keeps a Redis cache honest: Postgres triggers record every committed change in an \
             outbox, and a worker clears the cache keys the rules name.",
    after_help = "Quick start:\n  cache-invalidator install     # once, and after the rules change\n  \
                  cache-invalidator run         # the daemon\n  cache-invalidator status      # what waits\n\n\
                  Settings come from flags, then the environment, then --config FILE, then defaults."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Postgres URL; libpq's sslmode (disable…verify-full) and sslrootcert are understood
    /// [default: postgres://postgres@127.0.0.1:5432/postgres]
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<SecretUrl>,

    /// Redis URL: redis://, rediss:// (TLS), or redis+cluster://host:port,host:port for a
    /// Redis Cluster [default: redis://127.0.0.1:6379/0]
    #[arg(long, env = "REDIS_URL", hide_env_values = true, global = true)]
    pub redis_url: Option<SecretUrl>,

    /// PEM file of the CA that signed Redis' TLS certificate (when not in the system store)
    #[arg(long, env = "CACHE_INVALIDATOR_REDIS_CA_FILE", global = true)]
    pub redis_ca_file: Option<PathBuf>,

    /// Rules file (TOML) replacing the built-in rules
    #[arg(long, env = "CACHE_INVALIDATOR_RULES", global = true)]
    pub rules: Option<PathBuf>,

    /// Log format; RUST_LOG filters (e.g. RUST_LOG=cache_invalidator=debug) [default: text]
    #[arg(long, env = "CACHE_INVALIDATOR_LOG_FORMAT", value_enum, global = true)]
    pub log_format: Option<LogFormat>,

    /// TOML file with any of: database_url, redis_url, redis_ca_file, rules, log_format,
    /// metrics_addr, refill_guard, poll_interval, max_backlog_age, redis_timeout, mode,
    /// index_max_keys, claim_timeout, replica_acks, replica_wait_timeout
    #[arg(long, env = "CACHE_INVALIDATOR_CONFIG", global = true)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: LISTEN, drain the outbox, clear keys; exits 0 on SIGTERM/SIGINT after the
    /// batch in flight. SIGHUP reloads the rules file.
    #[command(
        after_help = "Example:\n  DATABASE_URL=postgres://app@db/reports REDIS_URL=redis://cache:6379/0 \\\n    \
                            cache-invalidator run --metrics-addr 127.0.0.1:9187"
    )]
    Run(RunArgs),
    /// Create or update the schema, outbox and triggers for the rules (idempotent)
    #[command(
        after_help = "Example:\n  cache-invalidator --rules /etc/cache-invalidator/rules.toml install"
    )]
    Install,
    /// Remove the triggers and the cache_invalidator schema; the app's tables are untouched
    #[command(after_help = "Example:\n  cache-invalidator uninstall")]
    Uninstall,
    /// Print the SQL install (or uninstall) would run, for review or a migration
    #[command(after_help = "Example:\n  cache-invalidator sql > install.sql")]
    Sql {
        /// Print the uninstall SQL instead
        #[arg(long)]
        uninstall: bool,
    },
    /// Validate the rules, reach both servers, and compare the installed triggers with the rules
    #[command(after_help = "Example:\n  cache-invalidator check && echo ok")]
    Check,
    /// Show the outbox backlog, the oldest pending change, dead letters and connected workers;
    /// exits 1 when no worker is listening or the oldest pending change is older than --max-age
    /// (a health probe)
    #[command(
        after_help = "Exit codes:\n  0  a worker is listening and the backlog is younger than --max-age\n  \
                      1  unhealthy: no worker is listening, or the oldest pending change is older\n  \
                      2  error: invalid settings, or Postgres cannot be reached\n\n\
                      Example:\n  cache-invalidator status --max-age 30s || alert"
    )]
    Status {
        /// Backlog age above which the exit code is 1
        #[arg(long, value_parser = parse_duration, default_value = "60s")]
        max_age: Duration,
    },
    /// Clear a user's or a report's keys by hand (the old cache strategy's manual operations)
    #[command(
        after_help = "Examples:\n  cache-invalidator invalidate --user 123 --dry-run\n  \
                            cache-invalidator invalidate --report 42"
    )]
    Invalidate(InvalidateArgs),
    /// Print the patterns a change to a row of TABLE clears
    #[command(
        after_help = "Example:\n  cache-invalidator explain --table reports_report --row '{\"id\": 7, \"author_id\": 3}'"
    )]
    Explain {
        /// Table as named in the rules
        #[arg(long)]
        table: String,
        /// The row's values as a JSON object
        #[arg(long)]
        row: String,
    },
    /// Put dead letters back into the outbox (after fixing the rules)
    #[command(
        after_help = "Example:\n  cache-invalidator retry-dead-letters            # all\n  \
                            cache-invalidator retry-dead-letters --id 12"
    )]
    RetryDeadLetters {
        /// Only these dead letters (ids as shown by status); default: all
        #[arg(long)]
        id: Vec<i64>,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Serve /metrics (Prometheus) and /healthz on this address [default: no listener]
    #[arg(long, env = "CACHE_INVALIDATOR_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Clear every pattern again after this delay, catching stale refills; 0 turns it off
    /// [default: 2s]
    #[arg(long, env = "CACHE_INVALIDATOR_REFILL_GUARD", value_parser = parse_duration)]
    pub refill_guard: Option<Duration>,
    /// Look at the outbox this often even without a notification [default: 5s]
    #[arg(long, env = "CACHE_INVALIDATOR_POLL_INTERVAL", value_parser = parse_duration)]
    pub poll_interval: Option<Duration>,
    /// /healthz fails when the oldest pending change is older [default: 60s]
    #[arg(long, env = "CACHE_INVALIDATOR_MAX_BACKLOG_AGE", value_parser = parse_duration)]
    pub max_backlog_age: Option<Duration>,
    /// Timeout of one Redis round trip; a stuck server fails the batch, which is retried
    /// [default: 5s]
    #[arg(long, env = "CACHE_INVALIDATOR_REDIS_TIMEOUT", value_parser = parse_duration)]
    pub redis_timeout: Option<Duration>,
    /// How a change's keys are found: index (an index of the cache keys fed by Redis' tracking
    /// announcements: milliseconds at any keyspace size), sweep (one SCAN pass per window of
    /// changes: no memory for an index), or auto (index where Redis allows it) [default: auto]
    #[arg(long, env = "CACHE_INVALIDATOR_MODE", value_enum)]
    pub mode: Option<Mode>,
    /// Most keys the index may hold; past it the worker drops the index and sweeps
    /// [default: 10000000, about 1 GB]
    #[arg(long, env = "CACHE_INVALIDATOR_INDEX_MAX_KEYS")]
    pub index_max_keys: Option<usize>,
    /// Longest a worker holds a claimed change; a frozen worker's claims go to the others after it
    /// [default: 30s]
    #[arg(long, env = "CACHE_INVALIDATOR_CLAIM_TIMEOUT", value_parser = parse_duration)]
    pub claim_timeout: Option<Duration>,
    /// Replicas of a Redis node that must have its deletes (WAIT) before a change is
    /// acknowledged [default: every replica connected to the node]
    #[arg(long, env = "CACHE_INVALIDATOR_REPLICA_ACKS")]
    pub replica_acks: Option<u32>,
    /// How long to wait for those replicas; at the timeout the change is kept and retried
    /// [default: 1s]
    #[arg(long, env = "CACHE_INVALIDATOR_REPLICA_WAIT_TIMEOUT", value_parser = parse_duration)]
    pub replica_wait_timeout: Option<Duration>,
}

/// Exactly one of `--user` and `--report`; `--dry-run` goes with either.
#[derive(Debug, Args)]
#[group(skip)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["user", "report"])))]
pub struct InvalidateArgs {
    /// A user id: clears report:*:{U}:* and reportlist:*:{U}:*
    #[arg(long)]
    pub user: Option<String>,
    /// A report id: clears report:{R}:*
    #[arg(long)]
    pub report: Option<String>,
    /// Print the keys that would be deleted and their count; delete nothing
    #[arg(long)]
    pub dry_run: bool,
}

/// The optional config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    database_url: Option<String>,
    redis_url: Option<String>,
    redis_ca_file: Option<PathBuf>,
    rules: Option<PathBuf>,
    log_format: Option<String>,
    metrics_addr: Option<SocketAddr>,
    refill_guard: Option<String>,
    poll_interval: Option<String>,
    max_backlog_age: Option<String>,
    redis_timeout: Option<String>,
    mode: Option<Mode>,
    index_max_keys: Option<usize>,
    claim_timeout: Option<String>,
    replica_acks: Option<u32>,
    replica_wait_timeout: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("config file {path}: {message}")]
    Config { path: String, message: String },
    #[error(transparent)]
    Rules(#[from] crate::rules::RulesError),
    #[error("{setting} must be longer than 0 (it paces a loop: 0 would spin)")]
    Zero { setting: &'static str },
}

fn load_config(path: Option<&PathBuf>) -> Result<ConfigFile, SettingsError> {
    let Some(path) = path else {
        return Ok(ConfigFile::default());
    };
    let error = |message: String| SettingsError::Config {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    toml::from_str(&text).map_err(|e| error(e.to_string()))
}

fn duration_setting(
    flag: Option<Duration>,
    file: Option<&String>,
    name: &str,
    path: Option<&PathBuf>,
    default: Duration,
) -> Result<Duration, SettingsError> {
    if let Some(value) = flag {
        return Ok(value);
    }
    match file {
        Some(text) => parse_duration(text).map_err(|message| SettingsError::Config {
            path: path.map(|p| p.display().to_string()).unwrap_or_default(),
            message: format!("{name}: {message}"),
        }),
        None => Ok(default),
    }
}

impl GlobalArgs {
    /// The log format, decided before anything else so errors are logged as configured.
    pub fn log_format(&self) -> LogFormat {
        if let Some(format) = self.log_format {
            return format;
        }
        load_config(self.config.as_ref())
            .ok()
            .and_then(|file| file.log_format)
            .and_then(|text| <LogFormat as clap::ValueEnum>::from_str(&text, true).ok())
            .unwrap_or(LogFormat::Text)
    }

    /// Connections and rules, merged from flags, environment, config file and defaults.
    pub fn settings(&self, run: Option<&RunArgs>) -> Result<Settings, SettingsError> {
        let file = load_config(self.config.as_ref())?;
        let connections = Connections {
            database_url: self.database_url.clone().unwrap_or_else(|| {
                SecretUrl::new(file.database_url.as_deref().unwrap_or(DEFAULT_DATABASE_URL))
            }),
            redis_url: self.redis_url.clone().unwrap_or_else(|| {
                SecretUrl::new(file.redis_url.as_deref().unwrap_or(DEFAULT_REDIS_URL))
            }),
            redis_ca_file: self.redis_ca_file.clone().or(file.redis_ca_file.clone()),
        };
        let rules_source = match self.rules.clone().or(file.rules.clone()) {
            Some(path) => RulesSource::File(path),
            None => RulesSource::Builtin,
        };
        let mut settings = Settings::new(connections);
        settings.rules = rules_source.load()?;
        settings.rules_source = rules_source;
        let path = self.config.as_ref();
        settings.metrics_addr = run.and_then(|r| r.metrics_addr).or(file.metrics_addr);
        settings.refill_guard = duration_setting(
            run.and_then(|r| r.refill_guard),
            file.refill_guard.as_ref(),
            "refill_guard",
            path,
            DEFAULT_REFILL_GUARD,
        )?;
        settings.poll_interval = duration_setting(
            run.and_then(|r| r.poll_interval),
            file.poll_interval.as_ref(),
            "poll_interval",
            path,
            DEFAULT_POLL_INTERVAL,
        )?;
        settings.max_backlog_age = duration_setting(
            run.and_then(|r| r.max_backlog_age),
            file.max_backlog_age.as_ref(),
            "max_backlog_age",
            path,
            DEFAULT_MAX_BACKLOG_AGE,
        )?;
        settings.redis_timeout = duration_setting(
            run.and_then(|r| r.redis_timeout),
            file.redis_timeout.as_ref(),
            "redis_timeout",
            path,
            DEFAULT_REDIS_TIMEOUT,
        )?;
        settings.mode = run.and_then(|r| r.mode).or(file.mode).unwrap_or(Mode::Auto);
        if let Some(max) = run.and_then(|r| r.index_max_keys).or(file.index_max_keys) {
            settings.index_max_keys = max;
        }
        settings.claim_timeout = duration_setting(
            run.and_then(|r| r.claim_timeout),
            file.claim_timeout.as_ref(),
            "claim_timeout",
            path,
            DEFAULT_CLAIM_TIMEOUT,
        )?;
        settings.replica_acks = run.and_then(|r| r.replica_acks).or(file.replica_acks);
        settings.replica_wait_timeout = duration_setting(
            run.and_then(|r| r.replica_wait_timeout),
            file.replica_wait_timeout.as_ref(),
            "replica_wait_timeout",
            path,
            DEFAULT_REPLICA_WAIT_TIMEOUT,
        )?;
        // The refill guard may be 0 (off); these pace the worker's polling and bound a Redis
        // round trip, and 0 would make the worker spin or fail every command.
        for (setting, value) in [
            ("poll interval", settings.poll_interval),
            ("redis timeout", settings.redis_timeout),
        ] {
            if value.is_zero() {
                return Err(SettingsError::Zero { setting });
            }
        }
        Ok(settings)
    }
}
