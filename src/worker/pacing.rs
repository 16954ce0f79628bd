//! When the worker claims and when it stops, on tokio's clock so tests can pause time.
//!
//! [`ClaimPacing`] decides when the next claim from the outbox is due: after a notification, at
//! every poll interval, when an epoch's recheck falls due, at once after a full claim, at least
//! 25 ms apart otherwise (50 ms while a sweep runs), and after a failed claim once a short
//! backoff is over — or at once when another Postgres connection of the worker came back.
//! [`StopDeadline`] bounds a graceful stop.

use std::time::Duration;

use backon::ExponentialBackoff;
use tokio::time::Instant as TokioInstant;
use tokio_util::sync::CancellationToken;

use crate::backoff::backoff;
use crate::outbox::{BACKLOG_CLAIM_CHANGED_ROWS, BACKLOG_CLAIM_LIMIT, CLAIM_LIMIT};

/// Graceful stop: the batch in flight gets this long to finish before its rows are given back.
pub(super) const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);
/// While a sweep runs, claims are at least this far apart (unless the last one was full). A window
/// joining the pass waits a full round anyway (about a second at 1M keys), so 50 ms more is small.
/// Claiming on every notification instead made ~150 windows of 3–4 outbox rows a second at 5,000
/// row changes/s (measured at 1M keys): a claim and an ack round trip to Postgres each, between
/// `SCAN` steps, plus as many refill-guard windows; spaced, it is ~20 windows a second.
const CLAIM_INTERVAL_WHILE_SWEEPING: Duration = Duration::from_millis(50);
/// Claims are at least this far apart, busy or not, unless the last one came back full (a
/// backlog). Under a sustained load every statement's notification was a claim of its own, each
/// with its window, barrier, `UNLINK`s, acknowledgement and commit: at 11,000 row changes/s
/// (1,100 statements/s) the Postgres and Redis round trips took most of the daemon's CPU: 35 % of
/// a core, 27–30 % with claims 10 ms apart, 19–24 % with 25 ms (three runs each, 1M keys). Spaced,
/// a claim takes what arrived meanwhile. A change on a quiet outbox is claimed at once (the last
/// claim is older), and one that arrives just after a claim waits at most this long: a burst's
/// last change is cleared ~25 ms after its commit instead of ~5 ms, still a fortieth of a pass at
/// 1M keys. A claim that found nothing does not count ([`ClaimPacing::claimed`]).
const CLAIM_AT_MOST_EVERY: Duration = Duration::from_millis(25);
/// Retry delays of the worker's Postgres connections (claims and LISTEN): from 100 ms, capped at
/// 500 ms, which the jitter stretches to at most a second. While no primary answers — a failover,
/// where Patroni or RDS take 20 to 60 s to promote a standby — each connection tries about once a
/// second, so the daemon is back within about a second of the new primary accepting writes. A
/// refused connection costs a server nothing; one to a standby costs a connection and a `SHOW`.
pub(super) const POSTGRES_RETRY_MIN: Duration = Duration::from_millis(100);
pub(super) const POSTGRES_RETRY_MAX: Duration = Duration::from_millis(500);

pub(super) fn postgres_delays() -> ExponentialBackoff {
    backoff(POSTGRES_RETRY_MIN, POSTGRES_RETRY_MAX)
}

/// When the worker claims from the outbox: after a notification, at every poll interval, when an
/// epoch's recheck of late-committing rows falls due, and at once after a full claim (a
/// backlog). While the finder is busy, claims are spaced by [`CLAIM_INTERVAL_WHILE_SWEEPING`];
/// after a failed claim, they wait out a short backoff, or until another connection to Postgres
/// came back. On tokio's clock, so tests can pause time.
pub(super) struct ClaimPacing {
    /// Something may be pending: claim when allowed.
    dirty: bool,
    poll_interval: Duration,
    last_poll: TokioInstant,
    last_claim: TokioInstant,
    /// The last claim was not full: the next waits for the interval while the finder is busy.
    spaced: bool,
    /// The last claim was full: a backlog waits, claimed in larger windows.
    backlog: bool,
    /// Changed rows per outbox row in the last claim, which sizes a backlog's next claim.
    changed_per_row: f64,
    retry_at: Option<TokioInstant>,
    delays: ExponentialBackoff,
}

impl ClaimPacing {
    pub(super) fn new(poll_interval: Duration) -> ClaimPacing {
        let now = TokioInstant::now();
        ClaimPacing {
            dirty: true,
            poll_interval,
            last_poll: now,
            // The first claim goes at once.
            last_claim: now.checked_sub(CLAIM_AT_MOST_EVERY).unwrap_or(now),
            spaced: false,
            backlog: false,
            changed_per_row: 1.0,
            retry_at: None,
            delays: postgres_delays(),
        }
    }

    /// A notification, a reconnect, a lost acknowledgement: look at the outbox.
    pub(super) fn wake(&mut self) {
        self.dirty = true;
    }

    /// The poll interval and a due recheck make the outbox worth a look without notification.
    pub(super) fn tick(&mut self, now: TokioInstant, recheck_due: Option<TokioInstant>) {
        if now.duration_since(self.last_poll) >= self.poll_interval {
            self.last_poll = now;
            self.dirty = true;
        }
        if recheck_due.is_some_and(|at| now >= at) {
            self.dirty = true;
        }
    }

    /// Whether to claim now, given whether the finder is busy and whether there is room for more
    /// (the cap on active patterns, not stopping).
    pub(super) fn take(&mut self, now: TokioInstant, busy: bool, room: bool) -> bool {
        // The longer spacing is for claims joining a busy finder; an idle worker keeps only the
        // short one (`too_soon`).
        if !busy {
            self.spaced = false;
        }
        let allowed = room
            && self.retry_at.is_none_or(|at| now >= at)
            && !self.too_soon(now)
            && (!self.spaced
                || now.duration_since(self.last_claim) >= CLAIM_INTERVAL_WHILE_SWEEPING);
        let claim = self.dirty && allowed;
        if claim {
            self.dirty = false;
        }
        claim
    }

    /// The last claim was less than [`CLAIM_AT_MOST_EVERY`] ago and not full.
    fn too_soon(&self, now: TokioInstant) -> bool {
        !self.backlog && now.duration_since(self.last_claim) < CLAIM_AT_MOST_EVERY
    }

    /// A claim worked (`empty`: it found nothing); true when claims had been failing (Postgres
    /// is back).
    pub(super) fn claimed(&mut self, now: TokioInstant, full: bool, empty: bool) -> bool {
        // The spacing gathers what arrives between claims; a claim that found nothing gathered
        // nothing, and the change that comes next is claimed at once. The worker claims again
        // after each epoch commits (rows that committed late), so an idle worker's next change
        // often came within 25 ms of such a claim and waited for it.
        if !empty {
            self.last_claim = now;
        }
        // A full claim means a backlog: catch up without waiting.
        self.spaced = !full;
        self.backlog = full;
        self.dirty |= full;
        self.delays = postgres_delays();
        self.retry_at.take().is_some()
    }

    /// Rows the next claim takes. Sweeping a backlog (`sweeping`: no complete index answers the
    /// windows) after a full claim: as many as bring about [`BACKLOG_CLAIM_CHANGED_ROWS`] changed
    /// rows at the last claim's rows per outbox row, within [`CLAIM_LIMIT`]..=
    /// [`BACKLOG_CLAIM_LIMIT`]: a pass serves every window that joined it, so larger windows
    /// drain faster. Otherwise [`CLAIM_LIMIT`]: a change arriving on a quiet outbox is its own
    /// small window, and the index answers small windows at least as cheaply (a drain of 200,000
    /// single-row changes at 1M keys measured 23,000/s and 2.5 CPU s per 100,000 with windows of
    /// 200, 13,400/s and 4.7 CPU s with windows of 5,000).
    pub(super) fn limit(&self, sweeping: bool) -> i64 {
        if !self.backlog || !sweeping {
            return CLAIM_LIMIT;
        }
        let rows = BACKLOG_CLAIM_CHANGED_ROWS as f64 / self.changed_per_row.max(1.0);
        (rows as i64).clamp(CLAIM_LIMIT, BACKLOG_CLAIM_LIMIT)
    }

    /// A claim's size: `rows` outbox rows standing for `changed` changed rows.
    pub(super) fn sized(&mut self, rows: usize, changed: u64) {
        if rows > 0 {
            self.changed_per_row = changed as f64 / rows as f64;
        }
    }

    /// Another connection reached Postgres again: a claim waiting out its delay goes now.
    pub(super) fn retry_now(&mut self) {
        if self.retry_at.take().is_some() {
            self.dirty = true;
            self.delays = postgres_delays();
        }
    }

    /// A claim failed: the next waits out a growing delay, which is returned.
    pub(super) fn failed(&mut self, now: TokioInstant) -> Duration {
        let delay = self.delays.next().unwrap_or(POSTGRES_RETRY_MAX);
        self.retry_at = Some(now + delay);
        self.dirty = true;
        delay
    }

    /// Claiming is due and not waiting for a retry: the loop goes round again without sleeping.
    pub(super) fn wants_to_claim(&self) -> bool {
        self.dirty && self.retry_at.is_none() && !self.too_soon(TokioInstant::now())
    }

    /// When an idle worker must look again: the next poll, a claim retry, a recheck or a refill
    /// guard falling due, or a pending claim's spacing running out (a recheck already due set
    /// `dirty` and is not waited on again, which would spin while a claim retry is pending).
    pub(super) fn next_wake(
        &self,
        recheck_due: Option<TokioInstant>,
        guard_due: Option<TokioInstant>,
    ) -> TokioInstant {
        let now = TokioInstant::now();
        [
            Some(self.last_poll + self.poll_interval),
            self.retry_at,
            recheck_due.filter(|at| *at > now),
            guard_due,
            // Something is pending, held back only by the spacing of claims.
            (self.dirty && self.too_soon(now)).then_some(self.last_claim + CLAIM_AT_MOST_EVERY),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(now + self.poll_interval)
    }
}

/// A stop in progress: from the moment it is asked for, the batch in flight gets
/// [`SHUTDOWN_GRACE`] to finish; a round abandoned half done ends it at once.
#[derive(Default)]
pub(super) struct StopDeadline {
    deadline: Option<TokioInstant>,
}

impl StopDeadline {
    /// Starts the stop; true the first time.
    pub(super) fn begin(&mut self, now: TokioInstant) -> bool {
        if self.deadline.is_some() {
            return false;
        }
        self.deadline = Some(now + SHUTDOWN_GRACE);
        true
    }

    pub(super) fn abandon(&mut self, now: TokioInstant) {
        self.deadline = Some(now);
    }

    pub(super) fn is_stopping(&self) -> bool {
        self.deadline.is_some()
    }

    pub(super) fn deadline(&self) -> Option<TokioInstant> {
        self.deadline
    }

    /// Time to stop: nothing left in flight, or the grace is over.
    pub(super) fn reached(&self, now: TokioInstant, in_flight: bool) -> bool {
        self.deadline
            .is_some_and(|deadline| !in_flight || now >= deadline)
    }
}

/// Resolves when a stop's grace period is over: at `deadline` once the stop was seen, otherwise
/// [`SHUTDOWN_GRACE`] after `shutdown` is cancelled.
pub(super) async fn grace_over(shutdown: &CancellationToken, deadline: Option<TokioInstant>) {
    let deadline = match deadline {
        Some(deadline) => deadline,
        None => {
            shutdown.cancelled().await;
            TokioInstant::now() + SHUTDOWN_GRACE
        }
    };
    tokio::time::sleep_until(deadline).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLL: Duration = Duration::from_secs(5);

    #[tokio::test(start_paused = true)]
    async fn an_idle_worker_claims_at_once_and_looks_again_at_every_poll() {
        let mut claims = ClaimPacing::new(POLL);
        let now = TokioInstant::now();
        assert!(claims.take(now, false, true), "the first look is at start");
        claims.claimed(now, false, false);
        assert!(!claims.take(now, false, true), "nothing new");
        assert_eq!(claims.next_wake(None, None), now + POLL);
        tokio::time::advance(POLL).await;
        claims.tick(TokioInstant::now(), None);
        assert!(claims.take(TokioInstant::now(), false, true), "the poll");
        // A notification makes an idle worker claim once the last claim is
        // CLAIM_AT_MOST_EVERY old.
        claims.claimed(TokioInstant::now(), false, false);
        tokio::time::advance(CLAIM_AT_MOST_EVERY).await;
        claims.wake();
        assert!(claims.take(TokioInstant::now(), false, true));
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_that_found_nothing_does_not_hold_back_the_next_change() {
        let mut claims = ClaimPacing::new(POLL);
        let start = TokioInstant::now();
        assert!(claims.take(start, false, true));
        claims.claimed(start, false, false);
        tokio::time::advance(CLAIM_AT_MOST_EVERY).await;
        // The claim after an epoch committed finds nothing...
        claims.wake();
        assert!(claims.take(TokioInstant::now(), false, true));
        claims.claimed(TokioInstant::now(), false, true);
        // ...and a change a millisecond later is claimed at once.
        tokio::time::advance(Duration::from_millis(1)).await;
        claims.wake();
        assert!(claims.wants_to_claim());
        assert!(claims.take(TokioInstant::now(), false, true));
        // A claim that found rows still spaces the next.
        claims.claimed(TokioInstant::now(), false, false);
        claims.wake();
        assert!(!claims.take(TokioInstant::now(), false, true));
    }

    #[tokio::test(start_paused = true)]
    async fn while_the_finder_is_busy_claims_are_spaced_unless_the_last_was_full() {
        let mut claims = ClaimPacing::new(POLL);
        let start = TokioInstant::now();
        assert!(claims.take(start, true, true));
        claims.claimed(start, false, false);
        claims.wake();
        assert!(
            !claims.take(start, true, true),
            "too soon after the last claim"
        );
        tokio::time::advance(CLAIM_INTERVAL_WHILE_SWEEPING).await;
        assert!(claims.take(TokioInstant::now(), true, true));
        // A full claim: a backlog waits, catch up at once.
        claims.claimed(TokioInstant::now(), true, false);
        assert!(claims.take(TokioInstant::now(), true, true));
    }

    #[tokio::test(start_paused = true)]
    async fn claims_are_spaced_even_when_idle_unless_the_last_was_full() {
        let mut claims = ClaimPacing::new(POLL);
        let start = TokioInstant::now();
        assert!(
            claims.take(start, false, true),
            "the first claim goes at once"
        );
        claims.claimed(start, false, false);
        claims.wake();
        assert!(
            !claims.take(start, false, true),
            "a change just after a claim waits"
        );
        assert!(
            !claims.wants_to_claim(),
            "and the loop does not spin meanwhile"
        );
        assert_eq!(claims.next_wake(None, None), start + CLAIM_AT_MOST_EVERY);
        tokio::time::advance(CLAIM_AT_MOST_EVERY).await;
        assert!(claims.wants_to_claim());
        assert!(claims.take(TokioInstant::now(), false, true));
        // A full claim: a backlog is claimed without waiting.
        claims.claimed(TokioInstant::now(), true, false);
        assert!(claims.take(TokioInstant::now(), false, true));
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlog_is_claimed_in_larger_windows_until_a_claim_comes_back_short() {
        let mut claims = ClaimPacing::new(POLL);
        let now = TokioInstant::now();
        assert_eq!(
            claims.limit(true),
            CLAIM_LIMIT,
            "a quiet outbox: small windows"
        );
        claims.claimed(now, true, false);
        assert_eq!(claims.limit(true), BACKLOG_CLAIM_LIMIT);
        assert_eq!(
            claims.limit(false),
            CLAIM_LIMIT,
            "the index takes small windows"
        );
        claims.claimed(now, true, false);
        assert_eq!(claims.limit(true), BACKLOG_CLAIM_LIMIT, "still a backlog");
        // Statements of many rows each: a claim brings no more changed rows than 200 full rows.
        claims.sized(2_000, 2_000 * 64);
        assert_eq!(claims.limit(true), CLAIM_LIMIT);
        claims.sized(100, 800);
        assert_eq!(claims.limit(true), 1_600);
        claims.claimed(now, false, false);
        assert_eq!(claims.limit(true), CLAIM_LIMIT, "caught up");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_claim_is_retried_after_its_backoff_and_not_before() {
        let mut claims = ClaimPacing::new(POLL);
        let now = TokioInstant::now();
        assert!(claims.take(now, false, true));
        let delay = claims.failed(now);
        assert!(delay >= POSTGRES_RETRY_MIN && delay <= 2 * POSTGRES_RETRY_MAX);
        assert!(!claims.take(now, false, true));
        assert!(
            !claims.wants_to_claim(),
            "no spinning while the retry waits"
        );
        assert_eq!(claims.next_wake(None, None), now + delay);
        tokio::time::advance(delay).await;
        assert!(claims.take(TokioInstant::now(), false, true));
    }

    #[tokio::test(start_paused = true)]
    async fn failing_claims_retry_within_a_second_however_long_postgres_is_gone() {
        let mut claims = ClaimPacing::new(POLL);
        let mut now = TokioInstant::now();
        // A minute of failures (a promotion that took long): the delay never grows past a
        // second, so the new primary is claimed from within a second of accepting writes.
        let mut waited = Duration::ZERO;
        while waited < Duration::from_secs(60) {
            let delay = claims.failed(now);
            assert!(delay <= 2 * POSTGRES_RETRY_MAX, "{delay:?}");
            now += delay;
            waited += delay;
        }
        assert!(
            claims.claimed(now, false, false),
            "the claim after failures says Postgres is back"
        );
        assert!(!claims.claimed(now, false, false));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconnect_elsewhere_ends_the_claims_wait_at_once() {
        let mut claims = ClaimPacing::new(POLL);
        let now = TokioInstant::now();
        assert!(claims.take(now, false, true));
        claims.failed(now);
        assert!(!claims.take(now, false, true), "waiting out the delay");
        claims.retry_now();
        assert!(
            claims.take(now, false, true),
            "the LISTEN connection is back: claim now"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_room_means_no_claim_but_the_change_stays_pending() {
        let mut claims = ClaimPacing::new(POLL);
        let now = TokioInstant::now();
        assert!(!claims.take(now, true, false));
        assert!(
            claims.take(now, true, true),
            "still pending once there is room"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_wait_ends_at_a_recheck_or_a_refill_guard_falling_due() {
        let claims = ClaimPacing::new(POLL);
        let now = TokioInstant::now();
        let recheck = now + Duration::from_secs(1);
        let guard = now + Duration::from_secs(2);
        assert_eq!(claims.next_wake(Some(recheck), Some(guard)), recheck);
        assert_eq!(claims.next_wake(None, Some(guard)), guard);
        // A recheck already due set `dirty` when seen; it is not waited on again.
        assert_eq!(claims.next_wake(Some(now), None), now + POLL);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_gives_the_batch_in_flight_its_grace_then_ends() {
        let mut stop = StopDeadline::default();
        let now = TokioInstant::now();
        assert!(!stop.reached(now, true), "not stopping yet");
        assert!(stop.begin(now));
        assert!(!stop.begin(now), "begun once");
        assert!(!stop.reached(now, true), "the batch in flight may finish");
        assert!(stop.reached(now, false), "nothing in flight: stop at once");
        tokio::time::advance(SHUTDOWN_GRACE).await;
        assert!(stop.reached(TokioInstant::now(), true), "the grace is over");
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_round_ends_the_stop_at_once() {
        let mut stop = StopDeadline::default();
        let now = TokioInstant::now();
        stop.begin(now);
        stop.abandon(now);
        assert!(stop.reached(now, true));
    }
}
