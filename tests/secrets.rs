//! No password reaches any output, whatever the connection string looks like: a property test
//! generates Postgres URLs (percent-encoded), libpq key/value strings (quoted and escaped) and
//! Redis URLs (one server, a cluster, or Sentinel with the sentinels' password too) with passwords of any characters, hands them over as a
//! flag, an environment variable or a config file, runs every subcommand of the real binary
//! against closed ports (refused at once), and reads everything it printed.
//!
//! Each password holds a random marker of eight letters and digits (`ABCD1234`): the assertion
//! looks for the marker, so it also catches a password shown percent-encoded or in part, and
//! cannot trip on ordinary output.

mod common;

use std::fmt::Write as _;
use std::process::Output;
use std::time::Duration;

use common::*;
use proptest::prelude::*;

/// Generated cases: each runs the nine subcommands at once, `run` until it has failed to reach
/// both servers (a fraction of a second); 24 cases take about 15 s on two shared cores.
const CASES: u32 = 24;

/// One-shot subcommands, each as it would be typed (the connection settings are added).
const ONE_SHOT: [&[&str]; 8] = [
    &["status"],
    &["check"],
    &["install"],
    &["uninstall"],
    &["invalidate", "--user", "1", "--dry-run"],
    &[
        "explain",
        "--table",
        "reports_report",
        "--row",
        "{\"id\": 1}",
    ],
    &["sql"],
    &["retry-dead-letters"],
];

/// How a connection string reaches the binary.
#[derive(Debug, Clone, Copy)]
enum Channel {
    Flag,
    Environment,
    ConfigFile,
}

/// How the Redis side is written.
#[derive(Debug, Clone, Copy)]
enum RedisForm {
    Server,
    Cluster,
    Sentinel,
}

/// How the Postgres side is written.
#[derive(Debug, Clone, Copy)]
enum PgForm {
    Url,
    KeyValue,
}

/// Every byte outside RFC 3986's unreserved set percent-encoded, as a careful operator (or a
/// library) writes a password into a URL.
fn percent_encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// A value in single quotes with libpq's escapes.
fn libpq_quote(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

struct Case {
    database_url: String,
    redis_url: String,
    channel: Channel,
}

fn case(password: &str, pg_form: PgForm, redis_form: RedisForm, channel: Channel) -> Case {
    let (pg_port, redis_port, second_redis_port) = (free_port(), free_port(), free_port());
    let database_url = match pg_form {
        PgForm::Url => format!(
            "postgres://app:{}@127.0.0.1:{pg_port}/reports",
            percent_encode(password)
        ),
        PgForm::KeyValue => format!(
            "host=127.0.0.1 port={pg_port} user=app password={} dbname=reports",
            libpq_quote(password)
        ),
    };
    let encoded = percent_encode(password);
    let redis_url = match redis_form {
        RedisForm::Cluster => format!(
            "redis+cluster://app:{encoded}@127.0.0.1:{redis_port},127.0.0.1:{second_redis_port}"
        ),
        RedisForm::Server => format!("redis://app:{encoded}@127.0.0.1:{redis_port}/0"),
        // The master's password and the sentinels' own.
        RedisForm::Sentinel => format!(
            "redis+sentinel://app:{encoded}@127.0.0.1:{redis_port},127.0.0.1:{second_redis_port}\
             /cache/0?sentinel_password={encoded}"
        ),
    };
    Case {
        database_url,
        redis_url,
        channel,
    }
}

/// The command for `args` with the case's connection strings passed as its channel says.
fn command(case: &Case, config_dir: &std::path::Path, args: &[&str]) -> tokio::process::Command {
    let mut full: Vec<String> = Vec::new();
    let mut env: Vec<(&str, String)> = Vec::new();
    match case.channel {
        Channel::Flag => {
            full.extend([
                "--database-url".to_owned(),
                case.database_url.clone(),
                "--redis-url".to_owned(),
                case.redis_url.clone(),
            ]);
        }
        Channel::Environment => {
            env.push(("DATABASE_URL", case.database_url.clone()));
            env.push(("REDIS_URL", case.redis_url.clone()));
        }
        Channel::ConfigFile => {
            let path = config_dir.join("config.toml");
            let text = format!(
                "database_url = {}\nredis_url = {}\n",
                toml::Value::String(case.database_url.clone()),
                toml::Value::String(case.redis_url.clone())
            );
            std::fs::write(&path, text).expect("write config file");
            full.extend(["--config".to_owned(), path.display().to_string()]);
        }
    }
    full.extend(args.iter().map(|arg| (*arg).to_owned()));
    let full: Vec<&str> = full.iter().map(String::as_str).collect();
    let mut command = daemon_command(&full);
    command.envs(env);
    command
}

async fn one_shot(command: &mut tokio::process::Command) -> Output {
    match tokio::time::timeout(PATIENCE, command.output()).await {
        Ok(output) => output.expect("run cache-invalidator"),
        Err(_) => panic!("a subcommand did not finish within {PATIENCE:?}"),
    }
}

/// `run` until it has logged a failed attempt at each server (or exited: a string that does not
/// parse stops it at once), then SIGTERM. Returns everything printed and whether both servers
/// were tried.
async fn run_until_both_refused(command: tokio::process::Command) -> (String, bool) {
    let log = tempfile::NamedTempFile::new().expect("log file");
    let mut daemon = ChildDaemon::spawn(command, log.path().to_owned());
    let both_refused = |text: &str| {
        text.contains("cannot connect to Postgres") && text.contains("redis connection failed")
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let exited = loop {
        if both_refused(&daemon.log_text()) {
            break false;
        }
        if daemon.try_wait().ok().flatten().is_some() {
            break true;
        }
        if tokio::time::Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if !exited {
        daemon.stop_within(PATIENCE).await;
    }
    let text = daemon.log_text();
    let refused = both_refused(&text);
    (text, refused)
}

/// Runs every subcommand for `case` and returns what each printed, labelled, and whether `run`
/// got as far as trying both servers.
async fn everything_printed(case: &Case) -> (Vec<(String, String)>, bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let one_shots = ONE_SHOT.iter().map(|args| {
        let mut command = command(case, dir.path(), args);
        async move {
            let output = one_shot(&mut command).await;
            (
                args.join(" "),
                format!("{}{}", stdout(&output), stderr(&output)),
            )
        }
    });
    let run = async {
        let command = command(case, dir.path(), &["run", "--metrics-addr", "127.0.0.1:0"]);
        run_until_both_refused(command).await
    };
    let (mut printed, (run, tried_both)) = tokio::join!(futures::future::join_all(one_shots), run);
    printed.push(("run".to_owned(), run));
    (printed, tried_both)
}

fn assert_nothing_leaks(marker: &str, printed: &[(String, String)]) {
    for (subcommand, text) in printed {
        assert!(
            !text.contains(marker),
            "`{subcommand}` printed the password (marker {marker}):\n{text}"
        );
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Any characters but NUL (which no argument, variable or file name can carry).
fn any_text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>().prop_filter("no NUL", |c| *c != '\0'), 0..max)
        .prop_map(|chars| chars.into_iter().collect())
}

proptest! {
    // No regressions file: a failing case is printed, shrunk, in the test's output.
    #![proptest_config(ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn no_subcommand_prints_a_password_however_the_connection_string_is_written(
        before in any_text(6),
        marker in "[A-Z]{4}[0-9]{4}",
        after in any_text(6),
        pg_form in prop_oneof![Just(PgForm::Url), Just(PgForm::KeyValue)],
        redis_form in prop_oneof![
            Just(RedisForm::Server),
            Just(RedisForm::Cluster),
            Just(RedisForm::Sentinel)
        ],
        channel in prop_oneof![
            Just(Channel::Flag),
            Just(Channel::Environment),
            Just(Channel::ConfigFile)
        ],
    ) {
        let password = format!("{before}{marker}{after}");
        let case = case(&password, pg_form, redis_form, channel);
        let (printed, tried_both) = runtime().block_on(everything_printed(&case));
        assert_nothing_leaks(&marker, &printed);
        // The strings are valid: `run` must have got as far as the servers (and logged them).
        prop_assert!(tried_both, "run never tried both servers:\n{:?}", printed.last());
    }
}

/// Strings as people mistype them: raw `/`, `?`, `@`, `#` in a URL's password, an unquoted space
/// or an unclosed quote in a key/value string. They may not parse; they must not be echoed.
#[test]
fn mistyped_connection_strings_are_not_echoed() {
    let marker = "QXZT4821";
    let closed = free_port();
    let strings = [
        format!("host=127.0.0.1 port={closed} user=bob password=se{marker} dbname=x"),
        format!("host=127.0.0.1 port={closed} user=bob password=se {marker}=x dbname=x"),
        format!("host=127.0.0.1 port={closed} user=bob password='{marker}"),
        format!("postgres://bob:12/{marker}@127.0.0.1:{closed}/x"),
        format!("postgres://bob:12?host={marker}@127.0.0.1:{closed}/x"),
        format!("postgres://bob:pa#{marker}@127.0.0.1:{closed}/x"),
        format!("postgres://bob:a@b/{marker}@127.0.0.1:{closed}/x"),
        format!("redis://bob:12/{marker}@127.0.0.1:{closed}/0"),
        format!("redis://bob:pa?{marker}@127.0.0.1:{closed}/0"),
        format!("redis+cluster://bob:pa#{marker}@127.0.0.1:{closed},127.0.0.1:{closed}"),
        format!("redis+sentinel://bob:pa?{marker}@127.0.0.1:{closed}/cache"),
        format!(
            "redis+sentinel://bob:{marker}@127.0.0.1:{closed}/cache?sentinel_password=a&{marker}"
        ),
        format!("redis+sentinel://127.0.0.1:{closed}/cache?sentinel_password=x#{marker}"),
    ];
    let runtime = runtime();
    for text in &strings {
        let (database_url, redis_url) = if text.starts_with("redis") {
            (format!("postgres://bob@127.0.0.1:{closed}/x"), text.clone())
        } else {
            (text.clone(), format!("redis://127.0.0.1:{closed}/0"))
        };
        for channel in [Channel::Flag, Channel::Environment, Channel::ConfigFile] {
            let case = Case {
                database_url: database_url.clone(),
                redis_url: redis_url.clone(),
                channel,
            };
            let dir = tempfile::tempdir().expect("temp dir");
            let printed: Vec<(String, String)> = runtime.block_on(async {
                let mut all = Vec::new();
                for args in ONE_SHOT {
                    let output = one_shot(&mut command(&case, dir.path(), args)).await;
                    all.push((
                        format!("{} ({channel:?}, {text:?})", args.join(" ")),
                        format!("{}{}", stdout(&output), stderr(&output)),
                    ));
                }
                let (printed, _) =
                    run_until_both_refused(command(&case, dir.path(), &["run"])).await;
                all.push((format!("run ({channel:?}, {text:?})"), printed));
                all
            });
            assert_nothing_leaks(marker, &printed);
        }
    }
}
