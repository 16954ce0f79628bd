//! The Redis side of index mode: one tracking connection per primary, whose announcements keep
//! that node's part of the index ([`crate::index`]) equal to what the node holds.
//!
//! A `Tracker` opens a RESP3 connection, turns on `CLIENT TRACKING on BCAST PREFIX …` for the
//! rules' literal prefixes, and from then on every announcement the connection reads is applied
//! to the node's part as it is read (before any reply that follows it on the connection resolves,
//! which is what makes any command on this connection a barrier). Its task then seeds the part with
//! one `SCAN` pass, split into lanes with a request each in flight ([`lanes`]), and checks the
//! existence of announced keys in batches (gathered for a few milliseconds; outside a cluster,
//! a group of keys per `EXISTS`, see [`crate::index`]) — all on the same connection, their
//! answers applied in the order Redis ran them (once the seed is done, one pipeline at a time).
//! If the connection is lost, the part is cleared, and the task reconnects and seeds again: that
//! node's part only.
//!
//! Redis announces nothing when a database's contents are replaced wholesale (`SWAPDB`, checked
//! in Redis' and Valkey's `db.c`: neither calls the tracking code there). So outside a cluster
//! (where `SWAPDB` is refused) each seed writes a random token to a marker key of this daemon's
//! own in the tracked database, and every pipeline of the seed and of the checks is a
//! `MULTI`/`EXEC` that reads it first, as does the barrier: a check can then not answer from
//! swapped-in contents unnoticed. Another value (or none) and the part is dropped and seeded
//! again, with a warning; windows are swept meanwhile.
//!
//! [`Tracking`] holds the trackers of the primaries the worker is connected to. It outlives a
//! reconnect of the worker: a node whose tracking connection survived, with the same id and slots,
//! keeps its part.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use futures::FutureExt;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, PushInfo, PushKind, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{info, warn};

use crate::index::{
    self, lock, Checks, DeleteBooking, Dropped, Key, NodeIndex, Shared, EXISTS_GROUP,
};
use crate::redis_nodes::{CursorOrder, Node, ShardView};
use crate::telemetry::names;
use crate::window::{Failure, PatternSpec, StepError};

mod lanes;

use lanes::{SeedLanes, SEED_LANES};

/// Keys Redis examines per seed `SCAN`: about a millisecond of Redis time, like the sweep's calls
/// (the app shares this Redis).
pub const SEED_SCAN_COUNT: usize = 1_000;
/// An idle tracker still looks at its state this often (a lost connection, the memory bound).
const IDLE_RECHECK: Duration = Duration::from_millis(500);
/// How long an idle tracker gathers announcements after the first before checking them: one
/// pipeline costs Redis and the daemon far less than one per key or per window. A key's check
/// only decides when a stale entry leaves the index; refill guard deletes do not wait.
const GATHER: Duration = Duration::from_millis(20);
/// Reconnect delays of a tracking connection. Short: while it is down the worker sweeps, which
/// costs a pass per window.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// An idle tracker reads its marker this often: a swap is noticed within about this long even
/// while no change arrives, so the next window finds a fresh seed. A read only: a `GET` is served
/// during `CLIENT PAUSE WRITE` (a failover), where a write would hold the connection.
const MARKER_RECHECK: Duration = Duration::from_secs(1);
/// The marker's expiry: a daemon that stops leaves its marker behind for this long at most.
const MARKER_TTL_SECONDS: u64 = 3_600;
/// How often the marker's expiry is renewed (with the next read): well within its expiry.
const MARKER_RENEW: Duration = Duration::from_secs(MARKER_TTL_SECONDS / 6);
/// The marker keys' common prefix (each daemon adds a random part): outside the cache's key space
/// (its ACL must allow `GET`, `SET`, `EXPIRE` on it, and `MULTI`/`EXEC`).
pub const MARKER_PREFIX: &str = "cache-invalidator:index-marker:";
/// Commands per `MULTI`/`EXEC` of a check pipeline, an `EXISTS` of a group counting one per key
/// it names. Redis serves no one else while it runs a transaction, so a batch is cut into
/// transactions about as long as what it runs of a plain pipeline per read of a client (16 KiB
/// of ~80-byte commands, or of keys in a group's `EXISTS`).
const TRANSACTION_COMMANDS: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    /// The server will not announce keys: one without `BCAST` (Dragonfly, a proxy, some managed
    /// Redis), an ACL without `client|tracking`, a Redis before 6. `server` is what its `INFO`
    /// says it is; `reason` explains the reply ([`describe_refusal`]).
    #[error("redis at {node} ({server}) refuses CLIENT TRACKING ... BCAST: {reason}")]
    Refused {
        node: String,
        server: String,
        reason: String,
    },
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
    /// The marker changed: the database was swapped or its marker deleted.
    Swap,
}

impl SeedReason {
    pub fn label(self) -> &'static str {
        match self {
            SeedReason::Start => "start",
            SeedReason::ConnectionLost => "connection_lost",
            SeedReason::Failover => "failover",
            SeedReason::Swap => "swap",
        }
    }
}

/// The trackers of the primaries the worker is connected to, and the index they feed.
pub struct Tracking {
    prefixes: Arc<[Vec<u8>]>,
    shared: Arc<Shared>,
    trackers: Vec<Tracker>,
    command_timeout: Duration,
    /// This daemon's marker key (see the module's documentation).
    marker: Arc<[u8]>,
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
            marker: format!("{MARKER_PREFIX}{}", random_token())
                .into_bytes()
                .into(),
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
                trackers.push(old.swap_remove(position));
                continue;
            }
            let reason = match old.iter().any(|tracker| tracker.name == node.name) {
                true => SeedReason::Failover,
                false if had_trackers => SeedReason::Failover,
                false => SeedReason::Start,
            };
            // A cluster refuses SWAPDB (and has one database): no marker to keep.
            let marker = (!node.clustered).then(|| self.marker.clone());
            let link = Link {
                name: node.name.clone(),
                client: node.tracking_client.clone(),
                prefixes: self.prefixes.clone(),
                index: Arc::default(),
                shared: self.shared.clone(),
                wake: Arc::default(),
                command_timeout: self.command_timeout,
                marker,
                cursor_order: node.cursor_order,
            };
            match Tracker::start(link, node.shard.clone(), reason).await {
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

    /// Resolves once every announcement Redis queued before now has been applied: a command on
    /// each tracking connection, which reads the node's marker. `Err` when a part is not tracked
    /// (it cannot vouch for its keys) or its marker changed (the part is then dropped and seeded
    /// again).
    pub fn barrier(&self) -> BoxFuture<'static, Result<(), StepError>> {
        let probes: Result<Vec<Probe>, StepError> = self
            .trackers
            .iter()
            .map(|tracker| {
                let part = lock(&tracker.index);
                let connection = part.tracking_connection().ok_or_else(|| {
                    StepError::new(&tracker.name, Failure::Barrier("not tracking"))
                })?;
                Ok(Probe {
                    name: tracker.name.clone(),
                    connection,
                    marker: tracker.marker.clone(),
                    token: part.token(),
                    index: tracker.index.clone(),
                    wake: tracker.wake.clone(),
                })
            })
            .collect();
        let shared = self.shared.clone();
        async move {
            let probes = probes?.into_iter().map(|probe| probe.run(&shared));
            futures::future::try_join_all(probes).await.map(|_| ())
        }
        .boxed()
    }

    /// Node `node`'s tracking connection (in the order given to [`Tracking::attach`]), to delete
    /// a window's `keys` on, and the [`DeleteChecks`] that book their reply as the keys' checks
    /// ([`NodeIndex::deleting_all`]). `None` when the node is not tracked.
    pub fn deleting<'k>(
        &self,
        node: usize,
        keys: impl Iterator<Item = &'k [u8]>,
    ) -> Option<(MultiplexedConnection, DeleteChecks)> {
        let tracker = self.trackers.get(node)?;
        let mut part = lock(&tracker.index);
        let connection = part.tracking_connection()?;
        let booking = part.deleting_all(keys);
        let checks = DeleteChecks {
            part: tracker.index.clone(),
            shared: self.shared.clone(),
            booking,
        };
        Some((connection, checks))
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

/// Books the replies of a window's deletes sent on a tracking connection
/// ([`Tracking::deleting`]) as the checks of their keys.
pub struct DeleteChecks {
    part: Arc<Mutex<NodeIndex>>,
    shared: Arc<Shared>,
    booking: DeleteBooking,
}

impl DeleteChecks {
    /// The deletes came back: each key was gone when Redis ran them.
    pub fn deleted<'k>(&self, keys: impl Iterator<Item = &'k [u8]>) {
        lock(&self.part).deleted_all(keys, self.booking, &self.shared.total_keys);
    }

    /// The deletes failed, or will never be booked (their request was dropped): their keys are
    /// checked again.
    pub fn unanswered<'k>(&self, keys: impl Iterator<Item = &'k [u8]>) {
        lock(&self.part).unanswered_all(keys, self.booking);
    }
}

/// One node's part of a barrier.
struct Probe {
    name: String,
    connection: MultiplexedConnection,
    marker: Option<Arc<[u8]>>,
    /// The token the part's seed wrote, when the barrier was sent.
    token: Option<Arc<str>>,
    index: Arc<Mutex<NodeIndex>>,
    wake: Arc<Notify>,
}

impl Probe {
    async fn run(mut self, shared: &Shared) -> Result<(), StepError> {
        let Some(marker) = self.marker.as_deref() else {
            return redis::cmd("PING")
                .query_async::<()>(&mut self.connection)
                .await
                .map_err(|error| StepError::new(&self.name, error));
        };
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(marker)
            .query_async(&mut self.connection)
            .await
            .map_err(|error| StepError::new(&self.name, error))?;
        let Some(token) = self.token else {
            return Err(StepError::new(&self.name, Failure::Barrier("not seeded")));
        };
        if value.as_deref() == Some(token.as_bytes()) {
            return Ok(());
        }
        let mut part = lock(&self.index);
        // Unless a new seed has begun since (it wrote a new token): this one saw the change.
        if part.token().as_deref() == Some(&*token) {
            part.replaced(shared);
            self.wake.notify_one();
            shared.on_change.notify_one();
        }
        let replaced = "the tracked database's contents were replaced since the index was seeded";
        Err(StepError::new(&self.name, Failure::Barrier(replaced)))
    }
}

/// One primary's tracking connection and the task that seeds and maintains its part.
struct Tracker {
    name: String,
    shard: Option<ShardView>,
    index: Arc<Mutex<NodeIndex>>,
    /// Wakes its task (a part dropped by a barrier).
    wake: Arc<Notify>,
    marker: Option<Arc<[u8]>>,
    stop: CancellationToken,
}

impl Tracker {
    /// Turns tracking on (so a refusal is known before the worker counts on the index), then
    /// seeds and maintains the part in a task of its own.
    async fn start(
        link: Link,
        shard: Option<ShardView>,
        reason: SeedReason,
    ) -> Result<Tracker, TrackingError> {
        // A refusal ends index mode; a connection that failed is retried by the task (the part is
        // incomplete meanwhile, so windows are swept).
        let connection = match link.open().await {
            Ok(connection) => Some(connection),
            Err(error @ TrackingError::Refused { .. }) => return Err(error),
            Err(error) => {
                warn!(node = %link.name, %error, "index: tracking connection failed; retrying, sweeping meanwhile");
                None
            }
        };
        let stop = CancellationToken::new();
        let tracker = Tracker {
            name: link.name.clone(),
            shard,
            index: link.index.clone(),
            wake: link.wake.clone(),
            marker: link.marker.clone(),
            stop: stop.clone(),
        };
        tokio::spawn(link.run(connection, reason, stop));
        Ok(tracker)
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
    /// The marker key (none in a cluster).
    marker: Option<Arc<[u8]>>,
    /// How the node's `SCAN` cursor orders its keys: whether the seed can run in lanes.
    cursor_order: CursorOrder,
}

/// How a tracker's maintenance ended.
enum Ended {
    Stopped,
    Lost(String),
    /// The index passed its memory bound: it is being dropped.
    OverLimit,
    /// The marker changed: the part was dropped; the connection still tracks.
    Replaced,
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
                    server: "server unknown: it refused RESP3".to_owned(),
                    reason: describe_refusal(&server_reply(&error)),
                })
            }
            Err(error) => return Err(failed(error)),
        };
        // Counting from before the reply: an announcement may follow it at once.
        lock(&self.index).tracking_started(connection.clone(), &self.shared.total_keys);
        let mut command = redis::cmd("CLIENT");
        // NOLOOP: the window deletes sent here are not announced back (see `Tracking::deleting`).
        command.arg("TRACKING").arg("on").arg("BCAST").arg("NOLOOP");
        for prefix in self.prefixes.iter() {
            command.arg("PREFIX").arg(prefix.as_slice());
        }
        let mut result = command
            .query_async::<()>(&mut connection)
            .await
            .map_err(|error| (error, ""));
        if let (Ok(()), Some(marker)) = (&result, self.marker.as_deref()) {
            // Every command the marker needs, tried once: an ACL that refuses one is known now,
            // not as a seed failing over and over.
            let mut probe = redis::pipe();
            probe.atomic();
            probe
                .cmd("SET")
                .arg(marker)
                .arg("")
                .arg("EX")
                .arg(MARKER_TTL_SECONDS);
            probe.cmd("GET").arg(marker);
            probe.cmd("EXPIRE").arg(marker).arg(MARKER_TTL_SECONDS);
            result = probe
                .query_async::<()>(&mut connection)
                .await
                .map_err(|error| (error, " (the index's marker key: MULTI, EXEC, SET, GET, EXPIRE on keys under cache-invalidator:index-marker:)"));
        }
        match result {
            Ok(()) => Ok(connection),
            Err((error, what)) => {
                lock(&self.index).tracking_lost(&self.shared.total_keys);
                if is_refusal(&error) {
                    Err(TrackingError::Refused {
                        node: self.name.clone(),
                        server: server_of(&mut connection).await,
                        reason: format!("{}{what}", describe_refusal(&server_reply(&error))),
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
            let ended = self.maintain(&mut current, &stop).await;
            if !matches!(ended, Ended::Stopped) {
                lock(&self.index).tracking_lost(&self.shared.total_keys);
                index::record_size(&self.shared);
                self.shared.on_change.notify_one();
            }
            match ended {
                Ended::Stopped => return,
                // Forget every key and stop listening now, not when the worker next looks:
                // announcements would go on filling the part.
                Ended::OverLimit => return,
                Ended::Lost(why) => {
                    warn!(node = %self.name, reason = %why, "index: tracking connection lost; sweeping until the index is seeded again");
                    reason = SeedReason::ConnectionLost;
                }
                Ended::Replaced => {
                    warn!(node = %self.name, "index: the tracked database's contents were replaced without announcements (SWAPDB, or the index's marker key was deleted or evicted); sweeping until the index is seeded again");
                    // The connection still tracks: seeded again on it, counting from now.
                    lock(&self.index).tracking_started(current.clone(), &self.shared.total_keys);
                    connection = Some(current);
                    reason = SeedReason::Swap;
                }
            }
        }
    }

    /// The seed `SCAN`, existence checks of announced keys and the refill guard's deletes on the
    /// tracking connection, each pipeline reading the marker first. While the seed runs, one
    /// pipeline per lane is in flight ([`lanes`]); afterwards one at a time. Replies are applied
    /// in the order Redis ran them.
    async fn maintain(
        &self,
        connection: &mut MultiplexedConnection,
        stop: &CancellationToken,
    ) -> Ended {
        let seed_glob: Arc<[u8]> = seed_glob(&self.prefixes).into();
        let token = random_token();
        let mut marker = MarkerStep::Write(token.clone());
        let mut lanes = SeedLanes::new(self.cursor_order, SEED_LANES);
        let started = Instant::now();
        let mut clock = MarkerClock {
            read: Instant::now(),
            renewed: Instant::now(),
        };
        let mut in_flight = FuturesOrdered::new();
        loop {
            if self.shared.over_limit.load(Ordering::Relaxed) {
                return Ended::OverLimit;
            }
            let mut sent = false;
            loop {
                let work = match self.next_to_send(
                    &mut marker,
                    &mut lanes,
                    &clock,
                    in_flight.is_empty(),
                ) {
                    Ok(Some(work)) => work,
                    Ok(None) => break,
                    Err(ended) => return ended,
                };
                clock.sent(&work);
                in_flight.push_back(self.send(work, &seed_glob, connection.clone()));
                sent = true;
            }
            if sent {
                // The requests just made go out before the next reply is applied: while the
                // seed's replies arrive faster than they are applied, Redis would otherwise get
                // no new `SCAN` until every ready reply was applied, and then sat idle.
                tokio::task::yield_now().await;
            }
            if in_flight.is_empty() {
                if self.idle(stop).await {
                    return Ended::Stopped;
                }
                continue;
            }
            let (work, replies) = tokio::select! {
                Some(sent) = in_flight.next() => sent,
                _ = stop.cancelled() => return Ended::Stopped,
            };
            let replies = match replies {
                Ok(replies) => replies,
                Err(error) => {
                    lock(&self.index).verification_lost();
                    return Ended::Lost(error.to_string());
                }
            };
            if let Err(ended) = self.applied(&work, &token, replies, &mut lanes, started) {
                return ended;
            }
            if self.shared.past_the_bound() {
                self.shared.over_limit.store(true, Ordering::Relaxed);
                return Ended::OverLimit;
            }
            index::record_size(&self.shared);
        }
    }

    /// The next pipeline to send, if one is due: while seeding, one for each lane without a
    /// `SCAN` in flight; otherwise the checks and marker reads due, once nothing is in flight.
    fn next_to_send(
        &self,
        marker: &mut MarkerStep,
        lanes: &mut SeedLanes,
        clock: &MarkerClock,
        nothing_in_flight: bool,
    ) -> Result<Option<Work>, Ended> {
        let scan = lanes.next_idle();
        if scan.is_none() && !nothing_in_flight {
            return Ok(None);
        }
        let step = std::mem::replace(marker, MarkerStep::Read { renew: false });
        let work = self.next_work(step, scan, clock)?;
        Ok((!work.is_empty()).then_some(work))
    }

    /// Sends `work`'s pipeline; resolves with the work and its replies.
    fn send(
        &self,
        work: Work,
        seed_glob: &Arc<[u8]>,
        mut connection: MultiplexedConnection,
    ) -> BoxFuture<'static, (Work, redis::RedisResult<Vec<Value>>)> {
        let pipe = work.pipeline(seed_glob, self.marker.as_deref());
        // A task of its own, so the request reaches the connection as soon as the tracker yields,
        // not when the tracker next polls it (see `maintain`).
        let request = AbortOnDropHandle::new(tokio::spawn(async move {
            pipe.query_async::<Vec<Value>>(&mut connection).await
        }));
        async move {
            let replies = request.await.unwrap_or_else(|lost| {
                Err(redis::RedisError::from(std::io::Error::other(format!(
                    "the request's task ended: {lost}"
                ))))
            });
            (work, replies)
        }
        .boxed()
    }

    /// Applies a pipeline's replies; moves its lane on, and finishes the seed once every lane
    /// has covered its share.
    fn applied(
        &self,
        work: &Work,
        token: &Arc<str>,
        replies: Vec<Value>,
        lanes: &mut SeedLanes,
        started: Instant,
    ) -> Result<(), Ended> {
        let next = self.apply(work, token, replies)?;
        let (Some((lane, _)), Some(next)) = (work.scan, next) else {
            return Ok(());
        };
        lanes.advanced(lane, next);
        if !lanes.finished() {
            return Ok(());
        }
        let building = Instant::now();
        let keys = {
            let mut part = lock(&self.index);
            part.seed_finished(&self.shared.total_keys);
            part.len()
        };
        self.shared.on_change.notify_one();
        info!(
            node = %self.name,
            keys,
            duration_ms = started.elapsed().as_millis() as u64,
            built_in_ms = building.elapsed().as_millis() as u64,
            "index: complete"
        );
        Ok(())
    }

    /// The next pipeline's work: the checks due, the seed's next `SCAN`, what to do with the
    /// marker. `Err` when the part was dropped.
    fn next_work(
        &self,
        marker: MarkerStep,
        scan: Option<(usize, u64)>,
        clock: &MarkerClock,
    ) -> Result<Work, Ended> {
        let mut part = lock(&self.index);
        if !part.is_alive() {
            return Err(match part.dropped_by() {
                Some(Dropped::Replaced) => Ended::Replaced,
                Some(Dropped::Flush) => {
                    Ended::Lost("a database was flushed (Redis does not say which)".to_owned())
                }
                None => Ended::Lost("the connection closed".to_owned()),
            });
        }
        let marker = match (self.marker.is_some(), marker) {
            (false, _) => MarkerStep::Skip,
            (true, MarkerStep::Read { .. }) => MarkerStep::Read {
                renew: clock.renewed.elapsed() >= MARKER_RENEW,
            },
            (true, step) => step,
        };
        Ok(Work {
            checks: part.take_checks(),
            group: match self.marker {
                Some(_) => EXISTS_GROUP,
                None => 1,
            },
            scan,
            marker_due: self.marker.is_some() && clock.read.elapsed() >= MARKER_RECHECK,
            marker,
        })
    }

    /// Waits for work (an announcement) or a recheck; true when stopped. Announcements come in
    /// bursts (a window's deletes, the app's writes): gathered for a moment after the first, they
    /// are checked in one pipeline, not one each.
    async fn idle(&self, stop: &CancellationToken) -> bool {
        tokio::select! {
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep(IDLE_RECHECK) => return false,
            _ = stop.cancelled() => return true,
        }
        {
            let part = lock(&self.index);
            // A refill is deleted as soon as it is announced; a dropped part reseeded at once.
            if part.has_guard_unlinks() || !part.is_alive() {
                return false;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(GATHER) => false,
            _ = stop.cancelled() => true,
        }
    }

    /// Applies the replies of `work`'s pipeline to the part; the next cursor of its `SCAN`, if it
    /// had one.
    fn apply(
        &self,
        work: &Work,
        token: &Arc<str>,
        replies: Vec<Value>,
    ) -> Result<Option<u64>, Ended> {
        let mut part = lock(&self.index);
        let replies = match work.command_replies(replies, token) {
            Ok(replies) => replies,
            Err(true) => {
                // The answers are about another database's contents.
                part.replaced(&self.shared);
                return Err(Ended::Replaced);
            }
            Err(false) => return Err(Ended::Lost("unreadable EXEC reply".to_owned())),
        };
        if matches!(work.marker, MarkerStep::Write(_)) {
            part.seeding_with(token.clone());
        }
        let mut replies = replies.into_iter();
        let mut refills = 0u64;
        for command in work.check_commands() {
            let reply = replies.next();
            match command {
                Command::Exists(group) => {
                    part.group_verified(group, exists_count(reply), &self.shared.total_keys);
                }
                Command::Unlink(group) => {
                    let removed = reply.map(redis::from_redis_value::<u64>);
                    // Gone now, every key of the group, whether the UNLINK removed a refill or
                    // found nothing; kept when unanswered.
                    let exists = !matches!(removed, Some(Ok(_)));
                    for key in group {
                        part.verified(key, exists, &self.shared.total_keys);
                    }
                    if let Some(Ok(removed)) = removed {
                        refills += removed;
                    }
                }
                // Not a check: read below.
                Command::Scan(_) => {}
            }
        }
        if refills > 0 {
            metrics::counter!(names::REFILL_KEYS_DELETED).increment(refills);
            info!(node = %self.name, keys = refills, "refill guard removed keys written back after their invalidation");
        }
        if work.scan.is_none() {
            return Ok(None);
        }
        let scanned = replies
            .next()
            .map(redis::from_redis_value::<(u64, Vec<Vec<u8>>)>);
        let Some(Ok((next, keys))) = scanned else {
            return Err(Ended::Lost("unreadable SCAN reply".to_owned()));
        };
        for key in keys {
            if self.prefixes.iter().any(|p| key.starts_with(p)) {
                part.seeded(&key, &self.shared.total_keys);
            }
        }
        Ok(Some(next))
    }
}

/// What a pipeline does with the node's marker key, first.
enum MarkerStep {
    /// No marker (a cluster node).
    Skip,
    /// The seed begins: the marker gets its token.
    Write(Arc<str>),
    /// The marker is read, and its expiry renewed when `renew`.
    Read { renew: bool },
}

/// When the marker was last read and last given its expiry.
struct MarkerClock {
    read: Instant,
    renewed: Instant,
}

impl MarkerClock {
    fn sent(&mut self, work: &Work) {
        self.read = Instant::now();
        if matches!(
            work.marker,
            MarkerStep::Write(_) | MarkerStep::Read { renew: true }
        ) {
            self.renewed = Instant::now();
        }
    }
}

/// One pipeline's work on the tracking connection.
struct Work {
    checks: Checks,
    /// Keys of `checks.exists` per `EXISTS`: [`EXISTS_GROUP`] with a marker (not a cluster node),
    /// else 1 (a cluster refuses a multi-key command across hash slots: `CROSSSLOT`).
    group: usize,
    /// The seed's `SCAN`, while it runs: its lane and cursor.
    scan: Option<(usize, u64)>,
    marker: MarkerStep,
    /// The marker's periodic read is due (a pipeline is sent for it alone if need be).
    marker_due: bool,
}

impl Work {
    /// Nothing to send: no check, no seed, and no marker due for its periodic read.
    fn is_empty(&self) -> bool {
        self.checks.is_empty() && self.scan.is_none() && !self.marker_due
    }

    /// The checks' commands, in the order they are sent and answered.
    fn check_commands(&self) -> impl Iterator<Item = Command<'_>> {
        let checks = &self.checks;
        let groups = checks.exists.chunks(self.group.max(1)).map(Command::Exists);
        let each = checks.exists_each.chunks(1).map(Command::Exists);
        // An UNLINK leaves each of its keys gone, whatever it answers: grouped like the EXISTS
        // (one key each in a cluster, which refuses multi-key commands across slots).
        let unlink = checks.unlink.chunks(self.group.max(1)).map(Command::Unlink);
        groups.chain(each).chain(unlink)
    }

    /// The work's commands; with a marker, cut into `MULTI`/`EXEC` transactions of at most
    /// [`TRANSACTION_COMMANDS`], each reading the marker first, so no check or `SCAN` can run
    /// against swapped-in contents unnoticed (only each `EXEC`'s reply is returned).
    fn pipeline(&self, seed_glob: &[u8], marker: Option<&[u8]>) -> redis::Pipeline {
        let scan = self.scan.map(|(_, at)| Command::Scan(at));
        let commands = self.check_commands().chain(scan);
        // Each command is written into the pipeline once, as it comes: no `Cmd` of its own.
        let mut pipe = redis::pipe();
        let Some(marker) = marker else {
            for command in commands {
                command.write(&mut pipe, seed_glob);
            }
            return pipe;
        };
        // With no command the transaction only reads the marker (its periodic read).
        self.open_transaction(&mut pipe, marker, true);
        // What the open transaction holds, counted as `Command::weight` does.
        let mut weight = 0;
        for command in commands {
            if weight > 0 && weight + command.weight() > TRANSACTION_COMMANDS {
                pipe.cmd("EXEC");
                self.open_transaction(&mut pipe, marker, false);
                weight = 0;
            }
            weight += command.weight();
            command.write(&mut pipe, seed_glob);
            pipe.ignore();
        }
        pipe.cmd("EXEC");
        pipe
    }

    /// `MULTI` and the marker's step: its write or renewal in the pipeline's `first` transaction,
    /// a read in the others.
    fn open_transaction(&self, pipe: &mut redis::Pipeline, marker: &[u8], first: bool) {
        pipe.cmd("MULTI").ignore();
        match (first, &self.marker) {
            (true, MarkerStep::Write(token)) => {
                pipe.cmd("SET")
                    .arg(marker)
                    .arg(&**token)
                    .arg("EX")
                    .arg(MARKER_TTL_SECONDS)
                    .ignore();
            }
            (true, MarkerStep::Read { renew: true }) => {
                pipe.cmd("GET").arg(marker).ignore();
                pipe.cmd("EXPIRE")
                    .arg(marker)
                    .arg(MARKER_TTL_SECONDS)
                    .ignore();
            }
            _ => {
                pipe.cmd("GET").arg(marker).ignore();
            }
        }
    }

    /// The replies of [`Work::pipeline`]'s commands, in order, once each transaction's marker was
    /// found holding `token`; `Err(true)` when one was not, `Err(false)` for an unreadable reply.
    fn command_replies(&self, replies: Vec<Value>, token: &str) -> Result<Vec<Value>, bool> {
        if matches!(self.marker, MarkerStep::Skip) {
            return Ok(replies);
        }
        let mut flat = Vec::new();
        for (index, reply) in replies.into_iter().enumerate() {
            let Value::Array(results) = reply else {
                return Err(false);
            };
            let mut results = results.into_iter();
            let marker = results.next();
            let holds_token = match (index, &self.marker) {
                (0, MarkerStep::Write(_)) => marker.is_some(),
                (0, MarkerStep::Read { renew: true }) => {
                    results.next();
                    is_token(marker, token)
                }
                _ => is_token(marker, token),
            };
            if !holds_token {
                return Err(true);
            }
            flat.extend(results);
        }
        Ok(flat)
    }
}

/// One command of a pipeline's work, written straight into the pipeline.
enum Command<'a> {
    /// One `EXISTS` naming every key given.
    Exists(&'a [Key]),
    /// One `UNLINK` of every key given (a refill guard's check: gone afterwards).
    Unlink(&'a [Key]),
    /// The seed's next `SCAN`, from this cursor.
    Scan(u64),
}

impl Command<'_> {
    /// What the command counts for in a transaction's [`TRANSACTION_COMMANDS`].
    fn weight(&self) -> usize {
        match self {
            Command::Exists(keys) | Command::Unlink(keys) => keys.len(),
            Command::Scan(_) => 1,
        }
    }

    fn write(&self, pipe: &mut redis::Pipeline, seed_glob: &[u8]) {
        match self {
            Command::Exists(keys) => {
                let exists = pipe.cmd("EXISTS");
                for key in *keys {
                    exists.arg(&**key);
                }
            }
            Command::Unlink(keys) => {
                let unlink = pipe.cmd("UNLINK");
                for key in *keys {
                    unlink.arg(&**key);
                }
            }
            Command::Scan(at) => {
                let scan = pipe.cmd("SCAN").arg(*at);
                if seed_glob != b"*" {
                    scan.arg("MATCH").arg(seed_glob);
                }
                scan.arg("COUNT").arg(SEED_SCAN_COUNT);
            }
        }
    }
}

/// The count an `EXISTS` answered (`None`: unreadable).
fn exists_count(reply: Option<Value>) -> Option<i64> {
    match reply? {
        Value::Int(count) => Some(count),
        other => redis::from_redis_value::<i64>(other).ok(),
    }
}

/// Whether a `GET` of the marker answered `token`.
fn is_token(reply: Option<Value>, token: &str) -> bool {
    matches!(
        reply.map(redis::from_redis_value::<Option<Vec<u8>>>),
        Some(Ok(Some(value))) if value == token.as_bytes()
    )
}

/// A reply from the server (an ACL, an unknown command or option) will not change on retrying; a
/// broken or slow connection may.
fn is_refusal(error: &redis::RedisError) -> bool {
    !(error.is_io_error() || error.is_timeout() || error.is_connection_dropped())
}

/// Why a server refused `CLIENT TRACKING on BCAST …`, read from its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The server has no broadcasting tracking: it does not know the command, the option or
    /// RESP3. Dragonfly answers `ERR syntax error` (its `CLIENT TRACKING` takes only `ON`/`OFF`,
    /// `OPTIN`/`OPTOUT` and `NOLOOP`).
    Unsupported,
    /// An ACL forbids it: `NOPERM …`.
    NotPermitted,
    /// Any other reply: said as it is.
    Other,
}

/// Classifies a refusal from the reply's text as the server sent it (`ERR syntax error`,
/// `NOPERM User … has no permissions …`), error code first.
pub fn classify_refusal(reply: &str) -> Refusal {
    let code = reply.split_whitespace().next().unwrap_or_default();
    let text = reply.to_ascii_lowercase();
    if code.eq_ignore_ascii_case("NOPERM") {
        return Refusal::NotPermitted;
    }
    const UNSUPPORTED: [&str; 6] = [
        "syntax error",
        "unknown command",
        "unknown subcommand",
        "unknown option",
        "not supported",
        "unknown protocol",
    ];
    if UNSUPPORTED.iter().any(|phrase| text.contains(phrase)) {
        Refusal::Unsupported
    } else {
        Refusal::Other
    }
}

/// What the refusal means for an operator, with the server's reply.
pub fn describe_refusal(reply: &str) -> String {
    let meaning = match classify_refusal(reply) {
        Refusal::Unsupported => "the server does not support broadcasting tracking",
        Refusal::NotPermitted => {
            "the connection's ACL user may not run it (grant it +client|tracking, or use --mode sweep)"
        }
        Refusal::Other => "an unexpected refusal",
    };
    format!("{meaning} (reply: {reply})")
}

/// A server's error reply as it sent it (`CODE detail`), else the client's description.
fn server_reply(error: &redis::RedisError) -> String {
    match (error.code(), error.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        _ => error.to_string(),
    }
}

/// Which server this is (`Redis 7.0.15`, `Valkey 8.0.1`, `Dragonfly df-v1.25.0`), from the
/// `INFO server` fields that name it: Dragonfly and Valkey report a `redis_version` too (the
/// version they are compatible with), so their own fields are looked at first.
pub fn server_identity(info: &str) -> Option<String> {
    let field = |name: &str| {
        info.lines()
            .filter_map(|line| line.trim_end().split_once(':'))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.to_owned())
    };
    if let Some(version) = field("dragonfly_version") {
        return Some(format!("Dragonfly {version}"));
    }
    if let Some(version) = field("valkey_version") {
        return Some(format!("Valkey {version}"));
    }
    match (field("server_name"), field("redis_version")) {
        (Some(name), Some(version)) => Some(format!("{name} {version}")),
        (None, Some(version)) => Some(format!("Redis {version}")),
        (Some(name), None) => Some(name),
        (None, None) => None,
    }
}

/// [`server_identity`] of the server behind `connection`, or why it is unknown.
async fn server_of(connection: &mut MultiplexedConnection) -> String {
    match redis::cmd("INFO")
        .arg("server")
        .query_async::<String>(connection)
        .await
    {
        Ok(info) => server_identity(&info).unwrap_or_else(|| "server unknown".to_owned()),
        Err(error) => format!("server unknown: INFO refused: {}", server_reply(&error)),
    }
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

/// A random token: the marker's value, and part of its key. Not secret, only unlikely to repeat
/// (std's per-process random hash keys, mixed with the time and a counter).
fn random_token() -> Arc<str> {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    hasher.write_u32(std::process::id());
    format!("{:016x}", hasher.finish()).into()
}

fn reconnect_delays() -> backon::ExponentialBackoff {
    crate::backoff::backoff(RECONNECT_MIN, RECONNECT_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(prefix: &str, count: usize) -> Vec<Key> {
        (0..count)
            .map(|n| Key::from(format!("{prefix}{n}").as_bytes()))
            .collect()
    }

    fn checks_work(checks: Checks, group: usize, marker: MarkerStep) -> Work {
        Work {
            checks,
            group,
            scan: None,
            marker,
            marker_due: false,
        }
    }

    /// Each command of `pipe` as its name and how many arguments it has.
    fn shape(pipe: &redis::Pipeline) -> Vec<(String, usize)> {
        pipe.cmd_iter()
            .map(|cmd| {
                let mut args = cmd.args_iter();
                let name = match args.next() {
                    Some(redis::Arg::Simple(name)) => String::from_utf8_lossy(name).into_owned(),
                    _ => String::new(),
                };
                (name, args.len())
            })
            .collect()
    }

    #[test]
    fn checks_share_an_exists_outside_a_cluster_and_transactions_count_their_keys() {
        let checks = Checks {
            exists: keys(":1:g", 450),
            exists_each: keys(":1:e", 3),
            unlink: keys(":1:u", 2),
        };
        let work = checks_work(checks, EXISTS_GROUP, MarkerStep::Read { renew: false });
        let shape = shape(&work.pipeline(b"*", Some(b"marker")));
        let exists = |keys: usize| ("EXISTS".to_owned(), keys);
        let mut expected = Vec::new();
        // 200 keys per transaction: five groups of 40, twice; then the rest.
        for _ in 0..2 {
            expected.push(("MULTI".to_owned(), 0));
            expected.push(("GET".to_owned(), 1));
            expected.extend(std::iter::repeat_n(exists(40), 5));
            expected.push(("EXEC".to_owned(), 0));
        }
        expected.push(("MULTI".to_owned(), 0));
        expected.push(("GET".to_owned(), 1));
        expected.extend([exists(40), exists(10), exists(1), exists(1), exists(1)]);
        // The guarded keys share one UNLINK as well.
        expected.push(("UNLINK".to_owned(), 2));
        expected.push(("EXEC".to_owned(), 0));
        assert_eq!(shape, expected);
    }

    #[test]
    fn a_cluster_node_gets_an_exists_and_an_unlink_per_key() {
        let checks = Checks {
            exists: keys(":1:g", 3),
            exists_each: keys(":1:e", 1),
            unlink: keys(":1:u", 2),
        };
        let work = checks_work(checks, 1, MarkerStep::Skip);
        let shape = shape(&work.pipeline(b"*", None));
        let mut expected = vec![("EXISTS".to_owned(), 1); 4];
        expected.extend(vec![("UNLINK".to_owned(), 1); 2]);
        assert_eq!(shape, expected);
    }

    #[test]
    fn the_marker_alone_is_read_in_a_transaction_of_its_own() {
        let work = checks_work(
            Checks::default(),
            EXISTS_GROUP,
            MarkerStep::Read { renew: true },
        );
        let shape = shape(&work.pipeline(b"*", Some(b"marker")));
        let names: Vec<&str> = shape.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["MULTI", "GET", "EXPIRE", "EXEC"]);
    }

    /// A pipeline's answers applied through `Link::apply`: a group whose `EXISTS` answered 1
    /// keeps every key it named, one answering 0 removes its keys.
    #[test]
    fn applied_group_answers_remove_only_keys_of_groups_that_found_none() {
        let shared = Arc::new(Shared::new(100, Default::default()));
        // A part of this module's descendant: alive without a connection.
        let index = Arc::new(Mutex::new(NodeIndex {
            alive: true,
            ..NodeIndex::default()
        }));
        let total = &shared.total_keys;
        let names: Vec<String> = (0..4).map(|n| format!(":1:k{n}")).collect();
        {
            let mut part = lock(&index);
            for name in &names {
                part.seeded(name.as_bytes(), total);
            }
            part.seed_finished(total);
            for name in &names {
                part.announced(name.as_bytes(), &shared);
            }
        }
        let link = Link {
            name: "test".to_owned(),
            client: Client::open("redis://127.0.0.1:1/").expect("a valid address"),
            prefixes: vec![b":1:".to_vec()].into(),
            index: index.clone(),
            shared: shared.clone(),
            wake: Arc::default(),
            command_timeout: Duration::from_secs(1),
            marker: Some(Arc::from(&b"marker"[..])),
            cursor_order: CursorOrder::Unknown,
        };
        let checks = lock(&index).take_checks();
        let work = checks_work(checks, 2, MarkerStep::Read { renew: false });
        let token = random_token();
        let exec = Value::Array(vec![
            Value::BulkString(token.as_bytes().to_vec()),
            Value::Int(1),
            Value::Int(0),
        ]);
        assert!(matches!(link.apply(&work, &token, vec![exec]), Ok(None)));
        {
            let part = lock(&index);
            assert_eq!(part.len(), 2);
            for key in &work.checks.exists[..2] {
                assert!(part.keys.contains(key), "kept: its group found a key");
            }
        }
        let next = lock(&index).take_checks();
        let mut each = next.exists_each.clone();
        each.sort();
        let mut kept = work.checks.exists[..2].to_vec();
        kept.sort();
        assert_eq!(each, kept, "checked again one by one");
    }

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

    /// Dragonfly cannot be installed where these tests run, so its refusal is checked with the
    /// reply it sends: `ClientTracking` in dragonfly's src/server/server_family.cc answers any
    /// option other than ON/OFF, OPTIN/OPTOUT and NOLOOP (so `BCAST`, and more than three
    /// arguments) with `SendError(kSyntaxErr)`, where src/facade/error.h has
    /// `kSyntaxErr[] = "syntax error"`, sent as `-ERR syntax error` (dragonflydb/dragonfly at
    /// f8eca6d0b05c915cee9439036b5b04aebbb973bb).
    #[test]
    fn dragonflys_reply_to_bcast_means_unsupported() {
        assert_eq!(classify_refusal("ERR syntax error"), Refusal::Unsupported);
        let described = describe_refusal("ERR syntax error");
        assert!(described.contains("does not support broadcasting tracking"));
        assert!(described.contains("ERR syntax error"));
    }

    #[test]
    fn other_refusals_are_told_apart() {
        // Redis' ACL (7.0 wording).
        let noperm = "NOPERM this user has no permissions to run the 'client|tracking' command";
        assert_eq!(classify_refusal(noperm), Refusal::NotPermitted);
        assert!(describe_refusal(noperm).contains("+client|tracking"));
        // Redis before 6; a proxy that passes only data commands.
        assert_eq!(
            classify_refusal("ERR unknown subcommand 'TRACKING'. Try CLIENT HELP."),
            Refusal::Unsupported
        );
        assert_eq!(
            classify_refusal("ERR unknown command 'CLIENT', with args beginning with: "),
            Refusal::Unsupported
        );
        assert_eq!(
            classify_refusal("ERR Prefixes for a client are overlapping"),
            Refusal::Other
        );
        assert!(describe_refusal("ERR busy").contains("unexpected refusal (reply: ERR busy)"));
    }

    #[test]
    fn the_server_is_named_from_its_own_info_fields() {
        let redis = "# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n";
        assert_eq!(server_identity(redis).as_deref(), Some("Redis 7.0.15"));
        let valkey =
            "# Server\r\nredis_version:7.2.4\r\nserver_name:valkey\r\nvalkey_version:8.0.1\r\n";
        assert_eq!(server_identity(valkey).as_deref(), Some("Valkey 8.0.1"));
        // Dragonfly reports the Redis version it is compatible with, then its own (`append(
        // "redis_version", …)` then `append("dragonfly_version", …)` in server_family.cc).
        let dragonfly = "# Server\r\nredis_version:7.4.0\r\ndragonfly_version:df-v1.25.2\r\n";
        assert_eq!(
            server_identity(dragonfly).as_deref(),
            Some("Dragonfly df-v1.25.2")
        );
        assert_eq!(server_identity("# Server\r\n"), None);
    }
}
