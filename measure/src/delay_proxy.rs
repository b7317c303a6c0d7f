//! A TCP proxy that adds latency, for benchmarks of the sharded path over a
//! slower network (this host's kernel has no netem): every chunk read from
//! one side is written to the other `one_way` later, in order, in both
//! directions, so a request and its answer take `2 × one_way` more
//! (`tramontane delay-proxy`). Threads and blocking sockets: the delays are
//! slept with the OS timer (tokio's has a millisecond grain).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::error::MeasureError;

/// Largest chunk read at once.
const CHUNK: usize = 64 * 1024;

/// Accepts on `listener` forever; each connection is proxied to `upstream`
/// with `one_way` added each way.
pub fn serve(
    listener: TcpListener,
    upstream: String,
    one_way: Duration,
) -> Result<(), MeasureError> {
    for client in listener.incoming() {
        let client = client.map_err(MeasureError::io("accepting a connection"))?;
        let upstream = upstream.clone();
        std::thread::spawn(move || {
            if let Err(e) = proxy(client, &upstream, one_way) {
                tracing::warn!(%upstream, error = %e, "delay-proxy: connection failed");
            }
        });
    }
    Ok(())
}

fn proxy(client: TcpStream, upstream: &str, one_way: Duration) -> std::io::Result<()> {
    let address = upstream
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("upstream has no address"))?;
    let server = TcpStream::connect(address)?;
    for stream in [&client, &server] {
        stream.set_nodelay(true)?;
    }
    let pipes = [(client.try_clone()?, server.try_clone()?), (server, client)];
    let threads: Vec<_> = pipes
        .into_iter()
        .map(|(from, to)| std::thread::spawn(move || delayed_copy(from, to, one_way)))
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

/// Copies `from` to `to`, each chunk `delay` after it was read; at the end
/// of `from`, shuts `to` for writing.
fn delayed_copy(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (chunks, due) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        for (at, chunk) in due {
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if chunks
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(chunks);
    let _ = writer.join();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_cross_in_order_both_ways_later_by_the_delay() {
        let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream_addr = upstream.local_addr().unwrap().to_string();
        // An echo server.
        std::thread::spawn(move || {
            let (mut s, _) = upstream.accept().unwrap();
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => s.write_all(&buf[..n]).unwrap(),
                }
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy_addr = listener.local_addr().unwrap();
        let one_way = Duration::from_millis(20);
        std::thread::spawn(move || serve(listener, upstream_addr, one_way));

        let mut client = TcpStream::connect(proxy_addr).unwrap();
        let message: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = Instant::now();
        let writer = {
            let mut client = client.try_clone().unwrap();
            let message = message.clone();
            std::thread::spawn(move || {
                client.write_all(&message).unwrap();
                client.shutdown(Shutdown::Write).unwrap();
            })
        };
        let mut echoed = Vec::new();
        client.read_to_end(&mut echoed).unwrap();
        writer.join().unwrap();
        assert_eq!(echoed, message, "every byte, in order");
        // Both directions delayed: at least one round trip's added latency.
        assert!(sent.elapsed() >= 2 * one_way, "{:?}", sent.elapsed());
    }
}
