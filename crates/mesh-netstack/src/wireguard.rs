//! The WireGuard side: one boringtun `Tunn` per peer, found by the receiver index of incoming
//! messages (or by the static key inside a handshake initiation), with cryptokey routing and
//! endpoint roaming. No I/O here: callers hand in datagrams and take out datagrams and IP packets.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::Ipv4Net;

use crate::routing::{Router, ipv4_src_dst, source_allowed};
use crate::{Peer, PeerStats};

/// A UDP datagram to send: destination and bytes.
pub(crate) type Datagram = (SocketAddr, Vec<u8>);

/// boringtun shifts our index left by 8 bits to number sessions, so indices must fit in 24 bits.
const INDEX_LIMIT: u32 = 1 << 24;
/// Handshake messages per second (over all peers) before the rate limiter asks for cookies
/// (boringtun's device uses the same figure). Each handshake is counted twice, once here and
/// once inside the peer's `Tunn`, which shares the limiter.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Room for the largest datagram plus WireGuard's overhead.
const BUF_LEN: usize = 65_535 + 64;

/// The base64 form of a WireGuard key, as `wg` prints it.
pub(crate) fn key_to_base64(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

struct WgPeer {
    public_key: [u8; 32],
    tunn: Tunn,
    endpoint: Option<SocketAddr>,
    allowed_ips: Vec<Ipv4Net>,
    keepalive: Option<u16>,
    /// The first handshake, until it completes: when an initiation was last sent, and how many
    /// were sent early (see [`FIRST_HANDSHAKE_RETRIES`]).
    first: Option<(Instant, u32)>,
}

/// Early retries of a peer's first handshake, at 250 ms, 500 ms, 1 s and 2 s, before
/// WireGuard's own 5 s: a new member's first initiation usually reaches the other nodes before
/// their agents have added it as a peer (they apply the directory a moment later), and would
/// otherwise cost the full 5 s retry. Only while no session ever existed.
const FIRST_HANDSHAKE_RETRIES: u32 = 4;
const FIRST_HANDSHAKE_RETRY: Duration = Duration::from_millis(250);

/// All peers of one netstack and the state to move packets between them and the TCP/IP stack.
pub(crate) struct WireGuard {
    secret: StaticSecret,
    public: PublicKey,
    peers: HashMap<u32, WgPeer>,
    by_key: HashMap<[u8; 32], u32>,
    router: Router<u32>,
    next_index: u32,
    /// Shared by every `Tunn`: checks MAC1 before any Diffie-Hellman, and answers with cookies
    /// under a handshake flood.
    rate_limiter: Arc<RateLimiter>,
    buf: Vec<u8>,
}

impl WireGuard {
    /// A WireGuard identity with no peers yet.
    pub(crate) fn new(private_key: [u8; 32]) -> Self {
        let secret = StaticSecret::from(private_key);
        let public = PublicKey::from(&secret);
        // Start the local indices somewhere time-dependent so that a restarted process does not
        // reuse the indices of its previous sessions.
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        WireGuard {
            secret,
            public,
            peers: HashMap::new(),
            by_key: HashMap::new(),
            router: Router::default(),
            next_index: seed % INDEX_LIMIT,
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            buf: vec![0; BUF_LEN],
        }
    }

    /// Our public key.
    pub(crate) fn public_key(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    fn allocate_index(&mut self) -> u32 {
        for _ in 0..INDEX_LIMIT {
            let index = self.next_index;
            self.next_index = (self.next_index + 1) % INDEX_LIMIT;
            if !self.peers.contains_key(&index) {
                return index;
            }
        }
        // 16 million peers: unreachable in practice; reuse rather than loop forever.
        self.next_index
    }

    fn new_tunn(&self, public_key: [u8; 32], keepalive: Option<u16>, index: u32) -> Tunn {
        Tunn::new(
            self.secret.clone(),
            PublicKey::from(public_key),
            None,
            keepalive,
            index,
            Some(self.rate_limiter.clone()),
        )
    }

    /// Reconciles the peer set: peers whose key is unchanged keep their session (and a roamed
    /// endpoint when the new config has none); removed keys are dropped; endpoint and allowed IPs
    /// are applied. A changed persistent keepalive starts a new session, as boringtun cannot change it.
    pub(crate) fn set_peers(&mut self, peers: Vec<Peer>) {
        let wanted: HashMap<[u8; 32], Peer> = peers.into_iter().map(|p| (p.public_key, p)).collect();
        let removed: Vec<[u8; 32]> = self.by_key.keys().filter(|k| !wanted.contains_key(*k)).copied().collect();
        for key in removed {
            if let Some(index) = self.by_key.remove(&key) {
                self.peers.remove(&index);
            }
        }
        for (key, peer) in wanted {
            if key == self.public.to_bytes() {
                tracing::warn!("ignoring a peer with this netstack's own public key");
                continue;
            }
            let existing = self.by_key.get(&key).copied();
            match existing.and_then(|i| self.peers.get(&i).map(|p| (i, p.keepalive))) {
                Some((index, keepalive)) if keepalive == peer.persistent_keepalive => {
                    if let Some(p) = self.peers.get_mut(&index) {
                        if peer.endpoint.is_some() {
                            p.endpoint = peer.endpoint;
                        }
                        p.allowed_ips = peer.allowed_ips;
                    }
                }
                Some((index, _)) => {
                    let tunn = self.new_tunn(key, peer.persistent_keepalive, index);
                    if let Some(p) = self.peers.get_mut(&index) {
                        p.tunn = tunn;
                        p.keepalive = peer.persistent_keepalive;
                        if peer.endpoint.is_some() {
                            p.endpoint = peer.endpoint;
                        }
                        p.allowed_ips = peer.allowed_ips;
                    }
                }
                None => {
                    let index = self.allocate_index();
                    let tunn = self.new_tunn(key, peer.persistent_keepalive, index);
                    self.peers.insert(
                        index,
                        WgPeer {
                            public_key: key,
                            tunn,
                            endpoint: peer.endpoint,
                            allowed_ips: peer.allowed_ips,
                            keepalive: peer.persistent_keepalive,
                            first: None,
                        },
                    );
                    self.by_key.insert(key, index);
                }
            }
        }
        // Deterministic order (by key) so that overlapping claims resolve the same way every time.
        let mut routes: Vec<([u8; 32], Ipv4Net, u32)> = self
            .peers
            .iter()
            .flat_map(|(index, p)| p.allowed_ips.iter().map(move |net| (p.public_key, *net, *index)))
            .collect();
        routes.sort_by_key(|r| r.0);
        self.router = Router::build(routes.into_iter().map(|(_, net, index)| (net, index)));
    }

    /// Whether some peer's allowed IPs contain `dst`.
    pub(crate) fn routes(&self, dst: Ipv4Addr) -> bool {
        self.router.lookup(dst).is_some()
    }

    /// Why a connection to `dst` may not have been answered, for error messages.
    pub(crate) fn describe_path(&self, dst: Ipv4Addr) -> String {
        let Some(peer) = self.router.lookup(dst).and_then(|i| self.peers.get(i)) else {
            return format!("no peer's allowed IPs contain {dst} any more");
        };
        let key = key_to_base64(&peer.public_key);
        let endpoint = match peer.endpoint {
            Some(e) => e.to_string(),
            None => "an unknown endpoint (waiting for it to contact us)".to_string(),
        };
        match peer.tunn.stats().0 {
            None => format!("no handshake with peer {key} at {endpoint}"),
            Some(age) => format!(
                "the handshake with peer {key} at {endpoint} worked {}s ago, but {dst} did not answer",
                age.as_secs()
            ),
        }
    }

    /// Encrypts an IP packet from the stack for the peer that routes its destination. Packets
    /// with no route, or to a peer whose endpoint is still unknown, are dropped (boringtun keeps
    /// a few while a handshake is under way).
    pub(crate) fn encapsulate(&mut self, packet: &[u8], out: &mut Vec<Datagram>) {
        let Some((_, dst)) = ipv4_src_dst(packet) else { return };
        let Some(peer) = self.router.lookup(dst).and_then(|i| self.peers.get_mut(i)) else {
            tracing::trace!(%dst, "dropping a packet: no peer routes its destination");
            return;
        };
        match peer.tunn.encapsulate(packet, &mut self.buf) {
            TunnResult::WriteToNetwork(data) => {
                if data.first() == Some(&1) && peer.tunn.stats().0.is_none() && peer.first.is_none() {
                    peer.first = Some((Instant::now(), 0));
                }
                if let Some(endpoint) = peer.endpoint {
                    out.push((endpoint, data.to_vec()));
                }
            }
            TunnResult::Err(e) => tracing::debug!(?e, "encapsulating a packet failed"),
            _ => {}
        }
    }

    /// Handles one UDP datagram from `from`: handshake messages are answered (into `out`), data
    /// packets are decrypted and, when their inner source is inside the sending peer's allowed
    /// IPs, queued into `inbound`. A valid message moves the peer's endpoint to `from` (roaming).
    pub(crate) fn decapsulate(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut Vec<Datagram>,
        inbound: &mut VecDeque<Vec<u8>>,
    ) {
        // MAC1 (and, under load, the cookie) first: cheap, and keeps unauthenticated floods away
        // from the Diffie-Hellman in `parse_handshake_anon`.
        let packet = match self.rate_limiter.verify_packet(Some(from.ip()), datagram, &mut self.buf) {
            Ok(packet) => packet,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                out.push((from, cookie.to_vec()));
                return;
            }
            Err(_) => {
                tracing::trace!(%from, "dropping a datagram that is not a valid WireGuard message");
                return;
            }
        };
        let (index, is_data) = match packet {
            Packet::HandshakeInit(init) => match parse_handshake_anon(&self.secret, &self.public, &init) {
                Ok(half) => match self.by_key.get(&half.peer_static_public) {
                    Some(index) => (*index, false),
                    None => {
                        tracing::debug!(%from, "handshake initiation from an unknown key");
                        return;
                    }
                },
                Err(e) => {
                    tracing::debug!(%from, ?e, "invalid handshake initiation");
                    return;
                }
            },
            Packet::HandshakeResponse(p) => (p.receiver_idx >> 8, false),
            Packet::PacketCookieReply(p) => (p.receiver_idx >> 8, false),
            Packet::PacketData(p) => (p.receiver_idx >> 8, true),
        };
        let Some(peer) = self.peers.get_mut(&index) else {
            tracing::debug!(%from, index, "message for an unknown receiver index");
            return;
        };
        let mut valid = false;
        match peer.tunn.decapsulate(Some(from.ip()), datagram, &mut self.buf) {
            TunnResult::Done => valid = is_data,
            TunnResult::Err(e) => tracing::debug!(%from, ?e, "dropping a WireGuard message"),
            TunnResult::WriteToNetwork(data) => {
                // A cookie reply (type 3) is sent before the message is authenticated.
                valid = data.first() != Some(&3);
                out.push((from, data.to_vec()));
                // Flush what boringtun queued while the handshake was under way.
                for _ in 0..1024 {
                    match peer.tunn.decapsulate(None, &[], &mut self.buf) {
                        TunnResult::WriteToNetwork(data) => out.push((from, data.to_vec())),
                        _ => break,
                    }
                }
            }
            TunnResult::WriteToTunnelV4(packet, src) => {
                valid = true;
                if source_allowed(&peer.allowed_ips, src) {
                    inbound.push_back(packet.to_vec());
                } else {
                    tracing::debug!(%src, peer = %key_to_base64(&peer.public_key), "dropping a packet whose source is outside the peer's allowed IPs");
                }
            }
            TunnResult::WriteToTunnelV6(..) => valid = true,
        }
        if valid && peer.endpoint != Some(from) {
            tracing::debug!(peer = %key_to_base64(&peer.public_key), %from, "peer endpoint roamed");
            peer.endpoint = Some(from);
        }
    }

    /// Runs boringtun's timers (handshake retries, rekeys, keepalives) for every peer.
    pub(crate) fn update_timers(&mut self, out: &mut Vec<Datagram>) {
        // Resets at most once a second, whatever the tick.
        self.rate_limiter.reset_count();
        for peer in self.peers.values_mut() {
            if let Some((sent, retries)) = peer.first {
                if peer.tunn.stats().0.is_some() || retries >= FIRST_HANDSHAKE_RETRIES {
                    peer.first = None;
                } else if sent.elapsed() >= FIRST_HANDSHAKE_RETRY * 2u32.pow(retries)
                    && let Some(endpoint) = peer.endpoint
                    && let TunnResult::WriteToNetwork(data) = peer.tunn.format_handshake_initiation(&mut self.buf, true)
                {
                    out.push((endpoint, data.to_vec()));
                    peer.first = Some((Instant::now(), retries + 1));
                }
            }
            match peer.tunn.update_timers(&mut self.buf) {
                TunnResult::WriteToNetwork(data) => {
                    if let Some(endpoint) = peer.endpoint {
                        out.push((endpoint, data.to_vec()));
                    }
                }
                TunnResult::Err(e) => tracing::trace!(?e, "wireguard timer"),
                _ => {}
            }
        }
    }

    /// Per-peer counters.
    pub(crate) fn stats(&self) -> Vec<PeerStats> {
        let mut stats: Vec<PeerStats> = self
            .peers
            .values()
            .map(|p| {
                let (last_handshake, tx, rx, _, _) = p.tunn.stats();
                PeerStats {
                    public_key: p.public_key,
                    endpoint: p.endpoint,
                    last_handshake,
                    rx_bytes: rx as u64,
                    tx_bytes: tx as u64,
                }
            })
            .collect();
        stats.sort_by_key(|s| s.public_key);
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip_packet(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[9] = 17;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p
    }

    fn peer(wg: &WireGuard, endpoint: &str, allowed: &str) -> Peer {
        Peer {
            public_key: wg.public_key(),
            endpoint: Some(endpoint.parse().expect("endpoint")),
            allowed_ips: vec![allowed.parse().expect("net")],
            persistent_keepalive: None,
        }
    }

    const A_EP: &str = "127.0.0.1:1001";
    const B_EP: &str = "127.0.0.1:1002";

    /// A and B after a completed handshake, B allowing `b_allows_from_a` as A's sources.
    fn handshaken(b_allows_from_a: &str) -> (WireGuard, WireGuard) {
        let mut a = WireGuard::new([1; 32]);
        let mut b = WireGuard::new([2; 32]);
        a.set_peers(vec![peer(&b, B_EP, "10.42.0.2/32")]);
        b.set_peers(vec![peer(&a, A_EP, b_allows_from_a)]);
        let (mut out, mut inbound) = (Vec::new(), VecDeque::new());
        a.encapsulate(&ip_packet(Ipv4Addr::new(10, 42, 0, 1), Ipv4Addr::new(10, 42, 0, 2)), &mut out);
        let (to, init) = out.pop().expect("a handshake initiation");
        assert_eq!((to, init.len(), init[0]), (B_EP.parse().expect("ep"), 148, 1));
        b.decapsulate(A_EP.parse().expect("ep"), &init, &mut out, &mut inbound);
        let (_, response) = out.pop().expect("a handshake response");
        assert_eq!(response[0], 2);
        a.decapsulate(B_EP.parse().expect("ep"), &response, &mut out, &mut inbound);
        // A answers with a keepalive, then flushes the packet queued during the handshake.
        assert_eq!(out.len(), 2, "keepalive and queued packet");
        for (_, datagram) in out.drain(..) {
            b.decapsulate(A_EP.parse().expect("ep"), &datagram, &mut Vec::new(), &mut inbound);
        }
        assert!(a.stats()[0].last_handshake.is_some() && b.stats()[0].last_handshake.is_some());
        (a, b)
    }

    #[test]
    fn handshake_then_data_is_delivered() {
        let (mut a, mut b) = handshaken("10.42.0.1/32");
        let (mut out, mut inbound) = (Vec::new(), VecDeque::new());
        let packet = ip_packet(Ipv4Addr::new(10, 42, 0, 1), Ipv4Addr::new(10, 42, 0, 2));
        a.encapsulate(&packet, &mut out);
        let (_, datagram) = out.pop().expect("data");
        b.decapsulate(A_EP.parse().expect("ep"), &datagram, &mut out, &mut inbound);
        assert_eq!(inbound.pop_front(), Some(packet));
    }

    #[test]
    fn packet_from_outside_allowed_ips_is_dropped() {
        let (mut a, mut b) = handshaken("10.42.0.1/32");
        let (mut out, mut inbound) = (Vec::new(), VecDeque::new());
        // A is (mis)configured to route 10.42.0.2 but sends from 10.42.0.7, which B does not allow.
        a.encapsulate(&ip_packet(Ipv4Addr::new(10, 42, 0, 7), Ipv4Addr::new(10, 42, 0, 2)), &mut out);
        let (_, datagram) = out.pop().expect("data");
        b.decapsulate(A_EP.parse().expect("ep"), &datagram, &mut out, &mut inbound);
        assert!(inbound.is_empty(), "a spoofed source was delivered");
        assert!(out.is_empty());
    }

    #[test]
    fn data_roams_the_endpoint_and_forgeries_do_not() {
        let (mut a, mut b) = handshaken("10.42.0.1/32");
        let (mut out, mut inbound) = (Vec::new(), VecDeque::new());
        a.encapsulate(&ip_packet(Ipv4Addr::new(10, 42, 0, 1), Ipv4Addr::new(10, 42, 0, 2)), &mut out);
        let (_, datagram) = out.pop().expect("data");
        // A forged copy (one byte flipped) from another address: dropped, no roaming.
        let mut forged = datagram.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        let elsewhere: SocketAddr = "127.0.0.1:2002".parse().expect("ep");
        b.decapsulate(elsewhere, &forged, &mut out, &mut inbound);
        assert!(inbound.is_empty());
        assert_eq!(b.stats()[0].endpoint, Some(A_EP.parse().expect("ep")));
        // The genuine packet from a new address moves A's endpoint there.
        b.decapsulate(elsewhere, &datagram, &mut out, &mut inbound);
        assert_eq!(inbound.len(), 1);
        assert_eq!(b.stats()[0].endpoint, Some(elsewhere));
    }

    #[test]
    fn handshake_with_a_bad_mac_or_unknown_key_gets_no_answer() {
        let a = WireGuard::new([1; 32]);
        let mut b = WireGuard::new([2; 32]);
        let mut stranger = WireGuard::new([3; 32]);
        stranger.set_peers(vec![peer(&b, B_EP, "10.42.0.2/32")]);
        b.set_peers(vec![peer(&a, A_EP, "10.42.0.1/32")]);
        let (mut out, mut inbound) = (Vec::new(), VecDeque::new());
        stranger.encapsulate(&ip_packet(Ipv4Addr::new(10, 42, 0, 3), Ipv4Addr::new(10, 42, 0, 2)), &mut out);
        let (_, init) = out.pop().expect("a handshake initiation");
        let mut bad_mac = init.clone();
        bad_mac[120] ^= 1;
        b.decapsulate(A_EP.parse().expect("ep"), &bad_mac, &mut out, &mut inbound);
        b.decapsulate(A_EP.parse().expect("ep"), &init, &mut out, &mut inbound);
        assert!(out.is_empty() && inbound.is_empty(), "B answered a stranger or a forgery");
    }

    #[test]
    fn set_peers_keeps_unchanged_sessions() {
        let (mut a, _b) = handshaken("10.42.0.1/32");
        let b_key = a.stats()[0].public_key;
        let again = Peer {
            public_key: b_key,
            endpoint: None,
            allowed_ips: vec!["10.42.0.2/32".parse().expect("net"), "10.42.9.0/24".parse().expect("net")],
            persistent_keepalive: None,
        };
        a.set_peers(vec![again.clone()]);
        let stats = a.stats();
        assert!(stats[0].last_handshake.is_some(), "the session was dropped");
        assert_eq!(stats[0].endpoint, Some(B_EP.parse().expect("ep")), "a None endpoint erased the known one");
        assert!(a.routes(Ipv4Addr::new(10, 42, 9, 1)), "new allowed IPs not applied");
        // A new keepalive needs a new Tunn: the session starts over.
        a.set_peers(vec![Peer { persistent_keepalive: Some(25), ..again }]);
        assert!(a.stats()[0].last_handshake.is_none());
        a.set_peers(vec![]);
        assert!(a.stats().is_empty() && !a.routes(Ipv4Addr::new(10, 42, 0, 2)));
    }
}
