//! Shared harness for the integration tests.
//!
//! Every test gets a brand-new Postgres database (named by a uuid, migrated), its own Redis key
//! prefix, and the three services started in-process on port 0 ([`Stack::start`]); or the real
//! binaries as child processes ([`binaries`]). Nothing is shared between tests, so they run in
//! parallel. Tests poll with a deadline ([`eventually`]); none sleeps to wait for an effect.

pub mod binaries;
pub mod fault_proxy;
pub mod otlp;
pub mod receiver;
pub mod webdriver;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use service_kit::auth::{mint_staff_token, mint_token, AuthConfig, ROLE_OPERATOR, ROLE_STORE};
use sqlx::PgPool;
use uuid::Uuid;

pub const JWT_SECRET: &str = "test-jwt-secret";
/// Signs the tests' staff tokens (operators, bar staff).
pub const STAFF_SECRET: &str = "test-staff-jwt-secret";
/// The service-to-service bearer secret.
pub const SERVICE_TOKEN: &str = "test-service-token";

/// Admin connection used to create per-test databases.
pub fn admin_url() -> String {
    std::env::var("TEST_PG_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn redis_url(db: u8) -> String {
    let base = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    format!("{}/{db}", base.trim_end_matches('/'))
}

/// Creates an empty database named `bft_<uuid>` and returns its URL. The test script drops
/// leftovers of earlier runs before the suite starts.
pub async fn fresh_database() -> String {
    let name = format!("bft_{}", Uuid::new_v4().simple());
    let admin = PgPool::connect(&admin_url())
        .await
        .expect("connect to Postgres (is it running?)");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("create test database");
    admin.close().await;
    let base = admin_url();
    let root = base
        .rsplit_once('/')
        .map(|(r, _)| r)
        .unwrap_or(&base)
        .to_owned();
    format!("{root}/{name}")
}

pub fn unique_prefix() -> String {
    format!("t{}:", &Uuid::new_v4().simple().to_string()[..12])
}

pub fn auth() -> AuthConfig {
    AuthConfig {
        jwt_secret: JWT_SECRET.into(),
        staff_secret: STAFF_SECRET.into(),
        service_token: SERVICE_TOKEN.into(),
        max_token_lifetime_secs: service_kit::auth::DEFAULT_MAX_TOKEN_LIFETIME_SECS,
        issuer: None,
        audience: None,
    }
}

pub fn token(user: &str) -> String {
    mint_token(JWT_SECRET, user, 3600)
}

/// An operator's staff token, naming `test-operator`.
pub fn ops_token() -> String {
    operator_token("test-operator")
}

/// An operator's staff token naming `who`.
pub fn operator_token(who: &str) -> String {
    mint_staff_token(STAFF_SECRET, who, ROLE_OPERATOR, None, 3600)
}

/// A bar's staff token, scoped to `store`.
pub fn store_token(store: &str) -> String {
    mint_staff_token(
        STAFF_SECRET,
        &format!("staff-of-{store}"),
        ROLE_STORE,
        Some(store),
        3600,
    )
}

/// Polls `check` until it returns `Some`, or panics after `deadline` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Redis logical database (tests that flush Redis use their own).
    pub redis_db: u8,
    /// A Redis of the test's own (a scratch server it stops and starts) instead of the
    /// shared one.
    pub redis_url: Option<String>,
    pub default_ttl: Duration,
    pub max_quantity: u32,
    /// order-api's in-process sold-out marker.
    pub sold_out_ttl: Duration,
    /// prelock-service's confirmation window (`PRELOCK_CONFIRM_AFTER_MS`).
    pub confirm_after: Duration,
    /// prelock-service's purchase limit for SKUs without one (`PRELOCK_MAX_PER_BUYER`).
    pub default_max_per_buyer: u32,
    /// order-api's rate limits (off unless a test is about them).
    pub rate_limits: service_kit::limit::RateLimitConfig,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            redis_db: 0,
            redis_url: None,
            default_ttl: Duration::from_secs(900),
            max_quantity: 20,
            sold_out_ttl: Duration::from_millis(200),
            confirm_after: Duration::from_millis(1000),
            default_max_per_buyer: 0,
            rate_limits: service_kit::limit::RateLimitConfig::off(),
        }
    }
}

/// order-api, prelock-service and the gateway simulator, in-process, on one fresh database.
pub struct Stack {
    pub order_api: String,
    pub prelock: String,
    pub gateway: String,
    pub db_url: String,
    pub pg: PgPool,
    pub redis_prefix: String,
    pub prelock_app: Arc<prelock_service::App>,
    pub order_app: Arc<order_api::App>,
    pub sim: Arc<payment_gateway_sim::Sim>,
    pub http: reqwest::Client,
}

/// The services' Postgres limits, except the acquire timeout: tests assert exact outcomes of
/// bursts on a loaded 2-core CI machine, so a request waits for a pooled connection (5 s) as
/// a patient client would, rather than answering 503 after 250 ms. Statement and lock
/// timeouts stay as in production (a test relies on the lock timeout).
pub fn test_pg_limits(max_connections: u32) -> postgres_store::PgLimits {
    postgres_store::PgLimits {
        acquire_timeout: Duration::from_secs(5),
        ..postgres_store::PgLimits::new(max_connections)
    }
}

async fn listen() -> (tokio::net::TcpListener, String) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    (l, url)
}

fn spawn_server(l: tokio::net::TcpListener, app: axum::Router) {
    tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
        axum::serve(l, app).await.expect("server");
    });
}

impl Stack {
    pub async fn start() -> Stack {
        Stack::start_with(StackOptions::default()).await
    }

    pub async fn start_with(opts: StackOptions) -> Stack {
        let db_url = fresh_database().await;
        let redis_prefix = unique_prefix();
        let (pl, prelock) = listen().await;
        let (gl, gateway) = listen().await;
        let (ol, order_api) = listen().await;

        let prelock_app = prelock_service::App::build(
            prelock_service::Config {
                database_url: db_url.clone(),
                redis_url: opts
                    .redis_url
                    .clone()
                    .unwrap_or_else(|| redis_url(opts.redis_db)),
                redis_prefix: redis_prefix.clone(),
                redis_timeout: Duration::from_millis(500),
                default_ttl: opts.default_ttl,
                pg: test_pg_limits(8),
                run_migrations: true,
                confirm_after: opts.confirm_after,
                confirm_poll: Duration::from_millis(200),
                default_max_per_buyer: opts.default_max_per_buyer,
            },
            auth(),
        )
        .await
        .expect("prelock-service starts");
        spawn_server(pl, prelock_app.router());
        // the pre-lock's delayed confirmation, as the binary runs it
        tokio::spawn(
            prelock_app
                .clone()
                .run(tokio_util::sync::CancellationToken::new()),
        );

        let secrets = gateway_protocol::ProviderSecrets::development();
        let sim = payment_gateway_sim::Sim::new(secrets.clone(), &gateway).expect("sim");
        spawn_server(gl, sim.router());

        let fcfg = fulfillment::FulfillmentConfig {
            max_quantity: opts.max_quantity,
            sold_out_ttl: opts.sold_out_ttl,
            ..Default::default()
        };
        let order_app = order_api::App::build(
            order_api::Config {
                database_url: db_url.clone(),
                prelock_url: prelock.clone(),
                // generous: debug builds on a loaded 2-core CI machine
                prelock_timeout: Duration::from_secs(2),
                gateway_url: gateway.clone(),
                gateway_timeout: Duration::from_secs(3),
                public_url: order_api.clone(),
                pg: test_pg_limits(16),
                run_migrations: false,
                fulfillment: fcfg,
                rate_limits: opts.rate_limits,
            },
            auth(),
            secrets,
        )
        .await
        .expect("order-api starts");
        spawn_server(ol, order_app.router());

        let pg = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&db_url)
            .await
            .expect("harness pool");
        Stack {
            order_api,
            prelock,
            gateway,
            db_url,
            pg,
            redis_prefix,
            prelock_app,
            order_app,
            sim,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(512)
                .build()
                .expect("client"),
        }
    }

    /// Stock admin through prelock-service's API.
    pub async fn put_sku(&self, sku: &str, store: &str, price_cents: i64, stock: i64) -> Value {
        self.put_sku_with(
            sku,
            json!({ "store_id": store, "price_cents": price_cents, "stock": stock }),
        )
        .await
    }

    pub async fn put_sku_with(&self, sku: &str, body: Value) -> Value {
        let r = self
            .http
            .put(format!("{}/v1/skus/{sku}", self.prelock))
            .bearer_auth(ops_token())
            .json(&body)
            .send()
            .await
            .expect("put sku");
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "put sku: {}",
            r.text().await.unwrap_or_default()
        );
        r.json().await.expect("sku json")
    }

    pub async fn get_sku(&self, sku: &str) -> Value {
        let r = self
            .http
            .get(format!("{}/v1/skus/{sku}", self.prelock))
            .send()
            .await
            .expect("get sku");
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.expect("sku json")
    }

    /// `GET url`, expecting 2xx; the body as text (a `/metrics` page).
    pub async fn get_text(&self, url: &str) -> String {
        let r = self.http.get(url).send().await.expect("get");
        assert!(r.status().is_success(), "GET {url}: {}", r.status());
        r.text().await.expect("text body")
    }

    /// `GET url`, expecting 2xx; the JSON body.
    pub async fn get_json(&self, url: &str) -> Value {
        let r = self.http.get(url).send().await.expect("get");
        assert!(r.status().is_success(), "GET {url}: {}", r.status());
        r.json().await.expect("json body")
    }

    pub async fn rebuild(&self) -> Value {
        self.admin("rebuild").await
    }

    /// `POST /v1/admin/reconcile` on prelock-service.
    pub async fn reconcile(&self) -> Value {
        self.admin("reconcile").await
    }

    async fn admin(&self, action: &str) -> Value {
        let r = self
            .http
            .post(format!("{}/v1/admin/{action}", self.prelock))
            .bearer_auth(ops_token())
            .send()
            .await
            .expect(action);
        assert_eq!(r.status(), StatusCode::OK, "{action}");
        r.json().await.expect("admin json")
    }

    /// Another order-api on this stack's database that reaches prelock-service at
    /// `prelock_url` (a fault proxy, a dead port) with `timeout` per call. Returns its URL.
    pub async fn extra_order_api(&self, prelock_url: &str, timeout: Duration) -> String {
        self.extra_order_app(prelock_url, timeout).await.0
    }

    /// [`Stack::extra_order_api`], with the app itself (its background tasks, its metrics).
    pub async fn extra_order_app(
        &self,
        prelock_url: &str,
        timeout: Duration,
    ) -> (String, Arc<order_api::App>) {
        let mut cfg = order_api::Config::from_env().expect("config");
        cfg.database_url = self.db_url.clone();
        cfg.prelock_url = prelock_url.to_owned();
        cfg.prelock_timeout = timeout;
        cfg.run_migrations = false;
        cfg.pg = test_pg_limits(4);
        cfg.fulfillment.orphan_release_delay = Duration::from_millis(400);
        let app = order_api::App::build(
            cfg,
            auth(),
            gateway_protocol::ProviderSecrets::development(),
        )
        .await
        .expect("order-api starts");
        let (l, url) = listen().await;
        spawn_server(l, app.router());
        (url, app)
    }

    /// `POST /v1/orders` on this stack's order-api; returns status and JSON body.
    pub async fn create_order(
        &self,
        user: &str,
        key: &str,
        sku: &str,
        store: &str,
        quantity: i64,
    ) -> (StatusCode, Value) {
        self.create_order_at(&self.order_api, user, key, sku, store, quantity)
            .await
    }

    /// `POST /v1/orders` on the order-api at `base`.
    pub async fn create_order_at(
        &self,
        base: &str,
        user: &str,
        key: &str,
        sku: &str,
        store: &str,
        quantity: i64,
    ) -> (StatusCode, Value) {
        let order = NewOrderRequest {
            user,
            key,
            sku,
            store,
            quantity,
        };
        create_order(&self.http, base, &order)
            .await
            .expect("create order")
    }

    pub async fn get_order(&self, user: &str, id: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .get(format!("{}/v1/orders/{id}", self.order_api))
            .bearer_auth(token(user))
            .send()
            .await
            .expect("get order");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_user(&self, user: &str, path: &str, body: Value) -> (StatusCode, Value) {
        self.post_user_at(&self.order_api, user, path, body).await
    }

    /// `POST {base}{path}` as `user` on the order-api at `base`.
    pub async fn post_user_at(
        &self,
        base: &str,
        user: &str,
        path: &str,
        body: Value,
    ) -> (StatusCode, Value) {
        let r = self
            .http
            .post(format!("{base}{path}"))
            .bearer_auth(token(user))
            .json(&body)
            .send()
            .await
            .expect("post");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Starts a payment and returns (payment_id, pay_url).
    pub async fn start_payment(
        &self,
        user: &str,
        order_id: &str,
        provider: &str,
    ) -> (String, String) {
        let (s, v) = self
            .post_user(
                user,
                &format!("/v1/orders/{order_id}/payments"),
                json!({ "provider": provider }),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "start payment: {v}");
        (
            v["payment_id"].as_str().unwrap().to_owned(),
            v["pay_url"].as_str().unwrap().to_owned(),
        )
    }

    pub async fn set_faults(&self, faults: Value) {
        let r = self
            .http
            .put(format!("{}/v1/sim/faults", self.gateway))
            .json(&faults)
            .send()
            .await
            .expect("faults");
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "{}",
            r.text().await.unwrap_or_default()
        );
    }

    /// "The buyer pays" at the simulator.
    pub async fn pay(&self, payment_id: &str) -> Value {
        let r = self
            .http
            .post(format!("{}/v1/sim/payments/{payment_id}/pay", self.gateway))
            .send()
            .await
            .expect("pay");
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.expect("pay json")
    }

    pub async fn order_state(&self, id: &str) -> String {
        sqlx::query_scalar("SELECT state FROM orders WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(&self.pg)
            .await
            .expect("order state")
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.pg)
            .await
            .expect(sql)
    }

    /// The ledger invariant of one SKU, at one instant of Redis' clock (the clock lapse times
    /// come from):
    /// - Redis and Postgres hold the same live reservations with the same quantities;
    /// - `available + Σ every Redis reservation (lapsed ones not yet reclaimed included) ==
    ///   stock_real`, and `available >= 0`;
    /// - the SKU is not over-committed: live reservations hold at most `stock_real`;
    /// - ledger rows match their orders: an ACTIVE reservation belongs to a PENDING order, a
    ///   PAID order's units are held (CONFIRMED) or deducted (ALLOCATED), a CONFIRMED or
    ///   REDEEMED order's are deducted.
    ///
    /// Returns (available, units held by live reservations, stock_real).
    pub async fn assert_consistent(&self, sku: &str) -> (i64, i64, i64) {
        let id = domain::SkuId::parse(sku).unwrap();
        let redis = &self.prelock_app.redis;
        let now_ms = redis.now_ms().await.expect("redis TIME");
        let available = redis
            .available(&id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{sku} is not loaded in Redis"));
        let entries = redis.held(&id).await.unwrap();
        let all_units: i64 = entries.iter().map(|(_, q, _)| i64::from(*q)).sum();
        let mut in_redis: Vec<(String, u32)> = entries
            .into_iter()
            .filter(|(_, _, e)| e.is_none_or(|e| e > now_ms))
            .map(|(i, q, _)| (i, q))
            .collect();
        in_redis.sort();
        let mut in_pg: Vec<(String, u32)> = sqlx::query_as::<_, (uuid::Uuid, i32)>(
            "SELECT order_id, quantity FROM reservations WHERE sku_id = $1
               AND (status = 'CONFIRMED'
                    OR (status = 'ACTIVE' AND expires_at > to_timestamp($2::float8 / 1000)))",
        )
        .bind(sku)
        .bind(now_ms as f64)
        .fetch_all(&self.pg)
        .await
        .unwrap()
        .into_iter()
        .map(|(o, q)| (o.to_string(), q as u32))
        .collect();
        in_pg.sort();
        assert_eq!(
            in_redis, in_pg,
            "{sku}: Redis and Postgres hold different live reservations"
        );
        let held: i64 = in_pg.iter().map(|(_, q)| i64::from(*q)).sum();
        let stock_real: i64 = sqlx::query_scalar("SELECT stock_real FROM skus WHERE id = $1")
            .bind(sku)
            .fetch_one(&self.pg)
            .await
            .unwrap();
        assert!(available >= 0, "{sku}: available {available} < 0");
        assert_eq!(
            available + all_units,
            stock_real,
            "{sku}: available {available} + reserved {all_units} != stock_real {stock_real}"
        );
        assert!(
            held <= stock_real,
            "{sku}: over-committed, {held} units held of {stock_real}"
        );
        let mismatched: Vec<(uuid::Uuid, String, String)> = sqlx::query_as(
            "SELECT o.id, o.state, r.status FROM orders o JOIN reservations r ON r.order_id = o.id
             WHERE o.sku_id = $1
               AND ((r.status = 'ACTIVE' AND o.state <> 'PENDING')
                    OR (o.state = 'PAID' AND r.status NOT IN ('CONFIRMED', 'ALLOCATED'))
                    OR (o.state IN ('CONFIRMED', 'REDEEMED') AND r.status <> 'ALLOCATED'))",
        )
        .bind(sku)
        .fetch_all(&self.pg)
        .await
        .unwrap();
        assert!(
            mismatched.is_empty(),
            "{sku}: orders and reservations disagree: {mismatched:?}"
        );
        (available, held, stock_real)
    }

    /// [`Stack::assert_consistent`] for every SKU in the database: fault tests call it after
    /// every step, so a defect that breaks the ledger is caught where it happens.
    pub async fn assert_ledger(&self) {
        let skus: Vec<String> = sqlx::query_scalar("SELECT id FROM skus ORDER BY id")
            .fetch_all(&self.pg)
            .await
            .unwrap();
        for sku in skus {
            self.assert_consistent(&sku).await;
        }
    }
}

/// A SKU as prelock-service shows it: (`stock_real`, `available` in Redis, `reserved` by the
/// ledger's live reservations).
pub async fn sku_units(http: &reqwest::Client, prelock: &str, sku: &str) -> (i64, i64, i64) {
    let v: Value = http
        .get(format!("{prelock}/v1/skus/{sku}"))
        .send()
        .await
        .expect("get sku")
        .json()
        .await
        .expect("sku json");
    let n = |field: &str| {
        v[field]
            .as_i64()
            .unwrap_or_else(|| panic!("{field} in {v}"))
    };
    (n("stock_real"), n("available"), n("reserved"))
}

/// A buyer's "buy now".
#[derive(Debug, Clone, Copy)]
pub struct NewOrderRequest<'a> {
    pub user: &'a str,
    pub key: &'a str,
    pub sku: &'a str,
    pub store: &'a str,
    pub quantity: i64,
}

/// `POST /v1/orders` on the order-api at `base`: the status and JSON body, or the transport
/// error (a process that died mid-request).
pub async fn create_order(
    http: &reqwest::Client,
    base: &str,
    o: &NewOrderRequest<'_>,
) -> Result<(StatusCode, Value), reqwest::Error> {
    let r = http
        .post(format!("{base}/v1/orders"))
        .bearer_auth(token(o.user))
        .header("Idempotency-Key", o.key)
        .json(&json!({ "sku_id": o.sku, "store_id": o.store, "quantity": o.quantity }))
        .send()
        .await?;
    let status = r.status();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

/// Signs and posts a callback to order-api as `provider` would, returning the status.
pub async fn post_callback(
    stack: &Stack,
    provider: &str,
    body: &Value,
    secret: Option<&str>,
    timestamp: Option<i64>,
) -> (StatusCode, Value) {
    post_callback_to(
        &stack.http,
        &stack.order_api,
        provider,
        body,
        secret,
        timestamp,
    )
    .await
}

/// [`post_callback`] to the order-api at `base` (e.g. a real binary), signed with `secret` or
/// the development secret, stamped `timestamp` or now.
pub async fn post_callback_to(
    http: &reqwest::Client,
    base: &str,
    provider: &str,
    body: &Value,
    secret: Option<&str>,
    timestamp: Option<i64>,
) -> (StatusCode, Value) {
    let p: domain::Provider = provider.parse().unwrap();
    let secrets = gateway_protocol::ProviderSecrets::development();
    let body = serde_json::to_vec(body).unwrap();
    let ts = timestamp
        .unwrap_or_else(|| chrono::Utc::now().timestamp())
        .to_string();
    let sig = gateway_protocol::sign(secret.unwrap_or(secrets.get(p)), &ts, &body);
    let r = http
        .post(format!("{base}/v1/payments/{provider}/callback"))
        .header("Content-Type", "application/json")
        .header(gateway_protocol::timestamp_header(p), ts)
        .header(gateway_protocol::signature_header(p), sig)
        .body(body)
        .send()
        .await
        .expect("callback");
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The value of a series in a Prometheus text page: metric `name` with at least `labels`,
/// in whatever order the exporter wrote them.
pub fn metric_value(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    page.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = match series.split_once('{') {
            Some((m, r)) => (m, r.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            return None;
        }
        let have: Vec<&str> = rest.split(',').collect();
        labels
            .iter()
            .all(|(k, v)| have.contains(&format!("{k}=\"{v}\"").as_str()))
            .then(|| value.parse().ok())
            .flatten()
    })
}

/// An order's state.
pub async fn order_state(db: &PgPool, order: &str) -> String {
    sqlx::query_scalar("SELECT state FROM orders WHERE id = $1::uuid")
        .bind(order)
        .fetch_one(db)
        .await
        .expect("order state")
}

/// Validates every outbox row of the database against its Avro schema (`schemas/events`, the
/// row's `event_type` and `schema_version`), failing on the first that does not fit; returns the
/// event types seen with their counts.
pub async fn assert_outbox_matches_schemas(
    db: &PgPool,
) -> std::collections::BTreeMap<String, usize> {
    let schemas = event_schemas::SchemaSet::load(&event_schemas::repo_schemas()).unwrap();
    let rows: Vec<(String, i32, Value)> =
        sqlx::query_as("SELECT event_type, schema_version, payload FROM outbox ORDER BY id")
            .fetch_all(db)
            .await
            .unwrap();
    let mut seen = std::collections::BTreeMap::new();
    for (event_type, version, payload) in rows {
        if let Err(e) = schemas.validate(&event_type, version, &payload) {
            panic!("an emitted event does not match its schema: {e}\n{payload}");
        }
        *seen.entry(event_type).or_insert(0) += 1;
    }
    seen
}

/// [`assert_outbox_matches_schemas`], and every one of `types` was among the rows.
pub async fn assert_emitted_events_match_schemas(db: &PgPool, types: &[&str]) {
    let seen = assert_outbox_matches_schemas(db).await;
    for t in types {
        assert!(seen.contains_key(*t), "no {t} was emitted: {seen:?}");
    }
    println!("schemas: every emitted event matches its schema: {seen:?}");
}

/// What [`money_invariant`] found, for the test's log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MoneyReport {
    /// Payments the provider holds as paid.
    pub paid: usize,
    /// Of those: kept (the order shows it), refunded in full once, or open failures an
    /// operator was told of.
    pub kept: usize,
    pub refunded: usize,
    pub told: usize,
}

/// The money invariant, checked against the provider's own books (the simulator at
/// `gateway`): for every payment the provider holds as paid,
/// - the money was kept: the payment `SUCCEEDED`, its order `PAID`, `CONFIRMED` or
///   `REDEEMED`, and the provider refunded nothing; or
/// - it went back: the payment `REFUNDED`, exactly one refund of the full amount at the
///   provider, and its order `REFUNDED` (or kept by another payment of it: paid twice); or
/// - an operator was told: an open `compensation_failure` for it exists.
///
/// And the provider refunded nothing it was not asked to: no refund of an unpaid payment, none
/// of money the system keeps. `Err` names the first payment that breaks it (callers poll
/// until the system has settled, then assert).
pub async fn money_invariant(
    http: &reqwest::Client,
    gateway: &str,
    db: &PgPool,
) -> Result<MoneyReport, String> {
    let at_provider: Vec<Value> = http
        .get(format!("{gateway}/v1/sim/payments"))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let mut report = MoneyReport::default();
    for p in &at_provider {
        let id = p["payment_id"].as_str().unwrap_or_default();
        let refunds = p["refunds"].as_array().cloned().unwrap_or_default();
        let refunded: i64 = refunds
            .iter()
            .filter_map(|r| r["amount_cents"].as_i64())
            .sum();
        let amount = p["amount_cents"].as_i64().unwrap_or_default();
        let ours: Option<(String, String, String, bool)> = sqlx::query_as(
            "SELECT p.status, o.state, o.id::text,
                    EXISTS (SELECT 1 FROM compensation_failure f
                            WHERE f.payment_id = p.id AND f.status = 'open')
             FROM payments p JOIN orders o ON o.id = p.order_id WHERE p.id = $1::uuid",
        )
        .bind(id)
        .fetch_optional(db)
        .await
        .map_err(|e| e.to_string())?;
        if p["status"] != "PAID" {
            if !refunds.is_empty() {
                return Err(format!("payment {id} was never paid but refunded: {p}"));
            }
            continue;
        }
        report.paid += 1;
        let Some((status, order_state, order_id, told)) = ours else {
            return Err(format!(
                "payment {id} is paid at the provider and unknown here"
            ));
        };
        let kept = status == "SUCCEEDED"
            && matches!(order_state.as_str(), "PAID" | "CONFIRMED" | "REDEEMED");
        let order_kept_by_another: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM payments WHERE order_id = $1::uuid
                            AND status = 'SUCCEEDED' AND id <> $2::uuid)",
        )
        .bind(&order_id)
        .bind(id)
        .fetch_one(db)
        .await
        .map_err(|e| e.to_string())?;
        let given_back = status == "REFUNDED"
            && refunds.len() == 1
            && refunded == amount
            && (order_state == "REFUNDED" || order_kept_by_another);
        if kept && refunds.is_empty() {
            report.kept += 1;
        } else if given_back {
            report.refunded += 1;
        } else if told {
            report.told += 1;
        } else {
            return Err(format!(
                "payment {id} paid at the provider ({amount} cents, refunded {refunded} in {} refunds): \
                 here {status}, order {order_id} {order_state}, and no open failure",
                refunds.len()
            ));
        }
    }
    Ok(report)
}

/// Polls [`money_invariant`] until it holds (the system settles what is in flight), then
/// returns its report; panics with the last breach after `deadline`.
pub async fn assert_money_invariant(
    http: &reqwest::Client,
    gateway: &str,
    db: &PgPool,
    deadline: Duration,
) -> MoneyReport {
    let start = std::time::Instant::now();
    loop {
        match money_invariant(http, gateway, db).await {
            Ok(report) => {
                println!("money invariant: {report:?}");
                return report;
            }
            Err(breach) if start.elapsed() > deadline => {
                panic!("money invariant broken after {deadline:?}: {breach}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The thresholds the alerts in `deploy/prometheus/alerts.yml` compare a quantile of
/// histogram `metric` with (`histogram_quantile(…, … metric_bucket …) > T`).
pub fn alert_quantile_thresholds(metric: &str) -> Vec<f64> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/alerts.yml");
    let text = std::fs::read_to_string(&path).expect("deploy/prometheus/alerts.yml");
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("alerts.yml parses");
    let bucket = format!("{metric}_bucket");
    let mut out = Vec::new();
    for group in doc["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let expr = rule["expr"].as_str().unwrap_or_default();
            if !(expr.contains("histogram_quantile(") && expr.contains(&bucket)) {
                continue;
            }
            let (_, t) = expr
                .rsplit_once('>')
                .expect("a quantile alert compares with >");
            out.push(
                t.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("threshold of {expr}")),
            );
        }
    }
    out
}

/// Every threshold an alert compares a quantile of histogram `metric` with is one of its
/// bucket bounds on this live `/metrics` page, with a finite bucket above it: otherwise
/// `histogram_quantile` can never pass it (a p99 past the last finite bucket reads as that
/// bucket) or passes it only by interpolation.
pub fn assert_buckets_span_the_alerts(page: &str, metric: &str) {
    let thresholds = alert_quantile_thresholds(metric);
    assert!(
        !thresholds.is_empty(),
        "no alert uses a quantile of {metric}"
    );
    let prefix = format!("{metric}_bucket{{");
    let bounds: Vec<f64> = page
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            le.parse::<f64>().ok().filter(|b| b.is_finite())
        })
        .collect();
    assert!(
        !bounds.is_empty(),
        "{metric} has no buckets on the page:\n{page}"
    );
    for t in thresholds {
        assert!(
            bounds.iter().any(|b| (b - t).abs() < 1e-9),
            "{metric}: an alert compares with {t} s, which is no bucket bound ({bounds:?})"
        );
        assert!(
            bounds.iter().any(|b| *b > t),
            "{metric}: an alert compares with {t} s, and no finite bucket lies above it ({bounds:?})"
        );
    }
}
