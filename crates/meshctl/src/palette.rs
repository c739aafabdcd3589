//! The colours the graph uses, shared by the SVG and DOT renderers (GitHub's Primer palette:
//! readable on white, and distinguishable by the usual colour-vision deficiencies thanks to the
//! dashes and markers that go with them).

/// Reachable both ways; a healthy node's border.
pub const UP: &str = "#1a7f37";
/// Not reachable; a degraded node's border.
pub const DOWN: &str = "#cf222e";
/// Unknown or no tunnel; a fallback node's border.
pub const UNKNOWN: &str = "#8c959f";
/// Not converged yet.
pub const PENDING: &str = "#bf8700";
/// Fill of a healthy node.
pub const NODE_FILL: &str = "#f0fbf3";
/// Fill of a degraded node.
pub const NODE_FILL_BAD: &str = "#fff5f5";
/// Fill of a node not converged yet.
pub const NODE_FILL_PENDING: &str = "#fff8e5";
/// Fill of a node in fallback.
pub const NODE_FILL_FALLBACK: &str = "#f6f8fa";
/// Fill of a ready service.
pub const SERVICE_READY: &str = "#ddf4ff";
/// Fill of a service that is not ready.
pub const SERVICE_NOT_READY: &str = "#ffebe9";
/// Border of a service and its link to the node.
pub const SERVICE_STROKE: &str = "#54aeff";
/// Main text.
pub const TEXT: &str = "#1f2328";
/// Secondary text.
pub const MUTED: &str = "#59636e";
/// Mesh IPs.
pub const ADDRESS: &str = "#0550ae";
