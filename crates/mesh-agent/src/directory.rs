//! The mesh directory as this agent sees it: watches of every MeshNode and every MeshService,
//! kept in reflector stores, with a notification on each change and a record of which objects
//! each change wrote. [`Directory::update`] brings the agent's `mesh_plan::Directory`, kept
//! across syncs, to the stores' state by converting only those objects (all of them after a
//! relist, and compared on a resync), so a sync after one change costs what the change touches,
//! not the size of the mesh (the one conversion from API objects to the data plane's inputs
//! lives in `mesh-plan`). Also the [`Resolver`] of peers' endpoint names, which never makes the
//! agent's loop wait for DNS.
//!
//! The stores keep only what the agent reads ([`slim_node`], [`slim_service`]): managedFields,
//! labels and annotations are dropped before an object is stored, so a tenant's large
//! annotations cost the agents nothing.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use mesh_api::{MeshNode, MeshService};
use tokio::sync::Notify;

/// The watched MeshNodes and MeshServices.
#[derive(Clone)]
pub struct Directory {
    nodes: Store<MeshNode>,
    services: Store<MeshService>,
    /// What the watches reported since the last [`Directory::update`].
    written: Arc<Mutex<Written>>,
    /// Notified on every watch event, and when a peer endpoint name has been resolved.
    pub changed: Arc<Notify>,
    resolver: Resolver,
}

/// The objects the watches reported written or deleted since the last [`Directory::update`], by
/// key, and whether a watch listed everything anew since (a restart of the watch: objects may
/// have changed or gone unreported meanwhile).
#[derive(Debug, Default)]
struct Written {
    nodes: HashSet<String>,
    /// By namespace and name.
    services: HashSet<(String, String)>,
    relisted: bool,
}

impl Written {
    /// Records one watch event (already applied to its store); `mark` records one object.
    fn record<K>(&mut self, event: &watcher::Event<K>, mark: impl Fn(&mut Self, &K)) {
        match event {
            watcher::Event::Apply(object) | watcher::Event::Delete(object) => mark(self, object),
            // The store swaps in the new list at its end.
            watcher::Event::InitDone => self.relisted = true,
            watcher::Event::Init | watcher::Event::InitApply(_) => {}
        }
    }

    fn mark_node(&mut self, node: &MeshNode) {
        self.nodes.extend(node.metadata.name.clone());
    }

    fn mark_service(&mut self, service: &MeshService) {
        if let (Some(namespace), Some(name)) = (&service.metadata.namespace, &service.metadata.name) {
            self.services.insert((namespace.clone(), name.clone()));
        }
    }
}

/// The lock of `written`: a panic while holding it leaves at worst a key recorded twice.
fn lock(written: &Mutex<Written>) -> std::sync::MutexGuard<'_, Written> {
    written.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Drops what the agent never reads from a watched object before it is stored: managedFields,
/// labels, finalizers and owner references, and of the annotations all but the one that marks an
/// ephemeral member (it is not probed).
fn slim<K: kube::Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    meta.labels = None;
    meta.finalizers = None;
    meta.owner_references = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|key, _| key == mesh_api::CONNECT_OWNER_ANNOTATION);
    }
    if meta.annotations.as_ref().is_some_and(std::collections::BTreeMap::is_empty) {
        meta.annotations = None;
    }
}

/// [`slim`], and of a MeshNode other than `own` (`None`: keep every node's status whole) also
/// what only its own agent reads: its conditions, relayed peers and containers. The agent's own
/// MeshNode stays whole: its status writes compare against it.
fn slim_node(node: &mut MeshNode, own: Option<&str>) {
    slim(node);
    if own.is_some_and(|own| node.metadata.name.as_deref() != Some(own))
        && let Some(status) = node.status.as_mut()
    {
        status.conditions = Vec::new();
        status.relayed_peers = Vec::new();
        status.containers = Vec::new();
    }
}

/// [`slim`], and of a MeshService also what the controller writes for users (conditions, the DNS
/// name): the plan reads its spec, mesh IP, node and pod IP.
fn slim_service(service: &mut MeshService) {
    slim(service);
    if let Some(status) = service.status.as_mut() {
        status.conditions = Vec::new();
        status.dns_name = None;
    }
}

impl Directory {
    /// Starts watching; the watches run until the process ends and retry with backoff. `own`:
    /// the agent's MeshNode, the only one whose status is stored whole (`None`: every node's,
    /// for the simulator, whose nodes share one directory).
    pub fn watch(client: Client, own: Option<String>) -> Self {
        let changed = Arc::new(Notify::new());
        let written = Arc::new(Mutex::new(Written::default()));
        let (nodes, node_writer) = reflector::store();
        let (services, service_writer) = reflector::store();
        let (notify, record) = (changed.clone(), written.clone());
        let node_events = watcher(Api::<MeshNode>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .map_ok(move |event| event.modify(|node| slim_node(node, own.as_deref())))
            .reflect(node_writer)
            .for_each(move |event| {
                match event {
                    Ok(event) => lock(&record).record(&event, Written::mark_node),
                    Err(err) => tracing::warn!("watching MeshNodes: {err}"),
                }
                notify.notify_one();
                futures::future::ready(())
            });
        let (notify, record) = (changed.clone(), written.clone());
        let service_events = watcher(Api::<MeshService>::all(client), watcher::Config::default())
            .default_backoff()
            .map_ok(|event| event.modify(slim_service))
            .reflect(service_writer)
            .for_each(move |event| {
                match event {
                    Ok(event) => lock(&record).record(&event, Written::mark_service),
                    Err(err) => tracing::warn!("watching MeshServices: {err}"),
                }
                notify.notify_one();
                futures::future::ready(())
            });
        tokio::spawn(node_events);
        tokio::spawn(service_events);
        let resolver = Resolver::new(changed.clone(), RESOLVE_TIMEOUT);
        Self { nodes, services, written, changed, resolver }
    }

    /// Waits until both watches have listed everything once.
    pub async fn ready(&self) -> anyhow::Result<()> {
        self.nodes.wait_until_ready().await?;
        self.services.wait_until_ready().await?;
        Ok(())
    }

    /// The MeshNode `name`.
    pub fn node(&self, name: &str) -> Option<Arc<MeshNode>> {
        self.nodes.get(&ObjectRef::new(name))
    }

    /// Brings `directory`, kept across syncs, to the state of the stores: only the objects the
    /// watches reported written or deleted since the last update are read and converted (see
    /// [`mesh_plan::Directory::update_changed`]), and the nodes whose endpoint is a name are
    /// resolved anew. A new directory, one after a watch relisted, or `everything` (the agent's
    /// resync) is brought to every object of the stores instead ([`mesh_plan::Directory::update`]:
    /// unchanged objects cost a version compare). Endpoint names are resolved by the
    /// [`Resolver`]: at once from its cache, or without an endpoint while a name is being
    /// resolved (the entry is applied again when the name resolves).
    ///
    /// One caller only (the agent's sync, or a simulator group): the record of written objects is
    /// shared by this directory's clones and taken by each update.
    pub fn update(&self, directory: &mut mesh_plan::Directory, everything: bool) -> mesh_plan::Updated {
        // Taken before the stores are read: an event after this is applied again next time.
        let written = std::mem::take(&mut *lock(&self.written));
        let resolve = |node: &str, endpoint: &str| self.resolver.lookup(node, endpoint);
        if everything || directory.is_new() || written.relisted {
            let nodes = self.nodes.state();
            let services = self.services.state();
            return directory.update(nodes.iter().map(AsRef::as_ref), services.iter().map(AsRef::as_ref), resolve);
        }
        let mut node_names = written.nodes;
        node_names.extend(directory.named_endpoints().map(str::to_owned));
        let nodes: Vec<(String, Option<Arc<MeshNode>>)> =
            node_names.into_iter().map(|name| (name.clone(), self.nodes.get(&ObjectRef::new(&name)))).collect();
        let services: Vec<(String, String, Option<Arc<MeshService>>)> = written
            .services
            .into_iter()
            .map(|(namespace, name)| {
                let service = self.services.get(&ObjectRef::new(&name).within(&namespace));
                (namespace, name, service)
            })
            .collect();
        directory.update_changed(
            nodes.iter().map(|(name, node)| (name.as_str(), node.as_deref())),
            services.iter().map(|(namespace, name, service)| (namespace.as_str(), name.as_str(), service.as_deref())),
            resolve,
        )
    }
}

/// How long one resolution of a peer's endpoint name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a resolved address is used before the name is resolved again (the old address stays
/// in use meanwhile).
const RESOLVED_TTL: Duration = Duration::from_secs(60);
/// How long a failed resolution is remembered before the name is tried again.
const FAILED_TTL: Duration = Duration::from_secs(15);

/// One name's state in the [`Resolver`].
#[derive(Clone, Debug)]
struct Resolution {
    /// The last result: an address, or none (failed, timed out, or not resolved yet).
    addr: Option<SocketAddr>,
    /// When `addr` was learned; `None` until the first resolution ends.
    at: Option<Instant>,
    /// A resolution is running.
    pending: bool,
}

/// Resolves peers' endpoint names off the agent's loop: [`Resolver::lookup`] answers at once
/// from a cache and starts a background resolution (system resolver, bounded by a timeout) for
/// a name it has not seen or whose answer is old; when that ends, the directory's `changed` is
/// notified so that the loop applies the result. A slow or silent DNS server therefore delays
/// only the peers whose names it serves, never the agent's Lease renewals, probes or other peers.
/// Endpoints are validated first (`mesh_core::Endpoint`); an invalid one is skipped and logged.
#[derive(Clone)]
pub struct Resolver {
    cache: Arc<Mutex<HashMap<String, Resolution>>>,
    changed: Arc<Notify>,
    timeout: Duration,
}

impl Resolver {
    /// A resolver that notifies `changed` after each resolution, each bounded by `timeout`.
    pub fn new(changed: Arc<Notify>, timeout: Duration) -> Self {
        Self { cache: Arc::default(), changed, timeout }
    }

    /// The address of `endpoint` (node `node`'s), if known now.
    pub fn lookup(&self, node: &str, endpoint: &str) -> Option<SocketAddr> {
        if let Ok(addr) = endpoint.parse() {
            return Some(addr);
        }
        if let Err(err) = mesh_core::Endpoint::parse(endpoint) {
            tracing::warn!(node, "not using the peer endpoint: {err}");
            return None;
        }
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Forget names no peer has used for long (a node's endpoint changed, or it left).
        if cache.len() > 1024 {
            cache.retain(|_, r| r.pending || r.at.is_some_and(|at| at.elapsed() < RESOLVED_TTL * 2));
        }
        let entry = cache.entry(endpoint.to_owned()).or_insert(Resolution { addr: None, at: None, pending: false });
        let ttl = if entry.addr.is_some() { RESOLVED_TTL } else { FAILED_TTL };
        let fresh = entry.at.is_some_and(|at| at.elapsed() < ttl);
        if !fresh && !entry.pending {
            entry.pending = true;
            self.spawn(node.to_owned(), endpoint.to_owned());
        }
        entry.addr
    }

    fn spawn(&self, node: String, endpoint: String) {
        let (cache, changed, timeout) = (self.cache.clone(), self.changed.clone(), self.timeout);
        tokio::spawn(async move {
            let result = tokio::time::timeout(timeout, tokio::net::lookup_host(endpoint.clone())).await;
            let addr = match result {
                Ok(Ok(mut addrs)) => addrs.next(),
                Ok(Err(err)) => {
                    tracing::warn!(node, endpoint, "cannot resolve the peer endpoint: {err}");
                    None
                }
                Err(_) => {
                    tracing::warn!(node, endpoint, "resolving the peer endpoint took longer than {timeout:?}");
                    None
                }
            };
            let mut cache = cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let entry = cache.entry(endpoint).or_insert(Resolution { addr: None, at: None, pending: false });
            // A failure keeps the last good address: a flaky DNS server does not cut a peer off.
            entry.addr = addr.or(entry.addr);
            entry.at = Some(Instant::now());
            entry.pending = false;
            drop(cache);
            changed.notify_one();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_objects_keep_what_the_plan_reads_and_the_own_node_keeps_its_status() {
        let node = |name: &str| -> MeshNode {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode",
                "metadata": {"name": name, "labels": {"team": "a"}, "managedFields": [{"manager": "x"}],
                             "annotations": {"big": "x", (mesh_api::CONNECT_OWNER_ANNOTATION): "laptop"}},
                "spec": {"listenPort": 51820},
                "status": {"meshIP": "10.42.0.1", "conditions": [{"type": "Connected", "status": "True",
                    "reason": "AllPeersReachable", "message": "m", "lastTransitionTime": "2026-12-03T00:00:00Z"}],
                    "containers": [{"service": "web/api", "container": "api", "ready": true, "reason": "Running", "message": "m"}]}
            }))
            .unwrap()
        };
        let (mut own, mut other) = (node("me"), node("them"));
        slim_node(&mut own, Some("me"));
        slim_node(&mut other, Some("me"));
        for n in [&own, &other] {
            assert_eq!((n.metadata.labels.as_ref(), n.metadata.managed_fields.as_ref()), (None, None));
            let annotations = n.metadata.annotations.as_ref().unwrap();
            assert_eq!(annotations.keys().collect::<Vec<_>>(), [mesh_api::CONNECT_OWNER_ANNOTATION]);
            assert_eq!(n.status.as_ref().unwrap().mesh_ip.as_deref(), Some("10.42.0.1"));
        }
        let (own, other) = (own.status.unwrap(), other.status.unwrap());
        assert_eq!((own.conditions.len(), own.containers.len()), (1, 1), "the agent's own status is whole");
        assert!(other.conditions.is_empty() && other.containers.is_empty());
        let mut shared = node("them");
        slim_node(&mut shared, None);
        assert_eq!(shared.status.unwrap().conditions.len(), 1, "the simulator's nodes keep every status whole");

        let mut service: MeshService = serde_json::from_value(serde_json::json!({
            "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshService",
            "metadata": {"name": "api", "namespace": "web", "labels": {"app": "api"}},
            "spec": {"network": {"type": "mesh", "ports": [80]}, "node": "me"},
            "status": {"meshIP": "10.42.1.1", "node": "me", "dnsName": "api.web.mesh.local",
                "conditions": [{"type": "Ready", "status": "True", "reason": "Hosted", "message": "m",
                    "lastTransitionTime": "2026-12-03T00:00:00Z"}]}
        }))
        .unwrap();
        slim_service(&mut service);
        let status = service.status.as_ref().unwrap();
        assert_eq!((status.mesh_ip.as_deref(), status.node.as_deref()), (Some("10.42.1.1"), Some("me")));
        assert!(status.conditions.is_empty() && status.dns_name.is_none() && service.metadata.labels.is_none());
        assert_eq!(service.spec.node.as_deref(), Some("me"));
    }

    #[test]
    fn the_written_record_holds_the_objects_of_writes_and_deletes_and_marks_a_relist() {
        let mut written = Written::default();
        let node = |name: &str| MeshNode::new(name, mesh_api::MeshNodeSpec::default());
        let service = |ns: &str, name: &str| {
            let mut s = MeshService::new(
                name,
                serde_json::from_value(serde_json::json!({"network": {"type": "mesh", "ports": [80]}})).unwrap(),
            );
            s.metadata.namespace = Some(ns.to_owned());
            s
        };
        written.record(&watcher::Event::Apply(node("a")), Written::mark_node);
        written.record(&watcher::Event::Delete(node("b")), Written::mark_node);
        written.record(&watcher::Event::Apply(node("a")), Written::mark_node);
        written.record(&watcher::Event::Apply(service("web", "api")), Written::mark_service);
        written.record(&watcher::Event::Delete(service("db", "pg")), Written::mark_service);
        assert_eq!(written.nodes, HashSet::from(["a".to_owned(), "b".to_owned()]));
        assert_eq!(
            written.services,
            HashSet::from([("web".to_owned(), "api".to_owned()), ("db".to_owned(), "pg".to_owned())])
        );
        assert!(!written.relisted);
        // A relist's objects come as one new list: the whole directory is read again.
        written.record(&watcher::Event::Init, Written::mark_node);
        written.record(&watcher::Event::InitApply(node("c")), Written::mark_node);
        assert!(!written.relisted && !written.nodes.contains("c"));
        written.record(&watcher::Event::InitDone, Written::mark_node);
        assert!(written.relisted);
    }

    #[tokio::test]
    async fn literals_resolve_at_once_and_invalid_endpoints_not_at_all() {
        let resolver = Resolver::new(Arc::new(Notify::new()), Duration::from_secs(1));
        assert_eq!(resolver.lookup("n", "192.0.2.1:51820"), Some(SocketAddr::from(([192, 0, 2, 1], 51820))));
        assert_eq!(resolver.lookup("n", "not an endpoint"), None);
        assert_eq!(resolver.lookup("n", "x:0"), None);
        assert!(resolver.cache.lock().unwrap().is_empty(), "nothing to resolve");
    }

    #[tokio::test]
    async fn a_name_is_resolved_in_the_background_and_then_served_from_the_cache() {
        let changed = Arc::new(Notify::new());
        let resolver = Resolver::new(changed.clone(), Duration::from_secs(5));
        // Not known yet: no address, and the caller does not wait.
        assert_eq!(resolver.lookup("n", "localhost:51820"), None);
        tokio::time::timeout(Duration::from_secs(10), changed.notified()).await.expect("resolved");
        let addr = resolver.lookup("n", "localhost:51820").expect("cached");
        assert!(addr.ip().is_loopback() && addr.port() == 51820, "{addr}");
    }
}
