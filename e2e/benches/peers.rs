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
use harness_mesh_e2e::innernet::{self, Innernet};
use harness_mesh_e2e::lab_sh;
use harness_mesh_e2e::laptop::{LAPTOP, Meshctl, as_user, fetch_local, laptop_node_up};
use harness_mesh_e2e::measure::{cpu_time, median, memory, percentile};
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

/// The directory of the pinned innernet and innernet-server, installed by `make bench-peers`.
fn innernet_bin() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::var("INNERNET_BIN")
        .context("INNERNET_BIN names innernet's bin directory (make bench-peers installs it)")?;
    let dir = std::path::PathBuf::from(dir);
    for binary in ["innernet", "innernet-server"] {
        anyhow::ensure!(
            dir.join(binary).exists(),
            "{} is missing: make bench-peers installs it",
            dir.join(binary).display()
        );
    }
    Ok(dir)
}

/// The pinned onetun, installed by `make bench-peers`.
fn onetun_binary() -> anyhow::Result<String> {
    let path = std::env::var("ONETUN").context("ONETUN names the onetun binary (make bench-peers installs it)")?;
    anyhow::ensure!(std::path::Path::new(&path).exists(), "{path} is missing: make bench-peers installs it");
    Ok(path)
}

/// The laptop rows: meshctl forward against onetun, and their tries.
async fn onetun_rows() -> anyhow::Result<(Vec<Row>, serde_json::Value)> {
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
    let onetun_row = |figure: String, ours: f64, peer: f64, unit, better| Row {
        figure,
        ours,
        peer,
        unit,
        better,
        peer_name: "onetun 0.3.10",
    };
    let rows = vec![
        onetun_row(
            format!("laptop: start -> first byte, median of {TRIES} (meshctl joins; onetun's peer pre-registered)"),
            median(&ours_start),
            median(&peer_start),
            "s",
            "lower",
        ),
        onetun_row(
            format!("laptop: start -> first byte, worst of {TRIES}"),
            worst(&ours_start),
            worst(&peer_start),
            "s",
            "lower",
        ),
        onetun_row(
            format!("laptop: iperf3 -t 5 through the forward, median of {RUNS}"),
            mbit(&ours_bps),
            mbit(&peer_bps),
            "Mbit/s",
            "higher",
        ),
    ];
    let tries = json!({"start_seconds": {"ours": ours_start, "peer": peer_start},
                       "iperf3_bits_per_second": {"ours": ours_bps, "peer": peer_bps}});
    Ok((rows, tries))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Which peers (PEERS, default "onetun innernet").
    let peers = std::env::var("PEERS").unwrap_or_else(|_| "onetun innernet".into());
    let (mut rows, tries) =
        if peers.split_whitespace().any(|p| p == "onetun") { onetun_rows().await? } else { (Vec::new(), json!({})) };

    // innernet, at each lab size (PEERS_SIZES, default "3 20"), at its shortest fetch interval
    // (1 s, PEERS_TRIES tries, default 10) and its default one (60 s, PEERS_DEFAULT_TRIES tries,
    // default 3: each try waits for fetches that come a minute apart).
    let innernet_bin = innernet_bin();
    let env_count =
        |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(default);
    let sizes: Vec<usize> = std::env::var("PEERS_SIZES")
        .unwrap_or_else(|_| "3 20".into())
        .split_whitespace()
        .map(|s| s.parse().context("PEERS_SIZES: node counts"))
        .collect::<anyhow::Result<_>>()?;
    let intervals = [(1, env_count("PEERS_TRIES", TRIES)), (60, env_count("PEERS_DEFAULT_TRIES", 3))];
    for (k, size) in sizes.iter().copied().enumerate().filter(|_| peers.split_whitespace().any(|p| p == "innernet")) {
        let innernet_bin = innernet_bin.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        anyhow::ensure!(size >= 3, "PEERS_SIZES: at least 3 nodes (a server, a member, a joiner)");
        eprintln!("[bench-peers] innernet beside the mesh on {size} lab nodes");
        let mesh = Mesh::get_nodes(size, Duration::from_secs(180)).await?;
        if let Ok(agent) = std::env::var("HM_AGENT_BIN") {
            // The agents as users run them: the release build (lab.sh runs $HM_AGENT_BIN).
            eprintln!("[bench-peers] restarting the {size} agents with {agent}");
            for node in &mesh.nodes.names {
                lab_sh(&["agent", "restart", node])?;
            }
            mesh.wait_connected(Duration::from_secs(180)).await?;
        }
        // The default interval only at the first size: each try takes minutes.
        let at = if k == 0 { &intervals[..] } else { &intervals[..1] };
        rows.extend(innernet_rows(&mesh, innernet_bin, at, k == 0).await?);
    }

    println!("\n{:<150} {:>14} {:>14} {:>8}  better", "benchmark (lab: harness-mesh / peer)", "ours", "peer", "ratio");
    let mut json_rows = Vec::new();
    for row in &rows {
        let ratio = row.ours / row.peer;
        let (ours_text, peer_text) = (format!("{:.2} {}", row.ours, row.unit), format!("{:.2} {}", row.peer, row.unit));
        let figure = format!("{} [{}]", row.figure, row.peer_name);
        println!("{figure:<150} {ours_text:>14} {peer_text:>14} {ratio:>7.2}x  {}", row.better);
        json_rows.push(json!({"figure": row.figure, "peer_name": row.peer_name, "ours": row.ours, "peer": row.peer,
            "unit": row.unit, "ratio": ratio, "better": row.better}));
    }
    let out = json!({
        "peers": ["onetun 0.3.10", "innernet 2.0.0"],
        "rows": json_rows,
        "laptop_tries": tries,
    });
    let dir = repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("peers.json"), serde_json::to_string_pretty(&out)?)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// innernet 2.0: the same lab nodes, both meshes up at once, tries alternating.

/// One row of the table.
struct Row {
    figure: String,
    ours: f64,
    peer: f64,
    unit: &'static str,
    better: &'static str,
    peer_name: &'static str,
}

/// Runs `check` on every node of `nodes` at once, each retrying until it holds; returns the
/// seconds from `t0` until the last one held (error after `limit`).
fn all_hold(
    what: &str,
    nodes: &[String],
    t0: Instant,
    limit: Duration,
    check: &(dyn Fn(&str) -> bool + Sync),
) -> anyhow::Result<f64> {
    let results: Vec<anyhow::Result<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|node| {
                scope.spawn(move || {
                    loop {
                        if check(node) {
                            return Ok(t0.elapsed().as_secs_f64());
                        }
                        anyhow::ensure!(t0.elapsed() < limit, "{node}: {what}: not after {limit:?}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a check panicked")))).collect()
    });
    let mut last: f64 = 0.0;
    for result in results {
        last = last.max(result?);
    }
    Ok(last)
}

fn pings(mesh: &Mesh, node: &str, ip: &str) -> bool {
    mesh.nodes.exec(node, &["ping", "-c", "1", "-W", "0.3", ip]).is_ok_and(|o| o.status.success())
}

fn resolves(mesh: &Mesh, node: &str, name: &str) -> bool {
    mesh.nodes.exec(node, &["getent", "hosts", name]).is_ok_and(|o| o.status.success())
}

/// The lab agent's pid on `node`.
fn agent_pid(node: &str) -> anyhow::Result<u32> {
    let path = repo_root().join(format!(".lab/pids/mesh-agent-{node}.pid"));
    Ok(std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?.trim().parse()?)
}

fn lab_pid(name: &str) -> anyhow::Result<u32> {
    let path = repo_root().join(format!(".lab/pids/{name}.pid"));
    Ok(std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?.trim().parse()?)
}

/// CPU (% of one core) and RSS (MiB, summed) of `pids` over `window`.
fn idle(pids: &[u32], window: Duration) -> anyhow::Result<(f64, f64)> {
    let before: Vec<Duration> = pids.iter().map(|p| cpu_time(*p)).collect::<anyhow::Result<_>>()?;
    std::thread::sleep(window);
    let mut cpu = Duration::ZERO;
    let mut rss = 0.0;
    for (pid, before) in pids.iter().zip(before) {
        cpu += cpu_time(*pid)?.saturating_sub(before);
        rss += memory(*pid)?.rss_kib as f64 / 1024.0;
    }
    Ok((100.0 * cpu.as_secs_f64() / window.as_secs_f64(), rss))
}

/// Our side of a join: the MeshNode applied (as `lab.sh up` does) and the agent started with a
/// new key; returns (seconds until every other node pings its mesh IP, its public key).
async fn ours_join(
    mesh: &Mesh,
    nodes: &Api<MeshNode>,
    joiner: &str,
    others: &[String],
) -> anyhow::Result<(f64, String)> {
    let apply = json!({"apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode", "metadata": {"name": joiner}, "spec": {}});
    let t0 = Instant::now();
    nodes.patch(joiner, &PatchParams::apply("harness-mesh-lab"), &Patch::Apply(&apply)).await?;
    lab_sh(&["agent", "start", joiner])?;
    let ip = loop {
        if let Some(ip) = nodes.get(joiner).await?.status.and_then(|s| s.mesh_ip) {
            break ip;
        }
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(60), "{joiner} got no mesh IP");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = all_hold(&format!("pings {ip}"), others, t0, Duration::from_secs(90), &|node| pings(mesh, node, &ip))?;
    let key = mesh.nodes.exec_ok(joiner, &["wg", "show", "wg-harness", "public-key"])?.trim().to_owned();
    Ok((took, key))
}

/// Our side of a removal: the agent stopped (untimed: the machine is gone), then the MeshNode
/// deleted; returns the seconds until no other node has its key.
async fn ours_leave(
    mesh: &Mesh,
    nodes: &Api<MeshNode>,
    joiner: &str,
    key: &str,
    others: &[String],
) -> anyhow::Result<f64> {
    lab_sh(&["agent", "stop", joiner])?;
    let t0 = Instant::now();
    nodes.delete(joiner, &DeleteParams::default()).await?;
    let took = all_hold(&format!("{joiner}'s key gone"), others, t0, Duration::from_secs(90), &|node| {
        mesh.wg_peers(node).is_ok_and(|peers| !peers.iter().any(|p| p == key))
    })?;
    // The next join is a new machine: a new key.
    let _ = std::fs::remove_file(repo_root().join(format!(".lab/nodes/{joiner}/private.key")));
    Ok(took)
}

/// innernet's rows at the lab's current size: join, removal and names at each interval in
/// `intervals` ((seconds, tries)), idle cost at the first, and RTT and throughput.
async fn innernet_rows(
    mesh: &Mesh,
    bin: &std::path::Path,
    intervals: &[(u64, usize)],
    link: bool,
) -> anyhow::Result<Vec<Row>> {
    let n = mesh.nodes.names.len();
    let names = mesh.nodes.names.clone();
    let (server_node, joiner) = (names[0].clone(), names[n - 1].clone());
    let others: Vec<String> = names[..n - 1].to_vec();
    let members: Vec<String> = names[1..n - 1].to_vec();
    let mut net = Innernet::new(mesh.nodes.clone(), bin.to_path_buf(), &server_node);
    let nodes: Api<MeshNode> = Api::all(mesh.cluster.client.clone());
    let services: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    let (first_interval, _) = intervals[0];
    let member_peers: Vec<(String, String)> = members.iter().map(|n| (format!("m-{n}"), n.clone())).collect();
    let created = net.create(&member_peers, first_interval);
    let result = async {
        let addresses: std::collections::BTreeMap<String, std::net::Ipv4Addr> =
            members.iter().cloned().zip(created?).collect();
        // Our joiner starts as a new machine: no agent, no MeshNode, no key.
        let key = mesh.nodes.exec_ok(&joiner, &["wg", "show", "wg-harness", "public-key"])?.trim().to_owned();
        ours_leave(mesh, &nodes, &joiner, &key, &others).await?;
        let mut rows = Vec::new();
        let mut ours_names = Vec::new();
        for (round, (interval, tries)) in intervals.iter().copied().enumerate().filter(|(_, (_, t))| *t > 0) {
            for node in &members {
                net.start(&format!("m-{node}"), node, interval)?;
            }
            let (mut ours_join_s, mut ours_leave_s, mut peer_join_s, mut peer_leave_s, mut peer_names) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for i in 0..tries {
                let (took, key) = ours_join(mesh, &nodes, &joiner, &others).await?;
                ours_join_s.push(took);
                ours_leave_s.push(ours_leave(mesh, &nodes, &joiner, &key, &others).await?);

                let peer = format!("j{round}-{i}");
                let t0 = Instant::now();
                let ip = net.join(&peer, &joiner, interval)?.to_string();
                let host = format!("{peer}.{}.wg", innernet::NETWORK);
                let limit = Duration::from_secs(3 * interval + 60);
                peer_join_s.push(all_hold(&format!("pings {ip}"), &others, t0, limit, &|node| pings(mesh, node, &ip))?);
                peer_names.push(all_hold(&format!("resolves {host}"), &others, t0, limit, &|node| {
                    resolves(mesh, node, &host)
                })?);
                let key = net.public_key(&joiner)?;
                net.stop(&peer);
                let t0 = Instant::now();
                net.disable(&peer)?;
                // The server keeps a disabled peer on its own interface (seen in this lab: still
                // there minutes later), so only the clients' devices are waited for.
                peer_leave_s.push(all_hold(&format!("{peer}'s key gone"), &members, t0, limit, &|node| {
                    net.peers(node).is_ok_and(|peers| !peers.contains(&key))
                })?);
                net.leave(&peer, &joiner)?;

                if round == 0 {
                    // Our names: a new MeshService resolving on every node.
                    let name = format!("bench-peers-name-{i}");
                    let _ = services.delete(&name, &DeleteParams::default()).await;
                    let spec = json!({"node": names[1], "network": {"type": "mesh", "ports": [80]}});
                    let t0 = Instant::now();
                    services.create(&PostParams::default(), &service(&name, spec)).await?;
                    let fqdn = loop {
                        if let Some(dns) = services.get(&name).await?.status.and_then(|s| s.dns_name) {
                            break dns;
                        }
                        anyhow::ensure!(t0.elapsed() < Duration::from_secs(60), "{name} got no dnsName");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    };
                    ours_names.push(all_hold(&format!("resolves {fqdn}"), &others, t0, Duration::from_secs(60), &|node| {
                        resolves(mesh, node, &fqdn)
                    })?);
                    services.delete(&name, &DeleteParams::default()).await?;
                }
                eprintln!(
                    "[bench-peers] {n} nodes, innernet interval {interval} s, try {i}: join {:.2} / {:.2} s, removal {:.2} / {:.2} s",
                    ours_join_s[i], peer_join_s[i], ours_leave_s[i], peer_leave_s[i]
                );
            }
            let at = format!("{n} nodes, innernet --interval {interval} s{}", if interval == 60 { " (its default)" } else { " (its shortest)" });
            for (what, ours, peer) in [
                ("a node joins -> reachable from every other node", &ours_join_s, &peer_join_s),
                (
                    "a node is removed -> gone from every other device (innernet: every client's; its server keeps disabled peers)",
                    &ours_leave_s,
                    &peer_leave_s,
                ),
            ] {
                for (stat, p) in [("median", 50.0), ("p99", 99.0)] {
                    rows.push(Row {
                        figure: format!("{what}, {stat} of {tries} ({at})"),
                        ours: percentile(ours, p),
                        peer: percentile(peer, p),
                        unit: "s",
                        better: "lower",
                        peer_name: "innernet 2.0.0",
                    });
                }
            }
            for (stat, p) in [("median", 50.0), ("p99", 99.0)] {
                rows.push(Row {
                    figure: format!(
                        "a new name resolves on every node, {stat} ({at}; ours: a new MeshService in every other node's hosts block, {} tries; innernet: the joining peer in its hosts file, {tries} tries)",
                        ours_names.len()
                    ),
                    ours: percentile(&ours_names, p),
                    peer: percentile(&peer_names, p),
                    unit: "s",
                    better: "lower",
                    peer_name: "innernet 2.0.0",
                });
            }
            if round == 0 {
                // Idle: the agent of the second node against the innernet daemon there; the control
                // side against innernet-server. wireguard-go is left out on both sides.
                let window = Duration::from_secs(20);
                let member = &members[0];
                let (ours_cpu, ours_rss) = idle(&[agent_pid(member)?], window)?;
                let (peer_cpu, peer_rss) = idle(&[net.daemon_pid(&format!("m-{member}"))?], window)?;
                let control = [lab_pid("mesh-controller")?, lab_pid("kube-apiserver")?, lab_pid("etcd")?];
                let (ours_ctl_cpu, ours_ctl_rss) = idle(&control, window)?;
                let (peer_ctl_cpu, peer_ctl_rss) = idle(&[net.server_pid()?], window)?;
                let idle_rows = [
                    ("idle CPU of one node's daemon (mesh-agent / innernet up --daemon; not wireguard-go)", ours_cpu, peer_cpu, "% core"),
                    ("idle RSS of one node's daemon (mesh-agent / innernet up --daemon; not wireguard-go)", ours_rss, peer_rss, "MiB"),
                    ("idle CPU of the control side (mesh-controller + kube-apiserver + etcd / innernet-server)", ours_ctl_cpu, peer_ctl_cpu, "% core"),
                    ("idle RSS of the control side (mesh-controller + kube-apiserver + etcd / innernet-server)", ours_ctl_rss, peer_ctl_rss, "MiB"),
                ];
                for (what, ours, peer, unit) in idle_rows {
                    rows.push(Row {
                        figure: format!("{what}, over {} s ({at})", window.as_secs()),
                        ours,
                        peer,
                        unit,
                        better: "lower",
                        peer_name: "innernet 2.0.0",
                    });
                }
            }
        }
        // Ours back as it was.
        ours_join(mesh, &nodes, &joiner, &others).await?;

        if link {
            // The same two nodes over each mesh: ping RTT and iperf3 throughput, alternating
            // (two members, or with 3 nodes the member and the server's node, 10.99.0.1).
            let (a, b) = if members.len() >= 2 { (&members[0], &members[1]) } else { (&members[0], &server_node) };
            // Ours: a service on b's own process (a node's own mesh IP opens only the agent's
            // ports); innernet filters no port, so b's innernet address.
            let link_service = "bench-peers-link";
            let _ = services.delete(link_service, &DeleteParams::default()).await;
            let spec = json!({"node": b, "network": {"type": "mesh", "ports": [5331]}});
            services.create(&PostParams::default(), &service(link_service, spec)).await?;
            let ours_ip = wait_mesh_ip(&services, link_service).await?;
            let peer_ip = addresses.get(b).copied().unwrap_or(std::net::Ipv4Addr::new(10, 99, 0, 1));
            let (mut ours_rtt, mut peer_rtt, mut ours_bps, mut peer_bps) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let ours_text = ours_ip.to_string();
            all_hold(&format!("pings {ours_ip}"), std::slice::from_ref(a), Instant::now(), Duration::from_secs(60), &|node| {
                pings(mesh, node, &ours_text)
            })?;
            let mut server = mesh.nodes.spawn(b, &["timeout", "600", "iperf3", "-s", "-p", "5331"])?;
            for _ in 0..TRIES {
                ours_rtt.push(mesh.ping(a, ours_ip, 20, 0.05)?.avg_ms.context("no reply over the mesh")?);
                peer_rtt.push(mesh.ping(a, peer_ip, 20, 0.05)?.avg_ms.context("no reply over innernet")?);
            }
            for _ in 0..RUNS {
                ours_bps.push(mesh.iperf_client(a, &ours_ip.to_string(), 5331, 3)?);
                peer_bps.push(mesh.iperf_client(a, &peer_ip.to_string(), 5331, 3)?);
            }
            let _ = server.kill();
            let _ = server.wait();
            services.delete(link_service, &DeleteParams::default()).await?;
            rows.push(Row {
                figure: format!("ping RTT {a} -> {b}, median of {TRIES} x 20 pings (both wireguard-go, MTU 1420)"),
                ours: median(&ours_rtt),
                peer: median(&peer_rtt),
                unit: "ms",
                better: "lower",
                peer_name: "innernet 2.0.0",
            });
            rows.push(Row {
                figure: format!("iperf3 -t 3 {a} -> {b}, median of {RUNS} (both wireguard-go, MTU 1420)"),
                ours: median(&ours_bps) / 1e6,
                peer: median(&peer_bps) / 1e6,
                unit: "Mbit/s",
                better: "higher",
                peer_name: "innernet 2.0.0",
            });
        }
        anyhow::Ok(rows)
    }
    .await;
    if result.is_err() && std::env::var_os("PEERS_KEEP_INNERNET").is_some() {
        eprintln!("[bench-peers] PEERS_KEEP_INNERNET: innernet's state stays in .lab/innernet");
    } else {
        net.teardown();
    }
    if result.is_err() {
        // Leave the lab's joiner as it was, whatever failed.
        let apply = json!({"apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode", "metadata": {"name": joiner}, "spec": {}});
        let _ = nodes.patch(&joiner, &PatchParams::apply("harness-mesh-lab"), &Patch::Apply(&apply)).await;
        let _ = lab_sh(&["agent", "start", &joiner]);
    }
    result
}
