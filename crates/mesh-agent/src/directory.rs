//! The mesh directory as this agent sees it: watches of every MeshNode and every MeshService,
//! kept in reflector stores, with a notification on each change; [`Directory::update`] reads
//! them once into the agent's `mesh_plan::Directory`, kept across syncs, converting only the
//! objects that changed ([`Directory::snapshot`] derives a new one; the one conversion from API
//! objects to the data plane's inputs lives in `mesh-plan`). Also the [`Resolver`] of peers' endpoint names, which
//! never makes the agent's loop wait for DNS.
//!
//! The stores keep only what the agent reads: managedFields and annotations are dropped before
//! an object is stored, so a tenant's large annotations cost the agents nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use ipnet::Ipv4Net;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use mesh_api::{MeshNode, MeshService};
use mesh_dataplane::dns::ShortNames;
use tokio::sync::Notify;

/// The watched MeshNodes and MeshServices.
#[derive(Clone)]
pub struct Directory {
    nodes: Store<MeshNode>,
    services: Store<MeshService>,
    /// Notified on every watch event, and when a peer endpoint name has been resolved.
    pub changed: Arc<Notify>,
    resolver: Resolver,
}

/// Drops what the agent never reads from a watched object before it is stored.
/// Of the annotations, only the one that marks an ephemeral member is kept (it is not probed).
fn slim<K: kube::Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|key, _| key == mesh_api::CONNECT_OWNER_ANNOTATION);
    }
    if meta.annotations.as_ref().is_some_and(std::collections::BTreeMap::is_empty) {
        meta.annotations = None;
    }
}

impl Directory {
    /// Starts watching; the watches run until the process ends and retry with backoff.
    pub fn watch(client: Client) -> Self {
        let changed = Arc::new(Notify::new());
        let (nodes, node_writer) = reflector::store();
        let (services, service_writer) = reflector::store();
        let notify = changed.clone();
        let node_events = watcher(Api::<MeshNode>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .map_ok(|event| event.modify(slim::<MeshNode>))
            .reflect(node_writer)
            .for_each(move |event| {
                if let Err(err) = event {
                    tracing::warn!("watching MeshNodes: {err}");
                }
                notify.notify_one();
                futures::future::ready(())
            });
        let notify = changed.clone();
        let service_events = watcher(Api::<MeshService>::all(client), watcher::Config::default())
            .default_backoff()
            .map_ok(|event| event.modify(slim::<MeshService>))
            .reflect(service_writer)
            .for_each(move |event| {
                if let Err(err) = event {
                    tracing::warn!("watching MeshServices: {err}");
                }
                notify.notify_one();
                futures::future::ready(())
            });
        tokio::spawn(node_events);
        tokio::spawn(service_events);
        let resolver = Resolver::new(changed.clone(), RESOLVE_TIMEOUT);
        Self { nodes, services, changed, resolver }
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

    /// Brings `directory`, kept across syncs, to the state of the stores, read once (see
    /// [`mesh_plan::Directory::update`]: only the objects that changed since are converted);
    /// endpoint names are resolved as for [`Directory::snapshot`].
    pub fn update(&self, directory: &mut mesh_plan::Directory) -> mesh_plan::Updated {
        let nodes = self.nodes.state();
        let services = self.services.state();
        directory.update(nodes.iter().map(AsRef::as_ref), services.iter().map(AsRef::as_ref), |node, endpoint| {
            self.resolver.lookup(node, endpoint)
        })
    }

    /// One snapshot of the directory, derived once (see [`mesh_plan::Directory`]): the stores
    /// are read once, endpoint names resolved by the [`Resolver`] (at once from its cache, or
    /// without an endpoint while a name is being resolved: the entry is applied again when the
    /// name resolves).
    pub fn snapshot(&self, subnet: Option<Ipv4Net>, short_names: &ShortNames) -> mesh_plan::Directory {
        let nodes = self.nodes.state();
        let services = self.services.state();
        mesh_plan::Directory::build(
            nodes.iter().map(AsRef::as_ref),
            services.iter().map(AsRef::as_ref),
            subnet,
            short_names,
            |node, endpoint| self.resolver.lookup(node, endpoint),
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
