//! The mesh.harness.dev API on a real kube-apiserver: the CRDs install and become Established,
//! valid objects are accepted, malformed ones are rejected by the API server itself with a
//! message that names the field, and kubectl shows the printer columns and the descriptions.

use std::time::{Duration, Instant};

use harness_mesh_e2e::Cluster;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use mesh_api::{MeshNode, MeshService};
use serde_json::{Value, json};

fn api_for(cluster: &Cluster, kind: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(mesh_api::GROUP, mesh_api::VERSION, kind);
    let resource = ApiResource::from_gvk(&gvk);
    match kind {
        "MeshService" => Api::namespaced_with(cluster.client.clone(), "default", &resource),
        _ => Api::all_with(cluster.client.clone(), &resource),
    }
}

fn object(kind: &str, name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": format!("{}/{}", mesh_api::GROUP, mesh_api::VERSION),
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("a valid object skeleton")
}

/// Creates the object with a server-side dry run: the API server runs defaulting, the schema
/// and every CEL rule, but stores nothing.
async fn dry_run_create(cluster: &Cluster, kind: &str, obj: &DynamicObject) -> Result<DynamicObject, kube::Error> {
    api_for(cluster, kind).create(&PostParams { dry_run: true, ..Default::default() }, obj).await
}

#[tokio::test]
async fn both_crds_are_established_with_their_names() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    let out = cluster.kubectl_ok(&["get", "crd", "-o", "name"])?;
    assert!(out.contains("meshnodes.mesh.harness.dev"), "{out}");
    assert!(out.contains("meshservices.mesh.harness.dev"), "{out}");
    // Short names and the category resolve on the server.
    for resource in ["mn", "ms", "mesh", "meshnodes", "meshservices"] {
        cluster.kubectl_ok(&["get", resource, "-A"])?;
    }
    Ok(())
}

#[tokio::test]
async fn valid_objects_are_accepted_and_defaulted() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    let services = [
        // The seed's own snippet, as written.
        json!({"network": {"type": "mesh", "ports": [8000, 8020]}, "selector": {"app": "graph-node"}}),
        json!({"network": {"type": "dual", "ports": [53]}, "node": "worker-1", "meshIP": "10.42.7.7"}),
        json!({"network": {"type": "host"}, "node": "edge.example.com"}),
        json!({"network": {"ports": [1, 65535]}, "selector": {"app.kubernetes.io/name": "x", "tier": ""}}),
        // A mapped port, and one that is not.
        json!({"network": {"ports": [8000, 8020], "targetPorts": [{"port": 8000, "targetPort": 80}]}, "node": "w"}),
        // A container on a node's engine, with a mapped port.
        json!({"network": {"ports": [8000], "targetPorts": [{"port": 8000, "targetPort": 80}]}, "node": "w",
            "container": {"name": "graph-node_1.b"}}),
    ];
    for spec in services {
        // A name of the test's own: a dry-run create still fails when the name is taken (by the
        // examples' graph-node, say).
        let created =
            dry_run_create(&cluster, "MeshService", &object("MeshService", "e2e-api-graph-node", spec.clone())).await;
        let created = created.map_err(|e| anyhow::anyhow!("{spec} was refused: {e}"))?;
        let typed: MeshService = serde_json::from_value(serde_json::to_value(&created)?)?;
        assert!(!typed.spec.network.type_.eq(&mesh_api::NetworkType::Host) || typed.spec.mesh_ip.is_none());
    }

    let nodes = [
        json!({}),
        json!({"endpoint": "203.0.113.10:51820", "listenPort": 51821, "meshIP": "10.42.0.10", "persistentKeepalive": 25}),
        json!({"endpoint": "[2001:db8::1]:51820", "persistentKeepalive": 0}),
        json!({"endpoint": "wg.example.com:1"}),
    ];
    for spec in nodes {
        if let Some(endpoint) = spec.get("endpoint").and_then(Value::as_str) {
            assert!(mesh_core::Endpoint::parse(endpoint).is_ok(), "mesh-core must accept {endpoint}");
        }
        let created = dry_run_create(&cluster, "MeshNode", &object("MeshNode", "e2e-api-worker-1", spec.clone())).await;
        let created = created.map_err(|e| anyhow::anyhow!("{spec} was refused: {e}"))?;
        let typed: MeshNode = serde_json::from_value(serde_json::to_value(&created)?)?;
        let expected_port = spec.get("listenPort").and_then(Value::as_i64).unwrap_or(51820);
        assert_eq!(i64::from(typed.spec.listen_port), expected_port, "listenPort defaults to 51820");
    }
    Ok(())
}

/// One malformed object: what it is, the spec (or name) that makes it malformed, and the
/// fragments the API server's message must contain (the field path first).
struct Malformed {
    kind: &'static str,
    name: &'static str,
    spec: Value,
    expect: &'static [&'static str],
}

fn service(spec: Value, expect: &'static [&'static str]) -> Malformed {
    Malformed { kind: "MeshService", name: "e2e-api-bad-service", spec, expect }
}

fn node(spec: Value, expect: &'static [&'static str]) -> Malformed {
    Malformed { kind: "MeshNode", name: "e2e-api-bad-node", spec, expect }
}

fn malformed_objects() -> Vec<Malformed> {
    let sel = json!({"app": "x"});
    let too_many_ports: Vec<u32> = (1..=65).collect();
    vec![
        service(
            json!({"network": {"type": "overlay", "ports": [80]}, "selector": sel}),
            &["spec.network.type", "Unsupported value", "\"mesh\""],
        ),
        service(
            json!({"network": {"ports": [0]}, "selector": sel}),
            &["spec.network.ports[0]", "greater than or equal to 1"],
        ),
        service(
            json!({"network": {"ports": [65536]}, "selector": sel}),
            &["spec.network.ports[0]", "less than or equal to 65535"],
        ),
        service(
            json!({"network": {"ports": [8000, 8000]}, "selector": sel}),
            &["spec.network.ports[1]", "Duplicate value"],
        ),
        service(json!({"network": {"ports": ["http"]}, "selector": sel}), &["spec.network.ports[0]", "integer"]),
        service(
            json!({"network": {"ports": too_many_ports}, "selector": sel}),
            &["spec.network.ports", "must have at most 64 items"],
        ),
        service(json!({"network": {"type": "mesh"}, "selector": sel}), &["spec.network.ports", "at least one port"]),
        service(json!({"selector": sel}), &["spec.network", "Required value"]),
        service(
            json!({"network": {"ports": [80]}, "selector": sel, "node": "worker-1"}),
            &["spec.node", "mutually exclusive"],
        ),
        service(json!({"network": {"ports": [80]}}), &["spec", "one of spec.selector", "spec.node"]),
        service(json!({"network": {"ports": [80]}, "selector": {}}), &["spec.selector", "at least 1"]),
        service(
            json!({"network": {"ports": [80]}, "selector": {"app": "has space"}}),
            &["spec.selector.app", "should match"],
        ),
        service(json!({"network": {"ports": [80]}, "node": "Worker_1"}), &["spec.node", "should match"]),
        service(
            json!({"network": {"ports": [80]}, "node": "w", "meshIP": "10.42.7.7/32"}),
            &["spec.meshIP", "plain IPv4"],
        ),
        service(json!({"network": {"ports": [80]}, "node": "w", "meshIP": "fd00::7"}), &["spec.meshIP", "plain IPv4"]),
        service(
            json!({"network": {"ports": [80]}, "node": "w", "meshIP": "010.42.0.7"}),
            &["spec.meshIP", "plain IPv4"],
        ),
        service(
            json!({"network": {"type": "host"}, "node": "w", "meshIP": "10.42.7.7"}),
            &["spec.meshIP", "type is host"],
        ),
        service(
            json!({"network": {"ports": [8000], "targetPorts": [{"port": 8020, "targetPort": 80}]}, "node": "w"}),
            &["spec.network.targetPorts", "must be one of spec.network.ports"],
        ),
        service(
            json!({"network": {"ports": [8000], "targetPorts": [{"port": 8000, "targetPort": 0}]}, "node": "w"}),
            &["spec.network.targetPorts[0].targetPort", "greater than or equal to 1"],
        ),
        service(
            json!({"network": {"ports": [8000], "targetPorts": [{"port": 8000, "targetPort": 80}, {"port": 8000, "targetPort": 81}]}, "node": "w"}),
            &["spec.network.targetPorts[1]", "Duplicate value"],
        ),
        service(
            json!({"network": {"ports": [8000], "targetPorts": [{"port": 8000}]}, "node": "w"}),
            &["spec.network.targetPorts[0].targetPort", "Required value"],
        ),
        service(
            json!({"network": {"type": "host", "targetPorts": [{"port": 8000, "targetPort": 80}]}, "node": "w"}),
            &["spec.network.targetPorts", "type is host"],
        ),
        service(
            json!({"network": {"ports": [80]}, "selector": {"app": "x"}, "container": {"name": "web"}}),
            &["spec.container", "needs spec.node"],
        ),
        service(
            json!({"network": {"type": "dual", "ports": [80]}, "node": "w", "container": {"name": "web"}}),
            &["spec.container", "needs spec.network.type mesh"],
        ),
        service(
            json!({"network": {"ports": [80]}, "node": "w", "container": {"name": "-web"}}),
            &["spec.container.name", "should match"],
        ),
        service(
            json!({"network": {"ports": [80]}, "node": "w", "container": {}}),
            &["spec.container.name", "Required value"],
        ),
        service(
            json!({"network": {"ports": [80]}, "node": "w", "container": {"name": "x".repeat(129)}}),
            &["spec.container.name", "128"],
        ),
        Malformed {
            kind: "MeshService",
            name: "dotted.name",
            spec: json!({"network": {"ports": [80]}, "node": "w"}),
            expect: &["metadata.name", "DNS label"],
        },
        node(json!({"endpoint": "203.0.113.10"}), &["spec.endpoint", "host:port"]),
        node(json!({"endpoint": "wg.example.com:0"}), &["spec.endpoint", "1..65535"]),
        node(json!({"endpoint": "wg.example.com:70000"}), &["spec.endpoint", "1..65535"]),
        node(json!({"endpoint": "[1.2.3.4]:51820"}), &["spec.endpoint", "IPv6"]),
        node(json!({"endpoint": "300.1.1.1:51820"}), &["spec.endpoint", "valid IPv4"]),
        node(json!({"endpoint": "2001:db8::1:51820"}), &["spec.endpoint", "host:port"]),
        node(json!({"listenPort": 0}), &["spec.listenPort", "greater than or equal to 1"]),
        node(json!({"listenPort": 65536}), &["spec.listenPort", "less than or equal to 65535"]),
        node(json!({"persistentKeepalive": -1}), &["spec.persistentKeepalive", "greater than or equal to 0"]),
        node(json!({"meshIP": "10.42.0.256"}), &["spec.meshIP", "plain IPv4"]),
    ]
}

#[tokio::test]
async fn malformed_objects_are_rejected_naming_the_field() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    let cases = malformed_objects();
    assert!(cases.len() >= 15);
    let mut failures = Vec::new();
    for case in &cases {
        // The offline parser in mesh-core must agree with the server about endpoints.
        if let Some(endpoint) = case.spec.get("endpoint").and_then(Value::as_str) {
            assert!(mesh_core::Endpoint::parse(endpoint).is_err(), "mesh-core accepted {endpoint}");
        }
        let obj = object(case.kind, case.name, case.spec.clone());
        match dry_run_create(&cluster, case.kind, &obj).await {
            Ok(_) => failures.push(format!("{} {} was accepted", case.kind, case.spec)),
            Err(kube::Error::Api(status)) => {
                let missing: Vec<_> = case.expect.iter().filter(|f| !status.message.contains(**f)).collect();
                if status.code != 422 || !missing.is_empty() {
                    failures.push(format!(
                        "{} {}: code {} message {:?} lacks {missing:?}",
                        case.kind, case.spec, status.code, status.message
                    ));
                }
            }
            Err(other) => failures.push(format!("{} {}: unexpected error {other}", case.kind, case.spec)),
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
    Ok(())
}

#[tokio::test]
async fn kubectl_shows_printer_columns_and_explains_fields() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    let services = api_for(&cluster, "MeshService");
    let nodes = api_for(&cluster, "MeshNode");
    let name = "e2e-printer-columns";
    let _ = services.delete(name, &DeleteParams::default()).await;
    let _ = nodes.delete(name, &DeleteParams::default()).await;
    services
        .create(
            &PostParams::default(),
            &object(
                "MeshService",
                name,
                json!({"network": {"type": "mesh", "ports": [8000, 8020]}, "selector": {"app": name}}),
            ),
        )
        .await?;
    nodes.create(&PostParams::default(), &object("MeshNode", name, json!({"endpoint": "203.0.113.10:51820"}))).await?;

    let ms = cluster.kubectl_ok(&["get", "ms", name, "-n", "default"])?;
    let header: Vec<&str> = ms.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "TYPE", "MESH-IP", "NODE", "PORTS", "READY", "AGE"], "{ms}");
    assert!(ms.contains("mesh") && ms.contains("[8000,8020]"), "{ms}");
    let mn = cluster.kubectl_ok(&["get", "mn", name])?;
    let header: Vec<&str> = mn.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "MESH-IP", "ENDPOINT", "BACKEND", "READY", "AGE"], "{mn}");

    // The OpenAPI v3 document for a new CRD is published a moment after it is Established.
    let deadline = Instant::now() + Duration::from_secs(60);
    let explained = loop {
        let out = cluster.kubectl(&["explain", "meshservice.spec.network"])?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for fragment in
        ["How the service is exposed on the mesh", "ports", "reachable on the mesh IP", "type", "dual", "targetPorts"]
    {
        assert!(explained.contains(fragment), "kubectl explain lacks {fragment:?}:\n{explained}");
    }
    let explained = cluster.kubectl_ok(&["explain", "meshservice.spec.container"])?;
    assert!(explained.contains("Docker or Podman container") && explained.contains("name"), "{explained}");
    let explained = cluster.kubectl_ok(&["explain", "meshnode.spec.persistentKeepalive"])?;
    assert!(explained.contains("keepalive"), "{explained}");

    services.delete(name, &DeleteParams::default()).await?;
    nodes.delete(name, &DeleteParams::default()).await?;
    Ok(())
}
