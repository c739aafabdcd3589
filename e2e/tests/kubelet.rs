//! The lab in kubelet mode (`lab.sh up --mode kubelet`): real kubelets and containerd run the
//! chart's controller Deployment and agent DaemonSet as pods, and a selector-backed
//! MeshService in front of a real pod on the pod network is reachable from another node by
//! mesh IP and by name.
//!
//! Needs the lab in kubelet mode, so it is built only with the `kubelet-lab` feature; `make
//! test` brings that lab up after the plain-mode suite and runs this file (with the mesh,
//! discovery, meshctl and enroll suites) against it: `make kubelet-e2e`.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use harness_mesh_e2e::controller::service;
use harness_mesh_e2e::lab_image;
use harness_mesh_e2e::mesh::{Mesh, Pinger, delete_pod_and_wait, eventually, eventually_async, wait_mesh_ip};
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
    Mesh::get_kubelet(CONVERGE).await
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
        delete_pod_and_wait(&pods, name).await?;
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
    delete_pod_and_wait(&pods, "kubelet-e2e-web-a").await?;
    let took = eventually(CONVERGE, || match http_get(&mesh, &host, ip, 8080)? {
        Some(body) if body == "hello-from-pod-b" => Ok(()),
        other => bail!("{host} -> {ip}:8080 gave {other:?} (want the new pod {new_ip})"),
    })
    .await?;
    println!("after the pod moved to {client} ({new_ip}), {host} reached it at {ip} in {took:?}");
    let status = services.get(WEB).await?.status.unwrap_or_default();
    ensure!(status.pod_ip == Some(new_ip.to_string()), "status.podIP is {:?}, want {new_ip}", status.pod_ip);

    delete_pod_and_wait(&pods, "kubelet-e2e-web-b").await?;
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

/// A pod on `node`'s pod network that only sleeps: a client to `kubectl exec` into.
fn client_pod(name: &str, node: &str) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": format!("{WEB}-client")}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "client",
                "image": lab_image("busybox")?,
                "imagePullPolicy": "Never",
                "command": ["/bin/busybox", "sleep", "3600"],
            }],
        },
    }))?)
}

/// Runs a busybox shell command in pod `name`; returns (success, stdout + stderr).
fn in_pod(mesh: &Mesh, name: &str, script: &str) -> anyhow::Result<(bool, String)> {
    let out = mesh.cluster.kubectl(&["-n", NAMESPACE, "exec", name, "--", "/bin/busybox", "sh", "-c", script])?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

/// Seconds of busybox `time`'s `real` line (`real\t0m 0.03s`).
fn busybox_real_seconds(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.trim_start().starts_with("real"))?;
    let value = line.trim_start().strip_prefix("real")?.trim();
    let (minutes, seconds) = value.split_once('m')?;
    Some(minutes.trim().parse::<f64>().ok()? * 60.0 + seconds.trim().trim_end_matches('s').parse::<f64>().ok()?)
}

/// A MeshService `name` (port 8080 only) in front of a web pod on `host`; returns its mesh IP
/// once `from` reaches it.
async fn pod_backed_service(mesh: &Mesh, name: &str, host: &str, from: &str, body: &str) -> anyhow::Result<Ipv4Addr> {
    let pods: Api<Pod> = Api::namespaced(mesh.cluster.client.clone(), NAMESPACE);
    let services: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), NAMESPACE);
    delete_pod_and_wait(&pods, name).await?;
    let _ = services.delete(name, &DeleteParams::default()).await;
    eventually_async(Duration::from_secs(30), || async {
        ensure!(services.get_opt(name).await?.is_none(), "old MeshService {name} still exists");
        Ok(())
    })
    .await?;
    let mut pod = web_pod(name, host, body)?;
    pod.metadata.labels = Some(BTreeMap::from([("app".to_owned(), name.to_owned())]));
    pods.create(&PostParams::default(), &pod).await?;
    ready_pod_ip(&pods, name).await?;
    services
        .create(
            &PostParams::default(),
            &service(name, json!({"selector": {"app": name}, "network": {"type": "mesh", "ports": [8080]}})),
        )
        .await?;
    let ip = wait_mesh_ip(&services, name).await?;
    eventually(CONVERGE, || match http_get(mesh, from, ip, 8080)? {
        Some(answer) if answer == body => Ok(()),
        other => bail!("{from} -> {name} at {ip}:8080 gave {other:?}"),
    })
    .await?;
    Ok(ip)
}

async fn remove_service_and_pod(mesh: &Mesh, name: &str) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(mesh.cluster.client.clone(), NAMESPACE);
    let services: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), NAMESPACE);
    let _ = services.delete(name, &DeleteParams::default()).await;
    delete_pod_and_wait(&pods, name).await
}

/// Stops every pinger and fails, naming each, when any lost a packet or stopped being answered.
fn no_losses(mesh: &Mesh, pingers: Vec<(Pinger, String)>, event: &str) -> anyhow::Result<()> {
    let mut failures = Vec::new();
    for (pinger, what) in pingers {
        let losses = pinger.stop(mesh)?;
        println!("{event}: {what}: {} sent, {} lost {:?}", losses.sent, losses.lost.len(), losses.lost);
        if !losses.lost.is_empty() || losses.last_answered + 3 < losses.sent {
            failures.push(format!("{what}: {losses:?}"));
        }
    }
    ensure!(failures.is_empty(), "{event} lost packets:\n{}", failures.join("\n"));
    Ok(())
}

/// The agent pods of the suite's nodes: name and image, by node.
async fn agent_pods(mesh: &Mesh) -> anyhow::Result<BTreeMap<String, (String, String, bool)>> {
    let pods: Api<Pod> = Api::namespaced(mesh.cluster.client.clone(), CHART_NAMESPACE);
    let list = pods.list(&ListParams::default().labels("app.kubernetes.io/component=agent")).await?;
    let mut out = BTreeMap::new();
    for pod in list.items {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else { continue };
        if !mesh.nodes.names.contains(&node) || pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let image =
            pod.spec.as_ref().and_then(|s| s.containers.first()).and_then(|c| c.image.clone()).unwrap_or_default();
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        out.insert(node, (pod.metadata.name.unwrap_or_default(), image, ready));
    }
    Ok(out)
}

/// Waits until every suite node runs a Ready agent pod other than `before`'s, with `image`.
async fn wait_new_agents(
    mesh: &Mesh,
    before: &BTreeMap<String, (String, String, bool)>,
    image: Option<&str>,
) -> anyhow::Result<()> {
    eventually_async(Duration::from_secs(300), || async {
        let now = agent_pods(mesh).await?;
        for node in &mesh.nodes.names {
            let (name, running, ready) = now.get(node).with_context(|| format!("no agent pod on {node}"))?;
            ensure!(
                *ready && before.get(node).map(|b| &b.0) != Some(name),
                "{node}'s agent pod {name} is old or not Ready"
            );
            if let Some(image) = image {
                ensure!(running == image, "{node}'s agent pod {name} runs {running}, not {image}");
            }
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn agent_restarts_rollouts_and_upgrades_lose_no_packet_through_the_restarted_nodes() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = mesh().await?;
    let names = mesh.nodes.names.clone();
    let (pinger_node, host, third) = (names[0].clone(), names[1].clone(), names[2].clone());
    let name = "kubelet-e2e-restart";
    let service_ip = pod_backed_service(&mesh, name, &host, &pinger_node, "still-here").await?;
    let info = mesh.info().await?;
    let window = Duration::from_secs(300);
    // Every node pinged by another one, and the service: for the events that restart every agent.
    let through_every_node = || -> anyhow::Result<Vec<(Pinger, String)>> {
        Ok(vec![
            (mesh.start_ping(&pinger_node, info[&host].mesh_ip, window)?, format!("{pinger_node} -> {host}")),
            (mesh.start_ping(&pinger_node, info[&third].mesh_ip, window)?, format!("{pinger_node} -> {third}")),
            (mesh.start_ping(&host, info[&pinger_node].mesh_ip, window)?, format!("{host} -> {pinger_node}")),
            (mesh.start_ping(&pinger_node, service_ip, window)?, format!("{pinger_node} -> {name} on {host}")),
        ])
    };
    let result = async {
        // 1. `kubectl delete pod` of the agent on the service's node.
        let pingers = vec![
            (mesh.start_ping(&pinger_node, info[&host].mesh_ip, window)?, format!("{pinger_node} -> {host}")),
            (mesh.start_ping(&pinger_node, service_ip, window)?, format!("{pinger_node} -> {name} on {host}")),
        ];
        tokio::time::sleep(Duration::from_secs(1)).await;
        let started = Instant::now();
        mesh.nodes.restart_agent(&host)?;
        println!("kubectl delete pod: {host}'s agent back in {:?}", started.elapsed());
        tokio::time::sleep(Duration::from_secs(2)).await;
        no_losses(&mesh, pingers, "kubectl delete pod of an agent")?;

        // 2. `kubectl rollout restart` of the DaemonSet: every node's agent, one after the other;
        // each node is pinged by another one.
        let before = agent_pods(&mesh).await?;
        let pingers = through_every_node()?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let started = Instant::now();
        mesh.cluster.kubectl_ok(&["-n", CHART_NAMESPACE, "rollout", "restart", "daemonset/harness-mesh-agent"])?;
        wait_new_agents(&mesh, &before, None).await?;
        println!("kubectl rollout restart: every agent replaced in {:?}", started.elapsed());
        tokio::time::sleep(Duration::from_secs(2)).await;
        no_losses(&mesh, pingers, "kubectl rollout restart of the agents")?;

        // 3. A chart upgrade to another agent image (the same binary under a new tag, which the
        // kubelet treats as any new image).
        let image = lab_image("mesh-agent")?;
        let upgraded = format!("{image}-upgrade");
        for node in &names {
            let socket = harness_mesh_e2e::repo_root().join(format!(".lab/nodes/{node}/containerd/containerd.sock"));
            let socket = socket.to_str().context("socket path")?.to_owned();
            mesh.nodes.exec_ok(
                node,
                &["ctr", "--address", &socket, "-n", "k8s.io", "images", "tag", "--force", &image, &upgraded],
            )?;
        }
        let before = agent_pods(&mesh).await?;
        let pingers = through_every_node()?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let started = Instant::now();
        let tag = upgraded.rsplit_once(':').map(|(_, t)| t).context("image tag")?;
        helm_upgrade(&mesh, &[&format!("agent.image.tag={tag}")])?;
        wait_new_agents(&mesh, &before, Some(&upgraded)).await?;
        println!("helm upgrade to {upgraded}: every agent replaced in {:?}", started.elapsed());
        tokio::time::sleep(Duration::from_secs(2)).await;
        no_losses(&mesh, pingers, "a chart upgrade to a new agent image")?;
        anyhow::Ok(())
    }
    .await;
    // Back to the lab's own image, whatever happened.
    let back = lab_image("mesh-agent")?;
    let tag = back.rsplit_once(':').map(|(_, t)| t.to_owned()).context("image tag")?;
    let restored = helm_upgrade(&mesh, &[&format!("agent.image.tag={tag}")]);
    remove_service_and_pod(&mesh, name).await?;
    result?;
    restored?;
    mesh.wait_connected(CONVERGE).await?;
    Ok(())
}

/// `helm upgrade --reuse-values` of the lab's release with `sets`, waiting for the rollout.
fn helm_upgrade(mesh: &Mesh, sets: &[&str]) -> anyhow::Result<()> {
    let helm = harness_mesh_e2e::chart::helm_binary()?;
    let chart = harness_mesh_e2e::chart::chart_dir();
    let mut command = std::process::Command::new(helm);
    command.args(["upgrade", "harness-mesh"]).arg(&chart).arg("--kubeconfig").arg(&mesh.cluster.kubeconfig).args([
        "--namespace",
        CHART_NAMESPACE,
        "--reuse-values",
        "--wait",
        "--timeout",
        "300s",
    ]);
    for set in sets {
        command.args(["--set", set]);
    }
    let out = command.output().context("running helm upgrade")?;
    ensure!(out.status.success(), "helm upgrade {sets:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

#[tokio::test]
async fn a_pod_reaches_mesh_services_by_ip_and_name_and_only_on_listed_ports() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = mesh().await?;
    let [client_node, host] = [0, 2].map(|i| mesh.nodes.names[i].clone());
    let name = "kubelet-e2e-client-web";
    let client = "kubelet-e2e-client";
    let marker = format!("pod-client-marker-{}", std::process::id());
    let ip = pod_backed_service(&mesh, name, &host, &client_node, &marker).await?;
    let pods: Api<Pod> = Api::namespaced(mesh.cluster.client.clone(), NAMESPACE);
    delete_pod_and_wait(&pods, client).await?;
    pods.create(&PostParams::default(), &client_pod(client, &client_node)?).await?;
    let client_ip = ready_pod_ip(&pods, client).await?;
    let result = async {
        // Capture the client node's underlay while the pod fetches the marker: it must cross
        // only inside WireGuard.
        let mut capture =
            mesh.nodes.spawn(&client_node, &["timeout", "60", "tcpdump", "-i", "eth0", "-U", "-w", "-", "-s", "0"])?;
        tokio::time::sleep(Duration::from_millis(1500)).await;

        // By mesh IP.
        let by_ip = format!("timeout 5 wget -q -O - http://{ip}:8080/");
        let took = eventually(CONVERGE, || match in_pod(&mesh, client, &by_ip)? {
            (true, body) if body.trim() == marker => Ok(()),
            other => bail!("pod {client} ({client_ip}) on {client_node} -> {ip}:8080 gave {other:?}"),
        })
        .await?;
        println!("pod {client} on {client_node} reached {name} at {ip}:8080 after {took:?}");

        // By name, through the cluster DNS (CoreDNS's mesh.local stub domain to the agents).
        let fqdn = format!("{name}.{NAMESPACE}.mesh.local");
        let by_name = format!("time timeout 5 wget -q -O - http://{fqdn}:8080/");
        let first = eventually_async(CONVERGE, || async {
            match in_pod(&mesh, client, &by_name)? {
                (true, text) if text.contains(&marker) => Ok(text),
                other => bail!("pod {client} -> http://{fqdn}:8080/ gave {other:?}"),
            }
        })
        .await?;
        let first_connect = busybox_real_seconds(&first).context("no `real` line from busybox time")?;
        let (_, again) = in_pod(&mesh, client, &by_name)?;
        let next_connect = busybox_real_seconds(&again).context("no `real` line from busybox time")?;
        let (_, ping) = in_pod(&mesh, client, &format!("ping -q -c 10 -i 0.2 -W 1 {ip}"))?;
        let pod_rtt = ping
            .lines()
            .find(|l| l.contains("min/avg/max"))
            .and_then(|l| l.split('=').nth(1))
            .and_then(|v| v.trim().split('/').nth(1).map(str::to_owned));
        let node_rtt = mesh.ping(&client_node, ip, 10, 0.2)?.avg_ms;
        let node_fetch = mesh.nodes.exec_ok(
            &client_node,
            &["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w", "%{time_total}", &format!("http://{ip}:8080/")],
        )?;
        println!(
            "pod -> {fqdn}: first connect {first_connect:.2} s, next {next_connect:.2} s (busybox time, 10 ms steps); \
             ping RTT pod {pod_rtt:?} ms, node {node_rtt:?} ms; node -> {ip}:8080 fetch {node_fetch} s"
        );
        ensure!(pod_rtt.is_some(), "the pod's ping to {ip} got no reply:\n{ping}");

        // A port the service does not list is refused at once (the pod serves it on its own IP).
        let (ok, refused) = in_pod(&mesh, client, &format!("timeout 5 wget -q -O - http://{ip}:9090/"))?;
        ensure!(
            !ok && refused.contains("refused"),
            "{ip}:9090 is not listed: want `Connection refused`, got {refused:?}"
        );

        tokio::time::sleep(Duration::from_millis(1000)).await;
        let _ = mesh.nodes.exec(&client_node, &["pkill", "-INT", "-f", "^timeout 60 tcpdump -i eth0"]);
        let _ = mesh.nodes.exec(&client_node, &["pkill", "-INT", "-x", "tcpdump"]);
        let mut pcap = Vec::new();
        capture.stdout.take().context("capture stdout")?.read_to_end(&mut pcap)?;
        let _ = capture.wait();
        let contains = |needle: &[u8]| pcap.windows(needle.len()).any(|w| w == needle);
        ensure!(pcap.len() > 24, "the capture on {client_node}/eth0 recorded nothing");
        // WireGuard's transport data messages start with type 4 and three zero bytes.
        let data = harness_mesh_e2e::mesh::udp_payloads(&pcap, 51820)
            .into_iter()
            .filter(|payload| payload.starts_with(&[4, 0, 0, 0]))
            .count();
        ensure!(data > 0, "the capture holds no WireGuard data message: it cannot prove anything");
        ensure!(!contains(marker.as_bytes()), "the pod's traffic crossed the underlay in plaintext");
        anyhow::Ok(())
    }
    .await;
    delete_pod_and_wait(&pods, client).await?;
    remove_service_and_pod(&mesh, name).await?;
    result
}
