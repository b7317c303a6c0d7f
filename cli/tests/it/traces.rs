//! One trace across processes: `serve --otlp-endpoint` exports the router's
//! and the workers' spans to an OTLP/gRPC receiver run by this test; a
//! worker's Forward span is the child of the router's dispatch span (through
//! `traceparent` in the gRPC metadata), under the request's trace id, and the
//! request span carries the GenAI attributes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;

use crate::support;

/// A span as received, with the service that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    attributes: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

fn text(value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("lock");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .map(|a| text(&a.value))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        service: service.clone(),
                        name: span.name,
                        trace_id: span.trace_id,
                        span_id: span.span_id,
                        parent: span.parent_span_id,
                        attributes: span
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), text(&a.value)))
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[test]
fn a_request_is_one_trace_from_router_to_worker() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "29"])?;

    let runtime = tokio::runtime::Runtime::new()?;
    let receiver = Receiver::default();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let collector = listener.local_addr()?;
    let service = receiver.clone();
    runtime.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });

    let serve =
        support::serve_two_workers(&model, &["--otlp-endpoint", &format!("http://{collector}")])?;
    let body = serde_json::json!({
        "model": "model", "prompt": "The tramontane", "max_tokens": 3, "temperature": 0,
    });
    let (status, _, answer) =
        support::http(&serve.http, "POST", "/v1/completions", &body.to_string())?;
    ensure!(status == 200, "{status} {answer}");

    // Wait (not a timing assertion) until both sides have exported.
    let mut spans = Vec::new();
    for _ in 0..300 {
        spans = receiver.spans.lock().expect("lock").clone();
        let request_done = spans.iter().any(|s| s.name.starts_with("text_completion"));
        let worker_seen = spans.iter().any(|s| s.name == "expert_forward");
        if request_done && worker_seen {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let request = spans
        .iter()
        .find(|s| s.name == "text_completion model")
        .with_context(|| format!("no request span among {:?}", names(&spans)))?;
    ensure!(request.service == "tramontane-router", "{request:?}");
    for (key, value) in [
        ("gen_ai.operation.name", "text_completion"),
        ("gen_ai.request.model", "model"),
        ("gen_ai.request.max_tokens", "3"),
        ("gen_ai.usage.output_tokens", "3"),
        ("gen_ai.response.finish_reasons", "length"),
    ] {
        ensure!(
            request.attributes.get(key).map(String::as_str) == Some(value),
            "{key}: {:?}",
            request.attributes.get(key)
        );
    }
    ensure!(request.attributes.contains_key("gen_ai.usage.input_tokens"));

    let by_id: HashMap<&[u8], &Received> = spans.iter().map(|s| (&s.span_id[..], s)).collect();
    // Every worker Forward of this trace hangs under a router dispatch, under
    // a forward step, under the request.
    let forwards: Vec<&Received> = spans
        .iter()
        .filter(|s| s.name == "expert_forward" && s.trace_id == request.trace_id)
        .collect();
    ensure!(
        !forwards.is_empty(),
        "no worker span in the request's trace: {:?}",
        names(&spans)
    );
    for forward in forwards {
        ensure!(forward.service == "tramontane-worker", "{forward:?}");
        let dispatch = by_id
            .get(&forward.parent[..])
            .with_context(|| format!("parent of {forward:?} not received"))?;
        ensure!(
            dispatch.name == "dispatch" && dispatch.service == "tramontane-router",
            "{dispatch:?}"
        );
        ensure!(dispatch.attributes.get("layer") == forward.attributes.get("layer"));
        let step = by_id.get(&dispatch.parent[..]).context("dispatch parent")?;
        ensure!(step.name == "forward_step", "{step:?}");
        ensure!(step.parent == request.span_id, "{step:?}");
    }
    print_tree(&spans, request, 0);
    Ok(())
}

/// The trace as received (`cargo test --release --test it traces:: -- --nocapture`).
fn print_tree(spans: &[Received], span: &Received, depth: usize) {
    let mut attributes: Vec<_> = span
        .attributes
        .iter()
        .filter(|(k, _)| {
            k.starts_with("gen_ai.")
                || ["layer", "worker", "rows", "batch.sequences"].contains(&k.as_str())
        })
        .collect();
    attributes.sort();
    println!(
        "{:indent$}{} [{}] {:?}",
        "",
        span.name,
        span.service,
        attributes,
        indent = depth * 2
    );
    for child in spans
        .iter()
        .filter(|s| s.parent == span.span_id && s.trace_id == span.trace_id)
    {
        print_tree(spans, child, depth + 1);
    }
}

fn names(spans: &[Received]) -> Vec<(String, String)> {
    spans
        .iter()
        .map(|s| (s.service.clone(), s.name.clone()))
        .collect()
}
