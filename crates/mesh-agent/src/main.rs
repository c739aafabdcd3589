//! `mesh-agent`: the harness-mesh agent, one per node (a DaemonSet pod with host networking,
//! or a plain process on an enrolled remote machine).
//!
//! It owns the node's WireGuard key pair (the private key stays in its state dir), publishes
//! the public key, endpoint and backend in the node's MeshNode status, programs `wg-harness`
//! (kernel WireGuard where the kernel has it, else wireguard-go) with every other node's peer
//! entry as a diff, hosts the service IPs placed on this node and enforces their ports with
//! nftables, probes every peer through the tunnel, and reports health in a `Connected`
//! condition, a liveness Lease and Prometheus metrics.

mod agent;
mod backend;
mod dns;
mod keystore;
mod link;
mod metrics;
mod probe;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use ipnet::Ipv4Net;
use kube::Client;

use crate::agent::{Agent, Config};
use crate::backend::{Choice, userspace};
// Shared with the library (mesh-sim reuses them); `crate::directory` and `crate::status` resolve here.
use mesh_agent::{directory, status};

/// The harness-mesh node agent: WireGuard, service IPs, port rules and peer health for one node.
///
/// Every flag can also be set through the environment variable shown with it. The agent needs
/// CAP_NET_ADMIN in the node's network namespace, /dev/net/tun for userspace WireGuard, and a
/// kubeconfig (in a pod: its ServiceAccount; elsewhere: $KUBECONFIG or ~/.kube/config).
#[derive(Parser, Debug)]
#[command(name = "mesh-agent", version, about, long_about)]
struct Args {
    /// This node's MeshNode name (in a DaemonSet: spec.nodeName from the downward API).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,

    /// Where the node's private key (private.key, mode 0600) and the wireguard-go log live.
    /// Keep it across restarts: a new key means a new identity for the other nodes.
    #[arg(long, env = "MESH_STATE_DIR", default_value = "/var/lib/harness-mesh")]
    state_dir: PathBuf,

    /// Which WireGuard to run. auto: the kernel module if the kernel has it, else userspace
    /// (wireguard-go), else fallback (no tun device or no permission): the node stays in the
    /// directory with backend none and its services are reached at its host address. kernel or
    /// userspace: only that one, failing otherwise. off: fallback on purpose.
    #[arg(long, env = "MESH_WIREGUARD", value_enum, default_value_t = Choice::Auto)]
    wireguard: Choice,

    /// The WireGuard interface.
    #[arg(long, env = "MESH_INTERFACE", default_value = "wg-harness")]
    interface: String,

    /// The wireguard-go binary for the userspace backend.
    #[arg(long, env = "MESH_WIREGUARD_GO", default_value = "wireguard-go")]
    wireguard_go: PathBuf,

    /// The mesh subnet, routed into the interface; must match mesh-controller's --subnet.
    #[arg(long, env = "MESH_SUBNET", default_value = "10.42.0.0/16")]
    subnet: Ipv4Net,

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

    /// Address of the /metrics and /healthz endpoints.
    #[arg(long, env = "MESH_METRICS_ADDR", default_value = "0.0.0.0:9464")]
    metrics_addr: SocketAddr,

    /// Log format.
    #[arg(long, env = "MESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,hickory_server=warn".into());
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
    }
    if !(0.1..=60.0).contains(&args.probe_interval) {
        anyhow::bail!("--probe-interval must be between 0.1 and 60 seconds, got {}", args.probe_interval);
    }
    let key = keystore::load_or_create(&args.state_dir)?;
    let client = Client::try_default()
        .await
        .context("no Kubernetes credentials: run in a pod with a ServiceAccount, or set KUBECONFIG")?;

    let metrics = Arc::new(metrics::Metrics::default());
    let (health_tx, health_rx) = tokio::sync::watch::channel(Err("starting".to_owned()));
    let serve = metrics::serve(args.metrics_addr, metrics.clone(), health_rx);
    let server = tokio::spawn(async move {
        if let Err(err) = serve.await {
            tracing::error!("metrics endpoint: {err:#}");
        }
    });

    let config = Config {
        node: args.node_name,
        interface: args.interface,
        wireguard: args.wireguard,
        userspace: userspace::Options { binary: args.wireguard_go, log_file: args.state_dir.join("wireguard-go.log") },
        subnet: args.subnet,
        mtu: args.mtu,
        advertise_address: args.advertise_address,
        probe_port: args.probe_port,
        probe_interval: Duration::from_secs_f64(args.probe_interval),
        resync_interval: Duration::from_secs(args.resync_seconds.max(1)),
        lease_namespace: args.lease_namespace,
        nft: args.nft,
        dns_port: args.dns_port,
        dns_on_underlay: args.dns_on_underlay,
    };
    let agent = Agent::start(config, client, key, metrics, health_tx).await?;
    let result = agent.run(shutdown_signal()).await;
    server.abort();
    result
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
