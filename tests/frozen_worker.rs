//! A worker frozen while it holds a claim (SIGSTOP here; `docker pause` or a stalled VM look the
//! same to Postgres: the connections stay up, nothing is said on them) loses the claim after
//! `--claim-timeout`, and another worker clears the change while the frozen one is still stopped.
//! When the frozen worker resumes it finds its claim gone and carries on.
//!
//! Both workers are real `cache-invalidator run` processes with the default claim timeout and
//! poll interval, so the time printed (`cargo test --test frozen_worker -- --nocapture`) is what
//! an operator would see: about the claim timeout plus one poll interval.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// The target: cleared by another worker at most this long after the freeze.
const CLEARED_WITHIN: Duration = Duration::from_secs(60);
/// Redis answers nothing for this long (`CLIENT PAUSE … ALL`), so the first worker's sweep is
/// surely in flight, its claim held, when it is frozen.
const REDIS_PAUSE_MS: u64 = 4_000;

/// `cache-invalidator run` with the default claim timeout and poll interval; `application_name`
/// names its Postgres sessions, to see which rows it holds.
fn start_worker(
    database_url: &str,
    redis_url: &str,
    rules: &Path,
    application_name: &str,
) -> ChildDaemon {
    let url = with_application_name(database_url, application_name);
    ChildDaemon::worker(&url, redis_url, rules, &[], false)
}

/// Waits until the outbox is empty and none of `keys` exists; true if that happened in time.
async fn cleared(db: &TestDb, redis_url: &str, keys: &[String], within: Duration) -> bool {
    let connection = redis_connection(redis_url).await;
    wait_until(within, || {
        let mut connection = connection.clone();
        async move {
            if db.outbox_rows().await != 0 {
                return false;
            }
            for key in keys {
                if exists(&mut connection, key).await {
                    return false;
                }
            }
            true
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_loses_its_claim_and_another_worker_clears_the_change() {
    let (space, db) = space_with_reports("frozen").await;
    db.client()
        .await
        .batch_execute(
            "INSERT INTO auth_user (id) VALUES (1), (2), (3);
             INSERT INTO reports_report (id, author_id) VALUES (1, 1), (2, 2), (3, 3);
             DELETE FROM cache_invalidator.outbox;",
        )
        .await
        .expect("seed reports");
    let redis = PrivateRedis::start();
    let must_go = space.keys(&["report:1:7:h", "reportlist:reports:1:p1"]);
    let later = space.keys(&["report:3:7:h", "reportlist:reports:3:p1"]);
    let decoys = space.keys(&["report:2:7:h", "reportlist:reports:2:p1"]);
    let mut connection = redis_connection(&redis.url()).await;
    set_keys(&mut connection, &[&must_go[..], &later, &decoys].concat()).await;
    let rules = RulesFile::default_for(&space, "");

    let frozen_name = unique("frozen");
    let mut frozen = start_worker(&db.url, &redis.url(), &rules.path, &frozen_name);
    db.wait_for_workers(1, LONG_PATIENCE).await;

    // Redis holds every command for a while, so the worker claims the change and its sweep
    // waits in Redis: it is caught holding the claim, and has deleted nothing.
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(REDIS_PAUSE_MS)
        .arg("ALL")
        .query_async(&mut connection)
        .await
        .expect("CLIENT PAUSE");
    db.client()
        .await
        .batch_execute("UPDATE reports_report SET title = 'new' WHERE id = 1")
        .await
        .expect("change report 1");
    assert!(
        wait_until(LONG_PATIENCE, || async {
            db.rows_held_by(&frozen_name).await > 0
        })
        .await,
        "the first worker never claimed the change; log:\n{}",
        frozen.log_text()
    );
    frozen.signal("STOP").await;
    let frozen_at = Instant::now();
    // The signal is sent, but every thread of the process must reach the stop before /proc says
    // so: on a loaded machine the state read at once could still be 'R'.
    assert!(
        wait_until(Duration::from_secs(5), || async { frozen.state() == 'T' }).await,
        "SIGSTOP did not stop it (state {})",
        frozen.state()
    );
    assert!(
        db.rows_held_by(&frozen_name).await > 0,
        "the claim was gone before the freeze"
    );

    let mut other = start_worker(&db.url, &redis.url(), &rules.path, &unique("other"));
    let in_time = cleared(&db, &redis.url(), &must_go, CLEARED_WITHIN).await;
    let took = frozen_at.elapsed();
    assert!(
        in_time,
        "the change was not cleared within {CLEARED_WITHIN:?} of the freeze: {} outbox row(s), \
         frozen worker holding {}; other worker's log:\n{}",
        db.outbox_rows().await,
        db.rows_held_by(&frozen_name).await,
        other.log_text()
    );
    // The other worker did it: the frozen one is still stopped.
    assert_eq!(frozen.state(), 'T', "the frozen worker was running again");
    println!(
        "cleared {:.1} s after the freeze, by the other worker (default --claim-timeout)",
        took.as_secs_f64()
    );
    assert_kept(&mut connection, &decoys).await;

    // Woken, the frozen worker finds its claim gone and goes on working: with the other one
    // stopped, it clears the next change alone and stops cleanly.
    frozen.signal("CONT").await;
    let status = other.stop_within(LONG_PATIENCE).await;
    assert!(status.success(), "the other worker failed");
    db.wait_for_workers(1, LONG_PATIENCE).await;
    db.client()
        .await
        .batch_execute("UPDATE reports_report SET title = 'new' WHERE id = 3")
        .await
        .expect("change report 3");
    assert!(
        cleared(&db, &redis.url(), &later, LONG_PATIENCE).await,
        "the resumed worker did not clear a new change; log:\n{}",
        frozen.log_text()
    );
    assert_kept(&mut connection, &decoys).await;
    let status = frozen.stop_within(LONG_PATIENCE).await;
    assert!(
        status.success(),
        "the resumed worker failed; log:\n{}",
        frozen.log_text()
    );
    db.drop().await;
}
