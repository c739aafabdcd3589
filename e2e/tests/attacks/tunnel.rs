//! Attacks: tunnel (see tests/attacks.rs).
