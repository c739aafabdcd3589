//! `make bench` at simulated scale: hundreds of nodes and thousands of services on the lab's
//! real kube-apiserver, with the real mesh-controller (this workspace's release build) and
//! simulated agents (`mesh-sim`: the agent's own directory watch, status writes and
//! desired-state code, with a WireGuard backend that records plans).
//!
//! 1. The lab's agents and controller are stopped (its objects, and any others the bench did not
//!    make, stay); `NODES` MeshNodes `sim-*` and `SERVICES` MeshServices (placed on them, in 10
//!    namespaces `bench-scale-*` of the bench's own) are created and allocated by the controller.
//! 2. The simulated fleet starts (one agent per MeshNode, in this process, sharing a few
//!    directory watches) and converges: every node has every other node as a peer.
//! 3. Convergence: a MeshService is created `TRIES` times; each time, the time from the create
//!    until every simulated agent has applied it (its DNS zone answers the name, and its device
//!    routes the IP to the host, or the host hosts it).
//! 4. API cost of one service change (a create, then an update of its ports): the API server's
//!    own write and watch-event counters, before and after, once the writes have settled.
//! 5. Controller memory (VmRSS) at that scale, and its full resync: the controller is killed
//!    and started afresh; the time until it is ready (caches listed) and until it has
//!    reconciled as many MeshNodes and MeshServices as exist, and what it wrote meanwhile.
//!
//! 6. One real agent at that scale: the lab's `hm-node-1` keeps its mesh-agent running through
//!    the bench as a release build (`HM_AGENT_BIN`, built by `make bench`), so it sees every
//!    bench object and programs a real wireguard-go device with every peer. Its idle CPU and RSS
//!    are taken first on the plain lab, then its RSS and the time of its syncs at scale.
//!
//! At most `HM_BENCH_AGENTS` (500) MeshNodes get a simulated agent: beyond that the devices of
//! N agents with N peers each would not fit in one process (5,000 × 5,000 peers). The other
//! MeshNodes get what their agent would publish (a real public key, an endpoint on loopback)
//! from the bench itself, once, so the controller and the simulated agents see a mesh of the
//! full size.
//!
//! Afterwards the bench's objects are removed and the lab is brought back (its controller and
//! agents).
//! The table goes to stdout and the figures to target/bench/scale.json (or `HM_BENCH_OUT`).
//! Sizes can be changed with HM_BENCH_NODES, HM_BENCH_SERVICES, HM_BENCH_AGENTS, HM_BENCH_TRIES
//! and HM_BENCH_DIRECTORIES; `make bench-scale` runs three sizes up to 5,000 nodes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use harness_mesh_e2e::controller::{Controller, LabControllerPaused, remove_own_objects, service};
use harness_mesh_e2e::measure::{self, ApiCounters, percentile};
use harness_mesh_e2e::{Cluster, repo_root, start_lab_with_nodes};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use mesh_api::{MeshNode, MeshService};
use mesh_sim::{Fleet, Target};
use serde_json::{Value, json};

const NAMESPACES: usize = 10;
const PORT: u16 = 18193;
const IN_FLIGHT: usize = 32;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn node_name(i: usize) -> String {
    format!("sim-{i:04}")
}

fn namespace(i: usize) -> String {
    format!("bench-scale-{}", i % NAMESPACES)
}

/// Whether a MeshNode is one of the bench's simulated ones.
fn is_sim_node(name: &str) -> bool {
    name.starts_with("sim-")
}

/// Whether a MeshService is one of the bench's.
fn is_bench_service(s: &MeshService) -> bool {
    s.metadata.namespace.as_deref().is_some_and(|ns| ns.starts_with("bench-scale-"))
}

/// The node count of the running lab (from .lab/config), 0 if none.
fn lab_nodes() -> usize {
    std::fs::read_to_string(repo_root().join(".lab/config"))
        .ok()
        .and_then(|c| c.lines().find_map(|l| l.strip_prefix("NODES=")?.trim().parse().ok()))
        .unwrap_or(0)
}

fn lab_agent(action: &str, node: &str) -> anyhow::Result<()> {
    lab_agent_with(action, node, None)
}

/// `lab.sh agent ACTION NODE`, running `binary` (`HM_AGENT_BIN`) instead of the debug build.
fn lab_agent_with(action: &str, node: &str, binary: Option<&Path>) -> anyhow::Result<()> {
    let mut command = Command::new(repo_root().join("e2e/lab/lab.sh"));
    command.args(["agent", action, node]);
    if let Some(binary) = binary {
        command.env("HM_AGENT_BIN", binary);
    }
    let out = command.output()?;
    anyhow::ensure!(out.status.success(), "lab.sh agent {action} {node}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// The lab agent the bench keeps running, as a release build: what one real agent costs.
struct RealAgent {
    node: String,
}

impl RealAgent {
    /// Restarts `node`'s agent from the release build, which `make bench` builds.
    fn start(node: &str) -> anyhow::Result<Self> {
        let binary: PathBuf = repo_root().join("target/release/mesh-agent");
        anyhow::ensure!(binary.exists(), "{} is not built: run cargo build --release -p mesh-agent", binary.display());
        lab_agent_with("restart", node, Some(&binary))?;
        Ok(Self { node: node.to_owned() })
    }

    fn pid(&self) -> anyhow::Result<u32> {
        let path = repo_root().join(format!(".lab/pids/mesh-agent-{}.pid", self.node));
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        Ok(text.trim().parse()?)
    }

    /// Its Prometheus text (the agent serves it on 127.0.0.1:9464 inside the node).
    fn metrics(&self) -> anyhow::Result<String> {
        let out = Command::new(repo_root().join("e2e/lab/lab.sh"))
            .args(["exec", &self.node, "busybox", "wget", "-qO-", "http://127.0.0.1:9464/metrics"])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "reading {}'s agent metrics: {}",
            self.node,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The sum and count of one of its histograms (`mesh_agent_<name>_sum` / `_count`).
    fn histogram(&self, name: &str) -> anyhow::Result<(f64, f64)> {
        let text = self.metrics()?;
        let value = |suffix: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("mesh_agent_{name}_{suffix} "))?.trim().parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        Ok((value("sum"), value("count")))
    }

    /// (sum, count) of each step of `mesh_agent_<histogram>` (`sync_step_seconds`,
    /// `sync_step_cpu_seconds`), by step.
    fn steps(&self, histogram: &str) -> anyhow::Result<BTreeMap<String, (f64, f64)>> {
        let text = self.metrics()?;
        let prefix = format!("mesh_agent_{histogram}_");
        let mut steps: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(&prefix) else { continue };
            let Some((suffix, rest)) = rest.split_once("{step=\"") else { continue };
            let Some((step, value)) = rest.split_once("\"} ") else { continue };
            let Ok(value) = value.trim().parse::<f64>() else { continue };
            let entry = steps.entry(step.to_owned()).or_insert((0.0, 0.0));
            match suffix {
                "sum" => entry.0 = value,
                "count" => entry.1 = value,
                _ => {}
            }
        }
        Ok(steps)
    }
}

impl Drop for RealAgent {
    fn drop(&mut self) {
        // Back to the lab's own (debug) build.
        if let Err(err) = lab_agent("restart", &self.node) {
            eprintln!("restarting {}'s agent from the debug build: {err:#}", self.node);
        }
    }
}

/// Mean milliseconds per observation between two (sum, count) readings of a histogram.
fn mean_ms(before: (f64, f64), after: (f64, f64)) -> f64 {
    (after.0 - before.0) * 1000.0 / (after.1 - before.1).max(1.0)
}

/// Watch events of `resource` per open watch of it (how many events each watcher received).
fn per_watcher(c: &ApiCounters, resource: &str) -> f64 {
    let events: f64 = c.watch_events.iter().filter(|(k, _)| k.contains(resource)).map(|(_, v)| v).sum();
    let watchers: f64 = c.watchers.iter().filter(|(k, _)| k.contains(resource)).map(|(_, v)| v).sum();
    events / watchers.max(1.0)
}

/// Publishes for MeshNode `name` what its agent would: a fresh public key, an endpoint on
/// loopback (nothing is ever sent there), the port and the backend; under the agent's field
/// manager, as the agent does.
async fn publish_as_agent(api: &Api<MeshNode>, name: &str, i: usize) -> anyhow::Result<()> {
    let key = mesh_wireguard::PrivateKey::generate()?.public_key().to_base64();
    let endpoint = format!("127.78.{}.{}:51820", (i >> 8) & 0xff, i & 0xff);
    let patch = json!({
        "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode",
        "status": {"publicKey": key, "endpoint": endpoint, "listenPort": 51820, "backend": "userspace"},
    });
    api.patch_status(name, &PatchParams::apply("mesh-agent").force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

/// Runs `count` requests made by `request`, `IN_FLIGHT` at a time; fails on the first error.
async fn concurrently<F, Fut>(count: usize, request: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    stream::iter(0..count).map(request).buffer_unordered(IN_FLIGHT).try_collect::<()>().await
}

/// Waits until `expected` objects listed by `count` have a mesh IP.
async fn wait_for<F, Fut>(what: &str, expected: usize, within: Duration, count: F) -> anyhow::Result<f64>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<usize>>,
{
    let started = Instant::now();
    loop {
        // A list that fails under the load of the setup (a dropped connection) is asked again.
        let n = match count().await {
            Ok(n) => n,
            Err(err) if started.elapsed() < within => {
                println!("  counting {what}: {err:#}; asking again");
                0
            }
            Err(err) => return Err(err),
        };
        if n >= expected {
            return Ok(started.elapsed().as_secs_f64());
        }
        anyhow::ensure!(started.elapsed() < within, "only {n} of {expected} {what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The objects of `api` that `keep` counts, listed in pages of 1,000: one list of 50,000
/// MeshServices is tens of megabytes the API server must send in one response under the bench's
/// load.
async fn count_paged<K>(api: &Api<K>, keep: impl Fn(&K) -> bool) -> anyhow::Result<usize>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut params = ListParams::default().limit(1_000);
    let mut count = 0;
    loop {
        let page = api.list(&params).await?;
        count += page.items.iter().filter(|o| keep(o)).count();
        match page.metadata.continue_.filter(|token| !token.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(count),
        }
    }
}

/// The bench's MeshNodes with a mesh IP (others in the cluster are not counted).
async fn allocated_nodes(api: &Api<MeshNode>) -> anyhow::Result<usize> {
    count_paged(api, |n: &MeshNode| {
        n.metadata.name.as_deref().is_some_and(is_sim_node) && n.status.as_ref().is_some_and(|s| s.mesh_ip.is_some())
    })
    .await
}

/// The bench's MeshServices with a mesh IP (others in the cluster are not counted).
async fn allocated_services(api: &Api<MeshService>) -> anyhow::Result<usize> {
    count_paged(api, |s: &MeshService| is_bench_service(s) && s.status.as_ref().is_some_and(|s| s.mesh_ip.is_some()))
        .await
}

/// Removes the bench's MeshServices (its namespaces) and MeshNodes (`sim-*`), thousands of them,
/// finalizers included, and waits until none is left. Nothing else in the cluster is touched.
async fn wipe(cluster: &Cluster) -> anyhow::Result<()> {
    let namespaces: Vec<String> = (0..NAMESPACES).map(namespace).collect();
    remove_own_objects(cluster, &namespaces, is_sim_node, Duration::from_secs(300)).await
}

/// One service change's cost: API writes and watch events from `before` until the writes settle.
async fn cost(cluster: &Cluster, before: &ApiCounters) -> anyhow::Result<ApiCounters> {
    let (after, quiet) = measure::settle(cluster, Duration::from_secs(2), Duration::from_secs(60)).await?;
    anyhow::ensure!(quiet, "the API server kept seeing writes for 60 s after one service change");
    Ok(after.since(before))
}

fn cost_json(c: &ApiCounters) -> Value {
    json!({
        "writes_without_leases": c.writes_without_leases(),
        "writes": c.writes,
        "mesh_watch_events": c.mesh_watch_events(),
        "watch_events": c.watch_events,
        "watchers": c.watchers,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let nodes = env_or("HM_BENCH_NODES", 500);
    let services = env_or("HM_BENCH_SERVICES", 5000);
    let tries = env_or("HM_BENCH_TRIES", 5);
    let directories = env_or("HM_BENCH_DIRECTORIES", 4).max(1);
    let agents = env_or("HM_BENCH_AGENTS", 500).clamp(1, nodes);
    let out_file = std::env::var("HM_BENCH_OUT").unwrap_or_else(|_| "scale.json".to_owned());
    let bench_started = Instant::now();
    // Waits grow with the size (setup at 50,000 services takes minutes on 2 cores).
    let setup_limit = Duration::from_secs(300 + services as u64 / 40);

    let cluster = Cluster::get().await?;
    let lab = lab_nodes();
    anyhow::ensure!(lab >= 1, "the scale bench needs the lab up with at least one node (make lab-up)");
    // hm-node-1 runs the release agent throughout; the others are stopped.
    let real = RealAgent::start("hm-node-1")?;
    for i in 2..=lab {
        lab_agent("stop", &format!("hm-node-{i}"))?;
    }
    let lab_controller = LabControllerPaused::new()?;
    wipe(&cluster).await?;
    // The real agent idle on the plain lab (after the wipe: no bench object left): settle, then 30 s of CPU time.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let idle_cpu_before = measure::cpu_time(real.pid()?)?;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let idle_cpu_percent = (measure::cpu_time(real.pid()?)? - idle_cpu_before).as_secs_f64() / 30.0 * 100.0;
    let idle_memory = measure::memory(real.pid()?)?;
    println!(
        "release agent idle on the lab: {idle_cpu_percent:.2} % CPU, {:.1} MiB RSS",
        idle_memory.rss_kib as f64 / 1024.0
    );
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    for i in 0..NAMESPACES {
        let ns = namespace(i);
        let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        namespaces.patch(&ns, &PatchParams::apply("harness-mesh-bench"), &Patch::Apply(&body)).await?;
    }
    let binary = Path::new(env!("CARGO_BIN_EXE_mesh-controller"));
    let ctl = Controller::start(&cluster, binary, PORT, &["--leader-elect=false"]);
    ctl.wait_ready(Duration::from_secs(30)).await;

    // 1. The objects.
    let node_api: Api<MeshNode> = Api::all(cluster.client.clone());
    let all_services: Api<MeshService> = Api::all(cluster.client.clone());
    let setup = Instant::now();
    concurrently(nodes, |i| {
        let api = node_api.clone();
        async move {
            let node: MeshNode = serde_json::from_value(json!({
                "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode",
                // Open to the bench's namespaces (spec.node placements need the node's consent).
                "metadata": {"name": node_name(i)}, "spec": {"serviceNamespaces": (0..NAMESPACES).map(namespace).collect::<Vec<_>>()},
            }))?;
            api.create(&PostParams::default(), &node).await?;
            Ok(())
        }
    })
    .await?;
    concurrently(services, |i| {
        let api: Api<MeshService> = Api::namespaced(cluster.client.clone(), &namespace(i));
        async move {
            let spec = json!({"node": node_name(i % nodes), "network": {"type": "mesh", "ports": [80]}});
            api.create(&PostParams::default(), &service(&format!("svc-{i}"), spec)).await?;
            Ok(())
        }
    })
    .await?;
    // The nodes without a simulated agent publish once, from here.
    concurrently(nodes - agents, |j| {
        let api = node_api.clone();
        async move { publish_as_agent(&api, &node_name(agents + j), agents + j).await }
    })
    .await?;
    wait_for("MeshNodes allocated", nodes, setup_limit, || allocated_nodes(&node_api)).await?;
    wait_for("MeshServices allocated", services, setup_limit, || allocated_services(&all_services)).await?;
    let setup_seconds = setup.elapsed().as_secs_f64();
    println!("created and allocated {nodes} MeshNodes and {services} MeshServices in {setup_seconds:.1} s");

    // 2. The fleet.
    let config = mesh_sim::Config {
        nodes: (0..agents).map(node_name).collect(),
        directories,
        debounce: Duration::from_millis(50),
        resync: Duration::from_secs(30),
        lease_namespace: Some("default".to_owned()),
    };
    let fleet = Fleet::start(cluster.client.clone(), config).await?;
    let fleet_converged = loop {
        let totals = fleet.totals();
        if totals.min_peers as usize + 1 >= nodes && totals.hosted as usize >= services * agents / nodes {
            break fleet.started.elapsed().as_secs_f64();
        }
        anyhow::ensure!(
            fleet.started.elapsed() < setup_limit,
            "the simulated fleet did not converge in {setup_limit:?}: {totals:?}"
        );
        if fleet.started.elapsed().as_secs() % 10 == 0 {
            println!("  fleet: {totals:?}");
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    };
    let (_, quiet) = measure::settle(&cluster, Duration::from_secs(3), Duration::from_secs(180)).await?;
    anyhow::ensure!(quiet, "the fleet kept writing for 180 s after converging");
    let steady = measure::memory(ctl.pid())?;
    println!("simulated fleet converged in {fleet_converged:.1} s");

    // 3. Convergence.
    let bench_api: Api<MeshService> = Api::namespaced(cluster.client.clone(), &namespace(0));
    let (mut all_agents, mut per_agent) = (Vec::new(), Vec::new());
    let (mut all_routed, mut per_agent_routed) = (Vec::new(), Vec::new());
    let sync_before = fleet.totals();
    let cpu_before = measure::cpu_time(std::process::id())?;
    let (real_sync_before, real_plan_before) = (real.histogram("sync_seconds")?, real.histogram("plan_seconds")?);
    let real_sync_cpu_before = real.histogram("sync_cpu_seconds")?;
    let real_steps_before = real.steps("sync_step_seconds")?;
    let real_step_cpu_before = real.steps("sync_step_cpu_seconds")?;
    let real_cpu_before = measure::cpu_time(real.pid()?)?;
    let tries_started = Instant::now();
    for k in 0..tries {
        let (name, host) = (format!("converge-{k}"), node_name((k * 37) % agents));
        fleet.track(Target {
            id: k as u64 + 1,
            fqdn: format!("{name}.{}.mesh.local", namespace(0)),
            host: host.clone(),
        });
        let spec = json!({"node": host, "network": {"type": "mesh", "ports": [80]}});
        let started = tokio::time::Instant::now();
        bench_api.create(&PostParams::default(), &service(&name, spec)).await?;
        let applied = fleet.wait_applied(Duration::from_secs(120)).await?;
        let times: Vec<f64> = applied.iter().map(|at| (*at - started).as_secs_f64()).collect();
        all_agents.push(times.iter().copied().fold(0.0, f64::max));
        per_agent.extend(times);
        let routed: Vec<f64> = fleet.routed().iter().map(|at| (*at - started).as_secs_f64()).collect();
        anyhow::ensure!(routed.len() == fleet.len(), "{name}: only {} agents reported a route", routed.len());
        all_routed.push(routed.iter().copied().fold(0.0, f64::max));
        per_agent_routed.extend(routed);
        println!("  try {k}: routed by all in {:.2} s, applied by all in {:.2} s", all_routed[k], all_agents[k]);
        measure::settle(&cluster, Duration::from_secs(1), Duration::from_secs(60)).await?;
    }
    let sync_after = fleet.totals();
    let (real_sync_after, real_plan_after) = (real.histogram("sync_seconds")?, real.histogram("plan_seconds")?);
    let real_cpu_ms = (measure::cpu_time(real.pid()?)? - real_cpu_before).as_secs_f64() * 1000.0;
    // The agent process's CPU over the tries, as a share of one core: its syncs, and what runs
    // whatever changes (a probe of every peer every 2 s, the watches, the Lease).
    let real_cpu_percent = real_cpu_ms / 10.0 / tries_started.elapsed().as_secs_f64();
    let real_syncs = real_sync_after.1 - real_sync_before.1;
    let real_sync_ms = mean_ms(real_sync_before, real_sync_after);
    let real_sync_cpu_ms = mean_ms(real_sync_cpu_before, real.histogram("sync_cpu_seconds")?);
    let real_plan_ms = mean_ms(real_plan_before, real_plan_after);
    // Where a sync's time and CPU go: the mean of each step over the syncs of the tries.
    let step_means = |after: BTreeMap<String, (f64, f64)>, before: &BTreeMap<String, (f64, f64)>| {
        let mut means: BTreeMap<String, f64> = after
            .into_iter()
            .map(|(step, after)| {
                let before = before.get(&step).copied().unwrap_or((0.0, 0.0));
                (step, mean_ms(before, after))
            })
            .collect();
        let rest: f64 = ["link", "firewall", "status"].iter().filter_map(|step| means.get(*step)).sum();
        means.insert("rest".to_owned(), rest);
        means
    };
    let real_steps_ms = step_means(real.steps("sync_step_seconds")?, &real_steps_before);
    let real_step_cpu_ms = step_means(real.steps("sync_step_cpu_seconds")?, &real_step_cpu_before);
    let steps_text = real_steps_ms
        .iter()
        .map(|(step, ms)| {
            format!("{step} {ms:.1} ({:.1} CPU)", real_step_cpu_ms.get(step).copied().unwrap_or(f64::NAN))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let real_memory = measure::memory(real.pid()?)?;
    println!(
        "release agent on hm-node-1 at scale: {:.1} MiB RSS, {real_syncs} syncs of {real_sync_ms:.1} ms (plan {real_plan_ms:.1} ms), \
         {real_sync_cpu_ms:.1} ms CPU each (its own); the process {:.1} ms CPU per sync, {real_cpu_percent:.1} % of a core",
        real_memory.rss_kib as f64 / 1024.0,
        real_cpu_ms / real_syncs.max(1.0)
    );
    let cpu_per_sync_ms = (measure::cpu_time(std::process::id())? - cpu_before).as_secs_f64() * 1000.0
        / (sync_after.syncs - sync_before.syncs).max(1) as f64;
    let mean_sync_ms = (sync_after.sync_micros - sync_before.sync_micros) as f64
        / (sync_after.syncs - sync_before.syncs).max(1) as f64
        / 1000.0;
    let mean_snapshot_ms = (sync_after.snapshot_micros - sync_before.snapshot_micros) as f64
        / (sync_after.snapshots - sync_before.snapshots).max(1) as f64
        / 1000.0;

    // 4. API cost of one change.
    let before = ApiCounters::read(&cluster)?;
    fleet.track(Target { id: 1_000_000, fqdn: format!("cost.{}.mesh.local", namespace(0)), host: node_name(1) });
    let spec = json!({"node": node_name(1), "network": {"type": "mesh", "ports": [80]}});
    bench_api.create(&PostParams::default(), &service("cost", spec)).await?;
    fleet.wait_applied(Duration::from_secs(120)).await?;
    let create_cost = cost(&cluster, &before).await?;
    let before = ApiCounters::read(&cluster)?;
    let update = Patch::Merge(json!({"spec": {"network": {"ports": [80, 81]}}}));
    bench_api.patch("cost", &PatchParams::default(), &update).await?;
    let update_cost = cost(&cluster, &before).await?;

    // 5. Full resync of a fresh controller: it reconciles every object in the cluster, the
    // bench's and any others.
    let objects_nodes = count_paged(&node_api, |_| true).await? as f64;
    let objects_services = count_paged(&all_services, |_| true).await? as f64;
    // SIGKILL, then a fresh process: it lists everything and reconciles every object again.
    drop(ctl);
    let resync_started = Instant::now();
    let ctl = Controller::start(&cluster, binary, PORT, &["--leader-elect=false"]);
    ctl.wait_ready(Duration::from_secs(120)).await;
    let ready_seconds = resync_started.elapsed().as_secs_f64();
    let reconciled = |body: &str, kind: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with("mesh_controller_reconciles_total") && l.contains(&format!("kind=\"{kind}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    // Two marks: when it has run as many reconciles of each kind as there are objects, and when
    // its reconciles stop (the last increase before 2 s without one).
    let (mut all_reconciled, mut last_count, mut last_change) = (None, -1.0, resync_started.elapsed());
    loop {
        let body = ctl.metrics_text().await;
        let (n, s) = (reconciled(&body, "MeshNode"), reconciled(&body, "MeshService"));
        let now = resync_started.elapsed();
        if all_reconciled.is_none() && n >= objects_nodes && s >= objects_services {
            all_reconciled = Some(now.as_secs_f64());
        }
        if n + s != last_count {
            (last_count, last_change) = (n + s, now);
        } else if all_reconciled.is_some() && now - last_change >= Duration::from_secs(2) {
            break;
        }
        anyhow::ensure!(now < Duration::from_secs(300), "the controller did not finish its resync in 300 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resync_seconds = all_reconciled.unwrap_or(f64::NAN);
    let resync_quiet_seconds = last_change.as_secs_f64();
    let resync_reconciles = last_count;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let resync_writes = ctl.metric("mesh_controller_api_writes_total").await;
    let resync_node_writes = ctl.metric("mesh_controller_api_writes_total{kind=\"MeshNode\"}").await;
    let after_resync = measure::memory(ctl.pid())?;
    let sim_memory = measure::memory(std::process::id())?;
    let totals = fleet.totals();
    drop(fleet);

    // Clean up, then the lab as it was.
    drop(ctl);
    wipe(&cluster).await?;
    drop(real);
    drop(lab_controller);
    if lab > 0 {
        tokio::task::spawn_blocking(move || start_lab_with_nodes(lab)).await??;
    }

    let mib = |kib: u64| kib as f64 / 1024.0;
    let rows: Vec<(String, String)> = vec![
        (
            "MeshNodes / simulated agents / MeshServices / shared directory watches".to_owned(),
            format!("{nodes} / {agents} / {services} / {directories}"),
        ),
        (
            "create -> routed by every simulated agent's device, median / p99".into(),
            format!("{:.2} / {:.2} s", percentile(&all_routed, 50.0), percentile(&all_routed, 99.0)),
        ),
        (
            "create -> applied by every simulated agent, median".into(),
            format!("{:.2} s", percentile(&all_agents, 50.0)),
        ),
        (
            format!("create -> applied by every simulated agent, p99 ({tries} tries)"),
            format!("{:.2} s", percentile(&all_agents, 99.0)),
        ),
        (
            "create -> applied by one simulated agent, median / p99".into(),
            format!("{:.2} / {:.2} s", percentile(&per_agent, 50.0), percentile(&per_agent, 99.0)),
        ),
        (
            "one agent's own sync steps (peers, plan, digest, hosted, rules, status writes), mean".into(),
            format!("{mean_sync_ms:.1} ms"),
        ),
        (
            "shared directory snapshot (peer entries, placements, DNS zone), mean".into(),
            format!("{mean_snapshot_ms:.1} ms"),
        ),
        (
            "API writes per service create / update".into(),
            format!("{} / {}", create_cost.writes_without_leases(), update_cost.writes_without_leases()),
        ),
        (
            "mesh watch events per service create / update".into(),
            format!("{} / {}", create_cost.mesh_watch_events(), update_cost.mesh_watch_events()),
        ),
        (
            "MeshNode watch events per watcher per service create / update".into(),
            format!("{:.1} / {:.1}", per_watcher(&create_cost, "meshnode"), per_watcher(&update_cost, "meshnode")),
        ),
        (
            "one real agent (release) at this size: RSS / sync mean / plan mean / sync CPU mean".into(),
            format!(
                "{:.0} MiB / {real_sync_ms:.1} ms / {real_plan_ms:.1} ms / {real_sync_cpu_ms:.1} ms",
                mib(real_memory.rss_kib)
            ),
        ),
        (
            "one real agent (release) at this size: process CPU per sync / % of a core (probes, watches too)".into(),
            format!("{:.1} ms / {real_cpu_percent:.1} %", real_cpu_ms / real_syncs.max(1.0)),
        ),
        ("one real agent (release) at this size: sync steps, mean ms".into(), steps_text),
        (
            "one real agent (release) idle on the 3-node lab: CPU / RSS".into(),
            format!("{idle_cpu_percent:.2} % / {:.1} MiB", mib(idle_memory.rss_kib)),
        ),
        (
            "mesh-controller RSS at steady state / after a full resync".into(),
            format!("{:.0} / {:.0} MiB", mib(steady.rss_kib), mib(after_resync.rss_kib)),
        ),
        (
            "mesh-controller full resync: ready / every object reconciled / last reconcile".into(),
            format!("{ready_seconds:.2} / {resync_seconds:.2} / {resync_quiet_seconds:.2} s"),
        ),
        (
            "mesh-controller API writes during the full resync (of them to MeshNodes)".into(),
            format!("{resync_writes} ({resync_node_writes})"),
        ),
        ("simulation process RSS (all agents, shared watches)".into(), format!("{:.0} MiB", mib(sim_memory.rss_kib))),
    ];
    println!("\n{:<72} value", format!("benchmark (simulated scale, {nodes} nodes)"));
    for (name, value) in &rows {
        println!("{name:<72} {value}");
    }
    let json = json!({
        "nodes": nodes, "services": services, "agents": agents, "directories": directories, "tries": tries,
        "setup_seconds": setup_seconds,
        "fleet_converged_seconds": fleet_converged,
        "converge_all_agents_seconds": {"median": percentile(&all_agents, 50.0), "p99": percentile(&all_agents, 99.0), "tries": all_agents},
        "routed_all_agents_seconds": {"median": percentile(&all_routed, 50.0), "p99": percentile(&all_routed, 99.0), "tries": all_routed},
        "routed_per_agent_seconds": {"median": percentile(&per_agent_routed, 50.0), "p99": percentile(&per_agent_routed, 99.0)},
        "converge_per_agent_seconds": {"median": percentile(&per_agent, 50.0), "p99": percentile(&per_agent, 99.0), "samples": per_agent.len()},
        "sim_sync_mean_ms": mean_sync_ms,
        "sim_snapshot_mean_ms": mean_snapshot_ms,
        "sim_cpu_per_sync_ms": cpu_per_sync_ms,
        "api_cost_create": cost_json(&create_cost),
        "api_cost_update": cost_json(&update_cost),
        "meshnode_watch_events_per_watcher": {"create": per_watcher(&create_cost, "meshnode"), "update": per_watcher(&update_cost, "meshnode")},
        "real_agent": {
            "idle_cpu_percent": idle_cpu_percent, "idle_rss_mib": mib(idle_memory.rss_kib),
            "rss_mib": mib(real_memory.rss_kib), "peak_rss_mib": mib(real_memory.peak_kib),
            "sync_mean_ms": real_sync_ms, "plan_mean_ms": real_plan_ms, "syncs": real_syncs,
            "cpu_per_sync_ms": real_cpu_ms / real_syncs.max(1.0),
            "sync_cpu_mean_ms": real_sync_cpu_ms,
            "process_cpu_percent": real_cpu_percent,
            "sync_steps_mean_ms": real_steps_ms,
            "sync_steps_cpu_mean_ms": real_step_cpu_ms,
        },
        "controller_rss_mib": {"steady": mib(steady.rss_kib), "steady_peak": mib(steady.peak_kib), "after_resync": mib(after_resync.rss_kib), "after_resync_peak": mib(after_resync.peak_kib)},
        "controller_resync_seconds": {"ready": ready_seconds, "all_reconciled": resync_seconds, "last_reconcile": resync_quiet_seconds, "reconciles": resync_reconciles, "objects": {"meshnodes": objects_nodes, "meshservices": objects_services}},
        "controller_resync_writes": resync_writes,
        "controller_resync_meshnode_writes": resync_node_writes,
        "sim_process_rss_mib": mib(sim_memory.rss_kib),
        "sim_totals": {"syncs": totals.syncs, "errors": totals.errors, "status_writes": totals.writes, "plans": totals.plans, "peer_changes": totals.peer_changes, "firewall_changes": totals.firewall_changes, "snapshots": totals.snapshots},
        "wall_seconds": bench_started.elapsed().as_secs_f64(),
    });
    let dir = repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(&out_file), serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", dir.join(&out_file).display());
    Ok(())
}
