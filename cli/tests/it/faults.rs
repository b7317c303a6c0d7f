//! Placement checks at start, and worker faults during generation: failover
//! to a replica, UNAVAILABLE without one, recovery when the worker returns;
//! a stopped worker ejected after one missed deadline.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tramontane_proto::v1::GenerateRequest;
use tramontane_proto::v1::generation_client::GenerationClient;

use crate::support;

const PROMPT: &str = "The wind from the north crosses the mountains and";

/// A placement file in `dir`.
fn write_placement(dir: &Path, placement: serde_json::Value) -> Result<std::path::PathBuf> {
    let path = dir.join("placement.json");
    std::fs::write(&path, placement.to_string())?;
    Ok(path)
}

fn model_dir(dir: &Path) -> Result<String> {
    let model = dir.join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "21"])?;
    Ok(model.to_str().context("path")?.to_string())
}

#[test]
fn the_router_refuses_an_incomplete_placement_naming_what_is_missing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = model_dir(dir.path())?;
    let w0 = support::worker(Path::new(&model), "0-3", "127.0.0.1:0")?;
    let w1 = support::worker(Path::new(&model), "4-6", "127.0.0.1:0")?;
    let workers = format!("{},{}", w0.addr, w1.addr);

    // Workers that do not hold what the default placement puts on them:
    // the first to answer is named.
    let stderr = support::router_refuses(Path::new(&model), &workers, &[])?;
    ensure!(
        (stderr.contains("layer 0 expert 1 has no worker: it is placed on worker 1")
            || stderr.contains("layer 0 expert 4 has no worker: it is placed on worker 0"))
            && stderr.contains("does not hold it"),
        "{stderr}"
    );

    // A placement file leaving an expert on no worker.
    let mut experts = vec![vec![vec![0usize]; 8]; 2];
    experts[1][7] = vec![];
    let path = write_placement(
        dir.path(),
        serde_json::json!({"workers": 2, "experts": experts}),
    )?;
    let stderr = support::router_refuses(
        Path::new(&model),
        &workers,
        &["--placement", path.to_str().unwrap_or_default()],
    )?;
    ensure!(
        stderr.contains("layer 1 expert 7 is placed on no worker"),
        "{stderr}"
    );

    // A worker address where nothing answers.
    let free = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    let all = support::worker(Path::new(&model), "0-7", "127.0.0.1:0")?;
    let stderr = support::router_refuses(Path::new(&model), &format!("{},{free}", all.addr), &[])?;
    ensure!(
        stderr.contains(&format!("worker 1 at {free} did not answer")),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn a_killed_worker_fails_over_to_its_replica_with_identical_tokens() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = model_dir(dir.path())?;
    // Long enough that the kill lands while the router is still generating.
    let (_, expected) = support::expected_greedy(Path::new(&model), PROMPT, 120)?;
    let mut w0 = support::worker(Path::new(&model), "all", "127.0.0.1:0")?;
    let w1 = support::worker(Path::new(&model), "all", "127.0.0.1:0")?;
    let placement = write_placement(
        dir.path(),
        serde_json::json!({"workers": 2, "experts": vec![vec![vec![0, 1]; 8]; 2]}),
    )?;
    let router = support::router(
        Path::new(&model),
        &support::addrs([&w0, &w1]),
        &["--placement", placement.to_str().unwrap_or_default()],
    )?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let mut client = GenerationClient::connect(format!("http://{}", router.addr)).await?;
        let request = GenerateRequest {
            prompt: PROMPT.into(),
            max_tokens: 120,
            temperature: Some(0.0),
            ..Default::default()
        };
        let mut stream = client.generate_stream(request.clone()).await?.into_inner();
        let mut tokens = Vec::new();
        while let Some(message) = stream.message().await? {
            if message.has_token {
                tokens.push(message.token_id);
            }
            if tokens.len() == 4 {
                w0.child.kill()?; // SIGKILL mid-generation
                w0.child.wait()?;
            }
        }
        ensure!(
            tokens == expected,
            "tokens after failover differ:\n{tokens:?}\n{expected:?}"
        );
        // A new request with one worker gone is served by the replica alone.
        let again = client.generate(request).await?.into_inner();
        ensure!(
            again.token_ids == expected,
            "a request after the kill differs"
        );
        Ok(())
    })
}

#[test]
fn without_a_replica_requests_fail_unavailable_until_the_worker_returns() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = model_dir(dir.path())?;
    let (_, expected) = support::expected_greedy(Path::new(&model), PROMPT, 8)?;
    let w0 = support::worker(Path::new(&model), "0,2,4,6", "127.0.0.1:0")?;
    let mut w1 = support::worker(Path::new(&model), "1,3,5,7", "127.0.0.1:0")?;
    let w1_addr = w1.addr.clone();
    let router = support::router(
        Path::new(&model),
        &support::addrs([&w0, &w1]),
        &["--dispatch-timeout-ms", "3000"],
    )?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let mut client = GenerationClient::connect(format!("http://{}", router.addr)).await?;
        let request = GenerateRequest {
            prompt: PROMPT.into(),
            max_tokens: 8,
            temperature: Some(0.0),
            ..Default::default()
        };
        ensure!(
            client
                .generate(request.clone())
                .await?
                .into_inner()
                .token_ids
                == expected
        );

        w1.child.kill()?;
        w1.child.wait()?;
        let status = client.generate(request.clone()).await.unwrap_err();
        ensure!(status.code() == tonic::Code::Unavailable, "{status:?}");
        ensure!(
            status.message().contains(&format!("worker 1 at {w1_addr}"))
                && status.message().contains("expert"),
            "the error names worker and expert: {}",
            status.message()
        );

        let _w1_again = support::worker(Path::new(&model), "1,3,5,7", &w1_addr)?;
        let mut last = None;
        for _ in 0..100 {
            match client.generate(request.clone()).await {
                Ok(response) => {
                    ensure!(
                        response.into_inner().token_ids == expected,
                        "tokens after recovery"
                    );
                    return Ok(());
                }
                Err(status) => last = Some(status),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::bail!("the router did not recover: {last:?}")
    })
}

#[test]
fn a_stopped_worker_is_ejected_after_one_deadline_and_taken_back_when_it_continues() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = model_dir(dir.path())?;
    let (_, expected) = support::expected_greedy(Path::new(&model), PROMPT, 8)?;
    let w0 = support::worker(Path::new(&model), "all", "127.0.0.1:0")?;
    let w1 = support::worker(Path::new(&model), "all", "127.0.0.1:0")?;
    let placement = write_placement(
        dir.path(),
        serde_json::json!({"workers": 2, "experts": vec![vec![vec![0, 1]; 8]; 2]}),
    )?;
    let workers = support::addrs([&w0, &w1]);
    let router = support::spawn_serving(&[
        "router",
        "--model",
        &model,
        "--workers",
        &workers,
        "--threads",
        "1",
        "--placement",
        placement.to_str().context("path")?,
        "--dispatch-timeout-ms",
        "500",
    ])?;
    let signal = |name: &str| {
        support::run_ok(std::process::Command::new("kill").args([name, &w0.child.id().to_string()]))
    };
    let dispatch_errors = |metrics: &str| -> f64 {
        support::samples(metrics, "tramontane_router_dispatch_errors_total")
            .iter()
            .filter(|(labels, _)| labels.get("worker").map(String::as_str) == Some("0"))
            .map(|(_, v)| v)
            .sum()
    };
    let up = |metrics: &str| support::metric(metrics, "tramontane_router_worker_up{worker=\"0\"}");
    tokio::runtime::Runtime::new()?.block_on(async {
        let mut client =
            GenerationClient::connect(format!("http://{}", router.process.addr)).await?;
        let request = GenerateRequest {
            prompt: PROMPT.into(),
            max_tokens: 8,
            temperature: Some(0.0),
            ..Default::default()
        };
        // Stopped (SIGSTOP): its connection stays open but nothing answers.
        signal("-STOP")?;
        let tokens = client
            .generate(request.clone())
            .await?
            .into_inner()
            .token_ids;
        ensure!(tokens == expected, "{tokens:?} vs {expected:?}");
        // 8 tokens of 2 layers each, yet only the first Forward waited out
        // its deadline: the worker was ejected then, not at every layer.
        let (_, _, metrics) = support::http(&router.http, "GET", "/metrics", "")?;
        ensure!(dispatch_errors(&metrics) == 1.0, "{metrics}");
        ensure!(up(&metrics) == Some(0.0), "{metrics}");

        // Continued (SIGCONT): it answers its probe again and is taken back.
        signal("-CONT")?;
        let mut back = false;
        for _ in 0..100 {
            let (_, _, metrics) = support::http(&router.http, "GET", "/metrics", "")?;
            if up(&metrics) == Some(1.0) {
                back = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(back, "the continued worker was never taken back");
        let again = client.generate(request).await?.into_inner().token_ids;
        ensure!(again == expected, "tokens after the worker came back");
        Ok(())
    })
}

#[test]
fn an_expert_lost_without_a_replica_fails_only_the_requests_routed_to_it() -> Result<()> {
    use tramontane_model::generate::{StopRule, generate_greedy};
    use tramontane_model::testing::{TestExperts, dense_over};
    use tramontane_model::{MixtralConfig, Tokenizer};

    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    // Skewed gates: the colder experts see few tokens, so that some
    // prompts never reach one of them while others do.
    support::gen_model(
        &model,
        &["--preset", "tiny", "--seed", "21", "--expert-skew", "1"],
    )?;
    let prompts = [
        "The wind from the north",
        "crosses the mountains and",
        "Once upon a time",
        "A river runs",
        "In the morning the village",
        "Snow falls on",
        "The old lighthouse keeper",
        "Bread and salt",
        "Three ships sailed",
        "Under the bridge",
        "The clock struck",
        "Green fields of",
    ];
    let max_tokens = 6;
    // In process: what each prompt generates alone, and where its tokens go.
    let (expected, routed, config) = {
        let _guard = tch::no_grad_guard();
        let config = MixtralConfig::from_file(&model.join("config.json"))?;
        // The in-process experts, noting which (layer, expert) pairs the
        // tokens of a generation are routed to.
        let seen = std::rc::Rc::new(std::cell::RefCell::new(std::collections::BTreeSet::new()));
        let noted = seen.clone();
        let recording = dense_over(&model, tch::Kind::Float, |local| {
            TestExperts::new(local).hook(move |layer, _, routing| {
                let mut seen = noted.borrow_mut();
                seen.extend(routing.experts.iter().map(|&expert| (layer, expert)));
                Ok::<_, std::convert::Infallible>(())
            })
        })?;
        let tokenizer = Tokenizer::from_dir(&model)?;
        let stop = StopRule {
            max_new_tokens: max_tokens,
            eos_ids: tokenizer.eos_token_id().into_iter().collect(),
        };
        let mut expected = Vec::new();
        let mut routed = Vec::new();
        for prompt in prompts {
            seen.borrow_mut().clear();
            let ids = tokenizer.encode(prompt)?;
            let tokens = generate_greedy(&recording, &[ids], &stop)?
                .pop()
                .context("one output")?;
            expected.push(tokens);
            routed.push(seen.borrow().clone());
        }
        (expected, routed, config)
    };
    // The lost expert: the one that splits the prompts most evenly.
    let (layer, expert) = (0..config.num_hidden_layers)
        .flat_map(|layer| (0..config.num_local_experts).map(move |expert| (layer, expert)))
        .max_by_key(|pair| {
            let hit = routed.iter().filter(|r| r.contains(pair)).count();
            hit.min(prompts.len() - hit)
        })
        .context("no expert")?;
    let lost: Vec<bool> = routed
        .iter()
        .map(|r| r.contains(&(layer, expert)))
        .collect();
    let hit = lost.iter().filter(|&&l| l).count();
    ensure!(
        hit >= 2 && prompts.len() - hit >= 2,
        "layer {layer} expert {expert}: {hit} of {} prompts routed there",
        prompts.len()
    );

    // That expert only on worker 1, every other on worker 0.
    let w0 = support::worker(&model, "all", "127.0.0.1:0")?;
    let mut w1 = support::worker(&model, &expert.to_string(), "127.0.0.1:0")?;
    let w1_addr = w1.addr.clone();
    let mut experts = vec![vec![vec![0usize]; config.num_local_experts]; config.num_hidden_layers];
    experts[layer][expert] = vec![1];
    let placement = write_placement(
        dir.path(),
        serde_json::json!({"workers": 2, "experts": experts}),
    )?;
    // Two micro-batches: the rows a failure names are counted in the step.
    let router = support::router(
        &model,
        &support::addrs([&w0, &w1]),
        &[
            "--placement",
            placement.to_str().context("path")?,
            "--micro-batches",
            "2",
        ],
    )?;
    w1.child.kill()?;
    w1.child.wait()?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let client = GenerationClient::connect(format!("http://{}", router.addr)).await?;
        // All at once, so that they share steps.
        let answers = futures::future::join_all(prompts.iter().map(|prompt| {
            let mut client = client.clone();
            let request = GenerateRequest {
                prompt: prompt.to_string(),
                max_tokens: max_tokens as u32,
                temperature: Some(0.0),
                ..Default::default()
            };
            async move { client.generate(request).await }
        }))
        .await;
        for (i, answer) in answers.into_iter().enumerate() {
            match (lost[i], answer) {
                (false, Ok(response)) => {
                    let tokens = response.into_inner().token_ids;
                    ensure!(
                        tokens == expected[i],
                        "prompt {i}: {tokens:?} vs {:?} in process",
                        expected[i]
                    );
                }
                (true, Err(status)) => {
                    ensure!(
                        status.code() == tonic::Code::Unavailable
                            && status.message().contains(&format!(
                                "layer {layer} expert {expert} has no live worker"
                            ))
                            && status.message().contains(&format!("worker 1 at {w1_addr}")),
                        "prompt {i}: {status:?}"
                    );
                }
                (false, Err(status)) => anyhow::bail!(
                    "prompt {i} never reaches layer {layer} expert {expert}, yet failed: {status:?}"
                ),
                (true, Ok(response)) => anyhow::bail!(
                    "prompt {i} reaches layer {layer} expert {expert}, yet got {:?}",
                    response.into_inner().token_ids
                ),
            }
        }
        Ok(())
    })
}

/// A worker that drops experts while serving (its `Hold`) answers NOT_FOUND
/// naming them; the router takes it off those experts (a new placement
/// epoch) and plans them over their replicas, without a failed request:
/// the tokens are the same, the worker stays up and computes the rest.
#[test]
fn a_worker_that_drops_experts_is_planned_around_without_a_failed_request() -> Result<()> {
    use tramontane_proto::v1::expert_service_client::ExpertServiceClient;
    use tramontane_proto::v1::{ExpertPair, HoldRequest};

    let dir = tempfile::tempdir()?;
    let model = model_dir(dir.path())?;
    let (_, expected) = support::expected_greedy(Path::new(&model), PROMPT, 24)?;
    let w0 = support::worker(Path::new(&model), "all", "127.0.0.1:0")?;
    let w1 = support::worker(Path::new(&model), "all", "127.0.0.1:0")?;
    let placement = write_placement(
        dir.path(),
        serde_json::json!({"workers": 2, "experts": vec![vec![vec![0, 1]; 8]; 2]}),
    )?;
    let workers = support::addrs([&w0, &w1]);
    let router = support::spawn_serving(&[
        "router",
        "--model",
        &model,
        "--workers",
        &workers,
        "--threads",
        "1",
        "--placement",
        placement.to_str().context("path")?,
        "--api-key",
        "api-key",
        "--admin-listen",
        "127.0.0.1:0",
        "--admin-key",
        "admin-key",
    ])?;
    let admin = router.admin.clone().context("admin address")?;
    let placement_of = |key: &str| -> Result<(u16, String)> {
        let (status, _, body) = support::http_with(
            &admin,
            "GET",
            "/admin/placement",
            &[("Authorization", &format!("Bearer {key}"))],
            "",
        )?;
        Ok((status, body))
    };
    // The API key does not open the admin API; the admin key does.
    ensure!(placement_of("api-key")?.0 == 401);
    let (status, body) = placement_of("admin-key")?;
    ensure!(status == 200, "{status} {body}");
    let answer: serde_json::Value = serde_json::from_str(&body)?;
    ensure!(
        answer
            == serde_json::json!({"epoch": 0, "workers": 2, "experts": vec![vec![vec![0, 1]; 8]; 2]}),
        "{answer}"
    );
    let layer0_tokens = || -> Result<f64> {
        let (_, _, metrics) = support::http(&w0.addr, "GET", "/metrics", "")?;
        Ok(
            support::samples(&metrics, "tramontane_worker_expert_tokens_total")
                .into_iter()
                .filter(|(labels, _)| labels.get("layer").map(String::as_str) == Some("0"))
                .map(|(_, value)| value)
                .sum(),
        )
    };
    tokio::runtime::Runtime::new()?.block_on(async {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", router.process.addr))?
                .connect()
                .await?;
        let mut client = GenerationClient::with_interceptor(channel, |mut r: tonic::Request<()>| {
            r.metadata_mut()
                .insert("authorization", "Bearer api-key".parse().expect("ascii"));
            Ok(r)
        });
        let request = GenerateRequest {
            prompt: PROMPT.into(),
            max_tokens: 24,
            temperature: Some(0.0),
            ..Default::default()
        };
        let first = client.generate(request.clone()).await?.into_inner();
        ensure!(first.token_ids == expected, "before the drop");
        let mut admin = ExpertServiceClient::connect(format!("http://{}", w0.addr)).await?;
        let dropped = admin
            .hold(HoldRequest {
                epoch: 0,
                load: vec![],
                drop: (0..8)
                    .map(|expert| ExpertPair { layer: 1, expert })
                    .collect(),
            })
            .await?
            .into_inner();
        ensure!(dropped.dropped.len() == 8, "{dropped:?}");
        let before = layer0_tokens()?;
        let again = client.generate(request).await?.into_inner();
        ensure!(
            again.token_ids == expected,
            "after the drop:\n{:?}\n{expected:?}",
            again.token_ids
        );
        ensure!(
            layer0_tokens()? > before,
            "worker 0 no longer computes layer 0"
        );
        anyhow::Ok(())
    })?;
    // The view the router plans with: worker 0 is off the layer 1 experts
    // it was asked for since (the router learns it Forward by Forward), and
    // still on every layer 0 expert.
    let (_, body) = placement_of("admin-key")?;
    let answer: serde_json::Value = serde_json::from_str(&body)?;
    ensure!(answer["epoch"].as_u64() >= Some(1), "{answer}");
    let layer1 = answer["experts"][1].as_array().context("layer 1")?;
    ensure!(
        answer["experts"][0] == serde_json::json!(vec![vec![0, 1]; 8])
            && layer1.iter().any(|w| *w == serde_json::json!([1]))
            && layer1
                .iter()
                .all(|w| *w == serde_json::json!([1]) || *w == serde_json::json!([0, 1])),
        "{answer}"
    );
    let (_, _, metrics) = support::http_with(
        &router.http,
        "GET",
        "/metrics",
        &[("Authorization", "Bearer api-key")],
        "",
    )?;
    let value = |sample: &str| support::metric(&metrics, sample);
    ensure!(
        value("tramontane_router_placement_epoch").is_some_and(|e| e >= 1.0),
        "{metrics}"
    );
    // Its NOT_FOUND answers were counted; that it was not marked down shows
    // in its computing layer 0 after the drop (a worker marked down gets no
    // Forward).
    ensure!(
        value("tramontane_router_dispatch_errors_total{worker=\"0\",code=\"NOT_FOUND\"}")
            .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    Ok(())
}
