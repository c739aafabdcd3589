//! Attacks on the lab (issue 17): one test per attack, each run against the real lab and seen
//! succeeding against the code before its fix. A test passes when the attack fails.
//!
//! - [`tunnel`]: a peer or an underlay neighbour tries to use a node as a router (plain lab);
//! - [`pod_network`]: the same towards pod IPs and node ports (kubelet lab only: `make
//!   kubelet-e2e` runs `attacks -- pod_network:: listeners::`);
//! - [`controller`]: objects written to turn the controller against other members (copied keys,
//!   forged endpoints, name collisions, IP hold-back across a restart);
//! - [`api`]: what the API admits from agents and tenants (status forgery, oversized status,
//!   cross-namespace placement, short-name squatting, slow endpoints);
//! - [`machine`]: meshctl's reads and an enrolled machine's name;
//! - [`listeners`]: the agent's own ports, with the chart as installed (kubelet lab only).
//!
//! Every test creates objects under names of its own and tolerates everything else in the lab.
//! The tests take turns ([`SERIAL`]), across modules too: one pauses the lab's controller and
//! fills the pool, others add peers that never handshake, and a test beside them would see
//! that.

#[path = "attacks/api.rs"]
mod api;
#[path = "attacks/controller.rs"]
mod controller;
#[cfg(feature = "kubelet-lab")]
#[path = "attacks/listeners.rs"]
mod listeners;
#[path = "attacks/machine.rs"]
mod machine;
#[cfg(feature = "kubelet-lab")]
#[path = "attacks/pod_network.rs"]
mod pod_network;
#[path = "attacks/tunnel.rs"]
mod tunnel;

/// One attack at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
