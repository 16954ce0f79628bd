//! Settings: the one place where flags, the environment, the optional config file and the
//! defaults are merged — flags first, then the environment, then the file, then the defaults, for
//! every subcommand — and checked, with secrets kept out of every `Debug`, log line and error.
//!
//! `cli.rs` declares the command line and hands over what it read ([`Given`]); this module holds
//! every default, reads the environment variables clap did not (those of `run`'s settings when
//! another subcommand runs), reads the config file, and names the source of any invalid value:
//! the flag, the environment variable, or the file and its key. It also hands out the parsed
//! connection targets ([`Settings::postgres_target`], [`Settings::redis_target`]).

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::postgres::{ConnectError, PgTarget};
use crate::redis_nodes::{NodeError, RedisTarget};
use crate::replicas::ReplicaPolicy;
use crate::rules::{RuleSet, RulesError};
// Where `--log-format` and the config file's `log_format` are parsed to; defined beside the log setup.
pub use crate::telemetry::LogFormat;

/// What a connection string that does not parse is shown as: it cannot be redacted, so it is not
/// shown at all.
const NOT_SHOWN: &str = "<not shown: it does not parse>";

/// A connection URL that may carry a password. `Display` and `Debug` show it redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> SecretUrl {
        SecretUrl(url.into())
    }

    /// The URL with its password: only for handing to a client library, never for display.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The connection string as it may be shown: written back from what the Redis or Postgres
    /// client parsed, the password as `***`. Nothing is cut out of the input text, so a password
    /// holding `/`, `?`, `@` or `#` (or quotes, in a key/value string) cannot slip through; a
    /// string that does not parse is not shown at all.
    pub fn redacted(&self) -> String {
        let text = self.0.trim();
        let scheme = text
            .split_once("://")
            .map(|(scheme, _)| scheme.to_ascii_lowercase());
        let shown = match scheme.as_deref() {
            Some(
                "redis" | "rediss" | "redis+cluster" | "rediss+cluster" | "redis+sentinel"
                | "rediss+sentinel" | "unix" | "redis+unix",
            ) => crate::redis_nodes::redacted_url(text),
            _ => PgTarget::parse(&self.0)
                .ok()
                .map(|target| target.redacted().to_owned()),
        };
        shown.unwrap_or_else(|| NOT_SHOWN.to_owned())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl std::str::FromStr for SecretUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(SecretUrl::new(s))
    }
}

/// Parses `500ms`, `2s`, `1m`, `1h` or a bare `0`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text)
        .map_err(|error| format!("{text:?} is not a duration like 500ms, 2s or 1m ({error})"))
}

/// Where rules come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RulesSource {
    Builtin,
    File(PathBuf),
}

impl RulesSource {
    pub fn load(&self) -> Result<RuleSet, RulesError> {
        match self {
            RulesSource::Builtin => Ok(RuleSet::builtin()),
            RulesSource::File(path) => RuleSet::load(path),
        }
    }
}

impl fmt::Display for RulesSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RulesSource::Builtin => f.write_str("built-in rules"),
            RulesSource::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Connection settings shared by every subcommand.
#[derive(Debug, Clone)]
pub struct Connections {
    pub database_url: SecretUrl,
    pub redis_url: SecretUrl,
    /// PEM file with the CA that signs Redis' TLS certificate, when it is not in the system store.
    pub redis_ca_file: Option<PathBuf>,
}

/// Everything `run` needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub connections: Connections,
    pub rules_source: RulesSource,
    pub rules: RuleSet,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// `None`: no HTTP listener.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Delay of the second pass that catches stale refills; zero turns it off.
    pub refill_guard: Duration,
    /// How often the worker looks at the outbox when no notification arrived.
    pub poll_interval: Duration,
    /// `/healthz` and `status` report unhealthy when the oldest pending change is older.
    pub max_backlog_age: Duration,
    /// Timeout for one Redis command: a server that stops answering fails the batch, which retries.
    pub redis_timeout: Duration,
    /// How the worker finds a change's keys: an index fed by Redis' tracking announcements, or a
    /// `SCAN` pass.
    pub mode: Mode,
    /// Keys the index may hold before the worker drops it and sweeps instead (memory bound).
    pub index_max_keys: usize,
    /// Longest a worker may hold a claimed change before other workers may take it over.
    pub claim_timeout: Duration,
    /// Replicas that must confirm a node's deletes (`WAIT`) before a change is acknowledged;
    /// `None`: every replica connected to the node.
    pub replica_acks: Option<u32>,
    /// How long `WAIT` may wait for those replicas before the change is kept and retried.
    pub replica_wait_timeout: Duration,
    /// Test hook: the health state the daemon reports into, so that a test or the bench running
    /// it in-process sees what `/healthz` would show (whether the index is complete). `None`: the
    /// daemon keeps its own.
    #[cfg(feature = "test-hooks")]
    pub health: Option<std::sync::Arc<crate::telemetry::Health>>,
}

/// How the worker finds the keys of a change (contract: `--mode`, `CACHE_INVALIDATOR_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Index where every node accepts `CLIENT TRACKING`, else sweep (with one warning).
    Auto,
    /// Keep an index of the cache keys; refuse to start where Redis cannot announce them.
    Index,
    /// One rolling `SCAN` pass per window of changes; no index.
    Sweep,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::Index => "index",
            Mode::Sweep => "sweep",
        })
    }
}

impl Settings {
    /// Defaults for everything but the connections, with the built-in rules: what tests start from.
    pub fn new(connections: Connections) -> Settings {
        Settings {
            connections,
            rules_source: RulesSource::Builtin,
            rules: RuleSet::builtin(),
            log_format: LogFormat::Text,
            metrics_addr: None,
            refill_guard: DEFAULT_REFILL_GUARD,
            poll_interval: DEFAULT_POLL_INTERVAL,
            max_backlog_age: DEFAULT_MAX_BACKLOG_AGE,
            redis_timeout: DEFAULT_REDIS_TIMEOUT,
            mode: Mode::Auto,
            index_max_keys: DEFAULT_INDEX_MAX_KEYS,
            claim_timeout: DEFAULT_CLAIM_TIMEOUT,
            replica_acks: None,
            replica_wait_timeout: DEFAULT_REPLICA_WAIT_TIMEOUT,
            #[cfg(feature = "test-hooks")]
            health: None,
        }
    }
}

impl Settings {
    /// Merges what the command line gave with the environment, the config file (`--config`) and
    /// the defaults, in that order of precedence, and checks every value — also those the
    /// subcommand at hand does not use, so a mistake is found by `check` or `status` before `run`
    /// trips on it. Loads the rules and parses both connection strings.
    pub fn load(given: Given) -> Result<Settings, SettingsError> {
        Settings::load_with_env(given, |name| std::env::var_os(name))
    }

    /// [`Settings::load`] with the environment given as a lookup (tests use a map).
    pub fn load_with_env(
        given: Given,
        env: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Settings, SettingsError> {
        let config = match &given.config {
            Some(path) => Some(path.clone()),
            None => lookup(&env, env_names::CONFIG)?.map(PathBuf::from),
        };
        let sources = Sources {
            env: &env,
            file: ConfigFile::read(config.as_deref())?,
        };
        let mut settings = Settings::new(sources.connections(&given)?);
        sources.rules_and_logs(&given, &mut settings)?;
        sources.durations(&given, &mut settings)?;
        sources.worker_choices(&given, &mut settings)?;
        // The refill guard may be 0 (off); these pace the worker's polling and bound a Redis
        // round trip, and 0 would make the worker spin or fail every command.
        for (setting, value) in [
            ("poll_interval", settings.poll_interval),
            ("redis_timeout", settings.redis_timeout),
        ] {
            if value.is_zero() {
                return Err(SettingsError::Zero { setting });
            }
        }
        if settings.replica_wait_timeout > settings.redis_timeout / 2 {
            return Err(SettingsError::ReplicaWaitTooLong {
                wait: settings.replica_wait_timeout,
                redis_timeout: settings.redis_timeout,
            });
        }
        // Parsed once here so that a connection string that cannot work fails every
        // subcommand at once, with the reason, whichever subcommand first meets it.
        settings.postgres_target(APPLICATION_NAME)?;
        settings.redis_target()?;
        Ok(settings)
    }

    /// The Postgres server to connect to, as `application_name` (how `status` tells workers from
    /// other sessions).
    pub fn postgres_target(&self, application_name: &str) -> Result<PgTarget, ConnectError> {
        Ok(PgTarget::parse(self.connections.database_url.expose())?
            .with_default_application_name(application_name))
    }

    /// The Redis server or cluster holding the cache, with its CA file, command timeout and
    /// replica policy (every subcommand that deletes waits for the replicas the same way).
    pub fn redis_target(&self) -> Result<RedisTarget, NodeError> {
        Ok(RedisTarget::parse(
            self.connections.redis_url.expose(),
            self.connections.redis_ca_file.as_deref(),
            self.redis_timeout,
        )?
        .with_replicas(ReplicaPolicy {
            acks: self.replica_acks,
            timeout: self.replica_wait_timeout,
            floor: 0,
        }))
    }
}

/// What the command line gave: flags, and the environment variables clap read for them (clap
/// reads those of `run`'s settings only when `run` is the subcommand; [`Settings::load`] reads
/// them for the others). `None`: not given, so the environment, file or default decides.
#[derive(Debug, Default, Clone)]
pub struct Given {
    pub database_url: Option<SecretUrl>,
    pub redis_url: Option<SecretUrl>,
    pub redis_ca_file: Option<PathBuf>,
    pub rules: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub config: Option<PathBuf>,
    pub metrics_addr: Option<SocketAddr>,
    pub refill_guard: Option<Duration>,
    pub poll_interval: Option<Duration>,
    pub max_backlog_age: Option<Duration>,
    pub redis_timeout: Option<Duration>,
    pub mode: Option<Mode>,
    pub index_max_keys: Option<usize>,
    pub claim_timeout: Option<Duration>,
    pub replica_acks: Option<u32>,
    pub replica_wait_timeout: Option<Duration>,
}

/// The environment variable of each setting (names operators' scripts rely on: README,
/// "Configuration"). `cli.rs` declares its flags with these names, so the two cannot drift apart.
pub mod env_names {
    pub const DATABASE_URL: &str = "DATABASE_URL";
    pub const REDIS_URL: &str = "REDIS_URL";
    pub const REDIS_CA_FILE: &str = "CACHE_INVALIDATOR_REDIS_CA_FILE";
    pub const RULES: &str = "CACHE_INVALIDATOR_RULES";
    pub const LOG_FORMAT: &str = "CACHE_INVALIDATOR_LOG_FORMAT";
    pub const CONFIG: &str = "CACHE_INVALIDATOR_CONFIG";
    pub const METRICS_ADDR: &str = "CACHE_INVALIDATOR_METRICS_ADDR";
    pub const REFILL_GUARD: &str = "CACHE_INVALIDATOR_REFILL_GUARD";
    pub const POLL_INTERVAL: &str = "CACHE_INVALIDATOR_POLL_INTERVAL";
    pub const MAX_BACKLOG_AGE: &str = "CACHE_INVALIDATOR_MAX_BACKLOG_AGE";
    pub const REDIS_TIMEOUT: &str = "CACHE_INVALIDATOR_REDIS_TIMEOUT";
    pub const MODE: &str = "CACHE_INVALIDATOR_MODE";
    pub const INDEX_MAX_KEYS: &str = "CACHE_INVALIDATOR_INDEX_MAX_KEYS";
    pub const CLAIM_TIMEOUT: &str = "CACHE_INVALIDATOR_CLAIM_TIMEOUT";
    pub const REPLICA_ACKS: &str = "CACHE_INVALIDATOR_REPLICA_ACKS";
    pub const REPLICA_WAIT_TIMEOUT: &str = "CACHE_INVALIDATOR_REPLICA_WAIT_TIMEOUT";
}

/// The keys a config file may hold: the settings' names in snake case.
const CONFIG_KEYS: [&str; 15] = [
    "database_url",
    "redis_url",
    "redis_ca_file",
    "rules",
    "log_format",
    "metrics_addr",
    "refill_guard",
    "poll_interval",
    "max_backlog_age",
    "redis_timeout",
    "mode",
    "index_max_keys",
    "claim_timeout",
    "replica_acks",
    "replica_wait_timeout",
];

/// The `application_name` the one-shot subcommands connect with.
pub const APPLICATION_NAME: &str = "cache-invalidator cli";

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("config file {path}: {message}")]
    ConfigFile { path: String, message: String },
    #[error("config file {path}: {key}: {message}")]
    ConfigValue {
        path: String,
        key: String,
        message: String,
    },
    #[error("environment variable {name}: {message}")]
    Environment { name: String, message: String },
    #[error(transparent)]
    Rules(#[from] RulesError),
    #[error("{setting} must be longer than 0 (it paces a loop: 0 would spin)")]
    Zero { setting: &'static str },
    #[error(
        "replica wait timeout {wait:?} must be at most half the redis timeout {redis_timeout:?}: \
         a WAIT blocks the connection, and the requests queued behind it must not time out"
    )]
    ReplicaWaitTooLong {
        wait: Duration,
        redis_timeout: Duration,
    },
    #[error(transparent)]
    Database(#[from] ConnectError),
    #[error(transparent)]
    Redis(#[from] NodeError),
}

/// The config file's values by key, checked against [`CONFIG_KEYS`].
struct ConfigFile {
    path: Option<PathBuf>,
    values: toml::Table,
}

impl ConfigFile {
    fn read(path: Option<&Path>) -> Result<ConfigFile, SettingsError> {
        let Some(path) = path else {
            return Ok(ConfigFile {
                path: None,
                values: toml::Table::new(),
            });
        };
        let error = |message: String| SettingsError::ConfigFile {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        // The message and position only: toml's full report quotes the offending line, which may
        // be a connection string with its password.
        let values: toml::Table = toml::from_str(&text).map_err(|e| {
            let (line, column) = e
                .span()
                .map_or((0, 0), |span| line_and_column(&text, span.start));
            error(format!(
                "line {line}, column {column}: {}",
                e.message().trim_end()
            ))
        })?;
        if let Some(unknown) = values
            .keys()
            .find(|key| !CONFIG_KEYS.contains(&key.as_str()))
        {
            return Err(error(format!(
                "unknown key {unknown:?} (known: {})",
                CONFIG_KEYS.join(", ")
            )));
        }
        Ok(ConfigFile {
            path: Some(path.to_owned()),
            values,
        })
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(0, |tail| tail.chars().count())
        + 1;
    (line, column)
}

/// Where a setting is looked for after the command line.
struct Sources<'a> {
    env: &'a dyn Fn(&str) -> Option<OsString>,
    file: ConfigFile,
}

impl Sources<'_> {
    fn connections(&self, given: &Given) -> Result<Connections, SettingsError> {
        let secret = |text: &str| Ok(SecretUrl::new(text));
        let database_url = self.setting(
            given.database_url.clone(),
            "database_url",
            env_names::DATABASE_URL,
            secret,
        )?;
        let redis_url = self.setting(
            given.redis_url.clone(),
            "redis_url",
            env_names::REDIS_URL,
            secret,
        )?;
        let redis_ca_file = self.setting(
            given.redis_ca_file.clone(),
            "redis_ca_file",
            env_names::REDIS_CA_FILE,
            |text| Ok(PathBuf::from(text)),
        )?;
        Ok(Connections {
            database_url: database_url.unwrap_or_else(|| SecretUrl::new(DEFAULT_DATABASE_URL)),
            redis_url: redis_url.unwrap_or_else(|| SecretUrl::new(DEFAULT_REDIS_URL)),
            redis_ca_file,
        })
    }

    /// The rules (loaded and checked here), the log format and the metrics listener.
    fn rules_and_logs(&self, given: &Given, settings: &mut Settings) -> Result<(), SettingsError> {
        let rules = self.setting(given.rules.clone(), "rules", env_names::RULES, |text| {
            Ok(PathBuf::from(text))
        })?;
        settings.rules_source = match rules {
            Some(path) => RulesSource::File(path),
            None => RulesSource::Builtin,
        };
        settings.rules = settings.rules_source.load()?;
        let log_formats = [("text", LogFormat::Text), ("json", LogFormat::Json)];
        if let Some(format) = self.setting(
            given.log_format,
            "log_format",
            env_names::LOG_FORMAT,
            |text| one_of(text, &log_formats),
        )? {
            settings.log_format = format;
        }
        settings.metrics_addr = self.setting(
            given.metrics_addr,
            "metrics_addr",
            env_names::METRICS_ADDR,
            |text| {
                text.parse()
                    .map_err(|_| format!("{text:?} is not an address like 127.0.0.1:9187"))
            },
        )?;
        Ok(())
    }

    fn durations(&self, given: &Given, settings: &mut Settings) -> Result<(), SettingsError> {
        let durations: [(&mut Duration, Option<Duration>, &str, &str); 6] = [
            (
                &mut settings.refill_guard,
                given.refill_guard,
                "refill_guard",
                env_names::REFILL_GUARD,
            ),
            (
                &mut settings.poll_interval,
                given.poll_interval,
                "poll_interval",
                env_names::POLL_INTERVAL,
            ),
            (
                &mut settings.max_backlog_age,
                given.max_backlog_age,
                "max_backlog_age",
                env_names::MAX_BACKLOG_AGE,
            ),
            (
                &mut settings.redis_timeout,
                given.redis_timeout,
                "redis_timeout",
                env_names::REDIS_TIMEOUT,
            ),
            (
                &mut settings.claim_timeout,
                given.claim_timeout,
                "claim_timeout",
                env_names::CLAIM_TIMEOUT,
            ),
            (
                &mut settings.replica_wait_timeout,
                given.replica_wait_timeout,
                "replica_wait_timeout",
                env_names::REPLICA_WAIT_TIMEOUT,
            ),
        ];
        for (value, flag, key, env_name) in durations {
            if let Some(merged) = self.setting(flag, key, env_name, parse_duration)? {
                *value = merged;
            }
        }
        Ok(())
    }

    /// How the worker finds keys and how many replicas confirm its deletes.
    fn worker_choices(&self, given: &Given, settings: &mut Settings) -> Result<(), SettingsError> {
        let modes = [
            ("auto", Mode::Auto),
            ("index", Mode::Index),
            ("sweep", Mode::Sweep),
        ];
        if let Some(mode) = self.setting(given.mode, "mode", env_names::MODE, |text| {
            one_of(text, &modes)
        })? {
            settings.mode = mode;
        }
        if let Some(max) = self.setting(
            given.index_max_keys,
            "index_max_keys",
            env_names::INDEX_MAX_KEYS,
            whole_number,
        )? {
            settings.index_max_keys = max;
        }
        settings.replica_acks = self.setting(
            given.replica_acks,
            "replica_acks",
            env_names::REPLICA_ACKS,
            whole_number,
        )?;
        Ok(())
    }

    /// One setting: the command line's value, else the environment's, else the file's, each
    /// parsed with `parse`; an invalid value names where it came from. `None`: the default. The
    /// file's value is checked even when a flag or the environment overrides it: a file that
    /// would break the next start without the override is wrong now.
    fn setting<T>(
        &self,
        given: Option<T>,
        key: &str,
        env_name: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, SettingsError> {
        let from_file = self.file_setting(key, &parse)?;
        if given.is_some() {
            return Ok(given);
        }
        if let Some(text) = lookup(self.env, env_name)? {
            return parse(&text)
                .map(Some)
                .map_err(|message| SettingsError::Environment {
                    name: env_name.to_owned(),
                    message,
                });
        }
        Ok(from_file)
    }

    /// The config file's value of `key`, parsed.
    fn file_setting<T>(
        &self,
        key: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, SettingsError> {
        let Some(value) = self.file.values.get(key) else {
            return Ok(None);
        };
        let invalid = |message: String| SettingsError::ConfigValue {
            path: self
                .file
                .path
                .as_ref()
                .map(|path| path.display().to_string())
                .unwrap_or_default(),
            key: key.to_owned(),
            message,
        };
        let text = match value {
            toml::Value::String(text) => text.clone(),
            // `refill_guard = 0`, `index_max_keys = 500000`: numbers are fine unquoted.
            toml::Value::Integer(number) => number.to_string(),
            other => {
                return Err(invalid(format!(
                    "expected a string or a number, found a {}",
                    other.type_str()
                )))
            }
        };
        parse(&text).map(Some).map_err(invalid)
    }
}

/// An environment variable's value; unset and empty are the same (as clap treats them).
fn lookup(
    env: &dyn Fn(&str) -> Option<OsString>,
    name: &str,
) -> Result<Option<String>, SettingsError> {
    match env(name) {
        None => Ok(None),
        Some(value) if value.is_empty() => Ok(None),
        Some(value) => value
            .into_string()
            .map(Some)
            .map_err(|_| SettingsError::Environment {
                name: name.to_owned(),
                message: "not valid UTF-8".to_owned(),
            }),
    }
}

/// `text` as one of `choices` (case-insensitive), or a message listing them.
fn one_of<T: Copy>(text: &str, choices: &[(&str, T)]) -> Result<T, String> {
    let wanted = text.trim().to_ascii_lowercase();
    choices
        .iter()
        .find(|(name, _)| *name == wanted)
        .map(|(_, value)| *value)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
            format!("{text:?} is not one of {}", names.join(", "))
        })
}

fn whole_number<T: std::str::FromStr>(text: &str) -> Result<T, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number in range"))
}

pub use crate::postgres::DEFAULT_DATABASE_URL;
pub use crate::redis_nodes::DEFAULT_REDIS_URL;
/// Default delay of the second pass: above the app's slowest report request we measured (see
/// docs/guarantees.md, "No stale refills"), well under the shortest TTL.
pub const DEFAULT_REFILL_GUARD: Duration = Duration::from_secs(2);
/// A lost notification costs at most this much latency.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// A worker that keeps up drains within a second or two; a minute means it is stuck or down.
pub const DEFAULT_MAX_BACKLOG_AGE: Duration = Duration::from_secs(60);
/// A SCAN chunk or UNLINK pipeline takes about a millisecond; five seconds means Redis is stuck.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_secs(5);
/// About 1 GB of worker memory at the index's ≤ 100 bytes per key (key names included).
pub const DEFAULT_INDEX_MAX_KEYS: usize = 10_000_000;
pub use crate::outbox::DEFAULT_CLAIM_TIMEOUT;
pub use crate::replicas::DEFAULT_REPLICA_WAIT_TIMEOUT;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_through_the_parsed_configuration() {
        let shown = |text: &str| SecretUrl::new(text).redacted();
        assert_eq!(
            shown("postgres://app:s3cr:et@db:5432/reports?sslmode=require"),
            "postgres://app:***@db:5432/reports?sslmode=require"
        );
        assert_eq!(
            shown("postgres://db/x?user=a&password=p@ss"),
            "postgres://a:***@db:5432/x"
        );
        assert_eq!(
            shown("host=db user=app password='p w' dbname=x"),
            "host=db user=app password=*** dbname=x"
        );
        assert_eq!(
            shown("redis://:hunter2@127.0.0.1:6379/0"),
            "redis://:***@127.0.0.1:6379/0"
        );
        assert_eq!(
            shown("redis://u:a%2Fb%3Fc%40d%23e@127.0.0.1:6379/2"),
            "redis://u:***@127.0.0.1:6379/2"
        );
        assert_eq!(
            shown("rediss+cluster://:pw@10.0.0.1:7000,10.0.0.2:7001"),
            "rediss+cluster://:***@10.0.0.1:7000,10.0.0.2:7001/0"
        );
        assert_eq!(
            shown("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        // What does not parse is not shown: any part of it may be the password.
        assert_eq!(shown("postgres://u:12/Secret9@db/x"), NOT_SHOWN);
        assert_eq!(shown("redis://:pa/Secret9@h:1/0"), NOT_SHOWN);
        assert_eq!(shown("host=db password='Secret9"), NOT_SHOWN);
        let url = SecretUrl::new("rediss://u:pw@h:1");
        assert!(!format!("{url:?} {url}").contains("pw"));
    }

    fn config_file(text: &str) -> (tempfile::NamedTempFile, PathBuf) {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), text).expect("write config");
        let path = file.path().to_owned();
        (file, path)
    }

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| OsString::from(value))
        }
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_file_which_beats_the_default() {
        let (_file, path) = config_file("refill_guard = \"3s\"\npoll_interval = 0.5\n");
        let given = |refill_guard| Given {
            config: Some(path.clone()),
            refill_guard,
            ..Given::default()
        };
        let env = env_of(&[(env_names::REFILL_GUARD, "2s")]);
        let load = |given, env: &dyn Fn(&str) -> Option<OsString>| {
            Settings::load_with_env(given, env).map(|s| s.refill_guard)
        };
        // A float is neither a string nor an integer: the file is wrong whatever wins.
        let error = load(given(None), &env).expect_err("float").to_string();
        assert!(
            error.contains(&format!("config file {}: poll_interval:", path.display())),
            "{error}"
        );
        let (_file, path) = config_file("refill_guard = \"3s\"\n");
        let given = |refill_guard| Given {
            config: Some(path.clone()),
            refill_guard,
            ..Given::default()
        };
        let flag = Some(Duration::from_secs(1));
        assert_eq!(load(given(flag), &env).ok(), flag);
        assert_eq!(load(given(None), &env).ok(), Some(Duration::from_secs(2)));
        assert_eq!(
            load(given(None), &env_of(&[])).ok(),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            load(Given::default(), &env_of(&[])).ok(),
            Some(DEFAULT_REFILL_GUARD)
        );
    }

    #[test]
    fn invalid_values_name_their_source() {
        let error = Settings::load_with_env(Given::default(), env_of(&[(env_names::MODE, "fast")]))
            .expect_err("bad mode")
            .to_string();
        assert_eq!(
            error,
            "environment variable CACHE_INVALIDATOR_MODE: \"fast\" is not one of auto, index, sweep"
        );
        let (_file, path) = config_file("log_format = \"xml\"\n");
        let error = Settings::load_with_env(
            Given {
                config: Some(path.clone()),
                ..Given::default()
            },
            env_of(&[]),
        )
        .expect_err("bad log format")
        .to_string();
        assert_eq!(
            error,
            format!(
                "config file {}: log_format: \"xml\" is not one of text, json",
                path.display()
            )
        );
        let (_file, path) = config_file("database_url = \"postgres://u:Secret9@h/x\n");
        let error = Settings::load_with_env(
            Given {
                config: Some(path.clone()),
                ..Given::default()
            },
            env_of(&[]),
        )
        .expect_err("unterminated string")
        .to_string();
        assert!(error.contains("line 1, column"), "{error}");
        assert!(!error.contains("Secret9"), "{error}");
    }

    #[test]
    fn durations_parse_like_the_documentation_says() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("soon").is_err());
    }
}
