//! Attacks: objects written to turn mesh-controller against other members (issue 17, items 3,
//! 4, 6, 9, 10 and 14), on the plain lab.
//!
//! Every object here is named `ctl-atk-*` (MeshNodes, Kubernetes Nodes, namespaces); each test
//! removes what it made, first any leftover of an earlier run, and tolerates everything else.
//! The tests take turns ([`SERIAL`]): one restarts the lab's controller, another replaces it for
//! a while with one of its own.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use harness_mesh_e2e::controller::{Controller, LabControllerPaused, delete_service_and_wait, service};
use harness_mesh_e2e::mesh::{Mesh, eventually_async, wait_mesh_ip};
use harness_mesh_e2e::{Cluster, lab_sh};
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use mesh_api::{MeshNode, MeshService};
use serde_json::{Value, json};

use super::SERIAL;

const CONVERGE: Duration = Duration::from_secs(120);
/// How long the controller gets to act on one change.
const REACT: Duration = Duration::from_secs(30);

/// Runs `attack`, then `cleanup` whether the attack failed or not (a failed attack must not
/// leave the lab broken for the next test); the attack's error comes first.
async fn then_clean_up(
    attack: impl std::future::Future<Output = anyhow::Result<()>>,
    cleanup: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let result = attack.await;
    let cleaned = cleanup.await;
    result.and(cleaned)
}

/// The namespace `name` (made if missing), for this module's MeshServices.
async fn own_namespace(cluster: &Cluster, name: &str) -> anyhow::Result<Api<MeshService>> {
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    namespaces.patch(name, &PatchParams::apply("ctl-atk"), &Patch::Apply(&obj)).await?;
    Ok(Api::namespaced(cluster.client.clone(), name))
}

fn condition(node: &MeshNode, type_: &str) -> Option<Condition> {
    node.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_).cloned()
}

/// Server-side apply of a MeshNode's status fields, as its agent writes them.
async fn agent_writes(api: &Api<MeshNode>, name: &str, status: Value) -> anyhow::Result<()> {
    let patch = json!({"apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode", "status": status});
    api.patch_status(name, &PatchParams::apply("ctl-atk-agent").force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

/// Deletes the MeshNode `name` if there is one, and waits until it is gone.
async fn remove_mesh_node(api: &Api<MeshNode>, name: &str) -> anyhow::Result<()> {
    let _ = api.delete(name, &DeleteParams::default()).await;
    eventually_async(REACT, || async {
        ensure!(api.get_opt(name).await?.is_none(), "MeshNode {name} still there");
        Ok(())
    })
    .await
}

/// Deletes the Kubernetes Node `name` and the MeshNode of the same name, and waits until both
/// are gone.
async fn remove_node_and_mesh_node(cluster: &Cluster, name: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let _ = nodes.delete(name, &DeleteParams::default()).await;
    eventually_async(REACT, || async {
        ensure!(nodes.get_opt(name).await?.is_none(), "Node {name} still there");
        Ok(())
    })
    .await?;
    remove_mesh_node(&Api::all(cluster.client.clone()), name).await
}

/// Creates a Kubernetes Node `name` (as an admin or a kubelet would) with `spec` and the
/// underlay address `address`.
async fn create_node(cluster: &Cluster, name: &str, spec: Value, address: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": spec,
    }))?;
    nodes.create(&PostParams::default(), &node).await?;
    let status = json!({"status": {"addresses": [{"type": "InternalIP", "address": address}]}});
    nodes.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await?;
    Ok(())
}

/// A fresh WireGuard public key, made on a lab node.
fn fresh_public_key(mesh: &Mesh) -> anyhow::Result<String> {
    let node = &mesh.nodes.names[0];
    let private = mesh.nodes.exec_ok(node, &["wg", "genkey"])?;
    let out = mesh.nodes.exec_ok(node, &["sh", "-c", &format!("echo {} | wg pubkey", private.trim())])?;
    Ok(out.trim().to_owned())
}

/// Whether an event with `reason` about the object `name` exists in namespace `default` (where
/// events about cluster-scoped objects go); returns its note.
async fn event_note(cluster: &Cluster, name: &str, reason: &str) -> anyhow::Result<String> {
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), "default");
    events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .find(|e| {
            e.reason.as_deref() == Some(reason) && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
        .and_then(|e| e.note)
        .with_context(|| format!("no {reason} event about {name}"))
}

#[tokio::test]
async fn a_copied_public_key_gets_no_peer_entry_and_a_key_conflict() -> anyhow::Result<()> {
    let _turn = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let api: Api<MeshNode> = Api::all(mesh.cluster.client.clone());
    let attacker = "ctl-atk-copycat";
    remove_mesh_node(&api, attacker).await?;
    then_clean_up(copy_a_key(&mesh, &api, attacker), remove_mesh_node(&api, attacker)).await
}

async fn copy_a_key(mesh: &Mesh, api: &Api<MeshNode>, attacker: &str) -> anyhow::Result<()> {
    let info = mesh.info().await?;
    let (from, victim) = (&mesh.nodes.names[0], &mesh.nodes.names[1]);
    let victim_key = info[victim].public_key.clone();

    // A member (any MeshNode's agent may write its own status) publishes the victim's key.
    let obj = json!({"apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode", "metadata": {"name": attacker}, "spec": {}});
    api.create(&PostParams::default(), &serde_json::from_value(obj)?).await?;
    agent_writes(api, attacker, json!({"publicKey": victim_key, "endpoint": "192.168.77.250:51820"})).await?;

    // The controller has judged the attacker once its Ready condition speaks of the key.
    let judged = eventually_async(REACT, || async {
        let node = api.get(attacker).await?;
        let ready = condition(&node, "Ready").map(|c| c.reason).unwrap_or_default();
        ensure!(
            node.status.as_ref().and_then(|s| s.mesh_ip.as_ref()).is_some() && ready != "WaitingForAgent",
            "the controller has not judged {attacker} yet (Ready: {ready:?})"
        );
        Ok(node)
    })
    .await?;
    let peer = judged.status.as_ref().and_then(|s| s.peer.clone());
    ensure!(peer.is_none(), "the copycat {attacker} got a peer entry with {victim}'s key: {peer:?}");
    let conflict = condition(&judged, "KeyConflict").context("no KeyConflict condition")?;
    ensure!(conflict.status == "True" && conflict.message.contains(victim.as_str()), "{conflict:?} names {victim}");
    let note = eventually_async(REACT, || event_note(&mesh.cluster, attacker, "KeyConflict")).await?;
    ensure!(note.contains(victim.as_str()), "the event names {victim}: {note}");

    // The victim keeps its entry, and its connectivity.
    let entry = api.get(victim).await?.status.and_then(|s| s.peer).map(|p| p.public_key);
    ensure!(entry.as_deref() == Some(victim_key.as_str()), "{victim} lost its peer entry: {entry:?}");
    let target = info[victim].mesh_ip;
    eventually_async(REACT, || async {
        let stats = mesh.ping(from, target, 3, 0.2)?;
        ensure!(stats.received == stats.sent, "{from} → {victim} ({target}): {stats:?}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn an_agent_written_endpoint_outside_its_nodes_addresses_is_not_propagated() -> anyhow::Result<()> {
    let _turn = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let api: Api<MeshNode> = Api::all(mesh.cluster.client.clone());
    let name = "ctl-atk-endpoint";
    remove_node_and_mesh_node(&mesh.cluster, name).await?;
    then_clean_up(forge_an_endpoint(&mesh, &api, name), remove_node_and_mesh_node(&mesh.cluster, name)).await
}

async fn forge_an_endpoint(mesh: &Mesh, api: &Api<MeshNode>, name: &str) -> anyhow::Result<()> {
    create_node(&mesh.cluster, name, json!({}), "192.168.77.240").await?;
    eventually_async(REACT, || async {
        ensure!(api.get_opt(name).await?.is_some(), "no MeshNode mirrored for Node {name} yet");
        Ok(())
    })
    .await?;

    // The node's agent points every peer's handshakes at another machine's port.
    let key = fresh_public_key(mesh)?;
    let forged = "192.168.77.3:53";
    agent_writes(api, name, json!({"publicKey": key, "endpoint": forged})).await?;
    let judged = eventually_async(REACT, || async {
        let node = api.get(name).await?;
        ensure!(
            node.status.as_ref().and_then(|s| s.peer.as_ref()).is_some_and(|p| p.public_key == key),
            "no peer entry with the node's key yet"
        );
        Ok(node)
    })
    .await?;
    let endpoint = judged.status.as_ref().and_then(|s| s.peer.as_ref()).and_then(|p| p.endpoint.clone());
    ensure!(endpoint.as_deref() != Some(forged), "the forged endpoint {forged} went into {name}'s peer entry");
    let rejected = condition(&judged, "EndpointRejected").context("no EndpointRejected condition")?;
    ensure!(
        rejected.status == "True" && rejected.message.contains("192.168.77.240"),
        "the condition names the Node's addresses: {rejected:?}"
    );
    eventually_async(REACT, || event_note(&mesh.cluster, name, "EndpointNotANodeAddress")).await?;

    // One of the Node's own addresses is taken as it is.
    agent_writes(api, name, json!({"publicKey": key, "endpoint": "192.168.77.240:51820"})).await?;
    eventually_async(REACT, || async {
        let node = api.get(name).await?;
        let endpoint = node.status.as_ref().and_then(|s| s.peer.as_ref()).and_then(|p| p.endpoint.clone());
        ensure!(endpoint.as_deref() == Some("192.168.77.240:51820"), "peer endpoint {endpoint:?}");
        ensure!(condition(&node, "EndpointRejected").is_none(), "still rejected");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn an_enrolled_machines_meshnode_is_not_adopted_by_a_later_node_of_the_same_name() -> anyhow::Result<()> {
    let _turn = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let api: Api<MeshNode> = Api::all(mesh.cluster.client.clone());
    let name = "ctl-atk-enrolled";
    remove_node_and_mesh_node(&mesh.cluster, name).await?;
    then_clean_up(collide_with_an_enrolled_name(&mesh, &api, name), remove_node_and_mesh_node(&mesh.cluster, name))
        .await
}

async fn collide_with_an_enrolled_name(mesh: &Mesh, api: &Api<MeshNode>, name: &str) -> anyhow::Result<()> {
    // What `meshctl enroll` applies for a machine (crates/meshctl/src/enroll/api.rs).
    let enrolled = json!({
        "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/managed-by": "meshctl"},
            "annotations": {"mesh.harness.dev/enrolled-via": "ssh://root@192.168.77.200:22"},
        },
        "spec": {"endpoint": "192.168.77.200:51820"},
    });
    api.patch(name, &PatchParams::apply("meshctl"), &Patch::Apply(&enrolled)).await?;
    // Then a Kubernetes Node of the same name joins the cluster.
    create_node(&mesh.cluster, name, json!({}), "192.168.77.241").await?;

    let judged = eventually_async(REACT, || async {
        let node = api.get(name).await?;
        ensure!(
            !node.metadata.owner_references.clone().unwrap_or_default().is_empty()
                || condition(&node, "NameCollision").is_some(),
            "the controller has not acted on the Node {name} yet"
        );
        Ok(node)
    })
    .await?;
    let owners = judged.metadata.owner_references.clone().unwrap_or_default();
    ensure!(owners.is_empty(), "the enrolled machine's MeshNode {name} was adopted by the Node: {owners:?}");
    let endpoint = judged.spec.endpoint.as_deref();
    ensure!(endpoint == Some("192.168.77.200:51820"), "the enrolled spec was overwritten: {endpoint:?}");
    let collision = condition(&judged, "NameCollision").context("no NameCollision condition")?;
    ensure!(collision.status == "True", "{collision:?}");
    let note = eventually_async(REACT, || event_note(&mesh.cluster, name, "NameCollision")).await?;
    ensure!(note.contains("enrolled"), "the event on the Node says why: {note}");
    Ok(())
}

#[tokio::test]
async fn a_node_whose_pod_cidr_overlaps_the_mesh_subnet_gets_no_mesh_ip() -> anyhow::Result<()> {
    let _turn = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let api: Api<MeshNode> = Api::all(mesh.cluster.client.clone());
    let name = "ctl-atk-podcidr";
    remove_node_and_mesh_node(&mesh.cluster, name).await?;
    then_clean_up(overlap_the_mesh_subnet(&mesh, &api, name), remove_node_and_mesh_node(&mesh.cluster, name)).await
}

async fn overlap_the_mesh_subnet(mesh: &Mesh, api: &Api<MeshNode>, name: &str) -> anyhow::Result<()> {
    // Its pods would live inside the mesh subnet (10.42.0.0/16 in the lab): mesh routes would
    // shadow them on every node.
    let spec = json!({"podCIDR": "10.42.200.0/24", "podCIDRs": ["10.42.200.0/24"]});
    create_node(&mesh.cluster, name, spec, "192.168.77.242").await?;
    let judged = eventually_async(REACT, || async {
        let node = api.get_opt(name).await?.with_context(|| format!("no MeshNode {name} yet"))?;
        ensure!(condition(&node, "Allocated").is_some(), "the controller has not judged {name} yet");
        Ok(node)
    })
    .await?;
    let ip = judged.status.as_ref().and_then(|s| s.mesh_ip.clone());
    ensure!(ip.is_none(), "the node whose pod CIDR overlaps the mesh subnet got the mesh IP {ip:?}");
    let allocated = condition(&judged, "Allocated").context("judged")?;
    ensure!((allocated.status.as_str(), allocated.reason.as_str()) == ("False", "PodCIDROverlap"), "{allocated:?}");
    let note = eventually_async(REACT, || event_note(&mesh.cluster, name, "PodCIDROverlap")).await?;
    ensure!(note.contains("10.42.200.0/24"), "the event names the pod CIDR: {note}");
    Ok(())
}

#[tokio::test]
async fn a_released_ip_requested_right_after_a_controller_restart_is_refused() -> anyhow::Result<()> {
    let _turn = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let api = own_namespace(&mesh.cluster, "ctl-atk-hold").await?;
    let clean = || async {
        for name in ["owner", "grabber"] {
            delete_service_and_wait(&api, name).await?;
        }
        Ok(())
    };
    clean().await?;
    then_clean_up(grab_a_released_ip(&mesh, &api), clean()).await
}

async fn grab_a_released_ip(mesh: &Mesh, api: &Api<MeshService>) -> anyhow::Result<()> {
    let spec = json!({"network": {"type": "mesh", "ports": [80]}, "node": mesh.nodes.names[0]});
    api.create(&PostParams::default(), &service("owner", spec.clone())).await?;
    let ip: Ipv4Addr = wait_mesh_ip(api, "owner").await?;
    delete_service_and_wait(api, "owner").await?;

    // The controller restarts (an upgrade, a crash, a rescheduled pod), and someone asks for the
    // address the deleted service had, at once.
    tokio::task::spawn_blocking(|| lab_sh(&["controller", "restart"])).await??;
    let mut grab = spec;
    grab["meshIP"] = json!(ip.to_string());
    api.create(&PostParams::default(), &service("grabber", grab)).await?;
    let (grabber, allocated) = eventually_async(Duration::from_secs(60), || async {
        let s = api.get("grabber").await?;
        let allocated = s.status.as_ref().and_then(|st| st.conditions.iter().find(|c| c.type_ == "Allocated").cloned());
        Ok((s.clone(), allocated.context("grabber not judged yet")?))
    })
    .await?;
    let got = grabber.status.as_ref().and_then(|s| s.mesh_ip.clone());
    ensure!(got != Some(ip.to_string()), "the released {ip} went to another service straight after a restart");
    ensure!(
        (allocated.status.as_str(), allocated.reason.as_str()) == ("False", "IPConflict")
            && allocated.message.contains("held back"),
        "{allocated:?}"
    );
    Ok(())
}

/// The lab's controller is paused while this test runs one of its own, on the lab's subnet, with
/// all but the first 62 addresses reserved for nodes: the objects already there keep their
/// addresses (restored at start), and a tenant fills the rest of the service part.
#[tokio::test]
async fn a_tenant_exhausting_the_service_part_of_the_pool_does_not_stop_a_node_joining() -> anyhow::Result<()> {
    let _turn = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let joiner = "ctl-atk-joiner";
    let nodes: Api<MeshNode> = Api::all(mesh.cluster.client.clone());
    let api = own_namespace(&mesh.cluster, "ctl-atk-pool").await?;
    let clean = || async {
        api.delete_collection(&DeleteParams::default(), &ListParams::default()).await?;
        remove_mesh_node(&nodes, joiner).await?;
        eventually_async(REACT, || async {
            ensure!(api.list(&ListParams::default()).await?.items.is_empty(), "services of ctl-atk-pool still there");
            Ok(())
        })
        .await
    };
    clean().await?;
    let paused = tokio::task::spawn_blocking(LabControllerPaused::new).await??;
    let result = then_clean_up(fill_the_service_part(&mesh, &api, &nodes, joiner), clean()).await;
    // The lab's own controller again (it restores every address from the API, as after any restart).
    tokio::task::spawn_blocking(move || drop(paused)).await?;
    result
}

async fn fill_the_service_part(
    mesh: &Mesh,
    api: &Api<MeshService>,
    nodes: &Api<MeshNode>,
    joiner: &str,
) -> anyhow::Result<()> {
    // 10.42.0.0/16 holds 65534 addresses; services get 10.42.0.1-10.42.0.62.
    let reserved = (65534 - 62).to_string();
    let binary = harness_mesh_e2e::repo_root().join("target/debug/mesh-controller");
    let args = ["--leader-elect=false", "--ip-hold-seconds=0", "--node-reserved-ips", &reserved];
    let ctl = Controller::start(&mesh.cluster, &binary, 18291, &args);
    ctl.wait_ready(Duration::from_secs(60)).await;

    // The tenant creates services until the pool says it is exhausted (at most 62).
    let spec = json!({"network": {"type": "mesh", "ports": [80]}, "node": mesh.nodes.names[0]});
    let mut exhausted = None;
    for i in 0..=62 {
        let name = format!("fill-{i}");
        api.create(&PostParams::default(), &service(&name, spec.clone())).await?;
        let conditions = eventually_async(REACT, || async {
            let conditions = api.get(&name).await?.status.map(|s| s.conditions).unwrap_or_default();
            ensure!(conditions.iter().any(|c| c.type_ == "Allocated"), "{name} not judged yet");
            Ok(conditions)
        })
        .await?;
        if conditions.iter().any(|c| c.type_ == "PoolExhausted" && c.status == "True") {
            exhausted = Some(name);
            break;
        }
    }
    ensure!(exhausted.is_some(), "62 more services did not exhaust the service part of the pool");

    // A node joins all the same.
    let obj = json!({"apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode", "metadata": {"name": joiner}, "spec": {}});
    nodes.create(&PostParams::default(), &serde_json::from_value(obj)?).await?;
    let joined = eventually_async(REACT, || async {
        let node = nodes.get(joiner).await?;
        ensure!(condition(&node, "Allocated").is_some(), "{joiner} not judged yet");
        Ok(node)
    })
    .await?;
    let ip = joined.status.as_ref().and_then(|s| s.mesh_ip.clone());
    let allocated = condition(&joined, "Allocated").context("judged")?;
    ensure!(ip.is_some(), "a new node got no mesh IP once a tenant filled the pool: {}", allocated.message);
    Ok(())
}
