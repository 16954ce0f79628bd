//! The bench's own servers and data: a private `redis-server` on a free port, or a private Redis
//! Cluster of several (never the shared one: the bench loads a million keys and deletes
//! thousands), and a scratch Postgres database with
//! the app's four report tables, created at the start and dropped at the end.

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use cache_invalidator::rules::RuleSet;
use tokio_postgres::Client;

use crate::layout::{Layout, KINDS, OWNER_FACTOR};
use crate::nodes::{own_slot_ranges, Router};

// Shared with the integration tests: one report schema and one way to start servers for both.
use cache_invalidator_test_support::{
    cluster_node_args, cluster_url, create_cluster, create_database, drop_database,
    spawn_redis_server, wait_for_port, REPORT_TABLES_SQL,
};
pub use cache_invalidator_test_support::{connect, free_port};

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
        create_cluster(&redis.ports, 0);
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
            let extra = if clustered {
                cluster_node_args(port, &redis.dir, CLUSTER_NODE_TIMEOUT_MS)
            } else {
                Vec::new()
            };
            let child = spawn_redis_server(port, &redis.dir, &extra);
            // Pushed at once, so a failure below still kills what was started.
            redis.children.push(child);
            redis.ports.push(port);
        }
        for &port in &redis.ports {
            wait_for_port(port, STARTUP);
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
            cluster_url(&self.ports)
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
        let db = ScratchDb {
            url: create_database(admin_url, &name).await,
            name,
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
        drop_database(&self.admin_url, &self.name).await;
    }
}
