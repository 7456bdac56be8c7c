//! Carrying one trace across rows, processes and time.
//!
//! A trace context travels as a W3C `traceparent` string
//! (`00-<trace id>-<span id>-<flags>`): in the `traceparent` header of HTTP requests, in the
//! `traceparent` column of `orders`, `outbox` and `delayed_job` rows, and in the `traceparent`
//! header of Kafka messages. Whatever works on an order later (its payment, its callback, its
//! follow-up jobs two seconds on, the consumers of its events) starts its span as a child of the
//! stored context, so one trace shows the order's whole life.

use std::fmt::Write as _;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_opentelemetry::{OpenTelemetrySpanExt, OtelData};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The header (HTTP and Kafka) and the column name.
pub const TRACEPARENT: &str = "traceparent";

/// The current span's context as a `traceparent`, or `None` outside any traced span.
pub fn current_traceparent() -> Option<String> {
    format_traceparent(tracing::Span::current().context().span().span_context())
}

pub fn format_traceparent(sc: &SpanContext) -> Option<String> {
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// Parses a W3C `traceparent` (version 00); anything malformed is `None`.
pub fn parse_traceparent(tp: &str) -> Option<SpanContext> {
    let mut parts = tp.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() || trace.len() != 32 || span.len() != 16 {
        return None;
    }
    let sc = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

/// Makes `span` a child of the stored context `traceparent` (when there is one and it parses).
/// Call it before the span is first entered. Returns the span, for chaining.
pub fn follow(span: tracing::Span, traceparent: Option<&str>) -> tracing::Span {
    if let Some(sc) = traceparent.and_then(parse_traceparent) {
        // only fails when the span is disabled (filtered out): nothing to parent then
        let _ = span.set_parent(Context::new().with_remote_span_context(sc));
    }
    span
}

/// Log lines as JSON objects: `timestamp`, `level`, the event's fields (`message` among them),
/// `target`, and, inside a traced span, `span`, `trace_id` and `span_id`, so a log search by
/// trace id finds what the trace's spans logged.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut line = serde_json::Map::new();
        line.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .into(),
        );
        line.insert("level".into(), meta.level().as_str().into());
        event.record(&mut Fields(&mut line));
        line.insert("target".into(), meta.target().into());
        if let Some(span) = ctx.lookup_current() {
            line.insert("span".into(), span.name().into());
            for s in span.scope() {
                let ext = s.extensions();
                let Some(data) = ext.get::<OtelData>() else {
                    continue;
                };
                if let (Some(trace), Some(id)) = (data.trace_id(), data.span_id()) {
                    line.insert("trace_id".into(), trace.to_string().into());
                    line.insert("span_id".into(), id.to_string().into());
                    break;
                }
            }
        }
        let mut text = serde_json::Value::Object(line).to_string();
        text.push('\n');
        writer.write_str(&text)
    }
}

struct Fields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut s = String::new();
        let _ = write!(s, "{value:?}");
        self.0.insert(field.name().into(), s.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;

    /// The trace id of `span` (32 hex digits), once it is traced.
    fn trace_id_of(span: &tracing::Span) -> Option<String> {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        sc.is_valid().then(|| sc.trace_id().to_string())
    }

    #[test]
    fn traceparent_round_trips_and_rejects_garbage() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(tp).unwrap();
        assert_eq!(format_traceparent(&sc).as_deref(), Some(tp));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-zz-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_span_that_follows_a_stored_context_joins_its_trace() {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            // the request that created the order, and what it stored
            let request = tracing::info_span!("POST /v1/orders");
            let stored = request.in_scope(current_traceparent).unwrap();
            let trace = trace_id_of(&request).unwrap();
            assert!(stored.contains(&trace));
            // much later, elsewhere: a job's span follows the stored context
            let job = follow(tracing::info_span!("job"), Some(&stored));
            assert_eq!(trace_id_of(&job), Some(trace.clone()));
            let inner = job.in_scope(current_traceparent).unwrap();
            assert!(
                inner.contains(&trace) && inner != stored,
                "{inner} vs {stored}"
            );
            // no context, or a broken one: a trace of its own
            let alone = follow(tracing::info_span!("alone"), Some("garbage"));
            assert_ne!(trace_id_of(&alone), Some(trace));
        });
        assert_eq!(
            current_traceparent(),
            None,
            "outside a traced span there is no context"
        );
    }
}
