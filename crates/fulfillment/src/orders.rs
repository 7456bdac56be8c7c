//! Creating and cancelling orders.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use domain::ports::{PrelockError, StockPrelock};
use domain::stock::{Attempt, ReleaseOutcome, ReserveOutcome};
use domain::{ids, Money, OrderId, OrderState, SkuId, StoreId, UserId};
use postgres_store::orders::{self, NewOrder, OrderRow};
use postgres_store::{effects, is_unique_violation, lock_sku_shared, skus};
use serde_json::json;
use uuid::Uuid;

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

        // A hot SKU known to be empty is answered here, without a transaction or a pre-lock
        // call; but only for a brand-new order id. A retry of a committed order gets its
        // order back below, and a retry whose first answer was lost may hold units in the
        // pre-lock: it must get them, not "sold out". One indexed read tells.
        // (the first reads of a request: a connection found dead costs a retry, not the request)
        if self.sold_out.is_sold_out(&req.sku_id, Instant::now())
            && !self
                .store
                .retry_dead(|pool| async move { orders::id_may_hold_units(&pool, id.0).await })
                .await?
        {
            return Err(FulfillmentError::Shortage { available: 0 });
        }

        // A retry of a request that already succeeded: answer from the row, touch nothing.
        if let Some(existing) = self
            .store
            .retry_dead(|pool| async move { orders::find_order(&pool, id.0).await })
            .await?
        {
            return replay(existing, &fingerprint);
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
        // the transaction's id goes with the reserve: its pending confirmation is settled by
        // whether this transaction commits, even if this process dies first
        let (sku, txid) = skus::get_sku_for_create(&mut tx, req.sku_id.as_str())
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
        // This attempt claims the reservation it makes or finds; if it ends without an order
        // its own claim is withdrawn (by this call at once, or by the pre-lock's delayed
        // confirmation once the transaction is seen to have ended), so it can never take a
        // retry's units.
        let claim = Uuid::new_v4();
        let attempt = Attempt {
            id: claim,
            txid: Some(txid),
        };
        let expires_at_ms = match self
            .prelock
            .reserve(&req.sku_id, id, req.quantity, attempt, user.as_str())
            .await
        {
            Ok(ReserveOutcome::Reserved { expires_at_ms, .. }) => expires_at_ms,
            Ok(ReserveOutcome::Existing { expires_at_ms, .. }) => {
                expires_at_ms.unwrap_or_else(|| Utc::now().timestamp_millis())
            }
            Ok(ReserveOutcome::Shortage { available }) => {
                if available <= 0 {
                    self.sold_out.mark(&req.sku_id, Instant::now());
                }
                return Err(FulfillmentError::Shortage { available });
            }
            Ok(ReserveOutcome::OverLimit { holds, limit }) => {
                return Err(FulfillmentError::PurchaseLimit {
                    holds,
                    limit,
                    quantity: req.quantity,
                });
            }
            Err(e @ PrelockError::Unavailable(_)) => {
                // The reserve may have run even though its answer never came: its pending
                // confirmation finds this transaction rolled back and gives the units back.
                drop(tx);
                self.lost_answer(&req.sku_id, id).await;
                return Err(e.into());
            }
            // refused, not loaded, unknown, mismatch: nothing was reserved for this attempt
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
        let order = match orders::insert_new_order(&mut tx, &new, &event, &expiry).await {
            Ok(order) => order,
            Err(e) => {
                drop(tx); // roll back, and let go of the SKU lock before anything else
                if !is_unique_violation(&e, None) {
                    self.withdraw_quietly(&req.sku_id, id, claim).await;
                    return Err(e.into());
                }
                // A concurrent twin with the same key committed first; it holds its own claim.
                let existing = orders::find_order(&self.store.pool, id.0)
                    .await?
                    .ok_or(FulfillmentError::Conflict)?;
                let answer = replay(existing, fingerprint);
                if answer.is_err() {
                    self.withdraw_quietly(&req.sku_id, id, claim).await;
                }
                return answer;
            }
        };
        if let Err(e) = tx.commit().await {
            // The commit's outcome is unknown (the connection may have died after it landed):
            // the pending confirmation reads the transaction's fate and keeps the units for a
            // commit that landed, or gives them back.
            self.lost_answer(&req.sku_id, id).await;
            return Err(e.into());
        }
        Ok(Created {
            order,
            replayed: false,
        })
    }

    /// An attempt that may have reserved lost its answer: remember the id (so its retry is not
    /// answered from the sold-out mark) before the caller answers 503. The units themselves
    /// are the pending confirmation's business: recorded by the reserve, it gives them back
    /// once this attempt's transaction is seen to have ended without an order, whether or not
    /// this process is still alive then.
    async fn lost_answer(&self, sku: &SkuId, id: OrderId) {
        if let Err(e) = orders::record_lost_answer(&self.store.pool, id.0, sku.as_str()).await {
            tracing::warn!(%sku, order_id = %id, error = %e, "could not record a lost pre-lock answer; a retry may be told sold out");
        }
    }

    /// Withdraws this attempt's claim after a failed write (the transaction has rolled back).
    /// Logged, not returned: the caller is already answering with the original error. What
    /// does not get through now the pending confirmation withdraws within seconds.
    async fn withdraw_quietly(&self, sku: &SkuId, id: OrderId, claim: Uuid) {
        match self.prelock.withdraw(sku, id, claim).await {
            Ok(_) | Err(PrelockError::NotLoaded) => {}
            Err(e) => {
                tracing::info!(%sku, order_id = %id, error = %e, "pre-lock claim not withdrawn after a failed order write; its pending confirmation will")
            }
        }
    }

    /// Releases an order's units in the background after a release that did not get through
    /// (the order's ledger reservation is already released), once a late answer has had time
    /// to land. Bounded: at most `max_background_give_backs` wait at once, past that the
    /// reservation lapses on its own; in-process: if this process dies first, the same.
    fn release_later(&self, sku: &SkuId, id: OrderId) {
        let Ok(permit) = self.give_back_slots.clone().try_acquire_owned() else {
            tracing::warn!(%sku, order_id = %id, "too many pre-locks waiting to be given back; this one lapses on its own");
            return;
        };
        let (prelock, delay) = (self.prelock.clone(), self.config.orphan_release_delay);
        let sku = sku.clone();
        self.tasks.spawn(async move {
            let _permit = permit;
            release_in_background(&prelock, &sku, id, delay).await;
        });
    }

    /// Cancels a PENDING order of `user`: CANCELLED, its ledger reservation released, expiry
    /// job cancelled, `OrderCancelled` written; then, once that is committed, its units are
    /// given back in Redis.
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
            // the shared SKU lock orders this write against a rebuild reading the ledger
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
            job_engine::store::cancel(&mut tx, &events::expiry_job_key(order.id)).await?;
            close_open_payments(&mut tx, order.id).await?;
            tx.commit().await?;
            // Commit first, then release: released first, a commit that failed (or a slow
            // pre-lock that made this request time out and roll back) left a PENDING order
            // whose units another buyer took, and a rebuild then wrote both back: an oversell.
            // This way the worst case is units held for a cancelled order until the release
            // gets through (retried in the background) or the reservation lapses.
            self.release_after_commit(&sku, id).await;
            return orders::find_order(&self.store.pool, id.0)
                .await?
                .ok_or(FulfillmentError::NotFound);
        }
        Err(FulfillmentError::Conflict)
    }

    /// Gives back the units of an order whose ledger reservation was released in a committed
    /// transaction. Never fails the caller: what does not get through now is retried.
    pub(crate) async fn release_after_commit(&self, sku: &SkuId, id: OrderId) {
        match self.prelock.release(sku, id).await {
            Ok(ReleaseOutcome::Released { .. }) => self.sold_out.clear(sku),
            Ok(ReleaseOutcome::NotFound) | Err(PrelockError::NotLoaded) => {}
            Err(e) => {
                tracing::warn!(%sku, order_id = %id, error = %e, "release after commit failed; retrying in the background");
                self.release_later(sku, id);
            }
        }
    }

    /// The order, if it exists and belongs to `user`; anyone else gets `NotFound` (not
    /// "forbidden"), so order ids cannot be probed.
    pub async fn owned_order(
        &self,
        user: &UserId,
        id: OrderId,
    ) -> Result<OrderRow, FulfillmentError> {
        let found = self
            .store
            .retry_dead(|pool| async move { orders::find_order(&pool, id.0).await })
            .await?;
        match found {
            Some(o) if o.user_id == user.as_str() => Ok(o),
            _ => Err(FulfillmentError::NotFound),
        }
    }
}

/// The background release itself: waits, then releases; a call that fails is retried twice.
async fn release_in_background<P: StockPrelock>(
    prelock: &P,
    sku: &SkuId,
    id: OrderId,
    delay: Duration,
) {
    for round in 1..=3u32 {
        tokio::time::sleep(delay * round).await;
        match prelock.release(sku, id).await {
            Ok(ReleaseOutcome::Released { .. }) => {
                tracing::warn!(%sku, order_id = %id, "released a pre-lock in the background");
                return;
            }
            // already gone, or being rebuilt from the ledger (which holds no units for it)
            Ok(ReleaseOutcome::NotFound) | Err(PrelockError::NotLoaded) => return,
            Err(e) => {
                tracing::info!(%sku, order_id = %id, error = %e, round, "background release failed; will retry")
            }
        }
    }
    tracing::warn!(%sku, order_id = %id, "could not release a pre-lock; it lapses on its own");
}

/// Expires a PENDING order whose pre-lock is gone, in the caller's transaction: PENDING ->
/// EXPIRED by compare-and-set, its reservation RELEASED, `OrderExpired` (with `reason`)
/// written, its expiry job cancelled. Giving the units back in Redis is the caller's business
/// (a rebuild simply does not write them back). Returns the order as it was when it expired;
/// `None`, with nothing changed, when it is no longer PENDING or moved concurrently.
pub async fn expire_pending(
    conn: &mut postgres_store::sqlx::PgConnection,
    order_id: uuid::Uuid,
    reason: &str,
) -> Result<Option<OrderRow>, FulfillmentError> {
    let Some(order) = orders::find_order(&mut *conn, order_id).await? else {
        return Ok(None);
    };
    if order.state != OrderState::Pending {
        return Ok(None);
    }
    match orders::transition(&mut *conn, order.id, order.versioned(), OrderState::Expired).await {
        Ok(_) => {}
        Err(postgres_store::orders::TransitionFailure::Conflict) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    orders::set_reservation(&mut *conn, order.id, "RELEASED", None).await?;
    effects::append_event(
        &mut *conn,
        events::order_event(events::ORDER_EXPIRED, &order, json!({ "reason": reason })),
    )
    .await?;
    job_engine::store::cancel(&mut *conn, &events::expiry_job_key(order.id)).await?;
    close_open_payments(&mut *conn, order.id).await?;
    Ok(Some(order))
}

/// An order that can no longer take money (cancelled, expired) has its open payments'
/// checks due now, in the caller's transaction: each closes its payment at the provider
/// (`order_closed`) so no money can arrive for it unseen; a check that had died (its attempts
/// spent) is scheduled again for it.
pub(crate) async fn close_open_payments(
    conn: &mut postgres_store::sqlx::PgConnection,
    order_id: Uuid,
) -> Result<(), FulfillmentError> {
    let open = postgres_store::payments::open_payments_of_order(&mut *conn, order_id).await?;
    let keys: Vec<String> = open.into_iter().map(events::payment_check_key).collect();
    job_engine::store::bring_forward(conn, &keys).await?;
    Ok(())
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
