//! The pure plan of one harness-mesh node: what its agent should configure, computed from one
//! state of the directory (every MeshNode and MeshService) and the node's own identity and
//! settings. No kube client, tokio or netlink: the agent, the simulator (`mesh-sim`) and
//! `meshctl` all run this same code.
//!
//! - [`convert`]: the API objects as the data plane's plain inputs (peer entries, node
//!   addresses, placements, DNS inputs), with endpoint names resolved by a callback the caller
//!   supplies (resolution is impure);
//! - [`plan`]: [`Directory`], what every node reading one directory state derives alike (entries,
//!   placements indexed by node, DNS zone), computed once per change (and kept up to date
//!   across changes by converting only the objects that changed); and [`NodePlan`], the
//!   per-node part (WireGuard device config, hosted IPs, link addresses, nftables ruleset, DNS
//!   listen addresses, the applied-peers digest, probe targets);
//! - [`relay`]: the peers a node reaches through a relay when it has no direct path to them.

pub mod convert;
pub mod plan;
pub mod relay;

pub use plan::{Directory, LinkAddresses, Local, NodeInput, NodePlan, NodeSettings, PlanError, Updated};
