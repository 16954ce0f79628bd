//! Finding a change's keys: the choice, window by window, between the index and the sweep.
//!
//! The worker hands a window of patterns to [`Finder::add_window`], steps the finder while it is
//! busy, and acknowledges the window's outbox rows once a step reports it finished: its keys are
//! confirmed gone. The finder gives each window to one of two ways of deleting its keys:
//!
//! - **the index** ([`IndexDeletes`], index mode, once every node's part is seeded and when each
//!   pattern lies under a tracked prefix): the keys are looked up in memory and unlinked;
//! - **the sweep** ([`Sweeper`]): in sweep mode, while the index is incomplete (start, a lost
//!   tracking connection), for a pattern outside the tracked prefixes, or for a window the index
//!   handed back (its barrier failed, the index was dropped).
//!
//! The refill guard differs by mode. With the index, keys announced under a cleared pattern within
//! the guard are deleted as they are announced ([`IndexDeletes`]); with the sweep, the finder
//! sweeps the patterns again once the guard has run out, riding along with a later pass.
//!
//! The index itself ([`Tracking`]) is the worker's: it outlives a finder, which lasts one
//! connection to Redis, and is lent to each call that may look keys up.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use tracing::{debug, info};

use crate::index::deletes::IndexDeletes;
use crate::index::tracking::Tracking;
use crate::redis_nodes::Node;
use crate::sweep::Sweeper;
use crate::window::{FinishedWindow, PatternSpec, StepError, StepReport, WindowId};

/// The worker's way to Redis on one connection: the sweep, and the index's deletes.
pub struct Finder {
    sweeper: Sweeper,
    index: IndexDeletes,
    next_id: WindowId,
    /// Sweeper's window ids of the windows it answers, to the finder's ids and their patterns
    /// (for the refill guard once they finish).
    swept: HashMap<WindowId, (WindowId, Vec<PatternSpec>)>,
    refill_guard: Duration,
    /// Sweep-mode refill guard: patterns to sweep again, each once its time has come.
    guard_passes: VecDeque<(Instant, Vec<PatternSpec>)>,
}

impl Finder {
    /// A finder over `nodes` (in index mode, the nodes the index is attached to).
    pub fn new(nodes: Vec<Node>, refill_guard: Duration) -> Finder {
        Finder {
            sweeper: Sweeper::new(nodes.clone()),
            index: IndexDeletes::new(nodes, refill_guard),
            next_id: 1,
            swept: HashMap::new(),
            refill_guard,
            guard_passes: VecDeque::new(),
        }
    }

    /// Patterns of windows in progress, for the worker's cap on claims.
    pub fn first_pass_patterns(&self) -> usize {
        self.sweeper.first_pass_patterns() + self.index.patterns()
    }

    pub fn is_busy(&self) -> bool {
        self.sweeper.is_busy() || self.index.is_busy()
    }

    /// Adds a window of patterns to clear; `None` when it has none. `index` is the worker's index
    /// in index mode: the window is answered from it when it can.
    pub fn add_window(
        &mut self,
        patterns: Vec<PatternSpec>,
        index: Option<&Tracking>,
    ) -> Option<WindowId> {
        if patterns.is_empty() {
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        if index.is_some_and(|tracking| IndexDeletes::can_answer(tracking, &patterns)) {
            self.index.add_window(id, patterns);
        } else {
            let swept = self.sweeper.add_window(&patterns, false)?;
            debug!(window = id, index = index.is_some(), "window swept");
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

    /// Waits for the next reply of the sweep or the index and books it (`index`: the worker's
    /// index in index mode). Cancel-safe: its only waits are for replies to requests already sent.
    pub async fn step(&mut self, index: Option<&Tracking>) -> Result<StepReport, StepError> {
        self.index.send_barrier(index);
        self.sweep_unanswered();
        let sweeping = self.sweeper.is_busy();
        let awaits_index = self.index.awaits_replies();
        let mut report = tokio::select! {
            stepped = self.sweeper.step(), if sweeping => self.book_sweep(stepped?),
            Some(reply) = self.index.next_reply(), if awaits_index => {
                let mut report = StepReport::default();
                self.index.book(reply, index, &mut report)?;
                report
            }
            else => {
                tokio::task::yield_now().await;
                StepReport::default()
            }
        };
        self.index.book_ready(index, &mut report)?;
        self.index.send_barrier(index);
        self.sweep_unanswered();
        Ok(report)
    }

    /// Sweeps the windows the index handed back.
    fn sweep_unanswered(&mut self) {
        for (id, patterns) in self.index.take_unanswered() {
            if let Some(swept) = self.sweeper.add_window(&patterns, false) {
                self.swept.insert(swept, (id, patterns));
            }
        }
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
}
