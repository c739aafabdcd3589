//! The MeshNode reconciler (mesh IP, WireGuard peer entry, status) and the mirror that gives
//! every Kubernetes Node a MeshNode.
//!
//! Before a node's peer entry is published, the controller arbitrates what its agent wrote
//! (see [`crate::judge`]):
//! - a public key that another MeshNode published first gets no peer entry (`KeyConflict`);
//! - a reported endpoint that does not parse, or (for a mirrored Kubernetes Node) whose host is
//!   none of the Node's addresses, does not go into the entry: the last endpoint that passed
//!   stays, else none (`EndpointRejected`); an admin's `spec.endpoint` overrides it;
//! - a Node whose pod CIDRs overlap the mesh subnet gets no mesh IP (`PodCIDROverlap`);
//! - an enrolled machine's MeshNode is never adopted by a Kubernetes Node of the same name
//!   (`NameCollision`).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use mesh_api::conditions::{ALLOCATED, IP_CONFLICT, POOL_EXHAUSTED, READY, Want, merge, same};
use mesh_api::{Backend, MeshNode, MeshNodeStatus, PeerEntry};
use mesh_core::Owner;
use serde_json::json;

use crate::caches::ENROLLED_VIA;
use crate::conditions::{ENDPOINT_REJECTED, KEY_CONFLICT, NAME_COLLISION, POD_CIDR_OVERLAP, refused};
use crate::context::{Ctx, Error, FIELD_MANAGER, is_there, remove_legacy_finalizer};
use crate::judge::{self, Claimant};
use crate::metrics::KindLabel;
use crate::service::RETRY_ALLOCATION_SECS;

const KIND: &str = "MeshNode";
/// The condition types this controller owns on a MeshNode (the agent owns the others).
const OWNED: [&str; 8] =
    [READY, ALLOCATED, IP_CONFLICT, POOL_EXHAUSTED, KEY_CONFLICT, ENDPOINT_REJECTED, NAME_COLLISION, POD_CIDR_OVERLAP];
/// How often a node that lost a key conflict looks again (the holder may go away or change
/// its key; nothing else wakes it).
const KEY_CONFLICT_RECHECK: Duration = Duration::from_secs(30);

/// Reconciles one MeshNode. Its deletion is not the reconciler's business: the watch reports it
/// ([`on_watch_event`]).
pub async fn reconcile(node: Arc<MeshNode>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    ctx.caches_synced().await?;
    ctx.metrics.reconciles.get_or_create(&KindLabel { kind: KIND }).inc();
    let api: Api<MeshNode> = Api::all(ctx.client.clone());
    if node.meta().deletion_timestamp.is_none() && mirrored_node_is_gone(&node, &ctx).await {
        // What the garbage collector does through the owner reference, done here too so that a
        // cluster without it (or a slow one) never keeps a peer for a node that is gone.
        tracing::info!(node = %node.name_any(), "the Kubernetes Node is gone: deleting its MeshNode");
        api.delete(&node.name_any(), &DeleteParams::background()).await?;
        ctx.metrics.wrote(KIND);
        return Ok(Action::await_change());
    }
    if remove_legacy_finalizer(&api, node.as_ref()).await? {
        ctx.metrics.wrote(KIND);
    }
    if node.meta().deletion_timestamp.is_some() {
        // Kept by someone else's finalizer: it keeps its address until it is gone.
        return Ok(Action::await_change());
    }
    apply(&node, &ctx).await
}

/// The owner of a node's address.
fn owner_of(node: &MeshNode) -> Owner {
    Owner::node(node.name_any())
}

/// What a MeshNode watch event means for the nodes that are gone (see [`crate::gone::gone`]):
/// each one's address is released (held back), at once for a deletion, after a check for what a
/// re-list lacks. The services it hosted hear of it through their own watch of MeshNodes.
pub fn on_watch_event(ctx: &Arc<Ctx>, event: &watcher::Event<MeshNode>) {
    let tracked = || {
        ctx.pool()
            .allocations()
            .filter(|(_, owner)| matches!(owner, Owner::Node(_)))
            .map(|(_, owner)| owner.clone())
            .collect()
    };
    let relisted = matches!(event, watcher::Event::InitDone);
    for owner in crate::gone::gone(event, owner_of, || ctx.mesh_nodes.state(), tracked) {
        if relisted {
            tokio::spawn(confirm_gone(owner, ctx.clone()));
        } else {
            forget(&owner, ctx);
        }
    }
}

/// After a re-list that lacks a node the controller holds an address for: forgets it once a
/// consistent read ([`is_there`]) confirms that it is gone (a re-list served from a lagging
/// cache may lack a live object), and only if the watch has not brought it back meanwhile.
async fn confirm_gone(owner: Owner, ctx: Arc<Ctx>) {
    let Owner::Node(name) = &owner else { return };
    let api: Api<MeshNode> = Api::all(ctx.client.clone());
    match is_there(&api, name).await {
        Ok(false) if ctx.mesh_nodes.get(&ObjectRef::new(name)).is_none() => {
            tracing::info!(node = %owner, "deleted while the watch was down");
            forget(&owner, &ctx);
        }
        Ok(_) => tracing::debug!(node = %owner, "missing from a re-list, but there: kept"),
        Err(err) => tracing::warn!(
            node = %owner,
            "missing from a re-list, and reading it failed: {err}; its address stays allocated until a later re-list shows it gone"
        ),
    }
}

/// The node is gone: release its address (held back).
fn forget(owner: &Owner, ctx: &Ctx) {
    if let Some(ip) = ctx.pool().release(owner, ctx.now()) {
        tracing::info!(node = %owner, %ip, "released mesh IP");
    }
    ctx.observe_pool();
}

/// Whether `node` mirrors a Kubernetes Node (owner reference) that no longer exists.
async fn mirrored_node_is_gone(node: &MeshNode, ctx: &Ctx) -> bool {
    let Some(owner) = node.owner_references().iter().find(|r| r.kind == "Node" && r.api_version == "v1") else {
        return false;
    };
    if ctx.nodes.wait_until_ready().await.is_err() {
        return false;
    }
    ctx.nodes.get(&ObjectRef::new(&owner.name)).is_none_or(|n| n.uid().as_deref() != Some(owner.uid.as_str()))
}

async fn apply(node: &MeshNode, ctx: &Ctx) -> Result<Action, Error> {
    let name = node.name_any();
    let owner = Owner::node(&name);
    let requested = node
        .spec
        .mesh_ip
        .as_deref()
        .map(mesh_core::parse_mesh_ip)
        .transpose()
        .map_err(|e| Error::Permanent(e.to_string()))?;
    let mut wants = Vec::new();
    let k8s_node = ctx.nodes.get(&ObjectRef::new(&name));
    let subnet = ctx.pool().subnet();
    let pod_cidrs = k8s_node.as_ref().and_then(|n| n.spec.as_ref()).map(|spec| {
        let cidrs = spec.pod_cidrs.iter().flatten().chain(spec.pod_cidr.as_ref());
        judge::overlapping_pod_cidrs(&subnet, cidrs)
    });
    let (ip, refused) = match pod_cidrs.filter(|overlap| !overlap.is_empty()) {
        Some(overlap) => {
            // Its pods' addresses would be routed into the tunnel on every node.
            if let Some(ip) = ctx.pool().release(&owner, ctx.now()) {
                tracing::warn!(node = %owner, %ip, "released mesh IP: the Node's pod CIDR overlaps the mesh subnet");
            }
            let message = format!(
                "the Kubernetes Node {name} has the pod CIDR(s) {} inside the mesh subnet {subnet}: mesh routes would \
                 capture its pods' traffic on every node, so it gets no mesh IP. Use a mesh subnet (--subnet, the \
                 chart's mesh.subnet) that no pod CIDR overlaps",
                overlap.join(", ")
            );
            wants.push(Want::no(ALLOCATED, POD_CIDR_OVERLAP, message.clone()));
            wants.push(Want::yes(POD_CIDR_OVERLAP, POD_CIDR_OVERLAP, message.clone()));
            (None, Some((POD_CIDR_OVERLAP, message)))
        }
        None => match ctx.pool().allocate(&owner, requested, ctx.now()) {
            Ok(ip) => {
                wants.push(Want::yes(ALLOCATED, "Allocated", format!("mesh IP {ip} is allocated")));
                (Some(ip), None)
            }
            Err(err) => {
                let (reason, refusal) = refused(&err);
                wants.extend(refusal);
                (ctx.pool().address_of(&owner), Some((reason, err.to_string())))
            }
        },
    };
    if ctx.mesh_nodes.get(&ObjectRef::from_obj(node)).is_none() {
        // Deleted while this reconcile ran: the watch may have released the address before it
        // was allocated above, so release it again rather than leak it.
        forget(&owner, ctx);
        return Ok(Action::await_change());
    }
    if ip.is_some() && node.status.as_ref().and_then(|s| s.mesh_ip.as_ref()).is_none() {
        ctx.metrics.allocations.inc();
    }
    ctx.observe_pool();

    let status = node.status.clone().unwrap_or_default();
    let fallback = status.backend == Some(Backend::None);
    let key_holder =
        status.public_key.as_deref().filter(|_| !fallback).and_then(|key| other_key_holder(node, key, ctx));
    let key_conflict = key_holder.map(|holder| {
        format!(
            "its public key is already published by MeshNode {holder}, which keeps it: this node gets no peer entry \
             until its agent publishes a key of its own (remove the agent's private key from its state directory and \
             restart it) or {holder} goes away"
        )
    });
    if let Some(message) = &key_conflict {
        wants.push(Want::yes(KEY_CONFLICT, KEY_CONFLICT, message.clone()));
    }
    let (endpoint, endpoint_refusal) = endpoint_of(node, &status, k8s_node.as_deref());
    if let Some(refusal) = &endpoint_refusal {
        wants.push(Want::yes(ENDPOINT_REJECTED, refusal.reason, refusal.message.clone()));
    }
    let collision = name_collision(node, k8s_node.as_deref());
    if let Some(message) = &collision {
        wants.push(Want::yes(NAME_COLLISION, NAME_COLLISION, message.clone()));
    }
    let peer = match (ip, &status.public_key) {
        // A node without WireGuard gets no peer entry: no other node tries to reach it through
        // the tunnel, and nothing else degrades.
        _ if fallback => None,
        // A copier gets none: agents would drop both peers with the same key.
        _ if key_conflict.is_some() => None,
        (Some(ip), Some(key)) => {
            let mut allowed = vec![format!("{ip}/32")];
            allowed.extend(ctx.service_ips_on(&name).into_iter().map(|ip| format!("{ip}/32")));
            Some(PeerEntry {
                public_key: key.clone(),
                endpoint,
                allowed_ips: allowed,
                persistent_keepalive: node.spec.persistent_keepalive.filter(|k| *k > 0),
            })
        }
        _ => None,
    };
    wants.push(match (&refused, &peer) {
        (Some((reason, message)), _) => Want::no(READY, reason, message.clone()),
        (None, _) if key_conflict.is_some() => Want::no(READY, KEY_CONFLICT, key_conflict.clone().unwrap_or_default()),
        (None, _) if fallback => Want::no(
            READY,
            "NoTunnel",
            "the agent runs without WireGuard (backend none; its Connected condition says why): the node stays \
             in the directory, its host and dual services are reached at its host address in the clear, and its \
             mesh services are not offered (not Ready, no DNS name)",
        ),
        (None, None) => Want::no(
            READY,
            "WaitingForAgent",
            "no WireGuard public key published yet: is mesh-agent running on this node?",
        ),
        (None, Some(_)) => Want::yes(READY, "PeerPublished", "mesh IP allocated and peer entry published"),
    });

    let ours: Vec<_> = status.conditions.iter().filter(|c| OWNED.contains(&c.type_.as_str())).cloned().collect();
    let conditions = merge(&ours, &wants, node.meta().generation);
    let mesh_ip = ip.map(|ip| ip.to_string());
    let next = match (&refused, &key_conflict) {
        (Some(_), _) => Action::requeue(Duration::from_secs(RETRY_ALLOCATION_SECS)),
        (None, Some(_)) => Action::requeue(KEY_CONFLICT_RECHECK),
        (None, None) => Action::await_change(),
    };
    if status.mesh_ip == mesh_ip
        && status.peer == peer
        && status.observed_generation == node.meta().generation
        && same(&ours, &conditions)
    {
        return Ok(next);
    }
    // Falling out of the tunnel is an event, not only a condition: an operator watching events
    // learns that this node's mesh services are no longer offered.
    let no_tunnel = |conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]| {
        conditions.iter().any(|c| c.type_ == READY && c.reason == "NoTunnel")
    };
    let fell_out = no_tunnel(&conditions) && !no_tunnel(&ours);
    // Only the fields this controller owns; absent ones are dropped from its ownership, so a
    // peer entry disappears when the key does.
    let owned = MeshNodeStatus {
        mesh_ip,
        peer,
        observed_generation: node.meta().generation,
        conditions,
        ..MeshNodeStatus::default()
    };
    let patch = json!({
        "apiVersion": format!("{}/{}", mesh_api::GROUP, mesh_api::VERSION),
        "kind": KIND,
        "status": owned,
    });
    let api: Api<MeshNode> = Api::all(ctx.client.clone());
    api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    ctx.metrics.wrote(KIND);
    if fell_out {
        let why = status
            .conditions
            .iter()
            .find(|c| c.type_ == mesh_api::conditions::CONNECTED)
            .map_or_else(|| "no reason given".to_owned(), |c| c.message.clone());
        ctx.event(
            node,
            EventType::Warning,
            "NoTunnel",
            "Fallback",
            format!("this node is out of the tunnel (backend none): {why}"),
        )
        .await;
    }
    let had = |type_: &str, reason: &str| ours.iter().any(|c| c.type_ == type_ && c.reason == reason);
    if let Some((reason, message)) = refused
        && !ours.iter().any(|c| c.reason == reason)
    {
        // A pod CIDR is the Node's business: the event goes there.
        match (&k8s_node, reason == POD_CIDR_OVERLAP) {
            (Some(k8s_node), true) => {
                ctx.event(k8s_node.as_ref(), EventType::Warning, reason, "AllocateMeshIP", message).await;
            }
            _ => ctx.event(node, EventType::Warning, reason, "AllocateMeshIP", message).await,
        }
    }
    if let Some(message) = key_conflict
        && !had(KEY_CONFLICT, KEY_CONFLICT)
    {
        ctx.event(node, EventType::Warning, KEY_CONFLICT, "PublishPeer", message).await;
    }
    if let Some(refusal) = endpoint_refusal
        && !had(ENDPOINT_REJECTED, refusal.reason)
    {
        ctx.event(node, EventType::Warning, refusal.reason, "PublishPeer", refusal.message).await;
    }
    if let (Some(message), Some(k8s_node)) = (collision, &k8s_node)
        && !had(NAME_COLLISION, NAME_COLLISION)
    {
        ctx.event(k8s_node.as_ref(), EventType::Warning, NAME_COLLISION, "MirrorNode", message).await;
    }
    Ok(next)
}

/// The other MeshNode that keeps `key` when `node` publishes it too ([`judge::key_holder`]),
/// or `None` when `node` keeps it (or nobody else claims it).
fn other_key_holder(node: &MeshNode, key: &str, ctx: &Ctx) -> Option<String> {
    let name = node.name_any();
    let claimant = |n: &MeshNode| Claimant {
        name: n.name_any(),
        created: n.creation_timestamp().map(|t| t.0),
        holds_entry: n.status.as_ref().and_then(|s| s.peer.as_ref()).is_some_and(|p| p.public_key == key),
    };
    let mut claimants: Vec<Claimant> = ctx
        .mesh_nodes
        .state()
        .iter()
        .filter(|n| n.name_any() != name)
        .filter(|n| {
            n.status.as_ref().is_some_and(|s| s.public_key.as_deref() == Some(key) && s.backend != Some(Backend::None))
        })
        .map(|n| claimant(n))
        .collect();
    if claimants.is_empty() {
        return None;
    }
    claimants.push(claimant(node));
    judge::key_holder(&claimants).filter(|holder| holder.name != name).map(|holder| holder.name.clone())
}

/// The endpoint of `node`'s peer entry, and why the one its agent reported was refused: the
/// admin's `spec.endpoint` if set; else the reported one if [`judge::judge_endpoint`] accepts
/// it; else the entry's last endpoint if it still passes, else none.
fn endpoint_of(
    node: &MeshNode,
    status: &MeshNodeStatus,
    k8s_node: Option<&Node>,
) -> (Option<String>, Option<judge::Refusal>) {
    if let Some(admin) = &node.spec.endpoint {
        return (Some(admin.clone()), None);
    }
    let Some(reported) = &status.endpoint else { return (None, None) };
    let mirrored = node.owner_references().iter().any(|r| r.kind == "Node" && r.api_version == "v1");
    let addresses: Option<Vec<String>> = mirrored.then(|| {
        let addresses = k8s_node.and_then(|n| n.status.as_ref()).and_then(|s| s.addresses.as_ref());
        addresses.into_iter().flatten().map(|a| a.address.clone()).collect()
    });
    match judge::judge_endpoint(reported, addresses.as_deref()) {
        Ok(endpoint) => (Some(endpoint), None),
        Err(refusal) => {
            let last = status.peer.as_ref().and_then(|p| p.endpoint.as_deref());
            let last_good = last.and_then(|e| judge::judge_endpoint(e, addresses.as_deref()).ok());
            (last_good, Some(refusal))
        }
    }
}

/// Why `node`, an enrolled machine's MeshNode, collides with the Kubernetes Node of the same
/// name (which the mirror then leaves alone); `None` when it does not.
fn name_collision(node: &MeshNode, k8s_node: Option<&Node>) -> Option<String> {
    let via = node.annotations().get(ENROLLED_VIA)?;
    let k8s_node = k8s_node?;
    let owned_by_it =
        node.owner_references().iter().any(|r| r.kind == "Node" && k8s_node.uid().as_deref() == Some(r.uid.as_str()));
    (!owned_by_it).then(|| {
        let name = node.name_any();
        format!(
            "a Kubernetes Node is named {name} like this MeshNode of a machine enrolled via {via}: the Node is not \
             mirrored into it, so the machine's agent stays its one writer, and the Node gets no MeshNode (nor its \
             agent a peer). Rename one of them: unenroll the machine (meshctl unenroll {name}) and enroll it under \
             another name, or join the node under another name"
        )
    })
}

/// The MeshNode error policy.
pub fn error_policy(node: Arc<MeshNode>, error: &Error, ctx: Arc<Ctx>) -> Action {
    tracing::warn!(node = %node.name_any(), "reconcile failed: {error}");
    ctx.metrics.reconcile_errors.get_or_create(&KindLabel { kind: KIND }).inc();
    error.action()
}

/// Gives a Kubernetes Node its MeshNode, owned by the Node so that deleting one deletes the
/// other. Does nothing when the MeshNode already carries the owner reference.
pub async fn mirror(node: Arc<Node>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    ctx.caches_synced().await?;
    ctx.metrics.reconciles.get_or_create(&KindLabel { kind: "Node" }).inc();
    let name = node.name_any();
    let Some(uid) = node.uid() else { return Ok(Action::await_change()) };
    if node.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let existing = ctx.mesh_nodes.get(&ObjectRef::new(&name));
    if existing.as_ref().is_some_and(|mn| mn.owner_references().iter().any(|r| r.kind == "Node" && r.uid == uid)) {
        return Ok(Action::await_change());
    }
    if let Some(mn) = &existing
        && mn.annotations().contains_key(ENROLLED_VIA)
    {
        // An enrolled machine's: never adopted, or the machine and this Node's agent would both
        // write it. Its reconcile (woken by this Node's events too) reports the collision.
        tracing::warn!(node = %name, "a Kubernetes Node has the name of an enrolled machine's MeshNode: not mirrored");
        return Ok(Action::await_change());
    }
    let api: Api<MeshNode> = Api::all(ctx.client.clone());
    if existing.is_none() && is_there(&api, &name).await? {
        // Created a moment ago (the cache lags): look at it once the cache has it, rather than
        // adopt a MeshNode this controller has not judged.
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let mesh_node = json!({
        "apiVersion": format!("{}/{}", mesh_api::GROUP, mesh_api::VERSION),
        "kind": KIND,
        "metadata": {
            "name": name,
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}],
        },
        "spec": {},
    });
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&mesh_node)).await?;
    ctx.metrics.wrote(KIND);
    tracing::info!(node = %name, "mirrored Kubernetes Node into a MeshNode");
    Ok(Action::await_change())
}

/// The mirror's error policy.
pub fn mirror_error_policy(node: Arc<Node>, error: &Error, ctx: Arc<Ctx>) -> Action {
    tracing::warn!(node = %node.name_any(), "mirroring failed: {error}");
    ctx.metrics.reconcile_errors.get_or_create(&KindLabel { kind: "Node" }).inc();
    error.action()
}
