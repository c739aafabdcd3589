//! Attacks: pod_network (see tests/attacks.rs). Kubelet lab only: a rogue peer
//! ([`harness_mesh_e2e::rogue`]) sends through a cluster node to what the node forwards to —
//! a pod IP, a NodePort — and gets nothing: from the tunnel a node forwards only the DNAT of a
//! service it hosts, on its listed ports.
//!
//! A ClusterIP cannot be attacked this way from a lab node: the attacker's own kube-proxy
//! DNATs it to the pod in its output chain, before the detour's routing, so such a test would
//! measure the attacker's pod network, not the victim (it "succeeded" with and without the fix).
//!
//! The target is the lab's CoreDNS (a pod on the pod network of `hm-node-1`, behind the ClusterIP
//! of `kube-dns`), so no test pod is needed: the **victim** is `hm-node-1`, the **attacker**
//! `hm-node-2`. Each test first shows that the target answers the victim itself.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Context;
use harness_mesh_e2e::mesh::{Mesh, eventually, eventually_async};
use harness_mesh_e2e::rogue::{Detour, underlay};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

use super::SERIAL;

const CONVERGE: Duration = Duration::from_secs(90);
/// The node that runs CoreDNS in the kubelet lab.
const VICTIM: &str = "hm-node-1";
const ATTACKER: &str = "hm-node-2";
/// The NodePort Service this suite makes in front of CoreDNS.
const NODE_PORT: &str = "attack-pod-network-node-port";

/// `attacker` (from its mesh IP) tries TCP to `ip:port` three times through a detour via the
/// victim; `victim` itself shows first that `ip:port` answers. Returns how many tries connected.
async fn through_the_victim(mesh: &Mesh, target: Ipv4Addr, port: u16, table: &'static str) -> anyhow::Result<usize> {
    let info = mesh.info().await?;
    let (source, victim_underlay) = (info[ATTACKER].mesh_ip, underlay(&info, VICTIM)?);
    eventually(Duration::from_secs(20), || {
        anyhow::ensure!(
            mesh.connects_from(VICTIM, victim_underlay, target, port)?,
            "{target}:{port} does not answer {VICTIM}"
        );
        Ok(())
    })
    .await?;
    let detour = Detour::new(mesh, (ATTACKER, source), &info[VICTIM], target, table)?;
    let mut connected = 0;
    for _ in 0..3 {
        detour.arm()?;
        connected += usize::from(mesh.connects_from(ATTACKER, source, target, port)?);
    }
    Ok(connected)
}

/// The CoreDNS pod's IP (on `VICTIM`'s pod network).
async fn coredns_pod_ip(mesh: &Mesh) -> anyhow::Result<Ipv4Addr> {
    let pods: Api<Pod> = Api::namespaced(mesh.cluster.client.clone(), "kube-system");
    let list = pods.list(&ListParams::default().labels("k8s-app=kube-dns")).await?;
    let pod = list.items.iter().find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(VICTIM));
    let ip = pod.and_then(|p| p.status.as_ref()?.pod_ip.clone());
    ip.with_context(|| format!("no CoreDNS pod with an IP on {VICTIM}"))?.parse().context("CoreDNS pod IP")
}

#[tokio::test]
async fn a_rogue_peer_reaches_no_pod_ip_through_a_node() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get_kubelet(CONVERGE).await?;
    let pod_ip = coredns_pod_ip(&mesh).await?;
    let connected = through_the_victim(&mesh, pod_ip, 53, "1751").await?;
    assert_eq!(connected, 0, "{ATTACKER} connected {connected} of 3 times through {VICTIM} to the pod IP {pod_ip}:53");
    Ok(())
}

#[tokio::test]
async fn a_rogue_peer_reaches_no_node_port_through_a_node() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get_kubelet(CONVERGE).await?;
    let services: Api<Service> = Api::namespaced(mesh.cluster.client.clone(), "kube-system");
    let _ = services.delete(NODE_PORT, &DeleteParams::default()).await;
    eventually_async(Duration::from_secs(30), || async {
        anyhow::ensure!(services.get_opt(NODE_PORT).await?.is_none(), "the old {NODE_PORT} still exists");
        Ok(())
    })
    .await?;
    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": NODE_PORT, "namespace": "kube-system"},
        "spec": {"type": "NodePort", "selector": {"k8s-app": "kube-dns"},
                 "ports": [{"name": "dns-tcp", "protocol": "TCP", "port": 53, "targetPort": 53}]},
    }))?;
    let created = services.create(&PostParams::default(), &service).await?;
    let result = async {
        let node_port = created
            .spec
            .and_then(|s| s.ports?.first()?.node_port)
            .and_then(|p| u16::try_from(p).ok())
            .context("no nodePort allocated")?;
        let info = mesh.info().await?;
        // Straight at the victim's mesh IP, as any peer can send (no detour needed)...
        let (source, victim_ip) = (info[ATTACKER].mesh_ip, info[VICTIM].mesh_ip);
        let mut direct = 0;
        for _ in 0..3 {
            direct += usize::from(mesh.connects_from(ATTACKER, source, victim_ip, node_port)?);
        }
        // ...and at its node address through the tunnel.
        let node_ip = underlay(&info, VICTIM)?;
        let detoured = through_the_victim(&mesh, node_ip, node_port, "1753").await?;
        assert_eq!(
            (direct, detoured),
            (0, 0),
            "{ATTACKER} connected through the tunnel to the NodePort {node_port} of {VICTIM}: {direct} of 3 times at \
             its mesh IP {victim_ip}, {detoured} of 3 at its node address {node_ip}"
        );
        anyhow::Ok(())
    }
    .await;
    services.delete(NODE_PORT, &DeleteParams::default()).await?;
    result
}
