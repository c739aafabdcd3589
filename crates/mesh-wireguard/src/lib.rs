//! WireGuard as data, with no I/O: what harness-mesh wants a `wg-harness` device to be, what a
//! device reports, and the smallest change that turns one into the other.
//!
//! - [`key`]: Curve25519 keys, their base64 (API) and hex (UAPI) forms, key generation.
//! - [`device`]: the desired [`DeviceConfig`], the observed [`DeviceState`], and [`plan`], the
//!   diff that adds, removes or updates single peers and never replaces them all.
//! - [`uapi`]: the cross-platform userspace API text protocol (`get=1` / `set=1`) that
//!   wireguard-go and boringtun speak on their unix socket.
//!
//! The agent owns the sockets, netlink and processes; everything here is unit-tested without
//! root.

pub mod device;
pub mod key;
pub mod uapi;

pub use device::{
    DeviceConfig, DevicePlan, DeviceState, Known, LIVE_SESSION, PeerConfig, PeerState, PeerUpdate, plan, plan_at,
};
pub use key::{Key, KeyError, PrivateKey};
