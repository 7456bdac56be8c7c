//! Bad input, strangers and outages get clear 4xx/5xx answers in the house error format.

use std::time::Duration;

use integration_tests::{ops_token, token, Stack};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn send(s: &Stack, user: Option<&str>, key: Option<&str>, body: &str) -> (StatusCode, Value) {
    let mut req = s
        .http
        .post(format!("{}/v1/orders", s.order_api))
        .header("Content-Type", "application/json")
        .body(body.to_owned());
    if let Some(u) = user {
        req = req.bearer_auth(token(u));
    }
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_orders_are_refused_with_the_field_named() {
    let s = Stack::start().await;
    s.put_sku("sku-v", "bar-1", 100, 10).await;
    let ok = r#"{"sku_id":"sku-v","store_id":"bar-1","quantity":1}"#;
    let cases: &[(
        &str,
        Option<&str>,
        Option<&str>,
        &str,
        StatusCode,
        &str,
        &str,
    )] = &[
        (
            "no token",
            None,
            Some("k"),
            ok,
            StatusCode::UNAUTHORIZED,
            "ERR_UNAUTHORIZED",
            "",
        ),
        (
            "malformed JSON",
            Some("u"),
            Some("k"),
            r#"{"sku_id": "sku-v", "#,
            StatusCode::BAD_REQUEST,
            "ERR_MALFORMED_JSON",
            "",
        ),
        (
            "negative quantity",
            Some("u"),
            Some("k"),
            r#"{"sku_id":"sku-v","store_id":"bar-1","quantity":-1}"#,
            StatusCode::BAD_REQUEST,
            "ERR_VALIDATION",
            "quantity",
        ),
        (
            "huge quantity",
            Some("u"),
            Some("k"),
            r#"{"sku_id":"sku-v","store_id":"bar-1","quantity":100000000000}"#,
            StatusCode::BAD_REQUEST,
            "ERR_VALIDATION",
            "quantity",
        ),
        (
            "quantity above the limit",
            Some("u"),
            Some("k"),
            r#"{"sku_id":"sku-v","store_id":"bar-1","quantity":21}"#,
            StatusCode::BAD_REQUEST,
            "ERR_VALIDATION",
            "quantity",
        ),
        (
            "zero quantity",
            Some("u"),
            Some("k"),
            r#"{"sku_id":"sku-v","store_id":"bar-1","quantity":0}"#,
            StatusCode::BAD_REQUEST,
            "ERR_VALIDATION",
            "quantity",
        ),
        (
            "fractional quantity",
            Some("u"),
            Some("k"),
            r#"{"sku_id":"sku-v","store_id":"bar-1","quantity":1.5}"#,
            StatusCode::BAD_REQUEST,
            "ERR_VALIDATION",
            "quantity",
        ),
        (
            "missing field",
            Some("u"),
            Some("k"),
            r#"{"sku_id":"sku-v","quantity":1}"#,
            StatusCode::BAD_REQUEST,
            "ERR_VALIDATION",
            "store_id",
        ),
        (
            "bad sku id",
            Some("u"),
            Some("k"),
            r#"{"sku_id":"sku v{1}","store_id":"bar-1","quantity":1}"#,
            StatusCode::BAD_REQUEST,
            "ERR_VALIDATION",
            "sku_id",
        ),
        (
            "unknown SKU",
            Some("u"),
            Some("k"),
            r#"{"sku_id":"sku-nope","store_id":"bar-1","quantity":1}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "ERR_UNKNOWN_SKU",
            "sku_id",
        ),
        (
            "wrong store",
            Some("u"),
            Some("k"),
            r#"{"sku_id":"sku-v","store_id":"bar-9","quantity":1}"#,
            StatusCode::BAD_REQUEST,
            "ERR_VALIDATION",
            "store_id",
        ),
        (
            "no idempotency key",
            Some("u"),
            None,
            ok,
            StatusCode::BAD_REQUEST,
            "ERR_VALIDATION",
            "Idempotency-Key",
        ),
        (
            "idempotency key with spaces",
            Some("u"),
            Some("a b"),
            ok,
            StatusCode::BAD_REQUEST,
            "ERR_VALIDATION",
            "Idempotency-Key",
        ),
    ];
    for (what, user, key, body, want_status, want_code, field) in cases {
        let (status, err) = send(&s, *user, *key, body).await;
        assert_eq!(status, *want_status, "{what}: {err}");
        assert_eq!(err["code"], *want_code, "{what}: {err}");
        assert!(
            err["message"].as_str().unwrap().contains(field),
            "{what}: message should name {field}: {err}"
        );
    }
    assert_eq!(
        s.count("SELECT count(*) FROM orders").await,
        0,
        "nothing was created"
    );
    let (available, _, _) = s.assert_consistent("sku-v").await;
    assert_eq!(available, 10, "nothing was pre-locked");

    let r = s
        .http
        .post(format!("{}/v1/orders", s.order_api))
        .bearer_auth("not.a.jwt")
        .header("Idempotency-Key", "k")
        .body(ok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let forged = service_kit::auth::mint_token("another-secret", "u", 60);
    let now = chrono::Utc::now().timestamp();
    let sign =
        |claims: Value| service_kit::auth::sign_claims(integration_tests::JWT_SECRET, &claims);
    // correctly signed, but: no exp (would never expire), not valid yet, or living a year
    let refused = [
        ("forged", forged),
        ("no exp", sign(json!({"sub": "u"}))),
        (
            "nbf ahead",
            sign(json!({"sub": "u", "exp": now + 600, "nbf": now + 300})),
        ),
        (
            "a year long",
            sign(json!({"sub": "u", "iat": now, "exp": now + 365 * 86_400})),
        ),
    ];
    for (what, jwt) in refused {
        let r = s
            .http
            .post(format!("{}/v1/orders", s.order_api))
            .bearer_auth(jwt)
            .header("Idempotency-Key", "k")
            .body(ok)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{what}");
    }
    assert_eq!(s.count("SELECT count(*) FROM orders").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_order_is_not_found() {
    let s = Stack::start().await;
    s.put_sku("sku-own", "bar-1", 100, 10).await;
    let (_, order) = s.create_order("owner", "k", "sku-own", "bar-1", 1).await;
    let id = order["order_id"].as_str().unwrap();
    assert_eq!(s.get_order("owner", id).await.0, StatusCode::OK);
    let (status, err) = s.get_order("stranger", id).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("ERR_NOT_FOUND"))
    );
    let (status, _) = s
        .post_user("stranger", &format!("/v1/orders/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = s
        .post_user(
            "stranger",
            &format!("/v1/orders/{id}/payments"),
            json!({"provider": "wechat"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(s.order_state(id).await, "PENDING");
    let (status, err) = s.get_order("owner", "not-a-uuid").await;
    assert_eq!(
        (status, err["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("ERR_VALIDATION"))
    );
    let (status, err) = s
        .post_user(
            "owner",
            &format!("/v1/orders/{id}/payments"),
            json!({"provider": "paypal"}),
        )
        .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("ERR_VALIDATION"))
    );
    assert!(err["message"].as_str().unwrap().contains("provider"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_admin_validates_and_requires_the_ops_token() {
    let s = Stack::start().await;
    let url = format!("{}/v1/skus/sku-adm", s.prelock);
    let body = json!({"store_id": "bar-1", "price_cents": 100, "stock": 3});
    assert_eq!(
        s.http.put(&url).json(&body).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        s.http
            .put(&url)
            .bearer_auth("wrong")
            .json(&body)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    for (bad, field) in [
        (
            json!({"store_id": "bar-1", "price_cents": 100, "stock": -1}),
            "stock",
        ),
        (
            json!({"store_id": "bar-1", "price_cents": -5, "stock": 1}),
            "price_cents",
        ),
        (
            json!({"store_id": "bar 1", "price_cents": 5, "stock": 1}),
            "store_id",
        ),
        (
            json!({"store_id": "bar-1", "price_cents": 5, "stock": 1, "prelock_ttl_seconds": 0}),
            "prelock_ttl_seconds",
        ),
    ] {
        let r = s
            .http
            .put(&url)
            .bearer_auth(ops_token())
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let err: Value = r.json().await.unwrap();
        assert!(err["message"].as_str().unwrap().contains(field), "{err}");
    }
    s.put_sku("sku-adm", "bar-1", 100, 3).await;
    s.create_order("u", "k", "sku-adm", "bar-1", 2).await;
    let r = s
        .http
        .put(&url)
        .bearer_auth(ops_token())
        .json(&json!({"store_id": "bar-1", "price_cents": 100, "stock": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CONFLICT,
        "stock below the units held"
    );
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["code"], "ERR_STOCK_BELOW_RESERVED");
    let sku = s.put_sku("sku-adm", "bar-1", 100, 10).await;
    assert_eq!(
        (sku["available"].as_i64(), sku["reserved"].as_i64()),
        (Some(8), Some(2))
    );
    assert_eq!(
        s.http
            .get(format!("{}/v1/skus/none", s.prelock))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_prelock_answers_503_and_holds_nothing() {
    let s = Stack::start().await;
    s.put_sku("sku-down", "bar-1", 100, 10).await;
    // a second order-api on the same database whose pre-lock service is not listening
    let dead = integration_tests::binaries::free_port();
    let (base, app) = s
        .extra_order_app(
            &format!("http://127.0.0.1:{dead}"),
            Duration::from_millis(300),
        )
        .await;

    let r = s
        .http
        .post(format!("{base}/v1/orders"))
        .bearer_auth(token("u"))
        .header("Idempotency-Key", "k")
        .json(&json!({"sku_id": "sku-down", "store_id": "bar-1", "quantity": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "1");
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["code"], "ERR_PRELOCK_UNAVAILABLE");
    assert_eq!(s.count("SELECT count(*) FROM orders").await, 0);
    // the connection was refused, so nothing can have been reserved: no give-back waits
    assert!(
        app.fulfillment.tasks.is_empty(),
        "a refused call started a background give-back"
    );
    let metrics = s.get_text(&format!("{base}/metrics")).await;
    let timeouts = metrics
        .lines()
        .find(|l| l.starts_with("prelock_calls_total{") && l.contains(r#"outcome="timeout""#));
    assert_eq!(
        timeouts.and_then(|l| l.rsplit(' ').next()),
        Some("1"),
        "{metrics}"
    );
}
