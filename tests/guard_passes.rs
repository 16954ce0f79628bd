//! The sweep-mode refill guard rides along with passes that run anyway: under steady small
//! changes it must not double the worker's `SCAN` passes.
//!
//! Two daemons run side by side in sweep mode, one with the guard and one without, each on its own
//! Redis and database, and take the same changes at the same moments: whatever the machine's load
//! does to one run, it does to the other, so their pass counts can be compared.

mod common;

use std::time::Duration;

use common::*;

const KEYS: i32 = 2_000;
const CHANGES_PER_SECOND: u64 = 200;
const SECONDS: u64 = 4;

/// One daemon with its own Redis, database and metrics listener.
struct Side {
    db: TestDb,
    client: tokio_postgres::Client,
    daemon: ChildDaemon,
    _redis: PrivateRedis,
    _rules: RulesFile,
}

impl Side {
    async fn start(tag: &str, refill_guard: &str) -> Side {
        let redis = PrivateRedis::start();
        let space = KeyPrefix::new(tag);
        let db = TestDb::with_reports(tag, &space.rules()).await;
        let client = db.client().await;
        client
            .batch_execute(&format!(
                "INSERT INTO auth_user (id) VALUES (1);
                 INSERT INTO reports_report (id, title, author_id)
                     SELECT g, 't', 1 FROM generate_series(1, {KEYS}) g;"
            ))
            .await
            .expect("seed");
        let keys: Vec<String> = (1..=KEYS)
            .map(|id| space.key(&format!("report:{id}:1:h")))
            .collect();
        set_keys(&mut redis_connection(&redis.url()).await, &keys).await;
        let rules = RulesFile::default_for(&space, "");
        let rules_path = rules.path.to_str().expect("utf-8 path");
        let args = ["--rules", rules_path, "--mode", "sweep"];
        let args = [&args[..], &["--refill-guard", refill_guard]].concat();
        let env = [
            ("DATABASE_URL", db.url.as_str()),
            ("REDIS_URL", &redis.url()),
        ];
        let daemon = ChildDaemon::run(&args, &env, true);
        let side = Side {
            db,
            client,
            daemon,
            _redis: redis,
            _rules: rules,
        };
        assert!(
            wait_until(LONG_PATIENCE, || async {
                side.db.outbox_rows().await == 0 && side.passes().await.is_some()
            })
            .await,
            "the daemon did not start"
        );
        side
    }

    /// `cache_invalidator_sweeps_total`: the passes the worker made so far.
    async fn passes(&self) -> Option<f64> {
        self.daemon
            .metric_sum("cache_invalidator_sweeps_total")
            .await
    }

    /// [`Side::passes`], which must answer by now.
    async fn passes_now(&self) -> f64 {
        self.passes().await.expect("the daemon's /metrics")
    }

    async fn change(&self, id: i32) {
        self.client
            .execute(
                "UPDATE reports_report SET title = 'u' WHERE id = $1",
                &[&id],
            )
            .await
            .expect("update");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_steady_changes_the_sweep_mode_guard_rides_along_with_passes_that_run_anyway() {
    let (without, with) = tokio::join!(
        Side::start("guard_off", "0"),
        Side::start("guard_on", "500ms")
    );
    let before = (without.passes_now().await, with.passes_now().await);
    let mut tick = tokio::time::interval(Duration::from_millis(1_000 / CHANGES_PER_SECOND));
    for n in 0..SECONDS * CHANGES_PER_SECOND {
        tick.tick().await;
        let id = 1 + (n as i32 * 7919) % KEYS;
        tokio::join!(without.change(id), with.change(id));
    }
    for side in [&without, &with] {
        assert!(
            wait_until(LONG_PATIENCE, || async { side.db.outbox_rows().await == 0 }).await,
            "the outbox did not drain"
        );
    }
    // The last guard passes run after the outbox drained: they count too.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let without = without.passes_now().await - before.0;
    let with = with.passes_now().await - before.1;
    println!("passes under load: {with} with the refill guard, {without} without");
    assert!(without > 0.0, "no pass was counted");
    assert!(
        with <= without * 1.25 + 2.0,
        "the guard added passes: {with} with it, {without} without"
    );
}
