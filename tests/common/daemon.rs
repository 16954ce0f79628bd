//! The daemon under test, two ways: in-process (`Daemon`, stopped with a token) for tests of what
//! it does to Postgres and Redis, and as a child process of the real binary (`ChildDaemon`) for
//! tests of signals, exit codes, logs, `/metrics`, `/healthz` and `/proc`; plus the one-shot
//! subcommands and what they print.

use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cache_invalidator::rules::RuleSet;
use cache_invalidator::settings::{Connections, SecretUrl, Settings};
use cache_invalidator::telemetry::Health;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::redis::{default_rules_toml, KeyPrefix};
use super::servers::free_port;
use super::wait::{wait_until, PATIENCE};

/// Settings for a daemon against `database_url` and `redis_url` with `rules`; fast polling, no
/// refill guard (tests of the guard turn it on).
pub fn test_settings(database_url: &str, redis_url: &str, rules: RuleSet) -> Settings {
    let mut settings = Settings::new(Connections {
        database_url: SecretUrl::new(database_url),
        redis_url: SecretUrl::new(redis_url),
        redis_ca_file: None,
    });
    settings.rules = rules;
    settings.refill_guard = Duration::ZERO;
    settings.poll_interval = Duration::from_millis(500);
    settings.redis_timeout = Duration::from_secs(2);
    settings.mode = test_mode();
    settings
}

/// The mode the suites run the daemon in: `TEST_MODE` = `index`, `sweep` or `auto` (the default,
/// which is index mode on a Redis that allows tracking). `scripts/test.sh` runs the data-path and
/// fault suites once in each mode.
pub fn test_mode() -> cache_invalidator::settings::Mode {
    match std::env::var("TEST_MODE").as_deref() {
        Ok("index") => cache_invalidator::settings::Mode::Index,
        Ok("sweep") => cache_invalidator::settings::Mode::Sweep,
        Ok("auto") | Ok("") | Err(_) => cache_invalidator::settings::Mode::Auto,
        Ok(other) => panic!("TEST_MODE={other:?}: expected index, sweep or auto"),
    }
}

/// The daemon running in-process through the crate's entry point, as the binary runs it, stopped
/// with a token like SIGTERM would, with the health state `/healthz` would show (its mode says
/// whether the index is complete).
pub struct Daemon {
    token: CancellationToken,
    handle: JoinHandle<Result<(), cache_invalidator::DaemonError>>,
    pub health: Arc<Health>,
}

impl Daemon {
    pub fn start(mut settings: Settings) -> Daemon {
        let health = Arc::new(Health::new(Duration::MAX));
        settings.health = Some(health.clone());
        let token = CancellationToken::new();
        let handle = tokio::spawn(cache_invalidator::run(settings, token.clone()));
        Daemon {
            token,
            handle,
            health,
        }
    }

    /// Starts it in index mode (whatever `TEST_MODE` says) and waits until the index is seeded.
    pub async fn start_indexed(mut settings: Settings) -> Daemon {
        settings.mode = cache_invalidator::settings::Mode::Index;
        let daemon = Daemon::start(settings);
        daemon.wait_index_complete().await;
        daemon
    }

    /// Waits until every node's part of the index is seeded (a minute at most: a seed is one
    /// `SCAN` of the server, which other suites may be filling at the same time).
    pub async fn wait_index_complete(&self) {
        let health = self.health.clone();
        let complete = wait_until(Duration::from_secs(60), || {
            let health = health.clone();
            async move { health.mode() == "index (complete)" }
        })
        .await;
        assert!(complete, "index not complete: {}", self.health.mode());
    }

    /// Stops it and waits; panics if it failed.
    pub async fn stop(self) {
        self.token.cancel();
        match tokio::time::timeout(Duration::from_secs(15), self.handle).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => panic!("daemon failed: {error}"),
            Ok(Err(join)) => panic!("daemon panicked: {join}"),
            Err(_) => panic!("daemon did not stop within 15 s"),
        }
    }
}

/// The daemon's binary, for tests that run it as a process (signals, exit codes, `/proc`).
pub const BIN: &str = env!("CARGO_BIN_EXE_cache-invalidator");

/// Settings in the environment that would leak into a child from the developer's shell.
const INHERITED_SETTINGS: [&str; 19] = [
    "DATABASE_URL",
    "REDIS_URL",
    "CACHE_INVALIDATOR_REDIS_CA_FILE",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "CACHE_INVALIDATOR_RULES",
    "CACHE_INVALIDATOR_CONFIG",
    "CACHE_INVALIDATOR_LOG_FORMAT",
    "CACHE_INVALIDATOR_METRICS_ADDR",
    "CACHE_INVALIDATOR_REFILL_GUARD",
    "CACHE_INVALIDATOR_POLL_INTERVAL",
    "CACHE_INVALIDATOR_MAX_BACKLOG_AGE",
    "CACHE_INVALIDATOR_REDIS_TIMEOUT",
    "CACHE_INVALIDATOR_MODE",
    "CACHE_INVALIDATOR_INDEX_MAX_KEYS",
    "CACHE_INVALIDATOR_CLAIM_TIMEOUT",
    "CACHE_INVALIDATOR_REPLICA_ACKS",
    "CACHE_INVALIDATOR_REPLICA_WAIT_TIMEOUT",
];

/// The poll interval [`test_settings`] gives an in-process daemon, as arguments of a child one.
pub const FAST_POLL: [&str; 2] = ["--poll-interval", "500ms"];

/// A rules file for a child daemon, in a temp dir of its own that lives as long as this.
pub struct RulesFile {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl RulesFile {
    pub fn new(text: &str) -> RulesFile {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("rules.toml");
        std::fs::write(&path, text).expect("write rules");
        RulesFile { path, _dir: dir }
    }

    /// The default rules under `space`'s key prefix, then `extra` TOML.
    pub fn default_for(space: &KeyPrefix, extra: &str) -> RulesFile {
        RulesFile::new(&format!(
            "{}\n{extra}",
            default_rules_toml(&space.key_prefix())
        ))
    }
}

/// `cache-invalidator` as a child process: its stderr in a log file printed when the test panics,
/// killed when dropped, signalled the way an operator would, and (when started with one) its
/// `/metrics` and `/healthz` listener. Derefs to the child for `wait`, `try_wait` and `id`.
pub struct ChildDaemon {
    child: tokio::process::Child,
    log: PathBuf,
    metrics: Option<SocketAddr>,
    /// Holds the log file when the daemon chose where it goes; removed after the drop printed it.
    _dir: Option<tempfile::TempDir>,
}

impl ChildDaemon {
    /// Spawns `command` with stdout and stderr written to `log` (the daemon logs to stderr; what it
    /// prints to stdout lands there too, for the tests that look for secrets).
    pub fn spawn(command: tokio::process::Command, log: PathBuf) -> ChildDaemon {
        ChildDaemon::spawn_with(command, log, None, None)
    }

    fn spawn_with(
        mut command: tokio::process::Command,
        log: PathBuf,
        metrics: Option<SocketAddr>,
        dir: Option<tempfile::TempDir>,
    ) -> ChildDaemon {
        let log_file = std::fs::File::create(&log).expect("log file");
        let stdout = log_file.try_clone().expect("log file");
        let child = command
            .stdout(stdout)
            .stderr(log_file)
            .spawn()
            .expect("start cache-invalidator");
        ChildDaemon {
            child,
            log,
            metrics,
            _dir: dir,
        }
    }

    /// `cache-invalidator run ARGS` with `env`, its log in a temp dir of its own; with
    /// `--metrics-addr` on a free port when `metrics`.
    pub fn run(args: &[&str], env: &[(&str, &str)], metrics: bool) -> ChildDaemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let metrics = metrics.then(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let metrics_text = metrics.map(|addr| addr.to_string());
        let mut full_args = vec!["run"];
        full_args.extend_from_slice(args);
        if let Some(addr) = &metrics_text {
            full_args.extend_from_slice(&["--metrics-addr", addr]);
        }
        let mut command = daemon_command(&full_args);
        command.envs(env.iter().copied());
        let log = dir.path().join("daemon.log");
        ChildDaemon::spawn_with(command, log, metrics, Some(dir))
    }

    /// A worker: `run` against `database_url` and `redis_url` with the rules file `rules` and no
    /// refill guard, `args` after those.
    pub fn worker(
        database_url: &str,
        redis_url: &str,
        rules: &Path,
        args: &[&str],
        metrics: bool,
    ) -> ChildDaemon {
        let rules = rules.to_str().expect("utf-8 path");
        let mut full_args = vec!["--rules", rules, "--refill-guard", "0"];
        full_args.extend_from_slice(args);
        let env = [("DATABASE_URL", database_url), ("REDIS_URL", redis_url)];
        ChildDaemon::run(&full_args, &env, metrics)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("child still running")
    }

    /// Sends signal `name` (`TERM`, `HUP`, `STOP`, …) with `kill`, as an operator would.
    pub async fn signal(&self, name: &str) {
        send_signal(&self.child, name).await;
    }

    /// SIGKILL: no shutdown, no rollback, connections cut by the kernel; waits for the exit.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("SIGKILL");
    }

    /// SIGTERM, then the exit status within `bound`; panics with the log otherwise.
    pub async fn stop_within(&mut self, bound: Duration) -> ExitStatus {
        self.signal("TERM").await;
        match tokio::time::timeout(bound, self.child.wait()).await {
            Ok(status) => status.expect("wait for cache-invalidator"),
            Err(_) => panic!(
                "no exit within {bound:?} of SIGTERM; log:\n{}",
                self.log_text()
            ),
        }
    }

    /// SIGTERM, then the exit status within [`PATIENCE`].
    pub async fn stop(mut self) -> ExitStatus {
        self.stop_within(PATIENCE).await
    }

    /// The process state letter from `/proc/<pid>/stat` (`T`: stopped by a signal).
    pub fn state(&self) -> char {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .expect("read /proc/<pid>/stat");
        // `pid (comm) state …`: comm may hold spaces and parentheses, the state follows the last ')'.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .expect("state field")
    }

    /// Peak resident memory (VmHWM) in kB, from `/proc/<pid>/status`.
    pub fn peak_rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status")
    }

    /// Where `/metrics` and `/healthz` answer.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics.expect("started with a metrics listener")
    }

    /// `GET path` on the metrics listener: status and body; `None` while nothing answers.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        http_response(self.metrics_addr(), path).await
    }

    /// The body of `/metrics`; panics unless it answers 200.
    pub async fn scrape(&self) -> String {
        match self.get("/metrics").await {
            Some((200, body)) => body,
            other => panic!("GET /metrics: {other:?}; log:\n{}", self.log_text()),
        }
    }

    /// The sum of the samples of `name` over every label set; `None` until `/metrics` answers 200.
    pub async fn metric_sum(&self, name: &str) -> Option<f64> {
        let body = match self.get("/metrics").await? {
            (200, body) => body,
            _ => return None,
        };
        Some(
            body.lines()
                .filter(|line| {
                    line.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with([' ', '{']))
                })
                .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                .sum(),
        )
    }

    /// Waits until `/metrics` answers: the signal handlers are installed by then.
    pub async fn wait_for_listener(&self) {
        assert!(
            wait_until(PATIENCE, || async { self.get("/metrics").await.is_some() }).await,
            "/metrics never answered; log:\n{}",
            self.log_text()
        );
    }

    /// Waits until the sample `series` (name with labels) on `/metrics` equals `value`.
    pub async fn wait_for_metric(&self, series: &str, value: f64) {
        let reached = wait_until(PATIENCE, || async {
            match self.get("/metrics").await {
                Some((200, body)) => sample(&body, series) == Some(value),
                _ => false,
            }
        })
        .await;
        if !reached {
            let body = self.get("/metrics").await.map(|(_, body)| body);
            panic!(
                "{series} never reached {value}; now {:?}; log:\n{}",
                body.as_deref().and_then(|body| sample(body, series)),
                self.log_text()
            );
        }
    }
}

impl Deref for ChildDaemon {
    type Target = tokio::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.child
    }
}

impl DerefMut for ChildDaemon {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.child
    }
}

impl Drop for ChildDaemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.log.display(), self.log_text());
        }
        let _ = self.child.start_kill();
    }
}

/// `cache-invalidator ARGS` with none of the caller's settings inherited, logging at `info`,
/// killed if the test drops it.
pub fn daemon_command(args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(BIN);
    for name in INHERITED_SETTINGS {
        command.env_remove(name);
    }
    command
        .args(args)
        .env("CACHE_INVALIDATOR_MODE", test_mode().to_string())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs a one-shot subcommand (`status`, `check`, `explain`, …) with `env` to completion.
pub async fn run_cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = daemon_command(args);
    command.envs(env.iter().copied());
    match tokio::time::timeout(PATIENCE, command.output()).await {
        Ok(output) => output.expect("run cache-invalidator"),
        Err(_) => panic!("cache-invalidator {args:?} did not finish within {PATIENCE:?}"),
    }
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Sends signal `name` (`TERM`, `HUP`, `KILL`, …) to `child` the way an operator would, with `kill`.
pub async fn send_signal(child: &tokio::process::Child, name: &str) {
    let pid = child.id().expect("child still running").to_string();
    let status = tokio::process::Command::new("kill")
        .args(["-s", name, &pid])
        .status()
        .await
        .expect("run kill");
    assert!(status.success(), "kill -s {name} failed");
}

/// One HTTP/1.1 `GET path` with `Connection: close` on the daemon's metrics listener: the status
/// code and the body, or `None` while it does not answer.
pub async fn http_response(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// `GET path` on the daemon's metrics listener: the body (whatever the status), or `None` while
/// it does not answer.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    http_response(addr, path).await.map(|(_, body)| body)
}

/// The value of one series (`name` or `name{label="value"}`) in Prometheus text.
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}
