//! Postgres for the tests: a database of a test's own on the shared server (created and
//! dropped), and private Postgres clusters for the tests that stop, restart or reconfigure one.

use std::process::{Command, Stdio};
use std::time::Duration;

use cache_invalidator::rules::RuleSet;
use tokio_postgres::types::{FromSqlOwned, ToSql};
use tokio_postgres::Client;

use super::certs::TestCerts;
use super::redis::KeyPrefix;
use super::servers::{connect, create_database, drop_database, free_port, REPORT_TABLES_SQL};
use super::wait::wait_until;
use super::{run_checked, unique};

pub fn admin_database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database created for one test and dropped by [`TestDb::drop`].
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl TestDb {
    /// An empty database on the shared server.
    pub async fn empty(tag: &str) -> TestDb {
        TestDb::empty_on(&admin_database_url(), tag).await
    }

    /// An empty database on the server `admin_url` points at.
    pub async fn empty_on(admin_url: &str, tag: &str) -> TestDb {
        let name = unique(&format!("ci_test_{tag}")).to_lowercase();
        TestDb {
            url: create_database(admin_url, &name).await,
            name,
            admin_url: admin_url.to_owned(),
        }
    }

    /// A database with the report tables and the triggers installed for `rules`.
    pub async fn with_reports(tag: &str, rules: &RuleSet) -> TestDb {
        TestDb::with_reports_on(&admin_database_url(), tag, rules).await
    }

    /// A database with the report tables and the triggers for `rules` on the server `admin_url`
    /// points at (a private cluster).
    pub async fn with_reports_on(admin_url: &str, tag: &str, rules: &RuleSet) -> TestDb {
        let db = TestDb::empty_on(admin_url, tag).await;
        let client = db.client().await;
        client
            .batch_execute(REPORT_TABLES_SQL)
            .await
            .expect("create tables");
        cache_invalidator::schema::install(&client, rules)
            .await
            .expect("install triggers");
        db
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    pub async fn outbox_rows(&self) -> i64 {
        self.rows_in("cache_invalidator.outbox").await
    }

    pub async fn dead_letters(&self) -> i64 {
        self.rows_in("cache_invalidator.dead_letters").await
    }

    async fn rows_in(&self, table: &str) -> i64 {
        let sql = format!("SELECT count(*) FROM {table}");
        count(&self.client().await, &sql, &[]).await
    }

    pub async fn drop(self) {
        drop_database(&self.admin_url, &self.name).await;
    }

    /// `reports` report rows, ids 1..=reports, report `id` written by user `1 + (id - 1) / 10` (ten
    /// reports per author). The outbox rows of this setup are removed so only the test's own
    /// changes are pending.
    pub async fn seed_reports(&self, reports: i32) {
        self.client()
            .await
            .batch_execute(&format!(
                "INSERT INTO auth_user (id) SELECT g FROM generate_series(1, {users}) g;
                 INSERT INTO reports_report (id, author_id)
                     SELECT g, 1 + (g - 1) / 10 FROM generate_series(1, {reports}) g;
                 DELETE FROM cache_invalidator.outbox;",
                users = (reports + 9) / 10,
            ))
            .await
            .expect("seed reports");
    }

    /// Outbox rows locked right now by the sessions named `application_name`: a locked row's
    /// `xmax` is the locking transaction's id, which `pg_stat_activity.backend_xid` shows per
    /// session.
    pub async fn rows_held_by(&self, application_name: &str) -> i64 {
        let sql = "SELECT count(*) FROM cache_invalidator.outbox WHERE xmax IN \
                   (SELECT backend_xid FROM pg_stat_activity \
                    WHERE datname = current_database() AND application_name = $1 \
                    AND backend_xid IS NOT NULL)";
        count(&self.client().await, sql, &[&application_name]).await
    }

    /// Waits until exactly `count` workers listen on this database; panics after `within`.
    pub async fn wait_for_workers(&self, count: usize, within: Duration) {
        let client = self.client().await;
        assert!(
            wait_until(within, || async {
                cache_invalidator::ops::connected_workers(&client)
                    .await
                    .map(|workers| workers.len())
                    .unwrap_or(0)
                    == count
            })
            .await,
            "{count} worker(s) never listened"
        );
    }

    /// Waits until the outbox is empty (every change acknowledged); panics after `within`.
    pub async fn wait_for_empty_outbox(&self, within: Duration) {
        assert!(
            wait_until(within, || async { self.outbox_rows().await == 0 }).await,
            "the outbox never emptied: {} row(s) left",
            self.outbox_rows().await
        );
    }
}

/// The single `count(*)` (or other bigint) that `sql` selects.
pub async fn count(client: &Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> i64 {
    client
        .query_one(sql, params)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// The rows `sql` selects, as pairs of their first two columns.
pub async fn pairs<A, B>(client: &Client, sql: &str) -> Vec<(A, B)>
where
    A: FromSqlOwned,
    B: FromSqlOwned,
{
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// A key space of its own for `tag`, and a database with the report tables and the triggers of
/// the default rules under that key space's prefix.
pub async fn space_with_reports(tag: &str) -> (KeyPrefix, TestDb) {
    let space = KeyPrefix::new(tag);
    let db = TestDb::with_reports(tag, &space.rules()).await;
    (space, db)
}

/// Commits report `id` by user `author` (created if missing), in a transaction of its own.
pub async fn commit_report(client: &Client, id: i64, author: i64) {
    client
        .batch_execute(&format!(
            "INSERT INTO auth_user (id) VALUES ({author}) ON CONFLICT DO NOTHING;
             INSERT INTO reports_report (id, author_id) VALUES ({id}, {author});"
        ))
        .await
        .unwrap_or_else(|e| panic!("commit report {id}: {e}"));
}

/// Commits one-row UPDATEs setting the title of reports `ids` to `title`, `per_commit` statements
/// per transaction: an outbox row per statement, and many commits to wake the workers.
pub async fn retitle_in_transactions(
    client: &Client,
    ids: std::ops::RangeInclusive<i32>,
    per_commit: usize,
    title: &str,
) {
    let ids: Vec<i32> = ids.collect();
    for chunk in ids.chunks(per_commit) {
        let statements: String = chunk
            .iter()
            .map(|id| format!("UPDATE reports_report SET title = '{title}' WHERE id = {id};"))
            .collect();
        client
            .batch_execute(&format!("BEGIN; {statements} COMMIT;"))
            .await
            .expect("burst");
    }
}

/// `url` (a Postgres URL) with `application_name=name`, to tell one client's sessions apart.
pub fn with_application_name(url: &str, name: &str) -> String {
    let mut url = url::Url::parse(url).expect("database url");
    url.query_pairs_mut().append_pair("application_name", name);
    url.to_string()
}

/// Whether this process runs as root: initdb refuses to, so the cluster then runs as `postgres`.
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}

/// Where a Postgres server program is: on `PATH`, else in the newest Debian server package
/// (`/usr/lib/postgresql/<version>/bin`, which Debian keeps off `PATH`).
fn pg_bin(program: &str) -> std::path::PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    });
    if let Some(found) = on_path {
        return found;
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin").join(program)))
        })
        .filter(|(_, candidate)| candidate.is_file())
        .max_by_key(|(version, _)| *version);
    match newest {
        Some((_, found)) => found,
        None => panic!("{program} not found on PATH nor in /usr/lib/postgresql/*/bin"),
    }
}

/// A Postgres server program, run as the `postgres` OS user when this process is root.
fn pg_program(program: &str) -> Command {
    let path = pg_bin(program);
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(path);
        command
    } else {
        Command::new(path)
    }
}

/// Hands `path` to the `postgres` OS user (when running as root), so the server can use it.
fn give_to_postgres(path: &std::path::Path) {
    if running_as_root() {
        run_checked(
            Command::new("chown").args(["-R", "postgres:"]).arg(path),
            "chown to postgres",
        );
    }
}

/// A Postgres cluster of this test's own: `initdb` in a temp dir, started with `pg_ctl` on a free
/// port (socket in the same dir), stopped with `-m immediate` when dropped. Durability is off: a
/// test cluster lives for seconds.
pub struct PrivatePostgres {
    pub port: u16,
    dir: tempfile::TempDir,
}

/// Server settings every private cluster gets: small and fast, enough connections for a daemon,
/// the test's clients and the helpers.
const PRIVATE_PG_SETTINGS: [(&str, &str); 5] = [
    ("listen_addresses", "127.0.0.1"),
    ("fsync", "off"),
    ("full_page_writes", "off"),
    ("shared_buffers", "16MB"),
    ("max_connections", "50"),
];

impl PrivatePostgres {
    pub fn start() -> PrivatePostgres {
        PrivatePostgres::start_with(&[])
    }

    /// With TLS (`ssl=on`) using `certs`' server certificate; plain connections stay allowed.
    pub fn start_tls(certs: &TestCerts) -> PrivatePostgres {
        let dir = PrivatePostgres::init();
        let cert = dir.path().join("server.pem");
        let key = dir.path().join("server.key");
        std::fs::copy(certs.cert_file(), &cert).expect("copy server certificate");
        std::fs::copy(certs.key_file(), &key).expect("copy server key");
        // Postgres refuses a key file others can read.
        run_checked(
            Command::new("chmod").arg("600").arg(&key),
            "chmod server key",
        );
        give_to_postgres(dir.path());
        let cert = cert.display().to_string();
        let key = key.display().to_string();
        PrivatePostgres::launch(
            dir,
            &[
                ("ssl", "on"),
                ("ssl_cert_file", &cert),
                ("ssl_key_file", &key),
            ],
        )
    }

    /// With extra server settings (`-c name=value`).
    pub fn start_with(settings: &[(&str, &str)]) -> PrivatePostgres {
        PrivatePostgres::launch(PrivatePostgres::init(), settings)
    }

    fn init() -> tempfile::TempDir {
        let dir = tempfile::Builder::new()
            .prefix("ci-pg-")
            .tempdir()
            .expect("temp dir");
        give_to_postgres(dir.path());
        run_checked(
            pg_program("initdb")
                .arg("-D")
                .arg(dir.path().join("data"))
                .args(["--auth=trust", "-U", "postgres", "--no-sync"]),
            "initdb",
        );
        dir
    }

    fn launch(dir: tempfile::TempDir, settings: &[(&str, &str)]) -> PrivatePostgres {
        // A port found free may be taken before the server binds it: try a few.
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = free_port();
            let mut options = format!("-p {port} -k {}", dir.path().display());
            for (name, value) in PRIVATE_PG_SETTINGS.iter().chain(settings) {
                options.push_str(&format!(" -c {name}={value}"));
            }
            let output = pg_program("pg_ctl")
                .arg("-D")
                .arg(dir.path().join("data"))
                .arg("-l")
                .arg(dir.path().join("server.log"))
                .args(["-o", &options, "-w", "start"])
                .stdin(Stdio::null())
                .output()
                .expect("run pg_ctl");
            if output.status.success() {
                return PrivatePostgres { port, dir };
            }
            last_error = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
        }
        panic!("private postgres did not start:\n{last_error}");
    }

    /// The `postgres` database, as superuser `postgres`, without TLS options.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut command = pg_program("pg_ctl");
        command
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(args);
        command
    }

    /// `pg_ctl restart -m fast`: every session is terminated, the server is back when this returns.
    pub fn restart(&self) {
        run_checked(
            &mut self.pg_ctl(&["restart", "-m", "fast", "-w"]),
            "pg_ctl restart",
        );
    }

    /// A streaming standby of this server (`pg_basebackup -R`), started on a port of its own, and
    /// this server made to wait for it on every commit (`synchronous_standby_names = '*'`,
    /// set after the copy so that the standby, once promoted, waits for nobody): a change the
    /// app saw committed is on both.
    pub async fn start_synchronous_standby(&self) -> PrivatePostgres {
        let dir = tempfile::Builder::new()
            .prefix("ci-pg-standby-")
            .tempdir()
            .expect("temp dir");
        give_to_postgres(dir.path());
        let port = self.port.to_string();
        let copy = || {
            run_checked(
                pg_program("pg_basebackup")
                    .arg("-D")
                    .arg(dir.path().join("data"))
                    .args(["-R", "-X", "stream", "--no-sync", "-h", "127.0.0.1"])
                    .args(["-p", &port, "-U", "postgres"]),
                "pg_basebackup",
            )
        };
        tokio::task::block_in_place(copy);
        let standby = tokio::task::block_in_place(|| PrivatePostgres::launch(dir, &[]));
        let primary = connect(&self.url()).await;
        // Two statements: ALTER SYSTEM may not run in the transaction a batch would be.
        for statement in [
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
            "SELECT pg_reload_conf()",
        ] {
            primary
                .batch_execute(statement)
                .await
                .expect("make the standby synchronous");
        }
        let sync = "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'";
        let synchronous = wait_until(Duration::from_secs(30), || async {
            primary
                .query_one(sync, &[])
                .await
                .is_ok_and(|row| row.get::<_, i64>(0) == 1)
        })
        .await;
        assert!(
            synchronous,
            "the standby never became synchronous:\n{}",
            standby.log()
        );
        standby
    }

    /// `pg_ctl stop -m immediate`: the server is gone at once, as if its host died.
    pub fn stop_immediately(&self) {
        run_checked(
            &mut self.pg_ctl(&["stop", "-m", "immediate", "-w"]),
            "pg_ctl stop",
        );
    }

    /// `pg_ctl promote`: a standby becomes a primary; it accepts writes when this returns.
    pub fn promote(&self) {
        run_checked(&mut self.pg_ctl(&["promote", "-w"]), "pg_ctl promote");
    }

    /// The server's log so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .pg_ctl(&["stop", "-m", "immediate", "-w"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Commits a one-row UPDATE of report `id`: a change whose keys must go.
pub async fn touch_report(client: &tokio_postgres::Client, id: i32) {
    client
        .execute(
            "UPDATE reports_report SET title = title || '.' WHERE id = $1",
            &[&id],
        )
        .await
        .expect("update");
}
