//! Userspace WireGuard: wireguard-go (Debian's package) on a tun device, configured over its
//! UAPI socket `/var/run/wireguard/<interface>.sock`.
//!
//! Why a separate wireguard-go process rather than boringtun embedded in the agent: the device
//! outlives the agent, so restarting or upgrading the agent never drops a tunnel (the agent
//! adopts the running device and diffs against it); wireguard-go reports handshake times as
//! the UAPI protocol defines them (boringtun 0.7 reports "seconds since") and includes its
//! own private key in `get`; and it is the implementation the WireGuard authors maintain.
//!
//! In a DaemonSet the agent's container takes every process in it along when it goes, so there
//! the chart runs wireguard-go in a pod of its own (`mesh-agent device`) and the agent only adopts
//! it ([`Options::external`]). Elsewhere (a plain process, an enrolled machine) the agent starts
//! it, and it outlives the agent as a daemon.
//!
//! wireguard-go is started in its own daemon mode: the process the agent spawns forks the
//! device and exits once the device is up, so the agent waits for and reaps it right away and
//! never leaves a zombie. Its output goes to a log file in the state dir, never to the agent's
//! stdout (a closed pipe would kill it with SIGPIPE), and `LOG_LEVEL` is removed from its
//! environment (with it, a device started by wireguard-control hangs on its output pipe).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use mesh_wireguard::uapi::{self, GET_REQUEST};
use mesh_wireguard::{DevicePlan, DeviceState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Where wireguard-go puts its UAPI sockets (fixed in wireguard-go and wg(8)).
pub const SOCKET_DIR: &str = "/var/run/wireguard";
/// How long one UAPI exchange may take.
const UAPI_TIMEOUT: Duration = Duration::from_secs(5);
/// How long wireguard-go may take to bring the device up.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// How to start wireguard-go.
#[derive(Clone, Debug)]
pub struct Options {
    /// The wireguard-go binary (a name is looked up in `PATH`).
    pub binary: PathBuf,
    /// Where its output goes (appended).
    pub log_file: PathBuf,
    /// wireguard-go runs in another process that outlives the agent (`mesh-agent device`):
    /// adopt it, wait for it, never start one.
    pub external: bool,
}

/// Where `mesh-agent device` says why it holds no device (no WireGuard on this node): the agent
/// then runs in fallback instead of waiting for one.
pub fn fallback_marker(interface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{interface}.fallback"))
}

/// Whether a wireguard-go answers on `socket`.
pub async fn answers(socket: &Path) -> bool {
    UserspaceDevice { socket: socket.to_owned() }.get().await.is_ok()
}

/// A wireguard-go device.
#[derive(Debug)]
pub struct UserspaceDevice {
    socket: PathBuf,
}

impl UserspaceDevice {
    /// Adopts the running wireguard-go of `interface`, or starts one.
    pub async fn open(interface: &str, options: &Options) -> anyhow::Result<Self> {
        let device = Self { socket: Path::new(SOCKET_DIR).join(format!("{interface}.sock")) };
        match device.get().await {
            Ok(state) => {
                tracing::info!(
                    interface,
                    peers = state.peers.len(),
                    "adopting the running wireguard-go device; its tunnels stay up"
                );
                return Ok(device);
            }
            Err(err) => tracing::debug!("no running wireguard-go device: {err:#}"),
        }
        if options.external {
            bail!(
                "no wireguard-go answers on {} yet: the device DaemonSet's pod (mesh-agent device) on this node \
                 starts it; if it does not come, its log says why",
                device.socket.display()
            );
        }
        device.start(interface, options).await?;
        Ok(device)
    }

    async fn start(&self, interface: &str, options: &Options) -> anyhow::Result<()> {
        // A socket left by a device that died would make wireguard-go refuse to start.
        let _ = tokio::fs::remove_file(&self.socket).await;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&options.log_file)
            .with_context(|| format!("opening {}", options.log_file.display()))?;
        tracing::info!(interface, binary = %options.binary.display(), "starting wireguard-go");
        let mut child = tokio::process::Command::new(&options.binary)
            .arg(interface)
            .env_remove("LOG_LEVEL")
            .env_remove("WG_PROCESS_FOREGROUND")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!("starting {} (install Debian's wireguard-go, or pass --wireguard-go)", options.binary.display())
            })?;
        let status = tokio::time::timeout(START_TIMEOUT, child.wait())
            .await
            .context("wireguard-go did not bring the device up in time")??;
        if !status.success() {
            bail!(
                "wireguard-go {interface} exited with {status} (is /dev/net/tun there, and does the agent have \
                 CAP_NET_ADMIN?); its output is in {}",
                options.log_file.display()
            );
        }
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            match self.get().await {
                Ok(_) => return Ok(()),
                Err(err) if tokio::time::Instant::now() > deadline => {
                    return Err(err.context("wireguard-go started but its UAPI socket does not answer"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Reads the device.
    pub async fn get(&self) -> anyhow::Result<DeviceState> {
        let answer = self.exchange(GET_REQUEST).await?;
        Ok(uapi::parse_get(&answer)?)
    }

    /// Applies a plan in one `set` request.
    pub async fn apply(&self, plan: &DevicePlan) -> anyhow::Result<()> {
        let answer = self.exchange(&uapi::render_set(plan)).await?;
        Ok(uapi::parse_set_answer(&answer)?)
    }

    /// Sends one request and reads its answer, which ends with `errno=N` and an empty line.
    async fn exchange(&self, request: &str) -> anyhow::Result<String> {
        let exchange = async {
            let mut stream = UnixStream::connect(&self.socket)
                .await
                .with_context(|| format!("connecting to {}", self.socket.display()))?;
            stream.write_all(request.as_bytes()).await?;
            let mut answer = Vec::with_capacity(4096);
            let mut buf = [0u8; 8192];
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                answer.extend_from_slice(&buf[..n]);
                if answer.ends_with(b"\n\n") && complete(&answer) {
                    break;
                }
            }
            anyhow::Ok(String::from_utf8(answer).context("the UAPI answer is not UTF-8")?)
        };
        tokio::time::timeout(UAPI_TIMEOUT, exchange)
            .await
            .with_context(|| format!("{} did not answer within {UAPI_TIMEOUT:?}", self.socket.display()))?
    }
}

/// Whether an answer has its final `errno=` line.
fn complete(answer: &[u8]) -> bool {
    answer.starts_with(b"errno=") || answer.windows(7).any(|w| w == b"\nerrno=")
}

#[cfg(test)]
mod tests {
    use super::complete;

    #[test]
    fn an_answer_is_complete_only_with_its_errno_line() {
        assert!(complete(b"errno=0\n\n"));
        assert!(complete(b"listen_port=1\nerrno=0\n\n"));
        assert!(!complete(b"listen_port=1\n\n"));
        assert!(!complete(b"public_key=ab\nrx_bytes=1\n\n"));
    }
}
