//! Logs and traces of the long-running subcommands (serve, router, worker):
//! `tracing` log lines on stderr as text or JSON (level from `TRAMONTANE_LOG`,
//! default info; lines inside a request carry its trace id), and, with
//! `--otlp-endpoint`, every span exported over OTLP/gRPC with W3C trace
//! context carried from the router into the workers.

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    /// One JSON object per line, with the current span and its parents.
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// Log lines on stderr as text or JSON; the level comes from TRAMONTANE_LOG (default info).
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "TRAMONTANE_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// Export traces over OTLP/gRPC to this collector, e.g. http://127.0.0.1:4317 (off by default).
    #[arg(long, env = "TRAMONTANE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

impl TelemetryArgs {
    /// The same settings as flags, for child processes.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--log-format".to_string(),
            match self.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }
            .to_string(),
        ];
        if let Some(endpoint) = &self.otlp_endpoint {
            args.extend(["--otlp-endpoint".to_string(), endpoint.clone()]);
        }
        args
    }
}

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes it.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Sets up logging and tracing for `service` (the OTel `service.name`).
/// Must run inside a Tokio runtime (the OTLP client lives on it).
pub fn init(args: &TelemetryArgs, service: &'static str) -> Result<Telemetry> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter =
        EnvFilter::try_from_env("TRAMONTANE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Spans get trace ids (in log lines, and carried to the workers) even
    // when nothing is exported.
    let mut builder = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(service).build());
    if let Some(endpoint) = &args.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .with_context(|| format!("--otlp-endpoint {endpoint}"))?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    let traces = tracing_opentelemetry::layer().with_tracer(provider.tracer(service));
    let logs = match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(traces)
        .try_init()
        .context("setting up logging")?;
    Ok(Telemetry {
        provider: Some(provider),
    })
}

impl Telemetry {
    /// Exports what is left. Blocking work runs off the runtime's threads so
    /// that the OTLP client (a task on the runtime) can still make progress.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}
