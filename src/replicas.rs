//! Replicas before the acknowledgement: a change leaves the outbox only once the replicas of each
//! Redis node it touched have its deletes, so a failover cannot bring back keys whose outbox rows
//! are gone.
//!
//! Redis replicates asynchronously: `UNLINK` returns once the primary removed the keys, and a
//! primary that dies before streaming them leaves the promoted replica with the stale keys. `WAIT
//! <n> <timeout>` blocks the connection that made the writes until `n` replicas acknowledged
//! everything it wrote before, or the timeout passes; it answers how many did. The sweep puts it in
//! the request that confirms a window on a node ([`crate::sweep`]); [`confirm_replicas`] is the
//! same step on its own, for the index's deletes ([`crate::index::deletes`]).
//!
//! How many: `--replica-acks N`, or by default every replica connected to the node
//! (`connected_slaves` of `INFO replication`, read when connecting and again with each
//! confirmation, so replicas that attach or leave are followed). A replica that is disconnected is
//! not waited for: when it reconnects it resynchronises from the primary, deletes included. At the
//! timeout the change is kept: nothing is acknowledged, and the confirmation is asked again.
//!
//! Behind Sentinel that is not enough: the replica that left may be the one just promoted, and
//! the old master (still answering until the sentinels demote it) would confirm deletes the new
//! master never gets. There the count never drops below the replicas connected when the worker
//! connected ([`ReplicaPolicy::floor`]); the worker connects again, and counts again, when the
//! sentinels announce a new master or a replica down.

use std::time::Duration;

use redis::aio::MultiplexedConnection;

/// `--replica-wait-timeout` when not given. Replicas on the same network confirm a write within
/// milliseconds; a second means one is stuck.
pub const DEFAULT_REPLICA_WAIT_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(
        "INFO replication has no connected_slaves field: cannot count the replicas to wait for"
    )]
    NoReplicaCount,
}

/// Which replicas must have a node's deletes before a change is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaPolicy {
    /// `None`: every replica connected to the node.
    pub acks: Option<u32>,
    /// How long one `WAIT` may block; at the timeout the change is kept and confirmed again later.
    pub timeout: Duration,
    /// Without `acks`: wait for at least this many replicas even when fewer are connected now.
    pub floor: u32,
}

impl Default for ReplicaPolicy {
    fn default() -> ReplicaPolicy {
        ReplicaPolicy {
            acks: None,
            timeout: DEFAULT_REPLICA_WAIT_TIMEOUT,
            floor: 0,
        }
    }
}

impl ReplicaPolicy {
    /// The count follows the replicas connected to the node, read from `INFO replication`.
    pub fn counts_connected(&self) -> bool {
        self.acks.is_none()
    }

    /// Replicas that must acknowledge, given how many are connected (`None`: unknown, `INFO`
    /// refused): then only an explicit `--replica-acks` makes the worker wait.
    pub fn required(&self, connected: Option<u32>) -> u32 {
        self.acks
            .unwrap_or_else(|| connected.unwrap_or(0).max(self.floor))
    }

    /// `WAIT`'s timeout argument, in milliseconds. At least 1: `WAIT n 0` blocks forever.
    pub fn wait_millis(&self) -> u64 {
        u64::try_from(self.timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

/// `connected_slaves` of an `INFO replication` reply.
pub fn connected_replicas(info_replication: &str) -> Option<u32> {
    info_replication.lines().find_map(|line| {
        line.trim_end()
            .strip_prefix("connected_slaves:")?
            .parse()
            .ok()
    })
}

/// What a confirmation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirmation {
    /// Replicas that acknowledged every write of the connection so far.
    pub acked: u32,
    /// Replicas the policy asked for.
    pub required: u32,
}

impl Confirmation {
    /// Enough replicas have the writes: the changes may be acknowledged.
    pub fn confirmed(&self) -> bool {
        self.acked >= self.required
    }
}

/// Waits until the replicas the policy asks for have every write made so far on `connection`
/// (`WAIT` counts the writes of the connection it runs on: call it on the connection that
/// deleted the keys). Without replicas to wait for it returns at once, having sent no `WAIT`.
/// `Ok` with [`Confirmation::confirmed`] false at the timeout: keep the changes and try again.
pub async fn confirm_replicas(
    connection: &mut MultiplexedConnection,
    policy: ReplicaPolicy,
) -> Result<Confirmation, ReplicaError> {
    let required = match policy.acks {
        Some(acks) => acks,
        None => {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(connection)
                .await?;
            policy.required(Some(
                connected_replicas(&info).ok_or(ReplicaError::NoReplicaCount)?,
            ))
        }
    };
    if required == 0 {
        return Ok(Confirmation { acked: 0, required });
    }
    let acked: u32 = redis::cmd("WAIT")
        .arg(required)
        .arg(policy.wait_millis())
        .query_async(connection)
        .await?;
    Ok(Confirmation { acked, required })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replica_count_comes_from_info_or_the_setting() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\nslave0:ip=127.0.0.1\r\n";
        assert_eq!(connected_replicas(info), Some(2));
        assert_eq!(connected_replicas("role:master\r\n"), None);
        let every = ReplicaPolicy::default();
        assert!(every.counts_connected());
        assert_eq!(every.required(Some(2)), 2);
        assert_eq!(every.required(None), 0);
        let one = ReplicaPolicy {
            acks: Some(1),
            timeout: Duration::ZERO,
            floor: 0,
        };
        assert_eq!(one.required(Some(3)), 1);
        assert_eq!(one.required(None), 1);
        // WAIT with a timeout of 0 would never return.
        assert_eq!(one.wait_millis(), 1);
        // Behind Sentinel: a replica that left still counts until the worker connects again.
        let floored = ReplicaPolicy { floor: 1, ..every };
        assert_eq!(floored.required(Some(0)), 1);
        assert_eq!(floored.required(Some(2)), 2);
    }
}
