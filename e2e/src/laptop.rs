//! The "laptop" of the laptop-mode suite and bench: the lab's SSH node `hm-node-202` (no agent,
//! no MeshNode, the API server through a relay on its 127.0.0.1, the unprivileged user
//! `hm-user`), and meshctl run there as that user with every capability dropped, in a mount
//! namespace where `/dev/net` is an empty tmpfs: no root, no tun device, no CAP_NET_ADMIN.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};

use crate::mesh::Mesh;
use crate::users::LabUser;
use crate::{lab_sh, repo_root};

/// The laptop node.
pub const LAPTOP: &str = "hm-node-202";
/// The unprivileged user of the lab's SSH nodes.
pub const USER: &str = "hm-user";

/// Makes the laptop node (idempotent).
pub fn laptop_node_up() -> anyhow::Result<String> {
    lab_sh(&["ssh-node", "202"])
}

/// A command on the laptop as the unprivileged user, every capability dropped, `/dev/net`
/// hidden.
pub fn as_user(args: &[&str]) -> Command {
    let script = format!(
        "set -e; if [ -d /dev/net ]; then mount -t tmpfs none /dev/net; fi; \
         exec setpriv --reuid={USER} --regid={USER} --init-groups --inh-caps=-all --bounding-set=-all --no-new-privs -- \"$@\""
    );
    let mut command = Command::new(repo_root().join("e2e/lab/lab.sh"));
    command
        .args(["exec", LAPTOP, "--", "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", &script, "sh"])
        .args(args)
        .current_dir(repo_root())
        .stdin(Stdio::null());
    command
}

/// A running meshctl on the laptop; killed (SIGKILL) when dropped if still running.
pub struct Meshctl {
    child: Child,
    log: PathBuf,
}

impl Meshctl {
    /// Starts `meshctl --kubeconfig <user's> ARGS` on the laptop as [`USER`]; its output goes to
    /// a log file under target/e2e-laptop.
    pub fn start(meshctl: &Path, user: &LabUser, args: &[&str]) -> anyhow::Result<Self> {
        let meshctl = meshctl.to_string_lossy();
        let kubeconfig = user.kubeconfig.to_string_lossy();
        let log = repo_root().join(format!("target/e2e-laptop/meshctl-{}-{}.log", user.name, args.join("_")));
        let out = File::create(&log)?;
        let mut all = vec![meshctl.as_ref(), "--kubeconfig", kubeconfig.as_ref()];
        all.extend_from_slice(args);
        let child = as_user(&all).stdout(out.try_clone()?).stderr(out).spawn().context("starting meshctl")?;
        Ok(Self { child, log })
    }

    /// What it printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends it `signal` (`-TERM`, `-KILL`).
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status()?;
        ensure!(status.success(), "kill {signal} meshctl failed");
        Ok(())
    }

    /// Waits (bounded) for the process to end; its output when it does.
    pub fn wait(&mut self, within: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(format!("{status}: {}", self.output()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        anyhow::bail!("meshctl still runs after {within:?}: {}", self.output())
    }

    /// The resident memory of the process, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()
    }
}

impl Drop for Meshctl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a TCP connection from the laptop to 127.0.0.1:`port` reads (`None`: nothing).
pub fn fetch_local(mesh: &Mesh, port: u16) -> anyhow::Result<Option<String>> {
    let out = mesh
        .nodes
        .exec(LAPTOP, &["socat", "-T", "3", "-u", &format!("TCP:127.0.0.1:{port},connect-timeout=3"), "-"])?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok((out.status.success() && !text.is_empty()).then_some(text))
}
