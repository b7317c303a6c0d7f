//! # tramontane-launcher
//!
//! Runs expert workers on this machine as child processes of the
//! `tramontane` binary (`serve`, and `profile`'s measurements): each on a
//! free loopback port, told what to hold, and tied to its parent — a worker
//! exits when the pipe on its stdin closes, however the parent ends.
//!
//! # Layout
//!
//! - [`WorkerCommand`] / [`spawn_worker`]: start one worker and learn its address.
//! - [`worker_share`]: the options telling worker I what the placement gives it.
//! - [`write_prometheus_targets`]: the cluster's metrics addresses for Prometheus.
//! - [`supervisor`]: start a worker again, on its address, when it exits.

#![forbid(unsafe_code)]

pub mod supervisor;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tramontane_policy::held_experts::{format_experts, format_per_layer};
use tramontane_policy::placement::Placement;

/// What the worker prints once it listens; the address follows.
pub const LISTENING: &str = "tramontane worker listening on ";

/// How long a worker may take to load its experts and listen.
const START_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("starting {}", exe.display())]
    Spawn {
        exe: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("the worker did not start within {0:?}")]
    Timeout(Duration),
    #[error("the worker exited before listening")]
    Exited,
    #[error("reading the worker's output")]
    Output(#[source] std::io::Error),
    #[error("unexpected worker output {0:?}")]
    Unexpected(String),
    #[error("worker {0} holds no expert in the placement")]
    NoShare(usize),
}

/// One worker to start: `EXE worker --model MODEL HELD... --device DEVICE
/// --threads THREADS EXTRA...` on a free loopback port.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    /// The `tramontane` binary.
    pub exe: PathBuf,
    pub model: PathBuf,
    /// The options saying what it holds (`--experts ...`, or `--placement F
    /// --worker-index I`).
    pub held: Vec<OsString>,
    pub device: String,
    pub threads: i32,
    /// Further options (`--dtype`, telemetry flags).
    pub extra: Vec<OsString>,
}

/// A started worker. Dropping it kills the process; its stdin is its lifeline.
pub struct WorkerProcess {
    pub child: Child,
    pub addr: String,
    lifeline: ChildStdin,
}

impl WorkerProcess {
    /// The process and the pipe whose closing stops it, to hold apart.
    pub fn into_parts(self) -> (Child, ChildStdin) {
        (self.child, self.lifeline)
    }
}

/// Starts a worker on a free loopback port and waits until it listens.
pub async fn spawn_worker(command: &WorkerCommand) -> Result<WorkerProcess, LaunchError> {
    spawn_worker_at(command, "127.0.0.1:0").await
}

/// Starts a worker listening on `listen` and waits until it listens.
pub async fn spawn_worker_at(
    command: &WorkerCommand,
    listen: &str,
) -> Result<WorkerProcess, LaunchError> {
    let mut child = Command::new(&command.exe)
        .arg("worker")
        .arg("--model")
        .arg(&command.model)
        .args(&command.held)
        .args(["--device", &command.device, "--listen", listen])
        // What it holds is in `held` alone, whatever the parent's environment says.
        .env_remove("TRAMONTANE_EXPERTS")
        .env_remove("TRAMONTANE_LAYERS")
        .env_remove("TRAMONTANE_PLACEMENT")
        .env_remove("TRAMONTANE_WORKER_INDEX")
        .args(["--threads", &command.threads.to_string()])
        .args(&command.extra)
        // A worker idles between dispatches: OpenMP threads that spin-wait
        // there steal the cores the router and the other workers need.
        .env(
            "OMP_WAIT_POLICY",
            std::env::var("OMP_WAIT_POLICY").unwrap_or_else(|_| "PASSIVE".into()),
        )
        // The worker exits when this pipe closes: when the parent ends, however it ends.
        .arg("--exit-with-stdin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // Its own process group: a Ctrl-C at the terminal reaches the
        // parent alone, which drains before it stops its workers.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| LaunchError::Spawn {
            exe: command.exe.clone(),
            error,
        })?;
    // Held until the parent ends (Child::wait would close it).
    let lifeline = child.stdin.take().ok_or(LaunchError::Exited)?;
    let stdout = child.stdout.take().ok_or(LaunchError::Exited)?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(START_TIMEOUT, lines.next_line())
        .await
        .map_err(|_| LaunchError::Timeout(START_TIMEOUT))?
        .map_err(LaunchError::Output)?
        .ok_or(LaunchError::Exited)?;
    let addr = line
        .strip_prefix(LISTENING)
        .ok_or_else(|| LaunchError::Unexpected(line.clone()))?
        .to_string();
    // Keep reading: a closed pipe would fail the worker's next print.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(WorkerProcess {
        child,
        addr,
        lifeline,
    })
}

/// The options telling worker `worker` what to hold, and their description.
/// With a placement file, the worker reads its own (layer, expert) pairs from
/// it; without, expert e of every layer is on worker e mod W.
pub fn worker_share(
    placement: &Placement,
    file: Option<&Path>,
    worker: usize,
) -> Result<(Vec<OsString>, String), LaunchError> {
    let held = placement.held_by(worker);
    if held.is_empty() {
        return Err(LaunchError::NoShare(worker));
    }
    Ok(match file {
        Some(file) => (
            vec![
                "--placement".into(),
                file.into(),
                "--worker-index".into(),
                worker.to_string().into(),
            ],
            format!("experts {}", format_per_layer(&held)),
        ),
        None => {
            let experts = format_experts(&placement.experts_of(worker));
            (
                vec!["--experts".into(), experts.clone().into()],
                format!("experts {experts}"),
            )
        }
    })
}

/// Prometheus file_sd targets: the router (its HTTP port) and every worker
/// (its gRPC port, which also answers `GET /metrics`). Written whole, then
/// renamed: Prometheus never reads half a file.
pub fn write_prometheus_targets(
    path: &Path,
    router: &str,
    workers: &[String],
) -> std::io::Result<()> {
    let mut groups = vec![serde_json::json!({
        "targets": [router],
        "labels": {"component": "router"},
    })];
    for (i, addr) in workers.iter().enumerate() {
        groups.push(serde_json::json!({
            "targets": [addr],
            "labels": {"component": "worker", "worker": i.to_string()},
        }));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let partial = path.with_extension("json.partial");
    std::fs::write(
        &partial,
        serde_json::to_string_pretty(&groups).expect("JSON values serialise"),
    )?;
    std::fs::rename(&partial, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_is_told_its_share() {
        let placement = Placement::round_robin(&[8; 2], 3).unwrap();
        let (args, described) = worker_share(&placement, None, 2).unwrap();
        assert_eq!(args, ["--experts", "2,5"]);
        assert_eq!(described, "experts 2,5");
        let file = Path::new("p.json");
        let (args, described) = worker_share(&placement, Some(file), 1).unwrap();
        assert_eq!(args, ["--placement", "p.json", "--worker-index", "1"]);
        assert_eq!(described, "experts layer 0: 1,4,7; layer 1: 1,4,7");
        let idle = Placement::round_robin(&[2; 1], 3).unwrap();
        assert!(matches!(
            worker_share(&idle, None, 2),
            Err(LaunchError::NoShare(2))
        ));
    }

    #[test]
    fn prometheus_targets_name_router_and_workers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("targets/local.json");
        write_prometheus_targets(&path, "127.0.0.1:8000", &["127.0.0.1:9".into()]).unwrap();
        let groups: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(groups[0]["labels"]["component"], "router");
        assert_eq!(groups[1]["targets"][0], "127.0.0.1:9");
        assert_eq!(groups[1]["labels"]["worker"], "0");
        assert!(!path.with_extension("json.partial").exists());
    }
}
