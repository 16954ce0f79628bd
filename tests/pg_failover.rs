//! Postgres high availability: the daemon follows a promoted standby, and gives up a connection
//! whose server stops answering without closing it.
//!
//! The failover scenarios run a private primary with a synchronous streaming standby
//! (`pg_basebackup -R`, `synchronous_standby_names = '*'`), the daemon and an app writer both on a
//! DSN naming the two hosts with `target_session_attrs=read-write`, the app committing about 100
//! single-row UPDATEs a second. The primary is stopped (`pg_ctl stop -m immediate`) and the
//! standby promoted, at once or 20 s later (about as long as Patroni or RDS take to decide). Every
//! change the app saw committed must be cleared from Redis, the first change committed on the
//! new primary within [`RECOVERY_BOUND`] of the promotion, the outbox drained and `status` happy.
//! The recovery figures are printed (`cargo test --test pg_failover -- --nocapture`).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use redis::aio::MultiplexedConnection;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

/// How long after the promotion the first change committed on the new primary may take to be
/// cleared (the aim is 2 s).
const RECOVERY_BOUND: Duration = Duration::from_secs(10);
/// The app's pace: one single-row UPDATE per tick, about 100 a second.
const APP_TICK: Duration = Duration::from_millis(10);
/// Reports seeded: more than the app updates in any scenario, each updated once.
const REPORTS: i64 = 8_000;
/// How long the app writes before the primary is stopped, and after the recovery was measured.
const STEADY: Duration = Duration::from_secs(3);
/// How long a query of the app may wait before it counts as failed (the primary is gone).
const APP_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// The cache key of report `id` that its UPDATE must clear.
fn report_key(space: &KeyPrefix, id: i64) -> String {
    space.key(&format!("report:{id}:7:h"))
}

/// The UPDATEs the app saw committed: the report's id and when the commit returned.
type Acked = Arc<Mutex<Vec<(i64, Instant)>>>;

/// The app: fills report `id`'s cache key, then commits a one-row UPDATE of it, report after
/// report, on the two-host DSN, reconnecting (every tick) while no primary answers. A change
/// counts as acknowledged only when its commit returned.
async fn app_writer(dsn: String, space: Arc<KeyPrefix>, acked: Acked, stop: CancellationToken) {
    let mut redis = patient_connection(&shared_redis_url()).await;
    let mut client: Option<tokio_postgres::Client> = None;
    let mut ticks = tokio::time::interval(APP_TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut id = 1;
    while !stop.is_cancelled() && id <= REPORTS {
        ticks.tick().await;
        let Some(app) = client.as_ref().filter(|c| !c.is_closed()) else {
            let connected =
                tokio::time::timeout(APP_QUERY_TIMEOUT, tokio_postgres::connect(&dsn, NoTls));
            // No primary yet: try again next tick, as an app's connection pool would.
            if let Ok(Ok((c, connection))) = connected.await {
                tokio::spawn(connection);
                client = Some(c);
            }
            continue;
        };
        set_keys(&mut redis, &[report_key(&space, id)]).await;
        let row = id as i32;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&row];
        let update = app.execute(
            "UPDATE reports_report SET title = 'v2' WHERE id = $1",
            &params,
        );
        match tokio::time::timeout(APP_QUERY_TIMEOUT, update).await {
            Ok(Ok(1)) => acked.lock().expect("acked").push((id, Instant::now())),
            Ok(Ok(rows)) => panic!("report {id}: {rows} rows updated"),
            // The primary went away mid-statement: not acknowledged, whether it committed or not.
            _ => client = None,
        }
        id += 1;
    }
}

/// How many of `keys` are still in Redis.
async fn left_in_redis(redis: &mut MultiplexedConnection, keys: &[String]) -> i64 {
    let mut left = 0;
    for chunk in keys.chunks(500) {
        let found: i64 = redis::cmd("EXISTS")
            .arg(chunk)
            .query_async(redis)
            .await
            .expect("EXISTS");
        left += found;
    }
    left
}

/// Outbox rows on the server `url` points at.
async fn outbox_rows(url: &str) -> i64 {
    count(
        &connect(url).await,
        "SELECT count(*) FROM cache_invalidator.outbox",
        &[],
    )
    .await
}

/// How the daemon and the app name the two servers.
#[derive(Clone, Copy)]
enum Dsn {
    KeyValue,
    Url,
}

fn two_host_dsn(form: Dsn, primary: u16, standby: u16, dbname: &str) -> String {
    match form {
        Dsn::KeyValue => format!(
            "host=127.0.0.1,127.0.0.1 port={primary},{standby} user=postgres dbname={dbname} \
             target_session_attrs=read-write"
        ),
        Dsn::Url => format!(
            "postgres://postgres@127.0.0.1:{primary},127.0.0.1:{standby}/{dbname}\
             ?target_session_attrs=read-write"
        ),
    }
}

/// The failover scenario: the primary stopped under load, the standby promoted `promote_after`
/// later; see the module's header for what must hold.
async fn failover(tag: &str, form: Dsn, promote_after: Duration) {
    let primary = PrivatePostgres::start();
    let standby = primary.start_synchronous_standby().await;
    let space = Arc::new(KeyPrefix::new(tag));
    let db = TestDb::with_reports_on(&primary.url(), tag, &space.rules()).await;
    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO auth_user (id) VALUES (7);
             INSERT INTO reports_report (id, author_id) SELECT g, 7 FROM generate_series(1, {REPORTS}) g;"
        ))
        .await
        .expect("seed reports");
    let dsn = two_host_dsn(form, primary.port, standby.port, &db.name);
    let redis_url = shared_redis_url();
    let daemon = Daemon::start(test_settings(&dsn, &redis_url, space.rules()));
    db.wait_for_empty_outbox(PATIENCE).await;

    let acked: Acked = Arc::default();
    let stop_app = CancellationToken::new();
    let app = tokio::spawn(app_writer(
        dsn.clone(),
        space.clone(),
        acked.clone(),
        stop_app.clone(),
    ));
    tokio::time::sleep(STEADY).await;
    tokio::task::block_in_place(|| primary.stop_immediately());
    let stopped_at = Instant::now();
    let acked_before_stop = acked.lock().expect("acked").len();
    assert!(
        acked_before_stop > 0,
        "the app committed nothing before the stop"
    );
    tokio::time::sleep(promote_after).await;
    tokio::task::block_in_place(|| standby.promote());
    let promoted_at = Instant::now();
    let recovery = first_change_cleared(&space, &acked, promoted_at).await;
    println!(
        "pg failover ({tag}): primary stopped, standby promoted {:.1} s later; {recovery}",
        (promoted_at - stopped_at).as_secs_f64(),
    );

    tokio::time::sleep(STEADY).await;
    stop_app.cancel();
    app.await.expect("the app writer");
    let acked = acked.lock().expect("acked").clone();
    assert!(
        acked.len() > acked_before_stop,
        "the app committed nothing after the promotion"
    );
    assert_all_cleared(&space, &acked).await;
    let new_primary = with_database(&standby.url(), &db.name);
    assert!(
        wait_until(PATIENCE, || async { outbox_rows(&new_primary).await == 0 }).await,
        "{} rows left in the new primary's outbox",
        outbox_rows(&new_primary).await
    );
    let env = [("DATABASE_URL", dsn.as_str()), ("REDIS_URL", &redis_url)];
    let status = run_cli(&["status"], &env).await;
    let said = format!("{}{}", stdout(&status), stderr(&status));
    assert!(status.status.success(), "status: {said}");
    println!(
        "pg failover ({tag}): {} changes acknowledged to the app ({acked_before_stop} before the \
         stop), every key cleared, outbox drained, status exit 0",
        acked.len()
    );
    daemon.stop().await;
}

/// Waits for the first change the app commits on the new primary and for its key to go; asserts
/// that it went within [`RECOVERY_BOUND`] of the promotion, and says how long each took.
async fn first_change_cleared(space: &KeyPrefix, acked: &Acked, promoted_at: Instant) -> String {
    let mut redis = patient_connection(&shared_redis_url()).await;
    let first_after = || {
        let acked = acked.lock().expect("acked");
        acked.iter().find(|(_, at)| *at > promoted_at).copied()
    };
    assert!(
        wait_until(PATIENCE, || async { first_after().is_some() }).await,
        "the app never committed on the new primary"
    );
    let (first_id, committed_at) = first_after().expect("just seen");
    let first_key = report_key(space, first_id);
    let mut cleared = false;
    let deadline = Instant::now() + PATIENCE;
    // Polled more often than `wait_until` does: this is the figure operators are quoted.
    while !cleared && Instant::now() < deadline {
        cleared = !exists(&mut redis, &first_key).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cleared_at = Instant::now();
    assert!(
        cleared,
        "report {first_id}'s key, committed on the new primary, was never cleared"
    );
    let recovery = cleared_at - promoted_at;
    assert!(recovery <= RECOVERY_BOUND, "recovery took {recovery:?}");
    format!(
        "first change on the new primary committed {:.2} s after the promotion, cleared {:.2} s \
         after the promotion ({:.2} s after its commit)",
        (committed_at - promoted_at).as_secs_f64(),
        recovery.as_secs_f64(),
        (cleared_at - committed_at).as_secs_f64(),
    )
}

/// Every change the app saw committed has its key cleared (within [`PATIENCE`]).
async fn assert_all_cleared(space: &KeyPrefix, acked: &[(i64, Instant)]) {
    let mut redis = patient_connection(&shared_redis_url()).await;
    let keys: Vec<String> = acked.iter().map(|(id, _)| report_key(space, *id)).collect();
    let all_cleared = wait_until(PATIENCE, || {
        let mut redis = redis.clone();
        let keys = keys.clone();
        async move { left_in_redis(&mut redis, &keys).await == 0 }
    })
    .await;
    assert!(
        all_cleared,
        "{} of the {} changes the app saw committed still have their key",
        left_in_redis(&mut redis, &keys).await,
        keys.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_promoted_20_s_after_the_primary_stopped_is_followed_within_seconds() {
    failover("pg_failover_late", Dsn::KeyValue, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_promoted_at_once_is_followed() {
    failover("pg_failover_at_once", Dsn::KeyValue, Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_url_form_with_two_hosts_follows_a_promotion() {
    failover("pg_failover_url", Dsn::Url, Duration::ZERO).await;
}

/// Sends `signal` (`STOP`, `CONT`) to each of `pids`.
fn signal_all(pids: &[i32], signal: &str) {
    for pid in pids {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }
}

/// Backends frozen with SIGSTOP, thawed when dropped (even when the test fails), so that the
/// cluster can be stopped.
struct Frozen(Vec<i32>);

impl Drop for Frozen {
    fn drop(&mut self) {
        signal_all(&self.0, "CONT");
    }
}

/// Pids of the daemon's sessions in the test's database whose `application_name` is `like`.
async fn daemon_backends(client: &tokio_postgres::Client, like: &str) -> Vec<i32> {
    client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name LIKE $1",
            &[&like],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_whose_server_froze_are_given_up_and_replaced() {
    let pg = PrivatePostgres::start();
    let space = KeyPrefix::new("pg_frozen_backends");
    let db = TestDb::with_reports_on(&pg.url(), "pg_frozen_backends", &space.rules()).await;
    let daemon = Daemon::start(test_settings(&db.url, &shared_redis_url(), space.rules()));
    let mut redis = patient_connection(&shared_redis_url()).await;
    let client = db.client().await;
    let keys = |id: i64| vec![space.key(&format!("report:{id}:1:h"))];
    for id in [101, 102, 103] {
        set_keys(&mut redis, &keys(id)).await;
    }
    commit_report(&client, 101, 1).await;
    assert_gone_within(&mut redis, &keys(101), PATIENCE).await;
    db.wait_for_workers(1, PATIENCE).await;

    // Every session of the daemon stops answering; their sockets stay open and the kernel keeps
    // acknowledging, so only the daemon's own deadlines can notice.
    let frozen = Frozen(daemon_backends(&client, "cache-invalidator%").await);
    assert!(
        frozen.0.len() >= 2,
        "the LISTEN and a claim connection: {:?}",
        frozen.0
    );
    signal_all(&frozen.0, "STOP");
    let frozen_at = Instant::now();
    commit_report(&client, 102, 1).await;
    assert_gone_within(&mut redis, &keys(102), PATIENCE).await;
    let cleared_after = frozen_at.elapsed();
    // A new LISTEN session too, while the old one is still frozen.
    // The LISTEN session's `application_name`, which `status` counts workers by.
    let like = "cache-invalidator worker%";
    let replaced = wait_until(PATIENCE, || async {
        let listening = daemon_backends(&client, like).await;
        listening.iter().any(|pid| !frozen.0.contains(pid))
    })
    .await;
    assert!(replaced, "the frozen LISTEN session was not replaced");
    println!(
        "frozen postgres sessions: a change committed after the freeze cleared {:.1} s later",
        cleared_after.as_secs_f64()
    );

    drop(frozen);
    commit_report(&client, 103, 1).await;
    assert_gone_within(&mut redis, &keys(103), PATIENCE).await;
    db.wait_for_empty_outbox(PATIENCE).await;
    daemon.stop().await;
}
