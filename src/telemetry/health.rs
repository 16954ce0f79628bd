//! The health state the worker and the Redis probe keep up to date, and that `/healthz` and
//! systemd's `STATUS=` line read.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use super::names;

/// Shared state that `/healthz` and systemd's `STATUS=` line look at.
#[derive(Debug)]
pub struct Health {
    postgres_up: AtomicBool,
    /// The worker's own Redis connection: false from a failed sweep until it reconnected.
    redis_up: AtomicBool,
    /// The last periodic PING (see `daemon`); true until a PING fails, and where no probe runs
    /// (an unparsable Redis URL, which the worker reports).
    redis_answers: AtomicBool,
    /// Woken when the probe sees Redis answer again after it had stopped: a worker waiting out a
    /// reconnect backoff that grew during a long outage retries at once instead.
    redis_back: Notify,
    backlog_rows: AtomicU64,
    /// Oldest pending change's age in milliseconds.
    oldest_age_ms: AtomicU64,
    max_backlog_age: Duration,
    /// How keys are found: [`FINDING_SWEEP`], [`FINDING_INDEX_SEEDING`] or
    /// [`FINDING_INDEX_COMPLETE`].
    finding: std::sync::atomic::AtomicU8,
}

const FINDING_SWEEP: u8 = 0;
const FINDING_INDEX_SEEDING: u8 = 1;
const FINDING_INDEX_COMPLETE: u8 = 2;

impl Health {
    pub fn new(max_backlog_age: Duration) -> Health {
        Health {
            postgres_up: AtomicBool::new(false),
            redis_up: AtomicBool::new(false),
            redis_answers: AtomicBool::new(true),
            redis_back: Notify::new(),
            backlog_rows: AtomicU64::new(0),
            oldest_age_ms: AtomicU64::new(0),
            max_backlog_age,
            finding: std::sync::atomic::AtomicU8::new(FINDING_SWEEP),
        }
    }

    /// `None`: sweep mode; `Some(complete)`: index mode, the index seeded or not yet.
    pub fn set_index(&self, index: Option<bool>) {
        let finding = match index {
            None => FINDING_SWEEP,
            Some(false) => FINDING_INDEX_SEEDING,
            Some(true) => FINDING_INDEX_COMPLETE,
        };
        self.finding.store(finding, Ordering::Relaxed);
    }

    /// The mode in a few words, for `status` (through the LISTEN connection's name).
    pub fn mode_label(&self) -> &'static str {
        match self.finding.load(Ordering::Relaxed) {
            FINDING_INDEX_SEEDING => "index seeding",
            FINDING_INDEX_COMPLETE => "index complete",
            _ => "sweep",
        }
    }

    /// The mode for operators: `sweep`, `index (seeding)` or `index (complete)`.
    pub fn mode(&self) -> &'static str {
        match self.finding.load(Ordering::Relaxed) {
            FINDING_INDEX_SEEDING => "index (seeding: changes are swept meanwhile)",
            FINDING_INDEX_COMPLETE => "index (complete)",
            _ => "sweep",
        }
    }

    pub fn set_postgres(&self, up: bool) {
        self.postgres_up.store(up, Ordering::Relaxed);
        metrics::gauge!(names::CONNECTED, "side" => "postgres").set(f64::from(u8::from(up)));
    }

    pub fn set_redis(&self, up: bool) {
        self.redis_up.store(up, Ordering::Relaxed);
        self.record_redis();
    }

    fn record_redis(&self) {
        metrics::gauge!(names::CONNECTED, "side" => "redis")
            .set(f64::from(u8::from(self.redis_up())));
    }

    /// Result of the periodic PING: an idle worker notices a dead Redis only at its next sweep,
    /// the probe within seconds. The first answer after a failed PING wakes
    /// [`Health::redis_answers_again`].
    pub fn set_redis_answers(&self, answers: bool) {
        let answered_before = self.redis_answers.swap(answers, Ordering::Relaxed);
        self.record_redis();
        if answers && !answered_before {
            // `notify_one` keeps the wake-up for a worker that is between two waits (in the middle
            // of a connection attempt): at worst it retries once more than it needed to.
            self.redis_back.notify_one();
        }
    }

    /// Resolves when the probe sees Redis answer again after it had stopped answering.
    pub async fn redis_answers_again(&self) {
        self.redis_back.notified().await;
    }

    pub fn set_backlog(&self, rows: i64, oldest_age_seconds: f64) {
        self.backlog_rows
            .store(rows.max(0) as u64, Ordering::Relaxed);
        self.oldest_age_ms.store(
            (oldest_age_seconds.max(0.0) * 1000.0) as u64,
            Ordering::Relaxed,
        );
    }

    pub fn postgres_up(&self) -> bool {
        self.postgres_up.load(Ordering::Relaxed)
    }

    pub fn redis_up(&self) -> bool {
        self.redis_up.load(Ordering::Relaxed) && self.redis_answers.load(Ordering::Relaxed)
    }

    pub fn oldest_age(&self) -> Duration {
        Duration::from_millis(self.oldest_age_ms.load(Ordering::Relaxed))
    }

    /// Healthy: both connections up and the backlog younger than the threshold.
    pub fn is_healthy(&self) -> bool {
        self.postgres_up() && self.redis_up() && self.oldest_age() < self.max_backlog_age
    }

    pub fn describe(&self) -> String {
        let redis = if !self.redis_answers.load(Ordering::Relaxed) {
            "down (PING failed)"
        } else if !self.redis_up.load(Ordering::Relaxed) {
            "down (worker reconnecting)"
        } else {
            "up"
        };
        let limit = if self.max_backlog_age == Duration::MAX {
            "none".to_owned()
        } else {
            format!("{}s", self.max_backlog_age.as_secs())
        };
        format!(
            "postgres {}, redis {redis}, backlog {} rows, oldest {:.1}s (limit {limit}), mode {}",
            if self.postgres_up() { "up" } else { "down" },
            self.backlog_rows.load(Ordering::Relaxed),
            self.oldest_age().as_secs_f64(),
            self.mode(),
        )
    }

    /// systemd's `STATUS=` line: what the daemon waits for, if anything, then [`Health::describe`].
    pub fn status_line(&self) -> String {
        let waiting_for: Vec<&str> = [
            (!self.postgres_up()).then_some("postgres"),
            (!self.redis_up()).then_some("redis"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if waiting_for.is_empty() {
            format!("invalidating: {}", self.describe())
        } else {
            format!(
                "waiting for {}: {}",
                waiting_for.join(" and "),
                self.describe()
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_needs_both_sides_and_a_young_backlog() {
        let health = Health::new(Duration::from_secs(60));
        assert!(!health.is_healthy());
        health.set_postgres(true);
        health.set_redis(true);
        assert!(health.is_healthy());
        health.set_redis_answers(false);
        assert!(!health.is_healthy());
        assert!(health.describe().contains("redis down (PING failed)"));
        health.set_redis_answers(true);
        health.set_backlog(3, 61.0);
        assert!(!health.is_healthy());
        assert!(health.describe().contains("backlog 3 rows"));
    }

    #[test]
    fn status_line_says_what_the_daemon_waits_for() {
        let health = Health::new(Duration::from_secs(60));
        assert!(health
            .status_line()
            .starts_with("waiting for postgres and redis: "));
        health.set_postgres(true);
        health.set_redis(true);
        assert!(health
            .status_line()
            .starts_with("invalidating: postgres up"));
        health.set_redis_answers(false);
        assert!(health.status_line().starts_with("waiting for redis: "));
    }

    #[tokio::test]
    async fn redis_answering_again_wakes_a_waiting_worker_once() {
        let health = Health::new(Duration::from_secs(60));
        let woken = || futures::FutureExt::now_or_never(health.redis_answers_again()).is_some();
        // Still answering: no wake-up.
        health.set_redis_answers(true);
        assert!(!woken());
        health.set_redis_answers(false);
        assert!(!woken());
        health.set_redis_answers(true);
        assert!(woken(), "the first answer after a failure wakes the worker");
        health.set_redis_answers(true);
        assert!(!woken(), "later answers do not");
    }
}
