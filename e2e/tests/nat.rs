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
//! Behind two NATs (`hm-nat-1`, `hm-nat-2`, which cannot reach each other directly): they reach
//! each other through the relay (`hm-node-1`, `spec.relay: true`) within seconds of joining, each
//! holding the other's address on the relay's entry; their status (`relayedPeers`, the `Relayed`
//! condition) and `meshctl status` say so, and the open nodes stay direct; without a relay their
//! status says why they cannot meet; a member that takes a relayed peer's address is dropped,
//! directly and through the relay; the relayed traffic crosses both routers encrypted only; a
//! NAT node moving behind the other router (its underlay address changes) and back reconverges;
//! and the relayed path's RTT and throughput are measured next to a direct one.
//!
//! Runs on the lab with NAT nodes (`make e2e-nat`, part of `make test`), with
//! `HARNESS_MESH_NODES` naming open nodes and NAT nodes, e.g. `hm-node-1,hm-node-2,hm-nat-1,hm-nat-2`,
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

// ---- Two NATs: the relay -------------------------------------------------------------------

/// The lab's mesh relay (`e2e/lab/nat.sh` sets `spec.relay: true` on it with 2+ NAT nodes).
const RELAY: &str = "hm-node-1";
/// The field manager the lab designates the relay with.
const RELAY_MANAGER: &str = "harness-mesh-lab-relay";
const IPERF_PORT: u16 = 18201;

/// The suite's two NAT nodes and its open nodes; fails unless there are both, and the relay.
fn two_nats(mesh: &Mesh) -> anyhow::Result<(String, String, Vec<String>)> {
    let (natted, open): (Vec<String>, Vec<String>) = mesh.nodes.names.iter().cloned().partition(|n| is_natted(n));
    match &natted[..] {
        [a, b, ..] if open.iter().any(|o| o == RELAY) => Ok((a.clone(), b.clone(), open)),
        _ => bail!(
            "the relay tests need two NAT nodes and {RELAY} in HARNESS_MESH_NODES (make e2e-nat), got {:?}",
            mesh.nodes.names
        ),
    }
}

/// Sets (or clears) `spec.relay` on `node`, as the lab does.
async fn designate_relay(mesh: &Mesh, node: &str, relay: bool) -> anyhow::Result<()> {
    let api: Api<mesh_api::MeshNode> = Api::all(mesh.cluster.client.clone());
    let patch = json!({"apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode", "spec": {"relay": relay}});
    api.patch(node, &PatchParams::apply(RELAY_MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

/// `node`'s status: its relayed peers (peer → relay) and its `Relayed` condition
/// (status, reason, message).
async fn relay_status(
    mesh: &Mesh,
    node: &str,
) -> anyhow::Result<(BTreeMap<String, String>, Option<(String, String, String)>)> {
    let api: Api<mesh_api::MeshNode> = Api::all(mesh.cluster.client.clone());
    let status = api.get(node).await?.status.unwrap_or_default();
    let relayed = status.relayed_peers.into_iter().map(|r| (r.peer, r.via)).collect();
    let condition = status
        .conditions
        .into_iter()
        .find(|c| c.type_ == mesh_api::conditions::RELAYED)
        .map(|c| (c.status, c.reason, c.message));
    Ok((relayed, condition))
}

/// Every pair of the suite's nodes pings both ways.
fn every_pair_pings(mesh: &Mesh, ips: &BTreeMap<String, Ipv4Addr>) -> anyhow::Result<()> {
    for from in &mesh.nodes.names {
        for to in mesh.nodes.names.iter().filter(|n| *n != from) {
            ensure!(pings(mesh, from, ips[to])?, "{from} -> {to} ({}) does not answer", ips[to]);
        }
    }
    Ok(())
}

/// The public key whose entry on `node`'s device holds `ip` (`wg show ... allowed-ips`).
fn holder_of(mesh: &Mesh, node: &str, ip: Ipv4Addr) -> anyhow::Result<Option<String>> {
    let out = mesh.nodes.exec_ok(node, &["wg", "show", "wg-harness", "allowed-ips"])?;
    let cidr = format!("{ip}/32");
    Ok(out
        .lines()
        .find(|l| l.split_whitespace().skip(1).any(|c| c == cidr))
        .and_then(|l| l.split_whitespace().next().map(str::to_owned)))
}

#[tokio::test(flavor = "multi_thread")]
async fn two_natted_nodes_reach_each_other_through_the_relay_and_their_status_says_so() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let (first, second, open) = two_nats(&mesh)?;
    let info = mesh.info().await?;
    // A fresh join of the second NAT node: no agent, no device, its router's mappings gone.
    agent("stop", &second)?;
    let _ = mesh.nodes.exec(&second, &["ip", "link", "delete", "wg-harness"]);
    mesh.nodes.exec_ok(&router_of(&second), &["conntrack", "-F"])?;
    let ips = mesh_ips(&mesh).await?;
    let churn = Churn::start(&mesh).await?;
    let result = async {
        let start = Instant::now();
        agent("start", &second)?;
        eventually(Duration::from_secs(60), || every_pair_pings(&mesh, &ips)).await?;
        let took = start.elapsed();
        eprintln!("[nat] {second} joined (agent started) -> every pair pings both ways, behind two NATs: {took:.2?}");
        ensure!(took < Duration::from_secs(30), "{second} took {took:?} to reach every node, {first} included");
        // Relayed: each NAT node holds the other's address on the relay's entry.
        let relay_key = &info[RELAY].public_key;
        for (me, other) in [(&first, &second), (&second, &first)] {
            let holder = holder_of(&mesh, me, ips[other])?;
            ensure!(
                holder.as_ref() == Some(relay_key),
                "{me} holds {other}'s address {} on {holder:?}, not on the relay {RELAY} ({relay_key})",
                ips[other]
            );
        }
        // And it stays up while the directory keeps changing.
        stream(&mesh, &first, ips[&second], 10, 3)?;
        anyhow::Ok(())
    }
    .await;
    churn.stop().await?;
    result?;

    // The status says which links are relayed, and why; direct wherever it works.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut problems = Vec::new();
        for (me, other) in [(&first, &second), (&second, &first)] {
            let (relayed, condition) = relay_status(&mesh, me).await?;
            let want: BTreeMap<String, String> = [(other.clone(), RELAY.to_owned())].into();
            if relayed != want {
                problems.push(format!("{me} relays {relayed:?}, not {want:?}"));
            }
            match &condition {
                Some((status, reason, message))
                    if status == "True"
                        && reason == "NoDirectPath"
                        && message.contains(&format!("{other} via {RELAY}")) => {}
                other => problems.push(format!("{me}'s Relayed condition: {other:?}")),
            }
        }
        for node in &open {
            let (relayed, condition) = relay_status(&mesh, node).await?;
            if !relayed.is_empty() || condition.as_ref().map(|c| c.1.as_str()) != Some("AllDirect") {
                problems.push(format!("{node} (open) relays {relayed:?}, Relayed: {condition:?}"));
            }
        }
        if problems.is_empty() {
            break;
        }
        ensure!(Instant::now() < deadline, "status after 20 s: {}", problems.join("; "));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // meshctl shows it.
    let out = Command::new(harness_mesh_e2e::meshctl_binary()?)
        .args(["--kubeconfig", mesh.cluster.kubeconfig.to_str().context("kubeconfig path")?, "status"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "meshctl status: {}", String::from_utf8_lossy(&out.stderr));
    let line = format!("{first} → {second}: reachable, relayed via {RELAY}");
    ensure!(text.contains(&line), "meshctl status does not say {line:?}:\n{text}");
    eprintln!("[nat] meshctl status: {line}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_relay_two_natted_nodes_cannot_meet_and_their_status_says_why() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let (first, second, _) = two_nats(&mesh)?;
    let ips = mesh_ips(&mesh).await?;
    designate_relay(&mesh, RELAY, false).await?;
    let result = async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (relayed, condition) = relay_status(&mesh, &first).await?;
            let said = condition.as_ref().is_some_and(|(status, reason, message)| {
                status == "False" && reason == "NoRelay" && message.contains(&second) && message.contains("spec.relay")
            });
            if relayed.is_empty() && said {
                eprintln!("[nat] no relay: {first}'s Relayed condition: {:?}", condition.map(|c| c.2));
                break;
            }
            ensure!(Instant::now() < deadline, "{first} without a relay: relays {relayed:?}, Relayed {condition:?}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        ensure!(!pings(&mesh, &first, ips[&second])?, "{first} reaches {second} with no relay: no NAT in between?");
        anyhow::Ok(())
    }
    .await;
    designate_relay(&mesh, RELAY, true).await?;
    result?;
    let start = Instant::now();
    eventually(Duration::from_secs(30), || {
        ensure!(pings(&mesh, &first, ips[&second])? && pings(&mesh, &second, ips[&first])?, "not yet");
        Ok(())
    })
    .await?;
    eprintln!("[nat] relay designated -> {first} and {second} ping each other: {:.2?}", start.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_member_cannot_send_as_a_relayed_peer_directly_or_through_the_relay() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let (first, second, open) = two_nats(&mesh)?;
    let attacker = open.iter().find(|n| *n != RELAY).context("an open node other than the relay")?.clone();
    let info = mesh.info().await?;
    let ips = mesh_ips(&mesh).await?;
    let spoofed = ips[&second].to_string();
    eventually(Duration::from_secs(30), || {
        ensure!(pings(&mesh, &second, ips[&first])?, "{second} -> {first} not up yet");
        Ok(())
    })
    .await?;
    // The attacker takes the relayed peer's address, and routes the victim through the relay.
    let relay_key = &info[RELAY].public_key;
    let relay_ips = format!("{}/32,{}/32", ips[RELAY], ips[&first]);
    let attack = || -> anyhow::Result<[PingStats; 2]> {
        mesh.nodes.exec_ok(&attacker, &["ip", "addr", "add", &format!("{spoofed}/32"), "dev", "wg-harness"])?;
        let ping = |mesh: &Mesh| -> anyhow::Result<PingStats> {
            let out = mesh.nodes.exec(
                &attacker,
                &["ping", "-n", "-q", "-c", "5", "-i", "0.2", "-W", "1", "-I", &spoofed, &ips[&first].to_string()],
            )?;
            PingStats::parse(&String::from_utf8_lossy(&out.stdout))
        };
        let direct = ping(&mesh)?;
        mesh.nodes.exec_ok(&attacker, &["wg", "set", "wg-harness", "peer", relay_key, "allowed-ips", &relay_ips])?;
        let relayed = ping(&mesh)?;
        Ok([direct, relayed])
    };
    let result = attack();
    // The attacker's own agent puts its device and link back; do it now rather than at its resync.
    let _ = mesh.nodes.exec(&attacker, &["ip", "addr", "del", &format!("{spoofed}/32"), "dev", "wg-harness"]);
    agent("restart", &attacker)?;
    let [direct, relayed] = result?;
    eprintln!("[nat] {attacker} as {second} ({spoofed}) -> {first}: directly {direct:?}, through {RELAY} {relayed:?}");
    ensure!(direct.received == 0, "{first} answered {attacker} sending directly as {second}: {direct:?}");
    ensure!(relayed.received == 0, "{first} answered {attacker} sending through {RELAY} as {second}: {relayed:?}");
    // The real one still gets through.
    ensure!(pings(&mesh, &second, ips[&first])?, "{second} -> {first} after the attack");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn relayed_traffic_crosses_both_routers_encrypted_only() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let (first, second, _) = two_nats(&mesh)?;
    let ips = mesh_ips(&mesh).await?;
    eventually(Duration::from_secs(30), || {
        ensure!(pings(&mesh, &first, ips[&second])?, "{first} -> {second} not up yet");
        Ok(())
    })
    .await?;
    let secret = "hm-relay-secret!";
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let routers = [router_of(&first), router_of(&second)];
    let mut captures = Vec::new();
    for router in &routers {
        captures
            .push(mesh.nodes.spawn(router, &["timeout", "20", "tcpdump", "-i", "wan0", "-U", "-w", "-", "-s", "0"])?);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut result = Ok(());
    for (from, to) in [(&first, &second), (&second, &first)] {
        let ping = ["ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", "-p", &hex(secret), &ips[to].to_string()];
        let stats = PingStats::parse(&String::from_utf8_lossy(&mesh.nodes.exec(from, &ping)?.stdout))?;
        if stats.received != 3 {
            result = Err(anyhow::anyhow!("{from} -> {to} through the relay: {stats:?}"));
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for router in &routers {
        let _ = mesh.nodes.exec(router, &["pkill", "-INT", "-x", "tcpdump"]);
    }
    let mut pcaps = Vec::new();
    for mut capture in captures {
        let mut pcap = Vec::new();
        capture.stdout.take().context("capture stdout")?.read_to_end(&mut pcap)?;
        let _ = capture.wait();
        pcaps.push(pcap);
    }
    result?;
    for (router, pcap) in routers.iter().zip(&pcaps) {
        ensure!(pcap.len() > 24, "the capture on {router}/wan0 recorded nothing");
        ensure!(
            !pcap.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the marker sent through the relay crossed {router}/wan0 in plaintext"
        );
        let wireguard = udp_payloads(pcap, 51820);
        ensure!(!wireguard.is_empty(), "no WireGuard packet crossed {router}/wan0");
        eprintln!(
            "[nat] relayed {first} <-> {second}: {router}/wan0 saw {} WireGuard packets, no plaintext",
            wireguard.len()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_moving_to_another_nat_reconverges() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let (first, second, _) = two_nats(&mesh)?;
    let ips = mesh_ips(&mesh).await?;
    let (k, j) = (first.trim_start_matches("hm-nat-"), second.trim_start_matches("hm-nat-"));
    let lab = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new(repo_root().join("e2e/lab/lab.sh")).args(args).output()?;
        ensure!(out.status.success(), "lab.sh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    eventually(Duration::from_secs(30), || every_pair_pings(&mesh, &ips)).await?;
    let api: Api<mesh_api::MeshNode> = Api::all(mesh.cluster.client.clone());
    let endpoint = |api: Api<mesh_api::MeshNode>, name: String| async move {
        anyhow::Ok(api.get(&name).await?.status.and_then(|s| s.endpoint).unwrap_or_default())
    };
    let home = endpoint(api.clone(), first.clone()).await?;
    let mut result = Ok(());
    for (router, label) in [(j, "to the other NAT"), (k, "back home")] {
        lab(&["nat-move", k, router])?;
        let start = Instant::now();
        let moved = eventually(Duration::from_secs(60), || every_pair_pings(&mesh, &ips)).await;
        if let Err(err) = moved {
            result = Err(err.context(format!("{first} moved {label} (behind hm-natr-{router})")));
            break;
        }
        let took = start.elapsed();
        eprintln!("[nat] {first} moved {label} (behind hm-natr-{router}) -> every pair pings both ways: {took:.2?}");
        // wireguard-go keeps sending from the gone address until 15 s pass without replies,
        // unless the agent resets the peers' sources when it sees its underlay address change.
        if took > Duration::from_secs(12) {
            result = Err(anyhow::anyhow!("{first} moved {label}: every pair pings only after {took:.2?}"));
            break;
        }
        // It publishes its new underlay address.
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let now = endpoint(api.clone(), first.clone()).await?;
            if (router == k) == (now == home) {
                eprintln!("[nat] {first} publishes {now}");
                break;
            }
            ensure!(Instant::now() < deadline, "{first} behind hm-natr-{router} still publishes {now} (home: {home})");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    if result.is_err() {
        let _ = lab(&["nat-move", k, k]);
    }
    result
}

#[tokio::test(flavor = "multi_thread")]
async fn relayed_and_direct_paths_measured_side_by_side() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let (first, second, open) = two_nats(&mesh)?;
    let direct_peer = open.iter().find(|n| *n != RELAY).context("an open node other than the relay")?.clone();
    let api: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    // An iperf3 port on each target: a service on it (a node's own mesh IP opens only the agent's).
    let targets = [(second.clone(), "nat-e2e-iperf-relayed"), (direct_peer.clone(), "nat-e2e-iperf-direct")];
    let mut service_ips = Vec::new();
    for (node, name) in &targets {
        delete_service_and_wait(&api, name).await?;
        api.create(
            &PostParams::default(),
            &service(name, json!({"node": node, "network": {"type": "mesh", "ports": [IPERF_PORT]}})),
        )
        .await?;
        service_ips.push(wait_mesh_ip(&api, name).await?);
    }
    let result = async {
        let mut rows = Vec::new();
        // Alternate the two paths so that the machine's noise hits both.
        for round in 0..2 {
            for ((node, _), ip) in targets.iter().zip(&service_ips) {
                let path = if *node == second { "relayed" } else { "direct" };
                eventually(Duration::from_secs(30), || {
                    ensure!(pings(&mesh, &first, *ip)?, "{first} -> {ip} not up yet");
                    Ok(())
                })
                .await?;
                let rtt = mesh.ping(&first, *ip, 20, 0.1)?;
                ensure!(rtt.received >= 18, "{first} -> {node} ({path}): {rtt:?}");
                let bps = mesh.iperf(node, &first, *ip, IPERF_PORT, 3)?;
                eprintln!(
                    "[nat] round {round}: {first} -> {node} ({path}): ping avg {:.3} ms, iperf3 -t 3 {:.1} Mbit/s",
                    rtt.avg_ms.unwrap_or(f64::NAN),
                    bps / 1e6
                );
                rows.push((path, rtt.avg_ms.unwrap_or(f64::NAN), bps));
            }
        }
        for path in ["direct", "relayed"] {
            let (rtts, rates): (Vec<f64>, Vec<f64>) =
                rows.iter().filter(|r| r.0 == path).map(|r| (r.1, r.2 / 1e6)).unzip();
            eprintln!("[nat] {path}: ping avg {rtts:.3?} ms, iperf3 {rates:.1?} Mbit/s");
        }
        anyhow::Ok(())
    }
    .await;
    for (_, name) in &targets {
        delete_service_and_wait(&api, name).await?;
    }
    result
}

/// Fresh devices on both NAT nodes (agent stopped, `wg-harness` deleted, agent started), so that
/// no session from an earlier test is taken for a live direct path.
fn fresh_nat_devices(mesh: &Mesh, nodes: &[&String]) -> anyhow::Result<()> {
    for node in nodes {
        agent("stop", node)?;
        let _ = mesh.nodes.exec(node, &["ip", "link", "delete", "wg-harness"]);
        agent("start", node)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relayed_pair_goes_direct_once_a_direct_path_works() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let (first, second, _) = two_nats(&mesh)?;
    let ips = mesh_ips(&mesh).await?;
    let info = mesh.info().await?;
    let router = router_of(&second);
    let public = router_addr(&mesh, &router)?;
    let private = info[&second].endpoint.clone();
    eventually(Duration::from_secs(30), || {
        let holder = holder_of(&mesh, &first, ips[&second])?;
        ensure!(holder.as_ref() == Some(&info[RELAY].public_key), "{first} holds {second} on {holder:?}");
        Ok(())
    })
    .await
    .context("the pair is not relayed to begin with")?;
    // A port forward on the second router, and the node's endpoint set to it, as an
    // administrator would: now a direct path works.
    let dnat = [
        "add table ip hm_nat_e2e".to_owned(),
        "add chain ip hm_nat_e2e prerouting { type nat hook prerouting priority dstnat ; }".to_owned(),
        format!("add rule ip hm_nat_e2e prerouting iifname \"wan0\" udp dport 51820 dnat to {private}"),
    ];
    // The router's own forward chain drops what it does not accept: the rule goes there.
    let accept = format!(
        "insert rule ip hm_nat forward iifname \"wan0\" ip daddr {} udp dport 51820 accept comment \"hm-nat-e2e\"",
        private.split(':').next().unwrap_or_default()
    );
    let api: Api<mesh_api::MeshNode> = Api::all(mesh.cluster.client.clone());
    let manager = PatchParams::apply("harness-mesh-nat-e2e").force();
    let endpoint = |value: serde_json::Value| json!({"apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode", "spec": value});
    for command in &dnat {
        mesh.nodes.exec_ok(&router, &["nft", command])?;
    }
    mesh.nodes.exec_ok(&router, &["nft", &accept])?;
    api.patch(&second, &manager, &Patch::Apply(&endpoint(json!({"endpoint": format!("{public}:51820")})))).await?;
    let start = Instant::now();
    let result = async {
        // The direct retry (every 30 s) finds it; both ends go direct and say so.
        let deadline = Instant::now() + Duration::from_secs(75);
        loop {
            let holder = holder_of(&mesh, &first, ips[&second])?;
            let (relayed, condition) = relay_status(&mesh, &first).await?;
            if holder.as_ref() == Some(&info[&second].public_key) && relayed.is_empty() {
                eprintln!(
                    "[nat] a direct path to {second} opened -> {first} routes it directly: {:.2?} (Relayed: {:?})",
                    start.elapsed(),
                    condition.map(|c| c.1)
                );
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{first} still holds {second}'s address on {holder:?} and relays {relayed:?} after {:.0?}",
                start.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        eventually(Duration::from_secs(15), || {
            ensure!(pings(&mesh, &first, ips[&second])? && pings(&mesh, &second, ips[&first])?, "not both ways");
            Ok(())
        })
        .await?;
        anyhow::Ok(())
    }
    .await;
    // Undo: no port forward, the published endpoint again, fresh devices (the direct session
    // would otherwise count as live for up to 180 s), and back through the relay.
    let _ = mesh.nodes.exec(&router, &["nft", "delete", "table", "ip", "hm_nat_e2e"]);
    let rules = mesh.nodes.exec_ok(&router, &["nft", "-a", "list", "chain", "ip", "hm_nat", "forward"])?;
    for handle in rules.lines().filter(|l| l.contains("hm-nat-e2e")).filter_map(|l| l.rsplit("handle ").next()) {
        mesh.nodes.exec_ok(&router, &["nft", "delete", "rule", "ip", "hm_nat", "forward", "handle", handle.trim()])?;
    }
    api.patch(&second, &manager, &Patch::Apply(&endpoint(json!({})))).await?;
    mesh.nodes.exec_ok(&router, &["conntrack", "-F"])?;
    fresh_nat_devices(&mesh, &[&first, &second])?;
    eventually(Duration::from_secs(60), || every_pair_pings(&mesh, &ips)).await.context("after the undo")?;
    result
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_restart_loses_no_relayed_packet() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let (first, second, _) = two_nats(&mesh)?;
    let ips = mesh_ips(&mesh).await?;
    let info = mesh.info().await?;
    eventually(Duration::from_secs(30), || {
        let holder = holder_of(&mesh, &first, ips[&second])?;
        ensure!(holder.as_ref() == Some(&info[RELAY].public_key), "{first} holds {second} on {holder:?}");
        Ok(())
    })
    .await
    .context("the pair is not relayed to begin with")?;
    // 10 pps through the relay, from the node whose agent restarts, for the whole restart and
    // the relay's observation window after it.
    let pinger = mesh.start_ping(&first, ips[&second], Duration::from_secs(120))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let restart = Instant::now();
    mesh.nodes.restart_agent(&first)?;
    let took = restart.elapsed();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let losses = pinger.stop(&mesh)?;
    eprintln!(
        "[nat] {first} -> {second} (relayed): {} sent, lost {:?} while {first}'s agent restarted ({took:.2?})",
        losses.sent, losses.lost
    );
    ensure!(
        losses.lost.is_empty() && losses.last_answered + 3 >= losses.sent,
        "{first} -> {second} lost relayed packets while {first}'s agent restarted: {losses:?}"
    );
    let holder = holder_of(&mesh, &first, ips[&second])?;
    ensure!(holder.as_ref() == Some(&info[RELAY].public_key), "after the restart {first} holds {second} on {holder:?}");
    Ok(())
}
