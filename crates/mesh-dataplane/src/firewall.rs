//! The nftables ruleset of a node: on the IP of a service hosted here, only its listed TCP and
//! UDP ports are open (and ICMP echo, so that `ping` tells whether the address is up); any other
//! connection to that IP is refused at once (a TCP reset, else ICMP port unreachable), so a
//! client learns the port is closed instead of waiting for a timeout. The node's own mesh IP and
//! all other traffic are left alone.
//!
//! A service backed by a pod on the pod network is forwarded: its listed ports on the mesh IP
//! are DNATed to the pod's IP, both for traffic arriving through the tunnel (prerouting) and
//! for the node's own connections (output). Conntrack turns the replies back into the mesh
//! IP's, so peers see the mesh IP they connected to. Unlisted ports still reach the input
//! chain and are refused there.
//!
//! Traffic the node forwards into the mesh for others (its pods, containers) leaves the WireGuard
//! interface with the node's own mesh IP as source ([`Masquerade`]): a peer accepts from each
//! node only that node's addresses (WireGuard's allowed IPs), and pod addresses are none of them.
//! Conntrack maps the replies back to the pod. Only what comes from the node itself or from an
//! interface other than the underlay's is translated: a host on the underlay that routes through
//! the node is not let into the mesh under the node's name.
//!
//! The ruleset lives in its own table, `inet harness_mesh`, and [`render`] produces a script
//! that replaces the whole table in one `nft -f` transaction, so there is never a moment with
//! half a ruleset.

use std::fmt::Write as _;

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::desired::Hosted;

/// The nftables table the agent owns.
pub const TABLE: &str = "harness_mesh";

/// Source NAT of what the node forwards into the mesh: packets leaving `interface` from outside
/// `subnet` (a pod's address, say) that did not arrive on `underlay` leave from `node_ip`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Masquerade {
    /// The WireGuard interface.
    pub interface: String,
    /// The underlay interface (the one with the node's endpoint address): what arrives there is
    /// another host's traffic, never translated.
    pub underlay: String,
    /// The mesh subnet: sources inside it (the node's and its services' IPs) are left alone.
    pub subnet: Ipv4Net,
    /// The node's own mesh IP.
    pub node_ip: Ipv4Addr,
}

/// The `nft -f -` script that makes the table enforce `hosted`, and source-NAT forwarded traffic
/// as `masquerade` says (none: nothing forwarded enters the mesh with a foreign source).
pub fn render(hosted: &[Hosted], masquerade: Option<&Masquerade>) -> String {
    let mut out = String::new();
    // Create-then-delete makes the delete succeed whether or not the table existed.
    let _ = writeln!(out, "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{");
    out.push_str("  chain service_ports {\n    type filter hook input priority filter; policy accept;\n");
    if !hosted.is_empty() {
        // Replies and ICMP errors (path MTU) of connections already let through are never refused.
        out.push_str("    ct state established,related accept\n");
    }
    for service in hosted {
        let ip = service.ip;
        let _ = writeln!(out, "    # {}", service.service.replace('\n', " "));
        if !service.ports.is_empty() {
            let ports: Vec<String> = service.ports.iter().map(u16::to_string).collect();
            let ports = ports.join(", ");
            let _ = writeln!(out, "    ip daddr {ip} tcp dport {{ {ports} }} accept");
            let _ = writeln!(out, "    ip daddr {ip} udp dport {{ {ports} }} accept");
        }
        let _ = writeln!(out, "    ip daddr {ip} icmp type echo-request accept");
        let _ = writeln!(out, "    ip daddr {ip} meta l4proto tcp reject with tcp reset");
        let _ = writeln!(out, "    ip daddr {ip} reject");
    }
    out.push_str("  }\n");
    if let Some(m) = masquerade {
        // Interface names are plain (the kernel allows no quote in them); keep it that way here.
        let plain = |name: &str| -> String { name.chars().filter(|c| c.is_ascii_graphic() && *c != '"').collect() };
        let _ = writeln!(
            out,
            "  chain snat_to_mesh_ip {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
             oifname \"{}\" iifname != \"{}\" ip saddr != {} snat ip to {}\n  }}",
            plain(&m.interface),
            plain(&m.underlay),
            m.subnet,
            m.node_ip
        );
    }
    let forwarded: Vec<&Hosted> = hosted.iter().filter(|h| h.forward_to.is_some() && !h.ports.is_empty()).collect();
    if !forwarded.is_empty() {
        // nft names priority -100 `dstnat` in prerouting only; output takes the number.
        for (chain, hook, priority) in
            [("forward_to_pods", "prerouting", "dstnat"), ("forward_to_pods_local", "output", "-100")]
        {
            let _ = writeln!(out, "  chain {chain} {{\n    type nat hook {hook} priority {priority}; policy accept;");
            for service in &forwarded {
                let (ip, pod) = (service.ip, service.forward_to.unwrap_or(service.ip));
                let ports: Vec<String> = service.ports.iter().map(u16::to_string).collect();
                let ports = ports.join(", ");
                let _ = writeln!(out, "    # {}", service.service.replace('\n', " "));
                let _ = writeln!(out, "    ip daddr {ip} tcp dport {{ {ports} }} dnat ip to {pod}");
                let _ = writeln!(out, "    ip daddr {ip} udp dport {{ {ports} }} dnat ip to {pod}");
            }
            out.push_str("  }\n");
        }
    }
    out.push_str("}\n");
    out
}

/// The script that removes the table (`mesh-agent cleanup`, or the agent leaving an uninstalled
/// node).
pub fn render_removal() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn only_listed_ports_are_open_on_a_service_ip() {
        let hosted = [Hosted {
            ip: "10.42.7.7".parse().unwrap(),
            ports: BTreeSet::from([8020, 8000]),
            service: "default/graph-node".into(),
            forward_to: None,
        }];
        assert_eq!(
            render(&hosted, None),
            "table inet harness_mesh\ndelete table inet harness_mesh\ntable inet harness_mesh {\n  chain service_ports {\n    type filter hook input priority filter; policy accept;\n    ct state established,related accept\n    # default/graph-node\n    ip daddr 10.42.7.7 tcp dport { 8000, 8020 } accept\n    ip daddr 10.42.7.7 udp dport { 8000, 8020 } accept\n    ip daddr 10.42.7.7 icmp type echo-request accept\n    ip daddr 10.42.7.7 meta l4proto tcp reject with tcp reset\n    ip daddr 10.42.7.7 reject\n  }\n}\n"
        );
    }

    #[test]
    fn nothing_hosted_gives_an_empty_chain() {
        let script = render(&[], None);
        assert!(script.contains("policy accept;\n  }\n}"));
        assert!(!script.contains("reject"));
    }

    #[test]
    fn a_service_name_cannot_break_out_of_its_comment() {
        let hosted = [Hosted {
            ip: "10.42.7.7".parse().unwrap(),
            ports: BTreeSet::new(),
            service: "a\nflush ruleset".into(),
            forward_to: None,
        }];
        let script = render(&hosted, None);
        assert!(!script.lines().any(|l| l.trim_start().starts_with("flush")));
        assert!(script.contains("ip daddr 10.42.7.7 reject"));
    }

    #[test]
    fn a_pod_backed_service_has_its_listed_ports_forwarded_to_the_pod() {
        let hosted = [Hosted {
            ip: "10.42.7.7".parse().unwrap(),
            ports: BTreeSet::from([8080]),
            service: "default/web".into(),
            forward_to: Some("10.244.1.2".parse().unwrap()),
        }];
        let script = render(&hosted, None);
        let rule = "ip daddr 10.42.7.7 tcp dport { 8080 } dnat ip to 10.244.1.2";
        assert_eq!(script.matches(rule).count(), 2, "prerouting and output:\n{script}");
        assert!(script.contains("type nat hook prerouting priority dstnat;"));
        assert!(script.contains("type nat hook output priority -100;"));
        // Everything else sent to the mesh IP is still refused.
        assert!(script.contains("ip daddr 10.42.7.7 reject"));
    }

    #[test]
    fn no_nat_chain_without_a_pod_backed_service() {
        let hosted = [Hosted {
            ip: "10.42.7.7".parse().unwrap(),
            ports: BTreeSet::from([8080]),
            service: "default/web".into(),
            forward_to: None,
        }];
        assert!(!render(&hosted, None).contains("nat"));
    }

    #[test]
    fn forwarded_traffic_enters_the_mesh_from_the_node_mesh_ip() {
        let masquerade = Masquerade {
            interface: "wg-harness".into(),
            underlay: "eth0".into(),
            subnet: "10.42.0.0/16".parse().unwrap(),
            node_ip: "10.42.0.3".parse().unwrap(),
        };
        let script = render(&[], Some(&masquerade));
        assert!(script.contains("type nat hook postrouting priority srcnat;"), "{script}");
        let rule = "oifname \"wg-harness\" iifname != \"eth0\" ip saddr != 10.42.0.0/16 snat ip to 10.42.0.3";
        assert!(script.contains(rule), "{script}");
        // Without it, no source NAT at all.
        assert!(!render(&[], None).contains("snat"));
        // A name with a quote cannot end the string early.
        let odd = Masquerade { interface: "wg\"x".into(), ..masquerade };
        assert!(render(&[], Some(&odd)).contains("oifname \"wgx\" iifname != \"eth0\""));
    }
}
