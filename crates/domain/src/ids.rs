//! Typed identifiers. Text ids (SKU, store, user) are validated once, here, so every adapter
//! can put them in Redis keys, URLs and SQL without escaping surprises.

use std::fmt;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must be 1 to {max} characters of A-Z, a-z, 0-9, '-' or '_'")]
    BadText { max: usize },
    #[error("must be a UUID")]
    BadUuid,
}

/// Text ids end up inside Redis hash tags (`{sku-1}`) and URLs: braces, colons, slashes and
/// spaces are therefore refused.
fn check_text(s: &str, max: usize) -> Result<(), IdError> {
    let ok = !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(IdError::BadText { max })
    }
}

macro_rules! text_id {
    ($name:ident, $max:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub const MAX_LEN: usize = $max;

            pub fn parse(s: &str) -> Result<Self, IdError> {
                check_text(s, $max)?;
                Ok(Self(s.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

text_id!(SkuId, 64, "A sellable package (e.g. `sku-123`).");
text_id!(StoreId, 64, "The bar that sells a SKU.");
text_id!(
    UserId,
    128,
    "A buyer, as named by the `sub` of their token."
);

macro_rules! uuid_id {
    ($name:ident, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub Uuid);

        impl $name {
            pub fn parse(s: &str) -> Result<Self, IdError> {
                Uuid::parse_str(s).map(Self).map_err(|_| IdError::BadUuid)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

uuid_id!(
    OrderId,
    "An order; also the id of its stock reservation (one order, one reservation)."
);
uuid_id!(
    PaymentId,
    "One payment attempt of an order at one provider."
);

/// Namespace for deriving order ids from idempotency keys (random, fixed forever).
const ORDER_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2a47_9b3e_4d21_8a55_0c7e_31d9_b604);

impl OrderId {
    /// The order id is a function of (user, idempotency key). Concurrent retries of one
    /// "buy now" therefore pre-lock under the same reservation id, which the reserve script
    /// treats as a no-op: twenty identical requests hold stock once, not twenty times.
    pub fn from_idempotency_key(user: &UserId, key: &str) -> Self {
        let mut name = Vec::with_capacity(user.as_str().len() + key.len() + 1);
        name.extend_from_slice(user.as_str().as_bytes());
        name.push(b'\n');
        name.extend_from_slice(key.as_bytes());
        OrderId(Uuid::new_v5(&ORDER_ID_NAMESPACE, &name))
    }
}

/// Idempotency keys are client-chosen: printable ASCII without spaces, bounded in length.
pub fn validate_idempotency_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() || key.len() > 128 {
        return Err("must be 1 to 128 characters");
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_ids_refuse_characters_that_break_keys_and_urls() {
        for bad in ["", "a b", "a{b}", "a:b", "a/b", "ä", &"x".repeat(65)] {
            assert!(SkuId::parse(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["sku-123", "A_b-9", &"x".repeat(64)] {
            assert_eq!(SkuId::parse(good).unwrap().as_str(), good);
        }
    }

    #[test]
    fn order_id_is_a_function_of_user_and_key() {
        let u1 = UserId::parse("u1").unwrap();
        let u2 = UserId::parse("u2").unwrap();
        assert_eq!(
            OrderId::from_idempotency_key(&u1, "k"),
            OrderId::from_idempotency_key(&u1, "k")
        );
        assert_ne!(
            OrderId::from_idempotency_key(&u1, "k"),
            OrderId::from_idempotency_key(&u2, "k")
        );
        // the separator keeps ("u1", "2k") and ("u12", "k") apart
        let u12 = UserId::parse("u12").unwrap();
        assert_ne!(
            OrderId::from_idempotency_key(&u1, "2k"),
            OrderId::from_idempotency_key(&u12, "k")
        );
    }

    #[test]
    fn idempotency_keys_are_bounded_printable_ascii() {
        assert!(validate_idempotency_key("abc-123_X.y").is_ok());
        assert!(validate_idempotency_key("").is_err());
        assert!(validate_idempotency_key("a b").is_err());
        assert!(validate_idempotency_key(&"k".repeat(129)).is_err());
    }
}
