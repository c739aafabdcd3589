//! The mesh directory as this agent sees it: watches of every MeshNode and every MeshService,
//! kept in reflector stores, with a notification on each change. Also the conversion from API
//! objects to the plain inputs of `mesh-dataplane`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use mesh_api::{Backend, MeshNode, MeshService, NetworkType};
use mesh_dataplane::desired::{Exposure, PeerEntry, Placement};
use mesh_dataplane::dns;
use tokio::sync::Notify;

/// The watched MeshNodes and MeshServices.
#[derive(Clone)]
pub struct Directory {
    nodes: Store<MeshNode>,
    services: Store<MeshService>,
    /// Notified on every watch event.
    pub changed: Arc<Notify>,
}

impl Directory {
    /// Starts watching; the watches run until the process ends and retry with backoff.
    pub fn watch(client: Client) -> Self {
        let changed = Arc::new(Notify::new());
        let (nodes, node_writer) = reflector::store();
        let (services, service_writer) = reflector::store();
        let notify = changed.clone();
        let node_events = watcher(Api::<MeshNode>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .reflect(node_writer)
            .for_each(move |event| {
                if let Err(err) = event {
                    tracing::warn!("watching MeshNodes: {err}");
                }
                notify.notify_one();
                futures::future::ready(())
            });
        let notify = changed.clone();
        let service_events = watcher(Api::<MeshService>::all(client), watcher::Config::default())
            .default_backoff()
            .reflect(service_writer)
            .for_each(move |event| {
                if let Err(err) = event {
                    tracing::warn!("watching MeshServices: {err}");
                }
                notify.notify_one();
                futures::future::ready(())
            });
        tokio::spawn(node_events);
        tokio::spawn(service_events);
        Self { nodes, services, changed }
    }

    /// Waits until both watches have listed everything once.
    pub async fn ready(&self) -> anyhow::Result<()> {
        self.nodes.wait_until_ready().await?;
        self.services.wait_until_ready().await?;
        Ok(())
    }

    /// The MeshNode `name`.
    pub fn node(&self, name: &str) -> Option<Arc<MeshNode>> {
        self.nodes.get(&ObjectRef::new(name))
    }

    /// Every node's published peer entry, endpoints resolved (DNS names through the system
    /// resolver; one that does not resolve is left out and logged).
    pub async fn peer_entries(&self) -> Vec<PeerEntry> {
        let mut entries = Vec::new();
        for node in self.nodes.state() {
            let Some(peer) = node.status.as_ref().and_then(|s| s.peer.clone()) else { continue };
            let name = node.metadata.name.clone().unwrap_or_default();
            let endpoint = match &peer.endpoint {
                None => None,
                Some(text) => resolve(&name, text).await,
            };
            entries.push(PeerEntry {
                node: name,
                public_key: peer.public_key,
                endpoint,
                allowed_ips: peer.allowed_ips,
                persistent_keepalive: peer.persistent_keepalive,
            });
        }
        entries
    }

    /// Every node's mesh IP, by name.
    pub fn node_ips(&self) -> BTreeMap<String, Ipv4Addr> {
        self.nodes
            .state()
            .iter()
            .filter_map(|n| {
                let ip = n.status.as_ref()?.mesh_ip.as_deref()?.parse().ok()?;
                Some((n.metadata.name.clone()?, ip))
            })
            .collect()
    }

    /// The directory as the DNS zone needs it: every node (mesh IP, underlay address, whether it
    /// is in the tunnel) and every service.
    pub fn dns_inputs(&self) -> (Vec<dns::Node>, Vec<dns::Service>) {
        let nodes = self
            .nodes
            .state()
            .iter()
            .map(|n| {
                let status = n.status.clone().unwrap_or_default();
                dns::Node {
                    name: n.metadata.name.clone().unwrap_or_default(),
                    mesh_ip: status.mesh_ip.as_deref().and_then(|ip| ip.parse().ok()),
                    underlay: status.endpoint.as_deref().and_then(underlay_ipv4),
                    in_tunnel: status.backend != Some(Backend::None),
                }
            })
            .collect();
        let services = self
            .services
            .state()
            .iter()
            .map(|s| {
                let status = s.status.clone().unwrap_or_default();
                dns::Service {
                    namespace: s.metadata.namespace.clone().unwrap_or_default(),
                    name: s.metadata.name.clone().unwrap_or_default(),
                    exposure: exposure(s.spec.network.type_),
                    mesh_ip: status.mesh_ip.as_deref().and_then(|ip| ip.parse().ok()),
                    node: status.node,
                }
            })
            .collect();
        (nodes, services)
    }

    /// Where every service is hosted now.
    pub fn placements(&self) -> Vec<Placement> {
        self.services
            .state()
            .iter()
            .map(|s| {
                let status = s.status.clone().unwrap_or_default();
                Placement {
                    service: format!(
                        "{}/{}",
                        s.metadata.namespace.as_deref().unwrap_or_default(),
                        s.metadata.name.as_deref().unwrap_or_default()
                    ),
                    mesh_ip: status.mesh_ip.as_deref().and_then(|ip| ip.parse().ok()),
                    node: status.node,
                    exposure: exposure(s.spec.network.type_),
                    ports: s.spec.network.ports.iter().filter_map(|p| u16::try_from(*p).ok()).collect(),
                    pod_ip: status.pod_ip.as_deref().and_then(|ip| ip.parse().ok()),
                }
            })
            .collect()
    }
}

fn exposure(type_: NetworkType) -> Exposure {
    match type_ {
        NetworkType::Mesh => Exposure::Mesh,
        NetworkType::Host => Exposure::Host,
        NetworkType::Dual => Exposure::Dual,
    }
}

/// The IPv4 address of an endpoint `host:port`, if the host is one.
pub fn underlay_ipv4(endpoint: &str) -> Option<Ipv4Addr> {
    endpoint.parse::<SocketAddr>().ok().and_then(|a| match a.ip() {
        std::net::IpAddr::V4(ip) => Some(ip),
        std::net::IpAddr::V6(_) => None,
    })
}

async fn resolve(node: &str, endpoint: &str) -> Option<SocketAddr> {
    if let Ok(addr) = endpoint.parse() {
        return Some(addr);
    }
    match tokio::net::lookup_host(endpoint).await {
        Ok(mut addrs) => addrs.next(),
        Err(err) => {
            tracing::warn!(node, endpoint, "cannot resolve the peer endpoint: {err}");
            None
        }
    }
}
