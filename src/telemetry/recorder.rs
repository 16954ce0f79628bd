//! The process-wide Prometheus recorder behind `/metrics`, the metrics' descriptions, and the
//! series registered at zero when the daemon starts.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use super::{names, MetricsError, COMMIT, VERSION};

/// Histogram buckets, in seconds, shared by both histograms: from a sweep of a small keyspace or
/// a change cleared within one poll (5 ms) to a full pass over millions of keys (the design's 1M-key
/// pass takes ~0.6 s, 10M ~6 s) or a backlog worked off after an outage (30 s and more).
const SECONDS_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0,
];

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
