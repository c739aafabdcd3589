//! Simulated harness-mesh agents, for `make bench`: hundreds of nodes in one process against
//! the real API server and the real mesh-controller.
//!
//! Each simulated node runs the agent's own code for everything that decides what a node does
//! — the directory watch (`mesh_agent::directory`), the pure plan (`mesh_plan`: peers, hosted
//! services, nftables ruleset, DNS zone, applied-peers digest), the executor
//! (`mesh_agent::executor`: device diff with `mesh_wireguard::plan`, then the status write with
//! `mesh_agent::status`, server-side apply under the agent's field manager) and the Lease
//! renewal — and replaces what touches the machine with records:
//!
//! - [`recording`]: a data plane (device, link, ruleset, zone) that records what it is given;
//! - [`node`]: one node: plan and executor, as the agent's sync;
//! - [`fleet`]: many nodes in one process, sharing a few directory watches, with the timing
//!   of when each node applied a given service.

pub mod fleet;
pub mod node;
pub mod recording;

pub use fleet::{Config, Fleet, Totals};
pub use node::{SimNode, Target};
