//! The kubelet lab's cluster services: kube-proxy (nftables mode, a process on every node) makes
//! ClusterIP Services work from pods and from nodes, the `kubernetes` Service included (no
//! hand-made DNAT any more), and CoreDNS is the cluster DNS (`kube-dns`, 10.96.0.10): it answers
//! `cluster.local`, refuses every other name, and forwards `mesh.local` to the agents through
//! the chart's stub domain (the ConfigMap `coredns-custom` in kube-system).
//!
//! Needs the lab in kubelet mode, so it is built only with the `kubelet-lab` feature; `make
//! kubelet-e2e` runs it. Every object it makes is named `cluster-e2e-*` in `default`; it leaves
//! alone whatever else the cluster holds, and removes its own objects (also those an earlier,
//! failed run left) .

use std::net::Ipv4Addr;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, ensure};
use harness_mesh_e2e::mesh::{DigAnswer, Mesh, delete_pod_and_wait, eventually, eventually_async};
use harness_mesh_e2e::{lab_image, repo_root};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const CONVERGE: Duration = Duration::from_secs(90);
const NAMESPACE: &str = "default";
/// The cluster DNS Service's address, as the kubelets name it (`clusterDNS`).
const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The suite's web pod and the Service in front of it.
const WEB: &str = "cluster-e2e-web";
const WEB_BODY: &str = "hello-from-cluster-e2e-web";

async fn mesh() -> anyhow::Result<Mesh> {
    Mesh::get_kubelet(CONVERGE).await
}

/// A pod on `node`'s pod network running `script` in the lab's busybox image, with the default
/// DNS policy (ClusterFirst: the cluster DNS).
fn busybox_pod(name: &str, node: &str, labels: serde_json::Value, script: &str) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "main",
                "image": lab_image("busybox")?,
                "imagePullPolicy": "Never",
                "command": ["/bin/busybox", "sh", "-c", script],
            }],
        },
    }))?)
}

/// A pod that idles on `node`; the tests run commands in it (`kubectl exec`).
fn client_pod(name: &str, node: &str) -> anyhow::Result<Pod> {
    busybox_pod(name, node, json!({"app": "cluster-e2e-client"}), "exec /bin/busybox sleep 3600")
}

/// A pod that serves [`WEB_BODY`] over HTTP on port 8080, ready once it listens.
fn web_pod(node: &str) -> anyhow::Result<Pod> {
    let script = format!(
        "mkdir -p /tmp/www && echo {WEB_BODY} > /tmp/www/index.html && exec /bin/busybox httpd -f -p 8080 -h /tmp/www"
    );
    let mut pod = busybox_pod(WEB, node, json!({"app": WEB}), &script)?;
    let container = &mut pod.spec.as_mut().context("pod spec")?.containers[0];
    container.readiness_probe = Some(serde_json::from_value(json!({"tcpSocket": {"port": 8080}, "periodSeconds": 1}))?);
    Ok(pod)
}

/// Creates `pod` afresh (deleting one of that name an earlier run left) and waits until it is
/// Ready; returns its name.
async fn start_pod(pods: &Api<Pod>, pod: Pod) -> anyhow::Result<String> {
    let name = pod.metadata.name.clone().context("pod name")?;
    delete_pod_and_wait(pods, &name).await?;
    pods.create(&PostParams::default(), &pod).await?;
    eventually_async(CONVERGE, || async {
        let status = pods.get(&name).await?.status.unwrap_or_default();
        let ready = status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
        ensure!(ready, "pod {name} is not Ready: phase {:?}", status.phase);
        Ok(())
    })
    .await?;
    Ok(name)
}

/// Runs `args` in pod `pod` (through the kubelet: `kubectl exec`), whatever its exit status.
fn pod_exec(mesh: &Mesh, pod: &str, args: &[&str]) -> anyhow::Result<Output> {
    let mut argv = vec!["-n", NAMESPACE, "exec", pod, "--"];
    argv.extend_from_slice(args);
    mesh.cluster.kubectl(&argv)
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// What busybox's `nslookup` answered for an A query.
#[derive(Debug)]
struct Lookup {
    /// The server it asked (`Server:`).
    server: Option<Ipv4Addr>,
    /// The addresses of the answer.
    addresses: Vec<Ipv4Addr>,
    /// Its whole output.
    output: String,
}

impl Lookup {
    fn parse(output: String) -> Self {
        let server = output.lines().find_map(|l| l.strip_prefix("Server:")).and_then(|s| s.trim().parse().ok());
        // The addresses come after the answer's `Name:` line (the `Address:` before it is the
        // server's).
        let addresses = output
            .lines()
            .skip_while(|l| !l.starts_with("Name:"))
            .filter_map(|l| l.strip_prefix("Address:"))
            .filter_map(|a| a.trim().parse().ok())
            .collect();
        Self { server, addresses, output }
    }
}

/// `nslookup -type=a NAME` in pod `pod`, with the pod's own resolver configuration.
fn pod_lookup(mesh: &Mesh, pod: &str, name: &str) -> anyhow::Result<Lookup> {
    let out = pod_exec(mesh, pod, &["/bin/busybox", "nslookup", "-type=a", name])?;
    Ok(Lookup::parse(text(&out)))
}

/// `wget` of `url` in pod `pod` (3 s): the body, or `None` when it failed. (Debian's static
/// busybox wget crashes with its own `-T`, hence `timeout`; for https it runs the image's
/// `openssl s_client`.)
fn pod_get(mesh: &Mesh, pod: &str, url: &str) -> anyhow::Result<Option<String>> {
    let wget = ["wget", "-q", "--no-check-certificate", "-O", "-", url];
    let mut args = vec!["/bin/busybox", "timeout", "3", "/bin/busybox"];
    args.extend_from_slice(&wget);
    let out = pod_exec(mesh, pod, &args)?;
    Ok(out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

/// `curl` of `url` on lab node `node` (2 s, the lab CA trusted): the body, or `None`.
fn node_get(mesh: &Mesh, node: &str, url: &str) -> anyhow::Result<Option<String>> {
    let ca = repo_root().join(".lab/pki/ca.crt");
    let ca = ca.to_str().context("CA path")?;
    let out = mesh.nodes.exec(node, &["curl", "-sS", "--noproxy", "*", "--max-time", "2", "--cacert", ca, url])?;
    Ok(out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

async fn cluster_ip(services: &Api<Service>, name: &str) -> anyhow::Result<Ipv4Addr> {
    let service = services.get(name).await?;
    let ip = service.spec.and_then(|s| s.cluster_ip).with_context(|| format!("Service {name} has no cluster IP"))?;
    Ok(ip.parse()?)
}

#[tokio::test]
async fn pods_and_nodes_resolve_and_reach_the_apiserver_through_cluster_dns_and_the_kubernetes_service()
-> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = mesh().await?;
    let client = mesh.cluster.client.clone();
    let kubernetes_ip = cluster_ip(&Api::namespaced(client.clone(), "default"), "kubernetes").await?;
    let dns_ip = cluster_ip(&Api::namespaced(client.clone(), "kube-system"), "kube-dns").await?;
    ensure!(dns_ip == CLUSTER_DNS, "the kube-dns Service is at {dns_ip}, the kubelets name {CLUSTER_DNS}");
    let version = client.apiserver_version().await?.git_version;

    // The `kubernetes` Service has a real endpoint now, and no node keeps the lab's old DNAT:
    // kube-proxy's own table translates the address.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let endpoints: Vec<String> = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=kubernetes"))
        .await?
        .items
        .into_iter()
        .flat_map(|s| s.endpoints)
        .flat_map(|e| e.addresses)
        .collect();
    ensure!(!endpoints.is_empty(), "the kubernetes Service has no endpoint");
    for node in &mesh.nodes.names {
        let old = mesh.nodes.exec(node, &["nft", "list", "table", "ip", "harness_mesh_lab"])?;
        ensure!(!old.status.success(), "{node} still has the lab's hand-made DNAT table:\n{}", text(&old));
        mesh.nodes.exec_ok(node, &["nft", "list", "table", "ip", "kube-proxy"]).context("kube-proxy's nft table")?;
    }

    // From every node: the cluster DNS answers through its ClusterIP, and the apiserver answers
    // on the `kubernetes` ClusterIP (its certificate names that address).
    for node in &mesh.nodes.names {
        eventually(CONVERGE, || {
            let answer = mesh.dig(node, CLUSTER_DNS, "kubernetes.default.svc.cluster.local", false)?;
            ensure!(answer.addresses == [kubernetes_ip], "{node}: the cluster DNS answered {answer:?}");
            let body = node_get(&mesh, node, &format!("https://{kubernetes_ip}/version"))?;
            ensure!(
                body.as_deref().is_some_and(|b| b.contains(&version)),
                "{node} -> https://{kubernetes_ip}/version gave {body:?}"
            );
            Ok(())
        })
        .await?;
    }

    // From a pod on every node: its resolver is the cluster DNS, which resolves the Service's
    // name; and the apiserver answers at that name (busybox wget does not check certificates:
    // the version it reports is the proof).
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let mut made = Vec::new();
    for (i, node) in mesh.nodes.names.iter().enumerate() {
        made.push(start_pod(&pods, client_pod(&format!("cluster-e2e-dns-{i}"), node)?).await?);
    }
    for pod in &made {
        let resolv =
            String::from_utf8_lossy(&pod_exec(&mesh, pod, &["/bin/busybox", "cat", "/etc/resolv.conf"])?.stdout)
                .into_owned();
        ensure!(
            resolv.contains(&format!("nameserver {CLUSTER_DNS}")) && resolv.contains("cluster.local"),
            "{pod}'s resolv.conf does not name the cluster DNS:\n{resolv}"
        );
        let took = eventually(CONVERGE, || {
            let lookup = pod_lookup(&mesh, pod, "kubernetes.default.svc.cluster.local")?;
            ensure!(
                lookup.server == Some(CLUSTER_DNS) && lookup.addresses == [kubernetes_ip],
                "{pod}: nslookup kubernetes.default.svc.cluster.local gave:\n{}",
                lookup.output
            );
            let body = pod_get(&mesh, pod, "https://kubernetes.default.svc.cluster.local/version")?;
            ensure!(
                body.as_deref().is_some_and(|b| b.contains(&version)),
                "{pod} -> https://kubernetes.default.svc.cluster.local/version gave {body:?}"
            );
            Ok(())
        })
        .await?;
        println!("{pod}: resolved the kubernetes Service and reached the apiserver ({version}) after {took:?}");
    }

    // Nothing outside the cluster's zones is answered: there is nowhere to forward to.
    let answer = mesh.dig(&mesh.nodes.names[0], CLUSTER_DNS, "example.com", false)?;
    ensure!(answer.status == "REFUSED", "the cluster DNS answered example.com: {answer:?}");

    for pod in &made {
        delete_pod_and_wait(&pods, pod).await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_cluster_ip_service_reaches_its_pod_from_pods_on_every_node_and_from_the_nodes() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = mesh().await?;
    let client = mesh.cluster.client.clone();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let _ = services.delete(WEB, &DeleteParams::default()).await;
    eventually_async(Duration::from_secs(30), || async {
        ensure!(services.get_opt(WEB).await?.is_none(), "old Service {WEB} still exists");
        Ok(())
    })
    .await?;

    let host = mesh.nodes.names[0].clone();
    start_pod(&pods, web_pod(&host)?).await?;
    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": WEB, "namespace": NAMESPACE},
        "spec": {"selector": {"app": WEB}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))?;
    services.create(&PostParams::default(), &service).await?;
    let ip = cluster_ip(&services, WEB).await?;

    // A pod on every node: the one beside the web pod (hairpin through the node's bridge) and
    // those on the other nodes; by address and by name.
    let mut made = Vec::new();
    for (i, node) in mesh.nodes.names.iter().enumerate() {
        made.push((node.clone(), start_pod(&pods, client_pod(&format!("cluster-e2e-client-{i}"), node)?).await?));
    }
    let name = format!("{WEB}.{NAMESPACE}.svc.cluster.local");
    for (node, pod) in &made {
        let took = eventually(CONVERGE, || {
            for url in [format!("http://{ip}/"), format!("http://{name}/")] {
                let body = pod_get(&mesh, pod, &url)?;
                ensure!(body.as_deref() == Some(WEB_BODY), "{pod} (on {node}) -> {url} gave {body:?}");
            }
            Ok(())
        })
        .await?;
        println!("{pod} on {node} reached {WEB} ({ip}, on {host}) after {took:?}");
    }
    // Every node itself.
    for node in &mesh.nodes.names {
        eventually(CONVERGE, || {
            let body = node_get(&mesh, node, &format!("http://{ip}/"))?;
            ensure!(body.as_deref() == Some(WEB_BODY), "{node} -> http://{ip}/ gave {body:?}");
            Ok(())
        })
        .await?;
    }

    // The Service goes: its address stops answering (kube-proxy follows the API).
    services.delete(WEB, &DeleteParams::default()).await?;
    let other = &mesh.nodes.names[1];
    eventually(CONVERGE, || {
        let body = node_get(&mesh, other, &format!("http://{ip}/"))?;
        ensure!(body.is_none(), "{other} -> http://{ip}/ still answers after the Service went: {body:?}");
        Ok(())
    })
    .await?;

    for (_, pod) in &made {
        delete_pod_and_wait(&pods, pod).await?;
    }
    delete_pod_and_wait(&pods, WEB).await?;
    Ok(())
}

#[tokio::test]
async fn a_pod_resolves_mesh_names_through_the_coredns_stub_domain() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = mesh().await?;
    let client = mesh.cluster.client.clone();

    // The chart rendered its stub domain where CoreDNS imports it.
    let custom = Api::<ConfigMap>::namespaced(client.clone(), "kube-system")
        .get_opt("coredns-custom")
        .await?
        .context("no ConfigMap kube-system/coredns-custom: the chart's coreDNS.stubDomain is off")?;
    let blocks = custom.data.unwrap_or_default();
    ensure!(
        blocks.iter().any(|(key, block)| key.ends_with(".server") && block.contains("mesh.local")),
        "coredns-custom has no mesh.local server block: {blocks:?}"
    );

    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let asker = mesh.nodes.names[1].clone();
    let pod = start_pod(&pods, client_pod("cluster-e2e-mesh-dns", &asker)?).await?;
    let info = mesh.info().await?;
    let agent_dns = info.get(&asker).with_context(|| format!("no mesh IP for {asker}"))?.mesh_ip;
    // Every node's name: the agent's own DNS and the pod (through CoreDNS) agree, on the
    // node's mesh IP.
    for node in &mesh.nodes.names {
        let want = info.get(node).with_context(|| format!("no mesh IP for {node}"))?.mesh_ip;
        let fqdn = format!("{node}.node.mesh.local");
        let took = eventually(CONVERGE, || {
            let agent: DigAnswer = mesh.dig(&asker, agent_dns, &fqdn, false)?;
            ensure!(agent.addresses == [want], "{asker}'s agent resolves {fqdn} to {agent:?}, want {want}");
            let lookup = pod_lookup(&mesh, &pod, &fqdn)?;
            ensure!(
                lookup.server == Some(CLUSTER_DNS) && lookup.addresses == agent.addresses,
                "{pod} (on {asker}): nslookup {fqdn} gave (the agent says {:?}):\n{}",
                agent.addresses,
                lookup.output
            );
            Ok(())
        })
        .await?;
        println!("{pod} resolved {fqdn} to {want} through CoreDNS after {took:?}");
    }
    // A name the zone does not have is the zone's answer, not a refusal.
    let lookup = pod_lookup(&mesh, &pod, "cluster-e2e-absent.node.mesh.local")?;
    ensure!(
        lookup.addresses.is_empty() && lookup.output.contains("NXDOMAIN"),
        "{pod}: nslookup of an absent mesh name gave:\n{}",
        lookup.output
    );

    delete_pod_and_wait(&pods, &pod).await?;
    Ok(())
}

#[test]
fn nslookup_output_parses() {
    // What the other tests read, in busybox 1.35's format.
    let output = "Server:\t\t10.96.0.10\nAddress:\t10.96.0.10:53\n\nName:\tkubernetes.default.svc.cluster.local\nAddress: 10.96.0.1\n\n";
    let lookup = Lookup::parse(output.to_owned());
    assert_eq!(lookup.server, Some(CLUSTER_DNS));
    assert_eq!(lookup.addresses, [Ipv4Addr::new(10, 96, 0, 1)]);
    let nx = "Server:\t\t10.96.0.10\nAddress:\t10.96.0.10:53\n\n** server can't find x.node.mesh.local: NXDOMAIN\n\n";
    assert!(Lookup::parse(nx.to_owned()).addresses.is_empty());
}
