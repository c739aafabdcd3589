//! `make bench` for the controller: how fast mesh IPs are handed out, and what a MeshService
//! create costs the API server.
//!
//! - IPAM alone (pure, in-process): allocations per second filling a /16.
//! - End to end on the lab's real kube-apiserver: the real mesh-controller binary, a burst of
//!   services created 16 at a time; allocations per second until every one has its IP in
//!   status, and the controller's API writes per created service (from its own metrics).
//!
//! Each figure is the median of several runs in one process; the table goes to stdout and
//! the figures to target/bench/controller.json.
//!
//! The lab's own controller is stopped meanwhile and started again afterwards; the objects the
//! bench did not make (the lab's MeshNodes, `make demo`'s service) stay as they are. Each run
//! uses a namespace of its own, emptied before and after it.

use std::path::Path;
use std::time::{Duration, Instant};

use harness_mesh_e2e::Cluster;
use harness_mesh_e2e::controller::{
    Controller, LabControllerPaused, create_services, remove_own_objects, wait_allocated,
};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch, PatchParams};
use mesh_core::{Owner, Pool, Subnet};
use serde_json::json;

const RUNS: usize = 3;
const SERVICES: usize = 150;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn ipam_allocations_per_second() -> f64 {
    let subnet: Subnet = "10.42.0.0/16".parse().expect("a valid subnet");
    let runs = (0..5)
        .map(|_| {
            let mut pool = Pool::new(subnet, 300).expect("a /16 pool");
            let owners: Vec<Owner> = (0..pool.capacity()).map(|i| Owner::service("bench", format!("s{i}"))).collect();
            let started = Instant::now();
            for owner in &owners {
                pool.allocate(owner, None, 0).expect("the pool has room");
            }
            owners.len() as f64 / started.elapsed().as_secs_f64()
        })
        .collect();
    median(runs)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let ipam = ipam_allocations_per_second();

    let cluster = Cluster::get().await?;
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    let binary = Path::new(env!("CARGO_BIN_EXE_mesh-controller"));
    let (mut rates, mut writes) = (Vec::new(), Vec::new());
    let lab_controller = LabControllerPaused::new()?;
    for run in 0..RUNS {
        let ns = format!("bench-alloc-{run}");
        // What an earlier, interrupted bench left there (only the bench's own namespace).
        remove_own_objects(&cluster, std::slice::from_ref(&ns), |_| false, Duration::from_secs(60)).await?;
        let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        namespaces.patch(&ns, &PatchParams::apply("harness-mesh-bench"), &Patch::Apply(&body)).await?;
        let ctl = Controller::start(&cluster, binary, 18190, &["--leader-elect=false"]);
        ctl.wait_ready(Duration::from_secs(30)).await;
        let before = ctl.metric("mesh_controller_api_writes_total").await;
        let api = Api::namespaced(cluster.client.clone(), &ns);
        let started = Instant::now();
        create_services(&api, "bench", 0..SERVICES).await?;
        wait_allocated(&api, SERVICES, Duration::from_secs(180)).await?;
        let elapsed = started.elapsed().as_secs_f64();
        // Let the controller settle so every write caused by the burst is counted.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = ctl.metric("mesh_controller_api_writes_total").await;
        rates.push(SERVICES as f64 / elapsed);
        writes.push((after - before) / SERVICES as f64);
        drop(ctl);
        // The next run's controller starts with the same objects as this one did.
        remove_own_objects(&cluster, std::slice::from_ref(&ns), |_| false, Duration::from_secs(60)).await?;
    }
    drop(lab_controller);

    let (rate, per_create) = (median(rates.clone()), median(writes.clone()));
    println!();
    println!("| benchmark (median of runs)                               | value        |");
    println!("|----------------------------------------------------------|--------------|");
    println!("| IPAM alone: allocations/s filling a /16 (5 runs)          | {ipam:>12.0} |");
    println!("| controller: allocations/s, burst of {SERVICES} services ({RUNS} runs) | {rate:>12.1} |");
    println!("| controller: API writes per MeshService create ({RUNS} runs)   | {per_create:>12.2} |");
    println!();
    let json = json!({
        "ipam_allocations_per_second": ipam,
        "controller_allocations_per_second": {"median": rate, "runs": rates, "services_per_run": SERVICES},
        "api_writes_per_service_create": {"median": per_create, "runs": writes},
    });
    let dir = harness_mesh_e2e::repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("controller.json"), serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", dir.join("controller.json").display());
    Ok(())
}
