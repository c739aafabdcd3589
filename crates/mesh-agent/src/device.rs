//! `mesh-agent device`: holds the node's WireGuard device in a process of its own, so that the
//! agent can restart, roll out or be upgraded without the device going away.
//!
//! In a DaemonSet, everything in the agent's container dies with it, wireguard-go included, so
//! every agent restart cut the node's tunnels for about a second. The chart therefore runs this
//! in a second DaemonSet that is updated only on delete: it outlives every agent pod, and the
//! agent (`--external-device`) adopts the device instead of starting one.
//!
//! - Kernel WireGuard (`auto` on a kernel that has it, or `kernel`): the link lives in the node's
//!   network namespace and outlives every process, so there is nothing to hold; the link is made
//!   here (the agent adopts it) and the process waits for SIGTERM.
//! - Userspace: wireguard-go runs in the foreground as a child, its log on this process's
//!   output, until SIGTERM (passed on to it, so that it removes the device and its socket) or
//!   until it exits (then this exits too, with an error, and the kubelet restarts the pod).
//! - `off`, or `auto` where wireguard-go cannot start at all: says why in
//!   `/var/run/wireguard/<interface>.fallback` (the agent then runs in fallback instead of waiting
//!   for a device) and waits, so that the pod does not crash-loop. Deleting the pod tries again.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::backend::{Choice, kernel, userspace};

/// How long an older wireguard-go on the same interface (one an agent of a chart without this
/// DaemonSet started inside its own container) is waited for before giving up.
const OLDER_DEVICE_WAIT: Duration = Duration::from_secs(600);
/// A wireguard-go that exits within this long after its start could not start at all.
const START_FAILURE_WINDOW: Duration = Duration::from_secs(10);

/// Holds `interface` as `choice` says until `shutdown` resolves.
pub async fn hold(
    choice: Choice,
    interface: &str,
    wireguard_go: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    match choice {
        Choice::Off => {
            let _ = tokio::fs::remove_file(userspace::fallback_marker(interface)).await;
            return idle("WireGuard is off (--wireguard=off): no device to hold", shutdown).await;
        }
        Choice::Auto | Choice::Kernel => match kernel::KernelDevice::open(interface).await {
            Ok(_) => {
                return idle(
                    &format!(
                        "kernel WireGuard: {interface} lives in the node's network namespace and outlives every pod; \
                         nothing to hold"
                    ),
                    shutdown,
                )
                .await;
            }
            Err(err) if choice == Choice::Auto && err.is_unsupported() => {
                tracing::info!("kernel WireGuard is not available ({err}); holding a wireguard-go device");
            }
            Err(err) => return Err(err.into()),
        },
        Choice::Userspace => {}
    }
    let marker = userspace::fallback_marker(interface);
    let _ = tokio::fs::remove_file(&marker).await;
    let socket = Path::new(userspace::SOCKET_DIR).join(format!("{interface}.sock"));
    wait_for_older_device(&socket, &mut shutdown).await?;
    // A socket left by a device that died would make wireguard-go refuse to start.
    let _ = tokio::fs::remove_file(&socket).await;
    tracing::info!(interface, binary = %wireguard_go.display(), "starting wireguard-go in the foreground");
    let started = tokio::time::Instant::now();
    let mut child = tokio::process::Command::new(wireguard_go)
        .args(["-f", interface])
        .env_remove("WG_PROCESS_FOREGROUND")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} (is it in the image?)", wireguard_go.display()))?;
    tokio::select! {
        () = &mut shutdown => {
            tracing::info!("stopping wireguard-go: {interface} goes away with it");
            if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
                Ok(status) => tracing::info!("wireguard-go exited: {}", status?),
                Err(_) => {
                    child.kill().await?;
                    tracing::warn!("wireguard-go did not stop within 10 s; killed it");
                }
            }
            Ok(())
        }
        status = child.wait() => {
            let status = status?;
            if choice == Choice::Auto && started.elapsed() < START_FAILURE_WINDOW {
                let why = format!(
                    "no WireGuard on this node: no kernel module, and wireguard-go could not start ({status}: is \
                     /dev/net/tun there, and may this pod use it?)"
                );
                tracing::warn!("{why}; the agent runs in fallback on this node (delete this pod to try again)");
                tokio::fs::write(&marker, &why)
                    .await
                    .with_context(|| format!("writing {}", marker.display()))?;
                return idle("no WireGuard on this node", shutdown).await;
            }
            bail!("wireguard-go for {interface} exited ({status}); the pod restarts it, and the agent sets it up again")
        }
    }
}

/// Waits while another wireguard-go answers on `socket` (it goes when its agent's pod goes).
async fn wait_for_older_device(
    socket: &Path,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + OLDER_DEVICE_WAIT;
    let mut logged = false;
    while userspace::answers(socket).await {
        if !logged {
            tracing::info!(
                socket = %socket.display(),
                "another wireguard-go runs this device (started by an older agent); waiting until it stops"
            );
            logged = true;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("another wireguard-go still answers on {} after {OLDER_DEVICE_WAIT:?}", socket.display());
        }
        tokio::select! {
            () = shutdown.as_mut() => bail!("stopped while waiting for the older wireguard-go"),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    Ok(())
}

async fn idle(why: &str, shutdown: std::pin::Pin<&mut impl std::future::Future<Output = ()>>) -> anyhow::Result<()> {
    tracing::info!("{why}; waiting for SIGTERM");
    shutdown.await;
    Ok(())
}
