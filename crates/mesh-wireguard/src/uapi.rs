//! The WireGuard cross-platform userspace API (<https://www.wireguard.com/xplatform/>): the
//! text that wireguard-go and boringtun read and write on `/var/run/wireguard/<iface>.sock`.
//!
//! A request is `get=1\n\n` or `set=1\n` followed by `key=value` lines and an empty line; the
//! answer ends with `errno=N\n\n`. Keys are lowercase hex. [`render_set`] turns a
//! [`DevicePlan`] into a set request; [`parse_get`] reads a get answer into a [`DeviceState`],
//! and [`render_get`] writes one (for fakes and benchmarks).
//!
//! Handshake times are read as the protocol defines them, seconds and nanoseconds since the
//! Unix epoch (what wireguard-go sends). boringtun 0.7 sends "seconds since" instead, which is
//! one reason harness-mesh runs wireguard-go.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::device::{DevicePlan, DeviceState, PeerState};
use crate::key::{Key, PrivateKey};

/// The request that reads a device.
pub const GET_REQUEST: &str = "get=1\n\n";

/// A UAPI answer could not be understood, or reported an error.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UapiError {
    /// The device answered with a non-zero errno.
    #[error("the WireGuard device refused the request: errno={0}")]
    Errno(i64),
    /// A line is not `key=value`, or a value does not parse.
    #[error("malformed UAPI line {line:?}: {why}")]
    Malformed {
        /// The offending line.
        line: String,
        /// What is wrong with it.
        why: String,
    },
    /// The answer ended without `errno=`.
    #[error("the UAPI answer ended without an errno line")]
    Truncated,
}

/// The `set=1` request for `plan`, ending with the empty line. Removed peers come first, then
/// added ones (with `replace_allowed_ips`, so a stale peer of the same key cannot keep old
/// addresses), then updated ones (with `update_only`, so an update never creates a peer).
pub fn render_set(plan: &DevicePlan) -> String {
    let mut out = String::from("set=1\n");
    if let Some(key) = &plan.private_key {
        let _ = writeln!(out, "private_key={}", key.to_hex());
    }
    if let Some(port) = plan.listen_port {
        let _ = writeln!(out, "listen_port={port}");
    }
    for key in &plan.remove {
        let _ = writeln!(out, "public_key={}\nremove=true", key.to_hex());
    }
    for (key, peer) in &plan.add {
        let _ = writeln!(out, "public_key={}", key.to_hex());
        if let Some(endpoint) = peer.endpoint {
            let _ = writeln!(out, "endpoint={endpoint}");
        }
        let _ = writeln!(out, "persistent_keepalive_interval={}", peer.persistent_keepalive.unwrap_or(0));
        out.push_str("replace_allowed_ips=true\n");
        for ip in &peer.allowed_ips {
            let _ = writeln!(out, "allowed_ip={ip}");
        }
    }
    for update in &plan.update {
        let _ = writeln!(out, "public_key={}\nupdate_only=true", update.public_key.to_hex());
        if let Some(endpoint) = update.endpoint {
            let _ = writeln!(out, "endpoint={endpoint}");
        }
        if let Some(keepalive) = update.persistent_keepalive {
            let _ = writeln!(out, "persistent_keepalive_interval={keepalive}");
        }
        if let Some(ips) = &update.allowed_ips {
            out.push_str("replace_allowed_ips=true\n");
            for ip in ips {
                let _ = writeln!(out, "allowed_ip={ip}");
            }
        }
    }
    out.push('\n');
    out
}

/// Reads the errno of a `set` answer: `Ok(())` for `errno=0`.
pub fn parse_set_answer(answer: &str) -> Result<(), UapiError> {
    for line in answer.lines() {
        if let Some(value) = line.strip_prefix("errno=") {
            let errno = value.trim().parse::<i64>().map_err(|e| malformed(line, e))?;
            return if errno == 0 { Ok(()) } else { Err(UapiError::Errno(errno)) };
        }
    }
    Err(UapiError::Truncated)
}

fn malformed(line: &str, why: impl ToString) -> UapiError {
    UapiError::Malformed { line: line.to_owned(), why: why.to_string() }
}

/// Parses the answer to [`GET_REQUEST`]. Unknown keys are skipped (newer implementations add
/// some); the answer must end with `errno=0`.
pub fn parse_get(answer: &str) -> Result<DeviceState, UapiError> {
    let mut device = DeviceState::default();
    let mut peer: Option<(Key, PeerState)> = None;
    let mut handshake = (0u64, 0u32);
    let finish = |device: &mut DeviceState, peer: &mut Option<(Key, PeerState)>, handshake: &mut (u64, u32)| {
        if let Some((key, mut state)) = peer.take() {
            if *handshake != (0, 0) {
                state.last_handshake = UNIX_EPOCH.checked_add(Duration::new(handshake.0, handshake.1));
            }
            device.peers.insert(key, state);
        }
        *handshake = (0, 0);
    };
    for line in answer.lines() {
        if line.is_empty() {
            continue;
        }
        let (key, value) = line.split_once('=').ok_or_else(|| malformed(line, "expected key=value"))?;
        match (key, peer.as_mut()) {
            ("errno", _) => {
                finish(&mut device, &mut peer, &mut handshake);
                let errno = value.parse::<i64>().map_err(|e| malformed(line, e))?;
                return if errno == 0 { Ok(device) } else { Err(UapiError::Errno(errno)) };
            }
            ("public_key", _) => {
                finish(&mut device, &mut peer, &mut handshake);
                let key = Key::from_hex(value).map_err(|e| malformed(line, e))?;
                peer = Some((key, PeerState::default()));
            }
            ("private_key", None) => {
                device.private_key = Some(PrivateKey::from_hex(value).map_err(|e| malformed(line, e))?);
            }
            ("listen_port", None) => {
                let port = value.parse::<u16>().map_err(|e| malformed(line, e))?;
                device.listen_port = (port != 0).then_some(port);
            }
            ("endpoint", Some((_, p))) => {
                p.config.endpoint = Some(value.parse().map_err(|e| malformed(line, e))?);
            }
            ("allowed_ip", Some((_, p))) => {
                p.config.allowed_ips.insert(value.parse().map_err(|e| malformed(line, e))?);
            }
            ("persistent_keepalive_interval", Some((_, p))) => {
                let secs = value.parse::<u16>().map_err(|e| malformed(line, e))?;
                p.config.persistent_keepalive = (secs != 0).then_some(secs);
            }
            ("last_handshake_time_sec", Some(_)) => {
                handshake.0 = value.parse().map_err(|e| malformed(line, e))?;
            }
            ("last_handshake_time_nsec", Some(_)) => {
                let nanos: u32 = value.parse().map_err(|e| malformed(line, e))?;
                handshake.1 = nanos.min(999_999_999);
            }
            ("rx_bytes", Some((_, p))) => p.rx_bytes = value.parse().map_err(|e| malformed(line, e))?,
            ("tx_bytes", Some((_, p))) => p.tx_bytes = value.parse().map_err(|e| malformed(line, e))?,
            _ => {}
        }
    }
    Err(UapiError::Truncated)
}

/// The answer a device gives to [`GET_REQUEST`] when it is `device`: what a fake device or a
/// benchmark answers. [`parse_get`] reads it back exactly.
pub fn render_get(device: &DeviceState) -> String {
    let mut out = String::new();
    if let Some(key) = &device.private_key {
        let _ = writeln!(out, "private_key={}", key.to_hex());
    }
    if let Some(port) = device.listen_port {
        let _ = writeln!(out, "listen_port={port}");
    }
    for (key, peer) in &device.peers {
        let _ = writeln!(out, "public_key={}", key.to_hex());
        if let Some(endpoint) = peer.config.endpoint {
            let _ = writeln!(out, "endpoint={endpoint}");
        }
        if let Some(at) = peer.last_handshake {
            let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
            let _ = writeln!(out, "last_handshake_time_sec={}", since.as_secs());
            let _ = writeln!(out, "last_handshake_time_nsec={}", since.subsec_nanos());
        }
        let _ = writeln!(out, "tx_bytes={}\nrx_bytes={}", peer.tx_bytes, peer.rx_bytes);
        let _ = writeln!(out, "persistent_keepalive_interval={}", peer.config.persistent_keepalive.unwrap_or(0));
        for ip in &peer.config.allowed_ips {
            let _ = writeln!(out, "allowed_ip={ip}");
        }
    }
    out + "errno=0\n\n"
}

/// The age of a handshake at `now`, for reports; `None` if there never was one.
pub fn age(handshake: Option<SystemTime>, now: SystemTime) -> Option<Duration> {
    handshake.map(|at| now.duration_since(at).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::device::{DeviceConfig, PeerConfig, PeerUpdate, applied, plan};

    const PEER_HEX: &str = "58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376";
    const PRIVATE_HEX: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";

    /// A get answer as wireguard-go 0.0.20220316 prints it.
    fn wireguard_go_answer() -> String {
        format!(
            "private_key={PRIVATE_HEX}\nlisten_port=51820\npublic_key={PEER_HEX}\npreshared_key=0000000000000000000000000000000000000000000000000000000000000000\nprotocol_version=1\nendpoint=192.168.77.2:51820\nlast_handshake_time_sec=1700000000\nlast_handshake_time_nsec=500\ntx_bytes=1000\nrx_bytes=2000\npersistent_keepalive_interval=0\nallowed_ip=10.42.0.2/32\nallowed_ip=10.42.7.7/32\nerrno=0\n\n"
        )
    }

    #[test]
    fn parses_a_wireguard_go_answer() {
        let device = parse_get(&wireguard_go_answer()).unwrap();
        assert_eq!(device.listen_port, Some(51820));
        assert_eq!(device.private_key.unwrap().to_hex(), PRIVATE_HEX);
        let peer = &device.peers[&Key::from_hex(PEER_HEX).unwrap()];
        assert_eq!(peer.config.endpoint, Some("192.168.77.2:51820".parse().unwrap()));
        assert_eq!(peer.config.allowed_ips.len(), 2);
        assert_eq!(peer.config.persistent_keepalive, None);
        assert_eq!((peer.rx_bytes, peer.tx_bytes), (2000, 1000));
        assert_eq!(peer.last_handshake, UNIX_EPOCH.checked_add(Duration::new(1_700_000_000, 500)));
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_010);
        assert_eq!(age(peer.last_handshake, now).map(|d| d.as_secs()), Some(9));
    }

    #[test]
    fn a_peer_without_handshake_has_none() {
        let answer = format!(
            "listen_port=1\npublic_key={PEER_HEX}\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\nerrno=0\n\n"
        );
        let device = parse_get(&answer).unwrap();
        assert_eq!(device.peers.values().next().unwrap().last_handshake, None);
        assert_eq!(device.private_key, None);
    }

    #[test]
    fn errors_and_truncation_are_reported() {
        assert_eq!(parse_get("errno=19\n\n"), Err(UapiError::Errno(19)));
        assert_eq!(parse_get("listen_port=1\n"), Err(UapiError::Truncated));
        assert!(matches!(parse_get("garbage\nerrno=0\n"), Err(UapiError::Malformed { .. })));
        assert!(matches!(
            parse_get(&format!("public_key={PEER_HEX}\nendpoint=nowhere\nerrno=0\n")),
            Err(UapiError::Malformed { .. })
        ));
        assert_eq!(parse_set_answer("errno=0\n\n"), Ok(()));
        assert_eq!(parse_set_answer("errno=22\n\n"), Err(UapiError::Errno(22)));
        assert_eq!(parse_set_answer(""), Err(UapiError::Truncated));
    }

    #[test]
    fn renders_each_kind_of_change() {
        let key = Key::from_hex(PEER_HEX).unwrap();
        let plan = DevicePlan {
            private_key: Some(PrivateKey::from_hex(PRIVATE_HEX).unwrap()),
            listen_port: Some(51820),
            remove: vec![Key::from_bytes([1; 32])],
            add: vec![(
                key,
                PeerConfig {
                    endpoint: Some("192.168.77.2:51820".parse().unwrap()),
                    allowed_ips: BTreeSet::from(["10.42.0.2/32".parse().unwrap()]),
                    persistent_keepalive: Some(25),
                },
            )],
            update: vec![PeerUpdate {
                allowed_ips: Some(BTreeSet::new()),
                ..PeerUpdate::new(Key::from_bytes([2; 32]))
            }],
        };
        let text = render_set(&plan);
        let ones = "01".repeat(32);
        let twos = "02".repeat(32);
        assert_eq!(
            text,
            format!(
                "set=1\nprivate_key={PRIVATE_HEX}\nlisten_port=51820\npublic_key={ones}\nremove=true\npublic_key={PEER_HEX}\nendpoint=192.168.77.2:51820\npersistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=10.42.0.2/32\npublic_key={twos}\nupdate_only=true\nreplace_allowed_ips=true\n\n"
            )
        );
    }

    #[test]
    fn an_empty_plan_renders_an_empty_set() {
        assert_eq!(render_set(&DevicePlan::default()), "set=1\n\n");
    }

    /// A tiny UAPI device: applies a set request the way wireguard-go does, and answers get.
    fn device_applies(device: &DeviceState, request: &str) -> DeviceState {
        let mut next = device.clone();
        let mut current: Option<Key> = None;
        let mut update_only = false;
        for line in request.lines().skip(1).filter(|l| !l.is_empty()) {
            let (k, v) = line.split_once('=').unwrap();
            match k {
                "private_key" => next.private_key = Some(PrivateKey::from_hex(v).unwrap()),
                "listen_port" => next.listen_port = Some(v.parse().unwrap()),
                "public_key" => {
                    let key = Key::from_hex(v).unwrap();
                    current = Some(key);
                    update_only = false;
                    next.peers.entry(key).or_default();
                }
                "update_only" => update_only = true,
                "remove" => {
                    next.peers.remove(&current.unwrap());
                }
                "endpoint" => next.peers.get_mut(&current.unwrap()).unwrap().config.endpoint = Some(v.parse().unwrap()),
                "persistent_keepalive_interval" => {
                    let s: u16 = v.parse().unwrap();
                    next.peers.get_mut(&current.unwrap()).unwrap().config.persistent_keepalive = (s > 0).then_some(s);
                }
                "replace_allowed_ips" => next.peers.get_mut(&current.unwrap()).unwrap().config.allowed_ips.clear(),
                "allowed_ip" => {
                    next.peers.get_mut(&current.unwrap()).unwrap().config.allowed_ips.insert(v.parse().unwrap());
                }
                other => panic!("unexpected key {other}"),
            }
        }
        let _ = update_only;
        next
    }

    fn arb_config() -> impl Strategy<Value = DeviceConfig> {
        let peer = (
            proptest::option::of((1u8..4).prop_map(|h| std::net::SocketAddr::from(([192, 168, 77, h], 51820)))),
            proptest::collection::btree_set(
                (0u8..6).prop_map(|n| ipnet::IpNet::from(ipnet::Ipv4Net::from(std::net::Ipv4Addr::new(10, 42, 0, n)))),
                0..3,
            ),
            proptest::option::of(0u16..2),
        )
            .prop_map(|(endpoint, allowed_ips, persistent_keepalive)| PeerConfig {
                endpoint,
                allowed_ips,
                persistent_keepalive,
            });
        (0u8..2, proptest::collection::btree_map((0u8..5).prop_map(|n| Key::from_bytes([n; 32])), peer, 0..5)).prop_map(
            |(k, peers)| DeviceConfig { private_key: PrivateKey::from_bytes([k; 32]), listen_port: 51820, peers },
        )
    }

    proptest! {
        /// What the rendered request does to a device is what the plan says, and a get answer
        /// round-trips through the parser.
        #[test]
        fn rendered_plans_do_what_they_say(before in arb_config(), after in arb_config()) {
            let start = DeviceState::default();
            let start = applied(&start, &plan(&start, &before));
            let p = plan(&start, &after);
            let via_text = device_applies(&start, &render_set(&p));
            prop_assert_eq!(&via_text, &applied(&start, &p));
            prop_assert_eq!(parse_get(&render_get(&via_text)).unwrap(), via_text);
        }

        /// A kept state ([`crate::Known`]) that follows each write ends where a read of the
        /// device would: the requests go through this module's UAPI device, the reads through
        /// the get answer and the parser, and the kept state is only ever given the plans.
        /// (Each peer's allowed IPs are its own here, as the plan makes them: a device gives an
        /// allowed IP to one peer only, which a kept state does not model.)
        #[test]
        fn the_known_state_after_writes_is_what_a_read_gives(a in arb_config(), b in arb_config(), c in arb_config()) {
            let own = |config: DeviceConfig| DeviceConfig {
                peers: config
                    .peers
                    .into_iter()
                    .map(|(key, mut peer)| {
                        let n = key.as_bytes()[0];
                        peer.allowed_ips = peer
                            .allowed_ips
                            .iter()
                            .map(|ip| match ip {
                                ipnet::IpNet::V4(net) => {
                                    let host = net.addr().octets()[3];
                                    ipnet::IpNet::from(ipnet::Ipv4Net::from(std::net::Ipv4Addr::new(10, n, 0, host)))
                                }
                                other => *other,
                            })
                            .collect();
                        (key, peer)
                    })
                    .collect(),
                ..config
            };
            let now = std::time::SystemTime::now();
            let mut device = DeviceState::default();
            let mut known = crate::Known::default();
            known.read(parse_get(&render_get(&device)).unwrap());
            for desired in [own(a), own(b), own(c)] {
                let diff = known.diff_at(&desired, now).unwrap();
                device = device_applies(&device, &render_set(&diff));
                known.wrote(&diff, true);
                let read = parse_get(&render_get(&device)).unwrap();
                prop_assert_eq!(known.state(), Some(&read));
                prop_assert!(known.diff_at(&desired, now).unwrap().is_empty());
            }
        }

        #[test]
        fn parsing_arbitrary_answers_never_panics(text in "([a-z_]{1,12}=[0-9a-f./:\\[\\]]{0,70}\n){0,12}") {
            let _ = parse_get(&text);
            let _ = parse_set_answer(&text);
        }
    }
}
