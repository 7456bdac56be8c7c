//! Stock pre-lock: the reference model of one SKU's ledger, and the sold-out marker.
//!
//! [`SkuLedger`] is what the Redis scripts implement (one SKU = one counter + its reservations)
//! and what Postgres can rebuild them from. It is executable documentation: the property tests
//! drive it through random histories, and the adapters' tests check the scripts agree with it.
//!
//! Invariant, after every operation: `available + Σ held == stock_real`, all non-negative.
//!
//! Claims: a "buy now" whose pre-lock answer was lost (a timeout) may have reserved units for
//! an order that will never be written. Each create *attempt* therefore registers itself as a
//! claimant of the reservation it made or found, and giving back such an orphan
//! ([`SkuLedger::withdraw`]) only removes that attempt's claim: the units go back only when no
//! claimant is left. A retry that found the reservation, or an order that exists
//! ([`Claim::Order`]: a paid or rebuilt reservation), keeps them, however late the orphan's
//! withdrawal arrives.
//!
//! Purchase limits ("limit N per person"): a SKU may cap the units one buyer holds, counting
//! live reservations and paid orders (a paid reservation that was deducted still counts: the
//! buyer bought it). The count goes up in the same step that takes the units and down when
//! units go back (release, lapse, withdrawal); it is checked in that step too, so concurrent
//! orders of one buyer can never pass the limit together ([`SkuLedger::reserve_for`]). An
//! existing reservation (a retry) is never refused by the limit, and neither is a payment
//! whose reservation is live. A payment that must take its units again (its pre-lock lapsed)
//! is refused them past the limit ([`SkuLedger::pin_for`], `OverLimit`: the money goes back):
//! else a buyer could hold one order's units, let it lapse, order the same units again and
//! then pay the lapsed one, holding twice the limit.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::SkuId;

/// Who holds a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Claim {
    /// One create attempt (a fresh id per try), whose order may or may not get written.
    Attempt(Uuid),
    /// An order that exists: the reservation was paid (pinned) or rebuilt from the ledger.
    /// Never withdrawn; only a release gives such units back.
    Order,
}

impl Claim {
    /// The claim as the Redis scripts store it.
    pub fn token(self) -> String {
        match self {
            Claim::Attempt(id) => id.simple().to_string(),
            Claim::Order => "order".to_owned(),
        }
    }
}

/// One create attempt as the pre-lock store records it: its claim, and the id of the
/// source-of-truth transaction that is to write the order (`txid`; Postgres' xid). The reserve
/// records a **pending confirmation** with it in the same atomic step, so a reservation whose
/// order never commits (the process that made it died, its transaction rolled back) is given
/// back within seconds by whoever checks the pending confirmations, not at the end of its
/// lifetime: once that transaction has ended, committed means an order holds the units, and
/// anything else means the attempt's claim is withdrawn (through the claims, so a retry or an
/// order that also claims the reservation keeps it). Without a `txid` the check can only look
/// for the order once the window has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    pub id: Uuid,
    pub txid: Option<i64>,
}

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
    /// The buyer already holds `holds` units of this SKU and `limit` is the most one buyer
    /// may hold: nothing changed.
    OverLimit { holds: u32, limit: u32 },
}

/// What pinning (the payment path: "confirm, or reserve again") did, in one atomic step that
/// no sold-out shortcut ever answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinOutcome {
    /// The live reservation is now permanent (idempotent: pinning twice says this twice).
    Pinned { quantity: u32 },
    /// It had lapsed or was gone: the units were taken again and pinned.
    Repinned { quantity: u32, available: i64 },
    /// It had lapsed or was gone, and the units are no longer there: nothing changed.
    Shortage { available: i64 },
    /// A live reservation with another quantity holds this id: nothing changed.
    Mismatch { held: u32 },
    /// It had lapsed or was gone, and taking the units again would take the buyer past the
    /// SKU's purchase limit (they hold `holds`): nothing changed.
    OverLimit { holds: u32, limit: u32 },
}

/// What withdrawing one attempt's claim did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WithdrawOutcome {
    /// That claim was the last: the units went back.
    Released { quantity: u32, available: i64 },
    /// Another attempt or an order still claims the reservation: it stays.
    StillClaimed,
    /// No such reservation.
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

#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    quantity: u32,
    expires_at_ms: ExpiresAtMs,
    claims: BTreeSet<Claim>,
    /// Whose purchase limit the units count against (none for reservations made without).
    buyer: Option<String>,
}

/// One SKU's stock, as the pre-lock sees it. Generic over the reservation id so tests can
/// use small integers.
#[derive(Debug, Clone)]
pub struct SkuLedger<K: Ord + Clone> {
    stock_real: i64,
    available: i64,
    held: BTreeMap<K, Held>,
    /// Most units one buyer may hold (live and paid); 0 = no limit.
    limit: u32,
    /// Units each buyer holds: live reservations and paid (deducted) ones.
    bought: BTreeMap<String, u32>,
}

impl<K: Ord + Clone> SkuLedger<K> {
    pub fn new(stock_real: i64) -> Self {
        assert!(stock_real >= 0, "stock_real must be non-negative");
        SkuLedger {
            stock_real,
            available: stock_real,
            held: BTreeMap::new(),
            limit: 0,
            bought: BTreeMap::new(),
        }
    }

    /// Sets the most units one buyer may hold (0 = no limit). Holdings above a lowered limit
    /// stay; only new reservations are refused.
    pub fn set_limit(&mut self, limit: u32) {
        self.limit = limit;
    }

    /// Units `buyer` holds: live reservations and paid ones.
    pub fn bought(&self, buyer: &str) -> u32 {
        self.bought.get(buyer).copied().unwrap_or(0)
    }

    fn count(&mut self, buyer: &str, quantity: u32) {
        *self.bought.entry(buyer.to_owned()).or_default() += quantity;
    }

    /// Units going back: they no longer count against their buyer.
    fn uncount(&mut self, h: &Held) {
        if let Some(b) = &h.buyer {
            if let Some(n) = self.bought.get_mut(b) {
                *n = n.saturating_sub(h.quantity);
                if *n == 0 {
                    self.bought.remove(b);
                }
            }
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
                self.uncount(&h);
            }
        }
        self.available += units;
        units
    }

    /// Takes `quantity` units for `id` on behalf of `claim`; if `id` already holds units,
    /// `claim` joins its claimants and nothing else changes.
    pub fn reserve(
        &mut self,
        id: K,
        quantity: u32,
        now_ms: i64,
        ttl_ms: i64,
        claim: Claim,
    ) -> ReserveOutcome {
        self.reserve_as(id, quantity, now_ms, ttl_ms, claim, None)
    }

    /// [`SkuLedger::reserve`] on behalf of `buyer`, within the SKU's purchase limit: a new
    /// reservation that would take the buyer past it is refused (`OverLimit`); an existing one
    /// (a retry) is reported as before.
    pub fn reserve_for(
        &mut self,
        id: K,
        quantity: u32,
        now_ms: i64,
        ttl_ms: i64,
        claim: Claim,
        buyer: &str,
    ) -> ReserveOutcome {
        self.reserve_as(id, quantity, now_ms, ttl_ms, claim, Some(buyer))
    }

    fn reserve_as(
        &mut self,
        id: K,
        quantity: u32,
        now_ms: i64,
        ttl_ms: i64,
        claim: Claim,
        buyer: Option<&str>,
    ) -> ReserveOutcome {
        assert!(quantity > 0, "quantity must be positive");
        self.reclaim_lapsed(now_ms);
        if let Some(h) = self.held.get_mut(&id) {
            h.claims.insert(claim);
            return ReserveOutcome::Existing {
                quantity: h.quantity,
                expires_at_ms: h.expires_at_ms,
            };
        }
        if let Some(b) = buyer {
            let holds = self.bought(b);
            if self.limit > 0 && u64::from(holds) + u64::from(quantity) > u64::from(self.limit) {
                return ReserveOutcome::OverLimit {
                    holds,
                    limit: self.limit,
                };
            }
        }
        if self.available < i64::from(quantity) {
            return ReserveOutcome::Shortage {
                available: self.available,
            };
        }
        self.available -= i64::from(quantity);
        let expires_at_ms = now_ms + ttl_ms;
        if let Some(b) = buyer {
            self.count(b, quantity);
        }
        self.held.insert(
            id,
            Held {
                quantity,
                expires_at_ms: Some(expires_at_ms),
                claims: BTreeSet::from([claim]),
                buyer: buyer.map(str::to_owned),
            },
        );
        ReserveOutcome::Reserved {
            expires_at_ms,
            available: self.available,
        }
    }

    /// The payment path: makes `id`'s live reservation permanent, or, when it lapsed or is
    /// gone, takes the units again and pins them. Either way an order now claims it.
    pub fn pin(&mut self, id: K, quantity: u32, now_ms: i64) -> PinOutcome {
        self.pin_as(id, quantity, now_ms, None)
    }

    /// [`SkuLedger::pin`] for `buyer`'s order: a live reservation is pinned whatever the
    /// limit; units taken again count against the buyer and are refused past the limit.
    pub fn pin_for(&mut self, id: K, quantity: u32, now_ms: i64, buyer: &str) -> PinOutcome {
        self.pin_as(id, quantity, now_ms, Some(buyer))
    }

    fn pin_as(&mut self, id: K, quantity: u32, now_ms: i64, buyer: Option<&str>) -> PinOutcome {
        assert!(quantity > 0, "quantity must be positive");
        self.reclaim_lapsed(now_ms);
        if let Some(h) = self.held.get_mut(&id) {
            if h.quantity != quantity {
                return PinOutcome::Mismatch { held: h.quantity };
            }
            h.expires_at_ms = None;
            h.claims.insert(Claim::Order);
            return PinOutcome::Pinned { quantity };
        }
        if let Some(b) = buyer {
            let holds = self.bought(b);
            if self.limit > 0 && u64::from(holds) + u64::from(quantity) > u64::from(self.limit) {
                return PinOutcome::OverLimit {
                    holds,
                    limit: self.limit,
                };
            }
        }
        if self.available < i64::from(quantity) {
            return PinOutcome::Shortage {
                available: self.available,
            };
        }
        self.available -= i64::from(quantity);
        if let Some(b) = buyer {
            self.count(b, quantity);
        }
        self.held.insert(
            id,
            Held {
                quantity,
                expires_at_ms: None,
                claims: BTreeSet::from([Claim::Order]),
                buyer: buyer.map(str::to_owned),
            },
        );
        PinOutcome::Repinned {
            quantity,
            available: self.available,
        }
    }

    /// Gives up `claim` on `id`'s reservation (a create attempt that wrote no order); the units
    /// go back only if no other claimant is left.
    pub fn withdraw(&mut self, id: &K, claim: Claim) -> WithdrawOutcome {
        let Some(h) = self.held.get_mut(id) else {
            return WithdrawOutcome::NotFound;
        };
        h.claims.remove(&claim);
        if !h.claims.is_empty() {
            return WithdrawOutcome::StillClaimed;
        }
        match self.release(id) {
            ReleaseOutcome::Released {
                quantity,
                available,
            } => WithdrawOutcome::Released {
                quantity,
                available,
            },
            ReleaseOutcome::NotFound => WithdrawOutcome::NotFound,
        }
    }

    pub fn release(&mut self, id: &K) -> ReleaseOutcome {
        match self.held.remove(id) {
            Some(h) => {
                self.available += i64::from(h.quantity);
                self.uncount(&h);
                ReleaseOutcome::Released {
                    quantity: h.quantity,
                    available: self.available,
                }
            }
            None => ReleaseOutcome::NotFound,
        }
    }

    /// The expiry job, after its order expired: gives `id`'s units back unless it is pinned.
    /// A late payment may pin the expired order's units again between the expiry and this
    /// call; those stay (`NotFound`: nothing to lapse).
    pub fn lapse(&mut self, id: &K) -> ReleaseOutcome {
        match self.held.get(id) {
            Some(h) if h.expires_at_ms.is_some() => self.release(id),
            _ => ReleaseOutcome::NotFound,
        }
    }

    /// The stock-deduction job: a pinned (paid) reservation's units leave `stock_real` for
    /// good. Returns false (and changes nothing) unless `id` is a pinned reservation.
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

/// A live reservation as the ledger (Postgres) has it, for a rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveHold<K> {
    pub id: K,
    pub quantity: u32,
    /// Paid (pinned): its money is kept, so it is never dropped.
    pub paid: bool,
}

/// What a rebuild writes back for one SKU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildPlan<K> {
    /// The counter: `stock_real - Σ kept`, never below zero.
    pub available: i64,
    /// Reservations written back, in the order given.
    pub keep: Vec<K>,
    /// Unpaid reservations that do not fit in `stock_real`: their orders must be expired.
    pub expire: Vec<K>,
    /// Paid units beyond `stock_real` (already sold twice: no rebuild can undo that; the
    /// caller reports it loudly).
    pub paid_over_stock: i64,
}

/// Rebuilding from Postgres never restores more than `stock_real`. A ledger can only be
/// over-committed after a defect or a hand edit, but the rebuild is where it must stop:
/// writing every reservation back would let each of them be paid. Paid reservations win;
/// unpaid ones are kept oldest first while they fit, and the newest ones lose.
/// `live` must be ordered oldest first.
pub fn plan_rebuild<K: Clone>(stock_real: i64, live: &[LiveHold<K>]) -> RebuildPlan<K> {
    let paid: i64 = live
        .iter()
        .filter(|h| h.paid)
        .map(|h| i64::from(h.quantity))
        .sum();
    let mut room = stock_real - paid;
    let paid_over_stock = (-room).max(0);
    room = room.max(0);
    let (mut keep, mut expire) = (Vec::new(), Vec::new());
    for h in live {
        if h.paid {
            keep.push(h.id.clone());
        } else if expire.is_empty() && i64::from(h.quantity) <= room {
            room -= i64::from(h.quantity);
            keep.push(h.id.clone());
        } else {
            // once one does not fit, every newer one loses too: "newest lose", never a newer
            // small order kept over an older one
            expire.push(h.id.clone());
        }
    }
    RebuildPlan {
        available: room,
        keep,
        expire,
        paid_over_stock,
    }
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

    const A: Claim = Claim::Attempt(Uuid::from_u128(1));

    #[test]
    fn reserve_is_idempotent_and_never_goes_below_zero() {
        let mut l = SkuLedger::new(3);
        assert_eq!(
            l.reserve(1, 2, 0, 100, A),
            ReserveOutcome::Reserved {
                expires_at_ms: 100,
                available: 1
            }
        );
        assert_eq!(
            l.reserve(1, 2, 10, 100, A),
            ReserveOutcome::Existing {
                quantity: 2,
                expires_at_ms: Some(100)
            }
        );
        assert_eq!(
            l.reserve(2, 2, 10, 100, A),
            ReserveOutcome::Shortage { available: 1 }
        );
        assert_eq!(l.available(), 1);
    }

    #[test]
    fn a_buyer_holds_at_most_the_limit_counting_live_and_paid_units() {
        let mut l = SkuLedger::new(100);
        l.set_limit(5);
        assert!(matches!(
            l.reserve_for(1, 3, 0, 100, A, "u"),
            ReserveOutcome::Reserved { .. }
        ));
        assert_eq!(
            l.reserve_for(2, 3, 0, 100, A, "u"),
            ReserveOutcome::OverLimit { holds: 3, limit: 5 }
        );
        // a retry of the existing reservation is never refused; another buyer is unaffected
        assert!(matches!(
            l.reserve_for(1, 3, 0, 100, A, "u"),
            ReserveOutcome::Existing { .. }
        ));
        assert!(matches!(
            l.reserve_for(3, 5, 0, 100, A, "v"),
            ReserveOutcome::Reserved { .. }
        ));
        // paid and deducted units still count
        assert_eq!(l.pin_for(1, 3, 0, "u"), PinOutcome::Pinned { quantity: 3 });
        assert!(l.deduct(&1));
        assert_eq!(l.bought("u"), 3);
        assert!(matches!(
            l.reserve_for(4, 2, 0, 100, A, "u"),
            ReserveOutcome::Reserved { .. }
        ));
        assert_eq!(l.bought("u"), 5);
        // units that go back (lapse, release, withdrawal) stop counting
        l.reclaim_lapsed(100);
        assert_eq!(l.bought("u"), 3);
        assert_eq!(l.release(&3), ReleaseOutcome::NotFound);
        assert_eq!(l.bought("v"), 0);
        // a payment that takes units again counts them, and is refused them past the limit
        assert_eq!(
            l.pin_for(5, 4, 200, "u"),
            PinOutcome::OverLimit { holds: 3, limit: 5 }
        );
        assert_eq!(l.bought("u"), 3);
        assert!(matches!(
            l.pin_for(5, 2, 200, "u"),
            PinOutcome::Repinned { .. }
        ));
        assert_eq!(l.bought("u"), 5);
    }

    #[test]
    fn lapsed_reservations_are_reclaimed_by_the_next_reserve() {
        let mut l = SkuLedger::new(2);
        l.reserve(1, 2, 0, 100, A);
        assert!(matches!(
            l.reserve(2, 1, 99, 100, A),
            ReserveOutcome::Shortage { .. }
        ));
        assert!(matches!(
            l.reserve(2, 1, 100, 100, A),
            ReserveOutcome::Reserved { available: 1, .. }
        ));
        assert_eq!(l.holds(&1), None);
    }

    #[test]
    fn pin_confirms_or_reserves_again() {
        let mut l = SkuLedger::new(5);
        l.reserve(1, 2, 0, 100, A);
        l.reserve(2, 1, 0, 100, A);
        assert_eq!(l.pin(1, 2, 50), PinOutcome::Pinned { quantity: 2 });
        assert_eq!(l.pin(1, 2, 500), PinOutcome::Pinned { quantity: 2 });
        // 2 lapsed: its unit is taken again at once, and pinned
        assert_eq!(
            l.pin(2, 1, 100),
            PinOutcome::Repinned {
                quantity: 1,
                available: 2
            }
        );
        assert_eq!(l.pin(1, 3, 0), PinOutcome::Mismatch { held: 2 });
        assert_eq!(l.pin(3, 3, 0), PinOutcome::Shortage { available: 2 });
        // the pinned reservation survives any amount of time
        l.reclaim_lapsed(i64::MAX);
        assert_eq!(l.holds(&1), Some((2, None)));
        assert_eq!(l.available(), 2);
        assert!(l.deduct(&1));
        assert_eq!((l.stock_real(), l.available(), l.held_units()), (3, 2, 1));
    }

    #[test]
    fn withdrawing_a_claim_frees_units_only_when_nobody_else_claims_them() {
        let b = Claim::Attempt(Uuid::from_u128(2));
        let mut l = SkuLedger::new(1);
        // the first attempt's answer is lost; a retry finds the reservation and claims it
        l.reserve(1, 1, 0, 100, A);
        l.reserve(1, 1, 0, 100, b);
        assert_eq!(l.withdraw(&1, A), WithdrawOutcome::StillClaimed);
        assert_eq!(l.withdraw(&1, A), WithdrawOutcome::StillClaimed);
        assert_eq!(l.available(), 0);
        assert_eq!(
            l.withdraw(&1, b),
            WithdrawOutcome::Released {
                quantity: 1,
                available: 1
            }
        );
        assert_eq!(l.withdraw(&1, b), WithdrawOutcome::NotFound);
        // a paid reservation is never withdrawn
        l.reserve(2, 1, 0, 100, A);
        l.pin(2, 1, 0);
        assert_eq!(l.withdraw(&2, A), WithdrawOutcome::StillClaimed);
        assert_eq!(l.holds(&2), Some((1, None)));
    }

    #[test]
    fn rebuild_plans_never_restore_more_than_stock() {
        let h = |id: u32, quantity: u32, paid: bool| LiveHold { id, quantity, paid };
        // (stock_real, live oldest first, available, keep, expire, paid over stock)
        let cases: Vec<(i64, Vec<LiveHold<u32>>, i64, Vec<u32>, Vec<u32>, i64)> = vec![
            (
                5,
                vec![h(1, 2, false), h(2, 1, true)],
                2,
                vec![1, 2],
                vec![],
                0,
            ),
            (
                1,
                vec![h(1, 1, false), h(2, 1, false)],
                0,
                vec![1],
                vec![2],
                0,
            ),
            // the paid one wins even though it is newer
            (
                1,
                vec![h(1, 1, false), h(2, 1, true)],
                0,
                vec![2],
                vec![1],
                0,
            ),
            // newest lose: 3 does not fit, so 4 (which would) loses too
            (
                4,
                vec![
                    h(1, 2, false),
                    h(2, 1, true),
                    h(3, 2, false),
                    h(4, 1, false),
                ],
                1,
                vec![1, 2],
                vec![3, 4],
                0,
            ),
            (
                1,
                vec![h(1, 2, true), h(2, 1, false)],
                0,
                vec![1],
                vec![2],
                1,
            ),
            (0, vec![], 0, vec![], vec![], 0),
        ];
        for (stock, live, available, keep, expire, over) in cases {
            let plan = plan_rebuild(stock, &live);
            assert_eq!(
                (plan.available, plan.keep, plan.expire, plan.paid_over_stock),
                (available, keep, expire, over),
                "stock {stock}, {live:?}"
            );
        }
    }

    #[test]
    fn lapse_gives_back_only_unpinned_units() {
        let mut l = SkuLedger::new(3);
        l.reserve(1, 1, 0, 100, A);
        l.reserve(2, 1, 0, 100, A);
        l.pin(2, 1, 0);
        assert_eq!(
            l.lapse(&1),
            ReleaseOutcome::Released {
                quantity: 1,
                available: 2
            }
        );
        assert_eq!(
            l.lapse(&2),
            ReleaseOutcome::NotFound,
            "paid: it keeps its unit"
        );
        assert_eq!(l.lapse(&3), ReleaseOutcome::NotFound);
        assert!(!l.deduct(&1));
        assert!(l.deduct(&2));
        assert_eq!((l.stock_real(), l.available(), l.held_units()), (2, 2, 0));
    }

    #[test]
    fn restock_refuses_to_undercut_held_units() {
        let mut l = SkuLedger::new(5);
        l.reserve(1, 4, 0, 100, A);
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
