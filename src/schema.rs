//! The Postgres side of the contract: the `cache_invalidator` schema, its outbox, and the triggers
//! that record every committed change of a ruled table, generated from the rules.
//!
//! Triggers are statement-level with transition tables: a 100,000-row `UPDATE` runs the trigger
//! once, which writes the distinct values the key templates need (OLD and NEW) into a handful of
//! outbox rows of at most [`ROWS_PER_OUTBOX_ENTRY`] values each, then sends one constant-payload
//! `pg_notify` (Postgres folds identical notifications in a transaction, so a statement or a whole
//! transaction wakes the worker once, at commit, and a rollback sends nothing).
//!
//! An outbox row holds its values column-wise, `{"author_id": [3, 4], "id": [1, 2]}` (the i-th
//! element of every array is one changed row), because that is what the trigger builds cheapest:
//! one `array_agg` per column and one JSON object per outbox row, where an array of objects
//! (`[{"author_id": 3, "id": 1}, …]`) built one JSON object per changed row and cost a 10,000-row
//! `UPDATE` 2.7× its time without triggers. The worker reads both forms ([`crate::rules`]).

use std::fmt::Write as _;

use tokio_postgres::Client;

use crate::rules::{RuleSet, TableRule, MANUAL_REPORT_TABLE, MANUAL_USER_TABLE};

/// Schema that holds everything the daemon creates (contract).
pub const SCHEMA: &str = "cache_invalidator";
/// Notification channel (contract).
pub const CHANNEL: &str = "cache_invalidator";
/// Values per outbox row for bulk statements. Bounds what one row costs the worker in memory
/// (64 values × 3 templates ≈ 200 patterns) while keeping a 10,000-row statement to ~160 inserts.
pub const ROWS_PER_OUTBOX_ENTRY: usize = 64;
/// Prefix of every trigger the daemon installs; `install` drops those no rule asks for any more.
const TRIGGER_PREFIX: &str = "cache_invalidator_";

/// The app's request functions (`invalidate_user` / `invalidate_report`, each taking text or
/// bigint): callable only by the roles that may write a ruled table and those named with
/// `install --grant-to`.
pub const REQUEST_FUNCTIONS: [&str; 4] = [
    "cache_invalidator.invalidate_user(text)",
    "cache_invalidator.invalidate_user(bigint)",
    "cache_invalidator.invalidate_report(text)",
    "cache_invalidator.invalidate_report(bigint)",
];

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "--grant-to {role:?}: no such role (create it first, or check the spelling); nothing was installed"
    )]
    NoSuchRole { role: String },
    #[error("table {table} does not exist (named by a rule)")]
    MissingTable { table: String },
    #[error("table {table} has no column {column:?} (named by {used_by})")]
    MissingColumn {
        table: String,
        column: String,
        used_by: String,
    },
    #[error("rules {first} and {second} name the same table: put all its keys in one rule")]
    SameTable { first: String, second: String },
    #[error("table {table}: column {column:?} cannot be recorded for a key: {reason}")]
    UnusableColumn {
        table: String,
        column: String,
        reason: String,
    },
    #[error("postgres: {}", crate::postgres::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
}

/// Quotes an identifier for SQL: `"name"`, with embedded quotes doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal for SQL.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn qualified_table(rule: &TableRule) -> String {
    match &rule.table.schema {
        Some(schema) => format!("{}.{}", quote_ident(schema), quote_ident(&rule.table.name)),
        None => quote_ident(&rule.table.name),
    }
}

fn capture_function(rule: &TableRule) -> String {
    format!(
        "{SCHEMA}.{}",
        quote_ident(&format!("capture {}", rule.table))
    )
}

/// Objects that do not depend on the rules: the outbox, dead letters and the app's functions.
fn base_sql() -> String {
    format!(
        r#"CREATE SCHEMA IF NOT EXISTS {SCHEMA};

-- One row per captured statement (per {ROWS_PER_OUTBOX_ENTRY} changed rows of it): the values the key
-- templates need, OLD and NEW alike, one JSON array per column ({{"id": [1, 2], "author_id": [3, 4]}});
-- a JSON array of objects ([{{"id": 1, "author_id": 3}}, …]) is read too. The worker deletes a row only
-- after Redis confirmed the deletes of its keys.
CREATE TABLE IF NOT EXISTS {SCHEMA}.outbox (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    table_name  text NOT NULL,
    op          text NOT NULL,
    rows        jsonb
);

-- Rows the worker could not use, with the reason; `cache-invalidator retry-dead-letters` puts them
-- back into the outbox once the rules are fixed.
CREATE TABLE IF NOT EXISTS {SCHEMA}.dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    outbox_id   bigint NOT NULL,
    created_at  timestamptz NOT NULL,
    table_name  text NOT NULL,
    op          text NOT NULL,
    rows        jsonb,
    error       text NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Transactional requests from the app: they go through the outbox, so they happen only if the
-- calling transaction commits.
{user_function}

{report_function}
GRANT USAGE ON SCHEMA {SCHEMA} TO PUBLIC;
-- A new function is callable by PUBLIC; these write the outbox as its owner, so anyone could clear
-- every user's cache and flood the worker. Only the roles that may write a ruled table get them
-- (granted below, after the rules' tables).
REVOKE EXECUTE ON FUNCTION {functions} FROM PUBLIC;
"#,
        functions = REQUEST_FUNCTIONS.join(", "),
        user_function = manual_request_sql("invalidate_user", "user_id", MANUAL_USER_TABLE),
        report_function = manual_request_sql("invalidate_report", "report_id", MANUAL_REPORT_TABLE),
    )
}

/// `{SCHEMA}.<function>(<argument> text|bigint)`: the app's request to clear what one user or
/// report names, recorded in the outbox as an `INVALIDATE` row of pseudo-table `table`.
fn manual_request_sql(function: &str, argument: &str, table: &str) -> String {
    format!(
        r#"CREATE OR REPLACE FUNCTION {SCHEMA}.{function}({argument} text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    INSERT INTO {SCHEMA}.outbox (table_name, op, rows)
    VALUES ({table}, 'INVALIDATE', jsonb_build_array(jsonb_build_object('{argument}', {argument})));
    PERFORM pg_notify('{CHANNEL}', '');
END
$fn$;
CREATE OR REPLACE FUNCTION {SCHEMA}.{function}({argument} bigint) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$ SELECT {SCHEMA}.{function}({argument}::text) $fn$;"#,
        table = quote_literal(table),
    )
}

/// How the trigger takes one outbox row's share of a column array: elements `s.n` to
/// `s.n + ROWS_PER_OUTBOX_ENTRY - 1` (`generate_series` steps `s.n` by [`ROWS_PER_OUTBOX_ENTRY`]),
/// with the operator qualified like everything in the capture function
/// ([`capture_function_sql`]). [`recorded_columns`] reads it back.
fn chunk_slice() -> String {
    format!(
        "[s.n:s.n OPERATOR(pg_catalog.+) {}])",
        ROWS_PER_OUTBOX_ENTRY - 1
    )
}

/// The outbox `rows` value of one chunk: `pg_catalog.jsonb_build_object('id',
/// pg_catalog.to_jsonb(c."id"[s.n:s.n OPERATOR(pg_catalog.+) 63]), …)` over the rule's columns,
/// reading the column arrays of alias `c`.
fn chunk_object(columns: &[String]) -> String {
    let pairs: Vec<String> = columns
        .iter()
        .map(|column| {
            format!(
                "{}, pg_catalog.to_jsonb(c.{}{}",
                quote_literal(column),
                quote_ident(column),
                chunk_slice()
            )
        })
        .collect();
    format!("pg_catalog.jsonb_build_object({})", pairs.join(", "))
}

/// `r."a", r."b"`: the recorded columns of alias `r`.
fn column_list(columns: &[String]) -> String {
    let list: Vec<String> = columns
        .iter()
        .map(|c| format!("r.{}", quote_ident(c)))
        .collect();
    list.join(", ")
}

/// The SELECT that yields the distinct recorded values of an UPDATE statement.
///
/// Duplicates are removed on the columns' own values, before any JSON is built: a bulk UPDATE
/// that changes no recorded column has identical OLD and NEW values, and halving what is turned
/// into JSON costs less than the hashing (measured on 10,000 rows: 6.4 ms with the `UNION`, 9.5 ms
/// without). That needs an equality operator on each recorded column's type, which `install`
/// checks ([`validate_against_database`]).
fn update_values(rule: &TableRule, columns: &str) -> String {
    if rule.watch.is_empty() {
        return format!("SELECT {columns} FROM old_rows r UNION SELECT {columns} FROM new_rows r");
    }
    // With `watch`, a row counts only if one of the watched columns (or a recorded one) changed:
    // its OLD and NEW tuples then differ, so each survives the EXCEPT against the other side.
    // The tuples are compared as text (`ROW(…)::pg_catalog.text`, each value in its type's
    // output form): a watched column need not be recorded, and `json`, `point` or `xml` columns
    // have no equality operator; a trigger failing on them would make the app's UPDATEs fail.
    let recorded = rule.columns();
    let mut compared = recorded.clone();
    for column in &rule.watch {
        if !compared.contains(column) {
            compared.push(column.clone());
        }
    }
    let image = format!("ROW({})::pg_catalog.text AS image", column_list(&compared));
    let compared_list = if recorded.is_empty() {
        image
    } else {
        format!("{columns}, {image}")
    };
    let outer: Vec<String> = recorded
        .iter()
        .map(|c| format!("d.{}", quote_ident(c)))
        .collect();
    let outer = outer.join(", ");
    format!(
        "SELECT {outer} FROM (SELECT {compared_list} FROM old_rows r EXCEPT ALL SELECT {compared_list} FROM new_rows r) d \
         UNION SELECT {outer} FROM (SELECT {compared_list} FROM new_rows r EXCEPT ALL SELECT {compared_list} FROM old_rows r) d"
    )
}

/// The statement that writes a captured statement's `values` (a SELECT of the recorded columns)
/// into the outbox, [`ROWS_PER_OUTBOX_ENTRY`] rows of values per outbox row.
fn insert_sql(rule: &TableRule, values: &str) -> String {
    let table = quote_literal(&rule.table.to_string());
    let columns = rule.columns();
    let Some(first) = columns.first() else {
        // A rule whose keys name no column (`static:*`): any changed row clears the same
        // patterns, so one value-less row stands for all of them.
        return format!(
            "INSERT INTO {SCHEMA}.outbox (table_name, op, rows)\n\
             \x20       SELECT {table}, TG_OP, '[{{}}]'::pg_catalog.jsonb WHERE EXISTS ({values});"
        );
    };
    // One array per column over all the statement's distinct values (`array_agg` feeds every
    // aggregate of a row together, so the i-th elements belong to one row), then one outbox row per
    // slice. Slicing avoids a window function and a second grouping: measured 8.4 ms against
    // 9.4 ms for `row_number()` chunks on 10,000 rows, and it stays linear (1.6 M values: 0.4 s).
    // `to_jsonb` of an array keeps NULL elements as JSON nulls, which skip their patterns.
    let aggregates: Vec<String> = columns
        .iter()
        .map(|c| format!("pg_catalog.array_agg(d.{0}) AS {0}", quote_ident(c)))
        .collect();
    format!(
        "INSERT INTO {SCHEMA}.outbox (table_name, op, rows)\n\
         \x20       SELECT {table}, TG_OP, {object}\n\
         \x20       FROM (SELECT {aggregates} FROM ({values}) d) c,\n\
         \x20            pg_catalog.generate_series(1, pg_catalog.cardinality(c.{first}), {ROWS_PER_OUTBOX_ENTRY}) AS s(n);",
        object = chunk_object(&columns),
        aggregates = aggregates.join(", "),
        first = quote_ident(first),
    )
}

fn capture_function_sql(rule: &TableRule) -> String {
    let table = quote_literal(&rule.table.to_string());
    let columns = column_list(&rule.columns());
    let distinct = |transition: &str| {
        if rule.columns().is_empty() {
            format!("SELECT FROM {transition} r")
        } else {
            format!("SELECT DISTINCT {columns} FROM {transition} r")
        }
    };
    let update = if rule.columns().is_empty() && rule.watch.is_empty() {
        "SELECT FROM new_rows r".to_owned()
    } else {
        update_values(rule, &columns)
    };
    // No `SET search_path` clause, unlike the app's functions in `base_sql`: with it, every call
    // saves and restores the setting and recomputes the search path. Backend CPU per autocommit
    // single-row UPDATE on PostgreSQL 15: ~300 µs without triggers, ~420-440 µs with the clause,
    // ~355-390 µs without it.
    // A SECURITY DEFINER function without it runs with the caller's search_path, so every name in
    // the body is schema-qualified (PostgreSQL's documented alternative): functions and types as
    // `pg_catalog.…`, operators as `OPERATOR(pg_catalog.…)`, the outbox as
    // `cache_invalidator.outbox`. The transition tables `old_rows`/`new_rows` are resolved before
    // any schema, and DISTINCT/UNION/EXCEPT use the types' default operator classes (found by type,
    // not by search_path), so a caller's objects never take part.
    // `privilege::a_hostile_search_path_does_not_change_what_the_trigger_records` tests it.
    format!(
        r#"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $fn$
BEGIN
    IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
        {insert_new}
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
        {insert_update}
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
        {insert_old}
    ELSE
        INSERT INTO {SCHEMA}.outbox (table_name, op, rows) VALUES ({table}, 'TRUNCATE', NULL);
    END IF;
    IF FOUND THEN
        PERFORM pg_catalog.pg_notify('{CHANNEL}', '');
    END IF;
    RETURN NULL;
END
$fn$;
"#,
        function = capture_function(rule),
        insert_new = insert_sql(rule, &distinct("new_rows")),
        insert_update = insert_sql(rule, &update),
        insert_old = insert_sql(rule, &distinct("old_rows")),
    )
}

fn triggers_sql(rule: &TableRule) -> String {
    let table = qualified_table(rule);
    let function = capture_function(rule);
    let mut sql = String::new();
    let events = [
        ("ins", "INSERT", "REFERENCING NEW TABLE AS new_rows"),
        (
            "upd",
            "UPDATE",
            "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
        ),
        ("del", "DELETE", "REFERENCING OLD TABLE AS old_rows"),
        ("trunc", "TRUNCATE", ""),
    ];
    // Transition tables allow one event per trigger, hence four triggers per table.
    for (suffix, event, referencing) in events {
        let name = quote_ident(&format!("{TRIGGER_PREFIX}{suffix}"));
        let _ = writeln!(sql, "DROP TRIGGER IF EXISTS {name} ON {table};");
        let referencing = if referencing.is_empty() {
            String::new()
        } else {
            format!(" {referencing}")
        };
        let _ = writeln!(
            sql,
            "CREATE TRIGGER {name} AFTER {event} ON {table}{referencing}\n    FOR EACH STATEMENT EXECUTE FUNCTION {function}();"
        );
    }
    sql
}

/// Drops triggers and capture functions of tables that no rule names any more.
fn stale_cleanup_sql(rules: &RuleSet) -> String {
    let functions: Vec<String> = rules
        .rules()
        .iter()
        .map(|rule| quote_literal(&format!("capture {}", rule.table)))
        .collect();
    format!(
        r#"DO $cleanup$
DECLARE
    stale record;
BEGIN
{drop_triggers}
    FOR stale IN
        SELECT p.oid::regprocedure AS fn
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = '{SCHEMA}' AND p.proname LIKE 'capture %'
          AND p.proname <> ALL (ARRAY[{functions}]::text[])
    LOOP
        EXECUTE format('DROP FUNCTION %s', stale.fn);
    END LOOP;
END
$cleanup$;
"#,
        functions = functions.join(", "),
        drop_triggers = drop_triggers_sql(
            "stale",
            &format!(
                "\n          AND p.proname <> ALL (ARRAY[{}]::text[])",
                functions.join(", ")
            )
        ),
    )
}

/// A PL/pgSQL loop dropping the daemon's triggers (those whose name starts with the trigger prefix
/// and whose function is in the daemon's schema) that also pass `filter`, with loop variable
/// `var`.
fn drop_triggers_sql(var: &str, filter: &str) -> String {
    format!(
        r#"    FOR {var} IN
        SELECT t.tgname, t.tgrelid::regclass AS tbl
        FROM pg_trigger t
        JOIN pg_proc p ON p.oid = t.tgfoid
        JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = '{SCHEMA}' AND t.tgname LIKE '{TRIGGER_PREFIX}%'{filter}
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', {var}.tgname, {var}.tbl);
    END LOOP;"#
    )
}

/// The SQL `install` runs, for review or for a migration tool. Idempotent.
pub fn install_sql(rules: &RuleSet) -> String {
    install_sql_granting(rules, &[])
}

/// [`install_sql`], also granting the request functions to the roles in `grant_to`
/// (`install --grant-to`).
pub fn install_sql_granting(rules: &RuleSet, grant_to: &[String]) -> String {
    let mut sql = String::from(
        "-- cache-invalidator: install (generated by `cache-invalidator sql`; do not edit)\n\
         BEGIN;\n\n",
    );
    sql.push_str(&base_sql());
    for rule in rules.rules() {
        let _ = writeln!(sql, "\n-- {}: {}", rule.table, templates_summary(rule));
        sql.push_str(&capture_function_sql(rule));
        sql.push_str(&triggers_sql(rule));
    }
    sql.push('\n');
    sql.push_str(&request_grants_sql(rules, grant_to));
    sql.push('\n');
    sql.push_str(&stale_cleanup_sql(rules));
    sql.push_str("\nCOMMIT;\n");
    sql
}

/// `(grantee oid, table)` for every role that may write a ruled table: its owner, and whoever holds
/// INSERT, UPDATE or DELETE on it or INSERT or UPDATE on one of its columns (grantee 0 is PUBLIC).
/// Members of a grantee role inherit what it is granted, so granting to the grantees reaches them.
fn writers_sql(rules: &RuleSet) -> String {
    let tables: Vec<String> = rules
        .rules()
        .iter()
        .map(|rule| {
            format!(
                "pg_catalog.to_regclass({})",
                quote_literal(&qualified_table(rule))
            )
        })
        .collect();
    format!(
        r#"WITH ruled AS (
        SELECT pg_catalog.unnest(ARRAY[
            {tables}
        ]::pg_catalog.oid[]) AS oid
    )
    SELECT DISTINCT w.grantee, w.tbl FROM (
        SELECT c.oid::pg_catalog.regclass::text AS tbl, c.relowner AS grantee
        FROM ruled JOIN pg_catalog.pg_class c ON c.oid = ruled.oid
        UNION ALL
        SELECT c.oid::pg_catalog.regclass::text, a.grantee
        FROM ruled JOIN pg_catalog.pg_class c ON c.oid = ruled.oid,
            pg_catalog.aclexplode(c.relacl) a
        WHERE a.privilege_type IN ('INSERT', 'UPDATE', 'DELETE')
        UNION ALL
        SELECT t.attrelid::pg_catalog.regclass::text, a.grantee
        FROM ruled JOIN pg_catalog.pg_attribute t ON t.attrelid = ruled.oid,
            pg_catalog.aclexplode(t.attacl) a
        WHERE NOT t.attisdropped AND a.privilege_type IN ('INSERT', 'UPDATE')
    ) w"#,
        tables = tables.join(",\n            ")
    )
}

/// Grants the request functions to the roles that may write a ruled table, found in the catalog
/// when the SQL runs (so the file `sql` prints grants to the roles of the database it is applied
/// to), and to the roles named in `grant_to`.
fn request_grants_sql(rules: &RuleSet, grant_to: &[String]) -> String {
    let functions = REQUEST_FUNCTIONS.join(", ");
    let mut sql = format!(
        r#"-- The request functions, for every role that may write a ruled table (its owner, and whoever
-- holds INSERT, UPDATE or DELETE on it), as the catalog says when this runs.
DO $grants$
DECLARE
    writer record;
BEGIN
    FOR writer IN SELECT DISTINCT writers.grantee FROM ({writers}) writers
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION {functions} TO %s',
            CASE WHEN writer.grantee = 0 THEN 'PUBLIC'
                 ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(writer.grantee)) END);
    END LOOP;
END
$grants$;
"#,
        writers = writers_sql(rules),
    );
    for role in grant_to {
        let _ = writeln!(
            sql,
            "GRANT EXECUTE ON FUNCTION {functions} TO {};",
            quote_ident(role)
        );
    }
    sql
}

fn templates_summary(rule: &TableRule) -> String {
    let keys: Vec<&str> = rule.templates.iter().map(|t| t.source()).collect();
    let mut summary = keys.join(", ");
    if !rule.watch.is_empty() {
        let _ = write!(summary, " (watch: {})", rule.watch.join(", "));
    }
    summary
}

/// The SQL `uninstall` runs: drops every trigger and the schema; the app's tables are untouched.
pub fn uninstall_sql() -> String {
    format!(
        r#"-- cache-invalidator: uninstall (generated by `cache-invalidator sql --uninstall`; do not edit)
BEGIN;

DO $uninstall$
DECLARE
    installed record;
BEGIN
{drop_triggers}
END
$uninstall$;

DROP SCHEMA IF EXISTS {SCHEMA} CASCADE;

COMMIT;
"#,
        drop_triggers = drop_triggers_sql("installed", ""),
    )
}

/// Checks that every table and column the rules name exists, so `install` fails with a message
/// that names the culprit instead of a trigger that breaks the app's writes later.
pub async fn validate_against_database(
    client: &Client,
    rules: &RuleSet,
) -> Result<(), SchemaError> {
    // `reports_report` and `public.reports_report` are two rules for one table; their triggers
    // would share names, and the second install would silently replace the first.
    let mut seen: Vec<(i64, String)> = Vec::new();
    for rule in rules.rules() {
        let table = rule.table.to_string();
        let row = client
            .query_one(
                "SELECT to_regclass($1)::oid::bigint",
                &[&qualified_table(rule)],
            )
            .await?;
        let Some(oid): Option<i64> = row.get(0) else {
            return Err(SchemaError::MissingTable { table });
        };
        if let Some((_, first)) = seen.iter().find(|(seen_oid, _)| *seen_oid == oid) {
            return Err(SchemaError::SameTable {
                first: first.clone(),
                second: table,
            });
        }
        seen.push((oid, table.clone()));
        let columns: Vec<String> = client
            .query(
                "SELECT attname::text FROM pg_attribute \
                 WHERE attrelid = $1::bigint::oid AND attnum > 0 AND NOT attisdropped",
                &[&oid],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        for template in &rule.templates {
            for column in template.columns() {
                if !columns.iter().any(|c| c == column) {
                    return Err(SchemaError::MissingColumn {
                        table,
                        column: column.to_owned(),
                        used_by: format!("key {:?}", template.source()),
                    });
                }
            }
        }
        for column in &rule.watch {
            if !columns.iter().any(|c| c == column) {
                return Err(SchemaError::MissingColumn {
                    table,
                    column: column.clone(),
                    used_by: "watch".to_owned(),
                });
            }
        }
        for column in rule.columns() {
            recordable(client, rule, oid, &column).await?;
        }
    }
    Ok(())
}

/// Checks that the trigger can gather a recorded column: it removes duplicates on the column's own
/// values (which needs an equality operator: `json`, `point` or `xml` have none) and collects each
/// column into one array (an array column would make a multi-dimensional one, which fails on rows
/// of different lengths). Either would make the app's writes fail, so `install` refuses first;
/// neither kind of value can be put in a cache key anyway.
async fn recordable(
    client: &Client,
    rule: &TableRule,
    oid: i64,
    column: &str,
) -> Result<(), SchemaError> {
    let unusable = |reason: String| SchemaError::UnusableColumn {
        table: rule.table.to_string(),
        column: column.to_owned(),
        reason,
    };
    let row = client
        .query_one(
            "SELECT format_type(t.oid, NULL), coalesce(b.typcategory, t.typcategory)::text \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             LEFT JOIN pg_type b ON b.oid = t.typbasetype \
             WHERE a.attrelid = $1::bigint::oid AND a.attname = $2",
            &[&oid, &column],
        )
        .await?;
    let type_name: String = row.get(0);
    let category: String = row.get(1);
    if category == "A" {
        return Err(unusable(format!("it holds arrays ({type_name})")));
    }
    let probe = format!(
        "EXPLAIN SELECT DISTINCT r.{} FROM {} r",
        quote_ident(column),
        qualified_table(rule)
    );
    if let Err(error) = client.query(probe.as_str(), &[]).await {
        if error.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_FUNCTION) {
            return Err(unusable(format!(
                "its type {type_name} has no equality operator, which the trigger needs to \
                 record each value once"
            )));
        }
        return Err(error.into());
    }
    Ok(())
}

/// Creates or updates the schema, outbox and triggers for `rules`.
pub async fn install(client: &Client, rules: &RuleSet) -> Result<(), SchemaError> {
    install_granting(client, rules, &[]).await
}

/// [`install`], also granting the request functions to the roles in `grant_to`. Every role is
/// looked up first: a misspelt one stops the install before anything changes.
pub async fn install_granting(
    client: &Client,
    rules: &RuleSet,
    grant_to: &[String],
) -> Result<(), SchemaError> {
    validate_against_database(client, rules).await?;
    for role in grant_to {
        let exists: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)",
                &[role],
            )
            .await?
            .get(0);
        if !exists {
            return Err(SchemaError::NoSuchRole { role: role.clone() });
        }
    }
    client
        .batch_execute(&install_sql_granting(rules, grant_to))
        .await?;
    Ok(())
}

/// A role that may write a ruled table but cannot call the request functions (granted write
/// access after `install` ran): `check` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UngrantedWriter {
    pub role: String,
    pub table: String,
}

/// The roles that may write a ruled table but lack EXECUTE on one of the request functions.
/// Empty when the functions are not installed (`check` reports that on its own).
pub async fn ungranted_writers(
    client: &Client,
    rules: &RuleSet,
) -> Result<Vec<UngrantedWriter>, SchemaError> {
    let functions: Vec<String> = REQUEST_FUNCTIONS
        .iter()
        .map(|f| format!("pg_catalog.to_regprocedure({})", quote_literal(f)))
        .collect();
    // PUBLIC (grantee 0) is no role has_function_privilege can ask about: read the ACL itself
    // (NULL means the default, which includes PUBLIC).
    let query = format!(
        r#"SELECT CASE WHEN w.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.pg_get_userbyid(w.grantee)::text END, w.tbl
FROM ({writers}) w
WHERE NOT (
    SELECT pg_catalog.bool_and(CASE WHEN w.grantee = 0 THEN EXISTS (
            SELECT 1 FROM pg_catalog.pg_proc p,
                pg_catalog.aclexplode(coalesce(p.proacl, pg_catalog.acldefault('f', p.proowner))) a
            WHERE p.oid = f AND a.grantee = 0 AND a.privilege_type = 'EXECUTE')
        ELSE pg_catalog.has_function_privilege(w.grantee, f, 'EXECUTE') END)
    FROM pg_catalog.unnest(ARRAY[{functions}]::pg_catalog.oid[]) f WHERE f IS NOT NULL)
ORDER BY 1, 2"#,
        writers = writers_sql(rules),
        functions = functions.join(", "),
    );
    Ok(client
        .query(query.as_str(), &[])
        .await?
        .iter()
        .map(|row| UngrantedWriter {
            role: row.get(0),
            table: row.get(1),
        })
        .collect())
}

/// Removes the triggers and the schema.
pub async fn uninstall(client: &Client) -> Result<(), SchemaError> {
    client.batch_execute(&uninstall_sql()).await?;
    Ok(())
}

/// One installed trigger function, as found in the database, compared with what the rules want.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TriggerDifference {
    pub table: String,
    pub problem: String,
}

/// Compares the installed capture functions and triggers with what `install` would create now.
pub async fn installed_differences(
    client: &Client,
    rules: &RuleSet,
) -> Result<Vec<TriggerDifference>, SchemaError> {
    let mut differences = Vec::new();
    let schema_exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&SCHEMA],
        )
        .await?
        .get(0);
    if !schema_exists {
        differences.push(TriggerDifference {
            table: "*".to_owned(),
            problem: format!("schema {SCHEMA} is not installed: run `cache-invalidator install`"),
        });
        return Ok(differences);
    }
    let installed: Vec<(String, String)> = client
        .query(
            "SELECT p.proname::text, p.prosrc FROM pg_proc p \
             JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = $1 AND p.proname LIKE 'capture %'",
            &[&SCHEMA],
        )
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    for rule in rules.rules() {
        let table = rule.table.to_string();
        let name = format!("capture {table}");
        let wanted = capture_function_sql(rule);
        let wanted_body = function_body(&wanted);
        match installed.iter().find(|(proname, _)| *proname == name) {
            None => differences.push(TriggerDifference {
                table: table.clone(),
                problem: "no capture function installed for this rule".to_owned(),
            }),
            Some((_, body)) if body != wanted_body => differences.push(TriggerDifference {
                table: table.clone(),
                problem: body_difference(body, &rule.columns()),
            }),
            Some(_) => {}
        }
        let count: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
                 JOIN pg_namespace n ON n.oid = p.pronamespace \
                 WHERE n.nspname = $1 AND p.proname = $2 AND t.tgenabled <> 'D' \
                 AND t.tgrelid = to_regclass($3)",
                &[&SCHEMA, &name, &qualified_table(rule)],
            )
            .await?
            .get(0);
        if count != 4 {
            differences.push(TriggerDifference {
                table,
                problem: format!(
                    "{count} of 4 enabled triggers (insert, update, delete, truncate) installed"
                ),
            });
        }
    }
    for (proname, _) in &installed {
        let table = proname.trim_start_matches("capture ");
        if rules.rule(table).is_none() {
            differences.push(TriggerDifference {
                table: table.to_owned(),
                problem: "triggers installed but no rule names this table".to_owned(),
            });
        }
    }
    Ok(differences)
}

/// Says how an installed capture function differs from the one the rules want, naming the
/// columns where that is the difference.
fn body_difference(installed_body: &str, wanted: &[String]) -> String {
    let mut wanted = wanted.to_vec();
    wanted.sort();
    if let Some(mut installed) = recorded_columns(installed_body) {
        installed.sort();
        if installed != wanted {
            return format!(
                "installed trigger records columns ({}) but the rules need ({})",
                installed.join(", "),
                wanted.join(", ")
            );
        }
    }
    "installed trigger differs from what `install` creates for these rules (another watch \
     list, or installed by another version)"
        .to_owned()
}

/// The columns a capture function records: the keys of its first
/// `pg_catalog.jsonb_build_object('c', pg_catalog.to_jsonb(c."c"[s.n:s.n OPERATOR(pg_catalog.+)
/// 63]), …)` as [`chunk_object`] writes it, or the shapes older versions installed (so `check`
/// still names the columns of a trigger installed by them): `jsonb_build_object('c',
/// to_jsonb(c."c"[s.n:s.n + 63]), …)` before the names were qualified, `jsonb_build_object('c',
/// r."c", …)` before the column-wise outbox. `None` when the body has none of these shapes.
fn recorded_columns(body: &str) -> Option<Vec<String>> {
    // Also finds the unqualified name inside `pg_catalog.jsonb_build_object(`.
    let start = body.find("jsonb_build_object(")? + "jsonb_build_object(".len();
    let mut rest = &body[start..];
    let mut columns = Vec::new();
    loop {
        let (name, after) = take_quoted(rest, '\'')?;
        let after = if let Some(value) = after
            .strip_prefix(", pg_catalog.to_jsonb(c.")
            .or_else(|| after.strip_prefix(", to_jsonb(c."))
        {
            let (_, after) = take_quoted(value, '"')?;
            strip_chunk_slice(after)?
        } else {
            take_quoted(after.strip_prefix(", r.")?, '"')?.1
        };
        columns.push(name);
        if after.starts_with(')') {
            return Some(columns);
        }
        rest = after.strip_prefix(", ")?;
    }
}

/// Strips a [`chunk_slice`] from the start of `text`, in its qualified form or the older
/// `[s.n:s.n + 63])`, whatever the chunk size it was installed with.
fn strip_chunk_slice(text: &str) -> Option<&str> {
    let rest = text.strip_prefix("[s.n:s.n ")?;
    let rest = rest
        .strip_prefix("OPERATOR(pg_catalog.+) ")
        .or_else(|| rest.strip_prefix("+ "))?;
    let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 {
        return None;
    }
    rest[digits..].strip_prefix("])")
}

/// Splits `'it''s' rest` into `it's` and ` rest` (SQL quoting: the quote doubled inside).
fn take_quoted(text: &str, quote: char) -> Option<(String, &str)> {
    let mut rest = text.strip_prefix(quote)?;
    let mut value = String::new();
    loop {
        let end = rest.find(quote)?;
        value.push_str(&rest[..end]);
        rest = &rest[end + 1..];
        match rest.strip_prefix(quote) {
            Some(after) => {
                value.push(quote);
                rest = after;
            }
            None => return Some((value, rest)),
        }
    }
}

/// The text between the `$fn$` markers, which Postgres keeps verbatim as `prosrc`.
fn function_body(definition: &str) -> &str {
    let mut parts = definition.split("$fn$");
    parts.next();
    parts.next().unwrap_or(definition)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn recorded_columns_are_read_back_from_a_capture_function() {
        let rules = RuleSet::builtin();
        let rule = &rules.rules()[0];
        let sql = capture_function_sql(rule);
        let mut columns = recorded_columns(function_body(&sql)).expect("parsable");
        columns.sort();
        assert_eq!(columns, ["author_id", "id"]);
        // The shape installed before the names were qualified.
        assert_eq!(
            recorded_columns(
                "SELECT 'reports_report', TG_OP, jsonb_build_object('author_id', \
                 to_jsonb(c.\"author_id\"[s.n:s.n + 63]), 'it''s', to_jsonb(c.\"it's\"[s.n:s.n + 63]))"
            ),
            Some(vec!["author_id".to_owned(), "it's".to_owned()])
        );
        // The shape installed before the column-wise outbox.
        assert_eq!(
            recorded_columns("jsonb_build_object('it''s', r.\"it's\", 'b', r.\"b\")"),
            Some(vec!["it's".to_owned(), "b".to_owned()])
        );
        // The shape written now, with quotes in the names.
        let object = chunk_object(&["it's".to_owned(), "a\"b".to_owned()]);
        assert_eq!(
            object,
            "pg_catalog.jsonb_build_object('it''s', pg_catalog.to_jsonb(c.\"it's\"[s.n:s.n OPERATOR(pg_catalog.+) 63]), \
             'a\"b', pg_catalog.to_jsonb(c.\"a\"\"b\"[s.n:s.n OPERATOR(pg_catalog.+) 63]))"
        );
        assert_eq!(
            recorded_columns(&object),
            Some(vec!["it's".to_owned(), "a\"b".to_owned()])
        );
        assert_eq!(recorded_columns("BEGIN END"), None);
        // A slice of neither shape is not guessed at.
        assert_eq!(
            recorded_columns("jsonb_build_object('id', to_jsonb(c.\"id\"[s.n:s.n - 63]))"),
            None
        );
        assert_eq!(
            recorded_columns("jsonb_build_object('id', to_jsonb(c.\"id\"[s.n:s.n + ]))"),
            None
        );
    }

    #[test]
    fn install_sql_records_only_the_columns_templates_need() {
        let sql = install_sql(&RuleSet::builtin());
        assert!(sql.contains("pg_catalog.jsonb_build_object('author_id', pg_catalog.to_jsonb(c.\"author_id\"[s.n:s.n OPERATOR(pg_catalog.+) 63]), 'id', pg_catalog.to_jsonb(c.\"id\"[s.n:s.n OPERATOR(pg_catalog.+) 63]))"));
        assert!(sql.contains("SELECT r.\"author_id\", r.\"id\" FROM old_rows r UNION SELECT r.\"author_id\", r.\"id\" FROM new_rows r"));
        assert!(sql.contains("CREATE TRIGGER \"cache_invalidator_upd\" AFTER UPDATE ON \"reports_report\" REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"));
        assert!(sql.contains("pg_catalog.pg_notify('cache_invalidator', '')"));
    }
}
