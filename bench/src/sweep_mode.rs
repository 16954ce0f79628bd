//! The sweep's rows of the table, one function per group of measures: the reference pass, the
//! daemon in `--mode sweep` (one change on an idle worker, a burst, the naive way beside it, the
//! app's `GET` latency), the client-side sweep against a Lua one, the triggers' cost on the app's
//! writes, and a sustained load on the daemon as its own process.

use cache_invalidator::settings::Mode;

use crate::daemon::InProcess;
use crate::measure::{self, Rows, TriggerCost};
use crate::probe::{GetProbe, Phase};
use crate::server_side::{self, SweepCost};
use crate::stats::{percentile, show, thousands};
use crate::sustained::{self, Plan};
use crate::table::{self, Judged, Line};
use crate::{Size, BURST_CHANGES, CLUSTER_PRIMARIES, IDLE_REPEATS, NAIVE_SAMPLE};

/// The reference every other line is compared with: one `SCAN MATCH` pass.
pub fn reference_line(size: &Size<'_>) -> Line {
    let measure = if size.options.cluster {
        format!(
            "reference: one `SCAN MATCH :1:report:12345:* COUNT 1000` pass on each of the \
             {CLUSTER_PRIMARIES} primaries, in parallel (median of 3)"
        )
    } else {
        "reference: one `SCAN MATCH :1:report:12345:* COUNT 1000` pass (median of 3)".to_owned()
    };
    size.line(
        measure,
        show(size.reference),
        "1.00×".into(),
        Judged::none(),
    )
}

/// The daemon in-process in `--mode sweep`: one change on an idle worker, a burst, then the naive
/// way on a sample, with the app's `GET`s timed idle and during the single-change sweeps.
pub async fn sweeps(size: &Size<'_>, rows: &mut Rows) -> Vec<Line> {
    let daemon = InProcess::start(
        size.db_url,
        size.redis_server.daemon_url(),
        Mode::Sweep,
        None,
    );
    let probe = GetProbe::after_idle(size).await;
    probe.set(Phase::Off);
    let measured = measure::idle_then_burst(size, rows, Some(&probe), "").await;
    let naive = measure::naive(size.redis, size.rules, rows, NAIVE_SAMPLE).await;
    daemon.stop().await;
    let (idle_gets, sweep_gets) = probe.finish();

    let (idle, burst) = (measured.idle, &measured.burst);
    let idle_ratio = size.passes(idle);
    let burst_ratio = size.passes(burst.latency);
    vec![
        size.line(
            format!("idle single change: commit → keys gone (median of {IDLE_REPEATS})"),
            measured.idle_value(),
            format!("{idle_ratio:.2}×"),
            table::SWEEP_IDLE.judge(idle_ratio),
        ),
        size.line(
            format!(
                "burst: {BURST_CHANGES} committed changes (10 % owner changes), last commit → \
                 keys gone"
            ),
            measured.burst_value(),
            format!("{burst_ratio:.2}×"),
            table::SWEEP_BURST.judge(burst_ratio),
        ),
        naive_line(size, naive, burst.latency),
        get_line(size, &idle_gets, &sweep_gets),
    ]
}

/// The naive way's time per change (and patterns per change), extrapolated to the burst and
/// printed beside the daemon's `burst`.
fn naive_line(
    size: &Size<'_>,
    (per_change, patterns): (std::time::Duration, f64),
    burst: std::time::Duration,
) -> Line {
    let total = per_change * BURST_CHANGES as u32;
    let naive_way = if size.options.cluster {
        "SCAN MATCH on every primary in parallel + DEL, per pattern per change"
    } else {
        "SCAN MATCH + DEL per pattern per change"
    };
    size.line(
        format!(
            "naive (`delete_pattern`: {naive_way}): {BURST_CHANGES} changes, extrapolated from \
             {NAIVE_SAMPLE}"
        ),
        format!(
            "{} ({} per change, {patterns:.1} patterns each)",
            show(total),
            show(per_change)
        ),
        format!("{:.0}×", size.passes(total)),
        Judged::beside(
            table::NAIVE,
            format!(
                "ours is {:.0}× faster",
                total.as_secs_f64() / burst.as_secs_f64().max(1e-6)
            ),
        ),
    )
}

/// The app's `GET` p99 during the single-change sweeps against idle.
fn get_line(size: &Size<'_>, idle_gets: &[f64], sweep_gets: &[f64]) -> Line {
    let idle_p99 = percentile(idle_gets, 99.0);
    let sweep_p99 = percentile(sweep_gets, 99.0);
    let ratio = sweep_p99 / idle_p99.max(1e-9);
    let measure = if size.options.cluster {
        "app `GET` p99 on the swept cluster (each GET to its key's primary): idle vs during the \
         single-change sweeps"
    } else {
        "app `GET` p99 on the swept Redis: idle vs during the single-change sweeps"
    };
    size.line(
        measure,
        format!(
            "{idle_p99:.0} µs vs {sweep_p99:.0} µs ({} / {} GETs)",
            idle_gets.len(),
            sweep_gets.len()
        ),
        format!("{ratio:.2}×"),
        table::GET_P99.judge(ratio),
    )
}

/// The daemon's client-side sweep against a server-side Lua sweep, on the patterns of fresh
/// changes each (one server only).
pub async fn lua(size: &Size<'_>, rows: &mut Rows) -> Vec<Line> {
    let comparison = server_side::compare(
        &size.redis_server.daemon_url(),
        size.redis,
        size.rules,
        rows,
        &size.layout,
        BURST_CHANGES,
    )
    .await;
    let describe = |cost: &SweepCost, calls: &str| {
        format!(
            "{} ({} patterns, {} keys; Redis busy {}; {} {calls}, {} commands over 1 ms)",
            show(cost.wall),
            thousands(cost.patterns as u64),
            thousands(cost.keys_removed),
            show(cost.redis_busy),
            thousands(cost.calls),
            cost.calls_over_limit
        )
    };
    let client = &comparison.client;
    let mut lines = vec![size.line(
        format!(
            "client-side sweep (the daemon's sweeper): the patterns of {BURST_CHANGES} changes → \
             keys gone, no Postgres"
        ),
        describe(client, "steps"),
        format!("{:.2}×", size.passes(client.wall)),
        Judged::beside(table::CLIENT_SIDE, client_side_verdict(&comparison)),
    )];
    for (lua, count) in comparison.lua.iter().zip(server_side::LUA_SCAN_COUNTS) {
        let wall_ratio = lua.wall.as_secs_f64() / client.wall.as_secs_f64().max(1e-9);
        let busy_ratio = lua.redis_busy.as_secs_f64() / client.redis_busy.as_secs_f64().max(1e-9);
        let faster = if wall_ratio < 1.0 {
            "Lua is faster"
        } else {
            "client-side is faster"
        };
        lines.push(size.line(
            format!(
                "server-side Lua sweep (`EVALSHA`: `SCAN … COUNT {count}`, prefix lookups and \
                 UNLINK inside Redis): the patterns of another {BURST_CHANGES} changes → keys gone"
            ),
            describe(lua, "calls"),
            format!("{:.2}×", size.passes(lua.wall)),
            Judged::beside(
                table::LUA,
                format!(
                    "{wall_ratio:.2}× the client-side time, {busy_ratio:.2}× its Redis time: \
                     {faster}"
                ),
            ),
        ));
    }
    lines
}

/// Which sweep the measures favour: the client-side one (the daemon's) while no Lua variant is
/// faster, else the fastest Lua variant, by how much.
fn client_side_verdict(comparison: &server_side::Comparison) -> String {
    let client = comparison.client.wall.as_secs_f64().max(1e-9);
    let fastest = comparison
        .lua
        .iter()
        .zip(server_side::LUA_SCAN_COUNTS)
        .min_by_key(|(lua, _)| lua.wall);
    match fastest {
        None => "no Lua sweep measured".to_owned(),
        Some((lua, _)) if comparison.client.wall <= lua.wall => format!(
            "kept: the fastest Lua sweep takes {:.2}× its time",
            lua.wall.as_secs_f64() / client
        ),
        Some((lua, count)) => format!(
            "Lua (`COUNT {count}`) is faster: {:.2}× the client-side time",
            lua.wall.as_secs_f64() / client
        ),
    }
}

/// The triggers' cost on the app's writes (Postgres alone, the worker stopped).
pub async fn trigger_cost(size: &Size<'_>) -> TriggerCost {
    let (rounds, per_round, bulk) = if size.options.quick {
        (15, 80, 3)
    } else {
        (41, 125, 7)
    };
    let cost = measure::trigger_cost(size.client, size.layout.rows, rounds, per_round, bulk).await;
    eprintln!(
        "[{} keys] triggers: single {} vs {}, bulk {} vs {}",
        size.keys,
        show(cost.single_with),
        show(cost.single_without),
        show(cost.bulk_with),
        show(cost.bulk_without)
    );
    cost
}

pub fn trigger_lines(size: &Size<'_>, cost: &TriggerCost) -> Vec<Line> {
    vec![
        size.line(
            "trigger overhead: single-row UPDATE, autocommit (with vs without triggers; median \
             over alternating rounds)",
            format!(
                "{} vs {} per statement ({} each)",
                show(cost.single_with),
                show(cost.single_without),
                thousands(cost.single_statements as u64)
            ),
            format!("{:.2}×", cost.single_ratio),
            table::TRIGGER_SINGLE.judge(cost.single_ratio),
        ),
        size.line(
            "trigger overhead: one 10,000-row UPDATE (with vs without)",
            format!(
                "{} vs {} (medians of {} each; the ratio is the median of the pairs)",
                show(cost.bulk_with),
                show(cost.bulk_without),
                cost.bulk_repeats
            ),
            format!("{:.2}×", cost.bulk_ratio),
            table::TRIGGER_BULK.judge(cost.bulk_ratio),
        ),
    ]
}

/// A sustained load on the daemon as its own process in `--mode sweep`: the backlog's age and the
/// daemon's memory.
pub async fn sustained(size: &Size<'_>) -> Vec<Line> {
    let plan = Plan {
        mode: Mode::Sweep,
        seconds: size.options.sustained_seconds,
        rows_per_second: table::SWEEP_SUSTAINED.aim(),
        rows_per_statement: 10,
        connections: 4,
    };
    let run = sustained::run(size, &plan).await;
    let hwm_mb = run.hwm_kb as f64 / 1024.0;
    vec![
        size.line(
            format!(
                "sustained: {:.0} row changes/s for {:.0} s from a load process ({} rows per \
                 UPDATE), daemon as its own process (`--mode sweep`, refill guard 2 s): backlog age",
                run.rows_per_second, run.seconds, run.rows_per_statement
            ),
            format!(
                "p99 {:.2} s, max {:.2} s; drained {} after the load; the daemon's {} passes \
                 under the load took {} on average; CPU during the load: {}",
                run.age_p99,
                run.age_max,
                show(run.drain_after_load),
                run.passes,
                run.mean_pass.map_or("?".to_owned(), show),
                run.cpu_shares()
            ),
            String::new(),
            table::SWEEP_SUSTAINED.judge(run.rows_per_second, run.age_p99),
        ),
        size.line(
            "worker resident memory during the sustained run",
            format!(
                "VmRSS max {:.1} MB, VmHWM {hwm_mb:.1} MB ({:.1} MB connected, before the load)",
                run.rss_max_kb as f64 / 1024.0,
                run.rss_idle_kb as f64 / 1024.0
            ),
            String::new(),
            table::SWEEP_MEMORY.judge(hwm_mb),
        ),
    ]
}
