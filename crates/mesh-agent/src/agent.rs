//! The agent's loop: on every directory change (debounced) and on a resync timer it runs one
//! sync — one snapshot of the directory, the pure plan of this node (`mesh_plan`), and the
//! executor (`mesh_agent::executor`), which programs the data plane (WireGuard peers as a diff,
//! addresses and route, service ports, probe echo, DNS) before it writes the status — and on
//! the probe timer it measures every peer and reports health. The applied peer set rides on the
//! liveness Lease renewal. Errors are logged, counted and retried on the next round; nothing
//! here exits the process.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use futures::future::join_all;
use ipnet::Ipv4Net;
use kube::Client;
use mesh_agent::cputime::{Step, Took};
use mesh_agent::executor::{self, DataPlane, StatusSink};
use mesh_agent::status::{NodeStatus, Published, Writer};
use mesh_dataplane::desired;
use mesh_dataplane::dns::{ShortNames, Zone};
use mesh_dataplane::firewall;
use mesh_dataplane::health::{self, PeerHealth, ProbeWindow, Summary};
use mesh_plan::{LinkAddresses, NodeInput, NodeSettings};
use mesh_wireguard::{DeviceConfig, DevicePlan, DeviceState, Key, PrivateKey};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backend::{Choice, Device, userspace};
use crate::containers::{self, Engine};
use crate::directory::Directory;
use crate::dns::DnsServer;
use crate::link::Links;
use crate::metrics::{ChangeLabel, Metrics, PeerLabel, StepLabel};
use crate::resolver::Names;
use crate::{probe, status::renew_lease};

/// The agent's own flags, parsed by clap straight into the configuration the loop reads.
#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    /// This node's MeshNode name (in a DaemonSet: spec.nodeName from the downward API). Required
    /// to run the agent; the subcommands ignore it. (Not a clap `required` argument: the
    /// device DaemonSet sets MESH_WIREGUARD and MESH_INTERFACE, which clap reads for these flags
    /// too, and a required flag would then refuse `mesh-agent device`.)
    #[arg(long = "node-name", env = "NODE_NAME", default_value = "", hide_default_value = true)]
    pub node: String,

    /// Where the node's private key (private.key, mode 0600) and the wireguard-go log live.
    /// Keep it across restarts: a new key means a new identity for the other nodes.
    #[arg(long, env = "MESH_STATE_DIR", default_value = "/var/lib/harness-mesh")]
    pub state_dir: PathBuf,

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
    pub wireguard: Choice,

    /// The WireGuard interface.
    #[arg(long, env = "MESH_INTERFACE", default_value = "wg-harness")]
    pub interface: String,

    /// The wireguard-go binary for the userspace backend.
    #[arg(long, env = "MESH_WIREGUARD_GO", default_value = "wireguard-go")]
    pub wireguard_go: PathBuf,

    /// Userspace WireGuard runs in another process that outlives the agent (`mesh-agent device`,
    /// the chart's device DaemonSet): adopt its device, wait up to 60 s for it, never start
    /// wireguard-go here.
    #[arg(long, env = "MESH_EXTERNAL_DEVICE")]
    pub external_device: bool,

    /// Send what this node forwards into the mesh (traffic of its pods and containers) from the
    /// node's own mesh IP: peers accept from each node only its own addresses, so without it a
    /// pod cannot reach the mesh. What arrives on the underlay interface (another host routing
    /// through this node) is never let in. The chart turns it on; off: only the node and its
    /// services use the mesh.
    #[arg(long, env = "MESH_MASQUERADE", action = clap::ArgAction::Set, default_value_t = false)]
    pub masquerade: bool,

    /// The DaemonSet this agent runs in (the chart sets it), in the --lease-namespace. On
    /// SIGTERM the agent reads it: when it is gone or being deleted (helm uninstall), the agent
    /// removes everything it put on the node before it exits (see `mesh-agent cleanup`);
    /// otherwise (a restart, a rollout, an upgrade) it leaves the device, addresses and rules in
    /// place, so that no packet is lost. Unset: never clean up on exit.
    #[arg(long, env = "MESH_DAEMONSET")]
    pub daemonset: Option<String>,

    /// With --daemonset: keep the state dir (the node's key) when cleaning up after an uninstall.
    #[arg(long, env = "MESH_KEEP_STATE_ON_UNINSTALL")]
    pub keep_state_on_uninstall: bool,

    /// The mesh subnet, routed into the interface; must match mesh-controller's --subnet (and,
    /// as there, host bits must be zero: 10.42.0.0/16, not 10.42.0.1/16).
    #[arg(long, env = "MESH_SUBNET", default_value = "10.42.0.0/16", value_parser = parse_subnet)]
    pub subnet: Ipv4Net,

    /// The cluster's pod CIDRs, comma-separated (e.g. 10.244.0.0/16): a MeshService's pod IP
    /// is forwarded to only inside one of them. Default (empty): the private ranges 10.0.0.0/8,
    /// 172.16.0.0/12, 192.168.0.0/16 and 100.64.0.0/10. Node addresses and the mesh subnet are
    /// never forwarded to either way.
    #[arg(long, env = "MESH_POD_CIDRS", value_delimiter = ',')]
    pub pod_cidrs: Vec<Ipv4Net>,

    /// Namespaces whose MeshServices get the short DNS name <service>.mesh.local,
    /// comma-separated; `*` is every namespace. Services elsewhere keep their long name only, so
    /// no tenant can squat a short name. Must match mesh-controller's --short-name-namespaces.
    #[arg(long, env = "MESH_SHORT_NAME_NAMESPACES", value_delimiter = ',', default_value = "default")]
    pub short_name_namespaces: Vec<String>,

    /// MTU of the interface: the underlay MTU minus 80 bytes of WireGuard overhead (IPv6 worst
    /// case).
    #[arg(long, env = "MESH_MTU", default_value_t = 1420)]
    pub mtu: u32,

    /// The underlay address other nodes reach this one at (in a DaemonSet: status.hostIP).
    /// Default: the address of the interface with the default route, else the first global
    /// address. MeshNode spec.endpoint overrides both.
    #[arg(long, env = "MESH_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<Ipv4Addr>,

    /// UDP port of the health-probe echo on the node's mesh IP.
    #[arg(long, env = "MESH_PROBE_PORT", default_value_t = 51821)]
    pub probe_port: u16,

    /// Seconds between probe rounds, 0.1..60; a peer is unhealthy when none of its last 3
    /// probes came back.
    #[arg(long = "probe-interval", env = "MESH_PROBE_INTERVAL", default_value = "2", value_parser = parse_probe_interval)]
    pub probe_interval: Duration,

    /// Seconds between full resyncs, which also repair changes made to the device (and to the
    /// node's status) by hand.
    #[arg(long = "resync-seconds", env = "MESH_RESYNC_SECONDS", default_value = "30", value_parser = parse_resync)]
    pub resync_interval: Duration,

    /// Namespace of the liveness Lease mesh-agent-<node> (in a pod: its own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    pub lease_namespace: String,

    /// UDP and TCP port of the authoritative DNS server for mesh.local, on the node's mesh IP
    /// (in fallback: on its underlay address); 0 turns DNS off.
    #[arg(long, env = "MESH_DNS_PORT", default_value_t = 53)]
    pub dns_port: u16,

    /// Also serve DNS on the node's underlay address, so that CoreDNS (whose pods reach node
    /// addresses, not mesh IPs) can forward the mesh.local stub domain to it.
    #[arg(long, env = "MESH_DNS_ON_UNDERLAY")]
    pub dns_on_underlay: bool,

    /// The nft binary (nftables) that enforces service ports.
    #[arg(long, env = "MESH_NFT", default_value = "nft")]
    pub nft: PathBuf,

    /// Ports (TCP and UDP, comma-separated) that peers may reach on this node's own mesh IP,
    /// besides the agent's probe echo and DNS: e.g. 22 for SSH over the mesh. Default none: a
    /// node is a mesh member, not a router, and from the tunnel only its mesh IP's agent ports,
    /// these ports and the listed ports of the services it hosts are reachable.
    #[arg(long, env = "MESH_EXPOSE_PORTS", value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..))]
    pub expose_ports: Vec<u16>,

    /// The file of the agent's API token, which the agent renews (an enrolled machine: `meshctl
    /// enroll` sets it, and the kubeconfig names the same file as its tokenFile). The new token
    /// has the same ServiceAccount, audience and lifetime, and replaces the file atomically.
    /// Unset: the credential is someone else's to renew (a pod's projected token).
    #[arg(long, env = "MESH_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// With --token-file: renew once this fraction of the token's life has passed, 0.01..0.9.
    #[arg(long, env = "MESH_TOKEN_RENEW_AT", default_value = "0.5", value_parser = parse_renew_at)]
    pub token_renew_at: f64,

    /// Address of the /metrics and /healthz endpoints. Default: port 9464 of the
    /// --advertise-address (the node IP; the chart sets it), else of 127.0.0.1. Never the
    /// wildcard by default: in the host network that would also answer on the mesh IP and on
    /// every other interface of the node.
    #[arg(long, env = "MESH_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// How the node's own processes (getaddrinfo: curl, ssh, a native service) find the zone's
    /// names. hosts: a managed block (`# BEGIN harness-mesh` .. `# END harness-mesh`) in
    /// --hosts-file with every name the agent's DNS serves, rewritten when the names change;
    /// lines outside it are never touched. resolved: split DNS through systemd-resolved's D-Bus
    /// API (the agent's DNS server on the WireGuard link, ~ZONE (--zone) its routing-only domain;
    /// needs the system bus and port 53). auto: resolved where systemd-resolved answers on the
    /// system bus, else hosts. off: leave the resolver alone. The agent takes out what it added
    /// when it exits.
    #[arg(long, env = "MESH_RESOLVER", value_enum, default_value_t = crate::resolver::Mode::Off)]
    pub resolver: crate::resolver::Mode,

    /// The hosts file of --resolver hosts (in a pod: the node's /etc/hosts mounted in).
    #[arg(long, env = "MESH_HOSTS_FILE", default_value = "/etc/hosts")]
    pub hosts_file: PathBuf,

    /// The DNS zone the agent serves and puts in the node's resolver, e.g. mesh.internal (the
    /// suffix reserved for private use, which mDNS never claims). Must match mesh-controller's
    /// --zone (the chart's mesh.zone sets both).
    #[arg(long, env = "MESH_ZONE", default_value = mesh_dataplane::dns::ZONE, value_parser = mesh_dataplane::dns::check_zone)]
    pub zone: String,

    /// The Docker-compatible API socket of the node's container engine, for MeshServices backed
    /// by a container (spec.container). Default: /run/podman/podman.sock (Podman's API service,
    /// podman.socket), else /var/run/docker.sock, whichever exists. The agent connects only once
    /// a service placed on this node asks for a container; without an engine it says so in the
    /// MeshNode's ContainerEngine condition and each such service's Ready condition.
    #[arg(long, env = "MESH_CONTAINER_SOCKET")]
    pub container_socket: Option<PathBuf>,
}

/// `--subnet`: the grammar of `mesh_core::Subnet` (the controller's), host bits refused.
fn parse_subnet(text: &str) -> Result<Ipv4Net, String> {
    mesh_core::Subnet::parse(text).map_err(|err| err.to_string())?;
    text.parse().map_err(|err| format!("{text:?} is not a subnet such as 10.42.0.0/16: {err}"))
}

fn parse_probe_interval(text: &str) -> Result<Duration, String> {
    let secs: f64 = text.parse().map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(0.1..=60.0).contains(&secs) {
        return Err(format!("must be between 0.1 and 60 seconds, got {secs}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_resync(text: &str) -> Result<Duration, String> {
    let secs: u64 = text.parse().map_err(|_| format!("{text:?} is not a whole number of seconds"))?;
    Ok(Duration::from_secs(secs.max(1)))
}

fn parse_renew_at(text: &str) -> Result<f64, String> {
    let at: f64 = text.parse().map_err(|_| format!("{text:?} is not a number"))?;
    if !(0.01..=0.9).contains(&at) {
        return Err(format!("must be between 0.01 and 0.9 (a fraction of the token's life), got {at}"));
    }
    Ok(at)
}

impl Config {
    /// How to run wireguard-go.
    pub fn userspace(&self) -> userspace::Options {
        userspace::Options {
            binary: self.wireguard_go.clone(),
            log_file: self.state_dir.join("wireguard-go.log"),
            external: self.external_device,
        }
    }

    /// The pod CIDRs, or the private ranges when none are given.
    pub fn pod_cidrs(&self) -> Vec<Ipv4Net> {
        if self.pod_cidrs.is_empty() {
            ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"]
                .iter()
                .filter_map(|c| c.parse().ok())
                .collect()
        } else {
            self.pod_cidrs.clone()
        }
    }

    /// Whose services get short names.
    pub fn short_names(&self) -> ShortNames {
        ShortNames::from_list(&self.short_name_namespaces)
    }

    /// The node's settings as the plan takes them.
    pub fn settings(&self) -> NodeSettings {
        NodeSettings {
            interface: self.interface.clone(),
            subnet: self.subnet,
            pod_cidrs: self.pod_cidrs(),
            mtu: self.mtu,
            probe_port: self.probe_port,
            dns_port: self.dns_port,
            dns_on_underlay: self.dns_on_underlay,
            expose_ports: self.expose_ports.iter().copied().collect(),
        }
    }
}

/// What the agent programs on this machine: the executor's [`DataPlane`].
struct Machine {
    wireguard: Choice,
    interface: String,
    userspace: userspace::Options,
    nft: PathBuf,
    probe_port: u16,
    dns_port: u16,
    device: Device,
    /// The device as last read, with every change written since: what a sync diffs against
    /// between resyncs, and what each probe round's read refreshes.
    known: mesh_wireguard::Known,
    links: Links,
    /// The last ruleset `nft` accepted.
    firewall: Option<String>,
    /// The echo server and the address it is bound to.
    echo: Option<(Ipv4Addr, JoinHandle<()>)>,
    /// The DNS server, if serving.
    dns: Option<DnsServer>,
    /// The zone it serves (--zone).
    zone: String,
}

impl Machine {
    /// Reads the device and keeps what it read for the next diff; a failed read forgets it.
    async fn read_device(&mut self) -> anyhow::Result<&DeviceState> {
        match self.device.get().await {
            Ok(state) => Ok(self.known.read(state)),
            Err(err) => {
                self.known.forget();
                Err(err)
            }
        }
    }
}

impl DataPlane for Machine {
    /// Reads the device when asked, when its state is not known, or when the diff would set an
    /// existing peer's endpoint (`Known::trusts`); a read that fails (wireguard-go killed) opens
    /// the device again. A device that died or was emptied since the last read is found by the
    /// next probe round's read, a failed write, or the resync.
    async fn device_diff(&mut self, desired: &DeviceConfig, read_back: bool) -> anyhow::Result<DevicePlan> {
        let kept = (!self.known.needs_read(read_back))
            .then(|| self.known.diff_at(desired, SystemTime::now()))
            .flatten()
            .filter(mesh_wireguard::Known::trusts);
        if let Some(diff) = kept {
            return Ok(diff);
        }
        if let Err(err) = self.read_device().await {
            tracing::warn!("reading the WireGuard device failed ({err:#}); opening it again");
            self.device = Device::open(self.wireguard, &self.interface, &self.userspace).await?;
            self.firewall = None;
            self.echo = None;
            self.read_device().await?;
        }
        self.known.diff_at(desired, SystemTime::now()).context("the WireGuard device's state is not known")
    }

    async fn apply_device(&mut self, plan: &DevicePlan) -> anyhow::Result<()> {
        let result = self.device.apply(plan).await;
        self.known.wrote(plan, result.is_ok());
        result
    }

    async fn configure_link(&mut self, wanted: &LinkAddresses) -> anyhow::Result<Vec<String>> {
        self.links.configure(&self.interface, wanted).await
    }

    async fn apply_firewall(&mut self, ruleset: &str) -> anyhow::Result<bool> {
        if self.firewall.as_deref() == Some(ruleset) {
            return Ok(false);
        }
        let mut child = tokio::process::Command::new(&self.nft)
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("running {} (install nftables)", self.nft.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(ruleset.as_bytes()).await?;
        }
        let out = child.wait_with_output().await?;
        if !out.status.success() {
            anyhow::bail!(
                "nft refused the node's rules (table inet {}): {}; check that the kernel has nf_tables with \
                 the ct, nat and reject expressions",
                firewall::TABLE,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        self.firewall = Some(ruleset.to_owned());
        Ok(true)
    }

    fn ensure_echo(&mut self, node_ip: Ipv4Addr) {
        if self.echo.as_ref().is_some_and(|(ip, task)| *ip == node_ip && !task.is_finished()) {
            return;
        }
        if let Some((_, task)) = self.echo.take() {
            task.abort();
        }
        let addr = SocketAddr::from((node_ip, self.probe_port));
        let task = tokio::spawn(async move {
            if let Err(err) = probe::serve(addr).await {
                tracing::warn!("probe echo stopped: {err:#}");
            }
        });
        self.echo = Some((node_ip, task));
    }

    /// Serves the zone on `ips` (restarting the server when the addresses changed or it died)
    /// and brings its records up to date.
    async fn serve_dns(&mut self, ips: &[Ipv4Addr], zone: &Zone) -> anyhow::Result<()> {
        if self.dns_port == 0 || ips.is_empty() {
            return Ok(());
        }
        let addrs: Vec<SocketAddr> = ips.iter().map(|ip| SocketAddr::from((*ip, self.dns_port))).collect();
        let current = self.dns.as_ref().is_some_and(|d| d.is_running() && d.local_addrs() == addrs.as_slice());
        if !current {
            if let Some(old) = self.dns.take() {
                let _ = old.shutdown().await;
            }
            self.dns = Some(DnsServer::start(&addrs, &self.zone).await?);
            tracing::info!(?addrs, "serving DNS for {}", self.zone);
        }
        if let Some(server) = &self.dns {
            let updated = server.update(&zone.records);
            if updated.changed > 0 {
                tracing::debug!(changed = updated.changed, "DNS records updated");
            }
            for rejected in updated.rejected {
                tracing::warn!("DNS record not served: {rejected}");
            }
        }
        Ok(())
    }
}

/// The running agent.
pub struct Agent {
    config: Config,
    settings: NodeSettings,
    client: Client,
    key: PrivateKey,
    machine: Machine,
    status: NodeStatus,
    directory: Directory,
    metrics: Arc<Metrics>,
    health: watch::Sender<Result<(), String>>,
    /// Probe results by peer name.
    windows: BTreeMap<String, ProbeWindow>,
    /// The last health summary.
    summary: Option<Summary>,
    /// Peers by name and mesh IP, as of the last sync.
    targets: BTreeMap<String, Ipv4Addr>,
    /// Peer node names by public key, as of the last sync (health reports use them, so a probe
    /// round does not re-read and re-resolve the directory).
    peer_names: BTreeMap<Key, String>,
    /// The peer set last applied to the device (reported on the Lease).
    applied: Option<mesh_api::AppliedPeers>,
    /// The endpoint and listen port published by the last sync.
    endpoint: (Option<String>, u16),
    /// Names of skipped entries already reported (to log each once).
    reported: Vec<desired::Skipped>,
    /// Allowed IPs and placements already reported as refused (to log each once).
    refused: (Vec<desired::Dropped>, Vec<desired::Refused>),
    nonce: u64,
    /// Since when the device has had no live session with each peer that has none.
    no_session_since: BTreeMap<String, Instant>,
    /// The peers without a live session for [`RELAY_AFTER`] or more: the plan relays them.
    without_direct: BTreeSet<String>,
    /// The relayed and stranded peers of the last plan (`None` in fallback).
    paths: Option<mesh_plan::relay::Paths>,
    /// The detected underlay address of the last sync (`None` with `--advertise-address`).
    underlay: Option<Ipv4Addr>,
    /// The first sync has looked for relayed peers on the device (see [`Agent::sync`]).
    adopted_paths: bool,
    /// The node's resolver (--resolver).
    names: Names,
    /// The node's container engine (--container-socket), watched once a service asks.
    engine: Engine,
    /// `status.containers` and the `ContainerEngine` condition, as of the last plan.
    container_report: (Vec<mesh_api::ContainerBackend>, Option<mesh_api::conditions::Want>),
}

/// How long a peer may go without a live WireGuard session (a handshake in the last 180 s)
/// before its traffic goes through a relay (`mesh_plan::relay`). Open nodes complete their
/// first handshake within a second; a node behind NAT within one round of its keepalives.
const RELAY_AFTER: Duration = Duration::from_secs(5);

impl Agent {
    /// Opens the device and starts watching the directory.
    pub async fn start(
        config: Config,
        client: Client,
        key: PrivateKey,
        metrics: Arc<Metrics>,
        health: watch::Sender<Result<(), String>>,
    ) -> anyhow::Result<Self> {
        let userspace = config.userspace();
        // An external device (the device DaemonSet's pod) may come after this agent: wait for it
        // (the caller stops waiting at SIGTERM; /healthz says "starting" meanwhile).
        let mut waited = 0u32;
        let device = loop {
            match Device::open(config.wireguard, &config.interface, &userspace).await {
                Ok(device) => break device,
                Err(err) if userspace.external => {
                    if waited.is_multiple_of(30) {
                        tracing::warn!("waiting for the WireGuard device: {err:#}");
                    }
                    waited += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(err) => return Err(err),
            }
        };
        tracing::info!(backend = ?device.backend(), interface = %config.interface, public_key = %key.public_key(), "WireGuard device ready");
        let links = Links::connect()?;
        let names =
            Names::start(config.resolver, config.hosts_file.clone(), &config.interface, config.dns_port, &config.zone)
                .await?;
        let directory = Directory::watch(
            client.clone(),
            Some(config.node.clone()),
            mesh_plan::Directory::new(Some(config.subnet), &config.short_names()),
        );
        let nonce = u64::from_be_bytes(key.public_key().as_bytes()[..8].try_into().unwrap_or_default());
        // In fallback there is nothing to probe: Connected says why there is no tunnel.
        let summary = device.fallback_reason().map(|why| Summary {
            connected: false,
            reason: "NoTunnel",
            message: format!(
                "{why}; this node's host and dual services are reached at its host address, its mesh services not at \
                 all (they are never offered in plaintext)"
            ),
        });
        let machine = Machine {
            wireguard: config.wireguard,
            interface: config.interface.clone(),
            userspace,
            nft: config.nft.clone(),
            probe_port: config.probe_port,
            dns_port: config.dns_port,
            device,
            known: mesh_wireguard::Known::default(),
            links,
            firewall: None,
            echo: None,
            dns: None,
            zone: config.zone.clone(),
        };
        let engine = Engine::new(config.container_socket.clone());
        let status =
            NodeStatus { node: config.node.clone(), writer: Writer::new(client.clone()), directory: directory.clone() };
        Ok(Self {
            settings: config.settings(),
            config,
            client,
            key,
            machine,
            status,
            directory,
            metrics,
            health,
            windows: BTreeMap::new(),
            summary,
            targets: BTreeMap::new(),
            peer_names: BTreeMap::new(),
            applied: None,
            endpoint: (None, mesh_api::DEFAULT_LISTEN_PORT as u16),
            reported: Vec::new(),
            refused: Default::default(),
            nonce,
            no_session_since: BTreeMap::new(),
            without_direct: BTreeSet::new(),
            paths: None,
            underlay: None,
            adopted_paths: false,
            names,
            engine,
            container_report: (Vec::new(), None),
        })
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        tokio::select! {
            ready = self.directory.ready() => ready.context("listing MeshNodes and MeshServices")?,
            () = &mut shutdown => return Ok(()),
        }
        let mut resync = tokio::time::interval(self.config.resync_interval);
        let mut lease = tokio::time::interval(Duration::from_secs(10));
        let mut retry_direct = tokio::time::interval(mesh_plan::relay::RETRY_DIRECT_EVERY);
        let mut probes = tokio::time::interval(self.config.probe_interval);
        probes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (probe_tx, mut probe_rx) = tokio::sync::mpsc::channel::<Vec<(String, Option<Duration>)>>(4);
        let changed = self.directory.changed.clone();
        let mut engine = self.engine.subscribe();
        let mut probing = false;
        loop {
            tokio::select! {
                () = &mut shutdown => {
                    tracing::info!("stopping");
                    self.names.remove().await;
                    return Ok(());
                }
                () = changed.notified() => {
                    // Let a burst of watch events settle into one sync.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    self.sync_logged(false).await;
                }
                _ = resync.tick() => self.sync_logged(true).await,
                Ok(()) = engine.changed() => {
                    // A container started, stopped or moved: forward to where it is now.
                    engine.mark_unchanged();
                    self.sync_logged(false).await;
                }
                _ = retry_direct.tick(), if self.paths.as_ref().is_some_and(|p| !p.relayed.is_empty()) => {
                    if let Err(err) = self.retry_direct().await {
                        tracing::warn!("retrying the direct paths of relayed peers: {err:#}");
                    }
                    self.sync_logged(false).await;
                }
                _ = lease.tick() => {
                    let (namespace, node) = (&self.config.lease_namespace, &self.config.node);
                    match renew_lease(&self.client, namespace, node, 40, self.applied.as_ref()).await {
                        Ok(()) => {
                            self.metrics.api_writes.inc();
                            self.metrics.lease_writes.inc();
                        }
                        Err(err) => tracing::warn!("{err:#}"),
                    }
                }
                _ = probes.tick(), if !probing => {
                    if let Some(source) = self.machine.echo.as_ref().map(|(ip, _)| *ip) {
                        probing = true;
                        let targets = self.targets.clone();
                        let (port, nonce, tx) = (self.config.probe_port, self.nonce, probe_tx.clone());
                        let timeout = self.config.probe_interval.min(Duration::from_secs(1));
                        tokio::spawn(async move {
                            let rounds = targets.into_iter().map(|(name, ip)| async move {
                                (name, probe::probe(source, SocketAddr::from((ip, port)), nonce, timeout).await)
                            });
                            let _ = tx.send(join_all(rounds).await).await;
                        });
                    }
                }
                Some(results) = probe_rx.recv() => {
                    probing = false;
                    match self.report_health(results).await {
                        Ok(true) => {
                            tracing::info!(without_direct = ?self.without_direct, "the peers without a direct path changed: planning their paths again");
                            self.sync_logged(false).await;
                        }
                        Ok(false) => {
                            let emptied = self.machine.device.fallback_reason().is_none()
                                && self.machine.known.state().is_some_and(|device| device.private_key.is_none());
                            if emptied {
                                // Its wireguard-go restarted (the device pod): set it up now rather
                                // than at the next resync.
                                tracing::info!("the WireGuard device came back empty: setting it up again");
                                self.sync_logged(false).await;
                            } else if self.underlay_moved().await {
                                self.sync_logged(false).await;
                            }
                        }
                        Err(err) => {
                            tracing::warn!("reporting health: {err:#}");
                            // The device may be gone (its wireguard-go restarted): a sync opens it
                            // again and sets it up, now rather than at the next resync.
                            if self.machine.read_device().await.is_err() {
                                self.sync_logged(false).await;
                            }
                        }
                    }
                }
            }
        }
    }

    /// The peers (by name, from `names`) whose entry on the device as it is holds no allowed IP
    /// and has no live session: a previous run of this agent sent their traffic through a relay.
    async fn relayed_on_device(machine: &mut Machine, names: &BTreeMap<Key, String>) -> BTreeSet<String> {
        let Ok(state) = machine.read_device().await else {
            return BTreeSet::new();
        };
        let now = SystemTime::now();
        state
            .peers
            .iter()
            .filter(|(_, peer)| peer.config.allowed_ips.is_empty())
            .filter(|(_, peer)| peer.handshake_age(now).is_none_or(|age| age >= health::HANDSHAKE_STALE_AFTER))
            .filter_map(|(key, _)| names.get(key).cloned())
            .collect()
    }

    /// Whether the node's detected underlay address changed since the last sync (the machine
    /// moved to another network: a laptop, a node behind a NAT that was replaced); the sync that
    /// follows handles it. Checked every probe round; not with `--advertise-address`.
    async fn underlay_moved(&self) -> bool {
        if self.config.advertise_address.is_some() || self.underlay.is_none() {
            return false;
        }
        match self.machine.links.underlay_ipv4(&self.config.interface).await {
            Ok(now) => now != self.underlay,
            Err(err) => {
                tracing::warn!("reading the underlay address: {err:#}");
                false
            }
        }
    }

    /// Sets every peer's endpoint again as the device has it: that drops the source address
    /// wireguard-go keeps per peer, which after the underlay address changed is gone (it would
    /// keep sending from it, and clears it only after 15 s without replies).
    async fn reset_peer_sources(&mut self) {
        let state = match self.machine.read_device().await {
            Ok(state) => state,
            Err(err) => {
                tracing::warn!("reading the WireGuard device: {err:#}");
                return;
            }
        };
        let update: Vec<mesh_wireguard::PeerUpdate> = state
            .peers
            .iter()
            .filter_map(|(key, peer)| {
                Some(mesh_wireguard::PeerUpdate {
                    endpoint: Some(peer.config.endpoint?),
                    ..mesh_wireguard::PeerUpdate::new(*key)
                })
            })
            .collect();
        if !update.is_empty()
            && let Err(err) = self.machine.apply_device(&DevicePlan { update, ..DevicePlan::default() }).await
        {
            tracing::warn!("setting the peers' endpoints again: {err:#}");
        }
    }

    /// Turns off the keepalive of each relayed peer's direct entry; the sync that follows turns
    /// it on again, and WireGuard then sends a keepalive there, so tries a direct handshake (and
    /// retries it for 90 s). Nothing else is sent to an entry with no allowed IPs.
    async fn retry_direct(&mut self) -> anyhow::Result<()> {
        let relayed = self.paths.as_ref().map(|p| p.relayed.clone()).unwrap_or_default();
        let update: Vec<mesh_wireguard::PeerUpdate> = self
            .peer_names
            .iter()
            .filter(|(_, name)| relayed.contains_key(name.as_str()))
            .map(|(key, _)| mesh_wireguard::PeerUpdate {
                persistent_keepalive: Some(0),
                ..mesh_wireguard::PeerUpdate::new(*key)
            })
            .collect();
        if update.is_empty() {
            return Ok(());
        }
        let plan = DevicePlan { update, ..DevicePlan::default() };
        self.machine.apply_device(&plan).await
    }

    async fn sync_logged(&mut self, resync: bool) {
        let started = Instant::now();
        let (result, cpu) = mesh_agent::cputime::measured(self.sync(resync)).await;
        self.metrics.sync_seconds.observe(started.elapsed().as_secs_f64());
        self.metrics.sync_cpu_seconds.observe(cpu.as_secs_f64());
        match result {
            Ok(()) => {
                let _ = self.health.send(Ok(()));
            }
            Err(err) => {
                self.metrics.sync_errors.inc();
                tracing::warn!("sync failed, retrying on the next change or resync: {err:#}");
                let _ = self.health.send(Err(format!("{err:#}")));
            }
        }
    }

    fn published(&self) -> Published {
        Published {
            public_key: self.machine.device.fallback_reason().is_none().then(|| self.key.public_key().to_base64()),
            endpoint: self.endpoint.0.clone(),
            listen_port: self.endpoint.1,
            backend: self.machine.device.backend(),
            connected: self.summary.clone(),
            paths: self.paths.clone(),
            containers: self.container_report.0.clone(),
            engine: self.container_report.1.clone(),
        }
    }

    /// The underlay interface for source NAT (the one that has the node's underlay address);
    /// none, with a warning, where there is no such interface.
    async fn masquerade_underlay(&self, underlay_ip: Option<Ipv4Addr>) -> anyhow::Result<Option<String>> {
        let underlay = match underlay_ip {
            Some(ip) => self.machine.links.interface_with(ip).await?,
            None => None,
        };
        if underlay.is_none() && self.machine.firewall.is_none() {
            tracing::warn!(
                ?underlay_ip,
                "no interface has the node's underlay address: pods' traffic is not let into the mesh"
            );
        }
        Ok(underlay)
    }

    /// One pass: one snapshot, the plan, then the executor (data plane first, status last).
    async fn sync(&mut self, resync: bool) -> anyhow::Result<()> {
        let fallback = self.machine.device.fallback_reason().is_some();
        let underlay = match self.config.advertise_address {
            Some(ip) => Some(ip),
            None => self.machine.links.underlay_ipv4(&self.config.interface).await?,
        };
        if self.config.advertise_address.is_none() {
            if self.underlay.is_some() && underlay != self.underlay && !fallback {
                tracing::info!(from = ?self.underlay, to = ?underlay, "the underlay address changed: resetting the peers' source addresses; the new endpoint is published");
                self.reset_peer_sources().await;
            }
            self.underlay = underlay;
        }
        let masquerade =
            if self.config.masquerade && !fallback { self.masquerade_underlay(underlay).await? } else { None };

        let planning = Step::start();
        // A resync also compares every node with the store: were an event ever missed, the
        // directory is right again within one resync interval. (Services have no store: their
        // watch applies each event to the directory, and a re-list compares them all.)
        let (directory, updated) = self.directory.update(resync).await;
        tracing::debug!(nodes = updated.nodes, "nodes converted for this sync");
        self.sync_with(&directory, fallback, underlay, masquerade, resync, planning).await
    }

    /// The rest of a sync, from the directory as of now: the plan, then the executor.
    async fn sync_with(
        &mut self,
        directory: &mesh_plan::Directory,
        fallback: bool,
        underlay: Option<Ipv4Addr>,
        masquerade: Option<String>,
        resync: bool,
        planning: Step,
    ) -> anyhow::Result<()> {
        let view = self.engine.view();
        let containers = view.addresses();
        let mut input = NodeInput {
            name: &self.config.node,
            key: &self.key,
            settings: &self.settings,
            fallback,
            underlay,
            masquerade_underlay: masquerade.as_deref(),
            without_direct: &self.without_direct,
            containers: &containers,
        };
        let mut plan = directory.plan(&input)?;
        let mut adopted = BTreeSet::new();
        if !self.adopted_paths && !fallback {
            // The first sync of this agent (a restart, an upgrade): peers the device already
            // sends through a relay stay relayed, rather than going direct for the observation
            // window and dropping their traffic meanwhile.
            self.adopted_paths = true;
            adopted = Self::relayed_on_device(&mut self.machine, &plan.names).await;
            if !adopted.is_empty() {
                tracing::info!(peers = ?adopted, "adopting the device's relayed peers");
                let since = Instant::now().checked_sub(RELAY_AFTER).unwrap_or_else(Instant::now);
                self.no_session_since.extend(adopted.iter().map(|n| (n.clone(), since)));
                input.without_direct = &adopted;
                plan = directory.plan(&input)?;
            }
        }
        if !adopted.is_empty() {
            self.without_direct = adopted;
        }
        match &plan.local {
            Ok(local) if !local.containers.is_empty() => {
                // Watched from the first service that asks; its first view wakes a new sync.
                self.engine.start();
                if !view.pending {
                    let refused = local.refused.iter().map(|r| (r.service.clone(), r.why.clone())).collect();
                    self.container_report = (
                        containers::report(&local.containers, &view, &refused),
                        containers::engine_condition(&local.containers, &view),
                    );
                }
            }
            _ => self.container_report = (Vec::new(), None),
        }
        self.paths = (!plan.fallback).then(|| plan.paths.clone());
        let planned = planning.took();
        self.metrics.plan_seconds.observe(planned.wall.as_secs_f64());
        self.observe_step("plan", planned);
        self.report(directory, &plan);
        self.endpoint = (plan.endpoint.clone(), plan.listen_port);
        let published = self.published();

        // The plan's zone is under mesh.local; --zone moves it.
        let rezoned;
        let zone = if self.config.zone == mesh_dataplane::dns::ZONE {
            directory.zone()
        } else {
            rezoned = mesh_dataplane::dns::rezone(directory.zone(), &self.config.zone);
            &rezoned
        };
        let executed = executor::execute(&plan, zone, &mut self.machine, &mut self.status, &published, resync).await;
        for (step, took) in &executed.steps {
            self.observe_step(step, *took);
        }
        // What the sync records of it: logs, metrics, what the probes and the status use next.
        let step = Step::start();
        match &executed.status {
            Ok(true) => {
                self.metrics.api_writes.inc();
                self.metrics.status_writes.inc();
                tracing::info!("published the public key, endpoint and backend in MeshNode {}", self.config.node);
            }
            Ok(false) => {}
            Err(err) => {
                self.metrics.status_write_errors.inc();
                tracing::warn!("{err:#}; the data plane is programmed all the same, the write is retried next sync");
            }
        }
        if let Some(diff) = &executed.device {
            for (change, n) in [("add", diff.add.len()), ("remove", diff.remove.len()), ("update", diff.update.len())] {
                self.metrics.peer_changes.get_or_create(&ChangeLabel { change }).inc_by(n as u64);
            }
            tracing::info!(
                added = diff.add.len(),
                removed = diff.remove.len(),
                updated = diff.update.len(),
                key_set = diff.private_key.is_some(),
                "applied WireGuard changes"
            );
        } else if executed.device_applied {
            self.metrics.noop_syncs.inc();
        }
        if !executed.link_changes.is_empty() {
            tracing::info!(changes = %executed.link_changes.join(", "), "configured {}", self.config.interface);
        }
        if executed.firewall_changed
            && let Ok(local) = &plan.local
        {
            tracing::info!(services = local.hosted.len(), exposed = ?self.settings.expose_ports, "node and service port rules applied");
        }
        if executed.device_applied {
            self.applied = plan.applied.clone();
            self.metrics.peers.set(plan.device.peers.len() as i64);
            // A set, not a scan of the names per window: at 5,000 peers that was 25 million
            // string compares, every sync.
            let peers: HashSet<&str> = plan.names.values().map(String::as_str).collect();
            let metrics = &self.metrics;
            self.windows.retain(|node, _| {
                let kept = peers.contains(node.as_str());
                if !kept {
                    metrics.forget(node);
                }
                kept
            });
            self.targets = plan.probe_targets.clone();
            self.peer_names = plan.names.clone();
        }
        if let Ok(local) = &plan.local {
            self.metrics.applied_services.set(local.hosted.len() as i64);
        }
        self.observe_step("record", step.took());
        let server = plan.dns_listen.first().copied();
        let step = Step::start();
        let revision = directory.zone_revision();
        if let Err(err) = self.names.update(zone, revision, server, resync, &self.machine.links).await {
            tracing::warn!("--resolver {:?}: {err:#}", self.config.resolver);
        }
        self.observe_step("names", step.took());
        executed.dataplane
    }

    fn observe_step(&self, step: &'static str, took: Took) {
        self.metrics.sync_step_seconds.get_or_create(&StepLabel { step }).observe(took.wall.as_secs_f64());
        self.metrics.sync_step_cpu_seconds.get_or_create(&StepLabel { step }).observe(took.cpu.as_secs_f64());
    }

    /// Logs each skipped entry, dropped allowed IP and refused placement once, and sets their
    /// gauges.
    fn report(&mut self, directory: &mesh_plan::Directory, plan: &mesh_plan::NodePlan) {
        for d in directory.dropped.iter().filter(|d| !self.refused.0.contains(d)) {
            tracing::warn!(node = %d.node, allowed_ip = %d.allowed_ip, "not applying this allowed IP of the peer entry: {}", d.why);
        }
        self.metrics.dropped_allowed_ips.set(directory.dropped.len() as i64);
        self.refused.0 = directory.dropped.clone();
        for skipped in plan.skipped.iter().filter(|s| !self.reported.contains(s)) {
            tracing::warn!(node = %skipped.node, "not applying this peer entry: {}", skipped.why);
        }
        self.reported = plan.skipped.clone();
        let refused = plan.local.as_ref().map(|l| l.refused.clone()).unwrap_or_default();
        for r in refused.iter().filter(|r| !self.refused.1.contains(r)) {
            tracing::warn!(service = %r.service, "not hosting this service on this node: {}", r.why);
        }
        self.metrics.refused_services.set(refused.len() as i64);
        self.refused.1 = refused;
    }

    /// Records a probe round, updates the per-peer metrics, and publishes `Connected` when the
    /// summary changed. Returns whether the set of peers without a direct path changed (the
    /// caller plans again: their traffic moves to or from a relay).
    async fn report_health(&mut self, results: Vec<(String, Option<Duration>)>) -> anyhow::Result<bool> {
        let state = self.machine.read_device().await?;
        let now = SystemTime::now();
        let mut by_name: BTreeMap<&str, (Option<Duration>, u64, u64)> = BTreeMap::new();
        for (key, name) in &self.peer_names {
            if let Some(peer) = state.peers.get(key) {
                by_name.insert(name, (peer.handshake_age(now), peer.rx_bytes, peer.tx_bytes));
            }
        }
        for (name, rtt) in results {
            self.windows.entry(name).or_default().record(rtt);
        }
        let without_direct = observe_sessions(&self.peer_names, &mut self.no_session_since, &by_name, Instant::now());
        let mut healths = Vec::new();
        for name in self.peer_names.values() {
            let window = self.windows.get(name).cloned().unwrap_or_default();
            let (age, rx, tx) = by_name.get(name.as_str()).copied().unwrap_or((None, 0, 0));
            let label = PeerLabel { peer: name.clone() };
            match age {
                Some(age) => {
                    self.metrics.handshake_age.get_or_create(&label).set(age.as_secs_f64());
                }
                None => {
                    self.metrics.handshake_age.remove(&label);
                }
            }
            self.metrics.rx_bytes.get_or_create(&label).set(rx);
            self.metrics.tx_bytes.get_or_create(&label).set(tx);
            self.metrics.probe_loss.get_or_create(&label).set(window.loss());
            if let Some(rtt) = window.last_rtt() {
                self.metrics.probe_rtt.get_or_create(&label).set(rtt.as_secs_f64());
            }
            let judged: PeerHealth = health::judge(name, &window, age);
            self.metrics.peer_healthy.get_or_create(&label).set(i64::from(judged.problem.is_none()));
            healths.push(judged);
        }
        // A peer not probed yet does not count against the node until its first round.
        let summary = health::summary(&healths, 5);
        if self.summary.as_ref() != Some(&summary) {
            tracing::info!(connected = summary.connected, "{}", summary.message);
            self.summary = Some(summary);
            let published = self.published();
            if self.status.publish(&published, false).await? {
                self.metrics.api_writes.inc();
                self.metrics.status_writes.inc();
            }
        }
        let changed = without_direct != self.without_direct;
        self.without_direct = without_direct;
        Ok(changed)
    }
}

/// The peers (of `peer_names`) whose device entry has had no live session (a handshake younger
/// than [`health::HANDSHAKE_STALE_AFTER`]) for [`RELAY_AFTER`] or more at `now`, given each
/// peer's handshake age in `by_name`; `no_session_since` remembers since when each one has had
/// none.
fn observe_sessions(
    peer_names: &BTreeMap<Key, String>,
    no_session_since: &mut BTreeMap<String, Instant>,
    by_name: &BTreeMap<&str, (Option<Duration>, u64, u64)>,
    now: Instant,
) -> BTreeSet<String> {
    let mut without = BTreeSet::new();
    let mut since = BTreeMap::new();
    for name in peer_names.values() {
        let age = by_name.get(name.as_str()).and_then(|(age, _, _)| *age);
        if age.is_some_and(|a| a < health::HANDSHAKE_STALE_AFTER) {
            continue;
        }
        let first = no_session_since.get(name).copied().unwrap_or(now);
        if now.duration_since(first) >= RELAY_AFTER {
            without.insert(name.clone());
        }
        since.insert(name.clone(), first);
    }
    *no_session_since = since;
    without
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_without_a_direct_path_only_after_some_seconds_with_no_live_session() {
        let key = |i: u8| PrivateKey::from_bytes([i; 32]).public_key();
        let names: BTreeMap<Key, String> = [(key(1), "open".to_owned()), (key(2), "nat".to_owned())].into();
        let mut since = BTreeMap::new();
        let start = Instant::now();
        let ages = |nat: Option<u64>| -> BTreeMap<&'static str, (Option<Duration>, u64, u64)> {
            [("open", (Some(Duration::from_secs(3)), 0, 0)), ("nat", (nat.map(Duration::from_secs), 0, 0))].into()
        };
        assert!(observe_sessions(&names, &mut since, &ages(None), start).is_empty(), "not yet");
        let later = start + RELAY_AFTER;
        assert_eq!(observe_sessions(&names, &mut since, &ages(None), later), BTreeSet::from(["nat".to_owned()]));
        // A stale session counts as none; a live one ends it, and the clock starts again after.
        assert_eq!(observe_sessions(&names, &mut since, &ages(Some(200)), later).len(), 1);
        assert!(observe_sessions(&names, &mut since, &ages(Some(1)), later).is_empty());
        assert!(observe_sessions(&names, &mut since, &ages(None), later + Duration::from_secs(1)).is_empty());
        // A peer that left is forgotten.
        let only_open: BTreeMap<Key, String> = [(key(1), "open".to_owned())].into();
        observe_sessions(&only_open, &mut since, &ages(None), later);
        assert!(since.is_empty());
    }
}
