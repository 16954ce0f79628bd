//! A window of patterns, in either mode: what the worker asks to clear ([`PatternSpec`]), what a
//! step of the finder reports ([`StepReport`]), and what can make a step fail ([`StepError`]).
//!
//! The sweep ([`crate::sweep`]) and the index's deletes ([`crate::index::deletes`]) both speak
//! these words, and both remove keys with the same pipelined `UNLINK`s ([`UNLINK_CHUNK`]), which
//! in a Redis Cluster carry the node's `CLUSTER NODES` ([`take_cluster_nodes`]) so the node's
//! slots are checked in the same round trip.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::replicas::ReplicaError;

pub type WindowId = u64;

/// Keys per `UNLINK` command: small enough that freeing them never blocks Redis for long.
pub const UNLINK_CHUNK: usize = 256;

/// A pattern a window asks to clear, with the label its deleted keys are counted under (the table).
/// The text is shared: the worker's job, the refill guard's queue and the sweeper's index all hold
/// the same allocation, since tens of thousands of patterns can be active at once.
#[derive(Debug, Clone)]
pub struct PatternSpec {
    pub pattern: Arc<str>,
    pub label: Arc<str>,
}

/// A window whose keys are confirmed gone.
#[derive(Debug, Clone)]
pub struct FinishedWindow {
    pub id: WindowId,
    /// Keys matched by each of the window's patterns (same order as given) while it was active.
    pub keys_per_pattern: Vec<u64>,
}

/// What one step did.
#[derive(Debug, Default, Clone)]
pub struct StepReport {
    pub finished: Vec<FinishedWindow>,
    /// Keys removed, by label (for first-pass patterns).
    pub deleted: HashMap<Arc<str>, u64>,
    /// Keys removed by patterns only a refill-guard window still asked for: stale refills.
    pub refill_deleted: u64,
    /// Durations of the passes that ended in this step (one per node whose cursor went all the
    /// way round).
    pub pass_durations: Vec<Duration>,
    pub keys_scanned: u64,
    /// Keys matched by a listing sweeper ([`crate::sweep::Sweeper::listing`]), which deletes
    /// nothing.
    pub listed: Vec<Vec<u8>>,
}

/// A step that could not vouch for its deletes, and the node it failed on: the worker gives the
/// claimed changes back to the outbox and connects to Redis again.
#[derive(Debug, thiserror::Error)]
#[error("redis at {node}: {failure}")]
pub struct StepError {
    pub node: String,
    pub failure: Failure,
}

/// What failed on a node.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The driver's error: a connection lost, a timeout, an error reply.
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    /// A pipeline's replies came back without the one to this command.
    #[error("no reply to {0}")]
    MissingReply(&'static str),
    /// The node no longer serves the slots it was swept or seeded for (a failover, a slot
    /// migration): keys may have moved past a cursor, or out of the index's part.
    #[error("cluster topology changed {when}: {detail}")]
    TopologyChanged { when: &'static str, detail: String },
    /// The replicas to wait for could not be counted.
    #[error("replica confirmation: {0}")]
    Replicas(ReplicaError),
    /// A barrier on the tracking connections could not vouch for the index's part (it is not
    /// tracked or not seeded, or the tracked database was replaced).
    #[error("{0}")]
    Barrier(&'static str),
}

impl StepError {
    pub fn new(node: impl Into<String>, failure: impl Into<Failure>) -> StepError {
        StepError {
            node: node.into(),
            failure: failure.into(),
        }
    }
}

/// A reply of an unexpected type: the driver's error, as where the driver parses it itself.
impl From<redis::ParsingError> for Failure {
    fn from(error: redis::ParsingError) -> Failure {
        Failure::Redis(error.into())
    }
}

impl From<ReplicaError> for Failure {
    fn from(error: ReplicaError) -> Failure {
        match error {
            ReplicaError::Redis(source) => Failure::Redis(source),
            other => Failure::Replicas(other),
        }
    }
}

/// The `CLUSTER NODES` reply that went first in a pipeline of deletes (`verify`: one was sent),
/// taken off `replies` so the rest line up with the other commands.
pub(crate) fn take_cluster_nodes(
    verify: bool,
    replies: &mut Vec<redis::Value>,
) -> Result<Option<String>, Failure> {
    match verify {
        true if replies.is_empty() => Err(Failure::MissingReply("CLUSTER NODES")),
        true => Ok(Some(redis::from_redis_value(replies.remove(0))?)),
        false => Ok(None),
    }
}
