//! Conditions that only the controller writes: how a refused allocation is reported, and the
//! condition types of what it arbitrates on a MeshNode (see node.rs).

use mesh_api::conditions::{ALLOCATED, IP_CONFLICT, POOL_EXHAUSTED, Want};
use mesh_core::IpamError;

/// The node publishes a public key that another MeshNode published first (the message names
/// it): it gets no peer entry. Also the reason of its Ready=False and of the event.
pub const KEY_CONFLICT: &str = "KeyConflict";
/// The endpoint the agent reported is not published (reason `InvalidEndpoint` or
/// `EndpointNotANodeAddress`; the message says why and what to do).
pub const ENDPOINT_REJECTED: &str = "EndpointRejected";
/// An enrolled machine's MeshNode has the name of a Kubernetes Node, which is not mirrored
/// into it.
pub const NAME_COLLISION: &str = "NameCollision";
/// The Kubernetes Node's pod CIDR overlaps the mesh subnet: no mesh IP. Also the reason of
/// Allocated=False and of the event on the Node.
pub const POD_CIDR_OVERLAP: &str = "PodCIDROverlap";

/// The conditions that report a refused allocation (`Allocated` false, plus `IPConflict` or
/// `PoolExhausted` true when that is why), and the reason shared by them and the event.
pub fn refused(err: &IpamError) -> (&'static str, Vec<Want>) {
    let (reason, type_) = match err {
        IpamError::Taken { .. } | IpamError::HeldBack { .. } => ("IPConflict", Some(IP_CONFLICT)),
        IpamError::Exhausted { .. } | IpamError::ServicesExhausted { .. } => ("PoolExhausted", Some(POOL_EXHAUSTED)),
        IpamError::ReservedForNodes { .. } => ("ReservedForNodes", None),
        _ => ("InvalidMeshIP", None),
    };
    let mut wants = vec![Want::no(ALLOCATED, reason, err.to_string())];
    wants.extend(type_.map(|type_| Want::yes(type_, reason, err.to_string())));
    (reason, wants)
}
