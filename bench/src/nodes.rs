//! The Redis the bench measures, as the primaries that hold it: one private `redis-server`, or the
//! primaries of a private Redis Cluster. A single server is a cluster of one here, so every measure
//! is written once: a key goes to the primary of its hash slot, a `SCAN` pass runs on every primary
//! at once (as the daemon's sweep does), and counts (`DBSIZE`, `EXISTS`) are summed over them.
//!
//! The bench talks to each primary over its own connection instead of through the cluster client:
//! filling a million keys and checking thousands is pipelined per primary, which the cluster
//! client would split into one round trip per key.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use redis::aio::MultiplexedConnection;
use redis::cluster_routing::Slot;

/// Hash slots of a Redis Cluster.
const SLOTS: u16 = 16_384;
/// Keys per pipeline when checking or deleting: a pipeline per primary, not per key.
const PIPELINE_KEYS: usize = 5_000;

/// Which primary holds a key: its hash slot's owner in a cluster, the only server otherwise.
#[derive(Clone)]
pub struct Router {
    /// Empty for a single server.
    owners: Arc<HashMap<Slot, usize>>,
}

impl Router {
    pub fn single() -> Router {
        Router {
            owners: Arc::default(),
        }
    }

    /// From each primary's slot ranges (as `CLUSTER NODES` lists them: `0-5460`, `6000`), in the
    /// order of the primaries; panics unless every slot has exactly one owner.
    pub fn cluster(ranges: &[Vec<(u16, u16)>]) -> Router {
        let mut owners = HashMap::new();
        for (node, ranges) in ranges.iter().enumerate() {
            for &(first, last) in ranges {
                for slot in first..=last {
                    let slot = Slot::new(slot).expect("a slot below 16384");
                    assert!(
                        owners.insert(slot, node).is_none(),
                        "two primaries claim slot {slot:?}"
                    );
                }
            }
        }
        assert_eq!(
            owners.len(),
            usize::from(SLOTS),
            "the primaries do not cover every slot"
        );
        Router {
            owners: Arc::new(owners),
        }
    }

    /// Index of the primary that holds `key`.
    pub fn node_of(&self, key: &str) -> usize {
        if self.owners.is_empty() {
            0
        } else {
            self.owners[&Slot::for_key(key)]
        }
    }
}

/// Longest the bench waits for one reply (or pipeline) of its private Redis.
const RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A connection to every primary and the router between them.
#[derive(Clone)]
pub struct Nodes {
    pub connections: Vec<MultiplexedConnection>,
    pub router: Router,
}

impl Nodes {
    /// Connects to `urls` (one per primary, in the router's order).
    pub async fn connect(urls: &[String], router: Router) -> Nodes {
        // The client's default response timeout (half a second) fails a fill pipeline of
        // thousands of `SET`s on a busy machine; a stuck private server is still caught.
        let config =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(RESPONSE_TIMEOUT));
        let mut connections = Vec::new();
        for url in urls {
            connections.push(
                redis::Client::open(url.as_str())
                    .expect("a private redis URL")
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .unwrap_or_else(|e| panic!("connect to {url}: {e}")),
            );
        }
        Nodes {
            connections,
            router,
        }
    }

    pub fn len(&self) -> usize {
        self.connections.len()
    }

    /// `keys` split by the primary that holds them.
    pub fn split<'k>(&self, keys: impl IntoIterator<Item = &'k String>) -> Vec<Vec<&'k String>> {
        let mut by_node = vec![Vec::new(); self.len()];
        for key in keys {
            by_node[self.router.node_of(key)].push(key);
        }
        by_node
    }

    /// Keys in the whole keyspace: `DBSIZE` summed over the primaries.
    pub async fn dbsize(&self) -> u64 {
        let sizes = self.connections.iter().map(|connection| async move {
            redis::cmd("DBSIZE")
                .query_async::<u64>(&mut connection.clone())
                .await
                .expect("DBSIZE")
        });
        futures::future::join_all(sizes).await.into_iter().sum()
    }

    /// Notes which of `must_go` exist and the keyspace's size, before something removes them.
    pub async fn before_removal(&self, must_go: &HashSet<String>) -> Removal {
        Removal {
            existing: self.count_existing(must_go).await,
            size_before: self.dbsize().await,
        }
    }

    /// How many of `keys` exist.
    pub async fn count_existing(&self, keys: &HashSet<String>) -> u64 {
        self.existing(keys)
            .await
            .iter()
            .map(|keys| keys.len() as u64)
            .sum()
    }

    /// Which of `keys` exist, per primary: pipelined one-key `EXISTS` on each key's primary (a
    /// multi-key `EXISTS` would span hash slots, which a cluster node refuses).
    pub async fn existing<'k>(&self, keys: &'k HashSet<String>) -> Vec<Vec<&'k String>> {
        let by_node = self.split(keys);
        let found = by_node
            .iter()
            .zip(&self.connections)
            .map(|(keys, connection)| async move {
                let mut present = Vec::new();
                for chunk in keys.chunks(PIPELINE_KEYS) {
                    let mut pipe = redis::pipe();
                    for key in chunk {
                        pipe.cmd("EXISTS").arg(*key);
                    }
                    let exists: Vec<u64> = pipe
                        .query_async(&mut connection.clone())
                        .await
                        .expect("EXISTS");
                    present.extend(
                        chunk
                            .iter()
                            .zip(exists)
                            .filter(|(_, exists)| *exists == 1)
                            .map(|(key, _)| *key),
                    );
                }
                present
            });
        futures::future::join_all(found).await
    }

    /// Deletes `keys` with pipelined one-key `DEL`s on each key's primary.
    pub async fn delete(&self, keys: &[String]) {
        let by_node = self.split(keys);
        let deletes = by_node
            .iter()
            .zip(&self.connections)
            .map(|(keys, connection)| async move {
                for chunk in keys.chunks(PIPELINE_KEYS) {
                    let mut pipe = redis::pipe();
                    for key in chunk {
                        pipe.cmd("DEL").arg(*key).ignore();
                    }
                    let () = pipe
                        .query_async(&mut connection.clone())
                        .await
                        .expect("DEL on a private redis");
                }
            });
        futures::future::join_all(deletes).await;
    }
}

/// A primary's slot ranges from its own line of `CLUSTER NODES` (the one flagged `myself`).
/// Entries in brackets are slots being migrated, not owned: the bench's cluster has none, but
/// they are skipped rather than misread.
pub fn own_slot_ranges(cluster_nodes: &str) -> Vec<(u16, u16)> {
    let line = cluster_nodes
        .lines()
        .find(|line| {
            line.split_whitespace()
                .nth(2)
                .is_some_and(|flags| flags.split(',').any(|flag| flag == "myself"))
        })
        .expect("CLUSTER NODES has a line for the node itself");
    line.split_whitespace()
        .skip(8)
        .filter(|entry| !entry.starts_with('['))
        .map(|entry| {
            let parse = |slot: &str| slot.parse::<u16>().expect("a slot number");
            match entry.split_once('-') {
                Some((first, last)) => (parse(first), parse(last)),
                None => (parse(entry), parse(entry)),
            }
        })
        .collect()
}

/// The must-go keys present and `DBSIZE` before a sweep, to check afterwards that exactly those
/// keys went: each must-go key gone, and `DBSIZE` down by exactly their number.
pub struct Removal {
    existing: u64,
    size_before: u64,
}

impl Removal {
    /// Asserts the removal; returns how many keys went.
    pub async fn check(self, redis: &Nodes, must_go: &HashSet<String>) -> u64 {
        let survivors = redis.existing(must_go).await;
        let size_after = redis.dbsize().await;
        let left: usize = survivors.iter().map(Vec::len).sum();
        assert!(
            left == 0,
            "{left} keys that had to go are still there (per primary: {:?}), e.g. {:?}",
            survivors.iter().map(Vec::len).collect::<Vec<_>>(),
            survivors.iter().flatten().take(5).collect::<Vec<_>>()
        );
        assert_eq!(
            self.size_before - size_after,
            self.existing,
            "keys no change asked for were removed"
        );
        self.existing
    }
}
