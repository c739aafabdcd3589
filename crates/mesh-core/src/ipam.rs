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
//! - an exhausted pool is an error value, never a panic.
//!
//! Time is a plain number of seconds passed in by the caller, so the pool has no clock and is
//! deterministic under test. The pool keeps no state of its own that matters across restarts:
//! the allocations are persisted in the objects' status and [`Pool::restore`] rebuilds it.

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
        })
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
            let ip = self.next_free(now)?;
            self.insert(owner.clone(), ip);
            self.cursor = if ip == self.last { self.first } else { ip + 1 };
            return Ok(Ipv4Addr::from(ip));
        };
        let raw = self.check_requestable(requested)?;
        if current == Some(raw) {
            return Ok(requested);
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

    /// The first free, not-held-back address at or after the cursor, wrapping once.
    fn next_free(&mut self, now: u64) -> Result<u32, IpamError> {
        self.held.retain(|_, held| held.until > now);
        if self.by_ip.len() + self.held.len() >= self.capacity() {
            return Err(IpamError::Exhausted { subnet: self.subnet, used: self.used() });
        }
        let taken = |ip: &u32| self.by_ip.contains_key(ip) || self.held.contains_key(ip);
        let mut ip = self.cursor;
        // The loop ends: fewer addresses are taken than exist, checked above.
        loop {
            if !taken(&ip) {
                return Ok(ip);
            }
            ip = if ip == self.last { self.first } else { ip + 1 };
        }
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

        /// Within one pool's life, an address released at t goes to no other owner before
        /// t + hold, whatever the sequence of requests, releases and time.
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
                    // The hold-back lives in memory only (see `Pool::restore`): not part of this property.
                    Op::Restart => {}
                }
            }
        }
    }
}
