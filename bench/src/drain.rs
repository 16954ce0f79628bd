//! Draining a backlog (`--only drain`): what happens after a Redis outage or a stop, when many
//! changes wait at once. [`DRAIN_CHANGES`] single-row `UPDATE`s commit in one transaction while
//! the daemon runs as its own process, in each mode; the bench times commit → outbox empty and
//! reads the daemon's CPU time from `/proc/<pid>/stat` over the same span.
//!
//! The changes walk the report rows in order, all four tables in turn, so most rows change two or
//! three times: the first change of a row removes its keys, the later ones find none, as a
//! backlog of repeated edits does. Each drain starts from the whole keyspace, filled again, and
//! removes most report keys, so the group runs after the other groups of its size.

use std::time::{Duration, Instant};

use cache_invalidator::settings::Mode;

use crate::layout::KINDS;
use crate::measure::wait_drained;
use crate::stats::{show, thousands};
use crate::sustained::{cpu_time, log_path, proc_status_kb, DaemonProcess};
use crate::table::{self, Line};
use crate::Size;

/// Changes in the backlog: single-row changes committed in one transaction.
pub const DRAIN_CHANGES: u32 = 200_000;
/// The keyspace the drain's target is set for (a 1M-key cache). A sweep's drain cannot beat one
/// pass, which takes seconds at 5M keys: a run of several sizes drains on the one nearest this.
const DRAIN_KEYS: u64 = 1_000_000;

/// Which of a run's `sizes` the drain runs on: the nearest [`DRAIN_KEYS`] (the larger of two as
/// near); `None` when there are none.
pub fn size_index(sizes: &[u64]) -> Option<usize> {
    (0..sizes.len())
        .min_by_key(|&index| (sizes[index].abs_diff(DRAIN_KEYS), u64::MAX - sizes[index]))
}

/// One drain, measured.
struct Drained {
    mode: Mode,
    /// Commit → outbox empty.
    took: Duration,
    /// The daemon's CPU time (user + system) over the same span.
    cpu: Option<Duration>,
    /// The daemon's peak resident memory (VmHWM) by the end of the drain.
    hwm_kb: u64,
}

impl Drained {
    fn changes_per_second(&self) -> f64 {
        f64::from(DRAIN_CHANGES) / self.took.as_secs_f64().max(1e-9)
    }

    /// Seconds of the daemon's CPU per 100,000 changes.
    fn cpu_per_100k(&self) -> Option<f64> {
        self.cpu
            .map(|cpu| cpu.as_secs_f64() * 100_000.0 / f64::from(DRAIN_CHANGES))
    }
}

/// The drain rows, index mode then sweep mode.
pub async fn lines(size: &Size<'_>) -> Vec<Line> {
    let mut lines = Vec::new();
    for mode in [Mode::Index, Mode::Sweep] {
        let drained = drain(size, mode).await;
        lines.push(line(size, &drained));
    }
    lines
}

/// Starts the daemon in `mode`, commits the backlog in one transaction and waits until the outbox
/// is empty.
async fn drain(size: &Size<'_>, mode: Mode) -> Drained {
    // The measures before this one (the other groups, the other mode's drain) removed keys: the
    // backlog meets the whole keyspace, as after an outage.
    crate::layout::fill(size.redis, &size.layout).await;
    let log = log_path(&format!("drain-{mode}"));
    let daemon = DaemonProcess::spawn(
        size.worker_binary,
        size.db_url,
        size.redis_server,
        mode,
        &log,
    );
    daemon.wait_listening(size.poller, &log).await;
    if mode == Mode::Index {
        // The drain measures the index at work, not the sweep that clears changes while it seeds.
        daemon.wait_index_complete(&log).await;
    }
    size.client
        .batch_execute(&format!("BEGIN; {}", backlog_sql(size)))
        .await
        .expect("make the backlog");
    let cpu_before = cpu_time(daemon.pid);
    let committing = Instant::now();
    size.client
        .batch_execute("COMMIT")
        .await
        .expect("commit the backlog");
    let drained = wait_drained(size.poller).await;
    let cpu = cpu_before.zip(cpu_time(daemon.pid)).map(|(b, a)| a - b);
    let hwm_kb = proc_status_kb(daemon.pid, "VmHWM:").unwrap_or(0);
    daemon.stop();
    let drained = Drained {
        mode,
        took: drained - committing,
        cpu,
        hwm_kb,
    };
    eprintln!(
        "[{} keys] {mode} mode: drained {} changes in {} ({:.0}/s), daemon CPU {} (log: {})",
        size.keys,
        thousands(u64::from(DRAIN_CHANGES)),
        show(drained.took),
        drained.changes_per_second(),
        drained.cpu.map_or("?".to_owned(), show),
        log.display()
    );
    drained
}

/// One `DO` block of [`DRAIN_CHANGES`] single-row `UPDATE`s (each captured as an outbox row of
/// its own), the tables in turn, the ids of the rows with cached keys in order.
fn backlog_sql(size: &Size<'_>) -> String {
    let updates: String = KINDS
        .iter()
        .enumerate()
        .map(|(index, kind)| {
            format!(
                "WHEN {index} THEN UPDATE {table} SET {text} = 'drain ' || i WHERE id = row_id;\n",
                table = kind.table,
                text = kind.text
            )
        })
        .collect();
    format!(
        "DO $drain$ DECLARE row_id integer; BEGIN\n\
         FOR i IN 0..{last} LOOP\n\
         row_id := 1 + (i / {kinds}) % {reports};\n\
         CASE i % {kinds}\n{updates}END CASE;\n\
         END LOOP; END $drain$;",
        last = DRAIN_CHANGES - 1,
        kinds = KINDS.len(),
        reports = size.layout.reports,
    )
}

fn line(size: &Size<'_>, drained: &Drained) -> Line {
    let per_second = drained.changes_per_second();
    let cpu_per_100k = drained.cpu_per_100k();
    size.line(
        format!(
            "drain: {} single-row changes committed in one transaction, daemon as its own \
             process (`--mode {}`): commit → outbox empty, and the daemon's CPU",
            thousands(u64::from(DRAIN_CHANGES)),
            drained.mode
        ),
        format!(
            "{} changes/s ({}); {} CPU s per 100,000 changes; VmHWM {:.1} MB",
            thousands(per_second as u64),
            show(drained.took),
            cpu_per_100k.map_or("?".to_owned(), |cpu| format!("{cpu:.2}")),
            drained.hwm_kb as f64 / 1024.0
        ),
        String::new(),
        table::DRAIN.judge(per_second, cpu_per_100k),
    )
}

#[cfg(test)]
mod tests {
    use super::size_index;

    #[test]
    fn the_drain_runs_on_the_size_nearest_a_million_keys() {
        assert_eq!(size_index(&[1_000_000, 5_000_000]), Some(0));
        assert_eq!(size_index(&[100_000, 1_000_000]), Some(1));
        assert_eq!(size_index(&[100_000]), Some(0));
        assert_eq!(size_index(&[500_000, 1_500_000]), Some(1));
        assert_eq!(size_index(&[]), None);
    }
}
