//! The command line: `meshctl [cluster flags] <command>`, also run as the kubectl plugin
//! `kubectl mesh` when the binary is installed (or linked) as `kubectl-mesh`.
//!
//! The top of the tree: it names each subcommand's argument struct (the cluster flags from
//! [`crate::kubeconfig`], enroll's from [`crate::enroll`]); none of them refers back to it.

use std::ffi::OsString;
use std::path::Path;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use clap_complete::Shell;

use crate::connect::args::{ConnectArgs, ExposeArgs, ForwardArgs};
use crate::enroll::{ENROLL_AFTER_HELP, EnrollArgs, UNENROLL_AFTER_HELP, UnenrollArgs};
use crate::kubeconfig::ClusterArgs;

const EXAMPLES: &str = "\
Examples:
  meshctl status                       nodes, services, who reaches whom, convergence
  meshctl status -o yaml               the same, for scripts
  meshctl graph > mesh.svg             the topology as a picture
  meshctl graph --format dot | dot -Tpng -o mesh.png
  meshctl showconf worker-1            the wg-quick config of a node (private key withheld)
  meshctl --context prod status        another cluster of your kubeconfig

As a kubectl plugin: put meshctl on PATH as `kubectl-mesh` (ln -s meshctl kubectl-mesh),
then run `kubectl mesh status`.";

/// See and debug a harness-mesh WireGuard mesh.
#[derive(Parser, Debug)]
#[command(
    name = "meshctl",
    version,
    about = "See and debug a harness-mesh WireGuard mesh: status, topology graph, per-node WireGuard config, \
             and enroll remote machines over SSH.",
    long_about = "See and debug a harness-mesh WireGuard mesh: status, topology graph, per-node WireGuard config, \
                  and enroll remote machines over SSH.\n\n\
                  meshctl reads the cluster's MeshNode and MeshService objects (and the agents' liveness\n\
                  Leases) through the Kubernetes API, using your kubeconfig the way kubectl does. status,\n\
                  graph and showconf only read; enroll and unenroll create and delete a MeshNode and the\n\
                  agent's credential, and install or remove the agent on the remote machine.",
    after_help = EXAMPLES,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Which cluster, and how to reach it.
    #[command(flatten)]
    pub cluster: ClusterArgs,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show nodes, services, who reaches whom, and which nodes have not converged yet
    #[command(
        long_about = "Show the mesh: every MeshNode (mesh IP, endpoint, backend, Ready, a summary of its\n\
                      agent's Connected condition, agent liveness, convergence), every MeshService (type,\n\
                      mesh IP, node, DNS name, Ready), a matrix of who reaches whom, and which nodes have\n\
                      not yet applied the current peer set, with the reason.\n\n\
                      The matrix comes from each agent's Connected condition, which names the peers it\n\
                      cannot reach (at most 5): every other peer it probes is reachable. A cell the API\n\
                      does not tell shows '?'.",
        after_help = "Examples:\n  meshctl status\n  meshctl status -o wide\n  meshctl status -o json | jq '.convergence'\n  meshctl status -n default"
    )]
    Status(StatusArgs),

    /// Draw the topology as SVG (default) or Graphviz DOT, coloured by health
    #[command(
        long_about = "Draw the topology: nodes on a circle (name, mesh IP, backend), an edge between every\n\
                      pair of nodes (green: both reach each other; red: one does not, with a cross at the\n\
                      node that reports it; grey: unknown; grey dashed: no tunnel, one side runs without\n\
                      WireGuard), and the services attached to their node. SVG is drawn by meshctl itself\n\
                      (no Graphviz needed); hover an element in a browser for details. DOT is for Graphviz.",
        after_help = "Examples:\n  meshctl graph > mesh.svg && xdg-open mesh.svg\n  meshctl graph --format dot | circo -Tpng -o mesh.png\n  meshctl graph --no-services"
    )]
    Graph(GraphArgs),

    /// Print the wg-quick config of NODE, with the private key as a placeholder
    #[command(
        long_about = "Print the wg-quick config of the MeshNode NODE as its agent programs wg-harness:\n\
                      [Interface] with its mesh IP (and the mesh IPs of the services it hosts) and listen\n\
                      port, and one [Peer] per other node that has a peer entry. The private key never\n\
                      leaves the node, so PrivateKey is a placeholder saying where it is. Nodes without a\n\
                      peer (fallback, no key yet) are listed in comments.",
        after_help = "Examples:\n  meshctl showconf worker-1\n  diff <(meshctl showconf worker-1 | grep -v '^#') <(ssh worker-1 wg showconf wg-harness)"
    )]
    Showconf(ShowconfArgs),

    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    #[command(
        after_help = "Install:\n  bash: meshctl completions bash > /etc/bash_completion.d/meshctl\n  zsh:  meshctl completions zsh > \"${fpath[1]}/_meshctl\"\n  fish: meshctl completions fish > ~/.config/fish/completions/meshctl.fish"
    )]
    Completions(CompletionsArgs),
    /// Enroll a remote Linux machine over SSH: install its agent, give it a credential, wait until it joins
    #[command(after_help = ENROLL_AFTER_HELP)]
    Enroll(EnrollArgs),

    /// Remove an enrolled machine: its agent and files there, its MeshNode and credential in the cluster
    #[command(after_help = UNENROLL_AFTER_HELP)]
    Unenroll(UnenrollArgs),

    /// Join the mesh from this machine without root, a tun device or Linux, until Ctrl-C
    #[command(long_about = CONNECT_ABOUT, after_help = CONNECT_AFTER_HELP)]
    Connect(ConnectArgs),

    /// Forward local ports to a mesh service through an ephemeral membership, until Ctrl-C
    #[command(
        long_about = "Forward local ports to a MeshService: listen on 127.0.0.1 (--address) and carry each\n\
                      connection through the tunnel to the service's mesh IP and port. The service's name is\n\
                      resolved at each connection, so it follows the service. The process joins the mesh\n\
                      as `meshctl connect` does (see its help) and leaves on exit.",
        after_help = "Examples:\n  meshctl forward graph-node 8000            127.0.0.1:8000 -> graph-node.default, port 8000\n  meshctl forward db.team-a 15432:5432 --socks5 127.0.0.1:1080"
    )]
    Forward(ForwardArgs),

    /// Publish a local port as a mesh service hosted by this machine, until Ctrl-C
    #[command(
        long_about = "Publish 127.0.0.1:LOCAL_PORT as the MeshService NAME[.NAMESPACE], hosted by this\n\
                      process: any node of the mesh reaches it at NAME.NAMESPACE.mesh.local (its own mesh IP)\n\
                      on --port, and the traffic ends at 127.0.0.1:LOCAL_PORT here. The MeshService is\n\
                      deleted on exit (or collected by mesh-controller if the process is killed). Needs\n\
                      the chart's <release>-connect-expose role in that namespace.",
        after_help = "Examples:\n  meshctl expose 3000 --as web-preview --port 80\n  meshctl expose 5432 --as scratch-db.team-a"
    )]
    Expose(ExposeArgs),
}

const CONNECT_ABOUT: &str = "Join the mesh as an ephemeral member, with your kubeconfig and nothing else: no root, no\n\
tun device, no capability. WireGuard and a TCP/IP stack run inside meshctl (boringtun and\n\
smoltcp). meshctl creates a MeshNode carrying your user name (annotation\n\
mesh.harness.dev/connect-owner), publishes its public key (the private key stays in memory),\n\
renews its Lease every 10 s, and prints a status line (peers reached, handshakes, bytes).\n\
On Ctrl-C it deletes what it created; if it is killed, mesh-controller deletes it once the\n\
Lease has lapsed (at most about 50 s).\n\n\
With --socks5 it serves a SOCKS5 proxy that resolves *.mesh.local itself. Needs the chart's\n\
<release>-connect role (bound to the group harness-mesh:connect by default).";

const CONNECT_AFTER_HELP: &str = "Examples:\n  meshctl connect --socks5 127.0.0.1:1080\n  curl --socks5-hostname 127.0.0.1:1080 http://graph-node.default.mesh.local:8000\n  meshctl connect --name ci-runner-7 --endpoint none     behind NAT: peers learn the endpoint";

/// `meshctl status` options.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Output format
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,

    /// Only the services of this namespace [default: all namespaces]
    #[arg(short, long, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
}

/// How `status` prints.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Tables for people
    Table,
    /// Tables with listen ports, public keys and service ports
    Wide,
    /// JSON (the same data, for scripts)
    Json,
    /// YAML (the same data, for scripts)
    Yaml,
}

/// `meshctl graph` options.
#[derive(Args, Debug)]
pub struct GraphArgs {
    /// Output format
    #[arg(short, long, value_enum, default_value_t = GraphFormat::Svg)]
    pub format: GraphFormat,

    /// Leave the services out
    #[arg(long)]
    pub no_services: bool,

    /// Only the services of this namespace [default: all namespaces]
    #[arg(short, long, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
}

/// What `graph` draws.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphFormat {
    /// A standalone SVG picture (no Graphviz needed)
    Svg,
    /// Graphviz DOT text
    Dot,
}

/// `meshctl showconf` arguments.
#[derive(Args, Debug)]
pub struct ShowconfArgs {
    /// The MeshNode (`meshctl status` lists them)
    pub node: String,
}

/// `meshctl completions` arguments.
#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell
    #[arg(value_enum)]
    pub shell: Shell,
}

/// The executable name kubectl runs for `kubectl mesh`.
const PLUGIN: &str = "kubectl-mesh";

/// How the binary was invoked: as `meshctl`, or as the kubectl plugin `kubectl-mesh`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    /// The executable's file name (`meshctl`, `kubectl-mesh`): what completions are for.
    pub executable: String,
    /// What usage lines show (`meshctl`, `kubectl mesh`).
    pub display: String,
}

impl Invocation {
    /// Judges from `argv[0]`.
    pub fn from_arg0(arg0: Option<&OsString>) -> Self {
        let file = arg0
            .and_then(|a| Path::new(a).file_name())
            .map(|f| f.to_string_lossy().trim_end_matches(".exe").to_owned())
            .unwrap_or_default();
        if file == PLUGIN {
            Self { executable: file, display: "kubectl mesh".to_owned() }
        } else {
            Self { executable: "meshctl".to_owned(), display: "meshctl".to_owned() }
        }
    }

    /// The clap command, named for this invocation.
    pub fn command(&self) -> clap::Command {
        let cmd = Cli::command().bin_name(self.display.clone());
        if self.display == "meshctl" {
            return cmd;
        }
        // Examples start with `  meshctl `: show them as `  kubectl mesh `.
        let rename = |text: String| text.replace("  meshctl ", &format!("  {} ", self.display));
        let mut cmd = cmd.name(PLUGIN).display_name(self.display.clone()).after_help(rename(EXAMPLES.to_owned()));
        let names: Vec<String> = cmd.get_subcommands().map(|sc| sc.get_name().to_owned()).collect();
        for name in names {
            cmd = cmd.mut_subcommand(name, |sc| match sc.get_after_help().map(ToString::to_string) {
                Some(help) => sc.after_help(rename(help)),
                None => sc,
            });
        }
        cmd
    }

    /// Parses `args` (exits with usage on error, like every clap program).
    pub fn parse<I, T>(&self, args: I) -> Cli
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let matches = self.command().get_matches_from(args);
        Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.format(&mut self.command()).exit())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn kubectl_mesh_shows_its_own_name() {
        let plugin = Invocation::from_arg0(Some(&OsString::from("/usr/local/bin/kubectl-mesh")));
        assert_eq!(plugin.display, "kubectl mesh");
        let help = plugin.command().render_help().to_string();
        assert!(help.contains("Usage: kubectl mesh [OPTIONS] <COMMAND>"), "{help}");
        assert!(help.contains("kubectl mesh status"), "{help}");
        let mut cmd = plugin.command();
        cmd.build();
        let status = cmd.find_subcommand_mut("status").unwrap().render_help().to_string();
        assert!(status.contains("Usage: kubectl mesh status"), "{status}");
        assert!(status.contains("\n  kubectl mesh status -o wide\n"), "{status}");

        let plain = Invocation::from_arg0(Some(&OsString::from("target/debug/meshctl")));
        assert!(plain.command().render_help().to_string().contains("Usage: meshctl [OPTIONS] <COMMAND>"));
        assert_eq!(Invocation::from_arg0(None).display, "meshctl");
    }

    #[test]
    fn flags_parse_anywhere() {
        let inv = Invocation::from_arg0(None);
        let cli = inv.parse(["meshctl", "status", "--context", "lab", "-o", "json", "--request-timeout", "2s"]);
        assert_eq!(cli.cluster.context.as_deref(), Some("lab"));
        assert_eq!(cli.cluster.request_timeout, Duration::from_secs(2));
        assert!(matches!(cli.command, Command::Status(StatusArgs { output: Output::Json, .. })));
        let cli = inv.parse(["meshctl", "--kubeconfig", "/k", "graph", "--format", "dot"]);
        assert_eq!(cli.cluster.kubeconfig, Some(PathBuf::from("/k")));
        assert!(matches!(cli.command, Command::Graph(GraphArgs { format: GraphFormat::Dot, .. })));
    }
}
