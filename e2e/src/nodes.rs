//! Running commands on the nodes of the cluster under test, the one thing the end-to-end suite
//! needs beyond a kubeconfig.
//!
//! - On the lab (the default): nodes are `hm-node-1..N`, and `e2e/lab/lab.sh exec NODE -- CMD`
//!   runs a command in a node's network and mount namespaces; `lab.sh agent restart NODE`
//!   restarts its agent (in kubelet mode by replacing the agent's pod).
//! - On any other cluster: `HARNESS_MESH_NODES` lists the node names (comma-separated),
//!   `HARNESS_MESH_NODE_EXEC` is the command prefix that runs a command on a node, with `{node}`
//!   standing for its name (kind: `docker exec {node}`), and `HARNESS_MESH_AGENT_RESTART` the
//!   command that restarts a node's agent (kind: `kubectl -n harness-mesh delete pod -l
//!   app.kubernetes.io/component=agent --field-selector spec.nodeName={node}`);
//!   `HARNESS_MESH_STATE_DIR` is the agents' state dir on the nodes (default
//!   `/var/lib/harness-mesh`).

use std::process::{Child, Command, Output, Stdio};

use anyhow::{Context, bail};

use crate::repo_root;

/// How to reach the nodes.
#[derive(Clone, Debug)]
pub struct Nodes {
    /// The node (MeshNode) names, in order.
    pub names: Vec<String>,
    exec: Vec<String>,
    restart: Vec<String>,
    state_dir: String,
}

impl Nodes {
    /// The nodes of the lab (`count` of them), or those the environment describes.
    pub fn discover(count: usize) -> anyhow::Result<Self> {
        if let Ok(names) = std::env::var("HARNESS_MESH_NODES") {
            let exec = std::env::var("HARNESS_MESH_NODE_EXEC").context(
                "HARNESS_MESH_NODES is set, so HARNESS_MESH_NODE_EXEC must say how to run a command on a node",
            )?;
            let restart = std::env::var("HARNESS_MESH_AGENT_RESTART")
                .context("HARNESS_MESH_NODES is set, so HARNESS_MESH_AGENT_RESTART must say how to restart an agent")?;
            let names: Vec<String> = names.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
            if names.len() < count {
                bail!("the suite needs {count} nodes, HARNESS_MESH_NODES lists {}", names.len());
            }
            return Ok(Self {
                names,
                exec: exec.split_whitespace().map(str::to_owned).collect(),
                restart: restart.split_whitespace().map(str::to_owned).collect(),
                state_dir: std::env::var("HARNESS_MESH_STATE_DIR").unwrap_or_else(|_| "/var/lib/harness-mesh".into()),
            });
        }
        let lab = repo_root().join("e2e/lab/lab.sh").display().to_string();
        Ok(Self {
            names: (1..=count).map(|i| format!("hm-node-{i}")).collect(),
            exec: vec![lab.clone(), "exec".into(), "{node}".into(), "--".into()],
            restart: vec![lab, "agent".into(), "restart".into(), "{node}".into()],
            // Kubelet mode runs the chart's agents, with the chart's state dir (in the node's
            // own /var); plain mode's agents keep their state in .lab/nodes/.
            state_dir: if crate::lab_mode().as_deref() == Some("kubelet") {
                "/var/lib/harness-mesh".into()
            } else {
                repo_root().join(".lab/nodes/{node}").display().to_string()
            },
        })
    }

    fn command(template: &[String], node: &str, args: &[&str]) -> Command {
        let mut parts = template.iter().map(|p| p.replace("{node}", node));
        let mut command = Command::new(parts.next().unwrap_or_default());
        command.args(parts).args(args);
        command
    }

    /// Runs `args` on `node` and returns its output, whatever the exit status.
    pub fn exec(&self, node: &str, args: &[&str]) -> anyhow::Result<Output> {
        Self::command(&self.exec, node, args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {args:?} on {node}"))
    }

    /// Runs `args` on `node` and returns its stdout; fails with its stderr when it fails.
    pub fn exec_ok(&self, node: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self.exec(node, args)?;
        if !out.status.success() {
            bail!(
                "{args:?} on {node} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `args` on `node` in the background, stdout piped; the caller waits for or kills it.
    pub fn spawn(&self, node: &str, args: &[&str]) -> anyhow::Result<Child> {
        Self::command(&self.exec, node, args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {args:?} on {node}"))
    }

    /// The agent's state directory on `node` (where its private key lives).
    pub fn state_dir(&self, node: &str) -> String {
        self.state_dir.replace("{node}", node)
    }

    /// Restarts the agent of `node`.
    pub fn restart_agent(&self, node: &str) -> anyhow::Result<()> {
        let out = Self::command(&self.restart, node, &[]).stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!("restarting the agent on {node} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}
