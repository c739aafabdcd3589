//! `mesh-controller`: the one writer of harness-mesh's allocations and peer entries.
//!
//! It allocates mesh IPs to MeshNodes and MeshServices from the mesh subnet, resolves where
//! each service is hosted, writes every MeshNode's WireGuard peer entry, mirrors Kubernetes
//! Nodes into MeshNodes, and reports what it did in status conditions and events. With leader
//! election, several replicas may run; only the leader writes.

mod backoff;
mod caches;
mod conditions;
mod context;
mod ephemeral;
mod gone;
mod holds;
mod judge;
mod metrics;
mod node;
mod rules;
mod service;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use futures::{StreamExt, TryStreamExt, future};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use mesh_api::{MeshNode, MeshService};
use mesh_core::{Owner, Pool, Subnet};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::backoff::WatchBackoff;
use crate::context::Ctx;
use crate::metrics::Metrics;
use crate::rules::index::Hosted;

/// How long after a Node event its MeshNode is reconciled a second time (see `run`).
const NODE_RECHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// Allocates mesh IPs and writes WireGuard peer entries for harness-mesh.
///
/// Every flag can also be set through the environment variable shown with it.
#[derive(Parser, Debug)]
#[command(name = "mesh-controller", version, about, long_about)]
struct Args {
    /// The mesh subnet that mesh IPs are allocated from. Its network and broadcast addresses
    /// are never handed out.
    #[arg(long, env = "MESH_SUBNET", default_value = "10.42.0.0/16")]
    subnet: Subnet,

    /// Seconds a released mesh IP is held back before it is handed to another object, so that
    /// peers still holding the old entry never receive another service's traffic. The holds are
    /// kept in the ConfigMap --ip-hold-configmap, so a restarted controller goes on holding them
    /// back; an object deleted while no controller runs (uninstalled, scaled to 0) is not held
    /// back, and a controller killed outright may lose the holds of its last second.
    #[arg(long, env = "MESH_IP_HOLD_SECONDS", default_value_t = 300)]
    ip_hold_seconds: u64,

    /// The ConfigMap, in the --lease-namespace namespace, that keeps the IP hold-back across
    /// restarts: read at start (missing: no holds), written by server-side apply when a hold
    /// appears, at most once a second. The chart creates it and lets the controller get and
    /// patch it only.
    #[arg(long, env = "MESH_IP_HOLD_CONFIGMAP", default_value = "harness-mesh-controller-ip-holds")]
    ip_hold_configmap: String,

    /// How many of the mesh subnet's highest addresses only MeshNodes may get, so that services
    /// filling the pool cannot stop nodes joining; a service requesting one is refused
    /// (ReservedForNodes). Default: 1/16 of the subnet, at most 1024 (for 10.42.0.0/16:
    /// 10.42.251.255-10.42.255.254). Addresses already allocated keep their owners.
    #[arg(long, env = "MESH_NODE_RESERVED_IPS")]
    node_reserved_ips: Option<u32>,

    /// Cluster CIDRs (pod and service ranges, comma-separated) that the mesh subnet must not
    /// overlap: the controller refuses to start when it does (k3s, for one, uses 10.42.0.0/16
    /// for pods). Separately, a Node whose spec.podCIDRs overlaps the mesh subnet gets no mesh
    /// IP.
    #[arg(long, env = "MESH_CLUSTER_CIDRS", value_delimiter = ',')]
    cluster_cidrs: Vec<Subnet>,

    /// Namespaces whose MeshServices may use spec.node on a MeshNode that does not list its own
    /// (spec.serviceNamespaces), comma-separated; `*` is every namespace. Control-plane nodes
    /// take no such services unless their MeshNode lists the namespace.
    #[arg(long, env = "MESH_PLACEMENT_NAMESPACES", value_delimiter = ',', default_value = "default")]
    placement_namespaces: Vec<String>,

    /// Namespaces whose MeshServices get the short name <service>.mesh.local, comma-separated;
    /// `*` is every namespace. Must match the agents' --short-name-namespaces.
    #[arg(long, env = "MESH_SHORT_NAME_NAMESPACES", value_delimiter = ',', default_value = "default")]
    short_name_namespaces: Vec<String>,

    /// The DNS zone of the mesh (status.dnsName, condition messages), e.g. mesh.internal (the
    /// suffix reserved for private use, which mDNS never claims). Must match the agents' --zone
    /// (the chart's mesh.zone sets both).
    #[arg(long, env = "MESH_ZONE", default_value = mesh_dataplane::dns::ZONE, value_parser = mesh_dataplane::dns::check_zone)]
    zone: String,

    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "MESH_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,

    /// Elect a leader through a Lease so that several replicas can run; only the leader writes.
    #[arg(long, env = "MESH_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,

    /// Namespace of the leader-election Lease (in a pod: its own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    lease_namespace: String,

    /// Namespace of the agents' liveness Leases (`mesh-agent-<node>`), where `meshctl connect`
    /// renews the Lease of its ephemeral MeshNode; ephemeral MeshNodes whose Lease lapses are
    /// deleted (see ephemeral.rs). Default: --lease-namespace (in a pod: the release namespace).
    #[arg(long, env = "MESH_AGENT_LEASE_NAMESPACE")]
    agent_lease_namespace: Option<String>,

    /// Name of the leader-election Lease.
    #[arg(long, env = "MESH_LEASE_NAME", default_value = "mesh-controller")]
    lease_name: String,

    /// This replica's identity in the election and in events (in a pod: its name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,

    /// Seconds a leader's lease lasts without renewal.
    #[arg(long, env = "MESH_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,

    /// Reconciles of each kind (MeshService, MeshNode, Node mirror) that run at once. Bounded, so
    /// that a restart, which schedules every object at once, holds a few reconciles in flight
    /// rather than one per object (tens of thousands of them waiting for the caches), and so
    /// that a burst of changes writes to the API server at a steady pace. 0: unbounded.
    #[arg(long, env = "MESH_RECONCILE_CONCURRENCY", default_value_t = 16)]
    reconcile_concurrency: u16,

    /// Log format.
    #[arg(long, env = "MESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// jemalloc, not the C library's malloc: it gives memory the process freed back to the system,
/// where the C library's kept it after each burst of objects (a full list, a bulk create); the
/// measurements are in docs/adr/0005-jemalloc.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match args.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    judge::overlapping_cluster_cidrs(&args.subnet, &args.cluster_cidrs)?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let metrics = Arc::new(Metrics::default());
    let server = tokio::spawn(metrics::serve(args.metrics_addr, metrics.clone()));
    let client = Client::try_default().await.context("connecting to the Kubernetes API (kubeconfig or in-cluster)")?;

    let run = run(client.clone(), &args, identity.clone(), metrics);
    if !args.leader_elect {
        return tokio::select! {
            result = run => result,
            result = server => result?,
        };
    }
    let manager = LeaseManagerBuilder::new(client, &args.lease_name)
        .with_namespace(&args.lease_namespace)
        .with_identity(&identity)
        .with_duration(args.lease_seconds)
        .with_grace(args.lease_seconds.div_ceil(3).max(1))
        .build()
        .await
        .context("setting up leader election")?;
    let (mut leading, lease_task) = manager.watch().await;
    tracing::info!(%identity, lease = %args.lease_name, "waiting to become the leader");
    while !*leading.borrow_and_update() {
        leading.changed().await.context("leader election stopped")?;
    }
    tracing::info!(%identity, "became the leader");
    let lost = async move {
        while *leading.borrow_and_update() {
            if leading.changed().await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        result = run => result,
        result = server => result?,
        () = lost => {
            // Stop at once: another replica may already be writing. The Deployment restarts us
            // as a candidate.
            drop(lease_task);
            anyhow::bail!("lost leadership of lease {}; exiting so another replica leads alone", args.lease_name)
        }
    }
}

/// Runs the controllers until one stops; the allocator is rebuilt from the watch caches once
/// they have listed everything, before any reconcile ([`restore_from_caches`]).
async fn run(client: Client, args: &Args, identity: String, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let pool = new_pool(args)?;
    let watch = watcher::Config::default().any_semantic();
    // MeshNodes and MeshServices are listed consistently (a read of the latest state, in pages,
    // not whatever the API server's watch cache holds): the allocator is rebuilt from these
    // caches' first list, and a stale one could lack an address the controller before this one
    // gave out just before it stopped.
    let mesh_watch = watcher::Config::default();
    let mesh_nodes_api: Api<MeshNode> = Api::all(client.clone());
    let mesh_services_api: Api<MeshService> = Api::all(client.clone());
    let nodes_api: Api<Node> = Api::all(client.clone());
    let pods_api: Api<Pod> = Api::all(client.clone());

    // Every cache keeps only what the controller reads (caches.rs).
    let (pods, pods_writer) = reflector::store();
    let (mesh_nodes, mesh_nodes_writer) = reflector::store();
    let (mesh_services, mesh_services_writer) = reflector::store();
    let (k8s_nodes, k8s_nodes_writer) = reflector::store();
    let (node_trigger, node_triggers) = tokio::sync::mpsc::unbounded_channel();
    let (service_trigger, service_triggers) = tokio::sync::mpsc::unbounded_channel();
    let recorder =
        Recorder::new(client.clone(), Reporter { controller: "mesh-controller".into(), instance: Some(identity) });
    let hold_store = holds::HoldStore::new(client.clone(), &args.lease_namespace, &args.ip_hold_configmap);
    let ctx = Arc::new(
        Ctx::new(
            client,
            pool,
            mesh_nodes.clone(),
            mesh_services.clone(),
            pods.clone(),
            k8s_nodes.clone(),
            node_trigger,
            service_trigger,
            recorder,
            metrics.clone(),
        )
        .with_policy(rules::service::Policy {
            placement_namespaces: args.placement_namespaces.clone(),
            short_name_namespaces: args.short_name_namespaces.clone(),
            zone: args.zone.clone(),
        }),
    );
    // The hold-back of the controller before this one, restored with the pool (see `readiness`).
    let stored_holds = hold_store.load().await?;

    let reconciles = kube::runtime::controller::Config::default().concurrency(args.reconcile_concurrency);
    // Every watch event updates the rules' index (rules/index.rs) right after its cache has
    // taken it in, and before any reconcile it triggers runs.
    let pod_events = {
        let ctx = ctx.clone();
        reflector::reflector(pods_writer, watcher(pods_api, watch.clone()).modify(caches::trim_pod))
            .inspect_ok(move |event| match event {
                watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                    ctx.index().apply_pod(cached(&ctx.pods, pod));
                }
                watcher::Event::Delete(pod) => {
                    ctx.index().delete_pod(&pod.namespace().unwrap_or_default(), &pod.name_any());
                }
                watcher::Event::InitDone => ctx.index().rebuild_pods(ctx.pods.state()),
                watcher::Event::Init => {}
            })
            .backoff(WatchBackoff::default())
            .touched_objects()
    };
    let k8s_node_events = {
        let ctx = ctx.clone();
        reflector::reflector(k8s_nodes_writer, watcher(nodes_api.clone(), watch.clone()).modify(caches::trim_node))
            .inspect_ok(move |event| match event {
                watcher::Event::Apply(node) | watcher::Event::InitApply(node) => {
                    let name = node.name_any();
                    // Its control-plane role decides what may be placed on its MeshNode.
                    if ctx.index().apply_k8s_node(cached(&ctx.nodes, node)) && after_first_sync(&ctx) {
                        wake_services_on(&ctx, &name);
                    }
                }
                watcher::Event::Delete(node) => ctx.index().delete_k8s_node(&node.name_any()),
                watcher::Event::InitDone => ctx.index().rebuild_k8s_nodes(ctx.nodes.state()),
                watcher::Event::Init => {}
            })
            .applied_objects()
    };
    // Short watch backoffs, so the controller catches up within seconds after an API outage.
    let mirror_controller = Controller::for_stream(k8s_node_events, k8s_nodes.clone())
        .with_config(reconciles.clone())
        .trigger_backoff(WatchBackoff::default());

    // The MeshNode and MeshService controllers run on watch streams of their own making, so that
    // the same streams also tell the controller which objects are gone (no finalizer does: see
    // gone.rs). Each event reaches the handler after the watch cache has taken it in.
    let node_events = {
        let ctx = ctx.clone();
        reflector::reflector(
            mesh_nodes_writer,
            watcher(mesh_nodes_api.clone(), mesh_watch.clone()).modify(caches::trim_mesh_node),
        )
        .inspect_ok(move |event| {
            match event {
                watcher::Event::Apply(node) | watcher::Event::InitApply(node) => {
                    // Its services, by spec.node or where they are hosted now, look again when
                    // what they depend on changes (a node falling out of the tunnel makes its
                    // mesh services not Ready); not on every status write of its agent.
                    if ctx.index().apply_mesh_node(cached(&ctx.mesh_nodes, node)) && after_first_sync(&ctx) {
                        wake_services_on(&ctx, &node.name_any());
                    }
                }
                watcher::Event::Delete(node) => {
                    ctx.index().delete_mesh_node(&node.name_any());
                    wake_services_on(&ctx, &node.name_any());
                }
                watcher::Event::InitDone => ctx.index().rebuild_mesh_nodes(ctx.mesh_nodes.state()),
                watcher::Event::Init => {}
            }
            node::on_watch_event(&ctx, event);
        })
        .applied_objects()
    };
    let service_events = {
        let ctx = ctx.clone();
        reflector::reflector(
            mesh_services_writer,
            watcher(mesh_services_api, mesh_watch).modify(caches::trim_mesh_service),
        )
        .inspect_ok(move |event| {
            match event {
                watcher::Event::Apply(service) | watcher::Event::InitApply(service) => {
                    ctx.index().apply_service(service);
                }
                watcher::Event::Delete(service) => {
                    ctx.index().delete_service(&service.namespace().unwrap_or_default(), &service.name_any());
                }
                watcher::Event::InitDone => {
                    let services = ctx.mesh_services.state();
                    ctx.index().rebuild_services(services.iter().map(Arc::as_ref));
                }
                watcher::Event::Init => {}
            }
            service::on_watch_event(&ctx, event);
        })
        .applied_objects()
    };
    // The trigger backoff covers these streams and every other watch of the controller.
    let node_controller = Controller::for_stream(node_events, mesh_nodes)
        .with_config(reconciles.clone())
        .trigger_backoff(WatchBackoff::default());
    let service_controller = Controller::for_stream(service_events, mesh_services.clone())
        .with_config(reconciles)
        .trigger_backoff(WatchBackoff::default());

    let services_for_pods = ctx.clone();
    let services = service_controller
        .watches_stream(pod_events, move |pod: Pod| {
            let namespace = pod.namespace().unwrap_or_default();
            let selecting = services_for_pods.index().services_selecting(&namespace, pod.labels());
            selecting.into_iter().map(|(ns, name)| ObjectRef::new(&name).within(&ns)).collect::<Vec<_>>()
        })
        .reconcile_on(UnboundedReceiverStream::new(service_triggers))
        .shutdown_on_signal()
        .run(service::reconcile, service::error_policy, ctx.clone())
        .for_each(|_| future::ready(()));
    // A Node event reconciles the MeshNode of the same name at once, and again a moment later:
    // the reconcile reads the Node from the mirror controller's cache, which another watch fills,
    // and a deletion seen here first would otherwise find the Node still cached and keep its
    // MeshNode until something else changes it.
    let recheck = ctx.node_trigger.clone();
    let nodes = node_controller
        .watches(nodes_api, watch.clone(), move |node: Node| {
            let name = ObjectRef::new(&node.name_any());
            let (recheck, again) = (recheck.clone(), name.clone());
            tokio::spawn(async move {
                tokio::time::sleep(NODE_RECHECK).await;
                let _ = recheck.send(again);
            });
            Some(name)
        })
        .reconcile_on(UnboundedReceiverStream::new(node_triggers))
        .shutdown_on_signal()
        .run(node::reconcile, node::error_policy, ctx.clone())
        .for_each(|_| future::ready(()));
    let mirror = mirror_controller
        .shutdown_on_signal()
        .run(node::mirror, node::mirror_error_policy, ctx.clone())
        .for_each(|_| future::ready(()));

    let readiness = {
        let ctx = ctx.clone();
        let (restore_holds, hold_configmap) = (stored_holds.clone(), args.ip_hold_configmap.clone());
        async move {
            let synced = future::join4(
                ctx.mesh_nodes.wait_until_ready(),
                ctx.mesh_services.wait_until_ready(),
                ctx.pods.wait_until_ready(),
                ctx.nodes.wait_until_ready(),
            )
            .await;
            if matches!(synced, (Ok(()), Ok(()), Ok(()), Ok(()))) {
                restore_from_caches(&ctx, &restore_holds, &hold_configmap);
                ctx.synced.send_replace(true);
                metrics.ready.store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::info!("first full sync done: ready");
            }
            future::pending::<()>().await;
        }
    };
    let persist_holds = holds::persist(ctx.clone(), hold_store.clone(), stored_holds);
    // Only the leader runs this (`run` runs once leading): it deletes expired ephemeral members.
    let agent_leases = args.agent_lease_namespace.clone().unwrap_or_else(|| args.lease_namespace.clone());
    let collect_ephemeral = ephemeral::run(ctx.clone(), agent_leases);
    tokio::select! {
        () = collect_ephemeral => {},
        () = services => {},
        () = nodes => {},
        () = mirror => {},
        () = readiness => {},
        () = persist_holds => {},
    }
    // Stopping (SIGTERM): whatever hold the ConfigMap lacks, so the next controller has it.
    holds::flush(&ctx, &hold_store, &mut Vec::new()).await;
    tracing::info!("controllers stopped");
    Ok(())
}

/// The watch cache's own copy of `obj` (so the index shares it rather than copy it), or a copy
/// of `obj` when the cache holds another version (during a re-list, until it ends).
fn cached<K>(store: &reflector::Store<K>, obj: &K) -> Arc<K>
where
    K: kube::Resource<DynamicType = ()> + Clone,
{
    store
        .get(&ObjectRef::from_obj(obj))
        .filter(|c| c.resource_version() == obj.resource_version())
        .unwrap_or_else(|| Arc::new(obj.clone()))
}

/// Whether the first full sync is done. Before it, nothing needs waking: every service is
/// reconciled once its cache is listed.
fn after_first_sync(ctx: &Ctx) -> bool {
    *ctx.synced.borrow()
}

/// Asks the MeshService controller to look again at the services that name MeshNode `node` or
/// are hosted on it.
fn wake_services_on(ctx: &Ctx, node: &str) {
    let services = ctx.index().services_on(node);
    for (namespace, name) in services {
        ctx.trigger_service(&namespace, &name);
    }
}

/// Before any reconcile runs (each waits for `ctx.synced`, which the caller sends next): the
/// allocator and the hosting index from the caches' first list (no list of its own: at 2,000
/// nodes that was half the time to ready), then the hold-back of the controller before this
/// one (`stored_holds`, from the ConfigMap `configmap`).
fn restore_from_caches(ctx: &Ctx, stored_holds: &[holds::StoredHold], configmap: &str) {
    let started = std::time::Instant::now();
    let (nodes, services) = (ctx.mesh_nodes.state(), ctx.mesh_services.state());
    let hosting = restore_pool(&mut ctx.pool(), nodes.iter().map(Arc::as_ref), services.iter().map(Arc::as_ref));
    drop((nodes, services));
    let mut index = ctx.index();
    for (owner, hosted) in hosting {
        index.set_hosting(&owner, Some(hosted));
    }
    drop(index);
    let (used, capacity) = {
        let pool = ctx.pool();
        (pool.used(), pool.capacity())
    };
    tracing::info!(used, capacity, took = ?started.elapsed(), "allocator rebuilt from the watch caches");
    let restored = holds::from_stored(stored_holds, ctx.started_unix, holds::unix_now())
        .into_iter()
        .filter(|(ip, previous, until)| ctx.pool().restore_hold(*ip, previous.clone(), *until))
        .count();
    tracing::info!(restored, configmap, "IP hold-back restored");
}

/// The allocator as configured (`--subnet`, `--node-reserved-ips`, the hold-back), still empty:
/// [`restore_pool`] fills it from the watch caches' first full list.
fn new_pool(args: &Args) -> anyhow::Result<Pool> {
    let pool = Pool::new(args.subnet, args.ip_hold_seconds).context("the mesh subnet (--subnet)")?;
    let reserve = args.node_reserved_ips.unwrap_or_else(|| pool.default_node_reserve());
    let pool = pool.reserve_for_nodes(reserve).context("--node-reserved-ips")?;
    if let Some((first, last)) = pool.node_reserve() {
        tracing::info!(%first, %last, "mesh IPs reserved for MeshNodes");
    }
    Ok(pool)
}

/// Gives every MeshNode and MeshService its recorded mesh IP back in `pool`, and returns which
/// node hosts which service IP as their status recorded it. MeshNodes first, then services, each
/// oldest first: a recorded service IP (which anyone with a cluster-wide grant on
/// meshservices/status could have written) never takes a node's address from it; of two claims
/// of one address the older one keeps it.
fn restore_pool<'a>(
    pool: &mut Pool,
    nodes: impl IntoIterator<Item = &'a MeshNode>,
    services: impl IntoIterator<Item = &'a MeshService> + Clone,
) -> HashMap<Owner, Hosted> {
    let mut recorded: Vec<(bool, Option<k8s_openapi::jiff::Timestamp>, Owner, &str)> = Vec::new();
    for node in nodes {
        if let Some(ip) = node.status.as_ref().and_then(|s| s.mesh_ip.as_deref()) {
            recorded.push((false, node.creation_timestamp().map(|t| t.0), Owner::node(node.name_any()), ip));
        }
    }
    for service in services.clone() {
        if let Some(ip) = service.status.as_ref().and_then(|s| s.mesh_ip.as_deref()) {
            let owner = Owner::service(service.namespace().unwrap_or_default(), service.name_any());
            recorded.push((true, service.creation_timestamp().map(|t| t.0), owner, ip));
        }
    }
    recorded.sort();
    for (_, _, owner, ip) in recorded {
        let restored = mesh_core::parse_mesh_ip(ip)
            .map_err(|e| e.to_string())
            .and_then(|ip| pool.restore(owner.clone(), ip).map_err(|e| e.to_string()));
        if let Err(why) = restored {
            tracing::warn!(%owner, %ip, "not restoring a recorded mesh IP: {why}; it will be re-allocated");
        }
    }
    recorded_hosting(hosting_claims(services), pool)
}

/// Which node hosts which service IP, as the services' status recorded it (only addresses the
/// pool gave back to their owner). A restarted controller starts from it, so that a MeshNode
/// reconciled before its services keeps their IPs in its peer entry: with an empty index it
/// would write the entry without them, and every peer would drop their routes until the
/// services' own reconciles put them back.
fn recorded_hosting(claims: Vec<(Owner, Hosted)>, pool: &Pool) -> HashMap<Owner, Hosted> {
    claims.into_iter().filter(|(owner, hosted)| pool.address_of(owner) == Some(hosted.ip)).collect()
}

/// Which node each service's status says hosts it at which IP (before the pool is asked
/// whether the IP is really the service's).
fn hosting_claims<'a>(services: impl IntoIterator<Item = &'a MeshService>) -> Vec<(Owner, Hosted)> {
    services
        .into_iter()
        .filter(|s| s.metadata.deletion_timestamp.is_none() && s.spec.network.type_ != mesh_api::NetworkType::Host)
        .filter_map(|s| {
            let status = s.status.as_ref()?;
            let ip = mesh_core::parse_mesh_ip(status.mesh_ip.as_deref()?).ok()?;
            let node = status.node.clone()?;
            let owner = Owner::service(s.namespace().unwrap_or_default(), s.name_any());
            Some((owner, Hosted { node, ip }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use mesh_api::MeshServiceStatus;
    use serde_json::json;

    use super::*;

    fn service(name: &str, type_: &str, ip: &str, node: &str, deleting: bool) -> MeshService {
        let mut service: MeshService = serde_json::from_value(json!({
            "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshService",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"node": node, "network": {"type": type_, "ports": [80]}},
        }))
        .expect("a valid MeshService");
        service.status = Some(MeshServiceStatus {
            mesh_ip: Some(ip.into()),
            node: Some(node.into()),
            ..MeshServiceStatus::default()
        });
        if deleting {
            service.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
        }
        service
    }

    #[test]
    fn a_restart_starts_from_the_recorded_hosting_of_live_restored_services() {
        let mut pool = Pool::new("10.42.0.0/16".parse().expect("a subnet"), 300).expect("a pool");
        let services = [
            service("web", "mesh", "10.42.0.5", "n1", false),
            service("dual", "dual", "10.42.0.6", "n2", false),
            service("going", "mesh", "10.42.0.7", "n1", true),
            // Its recorded address went to another owner at restore: not hosted under it.
            service("dup", "mesh", "10.42.0.8", "n1", false),
        ];
        for s in &services[..3] {
            let ip = s.status.as_ref().and_then(|st| st.mesh_ip.as_deref()).expect("an ip").parse().expect("an ip");
            pool.restore(Owner::service("ns", s.name_any()), ip).expect("restored");
        }
        pool.restore(Owner::node("n9"), "10.42.0.8".parse().expect("an ip")).expect("restored");
        let hosting = recorded_hosting(hosting_claims(&services), &pool);
        let mut got: Vec<(String, String, String)> =
            hosting.iter().map(|(o, h)| (o.to_string(), h.node.clone(), h.ip.to_string())).collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("MeshService ns/dual".into(), "n2".into(), "10.42.0.6".into()),
                ("MeshService ns/web".into(), "n1".into(), "10.42.0.5".into())
            ]
        );
    }
}
