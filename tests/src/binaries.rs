//! Running the real binaries as child processes (end-to-end tests).
//!
//! The binaries are the workspace's own build output (`target/<profile>/<name>`); the test
//! script builds them before the suite (`cargo build --bins`). Each child logs to
//! `target/test-logs/`, so a failing run can be read afterwards.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub fn bin_path(name: &str) -> PathBuf {
    // current_exe = target/<profile>/deps/integration-<hash>
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`, as scripts/test.sh does)",
        path.display()
    );
    path
}

fn log_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.ancestors().nth(3).expect("target").join("test-logs");
    std::fs::create_dir_all(&dir).expect("log dir");
    dir
}

/// A child process, killed when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, env: &[(&str, String)]) -> Proc {
        let log = log_dir().join(format!("{name}-{}.log", uuid::Uuid::new_v4().simple()));
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut cmd = Command::new(bin_path(name));
        cmd.stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// Sends SIGTERM and waits (bounded) for a graceful exit.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            if start.elapsed() > within {
                let _ = self.child.kill();
                panic!(
                    "{} did not stop within {within:?} after SIGTERM; log: {}",
                    self.name,
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (`STOP`, `CONT`, `KILL`, ...) to the process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} {} failed", self.name);
    }

    /// `SIGKILL`, and waits until the process is gone (a crash).
    pub fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Environment that runs a binary with its wall clock `offset` off (libfaketime, from
/// Debian's `faketime`; `scripts/test.sh` installs it), e.g. `"+60s"` or `"-60s"`. Only
/// `CLOCK_REALTIME` moves, as when a host's clock is wrong: the monotonic clock, which no
/// operator sets, keeps counting as it does.
pub fn skewed_clock(offset: &str) -> Vec<(&'static str, String)> {
    let lib = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .expect("libfaketime (Debian's faketime package; scripts/test.sh installs it)");
    vec![
        ("LD_PRELOAD", lib.to_owned()),
        ("FAKETIME", offset.to_owned()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
        ("FAKETIME_NO_CACHE", "1".to_owned()),
    ]
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Waits until `GET {base}/readyz` answers 200, or panics with the child's log.
pub async fn wait_ready(http: &reqwest::Client, base: &str, proc: &mut Proc) {
    let start = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!("{} exited with {status}:\n{}", proc.name, proc.log_text());
        }
        if start.elapsed() > Duration::from_secs(60) {
            panic!("{} not ready after 60 s:\n{}", proc.name, proc.log_text());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `redis-server` of the test's own on `port` (nothing on disk), for outages: stop it,
/// start it again on the same port (empty, as a restarted Redis is here).
pub struct ScratchRedis {
    pub port: u16,
    child: Option<Child>,
}

impl ScratchRedis {
    pub async fn start(port: u16) -> ScratchRedis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (scripts/services.sh installs it)");
        let redis = ScratchRedis {
            port,
            child: Some(child),
        };
        let url = redis.url();
        crate::eventually("scratch redis to answer", Duration::from_secs(10), || {
            let url = url.clone();
            async move {
                let client = redis::Client::open(url).ok()?;
                let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .ok()
            }
        })
        .await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends `sig` (`STOP`: it hangs, its connections open and unanswered; `CONT`: it goes on).
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let ok = Command::new("kill")
                .args([format!("-{sig}"), c.id().to_string()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill -{sig} redis-server");
        }
    }

    /// Kills the server (as a crash would) and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ScratchRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Kafka API of the test's own (tansu on `port`, in memory), for outages: stop it, start it
/// again on the same port (empty, as a restarted in-memory broker is).
pub struct ScratchKafka {
    pub port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl ScratchKafka {
    pub async fn start(port: u16) -> ScratchKafka {
        let mut kafka = ScratchKafka {
            port,
            child: None,
            log: log_dir().join(format!(
                "tansu-{port}-{}.log",
                uuid::Uuid::new_v4().simple()
            )),
        };
        kafka.resume().await;
        kafka
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker (again) and waits until it accepts connections.
    pub async fn resume(&mut self) {
        let out = File::create(&self.log).expect("log file");
        let err = out.try_clone().expect("log file");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new("tansu")
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .stdin(Stdio::null())
            .spawn()
            .expect("tansu on PATH (scripts/kafka.sh installs it)");
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "tansu did not start; log: {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the broker (as a crash would) and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ScratchKafka {
    fn drop(&mut self) {
        self.stop();
    }
}

/// prelock-service, the payment simulator and order-api as processes on one fresh database
/// (the stack end-to-end tests run), with schedulers started on demand.
pub struct Services {
    pub db: String,
    pub order_api: String,
    pub prelock: String,
    pub gateway: String,
    pub prelock_proc: Proc,
    pub gateway_proc: Proc,
    pub order_proc: Proc,
    pub http: reqwest::Client,
    /// What every binary gets (the test's overrides applied).
    common: Vec<(&'static str, String)>,
    /// What order-api and prelock-service got (to start them again the same way).
    order_env: Vec<(&'static str, String)>,
    prelock_env: Vec<(&'static str, String)>,
}

impl Services {
    /// `common`: environment for every binary, over the defaults (fresh database, unique
    /// Redis prefix, test secrets); `order_api`: for order-api only.
    pub async fn start(
        common: &[(&'static str, String)],
        order_api: &[(&'static str, String)],
    ) -> Services {
        let db = crate::fresh_database().await;
        let mut env = vec![
            ("DATABASE_URL", db.clone()),
            ("REDIS_URL", crate::redis_url(0)),
            ("REDIS_KEY_PREFIX", crate::unique_prefix()),
            ("AUTH_JWT_SECRET", crate::JWT_SECRET.to_owned()),
            ("STAFF_JWT_SECRET", crate::STAFF_SECRET.to_owned()),
            ("SERVICE_TOKEN", crate::SERVICE_TOKEN.to_owned()),
            ("PG_MAX_CONNECTIONS", "4".to_owned()),
            ("ALLOW_DEV_SECRETS", "true".to_owned()),
            ("RUST_LOG", "info".to_owned()),
            // most tests send many requests as one buyer; the rate-limit tests set their own
            ("RATE_LIMIT_BUYER_PER_SEC", "0".to_owned()),
        ];
        env.extend_from_slice(common); // later entries win
        let with = |extra: &[(&'static str, String)]| {
            let mut e = env.clone();
            e.extend_from_slice(extra);
            e
        };
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(128)
            .build()
            .expect("client");
        let (pp, gp, op) = (free_port(), free_port(), free_port());
        let url = |port: u16| format!("http://127.0.0.1:{port}");
        let prelock_env = with(&[("PRELOCK_ADDR", format!("127.0.0.1:{pp}"))]);
        let mut prelock_proc = Proc::spawn("prelock-service", &prelock_env);
        wait_ready(&http, &url(pp), &mut prelock_proc).await;
        let mut gateway_proc = Proc::spawn(
            "payment-gateway-sim",
            &with(&[("GATEWAY_SIM_ADDR", format!("127.0.0.1:{gp}"))]),
        );
        wait_ready(&http, &url(gp), &mut gateway_proc).await;
        let mut order_env = vec![
            ("ORDER_API_ADDR", format!("127.0.0.1:{op}")),
            ("PRELOCK_URL", url(pp)),
            ("GATEWAY_URL", url(gp)),
            ("PUBLIC_URL", url(op)),
        ];
        order_env.extend_from_slice(order_api);
        let order_env = with(&order_env);
        let mut order_proc = Proc::spawn("order-api", &order_env);
        wait_ready(&http, &url(op), &mut order_proc).await;
        Services {
            db,
            order_api: url(op),
            prelock: url(pp),
            gateway: url(gp),
            prelock_proc,
            gateway_proc,
            order_proc,
            http,
            common: env,
            order_env,
            prelock_env,
        }
    }

    /// Starts prelock-service again as it was started (after a crash), on the same port.
    pub async fn restart_prelock(&mut self) {
        self.prelock_proc.crash();
        let mut proc = Proc::spawn("prelock-service", &self.prelock_env);
        wait_ready(&self.http, &self.prelock, &mut proc).await;
        self.prelock_proc = proc;
    }

    /// Starts order-api again as it was started (after a crash), on the same port.
    pub async fn restart_order_api(&mut self) {
        self.order_proc.crash();
        let mut proc = Proc::spawn("order-api", &self.order_env);
        wait_ready(&self.http, &self.order_api, &mut proc).await;
        self.order_proc = proc;
    }

    /// Starts a scheduler against this stack (with `extra` environment); returns it and its
    /// URL once it is ready.
    pub async fn scheduler(&self, extra: &[(&'static str, String)]) -> (Proc, String) {
        self.worker("scheduler", "SCHEDULER_ADDR", extra).await
    }

    /// Stocks `sku` at prelock-service.
    pub async fn put_sku(&self, sku: &str, store: &str, price_cents: i64, stock: i64) {
        let r = self
            .http
            .put(format!("{}/v1/skus/{sku}", self.prelock))
            .bearer_auth(crate::ops_token())
            .json(
                &serde_json::json!({"store_id": store, "price_cents": price_cents, "stock": stock}),
            )
            .send()
            .await
            .expect("put sku");
        assert_eq!(r.status(), reqwest::StatusCode::OK);
    }

    /// Sets the simulator's faults.
    pub async fn set_faults(&self, faults: serde_json::Value) {
        let r = self
            .http
            .put(format!("{}/v1/sim/faults", self.gateway))
            .json(&faults)
            .send()
            .await
            .expect("faults");
        assert_eq!(r.status(), reqwest::StatusCode::OK);
    }

    /// `user` orders one unit of `sku` (idempotency key `key`) and starts paying at
    /// `provider`: (order id, payment id, pay URL). Like a real client, it retries a 503
    /// (`Retry-After`): both calls are idempotent.
    pub async fn order_with_payment(
        &self,
        user: &str,
        key: &str,
        (sku, store): (&str, &str),
        provider: &str,
    ) -> (String, String, String) {
        let order = self
            .retrying_503(reqwest::StatusCode::CREATED, || {
                self.http
                    .post(format!("{}/v1/orders", self.order_api))
                    .bearer_auth(crate::token(user))
                    .header("Idempotency-Key", key)
                    .json(&serde_json::json!({"sku_id": sku, "store_id": store, "quantity": 1}))
            })
            .await;
        let id = order["order_id"].as_str().expect("order id").to_owned();
        let started = self
            .retrying_503(reqwest::StatusCode::CREATED, || {
                self.http
                    .post(format!("{}/v1/orders/{id}/payments", self.order_api))
                    .bearer_auth(crate::token(user))
                    .json(&serde_json::json!({ "provider": provider }))
            })
            .await;
        (
            id,
            started["payment_id"]
                .as_str()
                .expect("payment id")
                .to_owned(),
            started["pay_url"].as_str().expect("pay url").to_owned(),
        )
    }

    /// Sends the request, again after a 503 or a 502 (the payment provider did not answer in
    /// time: "retry", as a client is told), up to 50 times, 100 ms apart, and expects `want`;
    /// the JSON body.
    async fn retrying_503(
        &self,
        want: reqwest::StatusCode,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> serde_json::Value {
        for _ in 0..50 {
            let r = request().send().await.expect("request");
            if matches!(
                r.status(),
                reqwest::StatusCode::SERVICE_UNAVAILABLE | reqwest::StatusCode::BAD_GATEWAY
            ) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let status = r.status();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            assert_eq!(status, want, "{body}");
            return body;
        }
        panic!("still 503 after 50 tries");
    }

    /// An ops call with an operator's staff token naming `operator` (`test-operator` when
    /// `None`): the status and the JSON body.
    pub async fn ops(
        &self,
        method: reqwest::Method,
        url: &str,
        operator: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        // the operator is who the staff token names
        let token = crate::operator_token(operator.unwrap_or("test-operator"));
        let mut req = self.http.request(method, url).bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
        let status = r.status();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// The open compensation failures a worker lists.
    pub async fn open_failures(&self, worker: &str) -> Vec<serde_json::Value> {
        let url = format!("{worker}/v1/ops/compensation/failures?status=open");
        let (status, list) = self.ops(reqwest::Method::GET, &url, None, None).await;
        assert_eq!(status, reqwest::StatusCode::OK, "{list}");
        list.as_array().cloned().unwrap_or_default()
    }

    /// Pauses (`true`) or resumes a job kind through a binary's ops API.
    pub async fn pause_kind(&self, base: &str, kind: &str, paused: bool) {
        let method = if paused {
            reqwest::Method::PUT
        } else {
            reqwest::Method::DELETE
        };
        let url = format!("{base}/v1/ops/kinds/{kind}/pause");
        let (status, body) = self.ops(method, &url, None, None).await;
        assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    }

    /// A binary's `/metrics` page.
    pub async fn metrics(&self, base: &str) -> String {
        self.http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// `user` cancels `order` (expects 200). A 503 is retried; a 503 may come after the cancel
    /// committed (its answer was what failed), so on a retry "already cancelled" is success.
    pub async fn cancel(&self, user: &str, order: &str) {
        self.cancel_or(user, order, &[]).await
    }

    /// `user` cancels `order` unless its payment got there first: 200, or 409 because the
    /// order is PAID.
    pub async fn cancel_unless_paid(&self, user: &str, order: &str) {
        self.cancel_or(user, order, &["PAID"]).await
    }

    /// [`Services::cancel`], also accepting a 409 that finds the order in one of `states`.
    async fn cancel_or(&self, user: &str, order: &str, states: &[&str]) {
        for attempt in 0..50 {
            let r = self
                .http
                .post(format!("{}/v1/orders/{order}/cancel", self.order_api))
                .bearer_auth(crate::token(user))
                .send()
                .await
                .expect("cancel");
            let status = r.status();
            if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            let found = body["message"]
                .as_str()
                .and_then(|m| m.strip_prefix("order is "));
            let accepted = status == reqwest::StatusCode::CONFLICT
                && found.is_some_and(|state| {
                    states.contains(&state) || (attempt > 0 && state == "CANCELLED")
                });
            assert!(
                status == reqwest::StatusCode::OK || accepted,
                "{status} {body}"
            );
            return;
        }
        panic!("cancel still 503 after 50 tries");
    }

    /// The simulator's view of a payment (status, transaction id, callbacks, refunds).
    pub async fn sim_payment(&self, payment_id: &str) -> serde_json::Value {
        self.http
            .get(format!("{}/v1/sim/payments/{payment_id}", self.gateway))
            .send()
            .await
            .expect("sim payment")
            .json()
            .await
            .expect("sim payment json")
    }

    /// The buyer pays at the simulator (under its current faults).
    pub async fn pay(&self, payment_id: &str) -> serde_json::Value {
        let r = self
            .http
            .post(format!("{}/v1/sim/payments/{payment_id}/pay", self.gateway))
            .send()
            .await
            .expect("pay");
        assert_eq!(r.status(), reqwest::StatusCode::OK);
        r.json().await.expect("pay json")
    }

    /// Breaks (or mends) the provider's query by payment id for one payment.
    pub async fn break_query(&self, payment_id: &str, broken: bool) {
        self.payment_faults(payment_id, serde_json::json!({ "query_broken": broken }))
            .await;
    }

    /// Sets one payment's faults at the simulator (`query_broken`, `refund_refused`).
    pub async fn payment_faults(&self, payment_id: &str, faults: serde_json::Value) {
        let r = self
            .http
            .put(format!(
                "{}/v1/sim/payments/{payment_id}/faults",
                self.gateway
            ))
            .json(&faults)
            .send()
            .await
            .expect("payment faults");
        assert_eq!(r.status(), reqwest::StatusCode::OK);
    }

    /// Starts an event relay against this stack (Kafka at 127.0.0.1:9092, `scripts/kafka.sh`),
    /// like [`Services::scheduler`].
    pub async fn event_relay(&self, extra: &[(&'static str, String)]) -> (Proc, String) {
        self.worker("event-relay", "EVENT_RELAY_ADDR", extra).await
    }

    /// Starts a compensation worker against this stack, like [`Services::scheduler`].
    pub async fn compensation_worker(&self, extra: &[(&'static str, String)]) -> (Proc, String) {
        self.worker("compensation-worker", "COMPENSATION_ADDR", extra)
            .await
    }

    async fn worker(
        &self,
        binary: &str,
        addr_var: &'static str,
        extra: &[(&'static str, String)],
    ) -> (Proc, String) {
        let port = free_port();
        let mut env = self.common.clone();
        env.push((addr_var, format!("127.0.0.1:{port}")));
        env.push(("PRELOCK_URL", self.prelock.clone()));
        env.push(("GATEWAY_URL", self.gateway.clone()));
        env.extend_from_slice(extra);
        let mut proc = Proc::spawn(binary, &env);
        let url = format!("http://127.0.0.1:{port}");
        wait_ready(&self.http, &url, &mut proc).await;
        (proc, url)
    }
}
