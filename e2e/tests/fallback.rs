//! A node that cannot run WireGuard (the lab starts `hm-node-4` without /dev/net/tun) lands in
//! fallback: it stays in the directory with backend `none` and says why, no other node degrades,
//! and its service is advertised (DNS) and reachable at its host address.
//!
//! Lab only: it needs a node started without a tun device.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use harness_mesh_e2e::controller::service;
use harness_mesh_e2e::mesh::Mesh;
use harness_mesh_e2e::repo_root;
use kube::api::{Api, DeleteParams, PostParams};
use mesh_api::conditions::{CONNECTED, READY};
use mesh_api::{Backend, MeshNode, MeshService};
use serde_json::json;

const FALLBACK: &str = "hm-node-4";

#[tokio::test]
async fn a_node_without_tun_falls_back_and_its_service_stays_reachable() -> anyhow::Result<()> {
    anyhow::ensure!(
        std::env::var_os("HARNESS_MESH_NODES").is_none(),
        "this test needs the lab (a node without /dev/net/tun); unset HARNESS_MESH_NODES"
    );
    let mesh = Mesh::get(Duration::from_secs(90)).await?;
    let root = repo_root();
    let out = std::process::Command::new(root.join("e2e/lab/lab.sh"))
        .args(["up", "--nodes", "4", "--without-tun", "4"])
        .current_dir(&root)
        .output()?;
    anyhow::ensure!(out.status.success(), "lab.sh up --without-tun 4: {}", String::from_utf8_lossy(&out.stderr));

    let nodes: Api<MeshNode> = Api::all(mesh.cluster.client.clone());
    let start = Instant::now();
    let status = loop {
        let status = nodes.get_opt(FALLBACK).await?.and_then(|n| n.status).unwrap_or_default();
        let condition = |t: &str| status.conditions.iter().find(|c| c.type_ == t).map(|c| c.reason.clone());
        if status.backend == Some(Backend::None)
            && condition(CONNECTED).as_deref() == Some("NoTunnel")
            && condition(READY).as_deref() == Some("NoTunnel")
        {
            break status;
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("{FALLBACK} did not report the fallback: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let connected = status.conditions.iter().find(|c| c.type_ == CONNECTED).context("Connected")?;
    assert!(connected.message.contains("/dev/net/tun"), "the reason does not say what is missing: {connected:?}");
    assert_eq!(status.public_key, None, "a node out of the tunnel must not publish a key");
    assert_eq!(status.peer, None, "a node out of the tunnel must get no peer entry");
    let underlay: Ipv4Addr =
        status.endpoint.as_deref().and_then(|e| e.split(':').next()).context("endpoint")?.parse()?;

    // Nothing else degrades: the tunnel nodes still see each other, and only each other.
    mesh.wait_connected(Duration::from_secs(30)).await?;

    let services: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    let _ = services.delete("fallback-web", &DeleteParams::default()).await;
    let mut server = mesh
        .nodes
        .spawn(FALLBACK, &["timeout", "60", "socat", "TCP-LISTEN:18300,reuseaddr,fork", "SYSTEM:echo from-fallback"])?;
    let result = async {
        services
            .create(
                &PostParams::default(),
                &service("fallback-web", json!({"node": FALLBACK, "network": {"type": "mesh", "ports": [18300]}})),
            )
            .await?;
        let info = mesh.info().await?;
        let name = "fallback-web.default.mesh.local";
        let start = Instant::now();
        loop {
            let mut wrong = Vec::new();
            for (node, me) in &info {
                let answer = mesh.dig(node, me.mesh_ip, name, false)?;
                if answer.addresses != [underlay] {
                    wrong.push(format!("{node}: {answer:?}"));
                }
            }
            // The fallback node answers too, on its underlay address.
            let own = mesh.dig(FALLBACK, underlay, name, false)?;
            if own.addresses != [underlay] {
                wrong.push(format!("{FALLBACK}: {own:?}"));
            }
            if wrong.is_empty() {
                break;
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(20),
                "{name} does not resolve to {underlay}: {wrong:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for node in info.keys() {
            let out = mesh
                .nodes
                .exec(node, &["socat", "-T", "2", "-u", &format!("TCP:{underlay}:18300,connect-timeout=2"), "-"])?;
            let reply = String::from_utf8_lossy(&out.stdout);
            assert!(
                reply.contains("from-fallback"),
                "{node} could not reach the fallback service at {underlay}: {reply}"
            );
        }
        anyhow::Ok(())
    }
    .await;
    let _ = server.kill();
    let _ = server.wait();
    let _ = services.delete("fallback-web", &DeleteParams::default()).await;
    result
}
