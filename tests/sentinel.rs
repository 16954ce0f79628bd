//! Redis behind Sentinel, and Redis connections that stop answering without closing.
//!
//! The failover: a private master, its replica and three sentinels (quorum 2, the master called
//! down after 1 s); the daemon on `redis+sentinel://`; ~100 committed changes a second, each the
//! UPDATE of its own report whose key was cached beforehand; the master `kill -9`ed midway. The
//! test watches the keys on whichever server the sentinels call the master and asserts, from what
//! it saw there: every change's key gone at most 10 s after its commit, the first key cleared on the
//! promoted replica at most 5 s after the promotion, no key of a change the daemon had acknowledged
//! (its outbox row deleted) before the kill present on the new master, the outbox drained. It
//! prints the figures.
//!
//! The freeze: a private server stopped with SIGSTOP while a change waits, so the connections stay
//! open and nothing answers; the daemon must give them up within `--redis-timeout`, acknowledge
//! nothing while frozen, and clear the change once the server runs again.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use redis::aio::MultiplexedConnection;
use tokio_util::sync::CancellationToken;

const SERVICE: &str = "cache";
/// The sentinels call the master down after this long without an answer.
const DOWN_AFTER_MS: u32 = 1000;
/// The load: one change every 10 ms.
const CHANGE_EVERY: Duration = Duration::from_millis(10);
/// Changes committed before the kill, and after it.
const BEFORE_KILL: u32 = 400;
const AFTER_KILL: u32 = 800;
/// The goals: every change's keys gone this soon after its commit, and the first change cleared
/// on the new master this soon after the promotion.
const CLEARED_WITHIN: Duration = Duration::from_secs(10);
const RECOVERED_WITHIN: Duration = Duration::from_secs(5);
/// How often the test looks at the keys (and asks the sentinels which server is the master).
const LOOK_EVERY: Duration = Duration::from_millis(50);
/// The daemon's `--redis-timeout` in the freeze test.
const FROZEN_TIMEOUT: Duration = Duration::from_secs(1);
/// Beyond the timeouts, for the daemon to book the failure and the test to see it in `/metrics`
/// on a loaded machine.
const FROZEN_SLACK: Duration = Duration::from_secs(1);

/// A master, its replica and three sentinels watching them.
struct SentinelSetup {
    master: PrivateRedis,
    _replica: PrivateRedis,
    sentinels: Vec<PrivateSentinel>,
}

impl SentinelSetup {
    async fn start() -> SentinelSetup {
        let master = PrivateRedis::start();
        let replica = PrivateRedis::replica_of(master.port);
        let sentinels: Vec<PrivateSentinel> = (0..3)
            .map(|_| PrivateSentinel::start(master.port, SERVICE, 2, DOWN_AFTER_MS))
            .collect();
        let setup = SentinelSetup {
            master,
            _replica: replica,
            sentinels,
        };
        // A failover needs the replica known and a majority of sentinels aware of each other.
        let mut sentinel = redis_connection(&setup.sentinel_url(0)).await;
        let ready = wait_until(LONG_PATIENCE, || {
            let mut sentinel = sentinel.clone();
            async move {
                let replicas: Vec<redis::Value> = sentinel_command(&mut sentinel, "REPLICAS").await;
                let others: Vec<redis::Value> = sentinel_command(&mut sentinel, "SENTINELS").await;
                replicas.len() == 1 && others.len() == 2
            }
        })
        .await;
        assert!(ready, "the sentinels never saw the replica and each other");
        let _: () = redis::cmd("PING")
            .query_async(&mut sentinel)
            .await
            .expect("ping");
        setup
    }

    fn sentinel_url(&self, index: usize) -> String {
        format!("redis://{}/0", self.sentinels[index].address())
    }

    fn daemon_url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(PrivateSentinel::address)
            .collect();
        format!("redis+sentinel://{}/{SERVICE}", hosts.join(","))
    }
}

async fn sentinel_command(sentinel: &mut MultiplexedConnection, what: &str) -> Vec<redis::Value> {
    redis::cmd("SENTINEL")
        .arg(what)
        .arg(SERVICE)
        .query_async(sentinel)
        .await
        .unwrap_or_default()
}

/// The master the sentinel on `sentinel` names now, as `host:port`.
async fn master_address(sentinel: &mut MultiplexedConnection) -> Option<String> {
    let address: Option<(String, String)> = redis::cmd("SENTINEL")
        .arg("GET-MASTER-ADDR-BY-NAME")
        .arg(SERVICE)
        .query_async(sentinel)
        .await
        .ok()?;
    address.map(|(host, port)| format!("{host}:{port}"))
}

/// What the test saw while the load ran.
#[derive(Default)]
struct Seen {
    /// Report id → (outbox id, commit time).
    committed: BTreeMap<u32, (i64, Instant)>,
    /// Report id → (time its key was first seen gone, on which master).
    cleared: BTreeMap<u32, (Instant, String)>,
    /// Keys seen again after they were seen gone: (report id, master).
    back: Vec<(u32, String)>,
    /// When the sentinels first named another master.
    promoted: Option<(Instant, String)>,
}

fn report_key(space: &KeyPrefix, id: u32) -> String {
    space.key(&format!("report:{id}:7:h"))
}

/// Commits the UPDATE of reports `ids`, one every [`CHANGE_EVERY`], recording each one's outbox
/// id (the only writer: the newest row is its own) and commit time.
async fn commit_changes(db: &TestDb, ids: std::ops::RangeInclusive<u32>, seen: &Mutex<Seen>) {
    let mut client = db.client().await;
    let mut next = tokio::time::Instant::now();
    for id in ids {
        tokio::time::sleep_until(next).await;
        next += CHANGE_EVERY;
        let transaction = client.transaction().await.expect("begin");
        transaction
            .execute(
                "UPDATE reports_report SET title = 'changed' WHERE id = $1",
                &[&(id as i32)],
            )
            .await
            .expect("update");
        let row = transaction
            .query_one("SELECT max(id) FROM cache_invalidator.outbox", &[])
            .await
            .expect("outbox id");
        transaction.commit().await.expect("commit");
        let outbox_id: i64 = row.get(0);
        seen.lock()
            .expect("seen")
            .committed
            .insert(id, (outbox_id, Instant::now()));
    }
}

/// Looks at every committed change's key on the master the sentinels name, every
/// [`LOOK_EVERY`], until `stop`.
async fn watch_keys(
    sentinel_url: String,
    space: Arc<KeyPrefix>,
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
) {
    let mut sentinel = redis_connection(&sentinel_url).await;
    let first = master_address(&mut sentinel).await.expect("a master");
    let mut connected: Option<(String, MultiplexedConnection)> = None;
    while !stop.is_cancelled() {
        tokio::time::sleep(LOOK_EVERY).await;
        let Some(master) = master_address(&mut sentinel).await else {
            continue;
        };
        if master != first {
            let mut seen = seen.lock().expect("seen");
            seen.promoted
                .get_or_insert((Instant::now(), master.clone()));
        }
        if connected.as_ref().is_none_or(|(at, _)| *at != master) {
            connected = quick_connection(&master).await.map(|c| (master.clone(), c));
        }
        let Some((_, connection)) = connected.as_mut() else {
            continue;
        };
        let ids: Vec<u32> = seen
            .lock()
            .expect("seen")
            .committed
            .keys()
            .copied()
            .collect();
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.exists(report_key(&space, *id));
        }
        let Ok(present) = pipe.query_async::<Vec<bool>>(connection).await else {
            connected = None;
            continue;
        };
        let now = Instant::now();
        let mut seen = seen.lock().expect("seen");
        for (id, present) in ids.into_iter().zip(present) {
            match (present, seen.cleared.contains_key(&id)) {
                (false, false) => {
                    seen.cleared.insert(id, (now, master.clone()));
                }
                (true, true) => seen.back.push((id, master.clone())),
                _ => {}
            }
        }
    }
}

/// A connection to `address` that gives up quickly: the old master is dead.
async fn quick_connection(address: &str) -> Option<MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    redis::Client::open(format!("redis://{address}/0"))
        .ok()?
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .ok()
}

/// The daemon on `redis_url` in the mode `TEST_MODE` asks for, once it cleared a first change
/// (report `probe`) and, in index mode, seeded its index.
async fn started_daemon(
    db: &TestDb,
    redis_url: &str,
    rules: &RulesFile,
    space: &KeyPrefix,
    probe: u32,
    extra: &[&str],
) -> ChildDaemon {
    let mode = daemon_mode();
    let mut args = vec!["--poll-interval", "500ms", "--mode", mode];
    args.extend_from_slice(extra);
    let daemon = ChildDaemon::worker(&db.url, redis_url, &rules.path, &args, true);
    daemon.wait_for_listener().await;
    if mode == "index" {
        let seeded = wait_until(PATIENCE, || async {
            daemon
                .get("/healthz")
                .await
                .is_some_and(|(_, body)| body.contains("index (complete)"))
        })
        .await;
        assert!(
            seeded,
            "the index never completed; log:\n{}",
            daemon.log_text()
        );
    }
    let seen = Mutex::new(Seen::default());
    commit_changes(db, probe..=probe, &seen).await;
    let mut on_master =
        redis_connection(&format!("redis://{}/0", first_master(redis_url).await)).await;
    assert_gone_within(&mut on_master, &[report_key(space, probe)], PATIENCE).await;
    daemon
}

/// `--mode` for the daemon: sweep when `TEST_MODE` says so, else index (these servers track).
fn daemon_mode() -> &'static str {
    match test_mode() {
        cache_invalidator::settings::Mode::Sweep => "sweep",
        _ => "index",
    }
}

/// The master the sentinels of a `redis+sentinel://` URL name (or the server of a plain URL).
async fn first_master(redis_url: &str) -> String {
    let rest = redis_url
        .split_once("://")
        .map_or(redis_url, |(_, rest)| rest);
    let host = rest.split([',', '/']).next().unwrap_or(rest).to_owned();
    if !redis_url.starts_with("redis+sentinel") {
        return host;
    }
    let mut sentinel = redis_connection(&format!("redis://{host}/0")).await;
    master_address(&mut sentinel).await.expect("a master")
}

async fn seeded_space(tag: &str, reports: u32) -> (KeyPrefix, TestDb) {
    let space = KeyPrefix::new(tag);
    let db = TestDb::with_reports(tag, &space.rules()).await;
    db.seed_reports(reports as i32).await;
    (space, db)
}

/// Outbox ids still pending.
async fn pending(db: &TestDb) -> BTreeSet<i64> {
    db.client()
        .await
        .query("SELECT id FROM cache_invalidator.outbox", &[])
        .await
        .expect("outbox ids")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load_is_followed_to_the_promoted_replica() {
    let total = BEFORE_KILL + AFTER_KILL;
    let probe = total + 1;
    let (space, db) = seeded_space("sentinel", probe).await;
    let mut setup = SentinelSetup::start().await;
    let mut on_master = redis_connection(&setup.master.url()).await;
    let keys: Vec<String> = (1..=probe).map(|id| report_key(&space, id)).collect();
    set_keys(&mut on_master, &keys).await;
    let synced: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(10_000)
        .query_async(&mut on_master)
        .await
        .expect("WAIT");
    assert_eq!(synced, 1, "the replica never had the cached keys");
    let rules = RulesFile::default_for(&space, "");
    let daemon = started_daemon(&db, &setup.daemon_url(), &rules, &space, probe, &[]).await;

    let space = Arc::new(space);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = CancellationToken::new();
    let watcher = tokio::spawn(watch_keys(
        setup.sentinel_url(0),
        space.clone(),
        seen.clone(),
        stop.clone(),
    ));
    commit_changes(&db, 1..=BEFORE_KILL, &seen).await;
    // Acknowledged before the kill: committed, and the row gone from the outbox.
    let committed: Vec<(u32, i64)> = {
        let seen = seen.lock().expect("seen");
        seen.committed
            .iter()
            .map(|(id, (row, _))| (*id, *row))
            .collect()
    };
    let still_pending = pending(&db).await;
    setup.master.stop();
    let killed = Instant::now();
    let acked: Vec<u32> = committed
        .into_iter()
        .filter(|(_, row)| !still_pending.contains(row))
        .map(|(id, _)| id)
        .collect();
    commit_changes(&db, BEFORE_KILL + 1..=total, &seen).await;
    let all_cleared = wait_until(CLEARED_WITHIN + PATIENCE, || async {
        seen.lock().expect("seen").cleared.len() == total as usize
    })
    .await;
    db.wait_for_empty_outbox(PATIENCE).await;
    stop.cancel();
    watcher.await.expect("watcher");
    // The watcher is done: what it saw is the test's alone now.
    let seen = std::mem::take(&mut *seen.lock().expect("seen"));
    report_failover(&seen, killed, acked.len());
    assert!(
        all_cleared,
        "not every change's key was seen gone; log:\n{}",
        daemon.log_text()
    );
    assert_failover_goals(&seen, killed, &acked, &daemon);
    let (_, new_master) = seen.promoted.clone().expect("promoted");
    let mut on_new = redis_connection(&format!("redis://{new_master}/0")).await;
    let acked_keys: Vec<String> = acked.iter().map(|id| report_key(&space, *id)).collect();
    assert_gone_within(&mut on_new, &acked_keys, Duration::ZERO).await;
    let every_key: Vec<String> = (1..=total).map(|id| report_key(&space, id)).collect();
    assert_gone_within(&mut on_new, &every_key, Duration::ZERO).await;
    if daemon_mode() == "index" {
        let body = daemon.scrape().await;
        let failover = sample(
            &body,
            "cache_invalidator_index_rebuilds_total{reason=\"failover\"}",
        );
        assert!(
            failover >= Some(1.0),
            "no index rebuild for the failover: {failover:?}"
        );
    }
    db.drop().await;
}

/// Prints the figures: the worst commit-to-gone, and the recovery after the promotion.
fn report_failover(seen: &Seen, killed: Instant, acked: usize) {
    let worst = latencies(seen).into_iter().max().unwrap_or_default();
    let promoted = seen.promoted.as_ref().map(|(at, _)| *at);
    println!(
        "sentinel failover ({} mode): promotion {:.2} s after the kill; first change committed \
         after the kill cleared on the new master {:.2} s after the promotion, all those of the \
         outage {:.2} s after it; worst commit-to-gone {:.2} s; {acked} changes acknowledged \
         before the kill; keys seen back: {:?}",
        daemon_mode(),
        promoted.map_or(f64::NAN, |at| at.duration_since(killed).as_secs_f64()),
        recovery(seen, killed).map_or(f64::NAN, |d| d.as_secs_f64()),
        outage_cleared(seen, killed).map_or(f64::NAN, |d| d.as_secs_f64()),
        worst.as_secs_f64(),
        seen.back,
    );
}

fn latencies(seen: &Seen) -> Vec<Duration> {
    seen.cleared
        .iter()
        .filter_map(|(id, (at, _))| Some(at.duration_since(seen.committed.get(id)?.1)))
        .collect()
}

/// Promotion → the first key of a change committed after the kill seen gone on the new master
/// (keys of earlier changes may have gone from the old master and reached the replica before).
fn recovery(seen: &Seen, killed: Instant) -> Option<Duration> {
    let (promoted, master) = seen.promoted.as_ref()?;
    seen.cleared
        .iter()
        .filter(|(id, _)| seen.committed.get(id).is_some_and(|(_, at)| *at > killed))
        .filter(|(_, (_, on))| on == master)
        .map(|(_, (at, _))| at.saturating_duration_since(*promoted))
        .min()
}

/// Promotion → every change committed between the kill and the promotion seen gone.
fn outage_cleared(seen: &Seen, killed: Instant) -> Option<Duration> {
    let (promoted, _) = seen.promoted.as_ref()?;
    seen.cleared
        .iter()
        .filter(|(id, _)| {
            seen.committed
                .get(id)
                .is_some_and(|(_, at)| *at > killed && at < promoted)
        })
        .map(|(_, (at, _))| at.saturating_duration_since(*promoted))
        .max()
}

fn assert_failover_goals(seen: &Seen, killed: Instant, acked: &[u32], daemon: &ChildDaemon) {
    assert!(
        seen.promoted.is_some(),
        "the sentinels never promoted the replica"
    );
    let late: Vec<(u32, Duration)> = seen
        .cleared
        .iter()
        .filter_map(|(id, (at, _))| Some((*id, at.duration_since(seen.committed.get(id)?.1))))
        .filter(|(_, latency)| *latency > CLEARED_WITHIN)
        .collect();
    assert!(
        late.is_empty(),
        "keys gone later than {CLEARED_WITHIN:?} after their commit: {late:?}"
    );
    let recovered = recovery(seen, killed).expect("a key cleared on the new master");
    assert!(
        recovered <= RECOVERED_WITHIN,
        "first key cleared on the new master {recovered:?} after the promotion; log:\n{}",
        daemon.log_text()
    );
    let resurrected: Vec<&(u32, String)> = seen
        .back
        .iter()
        .filter(|(id, _)| acked.contains(id))
        .collect();
    assert!(
        resurrected.is_empty(),
        "keys of acknowledged changes came back on the new master: {resurrected:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_is_given_up_and_nothing_is_acknowledged_until_it_answers() {
    let (space, db) = seeded_space("frozen_redis", 3).await;
    let server = PrivateRedis::start();
    let mut on_server = redis_connection(&server.url()).await;
    let keys: Vec<String> = (1..=3).map(|id| report_key(&space, id)).collect();
    set_keys(&mut on_server, &keys).await;
    let rules = RulesFile::default_for(&space, "");
    let timeout = format!("{}ms", FROZEN_TIMEOUT.as_millis());
    let extra = [
        "--redis-timeout",
        &timeout,
        "--replica-wait-timeout",
        "100ms",
    ];
    let daemon = started_daemon(&db, &server.url(), &rules, &space, 3, &extra).await;
    let reconnects = "cache_invalidator_reconnects_total{side=\"redis\"}";
    let before = sample(&daemon.scrape().await, reconnects).unwrap_or(0.0);

    server.signal("STOP");
    let frozen = Instant::now();
    let seen = Mutex::new(Seen::default());
    commit_changes(&db, 1..=2, &seen).await;
    // Given up: the worker's connection fails its command at the timeout and is replaced. In
    // index mode the window first waits for the index's barrier on the tracking connection, which
    // times out too, and then for the sweep it falls back to: two timeouts.
    let timeouts = if daemon_mode() == "index" { 2 } else { 1 };
    let bound = FROZEN_TIMEOUT * timeouts + FROZEN_SLACK;
    let given_up = wait_until(bound, || async {
        sample(&daemon.scrape().await, reconnects).unwrap_or(0.0) > before
    })
    .await;
    let given_up_after = frozen.elapsed();
    tokio::time::sleep(FROZEN_TIMEOUT * 2).await;
    let held = db.outbox_rows().await;
    server.signal("CONT");
    println!(
        "frozen redis (--redis-timeout {FROZEN_TIMEOUT:?}, {} mode): connection given up {:.1} s \
         after the freeze; {held} outbox rows held while frozen",
        daemon_mode(),
        given_up_after.as_secs_f64()
    );
    assert!(
        given_up,
        "the frozen connection was not given up within {bound:?}; log:\n{}",
        daemon.log_text()
    );
    assert_eq!(
        held, 2,
        "changes were acknowledged while Redis did not answer"
    );
    assert_gone_within(&mut on_server, &keys[..2], PATIENCE).await;
    db.wait_for_empty_outbox(PATIENCE).await;
    db.drop().await;
}

/// A failover asked for (`SENTINEL FAILOVER`): the old master lives on as a replica of the new
/// one. The daemon hears `+switch-master`, moves to the new master and clears the changes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_announced_by_the_sentinels_moves_the_daemon_to_the_new_master() {
    let changes = 20;
    let probe = changes + 1;
    let (space, db) = seeded_space("switch", probe).await;
    let setup = SentinelSetup::start().await;
    let mut on_old = redis_connection(&setup.master.url()).await;
    let keys: Vec<String> = (1..=probe).map(|id| report_key(&space, id)).collect();
    set_keys(&mut on_old, &keys).await;
    let synced: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(10_000)
        .query_async(&mut on_old)
        .await
        .expect("WAIT");
    assert_eq!(synced, 1, "the replica never had the cached keys");
    let rules = RulesFile::default_for(&space, "");
    let daemon = started_daemon(&db, &setup.daemon_url(), &rules, &space, probe, &[]).await;

    let mut sentinel = redis_connection(&setup.sentinel_url(0)).await;
    let old = master_address(&mut sentinel).await.expect("a master");
    let _: () = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg(SERVICE)
        .query_async(&mut sentinel)
        .await
        .expect("SENTINEL FAILOVER");
    let switched = wait_until(LONG_PATIENCE, || {
        let mut sentinel = sentinel.clone();
        let old = old.clone();
        async move {
            master_address(&mut sentinel)
                .await
                .is_some_and(|now| now != old)
        }
    })
    .await;
    assert!(switched, "the sentinels never switched the master");
    let promoted = Instant::now();
    let new = master_address(&mut sentinel).await.expect("a master");
    commit_changes(&db, 1..=changes, &Mutex::new(Seen::default())).await;
    let mut on_new = redis_connection(&format!("redis://{new}/0")).await;
    assert_gone_within(&mut on_new, &keys[..changes as usize], RECOVERED_WITHIN).await;
    println!(
        "sentinel switch ({} mode): {changes} changes committed after the switch cleared on the \
         new master {:.2} s after it",
        daemon_mode(),
        promoted.elapsed().as_secs_f64()
    );
    db.wait_for_empty_outbox(PATIENCE).await;
    assert!(
        daemon
            .log_text()
            .contains("the sentinels switched the master"),
        "the daemon never heard +switch-master; log:\n{}",
        daemon.log_text()
    );
    // The old master, a replica now, follows the new one: the keys are gone there too. (The
    // sentinels close the clients' connections when they demote it: each look connects anew.)
    let old_address = format!("127.0.0.1:{}", setup.master.port);
    let followed = wait_until(PATIENCE, || async {
        let Some(mut on_old) = quick_connection(&old_address).await else {
            return false;
        };
        let mut pipe = redis::pipe();
        for key in &keys[..changes as usize] {
            pipe.exists(key);
        }
        pipe.query_async::<Vec<bool>>(&mut on_old)
            .await
            .is_ok_and(|present| present.iter().all(|present| !present))
    })
    .await;
    assert!(followed, "the keys stayed on the demoted master");
    db.drop().await;
}
