//! The index the reconcile rules read: what the controller knows of every object, kept up to
//! date from the watch events (the glue in main.rs calls [`Index::apply_mesh_node`] and its
//! kin), plus the hosting decisions the service reconciles made ([`Index::set_hosting`]).
//!
//! Every question a reconcile asks of other objects is answered here without a scan of all of
//! them, so that one reconcile costs the same with 50 services or 50,000:
//! - MeshNodes, Kubernetes Nodes by name; Pods by namespace (the caches' own `Arc`s: nothing is
//!   copied);
//! - MeshServices only as the few facts others need: which namespaces have a service of a name
//!   (short-name collisions), which services name or are hosted on a node (to wake them when it
//!   changes), which have a selector in a namespace (to wake them when a pod changes);
//! - which node hosts which service IP, by service and by node (a node's allowed IPs, its room);
//! - which MeshNodes publish which public key (key-holder conflicts).
//!
//! It knows nothing of the API client or of tokio: unit tests build one from a few objects.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use mesh_api::{Backend, MeshNode, MeshService};
use mesh_core::Owner;

use crate::judge::Claimant;

/// A service IP and the node that hosts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hosted {
    /// The hosting MeshNode.
    pub node: String,
    /// The service's mesh IP.
    pub ip: Ipv4Addr,
}

/// A MeshService, by namespace and name.
pub type ServiceKey = (String, String);

/// What the index keeps of a MeshService (to answer for it, and to undo it on a change).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ServiceFacts {
    /// Not being deleted.
    live: bool,
    /// The MeshNodes it names (`spec.node`) or is hosted on (`status.node`), sorted, no
    /// duplicate: one or two, so a vector (a B-tree set allocates a node of eleven for one).
    nodes: Vec<String>,
    /// Its `spec.selector`, when it has one.
    selector: Option<BTreeMap<String, String>>,
}

/// What a MeshNode says that services placed on it depend on: when it changes, they are
/// reconciled again.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PlacementFacts {
    service_namespaces: Option<Vec<String>>,
    backend: Option<Backend>,
    connect_owner: Option<String>,
    containers: Vec<mesh_api::ContainerBackend>,
}

/// The index (see the module docs).
#[derive(Default)]
pub struct Index {
    mesh_nodes: HashMap<String, Arc<MeshNode>>,
    k8s_nodes: HashMap<String, Arc<Node>>,
    pods: HashMap<String, BTreeMap<String, Arc<Pod>>>,
    services: HashMap<ServiceKey, ServiceFacts>,
    /// Service name → namespaces with a live service of that name, sorted, no duplicate. Mostly
    /// one per name, so a vector: a B-tree set's smallest node holds eleven names, which cost
    /// about 13 MiB at 50,000 services of distinct names.
    named: HashMap<String, Vec<String>>,
    /// MeshNode name → services that name it or are hosted on it.
    by_node: HashMap<String, BTreeSet<ServiceKey>>,
    /// Namespace → names of its services with a selector.
    selecting: HashMap<String, BTreeSet<String>>,
    hosting: HashMap<Owner, Hosted>,
    /// MeshNode name → the services it hosts, and their IPs.
    hosted_on: HashMap<String, BTreeMap<Owner, Ipv4Addr>>,
    /// Public key → the MeshNodes (with WireGuard) that publish it.
    claims: HashMap<String, BTreeMap<String, Claimant>>,
}

fn remove_from<K: std::hash::Hash + Eq, V: Ord>(map: &mut HashMap<K, BTreeSet<V>>, key: &K, value: &V) {
    if let Some(set) = map.get_mut(key) {
        set.remove(value);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

/// The public key a MeshNode publishes for the tunnel (none without WireGuard).
fn published_key(node: &MeshNode) -> Option<&str> {
    let status = node.status.as_ref()?;
    status.public_key.as_deref().filter(|_| status.backend != Some(Backend::None))
}

/// `node` as a claimant of `key`.
pub fn claimant(node: &MeshNode, key: &str) -> Claimant {
    Claimant {
        name: node.name_any(),
        created: node.creation_timestamp().map(|t| t.0),
        holds_entry: node.status.as_ref().and_then(|s| s.peer.as_ref()).is_some_and(|p| p.public_key == key),
    }
}

impl Index {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    // ---- MeshNodes ----

    /// Takes in a created or changed MeshNode. Returns whether what its placed services depend
    /// on changed (it appeared, its `spec.serviceNamespaces`, its backend or its connect owner): then they are to
    /// be reconciled again ([`Index::services_on`]).
    pub fn apply_mesh_node(&mut self, node: Arc<MeshNode>) -> bool {
        let name = node.name_any();
        let facts = |n: &MeshNode| PlacementFacts {
            service_namespaces: n.spec.service_namespaces.clone(),
            backend: n.status.as_ref().and_then(|s| s.backend),
            connect_owner: n.annotations().get(mesh_api::CONNECT_OWNER_ANNOTATION).cloned(),
            containers: n.status.as_ref().map(|s| s.containers.clone()).unwrap_or_default(),
        };
        let previous = self.remove_mesh_node(&name);
        let changed = previous.as_deref().map(facts) != Some(facts(&node));
        if let Some(key) = published_key(&node) {
            self.claims.entry(key.to_owned()).or_default().insert(name.clone(), claimant(&node, key));
        }
        self.mesh_nodes.insert(name, node);
        changed
    }

    /// Forgets a deleted MeshNode.
    pub fn delete_mesh_node(&mut self, name: &str) {
        self.remove_mesh_node(name);
    }

    fn remove_mesh_node(&mut self, name: &str) -> Option<Arc<MeshNode>> {
        let previous = self.mesh_nodes.remove(name)?;
        if let Some(key) = published_key(&previous)
            && let Some(claimants) = self.claims.get_mut(key)
        {
            claimants.remove(name);
            if claimants.is_empty() {
                self.claims.remove(key);
            }
        }
        Some(previous)
    }

    /// Replaces every MeshNode with `nodes` (after a re-list).
    pub fn rebuild_mesh_nodes(&mut self, nodes: impl IntoIterator<Item = Arc<MeshNode>>) {
        self.mesh_nodes.clear();
        self.claims.clear();
        for node in nodes {
            self.apply_mesh_node(node);
        }
    }

    /// The MeshNode `name`.
    pub fn mesh_node(&self, name: &str) -> Option<&MeshNode> {
        self.mesh_nodes.get(name).map(Arc::as_ref)
    }

    /// The MeshNodes other than `except` that publish `key` (with WireGuard), by name.
    pub fn other_claimants(&self, key: &str, except: &str) -> Vec<Claimant> {
        self.claims.get(key).into_iter().flatten().filter(|(n, _)| *n != except).map(|(_, c)| c.clone()).collect()
    }

    // ---- Kubernetes Nodes ----

    /// Takes in a created or changed Kubernetes Node. Returns whether its control-plane labels
    /// changed (which decide where services may be placed).
    pub fn apply_k8s_node(&mut self, node: Arc<Node>) -> bool {
        let name = node.name_any();
        let before = self.k8s_nodes.get(&name).map(|n| is_control_plane(n));
        let after = is_control_plane(&node);
        self.k8s_nodes.insert(name, node);
        before != Some(after)
    }

    /// Forgets a deleted Kubernetes Node.
    pub fn delete_k8s_node(&mut self, name: &str) {
        self.k8s_nodes.remove(name);
    }

    /// Replaces every Kubernetes Node with `nodes` (after a re-list).
    pub fn rebuild_k8s_nodes(&mut self, nodes: impl IntoIterator<Item = Arc<Node>>) {
        self.k8s_nodes = nodes.into_iter().map(|n| (n.name_any(), n)).collect();
    }

    /// The Kubernetes Node `name`.
    pub fn k8s_node(&self, name: &str) -> Option<&Node> {
        self.k8s_nodes.get(name).map(Arc::as_ref)
    }

    // ---- Pods ----

    /// Takes in a created or changed Pod.
    pub fn apply_pod(&mut self, pod: Arc<Pod>) {
        let namespace = pod.namespace().unwrap_or_default();
        self.pods.entry(namespace).or_default().insert(pod.name_any(), pod);
    }

    /// Forgets a deleted Pod.
    pub fn delete_pod(&mut self, namespace: &str, name: &str) {
        if let Some(pods) = self.pods.get_mut(namespace) {
            pods.remove(name);
            if pods.is_empty() {
                self.pods.remove(namespace);
            }
        }
    }

    /// Replaces every Pod with `pods` (after a re-list).
    pub fn rebuild_pods(&mut self, pods: impl IntoIterator<Item = Arc<Pod>>) {
        self.pods.clear();
        for pod in pods {
            self.apply_pod(pod);
        }
    }

    /// The Pods of `namespace`, by name.
    pub fn pods_in(&self, namespace: &str) -> impl Iterator<Item = &Pod> {
        self.pods.get(namespace).into_iter().flat_map(|pods| pods.values().map(Arc::as_ref))
    }

    // ---- MeshServices ----

    /// Takes in a created or changed MeshService.
    pub fn apply_service(&mut self, service: &MeshService) {
        let key = (service.namespace().unwrap_or_default(), service.name_any());
        let mut nodes: Vec<String> =
            service.spec.node.iter().chain(service.status.as_ref().and_then(|s| s.node.as_ref())).cloned().collect();
        nodes.sort_unstable();
        nodes.dedup();
        let facts = ServiceFacts {
            live: service.metadata.deletion_timestamp.is_none(),
            nodes,
            selector: service.spec.selector.clone().filter(|s| !s.is_empty()),
        };
        if self.services.get(&key) == Some(&facts) {
            return;
        }
        self.delete_service(&key.0, &key.1);
        if facts.live {
            let namespaces = self.named.entry(key.1.clone()).or_default();
            if let Err(at) = namespaces.binary_search(&key.0) {
                namespaces.insert(at, key.0.clone());
            }
        }
        for node in &facts.nodes {
            self.by_node.entry(node.clone()).or_default().insert(key.clone());
        }
        if facts.selector.is_some() {
            self.selecting.entry(key.0.clone()).or_default().insert(key.1.clone());
        }
        self.services.insert(key, facts);
    }

    /// Forgets a deleted MeshService (not its hosting: see [`Index::set_hosting`]).
    pub fn delete_service(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        let Some(facts) = self.services.remove(&key) else { return };
        if let Some(namespaces) = self.named.get_mut(&key.1) {
            namespaces.retain(|ns| *ns != key.0);
            if namespaces.is_empty() {
                self.named.remove(&key.1);
            }
        }
        for node in &facts.nodes {
            remove_from(&mut self.by_node, node, &key);
        }
        remove_from(&mut self.selecting, &key.0, &key.1);
    }

    /// Replaces every MeshService with `services` (after a re-list).
    pub fn rebuild_services<'a>(&mut self, services: impl IntoIterator<Item = &'a MeshService>) {
        self.services.clear();
        self.named.clear();
        self.by_node.clear();
        self.selecting.clear();
        for service in services {
            self.apply_service(service);
        }
    }

    /// The namespaces other than `namespace` with a live MeshService named `name`, sorted.
    pub fn namesakes(&self, name: &str, namespace: &str) -> Vec<String> {
        self.named.get(name).into_iter().flatten().filter(|ns| *ns != namespace).cloned().collect()
    }

    /// The services that name MeshNode `node` in `spec.node` or are hosted on it.
    pub fn services_on(&self, node: &str) -> Vec<ServiceKey> {
        self.by_node.get(node).into_iter().flatten().cloned().collect()
    }

    /// The services of `namespace` whose selector matches `labels`.
    pub fn services_selecting(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Vec<ServiceKey> {
        let names = self.selecting.get(namespace).into_iter().flatten();
        names
            .filter(|name| {
                let key = (namespace.to_owned(), (*name).clone());
                let selector = self.services.get(&key).and_then(|f| f.selector.as_ref());
                selector.is_some_and(|s| selects(s, labels))
            })
            .map(|name| (namespace.to_owned(), name.clone()))
            .collect()
    }

    // ---- Hosting ----

    /// Records where a service is hosted now (`None`: nowhere). Returns the nodes whose peer
    /// entries change (the old and the new host), none when nothing changed.
    pub fn set_hosting(&mut self, owner: &Owner, hosted: Option<Hosted>) -> Vec<String> {
        let previous = self.hosting.get(owner).cloned();
        if previous == hosted {
            return Vec::new();
        }
        if let Some(old) = &previous
            && let Some(on) = self.hosted_on.get_mut(&old.node)
        {
            on.remove(owner);
            if on.is_empty() {
                self.hosted_on.remove(&old.node);
            }
        }
        match &hosted {
            Some(h) => {
                self.hosting.insert(owner.clone(), h.clone());
                self.hosted_on.entry(h.node.clone()).or_default().insert(owner.clone(), h.ip);
            }
            None => {
                self.hosting.remove(owner);
            }
        }
        let mut nodes: Vec<String> = previous.into_iter().chain(hosted).map(|h| h.node).collect();
        nodes.dedup();
        nodes
    }

    /// Every service with a hosting.
    pub fn hosted_services(&self) -> impl Iterator<Item = &Owner> {
        self.hosting.keys()
    }

    /// The service IPs hosted on `node`, sorted.
    pub fn service_ips_on(&self, node: &str) -> BTreeSet<Ipv4Addr> {
        self.hosted_on.get(node).into_iter().flat_map(|on| on.values().copied()).collect()
    }

    /// How many services other than `owner` are hosted on `node`.
    pub fn hosted_count_except(&self, node: &str, owner: &Owner) -> usize {
        self.hosted_on.get(node).map_or(0, |on| on.len() - usize::from(on.contains_key(owner)))
    }
}

/// Labels that make a Kubernetes Node a control-plane node.
pub const CONTROL_PLANE_LABELS: [&str; 2] = ["node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master"];

/// Whether a Kubernetes Node is a control-plane node.
pub fn is_control_plane(node: &Node) -> bool {
    CONTROL_PLANE_LABELS.iter().any(|l| node.labels().contains_key(*l))
}

/// Whether a (non-empty) selector matches `labels`.
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::rules::fixtures::{agent_node, k8s_node, mesh_node, pod, service};

    fn hosted(node: &str, ip: &str) -> Option<Hosted> {
        Some(Hosted { node: node.into(), ip: ip.parse().expect("an IPv4 address") })
    }

    fn ips(set: BTreeSet<Ipv4Addr>) -> Vec<String> {
        set.into_iter().map(|ip| ip.to_string()).collect()
    }

    #[test]
    fn hosting_moves_touch_the_old_and_the_new_node_only() {
        let mut index = Index::new();
        let web = Owner::service("default", "web");
        assert_eq!(index.set_hosting(&web, hosted("n1", "10.42.0.5")), ["n1"]);
        assert!(index.set_hosting(&web, hosted("n1", "10.42.0.5")).is_empty(), "no change, no trigger");
        assert_eq!(index.set_hosting(&web, hosted("n2", "10.42.0.5")), ["n1", "n2"]);
        assert!(index.service_ips_on("n1").is_empty());
        assert_eq!(ips(index.service_ips_on("n2")), ["10.42.0.5"]);
        index.set_hosting(&Owner::service("default", "db"), hosted("n2", "10.42.0.2"));
        assert_eq!(ips(index.service_ips_on("n2")), ["10.42.0.2", "10.42.0.5"]);
        assert_eq!(index.hosted_count_except("n2", &web), 1);
        assert_eq!(index.hosted_count_except("n2", &Owner::service("x", "y")), 2);
        assert_eq!(index.set_hosting(&web, None), ["n2"]);
        assert_eq!(index.hosted_services().count(), 1);
    }

    #[test]
    fn services_are_found_by_name_by_node_and_by_selector() {
        let mut index = Index::new();
        let mut placed = service("a", "web", json!({"node": "n1"}));
        index.apply_service(&placed);
        index.apply_service(&service("b", "web", json!({"selector": {"app": "web"}})));
        assert_eq!(index.namesakes("web", "a"), ["b"]);
        assert_eq!(index.services_on("n1"), [("a".to_owned(), "web".to_owned())]);
        let labels: BTreeMap<String, String> = [("app".to_owned(), "web".to_owned())].into();
        assert_eq!(index.services_selecting("b", &labels), [("b".to_owned(), "web".to_owned())]);
        assert!(index.services_selecting("a", &labels).is_empty());
        assert!(index.services_selecting("b", &BTreeMap::new()).is_empty());
        // Moved to another node, and hosted on a third: both find it, the old one not.
        placed.spec.node = Some("n2".into());
        placed.status = Some(mesh_api::MeshServiceStatus { node: Some("n3".into()), ..Default::default() });
        index.apply_service(&placed);
        assert!(index.services_on("n1").is_empty());
        assert_eq!(index.services_on("n2").len() + index.services_on("n3").len(), 2);
        index.delete_service("a", "web");
        assert!(index.services_on("n2").is_empty() && index.namesakes("web", "b").is_empty());
        index.rebuild_services([&service("c", "web", json!({}))]);
        assert_eq!(index.namesakes("web", "x"), ["c"]);
        assert!(index.services_selecting("b", &labels).is_empty(), "a re-list drops what it lacks");
    }

    #[test]
    fn only_what_placed_services_depend_on_wakes_them() {
        let mut index = Index::new();
        assert!(index.apply_mesh_node(agent_node("n1", None)), "a new node");
        assert!(!index.apply_mesh_node(agent_node("n1", Some("k1"))), "its agent wrote a key: nothing for services");
        let listed = mesh_node("n1", 1, json!({}), json!({"serviceNamespaces": ["x"]}), json!({"publicKey": "k1"}));
        assert!(index.apply_mesh_node(listed));
        let fallback = mesh_node("n1", 1, json!({}), json!({"serviceNamespaces": ["x"]}), json!({"backend": "none"}));
        assert!(index.apply_mesh_node(fallback));
        assert!(index.apply_k8s_node(k8s_node("n1", "u", json!({}), &[], &[])));
        assert!(!index.apply_k8s_node(k8s_node("n1", "u", json!({"a": "b"}), &[], &[])));
        assert!(index.apply_k8s_node(k8s_node("n1", "u", json!({"node-role.kubernetes.io/master": ""}), &[], &[])));
    }

    #[test]
    fn key_claims_follow_keys_backends_and_deletions() {
        let mut index = Index::new();
        index.apply_mesh_node(agent_node("a", Some("k")));
        index.apply_mesh_node(agent_node("b", Some("k")));
        let names = |c: Vec<Claimant>| c.into_iter().map(|c| c.name).collect::<Vec<_>>();
        assert_eq!(names(index.other_claimants("k", "a")), ["b"]);
        index.apply_mesh_node(agent_node("b", Some("k2")));
        assert!(index.other_claimants("k", "a").is_empty(), "b changed its key");
        index.apply_mesh_node(mesh_node("c", 1, json!({}), json!({}), json!({"publicKey": "k", "backend": "none"})));
        assert!(index.other_claimants("k", "a").is_empty(), "without WireGuard, no claim");
        index.delete_mesh_node("b");
        assert!(index.other_claimants("k2", "x").is_empty());
        index.rebuild_mesh_nodes([agent_node("d", Some("k"))]);
        assert_eq!(names(index.other_claimants("k", "a")), ["d"]);
        assert!(index.mesh_node("a").is_none());
    }

    #[test]
    fn pods_are_kept_by_namespace() {
        let mut index = Index::new();
        index.apply_pod(pod("x", "p1", json!({}), "n1", 1, true, "10.244.0.1"));
        index.apply_pod(pod("y", "p2", json!({}), "n1", 1, true, "10.244.0.2"));
        assert_eq!(index.pods_in("x").map(|p| p.name_any()).collect::<Vec<_>>(), ["p1"]);
        index.delete_pod("x", "p1");
        assert_eq!(index.pods_in("x").count(), 0);
        index.rebuild_pods([pod("z", "p3", json!({}), "n1", 1, true, "10.244.0.3")]);
        assert_eq!((index.pods_in("y").count(), index.pods_in("z").count()), (0, 1));
    }
}
