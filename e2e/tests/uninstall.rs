//! `helm uninstall` of the chart on the lab in kubelet mode leaves nothing on the nodes and
//! blocks no deletion: every node loses `wg-harness`, its mesh addresses and route, the nftables
//! table `inet harness_mesh` and the agent's state dir, and MeshServices, MeshNodes and their
//! namespaces can still be deleted once the controller is gone.
//!
//! It uninstalls the lab's release, so `make kubelet-e2e` runs it after every other suite (the
//! next `lab.sh up` installs the chart again). Built only with the `kubelet-lab` feature.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use harness_mesh_e2e::controller::service;
use harness_mesh_e2e::mesh::{Mesh, eventually, eventually_async, wait_mesh_ip};
use harness_mesh_e2e::repo_root;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, PostParams};
use mesh_api::{MeshNode, MeshService};
use serde_json::json;

const CHART_NAMESPACE: &str = "harness-mesh";
const RELEASE: &str = "harness-mesh";
/// The suite's own namespace and objects, made while the controller runs (so that an old
/// controller would have put its finalizers on them).
const NAMESPACE: &str = "uninstall-e2e";
const SERVICE: &str = "uninstall-e2e-web";
const NODE: &str = "uninstall-e2e-node";

/// What of the mesh is left on `node` (empty: nothing).
fn leftovers(mesh: &Mesh, node: &str) -> anyhow::Result<Vec<String>> {
    let mut left = Vec::new();
    if mesh.nodes.exec(node, &["ip", "link", "show", "wg-harness"])?.status.success() {
        left.push("the link wg-harness".to_owned());
    }
    let addresses = mesh.nodes.exec_ok(node, &["ip", "-4", "-o", "addr", "show"])?;
    left.extend(addresses.lines().filter(|l| l.contains(" 10.42.")).map(|l| format!("address: {}", l.trim())));
    let routes = mesh.nodes.exec_ok(node, &["ip", "-4", "route", "show"])?;
    left.extend(routes.lines().filter(|l| l.starts_with("10.42.")).map(|l| format!("route: {}", l.trim())));
    if mesh.nodes.exec(node, &["nft", "list", "table", "inet", "harness_mesh"])?.status.success() {
        left.push("the nftables table inet harness_mesh".to_owned());
    }
    let state = mesh.nodes.exec(node, &["sh", "-c", "ls -A /var/lib/harness-mesh 2>/dev/null"])?;
    let files = String::from_utf8_lossy(&state.stdout).split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    if !files.is_empty() {
        left.push(format!("in the state dir /var/lib/harness-mesh: {files:?}"));
    }
    Ok(left)
}

fn helm(mesh: &Mesh, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(harness_mesh_e2e::chart::helm_binary()?)
        .args(args)
        .arg("--kubeconfig")
        .arg(&mesh.cluster.kubeconfig)
        .args(["--namespace", CHART_NAMESPACE])
        .output()
        .context("running helm")?;
    ensure!(out.status.success(), "helm {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test]
async fn helm_uninstall_leaves_no_trace_on_the_nodes_and_blocks_no_deletion() -> anyhow::Result<()> {
    let mesh = Mesh::get_kubelet(Duration::from_secs(90)).await?;
    let client = mesh.cluster.client.clone();
    for node in &mesh.nodes.names {
        let left = leftovers(&mesh, node)?;
        ensure!(!left.is_empty(), "{node} carries no mesh state before the uninstall: the test would prove nothing");
    }

    // Objects of the suite's own, made while the controller runs.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces.get_opt(NAMESPACE).await?.is_none() {
        namespaces
            .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?)
            .await?;
    }
    let services: Api<MeshService> = Api::namespaced(client.clone(), NAMESPACE);
    if services.get_opt(SERVICE).await?.is_none() {
        let host = &mesh.nodes.names[0];
        services
            .create(
                &PostParams::default(),
                &service(SERVICE, json!({"node": host, "network": {"type": "mesh", "ports": [80]}})),
            )
            .await?;
    }
    wait_mesh_ip(&services, SERVICE).await?;
    let mesh_nodes: Api<MeshNode> = Api::all(client.clone());
    if mesh_nodes.get_opt(NODE).await?.is_none() {
        let node: MeshNode = serde_json::from_value(json!({
            "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode",
            "metadata": {"name": NODE}, "spec": {"endpoint": "192.168.77.250:51820"},
        }))?;
        mesh_nodes.create(&PostParams::default(), &node).await?;
    }
    eventually_async(Duration::from_secs(60), || async {
        let status = mesh_nodes.get(NODE).await?.status.unwrap_or_default();
        ensure!(status.mesh_ip.is_some(), "the controller gave {NODE} no mesh IP yet");
        Ok(())
    })
    .await?;

    let started = Instant::now();
    helm(&mesh, &["uninstall", RELEASE, "--wait", "--timeout", "120s"])?;
    let helm_took = started.elapsed();
    let clean = eventually(Duration::from_secs(60), || {
        let mut dirty = Vec::new();
        for node in &mesh.nodes.names {
            let left = leftovers(&mesh, node)?;
            if !left.is_empty() {
                dirty.push(format!("{node}: {}", left.join("; ")));
            }
        }
        if dirty.is_empty() { Ok(()) } else { bail!("after helm uninstall:\n{}", dirty.join("\n")) }
    })
    .await?;
    println!(
        "helm uninstall took {helm_took:?}; every node was clean {:?} after it began",
        started.elapsed().min(helm_took + clean)
    );

    // No controller now: the suite's objects and their namespace still go.
    let started = Instant::now();
    services.delete(SERVICE, &DeleteParams::default()).await?;
    mesh_nodes.delete(NODE, &DeleteParams::default()).await?;
    namespaces.delete(NAMESPACE, &DeleteParams::default()).await?;
    eventually_async(Duration::from_secs(60), || async {
        ensure!(mesh_nodes.get_opt(NODE).await?.is_none(), "MeshNode {NODE} still exists (a finalizer?)");
        ensure!(namespaces.get_opt(NAMESPACE).await?.is_none(), "namespace {NAMESPACE} still exists");
        Ok(())
    })
    .await
    .with_context(|| format!("without the controller (see {})", repo_root().join(".lab/logs").display()))?;
    println!(
        "without the controller, a MeshService, a MeshNode and a namespace were deleted in {:?}",
        started.elapsed()
    );
    Ok(())
}
