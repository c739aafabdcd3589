//! The WireGuard device behind `wg-harness`: the kernel module where the kernel has it, else
//! wireguard-go on a tun device. Both read into a [`DeviceState`] and apply a [`DevicePlan`],
//! so the rest of the agent does not care which one runs.

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
}

/// The device, whichever implementation runs it.
pub enum Device {
    /// Kernel WireGuard, configured over generic netlink.
    Kernel(kernel::KernelDevice),
    /// wireguard-go, configured over its UAPI socket.
    Userspace(userspace::UserspaceDevice),
}

impl Device {
    /// Opens (creating it if needed) the device named `interface`, as `choice` says.
    pub async fn open(choice: Choice, interface: &str, userspace: &userspace::Options) -> anyhow::Result<Self> {
        if matches!(choice, Choice::Auto | Choice::Kernel) {
            match kernel::KernelDevice::open(interface).await {
                Ok(device) => return Ok(Self::Kernel(device)),
                Err(err) if choice == Choice::Auto && err.is_unsupported() => {
                    tracing::info!("kernel WireGuard is not available ({err}); using userspace wireguard-go");
                }
                Err(err) => return Err(err.into()),
            }
        }
        Ok(Self::Userspace(userspace::UserspaceDevice::open(interface, userspace).await?))
    }

    /// The backend, as published in `MeshNode.status.backend`.
    pub fn backend(&self) -> Backend {
        match self {
            Self::Kernel(_) => Backend::Kernel,
            Self::Userspace(_) => Backend::Userspace,
        }
    }

    /// Reads the device.
    pub async fn get(&self) -> anyhow::Result<DeviceState> {
        Ok(match self {
            Self::Kernel(device) => device.get().await?,
            Self::Userspace(device) => device.get().await?,
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
        }
        Ok(())
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Device({:?})", self.backend())
    }
}
