//! Private servers and data shared by cache-invalidator's integration tests (`tests/common`) and its
//! benchmark (`bench/`): the app's report schema, a Postgres connection, scratch databases, free
//! ports, `redis-server` processes and a Redis Cluster made of them.
//!
//! A crate of its own so that both reach the same code without the daemon's package carrying it.

#![forbid(unsafe_code)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

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

/// Creates database `name` on the server `admin_url` points at, dropping one an earlier run left
/// under that name first, and returns its URL.
pub async fn create_database(admin_url: &str, name: &str) -> String {
    let admin = connect(admin_url).await;
    // Two statements: neither may run inside the transaction a multi-statement query would be.
    for statement in [
        format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
        format!("CREATE DATABASE \"{name}\""),
    ] {
        admin
            .batch_execute(&statement)
            .await
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
    }
    with_database(admin_url, name)
}

/// Drops database `name` on the server `admin_url` points at, ending its sessions.
pub async fn drop_database(admin_url: &str, name: &str) {
    connect(admin_url)
        .await
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await
        .unwrap_or_else(|e| panic!("drop database {name}: {e}"));
}

/// `url` (a Postgres URL) pointing at database `database` instead.
pub fn with_database(url: &str, database: &str) -> String {
    let mut parsed = url::Url::parse(url).expect("a valid Postgres URL");
    parsed.set_path(&format!("/{database}"));
    parsed.to_string()
}

/// A port nobody listens on right now, and one this process has not handed out before.
///
/// The ports come from below the kernel's ephemeral range (`ip_local_port_range`), not from a bind
/// to port 0: a port from that range, released by the probe, is soon taken as the local end of some
/// outgoing connection of the parallel tests, and the server meant for it cannot bind it — which
/// also holds for a server restarted on its old port. Each process starts at its own offset so that
/// two processes seldom walk the same ports.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = unreserved_range();
    let span = u32::from(high - low);
    let offset = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let candidate = low + ((offset + step) % span) as u16;
        if TcpListener::bind(("127.0.0.1", candidate)).is_ok() {
            return candidate;
        }
    }
    panic!("no free port in {low}..{high} on 127.0.0.1");
}

/// The ports below the kernel's ephemeral range that free_port hands out: 20000 up to that range
/// (Linux's default starts at 32768), or 20000..30000 where it cannot be read or starts too low.
fn unreserved_range() -> (u16, u16) {
    const LOW: u16 = 20000;
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok());
    match ephemeral_start {
        Some(start) if start > LOW + 1000 => (LOW, start),
        _ => (LOW, 30000),
    }
}

/// The server program the tests start private servers with: `TEST_REDIS_SERVER_BIN`
/// (`valkey-server` when the suites run against Valkey, whose command line is Redis'), else
/// `redis-server`.
pub fn redis_server_bin() -> String {
    std::env::var("TEST_REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".to_owned())
}

/// A private server ([`redis_server_bin`]) on `port` keeping nothing on disk (its files, if any,
/// in `dir`), with `extra` arguments after the base ones (a later `--port` wins over the first).
pub fn spawn_redis_server(port: u16, dir: &Path, extra: &[String]) -> Child {
    let program = redis_server_bin();
    Command::new(&program)
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--dir", &dir.display().to_string()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {program} (is it on PATH? TEST_REDIS_SERVER_BIN): {e}"))
}

/// Waits until something accepts connections on `port`; panics after `timeout`.
pub fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} on {port} did not start",
            redis_server_bin()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The arguments that make a `redis-server` on `port` a cluster node, its `nodes-<port>.conf` in
/// `dir`, declaring a node failed after `node_timeout_ms`.
pub fn cluster_node_args(port: u16, dir: &Path, node_timeout_ms: &str) -> Vec<String> {
    let config = dir.join(format!("nodes-{port}.conf")).display().to_string();
    [
        "--cluster-enabled",
        "yes",
        // The bus port is the client port + 10000 unless set: that may be taken or out of range.
        "--cluster-port",
        &free_port().to_string(),
        "--cluster-config-file",
        &config,
        "--cluster-node-timeout",
        node_timeout_ms,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Joins the nodes on `ports` into one cluster with `redis-cli --cluster create`, `replicas`
/// replicas per primary; the caller waits for the nodes to agree.
pub fn create_cluster(ports: &[u16], replicas: usize) {
    let addresses: Vec<String> = ports
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect();
    let output = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addresses)
        .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
        .stdin(Stdio::null())
        .output()
        .expect("run redis-cli --cluster create");
    assert!(
        output.status.success(),
        "redis-cli --cluster create failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `redis+cluster://` naming the nodes on `seeds` as seed nodes.
pub fn cluster_url(seeds: &[u16]) -> String {
    let hosts: Vec<String> = seeds.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    format!("redis+cluster://{}", hosts.join(","))
}
