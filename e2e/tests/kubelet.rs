//! The lab in kubelet mode (`lab.sh up --mode kubelet`): real kubelets and containerd run the
//! chart's controller Deployment and agent DaemonSet as pods, and a selector-backed
//! MeshService in front of a real pod on the pod network is reachable from another node by
//! mesh IP and by name.
//!
//! Needs the lab in kubelet mode, so it is built only with the `kubelet-lab` feature; `make
//! test` brings that lab up after the plain-mode suite and runs this file (with the mesh,
//! discovery, meshctl and enroll suites) against it: `make kubelet-e2e`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use harness_mesh_e2e::controller::service;
use harness_mesh_e2e::mesh::{Mesh, eventually, eventually_async, wait_mesh_ip};
use harness_mesh_e2e::{lab_image, lab_mode};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use mesh_api::{Backend, MeshNode, MeshService};
use serde_json::json;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const CONVERGE: Duration = Duration::from_secs(90);
const CHART_NAMESPACE: &str = "harness-mesh";
const NAMESPACE: &str = "default";
/// The suite's MeshService, and the `app` label of its pods (names no other suite uses).
const WEB: &str = "kubelet-e2e-web";

async fn mesh() -> anyhow::Result<Mesh> {
    let mesh = Mesh::get(CONVERGE).await?;
    ensure!(
        lab_mode().as_deref() == Some("kubelet"),
        "these tests need the lab in kubelet mode: e2e/lab/lab.sh down, then make kubelet-e2e"
    );
    Ok(mesh)
}

/// A pod on `node`'s pod network that serves HTTP with `body` on port 8080, and on port 9090
/// too (a port the MeshService does not list).
fn web_pod(name: &str, node: &str, body: &str) -> anyhow::Result<Pod> {
    let script = format!(
        "mkdir -p /tmp/www && echo {body} > /tmp/www/index.html && \
         /bin/busybox httpd -p 9090 -h /tmp/www && exec /bin/busybox httpd -f -p 8080 -h /tmp/www"
    );
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": WEB}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "web",
                "image": lab_image("busybox")?,
                "imagePullPolicy": "Never",
                "command": ["/bin/busybox", "sh", "-c", script],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
            }],
        },
    }))?)
}

async fn delete_pod(pods: &Api<Pod>, name: &str) -> anyhow::Result<()> {
    let _ = pods.delete(name, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await;
    eventually_async(Duration::from_secs(60), || async {
        ensure!(pods.get_opt(name).await?.is_none(), "pod {name} still exists");
        Ok(())
    })
    .await
}

/// Waits until pod `name` is Ready and returns its pod IP.
async fn ready_pod_ip(pods: &Api<Pod>, name: &str) -> anyhow::Result<Ipv4Addr> {
    eventually_async(CONVERGE, || async {
        let status = pods.get(name).await?.status.unwrap_or_default();
        let ready = status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
        match (ready, status.pod_ip) {
            (true, Some(ip)) => Ok(ip.parse()?),
            _ => bail!("pod {name} is not Ready with a pod IP: phase {:?}", status.phase),
        }
    })
    .await
}

/// `curl` from `node` to `http://ip:port/`: the body, or `None` when nothing answered in 2 s.
fn http_get(mesh: &Mesh, node: &str, ip: Ipv4Addr, port: u16) -> anyhow::Result<Option<String>> {
    let url = format!("http://{ip}:{port}/");
    let out = mesh.nodes.exec(node, &["curl", "-sS", "--noproxy", "*", "--max-time", "2", &url])?;
    Ok(out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

#[tokio::test]
async fn the_chart_runs_as_pods_and_every_node_joins_the_mesh() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = mesh().await?;
    let client = mesh.cluster.client.clone();
    let registered: Vec<String> = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    // The suite's nodes, the lab's: the cluster may have other Nodes (made by other tests, with
    // no kubelet behind them), which this test does not judge.
    let nodes = mesh.nodes.names.clone();
    for node in &nodes {
        ensure!(
            registered.contains(node),
            "kubelet mode registers every lab node as a Node: no {node} in {registered:?}"
        );
    }

    // One agent pod on each of the suite's nodes, Ready, and the controller's replicas ready.
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), CHART_NAMESPACE);
    let agents = daemonsets.get("harness-mesh-agent").await?.status.context("DaemonSet status")?;
    ensure!(
        agents.desired_number_scheduled as usize >= nodes.len() && agents.number_ready as usize >= nodes.len(),
        "agent DaemonSet: {} desired, {} ready, for the {} nodes {nodes:?}",
        agents.desired_number_scheduled,
        agents.number_ready,
        nodes.len()
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), CHART_NAMESPACE);
    let agent_pods = pods.list(&ListParams::default().labels("app.kubernetes.io/component=agent")).await?;
    for node in &nodes {
        let on: Vec<&Pod> = agent_pods
            .items
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()) == Some(node))
            .collect();
        ensure!(on.len() == 1, "{} agent pods on {node}, want one", on.len());
        let ready = on[0]
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        ensure!(ready, "the agent pod {:?} on {node} is not Ready", on[0].metadata.name);
    }
    let controller = Api::<Deployment>::namespaced(client.clone(), CHART_NAMESPACE)
        .get("harness-mesh-controller")
        .await?
        .status
        .context("Deployment status")?;
    ensure!(controller.ready_replicas.unwrap_or(0) >= 1, "no controller replica is ready: {controller:?}");

    // The controller mirrored every Node into a MeshNode, and each agent (a pod) made it Ready
    // with userspace WireGuard.
    let mesh_nodes: BTreeMap<String, MeshNode> = Api::<MeshNode>::all(client)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|n| (n.metadata.name.clone().unwrap_or_default(), n))
        .collect();
    for node in &nodes {
        let status =
            mesh_nodes.get(node).and_then(|n| n.status.clone()).with_context(|| format!("no MeshNode {node}"))?;
        let ready = status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
        ensure!(ready, "MeshNode {node} is not Ready: {:?}", status.conditions);
        ensure!(status.backend == Some(Backend::Userspace), "MeshNode {node} backend is {:?}", status.backend);
    }
    mesh.wait_connected(CONVERGE).await?;
    Ok(())
}

#[tokio::test]
async fn a_selector_service_in_front_of_a_pod_network_pod_is_reachable_by_ip_and_name() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = mesh().await?;
    let [host, client] = [0, 1].map(|i| mesh.nodes.names[i].clone());
    let pods: Api<Pod> = Api::namespaced(mesh.cluster.client.clone(), NAMESPACE);
    let services: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), NAMESPACE);
    for name in ["kubelet-e2e-web-a", "kubelet-e2e-web-b"] {
        delete_pod(&pods, name).await?;
    }
    let _ = services.delete(WEB, &DeleteParams::default()).await;
    eventually_async(Duration::from_secs(30), || async {
        ensure!(services.get_opt(WEB).await?.is_none(), "old MeshService {WEB} still exists");
        Ok(())
    })
    .await?;

    pods.create(&PostParams::default(), &web_pod("kubelet-e2e-web-a", &host, "hello-from-pod-a")?).await?;
    let pod_ip = ready_pod_ip(&pods, "kubelet-e2e-web-a").await?;
    services
        .create(
            &PostParams::default(),
            &service(WEB, json!({"selector": {"app": WEB}, "network": {"type": "mesh", "ports": [8080]}})),
        )
        .await?;
    let ip = wait_mesh_ip(&services, WEB).await?;
    eventually_async(CONVERGE, || async {
        let status = services.get(WEB).await?.status.unwrap_or_default();
        ensure!(
            status.node.as_deref() == Some(host.as_str()) && status.pod_ip == Some(pod_ip.to_string()),
            "status says node {:?}, pod IP {:?}; want {host}, {pod_ip}",
            status.node,
            status.pod_ip
        );
        Ok(())
    })
    .await?;

    // From the other node, over WireGuard: the listed port reaches the pod, by IP and by name.
    let took = eventually(CONVERGE, || match http_get(&mesh, &client, ip, 8080)? {
        Some(body) if body == "hello-from-pod-a" => Ok(()),
        other => bail!("{client} -> {ip}:8080 gave {other:?}"),
    })
    .await?;
    println!("pod-backed service reachable from {client} at {ip}:8080 after {took:?}");
    let info = mesh.info().await?;
    let dns = info[&client].mesh_ip;
    let fqdn = format!("{WEB}.{NAMESPACE}.mesh.local");
    eventually(CONVERGE, || {
        let answer = mesh.dig(&client, dns, &fqdn, false)?;
        ensure!(answer.addresses == [ip], "{client}'s agent resolves {fqdn} to {answer:?}");
        Ok(())
    })
    .await?;

    // A port the service does not list is closed on the mesh IP, although the pod serves it
    // (reached directly on the pod network, it answers).
    ensure!(
        http_get(&mesh, &client, pod_ip, 9090)?.as_deref() == Some("hello-from-pod-a"),
        "the pod should serve port 9090 on its own IP"
    );
    ensure!(http_get(&mesh, &client, ip, 9090)?.is_none(), "port 9090 is not listed, yet {ip}:9090 answered");

    // The pod goes, another (on the other node, with another IP) takes over: the service follows.
    pods.create(&PostParams::default(), &web_pod("kubelet-e2e-web-b", &client, "hello-from-pod-b")?).await?;
    let new_ip = ready_pod_ip(&pods, "kubelet-e2e-web-b").await?;
    delete_pod(&pods, "kubelet-e2e-web-a").await?;
    let took = eventually(CONVERGE, || match http_get(&mesh, &host, ip, 8080)? {
        Some(body) if body == "hello-from-pod-b" => Ok(()),
        other => bail!("{host} -> {ip}:8080 gave {other:?} (want the new pod {new_ip})"),
    })
    .await?;
    println!("after the pod moved to {client} ({new_ip}), {host} reached it at {ip} in {took:?}");
    let status = services.get(WEB).await?.status.unwrap_or_default();
    ensure!(status.pod_ip == Some(new_ip.to_string()), "status.podIP is {:?}, want {new_ip}", status.pod_ip);

    delete_pod(&pods, "kubelet-e2e-web-b").await?;
    services.delete(WEB, &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test]
async fn kubectl_logs_and_exec_reach_the_kubelets() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = mesh().await?;
    // The agent pod on one of the suite's nodes (a Node of someone else's may have one that
    // never runs).
    let on_node = format!("spec.nodeName={}", mesh.nodes.names[0]);
    let agent = mesh.cluster.kubectl_ok(&[
        "-n",
        CHART_NAMESPACE,
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/component=agent",
        "--field-selector",
        &on_node,
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ])?;
    let logs = mesh.cluster.kubectl_ok(&["-n", CHART_NAMESPACE, "logs", agent.trim(), "--tail=200"])?;
    ensure!(
        logs.contains("WireGuard device ready"),
        "the agent's log (through the kubelet) lacks its start line:\n{logs}"
    );
    let out =
        mesh.cluster.kubectl_ok(&["-n", CHART_NAMESPACE, "exec", agent.trim(), "--", "wg", "show", "wg-harness"])?;
    ensure!(out.contains("peer:"), "wg show in the agent pod (kubectl exec) lists no peer:\n{out}");
    Ok(())
}
