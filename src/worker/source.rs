//! The worker's change source: the `LISTEN` connection that wakes the loop on every notification
//! and after every reconnect, and the backlog gauges it refreshes for `/healthz` and metrics —
//! which doubles as the check that the connection still answers.
//!
//! Notifications sent while the connection is down are lost; the outbox is not: after every
//! reconnect the loop is woken to drain it. When a failover takes the primary away, this
//! connection and the claims' connections retry on short delays
//! ([`super::pacing::postgres_delays`]), and whichever finds the new primary first tells the
//! other ([`PostgresBack`]), so no retry delay outlives another connection's reconnect.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::pacing::{postgres_delays, POSTGRES_RETRY_MAX};
use crate::outbox::{self, OutboxError};
use crate::postgres::{answered, describe, Driver, PgTarget, QueryError};
use crate::schema::CHANNEL;
use crate::telemetry::{names, Health};

/// `application_name` of the LISTEN connection: `status` counts workers by it. Once the worker
/// knows how it finds keys, the name carries the mode after a colon ([`listener_application_name`]).
pub(crate) const LISTENER_APPLICATION_NAME: &str = "cache-invalidator worker";
/// The `LIKE` pattern that matches every worker's LISTEN connection, whatever its mode.
pub(crate) const LISTENER_APPLICATION_NAME_LIKE: &str = "cache-invalidator worker%";

/// The LISTEN connection's `application_name` with the worker's mode (`index complete`, `index
/// seeding`, `sweep`): under Postgres' 63 bytes, and only letters and spaces after the prefix.
pub(super) fn listener_application_name(mode: &str) -> String {
    format!("{LISTENER_APPLICATION_NAME}: {mode}")
}

/// The mode a worker's `application_name` shows, if any.
pub(crate) fn mode_of_application_name(name: &str) -> Option<&str> {
    name.strip_prefix(LISTENER_APPLICATION_NAME)?
        .strip_prefix(": ")
}

/// How often the listener refreshes the backlog gauges that `/healthz` and metrics show. The same
/// query checks that the connection answers: a LISTEN session may otherwise be silent for as long
/// as no change is committed, and a frozen server would go unnoticed.
const BACKLOG_REFRESH: Duration = Duration::from_secs(2);

/// Word between the worker's Postgres connections that one of them is back after a failure: the
/// others retry at once rather than wait out their delay. Each side takes the permit the other
/// left (`notify_one`), so a reconnect that happens while the other side is busy is not missed.
#[derive(Default)]
pub(super) struct PostgresBack {
    /// The LISTEN connection is back: claim now.
    pub(super) listener: Notify,
    /// A claim worked after failing: the LISTEN connection reconnects now.
    pub(super) claims: Notify,
}

/// What the listener task needs.
pub(super) struct Listener {
    pub(super) pg: PgTarget,
    pub(super) wake: Arc<Notify>,
    pub(super) health: Arc<Health>,
    pub(super) back: Arc<PostgresBack>,
    pub(super) stop: CancellationToken,
}

impl Listener {
    /// Holds the LISTEN connection until stopped: reconnects, re-LISTENs, wakes the worker to
    /// drain, refreshes the backlog gauges.
    pub(super) async fn run(self) {
        let mut first = true;
        loop {
            let Some((client, driver)) = self.connect().await else {
                return;
            };
            if !first {
                metrics::counter!(names::RECONNECTS, "side" => "postgres").increment(1);
                info!("postgres LISTEN connection restored; draining the outbox");
                self.back.listener.notify_one();
            }
            first = false;
            self.health.set_postgres(true);
            self.wake.notify_one();
            let Some(reason) = self.serve(&client, driver).await else {
                return;
            };
            self.health.set_postgres(false);
            warn!(%reason, "postgres LISTEN connection lost; reconnecting");
        }
    }

    /// Connects and LISTENs, retrying until it works; `None` when stopped or when the settings
    /// can never work.
    async fn connect(&self) -> Option<(Client, Driver)> {
        let mut delays = postgres_delays();
        loop {
            let attempt = async {
                let (client, driver) = self.pg.connect(Some(self.wake.clone())).await?;
                answered(client.batch_execute(&format!("LISTEN {CHANNEL}"))).await?;
                Ok::<_, OutboxError>((client, driver))
            };
            match attempt.await {
                Ok(connected) => return Some(connected),
                Err(error) if error.is_permanent() => {
                    warn!(%error, "postgres settings are wrong; not retrying");
                    return None;
                }
                Err(error) => {
                    let delay = delays.next().unwrap_or(POSTGRES_RETRY_MAX);
                    warn!(%error, retry_in_ms = delay.as_millis() as u64, "postgres LISTEN connection failed");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        // A claim reached a primary: it is there to be listened to.
                        _ = self.back.claims.notified() => {}
                        _ = self.stop.cancelled() => return None,
                    }
                }
            }
        }
    }

    /// Serves a connected session until it is lost (the reason) or the listener is stopped.
    async fn serve(&self, client: &Client, mut driver: Driver) -> Option<String> {
        let mut refresh = tokio::time::interval(BACKLOG_REFRESH);
        // The mode as `status` shows it, in the connection's `application_name`.
        let mut shown_mode = "";
        loop {
            tokio::select! {
                closed = &mut driver => return Some(match closed {
                    Ok(Err(error)) => describe(&error),
                    Ok(Ok(())) => "closed".to_owned(),
                    Err(error) => error.to_string(),
                }),
                _ = self.stop.cancelled() => return None,
                _ = refresh.tick() => {
                    if let Err(reason) = self.refresh(client, &mut shown_mode).await {
                        return Some(reason);
                    }
                }
            }
        }
    }

    /// Refreshes the backlog gauges and the mode `status` shows. `Err` with the reason when the
    /// connection is to be given up: closed, or silent past [`crate::postgres::ANSWER_TIMEOUT`].
    async fn refresh(&self, client: &Client, shown_mode: &mut &'static str) -> Result<(), String> {
        let backlog = match answered(outbox::backlog(client)).await {
            Ok(backlog) => backlog,
            Err(error @ QueryError::Unanswered) => return Err(error.to_string()),
            Err(error) => {
                warn!(%error, "backlog query failed");
                return match client.is_closed() {
                    true => Err(error.to_string()),
                    false => Ok(()),
                };
            }
        };
        let mode = self.health.mode_label();
        if mode != *shown_mode {
            let set = format!(
                "SET application_name = '{}'",
                listener_application_name(mode)
            );
            match answered(client.batch_execute(&set)).await {
                Ok(()) => *shown_mode = mode,
                Err(error @ QueryError::Unanswered) => return Err(error.to_string()),
                Err(error) => warn!(%error, "could not show the mode to status"),
            }
        }
        self.health
            .set_backlog(backlog.rows, backlog.oldest_age_seconds);
        metrics::gauge!(names::OUTBOX_BACKLOG).set(backlog.rows as f64);
        metrics::gauge!(names::OUTBOX_OLDEST_AGE).set(backlog.oldest_age_seconds);
        metrics::gauge!(names::DEAD_LETTERS).set(backlog.dead_letters as f64);
        Ok(())
    }
}
