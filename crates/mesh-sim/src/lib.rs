//! Simulated harness-mesh agents, for `make bench`: hundreds of nodes in one process against
//! the real API server and the real mesh-controller.
//!
//! Each simulated node runs the agent's own code for everything that decides what a node does
//! — the directory watch (`mesh_agent::directory`), its status writes (`mesh_agent::status`,
//! server-side apply under the agent's field manager), the desired peers, hosted services,
//! nftables ruleset and DNS zone (`mesh_dataplane`) and the device diff (`mesh_wireguard::plan`)
//! — and replaces what touches the machine with records:
//!
//! - [`recording`]: a WireGuard device that records the plans applied to it (pure);
//! - [`node`]: one node's sync, step for step the agent's;
//! - [`fleet`]: many nodes in one process, sharing a few directory watches, with the timing
//!   of when each node applied a given service.

pub mod fleet;
pub mod node;
pub mod recording;

pub use fleet::{Config, Fleet, Totals};
pub use node::{SimNode, Snapshot, Target};
