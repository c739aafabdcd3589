//! Containers as backends (`spec.container`), with a real engine: Podman's Docker-compatible API
//! service on one lab node (`e2e/lab/lab.sh podman start`), images built locally with buildah.
//!
//! - a container service is reachable from every other node by mesh IP and by name, on its
//!   mapped port only;
//! - two containers that use the same port on one node get two mesh IPs, and both work;
//! - a container that stops makes its service not Ready and unreachable; started again with a
//!   new address, the service follows it (from the engine's events);
//! - a service asking for a container on a node without an engine says so, on the service and
//!   on the node.
//!
//! Lab only (it drives the lab's engine). Tests run one at a time: they share the engine.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use harness_mesh_e2e::controller::{delete_service_and_wait, service};
use harness_mesh_e2e::lab_sh;
use harness_mesh_e2e::mesh::{Mesh, eventually, eventually_async, wait_mesh_ip};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};
use mesh_api::{MeshNode, MeshService};
use serde_json::json;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CONVERGE: Duration = Duration::from_secs(90);
/// The lab's image (`lab.sh podman start` builds it on the node).
const IMAGE: &str = "localhost/hm-busybox:lab";
/// The port on the mesh IP.
const MESH_PORT: u16 = 8000;
/// The container's own port, which `MESH_PORT` maps to.
const CONTAINER_PORT: u16 = 80;

/// Runs `podman ARGS` on lab node `node`, against the engine the agent follows.
fn podman(node: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["podman", node, "--"];
    all.extend_from_slice(args);
    lab_sh(&all)
}

/// Starts container `name` on `node`: busybox httpd on its port 80, answering with its name.
fn run_web(node: &str, name: &str) -> anyhow::Result<()> {
    let script = format!("echo {name} > /www/index.html; exec httpd -f -p {CONTAINER_PORT} -h /www");
    podman(node, &["run", "-d", "--name", name, IMAGE, "sh", "-c", &script])?;
    Ok(())
}

/// The container's address in the engine's default network.
fn container_ip(node: &str, name: &str) -> anyhow::Result<Ipv4Addr> {
    let text = podman(node, &["inspect", "--format", "{{.NetworkSettings.IPAddress}}", name])?;
    text.trim().parse().with_context(|| format!("container {name}'s address: {text:?}"))
}

/// `curl http://HOST:PORT/` on `node`: the body, or `None` when nothing answered within 3 s.
fn curl(mesh: &Mesh, node: &str, host: &str, port: u16) -> anyhow::Result<Option<String>> {
    let url = format!("http://{host}:{port}/");
    let out = mesh.nodes.exec(node, &["curl", "-sS", "--noproxy", "*", "--max-time", "3", &url])?;
    let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok((out.status.success() && !body.is_empty()).then_some(body))
}

/// A mesh service backed by container `container` on `node`, port 8000 mapped to 80.
fn container_service(name: &str, node: &str, container: &str) -> MeshService {
    service(
        name,
        json!({"node": node, "container": {"name": container},
            "network": {"type": "mesh", "ports": [MESH_PORT], "targetPorts": [{"port": MESH_PORT, "targetPort": CONTAINER_PORT}]}}),
    )
}

/// The service's Ready condition as (status, reason, message).
async fn ready(api: &Api<MeshService>, name: &str) -> anyhow::Result<(String, String, String)> {
    let service = api.get(name).await?;
    let conditions = service.status.map(|s| s.conditions).unwrap_or_default();
    let ready = conditions.into_iter().find(|c| c.type_ == "Ready").context("no Ready condition yet")?;
    Ok((ready.status, ready.reason, ready.message))
}

/// Waits until the service's Ready condition has `status` and `reason`; returns its message.
async fn wait_ready(api: &Api<MeshService>, name: &str, status: &str, reason: &str) -> anyhow::Result<String> {
    eventually_async(CONVERGE, || async {
        let (s, r, message) = ready(api, name).await?;
        if s == status && r == reason {
            Ok(message)
        } else {
            bail!("{name} is Ready={s} ({r}: {message}), waiting for Ready={status} ({reason})")
        }
    })
    .await
}

/// Waits until every node but `host` gets `expect` from `ip:MESH_PORT`; returns how long it took.
async fn wait_reachable(mesh: &Mesh, host: &str, ip: Ipv4Addr, expect: &str) -> anyhow::Result<Duration> {
    let start = Instant::now();
    for node in mesh.nodes.names.iter().filter(|n| *n != host) {
        eventually(CONVERGE, || match curl(mesh, node, &ip.to_string(), MESH_PORT)? {
            Some(body) if body == expect => Ok(()),
            other => bail!("{node} -> {ip}:{MESH_PORT} answered {other:?}, not {expect:?}"),
        })
        .await?;
    }
    Ok(start.elapsed())
}

/// The suite's engine node (the second node), with its engine started, and the suite's own
/// services and containers removed.
async fn setup(mesh: &Mesh, api: &Api<MeshService>, names: &[&str]) -> anyhow::Result<String> {
    let host = mesh.nodes.names[1].clone();
    lab_sh(&["podman", "start", &host])?;
    for name in names {
        delete_service_and_wait(api, name).await?;
        podman(&host, &["rm", "-f", "--ignore", name])?;
    }
    Ok(host)
}

#[tokio::test]
async fn a_container_is_reachable_by_ip_and_name_on_its_mapped_port_only() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let api: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    let (a, b) = ("ct-e2e-a", "ct-e2e-b");
    let host = setup(&mesh, &api, &[a, b]).await?;

    // The services come first: their containers do not run yet.
    api.create(&PostParams::default(), &container_service(a, &host, a)).await?;
    api.create(&PostParams::default(), &container_service(b, &host, b)).await?;
    let message = wait_ready(&api, a, "False", "ContainerNotFound").await?;
    assert!(message.contains(&format!("no container named {a}")), "{message}");
    let ip_a = wait_mesh_ip(&api, a).await?;
    let ip_b = wait_mesh_ip(&api, b).await?;
    assert_ne!(ip_a, ip_b, "two containers, two mesh IPs");

    // Start → reachable from every other node, through the engine's events.
    let started = Instant::now();
    run_web(&host, a)?;
    let run_took = started.elapsed();
    wait_reachable(&mesh, &host, ip_a, a).await?;
    println!(
        "[containers] container start -> reachable from every other node: {:.2} s (podman run itself: {:.2} s)",
        started.elapsed().as_secs_f64(),
        run_took.as_secs_f64()
    );
    let message = wait_ready(&api, a, "True", "Hosted").await?;
    let address = container_ip(&host, a)?;
    assert!(message.contains(&format!("forwarded to container {a} at {address}")), "{message}");

    // The second container listens on the same port 80, behind its own mesh IP.
    run_web(&host, b)?;
    wait_reachable(&mesh, &host, ip_b, b).await?;
    wait_reachable(&mesh, &host, ip_a, a).await?;

    // By name, through each node's resolver.
    let dns_name = api.get(a).await?.status.and_then(|s| s.dns_name).context("no dnsName")?;
    let client = mesh.nodes.names[0].clone();
    eventually(CONVERGE, || match curl(&mesh, &client, &dns_name, MESH_PORT)? {
        Some(body) if body == a => Ok(()),
        other => bail!("{client} -> {dns_name}:{MESH_PORT} answered {other:?}"),
    })
    .await?;

    // Only the mapped port: the container's own port is closed on the mesh IP.
    for node in mesh.nodes.names.iter().filter(|n| **n != host) {
        assert_eq!(curl(&mesh, node, &ip_a.to_string(), CONTAINER_PORT)?, None, "{node} reached {ip_a}:80");
    }

    // The node reports what it found, and says which engine.
    let nodes: Api<MeshNode> = Api::all(mesh.cluster.client.clone());
    let node = nodes.get(&host).await?;
    let status = node.status.context("no MeshNode status")?;
    let entry = status.containers.iter().find(|c| c.service == format!("default/{a}")).context("no report")?;
    assert!(entry.ready && entry.ip.as_deref() == Some(address.to_string().as_str()), "{entry:?}");
    let engine = status.conditions.iter().find(|c| c.type_ == "ContainerEngine").context("no ContainerEngine")?;
    assert_eq!(engine.status, "True", "{engine:?}");

    for name in [a, b] {
        delete_service_and_wait(&api, name).await?;
        podman(&host, &["rm", "-f", name])?;
    }
    Ok(())
}

#[tokio::test]
async fn a_stopped_container_makes_the_service_not_ready_and_a_new_address_is_followed() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let api: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    let (web, filler) = ("ct-e2e-moving", "ct-e2e-filler");
    let host = setup(&mesh, &api, &[web, filler]).await?;

    run_web(&host, web)?;
    api.create(&PostParams::default(), &container_service(web, &host, web)).await?;
    let ip = wait_mesh_ip(&api, web).await?;
    wait_reachable(&mesh, &host, ip, web).await?;
    let before = container_ip(&host, web)?;

    // Stopped: not Ready, says why, and the mesh IP no longer answers.
    let stopped_at = k8s_openapi::jiff::Timestamp::now();
    podman(&host, &["stop", "-t", "1", web])?;
    let message = wait_ready(&api, web, "False", "ContainerNotRunning").await?;
    assert!(message.contains(&format!("container {web} is")), "{message}");
    // An event too, not only a condition.
    let events: Api<Event> = Api::namespaced(mesh.cluster.client.clone(), "default");
    eventually_async(CONVERGE, || async {
        let all = events.list(&ListParams::default()).await?;
        all.items
            .iter()
            .find(|e| {
                // This run's (the lab may keep an earlier run's event, or a series of them).
                let last = e.series.as_ref().map(|s| &s.last_observed_time).or(e.event_time.as_ref());
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(web)
                    && e.reason.as_deref() == Some("ContainerNotRunning")
                    && last.is_some_and(|t| t.0 >= stopped_at)
            })
            .map(|_| ())
            .with_context(|| format!("no ContainerNotRunning event about MeshService {web}"))
    })
    .await?;
    let client = mesh.nodes.names[0].clone();
    eventually(CONVERGE, || match curl(&mesh, &client, &ip.to_string(), MESH_PORT)? {
        None => Ok(()),
        Some(body) => bail!("{client} still gets {body:?} from the stopped container's service"),
    })
    .await?;

    // Another container takes its old address meanwhile, so it comes back at a new one.
    run_web(&host, filler)?;
    let restarted = Instant::now();
    podman(&host, &["start", web])?;
    let after = container_ip(&host, web)?;
    assert_ne!(before, after, "the container came back at its old address; the test needs a new one");
    let took = wait_reachable(&mesh, &host, ip, web).await?;
    println!(
        "[containers] restart at a new address ({before} -> {after}) -> reachable again: {:.2} s",
        restarted.elapsed().as_secs_f64().max(took.as_secs_f64())
    );
    let message = wait_ready(&api, web, "True", "Hosted").await?;
    assert!(message.contains(&after.to_string()), "{message}");

    delete_service_and_wait(&api, web).await?;
    podman(&host, &["rm", "-f", web, filler])?;
    Ok(())
}

#[tokio::test]
async fn a_node_without_an_engine_says_so() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let api: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    let name = "ct-e2e-engineless";
    delete_service_and_wait(&api, name).await?;
    // The third node runs no engine (the suite starts one on the second only).
    let bare = mesh.nodes.names[2].clone();
    api.create(&PostParams::default(), &container_service(name, &bare, "web")).await?;
    let message = wait_ready(&api, name, "False", "NoContainerEngine").await?;
    assert!(message.contains("no container engine socket"), "{message}");
    let nodes: Api<MeshNode> = Api::all(mesh.cluster.client.clone());
    let condition = eventually_async(CONVERGE, || async {
        let node = nodes.get(&bare).await?;
        let conditions = node.status.map(|s| s.conditions).unwrap_or_default();
        conditions.into_iter().find(|c| c.type_ == "ContainerEngine").context("no ContainerEngine condition yet")
    })
    .await?;
    assert_eq!((condition.status.as_str(), condition.reason.as_str()), ("False", "NoEngine"), "{condition:?}");

    // Once no service asks for a container there, the node says nothing about engines.
    delete_service_and_wait(&api, name).await?;
    eventually_async(CONVERGE, || async {
        let node = nodes.get(&bare).await?;
        let conditions = node.status.map(|s| s.conditions).unwrap_or_default();
        match conditions.iter().find(|c| c.type_ == "ContainerEngine") {
            None => Ok(()),
            Some(c) => bail!("{bare} still says {c:?}"),
        }
    })
    .await?;
    Ok(())
}
