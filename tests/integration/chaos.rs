//! The compensation chaos run, on the real binaries (order-api, prelock-service, the
//! simulator, two compensation workers), real Postgres and Redis:
//! - 2,000 orders paid; 30 % of callbacks dropped, 10 % duplicated, 30 % of provider
//!   queries timing out, refunds failing (10 %) or answering too late (30 %);
//! - 1 % of payments the provider's query can never find (archived as failures);
//! - 5 % of orders cancelled right after the buyer paid: the callback that came first makes
//!   the cancel too late (the order stays paid); where it was lost, the cancel wins, and the
//!   check it brings forward finds the money at the provider and refunds it;
//! - worker B killed with SIGKILL five times during the run and restarted.
//!
//! Every paid order must end PAID (or, for the broken queries, PAID by a callback or
//! archived), with one transition, one OrderPaid and one set of follow-up jobs; every
//! refund paid exactly once; and the money invariant holds against the provider's books. The run prints its figures, including the time from "provider
//! says paid" to PAID. `CHAOS_ORDERS` and `CHAOS_FIRST_CHECK_MS` (order-api's
//! `PAYMENT_FIRST_CHECK_MS`; 5000 by default, 30000 for the paper's plain 30 s poll) change
//! the run; `scripts/bench.sh compensation` runs both.

use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::binaries::{Proc, Services};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Plan {
    /// The buyer pays.
    Pay,
    /// The provider's query can never find it; the buyer pays.
    Broken,
    /// The buyer pays, then cancels: kept if the callback came first, else paid back.
    PayThenCancel,
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn scalar(db: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_every_paid_order_is_paid_once_though_callbacks_queries_and_a_worker_fail() {
    let orders = env_num("CHAOS_ORDERS", 2000) as usize;
    let first_check = env_num("CHAOS_FIRST_CHECK_MS", 5000);
    let started = Instant::now();
    let s = Arc::new(
        Services::start(
            &[("PG_MAX_CONNECTIONS", "12".to_owned())],
            &[("PAYMENT_FIRST_CHECK_MS", first_check.to_string())],
        )
        .await,
    );
    let db = sqlx::PgPool::connect(&s.db).await.unwrap();
    s.put_sku("sku-chaos", "bar-chaos", 1_800, orders as i64 + 10)
        .await;
    s.set_faults(json!({
        "drop_rate": 0.3, "duplicate_rate": 0.1, "duplicate_count": 1,
        "query_timeout_rate": 0.3, "query_timeout_ms": 5000,
        "refund_error_rate": 0.1, "refund_timeout_rate": 0.3,
    }))
    .await;
    let (_a, worker_a) = s.compensation_worker(&[]).await;
    let (b, _) = s.compensation_worker(&[]).await;

    // worker B dies by SIGKILL five times while the run goes on, and comes back each time
    let killer = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut b: Proc = b;
            let mut kills = 0;
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                b.child.kill().expect("SIGKILL worker B");
                b.child.wait().expect("reap worker B");
                kills += 1;
                tokio::time::sleep(Duration::from_millis(300)).await;
                b = s.compensation_worker(&[]).await.0;
            }
            (b, kills)
        })
    };

    // the orders: created, paid (or cancelled and paid), 32 buyers at a time
    let gate = Arc::new(Semaphore::new(32));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..orders {
        let (s, gate) = (s.clone(), gate.clone());
        let plan = match i % 100 {
            0 => Plan::Broken,
            n if n % 20 == 1 => Plan::PayThenCancel,
            _ => Plan::Pay,
        };
        tasks.spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            let user = format!("chaos-{i}");
            let (order, payment, _) = s
                .order_with_payment(
                    &user,
                    &format!("k-{i}"),
                    ("sku-chaos", "bar-chaos"),
                    ["wechat", "alipay", "douyin"][i % 3],
                )
                .await;
            if plan == Plan::Broken {
                s.break_query(&payment, true).await;
            }
            s.pay(&payment).await;
            if plan == Plan::PayThenCancel {
                s.cancel_unless_paid(&user, &order).await;
            }
            (order, payment, plan)
        });
    }
    let mut runs = Vec::with_capacity(orders);
    while let Some(r) = tasks.join_next().await {
        runs.push(r.unwrap());
    }
    let paid_by = started.elapsed();
    println!("chaos: {orders} orders created and paid in {paid_by:.1?}");

    // wait for every order to settle, showing progress
    let count_of = |plan: Plan| runs.iter().filter(|r| r.2 == plan).count() as i64;
    let (pay_n, broken_n, cancel_n) = (
        count_of(Plan::Pay),
        count_of(Plan::Broken),
        count_of(Plan::PayThenCancel),
    );
    let cancelled: Vec<uuid::Uuid> = runs
        .iter()
        .filter(|r| r.2 == Plan::PayThenCancel)
        .map(|r| r.0.parse().unwrap())
        .collect();
    let settle_deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let (paid, refunded, cancel_done, broken_done): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT
               (SELECT count(*) FROM orders WHERE state = 'PAID' AND NOT id = ANY($1)),
               (SELECT count(*) FROM payments WHERE status = 'REFUNDED'),
               (SELECT count(*) FROM orders WHERE id = ANY($1) AND state IN ('PAID', 'REFUNDED')),
               (SELECT count(*) FROM compensation_failure WHERE status = 'open')",
        )
        .bind(&cancelled)
        .fetch_one(&db)
        .await
        .unwrap();
        // broken payments end PAID (their callback came) or archived; a paid-then-cancelled
        // order stays PAID (the callback was first) or is REFUNDED
        let settled = paid + broken_done >= pay_n + broken_n && cancel_done >= cancel_n;
        println!(
            "chaos: {:>5.1}s paid {paid}/{} cancelled after paying {cancel_done}/{cancel_n} (refunded {refunded}) archived {broken_done}",
            started.elapsed().as_secs_f64(),
            pay_n + broken_n
        );
        if settled {
            break;
        }
        assert!(
            Instant::now() < settle_deadline,
            "the run did not settle in time"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let settled_in = started.elapsed();
    let (_b, kills) = killer.await.unwrap();

    // every paid order: PAID exactly once (version 2: one transition), one OrderPaid
    for (order, payment, plan) in &runs {
        let (state, version): (String, i32) =
            sqlx::query_as("SELECT state, version FROM orders WHERE id = $1::uuid")
                .bind(order)
                .fetch_one(&db)
                .await
                .unwrap();
        match plan {
            Plan::Pay => assert_eq!((state.as_str(), version), ("PAID", 2), "order {order}"),
            Plan::Broken => {
                let archived: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM compensation_failure WHERE payment_id = $1::uuid AND status = 'open'",
                )
                .bind(payment)
                .fetch_one(&db)
                .await
                .unwrap();
                assert!(
                    (state == "PAID" && version == 2 && archived == 0)
                        || (state == "PENDING" && archived == 1),
                    "broken order {order}: {state} v{version}, archived {archived}"
                );
            }
            // paid by its callback before the cancel (PAID, v2), or cancelled (v2), the money
            // found by the check (REFUND_PENDING, v3) and paid back (REFUNDED, v4)
            Plan::PayThenCancel => assert!(
                matches!((state.as_str(), version), ("PAID", 2) | ("REFUNDED", 4)),
                "order {order}: {state} v{version}"
            ),
        }
    }
    let twice = |sql: &'static str| {
        let db = db.clone();
        async move { scalar(&db, sql).await }
    };
    assert_eq!(
        twice("SELECT count(*) FROM (SELECT aggregate_id FROM outbox WHERE event_type = 'OrderPaid' GROUP BY 1 HAVING count(*) > 1) d").await,
        0,
        "an order paid twice"
    );
    assert_eq!(
        twice("SELECT count(*) FROM (SELECT payment_id FROM payment_events WHERE outcome IN ('PAID', 'REFUND_REQUIRED') GROUP BY 1 HAVING count(*) > 1) d").await,
        0,
        "a payment applied twice"
    );
    assert_eq!(
        twice("SELECT count(*) FROM (SELECT dedupe_key FROM delayed_job_all WHERE dedupe_key IS NOT NULL GROUP BY 1 HAVING count(*) > 1) d").await,
        0,
        "a follow-up job written twice"
    );
    // an order that was ever paid and kept its money has one set of follow-ups
    let paid_orders = scalar(&db, "SELECT count(*) FROM orders WHERE state = 'PAID'").await;
    for kind in ["stock.deduct", "voucher.issue", "order.notify"] {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM delayed_job_all WHERE kind = $1")
            .bind(kind)
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(n, paid_orders, "{kind} jobs");
    }

    // every refund paid exactly once at the provider, and no kept payment refunded
    let mut refunds_paid = 0;
    for (order, payment, _) in &runs {
        let sim: Value = s.sim_payment(payment).await;
        let n = sim["refunds"].as_array().map_or(0, Vec::len);
        let refunded = integration_tests::order_state(&db, order).await == "REFUNDED";
        assert_eq!(
            n,
            usize::from(refunded),
            "refunds of payment {payment}: {sim}"
        );
        refunds_paid += n;
    }
    let money = integration_tests::assert_money_invariant(
        &s.http,
        &s.gateway,
        &db,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(money.paid, orders, "every payment was paid at the provider");
    assert_eq!(money.refunded, refunds_paid);

    // the figures
    let by_source: Vec<(String, i64, f64, f64, f64)> = sqlx::query_as(
        "SELECT e.source, count(*),
            percentile_cont(0.5) WITHIN GROUP (ORDER BY l.ms),
            percentile_cont(0.99) WITHIN GROUP (ORDER BY l.ms), max(l.ms)
         FROM payment_events e JOIN payments p ON p.id = e.payment_id
         CROSS JOIN LATERAL (SELECT (extract(epoch FROM e.received_at - p.paid_at) * 1000)::float8 AS ms) l
         WHERE e.outcome = 'PAID'
         GROUP BY e.source ORDER BY e.source",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    let outcomes: Vec<(String, i64)> = sqlx::query_as(
        "SELECT h->>'outcome', count(*) FROM payment_check_state, jsonb_array_elements(history) h
         GROUP BY 1 ORDER BY 2 DESC",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    let sim_faults: (i64, i64) = {
        let mut dropped = 0;
        let mut duplicated = 0;
        for (_, payment, _) in &runs {
            let sim = s.sim_payment(payment).await;
            dropped += i64::from(sim["callback_dropped"] == true);
            duplicated += i64::from(sim["callbacks_planned"].as_u64().unwrap_or(0) > 1);
        }
        (dropped, duplicated)
    };
    let metrics = s.metrics(&worker_a).await;
    let hedges = integration_tests::metric_value(&metrics, "compensation_query_hedges_total", &[]);
    println!("chaos: ---- figures ----");
    println!(
        "chaos: orders {orders} (pay {pay_n}, broken query {broken_n}, pay then cancel {cancel_n}); first check {first_check} ms, poll 30 s"
    );
    println!(
        "chaos: callbacks dropped {} duplicated {}; worker B SIGKILLed {kills} times; worker A sent {} hedged queries",
        sim_faults.0,
        sim_faults.1,
        hedges.unwrap_or(0.0)
    );
    println!(
        "chaos: created and paid in {paid_by:.1?}, settled in {settled_in:.1?}; refunds paid {refunds_paid}; archived {}",
        scalar(&db, "SELECT count(*) FROM compensation_failure").await
    );
    println!("chaos: check outcomes (last 20 per payment): {outcomes:?}");
    println!("chaos: provider says paid -> PAID, by source: count, p50 / p99 / max ms");
    for (source, n, p50, p99, max) in &by_source {
        println!("chaos:   {source:<13} {n:>5}  {p50:>8.0} / {p99:>8.0} / {max:>8.0}");
    }
    let compensated = by_source
        .iter()
        .find(|r| r.0 == "compensation")
        .map_or(0, |r| r.1);
    assert!(compensated > 0, "no payment was compensated: {by_source:?}");
    assert!(kills == 5);
    integration_tests::assert_emitted_events_match_schemas(
        &db,
        &[
            "OrderCreated",
            "OrderCancelled",
            "OrderPaid",
            "RefundRequested",
            "OrderRefunded",
        ],
    )
    .await;
}
