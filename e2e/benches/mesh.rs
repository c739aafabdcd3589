//! `make bench` for the data path on the lab's real tunnels:
//!
//! - service convergence: time from creating a MeshService (as `kubectl apply` does) on node 2
//!   until a TCP connection to its mesh IP works from every other node; 20 tries, median and
//!   worst;
//! - DNS convergence: time from creating a MeshService until every node's agent answers its
//!   name with its mesh IP; 20 tries, median and worst;
//! - ping round-trip time between two nodes over the mesh and over the plain veth underlay,
//!   median of 100 pings each, measured in one run;
//! - the API cost of one service change on the 3-node lab: API writes (Lease renewals aside)
//!   and watch events, from the API server's own counters before and after a create and an
//!   update, once the writes have settled;
//! - data-plane throughput: iperf3 (TCP, 5 s, two runs) between two nodes over the mesh (to a
//!   service hosted on the server node) and over the plain veth underlay, for each userspace
//!   backend available;
//! - agent CPU and memory at idle: each lab agent's CPU time over 10 s (`/proc/<pid>/stat`)
//!   and its VmRSS.
//!
//! The table goes to stdout and the figures to target/bench/mesh.json.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use harness_mesh_e2e::controller::service;
use harness_mesh_e2e::measure::{self, ApiCounters, median};
use harness_mesh_e2e::mesh::{Mesh, wait_mesh_ip};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use mesh_api::MeshService;
use serde_json::{Value, json};

const TRIES: usize = 20;
const PORT: u16 = 18100;

const IPERF_PORT: u16 = 18201;
const IPERF_RUNS: usize = 2;

/// The `p`th percentile (nearest rank).
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
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

/// The lab agents' pids (from `.lab/pids/`), by node; empty on another cluster.
fn agent_pids(names: &[String]) -> Vec<(String, u32)> {
    if std::env::var_os("HARNESS_MESH_NODES").is_some() {
        return Vec::new();
    }
    let dir = harness_mesh_e2e::repo_root().join(".lab/pids");
    names
        .iter()
        .filter_map(|n| {
            let pid = std::fs::read_to_string(dir.join(format!("mesh-agent-{n}.pid"))).ok()?;
            Some((n.clone(), pid.trim().parse().ok()?))
        })
        .collect()
}

/// The API writes and watch events one service change causes, once the writes settle.
async fn change_cost(mesh: &Mesh, before: &ApiCounters) -> anyhow::Result<(ApiCounters, bool)> {
    let (after, quiet) = measure::settle(&mesh.cluster, Duration::from_secs(2), Duration::from_secs(30)).await?;
    Ok((after.since(before), quiet))
}

fn cost_json(cost: &ApiCounters, settled: bool) -> Value {
    json!({
        "settled": settled,
        "writes_without_leases": cost.writes_without_leases(),
        "writes": cost.writes,
        "mesh_watch_events": cost.mesh_watch_events(),
        "watch_events": cost.watch_events,
        "watchers": cost.watchers,
    })
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

    // The API cost of one change: a create (until reachable, then settled) and a ports update.
    let mut server = mesh.nodes.spawn(
        &host,
        &["timeout", "120", "socat", &format!("TCP-LISTEN:{PORT},reuseaddr,fork"), "SYSTEM:echo bench"],
    )?;
    let _ = api.delete("bench-cost", &DeleteParams::default()).await;
    measure::settle(&mesh.cluster, Duration::from_secs(2), Duration::from_secs(30)).await?;
    let before = ApiCounters::read(&mesh.cluster)?;
    let started = create_service(&api, "bench-cost", &host).await?;
    loop {
        let ip = api.get("bench-cost").await?.status.and_then(|s| s.mesh_ip);
        if let Some(ip) = ip.and_then(|ip| ip.parse().ok())
            && others.iter().all(|node| reachable(&mesh, node, ip))
        {
            break;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(60), "bench-cost not reachable in 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (create_cost, create_settled) = change_cost(&mesh, &before).await?;
    let before = ApiCounters::read(&mesh.cluster)?;
    let ports = Patch::Merge(json!({"spec": {"network": {"ports": [PORT, PORT + 1]}}}));
    api.patch("bench-cost", &PatchParams::default(), &ports).await?;
    let (update_cost, update_settled) = change_cost(&mesh, &before).await?;
    api.delete("bench-cost", &DeleteParams::default()).await?;
    let _ = server.kill();
    let _ = server.wait();

    // Throughput: node 1 -> node 2, over the mesh and over the underlay, alternating. Over the
    // mesh to a service the node hosts, with the iperf3 port listed: a node's own mesh IP opens
    // only the agent's ports to peers.
    let (client, target) = (others[0].clone(), host.clone());
    let _ = api.delete("bench-iperf", &DeleteParams::default()).await;
    let spec = json!({"node": target, "network": {"type": "mesh", "ports": [IPERF_PORT]}});
    api.create(&PostParams::default(), &service("bench-iperf", spec)).await?;
    let iperf_ip = wait_mesh_ip(&api, "bench-iperf").await?;
    let (mut mesh_bps, mut veth_bps) = (Vec::new(), Vec::new());
    for _ in 0..IPERF_RUNS {
        mesh_bps.push(mesh.iperf(&target, &client, iperf_ip, IPERF_PORT, 5)?);
        veth_bps.push(mesh.iperf(&target, &client, underlay, IPERF_PORT, 5)?);
    }
    api.delete("bench-iperf", &DeleteParams::default()).await?;
    let boringtun = std::env::var_os("HOME")
        .map(|h| std::path::PathBuf::from(h).join(".cargo/bin/boringtun-cli"))
        .filter(|p| p.exists());

    // Idle agents: CPU over 10 s, and memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pids = agent_pids(&names);
    let cpu_before: Vec<Duration> =
        pids.iter().map(|(_, pid)| measure::cpu_time(*pid)).collect::<anyhow::Result<_>>()?;
    let idle_window = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let window = idle_window.elapsed().as_secs_f64();
    let mut idle_cpu = Vec::new();
    let mut idle_rss = Vec::new();
    for ((_, pid), before) in pids.iter().zip(&cpu_before) {
        let used = measure::cpu_time(*pid)?.saturating_sub(*before).as_secs_f64();
        idle_cpu.push(100.0 * used / window);
        idle_rss.push(measure::memory(*pid)?.rss_kib as f64 / 1024.0);
    }

    let worst = times.iter().copied().fold(0.0, f64::max);
    let mbit = |v: &[f64]| format!("{:.0}-{:.0} Mbit/s", percentile(v, 0.0) / 1e6, percentile(v, 100.0) / 1e6);
    let (cpu, rss) = if pids.is_empty() {
        ("n/a (not the lab)".to_owned(), "n/a".to_owned())
    } else {
        (
            format!(
                "{:.2}% of a core (mean of {}, max {:.2}%)",
                idle_cpu.iter().sum::<f64>() / idle_cpu.len() as f64,
                idle_cpu.len(),
                percentile(&idle_cpu, 100.0)
            ),
            format!("{:.1} MiB (mean of {})", idle_rss.iter().sum::<f64>() / idle_rss.len() as f64, idle_rss.len()),
        )
    };
    let rows = [
        ("MeshService create -> reachable from every node, median (20 tries)", format!("{:.2} s", median(&times))),
        (
            "MeshService create -> reachable from every node, p99 (20 tries: the worst)",
            format!("{:.2} s", percentile(&times, 99.0)),
        ),
        (
            "MeshService create -> its name answered by every node's DNS, median (20 tries)",
            format!("{:.2} s", median(&dns_times)),
        ),
        ("MeshService create -> its name answered by every node's DNS, worst (20 tries)", format!("{dns_worst:.2} s")),
        ("ping RTT over the mesh, median of 100", format!("{:.3} ms", median(&over_mesh))),
        ("ping RTT over the veth underlay, median of 100", format!("{:.3} ms", median(&over_underlay))),
        ("mesh / underlay RTT ratio", format!("{:.1}x", median(&over_mesh) / median(&over_underlay))),
        (
            "API writes per service create / update (Leases aside)",
            format!("{} / {}", create_cost.writes_without_leases(), update_cost.writes_without_leases()),
        ),
        (
            "mesh watch events per service create / update",
            format!("{} / {}", create_cost.mesh_watch_events(), update_cost.mesh_watch_events()),
        ),
        ("iperf3 over the mesh, wireguard-go (-t 5, 2 runs)", mbit(&mesh_bps)),
        (
            "iperf3 over the mesh, boringtun-cli",
            match &boringtun {
                Some(path) => format!("installed at {}, not measured by make bench", path.display()),
                None => "not available (~/.cargo/bin/boringtun-cli missing)".to_owned(),
            },
        ),
        ("iperf3 over the veth underlay (-t 5, 2 runs)", mbit(&veth_bps)),
        ("mesh / underlay throughput (wireguard-go)", format!("{:.1}%", 100.0 * median(&mesh_bps) / median(&veth_bps))),
        ("agent CPU at idle (10 s, debug build as the lab runs it)", cpu),
        ("agent RSS at idle", rss),
    ];
    println!("\n{:<80} value", "benchmark (lab, 3 nodes, userspace WireGuard)");
    for (name, value) in &rows {
        println!("{name:<80} {value}");
    }
    let json = json!({
        "converge_seconds": {"median": median(&times), "worst": worst, "tries": times},
        "dns_seconds": {"median": median(&dns_times), "worst": dns_worst, "tries": dns_times},
        "ping_ms": {"mesh_median": median(&over_mesh), "underlay_median": median(&over_underlay)},
        "converge_p99_seconds": percentile(&times, 99.0),
        "api_cost_create": cost_json(&create_cost, create_settled),
        "api_cost_update": cost_json(&update_cost, update_settled),
        "iperf3_bits_per_second": {
            "wireguard_go": mesh_bps, "underlay": veth_bps,
            "boringtun_cli": boringtun.map_or(json!("not available"), |p| json!(format!("installed at {}, not measured", p.display()))),
        },
        "agent_idle": {"cpu_percent": idle_cpu, "rss_mib": idle_rss, "window_seconds": window, "build": "debug"},
    });
    let dir = harness_mesh_e2e::repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("mesh.json"), serde_json::to_string_pretty(&json)?)?;
    Ok(())
}
