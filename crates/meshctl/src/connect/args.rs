//! The flags of `meshctl connect`, `forward` and `expose`, and the grammar of their operands
//! (`SERVICE[.NAMESPACE]`, `[LOCAL:]PORT`, `NAME[.NAMESPACE]`). Pure: no I/O.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::str::FromStr;

use clap::Args;

/// What every laptop-mode command shares: who this member is and how it joins.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Membership")]
pub struct MemberArgs {
    /// This member's MeshNode name, a DNS label [default: the host name and 4 random hex digits]
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// The endpoint other nodes send to: `auto` (the address this machine uses towards the mesh
    /// nodes), `none` (publish none: peers learn it from this process's packets, for a machine
    /// behind NAT), or HOST:PORT
    #[arg(long, value_name = "auto|none|HOST:PORT", default_value = "auto")]
    pub endpoint: EndpointChoice,

    /// The local UDP port WireGuard uses (0: any free port)
    #[arg(long, value_name = "PORT", default_value_t = 0)]
    pub listen_port: u16,

    /// Seconds between keepalives this process sends each peer (keeps NAT mappings open; 0: off)
    #[arg(long, value_name = "SECONDS", default_value_t = 25)]
    pub keepalive: u16,

    /// The mesh subnet: peers' allowed IPs outside it are not applied (as the agents do)
    #[arg(long, value_name = "CIDR", default_value = "10.42.0.0/16")]
    pub subnet: mesh_core::Subnet,

    /// Give up if the controller has not given this member a mesh IP after this long
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = crate::util::parse_duration)]
    pub join_timeout: std::time::Duration,

    /// Print a status line (peers reached, handshakes, bytes) this often; 0s: never
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_interval)]
    pub status_every: std::time::Duration,

    /// Also serve a SOCKS5 proxy here (e.g. 127.0.0.1:1080) that resolves *.mesh.local itself:
    /// `curl --socks5-hostname 127.0.0.1:1080 http://NAME.NAMESPACE.mesh.local:PORT`
    #[arg(long, value_name = "ADDR")]
    pub socks5: Option<SocketAddr>,

    /// The mesh's DNS zone, as the chart's mesh.zone (names under it are what --socks5 resolves
    /// and what forward and expose print), e.g. mesh.internal
    #[arg(long, env = "MESH_ZONE", value_name = "ZONE", default_value = mesh_dataplane::dns::ZONE, value_parser = mesh_dataplane::dns::check_zone)]
    pub zone: String,
}

/// `meshctl connect`.
#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    /// Membership.
    #[command(flatten)]
    pub member: MemberArgs,
}

/// `meshctl forward SERVICE[.NAMESPACE] [LOCAL:]PORT...`.
#[derive(Args, Debug, Clone)]
pub struct ForwardArgs {
    /// The MeshService, as NAME (namespace `default`) or NAME.NAMESPACE
    #[arg(value_name = "SERVICE[.NAMESPACE]")]
    pub service: QualifiedName,

    /// Ports to forward: PORT (the same port on 127.0.0.1) or LOCAL:PORT
    #[arg(value_name = "[LOCAL:]PORT", required = true)]
    pub ports: Vec<PortMap>,

    /// The local address to listen on
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    pub address: Ipv4Addr,

    /// Membership.
    #[command(flatten)]
    pub member: MemberArgs,
}

/// `meshctl expose LOCAL_PORT --as NAME[.NAMESPACE] [--port P]`.
#[derive(Args, Debug, Clone)]
pub struct ExposeArgs {
    /// The port on 127.0.0.1 that serves what is exposed
    #[arg(value_name = "LOCAL_PORT")]
    pub local_port: u16,

    /// The MeshService to publish, as NAME (namespace `default`) or NAME.NAMESPACE
    #[arg(long = "as", value_name = "NAME[.NAMESPACE]")]
    pub service: QualifiedName,

    /// The port of the service's mesh IP [default: LOCAL_PORT]
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,

    /// Membership.
    #[command(flatten)]
    pub member: MemberArgs,
}

/// The endpoint to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointChoice {
    /// The address the machine routes towards the mesh nodes from, with the bound port.
    Auto,
    /// None.
    None,
    /// This one.
    Fixed(String),
}

impl FromStr for EndpointChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(Self::Auto),
            "none" => Ok(Self::None),
            _ => mesh_core::Endpoint::parse(text)
                .map(|_| Self::Fixed(text.to_owned()))
                .map_err(|err| format!("{err}; or auto, or none")),
        }
    }
}

/// `NAME` or `NAME.NAMESPACE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QualifiedName {
    /// The object's name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
}

impl QualifiedName {
    /// `NAME.NAMESPACE.ZONE`: the name under another zone (`--zone`).
    pub fn dns_name_in(&self, zone: &str) -> String {
        format!("{}.{}.{zone}", self.name, self.namespace)
    }
}

impl std::fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A DNS label: 1..63 of `a-z0-9-`, starting and ending alphanumeric.
pub fn is_dns_label(text: &str) -> bool {
    let b = text.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

impl FromStr for QualifiedName {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (name, namespace) = text.split_once('.').unwrap_or((text, "default"));
        for (what, part) in [("name", name), ("namespace", namespace)] {
            if !is_dns_label(part) {
                return Err(format!(
                    "{text:?}: the {what} {part:?} is not a DNS label (lower-case letters, digits and '-', 1 to 63); \
                     write NAME or NAME.NAMESPACE"
                ));
            }
        }
        Ok(Self { name: name.to_owned(), namespace: namespace.to_owned() })
    }
}

/// `PORT` or `LOCAL:PORT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortMap {
    /// The port to listen on locally.
    pub local: u16,
    /// The service's port.
    pub remote: u16,
}

impl FromStr for PortMap {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let port = |p: &str| match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("{text:?}: {p:?} is not a port from 1 to 65535; write PORT or LOCAL:PORT")),
            Ok(port) => Ok(port),
        };
        match text.split_once(':') {
            Some((local, remote)) => Ok(Self { local: port(local)?, remote: port(remote)? }),
            None => port(text).map(|p| Self { local: p, remote: p }),
        }
    }
}

/// A duration such as `5s`, or `0`/`0s` for never.
fn parse_interval(text: &str) -> Result<std::time::Duration, String> {
    if matches!(text, "0" | "0s") { Ok(std::time::Duration::ZERO) } else { crate::util::parse_duration(text) }
}

/// The local listening address of a forwarded port.
pub fn listen_address(address: Ipv4Addr, map: PortMap) -> SocketAddrV4 {
    SocketAddrV4::new(address, map.local)
}

/// A default member name: the host name, made a DNS label, and 4 hex digits of `random`.
pub fn default_name(hostname: &str, random: u16) -> String {
    let mut label: String = hostname
        .split('.')
        .next()
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect();
    label.truncate(50);
    let label = label.trim_matches('-');
    let label = if label.is_empty() { "laptop" } else { label };
    format!("{label}-{random:04x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_qualified_name_defaults_to_the_default_namespace() {
        assert_eq!(
            "web".parse::<QualifiedName>(),
            Ok(QualifiedName { name: "web".into(), namespace: "default".into() })
        );
        let q: QualifiedName = "web.team-a".parse().expect("valid");
        assert_eq!((q.name.as_str(), q.namespace.as_str()), ("web", "team-a"));
        assert_eq!(q.dns_name_in(mesh_dataplane::dns::ZONE), "web.team-a.mesh.local");
        assert_eq!(q.dns_name_in("mesh.internal"), "web.team-a.mesh.internal");
    }

    #[test]
    fn a_malformed_qualified_name_names_the_part() {
        let err = "Web.x".parse::<QualifiedName>().expect_err("upper case");
        assert!(err.contains("the name \"Web\""), "{err}");
        let err = "web.a.b".parse::<QualifiedName>().expect_err("two dots");
        assert!(err.contains("namespace \"a.b\""), "{err}");
        assert!("".parse::<QualifiedName>().is_err());
        assert!("-web".parse::<QualifiedName>().is_err());
    }

    #[test]
    fn port_maps() {
        assert_eq!("8080".parse(), Ok(PortMap { local: 8080, remote: 8080 }));
        assert_eq!("9000:80".parse(), Ok(PortMap { local: 9000, remote: 80 }));
        for bad in ["0", "70000", "a:80", "80:", ":80", "1:2:3"] {
            let err = bad.parse::<PortMap>().expect_err(bad);
            assert!(err.contains("PORT or LOCAL:PORT"), "{bad}: {err}");
        }
    }

    #[test]
    fn status_every_takes_zero_for_never() {
        assert_eq!(parse_interval("0s"), Ok(std::time::Duration::ZERO));
        assert_eq!(parse_interval("2s"), Ok(std::time::Duration::from_secs(2)));
        assert!(parse_interval("-1s").is_err());
    }

    #[test]
    fn endpoint_choices() {
        assert_eq!("auto".parse(), Ok(EndpointChoice::Auto));
        assert_eq!("none".parse(), Ok(EndpointChoice::None));
        assert_eq!("192.0.2.1:51820".parse(), Ok(EndpointChoice::Fixed("192.0.2.1:51820".into())));
        assert!("192.0.2.1".parse::<EndpointChoice>().is_err(), "a port is required");
    }

    #[test]
    fn default_names_are_dns_labels() {
        assert_eq!(default_name("Alice's MacBook.local", 0xbeef), "alice-s-macbook-beef");
        assert_eq!(default_name("", 1), "laptop-0001");
        assert_eq!(default_name("---", 1), "laptop-0001");
        let long = default_name(&"x".repeat(100), 0xffff);
        assert!(is_dns_label(&long), "{long}");
    }
}
