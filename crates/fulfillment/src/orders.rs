//! Creating and cancelling orders.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use domain::ports::{PrelockError, StockPrelock};
use domain::stock::{ReleaseOutcome, ReserveOutcome};
use domain::{ids, Money, OrderId, OrderState, SkuId, StoreId, UserId};
use postgres_store::orders::{self, NewOrder, OrderRow};
use postgres_store::{effects, is_unique_violation, lock_sku_shared, skus};
use serde_json::json;

use crate::events;
use crate::{Fulfillment, FulfillmentError};

/// A validated "buy now".
#[derive(Debug, Clone)]
pub struct CreateOrder {
    pub sku_id: SkuId,
    pub store_id: StoreId,
    pub quantity: u32,
}

impl CreateOrder {
    /// What the idempotency key is bound to: the same key with another body is refused.
    fn fingerprint(&self) -> String {
        format!("{}|{}|{}", self.sku_id, self.store_id, self.quantity)
    }
}

#[derive(Debug)]
pub struct Created {
    pub order: OrderRow,
    /// True when this key had already created the order (a retry): nothing new happened.
    pub replayed: bool,
}

impl<P: StockPrelock + Clone + 'static> Fulfillment<P> {
    /// "Buy now": pre-locks stock, then writes the order, its reservation, the `OrderCreated`
    /// event and the expiry job in one transaction. If that transaction fails after the
    /// pre-lock succeeded, the pre-lock is released.
    pub async fn create_order(
        &self,
        user: &UserId,
        idempotency_key: &str,
        req: CreateOrder,
    ) -> Result<Created, FulfillmentError> {
        ids::validate_idempotency_key(idempotency_key).map_err(|m| {
            FulfillmentError::Validation {
                field: "Idempotency-Key",
                message: m.into(),
            }
        })?;
        if req.quantity == 0 || req.quantity > self.config.max_quantity {
            return Err(FulfillmentError::Validation {
                field: "quantity",
                message: format!("must be 1 to {}", self.config.max_quantity),
            });
        }
        let id = OrderId::from_idempotency_key(user, idempotency_key);
        let fingerprint = req.fingerprint();

        // A retry of a request that already succeeded: answer from the row, touch nothing.
        if let Some(existing) = orders::find_order(&self.store.pool, id.0).await? {
            return replay(existing, &fingerprint);
        }

        // A hot SKU known to be empty is answered here, before any transaction.
        if self.sold_out.is_sold_out(&req.sku_id, Instant::now()) {
            return Err(FulfillmentError::Shortage { available: 0 });
        }

        let mut attempt = 0;
        loop {
            // Only a rebuild in progress (NotLoaded) is waited out, never a timeout: a
            // timed-out pre-lock must answer 503 fast, inside the 150 ms budget.
            match self
                .try_create(id, user, idempotency_key, &req, &fingerprint)
                .await
            {
                Err(FulfillmentError::PrelockNotLoaded)
                    if attempt < self.config.not_loaded_retries =>
                {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(10 << attempt)).await;
                }
                other => return other,
            }
        }
    }

    async fn try_create(
        &self,
        id: OrderId,
        user: &UserId,
        idempotency_key: &str,
        req: &CreateOrder,
        fingerprint: &str,
    ) -> Result<Created, FulfillmentError> {
        let mut tx = self.store.begin().await?;
        let sku = skus::get_sku_locked_shared(&mut tx, req.sku_id.as_str())
            .await?
            .ok_or(FulfillmentError::UnknownSku)?;
        if sku.store_id != req.store_id.as_str() {
            return Err(FulfillmentError::Validation {
                field: "store_id",
                message: format!("SKU {} is not sold by store {}", req.sku_id, req.store_id),
            });
        }
        let unit =
            Money::from_cents(sku.price_cents).ok_or_else(|| FulfillmentError::Validation {
                field: "sku_id",
                message: "SKU has an invalid price".into(),
            })?;
        let amount = unit
            .times(req.quantity)
            .ok_or_else(|| FulfillmentError::Validation {
                field: "quantity",
                message: "order amount exceeds the allowed maximum".into(),
            })?;
        let (created, expires_at_ms) =
            match self.prelock.reserve(&req.sku_id, id, req.quantity).await {
                Ok(ReserveOutcome::Reserved { expires_at_ms, .. }) => (true, expires_at_ms),
                Ok(ReserveOutcome::Existing { expires_at_ms, .. }) => (
                    false,
                    expires_at_ms.unwrap_or_else(|| Utc::now().timestamp_millis()),
                ),
                Ok(ReserveOutcome::Shortage { available }) => {
                    if available <= 0 {
                        self.sold_out.mark(&req.sku_id, Instant::now());
                    }
                    return Err(FulfillmentError::Shortage { available });
                }
                Err(e @ PrelockError::Unavailable(_)) => {
                    // The reserve may have run even though its answer never came.
                    self.release_orphan_later(&req.sku_id, id);
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            };
        let expires_at =
            DateTime::<Utc>::from_timestamp_millis(expires_at_ms).unwrap_or_else(Utc::now);

        let new = NewOrder {
            id: id.0,
            user_id: user.as_str(),
            sku_id: req.sku_id.as_str(),
            store_id: req.store_id.as_str(),
            quantity: req.quantity as i32,
            unit_price_cents: unit.cents(),
            amount_cents: amount.cents(),
            idempotency_key,
            request_fingerprint: fingerprint,
            expires_at,
        };
        let event = events::order_event(
            events::ORDER_CREATED,
            &new,
            json!({ "expires_at": expires_at }),
        );
        let expiry = events::expiry_job(id.0, new.sku_id, expires_at);
        let written = async {
            let order = orders::insert_new_order(&mut tx, &new, &event, &expiry).await?;
            tx.commit().await?;
            Ok::<_, postgres_store::sqlx::Error>(order)
        }
        .await;

        match written {
            Ok(order) => Ok(Created {
                order,
                replayed: false,
            }),
            Err(e) if is_unique_violation(&e, None) => {
                // A concurrent twin with the same key committed first.
                let existing = orders::find_order(&self.store.pool, id.0)
                    .await?
                    .ok_or(FulfillmentError::Conflict)?;
                let answer = replay(existing, fingerprint);
                if answer.is_err() && created {
                    // Our pre-lock (another SKU or quantity) is nobody's: give it back.
                    self.release_quietly(&req.sku_id, id).await;
                }
                answer
            }
            Err(e) => {
                if created {
                    self.release_quietly(&req.sku_id, id).await;
                }
                Err(e.into())
            }
        }
    }

    /// Gives a pre-lock back after a failed write. Logged, not returned: the caller is already
    /// answering with the original error, and a lost release only holds units until the
    /// reservation lapses (never an oversell).
    async fn release_quietly(&self, sku: &SkuId, id: OrderId) {
        if let Err(e) = self.prelock.release(sku, id).await {
            tracing::warn!(%sku, order_id = %id, error = %e, "could not release pre-lock after a failed order write; it lapses on its own");
        }
    }

    /// After a pre-lock call timed out, the reservation may exist in Redis with no order behind
    /// it, holding units until it lapses (15 minutes: in a flash sale, stock that looks sold
    /// out and is not). Once late answers have had time to land, and if no order took that id
    /// meanwhile, give it back. Best effort and in-process: if this process dies first, the
    /// reservation still lapses on its own.
    fn release_orphan_later(&self, sku: &SkuId, id: OrderId) {
        let (prelock, store, delay) = (
            self.prelock.clone(),
            self.store.clone(),
            self.config.orphan_release_delay,
        );
        let sku = sku.clone();
        self.tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            for attempt in 0..3u32 {
                match orders::find_order(&store.pool, id.0).await {
                    Ok(Some(_)) => return, // a retry of this request created the order
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(order_id = %id, error = %e, "orphan check failed; the pre-lock lapses on its own");
                        return;
                    }
                }
                match prelock.release(&sku, id).await {
                    Ok(ReleaseOutcome::Released { quantity, .. }) => {
                        tracing::warn!(%sku, order_id = %id, quantity, "released a pre-lock orphaned by a timeout");
                        return;
                    }
                    Ok(ReleaseOutcome::NotFound) | Err(PrelockError::NotLoaded) => return,
                    Err(_) => tokio::time::sleep(delay * (attempt + 1)).await,
                }
            }
        });
    }

    /// Cancels a PENDING order of `user`: CANCELLED, reservation released in Redis and the
    /// ledger, expiry job cancelled, `OrderCancelled` written.
    pub async fn cancel_order(
        &self,
        user: &UserId,
        id: OrderId,
    ) -> Result<OrderRow, FulfillmentError> {
        for _ in 0..3 {
            let order = self.owned_order(user, id).await?;
            if order.state != OrderState::Pending {
                return Err(FulfillmentError::InvalidTransition { state: order.state });
            }
            let sku = SkuId::parse(&order.sku_id).map_err(|_| FulfillmentError::UnknownSku)?;
            let mut tx = self.store.begin().await?;
            lock_sku_shared(&mut tx, sku.as_str()).await?;
            match orders::transition(&mut tx, id.0, order.versioned(), OrderState::Cancelled).await
            {
                Err(postgres_store::orders::TransitionFailure::Conflict) => continue,
                other => other?,
            };
            orders::set_reservation(&mut tx, id.0, "RELEASED", None).await?;
            effects::append_event(
                &mut tx,
                events::order_event(events::ORDER_CANCELLED, &order, json!({})),
            )
            .await?;
            effects::cancel_job(&mut tx, &events::expiry_job_key(order.id)).await?;
            // Released inside the transaction, under the SKU lock: a rebuild cannot slip in
            // between. Should the commit then fail, the order stays PENDING without units,
            // and a later payment re-reserves or refunds: never an oversell.
            match self.prelock.release(&sku, id).await {
                Ok(_) | Err(PrelockError::NotLoaded) => {}
                Err(e) => return Err(e.into()),
            }
            tx.commit().await?;
            self.sold_out.clear(&sku);
            return orders::find_order(&self.store.pool, id.0)
                .await?
                .ok_or(FulfillmentError::NotFound);
        }
        Err(FulfillmentError::Conflict)
    }

    /// The order, if it exists and belongs to `user`; anyone else gets `NotFound` (not
    /// "forbidden"), so order ids cannot be probed.
    pub async fn owned_order(
        &self,
        user: &UserId,
        id: OrderId,
    ) -> Result<OrderRow, FulfillmentError> {
        match orders::find_order(&self.store.pool, id.0).await? {
            Some(o) if o.user_id == user.as_str() => Ok(o),
            _ => Err(FulfillmentError::NotFound),
        }
    }
}

fn replay(existing: OrderRow, fingerprint: &str) -> Result<Created, FulfillmentError> {
    if existing.request_fingerprint == fingerprint {
        Ok(Created {
            order: existing,
            replayed: true,
        })
    } else {
        Err(FulfillmentError::IdempotencyMismatch)
    }
}
