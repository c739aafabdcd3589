//! Active health probes through the tunnel: a tiny UDP echo on each node's mesh IP, and a
//! prober that sends one datagram to every peer's mesh IP per round and times the answer.
//!
//! A probe is 16 bytes: `HMP1`, a sequence number and a per-agent nonce; the echo sends it back
//! with `HMR1`. Only the tunnel can carry it (the target is a mesh IP), so an answer proves the
//! whole path: route, encryption, the peer's allowed IPs, and the peer's agent.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

const REQUEST: &[u8; 4] = b"HMP1";
const REPLY: &[u8; 4] = b"HMR1";

/// Answers probes on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let socket = UdpSocket::bind(addr).await.map_err(|e| anyhow::anyhow!("binding the probe echo on {addr}: {e}"))?;
    let mut buf = [0u8; 64];
    loop {
        let (n, from) = socket.recv_from(&mut buf).await?;
        if n == 16 && &buf[..4] == REQUEST {
            buf[..4].copy_from_slice(REPLY);
            let _ = socket.send_to(&buf[..16], from).await;
        }
    }
}

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// Sends one probe to `target` from `source` and waits up to `timeout` for the answer; returns
/// the round-trip time, or `None` if it was lost.
pub async fn probe(source: Ipv4Addr, target: SocketAddr, nonce: u64, timeout: Duration) -> Option<Duration> {
    let socket = UdpSocket::bind((source, 0)).await.ok()?;
    socket.connect(target).await.ok()?;
    let mut request = [0u8; 16];
    request[..4].copy_from_slice(REQUEST);
    request[4..8].copy_from_slice(&SEQUENCE.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    request[8..].copy_from_slice(&nonce.to_be_bytes());
    let start = Instant::now();
    socket.send(&request).await.ok()?;
    let mut buf = [0u8; 64];
    let answer = async {
        loop {
            // A send error (no route yet, ICMP unreachable) reads as a loss.
            let n = socket.recv(&mut buf).await.ok()?;
            if n == 16 && &buf[..4] == REPLY && buf[4..16] == request[4..16] {
                return Some(start.elapsed());
            }
        }
    };
    tokio::time::timeout(timeout, answer).await.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_probe_to_an_echo_on_loopback_comes_back_and_one_to_nobody_is_lost() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        drop(socket);
        let echo = tokio::spawn(serve(addr));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let rtt = probe(Ipv4Addr::LOCALHOST, addr, 7, Duration::from_secs(1)).await;
        assert!(rtt.is_some_and(|d| d < Duration::from_secs(1)));
        echo.abort();
        let _ = echo.await;
        let lost = probe(Ipv4Addr::LOCALHOST, addr, 7, Duration::from_millis(200)).await;
        assert_eq!(lost, None);
    }
}
