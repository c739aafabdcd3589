//! Attacks: machine (see tests/attacks.rs).
