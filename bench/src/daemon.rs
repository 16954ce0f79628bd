//! The daemon in-process, as the latency measures run it: through the crate's entry point on a
//! one-thread runtime of its own, as the `cache-invalidator` binary runs it, with the health state
//! that says when index mode's index is complete.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_invalidator::settings::{Connections, Mode, SecretUrl, Settings};
use cache_invalidator::telemetry::Health;
use tokio_util::sync::CancellationToken;

use crate::sustained::{INDEX_COMPLETE, INDEX_COMPLETE_POLL, INDEX_COMPLETE_TIMEOUT};

pub struct InProcess {
    mode: Mode,
    token: CancellationToken,
    health: Arc<Health>,
    started: Instant,
    thread: std::thread::JoinHandle<Result<(), cache_invalidator::DaemonError>>,
}

impl InProcess {
    /// Starts the daemon in `mode` with the built-in rules; `poll_interval` replaces the default
    /// one where a measure needs the health state to follow the index closely.
    pub fn start(
        db_url: &str,
        redis_url: String,
        mode: Mode,
        poll_interval: Option<Duration>,
    ) -> InProcess {
        let mut settings = Settings::new(Connections {
            database_url: SecretUrl::new(db_url.to_owned()),
            redis_url: SecretUrl::new(redis_url),
            redis_ca_file: None,
        });
        settings.mode = mode;
        // The measures time the changes' own clearing: the refill guard's second pass is off.
        settings.refill_guard = Duration::ZERO;
        if let Some(interval) = poll_interval {
            settings.poll_interval = interval;
        }
        let health = Arc::new(Health::new(Duration::MAX));
        settings.health = Some(health.clone());
        let token = CancellationToken::new();
        let daemon = cache_invalidator::run(settings, token.clone());
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the daemon's runtime")
                .block_on(daemon)
        });
        InProcess {
            mode,
            token,
            health,
            started,
            thread,
        }
    }

    /// Waits until every node's part of the index is seeded; returns how long after the start
    /// that was.
    pub async fn wait_complete(&self) -> Duration {
        while self.health.mode() != INDEX_COMPLETE {
            assert!(
                !self.thread.is_finished(),
                "the index-mode worker stopped before its index was complete"
            );
            assert!(
                self.started.elapsed() < INDEX_COMPLETE_TIMEOUT,
                "the index was not complete within {INDEX_COMPLETE_TIMEOUT:?} (mode: {})",
                self.health.mode()
            );
            tokio::time::sleep(INDEX_COMPLETE_POLL).await;
        }
        self.started.elapsed()
    }

    /// Cancels the daemon and waits for it to return; its failure fails the bench.
    pub async fn stop(self) {
        self.token.cancel();
        let (thread, mode) = (self.thread, self.mode);
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => panic!("the {mode}-mode worker failed: {error}"),
            Ok(Err(_)) | Err(_) => panic!("the {mode}-mode worker panicked"),
        }
    }
}
