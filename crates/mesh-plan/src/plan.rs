//! The plan: [`Directory`] is what every node reading one state of the directory derives alike
//! (peer entries confined to the mesh subnet, placements indexed by node, node addresses, the
//! DNS zone); [`Directory::plan`] adds one node's identity and settings and gives its
//! [`NodePlan`]. The agent keeps one across syncs and brings it up to date with the objects its
//! watches reported ([`Directory::update_changed`]), or with every object after a relist
//! ([`Directory::update`]); each simulator group keeps one for its hundred-odd nodes.
//!
//! Cost: building is linear in the objects; an update converts only the objects that changed
//! (a lookup for each of the others); a node's plan is `O(p log p)` in the peers plus its own
//! placements (they are indexed by node, never scanned per node).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;
use mesh_api::{AppliedPeers, MeshNode, MeshService};
use mesh_dataplane::desired::{self, Bounds, Dropped, Hosted, Peers, Placement, Refused, Skipped};
use mesh_dataplane::dns::{ShortNames, Zone, ZoneIndex};
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
///
/// Kept across changes: [`Directory::update`] brings it to the state of every object of a
/// new snapshot, converting again only the objects whose `resourceVersion` changed (and the
/// nodes whose endpoint name resolves to another address), so that an agent's sync after one
/// change costs a lookup per unchanged object rather than a conversion. [`Directory::build`]
/// is one update from empty. The fields are read-only views, kept by `update`.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    /// Every node, by name.
    pub members: HashMap<String, Member>,
    /// Allowed IPs dropped from the entries (not a /32 inside the subnet), by node name.
    pub dropped: Vec<Dropped>,
    /// Every node's peer entry (endpoint resolved, allowed IPs confined to the mesh subnet),
    /// parsed once for every node's [`Directory::peers`], by node name.
    pub prepared: desired::Prepared,
    /// Every service's placement, by the node it is placed on (unplaced ones under ""), each
    /// node's by `namespace/name`.
    pub placements: HashMap<String, Vec<Placement>>,
    /// Every node's mesh IP and underlay address.
    pub node_addresses: BTreeSet<Ipv4Addr>,
    /// Every node's mesh IP, by name.
    pub node_ips: HashMap<String, Ipv4Addr>,
    /// The DNS zone every agent serves.
    zone: ZoneIndex,
    /// Allowed IPs outside it are dropped (`None`: kept).
    subnet: Option<Ipv4Net>,
    /// What each node contributed, by name.
    nodes: HashMap<String, NodeState>,
    /// What each service contributed, by namespace, then name (looked up without making the
    /// `namespace/name` key of each of 50,000 services on every update).
    services: HashMap<String, HashMap<String, ServiceState>>,
    /// How many services `services` holds.
    service_count: usize,
    /// How many nodes have each address of `node_addresses`.
    address_counts: HashMap<Ipv4Addr, usize>,
    /// Counts updates: marks the objects each one saw.
    generation: u64,
}

/// An object's `metadata.resourceVersion` as last converted: the same version is the same
/// object. The API server's versions are decimal numbers, kept inline (comparing 50,000 of them
/// per update then reads no further memory); others are kept as text.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Version {
    /// None: the object is converted on every update.
    Unknown,
    Number(u64),
    Text(String),
}

impl Version {
    fn of(version: Option<&str>) -> Self {
        match version {
            None => Self::Unknown,
            Some(text) => Self::number(text).map_or_else(|| Self::Text(text.to_owned()), Self::Number),
        }
    }

    /// The number `text` writes in canonical decimal (no sign, no leading zero), if it does:
    /// one number, one text.
    fn number(text: &str) -> Option<u64> {
        let canonical = text.bytes().all(|b| b.is_ascii_digit()) && (text.len() == 1 || !text.starts_with('0'));
        canonical.then(|| text.parse().ok()).flatten()
    }

    /// Whether `version` is this one (never when unknown).
    fn is(&self, version: Option<&str>) -> bool {
        match (self, version) {
            (Self::Unknown, _) | (_, None) => false,
            (Self::Number(n), Some(text)) => Self::number(text) == Some(*n),
            (Self::Text(t), Some(text)) => t == text,
        }
    }
}

/// One node as the directory last converted it.
#[derive(Clone, Debug)]
struct NodeState {
    /// `metadata.resourceVersion`: the same version is the same object (none: always converted).
    version: Version,
    /// The last update that saw it.
    seen: u64,
    /// What its endpoint text resolved to (resolution may change with the object unchanged).
    resolved: Option<SocketAddr>,
    /// Its endpoint is a name, not an address: resolved anew on every update
    /// ([`Directory::named_endpoints`]).
    named: bool,
    /// Its peer entry, parsed.
    prepared: Option<desired::PreparedEntry>,
    dropped: Vec<Dropped>,
    addresses: [Option<Ipv4Addr>; 2],
}

/// A service's namespace (empty if none, as in [`convert::service_key`]).
fn namespace_of(service: &MeshService) -> &str {
    service.metadata.namespace.as_deref().unwrap_or_default()
}

/// One service as the directory last converted it.
#[derive(Clone, Debug)]
struct ServiceState {
    version: Version,
    seen: u64,
    /// The key of `placements` its placement is under.
    placed_on: String,
}

/// What one [`Directory::update`] converted again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Updated {
    /// Nodes added, changed or removed.
    pub nodes: usize,
    /// Services added, changed or removed.
    pub services: usize,
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
    /// An empty directory: allowed IPs outside `subnet` are dropped (`None`: kept, for a reader
    /// that does not know the subnet); services in the namespaces `short_names` allows get
    /// short names.
    pub fn new(subnet: Option<Ipv4Net>, short_names: &ShortNames) -> Self {
        Self { subnet, zone: ZoneIndex::new(short_names.clone()), ..Self::default() }
    }

    /// Derives everything from one state of the directory (see [`Directory::new`] and
    /// [`Directory::update`]).
    pub fn build<'a>(
        nodes: impl IntoIterator<Item = &'a MeshNode>,
        services: impl IntoIterator<Item = &'a MeshService>,
        subnet: Option<Ipv4Net>,
        short_names: &ShortNames,
        resolve: impl FnMut(&str, &str) -> Option<SocketAddr>,
    ) -> Self {
        let mut out = Self::new(subnet, short_names);
        out.update(nodes, services, resolve);
        out
    }

    /// Brings the directory to one new state: `nodes` and `services` are every object of it
    /// (those missing are removed); `resolve` gives the address of a peer's endpoint text (see
    /// [`convert::literal_endpoint`]) and is asked again for every node, since a name may
    /// resolve to another address while the object stays the same.
    ///
    /// Cost: a lookup per object, a conversion per object that changed (by
    /// `metadata.resourceVersion`; objects without one are always converted), and, when a
    /// node changed, the peer entries' indexes sorted again (`O(n log n)` in the nodes, no
    /// parsing). The result equals a directory built afresh from the same objects.
    pub fn update<'a>(
        &mut self,
        nodes: impl IntoIterator<Item = &'a MeshNode>,
        services: impl IntoIterator<Item = &'a MeshService>,
        mut resolve: impl FnMut(&str, &str) -> Option<SocketAddr>,
    ) -> Updated {
        self.generation += 1;
        let nodes = self.every_node(nodes, &mut resolve);
        let services = self.every_service(services);
        self.finish(Updated { nodes, services })
    }

    /// [`Directory::update`] of the nodes alone: `nodes` are every node (those missing are
    /// removed); the services stay as they are. For a reader that is given every service's
    /// change as it happens ([`Directory::update_changed`]) and keeps only the nodes in a cache.
    pub fn update_nodes<'a>(
        &mut self,
        nodes: impl IntoIterator<Item = &'a MeshNode>,
        mut resolve: impl FnMut(&str, &str) -> Option<SocketAddr>,
    ) -> Updated {
        self.generation += 1;
        let nodes = self.every_node(nodes, &mut resolve);
        self.finish(Updated { nodes, services: 0 })
    }

    /// Every service, by namespace and name (after a re-list, those it lacks are gone).
    pub fn service_keys(&self) -> impl Iterator<Item = (&str, &str)> {
        self.services.iter().flat_map(|(ns, names)| names.keys().map(move |name| (ns.as_str(), name.as_str())))
    }

    /// The node half of an update (generation `self.generation`): `nodes` are every node.
    /// Returns how many were added, changed or removed.
    fn every_node<'a>(
        &mut self,
        nodes: impl IntoIterator<Item = &'a MeshNode>,
        resolve: &mut impl FnMut(&str, &str) -> Option<SocketAddr>,
    ) -> usize {
        let generation = self.generation;
        let mut changed = 0;
        let mut seen = 0;
        for node in nodes {
            match self.nodes.get_mut(convert::name(node)) {
                Some(state) if state.seen == generation => {}
                Some(state) => {
                    seen += 1;
                    state.seen = generation;
                }
                None => seen += 1,
            }
            changed += usize::from(self.refresh_node(node, resolve, generation));
        }
        if seen < self.nodes.len() {
            let gone: Vec<String> =
                self.nodes.iter().filter(|(_, s)| s.seen != generation).map(|(n, _)| n.clone()).collect();
            for name in gone {
                self.remove_node(&name);
                changed += 1;
            }
        }
        changed
    }

    /// The service half of an update (generation `self.generation`): `services` are every
    /// service. Returns how many were added, changed or removed.
    fn every_service<'a>(&mut self, services: impl IntoIterator<Item = &'a MeshService>) -> usize {
        let generation = self.generation;
        let mut changed = 0;
        let mut seen = 0;
        for service in services {
            let (namespace, name) = (namespace_of(service), convert::service_name(service));
            match self.services.get_mut(namespace).and_then(|names| names.get_mut(name)) {
                Some(state) if state.seen == generation => {}
                Some(state) => {
                    seen += 1;
                    state.seen = generation;
                }
                None => seen += 1,
            }
            changed += usize::from(self.refresh_service(service, generation));
        }
        if seen < self.service_count {
            let gone: Vec<(String, String)> = self
                .services
                .iter()
                .flat_map(|(ns, names)| names.iter().map(move |(name, s)| (ns, name, s)))
                .filter(|(_, _, s)| s.seen != generation)
                .map(|(ns, name, _)| (ns.clone(), name.clone()))
                .collect();
            for (namespace, name) in gone {
                self.remove_service(&namespace, &name);
                changed += 1;
            }
        }
        changed
    }

    /// Brings the directory to a new state from the objects a watch reported changed since the
    /// last update, each with its state now (`None`: deleted); everything else is as it was.
    /// The nodes of [`Directory::named_endpoints`] must be among `nodes` (changed or not): their
    /// names are resolved anew. Passing an unchanged object (the same `resourceVersion`, its
    /// name resolving to the same address) costs a lookup.
    ///
    /// Cost: a conversion per object passed, and, when a node changed, the peer entries'
    /// indexes sorted again. Nothing is scanned: an agent's sync after one change at 50,000
    /// services costs what the change touches. The result equals [`Directory::update`] with
    /// every object (and so a directory built afresh) as long as no change was left out.
    pub fn update_changed<'a>(
        &mut self,
        nodes: impl IntoIterator<Item = (&'a str, Option<&'a MeshNode>)>,
        services: impl IntoIterator<Item = (&'a str, &'a str, Option<&'a MeshService>)>,
        mut resolve: impl FnMut(&str, &str) -> Option<SocketAddr>,
    ) -> Updated {
        let generation = self.generation;
        let mut updated = Updated::default();
        for (name, node) in nodes {
            let Some(node) = node else {
                if self.nodes.contains_key(name) {
                    self.remove_node(name);
                    updated.nodes += 1;
                }
                continue;
            };
            updated.nodes += usize::from(self.refresh_node(node, &mut resolve, generation));
        }
        for (namespace, name, service) in services {
            match service {
                Some(service) => updated.services += usize::from(self.refresh_service(service, generation)),
                None => {
                    if self.services.get(namespace).is_some_and(|names| names.contains_key(name)) {
                        self.remove_service(namespace, name);
                        updated.services += 1;
                    }
                }
            }
        }
        self.finish(updated)
    }

    /// The nodes whose endpoint is a name rather than an address: a name may resolve to another
    /// address while the object stays the same, so [`Directory::update_changed`] must be given
    /// them on every update.
    pub fn named_endpoints(&self) -> impl Iterator<Item = &str> {
        self.nodes.iter().filter(|(_, state)| state.named).map(|(name, _)| name.as_str())
    }

    /// Whether the directory was never updated (a new one): the first update must be given
    /// every object ([`Directory::update`]).
    pub fn is_new(&self) -> bool {
        self.generation == 0
    }

    /// After a batch of changes: the peer entries' indexes when a node changed, and the zone's
    /// lists of withheld names.
    fn finish(&mut self, updated: Updated) -> Updated {
        if updated.nodes > 0 {
            let mut names: Vec<&String> = self.nodes.keys().collect();
            names.sort_unstable();
            let states: Vec<&NodeState> = names.iter().map(|n| &self.nodes[*n]).collect();
            self.prepared = desired::prepare_from(states.iter().filter_map(|s| s.prepared.clone()).collect());
            self.dropped = states.iter().flat_map(|s| s.dropped.iter().cloned()).collect();
        }
        self.zone.finish();
        updated
    }

    /// The DNS zone every agent serves.
    pub fn zone(&self) -> &Zone {
        self.zone.zone()
    }

    /// The revision of the zone's records (see `ZoneIndex::revision`): unchanged, the records
    /// are the same.
    pub fn zone_revision(&self) -> u64 {
        self.zone.revision()
    }

    /// Converts `node` again unless it is the version last converted and its endpoint resolves
    /// as it did then; returns whether it converted.
    fn refresh_node(
        &mut self,
        node: &MeshNode,
        resolve: &mut impl FnMut(&str, &str) -> Option<SocketAddr>,
        generation: u64,
    ) -> bool {
        let name = convert::name(node);
        let resolved = convert::endpoint_text(node).and_then(|text| resolve(name, text));
        let version = node.metadata.resource_version.as_deref();
        if self.nodes.get(name).is_some_and(|state| state.version.is(version) && state.resolved == resolved) {
            return false;
        }
        self.set_node(node, resolved, generation);
        true
    }

    /// Converts `service` again unless it is the version last converted; returns whether it
    /// converted.
    fn refresh_service(&mut self, service: &MeshService, generation: u64) -> bool {
        let version = service.metadata.resource_version.as_deref();
        let (namespace, name) = (namespace_of(service), convert::service_name(service));
        if self.services.get(namespace).and_then(|names| names.get(name)).is_some_and(|s| s.version.is(version)) {
            return false;
        }
        self.set_service(service, generation);
        true
    }

    /// Converts node `node` (its endpoint resolved to `resolved`), replacing what it was.
    fn set_node(&mut self, node: &MeshNode, resolved: Option<SocketAddr>, generation: u64) {
        let name = convert::name(node);
        let addresses = convert::node_addresses_of(node);
        let [mesh_ip, underlay] = addresses;
        let member = Member {
            listen_port: u16::try_from(node.spec.listen_port).unwrap_or(mesh_api::DEFAULT_LISTEN_PORT as u16),
            spec_endpoint: node.spec.endpoint.clone(),
            persistent_keepalive: node.spec.persistent_keepalive.and_then(|k| u16::try_from(k).ok()).filter(|k| *k > 0),
            mesh_ip,
            underlay,
            ephemeral: node
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(mesh_api::CONNECT_OWNER_ANNOTATION)),
            relay: node.spec.relay.unwrap_or(false),
        };
        let entry = convert::peer_entry(node, &mut |_, _| resolved);
        let (entry, dropped) = match (entry, self.subnet) {
            (Some(entry), Some(subnet)) => {
                let (mut entries, dropped) = desired::confine_allowed_ips(subnet, vec![entry]);
                (entries.pop(), dropped)
            }
            (entry, _) => (entry, Vec::new()),
        };
        let state = NodeState {
            version: Version::of(node.metadata.resource_version.as_deref()),
            seen: generation,
            resolved,
            named: convert::endpoint_text(node).is_some_and(|text| convert::literal_endpoint(name, text).is_none()),
            prepared: entry.as_ref().map(desired::prepare_entry),
            dropped,
            addresses,
        };
        if let Some(old) = self.nodes.insert(name.to_owned(), state) {
            self.forget_addresses(old.addresses);
        }
        for ip in addresses.into_iter().flatten() {
            *self.address_counts.entry(ip).or_default() += 1;
            self.node_addresses.insert(ip);
        }
        match mesh_ip {
            Some(ip) => self.node_ips.insert(name.to_owned(), ip),
            None => self.node_ips.remove(name),
        };
        self.members.insert(name.to_owned(), member);
        self.zone.set_node(convert::dns_node(node));
    }

    fn remove_node(&mut self, name: &str) {
        if let Some(old) = self.nodes.remove(name) {
            self.forget_addresses(old.addresses);
        }
        self.node_ips.remove(name);
        self.members.remove(name);
        self.zone.remove_node(name);
    }

    fn forget_addresses(&mut self, addresses: [Option<Ipv4Addr>; 2]) {
        for ip in addresses.into_iter().flatten() {
            if let Some(count) = self.address_counts.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    self.address_counts.remove(&ip);
                    self.node_addresses.remove(&ip);
                }
            }
        }
    }

    /// Converts service `service`, replacing what it was.
    fn set_service(&mut self, service: &MeshService, generation: u64) {
        let (namespace, name) = (namespace_of(service), convert::service_name(service));
        let placement = convert::placement(service);
        let key = placement.service.clone();
        let placed_on = placement.node.clone().unwrap_or_default();
        if let Some(old) = self.services.get(namespace).and_then(|names| names.get(name)) {
            let old_node = old.placed_on.clone();
            self.unplace(&old_node, &key);
        }
        let list = self.placements.entry(placed_on.clone()).or_default();
        let at = list.partition_point(|p| p.service < key);
        list.insert(at, placement);
        self.zone.set_service(convert::dns_service(service));
        let state = ServiceState {
            version: Version::of(service.metadata.resource_version.as_deref()),
            seen: generation,
            placed_on,
        };
        if self.services.entry(namespace.to_owned()).or_default().insert(name.to_owned(), state).is_none() {
            self.service_count += 1;
        }
    }

    fn remove_service(&mut self, namespace: &str, name: &str) {
        let Some(names) = self.services.get_mut(namespace) else { return };
        let Some(old) = names.remove(name) else { return };
        if names.is_empty() {
            self.services.remove(namespace);
        }
        self.service_count -= 1;
        self.unplace(&old.placed_on, &format!("{namespace}/{name}"));
        self.zone.remove_service(namespace, name);
    }

    /// Removes the placement of service `key` from those on `node`.
    fn unplace(&mut self, node: &str, key: &str) {
        if let Some(list) = self.placements.get_mut(node) {
            if let Ok(at) = list.binary_search_by(|p| p.service.as_str().cmp(key)) {
                list.remove(at);
            }
            if list.is_empty() {
                self.placements.remove(node);
            }
        }
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
        // A set of the peers' names, not a scan of them per candidate: a node that reaches none
        // of 5,000 peers directly made that 12.5 million string compares per plan.
        let applied: HashSet<&str> = peers.names.values().map(String::as_str).collect();
        let candidates: BTreeSet<String> = without_direct
            .iter()
            .filter(|n| applied.contains(n.as_str()))
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
        assert_eq!(refused, ["web/outside", "web/pod"], "by namespace/name");
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
        assert_eq!(dir.zone().records["api.web.mesh.local"], [Ipv4Addr::new(10, 42, 1, 1)]);
        assert_eq!(dir.zone().records["db.mesh.local"], [Ipv4Addr::new(10, 42, 1, 2)]);
        assert_eq!(dir.zone().records["a.node.mesh.local"], [Ipv4Addr::new(10, 42, 0, 1)]);
        let only_default = Directory::build(
            &[node("a", 1), node("b", 2)],
            &services,
            None,
            &ShortNames::default(),
            convert::literal_endpoint,
        );
        assert!(!only_default.zone().records.contains_key("api.mesh.local"));
        assert!(only_default.zone().records.contains_key("db.mesh.local"));
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

    /// A directory built afresh from `nodes` and `services` by the conversions themselves, one
    /// pass, in name order: what [`Directory::update`] must keep.
    fn afresh(
        nodes: &[MeshNode],
        services: &[MeshService],
        subnet: Option<Ipv4Net>,
        short: &ShortNames,
        resolve: impl Fn(&str, &str) -> Option<SocketAddr>,
    ) -> Fresh {
        let mut nodes: Vec<&MeshNode> = nodes.iter().collect();
        nodes.sort_by_key(|n| convert::name(n));
        let mut services: Vec<&MeshService> = services.iter().collect();
        services.sort_by_key(|s| convert::service_key(s));
        let entries = convert::peer_entries(nodes.iter().copied(), resolve);
        let (entries, dropped) = match subnet {
            Some(subnet) => desired::confine_allowed_ips(subnet, entries),
            None => (entries, Vec::new()),
        };
        let mut placements: HashMap<String, Vec<Placement>> = HashMap::new();
        for s in &services {
            let p = convert::placement(s);
            placements.entry(p.node.clone().unwrap_or_default()).or_default().push(p);
        }
        let (dns_nodes, dns_services) = convert::dns_inputs(nodes.iter().copied(), services.iter().copied());
        Fresh {
            members: nodes.iter().map(|n| (convert::name(n).to_owned(), member_of(n))).collect(),
            dropped,
            prepared: desired::prepare(&entries),
            placements,
            node_addresses: convert::node_addresses(nodes.iter().copied()),
            node_ips: convert::node_ips(nodes.iter().copied()).into_iter().collect(),
            zone: mesh_dataplane::dns::zone_with(&dns_nodes, &dns_services, short),
        }
    }

    /// What a directory derives, to compare.
    #[derive(Debug, PartialEq)]
    struct Fresh {
        members: HashMap<String, Member>,
        dropped: Vec<Dropped>,
        prepared: desired::Prepared,
        placements: HashMap<String, Vec<Placement>>,
        node_addresses: BTreeSet<Ipv4Addr>,
        node_ips: HashMap<String, Ipv4Addr>,
        zone: Zone,
    }

    fn derived(dir: &Directory) -> Fresh {
        Fresh {
            members: dir.members.clone(),
            dropped: dir.dropped.clone(),
            prepared: dir.prepared.clone(),
            placements: dir.placements.clone(),
            node_addresses: dir.node_addresses.clone(),
            node_ips: dir.node_ips.clone(),
            zone: dir.zone().clone(),
        }
    }

    fn member_of(node: &MeshNode) -> Member {
        Directory::build([node], [], None, &ShortNames::Every, convert::literal_endpoint).members[convert::name(node)]
            .clone()
    }

    /// Literal endpoints, and the names `*.odd:51820`: to nothing at `epoch` 0 (still being
    /// resolved), else to 192.0.2.`epoch` (a resolver's answer changes with the objects unchanged).
    fn resolver(epoch: u8) -> impl Fn(&str, &str) -> Option<SocketAddr> {
        move |node, endpoint| match endpoint.strip_suffix(".odd:51820") {
            Some(_) => (epoch > 0).then(|| SocketAddr::from(([192, 0, 2, epoch], 51820))),
            None => convert::literal_endpoint(node, endpoint),
        }
    }

    /// One change to the objects: a node or service added or replaced (a new version), or
    /// removed, by index into a small set of names so that changes meet.
    #[derive(Clone, Debug)]
    enum Change {
        Node {
            at: u8,
            key: u8,
            ip: u8,
            endpoint: u8,
            wide: bool,
            fallback: bool,
            relay: bool,
        },
        RemoveNode(u8),
        Service {
            at: u8,
            ns: u8,
            node: Option<u8>,
            ip: u8,
            host: bool,
        },
        RemoveService(u8, u8),
        /// The same objects again, with new versions and nothing changed.
        Touch,
        /// The endpoint names resolve to another address (or none).
        Resolve(u8),
    }

    fn change() -> impl proptest::strategy::Strategy<Value = Change> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0u8..6, 1u8..5, 0u8..4, 0u8..3, any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
                |(at, key, ip, endpoint, wide, fallback, relay)| Change::Node { at, key, ip, endpoint, wide, fallback, relay }
            ),
            1 => (0u8..6).prop_map(Change::RemoveNode),
            5 => (0u8..8, 0u8..3, proptest::option::of(0u8..7), 0u8..4, any::<bool>())
                .prop_map(|(at, ns, node, ip, host)| Change::Service { at, ns, node, ip, host }),
            2 => (0u8..8, 0u8..3).prop_map(|(at, ns)| Change::RemoveService(at, ns)),
            1 => Just(Change::Touch),
            1 => (0u8..3).prop_map(Change::Resolve),
        ]
    }

    /// The objects after `change`; `version` numbers every object written.
    fn apply(
        change: &Change,
        nodes: &mut BTreeMap<String, MeshNode>,
        services: &mut BTreeMap<String, MeshService>,
        version: &mut u64,
    ) {
        let mut next = || {
            *version += 1;
            Some(version.to_string())
        };
        match *change {
            Change::Node { at, key, ip, endpoint, wide, fallback, relay } => {
                let name = format!("n{at}");
                let mut n = node(&name, key);
                let status = n.status.as_mut().unwrap();
                status.mesh_ip = Some(format!("10.42.0.{ip}"));
                let peer = status.peer.as_mut().unwrap();
                peer.endpoint = match endpoint {
                    0 => None,
                    1 => Some(format!("192.168.77.{ip}:51820")),
                    _ => Some(format!("{name}.odd:51820")),
                };
                if wide {
                    peer.allowed_ips.push("10.0.0.0/8".into());
                }
                if fallback {
                    status.backend = Some(Backend::None);
                }
                n.spec.relay = Some(relay);
                n.metadata.resource_version = next();
                nodes.insert(name, n);
            }
            Change::RemoveNode(at) => {
                nodes.remove(&format!("n{at}"));
            }
            Change::Service { at, ns, node, ip, host } => {
                let on = node.map(|i| format!("n{i}")).unwrap_or_default();
                let mut s = service(&format!("ns{ns}"), &format!("s{at}"), &on, &format!("10.42.1.{ip}"));
                if node.is_none() {
                    s.status.as_mut().unwrap().node = None;
                }
                if host {
                    s.spec.network.type_ = NetworkType::Host;
                }
                s.metadata.resource_version = next();
                services.insert(convert::service_key(&s), s);
            }
            Change::RemoveService(at, ns) => {
                services.remove(&format!("ns{ns}/s{at}"));
            }
            Change::Resolve(_) => {}
            Change::Touch => {
                for n in nodes.values_mut() {
                    n.metadata.resource_version = next();
                }
                for s in services.values_mut() {
                    s.metadata.resource_version = next();
                }
            }
        }
    }

    /// The keys a watch reports after `before` became `after`: every object written anew (a new
    /// `resourceVersion`) or deleted.
    fn written<K>(
        before: &BTreeMap<String, K>,
        after: &BTreeMap<String, K>,
        version: impl Fn(&K) -> Option<String>,
    ) -> BTreeSet<String> {
        let mut keys: BTreeSet<String> = before.keys().filter(|k| !after.contains_key(*k)).cloned().collect();
        keys.extend(
            after.iter().filter(|(k, o)| before.get(*k).map(&version) != Some(version(o))).map(|(k, _)| k.clone()),
        );
        keys
    }

    proptest::proptest! {
        /// A directory kept across changes ([`Directory::update`] after each) equals, after
        /// every change, the one the conversions give afresh from the objects there are then:
        /// members, dropped allowed IPs, prepared entries, placements, node addresses and IPs,
        /// and the zone; whatever order the objects come in.
        #[test]
        fn a_directory_kept_up_to_date_equals_the_directory_afresh(
            changes in proptest::collection::vec(change(), 1..30),
            subnet in proptest::bool::ANY,
            reverse in proptest::bool::ANY,
        ) {
            let subnet = subnet.then(|| "10.42.0.0/16".parse().unwrap());
            let short = ShortNames::Every;
            let mut kept = Directory::new(subnet, &short);
            let (mut nodes, mut services, mut version, mut epoch) = (BTreeMap::new(), BTreeMap::new(), 0, 1);
            for change in &changes {
                apply(change, &mut nodes, &mut services, &mut version);
                if let Change::Resolve(to) = change {
                    epoch = *to;
                }
                let mut ns: Vec<MeshNode> = nodes.values().cloned().collect();
                let mut ss: Vec<MeshService> = services.values().cloned().collect();
                if reverse {
                    ns.reverse();
                    ss.reverse();
                }
                let updated = kept.update(&ns, &ss, resolver(epoch));
                if matches!(change, Change::Touch) {
                    proptest::prop_assert_eq!(updated, Updated { nodes: ns.len(), services: ss.len() });
                }
                proptest::prop_assert_eq!(derived(&kept), afresh(&ns, &ss, subnet, &short, resolver(epoch)));
                // Again with nothing changed: nothing converted, the same result.
                proptest::prop_assert_eq!(kept.update(&ns, &ss, resolver(epoch)), Updated::default());
            }
            let ns: Vec<MeshNode> = nodes.values().cloned().collect();
            let ss: Vec<MeshService> = services.values().cloned().collect();
            let fresh = Directory::build(&ns, &ss, subnet, &short, resolver(epoch));
            proptest::prop_assert_eq!(derived(&kept), derived(&fresh));
        }

        /// A directory given only what a watch reports after each change (every object written
        /// anew or deleted, [`Directory::update_changed`]) and the nodes whose endpoint is a name
        /// equals, after every change, the one the conversions give afresh: what the agent does
        /// on each sync.
        #[test]
        fn a_directory_fed_only_the_changes_equals_the_directory_afresh(
            changes in proptest::collection::vec(change(), 1..30),
            subnet in proptest::bool::ANY,
        ) {
            let subnet = subnet.then(|| "10.42.0.0/16".parse().unwrap());
            let short = ShortNames::Every;
            let mut evented = Directory::new(subnet, &short);
            let (mut nodes, mut services, mut version, mut epoch) = (BTreeMap::new(), BTreeMap::new(), 0, 1);
            for change in &changes {
                let (nodes_before, services_before) = (nodes.clone(), services.clone());
                apply(change, &mut nodes, &mut services, &mut version);
                if let Change::Resolve(to) = change {
                    epoch = *to;
                }
                let mut node_keys = written(&nodes_before, &nodes, |n: &MeshNode| n.metadata.resource_version.clone());
                node_keys.extend(evented.named_endpoints().map(str::to_owned));
                let service_keys = written(&services_before, &services, |s: &MeshService| s.metadata.resource_version.clone());
                let split = |key: &String| key.split_once('/').map(|(ns, n)| (ns.to_owned(), n.to_owned())).unwrap();
                let service_keys: Vec<(String, String)> = service_keys.iter().map(split).collect();
                evented.update_changed(
                    node_keys.iter().map(|n| (n.as_str(), nodes.get(n))),
                    service_keys.iter().map(|(ns, n)| (ns.as_str(), n.as_str(), services.get(&format!("{ns}/{n}")))),
                    resolver(epoch),
                );
                let ns: Vec<MeshNode> = nodes.values().cloned().collect();
                let ss: Vec<MeshService> = services.values().cloned().collect();
                proptest::prop_assert_eq!(derived(&evented), afresh(&ns, &ss, subnet, &short, resolver(epoch)));
                // The next sync with no event: only the named endpoints, resolved as before.
                let named: Vec<String> = evented.named_endpoints().map(str::to_owned).collect();
                let again = evented.update_changed(named.iter().map(|n| (n.as_str(), nodes.get(n))), [], resolver(epoch));
                proptest::prop_assert_eq!(again, Updated::default());
            }
        }

        /// The agent's way: each service applied as its watch event arrives (or, after a
        /// re-list, every listed one, and those missing from the list removed), the nodes
        /// compared in full with their cache on each sync.
        #[test]
        fn a_directory_fed_service_events_and_every_node_equals_the_directory_afresh(
            changes in proptest::collection::vec(change(), 1..30),
            subnet in proptest::bool::ANY,
            relist in proptest::bool::ANY,
        ) {
            let (short, subnet) = (ShortNames::Every, subnet.then(|| "10.42.0.0/16".parse().unwrap()));
            let mut mixed = Directory::new(subnet, &short);
            let (mut nodes, mut services, mut version, mut epoch) = (BTreeMap::new(), BTreeMap::new(), 0, 1);
            for change in &changes {
                let services_before = services.clone();
                apply(change, &mut nodes, &mut services, &mut version);
                if let Change::Resolve(to) = change {
                    epoch = *to;
                }
                if relist {
                    for service in services.values() {
                        mixed.update_changed([], [(namespace_of(service), convert::service_name(service), Some(service))], resolver(epoch));
                    }
                    let gone: Vec<(String, String)> = mixed
                        .service_keys()
                        .filter(|(ns, n)| !services.contains_key(&format!("{ns}/{n}")))
                        .map(|(ns, n)| (ns.to_owned(), n.to_owned()))
                        .collect();
                    mixed.update_changed([], gone.iter().map(|(ns, n)| (ns.as_str(), n.as_str(), None)), resolver(epoch));
                } else {
                    let keys = written(&services_before, &services, |s: &MeshService| s.metadata.resource_version.clone());
                    for key in &keys {
                        let (ns, n) = key.split_once('/').unwrap();
                        mixed.update_changed([], [(ns, n, services.get(key))], resolver(epoch));
                    }
                }
                mixed.update_nodes(nodes.values(), resolver(epoch));
                let ns: Vec<MeshNode> = nodes.values().cloned().collect();
                let ss: Vec<MeshService> = services.values().cloned().collect();
                proptest::prop_assert_eq!(derived(&mixed), afresh(&ns, &ss, subnet, &short, resolver(epoch)));
                proptest::prop_assert!(!mixed.is_new());
            }
        }
    }

    #[test]
    fn versions_are_the_same_only_as_the_same_text() {
        for (a, b, same) in [
            ("12", "12", true),
            ("12", "012", false),
            ("12", "+12", false),
            ("0", "0", true),
            ("0", "00", false),
            ("x7", "x7", true),
            ("18446744073709551616", "18446744073709551616", true),
        ] {
            assert_eq!(Version::of(Some(a)).is(Some(b)), same, "{a} {b}");
        }
        assert!(!Version::of(None).is(None) && !Version::of(Some("1")).is(None));
    }

    #[test]
    fn a_name_that_resolves_anew_changes_the_entry_without_a_new_version() {
        let mut a = node("a", 1);
        a.status.as_mut().unwrap().peer.as_mut().unwrap().endpoint = Some("wg.example.com:51820".into());
        a.metadata.resource_version = Some("1".into());
        let mut b = node("b", 2);
        b.metadata.resource_version = Some("2".into());
        let nodes = [a, b];
        let mut dir = Directory::new(None, &ShortNames::Every);
        dir.update(&nodes, &[], |_, _| None);
        let before = dir.peers("b", Some(&key(2).public_key()));
        assert_eq!(before.peers[&key(1).public_key()].endpoint, None);
        let at = SocketAddr::from(([192, 0, 2, 7], 51820));
        assert_eq!(dir.update(&nodes, &[], |_, e| (e == "wg.example.com:51820").then_some(at)).nodes, 1, "a: resolved");
        let after = dir.peers("b", Some(&key(2).public_key()));
        assert_eq!(after.peers[&key(1).public_key()].endpoint, Some(at));
        assert_ne!(before.digest, after.digest);
    }
}
