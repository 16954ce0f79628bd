//! The bench's own servers and data: a private `redis-server` on a free port, or a private Redis
//! Cluster of several (never the shared one: the bench loads a million keys and deletes
//! thousands), and a scratch Postgres database with
//! the app's four report tables, created at the start and dropped at the end.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cache_invalidator::rules::RuleSet;
use tokio_postgres::{Client, NoTls};

use crate::layout::{Layout, KINDS, OWNER_FACTOR};
use crate::nodes::{own_slot_ranges, Router};

/// The four report tables of the Django app and the user table they cascade from (the same as
/// the integration tests' `REPORT_TABLES_SQL`).
const REPORT_TABLES_SQL: &str = r#"
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

/// `--cluster-node-timeout` of the bench's cluster: generous, so a node starved of CPU while a
/// million keys are loaded on two cores is never marked failing (there are no replicas to take
/// over; a failing node would stop the whole cluster).
const CLUSTER_NODE_TIMEOUT_MS: &str = "30000";
/// How long the servers may take to start and the cluster to agree on its slots.
const STARTUP: Duration = Duration::from_secs(30);

/// The bench's own Redis, killed when dropped: one `redis-server`, or the primaries of a Redis
/// Cluster (no replicas: the bench measures sweeps, not failover).
pub struct PrivateRedis {
    /// Ports of the servers; in a cluster, the primaries in the order of [`Self::router`].
    ports: Vec<u16>,
    children: Vec<Child>,
    clustered: bool,
    dir: PathBuf,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        PrivateRedis::spawn(1, false)
    }

    /// `primaries` cluster-enabled servers joined with `redis-cli --cluster create`, returned
    /// once every node reports `cluster_state:ok`.
    pub fn start_cluster(primaries: usize) -> PrivateRedis {
        let redis = PrivateRedis::spawn(primaries, true);
        let addresses: Vec<String> = redis
            .ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let deadline = Instant::now() + STARTUP;
        for port in &redis.ports {
            while !cluster_state_ok(*port) {
                assert!(
                    Instant::now() < deadline,
                    "the cluster node on {port} never reported cluster_state:ok"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        redis
    }

    fn spawn(servers: usize, clustered: bool) -> PrivateRedis {
        let ports: Vec<u16> = (0..servers).map(|_| free_port()).collect();
        let dir = std::env::temp_dir().join(format!("cache-invalidator-bench-{}", ports[0]));
        std::fs::create_dir_all(&dir).expect("a temp dir for the private redis-server");
        let mut redis = PrivateRedis {
            ports: Vec::new(),
            children: Vec::new(),
            clustered,
            dir,
        };
        for port in ports {
            let mut command = Command::new("redis-server");
            command
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--dir", &redis.dir.display().to_string()]);
            if clustered {
                command
                    .args(["--cluster-enabled", "yes"])
                    // The bus port is the client port + 10000 unless set: that may be taken.
                    .args(["--cluster-port", &free_port().to_string()])
                    .args([
                        "--cluster-config-file",
                        &redis
                            .dir
                            .join(format!("nodes-{port}.conf"))
                            .display()
                            .to_string(),
                    ])
                    .args(["--cluster-node-timeout", CLUSTER_NODE_TIMEOUT_MS]);
            }
            let child = command
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server (is it on PATH?)");
            // Pushed at once, so a failure below still kills what was started.
            redis.children.push(child);
            redis.ports.push(port);
        }
        let deadline = Instant::now() + STARTUP;
        for &port in &redis.ports {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "redis-server on {port} did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        redis
    }

    /// One URL per primary, in the router's order.
    pub fn node_urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}/0"))
            .collect()
    }

    /// What the daemon is given: the server, or every primary as seed nodes of the cluster.
    pub fn daemon_url(&self) -> String {
        if self.clustered {
            let seeds: Vec<String> = self
                .ports
                .iter()
                .map(|port| format!("127.0.0.1:{port}"))
                .collect();
            format!("redis+cluster://{}", seeds.join(","))
        } else {
            format!("redis://127.0.0.1:{}/0", self.ports[0])
        }
    }

    /// Where each key lives: read from each primary's own `CLUSTER NODES` line.
    pub fn router(&self) -> Router {
        if !self.clustered {
            return Router::single();
        }
        let ranges: Vec<Vec<(u16, u16)>> = self
            .ports
            .iter()
            .map(|&port| {
                let nodes: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query(&mut blocking_connection(port))
                    .expect("CLUSTER NODES");
                own_slot_ranges(&nodes)
            })
            .collect();
        Router::cluster(&ranges)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port on 127.0.0.1")
}

fn blocking_connection(port: u16) -> redis::Connection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .and_then(|client| client.get_connection())
        .unwrap_or_else(|e| panic!("connect to the redis-server on {port}: {e}"))
}

fn cluster_state_ok(port: u16) -> bool {
    redis::cmd("CLUSTER")
        .arg("INFO")
        .query::<String>(&mut blocking_connection(port))
        .is_ok_and(|info| info.contains("cluster_state:ok"))
}

pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(connection);
    client
}

/// A database of the bench's own on the server `admin_url` names.
pub struct ScratchDb {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl ScratchDb {
    /// Creates the database with the report tables filled for `layout` and the triggers of `rules`.
    pub async fn create(admin_url: &str, layout: &Layout, rules: &RuleSet) -> ScratchDb {
        let name = format!("cache_invalidator_bench_{}", std::process::id());
        let admin = connect(admin_url).await;
        for statement in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ] {
            admin
                .batch_execute(&statement)
                .await
                .expect("create the scratch database");
        }
        let mut url = url::Url::parse(admin_url).expect("a valid --database-url");
        url.set_path(&format!("/{name}"));
        let db = ScratchDb {
            name,
            url: url.to_string(),
            admin_url: admin_url.to_owned(),
        };
        let client = connect(&db.url).await;
        client
            .batch_execute(REPORT_TABLES_SQL)
            .await
            .expect("create the report tables");
        client
            .batch_execute(&format!(
                "INSERT INTO auth_user (username) SELECT 'user' || g FROM generate_series(1, {}) g",
                layout.users
            ))
            .await
            .expect("fill auth_user");
        for (kind_index, kind) in KINDS.iter().enumerate() {
            // Owners follow Layout::initial_owner, so the bench knows them without asking.
            let owners: Vec<String> = (0..kind.owners.len())
                .map(|column| {
                    format!(
                        "1 + ((g::bigint * {}) + {kind_index}) % {}",
                        OWNER_FACTOR[column], layout.users
                    )
                })
                .collect();
            client
                .batch_execute(&format!(
                    "INSERT INTO {} ({}, {}) SELECT 'row ' || g, {} FROM generate_series(1, {}) g",
                    kind.table,
                    kind.text,
                    kind.owners.join(", "),
                    owners.join(", "),
                    layout.rows
                ))
                .await
                .expect("fill a report table");
        }
        client
            .batch_execute("VACUUM ANALYZE")
            .await
            .expect("vacuum the scratch database");
        cache_invalidator::schema::install(&client, rules)
            .await
            .expect("install the triggers");
        db
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    pub async fn drop(self) {
        connect(&self.admin_url)
            .await
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .expect("drop the scratch database");
    }
}
