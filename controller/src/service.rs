//! The MeshService reconciler: reads the caches, asks the pool for the service's address, and
//! writes what the rules ([`crate::rules::service`]) say its status and hosting are.

use std::sync::Arc;

use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use mesh_api::{MeshService, NetworkType};
use mesh_core::Owner;
use serde_json::json;

use crate::context::{Ctx, Error, is_there, remove_legacy_finalizer};
pub use crate::rules::service::owner_of;
use crate::rules::service::{self as rules, Allocation};

const KIND: &str = "MeshService";

/// Reconciles one MeshService. Its deletion is not the reconciler's business: the watch reports
/// it ([`on_watch_event`]).
pub async fn reconcile(service: Arc<MeshService>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    ctx.caches_synced().await?;
    ctx.metrics.reconciles.get_or_create(&crate::metrics::KindLabel { kind: KIND }).inc();
    let namespace = service.namespace().unwrap_or_default();
    let api: Api<MeshService> = Api::namespaced(ctx.client.clone(), &namespace);
    if remove_legacy_finalizer(&api, service.as_ref()).await? {
        ctx.metrics.wrote(KIND);
    }
    if service.meta().deletion_timestamp.is_some() {
        // Kept by someone else's finalizer: it keeps its address until it is gone.
        return Ok(Action::await_change());
    }
    apply(&service, &ctx).await
}

/// What a MeshService watch event means for the services that are gone (see
/// [`crate::gone::gone`]): each one's address is released (held back) and its hosting dropped;
/// at once for a deletion, after a check for what a re-list lacks.
pub fn on_watch_event(ctx: &Arc<Ctx>, event: &watcher::Event<MeshService>) {
    let tracked = || {
        let mut owners: std::collections::BTreeSet<Owner> = ctx
            .pool()
            .allocations()
            .filter(|(_, owner)| matches!(owner, Owner::Service { .. }))
            .map(|(_, owner)| owner.clone())
            .collect();
        owners.extend(ctx.index().hosted_services().cloned());
        owners
    };
    let relisted = matches!(event, watcher::Event::InitDone);
    for owner in crate::gone::gone(event, owner_of, || ctx.mesh_services.state(), tracked) {
        if relisted {
            tokio::spawn(confirm_gone(owner, ctx.clone()));
        } else {
            forget(&owner, ctx);
        }
    }
}

/// After a re-list that lacks a service the controller holds an address for: forgets it once a
/// consistent read ([`is_there`]) confirms that it is gone (a re-list served from a lagging
/// cache may lack a live object), and only if the watch has not brought it back meanwhile.
async fn confirm_gone(owner: Owner, ctx: Arc<Ctx>) {
    let Owner::Service { namespace, name } = &owner else { return };
    let api: Api<MeshService> = Api::namespaced(ctx.client.clone(), namespace);
    match is_there(&api, name).await {
        Ok(false) if ctx.mesh_services.get(&ObjectRef::new(name).within(namespace)).is_none() => {
            tracing::info!(service = %owner, "deleted while the watch was down");
            forget(&owner, &ctx);
        }
        Ok(_) => tracing::debug!(service = %owner, "missing from a re-list, but there: kept"),
        Err(err) => tracing::warn!(
            service = %owner,
            "missing from a re-list, and reading it failed: {err}; its address stays allocated until a later re-list shows it gone"
        ),
    }
}

/// The service is gone: release its address (held back) and its hosting.
fn forget(owner: &Owner, ctx: &Ctx) {
    if let Some(ip) = ctx.pool().release(owner, ctx.now()) {
        tracing::info!(service = %owner, %ip, "released mesh IP");
    }
    ctx.set_hosting(owner, None);
    ctx.observe_pool();
    // A same-named service elsewhere may now own the short name alone.
    if let Owner::Service { namespace, name } = owner {
        wake_namesakes(name, namespace, ctx);
    }
}

/// Asks the controller to reconcile every service named `name` in other namespaces than
/// `namespace` that competes with it for the short name.
fn wake_namesakes(name: &str, namespace: &str, ctx: &Ctx) {
    let others = rules::namesakes(name, namespace, &ctx.policy, &ctx.index());
    for other in others {
        ctx.trigger_service(&other, name);
    }
}

/// Reads the caches, asks the pool for the address, plans ([`rules::plan`]) and writes the
/// status only when the plan differs from what is there.
async fn apply(service: &MeshService, ctx: &Ctx) -> Result<Action, Error> {
    let owner = owner_of(service);
    let namespace = service.namespace().unwrap_or_default();
    let name = service.name_any();

    // The address: none for host services; else the requested one or any free one.
    let allocation = if service.spec.network.type_ == NetworkType::Host {
        if let Some(released) = ctx.pool().release(&owner, ctx.now()) {
            tracing::info!(service = %owner, ip = %released, "released mesh IP: the service is now type host");
        }
        Allocation::NotWanted
    } else {
        let requested = crate::context::requested_ip(service.spec.mesh_ip.as_deref())?;
        let mut pool = ctx.pool();
        match pool.allocate(&owner, requested, ctx.now()) {
            Ok(ip) => Allocation::Granted(ip),
            Err(error) => Allocation::Refused { kept: pool.address_of(&owner), error },
        }
    };
    if let Allocation::Granted(ip) = &allocation
        && service.status.as_ref().and_then(|s| s.mesh_ip.as_deref()) != Some(ip.to_string().as_str())
    {
        ctx.metrics.allocations.inc();
        tracing::info!(service = %owner, %ip, "allocated mesh IP");
    }
    ctx.observe_pool();

    let plan = rules::plan(service, &allocation, &ctx.policy, &ctx.index());
    ctx.set_hosting(&owner, plan.hosted.clone());
    if ctx.mesh_services.get(&ObjectRef::from_obj(service)).is_none() {
        // Deleted while this reconcile ran: the watch may have released the address before it
        // was allocated above, so release it (and the hosting) again rather than leak it.
        forget(&owner, ctx);
        return Ok(Action::await_change());
    }
    // Conflicts and exhaustion resolve when other objects go away: look again later, at a
    // pace that cannot become a retry storm.
    let next = plan.retry.map_or_else(Action::await_change, Action::requeue);
    if !plan.changed {
        return Ok(next);
    }
    let api: Api<MeshService> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = json!({
        "apiVersion": format!("{}/{}", mesh_api::GROUP, mesh_api::VERSION),
        "kind": KIND,
        "status": plan.status,
    });
    if !crate::context::write_status(&api, &name, &patch).await? {
        // Deleted between the cache read and the write (a member leaving, a collection): as the
        // branch above, release rather than leak, and no error to retry.
        forget(&owner, ctx);
        return Ok(Action::await_change());
    }
    ctx.metrics.wrote(KIND);
    if plan.wake_namesakes {
        wake_namesakes(&name, &namespace, ctx);
    }
    ctx.emit(service, None, plan.events).await;
    Ok(next)
}

/// The error policy: log, count, and retry as the error's kind says.
pub fn error_policy(service: Arc<MeshService>, error: &Error, ctx: Arc<Ctx>) -> Action {
    tracing::warn!(service = %owner_of(&service), "reconcile failed: {error}");
    ctx.metrics.reconcile_errors.get_or_create(&crate::metrics::KindLabel { kind: KIND }).inc();
    error.action()
}
