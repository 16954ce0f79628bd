//! The index's sorted set of key names, packed into small byte blocks: about a dozen bytes per
//! key on top of its name (its length, spare capacity, a share of its block's fixed cost), where
//! a `BTreeSet<Box<[u8]>>` spends ~40 (a heap allocation per key, with its header and size-class
//! rounding, plus a 16-byte tree slot and the tree nodes' slack).
//!
//! Keys live in blocks of at most [`BLOCK_MAX`] bytes, each key as its length (LEB128) then its
//! bytes, in order within a block; the blocks are kept in a `BTreeMap` by their first key. A
//! block's buffer grows by an eighth at a time and is split in two when full, so its spare
//! capacity stays small whatever the order keys arrive in (the seed's `SCAN` order is random).

use std::collections::btree_map::{self, BTreeMap};
use std::ops::Bound;

/// A block is split past this many bytes: its keys are scanned linearly on every look-up (a few
/// dozen of the ~50-byte names of a typical cache), while the per-block cost (its map slot and
/// first key) is shared by as many keys.
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

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        self.block_of(key)
            .is_some_and(|(_, block)| matches!(find(block, key), Found::At(_)))
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
            splice_in(&mut block, 0, key);
            let tail = split(&mut block);
            self.put(key.into(), block);
            if let Some(tail) = tail {
                self.put(first_key(&tail).into(), tail);
            }
            self.len += 1;
            return true;
        };
        let Found::Before(at) = find(block, key) else {
            return false;
        };
        splice_in(block, at, key);
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
        let Found::At(at) = find(block, key) else {
            return false;
        };
        block.drain(at..at + encoded_len(key.len()));
        self.len -= 1;
        if at > 0 && block.len() >= BLOCK_MIN {
            return true;
        }
        // Its first key changed, or it is nearly empty: the block is taken out, merged with a
        // neighbour when both fit in one (keys are in order across blocks: the later block's
        // bytes simply follow), and put back under its first key.
        let first = first.clone();
        let Some(mut block) = self.blocks.remove(&first) else {
            return true;
        };
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
                return true;
            }
        }
        if !block.is_empty() {
            let first = match first_key(&block) == &*first {
                true => first,
                false => first_key(&block).into(),
            };
            self.put(first, block);
        }
        true
    }

    /// The keys from the first at or after `start`, in order.
    pub fn from<'a>(&'a self, start: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        let blocks: btree_map::Range<'a, Box<[u8]>, Vec<u8>> = match self.block_of(start) {
            Some((first, _)) => self
                .blocks
                .range::<[u8], _>((Bound::Included(first), Bound::Unbounded)),
            None => self.blocks.range::<[u8], _>(..),
        };
        blocks
            .flat_map(|(_, block)| Entries { rest: block })
            .skip_while(move |key| *key < start)
    }

    /// Every key, in order.
    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.blocks
            .values()
            .flat_map(|block| Entries { rest: block })
    }

    /// The block `key` falls in: the last whose first key is not greater. `None` when `key` is
    /// before every block.
    fn block_of(&self, key: &[u8]) -> Option<(&[u8], &[u8])> {
        self.blocks
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .map(|(first, block)| (&**first, block.as_slice()))
    }

    /// Stores a block, its buffer trimmed to a small spare capacity.
    fn put(&mut self, first: Box<[u8]>, mut block: Vec<u8>) {
        if block.capacity() > block.len() + block.len() / 4 {
            block.shrink_to(block.len() + block.len() / 8);
        }
        self.blocks.insert(first, block);
    }
}

/// Where a key is, or would be inserted, in a block: a byte offset.
enum Found {
    At(usize),
    Before(usize),
}

fn find(block: &[u8], key: &[u8]) -> Found {
    let mut offset = 0;
    let mut rest = Entries { rest: block };
    while let Some(entry) = rest.next() {
        match entry.cmp(key) {
            std::cmp::Ordering::Less => offset = block.len() - rest.rest.len(),
            std::cmp::Ordering::Equal => return Found::At(offset),
            std::cmp::Ordering::Greater => return Found::Before(offset),
        }
    }
    Found::Before(block.len())
}

/// Inserts `key`'s entry at byte `at`, growing the buffer by an eighth at most beyond the need
/// (a doubling `Vec` would leave up to half of every block spare).
fn splice_in(block: &mut Vec<u8>, at: usize, key: &[u8]) {
    let mut header = [0u8; 10];
    let mut used = 0;
    let mut length = key.len();
    loop {
        let byte = (length & 0x7f) as u8;
        length >>= 7;
        if length == 0 {
            header[used] = byte;
            used += 1;
            break;
        }
        header[used] = byte | 0x80;
        used += 1;
    }
    let added = used + key.len();
    let end = block.len();
    if end + added > block.capacity() {
        block.reserve_exact(added.max(end / 8));
    }
    block.resize(end + added, 0);
    block.copy_within(at..end, at + added);
    block[at..at + used].copy_from_slice(&header[..used]);
    block[at + used..at + added].copy_from_slice(key);
}

/// Splits a block past [`BLOCK_MAX`] at the entry boundary nearest its middle; returns the upper
/// half (`None` for a block within the bound, or of one key too long for any block).
fn split(block: &mut Vec<u8>) -> Option<Vec<u8>> {
    if block.len() <= BLOCK_MAX {
        return None;
    }
    let half = block.len() / 2;
    let mut entries = Entries { rest: block };
    let mut at = 0;
    while at < half && entries.next().is_some() {
        at = block.len() - entries.rest.len();
    }
    if at == 0 || at >= block.len() {
        return None;
    }
    let tail = block[at..].to_vec();
    block.truncate(at);
    block.shrink_to(at + at / 8);
    Some(tail)
}

fn first_key(block: &[u8]) -> &[u8] {
    Entries { rest: block }.next().unwrap_or_default()
}

/// Bytes a key of `len` bytes takes in a block.
fn encoded_len(len: usize) -> usize {
    let mut prefix = 1;
    let mut rest = len >> 7;
    while rest > 0 {
        prefix += 1;
        rest >>= 7;
    }
    prefix + len
}

/// The keys of a block's bytes, in order.
struct Entries<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Entries<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let mut length = 0usize;
        let mut shift = 0;
        let mut used = 0;
        for &byte in self.rest {
            used += 1;
            length |= usize::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                let key = self.rest.get(used..used + length)?;
                self.rest = &self.rest[used + length..];
                return Some(key);
            }
            shift += 7;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    proptest! {
        /// The store answers as a `BTreeSet` does for any sequence of inserts and removes,
        /// including keys long enough to need a multi-byte length and enough keys to split and
        /// merge blocks.
        #[test]
        fn behaves_as_a_sorted_set(
            operations in proptest::collection::vec(
                (any::<bool>(), 0u16..400, 0usize..300),
                0..3_000,
            )
        ) {
            let mut store = KeyStore::default();
            let mut model = BTreeSet::new();
            for (add, id, pad) in operations {
                let key = format!(":1:report:{id}:{}", "x".repeat(pad % 7 * (pad / 7 % 3 + 1)))
                    .into_bytes();
                let key = if pad == 299 { [key, vec![b'y'; 200]].concat() } else { key };
                if add {
                    prop_assert_eq!(store.insert(&key), model.insert(key.clone()));
                } else {
                    prop_assert_eq!(store.remove(&key), model.remove(&key));
                }
                prop_assert_eq!(store.len(), model.len());
            }
            let keys: Vec<&[u8]> = store.iter().collect();
            let expected: Vec<&[u8]> = model.iter().map(Vec::as_slice).collect();
            prop_assert_eq!(keys, expected);
            for start in [&b":1:report:1"[..], b":1:report:35", b"", b"\xff"] {
                let keys: Vec<&[u8]> = store.from(start).collect();
                let expected: Vec<&[u8]> = model
                    .range::<[u8], _>((Bound::Included(start), Bound::Unbounded))
                    .map(Vec::as_slice)
                    .collect();
                prop_assert_eq!(keys, expected);
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
        let keys: Vec<Vec<u8>> = store.iter().map(<[u8]>::to_vec).collect();
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
}
