//! The MeshService reconciler: where a service is hosted, its mesh IP, and its status.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use mesh_api::conditions::{
    ALLOCATED, IP_CONFLICT, NO_READY_PODS, NODE_NOT_FOUND, PLACEMENT_DENIED, POOL_EXHAUSTED, READY, SHORT_NAME, Want,
    merge, same,
};
use mesh_api::{MeshService, MeshServiceStatus, NetworkType};
use mesh_core::Owner;
use serde_json::json;

use crate::conditions::refused;
use crate::context::{Ctx, Error, FIELD_MANAGER, Hosted, is_there, remove_legacy_finalizer};

const KIND: &str = "MeshService";

/// Who may place services on which node, and which services get short names: mesh-controller's
/// `--placement-namespaces` and `--short-name-namespaces` (chart values
/// `mesh.placementNamespaces`, `mesh.shortNameNamespaces`). In each list `*` is every namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Namespaces whose services may name a MeshNode in `spec.node` when the MeshNode does not
    /// list its own (`spec.serviceNamespaces`); never on control-plane nodes.
    pub placement_namespaces: Vec<String>,
    /// Namespaces whose services get `<service>.mesh.local`.
    pub short_name_namespaces: Vec<String>,
}

impl Default for Policy {
    /// `default` only, for both.
    fn default() -> Self {
        Self { placement_namespaces: vec!["default".into()], short_name_namespaces: vec!["default".into()] }
    }
}

fn listed(list: &[String], namespace: &str) -> bool {
    list.iter().any(|n| n == "*" || n == namespace)
}

/// Labels that make a Kubernetes Node a control-plane node.
const CONTROL_PLANE_LABELS: [&str; 2] = ["node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master"];

/// Whether a service in `namespace` may be hosted on `node` through `spec.node`, and if not why.
fn placement_allowed(namespace: &str, node: &mesh_api::MeshNode, ctx: &Ctx) -> Result<(), String> {
    let name = node.name_any();
    match &node.spec.service_namespaces {
        Some(list) if listed(list, namespace) => Ok(()),
        Some(list) => Err(format!(
            "MeshNode {name} permits spec.node placements only from namespace(s) [{}] (its spec.serviceNamespaces), not \
             from {namespace}; ask its administrator to add {namespace}, or back the service with pods (spec.selector)",
            list.join(", ")
        )),
        None => {
            let control_plane = ctx
                .nodes
                .get(&ObjectRef::new(&name))
                .is_some_and(|n| CONTROL_PLANE_LABELS.iter().any(|l| n.labels().contains_key(*l)));
            if control_plane {
                Err(format!(
                    "MeshNode {name} is a control-plane node: it takes spec.node placements only from namespaces its \
                     spec.serviceNamespaces lists, and lists none"
                ))
            } else if listed(&ctx.policy.placement_namespaces, namespace) {
                Ok(())
            } else {
                Err(format!(
                    "MeshNode {name} permits spec.node placements only from namespace(s) [{}] (mesh-controller's \
                     --placement-namespaces), not from {namespace}; set the MeshNode's spec.serviceNamespaces to allow it",
                    ctx.policy.placement_namespaces.join(", ")
                ))
            }
        }
    }
}

/// Whether `node` can take one more service: at most [`mesh_api::MAX_PLACED_SERVICES_PER_NODE`]
/// services are hosted on one node, so that its peer entry always fits its schema bound.
fn node_has_room(owner: &Owner, node: &str, ctx: &Ctx) -> Result<(), String> {
    let hosted = ctx.hosting().iter().filter(|(o, h)| *o != owner && h.node == node).count();
    if hosted < mesh_api::MAX_PLACED_SERVICES_PER_NODE {
        Ok(())
    } else {
        Err(format!(
            "MeshNode {node} already hosts {hosted} services, the most one node may (its peer entry lists each one's \
             mesh IP); place the service on another node"
        ))
    }
}
/// How often a service whose address is refused (conflict, exhaustion) looks again.
pub const RETRY_ALLOCATION_SECS: u64 = 10;

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

/// The owner of a service's address.
pub fn owner_of(service: &MeshService) -> Owner {
    Owner::service(service.namespace().unwrap_or_default(), service.name_any())
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
        owners.extend(ctx.hosting().keys().cloned());
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

/// The short name a service is not reachable by, whatever happens: `node.mesh.local` would be the
/// parent of every node's name.
const RESERVED_SHORT_NAMES: [&str; 1] = ["node"];

/// Other live services named `name` in namespaces other than `namespace`, as `namespace`
/// strings.
fn namesakes(name: &str, namespace: &str, ctx: &Ctx) -> Vec<String> {
    // Only namespaces that may have short names compete for them.
    let mut others: Vec<String> = ctx
        .mesh_services
        .state()
        .iter()
        .filter(|s| s.name_any() == name && s.meta().deletion_timestamp.is_none())
        .filter_map(|s| s.namespace())
        .filter(|ns| ns != namespace && listed(&ctx.policy.short_name_namespaces, ns))
        .collect();
    others.sort();
    others
}

/// Asks the controller to reconcile every service named `name` in other namespaces than
/// `namespace`.
fn wake_namesakes(name: &str, namespace: &str, ctx: &Ctx) {
    for other in namesakes(name, namespace, ctx) {
        let _ = ctx.service_trigger.send(ObjectRef::new(name).within(&other));
    }
}

/// Whether `<name>.mesh.local` resolves to this service, and why not.
fn short_name(service: &MeshService, ctx: &Ctx) -> Want {
    let (name, namespace) = (service.name_any(), service.namespace().unwrap_or_default());
    if RESERVED_SHORT_NAMES.contains(&name.as_str()) {
        return Want::no(
            SHORT_NAME,
            "Reserved",
            format!("{name}.mesh.local is reserved (node names live under it); use {name}.{namespace}.mesh.local"),
        );
    }
    if !listed(&ctx.policy.short_name_namespaces, &namespace) {
        return Want::no(
            SHORT_NAME,
            "NamespaceNotListed",
            format!(
                "{name}.mesh.local is reserved for services in namespace(s) [{}] (--short-name-namespaces), so that no \
                 other namespace can take it; use {name}.{namespace}.mesh.local",
                ctx.policy.short_name_namespaces.join(", ")
            ),
        );
    }
    let others = namesakes(&name, &namespace, ctx);
    if others.is_empty() {
        Want::yes(SHORT_NAME, "Unique", format!("{name}.mesh.local resolves to this service"))
    } else {
        Want::no(
            SHORT_NAME,
            "Ambiguous",
            format!(
                "{name}.mesh.local is not published: namespace(s) {} also have a MeshService named {name}; use \
                 {name}.{namespace}.mesh.local",
                others.join(", ")
            ),
        )
    }
}

/// Where a service runs: the MeshNode, and the pod IP to forward to when the backing pod is on
/// the pod network.
#[derive(Clone, Debug, PartialEq)]
struct Host {
    node: String,
    pod_ip: Option<String>,
}

/// Where the service runs now, or the (true) condition that says why it runs nowhere.
fn resolve_host(service: &MeshService, ctx: &Ctx) -> Result<Host, Want> {
    if let Some(node) = &service.spec.node {
        let namespace = service.namespace().unwrap_or_default();
        return if let Some(mesh_node) = ctx.mesh_nodes.get(&ObjectRef::new(node)) {
            placement_allowed(&namespace, &mesh_node, ctx)
                .and_then(|()| node_has_room(&owner_of(service), node, ctx))
                .map(|()| Host { node: node.clone(), pod_ip: None })
                .map_err(|why| Want::yes(PLACEMENT_DENIED, "PlacementDenied", why))
        } else {
            Err(Want::yes(
                NODE_NOT_FOUND,
                "NodeNotFound",
                format!("spec.node names the MeshNode {node:?}, which does not exist; create it or enroll the machine"),
            ))
        };
    }
    let selector = service.spec.selector.clone().unwrap_or_default();
    let namespace = service.namespace().unwrap_or_default();
    let mut ready: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|pod| pod.namespace().as_deref() == Some(namespace.as_str()) && selects(&selector, pod.labels()))
        .filter(|pod| is_ready(pod) && pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
        .collect();
    // The oldest ready pod hosts the service, so hosting does not flap as pods come and go.
    ready.sort_by_key(|pod| (pod.creation_timestamp().map(|t| t.0), pod.name_any()));
    match ready.first().and_then(|pod| Some((pod, pod.spec.as_ref()?.node_name.clone()?))) {
        Some((pod, node)) => Ok(Host { node, pod_ip: pod_network_ip(pod) }),
        None => Err(Want::yes(
            NO_READY_PODS,
            "NoReadyPods",
            format!("no ready pod in namespace {namespace} matches spec.selector {selector:?}"),
        )),
    }
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The pod's IPv4 address on the pod network; `None` for a host-network pod, whose address is
/// the node's own (the agent then has nothing to forward: the process listens on the node).
fn pod_network_ip(pod: &Pod) -> Option<String> {
    if pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false) {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ips = status.pod_ips.iter().flatten().map(|ip| ip.ip.as_str()).chain(status.pod_ip.as_deref());
    ips.filter(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok()).map(str::to_owned).next()
}

fn is_ready(pod: &Pod) -> bool {
    let deleting = pod.metadata.deletion_timestamp.is_some();
    let ready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    ready && !deleting
}

async fn apply(service: &MeshService, ctx: &Ctx) -> Result<Action, Error> {
    let owner = owner_of(service);
    let namespace = service.namespace().unwrap_or_default();
    let name = service.name_any();
    let mut wants = Vec::new();

    // The address: none for host services; else the requested one or any free one.
    let wants_ip = service.spec.network.type_ != NetworkType::Host;
    let mut ip = None;
    let mut warning = None;
    if wants_ip {
        let requested = match service.spec.mesh_ip.as_deref().map(mesh_core::parse_mesh_ip).transpose() {
            Ok(requested) => requested,
            Err(e) => return Err(Error::Permanent(e.to_string())),
        };
        let result = ctx.pool().allocate(&owner, requested, ctx.now());
        match result {
            Ok(addr) => {
                if service.status.as_ref().and_then(|s| s.mesh_ip.as_deref()) != Some(addr.to_string().as_str()) {
                    ctx.metrics.allocations.inc();
                    tracing::info!(service = %owner, ip = %addr, "allocated mesh IP");
                }
                ip = Some(addr);
                wants.push(Want::yes(ALLOCATED, "Allocated", format!("mesh IP {addr} is allocated")));
            }
            Err(err) => {
                let (reason, refusal) = refused(&err);
                // The previous address (if any) stays the owner's: a refused request loses nothing.
                ip = ctx.pool().address_of(&owner);
                wants.extend(refusal);
                warning = Some((reason, err.to_string()));
            }
        }
    } else if let Some(released) = ctx.pool().release(&owner, ctx.now()) {
        tracing::info!(service = %owner, ip = %released, "released mesh IP: the service is now type host");
    }
    ctx.observe_pool();

    // Where it runs.
    let host = resolve_host(service, ctx);
    ctx.set_hosting(
        &owner,
        match (&host, ip) {
            (Ok(host), Some(ip)) => Some(Hosted { node: host.node.clone(), ip }),
            _ => None,
        },
    );
    if ctx.mesh_services.get(&ObjectRef::from_obj(service)).is_none() {
        // Deleted while this reconcile ran: the watch may have released the address before it
        // was allocated above, so release it (and the hosting) again rather than leak it.
        forget(&owner, ctx);
        return Ok(Action::await_change());
    }
    let ready = match (&host, &warning) {
        (Err(why), _) => {
            let message = why.message.clone();
            wants.push(why.clone());
            Want::no(READY, why.reason, message)
        }
        (Ok(_), Some((reason, message))) => Want::no(READY, reason, message.clone()),
        (Ok(Host { node, .. }), None)
            if service.spec.network.type_ == NetworkType::Mesh && without_tunnel(node, ctx) =>
        {
            Want::no(READY, NO_TUNNEL, no_tunnel_message(node))
        }
        (Ok(Host { node, pod_ip }), None) => match (ip, pod_ip) {
            (Some(ip), Some(pod_ip)) => Want::yes(
                READY,
                "Hosted",
                format!("reachable at {ip} on MeshNode {node}, forwarded to pod IP {pod_ip}"),
            ),
            (Some(ip), None) => Want::yes(READY, "Hosted", format!("reachable at {ip} on MeshNode {node}")),
            (None, _) => Want::yes(READY, "Hosted", format!("host service on MeshNode {node}")),
        },
    };
    wants.push(ready);
    wants.push(short_name(service, ctx));

    let current = service.status.clone().unwrap_or_default();
    let conditions = merge(&current.conditions, &wants, service.meta().generation);
    let desired = MeshServiceStatus {
        mesh_ip: ip.map(|ip| ip.to_string()),
        dns_name: Some(format!("{name}.{namespace}.mesh.local")),
        node: host.as_ref().ok().map(|h| h.node.clone()),
        pod_ip: host.as_ref().ok().and_then(|h| h.pod_ip.clone()),
        observed_generation: service.meta().generation,
        conditions,
    };
    let unchanged = current.mesh_ip == desired.mesh_ip
        && current.dns_name == desired.dns_name
        && current.node == desired.node
        && current.pod_ip == desired.pod_ip
        && current.observed_generation == desired.observed_generation
        && same(&current.conditions, &desired.conditions);
    // Conflicts and exhaustion resolve when other objects go away: look again later, at a
    // pace that cannot become a retry storm.
    let next = match &warning {
        Some(_) => Action::requeue(Duration::from_secs(RETRY_ALLOCATION_SECS)),
        None => Action::await_change(),
    };
    if unchanged {
        return Ok(next);
    }
    let newly_failing = |type_: &str| {
        desired.conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
            && !current.conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
    };
    let api: Api<MeshService> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = json!({
        "apiVersion": format!("{}/{}", mesh_api::GROUP, mesh_api::VERSION),
        "kind": KIND,
        "status": desired,
    });
    api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    ctx.metrics.wrote(KIND);
    let short_name_of = |conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]| {
        conditions.iter().find(|c| c.type_ == SHORT_NAME).map(|c| (c.status.clone(), c.message.clone()))
    };
    if short_name_of(&current.conditions) != short_name_of(&desired.conditions) {
        wake_namesakes(&name, &namespace, ctx);
    }

    for type_ in [IP_CONFLICT, POOL_EXHAUSTED] {
        if newly_failing(type_)
            && let Some((reason, message)) = &warning
        {
            ctx.event(service, EventType::Warning, reason, "AllocateMeshIP", message.clone()).await;
        }
    }
    let no_tunnel = |conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]| {
        conditions.iter().any(|c| c.type_ == READY && c.reason == NO_TUNNEL)
    };
    if let Some(node) = &desired.node
        && no_tunnel(&desired.conditions)
        && !no_tunnel(&current.conditions)
    {
        ctx.event(service, EventType::Warning, NO_TUNNEL, "OfferService", no_tunnel_message(node)).await;
    }
    if let Err(why) = &host
        && current.conditions.iter().all(|c| c.type_ != why.type_)
    {
        ctx.event(service, EventType::Warning, why.reason, "ResolveHost", why.message.clone()).await;
    }
    Ok(next)
}

/// The Ready reason of a `mesh` service hosted on a node without a tunnel.
const NO_TUNNEL: &str = "NoTunnel";

/// Whether MeshNode `node` runs without WireGuard (backend none): a `mesh` service there is never
/// offered, since its only way in would be the node's underlay address, in plaintext.
fn without_tunnel(node: &str, ctx: &Ctx) -> bool {
    ctx.mesh_nodes
        .get(&ObjectRef::new(node))
        .is_some_and(|n| n.status.as_ref().and_then(|s| s.backend) == Some(mesh_api::Backend::None))
}

fn no_tunnel_message(node: &str) -> String {
    format!(
        "MeshNode {node} runs without WireGuard (backend none; its Connected condition says why), and a mesh \
         service is never offered in plaintext at a host address: its name does not resolve until the node has a \
         tunnel or the service moves to a node that has one; use type dual or host to serve it in the clear"
    )
}

/// The error policy: log, count, and retry as the error's kind says.
pub fn error_policy(service: Arc<MeshService>, error: &Error, ctx: Arc<Ctx>) -> Action {
    tracing::warn!(service = %owner_of(&service), "reconcile failed: {error}");
    ctx.metrics.reconcile_errors.get_or_create(&crate::metrics::KindLabel { kind: KIND }).inc();
    error.action()
}
