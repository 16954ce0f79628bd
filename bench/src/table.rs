//! The result table: its lines, and the table of targets their figures are checked against. Each
//! target is defined once below, and both the text the table prints for it and the check of the
//! figure derive from that one definition, for every group of rows (sweep, index mode, users).

use std::time::Duration;

use crate::stats::{show, thousands};

/// One line of the result table.
pub struct Line {
    pub measure: String,
    pub keys: String,
    pub value: String,
    pub ratio: String,
    pub target: String,
    pub verdict: String,
}

impl Line {
    pub fn new(
        measure: impl Into<String>,
        keys: &str,
        value: String,
        ratio: String,
        judged: Judged,
    ) -> Line {
        Line {
            measure: measure.into(),
            keys: keys.to_owned(),
            value,
            ratio,
            target: judged.target,
            verdict: judged.verdict,
        }
    }
}

pub fn print(lines: &[Line]) {
    println!("| measure | keys | time / value | × reference | target | result |");
    println!("|---|---:|---|---:|---|---|");
    for line in lines {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            line.measure, line.keys, line.value, line.ratio, line.target, line.verdict
        );
    }
}

/// A line's target and result columns.
pub struct Judged {
    pub target: String,
    pub verdict: String,
}

impl Judged {
    /// No target: the reference lines, which the others are compared with.
    pub fn none() -> Judged {
        Judged {
            target: String::new(),
            verdict: String::new(),
        }
    }

    /// A figure measured for comparison with another, not held to a number.
    pub fn beside(target: &str, verdict: String) -> Judged {
        Judged {
            target: target.to_owned(),
            verdict,
        }
    }

    /// Two targets on one line: met when both are.
    pub fn both(first: Judged, second: Judged) -> Judged {
        let verdict = match (first.verdict.as_str(), second.verdict.as_str()) {
            ("met", "met") => "met".to_owned(),
            ("met", _) => second.verdict,
            (_, "met") => first.verdict,
            (_, _) => format!("{}; {}", first.verdict, second.verdict),
        };
        Judged {
            target: format!("{}; {}", first.target, second.target),
            verdict,
        }
    }

    fn checked(target: String, met: bool, by: String) -> Judged {
        Judged {
            target,
            verdict: if met {
                "met".to_owned()
            } else {
                format!("MISSED ({by})")
            },
        }
    }
}

/// How far a value is over (or under) its limit, in percent of the limit.
fn percent_over(value: f64, limit: f64) -> String {
    format!("{:+.0} %", (value / limit - 1.0) * 100.0)
}

/// At most `limit` times a base figure: one `SCAN` pass (the "× reference" column), the idle
/// `GET` p99, or the same statement without triggers.
pub struct Times {
    pub limit: f64,
    /// What the factor applies to, when it is not the reference pass.
    pub of: &'static str,
}

impl Times {
    /// A factor of the reference pass, or of the other side of a with/without comparison.
    pub const fn plain(limit: f64) -> Times {
        Times { limit, of: "" }
    }

    pub fn judge(&self, ratio: f64) -> Judged {
        Judged::checked(
            format!("≤ {}×{}", self.limit, self.of),
            ratio <= self.limit,
            percent_over(ratio, self.limit),
        )
    }
}

/// At most `limit` of a unit (`" s"`, `" MB"`); a miss is said with `decimals` decimals.
pub struct AtMost {
    pub limit: f64,
    pub unit: &'static str,
    pub decimals: usize,
}

impl AtMost {
    pub const fn seconds(limit: f64) -> AtMost {
        AtMost {
            limit,
            unit: " s",
            decimals: 2,
        }
    }

    pub const fn megabytes(limit: f64) -> AtMost {
        AtMost {
            limit,
            unit: " MB",
            decimals: 1,
        }
    }

    pub fn judge(&self, value: f64) -> Judged {
        Judged::checked(
            format!("≤ {}{}", self.limit, self.unit),
            value <= self.limit,
            format!("{:+.*}{}", self.decimals, value - self.limit, self.unit),
        )
    }
}

/// At most `passes` of one `SCAN` pass plus `plus_seconds`.
pub struct PassesPlus {
    pub passes: f64,
    pub plus_seconds: f64,
}

impl PassesPlus {
    pub fn judge(&self, value: Duration, pass: Duration) -> Judged {
        let limit = self.passes * pass.as_secs_f64() + self.plus_seconds;
        let seconds = value.as_secs_f64();
        Judged::checked(
            format!(
                "≤ {} × pass + {} s = {limit:.2} s",
                self.passes, self.plus_seconds
            ),
            seconds <= limit,
            format!("{:+.2} s", seconds - limit),
        )
    }
}

/// An index-mode latency: a share of one pass at the run's first size and, at larger sizes, at
/// most `growth` times the first size's figure plus `slack` for the measure's resolution (a poll,
/// a commit): clearing a change must not grow with the keyspace.
pub struct Latency {
    pub share_of_pass: f64,
    pub growth: f64,
    pub slack: Duration,
}

impl Latency {
    /// `base`: the first size's figure and its keys label, at a larger size.
    pub fn judge(&self, value: Duration, pass: Duration, base: Option<(Duration, &str)>) -> Judged {
        let Some((base, base_keys)) = base else {
            return Times::plain(self.share_of_pass)
                .judge(value.as_secs_f64() / pass.as_secs_f64());
        };
        let limit = base.mul_f64(self.growth) + self.slack;
        Judged::checked(
            format!(
                "≤ {} × the {base_keys}-key figure ({}) + {} = {}",
                self.growth,
                show(base),
                show(self.slack),
                show(limit)
            ),
            value <= limit,
            percent_over(value.as_secs_f64(), limit.as_secs_f64()),
        )
    }
}

/// A sustained load: at least `rows_per_second` row changes a second, with the outbox's backlog
/// age at p99 under `age_p99` seconds.
pub struct Sustained {
    pub rows_per_second: f64,
    pub age_p99: f64,
}

impl Sustained {
    /// The rate the load process aims at: a little above the target, as pacing loses a few ticks
    /// (the table reports the rate achieved).
    pub fn aim(&self) -> u32 {
        (self.rows_per_second * 1.1).round() as u32
    }

    pub fn judge(&self, rows_per_second: f64, age_p99: f64) -> Judged {
        Judged::checked(
            format!(
                "p99 < {} s at ≥ {}/s",
                self.age_p99,
                thousands(self.rows_per_second as u64)
            ),
            age_p99 < self.age_p99 && rows_per_second >= self.rows_per_second,
            format!("p99 {age_p99:.2} s, {rows_per_second:.0} rows/s"),
        )
    }
}

/// Draining a backlog: at least `changes_per_second`, with at most `cpu_per_100k` seconds of the
/// daemon's CPU per 100,000 changes.
pub struct Drain {
    pub changes_per_second: f64,
    pub cpu_per_100k: f64,
}

impl Drain {
    /// `cpu_per_100k`: `None` when the daemon's CPU time could not be read, which misses.
    pub fn judge(&self, changes_per_second: f64, cpu_per_100k: Option<f64>) -> Judged {
        let cpu = cpu_per_100k.unwrap_or(f64::INFINITY);
        Judged::checked(
            format!(
                "≥ {}/s and ≤ {} CPU s per 100,000",
                thousands(self.changes_per_second as u64),
                self.cpu_per_100k
            ),
            changes_per_second >= self.changes_per_second && cpu <= self.cpu_per_100k,
            format!("{}/s, {cpu:.2} CPU s", thousands(changes_per_second as u64)),
        )
    }
}

/// The daemon's share of one core under a sustained load: at most `share`.
pub struct CpuShare {
    pub share: f64,
}

impl CpuShare {
    /// `share`: `None` when the daemon's CPU time could not be read, which misses.
    pub fn judge(&self, share: Option<f64>) -> Judged {
        let share = share.unwrap_or(f64::INFINITY);
        Judged::checked(
            format!("daemon ≤ {:.0} % of a core", self.share * 100.0),
            share <= self.share,
            format!("{:.0} %", share * 100.0),
        )
    }
}

/// At most `bytes` per indexed key, where at least `at_keys` keys are indexed.
pub struct BytesPerKey {
    pub bytes: f64,
    pub at_keys: u64,
}

impl BytesPerKey {
    pub fn judge(&self, per_key: f64, keys: u64) -> Judged {
        let target = format!(
            "≤ {:.0} bytes/key at {} indexed keys",
            self.bytes,
            thousands(self.at_keys)
        );
        let met = per_key <= self.bytes;
        if keys >= self.at_keys {
            return Judged::checked(target, met, format!("{per_key:.0} bytes/key"));
        }
        // Fewer keys than the target's size: the figure is printed, but says nothing final.
        let verdict = if met {
            format!(
                "met at {} keys (the target's size needs a larger --keys)",
                thousands(keys)
            )
        } else {
            format!(
                "MISSED ({per_key:.0} bytes/key at {} keys)",
                thousands(keys)
            )
        };
        Judged { target, verdict }
    }
}

// The table of targets. Sweep mode, against one `SCAN` pass over the keyspace:

/// One change on an idle worker, commit → keys gone.
pub const SWEEP_IDLE: Times = Times::plain(1.2);
/// A burst of committed changes, last commit → keys gone.
pub const SWEEP_BURST: Times = Times::plain(2.0);
/// The naive way is printed beside the daemon's burst, not held to a number.
pub const NAIVE: &str = "printed beside ours";
/// Sustained load on the daemon as its own process in `--mode sweep`.
pub const SWEEP_SUSTAINED: Sustained = Sustained {
    rows_per_second: 5_000.0,
    age_p99: 2.0,
};
/// The sweep-mode daemon's peak resident memory under that load.
pub const SWEEP_MEMORY: AtMost = AtMost::megabytes(30.0);
/// The client-side and the Lua sweep are measured against each other.
pub const CLIENT_SIDE: &str = "measured beside Lua; the better is kept";
pub const LUA: &str = "measured beside the client-side sweep";

// Both modes:

/// The app's `GET` p99 while the daemon clears changes, against idle: a sweep or the index must
/// never monopolise Redis.
pub const GET_P99: Times = Times {
    limit: 2.0,
    of: " idle",
};
/// Index mode's, tighter: it sends Redis no `SCAN`, only the `UNLINK`s of the keys.
pub const INDEX_GET_P99: Times = Times {
    limit: 1.5,
    of: " idle",
};
/// The triggers' cost on the app's writes, with against without them.
pub const TRIGGER_SINGLE: Times = Times::plain(1.25);
pub const TRIGGER_BULK: Times = Times::plain(1.5);

// Index mode:

/// Index complete after the daemon process starts (until `/healthz` stops saying seeding),
/// against one pass (it was 3× before the seed was built in bulk).
pub const INDEX_COMPLETE: Times = Times::plain(1.5);
pub const INDEX_IDLE: Latency = Latency {
    share_of_pass: 0.02,
    growth: 1.5,
    slack: Duration::from_millis(2),
};
pub const INDEX_BURST: Latency = Latency {
    share_of_pass: 0.1,
    growth: 1.5,
    slack: Duration::from_millis(20),
};
pub const INDEX_SUSTAINED: Sustained = Sustained {
    rows_per_second: 10_000.0,
    age_p99: 0.5,
};
/// The daemon's CPU under that load: on two cores its share decides whether it keeps
/// up with the load beside Postgres and Redis.
pub const INDEX_SUSTAINED_CPU: CpuShare = CpuShare { share: 0.25 };
/// The index's memory at 4M indexed keys, both as the whole VmRSS and as its growth from before
/// the seed, per key (100 bytes of growth before the front-coded store).
pub const INDEX_MEMORY: BytesPerKey = BytesPerKey {
    bytes: 50.0,
    at_keys: 4_000_000,
};

// Both modes, `--only drain`:

/// A backlog of single-row changes committed at once, commit → outbox empty, and the daemon's CPU.
pub const DRAIN: Drain = Drain {
    changes_per_second: 60_000.0,
    cpu_per_100k: 1.5,
};

// Bulk user invalidation (`--only users`):

/// An unrelated change committed just after 6,000 `invalidate_user`: commit → keys gone.
pub const USERS_UNRELATED: AtMost = AtMost::seconds(2.0);
/// The 6,000 invalidations, commit → outbox drained.
pub const USERS_DRAINED: PassesPlus = PassesPlus {
    passes: 10.0,
    plus_seconds: 2.0,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_size_is_held_to_a_share_of_the_pass() {
        let pass = Duration::from_secs(1);
        let judged = INDEX_IDLE.judge(Duration::from_millis(15), pass, None);
        assert_eq!(judged.target, "≤ 0.02×");
        assert_eq!(judged.verdict, "met");
        let judged = INDEX_IDLE.judge(Duration::from_millis(30), pass, None);
        assert_eq!(judged.verdict, "MISSED (+50 %)");
    }

    #[test]
    fn larger_sizes_are_held_to_the_first_sizes_figure() {
        let base = Some((Duration::from_millis(10), "1,000,000"));
        // 1.5 × 10 ms + 2 ms = 17 ms, whatever the pass at this size.
        let within = INDEX_IDLE.judge(Duration::from_millis(17), Duration::from_millis(100), base);
        assert_eq!(within.verdict, "met", "{}", within.target);
        assert!(
            within.target.contains("1,000,000-key figure"),
            "{}",
            within.target
        );
        let beyond = INDEX_IDLE.judge(Duration::from_millis(18), Duration::from_secs(100), base);
        assert!(beyond.verdict.starts_with("MISSED"), "{}", beyond.target);
    }

    #[test]
    fn a_target_prints_the_number_it_checks() {
        assert_eq!(SWEEP_IDLE.judge(1.2).target, "≤ 1.2×");
        assert_eq!(SWEEP_IDLE.judge(1.2).verdict, "met");
        assert_eq!(SWEEP_IDLE.judge(1.5).verdict, "MISSED (+25 %)");
        let sustained = SWEEP_SUSTAINED.judge(5_100.0, 1.0);
        assert_eq!(sustained.target, "p99 < 2 s at ≥ 5,000/s");
        assert_eq!(sustained.verdict, "met");
        assert_eq!(SWEEP_SUSTAINED.aim(), 5_500);
        assert_eq!(INDEX_SUSTAINED.aim(), 11_000);
        let drained = USERS_DRAINED.judge(Duration::from_secs(3), Duration::from_millis(100));
        assert_eq!(drained.target, "≤ 10 × pass + 2 s = 3.00 s");
        assert_eq!(drained.verdict, "met");
    }

    #[test]
    fn the_drain_needs_both_its_rate_and_its_cpu() {
        assert_eq!(
            DRAIN.judge(60_000.0, Some(1.5)).target,
            "≥ 60,000/s and ≤ 1.5 CPU s per 100,000"
        );
        assert_eq!(DRAIN.judge(60_000.0, Some(1.5)).verdict, "met");
        let slow = DRAIN.judge(31_000.0, Some(1.0)).verdict;
        assert_eq!(slow, "MISSED (31,000/s, 1.00 CPU s)");
        assert!(DRAIN
            .judge(90_000.0, Some(1.86))
            .verdict
            .starts_with("MISSED"));
        assert!(DRAIN.judge(90_000.0, None).verdict.starts_with("MISSED"));
        assert_eq!(INDEX_SUSTAINED_CPU.judge(Some(0.2)).verdict, "met");
        assert_eq!(
            INDEX_SUSTAINED_CPU.judge(Some(0.54)).verdict,
            "MISSED (54 %)"
        );
        let both = Judged::both(
            INDEX_SUSTAINED.judge(11_000.0, 0.3),
            INDEX_SUSTAINED_CPU.judge(Some(0.54)),
        );
        assert_eq!(both.verdict, "MISSED (54 %)");
        assert_eq!(
            both.target,
            "p99 < 0.5 s at ≥ 10,000/s; daemon ≤ 25 % of a core"
        );
    }
}
