//! Attacks: pod_network (see tests/attacks.rs).
