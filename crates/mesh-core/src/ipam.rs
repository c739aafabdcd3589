//! IP address management for the mesh subnet.
//!
//! A [`Pool`] hands out the host addresses of one IPv4 subnet (default `10.42.0.0/16`) to
//! owners — MeshNodes and MeshServices — and guarantees that no address ever has two owners.
//!
//! Rules:
//! - the network and broadcast addresses are never handed out (for a /31 or /32 there are no
//!   usable addresses: such a pool is refused);
//! - a requested address is honoured when it lies in the subnet, is not reserved and is free;
//! - automatic allocation is *next-fit*: it continues after the last address it handed out, so
//!   a recently released address is the last to come round again;
//! - a released address is additionally held back for `hold_secs` before anyone else may take
//!   it, so a peer that still has the old entry never receives another owner's traffic (the
//!   previous owner may take it back at once);
//! - the highest addresses may be reserved for nodes ([`Pool::reserve_for_nodes`]): a service
//!   can neither request nor be given one, so services filling the pool cannot stop a node
//!   joining; nodes may take any free address;
//! - an exhausted pool is an error value, never a panic.
//!
//! Time is a plain number of seconds passed in by the caller, so the pool has no clock and is
//! deterministic under test. Across restarts, the allocations are persisted in the objects'
//! status and [`Pool::restore`] rebuilds them; the hold-back is the caller's to persist
//! ([`Pool::holds`]) and to give back ([`Pool::restore_hold`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::Ipv4Addr;

/// Who holds an address: a MeshNode (`node/NAME`) or a MeshService (`service/NAMESPACE/NAME`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    /// A MeshNode, by name.
    Node(String),
    /// A MeshService, by namespace and name.
    Service {
        /// The service's namespace.
        namespace: String,
        /// The service's name.
        name: String,
    },
}

impl Owner {
    /// The owner of a MeshService's address.
    pub fn service(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self::Service { namespace: namespace.into(), name: name.into() }
    }

    /// The owner of a MeshNode's address.
    pub fn node(name: impl Into<String>) -> Self {
        Self::Node(name.into())
    }

    /// The owner as one string, `node/NAME` or `service/NAMESPACE/NAME` (Kubernetes names hold
    /// no `/`), for persisted state; [`Owner::parse_key`] reads it back.
    pub fn key(&self) -> String {
        match self {
            Self::Node(name) => format!("node/{name}"),
            Self::Service { namespace, name } => format!("service/{namespace}/{name}"),
        }
    }

    /// Reads back what [`Owner::key`] wrote; `None` for anything else.
    pub fn parse_key(text: &str) -> Option<Self> {
        let parts: Vec<&str> = text.split('/').collect();
        match parts[..] {
            ["node", name] if !name.is_empty() => Some(Self::node(name)),
            ["service", namespace, name] if !namespace.is_empty() && !name.is_empty() => {
                Some(Self::service(namespace, name))
            }
            _ => None,
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Node(name) => write!(f, "MeshNode {name}"),
            Self::Service { namespace, name } => write!(f, "MeshService {namespace}/{name}"),
        }
    }
}

/// An IPv4 subnet: base address and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet {
    network: u32,
    prefix: u8,
}

impl Subnet {
    /// Parses `a.b.c.d/len`. Host bits must be zero, as in `10.42.0.0/16`.
    pub fn parse(text: &str) -> Result<Self, IpamError> {
        let bad = || IpamError::BadSubnet(text.to_owned());
        let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        let network = u32::from(addr);
        if network & !Self::mask(prefix) != 0 {
            return Err(IpamError::HostBitsSet(text.to_owned()));
        }
        Ok(Self { network, prefix })
    }

    fn mask(prefix: u8) -> u32 {
        if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) }
    }

    /// Whether `ip` lies inside the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.prefix) == self.network
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network)
    }

    /// The broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network | !Self::mask(self.prefix))
    }

    /// Whether two subnets share any address.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        self.contains(other.network()) || other.contains(self.network())
    }

    /// The first and last address handed out (network and broadcast excluded).
    fn host_range(&self) -> Option<(u32, u32)> {
        (self.prefix <= 30).then(|| (self.network + 1, (self.network | !Self::mask(self.prefix)) - 1))
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

impl std::str::FromStr for Subnet {
    type Err = IpamError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Why an address could not be handed out. Each message says what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// The subnet text is not `a.b.c.d/len`.
    #[error("{0:?} is not an IPv4 subnet such as 10.42.0.0/16")]
    BadSubnet(String),
    /// The subnet has host bits set.
    #[error("{0:?} has host bits set; write the network address, e.g. 10.42.0.0/16")]
    HostBitsSet(String),
    /// The subnet is too small to hold any host address.
    #[error("the subnet {0} holds no usable address; use a prefix of /30 or shorter")]
    TooSmall(Subnet),
    /// The requested address is outside the subnet.
    #[error("{ip} is outside the mesh subnet {subnet}; request an address inside it or none")]
    OutsideSubnet {
        /// The requested address.
        ip: Ipv4Addr,
        /// The pool's subnet.
        subnet: Subnet,
    },
    /// The requested address is the network or broadcast address.
    #[error("{ip} is the network or broadcast address of {subnet} and is never handed out")]
    Reserved {
        /// The requested address.
        ip: Ipv4Addr,
        /// The pool's subnet.
        subnet: Subnet,
    },
    /// Someone else holds the requested address.
    #[error("{ip} is already held by {holder}; request another address or none")]
    Taken {
        /// The requested address.
        ip: Ipv4Addr,
        /// Who holds it.
        holder: Owner,
    },
    /// The requested address was released recently and is held back.
    #[error("{ip} was released by {previous} and is held back until t={until}s so stale peers forget it")]
    HeldBack {
        /// The requested address.
        ip: Ipv4Addr,
        /// Who released it.
        previous: Owner,
        /// When it becomes available (the caller's clock, seconds).
        until: u64,
    },
    /// A service requested an address in the range reserved for nodes.
    #[error(
        "{ip} lies in {first}-{last}, the part of the mesh subnet reserved for MeshNodes; request an address below \
         {first}, or none"
    )]
    ReservedForNodes {
        /// The requested address.
        ip: Ipv4Addr,
        /// The first address reserved for nodes.
        first: Ipv4Addr,
        /// The last one.
        last: Ipv4Addr,
    },
    /// The node reservation would leave no address to services.
    #[error(
        "reserving {reserved} addresses for nodes leaves none for services in {subnet} ({capacity} usable); reserve fewer"
    )]
    ReserveTooLarge {
        /// The pool's subnet.
        subnet: Subnet,
        /// The addresses asked to be reserved.
        reserved: u32,
        /// How many usable addresses the subnet has.
        capacity: usize,
    },
    /// No address is left for services; the rest is reserved for nodes.
    #[error(
        "the service part of the mesh subnet {subnet} is exhausted ({used} addresses in use; {first}-{last} are \
         reserved for MeshNodes); delete unused services or configure a larger subnet"
    )]
    ServicesExhausted {
        /// The pool's subnet.
        subnet: Subnet,
        /// How many addresses are in use.
        used: usize,
        /// The first address reserved for nodes.
        first: Ipv4Addr,
        /// The last one.
        last: Ipv4Addr,
    },
    /// No address is left.
    #[error(
        "the mesh subnet {subnet} is exhausted ({used} addresses in use); delete unused objects or configure a larger subnet"
    )]
    Exhausted {
        /// The pool's subnet.
        subnet: Subnet,
        /// How many addresses are in use.
        used: usize,
    },
}

/// A released address that is held back until `until`.
#[derive(Clone, Debug)]
struct Held {
    previous: Owner,
    until: u64,
}

/// The allocations of one subnet. See the module docs for the rules.
#[derive(Clone, Debug)]
pub struct Pool {
    subnet: Subnet,
    first: u32,
    last: u32,
    hold_secs: u64,
    by_ip: BTreeMap<u32, Owner>,
    by_owner: HashMap<Owner, u32>,
    held: BTreeMap<u32, Held>,
    /// Where the next automatic allocation starts looking.
    cursor: u32,
    /// The last address a service may get; those above it are reserved for nodes.
    services_last: u32,
}

impl Pool {
    /// An empty pool over `subnet`; released addresses are held back for `hold_secs`.
    pub fn new(subnet: Subnet, hold_secs: u64) -> Result<Self, IpamError> {
        let (first, last) = subnet.host_range().ok_or(IpamError::TooSmall(subnet))?;
        Ok(Self {
            subnet,
            first,
            last,
            hold_secs,
            by_ip: BTreeMap::new(),
            by_owner: HashMap::new(),
            held: BTreeMap::new(),
            cursor: first,
            services_last: last,
        })
    }

    /// The default node reservation of a pool: 1/16 of its addresses, at most 1024 (for
    /// 10.42.0.0/16, 10.42.251.255-10.42.255.254; none below a /28).
    pub fn default_node_reserve(&self) -> u32 {
        (self.capacity() / 16).min(1024) as u32
    }

    /// Reserves the `count` highest usable addresses for nodes: services can neither request
    /// nor get them. Addresses [`Pool::restore`]d keep their owners wherever they lie.
    pub fn reserve_for_nodes(mut self, count: u32) -> Result<Self, IpamError> {
        if count as usize >= self.capacity() {
            return Err(IpamError::ReserveTooLarge { subnet: self.subnet, reserved: count, capacity: self.capacity() });
        }
        self.services_last = self.last - count;
        Ok(self)
    }

    /// The first and last address reserved for nodes, if any are.
    pub fn node_reserve(&self) -> Option<(Ipv4Addr, Ipv4Addr)> {
        (self.services_last < self.last).then(|| (Ipv4Addr::from(self.services_last + 1), Ipv4Addr::from(self.last)))
    }

    /// The last address `owner` may be given.
    fn limit(&self, owner: &Owner) -> u32 {
        match owner {
            Owner::Node(_) => self.last,
            Owner::Service { .. } => self.services_last,
        }
    }

    /// The pool's subnet.
    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    /// How many addresses the pool can hand out.
    pub fn capacity(&self) -> usize {
        (self.last - self.first + 1) as usize
    }

    /// How many addresses are held by owners.
    pub fn used(&self) -> usize {
        self.by_ip.len()
    }

    /// Who holds `ip`, if anyone.
    pub fn holder(&self, ip: Ipv4Addr) -> Option<&Owner> {
        self.by_ip.get(&u32::from(ip))
    }

    /// The address `owner` holds, if any.
    pub fn address_of(&self, owner: &Owner) -> Option<Ipv4Addr> {
        self.by_owner.get(owner).map(|ip| Ipv4Addr::from(*ip))
    }

    /// Every allocation, in address order: the state to persist.
    pub fn allocations(&self) -> impl Iterator<Item = (Ipv4Addr, &Owner)> {
        self.by_ip.iter().map(|(ip, owner)| (Ipv4Addr::from(*ip), owner))
    }

    fn check_requestable(&self, ip: Ipv4Addr) -> Result<u32, IpamError> {
        if !self.subnet.contains(ip) {
            return Err(IpamError::OutsideSubnet { ip, subnet: self.subnet });
        }
        let raw = u32::from(ip);
        if raw < self.first || raw > self.last {
            return Err(IpamError::Reserved { ip, subnet: self.subnet });
        }
        Ok(raw)
    }

    /// Records an allocation read back from persisted state (an object's status) at start-up,
    /// before anything is allocated. Hold-back does not apply; a conflict is reported and the
    /// first owner keeps the address, so restore in a stable order (e.g. oldest object first).
    pub fn restore(&mut self, owner: Owner, ip: Ipv4Addr) -> Result<(), IpamError> {
        let raw = self.check_requestable(ip)?;
        match (self.by_ip.get(&raw), self.by_owner.get(&owner)) {
            (Some(holder), _) if *holder == owner => Ok(()),
            (Some(holder), _) => Err(IpamError::Taken { ip, holder: holder.clone() }),
            (None, Some(_)) => {
                // The owner already restored another address: keep the first.
                Ok(())
            }
            (None, None) => {
                self.insert(owner, raw);
                self.cursor = self.cursor.max(raw.saturating_add(1));
                if self.cursor > self.last {
                    self.cursor = self.first;
                }
                Ok(())
            }
        }
    }

    /// Gives `owner` an address: `requested` if given (and allowed), otherwise the one it
    /// already holds, otherwise the next free one. Idempotent: asking again returns the same
    /// address. When `requested` differs from the address the owner holds, the old one is
    /// released (held back) only once the new one is granted.
    pub fn allocate(&mut self, owner: &Owner, requested: Option<Ipv4Addr>, now: u64) -> Result<Ipv4Addr, IpamError> {
        let current = self.by_owner.get(owner).copied();
        let Some(requested) = requested else {
            if let Some(ip) = current {
                return Ok(Ipv4Addr::from(ip));
            }
            let ip = self.next_free(now, self.limit(owner))?;
            self.insert(owner.clone(), ip);
            self.cursor = if ip == self.last { self.first } else { ip + 1 };
            return Ok(Ipv4Addr::from(ip));
        };
        let raw = self.check_requestable(requested)?;
        if current == Some(raw) {
            return Ok(requested);
        }
        if raw > self.limit(owner)
            && let Some((first, last)) = self.node_reserve()
        {
            return Err(IpamError::ReservedForNodes { ip: requested, first, last });
        }
        if let Some(holder) = self.by_ip.get(&raw) {
            return Err(IpamError::Taken { ip: requested, holder: holder.clone() });
        }
        if let Some(held) = self.held.get(&raw)
            && held.until > now
            && held.previous != *owner
        {
            return Err(IpamError::HeldBack { ip: requested, previous: held.previous.clone(), until: held.until });
        }
        self.release(owner, now);
        self.insert(owner.clone(), raw);
        Ok(requested)
    }

    /// Releases the address `owner` holds, holding it back for the pool's hold time.
    pub fn release(&mut self, owner: &Owner, now: u64) -> Option<Ipv4Addr> {
        let ip = self.by_owner.remove(owner)?;
        self.by_ip.remove(&ip);
        if self.hold_secs > 0 {
            self.held.insert(ip, Held { previous: owner.clone(), until: now.saturating_add(self.hold_secs) });
        }
        Some(Ipv4Addr::from(ip))
    }

    fn insert(&mut self, owner: Owner, ip: u32) {
        self.held.remove(&ip);
        self.by_owner.insert(owner.clone(), ip);
        self.by_ip.insert(ip, owner);
    }

    /// The first free, not-held-back address in `first..=limit` at or after the cursor,
    /// wrapping once.
    fn next_free(&mut self, now: u64, limit: u32) -> Result<u32, IpamError> {
        self.held.retain(|_, held| held.until > now);
        // Taken addresses above the limit (the node reserve, small) do not count.
        let above = |ip: u32| ip > limit;
        let taken_above =
            self.by_ip.range(limit.saturating_add(1)..).count() + self.held.range(limit.saturating_add(1)..).count();
        let taken_count = self.by_ip.len() + self.held.len() - taken_above;
        if taken_count > (limit - self.first) as usize {
            return Err(match self.node_reserve() {
                Some((first, last)) if limit < self.last => {
                    IpamError::ServicesExhausted { subnet: self.subnet, used: self.used(), first, last }
                }
                _ => IpamError::Exhausted { subnet: self.subnet, used: self.used() },
            });
        }
        let taken = |ip: &u32| self.by_ip.contains_key(ip) || self.held.contains_key(ip);
        let mut ip = if above(self.cursor) { self.first } else { self.cursor };
        // The loop ends: fewer addresses are taken than exist in the range, checked above.
        loop {
            if !taken(&ip) {
                return Ok(ip);
            }
            ip = if ip >= limit { self.first } else { ip + 1 };
        }
    }

    /// The addresses held back at `now`: each with who released it and when its hold ends (the
    /// pool's clock), in address order. The state to persist across restarts.
    pub fn holds(&self, now: u64) -> impl Iterator<Item = (Ipv4Addr, &Owner, u64)> {
        self.held.iter().filter(move |(_, h)| h.until > now).map(|(ip, h)| (Ipv4Addr::from(*ip), &h.previous, h.until))
    }

    /// Holds `ip` back for `previous` until `until` (the pool's clock), as read back from
    /// persisted state at start-up, after [`Pool::restore`]. Ignored (`false`) for an address
    /// the pool cannot hand out or that an owner holds now; of two holds of one address the
    /// later end wins.
    pub fn restore_hold(&mut self, ip: Ipv4Addr, previous: Owner, until: u64) -> bool {
        let Ok(raw) = self.check_requestable(ip) else { return false };
        if self.by_ip.contains_key(&raw) {
            return false;
        }
        match self.held.get(&raw) {
            Some(held) if held.until >= until => {}
            _ => {
                self.held.insert(raw, Held { previous, until });
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pool(subnet: &str, hold: u64) -> Pool {
        Pool::new(Subnet::parse(subnet).unwrap(), hold).unwrap()
    }

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().unwrap()
    }

    #[test]
    fn subnet_parsing_names_the_problem() {
        assert_eq!(Subnet::parse("10.42.0.0/16").unwrap().to_string(), "10.42.0.0/16");
        assert!(matches!(Subnet::parse("10.42.0.1/16"), Err(IpamError::HostBitsSet(_))));
        assert!(matches!(Subnet::parse("10.42.0.0"), Err(IpamError::BadSubnet(_))));
        assert!(matches!(Subnet::parse("10.42.0.0/33"), Err(IpamError::BadSubnet(_))));
        assert!(matches!(Pool::new(Subnet::parse("10.0.0.0/31").unwrap(), 0), Err(IpamError::TooSmall(_))));
        assert!(Subnet::parse("10.42.0.0/16").unwrap().overlaps(&Subnet::parse("10.42.128.0/17").unwrap()));
        assert!(!Subnet::parse("10.42.0.0/16").unwrap().overlaps(&Subnet::parse("10.43.0.0/16").unwrap()));
    }

    #[test]
    fn never_hands_out_network_or_broadcast_and_reports_exhaustion() {
        let mut p = pool("10.42.0.0/30", 0);
        let a = p.allocate(&Owner::node("a"), None, 0).unwrap();
        let b = p.allocate(&Owner::node("b"), None, 0).unwrap();
        assert_eq!((a, b), (ip("10.42.0.1"), ip("10.42.0.2")));
        assert_eq!(p.allocate(&Owner::node("c"), None, 0), Err(IpamError::Exhausted { subnet: p.subnet(), used: 2 }));
        assert!(matches!(p.allocate(&Owner::node("c"), Some(ip("10.42.0.3")), 0), Err(IpamError::Reserved { .. })));
        assert!(matches!(p.allocate(&Owner::node("c"), Some(ip("10.42.0.0")), 0), Err(IpamError::Reserved { .. })));
        assert!(matches!(
            p.allocate(&Owner::node("c"), Some(ip("10.43.0.1")), 0),
            Err(IpamError::OutsideSubnet { .. })
        ));
    }

    #[test]
    fn requests_are_honoured_and_conflicts_name_the_holder() {
        let mut p = pool("10.42.0.0/16", 60);
        let svc = Owner::service("default", "graph-node");
        assert_eq!(p.allocate(&svc, Some(ip("10.42.7.7")), 0), Ok(ip("10.42.7.7")));
        assert_eq!(
            p.allocate(&Owner::service("other", "x"), Some(ip("10.42.7.7")), 0),
            Err(IpamError::Taken { ip: ip("10.42.7.7"), holder: svc.clone() })
        );
        // Idempotent, and moving to another requested address releases the old one.
        assert_eq!(p.allocate(&svc, None, 0), Ok(ip("10.42.7.7")));
        assert_eq!(p.allocate(&svc, Some(ip("10.42.7.8")), 0), Ok(ip("10.42.7.8")));
        assert_eq!(p.holder(ip("10.42.7.7")), None);
    }

    #[test]
    fn released_addresses_are_held_back_except_for_their_previous_owner() {
        let mut p = pool("10.42.0.0/29", 30);
        let a = Owner::node("a");
        let first = p.allocate(&a, None, 0).unwrap();
        p.release(&a, 10);
        assert!(matches!(p.allocate(&Owner::node("b"), Some(first), 20), Err(IpamError::HeldBack { until: 40, .. })));
        // Automatic allocation skips it while held, even after wrapping round.
        for n in 0..5 {
            assert_ne!(p.allocate(&Owner::node(format!("n{n}")), None, 20).unwrap(), first);
        }
        assert!(matches!(p.allocate(&Owner::node("late"), None, 20), Err(IpamError::Exhausted { .. })));
        assert_eq!(p.allocate(&Owner::node("late"), None, 40), Ok(first));
        // The previous owner may take its own address back at once.
        let mut p = pool("10.42.0.0/29", 30);
        let ip_a = p.allocate(&a, None, 0).unwrap();
        p.release(&a, 1);
        assert_eq!(p.allocate(&a, Some(ip_a), 2), Ok(ip_a));
    }

    #[test]
    fn restore_keeps_the_first_owner_and_continues_after_the_highest_address() {
        let mut p = pool("10.42.0.0/24", 0);
        p.restore(Owner::node("a"), ip("10.42.0.9")).unwrap();
        assert!(matches!(p.restore(Owner::node("b"), ip("10.42.0.9")), Err(IpamError::Taken { .. })));
        assert_eq!(p.allocate(&Owner::node("b"), None, 0), Ok(ip("10.42.0.10")));
    }

    #[test]
    fn services_never_get_the_node_reserve_and_nodes_still_join_when_services_are_full() {
        // 10.42.0.0/28: 14 usable addresses, the 4 highest (.11-.14) for nodes.
        let mut p = pool("10.42.0.0/28", 0).reserve_for_nodes(4).unwrap();
        assert_eq!(p.node_reserve(), Some((ip("10.42.0.11"), ip("10.42.0.14"))));
        let svc = |i: usize| Owner::service("tenant", format!("s{i}"));
        for i in 0..10 {
            let got = p.allocate(&svc(i), None, 0).unwrap();
            assert!(got < ip("10.42.0.11"), "{got}");
        }
        let full = p.allocate(&svc(10), None, 0).unwrap_err();
        assert_eq!(
            full,
            IpamError::ServicesExhausted {
                subnet: p.subnet(),
                used: 10,
                first: ip("10.42.0.11"),
                last: ip("10.42.0.14")
            }
        );
        assert!(full.to_string().contains("reserved for MeshNodes"), "{full}");
        assert!(matches!(
            p.allocate(&svc(10), Some(ip("10.42.0.12")), 0),
            Err(IpamError::ReservedForNodes { first, .. }) if first == ip("10.42.0.11")
        ));
        for n in 0..4 {
            assert!(p.allocate(&Owner::node(format!("n{n}")), None, 0).unwrap() >= ip("10.42.0.11"));
        }
        assert!(matches!(p.allocate(&Owner::node("n5"), None, 0), Err(IpamError::Exhausted { .. })));
        // A service restored inside the reserve (allocated before it existed) keeps its address.
        let mut p = pool("10.42.0.0/28", 0).reserve_for_nodes(4).unwrap();
        p.restore(svc(0), ip("10.42.0.13")).unwrap();
        assert_eq!(p.allocate(&svc(0), None, 0), Ok(ip("10.42.0.13")));
        assert_eq!(p.allocate(&svc(0), Some(ip("10.42.0.13")), 0), Ok(ip("10.42.0.13")));
        // The reserve must leave services something; the default scales with the subnet.
        assert!(matches!(pool("10.42.0.0/28", 0).reserve_for_nodes(14), Err(IpamError::ReserveTooLarge { .. })));
        assert_eq!(pool("10.42.0.0/16", 0).default_node_reserve(), 1024);
        assert_eq!(pool("10.42.0.0/24", 0).default_node_reserve(), 15);
        assert_eq!(pool("10.42.0.0/28", 0).default_node_reserve(), 0);
        assert_eq!(pool("10.42.0.0/28", 0).reserve_for_nodes(0).unwrap().node_reserve(), None);
    }

    #[test]
    fn holds_are_read_out_and_given_back() {
        let mut p = pool("10.42.0.0/29", 30);
        let a = Owner::service("ns", "a");
        let ip_a = p.allocate(&a, None, 0).unwrap();
        p.release(&a, 5);
        let holds: Vec<(Ipv4Addr, Owner, u64)> = p.holds(6).map(|(ip, o, until)| (ip, o.clone(), until)).collect();
        assert_eq!(holds, [(ip_a, a.clone(), 35)]);
        assert_eq!(p.holds(35).count(), 0);
        // A new pool (a restarted controller) given the hold refuses the address to others.
        let mut q = pool("10.42.0.0/29", 30);
        assert!(q.restore_hold(ip_a, a.clone(), 20));
        assert!(matches!(q.allocate(&Owner::node("b"), Some(ip_a), 0), Err(IpamError::HeldBack { until: 20, .. })));
        assert_eq!(q.allocate(&a, Some(ip_a), 0), Ok(ip_a));
        // Not for an address someone holds, nor one outside the pool.
        assert!(!q.restore_hold(ip_a, Owner::node("c"), 50));
        assert!(!q.restore_hold(ip("10.43.0.1"), Owner::node("c"), 50));
        assert_eq!(Owner::parse_key(&a.key()), Some(a));
        assert_eq!(Owner::parse_key(&Owner::node("n").key()), Some(Owner::node("n")));
        for bad in ["", "node/", "node/a/b", "service/ns", "service//x", "pod/x"] {
            assert_eq!(Owner::parse_key(bad), None, "{bad}");
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Allocate { owner: u8, request: Option<u8> },
        Release { owner: u8 },
        Tick { secs: u8 },
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..24, proptest::option::of(0u8..16)).prop_map(|(owner, request)| Op::Allocate { owner, request }),
            2 => (0u8..24).prop_map(|owner| Op::Release { owner }),
            1 => (0u8..40).prop_map(|secs| Op::Tick { secs }),
            1 => Just(Op::Restart),
        ]
    }

    fn owner(n: u8) -> Owner {
        if n.is_multiple_of(2) { Owner::node(format!("n{n}")) } else { Owner::service("ns", format!("s{n}")) }
    }

    proptest! {
        /// Across random allocate / request / release / restart sequences on a small pool
        /// (/28: 14 addresses for 24 owners), no address ever has two owners, no owner two
        /// addresses, and every address handed out is a usable one of the subnet.
        #[test]
        fn no_address_ever_has_two_owners(ops in proptest::collection::vec(op(), 1..200)) {
            let subnet = Subnet::parse("10.42.0.0/28").unwrap();
            let mut p = Pool::new(subnet, 20).unwrap();
            let mut now = 0u64;
            for op in ops {
                match op {
                    Op::Allocate { owner: o, request } => {
                        let requested = request.map(|r| Ipv4Addr::new(10, 42, 0, r));
                        let before = p.address_of(&owner(o));
                        match p.allocate(&owner(o), requested, now) {
                            Ok(ip) => {
                                prop_assert!(subnet.contains(ip) && ip != subnet.network() && ip != subnet.broadcast());
                                prop_assert_eq!(p.holder(ip), Some(&owner(o)));
                                if let Some(r) = requested { prop_assert_eq!(ip, r); }
                            }
                            Err(IpamError::Taken { holder, .. }) => prop_assert_ne!(holder, owner(o)),
                            Err(IpamError::Exhausted { .. }) => prop_assert!(p.by_ip.len() + p.held.len() >= p.capacity()),
                            Err(IpamError::Reserved { .. } | IpamError::HeldBack { .. }) => {}
                            Err(other) => prop_assert!(false, "unexpected {other}"),
                        }
                        // A refused request never loses what the owner had.
                        if p.address_of(&owner(o)).is_none() { prop_assert_eq!(before, None); }
                    }
                    Op::Release { owner: o } => { p.release(&owner(o), now); }
                    Op::Tick { secs } => now += u64::from(secs),
                    Op::Restart => {
                        // Rebuild from what would be persisted: the owners' addresses.
                        let persisted: Vec<(Owner, Ipv4Addr)> = p.allocations().map(|(ip, o)| (o.clone(), ip)).collect();
                        let mut rebuilt = Pool::new(subnet, 20).unwrap();
                        for (o, ip) in &persisted { rebuilt.restore(o.clone(), *ip).unwrap(); }
                        let again: Vec<(Owner, Ipv4Addr)> = rebuilt.allocations().map(|(ip, o)| (o.clone(), ip)).collect();
                        prop_assert_eq!(&again, &persisted);
                        p = rebuilt;
                    }
                }
                // The invariant: both indexes agree, one owner per address, one address per owner.
                prop_assert_eq!(p.by_ip.len(), p.by_owner.len());
                for (ip, o) in &p.by_ip { prop_assert_eq!(p.by_owner.get(o), Some(ip)); }
                prop_assert!(p.used() <= p.capacity());
            }
        }
    }

    proptest! {
        /// With part of the pool reserved for nodes, no service is ever given or granted an
        /// address in it, and while a node address is free a node always gets one.
        #[test]
        fn the_node_reserve_holds_whatever_services_do(ops in proptest::collection::vec(op(), 1..200), reserve in 1u32..8) {
            let mut p = Pool::new(Subnet::parse("10.42.0.0/28").unwrap(), 0).unwrap().reserve_for_nodes(reserve).unwrap();
            let (first_reserved, _) = p.node_reserve().unwrap();
            for op in ops {
                match op {
                    Op::Allocate { owner: o, request } => {
                        let requested = request.map(|r| Ipv4Addr::new(10, 42, 0, r));
                        if let Ok(ip) = p.allocate(&owner(o), requested, 0)
                            && matches!(owner(o), Owner::Service { .. })
                        {
                            prop_assert!(ip < first_reserved, "{} got {ip} in the node reserve", owner(o));
                        }
                    }
                    Op::Release { owner: o } => { p.release(&owner(o), 0); }
                    Op::Tick { .. } | Op::Restart => {}
                }
                let free_reserved = (u32::from(first_reserved)..=u32::from(Ipv4Addr::new(10, 42, 0, 14)))
                    .any(|ip| p.holder(Ipv4Addr::from(ip)).is_none());
                if free_reserved {
                    let mut q = p.clone();
                    prop_assert!(q.allocate(&Owner::node("newcomer"), None, 0).is_ok());
                }
            }
        }

        /// A pool hands out every usable address exactly once, then reports exhaustion; the
        /// addresses released (no hold-back) are exactly the ones handed out next; a held-back
        /// address goes to no one else until its time is up.
        #[test]
        fn exhaustion_release_and_reallocation(
            prefix in 26u8..=30,
            released in proptest::collection::vec(any::<proptest::sample::Index>(), 0..20),
            hold in 0u64..3,
        ) {
            let subnet = Subnet::parse(&format!("10.42.0.0/{prefix}")).unwrap();
            let mut p = Pool::new(subnet, hold).unwrap();
            let cap = p.capacity();
            prop_assert_eq!(cap, (1usize << (32 - prefix)) - 2);
            let mut given = Vec::new();
            for i in 0..cap {
                let ip = p.allocate(&Owner::node(format!("a{i}")), None, 0).unwrap();
                prop_assert!(subnet.contains(ip) && ip != subnet.network() && ip != subnet.broadcast());
                given.push(ip);
            }
            let distinct: std::collections::BTreeSet<_> = given.iter().collect();
            prop_assert_eq!(distinct.len(), cap);
            prop_assert_eq!(p.allocate(&Owner::node("late"), None, 0), Err(IpamError::Exhausted { subnet, used: cap }));

            let freed: std::collections::BTreeSet<usize> = released.iter().map(|i| i.index(cap)).collect();
            for i in &freed {
                prop_assert_eq!(p.release(&Owner::node(format!("a{i}")), 10), Some(given[*i]));
            }
            let freed_ips: std::collections::BTreeSet<Ipv4Addr> = freed.iter().map(|i| given[*i]).collect();
            if hold > 0 && !freed.is_empty() {
                // Held back: no one new gets them before 10 + hold, their previous owners may.
                let early = p.allocate(&Owner::node("new"), None, 10 + hold - 1);
                prop_assert!(matches!(early, Err(IpamError::Exhausted { used: _, subnet: _ })), "{:?}", early);
                let back = *freed.iter().next().unwrap();
                prop_assert_eq!(p.allocate(&Owner::node(format!("a{back}")), Some(given[back]), 10), Ok(given[back]));
                p.release(&Owner::node(format!("a{back}")), 10);
            }
            let mut again = std::collections::BTreeSet::new();
            for i in 0..freed.len() {
                again.insert(p.allocate(&Owner::node(format!("b{i}")), None, 10 + hold).unwrap());
            }
            prop_assert_eq!(again, freed_ips);
            let late = p.allocate(&Owner::node("late"), None, 10 + hold);
            prop_assert!(matches!(late, Err(IpamError::Exhausted { used: _, subnet: _ })), "{:?}", late);
        }

        /// Restoring arbitrary recorded allocations (duplicates, outsiders, reserved addresses,
        /// owners recorded twice) keeps the first valid claim of each address and owner, and
        /// what is allocated afterwards never collides with what was restored.
        #[test]
        fn restore_from_arbitrary_records(records in proptest::collection::vec((0u8..40, 0u8..40), 0..60)) {
            let subnet = Subnet::parse("10.42.0.0/27").unwrap();
            let mut p = Pool::new(subnet, 300).unwrap();
            let mut by_ip: BTreeMap<Ipv4Addr, Owner> = BTreeMap::new();
            let mut by_owner: BTreeMap<Owner, Ipv4Addr> = BTreeMap::new();
            for (o, last) in records {
                let (o, ip) = (owner(o), Ipv4Addr::new(10, 42, 0, last));
                let result = p.restore(o.clone(), ip);
                if last >= 32 {
                    let outside = matches!(result, Err(IpamError::OutsideSubnet { ip: _, subnet: _ }));
                    prop_assert!(outside, "{:?}", result);
                } else if last == 0 || last == 31 {
                    let reserved = matches!(result, Err(IpamError::Reserved { ip: _, subnet: _ }));
                    prop_assert!(reserved, "{:?}", result);
                } else if let Some(holder) = by_ip.get(&ip).filter(|h| **h != o) {
                    prop_assert_eq!(result, Err(IpamError::Taken { ip, holder: holder.clone() }));
                } else {
                    prop_assert_eq!(result, Ok(()));
                    if !by_owner.contains_key(&o) {
                        by_owner.insert(o.clone(), ip);
                        by_ip.insert(ip, o);
                    }
                }
            }
            let restored: Vec<(Ipv4Addr, Owner)> = p.allocations().map(|(ip, o)| (ip, o.clone())).collect();
            prop_assert_eq!(restored, by_ip.clone().into_iter().collect::<Vec<_>>());
            let mut fresh = 0;
            for i in 0..40 {
                match p.allocate(&Owner::service("new", format!("s{i}")), None, 0) {
                    Ok(ip) => {
                        prop_assert!(!by_ip.contains_key(&ip), "{ip} handed out again after its restore");
                        fresh += 1;
                    }
                    Err(IpamError::Exhausted { .. }) => {}
                    Err(other) => prop_assert!(false, "unexpected {other}"),
                }
            }
            prop_assert_eq!(fresh, p.capacity() - by_ip.len());
        }

        /// An address released at t goes to no other owner before t + hold, whatever the
        /// sequence of requests, releases, time and restarts (with the holds given back).
        #[test]
        fn a_released_address_goes_to_no_one_else_while_held(ops in proptest::collection::vec(op(), 1..200)) {
            let mut p = Pool::new(Subnet::parse("10.42.0.0/28").unwrap(), 20).unwrap();
            let mut released: BTreeMap<Ipv4Addr, (Owner, u64)> = BTreeMap::new();
            let mut now = 0u64;
            for op in ops {
                match op {
                    Op::Allocate { owner: o, request } => {
                        let requested = request.map(|r| Ipv4Addr::new(10, 42, 0, r));
                        let had = p.address_of(&owner(o));
                        if let Ok(ip) = p.allocate(&owner(o), requested, now) {
                            if let Some((previous, until)) = released.get(&ip) {
                                prop_assert!(
                                    *previous == owner(o) || *until <= now,
                                    "{ip}, released by {previous} until t={until}, went to {} at t={now}", owner(o)
                                );
                            }
                            if had.is_some_and(|old| old != ip) {
                                released.insert(had.unwrap(), (owner(o), now + 20));
                            }
                        }
                    }
                    Op::Release { owner: o } => {
                        if let Some(ip) = p.release(&owner(o), now) {
                            released.insert(ip, (owner(o), now + 20));
                        }
                    }
                    Op::Tick { secs } => now += u64::from(secs),
                    // A restart rebuilds the pool from what is persisted: the owners' addresses
                    // and the holds (the clock is the caller's; here it goes on).
                    Op::Restart => {
                        let mut rebuilt = Pool::new(p.subnet(), 20).unwrap();
                        for (ip, o) in p.allocations() { rebuilt.restore(o.clone(), ip).unwrap(); }
                        for (ip, o, until) in p.holds(now) { prop_assert!(rebuilt.restore_hold(ip, o.clone(), until)); }
                        p = rebuilt;
                    }
                }
            }
        }
    }
}
