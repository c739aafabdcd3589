//! From the directory (every MeshNode's peer entry, every MeshService's placement) to what one
//! node should configure.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};

use ipnet::IpNet;
use mesh_wireguard::{Key, PeerConfig};

/// One node's peer entry as the controller published it, with the endpoint resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerEntry {
    /// The MeshNode name.
    pub node: String,
    /// Its public key, base64.
    pub public_key: String,
    /// Where to reach it; `None` if unknown (it must then reach us first).
    pub endpoint: Option<SocketAddr>,
    /// CIDRs it may use: its mesh IP and those of its services.
    pub allowed_ips: Vec<String>,
    /// Keepalive towards it, seconds.
    pub persistent_keepalive: Option<i32>,
}

/// An entry that cannot be applied, and why. The entry is skipped; the others are applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The MeshNode name.
    pub node: String,
    /// What is wrong.
    pub why: String,
}

/// The peers of this node: every entry but its own, keyed by public key, plus the names of
/// the nodes behind the keys (for health reports) and the entries that had to be skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peers {
    /// The WireGuard peers to apply.
    pub peers: BTreeMap<Key, PeerConfig>,
    /// Node name by key.
    pub names: BTreeMap<Key, String>,
    /// Entries not applied.
    pub skipped: Vec<Skipped>,
    /// The entries applied, for [`digest`].
    pub applied: Vec<PeerEntry>,
}

/// A digest of a peer set: FNV-1a 64 over one canonical line per entry (sorted by public key:
/// key, endpoint or `-`, sorted allowed IPs joined by `,`, keepalive or 0), as 16 hex digits.
/// The agent publishes the digest of what it applied; anyone can compute the digest of what the
/// directory asks of a node and compare.
pub fn digest(entries: &[PeerEntry]) -> String {
    let mut lines: Vec<String> = entries
        .iter()
        .map(|e| {
            let mut ips: Vec<&str> = e.allowed_ips.iter().map(String::as_str).collect();
            ips.sort_unstable();
            ips.dedup();
            let endpoint = e.endpoint.map_or_else(|| "-".to_owned(), |a| a.to_string());
            format!("{} {endpoint} {} {}\n", e.public_key, ips.join(","), e.persistent_keepalive.unwrap_or(0).max(0))
        })
        .collect();
    lines.sort_unstable();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in lines.concat().bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// Computes the peers of node `me` (whose public key is `my_key`) from all entries.
///
/// An entry with a malformed key or CIDR is skipped and reported. An entry with this node's own
/// key is skipped (a copied key must not make a node its own peer). When two nodes publish the
/// same key, neither is applied: WireGuard could not tell them apart, and picking one would route
/// the other's traffic wrongly.
pub fn peers(me: &str, my_key: &Key, entries: &[PeerEntry]) -> Peers {
    let mut out = Peers::default();
    let mut by_key: BTreeMap<Key, Vec<&PeerEntry>> = BTreeMap::new();
    for entry in entries.iter().filter(|e| e.node != me) {
        match Key::from_base64(&entry.public_key) {
            Ok(key) if key == *my_key => out
                .skipped
                .push(Skipped { node: entry.node.clone(), why: format!("publishes this node's own public key {key}") }),
            Ok(key) => by_key.entry(key).or_default().push(entry),
            Err(err) => out.skipped.push(Skipped { node: entry.node.clone(), why: err.to_string() }),
        }
    }
    for (key, entries) in by_key {
        if let [entry] = entries.as_slice() {
            let ips: Result<BTreeSet<IpNet>, _> = entry.allowed_ips.iter().map(|ip| ip.parse::<IpNet>()).collect();
            match ips {
                Ok(allowed_ips) => {
                    out.peers.insert(
                        key,
                        PeerConfig {
                            endpoint: entry.endpoint,
                            allowed_ips,
                            persistent_keepalive: entry
                                .persistent_keepalive
                                .and_then(|k| u16::try_from(k).ok())
                                .filter(|k| *k > 0),
                        },
                    );
                    out.names.insert(key, entry.node.clone());
                    out.applied.push((*entry).clone());
                }
                Err(err) => out.skipped.push(Skipped {
                    node: entry.node.clone(),
                    why: format!("malformed allowed IP in {:?}: {err}", entry.allowed_ips),
                }),
            }
        } else {
            let names: Vec<&str> = entries.iter().map(|e| e.node.as_str()).collect();
            for entry in &entries {
                out.skipped.push(Skipped {
                    node: entry.node.clone(),
                    why: format!("public key {key} is published by several nodes: {}", names.join(", ")),
                });
            }
        }
    }
    out
}

/// How a service is exposed (the MeshService `spec.network.type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Exposure {
    /// On its mesh IP only, listed ports only.
    Mesh,
    /// No mesh IP; reached at the host address.
    Host,
    /// Both.
    Dual,
}

/// Where a service is hosted now (the MeshService status) and how it is exposed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// `namespace/name`.
    pub service: String,
    /// Its mesh IP, once allocated.
    pub mesh_ip: Option<Ipv4Addr>,
    /// The MeshNode it is hosted on now.
    pub node: Option<String>,
    /// Its network type.
    pub exposure: Exposure,
    /// The ports reachable on its mesh IP.
    pub ports: Vec<u16>,
    /// The pod-network IP of the backing pod, when the service's traffic has to be forwarded
    /// to a pod rather than served by a process on the node.
    pub pod_ip: Option<Ipv4Addr>,
}

/// A service IP this node hosts.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Hosted {
    /// The mesh IP.
    pub ip: Ipv4Addr,
    /// The only ports open on it.
    pub ports: BTreeSet<u16>,
    /// `namespace/name`, for the ruleset's comments.
    pub service: String,
    /// Where the open ports are forwarded to (the backing pod's IP), if not to the node itself.
    pub forward_to: Option<Ipv4Addr>,
}

/// The service IPs node `me` hosts: those placed on it with a mesh IP and a type other than
/// `host`, sorted by IP. The node's own mesh IP is never one of them.
pub fn hosted(me: &str, node_ip: Option<Ipv4Addr>, placements: &[Placement]) -> Vec<Hosted> {
    let mut hosted: Vec<Hosted> = placements
        .iter()
        .filter(|p| p.node.as_deref() == Some(me) && p.exposure != Exposure::Host)
        .filter_map(|p| {
            let ip = p.mesh_ip.filter(|ip| Some(*ip) != node_ip)?;
            Some(Hosted {
                ip,
                ports: p.ports.iter().copied().collect(),
                service: p.service.clone(),
                forward_to: p.pod_ip,
            })
        })
        .collect();
    hosted.sort();
    hosted.dedup_by_key(|h| h.ip);
    hosted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Key {
        Key::from_bytes([n; 32])
    }

    fn entry(node: &str, k: u8, ips: &[&str]) -> PeerEntry {
        PeerEntry {
            node: node.into(),
            public_key: key(k).to_base64(),
            endpoint: Some(SocketAddr::from(([192, 168, 77, k], 51820))),
            allowed_ips: ips.iter().map(|s| s.to_string()).collect(),
            persistent_keepalive: None,
        }
    }

    #[test]
    fn every_other_node_is_a_peer() {
        let entries = [entry("a", 1, &["10.42.0.1/32"]), entry("b", 2, &["10.42.0.2/32"]), entry("c", 3, &[])];
        let peers = peers("a", &key(1), &entries);
        assert_eq!(peers.peers.keys().copied().collect::<Vec<_>>(), vec![key(2), key(3)]);
        assert_eq!(peers.names[&key(2)], "b");
        assert!(peers.skipped.is_empty());
    }

    #[test]
    fn bad_entries_are_skipped_and_reported_without_hurting_others() {
        let mut bad_key = entry("b", 2, &["10.42.0.2/32"]);
        bad_key.public_key = "nope".into();
        let bad_ip = entry("c", 3, &["10.42.0.300/32"]);
        let own_key = entry("d", 1, &["10.42.0.4/32"]);
        let dup1 = entry("e", 5, &["10.42.0.5/32"]);
        let dup2 = entry("f", 5, &["10.42.0.6/32"]);
        let good = entry("g", 7, &["10.42.0.7/32"]);
        let peers = peers("a", &key(1), &[bad_key, bad_ip, own_key, dup1, dup2, good]);
        assert_eq!(peers.peers.keys().copied().collect::<Vec<_>>(), vec![key(7)]);
        let skipped: Vec<&str> = peers.skipped.iter().map(|s| s.node.as_str()).collect();
        assert_eq!(skipped.len(), 5, "{:?}", peers.skipped);
        for node in ["b", "c", "d", "e", "f"] {
            assert!(skipped.contains(&node), "{node} not reported");
        }
        assert!(peers.skipped.iter().any(|s| s.why.contains("e, f")));
    }

    #[test]
    fn the_digest_ignores_order_and_sees_every_field() {
        let a = entry("a", 1, &["10.42.0.1/32", "10.42.7.7/32"]);
        let b = entry("b", 2, &["10.42.0.2/32"]);
        let base = digest(&[a.clone(), b.clone()]);
        assert_eq!(base.len(), 16);
        let mut shuffled = a.clone();
        shuffled.allowed_ips.reverse();
        assert_eq!(digest(&[b.clone(), shuffled]), base);
        let mut moved = a.clone();
        moved.endpoint = Some(SocketAddr::from(([192, 168, 77, 9], 51820)));
        assert_ne!(digest(&[moved, b.clone()]), base);
        let mut keepalive = a.clone();
        keepalive.persistent_keepalive = Some(25);
        assert_ne!(digest(&[keepalive, b.clone()]), base);
        assert_ne!(digest(&[a]), base);
        let peers = peers("c", &key(3), &[entry("a", 1, &["10.42.0.1/32"]), b]);
        assert_eq!(peers.applied.len(), 2);
    }

    #[test]
    fn keepalive_zero_or_out_of_range_is_off() {
        let mut e = entry("b", 2, &[]);
        e.persistent_keepalive = Some(0);
        assert_eq!(peers("a", &key(1), std::slice::from_ref(&e)).peers[&key(2)].persistent_keepalive, None);
        e.persistent_keepalive = Some(25);
        assert_eq!(peers("a", &key(1), std::slice::from_ref(&e)).peers[&key(2)].persistent_keepalive, Some(25));
        e.persistent_keepalive = Some(-1);
        assert_eq!(peers("a", &key(1), &[e]).peers[&key(2)].persistent_keepalive, None);
    }

    fn placement(service: &str, ip: &str, node: &str, exposure: Exposure) -> Placement {
        Placement {
            service: service.into(),
            mesh_ip: Some(ip.parse().unwrap()),
            node: Some(node.into()),
            exposure,
            ports: vec![8000, 8020],
            pod_ip: None,
        }
    }

    #[test]
    fn a_node_hosts_its_mesh_and_dual_services_only() {
        let placements = [
            placement("ns/a", "10.42.1.1", "n1", Exposure::Mesh),
            placement("ns/b", "10.42.1.2", "n1", Exposure::Dual),
            placement("ns/c", "10.42.1.3", "n1", Exposure::Host),
            placement("ns/d", "10.42.1.4", "n2", Exposure::Mesh),
            Placement { mesh_ip: None, ..placement("ns/e", "10.42.1.5", "n1", Exposure::Mesh) },
            placement("ns/own", "10.42.0.1", "n1", Exposure::Mesh),
        ];
        let hosted = hosted("n1", Some("10.42.0.1".parse().unwrap()), &placements);
        let ips: Vec<String> = hosted.iter().map(|h| h.ip.to_string()).collect();
        assert_eq!(ips, ["10.42.1.1", "10.42.1.2"]);
        assert_eq!(hosted[0].ports, BTreeSet::from([8000, 8020]));
        assert_eq!(hosted[0].forward_to, None);
    }

    #[test]
    fn a_pod_backed_service_is_forwarded_to_its_pod() {
        let pod_ip = Some("10.244.1.7".parse().unwrap());
        let placements = [Placement { pod_ip, ..placement("ns/web", "10.42.1.1", "n1", Exposure::Mesh) }];
        let hosted = hosted("n1", None, &placements);
        assert_eq!(hosted[0].forward_to, pod_ip);
    }
}
