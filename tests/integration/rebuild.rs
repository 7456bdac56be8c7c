//! Redis is a losable index: flushed in the middle of a burst, it is rebuilt from Postgres
//! without overselling a unit or dropping a successful order's units.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use integration_tests::{eventually, redis_url, Stack, StackOptions};
use reqwest::StatusCode;
use tokio::task::JoinSet;

/// Redis logical database owned by this module's flush test (FLUSHDB must not touch other
/// tests' keys).
const FLUSH_DB: u8 = 9;

/// `buyers` buyers, at most `concurrency` in flight at once.
async fn burst(
    s: &Arc<Stack>,
    prefix: &str,
    buyers: usize,
    concurrency: usize,
) -> (usize, usize, usize) {
    let gate = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut set = JoinSet::new();
    for i in 0..buyers {
        let s = s.clone();
        let user = format!("{prefix}-{i}");
        let gate = gate.clone();
        set.spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            s.create_order(&user, "k", "sku-hot", "bar-1", 1).await
        });
    }
    let (mut created, mut shortage, mut unavailable) = (0, 0, 0);
    while let Some(r) = set.join_next().await {
        let (status, body) = r.unwrap();
        match (status, body["code"].as_str()) {
            (StatusCode::CREATED, _) => created += 1,
            (StatusCode::CONFLICT, Some("ERR_STOCK_SHORTAGE_PRELOCK")) => shortage += 1,
            (StatusCode::SERVICE_UNAVAILABLE, Some("ERR_PRELOCK_UNAVAILABLE")) => unavailable += 1,
            other => panic!("unexpected answer {other:?}: {body}"),
        }
    }
    (created, shortage, unavailable)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_flushed_mid_burst_then_rebuilt_oversells_nothing() {
    let s = Arc::new(
        Stack::start_with(StackOptions {
            redis_db: FLUSH_DB,
            ..Default::default()
        })
        .await,
    );
    s.put_sku("sku-hot", "bar-1", 1_000, 150).await;

    // the flusher waits for the burst to be well under way, then empties Redis
    let flushed = Arc::new(AtomicBool::new(false));
    let flusher = {
        let s = s.clone();
        let flushed = flushed.clone();
        tokio::spawn(async move {
            eventually(
                "the burst to get going",
                Duration::from_secs(60),
                || async { (s.count("SELECT count(*) FROM orders").await >= 40).then_some(()) },
            )
            .await;
            let client = redis::Client::open(redis_url(FLUSH_DB)).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            redis::cmd("FLUSHDB")
                .query_async::<()>(&mut conn)
                .await
                .unwrap();
            flushed.store(true, Ordering::SeqCst);
            s.count("SELECT count(*) FROM orders").await
        })
    };
    // paced (16 in flight) so the burst is still running when the flush lands
    let (created1, _, unavailable1) = burst(&s, "w1", 300, 16).await;
    let orders_at_flush = flusher.await.unwrap() as usize;
    assert!(flushed.load(Ordering::SeqCst));
    assert!(
        orders_at_flush < 150,
        "the flush came after the sell-out ({orders_at_flush} orders): not mid-burst"
    );
    assert!(
        created1 > orders_at_flush,
        "no order was created after the flush: the SKU never recovered"
    );

    let report = s.rebuild().await;
    assert_eq!(report["skus"], 1);
    assert!(report["failed"].as_array().unwrap().is_empty());

    // every 201 is a real order, and every one still holds its unit in Redis and Postgres
    let pending = s
        .count("SELECT count(*) FROM orders WHERE state = 'PENDING'")
        .await as usize;
    assert_eq!(pending, created1);
    assert!(pending <= 150, "oversold: {pending} orders for 150 units");
    let (available, held, _) = s.assert_consistent("sku-hot").await;
    assert_eq!(held as usize, pending);
    assert_eq!(available as usize, 150 - pending);

    // selling the rest ends at exactly 150: no unit oversold, none lost
    let (created2, shortage2, _) = burst(&s, "w2", 200, 64).await;
    assert_eq!(created2, 150 - pending);
    assert_eq!(shortage2 + created2, 200);
    assert_eq!(
        s.count("SELECT count(*) FROM orders WHERE state = 'PENDING'")
            .await,
        150
    );
    let (available, held, stock) = s.assert_consistent("sku-hot").await;
    assert_eq!((available, held, stock), (0, 150, 150));
    eprintln!("flush test: flushed at {orders_at_flush} orders; first burst {created1} created, {unavailable1} answered 503 while the SKU was rebuilt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuild_while_orders_flow_changes_nothing() {
    let s = Arc::new(Stack::start().await);
    s.put_sku("sku-hot", "bar-1", 1_000, 80).await;
    let rebuilder = {
        let s = s.clone();
        tokio::spawn(async move {
            // rebuild over and over until the burst is half done (at least once)
            let mut n = 0;
            loop {
                s.rebuild().await;
                n += 1;
                if n >= 200 || s.count("SELECT count(*) FROM orders").await >= 60 {
                    break n;
                }
            }
        })
    };
    let (created, shortage, unavailable) = burst(&s, "b", 120, 8).await;
    let rebuilds = rebuilder.await.unwrap();
    assert!(rebuilds > 0);
    assert_eq!(
        (created, shortage, unavailable),
        (80, 40, 0),
        "{rebuilds} rebuilds ran during the burst"
    );
    let (available, held, _) = s.assert_consistent("sku-hot").await;
    assert_eq!((available, held), (0, 80));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sku_missing_from_redis_is_rebuilt_on_first_use() {
    let s = Stack::start().await;
    s.put_sku("sku-gone", "bar-1", 100, 5).await;
    s.create_order("u1", "k", "sku-gone", "bar-1", 2).await;
    let sku = domain::SkuId::parse("sku-gone").unwrap();
    s.prelock_app.redis.forget_sku(&sku).await.unwrap();
    // the next buyer waits out the rebuild instead of failing
    let (status, body) = s.create_order("u2", "k", "sku-gone", "bar-1", 3).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = s.create_order("u3", "k", "sku-gone", "bar-1", 1).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("ERR_STOCK_SHORTAGE_PRELOCK"))
    );
    let (available, held, _) = s.assert_consistent("sku-gone").await;
    assert_eq!((available, held), (0, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_repairs_a_sku_that_drifted_and_leaves_the_others_alone() {
    let s = Stack::start().await;
    s.put_sku("sku-drift", "bar-1", 100, 10).await;
    s.put_sku("sku-calm", "bar-1", 100, 10).await;
    let (_, drifting) = s.create_order("u1", "k1", "sku-drift", "bar-1", 3).await;
    s.create_order("u2", "k2", "sku-drift", "bar-1", 2).await;
    s.create_order("u3", "k3", "sku-calm", "bar-1", 4).await;
    let report = s.reconcile().await;
    assert_eq!(report["skus"], 2);
    assert_eq!(
        report["drifted"],
        serde_json::json!([]),
        "nothing drifted yet"
    );

    // Redis loses one live reservation (a failover to a lagging replica): it now offers 3
    // units Postgres has sold to u1
    let sku = domain::SkuId::parse("sku-drift").unwrap();
    let order = domain::OrderId::parse(drifting["order_id"].as_str().unwrap()).unwrap();
    s.prelock_app.redis.release(&sku, order).await.unwrap();
    assert_eq!(s.prelock_app.redis.available(&sku).await.unwrap(), Some(8));

    let report = s.reconcile().await;
    assert_eq!(report["drifted"], serde_json::json!(["sku-drift"]));
    assert!(report["failed"].as_array().unwrap().is_empty());
    let (available, held, _) = s.assert_consistent("sku-drift").await;
    assert_eq!((available, held), (5, 5));
    let (available, held, _) = s.assert_consistent("sku-calm").await;
    assert_eq!((available, held), (6, 4));
    assert_eq!(
        s.reconcile().await["drifted"],
        serde_json::json!([]),
        "repaired"
    );
    let metrics = s.get_text(&format!("{}/metrics", s.prelock)).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("prelock_reconcile_drift_total") && l.ends_with(" 1")),
        "{metrics}"
    );
}
