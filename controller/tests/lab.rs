//! mesh-controller against the lab's real kube-apiserver: bursts, requested IPs and
//! conflicts, pool exhaustion and recovery, SIGKILL in the middle of a burst, leader election,
//! and the Node mirror. Each test runs its own controller process (the real binary) and the
//! tests take turns, since a controller acts on every object in the cluster.
//!
//! That is also why this suite does not share a lab: its controller would re-address other
//! people's objects (the small-pool test runs with another subnet) and its pool figures count
//! every object. It runs on a lab of its own with no nodes (`make e2e-controller`, part of
//! `make test`), and on a lab holding mesh objects it did not make (after `make demo`, say) it
//! refuses with a message instead of deleting them.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use harness_mesh_e2e::Cluster;
use harness_mesh_e2e::controller::{
    Controller, clean_slate, create_services, mesh_node_names, service, wait_allocated,
};
use harness_mesh_e2e::users::{CONNECT_GROUP, LabUser};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use mesh_api::{MeshNode, MeshService};
use serde_json::json;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The namespaces (MeshServices) and names (MeshNodes) of this suite's own objects.
const OWN_PREFIX: &str = "ctl-";

/// Makes sure the cluster holds no mesh objects but this suite's own (see the module doc), then
/// removes those left by an earlier test, and the lab's controller, so the test starts from an
/// empty pool.
async fn take_over(cluster: &Cluster) -> anyhow::Result<()> {
    let services: Api<MeshService> = Api::all(cluster.client.clone());
    let mut foreign: Vec<String> = services
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|s| !s.metadata.namespace.as_deref().unwrap_or_default().starts_with(OWN_PREFIX))
        .map(|s| {
            format!("MeshService {}/{}", s.metadata.namespace.unwrap_or_default(), s.metadata.name.unwrap_or_default())
        })
        .collect();
    foreign.extend(
        mesh_node_names(cluster, |n| !n.starts_with(OWN_PREFIX)).await?.into_iter().map(|n| format!("MeshNode {n}")),
    );
    if !foreign.is_empty() {
        let more = foreign.len().saturating_sub(5);
        foreign.truncate(5);
        anyhow::bail!(
            "this suite runs a mesh-controller of its own, which acts on every mesh object in the cluster, \
             so it needs a lab that holds none but its own ({OWN_PREFIX}*), and it deletes nothing it did not \
             make; found {}{}. Run it on a lab of its own: `make e2e-controller` (or `make lab-down` first)",
            foreign.join(", "),
            if more > 0 { format!(" and {more} more") } else { String::new() }
        );
    }
    clean_slate(cluster).await?;
    // And no IP hold-back left by an earlier test's controller (they all keep it in the default
    // ConfigMap of their --lease-namespace, default).
    let holds: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), "default");
    let _ = holds.delete(HOLDS, &DeleteParams::default()).await;
    Ok(())
}

/// The ConfigMap where the suite's controllers keep the IP hold-back (the flag's default).
const HOLDS: &str = "harness-mesh-controller-ip-holds";

/// Takes the cluster over ([`take_over`]), then starts a controller and waits until it is ready.
async fn fresh_controller(cluster: &Cluster, port: u16, args: &[&str]) -> anyhow::Result<Controller> {
    take_over(cluster).await?;
    let ctl = controller(cluster, port, args);
    ctl.wait_ready(Duration::from_secs(30)).await;
    Ok(ctl)
}

/// Starts this package's mesh-controller binary against the cluster.
fn controller(cluster: &Cluster, port: u16, args: &[&str]) -> Controller {
    Controller::start(cluster, std::path::Path::new(env!("CARGO_BIN_EXE_mesh-controller")), port, args)
}

async fn namespace(cluster: &Cluster, name: &str) -> anyhow::Result<Api<MeshService>> {
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    namespaces.patch(name, &PatchParams::apply("harness-mesh-test"), &Patch::Apply(&ns)).await?;
    Ok(Api::namespaced(cluster.client.clone(), name))
}

fn assert_distinct(ips: &BTreeMap<String, Ipv4Addr>) {
    let unique: HashSet<_> = ips.values().collect();
    assert_eq!(unique.len(), ips.len(), "duplicate mesh IPs: {ips:?}");
}

fn condition(s: &MeshService, type_: &str) -> Option<(String, String, String)> {
    let c = s.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn wait_for<F: Fn(&MeshService) -> bool>(
    api: &Api<MeshService>,
    name: &str,
    within: Duration,
    what: &str,
    f: F,
) -> anyhow::Result<MeshService> {
    let deadline = Instant::now() + within;
    loop {
        let s = api.get(name).await?;
        if f(&s) {
            return Ok(s);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{name}: {what} not reached within {within:?}; status {:?}",
            s.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_burst_of_200_services_gets_200_distinct_ips() -> anyhow::Result<()> {
    let _turn = SERIAL.lock().await;
    let cluster = Cluster::get().await?;
    let ctl = fresh_controller(&cluster, 18181, &["--leader-elect=false"]).await?;
    let api = namespace(&cluster, "ctl-burst").await?;
    let started = Instant::now();
    create_services(&api, "burst", 0..200).await?;
    let ips = wait_allocated(&api, 200, Duration::from_secs(120)).await?;
    let elapsed = started.elapsed();
    assert_eq!(ips.len(), 200);
    assert_distinct(&ips);
    let subnet: mesh_core::Subnet = "10.42.0.0/16".parse()?;
    assert!(ips.values().all(|ip| subnet.contains(*ip) && *ip != subnet.network() && *ip != subnet.broadcast()));
    assert_eq!(ctl.metric("mesh_controller_pool_used").await, 200.0);
    println!("200 services allocated in {:.2} s ({:.0}/s)", elapsed.as_secs_f64(), 200.0 / elapsed.as_secs_f64());

    // Nothing changes, nothing is written: a quiet minute costs no writes.
    let writes = ctl.metric("mesh_controller_api_writes_total").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ctl.metric("mesh_controller_api_writes_total").await, writes, "writes without any change");
    clean_slate(&cluster).await
}

#[tokio::test]
async fn requested_ips_are_honoured_and_the_loser_names_the_holder() -> anyhow::Result<()> {
    let _turn = SERIAL.lock().await;
    let cluster = Cluster::get().await?;
    let _ctl = fresh_controller(&cluster, 18182, &["--leader-elect=false", "--ip-hold-seconds=1"]).await?;
    let api = namespace(&cluster, "ctl-conflict").await?;
    let spec = json!({"network": {"ports": [80]}, "node": "nowhere", "meshIP": "10.42.9.9"});
    api.create(&PostParams::default(), &service("first", spec.clone())).await?;
    wait_for(&api, "first", Duration::from_secs(20), "meshIP 10.42.9.9", |s| {
        s.status.as_ref().and_then(|st| st.mesh_ip.as_deref()) == Some("10.42.9.9")
    })
    .await?;
    api.create(&PostParams::default(), &service("second", spec)).await?;
    let loser =
        wait_for(&api, "second", Duration::from_secs(20), "IPConflict", |s| condition(s, "IPConflict").is_some())
            .await?;
    let (status, _, message) = condition(&loser, "IPConflict").expect("checked above");
    assert_eq!(status, "True");
    assert!(message.contains("MeshService ctl-conflict/first"), "the message names the holder: {message}");
    assert_eq!(condition(&loser, "Ready").map(|c| c.0).as_deref(), Some("False"));
    assert!(loser.status.as_ref().and_then(|s| s.mesh_ip.clone()).is_none());

    // An event tells the same story.
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), "ctl-conflict");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !events.list(&ListParams::default()).await?.iter().any(|e| e.reason.as_deref() == Some("IPConflict")) {
        anyhow::ensure!(Instant::now() < deadline, "no IPConflict event");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Once the holder is gone (and the hold-back has passed), the loser gets the address.
    api.delete("first", &DeleteParams::default()).await?;
    wait_for(&api, "second", Duration::from_secs(30), "meshIP 10.42.9.9 after the holder left", |s| {
        s.status.as_ref().and_then(|st| st.mesh_ip.as_deref()) == Some("10.42.9.9")
            && condition(s, "IPConflict").is_none()
    })
    .await?;
    clean_slate(&cluster).await
}

#[tokio::test]
async fn a_small_pool_exhausts_clearly_and_recovers() -> anyhow::Result<()> {
    let _turn = SERIAL.lock().await;
    let cluster = Cluster::get().await?;
    let _ctl =
        fresh_controller(&cluster, 18183, &["--leader-elect=false", "--subnet=10.99.0.0/28", "--ip-hold-seconds=0"])
            .await?;
    let api = namespace(&cluster, "ctl-exhaust").await?;
    create_services(&api, "pool", 0..16).await?;
    let ips = wait_allocated(&api, 14, Duration::from_secs(60)).await?;
    assert_eq!(ips.len(), 14, "a /28 holds 14 addresses");
    assert_distinct(&ips);
    let deadline = Instant::now() + Duration::from_secs(20);
    let exhausted = loop {
        let list = api.list(&ListParams::default()).await?;
        let waiting: Vec<_> = list.items.into_iter().filter(|s| condition(s, "PoolExhausted").is_some()).collect();
        if waiting.len() == 2 || Instant::now() > deadline {
            break waiting;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(exhausted.len(), 2, "the two services without an address say PoolExhausted");
    let (_, reason, message) = condition(&exhausted[0], "PoolExhausted").expect("filtered");
    assert_eq!(reason, "PoolExhausted");
    assert!(message.contains("10.99.0.0/28") && message.contains("exhausted"), "{message}");

    for name in ips.keys().take(3) {
        api.delete(name, &DeleteParams::default()).await?;
    }
    let ips = wait_allocated(&api, 13, Duration::from_secs(40)).await?;
    let waiting: Vec<String> = exhausted.iter().filter_map(|s| s.metadata.name.clone()).collect();
    assert!(waiting.iter().all(|n| ips.contains_key(n)), "{waiting:?} recovered: {ips:?}");
    assert_distinct(&ips);
    clean_slate(&cluster).await
}

#[tokio::test]
async fn sigkill_in_the_middle_of_a_burst_leaves_no_duplicate_and_no_leak() -> anyhow::Result<()> {
    let _turn = SERIAL.lock().await;
    let cluster = Cluster::get().await?;
    take_over(&cluster).await?;
    let api = namespace(&cluster, "ctl-sigkill").await?;
    let mut ctl = controller(&cluster, 18184, &["--leader-elect=false"]);
    ctl.wait_ready(Duration::from_secs(30)).await;
    let burst = {
        let api = api.clone();
        tokio::spawn(async move { create_services(&api, "churn", 0..120).await })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    ctl.kill();
    burst.await??;
    let ctl = controller(&cluster, 18185, &["--leader-elect=false"]);
    ctl.wait_ready(Duration::from_secs(30)).await;
    create_services(&api, "after", 0..30).await?;
    let ips = wait_allocated(&api, 150, Duration::from_secs(120)).await?;
    assert_distinct(&ips);
    // No leak: the pool holds exactly the addresses the objects hold.
    assert_eq!(ctl.metric("mesh_controller_pool_used").await, 150.0);

    // A second restart rebuilds the same allocations from status: nothing moves.
    drop(ctl);
    let ctl = controller(&cluster, 18186, &["--leader-elect=false"]);
    ctl.wait_ready(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = wait_allocated(&api, 150, Duration::from_secs(10)).await?;
    assert_eq!(again, ips, "allocations changed across a restart");
    assert_eq!(ctl.metric("mesh_controller_pool_used").await, 150.0);
    clean_slate(&cluster).await
}

#[tokio::test]
async fn of_two_replicas_only_the_leader_writes() -> anyhow::Result<()> {
    let _turn = SERIAL.lock().await;
    let cluster = Cluster::get().await?;
    take_over(&cluster).await?;
    let api = namespace(&cluster, "ctl-leader").await?;
    let lease = ["--lease-name=mesh-controller-test", "--lease-seconds=4"];
    let mut first = controller(&cluster, 18187, &[&lease[..], &["--identity=first"]].concat());
    first.wait_ready(Duration::from_secs(30)).await;
    let second = controller(&cluster, 18188, &[&lease[..], &["--identity=second"]].concat());
    create_services(&api, "led", 0..10).await?;
    wait_allocated(&api, 10, Duration::from_secs(30)).await?;
    assert!(first.metric("mesh_controller_api_writes_total").await > 0.0);
    assert_eq!(second.metric("mesh_controller_api_writes_total").await, 0.0, "a follower wrote");
    assert!(!second.is_ready().await, "a follower reports ready");

    // The leader dies: the follower takes over within the lease time and carries on alone.
    first.kill();
    second.wait_ready(Duration::from_secs(30)).await;
    create_services(&api, "after-failover", 0..5).await?;
    let ips = wait_allocated(&api, 15, Duration::from_secs(30)).await?;
    assert_distinct(&ips);
    assert!(second.metric("mesh_controller_api_writes_total").await > 0.0);
    clean_slate(&cluster).await
}

#[tokio::test]
async fn kubernetes_nodes_are_mirrored_into_mesh_nodes() -> anyhow::Result<()> {
    let _turn = SERIAL.lock().await;
    let cluster = Cluster::get().await?;
    let ctl = fresh_controller(&cluster, 18189, &["--leader-elect=false"]).await?;
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let mesh_nodes: Api<MeshNode> = Api::all(cluster.client.clone());
    let name = "ctl-mirror-node";
    let _ = nodes.delete(name, &DeleteParams::default()).await;
    let node: Node = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}))?;
    let node = nodes.create(&PostParams::default(), &node).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mirrored = loop {
        if let Some(mn) = mesh_nodes.get_opt(name).await?
            && mn.status.as_ref().and_then(|s| s.mesh_ip.as_ref()).is_some()
        {
            break mn;
        }
        anyhow::ensure!(Instant::now() < deadline, "no MeshNode with a mesh IP for Node {name}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let owner = &mirrored.metadata.owner_references.clone().unwrap_or_default()[0];
    assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Node", node.metadata.uid.as_deref().unwrap_or_default()));
    assert!(ctl.metric("mesh_controller_pool_used").await >= 1.0);

    nodes.delete(name, &DeleteParams::default()).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while mesh_nodes.get_opt(name).await?.is_some() {
        anyhow::ensure!(Instant::now() < deadline, "MeshNode {name} outlived its Node");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(ctl.metric("mesh_controller_pool_used").await, 0.0, "the node's IP was released");
    clean_slate(&cluster).await
}

/// The finalizer an older controller put on every MeshService and MeshNode (the controller no
/// longer uses one; it removes this one where it finds it).
const OLD_FINALIZER: &str = "mesh.harness.dev/release-ip";

/// Kubernetes' namespace controller (kube-controller-manager with only that controller), killed
/// when dropped. The lab runs without kube-controller-manager in plain mode, and without it no
/// namespace ever finishes deleting, whatever the mesh objects in it do.
struct NamespaceController(std::process::Child);

impl NamespaceController {
    fn start(cluster: &Cluster) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        // Cached after the first build (1-2 min, from the Go module proxy); prints its path.
        let script = harness_mesh_e2e::repo_root().join("e2e/lab/build-binaries.sh");
        let out = std::process::Command::new(&script)
            .arg("kube-controller-manager")
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "{} kube-controller-manager failed (a first build needs the network: run it once outside \
             e2e/lab/ns.sh)",
            script.display()
        );
        let binary = String::from_utf8(out.stdout)?.lines().last().unwrap_or_default().to_owned();
        let log = std::fs::File::create(std::env::temp_dir().join("ctl-namespace-controller.log"))?;
        let child = std::process::Command::new(&binary)
            .arg(format!("--kubeconfig={}", cluster.kubeconfig.display()))
            .args(["--controllers=namespace-controller", "--leader-elect=false", "--secure-port=0"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        Ok(Self(child))
    }
}

impl Drop for NamespaceController {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn finalizers<K: kube::Resource>(obj: &K) -> Vec<String> {
    obj.meta().finalizers.clone().unwrap_or_default()
}

/// A MeshNode named `name` with an empty spec and the given finalizers.
fn mesh_node(name: &str, finalizers: &[&str]) -> anyhow::Result<MeshNode> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode",
        "metadata": {"name": name, "finalizers": finalizers}, "spec": {},
    }))?)
}

async fn wait_node_ip(nodes: &Api<MeshNode>, name: &str, within: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(ip) = nodes.get_opt(name).await?.and_then(|n| n.status?.mesh_ip) {
            return Ok(ip);
        }
        anyhow::ensure!(Instant::now() < deadline, "MeshNode {name} got no mesh IP within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn mesh_ip_of(s: &MeshService) -> Option<&str> {
    s.status.as_ref().and_then(|st| st.mesh_ip.as_deref())
}

#[tokio::test]
async fn with_the_controller_stopped_mesh_objects_and_their_namespace_are_deleted_promptly() -> anyhow::Result<()> {
    let _turn = SERIAL.lock().await;
    let cluster = Cluster::get().await?;
    let hold = ["--leader-elect=false", "--ip-hold-seconds=600"];
    let ctl = fresh_controller(&cluster, 18190, &hold).await?;
    // A namespace of this run's own: one that an earlier, failed run left terminating takes no
    // new objects.
    let (ns, node_name) = (format!("ctl-down-{}", std::process::id()), "ctl-down-node");
    let api = namespace(&cluster, &ns).await?;
    let nodes: Api<MeshNode> = Api::all(cluster.client.clone());
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    nodes.create(&PostParams::default(), &mesh_node(node_name, &[])?).await?;
    api.create(&PostParams::default(), &service("web", json!({"network": {"ports": [80]}, "node": node_name}))).await?;
    let ip = wait_for(&api, "web", Duration::from_secs(20), "a mesh IP", |s| mesh_ip_of(s).is_some()).await?;
    let ip = mesh_ip_of(&ip).unwrap_or_default().to_owned();
    wait_node_ip(&nodes, node_name, Duration::from_secs(20)).await?;

    // The controller goes away (uninstalled, crashed, scaled to 0), then everything is deleted.
    drop(ctl);
    let _namespace_controller = NamespaceController::start(&cluster)?;
    let started = Instant::now();
    api.delete("web", &DeleteParams::default()).await?;
    nodes.delete(node_name, &DeleteParams::default()).await?;
    namespaces.delete(&ns, &DeleteParams::default()).await?;
    let within = Duration::from_secs(30);
    let mut gone: BTreeMap<&str, f64> = BTreeMap::new();
    loop {
        let left = [
            ("MeshService", api.get_opt("web").await?.map(|s| format!("finalizers {:?}", finalizers(&s)))),
            ("MeshNode", nodes.get_opt(node_name).await?.map(|n| format!("finalizers {:?}", finalizers(&n)))),
            (
                "Namespace",
                namespaces.get_opt(&ns).await?.map(|n| {
                    let conditions = n.status.and_then(|s| s.conditions).unwrap_or_default();
                    conditions.into_iter().filter_map(|c| c.message).collect::<Vec<_>>().join("; ")
                }),
            ),
        ];
        for (kind, obj) in &left {
            if obj.is_none() {
                gone.entry(kind).or_insert_with(|| started.elapsed().as_secs_f64());
            }
        }
        if gone.len() == left.len() {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < within,
            "with no controller running, not deleted within {within:?}: {:?}",
            left.iter().filter(|(_, obj)| obj.is_some()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("deleted with no controller running, seconds after the requests: {gone:?}");

    // A deletion the controller never saw is not held back: a controller started afterwards
    // sees only live objects, so another service may take the address at once.
    let ctl = controller(&cluster, 18191, &hold);
    ctl.wait_ready(Duration::from_secs(30)).await;
    let after = namespace(&cluster, "ctl-down-after").await?;
    after
        .create(
            &PostParams::default(),
            &service("taker", json!({"network": {"ports": [80]}, "node": "nowhere", "meshIP": ip})),
        )
        .await?;
    wait_for(&after, "taker", Duration::from_secs(20), "the address deleted while no controller ran", |s| {
        mesh_ip_of(s) == Some(ip.as_str())
    })
    .await?;
    clean_slate(&cluster).await
}

#[tokio::test]
async fn with_the_controller_running_a_deleted_objects_ip_is_held_back() -> anyhow::Result<()> {
    let _turn = SERIAL.lock().await;
    let cluster = Cluster::get().await?;
    let ctl = fresh_controller(&cluster, 18192, &["--leader-elect=false", "--ip-hold-seconds=600"]).await?;
    let api = namespace(&cluster, "ctl-hold").await?;
    let nodes: Api<MeshNode> = Api::all(cluster.client.clone());
    let spec = |ip: Option<&str>| match ip {
        Some(ip) => json!({"network": {"ports": [80]}, "node": "nowhere", "meshIP": ip}),
        None => json!({"network": {"ports": [80]}, "node": "nowhere"}),
    };
    api.create(&PostParams::default(), &service("first", spec(None))).await?;
    let first = wait_for(&api, "first", Duration::from_secs(20), "a mesh IP", |s| mesh_ip_of(s).is_some()).await?;
    let ip = mesh_ip_of(&first).unwrap_or_default().to_owned();
    nodes.create(&PostParams::default(), &mesh_node("ctl-hold-node", &[])?).await?;
    let node_ip = wait_node_ip(&nodes, "ctl-hold-node", Duration::from_secs(20)).await?;

    let started = Instant::now();
    api.delete("first", &DeleteParams::default()).await?;
    nodes.delete("ctl-hold-node", &DeleteParams::default()).await?;
    while api.get_opt("first").await?.is_some() || nodes.get_opt("ctl-hold-node").await?.is_some() {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "not deleted within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deleted = started.elapsed();
    // Both addresses are held back from anyone else...
    for (name, wanted, previous) in
        [("second", &ip, "MeshService ctl-hold/first"), ("third", &node_ip, "MeshNode ctl-hold-node")]
    {
        api.create(&PostParams::default(), &service(name, spec(Some(wanted)))).await?;
        let refused = wait_for(&api, name, Duration::from_secs(20), "IPConflict", |s| {
            condition(s, "IPConflict").is_some_and(|c| c.0 == "True")
        })
        .await?;
        let (_, _, message) = condition(&refused, "IPConflict").unwrap_or_default();
        assert!(message.contains("held back") && message.contains(previous), "{name}: {message}");
        assert_eq!(mesh_ip_of(&refused), None, "{name} got a held-back address");
    }
    // ...but the previous owner, asking for it, takes its own back at once.
    api.create(&PostParams::default(), &service("first", spec(Some(&ip)))).await?;
    wait_for(&api, "first", Duration::from_secs(20), "its old address back", |s| mesh_ip_of(s) == Some(ip.as_str()))
        .await?;
    println!("deleted in {:.2} s with the controller running; {ip} and {node_ip} held back", deleted.as_secs_f64());
    assert_eq!(ctl.metric("mesh_controller_pool_used").await, 1.0, "only the recreated first holds an address");
    clean_slate(&cluster).await
}

#[tokio::test]
async fn the_hold_back_survives_a_restart_and_expires_on_time() -> anyhow::Result<()> {
    let _turn = SERIAL.lock().await;
    let cluster = Cluster::get().await?;
    let hold = ["--leader-elect=false", "--ip-hold-seconds=20"];
    let mut ctl = fresh_controller(&cluster, 18193, &hold).await?;
    let api = namespace(&cluster, "ctl-holds").await?;
    let spec = |ip: Option<&str>| match ip {
        Some(ip) => json!({"network": {"ports": [80]}, "node": "nowhere", "meshIP": ip}),
        None => json!({"network": {"ports": [80]}, "node": "nowhere"}),
    };
    api.create(&PostParams::default(), &service("first", spec(None))).await?;
    let first = wait_for(&api, "first", Duration::from_secs(20), "a mesh IP", |s| mesh_ip_of(s).is_some()).await?;
    let ip = mesh_ip_of(&first).unwrap_or_default().to_owned();
    api.delete("first", &DeleteParams::default()).await?;
    // The hold reaches the ConfigMap within its write interval (1 s).
    let holds: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let data = holds.get_opt(HOLDS).await?.and_then(|cm| cm.data).unwrap_or_default();
        if data.get("holds.json").is_some_and(|text| text.contains(&ip)) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "{ip} not in the hold-back ConfigMap: {data:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Killed outright, and a new controller: the address is still held back from others...
    ctl.kill();
    let ctl = controller(&cluster, 18193, &hold);
    ctl.wait_ready(Duration::from_secs(30)).await;
    api.create(&PostParams::default(), &service("second", spec(Some(&ip)))).await?;
    let refused = wait_for(&api, "second", Duration::from_secs(20), "IPConflict", |s| {
        condition(s, "IPConflict").is_some_and(|c| c.0 == "True")
    })
    .await?;
    let (_, _, message) = condition(&refused, "IPConflict").unwrap_or_default();
    assert!(message.contains("held back") && message.contains("MeshService ctl-holds/first"), "{message}");
    // ...until the hold ends, 20 s after the release.
    wait_for(&api, "second", Duration::from_secs(40), "the address once the hold ended", |s| {
        mesh_ip_of(s) == Some(ip.as_str())
    })
    .await?;
    drop(ctl);
    clean_slate(&cluster).await
}

#[tokio::test]
async fn an_overlapping_cluster_cidr_stops_the_controller_with_its_name() -> anyhow::Result<()> {
    let _turn = SERIAL.lock().await;
    let cluster = Cluster::get().await?;
    take_over(&cluster).await?;
    let _ctl = controller(&cluster, 18194, &["--leader-elect=false", "--cluster-cidrs=10.96.0.0/12,10.42.0.0/16"]);
    let log = std::env::temp_dir().join("mesh-controller-test-18194.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("overlaps the cluster CIDR(s) 10.42.0.0/16 (--cluster-cidrs)") {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the controller did not refuse to start: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test]
async fn the_finalizer_of_an_older_controller_is_removed() -> anyhow::Result<()> {
    let _turn = SERIAL.lock().await;
    let cluster = Cluster::get().await?;
    take_over(&cluster).await?;
    let api = namespace(&cluster, "ctl-upgrade").await?;
    let nodes: Api<MeshNode> = Api::all(cluster.client.clone());
    // What an older controller left: live objects carrying its finalizer, and one deleted while
    // no controller ran, which the finalizer keeps.
    let with_finalizer = |name: &str| -> anyhow::Result<MeshService> {
        let mut s = service(name, json!({"network": {"ports": [80]}, "node": "nowhere"}));
        s.metadata.finalizers = Some(vec![OLD_FINALIZER.into(), "example.com/keep".into()]);
        Ok(s)
    };
    api.create(&PostParams::default(), &with_finalizer("live")?).await?;
    api.create(&PostParams::default(), &with_finalizer("deleted")?).await?;
    nodes.create(&PostParams::default(), &mesh_node("ctl-upgrade-node", &[OLD_FINALIZER])?).await?;
    api.delete("deleted", &DeleteParams::default()).await?;

    let ctl = controller(&cluster, 18193, &["--leader-elect=false"]);
    ctl.wait_ready(Duration::from_secs(30)).await;
    let started = Instant::now();
    let within = Duration::from_secs(30);
    loop {
        let live = api.get("live").await?;
        let node = nodes.get("ctl-upgrade-node").await?;
        let deleted = api.get("deleted").await?;
        let done = [&live, &deleted].iter().all(|s| finalizers(*s) == ["example.com/keep"])
            && finalizers(&node).is_empty()
            && mesh_ip_of(&live).is_some();
        if done {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < within,
            "the old finalizer is still there after {within:?}: live {:?}, deleted {:?}, node {:?}",
            finalizers(&live),
            finalizers(&deleted),
            finalizers(&node)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("old finalizers removed {:.2} s after the controller was ready", started.elapsed().as_secs_f64());
    // Once the other finalizer goes too, nothing holds the deleted one back.
    let unkeep = Patch::Merge(json!({"metadata": {"finalizers": null}}));
    api.patch("deleted", &PatchParams::default(), &unkeep).await?;
    api.patch("live", &PatchParams::default(), &unkeep).await?;
    let writes = ctl.metric("mesh_controller_api_writes_total").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(api.get_opt("deleted").await?.is_none(), "the deleted service is still there");
    // Removing a finalizer that is not there is no write.
    api.patch("live", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ctl.metric("mesh_controller_api_writes_total").await,
        writes,
        "writes for objects without the old finalizer"
    );
    clean_slate(&cluster).await
}

/// Sends `signal` (`STOP`, `CONT`) to the process `pid`.
fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status()?;
    anyhow::ensure!(status.success(), "kill -{signal} {pid} failed: {status}");
    Ok(())
}

#[tokio::test]
async fn a_deletion_missed_while_the_watch_was_down_is_released_after_the_relist() -> anyhow::Result<()> {
    let _turn = SERIAL.lock().await;
    let cluster = Cluster::get().await?;
    let ctl = fresh_controller(&cluster, 18194, &["--leader-elect=false", "--ip-hold-seconds=600"]).await?;
    let api = namespace(&cluster, "ctl-relist").await?;
    api.create(&PostParams::default(), &service("missed", json!({"network": {"ports": [80]}, "node": "nowhere"})))
        .await?;
    let missed = wait_for(&api, "missed", Duration::from_secs(20), "a mesh IP", |s| mesh_ip_of(s).is_some()).await?;
    let ip = mesh_ip_of(&missed).unwrap_or_default().to_owned();

    // The controller stops (SIGSTOP) and kube-apiserver restarts, which ends its watches; the
    // service is deleted before the controller runs again. Its watches resume from a resource
    // version older than the new server's watch cache, so they start over with a list, and no
    // Delete event ever comes. (Deleted before the restart, the event would already wait in the
    // stopped controller's socket.)
    signal(ctl.pid(), "STOP")?;
    let deleted = async {
        harness_mesh_e2e::lab_sh(&["apiserver", "stop"])?;
        harness_mesh_e2e::lab_sh(&["apiserver", "start"])?;
        let cluster = Cluster::get().await?;
        let api: Api<MeshService> = Api::namespaced(cluster.client.clone(), "ctl-relist");
        api.delete("missed", &DeleteParams::default()).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while api.get_opt("missed").await?.is_some() {
            anyhow::ensure!(Instant::now() < deadline, "missed not deleted within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok(())
    }
    .await;
    signal(ctl.pid(), "CONT")?;
    deleted?;
    let cluster = Cluster::get().await?;
    let api: Api<MeshService> = Api::namespaced(cluster.client.clone(), "ctl-relist");

    // After the re-list the controller holds no address for the service (no leak), and holds it
    // back from anyone else.
    let deadline = Instant::now() + Duration::from_secs(30);
    while ctl.metric("mesh_controller_pool_used").await != 0.0 {
        anyhow::ensure!(Instant::now() < deadline, "the deleted service's {ip} is still allocated after the re-list");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let spec = json!({"network": {"ports": [80]}, "node": "nowhere", "meshIP": ip});
    api.create(&PostParams::default(), &service("taker", spec)).await?;
    let refused = wait_for(&api, "taker", Duration::from_secs(20), "IPConflict", |s| {
        condition(s, "IPConflict").is_some_and(|c| c.0 == "True")
    })
    .await?;
    let (_, _, message) = condition(&refused, "IPConflict").unwrap_or_default();
    assert!(message.contains("held back") && message.contains("MeshService ctl-relist/missed"), "{message}");
    let log = std::fs::read_to_string(std::env::temp_dir().join("mesh-controller-test-18194.log"))?;
    assert!(log.contains("deleted while the watch was down"), "the release did not come from the re-list");
    clean_slate(&cluster).await
}

// ---- meshctl connect (issue 19): ephemeral members and what connecting users may write ----

/// Where the lab installs the chart: the agents' Leases (and connecting users') live here.
const RELEASE_NAMESPACE: &str = "harness-mesh";
/// The namespace this suite's connecting users expose MeshServices in.
const EXPOSE_NAMESPACE: &str = "ctl-connect";

/// A client authenticated as `user` (group [`CONNECT_GROUP`]) by a client certificate of the
/// lab's CA ([`harness_mesh_e2e::users::LabUser`]).
async fn connect_user(cluster: &Cluster, user: &str) -> anyhow::Result<kube::Client> {
    let dir = std::env::temp_dir().join(format!("ctl-connect-certs-{}", std::process::id()));
    let server = harness_mesh_e2e::users::server_of(&cluster.kubeconfig)?;
    LabUser::new(user, &[CONNECT_GROUP], &server, &dir)?.client(&server).await
}

/// Makes `ns` a namespace where connecting users may expose services, as the chart does for
/// each of connect.exposeNamespaces (a RoleBinding of its ClusterRole `<fullname>-connect-expose`).
async fn expose_namespace(cluster: &Cluster, ns: &str) -> anyhow::Result<()> {
    use k8s_openapi::api::rbac::v1::RoleBinding;
    namespace(cluster, ns).await?;
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "harness-mesh-connect-expose", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "harness-mesh-connect-expose"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": CONNECT_GROUP}]});
    let api: Api<RoleBinding> = Api::namespaced(cluster.client.clone(), ns);
    api.patch("harness-mesh-connect-expose", &PatchParams::apply("harness-mesh-test"), &Patch::Apply(&binding)).await?;
    Ok(())
}

/// A MeshNode `name`, ephemeral member of `owner` (none: a plain one), exposing in [`EXPOSE_NAMESPACE`].
fn connect_node(name: &str, owner: Option<&str>) -> anyhow::Result<MeshNode> {
    let annotations = owner.map(|o| json!({mesh_api::CONNECT_OWNER_ANNOTATION: o})).unwrap_or(json!({}));
    Ok(serde_json::from_value(json!({
        "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"serviceNamespaces": [EXPOSE_NAMESPACE]},
    }))?)
}

/// A MeshService `name` on MeshNode `node`, exposed by `owner` (none: an administrator's).
fn connect_service(name: &str, node: &str, owner: Option<&str>) -> anyhow::Result<MeshService> {
    let annotations = owner.map(|o| json!({mesh_api::CONNECT_OWNER_ANNOTATION: o})).unwrap_or(json!({}));
    Ok(serde_json::from_value(json!({
        "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshService",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"network": {"type": "mesh", "ports": [8080]}, "node": node},
    }))?)
}

/// The agent's part of a MeshNode's status, as `meshctl connect` patches it.
fn agent_fields(key_byte: char) -> serde_json::Value {
    json!({"status": {"publicKey": format!("{}A=", key_byte.to_string().repeat(42)), "endpoint": "192.168.77.200:51820",
        "listenPort": 51820, "backend": "userspace"}})
}

/// Creates or renews Lease `mesh-agent-<node>` as `holder` through `client` (renewed now, 30 s).
async fn renew_lease(client: &kube::Client, node: &str, holder: &str) -> Result<(), kube::Error> {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let api: Api<Lease> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let name = mesh_api::agent_lease_name(node);
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let spec = json!({"holderIdentity": holder, "leaseDurationSeconds": 30, "renewTime": now});
    if api.get_opt(&name).await?.is_some() {
        api.patch(&name, &PatchParams::default(), &Patch::Merge(json!({"spec": spec}))).await?;
    } else {
        let lease: Lease =
            serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).expect("a valid Lease");
        api.create(&PostParams::default(), &lease).await?;
    }
    Ok(())
}

/// Removes this suite's connect objects (as admin): its MeshNodes and Leases named `ctl-conn-*`,
/// the services in [`EXPOSE_NAMESPACE`] and in `ctl-connect-elsewhere`.
async fn remove_connect_objects(cluster: &Cluster) -> anyhow::Result<()> {
    use k8s_openapi::api::coordination::v1::Lease;
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), RELEASE_NAMESPACE);
    for lease in leases.list(&ListParams::default()).await? {
        let name = lease.metadata.name.unwrap_or_default();
        if name.starts_with("mesh-agent-ctl-conn-") {
            let _ = leases.delete(&name, &DeleteParams::default()).await;
        }
    }
    harness_mesh_e2e::controller::remove_own_objects(
        cluster,
        &[EXPOSE_NAMESPACE.to_owned(), "ctl-connect-elsewhere".to_owned()],
        |n| n.starts_with("ctl-conn-"),
        Duration::from_secs(30),
    )
    .await
}

/// Asserts that `result` is the API server's refusal (403 Forbidden, or 422 Invalid) whose
/// message contains `needle`.
fn refused<T: std::fmt::Debug>(what: &str, result: Result<T, kube::Error>, needle: &str) {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 || status.code == 422 => {
            assert!(status.message.contains(needle), "{what}: refused, but not with {needle:?}: {}", status.message);
        }
        other => panic!("{what}: expected a refusal mentioning {needle:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn a_connect_member_whose_lease_lapses_is_collected_within_the_bound() -> anyhow::Result<()> {
    let _turn = SERIAL.lock().await;
    let cluster = Cluster::get().await?;
    let ctl = fresh_controller(
        &cluster,
        18190,
        &["--leader-elect=false", "--ip-hold-seconds=0", &format!("--agent-lease-namespace={RELEASE_NAMESPACE}")],
    )
    .await?;
    remove_connect_objects(&cluster).await?;
    expose_namespace(&cluster, EXPOSE_NAMESPACE).await?;
    let (alice, bob) = (connect_user(&cluster, "alice").await?, connect_user(&cluster, "bob").await?);
    let as_alice: Api<MeshNode> = Api::all(alice.clone());
    let admin_nodes: Api<MeshNode> = Api::all(cluster.client.clone());

    // alice connects: her ephemeral MeshNode, the agent's status fields, her Lease, a service.
    as_alice.create(&PostParams::default(), &connect_node("ctl-conn-alice", Some("alice"))?).await?;
    as_alice.patch_status("ctl-conn-alice", &PatchParams::default(), &Patch::Merge(agent_fields('A'))).await?;
    renew_lease(&alice, "ctl-conn-alice", "alice").await?;
    let alice_services: Api<MeshService> = Api::namespaced(alice.clone(), EXPOSE_NAMESPACE);
    alice_services
        .create(&PostParams::default(), &connect_service("ctl-conn-dev", "ctl-conn-alice", Some("alice"))?)
        .await?;
    // An administrator's service placed on her node is not hers: it stays.
    let admin_services: Api<MeshService> = Api::namespaced(cluster.client.clone(), EXPOSE_NAMESPACE);
    admin_services.create(&PostParams::default(), &connect_service("ctl-conn-admins", "ctl-conn-alice", None)?).await?;
    // A MeshNode without the annotation and without a Lease is never collected.
    admin_nodes.create(&PostParams::default(), &connect_node("ctl-conn-plain", None)?).await?;
    // A second node of alice's whose Lease bob holds (and renews): that keeps nothing alive.
    as_alice.create(&PostParams::default(), &connect_node("ctl-conn-alice-2", Some("alice"))?).await?;
    renew_lease(&bob, "ctl-conn-alice-2", "bob").await?;
    let second_created = Instant::now();

    wait_node_ip(&admin_nodes, "ctl-conn-alice", Duration::from_secs(20)).await?;
    let placed = wait_for(&admin_services, "ctl-conn-dev", Duration::from_secs(20), "hosted on ctl-conn-alice", |s| {
        s.status.as_ref().and_then(|st| st.node.as_deref()) == Some("ctl-conn-alice") && mesh_ip_of(s).is_some()
    })
    .await?;
    assert!(condition(&placed, "PlacementDenied").is_none(), "{:?}", placed.status);

    // The session lives on while it renews (every 10 s, as meshctl connect does)...
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(10)).await;
        renew_lease(&alice, "ctl-conn-alice", "alice").await?;
        renew_lease(&bob, "ctl-conn-alice-2", "bob").await?;
    }
    // ...and is killed (-9) right after this renewal: nothing is deleted by the session.
    let killed = Instant::now();
    assert!(admin_nodes.get_opt("ctl-conn-alice").await?.is_some(), "collected while renewed");
    // Documented bound: Lease duration 30 s + grace 15 s + one loop period 5 s (+ API slack).
    let bound = Duration::from_secs(30 + mesh_api::EPHEMERAL_GRACE_SECONDS as u64 + 5);
    let slack = Duration::from_secs(5);
    let mut second_gone = None;
    let gone = loop {
        if second_gone.is_none() && admin_nodes.get_opt("ctl-conn-alice-2").await?.is_none() {
            second_gone = Some(second_created.elapsed());
        }
        if admin_nodes.get_opt("ctl-conn-alice").await?.is_none() {
            break killed.elapsed();
        }
        assert!(killed.elapsed() < bound + slack, "ctl-conn-alice not collected within {:?}", bound + slack);
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!("killed -> ephemeral MeshNode collected in {:.1} s (bound {} s)", gone.as_secs_f64(), bound.as_secs());
    assert!(gone >= Duration::from_secs(44), "collected before its Lease and grace ran out: {gone:?}");
    // Her service went with it; the administrator's stays (NodeNotFound now).
    assert!(admin_services.get_opt("ctl-conn-dev").await?.is_none(), "her service outlived her node");
    assert!(admin_services.get_opt("ctl-conn-admins").await?.is_some(), "an administrator's service was collected");
    // Bob's Lease kept nothing alive: the second node went 45 s after it was made (+ a period).
    let second_gone = second_gone.expect("ctl-conn-alice-2 outlived ctl-conn-alice despite an older deadline");
    println!("node with a Lease held by bob collected {:.1} s after its creation", second_gone.as_secs_f64());
    assert!(second_gone < bound + slack, "{second_gone:?}");
    assert!(admin_nodes.get_opt("ctl-conn-plain").await?.is_some(), "a plain MeshNode was collected");
    assert_eq!(ctl.metric("mesh_controller_ephemeral_collected_total").await, 2.0);

    remove_connect_objects(&cluster).await?;
    clean_slate(&cluster).await
}

#[tokio::test]
async fn connect_users_write_only_their_own_objects() -> anyhow::Result<()> {
    let _turn = SERIAL.lock().await;
    let cluster = Cluster::get().await?;
    remove_connect_objects(&cluster).await?;
    expose_namespace(&cluster, EXPOSE_NAMESPACE).await?;
    namespace(&cluster, "ctl-connect-elsewhere").await?;
    let (alice, bob) = (connect_user(&cluster, "alice").await?, connect_user(&cluster, "bob").await?);
    let (as_alice, as_bob): (Api<MeshNode>, Api<MeshNode>) = (Api::all(alice.clone()), Api::all(bob.clone()));
    let params = PatchParams::default();

    // alice's session: everything she needs works.
    as_alice.create(&PostParams::default(), &connect_node("ctl-conn-a", Some("alice"))?).await?;
    as_alice.patch_status("ctl-conn-a", &params, &Patch::Merge(agent_fields('A'))).await?;
    renew_lease(&alice, "ctl-conn-a", "alice").await?;
    let alice_services: Api<MeshService> = Api::namespaced(alice.clone(), EXPOSE_NAMESPACE);
    alice_services
        .create(&PostParams::default(), &connect_service("ctl-conn-web", "ctl-conn-a", Some("alice"))?)
        .await?;
    alice_services
        .patch("ctl-conn-web", &params, &Patch::Merge(json!({"spec": {"network": {"ports": [8081]}}})))
        .await?;
    as_alice.patch("ctl-conn-a", &params, &Patch::Merge(json!({"spec": {"listenPort": 51821}}))).await?;

    // bob touches none of it.
    let belongs = "belongs to \"alice\"";
    let retarget = Patch::Merge(json!({"spec": {"endpoint": "192.168.77.99:51820"}}));
    refused("bob updates alice's MeshNode", as_bob.patch("ctl-conn-a", &params, &retarget).await, belongs);
    refused("bob deletes alice's MeshNode", as_bob.delete("ctl-conn-a", &DeleteParams::default()).await, belongs);
    refused(
        "bob rewrites alice's status",
        as_bob.patch_status("ctl-conn-a", &params, &Patch::Merge(agent_fields('B'))).await,
        belongs,
    );
    refused("bob renews alice's Lease", renew_lease(&bob, "ctl-conn-a", "bob").await, belongs);
    let bob_leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(bob.clone(), RELEASE_NAMESPACE);
    let lease = mesh_api::agent_lease_name("ctl-conn-a");
    refused("bob deletes alice's Lease", bob_leases.delete(&lease, &DeleteParams::default()).await, belongs);
    let bob_services: Api<MeshService> = Api::namespaced(bob.clone(), EXPOSE_NAMESPACE);
    let steal = Patch::Merge(json!({"spec": {"node": "ctl-conn-b"}}));
    refused("bob moves alice's MeshService", bob_services.patch("ctl-conn-web", &params, &steal).await, belongs);
    refused(
        "bob deletes alice's MeshService",
        bob_services.delete("ctl-conn-web", &DeleteParams::default()).await,
        belongs,
    );
    refused(
        "bob creates a MeshNode owned by alice",
        as_bob.create(&PostParams::default(), &connect_node("ctl-conn-fake", Some("alice"))?).await,
        "set to your user name \"bob\" (it is \"alice\")",
    );
    refused(
        "bob creates a permanent MeshNode",
        as_bob.create(&PostParams::default(), &connect_node("ctl-conn-perm", None)?).await,
        "set to your user name \"bob\" (it is not set)",
    );
    refused(
        "bob creates a MeshService owned by alice",
        bob_services
            .create(&PostParams::default(), &connect_service("ctl-conn-fake", "ctl-conn-a", Some("alice"))?)
            .await,
        "it is \"alice\"",
    );
    // bob's own node: the controller's fields of its status are not his.
    as_bob.create(&PostParams::default(), &connect_node("ctl-conn-b", Some("bob"))?).await?;
    as_bob.patch_status("ctl-conn-b", &params, &Patch::Merge(agent_fields('B'))).await?;
    let controller_fields = "status.meshIP, status.peer";
    refused(
        "bob sets his meshIP",
        as_bob.patch_status("ctl-conn-b", &params, &Patch::Merge(json!({"status": {"meshIP": "10.42.0.1"}}))).await,
        controller_fields,
    );
    let peer = json!({"status": {"peer": {"publicKey": format!("{}A=", "B".repeat(42)), "endpoint": "192.168.77.200:51820",
        "allowedIPs": ["10.42.0.0/16"]}}});
    refused(
        "bob sets his peer entry",
        as_bob.patch_status("ctl-conn-b", &params, &Patch::Merge(peer)).await,
        controller_fields,
    );
    // Nor may anyone take over an administrator's MeshNode.
    Api::<MeshNode>::all(cluster.client.clone())
        .create(&PostParams::default(), &connect_node("ctl-conn-admins", None)?)
        .await?;
    let adopt = Patch::Merge(json!({"metadata": {"annotations": {mesh_api::CONNECT_OWNER_ANNOTATION: "bob"}}}));
    refused(
        "bob adopts an administrator's MeshNode",
        as_bob.patch("ctl-conn-admins", &params, &adopt).await,
        "is not a connected user's",
    );

    // alice exposes only in connect.exposeNamespaces: elsewhere RBAC refuses.
    let elsewhere: Api<MeshService> = Api::namespaced(alice.clone(), "ctl-connect-elsewhere");
    refused(
        "alice exposes outside connect.exposeNamespaces",
        elsewhere.create(&PostParams::default(), &connect_service("ctl-conn-web", "ctl-conn-a", Some("alice"))?).await,
        "cannot create resource \"meshservices\"",
    );

    // alice's objects are as she left them, and she can end her session herself.
    let node = Api::<MeshNode>::all(cluster.client.clone()).get("ctl-conn-a").await?;
    assert_eq!(node.spec.endpoint, None);
    assert_eq!(node.status.and_then(|s| s.public_key), Some(format!("{}=", "A".repeat(43))));
    alice_services.delete("ctl-conn-web", &DeleteParams::default()).await?;
    Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(alice.clone(), RELEASE_NAMESPACE)
        .delete(&lease, &DeleteParams::default())
        .await?;
    as_alice.delete("ctl-conn-a", &DeleteParams::default()).await?;
    remove_connect_objects(&cluster).await
}
