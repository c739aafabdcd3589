//! Two netstacks in one process, talking WireGuard over 127.0.0.1.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use mesh_netstack::{Config, Error, Netstack, Peer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const A_IP: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 2);
/// Every test body runs under this bound.
const TEST_LIMIT: Duration = Duration::from_secs(60);
const CONNECT: Duration = Duration::from_secs(10);

async fn stack(key: u8, addresses: Vec<Ipv4Addr>) -> Result<Netstack> {
    let config = Config { private_key: [key; 32], listen: "127.0.0.1:0".parse()?, addresses };
    Ok(Netstack::start(config).await?)
}

fn peer_of(stack: &Netstack, endpoint: bool, allowed: &[&str]) -> Result<Peer> {
    Ok(Peer {
        public_key: stack.public_key(),
        endpoint: endpoint.then(|| stack.local_addr()),
        allowed_ips: allowed.iter().map(|a| a.parse()).collect::<Result<_, _>>()?,
        persistent_keepalive: None,
    })
}

/// A (10.42.0.1) and B (10.42.0.2), each the other's peer with a known endpoint and /32.
async fn pair() -> Result<(Netstack, Netstack)> {
    let a = stack(1, vec![A_IP]).await?;
    let b = stack(2, vec![B_IP]).await?;
    a.set_peers(vec![peer_of(&b, true, &["10.42.0.2/32"])?]);
    b.set_peers(vec![peer_of(&a, true, &["10.42.0.1/32"])?]);
    Ok((a, b))
}

/// Serves an echo on `on`: every connection gets back what it sent, then a FIN after the client's FIN.
async fn echo_server(stack: &Netstack, on: SocketAddrV4) -> Result<tokio::task::JoinHandle<()>> {
    let listener = stack.listen(on).await?;
    Ok(tokio::spawn(async move {
        for _ in 0..10_000 {
            let Ok((stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(stream);
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    }))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed).wrapping_add((i >> 11) as u8)).collect()
}

/// Sends `data` on a new connection to `to`, half-closes, and returns everything read until EOF.
async fn round_trip(stack: &Netstack, to: SocketAddrV4, data: &[u8]) -> Result<Vec<u8>> {
    let stream = stack.connect(to, CONNECT).await?;
    let (mut r, mut w) = tokio::io::split(stream);
    let payload = data.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut back = Vec::with_capacity(data.len());
    r.read_to_end(&mut back).await?;
    let _w = writer.await??;
    Ok(back)
}

async fn bounded<F: std::future::Future<Output = Result<()>>>(f: F) -> Result<()> {
    tokio::time::timeout(TEST_LIMIT, f).await.context("the test took too long")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_each_way_intact_and_fin_gives_eof() -> Result<()> {
    bounded(async {
        let (a, b) = pair().await?;
        let _server = echo_server(&b, SocketAddrV4::new(B_IP, 80)).await?;
        let data = pattern(1 << 20, 7);
        let back = round_trip(&a, SocketAddrV4::new(B_IP, 80), &data).await?;
        ensure!(back.len() == data.len(), "got {} bytes back, sent {}", back.len(), data.len());
        ensure!(back == data, "the echoed bytes differ");
        a.shutdown().await;
        b.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_addresses_and_server_side_eof() -> Result<()> {
    bounded(async {
        let (a, b) = pair().await?;
        let listener = b.listen(SocketAddrV4::new(B_IP, 8080)).await?;
        let client = a.connect(SocketAddrV4::new(B_IP, 8080), CONNECT).await?;
        let (mut server, from) = listener.accept().await?;
        ensure!(from == client.local_addr(), "accept saw {from}, client is {}", client.local_addr());
        ensure!(client.local_addr().ip() == &A_IP && client.peer_addr() == SocketAddrV4::new(B_IP, 8080));
        ensure!(server.local_addr() == SocketAddrV4::new(B_IP, 8080) && server.peer_addr() == from);
        let mut client = client;
        client.write_all(b"hello").await?;
        client.shutdown().await?;
        let mut got = Vec::new();
        server.read_to_end(&mut got).await?;
        ensure!(got == b"hello", "server read {got:?}");
        server.write_all(b"bye").await?;
        server.shutdown().await?;
        let mut got = Vec::new();
        client.read_to_end(&mut got).await?;
        ensure!(got == b"bye", "client read {got:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_connections() -> Result<()> {
    bounded(async {
        let (a, b) = pair().await?;
        let _server = echo_server(&b, SocketAddrV4::new(B_IP, 80)).await?;
        let mut tasks = Vec::new();
        for i in 0..20u8 {
            let a = a.clone();
            tasks.push(tokio::spawn(async move {
                let data = pattern(64 * 1024, i);
                let back = round_trip(&a, SocketAddrV4::new(B_IP, 80), &data).await?;
                ensure!(back == data, "connection {i}: echo differs ({} bytes back)", back.len());
                Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_port_is_refused_quickly() -> Result<()> {
    bounded(async {
        let (a, _b) = pair().await?;
        let started = Instant::now();
        let to = SocketAddrV4::new(B_IP, 81);
        match a.connect(to, Duration::from_secs(20)).await {
            Err(e @ Error::Refused(_)) => {
                ensure!(e.to_string().contains("refused by 10.42.0.2:81"), "message: {e}");
            }
            Err(e) => bail!("expected refused, got: {e}"),
            Ok(_) => bail!("connected to a port nobody listens on"),
        }
        ensure!(started.elapsed() < Duration::from_secs(5), "refusal took {:?}", started.elapsed());
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_ip_is_named_in_the_error() -> Result<()> {
    bounded(async {
        let (a, _b) = pair().await?;
        match a.connect(SocketAddrV4::new(Ipv4Addr::new(10, 42, 0, 9), 80), CONNECT).await {
            Err(e @ Error::NoRoute(_)) => {
                ensure!(e.to_string().contains("10.42.0.9"), "message: {e}");
                ensure!(e.to_string().contains("is the node in the mesh"), "message: {e}");
            }
            Err(e) => bail!("expected no route, got: {e}"),
            Ok(_) => bail!("connected to an unrouted address"),
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_source_is_dropped() -> Result<()> {
    bounded(async {
        // B connects from 10.42.0.3 (its first address), an address A routes to another peer, C.
        // If A accepted B's SYN, its SYN-ACK to 10.42.0.3 would go to C, starting with a handshake
        // initiation to C's endpoint: a silent socket here, which must receive nothing.
        let a = stack(1, vec![A_IP]).await?;
        let b = stack(2, vec![Ipv4Addr::new(10, 42, 0, 3), B_IP]).await?;
        let c_socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let c = Peer {
            public_key: [9; 32],
            endpoint: Some(c_socket.local_addr()?),
            allowed_ips: vec!["10.42.0.3/32".parse()?],
            persistent_keepalive: None,
        };
        a.set_peers(vec![peer_of(&b, true, &["10.42.0.2/32"])?, c]);
        b.set_peers(vec![peer_of(&a, true, &["10.42.0.1/32"])?]);
        let _server = echo_server(&a, SocketAddrV4::new(A_IP, 80)).await?;
        let to = SocketAddrV4::new(A_IP, 80);
        match b.connect(to, Duration::from_millis(1500)).await {
            Err(e @ Error::Timeout { .. }) => {
                let text = e.to_string();
                ensure!(text.contains("timed out after 1.5s"), "message: {text}");
                // The handshake itself is not subject to allowed IPs: it worked.
                ensure!(text.contains("handshake with peer") && text.contains("worked"), "message: {text}");
            }
            Err(e) => bail!("expected a timeout, got: {e}"),
            Ok(_) => bail!("A accepted packets from a source outside B's allowed IPs"),
        }
        let mut buf = [0u8; 256];
        match c_socket.try_recv_from(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Ok((n, _)) => bail!("A answered the spoofed SYN: {n} bytes went to C's endpoint"),
            Err(e) => bail!("C's socket: {e}"),
        }
        ensure!(a.stats().iter().any(|s| s.public_key == b.public_key() && s.last_handshake.is_some()));
        // Control: once A allows 10.42.0.3 for B, the same connection works.
        a.set_peers(vec![peer_of(&b, true, &["10.42.0.2/31"])?]);
        let back = round_trip(&b, to, b"now allowed").await?;
        ensure!(back == b"now allowed", "echo: {back:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_learned_by_roaming() -> Result<()> {
    bounded(async {
        let a = stack(1, vec![A_IP]).await?;
        let b = stack(2, vec![B_IP]).await?;
        a.set_peers(vec![peer_of(&b, true, &["10.42.0.2/32"])?]);
        b.set_peers(vec![peer_of(&a, false, &["10.42.0.1/32"])?]);
        ensure!(b.stats()[0].endpoint.is_none());
        let _server = echo_server(&b, SocketAddrV4::new(B_IP, 80)).await?;
        let back = round_trip(&a, SocketAddrV4::new(B_IP, 80), b"roam").await?;
        ensure!(back == b"roam", "echo: {back:?}");
        let learned = b.stats()[0].endpoint;
        ensure!(learned == Some(a.local_addr()), "B learned {learned:?}, A is at {}", a.local_addr());
        // Re-applying B's config without an endpoint keeps the learned one.
        b.set_peers(vec![peer_of(&a, false, &["10.42.0.1/32"])?]);
        ensure!(b.stats()[0].endpoint == Some(a.local_addr()));
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_peers_keeps_sessions_and_removal_stops_new_connects() -> Result<()> {
    bounded(async {
        let (a, b) = pair().await?;
        let _server = echo_server(&b, SocketAddrV4::new(B_IP, 80)).await?;
        let mut stream = a.connect(SocketAddrV4::new(B_IP, 80), CONNECT).await?;
        let mut buf = [0u8; 5];
        stream.write_all(b"one..").await?;
        stream.read_exact(&mut buf).await?;
        ensure!(&buf == b"one..");
        let handshake_before = a.stats()[0].last_handshake;
        // The same peers again, on both sides: the live connection goes on.
        a.set_peers(vec![peer_of(&b, true, &["10.42.0.2/32"])?]);
        b.set_peers(vec![peer_of(&a, true, &["10.42.0.1/32"])?]);
        stream.write_all(b"two..").await?;
        stream.read_exact(&mut buf).await?;
        ensure!(&buf == b"two..");
        let handshake_after = a.stats()[0].last_handshake;
        ensure!(
            handshake_before.is_some() && handshake_after >= handshake_before,
            "the session was replaced: {handshake_before:?} then {handshake_after:?}"
        );
        // Removing the peer: new connections have no route.
        a.set_peers(vec![]);
        ensure!(a.stats().is_empty());
        match a.connect(SocketAddrV4::new(B_IP, 80), CONNECT).await {
            Err(Error::NoRoute(ip)) => ensure!(ip == B_IP),
            Err(e) => bail!("expected no route, got: {e}"),
            Ok(_) => bail!("connected through a removed peer"),
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_address_added_with_set_addresses() -> Result<()> {
    bounded(async {
        let (a, b) = pair().await?;
        let service = Ipv4Addr::new(10, 42, 0, 20);
        let on = SocketAddrV4::new(service, 80);
        match b.listen(on).await {
            Err(Error::NotLocal(_)) => {}
            other => bail!("listening on an address B does not own: {other:?}"),
        }
        b.set_addresses(vec![B_IP, service]);
        a.set_peers(vec![peer_of(&b, true, &["10.42.0.2/32", "10.42.0.20/32"])?]);
        let _server = echo_server(&b, on).await?;
        let stream = a.connect(on, CONNECT).await?;
        ensure!(stream.peer_addr() == on);
        drop(stream);
        let back = round_trip(&a, on, b"service").await?;
        ensure!(back == b"service", "echo: {back:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_bytes_and_handshakes() -> Result<()> {
    bounded(async {
        let (a, b) = pair().await?;
        ensure!(a.stats()[0].last_handshake.is_none(), "a handshake before any traffic");
        let _server = echo_server(&b, SocketAddrV4::new(B_IP, 80)).await?;
        let data = pattern(100_000, 3);
        let back = round_trip(&a, SocketAddrV4::new(B_IP, 80), &data).await?;
        ensure!(back == data);
        for (name, stats) in [("A", a.stats()), ("B", b.stats())] {
            ensure!(stats.len() == 1, "{name}: {stats:?}");
            let s = &stats[0];
            ensure!(s.tx_bytes > 100_000 && s.rx_bytes > 100_000, "{name}: {s:?}");
            ensure!(s.last_handshake.is_some_and(|d| d < Duration::from_secs(30)), "{name}: {s:?}");
        }
        ensure!(a.stats()[0].public_key == b.public_key());
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_the_stack() -> Result<()> {
    bounded(async {
        let (a, b) = pair().await?;
        let _server = echo_server(&b, SocketAddrV4::new(B_IP, 80)).await?;
        let mut stream = a.connect(SocketAddrV4::new(B_IP, 80), CONNECT).await?;
        let handle = a.clone();
        a.shutdown().await;
        ensure!(matches!(handle.connect(SocketAddrV4::new(B_IP, 80), CONNECT).await, Err(Error::Shutdown)));
        ensure!(stream.write_all(b"x").await.is_err(), "wrote through a stopped stack");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_names_the_missing_handshake() -> Result<()> {
    bounded(async {
        let a = stack(1, vec![A_IP]).await?;
        // A UDP socket on loopback that never answers: the handshake cannot complete.
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let key = [9u8; 32];
        a.set_peers(vec![Peer {
            public_key: key,
            endpoint: Some(silent.local_addr()?),
            allowed_ips: vec!["10.42.0.9/32".parse()?],
            persistent_keepalive: None,
        }]);
        let to = SocketAddrV4::new(Ipv4Addr::new(10, 42, 0, 9), 80);
        match a.connect(to, Duration::from_millis(800)).await {
            Err(e @ Error::Timeout { .. }) => {
                let text = e.to_string();
                ensure!(text.starts_with("connecting to 10.42.0.9:80 timed out after 800ms"), "message: {text}");
                ensure!(
                    text.contains("no handshake with peer") && text.contains(&silent.local_addr()?.to_string()),
                    "message: {text}"
                );
            }
            Err(e) => bail!("expected a timeout, got: {e}"),
            Ok(_) => bail!("connected through a peer that never answers"),
        }
        // The stack did try: a handshake initiation reached the silent endpoint.
        let mut buf = [0u8; 256];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), silent.recv_from(&mut buf)).await??;
        ensure!(n == 148 && buf[0] == 1, "expected a handshake initiation, got {n} bytes of type {}", buf[0]);
        Ok(())
    })
    .await
}

/// Forwards datagrams between two loopback endpoints, dropping every `drop_every`-th one.
async fn lossy_relay(
    a: std::net::SocketAddr,
    b: std::net::SocketAddr,
    drop_every: u64,
    dropped: Arc<AtomicU64>,
) -> Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let addr = relay.local_addr()?;
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        // Bounded: at most this many datagrams, and the test's own time limit.
        for i in 1..=2_000_000u64 {
            let Ok((n, from)) = relay.recv_from(&mut buf).await else { break };
            let to = if from == a {
                b
            } else if from == b {
                a
            } else {
                continue;
            };
            if i % drop_every == 0 {
                dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let _ = relay.send_to(&buf[..n], to).await;
        }
    });
    Ok((addr, task))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_packet_loss() -> Result<()> {
    bounded(async {
        let a = stack(1, vec![A_IP]).await?;
        let b = stack(2, vec![B_IP]).await?;
        let dropped = Arc::new(AtomicU64::new(0));
        let (relay, relay_task) = lossy_relay(a.local_addr(), b.local_addr(), 50, dropped.clone()).await?;
        let through_relay = |stack: &Netstack, allowed: &str| -> Result<Peer> {
            Ok(Peer { endpoint: Some(relay), ..peer_of(stack, false, &[allowed])? })
        };
        a.set_peers(vec![through_relay(&b, "10.42.0.2/32")?]);
        b.set_peers(vec![through_relay(&a, "10.42.0.1/32")?]);
        let _server = echo_server(&b, SocketAddrV4::new(B_IP, 80)).await?;
        // A correctness test, bounded loosely: smoltcp recovers from loss by timeout (1 s at
        // least, doubling when a retransmission is the one dropped), and this machine's load
        // stretches that; 512 KiB took 3 to over 30 s here.
        let data = pattern(256 * 1024, 11);
        let started = Instant::now();
        let back = tokio::time::timeout(Duration::from_secs(50), round_trip(&a, SocketAddrV4::new(B_IP, 80), &data))
            .await
            .context("256 KiB echo with 2% loss took over 50 s")??;
        ensure!(back == data, "the echoed bytes differ");
        a.shutdown().await;
        b.shutdown().await;
        relay_task.abort();
        let dropped = dropped.load(Ordering::Relaxed);
        eprintln!("256 KiB echo through 2% loss in {:?} ({dropped} datagrams dropped)", started.elapsed());
        ensure!(dropped > 0, "the relay dropped nothing: the test tests nothing");
        Ok(())
    })
    .await
}

/// A new member's first initiation usually arrives before the other side has added it as a
/// peer (its agent applies the directory a moment later): the first handshake is retried early
/// (0.25, 0.5, 1, 2 s), so the connection opens well before WireGuard's own 5 s retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_handshake_lost_to_a_late_peer_is_retried_before_five_seconds() -> Result<()> {
    bounded(async {
        let a = stack(1, vec![A_IP]).await?;
        let b = stack(2, vec![B_IP]).await?;
        let _server = echo_server(&b, SocketAddrV4::new(B_IP, 7)).await?;
        a.set_peers(vec![peer_of(&b, true, &["10.42.0.2/32"])?]);
        let late = {
            let (a, b) = (a.clone(), b.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(400)).await;
                // No endpoint: b cannot initiate itself, only answer a.
                b.set_peers(vec![peer_of(&a, false, &["10.42.0.1/32"]).expect("peer")]);
            })
        };
        let started = Instant::now();
        // Without the early retries this takes WireGuard's 5 s REKEY_TIMEOUT and times out.
        let stream = a.connect(SocketAddrV4::new(B_IP, 7), Duration::from_millis(4500)).await;
        late.await?;
        let stream = stream.with_context(|| format!("no connection after {:?}", started.elapsed()))?;
        drop(stream);
        Ok(())
    })
    .await
}
