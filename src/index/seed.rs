//! The keys a seed's `SCAN` returns, gathered until the `SCAN` is done and then built into the
//! store in one ordered pass: inserting them one by one in `SCAN`'s random order cost a look-up,
//! a block search and a shift of its bytes each, and left every block with spare room.
//!
//! Keys arrive in small batches. They are copied into a staging buffer; every
//! [`RUN_KEYS`] keys the buffer is sorted (about a millisecond: `SCAN`s queued on other lanes keep
//! Redis busy meanwhile) and appended front-coded to one arena of sorted runs. When the `SCAN` is
//! done, the runs are merged, with the keys announced meanwhile, into a new store.
//!
//! The arena is one buffer: past a few tens of MB the allocator maps it on its own and gives it
//! back whole when the seed ends, where many small buffers would leave holes between the store's
//! blocks and keep the memory resident.
//!
//! The final merge is the one part of a seed that Redis does not overlap, so a large seed merges
//! on two threads: the first sorted run's middle key splits every run in two halves, each half's
//! runs are merged into a store of its own (the lower half on the tracker's thread, the upper one
//! on a scoped helper thread), and the two stores are joined. `SCAN` returns keys in hash order,
//! so the first run's middle key splits the keyspace about in half. It is the daemon's only
//! thread besides the runtime's, and lives for the merge only.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ops::{ControlFlow, Range};
use std::thread;

use rustc_hash::FxHashSet;

use super::store::{encode_entry, Builder, Decoder, KeyStore};

/// Keys sorted at once into a run: ~1 ms of sorting, and few enough runs for the final merge
/// (one per 16,384 keys).
const RUN_KEYS: usize = 16_384;
/// Below this many keys given the two halves are merged one after the other on the tracker's
/// thread: starting a thread costs more than it saves.
const PARALLEL_MERGE_KEYS: usize = 200_000;

/// A seed's keys so far.
#[derive(Default)]
pub struct SeedKeys {
    /// Keys not sorted yet, back to back.
    staging: Vec<u8>,
    /// Each staged key's [`window`] (once sorting) and bytes in `staging`.
    staged: Vec<(u64, Range<u32>)>,
    /// The first key given, and how much of it every key given shares: the keys' order is
    /// decided past it.
    first: Vec<u8>,
    common: usize,
    /// Sorted runs, front-coded, back to back.
    arena: Vec<u8>,
    /// The runs of the keys below `split`, and of the others.
    halves: [Vec<Range<usize>>; 2],
    /// The first run's middle key (set when it is sorted).
    split: Option<Box<[u8]>>,
    /// Keys given so far (with repeats: `SCAN` may return a key twice).
    given: usize,
    /// Keys a check found gone while the seed ran: a `SCAN` may have returned them before.
    removed: FxHashSet<Box<[u8]>>,
}

impl SeedKeys {
    /// Keys given so far, repeats included.
    pub fn given(&self) -> usize {
        self.given
    }

    pub fn push(&mut self, key: &[u8]) {
        self.share(key);
        let start = self.staging.len();
        self.staging.extend_from_slice(key);
        // Its window is set when the run is sorted, past what every key shares by then.
        self.staged
            .push((0, start as u32..self.staging.len() as u32));
        self.given += 1;
        // The staging offsets are 32-bit: a run is cut well before.
        if self.staged.len() >= RUN_KEYS || self.staging.len() > u32::MAX as usize / 2 {
            self.sort_staged();
        }
    }

    /// A check found `key` gone: whatever the `SCAN` returned of it before is stale.
    pub fn removed(&mut self, key: &[u8]) {
        self.removed.insert(key.into());
    }

    /// Narrows the prefix every key shares to what `key` shares of it.
    fn share(&mut self, key: &[u8]) {
        if self.given == 0 && self.first.is_empty() {
            self.first = key.to_vec();
            self.common = key.len();
            return;
        }
        let common = self.common.min(key.len());
        self.common = match self.first[..common] == key[..common] {
            true => common,
            false => shared_prefix(&self.first, key, common),
        };
    }

    fn sort_staged(&mut self) {
        let staging = &self.staging;
        let key = |range: &Range<u32>| &staging[range.start as usize..range.end as usize];
        // Every staged key shares `common` bytes: windows past it order them as their bytes do,
        // with a byte comparison only where two windows are equal.
        for (window_of, range) in &mut self.staged {
            *window_of = window(key(range), self.common);
        }
        self.staged
            .sort_unstable_by(|(a_window, a), (b_window, b)| {
                a_window.cmp(b_window).then_with(|| key(a).cmp(key(b)))
            });
        if self.split.is_none() {
            self.split = self
                .staged
                .get(self.staged.len() / 2)
                .map(|(_, middle)| key(middle).into());
        }
        let mut runs = RunWriter::new(&mut self.arena, &mut self.halves, self.split.as_deref());
        for (_, range) in &self.staged {
            runs.push(key(range));
        }
        runs.finish();
        self.staging.clear();
        self.staged.clear();
    }

    /// The store of the finished seed: every key given, and every key of `announced` (what the
    /// announcements made of the part meanwhile). A key a check found gone is left out unless it
    /// was announced since: every change of a key after tracking began is announced, so the
    /// announcements and their checks know better than the `SCAN` about any key they named.
    pub fn finish(mut self, announced: &KeyStore) -> KeyStore {
        self.sort_staged();
        let removed = &mut self.removed;
        let mut runs = RunWriter::new(&mut self.arena, &mut self.halves, self.split.as_deref());
        let (first, common) = (&self.first, &mut self.common);
        announced.walk_from(b"", |key| {
            *common = shared_prefix(first, key, *common);
            // Announced again after its check: the store has it.
            removed.remove(key);
            runs.push(key);
            ControlFlow::Continue(())
        });
        runs.finish();
        let [lower, upper] = &self.halves;
        let half = |runs: &[Range<usize>]| build(&self.arena, runs, self.common, &self.removed);
        if self.given < PARALLEL_MERGE_KEYS {
            let mut store = half(lower);
            store.append(half(upper));
            return store;
        }
        thread::scope(|scope| {
            let helper = thread::Builder::new()
                .name("index-merge".into())
                .spawn_scoped(scope, || half(upper));
            let mut store = half(lower);
            // No thread to be had: the upper half is merged here too.
            let upper = match helper {
                Ok(helper) => helper
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                Err(_) => half(upper),
            };
            store.append(upper);
            store
        })
    }
}

/// Writes sorted keys into the arena as runs, each key into the run of its half (below the split
/// key or not).
struct RunWriter<'s> {
    arena: &'s mut Vec<u8>,
    halves: &'s mut [Vec<Range<usize>>; 2],
    split: Option<&'s [u8]>,
    /// The half being written, where its run starts, and the key written last.
    half: usize,
    start: usize,
    previous: Vec<u8>,
}

impl<'s> RunWriter<'s> {
    fn new(
        arena: &'s mut Vec<u8>,
        halves: &'s mut [Vec<Range<usize>>; 2],
        split: Option<&'s [u8]>,
    ) -> RunWriter<'s> {
        let start = arena.len();
        RunWriter {
            arena,
            halves,
            split,
            half: 0,
            start,
            previous: Vec::new(),
        }
    }

    /// Adds `key`, not less than the key before (a repeat is skipped).
    fn push(&mut self, key: &[u8]) {
        let written = self.arena.len() > self.start;
        if written && key == self.previous.as_slice() {
            return;
        }
        if self.half == 0 && self.split.is_some_and(|split| key >= split) {
            self.finish();
            self.half = 1;
            self.previous.clear();
        }
        // A run's first entry shares nothing, so each run decodes on its own.
        encode_entry(self.arena, &self.previous, key);
        self.previous.clear();
        self.previous.extend_from_slice(key);
    }

    /// Ends the run being written (the writer may go on with the other half's).
    fn finish(&mut self) {
        if self.arena.len() > self.start {
            self.halves[self.half].push(self.start..self.arena.len());
        }
        self.start = self.arena.len();
    }
}

/// The store of the keys of sorted `runs`, without the `removed` ones.
fn build(
    arena: &[u8],
    runs: &[Range<usize>],
    common: usize,
    removed: &FxHashSet<Box<[u8]>>,
) -> KeyStore {
    let mut builder = Builder::default();
    merge(arena, runs, common, |key| {
        if removed.is_empty() || !removed.contains(key) {
            builder.push(key);
        }
    });
    builder.finish()
}

/// How much of `key` and `first` is the same, up to `limit` bytes.
fn shared_prefix(first: &[u8], key: &[u8], limit: usize) -> usize {
    first
        .iter()
        .zip(key)
        .take(limit)
        .take_while(|(a, b)| a == b)
        .count()
}

/// The 8 bytes of `key` after the `common` bytes every key shares, as a number that orders as
/// they do (missing bytes as zeros: a shorter key's window is not greater, and equal windows
/// are compared byte by byte).
fn window(key: &[u8], common: usize) -> u64 {
    let mut bytes = [0u8; 8];
    let rest = key.get(common..).unwrap_or_default();
    let len = rest.len().min(8);
    bytes[..len].copy_from_slice(&rest[..len]);
    u64::from_be_bytes(bytes)
}

/// Calls `emit` with the keys of sorted `runs` of `arena` in order (a key in several runs once
/// per run; the builder skips repeats). Every key shares its first `common` bytes.
fn merge(arena: &[u8], runs: &[Range<usize>], common: usize, mut emit: impl FnMut(&[u8])) {
    let mut decoders: Vec<Decoder> = runs.iter().map(|_| Decoder::default()).collect();
    // The heap holds each run's current key (after its window) and the run's index; the
    // smallest comes out first.
    let mut heap = BinaryHeap::with_capacity(runs.len());
    for (index, (run, decoder)) in runs.iter().zip(&mut decoders).enumerate() {
        if decoder.advance(&arena[run.clone()]) {
            let key = std::mem::take(&mut decoder.key);
            heap.push(Reverse((window(&key, common), key, index)));
        }
    }
    while let Some(Reverse((_, key, index))) = heap.pop() {
        emit(&key);
        let decoder = &mut decoders[index];
        // The run's next entry is coded against this key: decode it in place.
        decoder.key = key;
        if decoder.advance(&arena[runs[index].clone()]) {
            let key = std::mem::take(&mut decoder.key);
            heap.push(Reverse((window(&key, common), key, index)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn key(i: u32) -> Vec<u8> {
        format!(
            ":1:report:{}:{:016x}",
            i % 5_000,
            u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        )
        .into_bytes()
    }

    #[test]
    fn the_seed_builds_the_keys_in_order_without_the_removed_ones() {
        let mut seed = SeedKeys::default();
        let mut expected = BTreeSet::new();
        // Random order, repeats, several runs.
        for i in (0..50_000u32).map(|i| i.wrapping_mul(2_654_435_761) % 40_000) {
            seed.push(&key(i));
            expected.insert(key(i));
        }
        // A key that shares less with the others, mid-run: the order is decided on more bytes.
        for short in [&b":0"[..], b":1:rep", b""] {
            seed.push(short);
            expected.insert(short.to_vec());
        }
        // Gone, and not announced since: left out.
        seed.removed(&key(7));
        expected.remove(&key(7));
        // Gone, then written again (announced: the store has it).
        seed.removed(&key(8));
        let mut announced = KeyStore::default();
        announced.insert(&key(8));
        announced.insert(b":1:report:announced");
        expected.insert(b":1:report:announced".to_vec());
        let store = seed.finish(&announced);
        let expected: Vec<Vec<u8>> = expected.into_iter().collect();
        assert_eq!(store.len(), expected.len());
        assert_eq!(store.keys(), expected);
    }

    #[test]
    fn a_large_seed_merged_in_two_halves_on_two_threads_holds_every_key_once() {
        let mut seed = SeedKeys::default();
        let mut expected = BTreeSet::new();
        // Past the parallel merge's threshold, with repeats across runs and halves.
        let given = PARALLEL_MERGE_KEYS as u32 + 20_000;
        for i in (0..given).map(|i| i.wrapping_mul(2_654_435_761) % (given - 30_000)) {
            seed.push(&key(i));
            expected.insert(key(i));
        }
        let split = seed.split.clone().expect("the first run set the split");
        // Gone, one in each half.
        let side = |lower: bool| {
            (0..given - 30_000)
                .map(key)
                .find(|key| (key.as_slice() < &*split) == lower)
                .expect("keys on both sides of the split")
        };
        let (below, above) = (side(true), side(false));
        for gone in [&below, &above] {
            seed.removed(gone);
            expected.remove(gone);
        }
        // Announced keys on both sides of the split, one of them the split key itself.
        let mut announced = KeyStore::default();
        for extra in [&b":1:report:0"[..], &split, b":1:report:~"] {
            announced.insert(extra);
            expected.insert(extra.to_vec());
        }
        let store = seed.finish(&announced);
        let expected: Vec<Vec<u8>> = expected.into_iter().collect();
        assert_eq!(store.len(), expected.len());
        assert_eq!(store.keys(), expected);
    }
}
