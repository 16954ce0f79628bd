//! The refill guard: a slow reader that writes stale data back right after the
//! invalidation is caught by the delayed second pass, which rides along a busy sweep instead of
//! adding one.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cache_invalidator::redis_nodes::RedisTarget;
use cache_invalidator::sweep::Sweeper;
use cache_invalidator::window::PatternSpec;
use common::*;

/// Sets `key`, commits `write`, and waits until the daemon has cleared the key.
async fn cleared_after(
    client: &tokio_postgres::Client,
    redis: &mut redis::aio::MultiplexedConnection,
    key: &str,
    write: &str,
) {
    let key = [key.to_owned()];
    set_keys(redis, &key).await;
    client
        .batch_execute(write)
        .await
        .unwrap_or_else(|e| panic!("{write}: {e}"));
    assert_gone_within(redis, &key, Duration::from_secs(30)).await;
}

/// Reads report 5, lets a write commit and the daemon clear the keys, then writes the old value
/// back (what a request that read before the commit does). Returns whether the stale entry is
/// still there once a later change has been processed after the guard delay.
async fn stale_refill_survives(guard: Duration) -> bool {
    let space = KeyPrefix::new("refill");
    let db = TestDb::with_reports("refill", &space.rules()).await;
    let mut redis = redis_connection(&shared_redis_url()).await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO auth_user (id) VALUES (1);
             INSERT INTO reports_report (id, title, author_id) VALUES (5, 'old', 1), (6, 'x', 1);",
        )
        .await
        .expect("seed");
    let stale_key = space.key("report:5:1:h");
    let mut settings = test_settings(&db.url, &shared_redis_url(), space.rules());
    settings.refill_guard = guard;
    let daemon = Daemon::start(settings);
    // The seed rows' own changes are cleared first: in index mode they are swept while the index
    // seeds, and that pass could otherwise reach the stale entry below after its write.
    assert!(
        wait_until(Duration::from_secs(30), || async {
            db.outbox_rows().await == 0
        })
        .await
    );

    // The slow reader reads the report before the write commits...
    let title: String = client
        .query_one("SELECT title FROM reports_report WHERE id = 5", &[])
        .await
        .expect("read")
        .get(0);
    let write = "UPDATE reports_report SET title = 'new' WHERE id = 5";
    cleared_after(&client, &mut redis, &stale_key, write).await;
    // ...and fills the cache with what it read, after the invalidation.
    let () = redis::cmd("SET")
        .arg(&stale_key)
        .arg(&title)
        .query_async(&mut redis)
        .await
        .expect("stale fill");

    // Wait past the guard's delay, then for a later change to be fully processed: by then a
    // second pass, if any, has run.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let marker = space.key("report:6:1:h");
    let write = "UPDATE reports_report SET title = 'y' WHERE id = 6";
    cleared_after(&client, &mut redis, &marker, write).await;
    let gone = wait_until(Duration::from_secs(5), || {
        let mut redis = redis.clone();
        let key = stale_key.clone();
        async move { !exists(&mut redis, &key).await }
    })
    .await;
    let _: i64 = redis::cmd("DEL")
        .arg(&stale_key)
        .query_async(&mut redis)
        .await
        .expect("cleanup");
    daemon.stop().await;
    db.drop().await;
    !gone
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_pass_removes_a_stale_refill() {
    assert!(
        !stale_refill_survives(Duration::from_millis(500)).await,
        "the stale entry written after the invalidation must be removed by the second pass"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_guard_a_stale_refill_stays() {
    assert!(
        stale_refill_survives(Duration::ZERO).await,
        "with --refill-guard 0 nothing removes the stale entry (this is the race the guard closes)"
    );
}

/// Runs windows through a sweeper on `url`; `with_guard` adds a refill pass after the third step,
/// while more work arrives. Returns (passes completed, refill keys deleted).
async fn passes_for(url: &str, with_guard: bool) -> (u64, u64) {
    let target = RedisTarget::parse(url, None, Duration::from_secs(5)).expect("url");
    // One lane: its steps come in a fixed order, so "after 3 steps" is the same point of the pass
    // in both runs (lanes answer in whatever order Redis and the scheduler allow).
    let mut sweeper = Sweeper::with_lanes(target.connect().await.expect("connect"), 1);
    let label: Arc<str> = Arc::from("reports_report");
    let spec = |pattern: &str| PatternSpec {
        pattern: pattern.into(),
        label: label.clone(),
    };
    let mut connection = redis_connection(url).await;
    sweeper
        .add_window(&[spec(":1:report:1:*")], false)
        .expect("window");
    let mut passes = 0;
    let mut refill_deleted = 0;
    let mut steps = 0;
    while sweeper.is_busy() {
        let report = sweeper.step().await.expect("step");
        passes += report.pass_durations.len() as u64;
        refill_deleted += report.refill_deleted;
        steps += 1;
        if steps == 3 && with_guard {
            // A stale refill of report 2 appeared; its guard comes due while the worker is busy.
            set_keys(&mut connection, &[":1:report:2:1:stale".to_owned()]).await;
            sweeper
                .add_window(&[spec(":1:report:2:*")], true)
                .expect("guard");
        }
        if steps == 6 {
            // More work arrives: the busy window the guard coincides with.
            sweeper
                .add_window(&[spec(":1:report:3:*")], false)
                .expect("window");
        }
    }
    (passes, refill_deleted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_pass_coinciding_with_a_busy_window_adds_no_sweep() {
    let redis = PrivateRedis::start();
    let mut connection = redis_connection(&redis.url()).await;
    // Enough keys that a pass takes many SCAN steps, so windows can join mid-pass.
    let filler: Vec<String> = (0..20_000).map(|i| format!(":1:session:{i}")).collect();
    for chunk in filler.chunks(5_000) {
        set_keys(&mut connection, chunk).await;
    }
    let (without_guard, _) = passes_for(&redis.url(), false).await;
    let (with_guard, refill_deleted) = passes_for(&redis.url(), true).await;
    assert_eq!(
        with_guard, without_guard,
        "the guard joined the pass in progress instead of adding one"
    );
    assert_eq!(refill_deleted, 1, "the stale refill is counted apart");
    assert!(!exists(&mut connection, ":1:report:2:1:stale").await);
}
