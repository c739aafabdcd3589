//! The agent's Prometheus metrics and its `/metrics` and `/healthz` endpoints.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

/// Labels naming a peer by its MeshNode.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    /// The peer's MeshNode name.
    pub peer: String,
}

/// Labels naming a step of a sync.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabel {
    /// `plan` (the directory brought up to date and the pure plan), `device`, `link`,
    /// `firewall`, `dns`, `names` (the node's resolver) or `status`.
    pub step: &'static str,
}

/// Labels naming what kind of change an apply made.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabel {
    /// `add`, `remove` or `update`.
    pub change: &'static str,
}

/// The agent's metrics.
pub struct Metrics {
    /// Seconds since the last handshake with each peer (absent: never).
    pub handshake_age: Family<PeerLabel, Gauge<f64, AtomicU64>>,
    /// Bytes received from each peer.
    pub rx_bytes: Family<PeerLabel, Gauge<u64, AtomicU64>>,
    /// Bytes sent to each peer.
    pub tx_bytes: Family<PeerLabel, Gauge<u64, AtomicU64>>,
    /// Round-trip time of the last answered probe through the tunnel.
    pub probe_rtt: Family<PeerLabel, Gauge<f64, AtomicU64>>,
    /// Fraction of the last probes that were lost.
    pub probe_loss: Family<PeerLabel, Gauge<f64, AtomicU64>>,
    /// 1 if the peer is healthy, else 0.
    pub peer_healthy: Family<PeerLabel, Gauge>,
    /// Peers configured on the device.
    pub peers: Gauge,
    /// Peer changes applied to the device, by kind.
    pub peer_changes: Family<ChangeLabel, Counter>,
    /// Syncs that found nothing to change on the device.
    pub noop_syncs: Counter,
    /// Syncs that failed.
    pub sync_errors: Counter,
    /// Writes to the Kubernetes API (status, lease).
    pub api_writes: Counter,
    /// Writes of the MeshNode status (part of `api_writes`).
    pub status_writes: Counter,
    /// Renewals of the liveness Lease (part of `api_writes`; every 10 s, whatever changes).
    pub lease_writes: Counter,
    /// Status writes that failed (the data plane was programmed all the same).
    pub status_write_errors: Counter,
    /// Seconds per sync: snapshot, plan and execution (data plane and status).
    pub sync_seconds: Histogram,
    /// CPU seconds per sync, its own (see `cputime`): not the probes, the watches or the DNS
    /// server running meanwhile, nor wireguard-go's work.
    pub sync_cpu_seconds: Histogram,
    /// Seconds per plan: the directory brought up to date and the pure plan alone.
    pub plan_seconds: Histogram,
    /// Seconds per step of a sync: where a slow sync spends its time.
    pub sync_step_seconds: Family<StepLabel, Histogram>,
    /// CPU seconds per step of a sync, its own (as `sync_cpu_seconds`).
    pub sync_step_cpu_seconds: Family<StepLabel, Histogram>,
    /// Generation of the directory (MeshNode and MeshService resource versions) last applied;
    /// lets tests and benchmarks see when a change reached the device.
    pub applied_services: Gauge,
    /// Allowed IPs in peer entries that are not applied (not a /32 in the mesh subnet).
    pub dropped_allowed_ips: Gauge,
    /// Services placed on this node that it does not host (address out of bounds).
    pub refused_services: Gauge,
}

/// Buckets of the sync and plan histograms: 100 µs to about 3 s.
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            handshake_age: Family::default(),
            rx_bytes: Family::default(),
            tx_bytes: Family::default(),
            probe_rtt: Family::default(),
            probe_loss: Family::default(),
            peer_healthy: Family::default(),
            peers: Gauge::default(),
            peer_changes: Family::default(),
            noop_syncs: Counter::default(),
            sync_errors: Counter::default(),
            api_writes: Counter::default(),
            status_writes: Counter::default(),
            lease_writes: Counter::default(),
            status_write_errors: Counter::default(),
            sync_seconds: seconds(),
            sync_cpu_seconds: seconds(),
            plan_seconds: seconds(),
            sync_step_seconds: Family::new_with_constructor(seconds),
            sync_step_cpu_seconds: Family::new_with_constructor(seconds),
            applied_services: Gauge::default(),
            dropped_allowed_ips: Gauge::default(),
            refused_services: Gauge::default(),
        }
    }
}

impl Metrics {
    /// Forgets a peer that left the mesh, so its series disappear from /metrics.
    pub fn forget(&self, peer: &str) {
        let label = PeerLabel { peer: peer.to_owned() };
        self.handshake_age.remove(&label);
        self.rx_bytes.remove(&label);
        self.tx_bytes.remove(&label);
        self.probe_rtt.remove(&label);
        self.probe_loss.remove(&label);
        self.peer_healthy.remove(&label);
    }

    fn registry(self: &Arc<Self>) -> Registry {
        let mut r = Registry::with_prefix("mesh_agent");
        r.register(
            "peer_handshake_age_seconds",
            "Seconds since the last WireGuard handshake with the peer",
            self.handshake_age.clone(),
        );
        r.register("peer_rx_bytes", "Bytes received from the peer", self.rx_bytes.clone());
        r.register("peer_tx_bytes", "Bytes sent to the peer", self.tx_bytes.clone());
        r.register(
            "peer_probe_rtt_seconds",
            "Round-trip time of the last answered probe through the tunnel",
            self.probe_rtt.clone(),
        );
        r.register("peer_probe_loss_ratio", "Fraction of the last 10 probes that were lost", self.probe_loss.clone());
        r.register("peer_healthy", "1 if one of the last 3 probes to the peer was answered", self.peer_healthy.clone());
        r.register("peers", "Peers configured on the WireGuard device", self.peers.clone());
        r.register("peer_changes", "Peer changes applied to the device, by kind", self.peer_changes.clone());
        r.register("noop_syncs", "Syncs that found the device already as wanted", self.noop_syncs.clone());
        r.register("sync_errors", "Syncs that failed", self.sync_errors.clone());
        r.register("api_writes", "Writes to the Kubernetes API (status, lease)", self.api_writes.clone());
        r.register("status_writes", "Writes of the MeshNode status", self.status_writes.clone());
        r.register("lease_writes", "Renewals of the liveness Lease (every 10 s)", self.lease_writes.clone());
        r.register(
            "status_write_errors",
            "MeshNode status writes that failed (the data plane was programmed all the same)",
            self.status_write_errors.clone(),
        );
        r.register("sync_seconds", "Seconds per sync: snapshot, plan and execution", self.sync_seconds.clone());
        r.register(
            "sync_cpu_seconds",
            "CPU seconds per sync, its own: not the probes, watches or DNS server running meanwhile, nor wireguard-go",
            self.sync_cpu_seconds.clone(),
        );
        r.register(
            "plan_seconds",
            "Seconds per plan: the directory brought up to date and the pure plan",
            self.plan_seconds.clone(),
        );
        r.register(
            "sync_step_seconds",
            "Seconds per step of a sync: plan, device (diff, read back on a resync, apply), link, firewall, dns, status, record (logs, metrics, probe targets), names (the node's resolver)",
            self.sync_step_seconds.clone(),
        );
        r.register(
            "sync_step_cpu_seconds",
            "CPU seconds per step of a sync, its own (as sync_cpu_seconds), by the steps of sync_step_seconds",
            self.sync_step_cpu_seconds.clone(),
        );
        r.register("hosted_services", "Service IPs hosted on this node", self.applied_services.clone());
        r.register(
            "dropped_allowed_ips",
            "Allowed IPs of peer entries not applied: not a single /32 inside the mesh subnet",
            self.dropped_allowed_ips.clone(),
        );
        r.register(
            "refused_services",
            "Services placed on this node not hosted: mesh IP or pod IP out of bounds (subnet, node addresses, pod CIDRs)",
            self.refused_services.clone(),
        );
        r
    }
}

/// Whether the agent is healthy, and if not why: set by the sync loop.
pub type Health = watch::Receiver<Result<(), String>>;

struct Served {
    registry: Registry,
    health: Health,
}

/// Serves `/metrics` and `/healthz` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>, health: Health) -> anyhow::Result<()> {
    let state = Arc::new(Served { registry: metrics.registry(), health });
    let app = Router::new().route("/metrics", get(render)).route("/healthz", get(healthz)).with_state(state);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the metrics address {addr}: {e} (set --metrics-addr)"))?;
    axum::serve(listener, app).await?;
    Ok(())
}

async fn render(State(state): State<Arc<Served>>) -> (StatusCode, String) {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
        Ok(()) => (StatusCode::OK, text),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `ok`, or a fixed text: the reason (an API or netlink error, which may name addresses, keys'
/// owners or paths) goes to the agent's log only, never to whoever can reach the port.
async fn healthz(State(state): State<Arc<Served>>) -> (StatusCode, &'static str) {
    match &*state.health.borrow() {
        Ok(()) => (StatusCode::OK, "ok"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, NOT_READY),
    }
}

/// The body of /healthz while the agent is not ready.
pub const NOT_READY: &str = "not ready: the last sync failed or has not finished; the agent's log says why";

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn healthz_never_tells_why() {
        let why = "listing MeshNodes: 403 system:serviceaccount:harness-mesh:harness-mesh-agent at 10.0.0.1:6443";
        let (tx, health) = watch::channel(Err(why.to_owned()));
        let state = Arc::new(Served { registry: Arc::new(Metrics::default()).registry(), health });
        let (code, body) = healthz(State(state.clone())).await;
        assert_eq!((code, body), (StatusCode::SERVICE_UNAVAILABLE, NOT_READY));
        tx.send(Ok(())).unwrap();
        assert_eq!(healthz(State(state)).await, (StatusCode::OK, "ok"));
    }
}
