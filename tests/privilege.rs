//! Least privilege: `install` runs as the schema owner; `run` works as a role that can
//! only read and delete in the outbox schema, plus what `SELECT … FOR UPDATE` needs and `INSERT`
//! into the dead letters. The GRANTs here are the ones docs/guarantees.md documents. The app's
//! request functions (`invalidate_user` / `invalidate_report`) are callable only by the roles that
//! may write a ruled table, the tables' owners, and the roles named with `install --grant-to`.

mod common;

use common::*;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

/// What the worker's role gets (docs/guarantees.md, "Least privilege").
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

/// Drops the test's roles, once the test's databases (their grants) are gone.
async fn drop_roles(roles: &[&str]) {
    let statements: String = roles
        .iter()
        .map(|role| format!("DROP ROLE {role};"))
        .collect();
    connect(&admin_database_url())
        .await
        .batch_execute(&statements)
        .await
        .expect("drop roles");
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
    let space = KeyPrefix::new("privilege");
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
    let must_go = space.keys(&["report:12:1:h", "reportlist:reports:1:h"]);
    let decoys = space.keys(&["report:123:1:h", "reportlist:reports:11:h"]);
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
    drop_roles(&[&role, &reader]).await;
}

/// The capture triggers are `SECURITY DEFINER` without a `SET search_path` (it cost a single-row
/// UPDATE ~30-85 µs of CPU), so they run with the caller's search_path. A caller that puts its own operators and
/// functions before `pg_catalog` must not change what they record: here a `+` that subtracts (the
/// slices of the column arrays), an `=` on text that is never true (the `TG_OP` tests) and a
/// `cardinality` that says 0 (the chunk count), created by the app's own (non-superuser) role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_search_path_does_not_change_what_the_trigger_records() {
    let (space, db) = space_with_reports("hostile").await;
    let app = unique("ci_app").to_lowercase();
    let owner = db.client().await;
    owner
        .batch_execute(&format!(
            r#"CREATE ROLE {app} LOGIN;
               GRANT CREATE ON DATABASE "{database}" TO {app};
               GRANT SELECT, UPDATE, DELETE ON reports_report TO {app};
               INSERT INTO auth_user (id) SELECT generate_series(1, 5);
               INSERT INTO reports_report (id, author_id) SELECT g, 1 FROM generate_series(1, 70) g;
               INSERT INTO reports_report (id, author_id) VALUES (100, 2), (101, 4);
               DELETE FROM cache_invalidator.outbox;"#,
            database = db.name
        ))
        .await
        .expect("role and fixture");

    let hostile = connect(&role_url(&app, &db.name)).await;
    hostile
        .batch_execute(
            "CREATE SCHEMA hostile;
             CREATE FUNCTION hostile.minus_1000(int, int) RETURNS int
                 LANGUAGE sql IMMUTABLE AS 'SELECT $1 - 1000';
             CREATE OPERATOR hostile.+ (LEFTARG = int, RIGHTARG = int, FUNCTION = hostile.minus_1000);
             CREATE FUNCTION hostile.never(text, text) RETURNS boolean
                 LANGUAGE sql IMMUTABLE AS 'SELECT false';
             CREATE OPERATOR hostile.= (LEFTARG = text, RIGHTARG = text, FUNCTION = hostile.never);
             CREATE FUNCTION hostile.cardinality(anyarray) RETURNS int
                 LANGUAGE sql IMMUTABLE AS 'SELECT 0';
             SET search_path = hostile, pg_catalog, public;",
        )
        .await
        .expect("hostile objects");
    // They do win name resolution in this session, so the statements below would see them.
    let row = hostile
        .query_one(
            "SELECT 1 + 63, 'UPDATE' = 'UPDATE', cardinality(ARRAY[1, 2])",
            &[],
        )
        .await
        .expect("probe the hostile objects");
    assert_eq!(
        (
            row.get::<_, i32>(0),
            row.get::<_, bool>(1),
            row.get::<_, i32>(2)
        ),
        (-999, false, 0)
    );
    hostile
        .batch_execute(
            "UPDATE reports_report SET author_id = 3 WHERE id = 100;
             UPDATE reports_report SET title = 'edited' WHERE author_id = 1;
             DELETE FROM reports_report WHERE id = 101;",
        )
        .await
        .expect("the app's writes");

    // What the outbox holds, before any worker runs: the right operations, chunks of at most 64
    // values, and every value of every changed row.
    let sql = "SELECT op, coalesce(jsonb_array_length(rows -> 'id'), -1) \
               FROM cache_invalidator.outbox ORDER BY 1, 2";
    let chunks: Vec<(String, i32)> = pairs(&owner, sql).await;
    let chunk = |op: &str, values: i32| (op.to_owned(), values);
    assert_eq!(
        chunks,
        [
            chunk("DELETE", 1),
            chunk("UPDATE", 2),
            chunk("UPDATE", 6),
            chunk("UPDATE", 64)
        ]
    );
    let recorded: Vec<(String, i32, i32)> = owner
        .query(
            "SELECT o.op, p.id::int, p.author_id::int FROM cache_invalidator.outbox o, \
             ROWS FROM (jsonb_array_elements_text(o.rows -> 'id'), \
                        jsonb_array_elements_text(o.rows -> 'author_id')) AS p(id, author_id) \
             ORDER BY 1, 2, 3",
            &[],
        )
        .await
        .expect("outbox values")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let mut expected = vec![("DELETE".to_owned(), 101, 4)];
    expected.extend((1..=70).map(|id| ("UPDATE".to_owned(), id, 1)));
    expected.push(("UPDATE".to_owned(), 100, 2));
    expected.push(("UPDATE".to_owned(), 100, 3));
    assert_eq!(recorded, expected);

    // And the worker clears exactly those keys.
    let mut redis = redis_connection(&shared_redis_url()).await;
    // Reports at both ends of each chunk, and every author whose reports changed.
    let mut must_go: Vec<String> = [100, 101, 1, 64, 65, 70]
        .iter()
        .map(|id| space.key(&format!("report:{id}:1:h")))
        .collect();
    must_go.extend((1..=4).map(|author| space.key(&format!("reportlist:reports:{author}:h"))));
    let mut decoys = space.keys(&["report:71:1:h", "report:102:1:h", "reportlist:reports:5:h"]);
    decoys.push(space.key_v2("report:100:1:h"));
    set_keys(&mut redis, &[must_go.clone(), decoys.clone()].concat()).await;
    let daemon = Daemon::start(test_settings(&db.url, &shared_redis_url(), space.rules()));
    assert_gone_within(&mut redis, &must_go, PATIENCE).await;
    db.wait_for_empty_outbox(PATIENCE).await;
    assert_eq!(db.dead_letters().await, 0);
    assert_kept(&mut redis, &decoys).await;
    daemon.stop().await;
    drop((hostile, owner));
    db.drop().await;
    drop_roles(&[&app]).await;
}

/// Runs the `cache-invalidator` binary against `db` with the report rules of `space`.
async fn cli(db: &TestDb, rules: &RulesFile, args: &[&str]) -> std::process::Output {
    let rules_path = rules.path.to_str().expect("utf-8 path");
    let mut full = vec!["--rules", rules_path];
    full.extend_from_slice(args);
    let redis_url = shared_redis_url();
    run_cli(
        &full,
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("REDIS_URL", redis_url.as_str()),
        ],
    )
    .await
}

/// A BI reader with only SELECT cannot flood the outbox through the request functions; a role with
/// only UPDATE on one ruled table writes as before (the capture trigger is SECURITY DEFINER) and
/// may call them; a `--grant-to` role may too. A role granted writes after `install` is named by
/// `check` until `install` runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_roles_that_may_write_a_ruled_table_can_request_invalidations() {
    let space = KeyPrefix::new("req_grants");
    let rules = RulesFile::default_for(&space, "");
    let db = TestDb::with_reports("req_grants", &space.rules()).await;
    let base = unique("ci_req").to_lowercase();
    let [reader, updater, jobs, late] =
        ["reader", "updater", "jobs", "late"].map(|r| format!("{base}_{r}"));
    let owner = db.client().await;
    owner
        .batch_execute(&format!(
            "CREATE ROLE {reader} LOGIN; CREATE ROLE {updater} LOGIN;
             CREATE ROLE {jobs} LOGIN; CREATE ROLE {late} LOGIN;
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO {reader};
             GRANT UPDATE ON reports_report TO {updater};
             INSERT INTO auth_user (id) VALUES (1), (2);
             INSERT INTO reports_report (id, author_id) VALUES (12, 1);
             DELETE FROM cache_invalidator.outbox;"
        ))
        .await
        .expect("roles and fixture");
    let installed = cli(&db, &rules, &["install", "--grant-to", &jobs]).await;
    assert!(installed.status.success(), "{}", stderr(&installed));

    let read_only = connect(&role_url(&reader, &db.name)).await;
    for sql in [
        "SELECT cache_invalidator.invalidate_user(g) FROM generate_series(1, 1000) g",
        "SELECT cache_invalidator.invalidate_user('7')",
        "SELECT cache_invalidator.invalidate_report(7)",
        "SELECT cache_invalidator.invalidate_report('7')",
    ] {
        assert_denied(&read_only, sql).await;
    }
    assert_eq!(db.outbox_rows().await, 0, "a denied call left outbox rows");

    // UPDATE on one table and nothing else: no WHERE clause, so not even SELECT is needed.
    let app = connect(&role_url(&updater, &db.name)).await;
    app.batch_execute("UPDATE reports_report SET author_id = 2")
        .await
        .expect("the app's own write");
    let after_write = db.outbox_rows().await;
    assert!(after_write >= 1, "the trigger recorded nothing");
    app.batch_execute("SELECT cache_invalidator.invalidate_user(5)")
        .await
        .expect("a writer may request");
    let worker_jobs = connect(&role_url(&jobs, &db.name)).await;
    worker_jobs
        .batch_execute("SELECT cache_invalidator.invalidate_report('7')")
        .await
        .expect("a --grant-to role may request");
    assert_eq!(db.outbox_rows().await, after_write + 2);

    let checked = cli(&db, &rules, &["check"]).await;
    assert!(checked.status.success(), "{}", stdout(&checked));
    assert!(
        stdout(&checked).contains("ok    grants:"),
        "{}",
        stdout(&checked)
    );

    // Writes granted after install: `check` names the role and the table until install re-runs.
    owner
        .batch_execute(&format!("GRANT INSERT ON reports_studentreport TO {late}"))
        .await
        .expect("late grant");
    let checked = cli(&db, &rules, &["check"]).await;
    let report = stdout(&checked);
    assert!(!checked.status.success(), "{report}");
    assert!(
        report.contains(&format!("role {late} may write reports_studentreport")),
        "{report}"
    );
    let reinstalled = cli(&db, &rules, &["install"]).await;
    assert!(reinstalled.status.success(), "{}", stderr(&reinstalled));
    let checked = cli(&db, &rules, &["check"]).await;
    assert!(checked.status.success(), "{}", stdout(&checked));
    let late_app = connect(&role_url(&late, &db.name)).await;
    late_app
        .batch_execute("SELECT cache_invalidator.invalidate_user(9)")
        .await
        .expect("a late writer may request after install re-ran");

    drop((read_only, app, worker_jobs, late_app, owner));
    db.drop().await;
    drop_roles(&[&reader, &updater, &jobs, &late]).await;
}

/// A misspelt `--grant-to` role stops `install` before anything is created.
#[tokio::test]
async fn install_refuses_a_grant_to_role_that_does_not_exist() {
    let space = KeyPrefix::new("req_norole");
    let rules = RulesFile::default_for(&space, "");
    let db = TestDb::empty("req_norole").await;
    let client = db.client().await;
    client
        .batch_execute(REPORT_TABLES_SQL)
        .await
        .expect("create tables");
    let missing = unique("ci_no_such_role").to_lowercase();
    let output = cli(&db, &rules, &["install", "--grant-to", &missing]).await;
    let text = stderr(&output);
    assert!(!output.status.success(), "{text}");
    assert!(
        text.contains(&format!("--grant-to \"{missing}\"")),
        "{text}"
    );
    assert!(text.contains("no such role"), "{text}");
    let schemas = count(
        &client,
        "SELECT count(*) FROM pg_namespace WHERE nspname = 'cache_invalidator'",
        &[],
    )
    .await;
    assert_eq!(schemas, 0, "install left a schema behind");
    let triggers = count(
        &client,
        "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal",
        &[],
    )
    .await;
    assert_eq!(triggers, 0, "install left triggers behind");
    drop(client);
    db.drop().await;
}
