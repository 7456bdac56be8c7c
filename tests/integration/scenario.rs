//! The paper's stress test, short: `loadgen scenario` for about a minute at a modest rate,
//! with every fault kind at least once (the providers' chaos, a compensation worker, a
//! scheduler and an event relay killed and restarted, Redis restarted empty, the Kafka broker
//! restarted, Postgres connections terminated), against a stack of its own (two instances of
//! the scheduler, the worker and the relay) on the debug binaries. It asserts what the
//! checker found (zero anomalies, every fault made) and that the HTML report renders in
//! headless Chromium with its charts; never timings (those are the README's table, measured
//! with the release build).

use std::process::Command;

use integration_tests::binaries::bin_path;
use integration_tests::webdriver::Browser;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_flash_sale_under_every_fault_loses_nothing_and_reports_it() {
    let loadgen = bin_path("loadgen");
    let dir = std::env::temp_dir().join(format!("bft-scenario-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, html) = (dir.join("report.json"), dir.join("report.html"));
    let out = tokio::task::spawn_blocking({
        let (dir, json, html) = (dir.clone(), json.clone(), html.clone());
        move || {
            Command::new(&loadgen)
                .args([
                    "scenario",
                    "--rate",
                    "40",
                    "--duration",
                    "70s",
                    "--faults",
                    "all",
                ])
                .args([
                    "--seed",
                    "20261203",
                    "--skus",
                    "12",
                    "--prelock-ttl-secs",
                    "15",
                ])
                .args(["--quiet", "20s", "--settle-timeout", "4m"])
                .args(["--vacuum-every", "20s"])
                .args(["--pg-order-api", "6", "--pg-per-worker", "3"])
                .arg("--bin-dir")
                .arg(loadgen.parent().unwrap())
                .arg("--dir")
                .arg(dir.join("run"))
                .arg("--json")
                .arg(&json)
                .arg("--html")
                .arg(&html)
                .output()
                .expect("run loadgen scenario")
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "loadgen scenario failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["anomaly_total"], 0, "{}", report["anomaly_examples"]);
    for (kind, n) in report["anomalies"].as_object().unwrap() {
        assert_eq!(n, 0, "{kind}");
    }
    assert!(report["unsettled"].as_array().unwrap().is_empty());
    // on a server with autovacuum off the scenario stands in for it, and that works
    let vacuums = &report["vacuums"];
    if vacuums["autovacuum_off"] == true {
        assert_eq!(
            vacuums["failures"].as_array().map(Vec::len),
            Some(0),
            "the autovacuum stand-in failed: {vacuums}"
        );
        assert!(
            vacuums["vacuumed"].as_u64().unwrap() + vacuums["analyzed"].as_u64().unwrap() > 0,
            "the autovacuum stand-in did nothing in a churning run: {vacuums}"
        );
    } else {
        assert_eq!(vacuums["vacuumed"], 0, "autovacuum is on: no stand-in");
    }
    // every fault kind was made, and made successfully
    let faults = report["faults"].as_array().unwrap();
    for kind in [
        "provider",
        "kill-worker",
        "kill-scheduler",
        "kill-relay",
        "redis-restart",
        "kafka-restart",
        "pg-terminate",
    ] {
        let made: Vec<&Value> = faults.iter().filter(|f| f["kind"] == kind).collect();
        assert!(!made.is_empty(), "{kind} never ran: {faults:?}");
        assert!(made.iter().all(|f| f["ok"] == true), "{kind}: {made:?}");
    }
    // the sale did what a sale does: orders kept, paid through compensation too, expired,
    // cancelled, and refused when sold out
    let counts = &report["counts"];
    assert!(counts["orders_kept"].as_i64().unwrap() > 100, "{counts}");
    assert!(counts["payments_kept"].as_i64().unwrap() > 100, "{counts}");
    assert!(
        counts["client_orders_acknowledged"].as_i64().unwrap() > 500,
        "{counts}"
    );
    assert!(
        report["server"]["time_to_paid_by_compensation"]["count"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(report["server"]["checked_payments"].as_i64().unwrap() > 0);
    let stack = &report["stack"];
    for key in [
        "database_url",
        "gateway_sim_url",
        "order_api_url",
        "kafka_brokers",
    ] {
        assert!(stack[key].as_str().is_some_and(|v| !v.is_empty()), "{key}");
    }
    let history = std::fs::read_to_string(dir.join("run/history.jsonl")).unwrap();
    let first: Value = serde_json::from_str(history.lines().next().unwrap()).unwrap();
    for key in ["intended_ms", "sent_ms", "answered_ms", "outcome", "kind"] {
        assert!(!first[key].is_null(), "history lines carry {key}: {first}");
    }

    // the HTML page renders in a real browser, with its charts
    let browser = Browser::start().await;
    browser.goto(&format!("file://{}", html.display())).await;
    let table = browser.text_of("#figures").await;
    assert!(table.contains("anomalies found by the checker"), "{table}");
    for chart in [
        "#latency path.series",
        "#throughput path.series",
        "#time-to-paid rect.bar",
    ] {
        assert!(
            browser.find(chart).await.is_some(),
            "{chart} is not on the page"
        );
    }
    assert!(
        browser.find("#latency rect.fault").await.is_some(),
        "faults marked"
    );
    browser.quit().await;
    let _ = std::fs::remove_dir_all(&dir);
}
