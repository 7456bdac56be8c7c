//! `GET /openapi.json` is generated from the handlers and covers every route.

use integration_tests::Stack;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_covers_every_order_api_path() {
    let s = Stack::start().await;
    let doc = s.get_json(&format!("{}/openapi.json", s.order_api)).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/v1/orders", "post"),
        ("/v1/orders/{order_id}", "get"),
        ("/v1/orders/{order_id}/cancel", "post"),
        ("/v1/orders/{order_id}/payments", "post"),
        ("/v1/payments/{provider}/callback", "post"),
        ("/v1/vouchers/{code}/redeem", "post"),
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
        6,
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
    assert_eq!(order_api::openapi().paths.paths.len(), 6);
}

/// The rest of the HTTP contract: each service documents its own paths, generated from its
/// handlers, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prelock_service_and_the_simulator_document_their_paths() {
    let s = Stack::start().await;
    let cases: [(&str, &[(&str, &str)]); 2] = [
        (
            &s.prelock,
            &[
                ("/v1/skus/{sku_id}", "put"),
                ("/v1/skus/{sku_id}", "get"),
                ("/v1/admin/rebuild", "post"),
                ("/v1/admin/reconcile", "post"),
                ("/v1/skus/{sku_id}/reservations/{reservation_id}", "put"),
                ("/v1/skus/{sku_id}/reservations/{reservation_id}", "get"),
                ("/v1/skus/{sku_id}/reservations/{reservation_id}", "delete"),
                (
                    "/v1/skus/{sku_id}/reservations/{reservation_id}/pin",
                    "post",
                ),
                (
                    "/v1/skus/{sku_id}/reservations/{reservation_id}/withdraw",
                    "post",
                ),
                (
                    "/v1/skus/{sku_id}/reservations/{reservation_id}/lapse",
                    "post",
                ),
                (
                    "/v1/skus/{sku_id}/reservations/{reservation_id}/deduct",
                    "post",
                ),
                ("/v1/clock", "get"),
            ],
        ),
        (
            &s.gateway,
            &[
                ("/v1/{provider}/payments", "post"),
                ("/v1/{provider}/payments/{payment_id}", "get"),
                ("/v1/{provider}/payments/{payment_id}/close", "post"),
                ("/v1/{provider}/transactions/{transaction_id}", "get"),
                ("/v1/{provider}/refunds", "post"),
                ("/v1/{provider}/refunds/{refund_id}", "get"),
                ("/v1/sim/payments/{payment_id}/pay", "post"),
                ("/v1/sim/payments/{payment_id}", "get"),
                ("/v1/sim/payments", "get"),
                ("/v1/sim/payments/{payment_id}/close", "post"),
                ("/v1/sim/payments/{payment_id}/faults", "put"),
                ("/v1/sim/faults", "get"),
                ("/v1/sim/faults", "put"),
            ],
        ),
    ];
    for (base, expected) in cases {
        let doc = s.get_json(&format!("{base}/openapi.json")).await;
        let paths = doc["paths"].as_object().unwrap();
        let mut listed = 0;
        for (path, ops) in paths {
            listed += ops.as_object().unwrap().len();
            for (method, op) in ops.as_object().unwrap() {
                assert!(
                    expected.contains(&(path.as_str(), method.as_str())),
                    "{base}: undocumented-by-test {method} {path}"
                );
                assert!(
                    op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                    "{method} {path} has no responses"
                );
            }
        }
        assert_eq!(
            listed,
            expected.len(),
            "{base}: {:?}",
            paths.keys().collect::<Vec<_>>()
        );
    }
}
