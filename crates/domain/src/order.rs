//! Order states and the allowed-transition table.
//!
//! Every state change is a compare-and-set on `(order_id, state, version)`; this module says
//! which `(from, to)` pairs exist at all. The same table is seeded into Postgres
//! (`order_transition`) and enforced there by a trigger, and a test checks the two agree.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OrderState {
    /// Stock pre-locked, awaiting payment.
    Pending,
    /// Payment applied; follow-up jobs (deduct stock, issue voucher, notify) scheduled.
    Paid,
    /// Follow-up actions done: real stock deducted, voucher issued.
    Confirmed,
    /// Voucher used at the bar. Terminal.
    Redeemed,
    /// The pre-lock timed out before payment.
    Expired,
    /// The buyer cancelled before paying.
    Cancelled,
    /// Money must go back (late payment without stock, double payment, refund request).
    RefundPending,
    /// Money went back. Terminal.
    Refunded,
}

impl OrderState {
    pub const ALL: [OrderState; 8] = [
        OrderState::Pending,
        OrderState::Paid,
        OrderState::Confirmed,
        OrderState::Redeemed,
        OrderState::Expired,
        OrderState::Cancelled,
        OrderState::RefundPending,
        OrderState::Refunded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OrderState::Pending => "PENDING",
            OrderState::Paid => "PAID",
            OrderState::Confirmed => "CONFIRMED",
            OrderState::Redeemed => "REDEEMED",
            OrderState::Expired => "EXPIRED",
            OrderState::Cancelled => "CANCELLED",
            OrderState::RefundPending => "REFUND_PENDING",
            OrderState::Refunded => "REFUNDED",
        }
    }

    /// Whether the buyer's money is kept for this order (it was paid and not refunded).
    pub fn is_paid(self) -> bool {
        matches!(
            self,
            OrderState::Paid | OrderState::Confirmed | OrderState::Redeemed
        )
    }

    pub fn is_terminal(self) -> bool {
        TRANSITIONS.iter().all(|(from, _)| *from != self)
    }
}

impl fmt::Display for OrderState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown order state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for OrderState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OrderState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

use OrderState::*;

/// The allowed transitions. Anything not listed is illegal.
///
/// `EXPIRED -> PAID` and `EXPIRED | CANCELLED -> REFUND_PENDING` are the late-payment exits:
/// money that arrives after the pre-lock lapsed either re-reserves stock or goes back.
/// `CANCELLED -> REFUND_PENDING` extends SPEC.md: a buyer who cancels and then pays anyway
/// (a payment page left open) gets the money back rather than an order they cancelled.
pub const TRANSITIONS: &[(OrderState, OrderState)] = &[
    (Pending, Paid),
    (Pending, Expired),
    (Pending, Cancelled),
    (Paid, Confirmed),
    (Confirmed, Redeemed),
    (Paid, RefundPending),
    (Confirmed, RefundPending),
    (RefundPending, Refunded),
    (Expired, Paid),
    (Expired, RefundPending),
    (Cancelled, RefundPending),
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("transition {from} -> {to} is not allowed")]
pub struct TransitionError {
    pub from: OrderState,
    pub to: OrderState,
}

/// Checks a transition against the table. Callers still perform the compare-and-set on the
/// version: this only rules out transitions that can never be right.
pub fn check_transition(from: OrderState, to: OrderState) -> Result<(), TransitionError> {
    if TRANSITIONS.contains(&(from, to)) {
        Ok(())
    } else {
        Err(TransitionError { from, to })
    }
}

/// A versioned state, the unit of optimistic concurrency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Versioned {
    pub state: OrderState,
    pub version: i32,
}

impl Versioned {
    pub fn initial() -> Self {
        Versioned {
            state: Pending,
            version: 1,
        }
    }

    /// The row this becomes after a successful compare-and-set to `to`.
    pub fn next(self, to: OrderState) -> Result<Versioned, TransitionError> {
        check_transition(self.state, to)?;
        Ok(Versioned {
            state: to,
            version: self.version + 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_table() {
        // (from, to, allowed): every pair of states is listed once, so a change to the table
        // must change this test too.
        let expected: &[(OrderState, &[OrderState])] = &[
            (Pending, &[Paid, Expired, Cancelled]),
            (Paid, &[Confirmed, RefundPending]),
            (Confirmed, &[Redeemed, RefundPending]),
            (Redeemed, &[]),
            (Expired, &[Paid, RefundPending]),
            (Cancelled, &[RefundPending]),
            (RefundPending, &[Refunded]),
            (Refunded, &[]),
        ];
        for (from, allowed) in expected {
            for to in OrderState::ALL {
                let ok = check_transition(*from, to).is_ok();
                assert_eq!(ok, allowed.contains(&to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn terminal_states() {
        let terminal: Vec<_> = OrderState::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(terminal, vec![Redeemed, Refunded]);
    }

    #[test]
    fn names_round_trip() {
        for s in OrderState::ALL {
            assert_eq!(s.as_str().parse::<OrderState>().unwrap(), s);
        }
        assert!("paid".parse::<OrderState>().is_err());
    }

    #[test]
    fn versioned_next_bumps_version_only_when_legal() {
        let v = Versioned::initial();
        let paid = v.next(Paid).unwrap();
        assert_eq!((paid.state, paid.version), (Paid, 2));
        assert_eq!(
            paid.next(Pending),
            Err(TransitionError {
                from: Paid,
                to: Pending
            })
        );
    }
}
