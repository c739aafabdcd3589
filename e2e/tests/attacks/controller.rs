//! Attacks: controller (see tests/attacks.rs).
