//! What the daemon tells its operators: log setup ([`logging`]), the metric names of the contract
//! ([`names`]) and the recorder that exports them ([`recorder`]), the health state behind
//! `/healthz` ([`health`]), the HTTP listener serving `/metrics` and `/healthz` ([`http`]), and
//! systemd's readiness, status and watchdog messages ([`systemd`]).
//!
//! The worker records metrics with the `metrics` macros wherever the event happens; they go
//! nowhere until [`serve_metrics`] installs the Prometheus recorder (once per process), so a daemon
//! without `--metrics-addr` pays nothing for them.

mod health;
mod http;
mod logging;
pub mod names;
mod recorder;
mod systemd;

pub use health::Health;
pub use http::MetricsError;
pub(crate) use http::{serve_metrics, MetricsServer};
pub use logging::{init_logging, LogFormat};
pub(crate) use recorder::{prometheus, register_zeroes};
pub(crate) use systemd::{report_status, Systemd};

/// The crate version, as `--version` and the build-info gauge show it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit the binary was built from (`build.rs`), or `unknown` without git.
pub const COMMIT: &str = env!("CACHE_INVALIDATOR_COMMIT");
