//! Sweep mode, and the index's fallback: one rolling `SCAN` pass per node serves every window of
//! patterns at once, and matching keys are removed with pipelined `UNLINK`.
//!
//! A window joins the pass wherever the cursor stands and is done once the cursor has gone all the
//! way round to that point again, so a change that arrives mid-pass costs no pass of its own: the
//! cost of N pending changes is about one pass, not N. A `SCAN` cursor is a bucket index in reverse
//! bit order (in cluster mode from Redis 7.4 on, after a slot number); turned into a position that
//! only grows during a pass, even across a rehash, it is what "gone round to that point" compares
//! ([`CursorOrder`](crate::redis_nodes::CursorOrder)). Where a server's order is unknown, a window
//! joining mid-pass waits for the next whole pass.
//!
//! Where the cursor is one reversed bucket index, a node's range of positions is split into
//! [`LANES`] equal shares, each scanned round after round by its own chain of requests, so Redis
//! has the next `SCAN` queued while the worker parses and matches a reply. A window is done when
//! every lane has gone round to where it joined that lane. The same argument that makes a
//! mid-pass join safe makes a lane safe: its share is an interval of positions, and a `SCAN`
//! covers every position from its cursor's up to the returned cursor's, whatever the table size.
//!
//! Each request of a lane carries the `UNLINK`s of the keys its previous reply matched, then the
//! next `SCAN`. A window is reported finished once every lane answered a request sent after the
//! window was done scanning it: the deletes of everything it matched are then confirmed.
//!
//! In a Redis Cluster each primary is scanned on its own, and the `UNLINK`s are grouped by hash
//! slot (a node refuses multi-key commands across slots). The request that confirms a window also
//! asks the primary for its own `CLUSTER NODES` line: if a failover or a slot migration happened
//! since the worker connected, keys may have moved past a cursor, so the step fails and the worker
//! gives the batch back and sweeps again on the new topology.
//!
//! Where a node has replicas, a window is finished only once they have its deletes too
//! ([`crate::replicas`]): a request of the node carries `WAIT` after its `UNLINK`s, and the
//! windows confirmed on the node up to then count as replicated when enough replicas answered.
//! `WAIT` blocks the node's connection, so one is in flight per node at a time; one that times out
//! leaves the windows unfinished (their changes stay in the outbox) and is sent again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use redis::aio::MultiplexedConnection;
use redis::cluster_routing::Slot;

use crate::matcher::{Matcher, PatternId};
use crate::redis_nodes::{CursorOrder, Node};
use crate::replicas::connected_replicas;
use crate::window::{
    take_cluster_nodes, Failure, FinishedWindow, PatternSpec, StepError, StepReport, WindowId,
    UNLINK_CHUNK,
};

/// Keys Redis examines per `SCAN` call. Measured on this project's machine: 1,000 keeps a call
/// near 1 ms (the app shares this Redis); 5,000 saves 10 % of a pass but blocks Redis 3–4 ms
/// per call. With [`LANES`] calls queued at once, an app's `GET` can wait behind all of them:
/// in the bench (100k keys) its p99 during sweeps was 7.6 ms with four lanes of 1,000 and
/// 3.5 ms with four of 500, while the sweeps took as long (the lanes hide the extra round trips).
pub const SCAN_COUNT: usize = 500;
/// Requests in flight per node, each over its own share of the cursor's range. With one, Redis
/// sat idle while the worker parsed and matched a reply and while replies and requests travelled:
/// at 1M keys under the bench's sustained load Redis was 61 % busy, and the first passes (a full
/// keyspace, many deletes) took 2.5 × the reference pass. With two lanes Redis was 77 % busy and
/// they took 1.7–1.8 ×; with four 1.4–1.6 ×; eight did no better than four.
pub const LANES: usize = 4;
/// A node's replicas are counted again (`INFO replication`, in a request that confirms windows)
/// once the last count is this old; requests that carry `WAIT` always count them. Confirming
/// windows without a fresh count misses only a replica that attached within this second, which
/// is still in its first synchronisation and no candidate for a failover; counting on every
/// confirmation would add an `INFO` to tens of requests a second on servers without replicas.
const REPLICA_RECOUNT_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct PatternState {
    text: Arc<str>,
    label: Arc<str>,
    first_pass_refs: u32,
    refill_refs: u32,
    matched: u64,
}

/// How far one window has got in one lane.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    /// Position where the window joined the lane's round; `None` when it joined mid-round on a
    /// server whose cursor order is unknown, so it needs the next whole round.
    start: Option<u64>,
    /// Joined while a `SCAN` of the lane was in flight. That `SCAN` was sent with the match glob
    /// of before: it may have filtered out this window's keys, so the window starts where its
    /// reply leaves the cursor.
    after_in_flight: bool,
    wrapped: bool,
    /// The lane's rounds covered the whole lane since the window joined.
    done: bool,
    /// A request sent after `done` came back: the `UNLINK`s of every key the window matched in
    /// this lane are confirmed.
    confirmed: bool,
    /// The node's replicas the policy asks for have those deletes too (or it asks for none).
    replicated: bool,
}

impl Progress {
    /// A window joining `lane` now.
    fn joining(lane: &Lane, order: CursorOrder) -> Progress {
        let mut progress = Progress::default();
        if lane.scan_in_flight {
            progress.after_in_flight = true;
        } else if lane.in_round() {
            progress.start = order.position(lane.cursor);
        } else {
            progress.start = lane.first_position;
        }
        progress
    }

    /// Records a `SCAN` of the lane that returned a cursor at `next_position` in the server's
    /// order (it covered everything before it); `round_ended` when that is the lane's end.
    fn advance(&mut self, round_ended: bool, next_position: Option<u64>, lane: &Lane) {
        if self.done {
            return;
        }
        if self.after_in_flight {
            self.after_in_flight = false;
            self.start = match round_ended {
                true => lane.first_position,
                false => next_position,
            };
            return;
        }
        if !self.wrapped {
            if round_ended {
                if self.start.is_some() && self.start == lane.first_position {
                    self.done = true;
                } else {
                    self.wrapped = true;
                }
            }
            return;
        }
        self.done = round_ended
            || match (self.start, next_position) {
                (Some(start), Some(position)) => position >= start,
                _ => false,
            };
    }
}

#[derive(Debug)]
struct Window {
    id: WindowId,
    refill: bool,
    pattern_ids: Vec<PatternId>,
    matched_at_join: Vec<u64>,
    /// One per lane.
    progress: Vec<Progress>,
}

/// One share of a node's cursor range, scanned round after round by its own chain of requests.
struct Lane {
    node: usize,
    /// The cursor this lane's round begins at, and its position.
    first_cursor: u64,
    first_position: Option<u64>,
    /// Position where the next lane's share begins; `None` for the node's last lane, whose round
    /// ends when the server's cursor comes back to 0.
    end: Option<u64>,
    /// The first lane of a node times the node's passes (its lanes run side by side).
    times_passes: bool,
    /// The cursor the next `SCAN` uses.
    cursor: u64,
    /// How long the lane has worked on its round; `None` between rounds (the cursor is at
    /// `first_cursor`).
    round_clock: Option<RoundClock>,
    in_flight: bool,
    scan_in_flight: bool,
    /// Keys matched and not yet unlinked, with the label they count under and whether only a
    /// refill guard asked for them.
    pending: Vec<(Vec<u8>, Arc<str>, bool)>,
}

/// The working time of a lane's round. A lane stops mid-round when no window needs it and goes on
/// when the next one joins, maybe much later: counting that wait would report a 140 ms pass after
/// 25 s of idleness as 25 s, in the sweep duration histogram and in what paces the epochs.
#[derive(Debug, Clone, Copy)]
struct RoundClock {
    /// Work before the last pause.
    worked: Duration,
    /// When the lane last went on working; `None` while it is paused.
    since: Option<Instant>,
}

impl RoundClock {
    fn total(&self, now: Instant) -> Duration {
        self.worked + self.since.map_or(Duration::ZERO, |since| now - since)
    }
}

/// Where a `SCAN` reply left a lane ([`Lane::move_to`]).
struct Moved {
    /// Position of the returned cursor in the server's order.
    position: Option<u64>,
    /// The reply reached the lane's end: the lane is back at its first cursor.
    round_ended: bool,
    /// How long the round that ended took.
    round_took: Option<Duration>,
}

impl Lane {
    /// The cursor is inside a round (past `first_cursor`).
    fn in_round(&self) -> bool {
        self.round_clock.is_some()
    }

    /// The lane sends a `SCAN` at `now`: its round begins, or goes on after a pause.
    fn work(&mut self, now: Instant) {
        match &mut self.round_clock {
            None => {
                self.round_clock = Some(RoundClock {
                    worked: Duration::ZERO,
                    since: Some(now),
                })
            }
            Some(clock) => {
                clock.since.get_or_insert(now);
            }
        }
    }

    /// No window needs the lane at `now`: the time until it scans again is not its round's.
    fn pause(&mut self, now: Instant) {
        if let Some(clock) = &mut self.round_clock {
            if let Some(since) = clock.since.take() {
                clock.worked += now - since;
            }
        }
    }

    /// Moves the lane past a `SCAN` that returned `next_cursor`: on to it, or back to the lane's
    /// first cursor when it reached the next lane's share or the end of the pass.
    fn move_to(&mut self, next_cursor: u64, order: CursorOrder, now: Instant) -> Moved {
        let position = order.position(next_cursor);
        let round_ended = next_cursor == 0
            || matches!((self.end, position), (Some(end), Some(position)) if position >= end);
        let mut round_took = None;
        if round_ended {
            self.cursor = self.first_cursor;
            round_took = self.round_clock.take().map(|clock| clock.total(now));
        } else {
            self.cursor = next_cursor;
        }
        Moved {
            position,
            round_ended,
            round_took,
        }
    }

    /// How far the lane is into its round, in positions from its start (0 between rounds, and
    /// where the cursor order is unknown).
    fn round_done(&self, order: CursorOrder) -> u64 {
        if !self.in_round() {
            return 0;
        }
        match (order.position(self.cursor), self.first_position) {
            (Some(position), Some(first)) => position.saturating_sub(first),
            _ => 0,
        }
    }

    /// Splits a node's cursor range into `lanes` equal shares of positions (keys hash evenly over
    /// buckets, so equal shares hold about as many keys). Only where the order is one reversed
    /// bucket index: a share must begin at a cursor the server reads the same way.
    fn for_node(node: usize, order: CursorOrder, lanes: usize) -> Vec<Lane> {
        let count = match order {
            CursorOrder::ReversedBuckets => lanes.max(1),
            CursorOrder::SlotThenReversedBuckets | CursorOrder::Unknown => 1,
        };
        let boundary = |share: usize| ((share as u128) << 64) / count as u128;
        (0..count)
            .map(|share| {
                let first_position = boundary(share) as u64;
                let first_cursor = first_position.reverse_bits();
                Lane {
                    node,
                    first_cursor,
                    // Cursor 0 starts a whole pass in any order.
                    first_position: match share {
                        0 => Some(0),
                        _ => order.position(first_cursor),
                    },
                    end: (share + 1 < count).then(|| boundary(share + 1) as u64),
                    times_passes: share == 0,
                    cursor: first_cursor,
                    round_clock: None,
                    in_flight: false,
                    scan_in_flight: false,
                    pending: Vec::new(),
                }
            })
            .collect()
    }
}

/// A lane's request and what came back.
struct LaneReply {
    lane: usize,
    plan: NodePlan,
    outcome: Result<PlanOutcome, Failure>,
}

/// A node's replica confirmations.
#[derive(Debug, Default, Clone)]
struct ReplicaWaits {
    /// A request carrying `WAIT` is in flight: it blocks the connection, so one at a time.
    in_flight: bool,
    /// The last `WAIT` timed out short of the replicas asked for (warned once until it recovers).
    behind: bool,
    /// When the replicas were last counted by a sweep request.
    counted_at: Option<Instant>,
}

/// The sweep state: nodes, their lanes with cursors and requests in flight, the active windows
/// and their compiled patterns.
pub struct Sweeper {
    nodes: Vec<Node>,
    /// One per node.
    replica_waits: Vec<ReplicaWaits>,
    lanes: Vec<Lane>,
    in_flight: FuturesUnordered<BoxFuture<'static, LaneReply>>,
    matcher: Matcher,
    by_text: HashMap<Arc<str>, PatternId>,
    /// Patterns some first-pass window still asks for (the rest only a refill guard holds).
    first_pass_patterns: usize,
    patterns: Vec<Option<PatternState>>,
    free_ids: Vec<PatternId>,
    windows: Vec<Window>,
    next_window: WindowId,
    /// Report matches instead of deleting them (`invalidate --dry-run`).
    listing: bool,
}

impl Sweeper {
    pub fn new(nodes: Vec<Node>) -> Sweeper {
        Sweeper::with_lanes(nodes, LANES)
    }

    /// A sweeper that deletes nothing: the keys its windows match come back in
    /// [`StepReport::listed`], found by the same passes as the deletes would be.
    pub fn listing(nodes: Vec<Node>) -> Sweeper {
        Sweeper {
            listing: true,
            ..Sweeper::new(nodes)
        }
    }

    /// A sweeper with `lanes` lanes per node where the cursor order allows (1: one cursor per
    /// node, whose steps follow each other in a fixed order).
    pub fn with_lanes(nodes: Vec<Node>, lanes_per_node: usize) -> Sweeper {
        let lanes = nodes
            .iter()
            .enumerate()
            .flat_map(|(index, node)| Lane::for_node(index, node.cursor_order, lanes_per_node))
            .collect();
        Sweeper {
            replica_waits: vec![ReplicaWaits::default(); nodes.len()],
            nodes,
            lanes,
            in_flight: FuturesUnordered::new(),
            matcher: Matcher::default(),
            by_text: HashMap::new(),
            first_pass_patterns: 0,
            patterns: Vec::new(),
            free_ids: Vec::new(),
            windows: Vec::new(),
            next_window: 1,
            listing: false,
        }
    }

    /// Distinct patterns that a first-pass window asks for. The worker's claim cap counts these:
    /// a refill guard's patterns were first-pass patterns at most one guard delay and one pass
    /// earlier, so they are bounded by the same cap, and counting them would pause claims for
    /// patterns that no longer hold any outbox row back.
    pub fn first_pass_patterns(&self) -> usize {
        self.first_pass_patterns
    }

    /// Lanes over all nodes: [`LANES`] per node whose cursor order is one reversed bucket index,
    /// one per other node.
    #[cfg(feature = "test-hooks")]
    pub fn lane_count(&self) -> usize {
        self.lanes.len()
    }

    /// Windows are active, requests are in flight, or matched keys wait for their `UNLINK`.
    pub fn is_busy(&self) -> bool {
        !self.windows.is_empty()
            || !self.in_flight.is_empty()
            || self.lanes.iter().any(|lane| !lane.pending.is_empty())
    }

    /// Adds a window that joins the pass in progress (or starts one). `refill` marks the delayed
    /// second pass, whose deletions are counted apart. A window without patterns is not added:
    /// there is nothing to sweep for.
    pub fn add_window(&mut self, patterns: &[PatternSpec], refill: bool) -> Option<WindowId> {
        if patterns.is_empty() {
            return None;
        }
        let id = self.next_window;
        self.next_window += 1;
        let mut pattern_ids = Vec::with_capacity(patterns.len());
        let mut matched_at_join = Vec::with_capacity(patterns.len());
        for spec in patterns {
            let pattern_id = match self.by_text.get(&*spec.pattern) {
                Some(&existing) => existing,
                None => {
                    let pattern_id = match self.free_ids.pop() {
                        Some(free) => free,
                        None => {
                            self.patterns.push(None);
                            (self.patterns.len() - 1) as PatternId
                        }
                    };
                    self.patterns[pattern_id as usize] = Some(PatternState {
                        text: spec.pattern.clone(),
                        label: spec.label.clone(),
                        first_pass_refs: 0,
                        refill_refs: 0,
                        matched: 0,
                    });
                    self.matcher.insert(&spec.pattern, pattern_id);
                    self.by_text.insert(spec.pattern.clone(), pattern_id);
                    pattern_id
                }
            };
            let Some(state) = self.patterns[pattern_id as usize].as_mut() else {
                continue;
            };
            if refill {
                state.refill_refs += 1;
            } else {
                if state.first_pass_refs == 0 {
                    self.first_pass_patterns += 1;
                }
                state.first_pass_refs += 1;
            }
            pattern_ids.push(pattern_id);
            matched_at_join.push(state.matched);
        }
        let progress = self
            .lanes
            .iter()
            .map(|lane| Progress::joining(lane, self.nodes[lane.node].cursor_order))
            .collect();
        self.windows.push(Window {
            id,
            refill,
            pattern_ids,
            matched_at_join,
            progress,
        });
        Some(id)
    }

    /// Waits for the next reply of any lane and books it; every lane with work to do keeps one
    /// request in flight. Cancelling the returned future loses nothing: its only wait is for a
    /// reply, and the request stays in flight.
    pub async fn step(&mut self) -> Result<StepReport, StepError> {
        self.send_requests();
        let Some(reply) = self.in_flight.next().await else {
            // Nothing to do: a caller stepping in a loop still lets other tasks run.
            tokio::task::yield_now().await;
            return Ok(StepReport::default());
        };
        let mut report = StepReport::default();
        self.book_reply(reply, &mut report)?;
        // Replies that came in meanwhile are booked now, so their lanes send again at once.
        while let Some(Some(reply)) = self.in_flight.next().now_or_never() {
            self.book_reply(reply, &mut report)?;
        }
        self.send_requests();
        Ok(report)
    }

    /// Sends one request for each lane that has none in flight and work to do: `UNLINK` what it
    /// matched, `SCAN` on for windows that need it, confirm windows that finished scanning it.
    fn send_requests(&mut self) {
        let mut match_glob: Option<Arc<[u8]>> = None;
        let now = Instant::now();
        for index in self.idle_lanes_furthest_behind_first() {
            let Some(plan) = self.plan_request(index, now) else {
                continue;
            };
            let glob = match_glob
                .get_or_insert_with(|| Arc::from(self.matcher.superset_glob()))
                .clone();
            self.send(index, plan, glob, now);
        }
    }

    /// The lanes without a request in flight, the one furthest behind in its round first: Redis
    /// answers a connection's requests in order, and a window waits for its slowest lane. In index
    /// order, replies booked together always favoured the first lanes: measured at 1M keys under
    /// the sustained load, the last lane's round took 10 % longer than the first's.
    fn idle_lanes_furthest_behind_first(&self) -> Vec<usize> {
        let mut ready: Vec<(u64, usize)> = (0..self.lanes.len())
            .filter(|&index| !self.lanes[index].in_flight)
            .map(|index| {
                let lane = &self.lanes[index];
                (lane.round_done(self.nodes[lane.node].cursor_order), index)
            })
            .collect();
        ready.sort_unstable();
        ready.into_iter().map(|(_, index)| index).collect()
    }

    /// What lane `index` has to ask of Redis now, if anything: the `UNLINK`s of its matches, the
    /// next `SCAN` while a window needs it, the confirmation of windows done with it, and the
    /// `WAIT` for its node's replicas. A lane no window needs is paused at `now`.
    fn plan_request(&mut self, index: usize, now: Instant) -> Option<NodePlan> {
        let needs_scan = self
            .windows
            .iter()
            .any(|window| !window.progress[index].done);
        let needs_confirming = self.windows.iter().any(|window| {
            let progress = &window.progress[index];
            progress.done && !progress.confirmed
        });
        if !needs_scan {
            self.lanes[index].pause(now);
        }
        let node_index = self.lanes[index].node;
        let node = &self.nodes[node_index];
        let policy = node.replica_policy;
        let required = policy.required(node.replicas);
        let waits = &self.replica_waits[node_index];
        let covers = match required > 0 && !waits.in_flight {
            true => self.replica_covers(index),
            false => Vec::new(),
        };
        let wait = !covers.is_empty();
        if !needs_scan && !needs_confirming && !wait && self.lanes[index].pending.is_empty() {
            return None;
        }
        let recount_due = waits
            .counted_at
            .is_none_or(|at| at.elapsed() >= REPLICA_RECOUNT_AFTER);
        let lane = &mut self.lanes[index];
        Some(NodePlan {
            groups: group_pending(std::mem::take(&mut lane.pending), node.clustered),
            scan: needs_scan.then_some(lane.cursor),
            verify: node.shard.is_some() && needs_confirming,
            // Replicas may attach or leave at any time: count them where a window is confirmed,
            // right after its deletes (unless `INFO` is refused).
            count_replicas: policy.counts_connected()
                && node.replicas.is_some()
                && (wait || (needs_confirming && recount_due)),
            wait: wait.then(|| (required, policy.wait_millis())),
            covers,
        })
    }

    /// Windows (with their lanes) of lane `index`'s node whose deletes the primary confirmed and
    /// its replicas not yet: the lane's next `WAIT` covers them, and those its own `UNLINK`s
    /// confirm.
    fn replica_covers(&self, index: usize) -> Vec<(WindowId, usize)> {
        let node_index = self.lanes[index].node;
        self.windows
            .iter()
            .flat_map(|window| {
                window
                    .progress
                    .iter()
                    .enumerate()
                    .filter(|&(lane, progress)| {
                        self.lanes[lane].node == node_index
                            && !progress.replicated
                            && (progress.confirmed || (lane == index && progress.done))
                    })
                    .map(move |(lane, _)| (window.id, lane))
            })
            .collect()
    }

    /// Sends lane `index`'s request (`glob`: what its `SCAN` matches) and books what is now in
    /// flight.
    fn send(&mut self, index: usize, plan: NodePlan, glob: Arc<[u8]>, now: Instant) {
        let node_index = self.lanes[index].node;
        let waits = &mut self.replica_waits[node_index];
        if plan.wait.is_some() {
            waits.in_flight = true;
        }
        if plan.count_replicas {
            waits.counted_at = Some(Instant::now());
        }
        let lane = &mut self.lanes[index];
        let scans = plan.scan.is_some();
        if scans {
            lane.work(now);
        }
        lane.in_flight = true;
        lane.scan_in_flight = scans;
        let connection = self.nodes[node_index].connection.clone();
        self.in_flight.push(Box::pin(async move {
            let outcome = run_plan(connection, &plan, &glob).await;
            LaneReply {
                lane: index,
                plan,
                outcome,
            }
        }));
    }

    fn book_reply(&mut self, reply: LaneReply, report: &mut StepReport) -> Result<(), StepError> {
        let LaneReply {
            lane: index,
            plan,
            outcome,
        } = reply;
        let node_index = self.lanes[index].node;
        if plan.wait.is_some() {
            self.replica_waits[node_index].in_flight = false;
        }
        let mut outcome = self.checked(node_index, outcome)?;
        for (group, count) in &outcome.unlinked {
            let group = &plan.groups[*group];
            if group.refill {
                report.refill_deleted += count;
            } else {
                *report.deleted.entry(group.label.clone()).or_default() += count;
            }
        }
        let replicated = self.book_replicas(node_index, &plan, &outcome);
        self.confirm_lane(index, &plan, replicated);
        if let Some((next_cursor, keys)) = outcome.scanned.take() {
            self.book_scan(index, next_cursor, keys, report);
        }
        // Where no replica is required (now: replicas may have left since a lane's delete), a
        // confirmed delete needs no WAIT; that lane may send nothing more to be told so.
        let no_replica_needed: Vec<bool> = self
            .lanes
            .iter()
            .map(|lane| {
                let node = &self.nodes[lane.node];
                node.replica_policy.required(node.replicas) == 0
            })
            .collect();
        let finished_ids: Vec<WindowId> = self
            .windows
            .iter()
            .filter(|window| {
                window
                    .progress
                    .iter()
                    .zip(&no_replica_needed)
                    .all(|(progress, &none)| progress.confirmed && (progress.replicated || none))
            })
            .map(|window| window.id)
            .collect();
        for id in finished_ids {
            if let Some(finished) = self.finish_window(id) {
                report.finished.push(finished);
            }
        }
        Ok(())
    }

    /// A node's reply, or the error that fails the sweep: Redis' own, or a cluster topology that
    /// no longer matches the slots this node was swept for.
    fn checked(
        &self,
        node_index: usize,
        outcome: Result<PlanOutcome, Failure>,
    ) -> Result<PlanOutcome, StepError> {
        let node = &self.nodes[node_index];
        let outcome = outcome.map_err(|failure| StepError::new(&node.name, failure))?;
        if let Some(text) = &outcome.cluster_nodes {
            node.verify_shard(text).map_err(|detail| {
                StepError::new(
                    &node.name,
                    Failure::TopologyChanged {
                        when: "during the sweep",
                        detail,
                    },
                )
            })?;
        }
        Ok(outcome)
    }

    /// Books the replicas a reply counted and whether its `WAIT` was answered by enough of them
    /// (`None`: no `WAIT` in this request), and returns that answer.
    fn book_replicas(
        &mut self,
        node_index: usize,
        plan: &NodePlan,
        outcome: &PlanOutcome,
    ) -> Option<bool> {
        let node = &mut self.nodes[node_index];
        if let Some(connected) = outcome.connected_replicas {
            node.replicas = Some(connected);
        }
        let policy = node.replica_policy;
        let required = policy.required(node.replicas);
        let replicated = match (plan.wait, outcome.replicas_acked) {
            (Some(_), Some(acked)) => Some(acked >= required),
            _ => None,
        };
        let waits = &mut self.replica_waits[node_index];
        match replicated {
            Some(false) if !waits.behind => {
                waits.behind = true;
                tracing::warn!(node = %node.name, acked = outcome.replicas_acked.unwrap_or(0), required, wait_ms = policy.wait_millis(), "replicas did not confirm the deletes in time: the changes stay in the outbox until they do");
            }
            Some(true) if waits.behind => {
                waits.behind = false;
                tracing::info!(node = %node.name, required, "replicas confirm the deletes again");
            }
            _ => {}
        }
        replicated
    }

    /// This request carried the `UNLINK`s of everything matched up to the reply before it, so
    /// windows that were done scanning the lane then have their deletes confirmed now (and
    /// replicated, where its `WAIT` was answered; where no replica is required, the finished check
    /// in [`Sweeper::book_reply`] needs none).
    fn confirm_lane(&mut self, index: usize, plan: &NodePlan, replicated: Option<bool>) {
        let lane = &mut self.lanes[index];
        lane.in_flight = false;
        lane.scan_in_flight = false;
        for window in &mut self.windows {
            let progress = &mut window.progress[index];
            if progress.done {
                progress.confirmed = true;
            }
        }
        if replicated == Some(true) {
            for &(window_id, lane) in &plan.covers {
                if let Some(window) = self.windows.iter_mut().find(|w| w.id == window_id) {
                    window.progress[lane].replicated = true;
                }
            }
        }
    }

    /// A `SCAN` reply: its matches wait for the lane's next `UNLINK` (or, listing, are reported),
    /// and every window's progress moves with the cursor.
    fn book_scan(
        &mut self,
        index: usize,
        next_cursor: u64,
        keys: Vec<Vec<u8>>,
        report: &mut StepReport,
    ) {
        let order = self.nodes[self.lanes[index].node].cursor_order;
        let lane = &mut self.lanes[index];
        report.keys_scanned += keys.len() as u64;
        for key in keys {
            if let Some(pattern_id) = self.matcher.find(&key) {
                if let Some(state) = self.patterns[pattern_id as usize].as_mut() {
                    state.matched += 1;
                    if self.listing {
                        report.listed.push(key);
                    } else {
                        let refill_only = state.first_pass_refs == 0;
                        lane.pending.push((key, state.label.clone(), refill_only));
                    }
                }
            }
        }
        // Once per reply, not per window: hundreds of windows can share a pass.
        let moved = lane.move_to(next_cursor, order, Instant::now());
        if let (Some(took), true) = (moved.round_took, lane.times_passes) {
            report.pass_durations.push(took);
        }
        let lane = &self.lanes[index];
        for window in &mut self.windows {
            window.progress[index].advance(moved.round_ended, moved.position, lane);
        }
        if moved.round_ended && lane.times_passes {
            // A pass ended: a good moment to let Redis filter by a longer shared prefix.
            self.matcher.recompute_positions();
        }
    }

    fn finish_window(&mut self, id: WindowId) -> Option<FinishedWindow> {
        let index = self.windows.iter().position(|window| window.id == id)?;
        let window = self.windows.swap_remove(index);
        let mut keys_per_pattern = Vec::with_capacity(window.pattern_ids.len());
        for (pattern_id, at_join) in window.pattern_ids.iter().zip(&window.matched_at_join) {
            let Some(state) = self.patterns[*pattern_id as usize].as_mut() else {
                keys_per_pattern.push(0);
                continue;
            };
            keys_per_pattern.push(state.matched - at_join);
            if window.refill {
                state.refill_refs -= 1;
            } else {
                state.first_pass_refs -= 1;
                if state.first_pass_refs == 0 {
                    self.first_pass_patterns -= 1;
                }
            }
            if state.first_pass_refs == 0 && state.refill_refs == 0 {
                let text = state.text.clone();
                self.matcher.remove(&text, *pattern_id);
                self.by_text.remove(&text);
                self.patterns[*pattern_id as usize] = None;
                self.free_ids.push(*pattern_id);
            }
        }
        Some(FinishedWindow {
            id: window.id,
            keys_per_pattern,
        })
    }
}

/// Matched keys waiting for `UNLINK`, grouped by what they count as (so each reply is attributed
/// exactly) and, in a cluster, by hash slot (a node refuses multi-key commands across slots).
struct UnlinkGroup {
    label: Arc<str>,
    refill: bool,
    keys: Vec<Vec<u8>>,
}

/// What a group of keys shares: label, refill flag, and (in a cluster) hash slot.
type GroupKey = (Arc<str>, bool, Option<Slot>);

fn group_pending(pending: Vec<(Vec<u8>, Arc<str>, bool)>, clustered: bool) -> Vec<UnlinkGroup> {
    let mut groups: HashMap<GroupKey, Vec<Vec<u8>>> = HashMap::new();
    for (key, label, refill) in pending {
        let slot = clustered.then(|| Slot::for_key(&key));
        groups.entry((label, refill, slot)).or_default().push(key);
    }
    groups
        .into_iter()
        .map(|((label, refill, _), keys)| UnlinkGroup {
            label,
            refill,
            keys,
        })
        .collect()
}

struct NodePlan {
    groups: Vec<UnlinkGroup>,
    scan: Option<u64>,
    /// Ask for `CLUSTER NODES` (see [`Node::verify_shard`]).
    verify: bool,
    /// Ask `INFO replication` how many replicas are connected, after the `UNLINK`s.
    count_replicas: bool,
    /// `WAIT <replicas> <milliseconds>` after the `UNLINK`s.
    wait: Option<(u32, u64)>,
    /// Windows (and lanes) the `WAIT` vouches for when enough replicas answer.
    covers: Vec<(WindowId, usize)>,
}

#[derive(Default)]
struct PlanOutcome {
    /// (group index, keys removed)
    unlinked: Vec<(usize, u64)>,
    scanned: Option<(u64, Vec<Vec<u8>>)>,
    cluster_nodes: Option<String>,
    connected_replicas: Option<u32>,
    /// Replicas that acknowledged every write of the connection (`WAIT`'s answer).
    replicas_acked: Option<u32>,
}

/// Sends a lane's request and reads what came back.
async fn run_plan(
    mut connection: MultiplexedConnection,
    plan: &NodePlan,
    match_glob: &[u8],
) -> Result<PlanOutcome, Failure> {
    let Some((pipe, unlinks)) = plan.pipeline(match_glob) else {
        return Ok(PlanOutcome::default());
    };
    let replies: Vec<redis::Value> = pipe.query_async(&mut connection).await?;
    PlanOutcome::read(plan, unlinks, replies)
}

impl NodePlan {
    /// The request's pipeline, in the order [`PlanOutcome::read`] takes the replies apart, with
    /// the group each `UNLINK` belongs to; `None` when the plan asks nothing of Redis.
    fn pipeline(&self, match_glob: &[u8]) -> Option<(redis::Pipeline, Vec<usize>)> {
        let mut pipe = redis::pipe();
        if self.verify {
            pipe.cmd("CLUSTER").arg("NODES");
        }
        let mut unlinks: Vec<usize> = Vec::new();
        for (group_index, group) in self.groups.iter().enumerate() {
            for chunk in group.keys.chunks(UNLINK_CHUNK) {
                pipe.cmd("UNLINK").arg(chunk);
                unlinks.push(group_index);
            }
        }
        // After the UNLINKs: WAIT covers every write the connection made before it.
        if self.count_replicas {
            pipe.cmd("INFO").arg("replication");
        }
        if let Some((replicas, millis)) = self.wait {
            pipe.cmd("WAIT").arg(replicas).arg(millis);
        }
        if let Some(cursor) = self.scan {
            pipe.cmd("SCAN").arg(cursor);
            if match_glob != b"*" {
                pipe.arg("MATCH").arg(match_glob);
            }
            pipe.arg("COUNT").arg(SCAN_COUNT);
        }
        let asks_nothing = unlinks.is_empty()
            && self.scan.is_none()
            && !self.verify
            && !self.count_replicas
            && self.wait.is_none();
        (!asks_nothing).then_some((pipe, unlinks))
    }
}

impl PlanOutcome {
    /// Takes a request's replies apart: `CLUSTER NODES` first, `SCAN`, `WAIT` and `INFO` from the
    /// end, and in between one reply per `UNLINK` (`unlinks`: the group of each).
    fn read(
        plan: &NodePlan,
        unlinks: Vec<usize>,
        mut replies: Vec<redis::Value>,
    ) -> Result<PlanOutcome, Failure> {
        let cluster_nodes = take_cluster_nodes(plan.verify, &mut replies)?;
        let mut last = |command: &'static str| replies.pop().ok_or(Failure::MissingReply(command));
        let scanned = match plan.scan {
            Some(_) => Some(redis::from_redis_value::<(u64, Vec<Vec<u8>>)>(last(
                "SCAN",
            )?)?),
            None => None,
        };
        let replicas_acked = match plan.wait {
            Some(_) => Some(redis::from_redis_value(last("WAIT")?)?),
            None => None,
        };
        let connected_replicas = match plan.count_replicas {
            true => {
                let info: String = redis::from_redis_value(last("INFO replication")?)?;
                // A reply without the field: count none rather than fail every sweep.
                Some(connected_replicas(&info).unwrap_or(0))
            }
            false => None,
        };
        let mut unlinked = Vec::with_capacity(unlinks.len());
        for (group_index, reply) in unlinks.into_iter().zip(replies) {
            let count: u64 = redis::from_redis_value(reply)?;
            unlinked.push((group_index, count));
        }
        Ok(PlanOutcome {
            unlinked,
            scanned,
            cluster_nodes,
            connected_replicas,
            replicas_acked,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis_nodes::CursorOrder;

    const BUCKETS: CursorOrder = CursorOrder::ReversedBuckets;
    const PER_SLOT: CursorOrder = CursorOrder::SlotThenReversedBuckets;

    /// A lane over a node's whole range, as with one lane per node.
    fn whole_range() -> Lane {
        Lane::for_node(0, CursorOrder::Unknown, 1).remove(0)
    }

    fn advance(progress: &mut Progress, next_cursor: u64, order: CursorOrder) {
        progress.advance(
            next_cursor == 0,
            order.position(next_cursor),
            &whole_range(),
        );
    }

    fn joined_at(order: CursorOrder, cursor: u64) -> Progress {
        Progress {
            start: order.position(cursor),
            ..Progress::default()
        }
    }

    /// Replays `replies` (cursors returned) on `lane` for `progress`; true once done.
    fn replay(progress: &mut Progress, lane: &mut Lane, replies: &[u64]) -> bool {
        for &next_cursor in replies {
            // A SCAN at the lane's first cursor starts its round, as `send_requests` does.
            lane.work(Instant::now());
            let moved = lane.move_to(next_cursor, BUCKETS, Instant::now());
            progress.advance(moved.round_ended, moved.position, lane);
        }
        progress.done
    }

    /// Puts `lane` in the middle of its round, at `cursor`.
    fn mid_round(lane: &mut Lane, cursor: u64) {
        lane.cursor = cursor;
        lane.work(Instant::now());
    }

    #[test]
    fn a_round_counts_the_lane_s_work_not_its_idle_time() {
        // An 8-bucket table, one lane: 10 ms of scanning, 25 s with no window, 130 ms more.
        let mut lane = whole_range();
        let start = Instant::now();
        lane.work(start);
        let moved = lane.move_to(4, BUCKETS, start + Duration::from_millis(10));
        assert!(!moved.round_ended);
        lane.pause(start + Duration::from_millis(10));
        lane.pause(start + Duration::from_secs(20));
        let resumed = start + Duration::from_millis(25_010);
        lane.work(resumed);
        lane.move_to(2, BUCKETS, resumed + Duration::from_millis(60));
        // A second SCAN sent while the lane works does not restart its clock.
        lane.work(resumed + Duration::from_millis(60));
        let moved = lane.move_to(0, BUCKETS, resumed + Duration::from_millis(130));
        assert!(moved.round_ended);
        assert_eq!(moved.round_took, Some(Duration::from_millis(140)));
        // The next round starts its own clock.
        assert!(!lane.in_round());
        lane.work(resumed + Duration::from_secs(1));
        let moved = lane.move_to(0, BUCKETS, resumed + Duration::from_millis(1_050));
        assert_eq!(moved.round_took, Some(Duration::from_millis(50)));
    }

    #[test]
    fn two_lanes_split_the_cursor_order_in_halves() {
        let lanes = Lane::for_node(0, BUCKETS, 2);
        assert_eq!(lanes.len(), 2);
        assert_eq!((lanes[0].first_cursor, lanes[0].end), (0, Some(1 << 63)));
        // Bucket 1 of any table is the first in the second half of the reversed-bit order.
        assert_eq!((lanes[1].first_cursor, lanes[1].end), (1, None));
        assert_eq!(lanes[1].first_position, Some(1 << 63));
        // An 8-bucket table, whole pass: 0 4 2 6 | 1 5 3 7. The first lane's round ends when
        // Redis hands back cursor 1; the second's when it hands back 0.
        let mut first = Progress::joining(&lanes[0], BUCKETS);
        let mut second = Progress::joining(&lanes[1], BUCKETS);
        let mut lanes = lanes;
        let (head, tail) = lanes.split_at_mut(1);
        assert!(!replay(&mut first, &mut head[0], &[4, 2, 6]));
        assert!(replay(&mut first, &mut head[0], &[1]));
        assert!(!replay(&mut second, &mut tail[0], &[5, 3, 7]));
        assert!(replay(&mut second, &mut tail[0], &[0]));
        // Other shapes are not split: their cursors are not one reversed bucket index.
        assert_eq!(Lane::for_node(0, PER_SLOT, 2).len(), 1);
        let unknown = Lane::for_node(0, CursorOrder::Unknown, 4);
        assert_eq!(unknown.len(), 1);
        assert_eq!((unknown[0].first_cursor, unknown[0].end), (0, None));
    }

    #[test]
    fn four_lanes_begin_at_the_quarters_of_the_cursor_order() {
        // An 8-bucket table's pass is 0 4 | 2 6 | 1 5 | 3 7.
        let lanes = Lane::for_node(0, BUCKETS, 4);
        let firsts: Vec<u64> = lanes.iter().map(|lane| lane.first_cursor).collect();
        assert_eq!(firsts, [0, 2, 1, 3]);
        let mut lanes = lanes;
        let rounds: [&[u64]; 4] = [&[4, 2], &[6, 1], &[5, 3], &[7, 0]];
        for (lane, replies) in lanes.iter_mut().zip(rounds) {
            let mut progress = Progress::joining(lane, BUCKETS);
            assert!(!replay(&mut progress, lane, &replies[..1]));
            assert!(replay(&mut progress, lane, &replies[1..]), "{replies:?}");
        }
    }

    #[test]
    fn the_lane_furthest_behind_in_its_round_sends_first() {
        // Four lanes of an 8-bucket table (0 4 | 2 6 | 1 5 | 3 7), each at a different point.
        let mut lanes = Lane::for_node(0, BUCKETS, 4);
        for (lane, cursor) in lanes.iter_mut().zip([4u64, 2, 5, 3]) {
            if cursor != lane.first_cursor {
                mid_round(lane, cursor);
            }
        }
        let mut order: Vec<(u64, usize)> = lanes
            .iter()
            .enumerate()
            .map(|(index, lane)| (lane.round_done(BUCKETS), index))
            .collect();
        order.sort_unstable();
        // Lanes 1 and 3 have not started their rounds; lanes 0 and 2 are half-way through theirs.
        let sending: Vec<usize> = order.iter().map(|&(_, index)| index).collect();
        assert_eq!(sending, [1, 3, 0, 2]);
        assert_eq!(order[2].0, order[3].0);
    }

    #[test]
    fn a_window_joining_a_lane_mid_round_waits_for_its_join_point_in_that_lane() {
        let mut lanes = Lane::for_node(0, BUCKETS, 2);
        let lane = &mut lanes[1];
        // The second lane of an 8-bucket table stands at cursor 3 (after 1 and 5).
        mid_round(lane, 3);
        let mut progress = Progress::joining(lane, BUCKETS);
        assert!(!replay(&mut progress, lane, &[7, 0, 1, 5]));
        assert!(replay(&mut progress, lane, &[3]));
    }

    #[test]
    fn a_window_joining_while_a_scan_is_in_flight_starts_where_its_reply_leaves_the_cursor() {
        let mut lanes = Lane::for_node(0, BUCKETS, 2);
        let lane = &mut lanes[0];
        // The SCAN at cursor 2 was sent before the window's patterns were in the match glob.
        mid_round(lane, 2);
        lane.scan_in_flight = true;
        let mut progress = Progress::joining(lane, BUCKETS);
        // Its reply (cursor 6) does not count for the window: bucket 2 must be scanned again.
        assert!(!replay(&mut progress, lane, &[6, 1, 4]));
        assert!(!replay(&mut progress, lane, &[2]));
        assert!(replay(&mut progress, lane, &[6]));
        // Joined in flight just as the round ended: the whole next round is needed.
        let mut progress = Progress::joining(lane, BUCKETS);
        assert!(!replay(&mut progress, lane, &[1, 4, 2, 6]));
        assert!(replay(&mut progress, lane, &[1]));
    }

    #[test]
    fn a_window_joining_mid_pass_finishes_after_a_full_round() {
        // Cursors as Redis returns them for a 8-bucket table, in reverse-bit order.
        let cursors = [4u64, 2, 6, 1, 5, 3, 7, 0];
        // Joined when the next SCAN used cursor 2: it returns 6, 1, 5, 3, 7, then 0 (wrap).
        let mut progress = joined_at(BUCKETS, 2);
        for cursor in [6u64, 1, 5, 3, 7] {
            advance(&mut progress, cursor, BUCKETS);
            assert!(!progress.done);
        }
        advance(&mut progress, 0, BUCKETS);
        assert!(progress.wrapped && !progress.done);
        advance(&mut progress, cursors[0], BUCKETS);
        assert!(!progress.done, "position of 4 is before 2 in scan order");
        advance(&mut progress, cursors[1], BUCKETS);
        assert!(progress.done, "back at the join point");
    }

    #[test]
    fn a_window_joining_an_idle_node_needs_one_pass() {
        let mut progress = joined_at(BUCKETS, 0);
        advance(&mut progress, 4, BUCKETS);
        assert!(!progress.done);
        advance(&mut progress, 0, BUCKETS);
        assert!(progress.done);
    }

    /// A cluster-mode cursor of Redis 7.4+ / Valkey 8+: bucket cursor above the 14 slot bits.
    fn per_slot_cursor(slot: u64, bucket_cursor: u64) -> u64 {
        (bucket_cursor << 14) | slot
    }

    #[test]
    fn per_slot_cursors_are_ordered_by_slot_then_by_reversed_bucket() {
        // A pass: slot 1's table (4 buckets: 0, 2, 1, 3), then slot 2's, then slot 3's.
        let pass = [
            per_slot_cursor(1, 2),
            per_slot_cursor(1, 1),
            per_slot_cursor(1, 3),
            per_slot_cursor(2, 0),
            per_slot_cursor(2, 2),
            per_slot_cursor(3, 0),
        ];
        let positions: Vec<u64> = pass.iter().filter_map(|&c| PER_SLOT.position(c)).collect();
        assert!(positions.windows(2).all(|pair| pair[0] < pair[1]));
        // Read as one reversed bucket index, slot 1 would come after slot 2: the order this
        // layout breaks.
        assert!(BUCKETS.position(pass[0]) > BUCKETS.position(pass[3]));
    }

    #[test]
    fn a_window_joining_mid_slot_waits_for_that_slot_again() {
        // Joined while slot 2 was half scanned. After the wrap, slot 0 and slot 1 must be scanned
        // again, and slot 2 up to where it joined.
        let mut progress = joined_at(PER_SLOT, per_slot_cursor(2, 2));
        for cursor in [per_slot_cursor(3, 0), per_slot_cursor(3, 1), 0] {
            advance(&mut progress, cursor, PER_SLOT);
            assert!(!progress.done);
        }
        for cursor in [
            per_slot_cursor(1, 0),
            per_slot_cursor(1, 2),
            per_slot_cursor(2, 0),
        ] {
            advance(&mut progress, cursor, PER_SLOT);
            assert!(!progress.done, "not yet back in slot 2 at the join point");
        }
        advance(&mut progress, per_slot_cursor(2, 2), PER_SLOT);
        assert!(progress.done);
    }

    #[test]
    fn with_an_unknown_cursor_order_a_mid_pass_window_waits_for_a_whole_pass() {
        let order = CursorOrder::Unknown;
        let mut progress = joined_at(order, 2);
        assert_eq!(progress.start, None);
        for cursor in [6u64, 0, 4, 2, 6, 1] {
            advance(&mut progress, cursor, order);
            assert!(!progress.done);
        }
        advance(&mut progress, 0, order);
        assert!(progress.done);
    }

    #[test]
    fn cluster_unlinks_are_grouped_by_slot_and_label() {
        let label: Arc<str> = Arc::from("reports_report");
        let pending = vec![
            (b"{a}1".to_vec(), label.clone(), false),
            (b"{a}2".to_vec(), label.clone(), false),
            (b"{b}1".to_vec(), label.clone(), false),
            (b"{a}3".to_vec(), label.clone(), true),
        ];
        let mut sizes: Vec<usize> = group_pending(pending.clone(), true)
            .iter()
            .map(|group| group.keys.len())
            .collect();
        sizes.sort();
        assert_eq!(sizes, [1, 1, 2]);
        assert_eq!(group_pending(pending, false).len(), 2);
    }
}
