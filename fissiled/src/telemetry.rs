//! Logs and traces: log lines on stderr (`RUST_LOG`, default `info`) and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, every span
//! (one per request, one per lifecycle step, with the sandbox id and tenant) exported to an
//! OpenTelemetry collector over OTLP/HTTP (protobuf; plain `http://`, e.g. a collector on the
//! node). Spans go out in batches from a thread of their own, so a slow or absent collector
//! never holds a request: the exporter's own timeout (`OTEL_EXPORTER_OTLP_TIMEOUT`, 10 s by
//! default) bounds each export, and a full queue drops spans rather than grow.

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Setting up logs and traces failed.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (an endpoint that is not a URL, ...).
    #[error("building the OTLP span exporter")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
    /// A global subscriber was installed already.
    #[error("installing the tracing subscriber")]
    Subscriber(#[source] tracing_subscriber::util::TryInitError),
}

/// The installed logs and traces; [`Telemetry::shutdown`] flushes the spans not yet sent.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Whether the environment names an OTLP collector.
pub fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

/// Installs the global subscriber: stderr logs, plus OTLP export when configured.
pub fn init() -> Result<Telemetry, TelemetryError> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let provider = match otlp_configured() {
        true => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .build()
                .map_err(TelemetryError::Exporter)?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name("fissiled")
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
        false => None,
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("fissiled")));
    tracing_subscriber::registry()
        .with(filter)
        // Colours only on a terminal: a daemon's log is a file or a journal, and every
        // request's span fields are formatted (with their colours) as it starts.
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr),
        )
        .with(otel)
        .try_init()
        .map_err(TelemetryError::Subscriber)?;
    if provider.is_some() {
        tracing::info!("exporting spans over OTLP/HTTP");
    }
    Ok(Telemetry { provider })
}

impl Telemetry {
    /// Sends the spans still queued (bounded by the exporter's timeout) and stops exporting.
    pub fn shutdown(mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("fissiled: flushing spans to the OTLP collector: {e}");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}
