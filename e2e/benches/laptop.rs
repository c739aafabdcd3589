//! Laptop mode, measured (`make bench-laptop`, part of `make bench`): the release `meshctl
//! forward` on the lab's laptop node (unprivileged, no tun: [`harness_mesh_e2e::laptop`]) next to
//! the agents' wireguard-go path, in one run:
//!
//! - start of `meshctl forward` → the first byte through the forward (join, handshake, connect),
//!   median of 5 starts;
//! - iperf3 throughput (`-t 5`) to the same server on hm-node-2: from the laptop through the
//!   forward (boringtun + smoltcp in meshctl) and from hm-node-1 over the mesh (its agent's
//!   wireguard-go), alternating, 3 runs each, and their ratio;
//! - meshctl's RSS after the transfers.
//!
//! The table goes to stdout and the figures to target/bench/laptop.json.

use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::Context;
use harness_mesh_e2e::controller::service;
use harness_mesh_e2e::laptop::{LAPTOP, Meshctl, fetch_local, laptop_node_up};
use harness_mesh_e2e::measure::median;
use harness_mesh_e2e::mesh::{Mesh, wait_mesh_ip};
use harness_mesh_e2e::repo_root;
use harness_mesh_e2e::users::{CONNECT_GROUP, LabUser, server_of};
use kube::api::{Api, DeleteParams, PostParams};
use mesh_api::MeshService;
use serde_json::json;

const NAME: &str = "bench-laptop";
const IPERF_PORT: u16 = 5311;
const REPLY_PORT: u16 = 5312;
const STARTS: usize = 5;
const RUNS: usize = 3;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mesh = Mesh::get(Duration::from_secs(90)).await?;
    laptop_node_up()?;
    let meshctl = repo_root().join("target/release/meshctl");
    anyhow::ensure!(meshctl.exists(), "{} is missing: cargo build --release -p meshctl", meshctl.display());
    let server = server_of(&repo_root().join(".lab/kubeconfig"))?;
    let alice = LabUser::new("alice", &[CONNECT_GROUP], &server, &repo_root().join("target/e2e-laptop"))?;
    let (node1, node2) = (mesh.nodes.names[0].clone(), mesh.nodes.names[1].clone());
    let api: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    let _ = api.delete(NAME, &DeleteParams::default()).await;
    let spec = json!({"node": node2, "network": {"type": "mesh", "ports": [IPERF_PORT, REPLY_PORT]}});
    api.create(&PostParams::default(), &service(NAME, spec)).await?;
    let ip = wait_mesh_ip(&api, NAME).await?.to_string();
    let mut servers: Vec<Child> = vec![
        mesh.nodes.spawn(&node2, &["timeout", "300", "iperf3", "-s", "-p", &IPERF_PORT.to_string()])?,
        mesh.serve_tcp(&node2, REPLY_PORT, "bench-laptop")?,
    ];
    let forward = ["forward", NAME, "25311:5311", "25312:5312", "--status-every", "0"];
    let result = async {
        let mut first_byte = Vec::new();
        for i in 0..STARTS {
            let name = format!("bench-laptop-{i}");
            let mut args = forward.to_vec();
            args.extend(["--name", &name]);
            let started = Instant::now();
            let mut member = Meshctl::start(&meshctl, &alice, &args)?;
            let deadline = started + Duration::from_secs(30);
            loop {
                if fetch_local(&mesh, 25312)?.as_deref() == Some("bench-laptop") {
                    first_byte.push(started.elapsed().as_secs_f64());
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "no byte through the forward in 30 s: {}", member.output());
                std::thread::sleep(Duration::from_millis(20));
            }
            member.signal("-TERM")?;
            member.wait(Duration::from_secs(20))?;
        }
        let mut args = forward.to_vec();
        args.extend(["--name", "bench-laptop-iperf"]);
        let mut member = Meshctl::start(&meshctl, &alice, &args)?;
        let (mut laptop_bps, mut agent_bps) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            laptop_bps.push(mesh.iperf_client(LAPTOP, "127.0.0.1", 25311, 5).context("through meshctl forward")?);
            agent_bps.push(mesh.iperf_client(&node1, &ip, IPERF_PORT, 5).context("over the agents' mesh")?);
        }
        let rss = member.rss_kib().map(|k| k as f64 / 1024.0);
        member.signal("-TERM")?;
        member.wait(Duration::from_secs(20))?;
        anyhow::Ok((first_byte, laptop_bps, agent_bps, rss))
    }
    .await;
    for server in &mut servers {
        let _ = server.kill();
        let _ = server.wait();
    }
    api.delete(NAME, &DeleteParams::default()).await?;
    let (first_byte, laptop_bps, agent_bps, rss) = result?;
    let ratio = median(&laptop_bps) / median(&agent_bps);
    let rows = [
        (
            format!("meshctl forward start -> first byte, median of {STARTS} (release, unprivileged)"),
            format!("{:.2} s", median(&first_byte)),
        ),
        (
            format!("iperf3 laptop -> {node2} through meshctl forward (boringtun + smoltcp), median of {RUNS}"),
            format!("{:.0} Mbit/s", median(&laptop_bps) / 1e6),
        ),
        (
            format!("iperf3 {node1} -> {node2} over the mesh (agents' wireguard-go), median of {RUNS}"),
            format!("{:.0} Mbit/s", median(&agent_bps) / 1e6),
        ),
        ("forward / wireguard-go throughput".to_owned(), format!("{:.2}x", ratio)),
        ("meshctl forward RSS after the transfers".to_owned(), rss.map_or("n/a".to_owned(), |r| format!("{r:.1} MiB"))),
    ];
    println!("\n{:<96} value", "benchmark (lab: laptop mode)");
    for (name, value) in &rows {
        println!("{name:<96} {value}");
    }
    let out = json!({
        "first_byte_seconds": {"median": median(&first_byte), "tries": first_byte},
        "iperf3_bits_per_second": {"forward": laptop_bps, "wireguard_go": agent_bps, "ratio_of_medians": ratio},
        "meshctl_rss_mib": rss,
    });
    let dir = repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("laptop.json"), serde_json::to_string_pretty(&out)?)?;
    Ok(())
}
