//! Objects for the rules' unit tests, built from the JSON a user or an agent would write.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use mesh_api::{MeshNode, MeshService};
use serde_json::{Value, json};

/// A MeshService `namespace/name` with `spec` (network type mesh, port 80, unless `spec` says).
pub fn service(namespace: &str, name: &str, spec: Value) -> MeshService {
    let mut full = json!({"network": {"type": "mesh", "ports": [80]}});
    if let (Some(full), Some(spec)) = (full.as_object_mut(), spec.as_object()) {
        full.extend(spec.clone());
    }
    serde_json::from_value(json!({
        "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshService",
        "metadata": {"name": name, "namespace": namespace, "generation": 1},
        "spec": full,
    }))
    .expect("a valid MeshService")
}

/// A MeshNode `name` with `spec`, `status` and extra `metadata`, created at second `created`.
pub fn mesh_node(name: &str, created: i64, metadata: Value, spec: Value, status: Value) -> Arc<MeshNode> {
    let mut meta = json!({"name": name, "generation": 1, "creationTimestamp": time(created)});
    if let (Some(meta), Some(extra)) = (meta.as_object_mut(), metadata.as_object()) {
        meta.extend(extra.clone());
    }
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode",
            "metadata": meta, "spec": spec, "status": status,
        }))
        .expect("a valid MeshNode"),
    )
}

/// A plain MeshNode with an agent that published `key` (no key: `null`).
pub fn agent_node(name: &str, key: Option<&str>) -> Arc<MeshNode> {
    mesh_node(name, 100, json!({}), json!({}), json!({"publicKey": key, "backend": "kernel"}))
}

/// A Kubernetes Node `name` with uid `uid`, `labels`, pod CIDRs and addresses.
pub fn k8s_node(name: &str, uid: &str, labels: Value, pod_cidrs: &[&str], addresses: &[&str]) -> Arc<Node> {
    let addresses: Vec<Value> = addresses.iter().map(|a| json!({"type": "InternalIP", "address": a})).collect();
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": name, "uid": uid, "labels": labels},
            "spec": {"podCIDRs": pod_cidrs},
            "status": {"addresses": addresses},
        }))
        .expect("a valid Node"),
    )
}

/// A Pod `namespace/name` with `labels` on `node`, created at second `created`.
pub fn pod(namespace: &str, name: &str, labels: Value, node: &str, created: i64, ready: bool, ip: &str) -> Arc<Pod> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": namespace, "labels": labels, "creationTimestamp": time(created)},
            "spec": {"nodeName": node, "containers": []},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        }))
        .expect("a valid Pod"),
    )
}

/// RFC 3339 text of second `s`.
pub fn time(s: i64) -> String {
    Timestamp::from_second(s).expect("a time").to_string()
}

/// The condition `type_` of `conditions`, as (status, reason, message).
pub fn condition(conditions: &[Condition], type_: &str) -> Option<(String, String, String)> {
    conditions.iter().find(|c| c.type_ == type_).map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// `conditions` with every transition time set to second `s` (as the API would have them from
/// an earlier write).
pub fn aged(mut conditions: Vec<Condition>, s: i64) -> Vec<Condition> {
    for c in &mut conditions {
        c.last_transition_time = Time(Timestamp::from_second(s).expect("a time"));
    }
    conditions
}
