//! What the daemon tells its operators: log setup (text or JSON lines), the metric names of the
//! contract, the health state behind `/healthz`, and systemd's readiness and watchdog messages.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

use crate::settings::LogFormat;

/// Metric names (contract: DESIGN.md, "Metrics").
pub mod names {
    pub const CHANGES: &str = "cache_invalidator_changes_total";
    pub const KEYS_DELETED: &str = "cache_invalidator_keys_deleted_total";
    pub const REFILL_KEYS_DELETED: &str = "cache_invalidator_refill_keys_deleted_total";
    pub const SWEEPS: &str = "cache_invalidator_sweeps_total";
    pub const SWEEP_DURATION: &str = "cache_invalidator_sweep_duration_seconds";
    pub const COMMIT_TO_DELETE: &str = "cache_invalidator_commit_to_delete_seconds";
    pub const OUTBOX_BACKLOG: &str = "cache_invalidator_outbox_backlog";
    pub const OUTBOX_OLDEST_AGE: &str = "cache_invalidator_outbox_oldest_age_seconds";
    pub const DEAD_LETTERS: &str = "cache_invalidator_dead_letters";
    pub const RECONNECTS: &str = "cache_invalidator_reconnects_total";
}

/// Sets up logging. `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests start several daemons in one process) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Shared state that `/healthz`, `status` and the watchdog look at.
#[derive(Debug)]
pub struct Health {
    postgres_up: AtomicBool,
    redis_up: AtomicBool,
    backlog_rows: AtomicU64,
    /// Oldest pending change's age in milliseconds.
    oldest_age_ms: AtomicU64,
    max_backlog_age: Duration,
}

impl Health {
    pub fn new(max_backlog_age: Duration) -> Health {
        Health {
            postgres_up: AtomicBool::new(false),
            redis_up: AtomicBool::new(false),
            backlog_rows: AtomicU64::new(0),
            oldest_age_ms: AtomicU64::new(0),
            max_backlog_age,
        }
    }

    pub fn set_postgres(&self, up: bool) {
        self.postgres_up.store(up, Ordering::Relaxed);
    }

    pub fn set_redis(&self, up: bool) {
        self.redis_up.store(up, Ordering::Relaxed);
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
        self.redis_up.load(Ordering::Relaxed)
    }

    pub fn oldest_age(&self) -> Duration {
        Duration::from_millis(self.oldest_age_ms.load(Ordering::Relaxed))
    }

    /// Healthy: both connections up and the backlog younger than the threshold.
    pub fn is_healthy(&self) -> bool {
        self.postgres_up() && self.redis_up() && self.oldest_age() < self.max_backlog_age
    }

    pub fn describe(&self) -> String {
        format!(
            "postgres {}, redis {}, backlog {} rows, oldest {:.1}s (limit {}s)",
            if self.postgres_up() { "up" } else { "down" },
            if self.redis_up() { "up" } else { "down" },
            self.backlog_rows.load(Ordering::Relaxed),
            self.oldest_age().as_secs_f64(),
            self.max_backlog_age.as_secs()
        )
    }
}

/// systemd's notification protocol; every call is a no-op when `NOTIFY_SOCKET` is not set.
pub struct Systemd {
    watchdog: Option<Duration>,
    last_ping: Option<Instant>,
    ready_sent: bool,
}

impl Systemd {
    pub fn from_env() -> Systemd {
        let mut usec = 0;
        let watchdog =
            sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec));
        Systemd {
            watchdog,
            last_ping: None,
            ready_sent: false,
        }
    }

    /// READY=1, once: LISTEN is up and the first drain finished.
    pub fn ready(&mut self) {
        if !self.ready_sent {
            self.ready_sent = true;
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
            tracing::info!("ready: listening and the outbox is drained");
        }
    }

    pub fn stopping(&self) {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    }

    /// Called from the main loop: pings the watchdog at half its interval, only while healthy,
    /// so a worker stuck or cut off from its servers is restarted by systemd.
    pub fn tick(&mut self, healthy: bool) {
        let Some(interval) = self.watchdog else {
            return;
        };
        let due = self
            .last_ping
            .is_none_or(|last| last.elapsed() >= interval / 2);
        if healthy && due {
            self.last_ping = Some(Instant::now());
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr}: {message}")]
    Bind { addr: String, message: String },
}

/// Serves `/metrics` and `/healthz` on `addr` until `shutdown`.
pub async fn serve_metrics(
    addr: std::net::SocketAddr,
    _health: std::sync::Arc<Health>,
    _shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), MetricsError> {
    Err(MetricsError::Bind {
        addr: addr.to_string(),
        message: "the metrics listener is not built yet".to_owned(),
    })
}
