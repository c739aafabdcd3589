//! Condition types and reasons that harness-mesh writes, following the Kubernetes conventions
//! for `status.conditions` (metav1.Condition: type, status, reason, message,
//! observedGeneration, lastTransitionTime), and the helpers that build them for the controller
//! and the agent alike.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// The object is fully working: for a MeshService, allocated and hosted; for a MeshNode, its
/// agent has published a key and applied the current peer set.
pub const READY: &str = "Ready";
/// A mesh IP is allocated to the object.
pub const ALLOCATED: &str = "Allocated";
/// The requested `spec.meshIP` is held by another object (the message names it).
pub const IP_CONFLICT: &str = "IPConflict";
/// No address is left in the mesh subnet.
pub const POOL_EXHAUSTED: &str = "PoolExhausted";
/// `spec.node` names a MeshNode that does not exist.
pub const NODE_NOT_FOUND: &str = "NodeNotFound";
/// `spec.node` names a MeshNode that does not permit services of this namespace
/// (`spec.serviceNamespaces`, or mesh-controller's default), or that hosts as many services as
/// one node may; the message says which.
pub const PLACEMENT_DENIED: &str = "PlacementDenied";
/// No ready pod matches `spec.selector`.
pub const NO_READY_PODS: &str = "NoReadyPods";
/// The node's agent reaches its peers through the tunnel.
pub const CONNECTED: &str = "Connected";
/// The node's agent reaches some peers through a relay (`status.relayedPeers`), because no
/// direct WireGuard handshake with them succeeds; False: every path is direct, or (reason
/// `NoRelay`) some peers have neither.
pub const RELAYED: &str = "Relayed";
/// The short name `<service>.mesh.local` resolves to this service (false: another namespace has
/// a service of the same name, or the name is reserved; the long name always works).
pub const SHORT_NAME: &str = "ShortName";

/// MeshNode: the node's agent reaches a Docker-compatible container engine (reported only while
/// some service asks for a container on the node; False: the message says which socket failed).
pub const CONTAINER_ENGINE: &str = "ContainerEngine";

/// A condition a component wants to report, before times are filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    /// The condition type, e.g. `Ready`.
    pub type_: &'static str,
    /// Whether the condition holds.
    pub status: bool,
    /// A CamelCase reason.
    pub reason: &'static str,
    /// What a person should know, and do.
    pub message: String,
}

impl Want {
    /// A condition that holds.
    pub fn yes(type_: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Self { type_, status: true, reason, message: message.into() }
    }

    /// A condition that does not hold.
    pub fn no(type_: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Self { type_, status: false, reason, message: message.into() }
    }
}

/// The conditions to write: `wanted`, keeping each one's `lastTransitionTime` from `current`
/// when its status did not change.
pub fn merge(current: &[Condition], wanted: &[Want], generation: Option<i64>) -> Vec<Condition> {
    wanted
        .iter()
        .map(|want| {
            let status = if want.status { "True" } else { "False" };
            let previous = current.iter().find(|c| c.type_ == want.type_);
            let last_transition_time = match previous {
                Some(prev) if prev.status == status => prev.last_transition_time.clone(),
                _ => Time(Timestamp::now()),
            };
            Condition {
                type_: want.type_.to_owned(),
                status: status.to_owned(),
                reason: want.reason.to_owned(),
                message: want.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// Whether two condition lists say the same thing, ignoring transition times.
pub fn same(a: &[Condition], b: &[Condition]) -> bool {
    let key =
        |c: &Condition| (c.type_.clone(), c.status.clone(), c.reason.clone(), c.message.clone(), c.observed_generation);
    let mut a: Vec<_> = a.iter().map(key).collect();
    let mut b: Vec<_> = b.iter().map(key).collect();
    a.sort();
    b.sort();
    a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let first = merge(&[], &[Want::no("Ready", "Waiting", "x")], Some(1));
        let old_time = Time(Timestamp::UNIX_EPOCH);
        let mut current = first.clone();
        current[0].last_transition_time = old_time.clone();
        let same_status = merge(&current, &[Want::no("Ready", "Other", "y")], Some(2));
        assert_eq!(same_status[0].last_transition_time, old_time);
        let flipped = merge(&current, &[Want::yes("Ready", "Ok", "z")], Some(2));
        assert_ne!(flipped[0].last_transition_time, old_time);
        assert!(same(&first, &merge(&first, &[Want::no("Ready", "Waiting", "x")], Some(1))));
        assert!(!same(&first, &flipped));
    }
}
