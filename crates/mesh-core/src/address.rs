//! Mesh IPs and WireGuard endpoints as the API spells them.
//!
//! A mesh IP is a *plain* dotted-quad IPv4 address: no prefix length, no leading zeros, no
//! IPv6. An endpoint is `host:port` where host is an IPv4 address, a bracketed IPv6 address or
//! a DNS name, and port is 1..=65535. These are the same rules the CRD's CEL validations apply
//! on the API server (see the `mesh-api` crate); keeping a Rust copy lets the agent and
//! `meshctl` give the same answer offline.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Parses a mesh IP the way the API accepts it: a plain dotted-quad IPv4 address.
///
/// Rust's [`Ipv4Addr`] parser already refuses leading zeros, prefixes and IPv6, which is the
/// grammar the API documents.
pub fn parse_mesh_ip(text: &str) -> Result<Ipv4Addr, ParseEndpointError> {
    text.parse::<Ipv4Addr>().map_err(|_| ParseEndpointError::NotPlainIpv4(text.to_owned()))
}

/// The host part of an [`Endpoint`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EndpointHost {
    /// A literal IPv4 address.
    Ipv4(Ipv4Addr),
    /// A literal IPv6 address (written in brackets in the endpoint).
    Ipv6(Ipv6Addr),
    /// A DNS name, resolved by the agent when it programs the peer.
    Name(String),
}

/// A WireGuard endpoint: where a peer's UDP packets are sent.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The address or name of the peer.
    pub host: EndpointHost,
    /// The peer's UDP listen port, 1..=65535.
    pub port: u16,
}

/// Why a mesh IP or endpoint was refused. The message says what was wrong and what is expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseEndpointError {
    /// The text is not a plain dotted-quad IPv4 address.
    #[error("{0:?} is not a plain IPv4 address (expected e.g. 10.42.7.7: no prefix, no leading zeros, no IPv6)")]
    NotPlainIpv4(String),
    /// There is no `:port` suffix, or no host before it.
    #[error("{0:?} is not host:port (expected e.g. 203.0.113.10:51820, [2001:db8::1]:51820 or wg.example.com:51820)")]
    NotHostPort(String),
    /// The port is not a number in 1..=65535.
    #[error("the port of {0:?} must be a number in 1..65535")]
    BadPort(String),
    /// The host is neither an IP address nor a valid DNS name.
    #[error("the host of {0:?} is neither an IPv4 address, a bracketed IPv6 address nor a DNS name")]
    BadHost(String),
}

/// Longest endpoint the API accepts: a 253-character DNS name, `:` and a 5-digit port.
pub const MAX_ENDPOINT_LEN: usize = 253 + 1 + 5;

impl Endpoint {
    /// Parses `host:port` with the same grammar as the API's CEL rules.
    pub fn parse(text: &str) -> Result<Self, ParseEndpointError> {
        let not_host_port = || ParseEndpointError::NotHostPort(text.to_owned());
        if text.len() > MAX_ENDPOINT_LEN {
            return Err(not_host_port());
        }
        let (host, port) = text.rsplit_once(':').ok_or_else(not_host_port)?;
        if host.is_empty() || port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(not_host_port());
        }
        let port = match port.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(ParseEndpointError::BadPort(text.to_owned())),
        };
        let host = if let Some(inner) = host.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or_else(not_host_port)?;
            EndpointHost::Ipv6(inner.parse().map_err(|_| ParseEndpointError::BadHost(text.to_owned()))?)
        } else if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            EndpointHost::Ipv4(host.parse().map_err(|_| ParseEndpointError::BadHost(text.to_owned()))?)
        } else if is_dns_name(host) {
            EndpointHost::Name(host.to_owned())
        } else {
            return Err(if host.contains(':') {
                not_host_port()
            } else {
                ParseEndpointError::BadHost(text.to_owned())
            });
        };
        Ok(Self { host, port })
    }
}

/// A DNS name as the endpoint grammar allows it: letters, digits, `-` and `.`, starting and
/// ending with a letter or digit, at most 253 characters.
fn is_dns_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 253
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'.')
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            EndpointHost::Ipv4(ip) => write!(f, "{ip}:{}", self.port),
            EndpointHost::Ipv6(ip) => write!(f, "[{ip}]:{}", self.port),
            EndpointHost::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

impl std::str::FromStr for Endpoint {
    type Err = ParseEndpointError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_documented_endpoint_forms() {
        let cases = [
            ("203.0.113.10:51820", EndpointHost::Ipv4(Ipv4Addr::new(203, 0, 113, 10)), 51820),
            ("[2001:db8::1]:51820", EndpointHost::Ipv6("2001:db8::1".parse().unwrap()), 51820),
            ("wg.example.com:1", EndpointHost::Name("wg.example.com".into()), 1),
            ("node-1:65535", EndpointHost::Name("node-1".into()), 65535),
        ];
        for (text, host, port) in cases {
            assert_eq!(Endpoint::parse(text), Ok(Endpoint { host, port }), "{text}");
        }
    }

    #[test]
    fn refuses_malformed_endpoints_with_the_right_reason() {
        use ParseEndpointError as E;
        type Reason = fn(String) -> E;
        let cases: [(&str, Reason); 10] = [
            ("203.0.113.10", E::NotHostPort),
            (":51820", E::NotHostPort),
            ("host:", E::NotHostPort),
            ("host:port", E::NotHostPort),
            ("2001:db8::1:51820", E::NotHostPort),
            ("host:0", E::BadPort),
            ("host:65536", E::BadPort),
            ("300.1.1.1:51820", E::BadHost),
            ("[not-v6]:51820", E::BadHost),
            ("-bad-.example:51820", E::BadHost),
        ];
        for (text, reason) in cases {
            assert_eq!(Endpoint::parse(text), Err(reason(text.to_owned())), "{text}");
        }
    }

    #[test]
    fn mesh_ip_must_be_plain_ipv4() {
        assert_eq!(parse_mesh_ip("10.42.7.7"), Ok(Ipv4Addr::new(10, 42, 7, 7)));
        for bad in ["10.42.7.7/32", "010.42.7.7", "10.42.7", "::1", "10.42.7.256", " 10.42.7.7", ""] {
            assert!(parse_mesh_ip(bad).is_err(), "{bad:?} must be refused");
        }
    }

    proptest! {
        #[test]
        fn display_round_trips(a: [u8; 4], v6: [u16; 8], port in 1u16.., name in "[a-z0-9]([a-z0-9.-]{0,40}[a-z0-9])?") {
            prop_assume!(!name.bytes().all(|b| b.is_ascii_digit() || b == b'.'));
            for host in [
                EndpointHost::Ipv4(Ipv4Addr::from(a)),
                EndpointHost::Ipv6(Ipv6Addr::from(v6)),
                EndpointHost::Name(name.clone()),
            ] {
                let endpoint = Endpoint { host, port };
                prop_assert_eq!(Endpoint::parse(&endpoint.to_string()), Ok(endpoint));
            }
        }

        #[test]
        fn never_panics_and_accepted_text_round_trips(text in ".{0,300}") {
            if let Ok(endpoint) = Endpoint::parse(&text) {
                prop_assert_eq!(Endpoint::parse(&endpoint.to_string()), Ok(endpoint));
            }
        }
    }
}
