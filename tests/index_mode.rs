//! Index mode against real servers: the index is seeded, follows Redis' announcements, and finds
//! exactly the keys a sweep would; it survives a killed tracking connection and a restarted
//! Redis, forgets expired keys, falls back to sweeping past its memory bound, and a server that
//! refuses tracking gets sweep mode (auto) or a clear error (`--mode index`).
//!
//! Every test here runs the daemon in index mode whatever `TEST_MODE` says.

mod common;

use std::time::Duration;

use cache_invalidator::settings::Mode;
use common::*;

async fn insert_reports(client: &tokio_postgres::Client, ids: std::ops::RangeInclusive<i32>) {
    client
        .batch_execute("INSERT INTO auth_user (id) VALUES (1), (2) ON CONFLICT DO NOTHING")
        .await
        .expect("users");
    client
        .execute(
            "INSERT INTO reports_report (id, title, author_id)
             SELECT g, 'r', 1 FROM generate_series($1::int, $2::int) g",
            &[ids.start(), ids.end()],
        )
        .await
        .expect("reports");
}

/// `report:{id}:{user}:h` for each of `ids`: how user `user`'s view of those reports is cached.
fn report_keys(space: &KeyPrefix, ids: impl Iterator<Item = i32>, user: u32) -> Vec<String> {
    ids.map(|id| space.key(&format!("report:{id}:{user}:h")))
        .collect()
}

/// What most tests here start from: a Redis of their own (the index is per server, and some
/// tests kill its clients or restart it), a key space, and a database whose reports 1 to `reports`
/// exist with a client of it.
async fn private_setup(
    tag: &str,
    reports: i32,
) -> (PrivateRedis, KeyPrefix, TestDb, tokio_postgres::Client) {
    let private = PrivateRedis::start();
    let space = KeyPrefix::new(tag);
    let db = TestDb::with_reports(tag, &space.rules()).await;
    let client = db.client().await;
    insert_reports(&client, 1..=reports).await;
    (private, space, db, client)
}

#[tokio::test]
async fn keys_set_just_before_their_change_commits_are_always_cleared() {
    const ROUNDS: i32 = 300;
    let (private, space, db, mut client) = private_setup("idx_race", ROUNDS).await;
    let mut redis = patient_connection(&private.url()).await;
    let daemon = Daemon::start_indexed(test_settings(&db.url, &private.url(), space.rules())).await;

    let mut written = Vec::new();
    let mut decoys = Vec::new();
    for id in 1..=ROUNDS {
        let transaction = client.transaction().await.expect("begin");
        transaction
            .execute(
                "UPDATE reports_report SET title = 'changed' WHERE id = $1",
                &[&id],
            )
            .await
            .expect("update");
        // The app's SET returns, then the change commits: the daemon must find the key.
        let key = space.key(&format!("report:{id}:2:h"));
        let decoy = space.key(&format!("report:{}:2:h", id + 100_000));
        set_keys(&mut redis, &[key.clone(), decoy.clone()]).await;
        transaction.commit().await.expect("commit");
        written.push(key);
        decoys.push(decoy);
    }
    assert_gone_within(&mut redis, &written, PATIENCE).await;
    assert_kept(&mut redis, &decoys).await;
    assert!(wait_until(PATIENCE, || async { db.outbox_rows().await == 0 }).await);
    assert_eq!(
        daemon.health.mode(),
        "index (complete)",
        "the changes were answered from the index"
    );
    daemon.stop().await;
    db.drop().await;
}

/// A key the daemon deleted leaves the index once a check finds it gone. An app writing the key
/// again right after that `UNLINK` (before, around or after the check: 0–7 ms later) must leave
/// it indexed: the next change clears it.
#[tokio::test]
async fn keys_written_again_right_after_the_daemons_unlink_stay_indexed() {
    const ROUNDS: i32 = 100;
    let (private, space, db, client) = private_setup("idx_rewrite", ROUNDS).await;
    let mut redis = redis_connection(&private.url()).await;
    let daemon = Daemon::start_indexed(test_settings(&db.url, &private.url(), space.rules())).await;
    let change = |id: i32| touch_report(&client, id);
    for id in 1..=ROUNDS {
        let key = space.key(&format!("report:{id}:2:h"));
        set_keys(&mut redis, std::slice::from_ref(&key)).await;
        // Watches for the daemon's UNLINK and writes the key again right after it.
        let writer = tokio::spawn({
            let (url, key) = (private.url(), key.clone());
            async move {
                let mut redis = redis_connection(&url).await;
                while exists(&mut redis, &key).await {}
                tokio::time::sleep(Duration::from_millis((id % 8) as u64)).await;
                set_keys(&mut redis, std::slice::from_ref(&key)).await;
            }
        });
        change(id).await;
        tokio::time::timeout(PATIENCE, writer)
            .await
            .expect("the daemon deletes the key")
            .expect("writer");
        assert!(wait_until(PATIENCE, || async { db.outbox_rows().await == 0 }).await);
        change(id).await;
        assert_gone_within(&mut redis, std::slice::from_ref(&key), PATIENCE).await;
    }
    assert_eq!(daemon.health.mode(), "index (complete)");
    daemon.stop().await;
    db.drop().await;
}

/// The barrier itself, without Postgres in between: a key whose `SET` returned is found by a
/// lookup made right after the barrier, every time. On loopback Redis' announcement usually
/// arrives before the writer's reply anyway (it is queued first), so the count of keys found
/// without waiting is printed for the record: the barrier is what makes it certain when the
/// tracking connection lags (a slow network, a busy worker).
#[tokio::test]
async fn after_the_barrier_a_lookup_finds_every_key_whose_write_returned() {
    const ROUNDS: usize = 200;
    let private = PrivateRedis::start();
    let space = KeyPrefix::new("idx_barrier");
    let target = cache_invalidator::redis_nodes::RedisTarget::parse(
        &private.url(),
        None,
        Duration::from_secs(5),
    )
    .expect("redis url");
    let nodes = target.connect().await.expect("connect");
    let mut tracking = cache_invalidator::index::tracking::Tracking::new(
        space.rules().tracking_prefixes(),
        1_000_000,
        Duration::from_secs(5),
        Default::default(),
    );
    tracking.attach(&nodes).await.expect("tracking");
    assert!(
        wait_until(PATIENCE, || async { tracking.is_complete() }).await,
        "not seeded"
    );
    let mut redis = redis_connection(&private.url()).await;
    let mut found_without_waiting = 0;
    for round in 0..ROUNDS {
        let key = space.key(&format!("report:{round}:1:h"));
        set_keys(&mut redis, std::slice::from_ref(&key)).await;
        let pattern = cache_invalidator::window::PatternSpec {
            pattern: format!("{}*", space.key(&format!("report:{round}:"))).into(),
            label: "reports_report".into(),
        };
        let finds = |tracking: &cache_invalidator::index::tracking::Tracking| {
            cache_invalidator::index::lookup(&tracking.parts(), std::slice::from_ref(&pattern))
                .expect("complete")
                .iter()
                .flatten()
                .any(|(found, _)| **found == *key.as_bytes())
        };
        if finds(&tracking) {
            found_without_waiting += 1;
        }
        tracking.barrier().await.expect("barrier");
        assert!(
            finds(&tracking),
            "round {round}: {key} not in the index after the barrier"
        );
    }
    println!("found without the barrier: {found_without_waiting} of {ROUNDS}");
    tracking.drop_index();
}

/// The id of the private server's tracking client (`flags` holds `t`).
async fn tracking_client_id(redis: &mut redis::aio::MultiplexedConnection) -> Option<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(redis)
        .await
        .expect("client list");
    list.lines().find_map(|line| {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|part| part.strip_prefix(name)?.strip_prefix('='))
        };
        field("flags")
            .filter(|flags| flags.contains('t'))
            .and(field("id"))
            .map(str::to_owned)
    })
}

/// Writes keys for reports `ids` (and decoys of other reports), changes the reports, and asserts
/// the keys go and the decoys stay.
async fn change_and_check(
    client: &tokio_postgres::Client,
    redis: &mut redis::aio::MultiplexedConnection,
    space: &KeyPrefix,
    ids: std::ops::RangeInclusive<i32>,
) {
    let keys = report_keys(space, ids.clone(), 2);
    let decoys = report_keys(space, ids.clone().map(|id| id + 100_000), 2);
    set_keys(redis, &keys).await;
    set_keys(redis, &decoys).await;
    for id in ids {
        touch_report(client, id).await;
    }
    assert_gone_within(redis, &keys, PATIENCE).await;
    assert_kept(redis, &decoys).await;
}

/// Redis announces a flush of any database to every tracking client without saying which one: a
/// `FLUSHDB` of another database must not empty this database's index while its keys stay.
#[tokio::test]
async fn a_flush_of_another_database_loses_none_of_this_ones_keys() {
    let (private, space, db, client) = private_setup("idx_flush", 20).await;
    let mut redis = redis_connection(&private.url()).await;
    let daemon = Daemon::start_indexed(test_settings(&db.url, &private.url(), space.rules())).await;
    let keys = report_keys(&space, 1..=20, 2);
    set_keys(&mut redis, &keys).await;
    let mut other = redis_connection(&private.url()).await;
    let () = redis::cmd("SELECT")
        .arg(1)
        .query_async(&mut other)
        .await
        .expect("select");
    let () = redis::cmd("FLUSHDB")
        .query_async(&mut other)
        .await
        .expect("flushdb");
    for id in 1..=20 {
        touch_report(&client, id).await;
    }
    assert_gone_within(&mut redis, &keys, PATIENCE).await;
    daemon.stop().await;
    db.drop().await;
}

#[tokio::test]
async fn a_killed_tracking_connection_is_seeded_again_and_nothing_is_missed() {
    let (private, space, db, client) = private_setup("idx_kill", 200).await;
    let mut redis = redis_connection(&private.url()).await;
    let daemon = Daemon::start_indexed(test_settings(&db.url, &private.url(), space.rules())).await;
    change_and_check(&client, &mut redis, &space, 1..=20).await;

    // Killed mid-stream: keys written and changes committed around the kill.
    let id = tracking_client_id(&mut redis)
        .await
        .expect("the daemon's tracking connection");
    let writer = {
        let url = private.url();
        let space_keys = report_keys(&space, 21..=100, 2);
        tokio::spawn(async move {
            let mut redis = redis_connection(&url).await;
            for key in space_keys {
                set_keys(&mut redis, &[key]).await;
            }
        })
    };
    let () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&id)
        .query_async(&mut redis)
        .await
        .expect("client kill");
    writer.await.expect("writer");
    client
        .execute(
            "UPDATE reports_report SET title = 'k' WHERE id BETWEEN 21 AND 100",
            &[],
        )
        .await
        .expect("update");
    let written = report_keys(&space, 21..=100, 2);
    assert_gone_within(&mut redis, &written, PATIENCE).await;

    // Tracked again, on a new connection, and seeded again.
    daemon.wait_index_complete().await;
    let new_id = tracking_client_id(&mut redis)
        .await
        .expect("tracking again");
    assert_ne!(new_id, id);
    change_and_check(&client, &mut redis, &space, 101..=150).await;
    daemon.stop().await;
    db.drop().await;
}

#[tokio::test]
async fn after_redis_restarts_the_index_is_seeded_again() {
    let (mut private, space, db, client) = private_setup("idx_restart", 100).await;
    let daemon = Daemon::start_indexed(test_settings(&db.url, &private.url(), space.rules())).await;
    {
        let mut redis = redis_connection(&private.url()).await;
        change_and_check(&client, &mut redis, &space, 1..=20).await;
    }
    private.restart();
    let mut redis = redis_connection(&private.url()).await;
    // Keys written to the new server before the index knows it, then changed.
    change_and_check(&client, &mut redis, &space, 21..=40).await;
    daemon.wait_index_complete().await;
    change_and_check(&client, &mut redis, &space, 41..=60).await;
    daemon.stop().await;
    db.drop().await;
}

#[tokio::test]
async fn past_the_memory_bound_the_index_is_dropped_and_changes_are_swept() {
    let (private, space, db, client) = private_setup("idx_bound", 50).await;
    let mut redis = redis_connection(&private.url()).await;
    let filler = report_keys(&space, 1_000..1_500, 3);
    set_keys(&mut redis, &filler).await;
    let mut settings = test_settings(&db.url, &private.url(), space.rules());
    settings.index_max_keys = 100;
    settings.mode = Mode::Index;
    let daemon = Daemon::start(settings);
    let health = daemon.health.clone();
    assert!(
        wait_until(PATIENCE, || {
            let health = health.clone();
            async move { health.mode() == "sweep" }
        })
        .await,
        "the index was not dropped: {}",
        daemon.health.mode()
    );
    change_and_check(&client, &mut redis, &space, 1..=30).await;
    assert_eq!(daemon.health.mode(), "sweep");
    daemon.stop().await;
    db.drop().await;
}

/// Random changes of a fixed seed: statements over reports, student reports and users.
fn random_statements(seed: u64, count: usize) -> Vec<String> {
    let mut state = seed;
    let mut next = move |bound: u64| {
        // xorshift64*: deterministic, good enough to pick rows.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D) % bound
    };
    (0..count)
        .map(|_| match next(6) {
            0 => format!(
                "UPDATE reports_report SET title = 'x{}' WHERE id = {}",
                next(1000),
                1 + next(60)
            ),
            1 => format!(
                "UPDATE reports_report SET author_id = {} WHERE id = {}",
                1 + next(8),
                1 + next(60)
            ),
            2 => format!("DELETE FROM reports_report WHERE id = {}", 1 + next(60)),
            3 => format!(
                "INSERT INTO reports_report (id, title, author_id) VALUES ({}, 'n', {}) \
                 ON CONFLICT DO NOTHING",
                61 + next(40),
                1 + next(8)
            ),
            4 => format!("SELECT cache_invalidator.invalidate_user({})", 1 + next(8)),
            _ => format!(
                "SELECT cache_invalidator.invalidate_report({})",
                1 + next(100)
            ),
        })
        .collect()
}

/// Logical keys of reports 1..=100 seen by users 1..=8, and the users' list pages.
fn logical_keys() -> Vec<String> {
    let mut keys = Vec::new();
    for report in 1..=100 {
        for user in 1..=8 {
            keys.push(format!("report:{report}:{user}:h"));
        }
    }
    for user in 1..=8 {
        keys.push(format!("reportlist:reports:{user}:h"));
        keys.push(format!("reportlist:student-reports:{user}:h"));
    }
    keys
}

/// Runs `statements` against a fresh database and keyspace with the daemon in `mode`; returns the
/// logical keys left.
async fn survivors(mode: Mode, statements: &[String]) -> std::collections::BTreeSet<String> {
    let space = KeyPrefix::new(&format!("idx_diff_{mode}"));
    let db = TestDb::with_reports("idx_diff", &space.rules()).await;
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO auth_user (id) SELECT g FROM generate_series(1, 8) g")
        .await
        .expect("users");
    insert_reports(&client, 1..=60).await;
    let mut redis = redis_connection(&shared_redis_url()).await;
    let keys: Vec<String> = logical_keys().iter().map(|k| space.key(k)).collect();
    set_keys(&mut redis, &keys).await;
    let mut settings = test_settings(&db.url, &shared_redis_url(), space.rules());
    settings.mode = mode;
    let daemon = match mode {
        Mode::Index => Daemon::start_indexed(settings).await,
        _ => Daemon::start(settings),
    };
    for statement in statements {
        client.batch_execute(statement).await.expect("statement");
    }
    assert!(
        wait_until(PATIENCE, || async { db.outbox_rows().await == 0 }).await,
        "outbox not drained"
    );
    daemon.stop().await;
    let prefix = space.key("");
    let left = keys_with_prefix(&mut redis, &prefix)
        .await
        .into_iter()
        .map(|key| key[prefix.len()..].to_owned())
        .collect();
    db.drop().await;
    left
}

#[tokio::test]
async fn index_and_sweep_delete_exactly_the_same_keys() {
    for seed in [7u64, 1_234_567, 99] {
        let mut statements = random_statements(seed, 120);
        if seed == 99 {
            // TRUNCATE's namespaces (`…:report:*`) are globs too, answered by the same walk.
            statements.push("TRUNCATE reports_report CASCADE".to_owned());
        }
        let (indexed, swept) = tokio::join!(
            survivors(Mode::Index, &statements),
            survivors(Mode::Sweep, &statements)
        );
        assert_eq!(indexed, swept, "seed {seed}");
        assert!(
            indexed.len() < logical_keys().len(),
            "seed {seed}: the changes deleted nothing"
        );
        assert!(
            !indexed.is_empty(),
            "seed {seed}: the changes deleted everything"
        );
    }
}

#[tokio::test]
async fn expired_keys_leave_the_index() {
    const KEYS: i32 = 100_000;
    let private = PrivateRedis::start();
    let space = KeyPrefix::new("idx_ttl");
    let db = TestDb::with_reports("idx_ttl", &space.rules()).await;
    let rules = RulesFile::default_for(&space, "");
    let args = ["--mode", "index"];
    let daemon = ChildDaemon::worker(&db.url, &private.url(), &rules.path, &args, true);
    let addr = daemon.metrics_addr();
    let index_keys = || async {
        let body = http_get(addr, "/metrics").await?;
        sample(&body, "cache_invalidator_index_keys")
    };
    assert!(
        wait_until(PATIENCE, || async {
            http_get(addr, "/healthz")
                .await
                .is_some_and(|body| body.contains("index (complete)"))
        })
        .await,
        "index not complete"
    );
    let mut redis = redis_connection(&private.url()).await;
    let keys = report_keys(&space, 0..KEYS, 1);
    // Written first and given their 2 s TTL once all are in the index: writing 100k keys can take
    // longer than 2 s, and then the first would expire before the last is written.
    for chunk in keys.chunks(1_000) {
        set_keys(&mut redis, chunk).await;
    }
    assert!(
        wait_until(Duration::from_secs(90), || async {
            index_keys().await.is_some_and(|n| n == KEYS as f64)
        })
        .await,
        "the announced keys did not reach the index: {:?}",
        index_keys().await
    );
    for chunk in keys.chunks(1_000) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("PEXPIRE").arg(key).arg(2_000).ignore();
        }
        let () = pipe.query_async(&mut redis).await.expect("pexpire");
    }
    // Redis reclaims expired keys by sampling; each is announced, checked and forgotten.
    assert!(
        wait_until(Duration::from_secs(180), || async {
            index_keys().await.is_some_and(|n| n == 0.0)
        })
        .await,
        "expired keys stayed in the index: {:?}",
        index_keys().await
    );
    // Only the daemon's marker key is left (index mode's swap check).
    let left = keys_with_prefix(&mut redis, &space.key_prefix()).await;
    assert!(left.is_empty(), "{} cache keys left", left.len());
    db.drop().await;
}

#[tokio::test]
async fn a_server_that_refuses_tracking_gets_sweep_mode_or_a_clear_error() {
    let private = PrivateRedis::start();
    let mut admin = redis_connection(&private.url()).await;
    // An ACL that allows everything the sweep needs, but not CLIENT TRACKING. (This does not
    // give Dragonfly's `ERR syntax error`, which no server here sends: that reply's classification
    // is unit-tested in index/tracking.rs.)
    let () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("sweeper")
        .arg("on")
        .arg(">s3cret-pw")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .arg("-client|tracking")
        .query_async(&mut admin)
        .await
        .expect("acl setuser");
    // The server as the daemon must name it (`Redis 7.0.15`, or `Valkey 8.0.1` when the tests
    // run against Valkey).
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut admin)
        .await
        .expect("info server");
    let server =
        cache_invalidator::index::tracking::server_identity(&info).expect("a named server");
    let url = format!("redis://sweeper:s3cret-pw@127.0.0.1:{}/0", private.port);
    let space = KeyPrefix::new("idx_refuse");
    let db = TestDb::with_reports("idx_refuse", &space.rules()).await;
    let rules = RulesFile::default_for(&space, "");
    let rules_path = rules.path.to_str().expect("utf-8 path");
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("REDIS_URL", url.as_str()),
    ];
    let output = run_cli(&["run", "--rules", rules_path, "--mode", "index"], &env).await;
    let text = stderr(&output);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("CLIENT TRACKING"), "{text}");
    assert!(text.contains(&format!("({server})")), "{text}");
    assert!(text.contains("may not run it"), "{text}");
    assert!(text.contains("NOPERM"), "{text}");
    assert!(!text.contains("s3cret-pw"), "{text}");

    let daemon = ChildDaemon::worker(&db.url, &url, &rules.path, &["--mode", "auto"], true);
    let addr = daemon.metrics_addr();
    let client = db.client().await;
    insert_reports(&client, 1..=10).await;
    let mut redis = redis_connection(&private.url()).await;
    change_and_check(&client, &mut redis, &space, 1..=10).await;
    let metrics = http_get(addr, "/metrics").await.unwrap_or_default();
    assert_eq!(
        sample(&metrics, "cache_invalidator_mode{mode=\"sweep\"}"),
        Some(1.0),
        "{metrics}"
    );
    let log = daemon.log_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("index mode unavailable"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains(&server), "{log}");
    assert!(warnings[0].contains("may not run it"), "{log}");
    db.drop().await;
}

#[tokio::test]
async fn status_and_healthz_say_the_mode_and_whether_the_index_is_complete() {
    let space = KeyPrefix::new("idx_status");
    let db = TestDb::with_reports("idx_status", &space.rules()).await;
    let daemon =
        Daemon::start_indexed(test_settings(&db.url, &shared_redis_url(), space.rules())).await;
    assert!(daemon.health.describe().contains("mode index (complete)"));
    // The worker shows its mode to `status` through its LISTEN connection, refreshed every 2 s.
    let shown = wait_until(PATIENCE, || async {
        let output = daemon_command(&["status"])
            .env("DATABASE_URL", &db.url)
            .env("REDIS_URL", shared_redis_url())
            .output()
            .await
            .expect("status");
        stdout(&output).contains("mode index complete")
    })
    .await;
    assert!(shown, "status never showed the mode");
    daemon.stop().await;
    db.drop().await;
}
