//! The whole path through the in-process stack: stock, buy, pay through the simulator's
//! signed callback, PAID; and cancel.

use std::time::Duration;

use integration_tests::{eventually, Stack};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn buy_pay_and_read_back_paid() {
    let s = Stack::start().await;
    s.put_sku("sku-beer", "bar-1", 9_900, 10).await;

    let (status, order) = s.create_order("alice", "k1", "sku-beer", "bar-1", 2).await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    assert_eq!(order["state"], "PENDING");
    assert_eq!(order["version"], 1);
    assert_eq!(order["amount_cents"], 19_800);
    let id = order["order_id"].as_str().unwrap().to_owned();
    assert!(order["expires_at"].as_str().is_some());

    let sku = s.get_sku("sku-beer").await;
    assert_eq!(
        (
            sku["stock_real"].as_i64(),
            sku["available"].as_i64(),
            sku["reserved"].as_i64()
        ),
        (Some(10), Some(8), Some(2))
    );

    let (payment_id, pay_url) = s.start_payment("alice", &id, "wechat").await;
    assert!(pay_url.contains(&payment_id));
    // asking again for the same provider returns the same open payment
    assert_eq!(s.start_payment("alice", &id, "wechat").await.0, payment_id);

    s.pay(&payment_id).await;
    let paid = eventually("order PAID", Duration::from_secs(10), || async {
        let (_, o) = s.get_order("alice", &id).await;
        (o["state"] == "PAID").then_some(o)
    })
    .await;
    assert_eq!(paid["version"], 2);

    // one OrderPaid event, three follow-up jobs due about 2 s after the payment, expiry job cancelled
    assert_eq!(
        s.count(&format!(
            "SELECT count(*) FROM outbox WHERE aggregate_id = '{id}' AND event_type = 'OrderPaid'"
        ))
        .await,
        1
    );
    let jobs: Vec<(String, f64)> = sqlx::query_as(
        "SELECT kind, extract(epoch FROM run_at - now())::float8 FROM delayed_job
         WHERE payload->>'order_id' = $1 AND state = 'scheduled' ORDER BY kind",
    )
    .bind(&id)
    .fetch_all(&s.pg)
    .await
    .unwrap();
    let kinds: Vec<&str> = jobs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["order.notify", "stock.deduct", "voucher.issue"]);
    assert!(
        jobs.iter()
            .all(|(_, due_in)| *due_in > -10.0 && *due_in <= 2.5),
        "{jobs:?}"
    );
    assert_eq!(s.count(&format!("SELECT count(*) FROM delayed_job WHERE dedupe_key = 'order.expire:{id}' AND state = 'cancelled'")).await, 1);
    assert_eq!(
        s.count(&format!(
            "SELECT count(*) FROM payments WHERE id = '{payment_id}' AND status = 'SUCCEEDED'"
        ))
        .await,
        1
    );

    // the paid reservation is pinned: it still holds its units and no longer lapses
    let (available, held, _) = s.assert_consistent("sku-beer").await;
    assert_eq!((available, held), (8, 2));
    let sku_id = domain::SkuId::parse("sku-beer").unwrap();
    let entries = s.prelock_app.redis.held(&sku_id).await.unwrap();
    assert_eq!(entries, vec![(id.clone(), 2, None)]);

    // a paid order cannot be cancelled
    let (status, err) = s
        .post_user("alice", &format!("/v1/orders/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(err["code"], "ERR_INVALID_TRANSITION");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_releases_stock_and_refuses_a_second_cancel() {
    let s = Stack::start().await;
    s.put_sku("sku-wine", "bar-2", 30_000, 1).await;
    let (_, order) = s.create_order("bob", "k1", "sku-wine", "bar-2", 1).await;
    let id = order["order_id"].as_str().unwrap().to_owned();

    // sold out for everyone else
    let (status, err) = s.create_order("carol", "k1", "sku-wine", "bar-2", 1).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(err["code"], "ERR_STOCK_SHORTAGE_PRELOCK");

    let (status, cancelled) = s
        .post_user("bob", &format!("/v1/orders/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["state"], "CANCELLED");
    assert_eq!(cancelled["version"], 2);
    let (available, held, _) = s.assert_consistent("sku-wine").await;
    assert_eq!((available, held), (1, 0));
    assert_eq!(s.count(&format!("SELECT count(*) FROM delayed_job WHERE dedupe_key = 'order.expire:{id}' AND state = 'cancelled'")).await, 1);
    assert_eq!(s.count(&format!("SELECT count(*) FROM outbox WHERE aggregate_id = '{id}' AND event_type = 'OrderCancelled'")).await, 1);

    let (status, err) = s
        .post_user("bob", &format!("/v1/orders/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(err["code"], "ERR_INVALID_TRANSITION");

    // the released unit is sellable again at once (the sold-out mark was cleared)
    let (status, _) = s.create_order("carol", "k2", "sku-wine", "bar-2", 1).await;
    assert_eq!(status, StatusCode::CREATED);

    // a cancelled order cannot start a payment
    let (status, err) = s
        .post_user(
            "bob",
            &format!("/v1/orders/{id}/payments"),
            json!({"provider": "alipay"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(err["code"], "ERR_INVALID_TRANSITION");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_payment_starts_open_one_payment() {
    let s = std::sync::Arc::new(Stack::start().await);
    s.put_sku("sku-pay", "bar-1", 5_000, 3).await;
    let (_, order) = s.create_order("eve", "k1", "sku-pay", "bar-1", 1).await;
    let id = order["order_id"].as_str().unwrap().to_owned();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (s, id) = (s.clone(), id.clone());
        set.spawn(async move { s.start_payment("eve", &id, "wechat").await });
    }
    let mut ids = std::collections::HashSet::new();
    while let Some(r) = set.join_next().await {
        ids.insert(r.unwrap().0);
    }
    assert_eq!(
        ids.len(),
        1,
        "every caller gets the one open payment: {ids:?}"
    );
    assert_eq!(
        s.count(&format!(
            "SELECT count(*) FROM payments WHERE order_id = '{id}'"
        ))
        .await,
        1
    );
    // another provider is another payment (the second one to land is refunded)
    let (other, _) = s.start_payment("eve", &id, "alipay").await;
    assert!(!ids.contains(&other));
    s.assert_ledger().await;
}
