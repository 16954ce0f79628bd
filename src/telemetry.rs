//! What the daemon tells its operators: log setup (text or JSON lines), the metric names of the
//! contract, the health state behind `/healthz`, the HTTP listener serving `/metrics` and
//! `/healthz`, and systemd's readiness, status and watchdog messages.
//!
//! The worker records metrics with the `metrics` macros wherever the event happens; they go
//! nowhere until [`serve_metrics`] installs the Prometheus recorder (once per process), so a daemon
//! without `--metrics-addr` pays nothing for them.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use tracing_subscriber::EnvFilter;

use crate::settings::LogFormat;

/// Metric names: a contract dashboards and alerts rely on (docs/operations.md).
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
    /// Not in the contract table, an addition: SIGHUP reloads by `result` (`applied`, `rejected`).
    pub const RULES_RELOADS: &str = "cache_invalidator_rules_reloads_total";
    /// Index mode (names operators' scripts rely on: README, "Finding the keys"): 1 for the mode
    /// in use, by `mode`.
    pub const MODE: &str = "cache_invalidator_mode";
    pub const INDEX_KEYS: &str = "cache_invalidator_index_keys";
    /// Seeds of the index, by `reason` (`start`, `connection_lost`, `failover`, `flush`, …).
    pub const INDEX_REBUILDS: &str = "cache_invalidator_index_rebuilds_total";
    /// Not in the contract table, an addition: 1, labelled with the version and the git commit.
    pub const BUILD_INFO: &str = "cache_invalidator_build_info";
    /// Not in the contract table, an addition: 1 while the worker's connection to `side`
    /// (`postgres`: its LISTEN connection; `redis`: its own connection and the probe's PING) is
    /// up, 0 while it waits for that server. What `/healthz` knows, for alerting rules.
    pub const CONNECTED: &str = "cache_invalidator_connected";
}

/// The crate version, as `--version` and the build-info gauge show it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit the binary was built from (`build.rs`), or `unknown` without git.
pub const COMMIT: &str = env!("CACHE_INVALIDATOR_COMMIT");

/// Histogram buckets, in seconds, shared by both histograms: from a sweep of a small keyspace or
/// a change cleared within one poll (5 ms) to a full pass over millions of keys (the design's 1M-key
/// pass takes ~0.6 s, 10M ~6 s) or a backlog worked off after an outage (30 s and more).
pub const SECONDS_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0,
];

/// How long open scrapes get to finish once the daemon stops.
const HTTP_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// A client that opens a connection and sends no request head within this is dropped, so idle
/// sockets cannot pile up.
const HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Sets up logging. `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: journald, docker logs and files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // A second init (tests start several daemons in one process) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Shared state that `/healthz` and systemd's `STATUS=` line look at.
#[derive(Debug)]
pub struct Health {
    postgres_up: AtomicBool,
    /// The worker's own Redis connection: false from a failed sweep until it reconnected.
    redis_up: AtomicBool,
    /// The last periodic PING (see `daemon`); true where no probe runs, e.g. in-process tests.
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

    /// The watchdog interval systemd asked for, if any.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
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

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    // `error` rather than `source`: the reason is part of this message, not a cause to chain.
    #[error("cannot listen on {addr} for /metrics and /healthz: {error}{hint}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
        hint: &'static str,
    },
    #[error("cannot set up the Prometheus recorder: {0}")]
    Recorder(String),
}

fn bind_hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (another process listens there, perhaps a second cache-invalidator: stop it or choose \
             another --metrics-addr / CACHE_INVALIDATOR_METRICS_ADDR)"
        }
        std::io::ErrorKind::PermissionDenied => {
            " (ports below 1024 need privileges the service does not have: choose a port such as 9187)"
        }
        std::io::ErrorKind::AddrNotAvailable => {
            " (no network interface of this host has that address: use 127.0.0.1, 0.0.0.0 or one of \
             the host's own addresses)"
        }
        _ => "",
    }
}

/// The process-wide Prometheus recorder, installed on first use. The `metrics` facade has one
/// global recorder per process, and tests start several daemons in one process, so every daemon
/// of a process shares it.
pub fn prometheus() -> Result<PrometheusHandle, MetricsError> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(&SECONDS_BUCKETS)
                .map_err(|error| error.to_string())?
                // Spawns the upkeep thread that keeps histogram memory bounded between scrapes.
                .install_recorder()
                .map_err(|error| error.to_string())?;
            describe_metrics();
            Ok(handle)
        })
        .clone()
        .map_err(MetricsError::Recorder)
}

fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        names::CHANGES,
        "Changed rows taken from the outbox and cleared, by table (a row cleared twice after a crash counts twice)"
    );
    describe_counter!(
        names::KEYS_DELETED,
        "Redis keys removed, attributed to the table whose pattern matched"
    );
    describe_counter!(
        names::REFILL_KEYS_DELETED,
        "Keys removed by the delayed second pass (stale refills caught)"
    );
    describe_counter!(
        names::SWEEPS,
        "Passes over the keyspace (per node in a cluster)"
    );
    describe_histogram!(
        names::SWEEP_DURATION,
        Unit::Seconds,
        "Duration of one sweep"
    );
    describe_histogram!(
        names::COMMIT_TO_DELETE,
        Unit::Seconds,
        "Outbox row created to its keys confirmed gone"
    );
    describe_gauge!(names::OUTBOX_BACKLOG, "Outbox rows waiting to be cleared");
    describe_gauge!(
        names::OUTBOX_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest outbox row"
    );
    describe_gauge!(
        names::DEAD_LETTERS,
        "Outbox rows set aside as unusable (see `cache-invalidator status`)"
    );
    describe_counter!(
        names::RECONNECTS,
        "Connections re-established after a failure, by side (postgres, redis)"
    );
    describe_counter!(
        names::RULES_RELOADS,
        "SIGHUP reloads of the rules file, by result (applied, rejected)"
    );
    describe_gauge!(
        names::BUILD_INFO,
        "Always 1; the labels say which version and git commit is running"
    );
    describe_gauge!(
        names::CONNECTED,
        "1 while the worker is connected to side (postgres, redis), 0 while it waits for it"
    );
}

/// Makes the counters appear at 0 before their first event, so dashboards and `rate()` see a
/// series from the start instead of a gap: both reconnect sides, and changes/keys for every
/// table the rules name.
pub fn register_zeroes<'a>(tables: impl IntoIterator<Item = &'a str>) {
    for side in ["postgres", "redis"] {
        metrics::counter!(names::RECONNECTS, "side" => side).increment(0);
        // Not connected until the worker says so: a server down at start shows as 0, not as a gap.
        metrics::gauge!(names::CONNECTED, "side" => side).set(0.0);
    }
    for result in ["applied", "rejected"] {
        metrics::counter!(names::RULES_RELOADS, "result" => result).increment(0);
    }
    metrics::counter!(names::SWEEPS).increment(0);
    metrics::counter!(names::REFILL_KEYS_DELETED).increment(0);
    metrics::gauge!(names::BUILD_INFO, "version" => VERSION, "commit" => COMMIT).set(1.0);
    for table in tables {
        metrics::counter!(names::CHANGES, "table" => table.to_owned()).increment(0);
        metrics::counter!(names::KEYS_DELETED, "table" => table.to_owned()).increment(0);
    }
}

/// The running `/metrics` + `/healthz` listener.
pub struct MetricsServer {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// The address actually bound (differs from the requested one for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Waits until the listener stopped (after the shutdown token was cancelled).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

/// Installs the Prometheus recorder, binds `addr` and serves `/metrics` and `/healthz` until
/// `shutdown`. Returns once the port is bound, so a bad address fails the start at once.
pub async fn serve_metrics(
    addr: SocketAddr,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<MetricsServer, MetricsError> {
    let handle = prometheus()?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|error| MetricsError::Bind {
            addr,
            hint: bind_hint(&error),
            error,
        })?;
    let local_addr = listener.local_addr().map_err(|error| MetricsError::Bind {
        addr,
        hint: "",
        error,
    })?;
    info!(addr = %local_addr, "serving /metrics and /healthz");
    let task = tokio::spawn(accept_loop(listener, handle, health, shutdown));
    Ok(MetricsServer { local_addr, task })
}

async fn accept_loop(
    listener: TcpListener,
    handle: PrometheusHandle,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    // Tracks every open connection, so stopping waits for scrapes in progress (briefly).
    let connections = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    warn!(%error, "metrics listener: accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let handle = handle.clone();
        let health = health.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let response = respond(request.method(), request.uri().path(), &handle, &health);
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HTTP_HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%error, "metrics connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(HTTP_SHUTDOWN_GRACE, connections.shutdown())
        .await
        .is_err()
    {
        debug!("metrics connections still open at shutdown: dropped");
    }
}

/// The response to one request; only the method and path matter.
pub fn respond(
    method: &Method,
    path: &str,
    handle: &PrometheusHandle,
    health: &Health,
) -> Response<Full<Bytes>> {
    let readable = method == Method::GET || method == Method::HEAD;
    match path {
        "/metrics" | "/healthz" if !readable => {
            let mut response = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET and HEAD are allowed\n".to_owned(),
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            response
        }
        "/metrics" => {
            let mut response = text(StatusCode::OK, handle.render());
            // The Prometheus text exposition format, version 0.0.4.
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/healthz" if health.is_healthy() => {
            text(StatusCode::OK, format!("ok: {}\n", health.describe()))
        }
        "/healthz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {}\n", health.describe()),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: this server answers /metrics and /healthz\n".to_owned(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
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

    #[test]
    fn watchdog_ping_period_is_a_quarter_of_the_interval() {
        assert_eq!(
            ping_period(Duration::from_secs(30)),
            Duration::from_millis(7500)
        );
    }

    #[test]
    fn bind_errors_say_what_to_do() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = held.local_addr().expect("addr");
        let error = std::net::TcpListener::bind(addr).expect_err("port is taken");
        let message = MetricsError::Bind {
            addr,
            hint: bind_hint(&error),
            error,
        }
        .to_string();
        assert!(message.contains(&addr.to_string()), "{message}");
        assert!(message.contains("--metrics-addr"), "{message}");
    }
}
