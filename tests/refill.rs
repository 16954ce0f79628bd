//! The refill guard (issue 8): a slow reader that writes stale data back right after the
//! invalidation is caught by the delayed second pass, which rides along a busy sweep instead of
//! adding one.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cache_invalidator::keyspace::RedisTarget;
use cache_invalidator::settings::SecretUrl;
use cache_invalidator::sweep::{PatternSpec, Sweeper};
use common::*;

/// Reads report 5, lets a write commit and the daemon clear the keys, then writes the old value
/// back (what a request that read before the commit does). Returns whether the stale entry is
/// gone once a later change has been processed after the guard delay.
async fn stale_refill_survives(guard: Duration) -> bool {
    let space = KeySpace::new("refill");
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
    set_keys(&mut redis, std::slice::from_ref(&stale_key)).await;
    client
        .batch_execute("UPDATE reports_report SET title = 'new' WHERE id = 5")
        .await
        .expect("write");
    assert_gone_within(
        &mut redis,
        std::slice::from_ref(&stale_key),
        Duration::from_secs(30),
    )
    .await;
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
    set_keys(&mut redis, std::slice::from_ref(&marker)).await;
    client
        .batch_execute("UPDATE reports_report SET title = 'y' WHERE id = 6")
        .await
        .expect("marker write");
    assert_gone_within(
        &mut redis,
        std::slice::from_ref(&marker),
        Duration::from_secs(30),
    )
    .await;
    let survived = wait_until(Duration::from_secs(5), || {
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
    !survived
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

/// Runs windows through a sweeper on `redis`, adding `guard` (as a refill pass) after `guard_at`
/// steps and a fresh window after `fresh_at` steps. Returns (passes started, refill keys deleted).
async fn passes_for(url: &str, with_guard: bool) -> (u64, u64) {
    let target =
        RedisTarget::parse(&SecretUrl::new(url), None, Duration::from_secs(5)).expect("url");
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

/// Passes the worker (sweep mode, its own process) made while 200 row changes a second arrived for
/// `seconds` on a 2,000-key keyspace, with the refill guard at `guard`.
async fn passes_under_load(guard: &str, seconds: u64) -> f64 {
    const KEYS: i32 = 2_000;
    const CHANGES_PER_SECOND: u64 = 200;
    let redis_server = PrivateRedis::start();
    let space = KeySpace::new("guard_passes");
    let db = TestDb::with_reports("guard_passes", &space.rules()).await;
    let client = db.client().await;
    client
        .batch_execute(&format!(
            "INSERT INTO auth_user (id) VALUES (1);
             INSERT INTO reports_report (id, title, author_id)
                 SELECT g, 't', 1 FROM generate_series(1, {KEYS}) g;"
        ))
        .await
        .expect("seed");
    let mut redis = redis_connection(&redis_server.url()).await;
    let keys: Vec<String> = (1..=KEYS)
        .map(|id| space.key(&format!("report:{id}:1:h")))
        .collect();
    set_keys(&mut redis, &keys).await;
    let rules = tempfile::NamedTempFile::new().expect("rules file");
    std::fs::write(rules.path(), default_rules_toml(&space.key_prefix())).expect("write rules");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("address");
    let mut command = daemon_command(&[
        "run",
        "--mode",
        "sweep",
        "--refill-guard",
        guard,
        "--metrics-addr",
        &addr.to_string(),
    ]);
    command
        .env("DATABASE_URL", &db.url)
        .env("REDIS_URL", redis_server.url())
        .env("CACHE_INVALIDATOR_RULES", rules.path());
    let log = tempfile::NamedTempFile::new().expect("log file");
    let _daemon = LoggedChild::spawn(command, log.path().to_owned());
    assert!(
        wait_until(Duration::from_secs(30), || async {
            db.outbox_rows().await == 0 && http_get(addr, "/metrics").await.is_some()
        })
        .await,
        "the daemon did not start"
    );
    let passes = || async {
        let body = http_get(addr, "/metrics").await.unwrap_or_default();
        sample(&body, "cache_invalidator_sweeps_total").unwrap_or(0.0)
    };
    let before = passes().await;
    let mut tick = tokio::time::interval(Duration::from_millis(1_000 / CHANGES_PER_SECOND));
    for n in 0..seconds * CHANGES_PER_SECOND {
        tick.tick().await;
        let id = 1 + (n as i32 * 7919) % KEYS;
        client
            .execute(
                "UPDATE reports_report SET title = 'u' WHERE id = $1",
                &[&id],
            )
            .await
            .expect("update");
    }
    let drained = wait_until(Duration::from_secs(30), || async {
        db.outbox_rows().await == 0
    })
    .await;
    assert!(drained, "the outbox did not drain");
    // The last guard passes run after the outbox drained: they count too.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    passes().await - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_steady_changes_the_sweep_mode_guard_rides_along_with_passes_that_run_anyway() {
    const SECONDS: u64 = 4;
    let without = passes_under_load("0", SECONDS).await;
    let with = passes_under_load("500ms", SECONDS).await;
    println!("passes under load: {with} with the refill guard, {without} without");
    assert!(without > 0.0, "no pass was counted");
    assert!(
        with <= without * 1.25 + 2.0,
        "the guard added passes: {with} with it, {without} without"
    );
}
