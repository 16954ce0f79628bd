//! Rules: which cache keys a change to a table clears.
//!
//! A rule names a table and key templates such as `reportlist:reports:{author_id}:*`. Templates are
//! parsed once into literal glob text and `{column}` placeholders. Rendering a changed row puts the
//! row's values into the placeholders, escaped for Redis glob syntax so that no value can widen a
//! pattern, and the configured `key_prefix` in front. The default rules (docs/rules.md) are built
//! in; a TOML file replaces them.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::glob::{self, Glob};

/// The key prefix django-redis puts in front of every logical key with `KEY_PREFIX=''`, `VERSION=1`.
pub const DEFAULT_KEY_PREFIX: &str = ":1:";

/// The rules shipped with the binary (docs/rules.md), in the rules-file format.
pub const DEFAULT_RULES_TOML: &str = r#"
key_prefix = ":1:"

[[rules]]
table = "reports_report"
keys = ["report:{id}:*", "reportlist:reports:{author_id}:*"]

[[rules]]
table = "reports_studentreport"
keys = ["studentreport:{id}:*",
        "reportlist:student-reports:{student_id}:*",
        "reportlist:student-reports:{teacher_id}:*"]

[[rules]]
table = "reports_tutorweeklyreport"
keys = ["tutorreport:{id}:*",
        "reportlist:tutor-reports:{tutor_id}:*",
        "reportlist:tutor-reports:{student_id}:*"]

[[rules]]
table = "reports_teacherweeklyreport"
keys = ["teacherreport:{id}:*",
        "reportlist:teacher-reports:{teacher_id}:*",
        "reportlist:teacher-reports:{student_id}:*"]
"#;

/// The manual operations of the old cache strategy (`invalidate`), also reachable from
/// SQL through `cache_invalidator.invalidate_user()` / `invalidate_report()`.
const USER_TEMPLATES: [&str; 2] = ["report:*:{user_id}:*", "reportlist:*:{user_id}:*"];
const REPORT_TEMPLATES: [&str; 1] = ["report:{report_id}:*"];

/// Pseudo-table names under which manual requests are recorded in the outbox and counted in metrics.
pub const MANUAL_USER_TABLE: &str = "cache_invalidator.invalidate_user";
pub const MANUAL_REPORT_TABLE: &str = "cache_invalidator.invalidate_report";

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot read rules file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("rules file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("rule for table {table:?}: {message}")]
    Invalid { table: String, message: String },
}

/// Why a changed row could not be turned into patterns. The worker dead-letters such rows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("no rule for table {0:?}")]
    UnknownTable(String),
    #[error("unknown operation {0:?} (expected INSERT, UPDATE, DELETE or TRUNCATE)")]
    UnknownOperation(String),
    #[error(
        "rows must be a JSON array of objects or an object of column arrays of equal length, got {0}"
    )]
    NotAnArray(String),
    #[error("column {column:?} must be a JSON array of values (one per row), got {value}")]
    NotAColumn { column: String, value: String },
    #[error("column {column:?} holds {len} values but column {first:?} holds {first_len}: the arrays of one change must be equally long")]
    RaggedColumns {
        first: String,
        first_len: usize,
        column: String,
        len: usize,
    },
    #[error("row {index} is not a JSON object: {row}")]
    NotAnObject { index: usize, row: String },
    #[error("row {index} has no column {column:?} (needed by key {template:?})")]
    MissingColumn {
        index: usize,
        column: String,
        template: String,
    },
    #[error("row {index}: column {column:?} holds {value}, which cannot be put in a cache key")]
    Unrenderable {
        index: usize,
        column: String,
        value: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default = "default_key_prefix")]
    key_prefix: String,
    #[serde(default)]
    rules: Vec<RuleEntry>,
}

fn default_key_prefix() -> String {
    DEFAULT_KEY_PREFIX.to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    table: String,
    keys: Vec<String>,
    #[serde(default)]
    watch: Vec<String>,
}

/// One part of a parsed key template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    /// Template text, kept as written: it is glob syntax chosen by the operator (`*` means any).
    Glob(String),
    /// A `{column}` placeholder: the row's value goes here, escaped so it matches only itself.
    Column(String),
}

/// A key template parsed once at startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

impl Template {
    pub fn parse(source: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = source.chars();
        while let Some(c) = chars.next() {
            match c {
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(format!("key {source:?}: unclosed '{{'")),
                        }
                    }
                    if !is_identifier(&name) {
                        return Err(format!(
                            "key {source:?}: placeholder {{{name}}} is not a column name"
                        ));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Glob(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Column(name));
                }
                '}' => return Err(format!("key {source:?}: '}}' without '{{'")),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Glob(literal));
        }
        if parts.is_empty() {
            return Err("empty key template".to_owned());
        }
        Ok(Template {
            source: source.to_owned(),
            parts,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|part| match part {
            Part::Column(name) => Some(name.as_str()),
            Part::Glob(_) => None,
        })
    }

    /// The pattern for one row, `Ok(None)` when a value it needs is NULL (nothing to clear for it).
    fn render(
        &self,
        key_prefix: &str,
        row: &Row<'_>,
        index: usize,
    ) -> Result<Option<String>, RenderError> {
        let mut pattern = glob::escape(key_prefix);
        for part in &self.parts {
            match part {
                Part::Glob(text) => pattern.push_str(text),
                Part::Column(column) => {
                    let value = row.get(column).ok_or_else(|| RenderError::MissingColumn {
                        index,
                        column: column.clone(),
                        template: self.source.clone(),
                    })?;
                    match value {
                        Value::Null => return Ok(None),
                        Value::String(text) => pattern.push_str(&glob::escape(text)),
                        Value::Number(number) => pattern.push_str(&number.to_string()),
                        // Python's str(True) is what a Django view would have put in the key.
                        Value::Bool(true) => pattern.push_str("True"),
                        Value::Bool(false) => pattern.push_str("False"),
                        Value::Array(_) | Value::Object(_) => {
                            return Err(RenderError::Unrenderable {
                                index,
                                column: column.clone(),
                                value: truncate(&value.to_string(), 80),
                            })
                        }
                    }
                }
            }
        }
        Ok(Some(pattern))
    }

    /// The pattern that clears the template's whole namespace: everything up to the first
    /// placeholder, then `*`. Used for `TRUNCATE`, which says nothing about individual rows.
    fn namespace_pattern(&self, key_prefix: &str) -> String {
        let mut pattern = glob::escape(key_prefix);
        if matches!(self.parts.first(), Some(Part::Column(_))) {
            // No namespace before the first value (`{slug}:page:*`): "up to the first placeholder"
            // would be the bare key prefix, wiping the whole cache (sessions included). Clear what
            // the template can name instead: every placeholder as `*`.
            for part in &self.parts {
                match part {
                    Part::Glob(text) => pattern.push_str(text),
                    Part::Column(_) => pattern.push('*'),
                }
            }
            return pattern;
        }
        for part in &self.parts {
            match part {
                Part::Glob(text) => pattern.push_str(text),
                Part::Column(_) => break,
            }
        }
        if !pattern.ends_with('*') {
            pattern.push('*');
        }
        pattern
    }
}

/// One changed row as the outbox holds it: an object of its own, or position `index` of the
/// column arrays of a column-wise change (`{"id": [1, 2], "author_id": [3, 4]}`).
enum Row<'a> {
    Object(&'a serde_json::Map<String, Value>),
    Columns {
        columns: &'a [(&'a String, &'a Vec<Value>)],
        index: usize,
    },
}

impl<'a> Row<'a> {
    fn get(&self, column: &str) -> Option<&'a Value> {
        match self {
            Row::Object(row) => row.get(column),
            Row::Columns { columns, index } => columns
                .iter()
                .find(|(name, _)| name.as_str() == column)
                .and_then(|(_, values)| values.get(*index)),
        }
    }

    fn values(&self) -> Vec<(&'a str, &'a Value)> {
        match self {
            Row::Object(row) => row.iter().map(|(k, v)| (k.as_str(), v)).collect(),
            Row::Columns { columns, index } => columns
                .iter()
                .filter_map(|(name, values)| Some((name.as_str(), values.get(*index)?)))
                .collect(),
        }
    }
}

/// The rows of a change's `rows` value, checked: an array of objects, or an object of column
/// arrays of one length. Returns how many rows there are and how to reach each.
enum Rows<'a> {
    Objects(&'a [Value]),
    Columns {
        columns: Vec<(&'a String, &'a Vec<Value>)>,
        len: usize,
    },
}

impl<'a> Rows<'a> {
    fn parse(rows: Option<&'a Value>) -> Result<Rows<'a>, RenderError> {
        match rows {
            Some(Value::Array(rows)) => Ok(Rows::Objects(rows)),
            Some(Value::Object(object)) if !object.is_empty() => {
                let mut columns = Vec::with_capacity(object.len());
                for (column, values) in object {
                    let Value::Array(values) = values else {
                        return Err(RenderError::NotAColumn {
                            column: column.clone(),
                            value: truncate(&values.to_string(), 80),
                        });
                    };
                    columns.push((column, values));
                }
                let (first, first_values) = columns[0];
                if let Some((column, values)) = columns
                    .iter()
                    .find(|(_, values)| values.len() != first_values.len())
                {
                    return Err(RenderError::RaggedColumns {
                        first: first.clone(),
                        first_len: first_values.len(),
                        column: (*column).clone(),
                        len: values.len(),
                    });
                }
                let len = first_values.len();
                Ok(Rows::Columns { columns, len })
            }
            Some(other) => Err(RenderError::NotAnArray(truncate(&other.to_string(), 80))),
            None => Err(RenderError::NotAnArray("NULL".to_owned())),
        }
    }

    fn len(&self) -> usize {
        match self {
            Rows::Objects(rows) => rows.len(),
            Rows::Columns { len, .. } => *len,
        }
    }

    fn row(&self, index: usize) -> Result<Row<'_>, RenderError> {
        match self {
            Rows::Objects(rows) => match &rows[index] {
                Value::Object(row) => Ok(Row::Object(row)),
                other => Err(RenderError::NotAnObject {
                    index,
                    row: truncate(&other.to_string(), 80),
                }),
            },
            Rows::Columns { columns, .. } => Ok(Row::Columns { columns, index }),
        }
    }
}

/// The column that tells one changed row from another: an UPDATE records its OLD and its NEW
/// values, and when a key column changes (an owner, say) they are two value tuples of one row.
const ROW_IDENTITY_COLUMN: &str = "id";

/// How many changed rows an outbox `rows` value stands for, in either form (1 when it names none,
/// as `TRUNCATE` does, or cannot be read): what `cache_invalidator_changes_total` and the batch
/// log line count.
///
/// The triggers record the distinct value tuples of the key columns, OLD and NEW alike, so an
/// UPDATE that moves a row to another owner records two tuples for one row. Where the recorded
/// columns include `id`, tuples sharing an `id` are one row (a tuple without one counts alone);
/// where they do not, rows are not told apart and each distinct tuple counts once.
pub fn changed_rows(rows: Option<&Value>) -> u64 {
    let Ok(rows) = Rows::parse(rows) else {
        return 1;
    };
    // No two tuples to tell apart (a single-row statement's change): no set to build.
    if rows.len() < 2 {
        return rows.len() as u64;
    }
    // JSON text as the key: `Value` has no `Hash`, and 7 and "7" are different ids anyway.
    let mut identities: HashSet<String> = HashSet::with_capacity(rows.len());
    let mut without_identity = 0;
    for index in 0..rows.len() {
        match rows
            .row(index)
            .ok()
            .and_then(|row| row.get(ROW_IDENTITY_COLUMN))
        {
            Some(identity) if !identity.is_null() => {
                identities.insert(identity.to_string());
            }
            _ => without_identity += 1,
        }
    }
    (identities.len() + without_identity) as u64
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// The longest rule table name (`schema.` included) that installs. The schema names each table's
/// trigger function `capture <table>`; Postgres silently truncates names to 63 bytes, after which
/// `install` would not find the function again and drop its triggers as stale.
const MAX_TABLE_NAME_BYTES: usize = 63 - "capture ".len();

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_alphabetic() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || c == '_' || c == '$')
}

/// A table as named in a rule: `table` (resolved through the search path) or `schema.table`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableName {
    pub schema: Option<String>,
    pub name: String,
}

impl TableName {
    fn parse(text: &str) -> Result<TableName, String> {
        let (schema, name) = match text.split_once('.') {
            Some((schema, name)) => (Some(schema.to_owned()), name.to_owned()),
            None => (None, text.to_owned()),
        };
        let valid = schema.as_deref().is_none_or(is_identifier) && is_identifier(&name);
        if !valid {
            return Err(format!(
                "{text:?} is not a table name (expected table or schema.table)"
            ));
        }
        Ok(TableName { schema, name })
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// The rule for one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRule {
    pub table: TableName,
    pub templates: Vec<Template>,
    /// When set, UPDATEs that change none of these columns are skipped by the trigger.
    pub watch: Vec<String>,
}

impl TableRule {
    /// The columns the trigger must record: every column a template names, sorted, once.
    pub fn columns(&self) -> Vec<String> {
        let columns: BTreeSet<&str> = self.templates.iter().flat_map(Template::columns).collect();
        columns.into_iter().map(str::to_owned).collect()
    }
}

/// A change as recorded in the outbox: which table, which operation, and the recorded values of
/// the affected rows (OLD and NEW rows alike: UPDATE records both). `rows` is column-wise as the
/// triggers write it (`{"id": [1, 2], "author_id": [3, 4]}`, the i-th elements forming one row), or
/// an array of objects (`[{"id": 1, "author_id": 3}, …]`) as older triggers, the `explain` command
/// and hand-inserted rows have it.
#[derive(Debug, Clone)]
pub struct Change<'a> {
    pub table: &'a str,
    pub operation: &'a str,
    pub rows: Option<&'a Value>,
}

/// The patterns one change clears, and who they concern (for the per-change log line).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Expansion {
    pub patterns: BTreeSet<String>,
    /// Values of the row columns that name users or reports, for the debug log.
    pub ids: BTreeSet<String>,
    pub owners: BTreeSet<String>,
}

/// The complete, validated rule set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    key_prefix: String,
    rules: Vec<TableRule>,
    by_table: HashMap<String, usize>,
    user_templates: Vec<Template>,
    report_templates: Vec<Template>,
}

impl RuleSet {
    pub fn builtin() -> RuleSet {
        // The built-in text is part of the binary and covered by tests; failing here is a bug.
        RuleSet::from_toml(DEFAULT_RULES_TOML, "<built-in rules>")
            .expect("the built-in rules are valid")
    }

    pub fn load(path: &Path) -> Result<RuleSet, RulesError> {
        let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
            path: path.display().to_string(),
            source,
        })?;
        RuleSet::from_toml(&text, &path.display().to_string())
    }

    pub fn from_toml(text: &str, origin: &str) -> Result<RuleSet, RulesError> {
        let file: RulesFile = toml::from_str(text).map_err(|error| RulesError::Parse {
            path: origin.to_owned(),
            message: error.to_string(),
        })?;
        if file.rules.is_empty() {
            return Err(RulesError::Parse {
                path: origin.to_owned(),
                message: "no [[rules]] entries: nothing would ever be invalidated".to_owned(),
            });
        }
        let mut rules = Vec::with_capacity(file.rules.len());
        let mut by_table = HashMap::new();
        for entry in file.rules {
            let invalid = |message: String| RulesError::Invalid {
                table: entry.table.clone(),
                message,
            };
            let table = TableName::parse(&entry.table).map_err(invalid)?;
            if entry.table.len() > MAX_TABLE_NAME_BYTES {
                return Err(invalid(format!(
                    "the name is {} bytes, at most {MAX_TABLE_NAME_BYTES} fit: its trigger \
                     function is called \"capture {}\" and Postgres cuts names at 63 bytes",
                    entry.table.len(),
                    entry.table
                )));
            }
            if entry.keys.is_empty() {
                return Err(invalid(
                    "no keys: list at least one key template".to_owned(),
                ));
            }
            let templates = entry
                .keys
                .iter()
                .map(|key| Template::parse(key))
                .collect::<Result<Vec<_>, _>>()
                .map_err(invalid)?;
            if let Some(bad) = entry.watch.iter().find(|column| !is_identifier(column)) {
                return Err(invalid(format!("watch: {bad:?} is not a column name")));
            }
            if by_table.insert(entry.table.clone(), rules.len()).is_some() {
                return Err(invalid(
                    "a second rule for the same table: put all its keys in one rule".to_owned(),
                ));
            }
            rules.push(TableRule {
                table,
                templates,
                watch: entry.watch,
            });
        }
        let parse_all = |sources: &[&str]| {
            sources
                .iter()
                .map(|source| Template::parse(source).expect("built-in templates are valid"))
                .collect()
        };
        Ok(RuleSet {
            key_prefix: file.key_prefix,
            rules,
            by_table,
            user_templates: parse_all(&USER_TEMPLATES),
            report_templates: parse_all(&REPORT_TEMPLATES),
        })
    }

    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    pub fn rules(&self) -> &[TableRule] {
        &self.rules
    }

    /// The ruled tables as the triggers record them: `table` or `schema.table`.
    pub fn table_names(&self) -> Vec<String> {
        self.rules
            .iter()
            .map(|rule| rule.table.to_string())
            .collect()
    }

    pub fn rule(&self, table: &str) -> Option<&TableRule> {
        self.by_table.get(table).map(|&index| &self.rules[index])
    }

    /// The templates a change to `table` uses: a rule's, or the manual requests' built-in ones.
    fn templates_for(&self, table: &str) -> Option<&[Template]> {
        match table {
            MANUAL_USER_TABLE => Some(&self.user_templates),
            MANUAL_REPORT_TABLE => Some(&self.report_templates),
            _ => self.rule(table).map(|rule| rule.templates.as_slice()),
        }
    }

    /// Turns one outbox change into the patterns it clears. Duplicates are kept once.
    pub fn expand(&self, change: &Change<'_>) -> Result<Expansion, RenderError> {
        self.expand_with(change, true)
    }

    /// [`RuleSet::expand`] without the ids and owners, which only the per-change debug line
    /// prints: a string each, on the hot path of a backlog's drain.
    pub fn patterns(&self, change: &Change<'_>) -> Result<Expansion, RenderError> {
        self.expand_with(change, false)
    }

    fn expand_with(&self, change: &Change<'_>, notes: bool) -> Result<Expansion, RenderError> {
        let templates = self
            .templates_for(change.table)
            .ok_or_else(|| RenderError::UnknownTable(change.table.to_owned()))?;
        let mut expansion = Expansion::default();
        match change.operation {
            "TRUNCATE" => {
                for template in templates {
                    expansion
                        .patterns
                        .insert(template.namespace_pattern(&self.key_prefix));
                }
                return Ok(expansion);
            }
            "INSERT" | "UPDATE" | "DELETE" | "INVALIDATE" => {}
            other => return Err(RenderError::UnknownOperation(other.to_owned())),
        }
        let rows = Rows::parse(change.rows)?;
        for index in 0..rows.len() {
            let row = rows.row(index)?;
            for template in templates {
                if let Some(pattern) = template.render(&self.key_prefix, &row, index)? {
                    expansion.patterns.insert(pattern);
                }
            }
            if !notes {
                continue;
            }
            for (column, value) in row.values() {
                let text = match value {
                    Value::String(text) => text.clone(),
                    Value::Number(number) => number.to_string(),
                    _ => continue,
                };
                if column == "id" || column == "report_id" {
                    expansion.ids.insert(text);
                } else {
                    expansion.owners.insert(text);
                }
            }
        }
        Ok(expansion)
    }

    /// The key prefixes every pattern these rules can produce lies under, for Redis' tracking in
    /// broadcasting mode (index mode): each template's literal text before its first placeholder
    /// or glob character, after the key prefix. Redis refuses overlapping prefixes on one
    /// connection, and a key under the longer one is announced for the shorter one anyway, so a
    /// prefix that starts with another is dropped. An empty prefix (a template that begins with a
    /// placeholder, with no key prefix) means every key.
    pub fn tracking_prefixes(&self) -> Vec<Vec<u8>> {
        let mut prefixes: Vec<Vec<u8>> = self
            .rules
            .iter()
            .flat_map(|rule| rule.templates.iter())
            .chain(&self.user_templates)
            .chain(&self.report_templates)
            .map(|template| {
                let mut head = glob::escape(&self.key_prefix);
                for part in &template.parts {
                    match part {
                        Part::Glob(text) => head.push_str(text),
                        Part::Column(_) => break,
                    }
                }
                Glob::parse(&head).literal_prefix()
            })
            .collect();
        prefixes.sort();
        prefixes.dedup();
        let mut merged: Vec<Vec<u8>> = Vec::with_capacity(prefixes.len());
        for prefix in prefixes {
            // Sorted, so a shorter prefix of this one is the last one kept, if any.
            if merged.last().is_some_and(|kept| prefix.starts_with(kept)) {
                continue;
            }
            merged.push(prefix);
        }
        merged
    }

    /// Patterns for `invalidate --user U`: the user's report views and lists.
    pub fn user_patterns(&self, user: &str) -> BTreeSet<String> {
        self.manual_patterns(&self.user_templates, "user_id", user)
    }

    /// Patterns for `invalidate --report R`: every user's view of the report.
    pub fn report_patterns(&self, report: &str) -> BTreeSet<String> {
        self.manual_patterns(&self.report_templates, "report_id", report)
    }

    fn manual_patterns(
        &self,
        templates: &[Template],
        column: &str,
        value: &str,
    ) -> BTreeSet<String> {
        let mut row = serde_json::Map::new();
        row.insert(column.to_owned(), Value::String(value.to_owned()));
        templates
            .iter()
            .filter_map(|template| {
                template
                    .render(&self.key_prefix, &Row::Object(&row), 0)
                    .ok()
                    .flatten()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The patterns a `TRUNCATE` of `table` clears, in order.
    fn truncated(rules: &RuleSet, table: &str) -> Vec<String> {
        let change = Change {
            table,
            operation: "TRUNCATE",
            rows: None,
        };
        let patterns = rules.expand(&change).expect("renders").patterns;
        patterns.into_iter().collect()
    }

    fn strings(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|item| item.to_string()).collect()
    }

    fn expand(rules: &RuleSet, table: &str, op: &str, rows: Value) -> BTreeSet<String> {
        let change = Change {
            table,
            operation: op,
            rows: Some(&rows),
        };
        rules.expand(&change).expect("renders").patterns
    }

    #[test]
    fn builtin_rules_cover_the_four_report_tables() {
        let rules = RuleSet::builtin();
        let tables: Vec<String> = rules.rules().iter().map(|r| r.table.to_string()).collect();
        assert_eq!(
            tables,
            [
                "reports_report",
                "reports_studentreport",
                "reports_tutorweeklyreport",
                "reports_teacherweeklyreport"
            ]
        );
        assert_eq!(rules.key_prefix(), ":1:");
    }

    #[test]
    fn update_expands_old_and_new_rows_once() {
        let rules = RuleSet::builtin();
        let patterns = expand(
            &rules,
            "reports_report",
            "UPDATE",
            json!([{"id": 7, "author_id": 1}, {"id": 7, "author_id": 2}]),
        );
        assert_eq!(
            patterns,
            strings(&[
                ":1:report:7:*",
                ":1:reportlist:reports:1:*",
                ":1:reportlist:reports:2:*",
            ])
        );
    }

    #[test]
    fn null_value_skips_only_its_pattern() {
        let rules = RuleSet::builtin();
        let patterns = expand(
            &rules,
            "reports_studentreport",
            "INSERT",
            json!([{"id": 3, "student_id": 4, "teacher_id": null}]),
        );
        assert_eq!(patterns.len(), 2);
        assert!(patterns.contains(":1:studentreport:3:*"));
        assert!(patterns.contains(":1:reportlist:student-reports:4:*"));
    }

    #[test]
    fn column_wise_rows_expand_like_an_array_of_objects() {
        let rules = RuleSet::builtin();
        let objects = json!([
            {"id": 7, "author_id": 1},
            {"id": 7, "author_id": 2},
            {"id": 8, "author_id": "x*"}
        ]);
        let columns = json!({"id": [7, 7, 8], "author_id": [1, 2, "x*"]});
        let expected = expand(&rules, "reports_report", "UPDATE", objects.clone());
        assert_eq!(expected.len(), 5);
        assert!(expected.contains(":1:reportlist:reports:x\\*:*"));
        assert_eq!(
            expand(&rules, "reports_report", "UPDATE", columns.clone()),
            expected
        );
        // Row 7 moved from owner 1 to owner 2: two tuples, one changed row.
        assert_eq!(changed_rows(Some(&objects)), 2);
        assert_eq!(changed_rows(Some(&columns)), 2);
        assert_eq!(changed_rows(None), 1);
        // Without an id column rows cannot be told apart: each tuple counts.
        assert_eq!(
            changed_rows(Some(&json!({"author_id": [1, 2], "x": [null, 3]}))),
            2
        );
        // A tuple without an id (NULL) counts on its own.
        assert_eq!(changed_rows(Some(&json!({"id": [7, null, null]}))), 3);
        let change = Change {
            table: "reports_report",
            operation: "UPDATE",
            rows: Some(&columns),
        };
        let expansion = rules.expand(&change).expect("renders");
        assert_eq!(expansion.ids.into_iter().collect::<Vec<_>>(), ["7", "8"]);
        assert_eq!(
            expansion.owners.into_iter().collect::<Vec<_>>(),
            ["1", "2", "x*"]
        );
    }

    #[test]
    fn null_in_a_column_array_skips_only_its_pattern() {
        let rules = RuleSet::builtin();
        let patterns = expand(
            &rules,
            "reports_studentreport",
            "DELETE",
            json!({"id": [3, 4], "student_id": [null, 5], "teacher_id": [6, null]}),
        );
        assert_eq!(
            patterns,
            strings(&[
                ":1:studentreport:3:*",
                ":1:studentreport:4:*",
                ":1:reportlist:student-reports:5:*",
                ":1:reportlist:student-reports:6:*",
            ])
        );
    }

    #[test]
    fn malformed_column_wise_rows_say_what_is_wrong() {
        let rules = RuleSet::builtin();
        let render = |rows: Value| {
            rules
                .expand(&Change {
                    table: "reports_report",
                    operation: "UPDATE",
                    rows: Some(&rows),
                })
                .expect_err("malformed")
        };
        assert_eq!(
            render(json!({"author_id": [1, 2], "id": [7]})).to_string(),
            "column \"id\" holds 1 values but column \"author_id\" holds 2: the arrays of one \
             change must be equally long"
        );
        assert!(matches!(
            render(json!({"author_id": 1, "id": [7]})),
            RenderError::NotAColumn { ref column, .. } if column == "author_id"
        ));
        assert!(matches!(
            render(json!({"id": [7]})),
            RenderError::MissingColumn { ref column, .. } if column == "author_id"
        ));
        assert!(matches!(
            render(json!({"id": [[7]], "author_id": [1]})),
            RenderError::Unrenderable { ref column, .. } if column == "id"
        ));
        // An object with no column names no row: it cannot be told from a lost change.
        assert!(matches!(render(json!({})), RenderError::NotAnArray(_)));
        assert!(matches!(render(json!("text")), RenderError::NotAnArray(_)));
        // Equal arrays of no values are a change of no rows: nothing to clear, nothing wrong.
        let empty = json!({"id": [], "author_id": []});
        assert!(expand(&rules, "reports_report", "UPDATE", empty).is_empty());
    }

    #[test]
    fn glob_characters_in_values_are_escaped() {
        let rules = RuleSet::from_toml(
            "[[rules]]\ntable = \"t\"\nkeys = [\"tag:{name}:*\"]",
            "test",
        )
        .expect("valid");
        let patterns = expand(&rules, "t", "INSERT", json!([{"name": "a*b?[c]\\"}]));
        assert_eq!(
            patterns.into_iter().collect::<Vec<_>>(),
            [":1:tag:a\\*b\\?\\[c\\]\\\\:*"]
        );
    }

    #[test]
    fn truncate_clears_each_namespace() {
        let rules = RuleSet::builtin();
        assert_eq!(
            truncated(&rules, "reports_report"),
            [":1:report:*", ":1:reportlist:reports:*"]
        );
        // A template that starts with a value has no namespace: clear what it can name, not the
        // whole key prefix.
        let rules = RuleSet::from_toml(
            "[[rules]]\ntable = \"pages\"\nkeys = [\"{slug}:page:*\", \"{a}{b}\"]",
            "test",
        )
        .expect("valid");
        assert_eq!(truncated(&rules, "pages"), [":1:**", ":1:*:page:*"]);
    }

    #[test]
    fn bad_rows_say_what_is_wrong() {
        let rules = RuleSet::builtin();
        let rows = json!([{"id": 1}]);
        let missing = rules.expand(&Change {
            table: "reports_report",
            operation: "INSERT",
            rows: Some(&rows),
        });
        assert_eq!(
            missing.expect_err("author_id is missing").to_string(),
            "row 0 has no column \"author_id\" (needed by key \"reportlist:reports:{author_id}:*\")"
        );
        let unknown = rules.expand(&Change {
            table: "auth_user",
            operation: "INSERT",
            rows: Some(&rows),
        });
        assert_eq!(
            unknown.expect_err("no rule"),
            RenderError::UnknownTable("auth_user".into())
        );
        let nested = json!([{"id": {"a": 1}, "author_id": 1}]);
        let unrenderable = rules.expand(&Change {
            table: "reports_report",
            operation: "INSERT",
            rows: Some(&nested),
        });
        assert!(matches!(
            unrenderable,
            Err(RenderError::Unrenderable { ref column, .. }) if column == "id"
        ));
    }

    #[test]
    fn rules_file_errors_name_the_problem() {
        let unknown_field = RuleSet::from_toml("[[rules]]\ntable = \"t\"\nkey = [\"x\"]", "f.toml");
        let message = unknown_field.expect_err("typo").to_string();
        assert!(
            message.contains("f.toml") && message.contains("key"),
            "{message}"
        );
        let bad_template =
            RuleSet::from_toml("[[rules]]\ntable = \"t\"\nkeys = [\"x:{id\"]", "f.toml");
        let message = bad_template.expect_err("unclosed").to_string();
        assert!(message.contains("unclosed"), "{message}");
        let duplicate = RuleSet::from_toml(
            "[[rules]]\ntable = \"t\"\nkeys = [\"a\"]\n[[rules]]\ntable = \"t\"\nkeys = [\"b\"]",
            "f.toml",
        );
        assert!(duplicate.is_err());
        let long = "t".repeat(MAX_TABLE_NAME_BYTES + 1);
        let too_long = RuleSet::from_toml(
            &format!("[[rules]]\ntable = \"{long}\"\nkeys = [\"a\"]"),
            "f.toml",
        );
        let message = too_long.expect_err("name too long").to_string();
        assert!(
            message.contains(&long) && message.contains("63"),
            "{message}"
        );
        let longest = "t".repeat(MAX_TABLE_NAME_BYTES);
        assert!(RuleSet::from_toml(
            &format!("[[rules]]\ntable = \"{longest}\"\nkeys = [\"a\"]"),
            "f.toml"
        )
        .is_ok());
    }

    #[test]
    fn manual_operations_use_the_documented_patterns() {
        let rules = RuleSet::builtin();
        assert_eq!(
            rules.user_patterns("5").into_iter().collect::<Vec<_>>(),
            [":1:report:*:5:*", ":1:reportlist:*:5:*"]
        );
        assert_eq!(
            rules.report_patterns("9").into_iter().collect::<Vec<_>>(),
            [":1:report:9:*"]
        );
    }
}
