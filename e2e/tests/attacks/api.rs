//! Attacks: api (see tests/attacks.rs). What the API admits from agents and tenants, and what
//! agents make of objects an attacker managed to write anyway (with admin credentials, which
//! bypass every admission rule but none of the agents' own checks).
//!
//! Objects of these tests are named `e2e-atk-api-*`, services live in the namespace
//! `e2e-atk-api`. A forged status is written on an object held in deletion by a finalizer of the
//! test: mesh-controller leaves a terminating object's status alone, so what the agents see is
//! exactly what the attacker wrote, with no race against the controller's next reconcile.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use harness_mesh_e2e::chart::token_client;
use harness_mesh_e2e::controller::service;
use harness_mesh_e2e::mesh::{Mesh, eventually, eventually_async};
use harness_mesh_e2e::{Cluster, repo_root};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use mesh_api::{MeshNode, MeshService};
use serde_json::{Value, json};

use super::SERIAL;

/// The namespace of the tests' MeshServices.
const NAMESPACE: &str = "e2e-atk-api";
/// The finalizer that holds the tests' objects in deletion.
const HOLD: &str = "e2e.harness.dev/hold";
/// How long the mesh may take to converge before a test.
const CONVERGE: Duration = Duration::from_secs(120);

/// A client with the credentials the lab's agent on `node` uses: the chart's agent
/// ServiceAccount, with a token bound to a placeholder pod on that node.
async fn agent_client(node: &str) -> anyhow::Result<Client> {
    let path = repo_root().join(".lab/nodes").join(node).join("kubeconfig");
    let file = Kubeconfig::read_from(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Client::try_from(Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await?)?)
}

/// Makes the tests' namespace (idempotent).
async fn ensure_namespace(cluster: &Cluster) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(cluster.client.clone());
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}});
    api.patch(NAMESPACE, &PatchParams::apply(harness_mesh_e2e::FIELD_MANAGER), &Patch::Apply(&ns)).await?;
    Ok(())
}

/// Creates (afresh) MeshService `name` in [`NAMESPACE`] with the finalizer [`HOLD`], deletes it
/// so that it stays terminating, and writes `status` over it with admin credentials.
async fn forged_service(cluster: &Cluster, name: &str, spec: Value, status: Value) -> anyhow::Result<()> {
    let api: Api<MeshService> = Api::namespaced(cluster.client.clone(), NAMESPACE);
    release(&api, name).await?;
    let mut object = service(name, spec);
    object.metadata.finalizers = Some(vec![HOLD.into()]);
    api.create(&PostParams::default(), &object).await?;
    // Let mesh-controller finish with it first: it leaves it alone once it is terminating.
    eventually_async(Duration::from_secs(30), || async {
        let status = api.get(name).await?.status.unwrap_or_default();
        anyhow::ensure!(status.mesh_ip.is_some() && status.node.is_some(), "{name} is not placed yet");
        Ok(())
    })
    .await?;
    api.delete(name, &DeleteParams::default()).await?;
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(json!({"status": status}))).await?;
    Ok(())
}

/// Removes the finalizer [`HOLD`] from `name` (if it exists) and waits until it is gone.
async fn release<K>(api: &Api<K>, name: &str) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    if api.get_opt(name).await?.is_none() {
        return Ok(());
    }
    let _ = api.patch(name, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}}))).await;
    let _ = api.delete(name, &DeleteParams::default()).await;
    eventually_async(Duration::from_secs(30), || async {
        anyhow::ensure!(api.get_opt(name).await?.is_none(), "{name} still exists");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn an_agent_inflating_its_meshnode_status_is_rejected_naming_the_field() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let node = mesh.nodes.names[0].clone();
    let agent: Api<MeshNode> = Api::all(agent_client(&node).await?);
    // About 1.5 MB, the most etcd stores in one object. A dry run: the API server admits or
    // refuses it exactly as it would a real write, and nothing reaches the node's real status.
    let big = "a".repeat(1_500_000);
    let attempts = [
        ("status.endpoint", json!({"endpoint": format!("{big}:51820")})),
        (
            // Server-side apply merges the condition into the list by type: its index varies.
            "].message",
            json!({"conditions": [{"type": "Connected", "status": "True", "reason": "Inflated", "message": big,
                "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
        ),
    ];
    let params = PatchParams { dry_run: true, ..PatchParams::apply("e2e-atk-inflate").force() };
    for (field, status) in attempts {
        let patch = json!({"apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode", "status": status});
        match agent.patch_status(&node, &params, &Patch::Apply(&patch)).await {
            Ok(_) => panic!("the agent of {node} wrote a 1.5 MB {field} into its MeshNode status: the API admitted it"),
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{field}: expected a validation error, got {status:?}");
                let named = format!("{field}: Too long");
                assert!(status.message.contains(&named), "the error must name the field ({named}): {}", status.message);
                assert!(!field.starts_with(']') || status.message.contains("status.conditions["), "{}", status.message);
            }
            Err(err) => return Err(err).context(field),
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_tenant_forging_meshservices_status_is_denied_by_admission() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::get().await?;
    ensure_namespace(&cluster).await?;
    // A tenant whom RBAC lets write meshservices/status in its namespace (a wide namespace
    // admin role, say): admission must still refuse it, since status is mesh-controller's.
    let tenant = "e2e-atk-api-tenant";
    let manager = PatchParams::apply(harness_mesh_e2e::FIELD_MANAGER);
    let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": tenant}});
    Api::<ServiceAccount>::namespaced(cluster.client.clone(), NAMESPACE)
        .patch(tenant, &manager, &Patch::Apply(&sa))
        .await?;
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": tenant},
        "rules": [{"apiGroups": ["mesh.harness.dev"], "resources": ["meshservices", "meshservices/status"], "verbs": ["*"]}]});
    Api::<Role>::namespaced(cluster.client.clone(), NAMESPACE).patch(tenant, &manager, &Patch::Apply(&role)).await?;
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": tenant},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": tenant},
        "subjects": [{"kind": "ServiceAccount", "name": tenant, "namespace": NAMESPACE}]});
    Api::<RoleBinding>::namespaced(cluster.client.clone(), NAMESPACE)
        .patch(tenant, &manager, &Patch::Apply(&binding))
        .await?;
    let request = k8s_openapi::api::authentication::v1::TokenRequest {
        spec: k8s_openapi::api::authentication::v1::TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(600),
            bound_object_ref: None,
        },
        ..Default::default()
    };
    let token = Api::<ServiceAccount>::namespaced(cluster.client.clone(), NAMESPACE)
        .create_token_request(tenant, &PostParams::default(), &request)
        .await?
        .status
        .context("TokenRequest without a status")?
        .token;
    let client = token_client(&cluster.kubeconfig, &token).await?;

    let name = "e2e-atk-api-forged-by-tenant";
    let admin: Api<MeshService> = Api::namespaced(cluster.client.clone(), NAMESPACE);
    let _ = admin.delete(name, &DeleteParams::default()).await;
    let tenant_api: Api<MeshService> = Api::namespaced(client, NAMESPACE);
    // RBAC lets the tenant write the spec: wait until RBAC has caught up with the new binding.
    eventually_async(Duration::from_secs(30), || async {
        tenant_api
            .create(
                &PostParams::default(),
                &service(name, json!({"network": {"ports": [80]}, "selector": {"app": "x"}})),
            )
            .await?;
        Ok(())
    })
    .await?;
    let forged = json!({"status": {"meshIP": "10.42.250.21", "node": "hm-node-1", "podIP": "169.254.169.254"}});
    let result = tenant_api.patch_status(name, &PatchParams::default(), &Patch::Merge(forged)).await;
    let _ = admin.delete(name, &DeleteParams::default()).await;
    match result {
        Ok(_) => panic!("a tenant with RBAC on meshservices/status forged MeshService {NAMESPACE}/{name}'s status"),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "expected a denial by admission: {status:?}");
            assert!(
                status.message.contains("mesh-controller"),
                "the denial must say whose status it is: {}",
                status.message
            );
        }
        Err(err) => return Err(err.into()),
    }
    Ok(())
}

#[tokio::test]
async fn a_forged_status_pointing_at_metadata_or_node_addresses_is_neither_hosted_nor_dnated() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    ensure_namespace(&mesh.cluster).await?;
    let info = mesh.info().await?;
    let host = mesh.nodes.names[0].clone();
    let other = mesh.nodes.names[1].clone();
    let other_mesh_ip = info.get(&other).context("the other node's mesh IP")?.mesh_ip.to_string();
    let other_underlay = info[&other].endpoint.split(':').next().unwrap_or_default().to_owned();
    let spec = json!({"network": {"ports": [80]}, "node": host});
    let forgeries = [
        // DNAT to the cloud metadata address.
        ("e2e-atk-api-metadata", json!({"meshIP": "10.42.250.22", "node": host, "podIP": "169.254.169.254"})),
        // DNAT to another node's underlay address.
        ("e2e-atk-api-node-dnat", json!({"meshIP": "10.42.250.23", "node": host, "podIP": other_underlay})),
        // Host another node's mesh IP.
        ("e2e-atk-api-node-ip", json!({"meshIP": other_mesh_ip, "node": host})),
        // Host an address outside the mesh subnet.
        ("e2e-atk-api-outside", json!({"meshIP": other_underlay, "node": host})),
    ];
    // A plain forged placement that passes every check: once the agent hosts it, it has seen
    // the forgeries too (it reads them all in the same directory).
    let canary = ("e2e-atk-api-canary", json!({"meshIP": "10.42.250.24", "node": host}));
    let api: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), NAMESPACE);
    let outcome = async {
        for (name, status) in forgeries.iter().chain([&canary]) {
            forged_service(&mesh.cluster, name, spec.clone(), status.clone()).await?;
        }
        eventually(Duration::from_secs(30), || {
            let addrs = mesh.nodes.exec_ok(&host, &["ip", "-4", "-o", "addr", "show", "dev", "wg-harness"])?;
            anyhow::ensure!(addrs.contains("10.42.250.24/"), "the canary is not hosted on {host} yet: {addrs}");
            Ok(())
        })
        .await?;
        let addrs = mesh.nodes.exec_ok(&host, &["ip", "-4", "-o", "addr", "show", "dev", "wg-harness"])?;
        let ruleset = mesh.nodes.exec_ok(&host, &["nft", "list", "ruleset"])?;
        for needle in ["169.254.169.254", other_underlay.as_str()] {
            anyhow::ensure!(
                !ruleset.contains(needle),
                "the agent on {host} forwards to {needle}, as a forged status said:\n{ruleset}"
            );
        }
        for ip in [other_mesh_ip.as_str(), other_underlay.as_str()] {
            anyhow::ensure!(
                !addrs.contains(&format!(" {ip}/")),
                "the agent on {host} hosts {ip}, as a forged status said: {addrs}"
            );
        }
        anyhow::Ok(())
    }
    .await;
    for (name, _) in forgeries.iter().chain([&canary]) {
        release(&api, name).await?;
    }
    outcome
}

#[tokio::test]
async fn a_peer_entry_allowing_every_address_is_applied_by_no_agent_beyond_its_mesh_ip() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let name = "e2e-atk-api-wide-peer";
    let api: Api<MeshNode> = Api::all(mesh.cluster.client.clone());
    release(&api, name).await?;
    let object: MeshNode = serde_json::from_value(json!({
        "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode",
        "metadata": {"name": name, "finalizers": [HOLD]}, "spec": {},
    }))?;
    api.create(&PostParams::default(), &object).await?;
    let outcome = async {
        // Let the controller finish with it before it is held in deletion.
        eventually_async(Duration::from_secs(30), || async {
            anyhow::ensure!(api.get(name).await?.status.and_then(|s| s.mesh_ip).is_some(), "no mesh IP yet");
            Ok(())
        })
        .await?;
        api.delete(name, &DeleteParams::default()).await?;
        let key = mesh_wireguard::Key::from_bytes([0x5a; 32]).to_base64();
        let forged = json!({"status": {"publicKey": key, "peer": {"publicKey": key,
            "allowedIPs": ["10.42.250.25/32", "0.0.0.0/0", "192.168.77.0/24", "10.42.0.0/16"]}}});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(forged)).await?;
        let want: BTreeSet<String> = ["10.42.250.25/32".to_owned()].into();
        for node in &mesh.nodes.names {
            // The rest of the entry is applied: the peer appears with its one good address.
            eventually(Duration::from_secs(30), || {
                let peers = mesh.wg_dump(node)?;
                let peer = peers.get(&key).with_context(|| format!("{node} has not applied the peer yet"))?;
                anyhow::ensure!(
                    peer.allowed_ips == want,
                    "the agent on {node} applied allowed IPs beyond the peer's /32 in the mesh subnet"
                );
                Ok(())
            })
            .await?;
        }
        anyhow::Ok(())
    }
    .await;
    release(&api, name).await?;
    outcome
}

/// The Lease `mesh-agent-<node>`'s renew time, as text.
async fn renew_time(cluster: &Cluster, node: &str) -> anyhow::Result<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(cluster.client.clone(), "harness-mesh");
    let lease = leases.get(&format!("mesh-agent-{node}")).await?;
    Ok(lease.spec.and_then(|s| s.renew_time).map(|t| format!("{:?}", t.0)).unwrap_or_default())
}

#[tokio::test]
async fn slow_resolving_endpoints_stall_neither_lease_renewals_nor_routing() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let victim = mesh.nodes.names[0].clone();
    let other = mesh.nodes.names[1].clone();
    // The victim's DNS server never answers: its address is put on the victim's loopback, with a
    // socket that reads every query and answers none (traffic stays inside the lab node).
    let resolv = mesh.nodes.exec_ok(&victim, &["cat", "/etc/resolv.conf"])?;
    let server: std::net::Ipv4Addr = resolv
        .lines()
        .find_map(|l| l.strip_prefix("nameserver")?.trim().parse().ok())
        .context("no IPv4 nameserver in /etc/resolv.conf")?;
    let added = !server.is_loopback();
    if added {
        mesh.nodes.exec_ok(&victim, &["ip", "addr", "replace", &format!("{server}/32"), "dev", "lo"])?;
    }
    let mut silent = mesh
        .nodes
        .spawn(&victim, &["timeout", "150", "socat", "-u", &format!("UDP-RECV:53,bind={server}"), "OPEN:/dev/null"])?;
    let nodes: Api<MeshNode> = Api::all(mesh.cluster.client.clone());
    let services: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    let fakes: Vec<String> = (1..=6).map(|i| format!("e2e-atk-api-slow-{i}")).collect();
    let probe = "e2e-atk-api-after-slow";
    let outcome = async {
        // Members whose agents publish endpoints under names that never resolve in time (an
        // agent may publish any endpoint for its own node).
        for (i, name) in fakes.iter().enumerate() {
            release(&nodes, name).await?;
            let object: MeshNode = serde_json::from_value(json!({
                "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode", "metadata": {"name": name}, "spec": {},
            }))?;
            nodes.create(&PostParams::default(), &object).await?;
            let key = mesh_wireguard::Key::from_bytes([0x60 + i as u8; 32]).to_base64();
            let status = json!({"status": {"publicKey": key, "endpoint": format!("{name}.slow.e2e.invalid:51820"), "listenPort": 51820}});
            nodes.patch_status(name, &PatchParams::default(), &Patch::Merge(status)).await?;
        }
        eventually_async(Duration::from_secs(30), || async {
            for name in &fakes {
                let peer = nodes.get(name).await?.status.and_then(|s| s.peer);
                anyhow::ensure!(peer.is_some_and(|p| p.endpoint.is_some()), "{name} has no peer entry with an endpoint yet");
            }
            Ok(())
        })
        .await?;
        // Meanwhile a new service appears on another node: the victim must route it at once.
        let _ = services.delete(probe, &DeleteParams::default()).await;
        services.create(&PostParams::default(), &service(probe, json!({"network": {"ports": [80]}, "node": other}))).await?;
        let ip = harness_mesh_e2e::mesh::wait_mesh_ip(&services, probe).await?;
        let routed = eventually(Duration::from_secs(15), || {
            let peers = mesh.wg_dump(&victim)?;
            anyhow::ensure!(
                peers.values().any(|p| p.allowed_ips.contains(&format!("{ip}/32"))),
                "{victim} does not route the new service {ip} yet"
            );
            Ok(())
        })
        .await;
        anyhow::ensure!(
            routed.is_ok(),
            "{victim} did not route a new service within 15 s while resolving slow endpoints: {routed:?}"
        );
        // The Lease is renewed every 10 s: over 45 s, no gap may exceed 25 s.
        let start = std::time::Instant::now();
        let mut last = (renew_time(&mesh.cluster, &victim).await?, std::time::Instant::now());
        while start.elapsed() < Duration::from_secs(45) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = renew_time(&mesh.cluster, &victim).await?;
            if now != last.0 {
                last = (now, std::time::Instant::now());
            }
            anyhow::ensure!(
                last.1.elapsed() < Duration::from_secs(25),
                "{victim}'s Lease was not renewed for {:?} while it resolved slow endpoints",
                last.1.elapsed()
            );
        }
        anyhow::Ok(())
    }
    .await;
    let _ = services.delete(probe, &DeleteParams::default()).await;
    for name in &fakes {
        let _ = nodes.delete(name, &DeleteParams::default()).await;
    }
    let _ = silent.kill();
    let _ = silent.wait();
    if added {
        mesh.nodes.exec_ok(&victim, &["ip", "addr", "del", &format!("{server}/32"), "dev", "lo"])?;
    }
    outcome
}

#[tokio::test]
async fn a_service_in_another_namespace_gets_no_placement_on_a_node_that_does_not_permit_it() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::get().await?;
    ensure_namespace(&cluster).await?;
    // A member that permits placements from `default` only (the lab's own nodes permit every
    // namespace, for the other suites).
    let node = "e2e-atk-api-private";
    let nodes: Api<MeshNode> = Api::all(cluster.client.clone());
    release(&nodes, node).await?;
    let object: MeshNode = serde_json::from_value(json!({
        "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode", "metadata": {"name": node},
        "spec": {"serviceNamespaces": ["default"]},
    }))?;
    nodes.create(&PostParams::default(), &object).await?;
    let name = "e2e-atk-api-placed";
    let api: Api<MeshService> = Api::namespaced(cluster.client.clone(), NAMESPACE);
    release(&api, name).await?;
    api.create(&PostParams::default(), &service(name, json!({"network": {"ports": [80]}, "node": node}))).await?;
    let outcome = eventually_async(Duration::from_secs(30), || async {
        let status = api.get(name).await?.status.unwrap_or_default();
        if let Some(placed) = &status.node {
            return Ok(Err(format!(
                "{NAMESPACE}/{name} was placed on {placed}, which permits spec.node placements only from namespace default"
            )));
        }
        let denied = status.conditions.iter().find(|c| c.type_ == "PlacementDenied");
        anyhow::ensure!(denied.is_some_and(|c| c.status == "True"), "no PlacementDenied condition yet: {:?}", status.conditions);
        Ok(Ok(()))
    })
    .await;
    let events = eventually(Duration::from_secs(10), || {
        let reasons = cluster.kubectl_ok(&[
            "get",
            "events",
            "-n",
            NAMESPACE,
            "--field-selector",
            &format!("involvedObject.name={name}"),
            "-o",
            "jsonpath={.items[*].reason}",
        ])?;
        anyhow::ensure!(reasons.contains("PlacementDenied"), "no PlacementDenied event: {reasons:?}");
        Ok(())
    })
    .await;
    release(&api, name).await?;
    let _ = nodes.delete(node, &DeleteParams::default()).await;
    outcome?.map_err(anyhow::Error::msg)?;
    events?;
    Ok(())
}

#[tokio::test]
async fn a_service_squatting_a_short_name_from_another_namespace_gets_no_short_name() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    ensure_namespace(&mesh.cluster).await?;
    let node = mesh.nodes.names[0].clone();
    let server = mesh.info().await?.get(&node).context("the node's mesh IP")?.mesh_ip;
    let name = "e2e-atk-api-squat";
    let short = format!("{name}.mesh.local");
    let squatter: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), NAMESPACE);
    let owner: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    release(&squatter, name).await?;
    release(&owner, name).await?;
    let spec = json!({"network": {"ports": [80]}, "selector": {"app": name}});
    let outcome = async {
        // The squatter comes first, before the owner's service exists.
        squatter.create(&PostParams::default(), &service(name, spec.clone())).await?;
        let squatter_ip = harness_mesh_e2e::mesh::wait_mesh_ip(&squatter, name).await?;
        let long = format!("{name}.{NAMESPACE}.mesh.local");
        eventually(Duration::from_secs(15), || {
            let answer = mesh.dig(&node, server, &long, false)?;
            anyhow::ensure!(answer.addresses == [squatter_ip], "{long}: {answer:?}");
            Ok(())
        })
        .await?;
        let answer = mesh.dig(&node, server, &short, false)?;
        anyhow::ensure!(
            answer.addresses.is_empty(),
            "{short} resolves to {:?}, the service of namespace {NAMESPACE}, before its owner in default exists",
            answer.addresses
        );
        let condition = eventually_async(Duration::from_secs(15), || async {
            let status = squatter.get(name).await?.status.unwrap_or_default();
            let c = status.conditions.into_iter().find(|c| c.type_ == "ShortName" && c.status == "False");
            c.context("no ShortName=False condition yet")
        })
        .await?;
        eprintln!("the squatter's condition: {}: {}", condition.reason, condition.message);
        // The owner's service then gets the short name, squatter or not.
        owner.create(&PostParams::default(), &service(name, spec.clone())).await?;
        let owner_ip = harness_mesh_e2e::mesh::wait_mesh_ip(&owner, name).await?;
        eventually(Duration::from_secs(15), || {
            let answer = mesh.dig(&node, server, &short, false)?;
            anyhow::ensure!(
                answer.addresses == [owner_ip],
                "{short} should resolve to the owner's {owner_ip}: {answer:?}"
            );
            Ok(())
        })
        .await?;
        anyhow::Ok(())
    }
    .await;
    release(&squatter, name).await?;
    release(&owner, name).await?;
    outcome
}
