//! Service discovery end to end: every node's agent answers for `mesh.local` on its mesh IP
//! (services by long and short name, nodes, NXDOMAIN for the rest, UDP and TCP), follows API
//! changes at once, and network type changes (mesh → dual → host) change both what resolves and
//! what is reachable, without recreating the object.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use harness_mesh_e2e::controller::service;
use harness_mesh_e2e::mesh::{Mesh, eventually, wait_mesh_ip};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use mesh_api::MeshService;
use mesh_api::conditions::SHORT_NAME;
use serde_json::json;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const CONVERGE: Duration = Duration::from_secs(90);
/// The suite's own namespaces and service names: short names (`<service>.mesh.local`) are
/// cluster-wide, so the names are ones no other suite (or `make demo`) uses.
const NS: &str = "e2e-discovery";
const OTHER_NS: &str = "e2e-discovery-2";
const WEB: &str = "e2e-disc-web";
const SOLO: &str = "e2e-disc-solo";
const SHIFTY: &str = "e2e-disc-shifty";

async fn ensure_namespace(mesh: &Mesh, name: &str) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(mesh.cluster.client.clone());
    let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    api.patch(name, &PatchParams::apply("harness-mesh-e2e"), &Patch::Apply(&body)).await?;
    Ok(())
}

async fn recreate(api: &Api<MeshService>, name: &str, spec: serde_json::Value) -> anyhow::Result<()> {
    delete_and_wait(api, name).await?;
    api.create(&PostParams::default(), &service(name, spec)).await?;
    Ok(())
}

async fn delete_and_wait(api: &Api<MeshService>, name: &str) -> anyhow::Result<()> {
    let _ = api.delete(name, &DeleteParams::default()).await;
    let start = Instant::now();
    while api.get_opt(name).await?.is_some() {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("MeshService {name} was not deleted within 30 s (is mesh-controller running?)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn mesh_ip(api: &Api<MeshService>, name: &str) -> anyhow::Result<Option<Ipv4Addr>> {
    Ok(api.get(name).await?.status.and_then(|s| s.mesh_ip).map(|ip| ip.parse()).transpose()?)
}

/// Every node resolves `name` (through its own agent) to exactly `want`, within `within`.
async fn resolves_everywhere(mesh: &Mesh, name: &str, want: &[Ipv4Addr], within: Duration) -> anyhow::Result<Duration> {
    let info = mesh.info().await?;
    eventually(within, || {
        for (node, me) in &info {
            let answer = mesh.dig(node, me.mesh_ip, name, false)?;
            if answer.addresses != want || answer.status != "NOERROR" || !answer.authoritative {
                bail!("{node} resolves {name} to {answer:?}, want {want:?}");
            }
        }
        Ok(())
    })
    .await
}

async fn nxdomain_everywhere(mesh: &Mesh, name: &str, within: Duration) -> anyhow::Result<Duration> {
    let info = mesh.info().await?;
    eventually(within, || {
        for (node, me) in &info {
            let answer = mesh.dig(node, me.mesh_ip, name, false)?;
            if answer.status != "NXDOMAIN" || !answer.authoritative {
                bail!("{node} answers {name} with {answer:?}, want an authoritative NXDOMAIN");
            }
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn every_node_resolves_services_and_nodes_and_follows_changes() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let info = mesh.info().await?;
    let [first, second, third] = [0, 1, 2].map(|i| mesh.nodes.names[i].clone());
    ensure_namespace(&mesh, NS).await?;
    ensure_namespace(&mesh, OTHER_NS).await?;
    let own: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), NS);
    let other: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), OTHER_NS);
    recreate(&own, WEB, json!({"node": second, "network": {"type": "mesh", "ports": [80]}})).await?;
    recreate(&own, SOLO, json!({"node": third, "network": {"type": "host", "ports": [80]}})).await?;
    recreate(&other, WEB, json!({"node": third, "network": {"type": "mesh", "ports": [80]}})).await?;
    let web = wait_mesh_ip(&own, WEB).await?;
    let third_host: Ipv4Addr = info[&third].endpoint.split(':').next().unwrap_or_default().parse()?;
    let web_long = format!("{WEB}.{NS}.mesh.local");
    let web_short = format!("{WEB}.mesh.local");
    let solo_long = format!("{SOLO}.{NS}.mesh.local");

    resolves_everywhere(&mesh, &web_long, &[web], Duration::from_secs(10)).await?;
    resolves_everywhere(&mesh, &solo_long, &[third_host], Duration::from_secs(10)).await?;
    resolves_everywhere(&mesh, &format!("{SOLO}.mesh.local"), &[third_host], Duration::from_secs(10)).await?;
    for (node, me) in &info {
        resolves_everywhere(&mesh, &format!("{node}.node.mesh.local"), &[me.mesh_ip], Duration::from_secs(10)).await?;
    }
    nxdomain_everywhere(&mesh, &format!("nothing-here.{NS}.mesh.local"), Duration::from_secs(5)).await?;
    // Two namespaces have a `WEB`: the short name is withheld, and both services say why.
    nxdomain_everywhere(&mesh, &web_short, Duration::from_secs(10)).await?;
    for api in [&own, &other] {
        let start = Instant::now();
        loop {
            let status = api.get(WEB).await?.status.unwrap_or_default();
            let cond = status.conditions.iter().find(|c| c.type_ == SHORT_NAME).cloned();
            if cond.as_ref().is_some_and(|c| c.status == "False" && c.reason == "Ambiguous") {
                break;
            }
            anyhow::ensure!(start.elapsed() < Duration::from_secs(15), "no Ambiguous ShortName condition: {cond:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // TCP too.
    let tcp = mesh.dig(&first, info[&first].mesh_ip, &web_long, true)?;
    assert_eq!(tcp.addresses, vec![web], "over TCP: {tcp:?}");
    // Names outside the zone are refused, not forwarded anywhere.
    let outside = mesh.dig(&first, info[&first].mesh_ip, "example.org", false)?;
    assert_eq!(outside.status, "REFUSED", "{outside:?}");

    // An API change reaches every node's answer within a second or so.
    let changed = Instant::now();
    delete_and_wait(&other, WEB).await?;
    let took = resolves_everywhere(&mesh, &web_short, &[web], Duration::from_secs(10)).await?;
    eprintln!("{web_short} resolved on every node {:?} after the delete began", changed.elapsed());
    assert!(took < Duration::from_secs(5), "the short name took {took:?} to appear everywhere");
    for name in [WEB, SOLO] {
        delete_and_wait(&own, name).await?;
    }
    nxdomain_everywhere(&mesh, &solo_long, Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test]
async fn a_type_change_changes_what_resolves_and_what_is_reachable() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let info = mesh.info().await?;
    let [client, host] = [0, 1].map(|i| mesh.nodes.names[i].clone());
    let host_address: Ipv4Addr = info[&host].endpoint.split(':').next().unwrap_or_default().parse()?;
    ensure_namespace(&mesh, NS).await?;
    let api: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), NS);
    let mut server = mesh.serve_tcp(&host, 18200, "shifty")?;
    let result = async {
        recreate(&api, SHIFTY, json!({"node": host, "network": {"type": "mesh", "ports": [18200]}})).await?;
        let ip = wait_mesh_ip(&api, SHIFTY).await?;
        let name = &format!("{SHIFTY}.{NS}.mesh.local");
        resolves_everywhere(&mesh, name, &[ip], Duration::from_secs(10)).await?;
        eventually(Duration::from_secs(10), || mesh.fetch(&client, ip, 18200)?.map(|_| ()).context("mesh IP")).await?;

        for type_ in ["dual", "host"] {
            let patch = json!({"spec": {"network": {"type": type_, "ports": [18200]}}});
            api.patch(SHIFTY, &PatchParams::default(), &Patch::Merge(&patch)).await?;
            let want = if type_ == "host" { host_address } else { ip };
            let took = resolves_everywhere(&mesh, name, &[want], Duration::from_secs(15)).await?;
            eprintln!("type {type_}: {name} -> {want} on every node after {took:?}");
            eventually(Duration::from_secs(10), || {
                mesh.fetch(&client, want, 18200)?.map(|_| ()).with_context(|| format!("{want}:18200 as {type_}"))
            })
            .await?;
        }
        // A host service has no mesh IP: the old one is released and no longer reaches the host.
        let start = Instant::now();
        while mesh_ip(&api, SHIFTY).await?.is_some() {
            anyhow::ensure!(start.elapsed() < Duration::from_secs(15), "type host kept its mesh IP");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eventually(Duration::from_secs(15), || match mesh.fetch(&client, ip, 18200)? {
            None => Ok(()),
            Some(reply) => bail!("the released mesh IP {ip} still answers: {reply}"),
        })
        .await?;
        anyhow::Ok(())
    }
    .await;
    let _ = server.kill();
    let _ = server.wait();
    delete_and_wait(&api, SHIFTY).await?;
    result
}
