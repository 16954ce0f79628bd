//! Sustained load: a separate load process (this binary in `load` mode) commits row changes at a
//! fixed rate while the real daemon runs as its own process (`cache-invalidator run --mode …`); the bench
//! samples the outbox's oldest pending change every 100 ms and the daemon's resident memory from
//! `/proc/<pid>/status`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cache_invalidator::settings::Mode;
use tokio_postgres::Client;

use crate::layout::KINDS;
use crate::measure::wait_drained;
use crate::scratch::PrivateRedis;
use crate::stats::{percentile, Rng};
use crate::Size;

/// How often the backlog age and the daemon's memory are sampled (every 100 ms).
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// What `/healthz` says once every node's part of the index is seeded.
pub const INDEX_COMPLETE: &str = "index (complete)";
/// A seed slower than this means the daemon is stuck (a 5M-key seed takes seconds).
pub const INDEX_COMPLETE_TIMEOUT: Duration = Duration::from_secs(600);
/// How often `/healthz` is asked whether the index is complete: the resolution of that figure.
pub const INDEX_COMPLETE_POLL: Duration = Duration::from_millis(5);

/// What the load process does: `rows_per_second` row changes, as UPDATE statements of
/// `rows_per_statement` random rows each, from `connections` connections, for `seconds`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    #[arg(long)]
    pub database_url: String,
    #[arg(long, default_value_t = 5_000)]
    pub rows_per_second: u32,
    #[arg(long, default_value_t = 10)]
    pub rows_per_statement: u32,
    #[arg(long, default_value_t = 4)]
    pub connections: u32,
    #[arg(long)]
    pub seconds: u64,
    /// Report ids with cached keys (the load changes those rows).
    #[arg(long)]
    pub reports: u32,
    #[arg(long)]
    pub users: u32,
}

/// The load process: paced UPDATEs, each its own transaction; one owner change in every tenth
/// statement. Prints `rows <n> seconds <s>` when done.
pub async fn load(args: LoadArgs) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let statements_per_second =
        f64::from(args.rows_per_second) / f64::from(args.rows_per_statement.max(1));
    let period =
        Duration::from_secs_f64(f64::from(args.connections.max(1)) / statements_per_second);
    let mut tasks = Vec::new();
    for connection in 0..args.connections {
        let args = args.clone();
        tasks.push(tokio::spawn(async move {
            let client = crate::scratch::connect(&args.database_url).await;
            let mut rng = Rng::new(1_000 + u64::from(connection));
            let mut ticks = tokio::time::interval(period);
            // Behind schedule (Postgres slower than the rate): catch up, so the achieved rate
            // says what the machine could do.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut rows = 0u64;
            let mut statement = 0u64;
            while Instant::now() < deadline {
                ticks.tick().await;
                statement += 1;
                let kind = &KINDS[(rng.next_u64() % KINDS.len() as u64) as usize];
                let ids: Vec<String> = (0..args.rows_per_statement)
                    .map(|_| rng.one_to(args.reports).to_string())
                    .collect();
                let mut sql = format!(
                    "UPDATE {} SET {} = 'load {connection} {statement}'",
                    kind.table, kind.text
                );
                if statement.is_multiple_of(10) {
                    sql.push_str(&format!(
                        ", {owner} = CASE WHEN id = {} THEN {} ELSE {owner} END",
                        ids[0],
                        rng.one_to(args.users),
                        owner = kind.owners[0]
                    ));
                }
                sql.push_str(&format!(" WHERE id IN ({})", ids.join(",")));
                let changed = client.execute(&sql, &[]).await.expect("load UPDATE");
                rows += changed;
            }
            rows
        }));
    }
    let mut rows = 0;
    for task in tasks {
        rows += task.await.expect("a load task");
    }
    println!("rows {rows} seconds {:.3}", started.elapsed().as_secs_f64());
}

pub struct Sustained {
    pub seconds: f64,
    pub rows_per_second: f64,
    pub rows_per_statement: u32,
    pub age_p99: f64,
    pub age_max: f64,
    pub drain_after_load: Duration,
    pub rss_max_kb: u64,
    pub hwm_kb: u64,
    /// The daemon's resident memory once connected, before any load.
    pub rss_idle_kb: u64,
    /// Mean duration of the daemon's passes during the run (its own sweep-duration histogram).
    pub mean_pass: Option<Duration>,
    pub passes: u64,
    /// Share of one core the daemon and Redis (summed over its servers) used during the load.
    pub daemon_cpu: Option<f64>,
    pub redis_cpu: Option<f64>,
}

impl Sustained {
    /// The daemon's and Redis' share of a core during the load, as the table prints them.
    pub fn cpu_shares(&self) -> String {
        let share =
            |share: Option<f64>| share.map_or("?".to_owned(), |s| format!("{:.0} %", s * 100.0));
        format!(
            "daemon {}, Redis {} of a core",
            share(self.daemon_cpu),
            share(self.redis_cpu)
        )
    }
}

/// `<name>_sum` and `<name>_count` of a Prometheus histogram in a scrape.
fn histogram_sum_count(scrape: &str, name: &str) -> Option<(f64, u64)> {
    let value = |suffix: &str| {
        scrape.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(suffix)?;
            rest.split_whitespace().last()?.parse::<f64>().ok()
        })
    };
    Some((value("_sum")?, value("_count")? as u64))
}

/// The value of an unlabelled gauge or counter `name` in a scrape.
pub fn metric_value(scrape: &str, name: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// One plain HTTP/1.0 GET of the daemon's `path` (`/metrics`, `/healthz`); the whole response.
fn scrape(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    Some(body)
}

/// The daemon's binary: next to this one in the target directory, built first when the bench runs
/// under `cargo run` (so it is the code of this tree, not a stale build).
pub fn worker_binary() -> PathBuf {
    let here = std::env::current_exe().expect("the bench's own path");
    let dir = here.parent().expect("the bench's directory").to_path_buf();
    if let Ok(cargo) = std::env::var("CARGO") {
        let profile_release = dir.file_name().is_some_and(|name| name == "release");
        let mut build = Command::new(cargo);
        build.args([
            "build",
            "-p",
            "cache-invalidator",
            "--bin",
            "cache-invalidator",
        ]);
        // `cargo run` gave this process the package's own variables; build scripts that watch
        // them (ring's does) would see them change and rebuild, here and again at the next run.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_PRIMARY_",
            ]
            .iter()
            .any(|prefix| name.starts_with(prefix))
            {
                build.env_remove(name.as_ref());
            }
        }
        if profile_release {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "building cache-invalidator failed");
    }
    let binary = dir.join("cache-invalidator");
    assert!(
        binary.exists(),
        "{} is missing: run `cargo build --release` first",
        binary.display()
    );
    binary
}

/// CPU time a process has used so far (user + system), from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in field 2 may hold spaces; the fields after its `)` are plain.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the `)`.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(
        ticks as f64 / clock_ticks_per_second(),
    ))
}

/// The kernel's `USER_HZ`, the unit of `/proc/<pid>/stat` times (100 on every common Linux);
/// asked of `getconf` once.
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|output| String::from_utf8_lossy(&output.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Share of one core each process used between two readings of [`cpu_time`].
fn core_share(before: Option<Duration>, after: Option<Duration>, wall: Duration) -> Option<f64> {
    Some((after?.saturating_sub(before?)).as_secs_f64() / wall.as_secs_f64().max(1e-9))
}

pub fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The daemon binary running as its own process, as an operator runs it, with its metrics
/// listener on a free port.
pub struct DaemonProcess {
    child: std::process::Child,
    pub pid: u32,
    pub metrics_port: u16,
}

impl DaemonProcess {
    /// Starts `cache-invalidator run --mode <mode>`; its log goes to `log`. Returns at once: see
    /// [`DaemonProcess::wait_listening`].
    pub fn spawn(
        worker: &Path,
        db_url: &str,
        redis: &PrivateRedis,
        mode: Mode,
        log: &Path,
    ) -> Self {
        let log_file = std::fs::File::create(log).expect("the worker's log file");
        let metrics_port = crate::scratch::free_port();
        let child = Command::new(worker)
            .arg("run")
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(["--mode", &mode.to_string()])
            .env("DATABASE_URL", db_url)
            .env("REDIS_URL", redis.daemon_url())
            .env(
                "RUST_LOG",
                std::env::var("BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start cache-invalidator run");
        DaemonProcess {
            pid: child.id(),
            child,
            metrics_port,
        }
    }

    /// Waits until the daemon's LISTEN connection is up.
    pub async fn wait_listening(&self, poller: &Client, log: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let listening = !cache_invalidator::ops::connected_workers(poller)
                .await
                .expect("look for the worker")
                .is_empty();
            if listening {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the worker did not start: see {}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `/healthz` says the index is complete (`--mode index`).
    pub async fn wait_index_complete(&self, log: &Path) {
        let deadline = Instant::now() + INDEX_COMPLETE_TIMEOUT;
        while !self
            .scrape("/healthz")
            .is_some_and(|health| health.contains(INDEX_COMPLETE))
        {
            assert!(
                Instant::now() < deadline,
                "the daemon's index was not complete within {INDEX_COMPLETE_TIMEOUT:?}: see {}",
                log.display()
            );
            tokio::time::sleep(INDEX_COMPLETE_POLL).await;
        }
    }

    /// The sum and count of the daemon's sweep-duration histogram so far.
    fn sweep_passes(&self) -> Option<(f64, u64)> {
        let metrics = self.scrape("/metrics")?;
        histogram_sum_count(
            &metrics,
            cache_invalidator::telemetry::names::SWEEP_DURATION,
        )
    }

    /// One scrape of the daemon's `/metrics` or `/healthz`.
    pub fn scrape(&self, path: &str) -> Option<String> {
        scrape(self.metrics_port, path)
    }

    /// SIGTERM, as systemd would stop it; it exits 0 after the batch in flight.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// What the sustained measure runs: the daemon's mode and the load it is given.
pub struct Plan {
    pub mode: Mode,
    pub seconds: u64,
    /// The load's target; the table reports the rate achieved.
    pub rows_per_second: u32,
    pub rows_per_statement: u32,
    /// Connections the load process commits on.
    pub connections: u32,
}

/// Runs the plan's load against the daemon as its own process; samples the backlog's age and the
/// daemon's memory meanwhile.
pub async fn run(size: &Size<'_>, plan: &Plan) -> Sustained {
    let log = log_path(&plan.mode.to_string());
    eprintln!(
        "[{} keys] {} mode: sustained load for {} s (worker log: {})",
        size.keys,
        plan.mode,
        plan.seconds,
        log.display()
    );
    let daemon = DaemonProcess::spawn(
        size.worker_binary,
        size.db_url,
        size.redis_server,
        plan.mode,
        &log,
    );
    let pid = daemon.pid;
    daemon.wait_listening(size.poller, &log).await;
    if plan.mode == Mode::Index {
        // The load measures the index at work, not the sweep that clears changes while it seeds.
        daemon.wait_index_complete(&log).await;
    }
    let rss_idle_kb = proc_status_kb(pid, "VmRSS:").unwrap_or(0);
    let passes_before = daemon.sweep_passes().unwrap_or((0.0, 0));
    let redis_pids = size.redis_server.pids();
    let redis_cpu = || -> Option<Duration> { redis_pids.iter().map(|&pid| cpu_time(pid)).sum() };
    let (daemon_cpu_before, redis_cpu_before) = (cpu_time(pid), redis_cpu());
    let load_started = Instant::now();
    let load = tokio::spawn(load_process(size, plan).wait_with_output());
    let (ages, rss_max_kb) = sample(size.poller, pid, &load).await;
    let load_done = Instant::now();
    let load_wall = load_done - load_started;
    let daemon_cpu = core_share(daemon_cpu_before, cpu_time(pid), load_wall);
    let redis_cpu = core_share(redis_cpu_before, redis_cpu(), load_wall);
    let (rows, elapsed) = load_report(load.await.expect("the load process' task"));
    let passes_during = daemon
        .sweep_passes()
        .map(|(sum, count)| (sum - passes_before.0, count.saturating_sub(passes_before.1)));
    let drained = wait_drained(size.poller).await;
    let hwm_kb = proc_status_kb(pid, "VmHWM:").unwrap_or(0);
    daemon.stop();
    Sustained {
        seconds: elapsed,
        rows_per_second: rows / elapsed.max(0.001),
        rows_per_statement: plan.rows_per_statement,
        age_p99: percentile(&ages, 99.0),
        age_max: percentile(&ages, 100.0),
        drain_after_load: drained.saturating_duration_since(load_done),
        rss_max_kb,
        hwm_kb,
        rss_idle_kb,
        mean_pass: passes_during
            .filter(|(_, count)| *count > 0)
            .map(|(sum, count)| Duration::from_secs_f64(sum / count as f64)),
        passes: passes_during.map_or(0, |(_, count)| count),
        daemon_cpu,
        redis_cpu,
    }
}

/// Where a daemon process started by the bench logs: `what` tells the runs of one bench apart.
pub fn log_path(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "cache-invalidator-bench-{what}-{}.log",
        std::process::id()
    ))
}

/// Starts this binary in `load` mode with the plan's load on the size's scratch database.
fn load_process(size: &Size<'_>, plan: &Plan) -> tokio::process::Child {
    tokio::process::Command::new(std::env::current_exe().expect("the bench's path"))
        .args(["load", "--database-url", size.db_url])
        .args(["--seconds", &plan.seconds.to_string()])
        .args(["--rows-per-second", &plan.rows_per_second.to_string()])
        .args(["--rows-per-statement", &plan.rows_per_statement.to_string()])
        .args(["--connections", &plan.connections.to_string()])
        .args(["--reports", &size.layout.reports.to_string()])
        .args(["--users", &size.layout.users.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the load process")
}

/// Samples the outbox's oldest pending change and the daemon's VmRSS every [`SAMPLE_EVERY`]
/// until the load is over; returns the ages (s) and the largest VmRSS (kB).
async fn sample<T>(
    poller: &Client,
    pid: u32,
    load: &tokio::task::JoinHandle<T>,
) -> (Vec<f64>, u64) {
    let mut ages = Vec::new();
    let mut rss_max_kb = 0;
    let mut ticks = tokio::time::interval(SAMPLE_EVERY);
    while !load.is_finished() {
        ticks.tick().await;
        let age: f64 = poller
            .query_one(
                "SELECT coalesce(extract(epoch FROM clock_timestamp() - min(created_at))::float8, 0) \
                 FROM cache_invalidator.outbox",
                &[],
            )
            .await
            .expect("sample the backlog")
            .get(0);
        ages.push(age);
        rss_max_kb = rss_max_kb.max(proc_status_kb(pid, "VmRSS:").unwrap_or(0));
    }
    (ages, rss_max_kb)
}

/// The rows the load process changed and the seconds it took, from its `rows <n> seconds <s>`.
fn load_report(output: std::io::Result<std::process::Output>) -> (f64, f64) {
    let output = output.expect("the load process");
    assert!(output.status.success(), "the load process failed");
    let report = String::from_utf8_lossy(&output.stdout);
    let mut words = report.split_whitespace();
    match (words.nth(1), words.nth(1)) {
        (Some(rows), Some(seconds)) => (
            rows.parse::<f64>().expect("the load's row count"),
            seconds.parse::<f64>().expect("the load's duration"),
        ),
        _ => panic!("unexpected load report {report:?}"),
    }
}
