//! The MeshNode reconciler (mesh IP, WireGuard peer entry, status) and the mirror that gives
//! every Kubernetes Node a MeshNode.

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

use crate::conditions::refused;
use crate::context::{Ctx, Error, FIELD_MANAGER, is_there, remove_legacy_finalizer};
use crate::metrics::KindLabel;
use crate::service::RETRY_ALLOCATION_SECS;

const KIND: &str = "MeshNode";
/// The condition types this controller owns on a MeshNode (the agent owns the others).
const OWNED: [&str; 4] = [READY, ALLOCATED, IP_CONFLICT, POOL_EXHAUSTED];

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
    let allocation = ctx.pool().allocate(&owner, requested, ctx.now());
    let (ip, refused) = match allocation {
        Ok(ip) => {
            wants.push(Want::yes(ALLOCATED, "Allocated", format!("mesh IP {ip} is allocated")));
            (Some(ip), None)
        }
        Err(err) => {
            let (reason, refusal) = refused(&err);
            wants.extend(refusal);
            (ctx.pool().address_of(&owner), Some((reason, err.to_string())))
        }
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
    let peer = match (ip, &status.public_key) {
        // A node without WireGuard gets no peer entry: no other node tries to reach it through
        // the tunnel, and nothing else degrades.
        _ if fallback => None,
        (Some(ip), Some(key)) => {
            let mut allowed = vec![format!("{ip}/32")];
            allowed.extend(ctx.service_ips_on(&name).into_iter().map(|ip| format!("{ip}/32")));
            Some(PeerEntry {
                public_key: key.clone(),
                endpoint: node.spec.endpoint.clone().or_else(|| status.endpoint.clone()),
                allowed_ips: allowed,
                persistent_keepalive: node.spec.persistent_keepalive.filter(|k| *k > 0),
            })
        }
        _ => None,
    };
    wants.push(match (&refused, &peer) {
        (Some((reason, message)), _) => Want::no(READY, reason, message.clone()),
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
    let next = match refused {
        Some(_) => Action::requeue(Duration::from_secs(RETRY_ALLOCATION_SECS)),
        None => Action::await_change(),
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
    if let Some((reason, message)) = refused
        && !ours.iter().any(|c| c.reason == reason)
    {
        ctx.event(node, EventType::Warning, reason, "AllocateMeshIP", message).await;
    }
    Ok(next)
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
    let mirrored = ctx
        .mesh_nodes
        .get(&ObjectRef::new(&name))
        .is_some_and(|mn| mn.owner_references().iter().any(|r| r.kind == "Node" && r.uid == uid));
    if mirrored {
        return Ok(Action::await_change());
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
    let api: Api<MeshNode> = Api::all(ctx.client.clone());
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
