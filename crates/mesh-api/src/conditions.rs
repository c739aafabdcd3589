//! Condition types and reasons that harness-mesh writes, following the Kubernetes conventions
//! for `status.conditions` (metav1.Condition: type, status, reason, message,
//! observedGeneration, lastTransitionTime).

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
/// No ready pod matches `spec.selector`.
pub const NO_READY_PODS: &str = "NoReadyPods";
/// The node's agent reaches its peers through the tunnel.
pub const CONNECTED: &str = "Connected";
