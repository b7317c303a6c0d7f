//! Several routers over one pool of workers (data-parallel attention over
//! shared experts): each router holds its own sequences and KV caches, the
//! workers serve the Forwards of all of them, and every router's tokens are
//! the in-process ones.

use std::path::Path;

use anyhow::{Result, ensure};
use tramontane_proto::v1::GenerateRequest;
use tramontane_proto::v1::generation_client::GenerationClient;

use crate::support;

const PROMPTS: [&str; 4] = [
    "The wind from the north crosses the mountains and",
    "Experts in a mixture are chosen per token, so",
    "A router keeps the cache of every sequence it",
    "Two routers share the same workers while",
];

#[test]
fn two_routers_sharing_two_workers_each_give_the_in_process_tokens() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "33"])?;
    let max_tokens = 24;
    let expected = PROMPTS
        .iter()
        .map(|p| Ok(support::expected_greedy(&model, p, max_tokens)?.1))
        .collect::<Result<Vec<_>>>()?;
    let w0 = support::worker(&model, "0,2,4,6", "127.0.0.1:0")?;
    let w1 = support::worker(&model, "1,3,5,7", "127.0.0.1:0")?;
    let workers = support::addrs([&w0, &w1]);
    let routers = [
        support::router(Path::new(&model), &workers, &[])?,
        support::router(Path::new(&model), &workers, &[])?,
    ];
    tokio::runtime::Runtime::new()?.block_on(async {
        // Every prompt through both routers at once: each router batches its
        // own sequences while the other's Forwards reach the same workers.
        let mut calls = Vec::new();
        for router in &routers {
            let client = GenerationClient::connect(format!("http://{}", router.addr)).await?;
            for (i, prompt) in PROMPTS.iter().enumerate() {
                let mut client = client.clone();
                let request = GenerateRequest {
                    prompt: (*prompt).into(),
                    max_tokens: max_tokens as u32,
                    temperature: Some(0.0),
                    ..Default::default()
                };
                calls.push(tokio::spawn(async move {
                    let answer = client.generate(request).await?.into_inner();
                    anyhow::Ok((i, answer.token_ids))
                }));
            }
        }
        ensure!(calls.len() == 2 * PROMPTS.len());
        for (n, call) in calls.into_iter().enumerate() {
            let (i, tokens) = call.await??;
            ensure!(
                tokens == expected[i],
                "router {} prompt {i}: {tokens:?}, in process {:?}",
                n / PROMPTS.len(),
                expected[i]
            );
        }
        Ok(())
    })
}
