//! Where the relay stands in the outbox (the `outbox_relay` row), and the rules that move it:
//! pure, no I/O. Every row with an id up to `through` has been published, or never will
//! exist, except the gaps: ranges of ids the relay went past while no row with them was
//! visible. A gap is a transaction that took its ids before rows that committed first (the
//! classic outbox pitfall with sequence ids), or one that rolled back. Each round looks the
//! gaps up, publishes what has filled them, and drops a gap only when nothing can fill it any
//! more. Why that is certain (see the migration `outbox_relay_position`):
//!
//! - an outbox row takes its xid before its id (`outbox_next_id()`), and ids are taken in time
//!   order, so a transaction holding an id below a visible row had its xid before the read
//!   that saw the id missing;
//! - right after that read the relay takes an xid of its own, the gap's `horizon`, greater
//!   than theirs;
//! - once the oldest running transaction (`pg_snapshot_xmin`) is newer than the horizon, they
//!   have all ended, and an id a later lookup still does not see was rolled back.

/// A range of ids (`lo..=hi`) the relay went past while no row with them was visible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub lo: i64,
    pub hi: i64,
    /// An xid (as a number) taken after the read that found the gap: every transaction that
    /// could still fill it is older.
    pub horizon: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    /// Every row with an id up to this has been published, or never will exist, except the
    /// gaps.
    pub through: i64,
    /// Disjoint, ascending, all at or below `through`.
    pub gaps: Vec<Gap>,
}

impl Position {
    /// The ranges a read skipped: between `through` and the highest of `ids` (ascending, each
    /// above `through`), the ids `ids` does not hold.
    pub fn missing(&self, ids: &[i64]) -> Vec<(i64, i64)> {
        let mut missing = Vec::new();
        let mut next = self.through + 1;
        for &id in ids {
            debug_assert!(id >= next, "ids ascending, above the position");
            if id > next {
                missing.push((next, id - 1));
            }
            next = id + 1;
        }
        missing
    }

    /// Moves past a read whose highest id is `last`, recording the ranges it skipped
    /// (`missing`, from [`Self::missing`]) as gaps with `horizon`.
    pub fn advance(&mut self, last: i64, missing: &[(i64, i64)], horizon: i64) {
        self.gaps
            .extend(missing.iter().map(|&(lo, hi)| Gap { lo, hi, horizon }));
        self.through = self.through.max(last);
    }

    /// After a lookup of the gaps: `found` (ascending) have become visible and go out with
    /// this round, so they leave their gaps; a gap whose horizon is older than `xmin` (the
    /// oldest transaction running when, or before, the lookup read) can never fill, and goes.
    pub fn fill(&mut self, found: &[i64], xmin: i64) {
        let mut found = found.iter().copied().peekable();
        let mut kept = Vec::with_capacity(self.gaps.len());
        for gap in self.gaps.drain(..) {
            let mut lo = gap.lo;
            while let Some(&id) = found.peek() {
                if id > gap.hi {
                    break;
                }
                found.next();
                if id < lo {
                    continue;
                }
                if id > lo {
                    kept.push(Gap {
                        hi: id - 1,
                        lo,
                        ..gap
                    });
                }
                lo = id + 1;
            }
            if lo <= gap.hi {
                kept.push(Gap { lo, ..gap });
            }
        }
        kept.retain(|g| g.horizon >= xmin);
        self.gaps = kept;
    }

    /// The gaps as the `outbox_relay` row stores them: lows, highs, horizons.
    pub fn gap_columns(&self) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
        let lo = self.gaps.iter().map(|g| g.lo).collect();
        let hi = self.gaps.iter().map(|g| g.hi).collect();
        let horizon = self.gaps.iter().map(|g| g.horizon).collect();
        (lo, hi, horizon)
    }

    /// The position from the `outbox_relay` row's columns.
    pub fn from_columns(through: i64, lo: &[i64], hi: &[i64], horizon: &[i64]) -> Position {
        let gaps = lo
            .iter()
            .zip(hi)
            .zip(horizon)
            .map(|((&lo, &hi), &horizon)| Gap { lo, hi, horizon })
            .collect();
        Position { through, gaps }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn gap(lo: i64, hi: i64, horizon: i64) -> Gap {
        Gap { lo, hi, horizon }
    }

    #[test]
    fn a_read_records_what_it_skipped() {
        let mut p = Position {
            through: 10,
            gaps: vec![],
        };
        let ids = [11, 14, 15, 20];
        let missing = p.missing(&ids);
        assert_eq!(missing, [(12, 13), (16, 19)]);
        p.advance(20, &missing, 7);
        assert_eq!(p.through, 20);
        assert_eq!(p.gaps, [gap(12, 13, 7), gap(16, 19, 7)]);
        assert!(p.missing(&[21, 22]).is_empty());
    }

    #[test]
    fn what_fills_a_gap_leaves_it_and_a_gap_past_its_horizon_goes() {
        let mut p = Position {
            through: 30,
            gaps: vec![gap(3, 3, 5), gap(10, 19, 8), gap(25, 26, 9)],
        };
        // 3 and 12, 19 and 25 have committed; the oldest running transaction is 6
        p.fill(&[3, 12, 19, 25], 6);
        assert_eq!(
            p.gaps,
            [gap(10, 11, 8), gap(13, 18, 8), gap(26, 26, 9)],
            "filled ids leave their gaps, the rest keep their horizon"
        );
        // every transaction older than 9 has ended: what did not fill never will
        p.fill(&[], 9);
        assert_eq!(p.gaps, [gap(26, 26, 9)]);
        p.fill(&[], 10);
        assert!(p.gaps.is_empty());
    }

    #[test]
    fn the_row_round_trips_its_gaps() {
        let p = Position {
            through: 9,
            gaps: vec![gap(1, 2, 3), gap(5, 5, 4)],
        };
        let (lo, hi, horizon) = p.gap_columns();
        assert_eq!(Position::from_columns(9, &lo, &hi, &horizon), p);
    }

    /// What a step of the model does.
    #[derive(Debug, Clone)]
    enum Step {
        /// A transaction of order `o` starts writing: it has its xid.
        Begin(usize),
        /// The `n`th running transaction takes an outbox id (its xid first, as
        /// `outbox_next_id()` does), once it holds its order's row; it may take several.
        TakeId(usize),
        Commit(usize),
        Abort(usize),
        /// A relay round reading at most this many fresh rows, from one snapshot.
        Round(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            2 => (0..3usize).prop_map(Step::Begin),
            4 => (0..8usize).prop_map(Step::TakeId),
            3 => (0..8usize).prop_map(Step::Commit),
            1 => (0..8usize).prop_map(Step::Abort),
            3 => (1..6usize).prop_map(Step::Round),
        ]
    }

    /// A running transaction.
    struct Txn {
        order: usize,
        ids: Vec<i64>,
    }

    /// Postgres as far as the relay can tell: xids and ids taken in time order, rows visible
    /// once their transaction commits, one order's writers one at a time (the order row's
    /// lock, held from its first write to its end).
    #[derive(Default)]
    struct Model {
        next_xid: i64,
        next_id: i64,
        running: BTreeMap<i64, Txn>,
        /// order -> the transaction holding its row.
        locked: BTreeMap<usize, i64>,
        committed: BTreeSet<i64>,
        aborted: BTreeSet<i64>,
        order_of: BTreeMap<i64, usize>,
        pos: Position,
        published: Vec<i64>,
    }

    impl Model {
        fn xid(&mut self) -> i64 {
            self.next_xid += 1;
            self.next_xid
        }

        fn nth(&self, n: usize) -> Option<i64> {
            let len = self.running.len();
            (len > 0).then(|| *self.running.keys().nth(n % len).expect("in range"))
        }

        fn take_id(&mut self, n: usize) {
            let Some(xid) = self.nth(n) else { return };
            let order = self.running[&xid].order;
            if *self.locked.entry(order).or_insert(xid) != xid {
                return; // waits for the order's row
            }
            self.next_id += 1;
            let id = self.next_id;
            self.order_of.insert(id, order);
            self.running.get_mut(&xid).expect("running").ids.push(id);
        }

        fn end(&mut self, n: usize, commit: bool) {
            if let Some(xid) = self.nth(n) {
                let t = self.running.remove(&xid).expect("running");
                if self.locked.get(&t.order) == Some(&xid) {
                    self.locked.remove(&t.order);
                }
                if commit {
                    self.committed.extend(t.ids);
                } else {
                    self.aborted.extend(t.ids);
                }
            }
        }

        /// One round as `read_batches` runs it: the oldest running transaction, then one
        /// snapshot for what filled the gaps and what is past the position.
        fn round(&mut self, batch: usize) {
            let xmin = self
                .running
                .keys()
                .next()
                .copied()
                .unwrap_or(self.next_xid + 1);
            let found: Vec<i64> = self
                .committed
                .iter()
                .copied()
                .filter(|id| self.pos.gaps.iter().any(|g| (g.lo..=g.hi).contains(id)))
                .collect();
            let fresh: Vec<i64> = self
                .committed
                .range(self.pos.through + 1..)
                .take(batch)
                .copied()
                .collect();
            self.pos.fill(&found, xmin);
            let missing = self.pos.missing(&fresh);
            let horizon = if missing.is_empty() { 0 } else { self.xid() };
            if let Some(&last) = fresh.last() {
                self.pos.advance(last, &missing, horizon);
            }
            self.published.extend(found);
            self.published.extend(fresh);
        }
    }

    proptest! {
        /// Whatever the interleaving of writers and relay rounds: every committed row is
        /// published exactly once, no rolled-back id is, each order's rows go out in the
        /// order written, and once the writers are done the gaps drain away.
        #[test]
        fn no_row_is_skipped_sent_twice_or_out_of_order_and_gaps_drain(steps in proptest::collection::vec(step(), 1..160)) {
            let mut m = Model::default();
            for s in steps {
                match s {
                    Step::Begin(order) => {
                        let xid = m.xid();
                        m.running.insert(xid, Txn { order, ids: Vec::new() });
                    }
                    Step::TakeId(n) => m.take_id(n),
                    Step::Commit(n) => m.end(n, true),
                    Step::Abort(n) => m.end(n, false),
                    Step::Round(batch) => m.round(batch),
                }
                for g in &m.pos.gaps {
                    prop_assert!(g.lo <= g.hi && g.hi <= m.pos.through);
                }
                // a gap is never dropped while a transaction holding one of its ids runs
                for t in m.running.values() {
                    for id in t.ids.iter().filter(|id| **id <= m.pos.through) {
                        prop_assert!(m.pos.gaps.iter().any(|g| (g.lo..=g.hi).contains(id)), "id {} lost its gap", id);
                    }
                }
            }
            while !m.running.is_empty() {
                m.end(0, true);
            }
            for _ in 0..(m.committed.len() + 3) {
                m.round(5);
            }
            let published: BTreeSet<i64> = m.published.iter().copied().collect();
            prop_assert_eq!(published.len(), m.published.len(), "sent once each");
            prop_assert_eq!(&published, &m.committed);
            prop_assert!(m.aborted.is_disjoint(&published));
            prop_assert!(m.pos.gaps.is_empty(), "gaps left: {:?}", m.pos.gaps);
            for order in 0..3 {
                let sent: Vec<i64> = m.published.iter().copied().filter(|id| m.order_of[id] == order).collect();
                let mut written = sent.clone();
                written.sort_unstable();
                prop_assert_eq!(sent, written, "order {}", order);
            }
        }
    }
}
