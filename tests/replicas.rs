//! Replicas before the acknowledgement: where a Redis node has replicas, an
//! outbox row is deleted only once they have the change's deletes (`WAIT`), so a failover cannot
//! bring back keys whose outbox rows are gone; where it has none, nothing waits.
//!
//! A private primary with a private replica; the replica is frozen with SIGSTOP, which holds its
//! replication back (it neither reads the stream nor acknowledges it) while the primary keeps the
//! link.

mod common;

use std::time::Duration;

use common::*;
use redis::aio::MultiplexedConnection;

/// While the replica is frozen, the row must stay this long: several `WAIT` timeouts (1 s each).
const HELD_FOR: Duration = Duration::from_secs(4);

async fn info_field(connection: &mut MultiplexedConnection, section: &str, name: &str) -> String {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(connection)
        .await
        .expect("INFO");
    info.lines()
        .find_map(|line| line.trim_end().strip_prefix(&format!("{name}:")))
        .unwrap_or_default()
        .to_owned()
}

/// Waits until the replica's link to its primary is up (it has synchronised).
async fn wait_for_link(on_replica: &MultiplexedConnection) {
    assert!(
        wait_until(PATIENCE, || {
            let mut on_replica = on_replica.clone();
            async move { info_field(&mut on_replica, "replication", "master_link_status").await == "up" }
        })
        .await,
        "the replica never synchronised"
    );
}

/// Commits one UPDATE of report `id`.
async fn change(db: &TestDb, id: i32) {
    db.client()
        .await
        .batch_execute(&format!(
            "UPDATE reports_report SET title = 'new' WHERE id = {id}"
        ))
        .await
        .expect("change a report");
}

/// With the replica frozen, a change of report 1: its keys `must_go` leave the primary, but the
/// outbox row stays while the replica cannot confirm the delete; once the replica is thawed the
/// change is acknowledged, and the replica no longer has the keys.
async fn change_held_until_the_replica_has_it(
    db: &TestDb,
    replica: &PrivateRedis,
    on_primary: &mut MultiplexedConnection,
    on_replica: &mut MultiplexedConnection,
    must_go: &[String],
) {
    replica.signal("STOP");
    change(db, 1).await;
    // The primary has the delete: the daemon ran and UNLINKed the keys...
    assert_gone_within(on_primary, must_go, PATIENCE).await;
    // ...but the row stays while the replica cannot confirm it.
    let acknowledged = wait_until(HELD_FOR, || async { db.outbox_rows().await == 0 }).await;
    assert!(
        !acknowledged,
        "the change was acknowledged while its replica did not have the delete"
    );
    assert_eq!(db.outbox_rows().await, 1);

    replica.signal("CONT");
    assert!(
        wait_until(PATIENCE, || async { db.outbox_rows().await == 0 }).await,
        "the change was never acknowledged after the replica caught up"
    );
    // Acknowledged means the replica has it.
    for key in must_go {
        assert!(
            !exists(on_replica, key).await,
            "{key} is still on the replica after the acknowledgement"
        );
    }
}

async fn seeded_db(tag: &str, space: &KeyPrefix) -> TestDb {
    let db = TestDb::with_reports(tag, &space.rules()).await;
    db.client()
        .await
        .batch_execute(
            "INSERT INTO auth_user (id) VALUES (1), (2);
             INSERT INTO reports_report (id, author_id) VALUES (1, 1), (2, 2);
             DELETE FROM cache_invalidator.outbox;",
        )
        .await
        .expect("seed reports");
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_row_stays_until_the_replica_has_the_delete() {
    let space = KeyPrefix::new("replica");
    let db = seeded_db("replica", &space).await;
    let primary = PrivateRedis::start();
    let replica = PrivateRedis::replica_of(primary.port);
    let mut on_primary = redis_connection(&primary.url()).await;
    let mut on_replica = redis_connection(&replica.url()).await;
    wait_for_link(&on_replica).await;
    let must_go = space.keys(&["report:1:7:h", "reportlist:reports:1:p1"]);
    let decoys = space.keys(&["report:2:7:h", "reportlist:reports:2:p1"]);
    set_keys(&mut on_primary, &[&must_go[..], &decoys].concat()).await;
    assert!(
        wait_until(PATIENCE, || {
            let mut on_replica = on_replica.clone();
            let key = must_go[0].clone();
            async move { exists(&mut on_replica, &key).await }
        })
        .await,
        "the keys never reached the replica"
    );

    let daemon = Daemon::start(test_settings(&db.url, &primary.url(), space.rules()));
    // The daemon has connected (and counted the replica) once it clears a first change.
    change(&db, 2).await;
    assert!(
        wait_until(PATIENCE, || async { db.outbox_rows().await == 0 }).await,
        "the daemon never cleared a first change"
    );
    set_keys(&mut on_primary, &decoys).await;

    change_held_until_the_replica_has_it(&db, &replica, &mut on_primary, &mut on_replica, &must_go)
        .await;
    assert_kept(&mut on_primary, &decoys).await;
    assert_kept(&mut on_replica, &decoys).await;
    daemon.stop().await;
    db.drop().await;
}

/// A replica that attaches after the daemon connected (and counted none) must have the deletes
/// before a change is acknowledged: in index mode the deletes go on the tracking connection, where
/// no replica was counted, and the daemon waits for the replica on that connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_attaches_later_has_the_deletes_before_the_acknowledgement() {
    let space = KeyPrefix::new("latereplica");
    let db = seeded_db("latereplica", &space).await;
    let primary = PrivateRedis::start();
    let mut on_primary = redis_connection(&primary.url()).await;
    let daemon = Daemon::start(test_settings(&db.url, &primary.url(), space.rules()));
    // Connected, with no replica counted, once it clears a first change.
    change(&db, 2).await;
    assert!(
        wait_until(PATIENCE, || async { db.outbox_rows().await == 0 }).await,
        "the daemon never cleared a first change"
    );

    let replica = PrivateRedis::replica_of(primary.port);
    let mut on_replica = redis_connection(&replica.url()).await;
    wait_for_link(&on_replica).await;
    let must_go = space.keys(&["report:1:7:h", "reportlist:reports:1:p1"]);
    let decoys = space.keys(&["report:2:7:h"]);
    set_keys(&mut on_primary, &[&must_go[..], &decoys].concat()).await;
    assert!(
        wait_until(PATIENCE, || {
            let mut on_replica = on_replica.clone();
            let key = must_go[0].clone();
            async move { exists(&mut on_replica, &key).await }
        })
        .await,
        "the keys never reached the replica"
    );

    change_held_until_the_replica_has_it(&db, &replica, &mut on_primary, &mut on_replica, &must_go)
        .await;
    assert_kept(&mut on_primary, &decoys).await;
    daemon.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_replicas_nothing_waits() {
    let space = KeyPrefix::new("noreplica");
    let db = seeded_db("noreplica", &space).await;
    let redis = PrivateRedis::start();
    let mut connection = redis_connection(&redis.url()).await;
    let must_go = space.keys(&["report:1:7:h", "reportlist:reports:1:p1"]);
    let decoys = space.keys(&["report:2:7:h"]);
    set_keys(&mut connection, &[&must_go[..], &decoys].concat()).await;

    let daemon = Daemon::start(test_settings(&db.url, &redis.url(), space.rules()));
    change(&db, 1).await;
    assert_gone_within(&mut connection, &must_go, PATIENCE).await;
    assert!(
        wait_until(PATIENCE, || async { db.outbox_rows().await == 0 }).await,
        "the change was never acknowledged"
    );
    assert_kept(&mut connection, &decoys).await;
    // The server never saw a WAIT: no replica, nothing to wait for.
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .expect("INFO commandstats");
    assert!(
        stats.contains("cmdstat_unlink:") && !stats.contains("cmdstat_wait:"),
        "{stats}"
    );
    daemon.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_replicas_says_whether_the_replicas_have_the_connections_writes() {
    use cache_invalidator::replicas::{confirm_replicas, ReplicaPolicy};
    let primary = PrivateRedis::start();
    let replica = PrivateRedis::replica_of(primary.port);
    let mut on_primary = redis_connection(&primary.url()).await;
    let mut on_replica = redis_connection(&replica.url()).await;
    wait_for_link(&on_replica).await;
    let every = ReplicaPolicy {
        acks: None,
        timeout: Duration::from_millis(300),
        floor: 0,
    };
    let key = unique("confirm");
    set_keys(&mut on_primary, std::slice::from_ref(&key)).await;
    let confirmation = confirm_replicas(&mut on_primary, every)
        .await
        .expect("WAIT");
    assert!(confirmation.confirmed(), "{confirmation:?}");
    assert_eq!(confirmation.required, 1);
    assert!(exists(&mut on_replica, &key).await);

    replica.signal("STOP");
    let () = redis::cmd("UNLINK")
        .arg(&key)
        .query_async::<i64>(&mut on_primary)
        .await
        .map(|_| ())
        .expect("UNLINK");
    let confirmation = confirm_replicas(&mut on_primary, every)
        .await
        .expect("WAIT");
    assert!(!confirmation.confirmed(), "{confirmation:?}");
    replica.signal("CONT");
    let confirmation = confirm_replicas(&mut on_primary, every)
        .await
        .expect("WAIT");
    assert!(confirmation.confirmed(), "{confirmation:?}");
    assert!(!exists(&mut on_replica, &key).await);

    // None asked for: no WAIT is sent.
    let none = ReplicaPolicy {
        acks: Some(0),
        timeout: Duration::from_millis(300),
        floor: 0,
    };
    let confirmation = confirm_replicas(&mut on_primary, none)
        .await
        .expect("no WAIT");
    assert_eq!((confirmation.acked, confirmation.required), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_wait_longer_than_half_the_redis_timeout_is_refused_at_start() {
    let output = daemon_command(&[
        "run",
        "--replica-wait-timeout",
        "3s",
        "--redis-timeout",
        "5s",
    ])
    .env_remove("CACHE_INVALIDATOR_REPLICA_WAIT_TIMEOUT")
    .output()
    .await
    .expect("run cache-invalidator");
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.contains("replica wait timeout 3s must be at most half the redis timeout 5s"),
        "{message}"
    );
}
