//! `tramontane certs`: a CA and one certificate per node of a real cluster,
//! for the router ↔ worker mTLS and the router's HTTPS.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use tramontane_infra::certs::{Node, write_cluster_certs};

#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Folder to write into: ca.pem, ca-key.pem, and NAME.pem, NAME-key.pem per node.
    #[arg(long)]
    pub out: PathBuf,
    /// A node: its name and the host names and addresses it is reached at,
    /// `NAME=HOST[,HOST...]` (e.g. `router=router.moe.svc,10.0.0.5`); repeat per node.
    #[arg(long = "node", required = true)]
    pub nodes: Vec<String>,
    /// Days the certificates are valid.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

pub fn run(args: &CertsArgs) -> Result<()> {
    if args.days == 0 {
        bail!("--days must be at least 1");
    }
    let nodes = args
        .nodes
        .iter()
        .map(|spec| {
            let Some((name, hosts)) = spec.split_once('=') else {
                bail!("--node {spec:?}: expected NAME=HOST[,HOST...]");
            };
            Ok(Node {
                name: name.to_string(),
                hosts: hosts
                    .split(',')
                    .map(str::trim)
                    .filter(|h| !h.is_empty())
                    .map(String::from)
                    .collect(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let files = write_cluster_certs(&args.out, &nodes, args.days)?;
    println!(
        "CA: {} (key {}: keep it off the cluster)",
        files.ca.display(),
        files.ca_key.display()
    );
    for (name, cert, key) in &files.nodes {
        println!(
            "{name}: --tls-cert {} --tls-key {} --tls-ca {}",
            cert.display(),
            key.display(),
            files.ca.display()
        );
    }
    Ok(())
}
