//! The subcommands: [`execute`] runs one (`run` is the daemon, [`crate::daemon::run`]); the
//! operator's others are here: install, uninstall, check, status, invalidate, explain and
//! retry-dead-letters. Each prints what it did for a person and returns whether it succeeded,
//! which `main` turns into the exit code.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::cli::Command;
use crate::matcher;
use crate::outbox;
use crate::postgres::{ConnectError, PgTarget};
use crate::redis_nodes::{NodeError, RedisTarget};
use crate::rules::{Change, RuleSet};
use crate::schema::{self, SchemaError, CHANNEL, SCHEMA};
use crate::settings::{Settings, APPLICATION_NAME};
use crate::sweep::Sweeper;
use crate::window::PatternSpec;

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Keyspace(#[from] NodeError),
    #[error(transparent)]
    Sweep(#[from] crate::window::StepError),
    #[error("postgres: {}", crate::postgres::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Input(String),
}

/// Runs one subcommand; `Ok(false)` is a clean "no" (a failed check, an unhealthy status).
/// `shutdown` stops `run`; the other subcommands are short and end on their own.
pub async fn execute(
    command: Command,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<bool> {
    match command {
        Command::Run(_) => crate::daemon::run(settings, shutdown).await?,
        Command::Install { grant_to } => println!("{}", install(&settings, &grant_to).await?),
        Command::Uninstall => println!("{}", uninstall(&settings).await?),
        Command::Sql {
            uninstall: false,
            grant_to,
        } => print!(
            "{}",
            schema::install_sql_granting(&settings.rules, &grant_to)
        ),
        Command::Sql {
            uninstall: true, ..
        } => print!("{}", schema::uninstall_sql()),
        Command::Check => {
            let (ok, report) = check(&settings).await;
            print!("{report}");
            return Ok(ok);
        }
        Command::Status { max_age } => {
            let max_age = max_age.unwrap_or(settings.max_backlog_age);
            let (healthy, report) = status(&settings, max_age).await?;
            print!("{report}");
            return Ok(healthy);
        }
        Command::Invalidate(args) => {
            let patterns = match (&args.user, &args.report) {
                (Some(user), _) => settings.rules.user_patterns(user),
                (None, Some(report)) => settings.rules.report_patterns(report),
                (None, None) => anyhow::bail!("invalidate needs --user or --report"),
            };
            print!("{}", invalidate(&settings, patterns, args.dry_run).await?);
        }
        Command::Explain { table, row } => print!("{}", explain(&settings.rules, &table, &row)?),
        Command::RetryDeadLetters { id } => {
            println!("{}", retry_dead_letters(&settings, &id).await?)
        }
    }
    Ok(true)
}

/// One line for an error and its causes, each cause added only when the message so far does not
/// already say it (many errors repeat their source in their own message).
pub fn join_causes(messages: impl IntoIterator<Item = String>) -> String {
    let mut line = String::new();
    for message in messages {
        if line.contains(&message) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&message);
    }
    line
}

/// [`join_causes`] over `error` and its `source()` chain.
pub fn error_report(error: &(dyn std::error::Error + 'static)) -> String {
    join_causes(std::iter::successors(Some(error), |e| e.source()).map(|e| e.to_string()))
}

async fn connect_pg(settings: &Settings) -> Result<(Client, PgTarget), OpsError> {
    let target = settings.postgres_target(APPLICATION_NAME)?;
    let (client, _driver) = target.connect(None).await?;
    Ok((client, target))
}

/// `install`: the schema, triggers and grants; `grant_to` are roles that may also call the request
/// functions (`--grant-to`).
pub async fn install(settings: &Settings, grant_to: &[String]) -> Result<String, OpsError> {
    let (client, _) = connect_pg(settings).await?;
    schema::install_granting(&client, &settings.rules, grant_to).await?;
    let tables = settings.rules.table_names();
    Ok(format!(
        "installed schema {SCHEMA} and triggers on {} table(s): {} ({})",
        tables.len(),
        tables.join(", "),
        settings.rules_source
    ))
}

pub async fn uninstall(settings: &Settings) -> Result<String, OpsError> {
    let (client, _) = connect_pg(settings).await?;
    schema::uninstall(&client).await?;
    Ok(format!(
        "removed the triggers and schema {SCHEMA}; the app's tables are untouched"
    ))
}

/// `check`: every line is one verdict; the result is false when any check failed.
pub async fn check(settings: &Settings) -> (bool, String) {
    let mut ok = true;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ok    rules: {} table(s) from {}",
        settings.rules.rules().len(),
        settings.rules_source
    );
    let _ = writeln!(out, "{}", shapes_report(&settings.rules));
    match connect_pg(settings).await {
        Ok((client, target)) => {
            let _ = writeln!(out, "ok    postgres: connected to {}", target.redacted());
            match schema::validate_against_database(&client, &settings.rules).await {
                Ok(()) => {
                    let _ = writeln!(out, "ok    rules: every table and column exists");
                }
                Err(error) => {
                    ok = false;
                    let _ = writeln!(out, "FAIL  rules: {}", error_report(&error));
                }
            }
            match schema::installed_differences(&client, &settings.rules).await {
                Ok(differences) if differences.is_empty() => {
                    let _ = writeln!(out, "ok    triggers: installed and matching the rules");
                }
                Ok(differences) => {
                    ok = false;
                    for difference in differences {
                        let hint = if difference.problem.contains("cache-invalidator install") {
                            ""
                        } else {
                            " (run `cache-invalidator install` with these rules)"
                        };
                        let _ = writeln!(
                            out,
                            "FAIL  triggers: {}: {}{hint}",
                            difference.table, difference.problem
                        );
                    }
                }
                Err(error) => {
                    ok = false;
                    let _ = writeln!(out, "FAIL  triggers: {}", error_report(&error));
                }
            }
            ok &= check_grants(&client, settings, &mut out).await;
        }
        Err(error) => {
            ok = false;
            let _ = writeln!(out, "FAIL  postgres: {}", error_report(&error));
        }
    }
    match redis_check(settings).await {
        Ok((target, nodes)) => {
            let _ = writeln!(
                out,
                "ok    redis: {} answered PING ({} node(s))",
                target.redacted(),
                nodes
            );
        }
        Err(error) => {
            ok = false;
            let _ = writeln!(out, "FAIL  redis: {}", error_report(&error));
        }
    }
    (ok, out)
}

/// `check`'s verdict on the request functions: every role that may write a ruled table can call
/// them (a role granted writes after `install` ran cannot until it is re-run or granted by hand).
async fn check_grants(client: &Client, settings: &Settings, out: &mut String) -> bool {
    match schema::ungranted_writers(client, &settings.rules).await {
        Ok(missing) if missing.is_empty() => {
            let _ = writeln!(
                out,
                "ok    grants: every role that may write a ruled table can call invalidate_user/invalidate_report"
            );
            true
        }
        Ok(missing) => {
            for writer in missing {
                let _ = writeln!(
                    out,
                    "FAIL  grants: role {} may write {} but cannot call invalidate_user/invalidate_report \
                     (re-run `cache-invalidator install`, or `install --grant-to {}`)",
                    writer.role, writer.table, writer.role
                );
            }
            false
        }
        Err(error) => {
            let _ = writeln!(out, "FAIL  grants: {}", error_report(&error));
            false
        }
    }
}

/// `check`'s line on the rules' pattern shapes: whether every pattern the rules can produce is
/// found by lookup in a sweep, or which key templates cost a glob match per scanned key (a `*`
/// inside a segment, a `?` or `[…]` before the first placeholder, …): a window holding many of
/// those makes every pass slower in proportion.
fn shapes_report(rules: &RuleSet) -> String {
    // A value that needs no escaping stands for every row's.
    const SAMPLE: &str = "1";
    let mut one_by_one: Vec<String> = Vec::new();
    for rule in rules.rules() {
        for template in &rule.templates {
            let mut pattern = format!("{}{}", rules.key_prefix(), template.source());
            for column in template.columns() {
                pattern = pattern.replace(&format!("{{{column}}}"), SAMPLE);
            }
            if !matcher::is_looked_up(&pattern) {
                one_by_one.push(format!("{} `{}`", rule.table, template.source()));
            }
        }
    }
    let manual = [
        ("invalidate --user", rules.user_patterns(SAMPLE)),
        ("invalidate --report", rules.report_patterns(SAMPLE)),
    ];
    for (operation, patterns) in manual {
        for pattern in patterns {
            if !matcher::is_looked_up(&pattern) {
                one_by_one.push(format!("{operation} `{pattern}`"));
            }
        }
    }
    if one_by_one.is_empty() {
        "ok    rules: every key pattern is found by lookup when sweeping (placeholders in whole \
         `:`-separated segments)"
            .to_owned()
    } else {
        format!(
            "warn  rules: {} key template(s) cost a glob match per scanned key when sweeping (a \
             wildcard in a placeholder's segment): {}",
            one_by_one.len(),
            one_by_one.join(", ")
        )
    }
}

async fn redis_check(settings: &Settings) -> Result<(RedisTarget, usize), OpsError> {
    let target = settings.redis_target()?;
    let nodes = target.connect().await?;
    for node in &nodes {
        let mut connection = node.connection.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .map_err(|source| NodeError::Redis {
                node: node.name.clone(),
                source,
            })?;
    }
    Ok((target, nodes.len()))
}

/// A worker connected to the database, as `pg_stat_activity` shows it.
#[derive(Debug, Clone)]
pub struct WorkerSession {
    pub pid: i32,
    pub client: String,
    pub since: String,
    /// How it finds keys (`index complete`, `index seeding`, `sweep`), once it said so.
    pub mode: Option<String>,
}

/// Workers holding a LISTEN connection on this database.
pub async fn connected_workers(client: &Client) -> Result<Vec<WorkerSession>, OpsError> {
    let rows = client
        .query(
            "SELECT pid, coalesce(host(client_addr), 'local'), \
             to_char(backend_start, 'YYYY-MM-DD HH24:MI:SS TZ'), application_name \
             FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name LIKE $1 \
             ORDER BY backend_start",
            &[&crate::worker::LISTENER_APPLICATION_NAME_LIKE],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| WorkerSession {
            pid: row.get(0),
            client: row.get(1),
            since: row.get(2),
            mode: crate::worker::mode_of_application_name(row.get(3)).map(str::to_owned),
        })
        .collect())
}

/// `status`: returns whether all is well: a worker is listening and the oldest pending change is
/// younger than `max_age`. A backlog that is young only because it was just written is no comfort
/// when nothing will ever clear it, so a missing worker is unhealthy whatever the backlog.
pub async fn status(
    settings: &Settings,
    max_age: std::time::Duration,
) -> Result<(bool, String), OpsError> {
    let (client, _) = connect_pg(settings).await?;
    let backlog = outbox::backlog(&client).await?;
    let workers = connected_workers(&client).await?;
    let mut out = String::new();
    let _ = writeln!(out, "outbox backlog:     {} row(s)", backlog.rows);
    let _ = writeln!(
        out,
        "oldest pending:     {:.1}s ago{}",
        backlog.oldest_age_seconds,
        if backlog.rows == 0 {
            " (nothing pending)"
        } else {
            ""
        }
    );
    let _ = writeln!(out, "dead letters:       {}", backlog.dead_letters);
    if backlog.dead_letters > 0 {
        let newest = client
            .query(
                &format!(
                    "SELECT id, table_name, op, error, to_char(failed_at, 'YYYY-MM-DD HH24:MI:SS') \
                     FROM {SCHEMA}.dead_letters ORDER BY id DESC LIMIT 5"
                ),
                &[],
            )
            .await?;
        for row in newest {
            let _ = writeln!(
                out,
                "  #{} {} {} at {}: {}",
                row.get::<_, i64>(0),
                row.get::<_, String>(1),
                row.get::<_, String>(2),
                row.get::<_, String>(4),
                row.get::<_, String>(3)
            );
        }
        let _ = writeln!(
            out,
            "  fix the rules, then: cache-invalidator retry-dead-letters"
        );
    }
    let _ = writeln!(out, "workers listening:  {}", workers.len());
    for worker in &workers {
        let _ = writeln!(
            out,
            "  pid {} from {} since {}, mode {}",
            worker.pid,
            worker.client,
            worker.since,
            worker.mode.as_deref().unwrap_or("starting")
        );
    }
    let young_enough = backlog.oldest_age_seconds <= max_age.as_secs_f64();
    if !young_enough {
        let _ = writeln!(
            out,
            "UNHEALTHY: the oldest pending change is older than {}",
            humantime::format_duration(max_age)
        );
    }
    if workers.is_empty() {
        let _ = writeln!(
            out,
            "UNHEALTHY: no worker is listening on this database: changes are recorded but nothing \
             clears them (start `cache-invalidator run`)"
        );
    }
    Ok((young_enough && !workers.is_empty(), out))
}

/// `invalidate`: the keys matching `patterns` on every node. With `dry_run`, only lists them.
pub async fn invalidate(
    settings: &Settings,
    patterns: BTreeSet<String>,
    dry_run: bool,
) -> Result<String, OpsError> {
    let target = settings.redis_target()?;
    let nodes = target.connect().await?;
    let mut out = String::new();
    for pattern in &patterns {
        let _ = writeln!(out, "pattern: {pattern}");
    }
    let mut sweeper = match dry_run {
        true => Sweeper::listing(nodes),
        false => Sweeper::new(nodes),
    };
    let label: std::sync::Arc<str> = std::sync::Arc::from("manual");
    let specs: Vec<PatternSpec> = patterns
        .iter()
        .map(|pattern| PatternSpec {
            pattern: pattern.as_str().into(),
            label: label.clone(),
        })
        .collect();
    let (mut deleted, mut listed) = (0, BTreeSet::new());
    if sweeper.add_window(&specs, false).is_some() {
        while sweeper.is_busy() {
            let report = sweeper.step().await?;
            deleted += report.deleted.values().sum::<u64>();
            listed.extend(report.listed);
        }
    }
    if dry_run {
        for key in &listed {
            let _ = writeln!(out, "{}", String::from_utf8_lossy(key));
        }
        let _ = writeln!(
            out,
            "{} key(s) would be deleted (dry run: nothing deleted)",
            listed.len()
        );
        return Ok(out);
    }
    let _ = writeln!(out, "{deleted} key(s) deleted");
    Ok(out)
}

/// `explain`: the patterns a change to `row` of `table` clears (as an INSERT, DELETE or one side
/// of an UPDATE would).
pub fn explain(rules: &RuleSet, table: &str, row: &str) -> Result<String, OpsError> {
    let value: serde_json::Value = serde_json::from_str(row)
        .map_err(|error| OpsError::Input(format!("--row is not JSON: {error}")))?;
    if !value.is_object() {
        return Err(OpsError::Input(
            "--row must be a JSON object like '{\"id\": 7}'".to_owned(),
        ));
    }
    if rules.rule(table).is_none() {
        let named: Vec<String> = rules.rules().iter().map(|r| r.table.to_string()).collect();
        return Err(OpsError::Input(format!(
            "no rule names table {table:?}, so its changes clear nothing; the rules name: {}",
            named.join(", ")
        )));
    }
    let rows = serde_json::Value::Array(vec![value]);
    let expansion = rules
        .expand(&Change {
            table,
            operation: "INSERT",
            rows: Some(&rows),
        })
        .map_err(|error| OpsError::Input(error.to_string()))?;
    let mut out = String::new();
    for pattern in &expansion.patterns {
        let _ = writeln!(out, "{pattern}");
    }
    if expansion.patterns.is_empty() {
        let _ = writeln!(out, "(no pattern: every value a key needs is NULL)");
    }
    Ok(out)
}

/// `retry-dead-letters`: moves dead letters (all, or `ids`) back into the outbox.
pub async fn retry_dead_letters(settings: &Settings, ids: &[i64]) -> Result<String, OpsError> {
    let (mut client, _) = connect_pg(settings).await?;
    let transaction = client.transaction().await?;
    let moved = transaction
        .execute(
            &format!(
                "WITH moved AS (DELETE FROM {SCHEMA}.dead_letters \
                 WHERE cardinality($1::bigint[]) = 0 OR id = ANY($1) RETURNING table_name, op, rows, id) \
                 INSERT INTO {SCHEMA}.outbox (table_name, op, rows) \
                 SELECT table_name, op, rows FROM moved ORDER BY id"
            ),
            &[&ids],
        )
        .await?;
    transaction
        .batch_execute(&format!("NOTIFY {CHANNEL}"))
        .await?;
    transaction.commit().await?;
    Ok(format!("{moved} dead letter(s) put back into the outbox"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_the_templates_that_are_matched_one_by_one() {
        let builtin = shapes_report(&RuleSet::builtin());
        assert!(builtin.starts_with("ok "), "{builtin}");
        let rules = RuleSet::from_toml(
            r#"
            [[rules]]
            table = "reports_report"
            keys = ["report:{id}:*", "report:*{author_id}:*", "r?port:*:{id}:*"]
            "#,
            "test rules",
        )
        .expect("valid rules");
        let report = shapes_report(&rules);
        assert!(report.starts_with("warn "), "{report}");
        assert!(report.contains("2 key template(s)"), "{report}");
        assert!(report.contains("`report:*{author_id}:*`"), "{report}");
        assert!(report.contains("`r?port:*:{id}:*`"), "{report}");
        assert!(!report.contains("`report:{id}:*`"), "{report}");
    }
}
