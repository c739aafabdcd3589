//! Attacks: api (see tests/attacks.rs).
