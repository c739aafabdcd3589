//! The `mesh.local` zone as a pure function of the directory: which name resolves to which
//! address.
//!
//! | name | address |
//! |---|---|
//! | `<service>.<namespace>.mesh.local` | its mesh IP (`mesh`, `dual`); its node's underlay address (`host`) |
//! | `<service>.mesh.local` | the same, when exactly one namespace has a service of that name |
//! | `<node>.node.mesh.local` | the node's mesh IP |
//!
//! Fallback: a node that is not in the tunnel (no WireGuard, backend `none`) is published at its
//! underlay address, and so are its `host` and `dual` services, since their mesh IPs are
//! unreachable and their owners chose the host address (or accepted it). A `mesh` service it
//! hosts gets no record at all: it is never offered in plaintext at an underlay address, and
//! the controller says why in its Ready condition (reason `NoTunnel`).
//!
//! No record is published while an address is unknown (a `host` service not placed yet, a node
//! that has not reported its underlay address), so such names are NXDOMAIN.
//!
//! Name rules, chosen so that no two things ever share a name:
//!
//! - the label `node` right under the zone is the node subdomain. A service *named* `node`
//!   keeps its long name `node.<namespace>.mesh.local` but never gets the short name
//!   `node.mesh.local`; a service in a *namespace* named `node` keeps its short name (if unique)
//!   but never gets a long name, since `<service>.node.mesh.local` is a node's name. Both are
//!   reported in [`Zone::unpublished`], whether or not a node of that name exists, so that a
//!   name does not come and go with nodes.
//! - service names and namespaces must be DNS labels (lowercase letters, digits and `-`, at most
//!   63), as Kubernetes validates them; node names may be dotted DNS subdomains (as cloud node
//!   names often are), each label a DNS label. Anything else is reported and not published.
//! - a short name is withheld when several namespaces have a service of that name, counting
//!   every service whether or not it has an address yet, so that the short name does not flip
//!   as the others get placed. Each such name is listed in [`Zone::ambiguous`] with the services
//!   involved, for the condition that tells their owners why.
//! - short names belong to the namespaces the cluster administrator lists ([`ShortNames`]; the
//!   agent's and mesh-controller's `--short-name-namespaces`, chart value
//!   `mesh.shortNameNamespaces`, default `default`). A service in any other namespace never gets
//!   a short name and does not count for ambiguity, so a tenant can neither squat
//!   `<service>.mesh.local` before its owner creates the service, nor take it over while the
//!   owner's service is briefly deleted: the name is simply absent meanwhile. Among the listed
//!   namespaces the uniqueness rule above applies. The long name always works.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use crate::desired::Exposure;

/// The DNS zone of the mesh.
pub const ZONE: &str = "mesh.local";

/// `--zone`: a zone other than [`ZONE`] (e.g. `mesh.internal`, the suffix reserved for private
/// use, which no mDNS resolver claims), normalised: lowercase, no trailing dot. At least two
/// labels of letters, digits and `-`, none starting or ending with `-`.
pub fn check_zone(text: &str) -> Result<String, String> {
    let zone = text.trim().trim_end_matches('.').to_ascii_lowercase();
    let labels: Vec<&str> = zone.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if labels.len() < 2 || !labels.iter().all(label_ok) || zone.len() > 200 {
        return Err(format!(
            "{text:?} is not a DNS zone such as mesh.local or mesh.internal (two or more labels of letters, digits \
             and '-', at most 200 characters)"
        ));
    }
    Ok(zone)
}

/// `zone` with every name moved from under [`ZONE`] to under `to` (`db.default.mesh.local` →
/// `db.default.mesh.internal`); names that would grow past 253 characters are left out. The
/// plan computes the zone under [`ZONE`]; an agent with `--zone` serves it under its own.
pub fn rezone(zone: &Zone, to: &str) -> Zone {
    if to == ZONE {
        return zone.clone();
    }
    let suffix = format!(".{ZONE}");
    let records = zone
        .records
        .iter()
        .filter_map(|(name, addrs)| {
            let head = name.strip_suffix(&suffix)?;
            let moved = format!("{head}.{to}");
            (moved.len() <= MAX_NAME).then_some((moved, addrs.clone()))
        })
        .collect();
    Zone { records, ambiguous: zone.ambiguous.clone(), unpublished: zone.unpublished.clone() }
}

/// The label under [`ZONE`] that holds the node names: `<node>.node.mesh.local`.
pub const NODE_LABEL: &str = "node";

/// The longest DNS name, in characters, without the trailing dot.
const MAX_NAME: usize = 253;

/// A node as DNS needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// The MeshNode name.
    pub name: String,
    /// Its mesh IP, once allocated.
    pub mesh_ip: Option<Ipv4Addr>,
    /// Its underlay address (what `host` services and a fallback node resolve to), once known.
    pub underlay: Option<Ipv4Addr>,
    /// False for a node in fallback (no WireGuard): its mesh IP and those of its services are
    /// unreachable, so its underlay address is published instead.
    pub in_tunnel: bool,
}

/// A service as DNS needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// The MeshService namespace.
    pub namespace: String,
    /// The MeshService name.
    pub name: String,
    /// Its network type.
    pub exposure: Exposure,
    /// Its mesh IP, once allocated (none for `host`).
    pub mesh_ip: Option<Ipv4Addr>,
    /// The MeshNode hosting it now.
    pub node: Option<String>,
}

impl Service {
    /// `namespace/name`, as the reports name a service.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A short name that is not published because several namespaces have a service of that name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ambiguity {
    /// The service name shared by several namespaces.
    pub service: String,
    /// The short name withheld, `<service>.mesh.local`.
    pub short_name: String,
    /// The services involved, `namespace/name`, sorted.
    pub services: Vec<String>,
}

impl Ambiguity {
    /// A sentence for the condition of each service involved.
    pub fn message(&self) -> String {
        let namespaces: Vec<&str> =
            self.services.iter().map(|s| s.split_once('/').map_or(s.as_str(), |(ns, _)| ns)).collect();
        format!(
            "{} is not published because namespaces {} each have a service named {}; use {}.<namespace>.{ZONE}",
            self.short_name,
            namespaces.join(", "),
            self.service,
            self.service,
        )
    }
}

/// A name that the rules withhold, and why (for a condition or an event).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Unpublished {
    /// What it is about: `namespace/name` for a service, the node name for a node.
    pub subject: String,
    /// Why, and what to do about it.
    pub why: String,
}

/// The zone's content.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Zone {
    /// A records: fully qualified name without the trailing dot (`db.default.mesh.local`) →
    /// addresses, sorted and without duplicates, never empty.
    pub records: BTreeMap<String, Vec<Ipv4Addr>>,
    /// The short names withheld because several namespaces use them, sorted by name.
    pub ambiguous: Vec<Ambiguity>,
    /// Names withheld by the naming rules, sorted.
    pub unpublished: Vec<Unpublished>,
}

impl Zone {
    /// The ambiguity a service is part of, if its short name is withheld for that reason.
    pub fn ambiguity(&self, namespace: &str, name: &str) -> Option<&Ambiguity> {
        let key = format!("{namespace}/{name}");
        self.ambiguous.iter().find(|a| a.service == name && a.services.contains(&key))
    }
}

/// `<service>.<namespace>.mesh.local`: a service's full name.
pub fn service_name(namespace: &str, name: &str) -> String {
    format!("{name}.{namespace}.{ZONE}")
}

/// `<service>.mesh.local`: a service's short name (published only when unambiguous).
pub fn short_name(name: &str) -> String {
    format!("{name}.{ZONE}")
}

/// `<node>.node.mesh.local`: a node's name.
pub fn node_name(name: &str) -> String {
    format!("{name}.{NODE_LABEL}.{ZONE}")
}

/// The address a node's name resolves to: its mesh IP, or its underlay address in fallback.
pub fn node_address(node: &Node) -> Option<Ipv4Addr> {
    if node.in_tunnel { node.mesh_ip } else { node.underlay }
}

/// The address a service's names resolve to, given the node hosting it (if known): the mesh IP
/// for `mesh` and `dual`, the hosting node's underlay address for `host` and for a `dual`
/// service whose hosting node is in fallback; none for a `mesh` service whose hosting node is
/// in fallback (a `mesh` service is never offered at an underlay address).
///
/// A `mesh` or `dual` service keeps resolving to its mesh IP while its hosting node is unknown
/// (not placed, or between nodes): the IP is stable and comes back with the next placement.
pub fn service_address(service: &Service, hosting: Option<&Node>) -> Option<Ipv4Addr> {
    match (service.exposure, hosting) {
        (Exposure::Mesh, Some(node)) if !node.in_tunnel => None,
        (Exposure::Host | Exposure::Dual, Some(node)) if !node.in_tunnel => node.underlay,
        (Exposure::Host, node) => node.and_then(|n| n.underlay),
        (Exposure::Mesh | Exposure::Dual, _) => service.mesh_ip,
    }
}

/// Which namespaces' services get short names `<service>.mesh.local`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShortNames {
    /// Every namespace (a single-tenant cluster).
    Every,
    /// Only these namespaces.
    Namespaces(BTreeSet<String>),
}

impl Default for ShortNames {
    /// Only `default`.
    fn default() -> Self {
        Self::Namespaces(BTreeSet::from(["default".to_owned()]))
    }
}

impl ShortNames {
    /// From a list of namespaces, where `*` means every namespace.
    pub fn from_list(namespaces: &[String]) -> Self {
        if namespaces.iter().any(|n| n == "*") {
            Self::Every
        } else {
            Self::Namespaces(namespaces.iter().cloned().collect())
        }
    }

    /// Whether services in `namespace` may have short names.
    pub fn allows(&self, namespace: &str) -> bool {
        match self {
            Self::Every => true,
            Self::Namespaces(list) => list.contains(namespace),
        }
    }
}

/// Computes the zone from all nodes and all services, with short names for every namespace
/// (see [`zone_with`] for the agents' rule).
pub fn zone(nodes: &[Node], services: &[Service]) -> Zone {
    zone_with(nodes, services, &ShortNames::Every)
}

/// Computes the zone from all nodes and all services; only services in namespaces that
/// `short_names` allows get (and compete for) short names.
pub fn zone_with(nodes: &[Node], services: &[Service], short_names: &ShortNames) -> Zone {
    // Addresses are pushed as they come, then sorted and deduplicated once per name.
    let mut records: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    let mut unpublished = BTreeSet::new();
    let mut publish = |name: String, ip: Option<Ipv4Addr>| {
        if let Some(ip) = ip {
            records.entry(name).or_default().push(ip);
        }
    };

    let mut by_name: BTreeMap<&str, &Node> = BTreeMap::new();
    for node in nodes {
        by_name.insert(&node.name, node);
        match check_node_name(&node.name) {
            Ok(()) => publish(node_name(&node.name), node_address(node)),
            Err(why) => {
                unpublished.insert(Unpublished { subject: node.name.clone(), why });
            }
        }
    }

    // Service name → namespace → addresses; the short name is published when one namespace has it.
    let mut short: BTreeMap<&str, BTreeMap<&str, BTreeSet<Ipv4Addr>>> = BTreeMap::new();
    for service in services {
        unpublished.extend(withheld(service, short_names));
        if check_service_name(service).is_err() {
            continue;
        }
        let hosting = service.node.as_deref().and_then(|n| by_name.get(n).copied());
        let ip = service_address(service, hosting);
        if service.namespace != NODE_LABEL {
            publish(service_name(&service.namespace, &service.name), ip);
        }
        // Outside the namespaces the administrator lists, no short name is the rule, not a
        // problem to report (and reporting it cost a sync at 50,000 services more than the
        // rest of the zone).
        if !short_names.allows(&service.namespace) || service.name == NODE_LABEL {
            continue;
        }
        short.entry(&service.name).or_default().entry(&service.namespace).or_default().extend(ip);
    }

    let mut ambiguous = Vec::new();
    for (name, namespaces) in short {
        if namespaces.len() == 1 {
            for ips in namespaces.into_values() {
                for ip in ips {
                    publish(short_name(name), Some(ip));
                }
            }
        } else {
            ambiguous.push(Ambiguity {
                service: name.to_owned(),
                short_name: short_name(name),
                services: namespaces.keys().map(|ns| format!("{ns}/{name}")).collect(),
            });
        }
    }

    for ips in records.values_mut() {
        ips.sort_unstable();
        ips.dedup();
    }
    Zone { records, ambiguous, unpublished: unpublished.into_iter().collect() }
}

/// The names withheld for `service` whatever its state (by [`zone_with`] and [`ZoneIndex`]
/// alike): an invalid name, the node subdomain's namespace, and the node subdomain as a short
/// name where `short_names` gives it one.
fn withheld(service: &Service, short_names: &ShortNames) -> Vec<Unpublished> {
    if let Err(why) = check_service_name(service) {
        return vec![Unpublished { subject: service.key(), why }];
    }
    let mut withheld = Vec::new();
    if service.namespace == NODE_LABEL {
        withheld.push(Unpublished {
            subject: service.key(),
            why: format!(
                "no name {}: the namespace {NODE_LABEL} collides with the node subdomain {NODE_LABEL}.{ZONE}; \
                 use a service in another namespace",
                service_name(&service.namespace, &service.name)
            ),
        });
    }
    if short_names.allows(&service.namespace) && service.name == NODE_LABEL {
        withheld.push(Unpublished {
            subject: service.key(),
            why: format!(
                "no short name {}: it is the node subdomain; use {}",
                short_name(&service.name),
                service_name(&service.namespace, &service.name)
            ),
        });
    }
    withheld
}

/// The zone kept up to date one node and one service at a time: what [`zone_with`] computes
/// from every node and service, for a reader that learns of changes one by one (the agent, on
/// every sync). A change costs work for what it touches only: the node's or service's own
/// names, the services hosted on a node that changed (their addresses follow its state), and
/// the short name a service takes part in; the lists of withheld names are sorted again only
/// when they changed ([`ZoneIndex::finish`]).
///
/// No two nodes or services ever publish the same name (see the module's rules), so every
/// record has one owner and one address.
#[derive(Clone, Debug, Default)]
pub struct ZoneIndex {
    short_names: ShortNames,
    nodes: HashMap<String, Node>,
    /// By `namespace/name`.
    services: HashMap<String, Service>,
    /// Service keys by the node hosting them.
    hosted_by: HashMap<String, BTreeSet<String>>,
    /// The namespaces competing for each short name (services allowed one, named validly),
    /// sorted. A vector, not a set: nearly every name has one namespace, and a B-tree set's
    /// smallest node has room for eleven (the `sync_scale` example's kept directory at 50,000
    /// services with short names in every namespace: 85.3 MiB with sets, 76.5 with vectors).
    short: HashMap<String, Vec<String>>,
    /// Withheld names, each with the number of nodes and services that withhold it.
    unpublished: BTreeMap<Unpublished, usize>,
    ambiguous: BTreeMap<String, Ambiguity>,
    /// `unpublished` or `ambiguous` changed since the last [`ZoneIndex::finish`].
    lists_changed: bool,
    zone: Zone,
    /// Changes with every change of the records ([`ZoneIndex::revision`]).
    revision: u64,
}

/// The source of [`ZoneIndex::revision`]s: one counter for the process, so that no two indexes
/// ever share a revision with different records.
static REVISIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_revision() -> u64 {
    REVISIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl ZoneIndex {
    /// An empty zone whose short names `short_names` allows.
    pub fn new(short_names: ShortNames) -> Self {
        Self { short_names, revision: next_revision(), ..Self::default() }
    }

    /// The records' revision: the same revision (of any index in this process) is the same
    /// records, so a reader that rewrites something from them (the hosts file) can skip an
    /// update that changed none. 0: the records of an empty default index.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The zone, as of the last [`ZoneIndex::finish`].
    pub fn zone(&self) -> &Zone {
        &self.zone
    }

    /// Sorts the lists of withheld names again if they changed: call once after a batch of
    /// changes (records are up to date after each change).
    pub fn finish(&mut self) {
        if std::mem::take(&mut self.lists_changed) {
            self.zone.unpublished = self.unpublished.keys().cloned().collect();
            self.zone.ambiguous = self.ambiguous.values().cloned().collect();
        }
    }

    /// Adds node `node`, or replaces the node of its name.
    pub fn set_node(&mut self, node: Node) {
        let name = node.name.clone();
        match self.nodes.get(&name) {
            Some(old) if *old == node => return,
            Some(_) => {}
            None => {
                if let Err(why) = check_node_name(&name) {
                    self.withhold(Unpublished { subject: name.clone(), why });
                }
            }
        }
        self.nodes.insert(name.clone(), node);
        self.node_changed(&name);
    }

    /// Removes the node `name`.
    pub fn remove_node(&mut self, name: &str) {
        if self.nodes.remove(name).is_none() {
            return;
        }
        if let Err(why) = check_node_name(name) {
            self.release(&Unpublished { subject: name.to_owned(), why });
        }
        self.node_changed(name);
    }

    /// The node's record, and the addresses of the services it hosts.
    fn node_changed(&mut self, name: &str) {
        let address = self.nodes.get(name).and_then(node_address);
        if check_node_name(name).is_ok() {
            self.set_record(node_name(name), address);
        }
        let hosted: Vec<String> = self.hosted_by.get(name).map(|s| s.iter().cloned().collect()).unwrap_or_default();
        for key in hosted {
            if let Some(service) = self.services.get(&key).cloned() {
                self.service_changed(&service);
            }
        }
    }

    /// Adds service `service`, or replaces the service of its namespace and name.
    pub fn set_service(&mut self, service: Service) {
        let key = service.key();
        let old = self.services.insert(key.clone(), service.clone());
        match &old {
            Some(old) if *old == service => return,
            Some(old) => self.unhost(&key, old.node.as_deref()),
            None => {
                for why in withheld(&service, &self.short_names) {
                    self.withhold(why);
                }
                if self.competes(&service) {
                    let namespaces = self.short.entry(service.name.clone()).or_default();
                    if let Err(at) = namespaces.binary_search(&service.namespace) {
                        namespaces.insert(at, service.namespace.clone());
                    }
                }
            }
        }
        if let Some(node) = &service.node {
            self.hosted_by.entry(node.clone()).or_default().insert(key);
        }
        self.service_changed(&service);
    }

    /// Removes the service `namespace/name`.
    pub fn remove_service(&mut self, namespace: &str, name: &str) {
        let key = format!("{namespace}/{name}");
        let Some(service) = self.services.remove(&key) else { return };
        self.unhost(&key, service.node.as_deref());
        for why in withheld(&service, &self.short_names) {
            self.release(&why);
        }
        if self.competes(&service)
            && let Some(namespaces) = self.short.get_mut(&service.name)
        {
            if let Ok(at) = namespaces.binary_search(&service.namespace) {
                namespaces.remove(at);
            }
            if namespaces.is_empty() {
                self.short.remove(&service.name);
            }
        }
        self.service_changed(&service);
    }

    fn unhost(&mut self, key: &str, node: Option<&str>) {
        if let Some(node) = node
            && let Some(keys) = self.hosted_by.get_mut(node)
        {
            keys.remove(key);
            if keys.is_empty() {
                self.hosted_by.remove(node);
            }
        }
    }

    /// Whether `service` competes for its short name.
    fn competes(&self, service: &Service) -> bool {
        check_service_name(service).is_ok() && self.short_names.allows(&service.namespace) && service.name != NODE_LABEL
    }

    /// The records of service `service` (present or just removed): its long name, and its
    /// short name.
    fn service_changed(&mut self, service: &Service) {
        if check_service_name(service).is_err() {
            return;
        }
        let key = service.key();
        let address = |this: &Self, key: &str| {
            let service = this.services.get(key)?;
            service_address(service, service.node.as_deref().and_then(|n| this.nodes.get(n)))
        };
        if service.namespace != NODE_LABEL {
            let ip = address(self, &key);
            self.set_record(service_name(&service.namespace, &service.name), ip);
        }
        if !self.competes(service) {
            return;
        }
        let name = &service.name;
        let namespaces: Vec<&String> = self.short.get(name).map(|n| n.iter().collect()).unwrap_or_default();
        let (ip, ambiguity) = match namespaces.as_slice() {
            [] => (None, None),
            [namespace] => (address(self, &format!("{namespace}/{name}")), None),
            several => (
                None,
                Some(Ambiguity {
                    service: name.clone(),
                    short_name: short_name(name),
                    services: several.iter().map(|ns| format!("{ns}/{name}")).collect(),
                }),
            ),
        };
        self.set_record(short_name(name), ip);
        let changed = match ambiguity {
            Some(ambiguity) => self.ambiguous.insert(name.clone(), ambiguity.clone()).as_ref() != Some(&ambiguity),
            None => self.ambiguous.remove(name).is_some(),
        };
        self.lists_changed |= changed;
    }

    fn set_record(&mut self, name: String, ip: Option<Ipv4Addr>) {
        let changed = match ip {
            Some(ip) => self.zone.records.insert(name, vec![ip]).is_none_or(|old| old != [ip]),
            None => self.zone.records.remove(&name).is_some(),
        };
        if changed {
            self.revision = next_revision();
        }
    }

    fn withhold(&mut self, why: Unpublished) {
        *self.unpublished.entry(why).or_default() += 1;
        self.lists_changed = true;
    }

    fn release(&mut self, why: &Unpublished) {
        if let Some(count) = self.unpublished.get_mut(why) {
            *count -= 1;
            if *count == 0 {
                self.unpublished.remove(why);
            }
            self.lists_changed = true;
        }
    }
}

/// Why `label` is not a DNS label (RFC 1123: 1 to 63 lowercase letters, digits and `-`, not
/// starting or ending with `-`), if it is not.
fn label_problem(label: &str) -> Option<&'static str> {
    if label.is_empty() {
        Some("is empty")
    } else if label.len() > 63 {
        Some("is longer than 63 characters")
    } else if !label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        Some("has characters other than lowercase letters, digits and '-'")
    } else if label.starts_with('-') || label.ends_with('-') {
        Some("starts or ends with '-'")
    } else {
        None
    }
}

fn check_service_name(service: &Service) -> Result<(), String> {
    for (what, label) in [("name", &service.name), ("namespace", &service.namespace)] {
        if let Some(problem) = label_problem(label) {
            return Err(format!(
                "no DNS name: the {what} {label:?} {problem}; a MeshService name and namespace must be DNS labels"
            ));
        }
    }
    Ok(())
}

fn check_node_name(name: &str) -> Result<(), String> {
    for label in name.split('.') {
        if let Some(problem) = label_problem(label) {
            return Err(format!(
                "no DNS name: the part {label:?} of the node name {problem}; rename the MeshNode to a DNS subdomain"
            ));
        }
    }
    let full = node_name(name);
    if full.len() > MAX_NAME {
        return Err(format!(
            "no DNS name: {full} is longer than {MAX_NAME} characters; give the MeshNode a shorter name"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod zone_setting_tests {
    use super::*;

    #[test]
    fn another_zone_is_checked_and_every_name_moves_under_it() {
        assert_eq!(check_zone("Mesh.Internal.").unwrap(), "mesh.internal");
        for bad in ["", "internal", "mesh..internal", "-mesh.internal", "mesh.internal-", "mesh internal", "."] {
            assert!(check_zone(bad).is_err(), "{bad:?}");
        }
        let nodes =
            [Node { name: "w1".into(), mesh_ip: Some(Ipv4Addr::new(10, 42, 0, 1)), underlay: None, in_tunnel: true }];
        let zone = zone(&nodes, &[]);
        assert_eq!(rezone(&zone, ZONE), zone);
        let moved = rezone(&zone, "mesh.internal");
        assert_eq!(moved.records.keys().collect::<Vec<_>>(), ["w1.node.mesh.internal"]);
        assert_eq!(moved.records["w1.node.mesh.internal"], [Ipv4Addr::new(10, 42, 0, 1)]);
        let long = format!("{}.internal", "a".repeat(60) + "." + &"b".repeat(60) + "." + &"c".repeat(60));
        let too_long = Zone {
            records: [(format!("{}.{ZONE}", "x".repeat(63)), vec![Ipv4Addr::new(10, 42, 0, 2)])].into(),
            ..Zone::default()
        };
        assert!(rezone(&too_long, &long).records.is_empty(), "a name past 253 characters is left out");
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn node(name: &str, mesh: Option<&str>, underlay: Option<&str>, in_tunnel: bool) -> Node {
        Node { name: name.into(), mesh_ip: mesh.map(ip), underlay: underlay.map(ip), in_tunnel }
    }

    fn service(namespace: &str, name: &str, exposure: Exposure, mesh: Option<&str>, on: Option<&str>) -> Service {
        Service {
            namespace: namespace.into(),
            name: name.into(),
            exposure,
            mesh_ip: mesh.map(ip),
            node: on.map(Into::into),
        }
    }

    fn lookup<'a>(zone: &'a Zone, name: &str) -> Option<&'a [Ipv4Addr]> {
        zone.records.get(name).map(Vec::as_slice)
    }

    #[test]
    fn types_mesh_dual_host_resolve_as_the_issue_says() {
        let nodes = [node("w1", Some("10.42.0.1"), Some("192.0.2.1"), true)];
        let services = [
            service("default", "m", Exposure::Mesh, Some("10.42.1.1"), Some("w1")),
            service("default", "d", Exposure::Dual, Some("10.42.1.2"), Some("w1")),
            service("default", "h", Exposure::Host, None, Some("w1")),
        ];
        let zone = zone(&nodes, &services);
        assert_eq!(lookup(&zone, "m.default.mesh.local"), Some(&[ip("10.42.1.1")][..]));
        assert_eq!(lookup(&zone, "m.mesh.local"), Some(&[ip("10.42.1.1")][..]));
        assert_eq!(lookup(&zone, "d.default.mesh.local"), Some(&[ip("10.42.1.2")][..]));
        assert_eq!(lookup(&zone, "h.default.mesh.local"), Some(&[ip("192.0.2.1")][..]));
        assert_eq!(lookup(&zone, "h.mesh.local"), Some(&[ip("192.0.2.1")][..]));
        assert_eq!(lookup(&zone, "w1.node.mesh.local"), Some(&[ip("10.42.0.1")][..]));
        assert_eq!(zone.records.len(), 7, "{:?}", zone.records);
        assert!(zone.ambiguous.is_empty() && zone.unpublished.is_empty());
    }

    #[test]
    fn a_node_in_fallback_and_its_host_and_dual_services_resolve_to_its_underlay_address() {
        let nodes = [node("fb", Some("10.42.0.9"), Some("192.0.2.9"), false)];
        let services = [
            service("ns", "m", Exposure::Mesh, Some("10.42.1.1"), Some("fb")),
            service("ns", "d", Exposure::Dual, Some("10.42.1.2"), Some("fb")),
            service("ns", "h", Exposure::Host, None, Some("fb")),
        ];
        let zone = zone(&nodes, &services);
        for name in ["fb.node.mesh.local", "d.ns.mesh.local", "h.ns.mesh.local", "d.mesh.local", "h.mesh.local"] {
            assert_eq!(lookup(&zone, name), Some(&[ip("192.0.2.9")][..]), "{name}");
        }
    }

    #[test]
    fn a_mesh_service_on_a_node_in_fallback_has_no_record() {
        let nodes =
            [node("fb", Some("10.42.0.9"), Some("192.0.2.9"), false), node("w1", Some("10.42.0.1"), None, true)];
        let services = [
            service("ns", "m", Exposure::Mesh, Some("10.42.1.1"), Some("fb")),
            service("ns", "moved", Exposure::Mesh, Some("10.42.1.3"), Some("w1")),
        ];
        let zone = zone(&nodes, &services);
        for name in ["m.ns.mesh.local", "m.mesh.local"] {
            assert_eq!(lookup(&zone, name), None, "{name} must not resolve, to the underlay or anywhere");
        }
        // The same service on a node in the tunnel resolves to its mesh IP as usual.
        assert_eq!(lookup(&zone, "moved.ns.mesh.local"), Some(&[ip("10.42.1.3")][..]));
    }

    #[test]
    fn unknown_addresses_publish_nothing() {
        let nodes = [node("a", None, None, true), node("b", Some("10.42.0.2"), None, false)];
        let services = [
            service("ns", "h", Exposure::Host, None, Some("a")),
            service("ns", "unplaced", Exposure::Host, None, None),
            service("ns", "nowhere", Exposure::Host, None, Some("gone")),
            service("ns", "pending", Exposure::Mesh, None, None),
            service("ns", "on-b", Exposure::Mesh, Some("10.42.1.1"), Some("b")),
        ];
        let zone = zone(&nodes, &services);
        assert!(zone.records.is_empty(), "{:?}", zone.records);
    }

    #[test]
    fn a_mesh_service_keeps_its_ip_while_its_node_is_unknown() {
        let services = [service("ns", "m", Exposure::Mesh, Some("10.42.1.1"), Some("gone"))];
        let zone = zone(&[], &services);
        assert_eq!(lookup(&zone, "m.ns.mesh.local"), Some(&[ip("10.42.1.1")][..]));
    }

    #[test]
    fn a_short_name_used_in_two_namespaces_is_withheld_and_reported() {
        let nodes = [node("w1", Some("10.42.0.1"), Some("192.0.2.1"), true)];
        let services = [
            service("b", "db", Exposure::Mesh, Some("10.42.1.2"), Some("w1")),
            service("a", "db", Exposure::Mesh, Some("10.42.1.1"), Some("w1")),
            // No address yet, but it already makes `web` ambiguous.
            service("a", "web", Exposure::Mesh, Some("10.42.1.3"), Some("w1")),
            service("b", "web", Exposure::Host, None, None),
        ];
        let zone = zone(&nodes, &services);
        assert_eq!(lookup(&zone, "db.mesh.local"), None);
        assert_eq!(lookup(&zone, "web.mesh.local"), None);
        assert_eq!(lookup(&zone, "db.a.mesh.local"), Some(&[ip("10.42.1.1")][..]));
        assert_eq!(lookup(&zone, "db.b.mesh.local"), Some(&[ip("10.42.1.2")][..]));
        assert_eq!(zone.ambiguous.len(), 2);
        let db = zone.ambiguity("b", "db").expect("db is ambiguous");
        assert_eq!(db.short_name, "db.mesh.local");
        assert_eq!(db.services, ["a/db", "b/db"]);
        assert_eq!(
            db.message(),
            "db.mesh.local is not published because namespaces a, b each have a service named db; \
             use db.<namespace>.mesh.local"
        );
        assert!(zone.ambiguity("a", "web").is_some());
        assert!(zone.ambiguity("c", "db").is_none());
    }

    #[test]
    fn short_names_only_for_listed_namespaces_and_squatters_do_not_count() {
        let nodes = [node("n1", Some("10.42.0.1"), None, true)];
        let services = [
            service("tenant", "db", Exposure::Mesh, Some("10.42.1.1"), Some("n1")),
            service("tenant", "web", Exposure::Mesh, Some("10.42.1.2"), Some("n1")),
            service("default", "web", Exposure::Mesh, Some("10.42.1.3"), Some("n1")),
        ];
        let listed = zone_with(&nodes, &services, &ShortNames::default());
        assert_eq!(lookup(&listed, "db.mesh.local"), None, "a squatter gets no short name");
        assert_eq!(lookup(&listed, "db.tenant.mesh.local"), Some(&[ip("10.42.1.1")][..]));
        assert_eq!(lookup(&listed, "web.mesh.local"), Some(&[ip("10.42.1.3")][..]), "the owner keeps it");
        assert!(listed.ambiguous.is_empty());
        assert!(
            listed.unpublished.is_empty(),
            "no short name outside the listed namespaces is the rule, not a problem"
        );
        let every = zone_with(&nodes, &services, &ShortNames::from_list(&["*".to_owned()]));
        assert_eq!(every, zone(&nodes, &services));
        assert_eq!(lookup(&every, "db.mesh.local"), Some(&[ip("10.42.1.1")][..]));
    }

    #[test]
    fn the_node_label_never_collides() {
        let nodes = [node("x", Some("10.42.0.1"), Some("192.0.2.1"), true)];
        let services = [
            // Would be x.node.mesh.local, the node's name.
            service("node", "x", Exposure::Mesh, Some("10.42.1.1"), Some("x")),
            // Would be node.mesh.local, the node subdomain.
            service("default", "node", Exposure::Mesh, Some("10.42.1.2"), Some("x")),
        ];
        let zone = zone(&nodes, &services);
        assert_eq!(lookup(&zone, "x.node.mesh.local"), Some(&[ip("10.42.0.1")][..]));
        assert_eq!(lookup(&zone, "x.mesh.local"), Some(&[ip("10.42.1.1")][..]), "short name of node/x is fine");
        assert_eq!(lookup(&zone, "node.mesh.local"), None);
        assert_eq!(lookup(&zone, "node.default.mesh.local"), Some(&[ip("10.42.1.2")][..]));
        let subjects: Vec<&str> = zone.unpublished.iter().map(|u| u.subject.as_str()).collect();
        assert_eq!(subjects, ["default/node", "node/x"]);
        assert!(zone.unpublished[0].why.contains("use node.default.mesh.local"), "{:?}", zone.unpublished);
    }

    #[test]
    fn invalid_names_are_reported_not_published() {
        let long = "a".repeat(64);
        let nodes = [
            node("Upper", Some("10.42.0.1"), None, true),
            node("ip-10-0-0-1.ec2.internal", Some("10.42.0.2"), None, true),
            node(&[&*long, "b"].join("."), Some("10.42.0.3"), None, true),
            node(&vec!["a".repeat(60); 4].join("."), Some("10.42.0.4"), None, true),
        ];
        let services = [
            service("ns", "-x", Exposure::Mesh, Some("10.42.1.1"), None),
            service("n_s", "y", Exposure::Mesh, Some("10.42.1.2"), None),
            service("ns", "", Exposure::Mesh, Some("10.42.1.3"), None),
        ];
        let zone = zone(&nodes, &services);
        assert_eq!(zone.records.keys().collect::<Vec<_>>(), ["ip-10-0-0-1.ec2.internal.node.mesh.local"]);
        assert_eq!(zone.unpublished.len(), 6, "{:#?}", zone.unpublished);
        assert!(zone.unpublished.iter().all(|u| u.why.starts_with("no DNS name")));
    }

    #[derive(Debug, Clone)]
    struct Input {
        nodes: Vec<Node>,
        services: Vec<Service>,
    }

    fn opt_ip() -> impl Strategy<Value = Option<Ipv4Addr>> {
        prop::option::of((1u8..=3, 0u8..4).prop_map(|(a, b)| Ipv4Addr::new(10, 42, a, b)))
    }

    fn input() -> impl Strategy<Value = Input> {
        let names = prop::sample::select(vec!["a", "b", "node", "db", "x.y"]);
        let nodes = prop::collection::vec((names.clone(), opt_ip(), opt_ip(), any::<bool>()), 0..5).prop_map(|v| {
            let mut seen = BTreeSet::new();
            v.into_iter()
                .filter(|(n, ..)| seen.insert(*n))
                .map(|(name, mesh_ip, underlay, in_tunnel)| Node {
                    name: name.into(),
                    mesh_ip,
                    underlay: underlay.map(|ip| Ipv4Addr::new(192, 0, 2, ip.octets()[3])),
                    in_tunnel,
                })
                .collect::<Vec<_>>()
        });
        let exposure = prop::sample::select(vec![Exposure::Mesh, Exposure::Host, Exposure::Dual]);
        let services = prop::collection::vec(
            (
                prop::sample::select(vec!["default", "prod", "node", "a"]),
                prop::sample::select(vec!["db", "web", "node", "a", "default"]),
                exposure,
                opt_ip(),
                prop::option::of(names),
            ),
            0..12,
        )
        .prop_map(|v| {
            let mut seen = BTreeSet::new();
            v.into_iter()
                .filter(|(ns, n, ..)| seen.insert((*ns, *n)))
                .map(|(ns, name, exposure, mesh_ip, node)| Service {
                    namespace: ns.into(),
                    name: name.into(),
                    exposure,
                    mesh_ip,
                    node: node.map(Into::into),
                })
                .collect::<Vec<_>>()
        });
        (nodes, services).prop_map(|(nodes, services)| Input { nodes, services })
    }

    proptest! {
        /// Every service with an address resolves to it by its long name (outside the reserved
        /// namespace), every node with an address by its node name, a short name exists only
        /// for a name one namespace uses, and no name is claimed by two things.
        #[test]
        fn names_resolve_and_never_collide(input in input()) {
            let zone = zone(&input.nodes, &input.services);
            let hosting = |s: &Service| input.nodes.iter().find(|n| Some(&n.name) == s.node.as_ref());
            let mut claimed: BTreeMap<String, String> = BTreeMap::new();
            let mut claim = |name: String, by: String| -> Result<(), TestCaseError> {
                if let Some(other) = claimed.insert(name.clone(), by.clone()) {
                    prop_assert!(false, "{name} claimed by {other} and {by}");
                }
                Ok(())
            };
            for node in &input.nodes {
                let addr = node_address(node);
                prop_assert_eq!(zone.records.get(&node_name(&node.name)).cloned(), addr.map(|a| vec![a]));
                if addr.is_some() {
                    claim(node_name(&node.name), format!("node {}", node.name))?;
                }
            }
            for s in &input.services {
                let addr = service_address(s, hosting(s));
                if s.namespace != NODE_LABEL {
                    let long = zone.records.get(&service_name(&s.namespace, &s.name)).cloned();
                    prop_assert_eq!(long, addr.map(|a| vec![a]));
                    if addr.is_some() {
                        claim(service_name(&s.namespace, &s.name), s.key())?;
                    }
                }
                let users = input.services.iter().filter(|o| o.name == s.name).count();
                let short = zone.records.get(&short_name(&s.name)).cloned();
                if users == 1 && s.name != NODE_LABEL {
                    prop_assert_eq!(short, addr.map(|a| vec![a]));
                    if addr.is_some() {
                        claim(short_name(&s.name), format!("short {}", s.key()))?;
                    }
                } else {
                    prop_assert_eq!(short, None);
                }
                prop_assert_eq!(zone.ambiguity(&s.namespace, &s.name).is_some(), users > 1 && s.name != NODE_LABEL);
            }
            // Nothing else is published, and every record is well formed.
            prop_assert_eq!(claimed.keys().collect::<Vec<_>>(), zone.records.keys().collect::<Vec<_>>());
            for (name, ips) in &zone.records {
                prop_assert!(name.ends_with(".mesh.local") && name.len() <= MAX_NAME);
                prop_assert!(!ips.is_empty() && ips.windows(2).all(|w| w[0] < w[1]));
            }
        }
    }

    #[test]
    fn the_revision_moves_with_the_records_only() {
        let node = |ip: u8| Node {
            name: "a".into(),
            mesh_ip: Some(Ipv4Addr::new(10, 42, 0, ip)),
            underlay: None,
            in_tunnel: true,
        };
        let mut index = ZoneIndex::new(ShortNames::Every);
        let empty = index.revision();
        index.set_node(node(1));
        let one = index.revision();
        assert_ne!(one, empty, "a new record");
        index.set_node(node(1));
        assert_eq!(index.revision(), one, "the same node again: the same records");
        index.set_node(node(2));
        assert_ne!(index.revision(), one, "another address");
        assert_ne!(ZoneIndex::new(ShortNames::Every).revision(), empty, "no two indexes share a revision");
    }

    /// One change to the directory, as a [`ZoneIndex`] learns of it.
    #[derive(Clone, Debug)]
    enum Change {
        SetNode(Node),
        RemoveNode(&'static str),
        SetService(Service),
        RemoveService(&'static str, &'static str),
    }

    fn change() -> impl Strategy<Value = Change> {
        let node_names = prop::sample::select(vec!["a", "b", "node", "x.y", "Bad"]);
        let namespaces = prop::sample::select(vec!["default", "prod", "node", "a", "Bad"]);
        let service_names = prop::sample::select(vec!["db", "web", "node", "a"]);
        let exposure = prop::sample::select(vec![Exposure::Mesh, Exposure::Host, Exposure::Dual]);
        let node =
            (node_names.clone(), opt_ip(), opt_ip(), any::<bool>()).prop_map(|(name, mesh_ip, u, in_tunnel)| Node {
                name: name.into(),
                mesh_ip,
                underlay: u.map(|ip| Ipv4Addr::new(192, 0, 2, ip.octets()[3])),
                in_tunnel,
            });
        let service =
            (namespaces.clone(), service_names.clone(), exposure, opt_ip(), prop::option::of(node_names.clone()))
                .prop_map(|(ns, name, exposure, mesh_ip, node)| Service {
                    namespace: ns.into(),
                    name: name.into(),
                    exposure,
                    mesh_ip,
                    node: node.map(Into::into),
                });
        prop_oneof![
            3 => node.prop_map(Change::SetNode),
            1 => node_names.prop_map(Change::RemoveNode),
            4 => service.prop_map(Change::SetService),
            2 => (namespaces, service_names).prop_map(|(ns, n)| Change::RemoveService(ns, n)),
        ]
    }

    proptest! {
        /// A zone kept up to date change by change equals, after every change, the zone
        /// computed afresh from the nodes and services there are then.
        #[test]
        fn a_zone_kept_up_to_date_equals_the_zone_afresh(
            changes in prop::collection::vec(change(), 1..40),
            every in any::<bool>(),
        ) {
            let short_names = if every {
                ShortNames::Every
            } else {
                ShortNames::Namespaces(["default".to_owned(), "node".to_owned()].into())
            };
            let mut index = ZoneIndex::new(short_names.clone());
            let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
            let mut services: BTreeMap<String, Service> = BTreeMap::new();
            for change in changes {
                let (records_before, revision_before) = (index.zone().records.clone(), index.revision());
                match change {
                    Change::SetNode(node) => {
                        nodes.insert(node.name.clone(), node.clone());
                        index.set_node(node);
                    }
                    Change::RemoveNode(name) => {
                        nodes.remove(name);
                        index.remove_node(name);
                    }
                    Change::SetService(service) => {
                        services.insert(service.key(), service.clone());
                        index.set_service(service);
                    }
                    Change::RemoveService(ns, name) => {
                        services.remove(&format!("{ns}/{name}"));
                        index.remove_service(ns, name);
                    }
                }
                index.finish();
                // A reader that skips an unchanged revision never misses a change of the records.
                prop_assert!(
                    index.zone().records == records_before || index.revision() != revision_before,
                    "the records changed under the same revision"
                );
                let nodes: Vec<Node> = nodes.values().cloned().collect();
                let services: Vec<Service> = services.values().cloned().collect();
                prop_assert_eq!(index.zone(), &zone_with(&nodes, &services, &short_names));
            }
        }
    }
}
