//! The plan: [`Directory`] is what every node reading one state of the directory derives alike
//! (peer entries confined to the mesh subnet, placements indexed by node, node addresses, the
//! DNS zone); [`Directory::plan`] adds one node's identity and settings and gives its
//! [`NodePlan`]. The simulator builds one `Directory` per change for hundreds of nodes; the
//! agent builds one per sync from one snapshot of its reflector stores.
//!
//! Cost: building is linear in the objects; a node's plan is `O(p log p)` in the peers plus its
//! own placements (they are indexed by node, never scanned per node).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;
use mesh_api::{AppliedPeers, MeshNode, MeshService};
use mesh_dataplane::desired::{self, Bounds, Dropped, Hosted, PeerEntry, Peers, Placement, Refused, Skipped};
use mesh_dataplane::dns::{self, ShortNames, Zone};
use mesh_dataplane::firewall;
use mesh_wireguard::{DeviceConfig, Key, PrivateKey};

use crate::convert;
use crate::relay::{self, Paths};

/// A node of the directory as a node's own plan needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// `spec.listenPort`, or 51820 when it is out of range.
    pub listen_port: u16,
    /// `spec.endpoint`: overrides the detected endpoint.
    pub spec_endpoint: Option<String>,
    /// `spec.persistentKeepalive` (seconds; `None` when unset, 0 or out of range): the interval
    /// other peers use towards this node, and the one this node uses towards every peer.
    pub persistent_keepalive: Option<u16>,
    /// `status.meshIP`.
    pub mesh_ip: Option<Ipv4Addr>,
    /// The underlay address of `status.endpoint`.
    pub underlay: Option<Ipv4Addr>,
    /// An ephemeral member (`meshctl connect`, annotation `mesh.harness.dev/connect-owner`): a
    /// peer like any other, but not probed, since it comes and goes with a laptop's lid and has
    /// no agent to answer; its absence never makes a node's Connected condition False.
    pub ephemeral: bool,
    /// `spec.relay`: it carries traffic between members that have no direct path.
    pub relay: bool,
}

/// What every node derives alike from one state of the directory.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    /// Every node, by name.
    pub members: HashMap<String, Member>,
    /// Every node's peer entry, endpoints resolved, allowed IPs confined to the mesh subnet.
    pub entries: Vec<PeerEntry>,
    /// Allowed IPs dropped from the entries (not a /32 inside the subnet).
    pub dropped: Vec<Dropped>,
    /// The entries parsed once for every node's [`Directory::peers`].
    pub prepared: desired::Prepared,
    /// Every service's placement, by the node it is placed on (unplaced ones under "").
    pub placements: HashMap<String, Vec<Placement>>,
    /// Every node's mesh IP and underlay address.
    pub node_addresses: BTreeSet<Ipv4Addr>,
    /// Every node's mesh IP, by name.
    pub node_ips: HashMap<String, Ipv4Addr>,
    /// The DNS zone every agent serves.
    pub zone: Zone,
}

/// A node's own settings (the agent's flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSettings {
    /// The WireGuard interface.
    pub interface: String,
    /// The mesh subnet.
    pub subnet: Ipv4Net,
    /// The cluster's pod CIDRs: the only DNAT targets.
    pub pod_cidrs: Vec<Ipv4Net>,
    /// MTU of the interface.
    pub mtu: u32,
    /// UDP port of the probe echo on the mesh IP.
    pub probe_port: u16,
    /// DNS port on the mesh IP; 0: no DNS.
    pub dns_port: u16,
    /// Also serve DNS on the underlay address.
    pub dns_on_underlay: bool,
    /// Ports open to peers on the node's own mesh IP besides the agent's.
    pub expose_ports: BTreeSet<u16>,
}

impl NodeSettings {
    /// The agent's own defaults (its flags' default values) on the mesh `subnet`: interface
    /// `wg-harness`, MTU 1420, the probe echo on UDP 51821, DNS on port 53 of the mesh IP only,
    /// no pod CIDRs and no extra exposed ports. For the simulator, benchmarks and tests.
    pub fn defaults(subnet: Ipv4Net) -> Self {
        Self {
            interface: "wg-harness".to_owned(),
            subnet,
            pod_cidrs: Vec::new(),
            mtu: 1420,
            probe_port: 51821,
            dns_port: 53,
            dns_on_underlay: false,
            expose_ports: BTreeSet::new(),
        }
    }
}

/// One node's identity and what the agent learned from the machine (impure facts are inputs).
#[derive(Clone, Copy, Debug)]
pub struct NodeInput<'a> {
    /// Its MeshNode name.
    pub name: &'a str,
    /// Its WireGuard private key.
    pub key: &'a PrivateKey,
    /// Its settings.
    pub settings: &'a NodeSettings,
    /// It runs without WireGuard (fallback): no device, DNS on the underlay address.
    pub fallback: bool,
    /// Its underlay address (advertised or detected), for the endpoint when `spec.endpoint` is
    /// unset.
    pub underlay: Option<Ipv4Addr>,
    /// With masquerading on: the underlay interface (never translated); `None`: no source NAT.
    pub masquerade_underlay: Option<&'a str>,
    /// Peers the node's device has had no live session with for a while (the agent's
    /// observation): they go through a relay ([`crate::relay`]). Ephemeral members are never
    /// relayed (they have no agent to relay the other way).
    pub without_direct: &'a BTreeSet<String>,
    /// The running containers of the node's engine with their addresses, by container name, as
    /// the agent finds them. A service whose container (`spec.container`) is missing here is
    /// not hosted.
    pub containers: &'a BTreeMap<String, Ipv4Addr>,
}

/// What the node's link should carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkAddresses {
    /// MTU of the interface.
    pub mtu: u32,
    /// The node's own mesh IP: an address, and the preferred source of the mesh route.
    pub node_ip: Ipv4Addr,
    /// Further local addresses: the mesh IPs of services hosted here.
    pub service_ips: BTreeSet<Ipv4Addr>,
    /// The mesh subnet, routed into the interface.
    pub subnet: Ipv4Net,
    /// The node relays (`spec.relay`): IPv4 forwarding on the interface, so that what arrives
    /// from one peer for another goes back out to it.
    pub forwarding: bool,
}

/// What needs the node's own mesh IP: hosting, the link and the ruleset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Local {
    /// The node's mesh IP.
    pub node_ip: Ipv4Addr,
    /// The service IPs it hosts.
    pub hosted: Vec<Hosted>,
    /// Placements on it that it refuses, and why.
    pub refused: Vec<Refused>,
    /// The link's addresses.
    pub link: LinkAddresses,
    /// The containers the services placed here ask for: service `namespace/name` → container
    /// name (what the agent looks for in the node's engine and reports in `status.containers`).
    pub containers: BTreeMap<String, String>,
    /// The nftables script (`nft -f -`).
    pub ruleset: String,
}

/// Everything one node should configure.
#[derive(Clone, Debug)]
pub struct NodePlan {
    /// Its MeshNode name.
    pub name: String,
    /// Its effective endpoint, `host:port`, to publish.
    pub endpoint: Option<String>,
    /// Its listen port.
    pub listen_port: u16,
    /// It runs without WireGuard: nothing below but `dns_listen` applies.
    pub fallback: bool,
    /// The WireGuard device as it should be.
    pub device: DeviceConfig,
    /// Peer node names by public key.
    pub names: BTreeMap<Key, String>,
    /// Peer entries not applied, and why.
    pub skipped: Vec<Skipped>,
    /// The applied peer set to report (`None` in fallback).
    pub applied: Option<AppliedPeers>,
    /// Peers to probe: name → mesh IP.
    pub probe_targets: BTreeMap<String, Ipv4Addr>,
    /// Hosting, link and ruleset; `Err` says why there are none (no mesh IP yet, fallback).
    pub local: Result<Local, String>,
    /// Where to serve DNS (empty: nowhere).
    pub dns_listen: Vec<Ipv4Addr>,
    /// Peers reached through a relay, and those reached neither directly nor through one.
    pub paths: Paths,
}

/// Why there is no plan at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanError {
    /// The node's MeshNode is not in the directory.
    NoMeshNode(String),
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoMeshNode(name) => write!(
                f,
                "MeshNode {name} does not exist: the controller mirrors it from the Kubernetes Node, or create it \
                 (meshctl enroll, or kubectl apply a MeshNode named {name})"
            ),
        }
    }
}

impl std::error::Error for PlanError {}

/// A node's own `spec.persistentKeepalive`, when set, applied to every peer on its device too:
/// a node behind a NAT keeps its mapping open from its side (the peers' keepalives towards it
/// reach it only while the mapping lives). Where a peer asks for a shorter interval of its own,
/// that one stays.
fn with_own_keepalive(
    mut peers: BTreeMap<Key, mesh_wireguard::PeerConfig>,
    own: Option<u16>,
) -> BTreeMap<Key, mesh_wireguard::PeerConfig> {
    if let Some(own) = own {
        for peer in peers.values_mut() {
            let theirs = peer.persistent_keepalive.filter(|k| *k > 0);
            peer.persistent_keepalive = Some(theirs.map_or(own, |t| t.min(own)));
        }
    }
    peers
}

/// The public key no real node has (all zero, a low-order point): the own key of a node that
/// has not published one, so that no entry is skipped as its own.
const NO_KEY: Key = Key::from_bytes([0; 32]);

impl Directory {
    /// Derives everything from one state of the directory. `subnet`: allowed IPs outside it
    /// are dropped (`None`: kept, for a reader that does not know the subnet); `resolve` gives
    /// the address of a peer's endpoint text (see [`convert::literal_endpoint`]).
    pub fn build<'a>(
        nodes: impl IntoIterator<Item = &'a MeshNode>,
        services: impl IntoIterator<Item = &'a MeshService>,
        subnet: Option<Ipv4Net>,
        short_names: &ShortNames,
        mut resolve: impl FnMut(&str, &str) -> Option<SocketAddr>,
    ) -> Self {
        let mut out = Self::default();
        let mut entries = Vec::new();
        let mut dns_nodes = Vec::new();
        for node in nodes {
            let name = convert::name(node);
            let [mesh_ip, underlay] = convert::node_addresses_of(node);
            out.node_addresses.extend(mesh_ip);
            out.node_addresses.extend(underlay);
            if let Some(ip) = mesh_ip {
                out.node_ips.insert(name.to_owned(), ip);
            }
            out.members.insert(
                name.to_owned(),
                Member {
                    listen_port: u16::try_from(node.spec.listen_port).unwrap_or(mesh_api::DEFAULT_LISTEN_PORT as u16),
                    spec_endpoint: node.spec.endpoint.clone(),
                    persistent_keepalive: node
                        .spec
                        .persistent_keepalive
                        .and_then(|k| u16::try_from(k).ok())
                        .filter(|k| *k > 0),
                    mesh_ip,
                    underlay,
                    ephemeral: node
                        .metadata
                        .annotations
                        .as_ref()
                        .is_some_and(|a| a.contains_key(mesh_api::CONNECT_OWNER_ANNOTATION)),
                    relay: node.spec.relay.unwrap_or(false),
                },
            );
            entries.extend(convert::peer_entry(node, &mut resolve));
            dns_nodes.push(convert::dns_node(node));
        }
        (out.entries, out.dropped) = match subnet {
            Some(subnet) => desired::confine_allowed_ips(subnet, entries),
            None => (entries, Vec::new()),
        };
        out.prepared = desired::prepare(&out.entries);
        let mut dns_services = Vec::new();
        for service in services {
            let placement = convert::placement(service);
            out.placements.entry(placement.node.clone().unwrap_or_default()).or_default().push(placement);
            dns_services.push(convert::dns_service(service));
        }
        out.zone = dns::zone_with(&dns_nodes, &dns_services, short_names);
        out
    }

    /// The placements on node `name`.
    pub fn placements_on(&self, name: &str) -> &[Placement] {
        self.placements.get(name).map_or(&[], Vec::as_slice)
    }

    /// The peers node `me` applies: every other entry, less those with its own key (`None`: it
    /// has published none), a key several nodes publish, or a malformed key or allowed IP.
    pub fn peers(&self, me: &str, my_key: Option<&Key>) -> Peers {
        desired::peers_of(me, my_key.unwrap_or(&NO_KEY), &self.prepared)
    }

    /// The applied-peers report of a peer set.
    pub fn applied(peers: &Peers) -> AppliedPeers {
        AppliedPeers { count: i32::try_from(peers.applied).unwrap_or(i32::MAX), digest: peers.digest.clone() }
    }

    /// The plan of one node.
    pub fn plan(&self, node: &NodeInput<'_>) -> Result<NodePlan, PlanError> {
        let name = node.name;
        let me = self.members.get(name).ok_or_else(|| PlanError::NoMeshNode(name.to_owned()))?;
        let settings = node.settings;
        let listen_port = me.listen_port;
        let endpoint = me
            .spec_endpoint
            .clone()
            .or_else(|| node.underlay.map(|ip| SocketAddr::from((ip, listen_port)).to_string()));
        let empty = DeviceConfig { private_key: node.key.clone(), listen_port, peers: BTreeMap::new() };
        if node.fallback {
            // Out of the tunnel: DNS is served on the underlay address, where others can reach it.
            let dns_listen = if settings.dns_port == 0 { Vec::new() } else { me.underlay.into_iter().collect() };
            return Ok(NodePlan {
                name: name.to_owned(),
                endpoint,
                listen_port,
                fallback: true,
                device: empty,
                names: BTreeMap::new(),
                skipped: Vec::new(),
                applied: None,
                probe_targets: BTreeMap::new(),
                local: Err("this node runs without WireGuard".to_owned()),
                dns_listen,
                paths: Paths::default(),
            });
        }
        let peers = self.peers(name, Some(&node.key.public_key()));
        let applied = Self::applied(&peers);
        let paths = self.paths(name, &peers, node.without_direct);
        let keys: BTreeMap<&str, Key> = peers.names.iter().map(|(k, n)| (n.as_str(), *k)).collect();
        let mut device_peers = with_own_keepalive(peers.peers, me.persistent_keepalive);
        relay::reroute(&mut device_peers, &keys, &paths.relayed);
        let probe_targets = peers
            .names
            .values()
            .filter(|n| !self.members.get(n.as_str()).is_some_and(|m| m.ephemeral))
            .filter_map(|n| Some((n.clone(), *self.node_ips.get(n.as_str())?)))
            .collect();
        let local = match me.mesh_ip {
            Some(node_ip) => Ok(self.local(name, node_ip, node)),
            None => Err(format!("MeshNode {name} has no mesh IP yet: is mesh-controller running?")),
        };
        let mut dns_listen = Vec::new();
        if settings.dns_port != 0
            && let Some(ip) = me.mesh_ip
        {
            dns_listen.push(ip);
            if settings.dns_on_underlay {
                dns_listen.extend(me.underlay);
            }
        }
        Ok(NodePlan {
            name: name.to_owned(),
            endpoint,
            listen_port,
            fallback: false,
            device: DeviceConfig { peers: device_peers, ..empty },
            names: peers.names,
            skipped: peers.skipped,
            applied: Some(applied),
            probe_targets,
            local,
            dns_listen,
            paths,
        })
    }

    /// The relayed and stranded peers of node `me` among `without_direct`: only its applied,
    /// non-ephemeral peers count, and the relays are the directory's members with `spec.relay`
    /// that have a mesh IP (the same set at both ends of a pair).
    fn paths(&self, me: &str, peers: &Peers, without_direct: &BTreeSet<String>) -> Paths {
        if self.members.get(me).is_some_and(|m| m.ephemeral) {
            return Paths::default();
        }
        let candidates: BTreeSet<String> = without_direct
            .iter()
            .filter(|n| peers.names.values().any(|p| p == *n))
            .filter(|n| !self.members.get(n.as_str()).is_some_and(|m| m.ephemeral))
            .cloned()
            .collect();
        if candidates.is_empty() {
            return Paths::default();
        }
        let relays: BTreeSet<&str> = self
            .members
            .iter()
            .filter(|(_, m)| m.relay && m.mesh_ip.is_some() && !m.ephemeral)
            .map(|(n, _)| n.as_str())
            .collect();
        relay::choose(me, &candidates, &relays)
    }

    /// Hosting, link and ruleset of node `name` at `node_ip`.
    fn local(&self, name: &str, node_ip: Ipv4Addr, node: &NodeInput<'_>) -> Local {
        let settings = node.settings;
        let bounds = Bounds {
            subnet: Some(settings.subnet),
            node_addresses: self.node_addresses.clone(),
            pod_cidrs: settings.pod_cidrs.clone(),
        };
        let mut placements = self.placements_on(name).to_vec();
        let mut containers = BTreeMap::new();
        for p in &mut placements {
            if let Some(container) = &p.container {
                containers.insert(p.service.clone(), container.clone());
                p.container_ip = node.containers.get(container).copied();
            }
        }
        let (placements, refused) = desired::check_placements(name, &bounds, placements);
        let hosted = desired::hosted(name, Some(node_ip), &placements);
        let dns: BTreeSet<u16> = [settings.dns_port].into_iter().filter(|p| *p != 0).collect();
        let mut agent_udp = dns.clone();
        agent_udp.insert(settings.probe_port);
        let member = firewall::Member {
            interface: settings.interface.clone(),
            subnet: settings.subnet,
            node_ip,
            agent_udp,
            agent_tcp: dns,
            exposed: settings.expose_ports.clone(),
            relay: self.members.get(name).is_some_and(|m| m.relay),
        };
        let masquerade = node.masquerade_underlay.map(|underlay| firewall::Masquerade {
            interface: settings.interface.clone(),
            underlay: underlay.to_owned(),
            subnet: settings.subnet,
            node_ip,
        });
        let ruleset = firewall::render(&hosted, Some(&member), masquerade.as_ref());
        let link = LinkAddresses {
            mtu: settings.mtu,
            node_ip,
            service_ips: hosted.iter().map(|h| h.ip).collect(),
            subnet: settings.subnet,
            forwarding: self.members.get(name).is_some_and(|m| m.relay),
        };
        Local { node_ip, hosted, refused, link, containers, ruleset }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use mesh_api::{
        Backend, MeshNodeSpec, MeshNodeStatus, MeshServiceSpec, MeshServiceStatus, NetworkSpec, NetworkType,
    };
    use mesh_dataplane::desired::Exposure;

    use super::*;

    /// The private key of node `i` (public key: its public half).
    pub fn key(i: u8) -> PrivateKey {
        PrivateKey::from_bytes([i; 32])
    }

    /// Node `name` with key `i`, mesh IP 10.42.0.i, endpoint 192.168.77.i:51820 and its entry.
    pub fn node(name: &str, i: u8) -> MeshNode {
        let public = key(i).public_key().to_base64();
        let endpoint = format!("192.168.77.{i}:51820");
        let mut node = MeshNode::new(name, MeshNodeSpec::default());
        node.status = Some(MeshNodeStatus {
            mesh_ip: Some(format!("10.42.0.{i}")),
            public_key: Some(public.clone()),
            endpoint: Some(endpoint.clone()),
            listen_port: Some(51820),
            backend: Some(Backend::Userspace),
            peer: Some(mesh_api::PeerEntry {
                public_key: public,
                endpoint: Some(endpoint),
                allowed_ips: vec![format!("10.42.0.{i}/32")],
                persistent_keepalive: None,
            }),
            ..MeshNodeStatus::default()
        });
        node
    }

    /// Service `ns/name` of type mesh on port 8000, placed on `node` at `ip`.
    pub fn service(ns: &str, name: &str, node: &str, ip: &str) -> MeshService {
        let mut s = MeshService::new(
            name,
            MeshServiceSpec {
                network: NetworkSpec { type_: NetworkType::Mesh, ports: vec![8000], target_ports: Vec::new() },
                selector: None,
                node: Some(node.into()),
                container: None,
                mesh_ip: None,
            },
        );
        s.metadata.namespace = Some(ns.into());
        s.status = Some(MeshServiceStatus {
            mesh_ip: Some(ip.into()),
            node: Some(node.into()),
            ..MeshServiceStatus::default()
        });
        s
    }

    fn settings() -> NodeSettings {
        NodeSettings {
            pod_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            ..NodeSettings::defaults("10.42.0.0/16".parse().unwrap())
        }
    }

    fn directory(nodes: &[MeshNode], services: &[MeshService]) -> Directory {
        Directory::build(
            nodes,
            services,
            Some("10.42.0.0/16".parse().unwrap()),
            &ShortNames::Every,
            convert::literal_endpoint,
        )
    }

    fn plan_of(dir: &Directory, name: &str, i: u8, settings: &NodeSettings) -> NodePlan {
        plan_without_direct(dir, name, i, settings, &BTreeSet::new())
    }

    fn plan_without_direct(
        dir: &Directory,
        name: &str,
        i: u8,
        settings: &NodeSettings,
        without_direct: &BTreeSet<String>,
    ) -> NodePlan {
        let key = key(i);
        let input = NodeInput {
            name,
            key: &key,
            settings,
            fallback: false,
            underlay: Some(Ipv4Addr::new(192, 168, 77, i)),
            masquerade_underlay: None,
            without_direct,
            containers: &BTreeMap::new(),
        };
        dir.plan(&input).unwrap()
    }

    fn ips(plan: &NodePlan, peer: u8) -> Vec<String> {
        plan.device.peers[&key(peer).public_key()].allowed_ips.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_node_behind_nat_sends_keepalives_to_every_peer() {
        let keepalive = |plan: &NodePlan, peer: u8| plan.device.peers[&key(peer).public_key()].persistent_keepalive;
        let mut natted = node("n", 1);
        natted.spec.persistent_keepalive = Some(25);
        natted.status.as_mut().unwrap().peer.as_mut().unwrap().persistent_keepalive = Some(25);
        let mut short = node("s", 3);
        short.status.as_mut().unwrap().peer.as_mut().unwrap().persistent_keepalive = Some(10);
        let dir = directory(&[natted, node("o", 2), short], &[]);
        // The NATed node: its own interval towards every peer, a peer's shorter one kept.
        let own = plan_of(&dir, "n", 1, &settings());
        assert_eq!(keepalive(&own, 2), Some(25));
        assert_eq!(keepalive(&own, 3), Some(10));
        // An open node: the NATed peer's interval towards it, nothing towards the other.
        let open = plan_of(&dir, "o", 2, &settings());
        assert_eq!(keepalive(&open, 1), Some(25));
        assert_eq!(keepalive(&open, 3), Some(10));
        // 0, unset or out of range: off, the peers' own intervals as published.
        for spec in [None, Some(0), Some(-1), Some(70_000)] {
            let mut n = node("n", 1);
            n.spec.persistent_keepalive = spec;
            let plan = plan_of(&directory(&[n, node("o", 2)], &[]), "n", 1, &settings());
            assert_eq!(keepalive(&plan, 2), None, "spec {spec:?}");
        }
    }

    #[test]
    fn two_nodes_without_a_direct_path_go_through_the_relay_and_the_relay_forwards() {
        let mut relay = node("relay", 1);
        relay.spec.relay = Some(true);
        let mut laptop = node("laptop", 4);
        laptop.metadata.annotations =
            Some([(mesh_api::CONNECT_OWNER_ANNOTATION.to_owned(), "alice".to_owned())].into());
        let dir = directory(&[relay, node("nat-1", 2), node("nat-3", 3), laptop], &[]);
        let settings = settings();
        let no_direct: BTreeSet<String> = ["nat-3".to_owned(), "laptop".to_owned()].into();

        let plan = plan_without_direct(&dir, "nat-1", 2, &settings, &no_direct);
        assert_eq!(plan.paths.relayed, [("nat-3".to_owned(), "relay".to_owned())].into());
        assert!(plan.paths.stranded.is_empty(), "{:?}", plan.paths);
        assert_eq!(ips(&plan, 1), ["10.42.0.1/32", "10.42.0.3/32"], "nat-3's address is accepted from the relay");
        assert!(ips(&plan, 3).is_empty(), "and from nat-3 directly no more");
        assert_eq!(ips(&plan, 4), ["10.42.0.4/32"], "an ephemeral member is never relayed");
        assert_eq!(plan.device.peers[&key(3).public_key()].persistent_keepalive, Some(relay::RELAYED_KEEPALIVE));
        assert_eq!(plan.applied, plan_of(&dir, "nat-1", 2, &settings).applied, "the digest is the directory's");
        let local = plan.local.unwrap();
        assert!(!local.link.forwarding && !local.ruleset.contains("relay"), "nat-1 is no relay");

        // The other end decides alike.
        let other = plan_without_direct(&dir, "nat-3", 3, &settings, &["nat-1".to_owned()].into());
        assert_eq!(other.paths.relayed, [("nat-1".to_owned(), "relay".to_owned())].into());

        // The relay's own device is unchanged; it forwards between its peers.
        let relay_plan = plan_of(&dir, "relay", 1, &settings);
        assert_eq!(ips(&relay_plan, 3), ["10.42.0.3/32"]);
        let local = relay_plan.local.unwrap();
        assert!(local.link.forwarding);
        assert!(
            local.ruleset.contains(
                "iifname \"wg-harness\" oifname \"wg-harness\" ip saddr 10.42.0.0/16 ip daddr 10.42.0.0/16 accept"
            ),
            "{}",
            local.ruleset
        );

        // Without a relay, the plan says why.
        let dir = directory(&[node("nat-1", 2), node("nat-3", 3)], &[]);
        let plan = plan_without_direct(&dir, "nat-1", 2, &settings, &no_direct);
        assert!(plan.paths.relayed.is_empty() && plan.paths.stranded["nat-3"].contains("no member is a relay"));
        assert_eq!(ips(&plan, 3), ["10.42.0.3/32"], "no relay: the direct entry stays");
    }

    #[test]
    fn an_ephemeral_member_is_a_peer_but_not_a_probe_target() {
        let mut laptop = node("laptop", 2);
        laptop.metadata.annotations =
            Some([(mesh_api::CONNECT_OWNER_ANNOTATION.to_owned(), "alice".to_owned())].into());
        let nodes = [node("a", 1), laptop, node("c", 3)];
        let plan = plan_of(&directory(&nodes, &[]), "a", 1, &settings());
        assert!(plan.device.peers.contains_key(&key(2).public_key()), "the laptop is a peer");
        assert_eq!(plan.probe_targets.keys().collect::<Vec<_>>(), ["c"], "only the permanent node is probed");
    }

    #[test]
    fn every_other_node_is_a_peer_less_own_and_duplicate_keys() {
        let mut copied = node("copy", 4);
        copied.status.as_mut().unwrap().peer.as_mut().unwrap().public_key = key(1).public_key().to_base64();
        let mut twin = node("twin", 5);
        twin.status.as_mut().unwrap().peer.as_mut().unwrap().public_key = key(3).public_key().to_base64();
        let nodes = [node("a", 1), node("b", 2), node("c", 3), copied, twin];
        let dir = directory(&nodes, &[]);
        let plan = plan_of(&dir, "a", 1, &settings());
        assert_eq!(plan.device.peers.keys().copied().collect::<Vec<_>>(), vec![key(2).public_key()]);
        assert_eq!(plan.names[&key(2).public_key()], "b");
        let mut skipped: Vec<&str> = plan.skipped.iter().map(|s| s.node.as_str()).collect();
        skipped.sort_unstable();
        assert_eq!(skipped, ["c", "copy", "twin"]);
        assert!(plan.skipped.iter().any(|s| s.node == "copy" && s.why.contains("own public key")));
        assert!(plan.skipped.iter().any(|s| s.node == "c" && s.why.contains("c, twin")));
        assert_eq!(plan.probe_targets, BTreeMap::from([("b".to_owned(), Ipv4Addr::new(10, 42, 0, 2))]));
        assert_eq!(plan.device.listen_port, 51820);
        assert_eq!(plan.endpoint.as_deref(), Some("192.168.77.1:51820"));
    }

    #[test]
    fn allowed_ips_outside_the_subnet_are_dropped_and_the_rest_applied() {
        let mut wide = node("b", 2);
        wide.status.as_mut().unwrap().peer.as_mut().unwrap().allowed_ips =
            vec!["10.42.0.2/32".into(), "0.0.0.0/0".into(), "10.43.0.1/32".into()];
        let dir = directory(&[node("a", 1), wide], &[]);
        let dropped: Vec<&str> = dir.dropped.iter().map(|d| d.allowed_ip.as_str()).collect();
        assert_eq!(dropped, ["0.0.0.0/0", "10.43.0.1/32"]);
        assert!(dir.dropped[1].why.contains("outside the mesh subnet"), "{:?}", dir.dropped);
        assert_eq!(ips(&plan_of(&dir, "a", 1, &settings()), 2), ["10.42.0.2/32"]);
    }

    #[test]
    fn a_node_hosts_its_placements_and_refuses_those_out_of_bounds() {
        let mut pod = service("web", "pod", "a", "10.42.1.2");
        pod.status.as_mut().unwrap().pod_ip = Some("169.254.169.254".into());
        let services = [
            service("web", "api", "a", "10.42.1.1"),
            pod,
            service("web", "outside", "a", "192.168.1.1"),
            service("web", "elsewhere", "b", "10.42.1.3"),
        ];
        let dir = directory(&[node("a", 1), node("b", 2)], &services);
        let plan = plan_of(&dir, "a", 1, &settings());
        let local = plan.local.as_ref().unwrap();
        let hosted: Vec<String> = local.hosted.iter().map(|h| h.ip.to_string()).collect();
        assert_eq!(hosted, ["10.42.1.1"]);
        let refused: Vec<&str> = local.refused.iter().map(|r| r.service.as_str()).collect();
        assert_eq!(refused, ["web/pod", "web/outside"]);
        assert_eq!(local.link.node_ip, Ipv4Addr::new(10, 42, 0, 1));
        assert_eq!(local.link.service_ips, BTreeSet::from([Ipv4Addr::new(10, 42, 1, 1)]));
        assert_eq!(plan.dns_listen, [Ipv4Addr::new(10, 42, 0, 1)]);
        // The ruleset is firewall::render of the hosted services with the member and no NAT.
        assert!(local.ruleset.contains("10.42.1.1") && !local.ruleset.contains("10.42.1.3"));
        assert!(!local.ruleset.contains("snat"), "no source NAT unless asked");
        // b routes a's service to a.
        let b = plan_of(&dir, "b", 2, &settings());
        assert_eq!(b.local.as_ref().unwrap().hosted.len(), 1);
        assert_eq!(ips(&b, 1), ["10.42.0.1/32"], "the controller, not the agent, adds service IPs to entries");
    }

    #[test]
    fn masquerading_and_exposed_ports_reach_the_ruleset() {
        let dir = directory(&[node("a", 1)], &[]);
        let settings = NodeSettings { expose_ports: BTreeSet::from([2222]), ..settings() };
        let key = key(1);
        let input = NodeInput {
            name: "a",
            key: &key,
            settings: &settings,
            fallback: false,
            underlay: None,
            masquerade_underlay: Some("eth0"),
            without_direct: &std::collections::BTreeSet::new(),
            containers: &std::collections::BTreeMap::new(),
        };
        let ruleset = dir.plan(&input).unwrap().local.unwrap().ruleset;
        assert!(ruleset.contains("snat ip to 10.42.0.1") && ruleset.contains("iifname != \"eth0\""), "{ruleset}");
        assert!(ruleset.contains("2222"), "{ruleset}");
    }

    #[test]
    fn the_zone_is_the_directorys() {
        let services = [service("web", "api", "a", "10.42.1.1"), service("default", "db", "b", "10.42.1.2")];
        let dir = directory(&[node("a", 1), node("b", 2)], &services);
        assert_eq!(dir.zone.records["api.web.mesh.local"], [Ipv4Addr::new(10, 42, 1, 1)]);
        assert_eq!(dir.zone.records["db.mesh.local"], [Ipv4Addr::new(10, 42, 1, 2)]);
        assert_eq!(dir.zone.records["a.node.mesh.local"], [Ipv4Addr::new(10, 42, 0, 1)]);
        let only_default = Directory::build(
            &[node("a", 1), node("b", 2)],
            &services,
            None,
            &ShortNames::default(),
            convert::literal_endpoint,
        );
        assert!(!only_default.zone.records.contains_key("api.mesh.local"));
        assert!(only_default.zone.records.contains_key("db.mesh.local"));
    }

    #[test]
    fn the_digest_is_what_a_reader_of_the_directory_computes() {
        let nodes = [node("a", 1), node("b", 2), node("c", 3)];
        let dir = directory(&nodes, &[]);
        let plan = plan_of(&dir, "a", 1, &settings());
        let applied = plan.applied.clone().unwrap();
        assert_eq!(applied.count, 2);
        // meshctl: no subnet, the key as published.
        let reader = Directory::build(&nodes, &[], None, &ShortNames::Every, convert::literal_endpoint);
        assert_eq!(Directory::applied(&reader.peers("a", Some(&key(1).public_key()))), applied);
        // Another peer set, another digest.
        let fewer = directory(&nodes[..2], &[]);
        assert_ne!(plan_of(&fewer, "a", 1, &settings()).applied.unwrap().digest, applied.digest);
    }

    #[test]
    fn without_a_mesh_ip_the_peers_are_planned_but_nothing_is_hosted() {
        let mut a = node("a", 1);
        a.status.as_mut().unwrap().mesh_ip = None;
        let dir = directory(&[a, node("b", 2)], &[service("web", "api", "a", "10.42.1.1")]);
        let plan = plan_of(&dir, "a", 1, &settings());
        assert_eq!(plan.device.peers.len(), 1);
        assert!(plan.local.unwrap_err().contains("no mesh IP yet"));
        assert!(plan.dns_listen.is_empty());
        let key = key(9);
        let settings = settings();
        let input = NodeInput {
            name: "gone",
            key: &key,
            settings: &settings,
            fallback: false,
            underlay: None,
            masquerade_underlay: None,
            without_direct: &std::collections::BTreeSet::new(),
            containers: &std::collections::BTreeMap::new(),
        };
        assert!(dir.plan(&input).unwrap_err().to_string().contains("MeshNode gone does not exist"));
    }

    #[test]
    fn in_fallback_only_dns_on_the_underlay_is_planned() {
        let dir = directory(&[node("a", 1), node("b", 2)], &[]);
        let key = key(1);
        let settings = settings();
        let input = NodeInput {
            name: "a",
            key: &key,
            settings: &settings,
            fallback: true,
            underlay: None,
            masquerade_underlay: None,
            without_direct: &std::collections::BTreeSet::new(),
            containers: &std::collections::BTreeMap::new(),
        };
        let plan = dir.plan(&input).unwrap();
        assert!(plan.fallback && plan.device.peers.is_empty() && plan.applied.is_none() && plan.local.is_err());
        assert_eq!(plan.dns_listen, [Ipv4Addr::new(192, 168, 77, 1)]);
        assert_eq!(plan.endpoint, None);
    }

    #[test]
    fn placements_are_indexed_by_node() {
        let services: Vec<MeshService> = (0..50u8)
            .map(|i| service("web", &format!("s{i}"), if i % 2 == 0 { "a" } else { "b" }, &format!("10.42.1.{i}")))
            .collect();
        let dir = directory(&[node("a", 1), node("b", 2)], &services);
        assert_eq!(dir.placements_on("a").len(), 25);
        assert_eq!(dir.placements_on("nobody").len(), 0);
        assert!(dir.placements_on("a").iter().all(|p| p.node.as_deref() == Some("a") && p.exposure == Exposure::Mesh));
    }
}
