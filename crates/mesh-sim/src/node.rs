//! One simulated node: the agent's own sync — the pure plan of the node (`mesh_plan`) from a
//! shared snapshot of the directory, then the agent's executor (`mesh_agent::executor`), which
//! programs a [`RecordingDataPlane`] and then writes the status through the agent's
//! `status::Writer` (server-side apply, never twice the same) — and the Lease renewal carrying
//! the applied peer set. Not simulated: health probes and the `Connected` condition (there is
//! no tunnel to probe).
//!
//! What is the same for every node reading the same directory state — peer entries,
//! placements, the DNS zone — is one `mesh_plan::Directory`, which the nodes of a group share
//! and which is kept across changes as the agent keeps its own; each node still computes its own
//! plan (peers, digest, hosting, ruleset).

use std::net::Ipv4Addr;

use anyhow::Context;
use ipnet::{IpNet, Ipv4Net};
use kube::Client;
use mesh_agent::directory::Directory;
use mesh_agent::executor;
use mesh_agent::status::{self, NodeStatus, Published, Writer};
use mesh_api::{AppliedPeers, Backend};
use mesh_dataplane::desired::Hosted;
use mesh_dataplane::dns;
use mesh_plan::{NodeInput, NodeSettings};
use mesh_wireguard::{DeviceState, PrivateKey};
use tokio::time::Instant;

use crate::recording::RecordingDataPlane;

/// The mesh subnet of the simulated nodes: the controller's and the agent's default.
pub const SUBNET: &str = "10.42.0.0/16";

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

/// A new directory as the simulated nodes keep it (the shared part of every node's plan): every
/// short name published (as the controller's default), peer entries confined to [`SUBNET`],
/// endpoints only literal. Its first update reads every object.
pub fn directory() -> mesh_plan::Directory {
    mesh_plan::Directory::new(SUBNET.parse().ok(), &dns::ShortNames::Every)
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct Synced {
    /// Status writes made (0 or 1).
    pub writes: u32,
    /// The status write failed (the data plane was programmed all the same).
    pub status_failed: bool,
    /// When the device came to route the target's address to its host (another node): when
    /// the recorded device was changed, before the status write that follows.
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
    settings: NodeSettings,
    client: Client,
    /// The recorded data plane.
    pub dataplane: RecordingDataPlane,
    status: NodeStatus,
    /// The peer set last applied, reported on the Lease.
    pub applied: Option<AppliedPeers>,
    /// Services hosted on it, as of the last sync.
    pub hosted: usize,
}

impl SimNode {
    /// A node named `name` with a fresh key, advertising `address`, whose status writes compare
    /// with `directory`'s copy.
    pub fn new(name: String, address: Ipv4Addr, client: Client, directory: Directory) -> anyhow::Result<Self> {
        let key = PrivateKey::generate().context("generating a WireGuard key")?;
        let settings = NodeSettings::defaults(SUBNET.parse().context("the simulated subnet")?);
        let status = NodeStatus { node: name.clone(), writer: Writer::new(client.clone()), directory };
        Ok(Self {
            name,
            key,
            address,
            settings,
            client,
            dataplane: RecordingDataPlane::default(),
            status,
            applied: None,
            hosted: 0,
        })
    }

    /// One pass, the agent's: plan, then the executor (data plane, then status). `resync`: the
    /// periodic one, which also compares the status with the API's copy.
    pub async fn sync(
        &mut self,
        snapshot: &mesh_plan::Directory,
        target: Option<&Target>,
        resync: bool,
    ) -> anyhow::Result<Synced> {
        let input = NodeInput {
            name: &self.name,
            key: &self.key,
            settings: &self.settings,
            fallback: false,
            underlay: Some(self.address),
            masquerade_underlay: None,
            without_direct: &std::collections::BTreeSet::new(),
            containers: &std::collections::BTreeMap::new(),
        };
        let plan = snapshot.plan(&input)?;
        let published = Published {
            public_key: Some(self.key.public_key().to_base64()),
            endpoint: plan.endpoint.clone(),
            listen_port: plan.listen_port,
            // What a node with wireguard-go reports; the controller treats every backend but
            // `none` alike.
            backend: Backend::Userspace,
            connected: None,
            paths: None,
            containers: Vec::new(),
            engine: None,
        };
        let executed =
            executor::execute(&plan, snapshot.zone(), &mut self.dataplane, &mut self.status, &published, resync).await;
        let mut synced = Synced {
            writes: u32::from(matches!(executed.status, Ok(true))),
            status_failed: executed.status.is_err(),
            ..Synced::default()
        };
        if let Err(err) = &executed.status {
            tracing::debug!(node = %self.name, "simulated status write failed: {err:#}");
        }
        if executed.device_applied {
            self.applied = plan.applied.clone();
        }
        let hosted = plan.local.as_ref().map(|l| l.hosted.as_slice()).unwrap_or_default();
        self.hosted = hosted.len();
        let device = self.dataplane.device.get();
        if let Some(target) = target
            && target.host != self.name
            && routes(&target.fqdn, snapshot.zone(), device)
        {
            let changed = executed.device.is_some().then_some(self.dataplane.device_changed).flatten();
            synced.target_routed = Some(changed.map_or_else(Instant::now, Instant::from_std));
        }
        synced.target_applied =
            target.is_some_and(|t| applies(t, &self.name, snapshot.zone(), hosted, self.dataplane.device.get()));
        executed.dataplane.with_context(|| format!("simulated node {}", self.name))?;
        Ok(synced)
    }

    /// Renews the node's Lease in `namespace` with its applied peer set, as the agent does.
    pub async fn renew_lease(&self, namespace: &str) -> anyhow::Result<()> {
        status::renew_lease(&self.client, namespace, &self.name, 40, self.applied.as_ref()).await
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
