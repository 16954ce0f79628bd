//! Finding a change's keys: the one seam between the worker and Redis, in either mode.
//!
//! The worker hands a window of patterns to [`Finder::add_window`], steps the finder while it is
//! busy, and acknowledges the window's outbox rows once a step reports it finished: its keys are
//! confirmed gone. Behind that interface a window is answered one of two ways:
//!
//! - **from the index** (index mode, once every node's part is seeded): after a barrier on the
//!   tracking connections, the window's keys are looked up in memory and removed with pipelined
//!   `UNLINK`s, one request per node (which in a cluster also re-checks the node's slots, as the
//!   sweep does), then, where the node has replicas, a `WAIT` for them ([`crate::replicas`]):
//!   milliseconds, whatever the size of the keyspace. Their deletion is announced like any write,
//!   and each key leaves the index once the tracker's check finds it gone;
//! - **by the sweep** ([`Sweeper`]): in sweep mode, while the index is incomplete (start, a lost
//!   tracking connection), for a pattern outside the tracked prefixes, or when a barrier fails.
//!
//! The refill guard lives here too, because it differs by mode: with the index, keys announced
//! under a cleared pattern within the guard are deleted as they are announced; with the sweep,
//! the patterns join a later pass once the guard has run out.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use redis::cluster_routing::Slot;
use tracing::{debug, info, warn};

use crate::index;
use crate::redis_nodes::Node;
use crate::replicas::{confirm_replicas, Confirmation, ReplicaError};
use crate::sweep::{self, FinishedWindow, PatternSpec, StepReport, SweepError, Sweeper};
use crate::index::tracking::Tracking;

pub type WindowId = u64;

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

/// Keys that count under one label (and, in a cluster, share a hash slot).
struct KeyGroup {
    label: Arc<str>,
    keys: Vec<Box<[u8]>>,
}

enum IndexReply {
    Barrier {
        windows: Vec<WindowId>,
        result: Result<(), String>,
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
        result: Result<(Vec<u64>, Option<String>), redis::RedisError>,
    },
}

/// The worker's way to Redis: the sweep, and the index when there is one.
pub struct Finder {
    sweeper: Sweeper,
    nodes: Vec<Node>,
    tracking: Option<Tracking>,
    next_id: WindowId,
    /// Sweeper's window ids of the windows it answers, to the finder's ids and their patterns
    /// (for the refill guard once they finish).
    swept: HashMap<sweep::WindowId, (WindowId, Vec<PatternSpec>)>,
    indexed: HashMap<WindowId, IndexWindow>,
    awaiting_barrier: Vec<WindowId>,
    barrier_in_flight: bool,
    in_flight: FuturesUnordered<BoxFuture<'static, IndexReply>>,
    refill_guard: Duration,
    /// Sweep-mode refill guard: patterns to sweep again, each once its time has come.
    guard_passes: VecDeque<(Instant, Vec<PatternSpec>)>,
    /// The memory bound was passed: said once, then sweep.
    index_dropped: bool,
    /// Per node: windows whose deletes the node confirmed, waiting for its replicas.
    awaiting_replicas: Vec<Vec<WindowId>>,
    /// Per node: a `WAIT` is in flight (it blocks the connection: one at a time).
    replica_wait_in_flight: Vec<bool>,
    /// Per node: the last `WAIT` timed out (warned once until the replicas catch up).
    replicas_behind: Vec<bool>,
}

impl Finder {
    /// A finder over `nodes`; `tracking` is the index (attached to these nodes) in index mode.
    pub fn new(nodes: Vec<Node>, tracking: Option<Tracking>, refill_guard: Duration) -> Finder {
        let node_count = nodes.len();
        Finder {
            sweeper: Sweeper::new(nodes.clone()),
            nodes,
            tracking,
            next_id: 1,
            swept: HashMap::new(),
            indexed: HashMap::new(),
            awaiting_barrier: Vec::new(),
            barrier_in_flight: false,
            in_flight: FuturesUnordered::new(),
            refill_guard,
            guard_passes: VecDeque::new(),
            index_dropped: false,
            awaiting_replicas: vec![Vec::new(); node_count],
            replica_wait_in_flight: vec![false; node_count],
            replicas_behind: vec![false; node_count],
        }
    }

    /// Gives the index back (to attach it to the nodes of the next connection).
    pub fn into_tracking(self) -> Option<Tracking> {
        self.tracking
    }

    /// The index answers lookups now (every node's part seeded and tracked).
    pub fn index_complete(&self) -> bool {
        self.tracking.as_ref().is_some_and(Tracking::is_complete)
    }

    /// Whether the worker is in index mode (the index may still be seeding).
    pub fn has_index(&self) -> bool {
        self.tracking.is_some()
    }

    /// Patterns of windows in progress, for the worker's cap on claims.
    pub fn first_pass_patterns(&self) -> usize {
        self.sweeper.first_pass_patterns()
            + self
                .indexed
                .values()
                .map(|window| window.patterns.len())
                .sum::<usize>()
    }

    pub fn is_busy(&self) -> bool {
        self.sweeper.is_busy() || !self.indexed.is_empty() || !self.in_flight.is_empty()
    }

    /// Adds a window of patterns to clear; `None` when it has none.
    pub fn add_window(&mut self, patterns: Vec<PatternSpec>) -> Option<WindowId> {
        if patterns.is_empty() {
            return None;
        }
        self.check_memory_bound();
        let id = self.next_id;
        self.next_id += 1;
        let answered_by_index = self.index_complete()
            && self.tracking.as_ref().is_some_and(|tracking| {
                patterns
                    .iter()
                    .all(|spec| index::covered(tracking.prefixes(), &spec.pattern))
            });
        if answered_by_index {
            self.indexed.insert(
                id,
                IndexWindow {
                    keys_per_pattern: vec![0; patterns.len()],
                    patterns,
                    nodes_pending: 0,
                },
            );
            self.awaiting_barrier.push(id);
        } else {
            let swept = self.sweeper.add_window(&patterns, false)?;
            debug!(window = id, index = self.has_index(), "window swept");
            self.swept.insert(swept, (id, patterns));
            // Guards already due join at the same point of the pass as this window: the pass it
            // needs anyway serves them too.
            self.start_guards_due_by(Instant::now());
        }
        Some(id)
    }

    /// The sweep-mode refill guard of a window the sweep finished: its patterns are swept again
    /// once the guard has run out. A due guard waits a little for a window the sweep takes anyway
    /// and joins the pass at the same point ([`Finder::add_window`]), so under steady changes it
    /// adds no pass; without one it starts alone after [`Finder::guard_ride_wait`].
    fn guard_by_sweeping(&mut self, patterns: Vec<PatternSpec>) {
        if !self.refill_guard.is_zero() {
            self.guard_passes
                .push_back((Instant::now() + self.refill_guard, patterns));
        }
    }

    /// How long a due guard waits for a window to ride along with. A late guard only deletes
    /// fills made in the wait (a cache miss each), so a quarter of the guard, at most 250 ms,
    /// keeps both that and the stale window short.
    fn guard_ride_wait(&self) -> Duration {
        (self.refill_guard / 4).min(Duration::from_millis(250))
    }

    /// When the next sweep-mode guard pass must start even without a window to ride along.
    pub fn next_guard_due(&self) -> Option<Instant> {
        let wait = self.guard_ride_wait();
        self.guard_passes.front().map(|(due, _)| *due + wait)
    }

    /// Starts the sweep-mode guard passes once the first has waited its longest for a window to
    /// ride along with: it and every other guard due by now, as one window.
    pub fn start_due_guards(&mut self) {
        let now = Instant::now();
        let waited_enough = self
            .guard_passes
            .front()
            .is_some_and(|(due, _)| *due + self.guard_ride_wait() <= now);
        if waited_enough {
            self.start_guards_due_by(now);
        }
    }

    /// Starts every guard pass due by `by`, as one window joining the pass in progress.
    fn start_guards_due_by(&mut self, by: Instant) {
        let mut patterns = Vec::new();
        while self.guard_passes.front().is_some_and(|(due, _)| *due <= by) {
            if let Some((_, due_patterns)) = self.guard_passes.pop_front() {
                patterns.extend(due_patterns);
            }
        }
        if !patterns.is_empty() {
            self.sweeper.add_window(&patterns, true);
        }
    }

    /// Drops the guard passes not yet started (a stop: the batch in flight only).
    pub fn clear_guards(&mut self) {
        self.guard_passes.clear();
    }

    /// Waits for the next reply of the sweep or the index and books it. Cancel-safe: its only
    /// waits are for replies to requests already sent.
    pub async fn step(&mut self) -> Result<StepReport, SweepError> {
        self.send_barrier();
        let sweeping = self.sweeper.is_busy();
        let mut report = tokio::select! {
            stepped = self.sweeper.step(), if sweeping => self.book_sweep(stepped?),
            Some(reply) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                let mut report = StepReport::default();
                self.book_index(reply, &mut report)?;
                report
            }
            else => {
                tokio::task::yield_now().await;
                StepReport::default()
            }
        };
        while let Some(Some(reply)) = self.in_flight.next().now_or_never() {
            self.book_index(reply, &mut report)?;
        }
        self.send_barrier();
        Ok(report)
    }

    /// Maps the sweeper's finished windows to the finder's ids; its guard passes stay inside.
    fn book_sweep(&mut self, mut report: StepReport) -> StepReport {
        let finished = std::mem::take(&mut report.finished);
        for window in finished {
            if let Some((id, patterns)) = self.swept.remove(&window.id) {
                report.finished.push(FinishedWindow {
                    id,
                    keys_per_pattern: window.keys_per_pattern,
                });
                self.guard_by_sweeping(patterns);
            } else {
                let keys: u64 = window.keys_per_pattern.iter().sum();
                if keys > 0 {
                    info!(
                        patterns = window.keys_per_pattern.len(),
                        keys, "refill guard removed keys written back after their invalidation"
                    );
                }
            }
        }
        report
    }

    /// One barrier serves every window waiting when it is sent.
    fn send_barrier(&mut self) {
        if self.barrier_in_flight || self.awaiting_barrier.is_empty() {
            return;
        }
        let windows = std::mem::take(&mut self.awaiting_barrier);
        let Some(tracking) = self.tracking.as_ref() else {
            // The index was dropped (its memory bound) after these windows were given to it:
            // nothing would ever look them up.
            for id in windows {
                self.hand_to_sweep(id);
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

    fn book_index(&mut self, reply: IndexReply, report: &mut StepReport) -> Result<(), SweepError> {
        match reply {
            IndexReply::Barrier { windows, result } => {
                self.barrier_in_flight = false;
                for id in windows {
                    self.look_up(id, result.as_ref().err(), report);
                }
            }
            IndexReply::Unlinked {
                window,
                node,
                labels,
                result,
            } => {
                let name = || self.nodes[node].name.clone();
                let (counts, cluster_nodes) = result.map_err(|source| SweepError {
                    node: name(),
                    source,
                })?;
                if let Some(text) = cluster_nodes {
                    self.nodes[node]
                        .verify_shard(&text)
                        .map_err(|detail| SweepError {
                            node: name(),
                            source: redis::RedisError::from((
                                redis::ErrorKind::Client,
                                "cluster topology changed since the index was seeded",
                                detail,
                            )),
                        })?;
                }
                for (label, count) in labels.iter().zip(counts) {
                    *report.deleted.entry(label.clone()).or_default() += count;
                }
                if !labels.is_empty() && self.waits_for_replicas(node) {
                    self.awaiting_replicas[node].push(window);
                    self.send_replica_waits();
                } else {
                    self.node_done(window, report);
                }
            }
            IndexReply::Replicated {
                node,
                windows,
                result,
            } => {
                self.replica_wait_in_flight[node] = false;
                let confirmation = result.map_err(|error| SweepError {
                    node: self.nodes[node].name.clone(),
                    source: match error {
                        ReplicaError::Redis(source) => source,
                        other => redis::RedisError::from((
                            redis::ErrorKind::Client,
                            "replica confirmation",
                            other.to_string(),
                        )),
                    },
                })?;
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
            }
        }
        Ok(())
    }

    /// One node finished its part of a window (deleted, and replicated where asked).
    fn node_done(&mut self, window: WindowId, report: &mut StepReport) {
        if let Some(state) = self.indexed.get_mut(&window) {
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
    /// cannot vouch for (the barrier failed, a part lost its tracking) goes to the sweep.
    fn look_up(&mut self, id: WindowId, barrier_error: Option<&String>, report: &mut StepReport) {
        let Some(window) = self.indexed.get(&id) else {
            return;
        };
        let found = match (barrier_error, self.tracking.as_ref()) {
            (None, Some(tracking)) => index::lookup(&tracking.parts(), &window.patterns),
            _ => None,
        };
        let Some(found) = found else {
            if let Some(error) = barrier_error {
                warn!(%error, "index barrier failed: sweeping for this window");
            }
            self.hand_to_sweep(id);
            return;
        };
        // Guarded from the lookup on, before the deletes are sent: a stale refill written right
        // after a delete is announced, and must find its pattern guarded by then.
        if let Some(tracking) = self.tracking.as_ref() {
            if !self.refill_guard.is_zero() {
                tracking.guard(&window.patterns, Instant::now() + self.refill_guard);
            }
        }
        let clustered = self.nodes.first().is_some_and(|node| node.clustered);
        let mut requests = Vec::new();
        let Some(window) = self.indexed.get_mut(&id) else {
            return;
        };
        for (node, keys) in found.into_iter().enumerate() {
            for (_, pattern) in &keys {
                window.keys_per_pattern[*pattern] += 1;
            }
            let verify = self.nodes.get(node).is_some_and(|n| n.shard.is_some());
            if keys.is_empty() && !verify {
                continue;
            }
            let mut groups: HashMap<(Arc<str>, Option<Slot>), KeyGroup> = HashMap::new();
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
        window.nodes_pending = requests.len();
        debug!(
            window = id,
            keys = window.keys_per_pattern.iter().sum::<u64>(),
            "window answered from the index"
        );
        if requests.is_empty() {
            self.finish(id, report);
            return;
        }
        for request in requests {
            let connection = self.nodes[request.node].connection.clone();
            self.in_flight.push(unlink(id, request, connection).boxed());
        }
    }

    fn hand_to_sweep(&mut self, id: WindowId) {
        if let Some(window) = self.indexed.remove(&id) {
            if let Some(swept) = self.sweeper.add_window(&window.patterns, false) {
                self.swept.insert(swept, (id, window.patterns));
            }
        }
    }

    fn finish(&mut self, id: WindowId, report: &mut StepReport) {
        if let Some(window) = self.indexed.remove(&id) {
            report.finished.push(FinishedWindow {
                id,
                keys_per_pattern: window.keys_per_pattern,
            });
        }
    }

    /// Past the memory bound the index is dropped for good, with one warning: sweeping needs no
    /// memory per key, running out of memory would stop invalidation altogether.
    pub fn check_memory_bound(&mut self) {
        if self.index_dropped {
            return;
        }
        let Some(tracking) = self.tracking.as_mut() else {
            return;
        };
        if tracking.over_limit() {
            warn!(
                keys = tracking.keys(),
                "index: more keys than --index-max-keys; the index is dropped and changes are swept from now on"
            );
            tracking.drop_index();
            self.tracking = None;
            self.index_dropped = true;
        }
    }

    /// The memory bound was passed since the finder was made.
    pub fn index_dropped(&self) -> bool {
        self.index_dropped
    }
}

/// Sends one node's deletes for a window (and its `CLUSTER NODES`, to re-check its slots).
async fn unlink(
    window: WindowId,
    request: NodeRequest,
    mut connection: redis::aio::MultiplexedConnection,
) -> IndexReply {
    let mut pipe = redis::pipe();
    if request.verify {
        pipe.cmd("CLUSTER").arg("NODES");
    }
    let mut labels = Vec::new();
    for KeyGroup { label, keys } in &request.groups {
        for chunk in keys.chunks(sweep::UNLINK_CHUNK) {
            let mut command = redis::cmd("UNLINK");
            for key in chunk {
                command.arg(&**key);
            }
            pipe.add_command(command);
            labels.push(label.clone());
        }
    }
    let result = async {
        let mut replies: Vec<redis::Value> = pipe.query_async(&mut connection).await?;
        let cluster_nodes = sweep::take_cluster_nodes(request.verify, &mut replies)?;
        let counts = replies
            .into_iter()
            .map(redis::from_redis_value::<u64>)
            .collect::<Result<Vec<u64>, _>>()?;
        Ok((counts, cluster_nodes))
    }
    .await;
    IndexReply::Unlinked {
        window,
        node: request.node,
        labels,
        result,
    }
}
