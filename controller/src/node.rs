//! The MeshNode reconciler (mesh IP, WireGuard peer entry, status) and the mirror that gives
//! every Kubernetes Node a MeshNode. What they decide is in [`crate::rules::node`]; here they
//! read the caches, ask the pool, and write only what differs.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use mesh_api::MeshNode;
use mesh_core::Owner;
use serde_json::json;

use crate::context::{Ctx, Error, FIELD_MANAGER, is_there, remove_legacy_finalizer};
use crate::metrics::KindLabel;
use crate::rules::node::{self as rules, NodeAllocation};

const KIND: &str = "MeshNode";
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
    if node.owner_references().is_empty() || ctx.nodes.wait_until_ready().await.is_err() {
        return false;
    }
    rules::outlived_its_node(node, &ctx.index())
}

/// Reads the caches, asks the pool for the address, plans ([`rules::plan`]) and writes the
/// status only when the plan differs from what is there.
async fn apply(node: &MeshNode, ctx: &Ctx) -> Result<Action, Error> {
    let name = node.name_any();
    let owner = Owner::node(&name);
    let requested = crate::context::requested_ip(node.spec.mesh_ip.as_deref())?;
    let subnet = ctx.pool().subnet();
    let overlap = rules::pod_cidr_overlap(&name, &subnet, &ctx.index());
    let allocation = if overlap.is_empty() {
        let mut pool = ctx.pool();
        match pool.allocate(&owner, requested, ctx.now()) {
            Ok(ip) => NodeAllocation::Granted(ip),
            Err(error) => NodeAllocation::Refused { kept: pool.address_of(&owner), error },
        }
    } else {
        if let Some(ip) = ctx.pool().release(&owner, ctx.now()) {
            tracing::warn!(node = %owner, %ip, "released mesh IP: the Node's pod CIDR overlaps the mesh subnet");
        }
        NodeAllocation::Withheld(overlap)
    };
    if ctx.mesh_nodes.get(&ObjectRef::from_obj(node)).is_none() {
        // Deleted while this reconcile ran: the watch may have released the address before it
        // was allocated above, so release it again rather than leak it.
        forget(&owner, ctx);
        return Ok(Action::await_change());
    }
    if matches!(allocation, NodeAllocation::Granted(_))
        && node.status.as_ref().and_then(|s| s.mesh_ip.as_ref()).is_none()
    {
        ctx.metrics.allocations.inc();
    }
    ctx.observe_pool();

    let (plan, k8s_node) = {
        let index = ctx.index();
        (rules::plan(node, &allocation, &subnet, &index), ctx.nodes.get(&ObjectRef::new(&name)))
    };
    let next = plan.retry.map_or_else(Action::await_change, Action::requeue);
    if !plan.changed {
        return Ok(next);
    }
    let patch = json!({
        "apiVersion": format!("{}/{}", mesh_api::GROUP, mesh_api::VERSION),
        "kind": KIND,
        "status": plan.status,
    });
    let api: Api<MeshNode> = Api::all(ctx.client.clone());
    if !crate::context::write_status(&api, &name, &patch).await? {
        // Deleted between the cache read and the write (a member leaving, a collection): as the
        // branch above, release rather than leak, and no error to retry.
        forget(&owner, ctx);
        return Ok(Action::await_change());
    }
    ctx.metrics.wrote(KIND);
    ctx.emit(node, k8s_node.as_deref(), plan.events).await;
    Ok(next)
}

/// The MeshNode error policy.
pub fn error_policy(node: Arc<MeshNode>, error: &Error, ctx: Arc<Ctx>) -> Action {
    tracing::warn!(node = %node.name_any(), "reconcile failed: {error}");
    ctx.metrics.reconcile_errors.get_or_create(&KindLabel { kind: KIND }).inc();
    error.action()
}

/// Gives a Kubernetes Node its MeshNode, owned by the Node so that deleting one deletes the
/// other ([`rules::mirror`] decides). Does nothing when the MeshNode already carries the owner
/// reference.
pub async fn mirror(node: Arc<Node>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    ctx.caches_synced().await?;
    ctx.metrics.reconciles.get_or_create(&KindLabel { kind: "Node" }).inc();
    let name = node.name_any();
    let existing = ctx.mesh_nodes.get(&ObjectRef::new(&name));
    let uid = match rules::mirror(&node, existing.as_deref()) {
        rules::Mirror::Nothing => return Ok(Action::await_change()),
        rules::Mirror::Collision => {
            // An enrolled machine's: never adopted, or the machine and this Node's agent would
            // both write it. Its reconcile (woken by this Node's events too) reports the collision.
            tracing::warn!(node = %name, "a Kubernetes Node has the name of an enrolled machine's MeshNode: not mirrored");
            return Ok(Action::await_change());
        }
        rules::Mirror::Apply { uid } => uid,
    };
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
