//! Recording a refund the provider paid: the payment `REFUND_REQUIRED -> REFUNDED` and, when
//! the order is waiting for it, the order `REFUND_PENDING -> REFUNDED` with `OrderRefunded`, in
//! one transaction. Safe to run twice: the second run finds the payment refunded and changes
//! nothing.

use chrono::{DateTime, Utc};
use domain::order::OrderState;
use domain::PaymentStatus;
use postgres_store::{effects, orders, payments};
use serde_json::json;
use uuid::Uuid;

use crate::events;
use crate::follow_up::FollowUp;
use crate::{Fulfillment, FulfillmentError};

impl<P: domain::ports::StockPrelock + Clone + 'static> Fulfillment<P> {
    /// The provider paid refund `refund_id` of `payment_id` back at `refunded_at`.
    pub async fn record_refund(
        &self,
        payment_id: Uuid,
        refund_id: &str,
        refunded_at: DateTime<Utc>,
    ) -> Result<FollowUp, FulfillmentError> {
        let mut tx = self.store.begin().await?;
        let payment = payments::lock_payment(&mut tx, payment_id)
            .await?
            .ok_or(FulfillmentError::UnknownPayment)?;
        match payment.status {
            PaymentStatus::Refunded => return Ok(FollowUp::NotNeeded("already refunded")),
            PaymentStatus::RefundRequired => {}
            _ => {
                return Err(FulfillmentError::Validation {
                    field: "payment_id",
                    message: format!(
                        "payment is {}, not waiting for a refund",
                        payment.status.as_str()
                    ),
                })
            }
        }
        payments::mark_refunded(&mut tx, payment_id, refund_id, refunded_at).await?;
        let order = orders::lock_order(&mut tx, payment.order_id)
            .await?
            .ok_or(FulfillmentError::NotFound)?;
        if order.state == OrderState::RefundPending {
            orders::transition(&mut tx, order.id, order.versioned(), OrderState::Refunded).await?;
            effects::append_event(
                &mut tx,
                events::order_event(
                    events::ORDER_REFUNDED,
                    &order,
                    json!({ "payment_id": payment_id, "refund_id": refund_id,
                            "amount_cents": payment.amount_cents }),
                ),
            )
            .await?;
        }
        tx.commit().await?;
        tracing::info!(%payment_id, refund_id, order_id = %payment.order_id, "refund recorded");
        Ok(FollowUp::Done)
    }
}
