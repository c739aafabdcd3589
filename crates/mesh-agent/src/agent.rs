//! The agent's loop: on every directory change (debounced) and on a resync timer it brings the
//! node to the desired state — status published, WireGuard peers applied as a diff, addresses
//! and route set, service ports enforced — and on the probe timer it measures every peer and
//! reports health. Errors are logged, counted and retried on the next round; nothing here
//! exits the process.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use futures::future::join_all;
use ipnet::Ipv4Net;
use kube::Client;
use mesh_dataplane::desired::{self, Hosted};
use mesh_dataplane::firewall;
use mesh_dataplane::health::{self, PeerHealth, ProbeWindow, Summary};
use mesh_wireguard::{DeviceConfig, DeviceState, Key, PrivateKey};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backend::{Choice, Device, userspace};
use crate::directory::{Directory, underlay_ipv4};
use crate::dns::DnsServer;
use crate::link::{Links, Wanted};
use crate::metrics::{ChangeLabel, Metrics, PeerLabel};
use crate::status::{self, Published};
use crate::{probe, status::renew_lease};

/// The WireGuard port when the MeshNode does not name one.
const DEFAULT_PORT: u16 = 51820;

/// Everything the loop needs to know, from the command line.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's MeshNode name.
    pub node: String,
    /// The WireGuard interface.
    pub interface: String,
    /// Which backend to use.
    pub wireguard: Choice,
    /// How to run wireguard-go.
    pub userspace: userspace::Options,
    /// The mesh subnet.
    pub subnet: Ipv4Net,
    /// The cluster's pod CIDRs: the only addresses a service's traffic is forwarded to.
    pub pod_cidrs: Vec<Ipv4Net>,
    /// Whose services get short names `<service>.mesh.local`.
    pub short_names: mesh_dataplane::dns::ShortNames,
    /// Source-NAT what the node forwards into the mesh (its pods' traffic) to its mesh IP.
    pub masquerade: bool,
    /// MTU of the interface.
    pub mtu: u32,
    /// The underlay address to advertise, instead of the detected one.
    pub advertise_address: Option<Ipv4Addr>,
    /// UDP port of the probe echo on the mesh IP.
    pub probe_port: u16,
    /// Time between probe rounds.
    pub probe_interval: Duration,
    /// Time between full resyncs (catches drift made by hand).
    pub resync_interval: Duration,
    /// The liveness Lease's namespace.
    pub lease_namespace: String,
    /// The `nft` binary.
    pub nft: PathBuf,
    /// The port DNS for `mesh.local` is served on (on the mesh IP; in fallback on the underlay
    /// address); 0 turns it off.
    pub dns_port: u16,
    /// Also serve DNS on the node's underlay address (for CoreDNS's stub domain in a cluster,
    /// whose pods reach node addresses but not mesh IPs).
    pub dns_on_underlay: bool,
    /// Ports (TCP and UDP) open to peers on the node's own mesh IP besides the agent's.
    pub expose_ports: BTreeSet<u16>,
}

/// The running agent.
pub struct Agent {
    config: Config,
    client: Client,
    key: PrivateKey,
    device: Device,
    links: Links,
    directory: Directory,
    metrics: Arc<Metrics>,
    health: watch::Sender<Result<(), String>>,
    /// The last ruleset `nft` accepted.
    firewall: Option<String>,
    /// Probe results by peer name.
    windows: BTreeMap<String, ProbeWindow>,
    /// The last health summary.
    summary: Option<Summary>,
    /// The echo server and the address it is bound to.
    echo: Option<(Ipv4Addr, JoinHandle<()>)>,
    /// Peers by name and mesh IP, as of the last sync.
    targets: BTreeMap<String, Ipv4Addr>,
    /// Peer node names by public key, as of the last sync (health reports use them, so a probe
    /// round does not re-read and re-resolve the directory).
    peer_names: BTreeMap<Key, String>,
    /// The peer set last applied to the device.
    applied: Option<mesh_api::AppliedPeers>,
    /// The DNS server, if serving.
    dns: Option<DnsServer>,
    /// Names of skipped entries already reported (to log each once).
    reported: Vec<desired::Skipped>,
    /// Allowed IPs and placements already reported as refused (to log each once).
    refused: (Vec<desired::Dropped>, Vec<desired::Refused>),
    nonce: u64,
}

impl Agent {
    /// Opens the device and starts watching the directory.
    pub async fn start(
        config: Config,
        client: Client,
        key: PrivateKey,
        metrics: Arc<Metrics>,
        health: watch::Sender<Result<(), String>>,
    ) -> anyhow::Result<Self> {
        // An external device (the device DaemonSet's pod) may come after this agent: wait for it
        // (the caller stops waiting at SIGTERM; /healthz says "starting" meanwhile).
        let mut waited = 0u32;
        let device = loop {
            match Device::open(config.wireguard, &config.interface, &config.userspace).await {
                Ok(device) => break device,
                Err(err) if config.userspace.external => {
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
        let directory = Directory::watch(client.clone());
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
        Ok(Self {
            config,
            client,
            key,
            device,
            links,
            directory,
            metrics,
            health,
            firewall: None,
            windows: BTreeMap::new(),
            summary,
            echo: None,
            targets: BTreeMap::new(),
            peer_names: BTreeMap::new(),
            reported: Vec::new(),
            refused: Default::default(),
            dns: None,
            applied: None,
            nonce,
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
        let mut probes = tokio::time::interval(self.config.probe_interval);
        probes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (probe_tx, mut probe_rx) = tokio::sync::mpsc::channel::<Vec<(String, Option<Duration>)>>(4);
        let changed = self.directory.changed.clone();
        let mut probing = false;
        loop {
            tokio::select! {
                () = &mut shutdown => {
                    tracing::info!("stopping");
                    return Ok(());
                }
                () = changed.notified() => {
                    // Let a burst of watch events settle into one sync.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    self.sync_logged().await;
                }
                _ = resync.tick() => self.sync_logged().await,
                _ = lease.tick() => {
                    match renew_lease(&self.client, &self.config.lease_namespace, &self.config.node, 40).await {
                        Ok(()) => { self.metrics.api_writes.inc(); }
                        Err(err) => tracing::warn!(namespace = %self.config.lease_namespace, "renewing the liveness Lease: {err:#}"),
                    }
                }
                _ = probes.tick(), if !probing => {
                    if let Some(source) = self.echo.as_ref().map(|(ip, _)| *ip) {
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
                    if let Err(err) = self.report_health(results).await {
                        tracing::warn!("reporting health: {err:#}");
                        // The device may be gone (its wireguard-go restarted): a sync opens it
                        // again and sets it up, now rather than at the next resync.
                        if self.device.get().await.is_err() {
                            self.sync_logged().await;
                        }
                    }
                }
            }
        }
    }

    async fn sync_logged(&mut self) {
        match self.sync().await {
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

    fn published(&self, endpoint: Option<String>, listen_port: u16) -> Published {
        Published {
            public_key: self.device.fallback_reason().is_none().then(|| self.key.public_key().to_base64()),
            endpoint,
            listen_port,
            backend: self.device.backend(),
            connected: self.summary.clone(),
            applied_peers: self.applied.clone(),
        }
    }

    /// One pass: status, device, addresses, firewall, echo.
    async fn sync(&mut self) -> anyhow::Result<()> {
        let name = self.config.node.clone();
        let Some(me) = self.directory.node(&name) else {
            anyhow::bail!(
                "MeshNode {name} does not exist: the controller mirrors it from the Kubernetes Node, or create it \
                 (meshctl enroll, or kubectl apply a MeshNode named {name})"
            );
        };
        let listen_port = u16::try_from(me.spec.listen_port).unwrap_or(DEFAULT_PORT);
        let endpoint = match &me.spec.endpoint {
            Some(endpoint) => Some(endpoint.clone()),
            None => {
                let address = match self.config.advertise_address {
                    Some(ip) => Some(ip),
                    None => self.links.underlay_ipv4(&self.config.interface).await?,
                };
                address.map(|ip| format!("{ip}:{listen_port}"))
            }
        };
        if status::publish(&self.client, &me, &self.published(endpoint.clone(), listen_port)).await? {
            self.metrics.api_writes.inc();
            tracing::info!("published the public key, endpoint and backend in MeshNode {name}");
        }

        if self.device.fallback_reason().is_some() {
            // Out of the tunnel: DNS is served on the underlay address, where others can reach it.
            let underlay = me.status.as_ref().and_then(|s| s.endpoint.as_deref()).and_then(underlay_ipv4);
            return self.serve_dns(underlay.into_iter().collect()).await;
        }
        let (entries, dropped) = desired::confine_allowed_ips(self.config.subnet, self.directory.peer_entries());
        for d in dropped.iter().filter(|d| !self.refused.0.contains(d)) {
            tracing::warn!(node = %d.node, allowed_ip = %d.allowed_ip, "not applying this allowed IP of the peer entry: {}", d.why);
        }
        self.metrics.dropped_allowed_ips.set(dropped.len() as i64);
        self.refused.0 = dropped;
        let peers = desired::peers(&name, &self.key.public_key(), &entries);
        for skipped in &peers.skipped {
            if !self.reported.contains(skipped) {
                tracing::warn!(node = %skipped.node, "not applying this peer entry: {}", skipped.why);
            }
        }
        self.reported = peers.skipped.clone();
        let wanted = DeviceConfig { private_key: self.key.clone(), listen_port, peers: peers.peers };
        let actual = self.read_device().await?;
        let plan = mesh_wireguard::plan(&actual, &wanted);
        if plan.is_empty() {
            self.metrics.noop_syncs.inc();
        } else {
            self.device.apply(&plan).await.context("applying the peer changes")?;
            for (change, n) in [("add", plan.add.len()), ("remove", plan.remove.len()), ("update", plan.update.len())] {
                self.metrics.peer_changes.get_or_create(&ChangeLabel { change }).inc_by(n as u64);
            }
            tracing::info!(
                added = plan.add.len(),
                removed = plan.remove.len(),
                updated = plan.update.len(),
                key_set = plan.private_key.is_some(),
                "applied WireGuard changes"
            );
        }
        self.metrics.peers.set(wanted.peers.len() as i64);
        let applied = mesh_api::AppliedPeers {
            count: i32::try_from(peers.applied.len()).unwrap_or(i32::MAX),
            digest: desired::digest(&peers.applied),
        };
        if self.applied.as_ref() != Some(&applied) {
            self.applied = Some(applied);
            if status::publish(&self.client, &me, &self.published(endpoint.clone(), listen_port)).await? {
                self.metrics.api_writes.inc();
            }
        }
        let gone: Vec<String> =
            self.windows.keys().filter(|n| !peers.names.values().any(|p| p == *n)).cloned().collect();
        for node in gone {
            self.windows.remove(&node);
            self.metrics.forget(&node);
        }
        let ips = self.directory.node_ips();
        self.targets = peers.names.values().filter_map(|n| ips.get(n).map(|ip| (n.clone(), *ip))).collect();
        self.peer_names = peers.names.clone();

        let Some(node_ip) = me.status.as_ref().and_then(|s| s.mesh_ip.as_deref()).and_then(|ip| ip.parse().ok()) else {
            anyhow::bail!("MeshNode {name} has no mesh IP yet: is mesh-controller running?");
        };
        let bounds = desired::Bounds {
            subnet: Some(self.config.subnet),
            node_addresses: self.directory.node_addresses(),
            pod_cidrs: self.config.pod_cidrs.clone(),
        };
        let (placements, refused) = desired::check_placements(&name, &bounds, self.directory.placements());
        for r in refused.iter().filter(|r| !self.refused.1.contains(r)) {
            tracing::warn!(service = %r.service, "not hosting this service on this node: {}", r.why);
        }
        self.metrics.refused_services.set(refused.len() as i64);
        self.refused.1 = refused;
        let hosted = desired::hosted(&name, Some(node_ip), &placements);
        let wanted_link = Wanted {
            mtu: self.config.mtu,
            node_ip,
            service_ips: hosted.iter().map(|h| h.ip).collect(),
            subnet: self.config.subnet,
        };
        let changed = self.links.configure(&self.config.interface, &wanted_link).await?;
        if !changed.is_empty() {
            tracing::info!(changes = %changed.join(", "), "configured {}", self.config.interface);
        }
        self.metrics.applied_services.set(hosted.len() as i64);
        let masquerade = if self.config.masquerade { self.masquerade(node_ip).await? } else { None };
        let member = self.member(node_ip);
        self.enforce(&hosted, &member, masquerade.as_ref()).await?;
        self.ensure_echo(node_ip);
        let mut listen = vec![node_ip];
        if self.config.dns_on_underlay
            && let Some(underlay) = me.status.as_ref().and_then(|s| s.endpoint.as_deref()).and_then(underlay_ipv4)
        {
            listen.push(underlay);
        }
        self.serve_dns(listen).await
    }

    /// Serves the zone on `ips` (restarting the server when the addresses changed or it died)
    /// and brings its records up to date with the directory.
    async fn serve_dns(&mut self, ips: Vec<Ipv4Addr>) -> anyhow::Result<()> {
        if self.config.dns_port == 0 || ips.is_empty() {
            return Ok(());
        }
        let addrs: Vec<SocketAddr> = ips.into_iter().map(|ip| SocketAddr::from((ip, self.config.dns_port))).collect();
        let current = self.dns.as_ref().is_some_and(|d| d.is_running() && d.local_addrs() == addrs.as_slice());
        if !current {
            if let Some(old) = self.dns.take() {
                let _ = old.shutdown().await;
            }
            self.dns = Some(DnsServer::start(&addrs, mesh_dataplane::dns::ZONE).await?);
            tracing::info!(?addrs, "serving DNS for {}", mesh_dataplane::dns::ZONE);
        }
        let (nodes, services) = self.directory.dns_inputs();
        let zone = mesh_dataplane::dns::zone_with(&nodes, &services, &self.config.short_names);
        if let Some(server) = &self.dns {
            let updated = server.update(&zone.records).await;
            if updated.changed > 0 {
                tracing::debug!(changed = updated.changed, "DNS records updated");
            }
            for rejected in updated.rejected {
                tracing::warn!("DNS record not served: {rejected}");
            }
        }
        Ok(())
    }

    /// Reads the device; if it is gone (wireguard-go killed), opens a new one.
    async fn read_device(&mut self) -> anyhow::Result<DeviceState> {
        match self.device.get().await {
            Ok(state) => Ok(state),
            Err(err) => {
                tracing::warn!("reading the WireGuard device failed ({err:#}); opening it again");
                self.device =
                    Device::open(self.config.wireguard, &self.config.interface, &self.config.userspace).await?;
                self.firewall = None;
                self.echo = None;
                self.device.get().await
            }
        }
    }

    /// The source NAT of forwarded traffic, with the underlay interface (the one that has the
    /// node's underlay address) left out; none, with a warning, where there is no such interface.
    async fn masquerade(&self, node_ip: Ipv4Addr) -> anyhow::Result<Option<firewall::Masquerade>> {
        let underlay_ip = match self.config.advertise_address {
            Some(ip) => Some(ip),
            None => self.links.underlay_ipv4(&self.config.interface).await?,
        };
        let underlay = match underlay_ip {
            Some(ip) => self.links.interface_with(ip).await?,
            None => None,
        };
        let Some(underlay) = underlay else {
            if self.firewall.is_none() {
                tracing::warn!(
                    ?underlay_ip,
                    "no interface has the node's underlay address: pods' traffic is not let into the mesh"
                );
            }
            return Ok(None);
        };
        Ok(Some(firewall::Masquerade {
            interface: self.config.interface.clone(),
            underlay,
            subnet: self.config.subnet,
            node_ip,
        }))
    }

    /// This node as the firewall sees it: what peers may reach on its mesh IP (the probe echo,
    /// DNS, and the ports the operator exposes) and which interface is the tunnel.
    fn member(&self, node_ip: Ipv4Addr) -> firewall::Member {
        let dns: BTreeSet<u16> = [self.config.dns_port].into_iter().filter(|p| *p != 0).collect();
        let mut agent_udp = dns.clone();
        agent_udp.insert(self.config.probe_port);
        firewall::Member {
            interface: self.config.interface.clone(),
            subnet: self.config.subnet,
            node_ip,
            agent_udp,
            agent_tcp: dns,
            exposed: self.config.expose_ports.clone(),
        }
    }

    /// Applies the port rules when they changed.
    async fn enforce(
        &mut self,
        hosted: &[Hosted],
        member: &firewall::Member,
        masquerade: Option<&firewall::Masquerade>,
    ) -> anyhow::Result<()> {
        let script = firewall::render(hosted, Some(member), masquerade);
        if self.firewall.as_ref() == Some(&script) {
            return Ok(());
        }
        let mut child = tokio::process::Command::new(&self.config.nft)
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("running {} (install nftables)", self.config.nft.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes()).await?;
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
        tracing::info!(services = hosted.len(), exposed = ?member.exposed, "node and service port rules applied");
        self.firewall = Some(script);
        Ok(())
    }

    fn ensure_echo(&mut self, node_ip: Ipv4Addr) {
        if self.echo.as_ref().is_some_and(|(ip, task)| *ip == node_ip && !task.is_finished()) {
            return;
        }
        if let Some((_, task)) = self.echo.take() {
            task.abort();
        }
        let addr = SocketAddr::from((node_ip, self.config.probe_port));
        let task = tokio::spawn(async move {
            if let Err(err) = probe::serve(addr).await {
                tracing::warn!("probe echo stopped: {err:#}");
            }
        });
        self.echo = Some((node_ip, task));
    }

    /// Records a probe round, updates the per-peer metrics, and publishes `Connected` when the
    /// summary changed.
    async fn report_health(&mut self, results: Vec<(String, Option<Duration>)>) -> anyhow::Result<()> {
        let state = self.device.get().await?;
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
            if let Some(me) = self.directory.node(&self.config.node) {
                let current = me.status.clone().unwrap_or_default();
                let listen_port = current.listen_port.and_then(|p| u16::try_from(p).ok()).unwrap_or(DEFAULT_PORT);
                if status::publish(&self.client, &me, &self.published(current.endpoint.clone(), listen_port)).await? {
                    self.metrics.api_writes.inc();
                }
            }
        }
        Ok(())
    }
}
