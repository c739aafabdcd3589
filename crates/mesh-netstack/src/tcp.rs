//! TCP streams and listeners over the userspace stack: thin handles on smoltcp sockets owned by
//! the stack's state, woken through smoltcp's socket wakers.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddrV4;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use smoltcp::wire::IpEndpoint;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::Error;
use crate::stack::Shared;

fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the netstack was shut down")
}

/// A TCP connection over the mesh. Reads and writes go through the userspace stack; it works
/// with `tokio::io::copy_bidirectional`. `shutdown()` sends a FIN; dropping it closes the
/// connection (or resets it when received data was left unread).
pub struct TcpStream {
    shared: Arc<Shared>,
    handle: SocketHandle,
    local: SocketAddrV4,
    peer: SocketAddrV4,
}

impl std::fmt::Debug for TcpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStream").field("local", &self.local).field("peer", &self.peer).finish()
    }
}

impl TcpStream {
    pub(crate) fn new(shared: Arc<Shared>, handle: SocketHandle, local: SocketAddrV4, peer: SocketAddrV4) -> Self {
        TcpStream { shared, handle, local, peer }
    }

    /// The remote end of the connection.
    pub fn peer_addr(&self) -> SocketAddrV4 {
        self.peer
    }

    /// This end of the connection (one of the netstack's mesh addresses).
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// Waits until an outgoing connection is established or has failed.
    pub(crate) async fn established(&self) -> Result<(), Error> {
        poll_fn(|cx| {
            let mut state = self.shared.lock();
            if state.closed {
                return Poll::Ready(Err(Error::Shutdown));
            }
            let socket = state.sockets.get_mut::<tcp::Socket>(self.handle);
            match socket.state() {
                tcp::State::SynSent | tcp::State::SynReceived => {
                    socket.register_send_waker(cx.waker());
                    Poll::Pending
                }
                tcp::State::Closed | tcp::State::Listen => Poll::Ready(Err(Error::Refused(self.peer))),
                _ => Poll::Ready(Ok(())),
            }
        })
        .await
    }
}

impl AsyncRead for TcpStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut state = self.shared.lock();
        if state.closed {
            return Poll::Ready(Err(stopped()));
        }
        let socket = state.sockets.get_mut::<tcp::Socket>(self.handle);
        if socket.can_recv() {
            let read = socket.recv(|data| {
                let n = data.len().min(buf.remaining());
                buf.put_slice(&data[..n]);
                (n, n)
            });
            drop(state);
            // Reading opens the receive window: let the driver tell the peer.
            self.shared.wake.notify_one();
            return Poll::Ready(read.map(|_| ()).map_err(|e| io::Error::other(e.to_string())));
        }
        if !socket.may_recv() {
            // FIN received (end of stream) or the connection is gone.
            return Poll::Ready(Ok(()));
        }
        socket.register_recv_waker(cx.waker());
        Poll::Pending
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut state = self.shared.lock();
        if state.closed {
            return Poll::Ready(Err(stopped()));
        }
        let socket = state.sockets.get_mut::<tcp::Socket>(self.handle);
        if !socket.may_send() {
            let kind = if socket.state() == tcp::State::Closed {
                io::ErrorKind::ConnectionReset
            } else {
                io::ErrorKind::BrokenPipe
            };
            return Poll::Ready(Err(io::Error::new(kind, format!("the connection to {} is closed", self.peer))));
        }
        if socket.can_send() {
            let sent = socket.send_slice(data);
            drop(state);
            self.shared.wake.notify_one();
            return Poll::Ready(sent.map_err(|e| io::Error::other(e.to_string())));
        }
        socket.register_send_waker(cx.waker());
        Poll::Pending
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written data is already in the stack, which sends it as the window allows.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.shared.lock();
        if state.closed {
            return Poll::Ready(Err(stopped()));
        }
        // The FIN goes out after the data still in the send buffer.
        state.sockets.get_mut::<tcp::Socket>(self.handle).close();
        drop(state);
        self.shared.wake.notify_one();
        Poll::Ready(Ok(()))
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        self.shared.lock().orphan(self.handle);
        self.shared.wake.notify_one();
    }
}

/// Accepts TCP connections on one address of the netstack. The stack keeps a backlog of
/// listening sockets and re-arms it after each connection, so any number of connections can be
/// accepted. Dropping the listener stops listening and resets connections not yet accepted.
pub struct TcpListener {
    shared: Arc<Shared>,
    addr: SocketAddrV4,
}

impl std::fmt::Debug for TcpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpListener").field("addr", &self.addr).finish()
    }
}

fn v4(endpoint: Option<IpEndpoint>) -> Option<SocketAddrV4> {
    let endpoint = endpoint?;
    match endpoint.addr {
        smoltcp::wire::IpAddress::Ipv4(ip) => Some(SocketAddrV4::new(ip, endpoint.port)),
    }
}

impl TcpListener {
    pub(crate) fn new(shared: Arc<Shared>, addr: SocketAddrV4) -> Self {
        TcpListener { shared, addr }
    }

    /// The address this listener was bound to.
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// Waits for the next established connection; returns it and the remote address.
    pub async fn accept(&self) -> Result<(TcpStream, SocketAddrV4), Error> {
        let (handle, local, peer) = poll_fn(|cx| {
            let mut state = self.shared.lock();
            if state.closed {
                return Poll::Ready(Err(Error::Shutdown));
            }
            let state = &mut *state;
            let Some(listener) = state.listeners.get_mut(&self.addr) else {
                return Poll::Ready(Err(Error::Shutdown));
            };
            let mut ready = None;
            for (i, handle) in listener.backlog.iter().enumerate() {
                let socket = state.sockets.get_mut::<tcp::Socket>(*handle);
                match socket.state() {
                    tcp::State::Listen | tcp::State::SynReceived | tcp::State::Closed => {
                        socket.register_recv_waker(cx.waker())
                    }
                    _ => {
                        if let (Some(local), Some(peer)) = (v4(socket.local_endpoint()), v4(socket.remote_endpoint())) {
                            ready = Some((i, *handle, local, peer));
                            break;
                        }
                    }
                }
            }
            match ready {
                Some((i, handle, local, peer)) => {
                    listener.backlog.swap_remove(i);
                    state.rearm_listeners();
                    Poll::Ready(Ok((handle, local, peer)))
                }
                None => Poll::Pending,
            }
        })
        .await?;
        Ok((TcpStream::new(self.shared.clone(), handle, local, peer), peer))
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        if let Some(listener) = state.listeners.remove(&self.addr) {
            for handle in listener.backlog {
                state.orphan(handle);
            }
        }
        drop(state);
        self.shared.wake.notify_one();
    }
}
