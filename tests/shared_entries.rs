//! Two pattern texts that compile to the same matcher entry (`…:5:*` and `…:5:**`) each keep
//! their own registration in the sweep: when the first window finishes, the second still clears
//! the keys it is responsible for.

mod common;

use std::time::Duration;

use cache_invalidator::redis_nodes::RedisTarget;
use cache_invalidator::sweep::{Sweeper, SCAN_COUNT};
use cache_invalidator::window::PatternSpec;
use common::*;

/// Other keys, so a pass takes many `SCAN` calls (20,000 keys fill a table of 32,768 buckets).
const FILLER_KEYS: usize = 20_000;
/// Report keys written mid-pass: about half land behind the cursor, where only the second
/// window's remaining round can find them.
const LATE_KEYS: usize = 400;
/// Steps into the first window's pass before the late keys are written: about half the pass
/// (32,768 buckets, `SCAN_COUNT` of them a step).
const STEPS_BEFORE_LATE_KEYS: usize = 32_768 / SCAN_COUNT / 2;

fn spec(pattern: &str) -> Vec<PatternSpec> {
    vec![PatternSpec {
        pattern: pattern.into(),
        label: "reports_report".into(),
    }]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_still_clears_its_keys_after_one_sharing_its_entry_finished() {
    // A private server: how far into a pass the steps get depends on the keys it holds.
    let server = PrivateRedis::start();
    let space = KeyPrefix::new("shared");
    let mut redis = redis_connection(&server.url()).await;
    let filler: Vec<String> = (0..FILLER_KEYS)
        .map(|i| space.key(&format!("report:9{i}:1:h")))
        .collect();
    set_keys(&mut redis, &filler).await;

    let target = RedisTarget::parse(&server.url(), None, Duration::from_secs(5)).expect("url");
    let nodes = target.connect().await.expect("connect");
    // One lane: the steps follow one cursor through the pass.
    let mut sweeper = Sweeper::with_lanes(nodes, 1);
    let first = format!("{}report:5:*", space.key_prefix());
    let second = format!("{}report:5:**", space.key_prefix());
    let first_window = sweeper.add_window(&spec(&first), false).expect("a window");
    for _ in 0..STEPS_BEFORE_LATE_KEYS {
        sweeper.step().await.expect("step");
    }
    // Changes committed now: their keys exist when the second window joins.
    let late: Vec<String> = (0..LATE_KEYS)
        .map(|i| space.key(&format!("report:5:{i}:h")))
        .collect();
    set_keys(&mut redis, &late).await;
    sweeper.add_window(&spec(&second), false).expect("a window");

    let mut first_finished = false;
    while sweeper.is_busy() {
        let report = tokio::time::timeout(Duration::from_secs(30), sweeper.step())
            .await
            .expect("a step within 30 s")
            .expect("step");
        if report.finished.iter().any(|w| w.id == first_window) {
            first_finished = true;
        }
    }
    assert!(first_finished);
    let left = keys_with_prefix(&mut redis, &space.key("report:5:")).await;
    assert!(
        left.is_empty(),
        "{} of the {LATE_KEYS} keys the second window had to clear are left, e.g. {:?}",
        left.len(),
        left.iter().take(3).collect::<Vec<_>>()
    );
}
