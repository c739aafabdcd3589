//! Throughput of one TCP connection between two netstacks over WireGuard on 127.0.0.1.
//!
//! Sends 64 MiB (or `NETSTACK_MIB`) from A to B three times and prints the median in MiB/s. Each run is bounded
//! to 120 s. Run it optimised: `cargo run --release -p mesh-netstack --example netstack_throughput`.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use mesh_netstack::{Config, Netstack, Peer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RUNS: usize = 3;
const RUN_LIMIT: Duration = Duration::from_secs(120);

async fn stack(key: u8, ip: Ipv4Addr) -> Result<Netstack> {
    Ok(Netstack::start(Config { private_key: [key; 32], listen: "127.0.0.1:0".parse()?, addresses: vec![ip] }).await?)
}

fn peer_of(stack: &Netstack, allowed: &str) -> Result<Peer> {
    Ok(Peer {
        public_key: stack.public_key(),
        endpoint: Some(stack.local_addr()),
        allowed_ips: vec![allowed.parse()?],
        persistent_keepalive: None,
    })
}

/// One transfer: A writes `TOTAL` bytes and a FIN; B counts them and answers the count.
async fn run_once(a: &Netstack, to: SocketAddrV4, total: u64) -> Result<Duration> {
    let started = Instant::now();
    let mut stream = a.connect(to, Duration::from_secs(10)).await?;
    let chunk = vec![0x5au8; 64 * 1024];
    let mut sent = 0u64;
    while sent < total {
        stream.write_all(&chunk).await?;
        sent += chunk.len() as u64;
    }
    stream.shutdown().await?;
    let count = stream.read_u64().await?;
    ensure!(count == total, "B received {count} bytes of {total}");
    Ok(started.elapsed())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let a_ip = Ipv4Addr::new(10, 42, 0, 1);
    let b_ip = Ipv4Addr::new(10, 42, 0, 2);
    let a = stack(1, a_ip).await?;
    let b = stack(2, b_ip).await?;
    a.set_peers(vec![peer_of(&b, "10.42.0.2/32")?]);
    b.set_peers(vec![peer_of(&a, "10.42.0.1/32")?]);
    let to = SocketAddrV4::new(b_ip, 5201);
    let listener = b.listen(to).await?;
    let server = tokio::spawn(async move {
        for _ in 0..RUNS {
            let (mut stream, _) = listener.accept().await?;
            let mut buf = vec![0u8; 256 * 1024];
            let mut count = 0u64;
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                count += n as u64;
            }
            stream.write_u64(count).await?;
            stream.shutdown().await?;
        }
        Ok::<_, anyhow::Error>(())
    });
    let mib: u64 = std::env::var("NETSTACK_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let total = mib << 20;
    let mut rates = Vec::new();
    for run in 1..=RUNS {
        let elapsed = tokio::time::timeout(RUN_LIMIT, run_once(&a, to, total))
            .await
            .with_context(|| format!("a run took over {RUN_LIMIT:?}"))??;
        let rate = total as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64();
        println!("run {run}: {mib} MiB in {:.2} s = {rate:.1} MiB/s", elapsed.as_secs_f64());
        rates.push(rate);
    }
    server.await??;
    rates.sort_by(f64::total_cmp);
    println!("median: {:.1} MiB/s", rates[RUNS / 2]);
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}
