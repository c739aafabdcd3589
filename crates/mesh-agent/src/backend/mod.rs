//! The WireGuard device behind `wg-harness`: the kernel module where the kernel has it, else
//! wireguard-go on a tun device, else none at all (fallback: the node stays in the directory,
//! outside the tunnel). All read into a [`DeviceState`] and apply a [`DevicePlan`], so the rest
//! of the agent does not care which one runs.

pub mod kernel;
pub mod userspace;

use std::fmt;

use mesh_api::Backend;
use mesh_wireguard::{DevicePlan, DeviceState};

/// Which backend `--wireguard` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// The kernel module if the kernel has WireGuard, else userspace.
    Auto,
    /// The kernel module, or fail.
    Kernel,
    /// wireguard-go, even where the kernel has WireGuard.
    Userspace,
    /// No WireGuard: the node's `host` and `dual` services are reached at its host address, its
    /// `mesh` services not at all.
    Off,
}

/// The device, whichever implementation runs it.
pub enum Device {
    /// Kernel WireGuard, configured over generic netlink.
    Kernel(kernel::KernelDevice),
    /// wireguard-go, configured over its UAPI socket.
    Userspace(userspace::UserspaceDevice),
    /// No tunnel, and why.
    Fallback(String),
}

impl Device {
    /// Opens (creating it if needed) the device named `interface`, as `choice` says. With
    /// `auto`, a node where neither kernel nor userspace WireGuard can run lands in
    /// [`Device::Fallback`] instead of failing; `kernel` and `userspace` fail instead.
    pub async fn open(choice: Choice, interface: &str, userspace: &userspace::Options) -> anyhow::Result<Self> {
        let mut kernel_missing = None;
        match choice {
            Choice::Off => return Ok(Self::Fallback("WireGuard is turned off (--wireguard=off)".into())),
            Choice::Auto | Choice::Kernel => match kernel::KernelDevice::open(interface).await {
                Ok(device) => return Ok(Self::Kernel(device)),
                Err(err) if choice == Choice::Auto && err.is_unsupported() => {
                    tracing::info!("kernel WireGuard is not available ({err}); trying userspace wireguard-go");
                    kernel_missing = Some(err.to_string());
                }
                Err(err) => return Err(err.into()),
            },
            Choice::Userspace => {}
        }
        if userspace.external {
            // The device pod decides: a device to adopt, a reason for fallback, or not yet.
            if let Ok(why) = std::fs::read_to_string(userspace::fallback_marker(interface)) {
                tracing::warn!(
                    "{}; running in fallback: this node's host and dual services are reached at its host address, its mesh services not at all",
                    why.trim()
                );
                return Ok(Self::Fallback(why.trim().to_owned()));
            }
            return Ok(Self::Userspace(userspace::UserspaceDevice::open(interface, userspace).await?));
        }
        match userspace::UserspaceDevice::open(interface, userspace).await {
            Ok(device) => Ok(Self::Userspace(device)),
            Err(err) if choice == Choice::Auto => {
                let why = format!(
                    "no WireGuard on this node: {}; userspace: {err:#}",
                    kernel_missing.unwrap_or_else(|| "kernel module not usable".into())
                );
                tracing::warn!(
                    "{why}; running in fallback: this node's host and dual services are reached at its host address, its mesh services not at all"
                );
                Ok(Self::Fallback(why))
            }
            Err(err) => Err(err),
        }
    }

    /// Why there is no tunnel, in fallback.
    pub fn fallback_reason(&self) -> Option<&str> {
        match self {
            Self::Fallback(why) => Some(why),
            _ => None,
        }
    }

    /// The backend, as published in `MeshNode.status.backend`.
    pub fn backend(&self) -> Backend {
        match self {
            Self::Kernel(_) => Backend::Kernel,
            Self::Userspace(_) => Backend::Userspace,
            Self::Fallback(_) => Backend::None,
        }
    }

    /// Reads the device.
    pub async fn get(&self) -> anyhow::Result<DeviceState> {
        Ok(match self {
            Self::Kernel(device) => device.get().await?,
            Self::Userspace(device) => device.get().await?,
            Self::Fallback(_) => DeviceState::default(),
        })
    }

    /// Applies a plan. An empty plan is not sent at all.
    pub async fn apply(&self, plan: &DevicePlan) -> anyhow::Result<()> {
        if plan.is_empty() {
            return Ok(());
        }
        match self {
            Self::Kernel(device) => device.apply(plan).await?,
            Self::Userspace(device) => device.apply(plan).await?,
            Self::Fallback(_) => {}
        }
        Ok(())
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Device({:?})", self.backend())
    }
}
