//! The `mesh.harness.dev/v1alpha1` API of harness-mesh.
//!
//! - [`MeshNode`] (cluster-scoped, short name `mn`): one WireGuard peer, a Kubernetes node or an
//!   enrolled remote machine. Its agent publishes the public key; the controller allocates the
//!   mesh IP and writes the peer entry every other agent applies.
//! - [`MeshService`] (namespaced, short name `ms`): a named service with a mesh IP and a
//!   `name.namespace.mesh.local` name, backed by pods (selector) or by a process on a node.
//!
//! Everything the API server can judge alone (field formats, ranges, exclusive fields) is
//! enforced by the schema and by CEL `x-kubernetes-validations` generated from these types;
//! what needs the whole cluster (a taken IP, an exhausted pool) is the controller's and shows
//! up as a status condition. [`crds`] renders the CustomResourceDefinitions that `make crds`
//! writes to `crds/`.

pub mod conditions;
mod crd;
mod mesh_node;
mod mesh_service;
mod schema;

pub use crd::{CRD_FILES, crds, render_crd_files};
pub use mesh_node::{
    APPLIED_PEERS_ANNOTATION, AppliedPeers, Backend, ContainerBackend, MeshNode, MeshNodeSpec, MeshNodeStatus,
    PeerEntry, RelayedPeer, agent_lease_name,
};
pub use mesh_service::{
    ContainerRef, MeshService, MeshServiceSpec, MeshServiceStatus, NetworkSpec, NetworkType, PortMapping,
};
pub use schema::{MAX_ALLOWED_IPS, MAX_CONDITION_MESSAGE, MAX_CONDITIONS, MAX_PLACED_SERVICES_PER_NODE};

/// The API group of every harness-mesh resource.
pub const GROUP: &str = "mesh.harness.dev";
/// The API version served (and stored).
pub const VERSION: &str = "v1alpha1";
/// The default WireGuard UDP listen port.
pub const DEFAULT_LISTEN_PORT: i32 = 51820;

/// The annotation `meshctl connect` puts on what it creates (its ephemeral MeshNode, the
/// MeshServices it exposes, and its Lease's holder): the Kubernetes user name of the person
/// connecting. A MeshNode that carries it is *ephemeral*: mesh-controller deletes it, with the
/// MeshServices of the same owner placed on it, once its Lease `mesh-agent-<name>` (held by the
/// same user) has not been renewed for [`EPHEMERAL_GRACE_SECONDS`] past its duration. The
/// chart's admission policy lets a connecting user write only objects that carry their own name
/// here.
pub const CONNECT_OWNER_ANNOTATION: &str = "mesh.harness.dev/connect-owner";

/// Seconds past its Lease's duration after which an ephemeral MeshNode is collected (see
/// [`CONNECT_OWNER_ANNOTATION`]); also how long a new one may go without a Lease.
pub const EPHEMERAL_GRACE_SECONDS: i64 = 15;
