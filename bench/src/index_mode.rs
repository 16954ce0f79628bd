//! Index mode's rows of the table: the same measures as the sweep's (one change on an idle worker,
//! a burst, the app's `GET` latency, a sustained load), run against the daemon in `--mode index`,
//! plus what only the index has: how long it takes to be complete after a start, and the memory
//! it costs per indexed key.
//!
//! Index mode's targets are absolute at the run's first size (a share of one `SCAN` pass) and,
//! at larger sizes, relative to the first size's figure: clearing a change must not grow with
//! the keyspace. [`Figures`] carries the first size's figures to the next.

use std::time::{Duration, Instant};

use cache_invalidator::settings::Mode;
use cache_invalidator::telemetry::names;

use crate::daemon::InProcess;
use crate::measure::{self, IdleThenBurst, Rows};
use crate::probe::GetProbe;
use crate::stats::{percentile, show, thousands};
use crate::sustained::{self, log_path, proc_status_kb, DaemonProcess, INDEX_COMPLETE_TIMEOUT};
use crate::table::{self, Judged, Line};
use crate::{Size, BURST_CHANGES, IDLE_REPEATS};

/// How often the memory measure samples the daemon process while it starts: fast enough that the
/// first sample comes before its seed has indexed any sizeable share of the keys.
const START_POLL: Duration = Duration::from_millis(2);
/// The in-process daemon's poll interval: the worker updates its health state (what says
/// "complete") once per turn of its loop, and an idle worker turns once per poll interval; at the
/// default 5 s the latency measures would wait up to 5 s for it to start. An extra outbox query
/// per interval costs the measures nothing.
const HEALTH_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// The steady load while the app's `GET`s are timed: 100 changes a second ...
const STEADY_CHANGES_PER_SECOND: u32 = 100;
/// ... for this long: a thousand changes, tens of thousands of `GET`s.
const STEADY_SECONDS: u32 = 10;
/// Sustained load in index mode: eight connections, as one Postgres backend commits ~1,000
/// statements/s at best here.
const SUSTAINED_CONNECTIONS: u32 = 8;

/// Index mode's figures at one size, for the comparison at the next sizes.
pub struct Figures {
    keys_label: String,
    idle: Duration,
    burst: Duration,
}

/// Runs index mode's measures on this size; returns their lines and figures.
pub async fn measure(
    size: &Size<'_>,
    rows: &mut Rows,
    base: Option<&Figures>,
) -> (Vec<Line>, Figures) {
    // First, while the keyspace is whole: every later measure removes keys (the sustained load
    // most of them). The daemon binary as its own process, timed from its start.
    let started = process_start(size).await;
    let daemon = InProcess::start(
        size.db_url,
        size.redis_server.daemon_url(),
        Mode::Index,
        Some(HEALTH_POLL_INTERVAL),
    );
    daemon.wait_complete().await;
    let mut lines = vec![started.complete_line(size)];
    let get = get_line(size, rows).await;
    let measured = measure::idle_then_burst(size, rows, None, "index mode: ").await;
    daemon.stop().await;
    lines.extend(latency_lines(size, &measured, base));
    lines.push(get);
    if size.options.first {
        lines.extend(sustained_lines(size).await);
    }
    lines.extend(started.memory_lines(size));
    let figures = Figures {
        keys_label: size.keys.clone(),
        idle: measured.idle,
        burst: measured.burst.latency,
    };
    (lines, figures)
}

/// The idle change's and the burst's lines, against a share of one pass at the first size or
/// the first size's figures at a larger one.
fn latency_lines(size: &Size<'_>, measured: &IdleThenBurst, base: Option<&Figures>) -> Vec<Line> {
    let (idle, burst) = (measured.idle, &measured.burst);
    let base_of = |figure: fn(&Figures) -> Duration| {
        base.map(|base| (figure(base), base.keys_label.as_str()))
    };
    vec![
        size.line(
            format!(
                "index mode: idle single change: commit → keys gone (median of {IDLE_REPEATS})"
            ),
            measured.idle_value(),
            format!("{:.3}×", size.passes(idle)),
            table::INDEX_IDLE.judge(idle, size.reference, base_of(|base| base.idle)),
        ),
        size.line(
            format!(
                "index mode: burst: {BURST_CHANGES} committed changes (10 % owner changes), last \
                 commit → keys gone"
            ),
            measured.burst_value(),
            format!("{:.3}×", size.passes(burst.latency)),
            table::INDEX_BURST.judge(burst.latency, size.reference, base_of(|base| base.burst)),
        ),
    ]
}

/// The app's `GET`s: idle first, then while a steady stream of changes is cleared.
async fn get_line(size: &Size<'_>, rows: &mut Rows) -> Line {
    let probe = GetProbe::after_idle(size).await;
    let steady = measure::steady(
        size,
        rows,
        STEADY_CHANGES_PER_SECOND,
        STEADY_SECONDS,
        &probe,
    )
    .await;
    let (idle_gets, busy_gets) = probe.finish();
    eprintln!(
        "[{} keys] index mode: {} changes at {STEADY_CHANGES_PER_SECOND}/s cleared, {} after \
         the last commit",
        size.keys,
        STEADY_CHANGES_PER_SECOND * STEADY_SECONDS,
        show(steady.latency)
    );
    let idle_p99 = percentile(&idle_gets, 99.0);
    let busy_p99 = percentile(&busy_gets, 99.0);
    let ratio = busy_p99 / idle_p99.max(1e-9);
    size.line(
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
        format!("{ratio:.2}×"),
        table::INDEX_GET_P99.judge(ratio),
    )
}

/// The sustained load against the daemon process in `--mode index`, `--repeat` times in a row:
/// a line per run, as the target asks for consecutive runs.
async fn sustained_lines(size: &Size<'_>) -> Vec<Line> {
    let repeat = size.options.repeat.max(1);
    let mut lines = Vec::new();
    for run in 1..=repeat {
        let label = match repeat {
            1 => String::new(),
            _ => format!(" (run {run} of {repeat})"),
        };
        if run > 1 {
            // The last run's load removed most report keys: each run starts from the full
            // keyspace, or the later runs would measure a daemon with little left to delete.
            crate::layout::fill(size.redis, &size.layout).await;
        }
        lines.push(sustained_line(size, &label).await);
    }
    lines
}

/// One sustained run: the backlog's age and the daemon's share of a core, each with its target.
async fn sustained_line(size: &Size<'_>, label: &str) -> Line {
    let plan = sustained::Plan {
        mode: Mode::Index,
        seconds: size.options.sustained_seconds,
        rows_per_second: table::INDEX_SUSTAINED.aim(),
        rows_per_statement: 10,
        connections: SUSTAINED_CONNECTIONS,
    };
    let run = sustained::run(size, &plan).await;
    size.line(
        format!(
            "index mode: sustained{label}: {:.0} row changes/s for {:.0} s from a load process \
             ({} rows per UPDATE, {SUSTAINED_CONNECTIONS} connections), daemon as its own process \
             (`--mode index`, refill guard 2 s): backlog age, and the daemon's share of a core",
            run.rows_per_second, run.seconds, run.rows_per_statement
        ),
        format!(
            "p99 {:.2} s, max {:.2} s; drained {} after the load; {} sweep passes; CPU during \
             the load: {}; VmHWM {:.1} MB",
            run.age_p99,
            run.age_max,
            show(run.drain_after_load),
            run.passes,
            run.cpu_shares(),
            run.hwm_kb as f64 / 1024.0
        ),
        String::new(),
        Judged::both(
            table::INDEX_SUSTAINED.judge(run.rows_per_second, run.age_p99),
            table::INDEX_SUSTAINED_CPU.judge(run.daemon_cpu),
        ),
    )
}

/// What the daemon process showed from its start until its index was complete.
struct ProcessStart {
    /// From spawning the process until `/healthz` said the index is complete.
    complete_after: Duration,
    /// VmRSS at the first moment its metrics listener answered (before the seed), and keys
    /// indexed by then.
    rss_before_kb: u64,
    keys_before: u64,
    /// VmRSS, VmHWM and keys indexed once the index was complete.
    rss_after_kb: u64,
    hwm_kb: u64,
    keys_after: u64,
}

/// Starts the daemon binary in `--mode index` as an operator does and waits until `/healthz`
/// stops saying it is seeding; reads its resident memory before the seed and then.
async fn process_start(size: &Size<'_>) -> ProcessStart {
    let log = log_path("index-start");
    let started = Instant::now();
    let daemon = DaemonProcess::spawn(
        size.worker_binary,
        size.db_url,
        size.redis_server,
        Mode::Index,
        &log,
    );
    let indexed_keys =
        |metrics: &str| sustained::metric_value(metrics, names::INDEX_KEYS).unwrap_or(0.0) as u64;
    // Before the seed: the first moment its metrics listener answers, which it binds before the
    // worker connects to Redis. Any key indexed by then is subtracted below.
    let (rss_before_kb, keys_before) = loop {
        if let Some(metrics) = daemon.scrape("/metrics") {
            let rss = proc_status_kb(daemon.pid, "VmRSS:").unwrap_or(0);
            break (rss, indexed_keys(&metrics));
        }
        assert!(
            started.elapsed() < INDEX_COMPLETE_TIMEOUT,
            "the daemon's metrics never answered: see {}",
            log.display()
        );
        tokio::time::sleep(START_POLL).await;
    };
    daemon.wait_index_complete(&log).await;
    let complete_after = started.elapsed();
    let measured = ProcessStart {
        complete_after,
        rss_before_kb,
        keys_before,
        rss_after_kb: proc_status_kb(daemon.pid, "VmRSS:").unwrap_or(0),
        hwm_kb: proc_status_kb(daemon.pid, "VmHWM:").unwrap_or(0),
        keys_after: daemon
            .scrape("/metrics")
            .map_or(0, |metrics| indexed_keys(&metrics)),
    };
    daemon.stop();
    eprintln!(
        "[{} keys] index mode: index complete {} after the process started; VmRSS {:.1} MB for \
         {} keys",
        size.keys,
        show(complete_after),
        measured.rss_after_kb as f64 / 1024.0,
        thousands(measured.keys_after)
    );
    measured
}

impl ProcessStart {
    fn complete_line(&self, size: &Size<'_>) -> Line {
        let ratio = size.passes(self.complete_after);
        size.line(
            "index mode: index complete after the process starts (the daemon binary, until \
             `/healthz` stops saying seeding: tracking on, then one `SCAN` of the keyspace while \
             Redis announces writes)",
            format!(
                "{} ({} keys indexed)",
                show(self.complete_after),
                thousands(self.keys_after)
            ),
            format!("{ratio:.2}×"),
            table::INDEX_COMPLETE.judge(ratio),
        )
    }

    /// The memory the index costs per key, both ways: the whole VmRSS, and its growth from
    /// before the seed. At the run's largest size only.
    fn memory_lines(&self, size: &Size<'_>) -> Vec<Line> {
        if !size.options.largest {
            return Vec::new();
        }
        let indexed = self.keys_after.saturating_sub(self.keys_before).max(1) as f64;
        let mb = |kb: u64| kb as f64 / 1024.0;
        let rss_per_key = self.rss_after_kb as f64 * 1024.0 / self.keys_after.max(1) as f64;
        let growth_per_key =
            self.rss_after_kb.saturating_sub(self.rss_before_kb) as f64 * 1024.0 / indexed;
        let peak_per_key = self.hwm_kb.saturating_sub(self.rss_before_kb) as f64 * 1024.0 / indexed;
        eprintln!(
            "[{} keys] index mode: {rss_per_key:.0} bytes of RSS and {growth_per_key:.0} bytes of \
             RSS growth per indexed key",
            size.keys
        );
        let label = "index mode: worker memory per indexed key, daemon as its own process \
                     (`--mode index`), once the index is complete";
        vec![
            size.line(
                format!("{label}: VmRSS ÷ indexed keys"),
                format!(
                    "{rss_per_key:.0} bytes/key ({:.1} MB for {} keys)",
                    mb(self.rss_after_kb),
                    thousands(self.keys_after)
                ),
                String::new(),
                table::INDEX_MEMORY.judge(rss_per_key, self.keys_after),
            ),
            size.line(
                format!("{label}: VmRSS growth from before the seed ÷ keys indexed since"),
                format!(
                    "{growth_per_key:.0} bytes/key ({:.1} MB → {:.1} MB; peak {peak_per_key:.0} \
                     bytes/key, VmHWM {:.1} MB)",
                    mb(self.rss_before_kb),
                    mb(self.rss_after_kb),
                    mb(self.hwm_kb)
                ),
                String::new(),
                table::INDEX_MEMORY.judge(growth_per_key, self.keys_after),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
