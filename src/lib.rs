//! cache-invalidator: keeps a Redis cache honest.
//!
//! The path of one change, module by module: Postgres triggers ([`schema`]) record each committed
//! change in an outbox and notify; the worker ([`worker`]) is woken, claims the change
//! ([`outbox`], over connections from [`postgres`]), turns it into key patterns ([`rules`]), and
//! hands them to the [`finder`], which looks their keys up in the [`index`] that Redis' tracking
//! announcements keep ([`tracking`]), or clears them together with every other pending change in
//! one sweep of Redis ([`sweep`], with the compiled [`matcher`]), over connections from
//! [`redis_nodes`]; once Redis and its replicas ([`replicas`]) confirmed the deletes, it deletes the
//! outbox rows.
//! [`ops`] holds the operator's other subcommands, [`telemetry`] logs, metrics and health.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod cli;
pub mod daemon;
pub mod finder;
pub mod index;
pub mod matcher;
pub mod ops;
pub mod outbox;
pub mod postgres;
pub mod redis_nodes;
pub mod replicas;
pub mod rules;
pub mod schema;
pub mod settings;
pub mod sweep;
pub mod telemetry;
pub mod tracking;
pub mod worker;

pub use daemon::run;
pub use ops::execute;
pub use settings::Settings;
