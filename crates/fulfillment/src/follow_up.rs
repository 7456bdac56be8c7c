//! The follow-up actions the scheduler runs for an order: expiry, stock deduction, voucher
//! issue, and the bar's redemption. Each is idempotent and safe after a crash half way: the
//! Postgres part commits first and the pre-lock part runs after, and a second run redoes only
//! the pre-lock part (which is idempotent).

use domain::ports::{PrelockError, StockPrelock};
use domain::{OrderId, OrderState, SkuId};
use postgres_store::orders::{self, OrderRow};
use postgres_store::{effects, lock_sku_shared, skus, vouchers, Tx};
use serde_json::json;

use crate::events;
use crate::{Fulfillment, FulfillmentError};

/// What a follow-up action did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FollowUp {
    Done,
    /// Nothing to do any more (the order moved on: paid, cancelled, refunded...).
    NotNeeded(&'static str),
    /// Too early by the clock that set the due time (the pre-lock store's, for an expiry):
    /// run again after this long, read off that same clock.
    NotDue(std::time::Duration),
}

impl<P: StockPrelock + Clone + 'static> Fulfillment<P> {
    /// `order.expire`: a PENDING order whose pre-lock lapsed becomes EXPIRED (`OrderExpired`),
    /// then its units go back unless a late payment pinned them meanwhile.
    pub async fn expire_order(&self, id: OrderId) -> Result<FollowUp, FulfillmentError> {
        let Some(order) = orders::find_order(&self.store.pool, id.0).await? else {
            return Ok(FollowUp::NotNeeded("no such order"));
        };
        let sku = SkuId::parse(&order.sku_id).map_err(|_| FulfillmentError::UnknownSku)?;
        match order.state {
            // by the clock that set the expiry (the pre-lock store's), never this process's
            OrderState::Pending => {
                let left = order.expires_at.timestamp_millis() - self.expiry_clock_ms().await?;
                if left > 0 {
                    return Ok(FollowUp::NotDue(std::time::Duration::from_millis(
                        left as u64,
                    )));
                }
                let mut tx = self.store.begin().await?;
                lock_sku_shared(&mut tx, sku.as_str()).await?;
                let expired = crate::orders::expire_pending(&mut tx, id.0, "lapsed").await?;
                tx.commit().await?;
                if expired.is_none() {
                    return Ok(FollowUp::NotNeeded("the order moved on"));
                }
            }
            // expired by an earlier run that stopped before the pre-lock step: redo that step
            OrderState::Expired => {}
            _ => return Ok(FollowUp::NotNeeded("the order is not pending")),
        }
        match self.prelock.lapse(&sku, id).await {
            Ok(_) | Err(PrelockError::NotLoaded) => Ok(FollowUp::Done),
            Err(e) => Err(e.into()),
        }
    }

    /// The clock an order expires by: the pre-lock store's, which set its `expires_at`. While
    /// that store cannot be asked, the database's stands in (the two agree to within their
    /// hosts' time sync), so an order still expires, and its payments are still closed, while
    /// prelock-service is down; its units then lapse in Redis on their own.
    async fn expiry_clock_ms(&self) -> Result<i64, FulfillmentError> {
        match self.prelock.clock_ms().await {
            Ok(ms) => Ok(ms),
            Err(e) => {
                tracing::warn!(error = %e, "pre-lock clock unavailable; expiring by the database's");
                Ok(postgres_store::database_now(&self.store.pool)
                    .await?
                    .timestamp_millis())
            }
        }
    }

    /// `stock.deduct`: a paid order's units leave `skus.stock_real` and its reservation becomes
    /// ALLOCATED (`StockDeducted`); then the pinned pre-lock goes without giving units back.
    /// `GET /v1/skus` stays consistent throughout: available + reserved = stock_real.
    pub async fn deduct_stock(&self, id: OrderId) -> Result<FollowUp, FulfillmentError> {
        let mut tx = self.store.begin().await?;
        let Some(order) = orders::lock_order(&mut tx, id.0).await? else {
            return Ok(FollowUp::NotNeeded("no such order"));
        };
        if !order.state.is_paid() {
            return Ok(FollowUp::NotNeeded("the order keeps no money"));
        }
        let sku = SkuId::parse(&order.sku_id).map_err(|_| FulfillmentError::UnknownSku)?;
        lock_sku_shared(&mut tx, sku.as_str()).await?;
        match orders::reservation_status(&mut *tx, id.0).await?.as_deref() {
            Some("CONFIRMED") => {
                skus::deduct_stock(&mut tx, sku.as_str(), i64::from(order.quantity)).await?;
                orders::set_reservation(&mut tx, id.0, "ALLOCATED", None).await?;
                effects::append_event(
                    &mut tx,
                    events::order_event(events::STOCK_DEDUCTED, &order, json!({})),
                )
                .await?;
                confirm_if_ready(&mut tx, &order).await?;
                tx.commit().await?;
            }
            // deducted by an earlier run that stopped before the pre-lock step
            Some("ALLOCATED") => tx.commit().await?,
            _ => return Ok(FollowUp::NotNeeded("no paid reservation")),
        }
        match self.prelock.deduct(&sku, id).await {
            Ok(_) | Err(PrelockError::NotLoaded) => Ok(FollowUp::Done),
            Err(e) => Err(e.into()),
        }
    }

    /// `voucher.issue`: a redeemable code for a paid order (`VoucherIssued`), once; with the
    /// stock deducted too, the order becomes CONFIRMED (`OrderConfirmed`).
    pub async fn issue_voucher(&self, id: OrderId) -> Result<FollowUp, FulfillmentError> {
        let mut tx = self.store.begin().await?;
        let Some(order) = orders::lock_order(&mut tx, id.0).await? else {
            return Ok(FollowUp::NotNeeded("no such order"));
        };
        if !order.state.is_paid() {
            return Ok(FollowUp::NotNeeded("the order keeps no money"));
        }
        let (_, issued) = vouchers::issue(&mut tx, id.0, &new_voucher_code()).await?;
        if issued {
            effects::append_event(
                &mut tx,
                events::order_event(events::VOUCHER_ISSUED, &order, json!({})),
            )
            .await?;
            tracing::info!(order_id = %id, "voucher issued");
        }
        confirm_if_ready(&mut tx, &order).await?;
        tx.commit().await?;
        Ok(FollowUp::Done)
    }

    /// The bar redeems a voucher: CONFIRMED -> REDEEMED (`OrderRedeemed`), once. A second
    /// redemption, or one before the order is confirmed, is `InvalidTransition`.
    /// Bar staff of `store` redeem a voucher: another store's is refused (`OtherStore`) and
    /// left as it is.
    pub async fn redeem_voucher(
        &self,
        code: &str,
        store: &str,
        staff: &str,
    ) -> Result<OrderRow, FulfillmentError> {
        let mut tx = self.store.begin().await?;
        let voucher = vouchers::by_code(&mut *tx, code)
            .await?
            .ok_or(FulfillmentError::NotFound)?;
        let order = orders::lock_order(&mut tx, voucher.order_id)
            .await?
            .ok_or(FulfillmentError::NotFound)?;
        if order.store_id != store {
            tracing::warn!(order_id = %order.id, voucher_store = %order.store_id, token_store = store, staff,
                "a voucher of another store was presented: refused");
            return Err(FulfillmentError::OtherStore);
        }
        orders::transition(&mut tx, order.id, order.versioned(), OrderState::Redeemed).await?;
        vouchers::mark_redeemed(&mut tx, order.id).await?;
        effects::append_event(
            &mut tx,
            events::order_event(events::ORDER_REDEEMED, &order, json!({})),
        )
        .await?;
        tx.commit().await?;
        tracing::info!(order_id = %order.id, store, staff, "voucher redeemed");
        orders::find_order(&self.store.pool, order.id)
            .await?
            .ok_or(FulfillmentError::NotFound)
    }
}

/// PAID -> CONFIRMED once both follow-ups are done: the stock deducted (ALLOCATED) and the
/// voucher issued. The caller holds the order's row lock, so of two jobs finishing together
/// the second sees the first's work and confirms.
async fn confirm_if_ready(tx: &mut Tx, order: &OrderRow) -> Result<(), FulfillmentError> {
    if order.state != OrderState::Paid {
        return Ok(());
    }
    let allocated = orders::reservation_status(&mut **tx, order.id)
        .await?
        .as_deref()
        == Some("ALLOCATED");
    let voucher = vouchers::of_order(&mut **tx, order.id).await?;
    let (true, Some(voucher)) = (allocated, voucher) else {
        return Ok(());
    };
    orders::transition(tx, order.id, order.versioned(), OrderState::Confirmed).await?;
    effects::append_event(
        tx,
        events::order_event(
            events::ORDER_CONFIRMED,
            order,
            json!({ "voucher_code": voucher.code }),
        ),
    )
    .await?;
    tracing::info!(order_id = %order.id, "order confirmed");
    Ok(())
}

/// 12 characters from a 31-letter alphabet without look-alikes (no I, L, O, 0, 1): about 59
/// bits from the OS CSPRNG (a v4 UUID's random bits), so codes cannot be guessed at the bar.
fn new_voucher_code() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKMNPQRSTUVWXYZ23456789";
    let mut bits = uuid::Uuid::new_v4().as_u128();
    (0..12)
        .map(|_| {
            let c = ALPHABET[(bits % ALPHABET.len() as u128) as usize];
            bits /= ALPHABET.len() as u128;
            c as char
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn voucher_codes_are_twelve_unambiguous_characters() {
        let codes: std::collections::HashSet<String> =
            (0..1000).map(|_| super::new_voucher_code()).collect();
        assert_eq!(codes.len(), 1000);
        for c in &codes {
            assert_eq!(c.len(), 12);
            assert!(
                c.bytes()
                    .all(|b| b"ABCDEFGHJKMNPQRSTUVWXYZ23456789".contains(&b)),
                "{c}"
            );
        }
    }
}
