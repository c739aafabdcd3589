//! From MeshNode and MeshService objects to the plain inputs of `mesh-dataplane`: one
//! conversion, used by the agent, the simulator and `meshctl`.
//!
//! Every function reads the objects by reference and copies only what it returns. Endpoint
//! names (`wg.example.com:51820`) need DNS, which is impure: [`peer_entries`] takes a `resolve`
//! callback; [`literal_endpoint`] is the one that resolves only IP literals (meshctl, the
//! simulator, tests).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};

use mesh_api::{Backend, MeshNode, MeshService, NetworkType};
use mesh_dataplane::desired::{Exposure, PeerEntry, Placement};
use mesh_dataplane::dns;

/// The MeshNode's name (empty if it has none, which the API never serves).
pub fn name(node: &MeshNode) -> &str {
    node.metadata.name.as_deref().unwrap_or_default()
}

/// The node's allocated mesh IP, if any and well formed.
pub fn mesh_ip(node: &MeshNode) -> Option<Ipv4Addr> {
    node.status.as_ref()?.mesh_ip.as_deref()?.parse().ok()
}

/// The IPv4 address of an endpoint `host:port`, if the host is one.
pub fn underlay_ipv4(endpoint: &str) -> Option<Ipv4Addr> {
    match endpoint.parse::<SocketAddr>().ok()? {
        SocketAddr::V4(a) => Some(*a.ip()),
        SocketAddr::V6(_) => None,
    }
}

/// Resolves only literal `ip:port` endpoints; a DNS name gives `None` (the entry is then applied
/// without an endpoint). For callers that must not do I/O.
pub fn literal_endpoint(_node: &str, endpoint: &str) -> Option<SocketAddr> {
    endpoint.parse().ok()
}

/// How a service is exposed, from its network type.
pub fn exposure(type_: NetworkType) -> Exposure {
    match type_ {
        NetworkType::Mesh => Exposure::Mesh,
        NetworkType::Host => Exposure::Host,
        NetworkType::Dual => Exposure::Dual,
    }
}

/// The endpoint text of the peer entry the controller published for `node` (`ip:port` or a
/// name with a port), if any.
pub fn endpoint_text(node: &MeshNode) -> Option<&str> {
    node.status.as_ref()?.peer.as_ref()?.endpoint.as_deref()
}

/// The peer entry the controller published for `node`, its endpoint resolved with
/// `resolve(node name, endpoint text)`; `None` while it has none.
pub fn peer_entry(node: &MeshNode, resolve: &mut impl FnMut(&str, &str) -> Option<SocketAddr>) -> Option<PeerEntry> {
    let peer = node.status.as_ref()?.peer.as_ref()?;
    let name = name(node);
    Some(PeerEntry {
        node: name.to_owned(),
        public_key: peer.public_key.clone(),
        endpoint: peer.endpoint.as_deref().and_then(|text| resolve(name, text)),
        allowed_ips: peer.allowed_ips.clone(),
        persistent_keepalive: peer.persistent_keepalive,
    })
}

/// Every node's published peer entry (nodes without one are left out).
pub fn peer_entries<'a>(
    nodes: impl IntoIterator<Item = &'a MeshNode>,
    mut resolve: impl FnMut(&str, &str) -> Option<SocketAddr>,
) -> Vec<PeerEntry> {
    nodes.into_iter().filter_map(|n| peer_entry(n, &mut resolve)).collect()
}

/// A node's addresses: its mesh IP and its underlay address (no service may take one, and no
/// forward may go to one).
pub fn node_addresses_of(node: &MeshNode) -> [Option<Ipv4Addr>; 2] {
    let status = node.status.as_ref();
    [mesh_ip(node), status.and_then(|s| s.endpoint.as_deref()).and_then(underlay_ipv4)]
}

/// Every address of every node (see [`node_addresses_of`]).
pub fn node_addresses<'a>(nodes: impl IntoIterator<Item = &'a MeshNode>) -> BTreeSet<Ipv4Addr> {
    nodes.into_iter().flat_map(node_addresses_of).flatten().collect()
}

/// Every node's mesh IP, by name.
pub fn node_ips<'a>(nodes: impl IntoIterator<Item = &'a MeshNode>) -> BTreeMap<String, Ipv4Addr> {
    nodes.into_iter().filter_map(|n| Some((name(n).to_owned(), mesh_ip(n)?))).collect()
}

/// A node as the DNS zone needs it.
pub fn dns_node(node: &MeshNode) -> dns::Node {
    let status = node.status.as_ref();
    dns::Node {
        name: name(node).to_owned(),
        mesh_ip: mesh_ip(node),
        underlay: status.and_then(|s| s.endpoint.as_deref()).and_then(underlay_ipv4),
        in_tunnel: status.and_then(|s| s.backend) != Some(Backend::None),
    }
}

/// A service's name (empty if it has none, which the API never serves).
pub fn service_name(service: &MeshService) -> &str {
    service.metadata.name.as_deref().unwrap_or_default()
}

/// `namespace/name` of a service.
pub fn service_key(service: &MeshService) -> String {
    format!(
        "{}/{}",
        service.metadata.namespace.as_deref().unwrap_or_default(),
        service.metadata.name.as_deref().unwrap_or_default()
    )
}

/// A service as the DNS zone needs it.
pub fn dns_service(service: &MeshService) -> dns::Service {
    let status = service.status.as_ref();
    dns::Service {
        namespace: service.metadata.namespace.clone().unwrap_or_default(),
        name: service.metadata.name.clone().unwrap_or_default(),
        exposure: exposure(service.spec.network.type_),
        mesh_ip: status.and_then(|s| s.mesh_ip.as_deref()).and_then(|ip| ip.parse().ok()),
        node: status.and_then(|s| s.node.clone()),
    }
}

/// Where a service is hosted now and how it is exposed.
pub fn placement(service: &MeshService) -> Placement {
    let status = service.status.as_ref();
    Placement {
        service: service_key(service),
        mesh_ip: status.and_then(|s| s.mesh_ip.as_deref()).and_then(|ip| ip.parse().ok()),
        node: status.and_then(|s| s.node.clone()),
        exposure: exposure(service.spec.network.type_),
        ports: service.spec.network.ports.iter().filter_map(|p| u16::try_from(*p).ok()).collect(),
        target_ports: service
            .spec
            .network
            .target_ports
            .iter()
            .filter_map(|m| Some((u16::try_from(m.port).ok()?, u16::try_from(m.target_port).ok()?)))
            .collect(),
        pod_ip: status.and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse().ok()),
        container: service.spec.container.as_ref().map(|c| c.name.clone()),
        container_ip: None,
    }
}

/// The directory as the DNS zone needs it: every node and every service.
pub fn dns_inputs<'a>(
    nodes: impl IntoIterator<Item = &'a MeshNode>,
    services: impl IntoIterator<Item = &'a MeshService>,
) -> (Vec<dns::Node>, Vec<dns::Service>) {
    (nodes.into_iter().map(dns_node).collect(), services.into_iter().map(dns_service).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::{node, service};

    #[test]
    fn objects_become_the_data_planes_inputs() {
        let mut a = node("a", 1);
        a.status.as_mut().unwrap().peer.as_mut().unwrap().endpoint = Some("wg.example.com:51820".into());
        let b = node("b", 2);
        let mut bare = node("c", 3);
        bare.status = None;
        let nodes = [a, b, bare];
        let mut asked = Vec::new();
        let entries = peer_entries(&nodes, |n, e| {
            asked.push((n.to_owned(), e.to_owned()));
            literal_endpoint(n, e)
        });
        assert_eq!(entries.len(), 2, "a node without a peer entry is left out");
        assert_eq!(entries[0].endpoint, None, "a name is resolved by the callback only");
        assert_eq!(entries[1].endpoint, Some("192.168.77.2:51820".parse().unwrap()));
        assert_eq!(asked[0], ("a".to_owned(), "wg.example.com:51820".to_owned()));
        assert_eq!(
            node_addresses(&nodes).into_iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
            ["10.42.0.1", "10.42.0.2", "192.168.77.1", "192.168.77.2"]
        );
        assert_eq!(node_ips(&nodes).len(), 2);
        let s = service("web", "api", "b", "10.42.1.6");
        let p = placement(&s);
        assert_eq!((p.service.as_str(), p.node.as_deref(), p.ports.as_slice()), ("web/api", Some("b"), &[8000u16][..]));
        let (dn, ds) = dns_inputs(&nodes, [&s]);
        assert_eq!((dn.len(), ds.len()), (3, 1));
        assert!(dn[0].in_tunnel);
        assert_eq!(underlay_ipv4("[::1]:51820"), None);
    }
}
