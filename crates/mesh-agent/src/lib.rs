//! The parts of `mesh-agent` that other programs reuse: the directory watch (MeshNodes and
//! MeshServices, read into a `mesh_plan::Directory`), the DNS server (also measured by the
//! `sync_scale` example), the agent's status and Lease writes, and
//! the executor that programs a `mesh_plan::NodePlan` through the [`executor::DataPlane`] and
//! [`executor::StatusSink`] traits.
//!
//! The `mesh-agent` binary uses these modules from here; `mesh-sim` (simulated agents for
//! `make bench`) runs the same code against the real API server with a recording data plane, so
//! what it measures is the agent's own watch, plan, executor and publish path.

pub mod cputime;
pub mod directory;
pub mod dns;
pub mod executor;
pub mod status;
