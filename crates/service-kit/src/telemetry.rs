//! Logs, traces and metrics.
//!
//! Logs: `tracing` events, JSON lines by default (`LOG_FORMAT=pretty` for humans), filtered by
//! `RUST_LOG` (default `info`); each line inside a span names its `trace_id` and `span_id`.
//!
//! Traces: every `tracing` span is an OpenTelemetry span (`tracing-opentelemetry`), so ids
//! exist and travel (rows, headers) even when nothing is exported. Export is OTLP over HTTP
//! (protobuf; Jaeger takes it on :4318), on only when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set; batching follows the standard `OTEL_BSP_*`
//! variables. See [`crate::trace`] for carrying a trace across rows and processes.
//!
//! Metrics: one Prometheus registry per app instance (not the global default), so several apps
//! in one test process do not collide.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Flushes and stops trace export when dropped: keep it alive until `main` returns.
#[must_use = "traces stop being exported when the guard is dropped"]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("trace export did not shut down cleanly: {e}");
        }
    }
}

/// Whether traces are exported: an OTLP endpoint is configured.
pub fn export_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|e| !e.is_empty()))
}

/// Installs the global log and trace subscriber. Later calls install nothing (their guard only
/// owns an idle provider).
pub fn init_logging(service: &str) -> Telemetry {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let pretty = std::env::var("LOG_FORMAT").is_ok_and(|f| f == "pretty");
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    let mut provider = SdkTracerProvider::builder().with_resource(resource);
    let mut export_error = None;
    let export = export_configured();
    if export {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => provider = provider.with_batch_exporter(exporter),
            Err(e) => export_error = Some(e.to_string()),
        }
    }
    let provider = provider.build();
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer(service.to_owned()));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let result = if pretty {
        registry.with(tracing_subscriber::fmt::layer()).try_init()
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().event_format(crate::trace::JsonLines))
            .try_init()
    };
    if result.is_ok() {
        tracing::info!(
            service,
            version = env!("CARGO_PKG_VERSION"),
            traces_exported = export && export_error.is_none(),
            "starting"
        );
        if let Some(e) = export_error {
            tracing::error!(
                error = e,
                "trace export is off: the OTLP exporter did not start"
            );
        }
    }
    Telemetry { provider }
}

/// Latency buckets (seconds) for request and Redis/Postgres timings: fine-grained below the
/// 150 ms pre-lock SLA, coarse above it; 0.1, 0.15 and 0.8 are SLA thresholds the alerts use.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 0.8, 1.0, 2.5, 5.0,
];

/// Buckets (seconds) for what an SLA bounds in minutes: [`LATENCY_BUCKETS`], then up to ten
/// minutes (90 s is the compensation SLA), so a p99 past the SLA is seen as past it and not
/// as the last finite bucket.
pub const SLA_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 0.8, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 90.0, 120.0, 300.0, 600.0,
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
        self.histogram_with(name, help, labels, LATENCY_BUCKETS)
    }

    /// A histogram with buckets of its own (e.g. [`SLA_BUCKETS`]).
    pub fn histogram_with(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> HistogramVec {
        let h = HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
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
