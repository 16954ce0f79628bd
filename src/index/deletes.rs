//! Index mode's delete path: a window's keys looked up in the index and removed, without a sweep.
//!
//! A window the finder gives to the index ([`IndexDeletes::add_window`]) waits for a barrier on
//! the tracking connections ([`Tracking::barrier`]): one barrier serves every window waiting when
//! it is sent. Once it is back, every key written before the window's changes committed is in the
//! index, and the window's keys are looked up in memory ([`super::lookup`]) and removed with
//! pipelined `UNLINK`s, one request per node (which in a cluster also re-checks the node's slots,
//! as the sweep does), then, where the node has replicas, a `WAIT` for them
//! ([`crate::replicas`]): milliseconds, whatever the size of the keyspace. Where the node has no
//! replica to wait for, the deletes go on its tracking connection, which does not announce its own
//! writes (`NOLOOP`): their reply removes the keys from the index (unless written since by
//! another client). Elsewhere their deletion is announced like any write, and each key leaves the
//! index once the tracker's check finds it gone.
//!
//! A window the index cannot vouch for (the barrier failed, a part lost its tracking, the index
//! was dropped) is handed back ([`IndexDeletes::take_unanswered`]): the finder sweeps it.
//!
//! The refill guard in index mode: keys announced under a cleared pattern within the guard are
//! deleted as they are announced (guarded from the lookup on, before the deletes are sent).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use redis::cluster_routing::Slot;
use rustc_hash::FxHashMap;
use tracing::{debug, warn};

use super::tracking::{DeleteChecks, Tracking};
use crate::redis_nodes::Node;
use crate::replicas::{
    confirm_replicas, connected_replicas, Confirmation, ReplicaError, ReplicaPolicy,
};
use crate::window::{
    take_cluster_nodes, Failure, FinishedWindow, PatternSpec, StepError, StepReport, WindowId,
    UNLINK_CHUNK,
};

/// A window answered from the index, waiting for its barrier or its deletes.
struct IndexWindow {
    patterns: Vec<PatternSpec>,
    keys_per_pattern: Vec<u64>,
    /// Node requests not yet answered (set once the lookup ran).
    nodes_pending: usize,
}

/// Keys of one node to remove for a window, grouped so each `UNLINK` counts under one label and,
/// in a cluster, stays within one hash slot.
struct NodeRequest {
    node: usize,
    groups: Vec<KeyGroup>,
    verify: bool,
}

impl NodeRequest {
    fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.groups
            .iter()
            .flat_map(|group| group.keys.iter().map(|key| &**key))
    }
}

/// Deletes sent on a node's tracking connection.
struct Tracked {
    checks: DeleteChecks,
    /// Count the node's replicas with the deletes (`INFO replication`), with the node's policy:
    /// none was connected when the worker connected, and one that attached since must confirm
    /// the deletes.
    count_replicas: Option<ReplicaPolicy>,
}

/// The checks of a request's keys, booked when its reply is read ([`DeleteChecks::deleted`]), or
/// as unanswered when it fails or is dropped unanswered (a step that failed elsewhere, a finder
/// dropped with its requests): a key is never left waiting for a reply that will not come.
struct ChecksOf<'r> {
    checks: Option<DeleteChecks>,
    request: &'r NodeRequest,
}

impl ChecksOf<'_> {
    fn deleted(&mut self) {
        if let Some(checks) = self.checks.take() {
            checks.deleted(self.request.keys());
        }
    }
}

impl Drop for ChecksOf<'_> {
    fn drop(&mut self) {
        if let Some(checks) = self.checks.take() {
            checks.unanswered(self.request.keys());
        }
    }
}

/// Keys that count under one label (and, in a cluster, share a hash slot).
struct KeyGroup {
    label: Arc<str>,
    keys: Vec<Box<[u8]>>,
}

/// What came back from Redis for the index's requests.
pub(crate) enum IndexReply {
    Barrier {
        windows: Vec<WindowId>,
        result: Result<(), StepError>,
    },
    /// The node's replicas were asked (`WAIT`) for every delete sent before: `windows` waited.
    Replicated {
        node: usize,
        windows: Vec<WindowId>,
        result: Result<Confirmation, ReplicaError>,
    },
    Unlinked {
        window: WindowId,
        node: usize,
        labels: Vec<Arc<str>>,
        result: Result<(Vec<u64>, Option<String>), Failure>,
        /// Sent on the tracking connection: no replica to wait for.
        on_tracking: bool,
        /// Replicas found connected with the deletes, where none was when the worker connected.
        replicas_attached: Option<u32>,
    },
}

/// The windows answered from the index on one connection to Redis, and their requests in flight.
pub(crate) struct IndexDeletes {
    nodes: Vec<Node>,
    windows: HashMap<WindowId, IndexWindow>,
    awaiting_barrier: Vec<WindowId>,
    barrier_in_flight: bool,
    in_flight: FuturesUnordered<BoxFuture<'static, IndexReply>>,
    refill_guard: Duration,
    /// Windows the index cannot vouch for, with their patterns: the finder sweeps them.
    unanswered: Vec<(WindowId, Vec<PatternSpec>)>,
    /// Per node: windows whose deletes the node confirmed, waiting for its replicas.
    awaiting_replicas: Vec<Vec<WindowId>>,
    /// Per node: a `WAIT` is in flight (it blocks the connection: one at a time).
    replica_wait_in_flight: Vec<bool>,
    /// Per node: the last `WAIT` timed out (warned once until the replicas catch up).
    replicas_behind: Vec<bool>,
}

impl IndexDeletes {
    /// Deletes over `nodes`, the primaries `tracking` is attached to (in the same order).
    pub fn new(nodes: Vec<Node>, refill_guard: Duration) -> IndexDeletes {
        let node_count = nodes.len();
        IndexDeletes {
            nodes,
            windows: HashMap::new(),
            awaiting_barrier: Vec::new(),
            barrier_in_flight: false,
            in_flight: FuturesUnordered::new(),
            refill_guard,
            unanswered: Vec::new(),
            awaiting_replicas: vec![Vec::new(); node_count],
            replica_wait_in_flight: vec![false; node_count],
            replicas_behind: vec![false; node_count],
        }
    }

    /// The index can answer a window of `patterns`: every node's part is seeded and tracked, and
    /// each pattern lies under a tracked prefix.
    pub fn can_answer(tracking: &Tracking, patterns: &[PatternSpec]) -> bool {
        tracking.is_complete()
            && patterns
                .iter()
                .all(|spec| super::covered(tracking.prefixes(), &spec.pattern))
    }

    /// Patterns of the windows in progress, for the worker's cap on claims.
    pub fn patterns(&self) -> usize {
        self.windows
            .values()
            .map(|window| window.patterns.len())
            .sum()
    }

    pub fn is_busy(&self) -> bool {
        !self.windows.is_empty() || !self.in_flight.is_empty() || !self.unanswered.is_empty()
    }

    /// Replies are on their way.
    pub fn awaits_replies(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// Adds a window (the finder's `id`), answered once the next barrier is back.
    pub fn add_window(&mut self, id: WindowId, patterns: Vec<PatternSpec>) {
        self.windows.insert(
            id,
            IndexWindow {
                keys_per_pattern: vec![0; patterns.len()],
                patterns,
                nodes_pending: 0,
            },
        );
        self.awaiting_barrier.push(id);
    }

    /// The windows the index could not vouch for since the last call, to sweep.
    pub fn take_unanswered(&mut self) -> Vec<(WindowId, Vec<PatternSpec>)> {
        std::mem::take(&mut self.unanswered)
    }

    /// The next reply of a request in flight; cancel-safe (the request stays in flight).
    pub async fn next_reply(&mut self) -> Option<IndexReply> {
        self.in_flight.next().await
    }

    /// Books the replies already back, without waiting.
    pub fn book_ready(
        &mut self,
        tracking: Option<&Tracking>,
        report: &mut StepReport,
    ) -> Result<(), StepError> {
        while let Some(Some(reply)) = self.in_flight.next().now_or_never() {
            self.book(reply, tracking, report)?;
        }
        Ok(())
    }

    /// Sends a barrier for the windows waiting, unless one is in flight; one barrier serves every
    /// window waiting when it is sent.
    pub fn send_barrier(&mut self, tracking: Option<&Tracking>) {
        if self.barrier_in_flight || self.awaiting_barrier.is_empty() {
            return;
        }
        let windows = std::mem::take(&mut self.awaiting_barrier);
        let Some(tracking) = tracking else {
            // The index was dropped (its memory bound) after these windows were given to it:
            // nothing would ever look them up.
            for id in windows {
                self.hand_back(id);
            }
            return;
        };
        let barrier = tracking.barrier();
        self.barrier_in_flight = true;
        self.in_flight.push(
            async move {
                IndexReply::Barrier {
                    windows,
                    result: barrier.await,
                }
            }
            .boxed(),
        );
    }

    /// Books one reply: a barrier's windows are looked up, a node's deletes counted (and its
    /// replicas asked), a `WAIT`'s windows finished. An error fails the step.
    pub fn book(
        &mut self,
        reply: IndexReply,
        tracking: Option<&Tracking>,
        report: &mut StepReport,
    ) -> Result<(), StepError> {
        match reply {
            IndexReply::Barrier { windows, result } => {
                self.barrier_in_flight = false;
                for id in windows {
                    self.look_up(id, result.as_ref().err(), tracking, report);
                }
                Ok(())
            }
            IndexReply::Unlinked {
                window,
                node,
                labels,
                result,
                on_tracking,
                replicas_attached,
            } => {
                if let Some(replicas) = replicas_attached {
                    // The node's next deletes go on its own connection, with a `WAIT`.
                    self.nodes[node].replicas = Some(replicas);
                }
                let waits = !on_tracking && self.waits_for_replicas(node);
                self.book_unlinked(window, node, &labels, result, waits, report)
            }
            IndexReply::Replicated {
                node,
                windows,
                result,
            } => self.book_replicated(node, windows, result, report),
        }
    }

    /// A node's deletes for a window came back: counted, then the window waits for the node's
    /// replicas where it has any.
    fn book_unlinked(
        &mut self,
        window: WindowId,
        node: usize,
        labels: &[Arc<str>],
        result: Result<(Vec<u64>, Option<String>), Failure>,
        waits_for_replicas: bool,
        report: &mut StepReport,
    ) -> Result<(), StepError> {
        let name = &self.nodes[node].name;
        let (counts, cluster_nodes) = result.map_err(|failure| StepError::new(name, failure))?;
        if let Some(text) = cluster_nodes {
            self.nodes[node].verify_shard(&text).map_err(|detail| {
                let when = "since the index was seeded";
                StepError::new(name, Failure::TopologyChanged { when, detail })
            })?;
        }
        for (label, count) in labels.iter().zip(counts) {
            *report.deleted.entry(label.clone()).or_default() += count;
        }
        if !labels.is_empty() && waits_for_replicas {
            self.awaiting_replicas[node].push(window);
            self.send_replica_waits();
        } else {
            self.node_done(window, report);
        }
        Ok(())
    }

    /// A node's `WAIT` came back: its windows are done if enough replicas have the deletes, and
    /// asked again otherwise.
    fn book_replicated(
        &mut self,
        node: usize,
        windows: Vec<WindowId>,
        result: Result<Confirmation, ReplicaError>,
        report: &mut StepReport,
    ) -> Result<(), StepError> {
        self.replica_wait_in_flight[node] = false;
        let confirmation = result.map_err(|error| StepError::new(&self.nodes[node].name, error))?;
        if confirmation.confirmed() {
            self.replicas_behind[node] = false;
            for window in windows {
                self.node_done(window, report);
            }
        } else {
            if !self.replicas_behind[node] {
                warn!(node = %self.nodes[node].name, acked = confirmation.acked, required = confirmation.required, "replicas do not have the deletes yet: the changes stay in the outbox until they do");
                self.replicas_behind[node] = true;
            }
            // Kept, and asked again: a later WAIT covers every earlier delete.
            self.awaiting_replicas[node].extend(windows);
        }
        self.send_replica_waits();
        Ok(())
    }

    /// One node finished its part of a window (deleted, and replicated where asked).
    fn node_done(&mut self, window: WindowId, report: &mut StepReport) {
        if let Some(state) = self.windows.get_mut(&window) {
            state.nodes_pending = state.nodes_pending.saturating_sub(1);
            if state.nodes_pending == 0 {
                self.finish(window, report);
            }
        }
    }

    /// Whether the node's deletes must reach replicas before a window counts as done: an
    /// explicit `--replica-acks`, or replicas connected when the worker connected (a server
    /// that refused `INFO` then has none to count).
    fn waits_for_replicas(&self, node: usize) -> bool {
        let node = &self.nodes[node];
        match node.replica_policy.acks {
            Some(acks) => acks > 0,
            None => node.replicas.is_some(),
        }
    }

    /// Sends a `WAIT` (with its count of replicas) for each node with windows waiting and none in
    /// flight; it covers every delete sent on the node's connection before it.
    fn send_replica_waits(&mut self) {
        for node in 0..self.nodes.len() {
            if self.replica_wait_in_flight[node] || self.awaiting_replicas[node].is_empty() {
                continue;
            }
            let windows = std::mem::take(&mut self.awaiting_replicas[node]);
            let mut connection = self.nodes[node].connection.clone();
            let policy = self.nodes[node].replica_policy;
            self.replica_wait_in_flight[node] = true;
            self.in_flight.push(
                async move {
                    let result = confirm_replicas(&mut connection, policy).await;
                    IndexReply::Replicated {
                        node,
                        windows,
                        result,
                    }
                }
                .boxed(),
            );
        }
    }

    /// Looks a window's keys up after its barrier and sends their deletes; a window the index
    /// cannot vouch for (the barrier failed, a part lost its tracking) is handed back to sweep.
    fn look_up(
        &mut self,
        id: WindowId,
        barrier_error: Option<&StepError>,
        tracking: Option<&Tracking>,
        report: &mut StepReport,
    ) {
        let Some(window) = self.windows.get(&id) else {
            return;
        };
        let found = match (barrier_error, tracking) {
            (None, Some(tracking)) => super::lookup(&tracking.parts(), &window.patterns),
            _ => None,
        };
        let (Some(found), Some(tracking)) = (found, tracking) else {
            if let Some(error) = barrier_error {
                warn!(%error, "index barrier failed: sweeping for this window");
            }
            self.hand_back(id);
            return;
        };
        // Guarded from the lookup on, before the deletes are sent: a stale refill written right
        // after a delete is announced, and must find its pattern guarded by then.
        if !self.refill_guard.is_zero() {
            tracking.guard(&window.patterns, Instant::now() + self.refill_guard);
        }
        let requests = self.node_requests(id, found);
        if let Some(window) = self.windows.get_mut(&id) {
            window.nodes_pending = requests.len();
            debug!(
                window = id,
                keys = window.keys_per_pattern.iter().sum::<u64>(),
                "window answered from the index"
            );
        }
        if requests.is_empty() {
            self.finish(id, report);
            return;
        }
        for request in requests {
            // On the tracking connection, which does not announce them back: each reply checks
            // its keys. Except where the node's replicas must confirm the deletes: a `WAIT` blocks
            // the connection it is sent on, and counts the writes sent on that one; there the
            // deletes go on the node's connection, and are announced and checked as any write.
            let node = &self.nodes[request.node];
            let tracked = match node.replica_policy.required(node.replicas) {
                0 => tracking.deleting(request.node, request.keys()),
                _ => None,
            };
            let (connection, tracked) = match tracked {
                Some((connection, checks)) => {
                    let tracked = Tracked {
                        checks,
                        // No replica was connected: count them with the deletes, to notice one
                        // that attached since.
                        count_replicas: (node.replica_policy.counts_connected()
                            && node.replicas.is_some())
                        .then_some(node.replica_policy),
                    };
                    (connection, Some(tracked))
                }
                None => (node.connection.clone(), None),
            };
            self.in_flight
                .push(unlink(id, request, connection, tracked).boxed());
        }
    }

    /// The deletes of the keys a lookup found for window `id`, one request per node that has
    /// keys to delete or slots to re-check; counts the window's keys per pattern.
    fn node_requests(&mut self, id: WindowId, found: super::Found) -> Vec<NodeRequest> {
        let clustered = self.nodes.first().is_some_and(|node| node.clustered);
        let mut requests = Vec::new();
        let Some(window) = self.windows.get_mut(&id) else {
            return requests;
        };
        for (node, keys) in found.into_iter().enumerate() {
            for (_, pattern) in &keys {
                window.keys_per_pattern[*pattern] += 1;
            }
            let verify = self.nodes.get(node).is_some_and(|n| n.shard.is_some());
            if keys.is_empty() && !verify {
                continue;
            }
            // Hashed once per key: Fx rather than SipHash, whose cost per key showed in a drain.
            let mut groups: FxHashMap<(Arc<str>, Option<Slot>), KeyGroup> = FxHashMap::default();
            for (key, pattern) in keys {
                let slot = clustered.then(|| Slot::for_key(&key));
                let label = window.patterns[pattern].label.clone();
                groups
                    .entry((label.clone(), slot))
                    .or_insert_with(|| KeyGroup {
                        label,
                        keys: Vec::new(),
                    })
                    .keys
                    .push(key);
            }
            requests.push(NodeRequest {
                node,
                groups: groups.into_values().collect(),
                verify,
            });
        }
        requests
    }

    /// Gives a window back to the finder, to be swept.
    fn hand_back(&mut self, id: WindowId) {
        if let Some(window) = self.windows.remove(&id) {
            self.unanswered.push((id, window.patterns));
        }
    }

    fn finish(&mut self, id: WindowId, report: &mut StepReport) {
        if let Some(window) = self.windows.remove(&id) {
            report.finished.push(FinishedWindow {
                id,
                keys_per_pattern: window.keys_per_pattern,
            });
        }
    }
}

/// Sends one node's deletes for a window (and its `CLUSTER NODES`, to re-check its slots);
/// `tracked`: on the node's tracking connection, where the reply checks the keys.
async fn unlink(
    window: WindowId,
    request: NodeRequest,
    mut connection: redis::aio::MultiplexedConnection,
    tracked: Option<Tracked>,
) -> IndexReply {
    let count_replicas = tracked.as_ref().and_then(|t| t.count_replicas);
    let on_tracking = tracked.is_some();
    let mut replicas_attached = None;
    let mut checks = ChecksOf {
        checks: tracked.map(|tracked| tracked.checks),
        request: &request,
    };
    let mut pipe = redis::pipe();
    if request.verify {
        pipe.cmd("CLUSTER").arg("NODES");
    }
    let mut labels = Vec::new();
    for KeyGroup { label, keys } in &request.groups {
        for chunk in keys.chunks(UNLINK_CHUNK) {
            let mut command = redis::cmd("UNLINK");
            for key in chunk {
                command.arg(&**key);
            }
            pipe.add_command(command);
            labels.push(label.clone());
        }
    }
    if count_replicas.is_some() {
        pipe.cmd("INFO").arg("replication");
    }
    let result = async {
        let mut replies: Vec<redis::Value> = pipe.query_async(&mut connection).await?;
        checks.deleted();
        if let Some(policy) = count_replicas {
            let info: String = match replies.pop() {
                Some(reply) => redis::from_redis_value(reply)?,
                None => return Err(Failure::MissingReply("INFO replication")),
            };
            let connected =
                connected_replicas(&info).ok_or(Failure::Replicas(ReplicaError::NoReplicaCount))?;
            if connected > 0 {
                // A replica attached since the worker connected. `WAIT` counts the writes of the
                // connection it runs on: these deletes are confirmed here, on this one, however
                // long the replica takes (the change stays in the outbox meanwhile).
                replicas_attached = Some(connected);
                confirm_on_this_connection(&mut connection, policy).await?;
            }
        }
        let cluster_nodes = take_cluster_nodes(request.verify, &mut replies)?;
        let counts = replies
            .into_iter()
            .map(redis::from_redis_value::<u64>)
            .collect::<Result<Vec<u64>, _>>()?;
        Ok::<_, Failure>((counts, cluster_nodes))
    }
    .await;
    IndexReply::Unlinked {
        window,
        node: request.node,
        labels,
        result,
        on_tracking,
        replicas_attached,
    }
}

/// Waits until the node's replicas have every write of `connection`, asking again at each
/// timeout (warned once).
async fn confirm_on_this_connection(
    connection: &mut redis::aio::MultiplexedConnection,
    policy: ReplicaPolicy,
) -> Result<(), Failure> {
    let mut warned = false;
    loop {
        let confirmation = confirm_replicas(connection, policy).await?;
        if confirmation.confirmed() {
            return Ok(());
        }
        if !warned {
            warn!(acked = confirmation.acked, required = confirmation.required, "a replica attached since the worker connected and does not have the deletes yet: the changes stay in the outbox until it does");
            warned = true;
        }
    }
}
