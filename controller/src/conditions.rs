//! Conditions that only the controller writes: how a refused allocation is reported.

use mesh_api::conditions::{ALLOCATED, IP_CONFLICT, POOL_EXHAUSTED, Want};
use mesh_core::IpamError;

/// The conditions that report a refused allocation (`Allocated` false, plus `IPConflict` or
/// `PoolExhausted` true when that is why), and the reason shared by them and the event.
pub fn refused(err: &IpamError) -> (&'static str, Vec<Want>) {
    let (reason, type_) = match err {
        IpamError::Taken { .. } | IpamError::HeldBack { .. } => ("IPConflict", Some(IP_CONFLICT)),
        IpamError::Exhausted { .. } => ("PoolExhausted", Some(POOL_EXHAUSTED)),
        _ => ("InvalidMeshIP", None),
    };
    let mut wants = vec![Want::no(ALLOCATED, reason, err.to_string())];
    wants.extend(type_.map(|type_| Want::yes(type_, reason, err.to_string())));
    (reason, wants)
}
