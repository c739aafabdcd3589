//! From the directory (every MeshNode's peer entry, every MeshService's placement) to what one
//! node should configure.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net};
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
    /// How many entries are applied.
    pub applied: usize,
    /// The [`digest`] of the entries applied.
    pub digest: String,
}

/// The canonical line of an entry in a [`digest`]: key, endpoint or `-`, sorted allowed IPs
/// joined by `,`, keepalive or 0.
fn digest_line(e: &PeerEntry) -> String {
    let mut ips: Vec<&str> = e.allowed_ips.iter().map(String::as_str).collect();
    ips.sort_unstable();
    ips.dedup();
    let endpoint = e.endpoint.map_or_else(|| "-".to_owned(), |a| a.to_string());
    format!("{} {endpoint} {} {}\n", e.public_key, ips.join(","), e.persistent_keepalive.unwrap_or(0).max(0))
}

/// FNV-1a 64 over `lines`, in the order given, as 16 hex digits.
fn fnv<'a>(lines: impl IntoIterator<Item = &'a str>) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in lines.into_iter().flat_map(str::bytes) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// A digest of a peer set: FNV-1a 64 over one canonical line per entry (sorted by public key:
/// key, endpoint or `-`, sorted allowed IPs joined by `,`, keepalive or 0), as 16 hex digits.
/// The agent publishes the digest of what it applied; anyone can compute the digest of what the
/// directory asks of a node and compare.
pub fn digest(entries: &[PeerEntry]) -> String {
    let mut lines: Vec<String> = entries.iter().map(digest_line).collect();
    lines.sort_unstable();
    fnv(lines.iter().map(String::as_str))
}

/// One entry of [`Prepared`]: parsed once, for every node that plans from it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ready {
    node: String,
    /// The key, or why it does not parse.
    key: Result<Key, String>,
    /// The peer as the device takes it, or why its allowed IPs do not parse.
    config: Result<PeerConfig, String>,
    /// Its line in the [`digest`].
    line: String,
}

/// One entry parsed ([`prepare_entry`]), shared: a directory kept across changes parses an
/// entry again only when its node changed, and assembles [`Prepared`] from these
/// ([`prepare_from`]) without copying them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreparedEntry(Arc<Ready>);

/// Every entry of a directory state parsed once (keys, allowed IPs, digest lines), so that the
/// many nodes planning from the same state — an agent once per sync, the simulator hundreds of
/// times per change — each only pick their peers from it ([`peers_of`]) instead of parsing
/// thousands of keys and CIDRs and cloning every entry again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prepared {
    /// In the order given.
    ready: Vec<PreparedEntry>,
    /// Indices of the entries whose key parses, by key, then in the order given.
    by_key: Vec<usize>,
    /// Indices of every entry, by digest line.
    by_line: Vec<usize>,
    /// The entries of each key that more than one entry publishes.
    shared_keys: BTreeMap<Key, Vec<usize>>,
}

/// Parses `entries` once; see [`Prepared`].
pub fn prepare(entries: &[PeerEntry]) -> Prepared {
    prepare_from(entries.iter().map(prepare_entry).collect())
}

/// Parses one entry (its key, allowed IPs and digest line) for [`prepare_from`].
pub fn prepare_entry(entry: &PeerEntry) -> PreparedEntry {
    let key = Key::from_base64(&entry.public_key).map_err(|err| err.to_string());
    let ips: Result<BTreeSet<IpNet>, _> = entry.allowed_ips.iter().map(|ip| ip.parse::<IpNet>()).collect();
    let config = ips
        .map(|allowed_ips| PeerConfig {
            endpoint: entry.endpoint,
            allowed_ips,
            persistent_keepalive: entry.persistent_keepalive.and_then(|k| u16::try_from(k).ok()).filter(|k| *k > 0),
        })
        .map_err(|err| format!("malformed allowed IP in {:?}: {err}", entry.allowed_ips));
    PreparedEntry(Arc::new(Ready { node: entry.node.clone(), key, config, line: digest_line(entry) }))
}

/// [`Prepared`] from entries parsed one by one ([`prepare_entry`]), in the order given: only
/// the indexes (by key, by digest line) are computed here.
pub fn prepare_from(ready: Vec<PreparedEntry>) -> Prepared {
    let mut by_key: Vec<usize> = (0..ready.len()).filter(|i| ready[*i].0.key.is_ok()).collect();
    by_key.sort_by_key(|i| (ready[*i].0.key.as_ref().ok().copied(), *i));
    let mut shared_keys: BTreeMap<Key, Vec<usize>> = BTreeMap::new();
    for pair in by_key.windows(2) {
        if let (Ok(a), Ok(b)) = (&ready[pair[0]].0.key, &ready[pair[1]].0.key)
            && a == b
        {
            let group = shared_keys.entry(*a).or_default();
            if group.last() != Some(&pair[0]) {
                group.push(pair[0]);
            }
            group.push(pair[1]);
        }
    }
    let mut by_line: Vec<usize> = (0..ready.len()).collect();
    by_line.sort_by(|a, b| ready[*a].0.line.cmp(&ready[*b].0.line));
    Prepared { ready, by_key, by_line, shared_keys }
}

/// Computes the peers of node `me` (whose public key is `my_key`) from all entries.
///
/// An entry with a malformed key or CIDR is skipped and reported. An entry with this node's own
/// key is skipped (a copied key must not make a node its own peer). When two nodes publish the
/// same key, neither is applied: WireGuard could not tell them apart, and picking one would route
/// the other's traffic wrongly.
pub fn peers(me: &str, my_key: &Key, entries: &[PeerEntry]) -> Peers {
    peers_of(me, my_key, &prepare(entries))
}

/// [`peers`] from entries parsed once.
pub fn peers_of(me: &str, my_key: &Key, prepared: &Prepared) -> Peers {
    let mut out = Peers::default();
    let ready: Vec<&Ready> = prepared.ready.iter().map(|e| &*e.0).collect();
    // Keys that do not parse, and this node's own key, in the order given.
    for entry in ready.iter().filter(|e| e.node != me) {
        match &entry.key {
            Err(why) => out.skipped.push(Skipped { node: entry.node.clone(), why: why.clone() }),
            Ok(key) if key == my_key => out
                .skipped
                .push(Skipped { node: entry.node.clone(), why: format!("publishes this node's own public key {key}") }),
            Ok(_) => {}
        }
    }
    let mut applied = vec![false; ready.len()];
    for &i in &prepared.by_key {
        let entry = &ready[i];
        let Ok(key) = &entry.key else { continue };
        if entry.node == me || key == my_key {
            continue;
        }
        if let Some(group) = prepared.shared_keys.get(key) {
            let names: Vec<&str> = group.iter().map(|j| ready[*j].node.as_str()).filter(|n| *n != me).collect();
            if names.len() > 1 {
                out.skipped.push(Skipped {
                    node: entry.node.clone(),
                    why: format!("public key {key} is published by several nodes: {}", names.join(", ")),
                });
                continue;
            }
        }
        match &entry.config {
            Ok(config) => {
                out.peers.insert(*key, config.clone());
                out.names.insert(*key, entry.node.clone());
                applied[i] = true;
                out.applied += 1;
            }
            Err(why) => out.skipped.push(Skipped { node: entry.node.clone(), why: why.clone() }),
        }
    }
    out.digest = fnv(prepared.by_line.iter().filter(|i| applied[**i]).map(|i| ready[*i].line.as_str()));
    out
}

/// An allowed IP dropped from a peer entry, and why (the rest of the entry is applied).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dropped {
    /// The MeshNode whose entry named it.
    pub node: String,
    /// The allowed IP as written.
    pub allowed_ip: String,
    /// Why it is not applied.
    pub why: String,
}

/// Keeps in each entry's allowed IPs only single addresses (`/32`) inside the mesh `subnet`,
/// and returns the entries with what was dropped. A peer's allowed IPs decide what this node
/// routes to it and accepts from it: a wider CIDR (`0.0.0.0/0`, another subnet), written by a
/// controller bug or by anyone who can write a MeshNode's status, would send this node's traffic
/// for those addresses into that peer, so the rest of the entry is applied and the CIDR is not.
pub fn confine_allowed_ips(subnet: Ipv4Net, entries: Vec<PeerEntry>) -> (Vec<PeerEntry>, Vec<Dropped>) {
    let mut dropped = Vec::new();
    let entries = entries
        .into_iter()
        .map(|mut entry| {
            let node = entry.node.clone();
            entry.allowed_ips.retain(|text| {
                let why = match text.parse::<IpNet>() {
                    Err(err) => Some(format!("not a CIDR: {err}")),
                    Ok(IpNet::V6(_)) => Some("not IPv4: the mesh is IPv4".to_owned()),
                    Ok(IpNet::V4(net)) if net.prefix_len() != 32 => {
                        Some(format!("a /{} network, not a single /32 address", net.prefix_len()))
                    }
                    Ok(IpNet::V4(net)) if !subnet.contains(&net.addr()) => {
                        Some(format!("outside the mesh subnet {subnet}"))
                    }
                    Ok(IpNet::V4(_)) => None,
                };
                match why {
                    Some(why) => {
                        dropped.push(Dropped { node: node.clone(), allowed_ip: text.clone(), why });
                        false
                    }
                    None => true,
                }
            });
            entry
        })
        .collect();
    (entries, dropped)
}

/// What an agent may host and forward to: service mesh IPs only inside the mesh subnet and never
/// a node's address, DNAT targets only inside the cluster's pod CIDRs and never a node's address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bounds {
    /// The mesh subnet.
    pub subnet: Option<Ipv4Net>,
    /// Every node's mesh IP and underlay address: never a service IP or a DNAT target.
    pub node_addresses: BTreeSet<Ipv4Addr>,
    /// The cluster's pod CIDRs: a DNAT target must lie in one. Empty: no pod is forwarded to.
    pub pod_cidrs: Vec<Ipv4Net>,
}

/// A placement an agent refuses, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Refused {
    /// `namespace/name` of the service.
    pub service: String,
    /// What is wrong with its status.
    pub why: String,
}

/// Checks the placements on node `me` against `bounds` (see [`Bounds`]): a placement whose mesh
/// IP or pod IP is out of bounds is left out whole (hosting the IP without its forward would
/// serve the node's own ports instead of the pod's) and reported; placements on other nodes are
/// kept as they are. A MeshService status is mesh-controller's to write (an admission policy
/// says so), but an agent acts on it as root, so it does not trust it beyond these bounds.
pub fn check_placements(me: &str, bounds: &Bounds, placements: Vec<Placement>) -> (Vec<Placement>, Vec<Refused>) {
    let mut refused = Vec::new();
    let kept = placements
        .into_iter()
        .filter(|p| {
            if p.node.as_deref() != Some(me) || p.exposure == Exposure::Host {
                return true;
            }
            let container = p.container_ip.and_then(|ip| {
                if bounds.node_addresses.contains(&ip) {
                    Some(format!("its container's address {ip} is a node's address"))
                } else if bounds.subnet.is_some_and(|s| s.contains(&ip)) {
                    Some(format!("its container's address {ip} is inside the mesh subnet"))
                } else {
                    None
                }
            });
            let why = container.or_else(|| match (p.mesh_ip, p.pod_ip) {
                (Some(ip), _) if bounds.subnet.is_none_or(|s| !s.contains(&ip)) => Some(format!(
                    "its mesh IP {ip} is outside the mesh subnet{}",
                    bounds.subnet.map(|s| format!(" {s}")).unwrap_or_default()
                )),
                (Some(ip), _) if bounds.node_addresses.contains(&ip) => {
                    Some(format!("its mesh IP {ip} is a node's address"))
                }
                (_, Some(pod)) if bounds.node_addresses.contains(&pod) => {
                    Some(format!("its pod IP {pod} is a node's address"))
                }
                (_, Some(pod)) if bounds.subnet.is_some_and(|s| s.contains(&pod)) => {
                    Some(format!("its pod IP {pod} is inside the mesh subnet"))
                }
                (_, Some(pod)) if !bounds.pod_cidrs.iter().any(|c| c.contains(&pod)) => Some(format!(
                    "its pod IP {pod} is not in the cluster's pod CIDRs ({})",
                    if bounds.pod_cidrs.is_empty() {
                        "none configured: set --pod-cidrs".to_owned()
                    } else {
                        bounds.pod_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                    }
                )),
                _ => None,
            });
            match why {
                Some(why) => {
                    refused.push(Refused { service: p.service.clone(), why });
                    false
                }
                None => true,
            }
        })
        .collect();
    (kept, refused)
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
    /// Listed ports whose connections go to another port behind the mesh IP: port → target.
    pub target_ports: BTreeMap<u16, u16>,
    /// The pod-network IP of the backing pod, when the service's traffic has to be forwarded
    /// to a pod rather than served by a process on the node.
    pub pod_ip: Option<Ipv4Addr>,
    /// The container that backs the service (`spec.container.name`) in the hosting node's
    /// engine.
    pub container: Option<String>,
    /// That container's address while it runs, as the hosting node's agent finds it in its
    /// engine (the API does not carry it: the agent fills it in before planning). A container
    /// service without one is not hosted: its IP stays off the node, so nothing else answers.
    pub container_ip: Option<Ipv4Addr>,
}

/// A service IP this node hosts.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Hosted {
    /// The mesh IP.
    pub ip: Ipv4Addr,
    /// The only ports open on it.
    pub ports: BTreeSet<u16>,
    /// Open ports whose connections go to another port behind the IP (the pod's, or the
    /// node's process on this IP): port → target. Only listed ports, never to themselves.
    pub target_ports: BTreeMap<u16, u16>,
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
            let ports: BTreeSet<u16> = p.ports.iter().copied().collect();
            let target_ports = p
                .target_ports
                .iter()
                .filter(|(port, target)| ports.contains(port) && port != target)
                .map(|(p, t)| (*p, *t))
                .collect();
            // A container service is forwarded to its running container, and not hosted without.
            let forward_to = match &p.container {
                Some(_) => Some(p.container_ip?),
                None => p.pod_ip,
            };
            Some(Hosted { ip, ports, target_ports, service: p.service.clone(), forward_to })
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
        let peers = peers("c", &key(3), &[entry("a", 1, &["10.42.0.1/32"]), b.clone()]);
        assert_eq!(peers.applied, 2);
        assert_eq!(peers.digest, digest(&[entry("a", 1, &["10.42.0.1/32"]), b]));
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

    #[test]
    fn only_listed_ports_map_and_never_to_themselves() {
        let placements = [Placement {
            target_ports: BTreeMap::from([(8000, 80), (8020, 8020), (9999, 99)]),
            ..placement("ns/web", "10.42.1.1", "n1", Exposure::Mesh)
        }];
        let hosted = hosted("n1", None, &placements);
        assert_eq!(hosted[0].target_ports, BTreeMap::from([(8000, 80)]));
        assert_eq!(hosted[0].ports, BTreeSet::from([8000, 8020]));
    }

    fn placement(service: &str, ip: &str, node: &str, exposure: Exposure) -> Placement {
        Placement {
            service: service.into(),
            mesh_ip: Some(ip.parse().unwrap()),
            node: Some(node.into()),
            exposure,
            ports: vec![8000, 8020],
            target_ports: BTreeMap::new(),
            pod_ip: None,
            container: None,
            container_ip: None,
        }
    }

    #[test]
    fn a_container_service_is_forwarded_to_its_running_container_and_not_hosted_without_one() {
        let web = Placement { container: Some("web".into()), ..placement("ns/web", "10.42.1.1", "n1", Exposure::Mesh) };
        assert!(hosted("n1", None, std::slice::from_ref(&web)).is_empty(), "no running container, no hosting");
        let running = Placement { container_ip: Some("10.88.0.5".parse().unwrap()), ..web };
        let hosted = hosted("n1", None, &[running]);
        assert_eq!(hosted[0].forward_to, Some("10.88.0.5".parse().unwrap()));
        assert_eq!(hosted[0].ip, "10.42.1.1".parse::<Ipv4Addr>().unwrap());
    }

    #[test]
    fn a_container_address_on_a_node_or_in_the_mesh_is_refused() {
        let bounds = Bounds {
            subnet: Some("10.42.0.0/16".parse().unwrap()),
            node_addresses: ["192.168.77.2".parse().unwrap()].into(),
            pod_cidrs: vec![],
        };
        let container = |name: &str, ip: &str| Placement {
            container: Some(name.into()),
            container_ip: Some(ip.parse().unwrap()),
            ..placement(&format!("ns/{name}"), "10.42.1.1", "n1", Exposure::Mesh)
        };
        let placements =
            vec![container("ok", "10.88.0.5"), container("node", "192.168.77.2"), container("mesh", "10.42.0.9")];
        let (kept, refused) = check_placements("n1", &bounds, placements);
        assert_eq!(kept.iter().map(|p| p.service.as_str()).collect::<Vec<_>>(), ["ns/ok"]);
        assert_eq!(refused.iter().map(|r| r.service.as_str()).collect::<Vec<_>>(), ["ns/node", "ns/mesh"]);
        assert!(refused[0].why.contains("container's address 192.168.77.2"), "{refused:?}");
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
    fn only_single_addresses_in_the_subnet_are_allowed_ips() {
        let subnet: Ipv4Net = "10.42.0.0/16".parse().unwrap();
        let wide =
            entry("b", 2, &["10.42.0.2/32", "0.0.0.0/0", "192.168.77.0/24", "10.42.0.0/16", "10.43.0.1/32", "x"]);
        let good = entry("c", 3, &["10.42.0.3/32", "10.42.9.9/32"]);
        let (entries, dropped) = confine_allowed_ips(subnet, vec![wide, good.clone()]);
        assert_eq!(entries[0].allowed_ips, ["10.42.0.2/32"]);
        assert_eq!(entries[1], good);
        let dropped: Vec<&str> = dropped.iter().map(|d| d.allowed_ip.as_str()).collect();
        assert_eq!(dropped, ["0.0.0.0/0", "192.168.77.0/24", "10.42.0.0/16", "10.43.0.1/32", "x"]);
        // The rest of the peer is applied.
        let peers = peers("a", &key(1), &entries);
        assert_eq!(peers.peers[&key(2)].allowed_ips, BTreeSet::from(["10.42.0.2/32".parse().unwrap()]));
    }

    #[test]
    fn placements_out_of_bounds_are_refused_on_this_node_only() {
        let bounds = Bounds {
            subnet: Some("10.42.0.0/16".parse().unwrap()),
            node_addresses: ["10.42.0.2".parse().unwrap(), "192.168.77.2".parse().unwrap()].into(),
            pod_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        };
        let pod = |p: Placement, ip: &str| Placement { pod_ip: Some(ip.parse().unwrap()), ..p };
        let placements = vec![
            pod(placement("ns/ok", "10.42.1.1", "n1", Exposure::Mesh), "10.244.1.7"),
            placement("ns/plain", "10.42.1.2", "n1", Exposure::Dual),
            pod(placement("ns/metadata", "10.42.1.3", "n1", Exposure::Mesh), "169.254.169.254"),
            pod(placement("ns/node-dnat", "10.42.1.4", "n1", Exposure::Mesh), "192.168.77.2"),
            pod(placement("ns/mesh-dnat", "10.42.1.5", "n1", Exposure::Mesh), "10.42.0.9"),
            placement("ns/node-ip", "10.42.0.2", "n1", Exposure::Mesh),
            placement("ns/outside", "192.168.77.9", "n1", Exposure::Mesh),
            placement("ns/elsewhere", "192.168.77.9", "n2", Exposure::Mesh),
            placement("ns/host", "192.168.77.9", "n1", Exposure::Host),
        ];
        let (kept, refused) = check_placements("n1", &bounds, placements);
        let kept: Vec<&str> = kept.iter().map(|p| p.service.as_str()).collect();
        assert_eq!(kept, ["ns/ok", "ns/plain", "ns/elsewhere", "ns/host"]);
        let refused: Vec<&str> = refused.iter().map(|r| r.service.as_str()).collect();
        assert_eq!(refused, ["ns/metadata", "ns/node-dnat", "ns/mesh-dnat", "ns/node-ip", "ns/outside"]);
        let none = Bounds { pod_cidrs: vec![], ..bounds };
        let (kept, refused) = check_placements(
            "n1",
            &none,
            vec![pod(placement("ns/a", "10.42.1.1", "n1", Exposure::Mesh), "10.244.1.7")],
        );
        assert!(kept.is_empty());
        assert!(refused[0].why.contains("--pod-cidrs"), "{refused:?}");
    }

    #[test]
    fn a_pod_backed_service_is_forwarded_to_its_pod() {
        let pod_ip = Some("10.244.1.7".parse().unwrap());
        let placements = [Placement { pod_ip, ..placement("ns/web", "10.42.1.1", "n1", Exposure::Mesh) }];
        let hosted = hosted("n1", None, &placements);
        assert_eq!(hosted[0].forward_to, pod_ip);
    }

    mod confine {
        use proptest::prelude::*;

        use super::*;

        fn cidr() -> impl Strategy<Value = String> {
            prop_oneof![
                (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, p)| format!("{}/{p}", Ipv4Addr::from(a))),
                (any::<u8>(), any::<u8>(), 0u8..=32).prop_map(|(c, d, p)| format!("10.42.{c}.{d}/{p}")),
                "[ -~]{0,20}",
            ]
        }

        proptest! {
            /// Whatever an entry lists, what is kept is exactly its /32s inside the subnet, and
            /// everything else is reported as dropped.
            #[test]
            fn kept_are_exactly_the_subnets_single_addresses(ips in proptest::collection::vec(cidr(), 0..8)) {
                let subnet: Ipv4Net = "10.42.0.0/16".parse().unwrap();
                let mut e = entry("b", 2, &[]);
                e.allowed_ips = ips.clone();
                let (entries, dropped) = confine_allowed_ips(subnet, vec![e]);
                prop_assert_eq!(entries[0].allowed_ips.len() + dropped.len(), ips.len());
                for kept in &entries[0].allowed_ips {
                    let net: Ipv4Net = kept.parse().unwrap();
                    prop_assert!(net.prefix_len() == 32 && subnet.contains(&net.addr()), "{kept}");
                }
                for d in &dropped {
                    let single = d.allowed_ip.parse::<Ipv4Net>().ok().filter(|n| n.prefix_len() == 32 && subnet.contains(&n.addr()));
                    prop_assert!(single.is_none(), "{d:?}");
                }
            }
        }
    }
}
