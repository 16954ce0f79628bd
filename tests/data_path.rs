//! The core data path against real Postgres and Redis: committed changes clear exactly the keys the
//! rules name, and nothing else.
//!
//! Every test asserts on keys left in Redis. Keys a change must clear are gone within
//! [`GONE_WITHIN`]; decoys (keys that look alike but no rule names for that change) are checked only
//! once the outbox has drained: the worker deletes an outbox row after its sweep finished, so an
//! empty outbox means every pass that could have touched a decoy is over.
//!
//! Most tests are a script of a few lines a case (what the database starts from, then each change
//! with the keys it must clear and the keys it must leave) played by one runner, [`run`]. Tests
//! whose steps do not fit that shape (a stopped daemon, a reinstall, ten thousand keys, no
//! daemon at all) are written out.

mod common;

use std::time::Duration;

use cache_invalidator::rules::RuleSet;
use cache_invalidator::schema;
use common::*;
use futures::SinkExt;
use redis::aio::MultiplexedConnection;
use tokio_postgres::{Client, GenericClient};

/// Generous: the machine is shared and noisy; a passing run takes well under a second per change.
const GONE_WITHIN: Duration = Duration::from_secs(30);

/// How a case's change reaches the database.
#[derive(Debug, Clone, Copy)]
enum Write<'a> {
    /// Statements on the test's own connection (one batch, so several may be given).
    Sql(&'a str),
    /// Statements run by `psql`: a separate program on its own connection, the way a cron job or
    /// a DBA writes.
    Psql(&'a str),
    /// A `COPY … FROM STDIN` statement, then its rows, one a line, columns separated by spaces.
    CopyIn(&'a str),
}

/// One test's database, key space and connections, and the keys it wrote (unlinked at the end so
/// the shared Redis does not collect leftovers).
struct World {
    space: KeyPrefix,
    db: TestDb,
    rules: RuleSet,
    client: Client,
    redis: MultiplexedConnection,
    written: Vec<String>,
}

impl World {
    /// The report tables with the default rules under this test's key prefix.
    async fn reports(tag: &str) -> World {
        let space = KeyPrefix::new(tag);
        let rules = space.rules();
        let db = TestDb::with_reports(tag, &rules).await;
        World::assemble(space, db, rules).await
    }

    /// `tables_sql` with `rules_toml` (rules only: the test's key prefix is put in front) installed.
    async fn custom(tag: &str, tables_sql: &str, rules_toml: &str) -> World {
        let space = KeyPrefix::new(tag);
        let rules = custom_rules(&space, rules_toml);
        let db = TestDb::empty(tag).await;
        let client = db.client().await;
        client
            .batch_execute(tables_sql)
            .await
            .expect("create tables");
        schema::install(&client, &rules)
            .await
            .expect("install triggers");
        World::assemble(space, db, rules).await
    }

    async fn assemble(space: KeyPrefix, db: TestDb, rules: RuleSet) -> World {
        World {
            client: db.client().await,
            redis: redis_connection(&shared_redis_url()).await,
            space,
            db,
            rules,
            written: Vec::new(),
        }
    }

    fn start(&self) -> Daemon {
        Daemon::start(test_settings(
            &self.db.url,
            &shared_redis_url(),
            self.rules.clone(),
        ))
    }

    /// Rows a test starts from, written before the daemon runs; their outbox rows are dropped so
    /// that only the writes under test are swept.
    async fn fixture(&self, sql: &str) {
        self.client.batch_execute(sql).await.expect("fixture");
        self.client
            .batch_execute("DELETE FROM cache_invalidator.outbox")
            .await
            .expect("empty the outbox");
    }

    fn key(&self, logical: &str) -> String {
        self.space.key(logical)
    }

    /// This test's keys for `logical`: logical keys separated by white space, each under cache
    /// VERSION 1 (`report:12:1:h`) or, written `v2:report:12:1:h`, the same key under VERSION 2,
    /// which no change may touch.
    fn keys(&self, logical: &str) -> Vec<String> {
        logical
            .split_whitespace()
            .map(|key| match key.strip_prefix("v2:") {
                Some(key) => self.space.key_v2(key),
                None => self.space.key(key),
            })
            .collect()
    }

    async fn set(&mut self, keys: &[String]) {
        set_keys(&mut self.redis, keys).await;
        self.written.extend_from_slice(keys);
    }

    async fn sql(&self, sql: &str) {
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Commits `write`, by whichever way it reaches the database.
    async fn write(&self, write: Write<'_>) {
        match write {
            Write::Sql(sql) => self.sql(sql).await,
            Write::Psql(sql) => {
                let output = tokio::process::Command::new("psql")
                    .arg(&self.db.url)
                    .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
                    .output()
                    .await
                    .expect("run psql (is the Postgres client installed?)");
                assert!(
                    output.status.success(),
                    "psql failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            Write::CopyIn(copy) => {
                let (statement, rows) = copy.split_once('\n').unwrap_or((copy, ""));
                let rows: Vec<String> = rows
                    .lines()
                    .map(|row| row.split_whitespace().collect::<Vec<_>>().join("\t") + "\n")
                    .collect();
                let sink = self.client.copy_in(statement).await.expect("start COPY");
                futures::pin_mut!(sink);
                let data = std::io::Cursor::new(rows.concat().into_bytes());
                sink.send(data).await.expect("send COPY data");
                let copied = sink.finish().await.expect("finish COPY");
                assert_eq!(copied, rows.len() as u64, "rows copied");
            }
        }
    }

    /// Runs `sql` in a transaction and checks, before committing, that it recorded nothing: inside
    /// the writing transaction whatever its triggers recorded would be visible.
    async fn expect_unrecorded(&mut self, sql: &str) {
        let transaction = self.client.transaction().await.expect("begin");
        transaction
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let recorded = count(
            &transaction,
            "SELECT count(*) FROM cache_invalidator.outbox",
        )
        .await;
        assert_eq!(recorded, 0, "{sql}: left an outbox row");
        transaction.commit().await.expect("commit");
    }

    async fn outbox_rows(&self) -> i64 {
        count(
            &self.client,
            "SELECT count(*) FROM cache_invalidator.outbox",
        )
        .await
    }

    /// Waits until the worker has acknowledged everything, and checks nothing was dead-lettered.
    async fn settle(&self) {
        let drained = wait_until(GONE_WITHIN, || async { self.outbox_rows().await == 0 }).await;
        assert!(
            drained,
            "outbox still holds {} rows after {GONE_WITHIN:?}",
            self.outbox_rows().await
        );
        let dead = count(
            &self.client,
            "SELECT count(*) FROM cache_invalidator.dead_letters",
        )
        .await;
        assert_eq!(dead, 0, "changes were set aside as dead letters");
    }

    /// `must_go` disappear, the outbox drains, and every decoy is still there.
    async fn expect_cleared(&mut self, must_go: &[String], decoys: &[String]) {
        assert_gone_within(&mut self.redis, must_go, GONE_WITHIN).await;
        self.settle().await;
        assert_kept(&mut self.redis, decoys).await;
    }

    /// Sets the keys, commits `write`, and expects exactly `must_go` cleared.
    async fn case(&mut self, label: &str, write: Write<'_>, must_go: &[String], decoys: &[String]) {
        self.set(&[must_go, decoys].concat()).await;
        self.write_and_expect(label, write, must_go, decoys).await;
    }

    /// [`World::case`] for keys already set. The label goes to the test's output, which a failing
    /// test shows: it names the case that failed.
    async fn write_and_expect(
        &mut self,
        label: &str,
        write: Write<'_>,
        must_go: &[String],
        decoys: &[String],
    ) {
        println!("case: {label}: {write:?}");
        self.write(write).await;
        self.expect_cleared(must_go, decoys).await;
    }

    async fn finish(mut self, daemon: Option<Daemon>) {
        if let Some(daemon) = daemon {
            daemon.stop().await;
        }
        for chunk in self.written.chunks(1000) {
            let _: i64 = redis::cmd("UNLINK")
                .arg(chunk)
                .query_async(&mut self.redis)
                .await
                .expect("unlink the test's keys");
        }
        drop(self.client);
        self.db.drop().await;
    }
}

fn custom_rules(space: &KeyPrefix, rules_toml: &str) -> RuleSet {
    let text = format!("key_prefix = \"{}\"\n{rules_toml}", space.key_prefix());
    RuleSet::from_toml(&text, "test rules").expect("valid rules")
}

/// Users 1 to `count`, for report rows to belong to.
fn users(count: i32) -> String {
    format!("INSERT INTO auth_user (id) SELECT generate_series(1, {count});")
}

async fn count(client: &impl GenericClient, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// How many of `keys` exist, asked in batches (one EXISTS per key is too slow for 10,000 keys).
async fn count_existing(redis: &mut MultiplexedConnection, keys: &[String]) -> usize {
    let mut total = 0;
    for chunk in keys.chunks(1000) {
        let found: i64 = redis::cmd("EXISTS")
            .arg(chunk)
            .query_async(redis)
            .await
            .expect("exists");
        total += found as usize;
    }
    total
}

/// What a scenario's script may say, each at the start of a line followed by `:`; a line that
/// starts with none of them continues the one above (joined with a newline).
///
/// - `tag:` a short name for the test's database and keys, and the first word of its cases'
///   labels.
/// - `rules:` the rules (TOML, without the key prefix); without it, the built-in rules.
/// - `tables:` the tables (SQL) the rules are for; without it, the report tables.
/// - `fixture:` rows written before the daemon starts; their own changes are not swept.
/// - `first keys:` `before start` (in index mode the index's seed then finds them, not Redis'
///   announcements) or `after start` (the default): when the first case's keys are written.
/// - `unrecorded:` writes that must record nothing, committed once the first case's keys are
///   written: they run in a transaction that checks the outbox before committing.
/// - `case:` a label, then the change: `sql:`, `psql:` or `copy:` (see [`Write`]); then `gone:`
///   the keys it must clear and `kept:` the look-alikes it must leave, keys written the way
///   [`World::keys`] reads them.
const KEYWORDS: [&str; 12] = [
    "tag",
    "rules",
    "tables",
    "fixture",
    "first keys",
    "unrecorded",
    "case",
    "sql",
    "psql",
    "copy",
    "gone",
    "kept",
];

/// A script's fields in order: (keyword, text).
fn fields(script: &str) -> Vec<(&'static str, String)> {
    let mut fields: Vec<(&'static str, String)> = Vec::new();
    for line in script
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
    {
        let field = KEYWORDS.iter().find_map(|keyword| {
            let text = line.strip_prefix(keyword)?.strip_prefix(':')?;
            Some((*keyword, text.trim().to_owned()))
        });
        match (field, fields.last_mut()) {
            (Some(field), _) => fields.push(field),
            (None, Some((_, text))) => {
                text.push('\n');
                text.push_str(line);
            }
            (None, None) => panic!("a script must start with a keyword: {line}"),
        }
    }
    fields
}

/// One change of a scenario and its verdict.
struct Case {
    label: String,
    /// The keyword that gave the change, `sql`, `psql` or `copy`: how it is made.
    by: &'static str,
    statements: String,
    gone: Vec<String>,
    kept: Vec<String>,
}

impl Case {
    fn write(&self) -> Write<'_> {
        match self.by {
            "psql" => Write::Psql(&self.statements),
            "copy" => Write::CopyIn(&self.statements),
            // `cases` sets nothing else; a case without a change is refused there.
            _ => Write::Sql(&self.statements),
        }
    }
}

/// Plays a data-path test written as a script (see [`KEYWORDS`]): its tables, rules and fixture,
/// the daemon, then every case in order, each clearing exactly its keys.
async fn run(script: &str) {
    let fields = fields(script);
    let field = |keyword: &str| {
        fields
            .iter()
            .find(|(name, _)| *name == keyword)
            .map(|(_, text)| text.as_str())
    };
    let tag = field("tag").expect("a script names its tag");
    let mut world = match field("rules") {
        None => World::reports(tag).await,
        Some(rules) => {
            let tables = field("tables").unwrap_or(REPORT_TABLES_SQL);
            World::custom(tag, tables, rules).await
        }
    };
    world.fixture(field("fixture").unwrap_or("")).await;
    let keys_first = match field("first keys").unwrap_or("after start") {
        "before start" => true,
        "after start" => false,
        other => panic!("first keys: {other:?}: expected `before start` or `after start`"),
    };
    let cases = cases(&world, tag, &fields);
    let first_keys = cases
        .first()
        .map(|case| [case.gone.as_slice(), &case.kept].concat())
        .unwrap_or_default();
    if keys_first {
        world.set(&first_keys).await;
    }
    let daemon = world.start();
    if !keys_first {
        world.set(&first_keys).await;
    }
    if let Some(sql) = field("unrecorded") {
        world.expect_unrecorded(sql).await;
    }
    for (index, case) in cases.iter().enumerate() {
        if index > 0 {
            world
                .set(&[case.gone.as_slice(), &case.kept].concat())
                .await;
        }
        world
            .write_and_expect(&case.label, case.write(), &case.gone, &case.kept)
            .await;
    }
    world.finish(Some(daemon)).await;
}

/// The cases in `fields`: each `case:` and the change, `gone:` and `kept:` after it.
fn cases(world: &World, tag: &str, fields: &[(&'static str, String)]) -> Vec<Case> {
    let mut cases: Vec<Case> = Vec::new();
    for (keyword, text) in fields {
        match (*keyword, cases.last_mut()) {
            ("case", _) => cases.push(Case {
                label: format!("{tag}: {text}"),
                by: "sql",
                statements: String::new(),
                gone: Vec::new(),
                kept: Vec::new(),
            }),
            // A second line of a kind would silently replace the first: its change unplayed.
            ("sql" | "psql" | "copy", Some(case)) if !case.statements.is_empty() => {
                panic!("{}: a second change line (`{keyword}:`)", case.label)
            }
            ("gone" | "kept", Some(case))
                if !(if *keyword == "gone" {
                    &case.gone
                } else {
                    &case.kept
                })
                .is_empty() =>
            {
                panic!("{}: a second `{keyword}:` line", case.label)
            }
            ("sql" | "psql" | "copy", Some(case)) => {
                (case.by, case.statements) = (keyword, text.clone());
            }
            ("gone", Some(case)) => case.gone = world.keys(text),
            ("kept", Some(case)) => case.kept = world.keys(text),
            ("sql" | "psql" | "copy" | "gone" | "kept", None) => {
                panic!("{tag}: `{keyword}:` comes before any `case:`")
            }
            (_, Some(_)) => panic!("{tag}: `{keyword}:` belongs before the first case"),
            // The scenario's own fields, read by `run`.
            (_, None) => {}
        }
    }
    assert!(
        !cases.is_empty(),
        "{tag}: a scenario needs at least one `case:`"
    );
    for case in &cases {
        assert!(
            !case.statements.is_empty() && !case.gone.is_empty(),
            "{}: a case needs a change and keys it must clear",
            case.label
        );
    }
    cases
}

/// One of the four report tables and the key layout its built-in rule clears.
struct ReportTable {
    table: &'static str,
    /// Namespace of the detail keys: `report`, `studentreport`, …
    detail: &'static str,
    /// The `reportlist:{resource}:{user}:…` resource.
    resource: &'static str,
    /// Owner columns, in the order the rows below give their values.
    owners: &'static [&'static str],
    /// A column no key depends on.
    plain: &'static str,
}

/// The four report tables, as the built-in rules key them.
const REPORT_TABLES: [ReportTable; 4] = [
    ReportTable {
        table: "reports_report",
        detail: "report",
        resource: "reports",
        owners: &["author_id"],
        plain: "title",
    },
    ReportTable {
        table: "reports_studentreport",
        detail: "studentreport",
        resource: "student-reports",
        owners: &["student_id", "teacher_id"],
        plain: "title",
    },
    ReportTable {
        table: "reports_tutorweeklyreport",
        detail: "tutorreport",
        resource: "tutor-reports",
        owners: &["tutor_id", "student_id"],
        plain: "notes",
    },
    ReportTable {
        table: "reports_teacherweeklyreport",
        detail: "teacherreport",
        resource: "teacher-reports",
        owners: &["teacher_id", "student_id"],
        plain: "notes",
    },
];

impl ReportTable {
    /// The first `owners.len()` of two candidate owners (a one-owner table uses the first).
    fn owners_of(&self, candidates: [i32; 2]) -> Vec<i32> {
        candidates[..self.owners.len()].to_vec()
    }

    fn insert_sql(&self, id: i32, owners: &[i32]) -> String {
        let values: Vec<String> = owners.iter().map(i32::to_string).collect();
        format!(
            "INSERT INTO {} (id, {}) VALUES ({id}, {});",
            self.table,
            self.owners.join(", "),
            values.join(", ")
        )
    }

    /// The keys a change of row `id` owned by `owners` clears: its detail as two users see it, and
    /// each owner's list.
    fn keys_of(&self, space: &KeyPrefix, id: i32, owners: &[i32]) -> Vec<String> {
        let mut keys = vec![
            space.key(&format!("{}:{id}:1:h1", self.detail)),
            space.key(&format!("{}:{id}:77:h2", self.detail)),
        ];
        for owner in owners {
            keys.push(space.key(&format!("reportlist:{}:{owner}:h", self.resource)));
        }
        keys
    }

    /// Keys that look like those of row `id` and its owners but that no rule names for them.
    fn decoys_of(&self, space: &KeyPrefix, id: i32, owners: &[i32]) -> Vec<String> {
        let mut keys = vec![
            // Shares the id's digits: `report:12:*` must not touch `report:123:…`.
            space.key(&format!("{}:{id}3:1:h", self.detail)),
            // A look-alike namespace.
            space.key(&format!("{}archive:{id}:1:h", self.detail)),
            // The same key under another cache VERSION.
            space.key_v2(&format!("{}:{id}:1:h1", self.detail)),
            // A django session key.
            space.key(&format!("django.contrib.sessions.cache{id}abc")),
        ];
        for other in REPORT_TABLES.iter().filter(|t| t.detail != self.detail) {
            // The same id in another namespace.
            keys.push(space.key(&format!("{}:{id}:1:h", other.detail)));
        }
        for owner in owners {
            keys.push(space.key(&format!("reportlist:{}:{owner}3:h", self.resource)));
            keys.push(space.key_v2(&format!("reportlist:{}:{owner}:h", self.resource)));
            keys.push(space.key(&format!("cache_stats:{owner}")));
            for other in REPORT_TABLES.iter().filter(|t| t.resource != self.resource) {
                keys.push(space.key(&format!("reportlist:{}:{owner}:h", other.resource)));
            }
        }
        keys
    }
}

/// INSERT, UPDATE of a plain column, UPDATE of an owner, DELETE and a cascade delete through
/// `auth_user`, one after the other on one table, each clearing exactly its row's keys.
async fn five_writes_clear_exactly_their_keys(table: &str) {
    let t = REPORT_TABLES
        .iter()
        .find(|t| t.table == table)
        .unwrap_or_else(|| panic!("{table} is not a report table"));
    let mut world = World::reports(t.detail).await;
    let (plain, moved, deleted, cascaded) = (
        t.owners_of([3, 4]),
        t.owners_of([5, 6]),
        t.owners_of([8, 9]),
        t.owners_of([10, 11]),
    );
    world
        .fixture(&format!(
            "INSERT INTO auth_user (id) SELECT generate_series(1, 12); {} {} {} {}",
            t.insert_sql(22, &plain),
            t.insert_sql(32, &moved),
            t.insert_sql(42, &deleted),
            t.insert_sql(52, &cascaded),
        ))
        .await;
    let daemon = world.start();
    let space = &world.space;

    let inserted = t.owners_of([1, 2]);
    let insert = (
        t.keys_of(space, 12, &inserted),
        t.decoys_of(space, 12, &inserted),
    );
    let update = (t.keys_of(space, 22, &plain), t.decoys_of(space, 22, &plain));
    // The first owner moves from 5 to 7: the old and the new owner's lists go (and a second
    // owner's, who sees the row change).
    let mut owner_change = (
        t.keys_of(space, 32, &moved),
        t.decoys_of(space, 32, &[moved.clone(), vec![7]].concat()),
    );
    owner_change
        .0
        .push(space.key(&format!("reportlist:{}:7:h", t.resource)));
    let delete = (
        t.keys_of(space, 42, &deleted),
        t.decoys_of(space, 42, &deleted),
    );
    let cascade = (
        t.keys_of(space, 52, &cascaded),
        t.decoys_of(space, 52, &cascaded),
    );

    let cases = [
        ("INSERT", t.insert_sql(12, &inserted), insert),
        (
            "UPDATE of a plain column",
            format!(
                "UPDATE {} SET {} = 'changed' WHERE id = 22",
                t.table, t.plain
            ),
            update,
        ),
        (
            "UPDATE of an owner",
            format!("UPDATE {} SET {} = 7 WHERE id = 32", t.table, t.owners[0]),
            owner_change,
        ),
        (
            "DELETE",
            format!("DELETE FROM {} WHERE id = 42", t.table),
            delete,
        ),
        (
            "cascade DELETE through auth_user",
            "DELETE FROM auth_user WHERE id = 10".to_owned(),
            cascade,
        ),
    ];
    for (label, sql, (must_go, decoys)) in cases {
        let label = format!("{}: {label}", t.table);
        world
            .case(&label, Write::Sql(&sql), &must_go, &decoys)
            .await;
    }
    world.finish(Some(daemon)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_writes_clear_exactly_their_keys() {
    five_writes_clear_exactly_their_keys("reports_report").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn studentreport_writes_clear_exactly_their_keys() {
    five_writes_clear_exactly_their_keys("reports_studentreport").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorweeklyreport_writes_clear_exactly_their_keys() {
    five_writes_clear_exactly_their_keys("reports_tutorweeklyreport").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teacherweeklyreport_writes_clear_exactly_their_keys() {
    five_writes_clear_exactly_their_keys("reports_teacherweeklyreport").await;
}

/// One `#[tokio::test]` a script, each `name: r#"script"#,` played by [`run`]: the scripts stand
/// together as one table, without a test function's scaffold around each.
macro_rules! scenarios {
    ($($(#[$doc:meta])* $name:ident: $script:literal,)*) => {
        $(
            $(#[$doc])*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                run($script).await;
            }
        )*
    };
}

scenarios! {
    insert_clears_the_report_and_its_authors_list_only: r#"
        tag: insert
        first keys: before start
        case: INSERT of a report and its author
        sql: INSERT INTO auth_user (id) VALUES (1);
             INSERT INTO reports_report (id, author_id) VALUES (12, 1);
        gone: report:12:1:h1 report:12:2:h2 reportlist:reports:1:h
        kept: report:123:1:h studentreport:12:1:h reportarchive:12:1:h v2:report:12:1:h1
              reportlist:reports:11:h cache_stats:1
    "#,

    /// psql: a separate program on its own connection, the way a cron job or a DBA would write.
    raw_sql_from_another_program_clears_keys: r#"
        tag: psql
        first keys: before start
        fixture: INSERT INTO auth_user (id) SELECT generate_series(1, 4);
                 INSERT INTO reports_report (id, author_id) VALUES (12, 1);
                 INSERT INTO reports_studentreport (id, student_id, teacher_id) VALUES (5, 2, 3);
        case: an UPDATE and a DELETE by psql
        psql: UPDATE reports_report SET author_id = 4 WHERE id = 12;
              DELETE FROM reports_studentreport WHERE id = 5;
        gone: report:12:1:h reportlist:reports:1:h reportlist:reports:4:h studentreport:5:2:h
              reportlist:student-reports:2:h reportlist:student-reports:3:h
        kept: report:5:1:h studentreport:12:1:h reportlist:reports:2:h
    "#,

    /// A rolled-back transaction, then a committed one whose savepoint was rolled back: only the
    /// work after the savepoint counts. Once its keys are gone the worker has seen everything
    /// committed before it; the keys kept are everything the rolled-back work would have cleared.
    rolled_back_changes_clear_nothing: r#"
        tag: rollback
        fixture: INSERT INTO auth_user (id) SELECT generate_series(1, 6);
                 INSERT INTO reports_report (id, author_id) VALUES (12, 1), (13, 3), (14, 5);
        first keys: before start
        case: ROLLBACK, then ROLLBACK TO SAVEPOINT in a committed transaction
        sql: BEGIN;
             UPDATE reports_report SET author_id = 2 WHERE id = 12;
             DELETE FROM reports_report WHERE id = 13;
             INSERT INTO reports_report (id, author_id) VALUES (15, 4);
             ROLLBACK;
             BEGIN;
             SAVEPOINT undone;
             UPDATE reports_report SET author_id = 2 WHERE id = 12;
             ROLLBACK TO SAVEPOINT undone;
             UPDATE reports_report SET author_id = 6 WHERE id = 14;
             COMMIT;
        gone: report:14:1:h reportlist:reports:5:h reportlist:reports:6:h
        kept: report:12:1:h reportlist:reports:1:h reportlist:reports:2:h report:13:1:h
              reportlist:reports:3:h report:15:1:h reportlist:reports:4:h
    "#,

    /// TRUNCATE names no rows: every key of the table's namespaces goes, rows or not. TRUNCATE ...
    /// CASCADE through auth_user truncates the four report tables with it: each fires its own
    /// TRUNCATE trigger. auth_user has no rule, so user-keyed keys outside them stay.
    truncate_clears_the_tables_namespaces_only: r#"
        tag: truncate
        fixture: INSERT INTO auth_user (id) SELECT generate_series(1, 2);
                 INSERT INTO reports_report (id, author_id) VALUES (12, 1);
                 INSERT INTO reports_studentreport (id, student_id, teacher_id) VALUES (12, 1, 2);
        case: TRUNCATE
        sql: TRUNCATE reports_report
        gone: report:12:1:h report:999:2:h reportlist:reports:1:h reportlist:reports:42:h
        kept: studentreport:12:1:h reportlist:student-reports:1:h reportarchive:12:1:h
              reportlists:reports:1:h cache_stats:1 django.contrib.sessions.cacheabc
              v2:report:12:1:h v2:reportlist:reports:1:h
        case: TRUNCATE auth_user CASCADE
        sql: TRUNCATE auth_user CASCADE
        gone: studentreport:12:1:h reportlist:student-reports:1:h tutorreport:3:1:h
              reportlist:tutor-reports:2:h teacherreport:4:1:h reportlist:teacher-reports:2:h
              report:12:1:h
        kept: reportarchive:12:1:h cache_stats:1 django.contrib.sessions.cacheabc userprofile:1:h
              v2:studentreport:12:1:h
    "#,

    /// `{slug}:page:*` names no namespace before its first value: TRUNCATE must clear what the
    /// template could name (`*:page:*`), not the whole key prefix with everyone's sessions.
    truncate_of_a_table_whose_keys_start_with_a_value_keeps_other_keys: r#"
        tag: truncslug
        tables: CREATE TABLE pages (id serial PRIMARY KEY, slug text);
                INSERT INTO pages (slug) VALUES ('home');
        rules: [[rules]]
               table = "pages"
               keys = ["{slug}:page:*"]
        case: TRUNCATE pages
        sql: TRUNCATE pages
        gone: home:page:1 about:page:2:h
        kept: django.contrib.sessions.cacheabc cache_stats:1 report:12:1:h home:pages:1
    "#,

    /// The keys kept are what each value would match if it were put into the pattern unescaped.
    glob_characters_in_values_delete_only_the_literal_key: r#"
        tag: glob
        tables: CREATE TABLE tags (id serial PRIMARY KEY, name text);
        rules: [[rules]]
               table = "tags"
               keys = ["tag:{name}:*"]
        case: INSERT of values with glob characters
        sql: INSERT INTO tags (name) VALUES ('x*'), ('y?'), ('[ab]'), ('z\')
        gone: tag:x*:1 tag:y?:1 tag:[ab]:1 tag:z\:1
        kept: tag:xyz:1 tag:x:1 tag:yz:1 tag:a:1 tag:b:1 tag:z:1 tag:x*y:1
    "#,

    /// The first four keys kept in both cases are what a NULL could turn into if it were rendered
    /// instead of skipped. NULL → 2: the OLD row's NULL skips its pattern, the NEW row's value
    /// clears teacher 2's list.
    null_owner_skips_only_its_pattern: r#"
        tag: null
        fixture: INSERT INTO auth_user (id) SELECT generate_series(1, 3);
        case: INSERT with a NULL teacher
        sql: INSERT INTO reports_studentreport (id, student_id, teacher_id) VALUES (5, 1, NULL)
        gone: studentreport:5:1:h reportlist:student-reports:1:h
        kept: reportlist:student-reports::h reportlist:student-reports:None:h
              reportlist:student-reports:null:h reportlist:student-reports:NULL:h
              reportlist:student-reports:2:h studentreport:6:1:h
        case: UPDATE of a NULL teacher
        sql: UPDATE reports_studentreport SET teacher_id = 2 WHERE id = 5
        gone: studentreport:5:1:h reportlist:student-reports:1:h reportlist:student-reports:2:h
        kept: reportlist:student-reports::h reportlist:student-reports:None:h
              reportlist:student-reports:null:h reportlist:student-reports:NULL:h
              reportlist:student-reports:3:h
    "#,

    /// Writes to auth_user, which no rule names, record nothing; the keys kept are what a rule on
    /// auth_user (an `invalidate --user 1`) would clear. The ruled change after them is the
    /// barrier: once its keys are gone, anything the auth_user writes could have caused has
    /// happened.
    tables_without_a_rule_record_and_clear_nothing: r#"
        tag: norule
        fixture: INSERT INTO auth_user (id) SELECT generate_series(1, 3);
                 INSERT INTO reports_report (id, author_id) VALUES (12, 1), (13, 2);
        first keys: before start
        unrecorded: UPDATE auth_user SET username = 'renamed' WHERE id = 1;
                    INSERT INTO auth_user (id) VALUES (50);
                    DELETE FROM auth_user WHERE id = 3;
        case: a ruled change after the auth_user writes
        sql: UPDATE reports_report SET title = 'x' WHERE id = 13
        gone: report:13:1:h reportlist:reports:2:h
        kept: report:12:1:h reportlist:reports:1:h reportlist:student-reports:1:h cache_stats:1
    "#,

    /// An UPDATE of an unwatched column records nothing; one of the watched column clears the keys
    /// of the OLD and the NEW row. Columns the keys use count as watched: an owner change never
    /// goes unnoticed.
    watch_skips_other_columns_and_expands_old_and_new: r#"
        tag: watch
        rules: [[rules]]
               table = "reports_report"
               keys = ["report:{id}:*", "reportlist:reports:{author_id}:*"]
               watch = ["title"]
        fixture: INSERT INTO auth_user (id) SELECT generate_series(1, 6);
                 INSERT INTO reports_report (id, author_id) VALUES (12, 1), (13, 3), (14, 5);
        first keys: before start
        unrecorded: UPDATE reports_report SET body = 'edited'
        case: UPDATE of the watched title and the owner
        sql: UPDATE reports_report SET title = 'new', author_id = 2 WHERE id = 12
        gone: report:12:1:h reportlist:reports:1:h reportlist:reports:2:h
        kept: report:14:1:h reportlist:reports:5:h
        case: UPDATE of the owner only
        sql: UPDATE reports_report SET author_id = 4 WHERE id = 13
        gone: report:13:1:h reportlist:reports:3:h reportlist:reports:4:h
        kept: report:14:1:h reportlist:reports:5:h
    "#,

    /// `json` and `point` have no `=`: comparing them must not make the app's UPDATEs fail.
    watch_works_on_columns_without_an_equality_operator: r#"
        tag: watchjson
        tables: CREATE TABLE docs (id serial PRIMARY KEY, data json, loc point, note text);
                INSERT INTO docs (id, data, loc) VALUES (1, '{}', '(1,2)'), (2, '{}', '(1,2)');
        rules: [[rules]]
               table = "docs"
               keys = ["doc:{id}:*"]
               watch = ["data", "loc"]
        unrecorded: UPDATE docs SET note = 'x'
        case: UPDATE of a watched json column
        sql: UPDATE docs SET data = '{"a": 1}' WHERE id = 1
        gone: doc:1:h
        kept: doc:2:h doc:3:h
        case: UPDATE of a watched point column
        sql: UPDATE docs SET loc = '(3,4)' WHERE id = 2
        gone: doc:2:h
        kept: doc:3:h
    "#,

    copy_from_stdin_clears_keys: r#"
        tag: copy
        fixture: INSERT INTO auth_user (id) SELECT generate_series(1, 3);
        first keys: before start
        case: COPY FROM STDIN of two reports
        copy: COPY reports_report (id, author_id) FROM STDIN
              40 1
              41 2
        gone: report:40:1:h report:41:1:h reportlist:reports:1:h reportlist:reports:2:h
        kept: report:4:1:h report:42:1:h reportlist:reports:3:h
    "#,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_update_of_10000_rows_clears_every_report_it_touched() {
    const UPDATED: i32 = 10_000;
    const UNTOUCHED: i32 = 500;
    let mut world = World::reports("bulk").await;
    // Authors 1..=50 own the updated rows; author 51 owns only rows the statement leaves alone.
    world
        .fixture(&format!(
            "INSERT INTO auth_user (id) SELECT generate_series(1, 51);
             INSERT INTO reports_report (id, author_id)
             SELECT g, CASE WHEN g <= {UPDATED} THEN 1 + g % 50 ELSE 51 END
             FROM generate_series(1, {}) g;",
            UPDATED + UNTOUCHED
        ))
        .await;
    let mut must_go: Vec<String> = (1..=UPDATED)
        .map(|id| world.key(&format!("report:{id}:1:h")))
        .collect();
    must_go.extend((1..=50).map(|user| world.key(&format!("reportlist:reports:{user}:h"))));
    let mut decoys: Vec<String> = (UPDATED + 1..=UPDATED + UNTOUCHED)
        .map(|id| world.key(&format!("report:{id}:1:h")))
        .collect();
    decoys.push(world.key("reportlist:reports:51:h"));
    world.set(&[must_go.clone(), decoys.clone()].concat()).await;
    let daemon = world.start();

    world
        .sql(&format!(
            "UPDATE reports_report SET title = 'bulk' WHERE id <= {UPDATED}"
        ))
        .await;

    let mut redis = world.redis.clone();
    let cleared = wait_until(GONE_WITHIN, || {
        let mut redis = redis.clone();
        let must_go = &must_go;
        async move { count_existing(&mut redis, must_go).await == 0 }
    })
    .await;
    assert!(
        cleared,
        "{} of {} keys of updated rows still present after {GONE_WITHIN:?}",
        count_existing(&mut redis, &must_go).await,
        must_go.len()
    );
    world.settle().await;
    assert_eq!(
        count_existing(&mut redis, &decoys).await,
        decoys.len(),
        "keys of rows the UPDATE did not touch were deleted"
    );
    world.finish(Some(daemon)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_committed_while_stopped_are_cleared_at_start() {
    let mut world = World::reports("stopped").await;
    world.fixture(&users(4)).await;
    let daemon = world.start();
    let first = world.keys("report:12:1:h reportlist:reports:1:h");
    world
        .case(
            "while running",
            Write::Sql("INSERT INTO reports_report (id, author_id) VALUES (12, 1)"),
            &first,
            &[],
        )
        .await;
    daemon.stop().await;

    let must_go = world.keys(
        "report:12:1:h reportlist:reports:1:h reportlist:reports:3:h report:13:1:h \
         reportlist:reports:2:h",
    );
    let decoys = world.keys("report:14:1:h reportlist:reports:4:h");
    world.set(&[must_go.clone(), decoys.clone()].concat()).await;
    world
        .sql(
            "UPDATE reports_report SET author_id = 3 WHERE id = 12;
             INSERT INTO reports_report (id, author_id) VALUES (13, 2);",
        )
        .await;
    assert!(
        world.outbox_rows().await > 0,
        "the changes should wait in the outbox"
    );
    assert_kept(&mut world.redis, &must_go).await;

    let daemon = world.start();
    world.expect_cleared(&must_go, &decoys).await;
    world.finish(Some(daemon)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_names_the_table_and_column_a_rule_gets_wrong() {
    let db = TestDb::empty("badrule").await;
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE tags (id serial PRIMARY KEY, name text, title text);")
        .await
        .expect("create table");
    let space = KeyPrefix::new("badrule");
    // (table, the name the error must give, the rule's lines after its table)
    let misspelt_watch = "keys = [\"tag:{name}:*\"]\nwatch = [\"titel\"]";
    let failures = [
        ("tags", "nam", "keys = [\"tag:{nam}:*\"]"),
        ("tags", "titel", misspelt_watch),
        ("tagz", "tagz", "keys = [\"tag:{name}:*\"]"),
    ];
    for (table, named, rule) in failures {
        let rules = custom_rules(&space, &format!("[[rules]]\ntable = \"{table}\"\n{rule}\n"));
        let error = schema::install(&client, &rules)
            .await
            .expect_err("a rule naming what does not exist must fail install");
        let message = error.to_string();
        assert!(
            message.contains(table) && message.contains(named),
            "the error should name {table} and {named}: {message}"
        );
    }
    // Two rules for one table, one of them schema-qualified.
    let twice = custom_rules(
        &space,
        "[[rules]]\ntable = \"tags\"\nkeys = [\"tag:{name}:*\"]\n\
         [[rules]]\ntable = \"public.tags\"\nkeys = [\"title:{title}:*\"]\n",
    );
    let message = schema::install(&client, &twice)
        .await
        .expect_err("two rules for one table must fail install")
        .to_string();
    assert!(
        message.contains("tags") && message.contains("public.tags"),
        "the error should name both rules: {message}"
    );
    // Validation runs before any SQL: a failed install leaves nothing behind.
    let installed = count(
        &client,
        "SELECT count(*) FROM pg_namespace WHERE nspname = 'cache_invalidator'",
    )
    .await;
    assert_eq!(installed, 0, "a failed install created the schema");
    drop(client);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_is_idempotent_and_keeps_pending_changes() {
    let mut world = World::reports("reinstall").await;
    world.fixture(&users(3)).await;
    let pending = world.keys("report:12:1:h reportlist:reports:1:h");
    world.set(&pending).await;
    world
        .sql("INSERT INTO reports_report (id, author_id) VALUES (12, 1)")
        .await;
    let before = world.outbox_rows().await;
    assert!(before > 0, "the insert should wait in the outbox");
    for _ in 0..2 {
        schema::install(&world.client, &world.rules)
            .await
            .expect("install again");
    }
    assert_eq!(
        world.outbox_rows().await,
        before,
        "install lost pending changes"
    );
    let triggers = count(
        &world.client,
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'cache_invalidator%'",
    )
    .await;
    assert_eq!(triggers, 16, "four triggers on each of the four tables");

    let daemon = world.start();
    world.expect_cleared(&pending, &[]).await;
    let after = world.keys("report:13:1:h reportlist:reports:2:h");
    let decoys = world.keys("reportlist:reports:3:h");
    let insert = Write::Sql("INSERT INTO reports_report (id, author_id) VALUES (13, 2)");
    world
        .case("insert after reinstall", insert, &after, &decoys)
        .await;
    world.finish(Some(daemon)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_after_a_rules_change_drops_triggers_no_rule_asks_for() {
    let world = World::reports("rulechange").await;
    let fewer = custom_rules(
        &world.space,
        "[[rules]]\ntable = \"reports_studentreport\"\nkeys = [\"studentreport:{id}:*\"]\n",
    );
    schema::install(&world.client, &fewer)
        .await
        .expect("install the new rules");
    let triggers = count(
        &world.client,
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'cache_invalidator%'",
    )
    .await;
    assert_eq!(triggers, 4, "only reports_studentreport keeps its triggers");
    world
        .sql(
            "INSERT INTO auth_user (id) VALUES (1);
             INSERT INTO reports_report (id, author_id) VALUES (12, 1);",
        )
        .await;
    assert_eq!(
        world.outbox_rows().await,
        0,
        "a table no rule names any more still records changes"
    );
    world
        .sql("INSERT INTO reports_studentreport (id, student_id) VALUES (5, 1)")
        .await;
    assert_eq!(
        world.outbox_rows().await,
        1,
        "the ruled table records its change"
    );
    world.finish(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstall_removes_triggers_and_schema_but_keeps_app_tables() {
    let world = World::reports("uninstall").await;
    world
        .fixture(
            "INSERT INTO auth_user (id) SELECT generate_series(1, 2);
             INSERT INTO reports_report (id, author_id, title) VALUES (12, 1, 'kept');",
        )
        .await;
    schema::uninstall(&world.client).await.expect("uninstall");
    schema::uninstall(&world.client)
        .await
        .expect("uninstall again");

    let installed = [
        "SELECT count(*) FROM pg_namespace WHERE nspname = 'cache_invalidator'",
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'cache_invalidator%'",
    ];
    for sql in installed {
        assert_eq!(count(&world.client, sql).await, 0, "left behind: {sql}");
    }
    // The app keeps working without the triggers, and its data is untouched.
    world
        .sql(
            "INSERT INTO reports_report (id, author_id) VALUES (13, 2);
             UPDATE reports_report SET author_id = 2 WHERE id = 12;
             INSERT INTO reports_studentreport (id, student_id) VALUES (5, 1);
             TRUNCATE reports_tutorweeklyreport;",
        )
        .await;
    let titles = count(
        &world.client,
        "SELECT count(*) FROM reports_report WHERE (id = 12 AND title = 'kept') OR id = 13",
    )
    .await;
    assert_eq!(titles, 2, "app rows were changed or lost");
    assert_eq!(
        count(&world.client, "SELECT count(*) FROM auth_user").await,
        2
    );
    let outbox = count(
        &world.client,
        "SELECT count(*) FROM pg_class WHERE relname = 'outbox' \
         AND relnamespace::regnamespace::text = 'cache_invalidator'",
    )
    .await;
    assert_eq!(outbox, 0, "a write after uninstall recreated the outbox");
    world.finish(None).await;
}
