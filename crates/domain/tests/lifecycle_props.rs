//! Property test: random histories of buyers, payments, lapses, cancels and deductions, run
//! through the domain rules exactly as the services sequence them. Whatever happens, no order
//! reaches a state outside the transition table, stock never goes negative, the ledger always
//! balances, and no unit is sold twice. Buyers whose pre-lock answer was lost retry, and their
//! orphaned attempts withdraw at any later moment: a live order never loses its units to that.

use domain::order::{check_transition, OrderState, Versioned};
use domain::payment::{resolve_payment, stock_step, StockStep};
use domain::stock::{Claim, PinOutcome, ReserveOutcome, SkuLedger};
use proptest::prelude::*;
use uuid::Uuid;

#[derive(Debug, Clone)]
enum Ev {
    Buy(u32),
    /// A "buy now" whose pre-lock ran but whose answer was lost: no order.
    LostBuy(u32),
    /// The buyer of lost attempt `k` retries with the same key.
    Retry(usize),
    /// Lost attempt `k` gives back its orphaned pre-lock (as late as it likes).
    Withdraw(usize),
    Pay(usize),
    Cancel(usize),
    /// The expiry job's transaction (PENDING -> EXPIRED)...
    ExpiryJob(usize),
    /// ...and, any time later, its Redis step for the `k`-th expired order.
    ExpiryRedis(usize),
    Deduct(usize),
    Redeem(usize),
    Restock(i64),
    Advance(i64),
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        (1u32..4).prop_map(Ev::Buy),
        (1u32..4).prop_map(Ev::LostBuy),
        (0usize..6).prop_map(Ev::Retry),
        (0usize..6).prop_map(Ev::Withdraw),
        (0usize..12).prop_map(Ev::Pay),
        (0usize..12).prop_map(Ev::Cancel),
        (0usize..12).prop_map(Ev::ExpiryJob),
        (0usize..12).prop_map(Ev::ExpiryRedis),
        (0usize..12).prop_map(Ev::Deduct),
        (0usize..12).prop_map(Ev::Redeem),
        (0i64..12).prop_map(Ev::Restock),
        (0i64..60).prop_map(Ev::Advance),
    ]
}

struct Order {
    /// Reservation id (= order id).
    rid: usize,
    row: Versioned,
    qty: u32,
    expires_at: i64,
    money_kept: bool,
}

const TTL: i64 = 30;

fn step(o: &mut Order, to: OrderState) {
    o.row = o
        .row
        .next(to)
        .expect("the use case asked for an illegal transition");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn no_history_reaches_an_illegal_state_or_negative_stock(
        initial in 0i64..8,
        events in proptest::collection::vec(ev(), 1..80),
    ) {
        let mut ledger: SkuLedger<usize> = SkuLedger::new(initial);
        let mut orders: Vec<Order> = Vec::new();
        // lost attempts: (reservation id, quantity, the attempt's claim)
        let mut lost: Vec<(usize, u32, Claim)> = Vec::new();
        let mut next_rid = 0usize;
        let mut expired: Vec<usize> = Vec::new();
        let mut next_claim = 0u128;
        let mut claim = || { next_claim += 1; Claim::Attempt(Uuid::from_u128(next_claim)) };
        let mut now = 0i64;
        let mut stock_ever = initial; // every unit that was ever put on sale
        let mut deducted = 0i64;

        for e in events {
            match e {
                Ev::Buy(q) => {
                    let rid = next_rid;
                    next_rid += 1;
                    if let ReserveOutcome::Reserved { expires_at_ms, .. } = ledger.reserve(rid, q, now, TTL, claim()) {
                        orders.push(Order { rid, row: Versioned::initial(), qty: q, expires_at: expires_at_ms, money_kept: false });
                    }
                }
                Ev::LostBuy(q) => {
                    let rid = next_rid;
                    next_rid += 1;
                    let c = claim();
                    ledger.reserve(rid, q, now, TTL, c);
                    lost.push((rid, q, c));
                }
                Ev::Retry(k) => {
                    let Some(&(rid, q, _)) = lost.get(k) else { continue };
                    if orders.iter().any(|o| o.rid == rid) { continue }
                    let expires_at = match ledger.reserve(rid, q, now, TTL, claim()) {
                        ReserveOutcome::Reserved { expires_at_ms, .. } => expires_at_ms,
                        ReserveOutcome::Existing { expires_at_ms, .. } => expires_at_ms.unwrap_or(now),
                        ReserveOutcome::Shortage { .. } | ReserveOutcome::OverLimit { .. } => continue,
                    };
                    orders.push(Order { rid, row: Versioned::initial(), qty: q, expires_at, money_kept: false });
                }
                Ev::Withdraw(k) => {
                    let Some(&(rid, _, c)) = lost.get(k) else { continue };
                    ledger.withdraw(&rid, c);
                }
                Ev::Pay(i) => {
                    let Some(o) = orders.get_mut(i) else { continue };
                    let held = match stock_step(o.row.state) {
                        StockStep::None => false,
                        StockStep::Pin => matches!(
                            ledger.pin(o.rid, o.qty, now),
                            PinOutcome::Pinned { .. } | PinOutcome::Repinned { .. }
                        ),
                    };
                    let plan = resolve_payment(o.row.state, held);
                    for to in plan.path { step(o, to); }
                    if plan.keep_money {
                        prop_assert!(!o.money_kept, "one order kept two payments");
                        o.money_kept = true;
                    }
                }
                Ev::Cancel(i) => {
                    let Some(o) = orders.get_mut(i) else { continue };
                    if check_transition(o.row.state, OrderState::Cancelled).is_ok() {
                        step(o, OrderState::Cancelled);
                        ledger.release(&o.rid);
                    }
                }
                Ev::ExpiryJob(i) => {
                    let Some(o) = orders.get_mut(i) else { continue };
                    if o.row.state == OrderState::Pending && now >= o.expires_at {
                        step(o, OrderState::Expired);
                        expired.push(o.rid);
                    }
                }
                Ev::ExpiryRedis(k) => {
                    // after its commit, possibly after a late payment pinned the units again
                    let Some(&rid) = expired.get(k) else { continue };
                    ledger.lapse(&rid);
                }
                Ev::Deduct(i) => {
                    let Some(o) = orders.get_mut(i) else { continue };
                    if o.row.state == OrderState::Paid {
                        prop_assert!(ledger.deduct(&o.rid), "a paid order's units were not held");
                        deducted += i64::from(o.qty);
                        step(o, OrderState::Confirmed);
                    }
                }
                Ev::Redeem(i) => {
                    let Some(o) = orders.get_mut(i) else { continue };
                    if o.row.state == OrderState::Confirmed {
                        step(o, OrderState::Redeemed);
                    }
                }
                Ev::Restock(add) => {
                    let target = ledger.stock_real() + add;
                    if ledger.restock(target).is_ok() { stock_ever += add; }
                }
                Ev::Advance(ms) => now += ms,
            }

            prop_assert!(ledger.available() >= 0);
            prop_assert!(ledger.stock_real() >= 0);
            prop_assert_eq!(ledger.available() + ledger.held_units(), ledger.stock_real());
            let sold: i64 = orders.iter().filter(|o| o.row.state.is_paid()).map(|o| i64::from(o.qty)).sum();
            prop_assert!(sold <= stock_ever, "oversold: {} sold of {}", sold, stock_ever);
            prop_assert_eq!(stock_ever - deducted, ledger.stock_real());
            for (i, o) in orders.iter().enumerate() {
                prop_assert_eq!(o.money_kept, o.row.state.is_paid());
                if o.row.state == OrderState::Paid {
                    prop_assert_eq!(ledger.holds(&o.rid), Some((o.qty, None)), "paid order {} lost its units", i);
                }
                if o.row.state == OrderState::Pending && now < o.expires_at {
                    prop_assert!(ledger.holds(&o.rid).is_some(), "live order {} lost its pre-lock", i);
                }
            }
        }
    }
}
