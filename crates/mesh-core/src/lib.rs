//! The pure core of harness-mesh: the rules and algorithms that the controller, the agent and
//! `meshctl` share, with no dependency on kube, tokio or netlink, so that they are unit- and
//! property-tested without a cluster or root.
//!
//! - [`address`]: what counts as a mesh IP and as a WireGuard endpoint (`host:port`). The API's
//!   CEL rules enforce the same grammar on the server; the e2e suite checks that both agree.
//! - [`ipam`]: the mesh subnet's address pool: no address ever has two owners.

pub mod address;
pub mod ipam;

pub use address::{Endpoint, EndpointHost, ParseEndpointError, parse_mesh_ip};
pub use ipam::{IpamError, Owner, Pool, Subnet};
