//! Property test: random histories of buyers, payments, lapses, cancels and deductions, run
//! through the domain rules exactly as the services sequence them. Whatever happens, no order
//! reaches a state outside the transition table, stock never goes negative, the ledger always
//! balances, and no unit is sold twice.

use domain::order::{check_transition, OrderState, Versioned};
use domain::payment::{resolve_payment, stock_step, StockStep};
use domain::stock::{ConfirmOutcome, ReserveOutcome, SkuLedger};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Ev {
    Buy(u32),
    Pay(usize),
    Cancel(usize),
    ExpiryJob(usize),
    Deduct(usize),
    Redeem(usize),
    Restock(i64),
    Advance(i64),
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        (1u32..4).prop_map(Ev::Buy),
        (0usize..12).prop_map(Ev::Pay),
        (0usize..12).prop_map(Ev::Cancel),
        (0usize..12).prop_map(Ev::ExpiryJob),
        (0usize..12).prop_map(Ev::Deduct),
        (0usize..12).prop_map(Ev::Redeem),
        (0i64..12).prop_map(Ev::Restock),
        (0i64..60).prop_map(Ev::Advance),
    ]
}

struct Order {
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
        let mut now = 0i64;
        let mut stock_ever = initial; // every unit that was ever put on sale
        let mut deducted = 0i64;

        for e in events {
            match e {
                Ev::Buy(q) => {
                    let id = orders.len();
                    if let ReserveOutcome::Reserved { expires_at_ms, .. } = ledger.reserve(id, q, now, TTL) {
                        orders.push(Order { row: Versioned::initial(), qty: q, expires_at: expires_at_ms, money_kept: false });
                    }
                }
                Ev::Pay(i) => {
                    let Some(o) = orders.get_mut(i) else { continue };
                    let held = match stock_step(o.row.state) {
                        StockStep::None => false,
                        StockStep::Confirm => match ledger.confirm(&i, now) {
                            ConfirmOutcome::Confirmed { .. } => true,
                            ConfirmOutcome::Lapsed | ConfirmOutcome::NotFound => reserve_and_confirm(&mut ledger, i, o.qty, now),
                        },
                        StockStep::Reserve => reserve_and_confirm(&mut ledger, i, o.qty, now),
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
                        ledger.release(&i);
                    }
                }
                Ev::ExpiryJob(i) => {
                    let Some(o) = orders.get_mut(i) else { continue };
                    if o.row.state == OrderState::Pending && now >= o.expires_at {
                        step(o, OrderState::Expired);
                        ledger.release(&i);
                    }
                }
                Ev::Deduct(i) => {
                    let Some(o) = orders.get_mut(i) else { continue };
                    if o.row.state == OrderState::Paid {
                        prop_assert!(ledger.deduct(&i), "a paid order's units were not held");
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
                    prop_assert_eq!(ledger.holds(&i), Some((o.qty, None)), "paid order {} lost its units", i);
                }
            }
        }
    }
}

fn reserve_and_confirm(ledger: &mut SkuLedger<usize>, id: usize, qty: u32, now: i64) -> bool {
    match ledger.reserve(id, qty, now, TTL) {
        ReserveOutcome::Reserved { .. } | ReserveOutcome::Existing { .. } => {
            matches!(ledger.confirm(&id, now), ConfirmOutcome::Confirmed { .. })
        }
        ReserveOutcome::Shortage { .. } => false,
    }
}
