//! The outbox, seen from the worker: claim pending changes oldest first with `FOR UPDATE SKIP
//! LOCKED`, let them leave the outbox once Redis confirmed their keys are gone, set unusable rows
//! aside as dead letters, and report the backlog.
//!
//! A claim deletes the rows it takes inside an open transaction (an *epoch*), which commits only
//! once Redis confirmed every key of its windows gone: until then other sessions still see the
//! rows, and other claims skip them (locked). So a worker that dies — SIGKILL, a dropped
//! connection — gives them back (its transaction rolls back) to the next claim and nothing is
//! lost; several workers share the outbox because each skips the rows another holds. Several
//! claims go into one epoch, so changes that arrive while a sweep runs are claimed at once and join
//! that sweep, instead of waiting for a connection to come free. An epoch takes claims for
//! [`EPOCH_OPEN_FOR`] (longer when passes are slow, see [`Outbox::pace_to_pass`]), then commits
//! when its last window is done.
//!
//! A claim is bounded in time as well: each claim connection sets Postgres'
//! `idle_in_transaction_session_timeout` to the claim timeout (`--claim-timeout`), and a task of
//! the worker's says something on each connection several times per timeout. A worker that runs
//! keeps its claims however long its sweep takes (a pass over millions of keys takes seconds);
//! a worker that is frozen (SIGSTOP, a paused container, a stalled VM: TCP keepalives do not see
//! it, the kernel still answers them) falls silent, and the server ends its sessions once the
//! timeout has passed, which gives its rows back to the other workers. When the frozen worker
//! wakes, it finds those connections closed and treats their claims as lost
//! ([`OutboxError::ClaimLost`]): the changes are swept again (at-least-once). A heartbeat rather
//! than a timeout alone, because the longest legitimate hold has no bound: it grows with the
//! keyspace, and with replicas that lag ([`crate::replicas`]).

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures::FutureExt;
use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement};

use crate::postgres::{answered, describe, ConnectError, Driver, PgTarget, QueryError};
use crate::schema::SCHEMA;

/// Transactions that may hold claims at once. Each is one connection and lives
/// [`EPOCH_OPEN_FOR`] plus a full pass (its last window joins mid-pass and needs a full round), so
/// twelve hold passes of up to `(N - 1) × EPOCH_OPEN_FOR` (1.65 s) at the shortest epochs; slower
/// passes stretch the epochs ([`Outbox::pace_to_pass`]). Measured at 1M keys under 5,000 row
/// changes/s, passes took 1.0–2 s, and with four connections claims often waited for an epoch to
/// commit (claims now go into the newest epoch instead, see [`Outbox::claim`]).
pub const EPOCH_CONNECTIONS: usize = 12;
/// How long an epoch accepts new claims before the next claim opens another one. A row leaves the
/// outbox only when its epoch commits, after the last window claimed into it: the backlog's age
/// is about this plus one pass. 300 ms gave a sustained-load p99 of 2.09 s at 1M keys, over the
/// 2 s target.
pub const EPOCH_OPEN_FOR: Duration = Duration::from_millis(150);
/// The longest an epoch takes claims, however slow the passes: a row claimed early waits for the
/// windows claimed after it.
pub const EPOCH_OPEN_AT_MOST: Duration = Duration::from_secs(1);
/// Above the longest legitimate hold of a claim (a pass over a large keyspace), well under the
/// minute after which an operator would call a change stuck.
pub const DEFAULT_CLAIM_TIMEOUT: Duration = Duration::from_secs(30);
/// Outbox rows per claim. With at most 64 values per row this bounds one claim's memory.
pub const CLAIM_LIMIT: i64 = 200;
/// Outbox rows per claim once a claim came back full while sweeping: a backlog is waiting (after
/// an outage, a stop, a large transaction). A pass serves every window that joined it, so the
/// claims' round trips are what a drain waits for once the pass has room for the backlog's
/// patterns ([`crate::worker::MAX_ACTIVE_PATTERNS`]): 200,000 single-row changes at 1M keys
/// drained at 16,700/s with claims of 200 rows and 23,000–32,500/s with claims of 5,000, at 2.2
/// and 1.6 s of the daemon's CPU per 100,000 changes (one machine, runs minutes apart). The changed rows a claim brings are bounded as
/// well, by [`BACKLOG_CLAIM_CHANGED_ROWS`]. Index mode keeps [`CLAIM_LIMIT`] (see the worker's
/// pacing).
pub const BACKLOG_CLAIM_LIMIT: i64 = 5_000;
/// Changed rows (values of the outbox rows) a backlog's claim aims at: what [`CLAIM_LIMIT`] rows
/// of 64 values each bring at most, so a backlog of large statements is claimed no larger than
/// before (a 200,000-row statement claimed 5,000 outbox rows at a time took a debug build's worker
/// to 120 MB), while single-row changes are claimed [`BACKLOG_CLAIM_LIMIT`] at a time.
pub const BACKLOG_CLAIM_CHANGED_ROWS: u64 = 200 * 64;
/// Heartbeats per claim timeout on each claim connection. With three, one heartbeat delayed by a
/// slow round trip (a loaded Postgres, a busy worker thread) still leaves another before the
/// server's timeout, while a 30 s timeout costs one trivial query per connection every 10 s.
pub const HEARTBEATS_PER_CLAIM_TIMEOUT: u32 = 3;
/// The shortest heartbeat period, however short the claim timeout: a timer needs a period, and a
/// claim connection is not worth more than a round trip a millisecond.
const HEARTBEAT_AT_MOST_EVERY: Duration = Duration::from_millis(1);

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("postgres: {}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// A query got no answer in time ([`crate::postgres::ANSWER_TIMEOUT`]): its connection is
    /// dropped, and with it any epoch it carried (its rows go back to the outbox when the server
    /// notices).
    #[error("{}", QueryError::Unanswered)]
    Unanswered,
    /// The connection carrying an epoch closed: the server rolled its transaction back, so the
    /// epoch's rows are pending again and will be claimed (and swept) anew.
    #[error(
        "the connection holding claim epoch {epoch} closed ({reason}); its rows went back to the \
         outbox"
    )]
    ClaimLost { epoch: u64, reason: String },
}

impl From<QueryError> for OutboxError {
    fn from(error: QueryError) -> OutboxError {
        match error {
            QueryError::Failed(error) => OutboxError::Postgres(error),
            QueryError::Unanswered => OutboxError::Unanswered,
        }
    }
}

impl OutboxError {
    /// Configuration errors (a bad URL, an unreadable certificate) will not heal by retrying.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            OutboxError::Connect(ConnectError::InvalidUrl { .. } | ConnectError::RootCert { .. })
        )
    }
}

/// One outbox row as claimed.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub table_name: String,
    pub op: String,
    pub rows: Option<Value>,
    /// When the change was captured, in microseconds since the Unix epoch by Postgres' clock:
    /// the row is deleted by its claim, so a dead letter is written from what the claim read.
    pub created_micros: i64,
    /// Seconds from the change's capture to its claim, by Postgres' clock.
    pub age_at_claim: f64,
}

/// A claimed row the rules cannot use, and why: kept as a dead letter when its epoch commits.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub row: OutboxRow,
    pub error: String,
}

/// Rows claimed together, belonging to one epoch.
#[derive(Debug)]
pub struct Claim {
    pub epoch: u64,
    pub rows: Vec<OutboxRow>,
    /// The claim hit its limit: more rows are probably waiting.
    pub full: bool,
}

#[derive(Debug)]
struct Epoch {
    id: u64,
    opened: Instant,
    /// Within one transaction `SKIP LOCKED` does not skip the rows it locked itself, so later
    /// claims of the same epoch continue after the highest id already claimed. A row with a lower
    /// id that commits late is claimed by the next epoch.
    last_id: i64,
    windows_outstanding: usize,
}

#[derive(Default)]
struct Slot {
    connection: Option<ClaimConnection>,
    epoch: Option<Epoch>,
}

/// One claim connection, with the heartbeat that keeps its transactions from timing out while
/// the worker runs. Dropping it stops the heartbeat and closes the connection, which ends its
/// transaction on the server.
struct ClaimConnection {
    client: Arc<Client>,
    driver: Driver,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
    /// The claim, prepared once per connection: a query given as text is prepared again at each
    /// use, a round trip more per claim.
    claim: Statement,
}

impl ClaimConnection {
    /// Why the connection closed, as its driver saw it (a terminated backend, a claim timeout).
    fn closed_reason(&mut self) -> String {
        match (&mut self.driver).now_or_never() {
            Some(Ok(Err(error))) => {
                if error.code() == Some(&SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT) {
                    "the server ended it after the claim timeout without a word from this \
                     worker: was the process frozen?"
                        .to_owned()
                } else {
                    describe(&error)
                }
            }
            _ => "connection closed".to_owned(),
        }
    }
}

impl Drop for ClaimConnection {
    fn drop(&mut self) {
        if let Some(heartbeat) = &self.heartbeat {
            heartbeat.abort();
        }
    }
}

/// Says something on a claim connection every `every`, so its open transaction never sits idle
/// for the claim timeout while this process runs. Ends when the connection is gone or fails.
async fn heartbeat(client: Weak<Client>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; the connection was just used.
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(client) = client.upgrade() else {
            return;
        };
        if client.is_closed() || client.batch_execute("SELECT 1").await.is_err() {
            return;
        }
    }
}

/// The worker's claims on the outbox: a few connections, each carrying at most one epoch.
pub struct Outbox {
    target: PgTarget,
    slots: Vec<Slot>,
    next_epoch: u64,
    /// How long the current epochs take claims ([`Outbox::pace_to_pass`]).
    open_for: Duration,
    /// The epoch that last took a claim after its first. That claim skipped rows below the
    /// epoch's highest id that committed late; see [`Outbox::recheck_due_at`].
    continued: Option<u64>,
    /// Longest a claim connection may say nothing inside a transaction before the server ends it
    /// (`idle_in_transaction_session_timeout`); zero: no bound.
    claim_timeout: Duration,
}

/// The result of acknowledging a window.
#[derive(Debug, Default)]
pub struct Acked {
    /// The epoch had failed (its connection dropped): its rows went back to the outbox.
    pub lost_claim: bool,
}

impl Outbox {
    pub fn new(target: PgTarget) -> Outbox {
        Outbox {
            target,
            slots: (0..EPOCH_CONNECTIONS).map(|_| Slot::default()).collect(),
            next_epoch: 1,
            open_for: EPOCH_OPEN_FOR,
            continued: None,
            claim_timeout: DEFAULT_CLAIM_TIMEOUT,
        }
    }

    /// Bounds how long a frozen worker keeps its claims (`--claim-timeout`; zero: no bound). It
    /// applies to connections opened from now on.
    pub fn with_claim_timeout(mut self, claim_timeout: Duration) -> Outbox {
        self.claim_timeout = claim_timeout;
        self
    }

    /// Opens a claim connection: sets the server's idle-in-transaction timeout to the claim
    /// timeout (overriding any role or database default) and starts its heartbeat.
    async fn open_connection(&self) -> Result<ClaimConnection, OutboxError> {
        let (client, driver) = self.target.connect(None).await?;
        // Whole milliseconds, as Postgres takes them; 0 turns the timeout off, so a timeout under
        // a millisecond is rounded up rather than to "no bound".
        let millis = match self.claim_timeout.is_zero() {
            true => 0,
            false => self.claim_timeout.as_millis().max(1),
        };
        answered(client.batch_execute(&format!(
            "SET idle_in_transaction_session_timeout = {millis}"
        )))
        .await?;
        let claim = answered(client.prepare(&claim_sql())).await?;
        let client = Arc::new(client);
        let heartbeat = (!self.claim_timeout.is_zero()).then(|| {
            tokio::spawn(heartbeat(
                Arc::downgrade(&client),
                (self.claim_timeout / HEARTBEATS_PER_CLAIM_TIMEOUT).max(HEARTBEAT_AT_MOST_EVERY),
            ))
        });
        Ok(ClaimConnection {
            client,
            driver,
            heartbeat,
            claim,
        })
    }

    /// When a claim should look again for rows that committed late with ids below those already
    /// claimed (a writer's transaction that took its id before a concurrent one but committed
    /// after it). The epoch that skipped them holds its connection until its last window is
    /// done, a whole pass or more, and the late row's notification was spent on the claim that
    /// skipped it. Once that epoch stops taking claims, the next claim opens a new epoch, which
    /// reads the outbox from its first row. Without this recheck, the bench's 1,000-change burst
    /// at 1M keys took 2.4 × the reference pass instead of ~1.5 × in two of six full runs, which
    /// fits what one such row costs (the epoch's pass, then a pass of its own); five burst runs
    /// with it took 1.09–1.56 ×.
    pub fn recheck_due_at(&self) -> Option<Instant> {
        let continued = self.continued?;
        let epoch = self
            .slots
            .iter()
            .filter_map(|slot| slot.epoch.as_ref())
            .find(|epoch| epoch.id == continued)?;
        Some(epoch.opened + self.open_for)
    }

    /// Keeps the epochs within the connections as passes get slower.
    ///
    /// An epoch lives about as long as it takes claims plus one pass, so with every epoch open for
    /// `open_for`, `1 + pass / open_for` of them are in flight. Stretching the epochs to
    /// `pass / (N - 2)` keeps that under the connections there are, one to spare. A pass slower
    /// than the last one can still use them all up: claims then go into the newest epoch (see
    /// [`Outbox::claim`]) rather than wait. Each row waits for the last window of its epoch,
    /// so this is as short as the connections allow: `pass / 6` came to 270–300 ms for the
    /// 1.6–1.8 s first passes of the bench's sustained load at 1M keys, `pass / 10` to 160–180 ms.
    pub fn pace_to_pass(&mut self, pass: Duration) {
        let spread = (EPOCH_CONNECTIONS - 2) as u32;
        self.open_for = (pass / spread).clamp(EPOCH_OPEN_FOR, EPOCH_OPEN_AT_MOST);
    }

    /// Sets how long each epoch takes claims, past [`Outbox::pace_to_pass`]'s bounds. For tests
    /// that need each claim in an epoch of its own without waiting out [`EPOCH_OPEN_FOR`].
    #[cfg(feature = "test-hooks")]
    pub fn set_epoch_open_for(&mut self, open_for: Duration) {
        self.open_for = open_for;
    }

    /// Epochs holding claims.
    #[cfg(feature = "test-hooks")]
    pub fn epochs_in_flight(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| slot.epoch.is_some())
            .count()
    }

    /// True while `epoch` holds claims (its transaction has not committed or failed).
    pub fn holds(&self, epoch: u64) -> bool {
        self.slot_of(epoch).is_some()
    }

    fn open_slot(&self) -> Option<usize> {
        self.slots.iter().position(|slot| {
            slot.epoch
                .as_ref()
                .is_some_and(|epoch| epoch.opened.elapsed() < self.open_for)
        })
    }

    /// The slot of the epoch opened last (with every slot holding one).
    fn newest_slot(&self) -> usize {
        (0..self.slots.len())
            .max_by_key(|&index| self.slots[index].epoch.as_ref().map(|epoch| epoch.opened))
            .unwrap_or(0)
    }

    fn slot_of(&self, epoch: u64) -> Option<usize> {
        self.slots.iter().position(|slot| {
            slot.epoch
                .as_ref()
                .is_some_and(|current| current.id == epoch)
        })
    }

    async fn client(&mut self, index: usize) -> Result<&Client, OutboxError> {
        Ok(&self.connection(index).await?.client)
    }

    /// The slot's connection, opened if it has none; an error when it closed under an epoch.
    async fn connection(&mut self, index: usize) -> Result<&ClaimConnection, OutboxError> {
        let slot = &mut self.slots[index];
        let alive = slot
            .connection
            .as_ref()
            .is_some_and(|connection| !connection.client.is_closed());
        if !alive {
            // A transaction dies with its connection. Reconnecting under the epoch would run its
            // later claims and deletes outside any transaction, holding no locks.
            if let Some(epoch) = slot.epoch.take() {
                let reason = slot
                    .connection
                    .take()
                    .map_or_else(|| "connection closed".to_owned(), |mut c| c.closed_reason());
                return Err(OutboxError::ClaimLost {
                    epoch: epoch.id,
                    reason,
                });
            }
            let connection = self.open_connection().await?;
            self.slots[index].connection = Some(connection);
        }
        match &self.slots[index].connection {
            Some(connection) => Ok(connection),
            None => unreachable!("connected just above"),
        }
    }

    /// The slot the next claim goes into: the epoch open for claims, else a new epoch on a free
    /// connection, else the newest epoch.
    async fn claiming_slot(&mut self) -> Result<usize, OutboxError> {
        let free = self.slots.iter().position(|slot| slot.epoch.is_none());
        match (self.open_slot(), free) {
            (Some(index), _) => {
                self.continued = self.slots[index].epoch.as_ref().map(|epoch| epoch.id);
                Ok(index)
            }
            (None, Some(index)) => {
                // A new epoch reads from the outbox's first row: nothing committed so far is
                // skipped.
                self.continued = None;
                self.open_epoch(index).await?;
                Ok(index)
            }
            (None, None) => {
                // No epoch can open before one commits (which claims again anyway): a recheck now
                // would only land in this same epoch.
                self.continued = None;
                Ok(self.newest_slot())
            }
        }
    }

    /// Begins a new epoch's transaction on slot `index`. Not sent along with the first claim:
    /// should the `BEGIN` fail and the claim not, the claim's `DELETE` would commit on its own,
    /// before Redis confirmed anything.
    async fn open_epoch(&mut self, index: usize) -> Result<(), OutboxError> {
        let id = self.next_epoch;
        self.next_epoch += 1;
        let result = async {
            answered(self.client(index).await?.batch_execute("BEGIN")).await?;
            Ok::<_, OutboxError>(())
        }
        .await;
        if let Err(error) = result {
            self.slots[index].connection = None;
            return Err(error);
        }
        self.slots[index].epoch = Some(Epoch {
            id,
            opened: Instant::now(),
            last_id: 0,
            windows_outstanding: 0,
        });
        Ok(())
    }

    /// Claims up to `limit` pending rows, oldest first, into the epoch open for claims, else into
    /// a new one, else (every connection holds an epoch) into the newest: claims never wait for
    /// a pass to end, and that epoch's rows wait for this window too.
    pub async fn claim(&mut self, limit: i64) -> Result<Claim, OutboxError> {
        let index = self.claiming_slot().await?;
        let last_id = self.slots[index].epoch.as_ref().map_or(0, |e| e.last_id);
        let result = async {
            let connection = self.connection(index).await?;
            let rows = answered(
                connection
                    .client
                    .query(&connection.claim, &[&last_id, &limit]),
            )
            .await?;
            Ok::<_, OutboxError>(rows)
        }
        .await;
        let fetched = match result {
            Ok(rows) => rows,
            Err(error) => {
                self.fail_slot(index);
                return Err(error);
            }
        };
        let rows: Vec<OutboxRow> = fetched
            .iter()
            .map(|row| OutboxRow {
                id: row.get(0),
                table_name: row.get(1),
                op: row.get(2),
                rows: row.get(3),
                created_micros: row.get(4),
                age_at_claim: row.get(5),
            })
            .collect();
        let Some(epoch) = self.slots[index].epoch.as_mut() else {
            unreachable!("the slot's epoch was set above")
        };
        let epoch_id = epoch.id;
        if let Some(last) = rows.last() {
            epoch.last_id = last.id;
            epoch.windows_outstanding += 1;
        } else if epoch.windows_outstanding == 0 {
            // Nothing claimed and nothing in flight: end the transaction so it holds no snapshot.
            self.finish_epoch(index).await?;
        }
        Ok(Claim {
            epoch: epoch_id,
            full: rows.len() as i64 >= limit,
            rows,
        })
    }

    /// Acknowledges a finished window (its keys are confirmed gone): its unusable rows become
    /// dead letters, in the window's epoch. Its rows were deleted by their claim; the epoch
    /// commits, and they leave the outbox, once all its windows are done.
    pub async fn ack(&mut self, epoch: u64, dead: &[DeadLetter]) -> Result<Acked, OutboxError> {
        let Some(index) = self.slot_of(epoch) else {
            return Ok(Acked { lost_claim: true });
        };
        let result = async {
            // A connection known to be closed lost the epoch: said now, not at its commit.
            let client = self.client(index).await?;
            if !dead.is_empty() {
                insert_dead_letters(client, dead).await?;
            }
            Ok::<_, OutboxError>(())
        }
        .await;
        match result {
            Ok(()) => {}
            Err(OutboxError::ClaimLost { .. }) => return Ok(Acked { lost_claim: true }),
            Err(error) => {
                self.fail_slot(index);
                return Err(error);
            }
        }
        let Some(state) = self.slots[index].epoch.as_mut() else {
            unreachable!("slot_of found the epoch")
        };
        state.windows_outstanding = state.windows_outstanding.saturating_sub(1);
        if state.windows_outstanding == 0 {
            self.finish_epoch(index).await?;
        }
        Ok(Acked { lost_claim: false })
    }

    async fn finish_epoch(&mut self, index: usize) -> Result<(), OutboxError> {
        let result = async {
            let client = self.client(index).await?;
            Ok::<_, OutboxError>(answered(client.batch_execute("COMMIT")).await?)
        }
        .await;
        self.slots[index].epoch = None;
        if let Err(error) = result {
            self.slots[index].connection = None;
            return Err(error);
        }
        Ok(())
    }

    fn fail_slot(&mut self, index: usize) {
        // Dropping the connection ends its transaction on the server: the rows go back.
        self.slots[index].connection = None;
        self.slots[index].epoch = None;
    }

    /// Gives every claimed row back to the outbox (Redis failed, or shutdown with work undone).
    pub async fn release_all(&mut self) {
        for index in 0..self.slots.len() {
            if self.slots[index].epoch.take().is_some() {
                let rolled_back = match &self.slots[index].connection {
                    Some(connection) => answered(connection.client.batch_execute("ROLLBACK"))
                        .await
                        .is_ok(),
                    None => true,
                };
                if !rolled_back {
                    self.slots[index].connection = None;
                }
            }
        }
    }
}

/// The claim: up to `$2` pending rows with ids above `$1`, oldest first, deleted at once inside
/// the epoch. They leave the outbox only if it commits (after Redis confirmed their keys gone);
/// until then other sessions still see them while their claims skip them (locked). One statement
/// per window instead of a lock now and a `DELETE` by id later: a backlog's drain spent a round
/// trip and a second index lookup per row on the latter. The locked rows are deleted by their
/// `ctid` (a TID scan), not looked up by id again.
fn claim_sql() -> String {
    format!(
        "WITH claimed AS (DELETE FROM {SCHEMA}.outbox WHERE ctid = ANY(ARRAY(\
             SELECT ctid FROM {SCHEMA}.outbox WHERE id > $1 \
             ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)) \
         RETURNING id, created_at, table_name, op, rows) \
         SELECT id, table_name, op, rows, \
             (extract(epoch FROM created_at) * 1000000)::bigint, \
             extract(epoch FROM clock_timestamp() - created_at)::float8 \
         FROM claimed ORDER BY id"
    )
}

/// Writes `dead` to the dead letters from what their claim read (their outbox rows are deleted
/// in this same transaction).
async fn insert_dead_letters(client: &Client, dead: &[DeadLetter]) -> Result<(), OutboxError> {
    let ids: Vec<i64> = dead.iter().map(|letter| letter.row.id).collect();
    let created: Vec<i64> = dead
        .iter()
        .map(|letter| letter.row.created_micros)
        .collect();
    let tables: Vec<&str> = dead
        .iter()
        .map(|letter| letter.row.table_name.as_str())
        .collect();
    let ops: Vec<&str> = dead.iter().map(|letter| letter.row.op.as_str()).collect();
    let rows: Vec<Option<&Value>> = dead.iter().map(|letter| letter.row.rows.as_ref()).collect();
    let errors: Vec<&str> = dead.iter().map(|letter| letter.error.as_str()).collect();
    answered(client.execute(
        &format!(
            "INSERT INTO {SCHEMA}.dead_letters (outbox_id, created_at, table_name, op, rows, error) \
             SELECT d.id, 'epoch'::timestamptz + d.created * interval '1 microsecond', \
                 d.table_name, d.op, d.rows, d.error \
             FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::jsonb[], \
                 $6::text[]) AS d(id, created, table_name, op, rows, error)"
        ),
        &[&ids, &created, &tables, &ops, &rows, &errors],
    ))
    .await?;
    Ok(())
}

/// What waits in the outbox.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Backlog {
    pub rows: i64,
    pub oldest_age_seconds: f64,
    pub dead_letters: i64,
}

pub async fn backlog(client: &Client) -> Result<Backlog, tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {SCHEMA}.outbox), \
                 coalesce((SELECT extract(epoch FROM clock_timestamp() - min(created_at))::float8 FROM {SCHEMA}.outbox), 0), \
                 (SELECT count(*) FROM {SCHEMA}.dead_letters)"
            ),
            &[],
        )
        .await?;
    Ok(Backlog {
        rows: row.get(0),
        oldest_age_seconds: row.get(1),
        dead_letters: row.get(2),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_stay_open_longer_when_passes_are_slow() {
        let target = PgTarget::parse("postgres://127.0.0.1/unused").expect("a valid URL");
        let mut outbox = Outbox::new(target);
        assert_eq!(outbox.open_for, EPOCH_OPEN_FOR);
        // Fast passes: the epochs fit in the connections as they are.
        outbox.pace_to_pass(Duration::from_millis(800));
        assert_eq!(outbox.open_for, EPOCH_OPEN_FOR);
        // A 3 s pass: `1 + pass / open_for` epochs leave a connection spare.
        let pass = Duration::from_secs(3);
        outbox.pace_to_pass(pass);
        let in_flight = 1.0 + pass.as_secs_f64() / outbox.open_for.as_secs_f64();
        assert!(in_flight < EPOCH_CONNECTIONS as f64, "{in_flight} epochs");
        // Never longer than the cap, and back to the floor when passes speed up again.
        outbox.pace_to_pass(Duration::from_secs(60));
        assert_eq!(outbox.open_for, EPOCH_OPEN_AT_MOST);
        outbox.pace_to_pass(Duration::from_millis(300));
        assert_eq!(outbox.open_for, EPOCH_OPEN_FOR);
    }
}
