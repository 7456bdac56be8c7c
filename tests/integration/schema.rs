//! The database enforces the domain's rules on its own.

use domain::order::TRANSITIONS;
use integration_tests::fresh_database;
use sqlx::PgPool;

async fn migrated() -> PgPool {
    let pool = PgPool::connect(&fresh_database().await).await.unwrap();
    postgres_store::MIGRATOR.run(&pool).await.unwrap();
    pool
}

async fn fails(pool: &PgPool, sql: &str) -> String {
    match sqlx::query(sql).execute(pool).await {
        Ok(_) => panic!("accepted: {sql}"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn the_database_transition_table_is_the_domains() {
    let pool = migrated().await;
    let mut db: Vec<(String, String)> =
        sqlx::query_as("SELECT from_state, to_state FROM order_transition")
            .fetch_all(&pool)
            .await
            .unwrap();
    db.sort();
    let mut code: Vec<(String, String)> = TRANSITIONS
        .iter()
        .map(|(f, t)| (f.as_str().to_owned(), t.as_str().to_owned()))
        .collect();
    code.sort();
    assert_eq!(db, code);
}

const SEED_SKU: &str =
    "INSERT INTO skus (id, store_id, price_cents, stock_real) VALUES ('s', 'b', 100, 1)";

fn insert_order(state: &str, version: i32, key: &str) -> String {
    format!(
        "INSERT INTO orders (id, user_id, sku_id, store_id, quantity, unit_price_cents, amount_cents,
             state, version, idempotency_key, request_fingerprint, expires_at)
         VALUES (gen_random_uuid(), 'u', 's', 'b', 1, 100, 100, '{state}', {version}, '{key}', 'f', now())
         RETURNING id"
    )
}

#[tokio::test]
async fn illegal_states_transitions_and_negative_stock_are_refused() {
    let pool = migrated().await;
    sqlx::query(SEED_SKU).execute(&pool).await.unwrap();
    sqlx::query(&insert_order("PENDING", 1, "k1"))
        .execute(&pool)
        .await
        .unwrap();
    // (statement, what the refusal says), in order: each runs against the state the previous
    // rows left
    let refused = [
        (insert_order("PAID", 1, "k0"), "created PENDING"),
        (insert_order("BOGUS", 1, "k0"), "created PENDING"),
        (insert_order("PENDING", 1, "k1"), "duplicate key"),
        (
            "UPDATE orders SET state = 'REDEEMED', version = 2".into(),
            "illegal order transition",
        ),
        (
            "UPDATE orders SET state = 'PAID', version = 5".into(),
            "bump the version",
        ),
        (
            "UPDATE orders SET version = 2".into(),
            "only with the state",
        ),
        (
            "UPDATE orders SET amount_cents = 1, unit_price_cents = 1".into(),
            "immutable",
        ),
        ("UPDATE skus SET stock_real = -1".into(), "check"),
        (
            "INSERT INTO skus (id, store_id, price_cents, stock_real) VALUES ('bad id', 'b', 1, 1)"
                .into(),
            "check",
        ),
    ];
    for (sql, says) in &refused {
        let err = fails(&pool, sql).await;
        assert!(err.contains(says), "{sql}: {err}");
    }
    sqlx::query("UPDATE orders SET state = 'PAID', version = 2")
        .execute(&pool)
        .await
        .unwrap();
    let err = fails(&pool, "UPDATE orders SET state = 'PENDING', version = 3").await;
    assert!(err.contains("illegal order transition"), "{err}");
}

#[tokio::test]
async fn the_compare_and_set_never_overwrites() {
    use domain::order::{OrderState, Versioned};
    let pool = migrated().await;
    sqlx::query(SEED_SKU).execute(&pool).await.unwrap();
    let id: uuid::Uuid = sqlx::query_scalar(&insert_order("PENDING", 1, "k"))
        .fetch_one(&pool)
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let v1 = Versioned::initial();
    let v2 = postgres_store::orders::transition(&mut conn, id, v1, OrderState::Paid)
        .await
        .unwrap();
    assert_eq!(v2.version, 2);
    // a second writer holding the stale version loses, whatever it wanted
    let stale = postgres_store::orders::transition(&mut conn, id, v1, OrderState::Cancelled).await;
    assert!(
        matches!(
            stale,
            Err(postgres_store::orders::TransitionFailure::Conflict)
        ),
        "{stale:?}"
    );
    let illegal = postgres_store::orders::transition(&mut conn, id, v2, OrderState::Pending).await;
    assert!(matches!(
        illegal,
        Err(postgres_store::orders::TransitionFailure::Illegal(_))
    ));
}
