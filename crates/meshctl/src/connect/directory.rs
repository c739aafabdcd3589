//! What an ephemeral member knows of the mesh: MeshNodes and MeshServices watched into stores,
//! and from one snapshot of them the member's [`mesh_plan::NodePlan`] (the same plan the agents
//! run), turned into the userspace stack's peers and addresses ([`Desired`]), plus the zone
//! that names resolve in (`*.mesh.local`, without any resolver on the machine).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

use futures::StreamExt;
use ipnet::Ipv4Net;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use mesh_api::{AppliedPeers, MeshNode, MeshService};
use mesh_dataplane::dns::{ShortNames, Zone};
use mesh_plan::{NodeInput, NodePlan, NodeSettings};
use mesh_wireguard::PrivateKey;
use tokio::sync::Notify;

/// The MTU of the inner packets, as the agents' default.
const MTU: u32 = 1420;

/// The watched MeshNodes and MeshServices.
#[derive(Clone)]
pub struct Watched {
    nodes: Store<MeshNode>,
    services: Store<MeshService>,
    /// Notified on every watch event.
    pub changed: Arc<Notify>,
}

impl Watched {
    /// Starts both watches; they run until the process ends and retry with backoff.
    pub fn start(client: &Client) -> Self {
        let changed = Arc::new(Notify::new());
        let (nodes, node_writer) = reflector::store();
        let (services, service_writer) = reflector::store();
        let notify = changed.clone();
        tokio::spawn(
            watcher(Api::<MeshNode>::all(client.clone()), watcher::Config::default())
                .default_backoff()
                .reflect(node_writer)
                .for_each(move |event| {
                    if let Err(err) = event {
                        eprintln!("warning: watching MeshNodes: {err}");
                    }
                    notify.notify_one();
                    futures::future::ready(())
                }),
        );
        let notify = changed.clone();
        tokio::spawn(
            watcher(Api::<MeshService>::all(client.clone()), watcher::Config::default())
                .default_backoff()
                .reflect(service_writer)
                .for_each(move |event| {
                    if let Err(err) = event {
                        eprintln!("warning: watching MeshServices: {err}");
                    }
                    notify.notify_one();
                    futures::future::ready(())
                }),
        );
        Self { nodes, services, changed }
    }

    /// Waits until both watches have listed once.
    pub async fn ready(&self) -> anyhow::Result<()> {
        self.nodes.wait_until_ready().await?;
        self.services.wait_until_ready().await?;
        Ok(())
    }

    /// One snapshot of the directory.
    pub fn snapshot(&self, subnet: Ipv4Net) -> mesh_plan::Directory {
        let (nodes, services) = (self.nodes.state(), self.services.state());
        mesh_plan::Directory::build(
            nodes.iter().map(AsRef::as_ref),
            services.iter().map(AsRef::as_ref),
            Some(subnet),
            &ShortNames::default(),
            mesh_plan::convert::literal_endpoint,
        )
    }
}

/// A peer of the userspace stack, as [`mesh_netstack::Peer`] wants it.
pub type StackPeer = mesh_netstack::Peer;

/// What the member's stack should be, from one snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    /// Every other node, with the member's own keepalive.
    pub peers: Vec<StackPeer>,
    /// The member's mesh IP and the mesh IPs of the services it hosts.
    pub addresses: Vec<Ipv4Addr>,
    /// The services it hosts: mesh IP, ports, `namespace/name`.
    pub hosted: Vec<(Ipv4Addr, BTreeSet<u16>, String)>,
    /// The applied peer set to report in the Lease.
    pub applied: Option<AppliedPeers>,
    /// Peer node names by public key (base64), for the status line.
    pub names: Vec<(String, String)>,
    /// Why there is no hosting yet, if so.
    pub waiting: Option<String>,
}

/// The plan settings of a member with no interface, firewall or DNS server of its own.
pub fn settings(subnet: Ipv4Net) -> NodeSettings {
    NodeSettings {
        interface: "meshctl".to_owned(),
        subnet,
        pod_cidrs: Vec::new(),
        mtu: MTU,
        probe_port: 0,
        dns_port: 0,
        dns_on_underlay: false,
        expose_ports: BTreeSet::new(),
    }
}

/// The member's plan from `directory`.
pub fn plan(
    directory: &mesh_plan::Directory,
    name: &str,
    key: &PrivateKey,
    settings: &NodeSettings,
) -> Result<NodePlan, mesh_plan::PlanError> {
    directory.plan(&NodeInput {
        name,
        key,
        settings,
        fallback: false,
        underlay: None,
        masquerade_underlay: None,
        without_direct: &std::collections::BTreeSet::new(),
        containers: &std::collections::BTreeMap::new(),
    })
}

/// The stack's configuration from the plan: every peer with `keepalive` (the member is the side
/// behind NAT, so it keeps the mappings open), its addresses and hosted services.
pub fn desired(plan: &NodePlan, keepalive: u16) -> Desired {
    let keepalive = (keepalive != 0).then_some(keepalive);
    let peers = plan
        .device
        .peers
        .iter()
        .map(|(key, peer)| StackPeer {
            public_key: *key.as_bytes(),
            endpoint: peer.endpoint,
            allowed_ips: peer
                .allowed_ips
                .iter()
                .filter_map(|net| match net {
                    ipnet::IpNet::V4(v4) => Some(*v4),
                    ipnet::IpNet::V6(_) => None,
                })
                .collect(),
            persistent_keepalive: keepalive.or(peer.persistent_keepalive),
        })
        .collect();
    let names = plan.names.iter().map(|(key, name)| (key.to_base64(), name.clone())).collect();
    let (addresses, hosted, waiting) = match &plan.local {
        Ok(local) => {
            let hosted: Vec<_> = local.hosted.iter().map(|h| (h.ip, h.ports.clone(), h.service.clone())).collect();
            let mut addresses = vec![local.node_ip];
            addresses.extend(hosted.iter().map(|(ip, _, _)| *ip));
            (addresses, hosted, None)
        }
        Err(why) => (Vec::new(), Vec::new(), Some(why.clone())),
    };
    Desired { peers, addresses, hosted, applied: plan.applied.clone(), names, waiting }
}

/// The address `name` (`*.mesh.local`, any case, a trailing dot allowed) resolves to in `zone`.
pub fn resolve(zone: &Zone, name: &str) -> Option<Ipv4Addr> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    zone.records.get(&name).and_then(|ips| ips.first().copied())
}
