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
                ("/v1/sim/ledger", "get"),
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

/// A sample value for each documented query parameter, to show it is accepted where the
/// document says it is.
fn sample(param: &str) -> &'static str {
    match param {
        "state" => "dead",
        "kind" => "order.expire",
        "before" => "1000",
        "limit" => "5",
        "status" => "open",
        "window_secs" => "60",
        "after" => "p-0",
        other => panic!("no sample for query parameter {other:?}: add one"),
    }
}

/// Every service's `/openapi.json` passes a real OpenAPI validator (openapi-spec-validator,
/// installed by `scripts/test-tools.sh`), every path parameter is in its path and no query
/// parameter is, and each documented query parameter is accepted on its route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_openapi_document_is_valid_and_its_parameters_are_where_it_says() {
    let s = integration_tests::binaries::Services::start(&[], &[]).await;
    let (_scheduler, scheduler) = s.scheduler(&[]).await;
    let (_worker, worker) = s.compensation_worker(&[]).await;
    let dir = std::env::temp_dir().join(format!("openapi-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut checked_queries = 0;
    for (name, base) in [
        ("order-api", s.order_api.clone()),
        ("prelock-service", s.prelock.clone()),
        ("payment-gateway-sim", s.gateway.clone()),
        ("scheduler", scheduler),
        ("compensation-worker", worker),
    ] {
        let doc: serde_json::Value = s
            .http
            .get(format!("{base}/openapi.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let file = dir.join(format!("{name}.json"));
        std::fs::write(&file, doc.to_string()).unwrap();
        let out = std::process::Command::new("python3")
            .args(["-m", "openapi_spec_validator", "--errors", "all"])
            .arg(&file)
            .output()
            .expect("python3 -m openapi_spec_validator (scripts/test-tools.sh installs it)");
        assert!(
            out.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                // a route that takes a credential documents both ways of being refused
                if op["security"].as_array().is_some_and(|s| !s.is_empty()) {
                    for status in ["401", "403"] {
                        assert!(
                            op["responses"][status].is_object(),
                            "{name}: {method} {path} does not document {status}"
                        );
                    }
                }
                let params = op["parameters"].as_array().cloned().unwrap_or_default();
                let mut query = Vec::new();
                for p in &params {
                    let pname = p["name"].as_str().unwrap();
                    let templated = path.contains(&format!("{{{pname}}}"));
                    match p["in"].as_str().unwrap() {
                        "path" => assert!(
                            templated,
                            "{name}: {method} {path}: path parameter {pname} is not in the path"
                        ),
                        "query" => {
                            assert!(
                                !templated,
                                "{name}: {method} {path}: {pname} is in the path"
                            );
                            query.push(pname.to_owned());
                        }
                        _ => {}
                    }
                }
                if method == "get" && !query.is_empty() && !path.contains('{') {
                    let pairs: Vec<String> =
                        query.iter().map(|q| format!("{q}={}", sample(q))).collect();
                    let url = format!("{base}{path}?{}", pairs.join("&"));
                    let r = s
                        .http
                        .get(&url)
                        .bearer_auth(integration_tests::ops_token())
                        .send()
                        .await
                        .unwrap();
                    assert!(r.status().is_success(), "{name}: GET {url}: {}", r.status());
                    checked_queries += 1;
                }
            }
        }
    }
    // the job list, the failures and the SLA figures, on both engine binaries
    assert!(checked_queries >= 4, "{checked_queries}");
    let _ = std::fs::remove_dir_all(&dir);
}
