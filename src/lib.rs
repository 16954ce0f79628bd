//! cache-invalidator: keeps a Redis cache honest.
//!
//! [`run`] is the daemon's one entry point: the binary, the integration tests and the bench all
//! start it there, with [`Settings`] and a shutdown token. [`execute`] runs the operator's other
//! subcommands ([`ops`]).
//!
//! The path of one change, module by module: Postgres triggers ([`schema`]) record each committed
//! change in an outbox and notify; the worker is woken, claims the change ([`outbox`], over
//! connections from [`postgres`]), turns it into key patterns ([`rules`]): a [`window`]. The finder
//! chooses how its keys are found: looked up in the [`index`] that Redis' tracking announcements
//! keep, and unlinked, or cleared together with every other pending change in one sweep of Redis
//! ([`sweep`], with the compiled [`matcher`]), over connections from [`redis_nodes`]. Once Redis
//! and its replicas ([`replicas`]) confirmed the deletes, the worker deletes the outbox rows.
//! [`glob`] holds Redis' pattern syntax for all of them, [`telemetry`] logs, metrics and health.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod cli;
pub(crate) mod daemon;
pub(crate) mod finder;
pub mod glob;
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
pub mod window;
pub(crate) mod worker;

pub use daemon::{run, DaemonError};
pub use ops::execute;
pub use settings::Settings;
