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
mod device;
mod dns;
mod keystore;
mod link;
mod metrics;
mod probe;
mod token;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgAction, Parser, Subcommand, ValueEnum};
use ipnet::Ipv4Net;
use kube::Client;
use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, Config};
use crate::backend::{Choice, userspace};
// Shared with the library (mesh-sim reuses them); `crate::directory` and `crate::status` resolve here.
use mesh_agent::{directory, status};

/// The harness-mesh node agent: WireGuard, service IPs, port rules and peer health for one node.
///
/// Without a subcommand, runs the agent. Every flag can also be set through the environment
/// variable shown with it. The agent needs CAP_NET_ADMIN in the node's network namespace,
/// /dev/net/tun for userspace WireGuard, and a kubeconfig (in a pod: its ServiceAccount;
/// elsewhere: $KUBECONFIG or ~/.kube/config).
#[derive(Parser, Debug)]
#[command(name = "mesh-agent", version, about, long_about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: Args,
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
    /// route, the nftables table inet harness_mesh, wireguard-go's socket and (unless
    /// --keep-state) the state dir with the private key. Stop the agent first; a running one puts
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
}

/// The agent's own flags.
#[derive(clap::Args, Debug)]
struct Args {
    /// This node's MeshNode name (in a DaemonSet: spec.nodeName from the downward API). Required.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,

    /// Where the node's private key (private.key, mode 0600) and the wireguard-go log live.
    /// Keep it across restarts: a new key means a new identity for the other nodes.
    #[arg(long, env = "MESH_STATE_DIR", default_value = "/var/lib/harness-mesh")]
    state_dir: PathBuf,

    /// Which WireGuard to run. auto: the kernel module if the kernel has it, else userspace
    /// (wireguard-go), else fallback (no tun device or no permission to use it). In fallback
    /// the node stays in the directory with backend none, its MeshNode is Ready=False with
    /// reason NoTunnel (and a NoTunnel event says so), it gets no peer entry, and nothing it
    /// hosts is offered in plaintext by surprise: its `mesh` services are not Ready (reason
    /// NoTunnel) and their names do not resolve; its `host` and `dual` services resolve to its
    /// host address and are reached there in the clear, as their type says. kernel or
    /// userspace: only that one, failing (and retrying) otherwise, never fallback. off:
    /// fallback on purpose.
    #[arg(long, env = "MESH_WIREGUARD", value_enum, default_value_t = Choice::Auto)]
    wireguard: Choice,

    /// The WireGuard interface.
    #[arg(long, env = "MESH_INTERFACE", default_value = "wg-harness")]
    interface: String,

    /// The wireguard-go binary for the userspace backend.
    #[arg(long, env = "MESH_WIREGUARD_GO", default_value = "wireguard-go")]
    wireguard_go: PathBuf,

    /// Userspace WireGuard runs in another process that outlives the agent (`mesh-agent device`,
    /// the chart's device DaemonSet): adopt its device, wait up to 60 s for it, never start
    /// wireguard-go here.
    #[arg(long, env = "MESH_EXTERNAL_DEVICE")]
    external_device: bool,

    /// Send what this node forwards into the mesh (traffic of its pods and containers) from the
    /// node's own mesh IP: peers accept from each node only its own addresses, so without it a
    /// pod cannot reach the mesh. What arrives on the underlay interface (another host routing
    /// through this node) is never let in. The chart turns it on; off: only the node and its
    /// services use the mesh.
    #[arg(long, env = "MESH_MASQUERADE", action = ArgAction::Set, default_value_t = false)]
    masquerade: bool,

    /// The DaemonSet this agent runs in (the chart sets it), in the --lease-namespace. On
    /// SIGTERM the agent reads it: when it is gone or being deleted (helm uninstall), the agent
    /// removes everything it put on the node before it exits (see `mesh-agent cleanup`);
    /// otherwise (a restart, a rollout, an upgrade) it leaves the device, addresses and rules in
    /// place, so that no packet is lost. Unset: never clean up on exit.
    #[arg(long, env = "MESH_DAEMONSET")]
    daemonset: Option<String>,

    /// With --daemonset: keep the state dir (the node's key) when cleaning up after an uninstall.
    #[arg(long, env = "MESH_KEEP_STATE_ON_UNINSTALL")]
    keep_state_on_uninstall: bool,

    /// The mesh subnet, routed into the interface; must match mesh-controller's --subnet.
    #[arg(long, env = "MESH_SUBNET", default_value = "10.42.0.0/16")]
    subnet: Ipv4Net,

    /// The cluster's pod CIDRs, comma-separated (e.g. 10.244.0.0/16): a MeshService's pod IP
    /// is forwarded to only inside one of them. Default (empty): the private ranges 10.0.0.0/8,
    /// 172.16.0.0/12, 192.168.0.0/16 and 100.64.0.0/10. Node addresses and the mesh subnet are
    /// never forwarded to either way.
    #[arg(long, env = "MESH_POD_CIDRS", value_delimiter = ',')]
    pod_cidrs: Vec<Ipv4Net>,

    /// Namespaces whose MeshServices get the short DNS name <service>.mesh.local,
    /// comma-separated; `*` is every namespace. Services elsewhere keep their long name only, so
    /// no tenant can squat a short name. Must match mesh-controller's --short-name-namespaces.
    #[arg(long, env = "MESH_SHORT_NAME_NAMESPACES", value_delimiter = ',', default_value = "default")]
    short_name_namespaces: Vec<String>,

    /// MTU of the interface: the underlay MTU minus 80 bytes of WireGuard overhead (IPv6 worst
    /// case).
    #[arg(long, env = "MESH_MTU", default_value_t = 1420)]
    mtu: u32,

    /// The underlay address other nodes reach this one at (in a DaemonSet: status.hostIP).
    /// Default: the address of the interface with the default route, else the first global
    /// address. MeshNode spec.endpoint overrides both.
    #[arg(long, env = "MESH_ADVERTISE_ADDRESS")]
    advertise_address: Option<Ipv4Addr>,

    /// UDP port of the health-probe echo on the node's mesh IP.
    #[arg(long, env = "MESH_PROBE_PORT", default_value_t = 51821)]
    probe_port: u16,

    /// Seconds between probe rounds; a peer is unhealthy when none of its last 3 probes came
    /// back.
    #[arg(long, env = "MESH_PROBE_INTERVAL", default_value_t = 2.0)]
    probe_interval: f64,

    /// Seconds between full resyncs, which also repair changes made to the device by hand.
    #[arg(long, env = "MESH_RESYNC_SECONDS", default_value_t = 30)]
    resync_seconds: u64,

    /// Namespace of the liveness Lease mesh-agent-<node> (in a pod: its own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    lease_namespace: String,

    /// UDP and TCP port of the authoritative DNS server for mesh.local, on the node's mesh IP
    /// (in fallback: on its underlay address); 0 turns DNS off.
    #[arg(long, env = "MESH_DNS_PORT", default_value_t = 53)]
    dns_port: u16,

    /// Also serve DNS on the node's underlay address, so that CoreDNS (whose pods reach node
    /// addresses, not mesh IPs) can forward the mesh.local stub domain to it.
    #[arg(long, env = "MESH_DNS_ON_UNDERLAY")]
    dns_on_underlay: bool,

    /// The nft binary (nftables) that enforces service ports.
    #[arg(long, env = "MESH_NFT", default_value = "nft")]
    nft: PathBuf,

    /// Ports (TCP and UDP, comma-separated) that peers may reach on this node's own mesh IP,
    /// besides the agent's probe echo and DNS: e.g. 22 for SSH over the mesh. Default none: a
    /// node is a mesh member, not a router, and from the tunnel only its mesh IP's agent ports,
    /// these ports and the listed ports of the services it hosts are reachable.
    #[arg(long, env = "MESH_EXPOSE_PORTS", value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..))]
    expose_ports: Vec<u16>,

    /// The file of the agent's API token, which the agent renews (an enrolled machine: `meshctl
    /// enroll` sets it, and the kubeconfig names the same file as its tokenFile). The new token
    /// has the same ServiceAccount, audience and lifetime, and replaces the file atomically.
    /// Unset: the credential is someone else's to renew (a pod's projected token).
    #[arg(long, env = "MESH_TOKEN_FILE")]
    token_file: Option<PathBuf>,

    /// With --token-file: renew once this fraction of the token's life has passed, 0.01..0.9.
    #[arg(long, env = "MESH_TOKEN_RENEW_AT", default_value_t = 0.5)]
    token_renew_at: f64,

    /// Address of the /metrics and /healthz endpoints. Default: port 9464 of the
    /// --advertise-address (the node IP; the chart sets it), else of 127.0.0.1. Never the
    /// wildcard by default: in the host network that would also answer on the mesh IP and on
    /// every other interface of the node.
    #[arg(long, env = "MESH_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

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
        None => run(cli.run, stop).await,
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
async fn run(args: Args, stop: CancellationToken) -> anyhow::Result<()> {
    let node_name = args.node_name.context("--node-name (NODE_NAME) is required: this node's MeshNode name")?;
    if !(0.1..=60.0).contains(&args.probe_interval) {
        anyhow::bail!("--probe-interval must be between 0.1 and 60 seconds, got {}", args.probe_interval);
    }
    if !(0.01..=0.9).contains(&args.token_renew_at) {
        anyhow::bail!(
            "--token-renew-at must be between 0.01 and 0.9 (a fraction of the token's life), got {}",
            args.token_renew_at
        );
    }
    let key = keystore::load_or_create(&args.state_dir)?;
    let client = Client::try_default()
        .await
        .context("no Kubernetes credentials: run in a pod with a ServiceAccount, or set KUBECONFIG")?;

    if let Some(path) = args.token_file.clone() {
        let renewal = token::Renewal { path, renew_at: args.token_renew_at };
        tokio::spawn(renewal.run(client.clone(), stop.clone()));
    }
    let metrics = Arc::new(metrics::Metrics::default());
    let (health_tx, health_rx) = tokio::sync::watch::channel(Err("starting".to_owned()));
    let metrics_addr = args.metrics_addr.unwrap_or_else(|| default_metrics_addr(args.advertise_address));
    let serve = metrics::serve(metrics_addr, metrics.clone(), health_rx);
    let server = tokio::spawn(async move {
        if let Err(err) = serve.await {
            tracing::error!("metrics endpoint: {err:#}");
        }
    });

    // Whether this agent may read its DaemonSet (only then can it tell an uninstall on SIGTERM),
    // and a watch on it that sees its deletion while the agent's credentials still work.
    let daemonset = match args.daemonset {
        Some(name) => {
            let readable = cleanup::readable(&client, &args.lease_namespace, &name).await;
            let watch = cleanup::DaemonSetWatch::start(&client, &args.lease_namespace, &name);
            Some((name, readable, watch))
        }
        None => None,
    };
    let config = Config {
        node: node_name,
        interface: args.interface.clone(),
        wireguard: args.wireguard,
        userspace: userspace::Options {
            binary: args.wireguard_go,
            log_file: args.state_dir.join("wireguard-go.log"),
            external: args.external_device,
        },
        masquerade: args.masquerade,
        subnet: args.subnet,
        pod_cidrs: if args.pod_cidrs.is_empty() {
            ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"]
                .iter()
                .filter_map(|c| c.parse().ok())
                .collect()
        } else {
            args.pod_cidrs.clone()
        },
        short_names: mesh_dataplane::dns::ShortNames::from_list(&args.short_name_namespaces),
        mtu: args.mtu,
        advertise_address: args.advertise_address,
        probe_port: args.probe_port,
        probe_interval: Duration::from_secs_f64(args.probe_interval),
        resync_interval: Duration::from_secs(args.resync_seconds.max(1)),
        lease_namespace: args.lease_namespace.clone(),
        nft: args.nft.clone(),
        dns_port: args.dns_port,
        dns_on_underlay: args.dns_on_underlay,
        expose_ports: args.expose_ports.iter().copied().collect(),
    };
    // Starting (the device may take a while to appear) stops at SIGTERM too.
    let result = tokio::select! {
        agent = Agent::start(config, client.clone(), key, metrics, health_tx) => match agent {
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
        match cleanup::departure(&client, &args.lease_namespace, &name, readable, seen_deleted).await {
            cleanup::Departure::Restart => {}
            cleanup::Departure::Uninstall(why) => {
                tracing::info!("{why}: the mesh is being uninstalled; removing everything it put on this node");
                let cleanup = cleanup::Cleanup {
                    interface: args.interface,
                    nft: args.nft,
                    state_dir: (!args.keep_state_on_uninstall).then_some(args.state_dir),
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
