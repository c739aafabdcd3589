//! `mesh-agent`: the harness-mesh agent, one per node (a DaemonSet pod with host networking,
//! or a plain process on an enrolled remote machine).
//!
//! It owns the node's WireGuard key pair (the private key stays in its state dir), publishes
//! the public key, endpoint and backend in the node's MeshNode status, programs `wg-harness`
//! (kernel WireGuard where the kernel has it, else wireguard-go) with every other node's peer
//! entry as a diff, hosts the service IPs placed on this node and enforces their ports with
//! nftables, probes every peer through the tunnel, and reports health in a `Connected`
//! condition, a liveness Lease and Prometheus metrics.
//!
//! Two subcommands serve the agent: `mesh-agent device` holds the WireGuard device in a process
//! that outlives agent restarts (the chart's device DaemonSet), and `mesh-agent cleanup` removes
//! everything the agent put on a node.

mod agent;
mod backend;
mod cleanup;
mod containers;
mod device;
mod keystore;
mod link;
mod metrics;
mod probe;
mod resolver;
mod token;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use kube::Client;
use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, Config};
use crate::backend::Choice;
// Shared with the library (mesh-sim reuses them); `crate::directory` and `crate::status` resolve here.
use mesh_agent::{directory, dns, status};

/// The harness-mesh node agent: WireGuard, service IPs, port rules and peer health for one node.
///
/// Without a subcommand, runs the agent. Every flag can also be set through the environment
/// variable shown with it. The agent needs CAP_NET_ADMIN in the node's network namespace,
/// /dev/net/tun for userspace WireGuard, and a kubeconfig (in a pod: its ServiceAccount;
/// elsewhere: $KUBECONFIG or ~/.kube/config).
#[derive(Parser, Debug)]
#[command(
    name = "mesh-agent",
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: Option<Config>,
    /// Log format.
    #[arg(long, env = "MESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Hold the node's WireGuard device in a process of its own, so that restarting or upgrading
    /// the agent never takes it down (the chart runs this as its device DaemonSet; the agent then
    /// runs with --external-device). Kernel WireGuard: makes the link and waits. Userspace: runs
    /// wireguard-go in the foreground until SIGTERM.
    Device(DeviceArgs),
    /// Remove everything the agent put on this node: the WireGuard link with its addresses and
    /// route, the nftables table inet harness_mesh, wireguard-go's socket, the harness-mesh block
    /// of the hosts file (--resolver hosts) and (unless --keep-state) the state dir with the
    /// private key. Stop the agent first; a running one puts
    /// it all back.
    Cleanup(CleanupArgs),
}

#[derive(clap::Args, Debug)]
struct DeviceArgs {
    /// Which WireGuard: auto (the kernel's if it has it, else wireguard-go), kernel, userspace,
    /// or off (hold nothing). Use the agent's value.
    #[arg(long, env = "MESH_WIREGUARD", value_enum, default_value_t = Choice::Auto)]
    wireguard: Choice,
    /// The WireGuard interface.
    #[arg(long, env = "MESH_INTERFACE", default_value = "wg-harness")]
    interface: String,
    /// The wireguard-go binary.
    #[arg(long, env = "MESH_WIREGUARD_GO", default_value = "wireguard-go")]
    wireguard_go: PathBuf,
}

#[derive(clap::Args, Debug)]
struct CleanupArgs {
    /// The WireGuard interface.
    #[arg(long, env = "MESH_INTERFACE", default_value = "wg-harness")]
    interface: String,
    /// The agent's state dir.
    #[arg(long, env = "MESH_STATE_DIR", default_value = "/var/lib/harness-mesh")]
    state_dir: PathBuf,
    /// Keep the state dir (and with it the node's key, so a reinstall keeps its identity).
    #[arg(long)]
    keep_state: bool,
    /// The nft binary.
    #[arg(long, env = "MESH_NFT", default_value = "nft")]
    nft: PathBuf,
    /// The hosts file whose harness-mesh block (--resolver hosts) goes; lines outside the block
    /// stay as they are.
    #[arg(long, env = "MESH_HOSTS_FILE", default_value = "/etc/hosts")]
    hosts_file: PathBuf,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// jemalloc, not the C library's malloc: it gives memory the process freed back to the system,
/// where the C library's kept it after each burst of objects (a full list, a bulk create); the
/// measurements are in docs/adr/0005-jemalloc.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,hickory_server=warn".into());
    match cli.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
    }
    // First of all: as PID 1 in a container, a SIGTERM that comes before a handler exists is
    // ignored, and the pod is killed 30 s later without having cleaned up.
    let stop = stop_on_signal()?;
    match cli.command {
        Some(Command::Device(args)) => {
            device::hold(args.wireguard, &args.interface, &args.wireguard_go, stop.cancelled_owned()).await
        }
        Some(Command::Cleanup(args)) => {
            let cleanup = cleanup::Cleanup {
                interface: args.interface,
                nft: args.nft,
                state_dir: (!args.keep_state).then_some(args.state_dir),
                hosts_file: Some(args.hosts_file),
            };
            let removed = cleanup.run().await?;
            if removed.is_empty() {
                println!("nothing of harness-mesh was left on this node");
            }
            for what in removed {
                println!("removed {what}");
            }
            Ok(())
        }
        None => match cli.run {
            Some(config) if !config.node.is_empty() => run(config, stop).await,
            _ => anyhow::bail!("--node-name (NODE_NAME) is required: this node's MeshNode name"),
        },
    }
}

/// Port of /metrics and /healthz when --metrics-addr is not given.
const DEFAULT_METRICS_PORT: u16 = 9464;

/// Where /metrics and /healthz listen when --metrics-addr is not given: the node's advertised
/// underlay address, else loopback.
fn default_metrics_addr(advertise_address: Option<Ipv4Addr>) -> SocketAddr {
    SocketAddr::from((advertise_address.unwrap_or(Ipv4Addr::LOCALHOST), DEFAULT_METRICS_PORT))
}

/// Runs the agent until SIGTERM or SIGINT.
async fn run(config: Config, stop: CancellationToken) -> anyhow::Result<()> {
    let key = keystore::load_or_create(&config.state_dir)?;
    let client = Client::try_default()
        .await
        .context("no Kubernetes credentials: run in a pod with a ServiceAccount, or set KUBECONFIG")?;

    if let Some(path) = config.token_file.clone() {
        let renewal = token::Renewal { path, renew_at: config.token_renew_at };
        tokio::spawn(renewal.run(client.clone(), stop.clone()));
    }
    let metrics = Arc::new(metrics::Metrics::default());
    let (health_tx, health_rx) = tokio::sync::watch::channel(Err("starting".to_owned()));
    let metrics_addr = config.metrics_addr.unwrap_or_else(|| default_metrics_addr(config.advertise_address));
    let serve = metrics::serve(metrics_addr, metrics.clone(), health_rx);
    let server = tokio::spawn(async move {
        if let Err(err) = serve.await {
            tracing::error!("metrics endpoint: {err:#}");
        }
    });

    // Whether this agent may read its DaemonSet (only then can it tell an uninstall on SIGTERM),
    // and a watch on it that sees its deletion while the agent's credentials still work.
    let daemonset = match &config.daemonset {
        Some(name) => {
            let readable = cleanup::readable(&client, &config.lease_namespace, name).await;
            let watch = cleanup::DaemonSetWatch::start(&client, &config.lease_namespace, name);
            Some((name.clone(), readable, watch))
        }
        None => None,
    };
    // Starting (the device may take a while to appear) stops at SIGTERM too.
    let result = tokio::select! {
        agent = Agent::start(config.clone(), client.clone(), key, metrics, health_tx) => match agent {
            Ok(agent) => agent.run(stop.cancelled_owned()).await,
            Err(err) => Err(err),
        },
        () = stop.cancelled() => {
            tracing::info!("stopped while starting");
            Ok(())
        }
    };
    server.abort();
    if let Some((name, readable, watch)) = daemonset {
        let seen_deleted = watch.seen_deleted();
        match cleanup::departure(&client, &config.lease_namespace, &name, readable, seen_deleted).await {
            cleanup::Departure::Restart => {}
            cleanup::Departure::Uninstall(why) => {
                tracing::info!("{why}: the mesh is being uninstalled; removing everything it put on this node");
                let cleanup = cleanup::Cleanup {
                    interface: config.interface,
                    nft: config.nft,
                    state_dir: (!config.keep_state_on_uninstall).then_some(config.state_dir),
                    hosts_file: Some(config.hosts_file.clone()),
                };
                match cleanup.run().await {
                    Ok(removed) => tracing::info!(?removed, "this node is clean"),
                    Err(err) => tracing::error!("{err:#}; run `mesh-agent cleanup` on the node"),
                }
            }
        }
    }
    result
}

/// A token cancelled on SIGTERM or SIGINT; the handlers are in place when this returns.
fn stop_on_signal() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let stop = CancellationToken::new();
    let cancel = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        cancel.cancel();
    });
    Ok(stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_straight_into_the_config() {
        let cli = Cli::try_parse_from([
            "mesh-agent",
            "--node-name",
            "n1",
            "--subnet",
            "10.50.0.0/16",
            "--probe-interval",
            "0.5",
            "--expose-ports",
            "22,80",
        ])
        .unwrap();
        let config = cli.run.unwrap();
        assert_eq!(config.node, "n1");
        assert_eq!(config.subnet.to_string(), "10.50.0.0/16");
        assert_eq!(config.probe_interval, std::time::Duration::from_millis(500));
        assert_eq!(config.resync_interval, std::time::Duration::from_secs(30));
        assert_eq!(config.settings().expose_ports.into_iter().collect::<Vec<_>>(), [22, 80]);
        assert_eq!(config.pod_cidrs().len(), 4, "the private ranges by default");
    }

    #[test]
    fn the_subnet_has_the_controllers_grammar() {
        let err = Cli::try_parse_from(["mesh-agent", "--node-name", "n1", "--subnet", "10.42.0.1/16"]).unwrap_err();
        assert!(err.to_string().contains("host bits"), "{err}");
        let err = Cli::try_parse_from(["mesh-agent", "--node-name", "n1", "--probe-interval", "99"]).unwrap_err();
        assert!(err.to_string().contains("between 0.1 and 60"), "{err}");
    }

    #[test]
    fn subcommands_need_no_node_name() {
        let cli = Cli::try_parse_from(["mesh-agent", "cleanup", "--keep-state"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Cleanup(CleanupArgs { keep_state: true, .. }))));
        let cli = Cli::try_parse_from(["mesh-agent", "--subnet", "10.42.0.0/16"]).unwrap();
        assert!(cli.run.is_none_or(|c| c.node.is_empty()), "no node name, so main refuses to run the agent");
    }
}
