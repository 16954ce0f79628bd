//! Fault injection: the daemon loses nothing and deletes nothing extra whatever happens to
//! Postgres, Redis or the daemon itself.
//!
//! Each scenario starts the daemon, commits changes, injects the fault, commits more changes during
//! and after it, and then checks that every key a committed change names is gone within
//! `PATIENCE` (the bound) of recovery, that the decoys next to them are still there, and that the outbox is
//! empty. Servers a test breaks are its own (`PrivateRedis`, `PrivatePostgres`); the shared ones are
//! only used through a test's own database and key prefix.
//!
//! Where a fault must hit rows the worker has claimed but not finished, the test holds the sweep
//! with `CLIENT PAUSE … WRITE` (the `UNLINK`s wait, the claim stays open) and waits until
//! `pgrowlocks` shows the claim before injecting the fault.

mod common;

use std::collections::BTreeSet;
use std::process::Output;
use std::time::Duration;

use cache_invalidator::settings::Settings;
use common::*;
use redis::aio::MultiplexedConnection;
use tokio_postgres::Client;

/// A poll interval no test outlives: only notifications (and the drain after each LISTEN
/// reconnect) make the worker look at the outbox, so a listener that did not come back would leave
/// later changes pending.
const NO_POLL: Duration = Duration::from_secs(3600);
/// How long the Redis pauses last: long enough to inject a fault while the sweep waits.
const PAUSE_MS: u64 = 5000;
/// The graceful stop bound operators are promised.
const STOP_BOUND: Duration = Duration::from_secs(10);

/// Keys an INSERT of report `id` by `author` must clear.
fn must_go(space: &KeyPrefix, id: i64, author: i64) -> Vec<String> {
    vec![
        space.key(&format!("report:{id}:{author}:h")),
        space.key(&format!("report:{id}:99:h")),
        space.key(&format!("reportlist:reports:{author}:h")),
    ]
}

/// Keys next to those that nothing in these tests may clear.
fn decoys(space: &KeyPrefix, id: i64, author: i64) -> Vec<String> {
    vec![
        space.key(&format!("report:{id}0:{author}:h")),
        space.key_v2(&format!("report:{id}:{author}:h")),
        space.key(&format!("reportlist:reports:{author}0:h")),
        space.key(&format!("cache_stats:{author}")),
    ]
}

/// `CLIENT PAUSE <ms> <mode>`: `WRITE` holds the sweep's UNLINKs, `ALL` every command.
async fn pause_redis(connection: &mut MultiplexedConnection, millis: u64, mode: &str) {
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(millis)
        .arg(mode)
        .query_async(connection)
        .await
        .expect("CLIENT PAUSE");
}

/// What a fault test breaks: a database of its own (with `pgrowlocks`, which shows the rows a
/// claim holds) under its own key space, and a private Redis with a patient connection to it.
async fn scenario(tag: &str) -> (KeyPrefix, TestDb, PrivateRedis, MultiplexedConnection) {
    scenario_on(&admin_database_url(), tag).await
}

/// [`scenario`] with the database on the server `admin_url` points at.
async fn scenario_on(
    admin_url: &str,
    tag: &str,
) -> (KeyPrefix, TestDb, PrivateRedis, MultiplexedConnection) {
    let space = KeyPrefix::new(tag);
    let db = TestDb::with_reports_on(admin_url, tag, &space.rules()).await;
    db.client()
        .await
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pgrowlocks")
        .await
        .expect("create extension pgrowlocks");
    let redis_server = PrivateRedis::start();
    let redis = patient_connection(&redis_server.url()).await;
    (space, db, redis_server, redis)
}

/// Settings for a daemon that looks at the outbox only when notified ([`NO_POLL`]) and waits out
/// a Redis pause rather than failing (its Redis timeout is longer than the pause).
fn notified_only(db: &TestDb, redis_server: &PrivateRedis, space: &KeyPrefix) -> Settings {
    let mut settings = test_settings(&db.url, &redis_server.url(), space.rules());
    settings.poll_interval = NO_POLL;
    settings.redis_timeout = PATIENCE;
    settings
}

/// Writes the keys of changes 101 to 104 (by authors 1 to 4): those that must go, and their
/// decoys, which are returned.
async fn set_change_keys(redis: &mut MultiplexedConnection, space: &KeyPrefix) -> Vec<String> {
    let mut all_decoys = Vec::new();
    for (id, author) in [(101, 1), (102, 2), (103, 3), (104, 4)] {
        set_keys(redis, &must_go(space, id, author)).await;
        set_keys(redis, &decoys(space, id, author)).await;
        all_decoys.extend(decoys(space, id, author));
    }
    all_decoys
}

/// Commits report `id` by `author` and waits until its keys are gone.
async fn commit_and_clear(
    db: &TestDb,
    redis: &mut MultiplexedConnection,
    space: &KeyPrefix,
    id: i64,
    author: i64,
) {
    commit_report(&db.client().await, id, author).await;
    assert_gone_within(redis, &must_go(space, id, author), PATIENCE).await;
}

/// After a fault: the keys of changes 102 and 103 (committed around it) go, and so do those of
/// 104 (committed after); the outbox empties and every decoy stays.
async fn assert_recovered(
    db: &TestDb,
    redis: &mut MultiplexedConnection,
    space: &KeyPrefix,
    decoys: &[String],
) {
    let recovered = [must_go(space, 102, 2), must_go(space, 103, 3)].concat();
    assert_gone_within(redis, &recovered, PATIENCE).await;
    commit_and_clear(db, redis, space, 104, 4).await;
    db.wait_for_empty_outbox(PATIENCE).await;
    assert_kept(redis, decoys).await;
}

/// Outbox rows locked right now, i.e. claimed by a worker and not yet acknowledged.
async fn claimed_rows(client: &Client) -> i64 {
    count(
        client,
        "SELECT count(*) FROM pgrowlocks('cache_invalidator.outbox')",
        &[],
    )
    .await
}

async fn wait_for_claim(db: &TestDb) {
    let client = db.client().await;
    assert!(
        wait_until(PATIENCE, || async { claimed_rows(&client).await > 0 }).await,
        "the worker never claimed the change"
    );
}

/// Terminates every backend of the daemon in the test's database (the LISTEN connection and the
/// claim connections); returns how many.
async fn terminate_daemon_backends(client: &Client) -> i64 {
    let sql = "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
               WHERE datname = current_database() AND application_name LIKE 'cache-invalidator%'";
    count(client, sql, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_postgres_backends_are_replaced_and_their_claims_swept_again() {
    let (space, db, redis_server, mut redis) = scenario("fault_kill_backend").await;
    let daemon = Daemon::start(notified_only(&db, &redis_server, &space));
    let client = db.client().await;
    let all_decoys = set_change_keys(&mut redis, &space).await;

    commit_and_clear(&db, &mut redis, &space, 101, 1).await;

    // The fault hits while 102 is claimed and its sweep waits for Redis.
    pause_redis(&mut redis, PAUSE_MS, "WRITE").await;
    commit_report(&client, 102, 2).await;
    wait_for_claim(&db).await;
    let killed = terminate_daemon_backends(&client).await;
    assert!(
        killed >= 2,
        "expected the LISTEN and a claim connection, killed {killed}"
    );
    commit_report(&client, 103, 3).await;

    assert_recovered(&db, &mut redis, &space, &all_decoys).await;
    daemon.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_loses_no_claimed_or_later_change() {
    let pg = PrivatePostgres::start();
    let (space, db, redis_server, mut redis) = scenario_on(&pg.url(), "fault_pg_restart").await;
    let daemon = Daemon::start(notified_only(&db, &redis_server, &space));
    let all_decoys = set_change_keys(&mut redis, &space).await;

    commit_and_clear(&db, &mut redis, &space, 101, 1).await;

    pause_redis(&mut redis, PAUSE_MS, "WRITE").await;
    commit_report(&db.client().await, 102, 2).await;
    wait_for_claim(&db).await;
    tokio::task::block_in_place(|| pg.restart());
    // Right after the restart: the worker may not be listening again yet.
    commit_report(&db.client().await, 103, 3).await;

    assert_recovered(&db, &mut redis, &space, &all_decoys).await;
    daemon.stop().await;
    db.drop().await;
}

/// A Redis user whose ACL refuses `INFO`: the worker cannot learn how the server's cursors order
/// the keyspace, so a change that arrives mid-pass must wait for a whole pass of its own. With a
/// keyspace that takes many `SCAN` steps and changes committed one after another, most windows
/// join a pass midway; every key they name must still go, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_acl_refuses_info_still_clears_every_change() {
    let (space, db, redis_server, mut admin) = scenario("fault_no_info").await;
    let () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "worker",
            "on",
            ">worker-secret",
            "~*",
            "&*",
            "+@all",
            "-info",
        ])
        .query_async(&mut admin)
        .await
        .expect("ACL SETUSER");
    let worker_url = format!(
        "redis://worker:worker-secret@127.0.0.1:{}/0",
        redis_server.port
    );
    let mut as_worker = patient_connection(&worker_url).await;
    let refused = redis::cmd("INFO")
        .arg("server")
        .query_async::<String>(&mut as_worker)
        .await;
    assert!(refused.is_err(), "the ACL should refuse INFO: {refused:?}");

    // About 30 SCAN steps per pass.
    let filler: Vec<String> = (0..30_000)
        .map(|i| space.key(&format!("fragment:{i}")))
        .collect();
    set_keys(&mut admin, &filler).await;
    let ids = 301..=340;
    let mut all_must_go = Vec::new();
    let mut all_decoys = Vec::new();
    for id in ids.clone() {
        let author = id % 7 + 1;
        set_keys(&mut admin, &must_go(&space, id, author)).await;
        set_keys(&mut admin, &decoys(&space, id, author)).await;
        all_must_go.extend(must_go(&space, id, author));
        all_decoys.extend(decoys(&space, id, author));
    }

    let daemon = Daemon::start(test_settings(&db.url, &worker_url, space.rules()));
    let client = db.client().await;
    for id in ids {
        commit_report(&client, id, id % 7 + 1).await;
    }
    assert_gone_within(&mut admin, &all_must_go, PATIENCE).await;
    db.wait_for_empty_outbox(PATIENCE).await;
    assert_kept(&mut admin, &all_decoys).await;
    assert_kept(&mut admin, &filler).await;
    daemon.stop().await;
    db.drop().await;
}

/// Waits until a restarted Redis answers (it refuses commands while loading its dump).
async fn reconnect_when_loaded(url: &str) -> MultiplexedConnection {
    let ready = wait_until(PATIENCE, || async {
        match redis::Client::open(url)
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
        {
            Ok(mut connection) => redis::cmd("EXISTS")
                .arg("probe")
                .query_async::<i64>(&mut connection)
                .await
                .is_ok(),
            Err(_) => false,
        }
    })
    .await;
    assert!(ready, "redis did not come back");
    patient_connection(url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_committed_while_redis_is_down_are_cleared_after_it_returns() {
    let (space, db, mut redis_server, mut redis) = scenario("fault_redis_restart").await;
    let daemon = Daemon::start(test_settings(&db.url, &redis_server.url(), space.rules()));
    let client = db.client().await;

    set_keys(&mut redis, &must_go(&space, 101, 1)).await;
    commit_and_clear(&db, &mut redis, &space, 101, 1).await;

    // The restarted server loads this snapshot, so the keys of the change committed during the
    // outage are there the moment it accepts connections: only a change kept in the outbox
    // through the outage can clear them.
    let outage = [must_go(&space, 102, 2), decoys(&space, 102, 2)].concat();
    set_keys(&mut redis, &outage).await;
    let () = redis::cmd("SAVE")
        .query_async(&mut redis)
        .await
        .expect("SAVE");
    redis_server.stop();
    commit_report(&client, 102, 2).await;
    redis_server.restart();
    let mut redis = reconnect_when_loaded(&redis_server.url()).await;

    set_keys(&mut redis, &must_go(&space, 103, 3)).await;
    set_keys(&mut redis, &decoys(&space, 103, 3)).await;
    commit_report(&client, 103, 3).await;
    let recovered = [must_go(&space, 102, 2), must_go(&space, 103, 3)].concat();
    assert_gone_within(&mut redis, &recovered, PATIENCE).await;
    db.wait_for_empty_outbox(PATIENCE).await;
    // The outage decoys prove the snapshot was loaded (and so were the keys that had to go).
    assert_kept(
        &mut redis,
        &[decoys(&space, 102, 2), decoys(&space, 103, 3)].concat(),
    )
    .await;
    daemon.stop().await;
    db.drop().await;
}

async fn connections_received(connection: &mut MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(connection)
        .await
        .expect("INFO stats");
    info.lines()
        .find_map(|line| line.strip_prefix("total_connections_received:"))
        .and_then(|value| value.trim().parse().ok())
        .expect("total_connections_received in INFO stats")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_stops_answering_times_out_and_the_batch_is_retried() {
    let (space, db, redis_server, mut redis) = scenario("fault_redis_pause").await;
    let mut settings = test_settings(&db.url, &redis_server.url(), space.rules());
    settings.redis_timeout = Duration::from_secs(1);
    let daemon = Daemon::start(settings);
    let client = db.client().await;
    let all_decoys = set_change_keys(&mut redis, &space).await;

    commit_and_clear(&db, &mut redis, &space, 101, 1).await;

    let before = connections_received(&mut redis).await;
    // Four times the command timeout: the worker's sweep must give up and try again.
    pause_redis(&mut redis, 4000, "ALL").await;
    commit_report(&client, 102, 2).await;
    commit_report(&client, 103, 3).await;
    // This connection's first command waits until the pause ends.
    assert_recovered(&db, &mut redis, &space, &all_decoys).await;
    // Only the worker connects besides this connection: a new connection is its retry.
    let after = connections_received(&mut redis).await;
    assert!(
        after > before,
        "the worker never reconnected: it waited out the pause instead of timing out"
    );
    daemon.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_redis_hangs_gives_the_claims_back_within_the_bound() {
    let (space, db, redis_server, mut redis) = scenario("fault_stop_hung").await;
    let mut settings = test_settings(&db.url, &redis_server.url(), space.rules());
    // The hung UNLINK would outlast the stop bound on its own.
    settings.redis_timeout = PATIENCE;
    let daemon = Daemon::start(settings.clone());
    let keys = must_go(&space, 101, 1);
    set_keys(&mut redis, &keys).await;
    set_keys(&mut redis, &decoys(&space, 101, 1)).await;
    // Redis hangs mid-batch, not while the worker connects: a first change cleared shows the
    // worker connected (in index mode, connecting writes the index's marker key, which a write
    // pause would hold too, and the worker would claim nothing to give back).
    set_keys(&mut redis, &must_go(&space, 100, 7)).await;
    commit_and_clear(&db, &mut redis, &space, 100, 7).await;

    pause_redis(&mut redis, PATIENCE.as_millis() as u64, "WRITE").await;
    commit_report(&db.client().await, 101, 1).await;
    wait_for_claim(&db).await;
    tokio::time::timeout(STOP_BOUND, daemon.stop())
        .await
        .expect("the daemon did not stop within the bound while Redis hung");
    // Not acknowledged (Redis never confirmed), not held: pending for the next worker.
    let client = db.client().await;
    assert_eq!(claimed_rows(&client).await, 0, "claims survived the stop");
    assert_eq!(
        db.outbox_rows().await,
        1,
        "the unconfirmed change left the outbox"
    );

    let () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut redis)
        .await
        .expect("CLIENT UNPAUSE");
    let daemon = Daemon::start(settings);
    assert_gone_within(&mut redis, &keys, PATIENCE).await;
    db.wait_for_empty_outbox(PATIENCE).await;
    assert_kept(&mut redis, &decoys(&space, 101, 1)).await;
    daemon.stop().await;
    db.drop().await;
}

/// A one-shot subcommand (`status`, `retry-dead-letters`) against `database_url`.
async fn cli(args: &[&str], database_url: &str) -> Output {
    run_cli(args, &[("DATABASE_URL", database_url)]).await
}

/// Reports `ids` inserted one transaction each (authors 1..=50), as an app under load would.
async fn burst(url: String, ids: std::ops::RangeInclusive<i64>) {
    let client = connect(&url).await;
    for id in ids {
        client
            .batch_execute(&format!(
                "INSERT INTO reports_report (id, author_id) VALUES ({id}, {})",
                id % 50 + 1
            ))
            .await
            .expect("burst insert");
    }
}

/// The keys of a 2,000-report burst: every report's key and its author's list must go; keys of
/// reports and authors the burst does not touch, and another cache VERSION, must stay.
struct BurstKeys {
    must_go: BTreeSet<String>,
    decoys: Vec<String>,
}

const BURST: i64 = 2000;
/// Long enough to see the claims and inject the fault; a SIGTERM waits it out to finish the batch.
const BURST_PAUSE_MS: u64 = 3000;

impl BurstKeys {
    /// [`BurstKeys::new`], written to `redis`.
    async fn written(space: &KeyPrefix, redis: &mut MultiplexedConnection) -> BurstKeys {
        let keys = BurstKeys::new(space);
        keys.set(redis).await;
        keys
    }

    fn new(space: &KeyPrefix) -> BurstKeys {
        let mut must_go: BTreeSet<String> = (1..=BURST)
            .map(|id| space.key(&format!("report:{id}:7:h")))
            .collect();
        must_go.extend((1..=50).map(|author| space.key(&format!("reportlist:reports:{author}:h"))));
        let mut decoys: Vec<String> = (BURST + 1..=BURST + 100)
            .map(|id| space.key(&format!("report:{id}:7:h")))
            .collect();
        decoys.extend((51..=60).map(|author| space.key(&format!("reportlist:reports:{author}:h"))));
        decoys.extend((1..=100).map(|id| space.key_v2(&format!("report:{id}:7:h"))));
        BurstKeys { must_go, decoys }
    }

    /// The keys of reports 1..=`rows` by `authors` authors: every `step`th report's key (and the
    /// last one's) and every author's list must go; the 50 reports after the range, the author
    /// after the last, and the first `other_version` reports under another cache VERSION stay.
    fn sampled(
        space: &KeyPrefix,
        rows: i64,
        step: usize,
        authors: i64,
        other_version: i64,
    ) -> BurstKeys {
        let mut must_go: BTreeSet<String> = (1..=rows)
            .step_by(step)
            .map(|id| space.key(&format!("report:{id}:7:h")))
            .collect();
        must_go.insert(space.key(&format!("report:{rows}:7:h")));
        must_go.extend(
            (1..=authors).map(|author| space.key(&format!("reportlist:reports:{author}:h"))),
        );
        let mut decoys: Vec<String> = (rows + 1..=rows + 50)
            .map(|id| space.key(&format!("report:{id}:7:h")))
            .collect();
        decoys.extend((1..=other_version).map(|id| space.key_v2(&format!("report:{id}:7:h"))));
        decoys.push(space.key(&format!("reportlist:reports:{}:h", authors + 1)));
        BurstKeys { must_go, decoys }
    }

    async fn set(&self, redis: &mut MultiplexedConnection) {
        let keys: Vec<String> = self.must_go.iter().cloned().collect();
        set_keys(redis, &keys).await;
        set_keys(redis, &self.decoys).await;
    }

    /// Waits until no must-go key is left, then checks every decoy is.
    async fn assert_cleared(&self, redis: &mut MultiplexedConnection, space: &KeyPrefix) {
        let prefix = format!("{}:", space.namespace);
        let must_go = &self.must_go;
        let cleared = wait_until(PATIENCE, || {
            let mut connection = redis.clone();
            let prefix = prefix.clone();
            async move {
                keys_with_prefix(&mut connection, &prefix)
                    .await
                    .is_disjoint(must_go)
            }
        })
        .await;
        if !cleared {
            let left: Vec<String> = keys_with_prefix(redis, &prefix)
                .await
                .intersection(must_go)
                .take(10)
                .cloned()
                .collect();
            panic!("keys still present after {PATIENCE:?}, e.g. {left:?}");
        }
        assert_kept(redis, &self.decoys).await;
    }
}

/// `cache-invalidator run` as a child process against the test's database and Redis, polling as
/// often as an in-process daemon of the tests.
fn fast_worker(db: &TestDb, redis_server: &PrivateRedis, rules: &RulesFile) -> ChildDaemon {
    ChildDaemon::worker(&db.url, &redis_server.url(), &rules.path, &FAST_POLL, false)
}

/// A burst caught in the middle: its keys written, a worker started with `rules` and holding
/// claims, and the task committing the first half.
struct MidBurst {
    keys: BurstKeys,
    rules: RulesFile,
    worker: ChildDaemon,
    first_half: tokio::task::JoinHandle<()>,
}

/// Writes the burst's keys, starts a worker and a burst of the first half, and returns once the
/// worker holds claims in the middle of it. A short `CLIENT PAUSE WRITE` holds the first sweeps'
/// UNLINKs, so the claims are certainly there to be seen (and to be hit by the fault).
async fn mid_burst(
    db: &TestDb,
    redis_server: &PrivateRedis,
    space: &KeyPrefix,
    redis: &mut MultiplexedConnection,
) -> MidBurst {
    let keys = BurstKeys::written(space, redis).await;
    let rules = RulesFile::default_for(space, "");
    let worker = fast_worker(db, redis_server, &rules);
    // The pause must find the worker running: its start writes a marker key (index mode), which
    // the pause would hold too, and the burst's first half could then be committed and cleared
    // in one go right after the pause, before any claim is seen. A report far from the burst's
    // and its decoys' shows the worker clearing.
    let warm_up_report = 10 * BURST;
    let warm_up = vec![space.key(&format!("report:{warm_up_report}:7:h"))];
    set_keys(redis, &warm_up).await;
    db.client()
        .await
        .batch_execute(&format!(
            "SELECT cache_invalidator.invalidate_report({warm_up_report})"
        ))
        .await
        .expect("warm-up invalidation");
    assert_gone_within(redis, &warm_up, PATIENCE).await;
    pause_redis(redis, BURST_PAUSE_MS, "WRITE").await;
    db.client()
        .await
        .batch_execute("INSERT INTO auth_user (id) SELECT generate_series(1, 50)")
        .await
        .expect("users");
    let first_half = tokio::spawn(burst(db.url.clone(), 1..=BURST / 2));
    let client = db.client().await;
    assert!(
        wait_until(PATIENCE, || async { claimed_rows(&client).await > 0 }).await,
        "the worker never claimed from the burst"
    );
    MidBurst {
        keys,
        rules,
        worker,
        first_half,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_with_sigkill_mid_burst_loses_nothing_after_a_restart() {
    let (space, db, redis_server, mut redis) = scenario("fault_sigkill").await;
    let mut mid = mid_burst(&db, &redis_server, &space, &mut redis).await;
    mid.worker.kill().await;
    mid.first_half.await.expect("first half");
    // The second half lands while no worker runs.
    burst(db.url.clone(), BURST / 2 + 1..=BURST).await;

    let _restarted = fast_worker(&db, &redis_server, &mid.rules);
    mid.keys.assert_cleared(&mut redis, &space).await;
    db.wait_for_empty_outbox(PATIENCE).await;
    db.drop().await;
}

async fn workers_listening(db: &TestDb) -> i64 {
    let workers = cache_invalidator::ops::connected_workers(&db.client().await)
        .await
        .expect("list the workers' LISTEN sessions");
    workers.len() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_burst_exits_zero_in_time_and_a_restart_finishes_the_rest() {
    let (space, db, redis_server, mut redis) = scenario("fault_sigterm").await;
    let mut mid = mid_burst(&db, &redis_server, &space, &mut redis).await;
    let status = mid.worker.stop_within(STOP_BOUND).await;
    assert!(
        status.success(),
        "exit after SIGTERM: {status}; log:\n{}",
        mid.worker.log_text()
    );
    mid.first_half.await.expect("first half");
    burst(db.url.clone(), BURST / 2 + 1..=BURST).await;

    // Nothing runs: `status` says so, and fails as a health probe.
    let report = cli(&["status", "--max-age", "0s"], &db.url).await;
    assert_eq!(report.status.code(), Some(1), "{}", stdout(&report));
    let text = stdout(&report);
    assert!(text.contains("workers listening:  0"), "{text}");
    assert!(!text.contains("outbox backlog:     0 row(s)"), "{text}");

    let restarted = fast_worker(&db, &redis_server, &mid.rules);
    mid.keys.assert_cleared(&mut redis, &space).await;
    db.wait_for_empty_outbox(PATIENCE).await;
    assert!(
        wait_until(PATIENCE, || async { workers_listening(&db).await == 1 }).await,
        "the restarted worker never listened"
    );
    let report = cli(&["status", "--max-age", "60s"], &db.url).await;
    let text = stdout(&report);
    assert!(report.status.success(), "{text}");
    assert!(text.contains("outbox backlog:     0 row(s)"), "{text}");
    assert!(text.contains("workers listening:  1"), "{text}");
    drop(restarted);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_outbox_rows_are_dead_lettered_and_retried_after_the_rules_are_fixed() {
    let (space, db) = space_with_reports("fault_garbage").await;
    let mut redis = redis_connection(&shared_redis_url()).await;
    let must_go = space.keys(&[
        "report:12:1:h",
        "report:15:2:h",
        "reportlist:reports:1:h",
        "reportlist:reports:2:h",
    ]);
    let archive = space.keys(&["archive:5:h"]);
    let decoys = vec![
        space.key("report:13:1:h"),
        space.key("report:14:1:h"),
        space.key("report:5:1:h"),
        space.key("archive:50:h"),
        space.key_v2("report:12:1:h"),
    ];
    set_keys(
        &mut redis,
        &[must_go.clone(), archive.clone(), decoys.clone()].concat(),
    )
    .await;
    let daemon = Daemon::start(test_settings(&db.url, &shared_redis_url(), space.rules()));

    // Good changes around garbage, in one transaction: they are claimed together.
    db.client()
        .await
        .batch_execute(
            r#"BEGIN;
            INSERT INTO auth_user (id) VALUES (1), (2);
            INSERT INTO reports_report (id, author_id) VALUES (12, 1);
            INSERT INTO cache_invalidator.outbox (created_at, table_name, op, rows) VALUES
                ('2026-01-02 03:04:05.123456+00', 'reports_archive', 'INSERT', '[{"id": 5}]'),
                (clock_timestamp(), 'reports_report', 'MERGE', '[{"id": 13, "author_id": 1}]'),
                (clock_timestamp(), 'reports_report', 'INSERT', '{"id": 14, "author_id": 1}'),
                (clock_timestamp(), 'reports_report', 'INSERT', '[{"id": {"nested": 5}, "author_id": 1}]');
            INSERT INTO reports_report (id, author_id) VALUES (15, 2);
            COMMIT;"#,
        )
        .await
        .expect("commit garbage");

    assert_gone_within(&mut redis, &must_go, PATIENCE).await;
    db.wait_for_empty_outbox(PATIENCE).await;
    let sql = "SELECT op, error FROM cache_invalidator.dead_letters ORDER BY outbox_id";
    let errors: Vec<(String, String)> = pairs(&db.client().await, sql).await;
    let expected = [
        "no rule for table \"reports_archive\"",
        "unknown operation \"MERGE\"",
        "must be a JSON array",
        "cannot be put in a cache key",
    ];
    assert_eq!(errors.len(), expected.len(), "{errors:?}");
    for ((_, error), fragment) in errors.iter().zip(expected) {
        assert!(error.contains(fragment), "{error:?} lacks {fragment:?}");
    }
    assert_kept(&mut redis, &[archive.clone(), decoys.clone()].concat()).await;
    // A dead letter keeps the outbox row as it was: when the change was captured, and its rows.
    let sql = "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), \
               rows::text FROM cache_invalidator.dead_letters WHERE table_name = 'reports_archive'";
    let kept: Vec<(String, String)> = pairs(&db.client().await, sql).await;
    assert_eq!(
        kept,
        vec![(
            "2026-01-02 03:04:05.123456".to_owned(),
            r#"[{"id": 5}]"#.to_owned()
        )]
    );

    let report = cli(&["status"], &db.url).await;
    let text = stdout(&report);
    assert!(report.status.success(), "{text}");
    assert!(text.contains("dead letters:       4"), "{text}");
    assert!(text.contains("reports_archive"), "{text}");
    assert!(text.contains("unknown operation"), "{text}");

    // The rules gain the missing table; a retry clears its keys and the rest fail again.
    daemon.stop().await;
    let fixed = RulesFile::default_for(
        &space,
        "[[rules]]\ntable = \"reports_archive\"\nkeys = [\"archive:{id}:*\"]\n",
    );
    let mut settings = test_settings(&db.url, &shared_redis_url(), space.rules());
    settings.rules = cache_invalidator::rules::RuleSet::load(&fixed.path).expect("fixed rules");
    let daemon = Daemon::start(settings);
    let retried = cli(&["retry-dead-letters"], &db.url).await;
    assert!(retried.status.success(), "{}", stdout(&retried));
    assert!(
        stdout(&retried).contains("4 dead letter(s)"),
        "{}",
        stdout(&retried)
    );
    assert_gone_within(&mut redis, &archive, PATIENCE).await;
    let settled = wait_until(PATIENCE, || async {
        db.dead_letters().await == 3 && db.outbox_rows().await == 0
    })
    .await;
    assert!(
        settled,
        "{} dead letters after the retry, expected 3",
        db.dead_letters().await
    );
    assert_kept(&mut redis, &decoys).await;
    daemon.stop().await;
    db.drop().await;
}

/// Authors of the reports in the bounded-memory tests.
const AUTHORS: i64 = 100;
/// A worker's peak memory in the bounded-memory tests: generous for a debug build; the figure is
/// printed for the record.
const PEAK_RSS_LIMIT_KB: u64 = 100 * 1024;

/// Prints the worker's peak resident memory after `what` and checks it is under
/// [`PEAK_RSS_LIMIT_KB`].
fn assert_bounded_memory(worker: &ChildDaemon, what: &str) {
    let peak = worker.peak_rss_kb();
    println!("peak RSS (VmHWM) of the worker after {what}: {peak} kB");
    assert!(
        peak < PEAK_RSS_LIMIT_KB,
        "worker peak RSS {peak} kB above {PEAK_RSS_LIMIT_KB} kB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_changing_200000_rows_is_processed_in_bounded_memory() {
    const ROWS: i64 = 200_000;
    /// Every 97th report's key is checked: enough to catch a lost batch anywhere in the range.
    const SAMPLE_STEP: usize = 97;
    let (space, db, redis_server, mut redis) = scenario("fault_bulk").await;
    let keys = BurstKeys::sampled(&space, ROWS, SAMPLE_STEP, AUTHORS, 50);
    keys.set(&mut redis).await;
    let rules = RulesFile::default_for(&space, "");
    let worker = fast_worker(&db, &redis_server, &rules);

    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO auth_user (id) SELECT generate_series(1, {AUTHORS});
             INSERT INTO reports_report (id, author_id)
                 SELECT g, g % {AUTHORS} + 1 FROM generate_series(1, {ROWS}) g;"
        ))
        .await
        .expect("bulk insert");

    keys.assert_cleared(&mut redis, &space).await;
    db.wait_for_empty_outbox(PATIENCE).await;
    assert_bounded_memory(&worker, &format!("{ROWS} changed rows"));
    drop(worker);
    db.drop().await;
}

/// Bounded memory: a million changes pile up in the outbox while Redis is down; once it is
/// back the worker drains them in batches, and its peak memory does not grow with the backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_row_backlog_built_while_redis_was_down_drains_in_bounded_memory() {
    const BACKLOG: i64 = 1_000_000;
    /// Every 997th report's key is checked, plus the last: a lost batch anywhere shows.
    const SAMPLE_STEP: usize = 997;
    /// Draining a million rows takes about a minute in a debug build on two busy cores.
    const DRAIN_PATIENCE: Duration = Duration::from_secs(400);
    let (space, db, mut redis_server, mut redis) = scenario("fault_backlog").await;
    let keys = BurstKeys::sampled(&space, BACKLOG, SAMPLE_STEP, AUTHORS, 0);
    keys.set(&mut redis).await;
    // The restarted server loads this snapshot: the keys are there the moment it answers.
    let () = redis::cmd("SAVE")
        .query_async(&mut redis)
        .await
        .expect("SAVE");
    redis_server.stop();

    let rules = RulesFile::default_for(&space, "");
    let worker = fast_worker(&db, &redis_server, &rules);
    // A million single-row changes, as the triggers record them, committed during the outage.
    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO cache_invalidator.outbox (table_name, op, rows)
             SELECT 'reports_report', 'UPDATE',
                    jsonb_build_array(jsonb_build_object('id', g, 'author_id', g % {AUTHORS} + 1))
             FROM generate_series(1, {BACKLOG}) g;
             NOTIFY cache_invalidator;"
        ))
        .await
        .expect("backlog");
    assert_eq!(
        db.outbox_rows().await,
        BACKLOG,
        "nothing drains without Redis"
    );

    redis_server.restart();
    let mut redis = reconnect_when_loaded(&redis_server.url()).await;
    let drained = wait_until(DRAIN_PATIENCE, || async { db.outbox_rows().await == 0 }).await;
    assert!(drained, "{} outbox rows left", db.outbox_rows().await);
    keys.assert_cleared(&mut redis, &space).await;
    assert_bounded_memory(&worker, &format!("a {BACKLOG}-row backlog"));
    drop(worker);
    db.drop().await;
}
