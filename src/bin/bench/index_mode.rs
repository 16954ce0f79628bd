//! Index mode's rows of the table: the same measures as the sweep's (one change on an idle worker,
//! a burst, the app's `GET` latency, a sustained load), run against the daemon in `--mode index`,
//! plus what only the index has: how long it takes to be complete after a start, and the memory
//! it costs per indexed key.
//!
//! Index mode's targets are absolute at the run's first size (a share of one `SCAN` pass) and,
//! at larger sizes, relative to the first size's figure: clearing a change must not grow with
//! the keyspace. [`Figures`] carries the first size's figures to the next.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_invalidator::rules::RuleSet;
use cache_invalidator::settings::{Connections, Mode, SecretUrl, Settings};
use cache_invalidator::telemetry::{names, Health};
use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::layout::Layout;
use crate::measure::{self, Rows};
use crate::nodes::Nodes;
use crate::probe::{GetProbe, Phase};
use crate::scratch::PrivateRedis;
use crate::stats::{percentile, show, thousands};
use crate::sustained::{
    self, proc_status_kb, DaemonProcess, INDEX_COMPLETE as COMPLETE,
    INDEX_COMPLETE_POLL as SEED_POLL, INDEX_COMPLETE_TIMEOUT as SEED_TIMEOUT,
};
use crate::{verdict, Line, BURST_CHANGES, IDLE_GET_PERIOD, IDLE_REPEATS};

/// How often the memory measure samples the daemon process while it starts: fast enough that the
/// first sample comes before its seed has indexed any sizeable share of the keys.
const START_POLL: Duration = Duration::from_millis(2);
/// The in-process daemon's poll interval: its health state then follows the index within this
/// (see [`InProcess::start`]); an extra outbox query per interval costs the measures nothing.
const HEALTH_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// The steady load while the app's `GET`s are timed: 100 changes a second ...
const STEADY_CHANGES_PER_SECOND: u32 = 100;
/// ... for this long: a thousand changes, tens of thousands of `GET`s.
const STEADY_SECONDS: u32 = 10;
/// Sustained load in index mode: aimed a little above the 10,000 row changes/s, as the
/// sweep's load is aimed above its 5,000/s (pacing loses a few ticks; the rate achieved is
/// reported). Eight connections: one Postgres backend commits ~1,000 statements/s at best here.
const SUSTAINED_ROWS_PER_SECOND: u32 = 11_000;
const SUSTAINED_ROWS_PER_STATEMENT: u32 = 10;
const SUSTAINED_CONNECTIONS: u32 = 8;
/// The memory target holds at this many indexed keys.
const MEMORY_TARGET_KEYS: u64 = 4_000_000;
/// Targets (issue 16): shares of one `SCAN` pass at the first size ...
const IDLE_TARGET_OF_PASS: f64 = 0.02;
const BURST_TARGET_OF_PASS: f64 = 0.1;
const COMPLETE_TARGET_OF_PASS: f64 = 3.0;
/// ... and, at larger sizes, at most this factor of the first size's figure plus a slack for the
/// measures' resolution (a poll, a commit).
const GROWTH_FACTOR: f64 = 1.5;
const IDLE_GROWTH_SLACK: Duration = Duration::from_millis(2);
const BURST_GROWTH_SLACK: Duration = Duration::from_millis(20);
const GET_TARGET: f64 = 2.0;
const SUSTAINED_TARGET_ROWS: f64 = 10_000.0;
const SUSTAINED_TARGET_AGE_P99: f64 = 0.5;
const MEMORY_TARGET_BYTES_PER_KEY: f64 = 100.0;

/// What the index-mode measures of one size need from the bench.
pub struct Context<'a> {
    pub db_url: &'a str,
    pub redis_server: &'a PrivateRedis,
    pub redis: &'a Nodes,
    pub client: &'a Client,
    pub poller: &'a Client,
    pub layout: &'a Layout,
    /// One `SCAN MATCH` pass over this keyspace.
    pub reference: Duration,
    pub keys_label: &'a str,
    pub worker_binary: &'a Path,
    pub sustained_seconds: u64,
    /// The run's first size: the sustained load runs here.
    pub first: bool,
    /// The run's largest size: the memory measure runs here.
    pub largest: bool,
}

/// Index mode's figures at one size, for the comparison at the next sizes.
pub struct Figures {
    keys_label: String,
    idle: Duration,
    burst: Duration,
}

/// Runs index mode's measures on this size; returns their lines and figures.
pub async fn measure(
    context: &Context<'_>,
    rows: &mut Rows,
    base: Option<&Figures>,
) -> (Vec<Line>, Figures) {
    let label = context.keys_label;
    let reference_s = context.reference.as_secs_f64();
    let line =
        |measure: String, value: String, ratio: String, target: String, verdict: String| Line {
            measure,
            keys: label.to_owned(),
            value,
            ratio,
            target,
            verdict,
        };
    let mut lines = Vec::new();
    // First, while the keyspace is whole: every later measure removes keys (the sustained load
    // most of them).
    let memory = if context.largest {
        Some(memory_line(context, &line).await)
    } else {
        None
    };

    let daemon = InProcess::start(context);
    let complete_after = daemon.wait_complete().await;
    eprintln!(
        "[{label} keys] index mode: index complete after {}",
        show(complete_after)
    );
    let complete_ratio = complete_after.as_secs_f64() / reference_s;
    lines.push(line(
        "index mode: index complete after start (tracking on, then one `SCAN` of the keyspace \
         while Redis announces writes)"
            .to_owned(),
        show(complete_after),
        format!("{complete_ratio:.2}×"),
        format!("≤ {COMPLETE_TARGET_OF_PASS}×"),
        verdict(
            complete_ratio <= COMPLETE_TARGET_OF_PASS,
            percent_over(complete_ratio, COMPLETE_TARGET_OF_PASS),
        ),
    ));

    // The app's GETs: idle first, then while a steady stream of changes is cleared.
    let probe = GetProbe::start(
        &context.redis_server.node_urls(),
        context.redis_server.router(),
        *context.layout,
    );
    probe.set(Phase::Idle);
    tokio::time::sleep(IDLE_GET_PERIOD).await;
    probe.set(Phase::Sweep);
    let steady = measure::steady(
        context.client,
        context.poller,
        context.redis,
        rows,
        context.layout,
        STEADY_CHANGES_PER_SECOND,
        STEADY_SECONDS,
    )
    .await;
    probe.set(Phase::Off);
    let (idle_gets, busy_gets) = probe.finish();
    eprintln!(
        "[{label} keys] index mode: {} changes at {STEADY_CHANGES_PER_SECOND}/s cleared, {} \
         after the last commit",
        STEADY_CHANGES_PER_SECOND * STEADY_SECONDS,
        show(steady.latency)
    );

    let (idle, idle_keys) = measure::idle_change(
        context.client,
        context.poller,
        context.redis,
        rows,
        context.layout,
        IDLE_REPEATS,
        None,
    )
    .await;
    eprintln!("[{label} keys] index mode: idle change {}", show(idle));
    let burst = measure::burst(
        context.db_url,
        context.poller,
        context.redis,
        rows,
        context.layout,
        BURST_CHANGES,
    )
    .await;
    eprintln!(
        "[{label} keys] index mode: burst {} after the last commit ({} committing)",
        show(burst.latency),
        show(burst.committing)
    );
    daemon.stop().await;

    let figures = Figures {
        keys_label: label.to_owned(),
        idle,
        burst: burst.latency,
    };
    let (target, met, by) = latency_target(
        idle,
        reference_s,
        IDLE_TARGET_OF_PASS,
        base.map(|base| (base.idle, &base.keys_label)),
        IDLE_GROWTH_SLACK,
    );
    lines.push(line(
        format!("index mode: idle single change: commit → keys gone (median of {IDLE_REPEATS})"),
        format!("{} ({} keys)", show(idle), thousands(idle_keys)),
        format!("{:.3}×", idle.as_secs_f64() / reference_s),
        target,
        verdict(met, by),
    ));
    let (target, met, by) = latency_target(
        burst.latency,
        reference_s,
        BURST_TARGET_OF_PASS,
        base.map(|base| (base.burst, &base.keys_label)),
        BURST_GROWTH_SLACK,
    );
    lines.push(line(
        format!(
            "index mode: burst: {BURST_CHANGES} committed changes (10 % owner changes), last \
             commit → keys gone"
        ),
        format!(
            "{} ({} keys; committing took {})",
            show(burst.latency),
            thousands(burst.keys_removed),
            show(burst.committing)
        ),
        format!("{:.3}×", burst.latency.as_secs_f64() / reference_s),
        target,
        verdict(met, by),
    ));
    let idle_p99 = percentile(&idle_gets, 99.0);
    let busy_p99 = percentile(&busy_gets, 99.0);
    let get_ratio = busy_p99 / idle_p99.max(1e-9);
    lines.push(line(
        format!(
            "index mode: app `GET` p99: idle vs while {STEADY_CHANGES_PER_SECOND} changes/s are \
             cleared for {STEADY_SECONDS} s"
        ),
        format!(
            "{idle_p99:.0} µs vs {busy_p99:.0} µs ({} / {} GETs; {} keys cleared, the last {} \
             after its commit)",
            idle_gets.len(),
            busy_gets.len(),
            thousands(steady.keys_removed),
            show(steady.latency)
        ),
        format!("{get_ratio:.2}×"),
        format!("≤ {GET_TARGET}× idle"),
        verdict(get_ratio <= GET_TARGET, percent_over(get_ratio, GET_TARGET)),
    ));

    if context.first {
        lines.push(sustained_line(context, &line).await);
    }
    lines.extend(memory);
    (lines, figures)
}

/// An index-mode latency's target: a share of one pass at the first size, or within
/// [`GROWTH_FACTOR`] (+ `slack`) of the first size's figure at a larger one. Returns the target's
/// text, whether it is met and by how much it is missed.
fn latency_target(
    value: Duration,
    reference_s: f64,
    share_of_pass: f64,
    base: Option<(Duration, &String)>,
    slack: Duration,
) -> (String, bool, String) {
    match base {
        None => {
            let ratio = value.as_secs_f64() / reference_s;
            (
                format!("≤ {share_of_pass}×"),
                ratio <= share_of_pass,
                percent_over(ratio, share_of_pass),
            )
        }
        Some((base, base_keys)) => {
            let limit = base.mul_f64(GROWTH_FACTOR) + slack;
            (
                format!(
                    "≤ {GROWTH_FACTOR} × the {base_keys}-key figure ({}) + {} = {}",
                    show(base),
                    show(slack),
                    show(limit)
                ),
                value <= limit,
                format!(
                    "{:+.0} %",
                    (value.as_secs_f64() / limit.as_secs_f64() - 1.0) * 100.0
                ),
            )
        }
    }
}

fn percent_over(ratio: f64, target: f64) -> String {
    format!("{:+.0} %", (ratio / target - 1.0) * 100.0)
}

/// The sustained load against the daemon process in `--mode index`.
async fn sustained_line(
    context: &Context<'_>,
    line: &impl Fn(String, String, String, String, String) -> Line,
) -> Line {
    let log = std::env::temp_dir().join(format!(
        "cache-invalidator-bench-index-{}.log",
        std::process::id()
    ));
    eprintln!(
        "[{} keys] index mode: sustained load for {} s (worker log: {})",
        context.keys_label,
        context.sustained_seconds,
        log.display()
    );
    let plan = sustained::Plan {
        mode: Mode::Index,
        seconds: context.sustained_seconds,
        rows_per_second: SUSTAINED_ROWS_PER_SECOND,
        rows_per_statement: SUSTAINED_ROWS_PER_STATEMENT,
        connections: SUSTAINED_CONNECTIONS,
    };
    let run = sustained::run(
        context.worker_binary,
        context.db_url,
        context.redis_server,
        context.poller,
        context.layout,
        &plan,
        &log,
    )
    .await;
    line(
        format!(
            "index mode: sustained: {:.0} row changes/s for {:.0} s from a load process ({} rows \
             per UPDATE, {SUSTAINED_CONNECTIONS} connections), daemon as its own process \
             (`--mode index`, refill guard 2 s): backlog age",
            run.rows_per_second, run.seconds, run.rows_per_statement
        ),
        format!(
            "p99 {:.2} s, max {:.2} s; drained {} after the load; {} sweep passes; CPU during \
             the load: daemon {}, Redis {} of a core; VmHWM {:.1} MB",
            run.age_p99,
            run.age_max,
            show(run.drain_after_load),
            run.passes,
            run.daemon_cpu
                .map_or("?".to_owned(), |share| format!("{:.0} %", share * 100.0)),
            run.redis_cpu
                .map_or("?".to_owned(), |share| format!("{:.0} %", share * 100.0)),
            run.hwm_kb as f64 / 1024.0
        ),
        String::new(),
        format!(
            "≥ {}/s with p99 < {SUSTAINED_TARGET_AGE_P99} s",
            thousands(SUSTAINED_TARGET_ROWS as u64)
        ),
        verdict(
            run.rows_per_second >= SUSTAINED_TARGET_ROWS && run.age_p99 < SUSTAINED_TARGET_AGE_P99,
            format!(
                "{:.0} rows/s, p99 {:.2} s",
                run.rows_per_second, run.age_p99
            ),
        ),
    )
}

/// The daemon process in `--mode index`: its resident memory before the seed and once the index
/// is complete, the growth divided by the keys it indexed (`cache_invalidator_index_keys`).
async fn memory_line(
    context: &Context<'_>,
    line: &impl Fn(String, String, String, String, String) -> Line,
) -> Line {
    let log = std::env::temp_dir().join(format!(
        "cache-invalidator-bench-memory-{}.log",
        std::process::id()
    ));
    let daemon = DaemonProcess::spawn(
        context.worker_binary,
        context.db_url,
        context.redis_server,
        Mode::Index,
        &log,
    );
    let started = Instant::now();
    // Before the seed: the first moment its metrics listener answers, which it binds before the
    // worker connects to Redis. Any key indexed by then is subtracted below.
    let (rss_before_kb, keys_before) = loop {
        if let Some(metrics) = daemon.scrape("/metrics") {
            let rss = proc_status_kb(daemon.pid, "VmRSS:").unwrap_or(0);
            let keys = sustained::metric_value(&metrics, names::INDEX_KEYS).unwrap_or(0.0);
            break (rss, keys as u64);
        }
        assert!(
            started.elapsed() < SEED_TIMEOUT,
            "the daemon's metrics never answered: see {}",
            log.display()
        );
        tokio::time::sleep(START_POLL).await;
    };
    daemon.wait_index_complete(&log).await;
    let complete_after = started.elapsed();
    let rss_after_kb = proc_status_kb(daemon.pid, "VmRSS:").unwrap_or(0);
    let hwm_kb = proc_status_kb(daemon.pid, "VmHWM:").unwrap_or(0);
    let keys_after = daemon
        .scrape("/metrics")
        .and_then(|metrics| sustained::metric_value(&metrics, names::INDEX_KEYS))
        .unwrap_or(0.0) as u64;
    daemon.stop();
    let indexed = keys_after.saturating_sub(keys_before);
    let growth_bytes = rss_after_kb.saturating_sub(rss_before_kb) as f64 * 1024.0;
    let per_key = growth_bytes / indexed.max(1) as f64;
    let peak_per_key = hwm_kb.saturating_sub(rss_before_kb) as f64 * 1024.0 / indexed.max(1) as f64;
    eprintln!(
        "[{} keys] index mode: {per_key:.0} bytes of RSS per indexed key ({} keys)",
        context.keys_label,
        thousands(keys_after)
    );
    let at_target_size = keys_after >= MEMORY_TARGET_KEYS;
    line(
        "index mode: worker memory, daemon as its own process (`--mode index`): VmRSS growth from \
         before the seed to the index complete, per indexed key"
            .to_owned(),
        format!(
            "{per_key:.0} bytes/key ({:.1} MB → {:.1} MB for {} keys; peak {peak_per_key:.0} \
             bytes/key (VmHWM {:.1} MB); complete {} after the process started)",
            rss_before_kb as f64 / 1024.0,
            rss_after_kb as f64 / 1024.0,
            thousands(keys_after),
            hwm_kb as f64 / 1024.0,
            show(complete_after)
        ),
        String::new(),
        format!(
            "≤ {MEMORY_TARGET_BYTES_PER_KEY:.0} bytes/key at {} indexed keys",
            thousands(MEMORY_TARGET_KEYS)
        ),
        match (per_key <= MEMORY_TARGET_BYTES_PER_KEY, at_target_size) {
            (met, true) => verdict(met, format!("{per_key:.0} bytes/key")),
            (true, false) => format!(
                "met at {} keys (the target's size needs a larger --keys)",
                thousands(keys_after)
            ),
            (false, false) => format!(
                "MISSED ({per_key:.0} bytes/key at {} keys)",
                thousands(keys_after)
            ),
        },
    )
}

/// The daemon in-process in `--mode index`, on a one-thread runtime of its own as the
/// `cache-invalidator` binary runs it, with the health state that says when the index is complete.
struct InProcess {
    token: CancellationToken,
    health: Arc<Health>,
    started: Instant,
    thread: std::thread::JoinHandle<Result<(), cache_invalidator::worker::RunError>>,
}

impl InProcess {
    fn start(context: &Context<'_>) -> InProcess {
        let mut settings = Settings::new(Connections {
            database_url: SecretUrl::new(context.db_url.to_owned()),
            redis_url: SecretUrl::new(context.redis_server.daemon_url()),
            redis_ca_file: None,
        });
        settings.mode = Mode::Index;
        // As in the sweep's rows: the changes' own clearing alone, no refill guard.
        settings.refill_guard = Duration::ZERO;
        // The worker updates its health state (what says "complete") once per turn of its loop,
        // and an idle worker turns once per poll interval: at the default 5 s the state trails
        // the seed by up to 5 s, which the "complete after start" figure would include.
        settings.poll_interval = HEALTH_POLL_INTERVAL;
        let health = Arc::new(Health::new(Duration::MAX));
        let token = CancellationToken::new();
        let (daemon_health, daemon_token) = (health.clone(), token.clone());
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            let (_rules_tx, rules_rx) = watch::channel(Arc::new(RuleSet::builtin()));
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the daemon's runtime")
                .block_on(cache_invalidator::worker::run_with_rules(
                    settings,
                    rules_rx,
                    daemon_health,
                    daemon_token,
                ))
        });
        InProcess {
            token,
            health,
            started,
            thread,
        }
    }

    /// Waits until every node's part is seeded; returns how long after the start that was.
    async fn wait_complete(&self) -> Duration {
        while self.health.mode() != COMPLETE {
            assert!(
                !self.thread.is_finished(),
                "the index-mode worker stopped before its index was complete"
            );
            assert!(
                self.started.elapsed() < SEED_TIMEOUT,
                "the index was not complete within {SEED_TIMEOUT:?} (mode: {})",
                self.health.mode()
            );
            tokio::time::sleep(SEED_POLL).await;
        }
        self.started.elapsed()
    }

    async fn stop(self) {
        self.token.cancel();
        let thread = self.thread;
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => panic!("the index-mode worker failed: {error}"),
            Ok(Err(_)) | Err(_) => panic!("the index-mode worker panicked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_size_is_held_to_a_share_of_the_pass() {
        let (target, met, _) = latency_target(
            Duration::from_millis(15),
            1.0,
            IDLE_TARGET_OF_PASS,
            None,
            IDLE_GROWTH_SLACK,
        );
        assert_eq!(target, "≤ 0.02×");
        assert!(met);
        let (_, met, by) = latency_target(
            Duration::from_millis(30),
            1.0,
            IDLE_TARGET_OF_PASS,
            None,
            IDLE_GROWTH_SLACK,
        );
        assert!(!met);
        assert_eq!(by, "+50 %");
    }

    #[test]
    fn larger_sizes_are_held_to_the_first_sizes_figure() {
        let base = (Duration::from_millis(10), &"1,000,000".to_owned());
        // 1.5 × 10 ms + 2 ms = 17 ms, whatever the pass at this size.
        let within = latency_target(
            Duration::from_millis(17),
            0.1,
            IDLE_TARGET_OF_PASS,
            Some(base),
            IDLE_GROWTH_SLACK,
        );
        assert!(within.1, "{}", within.0);
        assert!(within.0.contains("1,000,000-key figure"), "{}", within.0);
        let beyond = latency_target(
            Duration::from_millis(18),
            100.0,
            IDLE_TARGET_OF_PASS,
            Some(base),
            IDLE_GROWTH_SLACK,
        );
        assert!(!beyond.1, "{}", beyond.0);
    }

    #[test]
    fn a_metric_is_read_by_its_exact_name() {
        let scrape = "# TYPE cache_invalidator_index_keys gauge\n\
                      cache_invalidator_index_keys_other 7\n\
                      cache_invalidator_index_keys 4053829\n";
        assert_eq!(
            sustained::metric_value(scrape, names::INDEX_KEYS),
            Some(4_053_829.0)
        );
        assert_eq!(sustained::metric_value("", names::INDEX_KEYS), None);
    }
}
