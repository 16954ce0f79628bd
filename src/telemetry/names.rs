//! Metric names: a contract dashboards and alerts rely on (docs/operations.md).

pub const CHANGES: &str = "cache_invalidator_changes_total";
pub const KEYS_DELETED: &str = "cache_invalidator_keys_deleted_total";
pub const REFILL_KEYS_DELETED: &str = "cache_invalidator_refill_keys_deleted_total";
pub const SWEEPS: &str = "cache_invalidator_sweeps_total";
pub const SWEEP_DURATION: &str = "cache_invalidator_sweep_duration_seconds";
pub const COMMIT_TO_DELETE: &str = "cache_invalidator_commit_to_delete_seconds";
pub const OUTBOX_BACKLOG: &str = "cache_invalidator_outbox_backlog";
pub const OUTBOX_OLDEST_AGE: &str = "cache_invalidator_outbox_oldest_age_seconds";
pub const DEAD_LETTERS: &str = "cache_invalidator_dead_letters";
pub const RECONNECTS: &str = "cache_invalidator_reconnects_total";
/// Not in the contract table, an addition: SIGHUP reloads by `result` (`applied`, `rejected`).
pub const RULES_RELOADS: &str = "cache_invalidator_rules_reloads_total";
/// Index mode (names operators' scripts rely on: README, "Finding the keys"): 1 for the mode
/// in use, by `mode`.
pub const MODE: &str = "cache_invalidator_mode";
pub const INDEX_KEYS: &str = "cache_invalidator_index_keys";
/// Seeds of the index, by `reason` (`start`, `connection_lost`, `failover`, `flush`, …).
pub const INDEX_REBUILDS: &str = "cache_invalidator_index_rebuilds_total";
/// Not in the contract table, an addition: 1, labelled with the version and the git commit.
pub const BUILD_INFO: &str = "cache_invalidator_build_info";
/// Not in the contract table, an addition: 1 while the worker's connection to `side`
/// (`postgres`: its LISTEN connection; `redis`: its own connection and the probe's PING) is
/// up, 0 while it waits for that server. What `/healthz` knows, for alerting rules.
pub const CONNECTED: &str = "cache_invalidator_connected";
