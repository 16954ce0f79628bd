//! Test harness shared by the integration tests: a fresh database per test (created and dropped),
//! a unique Redis key prefix per test on the shared Redis, the daemon started in-process or as a
//! child process, and private servers for tests that break them.
//!
//! The shared servers are `TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`)
//! and `TEST_REDIS_URL` (default `redis://127.0.0.1:6379/0`). Nothing here flushes a shared server:
//! tests only touch keys under their own prefix.
//!
//! Every suite says `use common::*;`: the modules below are re-exported whole.

// Each suite is a crate of its own that compiles this harness and uses a part of it: what one
// suite leaves unused (an item, or a whole module's re-export) would otherwise warn there, and
// `-D warnings` fail the build. Hence the allows, on the modules and their re-exports only.
#[allow(dead_code)]
mod certs;
#[allow(dead_code)]
mod daemon;
#[allow(dead_code)]
mod db;
#[allow(dead_code)]
mod redis;
// The private servers and the report schema, which the bench starts too: a crate of their own.
use cache_invalidator_test_support as servers;
#[allow(dead_code)]
mod wait;

#[allow(unused_imports)]
pub use self::redis::*;
#[allow(unused_imports)]
pub use certs::*;
#[allow(unused_imports)]
pub use daemon::*;
#[allow(unused_imports)]
pub use db::*;
#[allow(unused_imports)]
pub use servers::*;
#[allow(unused_imports)]
pub use wait::*;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

/// A name no other test (in this or a parallel process) uses.
pub fn unique(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{tag}_{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `command` to completion; panics with its output when it fails.
fn run_checked(command: &mut Command, what: &str) {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
