//! The flags of `meshctl enroll` and `meshctl unenroll`, and their help texts. [`crate::cli`]
//! names these structs; they refer to nothing of meshctl but [`crate::util`].

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::util::parse_duration;

/// How to reach the machine over SSH (enroll and unenroll).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "SSH")]
pub struct SshArgs {
    /// The known_hosts file to check the machine's host key against [default: ssh's own,
    /// ~/.ssh/known_hosts]
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,

    /// Trust the host key of a machine seen for the first time and record it (ssh's
    /// StrictHostKeyChecking=accept-new; a changed key is still refused). Off by default: verify
    /// the key and add it to known_hosts instead
    #[arg(long)]
    pub accept_new_host_key: bool,

    /// The private key to log in with [default: ssh's own: ssh-agent, ~/.ssh/id_*, ~/.ssh/config]
    #[arg(short = 'i', long, value_name = "FILE")]
    pub identity: Option<PathBuf>,

    /// An ssh option as for `ssh -o` (repeatable), e.g. ProxyJump=bastion. Host key checking
    /// cannot be changed this way
    #[arg(long = "ssh-option", value_name = "KEY=VALUE")]
    pub ssh_options: Vec<String>,

    /// Give up connecting after this long
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
}

/// `meshctl enroll` arguments.
#[derive(Args, Debug, Clone)]
pub struct EnrollArgs {
    /// The machine, as for ssh: [USER@]HOST[:PORT] (USER root, or one with passwordless sudo)
    #[arg(value_name = "USER@HOST")]
    pub target: String,

    /// Its MeshNode name, a DNS label (lowercase letters, digits, '-'); it is reachable as
    /// NAME.node.mesh.local
    #[arg(long)]
    pub name: String,

    /// The WireGuard endpoint other nodes send to, HOST:PORT (MeshNode spec.endpoint) [default:
    /// the address the agent detects, port 51820]
    #[arg(long, value_name = "HOST:PORT")]
    pub endpoint: Option<String>,

    /// The SSH port [default: the one in USER@HOST:PORT, else ssh's (22, or your ssh config's)]
    #[arg(short = 'p', long)]
    pub port: Option<u16>,

    /// The mesh-agent binary to install (Linux, the machine's CPU) [default: mesh-agent next to
    /// meshctl]
    #[arg(long, value_name = "PATH")]
    pub agent_binary: Option<PathBuf>,

    /// How long to wait for the agent to join the mesh
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_duration)]
    pub wait: Duration,

    /// Do not wait for the agent to join the mesh
    #[arg(long)]
    pub no_wait: bool,

    /// How the machine's own processes find *.mesh.local (the agent's --resolver). auto:
    /// resolved where systemd-resolved runs on the machine, else hosts. resolved: split DNS on
    /// wg-harness through systemd-resolved (the agent's DNS server for ~mesh.local only). hosts: a
    /// managed block ("# BEGIN harness-mesh" .. "# END harness-mesh") in /etc/hosts, lines outside
    /// it untouched. off: leave the machine's resolver alone. The agent takes out what it added
    /// when it stops, and unenroll leaves /etc/hosts as it was
    #[arg(long, value_enum, default_value_t = Resolver::Auto)]
    pub resolver: Resolver,

    /// The mesh's DNS zone, as the chart's mesh.zone (the agent's --zone), e.g. mesh.internal
    #[arg(long, env = "MESH_ZONE", default_value = "mesh.local", value_parser = parse_zone)]
    pub zone: String,

    /// The Docker-compatible API socket of the machine's container engine, for MeshServices
    /// backed by a container there (the agent's --container-socket), e.g.
    /// /run/user/1000/podman/podman.sock [default: the agent looks for
    /// /run/podman/podman.sock, then /var/run/docker.sock]
    #[arg(long, value_name = "PATH", value_parser = parse_socket_path)]
    pub container_socket: Option<String>,

    #[command(flatten)]
    pub ssh: SshArgs,

    #[command(flatten)]
    pub credentials: CredentialArgs,
}

/// A socket path as the agent's environment file may carry it: absolute, and only characters
/// that need no quoting (it lands in a `KEY=value` line).
fn parse_socket_path(text: &str) -> Result<String, String> {
    let plain = text.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+@".contains(&b));
    if text.starts_with('/') && text.len() > 1 && text.len() <= 255 && plain && !text.contains("/../") {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "{text:?} is not an absolute socket path of letters, digits and / . _ - + @ (at most 255 characters)"
        ))
    }
}

/// A zone as the agent takes it: two or more DNS labels, lowercase, no trailing dot.
fn parse_zone(text: &str) -> Result<String, String> {
    let zone = text.trim().trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if zone.split('.').count() < 2 || !zone.split('.').all(label_ok) || zone.len() > 200 {
        return Err(format!("{text:?} is not a DNS zone such as mesh.local or mesh.internal"));
    }
    Ok(zone)
}

/// `meshctl enroll --resolver`: the enrolled agent's `--resolver`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolver {
    /// resolved where systemd-resolved runs, else hosts
    Auto,
    /// Split DNS through systemd-resolved's D-Bus API
    Resolved,
    /// A managed block in /etc/hosts
    Hosts,
    /// Leave the machine's resolver alone
    Off,
}

impl Resolver {
    /// The agent's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Resolver::Auto => "auto",
            Resolver::Resolved => "resolved",
            Resolver::Hosts => "hosts",
            Resolver::Off => "off",
        }
    }

    /// Whether the agent may write /etc/hosts.
    pub fn may_write_hosts(self) -> bool {
        matches!(self, Resolver::Auto | Resolver::Hosts)
    }
}

/// Where the agent's credential comes from, and how the machine reaches the API server.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Agent credentials")]
pub struct CredentialArgs {
    /// The namespace harness-mesh is installed in: the agent ServiceAccount, the machines'
    /// ServiceAccounts and the agents' Leases
    #[arg(long, default_value = "harness-mesh")]
    pub namespace: String,

    /// The chart's agent ServiceAccount: the machine's own ServiceAccount gets the roles named
    /// like it
    #[arg(long, default_value = "harness-mesh-agent")]
    pub service_account: String,

    /// How long each token of the machine is valid (10m at least). The agent renews its token
    /// by itself once half of that has passed, so a copy taken from the machine stops working
    /// within this time; a machine that stays off for longer needs enroll again
    #[arg(long, value_name = "DURATION", default_value = "168h", value_parser = parse_duration)]
    pub token_duration: Duration,

    /// The audience the machine's tokens are issued for [default: the API server's issuer, from
    /// its /.well-known/openid-configuration, which is the audience it accepts unless
    /// --api-audiences says otherwise]
    #[arg(long, value_name = "AUDIENCE")]
    pub token_audience: Option<String>,

    /// The API server URL the machine uses [default: your kubeconfig's]
    #[arg(long, value_name = "URL")]
    pub api_server: Option<String>,

    /// The CA bundle (PEM) the machine trusts for the API server [default: your kubeconfig's]
    #[arg(long, value_name = "FILE")]
    pub api_server_ca: Option<PathBuf>,
}

/// `meshctl unenroll` arguments.
#[derive(Args, Debug, Clone)]
pub struct UnenrollArgs {
    /// The MeshNode name the machine was enrolled as
    pub name: String,

    /// Remove it from the cluster even when the machine cannot be reached or cleaned (whatever
    /// runs there keeps running until removed by hand; the steps are printed)
    #[arg(long)]
    pub force: bool,

    /// The SSH port [default: the one recorded at enrollment]
    #[arg(short = 'p', long)]
    pub port: Option<u16>,

    /// The namespace harness-mesh is installed in (where the machine's ServiceAccount is)
    #[arg(long, default_value = "harness-mesh")]
    pub namespace: String,

    #[command(flatten)]
    pub ssh: SshArgs,
}

/// Help text shown after `meshctl enroll --help`.
pub const ENROLL_AFTER_HELP: &str = "\
Examples:
  meshctl enroll root@203.0.113.10 --name edge-1
  meshctl enroll admin@edge-2.example.org --name edge-2 --endpoint 198.51.100.7:51820 -i ~/.ssh/edge
  meshctl enroll root@10.1.2.3 --name lab-box --known-hosts ./known_hosts --agent-binary ./mesh-agent

Host keys are always checked. For a machine not in your known_hosts yet, verify its key first:
  ssh-keyscan 203.0.113.10 > host.keys; ssh-keygen -lf host.keys   # compare with the machine's
  cat host.keys >> ~/.ssh/known_hosts
The machine's token lasts 7 days (--token-duration) and its agent renews it at half its life;
a machine that was off for longer needs enroll again. Running enroll again changes only what
differs (and issues a new token once the one it issued has expired).
Without systemd, the agent runs under a small supervisor, which nothing starts at boot: enroll
again after a reboot. Undo everything with: meshctl unenroll NAME";

/// Help text shown after `meshctl unenroll --help`.
pub const UNENROLL_AFTER_HELP: &str = "\
Examples:
  meshctl unenroll edge-1
  meshctl unenroll edge-1 --force     # the machine is gone: clean up the cluster side";
