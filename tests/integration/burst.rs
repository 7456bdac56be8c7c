//! Flash-sale bursts: no oversell, exactly the stock sold, one order per idempotency key.

use std::sync::Arc;

use integration_tests::Stack;
use reqwest::StatusCode;
use tokio::task::JoinSet;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hundred_buyers_one_hundred_units() {
    let s = Arc::new(Stack::start().await);
    s.put_sku("sku-flash", "bar-1", 1_000, 100).await;

    let mut set = JoinSet::new();
    for i in 0..300 {
        let s = s.clone();
        set.spawn(async move {
            s.create_order(&format!("buyer-{i}"), "buy-now", "sku-flash", "bar-1", 1)
                .await
        });
    }
    let (mut created, mut shortage, mut other) = (0, 0, Vec::new());
    while let Some(r) = set.join_next().await {
        let (status, body) = r.unwrap();
        match (status, body["code"].as_str()) {
            (StatusCode::CREATED, _) => created += 1,
            (StatusCode::CONFLICT, Some("ERR_STOCK_SHORTAGE_PRELOCK")) => shortage += 1,
            _ => other.push((status, body)),
        }
    }
    assert!(other.is_empty(), "unexpected answers: {other:?}");
    assert_eq!((created, shortage), (100, 200));
    assert_eq!(
        s.count("SELECT count(*) FROM orders WHERE state = 'PENDING'")
            .await,
        100
    );
    assert_eq!(
        s.count("SELECT count(DISTINCT user_id) FROM orders").await,
        100
    );
    assert_eq!(
        s.count("SELECT count(*) FROM outbox WHERE event_type = 'OrderCreated'")
            .await,
        100
    );
    assert_eq!(
        s.count("SELECT count(*) FROM delayed_job WHERE kind = 'order.expire'")
            .await,
        100
    );
    let (available, held, stock) = s.assert_consistent("sku-flash").await;
    assert_eq!((available, held, stock), (0, 100, 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_idempotency_key_twenty_times_is_one_order() {
    let s = Arc::new(Stack::start().await);
    s.put_sku("sku-idem", "bar-1", 500, 50).await;

    let mut set = JoinSet::new();
    for _ in 0..20 {
        let s = s.clone();
        set.spawn(async move {
            s.create_order("dave", "same-key-1", "sku-idem", "bar-1", 3)
                .await
        });
    }
    let mut ids = std::collections::HashSet::new();
    while let Some(r) = set.join_next().await {
        let (status, body) = r.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{body}");
        ids.insert(body["order_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(s.count("SELECT count(*) FROM orders").await, 1);
    assert_eq!(s.count("SELECT count(*) FROM outbox").await, 1);
    let (available, held, _) = s.assert_consistent("sku-idem").await;
    assert_eq!(
        (available, held),
        (47, 3),
        "the key held stock once, not twenty times"
    );

    // the same key with another body is refused, and holds nothing
    let (status, body) = s
        .create_order("dave", "same-key-1", "sku-idem", "bar-1", 4)
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["code"], "ERR_IDEMPOTENCY_MISMATCH");
    // another user may use the same key string
    let (status, other) = s
        .create_order("erin", "same-key-1", "sku-idem", "bar-1", 3)
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(!ids.contains(other["order_id"].as_str().unwrap()));
    let (available, held, _) = s.assert_consistent("sku-idem").await;
    assert_eq!((available, held), (44, 6));
}
