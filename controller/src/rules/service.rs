//! The MeshService rules: where a service is hosted, its status (mesh IP, node, pod IP,
//! conditions), the hosting the node's peer entry takes in, and the events to publish.

use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use mesh_api::conditions::{
    ALLOCATED, IP_CONFLICT, NO_READY_PODS, NODE_NOT_FOUND, PLACEMENT_DENIED, POOL_EXHAUSTED, READY, SHORT_NAME, Want,
    merge,
};
use mesh_api::{Backend, MeshNode, MeshService, MeshServiceStatus, NetworkType};
use mesh_core::{IpamError, Owner};

use super::index::{Hosted, Index, is_control_plane, selects};
use super::{Emit, On, has_reason, holds, same_conditions};
use crate::conditions::refused;

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
    /// The DNS zone (`--zone`, chart `mesh.zone`): `status.dnsName` and the messages name it.
    pub zone: String,
}

impl Default for Policy {
    /// `default` only, for both.
    fn default() -> Self {
        Self {
            placement_namespaces: vec!["default".into()],
            short_name_namespaces: vec!["default".into()],
            zone: mesh_dataplane::dns::ZONE.into(),
        }
    }
}

/// Whether `namespace` is in `list` (`*` is every namespace).
pub fn listed(list: &[String], namespace: &str) -> bool {
    list.iter().any(|n| n == "*" || n == namespace)
}

/// How often a service whose address is refused (conflict, exhaustion) looks again.
pub const RETRY_ALLOCATION: Duration = Duration::from_secs(10);

/// The Ready reason of a `mesh` service hosted on a node without a tunnel.
pub const NO_TUNNEL: &str = "NoTunnel";

/// The short names no service gets, whatever happens: `node.mesh.local` would be the parent of
/// every node's name.
const RESERVED_SHORT_NAMES: [&str; 1] = ["node"];

/// What the pool answered for the service's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// A `host` service: it has no mesh IP.
    NotWanted,
    /// The address is the service's.
    Granted(Ipv4Addr),
    /// The request was refused; the service keeps `kept`, the address it had.
    Refused {
        /// The address the service still holds.
        kept: Option<Ipv4Addr>,
        /// Why the request was refused.
        error: IpamError,
    },
}

impl Allocation {
    /// The service's address, whatever the answer.
    pub fn ip(&self) -> Option<Ipv4Addr> {
        match self {
            Self::NotWanted => None,
            Self::Granted(ip) => Some(*ip),
            Self::Refused { kept, .. } => *kept,
        }
    }
}

/// Where a service runs: the MeshNode, and the pod IP to forward to when the backing pod is on
/// the pod network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// The hosting MeshNode.
    pub node: String,
    /// The pod's IPv4 address on the pod network, if any.
    pub pod_ip: Option<String>,
}

/// What the service should look like, and what follows from it.
#[derive(Clone, Debug, PartialEq)]
pub struct ServicePlan {
    /// The status to write.
    pub status: MeshServiceStatus,
    /// Whether it differs from the status the object has (only then is it written).
    pub changed: bool,
    /// Where the service IP is hosted now (goes into that node's peer entry).
    pub hosted: Option<Hosted>,
    /// Events to publish once the status is written.
    pub events: Vec<Emit>,
    /// Whether the short-name verdict changed, so same-named services elsewhere are to be
    /// reconciled again.
    pub wake_namesakes: bool,
    /// When to look again though nothing changes (a refused address may come free).
    pub retry: Option<Duration>,
}

/// The owner of a service's address.
pub fn owner_of(service: &MeshService) -> Owner {
    Owner::service(service.namespace().unwrap_or_default(), service.name_any())
}

/// The plan for `service` (see [`ServicePlan`]).
pub fn plan(service: &MeshService, allocation: &Allocation, policy: &Policy, index: &Index) -> ServicePlan {
    let (name, namespace) = (service.name_any(), service.namespace().unwrap_or_default());
    let ip = allocation.ip();
    let mut wants = Vec::new();
    let mut warning = None;
    match allocation {
        Allocation::NotWanted => {}
        Allocation::Granted(ip) => wants.push(Want::yes(ALLOCATED, "Allocated", format!("mesh IP {ip} is allocated"))),
        Allocation::Refused { error, .. } => {
            let (reason, refusal) = refused(error);
            wants.extend(refusal);
            warning = Some((reason, error.to_string()));
        }
    }
    let host = resolve_host(service, policy, index);
    let hosted = match (&host, ip) {
        (Ok(host), Some(ip)) => Some(Hosted { node: host.node.clone(), ip }),
        _ => None,
    };
    let ready = match (&host, &warning) {
        (Err(why), _) => {
            wants.push(why.clone());
            Want::no(READY, why.reason, why.message.clone())
        }
        (Ok(_), Some((reason, message))) => Want::no(READY, reason, message.clone()),
        (Ok(Host { node, .. }), None)
            if service.spec.network.type_ == NetworkType::Mesh && without_tunnel(index.mesh_node(node)) =>
        {
            Want::no(READY, NO_TUNNEL, no_tunnel_message(node))
        }
        (Ok(Host { node, .. }), None) if service.spec.container.is_some() => container_ready(service, node, ip, index),
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
    wants.push(short_name(&name, &namespace, policy, index));

    let current = service.status.clone().unwrap_or_default();
    let generation = service.metadata.generation;
    let status = MeshServiceStatus {
        mesh_ip: ip.map(|ip| ip.to_string()),
        dns_name: Some(format!("{name}.{namespace}.{}", policy.zone)),
        node: host.as_ref().ok().map(|h| h.node.clone()),
        pod_ip: host.as_ref().ok().and_then(|h| h.pod_ip.clone()),
        observed_generation: generation,
        conditions: merge(&current.conditions, &wants, generation),
    };
    let changed = current.mesh_ip != status.mesh_ip
        || current.dns_name != status.dns_name
        || current.node != status.node
        || current.pod_ip != status.pod_ip
        || current.observed_generation != status.observed_generation
        || !same_conditions(&current.conditions, &status.conditions);

    let mut events = Vec::new();
    if changed {
        let newly = |type_: &str| holds(&status.conditions, type_) && !holds(&current.conditions, type_);
        if let Some((reason, message)) = &warning
            && (newly(IP_CONFLICT) || newly(POOL_EXHAUSTED))
        {
            events.push(Emit::warning(On::Object, *reason, "AllocateMeshIP", message.clone()));
        }
        if let Some(node) = &status.node
            && has_reason(&status.conditions, READY, NO_TUNNEL)
            && !has_reason(&current.conditions, READY, NO_TUNNEL)
        {
            events.push(Emit::warning(On::Object, NO_TUNNEL, "OfferService", no_tunnel_message(node)));
        }
        // A container service going not Ready for its container: once per reason.
        if service.spec.container.is_some()
            && let Some(ready) = status.conditions.iter().find(|c| c.type_ == READY && c.status == "False")
            && (ready.reason == CONTAINER_NOT_READY || CONTAINER_REASONS.iter().any(|(_, r)| *r == ready.reason))
            && !has_reason(&current.conditions, READY, &ready.reason)
        {
            events.push(Emit::warning(On::Object, ready.reason.clone(), "ForwardToContainer", ready.message.clone()));
        }
        if let Err(why) = &host
            && current.conditions.iter().all(|c| c.type_ != why.type_)
        {
            events.push(Emit::warning(On::Object, why.reason, "ResolveHost", why.message.clone()));
        }
    }
    let short = |conditions: &[Condition]| {
        conditions.iter().find(|c| c.type_ == SHORT_NAME).map(|c| (c.status.clone(), c.message.clone()))
    };
    ServicePlan {
        wake_namesakes: changed && short(&current.conditions) != short(&status.conditions),
        status,
        changed,
        hosted,
        events,
        retry: warning.map(|_| RETRY_ALLOCATION),
    }
}

/// The namespaces, other than `namespace`, whose services named `name` compete with it for the
/// short name (only namespaces that may have short names do), sorted.
pub fn namesakes(name: &str, namespace: &str, policy: &Policy, index: &Index) -> Vec<String> {
    let mut others = index.namesakes(name, namespace);
    others.retain(|ns| listed(&policy.short_name_namespaces, ns));
    others
}

/// Whether `<name>.mesh.local` resolves to the service `namespace/name`, and why not.
pub fn short_name(name: &str, namespace: &str, policy: &Policy, index: &Index) -> Want {
    let zone = &policy.zone;
    if RESERVED_SHORT_NAMES.contains(&name) {
        return Want::no(
            SHORT_NAME,
            "Reserved",
            format!("{name}.{zone} is reserved (node names live under it); use {name}.{namespace}.{zone}"),
        );
    }
    if !listed(&policy.short_name_namespaces, namespace) {
        return Want::no(
            SHORT_NAME,
            "NamespaceNotListed",
            format!(
                "{name}.{zone} is reserved for services in namespace(s) [{}] (--short-name-namespaces), so that no \
                 other namespace can take it; use {name}.{namespace}.{zone}",
                policy.short_name_namespaces.join(", ")
            ),
        );
    }
    let others = namesakes(name, namespace, policy, index);
    if others.is_empty() {
        Want::yes(SHORT_NAME, "Unique", format!("{name}.{zone} resolves to this service"))
    } else {
        Want::no(
            SHORT_NAME,
            "Ambiguous",
            format!(
                "{name}.{zone} is not published: namespace(s) {} also have a MeshService named {name}; use \
                 {name}.{namespace}.{zone}",
                others.join(", ")
            ),
        )
    }
}

/// Whether a service in `namespace` may be hosted on `node` through `spec.node`, and if not why.
pub fn placement_allowed(namespace: &str, node: &MeshNode, policy: &Policy, index: &Index) -> Result<(), String> {
    let name = node.name_any();
    match &node.spec.service_namespaces {
        Some(list) if listed(list, namespace) => Ok(()),
        Some(list) => Err(format!(
            "MeshNode {name} permits spec.node placements only from namespace(s) [{}] (its spec.serviceNamespaces), not \
             from {namespace}; ask its administrator to add {namespace}, or back the service with pods (spec.selector)",
            list.join(", ")
        )),
        None if index.k8s_node(&name).is_some_and(is_control_plane) => Err(format!(
            "MeshNode {name} is a control-plane node: it takes spec.node placements only from namespaces its \
             spec.serviceNamespaces lists, and lists none"
        )),
        None if listed(&policy.placement_namespaces, namespace) => Ok(()),
        None => Err(format!(
            "MeshNode {name} permits spec.node placements only from namespace(s) [{}] (mesh-controller's \
             --placement-namespaces), not from {namespace}; set the MeshNode's spec.serviceNamespaces to allow it",
            policy.placement_namespaces.join(", ")
        )),
    }
}

/// Whether `node` can take one more service: at most [`mesh_api::MAX_PLACED_SERVICES_PER_NODE`]
/// services are hosted on one node, so that its peer entry always fits its schema bound.
pub fn node_has_room(owner: &Owner, node: &str, index: &Index) -> Result<(), String> {
    let hosted = index.hosted_count_except(node, owner);
    if hosted < mesh_api::MAX_PLACED_SERVICES_PER_NODE {
        Ok(())
    } else {
        Err(format!(
            "MeshNode {node} already hosts {hosted} services, the most one node may (its peer entry lists each one's \
             mesh IP); place the service on another node"
        ))
    }
}

/// The `meshctl connect` user a MeshService or MeshNode belongs to (its
/// [`mesh_api::CONNECT_OWNER_ANNOTATION`]), if any.
pub fn connect_owner<K: kube::Resource>(obj: &K) -> Option<&str> {
    obj.meta().annotations.as_ref()?.get(mesh_api::CONNECT_OWNER_ANNOTATION).map(String::as_str)
}

/// Whether `service` may be hosted on `node` as far as `meshctl connect` ownership goes: a
/// service exposed by a connecting user (it carries the connect-owner annotation) may be placed
/// only on an ephemeral MeshNode of the same user, so that a laptop can never pull traffic meant
/// for a cluster node or another user's laptop. A service without the annotation is not
/// concerned (the other placement rules apply, on ephemeral nodes as elsewhere).
pub fn connect_placement_allowed(service: &MeshService, node: Option<&MeshNode>) -> Result<(), String> {
    let Some(owner) = connect_owner(service) else {
        return Ok(());
    };
    let annotation = mesh_api::CONNECT_OWNER_ANNOTATION;
    let Some(node) = node else {
        return Err(format!(
            "this service was exposed by meshctl connect for user {owner} ({annotation}: {owner}), so it is placed \
             only on an ephemeral MeshNode of {owner} (spec.node), and it names none; set spec.node to {owner}'s \
             connected MeshNode"
        ));
    };
    let name = node.name_any();
    match connect_owner(node) {
        Some(node_owner) if node_owner == owner => Ok(()),
        Some(node_owner) => Err(format!(
            "this service was exposed by meshctl connect for user {owner} ({annotation}: {owner}), but MeshNode {name} \
             is the ephemeral member of user {node_owner}; a connected user's services are placed only on their own \
             MeshNode"
        )),
        None => Err(format!(
            "this service was exposed by meshctl connect for user {owner} ({annotation}: {owner}), but MeshNode {name} \
             is not an ephemeral member of {owner} (it has no {annotation}); a connected user's services are placed \
             only on their own MeshNode"
        )),
    }
}

/// Where the service runs now, or the (true) condition that says why it runs nowhere.
pub fn resolve_host(service: &MeshService, policy: &Policy, index: &Index) -> Result<Host, Want> {
    let namespace = service.namespace().unwrap_or_default();
    let denied = |why| Want::yes(PLACEMENT_DENIED, "PlacementDenied", why);
    if let Some(node) = &service.spec.node {
        let Some(mesh_node) = index.mesh_node(node) else {
            return Err(Want::yes(
                NODE_NOT_FOUND,
                "NodeNotFound",
                format!("spec.node names the MeshNode {node:?}, which does not exist; create it or enroll the machine"),
            ));
        };
        return connect_placement_allowed(service, Some(mesh_node))
            .and_then(|()| placement_allowed(&namespace, mesh_node, policy, index))
            .and_then(|()| node_has_room(&owner_of(service), node, index))
            .map(|()| Host { node: node.clone(), pod_ip: None })
            .map_err(denied);
    }
    connect_placement_allowed(service, None).map_err(denied)?;
    let selector = service.spec.selector.clone().unwrap_or_default();
    // The oldest ready pod hosts the service, so hosting does not flap as pods come and go.
    let oldest = index
        .pods_in(&namespace)
        .filter(|pod| selects(&selector, pod.labels()) && is_ready(pod))
        .filter_map(|pod| Some((pod, pod.spec.as_ref()?.node_name.clone()?)))
        .min_by_key(|(pod, _)| (pod.creation_timestamp().map(|t| t.0), pod.name_any()));
    match oldest {
        Some((pod, node)) => Ok(Host { node, pod_ip: pod_network_ip(pod) }),
        None => Err(Want::yes(
            NO_READY_PODS,
            "NoReadyPods",
            format!("no ready pod in namespace {namespace} matches spec.selector {selector:?}"),
        )),
    }
}

/// The pod's IPv4 address on the pod network; `None` for a host-network pod, whose address is
/// the node's own (the agent then has nothing to forward: the process listens on the node).
pub fn pod_network_ip(pod: &Pod) -> Option<String> {
    if pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false) {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ips = status.pod_ips.iter().flatten().map(|ip| ip.ip.as_str()).chain(status.pod_ip.as_deref());
    ips.filter(|ip| ip.parse::<Ipv4Addr>().is_ok()).map(str::to_owned).next()
}

/// Whether the pod is Ready and not being deleted.
pub fn is_ready(pod: &Pod) -> bool {
    let ready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    ready && pod.metadata.deletion_timestamp.is_none()
}

/// The agent's reasons for a container that is not ready (`status.containers[].reason`) and the
/// service's Ready reason for each (each becomes a Warning event once).
const CONTAINER_REASONS: [(&str, &str); 5] = [
    ("NotRunning", "ContainerNotRunning"),
    ("NotFound", "ContainerNotFound"),
    ("NoAddress", "ContainerNoAddress"),
    ("NoEngine", "NoContainerEngine"),
    ("Refused", "ContainerRefused"),
];

/// The Ready reason for a container the agent reports not ready with `reason`.
const CONTAINER_NOT_READY: &str = "ContainerNotReady";

/// The Ready condition of a service backed by a container on `node`: what that node's agent
/// reports of it in `status.containers`.
fn container_ready(service: &MeshService, node: &str, ip: Option<Ipv4Addr>, index: &Index) -> Want {
    let key = format!("{}/{}", service.namespace().unwrap_or_default(), service.name_any());
    let name = service.spec.container.as_ref().map(|c| c.name.as_str()).unwrap_or_default();
    let reported = index
        .mesh_node(node)
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.containers.iter().find(|c| c.service == key && c.container == name));
    match reported {
        None => Want::no(
            READY,
            "ContainerPending",
            format!("waiting for the agent of MeshNode {node} to look for container {name} in its container engine"),
        ),
        Some(c) if !c.ready => {
            let reason = CONTAINER_REASONS
                .iter()
                .find(|(agent, _)| *agent == c.reason)
                .map_or(CONTAINER_NOT_READY, |(_, ready)| ready);
            Want::no(READY, reason, format!("MeshNode {node}: {}", c.message))
        }
        Some(c) => Want::yes(
            READY,
            "Hosted",
            format!(
                "reachable at {} on MeshNode {node}, forwarded to container {name} at {}",
                ip.map(|ip| ip.to_string()).unwrap_or_default(),
                c.ip.as_deref().unwrap_or_default()
            ),
        ),
    }
}

/// Whether the MeshNode runs without WireGuard (backend none): a `mesh` service there is never
/// offered, since its only way in would be the node's underlay address, in plaintext.
fn without_tunnel(node: Option<&MeshNode>) -> bool {
    node.is_some_and(|n| n.status.as_ref().and_then(|s| s.backend) == Some(Backend::None))
}

fn no_tunnel_message(node: &str) -> String {
    format!(
        "MeshNode {node} runs without WireGuard (backend none; its Connected condition says why), and a mesh \
         service is never offered in plaintext at a host address: its name does not resolve until the node has a \
         tunnel or the service moves to a node that has one; use type dual or host to serve it in the clear"
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use mesh_api::conditions::CONNECTED;
    use serde_json::json;

    use super::*;
    use crate::rules::fixtures::{aged, agent_node, condition, k8s_node, mesh_node, pod, service};

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().expect("an IPv4 address")
    }

    fn granted(text: &str) -> Allocation {
        Allocation::Granted(ip(text))
    }

    fn with_nodes(names: &[&str]) -> Index {
        let mut index = Index::new();
        for name in names {
            index.apply_mesh_node(agent_node(name, Some(&format!("key-{name}"))));
        }
        index
    }

    fn cond(plan: &ServicePlan, type_: &str) -> (String, String, String) {
        condition(&plan.status.conditions, type_).unwrap_or_else(|| panic!("no {type_} condition"))
    }

    fn with_status(mut s: MeshService, status: MeshServiceStatus) -> MeshService {
        s.status = Some(status);
        s
    }

    #[test]
    fn another_zone_names_the_service_and_its_short_name() {
        let index = with_nodes(&["n1"]);
        let s = service("default", "web", json!({"node": "n1"}));
        let policy = Policy { zone: "mesh.internal".into(), ..Policy::default() };
        let plan = plan(&s, &granted("10.42.0.5"), &policy, &index);
        assert_eq!(plan.status.dns_name.as_deref(), Some("web.default.mesh.internal"));
        assert_eq!(cond(&plan, SHORT_NAME).2, "web.mesh.internal resolves to this service");
    }

    #[test]
    fn a_placed_service_gets_its_ip_its_node_and_a_short_name() {
        let index = with_nodes(&["n1"]);
        let s = service("default", "web", json!({"node": "n1"}));
        let plan = plan(&s, &granted("10.42.0.5"), &Policy::default(), &index);
        assert_eq!(plan.status.mesh_ip.as_deref(), Some("10.42.0.5"));
        assert_eq!(plan.status.node.as_deref(), Some("n1"));
        assert_eq!(plan.status.pod_ip, None);
        assert_eq!(plan.status.dns_name.as_deref(), Some("web.default.mesh.local"));
        assert_eq!(plan.status.observed_generation, Some(1));
        assert_eq!(plan.hosted, Some(Hosted { node: "n1".into(), ip: ip("10.42.0.5") }));
        assert_eq!(
            cond(&plan, ALLOCATED),
            ("True".into(), "Allocated".into(), "mesh IP 10.42.0.5 is allocated".into())
        );
        assert_eq!(
            cond(&plan, READY),
            ("True".into(), "Hosted".into(), "reachable at 10.42.0.5 on MeshNode n1".into())
        );
        assert_eq!(cond(&plan, SHORT_NAME).1, "Unique");
        assert!(plan.changed && plan.events.is_empty() && plan.retry.is_none() && plan.wake_namesakes);
    }

    #[test]
    fn a_missing_node_is_reported_once_and_hosts_nothing() {
        let s = service("default", "web", json!({"node": "ghost"}));
        let plan = plan(&s, &granted("10.42.0.5"), &Policy::default(), &Index::new());
        assert_eq!(plan.hosted, None);
        assert_eq!(plan.status.node, None);
        assert_eq!(plan.status.mesh_ip.as_deref(), Some("10.42.0.5"), "the address is kept while it waits");
        let (status, reason, message) = cond(&plan, NODE_NOT_FOUND);
        assert_eq!((status.as_str(), reason.as_str()), ("True", "NodeNotFound"));
        assert!(message.contains("\"ghost\"") && message.contains("enroll"), "{message}");
        assert_eq!(cond(&plan, READY).1, "NodeNotFound");
        assert_eq!(plan.events.len(), 1);
        assert_eq!((plan.events[0].reason.as_str(), plan.events[0].action), ("NodeNotFound", "ResolveHost"));
        // Already reported: the next reconcile writes nothing and says nothing.
        let again = with_status(s, plan.status.clone());
        let replan = super::plan(&again, &granted("10.42.0.5"), &Policy::default(), &Index::new());
        assert!(!replan.changed && replan.events.is_empty());
    }

    #[test]
    fn placement_is_refused_from_a_namespace_the_policy_does_not_list() {
        let index = with_nodes(&["n1"]);
        let s = service("team-a", "web", json!({"node": "n1"}));
        let plan = plan(&s, &granted("10.42.0.5"), &Policy::default(), &index);
        let (status, reason, message) = cond(&plan, PLACEMENT_DENIED);
        assert_eq!((status.as_str(), reason.as_str()), ("True", "PlacementDenied"));
        assert!(message.contains("[default]") && message.contains("--placement-namespaces"), "{message}");
        assert_eq!(plan.hosted, None);
        assert_eq!(cond(&plan, READY).0, "False");
        let open = Policy { placement_namespaces: vec!["*".into()], ..Policy::default() };
        assert!(super::plan(&s, &granted("10.42.0.5"), &open, &index).hosted.is_some());
    }

    #[test]
    fn a_nodes_own_namespace_list_overrides_the_policy() {
        let mut index = Index::new();
        index.apply_mesh_node(mesh_node("n1", 1, json!({}), json!({"serviceNamespaces": ["team-a"]}), json!({})));
        let allowed = service("team-a", "web", json!({"node": "n1"}));
        assert!(plan(&allowed, &granted("10.42.0.5"), &Policy::default(), &index).hosted.is_some());
        let refused = service("default", "web", json!({"node": "n1"}));
        let plan = plan(&refused, &granted("10.42.0.6"), &Policy::default(), &index);
        let message = cond(&plan, PLACEMENT_DENIED).2;
        assert!(message.contains("[team-a]") && message.contains("spec.serviceNamespaces"), "{message}");
    }

    #[test]
    fn a_control_plane_node_takes_no_placement_unless_it_lists_the_namespace() {
        let mut index = with_nodes(&["cp"]);
        index.apply_k8s_node(k8s_node("cp", "u1", json!({"node-role.kubernetes.io/control-plane": ""}), &[], &[]));
        let s = service("default", "web", json!({"node": "cp"}));
        let plan = plan(&s, &granted("10.42.0.5"), &Policy::default(), &index);
        assert!(cond(&plan, PLACEMENT_DENIED).2.contains("control-plane"));
        index.apply_mesh_node(mesh_node("cp", 1, json!({}), json!({"serviceNamespaces": ["default"]}), json!({})));
        assert!(super::plan(&s, &granted("10.42.0.5"), &Policy::default(), &index).hosted.is_some());
    }

    #[test]
    fn a_full_node_refuses_one_more_service_but_keeps_those_it_hosts() {
        let mut index = with_nodes(&["n1"]);
        let max = mesh_api::MAX_PLACED_SERVICES_PER_NODE;
        for i in 0..max {
            let hosted = Hosted { node: "n1".into(), ip: Ipv4Addr::from(0x0a2a_1000 + i as u32) };
            index.set_hosting(&Owner::service("default", format!("s{i}")), Some(hosted));
        }
        let newcomer = service("default", "late", json!({"node": "n1"}));
        let plan = plan(&newcomer, &granted("10.42.0.5"), &Policy::default(), &index);
        let message = cond(&plan, PLACEMENT_DENIED).2;
        assert!(message.contains(&format!("already hosts {max} services")), "{message}");
        assert_eq!(plan.hosted, None);
        // One already hosted there is not counted against itself.
        let resident = service("default", "s0", json!({"node": "n1"}));
        assert!(super::plan(&resident, &granted("10.42.16.0"), &Policy::default(), &index).hosted.is_some());
    }

    fn owned_by(mut s: MeshService, owner: &str) -> MeshService {
        s.metadata.annotations = Some([(mesh_api::CONNECT_OWNER_ANNOTATION.to_owned(), owner.to_owned())].into());
        s
    }

    fn ephemeral(name: &str, owner: &str) -> Arc<MeshNode> {
        mesh_node(
            name,
            1,
            json!({"annotations": {mesh_api::CONNECT_OWNER_ANNOTATION: owner}}),
            json!({"serviceNamespaces": ["default"]}),
            json!({"publicKey": format!("key-{name}"), "backend": "userspace"}),
        )
    }

    #[test]
    fn a_connect_service_is_placed_only_on_its_owners_ephemeral_node() {
        let mut index = with_nodes(&["worker"]);
        index.apply_mesh_node(ephemeral("alice-laptop", "alice"));
        index.apply_mesh_node(ephemeral("bob-laptop", "bob"));
        let on = |node: &str| owned_by(service("default", "dev", json!({"node": node})), "alice");
        // Her own ephemeral node: placed.
        let own = plan(&on("alice-laptop"), &granted("10.42.0.5"), &Policy::default(), &index);
        assert_eq!(own.hosted.as_ref().map(|h| h.node.as_str()), Some("alice-laptop"));
        assert!(condition(&own.status.conditions, PLACEMENT_DENIED).is_none());
        // Another user's ephemeral node: denied, naming both owners.
        let theirs = plan(&on("bob-laptop"), &granted("10.42.0.5"), &Policy::default(), &index);
        let (status, reason, message) = cond(&theirs, PLACEMENT_DENIED);
        assert_eq!((status.as_str(), reason.as_str()), ("True", "PlacementDenied"));
        assert!(message.contains("user alice") && message.contains("user bob"), "{message}");
        assert_eq!(theirs.hosted, None);
        assert_eq!(cond(&theirs, READY).0, "False");
        // A cluster node (no connect owner): denied too, though today's rules would allow it.
        let cluster = plan(&on("worker"), &granted("10.42.0.5"), &Policy::default(), &index);
        let message = cond(&cluster, PLACEMENT_DENIED).2;
        assert!(message.contains("MeshNode worker is not an ephemeral member of alice"), "{message}");
        assert_eq!(cluster.hosted, None);
        // Backed by pods instead of a node: denied, before any pod is looked at.
        index.apply_pod(pod("default", "p", json!({"app": "web"}), "worker", 1, true, "10.244.1.7"));
        let selected = owned_by(service("default", "dev", json!({"selector": {"app": "web"}})), "alice");
        let message = cond(&plan(&selected, &granted("10.42.0.5"), &Policy::default(), &index), PLACEMENT_DENIED).2;
        assert!(message.contains("names none"), "{message}");
    }

    #[test]
    fn a_service_without_connect_owner_on_an_ephemeral_node_follows_the_usual_rules() {
        let mut index = Index::new();
        index.apply_mesh_node(ephemeral("alice-laptop", "alice"));
        // The node lists "default" in spec.serviceNamespaces: an admin's service there is placed.
        let admins = service("default", "web", json!({"node": "alice-laptop"}));
        assert!(plan(&admins, &granted("10.42.0.5"), &Policy::default(), &index).hosted.is_some());
        // And from a namespace the node does not list, refused by the usual rule.
        let elsewhere = service("team-a", "web", json!({"node": "alice-laptop"}));
        let message = cond(&plan(&elsewhere, &granted("10.42.0.6"), &Policy::default(), &index), PLACEMENT_DENIED).2;
        assert!(message.contains("spec.serviceNamespaces"), "{message}");
        // Her own service in a namespace her node does not list: the usual rule still applies.
        let own_elsewhere = owned_by(service("team-a", "dev", json!({"node": "alice-laptop"})), "alice");
        let message =
            cond(&plan(&own_elsewhere, &granted("10.42.0.7"), &Policy::default(), &index), PLACEMENT_DENIED).2;
        assert!(message.contains("spec.serviceNamespaces"), "{message}");
    }

    #[test]
    fn a_node_changing_owner_wakes_its_services() {
        let mut index = Index::new();
        assert!(index.apply_mesh_node(ephemeral("laptop", "alice")));
        assert!(!index.apply_mesh_node(ephemeral("laptop", "alice")));
        assert!(index.apply_mesh_node(ephemeral("laptop", "bob")));
    }

    #[test]
    fn a_mesh_service_on_a_node_without_tunnel_is_not_ready_but_dual_is() {
        let mut index = Index::new();
        let status = json!({"backend": "none", "conditions": [{"type": CONNECTED, "status": "False", "reason": "NoWireGuard",
            "message": "no module", "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
        index.apply_mesh_node(mesh_node("n1", 1, json!({}), json!({}), status));
        let mesh = service("default", "web", json!({"node": "n1"}));
        let plan = plan(&mesh, &granted("10.42.0.5"), &Policy::default(), &index);
        let (status, reason, message) = cond(&plan, READY);
        assert_eq!((status.as_str(), reason.as_str()), ("False", NO_TUNNEL));
        assert!(message.contains("MeshNode n1 runs without WireGuard"));
        assert_eq!(plan.hosted.as_ref().map(|h| h.node.as_str()), Some("n1"), "still hosted there");
        assert_eq!(
            plan.events.iter().map(|e| (e.reason.as_str(), e.action)).collect::<Vec<_>>(),
            [(NO_TUNNEL, "OfferService")]
        );
        let dual = service("default", "web", json!({"node": "n1", "network": {"type": "dual", "ports": [80]}}));
        assert_eq!(
            super::plan(&dual, &granted("10.42.0.5"), &Policy::default(), &index).status.conditions[1].reason,
            "Hosted"
        );
    }

    #[test]
    fn a_container_service_is_ready_only_while_its_node_reports_the_container_running() {
        let web = service("default", "web", json!({"node": "n1", "container": {"name": "web-1"}}));
        let node_reporting = |containers: serde_json::Value| {
            let mut index = Index::new();
            let status = json!({"publicKey": null, "backend": "kernel", "containers": containers});
            index.apply_mesh_node(mesh_node("n1", 1, json!({}), json!({}), status));
            index
        };
        let ready = |index: &Index| cond(&plan(&web, &granted("10.42.0.5"), &Policy::default(), index), READY);

        let (status, reason, message) = ready(&node_reporting(json!([])));
        assert_eq!((status.as_str(), reason.as_str()), ("False", "ContainerPending"));
        assert!(message.contains("container web-1"), "{message}");

        let stopped = json!([{"service": "default/web", "container": "web-1", "ready": false, "reason": "NotRunning",
            "message": "container web-1 is exited in podman 4.3.1 at /run/podman/podman.sock"}]);
        let stopped_index = node_reporting(stopped);
        let (status, reason, message) = ready(&stopped_index);
        assert_eq!((status.as_str(), reason.as_str()), ("False", "ContainerNotRunning"));
        let stopping = plan(&web, &granted("10.42.0.5"), &Policy::default(), &stopped_index);
        assert_eq!(
            stopping.events.iter().map(|e| (e.reason.as_str(), e.action)).collect::<Vec<_>>(),
            [("ContainerNotRunning", "ForwardToContainer")],
            "a warning when the container stops"
        );
        let mut still = web.clone();
        still.status = Some(stopping.status.clone());
        let again = plan(&still, &granted("10.42.0.5"), &Policy::default(), &stopped_index);
        assert!(again.events.is_empty() && !again.changed, "no second warning for the same reason: {:?}", again.events);
        assert_eq!(message, "MeshNode n1: container web-1 is exited in podman 4.3.1 at /run/podman/podman.sock");

        let no_engine = json!([{"service": "default/web", "container": "web-1", "ready": false, "reason": "NoEngine",
            "message": "no container engine socket"}]);
        assert_eq!(ready(&node_reporting(no_engine)).1, "NoContainerEngine");

        // Another service's container, or another container of the same name, is not this one.
        let others = json!([{"service": "other/web", "container": "web-1", "ready": true, "ip": "10.88.0.2",
            "reason": "Running", "message": ""}]);
        assert_eq!(ready(&node_reporting(others)).1, "ContainerPending");

        let running = json!([{"service": "default/web", "container": "web-1", "ready": true, "ip": "10.88.0.7",
            "reason": "Running", "message": "container web-1 runs at 10.88.0.7"}]);
        let index = node_reporting(running);
        let plan = plan(&web, &granted("10.42.0.5"), &Policy::default(), &index);
        let (status, reason, message) = cond(&plan, READY);
        assert_eq!((status.as_str(), reason.as_str()), ("True", "Hosted"));
        assert_eq!(message, "reachable at 10.42.0.5 on MeshNode n1, forwarded to container web-1 at 10.88.0.7");
        assert_eq!(plan.hosted.as_ref().map(|h| h.node.as_str()), Some("n1"));
        assert_eq!(plan.status.pod_ip, None, "a container's address stays on its node");
    }

    #[test]
    fn a_node_reporting_its_containers_wakes_its_services() {
        let mut index = Index::new();
        let with = |containers: serde_json::Value| {
            mesh_node("n1", 1, json!({}), json!({}), json!({"backend": "kernel", "containers": containers}))
        };
        assert!(index.apply_mesh_node(with(json!([]))));
        assert!(!index.apply_mesh_node(with(json!([]))));
        let running = json!([{"service": "default/web", "container": "web-1", "ready": true, "ip": "10.88.0.7",
            "reason": "Running", "message": ""}]);
        assert!(index.apply_mesh_node(with(running)));
    }

    #[test]
    fn a_host_service_has_no_ip_and_is_ready_on_its_node() {
        let index = with_nodes(&["n1"]);
        let s = service("default", "ssh", json!({"node": "n1", "network": {"type": "host", "ports": [22]}}));
        let plan = plan(&s, &Allocation::NotWanted, &Policy::default(), &index);
        assert_eq!(plan.status.mesh_ip, None);
        assert_eq!(plan.hosted, None, "no IP, nothing in the peer entry");
        assert_eq!(plan.status.node.as_deref(), Some("n1"));
        assert_eq!(cond(&plan, READY).2, "host service on MeshNode n1");
        assert!(condition(&plan.status.conditions, ALLOCATED).is_none());
    }

    #[test]
    fn a_refused_address_keeps_the_old_one_warns_once_and_retries() {
        let index = with_nodes(&["n1"]);
        let s = service("default", "web", json!({"node": "n1", "meshIP": "10.42.0.9"}));
        let error = IpamError::Taken { ip: ip("10.42.0.9"), holder: Owner::service("other", "db") };
        let refused = Allocation::Refused { kept: Some(ip("10.42.0.5")), error };
        let plan = plan(&s, &refused, &Policy::default(), &index);
        assert_eq!(plan.status.mesh_ip.as_deref(), Some("10.42.0.5"));
        assert_eq!(cond(&plan, ALLOCATED).0, "False");
        let (status, reason, message) = cond(&plan, IP_CONFLICT);
        assert_eq!((status.as_str(), reason.as_str()), ("True", "IPConflict"));
        assert!(message.contains("other/db"), "{message}");
        assert_eq!(cond(&plan, READY).1, "IPConflict");
        assert_eq!(plan.retry, Some(RETRY_ALLOCATION));
        assert_eq!(plan.events.iter().map(|e| e.action).collect::<Vec<_>>(), ["AllocateMeshIP"]);
        let again = with_status(s, plan.status.clone());
        let replan = super::plan(&again, &refused, &Policy::default(), &index);
        assert!(!replan.changed && replan.events.is_empty() && replan.retry.is_some());
    }

    #[test]
    fn the_oldest_ready_pod_hosts_a_selector_service_at_its_pod_ip() {
        let mut index = Index::new();
        index.apply_pod(pod("shop", "young", json!({"app": "web"}), "n2", 300, true, "10.244.2.7"));
        index.apply_pod(pod("shop", "old-unready", json!({"app": "web"}), "n3", 100, false, "10.244.3.7"));
        index.apply_pod(pod("shop", "oldest", json!({"app": "web"}), "n1", 200, true, "10.244.1.7"));
        index.apply_pod(pod("shop", "other-app", json!({"app": "db"}), "n4", 50, true, "10.244.4.7"));
        index.apply_pod(pod("elsewhere", "same-labels", json!({"app": "web"}), "n5", 10, true, "10.244.5.7"));
        let s = service("shop", "web", json!({"selector": {"app": "web"}}));
        let plan = plan(&s, &granted("10.42.0.5"), &Policy::default(), &index);
        assert_eq!(plan.status.node.as_deref(), Some("n1"));
        assert_eq!(plan.status.pod_ip.as_deref(), Some("10.244.1.7"));
        assert_eq!(cond(&plan, READY).2, "reachable at 10.42.0.5 on MeshNode n1, forwarded to pod IP 10.244.1.7");
        index.delete_pod("shop", "oldest");
        assert_eq!(
            super::plan(&s, &granted("10.42.0.5"), &Policy::default(), &index).status.node.as_deref(),
            Some("n2")
        );
    }

    #[test]
    fn a_host_network_pod_is_forwarded_nowhere_and_no_pod_means_no_host() {
        let mut index = Index::new();
        let mut host_pod = (*pod("shop", "p", json!({"app": "web"}), "n1", 1, true, "192.168.1.5")).clone();
        host_pod.spec.as_mut().expect("a spec").host_network = Some(true);
        index.apply_pod(Arc::new(host_pod));
        let s = service("shop", "web", json!({"selector": {"app": "web"}}));
        let plan = plan(&s, &granted("10.42.0.5"), &Policy::default(), &index);
        assert_eq!((plan.status.node.as_deref(), plan.status.pod_ip.as_deref()), (Some("n1"), None));
        let none = service("shop", "api", json!({"selector": {"app": "api"}}));
        let plan = super::plan(&none, &granted("10.42.0.6"), &Policy::default(), &index);
        assert_eq!(cond(&plan, NO_READY_PODS).0, "True");
        assert!(cond(&plan, NO_READY_PODS).2.contains("namespace shop"));
        assert_eq!(plan.hosted, None);
    }

    #[test]
    fn same_named_services_in_listed_namespaces_lose_the_short_name() {
        let policy = Policy { short_name_namespaces: vec!["*".into()], ..Policy::default() };
        let mut index = with_nodes(&["n1"]);
        let ours = service("default", "web", json!({"node": "n1"}));
        index.apply_service(&ours);
        index.apply_service(&service("team-b", "web", json!({"node": "n1"})));
        index.apply_service(&service("team-a", "web", json!({"node": "n1"})));
        let plan = plan(&ours, &granted("10.42.0.5"), &policy, &index);
        let (status, reason, message) = cond(&plan, SHORT_NAME);
        assert_eq!((status.as_str(), reason.as_str()), ("False", "Ambiguous"));
        assert!(message.contains("namespace(s) team-a, team-b also"), "{message}");
        // Under the default policy, the other namespaces do not compete for it.
        assert_eq!(
            super::plan(&ours, &granted("10.42.0.5"), &Policy::default(), &index).status.conditions[2].reason,
            "Unique"
        );
        // A namesake being deleted does not compete either.
        let mut going = service("team-a", "web", json!({}));
        going.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        index.apply_service(&going);
        index.delete_service("team-b", "web");
        assert_eq!(cond(&super::plan(&ours, &granted("10.42.0.5"), &policy, &index), SHORT_NAME).1, "Unique");
    }

    #[test]
    fn reserved_and_unlisted_names_get_no_short_name() {
        let index = with_nodes(&["n1"]);
        let node = service("default", "node", json!({"node": "n1"}));
        assert_eq!(cond(&plan(&node, &granted("10.42.0.5"), &Policy::default(), &index), SHORT_NAME).1, "Reserved");
        let team = service("team-a", "web", json!({"node": "n1"}));
        let open = Policy { placement_namespaces: vec!["*".into()], ..Policy::default() };
        let message = cond(&plan(&team, &granted("10.42.0.5"), &open, &index), SHORT_NAME).2;
        assert!(message.contains("--short-name-namespaces") && message.contains("web.team-a.mesh.local"));
    }

    #[test]
    fn nothing_new_means_no_write_and_the_transition_times_stay() {
        let index = with_nodes(&["n1"]);
        let s = service("default", "web", json!({"node": "n1"}));
        let first = plan(&s, &granted("10.42.0.5"), &Policy::default(), &index);
        let mut written = first.status.clone();
        written.conditions = aged(written.conditions, 1000);
        // The API may hand the conditions back in another order.
        written.conditions.reverse();
        let stored = with_status(s.clone(), written.clone());
        let again = plan(&stored, &granted("10.42.0.5"), &Policy::default(), &index);
        assert!(!again.changed, "{:?}", again.status);
        assert!(again.events.is_empty() && !again.wake_namesakes);
        // A new message with the same status is written, and keeps the transition time.
        let moved = plan(&stored, &granted("10.42.0.6"), &Policy::default(), &index);
        assert!(moved.changed);
        let ready = moved.status.conditions.iter().find(|c| c.type_ == READY).expect("Ready");
        assert_eq!(
            ready.last_transition_time,
            written.conditions.iter().find(|c| c.type_ == READY).expect("Ready").last_transition_time
        );
        // A new generation is written too.
        let mut bumped = stored.clone();
        bumped.metadata.generation = Some(2);
        assert!(plan(&bumped, &granted("10.42.0.5"), &Policy::default(), &index).changed);
        // And so is a status that lacks a condition the rules want.
        let mut drifted = written.clone();
        drifted.conditions.retain(|c| c.type_ != SHORT_NAME);
        assert!(plan(&with_status(s, drifted), &granted("10.42.0.5"), &Policy::default(), &index).changed);
    }

    #[test]
    fn namesakes_are_woken_only_when_the_short_name_verdict_changes() {
        let policy = Policy { short_name_namespaces: vec!["*".into()], ..Policy::default() };
        let mut index = with_nodes(&["n1"]);
        let s = service("default", "web", json!({"node": "n1"}));
        let first = plan(&s, &granted("10.42.0.5"), &policy, &index);
        let stored = with_status(s, first.status);
        // Only the address moves: namesakes need not look again.
        let moved = plan(&stored, &granted("10.42.0.6"), &policy, &index);
        assert!(moved.changed && !moved.wake_namesakes);
        index.apply_service(&service("team-a", "web", json!({})));
        assert!(plan(&stored, &granted("10.42.0.5"), &policy, &index).wake_namesakes);
    }
}
