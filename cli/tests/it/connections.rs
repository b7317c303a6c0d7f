//! Connections held to their limits, on a served cluster with short
//! timeouts: a silent client, a request head sent a byte at a time and an
//! idle keep-alive connection are closed by the server, on the HTTP port,
//! the router's gRPC port and a worker's port; past the connection limit
//! the silent ones make room, and normal HTTP and gRPC requests still
//! succeed. The closes are counted by reason.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use tramontane_proto::v1::GenerateRequest;
use tramontane_proto::v1::generation_client::GenerationClient;

use crate::support;

/// Far longer than every timeout below (1–2 s): how long a test waits for
/// the server to close a connection.
const WITHIN: Duration = Duration::from_secs(30);

/// Whether the server closes `stream` within [`WITHIN`], while `feed`
/// (called every 200 ms) writes to it what a client would.
fn closed_by_server(stream: &mut TcpStream, mut feed: impl FnMut(&mut TcpStream)) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    while started.elapsed() < WITHIN {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {} // a response or an HTTP/2 frame: keep reading
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                feed(stream)
            }
            Err(_) => return true, // reset
        }
    }
    false
}

fn connect(addr: &str) -> Result<TcpStream> {
    Ok(TcpStream::connect(addr)?)
}

fn silent(_: &mut TcpStream) {}

/// A keep-alive connection that has had one request answered.
fn after_a_request(addr: &str) -> Result<TcpStream> {
    let mut stream = connect(addr)?;
    write!(stream, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte)?;
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    ensure!(head.starts_with("http/1.1 200"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    stream.read_exact(&mut vec![0u8; length])?;
    Ok(stream)
}

#[test]
fn slow_silent_idle_and_excess_connections_are_closed_and_requests_still_succeed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "31"])?;
    let serve = support::serve_two_workers(
        &model,
        &[
            "--http-header-timeout",
            "1",
            "--http-idle-timeout",
            "2",
            "--max-connections",
            "6",
            "--grpc-handshake-timeout",
            "1",
            "--grpc-max-connections",
            "4",
        ],
    )?;
    let http = serve.http.as_str();
    let grpc = serve.process.addr.as_str();

    // A client that never sends anything, on either port.
    ensure!(closed_by_server(&mut connect(http)?, silent), "silent HTTP");
    ensure!(closed_by_server(&mut connect(grpc)?, silent), "silent gRPC");

    // A head sent one byte at a time, never finished: as a connection's
    // first request, and as the next one on a keep-alive connection.
    let slow_head = || {
        let head = b"GET /health HTTP/1.1\r\nHost: x\r\n".iter();
        let mut head = head.chain(b"X-Slow: 1\r\n".iter().cycle()).copied();
        move |s: &mut TcpStream| {
            let _ = s.write_all(&[head.next().unwrap()]);
        }
    };
    ensure!(
        closed_by_server(&mut connect(http)?, slow_head()),
        "slow first head"
    );
    ensure!(
        closed_by_server(&mut after_a_request(http)?, slow_head()),
        "slow next head"
    );

    // A keep-alive connection, idle after its request.
    ensure!(
        closed_by_server(&mut after_a_request(http)?, silent),
        "idle keep-alive"
    );

    // Past the limit: silent connections fill both listeners, normal
    // requests still get through (they take the silent ones' places).
    let _http_flood: Vec<TcpStream> = (0..12).map(|_| connect(http)).collect::<Result<_>>()?;
    let _grpc_flood: Vec<TcpStream> = (0..8).map(|_| connect(grpc)).collect::<Result<_>>()?;
    for _ in 0..3 {
        let (status, _, body) = support::http(http, "GET", "/health", "")?;
        ensure!(status == 200, "{status} {body}");
        let completion = r#"{"model":"model","prompt":"Hello","max_tokens":3,"temperature":0}"#;
        let (status, _, body) = support::http(http, "POST", "/v1/completions", completion)?;
        ensure!(status == 200, "{status} {body}");
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let answer = runtime.block_on(async {
        let mut client = GenerationClient::connect(format!("http://{grpc}")).await?;
        let request = GenerateRequest {
            prompt: "Hello".into(),
            max_tokens: 3,
            temperature: Some(0.0),
            ..Default::default()
        };
        anyhow::Ok(client.generate(request).await?.into_inner())
    })?;
    ensure!(answer.token_ids.len() == 3);

    let (_, _, metrics) = support::http(http, "GET", "/metrics", "")?;
    let closed = |listener: &str, reason: &str| {
        support::samples(&metrics, "tramontane_connections_closed_total")
            .into_iter()
            .filter(|(labels, _)| labels["listener"] == listener && labels["reason"] == reason)
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    for (listener, reason) in [
        ("http", "no_request"),
        ("http", "header_timeout"),
        ("http", "idle"),
        ("http", "evicted"),
        ("grpc", "no_request"),
        ("grpc", "evicted"),
    ] {
        ensure!(
            closed(listener, reason) >= 1.0,
            "no {listener} connection closed for {reason}:\n{metrics}"
        );
    }
    // At most the limit, and a quarter more while evicted ones close.
    let open = support::samples(&metrics, "tramontane_connections_open");
    ensure!(
        open.iter()
            .all(|(labels, v)| labels["listener"] != "http" || *v <= 8.0),
        "{open:?}"
    );
    Ok(())
}

#[test]
fn a_worker_closes_silent_connections_and_keeps_room_for_its_router() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "32"])?;
    let model_arg = model.to_str().unwrap();
    let worker = support::spawn_listening(&[
        "worker",
        "--model",
        model_arg,
        "--listen",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--grpc-handshake-timeout",
        "1",
        "--grpc-max-connections",
        "3",
    ])?;
    ensure!(
        closed_by_server(&mut connect(&worker.addr)?, silent),
        "silent"
    );
    let _flood: Vec<TcpStream> = (0..6)
        .map(|_| connect(&worker.addr))
        .collect::<Result<_>>()?;
    // A router still connects and serves through it.
    let router = support::spawn_serving(&[
        "router",
        "--model",
        model_arg,
        "--workers",
        &worker.addr,
        "--threads",
        "1",
    ])?;
    let (status, _, body) = support::http(
        &router.http,
        "POST",
        "/v1/completions",
        r#"{"model":"model","prompt":"Hello","max_tokens":3,"temperature":0}"#,
    )?;
    ensure!(status == 200, "{status} {body}");
    Ok(())
}
