//! Side by side with a peer (`make bench-peers`, issue 22), in one lab run. So far the laptop
//! row: `meshctl forward` (boringtun + smoltcp in meshctl) against onetun 0.3 (boringtun +
//! smoltcp too, the anchor the issue names), both unprivileged on the lab's laptop node,
//! forwarding the same mesh service on hm-node-2, alternating:
//!
//! - start → the first byte through the forward, median and worst of the tries. meshctl joins
//!   the mesh on every start (its MeshNode, its mesh IP, the agents adding it); onetun's peer is
//!   registered once beforehand, by hand, as onetun has no way to join (a MeshNode with its
//!   public key, whose mesh IP the controller allocates), so its figure is a connect only;
//! - iperf3 `-t 5` through each forward to the same server.
//!
//! innernet is not measured yet. The table goes to stdout, the rows to target/bench/peers.json
//! (`{"figure", "ours", "peer", "ratio"}`).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use harness_mesh_e2e::controller::service;
use harness_mesh_e2e::laptop::{LAPTOP, Meshctl, as_user, fetch_local, laptop_node_up};
use harness_mesh_e2e::measure::median;
use harness_mesh_e2e::mesh::{Mesh, wait_mesh_ip};
use harness_mesh_e2e::repo_root;
use harness_mesh_e2e::users::{CONNECT_GROUP, LabUser, server_of};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use mesh_api::{MeshNode, MeshNodeSpec, MeshService};
use serde_json::json;

const NAME: &str = "bench-peers";
/// onetun's MeshNode.
const ONETUN: &str = "bench-peers-onetun";
const IPERF_PORT: u16 = 5321;
const REPLY_PORT: u16 = 5322;
const TRIES: usize = 10;
const RUNS: usize = 3;

fn worst(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NAN, f64::max)
}

/// Waits until 127.0.0.1:`port` on the laptop answers `reply`; the time since `started`.
fn first_byte(mesh: &Mesh, port: u16, started: Instant, what: &str) -> anyhow::Result<f64> {
    let deadline = started + Duration::from_secs(30);
    loop {
        if fetch_local(mesh, port)?.as_deref() == Some(NAME) {
            return Ok(started.elapsed().as_secs_f64());
        }
        anyhow::ensure!(Instant::now() < deadline, "no byte through {what} in 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A WireGuard key pair from `wg genkey` / `wg pubkey`: (private, public), base64.
fn keypair() -> anyhow::Result<(String, String)> {
    let private = Command::new("wg").arg("genkey").output().context("wg genkey (install wireguard-tools)")?;
    let private = String::from_utf8(private.stdout)?.trim().to_owned();
    let mut pubkey = Command::new("wg").arg("pubkey").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    use std::io::Write as _;
    pubkey.stdin.take().context("wg pubkey stdin")?.write_all(private.as_bytes())?;
    let public = String::from_utf8(pubkey.wait_with_output()?.stdout)?.trim().to_owned();
    Ok((private, public))
}

/// The pinned onetun, installed by `make bench-peers`.
fn onetun_binary() -> anyhow::Result<String> {
    let path = std::env::var("ONETUN").context("ONETUN names the onetun binary (make bench-peers installs it)")?;
    anyhow::ensure!(std::path::Path::new(&path).exists(), "{path} is missing: make bench-peers installs it");
    Ok(path)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let onetun = onetun_binary()?;
    let mesh = Mesh::get(Duration::from_secs(90)).await?;
    laptop_node_up()?;
    let meshctl = repo_root().join("target/release/meshctl");
    anyhow::ensure!(meshctl.exists(), "{} is missing: cargo build --release -p meshctl", meshctl.display());
    let server = server_of(&repo_root().join(".lab/kubeconfig"))?;
    let alice = LabUser::new("alice", &[CONNECT_GROUP], &server, &repo_root().join("target/e2e-laptop"))?;
    let node2 = mesh.nodes.names[1].clone();
    let info = mesh.info().await?;
    let services: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    let nodes: Api<MeshNode> = Api::all(mesh.cluster.client.clone());
    let _ = services.delete(NAME, &DeleteParams::default()).await;
    let _ = nodes.delete(ONETUN, &DeleteParams::default()).await;
    let spec = json!({"node": node2, "network": {"type": "mesh", "ports": [IPERF_PORT, REPLY_PORT]}});
    services.create(&PostParams::default(), &service(NAME, spec)).await?;
    let ip = wait_mesh_ip(&services, NAME).await?.to_string();

    // onetun's peer: a MeshNode with its public key, as an administrator registers one.
    let (private, public) = keypair()?;
    nodes.create(&PostParams::default(), &MeshNode::new(ONETUN, MeshNodeSpec::default())).await?;
    let status =
        json!({"apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode", "status": {"publicKey": public}});
    nodes.patch_status(ONETUN, &PatchParams::apply("harness-mesh-bench").force(), &Patch::Apply(&status)).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let onetun_ip = loop {
        let node = nodes.get(ONETUN).await?;
        if let Some(status) = node.status.filter(|s| s.peer.is_some())
            && let Some(ip) = status.mesh_ip
        {
            break ip;
        }
        anyhow::ensure!(Instant::now() < deadline, "mesh-controller gave {ONETUN} no mesh IP and peer entry in 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let endpoint = info[&node2].endpoint.clone();
    let node2_key = info[&node2].public_key.clone();
    let onetun_args: Vec<String> = vec![
        onetun.clone(),
        format!("127.0.0.1:25421:{ip}:{IPERF_PORT}"),
        format!("127.0.0.1:25422:{ip}:{REPLY_PORT}"),
        "--endpoint-addr".into(),
        endpoint,
        "--endpoint-public-key".into(),
        node2_key,
        "--private-key".into(),
        private,
        "--source-peer-ip".into(),
        onetun_ip,
        "--keep-alive".into(),
        "10".into(),
        "--log".into(),
        "warn".into(),
    ];
    let start_onetun = || -> anyhow::Result<Child> {
        let args: Vec<&str> = onetun_args.iter().map(String::as_str).collect();
        Ok(as_user(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?)
    };
    let stop = |mut child: Child| {
        let _ = Command::new("pkill").args(["-INT", "-f", "onetun 127.0.0.1:25421"]).status();
        let _ = child.kill();
        let _ = child.wait();
    };
    let mut servers: Vec<Child> = vec![
        mesh.nodes.spawn(&node2, &["timeout", "600", "iperf3", "-s", "-p", &IPERF_PORT.to_string()])?,
        mesh.serve_tcp(&node2, REPLY_PORT, NAME)?,
    ];
    let forward = ["forward", NAME, "25411:5321", "25412:5322", "--status-every", "0"];
    let result = async {
        let (mut ours_start, mut peer_start) = (Vec::new(), Vec::new());
        for i in 0..TRIES {
            let name = format!("bench-peers-{i}");
            let mut args = forward.to_vec();
            args.extend(["--name", &name]);
            let started = Instant::now();
            let mut member = Meshctl::start(&meshctl, &alice, &args)?;
            ours_start.push(first_byte(&mesh, 25412, started, "meshctl forward").with_context(|| member.output())?);
            member.signal("-TERM")?;
            member.wait(Duration::from_secs(20))?;

            let started = Instant::now();
            let child = start_onetun()?;
            let took = first_byte(&mesh, 25422, started, "onetun");
            stop(child);
            peer_start.push(took?);
        }
        let mut args = forward.to_vec();
        args.extend(["--name", "bench-peers-iperf"]);
        let mut member = Meshctl::start(&meshctl, &alice, &args)?;
        let child = start_onetun()?;
        first_byte(&mesh, 25412, Instant::now(), "meshctl forward")?;
        first_byte(&mesh, 25422, Instant::now(), "onetun")?;
        let (mut ours_bps, mut peer_bps) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            ours_bps.push(mesh.iperf_client(LAPTOP, "127.0.0.1", 25411, 5).context("through meshctl forward")?);
            peer_bps.push(mesh.iperf_client(LAPTOP, "127.0.0.1", 25421, 5).context("through onetun")?);
        }
        stop(child);
        member.signal("-TERM")?;
        member.wait(Duration::from_secs(20))?;
        anyhow::Ok((ours_start, peer_start, ours_bps, peer_bps))
    }
    .await;
    for server in &mut servers {
        let _ = server.kill();
        let _ = server.wait();
    }
    services.delete(NAME, &DeleteParams::default()).await?;
    nodes.delete(ONETUN, &DeleteParams::default()).await?;
    let (ours_start, peer_start, ours_bps, peer_bps) = result?;

    let mbit = |bps: &[f64]| median(bps) / 1e6;
    let rows = [
        (
            format!("laptop: start -> first byte, median of {TRIES} (meshctl joins; onetun's peer pre-registered)"),
            median(&ours_start),
            median(&peer_start),
            "s",
            "lower",
        ),
        (
            format!("laptop: start -> first byte, worst of {TRIES}"),
            worst(&ours_start),
            worst(&peer_start),
            "s",
            "lower",
        ),
        (
            format!("laptop: iperf3 -t 5 through the forward, median of {RUNS}"),
            mbit(&ours_bps),
            mbit(&peer_bps),
            "Mbit/s",
            "higher",
        ),
    ];
    println!(
        "\n{:<100} {:>14} {:>14} {:>8}  better",
        "benchmark (lab: harness-mesh / onetun 0.3)", "ours", "peer", "ratio"
    );
    let mut json_rows = Vec::new();
    for (figure, ours, peer, unit, better) in &rows {
        let ratio = ours / peer;
        let (ours_text, peer_text) = (format!("{ours:.2} {unit}"), format!("{peer:.2} {unit}"));
        println!("{figure:<100} {ours_text:>14} {peer_text:>14} {ratio:>7.2}x  {better}");
        json_rows.push(
            json!({"figure": figure, "ours": ours, "peer": peer, "unit": unit, "ratio": ratio, "better": better}),
        );
    }
    let out = json!({
        "peer": "onetun 0.3.10",
        "rows": json_rows,
        "tries": {"start_seconds": {"ours": ours_start, "peer": peer_start},
                  "iperf3_bits_per_second": {"ours": ours_bps, "peer": peer_bps}},
    });
    let dir = repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("peers.json"), serde_json::to_string_pretty(&out)?)?;
    Ok(())
}
