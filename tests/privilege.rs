//! Least privilege (issue 4): `install` runs as the schema owner; `run` works as a role that can
//! only read and delete in the outbox schema, plus what `SELECT … FOR UPDATE` needs and `INSERT`
//! into the dead letters. The GRANTs here are the ones the README documents.

mod common;

use std::time::Duration;

use common::*;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

const PATIENCE: Duration = Duration::from_secs(30);

/// What the worker's role gets (README, "Guarantees and failure modes").
fn worker_grants(role: &str, database: &str) -> String {
    format!(
        r#"GRANT CONNECT ON DATABASE "{database}" TO {role};
GRANT USAGE ON SCHEMA cache_invalidator TO {role};
GRANT SELECT, DELETE ON cache_invalidator.outbox TO {role};
GRANT UPDATE (id) ON cache_invalidator.outbox TO {role};
GRANT SELECT, INSERT ON cache_invalidator.dead_letters TO {role};"#
    )
}

fn role_url(role: &str, database: &str) -> String {
    let mut url = url::Url::parse(&admin_database_url()).expect("admin url");
    url.set_username(role).expect("username");
    url.set_password(None).expect("password");
    url.set_path(&format!("/{database}"));
    url.to_string()
}

async fn assert_denied(client: &Client, sql: &str) {
    match client.batch_execute(sql).await {
        Ok(()) => panic!("{sql:?} was allowed"),
        Err(error) => assert_eq!(
            error.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql:?}: {error:?}"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_runs_as_a_role_that_can_only_read_and_delete_the_outbox() {
    let space = KeySpace::new("privilege");
    // Installed by the owner (the test's superuser).
    let db = TestDb::with_reports("privilege", &space.rules()).await;
    let role = unique("ci_worker").to_lowercase();
    let reader = format!("{role}_reader");
    let owner = db.client().await;
    owner
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; CREATE ROLE {reader} LOGIN;
             {}
             GRANT SELECT ON cache_invalidator.outbox TO {reader};",
            worker_grants(&role, &db.name)
        ))
        .await
        .expect("create roles");

    // Claims lock rows: SELECT alone is not enough for FOR UPDATE.
    let read_only = connect(&role_url(&reader, &db.name)).await;
    assert_denied(
        &read_only,
        "SELECT id FROM cache_invalidator.outbox FOR UPDATE SKIP LOCKED",
    )
    .await;

    // The worker's role touches nothing else.
    let worker = connect(&role_url(&role, &db.name)).await;
    worker
        .batch_execute("SELECT id FROM cache_invalidator.outbox FOR UPDATE SKIP LOCKED")
        .await
        .expect("claim as the worker's role");
    for sql in [
        "INSERT INTO cache_invalidator.outbox (table_name, op) VALUES ('x', 'INSERT')",
        "UPDATE cache_invalidator.outbox SET op = 'DELETE'",
        "DELETE FROM cache_invalidator.dead_letters",
        "UPDATE cache_invalidator.dead_letters SET error = ''",
        "SELECT * FROM reports_report",
        "CREATE TABLE cache_invalidator.sneaky (id int)",
    ] {
        assert_denied(&worker, sql).await;
    }
    assert!(
        cache_invalidator::schema::install(&worker, &space.rules())
            .await
            .is_err(),
        "install must need the owner"
    );

    let mut redis = redis_connection(&shared_redis_url()).await;
    let must_go = vec![
        space.key("report:12:1:h"),
        space.key("reportlist:reports:1:h"),
    ];
    let decoys = vec![
        space.key("report:123:1:h"),
        space.key("reportlist:reports:11:h"),
    ];
    set_keys(&mut redis, &[must_go.clone(), decoys.clone()].concat()).await;
    let daemon = Daemon::start(test_settings(
        &role_url(&role, &db.name),
        &shared_redis_url(),
        space.rules(),
    ));
    owner
        .batch_execute(
            r#"INSERT INTO auth_user (id) VALUES (1);
               INSERT INTO reports_report (id, author_id) VALUES (12, 1);
               INSERT INTO cache_invalidator.outbox (table_name, op, rows)
                   VALUES ('reports_report', 'MERGE', '[{"id": 123, "author_id": 11}]');
               NOTIFY cache_invalidator;"#,
        )
        .await
        .expect("changes");
    assert_gone_within(&mut redis, &must_go, PATIENCE).await;
    // The garbage row went to the dead letters (INSERT there), everything left the outbox.
    assert!(
        wait_until(PATIENCE, || async {
            db.outbox_rows().await == 0 && db.dead_letters().await == 1
        })
        .await,
        "outbox {} rows, dead letters {}",
        db.outbox_rows().await,
        db.dead_letters().await
    );
    assert_kept(&mut redis, &decoys).await;
    daemon.stop().await;
    drop((worker, read_only, owner));
    db.drop().await;
    connect(&admin_database_url())
        .await
        .batch_execute(&format!("DROP ROLE {role}; DROP ROLE {reader};"))
        .await
        .expect("drop roles");
}
