//! A server whose `SCAN` cursor order is not known for certain is swept in one lane from cursor 0,
//! and its windows still clear every key they name, and only those.

mod common;

use std::time::Duration;

use cache_invalidator::redis_nodes::{CursorOrder, RedisTarget};
use cache_invalidator::sweep::{Sweeper, LANES};
use cache_invalidator::window::PatternSpec;
use common::*;

/// Keys of the report the window clears, and of its neighbours it must not touch.
const KEYS_PER_REPORT: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_an_unknown_cursor_order_gets_one_lane_that_clears_everything() {
    let space = KeyPrefix::new("order");
    let mut redis = redis_connection(&shared_redis_url()).await;
    let doomed: Vec<String> = (0..KEYS_PER_REPORT)
        .map(|i| space.key(&format!("report:5:{i}:h")))
        .collect();
    let kept: Vec<String> = (0..KEYS_PER_REPORT)
        .map(|i| space.key(&format!("report:55:{i}:h")))
        .collect();
    set_keys(&mut redis, &[doomed.clone(), kept.clone()].concat()).await;

    let target =
        RedisTarget::parse(&shared_redis_url(), None, Duration::from_secs(5)).expect("url");
    let mut nodes = target.connect().await.expect("connect");
    // The shared server is a Redis whose order is known: four lanes.
    assert_ne!(nodes[0].cursor_order, CursorOrder::Unknown);
    assert_eq!(Sweeper::new(nodes.clone()).lane_count(), LANES);
    // As it is read from a server of a release nobody checked.
    let future = "# Server\r\nredis_version:99.0.0\r\nredis_mode:standalone\r\n";
    nodes[0].cursor_order = CursorOrder::from_info(future, "cluster_enabled:0\r\n");
    assert_eq!(nodes[0].cursor_order, CursorOrder::Unknown);
    let mut sweeper = Sweeper::new(nodes);
    assert_eq!(sweeper.lane_count(), 1);

    let pattern = format!("{}report:5:*", space.key_prefix());
    sweeper.add_window(
        &[PatternSpec {
            pattern: pattern.as_str().into(),
            label: "reports_report".into(),
        }],
        false,
    );
    let mut deleted = 0;
    while sweeper.is_busy() {
        let report = tokio::time::timeout(Duration::from_secs(30), sweeper.step())
            .await
            .expect("a step within 30 s")
            .expect("sweep step");
        deleted += report.deleted.values().sum::<u64>();
    }
    assert_eq!(deleted, KEYS_PER_REPORT as u64);
    let left = keys_with_prefix(&mut redis, &space.key_prefix()).await;
    assert_eq!(left, kept.iter().cloned().collect());

    let mut cleanup = redis::pipe();
    for key in &kept {
        cleanup.cmd("UNLINK").arg(key).ignore();
    }
    let () = cleanup.query_async(&mut redis).await.expect("cleanup");
}
