//! Fuzz targets (proptest) for what mesh-dataplane takes from the API: names of nodes and
//! services (→ DNS records, nftables comments) and peer entries (public keys, allowed IPs and
//! keepalives as the MeshNode status carries them). Inputs are arbitrary and near-valid text.
//! Nothing may panic; every record published is a well-formed name in the zone; every peer
//! applied has a parsed key and allowed IPs, and every entry is either applied or reported; a
//! service name never adds a line to the nftables script.
//!
//! `make test` runs them with proptest's default 256 cases each; `PROPTEST_CASES=100000 make
//! fuzz` runs them for longer.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};

use mesh_dataplane::desired::{Exposure, Hosted, PeerEntry, digest, peers};
use mesh_dataplane::dns::{self, ZONE};
use mesh_dataplane::firewall;
use mesh_wireguard::Key;
use proptest::prelude::*;

/// A name as the API might carry it: valid labels, dotted names, and anything at all.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?",
        "[a-z0-9-]{1,70}(\\.[a-z0-9-]{0,70}){0,4}",
        "[A-Za-z0-9_.\\-*@ ]{0,20}",
        any::<String>(),
    ]
}

fn ip() -> impl Strategy<Value = Option<Ipv4Addr>> {
    proptest::option::of(any::<[u8; 4]>().prop_map(Ipv4Addr::from))
}

fn exposure() -> impl Strategy<Value = Exposure> {
    prop::sample::select(vec![Exposure::Mesh, Exposure::Host, Exposure::Dual])
}

fn zone_input() -> impl Strategy<Value = (Vec<dns::Node>, Vec<dns::Service>)> {
    let node = (name(), ip(), ip(), any::<bool>()).prop_map(|(name, mesh_ip, underlay, in_tunnel)| dns::Node {
        name,
        mesh_ip,
        underlay,
        in_tunnel,
    });
    let service = (name(), name(), exposure(), ip(), proptest::option::of(name())).prop_map(
        |(namespace, name, exposure, mesh_ip, node)| dns::Service { namespace, name, exposure, mesh_ip, node },
    );
    (proptest::collection::vec(node, 0..6), proptest::collection::vec(service, 0..10))
}

fn is_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// A peer entry as a MeshNode status might carry it.
fn entry() -> impl Strategy<Value = PeerEntry> {
    let key = prop_oneof![
        any::<[u8; 32]>().prop_map(|b| Key::from_bytes(b).to_base64()),
        Just(Key::from_bytes([7; 32]).to_base64()),
        "[A-Za-z0-9+/= ]{0,50}",
        any::<String>(),
    ];
    let allowed = proptest::collection::vec(
        prop_oneof![
            any::<([u8; 4], u8)>().prop_map(|(a, p)| format!("{}/{}", Ipv4Addr::from(a), p % 40)),
            "[0-9a-f:./]{0,24}",
            any::<String>(),
        ],
        0..4,
    );
    let endpoint = proptest::option::of(any::<([u8; 4], u16)>().prop_map(|(a, p)| SocketAddr::from((a, p))));
    (name(), key, endpoint, allowed, proptest::option::of(any::<i32>())).prop_map(
        |(node, public_key, endpoint, allowed_ips, persistent_keepalive)| PeerEntry {
            node,
            public_key,
            endpoint,
            allowed_ips,
            persistent_keepalive,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    /// Whatever the names, the zone holds only well-formed names under `mesh.local`, each with
    /// at least one address, and every node or service that got no name is reported.
    #[test]
    fn fuzz_dns_zone_from_arbitrary_names((nodes, services) in zone_input()) {
        let zone = dns::zone(&nodes, &services);
        for (name, ips) in &zone.records {
            prop_assert!(!ips.is_empty(), "{name} without addresses");
            prop_assert!(name.len() <= 253, "{name} is longer than 253");
            let inner = name.strip_suffix(&format!(".{ZONE}"));
            prop_assert!(inner.is_some(), "{name} is outside the zone");
            for label in inner.unwrap_or_default().split('.') {
                prop_assert!(is_label(label), "{name} has the label {label:?}");
            }
        }
        for node in &nodes {
            let named = zone.records.contains_key(&dns::node_name(&node.name));
            let reported = zone.unpublished.iter().any(|u| u.subject == node.name);
            prop_assert!(named || reported || dns::node_address(node).is_none(), "node {:?} vanished", node.name);
        }
    }

    /// Every entry but this node's own is applied or reported; what is applied parsed.
    #[test]
    fn fuzz_peers_from_arbitrary_entries(entries in proptest::collection::vec(entry(), 0..8)) {
        let me = Key::from_bytes([7; 32]);
        let out = peers("me", &me, &entries);
        let others = entries.iter().filter(|e| e.node != "me").count();
        prop_assert_eq!(out.applied + out.skipped.len(), others);
        prop_assert_eq!(out.peers.len(), out.applied);
        prop_assert!(!out.peers.contains_key(&me), "this node became its own peer");
        let mut applied = Vec::new();
        for (key, peer) in &out.peers {
            let node = out.names.get(key);
            let entry = entries
                .iter()
                .find(|e| Some(&e.node) == node && Key::from_base64(&e.public_key).ok() == Some(*key));
            prop_assert!(entry.is_some(), "peer {key} from no entry");
            prop_assert_eq!(peer.allowed_ips.len(), entry.map(|e| e.allowed_ips.iter().collect::<BTreeSet<_>>().len()).unwrap_or(0));
            prop_assert!(peer.persistent_keepalive.is_none_or(|k| k > 0));
            applied.extend(entry.cloned());
        }
        // The digest of the applied set, taken from entries parsed once, is that of the entries.
        prop_assert_eq!(&out.digest, &digest(&applied));
    }

    /// A service name, whatever it holds, stays inside its comment line.
    #[test]
    fn fuzz_firewall_comment(names in proptest::collection::vec(any::<String>(), 0..5)) {
        let hosted: Vec<Hosted> = names
            .into_iter()
            .enumerate()
            .map(|(i, service)| Hosted {
                ip: Ipv4Addr::new(10, 42, 1, i as u8),
                ports: BTreeSet::from([80]),
                service,
                // Every other one is pod-backed: its name is also written in the NAT chains.
                forward_to: (i % 2 == 1).then(|| Ipv4Addr::new(10, 244, 1, i as u8)),
                target_ports: BTreeMap::new(),
            })
            .collect();
        let script = firewall::render(&hosted, None, None);
        let empty = firewall::render(&[], None, None).split('\n').count();
        // Per service 6 lines in the filter chain; per pod-backed one 3 more in each of the two
        // NAT chains, which take 3 lines each (header, hook, closing brace) when there are any.
        let forwarded = hosted.iter().filter(|h| h.forward_to.is_some()).count();
        let nat_chains = if forwarded > 0 { 6 } else { 0 };
        let established = usize::from(!hosted.is_empty());
        prop_assert_eq!(script.split('\n').count(), empty + established + 6 * hosted.len() + nat_chains + 6 * forwarded);
    }
}
