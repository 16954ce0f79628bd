//! Settings as an operator meets them, through the real binary: flags beat the environment, which
//! beats the config file, which beats the defaults — for every subcommand, `run`'s settings
//! included — and an invalid value anywhere stops the command with the file and key (or the
//! variable) named. `DATABASE_URL` also takes a libpq key/value string.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;

fn write_config(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config file");
    path.to_str().expect("utf-8 path").to_owned()
}

/// `status` with the config file `config` (and `flags`) against `database_url`, with
/// `CACHE_INVALIDATOR_MAX_BACKLOG_AGE` set to `env_age` when given.
async fn status_with_age(
    config: &str,
    flags: &[&str],
    database_url: &str,
    env_age: Option<&str>,
) -> Output {
    let mut args = vec!["--config", config, "status"];
    args.extend_from_slice(flags);
    let mut env = vec![("DATABASE_URL", database_url)];
    env.extend(env_age.map(|age| ("CACHE_INVALIDATOR_MAX_BACKLOG_AGE", age)));
    run_cli(&args, &env).await
}

/// A database whose outbox holds one change recorded ten seconds ago, and no worker.
async fn database_with_an_old_change(tag: &str) -> TestDb {
    let db = TestDb::with_reports(tag, &rules_with_prefix(":1:")).await;
    db.client()
        .await
        .batch_execute(
            "INSERT INTO cache_invalidator.outbox (table_name, op, rows, created_at) \
             VALUES ('reports_report', 'INSERT', '[{\"id\": 1}]', now() - interval '10 seconds')",
        )
        .await
        .expect("insert an old change");
    db
}

#[tokio::test]
async fn invalid_config_values_fail_every_subcommand_naming_the_file_and_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (key, line) in [
        ("log_format", "log_format = \"xml\""),
        ("refill_guard", "refill_guard = \"soon\""),
        ("mode", "mode = \"fast\""),
        ("metrics_addr", "metrics_addr = \"everywhere\""),
        ("index_max_keys", "index_max_keys = \"lots\""),
    ] {
        let config = write_config(dir.path(), &format!("{key}.toml"), &format!("{line}\n"));
        for subcommand in [&["status"][..], &["check"], &["sql"]] {
            let mut args = vec!["--config", config.as_str()];
            args.extend_from_slice(subcommand);
            let output = run_cli(&args, &[]).await;
            let text = stderr(&output);
            assert_eq!(output.status.code(), Some(2), "{args:?}: {text}");
            assert!(
                text.contains(&format!("config file {config}: {key}:")),
                "{args:?}: {text}"
            );
        }
    }
    let unknown = write_config(dir.path(), "unknown.toml", "refill_gaurd = \"2s\"\n");
    let output = run_cli(&["--config", &unknown, "status"], &[]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("unknown key \"refill_gaurd\""),
        "{}",
        stderr(&output)
    );
}

#[tokio::test]
async fn a_run_setting_in_the_environment_is_validated_and_honoured_by_status() {
    let invalid = run_cli(&["status"], &[("CACHE_INVALIDATOR_REFILL_GUARD", "soon")]).await;
    assert_eq!(invalid.status.code(), Some(2), "{}", stderr(&invalid));
    assert!(
        stderr(&invalid).contains("environment variable CACHE_INVALIDATOR_REFILL_GUARD: \"soon\""),
        "{}",
        stderr(&invalid)
    );

    // `status`'s age limit defaults to max_backlog_age: from the environment over the file.
    let db = database_with_an_old_change("settings_env").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), "c.toml", "max_backlog_age = \"1h\"\n");
    let from_env = status_with_age(&config, &[], &db.url, Some("2s")).await;
    assert!(
        stdout(&from_env).contains("UNHEALTHY: the oldest pending change is older than 2s"),
        "{}{}",
        stdout(&from_env),
        stderr(&from_env)
    );
    let from_file = status_with_age(&config, &[], &db.url, None).await;
    assert!(
        !stdout(&from_file).contains("older than"),
        "{}",
        stdout(&from_file)
    );
    // The flag beats both.
    let from_flag = status_with_age(&config, &["--max-age", "3s"], &db.url, Some("2s")).await;
    assert!(
        stdout(&from_flag).contains("older than 3s"),
        "{}",
        stdout(&from_flag)
    );
    db.drop().await;
}

#[tokio::test]
async fn the_log_format_follows_flag_then_environment_then_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let json_file = write_config(dir.path(), "json.toml", "log_format = \"json\"\n");
    let text_file = write_config(dir.path(), "text.toml", "log_format = \"text\"\n");
    // A refused connection makes every run log one error line, in the format in force.
    let unreachable = format!("postgres://postgres@127.0.0.1:{}/x", free_port());
    let is_json = |output: &Output| {
        let text = stderr(output);
        let line = text.lines().last().unwrap_or_default().to_owned();
        serde_json::from_str::<serde_json::Value>(&line).is_ok()
    };
    let env = [("DATABASE_URL", unreachable.as_str())];
    let file = run_cli(&["--config", &json_file, "status"], &env).await;
    assert!(is_json(&file), "{}", stderr(&file));
    let env_over_file = run_cli(
        &["--config", &text_file, "status"],
        &[
            ("DATABASE_URL", unreachable.as_str()),
            ("CACHE_INVALIDATOR_LOG_FORMAT", "json"),
        ],
    )
    .await;
    assert!(is_json(&env_over_file), "{}", stderr(&env_over_file));
    let flag_over_env = run_cli(
        &["--config", &json_file, "--log-format", "text", "status"],
        &[
            ("DATABASE_URL", unreachable.as_str()),
            ("CACHE_INVALIDATOR_LOG_FORMAT", "json"),
        ],
    )
    .await;
    assert!(!is_json(&flag_over_env), "{}", stderr(&flag_over_env));
    assert!(stderr(&flag_over_env).contains("cannot connect to Postgres"));
}

#[tokio::test]
async fn database_url_may_be_a_libpq_key_value_string() {
    let db = database_with_an_old_change("settings_kv").await;
    // The same server and user as the tests' own URL, written the other way.
    let admin = url::Url::parse(&admin_database_url()).expect("test database URL");
    let key_value = format!(
        "host={} port = {} user={} dbname='{}' application_name='an app'",
        admin.host_str().unwrap_or("127.0.0.1"),
        admin.port().unwrap_or(5432),
        admin.username(),
        db.name
    );
    let output = run_cli(&["status"], &[("DATABASE_URL", &key_value)]).await;
    let text = stdout(&output);
    // Reached the database: one pending change, no worker (exit 1, not 2).
    assert_eq!(output.status.code(), Some(1), "{text}{}", stderr(&output));
    assert!(text.contains("outbox backlog:     1 row(s)"), "{text}");
    db.drop().await;
}
