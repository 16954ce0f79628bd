//! Redis for the tests: connections, a key prefix of a test's own on the shared server, the
//! helpers that write and check keys, and private `redis-server`s for the tests that break one.

use std::collections::BTreeSet;
use std::process::Child;
use std::time::Duration;

use cache_invalidator::rules::{RuleSet, DEFAULT_RULES_TOML};
use redis::aio::MultiplexedConnection;

use super::certs::TestCerts;
use super::servers::{free_port, spawn_redis_server, wait_for_port};
use super::unique;
use super::wait::wait_until;

pub fn shared_redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_owned())
}

/// The built-in rules file's text with another key prefix.
pub fn default_rules_toml(key_prefix: &str) -> String {
    DEFAULT_RULES_TOML.replace(
        "key_prefix = \":1:\"",
        &format!("key_prefix = \"{key_prefix}\""),
    )
}

/// The default rules with their key prefix replaced, so a test's keys are its own.
pub fn rules_with_prefix(key_prefix: &str) -> RuleSet {
    let text = default_rules_toml(key_prefix);
    RuleSet::from_toml(&text, "test rules").expect("valid rules")
}

/// A key prefix in the django-redis shape (`<prefix>:1:`) unique to one test.
pub struct KeyPrefix {
    /// e.g. `t_123_4_5678`: keys are `t_123_4_5678:1:report:…`.
    pub namespace: String,
}

impl KeyPrefix {
    pub fn new(tag: &str) -> KeyPrefix {
        KeyPrefix {
            namespace: unique(tag),
        }
    }

    /// The rules' key prefix: `<namespace>:1:`.
    pub fn key_prefix(&self) -> String {
        format!("{}:1:", self.namespace)
    }

    /// `<namespace>:1:<logical>`.
    pub fn key(&self, logical: &str) -> String {
        format!("{}:1:{logical}", self.namespace)
    }

    /// `<namespace>:1:<logical>` for each of `logical`.
    pub fn keys(&self, logical: &[&str]) -> Vec<String> {
        logical.iter().map(|logical| self.key(logical)).collect()
    }

    /// Same logical key under another cache VERSION (`<namespace>:2:`): must never be touched.
    pub fn key_v2(&self, logical: &str) -> String {
        format!("{}:2:{logical}", self.namespace)
    }

    pub fn rules(&self) -> RuleSet {
        rules_with_prefix(&self.key_prefix())
    }
}

/// A connection for a test's own reads and writes. It waits up to a minute for a reply (redis-rs
/// gives up after half a second by default): on a loaded 2-core machine, with other suites filling
/// and sweeping the shared server, half a second is not a failure of the daemon.
pub async fn redis_connection(url: &str) -> MultiplexedConnection {
    patient_connection(url).await
}

/// A connection that waits up to a minute for a reply, for servers kept busy on purpose (redis-rs
/// gives up after half a second by default).
pub async fn patient_connection(url: &str) -> MultiplexedConnection {
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)));
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap_or_else(|e| panic!("connect to redis {url}: {e}"))
}

/// Writes each of `keys` (value `cached`), pipelined 5,000 at a time: one pipeline of tens of
/// thousands would hold a request and a reply that size in memory at once.
pub async fn set_keys(connection: &mut MultiplexedConnection, keys: &[String]) {
    for chunk in keys.chunks(5_000) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("SET").arg(key).arg("cached").ignore();
        }
        let () = pipe.query_async(connection).await.expect("set keys");
    }
}

/// Keys starting with `prefix` (SCAN MATCH, so it works on a shared server).
pub async fn keys_with_prefix(
    connection: &mut MultiplexedConnection,
    prefix: &str,
) -> BTreeSet<String> {
    let pattern = format!("{}*", cache_invalidator::glob::escape(prefix));
    let mut cursor: u64 = 0;
    let mut keys = BTreeSet::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(connection)
            .await
            .expect("scan");
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            return keys;
        }
    }
}

pub async fn exists(connection: &mut MultiplexedConnection, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(connection)
        .await
        .expect("exists")
        == 1
}

/// Waits until none of `keys` exists; panics naming the survivors otherwise.
pub async fn assert_gone_within(
    connection: &mut MultiplexedConnection,
    keys: &[String],
    timeout: Duration,
) {
    let survivors = survivors_after(connection, keys, timeout).await;
    if !survivors.is_empty() {
        panic!("keys still present after {timeout:?}: {survivors:?}");
    }
}

/// Waits until none of `keys` exists, at most `timeout`; returns those still there then (none
/// when they all went), for a caller whose failure message needs more than the keys.
pub async fn survivors_after(
    connection: &mut MultiplexedConnection,
    keys: &[String],
    timeout: Duration,
) -> Vec<String> {
    let gone = wait_until(timeout, || {
        let mut connection = connection.clone();
        let keys = keys.to_vec();
        async move {
            for key in &keys {
                if exists(&mut connection, key).await {
                    return false;
                }
            }
            true
        }
    })
    .await;
    let mut survivors = Vec::new();
    if !gone {
        for key in keys {
            if exists(connection, key).await {
                survivors.push(key.clone());
            }
        }
    }
    survivors
}

/// Asserts every one of `keys` still exists.
pub async fn assert_kept(connection: &mut MultiplexedConnection, keys: &[String]) {
    let mut missing = Vec::new();
    for key in keys {
        if !exists(connection, key).await {
            missing.push(key.clone());
        }
    }
    assert!(missing.is_empty(), "decoys deleted: {missing:?}");
}

/// A `redis-server` of this test's own, on a free port, killed when dropped.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    extra_args: Vec<String>,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        PrivateRedis::start_with(&[])
    }

    pub fn start_with(extra_args: &[&str]) -> PrivateRedis {
        let extra_args = extra_args.iter().map(|s| s.to_string()).collect();
        PrivateRedis::launch(free_port(), extra_args)
    }

    /// A replica of the server on `primary_port` (`--replicaof`).
    pub fn replica_of(primary_port: u16) -> PrivateRedis {
        PrivateRedis::start_with(&["--replicaof", "127.0.0.1", &primary_port.to_string()])
    }

    /// A `redis-server` that speaks only TLS (`--port 0`), with `certs`' server certificate.
    pub fn start_tls(certs: &TestCerts) -> PrivateRedis {
        let port = free_port();
        let file = |path: std::path::PathBuf| path.display().to_string();
        let args = [
            "--port".to_owned(),
            "0".to_owned(),
            "--tls-port".to_owned(),
            port.to_string(),
            "--tls-cert-file".to_owned(),
            file(certs.cert_file()),
            "--tls-key-file".to_owned(),
            file(certs.key_file()),
            "--tls-ca-cert-file".to_owned(),
            file(certs.ca_file()),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
        ];
        // `--port <port>` comes first in the command line; the later `--port 0` wins.
        PrivateRedis::launch(port, args.to_vec())
    }

    fn launch(port: u16, extra_args: Vec<String>) -> PrivateRedis {
        let mut redis = PrivateRedis {
            port,
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
            extra_args,
        };
        redis.spawn();
        redis
    }

    fn spawn(&mut self) {
        let child = spawn_redis_server(self.port, self.dir.path(), &self.extra_args);
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10));
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}/0", self.port)
    }

    /// Sends signal `name` (`STOP`, `CONT`, …) to the server with `kill`.
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("server running").id();
        let status = std::process::Command::new("kill")
            .args(["-s", name, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {name} failed");
    }

    /// Kills the server (its data is gone: it keeps nothing on disk).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `redis-server --sentinel` of this test's own watching the master on `master_port` as
/// `service`, on a free port, killed when dropped. Quick to act: the master is called down after
/// `down_after_ms` without an answer, and a failover that stalls is retried soon.
pub struct PrivateSentinel {
    pub port: u16,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl PrivateSentinel {
    pub fn start(
        master_port: u16,
        service: &str,
        quorum: u32,
        down_after_ms: u32,
    ) -> PrivateSentinel {
        let port = free_port();
        let dir = tempfile::tempdir().expect("temp dir");
        // Sentinel rewrites its configuration file: it must be a writable file of its own.
        let config = dir.path().join("sentinel.conf");
        let text = format!(
            "port {port}\nbind 127.0.0.1\ndir {dir}\n\
             sentinel monitor {service} 127.0.0.1 {master_port} {quorum}\n\
             sentinel down-after-milliseconds {service} {down_after_ms}\n\
             sentinel failover-timeout {service} 3000\n\
             sentinel parallel-syncs {service} 1\n",
            dir = dir.path().display()
        );
        std::fs::write(&config, text).expect("write sentinel.conf");
        let child = std::process::Command::new("redis-server")
            .arg(&config)
            .arg("--sentinel")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel (is it on PATH?)");
        wait_for_port(port, Duration::from_secs(10));
        PrivateSentinel {
            port,
            child: Some(child),
            _dir: dir,
        }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateSentinel {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
