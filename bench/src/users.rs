//! The bulk user invalidation measure (`--only users`): an app's `SELECT invalidate_user(id) FROM
//! …` over 6,000 users on a keyspace of 200,000 report keys, and an unrelated `invalidate_report`
//! committed half a second later. A user's patterns (`:1:report:*:{U}:*`) put a `*` before the
//! user; tried one by one on every scanned key they once held the unrelated change back for
//! 8.5–17.7 s and took two minutes to drain. The measure runs once per mode: in sweep mode it
//! measures the sweep's matcher, in index mode the index's one in-memory walk per window.
//!
//! Keys are `:1:report:{r}:{u}:{h}` for reports `1..=REPORTS`, [`VIEWERS`] users each, out of
//! [`USERS_WITH_KEYS`]; the unrelated report's viewers are all past the invalidated users. The
//! measure checks what went: every key of an invalidated user and of the unrelated report, and
//! nothing else (`DBSIZE`).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use cache_invalidator::rules::RuleSet;
use cache_invalidator::settings::Mode;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use crate::daemon::InProcess;
use crate::layout::{self, Layout};
use crate::measure::{reference, wait_drained};
use crate::nodes::Nodes;
use crate::scratch::{PrivateRedis, ScratchDb};
use crate::stats::{hash, show, thousands};
use crate::table::{self, Judged, Line};

/// Users invalidated in one statement (the load the bulk-invalidation target is set for).
pub const USERS_INVALIDATED: u32 = 6_000;
/// Report keys in the keyspace (the bulk-invalidation target's keyspace).
pub const REPORT_KEYS: u32 = 200_000;
/// Users that see each report: one `report:{r}:{u}:{h}` key each.
const VIEWERS: u32 = 4;
/// Users owning keys: the 6,000 invalidated own about 30 % of them, the rest must stay.
const USERS_WITH_KEYS: u32 = 20_000;
/// The unrelated change's report, past the others, and its viewers, past the invalidated users.
const UNRELATED_REPORT: u32 = REPORT_KEYS / VIEWERS + 1;
const UNRELATED_VIEWERS: std::ops::RangeInclusive<u32> = 10_001..=10_010;
/// How long after the bulk statement's commit the unrelated change commits (the bulk-invalidation target's 0.5 s).
const UNRELATED_DELAY: Duration = Duration::from_millis(500);
/// How often the bench looks for the unrelated change's keys: the resolution of that measure.
const KEYS_POLL: Duration = Duration::from_millis(5);
/// Rows of the scratch tables: the measure changes none, so the smallest layout will do.
const SCRATCH_LAYOUT_KEYS: u64 = 1_000;

/// What the measure saw.
pub struct BulkUsers {
    /// The mode the worker ran in.
    pub mode: Mode,
    /// One `SCAN MATCH :1:report:12345:* COUNT 1000` pass over this keyspace (median of 3).
    pub reference: Duration,
    /// The unrelated change's commit → its keys gone.
    pub unrelated: Duration,
    /// The bulk statement's commit → outbox empty.
    pub drained: Duration,
    /// Keys in the keyspace, and keys the measure removed (checked).
    pub keys: u64,
    pub removed: u64,
}

/// The key of one viewer of a report (the viewer's index keeps two views by one user apart, as
/// two filter hashes would).
fn key(report: u32, viewer: u32, user: u32) -> String {
    format!(
        ":1:report:{report}:{user}:{:08x}",
        hash(&[7, report.into(), viewer.into()]) as u32
    )
}

/// The keyspace: `(user, key)` for every report key, the unrelated report's last.
fn keyspace() -> Vec<(u32, String)> {
    let mut keys: Vec<(u32, String)> = (1..=REPORT_KEYS / VIEWERS)
        .flat_map(|report| {
            (0..VIEWERS).map(move |viewer| {
                let user = 1
                    + (hash(&[6, report.into(), viewer.into()]) % u64::from(USERS_WITH_KEYS))
                        as u32;
                (user, key(report, viewer, user))
            })
        })
        .collect();
    keys.extend(UNRELATED_VIEWERS.map(|user| (user, key(UNRELATED_REPORT, 0, user))));
    keys
}

/// Fills a private Redis with the keyspace, sets a scratch database up, runs the daemon in
/// `mode` and measures; checks that exactly the keys of the invalidated users and of the unrelated
/// report are gone.
pub async fn measure(admin_url: &str, rules: &RuleSet, cluster: bool, mode: Mode) -> BulkUsers {
    let redis_server = if cluster {
        PrivateRedis::start_cluster(crate::CLUSTER_PRIMARIES)
    } else {
        PrivateRedis::start()
    };
    let redis = Nodes::connect(&redis_server.node_urls(), redis_server.router()).await;
    let keys = keyspace();
    let size = layout::fill_keys(&redis, keys.iter().map(|(_, key)| key.clone())).await;
    eprintln!("[users] {} report keys", thousands(size));
    let unrelated: HashSet<String> = UNRELATED_VIEWERS
        .map(|user| key(UNRELATED_REPORT, 0, user))
        .collect();
    let must_go: HashSet<String> = keys
        .into_iter()
        .filter(|(user, _)| *user <= USERS_INVALIDATED)
        .map(|(_, key)| key)
        .chain(unrelated.iter().cloned())
        .collect();
    let reference = reference(&redis).await;
    eprintln!("[users] one SCAN MATCH pass {}", show(reference));

    let db = ScratchDb::create(admin_url, &Layout::for_keys(SCRATCH_LAYOUT_KEYS), rules).await;
    let client = db.client().await;
    let poller = db.client().await;
    let removal = redis.before_removal(&must_go).await;
    let daemon = InProcess::start(&db.url, redis_server.daemon_url(), mode, None);
    if mode == Mode::Index {
        // What is measured is the index at work, not the sweep that clears changes while it seeds.
        daemon.wait_complete().await;
    }
    let (unrelated_took, drained) = bulk_then_unrelated(&client, &poller, &redis, &unrelated).await;
    daemon.stop().await;
    let removed = removal.check(&redis, &must_go).await;
    drop(client);
    drop(poller);
    db.drop().await;
    BulkUsers {
        mode,
        reference,
        unrelated: unrelated_took,
        drained,
        keys: size,
        removed,
    }
}

/// On an idle worker: the bulk `invalidate_user` statement, then the unrelated change half a
/// second later. Returns the unrelated change's commit → keys gone, and the bulk statement's
/// commit → outbox drained.
async fn bulk_then_unrelated(
    client: &Client,
    poller: &Client,
    redis: &Nodes,
    unrelated: &HashSet<String>,
) -> (Duration, Duration) {
    // The worker is connected and idle once it has cleared a change of nothing.
    commit(client, INVALIDATE_REPORT, &0_i64).await;
    wait_drained(poller).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let bulk = "SELECT cache_invalidator.invalidate_user(g) FROM generate_series(1, $1::int) g";
    commit(client, bulk, &(USERS_INVALIDATED as i32)).await;
    let bulk_committed = Instant::now();
    tokio::time::sleep(UNRELATED_DELAY).await;
    let unrelated_sent = Instant::now();
    commit(client, INVALIDATE_REPORT, &i64::from(UNRELATED_REPORT)).await;
    while redis.count_existing(unrelated).await > 0 {
        tokio::time::sleep(KEYS_POLL).await;
    }
    let unrelated_took = unrelated_sent.elapsed();
    eprintln!("[users] unrelated change {}", show(unrelated_took));
    let drained = wait_drained(poller).await - bulk_committed;
    eprintln!("[users] drained {}", show(drained));
    (unrelated_took, drained)
}

const INVALIDATE_REPORT: &str = "SELECT cache_invalidator.invalidate_report($1::bigint)";

/// One statement of the app's, on its own (autocommit) with its one parameter.
async fn commit(client: &Client, sql: &str, parameter: &(dyn ToSql + Sync)) {
    if let Err(error) = client.execute(sql, &[parameter]).await {
        panic!("{sql}: {error}");
    }
}

/// The measure's lines: its reference pass, the unrelated change and the drain.
pub fn lines(bulk: &BulkUsers) -> Vec<Line> {
    let keys = thousands(bulk.keys);
    let passes = |duration: Duration| duration.as_secs_f64() / bulk.reference.as_secs_f64();
    let users = thousands(USERS_INVALIDATED.into());
    vec![
        Line::new(
            "users: reference, one `SCAN MATCH :1:report:12345:* COUNT 1000` pass over the report \
             keys (median of 3)",
            &keys,
            show(bulk.reference),
            "1.00×".to_owned(),
            Judged::none(),
        ),
        Line::new(
            format!(
                "users: an unrelated `invalidate_report` committed 0.5 s after `SELECT \
                 invalidate_user(g) FROM generate_series(1, {users})` ({} mode): commit → keys \
                 gone",
                bulk.mode
            ),
            &keys,
            show(bulk.unrelated),
            format!("{:.2}×", passes(bulk.unrelated)),
            table::USERS_UNRELATED.judge(bulk.unrelated.as_secs_f64()),
        ),
        Line::new(
            format!(
                "users: the {users} user invalidations ({} mode), commit → outbox drained",
                bulk.mode
            ),
            &keys,
            format!(
                "{} ({} keys removed, exactly those of the users and the report)",
                show(bulk.drained),
                thousands(bulk.removed)
            ),
            format!("{:.2}×", passes(bulk.drained)),
            table::USERS_DRAINED.judge(bulk.drained, bulk.reference),
        ),
    ]
}
