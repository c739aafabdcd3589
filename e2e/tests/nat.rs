//! A node behind a NAT: the lab's NAT nodes (`e2e/lab/lab.sh up --nat-nodes K`) sit behind a
//! router namespace of their own that masquerades them (nftables, conntrack: nothing gets in but
//! replies). Such a node publishes its private address, which no other node can reach; its
//! packets arrive from the router's address, which WireGuard learns by roaming. What must hold:
//! the NATed node and the open nodes ping each other both ways within seconds of it joining; a
//! service on it is reached by mesh IP; the open nodes keep the learned endpoint across agent
//! syncs (they do not put back the unreachable private one); when the router forgets its mapping
//! (`conntrack -F`) the link comes back by itself through the keepalives; and the router's
//! underlay carries nothing but WireGuard.
//!
//! Runs on the lab with NAT nodes (`make e2e-nat`, part of `make test`), with
//! `HARNESS_MESH_NODES` naming open nodes and NAT nodes, e.g. `hm-node-1,hm-node-2,hm-nat-1`,
//! and `HARNESS_MESH_NODE_EXEC` running commands through `lab.sh exec` (which also runs them
//! on a router, `hm-natr-K`).

use std::collections::BTreeMap;
use std::io::Read;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use harness_mesh_e2e::controller::{delete_service_and_wait, service};
use harness_mesh_e2e::mesh::{Mesh, PingStats, eventually, udp_payloads, wait_mesh_ip};
use harness_mesh_e2e::repo_root;
use kube::api::{Api, Patch, PatchParams, PostParams};
use mesh_api::MeshService;
use serde_json::json;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const CONVERGE: Duration = Duration::from_secs(120);
/// The keepalive the lab's NAT nodes ask for (`e2e/lab/nat.sh`).
const KEEPALIVE: Duration = Duration::from_secs(25);
const WEB: &str = "nat-e2e-web";
/// The service whose annotation [`Churn`] keeps changing.
const CHURN: &str = "nat-e2e-churn";

/// A busy directory: an annotation of the MeshService `nat-e2e-churn` (placed nowhere) changes
/// every 300 ms, so every agent syncs its device several times a second, as in a cluster where
/// services come and go. A sync must not undo what WireGuard learned by roaming. Stops (and
/// deletes the service) on [`Churn::stop`]; aborted on drop.
struct Churn {
    task: tokio::task::JoinHandle<()>,
    api: Api<MeshService>,
}

impl Churn {
    async fn start(mesh: &Mesh) -> anyhow::Result<Self> {
        let api: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
        delete_service_and_wait(&api, CHURN).await?;
        api.create(&PostParams::default(), &service(CHURN, json!({"node": "nowhere", "network": {"ports": [80]}})))
            .await?;
        let patcher = api.clone();
        let task = tokio::spawn(async move {
            // Bounded: 10 minutes at most, whatever the test does.
            for n in 0..2000u32 {
                let patch = json!({"metadata": {"annotations": {"e2e.harness.dev/churn": n.to_string()}}});
                let _ = patcher.patch(CHURN, &PatchParams::default(), &Patch::Merge(&patch)).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        Ok(Self { task, api })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.task.abort();
        delete_service_and_wait(&self.api, CHURN).await
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Pings `to` from `from` ten times a second for `seconds`; fails when more than `lost` went
/// unanswered.
fn stream(mesh: &Mesh, from: &str, to: Ipv4Addr, seconds: u32, lost: u32) -> anyhow::Result<()> {
    let count = (seconds * 10).to_string();
    let out = mesh.nodes.exec(from, &["ping", "-n", "-q", "-i", "0.1", "-W", "1", "-c", &count, &to.to_string()])?;
    let stats = PingStats::parse(&String::from_utf8_lossy(&out.stdout))?;
    eprintln!("[nat] {from} -> {to} at 10 pps for {seconds} s: {stats:?}");
    ensure!(stats.sent - stats.received <= lost, "{from} -> {to}: {stats:?}, more than {lost} lost");
    Ok(())
}

fn is_natted(node: &str) -> bool {
    node.starts_with("hm-nat-")
}

/// The suite's nodes: (the first NAT node, the open nodes); fails unless there are both.
fn kinds(mesh: &Mesh) -> anyhow::Result<(String, Vec<String>)> {
    let (natted, open): (Vec<String>, Vec<String>) = mesh.nodes.names.iter().cloned().partition(|n| is_natted(n));
    match natted.first() {
        Some(first) if !open.is_empty() => Ok((first.clone(), open)),
        _ => bail!(
            "the NAT suite needs NAT nodes and open nodes in HARNESS_MESH_NODES (make e2e-nat), got {:?}",
            mesh.nodes.names
        ),
    }
}

/// The router in front of NAT node `hm-nat-K`: `hm-natr-K`.
fn router_of(node: &str) -> String {
    node.replacen("hm-nat-", "hm-natr-", 1)
}

/// The router's address on the lab bridge (its `wan0`).
fn router_addr(mesh: &Mesh, router: &str) -> anyhow::Result<Ipv4Addr> {
    let out = mesh.nodes.exec_ok(router, &["ip", "-4", "-o", "addr", "show", "dev", "wan0"])?;
    let cidr = out.split_whitespace().skip_while(|w| *w != "inet").nth(1).with_context(|| out.clone())?;
    Ok(cidr.split('/').next().unwrap_or_default().parse()?)
}

/// One ping from `from` to `to`, answered within 1 s.
fn pings(mesh: &Mesh, from: &str, to: Ipv4Addr) -> anyhow::Result<bool> {
    Ok(mesh.ping(from, to, 1, 0.2)?.received == 1)
}

/// `lab.sh agent ACTION NODE`.
fn agent(action: &str, node: &str) -> anyhow::Result<()> {
    let out = Command::new(repo_root().join("e2e/lab/lab.sh")).args(["agent", action, node]).output()?;
    ensure!(out.status.success(), "lab.sh agent {action} {node}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// The endpoint `node`'s device has for the peer with public key `key` (`wg show ... endpoints`).
fn endpoint_of(mesh: &Mesh, node: &str, key: &str) -> anyhow::Result<String> {
    let out = mesh.nodes.exec_ok(node, &["wg", "show", "wg-harness", "endpoints"])?;
    out.lines()
        .find_map(|l| l.strip_prefix(key).map(|rest| rest.trim().to_owned()))
        .with_context(|| format!("{node} has no peer {key}: {out}"))
}

/// Every open node and the NATed node ping each other, each direction, the open side first.
fn all_pairs_ping(mesh: &Mesh, ips: &BTreeMap<String, Ipv4Addr>, natted: &str, open: &[String]) -> anyhow::Result<()> {
    let nat_ip = ips[natted];
    for other in open {
        let ip = ips[other];
        ensure!(pings(mesh, other, nat_ip)?, "{other} -> {natted} ({nat_ip}) does not answer");
        ensure!(pings(mesh, natted, ip)?, "{natted} -> {other} ({ip}) does not answer");
    }
    Ok(())
}

/// Every suite node's mesh IP.
async fn mesh_ips(mesh: &Mesh) -> anyhow::Result<BTreeMap<String, Ipv4Addr>> {
    let ips: BTreeMap<_, _> = mesh.info().await?.into_iter().map(|(name, info)| (name, info.mesh_ip)).collect();
    for name in &mesh.nodes.names {
        ensure!(ips.contains_key(name), "{name} has no mesh IP");
    }
    Ok(ips)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_natted_node_and_the_open_nodes_ping_each_other_within_seconds_of_joining() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let (natted, open) = kinds(&mesh)?;
    // A fresh join: no agent, no device, and a router that has forgotten every mapping.
    agent("stop", &natted)?;
    let _ = mesh.nodes.exec(&natted, &["ip", "link", "delete", "wg-harness"]);
    mesh.nodes.exec_ok(&router_of(&natted), &["conntrack", "-F"])?;
    let ips = mesh_ips(&mesh).await?;
    let churn = Churn::start(&mesh).await?;
    let result = async {
        let start = Instant::now();
        agent("start", &natted)?;
        eventually(Duration::from_secs(60), || all_pairs_ping(&mesh, &ips, &natted, &open)).await?;
        let took = start.elapsed();
        eprintln!("[nat] {natted} joined (agent started) -> every pair pings both ways: {took:.2?}");
        ensure!(took < Duration::from_secs(30), "{natted} took {took:?} to become reachable both ways");
        // And it stays so while the directory keeps changing: the open side sends, the NATed side
        // only answers.
        for other in &open {
            stream(&mesh, other, ips[&natted], 10, 3)?;
        }
        Ok(())
    }
    .await;
    churn.stop().await?;
    result
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_on_the_natted_node_is_reached_from_the_open_nodes() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let (natted, open) = kinds(&mesh)?;
    let api: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    delete_service_and_wait(&api, WEB).await?;
    let mut server = mesh.serve_tcp(&natted, 18080, "behind-nat")?;
    let churn = Churn::start(&mesh).await?;
    let result = async {
        api.create(
            &PostParams::default(),
            &service(WEB, json!({"node": natted, "network": {"type": "mesh", "ports": [18080]}})),
        )
        .await?;
        let ip = wait_mesh_ip(&api, WEB).await?;
        for client in &open {
            let took = eventually(Duration::from_secs(30), || {
                let got = mesh.fetch(client, ip, 18080)?;
                if got.as_deref() == Some("behind-nat") {
                    Ok(())
                } else {
                    bail!("{client} got {got:?} from {ip}:18080")
                }
            })
            .await?;
            eprintln!("[nat] {client} reached {WEB} on {natted} at {ip}:18080 after {took:.2?}");
            // And again and again, while the directory keeps changing.
            for n in 0..10 {
                let got = mesh.fetch(client, ip, 18080)?;
                ensure!(got.as_deref() == Some("behind-nat"), "{client}'s fetch {n} after the first: {got:?}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        anyhow::Ok(())
    }
    .await;
    churn.stop().await?;
    let _ = server.kill();
    let _ = server.wait();
    delete_service_and_wait(&api, WEB).await?;
    result
}

#[tokio::test(flavor = "multi_thread")]
async fn the_open_nodes_keep_the_learned_endpoint_across_resyncs() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let (natted, open) = kinds(&mesh)?;
    let router = router_addr(&mesh, &router_of(&natted))?;
    let info = mesh.info().await?;
    let key = info[&natted].public_key.clone();
    let private = info[&natted].endpoint.clone();
    eprintln!("[nat] {natted} publishes {private}; its router is {router}");
    // A session first, from the NATed side.
    for other in &open {
        eventually(Duration::from_secs(30), || {
            ensure!(pings(&mesh, &natted, info[other].mesh_ip)?, "no answer");
            Ok(())
        })
        .await?;
    }
    // 35 s: across the agents' 30 s resync and whatever the directory changes meanwhile.
    let start = Instant::now();
    let mut samples = 0;
    while start.elapsed() < Duration::from_secs(35) {
        for other in &open {
            let endpoint = endpoint_of(&mesh, other, &key)?;
            ensure!(
                endpoint.starts_with(&format!("{router}:")),
                "after {:.1?} {other} sends to {natted} at {endpoint}, not at its router {router} (published: {private})",
                start.elapsed()
            );
            samples += 1;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The open side starts the traffic now: it must still get through.
    for other in &open {
        ensure!(pings(&mesh, other, info[&natted].mesh_ip)?, "{other} -> {natted} after 35 s");
    }
    eprintln!("[nat] {samples} samples over 35 s: the open nodes kept {router}:* for {natted}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_link_comes_back_by_itself_when_the_nat_forgets_its_mapping() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let (natted, open) = kinds(&mesh)?;
    let ips = mesh_ips(&mesh).await?;
    let nat_ip = ips[&natted];
    eventually(Duration::from_secs(30), || all_pairs_ping(&mesh, &ips, &natted, &open)).await?;
    let other = &open[0];
    mesh.nodes.exec_ok(&router_of(&natted), &["conntrack", "-F"])?;
    let start = Instant::now();
    // Only the open side sends: what brings the mapping back is the NATed side's own doing.
    let bound = KEEPALIVE + Duration::from_secs(15);
    eventually(bound, || {
        ensure!(pings(&mesh, other, nat_ip)?, "{other} -> {natted}: no answer");
        Ok(())
    })
    .await
    .with_context(|| format!("{other} -> {natted} after conntrack -F"))?;
    let took = start.elapsed();
    eprintln!("[nat] conntrack -F on {} -> {other} reaches {natted} again: {took:.2?}", router_of(&natted));
    // Back for good, while the directory keeps changing.
    let churn = Churn::start(&mesh).await?;
    let result = stream(&mesh, other, nat_ip, 10, 3);
    churn.stop().await?;
    result
}

#[tokio::test(flavor = "multi_thread")]
async fn the_routers_underlay_carries_only_wireguard() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let (natted, open) = kinds(&mesh)?;
    let router = router_of(&natted);
    let router_ip = router_addr(&mesh, &router)?;
    let info = mesh.info().await?;
    let other = &open[0];
    let nat_ip = info[&natted].mesh_ip;
    // 16 bytes each, as ping -p repeats them through the payload.
    let secret = "hm-nat-over-mesh";
    let plain = "hm-nat-the-clear";
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let mut capture =
        mesh.nodes.spawn(&router, &["timeout", "25", "tcpdump", "-i", "wan0", "-U", "-w", "-", "-s", "0"])?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let churn = Churn::start(&mesh).await?;
    let result = async {
        // Both ways over the mesh, every ping answered, the open side first.
        for (from, to) in [(other.as_str(), nat_ip), (natted.as_str(), info[other].mesh_ip)] {
            let ping = ["ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", "-p", &hex(secret), &to.to_string()];
            let out = mesh.nodes.exec(from, &ping)?;
            let stats = PingStats::parse(&String::from_utf8_lossy(&out.stdout))?;
            ensure!(stats.received == 3, "{from} -> {to} over the mesh: {stats:?}");
        }
        // In the clear to the router itself: the capture sees it (it is dropped after).
        let ping = ["ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "1", "-p", &hex(plain), &router_ip.to_string()];
        let _ = mesh.nodes.exec(other, &ping);
        anyhow::Ok(())
    }
    .await;
    churn.stop().await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = mesh.nodes.exec(&router, &["pkill", "-INT", "-x", "tcpdump"]);
    let mut pcap = Vec::new();
    capture.stdout.take().context("capture stdout")?.read_to_end(&mut pcap)?;
    let _ = capture.wait();
    result?;
    let contains = |needle: &str| pcap.windows(needle.len()).any(|w| w == needle.as_bytes());
    ensure!(pcap.len() > 24, "the capture on {router}/wan0 recorded nothing");
    ensure!(contains(plain), "the capture missed the marker sent in the clear: it cannot prove anything");
    ensure!(!contains(secret), "the marker sent over the mesh crossed {router}'s underlay in plaintext");
    // The tunnel's packets crossed it, from the router's address (masqueraded).
    let wireguard = udp_payloads(&pcap, 51820);
    ensure!(!wireguard.is_empty(), "no WireGuard packet crossed {router}/wan0");
    eprintln!("[nat] {router}/wan0: {} WireGuard packets, no plaintext", wireguard.len());
    Ok(())
}
