//! Laptop mode: `meshctl connect`, `forward` and `expose` join the mesh as an ephemeral member
//! with no root, no tun device and no capability. WireGuard and a TCP/IP stack run inside this
//! process ([`mesh_netstack`]: boringtun's Noise and smoltcp); the member is a MeshNode like any
//! other (the controller gives it a mesh IP and a peer entry, every agent adds it as a peer),
//! marked with the user's name so that admission lets only them touch it and the controller
//! collects it when its Lease lapses (a killed process: within 30 s + 15 s + the controller's
//! 5 s sweep).
//!
//! - [`args`]: flags and operand grammar;
//! - [`member`]: the cluster objects (MeshNode, status, Lease, exposed MeshServices);
//! - [`directory`]: the watched directory, the member's plan, names;
//! - [`relay`]: forward, SOCKS5 and expose byte pipes;
//! - this module: the session that ties them together and its live status line.

pub mod args;
pub mod directory;
pub mod member;
pub mod relay;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use mesh_netstack::Netstack;
use mesh_wireguard::PrivateKey;

use self::args::{EndpointChoice, MemberArgs, PortMap, QualifiedName};
use self::directory::{Desired, Watched};
use self::member::Member;
use crate::kubeconfig::{self, ClusterArgs};

/// One local port forwarded to a service.
#[derive(Clone, Debug)]
pub struct Forward {
    /// The service.
    pub service: QualifiedName,
    /// Local and remote ports.
    pub ports: PortMap,
    /// The local address.
    pub address: Ipv4Addr,
}

/// One local port exposed as a service.
#[derive(Clone, Debug)]
pub struct Expose {
    /// The service to publish.
    pub service: QualifiedName,
    /// The port on 127.0.0.1.
    pub local_port: u16,
    /// The port on the service's mesh IP.
    pub port: u16,
}

/// What one laptop-mode process does.
#[derive(Clone, Debug)]
pub struct Session {
    /// Membership.
    pub member: MemberArgs,
    /// Ports forwarded to services.
    pub forwards: Vec<Forward>,
    /// Local ports exposed as services.
    pub exposes: Vec<Expose>,
}

/// The host name, for the default member name.
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .or_else(|_| std::env::var("COMPUTERNAME"))
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// The address this machine sends from towards `peer` (no packet is sent: a UDP `connect`
/// only picks the route).
fn source_towards(peer: SocketAddr) -> Option<Ipv4Addr> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect(peer).ok()?;
    match socket.local_addr().ok()?.ip() {
        std::net::IpAddr::V4(ip) if !ip.is_unspecified() && !ip.is_loopback() => Some(ip),
        _ => None,
    }
}

/// The endpoint to publish for `choice`, the stack bound to `port`, the peers in `desired`.
fn endpoint(choice: &EndpointChoice, port: u16, desired: &Desired) -> anyhow::Result<Option<String>> {
    Ok(match choice {
        EndpointChoice::None => None,
        EndpointChoice::Fixed(text) => Some(text.clone()),
        EndpointChoice::Auto => {
            let ip = desired.peers.iter().filter_map(|p| p.endpoint).find_map(source_towards).context(
                "--endpoint auto found no address towards any mesh node (none publishes an endpoint, or none is \
                 routable from here): pass --endpoint HOST:PORT, or --endpoint none behind NAT",
            )?;
            Some(SocketAddrV4::new(ip, port).to_string())
        }
    })
}

/// Runs a session until Ctrl-C (or SIGTERM), then removes what it created.
pub async fn run(session: Session, cluster: &ClusterArgs) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    let connection = kubeconfig::connect(cluster).await?;
    let client = connection.client.clone();
    let owner = member::whoami(&client).await.with_context(|| format!("connecting to {}", connection.target()))?;
    let name = match &session.member.name {
        Some(name) if !args::is_dns_label(name) => {
            bail!("--name {name:?} is not a DNS label (lower-case letters, digits and '-', 1 to 63)")
        }
        Some(name) => name.clone(),
        None => {
            let mut random = [0u8; 2];
            getrandom::fill(&mut random).context("drawing a random name suffix")?;
            args::default_name(&hostname(), u16::from_be_bytes(random))
        }
    };
    let key = PrivateKey::generate().context("generating a WireGuard key")?;
    let listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, session.member.listen_port));
    let stack =
        Netstack::start(mesh_netstack::Config { private_key: *key.secret_bytes(), listen, addresses: Vec::new() })
            .await
            .with_context(|| format!("starting the userspace WireGuard on UDP {listen}"))?;
    let namespaces: BTreeSet<String> = session.exposes.iter().map(|e| e.service.namespace.clone()).collect();
    let namespaces: Vec<String> = namespaces.into_iter().collect();
    let member = Member::create(&client, &cluster.mesh_namespace, &name, &owner, &namespaces).await?;
    let exposed: Vec<QualifiedName> = session.exposes.iter().map(|e| e.service.clone()).collect();
    let result = tokio::select! {
        result = serve(&session, &member, &stack, &key, &client, started) => result,
        signal = shutdown_signal() => signal,
    };
    eprintln!(
        "leaving the mesh: deleting MeshNode {name}{}",
        if exposed.is_empty() { "" } else { " and what it exposes" }
    );
    let left = member.leave(&exposed).await;
    stack.shutdown().await;
    result.and(left)
}

/// Ctrl-C, or SIGTERM where there is one.
async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// Joins, then keeps the stack in step with the directory, the Lease renewed, the pipes open
/// and the status line printed. Returns only on an error.
async fn serve(
    session: &Session,
    member: &Member,
    stack: &Netstack,
    key: &PrivateKey,
    client: &kube::Client,
    started: tokio::time::Instant,
) -> anyhow::Result<()> {
    let opts = &session.member;
    let subnet: ipnet::Ipv4Net = opts.subnet.to_string().parse().context("the subnet")?;
    let settings = directory::settings(subnet);
    let watched = Watched::start(client);
    watched.ready().await.context("listing MeshNodes and MeshServices")?;
    let first = directory::plan(&watched.snapshot(subnet), &member.name, key, &settings)?;
    let port = stack.local_addr().port();
    let endpoint = endpoint(&opts.endpoint, port, &directory::desired(&first, opts.keepalive))?;
    member.publish(&key.public_key().to_base64(), endpoint.as_deref(), port).await?;
    member.renew(None).await?;
    let mesh_ip = tokio::select! {
        ip = member.wait_joined(opts.join_timeout) => ip?,
        r = renew_until_error(member, None) => return r,
    };
    for expose in &session.exposes {
        member.expose(&expose.service, expose.port).await?;
    }
    let zone: relay::SharedZone = Arc::default();
    let mut listening: BTreeMap<SocketAddrV4, tokio::task::JoinHandle<()>> = BTreeMap::new();
    // Directory → stack, once now and on every change (at most every 100 ms).
    let sync = |listening: &mut BTreeMap<SocketAddrV4, tokio::task::JoinHandle<()>>| -> anyhow::Result<Desired> {
        let snapshot = watched.snapshot(subnet);
        let plan = directory::plan(&snapshot, &member.name, key, &settings)?;
        let desired = directory::desired(&plan, opts.keepalive);
        stack.set_peers(desired.peers.clone());
        stack.set_addresses(desired.addresses.clone());
        *zone.lock().map_err(|_| anyhow::anyhow!("the zone lock is poisoned"))? =
            mesh_dataplane::dns::rezone(snapshot.zone(), &opts.zone);
        let wanted: BTreeSet<SocketAddrV4> =
            desired.hosted.iter().flat_map(|(ip, ports, _)| ports.iter().map(|p| SocketAddrV4::new(*ip, *p))).collect();
        listening.retain(|at, task| {
            let keep = wanted.contains(at);
            if !keep {
                task.abort();
            }
            keep
        });
        Ok(desired)
    };
    let desired = sync(&mut listening)?;
    say_joined(member, mesh_ip, port, endpoint.as_deref(), started.elapsed(), &desired);
    for forward in &session.forwards {
        let at = args::listen_address(forward.address, forward.ports);
        let listener =
            tokio::net::TcpListener::bind(at).await.with_context(|| format!("listening on {at} for the forward"))?;
        eprintln!(
            "forwarding {at} -> {} port {} ({})",
            forward.service,
            forward.ports.remote,
            forward.service.dns_name_in(&opts.zone)
        );
        tokio::spawn(relay::forward(
            listener,
            stack.clone(),
            zone.clone(),
            forward.service.dns_name_in(&opts.zone),
            forward.ports.remote,
        ));
    }
    if let Some(at) = opts.socks5 {
        let listener =
            tokio::net::TcpListener::bind(at).await.with_context(|| format!("listening on {at} (SOCKS5)"))?;
        eprintln!("SOCKS5 proxy on {at}: curl --socks5-hostname {at} http://NAME.NAMESPACE.{}:PORT", opts.zone);
        tokio::spawn(relay::socks5(listener, stack.clone(), zone.clone(), subnet));
    }
    let mut desired = desired;
    let mut renew = tokio::time::interval(member::RENEW_EVERY);
    let status_every = if opts.status_every.is_zero() { Duration::from_secs(3600 * 24) } else { opts.status_every };
    let mut status = tokio::time::interval(status_every);
    let mut resync = tokio::time::interval(Duration::from_secs(30));
    loop {
        // Listeners for hosted services that have their IP now.
        for (ip, ports, service) in &desired.hosted {
            let Some(expose) = session.exposes.iter().find(|e| e.service.to_string() == *service) else { continue };
            for port in ports {
                let at = SocketAddrV4::new(*ip, *port);
                if listening.contains_key(&at) {
                    continue;
                }
                match stack.listen(at).await {
                    Ok(listener) => {
                        eprintln!(
                            "exposing 127.0.0.1:{} as {} ({at})",
                            expose.local_port,
                            expose.service.dns_name_in(&opts.zone)
                        );
                        let what = format!("{} ({at})", expose.service);
                        listening.insert(at, tokio::spawn(relay::expose(listener, expose.local_port, what)));
                    }
                    Err(err) => eprintln!("cannot listen on {at} for {service}: {err}"),
                }
            }
        }
        tokio::select! {
            () = watched.changed.notified() => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                desired = sync(&mut listening)?;
            }
            _ = resync.tick() => desired = sync(&mut listening)?,
            _ = renew.tick() => {
                if let Err(err) = member.renew(desired.applied.as_ref()).await {
                    eprintln!("warning: {err:#} (the mesh forgets this member if the Lease lapses)");
                }
            }
            _ = status.tick() => {
                if !opts.status_every.is_zero() {
                    eprintln!("{}", status_line(&member.name, mesh_ip, &stack.stats(), &desired.names, desired.waiting.as_deref()));
                }
            }
        }
    }
}

/// Renews the Lease until a renewal fails (used while waiting to join).
async fn renew_until_error(member: &Member, applied: Option<&mesh_api::AppliedPeers>) -> anyhow::Result<()> {
    loop {
        tokio::time::sleep(member::RENEW_EVERY).await;
        member.renew(applied).await?;
    }
}

fn say_joined(member: &Member, ip: Ipv4Addr, port: u16, endpoint: Option<&str>, took: Duration, desired: &Desired) {
    eprintln!(
        "connected as {} ({ip}, {}.node.mesh.local) for {} in {:.1}s: userspace WireGuard on UDP {port}, endpoint {}, {} \
         peer(s); Ctrl-C leaves the mesh",
        member.name,
        member.name,
        member.owner,
        took.as_secs_f64(),
        endpoint.unwrap_or("none (peers learn it from this process's packets)"),
        desired.peers.len(),
    );
}

/// `NAME (IP): R/N peers reached, last handshake Ts ago, rx X tx Y` and the peers not reached.
pub fn status_line(
    name: &str,
    ip: Ipv4Addr,
    stats: &[mesh_netstack::PeerStats],
    names: &[(String, String)],
    waiting: Option<&str>,
) -> String {
    use base64::Engine as _;
    let fresh = |s: &&mesh_netstack::PeerStats| s.last_handshake.is_some_and(|age| age < Duration::from_secs(180));
    let reached = stats.iter().filter(fresh).count();
    let (rx, tx) = stats.iter().fold((0u64, 0u64), |(r, t), s| (r + s.rx_bytes, t + s.tx_bytes));
    let newest = stats.iter().filter_map(|s| s.last_handshake).min();
    let name_of = |key: &[u8; 32]| {
        let b64 = base64::engine::general_purpose::STANDARD.encode(key);
        names.iter().find(|(k, _)| *k == b64).map_or_else(|| b64[..8].to_owned(), |(_, n)| n.clone())
    };
    let missing: Vec<String> = stats.iter().filter(|s| !fresh(s)).map(|s| name_of(&s.public_key)).collect();
    let mut line = format!(
        "{name} ({ip}): {reached}/{} peers reached, last handshake {}, rx {} tx {}",
        stats.len(),
        newest.map_or_else(|| "never".to_owned(), |age| format!("{}s ago", age.as_secs())),
        bytes(rx),
        bytes(tx)
    );
    if !missing.is_empty() {
        line.push_str(&format!("; no handshake with {}", missing.join(", ")));
    }
    if let Some(why) = waiting {
        line.push_str(&format!("; {why}"));
    }
    line
}

/// 1536 → `1.5 KiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(key: u8, age: Option<u64>, rx: u64, tx: u64) -> mesh_netstack::PeerStats {
        mesh_netstack::PeerStats {
            public_key: [key; 32],
            endpoint: None,
            last_handshake: age.map(Duration::from_secs),
            rx_bytes: rx,
            tx_bytes: tx,
        }
    }

    #[test]
    fn the_status_line_counts_reached_peers_and_names_the_others() {
        use base64::Engine as _;
        let names = vec![(base64::engine::general_purpose::STANDARD.encode([2u8; 32]), "hm-node-2".to_owned())];
        let line = status_line(
            "laptop",
            Ipv4Addr::new(10, 42, 0, 7),
            &[stats(1, Some(5), 1536, 10), stats(2, None, 0, 0)],
            &names,
            None,
        );
        assert_eq!(
            line,
            "laptop (10.42.0.7): 1/2 peers reached, last handshake 5s ago, rx 1.5 KiB tx 10 B; no handshake with hm-node-2"
        );
    }

    #[test]
    fn byte_counts_are_readable() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(5 * 1024 * 1024), "5.0 MiB");
    }
}
