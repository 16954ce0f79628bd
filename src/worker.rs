//! The daemon's loop: wake → claim → render a window → sweep → ack, until shutdown.
//!
//! A listener task holds the `LISTEN` connection (reconnecting forever) and wakes the loop on every
//! notification and after every reconnect. The loop claims what is pending into a window, adds its
//! patterns to the rolling sweep, steps the sweep reply by reply, and acknowledges each window once
//! Redis confirmed its deletes. The Postgres round trips (claims, acknowledgements) run alongside
//! the Redis steps, not between them. While a sweep runs, new changes keep being claimed and join
//! it, so a burst costs about one pass. A failed Redis step gives every claimed row back to the
//! outbox; nothing is acknowledged that Redis did not confirm.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::FutureExt;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::keyspace::{KeyspaceError, RedisTarget};
use crate::outbox::{self, Acked, Claim, Outbox, OutboxError, CLAIM_LIMIT};
use crate::postgres::{describe, ConnectError, PgTarget};
use crate::rules::{Change, RuleSet};
use crate::schema::CHANNEL;
use crate::settings::Settings;
use crate::sweep::{PatternSpec, StepReport, SweepError, Sweeper, WindowId};
use crate::telemetry::{names, Health, Systemd};

/// `application_name` of the LISTEN connection: `status` counts workers by it.
pub const LISTENER_APPLICATION_NAME: &str = "cache-invalidator worker";

/// Graceful stop: the batch in flight gets this long to finish before its rows are given back.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);
/// First-pass patterns being swept at once. Claims pause above it, so memory does not grow with the
/// backlog (a few hundred bytes a pattern with its matcher entry and window lists: a few MB). The
/// refill guard's patterns are not counted: they come from windows already finished, at most one
/// guard delay and one pass earlier, so the claim rate bounds them too.
pub const MAX_ACTIVE_PATTERNS: usize = 30_000;
/// While a sweep runs, claims are at least this far apart (unless the last one was full). A window
/// joining the pass waits a full round anyway (about a second at 1M keys), so 50 ms more is small.
/// Claiming on every notification instead made ~150 windows of 3–4 outbox rows a second at 5,000
/// row changes/s (measured at 1M keys): a claim and an ack round trip to Postgres each, between
/// `SCAN` steps, plus as many refill-guard windows; spaced, it is ~20 windows a second.
const CLAIM_INTERVAL_WHILE_SWEEPING: Duration = Duration::from_millis(50);
/// How often the listener refreshes the backlog gauges that `/healthz` and metrics show.
const BACKLOG_REFRESH: Duration = Duration::from_secs(2);
/// At stop, giving the claimed rows back (a `ROLLBACK` per epoch) may wait this long; a server that
/// does not answer rolls them back anyway when the connection closes as the process exits.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(1);
/// Reconnect delays: exponential with jitter, capped, never giving up while the daemon runs.
const RECONNECT_MIN: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Postgres(#[from] ConnectError),
    #[error(transparent)]
    Redis(#[from] KeyspaceError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

fn reconnect_delays() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(RECONNECT_MIN)
        .with_max_delay(RECONNECT_MAX)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Runs the daemon until `shutdown` is cancelled, then finishes the batch in flight.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), RunError> {
    let (_rules_tx, rules_rx) = watch::channel(Arc::new(settings.rules.clone()));
    run_with_rules(
        settings,
        rules_rx,
        Arc::new(Health::new(Duration::MAX)),
        shutdown,
    )
    .await
}

/// [`run`] with rules that can be replaced while running (SIGHUP) and shared health state.
pub async fn run_with_rules(
    settings: Settings,
    rules: watch::Receiver<Arc<RuleSet>>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let pg = PgTarget::parse(&settings.connections.database_url, "cache-invalidator")?;
    let redis = RedisTarget::parse(
        &settings.connections.redis_url,
        settings.connections.redis_ca_file.as_deref(),
        settings.redis_timeout,
    )?;
    info!(
        postgres = pg.redacted(),
        redis = redis.redacted(),
        refill_guard_ms = settings.refill_guard.as_millis() as u64,
        "starting"
    );
    let wake = Arc::new(Notify::new());
    let listener_stop = CancellationToken::new();
    let listener = tokio::spawn(listen(
        pg.with_application_name(LISTENER_APPLICATION_NAME),
        wake.clone(),
        health.clone(),
        listener_stop.clone(),
    ));
    let mut worker = Worker {
        rules,
        outbox: Outbox::new(pg),
        redis,
        sweeper: None,
        jobs: HashMap::new(),
        finished: Vec::new(),
        guards: VecDeque::new(),
        refill_guard: settings.refill_guard,
        poll_interval: settings.poll_interval,
        health,
        wake,
        systemd: Systemd::from_env(),
        sweep_failures: reconnect_delays(),
        redis_retry_at: None,
    };
    let result = worker.run(shutdown).await;
    listener_stop.cancel();
    let _ = listener.await;
    result
}

/// Holds the LISTEN connection: reconnects with backoff, re-LISTENs, wakes the worker to drain
/// (notifications sent while disconnected are lost; the outbox is not), refreshes backlog gauges.
async fn listen(pg: PgTarget, wake: Arc<Notify>, health: Arc<Health>, stop: CancellationToken) {
    let mut first = true;
    loop {
        let mut delays = reconnect_delays();
        let (client, mut driver) = loop {
            let attempt = async {
                let (client, driver) = pg.connect(Some(wake.clone())).await?;
                client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
                Ok::<_, OutboxError>((client, driver))
            };
            match attempt.await {
                Ok(connected) => break connected,
                Err(error) if error.is_permanent() => {
                    warn!(%error, "postgres settings are wrong; not retrying");
                    return;
                }
                Err(error) => {
                    let delay = delays.next().unwrap_or(RECONNECT_MAX);
                    warn!(%error, retry_in_ms = delay.as_millis() as u64, "postgres LISTEN connection failed");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        };
        if !first {
            metrics::counter!(names::RECONNECTS, "side" => "postgres").increment(1);
            info!("postgres LISTEN connection restored; draining the outbox");
        }
        first = false;
        health.set_postgres(true);
        wake.notify_one();
        let mut refresh = tokio::time::interval(BACKLOG_REFRESH);
        let reason = loop {
            tokio::select! {
                closed = &mut driver => break match closed {
                    Ok(Err(error)) => describe(&error),
                    Ok(Ok(())) => "closed".to_owned(),
                    Err(error) => error.to_string(),
                },
                _ = stop.cancelled() => return,
                _ = refresh.tick() => match outbox::backlog(&client).await {
                    Ok(backlog) => {
                        health.set_backlog(backlog.rows, backlog.oldest_age_seconds);
                        metrics::gauge!(names::OUTBOX_BACKLOG).set(backlog.rows as f64);
                        metrics::gauge!(names::OUTBOX_OLDEST_AGE).set(backlog.oldest_age_seconds);
                        metrics::gauge!(names::DEAD_LETTERS).set(backlog.dead_letters as f64);
                    }
                    Err(error) => {
                        warn!(error = %describe(&error), "backlog query failed");
                        if client.is_closed() {
                            break describe(&error);
                        }
                    }
                },
            }
        };
        health.set_postgres(false);
        warn!(%reason, "postgres LISTEN connection lost; reconnecting");
    }
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

/// A window in the sweep, and what to do when it finishes.
struct Job {
    /// `None` for the refill guard's second pass, which has no outbox rows.
    epoch: Option<u64>,
    done: Vec<i64>,
    dead: Vec<(i64, String)>,
    /// Changed rows per table, for the changes metric.
    rows_by_table: HashMap<String, u64>,
    changes: Vec<ChangeNote>,
    patterns: Vec<PatternSpec>,
    started: Instant,
}

struct Worker {
    rules: watch::Receiver<Arc<RuleSet>>,
    outbox: Outbox,
    redis: RedisTarget,
    sweeper: Option<Sweeper>,
    jobs: HashMap<WindowId, Job>,
    /// Windows whose keys are confirmed gone, waiting for their outbox rows to be deleted.
    finished: Vec<(Job, Vec<u64>)>,
    /// Refill-guard passes waiting for their time, oldest first.
    guards: VecDeque<(Instant, Vec<PatternSpec>)>,
    refill_guard: Duration,
    poll_interval: Duration,
    health: Arc<Health>,
    wake: Arc<Notify>,
    systemd: Systemd,
    /// Delays between failed sweeps, reset by a step that worked: a Redis that fails every
    /// command at once (loading its dump, out of memory) is not hammered, nor the outbox claimed,
    /// in a tight loop.
    sweep_failures: ExponentialBackoff,
    /// When the next connection attempt after a failed sweep may start.
    redis_retry_at: Option<Instant>,
}

impl Worker {
    async fn run(&mut self, shutdown: CancellationToken) -> Result<(), RunError> {
        let mut dirty = true;
        let mut claim_delays = reconnect_delays();
        let mut claim_retry_at: Option<Instant> = None;
        let mut last_poll = Instant::now();
        let mut stop_deadline: Option<Instant> = None;
        let mut step_abandoned = false;
        let mut last_claim = Instant::now();
        let mut claim_throttled = false;
        loop {
            self.systemd.tick(self.health.is_healthy());
            if shutdown.is_cancelled() && stop_deadline.is_none() {
                stop_deadline = Some(Instant::now() + SHUTDOWN_GRACE);
                self.systemd.stopping();
                self.guards.clear();
                info!(
                    windows = self.jobs.values().filter(|j| j.epoch.is_some()).count(),
                    "stopping: finishing the batch in flight"
                );
            }
            if step_abandoned {
                stop_deadline = Some(Instant::now());
            }
            if let Some(deadline) = stop_deadline {
                let in_flight = self
                    .jobs
                    .values()
                    .chain(self.finished.iter().map(|(job, _)| job))
                    .any(|job| job.epoch.is_some());
                if !in_flight || Instant::now() >= deadline {
                    if in_flight {
                        warn!(
                            "stop deadline reached: giving unfinished changes back to the outbox"
                        );
                    }
                    if tokio::time::timeout(RELEASE_TIMEOUT, self.outbox.release_all())
                        .await
                        .is_err()
                    {
                        warn!("postgres did not answer the rollback: the claims end with the connections");
                    }
                    info!("stopped");
                    return Ok(());
                }
            }
            // Claims are spaced only while a sweep runs; an idle worker claims at once.
            if !self.sweeper.as_ref().is_some_and(Sweeper::is_busy) {
                claim_throttled = false;
            }
            if self.wake.notified().now_or_never().is_some() {
                dirty = true;
            }
            if last_poll.elapsed() >= self.poll_interval {
                last_poll = Instant::now();
                dirty = true;
            }
            if self
                .outbox
                .recheck_due_at()
                .is_some_and(|at| Instant::now() >= at)
            {
                dirty = true;
            }

            if self.sweeper.is_none() && !self.connect_redis(&shutdown).await? {
                continue;
            }

            let claim_allowed = stop_deadline.is_none()
                && claim_retry_at.is_none_or(|at| Instant::now() >= at)
                && self
                    .sweeper
                    .as_ref()
                    .is_some_and(|s| s.first_pass_patterns() < MAX_ACTIVE_PATTERNS)
                && (!claim_throttled || last_claim.elapsed() >= CLAIM_INTERVAL_WHILE_SWEEPING);
            let claim_now = dirty && claim_allowed;
            if claim_now {
                dirty = false;
            }

            self.start_due_guards();

            let busy = self.sweeper.as_ref().is_some_and(Sweeper::is_busy);
            if claim_now || busy || !self.finished.is_empty() {
                // The Postgres side (acknowledge finished windows, claim new changes) runs next to
                // the Redis step rather than between steps: a round trip to a loaded Postgres
                // takes milliseconds, and Redis would sit idle for each of them, ~40 a second
                // under sustained load.
                let acks = std::mem::take(&mut self.finished);
                let outbox = &mut self.outbox;
                let postgres = async move {
                    let mut acked = Vec::with_capacity(acks.len());
                    for (job, keys_per_pattern) in acks {
                        let result = match job.epoch {
                            Some(epoch) => Some(outbox.ack(epoch, &job.done, &job.dead).await),
                            None => None,
                        };
                        acked.push((job, keys_per_pattern, result));
                    }
                    let claim = match claim_now {
                        true => Some(outbox.claim(CLAIM_LIMIT).await),
                        false => None,
                    };
                    (acked, claim)
                };
                let mut sweeper = self.sweeper.as_mut().filter(|_| busy);
                // Redis steps go on for as long as the Postgres side takes (at least one step).
                let work = async {
                    let mut postgres = std::pin::pin!(postgres);
                    let mut postgres_outcome = None;
                    let mut steps: Vec<Result<StepReport, SweepError>> = Vec::new();
                    loop {
                        // Only while there is sweeping to do: a step with nothing in flight
                        // returns at once, and looping on it would starve Postgres' own tasks.
                        let stepping = sweeper.as_deref().is_some_and(Sweeper::is_busy)
                            && !steps.iter().any(Result::is_err);
                        if !stepping || !steps.is_empty() {
                            if let Some(outcome) = postgres_outcome.take() {
                                return (outcome, steps);
                            }
                        }
                        tokio::select! {
                            outcome = &mut postgres, if postgres_outcome.is_none() => {
                                postgres_outcome = Some(outcome);
                            }
                            // Cancel-safe: a step only waits for a reply already on its way.
                            stepped = step_of(&mut sweeper), if stepping => steps.push(stepped),
                        }
                    }
                };
                // A round trip may not outlast the grace period, even one that began before the
                // stop was asked for.
                let outcome = tokio::select! {
                    outcome = work => Some(outcome),
                    _ = grace_over(&shutdown, stop_deadline) => None,
                };
                let Some(((acked, claim), steps)) = outcome else {
                    // Abandoned half done (a step's matches may not have been unlinked), nothing
                    // in flight may be acknowledged: the loop's top gives it all back and stops.
                    step_abandoned = true;
                    continue;
                };
                for (job, keys_per_pattern, result) in acked {
                    self.acknowledged(job, &keys_per_pattern, result);
                }
                let mut failure = None;
                for stepped in steps {
                    match stepped {
                        Ok(report) => self.stepped(report),
                        Err(error) => failure = Some(error),
                    }
                }
                if let Some(error) = failure {
                    // Every epoch is rolled back, the claim just made included.
                    self.sweep_failed(error).await;
                    dirty = true;
                    continue;
                }
                match claim {
                    None => {}
                    Some(Ok(claim)) => {
                        last_claim = Instant::now();
                        // A full claim means a backlog: catch up without waiting.
                        claim_throttled = !claim.full;
                        claim_retry_at = None;
                        claim_delays = reconnect_delays();
                        if claim.full {
                            dirty = true;
                        }
                        if !claim.rows.is_empty() {
                            self.start_window(claim);
                        } else if self.jobs.is_empty() && self.finished.is_empty() {
                            self.systemd.ready();
                        }
                    }
                    Some(Err(error)) => {
                        if error.is_permanent() {
                            return Err(error.into());
                        }
                        let delay = claim_delays.next().unwrap_or(RECONNECT_MAX);
                        warn!(%error, retry_in_ms = delay.as_millis() as u64, "claiming from the outbox failed");
                        claim_retry_at = Some(Instant::now() + delay);
                        dirty = true;
                    }
                }
                continue;
            }
            // Idle: wait for a notification, the poll interval, a guard falling due, a claim
            // retry, or shutdown.
            let mut wait = self.poll_interval.saturating_sub(last_poll.elapsed());
            if let Some((due, _)) = self.guards.front() {
                wait = wait.min(due.saturating_duration_since(Instant::now()));
            }
            if let Some(at) = claim_retry_at {
                wait = wait.min(at.saturating_duration_since(Instant::now()));
            }
            // One already due set `dirty` above; waiting on it again would spin while a claim
            // retry is pending.
            if let Some(at) = self
                .outbox
                .recheck_due_at()
                .filter(|at| *at > Instant::now())
            {
                wait = wait.min(at.saturating_duration_since(Instant::now()));
            }
            if dirty && claim_retry_at.is_none() && stop_deadline.is_none() {
                // Let the connections' tasks run before trying again.
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                _ = self.wake.notified() => dirty = true,
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled(), if stop_deadline.is_none() => {}
            }
        }
    }

    /// Connects to Redis, retrying with backoff. `Ok(false)` when shutdown interrupted it.
    async fn connect_redis(&mut self, shutdown: &CancellationToken) -> Result<bool, RunError> {
        if let Some(at) = self.redis_retry_at.take() {
            tokio::select! {
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
                _ = shutdown.cancelled() => return Ok(false),
            }
        }
        let mut delays = reconnect_delays();
        loop {
            match self.redis.connect().await {
                Ok(nodes) => {
                    info!(
                        nodes = nodes.len(),
                        redis = self.redis.redacted(),
                        "connected to redis"
                    );
                    // A sweep starts afresh: cursors of the old connections mean nothing now.
                    self.sweeper = Some(Sweeper::new(nodes));
                    self.health.set_redis(true);
                    return Ok(true);
                }
                Err(error) if error.is_permanent() => return Err(error.into()),
                Err(error) => {
                    let delay = delays.next().unwrap_or(RECONNECT_MAX);
                    warn!(%error, retry_in_ms = delay.as_millis() as u64, "redis connection failed");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        // The loop's top gives any claims back, bounded by RELEASE_TIMEOUT.
                        _ = shutdown.cancelled() => return Ok(false),
                    }
                }
            }
        }
    }

    /// Renders claimed rows into a window and adds it to the sweep; unusable rows are set aside.
    fn start_window(&mut self, claim: Claim) {
        let rules = self.rules.borrow().clone();
        let mut job = Job {
            epoch: Some(claim.epoch),
            done: Vec::with_capacity(claim.rows.len()),
            dead: Vec::new(),
            rows_by_table: HashMap::new(),
            changes: Vec::with_capacity(claim.rows.len()),
            patterns: Vec::new(),
            started: Instant::now(),
        };
        let mut pattern_index: HashMap<Arc<str>, usize> = HashMap::new();
        let mut labels: HashMap<String, Arc<str>> = HashMap::new();
        for row in &claim.rows {
            let change = Change {
                table: &row.table_name,
                operation: &row.op,
                rows: row.rows.as_ref(),
            };
            match rules.expand(&change) {
                Ok(expansion) => {
                    let label = labels
                        .entry(row.table_name.clone())
                        .or_insert_with(|| Arc::from(row.table_name.as_str()))
                        .clone();
                    let mut indexes = Vec::with_capacity(expansion.patterns.len());
                    for pattern in expansion.patterns {
                        let index = match pattern_index.get(pattern.as_str()) {
                            Some(&index) => index,
                            None => {
                                let pattern: Arc<str> = Arc::from(pattern);
                                let index = job.patterns.len();
                                pattern_index.insert(pattern.clone(), index);
                                job.patterns.push(PatternSpec {
                                    pattern,
                                    label: label.clone(),
                                });
                                index
                            }
                        };
                        indexes.push(index);
                    }
                    let changed_rows = crate::rules::changed_rows(row.rows.as_ref());
                    *job.rows_by_table.entry(row.table_name.clone()).or_default() += changed_rows;
                    job.done.push(row.id);
                    job.changes.push(ChangeNote {
                        outbox_id: row.id,
                        table: row.table_name.clone(),
                        op: row.op.clone(),
                        ids: join(&expansion.ids),
                        users: join(&expansion.owners),
                        patterns: indexes,
                    });
                }
                Err(error) => {
                    warn!(
                        outbox_id = row.id,
                        table = %row.table_name,
                        op = %row.op,
                        %error,
                        "unusable outbox row: moved to dead letters"
                    );
                    job.dead.push((row.id, error.to_string()));
                }
            }
        }
        let window = self
            .sweeper
            .as_mut()
            .and_then(|sweeper| sweeper.add_window(&job.patterns, false));
        match window {
            Some(id) => {
                self.jobs.insert(id, job);
            }
            // Nothing to sweep for (only dead rows): acknowledge next.
            None => self.finished.push((job, Vec::new())),
        }
    }

    fn start_due_guards(&mut self) {
        let now = Instant::now();
        while self.guards.front().is_some_and(|(due, _)| *due <= now) {
            let Some((_, patterns)) = self.guards.pop_front() else {
                break;
            };
            if let Some(sweeper) = self.sweeper.as_mut() {
                if let Some(id) = sweeper.add_window(&patterns, true) {
                    self.jobs.insert(
                        id,
                        Job {
                            epoch: None,
                            done: Vec::new(),
                            dead: Vec::new(),
                            rows_by_table: HashMap::new(),
                            changes: Vec::new(),
                            patterns,
                            started: now,
                        },
                    );
                }
            }
        }
    }

    /// Books a step that worked: its finished windows wait for their acknowledgement.
    fn stepped(&mut self, report: StepReport) {
        self.sweep_failures = reconnect_delays();
        record_step(&report);
        for pass in &report.pass_durations {
            self.outbox.pace_to_pass(*pass);
            // Its own target, so a pass per second can be followed without every change's line:
            // RUST_LOG=cache_invalidator=info,cache_invalidator::pass=debug
            debug!(
                target: "cache_invalidator::pass",
                duration_ms = pass.as_millis() as u64,
                windows = self.jobs.len(),
                patterns = self.sweeper.as_ref().map_or(0, Sweeper::first_pass_patterns),
                "sweep pass finished"
            );
        }
        for finished in report.finished {
            if let Some(job) = self.jobs.remove(&finished.id) {
                self.finished.push((job, finished.keys_per_pattern));
            }
        }
    }

    /// A step failed: every claimed row goes back to the outbox and Redis is reconnected later.
    async fn sweep_failed(&mut self, error: SweepError) {
        let delay = self.sweep_failures.next().unwrap_or(RECONNECT_MAX);
        self.redis_retry_at = Some(Instant::now() + delay);
        warn!(%error, windows = self.jobs.len(), retry_in_ms = delay.as_millis() as u64, "redis failed during a sweep: giving the claimed changes back to the outbox");
        metrics::counter!(names::RECONNECTS, "side" => "redis").increment(1);
        self.health.set_redis(false);
        self.outbox.release_all().await;
        self.jobs.clear();
        self.finished.clear();
        self.sweeper = None;
    }

    /// Books a finished window once Postgres answered its acknowledgement (`None`: a refill
    /// guard's window, which has no outbox rows).
    fn acknowledged(
        &mut self,
        job: Job,
        keys_per_pattern: &[u64],
        result: Option<Result<Acked, OutboxError>>,
    ) {
        let keys: u64 = keys_per_pattern.iter().sum();
        let Some(epoch) = job.epoch else {
            if keys > 0 {
                info!(
                    patterns = job.patterns.len(),
                    keys, "refill guard removed keys written back after their invalidation"
                );
            }
            return;
        };
        match result {
            Some(Ok(acked)) if !acked.lost_claim => {
                for age in &acked.ages {
                    metrics::histogram!(names::COMMIT_TO_DELETE).record(*age);
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
            Some(Ok(_)) | None => {
                warn!(epoch, "claim lost before acknowledging (postgres connection dropped): the changes will be swept again");
                // Their rows are pending again: claim them now rather than at the next poll.
                self.wake.notify_one();
            }
            Some(Err(error)) => {
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
        if !self.refill_guard.is_zero() && !job.patterns.is_empty() {
            self.guards
                .push_back((Instant::now() + self.refill_guard, job.patterns));
        }
    }
}

/// One step of the sweep, or never when there is none to step (for `select!`).
async fn step_of(sweeper: &mut Option<&mut Sweeper>) -> Result<StepReport, SweepError> {
    match sweeper {
        Some(sweeper) => sweeper.step().await,
        None => std::future::pending().await,
    }
}

/// Resolves when a stop's grace period is over: at `deadline` once the stop was seen, otherwise
/// [`SHUTDOWN_GRACE`] after `shutdown` is cancelled.
async fn grace_over(shutdown: &CancellationToken, deadline: Option<Instant>) {
    let deadline = match deadline {
        Some(deadline) => deadline,
        None => {
            shutdown.cancelled().await;
            Instant::now() + SHUTDOWN_GRACE
        }
    };
    tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await;
}

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
