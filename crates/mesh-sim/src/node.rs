//! One simulated node: the steps of `mesh-agent`'s sync (`Agent::sync`) in the same order and
//! with the same code — status published with the agent's `status::publish`, peers from the
//! directory through `mesh_dataplane::desired::peers`, the device diffed with
//! `mesh_wireguard::plan`, the applied-peers digest published, hosted services and their
//! nftables ruleset, the DNS zone — with the device, the links, `nft` and the DNS server
//! replaced by records. Not simulated: the liveness Lease, health probes and the `Connected`
//! condition (there is no tunnel to probe).
//!
//! What is the same for every node reading the same directory — every node's peer entry, every
//! service's placement, the DNS zone — is derived once per directory change into a
//! [`Snapshot`] that the nodes sharing that directory read; each node still runs its own peers,
//! plan, digest, hosted services, ruleset and status writes.

use std::net::Ipv4Addr;
use tokio::time::Instant;

use anyhow::Context;
use ipnet::{IpNet, Ipv4Net};
use kube::Client;
use mesh_agent::directory::Directory;
use mesh_agent::status::{self, Published};
use mesh_api::{AppliedPeers, Backend};
use mesh_dataplane::desired::{self, Hosted, PeerEntry, Placement};
use mesh_dataplane::{dns, firewall};
use mesh_wireguard::{DeviceConfig, DeviceState, PrivateKey};

use crate::recording::RecordingDevice;

/// The WireGuard port when the MeshNode does not name one (as the agent).
const DEFAULT_PORT: u16 = 51820;

/// A service whose arrival the bench times: its DNS name and the node that hosts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Distinguishes successive targets.
    pub id: u64,
    /// `<name>.<namespace>.mesh.local`.
    pub fqdn: String,
    /// The MeshNode it is placed on.
    pub host: String,
}

/// What every node derives alike from one state of the directory (the agent computes these in
/// its sync from the same directory calls).
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Every node's peer entry (`Directory::peer_entries`).
    pub entries: Vec<PeerEntry>,
    /// Where every service is (`Directory::placements`).
    pub placements: Vec<Placement>,
    /// The DNS zone (`mesh_dataplane::dns::zone` of `Directory::dns_inputs`).
    pub zone: dns::Zone,
}

impl Snapshot {
    /// Derives everything from the directory as it is now.
    pub async fn of(directory: &Directory) -> Self {
        let entries = directory.peer_entries();
        let placements = directory.placements();
        let (nodes, services) = directory.dns_inputs();
        Self { entries, placements, zone: dns::zone(&nodes, &services) }
    }
}

/// What one sync did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Synced {
    /// Status writes made (0, 1 or 2).
    pub writes: u32,
    /// When the device came to route the target's address to its host (another node), right
    /// after the plan was recorded — before the status write and the DNS update that follow it
    /// in the agent's sync.
    pub target_routed: Option<Instant>,
    /// Whether the target is applied: named in the zone, and routed to its host (another
    /// node) or hosted (its host).
    pub target_applied: bool,
}

/// One simulated node's agent.
pub struct SimNode {
    /// Its MeshNode name.
    pub name: String,
    key: PrivateKey,
    /// The underlay address it advertises (loopback: nothing is ever sent to it).
    address: Ipv4Addr,
    client: Client,
    /// The recorded device.
    pub device: RecordingDevice,
    applied: Option<AppliedPeers>,
    /// The last ruleset that would have gone to `nft`.
    firewall: Option<String>,
    /// Rulesets that would have gone to `nft`.
    pub firewall_changes: u64,
    /// Services hosted on it, as of the last sync.
    pub hosted: usize,
    /// Records in its DNS zone, as of the last sync.
    pub zone_records: usize,
}

impl SimNode {
    /// A node named `name` with a fresh key, advertising `address`.
    pub fn new(name: String, address: Ipv4Addr, client: Client) -> anyhow::Result<Self> {
        let key = PrivateKey::generate().context("generating a WireGuard key")?;
        Ok(Self {
            name,
            key,
            address,
            client,
            device: RecordingDevice::default(),
            applied: None,
            firewall: None,
            firewall_changes: 0,
            hosted: 0,
            zone_records: 0,
        })
    }

    fn published(&self, endpoint: String, listen_port: u16) -> Published {
        Published {
            public_key: Some(self.key.public_key().to_base64()),
            endpoint: Some(endpoint),
            listen_port,
            // What a node with wireguard-go reports; the controller treats every backend but
            // `none` alike.
            backend: Backend::Userspace,
            connected: None,
            applied_peers: self.applied.clone(),
        }
    }

    /// One pass, as the agent's: status, device, hosted services and their rules, DNS.
    pub async fn sync(
        &mut self,
        directory: &Directory,
        snapshot: &Snapshot,
        target: Option<&Target>,
    ) -> anyhow::Result<Synced> {
        let mut synced = Synced::default();
        let name = self.name.clone();
        let Some(me) = directory.node(&name) else {
            anyhow::bail!("MeshNode {name} does not exist");
        };
        let listen_port = u16::try_from(me.spec.listen_port).unwrap_or(DEFAULT_PORT);
        let endpoint = me.spec.endpoint.clone().unwrap_or_else(|| format!("{}:{listen_port}", self.address));
        if status::publish(&self.client, &me, &self.published(endpoint.clone(), listen_port))
            .await
            .with_context(|| format!("publishing the status of {name}"))?
        {
            synced.writes += 1;
        }

        let peers = desired::peers(&name, &self.key.public_key(), &snapshot.entries);
        let wanted = DeviceConfig { private_key: self.key.clone(), listen_port, peers: peers.peers };
        let plan = mesh_wireguard::plan(self.device.get(), &wanted);
        self.device.apply(&plan);
        if let Some(target) = target
            && target.host != name
            && routes(&target.fqdn, &snapshot.zone, self.device.get())
        {
            synced.target_routed = Some(Instant::now());
        }
        let applied = AppliedPeers {
            count: i32::try_from(peers.applied.len()).unwrap_or(i32::MAX),
            digest: desired::digest(&peers.applied),
        };
        if self.applied.as_ref() != Some(&applied) {
            self.applied = Some(applied);
            if status::publish(&self.client, &me, &self.published(endpoint, listen_port))
                .await
                .with_context(|| format!("publishing the applied peers of {name}"))?
            {
                synced.writes += 1;
            }
        }

        let Some(node_ip) = me.status.as_ref().and_then(|s| s.mesh_ip.as_deref()).and_then(|ip| ip.parse().ok()) else {
            anyhow::bail!("MeshNode {name} has no mesh IP yet");
        };
        let hosted = desired::hosted(&name, Some(node_ip), &snapshot.placements);
        let rules = firewall::render(&hosted, None, None);
        if self.firewall.as_ref() != Some(&rules) {
            self.firewall = Some(rules);
            self.firewall_changes += 1;
        }
        self.hosted = hosted.len();

        self.zone_records = snapshot.zone.records.len();
        synced.target_applied = target.is_some_and(|t| applies(t, &name, &snapshot.zone, &hosted, self.device.get()));
        Ok(synced)
    }
}

/// Whether `node` has applied `target`: its zone answers the name, and the address is hosted
/// here (on the target's host) or routed to a peer (anywhere else).
fn applies(target: &Target, node: &str, zone: &dns::Zone, hosted: &[Hosted], device: &DeviceState) -> bool {
    let Some(&ip) = zone.records.get(&target.fqdn).and_then(|ips| ips.first()) else { return false };
    if node == target.host {
        return hosted.iter().any(|h| h.ip == ip);
    }
    routes(&target.fqdn, zone, device)
}

/// Whether the device routes the address the zone gives `fqdn` to a peer.
fn routes(fqdn: &str, zone: &dns::Zone, device: &DeviceState) -> bool {
    let Some(&ip) = zone.records.get(fqdn).and_then(|ips| ips.first()) else { return false };
    let Ok(net) = Ipv4Net::new(ip, 32) else { return false };
    let net = IpNet::V4(net);
    device.peers.values().any(|p| p.config.allowed_ips.contains(&net))
}
