//! What every reconcile shares: the API client, the address pool, the index of which node
//! hosts which service IP, the watch caches, the event recorder and the metrics.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::Error as FinalizerError;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use mesh_api::{MeshNode, MeshService};
use mesh_core::{Owner, Pool};
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::Metrics;

/// The field manager of every write the controller makes (server-side apply).
pub const FIELD_MANAGER: &str = "mesh-controller";
/// The finalizer that keeps an object until its mesh IP is released.
pub const FINALIZER: &str = "mesh.harness.dev/release-ip";

/// A service IP and the node that hosts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hosted {
    /// The hosting MeshNode.
    pub node: String,
    /// The service's mesh IP.
    pub ip: Ipv4Addr,
}

/// State shared by all reconciles.
pub struct Ctx {
    /// The API client.
    pub client: Client,
    /// The mesh subnet's allocations.
    pub pool: Mutex<Pool>,
    /// Which node hosts which service IP, from the service reconciles.
    pub hosting: Mutex<HashMap<Owner, Hosted>>,
    /// Watch cache of MeshNodes.
    pub mesh_nodes: Store<MeshNode>,
    /// Watch cache of MeshServices.
    pub mesh_services: Store<MeshService>,
    /// Watch cache of Pods, for selector-backed services.
    pub pods: Store<Pod>,
    /// Watch cache of Kubernetes Nodes.
    pub nodes: Store<Node>,
    /// Asks the MeshNode controller to recompute a node's peer entry.
    pub node_trigger: UnboundedSender<ObjectRef<MeshNode>>,
    /// Asks the MeshService controller to look at a service again (same-named services in
    /// other namespaces, whose short DNS name depends on each other).
    pub service_trigger: UnboundedSender<ObjectRef<MeshService>>,
    /// Publishes Kubernetes events.
    pub recorder: Recorder,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Whether every watch cache has had its first full list (see [`Ctx::caches_synced`]).
    pub synced: tokio::sync::watch::Sender<bool>,
    started: Instant,
}

impl Ctx {
    /// Assembles the context.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        pool: Pool,
        mesh_nodes: Store<MeshNode>,
        mesh_services: Store<MeshService>,
        pods: Store<Pod>,
        nodes: Store<Node>,
        node_trigger: UnboundedSender<ObjectRef<MeshNode>>,
        service_trigger: UnboundedSender<ObjectRef<MeshService>>,
        recorder: Recorder,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics.pool_capacity.set(pool.capacity() as i64);
        Self {
            client,
            pool: Mutex::new(pool),
            hosting: Mutex::new(HashMap::new()),
            mesh_nodes,
            mesh_services,
            pods,
            nodes,
            node_trigger,
            service_trigger,
            recorder,
            metrics,
            synced: tokio::sync::watch::Sender::new(false),
            started: Instant::now(),
        }
    }

    /// Seconds since the controller started: the pool's clock.
    pub fn now(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Waits until every watch cache the reconcilers read has its first full list (the
    /// readiness task in main.rs says so through `synced`). Until then a reconcile would judge
    /// from a partial picture: right after a (re)start the MeshNode cache may still be empty,
    /// and every node-backed service would be marked NodeNotFound, lose its hosting and have its
    /// IP dropped from its node's peer entry. (A tokio watch, not `Store::wait_until_ready`
    /// from every reconcile: many concurrent waiters on one store were seen never to wake.)
    pub async fn caches_synced(&self) -> Result<(), Error> {
        let mut synced = self.synced.subscribe();
        synced
            .wait_for(|synced| *synced)
            .await
            .map(drop)
            .map_err(|_| Error::Permanent("the watch caches never synced: the controller is shutting down".into()))
    }

    /// The pool, locked. Never held across an await.
    pub fn pool(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The hosting index, locked. Never held across an await.
    pub fn hosting(&self) -> MutexGuard<'_, HashMap<Owner, Hosted>> {
        self.hosting.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The service IPs hosted on `node`, sorted.
    pub fn service_ips_on(&self, node: &str) -> BTreeSet<Ipv4Addr> {
        self.hosting().values().filter(|h| h.node == node).map(|h| h.ip).collect()
    }

    /// Records a new hosting for a service and triggers the peer entries of the nodes whose
    /// allowed IPs change (the old and the new host): O(1) writes per change.
    pub fn set_hosting(&self, owner: &Owner, hosted: Option<Hosted>) {
        let previous = {
            let mut index = self.hosting();
            let previous = index.get(owner).cloned();
            if previous == hosted {
                return;
            }
            match &hosted {
                Some(h) => index.insert(owner.clone(), h.clone()),
                None => index.remove(owner),
            };
            previous
        };
        for node in [previous.map(|h| h.node), hosted.map(|h| h.node)].into_iter().flatten() {
            // A closed channel means the controller is shutting down; nothing to do then.
            let _ = self.node_trigger.send(ObjectRef::new(&node));
        }
    }

    /// Updates the pool gauges.
    pub fn observe_pool(&self) {
        let used = self.pool().used();
        self.metrics.pool_used.set(used as i64);
    }

    /// Publishes an event about `obj`; a failure is logged, never fatal.
    pub async fn event<K>(&self, obj: &K, type_: EventType, reason: &str, action: &str, note: String)
    where
        K: Resource<DynamicType = ()>,
    {
        let event = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
        if let Err(err) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(object = %obj.name_any(), %reason, "could not publish an event: {err}");
        }
        self.metrics.wrote("Event");
    }
}

/// Why a reconcile failed, and so how it is retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a request.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// The object itself is wrong in a way only a change to it can fix.
    #[error("{0}")]
    Permanent(String),
}

impl Error {
    /// The retry policy: permanent problems wait for a change to the object; transient ones
    /// (the API server unavailable, a conflict) back off and retry.
    pub fn action(&self) -> Action {
        match self {
            Self::Permanent(_) => Action::await_change(),
            Self::Kube(kube::Error::Api(status)) if status.code == 422 || status.code == 400 => Action::await_change(),
            Self::Finalizer(err) => match err.as_ref() {
                FinalizerError::ApplyFailed(inner) | FinalizerError::CleanupFailed(inner) => inner.action(),
                // Adding or removing the finalizer raced another writer: try again shortly.
                _ => Action::requeue(Duration::from_secs(1)),
            },
            Self::Kube(_) => Action::requeue(Duration::from_secs(5)),
        }
    }
}
