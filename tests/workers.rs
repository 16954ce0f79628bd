//! Several workers on one outbox (issue 7), as real `cache-invalidator run` processes: they share a
//! burst through `SKIP LOCKED` with each change processed by exactly one of them, the survivors
//! finish the claims of a worker killed with SIGKILL, and `status` lists each connected worker.
//!
//! "Processed by exactly one worker" is read from each process' own `/metrics`:
//! `cache_invalidator_changes_total` counts a changed row when its worker acknowledges it, so
//! the two workers' counts add up to the number of changes exactly when no row was taken twice.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long any awaited effect may take before a test gives up (a bound, not a measurement).
const PATIENCE: Duration = Duration::from_secs(120);
/// The burst of the issue: 5,000 changed rows, one statement (one outbox row) each.
const BURST: i32 = 5_000;
/// Statements per transaction in the burst: many commits, so both workers keep being woken.
const STATEMENTS_PER_COMMIT: usize = 25;

/// `cache-invalidator run` as a child process with its own `/metrics`; its log is printed when
/// the test fails.
struct Worker {
    process: LoggedChild,
    metrics: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Worker {
    fn start(database_url: &str, redis_url: &str, rules: &Path) -> Worker {
        let dir = tempfile::tempdir().expect("temp dir");
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut command = daemon_command(&[
            "run",
            "--rules",
            rules.to_str().expect("utf-8 path"),
            "--refill-guard",
            "0",
            "--poll-interval",
            "500ms",
            "--metrics-addr",
            &metrics.to_string(),
        ]);
        command
            .env("DATABASE_URL", database_url)
            .env("REDIS_URL", redis_url);
        Worker {
            process: LoggedChild::spawn(command, dir.path().join("worker.log")),
            metrics,
            _dir: dir,
        }
    }

    async fn signal(&self, name: &str) {
        send_signal(&self.process, name).await;
    }

    /// Sums the samples of `name` (every label set); `None` while `/metrics` does not answer.
    async fn metric(&self, name: &str) -> Option<f64> {
        let body = http_get(self.metrics, "/metrics").await?;
        Some(
            body.lines()
                .filter(|line| {
                    line.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with([' ', '{']))
                })
                .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                .sum(),
        )
    }

    async fn changes(&self) -> f64 {
        self.metric("cache_invalidator_changes_total")
            .await
            .unwrap_or_else(|| {
                panic!(
                    "/metrics does not answer; log:\n{}",
                    self.process.log_text()
                )
            })
    }

    async fn wait_for_listener(&self) {
        assert!(
            wait_until(PATIENCE, || async {
                self.metric("cache_invalidator_changes_total")
                    .await
                    .is_some()
            })
            .await,
            "/metrics never answered; log:\n{}",
            self.process.log_text()
        );
    }

    /// SIGKILL: no shutdown, no rollback, connections cut by the kernel.
    async fn kill(mut self) {
        self.signal("KILL").await;
        let _ = self.process.wait().await;
    }

    /// SIGTERM, then the exit status must be success.
    async fn stop(mut self) {
        self.signal("TERM").await;
        match tokio::time::timeout(PATIENCE, self.process.wait()).await {
            Ok(status) => assert!(
                status.expect("wait for cache-invalidator").success(),
                "worker failed; log:\n{}",
                self.process.log_text()
            ),
            Err(_) => panic!("no exit within {PATIENCE:?} of SIGTERM"),
        }
    }
}

/// The body of one HTTP/1.1 GET with `Connection: close`; `None` unless it answered 200.
async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1)? == "200").then(|| body.to_owned())
}

/// A test's database, private Redis, keys and rules file: `BURST` reports whose keys must go
/// when they change, and decoys that must stay.
struct Setup {
    space: KeySpace,
    db: TestDb,
    redis: PrivateRedis,
    rules: PathBuf,
    decoys: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Setup {
    async fn new(tag: &str) -> Setup {
        let space = KeySpace::new(tag);
        let db = TestDb::with_reports(tag, &space.rules()).await;
        // Ten reports per author; reports past the burst belong to authors of their own.
        db.client()
            .await
            .batch_execute(&format!(
                "INSERT INTO auth_user (id) SELECT g FROM generate_series(1, {users}) g;
                 INSERT INTO reports_report (id, author_id)
                     SELECT g, 1 + (g - 1) / 10 FROM generate_series(1, {reports}) g;
                 DELETE FROM cache_invalidator.outbox;",
                users = (BURST + 100) / 10,
                reports = BURST + 100,
            ))
            .await
            .expect("seed reports");
        let redis = PrivateRedis::start();
        let mut must_go = Vec::new();
        for id in 1..=BURST {
            must_go.push(space.key(&format!("report:{id}:1:h")));
        }
        for author in 1..=BURST / 10 {
            must_go.push(space.key(&format!("reportlist:reports:{author}:p1")));
        }
        let mut decoys = Vec::new();
        for id in BURST + 1..=BURST + 100 {
            decoys.push(space.key(&format!("report:{id}:1:h")));
            decoys.push(space.key(&format!("reportlist:reports:{}:p1", 1 + (id - 1) / 10)));
        }
        decoys.push(space.key_v2("report:1:1:h"));
        decoys.sort();
        decoys.dedup();
        let mut connection = redis_connection(&redis.url()).await;
        set_keys(&mut connection, &[must_go, decoys.clone()].concat()).await;

        let dir = tempfile::tempdir().expect("temp dir");
        let rules = dir.path().join("rules.toml");
        std::fs::write(&rules, default_rules_toml(&space.key_prefix())).expect("write rules");
        Setup {
            space,
            db,
            redis,
            rules,
            decoys,
            _dir: dir,
        }
    }

    fn worker(&self, database_url: &str) -> Worker {
        Worker::start(database_url, &self.redis.url(), &self.rules)
    }

    /// Commits one-row UPDATEs of reports `ids`, [`STATEMENTS_PER_COMMIT`] per transaction.
    async fn change(&self, ids: std::ops::RangeInclusive<i32>) {
        let client = self.db.client().await;
        let ids: Vec<i32> = ids.collect();
        for chunk in ids.chunks(STATEMENTS_PER_COMMIT) {
            let statements: String = chunk
                .iter()
                .map(|id| format!("UPDATE reports_report SET title = 'new' WHERE id = {id};"))
                .collect();
            client
                .batch_execute(&format!("BEGIN; {statements} COMMIT;"))
                .await
                .expect("burst");
        }
    }

    async fn wait_for_listeners(&self, count: usize) {
        let client = self.db.client().await;
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

    /// Waits until the outbox is empty, then checks exactly the decoys are left in Redis.
    async fn assert_all_cleared(&self) {
        assert!(
            wait_until(PATIENCE, || async { self.db.outbox_rows().await == 0 }).await,
            "the outbox never emptied: {} row(s) left",
            self.db.outbox_rows().await
        );
        // Rows leave the outbox only after Redis confirmed their deletes.
        let mut connection = redis_connection(&self.redis.url()).await;
        let left = keys_with_prefix(&mut connection, &self.space.namespace).await;
        let expected: std::collections::BTreeSet<String> = self.decoys.iter().cloned().collect();
        let survivors: Vec<&String> = left.difference(&expected).take(5).collect();
        let lost: Vec<&String> = expected.difference(&left).take(5).collect();
        assert!(
            survivors.is_empty() && lost.is_empty(),
            "must-go keys left (first 5): {survivors:?}; decoys deleted (first 5): {lost:?}"
        );
    }

    async fn drop(self) {
        self.db.drop().await;
    }
}

/// Outbox rows locked right now by the sessions named `application_name`: a locked row's `xmax`
/// is the locking transaction's id, which `pg_stat_activity.backend_xid` shows per session.
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

fn with_application_name(url: &str, name: &str) -> String {
    let mut url = url::Url::parse(url).expect("database url");
    url.query_pairs_mut().append_pair("application_name", name);
    url.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_a_burst_and_process_each_change_once() {
    let setup = Setup::new("share").await;
    let first = setup.worker(&setup.db.url);
    let second = setup.worker(&setup.db.url);
    first.wait_for_listener().await;
    second.wait_for_listener().await;
    setup.wait_for_listeners(2).await;

    setup.change(1..=BURST).await;
    setup.assert_all_cleared().await;

    // A worker counts a change right after its acknowledgement commits: wait for the last ones.
    let total = BURST as f64;
    assert!(
        wait_until(PATIENCE, || async {
            first.changes().await + second.changes().await >= total
        })
        .await,
        "the workers counted fewer changes than were made"
    );
    let (a, b) = (first.changes().await, second.changes().await);
    assert_eq!(a + b, total, "a change was processed twice ({a} + {b})");
    assert!(a > 0.0 && b > 0.0, "one worker did everything ({a} + {b})");
    first.stop().await;
    second.stop().await;
    setup.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_halfway_leaves_its_claims_to_the_other() {
    let setup = Setup::new("sigkill").await;
    // The victim's claim connections carry a name of their own, to see which rows it holds.
    let victim_name = unique("victim");
    let victim = setup.worker(&with_application_name(&setup.db.url, &victim_name));
    let survivor = setup.worker(&setup.db.url);
    victim.wait_for_listener().await;
    survivor.wait_for_listener().await;
    setup.wait_for_listeners(2).await;

    let half = BURST / 2;
    setup.change(1..=half).await;
    // Halfway: freeze the victim until it is caught holding claims, then kill it.
    let mut held = 0;
    let mut next = half + 1;
    while held == 0 {
        victim.signal("STOP").await;
        held = rows_held_by(&setup.db, &victim_name).await;
        if held == 0 {
            victim.signal("CONT").await;
            assert!(next <= BURST, "the victim never held a claim");
            let end = (next + STATEMENTS_PER_COMMIT as i32 - 1).min(BURST);
            setup.change(next..=end).await;
            next = end + 1;
        }
    }
    victim.kill().await;
    if next <= BURST {
        setup.change(next..=BURST).await;
    }

    setup.assert_all_cleared().await;
    assert!(held > 0);
    survivor.stop().await;
    setup.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_each_connected_worker() {
    let space = KeySpace::new("status");
    let db = TestDb::with_reports("status", &space.rules()).await;
    let redis = PrivateRedis::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, cache_invalidator::rules::DEFAULT_RULES_TOML).expect("write rules");
    let first = Worker::start(&db.url, &redis.url(), &rules);
    let second = Worker::start(&db.url, &redis.url(), &rules);

    let status = || async {
        let output = daemon_command(&["status"])
            .env("DATABASE_URL", &db.url)
            .output()
            .await
            .expect("run cache-invalidator status");
        stdout(&output)
    };
    let listed = |text: &str| {
        let pids = text
            .lines()
            .filter(|line| line.trim_start().starts_with("pid "))
            .count();
        let header = text
            .lines()
            .find_map(|line| line.strip_prefix("workers listening:"))
            .and_then(|count| count.trim().parse::<usize>().ok());
        (header == Some(pids)).then_some(pids)
    };
    let two = wait_until(PATIENCE, || async { listed(&status().await) == Some(2) }).await;
    assert!(two, "status never listed two workers:\n{}", status().await);

    // One stops: its session goes, and so does its line.
    first.stop().await;
    let one = wait_until(PATIENCE, || async { listed(&status().await) == Some(1) }).await;
    assert!(
        one,
        "status still lists a stopped worker:\n{}",
        status().await
    );
    second.stop().await;
    db.drop().await;
}
