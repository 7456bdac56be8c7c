//! `GET /openapi.json` is generated from the handlers and covers every route.

use integration_tests::Stack;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_covers_every_order_api_path() {
    let s = Stack::start().await;
    let doc: Value = s
        .http
        .get(format!("{}/openapi.json", s.order_api))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/v1/orders", "post"),
        ("/v1/orders/{order_id}", "get"),
        ("/v1/orders/{order_id}/cancel", "post"),
        ("/v1/orders/{order_id}/payments", "post"),
        ("/v1/payments/{provider}/callback", "post"),
    ] {
        let op = &paths.get(path).unwrap_or_else(|| panic!("{path} missing"))[method];
        assert!(op.is_object(), "{method} {path} missing");
        assert!(
            op["responses"].as_object().is_some_and(|r| !r.is_empty()),
            "{path} has no responses"
        );
    }
    assert_eq!(
        paths.len(),
        5,
        "a path without a test: {:?}",
        paths.keys().collect::<Vec<_>>()
    );
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "CreateOrderRequest",
        "OrderView",
        "ErrorBody",
        "PaymentNotification",
        "StartPaymentRequest",
    ] {
        assert!(schemas.contains_key(name), "schema {name} missing");
    }
    assert_eq!(order_api::openapi().paths.paths.len(), 5);
}
