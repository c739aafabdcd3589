//! Running the real mesh-controller binary in tests and benchmarks: start it against the
//! cluster under test, read its /readyz and /metrics, kill it (SIGKILL), pause the lab's own
//! controller meanwhile, and remove the objects a test or benchmark made itself between runs
//! (or, for the controller's own lab tests only, every MeshNode and MeshService).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use futures::{StreamExt, stream};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use mesh_api::{MeshNode, MeshService};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Cluster, repo_root};

/// A running mesh-controller process, killed when dropped.
pub struct Controller {
    child: Child,
    port: u16,
}

impl Controller {
    /// Starts `binary` with the cluster's kubeconfig, its metrics on 127.0.0.1:`port`, and
    /// its output in a log file under the temp dir.
    pub fn start(cluster: &Cluster, binary: &Path, port: u16, args: &[&str]) -> Self {
        let log = std::fs::File::create(std::env::temp_dir().join(format!("mesh-controller-test-{port}.log")))
            .expect("creating the controller log in the temp dir");
        let child = Command::new(binary)
            .env("KUBECONFIG", &cluster.kubeconfig)
            .env("RUST_LOG", "info")
            .args(["--metrics-addr", &format!("127.0.0.1:{port}"), "--lease-namespace", "default"])
            .args(args)
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting mesh-controller");
        Self { child, port }
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether /readyz answers 200 (leader, and the first full sync done).
    pub async fn is_ready(&self) -> bool {
        is_ready_at(self.port).await
    }

    /// Waits until ready; panics after `within`.
    pub async fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.is_ready().await {
            assert!(Instant::now() < deadline, "controller on port {} not ready within {within:?}", self.port);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The controller's process id (to read its memory and CPU from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The text of /metrics (empty when it does not answer).
    pub async fn metrics_text(&self) -> String {
        http_get(self.port, "/metrics").await.unwrap_or_default()
    }

    /// Sum of a metric's samples (all label sets).
    pub async fn metric(&self, name: &str) -> f64 {
        metric_at(self.port, name).await.unwrap_or_default()
    }
}

/// `GET path` from a controller's metrics server on 127.0.0.1:`port`: the whole HTTP answer.
async fn http_get(port: u16, path: &str) -> Option<String> {
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await.ok()?;
    let mut body = String::new();
    conn.read_to_string(&mut body).await.ok()?;
    Some(body)
}

/// Whether the controller with its metrics on 127.0.0.1:`port` answers 200 on /readyz (leader,
/// and the first full sync done). The lab's controller uses port 18080.
pub async fn is_ready_at(port: u16) -> bool {
    http_get(port, "/readyz").await.is_some_and(|r| r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"))
}

/// Sum of a metric's samples (all label sets) on the controller with its metrics on
/// 127.0.0.1:`port`; `None` when it does not answer.
pub async fn metric_at(port: u16, name: &str) -> Option<f64> {
    let body = http_get(port, "/metrics").await?;
    Some(
        body.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            // An empty f64 sum is -0.0; a metric with no samples is plainly 0.
            .fold(0.0, |sum, value| sum + value),
    )
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The lab's own mesh-controller, stopped while a test or benchmark runs a controller of its
/// own (two writers of allocations would fight), and started again when this is dropped. The
/// objects in the cluster stay as they are.
pub struct LabControllerPaused {
    was_running: bool,
}

impl LabControllerPaused {
    /// Stops the lab's controller if it runs (`make demo` and `make lab-up` leave it running);
    /// on a cluster that is not the lab, does nothing.
    pub fn new() -> anyhow::Result<Self> {
        let pid_file = repo_root().join(".lab/pids/mesh-controller.pid");
        let running = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if running {
            crate::lab_sh(&["controller", "stop"])?;
        }
        Ok(Self { was_running: running })
    }
}

impl Drop for LabControllerPaused {
    fn drop(&mut self) {
        if self.was_running
            && let Err(err) = crate::lab_sh(&["controller", "start"])
        {
            eprintln!("starting the lab's mesh-controller again: {err:#}");
        }
    }
}

/// Deletes what a test or benchmark made itself, and nothing else: every MeshService in
/// `namespaces` (namespaces of its own) and every MeshNode whose name `own_node` accepts. Any
/// finalizer on them (an older controller's) is removed too, so they go in any case; waits (at most
/// `within`) until they are gone. Many objects are fine: `IN_FLIGHT` requests at a time.
pub async fn remove_own_objects(
    cluster: &Cluster,
    namespaces: &[String],
    own_node: impl Fn(&str) -> bool,
    within: Duration,
) -> anyhow::Result<()> {
    const IN_FLIGHT: usize = 32;
    let unfinalize = Patch::Merge(json!({"metadata": {"finalizers": null}}));
    for ns in namespaces {
        let api: Api<MeshService> = Api::namespaced(cluster.client.clone(), ns);
        if api.list(&ListParams::default()).await?.items.is_empty() {
            continue;
        }
        // One request marks them all deleted; removing each finalizer then deletes it.
        api.delete_collection(&DeleteParams::default(), &ListParams::default()).await?;
        let names: Vec<String> =
            api.list(&ListParams::default()).await?.items.into_iter().filter_map(|s| s.metadata.name).collect();
        stream::iter(names)
            .map(|name| {
                let (api, unfinalize) = (api.clone(), unfinalize.clone());
                async move {
                    let _ = api.patch(&name, &PatchParams::default(), &unfinalize).await;
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .collect::<Vec<()>>()
            .await;
    }
    let nodes: Api<MeshNode> = Api::all(cluster.client.clone());
    let own_nodes = || mesh_node_names(cluster, &own_node);
    stream::iter(own_nodes().await?)
        .map(|name| {
            let (api, unfinalize) = (nodes.clone(), unfinalize.clone());
            async move {
                let _ = api.delete(&name, &DeleteParams::default()).await;
                let _ = api.patch(&name, &PatchParams::default(), &unfinalize).await;
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<()>>()
        .await;
    let deadline = Instant::now() + within;
    loop {
        let mut left = own_nodes().await?.len();
        for ns in namespaces {
            left += Api::<MeshService>::namespaced(cluster.client.clone(), ns)
                .list(&ListParams::default())
                .await?
                .items
                .len();
        }
        if left == 0 {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{left} objects of our own still there after {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stops a controller that `make demo` left running in the lab, then removes every MeshService
/// and MeshNode (finalizers included) so that each test starts from an empty pool.
///
/// This deletes objects the caller did not make (the demo's, the lab's MeshNodes) and leaves the
/// lab's controller stopped: only for tests that must own the whole cluster. Benchmarks and
/// suites that share a running lab use [`LabControllerPaused`] and [`remove_own_objects`].
pub async fn clean_slate(cluster: &Cluster) -> anyhow::Result<()> {
    let pid_file = repo_root().join(".lab/pids/mesh-controller.pid");
    if let Ok(pid) = std::fs::read_to_string(&pid_file) {
        let _ = Command::new("kill").arg(pid.trim()).status();
        let _ = std::fs::remove_file(pid_file);
    }
    let services: Api<MeshService> = Api::all(cluster.client.clone());
    let nodes: Api<MeshNode> = Api::all(cluster.client.clone());
    let unfinalize = Patch::Merge(json!({"metadata": {"finalizers": null}}));
    for s in services.list(&ListParams::default()).await? {
        let api: Api<MeshService> =
            Api::namespaced(cluster.client.clone(), &s.metadata.namespace.clone().unwrap_or_default());
        let name = s.metadata.name.clone().unwrap_or_default();
        let _ = api.patch(&name, &PatchParams::default(), &unfinalize).await;
        let _ = api.delete(&name, &DeleteParams::default()).await;
    }
    for n in nodes.list(&ListParams::default()).await? {
        let name = n.metadata.name.clone().unwrap_or_default();
        let _ = nodes.patch(&name, &PatchParams::default(), &unfinalize).await;
        let _ = nodes.delete(&name, &DeleteParams::default()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(services.list(&ListParams::default()).await?.items.is_empty()
        && nodes.list(&ListParams::default()).await?.items.is_empty())
    {
        anyhow::ensure!(Instant::now() < deadline, "objects did not go away");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// The names of the cluster's MeshNodes that `wanted` accepts.
pub async fn mesh_node_names(cluster: &Cluster, wanted: impl Fn(&str) -> bool) -> anyhow::Result<Vec<String>> {
    let nodes: Api<MeshNode> = Api::all(cluster.client.clone());
    Ok(nodes
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .filter(|n| wanted(n))
        .collect())
}

/// Deletes the MeshService `name` in `api`'s namespace, if there is one, and waits (at most 30 s)
/// until it is gone, so that a test can create it afresh.
pub async fn delete_service_and_wait(api: &Api<MeshService>, name: &str) -> anyhow::Result<()> {
    let _ = api.delete(name, &DeleteParams::default()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.get_opt(name).await?.is_some() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "MeshService {name} was not deleted within 30 s (is mesh-controller running?)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A MeshService object named `name` with `spec`.
pub fn service(name: &str, spec: serde_json::Value) -> MeshService {
    serde_json::from_value(json!({
        "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshService",
        "metadata": {"name": name}, "spec": spec,
    }))
    .expect("valid MeshService")
}

/// Creates node-backed services named `{prefix}-{i}` for `i` in `range`, 16 requests in flight.
pub async fn create_services(
    api: &Api<MeshService>,
    prefix: &str,
    range: std::ops::Range<usize>,
) -> anyhow::Result<()> {
    let results: Vec<_> = stream::iter(range)
        .map(|i| {
            let api = api.clone();
            let obj = service(&format!("{prefix}-{i}"), json!({"network": {"ports": [80]}, "node": "nowhere"}));
            async move { api.create(&PostParams::default(), &obj).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(())
}

/// Waits until `expected` live (not deleting) services in `api` have a mesh IP; returns name → IP.
pub async fn wait_allocated(
    api: &Api<MeshService>,
    expected: usize,
    within: Duration,
) -> anyhow::Result<BTreeMap<String, Ipv4Addr>> {
    let deadline = Instant::now() + within;
    loop {
        let list = api.list(&ListParams::default()).await?;
        let ips: BTreeMap<String, Ipv4Addr> = list
            .iter()
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .filter_map(|s| Some((s.metadata.name.clone()?, s.status.as_ref()?.mesh_ip.as_ref()?.parse().ok()?)))
            .collect();
        if ips.len() >= expected {
            return Ok(ips);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {expected} services allocated within {within:?}",
            ips.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
