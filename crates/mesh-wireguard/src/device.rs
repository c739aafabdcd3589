//! The desired device, the actual one, and the diff between them.
//!
//! [`plan`] follows innernet's rule (fetch → diff → apply) with one more: a peer is only ever
//! touched when it differs, so adding, removing or changing one peer never interrupts the
//! sessions of the others, and an empty [`DevicePlan`] means nothing is applied at all.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;

use crate::key::{Key, PrivateKey};

/// What one peer should look like.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerConfig {
    /// Where to send its packets; `None` leaves whatever the device learned (roaming).
    pub endpoint: Option<SocketAddr>,
    /// The addresses this peer may send from and receives for.
    pub allowed_ips: BTreeSet<IpNet>,
    /// Keepalive interval in seconds; `None` (or 0) is off.
    pub persistent_keepalive: Option<u16>,
}

/// What the device should look like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// The node's own private key.
    pub private_key: PrivateKey,
    /// The UDP port to listen on.
    pub listen_port: u16,
    /// Every other node, by public key.
    pub peers: BTreeMap<Key, PeerConfig>,
}

/// One peer as the device reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerState {
    /// Its configuration as the device has it now (the endpoint may be a learned one).
    pub config: PeerConfig,
    /// When the last handshake completed; `None` if never.
    pub last_handshake: Option<SystemTime>,
    /// Bytes received from this peer.
    pub rx_bytes: u64,
    /// Bytes sent to this peer.
    pub tx_bytes: u64,
}

impl PeerState {
    /// How long ago the last handshake was, at `now`; `None` if there never was one.
    pub fn handshake_age(&self, now: SystemTime) -> Option<Duration> {
        self.last_handshake.map(|at| now.duration_since(at).unwrap_or_default())
    }
}

/// The device as it reports itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceState {
    /// Its private key, if one is set.
    pub private_key: Option<PrivateKey>,
    /// Its listen port, if bound.
    pub listen_port: Option<u16>,
    /// Its peers, by public key.
    pub peers: BTreeMap<Key, PeerState>,
}

/// A change to one existing peer: each `Some` field is set, each `None` left as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerUpdate {
    /// The peer's public key.
    pub public_key: Key,
    /// A new endpoint.
    pub endpoint: Option<SocketAddr>,
    /// A new set of allowed IPs, replacing the old one.
    pub allowed_ips: Option<BTreeSet<IpNet>>,
    /// A new keepalive interval (0 turns it off).
    pub persistent_keepalive: Option<u16>,
}

impl PeerUpdate {
    /// A change to the peer `public_key` that changes nothing yet.
    pub fn new(public_key: Key) -> Self {
        Self { public_key, endpoint: None, allowed_ips: None, persistent_keepalive: None }
    }
}

/// The smallest set of changes that turns the actual device into the desired one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DevicePlan {
    /// Set the private key (first start, or a rotated key).
    pub private_key: Option<PrivateKey>,
    /// Set the listen port.
    pub listen_port: Option<u16>,
    /// Peers to remove.
    pub remove: Vec<Key>,
    /// Peers to add.
    pub add: Vec<(Key, PeerConfig)>,
    /// Peers to change in place.
    pub update: Vec<PeerUpdate>,
}

impl DevicePlan {
    /// True when the device already is what is wanted: nothing is to be applied.
    pub fn is_empty(&self) -> bool {
        self.private_key.is_none()
            && self.listen_port.is_none()
            && self.remove.is_empty()
            && self.add.is_empty()
            && self.update.is_empty()
    }

    /// How many peers the plan touches.
    pub fn peers_touched(&self) -> usize {
        self.remove.len() + self.add.len() + self.update.len()
    }
}

/// How recent a peer's last handshake must be for its session to count as live. WireGuard
/// rekeys every 120 s while traffic flows and gives a session up after 180 s (`REJECT_AFTER_TIME`),
/// so a handshake younger than this means the endpoint the device has is one packets arrive from.
pub const LIVE_SESSION: Duration = Duration::from_secs(180);

/// True when `peer` completed a handshake less than [`LIVE_SESSION`] before `now`.
pub fn session_live(peer: &PeerState, now: SystemTime) -> bool {
    peer.handshake_age(now).is_some_and(|age| age < LIVE_SESSION)
}

/// Compares the actual device with the desired one and returns only what differs, at the
/// current time (see [`plan_at`]).
pub fn plan(actual: &DeviceState, desired: &DeviceConfig) -> DevicePlan {
    plan_at(actual, desired, SystemTime::now())
}

/// Compares the actual device with the desired one at `now` and returns only what differs.
///
/// Endpoints: an endpoint the device learned by roaming is kept when the desired peer has none.
/// A desired endpoint is applied only while the peer has no live session (never a handshake, or
/// the last one [`LIVE_SESSION`] or longer ago, as the device reports it): a peer behind a NAT
/// publishes its private address, but its packets arrive from the NAT's public one, which
/// WireGuard learns by roaming; overwriting that on every sync would cut the peer off until it
/// sends again. A wrong learned endpoint still gets corrected once its session goes stale.
/// Keepalive `None` and `Some(0)` are the same (off).
pub fn plan_at(actual: &DeviceState, desired: &DeviceConfig, now: SystemTime) -> DevicePlan {
    let mut plan = DevicePlan::default();
    if actual.private_key.as_ref() != Some(&desired.private_key) {
        plan.private_key = Some(desired.private_key.clone());
    }
    if actual.listen_port != Some(desired.listen_port) {
        plan.listen_port = Some(desired.listen_port);
    }
    plan.remove = actual.peers.keys().filter(|key| !desired.peers.contains_key(key)).copied().collect();
    for (key, want) in &desired.peers {
        let Some(have) = actual.peers.get(key) else {
            plan.add.push((*key, want.clone()));
            continue;
        };
        let keep_learned = have.config.endpoint.is_some() && session_live(have, now);
        let have = &have.config;
        let update = PeerUpdate {
            public_key: *key,
            endpoint: want.endpoint.filter(|e| !keep_learned && have.endpoint != Some(*e)),
            allowed_ips: (want.allowed_ips != have.allowed_ips).then(|| want.allowed_ips.clone()),
            persistent_keepalive: (want.persistent_keepalive.unwrap_or(0) != have.persistent_keepalive.unwrap_or(0))
                .then(|| want.persistent_keepalive.unwrap_or(0)),
        };
        if update != PeerUpdate::new(*key) {
            plan.update.push(update);
        }
    }
    plan
}

/// The device after `plan` is applied to `actual`, as a device that follows the UAPI semantics
/// would report it (without the statistics of new peers). Used to check plans.
pub fn applied(actual: &DeviceState, plan: &DevicePlan) -> DeviceState {
    let mut next = actual.clone();
    apply_to(&mut next, plan);
    next
}

/// Applies `plan` to `state` in place, as [`applied`] does: what an agent that keeps the device's
/// state between reads knows it to be after a write.
pub fn apply_to(state: &mut DeviceState, plan: &DevicePlan) {
    if let Some(key) = &plan.private_key {
        state.private_key = Some(key.clone());
    }
    if let Some(port) = plan.listen_port {
        state.listen_port = Some(port);
    }
    for key in &plan.remove {
        state.peers.remove(key);
    }
    for (key, config) in &plan.add {
        let mut config = config.clone();
        config.persistent_keepalive = config.persistent_keepalive.filter(|k| *k > 0);
        state.peers.insert(*key, PeerState { config, ..PeerState::default() });
    }
    for update in &plan.update {
        let Some(peer) = state.peers.get_mut(&update.public_key) else { continue };
        if let Some(endpoint) = update.endpoint {
            peer.config.endpoint = Some(endpoint);
        }
        if let Some(ips) = &update.allowed_ips {
            peer.config.allowed_ips = ips.clone();
        }
        if let Some(keepalive) = update.persistent_keepalive {
            peer.config.persistent_keepalive = (keepalive > 0).then_some(keepalive);
        }
    }
}

/// The device as its owner knows it between reads: the state last read, with every change the
/// owner applied since. A sync diffs against it instead of reading every peer back (at 5,000
/// peers the read costs the agent more than the diff); a resync reads again, which repairs what
/// anyone else changed on the device. A failed or partial write leaves the state unknown, and the
/// next diff reads first.
#[derive(Clone, Debug, Default)]
pub struct Known {
    state: Option<DeviceState>,
}

impl Known {
    /// Whether the device must be read before the next diff: asked to (`read_back`), or its
    /// state is not known (never read, or a write failed since).
    pub fn needs_read(&self, read_back: bool) -> bool {
        read_back || self.state.is_none()
    }

    /// Keeps `state`, just read from the device.
    pub fn read(&mut self, state: DeviceState) -> &DeviceState {
        self.state.insert(state)
    }

    /// Records a write of `plan`: applied to the kept state when it `succeeded`, else the state
    /// is forgotten (the device may hold part of the plan).
    pub fn wrote(&mut self, plan: &DevicePlan, succeeded: bool) {
        match (&mut self.state, succeeded) {
            (Some(state), true) => apply_to(state, plan),
            _ => self.state = None,
        }
    }

    /// The state as known now, if it is.
    pub fn state(&self) -> Option<&DeviceState> {
        self.state.as_ref()
    }

    /// Forgets the state: the next diff reads the device.
    pub fn forget(&mut self) {
        self.state = None;
    }

    /// The changes that turn the known device into `desired` at `now`; `None` when the state is
    /// not known.
    pub fn diff_at(&self, desired: &DeviceConfig, now: SystemTime) -> Option<DevicePlan> {
        self.state.as_ref().map(|state| plan_at(state, desired, now))
    }

    /// Whether `diff`, taken against the kept state, may be written without reading the device
    /// first. Not when it sets an existing peer's endpoint: that is decided by whether the peer's
    /// session is live, and the kept handshake times are as old as the last read: a peer behind
    /// a NAT that handshook since would lose the endpoint WireGuard learned (see [`plan_at`]).
    pub fn trusts(diff: &DevicePlan) -> bool {
        diff.update.iter().all(|update| update.endpoint.is_none())
    }
}

#[cfg(test)]
mod tests {
    use proptest::collection::{btree_map, btree_set};
    use proptest::prelude::*;

    use super::*;

    fn key(n: u8) -> Key {
        Key::from_bytes([n; 32])
    }

    fn peer(ips: &[&str], endpoint: Option<&str>) -> PeerConfig {
        PeerConfig {
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            allowed_ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            persistent_keepalive: None,
        }
    }

    fn state(config: &DeviceConfig) -> DeviceState {
        DeviceState {
            private_key: Some(config.private_key.clone()),
            listen_port: Some(config.listen_port),
            peers: config
                .peers
                .iter()
                .map(|(k, c)| (*k, PeerState { config: c.clone(), rx_bytes: 7, ..PeerState::default() }))
                .collect(),
        }
    }

    fn three_peers() -> DeviceConfig {
        DeviceConfig {
            private_key: PrivateKey::from_bytes([9; 32]),
            listen_port: 51820,
            peers: [
                (key(1), peer(&["10.42.0.1/32"], Some("192.168.77.1:51820"))),
                (key(2), peer(&["10.42.0.2/32"], Some("192.168.77.2:51820"))),
                (key(3), peer(&["10.42.0.3/32"], Some("192.168.77.3:51820"))),
            ]
            .into(),
        }
    }

    #[test]
    fn nothing_is_applied_when_nothing_changed() {
        let desired = three_peers();
        let plan = plan(&state(&desired), &desired);
        assert!(plan.is_empty(), "{plan:?}");
    }

    #[test]
    fn a_fresh_device_gets_key_port_and_all_peers() {
        let desired = three_peers();
        let plan = plan(&DeviceState::default(), &desired);
        assert_eq!(plan.private_key.as_ref(), Some(&desired.private_key));
        assert_eq!(plan.listen_port, Some(51820));
        assert_eq!(plan.add.len(), 3);
        assert!(plan.remove.is_empty() && plan.update.is_empty());
    }

    #[test]
    fn adding_one_service_ip_updates_only_that_peer() {
        let mut desired = three_peers();
        let actual = state(&desired);
        desired.peers.get_mut(&key(2)).unwrap().allowed_ips.insert("10.42.7.7/32".parse().unwrap());
        let plan = plan(&actual, &desired);
        assert_eq!(plan.peers_touched(), 1);
        assert_eq!(plan.update[0].public_key, key(2));
        assert_eq!(plan.update[0].allowed_ips.as_ref().unwrap().len(), 2);
        assert_eq!(plan.update[0].endpoint, None);
        assert!(plan.private_key.is_none() && plan.listen_port.is_none());
    }

    #[test]
    fn removing_one_node_removes_only_it() {
        let mut desired = three_peers();
        let actual = state(&desired);
        desired.peers.remove(&key(3));
        let plan = plan(&actual, &desired);
        assert_eq!(plan.remove, vec![key(3)]);
        assert_eq!(plan.peers_touched(), 1);
    }

    #[test]
    fn a_learned_endpoint_is_kept_unless_one_is_wanted() {
        let mut desired = three_peers();
        let mut actual = state(&desired);
        actual.peers.get_mut(&key(1)).unwrap().config.endpoint = Some("198.51.100.1:4444".parse().unwrap());
        desired.peers.get_mut(&key(1)).unwrap().endpoint = None;
        assert!(plan(&actual, &desired).is_empty());
        desired.peers.get_mut(&key(1)).unwrap().endpoint = Some("192.168.77.1:51820".parse().unwrap());
        let plan = plan(&actual, &desired);
        assert_eq!(plan.update.len(), 1);
        assert_eq!(plan.update[0].endpoint, Some("192.168.77.1:51820".parse().unwrap()));
    }

    /// Peer 1 behind a NAT: the directory has its private address, the device learned the NAT's.
    fn roamed(handshake_age: Option<u64>, now: SystemTime) -> (DeviceState, DeviceConfig) {
        let mut desired = three_peers();
        desired.peers.get_mut(&key(1)).unwrap().endpoint = Some("10.77.1.2:51820".parse().unwrap());
        let mut actual = state(&desired);
        let peer = actual.peers.get_mut(&key(1)).unwrap();
        peer.config.endpoint = Some("192.168.77.231:51820".parse().unwrap());
        peer.last_handshake = handshake_age.map(|s| now - Duration::from_secs(s));
        (actual, desired)
    }

    #[test]
    fn a_live_session_keeps_its_learned_endpoint() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for age in [0, 5, 179] {
            let (actual, desired) = roamed(Some(age), now);
            let plan = plan_at(&actual, &desired, now);
            assert!(plan.is_empty(), "handshake {age} s ago: {plan:?}");
        }
        // Other changes to that peer still apply, without its endpoint.
        let (actual, mut desired) = roamed(Some(10), now);
        desired.peers.get_mut(&key(1)).unwrap().allowed_ips.insert("10.42.7.7/32".parse().unwrap());
        let plan = plan_at(&actual, &desired, now);
        assert_eq!(plan.update.len(), 1);
        assert_eq!(plan.update[0].endpoint, None);
        assert!(plan.update[0].allowed_ips.is_some());
    }

    #[test]
    fn without_a_live_session_the_directory_endpoint_wins() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        // Never a handshake, or a stale one: the learned endpoint may be wrong, so it is corrected.
        for age in [None, Some(180), Some(600)] {
            let (actual, desired) = roamed(age, now);
            let plan = plan_at(&actual, &desired, now);
            assert_eq!(plan.update.len(), 1, "handshake {age:?}: {plan:?}");
            assert_eq!(plan.update[0].endpoint, Some("10.77.1.2:51820".parse().unwrap()));
        }
        // A live peer that has no endpoint at all gets the directory's.
        let (mut actual, desired) = roamed(Some(1), now);
        actual.peers.get_mut(&key(1)).unwrap().config.endpoint = None;
        assert_eq!(plan_at(&actual, &desired, now).update[0].endpoint, Some("10.77.1.2:51820".parse().unwrap()));
        // A handshake in the future (clock step) counts as live.
        let (mut actual, desired) = roamed(None, now);
        actual.peers.get_mut(&key(1)).unwrap().last_handshake = Some(now + Duration::from_secs(30));
        assert!(plan_at(&actual, &desired, now).is_empty());
    }

    #[test]
    fn keepalive_none_and_zero_are_both_off() {
        let mut desired = three_peers();
        let mut actual = state(&desired);
        actual.peers.get_mut(&key(1)).unwrap().config.persistent_keepalive = Some(0);
        assert!(plan(&actual, &desired).is_empty());
        desired.peers.get_mut(&key(1)).unwrap().persistent_keepalive = Some(25);
        assert_eq!(plan(&actual, &desired).update[0].persistent_keepalive, Some(25));
    }

    #[test]
    fn a_rotated_key_is_set_without_touching_peers() {
        let mut desired = three_peers();
        let actual = state(&desired);
        desired.private_key = PrivateKey::from_bytes([10; 32]);
        let plan = plan(&actual, &desired);
        assert!(plan.private_key.is_some());
        assert_eq!(plan.peers_touched(), 0);
    }

    #[test]
    fn the_known_state_follows_each_write_without_a_read_and_a_resync_reads_what_changed_behind_it() {
        let now = SystemTime::now();
        let mut known = Known::default();
        assert!(known.needs_read(false), "never read: read first");
        assert_eq!(known.diff_at(&three_peers(), now), None);
        let mut device = DeviceState::default();
        known.read(device.clone());
        assert!(!known.needs_read(false) && known.needs_read(true), "a resync always reads");

        let desired = three_peers();
        let first = known.diff_at(&desired, now).unwrap();
        assert_eq!(first.add.len(), 3);
        apply_to(&mut device, &first);
        known.wrote(&first, true);
        assert!(!known.needs_read(false));
        assert!(known.diff_at(&desired, now).unwrap().is_empty(), "the write is known: nothing to do, no read");

        // Someone removes a peer behind the agent's back: a sync without a read does not see it,
        // the resync's read does, and the diff puts it back.
        device.peers.remove(&key(2));
        assert!(known.diff_at(&desired, now).unwrap().is_empty());
        known.read(device.clone());
        let repair = known.diff_at(&desired, now).unwrap();
        assert_eq!(repair.add.iter().map(|(k, _)| *k).collect::<Vec<_>>(), [key(2)]);

        // An endpoint to set on an existing peer: only after a read (its session may have come
        // alive since the last one).
        let mut moved = desired.clone();
        moved.peers.get_mut(&key(1)).unwrap().endpoint = Some(SocketAddr::from(([192, 168, 77, 9], 51820)));
        let diff = known.diff_at(&moved, now).unwrap();
        assert!(!Known::trusts(&diff) && Known::trusts(&repair) && Known::trusts(&first));

        // A failed write: the device may hold part of it, so the next diff reads first.
        known.wrote(&repair, false);
        assert!(known.needs_read(false));
        assert_eq!(known.diff_at(&desired, now), None);
        known.read(device);
        known.forget();
        assert!(known.needs_read(false));
    }

    fn arb_peer() -> impl Strategy<Value = PeerConfig> {
        (
            proptest::option::of((1u8..4, 1u16..4).prop_map(|(h, p)| SocketAddr::from(([192, 168, 77, h], p)))),
            btree_set(
                (0u8..8).prop_map(|n| IpNet::from(ipnet::Ipv4Net::from(std::net::Ipv4Addr::new(10, 42, 0, n)))),
                0..4,
            ),
            proptest::option::of(0u16..3),
        )
            .prop_map(|(endpoint, allowed_ips, persistent_keepalive)| PeerConfig {
                endpoint,
                allowed_ips,
                persistent_keepalive,
            })
    }

    fn arb_device() -> impl Strategy<Value = DeviceConfig> {
        (0u8..3, 1u16..3, btree_map((0u8..6).prop_map(key), arb_peer(), 0..6)).prop_map(|(k, port, peers)| {
            DeviceConfig { private_key: PrivateKey::from_bytes([k; 32]), listen_port: port, peers }
        })
    }

    proptest! {
        /// Applying the plan gives the desired device, a second plan is empty, and only peers that
        /// differ are touched.
        #[test]
        fn plan_converges_and_touches_only_what_differs(before in arb_device(), after in arb_device()) {
            let actual = state(&before);
            let plan = plan(&actual, &after);
            let result = applied(&actual, &plan);
            prop_assert!(super::plan(&result, &after).is_empty());
            prop_assert_eq!(result.peers.keys().collect::<Vec<_>>(), after.peers.keys().collect::<Vec<_>>());
            for (key, want) in &after.peers {
                let got = &result.peers[key].config;
                prop_assert_eq!(&got.allowed_ips, &want.allowed_ips);
                if want.endpoint.is_some() {
                    prop_assert_eq!(got.endpoint, want.endpoint);
                }
            }
            let differing = after.peers.iter().filter(|(k, c)| {
                before.peers.get(*k).is_none_or(|old| {
                    old.allowed_ips != c.allowed_ips
                        || (c.endpoint.is_some() && old.endpoint != c.endpoint)
                        || old.persistent_keepalive.unwrap_or(0) != c.persistent_keepalive.unwrap_or(0)
                })
            }).count() + before.peers.keys().filter(|k| !after.peers.contains_key(k)).count();
            prop_assert_eq!(plan.peers_touched(), differing);
            // Statistics of untouched peers survive.
            for (key, peer) in &result.peers {
                if before.peers.contains_key(key) {
                    prop_assert_eq!(peer.rx_bytes, 7);
                }
            }
        }

        /// With live sessions: a live peer's endpoint is never touched, every other difference is
        /// applied as without them, and a second plan is empty.
        #[test]
        fn a_live_session_endpoint_is_never_replaced(
            before in arb_device(),
            after in arb_device(),
            ages in proptest::collection::vec(proptest::option::of(0u64..400), 6),
        ) {
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
            let mut actual = state(&before);
            for (i, peer) in actual.peers.values_mut().enumerate() {
                peer.last_handshake = ages[i % ages.len()].map(|s| now - Duration::from_secs(s));
            }
            let plan = plan_at(&actual, &after, now);
            let result = applied(&actual, &plan);
            prop_assert!(plan_at(&result, &after, now).is_empty());
            for (key, want) in &after.peers {
                let got = &result.peers[key].config;
                prop_assert_eq!(&got.allowed_ips, &want.allowed_ips);
                prop_assert_eq!(got.persistent_keepalive.unwrap_or(0), want.persistent_keepalive.unwrap_or(0));
                match actual.peers.get(key) {
                    Some(old) if old.config.endpoint.is_some() && session_live(old, now) => {
                        prop_assert_eq!(got.endpoint, old.config.endpoint);
                    }
                    _ if want.endpoint.is_some() => prop_assert_eq!(got.endpoint, want.endpoint),
                    _ => {}
                }
            }
        }
    }
}
