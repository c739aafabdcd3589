//! The byte pipes of laptop mode, each one TCP connection carried both ways until either side
//! closes: a local port forwarded to a mesh service, a SOCKS5 proxy that resolves
//! `*.mesh.local` itself, and an exposed service's mesh port delivered to 127.0.0.1.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use fast_socks5::server::Socks5ServerProtocol;
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::{ReplyError, Socks5Command};
use mesh_dataplane::dns::Zone;
use mesh_netstack::Netstack;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use super::directory::resolve;

/// How long a connection through the tunnel may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The zone names resolve in, replaced on every directory change.
pub type SharedZone = Arc<Mutex<Zone>>;

/// Carries bytes both ways until both sides are closed; errors end only this connection.
async fn pipe<A, B>(mut a: A, mut b: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
}

/// Where a connection to `what` goes: its mesh IP from the zone, with `port`.
fn target(zone: &SharedZone, what: &str, port: u16) -> Result<SocketAddrV4, String> {
    let zone = zone.lock().map_err(|_| "the directory lock is poisoned".to_owned())?;
    resolve(&zone, what)
        .map(|ip| SocketAddrV4::new(ip, port))
        .ok_or_else(|| format!("{what} is not in the mesh's zone (no such MeshService or MeshNode, or no mesh IP yet)"))
}

/// `meshctl forward`: accepts on `listener` and carries each connection to `dns_name:port`.
pub async fn forward(listener: TcpListener, stack: Netstack, zone: SharedZone, dns_name: String, port: u16) {
    loop {
        let Ok((local, from)) = listener.accept().await else { continue };
        let (stack, zone, dns_name) = (stack.clone(), zone.clone(), dns_name.clone());
        tokio::spawn(async move {
            let to = match target(&zone, &dns_name, port) {
                Ok(to) => to,
                Err(why) => return eprintln!("forward from {from}: {why}"),
            };
            match stack.connect(to, CONNECT_TIMEOUT).await {
                Ok(remote) => pipe(local, remote).await,
                Err(err) => eprintln!("forward from {from} to {dns_name} ({to}): {err}"),
            }
        });
    }
}

/// The SOCKS5 reply for a failed connection through the tunnel.
fn reply_for(err: &mesh_netstack::Error) -> ReplyError {
    let text = err.to_string();
    if text.contains("refused") {
        ReplyError::ConnectionRefused
    } else if text.contains("timed out") {
        ReplyError::ConnectionTimeout
    } else {
        ReplyError::HostUnreachable
    }
}

/// Where a SOCKS5 CONNECT goes: a `*.mesh.local` name through the zone, or an IPv4 literal
/// inside the mesh subnet. Anything else is refused: this proxy carries mesh traffic only.
pub fn socks_target(zone: &SharedZone, subnet: ipnet::Ipv4Net, to: &TargetAddr) -> Result<SocketAddrV4, String> {
    match to {
        TargetAddr::Domain(name, port) => target(zone, name, *port),
        TargetAddr::Ip(SocketAddr::V4(addr)) if subnet.contains(addr.ip()) => Ok(*addr),
        TargetAddr::Ip(addr) => {
            Err(format!("{addr} is outside the mesh subnet {subnet}: this proxy carries mesh traffic only"))
        }
    }
}

/// `--socks5`: a SOCKS5 server (no authentication; bind it to loopback) for CONNECT only.
pub async fn socks5(listener: TcpListener, stack: Netstack, zone: SharedZone, subnet: ipnet::Ipv4Net) {
    loop {
        let Ok((client, from)) = listener.accept().await else { continue };
        let (stack, zone) = (stack.clone(), zone.clone());
        tokio::spawn(async move {
            if let Err(err) = socks5_one(client, &stack, &zone, subnet).await {
                eprintln!("socks5 from {from}: {err:#}");
            }
        });
    }
}

async fn socks5_one(
    client: TcpStream,
    stack: &Netstack,
    zone: &SharedZone,
    subnet: ipnet::Ipv4Net,
) -> anyhow::Result<()> {
    let proto = Socks5ServerProtocol::accept_no_auth(client).await.context("SOCKS5 greeting")?;
    let (proto, command, to) = proto.read_command().await.context("SOCKS5 request")?;
    if command != Socks5Command::TCPConnect {
        proto.reply_error(&ReplyError::CommandNotSupported).await?;
        anyhow::bail!("only CONNECT is supported, got {command:?}");
    }
    let addr = match socks_target(zone, subnet, &to) {
        Ok(addr) => addr,
        Err(why) => {
            proto.reply_error(&ReplyError::HostUnreachable).await?;
            anyhow::bail!(why);
        }
    };
    match stack.connect(addr, CONNECT_TIMEOUT).await {
        Ok(remote) => {
            let bound = SocketAddr::V4(remote.local_addr());
            let client = proto.reply_success(bound).await?;
            pipe(client, remote).await;
            Ok(())
        }
        Err(err) => {
            proto.reply_error(&reply_for(&err)).await?;
            Err(err).with_context(|| format!("connecting to {to} ({addr})"))
        }
    }
}

/// `meshctl expose`: accepts on the service's mesh `ip:port` and delivers each connection to
/// 127.0.0.1:`local_port`.
pub async fn expose(listener: mesh_netstack::TcpListener, local_port: u16, what: String) {
    loop {
        let (remote, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => return eprintln!("{what}: no longer accepting: {err}"),
        };
        let what = what.clone();
        tokio::spawn(async move {
            match TcpStream::connect((Ipv4Addr::LOCALHOST, local_port)).await {
                Ok(local) => pipe(remote, local).await,
                Err(err) => eprintln!("{what}: {from} connected, but 127.0.0.1:{local_port} did not answer: {err}"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn zone() -> SharedZone {
        let records = BTreeMap::from([("web.default.mesh.local".to_owned(), vec![Ipv4Addr::new(10, 42, 0, 9)])]);
        Arc::new(Mutex::new(Zone { records, ..Zone::default() }))
    }

    #[test]
    fn socks_targets_are_mesh_names_or_mesh_addresses_only() {
        let subnet: ipnet::Ipv4Net = "10.42.0.0/16".parse().expect("subnet");
        let z = zone();
        let name = TargetAddr::Domain("Web.default.mesh.local.".into(), 80);
        assert_eq!(socks_target(&z, subnet, &name), Ok("10.42.0.9:80".parse().expect("addr")));
        let inside = TargetAddr::Ip("10.42.3.4:22".parse().expect("addr"));
        assert_eq!(socks_target(&z, subnet, &inside), Ok("10.42.3.4:22".parse().expect("addr")));
        let outside = TargetAddr::Ip("192.0.2.1:80".parse().expect("addr"));
        assert!(socks_target(&z, subnet, &outside).expect_err("outside").contains("outside the mesh subnet"));
        let unknown = TargetAddr::Domain("example.com".into(), 80);
        assert!(socks_target(&z, subnet, &unknown).expect_err("unknown").contains("not in the mesh's zone"));
    }
}
