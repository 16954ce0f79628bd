//! Index mode: an in-memory index of the cache keys the rules can name, kept equal to what Redis
//! holds by Redis' own announcements, so a change's keys are looked up instead of swept for.
//!
//! Each primary gets a tracking connection ([`crate::tracking`]) in client-side caching's
//! broadcasting mode (`CLIENT TRACKING on BCAST PREFIX …`, RESP3): Redis announces the name of
//! every key written, deleted or expired under the rules' literal prefixes. The index of a node
//! is seeded by one `SCAN`, begun after tracking is on, and then follows the announcements:
//!
//! - An announced key is **inserted at once**, whatever the write was, and its existence is
//!   checked later (`EXISTS`, in batches, on the tracking connection). Only a check that found the
//!   key gone removes it, and only if no announcement of that key arrived since the check was
//!   sent. So the index may briefly hold a key Redis no longer has (an `UNLINK` of it is a
//!   no-op), but never lacks one Redis has.
//! - A key the daemon deletes itself (a change's keys, `UNLINK`ed on its own connection) is
//!   not checked: its announcements are counted from before the `UNLINK` is sent. Redis queues a
//!   write's announcement before it replies to the writer, so once the `UNLINK` reply says the
//!   key was deleted and a reply on the tracking connection to a later command is back, our
//!   deletion's announcement has been counted, and any later write's comes after it. A key
//!   announced exactly once then leaves the index: it is gone, and not written since. Any other
//!   count (a write just before or after ours) and the key is checked as any other. This halves
//!   Redis' work per cleared key (no `EXISTS` after each `UNLINK`).
//! - A lookup waits for a barrier first: a `PING` on each tracking connection. Redis queues an
//!   announcement before the reply to any command it reads after the write, and the connection
//!   hands announcements to the index as it reads them, so once the `PONG` is back every key
//!   written before the change committed is in the index.
//! - While a node's part is being seeded, or its tracking connection is lost, the index is not
//!   complete and changes are swept instead ([`crate::finder`]).
//!
//! Key names are packed into small sorted byte blocks ([`store`]): about a dozen bytes per key on
//! top of its name. Memory is bounded by `--index-max-keys`: past it the index is dropped for good
//! (until the daemon restarts) and the worker sweeps.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use redis::aio::MultiplexedConnection;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::glob::Glob;
use crate::matcher::{Matcher, PatternId};
use crate::sweep::PatternSpec;
use crate::telemetry::names;

mod store;

use store::KeyStore;

/// Keys whose existence is checked in one pipeline: a few hundred microseconds of Redis time.
pub const VERIFY_BATCH: usize = 1_000;

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
    /// Announced keys whose existence has not been checked since.
    to_verify: FxHashSet<Box<[u8]>>,
    /// Keys whose `EXISTS` is in flight, and whether they were announced again since it was sent
    /// (then its answer may be stale and is ignored: another check is queued).
    verifying: FxHashMap<Box<[u8]>, bool>,
    /// Keys a refill guard asked to delete as they were announced.
    guard_unlinks: Vec<Box<[u8]>>,
    /// Keys the daemon's own `UNLINK`s are deleting (see [`NodeIndex::deleting`]).
    own_deletes: FxHashMap<Box<[u8]>, OwnDelete>,
    /// Own deletes whose `UNLINK` reply said they were deleted, to settle once a reply on the
    /// tracking connection shows their announcements have arrived.
    deleted: Vec<Box<[u8]>>,
    /// The seed finished on the current tracking connection, and that connection is alive.
    complete: bool,
    /// The tracking connection is up (announcements are flowing).
    alive: bool,
    /// The part was last dropped by a flush announcement, not by a lost connection.
    flush_seen: bool,
    /// The tracking connection, for barriers.
    connection: Option<MultiplexedConnection>,
}

impl NodeIndex {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
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
        if self.keys.remove(key) {
            total.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Forgets every key (a new seed, a lost connection, a dropped index).
    pub fn clear(&mut self, total: &AtomicUsize) {
        total.fetch_sub(self.keys.len(), Ordering::Relaxed);
        self.keys = KeyStore::default();
        self.to_verify = FxHashSet::default();
        self.verifying = FxHashMap::default();
        self.guard_unlinks = Vec::new();
        self.own_deletes = FxHashMap::default();
        self.deleted = Vec::new();
        self.complete = false;
    }

    /// Keys Redis announced (written, deleted or expired: it does not say which).
    pub fn announced(&mut self, key: &[u8], shared: &Shared) {
        if !self.alive {
            return;
        }
        self.insert(key, &shared.total_keys);
        if let Some(own) = self.own_deletes.get_mut(key) {
            // Counted instead of checked: if ours is the only announcement, the key is gone
            // without asking Redis ([`NodeIndex::settle_deleted`]).
            own.announcements = own.announcements.saturating_add(1);
            // Whether a refill guard wants it deleted is decided when it settles: not if ours
            // was the only announcement.
            if !own.guarded {
                own.guarded = lock(&shared.guards).covers(key);
            }
            if let Some(announced_again) = self.verifying.get_mut(key) {
                *announced_again = true;
            }
            return;
        }
        self.check_later(key);
        if lock(&shared.guards).covers(key) {
            self.guard_unlinks.push(key.into());
        }
    }

    /// Queues an `EXISTS` of `key`, or marks the one in flight stale.
    fn check_later(&mut self, key: &[u8]) {
        match self.verifying.get_mut(key) {
            Some(announced_again) => *announced_again = true,
            None => {
                if !self.to_verify.contains(key) {
                    self.to_verify.insert(key.into());
                }
            }
        }
    }

    /// The daemon is about to `UNLINK` these keys on its own connection. Each announcement of
    /// them is counted from now on rather than checked with `EXISTS`, the deletion's own
    /// announcement among them: Redis announces a write on the tracking connection before it
    /// replies to the writer (what makes the `PING` barrier work), and a later write's
    /// announcement comes after that. So once the `UNLINK` reply says a key was deleted and a
    /// later reply on the tracking connection is back, a key announced exactly once since was
    /// deleted by us and not written since: it leaves the index without a check. Any other
    /// count (a write just before or after ours) falls back to the check.
    pub fn deleting<'a>(&mut self, keys: impl IntoIterator<Item = &'a [u8]>) {
        if !self.alive {
            return;
        }
        for key in keys {
            if !self.own_deletes.contains_key(key) {
                self.own_deletes.insert(key.into(), OwnDelete::default());
            }
        }
    }

    /// The reply to the `UNLINK`s of [`NodeIndex::deleting`]: `deleted` keys were all removed by
    /// it (their settling waits for a reply on the tracking connection); for `unsure` ones (an
    /// `UNLINK` of several keys removed fewer) their announcements are checked as any other.
    pub fn unlinked(&mut self, deleted: Vec<Box<[u8]>>, unsure: &[Box<[u8]>]) {
        for key in unsure {
            if let Some(own) = self.own_deletes.remove(key) {
                self.give_up_own(key, own);
            }
        }
        self.deleted.extend(deleted);
    }

    /// Own deletes to settle once the next reply on the tracking connection is back.
    pub fn take_deleted(&mut self) -> Vec<Box<[u8]>> {
        std::mem::take(&mut self.deleted)
    }

    /// Settles own deletes taken with [`NodeIndex::take_deleted`] before a command was sent on
    /// the tracking connection, now that its reply is back: every announcement of their deletion
    /// has been applied.
    pub fn settle_deleted(&mut self, keys: &[Box<[u8]>], total: &AtomicUsize) {
        for key in keys {
            let Some(own) = self.own_deletes.remove(key) else {
                continue;
            };
            if own.announcements == 1 && !self.verifying.contains_key(key) {
                self.to_verify.remove(key);
                self.remove(key, total);
            } else {
                self.give_up_own(key, own);
            }
        }
    }

    /// The worker that sent the `UNLINK`s of the own deletes in progress is gone (it
    /// reconnects): their replies will not come, so each is handled as any announced key.
    pub fn abandon_own_deletes(&mut self) {
        self.deleted = Vec::new();
        for (key, own) in std::mem::take(&mut self.own_deletes) {
            self.give_up_own(&key, own);
        }
    }

    /// An own delete that cannot be settled by its count: its announcements are handled as any
    /// other (checked, and deleted again under a refill guard).
    fn give_up_own(&mut self, key: &[u8], own: OwnDelete) {
        if own.announcements > 0 {
            self.check_later(key);
            if own.guarded {
                self.guard_unlinks.push(key.into());
            }
        }
    }

    /// Redis flushed a database (an announcement without key names). It does not say which: a
    /// `FLUSHDB` of another database is announced the same way, while this one keeps its keys.
    /// So the part is dropped as if the connection were lost, and seeded again.
    pub fn flushed(&mut self, shared: &Shared) {
        self.tracking_lost(&shared.total_keys);
        self.flush_seen = true;
    }

    /// Whether the part was dropped by a flush announcement (not by a lost connection).
    pub fn dropped_by_flush(&self) -> bool {
        self.flush_seen
    }

    /// A key the seed's `SCAN` returned: it existed when the `SCAN` ran.
    pub fn seeded(&mut self, key: &[u8], total: &AtomicUsize) {
        self.insert(key, total);
    }

    /// Takes up to [`VERIFY_BATCH`] announced keys to check, marking them in flight.
    pub fn take_to_verify(&mut self) -> Vec<Box<[u8]>> {
        let batch: Vec<Box<[u8]>> = self.to_verify.iter().take(VERIFY_BATCH).cloned().collect();
        for key in &batch {
            self.to_verify.remove(key);
            self.verifying.insert(key.clone(), false);
        }
        batch
    }

    /// The answer to a check sent with [`NodeIndex::take_to_verify`].
    pub fn verified(&mut self, key: &[u8], exists: bool, total: &AtomicUsize) {
        match self.verifying.remove(key) {
            // Forgotten since (the part was cleared): the answer is about a past state.
            None => {}
            // Announced again while the check was in flight: its answer may be stale.
            Some(true) => {
                self.to_verify.insert(key.into());
            }
            Some(false) if exists => self.insert(key, total),
            Some(false) => self.remove(key, total),
        }
    }

    /// A check failed to come back (the connection broke): its keys are checked again later.
    pub fn verification_lost(&mut self) {
        for (key, _) in std::mem::take(&mut self.verifying) {
            self.to_verify.insert(key);
        }
    }

    pub fn take_guard_unlinks(&mut self) -> Vec<Box<[u8]>> {
        std::mem::take(&mut self.guard_unlinks)
    }

    pub fn has_guard_unlinks(&self) -> bool {
        !self.guard_unlinks.is_empty()
    }

    /// The tracking connection is up on a fresh seed: announcements count from now on.
    pub fn tracking_started(&mut self, connection: MultiplexedConnection, total: &AtomicUsize) {
        self.clear(total);
        self.alive = true;
        self.flush_seen = false;
        self.connection = Some(connection);
    }

    /// The tracking connection is gone: announcements may have been lost.
    pub fn tracking_lost(&mut self, total: &AtomicUsize) {
        self.clear(total);
        self.alive = false;
        self.connection = None;
    }

    pub fn seed_finished(&mut self) {
        if self.alive {
            self.complete = true;
        }
    }

    pub fn tracking_connection(&self) -> Option<MultiplexedConnection> {
        self.connection.clone()
    }
}

/// Announcements of a key the daemon is deleting, counted until its deletion settles.
#[derive(Default)]
struct OwnDelete {
    announcements: u32,
    /// One of them came under a refill guard's pattern.
    guarded: bool,
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
#[derive(Default)]
pub struct Guards {
    matcher: Matcher,
    /// Registrations in the order they run out.
    entries: VecDeque<GuardEntry>,
    next_id: PatternId,
}

impl Guards {
    /// Guards `patterns` until `until`.
    pub fn add(&mut self, patterns: &[PatternSpec], until: Instant) {
        let mut ids = Vec::with_capacity(patterns.len());
        for spec in patterns {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            self.matcher.insert(&spec.pattern, id);
            ids.push((spec.pattern.clone(), id));
        }
        self.entries.push_back(GuardEntry {
            until,
            patterns: ids,
        });
    }

    /// Whether a guarded pattern matches `key` now (guards that ran out are dropped first).
    pub fn covers(&mut self, key: &[u8]) -> bool {
        let now = Instant::now();
        while self.entries.front().is_some_and(|entry| entry.until <= now) {
            if let Some(entry) = self.entries.pop_front() {
                for (pattern, id) in entry.patterns {
                    self.matcher.remove(&pattern, id);
                }
            }
        }
        !self.matcher.is_empty() && self.matcher.find(key).is_some()
    }
}

/// One window's guarded patterns, with the ids they hold in the matcher, and when they run out.
struct GuardEntry {
    until: Instant,
    patterns: Vec<(Arc<str>, PatternId)>,
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
        let glob = Glob::parse(&spec.pattern);
        match prefix_or_exact(&glob) {
            Some((literal, is_prefix)) => ranges.push((literal, is_prefix, index)),
            None => {
                others.insert(&spec.pattern, index as PatternId);
                other_prefixes.push(glob.literal_prefix());
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
        let mut seen: FxHashSet<&[u8]> = FxHashSet::default();
        for (literal, is_prefix, index) in &ranges {
            if *is_prefix {
                for key in under(&node.keys, literal) {
                    if seen.insert(key) {
                        keys.push((key.into(), *index));
                    }
                }
            } else if node.keys.contains(literal) && seen.insert(literal) {
                keys.push((literal.as_slice().into(), *index));
            }
        }
        for prefix in &walk {
            for key in under(&node.keys, prefix) {
                if let Some(index) = others.find(key) {
                    if seen.insert(key) {
                        keys.push((key.into(), index as usize));
                    }
                }
            }
        }
        found.push(keys);
    }
    Some(found)
}

/// `Some((literal, true))` for a literal prefix followed by `*`, `Some((key, false))` for a pattern
/// without wildcards, `None` for any other glob.
fn prefix_or_exact(glob: &Glob) -> Option<(Vec<u8>, bool)> {
    let literal = glob.literal_prefix();
    let escaped = crate::glob::escape(std::str::from_utf8(&literal).ok()?);
    if *glob == Glob::parse(&escaped) {
        return Some((literal, false));
    }
    if *glob == Glob::parse(&format!("{escaped}*")) {
        return Some((literal, true));
    }
    None
}

/// The keys of `keys` that start with `prefix`, in order.
fn under<'a>(keys: &'a KeyStore, prefix: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
    keys.from(prefix)
        .take_while(move |key| key.starts_with(prefix))
}

/// Whether every key `pattern` can match lies under one of the tracked `prefixes`.
pub fn covered(prefixes: &[Vec<u8>], pattern: &str) -> bool {
    let literal = Glob::parse(pattern).literal_prefix();
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
        index.seed_finished();
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
        let batch = index.take_to_verify();
        assert_eq!(batch.len(), 1);
        // Written again while the EXISTS was in flight, whose answer (gone) is then stale.
        index.announced(b":1:k", &shared);
        index.verified(b":1:k", false, &shared.total_keys);
        assert_eq!(index.len(), 1);
        // The next check decides.
        let batch = index.take_to_verify();
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
        index
    }

    #[test]
    fn an_own_delete_announced_once_leaves_the_index_without_a_check() {
        let shared = Shared::new(100, Default::default());
        let mut index = alive_part(&[":1:a", ":1:b", ":1:c"], &shared);
        let keys: Vec<Box<[u8]>> = [":1:a", ":1:b", ":1:c"]
            .iter()
            .map(|key| key.as_bytes().into())
            .collect();
        index.deleting(keys.iter().map(|key| &**key));
        // :1:a: our deletion only. :1:b: written again after it. :1:c: not known deleted.
        index.announced(b":1:a", &shared);
        index.announced(b":1:b", &shared);
        index.announced(b":1:b", &shared);
        index.announced(b":1:c", &shared);
        assert!(index.take_to_verify().is_empty(), "counted, not checked");
        index.unlinked(keys[..2].to_vec(), &keys[2..]);
        let deleted = index.take_deleted();
        index.settle_deleted(&deleted, &shared.total_keys);
        assert!(!index.keys.contains(b":1:a"));
        assert!(index.keys.contains(b":1:b") && index.keys.contains(b":1:c"));
        let mut checked: Vec<Box<[u8]>> = index.take_to_verify();
        checked.sort();
        assert_eq!(checked, keys[1..].to_vec(), "the others are checked");
        assert_eq!(shared.total_keys.load(Ordering::Relaxed), 2);
        assert!(index.own_deletes.is_empty());
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
    fn an_own_delete_under_a_guard_is_deleted_again_only_if_written_again() {
        let shared = guarding(":1:report:5:*");
        let keys: Vec<Box<[u8]>> = vec![
            b":1:report:5:a".as_slice().into(),
            b":1:report:5:b".as_slice().into(),
            b":1:report:5:c".as_slice().into(),
        ];
        let mut index = alive_part(&[":1:report:5:a", ":1:report:5:b"], &shared);
        index.deleting(keys.iter().map(|key| &**key));
        // a: our deletion only. b: written again after it. c: not there for our UNLINK (its
        // count fell short), then written: a refill, whose single announcement is not ours.
        index.announced(b":1:report:5:a", &shared);
        index.announced(b":1:report:5:b", &shared);
        index.announced(b":1:report:5:b", &shared);
        index.announced(b":1:report:5:c", &shared);
        assert!(
            index.take_guard_unlinks().is_empty(),
            "decided when settled"
        );
        index.unlinked(keys[..2].to_vec(), &keys[2..]);
        let deleted = index.take_deleted();
        index.settle_deleted(&deleted, &shared.total_keys);
        let mut unlinks = index.take_guard_unlinks();
        unlinks.sort();
        assert_eq!(unlinks, keys[1..].to_vec());
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
        assert_eq!(index.take_guard_unlinks().len(), 1);
        if let Some(entry) = lock(&shared.guards).entries.front_mut() {
            entry.until = Instant::now();
        }
        index.announced(b":1:report:5:1:h", &shared);
        assert!(index.take_guard_unlinks().is_empty());
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
