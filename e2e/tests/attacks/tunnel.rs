//! Attacks: tunnel (see tests/attacks.rs). A node is a mesh member, not a router: a peer that
//! sends through the tunnel reaches only the node's mesh IP (ICMP echo and the agent's ports)
//! and the listed ports of the services it hosts; an underlay neighbour reaches no mesh address
//! and cannot bring in a mesh source address.
//!
//! The roles, on the plain lab's three nodes: the **attacker** is node 1 acting as a rogue peer
//! ([`harness_mesh_e2e::rogue`]); the **victim** is node 2; node 3 is the **neighbour** on the underlay, or the "other
//! address" the attacker tries to reach through the victim.
//!
//! The tests share the nodes (routes, listeners, a sysctl), so they run one at a time.

use std::io::Read as _;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Context;
use harness_mesh_e2e::controller::{delete_service_and_wait, service};
use harness_mesh_e2e::mesh::{Mesh, eventually, wait_mesh_ip};
use harness_mesh_e2e::rogue::{Detour, underlay};
use kube::api::{Api, PostParams};
use mesh_api::MeshService;
use serde_json::json;

use super::SERIAL;

const CONVERGE: Duration = Duration::from_secs(90);
/// The nftables table of counters a test puts on a node, and removes.
const PROBE: &str = "attack_tunnel_probe";

/// The roles: (attacker, victim, third).
fn roles(mesh: &Mesh) -> [String; 3] {
    [0, 1, 2].map(|i| mesh.nodes.names[i].clone())
}

#[tokio::test]
async fn a_peer_gets_no_unlisted_port_on_a_node_mesh_ip_but_still_its_agent_ports() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let [attacker, victim, _] = roles(&mesh);
    let info = mesh.info().await?;
    let target = info[&victim].mesh_ip;
    let mut server = mesh.serve_tcp(&victim, 18401, "node-port")?;
    let result = async {
        // The port is served: the victim itself reaches it on its own mesh IP.
        eventually(Duration::from_secs(10), || {
            mesh.fetch(&victim, target, 18401)?.map(|_| ()).context("18401 not served")
        })
        .await?;
        let got = mesh.fetch(&attacker, target, 18401)?;
        assert_eq!(got, None, "{attacker} reached port 18401 on {victim}'s mesh IP {target}, which nobody opened");
        // What peers need stays open: ping, and the agent's DNS on the mesh IP.
        assert_eq!(mesh.ping(&attacker, target, 2, 0.2)?.received, 2, "{attacker} cannot ping {victim}'s mesh IP");
        let answer = mesh.dig(&attacker, target, &format!("{victim}.node.mesh.local"), false)?;
        assert_eq!(answer.addresses, [target], "{victim}'s DNS on its mesh IP does not answer {attacker}: {answer:?}");
        anyhow::Ok(())
    }
    .await;
    let _ = server.kill();
    let _ = server.wait();
    result
}

#[tokio::test]
async fn a_peer_cannot_reach_a_node_underlay_address_through_the_tunnel() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let [attacker, victim, _] = roles(&mesh);
    let info = mesh.info().await?;
    let target = underlay(&info, &victim)?;
    let source = info[&attacker].mesh_ip;
    let mut server = mesh.serve_tcp(&victim, 18402, "underlay-port")?;
    let result = async {
        eventually(Duration::from_secs(10), || {
            mesh.fetch(&victim, target, 18402)?.map(|_| ()).context("18402 not served")
        })
        .await?;
        let detour = Detour::new(&mesh, (&attacker, source), &info[&victim], target, "1742")?;
        let mut reached = Vec::new();
        for _ in 0..3 {
            detour.arm()?;
            if let Some(reply) = mesh.fetch_from(&attacker, Some(source), target, 18402)? {
                reached.push(reply);
            }
        }
        drop(detour);
        assert!(
            reached.is_empty(),
            "{attacker} reached {victim}'s underlay address {target}:18402 through the tunnel: {reached:?}"
        );
        anyhow::Ok(())
    }
    .await;
    let _ = server.kill();
    let _ = server.wait();
    result
}

#[tokio::test]
async fn a_peer_cannot_route_through_a_node_to_another_address() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let [attacker, victim, third] = roles(&mesh);
    let info = mesh.info().await?;
    let (target, source) = (underlay(&info, &third)?, info[&attacker].mesh_ip);
    let victim_underlay = underlay(&info, &victim)?;
    // Cluster nodes forward (pods, kube-proxy); the lab's plain nodes do not unless told to.
    let forwarding = mesh.nodes.exec_ok(&victim, &["sysctl", "-n", "net.ipv4.ip_forward"])?.trim().to_owned();
    mesh.nodes.exec_ok(&victim, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
    // What reaches the third node, counted before any rule of its own (priority -400, ahead of
    // the agent's raw-priority guard): proof that the victim forwarded it, whatever the third
    // node then does with it. (Counters, not tcpdump: every lab on the machine shares one pid
    // space, and other suites `pkill tcpdump`.)
    let counters = format!(
        "table inet {PROBE}\ndelete table inet {PROBE}\ntable inet {PROBE} {{\n  counter tunneled {{}}\n  \
         counter control {{}}\n  chain seen {{\n    type filter hook prerouting priority -400; policy accept;\n    \
         ip saddr {source} udp dport 18403 counter name tunneled\n    \
         ip saddr {victim_underlay} udp dport 18403 counter name control\n  }}\n}}\n"
    );
    let result = async {
        mesh.nodes.exec_ok(&third, &["sh", "-c", &format!("printf '%s' '{counters}' | nft -f -")])?;
        let detour = Detour::new(&mesh, (&attacker, source), &info[&victim], target, "1743")?;
        let to = format!("UDP:{target}:18403");
        // Three rounds, each with a control datagram sent straight from the victim on the underlay.
        for _ in 0..3 {
            detour.arm()?;
            mesh.nodes
                .exec_ok(&attacker, &["sh", "-c", &format!("echo via-the-tunnel | socat -u - {to},bind={source}")])?;
            mesh.nodes
                .exec_ok(&victim, &["sh", "-c", &format!("echo control | socat -u - {to},bind={victim_underlay}")])?;
        }
        drop(detour);
        let packets = |name: &str| -> anyhow::Result<u64> {
            let listed = mesh.nodes.exec_ok(&third, &["nft", "list", "counter", "inet", PROBE, name])?;
            let count = listed.split_whitespace().skip_while(|w| *w != "packets").nth(1);
            count.and_then(|n| n.parse().ok()).with_context(|| format!("no packet count in {listed:?}"))
        };
        // The control datagrams cross one bridge: they are counted at once, or were lost.
        eventually(Duration::from_secs(5), || {
            anyhow::ensure!(packets("control")? == 3, "{third} counted {} of 3 control datagrams", packets("control")?);
            Ok(())
        })
        .await?;
        let tunneled = packets("tunneled")?;
        assert_eq!(
            tunneled, 0,
            "{victim} forwarded {tunneled} of {attacker}'s 3 datagrams from the tunnel to {target} on the underlay"
        );
        anyhow::Ok(())
    }
    .await;
    let _ = mesh.nodes.exec(&third, &["nft", "delete", "table", "inet", PROBE]);
    let _ = mesh.nodes.exec(&victim, &["sysctl", "-q", "-w", &format!("net.ipv4.ip_forward={forwarding}")]);
    result
}

#[tokio::test]
async fn an_underlay_neighbour_reaches_no_mesh_only_port() -> anyhow::Result<()> {
    const NAME: &str = "attack-tunnel-mesh-only";
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let [peer, victim, neighbour] = roles(&mesh);
    let info = mesh.info().await?;
    let victim_underlay = underlay(&info, &victim)?;
    let api: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    delete_service_and_wait(&api, NAME).await?;
    let mut server = mesh.serve_tcp(&victim, 18404, "mesh-only")?;
    let mut route = None;
    let result = async {
        api.create(
            &PostParams::default(),
            &service(NAME, json!({"node": victim, "network": {"type": "mesh", "ports": [18404]}})),
        )
        .await?;
        let ip = wait_mesh_ip(&api, NAME).await?;
        // Through the tunnel, the listed port is open.
        eventually(Duration::from_secs(15), || mesh.fetch(&peer, ip, 18404)?.map(|_| ()).context("not reachable yet"))
            .await?;
        // The neighbour routes the service IP to the victim's underlay address, no tunnel.
        let host = format!("{ip}/32");
        mesh.nodes.exec_ok(
            &neighbour,
            &["ip", "route", "replace", &host, "via", &victim_underlay.to_string(), "dev", "eth0"],
        )?;
        route = Some(host);
        let got = mesh.fetch(&neighbour, ip, 18404)?;
        assert_eq!(
            got, None,
            "{neighbour} reached the mesh-only port {ip}:18404 on {victim} over the underlay, in plaintext"
        );
        anyhow::Ok(())
    }
    .await;
    if let Some(host) = route {
        let _ = mesh.nodes.exec(&neighbour, &["ip", "route", "del", &host]);
    }
    let _ = server.kill();
    let _ = server.wait();
    delete_service_and_wait(&api, NAME).await?;
    result
}

#[tokio::test]
async fn a_mesh_source_spoofed_on_the_underlay_is_dropped() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let [_, victim, neighbour] = roles(&mesh);
    let info = mesh.info().await?;
    let (victim_underlay, neighbour_underlay) = (underlay(&info, &victim)?, underlay(&info, &neighbour)?);
    // A mesh address nobody has (the top of the default subnet): the neighbour sends from it on
    // its underlay interface, as a host on the underlay could.
    let spoofed = Ipv4Addr::new(10, 42, 255, 250);
    let spoofed_cidr = format!("{spoofed}/32");
    mesh.nodes.exec_ok(&neighbour, &["ip", "addr", "add", &spoofed_cidr, "dev", "lo"])?;
    let received = async {
        let mut listener = mesh.nodes.spawn(&victim, &["timeout", "6", "socat", "-u", "UDP-RECV:18405", "-"])?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        for _ in 0..3 {
            for (source, word) in [(spoofed, "spoofed"), (neighbour_underlay, "genuine")] {
                let to = format!("UDP:{victim_underlay}:18405,bind={source}");
                mesh.nodes.exec_ok(&neighbour, &["sh", "-c", &format!("echo {word} | socat -u - {to}")])?;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut received = String::new();
        let _ = listener.wait();
        listener.stdout.take().context("listener stdout")?.read_to_string(&mut received)?;
        anyhow::Ok(received)
    }
    .await;
    let _ = mesh.nodes.exec(&neighbour, &["ip", "addr", "del", &spoofed_cidr, "dev", "lo"]);
    let received = received?;
    assert!(
        received.contains("genuine"),
        "the control datagram from {neighbour}'s underlay address did not arrive: {received:?}"
    );
    assert!(
        !received.contains("spoofed"),
        "{victim} accepted a datagram from the mesh address {spoofed} arriving on its underlay interface"
    );
    Ok(())
}
