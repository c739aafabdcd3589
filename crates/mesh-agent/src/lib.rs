//! The parts of `mesh-agent` that other programs reuse: the directory watch (MeshNodes and
//! MeshServices → the plain inputs of `mesh-dataplane`) and the agent's status writes.
//!
//! The `mesh-agent` binary uses these modules from here; `mesh-sim` (simulated agents for
//! `make bench`) runs the same code against the real API server, so what it measures is the
//! agent's own watch and publish path.

pub mod directory;
pub mod status;
