//! Stock pre-lock: the reference model of one SKU's ledger, and the sold-out marker.
//!
//! [`SkuLedger`] is what the Redis scripts implement (one SKU = one counter + its reservations)
//! and what Postgres can rebuild them from. It is executable documentation: the property tests
//! drive it through random histories, and the adapters' tests check the scripts agree with it.
//!
//! Invariant, after every operation: `available + Σ held == stock_real`, all non-negative.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::SkuId;

/// When a reservation lapses, in milliseconds since the Unix epoch; `None` once confirmed
/// (a paid reservation never lapses; it waits for the stock-deduction job).
pub type ExpiresAtMs = Option<i64>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveOutcome {
    /// Units taken from `available`; the reservation lapses at `expires_at_ms`.
    Reserved { expires_at_ms: i64, available: i64 },
    /// The reservation id is already held: nothing changed. Reports what it holds.
    Existing {
        quantity: u32,
        expires_at_ms: ExpiresAtMs,
    },
    /// Not enough units; nothing changed.
    Shortage { available: i64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfirmOutcome {
    /// The reservation is now permanent (idempotent: confirming twice says this twice).
    Confirmed { quantity: u32 },
    /// It had lapsed; its units went back to `available`. The caller must reserve again.
    Lapsed,
    /// No such reservation (released, reclaimed, or never made).
    NotFound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    Released {
        quantity: u32,
        available: i64,
    },
    /// Nothing to release: releasing is idempotent.
    NotFound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    quantity: u32,
    expires_at_ms: ExpiresAtMs,
}

/// One SKU's stock, as the pre-lock sees it. Generic over the reservation id so tests can
/// use small integers.
#[derive(Debug, Clone)]
pub struct SkuLedger<K: Ord + Clone> {
    stock_real: i64,
    available: i64,
    held: BTreeMap<K, Held>,
}

impl<K: Ord + Clone> SkuLedger<K> {
    pub fn new(stock_real: i64) -> Self {
        assert!(stock_real >= 0, "stock_real must be non-negative");
        SkuLedger {
            stock_real,
            available: stock_real,
            held: BTreeMap::new(),
        }
    }

    pub fn stock_real(&self) -> i64 {
        self.stock_real
    }
    pub fn available(&self) -> i64 {
        self.available
    }
    pub fn held_units(&self) -> i64 {
        self.held.values().map(|h| i64::from(h.quantity)).sum()
    }
    pub fn holds(&self, id: &K) -> Option<(u32, ExpiresAtMs)> {
        self.held.get(id).map(|h| (h.quantity, h.expires_at_ms))
    }

    /// Returns lapsed reservations' units to `available` (the reserve script does this lazily,
    /// so expiry never depends on a timer having fired).
    pub fn reclaim_lapsed(&mut self, now_ms: i64) -> i64 {
        let lapsed: Vec<K> = self
            .held
            .iter()
            .filter(|(_, h)| matches!(h.expires_at_ms, Some(e) if e <= now_ms))
            .map(|(k, _)| k.clone())
            .collect();
        let mut units = 0;
        for k in lapsed {
            if let Some(h) = self.held.remove(&k) {
                units += i64::from(h.quantity);
            }
        }
        self.available += units;
        units
    }

    pub fn reserve(&mut self, id: K, quantity: u32, now_ms: i64, ttl_ms: i64) -> ReserveOutcome {
        assert!(quantity > 0, "quantity must be positive");
        self.reclaim_lapsed(now_ms);
        if let Some(h) = self.held.get(&id) {
            return ReserveOutcome::Existing {
                quantity: h.quantity,
                expires_at_ms: h.expires_at_ms,
            };
        }
        if self.available < i64::from(quantity) {
            return ReserveOutcome::Shortage {
                available: self.available,
            };
        }
        self.available -= i64::from(quantity);
        let expires_at_ms = now_ms + ttl_ms;
        self.held.insert(
            id,
            Held {
                quantity,
                expires_at_ms: Some(expires_at_ms),
            },
        );
        ReserveOutcome::Reserved {
            expires_at_ms,
            available: self.available,
        }
    }

    pub fn confirm(&mut self, id: &K, now_ms: i64) -> ConfirmOutcome {
        let Some(h) = self.held.get_mut(id) else {
            return ConfirmOutcome::NotFound;
        };
        match h.expires_at_ms {
            Some(e) if e <= now_ms => {
                let q = h.quantity;
                self.held.remove(id);
                self.available += i64::from(q);
                ConfirmOutcome::Lapsed
            }
            _ => {
                h.expires_at_ms = None;
                ConfirmOutcome::Confirmed {
                    quantity: h.quantity,
                }
            }
        }
    }

    pub fn release(&mut self, id: &K) -> ReleaseOutcome {
        match self.held.remove(id) {
            Some(h) => {
                self.available += i64::from(h.quantity);
                ReleaseOutcome::Released {
                    quantity: h.quantity,
                    available: self.available,
                }
            }
            None => ReleaseOutcome::NotFound,
        }
    }

    /// The stock-deduction job: a confirmed reservation's units leave `stock_real` for good.
    /// Returns false (and changes nothing) unless `id` is a confirmed reservation.
    pub fn deduct(&mut self, id: &K) -> bool {
        match self.held.get(id) {
            Some(h) if h.expires_at_ms.is_none() => {
                self.stock_real -= i64::from(h.quantity);
                self.held.remove(id);
                true
            }
            _ => false,
        }
    }

    /// Operators set the real stock. Refused when it would fall below what is held.
    pub fn restock(&mut self, stock_real: i64) -> Result<(), StockBelowHeld> {
        let held = self.held_units();
        check_restock(stock_real, held)?;
        self.stock_real = stock_real;
        self.available = stock_real - held;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stock cannot go below the {held} units held by live reservations")]
pub struct StockBelowHeld {
    pub held: i64,
}

/// Operators may set real stock to anything not below the units live reservations hold.
pub fn check_restock(stock_real: i64, held: i64) -> Result<(), StockBelowHeld> {
    if stock_real < held {
        Err(StockBelowHeld { held })
    } else {
        Ok(())
    }
}

/// Rebuilding from Postgres: what the counter must be, given the real stock and the units
/// that live reservations hold. `None` means the ledger is over-committed (should never
/// happen; the caller logs it loudly and pre-locks nothing more).
pub fn rebuilt_available(stock_real: i64, live_held: i64) -> Option<i64> {
    let a = stock_real - live_held;
    (a >= 0).then_some(a)
}

/// The paper's "memory-level pre-lock pool": once a SKU is known empty, requests for it are
/// answered in-process for a short while without touching Redis or Postgres.
///
/// A mark only ever causes a false "sold out" (never an oversell), for at most `ttl`: marks
/// expire on their own, so releases on other instances and lazily reclaimed reservations
/// are seen within `ttl`. This instance clears a mark at once on its own releases and
/// restocks.
#[derive(Debug)]
pub struct SoldOutMarker {
    ttl: Duration,
    marks: Mutex<HashMap<SkuId, Instant>>,
}

impl SoldOutMarker {
    /// More marks than this and expired ones are swept: the marker is for a handful of hot
    /// SKUs, and must not grow without bound under a scan of the catalogue.
    const SWEEP_AT: usize = 4096;

    pub fn new(ttl: Duration) -> Self {
        SoldOutMarker {
            ttl,
            marks: Mutex::new(HashMap::new()),
        }
    }

    pub fn is_sold_out(&self, sku: &SkuId, now: Instant) -> bool {
        if self.ttl.is_zero() {
            return false;
        }
        let marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        marks.get(sku).is_some_and(|until| now < *until)
    }

    pub fn mark(&self, sku: &SkuId, now: Instant) {
        if self.ttl.is_zero() {
            return;
        }
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        if marks.len() >= Self::SWEEP_AT {
            marks.retain(|_, until| now < *until);
        }
        marks.insert(sku.clone(), now + self.ttl);
    }

    pub fn clear(&self, sku: &SkuId) {
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        marks.remove(sku);
    }

    pub fn clear_all(&self) {
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        marks.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_is_idempotent_and_never_goes_below_zero() {
        let mut l = SkuLedger::new(3);
        assert_eq!(
            l.reserve(1, 2, 0, 100),
            ReserveOutcome::Reserved {
                expires_at_ms: 100,
                available: 1
            }
        );
        assert_eq!(
            l.reserve(1, 2, 10, 100),
            ReserveOutcome::Existing {
                quantity: 2,
                expires_at_ms: Some(100)
            }
        );
        assert_eq!(
            l.reserve(2, 2, 10, 100),
            ReserveOutcome::Shortage { available: 1 }
        );
        assert_eq!(l.available(), 1);
    }

    #[test]
    fn lapsed_reservations_are_reclaimed_by_the_next_reserve() {
        let mut l = SkuLedger::new(2);
        l.reserve(1, 2, 0, 100);
        assert!(matches!(
            l.reserve(2, 1, 99, 100),
            ReserveOutcome::Shortage { .. }
        ));
        assert!(matches!(
            l.reserve(2, 1, 100, 100),
            ReserveOutcome::Reserved { available: 1, .. }
        ));
        assert_eq!(l.holds(&1), None);
    }

    #[test]
    fn confirm_pins_or_reports_lapse() {
        let mut l = SkuLedger::new(5);
        l.reserve(1, 2, 0, 100);
        l.reserve(2, 1, 0, 100);
        assert_eq!(l.confirm(&1, 50), ConfirmOutcome::Confirmed { quantity: 2 });
        assert_eq!(
            l.confirm(&1, 500),
            ConfirmOutcome::Confirmed { quantity: 2 }
        );
        assert_eq!(l.confirm(&2, 100), ConfirmOutcome::Lapsed);
        assert_eq!(l.confirm(&3, 0), ConfirmOutcome::NotFound);
        // the pinned reservation survives any amount of time
        l.reclaim_lapsed(i64::MAX);
        assert_eq!(l.holds(&1), Some((2, None)));
        assert_eq!(l.available(), 3);
        assert!(l.deduct(&1));
        assert_eq!((l.stock_real(), l.available(), l.held_units()), (3, 3, 0));
    }

    #[test]
    fn restock_refuses_to_undercut_held_units() {
        let mut l = SkuLedger::new(5);
        l.reserve(1, 4, 0, 100);
        assert_eq!(l.restock(3), Err(StockBelowHeld { held: 4 }));
        l.restock(10).unwrap();
        assert_eq!(l.available(), 6);
    }

    #[test]
    fn sold_out_marks_expire_and_clear() {
        let m = SoldOutMarker::new(Duration::from_millis(100));
        let sku = SkuId::parse("hot").unwrap();
        let t0 = Instant::now();
        assert!(!m.is_sold_out(&sku, t0));
        m.mark(&sku, t0);
        assert!(m.is_sold_out(&sku, t0 + Duration::from_millis(99)));
        assert!(!m.is_sold_out(&sku, t0 + Duration::from_millis(100)));
        m.mark(&sku, t0);
        m.clear(&sku);
        assert!(!m.is_sold_out(&sku, t0));
        let off = SoldOutMarker::new(Duration::ZERO);
        off.mark(&sku, t0);
        assert!(!off.is_sold_out(&sku, t0));
    }
}
