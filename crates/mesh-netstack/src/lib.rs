//! A userspace WireGuard peer and TCP/IP stack in one unprivileged process.
//!
//! No tun device, no root, no netlink: WireGuard runs over an ordinary UDP socket (boringtun's
//! Noise implementation) and the inner IP packets are handled by smoltcp's TCP/IP stack in the
//! same process. This is how `meshctl connect` (laptop mode) joins the mesh: it reaches mesh
//! services with [`Netstack::connect`] and serves TCP on its own mesh IPs with
//! [`Netstack::listen`]. The same technique as onetun's and Tailscale's userspace networking.
//!
//! IPv4 and TCP only; the stack answers ICMP echo on its addresses. Inner MTU 1420.
//!
//! ```no_run
//! # async fn demo(key: [u8; 32], peer: mesh_netstack::Peer) -> Result<(), mesh_netstack::Error> {
//! use mesh_netstack::{Config, Netstack};
//! let stack = Netstack::start(Config {
//!     private_key: key,
//!     listen: "0.0.0.0:0".parse().expect("address"),
//!     addresses: vec!["10.42.0.1".parse().expect("address")],
//! })
//! .await?;
//! stack.set_peers(vec![peer]);
//! let stream = stack.connect("10.42.0.9:80".parse().expect("address"), std::time::Duration::from_secs(5)).await?;
//! # drop(stream);
//! stack.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod routing;
mod stack;
mod tcp;
mod wireguard;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use smoltcp::socket::AnySocket as _;
use smoltcp::socket::tcp as smol_tcp;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

pub use crate::tcp::{TcpListener, TcpStream};

use crate::stack::{Listener, Shared, State};
use crate::wireguard::WireGuard;

/// How to start a [`Netstack`].
#[derive(Clone)]
pub struct Config {
    /// This process's WireGuard private key (x25519).
    pub private_key: [u8; 32],
    /// The UDP address to bind, e.g. `0.0.0.0:0` for any port.
    pub listen: SocketAddr,
    /// The mesh IPs this process owns. The first one is the source of outgoing connections.
    pub addresses: Vec<Ipv4Addr>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("private_key", &"<redacted>")
            .field("listen", &self.listen)
            .field("addresses", &self.addresses)
            .finish()
    }
}

/// A WireGuard peer of the netstack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The peer's public key.
    pub public_key: [u8; 32],
    /// Where to send to the peer. `None` until the peer contacts us; a valid packet from the peer
    /// moves it to the packet's source (roaming).
    pub endpoint: Option<SocketAddr>,
    /// The inner addresses routed to this peer, and the only sources accepted from it.
    pub allowed_ips: Vec<ipnet::Ipv4Net>,
    /// Seconds between keepalives, to keep NAT mappings open.
    pub persistent_keepalive: Option<u16>,
}

/// Counters of one peer.
#[derive(Clone, Debug)]
pub struct PeerStats {
    /// The peer's public key.
    pub public_key: [u8; 32],
    /// The peer's current endpoint (configured or roamed).
    pub endpoint: Option<SocketAddr>,
    /// Time since the last completed handshake, if any.
    pub last_handshake: Option<Duration>,
    /// Inner bytes received from the peer.
    pub rx_bytes: u64,
    /// Inner bytes sent to the peer.
    pub tx_bytes: u64,
}

/// What failed, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The UDP socket could not be bound.
    #[error("binding the WireGuard UDP socket to {addr} failed: {source}; is the port in use?")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// No peer's allowed IPs contain the destination.
    #[error("no peer's allowed IPs contain {0}: is the node in the mesh?")]
    NoRoute(Ipv4Addr),
    /// The netstack has no address to connect from.
    #[error("this netstack has no mesh address to connect from: set Config::addresses or call set_addresses")]
    NoAddress,
    /// Listening on an address the netstack does not own.
    #[error("cannot listen on {0}: it is not one of this netstack's addresses; call set_addresses first")]
    NotLocal(SocketAddrV4),
    /// Listening on port 0.
    #[error("cannot listen on {0}: pick a port other than 0")]
    InvalidPort(SocketAddrV4),
    /// Two listeners on one address.
    #[error("{0} already has a listener in this netstack")]
    AddrInUse(SocketAddrV4),
    /// Every ephemeral port is taken.
    #[error("no free local port in 49152..=65535 on {0}: too many open connections")]
    NoPorts(Ipv4Addr),
    /// The connection did not complete in time.
    #[error("connecting to {to} timed out after {after:?}: {reason}")]
    Timeout {
        /// The destination.
        to: SocketAddrV4,
        /// The timeout given.
        after: Duration,
        /// What the WireGuard side knows: no handshake, or a handshake but no answer.
        reason: String,
    },
    /// The remote host answered with a reset: nothing listens there.
    #[error("connection refused by {0}: nothing listens on that port")]
    Refused(SocketAddrV4),
    /// smoltcp rejected the connection parameters.
    #[error("cannot connect to {to}: {reason}")]
    Connect {
        /// The destination.
        to: SocketAddrV4,
        /// smoltcp's reason.
        reason: String,
    },
    /// The netstack was shut down.
    #[error("the netstack was shut down")]
    Shutdown,
}

/// UDP socket buffers asked of the OS (it may grant less, e.g. Linux's `net.core.rmem_max`).
/// The defaults (~200 KiB) overflow under a full TCP window of bursts and the losses cost far
/// more than the memory.
const UDP_BUFFER: usize = 4 << 20;

/// Binds the WireGuard UDP socket, non-blocking, with large buffers.
fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    for (what, result) in
        [("receive", socket.set_recv_buffer_size(UDP_BUFFER)), ("send", socket.set_send_buffer_size(UDP_BUFFER))]
    {
        if let Err(e) = result {
            tracing::debug!(%e, "cannot enlarge the UDP {what} buffer");
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Stops the driver when the last [`Netstack`] handle goes away.
struct Inner {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    public_key: [u8; 32],
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

/// A running userspace WireGuard peer with its TCP/IP stack. Cheap to clone; the stack runs in a
/// tokio task until [`Netstack::shutdown`] or until the last handle is dropped.
#[derive(Clone)]
pub struct Netstack {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Netstack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netstack").field("local_addr", &self.inner.local_addr).finish()
    }
}

impl Netstack {
    /// Binds the UDP socket and starts the stack. Must be called inside a tokio runtime.
    pub async fn start(config: Config) -> Result<Netstack, Error> {
        let udp = bind_udp(config.listen).map_err(|source| Error::Bind { addr: config.listen, source })?;
        let local_addr = udp.local_addr().map_err(|source| Error::Bind { addr: config.listen, source })?;
        let wg = WireGuard::new(config.private_key);
        let public_key = wg.public_key();
        let shared = Arc::new(Shared::new(State::new(wg, config.addresses)));
        let task = tokio::spawn(stack::run(shared.clone(), udp));
        Ok(Netstack { inner: Arc::new(Inner { shared, local_addr, public_key, task: Mutex::new(Some(task)) }) })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// The bound UDP socket's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// This netstack's WireGuard public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.inner.public_key
    }

    /// Replaces the peer set. Peers whose key is unchanged keep their session (and their roamed
    /// endpoint when the new `endpoint` is `None`); removed keys are dropped; endpoint and allowed
    /// IPs changes apply at once. Changing `persistent_keepalive` starts a new session.
    pub fn set_peers(&self, peers: Vec<Peer>) {
        self.shared().lock().wg.set_peers(peers);
        self.shared().wake.notify_one();
    }

    /// Replaces the mesh addresses this netstack owns (e.g. adds a service IP it hosts).
    pub fn set_addresses(&self, addresses: Vec<Ipv4Addr>) {
        self.shared().lock().set_addresses(addresses);
        self.shared().wake.notify_one();
    }

    /// Opens a TCP connection to `to` through the peer whose allowed IPs contain it, from the
    /// netstack's first address. Fails fast with [`Error::NoRoute`] or [`Error::Refused`], or with
    /// [`Error::Timeout`] saying whether the WireGuard handshake worked.
    pub async fn connect(&self, to: SocketAddrV4, timeout: Duration) -> Result<TcpStream, Error> {
        let shared = self.shared().clone();
        let (handle, local) = {
            let mut state = shared.lock();
            if state.closed {
                return Err(Error::Shutdown);
            }
            if !state.wg.routes(*to.ip()) {
                return Err(Error::NoRoute(*to.ip()));
            }
            let local_ip = *state.addresses.first().ok_or(Error::NoAddress)?;
            let port = state.allocate_port(local_ip).ok_or(Error::NoPorts(local_ip))?;
            let mut socket = stack::new_tcp_socket();
            let state = &mut *state;
            socket
                .connect(state.iface.context(), (*to.ip(), to.port()), (local_ip, port))
                .map_err(|e| Error::Connect { to, reason: e.to_string() })?;
            (state.sockets.add(socket), SocketAddrV4::new(local_ip, port))
        };
        shared.wake.notify_one();
        let stream = TcpStream::new(shared.clone(), handle, local, to);
        match tokio::time::timeout(timeout, stream.established()).await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                let reason = shared.lock().wg.describe_path(*to.ip());
                Err(Error::Timeout { to, after: timeout, reason })
            }
        }
    }

    /// Listens for TCP connections on `on`: one of the netstack's addresses, or `0.0.0.0` for all.
    pub async fn listen(&self, on: SocketAddrV4) -> Result<TcpListener, Error> {
        if on.port() == 0 {
            return Err(Error::InvalidPort(on));
        }
        let shared = self.shared().clone();
        {
            let mut state = shared.lock();
            if state.closed {
                return Err(Error::Shutdown);
            }
            if !on.ip().is_unspecified() && !state.addresses.contains(on.ip()) {
                return Err(Error::NotLocal(on));
            }
            let wildcard = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, on.port());
            let clash = state
                .listeners
                .keys()
                .any(|l| l.port() == on.port() && (*l == on || *l == wildcard || on.ip().is_unspecified()));
            if clash {
                return Err(Error::AddrInUse(on));
            }
            state.listeners.insert(on, Listener { backlog: Vec::new() });
            state.rearm_listeners();
        }
        shared.wake.notify_one();
        Ok(TcpListener::new(shared, on))
    }

    /// Per-peer counters, sorted by public key.
    pub fn stats(&self) -> Vec<PeerStats> {
        self.shared().lock().wg.stats()
    }

    /// Stops the stack: resets every connection, stops the task and closes the UDP socket.
    pub async fn shutdown(self) {
        let task = self.inner.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.shared().stop.store(true, Ordering::Release);
        self.shared().wake.notify_one();
        if let Some(task) = task
            && let Err(e) = task.await
        {
            tracing::warn!(%e, "the netstack task failed");
        }
        // Nothing may act on the sockets any more, even if the task died early.
        let mut state = self.shared().lock();
        state.closed = true;
        for (_, socket) in state.sockets.iter_mut() {
            if let Some(t) = smol_tcp::Socket::downcast_mut(socket)
                && t.state() != smol_tcp::State::Closed
            {
                t.abort();
            }
        }
    }
}
