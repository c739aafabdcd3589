//! Cryptokey routing without I/O: which peer an inner packet goes to, and whether a peer may send from a source.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// A longest-prefix-match table from peers' allowed IPs to a peer key `K`.
///
/// One hash map per prefix length in use, searched from the longest prefix to the shortest, so a
/// lookup costs at most 33 hash probes whatever the number of peers. When two peers claim the same
/// prefix, the first one given to [`Router::build`] wins.
#[derive(Debug, Clone)]
pub(crate) struct Router<K> {
    /// `(prefix length, network address as u32 -> key)`, longest prefix first.
    tables: Vec<(u8, HashMap<u32, K>)>,
}

impl<K> Default for Router<K> {
    fn default() -> Self {
        Router { tables: Vec::new() }
    }
}

fn mask(prefix_len: u8) -> u32 {
    if prefix_len == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix_len)) }
}

impl<K: Clone> Router<K> {
    /// Builds the table from `(allowed network, peer)` pairs.
    pub(crate) fn build(routes: impl IntoIterator<Item = (Ipv4Net, K)>) -> Self {
        let mut by_len: HashMap<u8, HashMap<u32, K>> = HashMap::new();
        for (net, key) in routes {
            let len = net.prefix_len();
            let network = u32::from(net.addr()) & mask(len);
            by_len.entry(len).or_default().entry(network).or_insert(key);
        }
        let mut tables: Vec<(u8, HashMap<u32, K>)> = by_len.into_iter().collect();
        tables.sort_by_key(|t| std::cmp::Reverse(t.0));
        Router { tables }
    }

    /// The peer whose allowed IPs contain `dst` with the longest prefix, if any.
    pub(crate) fn lookup(&self, dst: Ipv4Addr) -> Option<&K> {
        let dst = u32::from(dst);
        self.tables.iter().find_map(|(len, table)| table.get(&(dst & mask(*len))))
    }
}

/// Whether a packet decrypted from a peer may carry `src` as its inner source address: it must lie
/// inside one of that peer's allowed IPs (WireGuard's anti-spoofing rule). Packets failing this are
/// dropped.
pub(crate) fn source_allowed(allowed_ips: &[Ipv4Net], src: Ipv4Addr) -> bool {
    allowed_ips.iter().any(|net| net.contains(&src))
}

/// The IPv4 source and destination of a raw IP packet, if it is a well-formed IPv4 header.
pub(crate) fn ipv4_src_dst(packet: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    Some((src, dst))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("test network")
    }

    #[test]
    fn longest_prefix_wins() {
        let router = Router::build([
            (net("10.42.0.0/16"), "wide"),
            (net("10.42.1.0/24"), "narrow"),
            (net("0.0.0.0/0"), "default"),
        ]);
        assert_eq!(router.lookup("10.42.1.7".parse().expect("ip")), Some(&"narrow"));
        assert_eq!(router.lookup("10.42.2.7".parse().expect("ip")), Some(&"wide"));
        assert_eq!(router.lookup("192.168.0.1".parse().expect("ip")), Some(&"default"));
    }

    #[test]
    fn no_match_is_none() {
        let router = Router::build([(net("10.42.0.1/32"), 1u32), (net("10.43.0.0/16"), 2)]);
        assert_eq!(router.lookup("10.42.0.2".parse().expect("ip")), None);
        assert_eq!(Router::<u32>::default().lookup("10.42.0.1".parse().expect("ip")), None);
    }

    #[test]
    fn host_bits_in_a_prefix_are_ignored() {
        let router = Router::build([(net("10.42.0.77/24"), 1u32)]);
        assert_eq!(router.lookup("10.42.0.1".parse().expect("ip")), Some(&1));
    }

    #[test]
    fn first_claim_of_a_prefix_wins() {
        let router = Router::build([(net("10.42.0.0/24"), 1u32), (net("10.42.0.0/24"), 2)]);
        assert_eq!(router.lookup("10.42.0.5".parse().expect("ip")), Some(&1));
    }

    #[test]
    fn spoofed_source_is_refused() {
        let allowed = [net("10.42.0.2/32"), net("10.50.0.0/24")];
        assert!(source_allowed(&allowed, "10.42.0.2".parse().expect("ip")));
        assert!(source_allowed(&allowed, "10.50.0.200".parse().expect("ip")));
        assert!(!source_allowed(&allowed, "10.42.0.3".parse().expect("ip")));
        assert!(!source_allowed(&[], "10.42.0.2".parse().expect("ip")));
    }

    #[test]
    fn parses_ipv4_header_addresses() {
        let mut packet = [0u8; 20];
        packet[0] = 0x45;
        packet[12..16].copy_from_slice(&[10, 42, 0, 1]);
        packet[16..20].copy_from_slice(&[10, 42, 0, 2]);
        assert_eq!(ipv4_src_dst(&packet), Some((Ipv4Addr::new(10, 42, 0, 1), Ipv4Addr::new(10, 42, 0, 2))));
        packet[0] = 0x60;
        assert_eq!(ipv4_src_dst(&packet), None);
        assert_eq!(ipv4_src_dst(&packet[..10]), None);
    }

    proptest! {
        /// The router agrees with a brute-force search: the matching net with the longest prefix
        /// (the first such in input order), or None when no net contains the address.
        #[test]
        fn agrees_with_brute_force(
            nets in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..24),
            probes in proptest::collection::vec(any::<u32>(), 1..32),
        ) {
            let nets: Vec<Ipv4Net> = nets
                .into_iter()
                .filter_map(|(addr, len)| Ipv4Net::new(Ipv4Addr::from(addr), len).ok())
                .collect();
            // Bias probes towards the nets so that matches happen, not only misses.
            let mut addrs: Vec<Ipv4Addr> = probes.iter().map(|p| Ipv4Addr::from(*p)).collect();
            addrs.extend(nets.iter().zip(&probes).map(|(n, p)| {
                Ipv4Addr::from((u32::from(n.network()) & mask(n.prefix_len())) | (p & !mask(n.prefix_len())))
            }));
            let router = Router::build(nets.iter().enumerate().map(|(i, n)| (*n, i)));
            for addr in addrs {
                let mut best: Option<(u8, usize)> = None;
                for (i, n) in nets.iter().enumerate() {
                    if n.contains(&addr) && best.is_none_or(|(len, _)| n.prefix_len() > len) {
                        best = Some((n.prefix_len(), i));
                    }
                }
                prop_assert_eq!(router.lookup(addr).copied(), best.map(|(_, i)| i));
            }
        }
    }
}
