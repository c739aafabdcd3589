//! `MeshNode`: one WireGuard peer of the mesh, a Kubernetes node or an enrolled remote machine.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{DEFAULT_LISTEN_PORT, schema};

/// A member of the mesh: a Kubernetes node (mirrored by the controller) or a remote Linux
/// machine (enrolled with `meshctl enroll`). It is reachable as `<name>.node.mesh.local` on its
/// mesh IP. The node's agent owns its WireGuard key pair and publishes only the public key; the
/// controller allocates the mesh IP and writes the peer entry that every other agent applies.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mesh.harness.dev",
    version = "v1alpha1",
    kind = "MeshNode",
    plural = "meshnodes",
    status = "MeshNodeStatus",
    shortname = "mn",
    category = "mesh",
    doc = "A member of the harness-mesh WireGuard mesh: a Kubernetes node or an enrolled remote machine, reachable as <name>.node.mesh.local on its mesh IP.",
    printcolumn(
        name = "Mesh-IP",
        type_ = "string",
        json_path = ".status.meshIP",
        description = "the allocated mesh IP"
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.endpoint",
        description = "the effective WireGuard endpoint"
    ),
    printcolumn(
        name = "Backend",
        type_ = "string",
        json_path = ".status.backend",
        description = "kernel, userspace or none"
    ),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct MeshNodeSpec {
    /// Overrides the detected underlay endpoint that other nodes send WireGuard packets to, as
    /// `host:port` (IPv4, bracketed IPv6 or a DNS name). Set it for a node behind NAT or with
    /// several addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = schema::endpoint)]
    pub endpoint: Option<String>,

    /// UDP port the node's WireGuard interface listens on, 1..65535. Defaults to 51820.
    #[serde(default = "default_listen_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub listen_port: i32,

    /// A specific mesh IP to request, a plain IPv4 address inside the mesh subnet. Honoured when
    /// free; otherwise the node reports an IPConflict condition. Leave it out to have one
    /// allocated.
    #[serde(default, rename = "meshIP", skip_serializing_if = "Option::is_none")]
    #[schemars(transform = schema::mesh_ip)]
    pub mesh_ip: Option<String>,

    /// Seconds between keepalive packets, 0..65535. Other peers send them to this node, and this
    /// node's agent sends them to every peer (a peer's own shorter interval wins); 0 or unset
    /// turns keepalives off. Set it (25 is usual) for a node behind NAT, whose own keepalives keep
    /// the NAT's mapping open so that the peers' packets to the learned address get through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub persistent_keepalive: Option<i32>,

    /// Namespaces whose MeshServices may be hosted on this node through `spec.node` (a process
    /// on the node). `["*"]` allows every namespace, `[]` none. Unset: mesh-controller's default
    /// (`--placement-namespaces`, chart value `mesh.placementNamespaces`, default `[default]`),
    /// except on control-plane nodes (a Node labelled `node-role.kubernetes.io/control-plane`),
    /// where no namespace may unless listed here. A MeshService in another namespace gets no
    /// placement and a `PlacementDenied` condition. Pod-backed services (`spec.selector`) are
    /// not affected: they are hosted where their pods run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = schema::namespace_list)]
    pub service_namespaces: Option<Vec<String>>,

    /// This node relays: it carries mesh traffic between two members that have no direct
    /// WireGuard path to each other (both behind NAT, say). Set it on a node every member
    /// reaches (a public endpoint). Its agent then forwards between peers on the WireGuard
    /// interface, and a member whose handshake with a peer has not succeeded for a few seconds
    /// sends that peer's traffic through a relay instead, while it keeps trying the direct path
    /// (which wins again as soon as a handshake succeeds). Members trust a relay with the
    /// addresses of the peers it carries, so only an administrator sets this field (agents
    /// cannot write a MeshNode's spec). Unset: false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<bool>,
}

fn default_listen_port() -> i32 {
    DEFAULT_LISTEN_PORT
}

impl Default for MeshNodeSpec {
    fn default() -> Self {
        Self {
            endpoint: None,
            listen_port: DEFAULT_LISTEN_PORT,
            mesh_ip: None,
            persistent_keepalive: None,
            service_namespaces: None,
            relay: None,
        }
    }
}

/// Which WireGuard implementation a node's agent runs.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The kernel's WireGuard module.
    Kernel,
    /// A userspace WireGuard on a tun device.
    Userspace,
    /// No tunnel (fallback): the node stays in the directory, its services at host addresses.
    None,
}

/// The WireGuard peer entry of a node, written by the controller and applied by every other
/// node's agent.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PeerEntry {
    /// The node's WireGuard public key (base64).
    #[schemars(transform = schema::wireguard_key)]
    pub public_key: String,

    /// Where other peers send this node's packets, `host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = schema::endpoint)]
    pub endpoint: Option<String>,

    /// Addresses this peer may send from and receive for: its mesh IP and the mesh IPs of the
    /// services it hosts, as /32 CIDRs (at most 1024). Agents apply only /32s inside the mesh
    /// subnet and drop any other entry.
    #[serde(default, rename = "allowedIPs")]
    #[schemars(transform = schema::allowed_ips, extend("x-kubernetes-list-type" = "set"))]
    pub allowed_ips: Vec<String>,

    /// Keepalive interval in seconds other peers use towards this node; absent means off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub persistent_keepalive: Option<i32>,
}

/// The peer set a node's agent has applied: how many peers, and a digest of their entries
/// (`mesh_dataplane::desired::digest`), which equals the digest of what the directory asks for
/// once the node has converged. The agent reports it in its Lease's
/// [`APPLIED_PEERS_ANNOTATION`], not in the MeshNode status (which would cost a write per change).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AppliedPeers {
    /// Peers on the device.
    #[schemars(range(min = 0))]
    pub count: i32,
    /// 16 hex digits: FNV-1a 64 of the applied entries in canonical form.
    #[schemars(transform = schema::digest)]
    pub digest: String,
}

/// The annotation on an agent's liveness Lease ([`agent_lease_name`]) that carries the peer set
/// the agent has applied, as `<count> <digest>` ([`AppliedPeers::to_annotation`]). It rides on
/// the Lease renewal the agent makes every few seconds anyway, so reporting convergence costs no
/// API write per change in the mesh.
pub const APPLIED_PEERS_ANNOTATION: &str = "mesh.harness.dev/applied-peers";

/// The name of the liveness Lease the agent of MeshNode `node` renews: `mesh-agent-<node>`, in
/// the namespace harness-mesh is installed in.
pub fn agent_lease_name(node: &str) -> String {
    format!("mesh-agent-{node}")
}

impl AppliedPeers {
    /// The value of [`APPLIED_PEERS_ANNOTATION`]: `<count> <digest>`.
    pub fn to_annotation(&self) -> String {
        format!("{} {}", self.count, self.digest)
    }

    /// Reads an [`APPLIED_PEERS_ANNOTATION`] value; `None` unless it is a count of 0 or more and
    /// a 16-hex-digit digest, separated by one space.
    pub fn from_annotation(text: &str) -> Option<Self> {
        let (count, digest) = text.split_once(' ')?;
        let count: i32 = count.parse().ok().filter(|c| *c >= 0)?;
        let hex = digest.len() == 16 && digest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        hex.then(|| Self { count, digest: digest.to_owned() })
    }
}

/// A peer this node reaches through a relay, not directly (`status.relayedPeers`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct RelayedPeer {
    /// The peer's MeshNode name.
    #[schemars(length(max = 253))]
    pub peer: String,
    /// The relay's MeshNode name (a node with `spec.relay: true`).
    #[schemars(length(max = 253))]
    pub via: String,
}

/// What the node's agent found of the container behind one of the MeshServices it hosts
/// (`status.containers`): the controller turns it into the service's Ready condition.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct ContainerBackend {
    /// The MeshService, `namespace/name`.
    #[schemars(length(max = 317))]
    pub service: String,
    /// The container it names (`spec.container.name`).
    #[schemars(length(max = 128))]
    pub container: String,
    /// Whether the container runs with an address the agent forwards to.
    pub ready: bool,
    /// The container's IPv4 address, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = schema::ipv4)]
    pub ip: Option<String>,
    /// Why (CamelCase): `Running`, `NotRunning`, `NotFound`, `NoAddress`, `NoEngine`.
    #[schemars(length(max = 64))]
    pub reason: String,
    /// What the agent saw, for people.
    #[schemars(length(max = 1024))]
    pub message: String,
}

/// What the controller and the node's agent report for a MeshNode.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeshNodeStatus {
    /// The node's mesh IP, allocated by the controller.
    #[serde(default, rename = "meshIP", skip_serializing_if = "Option::is_none")]
    #[schemars(transform = schema::ipv4)]
    pub mesh_ip: Option<String>,

    /// The node's WireGuard public key, published by its agent. The private key never leaves
    /// the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = schema::wireguard_key)]
    pub public_key: Option<String>,

    /// The effective underlay endpoint, `host:port`: `spec.endpoint`, or what the agent
    /// detected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = schema::endpoint)]
    pub endpoint: Option<String>,

    /// The UDP port the agent's WireGuard interface actually listens on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub listen_port: Option<i32>,

    /// The WireGuard implementation the agent runs: kernel, userspace, or none (fallback; the
    /// Ready condition says why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,

    /// The peer entry other nodes apply for this node, written by the controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerEntry>,

    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The peers this node's agent reaches through a relay because no direct WireGuard
    /// handshake with them succeeds (the `Relayed` condition says why), at most 1024. Written by
    /// the agent; empty when every path is direct.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub relayed_peers: Vec<RelayedPeer>,

    /// The containers behind the MeshServices this node hosts (`spec.container`), as its agent
    /// finds them in the node's container engine, at most 512. Written by the agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 512), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["service"]))]
    pub containers: Vec<ContainerBackend>,

    /// Kubernetes-style conditions: Ready, Allocated, IPConflict, PoolExhausted, Connected, Relayed, ContainerEngine. One
    /// entry per type, at most 16, messages at most 8192 characters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(transform = schema::conditions, extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::AppliedPeers;

    #[test]
    fn the_applied_peers_annotation_reads_back_what_it_wrote() {
        let applied = AppliedPeers { count: 3, digest: "0123456789abcdef".to_owned() };
        assert_eq!(applied.to_annotation(), "3 0123456789abcdef");
        assert_eq!(AppliedPeers::from_annotation(&applied.to_annotation()), Some(applied));
    }

    #[test]
    fn a_malformed_applied_peers_annotation_reads_as_none() {
        for text in [
            "",
            "3",
            "-1 0123456789abcdef",
            "3 0123456789ABCDEF",
            "3 0123",
            "3  0123456789abcdef",
            "x 0123456789abcdef",
        ] {
            assert_eq!(AppliedPeers::from_annotation(text), None, "{text:?}");
        }
    }
}
