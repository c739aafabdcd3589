//! `MeshService`: a named service with a mesh IP and a `name.namespace.mesh.local` name.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::schema;

/// Exposes a workload on the mesh under a stable mesh IP and the DNS name
/// `<name>.<namespace>.mesh.local`. The service is backed either by the ready pods that
/// `selector` picks in this namespace, or by a process on the MeshNode named in `node`
/// (host network or a remote machine). The controller allocates the mesh IP and reports where
/// the service is hosted in `status`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mesh.harness.dev",
    version = "v1alpha1",
    kind = "MeshService",
    plural = "meshservices",
    namespaced,
    status = "MeshServiceStatus",
    shortname = "ms",
    category = "mesh",
    doc = "A service on the harness-mesh WireGuard mesh: a stable mesh IP and the name <name>.<namespace>.mesh.local, backed by pods (spec.selector) or by a process on a MeshNode (spec.node).",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.network.type", description = "mesh, host or dual"),
    printcolumn(name = "Mesh-IP", type_ = "string", json_path = ".status.meshIP", description = "the allocated mesh IP"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.node", description = "the MeshNode hosting the service now"),
    printcolumn(name = "Ports", type_ = "string", json_path = ".spec.network.ports", description = "ports reachable on the mesh IP"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new(format!(
        "size(self.metadata.name) <= 63 && self.metadata.name.matches({})",
        schema::cel_string(schema::DNS1123_LABEL_REGEX)
    ))
    .message("metadata.name must be a DNS label (at most 63 lowercase letters, digits and '-'), because it becomes <name>.<namespace>.mesh.local"),
)]
#[x_kube(
    validation = Rule::new("has(self.selector) || has(self.node)")
        .message("one of spec.selector (pods in this namespace) or spec.node (a process on that MeshNode) is required"),
    validation = Rule::new("!(has(self.selector) && has(self.node))")
        .message("spec.selector and spec.node are mutually exclusive: set exactly one")
        .field_path(".node"),
    validation = Rule::new("!has(self.container) || has(self.node)")
        .message("spec.container needs spec.node: the container runs on that MeshNode's container engine")
        .field_path(".container"),
    validation = Rule::new("!has(self.container) || self.network.type == 'mesh'")
        .message("spec.container needs spec.network.type mesh: the container is reached on its mesh IP only, through the hosting node's forward to the container's address")
        .field_path(".container"),
    validation = Rule::new("self.network.type != 'host' || !has(self.meshIP)")
        .message("spec.meshIP must not be set when spec.network.type is host: a host service has no mesh IP")
        .field_path(".meshIP"),
)]
#[serde(rename_all = "camelCase")]
pub struct MeshServiceSpec {
    /// How the service is exposed on the mesh: its network type and the ports reachable on its
    /// mesh IP.
    pub network: NetworkSpec,

    /// Labels of the pods in this namespace that back the service (matchLabels form, at least
    /// one label). The service is hosted on the node of a ready matching pod. Exclusive with
    /// `node`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = schema::match_labels)]
    pub selector: Option<BTreeMap<String, String>>,

    /// Name of the MeshNode whose process backs the service (host network or a remote
    /// machine), or whose container engine runs `container`. Exclusive with `selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = schema::object_name)]
    pub node: Option<String>,

    /// A Docker or Podman container on the MeshNode named in `node` backs the service: that
    /// node's agent finds it through the engine's API, forwards the listed ports of the mesh IP
    /// to the container's address (mapped by `network.targetPorts`), and follows it as it stops,
    /// starts or changes address. The service is Ready only while the container runs. Needs
    /// `node` and network type `mesh`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerRef>,

    /// A specific mesh IP to request, a plain IPv4 address inside the mesh subnet. Honoured when
    /// free; when another object holds it, the service reports an IPConflict condition. Leave
    /// it out to have one allocated. Not allowed for type host.
    #[serde(default, rename = "meshIP", skip_serializing_if = "Option::is_none")]
    #[schemars(transform = schema::mesh_ip)]
    pub mesh_ip: Option<String>,
}

/// The container that backs a MeshService (`spec.container`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ContainerRef {
    /// The container's name in the node's engine (`docker ps` / `podman ps`, NAMES column):
    /// a letter or digit, then letters, digits, `_`, `.` or `-`, at most 128 characters.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$"))]
    pub name: String,
}

/// The service's network block: `{type: mesh, ports: [8000, 8020]}`, and optionally where a
/// port goes behind the mesh IP (`targetPorts: [{port: 8000, targetPort: 80}]`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("self.type == 'host' || (has(self.ports) && size(self.ports) > 0)")
        .message("spec.network.ports must list at least one port for type mesh or dual: only listed ports are reachable on the mesh IP")
        .field_path(".ports"),
    validation = Rule::new("!has(self.targetPorts) || self.targetPorts.all(m, has(self.ports) && m.port in self.ports)")
        .message("spec.network.targetPorts[].port must be one of spec.network.ports: only a listed port can be mapped")
        .field_path(".targetPorts"),
    validation = Rule::new("self.type != 'host' || !has(self.targetPorts)")
        .message("spec.network.targetPorts must not be set when spec.network.type is host: a host service has no mesh IP to map ports on")
        .field_path(".targetPorts"),
)]
pub struct NetworkSpec {
    /// How the service is reached. `mesh`: only on its mesh IP, only on the listed ports.
    /// `host`: no mesh IP; the name resolves to the hosting node's underlay address. `dual`:
    /// both. Defaults to `mesh`.
    #[serde(default, rename = "type")]
    pub type_: NetworkType,

    /// TCP/UDP ports reachable on the mesh IP, each 1..65535 and listed once (at most 64).
    /// Any other connection to the mesh IP is refused (ICMP echo is answered). Required for types
    /// mesh and dual.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(range(min = 1, max = 65535)), length(max = 64), extend("x-kubernetes-list-type" = "set"))]
    pub ports: Vec<i32>,
    /// Where a listed port goes behind the mesh IP, when not to the same port: `{port: 8000,
    /// targetPort: 80}` sends connections to port 8000 of the mesh IP to port 80 of the backing
    /// pod, or of the hosting node's process (which then listens on 80 of the mesh IP or
    /// 0.0.0.0). Each `port` must be listed in `ports` and mapped once (at most 64). The target
    /// port itself is not reachable on the mesh IP unless it is listed too. Not for type host.
    #[serde(default, rename = "targetPorts", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["port"]))]
    pub target_ports: Vec<PortMapping>,
}

/// One port of a MeshService's mesh IP and the port behind it that receives its connections.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    /// The port on the mesh IP, 1..65535: one of `spec.network.ports`.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// The port of the pod or process behind it, 1..65535.
    #[schemars(range(min = 1, max = 65535))]
    pub target_port: i32,
}

/// How a MeshService is reached: `mesh`, `host` or `dual`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "lowercase")]
pub enum NetworkType {
    /// Reachable only on its mesh IP, only on the listed ports.
    #[default]
    Mesh,
    /// No mesh IP; the name resolves to the hosting node's underlay address.
    Host,
    /// Both a mesh IP and the host address.
    Dual,
}

/// What the controller observed and decided for a MeshService.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeshServiceStatus {
    /// The mesh IP allocated to the service (none for type host).
    #[serde(default, rename = "meshIP", skip_serializing_if = "Option::is_none")]
    #[schemars(transform = schema::ipv4)]
    pub mesh_ip: Option<String>,

    /// The service's fully qualified name, `<name>.<namespace>.mesh.local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = schema::dns_name)]
    pub dns_name: Option<String>,

    /// The MeshNode that hosts the service now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = schema::object_name)]
    pub node: Option<String>,

    /// The pod-network IP of the pod that backs the service, when that pod does not use the
    /// host network: the hosting node's agent forwards the listed ports on the mesh IP to it.
    /// Absent for host-network pods and for services backed by a MeshNode's own process.
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    #[schemars(transform = schema::ipv4)]
    pub pod_ip: Option<String>,

    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Kubernetes-style conditions: Ready, Allocated, IPConflict, PoolExhausted, NodeNotFound,
    /// NoReadyPods, ShortName, PlacementDenied. One entry per type, at most 16, messages at
    /// most 8192 characters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(transform = schema::conditions, extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
