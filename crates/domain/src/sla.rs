//! The SLA-boundary trigger (SPEC.md section 5, paper 2.1): compensation polls faster only
//! when callbacks are slow **and** a transaction is visibly missing events. Either alone is
//! noise (a slow minute with nothing lost, or one lost callback on a healthy day) and keeps
//! the normal poll.
//!
//! - Slow: the p99 of callback latencies seen in the last `window` (30 s) has stayed above
//!   `latency_p99` (200 ms) for at least `window`. It stops being slow the moment the p99
//!   drops back under (or no latency is left in the window).
//! - Missing: some transaction was seen, within the last `window`, with at least
//!   `missing_events` (4) of its events not there. A sighting older than the window is
//!   forgotten: the evidence is recent or it is none.
//!
//! Pure and clock-driven: callers pass the time of each observation (milliseconds, any epoch),
//! so tests move time instead of sleeping.

use std::collections::{HashMap, VecDeque};

/// How compensation polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollMode {
    Normal,
    Fast,
}

#[derive(Debug, Clone)]
pub struct SlaTrigger {
    window_ms: i64,
    latency_p99_ms: i64,
    missing_events: u32,
    /// (seen at, latency), oldest first, within the window.
    latencies: VecDeque<(i64, i64)>,
    /// Since when the windowed p99 has been above the threshold, if it is.
    slow_since: Option<i64>,
    /// transaction -> (events missing, seen at)
    missing: HashMap<String, (u32, i64)>,
}

impl Default for SlaTrigger {
    /// The paper's boundary: p99 > 200 ms for 30 s, and 4 events of one transaction missing.
    fn default() -> Self {
        SlaTrigger::new(30_000, 200, 4)
    }
}

impl SlaTrigger {
    pub fn new(window_ms: i64, latency_p99_ms: i64, missing_events: u32) -> Self {
        SlaTrigger {
            window_ms,
            latency_p99_ms,
            missing_events,
            latencies: VecDeque::new(),
            slow_since: None,
            missing: HashMap::new(),
        }
    }

    /// A callback arrived `latency_ms` after the provider says the payment happened.
    pub fn observe_latency(&mut self, now_ms: i64, latency_ms: i64) {
        self.latencies.push_back((now_ms, latency_ms));
        self.tick(now_ms);
    }

    /// At `now_ms`, `count` events of transaction `txn` are missing (0 forgets it).
    pub fn set_missing(&mut self, now_ms: i64, txn: &str, count: u32) {
        if count == 0 {
            self.missing.remove(txn);
        } else {
            self.missing.insert(txn.to_owned(), (count, now_ms));
        }
    }

    /// The windowed p99 latency at `now_ms`, if any callback was seen in the window.
    pub fn p99_ms(&mut self, now_ms: i64) -> Option<i64> {
        while self
            .latencies
            .front()
            .is_some_and(|(at, _)| *at <= now_ms - self.window_ms)
        {
            self.latencies.pop_front();
        }
        if self.latencies.is_empty() {
            return None;
        }
        let mut l: Vec<i64> = self.latencies.iter().map(|(_, l)| *l).collect();
        l.sort_unstable();
        // nearest rank: the smallest value with at least 99 % of the samples at or below it
        let rank = (l.len() * 99).div_ceil(100);
        Some(l[rank.saturating_sub(1)])
    }

    /// Re-evaluates "slow" at `now_ms` (call it on every observation and before deciding).
    fn tick(&mut self, now_ms: i64) {
        let above = self.p99_ms(now_ms).is_some_and(|p| p > self.latency_p99_ms);
        match (above, self.slow_since) {
            (true, None) => self.slow_since = Some(now_ms),
            (false, Some(_)) => self.slow_since = None,
            _ => {}
        }
    }

    /// The poll mode at `now_ms`: fast only while both conditions hold.
    pub fn mode(&mut self, now_ms: i64) -> PollMode {
        self.tick(now_ms);
        let slow = self
            .slow_since
            .is_some_and(|since| now_ms - since >= self.window_ms);
        let window = self.window_ms;
        self.missing.retain(|_, (_, at)| *at > now_ms - window);
        let missing = self
            .missing
            .values()
            .any(|(n, _)| *n >= self.missing_events);
        if slow && missing {
            PollMode::Fast
        } else {
            PollMode::Normal
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Callbacks every 100 ms from `from` to `to` (ms), each `latency` late.
    fn feed(t: &mut SlaTrigger, from: i64, to: i64, latency: i64) {
        let mut at = from;
        while at <= to {
            t.observe_latency(at, latency);
            at += 100;
        }
    }

    #[test]
    fn fast_polling_needs_slow_callbacks_and_a_transaction_missing_events() {
        // (slow callbacks?, events missing from one transaction, expected mode)
        let quadrants = [
            (false, 0, PollMode::Normal),
            (true, 0, PollMode::Normal),
            (false, 4, PollMode::Normal),
            (true, 4, PollMode::Fast),
            (true, 3, PollMode::Normal), // three missing is not four
        ];
        for (slow, missing, expected) in quadrants {
            let mut t = SlaTrigger::default();
            feed(&mut t, 0, 40_000, if slow { 450 } else { 80 });
            t.set_missing(40_000, "pay-1", missing);
            t.set_missing(40_000, "pay-2", 1);
            assert_eq!(t.mode(40_000), expected, "slow {slow}, missing {missing}");
        }
    }

    #[test]
    fn slow_means_for_thirty_seconds_and_the_way_back_is_immediate() {
        let mut t = SlaTrigger::default();
        feed(&mut t, 0, 10_000, 80);
        t.set_missing(39_000, "pay-1", 5);
        feed(&mut t, 10_100, 39_900, 500);
        // the p99 went over at 10.2 s (two slow samples in 103): not yet 30 s of it
        assert_eq!(t.mode(39_900), PollMode::Normal);
        feed(&mut t, 40_000, 40_200, 500);
        assert_eq!(t.mode(40_200), PollMode::Fast);
        // back to normal: callbacks fast again for a whole window...
        feed(&mut t, 40_300, 70_300, 50);
        t.set_missing(70_000, "pay-1", 5);
        assert_eq!(t.mode(70_300), PollMode::Normal);
        // ...or, while still slow, the transaction's events turn up
        feed(&mut t, 70_400, 110_000, 900);
        t.set_missing(109_000, "pay-1", 5);
        assert_eq!(t.mode(110_000), PollMode::Fast);
        t.set_missing(110_000, "pay-1", 0);
        assert_eq!(t.mode(110_000), PollMode::Normal);
        // ...or the sighting of missing events is a window old
        t.set_missing(110_000, "pay-2", 4);
        feed(&mut t, 110_100, 140_100, 900);
        assert_eq!(t.mode(139_900), PollMode::Fast);
        assert_eq!(t.mode(140_000), PollMode::Normal);
        // with no callbacks at all in the window, nothing is slow
        t.set_missing(200_000, "pay-9", 7);
        assert_eq!(t.mode(200_000), PollMode::Normal);
        assert_eq!(t.p99_ms(200_000), None);
    }

    #[test]
    fn p99_is_the_nearest_rank() {
        let mut t = SlaTrigger::default();
        for (i, l) in (1..=200).enumerate() {
            t.observe_latency(i as i64, l);
        }
        assert_eq!(t.p99_ms(200), Some(198));
    }
}
