//! The node's side of the mesh as pure functions of what the API says, with no kube, tokio or
//! netlink in sight:
//!
//! - [`desired`]: the WireGuard peers a node applies (every other node's peer entry) and the
//!   service IPs it hosts;
//! - [`dns`]: the records of the `mesh.local` zone, and the names withheld (ambiguous or reserved);
//! - [`firewall`]: the nftables ruleset that keeps a `mesh` service's IP closed but for its
//!   listed ports, and the node a member rather than a router (nothing forwarded from the
//!   tunnel, mesh addresses only on the tunnel);
//! - [`health`]: per-peer health from handshake age and probe results, and the bounded summary
//!   that goes into the `Connected` condition;
//! - [`hosts`]: the agent's managed block in `/etc/hosts` (`--resolver hosts`): render, splice
//!   into a file's text, remove.

pub mod desired;
pub mod dns;
pub mod firewall;
pub mod health;
pub mod hosts;
