//! The checked-in `sql/install.sql` and `sql/uninstall.sql` are what the generator prints for the
//! built-in rules, so a reviewer or a migration tool reading them sees what `install` really runs.

use cache_invalidator::rules::RuleSet;
use cache_invalidator::schema::{install_sql, uninstall_sql};

const REGENERATE: &str = "regenerate with `cargo run -q --bin cache-invalidator -- sql > sql/install.sql && \
                          cargo run -q --bin cache-invalidator -- sql --uninstall > sql/uninstall.sql` and commit the result";

fn checked_in(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("sql")
        .join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}; {REGENERATE}", path.display()))
}

#[test]
fn install_sql_file_matches_the_generator() {
    let generated = install_sql(&RuleSet::builtin());
    assert!(
        checked_in("install.sql") == generated,
        "sql/install.sql is out of date with schema::install_sql(&RuleSet::builtin()): {REGENERATE}"
    );
}

#[test]
fn uninstall_sql_file_matches_the_generator() {
    assert!(
        checked_in("uninstall.sql") == uninstall_sql(),
        "sql/uninstall.sql is out of date with schema::uninstall_sql(): {REGENERATE}"
    );
}
