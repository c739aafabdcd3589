//! The TCP/IP side: a smoltcp `Interface` (Medium::Ip) over in-memory packet queues, and the task
//! that drives it together with the WireGuard peers and the UDP socket.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::AnySocket as _;
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{HardwareAddress, IpCidr, IpListenEndpoint};
use tokio::net::UdpSocket;
use tokio::sync::Notify;

use crate::routing::ipv4_src_dst;
use crate::wireguard::{Datagram, WireGuard};

/// MTU of the inner (tunnelled) IP packets.
pub(crate) const MTU: usize = 1420;
/// Receive and send buffer of each TCP socket. `vec![0; n]` is lazily backed by the OS, so idle
/// listen sockets cost little resident memory.
pub(crate) const SOCKET_BUFFER: usize = 256 * 1024;
/// Sockets kept in the LISTEN state per listener, re-armed after every poll round.
const LISTEN_BACKLOG: usize = 16;
/// Connections accepted by the stack but not yet by `TcpListener::accept`, per listener.
const MAX_PENDING: usize = 128;
/// Inbound packets fed to smoltcp per poll round, fewer than `LISTEN_BACKLOG` so that a burst of
/// SYNs never finds all listen sockets taken before they are re-armed.
const RX_BUDGET: usize = 8;
/// How often boringtun's timers run.
pub(crate) const TIMER_TICK: Duration = Duration::from_millis(200);
/// Datagrams read from the UDP socket per wake-up.
const RX_BATCH: usize = 256;
/// How long a dropped (orphaned) connection may linger while it closes.
const ORPHAN_TIMEOUT: Duration = Duration::from_secs(30);
/// Ephemeral ports for outgoing connections.
const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;

/// The queue device smoltcp reads inbound packets from and writes outbound packets to.
#[derive(Default)]
pub(crate) struct QueueDevice {
    pub(crate) rx: VecDeque<Vec<u8>>,
    pub(crate) tx: VecDeque<Vec<u8>>,
    budget: usize,
}

pub(crate) struct RxToken(Vec<u8>);
pub(crate) struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0; len];
        let r = f(&mut packet);
        self.0.push_back(packet);
        r
    }
}

impl phy::Device for QueueDevice {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: SmolInstant) -> Option<(RxToken, TxToken<'_>)> {
        if self.budget == 0 {
            return None;
        }
        let packet = self.rx.pop_front()?;
        self.budget -= 1;
        Some((RxToken(packet), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _timestamp: SmolInstant) -> Option<TxToken<'_>> {
        Some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        // WireGuard authenticates every packet: verifying inner checksums again buys nothing.
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        checksum.icmpv4 = Checksum::Tx;
        caps.checksum = checksum;
        caps
    }
}

/// One listening address: its sockets in LISTEN, SYN-RECEIVED or accepted-by-the-stack states.
pub(crate) struct Listener {
    pub(crate) backlog: Vec<SocketHandle>,
}

/// Everything the driver task and the socket handles share, behind one mutex.
pub(crate) struct State {
    pub(crate) iface: Interface,
    pub(crate) sockets: SocketSet<'static>,
    pub(crate) device: QueueDevice,
    pub(crate) wg: WireGuard,
    pub(crate) addresses: Vec<Ipv4Addr>,
    pub(crate) listeners: HashMap<SocketAddrV4, Listener>,
    pub(crate) orphans: Vec<SocketHandle>,
    next_port: u16,
    /// Set when the stack stopped: socket operations fail from then on.
    pub(crate) closed: bool,
}

/// The shared half of a netstack: state, and the notification that wakes the driver.
pub(crate) struct Shared {
    state: Mutex<State>,
    pub(crate) wake: Notify,
    pub(crate) stop: AtomicBool,
}

impl Shared {
    pub(crate) fn new(state: State) -> Self {
        Shared { state: Mutex::new(state), wake: Notify::new(), stop: AtomicBool::new(false) }
    }

    /// Locks the state. A panic while it was held leaves smoltcp's state usable, so poisoning is ignored.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A new TCP socket with the crate's buffer sizes.
pub(crate) fn new_tcp_socket() -> tcp::Socket<'static> {
    let rx = tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]);
    let tx = tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]);
    let mut socket = tcp::Socket::new(rx, tx);
    socket.set_nagle_enabled(false);
    // Without congestion control smoltcp answers a loss by resending a whole window at once,
    // which on a lossy path (or an overflowing UDP buffer) collapses throughput.
    socket.set_congestion_control(tcp::CongestionControl::Cubic);
    socket.set_ack_delay(Some(smoltcp::time::Duration::from_millis(1)));
    socket
}

impl State {
    pub(crate) fn new(wg: WireGuard, addresses: Vec<Ipv4Addr>) -> Self {
        let mut device = QueueDevice::default();
        let mut config = IfaceConfig::new(HardwareAddress::Ip);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        config.random_seed = (nanos as u64) ^ u64::from_le_bytes([wg.public_key()[0]; 8]);
        let mut iface = Interface::new(config, &mut device, SmolInstant::now());
        // AnyIP: smoltcp accepts every destination, and `deliver` only lets through packets to our
        // own addresses. This lifts smoltcp's small fixed limit on interface addresses.
        iface.set_any_ip(true);
        if iface.routes_mut().add_default_ipv4_route(Ipv4Addr::new(0, 0, 0, 1)).is_err() {
            tracing::warn!("smoltcp's route table is full");
        }
        let next_port = EPHEMERAL.start() + (nanos % u128::from(EPHEMERAL.end() - EPHEMERAL.start())) as u16;
        let mut state = State {
            iface,
            sockets: SocketSet::new(Vec::new()),
            device,
            wg,
            addresses: Vec::new(),
            listeners: HashMap::new(),
            orphans: Vec::new(),
            next_port,
            closed: false,
        };
        state.set_addresses(addresses);
        state
    }

    /// Replaces the mesh addresses this stack owns.
    pub(crate) fn set_addresses(&mut self, mut addresses: Vec<Ipv4Addr>) {
        let mut seen = std::collections::HashSet::new();
        addresses.retain(|a| seen.insert(*a));
        self.iface.update_ip_addrs(|addrs| {
            addrs.clear();
            for a in addresses.iter().filter(|a| !a.is_unspecified() && !a.is_broadcast() && !a.is_multicast()) {
                // smoltcp holds a few addresses only; with AnyIP the rest still work.
                if addrs.push(IpCidr::new((*a).into(), 32)).is_err() {
                    break;
                }
            }
        });
        self.addresses = addresses;
    }

    /// Queues an inbound packet for smoltcp if it is addressed to one of our addresses.
    fn deliver(&mut self, packet: Vec<u8>) {
        match ipv4_src_dst(&packet) {
            Some((_, dst)) if self.addresses.contains(&dst) => self.device.rx.push_back(packet),
            Some((_, dst)) => tracing::trace!(%dst, "dropping a packet not addressed to this netstack"),
            None => {}
        }
    }

    /// Decrypts one datagram and queues what it carries.
    fn receive_datagram(&mut self, from: SocketAddr, datagram: &[u8], out: &mut Vec<Datagram>) {
        let mut inbound = VecDeque::new();
        self.wg.decapsulate(from, datagram, out, &mut inbound);
        for packet in inbound {
            self.deliver(packet);
        }
    }

    /// Polls smoltcp until every queued inbound packet is processed, re-arming listeners between
    /// rounds, and encrypts what it sends.
    pub(crate) fn pump(&mut self, out: &mut Vec<Datagram>) {
        // Each round consumes up to RX_BUDGET packets, so this ends; the bound is a safeguard.
        for _ in 0..100_000 {
            self.device.budget = RX_BUDGET;
            let now = SmolInstant::now();
            self.iface.poll(now, &mut self.device, &mut self.sockets);
            self.rearm_listeners();
            while let Some(packet) = self.device.tx.pop_front() {
                self.wg.encapsulate(&packet, out);
            }
            if self.device.rx.is_empty() {
                break;
            }
        }
        self.sweep_orphans();
    }

    /// Keeps `LISTEN_BACKLOG` sockets listening on each listener (while fewer than `MAX_PENDING`
    /// connections wait for accept), and recycles sockets whose half-open connection was reset.
    pub(crate) fn rearm_listeners(&mut self) {
        for (addr, listener) in self.listeners.iter_mut() {
            let mut listening = 0;
            for handle in &listener.backlog {
                let socket = self.sockets.get_mut::<tcp::Socket>(*handle);
                if socket.state() == tcp::State::Closed {
                    // Reset before it was accepted: listen again on the same socket.
                    let _ = socket.listen(listen_endpoint(*addr));
                }
                if socket.state() == tcp::State::Listen {
                    listening += 1;
                }
            }
            while listening < LISTEN_BACKLOG && listener.backlog.len() < MAX_PENDING {
                let mut socket = new_tcp_socket();
                if let Err(e) = socket.listen(listen_endpoint(*addr)) {
                    tracing::warn!(%addr, %e, "cannot listen");
                    break;
                }
                listener.backlog.push(self.sockets.add(socket));
                listening += 1;
            }
        }
    }

    /// Removes dropped connections once they are closed.
    fn sweep_orphans(&mut self) {
        let sockets = &mut self.sockets;
        self.orphans.retain(|handle| {
            let state = sockets.get_mut::<tcp::Socket>(*handle).state();
            if matches!(state, tcp::State::Closed | tcp::State::TimeWait) {
                sockets.remove(*handle);
                false
            } else {
                true
            }
        });
    }

    /// Hands a socket whose handle is going away to the stack: it closes (or resets, when unread
    /// data would be lost) and is removed once closed.
    pub(crate) fn orphan(&mut self, handle: SocketHandle) {
        if self.closed {
            self.sockets.remove(handle);
            return;
        }
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        if socket.recv_queue() > 0 || matches!(socket.state(), tcp::State::SynSent | tcp::State::SynReceived) {
            socket.abort();
        } else {
            socket.close();
        }
        socket.set_timeout(Some(ORPHAN_TIMEOUT.into()));
        self.orphans.push(handle);
    }

    /// A free ephemeral port on `local`, if any.
    pub(crate) fn allocate_port(&mut self, local: Ipv4Addr) -> Option<u16> {
        let in_use: std::collections::HashSet<u16> = self
            .sockets
            .iter()
            .filter_map(|(_, s)| tcp::Socket::downcast(s))
            .flat_map(|t| {
                let listening = Some(t.listen_endpoint()).filter(|ep| ep.addr.is_none_or(|a| a == local.into()));
                let connected = t.local_endpoint().filter(|ep| ep.addr == local.into());
                [listening.map(|ep| ep.port), connected.map(|ep| ep.port)]
            })
            .flatten()
            .collect();
        let span = u32::from(EPHEMERAL.end() - EPHEMERAL.start()) + 1;
        for _ in 0..span {
            let port = self.next_port;
            self.next_port = if port >= *EPHEMERAL.end() { *EPHEMERAL.start() } else { port + 1 };
            if !in_use.contains(&port) {
                return Some(port);
            }
        }
        None
    }

    /// Aborts every connection: the stack is stopping.
    fn abort_all(&mut self) {
        self.closed = true;
        for (_, socket) in self.sockets.iter_mut() {
            if let Some(t) = tcp::Socket::downcast_mut(socket) {
                t.abort();
            }
        }
    }
}

/// The smoltcp listen endpoint for a listener address (`0.0.0.0` listens on every address).
pub(crate) fn listen_endpoint(addr: SocketAddrV4) -> IpListenEndpoint {
    let ip = *addr.ip();
    IpListenEndpoint { addr: (!ip.is_unspecified()).then(|| ip.into()), port: addr.port() }
}

/// Sends what the stack produced.
async fn send_all(udp: &UdpSocket, out: &mut Vec<Datagram>) {
    for (to, data) in out.drain(..) {
        if let Err(e) = udp.send_to(&data, to).await {
            tracing::debug!(%to, %e, "sending a WireGuard datagram failed");
        }
    }
}

/// The driver: waits for datagrams, socket activity or a timer, then polls everything.
pub(crate) async fn run(shared: Arc<Shared>, udp: UdpSocket) {
    let mut buf = vec![0u8; 65_536];
    let mut out: Vec<Datagram> = Vec::new();
    let mut next_timers = tokio::time::Instant::now();
    loop {
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        let delay = {
            let mut state = shared.lock();
            let State { iface, sockets, .. } = &mut *state;
            iface.poll_delay(SmolInstant::now(), sockets).map(Duration::from).unwrap_or(TIMER_TICK)
        };
        let wake_at = (tokio::time::Instant::now() + delay.max(Duration::from_micros(500))).min(next_timers);
        let mut readable = false;
        tokio::select! {
            r = udp.readable() => readable = r.is_ok(),
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep_until(wake_at) => {}
        }
        {
            let mut state = shared.lock();
            if readable {
                for _ in 0..RX_BATCH {
                    match udp.try_recv_from(&mut buf) {
                        Ok((n, from)) => state.receive_datagram(from, &buf[..n], &mut out),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            // e.g. ICMP port unreachable reported on some platforms: not fatal.
                            tracing::debug!(%e, "receiving from the UDP socket failed");
                            break;
                        }
                    }
                }
            }
            if tokio::time::Instant::now() >= next_timers {
                state.wg.update_timers(&mut out);
                next_timers = tokio::time::Instant::now() + TIMER_TICK;
            }
            state.pump(&mut out);
        }
        send_all(&udp, &mut out).await;
    }
    // Stopping: reset every connection (the peers learn of it) and wake every waiting handle.
    {
        let mut state = shared.lock();
        state.abort_all();
        state.pump(&mut out);
    }
    send_all(&udp, &mut out).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ICMP echo request from `src` to `dst` (checksums left zero: inbound ones are not verified).
    fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
        let total = 20 + 8 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64; // TTL
        p[9] = 1; // ICMP
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p[20] = 8; // echo request
        p[24..26].copy_from_slice(&0x1234u16.to_be_bytes()); // identifier
        p[26..28].copy_from_slice(&1u16.to_be_bytes()); // sequence
        p[28..].copy_from_slice(payload);
        p
    }

    #[test]
    fn answers_icmp_echo_on_its_addresses_only() {
        let mine = Ipv4Addr::new(10, 42, 0, 1);
        let peer = Ipv4Addr::new(10, 42, 0, 2);
        let mut state = State::new(WireGuard::new([1; 32]), vec![mine]);
        state.deliver(echo_request(peer, mine, b"ping"));
        state.deliver(echo_request(peer, Ipv4Addr::new(10, 42, 0, 77), b"not mine"));
        assert_eq!(state.device.rx.len(), 1, "a packet to a foreign address was queued");
        state.device.budget = RX_BUDGET;
        state.iface.poll(SmolInstant::now(), &mut state.device, &mut state.sockets);
        assert_eq!(state.device.tx.len(), 1, "expected exactly one reply");
        let reply = state.device.tx.pop_front().expect("reply");
        assert_eq!(ipv4_src_dst(&reply), Some((mine, peer)));
        assert_eq!(reply[9], 1, "not ICMP");
        assert_eq!(reply[20], 0, "not an echo reply");
        assert_eq!(&reply[28..], b"ping");
    }
}
