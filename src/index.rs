//! Index mode: an in-memory index of the cache keys the rules can name, kept equal to what Redis
//! holds by Redis' own announcements, so a change's keys are looked up instead of swept for.
//!
//! Each primary gets a tracking connection ([`tracking`]) in client-side caching's
//! broadcasting mode (`CLIENT TRACKING on BCAST PREFIX …`, RESP3): Redis announces the name of
//! every key written, deleted or expired under the rules' literal prefixes. The index of a node
//! is seeded by one `SCAN`, begun after tracking is on, and then follows the announcements:
//!
//! - An announced key is **inserted at once**, whatever the write was, and its existence is
//!   checked later (`EXISTS`, in batches, on the tracking connection). Only a check that found the
//!   key gone removes it, and only if no announcement of that key arrived since the check was
//!   sent. So the index may briefly hold a key Redis no longer has (an `UNLINK` of it is a
//!   no-op), but never lacks one Redis has.
//! - Outside a cluster one `EXISTS` names a group of announced keys ([`EXISTS_GROUP`]): an answer
//!   of 0 says each of them is gone, as a single `EXISTS` of each would; any other answer cannot
//!   say which one exists, so each key of the group is checked again on its own (and only ever
//!   on its own until it is announced again). A cluster refuses a multi-key command across hash
//!   slots: there every key has an `EXISTS` of its own.
//! - Redis announces a key at most once per pass of its event loop however many writes it saw
//!   there, so one announcement may stand for the daemon's `UNLINK` and an app's refill of the
//!   key. Only a check tells.
//! - The daemon deletes a window's keys on the tracking connection itself, which is in `NOLOOP`
//!   mode: Redis leaves a key out of its announcement to that connection only when that
//!   connection wrote it last in the pass. So the delete's reply is the key's check (gone), and
//!   any later write by another client, in the same pass or after, is announced as usual
//!   ([`NodeIndex::deleting`]). Where the node's replicas must confirm the deletes, they go on
//!   the node's own connection instead (a `WAIT` counts the writes of its connection, and blocks
//!   it), and are announced and checked as any write.
//! - The node's contents can be replaced without an announcement (`SWAPDB`). Each seed writes a
//!   random token to a marker key of its own in the tracked database; the barrier reads it, and so
//!   does every check and seed pipeline, in the same `MULTI`/`EXEC`. Another value there and the
//!   part is dropped and seeded again, windows being swept meanwhile ([`tracking`]).
//! - A lookup waits for a barrier first: a command on each tracking connection (the marker's
//!   `GET`; `PING` in a cluster). Redis queues an announcement before the reply to any command it
//!   reads after the write, and the connection hands announcements to the index as it reads them,
//!   so once the reply is back every key written before the change committed is in the index.
//! - While a node's part is being seeded, or its tracking connection is lost, the index is not
//!   complete and changes are swept instead ([`crate::finder`]).
//!
//! Key names are packed into small sorted byte blocks, each key stored as what it does not share
//! with the key before it ([`store`]); a seed's keys are sorted apart and built into the blocks
//! in one pass when its `SCAN` is done ([`seed`]). Memory is bounded by `--index-max-keys`: past it the index is dropped for good
//! (until the daemon restarts) and the worker sweeps.
//!
//! This module holds the index's parts and their lookups; [`tracking`] the connections that keep
//! them, and [`deletes`] the delete path of a window answered from the index.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use redis::aio::MultiplexedConnection;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::glob::{self, Layout};
use crate::matcher::{Matcher, PatternId};
use crate::telemetry::names;
use crate::window::PatternSpec;

pub(crate) mod deletes;
mod seed;
mod store;
pub mod tracking;

use seed::SeedKeys;
use store::KeyStore;

/// Keys whose existence is checked in one pipeline: a few hundred microseconds of Redis time.
pub const VERIFY_BATCH: usize = 1_000;

/// Announced keys named by one `EXISTS` outside a cluster. Most announced keys are gone when
/// checked (a window's own deletes, each announced back), and a group answering 0 settles all of
/// them in one command and one reply. A group answering more costs one `EXISTS` per key on top,
/// so with a share `p` of keys still there a key costs `1/N + 1 - (1-p)^N` commands: at 40 that
/// stays below the single `EXISTS` up to `p` ≈ 9 % (at 64, 6.5 %), while past a few dozen keys
/// the commands saved no longer matter. 40 also divides the transaction's 200 keys evenly.
/// The refill guard's `UNLINK`s are grouped the same way: each key is gone afterwards, whatever
/// the count answered (which only says how many refills it removed).
pub const EXISTS_GROUP: usize = 40;

/// Locks a mutex, carrying on after a panic elsewhere: the index's state stays consistent between
/// statements, and a worker that stopped clearing keys would be worse than one that goes on.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One primary's part of the index, shared by its tracking task and the lookups.
#[derive(Default)]
pub struct NodeIndex {
    keys: KeyStore,
    /// The running seed's keys, built into `keys` when its `SCAN` is done ([`seed`]). Until
    /// then `keys` holds what the announcements added.
    seed: Option<SeedKeys>,
    /// Announced keys whose existence has not been checked since (in groups outside a cluster).
    to_verify: FxHashSet<Key>,
    /// Keys of a group whose `EXISTS` found one of them, or more: each is checked on its own, so
    /// a key that exists cannot keep its group from ever answering 0.
    to_verify_each: FxHashSet<Key>,
    /// Announced keys under a refill guard: checked by deleting them (an `UNLINK` on the tracking
    /// connection), which also removes a refill. A key is in at most one of these three sets.
    to_unlink: FxHashSet<Key>,
    /// Keys whose check is in flight, and how to check them again if they were announced since it
    /// was sent (then its answer may be stale and is ignored). A key is in here or in a set.
    verifying: FxHashMap<Key, Recheck>,
    /// The seed finished on the current tracking connection, and that connection is alive.
    complete: bool,
    /// The tracking connection is up (announcements are flowing).
    alive: bool,
    /// What last dropped the part other than a lost connection.
    dropped_by: Option<Dropped>,
    /// The random token the current seed wrote to the node's marker key (see
    /// [`tracking`]): a different value there means the database was replaced since.
    token: Option<Arc<str>>,
    /// The tracking connection, for barriers.
    connection: Option<MultiplexedConnection>,
    /// Counts what changed the part other than its own deletes' bookings: announcements, check
    /// answers, resets. Deletes sent while nothing was queued nor in flight are booked at once if
    /// it has not moved since ([`DeleteBooking::Quiet`]).
    events: u64,
}

/// How the keys of deletes sent on the tracking connection are booked when their reply comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteBooking {
    /// Each key was made a check in flight ([`NodeIndex::deleting`]): the reply answers it.
    Checked,
    /// Nothing was queued nor in flight when they were sent (`events` then): if nothing was
    /// announced nor answered since, the reply removes the keys at once, with no check in flight
    /// per key (a backlog's drain deletes hundreds of thousands). A later write by anyone else is
    /// announced after the reply and checked as usual. Otherwise each key is checked again:
    /// an answer applied meanwhile may have come after the delete and be the newer.
    Quiet { events: u64 },
}

/// A key queued for a check or in flight. Shared, not copied, between the queue, the checks in
/// flight and the pipeline's list of keys: a batch of checks allocates nothing per key.
pub type Key = Arc<[u8]>;

/// A check in flight whose key was announced again: how to check it once more.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Recheck {
    No,
    Exists,
    /// Announced under a refill guard: deleted, not just checked.
    Unlink,
}

/// Why a part was dropped while its connection stayed up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// A flush announcement (of this database or another: Redis does not say which).
    Flush,
    /// The node's marker key no longer holds the seed's token: the database's contents were
    /// replaced without announcements (`SWAPDB`), or the marker was deleted or evicted.
    Replaced,
}

/// One pipeline's checks of announced keys.
#[derive(Default)]
pub struct Checks {
    /// Keys that may share an `EXISTS` ([`EXISTS_GROUP`] at a time, outside a cluster).
    pub exists: Vec<Key>,
    /// Keys whose group found a key: an `EXISTS` each.
    pub exists_each: Vec<Key>,
    /// Keys announced under a refill guard: an `UNLINK` each, or one per [`EXISTS_GROUP`] keys
    /// outside a cluster (every key is gone afterwards, whatever it answers).
    pub unlink: Vec<Key>,
}

impl Checks {
    pub fn is_empty(&self) -> bool {
        self.exists.is_empty() && self.exists_each.is_empty() && self.unlink.is_empty()
    }
}

impl NodeIndex {
    /// Keys held (while seeding, counting each key the `SCAN` returned so far, repeats too).
    pub fn len(&self) -> usize {
        self.keys.len() + self.seed.as_ref().map_or(0, SeedKeys::given)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_complete(&self) -> bool {
        self.complete && self.alive
    }

    pub fn is_alive(&self) -> bool {
        self.alive
    }

    fn insert(&mut self, key: &[u8], total: &AtomicUsize) {
        if self.keys.insert(key) {
            total.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn remove(&mut self, key: &[u8], total: &AtomicUsize) {
        if let Some(seed) = &mut self.seed {
            seed.removed(key);
        }
        if self.keys.remove(key) {
            total.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Forgets every key (a new seed, a lost connection, a dropped index).
    pub fn clear(&mut self, total: &AtomicUsize) {
        self.events += 1;
        total.fetch_sub(self.len(), Ordering::Relaxed);
        self.keys = KeyStore::default();
        self.seed = None;
        self.to_verify = FxHashSet::default();
        self.to_verify_each = FxHashSet::default();
        self.to_unlink = FxHashSet::default();
        self.verifying = FxHashMap::default();
        self.complete = false;
        self.token = None;
    }

    /// Keys Redis announced (written, deleted or expired: it does not say which, nor how many
    /// writes one announcement stands for — Redis coalesces a key's writes within one pass of its
    /// event loop, the daemon's own `UNLINK` and an app's refill among them). So every
    /// announcement is followed by a check, whoever wrote the key, and the key leaves the index
    /// only when the check says it is gone.
    pub fn announced(&mut self, key: &[u8], shared: &Shared) {
        if !self.alive {
            return;
        }
        self.events += 1;
        self.insert(key, &shared.total_keys);
        let guarded = lock(&shared.guards).covers(key);
        self.check_later(key, guarded);
    }

    /// Queues a check of `key` (an `UNLINK` when `guarded`), or marks the one in flight stale.
    fn check_later(&mut self, key: &[u8], guarded: bool) {
        let wanted = match guarded {
            true => Recheck::Unlink,
            false => Recheck::Exists,
        };
        if let Some(recheck) = self.verifying.get_mut(key) {
            *recheck = (*recheck).max(wanted);
        } else if guarded {
            // In one of the two at most.
            if !self.to_verify.remove(key) {
                self.to_verify_each.remove(key);
            }
            if !self.to_unlink.contains(key) {
                self.to_unlink.insert(key.into());
            }
        } else if !self.to_unlink.contains(key)
            // An empty set (as these two mostly are) answers without hashing the key.
            && !self.to_verify_each.contains(key)
            && !self.to_verify.contains(key)
        {
            self.to_verify.insert(key.into());
        }
    }

    /// Queues a check of `key`, which is in no set nor in flight, as `recheck` asks (the answer
    /// in flight was stale, or could not tell): its `Arc` is reused.
    fn requeue(&mut self, key: Key, recheck: Recheck) {
        match recheck {
            Recheck::No => {}
            Recheck::Exists => {
                self.to_verify.insert(key);
            }
            Recheck::Unlink => {
                self.to_unlink.insert(key);
            }
        }
    }

    /// Redis flushed a database (an announcement without key names). It does not say which: a
    /// `FLUSHDB` of another database is announced the same way, while this one keeps its keys.
    /// So the part is dropped as if the connection were lost, and seeded again.
    pub fn flushed(&mut self, shared: &Shared) {
        self.tracking_lost(&shared.total_keys);
        self.dropped_by = Some(Dropped::Flush);
    }

    /// The marker no longer holds the seed's token: the part describes another database's
    /// contents. Dropped, to be seeded again.
    pub fn replaced(&mut self, shared: &Shared) {
        self.tracking_lost(&shared.total_keys);
        self.dropped_by = Some(Dropped::Replaced);
    }

    /// What dropped the part while its connection stayed up, if anything.
    pub fn dropped_by(&self) -> Option<Dropped> {
        self.dropped_by
    }

    /// A key the seed's `SCAN` returned: it existed when the `SCAN` ran. Kept aside until the
    /// seed is finished (counted meanwhile, so the memory bound holds during a seed).
    pub fn seeded(&mut self, key: &[u8], total: &AtomicUsize) {
        if !self.alive {
            return;
        }
        self.seed.get_or_insert_with(SeedKeys::default).push(key);
        total.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes up to [`VERIFY_BATCH`] announced keys to check, those to delete first (a refill is
    /// removed as soon as it is announced), then those to check one by one, marking them in
    /// flight.
    pub fn take_checks(&mut self) -> Checks {
        let mut room = VERIFY_BATCH;
        let unlink = take_some(&mut self.to_unlink, &mut room, &mut self.verifying);
        let exists_each = take_some(&mut self.to_verify_each, &mut room, &mut self.verifying);
        let exists = take_some(&mut self.to_verify, &mut room, &mut self.verifying);
        Checks {
            exists,
            exists_each,
            unlink,
        }
    }

    /// The answer to a check sent with [`NodeIndex::take_checks`] (for an `UNLINK`: gone).
    pub fn verified(&mut self, key: &[u8], exists: bool, total: &AtomicUsize) {
        self.events += 1;
        match self.verifying.remove_entry(key) {
            // Forgotten since (the part was cleared): the answer is about a past state.
            None => {}
            // Announced again while the check was in flight: its answer may be stale.
            Some((key, recheck @ (Recheck::Exists | Recheck::Unlink))) => {
                self.requeue(key, recheck)
            }
            Some((_, Recheck::No)) if exists => self.insert(key, total),
            Some((_, Recheck::No)) => self.remove(key, total),
        }
    }

    /// The answer to one `EXISTS` naming every key of `group` (`None`: unreadable). 0 says each
    /// is gone; more cannot say which exists, so each is checked again on its own (an unreadable
    /// answer too), never taken for gone. A group of one is a single key's `EXISTS`.
    pub fn group_verified(&mut self, group: &[Key], count: Option<i64>, total: &AtomicUsize) {
        self.events += 1;
        if let [key] = group {
            // Unreadable: keep the key (a stale entry costs an UNLINK, a missing one a stale page).
            self.verified(key, count != Some(0), total);
            return;
        }
        if count == Some(0) {
            for key in group {
                self.verified(key, false, total);
            }
            return;
        }
        for key in group {
            match self.verifying.remove_entry(&**key) {
                None => {}
                Some((key, Recheck::Unlink)) => self.requeue(key, Recheck::Unlink),
                // Announced again meanwhile or not, the key is checked again: on its own, so it
                // cannot come back to a group that its own existence keeps from answering 0.
                Some((key, Recheck::No | Recheck::Exists)) => {
                    self.to_verify_each.insert(key);
                }
            }
        }
    }

    /// The worker is about to delete `key` on this part's tracking connection, which announces
    /// none of its own writes (`NOLOOP`): the delete's reply is then the key's check, booked as
    /// [`NodeIndex::verified`] (gone). Redis announces a write of anyone else that comes after
    /// the delete, even in the same pass of its event loop: it leaves a key out of an
    /// announcement only when this connection wrote it last. A key whose check is already in
    /// flight is treated as announced again: whichever of the two replies is booked first, the key
    /// is checked once more.
    pub fn deleting(&mut self, key: &[u8]) {
        if let Some(recheck) = self.verifying.get_mut(key) {
            *recheck = (*recheck).max(Recheck::Exists);
            return;
        }
        // Out of its queue, if it waits in one (in one at most): the delete checks it.
        let queued = [
            &mut self.to_verify,
            &mut self.to_verify_each,
            &mut self.to_unlink,
        ]
        .into_iter()
        .filter(|queue| !queue.is_empty())
        .find_map(|queue| queue.take(key));
        self.verifying
            .insert(queued.unwrap_or_else(|| key.into()), Recheck::No);
    }

    /// The check of `key` in flight will not be answered (its request failed or was dropped): it
    /// is checked again.
    pub fn check_again(&mut self, key: &[u8]) {
        self.events += 1;
        if let Some((key, recheck)) = self.verifying.remove_entry(key) {
            self.requeue(key, recheck.max(Recheck::Exists));
        }
    }

    /// The worker is about to delete `keys` on this part's tracking connection: how their reply
    /// is to be booked ([`DeleteBooking`]).
    pub fn deleting_all<'k>(&mut self, keys: impl Iterator<Item = &'k [u8]>) -> DeleteBooking {
        let quiet = self.verifying.is_empty()
            && self.to_verify.is_empty()
            && self.to_verify_each.is_empty()
            && self.to_unlink.is_empty();
        if quiet {
            return DeleteBooking::Quiet {
                events: self.events,
            };
        }
        for key in keys {
            self.deleting(key);
        }
        DeleteBooking::Checked
    }

    /// The deletes of `keys` came back: each key was gone when Redis ran them.
    pub fn deleted_all<'k>(
        &mut self,
        keys: impl Iterator<Item = &'k [u8]>,
        booking: DeleteBooking,
        total: &AtomicUsize,
    ) {
        match booking {
            DeleteBooking::Checked => {
                for key in keys {
                    self.verified(key, false, total);
                }
            }
            DeleteBooking::Quiet { events } if events == self.events => {
                for key in keys {
                    self.remove(key, total);
                }
            }
            DeleteBooking::Quiet { .. } => {
                for key in keys {
                    self.check_later(key, false);
                }
            }
        }
    }

    /// The deletes of `keys` failed or will never be booked: their keys are checked again.
    pub fn unanswered_all<'k>(
        &mut self,
        keys: impl Iterator<Item = &'k [u8]>,
        booking: DeleteBooking,
    ) {
        for key in keys {
            match booking {
                DeleteBooking::Checked => self.check_again(key),
                DeleteBooking::Quiet { .. } => self.check_later(key, false),
            }
        }
    }

    /// A check failed to come back (the connection broke): its keys are checked again later.
    pub fn verification_lost(&mut self) {
        self.events += 1;
        for (key, _) in std::mem::take(&mut self.verifying) {
            self.check_later(&key, false);
        }
    }

    pub fn has_guard_unlinks(&self) -> bool {
        !self.to_unlink.is_empty()
    }

    /// The tracking connection is up on a fresh seed: announcements count from now on.
    pub fn tracking_started(&mut self, connection: MultiplexedConnection, total: &AtomicUsize) {
        self.clear(total);
        self.alive = true;
        self.dropped_by = None;
        self.connection = Some(connection);
    }

    /// The tracking connection is gone: announcements may have been lost.
    pub fn tracking_lost(&mut self, total: &AtomicUsize) {
        self.clear(total);
        self.alive = false;
        self.connection = None;
    }

    /// The seed now running wrote `token` to the node's marker key.
    pub fn seeding_with(&mut self, token: Arc<str>) {
        self.token = Some(token);
    }

    /// The token the current seed wrote to the marker (none before it did, or without a marker).
    pub fn token(&self) -> Option<Arc<str>> {
        self.token.clone()
    }

    /// The seed's `SCAN` is done: its keys join the store, and the part is complete.
    pub fn seed_finished(&mut self, total: &AtomicUsize) {
        self.events += 1;
        if !self.alive {
            return;
        }
        if let Some(seed) = self.seed.take() {
            let counted = self.keys.len() + seed.given();
            self.keys = seed.finish(&self.keys);
            total.fetch_sub(counted, Ordering::Relaxed);
            total.fetch_add(self.keys.len(), Ordering::Relaxed);
        }
        self.complete = true;
    }

    pub fn tracking_connection(&self) -> Option<MultiplexedConnection> {
        self.connection.clone()
    }
}

/// Moves up to `room` keys out of `queue` into the returned list and into `verifying` (in flight),
/// taking them from `room`. The whole set when it fits (no key hashed to leave it), else a part
/// extracted in place (no key hashed nor copied to leave it either).
fn take_some(
    queue: &mut FxHashSet<Key>,
    room: &mut usize,
    verifying: &mut FxHashMap<Key, Recheck>,
) -> Vec<Key> {
    let taken: Vec<Key> = if queue.len() <= *room {
        std::mem::take(queue).into_iter().collect()
    } else {
        queue.extract_if(|_| true).take(*room).collect()
    };
    *room -= taken.len();
    verifying.reserve(taken.len());
    for key in &taken {
        verifying.insert(key.clone(), Recheck::No);
    }
    taken
}

/// State shared by every node's part: the memory bound and the refill guard.
pub struct Shared {
    pub max_keys: usize,
    pub total_keys: AtomicUsize,
    /// Set once the bound was passed: the index is gone until the daemon restarts.
    pub over_limit: AtomicBool,
    pub guards: Mutex<Guards>,
    /// Told when a part's state changes (seeded, lost, over the bound).
    pub on_change: Arc<tokio::sync::Notify>,
}

impl Shared {
    pub fn new(max_keys: usize, on_change: Arc<tokio::sync::Notify>) -> Shared {
        Shared {
            max_keys,
            total_keys: AtomicUsize::new(0),
            over_limit: AtomicBool::new(false),
            guards: Mutex::new(Guards::default()),
            on_change,
        }
    }

    /// True when the index holds more keys than allowed.
    pub fn past_the_bound(&self) -> bool {
        self.total_keys.load(Ordering::Relaxed) > self.max_keys
    }
}

/// The refill guard in index mode: patterns a window cleared, each until its guard runs out. A key
/// announced under one of them in that time was written back after its invalidation (a stale
/// refill from a request that read the old row) and is deleted as it is announced.
///
/// A pattern is in the matcher once however many windows cleared it (a backlog of repeated edits,
/// a hot row under load): a window clearing it again only moves its end later, which costs a hash
/// look-up instead of parsing the glob into the matcher and out of it again.
///
/// Patterns wait in a list until an announcement needs the matcher: the announcements of keys
/// written back are what the guard is for, and while none comes (a backlog drained with no
/// traffic, where a tenth of the worker's CPU went into guarding) a guarded pattern only costs
/// its place in the list until it runs out.
#[derive(Default)]
pub struct Guards {
    matcher: Matcher,
    /// Each guarded pattern: its id in the matcher, and when its guard runs out (the latest of the
    /// windows that cleared it).
    active: FxHashMap<Arc<str>, (PatternId, Instant)>,
    /// When each window's guard of a pattern runs out, in the order they were added (the guard
    /// delay is the same for all, so in time order too). A pattern leaves the matcher when its
    /// last one runs out.
    ends: VecDeque<(Instant, Arc<str>)>,
    next_id: PatternId,
    /// Patterns guarded since the matcher was last needed, with their ends, in the order added.
    waiting: VecDeque<(Instant, Arc<str>)>,
}

impl Guards {
    /// Guards `patterns` until `until`.
    pub fn add(&mut self, patterns: &[PatternSpec], until: Instant) {
        // What ran out while waiting never needs the matcher: the list stays within one guard
        // delay's patterns.
        let now = Instant::now();
        while self.waiting.front().is_some_and(|(end, _)| *end <= now) {
            self.waiting.pop_front();
        }
        self.waiting
            .extend(patterns.iter().map(|spec| (until, spec.pattern.clone())));
    }

    /// Whether a guarded pattern matches `key` now (guards that ran out are dropped first).
    pub fn covers(&mut self, key: &[u8]) -> bool {
        let now = Instant::now();
        self.enter_waiting(now);
        self.drop_ended(now);
        !self.matcher.is_empty() && self.matcher.find(key).is_some()
    }

    /// Puts the waiting patterns that still guard at `now` into the matcher.
    fn enter_waiting(&mut self, now: Instant) {
        for (until, pattern) in std::mem::take(&mut self.waiting) {
            if until <= now {
                continue;
            }
            match self.active.get_mut(&pattern) {
                Some((_, end)) => *end = (*end).max(until),
                None => {
                    let id = self.next_id;
                    self.next_id = self.next_id.wrapping_add(1);
                    self.matcher.insert(&pattern, id);
                    self.active.insert(pattern.clone(), (id, until));
                }
            }
            self.ends.push_back((until, pattern));
        }
    }

    /// Drops the patterns whose last guard ended by `now`.
    fn drop_ended(&mut self, now: Instant) {
        while self.ends.front().is_some_and(|(until, _)| *until <= now) {
            let Some((_, pattern)) = self.ends.pop_front() else {
                break;
            };
            if let Some(&(id, end)) = self.active.get(&pattern) {
                if end <= now {
                    self.matcher.remove(&pattern, id);
                    self.active.remove(&pattern);
                }
            }
        }
    }

    /// Every guard ends now (tests of what happens after the guard delay).
    #[cfg(test)]
    fn end_all_now(&mut self) {
        let now = Instant::now();
        for (until, _) in self.waiting.iter_mut() {
            *until = now;
        }
        for (_, end) in self.active.values_mut() {
            *end = now;
        }
        for (until, _) in self.ends.iter_mut() {
            *until = now;
        }
    }
}

/// Keys a lookup found, per node, each with the index of the window's pattern that named it.
pub type Found = Vec<Vec<(Box<[u8]>, usize)>>;

/// Finds the keys of `patterns` in the nodes' parts. `None` when a part is not complete.
pub fn lookup(nodes: &[Arc<Mutex<NodeIndex>>], patterns: &[PatternSpec]) -> Option<Found> {
    // Literal prefix + `*`, or a literal key: a range of the sorted keys. Anything else (a glob
    // before a placeholder, as in a user's `report:*:{U}:*`): one walk over the range of its
    // literal prefix, every such pattern of the window matched in that one walk.
    let mut ranges: Vec<(Vec<u8>, bool, usize)> = Vec::new();
    let mut others = Matcher::default();
    let mut other_prefixes: Vec<Vec<u8>> = Vec::new();
    for (index, spec) in patterns.iter().enumerate() {
        match glob::layout_of(&spec.pattern) {
            Layout::Exact(literal) => ranges.push((literal, false, index)),
            Layout::Prefix(literal) => ranges.push((literal, true, index)),
            Layout::StarThenLiteral { prefix, .. } => {
                others.insert(&spec.pattern, index as PatternId);
                other_prefixes.push(prefix);
            }
            Layout::Other => {
                others.insert(&spec.pattern, index as PatternId);
                other_prefixes.push(glob::literal_prefix_of(&spec.pattern));
            }
        }
    }
    other_prefixes.sort();
    other_prefixes.dedup();
    let mut walk: Vec<Vec<u8>> = Vec::with_capacity(other_prefixes.len());
    for prefix in other_prefixes {
        if !walk.last().is_some_and(|kept| prefix.starts_with(kept)) {
            walk.push(prefix);
        }
    }
    let mut found = Vec::with_capacity(nodes.len());
    for node in nodes {
        let node = lock(node);
        if !node.is_complete() {
            return None;
        }
        let mut keys: Vec<(Box<[u8]>, usize)> = Vec::new();
        for (literal, is_prefix, index) in &ranges {
            if *is_prefix {
                under(&node.keys, literal, |key| keys.push((key.into(), *index)));
            } else if node.keys.contains(literal) {
                keys.push((literal.as_slice().into(), *index));
            }
        }
        for prefix in &walk {
            under(&node.keys, prefix, |key| {
                if let Some(index) = others.find(key) {
                    keys.push((key.into(), index as usize));
                }
            });
        }
        keep_first_of_each(&mut keys);
        found.push(keys);
    }
    Some(found)
}

/// Calls `visit` with the keys of `keys` that start with `prefix`, in order.
fn under(keys: &KeyStore, prefix: &[u8], mut visit: impl FnMut(&[u8])) {
    keys.walk_from(prefix, |key| {
        if !key.starts_with(prefix) {
            return ControlFlow::Break(());
        }
        visit(key);
        ControlFlow::Continue(())
    });
}

/// Drops repeats of a key (two patterns of a window may name it), keeping its first finding.
fn keep_first_of_each(keys: &mut Vec<(Box<[u8]>, usize)>) {
    let keep: Vec<bool> = {
        let mut seen: FxHashSet<&[u8]> = FxHashSet::default();
        keys.iter().map(|(key, _)| seen.insert(key)).collect()
    };
    let mut keep = keep.into_iter();
    keys.retain(|_| keep.next().unwrap_or(true));
}

/// Whether every key `pattern` can match lies under one of the tracked `prefixes`.
pub fn covered(prefixes: &[Vec<u8>], pattern: &str) -> bool {
    let literal = glob::literal_prefix_of(pattern);
    prefixes.iter().any(|prefix| literal.starts_with(prefix))
}

/// Sets the index gauges: keys held over all nodes.
pub fn record_size(shared: &Shared) {
    metrics::gauge!(names::INDEX_KEYS).set(shared.total_keys.load(Ordering::Relaxed) as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(pattern: &str) -> PatternSpec {
        PatternSpec {
            pattern: Arc::from(pattern),
            label: Arc::from("t"),
        }
    }

    fn node(keys: &[&str]) -> Arc<Mutex<NodeIndex>> {
        let total = AtomicUsize::new(0);
        let mut index = NodeIndex {
            alive: true,
            ..NodeIndex::default()
        };
        for key in keys {
            index.seeded(key.as_bytes(), &total);
        }
        index.seed_finished(&total);
        Arc::new(Mutex::new(index))
    }

    fn found(nodes: &[Arc<Mutex<NodeIndex>>], patterns: &[&str]) -> Vec<String> {
        let specs: Vec<PatternSpec> = patterns.iter().map(|p| spec(p)).collect();
        let mut keys: Vec<String> = lookup(nodes, &specs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|(key, _)| String::from_utf8_lossy(&key).into_owned())
            .collect();
        keys.sort();
        keys
    }

    #[test]
    fn prefix_exact_and_glob_patterns_find_exactly_their_keys() {
        let nodes = [node(&[
            ":1:report:12:7:a",
            ":1:report:12:8:b",
            ":1:report:123:7:c",
            ":1:report:5:7:d",
            ":1:reportlist:reports:7:e",
            ":1:studentreport:12:7:f",
            ":1:exact",
        ])];
        assert_eq!(
            found(&nodes, &[":1:report:12:*"]),
            [":1:report:12:7:a", ":1:report:12:8:b"]
        );
        assert_eq!(found(&nodes, &[":1:exact"]), [":1:exact"]);
        assert_eq!(
            found(&nodes, &[":1:report:*:7:*", ":1:reportlist:*:7:*"]),
            [
                ":1:report:123:7:c",
                ":1:report:12:7:a",
                ":1:report:5:7:d",
                ":1:reportlist:reports:7:e"
            ]
        );
        // A key two patterns name is found once.
        assert_eq!(
            found(&nodes, &[":1:report:12:*", ":1:report:*:7:*"]).len(),
            4
        );
    }

    #[test]
    fn an_incomplete_part_answers_nothing() {
        let nodes = [node(&[":1:a"])];
        lock(&nodes[0]).tracking_lost(&AtomicUsize::new(1));
        assert!(lookup(&nodes, &[spec(":1:*")]).is_none());
    }

    #[test]
    fn a_check_answered_after_a_new_announcement_does_not_remove_the_key() {
        let shared = Shared::new(100, Default::default());
        let mut index = NodeIndex {
            alive: true,
            ..NodeIndex::default()
        };
        index.announced(b":1:k", &shared);
        let batch = index.take_checks().exists;
        assert_eq!(batch.len(), 1);
        // Written again while the EXISTS was in flight, whose answer (gone) is then stale.
        index.announced(b":1:k", &shared);
        index.verified(b":1:k", false, &shared.total_keys);
        assert_eq!(index.len(), 1);
        // The next check decides.
        let batch = index.take_checks().exists;
        assert_eq!(batch.len(), 1, "checked again");
        index.verified(b":1:k", false, &shared.total_keys);
        assert_eq!(index.len(), 0);
        assert_eq!(shared.total_keys.load(Ordering::Relaxed), 0);
    }

    fn alive_part(keys: &[&str], shared: &Shared) -> NodeIndex {
        let mut index = NodeIndex {
            alive: true,
            ..NodeIndex::default()
        };
        for key in keys {
            index.seeded(key.as_bytes(), &shared.total_keys);
        }
        index.seed_finished(&shared.total_keys);
        index
    }

    #[test]
    fn a_key_found_gone_during_the_seed_is_not_brought_back_by_its_scan() {
        let shared = Shared::new(100, Default::default());
        let mut index = NodeIndex {
            alive: true,
            ..NodeIndex::default()
        };
        // SCAN returned both; then `:1:a` was deleted (announced, checked: gone) and `:1:b`
        // written again (announced, checked: there).
        index.seeded(b":1:a", &shared.total_keys);
        index.seeded(b":1:b", &shared.total_keys);
        index.announced(b":1:a", &shared);
        index.announced(b":1:b", &shared);
        index.announced(b":1:c", &shared);
        let checks = index.take_checks();
        for key in &checks.exists {
            index.verified(key, &**key != b":1:a", &shared.total_keys);
        }
        assert!(!index.is_complete());
        index.seed_finished(&shared.total_keys);
        assert!(index.is_complete());
        assert!(!index.keys.contains(b":1:a"));
        assert!(index.keys.contains(b":1:b"));
        assert!(index.keys.contains(b":1:c"));
        assert_eq!(index.len(), 2);
        assert_eq!(shared.total_keys.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_deleted_key_announced_once_stays_until_a_check_says_it_is_gone() {
        let shared = Shared::new(100, Default::default());
        let mut index = alive_part(&[":1:a"], &shared);
        // The daemon's UNLINK and an app's refill in one pass of Redis' event loop: one
        // announcement. The key stays in the index until a check answers.
        index.announced(b":1:a", &shared);
        let checks = index.take_checks();
        assert_eq!(checks.exists, vec![Key::from(&b":1:a"[..])]);
        index.verified(b":1:a", true, &shared.total_keys);
        assert!(index.keys.contains(b":1:a"), "the refill is indexed");
        index.announced(b":1:a", &shared);
        let checks = index.take_checks();
        index.verified(&checks.exists[0], false, &shared.total_keys);
        assert!(index.is_empty());
        assert_eq!(shared.total_keys.load(Ordering::Relaxed), 0);
    }

    /// A live part holding `count` keys (`:1:k0`, `:1:k1`, …), each announced once: their
    /// checks are queued.
    #[test]
    fn a_key_deleted_on_the_tracking_connection_leaves_with_the_reply_unless_written_since() {
        let shared = Shared::new(100, Default::default());
        let mut index = alive_part(&[":1:a", ":1:b"], &shared);
        // Nothing comes back for the worker's own deletes (NOLOOP): the reply removes the keys.
        index.deleting(b":1:a");
        index.deleting(b":1:b");
        // Another client wrote `b` after the delete: announced, the reply cannot remove it.
        index.announced(b":1:b", &shared);
        index.verified(b":1:a", false, &shared.total_keys);
        index.verified(b":1:b", false, &shared.total_keys);
        assert!(!index.keys.contains(b":1:a"));
        assert!(
            index.keys.contains(b":1:b"),
            "the write after the delete is indexed"
        );
        let checks = index.take_checks();
        assert_eq!(checks.exists, vec![Key::from(&b":1:b"[..])], "and checked");
        assert_eq!(shared.total_keys.load(Ordering::Relaxed), 1);
    }

    fn keys_of<'k>(keys: &'k [&'k str]) -> impl Iterator<Item = &'k [u8]> + 'k {
        keys.iter().map(|key| key.as_bytes())
    }

    #[test]
    fn deletes_sent_on_a_quiet_part_leave_with_their_reply_without_a_check_each() {
        let shared = Shared::new(100, Default::default());
        let mut index = alive_part(&[":1:a", ":1:b", ":1:c"], &shared);
        let booking = index.deleting_all(keys_of(&[":1:a", ":1:b"]));
        assert!(matches!(booking, DeleteBooking::Quiet { .. }));
        assert!(index.verifying.is_empty(), "no check in flight per key");
        index.deleted_all(keys_of(&[":1:a", ":1:b"]), booking, &shared.total_keys);
        assert!(!index.keys.contains(b":1:a") && !index.keys.contains(b":1:b"));
        assert!(index.keys.contains(b":1:c"));
        assert_eq!(shared.total_keys.load(Ordering::Relaxed), 1);
        let checks = index.take_checks();
        assert!(checks.exists.is_empty() && checks.unlink.is_empty());
    }

    #[test]
    fn quiet_deletes_whose_part_heard_of_anything_meanwhile_leave_their_keys_to_checks() {
        let shared = Shared::new(100, Default::default());
        let mut index = alive_part(&[":1:a", ":1:b"], &shared);
        let booking = index.deleting_all(keys_of(&[":1:a", ":1:b"]));
        // Another client wrote `b` after the delete, and its check was answered before the
        // delete's reply was booked: that answer is the newer, the reply may not undo it.
        index.announced(b":1:b", &shared);
        let check = index.take_checks();
        assert_eq!(check.exists, vec![Key::from(&b":1:b"[..])]);
        index.verified(b":1:b", true, &shared.total_keys);
        index.deleted_all(keys_of(&[":1:a", ":1:b"]), booking, &shared.total_keys);
        assert!(
            index.keys.contains(b":1:a") && index.keys.contains(b":1:b"),
            "nothing removed on the reply's word"
        );
        let mut again = index.take_checks().exists;
        again.sort();
        assert_eq!(
            again,
            vec![Key::from(&b":1:a"[..]), Key::from(&b":1:b"[..])],
            "each key is checked instead"
        );
    }

    #[test]
    fn deletes_sent_while_a_check_is_queued_or_in_flight_are_each_checked_by_their_reply() {
        let shared = Shared::new(100, Default::default());
        let mut index = alive_part(&[":1:a", ":1:b"], &shared);
        index.announced(b":1:b", &shared);
        let booking = index.deleting_all(keys_of(&[":1:a"]));
        assert_eq!(booking, DeleteBooking::Checked);
        assert!(index.verifying.contains_key(&b":1:a"[..]));
        index.deleted_all(keys_of(&[":1:a"]), booking, &shared.total_keys);
        assert!(!index.keys.contains(b":1:a"));
    }

    #[test]
    fn quiet_deletes_never_answered_leave_their_keys_to_checks() {
        let shared = Shared::new(100, Default::default());
        let mut index = alive_part(&[":1:a"], &shared);
        let booking = index.deleting_all(keys_of(&[":1:a"]));
        index.unanswered_all(keys_of(&[":1:a"]), booking);
        assert!(index.keys.contains(b":1:a"));
        assert_eq!(index.take_checks().exists, vec![Key::from(&b":1:a"[..])]);
    }

    #[test]
    fn a_delete_of_a_key_whose_check_is_in_flight_leads_to_another_check() {
        let shared = Shared::new(100, Default::default());
        let mut index = alive_part(&[":1:a", ":1:b"], &shared);
        index.announced(b":1:a", &shared);
        index.announced(b":1:b", &shared);
        let first = index.take_checks();
        assert_eq!(first.exists.len(), 2);
        index.deleting(b":1:a");
        index.deleting(b":1:b");
        // `a`: the check sent before the delete answers first (it existed then). `b`: the delete's
        // reply is booked first. Either way the key is checked again, not taken as settled.
        index.verified(b":1:a", true, &shared.total_keys);
        index.verified(b":1:b", false, &shared.total_keys);
        index.verified(b":1:a", false, &shared.total_keys);
        index.verified(b":1:b", true, &shared.total_keys);
        assert!(index.keys.contains(b":1:a") && index.keys.contains(b":1:b"));
        let mut again = index.take_checks().exists;
        again.sort();
        assert_eq!(
            again,
            vec![Key::from(&b":1:a"[..]), Key::from(&b":1:b"[..])]
        );
    }

    #[test]
    fn a_delete_that_is_never_answered_leaves_its_key_to_a_check() {
        let shared = Shared::new(100, Default::default());
        let mut index = alive_part(&[":1:a"], &shared);
        index.deleting(b":1:a");
        index.check_again(b":1:a");
        assert!(index.keys.contains(b":1:a"));
        assert_eq!(index.take_checks().exists, vec![Key::from(&b":1:a"[..])]);
    }

    fn announced_part(count: usize, shared: &Shared) -> (Vec<String>, NodeIndex) {
        let names: Vec<String> = (0..count).map(|n| format!(":1:k{n}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut index = alive_part(&refs, shared);
        for name in &names {
            index.announced(name.as_bytes(), shared);
        }
        (names, index)
    }

    #[test]
    fn a_group_that_found_a_key_removes_none_and_each_is_checked_on_its_own() {
        let shared = Shared::new(100, Default::default());
        let (names, mut index) = announced_part(5, &shared);
        let checks = index.take_checks();
        assert_eq!(checks.exists.len(), 5);
        assert!(checks.exists_each.is_empty());
        // `:1:k3` was refilled: the group's EXISTS answers 1, which cannot say which key exists.
        index.group_verified(&checks.exists, Some(1), &shared.total_keys);
        assert_eq!(
            index.len(),
            5,
            "a group answering more than 0 removes no key"
        );
        for name in &names {
            assert!(index.keys.contains(name.as_bytes()));
        }
        // Each is checked again on its own, and never in a group again (it would answer 1 again).
        let checks = index.take_checks();
        assert!(checks.exists.is_empty());
        assert_eq!(checks.exists_each.len(), 5);
        for key in &checks.exists_each {
            let count = i64::from(&**key == b":1:k3");
            index.group_verified(std::slice::from_ref(key), Some(count), &shared.total_keys);
        }
        assert_eq!(index.len(), 1);
        assert!(index.keys.contains(b":1:k3"));
        assert_eq!(shared.total_keys.load(Ordering::Relaxed), 1);
        assert!(index.take_checks().is_empty());
    }

    #[test]
    fn an_unreadable_group_answer_removes_none() {
        let shared = Shared::new(100, Default::default());
        let (_, mut index) = announced_part(3, &shared);
        let checks = index.take_checks();
        index.group_verified(&checks.exists, None, &shared.total_keys);
        assert_eq!(index.len(), 3);
        assert_eq!(index.take_checks().exists_each.len(), 3);
    }

    #[test]
    fn a_group_answering_0_removes_each_key_unless_announced_since() {
        let shared = Shared::new(100, Default::default());
        let (_, mut index) = announced_part(4, &shared);
        let checks = index.take_checks();
        // `:1:k1` written again while the group's EXISTS was in flight: its 0 may be stale.
        index.announced(b":1:k1", &shared);
        index.group_verified(&checks.exists, Some(0), &shared.total_keys);
        assert_eq!(index.len(), 1);
        assert!(index.keys.contains(b":1:k1"));
        let checks = index.take_checks();
        assert_eq!(
            checks.exists,
            vec![Key::from(&b":1:k1"[..])],
            "checked again"
        );
        index.group_verified(&checks.exists, Some(1), &shared.total_keys);
        assert!(index.keys.contains(b":1:k1"));
    }

    #[test]
    fn a_key_waiting_for_its_own_check_is_queued_once() {
        let shared = Shared::new(100, Default::default());
        let mut index = alive_part(
            &[":1:k0", ":1:k1", ":1:report:5:a", ":1:report:6:a"],
            &shared,
        );
        for key in [":1:k0", ":1:k1", ":1:report:5:a", ":1:report:6:a"] {
            index.announced(key.as_bytes(), &shared);
        }
        // Twice before its check: queued once.
        index.announced(b":1:report:6:a", &shared);
        let checks = index.take_checks();
        assert_eq!(checks.exists.len(), 4);
        index.group_verified(&checks.exists, Some(1), &shared.total_keys);
        // Announced again while waiting to be checked on its own: still one check, on its own.
        index.announced(b":1:k0", &shared);
        // Under a refill guard since: deleted instead.
        lock(&shared.guards).add(
            &[spec(":1:report:5:*")],
            Instant::now() + std::time::Duration::from_secs(60),
        );
        index.announced(b":1:report:5:a", &shared);
        let checks = index.take_checks();
        assert!(checks.exists.is_empty());
        let mut each = checks.exists_each.clone();
        each.sort();
        assert_eq!(
            each,
            vec![
                Key::from(&b":1:k0"[..]),
                Key::from(&b":1:k1"[..]),
                Key::from(&b":1:report:6:a"[..])
            ]
        );
        assert_eq!(checks.unlink, vec![Key::from(&b":1:report:5:a"[..])]);
    }

    #[test]
    fn a_batch_takes_at_most_its_share_and_leaves_the_rest_queued() {
        let shared = Shared::new(10 * VERIFY_BATCH, Default::default());
        let mut index = alive_part(&[], &shared);
        for n in 0..VERIFY_BATCH + 10 {
            index.announced(format!(":1:k{n}").as_bytes(), &shared);
        }
        let first = index.take_checks();
        assert_eq!(first.exists.len(), VERIFY_BATCH);
        let second = index.take_checks();
        assert_eq!(second.exists.len(), 10);
        let mut all: Vec<Key> = first.exists.into_iter().chain(second.exists).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), VERIFY_BATCH + 10, "every key taken once");
        assert_eq!(index.verifying.len(), VERIFY_BATCH + 10);
    }

    /// Shared state whose refill guard holds `pattern` for the next minute.
    fn guarding(pattern: &str) -> Shared {
        let shared = Shared::new(100, Default::default());
        lock(&shared.guards).add(
            &[spec(pattern)],
            Instant::now() + std::time::Duration::from_secs(60),
        );
        shared
    }

    #[test]
    fn a_key_announced_under_a_guard_is_checked_by_deleting_it() {
        let shared = guarding(":1:report:5:*");
        let mut index = alive_part(&[":1:report:5:a", ":1:report:6:a"], &shared);
        index.announced(b":1:report:6:a", &shared);
        index.announced(b":1:report:5:a", &shared);
        assert!(index.has_guard_unlinks());
        // Queued for an EXISTS first, then announced under the guard: deleted instead.
        index.announced(b":1:report:5:b", &shared);
        let checks = index.take_checks();
        assert_eq!(checks.exists, vec![Key::from(&b":1:report:6:a"[..])]);
        let mut unlink = checks.unlink.clone();
        unlink.sort();
        assert_eq!(
            unlink,
            vec![
                Key::from(&b":1:report:5:a"[..]),
                Key::from(&b":1:report:5:b"[..])
            ]
        );
        // Announced again while the UNLINK is in flight: deleted once more afterwards.
        index.announced(b":1:report:5:a", &shared);
        for key in &unlink {
            index.verified(key, false, &shared.total_keys);
        }
        assert!(!index.keys.contains(b":1:report:5:b"));
        assert!(index.keys.contains(b":1:report:5:a"));
        assert_eq!(
            index.take_checks().unlink,
            vec![Key::from(&b":1:report:5:a"[..])]
        );
    }

    #[test]
    fn guarded_patterns_catch_announced_keys_until_they_run_out() {
        let shared = guarding(":1:report:5:*");
        let mut index = NodeIndex {
            alive: true,
            ..NodeIndex::default()
        };
        index.announced(b":1:report:5:1:h", &shared);
        index.announced(b":1:report:6:1:h", &shared);
        assert_eq!(index.take_checks().unlink.len(), 1);
        lock(&shared.guards).end_all_now();
        index.announced(b":1:report:5:2:h", &shared);
        assert!(index.take_checks().unlink.is_empty());
    }

    #[test]
    fn a_pattern_cleared_again_stays_guarded_until_its_last_guard_ends() {
        let mut guards = Guards::default();
        let ended = Instant::now() - std::time::Duration::from_millis(1);
        let later = Instant::now() + std::time::Duration::from_secs(60);
        guards.add(&[spec(":1:report:5:*"), spec(":1:report:6:*")], ended);
        guards.add(&[spec(":1:report:5:*")], later);
        assert!(
            guards.covers(b":1:report:5:1:h"),
            "the later window's guard holds"
        );
        assert!(
            !guards.covers(b":1:report:6:1:h"),
            "a guard that ended is dropped"
        );
        assert_eq!(guards.active.len(), 1);
        guards.end_all_now();
        assert!(!guards.covers(b":1:report:5:1:h"));
        assert!(guards.matcher.is_empty() && guards.ends.is_empty());
    }

    #[test]
    fn guarded_patterns_wait_for_an_announcement_and_those_that_ran_out_meanwhile_are_dropped() {
        let mut guards = Guards::default();
        let ended = Instant::now() - std::time::Duration::from_millis(1);
        let later = Instant::now() + std::time::Duration::from_secs(60);
        let latest = later + std::time::Duration::from_secs(60);
        for id in 0..1_000 {
            guards.add(&[spec(&format!(":1:report:{id}:*"))], ended);
        }
        guards.add(&[spec(":1:report:5:*")], later);
        assert_eq!(guards.waiting.len(), 1, "what ran out does not wait");
        assert!(guards.matcher.is_empty(), "nothing needed the matcher yet");
        assert!(guards.covers(b":1:report:5:1:h"));
        assert!(!guards.covers(b":1:report:6:1:h"));
        // Cleared again while in the matcher: its guard ends later.
        guards.add(&[spec(":1:report:5:*")], latest);
        assert!(guards.covers(b":1:report:5:2:h"));
        assert_eq!(guards.active.len(), 1);
        assert_eq!(
            guards.active.values().next().map(|(_, end)| *end),
            Some(latest)
        );
    }

    #[test]
    fn coverage_follows_the_literal_prefix() {
        let prefixes = vec![b":1:report:".to_vec(), b":1:reportlist:".to_vec()];
        assert!(covered(&prefixes, ":1:report:5:*"));
        assert!(covered(&prefixes, ":1:report:*:5:*"));
        assert!(covered(&prefixes, ":1:reportlist:*:5:*"));
        assert!(!covered(&prefixes, ":1:report*"));
        assert!(!covered(&prefixes, ":1:studentreport:5:*"));
    }
}
