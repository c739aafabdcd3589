//! The mesh directory as this agent sees it: watches of every MeshNode and every MeshService,
//! and the agent's `mesh_plan::Directory` (what every node derives alike from them: peer
//! entries, placements, the DNS zone), kept across syncs and brought up to date with only what
//! the watches reported, so a sync after one change costs what the change touches, not the size
//! of the mesh (the one conversion from API objects to the data plane's inputs lives in
//! `mesh-plan`). Also the [`Resolver`] of peers' endpoint names, which never makes the agent's
//! loop wait for DNS.
//!
//! - **MeshServices** are applied to the kept directory as their watch events arrive, a batch
//!   at a time, and then dropped: no store holds them. The directory keeps what the agent
//!   derives from a service (a placement, a name), a fraction of the object (at 50,000 services
//!   the objects alone held 39 MiB). A re-list applies every listed service and removes those
//!   the list lacks.
//! - **MeshNodes** are kept in a reflector store, slimmed ([`slim_node`]): the agent reads its
//!   own MeshNode for its status writes, and a resync compares every node with the store. Each
//!   [`Directory::update`] applies the nodes the watch reported written since the last one.
//!
//! Managed fields, labels and annotations are dropped before a node is stored, so a tenant's
//! large annotations cost the agents nothing.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use mesh_api::{MeshNode, MeshService};
use tokio::sync::{Notify, OwnedRwLockReadGuard, RwLock};

/// Watch events of MeshServices applied to the directory under one lock, at most.
const SERVICE_BATCH: usize = 512;

/// The watched MeshNodes and MeshServices, and the directory derived from them.
#[derive(Clone)]
pub struct Directory {
    nodes: Store<MeshNode>,
    /// The directory the agent plans from: services applied by their watch as events arrive,
    /// nodes by [`Directory::update`].
    kept: Arc<RwLock<mesh_plan::Directory>>,
    /// The MeshNodes the watch reported since the last [`Directory::update`].
    written: Arc<Mutex<Written>>,
    /// True once the MeshServices were listed (and applied) once.
    services_listed: tokio::sync::watch::Receiver<bool>,
    /// Notified on every watch event, and when a peer endpoint name has been resolved.
    pub changed: Arc<Notify>,
    resolver: Resolver,
}

/// The MeshNodes the watch reported written or deleted since the last [`Directory::update`], by
/// name, and whether it listed everything anew since (a restart of the watch: nodes may have
/// changed or gone unreported meanwhile).
#[derive(Debug, Default)]
struct Written {
    nodes: HashSet<String>,
    relisted: bool,
}

impl Written {
    /// Records one watch event (already applied to the store).
    fn record(&mut self, event: &watcher::Event<MeshNode>) {
        match event {
            watcher::Event::Apply(node) | watcher::Event::Delete(node) => self.nodes.extend(node.metadata.name.clone()),
            // The store swaps in the new list at its end.
            watcher::Event::InitDone => self.relisted = true,
            watcher::Event::Init | watcher::Event::InitApply(_) => {}
        }
    }
}

/// The lock of `written`: a panic while holding it leaves at worst a key recorded twice.
fn lock(written: &Mutex<Written>) -> std::sync::MutexGuard<'_, Written> {
    written.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Applies a batch of MeshService watch events to `directory`, in order. `listing` carries a
/// re-list across batches: the services listed so far, from `Init` to `InitDone`, which removes
/// every service the list lacks. Returns how many services were added, changed or removed, and
/// whether a list ended in this batch.
fn apply_service_events(
    directory: &mut mesh_plan::Directory,
    listing: &mut Option<HashSet<(String, String)>>,
    events: Vec<watcher::Event<MeshService>>,
) -> (usize, bool) {
    let no_nodes = std::iter::empty::<(&str, Option<&MeshNode>)>();
    let key = |s: &MeshService| {
        (s.metadata.namespace.clone().unwrap_or_default(), s.metadata.name.clone().unwrap_or_default())
    };
    let (mut changed, mut listed) = (0, false);
    // Consecutive writes, applied together (one `finish` of the directory for the lot).
    let mut pending: Vec<(String, String, Option<MeshService>)> = Vec::new();
    let mut flush = |directory: &mut mesh_plan::Directory, pending: &mut Vec<(String, String, Option<MeshService>)>| {
        if !pending.is_empty() {
            let items = pending.iter().map(|(ns, name, s)| (ns.as_str(), name.as_str(), s.as_ref()));
            changed += directory.update_changed(no_nodes.clone(), items, |_, _| None).services;
            pending.clear();
        }
    };
    for event in events {
        match event {
            watcher::Event::Apply(service) => {
                let (ns, name) = key(&service);
                pending.push((ns, name, Some(service)));
            }
            watcher::Event::Delete(service) => {
                let (ns, name) = key(&service);
                pending.push((ns, name, None));
            }
            watcher::Event::Init => *listing = Some(HashSet::new()),
            watcher::Event::InitApply(service) => {
                let (ns, name) = key(&service);
                listing.get_or_insert_default().insert((ns.clone(), name.clone()));
                pending.push((ns, name, Some(service)));
            }
            watcher::Event::InitDone => {
                flush(directory, &mut pending);
                let listed_now = listing.take().unwrap_or_default();
                let gone: Vec<(String, String)> = directory
                    .service_keys()
                    .filter(|(ns, name)| !listed_now.contains(&((*ns).to_owned(), (*name).to_owned())))
                    .map(|(ns, name)| (ns.to_owned(), name.to_owned()))
                    .collect();
                pending.extend(gone.into_iter().map(|(ns, name)| (ns, name, None)));
                flush(directory, &mut pending);
                listed = true;
            }
        }
    }
    flush(directory, &mut pending);
    (changed, listed)
}

/// Drops what the agent never reads from a watched MeshNode before it is stored: managedFields,
/// labels, finalizers and owner references, and of the annotations all but the one that marks an
/// ephemeral member (it is not probed); of a MeshNode other than `own` (`None`: keep every
/// node's status whole) also what only its own agent reads: its conditions, relayed peers and
/// containers. The agent's own MeshNode keeps its status whole: its status writes compare
/// against it.
fn slim_node(node: &mut MeshNode, own: Option<&str>) {
    let meta = &mut node.metadata;
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
    if own.is_some_and(|own| node.metadata.name.as_deref() != Some(own))
        && let Some(status) = node.status.as_mut()
    {
        status.conditions = Vec::new();
        status.relayed_peers = Vec::new();
        status.containers = Vec::new();
    }
}

impl Directory {
    /// Starts watching, keeping `directory` (a new one, with the agent's settings) up to date;
    /// the watches run until the process ends and retry with backoff. `own`: the agent's
    /// MeshNode, the only one whose status is stored whole (`None`: every node's, for the
    /// simulator, whose nodes share one directory).
    pub fn watch(client: Client, own: Option<String>, directory: mesh_plan::Directory) -> Self {
        let changed = Arc::new(Notify::new());
        let written = Arc::new(Mutex::new(Written::default()));
        let kept = Arc::new(RwLock::new(directory));
        let (nodes, node_writer) = reflector::store();
        let (notify, record) = (changed.clone(), written.clone());
        let node_events = watcher(Api::<MeshNode>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .map_ok(move |event| event.modify(|node| slim_node(node, own.as_deref())))
            .reflect(node_writer)
            .for_each(move |event| {
                match event {
                    Ok(event) => lock(&record).record(&event),
                    Err(err) => tracing::warn!("watching MeshNodes: {err}"),
                }
                notify.notify_one();
                futures::future::ready(())
            });
        let (listed_tx, services_listed) = tokio::sync::watch::channel(false);
        let (notify, directory) = (changed.clone(), kept.clone());
        let service_events = async move {
            let events = watcher(Api::<MeshService>::all(client), watcher::Config::default())
                .default_backoff()
                .ready_chunks(SERVICE_BATCH);
            let mut events = std::pin::pin!(events);
            let mut listing = None;
            while let Some(batch) = events.next().await {
                let mut ok = Vec::with_capacity(batch.len());
                for event in batch {
                    match event {
                        Ok(event) => ok.push(event),
                        Err(err) => tracing::warn!("watching MeshServices: {err}"),
                    }
                }
                let (changed, listed) = apply_service_events(&mut *directory.write().await, &mut listing, ok);
                tracing::trace!(changed, "MeshService events applied to the directory");
                if listed {
                    listed_tx.send_replace(true);
                }
                notify.notify_one();
            }
        };
        tokio::spawn(node_events);
        tokio::spawn(service_events);
        let resolver = Resolver::new(changed.clone(), RESOLVE_TIMEOUT);
        Self { nodes, kept, written, services_listed, changed, resolver }
    }

    /// Waits until both watches have listed everything once.
    pub async fn ready(&self) -> anyhow::Result<()> {
        self.nodes.wait_until_ready().await?;
        let mut listed = self.services_listed.clone();
        listed.wait_for(|listed| *listed).await.map_err(|_| anyhow::anyhow!("the MeshService watch stopped"))?;
        Ok(())
    }

    /// The MeshNode `name`.
    pub fn node(&self, name: &str) -> Option<Arc<MeshNode>> {
        self.nodes.get(&ObjectRef::new(name))
    }

    /// The kept directory as it is now, for reading (services as of the last watch event,
    /// nodes as of the last [`update`](Self::update)). Service events wait while it is held.
    pub async fn read(&self) -> OwnedRwLockReadGuard<mesh_plan::Directory> {
        self.kept.clone().read_owned().await
    }

    /// Brings the kept directory's nodes to the state of the store and returns the directory for
    /// reading (its services are brought up to date by their watch as events arrive): only the
    /// nodes the watch reported written or deleted since the last update are read and converted
    /// (see [`mesh_plan::Directory::update_changed`]), and the nodes whose endpoint is a name are
    /// resolved anew. A new directory, a re-list of the nodes, or `everything` (the agent's
    /// resync) compares every node of the store instead ([`mesh_plan::Directory::update_nodes`]:
    /// an unchanged one costs a version compare). Endpoint names are resolved by the
    /// [`Resolver`]: at once from its cache, or without an endpoint while a name is being
    /// resolved (the entry is applied again when the name resolves).
    ///
    /// One caller only (the agent's sync, or a simulator group): the record of written nodes is
    /// shared by this directory's clones and taken by each update.
    pub async fn update(&self, everything: bool) -> (OwnedRwLockReadGuard<mesh_plan::Directory>, mesh_plan::Updated) {
        let mut directory = self.kept.clone().write_owned().await;
        // Taken once the directory is ours and before the store is read: an event after this
        // is applied again next time.
        let written = std::mem::take(&mut *lock(&self.written));
        let resolve = |node: &str, endpoint: &str| self.resolver.lookup(node, endpoint);
        let updated = if everything || directory.is_new() || written.relisted {
            let nodes = self.nodes.state();
            directory.update_nodes(nodes.iter().map(AsRef::as_ref), resolve)
        } else {
            let mut names = written.nodes;
            names.extend(directory.named_endpoints().map(str::to_owned));
            let nodes: Vec<(String, Option<Arc<MeshNode>>)> =
                names.into_iter().map(|name| (name.clone(), self.nodes.get(&ObjectRef::new(&name)))).collect();
            let no_services = std::iter::empty::<(&str, &str, Option<&MeshService>)>();
            directory.update_changed(
                nodes.iter().map(|(name, node)| (name.as_str(), node.as_deref())),
                no_services,
                resolve,
            )
        };
        (directory.downgrade(), updated)
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
    fn stored_nodes_keep_what_the_plan_reads_and_the_own_node_keeps_its_status() {
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
    }

    fn service(ns: &str, name: &str, ip: &str) -> MeshService {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshService",
            "metadata": {"name": name, "namespace": ns, "resourceVersion": ip},
            "spec": {"network": {"type": "mesh", "ports": [80]}, "node": "me"},
            "status": {"meshIP": ip, "node": "me"}
        }))
        .unwrap()
    }

    fn keys(directory: &mesh_plan::Directory) -> Vec<String> {
        let mut keys: Vec<String> = directory.service_keys().map(|(ns, name)| format!("{ns}/{name}")).collect();
        keys.sort();
        keys
    }

    #[test]
    fn service_events_are_applied_in_order_and_a_relist_removes_what_it_lacks() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let mut directory = mesh_plan::Directory::new(None, &mesh_dataplane::dns::ShortNames::default());
        let mut listing = None;
        // The first list, split over two batches: nothing is removed before it ends.
        let first = vec![Init, InitApply(service("web", "api", "10.42.1.1"))];
        assert_eq!(apply_service_events(&mut directory, &mut listing, first), (1, false));
        let rest =
            vec![InitApply(service("db", "pg", "10.42.1.2")), InitDone, Apply(service("web", "ui", "10.42.1.3"))];
        assert_eq!(apply_service_events(&mut directory, &mut listing, rest), (2, true));
        assert_eq!(keys(&directory), ["db/pg", "web/api", "web/ui"]);
        // Written, then deleted, in one batch: gone.
        let batch = vec![Apply(service("web", "tmp", "10.42.1.4")), Delete(service("web", "tmp", "10.42.1.4"))];
        apply_service_events(&mut directory, &mut listing, batch);
        assert_eq!(keys(&directory), ["db/pg", "web/api", "web/ui"]);
        // A relist (the watch restarted) that lacks web/ui and has db/pg at a new address.
        let relist = vec![
            Init,
            InitApply(service("web", "api", "10.42.1.1")),
            InitApply(service("db", "pg", "10.42.1.9")),
            InitDone,
        ];
        assert_eq!(apply_service_events(&mut directory, &mut listing, relist), (2, true), "db/pg changed, web/ui gone");
        assert_eq!(keys(&directory), ["db/pg", "web/api"]);
        assert!(listing.is_none());
    }

    #[test]
    fn the_written_record_holds_the_nodes_written_and_deleted_and_marks_a_relist() {
        let mut written = Written::default();
        let node = |name: &str| MeshNode::new(name, mesh_api::MeshNodeSpec::default());
        written.record(&watcher::Event::Apply(node("a")));
        written.record(&watcher::Event::Delete(node("b")));
        written.record(&watcher::Event::Apply(node("a")));
        assert_eq!(written.nodes, HashSet::from(["a".to_owned(), "b".to_owned()]));
        assert!(!written.relisted);
        // A relist's objects come as one new list: every node is compared again.
        written.record(&watcher::Event::Init);
        written.record(&watcher::Event::InitApply(node("c")));
        assert!(!written.relisted && !written.nodes.contains("c"));
        written.record(&watcher::Event::InitDone);
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
