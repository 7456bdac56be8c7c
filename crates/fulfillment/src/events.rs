//! The outbox events and delayed jobs the use cases write. Kinds and payload fields here are
//! the contract with the scheduler and the Kafka consumers; each event type carries a schema
//! version, bumped on any change a consumer could notice.

use chrono::{DateTime, Utc};
use job_engine::{NewJob, Priority, RunAt};
use postgres_store::effects::OutboxEvent;
use postgres_store::orders::OrderRow;
use serde_json::json;
use uuid::Uuid;

pub const ORDER_CREATED: &str = "OrderCreated";
pub const ORDER_CANCELLED: &str = "OrderCancelled";
pub const ORDER_PAID: &str = "OrderPaid";
pub const ORDER_EXPIRED: &str = "OrderExpired";
pub const REFUND_REQUESTED: &str = "RefundRequested";
pub const STOCK_DEDUCTED: &str = "StockDeducted";
pub const VOUCHER_ISSUED: &str = "VoucherIssued";
pub const ORDER_CONFIRMED: &str = "OrderConfirmed";
pub const ORDER_REDEEMED: &str = "OrderRedeemed";
pub const ORDER_REFUNDED: &str = "OrderRefunded";
/// Compensation gave up on a payment (archived for manual replay; Kafka's dead-compensation
/// topic).
pub const COMPENSATION_FAILED: &str = "CompensationFailed";

/// Every event type the code writes to the outbox; each has an Avro schema per version in
/// `schemas/events` (a test holds the two lists equal).
pub const EVENT_TYPES: &[&str] = &[
    ORDER_CREATED,
    ORDER_CANCELLED,
    ORDER_PAID,
    ORDER_EXPIRED,
    REFUND_REQUESTED,
    STOCK_DEDUCTED,
    VOUCHER_ISSUED,
    ORDER_CONFIRMED,
    ORDER_REDEEMED,
    ORDER_REFUNDED,
    COMPENSATION_FAILED,
];

pub const JOB_ORDER_EXPIRE: &str = "order.expire";
pub const JOB_STOCK_DEDUCT: &str = "stock.deduct";
pub const JOB_VOUCHER_ISSUE: &str = "voucher.issue";
pub const JOB_ORDER_NOTIFY: &str = "order.notify";
pub const JOB_PAYMENT_REFUND: &str = "payment.refund";
/// Asks the provider whether a started payment was paid (the compensation worker runs it).
pub const JOB_PAYMENT_CHECK: &str = "payment.check";
/// Compares Redis with Postgres per SKU and repairs drift (a recurring schedule).
pub const JOB_STOCK_RECONCILE: &str = "stock.reconcile";
/// Deletes published outbox events past their retention (a recurring schedule).
pub const JOB_OUTBOX_PRUNE: &str = "outbox.prune";
/// Forgets stale lost pre-lock answers (a recurring schedule).
pub const JOB_PRUNE_LOST_ANSWERS: &str = "orders.prune_lost_answers";

/// Attempts before a job is dead (kept, with its last error, for a redrive).
const MAX_ATTEMPTS: i32 = 10;

/// The facts every order event carries.
pub struct OrderFacts<'a> {
    pub id: Uuid,
    pub user_id: &'a str,
    pub sku_id: &'a str,
    pub store_id: &'a str,
    pub quantity: i32,
    pub amount_cents: i64,
}

impl<'a> From<&'a OrderRow> for OrderFacts<'a> {
    fn from(o: &'a OrderRow) -> Self {
        OrderFacts {
            id: o.id,
            user_id: &o.user_id,
            sku_id: &o.sku_id,
            store_id: &o.store_id,
            quantity: o.quantity,
            amount_cents: o.amount_cents,
        }
    }
}

impl<'a> From<&'a postgres_store::orders::NewOrder<'a>> for OrderFacts<'a> {
    fn from(o: &'a postgres_store::orders::NewOrder<'a>) -> Self {
        OrderFacts {
            id: o.id,
            user_id: o.user_id,
            sku_id: o.sku_id,
            store_id: o.store_id,
            quantity: o.quantity,
            amount_cents: o.amount_cents,
        }
    }
}

pub fn order_event<'a>(
    event_type: &'a str,
    order: impl Into<OrderFacts<'a>>,
    extra: serde_json::Value,
) -> OutboxEvent<'a> {
    let o = order.into();
    let mut payload = json!({
        "order_id": o.id,
        "user_id": o.user_id,
        "sku_id": o.sku_id,
        "store_id": o.store_id,
        "quantity": o.quantity,
        "amount_cents": o.amount_cents,
    });
    if let (Some(p), Some(e)) = (payload.as_object_mut(), extra.as_object()) {
        p.extend(e.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    OutboxEvent {
        aggregate_type: "order",
        aggregate_id: o.id.to_string(),
        event_type,
        schema_version: 1,
        payload,
    }
}

/// Lapses the order at its pre-lock expiry (run by the scheduler).
pub fn expiry_job(order_id: Uuid, sku_id: &str, expires_at: DateTime<Utc>) -> NewJob {
    NewJob {
        kind: JOB_ORDER_EXPIRE.to_owned(),
        payload: json!({ "order_id": order_id, "sku_id": sku_id }),
        priority: Priority::P0,
        run_at: RunAt::At(expires_at),
        max_attempts: MAX_ATTEMPTS,
        dedupe_key: Some(expiry_job_key(order_id)),
    }
}

pub fn expiry_job_key(order_id: Uuid) -> String {
    format!("{JOB_ORDER_EXPIRE}:{order_id}")
}

/// The follow-up actions of a kept payment: deduct real stock, issue the voucher, notify the
/// buyer and the bar. One job per action, deduplicated by order.
pub fn follow_up_jobs(order: &OrderRow, due: RunAt) -> [NewJob; 3] {
    let job = |kind: &str, priority: Priority, payload: serde_json::Value| NewJob {
        kind: kind.to_owned(),
        payload,
        priority,
        run_at: due,
        max_attempts: MAX_ATTEMPTS,
        dedupe_key: Some(format!("{kind}:{}", order.id)),
    };
    [
        job(
            JOB_STOCK_DEDUCT,
            Priority::P0,
            json!({ "order_id": order.id, "sku_id": order.sku_id, "quantity": order.quantity }),
        ),
        job(
            JOB_VOUCHER_ISSUE,
            Priority::P0,
            json!({ "order_id": order.id, "user_id": order.user_id, "store_id": order.store_id }),
        ),
        job(
            JOB_ORDER_NOTIFY,
            Priority::P1,
            json!({ "order_id": order.id, "user_id": order.user_id, "store_id": order.store_id }),
        ),
    ]
}

/// Attempts of the money jobs (`payment.check`, `payment.refund`) before they are archived as
/// compensation failures: only errors of our own count (the database, the pre-lock); "not
/// paid yet" and a provider that cannot take a refund now are snoozes, which spend none, so
/// these jobs live as long as their payment is open or its money owed.
pub const MONEY_JOB_ATTEMPTS: i32 = 20;

/// Checks for a started payment at the provider until it is resolved (compensation for a
/// lost callback). Rescheduled by the worker, not re-inserted: one job per payment, which
/// lives as long as the payment is open (see [`MONEY_JOB_ATTEMPTS`]).
pub fn payment_check_job(payment_id: Uuid, due: RunAt) -> NewJob {
    NewJob {
        kind: JOB_PAYMENT_CHECK.to_owned(),
        payload: json!({ "payment_id": payment_id }),
        priority: Priority::P0,
        run_at: due,
        max_attempts: MONEY_JOB_ATTEMPTS,
        dedupe_key: Some(payment_check_key(payment_id)),
    }
}

pub fn payment_check_key(payment_id: Uuid) -> String {
    format!("{}{payment_id}", payment_check_key_prefix())
}

/// What every payment check's key starts with (the payment id follows, as Postgres prints a
/// uuid): for a sweep that looks jobs up by payment in SQL.
pub fn payment_check_key_prefix() -> String {
    format!("{JOB_PAYMENT_CHECK}:")
}

pub fn refund_job(
    payment_id: uuid::Uuid,
    order: &OrderRow,
    amount_cents: i64,
    reason: &str,
) -> NewJob {
    NewJob {
        kind: JOB_PAYMENT_REFUND.to_owned(),
        payload: json!({
            "payment_id": payment_id, "order_id": order.id,
            "amount_cents": amount_cents, "reason": reason,
        }),
        priority: Priority::P0,
        run_at: RunAt::In(std::time::Duration::ZERO),
        max_attempts: MONEY_JOB_ATTEMPTS,
        dedupe_key: Some(refund_job_key(payment_id)),
    }
}

pub fn refund_job_key(payment_id: Uuid) -> String {
    format!("{}{payment_id}", refund_job_key_prefix())
}

/// What every refund job's key starts with (see [`payment_check_key_prefix`]).
pub fn refund_job_key_prefix() -> String {
    format!("{JOB_PAYMENT_REFUND}:")
}
