//! Laptop mode end to end (issue 19): `meshctl connect`, `forward` and `expose` run as an
//! unprivileged uid with no tun device and no CAP_NET_ADMIN, on a machine that reaches only
//! the lab's underlay, with the kubeconfig of a user in the group `harness-mesh:connect` (a
//! client certificate of the lab's CA: [`harness_mesh_e2e::users`]), so the chart's RBAC and
//! admission policy are what let it in.
//!
//! The "laptop" is the lab's SSH node `hm-node-202` (`lab.sh ssh-node 202`): a network namespace
//! on the lab bridge with no agent and no MeshNode, the API server through a relay on its
//! 127.0.0.1, and the unprivileged user `hm-user`. Each meshctl runs there under `setpriv`
//! (every capability dropped, no new privileges) in a mount namespace where `/dev/net` is an
//! empty tmpfs; [`the_laptop_has_no_root_no_tun_and_no_net_admin`] checks those conditions.
//!
//! - forward and SOCKS5 reach a `mesh` service on hm-node-2, on its listed port only;
//! - expose is reached by name from hm-node-1, on its port only, and a clean exit (SIGTERM)
//!   leaves nothing: MeshNode, Lease, MeshService and every node's peer;
//! - `kill -9` leaves nothing after the bound (Lease 30 s + grace 15 s + sweep 5 s);
//! - a second user is refused on the first one's objects.
//!
//! The tests share the laptop node, so they take turns. Everything is bounded and cleaned up.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use harness_mesh_e2e::controller::service;
use harness_mesh_e2e::laptop::{LAPTOP, Meshctl, as_user, fetch_local, laptop_node_up};
use harness_mesh_e2e::mesh::{Mesh, eventually, eventually_async, wait_mesh_ip};
use harness_mesh_e2e::users::{CONNECT_GROUP, LabUser, server_of};
use harness_mesh_e2e::{meshctl_binary, repo_root};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use mesh_api::{MeshNode, MeshService};
use serde_json::json;
use tokio::sync::Mutex;

const CONVERGE: Duration = Duration::from_secs(90);
/// How long a killed member may stay: Lease 30 s + grace 15 s + the controller's 5 s sweep, and
/// a few seconds for the agents to drop the peer.
const FORGOTTEN_WITHIN: Duration = Duration::from_secs(60);

static SERIAL: Mutex<()> = Mutex::const_new(());

/// The laptop node up, and users in the connect group (kubeconfigs for the laptop's relay).
async fn setup(mesh: &Mesh) -> anyhow::Result<(LabUser, LabUser)> {
    tokio::task::spawn_blocking(laptop_node_up).await??;
    let _ = mesh;
    let dir = repo_root().join("target/e2e-laptop");
    let server = admin_server()?;
    let alice = LabUser::new("alice", &[CONNECT_GROUP], &server, &dir)?;
    let bob = LabUser::new("bob", &[CONNECT_GROUP], &server, &dir)?;
    Ok((alice, bob))
}

/// The API server URL of the admin kubeconfig (`https://127.0.0.1:<port>`, which the laptop
/// node reaches through its relay too).
fn admin_server() -> anyhow::Result<String> {
    server_of(&repo_root().join(".lab/kubeconfig"))
}

/// What `curl --socks5-hostname` through the laptop's proxy reads from `host:port`.
fn fetch_socks(mesh: &Mesh, proxy: u16, host: &str, port: u16) -> anyhow::Result<Option<String>> {
    let out = mesh.nodes.exec(
        LAPTOP,
        &[
            "curl",
            "-s",
            "-m",
            "5",
            "--socks5-hostname",
            &format!("127.0.0.1:{proxy}"),
            &format!("telnet://{host}:{port}"),
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok((!text.is_empty()).then_some(text))
}

/// Whether the MeshNode, its Lease and the MeshService `service` (if given) are all gone.
async fn gone(mesh: &Mesh, node: &str, service: Option<(&str, &str)>) -> anyhow::Result<Vec<String>> {
    let client = mesh.cluster.client.clone();
    let mut left = Vec::new();
    if Api::<MeshNode>::all(client.clone()).get_opt(node).await?.is_some() {
        left.push(format!("MeshNode {node}"));
    }
    let lease = mesh_api::agent_lease_name(node);
    if Api::<Lease>::namespaced(client.clone(), "harness-mesh").get_opt(&lease).await?.is_some() {
        left.push(format!("Lease {lease}"));
    }
    if let Some((namespace, name)) = service
        && Api::<MeshService>::namespaced(client, namespace).get_opt(name).await?.is_some()
    {
        left.push(format!("MeshService {namespace}/{name}"));
    }
    Ok(left)
}

/// The mesh IP of the MeshService `default/name`, once meshctl has created it and the
/// controller allocated one.
async fn exposed_ip(mesh: &Mesh, name: &str, member: &Meshctl) -> anyhow::Result<std::net::Ipv4Addr> {
    let services: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    eventually_async(Duration::from_secs(60), || async {
        let service =
            services.get_opt(name).await?.with_context(|| format!("no MeshService {name} yet: {}", member.output()))?;
        let ip = service.status.and_then(|s| s.mesh_ip).with_context(|| format!("{name} has no mesh IP yet"))?;
        Ok(ip.parse()?)
    })
    .await
}

/// The laptop's public key, once published.
async fn public_key(mesh: &Mesh, node: &str) -> anyhow::Result<String> {
    let nodes: Api<MeshNode> = Api::all(mesh.cluster.client.clone());
    eventually_async(CONVERGE, || async {
        nodes.get(node).await?.status.and_then(|s| s.public_key).context("no public key yet")
    })
    .await
}

#[tokio::test]
async fn the_laptop_has_no_root_no_tun_and_no_net_admin() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    setup(&mesh).await?;
    let out =
        as_user(&["sh", "-c", "id -u; test -e /dev/net/tun && echo tun; ip link add hmtest type dummy 2>&1 || true"])
            .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let uid = text.lines().next().unwrap_or_default();
    ensure!(uid != "0" && !uid.is_empty(), "meshctl would run as uid {uid:?}: {text}");
    ensure!(!text.contains("\ntun"), "the laptop has /dev/net/tun: {text}");
    ensure!(text.contains("Operation not permitted"), "the laptop's user may add links (CAP_NET_ADMIN?): {text}");
    let routes = mesh.nodes.exec_ok(LAPTOP, &["ip", "-4", "route"])?;
    ensure!(!routes.contains("default"), "the laptop has a default route, so more than the underlay: {routes}");
    Ok(())
}

#[tokio::test]
async fn forward_and_socks5_reach_a_mesh_service_on_its_listed_port_only() -> anyhow::Result<()> {
    const NAME: &str = "laptop-target";
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let (alice, _) = setup(&mesh).await?;
    let node2 = mesh.nodes.names[1].clone();
    let services: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    let _ = services.delete(NAME, &DeleteParams::default()).await;
    let mut listed = mesh.serve_tcp(&node2, 18511, "laptop-listed")?;
    let mut unlisted = mesh.serve_tcp(&node2, 18512, "laptop-unlisted")?;
    let result = async {
        let spec = json!({"node": node2, "network": {"type": "mesh", "ports": [18511]}});
        services.create(&PostParams::default(), &service(NAME, spec)).await?;
        let ip = wait_mesh_ip(&services, NAME).await?;
        let started = Instant::now();
        let member = Meshctl::start(
            &meshctl_binary()?,
            &alice,
            &["forward", NAME, "28511:18511", "28512:18512", "--name", "laptop-fwd", "--socks5", "127.0.0.1:21080"],
        )?;
        // connect → the first byte through the forward.
        let first = eventually(Duration::from_secs(60), || {
            let got = fetch_local(&mesh, 28511)?;
            ensure!(got.as_deref() == Some("laptop-listed"), "forward 28511 gave {got:?}: {}", member.output());
            Ok(())
        })
        .await?;
        println!(
            "laptop: meshctl forward start -> first byte through the forward in {:.2}s (polled every try)",
            started.elapsed().as_secs_f64().min(first.as_secs_f64() + 0.5)
        );
        let got = fetch_local(&mesh, 28512)?;
        ensure!(got.is_none(), "the unlisted port 18512 of {NAME} ({ip}) answered through the forward: {got:?}");
        let host = format!("{NAME}.default.mesh.local");
        let got = fetch_socks(&mesh, 21080, &host, 18511)?;
        ensure!(got.as_deref() == Some("laptop-listed"), "SOCKS5 to {host}:18511 gave {got:?}: {}", member.output());
        let got = fetch_socks(&mesh, 21080, &host, 18512)?;
        ensure!(got.is_none(), "SOCKS5 reached the unlisted port {host}:18512: {got:?}");
        let got = fetch_socks(&mesh, 21080, &ip.to_string(), 18511)?;
        ensure!(got.as_deref() == Some("laptop-listed"), "SOCKS5 to the mesh IP {ip}:18511 gave {got:?}");
        if let Some(rss) = member.rss_kib() {
            println!("laptop: meshctl forward RSS {:.1} MiB with 3 peers", rss as f64 / 1024.0);
        }
        anyhow::Ok(member)
    }
    .await;
    let _ = listed.kill();
    let _ = unlisted.kill();
    let _ = services.delete(NAME, &DeleteParams::default()).await;
    let mut member = result?;
    member.signal("-TERM")?;
    member.wait(Duration::from_secs(20))?;
    Ok(())
}

#[tokio::test]
async fn an_exposed_port_is_reached_by_name_from_a_node_and_a_clean_exit_leaves_nothing() -> anyhow::Result<()> {
    const NAME: &str = "laptop-web";
    const MEMBER: &str = "laptop-exp";
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let (alice, _) = setup(&mesh).await?;
    let node1 = mesh.nodes.names[0].clone();
    let mut server = mesh.nodes.spawn(
        LAPTOP,
        &[
            "timeout",
            "90",
            "socat",
            "TCP-LISTEN:23000,bind=127.0.0.1,reuseaddr,fork",
            "SYSTEM:echo served-by-the-laptop",
        ],
    )?;
    let result = async {
        let mut member = Meshctl::start(
            &meshctl_binary()?,
            &alice,
            &["expose", "23000", "--as", NAME, "--port", "80", "--name", MEMBER],
        )?;
        let ip = exposed_ip(&mesh, NAME, &member).await?;
        let info = mesh.info().await?;
        let dns = info[&node1].mesh_ip;
        eventually(Duration::from_secs(30), || {
            let answer = mesh.dig(&node1, dns, &format!("{NAME}.default.mesh.local"), false)?;
            ensure!(answer.addresses == [ip], "{node1} resolves {NAME}.default.mesh.local to {:?}", answer.addresses);
            let got = mesh.fetch(&node1, ip, 80)?;
            ensure!(
                got.as_deref() == Some("served-by-the-laptop"),
                "{node1} -> {ip}:80 gave {got:?}: {}",
                member.output()
            );
            Ok(())
        })
        .await?;
        ensure!(mesh.fetch(&node1, ip, 81)?.is_none(), "{node1} reached port 81 of the exposed service {ip}");
        let key = public_key(&mesh, MEMBER).await?;
        member.signal("-TERM")?;
        let out = member.wait(Duration::from_secs(20))?;
        ensure!(out.contains("leaving the mesh"), "meshctl did not say it left: {out}");
        let left = gone(&mesh, MEMBER, Some(("default", NAME))).await?;
        ensure!(left.is_empty(), "a clean exit left {left:?}");
        eventually(Duration::from_secs(15), || {
            let peers = mesh.wg_peers(&node1)?;
            ensure!(!peers.contains(&key), "{node1} still has the laptop's peer {key}");
            Ok(())
        })
        .await?;
        anyhow::Ok(())
    }
    .await;
    let _ = server.kill();
    result
}

#[tokio::test]
async fn a_killed_laptop_is_forgotten_within_the_bound() -> anyhow::Result<()> {
    const MEMBER: &str = "laptop-kill";
    const NAME: &str = "laptop-killed-web";
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let (alice, _) = setup(&mesh).await?;
    let node1 = mesh.nodes.names[0].clone();
    let mut member = Meshctl::start(&meshctl_binary()?, &alice, &["expose", "23001", "--as", NAME, "--name", MEMBER])?;
    exposed_ip(&mesh, NAME, &member).await?;
    let key = public_key(&mesh, MEMBER).await?;
    eventually(Duration::from_secs(30), || {
        ensure!(mesh.wg_peers(&node1)?.contains(&key), "{node1} has not added the laptop's peer yet");
        Ok(())
    })
    .await?;
    member.signal("-KILL")?;
    member.wait(Duration::from_secs(10))?;
    let killed = Instant::now();
    let took = eventually_async(FORGOTTEN_WITHIN, || async {
        let left = gone(&mesh, MEMBER, Some(("default", NAME))).await?;
        ensure!(left.is_empty(), "after kill -9, still there: {left:?}");
        ensure!(!mesh.wg_peers(&node1)?.contains(&key), "{node1} still has the killed laptop's peer");
        Ok(killed.elapsed())
    })
    .await?;
    println!("laptop: kill -9 -> MeshNode, Lease, MeshService and peer gone in {:.1}s", took.as_secs_f64());
    Ok(())
}

#[tokio::test]
async fn a_second_user_cannot_touch_the_first_users_member() -> anyhow::Result<()> {
    const MEMBER: &str = "laptop-alice";
    const NAME: &str = "laptop-alice-web";
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let (alice, bob) = setup(&mesh).await?;
    let mut member = Meshctl::start(&meshctl_binary()?, &alice, &["expose", "23002", "--as", NAME, "--name", MEMBER])?;
    let result = async {
        exposed_ip(&mesh, NAME, &member).await?;
        let server = admin_server()?;
        let bob_client = bob.client(&server).await?;
        let refused = |what: &str, result: Result<(), kube::Error>| -> anyhow::Result<()> {
            match result {
                Err(kube::Error::Api(e)) if e.code == 403 || e.code == 422 => Ok(()),
                other => anyhow::bail!("bob {what}: expected a refusal, got {other:?}"),
            }
        };
        let nodes: Api<MeshNode> = Api::all(bob_client.clone());
        refused("deleting alice's MeshNode", nodes.delete(MEMBER, &DeleteParams::default()).await.map(|_| ()))?;
        let patch = json!({"status": {"endpoint": "192.168.77.99:51820"}});
        refused(
            "rewriting alice's endpoint",
            nodes.patch_status(MEMBER, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ()),
        )?;
        let bob_services: Api<MeshService> = Api::namespaced(bob_client.clone(), "default");
        refused("deleting alice's MeshService", bob_services.delete(NAME, &DeleteParams::default()).await.map(|_| ()))?;
        let leases: Api<Lease> = Api::namespaced(bob_client, "harness-mesh");
        let renew = json!({"spec": {"holderIdentity": "bob"}});
        let lease = mesh_api::agent_lease_name(MEMBER);
        refused(
            "taking alice's Lease",
            leases.patch(&lease, &PatchParams::default(), &Patch::Merge(&renew)).await.map(|_| ()),
        )?;
        // And through meshctl: the name is taken, and says by whom.
        let mut other = Meshctl::start(&meshctl_binary()?, &bob, &["connect", "--name", MEMBER])?;
        let out = other.wait(Duration::from_secs(30))?;
        ensure!(out.contains(&format!("MeshNode {MEMBER} exists, made by meshctl connect for alice")), "{out}");
        ensure!(!gone(&mesh, MEMBER, None).await?.is_empty(), "bob's failed connect removed alice's member");
        anyhow::Ok(())
    }
    .await;
    member.signal("-TERM")?;
    let _ = member.wait(Duration::from_secs(20));
    result
}
