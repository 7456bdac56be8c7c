//! `docker-compose.yml` and `deploy/` cannot run here (no Docker engine); they are checked with
//! a parser instead: they parse, and they name what the services need.

use std::path::PathBuf;

use serde_yaml::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn load(rel: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .collect()
}

#[test]
fn compose_brings_up_the_infrastructure_and_the_services() {
    let doc = &load("docker-compose.yml")[0];
    let services = doc["services"].as_mapping().expect("services");
    for name in [
        "postgres",
        "redis",
        "kafka",
        "jaeger",
        "prometheus",
        "grafana",
        "order-api",
        "prelock-service",
        "payment-gateway-sim",
        "scheduler",
        "compensation-worker",
        "event-relay",
    ] {
        assert!(
            services.contains_key(name),
            "docker-compose.yml lacks {name}"
        );
    }
    let env = &services["order-api"]["environment"];
    for var in [
        "DATABASE_URL",
        "PRELOCK_URL",
        "GATEWAY_URL",
        "AUTH_JWT_SECRET",
        "OPS_TOKEN",
    ] {
        assert!(!env[var].is_null(), "order-api lacks {var}");
    }
    assert!(
        !services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"].is_null(),
        "kafka runs in KRaft mode"
    );
}

#[test]
fn kubernetes_manifests_parse_and_probe_health() {
    let dir = repo().join("deploy/k8s");
    let mut deployments = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/k8s") {
        let path = entry.unwrap().path();
        let rel = path
            .strip_prefix(repo())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        for doc in load(&rel) {
            if doc["kind"] == "Deployment" {
                deployments += 1;
                let c = &doc["spec"]["template"]["spec"]["containers"][0];
                assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{rel}");
                assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{rel}");
            }
        }
    }
    assert_eq!(deployments, 6);
    assert!(repo().join("deploy/Dockerfile").exists());
    let rules = &load("deploy/prometheus/alerts.yml")[0];
    let text = serde_yaml::to_string(rules).unwrap();
    assert!(text.contains("prelock_timeouts_total"));
    assert!(text.contains("job_fire_delay_seconds_bucket"));
    for metric in [
        "compensation_success_rate",
        "compensation_open_failures",
        "payment_paid_latency_seconds_bucket",
    ] {
        assert!(text.contains(metric), "no alert on {metric}");
    }
}

#[test]
fn the_dashboard_parses_and_charts_the_slas() {
    let text =
        std::fs::read_to_string(repo().join("deploy/grafana/dashboards/bar-fulfillment.json"))
            .unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap_or_default().to_owned())
        .collect();
    for metric in [
        "http_request_duration_seconds_bucket",
        "prelock_timeouts_total",
        "orders_created_total",
        "payment_callbacks_total",
        "job_fire_delay_seconds_bucket",
        "jobs_total",
        "compensation_success_rate",
        "payment_paid_latency_seconds_bucket",
        "compensation_attempts_total",
        "compensation_open_failures",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(metric)),
            "no panel charts {metric}"
        );
    }
}
