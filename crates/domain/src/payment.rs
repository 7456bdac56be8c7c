//! Payments: providers, payment states, and what a confirmed payment does to an order.
//!
//! One rule set serves the webhook, the compensation poller and manual replay: given the
//! order's state and whether stock could be held for it, [`resolve_payment`] says which
//! transitions to make and whether the money is kept. Money is never silently kept: every
//! path either ends in a paid state or schedules a refund.

use std::fmt;
use std::str::FromStr;

use crate::order::OrderState::{self, *};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    Wechat,
    Alipay,
    Douyin,
}

impl Provider {
    pub const ALL: [Provider; 3] = [Provider::Wechat, Provider::Alipay, Provider::Douyin];

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Wechat => "wechat",
            Provider::Alipay => "alipay",
            Provider::Douyin => "douyin",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown payment provider {0:?} (expected wechat, alipay or douyin)")]
pub struct UnknownProvider(pub String);

impl FromStr for Provider {
    type Err = UnknownProvider;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Provider::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownProvider(s.to_owned()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentStatus {
    /// Started at the provider; no result known yet.
    Created,
    /// Applied to its order; the money is kept.
    Succeeded,
    /// Money arrived but the order cannot take it (no stock, cancelled, paid twice).
    RefundRequired,
    /// The provider paid that money back.
    Refunded,
    /// The provider closed it unpaid (the buyer gave up, or it failed there). The order may
    /// start another payment; money that arrives for it anyway is still applied.
    Closed,
}

impl PaymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Created => "CREATED",
            PaymentStatus::Succeeded => "SUCCEEDED",
            PaymentStatus::RefundRequired => "REFUND_REQUIRED",
            PaymentStatus::Refunded => "REFUNDED",
            PaymentStatus::Closed => "CLOSED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Created,
            Self::Succeeded,
            Self::RefundRequired,
            Self::Refunded,
            Self::Closed,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
}

/// What has to happen to stock before a payment can be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StockStep {
    /// Nothing: the order cannot take the money whatever the stock says.
    None,
    /// Pin the order's units: confirm the live pre-lock, or (lapsed, or the order expired)
    /// take the units again, in one atomic step (`StockPrelock::pin`).
    Pin,
}

/// The stock step a payment needs, from the order's state alone.
pub fn stock_step(state: OrderState) -> StockStep {
    match state {
        Pending | Expired => StockStep::Pin,
        _ => StockStep::None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentPlan {
    /// Transitions to apply in order, each a compare-and-set, all in one transaction.
    pub path: Vec<OrderState>,
    /// Whether the payment is kept (`Succeeded`) or must be refunded (`RefundRequired`).
    pub keep_money: bool,
}

/// What a confirmed payment does to an order in `state`, once the stock step (if any) has
/// answered `stock_held`.
pub fn resolve_payment(state: OrderState, stock_held: bool) -> PaymentPlan {
    let (path, keep_money) = match (state, stock_held) {
        (Pending, true) | (Expired, true) => (vec![Paid], true),
        (Pending, false) => (vec![Expired, RefundPending], false),
        (Expired, false) | (Cancelled, _) => (vec![RefundPending], false),
        // Already paid (a second payment of one order), or already refunding: the order
        // does not move; this payment alone is refunded.
        (Paid | Confirmed | Redeemed | RefundPending | Refunded, _) => (vec![], false),
    };
    PaymentPlan { path, keep_money }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::order::check_transition;

    #[test]
    fn every_plan_is_a_legal_path_and_money_is_kept_only_when_paid() {
        for state in OrderState::ALL {
            for held in [true, false] {
                let plan = resolve_payment(state, held);
                let mut at = state;
                for &to in &plan.path {
                    check_transition(at, to).unwrap();
                    at = to;
                }
                assert_eq!(
                    plan.keep_money,
                    at == Paid && !plan.path.is_empty(),
                    "{state} {held}"
                );
                if !plan.keep_money && !plan.path.is_empty() {
                    assert_eq!(at, RefundPending);
                }
            }
        }
    }

    #[test]
    fn table() {
        let cases = [
            (Pending, true, vec![Paid], true),
            (Pending, false, vec![Expired, RefundPending], false),
            (Expired, true, vec![Paid], true),
            (Expired, false, vec![RefundPending], false),
            (Cancelled, true, vec![RefundPending], false),
            (Paid, true, vec![], false),
            (Refunded, true, vec![], false),
        ];
        for (state, held, path, keep) in cases {
            assert_eq!(
                resolve_payment(state, held),
                PaymentPlan {
                    path,
                    keep_money: keep
                },
                "{state}"
            );
        }
        assert_eq!(stock_step(Pending), StockStep::Pin);
        assert_eq!(stock_step(Expired), StockStep::Pin);
        assert_eq!(stock_step(Cancelled), StockStep::None);
    }

    #[test]
    fn providers_parse() {
        for p in Provider::ALL {
            assert_eq!(p.as_str().parse::<Provider>().unwrap(), p);
        }
        assert!("paypal".parse::<Provider>().is_err());
    }
}
