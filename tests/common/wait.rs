//! Waiting in the tests: one bound for any awaited effect and the poll loop that waits for it.

use std::future::Future;
use std::time::{Duration, Instant};

/// How long any awaited effect may take before a test gives up (a bound, not a measurement).
pub const PATIENCE: Duration = Duration::from_secs(30);
/// The bound for effects that wait on something slow on purpose: a failover (about two node
/// timeouts), a cluster settling, a worker frozen with its claim.
pub const LONG_PATIENCE: Duration = Duration::from_secs(60);

/// Polls `condition` every 50 ms until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
