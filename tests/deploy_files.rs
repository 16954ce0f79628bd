//! The monitoring files that ship (`deploy/prometheus/alerts.yml`, `deploy/grafana/*.json`) name
//! only metrics the daemon exports, so a renamed metric cannot silently blind an alert or a panel.
//! (promtool checks the rules' syntax and behaviour: `scripts/test.sh`.)

use std::collections::BTreeSet;
use std::path::Path;

use cache_invalidator::telemetry::names;

fn exported() -> BTreeSet<String> {
    let histograms = [names::SWEEP_DURATION, names::COMMIT_TO_DELETE];
    let mut all: BTreeSet<String> = [
        names::CHANGES,
        names::KEYS_DELETED,
        names::REFILL_KEYS_DELETED,
        names::SWEEPS,
        names::OUTBOX_BACKLOG,
        names::OUTBOX_OLDEST_AGE,
        names::DEAD_LETTERS,
        names::RECONNECTS,
        names::RULES_RELOADS,
        names::CONNECTED,
        names::MODE,
        names::INDEX_KEYS,
        names::INDEX_REBUILDS,
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    for histogram in histograms {
        for suffix in ["_bucket", "_sum", "_count"] {
            all.insert(format!("{histogram}{suffix}"));
        }
    }
    all
}

/// Every `cache_invalidator_…` name in `text`.
fn referenced(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("cache_invalidator_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        found.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    found
}

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

#[test]
fn alerts_and_dashboard_name_only_exported_metrics() {
    let exported = exported();
    for file in [
        "deploy/prometheus/alerts.yml",
        "deploy/prometheus/alerts_test.yml",
        "deploy/grafana/cache-invalidator.json",
    ] {
        let names = referenced(&read(file));
        assert!(!names.is_empty(), "{file} names no metric");
        let unknown: Vec<&String> = names.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics nobody exports: {unknown:?}"
        );
    }
}

#[test]
fn the_dashboard_is_json_with_a_query_in_every_panel() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/cache-invalidator.json")).expect("valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queried = 0;
    for panel in panels.iter().filter(|panel| panel["type"] != "row") {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(
            !targets.is_empty() && targets.iter().all(|t| t["expr"].is_string()),
            "panel {} has no query",
            panel["title"]
        );
        queried += 1;
    }
    assert!(queried >= 10, "only {queried} panels");
}
