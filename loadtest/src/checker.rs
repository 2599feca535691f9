//! Per-subscriber delivery accounting: which offsets arrived, which were skipped, which came
//! twice or late. Pure bookkeeping with no clock and no I/O, so it is cheap per message and unit
//! tested below; the workload owns the sockets and the timing.
//!
//! Offsets are contiguous per channel, so a subscriber that joined at offset `start` must see
//! `start+1, start+2, ..` exactly once each and in that order. Anything else is counted.

use std::ops::{Add, Range};

use serde::Serialize;

/// What one delivered offset meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The next offset expected.
    InOrder,
    /// Ahead of the next offset expected: this many offsets were skipped (for now).
    Skipped(u64),
    /// An offset skipped earlier, arriving late: out of order.
    Late,
    /// Already seen, or at or below the starting offset.
    Duplicate,
}

/// One subscriber's view of a channel's offsets.
#[derive(Debug, Clone)]
pub struct Checker {
    /// The next offset expected in order.
    next: u64,
    /// Skipped offsets not seen since; sorted, disjoint, non-empty ranges.
    missing: Vec<Range<u64>>,
    received: u64,
    duplicated: u64,
    out_of_order: u64,
    start: u64,
}

impl Checker {
    /// A subscriber positioned at `start` (the offset its subscribe reply carried).
    pub fn new(start: u64) -> Self {
        Self { next: start + 1, missing: Vec::new(), received: 0, duplicated: 0, out_of_order: 0, start }
    }

    /// Accounts for one delivered `offset`.
    pub fn record(&mut self, offset: u64) -> Seen {
        self.received += 1;
        if offset == self.next {
            self.next += 1;
            Seen::InOrder
        } else if offset > self.next {
            self.missing.push(self.next..offset);
            let skipped = offset - self.next;
            self.next = offset + 1;
            Seen::Skipped(skipped)
        } else if self.fill(offset) {
            self.out_of_order += 1;
            Seen::Late
        } else {
            self.duplicated += 1;
            Seen::Duplicate
        }
    }

    /// Removes `offset` from the missing ranges; false if it was not missing.
    fn fill(&mut self, offset: u64) -> bool {
        let i = self.missing.partition_point(|r| r.end <= offset);
        let Some(r) = self.missing.get_mut(i).filter(|r| r.start <= offset) else { return false };
        let (start, end) = (r.start, r.end);
        if start + 1 == end {
            self.missing.remove(i);
        } else if offset == start {
            r.start += 1;
        } else if offset + 1 == end {
            r.end -= 1;
        } else {
            r.end = offset;
            self.missing.insert(i + 1, offset + 1..end);
        }
        true
    }

    /// The offset this subscriber joined at.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// The highest offset seen: where a resubscribe resumes (`since`).
    pub fn last(&self) -> u64 {
        self.next - 1
    }

    /// Whether the subscriber has seen `target` (the last published offset) or beyond.
    pub fn reached(&self, target: u64) -> bool {
        self.next > target
    }

    /// The final counts, given the last published offset: whatever is still missing, or was
    /// never reached, is lost.
    pub fn tally(&self, target: u64) -> Tally {
        let gaps: u64 = self.missing.iter().map(|r| r.end - r.start).sum();
        Tally {
            subscribers: 1,
            expected: target.saturating_sub(self.start),
            received: self.received,
            lost: gaps + target.saturating_sub(self.last()),
            duplicated: self.duplicated,
            out_of_order: self.out_of_order,
        }
    }
}

/// Delivery counts, for one subscriber or summed over all of them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub subscribers: u64,
    /// Deliveries that should have happened: published offsets after each starting point.
    pub expected: u64,
    /// Message frames received, duplicates included.
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
}

impl Add for Tally {
    type Output = Tally;

    fn add(self, o: Tally) -> Tally {
        Tally {
            subscribers: self.subscribers + o.subscribers,
            expected: self.expected + o.expected,
            received: self.received + o.received,
            lost: self.lost + o.lost,
            duplicated: self.duplicated + o.duplicated,
            out_of_order: self.out_of_order + o.out_of_order,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(start: u64, offsets: &[u64]) -> Checker {
        let mut c = Checker::new(start);
        for &o in offsets {
            c.record(o);
        }
        c
    }

    #[test]
    fn contiguous_delivery_is_clean() {
        let c = feed(10, &[11, 12, 13]);
        assert!(c.reached(13));
        assert_eq!(c.last(), 13);
        let t = c.tally(13);
        assert_eq!((t.expected, t.received), (3, 3));
        assert_eq!((t.lost, t.duplicated, t.out_of_order), (0, 0, 0));
    }

    #[test]
    fn a_gap_never_filled_is_lost() {
        let mut c = Checker::new(0);
        assert_eq!(c.record(1), Seen::InOrder);
        assert_eq!(c.record(4), Seen::Skipped(2));
        assert!(c.reached(4));
        let t = c.tally(4);
        assert_eq!((t.lost, t.out_of_order, t.duplicated), (2, 0, 0));
    }

    #[test]
    fn a_filled_gap_is_out_of_order_not_lost() {
        let mut c = feed(0, &[1, 5]);
        assert_eq!(c.record(3), Seen::Late);
        assert_eq!(c.record(2), Seen::Late);
        assert_eq!(c.record(4), Seen::Late);
        let t = c.tally(5);
        assert_eq!((t.lost, t.out_of_order, t.duplicated, t.received), (0, 3, 0, 5));
    }

    #[test]
    fn filling_the_middle_of_a_gap_splits_it() {
        let mut c = feed(0, &[10]);
        assert_eq!(c.record(5), Seen::Late);
        assert_eq!(c.missing, vec![1..5, 6..10]);
        assert_eq!(c.record(5), Seen::Duplicate);
        assert_eq!(c.tally(10).lost, 8);
    }

    #[test]
    fn repeats_and_offsets_before_the_start_are_duplicates() {
        let mut c = feed(7, &[8, 9]);
        assert_eq!(c.record(9), Seen::Duplicate);
        assert_eq!(c.record(7), Seen::Duplicate);
        assert_eq!(c.record(2), Seen::Duplicate);
        let t = c.tally(9);
        assert_eq!((t.duplicated, t.lost, t.received), (3, 0, 5));
    }

    #[test]
    fn a_subscriber_that_stopped_early_lost_the_rest() {
        let c = feed(100, &[101, 102]);
        assert!(!c.reached(110));
        let t = c.tally(110);
        assert_eq!((t.expected, t.lost), (10, 8));
    }

    #[test]
    fn tallies_add_up() {
        let sum = feed(0, &[1, 2]).tally(3) + feed(0, &[1, 1, 2, 3]).tally(3);
        assert_eq!(sum, Tally { subscribers: 2, expected: 6, received: 6, lost: 1, duplicated: 1, out_of_order: 0 });
    }
}
