//! The core data path against real Postgres and Redis: committed changes clear exactly the keys the
//! rules name, and nothing else.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_clears_the_report_and_its_authors_list_only() {
    let space = KeySpace::new("insert");
    let db = TestDb::with_reports("insert", &space.rules()).await;
    let mut redis = redis_connection(&shared_redis_url()).await;
    let must_go = vec![
        space.key("report:12:1:h1"),
        space.key("report:12:2:h2"),
        space.key("reportlist:reports:1:h"),
    ];
    let decoys = vec![
        space.key("report:123:1:h"),
        space.key("studentreport:12:1:h"),
        space.key("reportarchive:12:1:h"),
        space.key_v2("report:12:1:h1"),
        space.key("reportlist:reports:11:h"),
        space.key("cache_stats:1"),
    ];
    set_keys(&mut redis, &[must_go.clone(), decoys.clone()].concat()).await;
    let daemon = Daemon::start(test_settings(&db.url, &shared_redis_url(), space.rules()));

    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO auth_user (id) VALUES (1);
             INSERT INTO reports_report (id, author_id) VALUES (12, 1);",
        )
        .await
        .expect("insert");

    assert_gone_within(&mut redis, &must_go, Duration::from_secs(30)).await;
    assert_kept(&mut redis, &decoys).await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            db.outbox_rows().await == 0
        })
        .await
    );
    daemon.stop().await;
    db.drop().await;
}
