//! Prometheus metrics and the `/metrics`, `/healthz` and `/readyz` endpoints.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label set naming the kind a metric is about (`MeshService`, `MeshNode`, `Node`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The kind.
    pub kind: &'static str,
}

/// The controller's metrics.
#[derive(Default)]
pub struct Metrics {
    /// Reconciles run, by kind.
    pub reconciles: Family<KindLabel, Counter>,
    /// Reconciles that failed, by kind.
    pub reconcile_errors: Family<KindLabel, Counter>,
    /// Writes the controller made to the API (status patches, finalizers, mirrors), by kind.
    pub api_writes: Family<KindLabel, Counter>,
    /// Mesh IPs handed out.
    pub allocations: Counter,
    /// Mesh IPs in use.
    pub pool_used: Gauge,
    /// Mesh IPs the pool can hand out.
    pub pool_capacity: Gauge,
    /// Ephemeral MeshNodes (`meshctl connect`) deleted because their Lease lapsed (ephemeral.rs).
    pub ephemeral_collected: Counter,
    /// Set once the allocator is rebuilt and the first full sync is done.
    pub ready: AtomicBool,
}

impl Metrics {
    fn registry(self: &Arc<Self>) -> Registry {
        let mut registry = Registry::with_prefix("mesh_controller");
        registry.register("reconciles", "Reconciles run, by kind", self.reconciles.clone());
        registry.register("reconcile_errors", "Reconciles that failed, by kind", self.reconcile_errors.clone());
        registry.register("api_writes", "Writes made to the Kubernetes API, by kind", self.api_writes.clone());
        registry.register("allocations", "Mesh IPs handed out", self.allocations.clone());
        registry.register("pool_used", "Mesh IPs in use", self.pool_used.clone());
        registry.register("pool_capacity", "Mesh IPs the subnet can hand out", self.pool_capacity.clone());
        registry.register(
            "ephemeral_collected",
            "Ephemeral MeshNodes (meshctl connect) deleted because their Lease lapsed",
            self.ephemeral_collected.clone(),
        );
        registry
    }

    /// Counts one API write about `kind`.
    pub fn wrote(&self, kind: &'static str) {
        self.api_writes.get_or_create(&KindLabel { kind }).inc();
    }
}

struct Served {
    metrics: Arc<Metrics>,
    registry: Registry,
}

/// Serves the endpoints on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let state = Arc::new(Served { registry: metrics.registry(), metrics });
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(state);
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

async fn ready(State(state): State<Arc<Served>>) -> (StatusCode, &'static str) {
    if state.metrics.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: waiting for leadership or the first full sync")
    }
}
