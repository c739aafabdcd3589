//! `make bench` for the data path on the lab's real tunnels:
//!
//! - service convergence: time from creating a MeshService (as `kubectl apply` does) on node 2
//!   until a TCP connection to its mesh IP works from every other node; 20 tries, median and
//!   worst;
//! - DNS convergence: time from creating a MeshService until every node's agent answers its
//!   name with its mesh IP; 20 tries, median and worst;
//! - ping round-trip time between two nodes over the mesh and over the plain veth underlay,
//!   median of 100 pings each, measured in one run.
//!
//! The table goes to stdout and the figures to target/bench/mesh.json.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use harness_mesh_e2e::controller::service;
use harness_mesh_e2e::mesh::Mesh;
use kube::api::{Api, DeleteParams, PostParams};
use mesh_api::MeshService;
use serde_json::json;

const TRIES: usize = 20;
const PORT: u16 = 18100;

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// Per-packet round-trip times (ms) of `count` pings from `node` to `target`.
fn ping_times(mesh: &Mesh, node: &str, target: Ipv4Addr, count: u32) -> anyhow::Result<Vec<f64>> {
    let out = mesh
        .nodes
        .exec_ok(node, &["ping", "-n", "-c", &count.to_string(), "-i", "0.01", "-W", "1", &target.to_string()])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect())
}

fn reachable(mesh: &Mesh, node: &str, ip: Ipv4Addr) -> bool {
    mesh.nodes
        .exec(node, &["socat", "-T", "1", "-u", &format!("TCP:{ip}:{PORT},connect-timeout=0.2"), "-"])
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("bench"))
}

/// Creates (afresh) a mesh service `name` on `host` and returns when the create was sent.
async fn create_service(api: &Api<MeshService>, name: &str, host: &str) -> anyhow::Result<Instant> {
    let _ = api.delete(name, &DeleteParams::default()).await;
    let started = Instant::now();
    let spec = json!({"node": host, "network": {"type": "mesh", "ports": [PORT]}});
    api.create(&PostParams::default(), &service(name, spec)).await?;
    Ok(started)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mesh = Mesh::get(Duration::from_secs(120)).await?;
    let names = mesh.nodes.names.clone();
    let (host, others) = (names[1].clone(), [names[0].clone(), names[2].clone()]);
    let info = mesh.info().await?;

    let over_mesh = ping_times(&mesh, &others[0], info[&host].mesh_ip, 100)?;
    let underlay: Ipv4Addr = info[&host].endpoint.split(':').next().unwrap_or_default().parse()?;
    let over_underlay = ping_times(&mesh, &others[0], underlay, 100)?;

    let api: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    let mut server = mesh.nodes.spawn(
        &host,
        &["timeout", "600", "socat", &format!("TCP-LISTEN:{PORT},reuseaddr,fork"), "SYSTEM:echo bench"],
    )?;
    let mut times = Vec::new();
    for i in 0..TRIES {
        let name = format!("bench-converge-{i}");
        let started = create_service(&api, &name, &host).await?;
        let ip = loop {
            if let Some(ip) = api.get(&name).await?.status.and_then(|s| s.mesh_ip) {
                break ip.parse::<Ipv4Addr>()?;
            }
            anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "{name} got no mesh IP in 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut waiting: Vec<&String> = others.iter().collect();
        while !waiting.is_empty() {
            waiting.retain(|node| !reachable(&mesh, node, ip));
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "{name} not reachable from {waiting:?} in 60 s"
            );
        }
        times.push(started.elapsed().as_secs_f64());
        api.delete(&name, &DeleteParams::default()).await?;
    }
    let _ = server.kill();
    let _ = server.wait();

    let mut dns_times = Vec::new();
    for i in 0..TRIES {
        let name = format!("bench-dns-{i}");
        let started = create_service(&api, &name, &host).await?;
        let fqdn = format!("{name}.default.mesh.local");
        let mut waiting: Vec<String> = names.clone();
        while !waiting.is_empty() {
            let ip = api.get(&name).await?.status.and_then(|s| s.mesh_ip);
            if let Some(ip) = ip {
                let ip: Ipv4Addr = ip.parse()?;
                let mut still = Vec::new();
                for node in waiting {
                    let answer = mesh.dig(&node, info[&node].mesh_ip, &fqdn, false)?;
                    if answer.addresses != [ip] {
                        still.push(node);
                    }
                }
                waiting = still;
            }
            anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "{fqdn} not answered by {waiting:?} in 30 s");
        }
        dns_times.push(started.elapsed().as_secs_f64());
        api.delete(&name, &DeleteParams::default()).await?;
    }
    let dns_worst = dns_times.iter().copied().fold(0.0, f64::max);

    let worst = times.iter().copied().fold(0.0, f64::max);
    let rows = [
        ("MeshService create -> reachable from every node, median (20 tries)", format!("{:.2} s", median(&times))),
        ("MeshService create -> reachable from every node, worst (20 tries)", format!("{worst:.2} s")),
        (
            "MeshService create -> its name answered by every node's DNS, median (20 tries)",
            format!("{:.2} s", median(&dns_times)),
        ),
        ("MeshService create -> its name answered by every node's DNS, worst (20 tries)", format!("{dns_worst:.2} s")),
        ("ping RTT over the mesh, median of 100", format!("{:.3} ms", median(&over_mesh))),
        ("ping RTT over the veth underlay, median of 100", format!("{:.3} ms", median(&over_underlay))),
        ("mesh / underlay RTT ratio", format!("{:.1}x", median(&over_mesh) / median(&over_underlay))),
    ];
    println!("\n{:<80} value", "benchmark (lab, userspace WireGuard)");
    for (name, value) in &rows {
        println!("{name:<80} {value}");
    }
    let json = json!({
        "converge_seconds": {"median": median(&times), "worst": worst, "tries": times},
        "dns_seconds": {"median": median(&dns_times), "worst": dns_worst, "tries": dns_times},
        "ping_ms": {"mesh_median": median(&over_mesh), "underlay_median": median(&over_underlay)},
    });
    let dir = harness_mesh_e2e::repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("mesh.json"), serde_json::to_string_pretty(&json)?)?;
    Ok(())
}
