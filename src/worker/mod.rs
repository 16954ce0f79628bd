//! The daemon's loop: wake → claim → render a window → find and delete its keys → ack, until
//! shutdown.
//!
//! A listener task ([`source`]) holds the `LISTEN` connection (reconnecting forever) and wakes the
//! loop on every notification and after every reconnect. The loop claims what is pending into a
//! window, hands its patterns to the [`Finder`] (the index or the rolling sweep), steps the finder
//! reply by reply, and acknowledges each window once Redis confirmed its deletes. The Postgres
//! round trips (claims, acknowledgements) run alongside the Redis steps, not between them. While a
//! sweep runs, new changes keep being claimed and join it, so a burst costs about one pass. A
//! failed Redis step gives every claimed row back to the outbox; nothing is acknowledged that
//! Redis did not confirm. When to claim and when to stop is [`pacing`]'s to say.

mod pacing;
mod source;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::ExponentialBackoff;
use futures::FutureExt;
use tokio::sync::{watch, Notify};
use tokio::time::Instant as TokioInstant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::pacing::{grace_over, ClaimPacing, StopDeadline};
pub(crate) use self::source::{
    mode_of_application_name, LISTENER_APPLICATION_NAME, LISTENER_APPLICATION_NAME_LIKE,
};
use self::source::{Listener, PostgresBack};
use crate::backoff::{reconnect_delays, RECONNECT_MAX};
use crate::finder::Finder;
use crate::index::tracking::{Tracking, TrackingError};
use crate::outbox::{Acked, Claim, DeadLetter, Outbox, OutboxError};
use crate::postgres::ConnectError;
use crate::redis_nodes::{NodeError, RedisTarget, Switches};
use crate::rules::{Change, RuleSet};
use crate::settings::Mode;
use crate::settings::Settings;
use crate::telemetry::{names, Health, Systemd};
use crate::window::{PatternSpec, StepError, StepReport, WindowId};

/// First-pass patterns being cleared at once. Claims pause above it, so memory does not grow with
/// the backlog (a few hundred bytes a pattern with its matcher entry and window lists). The refill
/// guard's patterns are not counted: they come from windows already finished, at most one guard
/// delay and one pass earlier, so the claim rate bounds them too.
///
/// A sweep drains a backlog at about this many patterns per pass: at 30,000, a backlog of 200,000
/// single-row changes (two to three new patterns each) drained at 10,000–18,000 changes/s at 1M
/// keys. At 100,000 the first pass took 17 of its 41 windows and the rest waited for it (a
/// second and a half more); at 300,000 all of them join the first pass, which costs the worker
/// about 15 MB more at its peak (VmHWM 112 MB against 97 MB). A sustained load never comes near
/// it (5,000 row changes/s bring a few thousand patterns per pass), so only a backlog's drain uses
/// the room, and its memory.
pub const MAX_ACTIVE_PATTERNS: usize = 300_000;
/// At stop, giving the claimed rows back (a `ROLLBACK` per epoch) may wait this long; a server that
/// does not answer rolls them back anyway when the connection closes as the process exits.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Postgres(#[from] ConnectError),
    #[error(transparent)]
    Redis(#[from] NodeError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// `--mode index` on a server that cannot announce keys.
    #[error("--mode index: {0}; use --mode auto or sweep with this server")]
    IndexRefused(TrackingError),
}

/// Runs the worker until `shutdown` is cancelled, then finishes the batch in flight; `rules` may
/// be replaced while it runs (SIGHUP), `health` is shared with `/healthz` and the Redis probe.
pub(crate) async fn run_with_rules(
    settings: Settings,
    rules: watch::Receiver<Arc<RuleSet>>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let pg = settings.postgres_target("cache-invalidator")?;
    let redis = settings.redis_target()?;
    info!(
        postgres = pg.redacted(),
        redis = redis.redacted(),
        refill_guard_ms = settings.refill_guard.as_millis() as u64,
        mode = %settings.mode,
        "starting"
    );
    let wake = Arc::new(Notify::new());
    let back = Arc::new(PostgresBack::default());
    let listener_stop = CancellationToken::new();
    let listener = tokio::spawn(
        Listener {
            pg: pg.with_application_name(LISTENER_APPLICATION_NAME),
            wake: wake.clone(),
            health: health.clone(),
            back: back.clone(),
            stop: listener_stop.clone(),
        }
        .run(),
    );
    let mut worker = Worker {
        rules,
        outbox: Outbox::new(pg).with_claim_timeout(settings.claim_timeout),
        setup: FinderSetup {
            redis,
            mode: settings.mode,
            index_max_keys: settings.index_max_keys,
            redis_timeout: settings.redis_timeout,
            refill_guard: settings.refill_guard,
        },
        finder: None,
        tracking: None,
        jobs: HashMap::new(),
        finished: Vec::new(),
        unrendered: None,
        health,
        wake,
        back,
        systemd: Systemd::from_env(),
        redis_retry: RedisRetry {
            failures: reconnect_delays(),
            at: None,
            switches: None,
        },
    };
    let claims = ClaimPacing::new(settings.poll_interval);
    let result = worker.run(claims, shutdown).await;
    listener_stop.cancel();
    let _ = listener.await;
    result
}

/// One change of a window, kept for its debug line.
struct ChangeNote {
    outbox_id: i64,
    table: String,
    op: String,
    ids: String,
    users: String,
    /// Indexes into the window's patterns.
    patterns: Vec<usize>,
}

/// A window being cleared (by the index or the sweep), and what to do when it finishes.
struct Job {
    epoch: u64,
    /// Seconds from each usable row's capture to its claim (Postgres' clock); with the time since
    /// `started`, its commit-to-delete latency.
    ages_at_claim: Vec<f64>,
    dead: Vec<DeadLetter>,
    /// Changed rows per table, for the changes metric.
    rows_by_table: HashMap<String, u64>,
    changes: Vec<ChangeNote>,
    patterns: Vec<PatternSpec>,
    started: Instant,
}

impl Job {
    /// Renders claimed rows into a window's patterns; unusable rows are set aside as dead
    /// letters.
    fn render(claim: &Claim, rules: &RuleSet) -> Job {
        let mut job = Job {
            epoch: claim.epoch,
            ages_at_claim: Vec::with_capacity(claim.rows.len()),
            dead: Vec::new(),
            rows_by_table: HashMap::new(),
            changes: Vec::new(),
            patterns: Vec::new(),
            started: Instant::now(),
        };
        let mut patterns = WindowPatterns::default();
        // The per-change lines are debug output: five strings a change, built only when they are
        // printed (a backlog of 200,000 changes spent a visible share of its CPU on them).
        let notes = tracing::enabled!(tracing::Level::DEBUG);
        for row in &claim.rows {
            let change = Change {
                table: &row.table_name,
                operation: &row.op,
                rows: row.rows.as_ref(),
            };
            let expanded = match notes {
                true => rules.expand(&change),
                false => rules.patterns(&change),
            };
            let expansion = match expanded {
                Ok(expansion) => expansion,
                Err(error) => {
                    warn!(
                        outbox_id = row.id,
                        table = %row.table_name,
                        op = %row.op,
                        %error,
                        "unusable outbox row: moved to dead letters"
                    );
                    job.dead.push(DeadLetter {
                        row: row.clone(),
                        error: error.to_string(),
                    });
                    continue;
                }
            };
            let indexes = patterns.intern(&row.table_name, expansion.patterns);
            let changed_rows = crate::rules::changed_rows(row.rows.as_ref());
            match job.rows_by_table.get_mut(&row.table_name) {
                Some(count) => *count += changed_rows,
                None => {
                    job.rows_by_table
                        .insert(row.table_name.clone(), changed_rows);
                }
            }
            job.ages_at_claim.push(row.age_at_claim);
            if notes {
                job.changes.push(ChangeNote {
                    outbox_id: row.id,
                    table: row.table_name.clone(),
                    op: row.op.clone(),
                    ids: join(&expansion.ids),
                    users: join(&expansion.owners),
                    patterns: indexes,
                });
            }
        }
        job.patterns = patterns.specs;
        job
    }

    /// The changed rows the window's outbox rows stand for.
    fn changed_rows(&self) -> u64 {
        self.rows_by_table.values().sum()
    }
}

/// A window's distinct patterns, each once however many of its changes name it, labelled by the
/// table of the first change that did.
#[derive(Default)]
struct WindowPatterns {
    specs: Vec<PatternSpec>,
    index_of: HashMap<Arc<str>, usize>,
    labels: HashMap<String, Arc<str>>,
}

impl WindowPatterns {
    /// Adds a change's patterns; returns their indexes in the window.
    fn intern(&mut self, table: &str, patterns: BTreeSet<String>) -> Vec<usize> {
        let label = match self.labels.get(table) {
            Some(label) => label.clone(),
            None => {
                let label: Arc<str> = Arc::from(table);
                self.labels.insert(table.to_owned(), label.clone());
                label
            }
        };
        let mut indexes = Vec::with_capacity(patterns.len());
        for pattern in patterns {
            let index = match self.index_of.get(pattern.as_str()) {
                Some(&index) => index,
                None => {
                    let pattern: Arc<str> = Arc::from(pattern);
                    let index = self.specs.len();
                    self.index_of.insert(pattern.clone(), index);
                    self.specs.push(PatternSpec {
                        pattern,
                        label: label.clone(),
                    });
                    index
                }
            };
            indexes.push(index);
        }
        indexes
    }
}

/// What a new [`Finder`] is made from each time Redis is connected.
struct FinderSetup {
    redis: RedisTarget,
    /// The mode asked for; `auto` becomes `sweep` for good once a server refused tracking, and
    /// any mode once the index passed its memory bound.
    mode: Mode,
    index_max_keys: usize,
    redis_timeout: Duration,
    refill_guard: Duration,
}

/// Pacing of Redis reconnects after failed steps.
struct RedisRetry {
    /// Delays between failed steps, reset by a step that worked: a Redis that fails every
    /// command at once (loading its dump, out of memory) is not hammered, nor the outbox claimed,
    /// in a tight loop.
    failures: ExponentialBackoff,
    /// When the next connection attempt after a failed step may start.
    at: Option<Instant>,
    /// Behind Sentinel: a new master or a replica down announced since the worker connected.
    switches: Option<Switches>,
}

/// Returns once the sentinels announced something not seen yet; never without Sentinel.
async fn next_switch(switches: Option<&Switches>) {
    match switches {
        Some(switches) => switches.announcement().await,
        None => std::future::pending().await,
    }
}

struct Worker {
    rules: watch::Receiver<Arc<RuleSet>>,
    outbox: Outbox,
    setup: FinderSetup,
    /// Redis, while connected: a finder lasts one connection.
    finder: Option<Finder>,
    /// The index, in index mode: it outlives a connection (attached to the nodes of each, where a
    /// node whose tracking connection survived keeps its part) and is lent to the finder.
    tracking: Option<Tracking>,
    jobs: HashMap<WindowId, Job>,
    /// Windows whose keys are confirmed gone, waiting for their outbox rows to be deleted.
    finished: Vec<(Job, Vec<u64>)>,
    /// A full claim of index mode (a backlog waits), rendered during the next round once the next
    /// claim is on its way, and when it was claimed: Postgres sat idle while each was rendered.
    unrendered: Option<(Claim, Instant)>,
    health: Arc<Health>,
    wake: Arc<Notify>,
    /// Word from and to the LISTEN connection that Postgres is back.
    back: Arc<PostgresBack>,
    systemd: Systemd,
    redis_retry: RedisRetry,
}

impl Worker {
    async fn run(
        &mut self,
        mut claims: ClaimPacing,
        shutdown: CancellationToken,
    ) -> Result<(), RunError> {
        let mut stop = StopDeadline::default();
        // Configuration loaded, loop running: a backlog or a server that is down is the loop's
        // work, not a reason to keep systemd waiting.
        self.systemd.ready();
        loop {
            // Whatever the servers do: the watchdog watches the loop, not them.
            self.systemd.tick();
            self.report_mode();
            let now = TokioInstant::now();
            if shutdown.is_cancelled() && stop.begin(now) {
                self.begin_stop();
            }
            let in_flight =
                !self.jobs.is_empty() || !self.finished.is_empty() || self.unrendered.is_some();
            if stop.reached(now, in_flight) {
                return self.release_and_stop(in_flight).await;
            }
            if self.wake.notified().now_or_never().is_some() {
                claims.wake();
            }
            if self.back.listener.notified().now_or_never().is_some() {
                claims.retry_now();
            }
            claims.tick(now, self.recheck_due_at());
            if self.finder.is_none() && !self.connect_redis(&shutdown).await? {
                continue;
            }
            if self.left_a_replaced_master().await {
                continue;
            }
            let room = self
                .finder
                .as_ref()
                .is_some_and(|f| f.first_pass_patterns() < MAX_ACTIVE_PATTERNS);
            let busy = self.finder.as_ref().is_some_and(Finder::is_busy);
            let claim_now = claims.take(now, busy, room && !stop.is_stopping());
            if let Some(finder) = self.finder.as_mut() {
                finder.start_due_guards();
            }
            let busy = self.finder.as_ref().is_some_and(Finder::is_busy);
            if claim_now || busy || !self.finished.is_empty() || self.unrendered.is_some() {
                let sweeping = !self.tracking.as_ref().is_some_and(Tracking::is_complete);
                let claim = claim_now.then(|| claims.limit(sweeping));
                match self.round(claim, busy, &shutdown, &stop).await {
                    Some(outcome) => self.book_round(outcome, &mut claims).await?,
                    // Abandoned half done (a step's matches may not have been unlinked), nothing
                    // in flight may be acknowledged: the loop's top gives it all back and stops.
                    None => stop.abandon(TokioInstant::now()),
                }
                continue;
            }
            if claims.wants_to_claim() && !stop.is_stopping() {
                // Let the connections' tasks run before trying again.
                tokio::task::yield_now().await;
                continue;
            }
            self.idle(&mut claims, &stop, &shutdown).await;
        }
    }

    fn begin_stop(&mut self) {
        self.systemd.stopping();
        if let Some(finder) = self.finder.as_mut() {
            finder.clear_guards();
        }
        info!(
            windows = self.jobs.len(),
            "stopping: finishing the batch in flight"
        );
    }

    /// Books what a round brought back: acknowledgements, Redis steps, the claim.
    async fn book_round(
        &mut self,
        (acked, claim, steps, rendered): RoundOutcome,
        claims: &mut ClaimPacing,
    ) -> Result<(), RunError> {
        for (job, keys_per_pattern, result) in acked {
            self.acknowledged(job, &keys_per_pattern, result);
        }
        if let Some((job, rows)) = rendered {
            claims.sized(rows, job.changed_rows());
            self.start_job(job);
        }
        if let Some(error) = self.book_steps(steps) {
            // Every epoch is rolled back, the claim just made included.
            self.redis_failed(error).await;
            claims.wake();
            return Ok(());
        }
        match claim {
            None => {}
            Some(Ok(claim)) => {
                if claims.claimed(TokioInstant::now(), claim.full, claim.rows.is_empty()) {
                    info!("claiming from the outbox works again");
                    self.back.claims.notify_one();
                }
                // Only where the index answers: its claims are of `CLAIM_LIMIT` rows, while a
                // sweep's hold thousands, and a second one held meanwhile took a debug build's
                // worker past 100 MB on a 200,000-row statement (the sweep drained no faster).
                let index_answers = self.tracking.as_ref().is_some_and(Tracking::is_complete);
                if claim.full && index_answers {
                    self.unrendered = Some((claim, Instant::now()));
                } else if !claim.rows.is_empty() {
                    let (rows, changed) = self.start_window(claim);
                    claims.sized(rows, changed);
                }
            }
            Some(Err(error)) if error.is_permanent() => return Err(error.into()),
            Some(Err(error)) => {
                let delay = claims.failed(TokioInstant::now());
                warn!(%error, retry_in_ms = delay.as_millis() as u64, "claiming from the outbox failed");
            }
        }
        Ok(())
    }

    /// Nothing to do now: waits for a notification, the LISTEN connection's return, the next
    /// poll, a claim retry, a recheck or refill guard falling due, or the stop.
    async fn idle(
        &mut self,
        claims: &mut ClaimPacing,
        stop: &StopDeadline,
        shutdown: &CancellationToken,
    ) {
        let guard_due = self
            .finder
            .as_ref()
            .and_then(Finder::next_guard_due)
            .map(TokioInstant::from_std);
        let wake_at = claims.next_wake(self.recheck_due_at(), guard_due);
        tokio::select! {
            _ = self.wake.notified() => claims.wake(),
            _ = self.back.listener.notified() => claims.retry_now(),
            _ = tokio::time::sleep_until(wake_at) => {}
            _ = shutdown.cancelled(), if !stop.is_stopping() => {}
            // Idle behind Sentinel: move to a new master before the next change needs it.
            _ = next_switch(self.redis_retry.switches.as_ref()) => {}
        }
    }

    /// The outbox's next recheck of late-committing rows, on tokio's clock.
    fn recheck_due_at(&self) -> Option<TokioInstant> {
        self.outbox.recheck_due_at().map(TokioInstant::from_std)
    }

    /// While connected, mode metrics and health follow the index: its memory bound, its
    /// completeness.
    fn report_mode(&mut self) {
        if self.finder.is_none() {
            return;
        }
        self.check_memory_bound();
        if let Some(tracking) = self.tracking.as_ref() {
            self.health.set_index(Some(tracking.is_complete()));
        }
    }

    /// Past the memory bound the index is dropped for good, with one warning: sweeping needs no
    /// memory per key, running out of memory would stop invalidation altogether.
    fn check_memory_bound(&mut self) {
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
            self.setup.mode = Mode::Sweep;
            self.set_mode_gauge(false);
        }
    }

    /// Gives every claim back and stops.
    async fn release_and_stop(&mut self, in_flight: bool) -> Result<(), RunError> {
        if in_flight {
            warn!("stop deadline reached: giving unfinished changes back to the outbox");
        }
        if tokio::time::timeout(RELEASE_TIMEOUT, self.outbox.release_all())
            .await
            .is_err()
        {
            warn!("postgres did not answer the rollback: the claims end with the connections");
        }
        self.finder = None;
        // The index's tracking tasks end with it.
        self.tracking = None;
        info!("stopped");
        Ok(())
    }

    /// One round: the Postgres side (acknowledge finished windows, claim new changes) next to
    /// Redis steps rather than between them: a round trip to a loaded Postgres takes
    /// milliseconds, and Redis would sit idle for each of them, ~40 a second under sustained
    /// load. `None` when the stop's grace ran out first.
    async fn round(
        &mut self,
        claim: Option<i64>,
        busy: bool,
        shutdown: &CancellationToken,
        stop: &StopDeadline,
    ) -> Option<RoundOutcome> {
        let acks = std::mem::take(&mut self.finished);
        // The rules are read only for a claim to render: most rounds have none.
        let unrendered = self
            .unrendered
            .take()
            .map(|(claim, claimed_at)| (claim, claimed_at, self.rules.borrow().clone()));
        let outbox = &mut self.outbox;
        let postgres = async move {
            let mut acked = Vec::with_capacity(acks.len());
            for (job, keys_per_pattern) in acks {
                let result = outbox.ack(job.epoch, &job.dead).await;
                acked.push((job, keys_per_pattern, result));
            }
            let claim = match claim {
                Some(limit) => Some(outbox.claim(limit).await),
                None => None,
            };
            (acked, claim)
        };
        let mut finder = self.finder.as_mut().filter(|_| busy);
        let index = self.tracking.as_ref();
        // Redis steps go on for as long as the Postgres side takes (at least one step).
        let work = async {
            let mut postgres = std::pin::pin!(postgres);
            let mut postgres_outcome = None;
            let mut steps: Vec<StepResult> = Vec::new();
            // The last full claim is rendered once this round's Postgres work is on its way (sent
            // on the first poll, written while the worker yields).
            let rendered = match unrendered {
                Some((claim, claimed_at, rules)) => {
                    if let std::task::Poll::Ready(outcome) = futures::poll!(&mut postgres) {
                        postgres_outcome = Some(outcome);
                    }
                    tokio::task::yield_now().await;
                    let mut job = Job::render(&claim, &rules);
                    job.started = claimed_at;
                    Some((job, claim.rows.len()))
                }
                None => None,
            };
            loop {
                // Only while there is work in flight: a step with nothing to do returns at once,
                // and looping on it would starve Postgres' own tasks.
                let stepping = finder.as_deref().is_some_and(Finder::is_busy)
                    && !steps.iter().any(Result::is_err);
                if !stepping || !steps.is_empty() {
                    if let Some(outcome) = postgres_outcome.take() {
                        return (outcome, steps, rendered);
                    }
                }
                tokio::select! {
                    outcome = &mut postgres, if postgres_outcome.is_none() => {
                        postgres_outcome = Some(outcome);
                    }
                    // Cancel-safe: a step only waits for a reply already on its way.
                    stepped = step_of(&mut finder, index), if stepping => steps.push(stepped),
                }
            }
        };
        // A round trip may not outlast the grace period, even one that began before the stop was
        // asked for.
        tokio::select! {
            ((acked, claim), steps, rendered) = work => Some((acked, claim, steps, rendered)),
            _ = grace_over(shutdown, stop.deadline()) => None,
        }
    }

    /// Books the steps of a round; the error of one that failed, if any.
    fn book_steps(&mut self, steps: Vec<StepResult>) -> Option<StepError> {
        let mut failure = None;
        for stepped in steps {
            match stepped {
                Ok(report) => self.stepped(report),
                Err(error) => failure = Some(error),
            }
        }
        failure
    }

    /// Behind Sentinel, after the sentinels announced a new master or a replica down: gives the
    /// claimed changes back and drops the connection (the old master may still answer, cut off
    /// from the sentinels; the replicas to wait for may have changed), to connect again at once.
    async fn left_a_replaced_master(&mut self) -> bool {
        let Some(switched) = self.redis_retry.switches.as_ref().filter(|s| s.switched()) else {
            return false;
        };
        let announced = switched.announced();
        self.redis_failed(announced).await;
        // The sentinels name the master to use now: no backoff before asking them.
        self.redis_retry.at = None;
        true
    }

    /// Connects to Redis, retrying with backoff. `Ok(false)` when shutdown interrupted it.
    async fn connect_redis(&mut self, shutdown: &CancellationToken) -> Result<bool, RunError> {
        if let Some(at) = self.redis_retry.at.take() {
            let backoff = tokio::time::sleep_until(tokio::time::Instant::from_std(at));
            tokio::select! {
                _ = self.systemd.alive_while(backoff) => {}
                // The probe saw Redis answer again: no reason to wait out the backoff.
                _ = self.health.redis_answers_again() => {}
                _ = shutdown.cancelled() => return Ok(false),
            }
        }
        let mut delays = reconnect_delays();
        if self.redis_retry.switches.is_none() {
            self.redis_retry.switches = self.setup.redis.switches();
        }
        loop {
            // An announcement from here on is one this connection may not have seen.
            if let Some(switches) = self.redis_retry.switches.as_mut() {
                switches.mark_seen();
            }
            match self.systemd.alive_while(self.setup.redis.connect()).await {
                Ok(nodes) => {
                    info!(
                        nodes = nodes.len(),
                        redis = self.setup.redis.redacted(),
                        "connected to redis"
                    );
                    self.track(&nodes).await?;
                    // A finder starts afresh: a sweep's cursors on the old connections mean
                    // nothing now.
                    self.finder = Some(Finder::new(nodes, self.setup.refill_guard));
                    self.health.set_redis(true);
                    return Ok(true);
                }
                Err(error) if error.is_permanent() => return Err(error.into()),
                Err(error) => {
                    let delay = delays.next().unwrap_or(RECONNECT_MAX);
                    warn!(%error, retry_in_ms = delay.as_millis() as u64, "redis connection failed");
                    tokio::select! {
                        _ = self.systemd.alive_while(tokio::time::sleep(delay)) => {}
                        // The probe saw Redis answer again: retry now, not after a backoff that
                        // grew during a long outage.
                        _ = self.health.redis_answers_again() => {}
                        // The sentinels promoted a new master: ask for it now.
                        _ = next_switch(self.redis_retry.switches.as_ref()) => {}
                        // The loop's top gives any claims back, bounded by RELEASE_TIMEOUT.
                        _ = shutdown.cancelled() => return Ok(false),
                    }
                }
            }
        }
    }

    /// In index mode, attaches the index to `nodes` (its parts seed in the background); in sweep
    /// mode there is none. In `auto`, a server that refuses tracking means sweep mode for good,
    /// said once; with `--mode index` it is an error.
    async fn track(&mut self, nodes: &[crate::redis_nodes::Node]) -> Result<(), RunError> {
        if self.setup.mode == Mode::Sweep {
            self.set_mode_gauge(false);
            return Ok(());
        }
        let prefixes = self.rules.borrow().tracking_prefixes();
        let (max_keys, timeout) = (self.setup.index_max_keys, self.setup.redis_timeout);
        let wake = self.wake.clone();
        let tracking = self
            .tracking
            .get_or_insert_with(|| Tracking::new(prefixes, max_keys, timeout, wake));
        // Connecting and turning tracking on may take a connect timeout per node: the watchdog
        // must not see a stuck loop in it.
        let attached = self.systemd.alive_while(tracking.attach(nodes)).await;
        if attached.is_ok() {
            info!(
                keys = tracking.keys(),
                complete = tracking.is_complete(),
                "index mode: changes are swept until the index is seeded"
            );
            self.set_mode_gauge(true);
            return Ok(());
        }
        self.tracking = None;
        self.set_mode_gauge(false);
        match attached {
            Err(error @ TrackingError::Refused { .. }) if self.setup.mode == Mode::Index => {
                Err(RunError::IndexRefused(error))
            }
            Err(error @ TrackingError::Refused { .. }) => {
                warn!(%error, "index mode unavailable: sweep mode (one SCAN pass per window of changes) from now on");
                self.setup.mode = Mode::Sweep;
                Ok(())
            }
            // A connection that failed: sweep for now, track on the next connection.
            Err(error) => {
                warn!(%error, "index: tracking failed; sweeping until the next connection");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    fn set_mode_gauge(&self, index: bool) {
        metrics::gauge!(names::MODE, "mode" => "index").set(if index { 1.0 } else { 0.0 });
        metrics::gauge!(names::MODE, "mode" => "sweep").set(if index { 0.0 } else { 1.0 });
        self.health.set_index(index.then_some(false));
    }

    /// Renders claimed rows into a window and hands it to the finder. Returns the outbox rows and
    /// the changed rows they stand for.
    fn start_window(&mut self, claim: Claim) -> (usize, u64) {
        let rules = self.rules.borrow().clone();
        let job = Job::render(&claim, &rules);
        let sizes = (claim.rows.len(), job.changed_rows());
        self.start_job(job);
        sizes
    }

    /// Hands a rendered window to the finder.
    fn start_job(&mut self, job: Job) {
        // Before the finder chooses: past its memory bound the index answers no window.
        self.check_memory_bound();
        let index = self.tracking.as_ref();
        let window = self
            .finder
            .as_mut()
            .and_then(|finder| finder.add_window(job.patterns.clone(), index));
        match window {
            Some(id) => {
                self.jobs.insert(id, job);
            }
            // Nothing to clear (only dead rows): acknowledge next.
            None => self.finished.push((job, Vec::new())),
        }
    }

    /// Books a step that worked: its finished windows wait for their acknowledgement.
    fn stepped(&mut self, report: StepReport) {
        self.redis_retry.failures = reconnect_delays();
        record_step(&report);
        for pass in &report.pass_durations {
            self.outbox.pace_to_pass(*pass);
            // Its own target, so a pass per second can be followed without every change's line:
            // RUST_LOG=cache_invalidator=info,cache_invalidator::pass=debug
            debug!(
                target: "cache_invalidator::pass",
                duration_ms = pass.as_millis() as u64,
                windows = self.jobs.len(),
                patterns = self.finder.as_ref().map_or(0, Finder::first_pass_patterns),
                "sweep pass finished"
            );
        }
        for finished in report.finished {
            if let Some(job) = self.jobs.remove(&finished.id) {
                self.finished.push((job, finished.keys_per_pattern));
            }
        }
    }

    /// A step failed (in either mode), or the sentinels switched the master: every claimed row
    /// goes back to the outbox and Redis is connected again later (the index stays).
    async fn redis_failed(&mut self, error: impl std::fmt::Display) {
        let delay = self.redis_retry.failures.next().unwrap_or(RECONNECT_MAX);
        self.redis_retry.at = Some(Instant::now() + delay);
        warn!(%error, windows = self.jobs.len(), retry_in_ms = delay.as_millis() as u64, "redis failed: giving the claimed changes back to the outbox");
        metrics::counter!(names::RECONNECTS, "side" => "redis").increment(1);
        self.health.set_redis(false);
        self.outbox.release_all().await;
        self.jobs.clear();
        self.finished.clear();
        self.unrendered = None;
        self.finder = None;
    }

    /// Books a finished window once Postgres answered its acknowledgement.
    fn acknowledged(
        &mut self,
        job: Job,
        keys_per_pattern: &[u64],
        result: Result<Acked, OutboxError>,
    ) {
        let keys: u64 = keys_per_pattern.iter().sum();
        let epoch = job.epoch;
        match result {
            Ok(acked) if !acked.lost_claim => {
                let since_claim = job.started.elapsed().as_secs_f64();
                for age in &job.ages_at_claim {
                    metrics::histogram!(names::COMMIT_TO_DELETE).record(age + since_claim);
                }
                for (table, rows) in &job.rows_by_table {
                    metrics::counter!(names::CHANGES, "table" => table.clone()).increment(*rows);
                }
                // The epoch committed. Its later claims skipped rows below its highest id that
                // committed late (concurrent writers): their notification was spent on those
                // claims, so claim again now instead of waiting for the poll (seconds later).
                if !self.outbox.holds(epoch) {
                    self.wake.notify_one();
                }
            }
            Ok(_) => {
                warn!(epoch, "claim lost before acknowledging (postgres connection dropped): the changes will be swept again");
                // Their rows are pending again: claim them now rather than at the next poll.
                self.wake.notify_one();
            }
            Err(error) => {
                warn!(%error, "acknowledging failed: the changes will be swept again");
                self.wake.notify_one();
            }
        }
        for note in &job.changes {
            let keys: u64 = note
                .patterns
                .iter()
                .filter_map(|&index| keys_per_pattern.get(index))
                .sum();
            debug!(
                table = %note.table,
                id = %note.ids,
                op = %note.op,
                users = %note.users,
                outbox_id = note.outbox_id,
                keys,
                "cache invalidated: {keys} keys for {}",
                if note.users.is_empty() { "no user".to_owned() } else { format!("user {}", note.users) }
            );
        }
        info!(
            changes = job.rows_by_table.values().sum::<u64>(),
            dead_letters = job.dead.len(),
            patterns = job.patterns.len(),
            keys,
            duration_ms = job.started.elapsed().as_millis() as u64,
            "batch invalidated"
        );
    }
}

/// One step of the finder, or never when there is none to step (for `select!`).
async fn step_of(
    finder: &mut Option<&mut Finder>,
    index: Option<&Tracking>,
) -> Result<StepReport, StepError> {
    match finder {
        Some(finder) => finder.step(index).await,
        None => std::future::pending().await,
    }
}

/// A finished window with the keys its patterns matched, and Postgres' answer to its ack.
type AckedJob = (Job, Vec<u64>, Result<Acked, OutboxError>);
type StepResult = Result<StepReport, StepError>;
/// What a round brought back: acknowledged windows, the claim if one was made, the Redis steps,
/// and the last round's full claim rendered (with its count of outbox rows).
type RoundOutcome = (
    Vec<AckedJob>,
    Option<Result<Claim, OutboxError>>,
    Vec<StepResult>,
    Option<(Job, usize)>,
);

fn record_step(report: &StepReport) {
    for (table, keys) in &report.deleted {
        metrics::counter!(names::KEYS_DELETED, "table" => table.to_string()).increment(*keys);
    }
    if report.refill_deleted > 0 {
        metrics::counter!(names::REFILL_KEYS_DELETED).increment(report.refill_deleted);
    }
    if !report.pass_durations.is_empty() {
        metrics::counter!(names::SWEEPS).increment(report.pass_durations.len() as u64);
    }
    for duration in &report.pass_durations {
        metrics::histogram!(names::SWEEP_DURATION).record(duration.as_secs_f64());
    }
}

fn join(values: &BTreeSet<String>) -> String {
    values.iter().cloned().collect::<Vec<_>>().join(",")
}
