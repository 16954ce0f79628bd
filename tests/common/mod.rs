//! Test harness shared by the integration tests: a fresh database per test (created and dropped),
//! a unique Redis key prefix per test on the shared Redis, the daemon started in-process and
//! stopped with a token, and private servers for tests that break them.
//!
//! The shared servers are `TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`)
//! and `TEST_REDIS_URL` (default `redis://127.0.0.1:6379/0`). Nothing here flushes a shared server:
//! tests only touch keys under their own prefix.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::future::Future;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_invalidator::rules::{RuleSet, DEFAULT_RULES_TOML};
use cache_invalidator::settings::{Connections, SecretUrl, Settings};
use redis::aio::MultiplexedConnection;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

pub fn admin_database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

pub fn shared_redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_owned())
}

/// A name no other test (in this or a parallel process) uses.
pub fn unique(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{tag}_{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The four report tables of the Django app, plus the user table they cascade from.
pub const REPORT_TABLES_SQL: &str = r#"
CREATE TABLE auth_user (id serial PRIMARY KEY, username text NOT NULL DEFAULT '');
CREATE TABLE reports_report (
    id serial PRIMARY KEY, title text NOT NULL DEFAULT '', body text NOT NULL DEFAULT '',
    author_id integer REFERENCES auth_user (id) ON DELETE CASCADE,
    updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE reports_studentreport (
    id serial PRIMARY KEY, title text NOT NULL DEFAULT '',
    student_id integer REFERENCES auth_user (id) ON DELETE CASCADE,
    teacher_id integer REFERENCES auth_user (id) ON DELETE CASCADE);
CREATE TABLE reports_tutorweeklyreport (
    id serial PRIMARY KEY, week date, notes text NOT NULL DEFAULT '',
    tutor_id integer REFERENCES auth_user (id) ON DELETE CASCADE,
    student_id integer REFERENCES auth_user (id) ON DELETE CASCADE);
CREATE TABLE reports_teacherweeklyreport (
    id serial PRIMARY KEY, week date, notes text NOT NULL DEFAULT '',
    teacher_id integer REFERENCES auth_user (id) ON DELETE CASCADE,
    student_id integer REFERENCES auth_user (id) ON DELETE CASCADE);
"#;

/// Connects without TLS and drives the connection in the background.
pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(connection);
    client
}

fn with_database(url: &str, database: &str) -> String {
    let mut parsed = url::Url::parse(url).expect("valid admin url");
    parsed.set_path(&format!("/{database}"));
    parsed.to_string()
}

/// A database created for one test and dropped by [`TestDb::drop`].
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl TestDb {
    /// An empty database on the shared server.
    pub async fn empty(tag: &str) -> TestDb {
        TestDb::empty_on(&admin_database_url(), tag).await
    }

    /// An empty database on the server `admin_url` points at.
    pub async fn empty_on(admin_url: &str, tag: &str) -> TestDb {
        let name = unique(&format!("ci_test_{tag}")).to_lowercase();
        let admin = connect(admin_url).await;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create test database");
        TestDb {
            url: with_database(admin_url, &name),
            name,
            admin_url: admin_url.to_owned(),
        }
    }

    /// A database with the report tables and the triggers installed for `rules`.
    pub async fn with_reports(tag: &str, rules: &RuleSet) -> TestDb {
        let db = TestDb::empty(tag).await;
        db.client()
            .await
            .batch_execute(REPORT_TABLES_SQL)
            .await
            .expect("create tables");
        let client = db.client().await;
        cache_invalidator::schema::install(&client, rules)
            .await
            .expect("install triggers");
        db
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    pub async fn outbox_rows(&self) -> i64 {
        self.client()
            .await
            .query_one("SELECT count(*) FROM cache_invalidator.outbox", &[])
            .await
            .expect("count outbox")
            .get(0)
    }

    pub async fn dead_letters(&self) -> i64 {
        self.client()
            .await
            .query_one("SELECT count(*) FROM cache_invalidator.dead_letters", &[])
            .await
            .expect("count dead letters")
            .get(0)
    }

    pub async fn drop(self) {
        let admin = connect(&self.admin_url).await;
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .await
            .expect("drop test database");
    }
}

/// The default rules with their key prefix replaced, so a test's keys are its own.
pub fn rules_with_prefix(key_prefix: &str) -> RuleSet {
    let text = DEFAULT_RULES_TOML.replace(
        "key_prefix = \":1:\"",
        &format!("key_prefix = \"{key_prefix}\""),
    );
    RuleSet::from_toml(&text, "test rules").expect("valid rules")
}

/// A key prefix in the django-redis shape (`<prefix>:1:`) unique to one test.
pub struct KeySpace {
    /// e.g. `t_123_4_5678`: keys are `t_123_4_5678:1:report:…`.
    pub namespace: String,
}

impl KeySpace {
    pub fn new(tag: &str) -> KeySpace {
        KeySpace {
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

    /// Same logical key under another cache VERSION (`<namespace>:2:`): must never be touched.
    pub fn key_v2(&self, logical: &str) -> String {
        format!("{}:2:{logical}", self.namespace)
    }

    pub fn rules(&self) -> RuleSet {
        rules_with_prefix(&self.key_prefix())
    }
}

pub async fn redis_connection(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("connect to redis {url}: {e}"))
}

pub async fn set_keys(connection: &mut MultiplexedConnection, keys: &[String]) {
    let mut pipe = redis::pipe();
    for key in keys {
        pipe.cmd("SET").arg(key).arg("cached").ignore();
    }
    let () = pipe.query_async(connection).await.expect("set keys");
}

/// Keys starting with `prefix` (SCAN MATCH, so it works on a shared server).
pub async fn keys_with_prefix(
    connection: &mut MultiplexedConnection,
    prefix: &str,
) -> BTreeSet<String> {
    let pattern = format!("{}*", cache_invalidator::rules::escape_glob(prefix));
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

/// Polls `condition` every 50 ms until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until none of `keys` exists; panics naming the survivors otherwise.
pub async fn assert_gone_within(
    connection: &mut MultiplexedConnection,
    keys: &[String],
    timeout: Duration,
) {
    let mut survivors = Vec::new();
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
    if !gone {
        for key in keys {
            if exists(connection, key).await {
                survivors.push(key.clone());
            }
        }
        panic!("keys still present after {timeout:?}: {survivors:?}");
    }
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

/// Settings for a daemon against `database_url` and `redis_url` with `rules`; fast polling, no
/// refill guard (tests of the guard turn it on).
pub fn test_settings(database_url: &str, redis_url: &str, rules: RuleSet) -> Settings {
    let mut settings = Settings::new(Connections {
        database_url: SecretUrl::new(database_url),
        redis_url: SecretUrl::new(redis_url),
        redis_ca_file: None,
    });
    settings.rules = rules;
    settings.refill_guard = Duration::ZERO;
    settings.poll_interval = Duration::from_millis(500);
    settings.redis_timeout = Duration::from_secs(2);
    settings
}

/// The daemon running in-process, stopped with a token like SIGTERM would.
pub struct Daemon {
    token: CancellationToken,
    handle: JoinHandle<Result<(), cache_invalidator::worker::RunError>>,
}

impl Daemon {
    pub fn start(settings: Settings) -> Daemon {
        let token = CancellationToken::new();
        let handle = tokio::spawn(cache_invalidator::run(settings, token.clone()));
        Daemon { token, handle }
    }

    /// Stops it and waits; panics if it failed.
    pub async fn stop(self) {
        self.token.cancel();
        match tokio::time::timeout(Duration::from_secs(15), self.handle).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => panic!("daemon failed: {error}"),
            Ok(Err(join)) => panic!("daemon panicked: {join}"),
            Err(_) => panic!("daemon did not stop within 15 s"),
        }
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("free port")
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
        let mut redis = PrivateRedis {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        redis.spawn();
        redis
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", &self.dir.path().display().to_string()])
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed?)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server on {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
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
