//! The index's sorted set of key names, packed into small byte blocks with front coding: each key
//! is stored as the length of the prefix it shares with the key before it, then the rest of its
//! bytes. A cache's keys share long prefixes once sorted (`:1:report:12345:` before a user id and
//! a 32-digit hash), so a key costs about its distinct tail plus two bytes, where a
//! `BTreeSet<Box<[u8]>>` spends ~40 bytes on top of the whole name (a heap allocation per key,
//! with its header and size-class rounding, plus a 16-byte tree slot and the tree nodes' slack).
//!
//! Keys live in blocks of at most [`BLOCK_MAX`] bytes, in order within a block; the blocks are
//! kept in a `BTreeMap` by their first key, and a block's first entry shares nothing, so each
//! block decodes on its own. A block's buffer grows by an eighth at a time and is split in two
//! when full, so its spare capacity stays small whatever the order keys arrive in. A seed builds
//! the store from its keys in order ([`Builder`]): blocks filled to the bound, no spare capacity.
//!
//! A look-up is the daemon's most frequent work, so it does not rebuild the keys it passes: it
//! follows how long a prefix the key shares with the last entry passed, and most entries are
//! placed by their two lengths alone ([`locate`]). Inserting and removing re-encode the
//! neighbouring entry from those lengths, the key and the entry's own bytes.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::ops::{Bound, ControlFlow, Range};

/// A block is split past this many bytes: its entries are scanned linearly on every look-up (a
/// few dozen keys), while the per-block cost (its map slot, first key and allocation) is shared
/// by as many keys.
const BLOCK_MAX: usize = 2_048;
/// A block this small after a removal is merged into the next one (TTL churn would otherwise
/// leave many near-empty blocks, each with its fixed cost).
const BLOCK_MIN: usize = BLOCK_MAX / 4;

/// A sorted set of byte strings.
#[derive(Default)]
pub struct KeyStore {
    /// Each block's first key, to its encoded keys.
    blocks: BTreeMap<Box<[u8]>, Vec<u8>>,
    len: usize,
}

impl KeyStore {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        self.block_of(key)
            .is_some_and(|(_, block)| locate(block, key).found)
    }

    /// Adds the keys of `other`, every one of which is greater than every key of this store
    /// (the upper half of a seed's keys).
    pub fn append(&mut self, mut other: KeyStore) {
        debug_assert!(
            match (self.blocks.last_key_value(), other.blocks.first_key_value()) {
                (Some((_, last)), Some((first, _))) => {
                    let mut decoder = Decoder::default();
                    while decoder.advance(last) {}
                    decoder.key.as_slice() < &**first
                }
                _ => true,
            },
            "appended keys out of order"
        );
        self.blocks.append(&mut other.blocks);
        self.len += other.len;
    }

    /// Adds `key`; false when it was there already.
    pub fn insert(&mut self, key: &[u8]) -> bool {
        let Some((_, block)) = self
            .blocks
            .range_mut::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
        else {
            // Before every block's first key (or no block yet): the first block takes it and is
            // keyed by it from now on.
            let mut block = self.blocks.pop_first().map(|(_, b)| b).unwrap_or_default();
            let at = locate(&block, key);
            insert_at(&mut block, &at, key);
            self.put_split(key.into(), block);
            self.len += 1;
            return true;
        };
        let at = locate(block, key);
        if at.found {
            return false;
        }
        insert_at(block, &at, key);
        self.len += 1;
        if let Some(tail) = split(block) {
            self.put(first_key(&tail).into(), tail);
        }
        true
    }

    /// Removes `key`; false when it was not there.
    pub fn remove(&mut self, key: &[u8]) -> bool {
        let Some((first, block)) = self
            .blocks
            .range_mut::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
        else {
            return false;
        };
        let at = locate(block, key);
        if !at.found {
            return false;
        }
        remove_at(block, &at, key);
        self.len -= 1;
        if at.entry.start > 0 && block.len() >= BLOCK_MIN {
            return true;
        }
        // Its first key changed, or it is nearly empty: the block is taken out, merged with a
        // neighbour, and put back under its first key.
        let first = first.clone();
        if let Some(block) = self.blocks.remove(&first) {
            self.merge_back(first, block);
        }
        true
    }

    /// Puts back a block taken out after a removal, merged with a neighbour when it is small and
    /// both fit in one (keys are in order across blocks, and a block's first entry shares
    /// nothing: the later block's bytes simply follow; [`locate`] allows for that entry sharing
    /// less than it could).
    fn merge_back(&mut self, first: Box<[u8]>, mut block: Vec<u8>) {
        if block.len() < BLOCK_MIN {
            let next = self
                .blocks
                .range::<[u8], _>((Bound::Excluded(&*first), Bound::Unbounded))
                .next()
                .filter(|(_, next)| block.len() + next.len() <= BLOCK_MAX)
                .map(|(next_first, _)| next_first.clone());
            if let Some(next_block) = next.and_then(|next_first| self.blocks.remove(&next_first)) {
                block.extend_from_slice(&next_block);
            }
        }
        if block.len() < BLOCK_MIN {
            // Or into the previous one: small blocks left between big ones merge as those shrink.
            let previous = self
                .blocks
                .range_mut::<[u8], _>((Bound::Unbounded, Bound::Excluded(&*first)))
                .next_back()
                .filter(|(_, previous)| previous.len() + block.len() <= BLOCK_MAX);
            if let Some((_, previous)) = previous {
                previous.extend_from_slice(&block);
                return;
            }
        }
        if !block.is_empty() {
            let first = match first_key(&block) == &*first {
                true => first,
                false => first_key(&block).into(),
            };
            self.put(first, block);
        }
    }

    /// Calls `visit` with the keys from the first at or after `start`, in order, until it breaks.
    /// The block `start` falls in is searched as a look-up is; only the keys from there on are
    /// rebuilt.
    pub fn walk_from(&self, start: &[u8], mut visit: impl FnMut(&[u8]) -> ControlFlow<()>) {
        let (mut decoder, blocks) = match self.block_of(start) {
            Some((first, block)) => {
                let at = locate(block, start);
                // The entry found equals `start` up to the length it shares with the entry
                // before: decoding it from there rebuilds its key.
                let decoder = Decoder {
                    at: at.entry.start,
                    key: start.get(..at.shared).unwrap_or_default().to_vec(),
                };
                let blocks = self
                    .blocks
                    .range::<[u8], _>((Bound::Included(first), Bound::Unbounded));
                (decoder, blocks)
            }
            None => (Decoder::default(), self.blocks.range::<[u8], _>(..)),
        };
        for (_, block) in blocks {
            while decoder.advance(block) {
                if visit(&decoder.key).is_break() {
                    return;
                }
            }
            decoder.restart();
        }
    }

    /// Every key, in order.
    #[cfg(test)]
    pub fn keys(&self) -> Vec<Vec<u8>> {
        let mut keys = Vec::with_capacity(self.len);
        self.walk_from(b"", |key| {
            keys.push(key.to_vec());
            ControlFlow::Continue(())
        });
        keys
    }

    /// The block `key` falls in: the last whose first key is not greater. `None` when `key` is
    /// before every block.
    fn block_of(&self, key: &[u8]) -> Option<(&[u8], &[u8])> {
        self.blocks
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .map(|(first, block)| (&**first, block.as_slice()))
    }

    /// Stores a block that may be past the bound, split if so.
    fn put_split(&mut self, first: Box<[u8]>, mut block: Vec<u8>) {
        let tail = split(&mut block);
        self.put(first, block);
        if let Some(tail) = tail {
            self.put(first_key(&tail).into(), tail);
        }
    }

    /// Stores a block, its buffer trimmed to a small spare capacity.
    fn put(&mut self, first: Box<[u8]>, mut block: Vec<u8>) {
        if block.capacity() > block.len() + block.len() / 4 {
            block.shrink_to(block.len() + block.len() / 8);
        }
        self.blocks.insert(first, block);
    }
}

/// Builds a store from keys given in increasing order (a seed's sorted keys): each block filled
/// up to [`BLOCK_MAX`], with no spare capacity.
#[derive(Default)]
pub struct Builder {
    store: KeyStore,
    block: Vec<u8>,
    /// The key last added (the next must be greater).
    last: Vec<u8>,
}

impl Builder {
    /// Adds `key`, which must be greater than the last; an equal one is skipped.
    pub fn push(&mut self, key: &[u8]) {
        if !self.block.is_empty() && key <= self.last.as_slice() {
            debug_assert_eq!(key, self.last.as_slice(), "keys out of order");
            return;
        }
        if self.block.len() + entry_len(shared_len(&self.last, key), key.len()) > BLOCK_MAX {
            self.flush();
        }
        if self.block.is_empty() {
            self.block.reserve_exact(BLOCK_MAX);
            encode_entry(&mut self.block, &[], key);
        } else {
            encode_entry(&mut self.block, &self.last, key);
        }
        self.last.clear();
        self.last.extend_from_slice(key);
        self.store.len += 1;
    }

    fn flush(&mut self) {
        let block = std::mem::take(&mut self.block);
        if !block.is_empty() {
            self.store.blocks.insert(first_key(&block).into(), block);
        }
    }

    pub fn finish(mut self) -> KeyStore {
        self.flush();
        self.store
    }
}

/// Where a key is, or would go, in a block: offsets and prefix lengths only, so a look-up
/// allocates nothing and never rebuilds the keys it passes.
struct Location {
    /// The bytes of the first entry whose key is not less than the key (empty at the block's
    /// end).
    entry: Range<usize>,
    /// That entry's key is the key.
    found: bool,
    /// How many leading bytes the key shares with the entry before (0 at the block's start).
    before: usize,
    /// How many leading bytes the key shares with `entry`'s key (0 at the block's end).
    matched: usize,
    /// `entry`'s shared length and the offsets of its tail (the bytes of its own).
    shared: usize,
    tail: Range<usize>,
}

impl Location {
    /// The block's end: the key is greater than every key of the block.
    fn end(block: &[u8], before: usize) -> Self {
        let end = block.len();
        Location {
            entry: end..end,
            found: false,
            before,
            matched: 0,
            shared: 0,
            tail: end..end,
        }
    }

    /// The offsets of the bytes `entry`'s key has beyond the `matched` it shares with the key
    /// (they are a part of its tail, as it shares no more than `shared` with the entry before).
    fn rest(&self) -> Range<usize> {
        self.tail.start + (self.matched - self.shared)..self.tail.end
    }
}

/// Finds `key` in a block without rebuilding the keys before it. `before` counts the leading
/// bytes the key shares with the last key passed, which is less than the key. An entry sharing
/// more than that with its predecessor agrees with the predecessor where the predecessor is
/// below the key, so it is less too: it is skipped by its lengths alone. Any other entry equals
/// the key up to its shared length, and only its tail is compared, from there. (Entries
/// normally share all they can, and then one sharing less than `before` is greater at its first
/// tail byte; but a merge leaves the later block's first entry sharing nothing whatever it has
/// in common with the key before, hence a comparison rather than a conclusion from the lengths.)
fn locate(block: &[u8], key: &[u8]) -> Location {
    let mut before = 0;
    let mut at = 0;
    while let Some(entry) = read_entry(block, at) {
        if entry.shared <= before {
            let tail = &block[entry.tail.clone()];
            let rest = key.get(entry.shared..).unwrap_or_default();
            let common = shared_len(tail, rest);
            let order = match (tail.get(common), rest.get(common)) {
                (None, None) => Ordering::Equal,
                // The entry's key is a prefix of the key.
                (None, Some(_)) => Ordering::Less,
                (Some(_), None) => Ordering::Greater,
                (Some(entry_byte), Some(key_byte)) => entry_byte.cmp(key_byte),
            };
            if order.is_ge() {
                return Location {
                    entry: at..entry.tail.end,
                    found: order.is_eq(),
                    before,
                    matched: entry.shared + common,
                    shared: entry.shared,
                    tail: entry.tail,
                };
            }
            before = entry.shared + common;
        }
        at = entry.tail.end;
    }
    Location::end(block, before)
}

/// Inserts `key` where [`locate`] said it goes: its entry shares `before` bytes with the entry
/// before, and the entry after is re-encoded against it, sharing `matched` bytes; that entry's
/// bytes past those stay where they are.
fn insert_at(block: &mut Vec<u8>, at: &Location, key: &[u8]) {
    let new = Header::new(at.before, key.len() - at.before);
    let own = key.get(at.before..).unwrap_or_default();
    if at.entry.is_empty() {
        replace(block, at.entry.clone(), &[new.bytes(), own]);
        return;
    }
    let rest = at.rest();
    let next = Header::new(at.matched, rest.len());
    replace(
        block,
        at.entry.start..rest.start,
        &[new.bytes(), own, next.bytes()],
    );
}

/// Removes the key [`locate`] found. The entry after it shared `shared` bytes with the removed
/// key; against the entry before it shares `min(before, shared)` of those, and its other bytes
/// are the removed key's up to `shared` (the key searched for) and its own tail, which stays
/// where it is.
fn remove_at(block: &mut Vec<u8>, at: &Location, key: &[u8]) {
    let Some(next) = read_entry(block, at.entry.end) else {
        replace(block, at.entry.clone(), &[]);
        return;
    };
    let shared = at.before.min(next.shared);
    let lent = key.get(shared..next.shared).unwrap_or_default();
    let header = Header::new(shared, lent.len() + next.tail.len());
    replace(
        block,
        at.entry.start..next.tail.start,
        &[header.bytes(), lent],
    );
}

/// Replaces `range` of the block with `parts`, growing the buffer by an eighth at most beyond
/// the need (a doubling `Vec` would leave up to half of every block spare).
fn replace(block: &mut Vec<u8>, range: Range<usize>, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|part| part.len()).sum();
    if len > range.len() {
        let grow = len - range.len();
        if block.len() + grow > block.capacity() {
            block.reserve_exact(grow.max(block.len() / 8));
        }
        block.splice(range.end..range.end, std::iter::repeat_n(0, grow));
    } else {
        block.drain(range.start + len..range.end);
    }
    let mut at = range.start;
    for part in parts {
        block[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
}

/// Splits a block past [`BLOCK_MAX`] at the entry boundary nearest its middle; returns the upper
/// half, its first entry re-encoded whole (`None` for a block within the bound, or of one key too
/// long for any block).
fn split(block: &mut Vec<u8>) -> Option<Vec<u8>> {
    if block.len() <= BLOCK_MAX {
        return None;
    }
    let half = block.len() / 2;
    let mut decoder = Decoder::default();
    while decoder.at < half && decoder.advance(block) {}
    let start = decoder.at;
    if start == 0 || !decoder.advance(block) {
        return None;
    }
    let mut tail = Vec::with_capacity(block.len() - start + decoder.key.len());
    encode_entry(&mut tail, &[], &decoder.key);
    tail.extend_from_slice(&block[decoder.at..]);
    block.truncate(start);
    block.shrink_to(start + start / 8);
    Some(tail)
}

/// A block's first key: its first entry shares nothing, so its tail is the key.
fn first_key(block: &[u8]) -> &[u8] {
    read_entry(block, 0)
        .and_then(|entry| block.get(entry.tail))
        .unwrap_or_default()
}

/// Appends `key`'s entry after `previous`: the length of the prefix they share, the length of
/// the rest, the rest.
pub(super) fn encode_entry(out: &mut Vec<u8>, previous: &[u8], key: &[u8]) {
    let shared = shared_len(previous, key);
    write_varint(out, shared);
    write_varint(out, key.len() - shared);
    out.extend_from_slice(&key[shared..]);
}

/// Bytes of an entry sharing `shared` bytes of a key of `len`.
fn entry_len(shared: usize, len: usize) -> usize {
    varint_len(shared) + varint_len(len - shared) + len - shared
}

fn shared_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(a, b)| a == b).count()
}

/// LEB128: seven bits a byte, low first.
fn write_varint(out: &mut Vec<u8>, mut value: usize) {
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn varint_len(mut value: usize) -> usize {
    let mut len = 1;
    while value >= 0x80 {
        len += 1;
        value >>= 7;
    }
    len
}

fn read_varint(rest: &mut &[u8]) -> Option<usize> {
    let mut value = 0usize;
    let mut shift = 0;
    for (used, &byte) in rest.iter().enumerate() {
        value |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            *rest = &rest[used + 1..];
            return Some(value);
        }
        shift += 7;
        if shift >= usize::BITS {
            return None;
        }
    }
    None
}

/// An entry's place in its block: how many bytes it shares with the key before, and where its
/// own bytes are (they end the entry).
struct Entry {
    shared: usize,
    tail: Range<usize>,
}

/// The entry at offset `at` of `block`; `None` at its end (or on bytes that are not an entry,
/// which the store never writes).
fn read_entry(block: &[u8], at: usize) -> Option<Entry> {
    let mut rest = block.get(at..)?;
    // Both lengths fit in a byte but for long keys: the common case skips the varint loop.
    let (shared, length) = match *rest {
        [shared, length, ..] if (shared | length) < 0x80 => {
            rest = &rest[2..];
            (usize::from(shared), usize::from(length))
        }
        _ => (read_varint(&mut rest)?, read_varint(&mut rest)?),
    };
    let start = block.len() - rest.len();
    let end = start
        .checked_add(length)
        .filter(|&end| end <= block.len())?;
    Some(Entry {
        shared,
        tail: start..end,
    })
}

/// An entry's two lengths, encoded: two varints of at most 10 bytes each.
struct Header {
    bytes: [u8; 20],
    len: usize,
}

impl Header {
    fn new(shared: usize, tail: usize) -> Self {
        let mut header = Header {
            bytes: [0; 20],
            len: 0,
        };
        for mut value in [shared, tail] {
            while value >= 0x80 {
                header.bytes[header.len] = (value & 0x7f) as u8 | 0x80;
                header.len += 1;
                value >>= 7;
            }
            header.bytes[header.len] = value as u8;
            header.len += 1;
        }
        header
    }

    fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Decodes front-coded entries one after another, rebuilding each key from the one before.
#[derive(Default)]
pub(super) struct Decoder {
    /// Offset of the next entry.
    pub(super) at: usize,
    /// The key last decoded.
    pub(super) key: Vec<u8>,
}

impl Decoder {
    /// Back to the start of a (new) block.
    pub(super) fn restart(&mut self) {
        self.at = 0;
        self.key.clear();
    }

    /// Decodes the entry at `at` of `bytes` into `key`; false at their end (or on bytes that are
    /// not entries, which the store never writes).
    pub(super) fn advance(&mut self, bytes: &[u8]) -> bool {
        let Some(entry) = read_entry(bytes, self.at) else {
            return false;
        };
        self.key.truncate(entry.shared);
        self.key.extend_from_slice(&bytes[entry.tail.clone()]);
        self.at = entry.tail.end;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    fn test_key(id: u16, pad: usize) -> Vec<u8> {
        let key =
            format!(":1:report:{id}:{}", "x".repeat(pad % 7 * (pad / 7 % 3 + 1))).into_bytes();
        if pad == 299 {
            [key, vec![b'y'; 200]].concat()
        } else {
            key
        }
    }

    fn from_start(store: &KeyStore, start: &[u8]) -> Vec<Vec<u8>> {
        let mut keys = Vec::new();
        store.walk_from(start, |key| {
            keys.push(key.to_vec());
            ControlFlow::Continue(())
        });
        keys
    }

    proptest! {
        /// The store answers as a `BTreeSet` does for any sequence of inserts and removes,
        /// including keys long enough to need a multi-byte length and enough keys to split and
        /// merge blocks, whether it starts empty or built from some keys in order.
        #[test]
        fn behaves_as_a_sorted_set(
            built in proptest::collection::btree_set((0u16..400, 0usize..300), 0..1_000),
            operations in proptest::collection::vec(
                (any::<bool>(), 0u16..400, 0usize..300),
                0..3_000,
            )
        ) {
            let mut model: BTreeSet<Vec<u8>> =
                built.iter().map(|(id, pad)| test_key(*id, *pad)).collect();
            let mut builder = Builder::default();
            for key in &model {
                builder.push(key);
            }
            let mut store = builder.finish();
            prop_assert_eq!(store.len(), model.len());
            for (add, id, pad) in operations {
                let key = test_key(id, pad);
                if add {
                    prop_assert_eq!(store.insert(&key), model.insert(key.clone()));
                } else {
                    prop_assert_eq!(store.remove(&key), model.remove(&key));
                }
                prop_assert_eq!(store.len(), model.len());
            }
            let expected: Vec<Vec<u8>> = model.iter().cloned().collect();
            prop_assert_eq!(store.keys(), expected);
            for start in [&b":1:report:1"[..], b":1:report:35", b"", b"\xff"] {
                let expected: Vec<Vec<u8>> = model
                    .range::<[u8], _>((Bound::Included(start), Bound::Unbounded))
                    .cloned()
                    .collect();
                prop_assert_eq!(from_start(&store, start), expected);
            }
            for key in &model {
                prop_assert!(store.contains(key));
            }
        }
    }

    /// Keys that share long prefixes (some past 127 bytes, for two-byte lengths), are prefixes
    /// of one another, are empty, or hold bytes from 0x80 up. (Drawn as small numbers: a
    /// `prop_oneof!` per byte makes the generation most of the test's time.)
    fn tricky_key() -> impl Strategy<Value = Vec<u8>> {
        const BYTES: [u8; 6] = [0, b'a', b'b', 0x7f, 0x80, 0xff];
        let tail = proptest::collection::vec(0..BYTES.len(), 0..40);
        (0..4u8, any::<bool>(), tail).prop_map(|(prefix, short, tail)| {
            let mut key = match prefix {
                0 => Vec::new(),
                1 => b"k:".to_vec(),
                2 => vec![0x80; 140],
                _ => [vec![b'p'; 130], vec![0xff]].concat(),
            };
            let len = if short { tail.len() % 4 } else { tail.len() };
            key.extend(tail[..len].iter().map(|&byte| BYTES[byte]));
            key
        })
    }

    #[derive(Debug, Clone)]
    enum Step {
        Insert(Vec<u8>),
        Remove(Vec<u8>),
        /// Inserts a present key (the empty key in an empty store) extended by some bytes: a key
        /// with a prefix in the store, or one already there.
        Extend(prop::sample::Index, Vec<u8>),
        /// Removes a present key: many of these in a row empty and merge blocks.
        RemovePresent(prop::sample::Index),
        /// Removes the first or the last key of a block.
        RemoveEdge(prop::sample::Index, bool),
        Contains(Vec<u8>),
        /// Walks some keys from any start.
        Walk(Vec<u8>, usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        let index = any::<prop::sample::Index>();
        prop_oneof![
            4 => tricky_key().prop_map(Step::Insert),
            2 => tricky_key().prop_map(Step::Remove),
            2 => (index.clone(), proptest::collection::vec(any::<u8>(), 0..3))
                .prop_map(|(at, more)| Step::Extend(at, more)),
            3 => index.clone().prop_map(Step::RemovePresent),
            1 => (index, any::<bool>()).prop_map(|(at, last)| Step::RemoveEdge(at, last)),
            1 => tricky_key().prop_map(Step::Contains),
            1 => (tricky_key(), 0usize..40).prop_map(|(start, n)| Step::Walk(start, n)),
        ]
    }

    /// Applies a step to the store and to the model, checking the store answers as the model.
    fn apply(
        store: &mut KeyStore,
        model: &mut BTreeSet<Vec<u8>>,
        step: Step,
    ) -> Result<(), TestCaseError> {
        let nth = |model: &BTreeSet<Vec<u8>>, at: &prop::sample::Index| {
            (!model.is_empty()).then(|| model.iter().nth(at.index(model.len())).cloned())
        };
        match step {
            Step::Insert(key) => prop_assert_eq!(store.insert(&key), model.insert(key)),
            Step::Remove(key) => prop_assert_eq!(store.remove(&key), model.remove(&key)),
            Step::Extend(at, more) => {
                let key = [nth(model, &at).flatten().unwrap_or_default(), more].concat();
                prop_assert_eq!(store.insert(&key), model.insert(key));
            }
            Step::RemovePresent(at) => {
                if let Some(Some(key)) = nth(model, &at) {
                    prop_assert!(store.remove(&key));
                    model.remove(&key);
                }
            }
            Step::RemoveEdge(at, last) => {
                let blocks: Vec<&Vec<u8>> = store.blocks.values().collect();
                if !blocks.is_empty() {
                    let block = blocks[at.index(blocks.len())];
                    let mut decoder = Decoder::default();
                    let mut keys = Vec::new();
                    while decoder.advance(block) {
                        keys.push(decoder.key.clone());
                    }
                    let key = if last { keys.last() } else { keys.first() };
                    let key = key.cloned().unwrap_or_default();
                    prop_assert!(model.remove(&key));
                    prop_assert!(store.remove(&key));
                }
            }
            Step::Contains(key) => prop_assert_eq!(store.contains(&key), model.contains(&key)),
            Step::Walk(start, n) => {
                let mut walked = Vec::new();
                store.walk_from(&start, |key| {
                    walked.push(key.to_vec());
                    match walked.len() < n {
                        true => ControlFlow::Continue(()),
                        false => ControlFlow::Break(()),
                    }
                });
                let expected: Vec<Vec<u8>> = model
                    .range::<[u8], _>((Bound::Included(&start[..]), Bound::Unbounded))
                    .take(n.max(1))
                    .cloned()
                    .collect();
                prop_assert_eq!(walked, expected);
            }
        }
        prop_assert_eq!(store.len(), model.len());
        Ok(())
    }

    proptest! {
        /// The same with keys that stress the search: long shared prefixes, keys that are
        /// prefixes of others, the empty key, bytes past 0x7f, removals at a block's edges and
        /// in runs that empty and merge blocks, and walks from anywhere. Every block stays
        /// under its first key, within the bound.
        #[test]
        fn behaves_as_a_sorted_set_on_tricky_keys(
            built in proptest::collection::btree_set(tricky_key(), 0..400),
            steps in proptest::collection::vec(step(), 0..1_000),
        ) {
            let mut model = built;
            let mut builder = Builder::default();
            for key in &model {
                builder.push(key);
            }
            let mut store = builder.finish();
            for step in steps {
                apply(&mut store, &mut model, step)?;
            }
            let expected: Vec<Vec<u8>> = model.iter().cloned().collect();
            prop_assert_eq!(store.keys(), expected);
            for (first, block) in &store.blocks {
                prop_assert_eq!(&**first, first_key(block));
                prop_assert!(!block.is_empty() && block.len() <= BLOCK_MAX);
            }
        }
    }

    #[test]
    fn blocks_stay_within_their_bounds() {
        let mut store = KeyStore::default();
        for id in (0..20_000u32).map(|i| i.wrapping_mul(2_654_435_761)) {
            store.insert(format!(":1:report:{id}:page").as_bytes());
        }
        assert_eq!(store.len(), 20_000);
        let spare: usize = store.blocks.values().map(|b| b.capacity() - b.len()).sum();
        let used: usize = store.blocks.values().map(Vec::len).sum();
        assert!(store.blocks.values().all(|b| b.len() <= BLOCK_MAX));
        assert!(spare * 4 <= used, "spare {spare} of {used} bytes");
        // Removing most keys merges the blocks back.
        let keys = store.keys();
        for (_, key) in keys.iter().enumerate().filter(|(i, _)| i % 10 != 0) {
            store.remove(key);
        }
        let blocks = store.blocks.len();
        let bytes: usize = store.blocks.values().map(Vec::len).sum();
        assert!(
            blocks <= bytes / BLOCK_MIN + 2,
            "{blocks} blocks for {bytes} bytes"
        );
    }

    #[test]
    fn sorted_keys_share_their_prefixes() {
        let mut builder = Builder::default();
        let keys: BTreeSet<String> = (0..10_000u32)
            .map(|i| {
                format!(
                    ":1:report:{}:{}:{:032x}",
                    i / 8,
                    i % 97,
                    u128::from(i) * 7_919
                )
            })
            .collect();
        let raw: usize = keys.iter().map(String::len).sum();
        for key in &keys {
            builder.push(key.as_bytes());
        }
        let store = builder.finish();
        let used: usize = store.blocks.values().map(Vec::capacity).sum();
        assert!(used * 10 < raw * 8, "{used} bytes for {raw} bytes of keys");
        assert!(store.blocks.values().all(|b| b.len() <= BLOCK_MAX));
        let expected: Vec<Vec<u8>> = keys.into_iter().map(String::into_bytes).collect();
        assert_eq!(store.keys(), expected);
    }
}
