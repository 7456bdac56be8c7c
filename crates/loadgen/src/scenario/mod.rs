//! `loadgen scenario`: the white paper's stress test (section 2.5) as one command. A flash
//! sale of open-loop arrivals against a whole stack, under the providers' chaos and process
//! faults on a schedule, every operation recorded; after the load and a quiet period a checker
//! judges the history and the final state, and the report sets our figures beside the
//! paper's. Exits non-zero on any anomaly.

pub mod check;
pub mod collect;
pub mod faults;
pub mod load;
pub mod maintenance;
pub mod report;
pub mod stack;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use serde_json::json;
use service_kit::auth::{mint_staff_token, DEV_JWT_SECRET, DEV_STAFF_JWT_SECRET, ROLE_OPERATOR};
use service_kit::config::env_string;
use tokio::time::Instant;

use check::{ClientOrder, ClientOutcome};
use faults::Kind;
use load::{OpKind, Recorder};
use report::{ClientFigures, FaultRun, Second};

fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: f64 = n
        .parse()
        .map_err(|_| format!("{s:?}: a number and a unit (ms, s, m, h), e.g. 90s or 3m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: the unit is ms, s, m or h")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    if secs > 24.0 * 3600.0 {
        return Err(format!("{s:?}: at most 24h"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn share(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} must be between 0 and 1"))
    }
}

/// `loadgen scenario`'s options.
#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// "Buy now" arrivals per second (open loop: sent on schedule whatever the server does).
    /// Default 200 (2,400 with --paper).
    #[arg(long)]
    pub rate: Option<f64>,
    /// How long arrivals come (ms, s, m or h; at most 24h). Default 3m (15m with --paper).
    #[arg(long, value_parser = duration)]
    pub duration: Option<Duration>,
    /// Evenly spaced arrivals instead of Poisson's.
    #[arg(long)]
    pub even: bool,
    /// The paper's run: 15 minutes at 2,400/s under the providers' chaos (--rate,
    /// --duration and --faults still win when given).
    #[arg(long)]
    pub paper: bool,
    /// Seed of every random choice (arrivals, buyers, faults): a seed repeats a run. Random
    /// when absent (printed, so it can be repeated).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Faults: none; paper (the providers' chaos: queries timing out, callbacks dropped,
    /// duplicated, delayed and reordered); all (that and every process fault); or a list of
    /// provider, kill-worker, kill-scheduler, kill-relay, redis-restart, kafka-restart,
    /// pg-terminate. Default: all (paper with --paper).
    #[arg(long)]
    pub faults: Option<String>,
    /// Share of the run before the faults begin (the calm phase the report compares with).
    #[arg(long, default_value = "0.2", value_parser = share)]
    pub calm: f64,
    /// SKUs on sale, with a Zipf popularity: a few hot ones sell out, a long tail does not.
    #[arg(long, default_value_t = 50)]
    pub skus: usize,
    /// The Zipf exponent of SKU popularity.
    #[arg(long, default_value_t = 1.1)]
    pub zipf: f64,
    /// Units per SKU. Default: an even share of the units the run asks for, so the hot SKUs
    /// sell out early and the tail never does.
    #[arg(long)]
    pub stock: Option<i64>,
    /// Pre-lock lifetime of the sale's SKUs (seconds): short, so abandoned orders expire
    /// during the run.
    #[arg(long, default_value_t = 30)]
    pub prelock_ttl_secs: u32,
    /// Share of buyers who start a payment (at one of the three providers) and pay after a
    /// think time.
    #[arg(long, default_value = "0.7", value_parser = share)]
    pub pay_share: f64,
    /// Share of buyers who cancel after a think time (the rest abandon their order).
    #[arg(long, default_value = "0.1", value_parser = share)]
    pub cancel_share: f64,
    /// Share of unanswered "buy now" requests the client sends again with the same
    /// Idempotency-Key (a 503 is always retried after its Retry-After).
    #[arg(long, default_value = "0.5", value_parser = share)]
    pub retry_share: f64,
    /// Mean think time before paying or cancelling (exponential, capped at five means).
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub think: Duration,
    /// The client's timeout for each request; no answer by then is an *unknown* outcome.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub timeout: Duration,
    /// Provider chaos: share of payment and refund queries answering too late.
    #[arg(long, default_value = "0.3", value_parser = share)]
    pub query_timeout_share: f64,
    /// Provider chaos: share of payment callbacks never sent.
    #[arg(long, default_value = "0.1", value_parser = share)]
    pub callback_drop_share: f64,
    /// Provider chaos: share of callbacks sent twice.
    #[arg(long, default_value = "0.1", value_parser = share)]
    pub callback_duplicate_share: f64,
    /// Provider chaos: share of callbacks delayed up to 3 s (which reorders them).
    #[arg(long, default_value = "0.2", value_parser = share)]
    pub callback_delay_share: f64,
    /// At least this long between the last arrival and the check (the system settles; the
    /// providers' chaos is off meanwhile). At least the pre-lock lifetime plus 10 s.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub quiet: Duration,
    /// Give up waiting for the system to settle after this long (the checker then reports
    /// what is still open).
    #[arg(long, default_value = "5m", value_parser = duration)]
    pub settle_timeout: Duration,
    /// When the server's autovacuum is off, stand in for it this often (0: never; the default
    /// is autovacuum's naptime): vacuum and analyze the run's tables past autovacuum's
    /// thresholds, at its throttled pace. Without it the job table's dead rows slow every
    /// claim of a long run.
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub vacuum_every: Duration,
    /// Drive the stack scripts/dev-up.sh started (its pid files in .run/pids, its URLs)
    /// instead of starting one. That stack runs one instance of each binary.
    #[arg(long)]
    pub attach: bool,
    /// Where the binaries are (a stack of its own). Default: next to loadgen.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// A superuser's connection, to make the run's database and read it.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub admin_database_url: String,
    /// Postgres connections of order-api (the stack's pools must fit max_connections).
    #[arg(long, default_value_t = 24)]
    pub pg_order_api: u32,
    /// Postgres connections of each scheduler, compensation worker and event relay.
    #[arg(long, default_value_t = 4)]
    pub pg_per_worker: u32,
    /// Leave the stack it started running after the report (prints how to stop it).
    #[arg(long)]
    pub keep: bool,
    /// Where logs, pid files and the history go. Default: .run/scenario/<run id>.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Write the report as JSON (every figure, the options, the seed and the stack).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the report as one self-contained HTML page with charts.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Write every operation (JSON lines: invoke, then ok, fail or unknown, with intended,
    /// sent and answered times).
    #[arg(long)]
    pub history: Option<PathBuf>,
}

impl Options {
    /// `--rate`, else 200 (2,400 with `--paper`).
    pub fn rate(&self) -> f64 {
        self.rate.unwrap_or(if self.paper { 2400.0 } else { 200.0 })
    }

    /// `--duration`, else 3 minutes (15 with `--paper`).
    pub fn duration(&self) -> Duration {
        self.duration
            .unwrap_or(Duration::from_secs(if self.paper { 900 } else { 180 }))
    }
}

/// What is running at the moment (the progress line shows it).
type Current = Arc<Mutex<String>>;

pub async fn run(o: Options) -> anyhow::Result<()> {
    let kinds = faults::parse(
        o.faults
            .as_deref()
            .unwrap_or(if o.paper { "paper" } else { "all" }),
    )
    .map_err(anyhow::Error::msg)?;
    if !(o.rate() > 0.0 && o.rate() <= 100_000.0) {
        bail!("--rate must be above 0 and at most 100000");
    }
    if o.skus == 0 || o.skus > 10_000 {
        bail!("--skus must be 1 to 10000");
    }
    if o.pay_share + o.cancel_share > 1.0 {
        bail!("--pay-share plus --cancel-share must be at most 1");
    }
    if o.duration() < Duration::from_secs(5) {
        bail!("--duration must be at least 5s");
    }
    if !o.vacuum_every.is_zero() && o.vacuum_every < Duration::from_secs(1) {
        bail!("--vacuum-every must be 0 (never) or at least 1s");
    }
    let seed = o.seed.unwrap_or_else(|| fastrand::u64(..));
    let run_id = format!("{:x}", fastrand::u32(..));
    let dir = o
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(".run/scenario").join(&run_id));
    std::fs::create_dir_all(dir.join("logs"))?;
    let chaos = !kinds.is_empty();
    let calm_end = if chaos {
        o.duration().mul_f64(o.calm).max(Duration::from_secs(3))
    } else {
        o.duration()
    };
    let plan = faults::plan(&kinds, calm_end, o.duration(), seed);
    eprintln!(
        "scenario {run_id}: {:.0}/s for {:?} ({}), seed {seed}, faults: {}",
        o.rate(),
        o.duration(),
        if o.even { "even" } else { "Poisson" },
        if kinds.is_empty() {
            "none".to_owned()
        } else {
            kinds
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    if chaos {
        eprintln!("  calm until {:.1} s, then:", calm_end.as_secs_f64());
        if kinds.contains(&Kind::Provider) {
            eprintln!(
                "  {:>7.1} s  provider chaos on until the end ({} % of queries time out, {} % of callbacks dropped, {} % duplicated, {} % delayed)",
                calm_end.as_secs_f64(),
                o.query_timeout_share * 100.0,
                o.callback_drop_share * 100.0,
                o.callback_duplicate_share * 100.0,
                o.callback_delay_share * 100.0
            );
        }
        for p in &plan {
            eprintln!(
                "  {:>7.1} s  {} {} (down {:.1} s)",
                p.at_s,
                p.kind.name(),
                p.target,
                p.down_s
            );
        }
    }

    let mut stack = if o.attach {
        stack::Stack::attach(std::path::Path::new(".run"), &dir).await?
    } else {
        let bin_dir = match &o.bin_dir {
            Some(d) => d.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("loadgen's directory")?
                .to_owned(),
        };
        eprintln!(
            "starting a stack of its own from {} (logs: {})",
            bin_dir.display(),
            dir.join("logs").display()
        );
        stack::Stack::start(stack::Own {
            bin_dir: &bin_dir,
            dir: &dir,
            admin_url: &o.admin_database_url,
            run_id: &run_id,
            pg_budget: stack::PgBudget {
                order_api: o.pg_order_api,
                prelock: 8,
                per_worker: o.pg_per_worker,
            },
        })
        .await?
    };
    let result = drive(&o, &kinds, plan, seed, &run_id, &dir, calm_end, &mut stack).await;
    if o.keep && !o.attach {
        eprintln!(
            "the stack is still running (--keep): order-api {}, database {}\n  stop it: {}",
            stack.order_api,
            stack.admin_database_url,
            stack.stop_hint(&o.admin_database_url)
        );
    } else {
        stack.stop(&o.admin_database_url).await;
    }
    let anomalies = result?;
    if anomalies > 0 {
        bail!("the checker found {anomalies} anomalies");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    o: &Options,
    kinds: &[Kind],
    plan: Vec<faults::Planned>,
    seed: u64,
    run_id: &str,
    dir: &std::path::Path,
    calm_end: Duration,
    stack: &mut stack::Stack,
) -> anyhow::Result<usize> {
    let chaos = !kinds.is_empty();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .tcp_nodelay(true)
        .build()?;
    let secret = env_string("AUTH_JWT_SECRET", DEV_JWT_SECRET);
    let ops_token = mint_staff_token(
        &env_string("STAFF_JWT_SECRET", DEV_STAFF_JWT_SECRET),
        "scenario",
        ROLE_OPERATOR,
        None,
        12 * 3600,
    );
    // the sale: SKUs with a Zipf popularity
    let store = format!("bar-{run_id}");
    let skus: Vec<String> = (1..=o.skus).map(|i| format!("sc-{run_id}-{i}")).collect();
    let asked = o.rate() * o.duration().as_secs_f64() * 2.0;
    let per_sku = o
        .stock
        .unwrap_or_else(|| ((asked / o.skus as f64).ceil() as i64).max(10));
    for sku in &skus {
        crate::stock_sku(
            &http,
            &stack.prelock,
            &ops_token,
            sku,
            json!({"store_id": store, "price_cents": 6_800, "stock": per_sku,
                   "prelock_ttl_seconds": o.prelock_ttl_secs}),
        )
        .await?;
    }
    let stocked: Vec<(String, i64)> = skus.iter().map(|s| (s.clone(), per_sku)).collect();
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(3)
        .connect(&stack.admin_database_url)
        .await
        .context("connect to the run's database")?;
    let stop_vacuum = tokio_util::sync::CancellationToken::new();
    let vacuums = maintenance::stand_in_for_autovacuum(
        &stack.admin_database_url,
        o.vacuum_every,
        stop_vacuum.clone(),
    )
    .await?;

    // the checker's consumer reads from the start
    let life = Arc::new(AtomicU32::new(0));
    let dropped = Arc::new(AtomicU32::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let stop_reader = tokio_util::sync::CancellationToken::new();
    let reader = collect::read_events(
        stack.kafka_brokers.clone(),
        stack.topic.clone(),
        life.clone(),
        dropped.clone(),
        seen.clone(),
        stop_reader.clone(),
    );

    let plan_load = Arc::new(load::Plan {
        seed,
        run: run_id.to_owned(),
        cdf: load::zipf_cdf(skus.len(), o.zipf),
        skus,
        store,
        pay_share: o.pay_share,
        cancel_share: o.cancel_share,
        retry_share: o.retry_share,
        think_mean: o.think,
        timeout: o.timeout,
        jwt_secret: secret,
    });
    let arrivals = load::arrivals(o.rate(), o.duration(), !o.even, seed);
    let targets = Arc::new(load::Targets {
        order_api: stack.order_api.clone(),
        gateway: stack.gateway.clone(),
        http: http.clone(),
    });
    let start = Instant::now();
    let rec = Arc::new(Recorder {
        start,
        ops: Mutex::new(Vec::with_capacity(arrivals.len() * 3)),
        live: load::Live::new(),
    });
    let current: Current = Arc::new(Mutex::new(String::new()));
    let restarts: Arc<Mutex<Vec<DateTime<Utc>>>> = Arc::new(Mutex::new(Vec::new()));

    // faults: the provider's chaos from the end of the calm phase, process faults as planned
    let shares = faults::ProviderShares {
        query_timeout: o.query_timeout_share,
        callback_drop: o.callback_drop_share,
        callback_duplicate: o.callback_duplicate_share,
        callback_delay: o.callback_delay_share,
    };
    let provider = kinds.contains(&Kind::Provider);
    let fault_runs = Arc::new(Mutex::new(Vec::<FaultRun>::new()));
    let unplanned = Arc::new(Mutex::new(Vec::<FaultRun>::new()));
    let stop_supervising = tokio_util::sync::CancellationToken::new();
    // what the rest of the run needs of the stack while it is in the fault driver
    let ends = Ends {
        gateway: stack.gateway.clone(),
        redis_url: stack.redis_url.clone(),
        redis_prefix: stack.redis_prefix.clone(),
    };
    let faults_done = {
        let (current, fault_runs, restarts, life, dropped, unplanned, stop) = (
            current.clone(),
            fault_runs.clone(),
            restarts.clone(),
            life.clone(),
            dropped.clone(),
            unplanned.clone(),
            stop_supervising.clone(),
        );
        let gateway = stack.gateway.clone();
        let http = http.clone();
        // the stack moves into the fault driver for the run and comes back with its result
        let mut st = std::mem::replace(stack, placeholder());
        let admin = admin.clone();
        let end = o.duration();
        tokio::spawn(async move {
            if provider {
                tokio::time::sleep_until(start + calm_end).await;
                let ok = set_faults(&http, &gateway, faults::provider_chaos(&shares)).await;
                let at = start.elapsed().as_secs_f64();
                if let Ok(mut v) = fault_runs.lock() {
                    v.push(FaultRun {
                        kind: Kind::Provider.name(),
                        target: "payment providers".to_owned(),
                        at_s: at,
                        end_s: end.as_secs_f64(),
                        ok: ok.is_ok(),
                        detail: ok.err().map(|e| e.to_string()).unwrap_or_default(),
                    });
                }
            }
            for p in plan {
                let at = start + Duration::from_secs_f64(p.at_s);
                supervise(&mut st, Some(at), &stop, start, &unplanned).await;
                let label = format!("{} {}", p.kind.name(), p.target);
                if let Ok(mut c) = current.lock() {
                    *c = label.clone();
                }
                let at_s = start.elapsed().as_secs_f64();
                let down = Duration::from_secs_f64(p.down_s);
                let outcome: anyhow::Result<String> = async {
                    match p.kind {
                        Kind::PgTerminate => {
                            let n = st.terminate_connections(&admin).await?;
                            Ok(format!("{n} connections terminated"))
                        }
                        _ => {
                            let i = st
                                .index(&p.target)
                                .with_context(|| format!("no {} in this stack", p.target))?;
                            if p.kind == Kind::KafkaRestart {
                                // the checker's consumer goes first (see read_events)
                                let going = life.fetch_add(1, Ordering::SeqCst) + 1;
                                let asked = Instant::now();
                                while dropped.load(Ordering::SeqCst) != going
                                    && asked.elapsed() < Duration::from_secs(5)
                                {
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                                if let Ok(mut r) = restarts.lock() {
                                    r.push(Utc::now());
                                }
                            }
                            let done = st.crash_and_restart(i, down).await;
                            if p.kind == Kind::KafkaRestart {
                                life.fetch_add(1, Ordering::SeqCst);
                            }
                            done?;
                            Ok("killed and restarted".to_owned())
                        }
                    }
                }
                .await;
                let end_s = start.elapsed().as_secs_f64();
                if let Ok(mut v) = fault_runs.lock() {
                    v.push(FaultRun {
                        kind: p.kind.name(),
                        target: p.target.clone(),
                        at_s,
                        end_s,
                        ok: outcome.is_ok(),
                        detail: match outcome {
                            Ok(d) => d,
                            Err(e) => format!("{e:#}"),
                        },
                    });
                }
                if let Ok(mut c) = current.lock() {
                    c.clear();
                }
            }
            // until the checker is done: a process that dies is started again (and reported)
            supervise(&mut st, None, &stop, start, &unplanned).await;
            st
        })
    };

    // progress
    let progress = {
        let rec = rec.clone();
        let current = current.clone();
        let total = o.duration().as_secs();
        tokio::spawn(async move {
            let bar = indicatif::ProgressBar::new(total);
            let tty = !bar.is_hidden();
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len}s {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            let mut last_sent = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let el = start.elapsed();
                let sent = rec.live.sent.load(Ordering::Relaxed);
                let p99 = rec
                    .live
                    .window
                    .lock()
                    .map(|mut h| {
                        let v = h.value_at_quantile(0.99);
                        h.reset();
                        v
                    })
                    .unwrap_or(0);
                let fault = current.lock().map(|c| c.clone()).unwrap_or_default();
                let msg = format!(
                    "{}/s  p99 {:.0} ms  created {}  errors {}  unanswered {}{}",
                    sent - last_sent,
                    p99 as f64 / 1000.0,
                    rec.live.created.load(Ordering::Relaxed),
                    rec.live.errors.load(Ordering::Relaxed),
                    rec.live.unknown.load(Ordering::Relaxed),
                    if fault.is_empty() {
                        String::new()
                    } else {
                        format!("  fault: {fault}")
                    }
                );
                last_sent = sent;
                bar.set_position(el.as_secs().min(total));
                bar.set_message(msg.clone());
                if !tty && el.as_secs().is_multiple_of(10) {
                    eprintln!("[{:>4} s] {msg}", el.as_secs());
                }
                if el.as_secs() >= total {
                    bar.finish();
                    return;
                }
            }
        })
    };

    // the open-loop dispatcher
    let buyers = tokio_util::task::TaskTracker::new();
    for (i, at) in arrivals.iter().enumerate() {
        let intended = start + *at;
        tokio::time::sleep_until(intended).await;
        buyers.spawn(load::buyer(
            i as u64,
            intended,
            plan_load.clone(),
            targets.clone(),
            rec.clone(),
        ));
    }
    let offered = arrivals.len() as u64;
    let _ = progress.await;
    buyers.close();
    eprintln!("arrivals done ({offered}); waiting for the buyers' journeys");
    buyers.wait().await;
    let load_end = start.elapsed();

    // the quiet period: chaos off, the system settles, then the checker
    if provider {
        if let Err(e) = set_faults(&http, &ends.gateway, json!({})).await {
            eprintln!("the providers' chaos could not be switched off for the quiet period: {e:#}");
        }
    }
    let quiet = o
        .quiet
        .max(Duration::from_secs(u64::from(o.prelock_ttl_secs) + 10));
    eprintln!(
        "quiet period: at least {quiet:?}, then the checker (gives up after {:?})",
        o.settle_timeout
    );
    tokio::time::sleep(quiet).await;
    let ops: Vec<load::Op> = rec.ops.lock().map(|v| v.clone()).unwrap_or_default();
    let client = client_orders(&ops, &rec_user_ids(&ops));
    // judged once, on a settled system: nothing due is waiting and the checker's consumer has
    // stopped reading new events (a judgement repeated until it passes would hide an anomaly
    // that comes and goes)
    let judged: anyhow::Result<(check::Findings, Vec<String>, check::World)> = async {
        let deadline = Instant::now() + o.settle_timeout;
        let mut read = usize::MAX;
        let open = loop {
            let open = collect::unsettled(&admin).await?;
            let now_read = seen.lock().map(|v| v.len()).unwrap_or_default();
            if (open.is_empty() && now_read == read) || Instant::now() > deadline {
                break open;
            }
            if !open.is_empty() {
                eprintln!("  not settled yet: {}", open.join(", "));
            }
            read = now_read;
            tokio::time::sleep(Duration::from_secs(5)).await;
        };
        let redis = redis_prelock::RedisPrelock::connect(
            &ends.redis_url,
            &ends.redis_prefix,
            Duration::from_secs(5),
            Duration::from_secs(2),
        )
        .await?;
        let world = collect::world(
            &admin,
            &http,
            &ends.gateway,
            &redis,
            &stocked,
            check::World {
                client: client.clone(),
                seen: seen.lock().map(|v| v.clone()).unwrap_or_default(),
                broker_restarts: restarts.lock().map(|v| v.clone()).unwrap_or_default(),
                ..Default::default()
            },
        )
        .await?;
        Ok((check::check(&world), open, world))
    }
    .await;
    // the stack comes back from the fault driver whatever the judgement did, so it is
    // stopped (or kept) either way
    stop_reader.cancel();
    stop_vacuum.cancel();
    let _ = reader.await;
    stop_supervising.cancel();
    *stack = faults_done.await.context("the fault driver")?;
    let (findings, open, world) = judged?;

    // figures
    let ledger = collect::ledger(&http, &stack.gateway).await?;
    let server = collect::server_figures(&admin, &ledger, &world, &findings).await?;
    let mut cf = client_figures(&ops, offered, o.duration(), calm_end, chaos);
    cf.prelock_timeout_rate = prelock_timeout_rate(&http, &stack.order_api).await;
    let seconds = per_second(&ops, o.duration());
    let runs = fault_runs.lock().map(|v| v.clone()).unwrap_or_default();
    let died = unplanned.lock().map(|v| v.clone()).unwrap_or_default();
    let rows = report::rows(&cf, &server, findings.total(), died.len(), chaos);
    let failed_faults: Vec<&FaultRun> = runs.iter().filter(|f| !f.ok).collect();

    println!("\n{}", report::table(&rows));
    println!("anomalies by kind:");
    for (k, n) in &findings.anomalies {
        println!("  {k:<28} {n}");
    }
    for a in &findings.examples {
        println!("  e.g. {}: {}", a.kind, a.detail);
    }
    println!("counts:");
    for (k, n) in &findings.counts {
        println!("  {k:<36} {n}");
    }
    println!("faults as they ran:");
    for f in &runs {
        println!(
            "  {:>7.1} s to {:>7.1} s  {} {}: {}",
            f.at_s,
            f.end_s,
            f.kind,
            f.target,
            if f.ok {
                f.detail.clone()
            } else {
                format!("FAILED: {}", f.detail)
            }
        );
    }
    if !died.is_empty() {
        println!(
            "processes that died unplanned (started again by the scenario, as a supervisor would):"
        );
        for f in &died {
            println!("  {:>7.1} s  {}: {}", f.at_s, f.target, f.detail);
        }
    }
    let vacuums = vacuums.lock().map(|v| v.clone()).unwrap_or_default();
    if vacuums.autovacuum_off {
        println!(
            "autovacuum off on this server: the scenario stood in for it: {} tables vacuumed, {} analyzed ({:.1} s in all){}",
            vacuums.vacuumed,
            vacuums.analyzed,
            vacuums.seconds,
            if vacuums.failures.is_empty() {
                String::new()
            } else {
                format!("; failed {} times: {}", vacuums.failures.len(), vacuums.failures.join("; "))
            }
        );
    }
    if !open.is_empty() {
        println!(
            "not settled after the quiet period and {:?}: {}",
            o.settle_timeout,
            open.join(", ")
        );
    }
    let report_json = json!({
        "run_id": run_id,
        "seed": seed,
        "options": {
            "rate": o.rate(), "duration_s": o.duration().as_secs_f64(), "poisson": !o.even,
            "faults": kinds.iter().map(|k| k.name()).collect::<Vec<_>>(),
            "calm_share": o.calm, "skus": o.skus, "zipf": o.zipf, "stock_per_sku": per_sku,
            "prelock_ttl_secs": o.prelock_ttl_secs, "pay_share": o.pay_share,
            "cancel_share": o.cancel_share, "retry_share": o.retry_share,
            "think_s": o.think.as_secs_f64(), "timeout_s": o.timeout.as_secs_f64(),
            "query_timeout_share": o.query_timeout_share,
            "callback_drop_share": o.callback_drop_share,
            "callback_duplicate_share": o.callback_duplicate_share,
            "callback_delay_share": o.callback_delay_share,
            "quiet_s": quiet.as_secs_f64(), "attach": o.attach,
            "vacuum_every_s": o.vacuum_every.as_secs_f64(),
        },
        "stack": {
            "database_url": stack.database_url,
            "admin_database_url": stack.admin_database_url,
            "gateway_sim_url": stack.gateway,
            "order_api_url": stack.order_api,
            "prelock_url": stack.prelock,
            "kafka_brokers": stack.kafka_brokers,
            "redis_url": stack.redis_url,
            "kept": o.keep && !o.attach,
        },
        "load_s": load_end.as_secs_f64(),
        "client": cf,
        "server": server,
        "rows": rows,
        "anomalies": findings.anomalies,
        "anomaly_examples": findings.examples,
        "anomaly_total": findings.total(),
        "counts": findings.counts,
        "unsettled": open,
        "faults": runs,
        "unplanned_exits": died,
        "vacuums": vacuums,
        "seconds": seconds,
    });
    if let Some(path) = &o.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report_json)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    if let Some(path) = &o.html {
        let chaos_from = chaos.then_some(calm_end.as_secs_f64());
        let marked: Vec<FaultRun> = runs.iter().chain(&died).cloned().collect();
        let page = report::html(&rows, &seconds, &marked, chaos_from, &server, &report_json);
        std::fs::write(path, page).with_context(|| format!("write {}", path.display()))?;
    }
    let history = o
        .history
        .clone()
        .unwrap_or_else(|| dir.join("history.jsonl"));
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&history)?);
        for op in &ops {
            serde_json::to_writer(&mut f, op)?;
            f.write_all(b"\n")?;
        }
    }
    println!("history: {} operations in {}", ops.len(), history.display());
    if !failed_faults.is_empty() {
        bail!(
            "{} faults could not be made (see the list above): the run did not test what it says",
            failed_faults.len()
        );
    }
    Ok(findings.total() + usize::from(!open.is_empty()))
}

/// The stack's addresses the run needs while the stack itself is in the fault driver.
struct Ends {
    gateway: String,
    redis_url: String,
    redis_prefix: String,
}

/// Waits until `until` (or until `stop`, when `None`), starting again every member that
/// exits unplanned and recording it.
async fn supervise(
    st: &mut stack::Stack,
    until: Option<Instant>,
    stop: &tokio_util::sync::CancellationToken,
    start: Instant,
    unplanned: &Mutex<Vec<FaultRun>>,
) {
    loop {
        let now = Instant::now();
        if until.is_some_and(|u| now >= u) || (until.is_none() && stop.is_cancelled()) {
            return;
        }
        let nap = until.map_or(Duration::from_millis(500), |u| {
            (u - now).min(Duration::from_millis(500))
        });
        tokio::select! {
            _ = tokio::time::sleep(nap) => {}
            _ = stop.cancelled(), if until.is_none() => return,
        }
        for (name, how) in st.revive_dead().await {
            let at_s = start.elapsed().as_secs_f64();
            eprintln!("  {at_s:.1} s: {name} died unplanned: {how}");
            if let Ok(mut v) = unplanned.lock() {
                v.push(FaultRun {
                    kind: "unplanned-exit",
                    target: name,
                    at_s,
                    end_s: start.elapsed().as_secs_f64(),
                    ok: false,
                    detail: how,
                });
            }
        }
    }
}

/// A stack value to stand in while the real one is in the fault driver.
fn placeholder() -> stack::Stack {
    stack::Stack {
        members: Vec::new(),
        order_api: String::new(),
        prelock: String::new(),
        gateway: String::new(),
        kafka_brokers: String::new(),
        topic: String::new(),
        redis_url: String::new(),
        redis_prefix: String::new(),
        database_url: String::new(),
        admin_database_url: String::new(),
        made_database: None,
        http: reqwest::Client::new(),
    }
}

async fn set_faults(
    http: &reqwest::Client,
    gateway: &str,
    faults: serde_json::Value,
) -> anyhow::Result<()> {
    let r = http
        .put(format!("{gateway}/v1/sim/faults"))
        .json(&faults)
        .timeout(Duration::from_secs(5))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!(
            "the simulator refused the faults: {}",
            r.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

/// The order id each buyer's "buy now" is about: from any answer that named it (the id is
/// derived from the buyer and the key, so every attempt names the same one).
fn rec_user_ids(ops: &[load::Op]) -> HashMap<u64, String> {
    ops.iter()
        .filter(|op| op.kind == OpKind::Create)
        .filter_map(|op| op.order_id.clone().map(|id| (op.buyer, id)))
        .collect()
}

/// The client's view of each "buy now": ok if any attempt was answered 201, unknown if none
/// was and one timed out, else refused. Every attempt names the order id (the answer's, or
/// the one the domain derives from buyer and key), so an unknown one is looked up too.
fn client_orders(ops: &[load::Op], ids: &HashMap<u64, String>) -> Vec<ClientOrder> {
    let mut by_buyer: BTreeMap<u64, ClientOutcome> = BTreeMap::new();
    for op in ops.iter().filter(|op| op.kind == OpKind::Create) {
        let e = by_buyer.entry(op.buyer).or_insert(ClientOutcome::Fail);
        *e = match (*e, op.outcome) {
            (ClientOutcome::Ok, _) | (_, ClientOutcome::Ok) => ClientOutcome::Ok,
            (ClientOutcome::Unknown, _) | (_, ClientOutcome::Unknown) => ClientOutcome::Unknown,
            _ => ClientOutcome::Fail,
        };
    }
    by_buyer
        .into_iter()
        .map(|(buyer, outcome)| ClientOrder {
            order_id: ids
                .get(&buyer)
                .cloned()
                .unwrap_or_else(|| format!("unnamed-{buyer}")),
            outcome,
        })
        .collect()
}

fn client_figures(
    ops: &[load::Op],
    offered: u64,
    duration: Duration,
    calm_end: Duration,
    chaos: bool,
) -> ClientFigures {
    let secs = duration.as_secs_f64();
    let calm_ms = calm_end.as_secs_f64() * 1000.0;
    let (mut calm, mut stormy, mut whole) =
        (load::histogram(), load::histogram(), load::histogram());
    let mut f = ClientFigures {
        offered,
        offered_rate: offered as f64 / secs,
        ..Default::default()
    };
    let (mut over, mut firsts, mut answered) = (0u64, 0u64, 0u64);
    for op in ops.iter().filter(|op| op.kind == OpKind::Create) {
        if op.outcome == ClientOutcome::Ok {
            f.created += 1;
        }
        if op.attempt > 1 {
            f.retries += 1;
        }
        match op.outcome {
            ClientOutcome::Unknown => f.unknown += 1,
            ClientOutcome::Fail => {
                *f.refused
                    .entry(format!("{} {}", op.status, op.code))
                    .or_insert(0) += 1
            }
            ClientOutcome::Ok => {}
        }
        if op.attempt != 1 {
            continue;
        }
        firsts += 1;
        if op.outcome != ClientOutcome::Unknown {
            answered += 1;
        }
        let lat = op.answered_ms - op.intended_ms;
        if lat > 150.0 || op.outcome == ClientOutcome::Unknown {
            over += 1;
        }
        let us = ((lat * 1000.0).max(1.0) as u64).min(600_000_000);
        let _ = whole.record(us);
        if op.intended_ms < calm_ms || !chaos {
            let _ = calm.record(us);
        } else {
            let _ = stormy.record(us);
        }
    }
    f.created_rate = f.created as f64 / secs;
    f.answered_rate = answered as f64 / secs;
    f.over_150ms = if firsts == 0 {
        0.0
    } else {
        over as f64 / firsts as f64
    };
    f.calm = collect::dist(&calm);
    f.chaos = collect::dist(&stormy);
    f.whole = collect::dist(&whole);
    f
}

fn per_second(ops: &[load::Op], duration: Duration) -> Vec<Second> {
    let n = duration.as_secs() as usize + 1;
    let mut secs: Vec<Second> = (0..n)
        .map(|t| Second {
            t: t as u64,
            ..Default::default()
        })
        .collect();
    // two significant digits per second (a few KB each, so a 24-hour run's stay small); the
    // run's own percentiles keep three
    let mut hists: Vec<hdrhistogram::Histogram<u64>> = (0..n)
        .map(|_| hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 2).expect("bounds"))
        .collect();
    for op in ops
        .iter()
        .filter(|op| op.kind == OpKind::Create && op.attempt == 1)
    {
        let t = ((op.intended_ms / 1000.0) as usize).min(n - 1);
        let s = &mut secs[t];
        s.offered += 1;
        match op.outcome {
            ClientOutcome::Ok => s.created += 1,
            ClientOutcome::Fail => s.refused += 1,
            ClientOutcome::Unknown => s.unknown += 1,
        }
        let us = (((op.answered_ms - op.intended_ms) * 1000.0).max(1.0) as u64).min(600_000_000);
        let _ = hists[t].record(us);
    }
    for (s, h) in secs.iter_mut().zip(&hists) {
        if !h.is_empty() {
            s.p50_ms = h.value_at_quantile(0.5) as f64 / 1000.0;
            s.p99_ms = h.value_at_quantile(0.99) as f64 / 1000.0;
        }
    }
    secs
}

/// order-api's pre-lock calls that timed out, over all of them (`prelock_calls_total`).
async fn prelock_timeout_rate(http: &reqwest::Client, order_api: &str) -> Option<f64> {
    let page = http
        .get(format!("{order_api}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let (mut total, mut timeouts) = (0.0, 0.0);
    for line in page
        .lines()
        .filter(|l| l.starts_with("prelock_calls_total{"))
    {
        let v: f64 = line.rsplit(' ').next()?.parse().ok()?;
        total += v;
        if line.contains("outcome=\"timeout\"") {
            timeouts += v;
        }
    }
    (total > 0.0).then(|| timeouts / total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(duration("3m").unwrap(), Duration::from_secs(180));
        assert_eq!(duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(duration("2").unwrap(), Duration::from_secs(2));
        assert!(duration("3 fortnights").is_err());
        assert!(duration("-1s").is_err());
        assert!(share("1.5").is_err());
    }

    #[test]
    fn a_buy_now_is_ok_if_any_attempt_was_acknowledged() {
        let op = |buyer, attempt, outcome, id: Option<&str>| load::Op {
            buyer,
            kind: OpKind::Create,
            attempt,
            intended_ms: 0.0,
            sent_ms: 0.0,
            answered_ms: 1.0,
            outcome,
            status: 0,
            code: String::new(),
            order_id: id.map(str::to_owned),
        };
        let ops = vec![
            op(1, 1, ClientOutcome::Unknown, None),
            op(1, 2, ClientOutcome::Ok, Some("o1")),
            op(2, 1, ClientOutcome::Unknown, None),
            op(3, 1, ClientOutcome::Fail, Some("o3")),
        ];
        let c = client_orders(&ops, &rec_user_ids(&ops));
        assert_eq!(c.len(), 3);
        assert_eq!(
            (c[0].order_id.as_str(), c[0].outcome),
            ("o1", ClientOutcome::Ok)
        );
        assert_eq!(c[1].outcome, ClientOutcome::Unknown);
        assert_eq!(c[2].outcome, ClientOutcome::Fail);
    }
}
