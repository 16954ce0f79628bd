//! Redis Cluster against a real cluster of private `redis-server`s started by each test:
//! every primary is swept, a failover in the middle of a burst loses no invalidation, and a slot
//! migration holds the acknowledgement back until the migration ended.
//!
//! The keys are written through the redis crate's cluster client, so they land wherever their
//! hash slot says; assertions read every primary with `SCAN`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Child;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use redis::aio::MultiplexedConnection;

/// Clusters with replicas (six servers, a failover) are started one at a time: two at once on a
/// 2-core machine kept each other from settling within [`LONG_PATIENCE`].
static ONE_REPLICATED_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// Short, so a failover completes in a few seconds; long enough that a busy 2-core machine does
/// not trigger one by itself.
const NODE_TIMEOUT_MS: &str = "1500";
/// Concurrent SETs in flight while filling the cluster.
const FILL_CONCURRENCY: usize = 256;

/// One `redis-server --cluster-enabled yes` of a test cluster.
struct ClusterNode {
    port: u16,
    child: Option<Child>,
}

/// A Redis Cluster of private servers on free ports, killed when dropped.
struct Cluster {
    nodes: Vec<ClusterNode>,
    /// Holds each node's `nodes-<port>.conf` until the cluster is dropped.
    _dir: tempfile::TempDir,
    /// A cluster with replicas holds [`ONE_REPLICATED_CLUSTER`]; declared last, so it is released
    /// once the nodes are gone.
    _one_at_a_time: Option<tokio::sync::MutexGuard<'static, ()>>,
}

impl Cluster {
    /// `primaries` primaries with `replicas` replicas each, created with `redis-cli --cluster
    /// create`, returned once every node reports `cluster_state:ok` and sees every replica.
    async fn start(primaries: usize, replicas: usize) -> Cluster {
        let one_at_a_time = match replicas {
            0 => None,
            _ => Some(ONE_REPLICATED_CLUSTER.lock().await),
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let mut nodes = Vec::new();
        for _ in 0..primaries * (1 + replicas) {
            let port = free_port();
            let mut args = cluster_node_args(port, dir.path(), NODE_TIMEOUT_MS);
            // A replica takes over however long it was cut off: the test kills primaries on purpose.
            args.extend([
                "--cluster-replica-validity-factor".to_owned(),
                "0".to_owned(),
            ]);
            nodes.push(ClusterNode {
                port,
                child: Some(spawn_redis_server(port, dir.path(), &args)),
            });
        }
        let cluster = Cluster {
            nodes,
            _dir: dir,
            _one_at_a_time: one_at_a_time,
        };
        for node in &cluster.nodes {
            wait_for_port(node.port, Duration::from_secs(10));
        }
        create_cluster(&cluster.ports(), replicas);
        let ports = cluster.ports();
        let replica_count = primaries * replicas;
        let settled = wait_until(LONG_PATIENCE, || {
            let ports = ports.clone();
            async move {
                for port in ports {
                    let Some(view) = node_view(port).await else {
                        return false;
                    };
                    if !view.state_ok || view.replicas != replica_count || !view.replica_link_up {
                        return false;
                    }
                }
                true
            }
        })
        .await;
        assert!(settled, "the cluster never settled");
        cluster
    }

    fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|node| node.port).collect()
    }

    fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|node| node.child.is_some())
            .map(|node| node.port)
            .collect()
    }

    /// The primaries serving slots, as a live node sees them now.
    async fn primaries(&self) -> Vec<u16> {
        for port in self.live_ports() {
            if let Some(view) = node_view(port).await {
                return view.primaries;
            }
        }
        panic!("no node of the cluster answers");
    }

    /// SIGKILL: the node keeps nothing (no persistence), as a crashed machine would.
    fn kill(&mut self, port: u16) {
        for node in &mut self.nodes {
            if node.port == port {
                if let Some(mut child) = node.child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }

    /// Writes `keys` through the cluster client: each lands on the primary of its hash slot.
    async fn set_keys(&self, keys: &[String]) {
        let seeds: Vec<String> = self
            .live_ports()
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect();
        let client = redis::cluster::ClusterClient::new(seeds).expect("cluster client");
        let connection = client
            .get_async_connection()
            .await
            .expect("cluster connection");
        let results: Vec<redis::RedisResult<()>> = futures::stream::iter(keys.iter().cloned())
            .map(|key| {
                let mut connection = connection.clone();
                async move {
                    redis::cmd("SET")
                        .arg(key)
                        .arg("cached")
                        .query_async(&mut connection)
                        .await
                }
            })
            .buffer_unordered(FILL_CONCURRENCY)
            .collect()
            .await;
        for result in results {
            result.expect("SET through the cluster client");
        }
    }

    /// Keys under `namespace` on each primary, read with SCAN on that node.
    async fn keys_by_primary(&self, namespace: &str) -> BTreeMap<u16, BTreeSet<String>> {
        let mut by_node = BTreeMap::new();
        for port in self.primaries().await {
            let mut connection = node_connection(port).await;
            by_node.insert(port, keys_with_prefix(&mut connection, namespace).await);
        }
        by_node
    }

    /// Waits until each primary's replicas acknowledged everything it has: a killed primary then
    /// loses nothing that was written before.
    async fn wait_for_replication(&self) {
        let primaries = self.primaries().await;
        let replicated = wait_until(LONG_PATIENCE, || {
            let primaries = primaries.clone();
            async move {
                for port in primaries {
                    let info = info(port, "replication").await;
                    let offset = field(&info, "master_repl_offset");
                    let replica_offset = info
                        .lines()
                        .find(|line| line.starts_with("slave0:"))
                        .and_then(|line| {
                            line.split(',')
                                .find_map(|part| part.strip_prefix("offset="))
                                .map(str::to_owned)
                        });
                    if offset.is_none() || offset != replica_offset {
                        return false;
                    }
                }
                true
            }
        })
        .await;
        assert!(replicated, "replicas never caught up");
    }

    /// Slot migration by hand, as `redis-cli --cluster reshard` does it: mark `slot` importing on
    /// `to` and migrating on `from`.
    async fn begin_migration(&self, slot: u16, from: u16, to: u16) {
        let from_id = node_id(from).await;
        let to_id = node_id(to).await;
        setslot(to, slot, &["IMPORTING", &from_id]).await;
        setslot(from, slot, &["MIGRATING", &to_id]).await;
    }

    /// Moves the slot's keys and hands the slot to `to` on every primary.
    async fn finish_migration(&self, slot: u16, from: u16, to: u16) {
        let mut source = node_connection(from).await;
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query_async(&mut source)
                .await
                .expect("GETKEYSINSLOT");
            if keys.is_empty() {
                break;
            }
            let () = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query_async(&mut source)
                .await
                .expect("MIGRATE");
        }
        let to_id = node_id(to).await;
        setslot(to, slot, &["NODE", &to_id]).await;
        setslot(from, slot, &["NODE", &to_id]).await;
        for port in self.primaries().await {
            if port != from && port != to {
                setslot(port, slot, &["NODE", &to_id]).await;
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for port in self.ports() {
            self.kill(port);
        }
    }
}

async fn node_connection(port: u16) -> MultiplexedConnection {
    redis_connection(&format!("redis://127.0.0.1:{port}")).await
}

/// What one node says about the cluster.
struct NodeView {
    state_ok: bool,
    /// Primaries serving slots, not failed.
    primaries: Vec<u16>,
    replicas: usize,
    /// When the node is a replica: its link to the primary is up.
    replica_link_up: bool,
}

async fn node_view(port: u16) -> Option<NodeView> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut connection = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("CLUSTER")
        .arg("INFO")
        .query_async(&mut connection)
        .await
        .ok()?;
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut connection)
        .await
        .ok()?;
    let replication: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut connection)
        .await
        .ok()?;
    let mut primaries = Vec::new();
    let mut replicas = 0;
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 || fields[2].contains("fail") {
            continue;
        }
        if fields[2].contains("slave") {
            replicas += 1;
        } else if fields.len() > 8 {
            let address = fields[1].split('@').next()?;
            primaries.push(address.rsplit_once(':')?.1.parse().ok()?);
        }
    }
    primaries.sort();
    Some(NodeView {
        state_ok: info.contains("cluster_state:ok"),
        primaries,
        replicas,
        replica_link_up: !replication.contains("role:slave")
            || replication.contains("master_link_status:up"),
    })
}

async fn info(port: u16, section: &str) -> String {
    redis::cmd("INFO")
        .arg(section)
        .query_async(&mut node_connection(port).await)
        .await
        .expect("INFO")
}

fn field(info: &str, name: &str) -> Option<String> {
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("{name}:")))
        .map(|value| value.trim().to_owned())
}

async fn node_id(port: u16) -> String {
    redis::cmd("CLUSTER")
        .arg("MYID")
        .query_async(&mut node_connection(port).await)
        .await
        .expect("CLUSTER MYID")
}

async fn setslot(port: u16, slot: u16, args: &[&str]) {
    let () = redis::cmd("CLUSTER")
        .arg("SETSLOT")
        .arg(slot)
        .arg(args)
        .query_async(&mut node_connection(port).await)
        .await
        .unwrap_or_else(|e| panic!("CLUSTER SETSLOT {slot} {args:?} on {port}: {e}"));
}

async fn key_slot(port: u16, key: &str) -> u16 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(&mut node_connection(port).await)
        .await
        .expect("CLUSTER KEYSLOT")
}

/// The keys of the reports `changed` (which must go) and of the others (which must stay), in
/// the django-redis layout under `space`, with `filler` unrelated keys among the decoys so each
/// node's pass takes several `SCAN` steps.
fn report_keys(
    space: &KeyPrefix,
    changed: std::ops::RangeInclusive<i32>,
    kept: std::ops::RangeInclusive<i32>,
    filler: usize,
) -> (Vec<String>, Vec<String>) {
    let author = |id: i32| 1 + (id - 1) / 10;
    let mut must_go = Vec::new();
    let mut decoys = Vec::new();
    for id in changed.clone() {
        for user in 1..=3 {
            must_go.push(space.key(&format!("report:{id}:{user}:h")));
        }
        must_go.push(space.key(&format!("reportlist:reports:{}:p1", author(id))));
        decoys.push(space.key_v2(&format!("report:{id}:1:h")));
        decoys.push(space.key(&format!("studentreport:{id}:1:h")));
    }
    for id in kept {
        // Ids like 101 share `report:10` with a changed id: the boundary must hold.
        decoys.push(space.key(&format!("report:{id}:1:h")));
        decoys.push(space.key(&format!("reportlist:reports:{}:p1", author(id))));
    }
    for n in 0..filler {
        decoys.push(space.key(&format!("teacherreport:{n}:1:h")));
    }
    must_go.sort();
    must_go.dedup();
    // An author with both changed and unchanged reports: their list must go.
    decoys.retain(|key| must_go.binary_search(key).is_err());
    decoys.sort();
    decoys.dedup();
    (must_go, decoys)
}

/// A database of `reports` seeded reports under a key space of its own for `tag`, and the keys of
/// [`report_keys`] written to `cluster`: returns both and the keys (must go, decoys).
async fn written(
    cluster: &Cluster,
    tag: &str,
    reports: i32,
    changed: std::ops::RangeInclusive<i32>,
    kept: std::ops::RangeInclusive<i32>,
    filler: usize,
) -> (KeyPrefix, TestDb, Vec<String>, Vec<String>) {
    let (space, db) = space_with_reports(tag).await;
    db.seed_reports(reports).await;
    let (must_go, decoys) = report_keys(&space, changed, kept, filler);
    cluster
        .set_keys(&[must_go.clone(), decoys.clone()].concat())
        .await;
    (space, db, must_go, decoys)
}

/// Asserts, node by node, that no key of `must_go` is left and every decoy is still there.
fn assert_swept(by_node: &BTreeMap<u16, BTreeSet<String>>, must_go: &[String], decoys: &[String]) {
    let mut present = BTreeSet::new();
    for (port, keys) in by_node {
        let left: Vec<&String> = must_go.iter().filter(|key| keys.contains(*key)).collect();
        assert!(
            left.is_empty(),
            "node {port} still holds {} must-go key(s), e.g. {:?}",
            left.len(),
            &left[..left.len().min(5)]
        );
        present.extend(keys.iter().cloned());
    }
    let lost: Vec<&String> = decoys
        .iter()
        .filter(|key| !present.contains(*key))
        .collect();
    assert!(
        lost.is_empty(),
        "{} decoy(s) deleted, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}

/// Before the daemon starts: every primary holds keys of both kinds, so "gone everywhere" and
/// "kept everywhere" are about every node.
async fn assert_spread(
    cluster: &Cluster,
    space: &KeyPrefix,
    must_go: &[String],
    decoys: &[String],
) {
    let by_node = cluster.keys_by_primary(&space.namespace).await;
    assert_eq!(by_node.len(), 3, "three primaries");
    for (port, keys) in &by_node {
        assert!(
            must_go.iter().any(|key| keys.contains(key))
                && decoys.iter().any(|key| keys.contains(key)),
            "node {port} holds no must-go key or no decoy"
        );
    }
    let total: usize = by_node.values().map(BTreeSet::len).sum();
    assert_eq!(
        total,
        must_go.len() + decoys.len(),
        "every key written once"
    );
}

/// Waits until the outbox is empty, then reads the keys under `space` on each primary. The outbox
/// is empty only once Redis confirmed every delete: nothing is left to wait for.
async fn once_acknowledged(
    cluster: &Cluster,
    space: &KeyPrefix,
    db: &TestDb,
) -> BTreeMap<u16, BTreeSet<String>> {
    db.wait_for_empty_outbox(LONG_PATIENCE).await;
    cluster.keys_by_primary(&space.namespace).await
}

/// Waits until no node holds a key of `must_go`.
async fn wait_until_swept(cluster: &Cluster, space: &KeyPrefix, must_go: &[String]) {
    let swept = wait_until(LONG_PATIENCE, || async {
        let by_node = cluster.keys_by_primary(&space.namespace).await;
        must_go
            .iter()
            .all(|key| by_node.values().all(|keys| !keys.contains(key)))
    })
    .await;
    if !swept {
        let by_node = cluster.keys_by_primary(&space.namespace).await;
        assert_swept(&by_node, must_go, &[]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_primary_is_swept_and_decoys_stay_on_every_node() {
    let cluster = Cluster::start(3, 0).await;
    let (space, db, must_go, decoys) =
        written(&cluster, "cluster", 200, 1..=100, 101..=200, 3000).await;
    assert_spread(&cluster, &space, &must_go, &decoys).await;

    let daemon = Daemon::start(test_settings(
        &db.url,
        &cluster_url(&cluster.ports()),
        space.rules(),
    ));
    let client = db.client().await;
    // One statement touching 50 rows, and 50 statements touching one row each.
    client
        .batch_execute("UPDATE reports_report SET title = 'bulk' WHERE id <= 50")
        .await
        .expect("bulk update");
    for id in 51..=100 {
        client
            .execute(
                "UPDATE reports_report SET title = 'one' WHERE id = $1",
                &[&id],
            )
            .await
            .expect("update");
    }
    let by_node = once_acknowledged(&cluster, &space, &db).await;
    assert_swept(&by_node, &must_go, &decoys);
    daemon.stop().await;
    db.drop().await;
}

/// A cluster of three primaries with one replica each, `reports` report rows, and the keys of the
/// `changed` reports (must go) and of the `kept` ones (decoys) written, spread over every primary
/// and replicated.
async fn replicated(
    tag: &str,
    reports: i32,
    changed: std::ops::RangeInclusive<i32>,
    kept: std::ops::RangeInclusive<i32>,
) -> (Cluster, KeyPrefix, TestDb, Vec<String>, Vec<String>) {
    let cluster = Cluster::start(3, 1).await;
    let (space, db, must_go, decoys) = written(&cluster, tag, reports, changed, kept, 1000).await;
    assert_spread(&cluster, &space, &must_go, &decoys).await;
    cluster.wait_for_replication().await;
    (cluster, space, db, must_go, decoys)
}

/// Waits until a replica took the place of `victim`: three primaries again, none of them it.
async fn wait_for_promotion(cluster: &Cluster, victim: u16) {
    let promoted = wait_until(LONG_PATIENCE, || async {
        let primaries = cluster.primaries().await;
        primaries.len() == 3 && !primaries.contains(&victim)
    })
    .await;
    assert!(promoted, "no replica was promoted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_failing_over_during_a_burst_loses_no_invalidation() {
    let (mut cluster, space, db, must_go, decoys) =
        replicated("failover", 800, 1..=600, 601..=800).await;

    // The only seed is the primary about to die: the worker must find the cluster again through
    // the nodes it discovered.
    let victim = cluster.primaries().await[0];
    let daemon = Daemon::start(test_settings(
        &db.url,
        &cluster_url(&[victim]),
        space.rules(),
    ));
    let client = db.client().await;
    // Transactions of ten one-row statements: many outbox rows, many windows.
    retitle_in_transactions(&client, 1..=300, 10, "b").await;
    // Once the worker acknowledged part of the burst, it has discovered the cluster and is busy.
    let first_half_rows = 300;
    assert!(
        wait_until(LONG_PATIENCE, || async {
            db.outbox_rows().await < first_half_rows
        })
        .await,
        "the worker never acknowledged anything"
    );
    cluster.kill(victim);
    retitle_in_transactions(&client, 301..=600, 10, "b").await;

    // A replica takes the dead primary's slots; the worker rediscovers and sweeps it.
    wait_for_promotion(&cluster, victim).await;
    let by_node = once_acknowledged(&cluster, &space, &db).await;
    assert!(!by_node.contains_key(&victim));
    assert_swept(&by_node, &must_go, &decoys);
    daemon.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_index_mode_a_failover_seeds_the_promoted_primary_and_loses_no_invalidation() {
    let (mut cluster, space, db, must_go, decoys) =
        replicated("idx_failover", 600, 1..=200, 401..=600).await;
    let daemon = Daemon::start_indexed(test_settings(
        &db.url,
        &cluster_url(&cluster.primaries().await),
        space.rules(),
    ))
    .await;
    let client = db.client().await;
    // The seed rows' changes first, then changes answered from the index.
    db.wait_for_empty_outbox(LONG_PATIENCE).await;
    client
        .batch_execute("UPDATE reports_report SET title = 'a' WHERE id BETWEEN 1 AND 100")
        .await
        .expect("update");
    db.wait_for_empty_outbox(LONG_PATIENCE).await;

    let victim = cluster.primaries().await[0];
    cluster.kill(victim);
    client
        .batch_execute("UPDATE reports_report SET title = 'b' WHERE id BETWEEN 101 AND 200")
        .await
        .expect("update during the failover");
    wait_for_promotion(&cluster, victim).await;
    let by_node = once_acknowledged(&cluster, &space, &db).await;
    assert_swept(&by_node, &must_go, &decoys);

    // The promoted primary's part is seeded; keys written to it now are found by lookups.
    daemon.wait_index_complete().await;
    let (again, kept) = report_keys(&space, 201..=300, 301..=400, 2000);
    cluster
        .set_keys(&[again.clone(), kept.clone()].concat())
        .await;
    client
        .batch_execute("UPDATE reports_report SET title = 'c' WHERE id BETWEEN 201 AND 300")
        .await
        .expect("update after the failover");
    let by_node = once_acknowledged(&cluster, &space, &db).await;
    assert_swept(&by_node, &again, &[decoys, kept].concat());
    daemon.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migration_holds_the_acknowledgement_until_it_ends() {
    let cluster = Cluster::start(3, 0).await;
    let (space, db, must_go, decoys) = written(&cluster, "migration", 20, 1..=1, 2..=20, 300).await;

    // The slot of one must-go key starts moving to another primary.
    let primaries = cluster.primaries().await;
    let key = &must_go[0];
    let slot = key_slot(primaries[0], key).await;
    let by_node = cluster.keys_by_primary(&space.namespace).await;
    let from = by_node
        .iter()
        .find_map(|(port, keys)| keys.contains(key).then_some(*port));
    let from = from.expect("the key is on some primary");
    let to = *primaries
        .iter()
        .find(|port| **port != from)
        .expect("another primary");
    cluster.begin_migration(slot, from, to).await;

    let daemon = Daemon::start(test_settings(
        &db.url,
        &cluster_url(&cluster.ports()),
        space.rules(),
    ));
    db.client()
        .await
        .batch_execute("UPDATE reports_report SET title = 'x' WHERE id = 1")
        .await
        .expect("update");
    // Matches are deleted on every attempt...
    wait_until_swept(&cluster, &space, &must_go).await;
    // ...but a sweep that overlapped a migration vouches for nothing: the change stays pending.
    assert_eq!(db.outbox_rows().await, 1);

    cluster.finish_migration(slot, from, to).await;
    let by_node = once_acknowledged(&cluster, &space, &db).await;
    assert_swept(&by_node, &must_go, &decoys);
    daemon.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_url_to_one_cluster_node_is_refused_and_primaries_report_their_cursor_order() {
    use cache_invalidator::redis_nodes::{CursorOrder, NodeError, RedisTarget};
    use cache_invalidator::settings::SecretUrl;
    let cluster = Cluster::start(3, 0).await;
    let port = cluster.ports()[0];

    // `redis://` to one primary would sweep a third of the keys: refused, with the fix in the
    // message, and not retried (a configuration error).
    let plain = SecretUrl::new(format!("redis://127.0.0.1:{port}"));
    let target =
        RedisTarget::parse(plain.expose(), None, Duration::from_secs(5)).expect("a valid URL");
    match target.connect().await {
        Err(error @ NodeError::ClusterNode { .. }) => {
            assert!(error.is_permanent());
            assert!(
                error.to_string().contains("redis+cluster://"),
                "the error should say what to use: {error}"
            );
        }
        Err(other) => panic!("expected the cluster-node refusal, got {other}"),
        Ok(_) => panic!("a plain URL to a cluster node was accepted"),
    }

    // The sweep's idea of the cursor order comes from the servers themselves.
    let version = field(&info(port, "server").await, "redis_version").expect("redis_version");
    let (major, minor) = {
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    };
    let expected = if (major, minor) >= (7, 3) {
        CursorOrder::SlotThenReversedBuckets
    } else {
        CursorOrder::ReversedBuckets
    };
    let url = SecretUrl::new(cluster_url(&cluster.ports()));
    let nodes = RedisTarget::parse(url.expose(), None, Duration::from_secs(5))
        .expect("a valid cluster URL")
        .connect()
        .await
        .expect("connect to every primary");
    assert_eq!(nodes.len(), 3);
    for node in &nodes {
        assert_eq!(node.cursor_order, expected, "{}", node.name);
    }
}
