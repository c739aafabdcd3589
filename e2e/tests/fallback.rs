//! A node that cannot run WireGuard (the lab starts `hm-node-4` without /dev/net/tun) lands in
//! fallback: it stays in the directory with backend `none` and says why (a condition and an
//! event), no other node degrades, and nothing it hosts is offered in plaintext by surprise: its
//! `mesh` service is not Ready (reason `NoTunnel`) and its name does not resolve, while its
//! `dual` service is advertised (DNS) and reachable at its host address, in the clear, as its
//! type allows.
//!
//! Lab only: it needs a node started without a tun device.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use harness_mesh_e2e::controller::service;
use harness_mesh_e2e::mesh::{Mesh, eventually_async};
use harness_mesh_e2e::repo_root;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use mesh_api::conditions::{CONNECTED, READY};
use mesh_api::{Backend, MeshNode, MeshService};
use serde_json::json;

const FALLBACK: &str = "hm-node-4";
/// The fallback node's `mesh` service, which must not be offered.
const MESH_ONLY: &str = "fallback-mesh-only";
/// Its `dual` service, served at the host address.
const DUAL: &str = "fallback-dual";

#[tokio::test]
async fn a_node_without_tun_falls_back_visibly_and_offers_only_its_host_reachable_services_in_the_clear()
-> anyhow::Result<()> {
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
    for name in [MESH_ONLY, DUAL] {
        let _ = services.delete(name, &DeleteParams::default()).await;
    }
    let mut server = mesh
        .nodes
        .spawn(FALLBACK, &["timeout", "60", "socat", "TCP-LISTEN:18300,reuseaddr,fork", "SYSTEM:echo from-fallback"])?;
    let result = async {
        for (name, type_) in [(MESH_ONLY, "mesh"), (DUAL, "dual")] {
            services
                .create(
                    &PostParams::default(),
                    &service(name, json!({"node": FALLBACK, "network": {"type": type_, "ports": [18300]}})),
                )
                .await?;
        }
        let info = mesh.info().await?;
        let (dual, mesh_only) = ("fallback-dual.default.mesh.local", "fallback-mesh-only.default.mesh.local");
        let start = Instant::now();
        loop {
            let mut wrong = Vec::new();
            // Every tunnel node's DNS, and the fallback node's own on its underlay address.
            let servers = info.iter().map(|(node, me)| (node.as_str(), me.mesh_ip)).chain([(FALLBACK, underlay)]);
            for (node, server) in servers {
                let answer = mesh.dig(node, server, dual, false)?;
                if answer.addresses != [underlay] {
                    wrong.push(format!("{node}: {dual} is {answer:?}"));
                }
                let answer = mesh.dig(node, server, mesh_only, false)?;
                if answer.status != "NXDOMAIN" || !answer.addresses.is_empty() {
                    wrong.push(format!("{node}: {mesh_only} is {answer:?}"));
                }
            }
            if wrong.is_empty() {
                break;
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(20),
                "{dual} does not resolve to {underlay} alone, or {mesh_only} resolves (to the underlay, in \
                 plaintext): {wrong:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The mesh service: not Ready, and it says why.
        let ready = eventually_async(Duration::from_secs(20), || async {
            let status = services.get(MESH_ONLY).await?.status.unwrap_or_default();
            status
                .conditions
                .into_iter()
                .find(|c| c.type_ == READY && c.reason == "NoTunnel")
                .with_context(|| format!("{MESH_ONLY} is not Ready=False/NoTunnel yet"))
        })
        .await?;
        assert_eq!(ready.status, "False", "a mesh service on a node without a tunnel is Ready: {ready:?}");
        assert!(ready.message.contains(FALLBACK), "the reason does not name the node: {ready:?}");

        for node in info.keys() {
            let reply = mesh.fetch(node, underlay, 18300)?;
            assert_eq!(
                reply.as_deref(),
                Some("from-fallback"),
                "{node} could not reach the fallback node's dual service at {underlay}"
            );
        }

        // Falling back is an event too, not only a condition.
        let events: Api<Event> = Api::all(mesh.cluster.client.clone());
        eventually_async(Duration::from_secs(20), || async {
            let all = events.list(&ListParams::default()).await?;
            all.items
                .iter()
                .find(|e| {
                    e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(FALLBACK)
                        && e.reason.as_deref() == Some("NoTunnel")
                })
                .map(|_| ())
                .with_context(|| format!("no NoTunnel event about MeshNode {FALLBACK}"))
        })
        .await?;
        anyhow::Ok(())
    }
    .await;
    let _ = server.kill();
    let _ = server.wait();
    for name in [MESH_ONLY, DUAL] {
        let _ = services.delete(name, &DeleteParams::default()).await;
    }
    result
}
