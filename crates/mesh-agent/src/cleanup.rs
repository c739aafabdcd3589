//! Leaving a node: `mesh-agent cleanup`, and the agent's own exit when its release is being
//! uninstalled, remove everything the agent put on the node: the WireGuard link (its addresses
//! and the mesh route go with it), the nftables table, wireguard-go's socket, and the state dir
//! with the private key (unless kept).
//!
//! A DaemonSet's agent cannot tell from SIGTERM alone whether it is restarting (a rollout, an
//! upgrade, `kubectl delete pod`: everything must stay so that no packet is lost) or leaving for
//! good (`helm uninstall`). It asks the API: [`departure`] reads its DaemonSet, which `helm
//! uninstall` deletes before the pods go.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::apps::v1::DaemonSet;
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
}

impl Cleanup {
    /// Removes everything; returns what it removed. Carries on past a failed step and fails at
    /// the end, naming every step that failed.
    pub async fn run(&self) -> anyhow::Result<Vec<String>> {
        let mut removed = Vec::new();
        let mut failed = Vec::new();
        match Links::connect() {
            Ok(links) => match links.delete(&self.interface).await {
                Ok(true) => removed.push(format!("link {} with its addresses and routes", self.interface)),
                Ok(false) => {}
                Err(err) => failed.push(format!("{err:#}")),
            },
            Err(err) => failed.push(format!("{err:#}")),
        }
        match self.remove_table().await {
            Ok(true) => removed.push(format!("nftables table inet {}", firewall::TABLE)),
            Ok(false) => {}
            Err(err) => failed.push(format!("{err:#}")),
        }
        let socket = Path::new(userspace::SOCKET_DIR).join(format!("{}.sock", self.interface));
        if tokio::fs::remove_file(&socket).await.is_ok() {
            removed.push(format!("socket {}", socket.display()));
        }
        if let Some(dir) = &self.state_dir {
            match remove_dir_contents(dir).await {
                Ok(n) if n > 0 => removed.push(format!("{n} file(s) of the state dir {}", dir.display())),
                Ok(_) => {}
                Err(err) => failed.push(format!("{err:#}")),
            }
            // Outside a container the directory goes too; a pod's hostPath mount point cannot.
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

/// Removes what is in `dir` (files and directories); returns how many entries went.
async fn remove_dir_contents(dir: &Path) -> anyhow::Result<usize> {
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(err) => return Err(err).with_context(|| format!("reading {}", dir.display())),
    };
    let mut n = 0;
    while let Some(entry) = entries.next_entry().await? {
        let path = entry.path();
        let result = if entry.file_type().await?.is_dir() {
            tokio::fs::remove_dir_all(&path).await
        } else {
            tokio::fs::remove_file(&path).await
        };
        result.with_context(|| format!("removing {}", path.display()))?;
        n += 1;
    }
    Ok(n)
}

/// Why the agent is stopping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Departure {
    /// A restart (rollout, upgrade, deleted pod): leave everything in place.
    Restart,
    /// The release is going away: clean the node, for this reason.
    Uninstall(String),
}

/// Reads the agent's DaemonSet `namespace/name`: gone or being deleted means an uninstall, and
/// so does a refusal (its ServiceAccount or role went with the release). Only when `readable`
/// (the agent read that DaemonSet at its start), so that a wrong name or missing permission never
/// wipes a node. Anything else (a timeout, an unreachable API) is taken for a restart: a node
/// left configured is harmless, one cleaned by mistake loses its tunnels.
pub async fn departure(client: &Client, namespace: &str, name: &str, readable: bool) -> Departure {
    if !readable {
        return Departure::Restart;
    }
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    let answer = tokio::time::timeout(Duration::from_secs(5), api.get_opt(name)).await.ok();
    match judge(answer) {
        Departure::Uninstall(why) => Departure::Uninstall(format!("DaemonSet {namespace}/{name}: {why}")),
        Departure::Restart => Departure::Restart,
    }
}

/// What an answer to the DaemonSet read means (`None`: no answer in time).
fn judge(answer: Option<Result<Option<DaemonSet>, kube::Error>>) -> Departure {
    match answer {
        Some(Ok(Some(ds))) if ds.metadata.deletion_timestamp.is_some() => Departure::Uninstall("being deleted".into()),
        Some(Ok(Some(_))) => Departure::Restart,
        Some(Ok(None)) => Departure::Uninstall("gone".into()),
        Some(Err(kube::Error::Api(status))) if status.code == 401 || status.code == 403 => Departure::Uninstall(
            format!("the API refuses the agent now ({}): its ServiceAccount or role was deleted", status.code),
        ),
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
    fn only_a_gone_or_deleted_daemonset_or_refused_credentials_mean_an_uninstall() {
        let live = DaemonSet::default();
        let mut deleted = DaemonSet::default();
        deleted.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(judge(Some(Ok(Some(live)))), Departure::Restart);
        assert!(matches!(judge(Some(Ok(Some(deleted)))), Departure::Uninstall(_)));
        assert!(matches!(judge(Some(Ok(None))), Departure::Uninstall(_)));
        assert!(matches!(judge(Some(Err(api_error(401)))), Departure::Uninstall(_)));
        assert!(matches!(judge(Some(Err(api_error(403)))), Departure::Uninstall(_)));
        // An API that fails otherwise, or does not answer, never wipes a node.
        assert_eq!(judge(Some(Err(api_error(500)))), Departure::Restart);
        assert_eq!(judge(Some(Err(api_error(429)))), Departure::Restart);
        assert_eq!(judge(None), Departure::Restart);
    }
}
