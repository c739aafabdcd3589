//! Relayed paths. When a node and one of its peers have no direct WireGuard path (both behind
//! NAT, say), their traffic goes through a relay: a member the administrator marked
//! `spec.relay: true`, which both reach directly.
//!
//! - **Both ends pick the same relay.** Otherwise each would accept the other's addresses only
//!   from a different peer and drop what arrives. So the relay of a pair is a function of the
//!   directory alone ([`relay_of`]: rendezvous hashing over the pair's names, which also spreads
//!   pairs over several relays).
//! - **Both ends decide alike.** Each end relays a peer once its own device has had no live
//!   session with it for a few seconds (the agent's observation, an input here). A WireGuard
//!   handshake is one exchange, so both ends see it succeed or fail together.
//! - **Direct is preferred.** On the node's device, a relayed peer's allowed IPs move to the
//!   relay's peer entry ([`reroute`]). The peer itself stays on the device, with no allowed IPs
//!   and a keepalive of [`RELAYED_KEEPALIVE`] seconds at most. WireGuard tries a handshake when a
//!   keepalive is turned on (and retries it for 90 s), so the agent turns it off and on again
//!   every [`RETRY_DIRECT_EVERY`]; once a handshake succeeds, its next plan routes the peer
//!   directly again.
//! - **Anti-spoofing holds.** WireGuard gives each address to one peer. A relayed peer's
//!   addresses are accepted only from the relay, which accepts them only from that peer (its
//!   own device is unchanged), so a third member still cannot send with them. The relay itself
//!   is trusted with the addresses of the peers it carries; only an administrator can make a
//!   node one (agents cannot write a MeshNode's spec).
//!
//! The relay forwards between peers on its WireGuard interface only (`LinkAddresses::forwarding`
//! and the ruleset's forward rule); the destination's own port rules still apply.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use mesh_wireguard::{Key, PeerConfig};

/// The keepalive (seconds) a relayed peer's direct entry keeps, at most: once a direct session
/// exists, it keeps the NAT mappings on both sides open.
pub const RELAYED_KEEPALIVE: u16 = 25;

/// How often the agent retries the direct path of a relayed peer (by turning its entry's
/// keepalive off and on again: WireGuard sends nothing else to an entry with no allowed IPs).
pub const RETRY_DIRECT_EVERY: Duration = Duration::from_secs(30);

/// How a node reaches the peers it has no direct path to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Paths {
    /// Peers reached through a relay: peer name → relay name.
    pub relayed: BTreeMap<String, String>,
    /// Peers with neither a direct path nor a usable relay: peer name → why.
    pub stranded: BTreeMap<String, String>,
}

/// FNV-1a 64 of `parts`, each followed by a 0 byte, then SplitMix64's finaliser (FNV alone
/// barely mixes the last bytes, and relay names often differ only there).
fn score(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in parts.iter().flat_map(|p| p.bytes().chain([0])) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// The relay that carries the traffic between `a` and `b`: of `relays`, the one with the highest
/// score for the pair (rendezvous hashing: the same whichever end asks, and moving few pairs
/// when a relay comes or goes), never `a` or `b` themselves. `None`: there is no other relay.
pub fn relay_of<'r>(a: &str, b: &str, relays: impl IntoIterator<Item = &'r str>) -> Option<&'r str> {
    let (low, high) = if a <= b { (a, b) } else { (b, a) };
    relays.into_iter().filter(|r| *r != a && *r != b).max_by_key(|r| (score(&[low, high, r]), std::cmp::Reverse(*r)))
}

/// The paths of node `me` to the peers in `without_direct` (those its device has had no live
/// session with for a while): each one's relay ([`relay_of`] over `relays`), unless that relay
/// is itself without a direct path, or there is none.
pub fn choose(me: &str, without_direct: &BTreeSet<String>, relays: &BTreeSet<&str>) -> Paths {
    let mut paths = Paths::default();
    for peer in without_direct {
        match relay_of(me, peer, relays.iter().copied()) {
            Some(relay) if !without_direct.contains(relay) => {
                paths.relayed.insert(peer.clone(), relay.to_owned());
            }
            Some(relay) => {
                paths
                    .stranded
                    .insert(peer.clone(), format!("no direct handshake, and none with its relay {relay} either"));
            }
            None => {
                let why = if relays.is_empty() {
                    "no direct handshake, and no member is a relay (set spec.relay: true on a MeshNode that every \
                     member reaches)"
                        .to_owned()
                } else {
                    "no direct handshake, and no relay other than this pair".to_owned()
                };
                paths.stranded.insert(peer.clone(), why);
            }
        }
    }
    paths
}

/// Moves each relayed peer's allowed IPs to its relay's entry in `peers` (keyed by public key;
/// `keys` gives each peer's key by name), and gives the relayed peer a keepalive of at most
/// [`RELAYED_KEEPALIVE`] so that its direct handshake keeps being tried. A peer or relay with no
/// entry is left alone.
pub fn reroute(peers: &mut BTreeMap<Key, PeerConfig>, keys: &BTreeMap<&str, Key>, relayed: &BTreeMap<String, String>) {
    for (peer, via) in relayed {
        let (Some(peer_key), Some(via_key)) = (keys.get(peer.as_str()), keys.get(via.as_str())) else {
            continue;
        };
        if !peers.contains_key(via_key) {
            continue;
        }
        let Some(entry) = peers.get_mut(peer_key) else {
            continue;
        };
        let moved = std::mem::take(&mut entry.allowed_ips);
        let own = entry.persistent_keepalive.filter(|k| *k > 0);
        entry.persistent_keepalive = Some(own.map_or(RELAYED_KEEPALIVE, |k| k.min(RELAYED_KEEPALIVE)));
        if let Some(relay) = peers.get_mut(via_key) {
            relay.allowed_ips.extend(moved);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use ipnet::IpNet;
    use mesh_wireguard::PrivateKey;

    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn both_ends_of_a_pair_pick_the_same_relay_and_never_themselves() {
        let relays = ["r-1", "r-2", "r-3", "nat-1"];
        for (a, b) in [("nat-1", "nat-2"), ("nat-2", "nat-3"), ("x", "y"), ("r-1", "nat-9")] {
            let one = relay_of(a, b, relays);
            assert_eq!(one, relay_of(b, a, relays), "{a} and {b} disagree");
            let one = one.expect("a relay");
            assert!(one != a && one != b, "{a}-{b} relayed through one of its own ends");
        }
        assert_eq!(relay_of("r-1", "r-2", ["r-1", "r-2"]), None);
        assert_eq!(relay_of("a", "b", [] as [&str; 0]), None);
    }

    #[test]
    fn pairs_spread_over_several_relays() {
        let relays = ["r-1", "r-2", "r-3"];
        let used: BTreeSet<&str> =
            (0..30).filter_map(|i| relay_of(&format!("nat-{i}"), &format!("nat-{}", i + 100), relays)).collect();
        assert_eq!(used.len(), 3, "30 pairs used only {used:?}");
    }

    #[test]
    fn a_peer_without_a_direct_path_goes_through_the_relay_or_says_why_not() {
        let relays: BTreeSet<&str> = ["relay"].into();
        let paths = choose("nat-1", &set(&["nat-2"]), &relays);
        assert_eq!(paths.relayed, [("nat-2".to_owned(), "relay".to_owned())].into());
        assert!(paths.stranded.is_empty());

        let paths = choose("nat-1", &set(&["nat-2", "relay"]), &relays);
        assert!(paths.relayed.is_empty(), "the relay is not reached either: {paths:?}");
        assert!(paths.stranded["nat-2"].contains("none with its relay relay"), "{paths:?}");
        assert!(paths.stranded["relay"].contains("no relay other than this pair"), "{paths:?}");

        let paths = choose("nat-1", &set(&["nat-2"]), &BTreeSet::new());
        assert!(paths.stranded["nat-2"].contains("spec.relay: true"), "{paths:?}");
        assert_eq!(choose("nat-1", &BTreeSet::new(), &relays), Paths::default());
    }

    fn peer(ips: &[&str], keepalive: Option<u16>) -> PeerConfig {
        PeerConfig {
            endpoint: Some((Ipv4Addr::new(192, 0, 2, 1), 51820).into()),
            allowed_ips: ips.iter().map(|ip| ip.parse::<IpNet>().unwrap()).collect(),
            persistent_keepalive: keepalive,
        }
    }

    #[test]
    fn rerouting_moves_the_addresses_to_the_relay_and_keeps_trying_direct() {
        let key = |i: u8| PrivateKey::from_bytes([i; 32]).public_key();
        let keys: BTreeMap<&str, Key> = [("relay", key(1)), ("nat-2", key(2)), ("open", key(3))].into();
        let mut peers: BTreeMap<Key, PeerConfig> = [
            (key(1), peer(&["10.42.0.1/32"], None)),
            (key(2), peer(&["10.42.0.2/32", "10.42.1.7/32"], Some(60))),
            (key(3), peer(&["10.42.0.3/32"], Some(10))),
        ]
        .into();
        let before = peers.clone();
        reroute(&mut peers, &keys, &[("nat-2".to_owned(), "relay".to_owned())].into());
        let relay: Vec<String> = peers[&key(1)].allowed_ips.iter().map(ToString::to_string).collect();
        assert_eq!(relay, ["10.42.0.1/32", "10.42.0.2/32", "10.42.1.7/32"]);
        assert!(peers[&key(2)].allowed_ips.is_empty(), "the relayed peer keeps no address");
        assert_eq!(peers[&key(2)].persistent_keepalive, Some(RELAYED_KEEPALIVE), "direct is retried");
        assert_eq!(peers[&key(2)].endpoint, before[&key(2)].endpoint);
        assert_eq!(peers[&key(3)], before[&key(3)], "a direct peer is untouched");

        // Every address is still on exactly one peer.
        let all: Vec<IpNet> = peers.values().flat_map(|p| p.allowed_ips.iter().copied()).collect();
        let unique: BTreeSet<IpNet> = all.iter().copied().collect();
        assert_eq!(all.len(), unique.len());
        assert_eq!(unique, before.values().flat_map(|p| p.allowed_ips.iter().copied()).collect());

        // A relay that is not a peer here: nothing moves.
        let mut untouched = before.clone();
        reroute(&mut untouched, &keys, &[("nat-2".to_owned(), "elsewhere".to_owned())].into());
        assert_eq!(untouched, before);
    }
}
