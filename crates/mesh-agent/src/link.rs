//! The IP side of `wg-harness`, over rtnetlink: MTU and up, the node's mesh address and the
//! hosted service addresses (all /32), the route for the mesh subnet with the node's mesh
//! IP as preferred source, and on a relay IPv4 forwarding on the interface. Also finds the node's underlay address for its endpoint.
//!
//! Every call compares with what the kernel has and changes only what differs.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, bail};
use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressScope};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// What the interface should carry (the plan's [`mesh_plan::LinkAddresses`]).
pub type Wanted = mesh_plan::LinkAddresses;

/// A netlink connection.
#[derive(Clone)]
pub struct Links {
    handle: Handle,
}

impl Links {
    /// Opens a netlink route socket (in the agent's network namespace).
    pub fn connect() -> anyhow::Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection().context("opening a netlink route socket")?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// The index of link `name`, if it exists.
    pub async fn index(&self, name: &str) -> anyhow::Result<Option<u32>> {
        // Read the reply to its end: a stream dropped early makes netlink-proto warn that it
        // "failed to forward response back to the handle".
        let links = self.handle.link().get().match_name(name.to_owned()).execute();
        match links.try_collect::<Vec<_>>().await {
            Ok(links) => Ok(links.first().map(|l| l.header.index)),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc_enodev() => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up link {name}")),
        }
    }

    /// Deletes link `name` (with it go its addresses and routes); false when there was none.
    pub async fn delete(&self, name: &str) -> anyhow::Result<bool> {
        let Some(index) = self.index(name).await? else { return Ok(false) };
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(true),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc_enodev() => Ok(false),
            Err(e) => Err(e).with_context(|| format!("deleting link {name}")),
        }
    }

    /// Brings `interface` to the wanted state; returns what it changed (empty: nothing).
    pub async fn configure(&self, interface: &str, wanted: &Wanted) -> anyhow::Result<Vec<String>> {
        let Some(index) = self.index(interface).await? else {
            bail!("link {interface} does not exist");
        };
        let mut changed = Vec::new();

        let link = self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_collect::<Vec<_>>()
            .await?
            .into_iter()
            .next()
            .with_context(|| format!("link {interface} vanished"))?;
        let mtu = link.attributes.iter().find_map(|a| if let LinkAttribute::Mtu(m) = a { Some(*m) } else { None });
        let up = link.header.flags.contains(LinkFlags::Up);
        if mtu != Some(wanted.mtu) || !up {
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(index).mtu(wanted.mtu).up().build())
                .execute()
                .await
                .with_context(|| format!("setting MTU {} and up on {interface}", wanted.mtu))?;
            changed.push(format!("mtu {} up", wanted.mtu));
        }

        let mut want: BTreeSet<Ipv4Addr> = wanted.service_ips.clone();
        want.insert(wanted.node_ip);
        let mut have = BTreeSet::new();
        let mut addresses = self.handle.address().get().set_link_index_filter(index).execute();
        while let Some(message) = addresses.try_next().await? {
            let Some(IpAddr::V4(ip)) = message.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            }) else {
                continue;
            };
            if message.header.prefix_len == 32 && want.contains(&ip) {
                have.insert(ip);
            } else {
                self.handle.address().del(message).execute().await.with_context(|| format!("removing {ip}"))?;
                changed.push(format!("-{ip}"));
            }
        }
        for ip in want.difference(&have) {
            self.handle
                .address()
                .add(index, IpAddr::V4(*ip), 32)
                .execute()
                .await
                .with_context(|| format!("adding {ip}/32 to {interface}"))?;
            changed.push(format!("+{ip}/32"));
        }

        if !self.has_route(index, wanted).await? {
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(wanted.subnet.network(), wanted.subnet.prefix_len())
                .output_interface(index)
                .pref_source(wanted.node_ip)
                .scope(RouteScope::Link)
                .build();
            self.handle
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .with_context(|| format!("routing {} into {interface}", wanted.subnet))?;
            changed.push(format!("route {} src {}", wanted.subnet, wanted.node_ip));
        }

        if wanted.forwarding {
            // Only ever turned on: replies to pods and the DNAT to a pod-backed service need it
            // on a non-relay too, and the ruleset's forward chain is what keeps a node that is
            // not a relay from forwarding between peers.
            let path = format!("/proc/sys/net/ipv4/conf/{interface}/forwarding");
            let now = tokio::fs::read_to_string(&path).await.with_context(|| format!("reading {path}"))?;
            if now.trim() != "1" {
                // Not fatal: the rest of the node's data plane must still be programmed. A node
                // whose IPv4 forwarding is on (a Kubernetes node usually) needs no write.
                match tokio::fs::write(&path, "1").await {
                    Ok(()) => changed.push("forwarding on (relay)".to_owned()),
                    Err(err) => tracing::warn!(
                        "cannot turn on IPv4 forwarding on {interface} ({path}: {err}), so this node does not relay \
                         (spec.relay): turn on net.ipv4.ip_forward on the node, or run the agent privileged \
                         (chart: agent.privileged) so that /proc/sys is writable"
                    ),
                }
            }
        }
        Ok(changed)
    }

    /// The IPv4 routing table, read to its end (a dump stream dropped half-way makes
    /// netlink-proto warn, once per unread message, that it "failed to forward response back to
    /// the handle").
    async fn ipv4_routes(&self) -> anyhow::Result<Vec<RouteMessage>> {
        let routes = self.handle.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
        routes.try_collect().await.context("reading the IPv4 routing table")
    }

    async fn has_route(&self, index: u32, wanted: &Wanted) -> anyhow::Result<bool> {
        let routes = self.ipv4_routes().await?;
        for route in routes {
            if route.header.destination_prefix_length != wanted.subnet.prefix_len() {
                continue;
            }
            let attr = |f: fn(&RouteAttribute) -> Option<Ipv4Addr>| route.attributes.iter().find_map(f);
            let destination = attr(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
                _ => None,
            });
            if destination != Some(wanted.subnet.network()) {
                continue;
            }
            let source = attr(|a| match a {
                RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => Some(*ip),
                _ => None,
            });
            let oif =
                route.attributes.iter().find_map(|a| if let RouteAttribute::Oif(i) = a { Some(*i) } else { None });
            return Ok(oif == Some(index) && source == Some(wanted.node_ip));
        }
        Ok(false)
    }

    /// The name of the link that has the address `ip`, if any.
    pub async fn interface_with(&self, ip: Ipv4Addr) -> anyhow::Result<Option<String>> {
        let addresses: Vec<_> = self.handle.address().get().execute().try_collect().await?;
        let Some(index) = addresses.iter().find_map(|m| {
            m.attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Local(IpAddr::V4(local)) if *local == ip))
                .then_some(m.header.index)
        }) else {
            return Ok(None);
        };
        let links: Vec<_> = self.handle.link().get().match_index(index).execute().try_collect().await?;
        Ok(links.first().and_then(|l| {
            l.attributes.iter().find_map(|a| if let LinkAttribute::IfName(n) = a { Some(n.clone()) } else { None })
        }))
    }

    /// The node's underlay IPv4 address: the address of the link that carries the default
    /// route, else the first global address on any other link but `skip` and loopback, where a
    /// link that is not a bridge comes first: a container engine's bridge (`docker0`,
    /// `podman0`, `cni0`) is the node's gateway for its containers, not its address.
    pub async fn underlay_ipv4(&self, skip: &str) -> anyhow::Result<Option<Ipv4Addr>> {
        let mut default_link = None;
        for route in self.ipv4_routes().await? {
            if route.header.destination_prefix_length == 0 {
                default_link =
                    route.attributes.iter().find_map(|a| if let RouteAttribute::Oif(i) = a { Some(*i) } else { None });
                break;
            }
        }
        let skip_index = self.index(skip).await?;
        let mut bridges = BTreeSet::new();
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links.try_next().await? {
            let bridge = link.attributes.iter().any(|a| {
                matches!(a, LinkAttribute::LinkInfo(infos) if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge))))
            });
            if bridge {
                bridges.insert(link.header.index);
            }
        }
        let mut candidates = Vec::new();
        let mut addresses = self.handle.address().get().execute();
        while let Some(message) = addresses.try_next().await? {
            if message.header.scope != AddressScope::Universe || Some(message.header.index) == skip_index {
                continue;
            }
            if let Some(IpAddr::V4(ip)) = message.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            }) && !ip.is_loopback()
            {
                let index = message.header.index;
                candidates.push((Some(index) != default_link, bridges.contains(&index), ip));
            }
        }
        candidates.sort();
        Ok(candidates.first().map(|(_, _, ip)| *ip))
    }
}

/// ENODEV, which the kernel answers for an unknown link name.
const fn libc_enodev() -> i32 {
    19
}
