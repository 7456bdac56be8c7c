//! One payment check, one refund, one replay: what the worker's jobs and the ops API run.
//!
//! A check asks the provider's query API, and each answer is its own outcome (counted in
//! `compensation_attempts_total{outcome}`, kept in `payment_check_state`):
//! - `paid`: applied through `apply_payment` under the Redis lock (see [`Checker::compensate`]);
//! - `not_paid`: checked again after the poll interval (shorter in fast mode) while the order
//!   is payable, as a snooze: "not paid yet" spends no attempt, so a check lives as long as
//!   its order can take money, however long its pre-lock; once it cannot (cancelled, expired;
//!   the cancel or the expiry brings the check forward), the payment is closed at the
//!   provider (`order_closed`), so no money can arrive for it unseen; `paid_while_closing` if
//!   the buyer paid first (checked again at once: applied, and refunded);
//! - `closed_at_provider`: the provider closed it unpaid: the payment is `CLOSED`, done;
//! - `gateway_timeout`, `gateway_error` (5xx, unreachable), `unknown_at_provider` (4xx),
//!   `bad_answer` (paid without an event id, another payment's answer): provider failures,
//!   retried with exponential backoff and jitter (1 s, 3 s, 9 s ..., cap 30 s); after the last
//!   of `COMPENSATION_MAX_ATTEMPTS` (5) in a row the payment is archived as a failure;
//! - `apply_rejected`: the provider's answer cannot be applied (an amount that differs):
//!   archived at once, retrying cannot help;
//! - `failed`: an error of ours (the database, the pre-lock): retried with the engine's
//!   backoff, and the only outcome that spends one of the job's attempts; the last one
//!   archives the payment (`worker_error`) rather than letting the job die unseen.
//!
//! A refund (`payment.refund`) is owed until the provider pays it: a provider that times out
//! or fails is asked again with the same backoff (capped), for as long as it takes, as a
//! snooze; after `COMPENSATION_MAX_ATTEMPTS` failures in a row the payment is archived
//! (`refund_failed`, alerted, replayable) and still retried, and the refund landing resolves
//! it. A refund the provider refuses (4xx) is archived (`refund_rejected`) and stops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use chrono::Utc;
use domain::sla::{PollMode, SlaTrigger};
use domain::{OrderState, PaymentStatus, Provider};
use fulfillment::events;
use fulfillment::payments::{ApplyOutcome, PaymentConfirmation, Source};
use fulfillment::{Fulfillment, FulfillmentError};
use gateway_protocol::{CloseOutcome, GatewayClient, GatewayError, PaymentQuery, RefundRequest};
use job_engine::{Job, Outcome};
use postgres_store::effects::{self, OutboxEvent};
use postgres_store::payments::PaymentRow;
use postgres_store::PgStore;
use prelock_api::PrelockClient;
use prometheus::{HistogramVec, IntCounterVec};
use redis::aio::ConnectionManager;
use serde_json::json;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::alert::Alert;
use crate::records;

/// Retry policy for provider failures (paper: 1 s / 3 s / 9 s, cap 30 s, 5 attempts).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: i32,
    pub base: Duration,
    pub factor: f64,
    pub cap: Duration,
}

impl RetryPolicy {
    /// The wait after the `failures`-th provider failure in a row: `base * factor^(n-1)`,
    /// capped, then jittered by ±20 % (`jitter` in [0, 1)) so a burst of failures does not
    /// retry in lockstep; never above the cap.
    pub fn backoff(&self, failures: i32, jitter: f64) -> Duration {
        let raw = self.base.as_secs_f64() * self.factor.powi(failures.max(1) - 1);
        let capped = raw.min(self.cap.as_secs_f64());
        Duration::from_secs_f64((capped * (0.8 + 0.4 * jitter)).min(self.cap.as_secs_f64()))
    }
}

/// What a check needs.
pub struct Checker {
    pub store: PgStore,
    /// Hedged queries: another copy of a query that has not answered after `hedge_after`,
    /// up to `hedges` extra copies (0: off). See [`Checker::query`].
    pub hedge_after: Duration,
    pub hedges: u32,
    pub hedged: IntCounterVec,
    pub fulfillment: Fulfillment<PrelockClient>,
    pub gateway: GatewayClient,
    pub redis: ConnectionManager,
    pub lock_ttl: Duration,
    /// Bound on each compensation-lock call to Redis, reconnects included.
    pub redis_timeout: Duration,
    pub check_interval: Duration,
    /// The poll interval while the SLA trigger says fast.
    pub fast_interval: Duration,
    pub retry: RetryPolicy,
    pub attempts: IntCounterVec,
    pub refunds: IntCounterVec,
    pub failures: IntCounterVec,
    pub paid_latency: HistogramVec,
    pub alerts: mpsc::UnboundedSender<Alert>,
    pub sla: Mutex<SlaTrigger>,
    /// Since when the worker runs: the SLA trigger's clock.
    pub epoch: std::time::Instant,
    pub fast: AtomicBool,
}

/// What applying a provider's "paid" did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compensated {
    Paid,
    RefundRequired,
    /// Another path (the callback, another worker) applied it first.
    Duplicate,
    /// Another worker holds the lock: it is applying this payment now.
    Locked,
}

#[derive(Debug)]
pub enum CompensateError {
    /// The provider said paid, but not in a form that can be applied.
    BadAnswer(String),
    Apply(FulfillmentError),
}

impl CompensateError {
    /// Whether another attempt may succeed (a database or pre-lock hiccup, a conflict).
    pub fn transient(&self) -> bool {
        use FulfillmentError as F;
        matches!(
            self,
            CompensateError::Apply(
                F::Db(_) | F::PrelockUnavailable(_) | F::PrelockNotLoaded | F::Conflict
            )
        )
    }
}

impl std::fmt::Display for CompensateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CompensateError::BadAnswer(m) => write!(f, "provider answer unusable: {m}"),
            CompensateError::Apply(e) => write!(f, "{e}"),
        }
    }
}

/// Labels of provider failures (they count toward the retry budget).
pub fn provider_failure_label(e: &GatewayError) -> &'static str {
    match e {
        GatewayError::Timeout(_) => "gateway_timeout",
        GatewayError::Unavailable(_) => "gateway_error",
        GatewayError::Rejected(_) => "unknown_at_provider",
    }
}

impl Checker {
    fn now_ms(&self) -> i64 {
        self.epoch.elapsed().as_millis() as i64
    }

    /// The poll mode now (see `domain::sla`).
    pub fn poll_mode(&self) -> PollMode {
        let now = self.now_ms();
        let mode = self.sla.lock().unwrap_or_else(|p| p.into_inner()).mode(now);
        self.fast.store(mode == PollMode::Fast, Ordering::Relaxed);
        mode
    }

    pub async fn check(&self, job: &Job) -> Outcome {
        let (label, outcome) = self.check_inner(job).await;
        self.attempts.with_label_values(&[label]).inc();
        self.unless_last(job, outcome).await
    }

    /// A failure of ours on the job's last attempt: the payment is archived (alerted,
    /// replayable) instead of the job dying where nobody looks. If even that fails (the
    /// database is down), the job dies, and the sweep gives the payment a new run later.
    async fn unless_last(&self, job: &Job, outcome: Outcome) -> Outcome {
        let error = match &outcome {
            Outcome::Retry(e) | Outcome::RetryAfter(_, e) if job.attempt >= job.max_attempts => {
                e.clone()
            }
            _ => return outcome,
        };
        let Ok((payment_id, payment)) = self.payment_of(job).await else {
            return outcome;
        };
        match self
            .archive(&payment, payment_id, "worker_error", &error)
            .await
        {
            (_, Outcome::Done) => Outcome::Done,
            (_, _) => outcome,
        }
    }

    async fn check_inner(&self, job: &Job) -> (&'static str, Outcome) {
        let (payment_id, payment) = match self.payment_of(job).await {
            Ok(v) => v,
            Err(failed) => return failed,
        };
        if payment.status != PaymentStatus::Created {
            // the webhook (or an earlier check) resolved it, or the provider closed it
            return self.noted(payment_id, "duplicate", Outcome::Done).await;
        }
        let answer = match self
            .query(payment.provider, Lookup::Payment(payment_id.to_string()))
            .await
        {
            Ok(a) => a,
            Err(e) => {
                return self
                    .provider_failure(&payment, provider_failure_label(&e), &e.to_string())
                    .await
            }
        };
        match answer.status.as_str() {
            "PAID" => {}
            "CREATED" => return self.not_paid(&payment).await,
            "CLOSED" | "FAILED" => {
                if let Err(e) =
                    postgres_store::payments::close_payment(&self.store.pool, payment_id).await
                {
                    return ("failed", Outcome::Retry(e.to_string()));
                }
                tracing::info!(%payment_id, status = %answer.status, "payment closed at the provider");
                return self
                    .noted(payment_id, "closed_at_provider", Outcome::Done)
                    .await;
            }
            other => {
                let e = format!("unknown payment status {other:?}");
                return self.provider_failure(&payment, "bad_answer", &e).await;
            }
        }
        match self
            .compensate(payment_id, &payment, &answer, Source::Compensation)
            .await
        {
            Ok(Compensated::Paid) => {
                tracing::info!(%payment_id, "lost callback compensated: order paid");
                self.noted(payment_id, "paid", Outcome::Done).await
            }
            Ok(Compensated::RefundRequired) => {
                tracing::warn!(%payment_id, "paid for an order that cannot keep it: refund scheduled");
                self.noted(payment_id, "refund_required", Outcome::Done)
                    .await
            }
            Ok(Compensated::Duplicate) => self.noted(payment_id, "duplicate", Outcome::Done).await,
            Ok(Compensated::Locked) => (
                "locked",
                Outcome::Snooze(Duration::from_secs(1), "another worker holds it".into()),
            ),
            Err(e @ CompensateError::BadAnswer(_)) => {
                self.provider_failure(&payment, "bad_answer", &e.to_string())
                    .await
            }
            Err(e) if e.transient() => ("failed", Outcome::Retry(e.to_string())),
            Err(e) => {
                let _ = records::record_check(
                    &self.store.pool,
                    payment_id,
                    "apply_rejected",
                    Some(&e.to_string()),
                    false,
                )
                .await;
                self.archive(&payment, payment_id, "apply_rejected", &e.to_string())
                    .await
            }
        }
    }

    /// The provider says the payment is not paid (yet): checked again after the poll
    /// interval while its order can take money (a snooze: no attempt spent); once it cannot
    /// (cancelled, expired, paid by another payment), closed at the provider, so the buyer
    /// cannot pay it any more: until that is done, money could still arrive with no callback,
    /// and be lost. The check's decision, and a replay's.
    pub async fn not_paid(&self, payment: &PaymentRow) -> (&'static str, Outcome) {
        let payment_id = payment.id;
        let payable =
            match postgres_store::orders::find_order(&self.store.pool, payment.order_id).await {
                Ok(Some(o)) => o.state == OrderState::Pending,
                Ok(None) => false,
                Err(e) => return ("failed", Outcome::Retry(e.to_string())),
            };
        if payable {
            let wait = match self.poll_mode() {
                PollMode::Fast => self.fast_interval,
                PollMode::Normal => self.check_interval,
            };
            let not_yet = Outcome::Snooze(wait, "not paid yet".into());
            return self.noted(payment_id, "not_paid", not_yet).await;
        }
        match self
            .gateway
            .close_payment(payment.provider, &payment_id.to_string())
            .await
        {
            Ok(CloseOutcome::Closed) => {
                if let Err(e) =
                    postgres_store::payments::close_payment(&self.store.pool, payment_id).await
                {
                    return ("failed", Outcome::Retry(e.to_string()));
                }
                tracing::info!(%payment_id, "order closed: payment closed at the provider");
                self.noted(payment_id, "order_closed", Outcome::Done).await
            }
            // paid just now: the next check applies it (and the money goes back)
            Ok(CloseOutcome::Paid) => {
                let again = Outcome::Snooze(Duration::ZERO, "paid while closing".into());
                self.noted(payment_id, "paid_while_closing", again).await
            }
            Err(e) => {
                self.provider_failure(payment, provider_failure_label(&e), &e.to_string())
                    .await
            }
        }
    }

    /// Asks the provider's query API, hedged (as in "The Tail at Scale"): when a query has
    /// not answered after `hedge_after`, another copy goes out, up to `hedges` extra; the
    /// first answer wins and the rest are dropped. A query is a read, so copies are
    /// harmless, and they go out only for slow queries: a provider node that hangs costs
    /// `hedge_after`, not the whole timeout and a backoff. A provider error (5xx, 4xx) is
    /// not hedged: it is an answer, and counts as a failure once every copy has ended.
    pub async fn query(
        &self,
        provider: Provider,
        lookup: Lookup,
    ) -> Result<PaymentQuery, GatewayError> {
        let mut inflight = tokio::task::JoinSet::new();
        let launch = |set: &mut tokio::task::JoinSet<_>| {
            let gateway = self.gateway.clone();
            let lookup = lookup.clone();
            set.spawn(async move {
                match &lookup {
                    Lookup::Payment(id) => gateway.query_payment(provider, id).await,
                    Lookup::Transaction(t) => gateway.query_transaction(provider, t).await,
                }
            });
        };
        launch(&mut inflight);
        let mut extra = 0;
        let mut last_error: Option<GatewayError> = None;
        // a 5xx or a refusal came back: the provider answered; no more copies
        let mut answered = false;
        loop {
            let can_hedge = extra < self.hedges && !self.hedge_after.is_zero() && !answered;
            tokio::select! {
                done = inflight.join_next(), if !inflight.is_empty() => {
                    let result = match done.expect("a query in flight") {
                        Ok(r) => r,
                        Err(join) => Err(GatewayError::Unavailable(join.to_string())),
                    };
                    let e = match result {
                        Ok(answer) => return Ok(answer),
                        Err(e) => e,
                    };
                    let timed_out = matches!(e, GatewayError::Timeout(_));
                    answered |= !timed_out;
                    // keep the most telling error: an answer over a timeout
                    if !timed_out || last_error.is_none() {
                        last_error = Some(e);
                    }
                    if inflight.is_empty() {
                        if timed_out && can_hedge {
                            extra += 1;
                            self.hedged.with_label_values::<&str>(&[]).inc();
                            launch(&mut inflight);
                        } else {
                            return Err(last_error.expect("an error"));
                        }
                    }
                }
                _ = tokio::time::sleep(self.hedge_after), if can_hedge => {
                    extra += 1;
                    self.hedged.with_label_values::<&str>(&[]).inc();
                    launch(&mut inflight);
                }
            }
        }
    }

    /// Keeps a check's outcome (not a provider failure: the failure run ends) and returns it.
    async fn noted(
        &self,
        payment_id: Uuid,
        label: &'static str,
        outcome: Outcome,
    ) -> (&'static str, Outcome) {
        if let Err(e) =
            records::record_check(&self.store.pool, payment_id, label, None, false).await
        {
            tracing::warn!(error = %e, %payment_id, "check outcome not recorded");
        }
        (label, outcome)
    }

    /// A provider failure: retried after the backoff, archived after the last attempt.
    async fn provider_failure(
        &self,
        payment: &PaymentRow,
        label: &'static str,
        error: &str,
    ) -> (&'static str, Outcome) {
        let failures =
            match records::record_check(&self.store.pool, payment.id, label, Some(error), true)
                .await
            {
                Ok(n) => n,
                Err(e) => return (label, Outcome::Retry(e.to_string())),
            };
        if failures < self.retry.max_attempts {
            // counted here, in a row, not as the job's attempts
            let wait = self.retry.backoff(failures, fastrand::f64());
            return (label, Outcome::Snooze(wait, error.to_owned()));
        }
        let (_, outcome) = self.archive(payment, payment.id, label, error).await;
        (label, outcome)
    }

    /// Archives the payment as a compensation failure with its context, writes
    /// `CompensationFailed` to the outbox in the same transaction, and raises the alert.
    pub async fn archive(
        &self,
        payment: &PaymentRow,
        payment_id: Uuid,
        reason: &'static str,
        error: &str,
    ) -> (&'static str, Outcome) {
        let archived = async {
            let mut tx = self.store.begin().await?;
            let failure = records::archive(&mut tx, payment_id, reason, error).await?;
            if let Some(f) = &failure {
                effects::append_event(
                    &mut tx,
                    failed_event(payment, f.id, reason, error, f.attempts),
                )
                .await?;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(failure)
        }
        .await;
        match archived {
            Ok(Some(f)) => {
                tracing::error!(%payment_id, failure_id = f.id, reason, error, "compensation failed: archived for manual replay");
                self.failures.with_label_values(&[reason]).inc();
                let _ = self.alerts.send(Alert {
                    failure_id: f.id,
                    payment_id,
                    order_id: payment.order_id,
                    reason: reason.to_owned(),
                    last_error: error.to_owned(),
                });
                ("archived", Outcome::Done)
            }
            // archived before (a retried job): nothing new
            Ok(None) => ("archived", Outcome::Done),
            Err(e) => ("failed", Outcome::Retry(format!("archiving: {e}"))),
        }
    }

    /// The provider says `answer` (paid): take the lock `compensate:order:{payment_id}` and go
    /// through `apply_payment`. The lock only saves work: if it expires mid-way, the payment
    /// row lock and the order's version check still allow one transition.
    pub async fn compensate(
        &self,
        payment_id: Uuid,
        payment: &PaymentRow,
        answer: &PaymentQuery,
        source: Source,
    ) -> Result<Compensated, CompensateError> {
        if answer.payment_id != payment_id.to_string() {
            return Err(CompensateError::BadAnswer(format!(
                "the answer is for payment {}, not {payment_id}",
                answer.payment_id
            )));
        }
        let (Some(event_id), Some(paid_at)) = (answer.event_id.clone(), answer.paid_at) else {
            return Err(CompensateError::BadAnswer(
                "paid without an event id or a time".into(),
            ));
        };
        if let Ok(missing) = records::missing_events(&self.store.pool, payment.order_id).await {
            let now = self.now_ms();
            self.sla
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_missing(now, &payment_id.to_string(), missing);
        }
        let conf = PaymentConfirmation {
            provider: payment.provider,
            event_id,
            payment_id,
            amount_cents: answer.amount_cents,
            paid_at,
        };
        let key = format!("compensate:order:{payment_id}");
        let token = Uuid::new_v4().to_string();
        let locked = match self.lock(&key, &token).await {
            Ok(true) => true,
            Ok(false) => return Ok(Compensated::Locked),
            // the lock only saves work: without Redis, the version check still decides
            // (a lock whose answer timed out may still land: it expires after its ttl)
            Err(e) => {
                tracing::warn!(error = %e, %payment_id, "compensation lock unavailable; applying without it");
                false
            }
        };
        let applied = self.fulfillment.apply_payment(&conf, source).await;
        if locked {
            if let Err(e) = self.unlock(&key, &token).await {
                tracing::warn!(error = %e, %payment_id, "compensation lock not released; it expires");
            }
        }
        let done = match applied.map_err(CompensateError::Apply)? {
            ApplyOutcome::Paid => Compensated::Paid,
            ApplyOutcome::RefundRequired { .. } => Compensated::RefundRequired,
            ApplyOutcome::Duplicate => return Ok(Compensated::Duplicate),
        };
        let late = (Utc::now() - paid_at).num_milliseconds().max(0) as f64 / 1000.0;
        self.paid_latency
            .with_label_values(&[source.as_str()])
            .observe(late);
        Ok(done)
    }

    /// The payment a job's payload names, or the outcome for a job that names none.
    async fn payment_of(&self, job: &Job) -> Result<(Uuid, PaymentRow), (&'static str, Outcome)> {
        let Some(payment_id) = job.payload["payment_id"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
        else {
            return Err((
                "failed",
                Outcome::Permanent("payload has no payment_id".into()),
            ));
        };
        match postgres_store::payments::get_payment(&self.store.pool, payment_id).await {
            Ok(Some(p)) => Ok((payment_id, p)),
            Ok(None) => Err(("failed", Outcome::Permanent("unknown payment".into()))),
            Err(e) => Err(("failed", Outcome::Retry(e.to_string()))),
        }
    }

    pub async fn refund(&self, job: &Job) -> Outcome {
        let (label, outcome) = self.refund_inner(job).await;
        self.refunds.with_label_values(&[label]).inc();
        outcome
    }

    async fn refund_inner(&self, job: &Job) -> (&'static str, Outcome) {
        let (_, payment) = match self.payment_of(job).await {
            Ok(v) => v,
            Err(failed) => return failed,
        };
        // all of the money goes back, never an amount a job's payload names (a job written by
        // hand, or by a schedule, asking for less would settle the refund id for that); only a
        // payment marked as owed is paid back at all (`pay_back`)
        let amount = payment.amount_cents;
        if job.payload["amount_cents"].as_i64() != Some(amount) {
            tracing::warn!(payment_id = %payment.id, payload = %job.payload["amount_cents"],
                amount, "a refund job's amount is not the payment's: the payment's is paid back");
        }
        let (label, outcome) = self.pay_back(&payment, amount).await;
        (label, self.unless_last(job, outcome).await)
    }

    /// Pays a payment's money back at the provider (the refund job, and an operator's replay of
    /// a refund failure). The refund id is derived from the payment, so asking again after a
    /// timeout or a crash asks for the same refund: the provider pays it once.
    pub async fn pay_back(
        &self,
        payment: &PaymentRow,
        amount_cents: i64,
    ) -> (&'static str, Outcome) {
        let payment_id = payment.id;
        match payment.status {
            PaymentStatus::Refunded => return ("already_refunded", Outcome::Done),
            PaymentStatus::RefundRequired => {}
            other => {
                return (
                    "failed",
                    Outcome::Permanent(format!("payment is {}", other.as_str())),
                )
            }
        }
        let request = RefundRequest {
            // one refund per payment, the same id on every attempt: never paid twice
            refund_id: format!("rf-{payment_id}"),
            payment_id: payment_id.to_string(),
            amount_cents,
        };
        let refund = match self.gateway.refund(payment.provider, &request).await {
            Ok(r) => r,
            Err(e @ (GatewayError::Timeout(_) | GatewayError::Unavailable(_))) => {
                return self.refund_failure(payment, &e.to_string()).await;
            }
            Err(GatewayError::Rejected(e)) => {
                // retrying cannot help: an operator must look (replayable from the console)
                let _ = records::record_check(
                    &self.store.pool,
                    payment_id,
                    "refund_rejected",
                    Some(&e),
                    true,
                )
                .await;
                return match self
                    .archive(payment, payment_id, "refund_rejected", &e)
                    .await
                {
                    (_, Outcome::Done) => {
                        self.restated(payment, "refund_rejected", &e).await;
                        ("rejected", Outcome::Done)
                    }
                    (_, retry) => ("rejected", retry),
                };
            }
        };
        use FulfillmentError as F;
        match self
            .fulfillment
            .record_refund(payment_id, &refund.refund_id, refund.refunded_at)
            .await
        {
            Ok(_) => {
                let _ =
                    records::record_check(&self.store.pool, payment_id, "refunded", None, false)
                        .await;
                ("refunded", Outcome::Done)
            }
            Err(e @ (F::Db(_) | F::Conflict)) => ("failed", Outcome::Retry(e.to_string())),
            Err(e) => ("failed", Outcome::Permanent(e.to_string())),
        }
    }

    /// A payment already archived for one reason that now stands for another (a refund being
    /// retried, then refused: it stops): the failure says so, and the operator is told again.
    async fn restated(&self, payment: &PaymentRow, reason: &'static str, error: &str) {
        // restated and announced together: the dead-compensation topic learns it stopped
        let restated = async {
            let mut tx = self.store.begin().await?;
            let Some((failure_id, attempts)) =
                records::restate(&mut *tx, payment.id, reason, error).await?
            else {
                return Ok(None);
            };
            let event = failed_event(payment, failure_id, reason, error, attempts);
            effects::append_event(&mut tx, event).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(Some(failure_id))
        }
        .await;
        match restated {
            Ok(Some(failure_id)) => {
                tracing::error!(payment_id = %payment.id, failure_id, reason, error, "compensation failure now stands for another reason");
                self.failures.with_label_values(&[reason]).inc();
                let _ = self.alerts.send(Alert {
                    failure_id,
                    payment_id: payment.id,
                    order_id: payment.order_id,
                    reason: reason.to_owned(),
                    last_error: error.to_owned(),
                });
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(payment_id = %payment.id, error = %e, "failure not restated"),
        }
    }

    /// The provider could not take a refund now: asked again after the backoff (capped), for
    /// as long as the money is owed, without spending an attempt. After
    /// `COMPENSATION_MAX_ATTEMPTS` failures in a row the payment is archived (alerted once,
    /// replayable) and still retried: the refund landing resolves it.
    async fn refund_failure(&self, payment: &PaymentRow, error: &str) -> (&'static str, Outcome) {
        let failures = match records::record_check(
            &self.store.pool,
            payment.id,
            "refund_gateway_error",
            Some(error),
            true,
        )
        .await
        {
            Ok(n) => n,
            Err(e) => return ("failed", Outcome::Retry(e.to_string())),
        };
        if failures >= self.retry.max_attempts {
            let _ = self
                .archive(payment, payment.id, "refund_failed", error)
                .await;
        }
        let wait = self.retry.backoff(failures, fastrand::f64());
        ("gateway_error", Outcome::Snooze(wait, error.to_owned()))
    }

    async fn lock(&self, key: &str, token: &str) -> redis::RedisResult<bool> {
        let mut conn = self.redis.clone();
        let mut cmd = redis::cmd("SET");
        cmd.arg(key)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(self.lock_ttl.as_millis() as u64);
        let set = cmd.query_async::<Option<String>>(&mut conn);
        Ok(bounded(self.redis_timeout, set).await?.is_some())
    }

    /// Compare-and-delete: only the holder's token frees the lock (a lock that expired and was
    /// taken by another worker stays theirs).
    async fn unlock(&self, key: &str, token: &str) -> redis::RedisResult<()> {
        let mut conn = self.redis.clone();
        let script = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        );
        let mut call = script.key(key);
        call.arg(token);
        bounded(self.redis_timeout, call.invoke_async::<i64>(&mut conn)).await?;
        Ok(())
    }
}

/// A Redis call within `limit` as a whole (the client's own timeouts bound each connect and
/// answer, not the reconnect and its backoff between them).
async fn bounded<T>(
    limit: std::time::Duration,
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(redis::RedisError::from((
            redis::ErrorKind::IoError,
            "no answer within REDIS_TIMEOUT_MS",
        )))
    })
}

/// The `CompensationFailed` event of a payment archived (or restated) as `reason`.
fn failed_event<'a>(
    payment: &PaymentRow,
    failure_id: i64,
    reason: &'a str,
    error: &str,
    attempts: i32,
) -> OutboxEvent<'a> {
    OutboxEvent {
        aggregate_type: "order",
        aggregate_id: payment.order_id.to_string(),
        event_type: events::COMPENSATION_FAILED,
        schema_version: 1,
        payload: json!({
            "failure_id": failure_id, "order_id": payment.order_id,
            "payment_id": payment.id, "provider": payment.provider.as_str(),
            "reason": reason, "last_error": error, "attempts": attempts,
        }),
    }
}

/// How a query names the payment: our payment id, or the provider's transaction id.
#[derive(Debug, Clone)]
pub enum Lookup {
    Payment(String),
    Transaction(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_follows_the_paper_capped_and_jittered() {
        let p = RetryPolicy {
            max_attempts: 5,
            base: Duration::from_secs(1),
            factor: 3.0,
            cap: Duration::from_secs(30),
        };
        // no jitter at 0.5: 1 s, 3 s, 9 s, 27 s, then the cap
        let mid: Vec<u64> = (1..=6)
            .map(|n| p.backoff(n, 0.5).as_millis() as u64)
            .collect();
        assert_eq!(mid, [1000, 3000, 9000, 27000, 30000, 30000]);
        // jitter spreads ±20 %, never past the cap
        assert_eq!(p.backoff(1, 0.0).as_millis(), 800);
        assert_eq!(p.backoff(2, 0.999_999).as_millis(), 3599);
        assert_eq!(p.backoff(4, 0.999_999), Duration::from_secs(30));
        assert_eq!(p.backoff(0, 0.5), Duration::from_secs(1));
    }
}
