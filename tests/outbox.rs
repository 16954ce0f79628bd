//! The worker's claims on the outbox against a real Postgres, below the daemon: what happens when
//! every claim connection already holds an epoch, and to a row that commits after a higher id was
//! claimed.

mod common;

use cache_invalidator::outbox::{Outbox, EPOCH_CONNECTIONS};
use cache_invalidator::postgres::PgTarget;
use cache_invalidator::rules::RuleSet;
use common::*;
use std::time::Duration;
use tokio_postgres::Client;

/// The ids left in the outbox, as another session sees them (committed state only).
async fn outbox_ids(client: &Client) -> Vec<i64> {
    client
        .query("SELECT id FROM cache_invalidator.outbox ORDER BY id", &[])
        .await
        .expect("read the outbox")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// With every connection holding an epoch, a claim goes into the newest epoch instead of
/// waiting; that epoch then commits only after both of its windows are acknowledged, and rows of
/// the other epochs stay in the outbox until theirs are.
#[tokio::test]
async fn a_claim_with_every_connection_busy_joins_the_newest_epoch() {
    let db = TestDb::with_reports("outbox_overflow", &RuleSet::builtin()).await;
    let observer = db.client().await;
    let rows = EPOCH_CONNECTIONS as i64 + 1;
    observer
        .batch_execute(&format!(
            "INSERT INTO cache_invalidator.outbox (table_name, op, rows) \
             SELECT 'reports_report', 'UPDATE', jsonb_build_object('id', jsonb_build_array(g)) \
             FROM generate_series(1, {rows}) g"
        ))
        .await
        .expect("fill the outbox");
    let all_ids = outbox_ids(&observer).await;
    assert_eq!(all_ids.len() as i64, rows);

    let target = PgTarget::parse(&db.url)
        .expect("db url")
        .with_default_application_name("outbox test");
    let mut outbox = Outbox::new(target);
    // Every claim opens a new epoch while a connection is free.
    outbox.set_epoch_open_for(Duration::ZERO);
    let mut epochs = Vec::new();
    for expected in &all_ids[..EPOCH_CONNECTIONS] {
        let claim = outbox.claim(1).await.expect("claim");
        let claimed: Vec<i64> = claim.rows.iter().map(|row| row.id).collect();
        assert_eq!(claimed, vec![*expected], "claims take the oldest row first");
        assert!(!epochs.contains(&claim.epoch), "a new epoch per claim");
        epochs.push(claim.epoch);
    }
    assert_eq!(outbox.epochs_in_flight(), EPOCH_CONNECTIONS);

    let newest = *epochs.last().expect("twelve epochs");
    let overflow = outbox
        .claim(1)
        .await
        .expect("claim with every connection busy");
    let claimed: Vec<i64> = overflow.rows.iter().map(|row| row.id).collect();
    assert_eq!(claimed, vec![all_ids[EPOCH_CONNECTIONS]]);
    assert_eq!(
        overflow.epoch, newest,
        "the overflow claim joins the newest epoch"
    );
    assert_eq!(outbox.epochs_in_flight(), EPOCH_CONNECTIONS);

    // The newest epoch's first window is done: its row is deleted inside the still-open epoch,
    // so the outbox still holds it for everyone else.
    let acked = outbox.ack(newest, &[]).await.expect("ack the first window");
    assert!(!acked.lost_claim);
    assert!(
        outbox.holds(newest),
        "the epoch waits for its second window"
    );
    assert_eq!(outbox_ids(&observer).await, all_ids);

    // Its second window is done: the epoch commits and both rows leave the outbox, nothing else.
    outbox
        .ack(newest, &[])
        .await
        .expect("ack the overflow window");
    assert!(!outbox.holds(newest));
    assert_eq!(
        outbox_ids(&observer).await,
        all_ids[..EPOCH_CONNECTIONS - 1].to_vec()
    );

    // The other epochs give their rows back, and a fresh claim finds every one of them.
    outbox.release_all().await;
    assert_eq!(outbox.epochs_in_flight(), 0);
    outbox.set_epoch_open_for(Duration::from_secs(60));
    let again = outbox.claim(100).await.expect("claim after the release");
    let claimed: Vec<i64> = again.rows.iter().map(|row| row.id).collect();
    assert_eq!(claimed, all_ids[..EPOCH_CONNECTIONS - 1].to_vec());
    outbox.release_all().await;
    db.drop().await;
}

/// A row whose transaction took its id before another's but committed after it is skipped by the
/// epoch's later claims (they continue after the highest id claimed). Once that epoch stops
/// taking claims a recheck is due, and the next claim, in a new epoch, takes the late row.
#[tokio::test]
async fn a_row_committed_late_below_the_claimed_ids_is_claimed_once_its_epoch_closes() {
    let db = TestDb::with_reports("outbox_late_row", &RuleSet::builtin()).await;
    let late_writer = db.client().await;
    let writer = db.client().await;
    let insert = |id: i32| {
        format!(
            "INSERT INTO cache_invalidator.outbox (table_name, op, rows) \
             VALUES ('reports_report', 'UPDATE', jsonb_build_object('id', jsonb_build_array({id})))"
        )
    };
    late_writer
        .batch_execute(&format!("BEGIN; {}", insert(1)))
        .await
        .expect("the late writer takes the first id");
    writer
        .batch_execute(&insert(2))
        .await
        .expect("the other writer commits the second id");

    let target = PgTarget::parse(&db.url)
        .expect("db url")
        .with_default_application_name("outbox test");
    let mut outbox = Outbox::new(target);
    outbox.set_epoch_open_for(Duration::from_secs(3_600));
    let first = outbox.claim(100).await.expect("first claim");
    let first_ids: Vec<i64> = first.rows.iter().map(|row| row.id).collect();
    let all_ids = outbox_ids(&writer).await;
    assert_eq!(first_ids, all_ids, "only the committed row is claimed");
    assert_eq!(
        outbox.recheck_due_at(),
        None,
        "a new epoch reads from the start"
    );

    late_writer
        .batch_execute("COMMIT")
        .await
        .expect("commit late");
    let late_id = outbox_ids(&writer)
        .await
        .into_iter()
        .find(|id| !first_ids.contains(id))
        .expect("the late row is in the outbox");
    assert!(late_id < first_ids[0], "the late row's id is the lower one");

    let second = outbox.claim(100).await.expect("claim into the open epoch");
    assert_eq!(second.epoch, first.epoch);
    assert!(second.rows.is_empty(), "the open epoch skips the late row");
    let due = outbox
        .recheck_due_at()
        .expect("a recheck once the epoch closes");
    assert!(
        due > std::time::Instant::now(),
        "not while the epoch takes claims"
    );

    // The epoch stops taking claims (here at once): the recheck is due.
    outbox.set_epoch_open_for(Duration::ZERO);
    assert!(outbox
        .recheck_due_at()
        .is_some_and(|at| at <= std::time::Instant::now()));
    let third = outbox.claim(100).await.expect("the recheck's claim");
    assert_ne!(third.epoch, first.epoch, "the recheck opens a new epoch");
    let third_ids: Vec<i64> = third.rows.iter().map(|row| row.id).collect();
    assert_eq!(third_ids, vec![late_id]);
    assert_eq!(outbox.recheck_due_at(), None);
    outbox.release_all().await;
    db.drop().await;
}
