//! What the controller judges about a MeshNode before it publishes its peer entry, as plain
//! functions of what the API says (no client, no cache), so that each rule is unit-tested:
//!
//! - [`key_holder`]: of several MeshNodes that publish one public key, which keeps its peer
//!   entry (a copied key must not cut its owner out);
//! - [`judge_endpoint`]: whether the endpoint an agent reports may go into its peer entry (it
//!   must parse, and for a mirrored Kubernetes Node its host must be one of the Node's
//!   addresses);
//! - [`overlapping_pod_cidrs`]: a Node's pod CIDRs that overlap the mesh subnet;
//! - [`overlapping_cluster_cidrs`]: the same for the configured `--cluster-cidrs`, which stops
//!   the controller at start.

use std::net::IpAddr;

use k8s_openapi::jiff::Timestamp;
use mesh_core::{Endpoint, EndpointHost, Subnet};

/// A MeshNode that publishes a public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimant {
    /// The MeshNode's name.
    pub name: String,
    /// When it was created.
    pub created: Option<Timestamp>,
    /// Whether its published peer entry already carries this key.
    pub holds_entry: bool,
}

/// The claimant that keeps a key shared by several MeshNodes: the one whose peer entry already
/// carries it (the first claimant, as the API records it, so the answer survives a controller
/// restart), else the oldest (creation time, then name). A copier publishes the key after its
/// owner had its entry, so the owner keeps it; the copier gets none.
pub fn key_holder(claimants: &[Claimant]) -> Option<&Claimant> {
    claimants.iter().min_by(|a, b| {
        (!a.holds_entry, a.created.is_none(), a.created, &a.name).cmp(&(
            !b.holds_entry,
            b.created.is_none(),
            b.created,
            &b.name,
        ))
    })
}

/// Why a reported endpoint does not go into the peer entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The reason, for the condition and the event.
    pub reason: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

/// The reason of an endpoint that does not parse.
pub const INVALID_ENDPOINT: &str = "InvalidEndpoint";
/// The reason of a mirrored node's endpoint whose host is none of its Node's addresses.
pub const NOT_A_NODE_ADDRESS: &str = "EndpointNotANodeAddress";

/// Whether the endpoint an agent reported (`status.endpoint`) may go into its node's peer
/// entry. `node_addresses` is `Some` (the Kubernetes Node's `status.addresses`) for a MeshNode
/// mirrored from a Node: its host must then be one of them. An admin's `spec.endpoint` is not
/// judged here: it overrides whatever the agent says.
pub fn judge_endpoint(reported: &str, node_addresses: Option<&[String]>) -> Result<String, Refusal> {
    // The parser's own message quotes the whole text: this one quotes at most 64 characters.
    let endpoint = Endpoint::parse(reported).map_err(|_| Refusal {
        reason: INVALID_ENDPOINT,
        message: format!(
            "the agent reported the endpoint {}, which is not host:port (an IPv4 address, a bracketed IPv6 address \
             or a DNS name, and a port 1-65535, e.g. 192.0.2.10:51820); peers are not sent there",
            shorten(reported)
        ),
    })?;
    let Some(addresses) = node_addresses else { return Ok(endpoint.to_string()) };
    let matches = |address: &String| match (&endpoint.host, address.parse::<IpAddr>()) {
        (EndpointHost::Ipv4(ip), Ok(IpAddr::V4(a))) => *ip == a,
        (EndpointHost::Ipv6(ip), Ok(IpAddr::V6(a))) => *ip == a,
        (EndpointHost::Name(name), Err(_)) => name.eq_ignore_ascii_case(address),
        _ => false,
    };
    if addresses.iter().any(matches) {
        Ok(endpoint.to_string())
    } else {
        Err(Refusal {
            reason: NOT_A_NODE_ADDRESS,
            message: format!(
                "the agent reported the endpoint {endpoint}, whose host is none of the Kubernetes Node's addresses \
                 [{}]; peers are not sent there. If the node is reached at another address (NAT, a load balancer), \
                 set spec.endpoint on the MeshNode",
                addresses.join(", ")
            ),
        })
    }
}

/// At most 64 characters of an agent-written string, for messages.
fn shorten(text: &str) -> String {
    let short: String = text.chars().take(64).collect();
    if short.len() < text.len() { format!("{short:?}…") } else { format!("{short:?}") }
}

/// The CIDRs among `cidrs` (a Node's `spec.podCIDRs`, as written) that overlap `subnet`, each
/// read with the mesh's one subnet grammar ([`Subnet::parse`]); IPv6 ones are skipped (the mesh
/// subnet is IPv4), and so are those it refuses (garbage, or host bits set, which Kubernetes'
/// node IPAM never hands out).
pub fn overlapping_pod_cidrs<'a>(subnet: &Subnet, cidrs: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let mut out: Vec<String> =
        cidrs.into_iter().filter(|cidr| Subnet::parse(cidr).is_ok_and(|c| c.overlaps(subnet))).cloned().collect();
    out.dedup();
    out
}

/// Fails, naming them, when configured cluster CIDRs overlap the mesh subnet.
pub fn overlapping_cluster_cidrs(subnet: &Subnet, cidrs: &[Subnet]) -> anyhow::Result<()> {
    let overlapping: Vec<String> = cidrs.iter().filter(|c| c.overlaps(subnet)).map(ToString::to_string).collect();
    anyhow::ensure!(
        overlapping.is_empty(),
        "the mesh subnet {subnet} overlaps the cluster CIDR(s) {} (--cluster-cidrs): mesh routes would shadow pod or \
         service traffic on every node. Set --subnet (the chart's meshSubnet) to a range the cluster does not use",
        overlapping.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claimant(name: &str, created: i64, holds_entry: bool) -> Claimant {
        Claimant { name: name.into(), created: Some(Timestamp::from_second(created).unwrap()), holds_entry }
    }

    #[test]
    fn the_node_already_holding_the_entry_keeps_the_key_even_if_younger() {
        let claimants = [claimant("old-copier", 100, false), claimant("victim", 200, true)];
        assert_eq!(key_holder(&claimants).map(|c| c.name.as_str()), Some("victim"));
    }

    #[test]
    fn without_an_entry_the_oldest_then_the_first_name_keeps_the_key() {
        let claimants = [claimant("b", 200, false), claimant("a", 300, false), claimant("c", 200, false)];
        assert_eq!(key_holder(&claimants).map(|c| c.name.as_str()), Some("b"));
        // Two entries (written before this rule existed): the oldest of them.
        let claimants = [claimant("x", 300, true), claimant("y", 100, true), claimant("z", 50, false)];
        assert_eq!(key_holder(&claimants).map(|c| c.name.as_str()), Some("y"));
        let unknown = Claimant { name: "u".into(), created: None, holds_entry: false };
        assert_eq!(key_holder(&[unknown, claimant("k", 900, false)]).map(|c| c.name.as_str()), Some("k"));
        assert_eq!(key_holder(&[]), None);
    }

    #[test]
    fn endpoints_must_parse_and_mirrored_ones_must_be_a_node_address() {
        let addresses = ["192.168.77.5".to_owned(), "fd00::5".to_owned(), "node-5.example".to_owned()];
        assert_eq!(judge_endpoint("192.168.77.5:51820", Some(&addresses)), Ok("192.168.77.5:51820".into()));
        assert_eq!(judge_endpoint("[fd00::5]:51820", Some(&addresses)), Ok("[fd00::5]:51820".into()));
        assert_eq!(judge_endpoint("NODE-5.example:51820", Some(&addresses)), Ok("NODE-5.example:51820".into()));
        let refused = judge_endpoint("192.168.77.3:53", Some(&addresses)).unwrap_err();
        assert_eq!(refused.reason, NOT_A_NODE_ADDRESS);
        assert!(refused.message.contains("192.168.77.5, fd00::5") && refused.message.contains("spec.endpoint"));
        // Not mirrored (an enrolled machine): any well-formed endpoint.
        assert_eq!(judge_endpoint("203.0.113.1:51820", None), Ok("203.0.113.1:51820".into()));
        for bad in ["no-port", "1.2.3.4:0", "1.2.3.4:70000", "a b:1", &"x".repeat(300)] {
            assert_eq!(judge_endpoint(bad, None).unwrap_err().reason, INVALID_ENDPOINT, "{bad}");
        }
        assert!(judge_endpoint(&format!("{}:1", "x".repeat(300)), None).unwrap_err().message.len() < 400);
    }

    #[test]
    fn pod_cidrs_overlapping_the_mesh_subnet_are_found() {
        let subnet: Subnet = "10.42.0.0/16".parse().unwrap();
        let cidrs =
            ["10.244.1.0/24", "10.42.3.0/24", "fd00::/64", "10.0.0.0/8", "junk", "10.42.0.0/15"].map(String::from);
        assert_eq!(overlapping_pod_cidrs(&subnet, &cidrs), ["10.42.3.0/24", "10.0.0.0/8", "10.42.0.0/15"]);
        assert!(overlapping_pod_cidrs(&subnet, &["10.43.0.0/24".to_owned()]).is_empty());
    }

    #[test]
    fn an_overlapping_cluster_cidr_stops_the_start_with_its_name() {
        let subnet: Subnet = "10.42.0.0/16".parse().unwrap();
        assert!(overlapping_cluster_cidrs(&subnet, &["10.96.0.0/12".parse().unwrap()]).is_ok());
        let err =
            overlapping_cluster_cidrs(&subnet, &["10.96.0.0/12".parse().unwrap(), "10.42.0.0/16".parse().unwrap()])
                .unwrap_err()
                .to_string();
        assert!(err.contains("10.42.0.0/16 (--cluster-cidrs)") && err.contains("--subnet"), "{err}");
    }
}
