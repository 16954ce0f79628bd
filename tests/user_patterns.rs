//! Bulk user invalidations (`report:*:{U}:*`, a `*` before the placeholder) must not hold other
//! changes back: the sweep looks such patterns up by the `:`-separated segment the user stands
//! in, instead of trying each one on every key it scans.

mod common;

use std::time::{Duration, Instant};

use cache_invalidator::settings::{Mode, Settings};
use common::*;

/// Users invalidated in one statement, as an app's `SELECT invalidate_user(id) FROM …` does.
const USERS_INVALIDATED: u32 = 6_000;
/// Users who own keys: those above [`USERS_INVALIDATED`] must keep theirs.
const USERS: u32 = 8_000;
/// Report keys in the keyspace. Trying 12,000 user patterns one by one on each of them costs
/// minutes a pass (a debug build); looked up, a pass takes well under a second.
const REPORT_KEYS: u32 = 24_000;
/// How long the unrelated change may take in this test (a debug build on a shared machine). The
/// release target is 2 s (see the bench's `--only users`); before the lookup it took minutes here.
const UNRELATED_BOUND: Duration = Duration::from_secs(20);
/// How long the 6,000 invalidations may take to drain.
const DRAIN_BOUND: Duration = Duration::from_secs(60);
/// The report of the unrelated change; its viewers are users no bulk invalidation names.
const UNRELATED_REPORT: u32 = 999_999;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_user_invalidations_do_not_hold_an_unrelated_change_back_in_sweep_mode() {
    bulk_user_invalidations(Mode::Sweep).await;
}

/// Index mode answers these patterns from its index: one in-memory walk per window over the
/// report keys, each key looked up by segment as in the sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_user_invalidations_do_not_hold_an_unrelated_change_back_in_index_mode() {
    bulk_user_invalidations(Mode::Index).await;
}

async fn bulk_user_invalidations(mode: Mode) {
    let (space, db) = space_with_reports("users").await;
    let mut redis = redis_connection(&shared_redis_url()).await;

    // report:{r}:{u}:h for every user, and one list page each.
    let report_keys: Vec<(u32, String)> = (0..REPORT_KEYS)
        .map(|r| {
            let user = r % USERS + 1;
            (user, space.key(&format!("report:{r}:{user}:h")))
        })
        .collect();
    let list_keys: Vec<(u32, String)> = (1..=USERS)
        .map(|user| (user, space.key(&format!("reportlist:reports:{user}:p"))))
        .collect();
    let unrelated: Vec<String> = (USERS + 1..=USERS + 10)
        .map(|user| space.key(&format!("report:{UNRELATED_REPORT}:{user}:h")))
        .collect();
    let all: Vec<String> = report_keys
        .iter()
        .chain(&list_keys)
        .map(|(_, key)| key.clone())
        .chain(unrelated.iter().cloned())
        .collect();
    set_keys(&mut redis, &all).await;

    let settings = test_settings(&db.url, &shared_redis_url(), space.rules());
    let daemon = match mode {
        Mode::Index => Daemon::start_indexed(settings).await,
        _ => Daemon::start(Settings {
            mode: Mode::Sweep,
            ..settings
        }),
    };

    let client = db.client().await;
    client
        .execute(
            "SELECT cache_invalidator.invalidate_user(g) FROM generate_series(1, $1::int) g",
            &[&(USERS_INVALIDATED as i32)],
        )
        .await
        .expect("bulk invalidate_user");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let committed = Instant::now();
    client
        .execute(
            "SELECT cache_invalidator.invalidate_report($1::bigint)",
            &[&i64::from(UNRELATED_REPORT)],
        )
        .await
        .expect("invalidate_report");
    assert_gone_within(&mut redis, &unrelated, UNRELATED_BOUND).await;
    let unrelated_took = committed.elapsed();

    assert!(
        wait_until(DRAIN_BOUND, || async { db.outbox_rows().await == 0 }).await,
        "the bulk invalidations did not drain within {DRAIN_BOUND:?}"
    );
    daemon.stop().await;

    // Exactly the invalidated users' keys are gone.
    let left = keys_with_prefix(&mut redis, &space.key_prefix()).await;
    let expected: std::collections::BTreeSet<String> = report_keys
        .iter()
        .chain(&list_keys)
        .filter(|(user, _)| *user > USERS_INVALIDATED)
        .map(|(_, key)| key.clone())
        .collect();
    let wrongly_kept: Vec<&String> = left.difference(&expected).take(5).collect();
    let wrongly_deleted: Vec<&String> = expected.difference(&left).take(5).collect();
    assert!(
        wrongly_kept.is_empty() && wrongly_deleted.is_empty(),
        "kept {} keys, expected {}: e.g. kept {wrongly_kept:?}, deleted {wrongly_deleted:?}",
        left.len(),
        expected.len()
    );
    eprintln!("{mode} mode: unrelated change cleared {unrelated_took:?} after its commit");

    let mut cleanup = redis::pipe();
    for key in &left {
        cleanup.cmd("UNLINK").arg(key).ignore();
    }
    let () = cleanup.query_async(&mut redis).await.expect("cleanup");
    db.drop().await;
}
