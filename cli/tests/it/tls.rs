//! TLS: a worker with a CA refuses clients without a certificate that CA
//! signed (mTLS) and serves its metrics port to any client over TLS, a
//! router with the cluster's certificate is let in and serves HTTPS and
//! gRPC over TLS; `serve --tls` does it all with a throwaway CA.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tramontane_proto::v1::expert_service_client::ExpertServiceClient;
use tramontane_proto::v1::{ExpertPair, HoldRequest, HoldResponse, InfoRequest};

use crate::support;

const PROMPT: &str = "The wind from the north";

/// `tramontane certs --out DIR --node NAME=127.0.0.1,localhost ...`.
fn certs(dir: &Path, names: &[&str]) -> Result<()> {
    let mut command = support::tramontane();
    command.args(["certs", "--out", dir.to_str().context("path")?]);
    for name in names {
        command.args(["--node", &format!("{name}=127.0.0.1,localhost")]);
    }
    support::run_ok(&mut command)?;
    Ok(())
}

/// The tokens `tramontane generate` gets for 6 tokens of PROMPT from the
/// router at `addr` over TLS, verified against `ca`.
fn generate_over_tls(addr: &str, ca: &Path) -> Result<Vec<u32>> {
    let output = support::run_ok(support::tramontane().args([
        "generate",
        "--json",
        "--max-tokens",
        "6",
        "--prompt",
        PROMPT,
        "--server",
        addr,
        "--tls-ca",
        ca.to_str().context("path")?,
    ]))?;
    let output: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    Ok(serde_json::from_value(output["token_ids"].clone())?)
}

/// An HTTPS exchange, the server verified against `ca`: status and body.
async fn https(addr: &str, ca: &Path, path: &str) -> Result<(u16, String)> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut stream = connector
        .connect(ServerName::try_from("127.0.0.1")?.to_owned(), tcp)
        .await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    // A peer that closes without close_notify still gave its whole answer.
    let _ = stream.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// Info on `addr` with the given TLS (None: plaintext).
async fn info(addr: &str, tls: Option<ClientTlsConfig>) -> Result<String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint.connect().await?;
    let answer = ExpertServiceClient::new(channel)
        .info(InfoRequest {})
        .await?;
    Ok(answer.into_inner().model_id)
}

/// A Hold over TLS that asks for layer 0's expert 7, held already: it
/// changes nothing (the router started after needs it).
async fn hold(addr: &str, tls: ClientTlsConfig) -> Result<HoldResponse, tonic::Status> {
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .and_then(|e| e.tls_config(tls))
        .map_err(|e| tonic::Status::unknown(e.to_string()))?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| tonic::Status::unknown(e.to_string()))?;
    let request = HoldRequest {
        epoch: 0,
        load: vec![ExpertPair {
            layer: 0,
            expert: 7,
        }],
        drop: vec![],
    };
    Ok(ExpertServiceClient::new(channel)
        .hold(request)
        .await?
        .into_inner())
}

#[test]
fn mtls_lets_in_only_clients_with_a_certificate_of_the_cluster_ca() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "41"])?;
    let (_, expected) = support::expected_greedy(&model, PROMPT, 6)?;
    let ours = dir.path().join("cluster");
    certs(&ours, &["router", "worker-0", "worker-1"])?;
    let theirs = dir.path().join("other");
    certs(&theirs, &["intruder"])?;
    let file = |dir: &Path, name: &str| dir.join(name).to_string_lossy().into_owned();
    let metrics = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    );
    let worker = support::spawn_listening(&[
        "worker",
        "--model",
        model.to_str().context("path")?,
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        &metrics,
        "--threads",
        "1",
        "--tls-cert",
        &file(&ours, "worker-0.pem"),
        "--tls-key",
        &file(&ours, "worker-0-key.pem"),
        "--tls-ca",
        &file(&ours, "ca.pem"),
    ])?;
    let read = |dir: &Path, name: &str| std::fs::read(dir.join(name));
    let ca = Certificate::from_pem(read(&ours, "ca.pem")?);
    let identity = |dir: &Path, name: &str| -> Result<Identity> {
        Ok(Identity::from_pem(
            read(dir, &format!("{name}.pem"))?,
            read(dir, &format!("{name}-key.pem"))?,
        ))
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        // Refused: plaintext, TLS without a certificate, a certificate of
        // another CA.
        ensure!(
            info(&worker.addr, None).await.is_err(),
            "plaintext was let in"
        );
        let no_cert = ClientTlsConfig::new().ca_certificate(ca.clone());
        ensure!(
            info(&worker.addr, Some(no_cert)).await.is_err(),
            "a client without a certificate was let in"
        );
        let intruder = ClientTlsConfig::new()
            .ca_certificate(ca.clone())
            .identity(identity(&theirs, "intruder")?);
        ensure!(
            info(&worker.addr, Some(intruder)).await.is_err(),
            "a certificate of another CA was let in"
        );
        // Let in: a certificate the cluster CA signed.
        let router_cert = ClientTlsConfig::new()
            .ca_certificate(ca.clone())
            .identity(identity(&ours, "router")?);
        ensure!(
            !info(&worker.addr, Some(router_cert.clone()))
                .await?
                .is_empty()
        );
        // Only the router may change what the worker holds; another node of
        // the cluster is let in, but not to Hold.
        let other_node = ClientTlsConfig::new()
            .ca_certificate(ca.clone())
            .identity(identity(&ours, "worker-1")?);
        ensure!(
            !info(&worker.addr, Some(other_node.clone()))
                .await?
                .is_empty()
        );
        let refused = hold(&worker.addr, other_node).await.unwrap_err();
        ensure!(
            refused.code() == tonic::Code::PermissionDenied
                && refused.message().contains("only router may"),
            "{refused:?}"
        );
        let held = hold(&worker.addr, router_cert)
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        ensure!(held.loaded.is_empty() && !held.held.is_empty(), "{held:?}");
        // Its metrics port: the worker's certificate, no client's asked
        // (a scraper holds no key of the cluster's); its metrics only.
        let (status, body) = https(&metrics, &ours.join("ca.pem"), "/metrics").await?;
        ensure!(
            status == 200 && body.contains("tramontane_worker_memory_bytes"),
            "{status} {body}"
        );
        ensure!(
            https(&metrics, &theirs.join("ca.pem"), "/metrics")
                .await
                .is_err(),
            "the metrics port verified against another CA"
        );
        ensure!(
            info(
                &metrics,
                Some(ClientTlsConfig::new().ca_certificate(ca.clone()))
            )
            .await
            .is_err(),
            "the metrics port serves gRPC"
        );
        anyhow::Ok(())
    })?;

    // A router with the cluster's certificate: over mTLS to the worker,
    // HTTPS and gRPC over TLS for its clients; plaintext is refused.
    let router = support::spawn_serving(&[
        "router",
        "--model",
        model.to_str().context("path")?,
        "--workers",
        &worker.addr,
        "--threads",
        "1",
        "--tls-cert",
        &file(&ours, "router.pem"),
        "--tls-key",
        &file(&ours, "router-key.pem"),
        "--tls-ca",
        &file(&ours, "ca.pem"),
    ])?;
    let generated = generate_over_tls(&router.process.addr, &ours.join("ca.pem"))?;
    ensure!(generated == expected, "{generated:?} vs {expected:?}");
    runtime.block_on(async {
        let (status, body) = https(&router.http, &ours.join("ca.pem"), "/health").await?;
        ensure!(status == 200 && body.contains("ok"), "{status} {body}");
        ensure!(
            https(&router.http, &theirs.join("ca.pem"), "/health")
                .await
                .is_err(),
            "verified against another CA"
        );
        anyhow::Ok(())
    })?;
    let plain = support::http(&router.http, "GET", "/health", "");
    ensure!(!matches!(plain, Ok((200, _, _))), "plain HTTP was answered");
    Ok(())
}

#[test]
fn serve_tls_runs_the_whole_cluster_over_tls() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "42"])?;
    let (_, expected) = support::expected_greedy(&model, PROMPT, 6)?;
    let tls_dir = dir.path().join("tls");
    let serve = support::serve_two_workers(
        &model,
        &["--tls", "--tls-dir", tls_dir.to_str().context("path")?],
    )?;
    let ca = tls_dir.join("ca.pem");
    let generated = generate_over_tls(&serve.process.addr, &ca)?;
    ensure!(generated == expected, "{generated:?} vs {expected:?}");
    let (status, body) =
        tokio::runtime::Runtime::new()?.block_on(https(&serve.http, &ca, "/health"))?;
    ensure!(status == 200, "{status} {body}");
    Ok(())
}
