//! Faults between the services, injected with the harness' TCP proxy.

use std::time::Duration;

use integration_tests::fault_proxy::FaultProxy;
use integration_tests::{eventually, Stack};
use reqwest::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pre_lock_whose_answer_came_too_late_is_given_back() {
    let s = Stack::start().await;
    s.put_sku("sku-slow", "bar-1", 100, 5).await;
    s.assert_ledger().await;
    let proxy = FaultProxy::start(&s.prelock).await;
    let api = s
        .extra_order_api(&proxy.url, Duration::from_millis(150))
        .await;
    proxy.delay_responses(Duration::from_millis(600));

    let (status, body) = s
        .create_order_at(&api, "ivy", "slow-1", "sku-slow", "bar-1", 2)
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "ERR_PRELOCK_UNAVAILABLE");

    // the reserve did run: two units are held by an order that does not exist...
    let sku = domain::SkuId::parse("sku-slow").unwrap();
    let redis = &s.prelock_app.redis;
    assert_eq!(
        redis.available(&sku).await.unwrap(),
        Some(3),
        "the scenario needs the late reserve to have run"
    );
    assert_eq!(s.count("SELECT count(*) FROM orders").await, 0);
    // ...until order-api gives them back, well before the 15-minute lapse
    eventually(
        "the orphaned pre-lock to be released",
        Duration::from_secs(10),
        || async { (redis.available(&sku).await.unwrap() == Some(5)).then_some(()) },
    )
    .await;
    let (available, held, _) = s.assert_consistent("sku-slow").await;
    assert_eq!((available, held), (5, 0));
    s.assert_ledger().await;

    // and a retry that succeeds keeps its units: no release steals them
    proxy.delay_responses(Duration::ZERO);
    let (status, body) = s
        .create_order_at(&api, "ivy", "slow-1", "sku-slow", "bar-1", 2)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (available, held, _) = s.assert_consistent("sku-slow").await;
    assert_eq!((available, held), (3, 2));
}

/// A pool under more demand than it has connections must keep the connections it has: the
/// requests that wait too long answer 503 (`PoolTimedOut`), and nothing else is lost. sqlx's
/// ping before handing out a connection ran inside the acquire timeout, which cancelled it
/// mid-flight and destroyed the connection (the loadgen scenario saw 300 to 450 sessions a
/// second opened and abandoned at 200 orders/s, and every request refused). Here 64 tasks
/// share 2 connections with a 20 ms acquire timeout for 2 seconds: every answered query must
/// come from one of the same 2 backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pool_under_contention_keeps_its_connections() {
    let db = integration_tests::fresh_database().await;
    let limits = postgres_store::PgLimits {
        acquire_timeout: Duration::from_millis(20),
        ..postgres_store::PgLimits::new(2)
    };
    let store = postgres_store::PgStore::connect(&db, &limits)
        .await
        .expect("connect");
    let until = std::time::Instant::now() + Duration::from_secs(2);
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let pool = store.pool.clone();
            tokio::spawn(async move {
                let (mut pids, mut timed_out) = (std::collections::HashSet::new(), 0u32);
                while std::time::Instant::now() < until {
                    match sqlx::query_scalar::<_, i32>(
                        "SELECT pg_backend_pid() FROM pg_sleep(0.002)",
                    )
                    .fetch_one(&pool)
                    .await
                    {
                        Ok(pid) => {
                            pids.insert(pid);
                        }
                        Err(sqlx::Error::PoolTimedOut) => timed_out += 1,
                        Err(e) => panic!("a query failed: {e}"),
                    }
                }
                (pids, timed_out)
            })
        })
        .collect();
    let (mut pids, mut timed_out) = (std::collections::HashSet::new(), 0);
    for t in tasks {
        let (p, n) = t.await.expect("task");
        pids.extend(p);
        timed_out += n;
    }
    assert!(
        timed_out > 0,
        "the pool was never contended: the test proves nothing"
    );
    assert!(
        pids.len() <= 2,
        "queries ran on {} backends through a pool of 2: connections were destroyed and \
         opened again ({timed_out} acquires timed out)",
        pids.len()
    );
}

/// Connections an operator terminated while they sat in the pool (`pg_terminate_backend`, as
/// after a failover) cost no request: a `BEGIN` or a read that finds its connection dead is
/// tried again on another, as many times as the pool has dead connections. Here a pool of 6,
/// every connection terminated, then 6 readers and a transaction at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_go_on_after_the_pools_connections_were_terminated() {
    const POOL: u32 = 6;
    let db = integration_tests::fresh_database().await;
    let store = postgres_store::PgStore::connect(&db, &integration_tests::test_pg_limits(POOL))
        .await
        .expect("connect");
    // every connection open and idle in the pool
    let mut held = Vec::new();
    for _ in 0..POOL {
        held.push(store.pool.acquire().await.expect("a connection"));
    }
    drop(held);
    let admin = sqlx::PgPool::connect(&integration_tests::admin_url())
        .await
        .expect("admin");
    let name = db.rsplit('/').next().expect("database name").to_owned();
    let terminated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = $1 AND pid <> pg_backend_pid()) t",
    )
    .bind(&name)
    .fetch_one(&admin)
    .await
    .expect("terminate");
    assert_eq!(
        terminated,
        i64::from(POOL),
        "every pooled connection was terminated"
    );
    integration_tests::eventually(
        "the terminated sessions to end",
        Duration::from_secs(5),
        || {
            let (admin, name) = (admin.clone(), name.clone());
            async move {
                let left: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
                        .bind(&name)
                        .fetch_one(&admin)
                        .await
                        .expect("count");
                (left == 0).then_some(())
            }
        },
    )
    .await;
    let readers: Vec<_> = (0..POOL)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .retry_dead(|pool| async move {
                        sqlx::query_scalar::<_, i32>("SELECT 1")
                            .fetch_one(&pool)
                            .await
                    })
                    .await
            })
        })
        .collect();
    let mut tx = store.begin().await.expect("BEGIN on a live connection");
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut *tx)
        .await
        .expect("a statement in the transaction");
    tx.commit().await.expect("commit");
    assert_eq!(one, 1);
    for r in readers {
        assert_eq!(
            r.await
                .expect("reader")
                .expect("a read after the terminations"),
            1
        );
    }
}
