//! The measures of one keyspace: the one-pass reference, a burst of committed changes, one change
//! on an idle worker, the naive `delete_pattern` way, and the triggers' cost on the app's writes.
//!
//! "Keys gone" is observed through the outbox: the worker deletes an outbox row only after Redis
//! confirmed the `UNLINK`s of its keys, and the deletion becomes visible when its epoch commits, so
//! the first poll that finds the outbox empty comes (one ack and one poll interval) *after* the
//! keys were gone — never before. Each measure then checks the keys itself: every key the change
//! must remove (computed from the layout, independently of the rules code) is gone, and `DBSIZE`
//! dropped by exactly that many, so nothing else was removed.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use cache_invalidator::rules::RuleSet;
use redis::aio::MultiplexedConnection;
use tokio_postgres::Client;

use crate::layout::{Layout, RowChange, KINDS};
use crate::nodes::Nodes;
use crate::probe::{GetProbe, Phase};
use crate::stats::{median, median_ratio, show, thousands, Rng};
use crate::{Size, BURST_CHANGES, IDLE_REPEATS};

/// How often the bench looks at the outbox while waiting: the resolution of the latency measures.
/// Every millisecond for the first [`FINE_POLL_FOR`]: index mode clears a change in a few
/// milliseconds, and a coarser poll would add most of its own period to those figures. Then
/// every 5 ms, as before index mode: a sweep takes hundreds of milliseconds, and a thousand
/// queries a second would load the machine under the app's `GET`s the bench times meanwhile.
const FINE_POLL: Duration = Duration::from_millis(1);
const FINE_POLL_FOR: Duration = Duration::from_millis(50);
const DRAIN_POLL: Duration = Duration::from_millis(5);
/// A drain slower than this means the worker is stuck: the bench stops instead of waiting forever.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
/// Connections committing the burst: enough that commits are not serialised on one round trip.
const BURST_CONNECTIONS: usize = 4;
/// `SCAN COUNT` of the reference pass and of the naive approach, as the targets define them.
const REFERENCE_COUNT: usize = 1000;

/// One `SCAN MATCH pattern COUNT 1000` pass over the whole keyspace: on every primary at once,
/// as the daemon sweeps a cluster; returns the keys it matched.
pub async fn scan_pass(nodes: &Nodes, pattern: &str) -> Vec<String> {
    let passes = nodes
        .connections
        .iter()
        .map(|connection| scan_node(connection, pattern));
    futures::future::join_all(passes)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// One `SCAN MATCH pattern COUNT 1000` pass over one server.
async fn scan_node(connection: &MultiplexedConnection, pattern: &str) -> Vec<String> {
    let mut connection = connection.clone();
    let mut cursor: u64 = 0;
    let mut found = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(REFERENCE_COUNT)
            .query_async(&mut connection)
            .await
            .expect("SCAN on the private redis");
        found.extend(keys);
        cursor = next;
        if cursor == 0 {
            return found;
        }
    }
}

/// The reference: one `SCAN 0 MATCH :1:report:12345:* COUNT 1000` pass (on every primary at
/// once), median of 3.
pub async fn reference(nodes: &Nodes) -> Duration {
    let mut times = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        scan_pass(nodes, ":1:report:12345:*").await;
        times.push(started.elapsed());
    }
    median(&times)
}

/// The report rows as the bench changed them: current owners, and which rows were touched (a
/// touched row's keys are gone, so later measures pick fresh ones).
pub struct Rows {
    layout: Layout,
    owners: HashMap<(usize, u32), Vec<u32>>,
    touched: HashSet<(usize, u32)>,
    rng: Rng,
    statements: u64,
}

/// A planned change: the row change and the statement that makes it.
pub struct Planned {
    pub change: RowChange,
    pub sql: String,
}

impl Rows {
    pub fn new(layout: Layout, seed: u64) -> Rows {
        Rows {
            layout,
            owners: HashMap::new(),
            touched: HashSet::new(),
            rng: Rng::new(seed),
            statements: 0,
        }
    }

    fn owners_of(&self, kind: usize, id: u32) -> Vec<u32> {
        self.owners.get(&(kind, id)).cloned().unwrap_or_else(|| {
            (0..KINDS[kind].owners.len())
                .map(|column| self.layout.initial_owner(kind, column, id))
                .collect()
        })
    }

    /// An UPDATE of a random row that has cached keys and was not changed yet; with probability
    /// `owner_change_percent` it also moves the row to another user.
    pub fn plan(&mut self, owner_change_percent: u64) -> Planned {
        let (kind, id) = loop {
            let kind = (self.rng.next_u64() % KINDS.len() as u64) as usize;
            let id = self.rng.one_to(self.layout.reports);
            if self.touched.insert((kind, id)) {
                break (kind, id);
            }
        };
        let old_owners = self.owners_of(kind, id);
        let mut new_owners = old_owners.clone();
        self.statements += 1;
        let table = &KINDS[kind];
        let mut sql = format!(
            "UPDATE {} SET {} = 'bench {}'",
            table.table, table.text, self.statements
        );
        if self.rng.percent(owner_change_percent) {
            let column = (self.rng.next_u64() % table.owners.len() as u64) as usize;
            let user = self.rng.one_to(self.layout.users);
            new_owners[column] = user;
            sql.push_str(&format!(", {} = {user}", table.owners[column]));
        }
        sql.push_str(&format!(" WHERE id = {id}"));
        self.owners.insert((kind, id), new_owners.clone());
        Planned {
            change: RowChange {
                kind,
                id,
                old_owners,
                new_owners,
            },
            sql,
        }
    }
}

/// Waits until the outbox is empty; returns when that was first seen.
///
/// Each poll looks for the first row from the lowest id the last one found, by the primary key:
/// a drain leaves the rows it deleted in the table until a vacuum, and `EXISTS (SELECT 1 FROM
/// outbox)` scanned them from the table's start at each poll (200 a second), taking a growing
/// share of the 2 cores from the daemon it measures. An outbox that looks empty is checked whole
/// once (a row given back below the last id seen is then found).
pub async fn wait_drained(client: &Client) -> Instant {
    let started = Instant::now();
    let deadline = started + DRAIN_TIMEOUT;
    let mut from: i64 = 0;
    loop {
        let first: Option<i64> = client
            .query_opt(
                "SELECT id FROM cache_invalidator.outbox WHERE id >= $1 ORDER BY id LIMIT 1",
                &[&from],
            )
            .await
            .expect("poll the outbox")
            .map(|row| row.get(0));
        match first {
            Some(id) => from = id,
            None => {
                let seen_empty = Instant::now();
                let pending: bool = client
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM cache_invalidator.outbox)",
                        &[],
                    )
                    .await
                    .expect("poll the outbox")
                    .get(0);
                if !pending {
                    return seen_empty;
                }
                from = 0;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not drain the outbox within {DRAIN_TIMEOUT:?}"
        );
        tokio::time::sleep(if started.elapsed() < FINE_POLL_FOR {
            FINE_POLL
        } else {
            DRAIN_POLL
        })
        .await;
    }
}

/// What a measured set of changes removed, checked.
pub struct Outcome {
    /// Last commit → outbox empty.
    pub latency: Duration,
    /// First commit → last commit.
    pub committing: Duration,
    pub keys_removed: u64,
}

/// Commits `changes` (spread over connections, each an autocommit UPDATE) while the worker runs,
/// measures last commit → outbox empty, and checks the keys: all must-go keys gone, nothing else.
/// With `pace`, each connection commits one change per `pace` (a steady rate); without, as fast
/// as Postgres takes them.
pub async fn committed_changes(
    clients: &[Client],
    poller: &Client,
    redis: &Nodes,
    layout: &Layout,
    changes: Vec<Planned>,
    pace: Option<Duration>,
    probe: Option<&GetProbe>,
) -> Outcome {
    let mut must_go = HashSet::new();
    for planned in &changes {
        planned.change.must_go(layout, &mut must_go);
    }
    let removal = redis.before_removal(&must_go).await;
    // The app's GETs count as "while changes are cleared" from the first commit until the outbox
    // is drained: not during the bench's own checks of the keys before and after, which are
    // pipelines of thousands of EXISTS that no app would send.
    if let Some(probe) = probe {
        probe.set(Phase::Sweep);
    }

    let mut shares: Vec<Vec<String>> = vec![Vec::new(); clients.len()];
    for (index, planned) in changes.into_iter().enumerate() {
        shares[index % clients.len()].push(planned.sql);
    }
    let started = Instant::now();
    let commits = shares
        .iter()
        .zip(clients)
        .map(|(share, client)| async move {
            let mut ticks = pace.map(tokio::time::interval);
            for sql in share {
                if let Some(ticks) = ticks.as_mut() {
                    ticks.tick().await;
                }
                client.batch_execute(sql).await.expect("commit a change");
            }
            Instant::now()
        });
    let last_commit = futures::future::join_all(commits)
        .await
        .into_iter()
        .max()
        .unwrap_or(started);
    let drained = wait_drained(poller).await;
    if let Some(probe) = probe {
        probe.set(Phase::Off);
    }

    // An empty outbox also follows from rows set aside as dead letters: that would be a failure
    // of the daemon (or a trigger out of step with it), never a fast invalidation.
    let dead_letters: i64 = poller
        .query_one("SELECT count(*) FROM cache_invalidator.dead_letters", &[])
        .await
        .expect("count dead letters")
        .get(0);
    assert_eq!(
        dead_letters, 0,
        "changes were dead-lettered instead of cleared"
    );
    let keys_removed = removal.check(redis, &must_go).await;
    Outcome {
        latency: drained.saturating_duration_since(last_commit),
        committing: last_commit - started,
        keys_removed,
    }
}

/// What [`idle_then_burst`] measured.
pub struct IdleThenBurst {
    /// One change on an idle worker: the median latency, and the keys all the repeats removed.
    pub idle: Duration,
    pub idle_keys: u64,
    pub burst: Outcome,
}

impl IdleThenBurst {
    /// The idle change's figure as the table prints it.
    pub fn idle_value(&self) -> String {
        format!("{} ({} keys)", show(self.idle), thousands(self.idle_keys))
    }

    /// The burst's figure as the table prints it.
    pub fn burst_value(&self) -> String {
        format!(
            "{} ({} keys; committing took {})",
            show(self.burst.latency),
            thousands(self.burst.keys_removed),
            show(self.burst.committing)
        )
    }
}

/// With the daemon running: one change on an idle worker ([`IDLE_REPEATS`] times, the median),
/// then a burst of [`BURST_CHANGES`]. `probe`, if any, times the app's `GET`s as "sweep" during
/// both; `label` starts the progress lines.
pub async fn idle_then_burst(
    size: &Size<'_>,
    rows: &mut Rows,
    probe: Option<&GetProbe>,
    label: &str,
) -> IdleThenBurst {
    let (client, poller, redis, layout) = (size.client, size.poller, size.redis, &size.layout);
    let (idle, idle_keys) =
        idle_change(client, poller, redis, rows, layout, IDLE_REPEATS, probe).await;
    eprintln!("[{} keys] {label}idle change {}", size.keys, show(idle));
    let burst = burst(
        size.db_url,
        poller,
        redis,
        rows,
        layout,
        BURST_CHANGES,
        probe,
    )
    .await;
    eprintln!(
        "[{} keys] {label}burst {} after the last commit ({} committing)",
        size.keys,
        show(burst.latency),
        show(burst.committing)
    );
    IdleThenBurst {
        idle,
        idle_keys,
        burst,
    }
}

/// A burst of `count` changes, 10 % of them owner changes, committed from several connections.
async fn burst(
    db_url: &str,
    poller: &Client,
    redis: &Nodes,
    rows: &mut Rows,
    layout: &Layout,
    count: usize,
    probe: Option<&GetProbe>,
) -> Outcome {
    let mut clients = Vec::new();
    for _ in 0..BURST_CONNECTIONS {
        clients.push(crate::scratch::connect(db_url).await);
    }
    let changes = (0..count).map(|_| rows.plan(10)).collect();
    committed_changes(&clients, poller, redis, layout, changes, None, probe).await
}

/// `per_second` changes a second for `seconds`, 10 % of them owner changes, committed one at a
/// time on one connection at a steady pace (an app saving as its users work).
pub async fn steady(
    size: &Size<'_>,
    rows: &mut Rows,
    per_second: u32,
    seconds: u32,
    probe: &GetProbe,
) -> Outcome {
    let changes = (0..per_second * seconds).map(|_| rows.plan(10)).collect();
    let pace = Duration::from_secs(1) / per_second.max(1);
    committed_changes(
        std::slice::from_ref(size.client),
        size.poller,
        size.redis,
        &size.layout,
        changes,
        Some(pace),
        Some(probe),
    )
    .await
}

/// One change on an idle worker, `repeats` times; the median latency.
async fn idle_change(
    client: &Client,
    poller: &Client,
    redis: &Nodes,
    rows: &mut Rows,
    layout: &Layout,
    repeats: usize,
    probe: Option<&GetProbe>,
) -> (Duration, u64) {
    let mut times = Vec::new();
    let mut keys = 0;
    for _ in 0..repeats {
        wait_drained(poller).await;
        // Let the previous epoch commit and the worker settle into its idle wait.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let outcome = committed_changes(
            std::slice::from_ref(client),
            poller,
            redis,
            layout,
            vec![rows.plan(0)],
            None,
            probe,
        )
        .await;
        times.push(outcome.latency);
        keys += outcome.keys_removed;
    }
    (median(&times), keys)
}

/// The django-redis way (`cache.delete_pattern` in a post_save signal): for each change, for each
/// pattern, one full `SCAN MATCH pattern COUNT 1000` (on every primary of a cluster at once) and
/// a pipeline deleting what it found.
/// Returns the mean time per change over `sample` changes.
pub async fn naive(
    redis: &Nodes,
    rules: &RuleSet,
    rows: &mut Rows,
    sample: usize,
) -> (Duration, f64) {
    let started = Instant::now();
    let mut patterns_total = 0;
    for _ in 0..sample {
        let patterns = rows.plan(10).change.patterns(rules);
        patterns_total += patterns.len();
        for pattern in &patterns {
            let keys = scan_pass(redis, pattern).await;
            redis.delete(&keys).await;
        }
    }
    (
        started.elapsed() / sample.max(1) as u32,
        patterns_total as f64 / sample.max(1) as f64,
    )
}

/// The triggers' cost on the app's writes, measured with the worker stopped (its sweeps would
/// compete for the same CPUs and blur what the trigger itself costs).
///
/// The two sides alternate in short rounds and each ratio is the median over rounds of one round
/// with triggers against the round without them just after it: a commit waits for an fsync whose
/// time here swings by 2–3× from one second to the next, and a ratio of totals let a few slow
/// seconds on one side decide the result.
pub struct TriggerCost {
    pub single_with: Duration,
    pub single_without: Duration,
    pub single_ratio: f64,
    pub single_statements: usize,
    pub bulk_with: Duration,
    pub bulk_without: Duration,
    pub bulk_ratio: f64,
    pub bulk_repeats: usize,
}

/// Rows the bulk statement changes (a 10,000-row UPDATE).
const BULK_ROWS: u32 = 10_000;

/// The two sides of each round: with the report table's triggers, then without.
const SIDES: [(usize, bool); 2] = [(0, true), (1, false)];

pub async fn trigger_cost(
    client: &Client,
    rows: u32,
    rounds: usize,
    per_round: usize,
    bulk_repeats: usize,
) -> TriggerCost {
    let per_statement = single_rounds(client, rows, rounds, per_round).await;
    let bulk = bulk_rounds(client, bulk_repeats).await;
    set_triggers(client, true).await;
    // The measure's changes are not the worker's business: it starts with an empty outbox.
    client
        .batch_execute("TRUNCATE cache_invalidator.outbox")
        .await
        .expect("empty the outbox");
    TriggerCost {
        single_with: median(&per_statement[0]),
        single_without: median(&per_statement[1]),
        single_ratio: median_ratio(&per_statement[0], &per_statement[1]),
        single_statements: rounds * per_round,
        bulk_with: median(&bulk[0]),
        bulk_without: median(&bulk[1]),
        bulk_ratio: median_ratio(&bulk[0], &bulk[1]),
        bulk_repeats,
    }
}

async fn set_triggers(client: &Client, on: bool) {
    let toggle = if on { "ENABLE" } else { "DISABLE" };
    client
        .batch_execute(&format!("ALTER TABLE reports_report {toggle} TRIGGER USER"))
        .await
        .expect("toggle triggers");
}

/// Single-row autocommit UPDATEs of random rows, `per_round` a round on each side; the time per
/// statement of each round, per side.
async fn single_rounds(
    client: &Client,
    rows: u32,
    rounds: usize,
    per_round: usize,
) -> [Vec<Duration>; 2] {
    let update = client
        .prepare("UPDATE reports_report SET title = $1 WHERE id = $2")
        .await
        .expect("prepare the single-row UPDATE");
    let mut rng = Rng::new(11);
    let mut per_statement: [Vec<Duration>; 2] = Default::default();
    for round in 0..rounds {
        for (side, on) in SIDES {
            set_triggers(client, on).await;
            let started = Instant::now();
            for i in 0..per_round {
                let title = format!("single {round} {i}");
                let id = rng.one_to(rows) as i32;
                client
                    .execute(&update, &[&title, &id])
                    .await
                    .expect("single-row UPDATE");
            }
            per_statement[side].push(started.elapsed() / per_round.max(1) as u32);
        }
    }
    per_statement
}

/// One [`BULK_ROWS`]-row UPDATE on each side, `repeats` times; their times, per side.
async fn bulk_rounds(client: &Client, repeats: usize) -> [Vec<Duration>; 2] {
    let mut bulk: [Vec<Duration>; 2] = Default::default();
    for repeat in 0..repeats {
        for (side, on) in SIDES {
            set_triggers(client, on).await;
            // Same starting state for both sides: no dead tuples left by the previous statement.
            client
                .batch_execute("VACUUM reports_report")
                .await
                .expect("vacuum before the bulk UPDATE");
            let started = Instant::now();
            client
                .batch_execute(&format!(
                    "UPDATE reports_report SET title = 'bulk {repeat}' WHERE id <= {BULK_ROWS}"
                ))
                .await
                .expect("bulk UPDATE");
            bulk[side].push(started.elapsed());
        }
    }
    bulk
}
