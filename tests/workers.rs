//! Several workers on one outbox, as real `cache-invalidator run` processes: they share a
//! burst through `SKIP LOCKED` with each change processed by exactly one of them, the survivors
//! finish the claims of a worker killed with SIGKILL, and `status` lists each connected worker.
//!
//! "Processed by exactly one worker" is read from each process' own `/metrics`:
//! `cache_invalidator_changes_total` counts a changed row when its worker acknowledges it, so
//! the two workers' counts add up to the number of changes exactly when no row was taken twice.

mod common;

use std::time::Duration;

use common::*;

/// How long any awaited effect may take: a burst of thousands of changes shared by two debug-build
/// workers on two busy cores takes far longer than [`PATIENCE`].
const BURST_PATIENCE: Duration = Duration::from_secs(120);
/// The burst: 5,000 changed rows, one statement (one outbox row) each.
const BURST: i32 = 5_000;
/// Statements per transaction in the burst: many commits, so both workers keep being woken.
const STATEMENTS_PER_COMMIT: usize = 25;

/// The changes a worker counted (`cache_invalidator_changes_total`, every table).
async fn changes(worker: &ChildDaemon) -> f64 {
    worker
        .metric_sum("cache_invalidator_changes_total")
        .await
        .unwrap_or_else(|| panic!("/metrics does not answer; log:\n{}", worker.log_text()))
}

/// SIGTERM, then the exit status must be success.
async fn stop(mut worker: ChildDaemon) {
    let status = worker.stop_within(BURST_PATIENCE).await;
    assert!(
        status.success(),
        "worker failed; log:\n{}",
        worker.log_text()
    );
}

/// A test's database, private Redis, keys and rules file: `BURST` reports whose keys must go
/// when they change, and decoys that must stay.
struct Setup {
    space: KeyPrefix,
    db: TestDb,
    redis: PrivateRedis,
    rules: RulesFile,
    decoys: Vec<String>,
}

impl Setup {
    async fn new(tag: &str) -> Setup {
        let (space, db) = space_with_reports(tag).await;
        // Ten reports per author; reports past the burst belong to authors of their own.
        db.seed_reports(BURST + 100).await;
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

        let rules = RulesFile::default_for(&space, "");
        Setup {
            space,
            db,
            redis,
            rules,
            decoys,
        }
    }

    fn worker(&self, database_url: &str) -> ChildDaemon {
        ChildDaemon::worker(
            database_url,
            &self.redis.url(),
            &self.rules.path,
            &FAST_POLL,
            true,
        )
    }

    /// Commits one-row UPDATEs of reports `ids`, [`STATEMENTS_PER_COMMIT`] per transaction.
    async fn change(&self, ids: std::ops::RangeInclusive<i32>) {
        let client = self.db.client().await;
        retitle_in_transactions(&client, ids, STATEMENTS_PER_COMMIT, "new").await;
    }

    /// Waits until the outbox is empty, then checks exactly the decoys are left in Redis.
    async fn assert_all_cleared(&self) {
        self.db.wait_for_empty_outbox(BURST_PATIENCE).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_a_burst_and_process_each_change_once() {
    let setup = Setup::new("share").await;
    let first = setup.worker(&setup.db.url);
    let second = setup.worker(&setup.db.url);
    first.wait_for_listener().await;
    second.wait_for_listener().await;
    setup.db.wait_for_workers(2, BURST_PATIENCE).await;

    setup.change(1..=BURST).await;
    setup.assert_all_cleared().await;

    // A worker counts a change right after its acknowledgement commits: wait for the last ones.
    let total = BURST as f64;
    assert!(
        wait_until(BURST_PATIENCE, || async {
            changes(&first).await + changes(&second).await >= total
        })
        .await,
        "the workers counted fewer changes than were made"
    );
    let (a, b) = (changes(&first).await, changes(&second).await);
    assert_eq!(a + b, total, "a change was processed twice ({a} + {b})");
    assert!(a > 0.0 && b > 0.0, "one worker did everything ({a} + {b})");
    stop(first).await;
    stop(second).await;
    setup.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_halfway_leaves_its_claims_to_the_other() {
    let setup = Setup::new("sigkill").await;
    // The victim's claim connections carry a name of their own, to see which rows it holds.
    let victim_name = unique("victim");
    let mut victim = setup.worker(&with_application_name(&setup.db.url, &victim_name));
    let survivor = setup.worker(&setup.db.url);
    victim.wait_for_listener().await;
    survivor.wait_for_listener().await;
    setup.db.wait_for_workers(2, BURST_PATIENCE).await;

    let half = BURST / 2;
    setup.change(1..=half).await;
    // Halfway: freeze the victim until it is caught holding claims, then kill it.
    let mut held = 0;
    let mut next = half + 1;
    while held == 0 {
        victim.signal("STOP").await;
        held = setup.db.rows_held_by(&victim_name).await;
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
    stop(survivor).await;
    setup.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_each_connected_worker() {
    let (_space, db) = space_with_reports("status").await;
    let redis = PrivateRedis::start();
    let rules = RulesFile::new(cache_invalidator::rules::DEFAULT_RULES_TOML);
    let first = ChildDaemon::worker(&db.url, &redis.url(), &rules.path, &FAST_POLL, true);
    let second = ChildDaemon::worker(&db.url, &redis.url(), &rules.path, &FAST_POLL, true);

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
    let two = wait_until(BURST_PATIENCE, || async {
        listed(&status().await) == Some(2)
    })
    .await;
    assert!(two, "status never listed two workers:\n{}", status().await);

    // One stops: its session goes, and so does its line.
    stop(first).await;
    let one = wait_until(BURST_PATIENCE, || async {
        listed(&status().await) == Some(1)
    })
    .await;
    assert!(
        one,
        "status still lists a stopped worker:\n{}",
        status().await
    );
    stop(second).await;
    db.drop().await;
}
