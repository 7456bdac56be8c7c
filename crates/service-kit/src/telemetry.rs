//! Logs and metrics.
//!
//! Logs: `tracing` events, JSON lines by default (`LOG_FORMAT=pretty` for humans), filtered by
//! `RUST_LOG` (default `info`). Metrics: one Prometheus registry per app instance (not the
//! global default), so several apps in one test process do not collide.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tracing_subscriber::EnvFilter;

/// Installs the global log subscriber. Safe to call more than once (later calls do nothing).
pub fn init_logging(service: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let pretty = std::env::var("LOG_FORMAT").is_ok_and(|f| f == "pretty");
    let result = if pretty {
        tracing_subscriber::fmt().with_env_filter(filter).try_init()
    } else {
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_env_filter(filter)
            .try_init()
    };
    if result.is_ok() {
        tracing::info!(service, version = env!("CARGO_PKG_VERSION"), "starting");
    }
}

/// Latency buckets (seconds) for request and Redis/Postgres timings: fine-grained below the
/// 150 ms pre-lock SLA, coarse above it.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A registry with the HTTP metrics every service exports.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// `http_requests_total{method,route,status}`; `route` is the template, never a raw path.
    pub http_requests: IntCounterVec,
    /// `http_request_duration_seconds{method,route}`.
    pub http_duration: HistogramVec,
}

impl Metrics {
    pub fn new(service: &str) -> Self {
        let registry = Registry::new_custom(
            None,
            Some(std::iter::once(("service".to_owned(), service.to_owned())).collect()),
        )
        .expect("valid registry labels");
        let http_requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by route template and status",
            ),
            &["method", "route", "status"],
        )
        .expect("valid metric");
        let http_duration = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["method", "route"],
        )
        .expect("valid metric");
        let m = Metrics {
            registry,
            http_requests,
            http_duration,
        };
        m.register(Box::new(m.http_requests.clone()));
        m.register(Box::new(m.http_duration.clone()));
        m
    }

    /// Registers a service's own collector. Names are fixed at compile time, so a clash is a
    /// programming error.
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) {
        self.registry.register(c).expect("metric registered twice");
    }

    pub fn counter(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
        self.register(Box::new(c.clone()));
        c
    }

    pub fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
        self.register(Box::new(g.clone()));
        g
    }

    pub fn histogram(&self, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
        let h = HistogramVec::new(
            HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
            labels,
        )
        .expect("valid metric");
        self.register(Box::new(h.clone()));
        h
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}
