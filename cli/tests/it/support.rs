//! What the integration tests share: the real `tramontane` binary and the
//! processes it runs (workers, routers, a served cluster), the project's
//! Python (transformers), checkpoints generated on the fly, the in-process
//! greedy tokens a cluster must reproduce, and readers of HTTP answers and
//! Prometheus text.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, ensure};
use tramontane_model::generate::{StopRule, generate_greedy};
use tramontane_model::{CausalLm, LoadOptions, Tokenizer};
use tramontane_policy::held_experts::format_experts;
use tramontane_policy::placement::Placement;

pub fn tramontane() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tramontane"))
}

/// The Python with transformers: the active virtualenv's, else the project's `.venv`.
pub fn python() -> PathBuf {
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        return PathBuf::from(venv).join("bin/python");
    }
    let project = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    if project.exists() {
        project
    } else {
        PathBuf::from("python3")
    }
}

/// Runs the pytest suite at `suite` with `env`; fails with its output.
pub fn pytest(suite: &Path, env: &[(&str, &str)]) -> Result<()> {
    let output = Command::new(python())
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(suite)
        .envs(env.iter().copied())
        .output()
        .context("running pytest")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    ensure!(
        output.status.success(),
        "pytest failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// scripts/forkserver.py, started once for this test process: it has
/// imported torch and transformers, and runs each script in a fork.
struct ForkServer {
    socket: PathBuf,
    _dir: tempfile::TempDir,
    /// Its standard input: closed when this process ends, which ends it.
    _child: std::process::Child,
}

fn fork_server() -> Result<&'static ForkServer> {
    static SERVER: std::sync::OnceLock<std::result::Result<ForkServer, String>> =
        std::sync::OnceLock::new();
    let start = || -> Result<ForkServer> {
        use std::io::BufRead;
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("forkserver.sock");
        let mut child = Command::new(python())
            .arg(scripts_dir().join("forkserver.py"))
            .arg(&socket)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting scripts/forkserver.py")?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().context("its stdout")?).read_line(&mut line)?;
        ensure!(
            line.trim() == "ready",
            "scripts/forkserver.py did not start"
        );
        Ok(ForkServer {
            socket,
            _dir: dir,
            _child: child,
        })
    };
    SERVER
        .get_or_init(|| start().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Runs `command` (the project's Python, [`python`], on a script and its
/// arguments, or `-c CODE ...`), with its environment and working folder,
/// as a fork of scripts/forkserver.py (torch and transformers already
/// imported); fails with its standard error unless it exits 0. The same
/// contract as [`run_ok`], without the imports' seconds.
pub fn python_ok(command: &mut Command) -> Result<Output> {
    use std::io::{BufRead, Write};
    use std::os::unix::process::ExitStatusExt;
    ensure!(
        command.get_program() == python().as_os_str(),
        "{command:?}: python_ok runs the project's Python only"
    );
    let server = fork_server()?;
    let argv: Vec<&str> = command
        .get_args()
        .map(|a| a.to_str().context("a Python argument that is not UTF-8"))
        .collect::<Result<_>>()?;
    let cwd = match command.get_current_dir() {
        Some(dir) => dir.to_path_buf(),
        None => std::env::current_dir()?,
    };
    let mut env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
    for (name, value) in command.get_envs() {
        let name = name
            .to_str()
            .context("an environment name that is not UTF-8")?;
        match value {
            Some(value) => {
                let value = value
                    .to_str()
                    .context("an environment value that is not UTF-8")?;
                env.insert(name.to_owned(), value.to_owned())
            }
            None => env.remove(name),
        };
    }
    let out = tempfile::tempdir()?;
    let (stdout, stderr) = (out.path().join("stdout"), out.path().join("stderr"));
    let request = serde_json::json!({
        "argv": argv,
        "cwd": cwd,
        "env": env,
        "stdout": stdout,
        "stderr": stderr,
    });
    let mut connection = std::os::unix::net::UnixStream::connect(&server.socket)?;
    writeln!(connection, "{request}")?;
    let mut status = String::new();
    std::io::BufReader::new(&connection).read_line(&mut status)?;
    let output = Output {
        status: std::process::ExitStatus::from_raw(status.trim().parse::<i32>().unwrap_or(1) << 8),
        stdout: std::fs::read(&stdout).unwrap_or_default(),
        stderr: std::fs::read(&stderr).unwrap_or_default(),
    };
    ensure!(
        output.status.success() && !status.is_empty(),
        "python {} failed ({}):\n{}",
        argv.first().copied().unwrap_or(""),
        status.trim(),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(output)
}

pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts")
}

pub fn run_ok(command: &mut Command) -> Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(
        output.status.success(),
        "{command:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(output)
}

/// The device in-process tests load onto: `TRAMONTANE_DEVICE` (`cpu` or
/// `cuda:N`, as the CLI reads it), the CPU by default; `make gpu-check`
/// runs the bf16 parity tests with it set to `cuda:0`.
pub fn device() -> Result<tch::Device> {
    let text = std::env::var("TRAMONTANE_DEVICE").unwrap_or_else(|_| "cpu".into());
    if text == "cpu" {
        return Ok(tch::Device::Cpu);
    }
    let index: usize = text
        .strip_prefix("cuda:")
        .and_then(|i| i.parse().ok())
        .with_context(|| format!("TRAMONTANE_DEVICE must be cpu or cuda:N, not {text:?}"))?;
    ensure!(
        tramontane_model::cuda::load() && index < tch::Cuda::device_count() as usize,
        "TRAMONTANE_DEVICE={text}: no such CUDA device here"
    );
    Ok(tch::Device::Cuda(index))
}

/// Writes a checkpoint with `tramontane gen-model --out DIR ARGS...`.
pub fn gen_model(dir: &Path, args: &[&str]) -> Result<()> {
    run_ok(
        tramontane()
            .arg("gen-model")
            .arg("--out")
            .arg(dir)
            .args(args),
    )?;
    Ok(())
}

/// Runs scripts/hf_reference.py (transformers' own class) on `model` for
/// `request`, computing in `dtype`, its files written in `work`; the path
/// prefix of its outputs (`.json`, and `.safetensors` where it wrote logits).
pub fn hf_reference(
    model: &Path,
    request: &serde_json::Value,
    work: &Path,
    dtype: tramontane_model::Dtype,
) -> Result<PathBuf> {
    let request_file = work.join("request.json");
    std::fs::write(&request_file, request.to_string())?;
    let prefix = work.join("reference");
    python_ok(
        Command::new(python())
            .arg(scripts_dir().join("hf_reference.py"))
            .arg("--model")
            .arg(model)
            .arg("--request")
            .arg(&request_file)
            .arg("--out")
            .arg(&prefix)
            .args(["--dtype", dtype.flag()]),
    )?;
    Ok(prefix)
}

/// Writes a checkpoint of `family` (mixtral, qwen3_moe, qwen2_moe or olmoe)
/// made by transformers' own class, with scripts/hf_checkpoint.py: its small
/// shapes overridden by the fields of `config`, then `extra_args` (e.g.
/// `["--dtype", "bf16", "--max-shard-size", "200KB"]`).
pub fn family_checkpoint(
    dir: &Path,
    family: &str,
    config: serde_json::Value,
    extra_args: &[&str],
) -> Result<()> {
    python_ok(
        Command::new(python())
            .arg(scripts_dir().join("hf_checkpoint.py"))
            .args(["--family", family, "--config", &config.to_string()])
            .arg("--out")
            .arg(dir)
            .args(extra_args),
    )?;
    Ok(())
}

/// A child process killed when dropped.
pub struct Process {
    pub child: std::process::Child,
    pub addr: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tramontane ARGS...` and waits for its "... listening on ADDR" line.
pub fn spawn_listening(args: &[&str]) -> Result<Process> {
    let mut command = tramontane();
    command.args(args);
    spawn_listening_command(command)
}

/// Starts `command` (one that runs `tramontane`, perhaps through a wrapper)
/// and waits for its "... listening on ADDR" line.
pub fn spawn_listening_command(mut command: Command) -> Result<Process> {
    use std::io::{BufRead, BufReader};
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let Some(addr) = line
        .trim()
        .rsplit_once("listening on ")
        .map(|(_, a)| a.to_string())
    else {
        let _ = child.kill();
        let output = child.wait_with_output()?;
        anyhow::bail!(
            "{command:?} did not start: {}{}",
            line,
            String::from_utf8_lossy(&output.stderr)
        );
    };
    drain(stdout, child.stderr.take());
    Ok(Process { child, addr })
}

/// Keeps reading the child's output, so that it never blocks on a full pipe
/// nor fails writing to a closed one.
fn drain(stdout: impl std::io::Read + Send + 'static, stderr: Option<std::process::ChildStderr>) {
    fn sink(mut pipe: impl std::io::Read + Send + 'static) {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut pipe, &mut std::io::sink());
        });
    }
    sink(stdout);
    if let Some(stderr) = stderr {
        sink(stderr);
    }
}

/// A served cluster: the router's gRPC address (in `process.addr`), its
/// HTTP address, and the observability address when `--metrics-listen` was given.
pub struct Serving {
    pub process: Process,
    pub http: String,
    pub metrics: Option<String>,
    /// With `--admin-listen`.
    pub admin: Option<String>,
}

/// Starts `tramontane ARGS...` (serve or router) on ephemeral ports and waits
/// for both its "... listening on ADDR" lines.
pub fn spawn_serving(args: &[&str]) -> Result<Serving> {
    spawn_serving_command(tramontane(), args)
}

/// [`spawn_serving`] through `command` (one that runs `tramontane` with the
/// arguments it is given after its own, perhaps in a container).
pub fn spawn_serving_command(mut command: Command, args: &[&str]) -> Result<Serving> {
    use std::io::{BufRead, BufReader};
    let mut child = command
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        // Traces (when exported) leave every 100 ms rather than every 5 s.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
    let mut addrs = Vec::new();
    let with_metrics = args.contains(&"--metrics-listen");
    let with_admin = args.contains(&"--admin-listen");
    let lines = 2 + usize::from(with_metrics) + usize::from(with_admin);
    for _ in 0..lines {
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        match line.trim().rsplit_once("listening on ") {
            Some((_, addr)) => addrs.push(addr.to_string()),
            None => {
                let _ = child.kill();
                let output = child.wait_with_output()?;
                anyhow::bail!(
                    "{args:?} did not start: {line}{}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
    }
    drain(stdout, child.stderr.take());
    let admin = with_admin
        .then(|| addrs.pop().context("admin address"))
        .transpose()?;
    let metrics = with_metrics
        .then(|| addrs.pop().context("metrics address"))
        .transpose()?;
    let http = addrs.pop().context("http address")?;
    let addr = addrs.pop().context("grpc address")?;
    Ok(Serving {
        process: Process { child, addr },
        http,
        metrics,
        admin,
    })
}

/// `tramontane serve --model MODEL --workers 2 --threads 1 EXTRA...` on
/// ephemeral ports.
pub fn serve_two_workers(model: &Path, extra: &[&str]) -> Result<Serving> {
    let model = model.to_str().context("model path")?;
    let mut args = vec![
        "serve",
        "--model",
        model,
        "--workers",
        "2",
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    spawn_serving(&args)
}

/// A worker holding `experts` (a --experts spec) of `model`, on `listen`.
pub fn worker(model: &Path, experts: &str, listen: &str) -> Result<Process> {
    worker_with(model, experts, listen, &[])
}

/// A worker holding `experts` of `model` on `listen`, with `extra` flags.
pub fn worker_with(model: &Path, experts: &str, listen: &str, extra: &[&str]) -> Result<Process> {
    let model = model.to_str().context("model path")?;
    let mut args = vec![
        "worker",
        "--model",
        model,
        "--experts",
        experts,
        "--listen",
        listen,
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    spawn_listening(&args)
}

/// One worker per placement slot, each holding exactly its experts.
pub fn workers_for(model: &Path, placement: &Placement) -> Result<Vec<Process>> {
    workers_for_with(model, placement, &[])
}

/// [`workers_for`], each worker started with `extra` flags.
pub fn workers_for_with(
    model: &Path,
    placement: &Placement,
    extra: &[&str],
) -> Result<Vec<Process>> {
    (0..placement.workers)
        .map(|w| {
            worker_with(
                model,
                &format_experts(&placement.experts_of(w)),
                "127.0.0.1:0",
                extra,
            )
        })
        .collect()
}

/// The workers' addresses as `--workers` takes them.
pub fn addrs<'a>(workers: impl IntoIterator<Item = &'a Process>) -> String {
    workers
        .into_iter()
        .map(|w| w.addr.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// `router --model MODEL --workers WORKERS --threads 1` on ephemeral ports, then `extra`.
fn router_args<'a>(model: &'a str, workers: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "router",
        "--model",
        model,
        "--workers",
        workers,
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    args
}

/// A router of `model` in front of running `workers` (`host:port,...`),
/// with `extra` options; its gRPC address in `addr`.
pub fn router(model: &Path, workers: &str, extra: &[&str]) -> Result<Process> {
    let model = model.to_str().context("model path")?;
    spawn_listening(&router_args(model, workers, extra))
}

/// The same router, expected to refuse to start within 2 s of waiting for
/// its workers: its stderr (exit code 1, an error and not a panic).
pub fn router_refuses(model: &Path, workers: &str, extra: &[&str]) -> Result<String> {
    let model = model.to_str().context("model path")?;
    let output = tramontane()
        .args(router_args(model, workers, extra))
        .args(["--startup-timeout-s", "2"])
        .env("RUST_BACKTRACE", "0")
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(
        output.status.code() == Some(1) && !stderr.contains("panicked"),
        "router should refuse to start: {} {stderr}",
        output.status
    );
    Ok(stderr)
}

/// What the model in `model` generates greedily in process for `prompt`
/// (up to `max_tokens`, stopping at EOS): the prompt's ids and the tokens a
/// cluster serving it must give.
pub fn expected_greedy(
    model: &Path,
    prompt: &str,
    max_tokens: usize,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let _guard = tch::no_grad_guard();
    let local = CausalLm::load_in_process(model, LoadOptions::default())?;
    let tokenizer = Tokenizer::from_dir(model)?;
    let ids = tokenizer.encode(prompt)?;
    let stop = StopRule {
        max_new_tokens: max_tokens,
        eos_ids: tokenizer.eos_token_id().into_iter().collect(),
    };
    let tokens = generate_greedy(&local, std::slice::from_ref(&ids), &stop)?
        .pop()
        .context("one output")?;
    Ok((ids, tokens))
}

/// The greedy token ids for `prompt` through the router's gRPC API at
/// `grpc` (`tramontane generate --json`).
pub fn generated_ids(grpc: &str, prompt: &str, max_tokens: usize) -> Result<Vec<u32>> {
    generated_ids_by(tramontane(), grpc, prompt, max_tokens)
}

/// [`generated_ids`] through `command` (one that runs `tramontane` with the
/// arguments it is given after its own, perhaps in a network namespace).
pub fn generated_ids_by(
    mut command: Command,
    grpc: &str,
    prompt: &str,
    max_tokens: usize,
) -> Result<Vec<u32>> {
    let output = run_ok(command.args([
        "generate",
        "--server",
        grpc,
        "--prompt",
        prompt,
        "--max-tokens",
        &max_tokens.to_string(),
        "--json",
    ]))?;
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    Ok(serde_json::from_value(answer["token_ids"].clone())?)
}

/// A plain HTTP/1.1 exchange: status, lower-cased headers, body.
pub fn http(addr: &str, method: &str, path: &str, body: &str) -> Result<(u16, String, String)> {
    http_with(
        addr,
        method,
        path,
        &[("Content-Type", "application/json")],
        body,
    )
}

/// [`http`] with the request headers given (Host, Content-Length and
/// Connection are added).
pub fn http_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, String, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    let headers: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").context("no header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    let body = if head.to_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, head.to_lowercase(), body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// The value of a sample (name with its labels as written, e.g.
/// `x_bucket{le="2"}`) in Prometheus text.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Every sample of metric `name`: its labels and value.
pub fn samples(text: &str, name: &str) -> Vec<(std::collections::BTreeMap<String, String>, f64)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(rest) => rest.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            let labels = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .filter_map(|l| {
                    let (k, v) = l.split_once('=')?;
                    Some((k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

/// The workers' addresses, in order, from serve's Prometheus targets file.
pub fn worker_addrs(targets: &Path) -> Result<Vec<String>> {
    let groups: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(targets)?)?;
    let mut workers: Vec<(usize, String)> = groups
        .iter()
        .filter(|g| g["labels"]["component"] == "worker")
        .map(|g| {
            Ok((
                g["labels"]["worker"]
                    .as_str()
                    .context("worker label")?
                    .parse()?,
                g["targets"][0].as_str().context("target")?.to_string(),
            ))
        })
        .collect::<Result<_>>()?;
    workers.sort();
    Ok(workers.into_iter().map(|(_, addr)| addr).collect())
}

#[test]
fn forked_scripts_answer_as_python_run_here_would() -> Result<()> {
    let code = "import os, sys; print(sys.argv[1:], os.getcwd(), os.environ['HOME'])";
    let python = || Command::new(python());
    let output = python_ok(python().args(["-c", code, "a", "b c"]))?;
    let expected = format!(
        "['a', 'b c'] {} {}",
        std::env::current_dir()?.display(),
        std::env::var("HOME")?
    );
    assert_eq!(String::from_utf8(output.stdout)?.trim(), expected);
    // The command's own folder and environment, as a spawned Python's.
    let dir = tempfile::tempdir()?;
    let output = python_ok(
        python()
            .args(["-c", code])
            .current_dir(dir.path())
            .env("HOME", "/nowhere"),
    )?;
    let expected = format!("[] {} /nowhere", dir.path().canonicalize()?.display());
    assert_eq!(String::from_utf8(output.stdout)?.trim(), expected);
    let failed = python_ok(python().args(["-c", "import sys; sys.exit('the reason')"]))
        .expect_err("a script that exits non-zero fails");
    assert!(format!("{failed:#}").contains("the reason"), "{failed:#}");
    let raised =
        python_ok(python().args(["-c", "raise ValueError('raised here')"])).expect_err("raises");
    assert!(
        format!("{raised:#}").contains("ValueError: raised here"),
        "{raised:#}"
    );
    Ok(())
}
