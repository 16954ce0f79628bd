//! The daemon's client-side sweep against a server-side Lua sweep, fed the same kind of patterns
//! (if a Lua server-side sweep beat the client-side one, the daemon would use it; it does not).
//!
//! Both start from the patterns of a burst of changes, already expanded (no Postgres here), and
//! end when their pass is over and the keys are gone; each is then checked like every other
//! measure (every must-go key gone, nothing else). Besides the wall time, Redis' own
//! `INFO commandstats` says how long Redis itself was busy for each: on a machine where the app
//! shares the Redis, that busy time is what a sweep takes from the app.
//!
//! The Lua sweep is the natural shape of one: each call gets the patterns' literal prefixes as
//! arguments (scripts keep no state between calls: a table left in the Lua VM would be lost on a
//! restart or failover without anyone noticing), runs one `SCAN MATCH <superset glob>` step with
//! the daemon's `COUNT` (and with ten times that, see [`LUA_SCAN_COUNTS`]), looks each key up in a
//! Lua table of the prefixes, and `UNLINK`s the matches; no key crosses the network. It runs on one cursor: with all work inside Redis, more cursors in
//! flight would only hide round trips that are small next to a call.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use cache_invalidator::matcher::MatcherBuilder;
use cache_invalidator::redis_nodes::RedisTarget;
use cache_invalidator::rules::RuleSet;
use cache_invalidator::sweep::{Sweeper, SCAN_COUNT};
use cache_invalidator::window::PatternSpec;

use crate::layout::Layout;
use crate::measure::Rows;
use crate::nodes::Nodes;

/// `SCAN COUNT` of each script call. The daemon's own, so both sweeps walk the same chunks; and ten
/// times that, which spreads the cost of building the prefix table over ten times as many keys at
/// the price of calls that block Redis far longer than [`BLOCK_LIMIT_MICROS`]: measured to show
/// whether Lua could win at all.
pub const LUA_SCAN_COUNTS: [usize; 2] = [SCAN_COUNT, 10 * SCAN_COUNT];
/// Calls slower than this (Redis' own time, from its slow log) are counted: the daemon's bound on
/// how long one command may block the app.
const BLOCK_LIMIT_MICROS: u64 = 1_000;
/// Room in the slow log for every slow call of a sweep (Redis keeps 128 by default).
const SLOW_LOG_LENGTH: u64 = 1_000_000;

/// One call: a `SCAN` step, the prefix lookups and the `UNLINK`s. Returns the next cursor and the
/// keys removed. Every prefix of the default rules ends at a `:`, so a key is looked up only at its
/// colons, and only where some prefix is that long: the cheapest lookup Lua offers.
const SWEEP_SCRIPT: &str = r#"
local prefixes, lengths = {}, {}
for i = 3, #ARGV do
  local prefix = ARGV[i]
  prefixes[prefix] = true
  lengths[#prefix] = true
end
local reply = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', KEYS_PER_CALL)
local doomed = {}
for _, key in ipairs(reply[2]) do
  local at = string.find(key, ':', 1, true)
  while at do
    if lengths[at] and prefixes[string.sub(key, 1, at)] then
      doomed[#doomed + 1] = key
      break
    end
    at = string.find(key, ':', at + 1, true)
  end
end
local removed = 0
for first = 1, #doomed, 500 do
  removed = removed + redis.call('UNLINK', unpack(doomed, first, math.min(first + 499, #doomed)))
end
return {reply[1], removed}
"#;

/// One sweep strategy's figures.
pub struct SweepCost {
    pub wall: Duration,
    /// Redis' own time in the sweep's commands (`INFO commandstats`).
    pub redis_busy: Duration,
    pub calls: u64,
    /// Calls that blocked Redis for more than [`BLOCK_LIMIT_MICROS`] (its slow log).
    pub calls_over_limit: u64,
    pub patterns: usize,
    pub keys_removed: u64,
}

pub struct Comparison {
    pub client: SweepCost,
    /// One per entry of [`LUA_SCAN_COUNTS`].
    pub lua: Vec<SweepCost>,
}

/// Sweeps the patterns of `changes` fresh changes with the daemon's sweeper, then, for each
/// `SCAN COUNT` of [`LUA_SCAN_COUNTS`], those of another `changes` with the Lua script; one server.
pub async fn compare(
    redis_url: &str,
    redis: &Nodes,
    rules: &RuleSet,
    rows: &mut Rows,
    layout: &Layout,
    changes: usize,
) -> Comparison {
    let target = RedisTarget::parse(redis_url, None, Duration::from_secs(30))
        .expect("the private redis URL");
    let nodes = target.connect().await.expect("connect the sweeper");

    let (patterns, must_go) = plan(rules, rows, layout, changes);
    let client = checked(
        redis,
        &must_go,
        patterns.len(),
        &["scan", "unlink"],
        || async move {
            let specs: Vec<PatternSpec> = patterns
                .iter()
                .map(|pattern| PatternSpec {
                    pattern: pattern.as_str().into(),
                    label: "bench".into(),
                })
                .collect();
            let mut sweeper = Sweeper::new(nodes);
            sweeper.add_window(&specs, false);
            let mut steps = 0;
            loop {
                let report = sweeper.step().await.expect("client-side sweep");
                steps += 1;
                if !report.finished.is_empty() {
                    return steps;
                }
            }
        },
    )
    .await;

    let mut lua = Vec::new();
    for count in LUA_SCAN_COUNTS {
        lua.push(lua_sweep(redis, rules, rows, layout, changes, count).await);
    }
    Comparison { client, lua }
}

async fn lua_sweep(
    redis: &Nodes,
    rules: &RuleSet,
    rows: &mut Rows,
    layout: &Layout,
    changes: usize,
    scan_count: usize,
) -> SweepCost {
    let (patterns, must_go) = plan(rules, rows, layout, changes);
    checked(
        redis,
        &must_go,
        patterns.len(),
        &["evalsha"],
        || async move {
            let mut builder = MatcherBuilder::default();
            let mut prefixes = Vec::with_capacity(patterns.len());
            for pattern in &patterns {
                builder.add(pattern);
                // The default rules' patterns are all `literal:*` (the script looks prefixes up
                // at colons), and a numeric id needs no escaping.
                let prefix = pattern
                    .strip_suffix('*')
                    .filter(|prefix| prefix.ends_with(':'))
                    .filter(|prefix| !prefix.contains(['*', '?', '[', ']', '\\']))
                    .unwrap_or_else(|| panic!("not a plain prefix pattern: {pattern}"));
                prefixes.push(prefix.to_owned());
            }
            let glob = builder.build().superset_glob();
            let mut connection = redis.connections[0].clone();
            let sha: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(SWEEP_SCRIPT.replace("KEYS_PER_CALL", &scan_count.to_string()))
                .query_async(&mut connection)
                .await
                .expect("load the Lua sweep");
            let mut cursor = "0".to_owned();
            let mut calls = 0;
            loop {
                let (next, _removed): (String, u64) = redis::cmd("EVALSHA")
                    .arg(&sha)
                    .arg(0)
                    .arg(&cursor)
                    .arg(&glob)
                    .arg(&prefixes)
                    .query_async(&mut connection)
                    .await
                    .expect("Lua sweep call");
                calls += 1;
                cursor = next;
                if cursor == "0" {
                    return calls;
                }
            }
        },
    )
    .await
}

/// The patterns of `changes` fresh changes (as the daemon's rules expand them) and the keys they
/// must remove (from the layout, independently of the rules).
fn plan(
    rules: &RuleSet,
    rows: &mut Rows,
    layout: &Layout,
    changes: usize,
) -> (Vec<String>, HashSet<String>) {
    let mut patterns = HashSet::new();
    let mut must_go = HashSet::new();
    for _ in 0..changes {
        let change = rows.plan(10).change;
        change.must_go(layout, &mut must_go);
        patterns.extend(change.patterns(rules));
    }
    (patterns.into_iter().collect(), must_go)
}

/// Runs one sweep (which returns its number of calls or steps) with Redis' statistics and slow
/// log reset, then checks that exactly the must-go keys are gone.
async fn checked<F, Fut>(
    redis: &Nodes,
    must_go: &HashSet<String>,
    patterns: usize,
    commands: &[&str],
    sweep: F,
) -> SweepCost
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let removal = redis.before_removal(must_go).await;
    let mut admin = redis.connections[0].clone();
    let _: () = redis::pipe()
        .cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg(BLOCK_LIMIT_MICROS)
        .arg("slowlog-max-len")
        .arg(SLOW_LOG_LENGTH)
        .ignore()
        .cmd("SLOWLOG")
        .arg("RESET")
        .ignore()
        .cmd("CONFIG")
        .arg("RESETSTAT")
        .ignore()
        .query_async(&mut admin)
        .await
        .expect("reset the private redis' statistics");
    let started = Instant::now();
    let calls = sweep().await;
    let wall = started.elapsed();
    let (stats, slow_log): (String, Vec<redis::Value>) = redis::pipe()
        .cmd("INFO")
        .arg("commandstats")
        .cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query_async(&mut admin)
        .await
        .expect("read the private redis' statistics");
    // A script's own commands can appear in the slow log too: only the sweep's top-level
    // commands count.
    let over_limit = slow_log
        .iter()
        .filter(|entry| {
            slow_command(entry).is_some_and(|name| {
                commands
                    .iter()
                    .any(|command| name.eq_ignore_ascii_case(command))
            })
        })
        .count() as u64;

    let keys_removed = removal.check(redis, must_go).await;
    SweepCost {
        wall,
        redis_busy: Duration::from_micros(busy_micros(&stats)),
        calls,
        calls_over_limit: over_limit,
        patterns,
        keys_removed,
    }
}

/// The command name of a `SLOWLOG GET` entry: `[id, time, micros, [command, args…], …]`.
fn slow_command(entry: &redis::Value) -> Option<String> {
    let redis::Value::Array(fields) = entry else {
        return None;
    };
    let redis::Value::Array(arguments) = fields.get(3)? else {
        return None;
    };
    redis::from_redis_value_ref(arguments.first()?).ok()
}

/// Redis' time in the sweep's commands: `SCAN` and `UNLINK` sent by the client, or the script
/// calls (whose inner `SCAN` and `UNLINK` Redis counts again on their own lines). `CONFIG` and
/// `SLOWLOG` are the bench's own.
fn busy_micros(commandstats: &str) -> u64 {
    let usec = |command: &str| -> Option<u64> {
        let line = commandstats
            .lines()
            .find(|line| line.starts_with(&format!("cmdstat_{command}:")))?;
        let field = line.split([':', ',']).find(|f| f.starts_with("usec="))?;
        field.trim_start_matches("usec=").parse().ok()
    };
    match usec("evalsha").or(usec("eval")) {
        Some(script) => script,
        None => usec("scan").unwrap_or(0) + usec("unlink").unwrap_or(0),
    }
}
