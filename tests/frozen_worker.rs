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
/// How long other awaited effects may take (a bound, not a measurement).
const PATIENCE: Duration = Duration::from_secs(60);
/// Redis answers nothing for this long (`CLIENT PAUSE … ALL`), so the first worker's sweep is
/// surely in flight, its claim held, when it is frozen.
const REDIS_PAUSE_MS: u64 = 4_000;

/// `cache-invalidator run` with the default claim timeout and poll interval; `application_name`
/// names its Postgres sessions, to see which rows it holds.
fn start_worker(
    database_url: &str,
    redis_url: &str,
    rules: &Path,
    log: &Path,
    application_name: &str,
) -> LoggedChild {
    let mut url = url::Url::parse(database_url).expect("database url");
    url.query_pairs_mut()
        .append_pair("application_name", application_name);
    let mut command = daemon_command(&[
        "run",
        "--rules",
        rules.to_str().expect("utf-8 path"),
        "--refill-guard",
        "0",
    ]);
    command
        .env_remove("CACHE_INVALIDATOR_CLAIM_TIMEOUT")
        .env_remove("CACHE_INVALIDATOR_POLL_INTERVAL")
        .env("DATABASE_URL", url.as_str())
        .env("REDIS_URL", redis_url);
    LoggedChild::spawn(command, log.to_path_buf())
}

/// Outbox rows locked right now by sessions named `application_name` (a locked row's `xmax` is
/// the locking transaction's id, which `pg_stat_activity.backend_xid` shows per session).
async fn rows_held_by(db: &TestDb, application_name: &str) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT count(*) FROM cache_invalidator.outbox WHERE xmax IN \
             (SELECT backend_xid FROM pg_stat_activity \
              WHERE datname = current_database() AND application_name = $1 \
              AND backend_xid IS NOT NULL)",
            &[&application_name],
        )
        .await
        .expect("rows held")
        .get(0)
}

/// The process state letter from `/proc/<pid>/stat` (`T`: stopped by a signal).
fn process_state(child: &LoggedChild) -> char {
    let pid = child.id().expect("child still running");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // `pid (comm) state …`: comm may hold spaces and parentheses, the state follows the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .expect("state field")
}

async fn wait_for_workers(db: &TestDb, count: usize) {
    let client = db.client().await;
    assert!(
        wait_until(PATIENCE, || async {
            cache_invalidator::ops::connected_workers(&client)
                .await
                .map(|workers| workers.len())
                .unwrap_or(0)
                == count
        })
        .await,
        "{count} worker(s) never listened"
    );
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
    let space = KeySpace::new("frozen");
    let db = TestDb::with_reports("frozen", &space.rules()).await;
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
    let must_go = vec![
        space.key("report:1:7:h"),
        space.key("reportlist:reports:1:p1"),
    ];
    let later = vec![
        space.key("report:3:7:h"),
        space.key("reportlist:reports:3:p1"),
    ];
    let decoys = vec![
        space.key("report:2:7:h"),
        space.key("reportlist:reports:2:p1"),
    ];
    let mut connection = redis_connection(&redis.url()).await;
    set_keys(&mut connection, &[&must_go[..], &later, &decoys].concat()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, default_rules_toml(&space.key_prefix())).expect("write rules");

    let frozen_name = unique("frozen");
    let mut frozen = start_worker(
        &db.url,
        &redis.url(),
        &rules,
        &dir.path().join("frozen.log"),
        &frozen_name,
    );
    wait_for_workers(&db, 1).await;

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
        wait_until(PATIENCE, || async {
            rows_held_by(&db, &frozen_name).await > 0
        })
        .await,
        "the first worker never claimed the change; log:\n{}",
        frozen.log_text()
    );
    send_signal(&frozen, "STOP").await;
    let frozen_at = Instant::now();
    assert_eq!(process_state(&frozen), 'T', "SIGSTOP did not stop it");
    assert!(
        rows_held_by(&db, &frozen_name).await > 0,
        "the claim was gone before the freeze"
    );

    let mut other = start_worker(
        &db.url,
        &redis.url(),
        &rules,
        &dir.path().join("other.log"),
        &unique("other"),
    );
    let in_time = cleared(&db, &redis.url(), &must_go, CLEARED_WITHIN).await;
    let took = frozen_at.elapsed();
    assert!(
        in_time,
        "the change was not cleared within {CLEARED_WITHIN:?} of the freeze: {} outbox row(s), \
         frozen worker holding {}; other worker's log:\n{}",
        db.outbox_rows().await,
        rows_held_by(&db, &frozen_name).await,
        other.log_text()
    );
    // The other worker did it: the frozen one is still stopped.
    assert_eq!(
        process_state(&frozen),
        'T',
        "the frozen worker was running again"
    );
    println!(
        "cleared {:.1} s after the freeze, by the other worker (default --claim-timeout)",
        took.as_secs_f64()
    );
    assert_kept(&mut connection, &decoys).await;

    // Woken, the frozen worker finds its claim gone and goes on working: with the other one
    // stopped, it clears the next change alone and stops cleanly.
    send_signal(&frozen, "CONT").await;
    send_signal(&other, "TERM").await;
    let status = tokio::time::timeout(PATIENCE, other.wait())
        .await
        .expect("the other worker did not stop")
        .expect("wait for the other worker");
    assert!(status.success(), "the other worker failed");
    wait_for_workers(&db, 1).await;
    db.client()
        .await
        .batch_execute("UPDATE reports_report SET title = 'new' WHERE id = 3")
        .await
        .expect("change report 3");
    assert!(
        cleared(&db, &redis.url(), &later, PATIENCE).await,
        "the resumed worker did not clear a new change; log:\n{}",
        frozen.log_text()
    );
    assert_kept(&mut connection, &decoys).await;
    send_signal(&frozen, "TERM").await;
    let status = tokio::time::timeout(PATIENCE, frozen.wait())
        .await
        .expect("the resumed worker did not stop")
        .expect("wait for the resumed worker");
    assert!(
        status.success(),
        "the resumed worker failed; log:\n{}",
        frozen.log_text()
    );
    db.drop().await;
}
