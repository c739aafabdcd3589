//! What every reconcile shares: the API client, the address pool, the rules' index (what the
//! controller knows of every object, and which node hosts which service IP), the watch caches,
//! the event recorder and the metrics.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use mesh_api::{MeshNode, MeshService};
use mesh_core::{Owner, Pool};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::Metrics;
use crate::rules::index::{Hosted, Index};
use crate::rules::{Emit, On};

/// The field manager of every write the controller makes (server-side apply).
pub const FIELD_MANAGER: &str = "mesh-controller";
/// The finalizer that controllers before issue 16 put on every MeshService and MeshNode. This
/// one puts none (it learns of deletions from its watches: docs/adr/0002) and removes this one
/// where it finds it, so that nothing an older controller made stays undeletable without it.
pub const LEGACY_FINALIZER: &str = "mesh.harness.dev/release-ip";

/// State shared by all reconciles.
pub struct Ctx {
    /// The API client.
    pub client: Client,
    /// The mesh subnet's allocations.
    pub pool: Mutex<Pool>,
    /// What the rules read of other objects, and which node hosts which service IP (see
    /// [`crate::rules::index`]).
    pub index: Mutex<Index>,
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
    /// Where services may be placed and which get short names (see [`crate::service::Policy`]).
    pub policy: crate::rules::service::Policy,
    /// When the pool's clock ([`Ctx::now`]) started, in Unix seconds: to persist the hold-back.
    pub started_unix: u64,
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
            index: Mutex::new(Index::new()),
            mesh_nodes,
            mesh_services,
            pods,
            nodes,
            node_trigger,
            service_trigger,
            recorder,
            metrics,
            synced: tokio::sync::watch::Sender::new(false),
            policy: crate::rules::service::Policy::default(),
            started_unix: crate::holds::unix_now(),
            started: Instant::now(),
        }
    }

    /// The same context with `policy`.
    pub fn with_policy(self, policy: crate::rules::service::Policy) -> Self {
        Self { policy, ..self }
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

    /// The rules' index, locked. Never held across an await.
    pub fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a new hosting for a service and triggers the peer entries of the nodes whose
    /// allowed IPs change (the old and the new host): O(1) writes per change.
    pub fn set_hosting(&self, owner: &Owner, hosted: Option<Hosted>) {
        let nodes = self.index().set_hosting(owner, hosted);
        for node in nodes {
            // A closed channel means the controller is shutting down; nothing to do then.
            let _ = self.node_trigger.send(ObjectRef::new(&node));
        }
    }

    /// Asks the MeshService controller to reconcile `namespace/name` again.
    pub fn trigger_service(&self, namespace: &str, name: &str) {
        let _ = self.service_trigger.send(ObjectRef::new(name).within(namespace));
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

    /// Publishes the Warning events a plan asks for: about `obj`, or about `k8s_node`.
    pub async fn emit<K>(&self, obj: &K, k8s_node: Option<&Node>, events: Vec<Emit>)
    where
        K: Resource<DynamicType = ()>,
    {
        for e in events {
            match (e.on, k8s_node) {
                (On::KubernetesNode, Some(node)) => {
                    self.event(node, EventType::Warning, &e.reason, e.action, e.note).await;
                }
                _ => self.event(obj, EventType::Warning, &e.reason, e.action, e.note).await,
            }
        }
    }
}

/// Why a reconcile failed, and so how it is retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a request.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Removing [`LEGACY_FINALIZER`] failed.
    #[error(
        "removing the finalizer {LEGACY_FINALIZER} that an older mesh-controller left: {0}; retrying (it is safe to \
         remove by hand: kubectl patch with --type=json and a remove of its entry in /metadata/finalizers)"
    )]
    LegacyFinalizer(#[source] kube::Error),
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
            // Most likely the list changed under the patch (its test failed): look again shortly.
            Self::LegacyFinalizer(_) => Action::requeue(Duration::from_secs(1)),
            Self::Kube(_) => Action::requeue(Duration::from_secs(5)),
        }
    }
}

/// The address an object asks for in `spec.meshIP`, parsed with the API's grammar; a malformed
/// one (which the CRD's schema refuses) is a permanent error, not a retry.
pub fn requested_ip(mesh_ip: Option<&str>) -> Result<Option<std::net::Ipv4Addr>, Error> {
    mesh_ip.map(mesh_core::parse_mesh_ip).transpose().map_err(|e| Error::Permanent(e.to_string()))
}

/// Writes `patch` (the controller's fields of the status) to `name` by server-side apply; `false`
/// when the object is gone (deleted since the cache said it was there).
pub async fn write_status<K>(api: &Api<K>, name: &str, patch: &serde_json::Value) -> Result<bool, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let params = kube::api::PatchParams::apply(FIELD_MANAGER).force();
    match api.patch_status(name, &params, &kube::api::Patch::Apply(patch)).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether the object `name` exists, read from the API server's storage rather than its watch
/// cache: a list with a field selector, since the controller's role may list but not get.
pub async fn is_there<K>(api: &Api<K>, name: &str) -> Result<bool, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let params = kube::api::ListParams::default().fields(&format!("metadata.name={name}"));
    Ok(!api.list_metadata(&params).await?.items.is_empty())
}

/// The JSON patch that removes every [`LEGACY_FINALIZER`] entry from `finalizers`, or `None`
/// when there is none (then nothing is written). Each removal is preceded by a test of the
/// entry at that index, so a list changed meanwhile fails the patch instead of losing another
/// controller's finalizer; entries are removed from the last, so the earlier indices hold.
pub fn legacy_finalizer_patch(finalizers: &[String]) -> Option<serde_json::Value> {
    let ops: Vec<serde_json::Value> = finalizers
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, f)| *f == LEGACY_FINALIZER)
        .flat_map(|(i, _)| {
            let path = format!("/metadata/finalizers/{i}");
            [
                serde_json::json!({"op": "test", "path": path, "value": LEGACY_FINALIZER}),
                serde_json::json!({"op": "remove", "path": path}),
            ]
        })
        .collect();
    (!ops.is_empty()).then_some(serde_json::Value::Array(ops))
}

/// Removes [`LEGACY_FINALIZER`] from `obj` if it carries it (one patch), and says whether it
/// wrote. An object an older controller made keeps it otherwise, and with it the object, its
/// namespace and the CRD could not be deleted once no controller runs.
pub async fn remove_legacy_finalizer<K>(api: &Api<K>, obj: &K) -> Result<bool, Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let Some(ops) = legacy_finalizer_patch(obj.finalizers()) else { return Ok(false) };
    let ops =
        serde_json::from_value(ops).map_err(|e| Error::Permanent(format!("a JSON patch that does not parse: {e}")))?;
    api.patch(&obj.name_any(), &PatchParams::default(), &Patch::Json::<()>(ops))
        .await
        .map_err(Error::LegacyFinalizer)?;
    tracing::info!(object = %obj.name_any(), "removed the finalizer {LEGACY_FINALIZER} that an older mesh-controller left");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn no_legacy_finalizer_no_patch() {
        assert_eq!(legacy_finalizer_patch(&[]), None);
        assert_eq!(legacy_finalizer_patch(&list(&["example.com/keep"])), None);
    }

    #[test]
    fn the_legacy_finalizer_is_removed_where_it_stands_and_nothing_else() {
        let patch = legacy_finalizer_patch(&list(&["example.com/keep", LEGACY_FINALIZER])).expect("a patch");
        assert_eq!(
            patch,
            json!([
                {"op": "test", "path": "/metadata/finalizers/1", "value": LEGACY_FINALIZER},
                {"op": "remove", "path": "/metadata/finalizers/1"},
            ])
        );
    }

    #[test]
    fn repeated_entries_are_removed_from_the_last_so_indices_hold() {
        let patch = legacy_finalizer_patch(&list(&[LEGACY_FINALIZER, "a/b", LEGACY_FINALIZER])).expect("a patch");
        let paths: Vec<&str> = patch.as_array().expect("ops").iter().filter_map(|op| op["path"].as_str()).collect();
        assert_eq!(
            paths,
            ["/metadata/finalizers/2", "/metadata/finalizers/2", "/metadata/finalizers/0", "/metadata/finalizers/0"]
        );
        // And it is a JSON patch kube accepts.
        let parsed: Result<Patch<()>, _> = serde_json::from_value(patch).map(Patch::Json);
        assert!(parsed.is_ok());
    }
}
