//! What the controller's watch caches keep of each object: only the fields it reads, applied to
//! every watch event before the cache (`WatchStreamExt::modify`), so that memory follows the
//! number of objects, not what others write into them.
//!
//! - every object: no `managedFields` (often the largest part of a small object);
//! - MeshNodes: of the annotations, only `mesh.harness.dev/enrolled-via` (it tells an enrolled
//!   machine's MeshNode apart) and `mesh.harness.dev/connect-owner` (an ephemeral member of
//!   `meshctl connect`: collected when its Lease lapses, ephemeral.rs, and the only node its
//!   owner's services may be placed on); MeshServices: only `mesh.harness.dev/connect-owner`;
//! - Pods: the controller must see every Pod that a MeshService's selector may match, and
//!   selectors change at any time, so no label selector can narrow the watch, and a metadata-only
//!   watch lacks the node, the readiness and the pod IP. So every Pod is watched, and the cache
//!   keeps only its name, namespace, labels, creation and deletion times, `spec.nodeName`,
//!   `spec.hostNetwork`, the `Ready` condition and the pod IPs: no containers, volumes,
//!   container statuses or annotations;
//! - Nodes: name, uid, deletion time, `spec.podCIDR(s)` and `status.addresses`; no images,
//!   conditions or node info.
//!
//! Measured on the plain lab (debug build, RSS after the first full sync, 1000 Pods with two
//! containers, 15 env vars each and a 1.5 KB annotation): 112 MB before this trimming, 80 MB
//! with it; 27 MB either way without Pods. The first list still arrives as full objects (one
//! page of 500 at a time) before it is trimmed, so the peak is a page's worth, not the cluster's.

use k8s_openapi::api::core::v1::{Node, NodeSpec, NodeStatus, Pod, PodCondition, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use mesh_api::{CONNECT_OWNER_ANNOTATION, MeshNode, MeshService};

/// The annotation `meshctl enroll` puts on an enrolled machine's MeshNode (where it was
/// enrolled from; crates/meshctl/src/enroll/api.rs): the Node mirror leaves such a MeshNode alone.
pub const ENROLLED_VIA: &str = "mesh.harness.dev/enrolled-via";

/// The metadata the controller reads of a Pod or a Node.
fn slim_meta(meta: &mut ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        uid: meta.uid.take(),
        resource_version: meta.resource_version.take(),
        labels: meta.labels.take(),
        creation_timestamp: meta.creation_timestamp.take(),
        deletion_timestamp: meta.deletion_timestamp.take(),
        ..ObjectMeta::default()
    }
}

/// Trims a Pod to what selector-backed services read (see the module docs).
pub fn trim_pod(pod: &mut Pod) {
    pod.metadata = slim_meta(&mut pod.metadata);
    pod.spec = pod.spec.take().map(|spec| PodSpec {
        node_name: spec.node_name,
        host_network: spec.host_network,
        containers: Vec::new(),
        ..PodSpec::default()
    });
    pod.status = pod.status.take().map(|status| PodStatus {
        conditions: status.conditions.map(|conditions| {
            conditions
                .into_iter()
                .filter(|c| c.type_ == "Ready")
                .map(|c| PodCondition { type_: c.type_, status: c.status, ..PodCondition::default() })
                .collect()
        }),
        pod_ip: status.pod_ip,
        pod_ips: status.pod_ips,
        ..PodStatus::default()
    });
}

/// Trims a Node to what the mirror and the MeshNode reconcile read.
pub fn trim_node(node: &mut Node) {
    node.metadata = slim_meta(&mut node.metadata);
    node.spec = node.spec.take().map(|spec| NodeSpec {
        pod_cidr: spec.pod_cidr,
        pod_cidrs: spec.pod_cidrs,
        ..NodeSpec::default()
    });
    node.status = node.status.take().map(|status| NodeStatus { addresses: status.addresses, ..NodeStatus::default() });
}

/// Drops a MeshNode's managed fields and every annotation but [`ENROLLED_VIA`] and
/// [`CONNECT_OWNER_ANNOTATION`].
pub fn trim_mesh_node(node: &mut MeshNode) {
    node.metadata.managed_fields = None;
    if let Some(annotations) = node.metadata.annotations.as_mut() {
        annotations.retain(|k, _| k == ENROLLED_VIA || k == CONNECT_OWNER_ANNOTATION);
    }
}

/// Drops a MeshService's managed fields and every annotation but [`CONNECT_OWNER_ANNOTATION`].
pub fn trim_mesh_service(service: &mut MeshService) {
    service.metadata.managed_fields = None;
    let owner = service.metadata.annotations.take().and_then(|mut a| a.remove_entry(CONNECT_OWNER_ANNOTATION));
    service.metadata.annotations = owner.map(|(k, v)| std::iter::once((k, v)).collect());
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_pod_keeps_what_hosting_reads_and_nothing_else() {
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": {"app": "web"},
                "annotations": {"big": "x".repeat(1000)}, "creationTimestamp": "2026-01-01T00:00:00Z",
                "managedFields": [{"manager": "kubelet"}]},
            "spec": {"nodeName": "n1", "hostNetwork": false, "containers": [{"name": "c", "image": "i"}]},
            "status": {"podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}],
                "conditions": [{"type": "Ready", "status": "True", "message": "m"}, {"type": "Initialized", "status": "True"}],
                "containerStatuses": [{"name": "c", "image": "i", "imageID": "", "ready": true, "restartCount": 0}]},
        }))
        .unwrap();
        trim_pod(&mut pod);
        assert_eq!(
            serde_json::to_value(&pod).unwrap(),
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": {"app": "web"},
                    "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"nodeName": "n1", "hostNetwork": false, "containers": []},
                "status": {"podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}],
                    "conditions": [{"type": "Ready", "status": "True"}]},
            })
        );
    }

    #[test]
    fn a_node_keeps_its_addresses_and_pod_cidrs() {
        let mut node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1", "uid": "u", "annotations": {"a": "b"}},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"], "providerID": "x"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.5"}],
                "images": [{"names": ["a"], "sizeBytes": 1}], "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap();
        trim_node(&mut node);
        assert_eq!(
            serde_json::to_value(&node).unwrap(),
            json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "n1", "uid": "u"},
                "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
                "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.5"}]},
            })
        );
    }

    #[test]
    fn a_mesh_node_keeps_only_the_enrolled_and_connect_owner_annotations() {
        let mut node: MeshNode = serde_json::from_value(json!({
            "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode",
            "metadata": {"name": "m", "annotations": {ENROLLED_VIA: "ssh://root@h:22", "other": "x",
                CONNECT_OWNER_ANNOTATION: "alice"},
                "managedFields": [{"manager": "meshctl"}]},
            "spec": {},
        }))
        .unwrap();
        trim_mesh_node(&mut node);
        assert_eq!(node.metadata.managed_fields, None);
        let mut kept = node.metadata.annotations.unwrap().into_keys().collect::<Vec<_>>();
        kept.sort();
        assert_eq!(kept, [CONNECT_OWNER_ANNOTATION, ENROLLED_VIA]);
    }

    #[test]
    fn a_mesh_service_keeps_only_the_connect_owner_annotation() {
        let service = |annotations: serde_json::Value| -> MeshService {
            serde_json::from_value(json!({
                "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshService",
                "metadata": {"name": "s", "namespace": "ns", "annotations": annotations,
                    "managedFields": [{"manager": "meshctl"}]},
                "spec": {"network": {"type": "mesh", "ports": [80]}},
            }))
            .unwrap()
        };
        let mut owned = service(json!({CONNECT_OWNER_ANNOTATION: "alice", "big": "x".repeat(100)}));
        trim_mesh_service(&mut owned);
        assert_eq!(owned.metadata.managed_fields, None);
        assert_eq!(
            owned.metadata.annotations.unwrap().into_iter().collect::<Vec<_>>(),
            [(CONNECT_OWNER_ANNOTATION.to_owned(), "alice".to_owned())]
        );
        let mut plain = service(json!({"big": "x"}));
        trim_mesh_service(&mut plain);
        assert_eq!(plain.metadata.annotations, None);
    }
}
