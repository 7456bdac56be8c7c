//! Applying a confirmed payment, exactly once.
//!
//! The webhook, the compensation poller and manual replay all call
//! [`Fulfillment::apply_payment`]. Exactly-once rests on three things, none on a lock in
//! Redis: the payment row is locked `FOR UPDATE` (applications of one payment run one at a
//! time), each provider event id is recorded once (a unique key), and the order moves by
//! compare-and-set on its version.

use chrono::{DateTime, Utc};
use domain::order::OrderState;
use domain::payment::{resolve_payment, stock_step, StockStep};
use domain::ports::StockPrelock;
use domain::stock::PinOutcome;
use domain::{OrderId, PaymentStatus, Provider, SkuId};
use postgres_store::orders::{self, TransitionFailure};
use postgres_store::payments::{self, NewPaymentEvent};
use postgres_store::{effects, lock_sku_shared, Tx};
use serde_json::json;
use uuid::Uuid;

use crate::events;
use crate::{Fulfillment, FulfillmentError};

/// Where a payment result came from (recorded with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Webhook,
    Compensation,
    Replay,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Webhook => "webhook",
            Source::Compensation => "compensation",
            Source::Replay => "replay",
        }
    }
}

/// A provider's word that a payment succeeded (a verified callback or a query answer).
#[derive(Debug, Clone)]
pub struct PaymentConfirmation {
    pub provider: Provider,
    pub event_id: String,
    pub payment_id: Uuid,
    pub amount_cents: i64,
    pub paid_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The order is now PAID; follow-up jobs are scheduled.
    Paid,
    /// The money cannot be kept (no stock after a lapse, cancelled, paid twice): the payment
    /// is marked REFUND_REQUIRED and a refund job is scheduled. `state` is the order's state.
    RefundRequired { state: OrderState },
    /// This result was applied before: nothing changed.
    Duplicate,
}

impl<P: StockPrelock + Clone + 'static> Fulfillment<P> {
    pub async fn apply_payment(
        &self,
        conf: &PaymentConfirmation,
        source: Source,
    ) -> Result<ApplyOutcome, FulfillmentError> {
        if conf.event_id.is_empty() || conf.event_id.len() > 128 {
            return Err(FulfillmentError::Validation {
                field: "event_id",
                message: "must be 1 to 128 characters".into(),
            });
        }
        // A conflict means the order moved under us (a cancel, a second payment): start over
        // from a fresh read; the payment lock makes this converge in a step or two.
        for _ in 0..5 {
            let mut tx = self.store.begin().await?;
            match self.apply_in(&mut tx, conf, source).await {
                Ok((outcome, release)) => {
                    tx.commit().await?;
                    if let Some((sku, id)) = release {
                        self.release_after_commit(&sku, id).await;
                    }
                    return Ok(outcome);
                }
                Err(FulfillmentError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(FulfillmentError::Conflict)
    }

    /// Applies the payment in `tx`. Besides the outcome, names a pre-lock to release once `tx`
    /// has committed (never before: a rolled-back transaction must not have given units away).
    async fn apply_in(
        &self,
        tx: &mut Tx,
        conf: &PaymentConfirmation,
        source: Source,
    ) -> Result<(ApplyOutcome, Option<(SkuId, OrderId)>), FulfillmentError> {
        let payment = payments::lock_payment(tx, conf.payment_id)
            .await?
            .filter(|p| p.provider == conf.provider)
            .ok_or(FulfillmentError::UnknownPayment)?;
        if payment.amount_cents != conf.amount_cents {
            return Err(FulfillmentError::AmountMismatch {
                expected: payment.amount_cents,
                got: conf.amount_cents,
            });
        }
        let record = |outcome: &'static str| NewPaymentEvent {
            provider: conf.provider,
            provider_event_id: &conf.event_id,
            payment_id: payment.id,
            source: source.as_str(),
            amount_cents: conf.amount_cents,
            outcome,
        };
        // A payment the provider had closed is still applied: money that arrives is never
        // dropped.
        if !matches!(
            payment.status,
            PaymentStatus::Created | PaymentStatus::Closed
        ) {
            // Settled by an earlier result. Record this event id (once) and change nothing.
            payments::record_event(tx, &record("ALREADY_SETTLED")).await?;
            return Ok((ApplyOutcome::Duplicate, None));
        }

        let order = orders::find_order(&mut **tx, payment.order_id)
            .await?
            .ok_or(FulfillmentError::UnknownPayment)?;
        let sku = SkuId::parse(&order.sku_id).map_err(|_| FulfillmentError::UnknownSku)?;
        let id = OrderId(order.id);
        lock_sku_shared(tx, sku.as_str()).await?;

        // Pinning is one atomic step in the pre-lock store ("confirm, or reserve again"), and
        // never answered by a sold-out shortcut: a late payment keeps its money whenever the
        // units are really there.
        let held = match stock_step(order.state) {
            StockStep::None => false,
            StockStep::Pin => match self
                .prelock
                .pin(&sku, id, order.quantity as u32, &order.user_id)
                .await?
            {
                PinOutcome::Pinned { .. } | PinOutcome::Repinned { .. } => true,
                // taking the units again would pass the buyer's purchase limit (they ordered
                // the same units again after this order lapsed): the money goes back
                PinOutcome::Shortage { .. }
                | PinOutcome::Mismatch { .. }
                | PinOutcome::OverLimit { .. } => false,
            },
        };
        let plan = resolve_payment(order.state, held);

        let mut at = order.versioned();
        for &to in &plan.path {
            at = orders::transition(tx, order.id, at, to)
                .await
                .map_err(|f| match f {
                    TransitionFailure::Conflict => FulfillmentError::Conflict,
                    other => other.into(),
                })?;
            if to == OrderState::Expired {
                effects::append_event(
                    tx,
                    events::order_event(events::ORDER_EXPIRED, &order, json!({})),
                )
                .await?;
            }
        }

        if plan.keep_money {
            orders::set_reservation(tx, order.id, "CONFIRMED", None).await?;
            payments::settle_payment(
                tx,
                payment.id,
                PaymentStatus::Succeeded,
                &conf.event_id,
                conf.paid_at,
                source.as_str(),
            )
            .await?;
            effects::append_event(
                tx,
                events::order_event(
                    events::ORDER_PAID,
                    &order,
                    json!({ "payment_id": payment.id, "provider": conf.provider.as_str(), "paid_at": conf.paid_at }),
                ),
            )
            .await?;
            // due by the database's clock, whatever this process's own says
            let due = job_engine::RunAt::In(self.config.follow_up_delay);
            for job in events::follow_up_jobs(&order, due) {
                job_engine::store::insert(tx, &job).await?;
            }
            job_engine::store::cancel(tx, &events::expiry_job_key(order.id)).await?;
            payments::record_event(tx, &record("PAID")).await?;
            tracing::info!(order_id = %order.id, payment_id = %payment.id, source = source.as_str(), "payment applied");
            return Ok((ApplyOutcome::Paid, None));
        }

        // The money goes back.
        let reason = match order.state {
            OrderState::Pending | OrderState::Expired => "no stock left after the pre-lock lapsed",
            OrderState::Cancelled => "order was cancelled",
            _ => "order was already paid",
        };
        // A cancelled order may not hold units, yet an earlier attempt of this very call may
        // have pinned some before the cancel won the compare-and-set: release them (after the
        // commit). Only for a cancelled order: an expired one that another payment of it has
        // just pinned again keeps its units (and here pin found none for this payment).
        let release = (order.state == OrderState::Cancelled).then_some((sku, id));
        if matches!(order.state, OrderState::Pending | OrderState::Expired) {
            orders::set_reservation(tx, order.id, "RELEASED", None).await?;
            job_engine::store::cancel(tx, &events::expiry_job_key(order.id)).await?;
        }
        payments::settle_payment(
            tx,
            payment.id,
            PaymentStatus::RefundRequired,
            &conf.event_id,
            conf.paid_at,
            source.as_str(),
        )
        .await?;
        effects::append_event(
            tx,
            events::order_event(
                events::REFUND_REQUESTED,
                &order,
                json!({ "payment_id": payment.id, "provider": conf.provider.as_str(), "reason": reason }),
            ),
        )
        .await?;
        job_engine::store::insert(
            tx,
            &events::refund_job(payment.id, &order, conf.amount_cents, reason),
        )
        .await?;
        payments::record_event(tx, &record("REFUND_REQUIRED")).await?;
        tracing::warn!(order_id = %order.id, payment_id = %payment.id, reason, "payment cannot be kept; refund scheduled");
        Ok((ApplyOutcome::RefundRequired { state: at.state }, release))
    }
}
