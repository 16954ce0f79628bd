//! Retry delays for connections that failed: exponential with jitter, capped, never giving up
//! while the daemon runs. A leaf module: the worker's connections and the index's tracking
//! connections take their delays from here, each with bounds of its own.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// The default bounds: a server that is down is tried again within a fraction of a second at
/// first, then every half minute at most.
pub const RECONNECT_MIN: Duration = Duration::from_millis(200);
pub const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// Delays between [`RECONNECT_MIN`] and [`RECONNECT_MAX`].
pub fn reconnect_delays() -> ExponentialBackoff {
    backoff(RECONNECT_MIN, RECONNECT_MAX)
}

/// Retry delays from `min` to `max`. The jitter adds up to the delay itself, so a delay may reach
/// twice `max`: connections that failed together do not retry in step.
pub fn backoff(min: Duration, max: Duration) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}
