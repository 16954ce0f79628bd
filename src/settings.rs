//! Settings: flags and environment merged once into what the daemon needs, with secrets kept out
//! of every `Debug`, log line and error message.
//!
//! clap reads flags and their environment variables (see `cli.rs`); this module turns them into
//! validated values: URLs that redact their password when shown, durations written `500ms`, `2s`,
//! `1m` or a bare `0`, and the rules (a file or the built-in ones).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::rules::{RuleSet, RulesError};

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

    /// The URL with the password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
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

/// Replaces the password of `scheme://user:password@host…` URLs (also each host of a comma-separated
/// cluster URL) and `password=` query parameters with `***`.
pub fn redact_url(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let (before_query, query) = match url.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (url, None),
    };
    match before_query.split_once("://") {
        Some((scheme, rest)) => {
            out.push_str(scheme);
            out.push_str("://");
            // The userinfo ends at the last '@' before the path; passwords may contain '@' or ':'.
            let authority_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(authority_end);
            match authority.rfind('@') {
                Some(at) => {
                    let userinfo = &authority[..at];
                    match userinfo.split_once(':') {
                        Some((user, _password)) => {
                            out.push_str(user);
                            out.push_str(":***");
                        }
                        None => out.push_str(userinfo),
                    }
                    out.push_str(&authority[at..]);
                }
                None => out.push_str(authority),
            }
            out.push_str(path);
        }
        None => out.push_str(before_query),
    }
    if let Some(query) = query {
        out.push('?');
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, _)) if is_secret_param(name) => format!("{name}=***"),
                _ => param.to_owned(),
            })
            .collect();
        out.push_str(&params.join("&"));
    }
    out
}

fn is_secret_param(name: &str) -> bool {
    matches!(
        name.to_ascii_lowercase().as_str(),
        "password" | "pass" | "sslpassword"
    )
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

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
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
        }
    }
}

/// Default delay of the second pass: above the app's slowest report request we measured (see the
/// README, "No stale refills"), well under the shortest TTL.
pub const DEFAULT_REFILL_GUARD: Duration = Duration::from_secs(2);
/// A lost notification costs at most this much latency.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// A worker that keeps up drains within a second or two; a minute means it is stuck or down.
pub const DEFAULT_MAX_BACKLOG_AGE: Duration = Duration::from_secs(60);
/// A SCAN chunk or UNLINK pipeline takes about a millisecond; five seconds means Redis is stuck.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_secs(5);
/// About 1 GB of worker memory at the index's ≤ 100 bytes per key (key names included).
pub const DEFAULT_INDEX_MAX_KEYS: usize = 10_000_000;
/// Above the longest legitimate hold of a claim (a pass over a large keyspace), well under the
/// minute after which an operator would call a change stuck.
pub const DEFAULT_CLAIM_TIMEOUT: Duration = Duration::from_secs(30);
/// Replicas on the same network confirm a write within milliseconds; a second means one is stuck.
pub const DEFAULT_REPLICA_WAIT_TIMEOUT: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cr:et@db:5432/reports?sslmode=require"),
            "postgres://app:***@db:5432/reports?sslmode=require"
        );
        assert_eq!(
            redact_url("redis://:hunter2@127.0.0.1:6379/0"),
            "redis://:***@127.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("postgres://db/x?user=a&password=p@ss"),
            "postgres://db/x?user=a&password=***"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        let url = SecretUrl::new("rediss://u:pw@h:1");
        assert!(!format!("{url:?} {url}").contains("pw"));
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
