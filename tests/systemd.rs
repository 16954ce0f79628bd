//! The daemon under systemd, seen from systemd's side: the test listens on a `NOTIFY_SOCKET`
//! datagram socket, runs `cache-invalidator run` as a child process with `WATCHDOG_USEC`, and breaks
//! the servers under it (private `redis-server` and Postgres instances).
//!
//! The contract: `READY=1` once the configuration is loaded and the loop runs (not after a backlog
//! drained, not waiting for a server that is down); `WATCHDOG=1` at least every half
//! `WATCHDOG_USEC` while the loop is alive, whatever the servers do; and a backlog that waited for
//! Redis is cleared within 5 s of Redis answering again.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// The watchdog interval the tests announce: 2 s, so pings are due at least every second.
const WATCHDOG_USEC: &str = "2000000";
/// Half of [`WATCHDOG_USEC`]: the longest gap between two pings systemd tolerates by contract.
const MAX_PING_GAP: Duration = Duration::from_secs(1);
/// How long a server stays down while the pings are watched: three watchdog intervals, so a
/// daemon that stops pinging while a server is down would have been killed.
const OUTAGE: Duration = Duration::from_secs(6);
/// The target: the backlog is cleared this soon after Redis answers again.
const RECOVERY_TARGET: Duration = Duration::from_secs(5);

/// Every line the daemon sent to the notification socket, with when it arrived.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(Instant, String)>>>);

impl Received {
    fn lines(&self) -> Vec<(Instant, String)> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn first(&self, line: &str) -> Option<Instant> {
        self.lines()
            .into_iter()
            .find(|(_, seen)| seen == line)
            .map(|(at, _)| at)
    }

    fn any_starting_with(&self, prefix: &str) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|(_, line)| line.starts_with(prefix))
            .map(|(_, line)| line)
            .collect()
    }

    /// The longest stretch without `WATCHDOG=1` between `from` and `to` (both ends count).
    fn longest_ping_gap(&self, from: Instant, to: Instant) -> Duration {
        let mut last = from;
        let mut longest = Duration::ZERO;
        for (at, line) in self.lines() {
            if line == "WATCHDOG=1" && at > from && at <= to {
                longest = longest.max(at - last);
                last = at;
            }
        }
        longest.max(to - last)
    }

    /// Waits for `READY=1`, then for a `WATCHDOG=1` after it.
    async fn wait_for_ping_after_ready(&self) {
        let ready = self.wait_for("READY=1", PATIENCE).await;
        assert!(
            wait_until(PATIENCE, || async {
                self.lines()
                    .iter()
                    .any(|(at, line)| *at > ready && line == "WATCHDOG=1")
            })
            .await,
            "no WATCHDOG=1 after READY=1"
        );
    }

    async fn wait_for(&self, line: &str, timeout: Duration) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.first(line) {
                return at;
            }
            assert!(
                Instant::now() < deadline,
                "no {line} within {timeout:?}; received {:?}",
                self.lines().into_iter().map(|(_, l)| l).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// systemd's end of the notification protocol: a datagram socket in a temp dir.
struct NotifySocket {
    path: String,
    received: Received,
    dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify.sock");
        let socket = tokio::net::UnixDatagram::bind(&path).expect("bind notify socket");
        let received = Received::default();
        let sink = received.clone();
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 4096];
            while let Ok(length) = socket.recv(&mut buffer).await {
                let at = Instant::now();
                let text = String::from_utf8_lossy(&buffer[..length]).into_owned();
                let mut lines = sink
                    .0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                lines.extend(text.lines().map(|line| (at, line.to_owned())));
            }
        });
        NotifySocket {
            path: path.to_str().expect("utf-8 path").to_owned(),
            received,
            dir,
        }
    }
}

/// `cache-invalidator run` as systemd would start it with `WatchdogSec=2s`, with the default rules
/// under `space`'s key prefix, serving `/metrics` and `/healthz` on a free port.
fn start_daemon(
    database_url: &str,
    redis_url: &str,
    space: &KeyPrefix,
    notify: &NotifySocket,
) -> ChildDaemon {
    let rules = notify.dir.path().join("rules.toml");
    std::fs::write(&rules, default_rules_toml(&space.key_prefix())).expect("write rules");
    let rules = rules.to_str().expect("utf-8 path");
    ChildDaemon::run(
        &["--refill-guard", "0", "--rules", rules],
        &[
            ("DATABASE_URL", database_url),
            ("REDIS_URL", redis_url),
            ("NOTIFY_SOCKET", notify.path.as_str()),
            ("WATCHDOG_USEC", WATCHDOG_USEC),
        ],
        true,
    )
}

/// A daemon that sees `server` go down keeps pinging the watchdog for the whole outage, and says
/// what it waits for in `STATUS=`.
async fn assert_pings_through_outage(
    daemon: &mut ChildDaemon,
    notify: &NotifySocket,
    server: &str,
    went_down: Instant,
) {
    tokio::time::sleep(OUTAGE).await;
    let until = Instant::now();
    assert!(
        daemon.try_wait().expect("poll child").is_none(),
        "the daemon exited while {server} was down"
    );
    let gap = notify.received.longest_ping_gap(went_down, until);
    eprintln!("{server} down for {OUTAGE:?}: longest gap between WATCHDOG=1 pings {gap:?}");
    assert!(
        gap <= MAX_PING_GAP,
        "{server} down for {OUTAGE:?}: a gap of {gap:?} without WATCHDOG=1 (at most {MAX_PING_GAP:?} \
         with WATCHDOG_USEC={WATCHDOG_USEC}); the unit's watchdog would kill a daemon that only waits"
    );
    let statuses = notify.received.any_starting_with("STATUS=");
    assert!(
        statuses
            .iter()
            .any(|status| status.starts_with("STATUS=waiting for") && status.contains(server)),
        "no STATUS= saying the daemon waits for {server}: {statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_keeps_pinging_while_redis_is_down() {
    let mut redis_server = PrivateRedis::start();
    let (space, db) = space_with_reports("sd_redis_down").await;
    let notify = NotifySocket::bind();
    let mut daemon = start_daemon(&db.url, &redis_server.url(), &space, &notify);
    notify.received.wait_for_ping_after_ready().await;

    redis_server.stop();
    let went_down = Instant::now();
    // A change to clear while Redis is away: the worker's sweep fails and it enters its
    // reconnect loop (not only the health probe sees Redis gone).
    db.client()
        .await
        .batch_execute(
            "INSERT INTO auth_user (id) VALUES (1);
             INSERT INTO reports_report (id, author_id) VALUES (1, 1);",
        )
        .await
        .expect("write");
    assert_pings_through_outage(&mut daemon, &notify, "redis", went_down).await;
    // What an operator's probe and Prometheus read.
    let (status, body) = daemon.get("/healthz").await.expect("/healthz answers");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("redis down"), "{body}");
    let scrape = daemon.scrape().await;
    assert!(
        scrape.contains("cache_invalidator_connected{side=\"redis\"} 0"),
        "{scrape}"
    );
    assert!(
        scrape.contains("cache_invalidator_connected{side=\"postgres\"} 1"),
        "{scrape}"
    );
    assert_eq!(
        db.outbox_rows().await,
        1,
        "the change waits in the outbox while Redis is down"
    );
    drop(daemon);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_keeps_pinging_while_postgres_is_down() {
    let postgres = PrivatePostgres::start();
    let space = KeyPrefix::new("sd_pg_down");
    let db = TestDb::with_reports_on(&postgres.url(), "sd_pg_down", &space.rules()).await;
    let notify = NotifySocket::bind();
    let mut daemon = start_daemon(&db.url, &shared_redis_url(), &space, &notify);
    notify.received.wait_for_ping_after_ready().await;

    // Stops the cluster (`pg_ctl stop -m immediate`): every connection drops, none is accepted.
    drop(postgres);
    let went_down = Instant::now();
    assert_pings_through_outage(&mut daemon, &notify, "postgres", went_down).await;
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_while_redis_is_down_then_backlog_cleared_soon_after_it_answers() {
    // Append-only file synced on every write: the keys survive the server's restart, so the
    // test sees the daemon delete them rather than the restart losing them.
    let mut redis_server =
        PrivateRedis::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let (space, db) = space_with_reports("sd_recovery").await;

    const REPORTS: i64 = 40;
    let mut cleared = Vec::new();
    let mut writes = String::from("INSERT INTO auth_user (id) VALUES (1), (2);\n");
    for id in 1..=REPORTS {
        cleared.push(space.key(&format!("report:{id}:1:h")));
        // One statement each: a backlog of many outbox rows.
        writes.push_str(&format!(
            "INSERT INTO reports_report (id, author_id) VALUES ({id}, 1);\n"
        ));
    }
    cleared.push(space.key("reportlist:reports:1:h"));
    let decoys = vec![
        space.key(&format!("report:{}:1:h", REPORTS + 1)),
        space.key("reportlist:reports:2:h"),
        space.key_v2("report:1:1:h"),
    ];
    let mut redis = redis_connection(&redis_server.url()).await;
    set_keys(&mut redis, &[cleared.clone(), decoys.clone()].concat()).await;
    drop(redis);
    db.client()
        .await
        .batch_execute(&writes)
        .await
        .expect("writes");
    let backlog = db.outbox_rows().await;
    assert!(backlog >= REPORTS, "expected a backlog, got {backlog} rows");

    redis_server.stop();
    let notify = NotifySocket::bind();
    let started = Instant::now();
    let mut daemon = start_daemon(&db.url, &redis_server.url(), &space, &notify);
    // READY=1 comes while Redis is down and the whole backlog waits.
    notify.received.wait_for("READY=1", PATIENCE).await;
    assert_eq!(
        db.outbox_rows().await,
        backlog,
        "READY=1 while Redis is down: nothing can have been cleared"
    );

    // Down until the worker's reconnect backoff has grown past twice the target: Redis comes
    // back just after a failed attempt that set the next one that far away, so only a
    // daemon that notices the server answering again (rather than waiting out its backoff) can
    // meet the target. The log line is only a clock here; the assertions are on Redis and Postgres.
    let backoff_grown = wait_until(Duration::from_secs(60), || async {
        daemon.log_text().lines().any(|line| {
            line.contains("redis connection failed")
                && retry_in_ms(line).is_some_and(|ms| ms > 2 * RECOVERY_TARGET.as_millis() as u64)
        })
    })
    .await;
    assert!(
        backoff_grown,
        "the reconnect backoff never grew past twice {RECOVERY_TARGET:?}"
    );
    assert!(
        daemon.try_wait().expect("poll child").is_none(),
        "the daemon exited while Redis was down"
    );
    let gap = notify
        .received
        .longest_ping_gap(started + Duration::from_secs(2), Instant::now());
    assert!(
        gap <= MAX_PING_GAP,
        "a gap of {gap:?} without WATCHDOG=1 while Redis was down"
    );
    assert_eq!(db.outbox_rows().await, backlog);

    redis_server.restart();
    let back = Instant::now();
    let mut redis = redis_connection(&redis_server.url()).await;
    let keys_before = keys_with_prefix(&mut redis, &format!("{}:", space.namespace)).await;
    assert!(
        keys_before.len() > decoys.len(),
        "the restarted server lost the keys ({keys_before:?}): the test would prove nothing"
    );
    let drained = wait_until(RECOVERY_TARGET * 3, || {
        let mut redis = redis.clone();
        let cleared = cleared.clone();
        let db = &db;
        async move {
            for key in &cleared {
                if exists(&mut redis, key).await {
                    return false;
                }
            }
            db.outbox_rows().await == 0
        }
    })
    .await;
    let took = back.elapsed();
    eprintln!("backlog of {backlog} outbox rows cleared {took:?} after Redis answered again");
    let left: Vec<String> = keys_with_prefix(&mut redis, &format!("{}:", space.namespace))
        .await
        .into_iter()
        .filter(|key| cleared.contains(key))
        .collect();
    assert!(
        drained && took <= RECOVERY_TARGET,
        "{took:?} after Redis answered again (target {RECOVERY_TARGET:?}): keys left {left:?}, \
         outbox rows left {}",
        db.outbox_rows().await
    );
    assert_kept(&mut redis, &decoys).await;
    drop(daemon);
    db.drop().await;
}

/// The `retry_in_ms=N` field of a text log line.
fn retry_in_ms(line: &str) -> Option<u64> {
    let (_, rest) = line.split_once("retry_in_ms=")?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}
