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
    settings.mode = test_mode();
    settings
}

/// The mode the suites run the daemon in: `TEST_MODE` = `index`, `sweep` or `auto` (the default,
/// which is index mode on a Redis that allows tracking). `scripts/test.sh` runs the data-path and
/// fault suites once in each mode.
pub fn test_mode() -> cache_invalidator::settings::Mode {
    match std::env::var("TEST_MODE").as_deref() {
        Ok("index") => cache_invalidator::settings::Mode::Index,
        Ok("sweep") => cache_invalidator::settings::Mode::Sweep,
        Ok("auto") | Ok("") | Err(_) => cache_invalidator::settings::Mode::Auto,
        Ok(other) => panic!("TEST_MODE={other:?}: expected index, sweep or auto"),
    }
}

/// The daemon running in-process, stopped with a token like SIGTERM would, with the health state
/// `/healthz` would show (its mode says whether the index is complete).
pub struct Daemon {
    token: CancellationToken,
    handle: JoinHandle<Result<(), cache_invalidator::worker::RunError>>,
    pub health: std::sync::Arc<cache_invalidator::telemetry::Health>,
}

impl Daemon {
    pub fn start(settings: Settings) -> Daemon {
        let health = std::sync::Arc::new(cache_invalidator::telemetry::Health::new(Duration::MAX));
        let (rules_tx, rules) =
            tokio::sync::watch::channel(std::sync::Arc::new(settings.rules.clone()));
        let token = CancellationToken::new();
        let handle = tokio::spawn({
            let (health, token) = (health.clone(), token.clone());
            async move {
                // Kept for the daemon's life: a closed channel is not a reload.
                let _rules_tx = rules_tx;
                cache_invalidator::worker::run_with_rules(settings, rules, health, token).await
            }
        });
        Daemon {
            token,
            handle,
            health,
        }
    }

    /// Starts it in index mode (whatever `TEST_MODE` says) and waits until the index is seeded.
    pub async fn start_indexed(mut settings: Settings) -> Daemon {
        settings.mode = cache_invalidator::settings::Mode::Index;
        let daemon = Daemon::start(settings);
        daemon.wait_index_complete().await;
        daemon
    }

    /// Waits until every node's part of the index is seeded (a minute at most: a seed is one
    /// `SCAN` of the server, which other suites may be filling at the same time).
    pub async fn wait_index_complete(&self) {
        let health = self.health.clone();
        let complete = wait_until(Duration::from_secs(60), || {
            let health = health.clone();
            async move { health.mode() == "index (complete)" }
        })
        .await;
        assert!(complete, "index not complete: {}", self.health.mode());
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

// Private Postgres clusters and TLS material, for the fault, TLS and privilege tests.

/// Whether this process runs as root: initdb refuses to, so the cluster then runs as `postgres`.
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}

/// Where a Postgres server program is: on `PATH`, else in the newest Debian server package
/// (`/usr/lib/postgresql/<version>/bin`, which Debian keeps off `PATH`).
fn pg_bin(program: &str) -> std::path::PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    });
    if let Some(found) = on_path {
        return found;
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin").join(program)))
        })
        .filter(|(_, candidate)| candidate.is_file())
        .max_by_key(|(version, _)| *version);
    match newest {
        Some((_, found)) => found,
        None => panic!("{program} not found on PATH nor in /usr/lib/postgresql/*/bin"),
    }
}

/// A Postgres server program, run as the `postgres` OS user when this process is root.
fn pg_program(program: &str) -> Command {
    let path = pg_bin(program);
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(path);
        command
    } else {
        Command::new(path)
    }
}

/// Runs `command` to completion; panics with its output when it fails.
fn run_checked(command: &mut Command, what: &str) {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Hands `path` to the `postgres` OS user (when running as root), so the server can use it.
fn give_to_postgres(path: &std::path::Path) {
    if running_as_root() {
        run_checked(
            Command::new("chown").args(["-R", "postgres:"]).arg(path),
            "chown to postgres",
        );
    }
}

/// A Postgres cluster of this test's own: `initdb` in a temp dir, started with `pg_ctl` on a free
/// port (socket in the same dir), stopped with `-m immediate` when dropped. Durability is off: a
/// test cluster lives for seconds.
pub struct PrivatePostgres {
    pub port: u16,
    dir: tempfile::TempDir,
}

/// Server settings every private cluster gets: small and fast, enough connections for a daemon,
/// the test's clients and the helpers.
const PRIVATE_PG_SETTINGS: [(&str, &str); 5] = [
    ("listen_addresses", "127.0.0.1"),
    ("fsync", "off"),
    ("full_page_writes", "off"),
    ("shared_buffers", "16MB"),
    ("max_connections", "50"),
];

impl PrivatePostgres {
    pub fn start() -> PrivatePostgres {
        PrivatePostgres::start_with(&[])
    }

    /// With TLS (`ssl=on`) using `certs`' server certificate; plain connections stay allowed.
    pub fn start_tls(certs: &TestCerts) -> PrivatePostgres {
        let dir = PrivatePostgres::init();
        let cert = dir.path().join("server.pem");
        let key = dir.path().join("server.key");
        std::fs::copy(certs.cert_file(), &cert).expect("copy server certificate");
        std::fs::copy(certs.key_file(), &key).expect("copy server key");
        // Postgres refuses a key file others can read.
        run_checked(
            Command::new("chmod").arg("600").arg(&key),
            "chmod server key",
        );
        give_to_postgres(dir.path());
        let cert = cert.display().to_string();
        let key = key.display().to_string();
        PrivatePostgres::launch(
            dir,
            &[
                ("ssl", "on"),
                ("ssl_cert_file", &cert),
                ("ssl_key_file", &key),
            ],
        )
    }

    /// With extra server settings (`-c name=value`).
    pub fn start_with(settings: &[(&str, &str)]) -> PrivatePostgres {
        PrivatePostgres::launch(PrivatePostgres::init(), settings)
    }

    fn init() -> tempfile::TempDir {
        let dir = tempfile::Builder::new()
            .prefix("ci-pg-")
            .tempdir()
            .expect("temp dir");
        give_to_postgres(dir.path());
        run_checked(
            pg_program("initdb")
                .arg("-D")
                .arg(dir.path().join("data"))
                .args(["--auth=trust", "-U", "postgres", "--no-sync"]),
            "initdb",
        );
        dir
    }

    fn launch(dir: tempfile::TempDir, settings: &[(&str, &str)]) -> PrivatePostgres {
        // A port found free may be taken before the server binds it: try a few.
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = free_port();
            let mut options = format!("-p {port} -k {}", dir.path().display());
            for (name, value) in PRIVATE_PG_SETTINGS.iter().chain(settings) {
                options.push_str(&format!(" -c {name}={value}"));
            }
            let output = pg_program("pg_ctl")
                .arg("-D")
                .arg(dir.path().join("data"))
                .arg("-l")
                .arg(dir.path().join("server.log"))
                .args(["-o", &options, "-w", "start"])
                .stdin(Stdio::null())
                .output()
                .expect("run pg_ctl");
            if output.status.success() {
                return PrivatePostgres { port, dir };
            }
            last_error = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
        }
        panic!("private postgres did not start:\n{last_error}");
    }

    /// The `postgres` database, as superuser `postgres`, without TLS options.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut command = pg_program("pg_ctl");
        command
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(args);
        command
    }

    /// `pg_ctl restart -m fast`: every session is terminated, the server is back when this returns.
    pub fn restart(&self) {
        run_checked(
            &mut self.pg_ctl(&["restart", "-m", "fast", "-w"]),
            "pg_ctl restart",
        );
    }

    /// The server's log so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .pg_ctl(&["stop", "-m", "immediate", "-w"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl TestDb {
    /// A database with the report tables and the triggers for `rules` on the server `admin_url`
    /// points at (a private cluster).
    pub async fn with_reports_on(admin_url: &str, tag: &str, rules: &RuleSet) -> TestDb {
        let db = TestDb::empty_on(admin_url, tag).await;
        let client = db.client().await;
        client
            .batch_execute(REPORT_TABLES_SQL)
            .await
            .expect("create tables");
        cache_invalidator::schema::install(&client, rules)
            .await
            .expect("install triggers");
        db
    }
}

/// A test CA and a server certificate it signs for `localhost` and `127.0.0.1` (made with the
/// `openssl` command, valid for two days).
pub struct TestCerts {
    pub dir: tempfile::TempDir,
}

impl TestCerts {
    pub fn generate() -> TestCerts {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = |name: &str| dir.path().join(name).display().to_string();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        run_checked(
            Command::new("openssl")
                .args(["req", "-x509", "-nodes", "-days", "2"])
                .args(ec)
                .args(["-keyout", &path("ca.key"), "-out", &path("ca.pem")])
                .args(["-subj", "/CN=cache-invalidator test CA"])
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]),
            "openssl: CA",
        );
        run_checked(
            Command::new("openssl")
                .args(["req", "-new", "-nodes"])
                .args(ec)
                .args(["-keyout", &path("server.key"), "-out", &path("server.csr")])
                .args(["-subj", "/CN=localhost"]),
            "openssl: server key",
        );
        std::fs::write(
            path("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write extensions");
        run_checked(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "2", "-in", &path("server.csr")])
                .args(["-CA", &path("ca.pem"), "-CAkey", &path("ca.key")])
                .args(["-CAcreateserial", "-out", &path("server.pem")])
                .args(["-extfile", &path("server.ext")]),
            "openssl: server certificate",
        );
        TestCerts { dir }
    }

    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.ca_file()).expect("read CA")
    }

    pub fn cert_file(&self) -> std::path::PathBuf {
        self.dir.path().join("server.pem")
    }

    pub fn key_file(&self) -> std::path::PathBuf {
        self.dir.path().join("server.key")
    }
}

impl PrivateRedis {
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
        let mut redis = PrivateRedis {
            port,
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
            extra_args: args.to_vec(),
        };
        // `--port <port>` comes first in the command line; the later `--port 0` wins.
        redis.spawn();
        redis
    }

    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}/0", self.port)
    }
}

/// A connection to a TLS Redis whose certificate `ca_pem` signed.
pub async fn tls_redis_connection(url: &str, ca_pem: &[u8]) -> MultiplexedConnection {
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca_pem.to_vec()),
        },
    )
    .expect("redis TLS client")
    .get_multiplexed_async_connection()
    .await
    .unwrap_or_else(|e| panic!("connect to redis {url}: {e}"))
}

/// The daemon's binary, for tests that run it as a process (signals, exit codes, `/proc`).
pub const BIN: &str = env!("CARGO_BIN_EXE_cache-invalidator");

/// Settings in the environment that would leak into a child from the developer's shell.
const INHERITED_SETTINGS: [&str; 19] = [
    "DATABASE_URL",
    "REDIS_URL",
    "CACHE_INVALIDATOR_REDIS_CA_FILE",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "CACHE_INVALIDATOR_RULES",
    "CACHE_INVALIDATOR_CONFIG",
    "CACHE_INVALIDATOR_LOG_FORMAT",
    "CACHE_INVALIDATOR_METRICS_ADDR",
    "CACHE_INVALIDATOR_REFILL_GUARD",
    "CACHE_INVALIDATOR_POLL_INTERVAL",
    "CACHE_INVALIDATOR_MAX_BACKLOG_AGE",
    "CACHE_INVALIDATOR_REDIS_TIMEOUT",
    "CACHE_INVALIDATOR_MODE",
    "CACHE_INVALIDATOR_INDEX_MAX_KEYS",
    "CACHE_INVALIDATOR_CLAIM_TIMEOUT",
    "CACHE_INVALIDATOR_REPLICA_ACKS",
    "CACHE_INVALIDATOR_REPLICA_WAIT_TIMEOUT",
];

/// The daemon as a child process, its stderr in a log file that is printed when the test panics;
/// killed when dropped. Derefs to the child for signals, `wait` and `id`.
pub struct LoggedChild {
    child: tokio::process::Child,
    log: std::path::PathBuf,
}

impl LoggedChild {
    /// Spawns `command` with stdout discarded and stderr written to `log`.
    pub fn spawn(mut command: tokio::process::Command, log: std::path::PathBuf) -> LoggedChild {
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = command
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start cache-invalidator");
        LoggedChild { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl std::ops::Deref for LoggedChild {
    type Target = tokio::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.child
    }
}

impl std::ops::DerefMut for LoggedChild {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.child
    }
}

impl Drop for LoggedChild {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.log.display(), self.log_text());
        }
        let _ = self.child.start_kill();
    }
}

/// `cache-invalidator ARGS` with none of the caller's settings inherited, logging at `info`,
/// killed if the test drops it.
pub fn daemon_command(args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(BIN);
    for name in INHERITED_SETTINGS {
        command.env_remove(name);
    }
    command
        .args(args)
        .env("CACHE_INVALIDATOR_MODE", test_mode().to_string())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

pub fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Sends signal `name` (`TERM`, `HUP`, `KILL`, …) to `child` the way an operator would, with `kill`.
pub async fn send_signal(child: &tokio::process::Child, name: &str) {
    let pid = child.id().expect("child still running").to_string();
    let status = tokio::process::Command::new("kill")
        .args(["-s", name, &pid])
        .status()
        .await
        .expect("run kill");
    assert!(status.success(), "kill -s {name} failed");
}

/// `GET path` on the daemon's metrics listener: the body, or `None` while it does not answer.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let response = String::from_utf8_lossy(&response);
    Some(response.split_once("\r\n\r\n")?.1.to_owned())
}

/// The value of one series (`name` or `name{label="value"}`) in Prometheus text.
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}
