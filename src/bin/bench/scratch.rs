//! The bench's own servers and data: a private `redis-server` on a free port (never the shared
//! one: the bench loads a million keys and deletes thousands), and a scratch Postgres database with
//! the app's four report tables, created at the start and dropped at the end.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cache_invalidator::rules::RuleSet;
use tokio_postgres::{Client, NoTls};

use crate::keyspace::{Layout, KINDS, OWNER_FACTOR};

/// The four report tables of the Django app and the user table they cascade from (the same as
/// the integration tests' `REPORT_TABLES_SQL`).
const REPORT_TABLES_SQL: &str = r#"
CREATE TABLE auth_user (id serial PRIMARY KEY, username text NOT NULL DEFAULT '');
CREATE TABLE reports_report (
    id serial PRIMARY KEY, title text NOT NULL DEFAULT '', body text NOT NULL DEFAULT '',
    author_id integer REFERENCES auth_user (id) ON DELETE CASCADE,
    updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE reports_studentreport (
    id serial PRIMARY KEY, title text NOT NULL DEFAULT '',
    student_id integer REFERENCES auth_user (id) ON DELETE CASCADE,
    teacher_id integer REFERENCES auth_user (id) ON DELETE CASCADE);
CREATE TABLE reports_tutorweeklyreport (
    id serial PRIMARY KEY, week date, notes text NOT NULL DEFAULT '',
    tutor_id integer REFERENCES auth_user (id) ON DELETE CASCADE,
    student_id integer REFERENCES auth_user (id) ON DELETE CASCADE);
CREATE TABLE reports_teacherweeklyreport (
    id serial PRIMARY KEY, week date, notes text NOT NULL DEFAULT '',
    teacher_id integer REFERENCES auth_user (id) ON DELETE CASCADE,
    student_id integer REFERENCES auth_user (id) ON DELETE CASCADE);
"#;

/// A `redis-server` of the bench's own, killed when dropped.
pub struct PrivateRedis {
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .expect("a free port for the private redis-server");
        let dir = std::env::temp_dir().join(format!("cache-invalidator-bench-{port}"));
        std::fs::create_dir_all(&dir).expect("a temp dir for the private redis-server");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", &dir.display().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it on PATH?)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server on {port} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        PrivateRedis { port, child, dir }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(connection);
    client
}

/// A database of the bench's own on the server `admin_url` names.
pub struct ScratchDb {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl ScratchDb {
    /// Creates the database with the report tables filled for `layout` and the triggers of `rules`.
    pub async fn create(admin_url: &str, layout: &Layout, rules: &RuleSet) -> ScratchDb {
        let name = format!("cache_invalidator_bench_{}", std::process::id());
        let admin = connect(admin_url).await;
        for statement in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ] {
            admin
                .batch_execute(&statement)
                .await
                .expect("create the scratch database");
        }
        let mut url = url::Url::parse(admin_url).expect("a valid --database-url");
        url.set_path(&format!("/{name}"));
        let db = ScratchDb {
            name,
            url: url.to_string(),
            admin_url: admin_url.to_owned(),
        };
        let client = connect(&db.url).await;
        client
            .batch_execute(REPORT_TABLES_SQL)
            .await
            .expect("create the report tables");
        client
            .batch_execute(&format!(
                "INSERT INTO auth_user (username) SELECT 'user' || g FROM generate_series(1, {}) g",
                layout.users
            ))
            .await
            .expect("fill auth_user");
        for (kind_index, kind) in KINDS.iter().enumerate() {
            // Owners follow Layout::initial_owner, so the bench knows them without asking.
            let owners: Vec<String> = (0..kind.owners.len())
                .map(|column| {
                    format!(
                        "1 + ((g::bigint * {}) + {kind_index}) % {}",
                        OWNER_FACTOR[column], layout.users
                    )
                })
                .collect();
            client
                .batch_execute(&format!(
                    "INSERT INTO {} ({}, {}) SELECT 'row ' || g, {} FROM generate_series(1, {}) g",
                    kind.table,
                    kind.text,
                    kind.owners.join(", "),
                    owners.join(", "),
                    layout.rows
                ))
                .await
                .expect("fill a report table");
        }
        client
            .batch_execute("VACUUM ANALYZE")
            .await
            .expect("vacuum the scratch database");
        cache_invalidator::schema::install(&client, rules)
            .await
            .expect("install the triggers");
        db
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    pub async fn drop(self) {
        connect(&self.admin_url)
            .await
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .expect("drop the scratch database");
    }
}
