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

/// Every document of every file in `deploy/k8s`, with the file's path from the repository.
fn k8s_docs() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo().join("deploy/k8s")).expect("deploy/k8s") {
        let path = entry.unwrap().path();
        let rel = path
            .strip_prefix(repo())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        out.extend(load(&rel).into_iter().map(|d| (rel.clone(), d)));
    }
    out
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
        "STAFF_JWT_SECRET",
        "SERVICE_TOKEN",
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
    let mut deployments = 0;
    for (rel, doc) in k8s_docs() {
        if doc["kind"] == "Deployment" {
            deployments += 1;
            let c = &doc["spec"]["template"]["spec"]["containers"][0];
            assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{rel}");
            assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{rel}");
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
        "outbox_lag_seconds",
        "relay_leader",
        "relay_errors_total",
        "relay_position_gaps",
        "consumer_lag_messages",
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
        "outbox_lag_seconds",
        "relay_published_total",
        "relay_errors_total",
        "relay_position_gaps",
        "consumer_lag_messages",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(metric)),
            "no panel charts {metric}"
        );
    }
}

/// Every `.rs` file under `crates/*/src`, with its path.
fn sources() -> Vec<(PathBuf, String)> {
    fn walk(dir: &std::path::Path, out: &mut Vec<(PathBuf, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                // a file's unit tests (its `#[cfg(test)]` module, last by convention) read
                // made-up variables through test loaders, not the environment
                let text = text
                    .split("#[cfg(test)]")
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                out.push((path, text));
            }
        }
    }
    let mut out = Vec::new();
    for krate in std::fs::read_dir(repo().join("crates")).unwrap() {
        let src = krate.unwrap().path().join("src");
        if src.is_dir() {
            walk(&src, &mut out);
        }
    }
    out
}

/// The quoted strings of `text` that look like environment variables (`"FOO_BAR"`), each with
/// the identifier just before its opening parenthesis (`env_string`, `listen_addr`, ...).
fn quoted_vars(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find('"') {
        let after = &rest[i + 1..];
        let Some(end) = after.find('"') else { break };
        let word = &after[..end];
        let is_var = word.len() > 2
            && word.starts_with(|c: char| c.is_ascii_uppercase())
            && word
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if is_var {
            let before = rest[..i].trim_end();
            let call = before
                .strip_suffix('(')
                .map(|b| {
                    b.rsplit(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                        .next()
                        .unwrap_or_default()
                        .to_owned()
                })
                .unwrap_or_default();
            out.push((call, word.to_owned()));
            rest = &after[end + 1..];
        } else {
            rest = after;
        }
    }
    out
}

/// The services: each binary that listens, with its address variable and default port
/// (`listen_addr("ORDER_API_ADDR", "127.0.0.1:8080")` in its `main.rs`).
fn services() -> std::collections::BTreeMap<String, (String, u16)> {
    let mut out = std::collections::BTreeMap::new();
    for krate in std::fs::read_dir(repo().join("crates")).unwrap() {
        let dir = krate.unwrap().path();
        let Ok(main) = std::fs::read_to_string(dir.join("src/main.rs")) else {
            continue;
        };
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let Some(i) = main.find("listen_addr(\"") else {
            assert!(
                ["loadgen", "job-bench"].contains(&name.as_str()),
                "{name} has a main.rs but listens nowhere: a service the deploy files would miss, or a new tool to list here"
            );
            continue;
        };
        let call = &main[i + "listen_addr(\"".len()..];
        let var = call[..call.find('"').unwrap()].to_owned();
        let default = call.split('"').nth(2).unwrap();
        let port: u16 = default.rsplit(':').next().unwrap().parse().unwrap();
        out.insert(name, (var, port));
    }
    out
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn deploy_files_and_code_agree_on_services_ports_and_variables() {
    let services = services();
    assert_eq!(services.len(), 6, "{services:?}");
    let code = sources();
    // every variable the code names in a string, and the ones it reads through a config call
    let named: std::collections::BTreeSet<String> = code
        .iter()
        .flat_map(|(_, t)| quoted_vars(t))
        .map(|(_, v)| v)
        .collect();
    let readers = [
        "env_string",
        "env_millis",
        "env_or",
        "ms",
        "var",
        "env",
        "listen_addr",
        "std::env::var",
        "require",
    ];
    let read: std::collections::BTreeSet<String> = code
        .iter()
        .flat_map(|(_, t)| quoted_vars(t))
        .filter(|(call, _)| readers.iter().any(|r| call.ends_with(r)))
        .map(|(_, v)| v)
        .collect();
    assert!(
        read.contains("DATABASE_URL") && read.contains("JOB_LEASE_MS"),
        "{read:?}"
    );
    let in_code = |var: &str, whose: &str| {
        assert!(
            named.contains(var),
            "{whose} sets {var}, which no code reads (a typo, or a setting that was removed)"
        );
    };

    // docker-compose.yml: one service per binary, on its port, healthy when /readyz answers
    let mut compose = load("docker-compose.yml").remove(0);
    compose.apply_merge().unwrap();
    let declared = compose["services"].as_mapping().unwrap();
    let built: std::collections::BTreeSet<String> = declared
        .iter()
        .filter(|(_, s)| !s["build"].is_null())
        .map(|(k, _)| k.as_str().unwrap().to_owned())
        .collect();
    let mut expected: std::collections::BTreeSet<String> = services.keys().cloned().collect();
    expected.insert("db-migrate".to_owned());
    assert_eq!(
        built, expected,
        "compose builds exactly the services, and the one-shot db-migrate"
    );
    // least privilege: the services connect as the application role and never migrate; they
    // wait for db-migrate, which runs as the migrating role
    let migrate = &declared["db-migrate"];
    assert_eq!(migrate["command"][0], "db-migrate");
    assert!(migrate["environment"]["MIGRATION_DATABASE_URL"]
        .as_str()
        .unwrap()
        .contains("bar_migrator"));
    for (name, (addr_var, port)) in &services {
        let mut svc = declared[name.as_str()].clone();
        svc.apply_merge().unwrap();
        assert_eq!(svc["command"][0], name.as_str(), "compose {name}");
        assert!(
            svc["ports"][0] == format!("{port}:{port}").as_str(),
            "compose {name} publishes {port}"
        );
        let env = svc["environment"].as_mapping().unwrap();
        assert_eq!(
            port_of(env[addr_var.as_str()].as_str().unwrap()),
            *port,
            "compose {name} {addr_var}"
        );
        for var in env.keys() {
            in_code(var.as_str().unwrap(), &format!("compose {name}"));
        }
        // every service with a database (it waits for postgres)
        if !svc["depends_on"]["postgres"].is_null() {
            let db = &env["DATABASE_URL"];
            assert!(
                db.as_str().unwrap().contains("bar_app"),
                "compose {name} connects as the application role"
            );
            assert_eq!(env["RUN_MIGRATIONS"], "false", "compose {name}");
            assert!(
                !svc["depends_on"]["db-migrate"].is_null(),
                "compose {name} waits for db-migrate"
            );
        }
        let health = serde_yaml::to_string(&svc["healthcheck"]["test"]).unwrap();
        assert!(
            health.contains(&format!("127.0.0.1:{port}/readyz")),
            "compose {name} has no health check on /readyz: {health}"
        );
    }

    // deploy/k8s: a Deployment (probes, resources), a PodDisruptionBudget each
    let mut deployments = std::collections::BTreeMap::new();
    let mut budgets = std::collections::BTreeSet::new();
    for (rel, doc) in k8s_docs() {
        match doc["kind"].as_str().unwrap() {
            "Deployment" => {
                let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
                deployments.insert(name, doc);
            }
            "PodDisruptionBudget" => {
                let app = &doc["spec"]["selector"]["matchLabels"]["app"];
                budgets.insert(app.as_str().unwrap().to_owned());
            }
            "ConfigMap" => {
                for var in doc["data"].as_mapping().unwrap().keys() {
                    in_code(var.as_str().unwrap(), &rel);
                }
            }
            "Job" => {
                let c = &doc["spec"]["template"]["spec"]["containers"][0];
                assert_eq!(c["command"][0], "db-migrate", "{rel}: the only Job");
                for e in c["env"].as_sequence().unwrap() {
                    in_code(e["name"].as_str().unwrap(), &rel);
                }
            }
            "Service" => {
                let app = doc["spec"]["selector"]["app"].as_str().unwrap();
                let (_, port) = services[app];
                let target = &doc["spec"]["ports"][0]["targetPort"];
                assert_eq!(target.as_u64(), Some(port as u64), "{rel}");
            }
            other => panic!("{rel}: unexpected kind {other}"),
        }
    }
    assert_eq!(
        deployments.keys().collect::<Vec<_>>(),
        services.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        budgets.iter().collect::<Vec<_>>(),
        services.keys().collect::<Vec<_>>(),
        "a PodDisruptionBudget per Deployment"
    );
    for (name, (addr_var, port)) in &services {
        let c = &deployments[name]["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["command"][0], name.as_str(), "k8s {name}");
        assert_eq!(
            c["ports"][0]["containerPort"].as_u64(),
            Some(*port as u64),
            "k8s {name}"
        );
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(
                c[probe]["httpGet"]["port"].as_u64(),
                Some(*port as u64),
                "k8s {name} {probe}"
            );
        }
        assert!(
            !c["resources"]["requests"]["cpu"].is_null()
                && !c["resources"]["requests"]["memory"].is_null()
                && !c["resources"]["limits"]["memory"].is_null(),
            "k8s {name} resources"
        );
        let mut addr_set = false;
        for e in c["env"].as_sequence().unwrap() {
            let var = e["name"].as_str().unwrap();
            in_code(var, &format!("k8s {name}"));
            if var == addr_var {
                addr_set = true;
                assert_eq!(port_of(e["value"].as_str().unwrap()), *port, "k8s {name}");
            }
        }
        assert!(addr_set, "k8s {name} does not set {addr_var}");
    }

    // Prometheus scrapes each service on its port; the image carries each binary
    let prom = serde_yaml::to_string(&load("deploy/prometheus/prometheus.yml")[0]).unwrap();
    let dockerfile = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    for (name, (_, port)) in &services {
        assert!(
            prom.contains(&format!("{name}:{port}")),
            "prometheus misses {name}:{port}"
        );
        assert!(
            dockerfile.contains(&format!("target/release/{name} ")),
            "the image lacks {name}"
        );
    }

    // the other way round: every variable the code reads is documented
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let undocumented: Vec<&String> = read
        .iter()
        .filter(|v| *v != "HOSTNAME" && !readme.contains(v.as_str()))
        .collect();
    assert!(
        undocumented.is_empty(),
        "read by the code, documented nowhere in README.md: {undocumented:?}"
    );
}

/// `major.minor[.patch]` as a comparable triple.
fn rust_version(v: &str) -> (u64, u64, u64) {
    let mut parts = v.split('.').map(|p| {
        p.parse::<u64>()
            .unwrap_or_else(|_| panic!("{v:?} is not a rust version"))
    });
    let mut next = || parts.next().unwrap_or(0);
    (next(), next(), next())
}

/// The image builds only with a rustc the locked dependencies accept: the workspace's
/// `rust-version` is the newest `rust-version` any locked package declares (not older, so
/// it tells the truth; not newer, so it asks no more than it needs), and the Dockerfile's
/// builder is that toolchain. A `cargo update` that raises the need fails here until both
/// follow. (`scripts/test.sh` also checks the workspace with that toolchain when rustup can
/// install it.)
#[test]
fn the_image_and_the_workspace_name_the_rustc_the_lock_file_needs() {
    let out = std::process::Command::new(env!("CARGO"))
        .current_dir(repo())
        .args([
            "metadata",
            "--format-version",
            "1",
            "--locked",
            "--filter-platform",
            "x86_64-unknown-linux-gnu",
        ])
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let workspace: std::collections::HashSet<&str> = meta["workspace_members"]
        .as_array()
        .expect("workspace_members")
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    let resolved: std::collections::HashSet<&str> = meta["resolve"]["nodes"]
        .as_array()
        .expect("resolve")
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    let (mut need, mut by) = ((0, 0, 0), String::new());
    let mut ours = std::collections::BTreeSet::new();
    for p in meta["packages"].as_array().expect("packages") {
        let (Some(id), Some(rv)) = (p["id"].as_str(), p["rust_version"].as_str()) else {
            continue;
        };
        if workspace.contains(id) {
            ours.insert(rv.to_owned());
        } else if resolved.contains(id) && rust_version(rv) > need {
            need = rust_version(rv);
            by = format!("{} {} (rust-version {rv})", p["name"], p["version"]);
        }
    }
    let ours: Vec<String> = ours.into_iter().collect();
    assert_eq!(
        ours.len(),
        1,
        "every crate takes the workspace's rust-version: {ours:?}"
    );
    assert_eq!(
        rust_version(&ours[0]),
        need,
        "Cargo.toml says rust-version {} but the newest a locked package needs is {by}",
        ours[0]
    );
    let dockerfile = std::fs::read_to_string(repo().join("deploy/Dockerfile")).expect("Dockerfile");
    let builder = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM rust:"))
        .expect("the Dockerfile builds FROM rust:<version>-…");
    let image = builder.split('-').next().unwrap_or_default();
    assert_eq!(
        rust_version(image),
        need,
        "deploy/Dockerfile builds with rust:{image}; the lock file needs {by}"
    );
    let ignored = std::fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore");
    for dir in ["target/", ".run/"] {
        assert!(
            ignored.lines().any(|l| l.trim() == dir),
            ".dockerignore leaves {dir} in the build context"
        );
    }
}

fn promtool(args: &[&str]) -> String {
    let out = std::process::Command::new("promtool")
        .current_dir(repo().join("deploy/prometheus"))
        .args(args)
        .output()
        .expect("promtool (Debian's prometheus package; scripts/test-tools.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// The alerts as Prometheus itself reads them: the rules and the shipped configuration pass
/// `promtool check`, and `promtool test rules` runs a unit test of every alert
/// (`deploy/prometheus/alerts.test.yml`) that sees it fire when it should and stay silent when
/// all is well (an idle scheduler, every relay gone, a counter's first increase, ...).
#[test]
fn every_alert_fires_when_it_should_and_only_then() {
    promtool(&["check", "rules", "alerts.yml"]);
    promtool(&["check", "config", "prometheus.yml"]);
    promtool(&["test", "rules", "alerts.test.yml"]);
    let rules = &load("deploy/prometheus/alerts.yml")[0];
    let tests = &load("deploy/prometheus/alerts.test.yml")[0];
    let (mut fires, mut silent) = (
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    );
    for t in tests["tests"].as_sequence().expect("tests") {
        for a in t["alert_rule_test"].as_sequence().expect("alert_rule_test") {
            let name = a["alertname"].as_str().expect("alertname").to_owned();
            match a["exp_alerts"].as_sequence() {
                Some(v) if !v.is_empty() => fires.insert(name),
                _ => silent.insert(name),
            };
        }
    }
    let mut histograms = std::collections::BTreeSet::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("alert");
            assert!(fires.contains(name), "no test sees {name} fire");
            assert!(silent.contains(name), "no test sees {name} stay silent");
            let expr = rule["expr"].as_str().unwrap_or_default();
            if let Some(i) = expr.find("_bucket") {
                let start = expr[..i]
                    .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .map_or(0, |j| j + 1);
                histograms.insert(expr[start..i].to_owned());
            }
        }
    }
    // each of these is checked against a live /metrics page
    // (integration_tests::assert_buckets_span_the_alerts)
    assert_eq!(
        histograms.into_iter().collect::<Vec<_>>(),
        [
            "http_request_duration_seconds",
            "job_fire_delay_seconds",
            "payment_paid_latency_seconds"
        ],
        "a histogram an alert reads whose buckets no test checks against the alert"
    );
}
