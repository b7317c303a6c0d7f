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

/// A hub namespace `TAG-hub` holding a bridge, and per host a namespace
/// `TAG-HOST` with eth0 on it at `SUBNET.(first + i)` (and lo up): the
/// namespaces, and each host's address.
fn bridged(tag: &str, hosts: &[&str], first: usize) -> Result<(Namespaces, Vec<String>)> {
    let mut namespaces = Namespaces { names: Vec::new() };
    let hub = format!("{tag}-hub");
    namespaces.add(hub.clone())?;
    ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &hub, "link", "set", "br0", "up"])?;
    let mut addresses = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let ns = format!("{tag}-{host}");
        namespaces.add(ns.clone())?;
        let port = format!("v{i}");
        ip(&[
            "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["-n", &hub, "link", "set", &port, "master", "br0", "up"])?;
        let address = format!("{SUBNET}.{}", first + i);
        let cidr = format!("{address}/24");
        ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        addresses.push(address);
    }
    Ok((namespaces, addresses))
}

/// The greedy tokens `tramontane generate` gets for PROMPT from the router
/// at `server`, run inside namespace `ns`.
fn generate_in(ns: &str, server: &str, max_tokens: usize) -> Result<Vec<u32>> {
    support::generated_ids_by(in_namespace(ns, &[]), server, PROMPT, max_tokens)
}

/// Why namespaces cannot be made here, if they cannot.
fn cannot_make_namespaces() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root".into());
    }
    // One name per call: the tests of this file probe at once.
    static PROBES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = format!("tp{}n{n}", std::process::id());
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
    let (namespaces, addresses) = bridged(&tag, &["router", "w0", "w1"], 1)?;

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
    let tokens = generate_in(&router_ns, &router.addr, max_tokens)?;
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

/// `/etc/netns/NS/hosts`, which `ip netns exec NS` mounts over /etc/hosts:
/// the names a process in NS resolves. Removed when dropped.
struct NamespaceHosts {
    dir: std::path::PathBuf,
}

impl NamespaceHosts {
    fn new(ns: &str) -> Result<Self> {
        let dir = std::path::Path::new("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// Rewritten in place: the mount in a running process sees it.
    fn set(&self, names: &[(&str, &str)]) -> Result<()> {
        let mut text = String::from("127.0.0.1 localhost\n");
        for (name, address) in names {
            text.push_str(&format!("{address} {name}\n"));
        }
        std::fs::write(self.dir.join("hosts"), text)?;
        Ok(())
    }
}

impl Drop for NamespaceHosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `tramontane_router_worker_up{worker="INDEX"}` of the router whose
/// metrics listen on `metrics` in namespace `ns` (read from inside it).
fn worker_up(ns: &str, metrics: &str, index: usize) -> Result<Option<f64>> {
    let fetch = "import sys, urllib.request; \
                 print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())";
    let output = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(support::python())
        .args(["-c", fetch, &format!("http://{metrics}/metrics")])
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(support::metric(
        &text,
        &format!("tramontane_router_worker_up{{worker=\"{index}\"}}"),
    ))
}

/// Polls `worker_up` once a second until it is `want`, for at most `limit`.
fn wait_for_worker_up(
    ns: &str,
    metrics: &str,
    index: usize,
    want: f64,
    limit: std::time::Duration,
) -> Result<std::time::Duration> {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if worker_up(ns, metrics, index)? == Some(want) {
            return Ok(start.elapsed());
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    anyhow::bail!("worker {index} not up = {want} within {limit:?}")
}

/// A worker's host vanishes without a reset (its link cut, then the
/// process gone) and the worker comes back elsewhere under the same name,
/// as a StatefulSet pod rescheduled on another node. The router's
/// connection to the old address would hold the probes' unacknowledged
/// data for the kernel's retransmission timeout (about 15 minutes); its
/// HTTP/2 keepalive closes it within seconds, and the reconnection
/// resolves the name to the new address: the worker is live again well
/// within the bound, and serving goes on.
#[test]
fn a_worker_whose_host_vanishes_without_a_reset_is_reconnected_by_name() -> Result<()> {
    if let Some(why) = cannot_make_namespaces() {
        eprintln!("skipped: network namespaces cannot be made here ({why})");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "45"])?;
    let max_tokens = 8;
    let (_, expected) = support::expected_greedy(&model, PROMPT, max_tokens)?;

    let tag = format!("tk{}", std::process::id());
    // w1b is worker 1's second host, on another address.
    let (_namespaces, addresses) = bridged(&tag, &["router", "w0", "w1a", "w1b"], 11)?;
    let router_ns = format!("{tag}-router");
    let names = NamespaceHosts::new(&router_ns)?;
    names.set(&[("worker-0", &addresses[1]), ("worker-1", &addresses[2])])?;

    let model_arg = model.to_str().context("model path")?;
    // Both workers hold every expert, and the placement says so: the
    // router serves on with either.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json"))?)?;
    let count = |key: &str| config[key].as_u64().context(key.to_string());
    let (layers, experts) = (count("num_hidden_layers")?, count("num_local_experts")?);
    let placement = dir.path().join("placement.json");
    let both = vec![vec![vec![0, 1]; experts as usize]; layers as usize];
    std::fs::write(
        &placement,
        serde_json::json!({"workers": 2, "experts": both}).to_string(),
    )?;
    let worker = |host: &str, address: &str| {
        support::spawn_listening_command(in_namespace(
            &format!("{tag}-{host}"),
            &[
                "worker",
                "--model",
                model_arg,
                "--listen",
                &format!("{address}:50051"),
                "--threads",
                "1",
            ],
        ))
    };
    let _w0 = worker("w0", &addresses[1])?;
    let mut w1 = worker("w1a", &addresses[2])?;
    let metrics = format!("{}:9090", addresses[0]);
    let router = support::spawn_listening_command(in_namespace(
        &router_ns,
        &[
            "router",
            "--model",
            model_arg,
            "--workers",
            "worker-0:50051,worker-1:50051",
            "--placement",
            placement.to_str().context("placement path")?,
            "--listen",
            &format!("{}:50052", addresses[0]),
            "--http-listen",
            &format!("{}:8080", addresses[0]),
            "--metrics-listen",
            &metrics,
            "--threads",
            "1",
        ],
    ))?;
    let generate = || generate_in(&router_ns, &router.addr, max_tokens);
    ensure!(generate()? == expected, "tokens before the cut");
    let long = std::time::Duration::from_secs(60);
    wait_for_worker_up(&router_ns, &metrics, 1, 1.0, long)?;

    // Its host vanishes: no packet in or out, then the process is gone
    // (its FIN and resets go nowhere).
    ip(&["-n", &format!("{tag}-w1a"), "link", "set", "eth0", "down"])?;
    let _ = w1.child.kill();
    let _ = w1.child.wait();
    wait_for_worker_up(&router_ns, &metrics, 1, 0.0, long)?;
    ensure!(generate()? == expected, "tokens with worker 1 gone");

    // Worker 1 again, on another host: its name now resolves there.
    names.set(&[("worker-0", &addresses[1]), ("worker-1", &addresses[3])])?;
    w1 = worker("w1b", &addresses[3])?;
    // Keepalive (10 s, 5 s to answer) and the reconnection take about 15
    // s; the bound is far below the kernel's 15 minutes.
    let back = wait_for_worker_up(
        &router_ns,
        &metrics,
        1,
        1.0,
        std::time::Duration::from_secs(90),
    )?;
    eprintln!("worker 1 live again at its new address after {back:?}");
    ensure!(generate()? == expected, "tokens with worker 1 back");
    drop((router, w1));
    Ok(())
}
