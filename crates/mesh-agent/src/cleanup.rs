//! Leaving a node: `mesh-agent cleanup`, and the agent's own exit when its release is being
//! uninstalled, remove everything the agent put on the node: the WireGuard link (its addresses
//! and the mesh route go with it), the nftables table, wireguard-go's socket, the harness-mesh
//! block of the hosts file (`--resolver hosts`), and the state dir with the private key (unless
//! kept).
//!
//! A DaemonSet's agent cannot tell from SIGTERM alone whether it is restarting (a rollout, an
//! upgrade, `kubectl delete pod`: everything must stay so that no packet is lost) or leaving for
//! good (`helm uninstall`). It watches its own DaemonSet for its whole life ([`DaemonSetWatch`]):
//! `helm uninstall` deletes the DaemonSet before the pods go, and the watch sees that while the
//! agent's credentials still work (the ServiceAccount and RBAC go right after). On SIGTERM,
//! [`departure`] decides from what the watch saw, and from one more read of the DaemonSet.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use mesh_dataplane::firewall;
use tokio::io::AsyncWriteExt;

use crate::backend::userspace;
use crate::link::Links;

/// What to remove.
#[derive(Clone, Debug)]
pub struct Cleanup {
    /// The WireGuard interface.
    pub interface: String,
    /// The `nft` binary.
    pub nft: std::path::PathBuf,
    /// The state dir, or `None` to keep it (and the key: a reinstall keeps the node's identity).
    pub state_dir: Option<std::path::PathBuf>,
    /// The hosts file whose harness-mesh block goes (`--resolver hosts`), if any.
    pub hosts_file: Option<std::path::PathBuf>,
}

impl Cleanup {
    /// Removes everything; returns what it removed. Carries on past a failed step and fails at
    /// the end, naming every step that failed.
    pub async fn run(&self) -> anyhow::Result<Vec<String>> {
        let mut removed = Vec::new();
        let mut failed = Vec::new();
        // wireguard-go stops when its socket goes (it watches the file) and takes its tun device
        // with it; a tun device cannot be deleted from outside while it is held.
        let socket = Path::new(userspace::SOCKET_DIR).join(format!("{}.sock", self.interface));
        let socket_removed = tokio::fs::remove_file(&socket).await.is_ok();
        if socket_removed {
            removed.push(format!("socket {} (wireguard-go stops)", socket.display()));
        }
        let _ = tokio::fs::remove_file(userspace::fallback_marker(&self.interface)).await;
        match Links::connect() {
            Ok(links) => {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                while socket_removed
                    && tokio::time::Instant::now() < deadline
                    && links.index(&self.interface).await.ok().flatten().is_some()
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                match links.delete(&self.interface).await {
                    Ok(true) => removed.push(format!("link {} with its addresses and routes", self.interface)),
                    Ok(false) if socket_removed => {
                        removed.push(format!("link {} with its addresses and routes", self.interface));
                    }
                    Ok(false) => {}
                    Err(err) => failed.push(format!("{err:#}")),
                }
            }
            Err(err) => failed.push(format!("{err:#}")),
        }
        match self.remove_table().await {
            Ok(true) => removed.push(format!("nftables table inet {}", firewall::TABLE)),
            Ok(false) => {}
            Err(err) => failed.push(format!("{err:#}")),
        }
        if let Some(path) = &self.hosts_file {
            match (crate::resolver::hosts::HostsFile { path: path.clone() }).remove() {
                Ok(true) => removed.push(format!("the harness-mesh block of {}", path.display())),
                Ok(false) => {}
                Err(err) => failed.push(format!("{err:#}")),
            }
        }
        if let Some(dir) = &self.state_dir {
            // Only the agent's own files: the directory is whatever --state-dir names.
            for file in STATE_FILES {
                let path = dir.join(file);
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => removed.push(path.display().to_string()),
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => failed.push(format!("removing {}: {err}", path.display())),
                }
            }
            // Outside a container the (now empty) directory goes too; a pod's hostPath mount
            // point cannot, and a directory with other files in it stays.
            if tokio::fs::remove_dir(dir).await.is_ok() {
                removed.push(format!("the state dir {}", dir.display()));
            }
        }
        if failed.is_empty() {
            Ok(removed)
        } else {
            anyhow::bail!("cleanup incomplete (removed: {removed:?}): {}", failed.join("; "))
        }
    }

    /// Deletes the table; false when there was none.
    async fn remove_table(&self) -> anyhow::Result<bool> {
        let listed = tokio::process::Command::new(&self.nft)
            .args(["list", "table", "inet", firewall::TABLE])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await
            .with_context(|| format!("running {} (install nftables)", self.nft.display()))?;
        if !listed.success() {
            return Ok(false);
        }
        let mut child = tokio::process::Command::new(&self.nft)
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(firewall::render_removal().as_bytes()).await?;
        }
        let out = child.wait_with_output().await?;
        anyhow::ensure!(
            out.status.success(),
            "nft could not delete table inet {}: {}",
            firewall::TABLE,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(true)
    }
}

/// The files the agent keeps in its state dir: the key and wireguard-go's log.
const STATE_FILES: [&str; 2] = [crate::keystore::KEY_FILE, "wireguard-go.log"];

/// Why the agent is stopping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Departure {
    /// A restart (rollout, upgrade, deleted pod): leave everything in place.
    Restart,
    /// The release is going away: clean the node, for this reason.
    Uninstall(String),
}

/// Decides on SIGTERM: an uninstall when the watch saw the agent's DaemonSet deleted, or when it
/// is gone or being deleted now. Only when `readable` (the agent read that DaemonSet at its
/// start), so that a wrong name or missing permission never wipes a node. Anything else (a
/// refusal, a timeout, an unreachable API) is taken for a restart: a node left configured is
/// harmless, one cleaned by mistake loses its tunnels and its key.
pub async fn departure(client: &Client, namespace: &str, name: &str, readable: bool, seen_deleted: bool) -> Departure {
    if !readable {
        return Departure::Restart;
    }
    if seen_deleted {
        return Departure::Uninstall(format!("DaemonSet {namespace}/{name} was deleted"));
    }
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    let answer = tokio::time::timeout(Duration::from_secs(5), api.get_opt(name)).await.ok();
    match judge(answer) {
        Departure::Uninstall(why) => Departure::Uninstall(format!("DaemonSet {namespace}/{name}: {why}")),
        Departure::Restart => Departure::Restart,
    }
}

/// Watches the agent's own DaemonSet for the agent's whole life and remembers whether it was
/// deleted (or marked for deletion).
pub struct DaemonSetWatch {
    deleted: tokio::sync::watch::Receiver<bool>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl DaemonSetWatch {
    /// Starts watching `namespace/name` (list and watch, by name only).
    pub fn start(client: &Client, namespace: &str, name: &str) -> Self {
        let api: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let (tx, deleted) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut events = watcher(api, config).default_backoff().boxed();
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::Delete(_)) => {
                        let _ = tx.send(true);
                    }
                    Ok(watcher::Event::Apply(ds) | watcher::Event::InitApply(ds))
                        if ds.metadata.deletion_timestamp.is_some() =>
                    {
                        let _ = tx.send(true);
                    }
                    Ok(_) => {}
                    Err(err) => tracing::debug!("watching the agent's DaemonSet: {err}"),
                }
            }
        });
        Self { deleted, _task: tokio_util::task::AbortOnDropHandle::new(task) }
    }

    /// Whether the DaemonSet was seen deleted.
    pub fn seen_deleted(&self) -> bool {
        *self.deleted.borrow()
    }
}

/// What an answer to the DaemonSet read means (`None`: no answer in time).
fn judge(answer: Option<Result<Option<DaemonSet>, kube::Error>>) -> Departure {
    match answer {
        Some(Ok(Some(ds))) if ds.metadata.deletion_timestamp.is_some() => Departure::Uninstall("being deleted".into()),
        Some(Ok(Some(_))) => Departure::Restart,
        Some(Ok(None)) => Departure::Uninstall("gone".into()),
        Some(Err(err)) => {
            tracing::warn!("reading the agent's DaemonSet: {err}; taking this stop for a restart");
            Departure::Restart
        }
        None => {
            tracing::warn!("reading the agent's DaemonSet timed out; taking this stop for a restart");
            Departure::Restart
        }
    }
}

/// Whether the agent may read its DaemonSet now (checked at start: only then does a later
/// refusal mean that the release went).
pub async fn readable(client: &Client, namespace: &str, name: &str) -> bool {
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(Some(_)) => true,
        Ok(None) => {
            tracing::warn!("DaemonSet {namespace}/{name} (--daemonset) does not exist");
            false
        }
        Err(err) => {
            tracing::warn!(
                "cannot read DaemonSet {namespace}/{name} ({err}): an uninstall will be noticed only if it is gone"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(
            serde_json::from_value(
                serde_json::json!({"status": "Failure", "message": "m", "reason": "r", "code": code}),
            )
            .expect("a Status"),
        )
    }

    #[test]
    fn only_a_gone_or_deleted_daemonset_means_an_uninstall() {
        let live = DaemonSet::default();
        let mut deleted = DaemonSet::default();
        deleted.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(judge(Some(Ok(Some(live)))), Departure::Restart);
        assert!(matches!(judge(Some(Ok(Some(deleted)))), Departure::Uninstall(_)));
        assert!(matches!(judge(Some(Ok(None))), Departure::Uninstall(_)));
        // Refused credentials, an API that fails otherwise, or no answer never wipe a node: the
        // watch is what sees a real uninstall while the credentials still work.
        assert_eq!(judge(Some(Err(api_error(401)))), Departure::Restart);
        assert_eq!(judge(Some(Err(api_error(403)))), Departure::Restart);
        assert_eq!(judge(Some(Err(api_error(500)))), Departure::Restart);
        assert_eq!(judge(Some(Err(api_error(429)))), Departure::Restart);
        assert_eq!(judge(None), Departure::Restart);
    }
}
