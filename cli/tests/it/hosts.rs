//! Router and workers on separate hosts: each process in its own network
//! namespace with its own address, joined by veth pairs to a bridge that
//! lives in a namespace of its own, so nothing outside the namespaces this
//! test creates is touched and no traffic leaves them. The router reaches
//! its workers only over that bridge, and its tokens equal in-process ones.
//! Needs root (to make namespaces); elsewhere it says why and skips.

use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::support;

const PROMPT: &str = "Across hosts the experts answer";
/// 10.203.0.0/24, which exists only on the test's bridge.
const SUBNET: &str = "10.203.0";

/// Namespaces made for one test, deleted (with their links) when dropped.
struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    fn add(&mut self, name: String) -> Result<()> {
        ip(&["netns", "add", &name])?;
        self.names.push(name);
        Ok(())
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in self.names.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    support::run_ok(Command::new("ip").args(args))?;
    Ok(())
}

/// `tramontane ARGS` inside namespace `ns`.
fn in_namespace(ns: &str, args: &[&str]) -> Command {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_tramontane")])
        .args(args);
    command
}

/// Why namespaces cannot be made here, if they cannot.
fn cannot_make_namespaces() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root".into());
    }
    let probe = format!("tt{}probe", std::process::id());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Ok(out) if out.status.success() => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).status();
            None
        }
        Ok(out) => Some(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        Err(e) => Some(format!("no ip command: {e}")),
    }
}

#[test]
fn router_and_workers_in_separate_network_namespaces_give_the_in_process_tokens() -> Result<()> {
    if let Some(why) = cannot_make_namespaces() {
        eprintln!("skipped: network namespaces cannot be made here ({why})");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "44"])?;
    let max_tokens = 16;
    let (_, expected) = support::expected_greedy(&model, PROMPT, max_tokens)?;

    // A hub namespace holds the bridge; router, w0 and w1 each get eth0 on it.
    let tag = format!("tt{}", std::process::id());
    let mut namespaces = Namespaces { names: Vec::new() };
    let hub = format!("{tag}-hub");
    namespaces.add(hub.clone())?;
    ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &hub, "link", "set", "br0", "up"])?;
    let hosts = ["router", "w0", "w1"];
    let mut addresses = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let ns = format!("{tag}-{host}");
        namespaces.add(ns.clone())?;
        let port = format!("v{i}");
        ip(&[
            "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["-n", &hub, "link", "set", &port, "master", "br0", "up"])?;
        let address = format!("{SUBNET}.{}", i + 1);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        addresses.push(address);
    }

    let model_arg = model.to_str().context("model path")?;
    let worker = |i: usize, experts: &str| {
        support::spawn_listening_command(in_namespace(
            &format!("{tag}-w{i}"),
            &[
                "worker",
                "--model",
                model_arg,
                "--experts",
                experts,
                "--listen",
                &format!("{}:50051", addresses[i + 1]),
                "--threads",
                "1",
            ],
        ))
    };
    let w0 = worker(0, "0,2,4,6")?;
    let w1 = worker(1, "1,3,5,7")?;
    ensure!(
        w0.addr.starts_with(&addresses[1]) && w1.addr.starts_with(&addresses[2]),
        "workers listen on {} and {}",
        w0.addr,
        w1.addr
    );
    let router_ns = format!("{tag}-router");
    let router = support::spawn_listening_command(in_namespace(
        &router_ns,
        &[
            "router",
            "--model",
            model_arg,
            "--workers",
            &support::addrs([&w0, &w1]),
            "--listen",
            &format!("{}:50052", addresses[0]),
            "--http-listen",
            &format!("{}:8080", addresses[0]),
            "--threads",
            "1",
        ],
    ))?;

    // The client runs beside the router, in its namespace.
    let output = support::run_ok(&mut in_namespace(
        &router_ns,
        &[
            "generate",
            "--server",
            &router.addr,
            "--prompt",
            PROMPT,
            "--max-tokens",
            &max_tokens.to_string(),
            "--json",
        ],
    ))?;
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let tokens: Vec<u32> = serde_json::from_value(answer["token_ids"].clone())?;
    ensure!(
        tokens == expected,
        "tokens across namespaces {tokens:?}, in process {expected:?}"
    );

    // The addresses exist only inside the namespaces: this process (in the
    // host's own namespace) cannot reach a worker.
    let w0_addr: std::net::SocketAddr = w0.addr.parse()?;
    ensure!(
        std::net::TcpStream::connect_timeout(&w0_addr, std::time::Duration::from_millis(500))
            .is_err(),
        "worker 0 at {w0_addr} is reachable from outside the namespaces"
    );
    drop((router, w0, w1));
    drop(namespaces);
    let left = Command::new("ip").args(["netns", "list"]).output()?;
    ensure!(
        !String::from_utf8_lossy(&left.stdout).contains(&tag),
        "namespaces left behind"
    );
    Ok(())
}
