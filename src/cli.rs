//! The command line (a contract scripts rely on: docs/configuration.md): subcommands, flags and
//! their environment variables, declared for clap and nothing else. What was given goes to
//! `settings.rs` ([`Cli::given`]), which merges it with the environment, the optional config file
//! (`--config`) and the defaults, and checks it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::settings::{env_names, parse_duration, Given, LogFormat, Mode, SecretUrl};

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
    /// Postgres: a postgres:// URL or a libpq key/value string (host=… user=… dbname=…);
    /// libpq's sslmode (disable…verify-full) and sslrootcert are understood
    /// [default: postgres://postgres@127.0.0.1:5432/postgres]
    #[arg(long, env = env_names::DATABASE_URL, hide_env_values = true, global = true)]
    pub database_url: Option<SecretUrl>,

    /// Redis URL: redis://, rediss:// (TLS), redis+cluster://host:port,host:port for a
    /// Redis Cluster, or redis+sentinel://host:port,host:port/SERVICE[/DB] for the master
    /// Sentinel watches (sentinels' password: ?sentinel_password=…) [default:
    /// redis://127.0.0.1:6379/0]
    #[arg(long, env = env_names::REDIS_URL, hide_env_values = true, global = true)]
    pub redis_url: Option<SecretUrl>,

    /// PEM file of the CA that signed Redis' TLS certificate (when not in the system store)
    #[arg(long, env = env_names::REDIS_CA_FILE, global = true)]
    pub redis_ca_file: Option<PathBuf>,

    /// Rules file (TOML) replacing the built-in rules
    #[arg(long, env = env_names::RULES, global = true)]
    pub rules: Option<PathBuf>,

    /// Log format; RUST_LOG filters (e.g. RUST_LOG=cache_invalidator=debug) [default: text]
    #[arg(long, env = env_names::LOG_FORMAT, value_enum, global = true)]
    pub log_format: Option<LogFormat>,

    /// TOML file with any of: database_url, redis_url, redis_ca_file, rules, log_format,
    /// metrics_addr, refill_guard, poll_interval, max_backlog_age, redis_timeout, mode,
    /// index_max_keys, claim_timeout, replica_acks, replica_wait_timeout
    #[arg(long, env = env_names::CONFIG, global = true)]
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
    /// Create or update the schema, outbox and triggers for the rules (idempotent); grants the
    /// invalidate_user/invalidate_report functions to the roles that may write a ruled table
    #[command(
        after_help = "Example:\n  cache-invalidator --rules /etc/cache-invalidator/rules.toml install --grant-to app_jobs"
    )]
    Install {
        /// Also let ROLE call invalidate_user/invalidate_report (repeatable); the roles holding
        /// INSERT, UPDATE or DELETE on a ruled table, and the tables' owners, always can
        #[arg(long = "grant-to", value_name = "ROLE")]
        grant_to: Vec<String>,
    },
    /// Remove the triggers and the cache_invalidator schema; the app's tables are untouched
    #[command(after_help = "Example:\n  cache-invalidator uninstall")]
    Uninstall,
    /// Print the SQL install (or uninstall) would run, for review or a migration
    #[command(after_help = "Example:\n  cache-invalidator sql > install.sql")]
    Sql {
        /// Print the uninstall SQL instead
        #[arg(long)]
        uninstall: bool,
        /// As for install: also grant the request functions to ROLE (repeatable)
        #[arg(long = "grant-to", value_name = "ROLE", conflicts_with = "uninstall")]
        grant_to: Vec<String>,
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
        /// Backlog age above which the exit code is 1 [default: the max_backlog_age setting, 60s]
        #[arg(long, value_parser = parse_duration)]
        max_age: Option<Duration>,
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
    #[arg(long, env = env_names::METRICS_ADDR)]
    pub metrics_addr: Option<SocketAddr>,
    /// Clear every pattern again after this delay, catching stale refills; 0 turns it off
    /// [default: 2s]
    #[arg(long, env = env_names::REFILL_GUARD, value_parser = parse_duration)]
    pub refill_guard: Option<Duration>,
    /// Look at the outbox this often even without a notification [default: 5s]
    #[arg(long, env = env_names::POLL_INTERVAL, value_parser = parse_duration)]
    pub poll_interval: Option<Duration>,
    /// /healthz fails when the oldest pending change is older [default: 60s]
    #[arg(long, env = env_names::MAX_BACKLOG_AGE, value_parser = parse_duration)]
    pub max_backlog_age: Option<Duration>,
    /// Timeout of one Redis round trip; a stuck server fails the batch, which is retried
    /// [default: 5s]
    #[arg(long, env = env_names::REDIS_TIMEOUT, value_parser = parse_duration)]
    pub redis_timeout: Option<Duration>,
    /// How a change's keys are found: index (an index of the cache keys fed by Redis' tracking
    /// announcements: milliseconds at any keyspace size), sweep (one SCAN pass per window of
    /// changes: no memory for an index), or auto (index where Redis allows it) [default: auto]
    #[arg(long, env = env_names::MODE, value_enum)]
    pub mode: Option<Mode>,
    /// Most keys the index may hold; past it the worker drops the index and sweeps
    /// [default: 10000000, about 1 GB]
    #[arg(long, env = env_names::INDEX_MAX_KEYS)]
    pub index_max_keys: Option<usize>,
    /// Longest a worker holds a claimed change; a frozen worker's claims go to the others after it
    /// [default: 30s]
    #[arg(long, env = env_names::CLAIM_TIMEOUT, value_parser = parse_duration)]
    pub claim_timeout: Option<Duration>,
    /// Replicas of a Redis node that must have its deletes (WAIT) before a change is
    /// acknowledged [default: every replica connected to the node]
    #[arg(long, env = env_names::REPLICA_ACKS)]
    pub replica_acks: Option<u32>,
    /// How long to wait for those replicas; at the timeout the change is kept and retried
    /// [default: 1s]
    #[arg(long, env = env_names::REPLICA_WAIT_TIMEOUT, value_parser = parse_duration)]
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

impl Cli {
    /// What the command line gave, for [`crate::settings::Settings::load`] to merge: the flags
    /// (and the environment variables clap read for them) of the subcommand at hand.
    pub fn given(&self) -> Given {
        let global = &self.global;
        let mut given = Given {
            database_url: global.database_url.clone(),
            redis_url: global.redis_url.clone(),
            redis_ca_file: global.redis_ca_file.clone(),
            rules: global.rules.clone(),
            log_format: global.log_format,
            config: global.config.clone(),
            ..Given::default()
        };
        if let Command::Run(run) = &self.command {
            given.metrics_addr = run.metrics_addr;
            given.refill_guard = run.refill_guard;
            given.poll_interval = run.poll_interval;
            given.max_backlog_age = run.max_backlog_age;
            given.redis_timeout = run.redis_timeout;
            given.mode = run.mode;
            given.index_max_keys = run.index_max_keys;
            given.claim_timeout = run.claim_timeout;
            given.replica_acks = run.replica_acks;
            given.replica_wait_timeout = run.replica_wait_timeout;
        }
        given
    }
}
