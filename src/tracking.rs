//! The Redis side of index mode: one tracking connection per primary, whose announcements keep
//! that node's part of the index ([`crate::index`]) equal to what the node holds.
//!
//! A `Tracker` opens a RESP3 connection, turns on `CLIENT TRACKING on BCAST PREFIX …` for the
//! rules' literal prefixes, and from then on every announcement the connection reads is applied
//! to the node's part as it is read (before any reply that follows it on the connection resolves,
//! which is what makes a `PING` on this connection a barrier). Its task then seeds the part with
//! one `SCAN`, checks the existence of announced keys in batches (gathered for a few
//! milliseconds) and settles the worker's own deletes ([`NodeIndex::deleting`]) — all on the
//! same connection, one pipeline at a time, so their answers apply in the order Redis ran them. If the
//! connection is lost, the part is cleared, and the task reconnects and seeds again: that node's
//! part only.
//!
//! [`Tracking`] holds the trackers of the primaries the worker is connected to. It outlives a
//! reconnect of the worker: a node whose tracking connection survived, with the same id and slots,
//! keeps its part.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, PushInfo, PushKind, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::index::{self, lock, NodeIndex, Shared};
use crate::redis_nodes::{Node, ShardView};
use crate::sweep::PatternSpec;
use crate::telemetry::names;

/// Keys Redis examines per seed `SCAN`: about a millisecond of Redis time, like the sweep's calls
/// (the app shares this Redis).
pub const SEED_SCAN_COUNT: usize = 1_000;
/// An idle tracker still looks at its state this often (a lost connection, the memory bound).
const IDLE_RECHECK: Duration = Duration::from_millis(500);
/// How long an idle tracker gathers announcements after the first before checking them: one
/// pipeline costs Redis and the daemon far less than one per key or per window. A key's check
/// (or its own delete's settling) only decides when a stale entry leaves the index; refill
/// guard deletes do not wait.
const GATHER: Duration = Duration::from_millis(20);
/// Reconnect delays of a tracking connection. Short: while it is down the worker sweeps, which
/// costs a pass per window.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    /// The server will not announce keys: an ACL without `CLIENT`, a Redis before 6, a proxy.
    #[error("redis at {node} refuses CLIENT TRACKING ({reason})")]
    Refused { node: String, reason: String },
    #[error("redis at {node}: tracking connection failed: {source}")]
    Redis {
        node: String,
        source: redis::RedisError,
    },
}

/// Why a node's part is being seeded (`cache_invalidator_index_rebuilds_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedReason {
    Start,
    ConnectionLost,
    Failover,
}

impl SeedReason {
    pub fn label(self) -> &'static str {
        match self {
            SeedReason::Start => "start",
            SeedReason::ConnectionLost => "connection_lost",
            SeedReason::Failover => "failover",
        }
    }
}

/// The trackers of the primaries the worker is connected to, and the index they feed.
pub struct Tracking {
    prefixes: Arc<[Vec<u8>]>,
    shared: Arc<Shared>,
    trackers: Vec<Tracker>,
    command_timeout: Duration,
}

impl Tracking {
    /// `on_change` is notified when a part completes its seed, loses its tracking, or the index
    /// passes its bound: the worker then updates what `/healthz`, `status` and the metrics say
    /// without waiting for its next poll.
    pub fn new(
        prefixes: Vec<Vec<u8>>,
        max_keys: usize,
        command_timeout: Duration,
        on_change: Arc<Notify>,
    ) -> Tracking {
        Tracking {
            prefixes: prefixes.into(),
            shared: Arc::new(Shared::new(max_keys, on_change)),
            trackers: Vec::new(),
            command_timeout,
        }
    }

    pub fn prefixes(&self) -> &[Vec<u8>] {
        &self.prefixes
    }

    /// Matches the trackers to `nodes` (the primaries, in the worker's order): a node whose
    /// tracker still tracks, with the same id and slots, keeps its part; any other is tracked
    /// afresh and seeded. Fails when a node refuses tracking.
    pub async fn attach(&mut self, nodes: &[Node]) -> Result<(), TrackingError> {
        let mut old = std::mem::take(&mut self.trackers);
        let had_trackers = !old.is_empty();
        let mut trackers = Vec::with_capacity(nodes.len());
        for node in nodes {
            let kept = old.iter().position(|tracker| {
                tracker.name == node.name
                    && tracker.shard == node.shard
                    && lock(&tracker.index).is_alive()
            });
            if let Some(position) = kept {
                let tracker = old.swap_remove(position);
                lock(&tracker.index).abandon_own_deletes();
                trackers.push(tracker);
                continue;
            }
            let reason = match old.iter().any(|tracker| tracker.name == node.name) {
                true => SeedReason::Failover,
                false if had_trackers => SeedReason::Failover,
                false => SeedReason::Start,
            };
            match Tracker::start(
                node,
                &self.prefixes,
                &self.shared,
                reason,
                self.command_timeout,
            )
            .await
            {
                Ok(tracker) => trackers.push(tracker),
                Err(error) => {
                    for tracker in trackers.into_iter().chain(old) {
                        tracker.stop(&self.shared);
                    }
                    return Err(error);
                }
            }
        }
        for tracker in old {
            tracker.stop(&self.shared);
        }
        self.trackers = trackers;
        index::record_size(&self.shared);
        Ok(())
    }

    /// Every node's part, in the order of the nodes given to [`Tracking::attach`].
    pub fn parts(&self) -> Vec<Arc<Mutex<NodeIndex>>> {
        self.trackers.iter().map(|t| t.index.clone()).collect()
    }

    /// Every node is tracked and seeded: a lookup can answer.
    pub fn is_complete(&self) -> bool {
        !self.trackers.is_empty()
            && !self.over_limit()
            && self.trackers.iter().all(|t| lock(&t.index).is_complete())
    }

    pub fn over_limit(&self) -> bool {
        self.shared.over_limit.load(Ordering::Relaxed)
    }

    pub fn keys(&self) -> usize {
        self.shared.total_keys.load(Ordering::Relaxed)
    }

    /// Stops tracking and forgets every key (the memory bound was passed, or the daemon stops).
    pub fn drop_index(&mut self) {
        for tracker in std::mem::take(&mut self.trackers) {
            tracker.stop(&self.shared);
        }
        index::record_size(&self.shared);
    }

    /// Resolves once every announcement Redis queued before now has been applied: a `PING` on
    /// each tracking connection. `Err` when a part is not tracked (it cannot vouch for its keys).
    pub fn barrier(&self) -> BoxFuture<'static, Result<(), String>> {
        let connections: Result<Vec<(String, MultiplexedConnection)>, String> = self
            .trackers
            .iter()
            .map(|tracker| {
                lock(&tracker.index)
                    .tracking_connection()
                    .map(|connection| (tracker.name.clone(), connection))
                    .ok_or_else(|| format!("{}: not tracking", tracker.name))
            })
            .collect();
        async move {
            let pings = connections?
                .into_iter()
                .map(|(name, mut connection)| async move {
                    redis::cmd("PING")
                        .query_async::<()>(&mut connection)
                        .await
                        .map_err(|error| format!("{name}: {error}"))
                });
            futures::future::try_join_all(pings).await.map(|_| ())
        }
        .boxed()
    }

    /// The worker is about to `UNLINK` these keys of node `node` (an index into the nodes given
    /// to [`Tracking::attach`]): see [`NodeIndex::deleting`].
    pub fn deleting<'a>(&self, node: usize, keys: impl IntoIterator<Item = &'a [u8]>) {
        if let Some(tracker) = self.trackers.get(node) {
            lock(&tracker.index).deleting(keys);
        }
    }

    /// The reply to the worker's `UNLINK`s of [`Tracking::deleting`]: see [`NodeIndex::unlinked`].
    pub fn unlinked(&self, node: usize, deleted: Vec<Box<[u8]>>, unsure: &[Box<[u8]>]) {
        if let Some(tracker) = self.trackers.get(node) {
            let settle = !deleted.is_empty();
            lock(&tracker.index).unlinked(deleted, unsure);
            if settle {
                tracker.wake.notify_one();
            }
        }
    }

    /// Deletes keys announced under `patterns` until `until` (the refill guard in index mode).
    pub fn guard(&self, patterns: &[PatternSpec], until: Instant) {
        lock(&self.shared.guards).add(patterns, until);
    }
}

impl Drop for Tracking {
    fn drop(&mut self) {
        for tracker in &self.trackers {
            tracker.stop.cancel();
        }
    }
}

/// One primary's tracking connection and the task that seeds and maintains its part.
struct Tracker {
    name: String,
    shard: Option<ShardView>,
    index: Arc<Mutex<NodeIndex>>,
    /// Wakes its task (own deletes to settle).
    wake: Arc<Notify>,
    stop: CancellationToken,
}

impl Tracker {
    /// Turns tracking on (so a refusal is known before the worker counts on the index), then
    /// seeds and maintains the part in a task of its own.
    async fn start(
        node: &Node,
        prefixes: &Arc<[Vec<u8>]>,
        shared: &Arc<Shared>,
        reason: SeedReason,
        command_timeout: Duration,
    ) -> Result<Tracker, TrackingError> {
        let index = Arc::new(Mutex::new(NodeIndex::default()));
        let wake = Arc::new(Notify::new());
        let link = Link {
            name: node.name.clone(),
            client: node.tracking_client.clone(),
            prefixes: prefixes.clone(),
            index: index.clone(),
            shared: shared.clone(),
            wake: wake.clone(),
            command_timeout,
        };
        // A refusal ends index mode; a connection that failed is retried by the task (the part is
        // incomplete meanwhile, so windows are swept).
        let connection = match link.open().await {
            Ok(connection) => Some(connection),
            Err(error @ TrackingError::Refused { .. }) => return Err(error),
            Err(error) => {
                warn!(node = %node.name, %error, "index: tracking connection failed; retrying, sweeping meanwhile");
                None
            }
        };
        let stop = CancellationToken::new();
        tokio::spawn(link.run(connection, reason, stop.clone()));
        Ok(Tracker {
            name: node.name.clone(),
            shard: node.shard.clone(),
            index,
            wake,
            stop,
        })
    }

    fn stop(self, shared: &Shared) {
        self.stop.cancel();
        lock(&self.index).tracking_lost(&shared.total_keys);
    }
}

/// What a tracker's task needs to (re)open its connection and maintain the part.
struct Link {
    name: String,
    client: Client,
    prefixes: Arc<[Vec<u8>]>,
    index: Arc<Mutex<NodeIndex>>,
    shared: Arc<Shared>,
    /// Woken by every announcement and by the connection's loss.
    wake: Arc<Notify>,
    command_timeout: Duration,
}

/// How a tracker's maintenance ended.
enum Ended {
    Stopped,
    Lost(String),
    /// The index passed its memory bound: it is being dropped.
    OverLimit,
}

impl Link {
    /// Connects with RESP3 and turns broadcasting tracking on for the prefixes.
    async fn open(&self) -> Result<MultiplexedConnection, TrackingError> {
        let failed = |source| TrackingError::Redis {
            node: self.name.clone(),
            source,
        };
        let index = self.index.clone();
        let shared = self.shared.clone();
        let wake = self.wake.clone();
        let on_push = move |push: PushInfo| -> Result<(), std::convert::Infallible> {
            apply_push(&index, &shared, push);
            wake.notify_one();
            Ok(())
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(self.command_timeout))
            .set_push_sender(on_push);
        let mut connection = match self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(connection) => connection,
            // A server that answers RESP3's HELLO with an error (Redis before 6, a proxy) will
            // not announce keys.
            Err(error) if is_refusal(&error) => {
                return Err(TrackingError::Refused {
                    node: self.name.clone(),
                    reason: error.to_string(),
                })
            }
            Err(error) => return Err(failed(error)),
        };
        // Counting from before the reply: an announcement may follow it at once.
        lock(&self.index).tracking_started(connection.clone(), &self.shared.total_keys);
        let mut command = redis::cmd("CLIENT");
        command.arg("TRACKING").arg("on").arg("BCAST");
        for prefix in self.prefixes.iter() {
            command.arg("PREFIX").arg(prefix.as_slice());
        }
        match command.query_async::<()>(&mut connection).await {
            Ok(()) => Ok(connection),
            Err(error) => {
                lock(&self.index).tracking_lost(&self.shared.total_keys);
                if is_refusal(&error) {
                    Err(TrackingError::Refused {
                        node: self.name.clone(),
                        reason: error.to_string(),
                    })
                } else {
                    Err(failed(error))
                }
            }
        }
    }

    /// Seeds and maintains the part until stopped; reconnects and seeds again after a loss.
    async fn run(
        self,
        first: Option<MultiplexedConnection>,
        reason: SeedReason,
        stop: CancellationToken,
    ) {
        let mut connection = first;
        let mut reason = reason;
        let mut delays = reconnect_delays();
        loop {
            let mut current = match connection.take() {
                Some(current) => current,
                None => match self.open().await {
                    Ok(current) => current,
                    Err(error) => {
                        let delay = delays.next().unwrap_or(RECONNECT_MAX);
                        warn!(node = %self.name, %error, retry_in_ms = delay.as_millis() as u64, "index: tracking connection failed; sweeping meanwhile");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => continue,
                            _ = stop.cancelled() => return,
                        }
                    }
                },
            };
            delays = reconnect_delays();
            metrics::counter!(names::INDEX_REBUILDS, "reason" => reason.label()).increment(1);
            info!(node = %self.name, reason = reason.label(), "index: seeding");
            match self.maintain(&mut current, &stop).await {
                Ended::Stopped => return,
                Ended::OverLimit => {
                    // Forget every key and stop listening now, not when the worker next looks:
                    // announcements would go on filling the part.
                    lock(&self.index).tracking_lost(&self.shared.total_keys);
                    index::record_size(&self.shared);
                    self.shared.on_change.notify_one();
                    return;
                }
                Ended::Lost(why) => {
                    warn!(node = %self.name, reason = %why, "index: tracking connection lost; sweeping until the index is seeded again");
                    lock(&self.index).tracking_lost(&self.shared.total_keys);
                    index::record_size(&self.shared);
                    self.shared.on_change.notify_one();
                    reason = SeedReason::ConnectionLost;
                }
            }
        }
    }

    /// The seed `SCAN`, existence checks of announced keys, the refill guard's deletes and the
    /// settling of the daemon's own deletes, one pipeline at a time on the tracking connection.
    async fn maintain(
        &self,
        connection: &mut MultiplexedConnection,
        stop: &CancellationToken,
    ) -> Ended {
        let seed_glob = seed_glob(&self.prefixes);
        let mut cursor: Option<u64> = Some(0);
        let started = Instant::now();
        loop {
            if self.shared.over_limit.load(Ordering::Relaxed) {
                return Ended::OverLimit;
            }
            let work = {
                let mut part = lock(&self.index);
                if !part.is_alive() {
                    let why = match part.dropped_by_flush() {
                        true => "a database was flushed (Redis does not say which)",
                        false => "the connection closed",
                    };
                    return Ended::Lost(why.to_owned());
                }
                Work {
                    verify: part.take_to_verify(),
                    unlinks: part.take_guard_unlinks(),
                    deleted: part.take_deleted(),
                    cursor,
                }
            };
            if work.is_empty() {
                if self.idle(stop).await {
                    return Ended::Stopped;
                }
                continue;
            }
            let pipe = work.pipeline(&seed_glob);
            let replies: Vec<Value> = tokio::select! {
                replies = pipe.query_async(connection) => match replies {
                    Ok(replies) => replies,
                    Err(error) => {
                        lock(&self.index).verification_lost();
                        return Ended::Lost(error.to_string());
                    }
                },
                _ = stop.cancelled() => return Ended::Stopped,
            };
            match self.apply(&work, replies) {
                Ok(next) => cursor = next,
                Err(why) => return Ended::Lost(why.to_owned()),
            }
            if cursor.is_none() && work.cursor.is_some() {
                self.shared.on_change.notify_one();
                info!(node = %self.name, keys = lock(&self.index).len(), duration_ms = started.elapsed().as_millis() as u64, "index: complete");
            }
            if self.shared.past_the_bound() {
                self.shared.over_limit.store(true, Ordering::Relaxed);
                return Ended::OverLimit;
            }
            index::record_size(&self.shared);
        }
    }

    /// Waits for work (an announcement, an own delete to settle) or a recheck; true when
    /// stopped. Announcements come in bursts (a window's deletes, the app's writes): gathered
    /// for a moment after the first, they are checked in one pipeline, not one each.
    async fn idle(&self, stop: &CancellationToken) -> bool {
        tokio::select! {
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep(IDLE_RECHECK) => return false,
            _ = stop.cancelled() => return true,
        }
        if lock(&self.index).has_guard_unlinks() {
            // A refill is deleted as soon as it is announced.
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(GATHER) => false,
            _ = stop.cancelled() => true,
        }
    }

    /// Applies the replies of `work`'s pipeline to the part; the seed's next cursor (`None` once
    /// it is finished).
    fn apply(&self, work: &Work, replies: Vec<Value>) -> Result<Option<u64>, &'static str> {
        let mut replies = replies.into_iter();
        let mut part = lock(&self.index);
        for key in &work.verify {
            let exists = replies
                .next()
                .and_then(|reply| redis::from_redis_value::<i64>(reply).ok())
                .map(|count| count > 0);
            // Unreadable: keep the key (a stale entry costs an UNLINK, a missing one a stale
            // page) and check it again.
            part.verified(key, exists.unwrap_or(true), &self.shared.total_keys);
        }
        let mut refills = 0u64;
        for _ in &work.unlinks {
            if let Some(Ok(removed)) = replies.next().map(redis::from_redis_value::<u64>) {
                refills += removed;
            }
        }
        if refills > 0 {
            metrics::counter!(names::REFILL_KEYS_DELETED).increment(refills);
            info!(node = %self.name, keys = refills, "refill guard removed keys written back after their invalidation");
        }
        // Whatever the pipeline held, its replies are behind every announcement queued before
        // it was sent: the own deletes taken then can be settled.
        part.settle_deleted(&work.deleted, &self.shared.total_keys);
        if work.cursor.is_none() {
            return Ok(None);
        }
        let scanned = replies
            .next()
            .map(redis::from_redis_value::<(u64, Vec<Vec<u8>>)>);
        let Some(Ok((next, keys))) = scanned else {
            return Err("unreadable SCAN reply");
        };
        for key in keys {
            if self.prefixes.iter().any(|p| key.starts_with(p)) {
                part.seeded(&key, &self.shared.total_keys);
            }
        }
        if next != 0 {
            return Ok(Some(next));
        }
        part.seed_finished();
        Ok(None)
    }
}

/// One pipeline's work on the tracking connection.
struct Work {
    verify: Vec<Box<[u8]>>,
    unlinks: Vec<Box<[u8]>>,
    deleted: Vec<Box<[u8]>>,
    /// The seed's cursor, while it runs.
    cursor: Option<u64>,
}

impl Work {
    fn is_empty(&self) -> bool {
        self.verify.is_empty()
            && self.unlinks.is_empty()
            && self.deleted.is_empty()
            && self.cursor.is_none()
    }

    fn pipeline(&self, seed_glob: &[u8]) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        for key in &self.verify {
            pipe.cmd("EXISTS").arg(&**key);
        }
        // One key per UNLINK: a cluster node refuses multi-key commands across slots.
        for key in &self.unlinks {
            pipe.cmd("UNLINK").arg(&**key);
        }
        if let Some(at) = self.cursor {
            pipe.cmd("SCAN").arg(at);
            if seed_glob != b"*" {
                pipe.arg("MATCH").arg(seed_glob);
            }
            pipe.arg("COUNT").arg(SEED_SCAN_COUNT);
        }
        if self.verify.is_empty() && self.unlinks.is_empty() && self.cursor.is_none() {
            // Only own deletes to settle: any reply will do as the barrier.
            pipe.cmd("PING");
        }
        pipe
    }
}

/// A reply from the server (an ACL, an unknown command or option) will not change on retrying; a
/// broken or slow connection may.
fn is_refusal(error: &redis::RedisError) -> bool {
    !(error.is_io_error() || error.is_timeout() || error.is_connection_dropped())
}

/// Applies one push of the tracking connection to the node's part, as it is read.
fn apply_push(index: &Mutex<NodeIndex>, shared: &Shared, push: PushInfo) {
    match push.kind {
        PushKind::Invalidate => {
            tracing::trace!(data = ?push.data, "announcement");
            let mut part = lock(index);
            for data in &push.data {
                match data {
                    Value::Array(keys) => {
                        for key in keys {
                            if let Value::BulkString(key) = key {
                                part.announced(key, shared);
                            }
                        }
                    }
                    // A flush announces no names, nor which database: seed again.
                    Value::Nil => part.flushed(shared),
                    _ => {}
                }
            }
        }
        PushKind::Disconnection => lock(index).tracking_lost(&shared.total_keys),
        _ => {}
    }
}

/// The `SCAN MATCH` glob of the seed: the prefixes' longest common prefix, then `*` (keys outside
/// the prefixes are skipped as they come).
fn seed_glob(prefixes: &[Vec<u8>]) -> Vec<u8> {
    let mut common: &[u8] = prefixes.first().map_or(&[], |p| p.as_slice());
    for prefix in prefixes.iter().skip(1) {
        let shared = common
            .iter()
            .zip(prefix)
            .take_while(|(a, b)| a == b)
            .count();
        common = &common[..shared];
    }
    let mut glob = Vec::with_capacity(common.len() + 1);
    crate::glob::escape_into(&mut glob, common);
    glob.push(b'*');
    glob
}

fn reconnect_delays() -> backon::ExponentialBackoff {
    crate::worker::backoff(RECONNECT_MIN, RECONNECT_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_glob_is_the_common_prefix_escaped() {
        assert_eq!(
            seed_glob(&[b":1:report:".to_vec(), b":1:reportlist:".to_vec()]),
            b":1:report*"
        );
        assert_eq!(seed_glob(&[b"a*b:".to_vec()]), b"a\\*b:*");
        assert_eq!(seed_glob(&[b"a".to_vec(), b"b".to_vec()]), b"*");
        assert_eq!(seed_glob(&[]), b"*");
    }
}
