//! The seed's `SCAN`, split into lanes that each walk their own share of the cursor's range with a
//! request of their own in flight, so Redis has the next `SCAN` queued while the worker reads a
//! reply: with one chain of requests it sat idle for the round trip and the worker's share of
//! every batch.
//!
//! A share is an interval of positions where a server's cursor is one reversed bucket index
//! ([`CursorOrder::ReversedBuckets`]), as in the sweep ([`crate::sweep`]): a `SCAN` covers every
//! position from its cursor's up to the returned cursor's, whatever the table's size, so lanes
//! that each go from their share's first cursor until a reply's cursor reaches the next share (or
//! the pass ends) have together returned every key that was there throughout. Where the order is
//! anything else, one lane from cursor 0.

use crate::redis_nodes::CursorOrder;

/// `SCAN`s in flight during a seed, each `COUNT` [`super::SEED_SCAN_COUNT`]: as the sweep found,
/// four keep Redis busy and eight do no better.
pub const SEED_LANES: usize = 4;

/// The lanes of one seed.
pub struct SeedLanes {
    order: CursorOrder,
    lanes: Vec<Lane>,
}

struct Lane {
    /// The cursor of the lane's next `SCAN`.
    cursor: u64,
    /// Position where the next lane's share begins; `None` for the last lane, which runs to the
    /// end of the pass.
    end: Option<u64>,
    in_flight: bool,
    done: bool,
}

impl SeedLanes {
    pub fn new(order: CursorOrder, lanes: usize) -> SeedLanes {
        let count = match order {
            CursorOrder::ReversedBuckets => lanes.max(1),
            CursorOrder::SlotThenReversedBuckets | CursorOrder::Unknown => 1,
        };
        let boundary = |share: usize| (((share as u128) << 64) / count as u128) as u64;
        let lanes = (0..count)
            .map(|share| Lane {
                cursor: boundary(share).reverse_bits(),
                end: (share + 1 < count).then(|| boundary(share + 1)),
                in_flight: false,
                done: false,
            })
            .collect();
        SeedLanes { order, lanes }
    }

    /// A lane ready for its next `SCAN` (marked in flight): its index and cursor.
    pub fn next_idle(&mut self) -> Option<(usize, u64)> {
        let (index, lane) = self
            .lanes
            .iter_mut()
            .enumerate()
            .find(|(_, lane)| !lane.in_flight && !lane.done)?;
        lane.in_flight = true;
        Some((index, lane.cursor))
    }

    /// The lane's `SCAN` returned `next`.
    pub fn advanced(&mut self, lane: usize, next: u64) {
        let order = self.order;
        let Some(lane) = self.lanes.get_mut(lane) else {
            return;
        };
        lane.in_flight = false;
        let past_share = match (lane.end, order.position(next)) {
            (Some(end), Some(position)) => position >= end,
            _ => false,
        };
        lane.done = next == 0 || past_share;
        lane.cursor = next;
    }

    /// Every lane has covered its share.
    pub fn finished(&self) -> bool {
        self.lanes.iter().all(|lane| lane.done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_split_the_reversed_cursor_and_stop_at_the_next_share() {
        let mut lanes = SeedLanes::new(CursorOrder::ReversedBuckets, 4);
        let starts: Vec<(usize, u64)> = std::iter::from_fn(|| lanes.next_idle()).collect();
        let expected: Vec<(usize, u64)> = (0..4)
            .map(|lane| (lane, ((lane as u64) << 62).reverse_bits()))
            .collect();
        assert_eq!(starts, expected);
        // Lane 0 reaches lane 1's first position: done; lane 3 runs to cursor 0.
        lanes.advanced(0, (1u64 << 62).reverse_bits());
        lanes.advanced(1, (1u64 << 62 | 5).reverse_bits());
        lanes.advanced(2, (3u64 << 62).reverse_bits());
        lanes.advanced(3, (3u64 << 62 | 9).reverse_bits());
        assert!(!lanes.finished());
        assert_eq!(
            lanes.next_idle(),
            Some((1, (1u64 << 62 | 5).reverse_bits()))
        );
        lanes.advanced(1, (2u64 << 62).reverse_bits());
        assert_eq!(
            lanes.next_idle(),
            Some((3, (3u64 << 62 | 9).reverse_bits()))
        );
        assert!(!lanes.finished());
        lanes.advanced(3, 0);
        assert!(lanes.finished());
    }

    #[test]
    fn one_lane_from_zero_where_the_order_is_not_known() {
        let mut lanes = SeedLanes::new(CursorOrder::Unknown, 4);
        assert_eq!(lanes.next_idle(), Some((0, 0)));
        assert_eq!(lanes.next_idle(), None);
        lanes.advanced(0, 12345);
        assert!(!lanes.finished());
        lanes.next_idle();
        lanes.advanced(0, 0);
        assert!(lanes.finished());
    }
}
