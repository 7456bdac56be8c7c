//! Money as integer cents (CNY fen). Never floats; every operation is overflow-checked.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(i64);

impl Money {
    /// The largest amount one order may carry: 10 million yuan. Far above any bar package,
    /// far below i64 overflow, and it keeps JSON numbers exact in every client.
    pub const MAX_CENTS: i64 = 1_000_000_000;

    pub fn from_cents(cents: i64) -> Option<Money> {
        (0..=Self::MAX_CENTS)
            .contains(&cents)
            .then_some(Money(cents))
    }

    pub fn cents(self) -> i64 {
        self.0
    }

    /// Unit price times quantity; `None` when the result leaves the allowed range.
    pub fn times(self, quantity: u32) -> Option<Money> {
        self.0
            .checked_mul(i64::from(quantity))
            .and_then(Money::from_cents)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_and_multiplication_are_checked() {
        assert!(Money::from_cents(-1).is_none());
        assert!(Money::from_cents(Money::MAX_CENTS + 1).is_none());
        let p = Money::from_cents(9_900).unwrap();
        assert_eq!(p.times(3).unwrap().cents(), 29_700);
        assert!(p.times(u32::MAX).is_none());
        assert_eq!(p.to_string(), "99.00");
    }
}
