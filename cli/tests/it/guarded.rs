//! The public APIs of a served cluster guarded as in production: API keys
//! on HTTP and gRPC (health left open for probes), observability on an
//! address of its own, JSON content type only, and caps on what one request
//! may ask for, checked before any work is built; property-generated gRPC
//! requests get an answer or INVALID_ARGUMENT, never a server error.

use anyhow::{Context, Result, ensure};
use tonic::metadata::MetadataValue;
use tramontane_proto::v1::GenerateRequest;
use tramontane_proto::v1::generation_client::GenerationClient;

use crate::support;

const KEY: &str = "sk-flag-7f3a";
const FILE_KEY: &str = "sk-file-91bc";

fn completion(prompt: &str, extra: &str) -> String {
    format!(r#"{{"model":"model","prompt":{prompt},"max_tokens":2,"temperature":0{extra}}}"#)
}

/// POST `path` with `authorization` (if any) and a JSON content type.
fn post(
    addr: &str,
    path: &str,
    authorization: Option<&str>,
    body: &str,
) -> Result<(u16, String, String)> {
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(value) = authorization {
        headers.push(("Authorization", value));
    }
    support::http_with(addr, "POST", path, &headers, body)
}

fn error_of(body: &str) -> Result<serde_json::Value> {
    let value: serde_json::Value = serde_json::from_str(body).with_context(|| body.to_string())?;
    Ok(value["error"].clone())
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")
}

#[test]
fn keys_content_type_and_caps_guard_the_public_apis() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "23"])?;
    let key_file = dir.path().join("keys");
    std::fs::write(&key_file, format!("# a comment\n{FILE_KEY}\n"))?;
    let serve = support::serve_two_workers(
        &model,
        &[
            "--api-key",
            KEY,
            "--api-key-file",
            key_file.to_str().context("path")?,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    )?;
    let http = serve.http.as_str();
    let metrics = serve.metrics.clone().context("metrics address")?;
    let bearer = format!("Bearer {KEY}");
    let file_bearer = format!("Bearer {FILE_KEY}");
    let ok_body = completion(r#""Hello""#, "");

    // Keys: none or a wrong one is a 401 in the OpenAI format; either
    // configured key passes; /health stays open.
    for authorization in [None, Some("Bearer sk-wrong"), Some(KEY)] {
        let (status, head, body) = post(http, "/v1/completions", authorization, &ok_body)?;
        ensure!(status == 401, "{authorization:?}: {status} {body}");
        ensure!(head.contains("www-authenticate: bearer"), "{head}");
        ensure!(error_of(&body)?["code"] == "invalid_api_key", "{body}");
    }
    for authorization in [&bearer, &file_bearer] {
        let (status, _, body) = post(http, "/v1/completions", Some(authorization), &ok_body)?;
        ensure!(status == 200, "{status} {body}");
    }
    let (status, _, body) = support::http_with(http, "GET", "/v1/models", &[], "")?;
    ensure!(status == 401, "/v1/models: {status} {body}");
    let (status, _, _) = support::http_with(http, "GET", "/health", &[], "")?;
    ensure!(status == 200, "/health: {status}");
    // A method a route does not take: 405 in the same error format.
    let with_key = [("Authorization", bearer.as_str())];
    let (status, _, body) = support::http_with(http, "GET", "/v1/completions", &with_key, "")?;
    ensure!(status == 405, "{status} {body}");
    ensure!(
        error_of(&body)?["message"]
            .as_str()
            .is_some_and(|m| m.contains("GET")),
        "{body}"
    );

    // Observability lives on its own address, open; not on the API's.
    let (status, _, text) = support::http_with(&metrics, "GET", "/metrics", &[], "")?;
    ensure!(
        status == 200 && text.contains("tramontane_router_requests_total"),
        "{status}"
    );
    let (status, _, _) = support::http_with(&metrics, "GET", "/v1/experts/stats", &[], "")?;
    ensure!(status == 200, "/v1/experts/stats: {status}");
    let (status, _, _) = support::http_with(
        http,
        "GET",
        "/metrics",
        &[("Authorization", bearer.as_str())],
        "",
    )?;
    ensure!(status == 404, "/metrics on the API address: {status}");

    // Only JSON bodies: a form post is refused before it is read.
    for content_type in ["application/x-www-form-urlencoded", "text/plain"] {
        let headers = [
            ("Content-Type", content_type),
            ("Authorization", bearer.as_str()),
        ];
        let (status, _, body) =
            support::http_with(http, "POST", "/v1/completions", &headers, &ok_body)?;
        ensure!(status == 415, "{content_type}: {status} {body}");
        ensure!(
            error_of(&body)?["message"]
                .as_str()
                .is_some_and(|m| m.contains("application/json"))
        );
    }

    // Caps, each a 400 naming the field and the limit.
    let quoted = |items: &[String]| {
        format!(
            "[{}]",
            items
                .iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    let many_prompts = quoted(&vec!["Hello".to_string(); 65]);
    let stops = |n: usize, len: usize| format!(r#","stop":{}"#, quoted(&vec!["s".repeat(len); n]));
    let cases = [
        (completion(&many_prompts, ""), "prompt", "64"),
        (completion(r#""Hello""#, &stops(5, 2)), "stop", "at most 4"),
        (completion(r#""Hello""#, &stops(1, 513)), "stop", "512 bytes"),
        (completion(r#""Hello""#, r#","logprobs":6"#), "logprobs", "5"),
        (
            r#"{"model":"model","messages":[{"role":"user","content":"Hi"}],"stop":["a","b","c","d","e"]}"#.to_string(),
            "stop",
            "at most 4",
        ),
        (
            r#"{"model":"model","messages":[{"role":"user","content":"Hi"}],"logprobs":true,"top_logprobs":21}"#.to_string(),
            "top_logprobs",
            "20",
        ),
    ];
    for (body, param, limit) in &cases {
        let path = if body.contains("messages") {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let (status, _, answer) = post(http, path, Some(&bearer), body)?;
        let error = error_of(&answer)?;
        ensure!(
            status == 400 && error["param"] == *param,
            "{param}: {status} {answer}"
        );
        ensure!(
            error["message"].as_str().is_some_and(|m| m.contains(limit)),
            "{param}: {answer}"
        );
    }

    // A 100 KB body of 4,000 prompts and 4,000 stop strings is refused
    // before any prompt is tokenized or any stop string copied: twenty of
    // them leave the router's memory where it was.
    let prompts = quoted(&vec!["Hello there".to_string(); 4000]);
    let stop_list: Vec<String> = (0..4000).map(|i| format!("stop{i:04}")).collect();
    let flood = completion(&prompts, &format!(r#","stop":{}"#, quoted(&stop_list)));
    ensure!(flood.len() > 90_000, "{}", flood.len());
    let pid = serve.process.child.id();
    let before = rss_kib(pid)?;
    for _ in 0..20 {
        let (status, _, answer) = post(http, "/v1/completions", Some(&bearer), &flood)?;
        ensure!(
            status == 400 && error_of(&answer)?["param"] == "prompt",
            "{status} {answer}"
        );
    }
    let grown = rss_kib(pid)?.saturating_sub(before);
    ensure!(grown < 64 * 1024, "the router grew by {grown} KiB");

    // gRPC: the same key as metadata, the same caps, a bounded message
    // size; health is open.
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let mut client =
            GenerationClient::connect(format!("http://{}", serve.process.addr)).await?;
        let request = |stop: Vec<String>, prompt: String, key: Option<&str>| {
            let mut request = tonic::Request::new(GenerateRequest {
                prompt,
                max_tokens: 2,
                temperature: Some(0.0),
                stop,
                ..Default::default()
            });
            if let Some(key) = key {
                let value: MetadataValue<_> = format!("Bearer {key}").parse().expect("ASCII");
                request.metadata_mut().insert("authorization", value);
            }
            request
        };
        let hello = || "Hello".to_string();
        for key in [None, Some("sk-wrong")] {
            let status = client
                .generate(request(vec![], hello(), key))
                .await
                .unwrap_err();
            ensure!(
                status.code() == tonic::Code::Unauthenticated,
                "{key:?}: {status:?}"
            );
        }
        let answer = client
            .generate(request(vec![], hello(), Some(FILE_KEY)))
            .await?;
        ensure!(answer.get_ref().token_ids.len() == 2);
        let status = client
            .generate(request(vec!["a".into(); 5], hello(), Some(KEY)))
            .await
            .unwrap_err();
        ensure!(
            status.code() == tonic::Code::InvalidArgument && status.message().contains("at most 4"),
            "{status:?}"
        );
        // Larger than the 1 MiB a request may be: refused, and the server
        // serves on.
        let status = client
            .generate(request(vec![], "Hello ".repeat(200_000), Some(KEY)))
            .await
            .unwrap_err();
        ensure!(
            matches!(
                status.code(),
                tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
            ),
            "{status:?}"
        );
        let answer = client.generate(request(vec![], hello(), Some(KEY))).await?;
        ensure!(answer.get_ref().token_ids.len() == 2);
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", serve.process.addr))?
                .connect()
                .await?;
        let health = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        ensure!(
            health.get_ref().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        anyhow::Ok(())
    })?;
    Ok(())
}

#[test]
fn property_generated_generate_requests_get_an_answer_or_invalid_argument_never_a_server_error()
-> Result<()> {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "24"])?;
    let serve = support::serve_two_workers(&model, &[])?;
    let runtime = tokio::runtime::Runtime::new()?;
    let client = runtime.block_on(GenerationClient::connect(format!(
        "http://{}",
        serve.process.addr
    )))?;
    // Mostly well-formed requests with one field or another off, and some
    // garbage in every field.
    let sometimes = |strategy: BoxedStrategy<f32>| proptest::option::weighted(0.4, strategy);
    let float = |range: std::ops::Range<f32>| -> BoxedStrategy<f32> {
        prop_oneof![
            6 => range,
            1 => Just(f32::NAN),
            1 => Just(f32::INFINITY),
            1 => Just(f32::NEG_INFINITY),
        ]
        .boxed()
    };
    let text = prop_oneof!["[A-Za-z ,.]{1,30}", "\\PC{1,30}"];
    let ids = prop_oneof![
        4 => proptest::collection::vec(1u32..32_000, 1..12),
        1 => proptest::collection::vec(any::<u32>(), 1..4),
    ];
    let prompt = prop_oneof![
        4 => text.clone().prop_map(|t| (t, Vec::new())),
        4 => ids.clone().prop_map(|i| (String::new(), i)),
        1 => (text, ids),
        1 => Just((String::new(), Vec::new())),
    ];
    let strategy = (
        prompt,
        prop_oneof![8 => 1u32..6, 1 => Just(0u32), 1 => Just(u32::MAX), 1 => 1000u32..5000],
        (
            sometimes(float(-1.0..3.0)),
            sometimes(float(-0.5..1.5)),
            proptest::option::weighted(0.3, any::<u32>()),
            proptest::option::of(any::<u64>()),
        ),
        (
            prop_oneof![4 => Just(0.0f32), 1 => float(-3.0..3.0)],
            prop_oneof![4 => Just(0.0f32), 1 => float(-3.0..3.0)],
        ),
        prop_oneof![
            4 => Just(Vec::new()),
            1 => proptest::collection::vec("\\PC{0,8}", 0..6),
        ],
        proptest::option::weighted(0.3, prop_oneof![0u32..25, Just(u32::MAX)]),
        any::<bool>(),
    )
        .prop_map(
            |(
                (prompt, prompt_token_ids),
                max_tokens,
                (temperature, top_p, top_k, seed),
                (presence_penalty, frequency_penalty),
                stop,
                logprobs,
                ignore_eos,
            )| GenerateRequest {
                prompt,
                prompt_token_ids,
                max_tokens,
                temperature,
                top_p,
                top_k,
                seed,
                presence_penalty,
                frequency_penalty,
                stop,
                logprobs,
                ignore_eos,
            },
        );
    let mut runner = TestRunner::new(Config {
        cases: 160,
        failure_persistence: None,
        ..Config::default()
    });
    let (answered, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    runner
        .run(&strategy, |request| {
            let result = runtime.block_on(client.clone().generate(request.clone()));
            match result {
                Ok(response) => {
                    prop_assert!(response.get_ref().token_ids.len() <= request.max_tokens as usize);
                    answered.set(answered.get() + 1);
                }
                Err(status) => {
                    prop_assert!(
                        matches!(
                            status.code(),
                            tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted
                        ),
                        "{status:?} for {request:?}"
                    );
                    refused.set(refused.get() + 1);
                }
            }
            Ok(())
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // Both kinds were generated, and the server serves on.
    let (answered, refused) = (answered.get(), refused.get());
    ensure!(
        answered > 0 && refused > 0,
        "{answered} answered, {refused} refused"
    );
    let answer = runtime.block_on(client.clone().generate(GenerateRequest {
        prompt: "Hello".into(),
        max_tokens: 3,
        temperature: Some(0.0),
        ..Default::default()
    }))?;
    ensure!(answer.get_ref().token_ids.len() == 3);
    Ok(())
}
