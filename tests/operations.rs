//! What operators use, tested through the real binary as a child process: `/metrics` and
//! `/healthz` over HTTP, `check`, `invalidate --dry-run`, `explain`, SIGHUP reloads, the SQL
//! functions the app calls, systemd's notify socket and unit file, and secrets kept out of output.
//!
//! Metrics are scraped from a child process on a free port rather than in-process: the `metrics`
//! recorder is global to a process, so in-process daemons would share (and mix) their counters.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Output, Stdio};

use common::*;

/// A rules file in `dir`: the default rules with `key_prefix`, `reports_report`'s keys replaced by
/// `report_keys` when given.
fn write_rules(path: &Path, key_prefix: &str, report_keys: Option<&str>) {
    let mut text = default_rules_toml(key_prefix);
    if let Some(keys) = report_keys {
        text = text.replace(
            r#"keys = ["report:{id}:*", "reportlist:reports:{author_id}:*"]"#,
            &format!("keys = {keys}"),
        );
    }
    replace_file(path, &text);
}

/// Writes through a temporary file and a rename, as editors and config management do, so a
/// reload never reads half a file.
fn replace_file(path: &Path, text: &str) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text).expect("write rules");
    std::fs::rename(&temporary, path).expect("rename rules");
}

/// SIGHUP, then waits until the reloads that ended in `result` number `count`.
async fn reload(daemon: &ChildDaemon, result: &str, count: f64) {
    daemon.signal("HUP").await;
    let series = format!("cache_invalidator_rules_reloads_total{{result=\"{result}\"}}");
    daemon.wait_for_metric(&series, count).await;
}

/// Writes `keys`, inserts report `id` by user 1 and waits until the keys are gone.
async fn insert_and_clear(
    client: &tokio_postgres::Client,
    redis: &mut redis::aio::MultiplexedConnection,
    id: i32,
    keys: &[String],
) {
    set_keys(redis, keys).await;
    client
        .batch_execute(&format!(
            "INSERT INTO reports_report (id, author_id) VALUES ({id}, 1)"
        ))
        .await
        .unwrap_or_else(|e| panic!("insert {id}: {e}"));
    assert_gone_within(redis, keys, PATIENCE).await;
}

/// A key space and a database for `tag`, and a rules file with the default rules under its prefix.
async fn with_rules_file(tag: &str) -> (KeyPrefix, TestDb, RulesFile) {
    let (space, db) = space_with_reports(tag).await;
    let rules_file = RulesFile::default_for(&space, "");
    (space, db, rules_file)
}

fn lines_starting_with(text: &str, prefix: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| line.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_changes_and_the_keys_actually_deleted() {
    let (space, db, rules_file) = with_rules_file("metrics").await;
    let rules = rules_file.path.as_path();
    let mut redis = redis_connection(&shared_redis_url()).await;
    let must_go: Vec<String> = space.keys(&[
        "report:1:1:a",
        "report:1:2:b",
        "report:2:1:a",
        "report:3:4:x",
        "reportlist:reports:1:p1",
        "reportlist:reports:1:p2",
        "studentreport:1:2:a",
        "reportlist:student-reports:2:p1",
        "reportlist:student-reports:1:p1",
    ]);
    let decoys: Vec<String> =
        space.keys(&["report:10:1:a", "reportlist:reports:2:p1", "cache_stats:1"]);
    set_keys(&mut redis, &[must_go.clone(), decoys.clone()].concat()).await;
    let before = keys_with_prefix(&mut redis, &space.namespace).await.len();

    let daemon = ChildDaemon::worker(&db.url, &shared_redis_url(), rules, &FAST_POLL, true);
    daemon.wait_for_listener().await;
    db.client()
        .await
        .batch_execute(
            "INSERT INTO auth_user (id) VALUES (1), (2);
             INSERT INTO reports_report (id, author_id) VALUES (1, 1), (2, 1), (3, 1);
             INSERT INTO reports_studentreport (id, student_id, teacher_id) VALUES (1, 2, 1);",
        )
        .await
        .expect("insert");
    assert_gone_within(&mut redis, &must_go, PATIENCE).await;
    assert_kept(&mut redis, &decoys).await;
    let deleted = before - keys_with_prefix(&mut redis, &space.namespace).await.len();
    assert_eq!(deleted, must_go.len());

    // The listener refreshes gauges every 2 s and acks follow the deletes: wait for the counters.
    daemon
        .wait_for_metric(
            "cache_invalidator_changes_total{table=\"reports_report\"}",
            3.0,
        )
        .await;
    daemon
        .wait_for_metric(
            "cache_invalidator_changes_total{table=\"reports_studentreport\"}",
            1.0,
        )
        .await;
    daemon
        .wait_for_metric("cache_invalidator_outbox_backlog", 0.0)
        .await;
    let body = daemon.scrape().await;
    let by_table = |table: &str| {
        sample(
            &body,
            &format!("cache_invalidator_keys_deleted_total{{table=\"{table}\"}}"),
        )
    };
    assert_eq!(by_table("reports_report"), Some(6.0), "{body}");
    assert_eq!(by_table("reports_studentreport"), Some(3.0), "{body}");
    assert_eq!(by_table("reports_tutorweeklyreport"), Some(0.0), "{body}");
    let total: f64 = body
        .lines()
        .filter(|line| line.starts_with("cache_invalidator_keys_deleted_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(total, deleted as f64, "{body}");
    for series in [
        "cache_invalidator_refill_keys_deleted_total",
        "cache_invalidator_outbox_oldest_age_seconds",
        "cache_invalidator_dead_letters",
        "cache_invalidator_reconnects_total{side=\"postgres\"}",
        "cache_invalidator_reconnects_total{side=\"redis\"}",
    ] {
        assert!(sample(&body, series).is_some(), "{series} missing:\n{body}");
    }
    // Sweep mode clears by passes; index mode by lookups, once its index is seeded.
    if sample(&body, "cache_invalidator_mode{mode=\"sweep\"}") == Some(1.0) {
        assert!(sample(&body, "cache_invalidator_sweeps_total").is_some_and(|n| n >= 1.0));
        assert!(
            sample(&body, "cache_invalidator_sweep_duration_seconds_count")
                .is_some_and(|n| n >= 1.0)
        );
    } else {
        assert_eq!(
            sample(&body, "cache_invalidator_mode{mode=\"index\"}"),
            Some(1.0),
            "{body}"
        );
        assert!(
            sample(&body, "cache_invalidator_index_keys").is_some(),
            "{body}"
        );
    }
    // Two statements' outbox rows, each acknowledged once.
    assert!(
        sample(&body, "cache_invalidator_commit_to_delete_seconds_count").is_some_and(|n| n >= 2.0),
        "{body}"
    );
    assert!(body.contains("cache_invalidator_commit_to_delete_seconds_bucket{le=\"0.005\"}"));
    let build_info = body
        .lines()
        .find(|line| line.starts_with("cache_invalidator_build_info{"))
        .unwrap_or_else(|| panic!("no build info:\n{body}"));
    assert!(
        build_info.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            && build_info.contains(&format!("commit=\"{}\"", checkout_commit()))
            && build_info.ends_with(" 1"),
        "{build_info}"
    );

    assert!(daemon.stop().await.success());
    db.drop().await;
}

/// The `changes=N` fields of the `batch invalidated` log lines, summed.
fn logged_changes(log: &str) -> u64 {
    log.lines()
        .filter(|line| line.contains("batch invalidated"))
        .filter_map(|line| {
            let field = line
                .split_whitespace()
                .find(|f| f.starts_with("changes="))?;
            field.trim_start_matches("changes=").parse::<u64>().ok()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_counted_in_changed_rows_not_in_value_tuples_or_outbox_rows() {
    let (_space, db, rules_file) = with_rules_file("counting").await;
    let rules = rules_file.path.as_path();
    let client = db.client().await;
    // The rows to update exist before the daemon starts; their INSERT is not what is counted.
    client
        .batch_execute(
            "INSERT INTO auth_user (id) VALUES (1), (2);
             INSERT INTO reports_report (id, author_id) SELECT n, 1 FROM generate_series(1, 100) n;
             DELETE FROM cache_invalidator.outbox;",
        )
        .await
        .expect("set up reports");
    let daemon = ChildDaemon::worker(&db.url, &shared_redis_url(), rules, &[], true);
    daemon.wait_for_listener().await;
    // 100 single-row UPDATEs, each its own statement and outbox row: the even ones move the
    // report to another author (an OLD and a NEW value tuple), the odd ones only retitle it.
    for id in 1..=100 {
        let statement = if id % 2 == 0 {
            "UPDATE reports_report SET author_id = 2 WHERE id = $1"
        } else {
            "UPDATE reports_report SET title = 'retitled' WHERE id = $1"
        };
        client.execute(statement, &[&id]).await.expect("update");
    }
    // One statement changing 10 rows: one outbox row standing for 10 changed rows.
    client
        .batch_execute("UPDATE reports_report SET body = 'edited' WHERE id <= 10")
        .await
        .expect("bulk update");
    // Each outbox row is timed once when acknowledged: 101 means every change was booked.
    daemon
        .wait_for_metric("cache_invalidator_commit_to_delete_seconds_count", 101.0)
        .await;
    let body = daemon.scrape().await;
    assert_eq!(
        sample(
            &body,
            "cache_invalidator_changes_total{table=\"reports_report\"}"
        ),
        Some(110.0),
        "{body}"
    );
    // The batch lines are written before the acknowledgement is timed.
    let log = daemon.log_text();
    assert_eq!(logged_changes(&log), 110, "{log}");
    assert!(daemon.stop().await.success());
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_fails_while_no_worker_listens_and_says_so() {
    let (_space, db) = space_with_reports("status_exit").await;
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("REDIS_URL", "redis://127.0.0.1:6379/0"),
    ];
    let alone = run_cli(&["status"], &env).await;
    let text = stdout(&alone);
    assert_eq!(alone.status.code(), Some(1), "{text}{}", stderr(&alone));
    assert!(text.contains("workers listening:  0"), "{text}");
    assert!(text.contains("UNHEALTHY: no worker is listening"), "{text}");

    let help = run_cli(&["status", "--help"], &[]).await;
    assert!(
        stdout(&help).contains("exits 1 when no worker is listening"),
        "{}",
        stdout(&help)
    );

    let daemon = ChildDaemon::run(&["--refill-guard", "0"], &env, true);
    daemon.wait_for_listener().await;
    let listening = wait_until(PATIENCE, || async {
        run_cli(&["status"], &env).await.status.code() == Some(0)
    })
    .await;
    let last = run_cli(&["status"], &env).await;
    assert!(listening, "{}{}", stdout(&last), stderr(&last));
    assert!(
        stdout(&last).contains("workers listening:  1"),
        "{}",
        stdout(&last)
    );
    assert!(daemon.stop().await.success());
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_turns_503_while_redis_is_down_and_200_once_it_is_back() {
    let mut redis = PrivateRedis::start();
    let db = TestDb::with_reports("healthz", &rules_with_prefix(":1:")).await;
    let daemon = ChildDaemon::run(
        &["--refill-guard", "0"],
        &[("DATABASE_URL", &db.url), ("REDIS_URL", &redis.url())],
        true,
    );
    let status = |expected: u16| {
        let daemon = &daemon;
        async move { matches!(daemon.get("/healthz").await, Some((code, _)) if code == expected) }
    };
    assert!(wait_until(PATIENCE, || status(200)).await, "never healthy");

    redis.stop();
    assert!(wait_until(PATIENCE, || status(503)).await, "still healthy");
    let (_, body) = daemon.get("/healthz").await.expect("answers");
    assert!(body.contains("redis down"), "{body}");
    assert!(body.contains("postgres up"), "{body}");

    redis.restart();
    assert!(
        wait_until(PATIENCE, || status(200)).await,
        "not healthy again"
    );
    assert_eq!(
        daemon.get("/nothing-here").await.map(|(code, _)| code),
        Some(404)
    );
    assert!(daemon.stop().await.success());
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_tables_whose_installed_triggers_do_not_match_the_rules() {
    let (space, db) = space_with_reports("check").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let rules = dir.path().join("rules.toml");
    let rules_arg = rules.to_str().expect("utf-8 path").to_owned();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("REDIS_URL", &shared_redis_url()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, *v)).collect();

    write_rules(&rules, &space.key_prefix(), None);
    let matching = run_cli(&["--rules", &rules_arg, "check"], &env).await;
    assert!(matching.status.success(), "{}", stdout(&matching));

    // A template that needs a column the installed trigger does not record.
    write_rules(
        &rules,
        &space.key_prefix(),
        Some(r#"["report:{id}:*", "reportlist:reports:{author_id}:*", "bytitle:{title}:*"]"#),
    );
    let new_column = run_cli(&["--rules", &rules_arg, "check"], &env).await;
    assert_eq!(new_column.status.code(), Some(1));
    let report = stdout(&new_column);
    let failures = lines_starting_with(&report, "FAIL");
    assert_eq!(failures.len(), 1, "{report}");
    let failure = failures.iter().next().expect("one failure");
    assert!(failure.contains("reports_report"), "{report}");
    assert!(failure.contains("title"), "{report}");

    // A table with no trigger at all.
    let mut text = std::fs::read_to_string(&rules).expect("read rules");
    text.push_str("\n[[rules]]\ntable = \"auth_user\"\nkeys = [\"user:{id}:*\"]\n");
    replace_file(&rules, &text);
    let new_table = run_cli(&["--rules", &rules_arg, "check"], &env).await;
    assert_eq!(new_table.status.code(), Some(1));
    let report = stdout(&new_table);
    assert!(
        lines_starting_with(&report, "FAIL")
            .iter()
            .any(|line| line.contains("auth_user")),
        "{report}"
    );

    // After `install` with the new rules, check agrees again.
    let install = run_cli(&["--rules", &rules_arg, "install"], &env).await;
    assert!(install.status.success(), "{}", stderr(&install));
    let fixed = run_cli(&["--rules", &rules_arg, "check"], &env).await;
    assert!(fixed.status.success(), "{}", stdout(&fixed));
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_dry_run_deletes_nothing_and_lists_exactly_what_the_real_run_deletes() {
    let space = KeyPrefix::new("manual");
    let rules_file = RulesFile::default_for(&space, "");
    let rules = rules_file.path.as_path();
    let rules_arg = rules.to_str().expect("utf-8 path");
    let mut redis = redis_connection(&shared_redis_url()).await;
    let user_keys: BTreeSet<String> = space
        .keys(&[
            "report:1:42:a",
            "report:77:42:b",
            "reportlist:reports:42:p1",
            "reportlist:student-reports:42:p2",
        ])
        .into_iter()
        .collect();
    let report_keys: BTreeSet<String> = space
        .keys(&["report:42:1:a", "report:42:9:b"])
        .into_iter()
        .collect();
    let decoys: Vec<String> = [
        "report:1:421:a",
        "reportlist:reports:4:p",
        "studentreport:42:1:a",
        "cache_stats:42",
    ]
    .iter()
    .map(|logical| space.key(logical))
    .chain([space.key_v2("report:1:42:a")])
    .collect();
    let all: Vec<String> = user_keys
        .iter()
        .chain(&report_keys)
        .cloned()
        .chain(decoys.clone())
        .collect();
    set_keys(&mut redis, &all).await;
    let env = [("REDIS_URL", shared_redis_url())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let mut cleared: BTreeSet<String> = BTreeSet::new();
    for (flag, value, expected) in [
        ("--user", "42", &user_keys),
        ("--report", "42", &report_keys),
    ] {
        let dry = run_cli(
            &["--rules", rules_arg, "invalidate", flag, value, "--dry-run"],
            &env,
        )
        .await;
        assert!(dry.status.success(), "{}", stderr(&dry));
        let listed = lines_starting_with(&stdout(&dry), &space.namespace);
        assert_eq!(&listed, expected, "{}", stdout(&dry));
        assert!(stdout(&dry).contains(&format!("{} key(s) would be deleted", expected.len())));
        // Nothing deleted: every key not yet cleared by an earlier real run is still there.
        let still_there: Vec<String> = all
            .iter()
            .filter(|key| !cleared.contains(*key))
            .cloned()
            .collect();
        assert_kept(&mut redis, &still_there).await;

        let real = run_cli(&["--rules", rules_arg, "invalidate", flag, value], &env).await;
        assert!(real.status.success(), "{}", stderr(&real));
        assert!(
            stdout(&real).contains(&format!("{} key(s) deleted", listed.len())),
            "{}",
            stdout(&real)
        );
        let left = keys_with_prefix(&mut redis, &space.namespace).await;
        assert!(left.is_disjoint(&listed), "left: {left:?}");
        cleared.extend(listed);
    }
    let left = keys_with_prefix(&mut redis, &space.namespace).await;
    assert_eq!(left, decoys.iter().cloned().collect::<BTreeSet<_>>());
}

#[tokio::test]
async fn explain_prints_the_patterns_of_each_default_table() {
    let cases = [
        (
            "reports_report",
            r#"{"id": 7, "author_id": 3}"#,
            vec![":1:report:7:*", ":1:reportlist:reports:3:*"],
        ),
        (
            "reports_studentreport",
            r#"{"id": 8, "student_id": 4, "teacher_id": 5}"#,
            vec![
                ":1:studentreport:8:*",
                ":1:reportlist:student-reports:4:*",
                ":1:reportlist:student-reports:5:*",
            ],
        ),
        (
            "reports_tutorweeklyreport",
            r#"{"id": 9, "tutor_id": 6, "student_id": 4}"#,
            vec![
                ":1:tutorreport:9:*",
                ":1:reportlist:tutor-reports:6:*",
                ":1:reportlist:tutor-reports:4:*",
            ],
        ),
        (
            "reports_teacherweeklyreport",
            // A NULL owner clears nothing for its pattern.
            r#"{"id": 10, "teacher_id": 5, "student_id": null}"#,
            vec![":1:teacherreport:10:*", ":1:reportlist:teacher-reports:5:*"],
        ),
    ];
    for (table, row, expected) in cases {
        let output = run_cli(&["explain", "--table", table, "--row", row], &[]).await;
        assert!(output.status.success(), "{table}: {}", stderr(&output));
        let printed: BTreeSet<String> = stdout(&output).lines().map(str::to_owned).collect();
        let expected: BTreeSet<String> = expected.into_iter().map(str::to_owned).collect();
        assert_eq!(printed, expected, "{table}");
    }
    let unruled = run_cli(
        &["explain", "--table", "auth_user", "--row", r#"{"id": 1}"#],
        &[],
    )
    .await;
    assert!(!unruled.status.success());
    assert!(stderr(&unruled).contains("auth_user"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_matching_rules_file_and_keeps_the_old_rules_otherwise() {
    let (space, db, rules_file) = with_rules_file("sighup").await;
    let rules = rules_file.path.as_path();
    let mut redis = redis_connection(&shared_redis_url()).await;
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO auth_user (id) VALUES (1)")
        .await
        .expect("user");
    let daemon = ChildDaemon::worker(&db.url, &shared_redis_url(), rules, &[], true);
    daemon.wait_for_listener().await;

    // A new pattern over the same columns: the installed triggers still match, so it applies.
    write_rules(
        rules,
        &space.key_prefix(),
        Some(r#"["report:{id}:*", "reportlist:reports:{author_id}:*", "reportv2:{id}:*"]"#),
    );
    reload(&daemon, "applied", 1.0).await;
    let first = space.keys(&["report:5:1:a", "reportv2:5:a"]);
    insert_and_clear(&client, &mut redis, 5, &first).await;

    // Not TOML: rejected, the rules applied above stay.
    replace_file(rules, "key_prefix = [not toml");
    reload(&daemon, "rejected", 1.0).await;
    let second = space.keys(&["report:6:1:a", "reportv2:6:a"]);
    insert_and_clear(&client, &mut redis, 6, &second).await;

    // Valid, but needs a column the installed trigger does not record: rejected too.
    write_rules(
        rules,
        &space.key_prefix(),
        Some(r#"["report:{id}:*", "reportv2:{id}:*", "bytitle:{title}:*"]"#),
    );
    reload(&daemon, "rejected", 2.0).await;
    let third = space.keys(&["reportv2:7:a"]);
    let not_applied = space.keys(&["bytitle:t7:a"]);
    set_keys(&mut redis, &[third.clone(), not_applied.clone()].concat()).await;
    client
        .batch_execute("INSERT INTO reports_report (id, author_id, title) VALUES (7, 1, 't7')")
        .await
        .expect("insert 7");
    assert_gone_within(&mut redis, &third, PATIENCE).await;
    db.wait_for_empty_outbox(PATIENCE).await;
    assert_kept(&mut redis, &not_applied).await;

    assert!(daemon.stop().await.success());
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_functions_clear_keys_only_when_the_calling_transaction_commits() {
    let (space, db) = space_with_reports("sqlfn").await;
    let mut redis = redis_connection(&shared_redis_url()).await;
    let rolled_back: Vec<String> = space.keys(&["report:1:7:a", "reportlist:reports:7:p"]);
    let committed: Vec<String> = space.keys(&[
        "report:9:1:a",
        "report:9:2:b",
        "report:3:8:a",
        "reportlist:tutor-reports:8:p",
    ]);
    set_keys(
        &mut redis,
        &[rolled_back.clone(), committed.clone()].concat(),
    )
    .await;
    let daemon = Daemon::start(test_settings(&db.url, &shared_redis_url(), space.rules()));

    let mut client = db.client().await;
    let transaction = client.transaction().await.expect("begin");
    transaction
        .execute("SELECT cache_invalidator.invalidate_user(7::bigint)", &[])
        .await
        .expect("invalidate_user");
    transaction.rollback().await.expect("rollback");

    // The app's own write and both functions (bigint and text forms) in one transaction.
    let transaction = client.transaction().await.expect("begin");
    transaction
        .batch_execute(
            "INSERT INTO auth_user (id) VALUES (1);
             SELECT cache_invalidator.invalidate_report(9::bigint);
             SELECT cache_invalidator.invalidate_user('8');",
        )
        .await
        .expect("functions");
    transaction.commit().await.expect("commit");

    assert_gone_within(&mut redis, &committed, PATIENCE).await;
    db.wait_for_empty_outbox(PATIENCE).await;
    assert_kept(&mut redis, &rolled_back).await;
    daemon.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_gets_ready_then_watchdog_pings_then_stopping() {
    let db = TestDb::with_reports("notify", &rules_with_prefix(":1:")).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let socket_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).expect("bind notify socket");
    let socket_text = socket_path.to_str().expect("utf-8 path").to_owned();
    let daemon = ChildDaemon::run(
        &["--refill-guard", "0", "--poll-interval", "500ms"],
        &[
            ("DATABASE_URL", &db.url),
            ("REDIS_URL", &shared_redis_url()),
            ("NOTIFY_SOCKET", &socket_text),
            // 2 s: the daemon pings every second while healthy.
            ("WATCHDOG_USEC", "2000000"),
        ],
        false,
    );

    let mut seen: Vec<String> = Vec::new();
    let mut buffer = vec![0u8; 4096];
    let receive = async {
        loop {
            let length = socket.recv(&mut buffer).await.expect("recv");
            let message = String::from_utf8_lossy(&buffer[..length]).into_owned();
            seen.extend(message.lines().map(str::to_owned));
            let ready = seen.iter().position(|line| line == "READY=1");
            let pinged_after_ready =
                ready.is_some_and(|at| seen[at..].iter().any(|l| l == "WATCHDOG=1"));
            if pinged_after_ready {
                break;
            }
        }
    };
    if tokio::time::timeout(PATIENCE, receive).await.is_err() {
        panic!("no READY=1 followed by WATCHDOG=1; got {seen:?}");
    }

    let stopping = async {
        loop {
            let length = socket.recv(&mut buffer).await.expect("recv");
            if String::from_utf8_lossy(&buffer[..length])
                .lines()
                .any(|line| line == "STOPPING=1")
            {
                break;
            }
        }
    };
    let (status, stopped) = tokio::join!(daemon.stop(), tokio::time::timeout(PATIENCE, stopping));
    assert!(status.success());
    assert!(stopped.is_ok(), "no STOPPING=1");
    db.drop().await;
}

#[tokio::test]
async fn systemd_unit_verifies_and_rates_as_hardened() {
    let present = tokio::process::Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .await
        .is_ok_and(|status| status.success());
    if !present {
        eprintln!("note: systemd-analyze is not installed; the unit file was not verified");
        return;
    }
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/cache-invalidator.service"),
    )
    .expect("read unit");
    assert!(unit.contains("ExecStart=/usr/bin/cache-invalidator run"));
    // verify checks that ExecStart exists: point it at the binary just built.
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("cache-invalidator.service");
    std::fs::write(
        &copy,
        unit.replace(
            "ExecStart=/usr/bin/cache-invalidator",
            &format!("ExecStart={BIN}"),
        ),
    )
    .expect("write unit copy");
    let copy_arg = copy.to_str().expect("utf-8 path");

    let verify = tokio::process::Command::new("systemd-analyze")
        .args(["verify", copy_arg])
        .output()
        .await
        .expect("systemd-analyze verify");
    assert!(verify.status.success(), "{}", stderr(&verify));
    let problems: Vec<&str> = std::str::from_utf8(&verify.stderr)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains("cache-invalidator.service"))
        .collect();
    assert!(problems.is_empty(), "{problems:?}");

    let security = tokio::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager", copy_arg])
        .output()
        .await
        .expect("systemd-analyze security");
    let report = stdout(&security);
    let exposure: f64 = report
        .lines()
        .find_map(|line| line.split("Overall exposure level for").nth(1))
        .and_then(|rest| rest.split(':').nth(1))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}{}", stderr(&security)));
    assert!(exposure <= 2.0, "exposure {exposure}:\n{report}");
}

/// The commit of this checkout as git names it, or `unknown` where there is no git (what the
/// binary's build script then records).
fn checkout_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

#[tokio::test]
async fn version_names_the_release_and_the_git_commit() {
    let output = run_cli(&["--version"], &[]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stdout(&output).trim(),
        format!(
            "cache-invalidator {} (commit {})",
            env!("CARGO_PKG_VERSION"),
            checkout_commit()
        )
    );
}

#[tokio::test]
async fn passwords_never_appear_in_help_or_connection_errors() {
    let pg_password = "PgPw_d0_not_print";
    let redis_password = "RedisPw_d0_not_print";
    // Ports nobody listens on: every connection is refused at once.
    let database_url = format!(
        "postgres://app:{pg_password}@127.0.0.1:{}/reports",
        free_port()
    );
    let redis_url = format!("redis://:{redis_password}@127.0.0.1:{}/0", free_port());
    let env = [
        ("DATABASE_URL", database_url.as_str()),
        ("REDIS_URL", redis_url.as_str()),
    ];
    let leaks = |output: &Output| {
        let text = format!("{}{}", stdout(output), stderr(output));
        text.contains(pg_password) || text.contains(redis_password)
    };
    for subcommand in [
        "run",
        "install",
        "uninstall",
        "sql",
        "check",
        "status",
        "invalidate",
        "explain",
        "retry-dead-letters",
    ] {
        let help = run_cli(&[subcommand, "--help"], &env).await;
        assert!(help.status.success(), "{subcommand} --help");
        assert!(stdout(&help).contains("Example"), "{subcommand} --help");
        assert!(!leaks(&help), "{subcommand} --help prints a password");
    }
    let top = run_cli(&["--help"], &env).await;
    assert!(!leaks(&top));

    for args in [
        &["status"][..],
        &["check"],
        &["install"],
        &["invalidate", "--user", "1", "--dry-run"],
    ] {
        let output = run_cli(args, &env).await;
        assert!(
            !output.status.success(),
            "{args:?} succeeded without servers"
        );
        assert!(!leaks(&output), "{args:?} prints a password");
        // The redacted URL still says where it tried.
        assert!(
            format!("{}{}", stdout(&output), stderr(&output)).contains("127.0.0.1"),
            "{args:?}: {}{}",
            stdout(&output),
            stderr(&output)
        );
    }
}

#[tokio::test]
async fn a_metrics_port_in_use_fails_the_start_with_the_address_named() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("addr").to_string();
    let output = run_cli(
        &["run", "--metrics-addr", &addr],
        &[("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")],
    )
    .await;
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains(&format!("cannot listen on {addr}")),
        "{}",
        stderr(&output)
    );
}
