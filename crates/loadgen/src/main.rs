//! loadgen: the load tool. Flash-sale bursts against a running stack with latency
//! percentiles, the paper's stress test as one command, and tokens for trying the API.
//!
//! ```text
//! loadgen burst [--buyers 2000] [--concurrency 64] [--stock 1000] [--sku sku-loadgen]
//! loadgen scenario [--rate 200] [--duration 3m] [--faults all] [--paper] [--seed N] ...
//! loadgen token <user>                      # a buyer's token (AUTH_JWT_SECRET)
//! loadgen token --operator <name>           # an operator's staff token (STAFF_JWT_SECRET)
//! loadgen token --store <store_id> <name>   # bar staff of one store (STAFF_JWT_SECRET)
//! ```
//! `loadgen <command> --help` explains every option. Tokens live 12 hours (buyer tokens 24),
//! and are signed with the local stack's development secrets unless the variables name
//! others.
//!
//! `burst` stocks a SKU through prelock-service, then sends `--buyers` distinct buyers at
//! `POST /v1/orders` with `--concurrency` in flight (closed loop), and reports p50/p90/p99/max
//! latency and outcomes. In the same run it measures a baseline, the same load against
//! `GET /healthz` (the HTTP round trip with no work behind it), and prints each figure as a
//! ratio to it and to the 150 ms "buy now" SLA. Targets: `ORDER_API_URL`, `PRELOCK_URL`
//! (defaults are the local stack's), `AUTH_JWT_SECRET`, `STAFF_JWT_SECRET` (stocking the SKU
//! takes an operator token).
//!
//! `scenario` is described in [`scenario`] and README.md.

mod scenario;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::json;
use service_kit::auth::{
    mint_staff_token, mint_token, DEV_JWT_SECRET, DEV_STAFF_JWT_SECRET, ROLE_OPERATOR, ROLE_STORE,
};
use service_kit::config::env_string;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

#[derive(Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Load for bar-fulfillment: bursts, the paper's stress test, tokens."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A closed-loop burst of distinct buyers at one SKU, with a /healthz baseline.
    Burst(Args),
    /// The white paper's stress test: a flash sale (open-loop arrivals, Zipf SKUs, buyers
    /// paying, cancelling and walking away) against a whole stack under the providers' chaos
    /// and process faults, every operation recorded, a checker after a quiet period, and the
    /// paper's figures beside ours. Exits non-zero on any anomaly.
    Scenario(Box<scenario::Options>),
    /// Prints a token: a buyer's (`loadgen token alice`), an operator's (`--operator dora`)
    /// or a bar's staff (`--store bar-1 barkeep`).
    Token(TokenArgs),
}

#[derive(clap::Args)]
struct Args {
    /// Distinct buyers, one order each.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    buyers: u64,
    /// Requests in flight at once (1 to 4096).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    concurrency: u64,
    /// Units the SKU is stocked with.
    #[arg(long, default_value_t = 1000)]
    stock: i64,
    /// The SKU (stocked through prelock-service first).
    #[arg(long, default_value = "sku-loadgen")]
    sku: String,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("who").required(true).args(["user", "operator", "store"])))]
struct TokenArgs {
    /// A buyer's user id.
    user: Option<String>,
    /// An operator's name (the audit records it).
    #[arg(long)]
    operator: Option<String>,
    /// A bar's staff: the store id and the staff member's name.
    #[arg(long, num_args = 2, value_names = ["STORE_ID", "NAME"])]
    store: Option<Vec<String>>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Token(t) => {
            let staff = || env_string("STAFF_JWT_SECRET", DEV_STAFF_JWT_SECRET);
            let token = match (t.user, t.operator, t.store) {
                (_, Some(name), _) => {
                    mint_staff_token(&staff(), &name, ROLE_OPERATOR, None, STAFF_TTL)
                }
                (_, _, Some(v)) => {
                    mint_staff_token(&staff(), &v[1], ROLE_STORE, Some(&v[0]), STAFF_TTL)
                }
                (Some(user), _, _) => mint_token(
                    &env_string("AUTH_JWT_SECRET", DEV_JWT_SECRET),
                    &user,
                    24 * 3600,
                ),
                _ => bail!("name a buyer, --operator or --store"),
            };
            println!("{token}");
            Ok(())
        }
        Command::Burst(a) => burst(a).await,
        Command::Scenario(o) => scenario::run(*o).await,
    }
}

/// Stocks `sku` at prelock-service (`PUT /v1/skus/{sku}` with `body`) as an operator.
async fn stock_sku(
    http: &reqwest::Client,
    prelock: &str,
    operator_token: &str,
    sku: &str,
    body: serde_json::Value,
) -> anyhow::Result<()> {
    let r = http
        .put(format!("{prelock}/v1/skus/{sku}"))
        .bearer_auth(operator_token)
        .timeout(Duration::from_secs(10))
        .json(&body)
        .send()
        .await
        .with_context(|| format!("stock {sku} at prelock-service"))?;
    if !r.status().is_success() {
        bail!(
            "stocking {sku} failed: {} {}",
            r.status(),
            r.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

/// How long a staff token minted here lives.
const STAFF_TTL: i64 = 12 * 3600;

struct Sample {
    latency: Duration,
    status: u16,
    code: String,
}

async fn burst(a: Args) -> anyhow::Result<()> {
    let order_api = env_string("ORDER_API_URL", "http://127.0.0.1:8080");
    let prelock = env_string("PRELOCK_URL", "http://127.0.0.1:8081");
    let secret = env_string("AUTH_JWT_SECRET", DEV_JWT_SECRET);
    let ops = mint_staff_token(
        &env_string("STAFF_JWT_SECRET", DEV_STAFF_JWT_SECRET),
        "loadgen",
        ROLE_OPERATOR,
        None,
        STAFF_TTL,
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(a.concurrency as usize)
        .timeout(Duration::from_secs(10))
        .build()?;

    stock_sku(
        &http,
        &prelock,
        &ops,
        &a.sku,
        json!({"store_id": "store-loadgen", "price_cents": 9_900, "stock": a.stock}),
    )
    .await?;

    // tokens are minted before the clock starts
    let run = uuid::Uuid::new_v4().simple().to_string();
    let tokens: Vec<String> = (0..a.buyers as usize)
        .map(|i| mint_token(&secret, &format!("lg-{run}-{i}"), 3600))
        .collect();

    eprintln!(
        "baseline: {} x GET /healthz, {} in flight",
        a.buyers, a.concurrency
    );
    let health = format!("{order_api}/healthz");
    let (baseline, _) = run_load(&http, &a, move |http, _| http.get(&health)).await;
    eprintln!(
        "burst: {} buyers x POST /v1/orders on {} ({} units), {} in flight",
        a.buyers, a.sku, a.stock, a.concurrency
    );
    let tokens = Arc::new(tokens);
    let sku = a.sku.clone();
    let (orders, wall) = run_load(&http, &a, move |http, i| {
        http.post(format!("{order_api}/v1/orders"))
            .bearer_auth(&tokens[i])
            .header("Idempotency-Key", format!("lg-{i}"))
            .json(&json!({"sku_id": sku, "store_id": "store-loadgen", "quantity": 1}))
    })
    .await;

    let mut outcomes = std::collections::BTreeMap::new();
    for s in &orders {
        *outcomes
            .entry(format!("{} {}", s.status, s.code))
            .or_insert(0usize) += 1;
    }
    let p = |v: &[Sample], q: f64| percentile(v, q);
    println!(
        "POST /v1/orders burst: {} buyers, {} in flight, {} units, {:.0} req/s",
        a.buyers,
        a.concurrency,
        a.stock,
        a.buyers as f64 / wall.as_secs_f64()
    );
    for (k, n) in &outcomes {
        println!("  outcome {k}: {n}");
    }
    println!(
        "  {:<5} {:>10} {:>14} {:>16} {:>12}",
        "", "orders", "healthz (base)", "ratio to base", "ratio to SLA"
    );
    for (name, q) in [("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("max", 1.0)] {
        let (o, b) = (p(&orders, q), p(&baseline, q));
        println!(
            "  {name:<5} {:>8.2}ms {:>12.2}ms {:>15.1}x {:>11.2}x",
            ms(o),
            ms(b),
            o.as_secs_f64() / b.as_secs_f64().max(1e-9),
            o.as_secs_f64() / 0.150
        );
    }
    let created = orders.iter().filter(|s| s.status == 201).count() as i64;
    if created > a.stock {
        bail!("OVERSOLD: {created} orders for {} units", a.stock);
    }
    Ok(())
}

async fn run_load<F>(http: &reqwest::Client, a: &Args, make: F) -> (Vec<Sample>, Duration)
where
    F: Fn(&reqwest::Client, usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let gate = Arc::new(Semaphore::new(a.concurrency as usize));
    let mut set = JoinSet::new();
    let started = Instant::now();
    for i in 0..a.buyers as usize {
        let (http, make, gate) = (http.clone(), make.clone(), gate.clone());
        set.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore open");
            let t = Instant::now();
            let r = make(&http, i).send().await;
            let latency = t.elapsed();
            match r {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let body: serde_json::Value = resp.json().await.unwrap_or_default();
                    let code = body["code"].as_str().unwrap_or("").to_owned();
                    Sample {
                        latency,
                        status,
                        code,
                    }
                }
                Err(e) => Sample {
                    latency,
                    status: 0,
                    code: format!("transport: {e}"),
                },
            }
        });
    }
    let mut out = Vec::with_capacity(a.buyers as usize);
    while let Some(s) = set.join_next().await {
        out.push(s.expect("load task"));
    }
    let wall = started.elapsed();
    out.sort_by_key(|s| s.latency);
    (out, wall)
}

fn percentile(sorted: &[Sample], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx].latency
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
