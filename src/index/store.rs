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

use std::collections::BTreeMap;
use std::ops::{Bound, ControlFlow, Range};

/// A block is split past this many bytes: its keys are decoded linearly on every look-up (a few
/// dozen keys), while the per-block cost (its map slot, first key and allocation) is shared by as
/// many keys.
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
        remove_at(block, &at);
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
    /// nothing: the later block's bytes simply follow).
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
    pub fn walk_from(&self, start: &[u8], mut visit: impl FnMut(&[u8]) -> ControlFlow<()>) {
        let blocks = match self.block_of(start) {
            Some((first, _)) => self
                .blocks
                .range::<[u8], _>((Bound::Included(first), Bound::Unbounded)),
            None => self.blocks.range::<[u8], _>(..),
        };
        let mut decoder = Decoder::default();
        for (_, block) in blocks {
            decoder.restart();
            while decoder.advance(block) {
                if decoder.key.as_slice() < start {
                    continue;
                }
                if visit(&decoder.key).is_break() {
                    return;
                }
            }
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

/// Where a key is, or would go, in a block.
struct Location {
    /// The bytes of the first entry whose key is not less than the key (empty at the block's
    /// end).
    entry: Range<usize>,
    /// That entry's key is the key.
    found: bool,
    /// The key of the entry before it (empty at the block's start).
    before: Vec<u8>,
    /// The key of `entry` (empty at the block's end).
    current: Vec<u8>,
}

fn locate(block: &[u8], key: &[u8]) -> Location {
    let mut decoder = Decoder::default();
    let mut before = Vec::new();
    loop {
        let start = decoder.at;
        if !decoder.advance(block) {
            return Location {
                entry: block.len()..block.len(),
                found: false,
                before,
                current: Vec::new(),
            };
        }
        match decoder.key.as_slice().cmp(key) {
            std::cmp::Ordering::Less => before.clone_from(&decoder.key),
            order => {
                return Location {
                    entry: start..decoder.at,
                    found: order.is_eq(),
                    before,
                    current: decoder.key,
                }
            }
        }
    }
}

/// Inserts `key` where [`locate`] said it goes: its entry, then the entry after it re-encoded
/// against it.
fn insert_at(block: &mut Vec<u8>, at: &Location, key: &[u8]) {
    let mut bytes = Vec::with_capacity(key.len() + at.current.len() + 8);
    encode_entry(&mut bytes, &at.before, key);
    if !at.entry.is_empty() {
        encode_entry(&mut bytes, key, &at.current);
    }
    splice(block, at.entry.clone(), &bytes);
}

/// Removes the key [`locate`] found: the entry after it is re-encoded against the one before.
fn remove_at(block: &mut Vec<u8>, at: &Location) {
    let mut decoder = Decoder {
        at: at.entry.end,
        key: at.current.clone(),
    };
    let mut bytes = Vec::new();
    let mut end = at.entry.end;
    if decoder.advance(block) {
        encode_entry(&mut bytes, &at.before, &decoder.key);
        end = decoder.at;
    }
    splice(block, at.entry.start..end, &bytes);
}

/// Replaces `range` of the block with `bytes`, growing the buffer by an eighth at most beyond the
/// need (a doubling `Vec` would leave up to half of every block spare).
fn splice(block: &mut Vec<u8>, range: Range<usize>, bytes: &[u8]) {
    let needed = (block.len() + bytes.len()).saturating_sub(range.len());
    if needed > block.capacity() {
        block.reserve_exact((needed - block.len()).max(block.len() / 8));
    }
    block.splice(range, bytes.iter().copied());
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

/// A block's first key: its first entry shares nothing, so its bytes are the key.
fn first_key(block: &[u8]) -> &[u8] {
    let mut rest = block;
    let (Some(_shared), Some(length)) = (read_varint(&mut rest), read_varint(&mut rest)) else {
        return &[];
    };
    rest.get(..length).unwrap_or_default()
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
        let Some(mut rest) = bytes.get(self.at..) else {
            return false;
        };
        let before = rest.len();
        let (Some(shared), Some(length)) = (read_varint(&mut rest), read_varint(&mut rest)) else {
            return false;
        };
        let Some(tail) = rest.get(..length) else {
            return false;
        };
        self.key.truncate(shared);
        self.key.extend_from_slice(tail);
        self.at += before - rest.len() + length;
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
