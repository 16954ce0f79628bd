//! The Redis side of the data path: one rolling `SCAN` pass per node serves every window of
//! patterns at once, and matching keys are removed with pipelined `UNLINK`.
//!
//! A window joins the pass wherever the cursor stands and is done once the cursor has gone all the
//! way round to that point again, so a change that arrives mid-pass costs no pass of its own: the
//! cost of N pending changes is about one pass, not N. A `SCAN` cursor is a bucket index in reverse
//! bit order (in cluster mode from Redis 7.4 on, after a slot number); turned into a position that
//! only grows during a pass, even across a rehash, it is what "gone round to that point" compares
//! ([`CursorOrder`](crate::keyspace::CursorOrder)). Where a server's order is unknown, a window joining mid-pass waits for the
//! next whole pass.
//!
//! Each step sends one pipeline per node: the `UNLINK`s of the keys matched by the previous step,
//! then the next `SCAN`. A window is reported finished one step after its last `SCAN`, once the
//! deletes of everything it matched were confirmed.
//!
//! In a Redis Cluster each primary is scanned on its own, and the `UNLINK`s are grouped by hash
//! slot (a node refuses multi-key commands across slots). The step that reports windows finished
//! also asks every primary for its own `CLUSTER NODES` line: if a failover or a slot migration
//! happened since the worker connected, keys may have moved past a cursor, so the step fails and
//! the worker gives the batch back and sweeps again on the new topology.

use std::collections::HashMap;
use std::sync::Arc;

use redis::cluster_routing::Slot;

use crate::keyspace::Node;
use crate::matcher::{Matcher, PatternId};

/// Keys Redis examines per `SCAN` call. DESIGN.md's measurement: 1,000 keeps a call near 1 ms (the
/// app shares this Redis); 5,000 saves 10 % of a pass but blocks Redis 3–4 ms per call.
pub const SCAN_COUNT: usize = 1000;
/// Keys per `UNLINK` command: small enough that freeing them never blocks Redis for long.
pub const UNLINK_CHUNK: usize = 256;

pub type WindowId = u64;

#[derive(Debug, thiserror::Error)]
#[error("redis at {node}: {source}")]
pub struct SweepError {
    pub node: String,
    pub source: redis::RedisError,
}

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
    /// Passes started (one per node whose cursor started at 0).
    pub passes_started: u64,
    /// Durations of the passes that ended in this step.
    pub pass_durations: Vec<std::time::Duration>,
    pub keys_scanned: u64,
}

#[derive(Debug)]
struct PatternState {
    text: Arc<str>,
    label: Arc<str>,
    first_pass_refs: u32,
    refill_refs: u32,
    matched: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    /// Position where the window joined this node's pass; `None` when it joined mid-pass on a
    /// server whose cursor order is unknown, so it needs the next whole pass.
    start: Option<u64>,
    wrapped: bool,
    done: bool,
}

impl Progress {
    /// A window joining now: at the start of a pass when the node is idle, else where the cursor
    /// of the next `SCAN` stands.
    fn joining(node: &NodeScan) -> Progress {
        Progress {
            start: if node.in_pass {
                node.node.cursor_order.position(node.cursor)
            } else {
                Some(0)
            },
            ..Progress::default()
        }
    }

    /// Records a `SCAN` that returned `next_cursor`, at `next_position` in the server's cursor
    /// order: it covered everything up to there.
    fn advance(&mut self, next_cursor: u64, next_position: Option<u64>) {
        if self.done {
            return;
        }
        if !self.wrapped {
            if next_cursor == 0 {
                if self.start == Some(0) {
                    self.done = true;
                } else {
                    self.wrapped = true;
                }
            }
            return;
        }
        self.done = next_cursor == 0
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
    progress: Vec<Progress>,
    /// Every node has been scanned; finished once the next step confirmed the deletes.
    scanned: bool,
}

struct NodeScan {
    node: Node,
    /// The cursor the next `SCAN` uses; 0 with `in_pass == false` means idle.
    cursor: u64,
    in_pass: bool,
    pass_started: Option<std::time::Instant>,
    /// Keys matched and not yet unlinked, with the label they count under and whether only a
    /// refill guard asked for them.
    pending: Vec<(Vec<u8>, Arc<str>, bool)>,
}

/// The sweep state: nodes with their cursors, the active windows and their compiled patterns.
pub struct Sweeper {
    nodes: Vec<NodeScan>,
    matcher: Matcher,
    by_text: HashMap<Arc<str>, PatternId>,
    /// Patterns some first-pass window still asks for (the rest only a refill guard holds).
    first_pass_patterns: usize,
    patterns: Vec<Option<PatternState>>,
    free_ids: Vec<PatternId>,
    windows: Vec<Window>,
    next_window: WindowId,
}

impl Sweeper {
    pub fn new(nodes: Vec<Node>) -> Sweeper {
        Sweeper {
            nodes: nodes
                .into_iter()
                .map(|node| NodeScan {
                    node,
                    cursor: 0,
                    in_pass: false,
                    pass_started: None,
                    pending: Vec::new(),
                })
                .collect(),
            matcher: Matcher::default(),
            by_text: HashMap::new(),
            first_pass_patterns: 0,
            patterns: Vec::new(),
            free_ids: Vec::new(),
            windows: Vec::new(),
            next_window: 1,
        }
    }

    /// Distinct patterns that a first-pass window asks for. The worker's claim cap counts these:
    /// a refill guard's patterns were first-pass patterns at most one guard delay and one pass
    /// earlier, so they are bounded by the same cap, and counting them would pause claims for
    /// patterns that no longer hold any outbox row back.
    pub fn first_pass_patterns(&self) -> usize {
        self.first_pass_patterns
    }

    pub fn is_busy(&self) -> bool {
        !self.windows.is_empty()
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
        let progress = self.nodes.iter().map(Progress::joining).collect();
        self.windows.push(Window {
            id,
            refill,
            pattern_ids,
            matched_at_join,
            progress,
            scanned: false,
        });
        Some(id)
    }

    /// Forgets every window (after a failure: their outbox rows were given back). Nodes start their
    /// next pass from the beginning.
    pub fn abandon_all(&mut self) {
        self.windows.clear();
        self.matcher = Matcher::default();
        self.by_text.clear();
        self.first_pass_patterns = 0;
        self.patterns.clear();
        self.free_ids.clear();
        for node in &mut self.nodes {
            node.cursor = 0;
            node.in_pass = false;
            node.pending.clear();
        }
    }

    /// Replaces the nodes (after a reconnect or a cluster topology change). Call after
    /// [`Sweeper::abandon_all`]: cursors of the old nodes mean nothing to the new ones.
    pub fn replace_nodes(&mut self, nodes: Vec<Node>) {
        *self = Sweeper {
            next_window: self.next_window,
            ..Sweeper::new(nodes)
        };
    }

    /// One round trip per node: unlink what the previous step matched, scan the next chunk.
    pub async fn step(&mut self) -> Result<StepReport, SweepError> {
        let match_glob = self.matcher.superset_glob();
        // Windows whose scan ended last step finish in this one: a cluster checks its topology.
        let windows_finishing = self.windows.iter().any(|window| window.scanned);
        let mut plans = Vec::with_capacity(self.nodes.len());
        for (index, node) in self.nodes.iter_mut().enumerate() {
            let needs_scan = self
                .windows
                .iter()
                .any(|window| !window.progress[index].done);
            let pending = std::mem::take(&mut node.pending);
            plans.push(NodePlan {
                groups: group_pending(pending, node.node.clustered),
                scan: needs_scan.then_some(node.cursor),
                verify: node.node.shard.is_some() && windows_finishing,
            });
        }
        let requests = self
            .nodes
            .iter()
            .zip(&plans)
            .map(|(node, plan)| run_plan(&node.node, plan, &match_glob));
        let results = futures::future::join_all(requests).await;

        let mut report = StepReport::default();
        // Windows whose scanning ended in an earlier step had all their matches in this step's
        // UNLINKs; if no node failed, those deletes are now confirmed.
        let mut outcomes = Vec::with_capacity(results.len());
        for (index, result) in results.into_iter().enumerate() {
            let node = &self.nodes[index].node;
            let fail = |source| SweepError {
                node: node.name.clone(),
                source,
            };
            let outcome = result.map_err(fail)?;
            if let Some(text) = &outcome.cluster_nodes {
                node.verify_shard(text).map_err(|detail| {
                    fail(redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "cluster topology changed during the sweep",
                        detail,
                    )))
                })?;
            }
            outcomes.push(outcome);
        }
        for (plan, outcome) in plans.iter().zip(&outcomes) {
            for (group, count) in &outcome.unlinked {
                let group = &plan.groups[*group];
                if group.refill {
                    report.refill_deleted += count;
                } else {
                    *report.deleted.entry(group.label.clone()).or_default() += count;
                }
            }
        }
        let finished_ids: Vec<WindowId> = self
            .windows
            .iter()
            .filter(|window| window.scanned)
            .map(|window| window.id)
            .collect();
        for id in finished_ids {
            if let Some(finished) = self.finish_window(id) {
                report.finished.push(finished);
            }
        }

        for (index, (plan, outcome)) in plans.iter().zip(outcomes).enumerate() {
            let Some((next_cursor, keys)) = outcome.scanned else {
                continue;
            };
            if plan.scan == Some(0) {
                report.passes_started += 1;
                self.nodes[index].pass_started = Some(std::time::Instant::now());
            }
            report.keys_scanned += keys.len() as u64;
            for key in keys {
                if let Some(pattern_id) = self.matcher.find(&key) {
                    if let Some(state) = self.patterns[pattern_id as usize].as_mut() {
                        state.matched += 1;
                        let refill_only = state.first_pass_refs == 0;
                        self.nodes[index]
                            .pending
                            .push((key, state.label.clone(), refill_only));
                    }
                }
            }
            let node = &mut self.nodes[index];
            node.cursor = next_cursor;
            node.in_pass = next_cursor != 0;
            if next_cursor == 0 {
                if let Some(started) = node.pass_started.take() {
                    report.pass_durations.push(started.elapsed());
                }
            }
            // Once per step, not per window: hundreds of windows can share a pass.
            let next_position = node.node.cursor_order.position(next_cursor);
            for window in &mut self.windows {
                window.progress[index].advance(next_cursor, next_position);
            }
            if next_cursor == 0 {
                // A pass ended: a good moment to let Redis filter by a longer shared prefix.
                self.matcher.recompute_positions();
            }
        }
        for window in &mut self.windows {
            if window.progress.iter().all(|progress| progress.done) {
                window.scanned = true;
            }
        }
        Ok(report)
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
}

struct PlanOutcome {
    /// (group index, keys removed)
    unlinked: Vec<(usize, u64)>,
    scanned: Option<(u64, Vec<Vec<u8>>)>,
    cluster_nodes: Option<String>,
}

async fn run_plan(
    node: &Node,
    plan: &NodePlan,
    match_glob: &[u8],
) -> Result<PlanOutcome, redis::RedisError> {
    let mut pipe = redis::pipe();
    if plan.verify {
        pipe.cmd("CLUSTER").arg("NODES");
    }
    let mut commands: Vec<usize> = Vec::new();
    for (group_index, group) in plan.groups.iter().enumerate() {
        for chunk in group.keys.chunks(UNLINK_CHUNK) {
            pipe.cmd("UNLINK").arg(chunk);
            commands.push(group_index);
        }
    }
    if let Some(cursor) = plan.scan {
        pipe.cmd("SCAN").arg(cursor);
        if match_glob != b"*" {
            pipe.arg("MATCH").arg(match_glob);
        }
        pipe.arg("COUNT").arg(SCAN_COUNT);
    }
    if commands.is_empty() && plan.scan.is_none() && !plan.verify {
        return Ok(PlanOutcome {
            unlinked: Vec::new(),
            scanned: None,
            cluster_nodes: None,
        });
    }
    let mut connection = node.connection.clone();
    let mut replies: Vec<redis::Value> = pipe.query_async(&mut connection).await?;
    // CLUSTER NODES went first in the pipeline.
    let cluster_nodes = match plan.verify {
        true if replies.is_empty() => {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "empty CLUSTER NODES reply",
            )))
        }
        true => Some(redis::from_redis_value(replies.remove(0))?),
        false => None,
    };
    let scanned = match plan.scan {
        Some(_) => {
            let reply = replies.pop().ok_or_else(|| {
                redis::RedisError::from((redis::ErrorKind::Client, "empty SCAN reply"))
            })?;
            let (cursor, keys): (u64, Vec<Vec<u8>>) = redis::from_redis_value(reply)?;
            Some((cursor, keys))
        }
        None => None,
    };
    let mut unlinked = Vec::with_capacity(commands.len());
    for (group_index, reply) in commands.into_iter().zip(replies) {
        let count: u64 = redis::from_redis_value(reply)?;
        unlinked.push((group_index, count));
    }
    Ok(PlanOutcome {
        unlinked,
        scanned,
        cluster_nodes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyspace::CursorOrder;

    const BUCKETS: CursorOrder = CursorOrder::ReversedBuckets;
    const PER_SLOT: CursorOrder = CursorOrder::SlotThenReversedBuckets;

    fn advance(progress: &mut Progress, next_cursor: u64, order: CursorOrder) {
        progress.advance(next_cursor, order.position(next_cursor));
    }

    fn joined_at(order: CursorOrder, cursor: u64) -> Progress {
        Progress {
            start: order.position(cursor),
            ..Progress::default()
        }
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
