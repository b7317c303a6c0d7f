//! `tramontane admin`: drives a running router's admin API
//! (`--admin-listen`) and prints its JSON answers.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The router's admin listener, e.g. http://127.0.0.1:8090 (https://
    /// when the router has a certificate).
    #[arg(long, env = "TRAMONTANE_ADMIN_SERVER")]
    pub server: String,
    /// The router's --admin-key.
    #[arg(long, env = "TRAMONTANE_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: String,
    /// The CA that signed the router's certificate, PEM (for https://).
    #[arg(long, env = "TRAMONTANE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    #[command(subcommand)]
    pub action: AdminAction,
}

#[derive(Debug, Subcommand)]
pub enum AdminAction {
    /// Which worker holds which expert now, and the epoch.
    Placement,
    /// Rebalance the experts over their recent load now.
    Rebalance,
    /// Add or remove workers.
    #[command(subcommand)]
    Workers(WorkersAction),
}

#[derive(Debug, Subcommand)]
pub enum WorkersAction {
    /// Add the worker at ADDR (HOST:PORT) with the experts it holds.
    Add { address: String },
    /// Take worker INDEX out of the pool once its experts are elsewhere
    /// (a worker pod's preStop hook, its index from the environment).
    Remove {
        #[arg(env = "TRAMONTANE_WORKER_INDEX", value_parser = crate::worker::worker_index)]
        index: usize,
    },
}

pub fn run(args: &AdminArgs) -> Result<()> {
    let (method, path, body) = match &args.action {
        AdminAction::Placement => ("GET", "/admin/placement".to_string(), None),
        AdminAction::Rebalance => ("POST", "/admin/rebalance".to_string(), None),
        AdminAction::Workers(WorkersAction::Add { address }) => (
            "POST",
            "/admin/workers".to_string(),
            Some(serde_json::json!({ "address": address })),
        ),
        AdminAction::Workers(WorkersAction::Remove { index }) => {
            ("DELETE", format!("/admin/workers/{index}"), None)
        }
    };
    let url = format!("{}{path}", args.server.trim_end_matches('/'));
    if url.starts_with("https://") && args.tls_ca.is_none() {
        bail!(
            "--server {}: https:// needs --tls-ca, the CA that signed the router's certificate",
            args.server
        );
    }
    let agent = agent(args.tls_ca.as_ref())?;
    let bearer = format!("Bearer {}", args.admin_key);
    let response = match (method, body) {
        ("GET", _) => agent.get(&url).header("authorization", &bearer).call(),
        ("DELETE", _) => agent.delete(&url).header("authorization", &bearer).call(),
        (_, Some(body)) => agent
            .post(&url)
            .header("authorization", &bearer)
            .send_json(&body),
        (_, None) => agent
            .post(&url)
            .header("authorization", &bearer)
            .send_empty(),
    }
    .with_context(|| format!("{method} {url}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .read_to_string()
        .with_context(|| format!("reading the answer of {method} {url}"))?;
    if !status.is_success() {
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(body);
        bail!("{method} {url}: {status}: {message}");
    }
    let answer: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("{method} {url}: not JSON"))?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}

/// An HTTP(S) client that reads error answers (4xx, 5xx) as answers, and
/// trusts `ca` for HTTPS.
fn agent(ca: Option<&PathBuf>) -> Result<ureq::Agent> {
    let mut tls = ureq::tls::TlsConfig::builder()
        .unversioned_rustls_crypto_provider(tramontane_infra::tls::crypto_provider());
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).with_context(|| format!("--tls-ca {}", ca.display()))?;
        let certs = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(cert)) => Some(Ok(cert)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("--tls-ca {}", ca.display()))?;
        if certs.is_empty() {
            bail!("--tls-ca {}: no certificate in it", ca.display());
        }
        tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
    }
    Ok(ureq::Agent::config_builder()
        .http_status_as_error(false)
        .tls_config(tls.build())
        .build()
        .new_agent())
}
