//! The mesh end to end, on real WireGuard tunnels between real agents: every pair of nodes
//! talks over the mesh, a service's IP is open on its listed ports only, the underlay carries
//! nothing but WireGuard, a mapped port reaches its target port (which stays closed itself),
//! deleted nodes leave every peer list, an agent restart loses no
//! packet (not even to the restarted node), and a node cannot send with another node's address.
//!
//! Cluster-agnostic: on the lab by default, on any cluster described by `HARNESS_MESH_*` (see
//! `harness_mesh_e2e::nodes`). Tests run one at a time: they share the nodes.

use std::io::Read;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use harness_mesh_e2e::controller::{delete_service_and_wait, service};
use harness_mesh_e2e::mesh::{Mesh, eventually, eventually_async, wait_mesh_ip};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use mesh_api::{MeshNode, MeshService};
use serde_json::json;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CONVERGE: Duration = Duration::from_secs(90);
/// The suite's service, named for this suite alone (the kubelet suite has an `e2e-web` of its own).
const WEB: &str = "mesh-e2e-web";
/// The service whose port is mapped to another.
const MAPPED: &str = "mesh-e2e-mapped";
/// The service the spoofing test sends to.
const SPOOF_TARGET: &str = "mesh-e2e-spoof-target";

#[tokio::test]
async fn every_pair_of_nodes_pings_over_the_mesh() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let info = mesh.info().await?;
    for from in &mesh.nodes.names {
        for (to, node) in &info {
            if from == to {
                continue;
            }
            let stats = mesh.ping(from, node.mesh_ip, 3, 0.2)?;
            assert_eq!(stats.received, 3, "{from} -> {to} ({}) over the mesh: {stats:?}", node.mesh_ip);
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_service_is_reachable_from_every_node_on_its_listed_ports_only() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let [first, host, third] = [0, 1, 2].map(|i| mesh.nodes.names[i].clone());
    let api: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    delete_service_and_wait(&api, WEB).await?;
    let mut listed = mesh.serve_tcp(&host, 18000, "listed")?;
    let mut unlisted = mesh.serve_tcp(&host, 18001, "unlisted")?;
    let result = async {
        api.create(
            &PostParams::default(),
            &service(WEB, json!({"node": host, "network": {"type": "mesh", "ports": [18000]}})),
        )
        .await?;
        let ip = wait_mesh_ip(&api, WEB).await?;
        // The unlisted port is served: the host itself reaches it on its own underlay address.
        let underlay = mesh.info().await?[&host].endpoint.split(':').next().unwrap_or_default().parse()?;
        eventually(Duration::from_secs(10), || {
            mesh.fetch(&host, underlay, 18001)?.filter(|t| t == "unlisted").map(|_| ()).context("18001 not served")
        })
        .await?;
        for client in [&first, &third] {
            let took = eventually(Duration::from_secs(30), || {
                let got = mesh.fetch(client, ip, 18000)?;
                if got.as_deref() == Some("listed") { Ok(()) } else { bail!("{client} got {got:?} from {ip}:18000") }
            })
            .await?;
            eprintln!("{client} reached {WEB} at {ip}:18000 after {took:?}");
            assert_eq!(mesh.fetch(client, ip, 18001)?, None, "{client} reached the unlisted port 18001 on {ip}");
        }
        anyhow::Ok(())
    }
    .await;
    let _ = listed.kill();
    let _ = unlisted.kill();
    let _ = listed.wait();
    let _ = unlisted.wait();
    delete_service_and_wait(&api, WEB).await?;
    result
}

#[tokio::test]
async fn a_mapped_port_reaches_its_target_port_which_stays_closed_itself() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let [first, host, third] = [0, 1, 2].map(|i| mesh.nodes.names[i].clone());
    let api: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    delete_service_and_wait(&api, MAPPED).await?;
    // The process listens on 18002; the mesh IP offers 18003, mapped to it.
    let mut process = mesh.serve_tcp(&host, 18002, "target")?;
    let result = async {
        let network = json!({"type": "mesh", "ports": [18003], "targetPorts": [{"port": 18003, "targetPort": 18002}]});
        api.create(&PostParams::default(), &service(MAPPED, json!({"node": host, "network": network}))).await?;
        let ip = wait_mesh_ip(&api, MAPPED).await?;
        for client in [&first, &third] {
            let took = eventually(Duration::from_secs(30), || {
                let got = mesh.fetch(client, ip, 18003)?;
                if got.as_deref() == Some("target") { Ok(()) } else { bail!("{client} got {got:?} from {ip}:18003") }
            })
            .await?;
            eprintln!("{client} reached {MAPPED} at {ip}:18003 (-> 18002) after {took:?}");
            assert_eq!(mesh.fetch(client, ip, 18002)?, None, "{client} reached the target port 18002 on {ip} itself");
        }
        anyhow::Ok(())
    }
    .await;
    let _ = process.kill();
    let _ = process.wait();
    delete_service_and_wait(&api, MAPPED).await?;
    result
}

#[tokio::test]
async fn the_underlay_carries_only_wireguard() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let info = mesh.info().await?;
    let [sender, receiver] = [0, 2].map(|i| mesh.nodes.names[i].clone());
    let target = &info[&receiver];
    let underlay_ip = target.endpoint.split(':').next().unwrap_or_default().to_owned();
    let interface = std::env::var("HARNESS_MESH_UNDERLAY_INTERFACE").unwrap_or_else(|_| "eth0".into());
    // Capture everything on the sender's underlay interface, as pcap on stdout.
    let mut capture =
        mesh.nodes.spawn(&sender, &["timeout", "20", "tcpdump", "-i", &interface, "-U", "-w", "-", "-s", "0"])?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let secret = "harness-mesh-marker-over-the-mesh";
    let plain = "harness-mesh-marker-in-the-clear";
    for _ in 0..5 {
        mesh.nodes.exec_ok(&sender, &["sh", "-c", &format!("echo {secret} | socat -u - UDP:{}:9", target.mesh_ip)])?;
        mesh.nodes.exec_ok(&sender, &["sh", "-c", &format!("echo {plain} | socat -u - UDP:{underlay_ip}:9")])?;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = mesh.nodes.exec(&sender, &["pkill", "-INT", "-x", "tcpdump"]);
    let mut pcap = Vec::new();
    capture.stdout.take().context("capture stdout")?.read_to_end(&mut pcap)?;
    let _ = capture.wait();
    let contains = |needle: &str| pcap.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(pcap.len() > 24, "the capture on {sender}/{interface} recorded nothing");
    assert!(contains(plain), "the capture missed the marker sent in the clear: it cannot prove anything");
    assert!(!contains(secret), "the marker sent over the mesh crossed the underlay in plaintext");
    Ok(())
}

#[tokio::test]
async fn a_deleted_node_disappears_from_every_peer_list() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let api: Api<MeshNode> = Api::all(mesh.cluster.client.clone());
    let name = "e2e-departing";
    let _ = api.delete(name, &DeleteParams::default()).await;
    // A node that joins (its "agent" here is the test, publishing a key) and then leaves.
    let key = mesh_wireguard::PrivateKey::generate()?.public_key().to_base64();
    let node: MeshNode = serde_json::from_value(json!({
        "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode",
        "metadata": {"name": name}, "spec": {"endpoint": "192.168.77.250:51820"},
    }))?;
    api.create(&PostParams::default(), &node).await?;
    let status = json!({"apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode", "status": {"publicKey": key}});
    api.patch_status(name, &PatchParams::apply("e2e-fake-agent").force(), &Patch::Apply(&status)).await?;
    let joined = eventually(Duration::from_secs(30), || {
        for node in &mesh.nodes.names {
            if !mesh.wg_peers(node)?.contains(&key) {
                bail!("{node} does not have the new peer yet");
            }
        }
        Ok(())
    })
    .await?;
    api.delete(name, &DeleteParams::default()).await?;
    let left = eventually(Duration::from_secs(30), || {
        for node in &mesh.nodes.names {
            if mesh.wg_peers(node)?.contains(&key) {
                bail!("{node} still has the deleted node as a peer");
            }
        }
        Ok(())
    })
    .await?;
    eprintln!("a new node reached every peer list in {joined:?}; its deletion in {left:?}");
    Ok(())
}

#[tokio::test]
async fn an_agent_restart_keeps_key_and_ip_and_loses_no_packet() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let [first, restarted, third] = [0, 1, 2].map(|i| mesh.nodes.names[i].clone());
    let before = mesh.info().await?;
    // 10 pings a second through the restarted node (to its own mesh IP), and between the two
    // nodes whose agents keep running, for the whole restart and 2 s after it.
    let through = mesh.start_ping(&first, before[&restarted].mesh_ip, Duration::from_secs(120))?;
    let beside = mesh.start_ping(&first, before[&third].mesh_ip, Duration::from_secs(120))?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let restart = Instant::now();
    mesh.nodes.restart_agent(&restarted)?;
    let took = restart.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (pinger, what) in
        [(through, format!("{first} -> {restarted} (restarted)")), (beside, format!("{first} -> {third}"))]
    {
        let losses = pinger.stop(&mesh)?;
        eprintln!(
            "{what}: {} sent, lost {:?} while {restarted}'s agent restarted ({took:?})",
            losses.sent, losses.lost
        );
        assert!(
            losses.lost.is_empty() && losses.last_answered + 3 >= losses.sent,
            "{what} lost packets while {restarted}'s agent restarted ({took:?}): {losses:?}"
        );
    }
    mesh.wait_connected(CONVERGE).await?;
    let after = mesh.info().await?;
    assert_eq!(after[&restarted].public_key, before[&restarted].public_key, "the restart changed the key");
    assert_eq!(after[&restarted].mesh_ip, before[&restarted].mesh_ip, "the restart changed the mesh IP");
    Ok(())
}

#[tokio::test]
async fn a_node_cannot_send_with_another_nodes_mesh_ip() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let info = mesh.info().await?;
    let [spoofer, victim, receiver] = [0, 1, 2].map(|i| mesh.nodes.names[i].clone());
    let (own, stolen) = (info[&spoofer].mesh_ip, info[&victim].mesh_ip);
    // The datagrams go to a service the receiver hosts, on its listed port: a node's own mesh IP
    // opens only the agent's ports to peers (a node is a member, not a router).
    let api: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    delete_service_and_wait(&api, SPOOF_TARGET).await?;
    api.create(
        &PostParams::default(),
        &service(SPOOF_TARGET, json!({"node": receiver, "network": {"type": "mesh", "ports": [19999]}})),
    )
    .await?;
    let target = wait_mesh_ip(&api, SPOOF_TARGET).await?;
    // The spoofer takes the victim's address as its own (on lo), so the kernel lets it send from
    // it: only WireGuard on the receiving side stands in the way.
    let stolen_cidr = format!("{stolen}/32");
    mesh.nodes.exec_ok(&spoofer, &["ip", "addr", "add", &stolen_cidr, "dev", "lo"])?;
    let sent = async {
        // The receiver hosts the service IP once its agent has applied the placement.
        eventually(Duration::from_secs(15), || {
            let route = mesh.nodes.exec_ok(&receiver, &["ip", "-4", "-o", "addr", "show", "dev", "wg-harness"])?;
            anyhow::ensure!(route.contains(&format!("{target}/32")), "{receiver} does not host {target} yet");
            Ok(())
        })
        .await?;
        let mut listener = mesh
            .nodes
            .spawn(&receiver, &["timeout", "6", "socat", "-u", &format!("UDP-RECV:19999,bind={target}"), "-"])?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        for _ in 0..3 {
            for (source, word) in [(stolen, "spoofed"), (own, "genuine")] {
                mesh.nodes.exec_ok(
                    &spoofer,
                    &["sh", "-c", &format!("echo {word} | socat -u - UDP:{target}:19999,bind={source}")],
                )?;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut received = String::new();
        let _ = listener.wait();
        listener.stdout.take().context("listener stdout")?.read_to_string(&mut received)?;
        anyhow::Ok(received)
    }
    .await;
    mesh.nodes.exec_ok(&spoofer, &["ip", "addr", "del", &stolen_cidr, "dev", "lo"])?;
    delete_service_and_wait(&api, SPOOF_TARGET).await?;
    let received = sent?;
    assert!(received.contains("genuine"), "the control datagram from {spoofer}'s own IP did not arrive: {received:?}");
    assert!(!received.contains("spoofed"), "a datagram with {victim}'s IP as source, sent by {spoofer}, was delivered");
    Ok(())
}

#[tokio::test]
async fn a_wiped_state_dir_rotates_the_key_and_the_peers_follow() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let [first, rotated] = [0, 2].map(|i| mesh.nodes.names[i].clone());
    let before = mesh.info().await?;
    let old_key = before[&rotated].public_key.clone();
    // The node loses its identity (state dir wiped) while its device keeps running.
    let key_file = format!("{}/private.key", mesh.nodes.state_dir(&rotated));
    mesh.nodes.exec_ok(&rotated, &["rm", "-f", &key_file])?;
    mesh.nodes.restart_agent(&rotated)?;
    let started = Instant::now();
    let nodes_api: Api<MeshNode> = Api::all(mesh.cluster.client.clone());
    let took = eventually_async(Duration::from_secs(60), || async {
        // The key the restarted agent published.
        let new_key = nodes_api.get(&rotated).await?.status.and_then(|s| s.public_key);
        let new_key = new_key.filter(|k| *k != old_key).with_context(|| format!("{rotated} has no new key yet"))?;
        for node in &mesh.nodes.names {
            if node == &rotated {
                continue;
            }
            // Only the rotated node's keys are looked at: the device may have other peers (nodes
            // this suite did not make).
            let peers = mesh.wg_peers(node)?;
            if peers.contains(&old_key) {
                bail!("{node} still has the old key of {rotated}");
            }
            if !peers.contains(&new_key) {
                bail!("{node} does not have the new key of {rotated} yet");
            }
        }
        let stats = mesh.ping(&first, before[&rotated].mesh_ip, 1, 0.2)?;
        if stats.received == 1 { Ok(started.elapsed()) } else { bail!("{first} gets no answer from {rotated} yet") }
    })
    .await?;
    let after = mesh.info().await?;
    assert_ne!(after[&rotated].public_key, old_key, "the agent kept the old key although its key file was gone");
    assert_eq!(after[&rotated].mesh_ip, before[&rotated].mesh_ip, "the node's mesh IP changed with its key");
    eprintln!("{rotated}'s new key reached every peer and traffic resumed {took:?} after the restart");
    mesh.wait_connected(CONVERGE).await?;
    Ok(())
}
