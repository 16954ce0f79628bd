//! systemd's notification protocol: readiness, the `STATUS=` line and the watchdog.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Health;

/// How often systemd's `STATUS=` line is brought up to date (sent only when it changed).
const STATUS_REFRESH: Duration = Duration::from_secs(1);

/// Keeps systemd's `STATUS=` line (`systemctl status`) saying what the servers do, until
/// `shutdown`. Returns at once when the daemon does not run under a service manager.
pub async fn report_status(health: Arc<Health>, shutdown: CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let mut last = String::new();
    let mut ticker = tokio::time::interval(STATUS_REFRESH);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let line = health.status_line();
        if line != last {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&line)]);
            last = line;
        }
    }
}

/// systemd's notification protocol as the worker's loop speaks it; every call is a no-op when
/// `NOTIFY_SOCKET` is not set.
///
/// The watchdog answers one question: is the loop alive? So `WATCHDOG=1` goes out whenever the
/// loop comes round, whatever Postgres and Redis do: waiting a server out is the daemon's job, a
/// stuck loop the watchdog's. The loop therefore never waits longer than [`Systemd::ping_period`]
/// without calling [`Systemd::tick`], or waits through [`Systemd::alive_while`].
pub struct Systemd {
    watchdog: Option<Duration>,
    last_ping: Option<Instant>,
    ready_sent: bool,
}

impl Systemd {
    /// Reads `WATCHDOG_USEC` (and `WATCHDOG_PID`, which must be this process when set, as in
    /// libsystemd's `sd_watchdog_enabled`).
    pub fn from_env() -> Systemd {
        Systemd {
            watchdog: sd_notify::watchdog_enabled(),
            last_ping: None,
            ready_sent: false,
        }
    }

    /// How often the loop pings: a quarter of the watchdog interval. systemd asks for a ping at
    /// least every half interval; pinging twice as often keeps that promise even when a wake-up
    /// comes just before a ping is due and the next one a whole period later.
    pub fn ping_period(&self) -> Option<Duration> {
        self.watchdog.map(ping_period)
    }

    /// READY=1, once: the configuration is loaded and the loop runs. Not later: a backlog to
    /// drain or a server that is down at boot is the loop's work, and systemd would time the start
    /// out (90 s by default) and restart the daemon over and over.
    pub fn ready(&mut self) {
        if !self.ready_sent {
            self.ready_sent = true;
            let _ = sd_notify::notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status("running: connecting to postgres and redis"),
            ]);
            tracing::info!("ready: configuration loaded, the loop runs");
        }
    }

    pub fn stopping(&self) {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    }

    /// Called each time round the loop: pings the watchdog when a ping is due. Health does not
    /// matter here (see the type's documentation).
    pub fn tick(&mut self) {
        let Some(period) = self.ping_period() else {
            return;
        };
        let now = Instant::now();
        if self.last_ping.is_none_or(|last| now - last >= period) {
            self.last_ping = Some(now);
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        }
    }

    /// Runs `work` — a wait the loop knows to be bounded, such as a reconnect backoff or a
    /// connection attempt with its timeout — and keeps the watchdog pinged meanwhile: the loop is
    /// alive, it only waits for a server.
    pub async fn alive_while<F: Future>(&mut self, work: F) -> F::Output {
        let mut work = std::pin::pin!(work);
        loop {
            self.tick();
            let next_ping = match (self.last_ping, self.ping_period()) {
                (Some(last), Some(period)) => last + period,
                _ => return work.await,
            };
            tokio::select! {
                output = &mut work => return output,
                _ = tokio::time::sleep_until(next_ping) => {}
            }
        }
    }
}

fn ping_period(watchdog: Duration) -> Duration {
    watchdog / 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_ping_period_is_a_quarter_of_the_interval() {
        assert_eq!(
            ping_period(Duration::from_secs(30)),
            Duration::from_millis(7500)
        );
    }
}
