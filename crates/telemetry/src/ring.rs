//! A fixed-capacity ring of 1-second points, one slot per wall-clock second.
//!
//! Slots are addressed by the second they cover (`sec % capacity`), so no timestamp is
//! stored per point: a second with no report is a slot whose state is
//! [`ScopeState::Missing`]. Columns are kept apart (struct of arrays) so a point costs
//! exactly [`POINT_BYTES`] and a query copies only what it returns.

use serde::{Deserialize, Serialize};

/// Memory per point: bytes (u64) + packets (u32) + drops (u32) + rate (f32) + state (u8).
pub const POINT_BYTES: usize = 8 + 4 + 4 + 4 + 1;

/// A scope's state as the agent reported it (what its datapath enforces).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum ScopeState {
    /// No report covered this second.
    Missing = 0,
    /// No lease for the scope (the floor applies).
    None = 1,
    Pending = 2,
    Active = 3,
    Revoked = 4,
    Expired = 5,
    Exhausted = 6,
}

impl ScopeState {
    fn from_u8(v: u8) -> ScopeState {
        match v {
            1 => ScopeState::None,
            2 => ScopeState::Pending,
            3 => ScopeState::Active,
            4 => ScopeState::Revoked,
            5 => ScopeState::Expired,
            6 => ScopeState::Exhausted,
            _ => ScopeState::Missing,
        }
    }

    /// Parses the agent's wire spelling; unknown words are `None` (so a newer agent's
    /// state never breaks an older controller).
    pub fn parse(s: &str) -> ScopeState {
        match s {
            "pending" => ScopeState::Pending,
            "active" => ScopeState::Active,
            "revoked" => ScopeState::Revoked,
            "expired" => ScopeState::Expired,
            "exhausted" => ScopeState::Exhausted,
            _ => ScopeState::None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ScopeState::Missing => "missing",
            ScopeState::None => "none",
            ScopeState::Pending => "pending",
            ScopeState::Active => "active",
            ScopeState::Revoked => "revoked",
            ScopeState::Expired => "expired",
            ScopeState::Exhausted => "exhausted",
        }
    }
}

/// One second of one scope.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    /// Start of the second, unix ms.
    pub t_ms: u64,
    /// Bytes counted in this second.
    pub bytes: u64,
    pub packets: u32,
    pub dropped_packets: u32,
    /// Measured rate, bits/s, from the agent's own sample times.
    pub rate_bps: f32,
    pub state: ScopeState,
}

/// The ring itself. `newest` is the last second written; slots between an older write and
/// `newest` that no report covered are cleared to `Missing` when time moves past them.
#[derive(Debug)]
pub struct Ring {
    bytes: Box<[u64]>,
    packets: Box<[u32]>,
    drops: Box<[u32]>,
    rate: Box<[f32]>,
    state: Box<[u8]>,
    /// The newest second written (unix seconds); `None` until the first write.
    newest: Option<u64>,
}

impl Ring {
    /// A ring of `capacity` seconds (at least 1), allocated in full now.
    pub fn new(capacity: usize) -> Ring {
        let cap = capacity.max(1);
        Ring {
            bytes: vec![0; cap].into_boxed_slice(),
            packets: vec![0; cap].into_boxed_slice(),
            drops: vec![0; cap].into_boxed_slice(),
            rate: vec![0.0; cap].into_boxed_slice(),
            state: vec![0; cap].into_boxed_slice(),
            newest: None,
        }
    }

    pub fn capacity(&self) -> usize {
        self.state.len()
    }

    /// Heap bytes held by this ring.
    pub fn memory_bytes(&self) -> usize {
        self.capacity() * POINT_BYTES
    }

    pub fn newest_sec(&self) -> Option<u64> {
        self.newest
    }

    fn slot(&self, sec: u64) -> usize {
        (sec % self.capacity() as u64) as usize
    }

    fn clear(&mut self, i: usize) {
        self.bytes[i] = 0;
        self.packets[i] = 0;
        self.drops[i] = 0;
        self.rate[i] = 0.0;
        self.state[i] = ScopeState::Missing as u8;
    }

    /// Adds a report's deltas to second `sec`. A second older than the newest is added to
    /// its slot if the ring still holds it, and ignored otherwise (returns false). Two
    /// reports in one second add their deltas; the rate and state are the later report's.
    pub fn record(
        &mut self,
        sec: u64,
        bytes: u64,
        packets: u32,
        drops: u32,
        rate_bps: f32,
        state: ScopeState,
    ) -> bool {
        let cap = self.capacity() as u64;
        match self.newest {
            Some(n) if sec > n => {
                // Clear the skipped seconds (at most a whole ring's worth) and the new one.
                let first = (n + 1).max(sec.saturating_sub(cap - 1));
                for s in first..=sec {
                    let i = self.slot(s);
                    self.clear(i);
                }
                self.newest = Some(sec);
            }
            Some(n) if n - sec >= cap => return false,
            Some(_) => {}
            None => {
                let i = self.slot(sec);
                self.clear(i);
                self.newest = Some(sec);
            }
        }
        let i = self.slot(sec);
        self.bytes[i] = self.bytes[i].saturating_add(bytes);
        self.packets[i] = self.packets[i].saturating_add(packets);
        self.drops[i] = self.drops[i].saturating_add(drops);
        self.rate[i] = rate_bps;
        self.state[i] = state as u8;
        true
    }

    /// The points with a report in `[from_sec, to_sec]` (inclusive), oldest first.
    pub fn range(&self, from_sec: u64, to_sec: u64) -> Vec<Point> {
        let Some(newest) = self.newest else {
            return Vec::new();
        };
        let cap = self.capacity() as u64;
        let oldest = newest.saturating_sub(cap - 1);
        let from = from_sec.max(oldest);
        let to = to_sec.min(newest);
        let mut out = Vec::new();
        if from > to {
            return out;
        }
        for s in from..=to {
            let i = self.slot(s);
            let state = ScopeState::from_u8(self.state[i]);
            if state == ScopeState::Missing {
                continue;
            }
            out.push(Point {
                t_ms: s * 1000,
                bytes: self.bytes[i],
                packets: self.packets[i],
                dropped_packets: self.drops[i],
                rate_bps: self.rate[i],
                state,
            });
        }
        out
    }

    /// The newest point, if any.
    pub fn latest(&self) -> Option<Point> {
        let n = self.newest?;
        self.range(n, n).pop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_reads_back_in_order() {
        let mut r = Ring::new(10);
        assert!(r.record(100, 10, 1, 0, 80.0, ScopeState::Active));
        assert!(r.record(101, 20, 2, 1, 160.0, ScopeState::Active));
        let pts = r.range(0, u64::MAX);
        assert_eq!(pts.len(), 2);
        assert_eq!(pts[0].t_ms, 100_000);
        assert_eq!(pts[1].bytes, 20);
        assert_eq!(pts[1].dropped_packets, 1);
        assert_eq!(r.latest().map(|p| p.rate_bps), Some(160.0));
    }

    #[test]
    fn gaps_are_missing_not_stale_data() {
        let mut r = Ring::new(4);
        for s in 0..4 {
            r.record(s, 1, 1, 0, 8.0, ScopeState::Active);
        }
        // Jump ahead by 2: seconds 4 (skipped) and 5 overwrite slots 0 and 1.
        r.record(5, 7, 1, 0, 56.0, ScopeState::Revoked);
        let pts = r.range(0, 10);
        let secs: Vec<u64> = pts.iter().map(|p| p.t_ms / 1000).collect();
        assert_eq!(secs, vec![2, 3, 5]);
        assert_eq!(pts[2].state, ScopeState::Revoked);
    }

    #[test]
    fn a_jump_beyond_the_ring_clears_everything() {
        let mut r = Ring::new(3);
        r.record(1, 1, 1, 0, 8.0, ScopeState::Active);
        r.record(2, 1, 1, 0, 8.0, ScopeState::Active);
        r.record(1000, 5, 1, 0, 40.0, ScopeState::Active);
        let pts = r.range(0, 2000);
        assert_eq!(pts.len(), 1);
        assert_eq!(pts[0].t_ms, 1_000_000);
    }

    #[test]
    fn two_reports_in_one_second_add_up() {
        let mut r = Ring::new(5);
        r.record(7, 100, 1, 0, 800.0, ScopeState::Active);
        r.record(7, 50, 1, 2, 400.0, ScopeState::Exhausted);
        let p = r.latest().expect("point");
        assert_eq!((p.bytes, p.packets, p.dropped_packets), (150, 2, 2));
        assert_eq!(p.rate_bps, 400.0);
        assert_eq!(p.state, ScopeState::Exhausted);
    }

    #[test]
    fn late_reports_fill_held_seconds_only() {
        let mut r = Ring::new(5);
        r.record(10, 1, 1, 0, 8.0, ScopeState::Active);
        assert!(r.record(8, 2, 1, 0, 16.0, ScopeState::Active));
        assert!(!r.record(5, 2, 1, 0, 16.0, ScopeState::Active));
        assert_eq!(r.range(0, 20).len(), 2);
    }

    #[test]
    fn memory_is_fixed_by_capacity() {
        let mut r = Ring::new(3600);
        let before = r.memory_bytes();
        for s in 0..10_000 {
            r.record(s, 1, 1, 0, 8.0, ScopeState::Active);
        }
        assert_eq!(r.memory_bytes(), before);
        assert_eq!(before, 3600 * POINT_BYTES);
        assert_eq!(r.range(0, u64::MAX).len(), 3600);
    }
}
