//! The nftables ruleset of a node. A node is a mesh member, not a router: what arrives through
//! the tunnel reaches the node's own mesh IP (the agent's ports and the ports the operator
//! exposes) and the services the node hosts (their listed ports, a pod-backed one's DNAT to its
//! pod included), and nothing else — no other address of the node, no forwarding to pods,
//! ClusterIPs, NodePorts or other hosts. And mesh addresses belong to the tunnel: no other
//! interface may bring in a mesh source or reach a mesh destination.
//!
//! The rules, by hook ([`render`]; the table is `inet harness_mesh`):
//!
//! - **prerouting, priority raw** (chain `guard`, before conntrack and any DNAT, kube-proxy's
//!   included): a packet with a source in the mesh subnet is dropped unless it arrives on the
//!   WireGuard interface or `lo` (spoofing from the underlay; this does not rely on `rp_filter`,
//!   which is often loose or off). A packet to a mesh destination is dropped when it arrives on
//!   the underlay interface; when the node does not forward its pods into the mesh
//!   ([`Masquerade`] off), on any interface but the WireGuard one and `lo`. So an underlay
//!   neighbour reaches neither mesh-only ports nor the pods behind a service's DNAT.
//! - **input, priority filter** (chain `service_ports`): replies (`established,related`) pass. On
//!   the IP of a service hosted here only its listed TCP and UDP ports are open, and ICMP echo
//!   (so that `ping` tells whether the address is up); any other connection to it is refused at
//!   once (a TCP reset, else ICMP port unreachable), so a client learns the port is closed
//!   instead of waiting for a timeout — the node's own connections (`lo`) included. On the
//!   node's own mesh IP the node itself (`lo`) may use every port; others get ICMP echo, the
//!   agent's ports ([`Member::agent_udp`], [`Member::agent_tcp`]: the probe echo and DNS) and the
//!   ports the operator exposes ([`Member::exposed`], `--expose-ports`), and a refusal for
//!   anything else. Whatever else arrives from the tunnel (the node's underlay or pod-network
//!   addresses, say) is dropped.
//! - **forward, priority filter** (chain `forward`): from the tunnel, only replies and the
//!   connections DNATed to a hosted service's pod, checked on their original destination (the
//!   service IP and one of its listed ports: kube-proxy's DNAT of a NodePort on a service IP
//!   does not count); on a relay ([`Member::relay`]), also mesh traffic from one peer to another,
//!   back out of the tunnel. Everything else from the tunnel is dropped.
//!
//! Pods on the node are clients of the mesh: what they send to mesh IPs arrives on pod
//! interfaces and is forwarded into the tunnel with the node's mesh IP as source
//! ([`Masquerade`]), and what they send to the node's own or its services' mesh IPs meets the
//! same port rules as a peer. Pod interfaces cannot be named in general (bridges, veths, CNI
//! specific), so with source NAT on every interface but the underlay counts as a pod interface;
//! without it, only the tunnel and `lo` may touch mesh addresses. A node with further host
//! interfaces that carry untrusted traffic should run without `--masquerade` (or filter them).
//!
//! A service backed by a pod on the pod network is forwarded: its listed ports on the mesh IP
//! are DNATed to the pod's IP, both for traffic arriving through the tunnel (prerouting) and
//! for the node's own connections (output). Conntrack turns the replies back into the mesh
//! IP's, so peers see the mesh IP they connected to. Unlisted ports still reach the input
//! chain and are refused there.
//!
//! A mapped port (`spec.network.targetPorts`, [`Hosted::target_ports`]) is DNATed to its target
//! port: of the pod, or of the same mesh IP for a process on the node. The input chain accepts
//! such a connection by the port it was made to (`ct original proto-dst`), so the target port
//! itself stays closed on the mesh IP unless it is listed too.
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

use std::collections::BTreeSet;
use std::fmt::Write as _;

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::desired::Hosted;

/// The nftables table the agent owns.
pub const TABLE: &str = "harness_mesh";

/// The node as a mesh member: its tunnel, its mesh IP and what it offers there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The WireGuard interface: the one way in for mesh sources, and what is filtered as "from
    /// the tunnel".
    pub interface: String,
    /// The mesh subnet.
    pub subnet: Ipv4Net,
    /// The node's own mesh IP.
    pub node_ip: Ipv4Addr,
    /// The agent's UDP ports peers need on the node's mesh IP (the probe echo, DNS).
    pub agent_udp: BTreeSet<u16>,
    /// The agent's TCP ports peers need on the node's mesh IP (DNS).
    pub agent_tcp: BTreeSet<u16>,
    /// Further ports open (TCP and UDP) on the node's mesh IP, as the operator configured.
    pub exposed: BTreeSet<u16>,
    /// The node is a relay (`spec.relay`): it forwards mesh traffic from one peer to another,
    /// in and out of the WireGuard interface, and nothing else.
    pub relay: bool,
}

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

/// Interface names are plain (the kernel allows no quote in them); keep it that way here.
fn plain(name: &str) -> String {
    name.chars().filter(|c| c.is_ascii_graphic() && *c != '"').collect()
}

fn port_list<'a>(ports: impl IntoIterator<Item = &'a u16>) -> String {
    ports.into_iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
}

/// The `nft -f -` script that makes the table enforce `hosted` and, given the node as a
/// [`Member`], keep the node from being a router (see the module docs); and source-NAT forwarded
/// traffic as `masquerade` says (none: nothing forwarded enters the mesh with a foreign source).
/// Without a member (the node has no mesh IP yet) only the service IPs are filtered.
pub fn render(hosted: &[Hosted], member: Option<&Member>, masquerade: Option<&Masquerade>) -> String {
    let mut out = String::new();
    // Create-then-delete makes the delete succeed whether or not the table existed.
    let _ = writeln!(out, "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{");
    // Where hosted services forward to (pods, containers), when nothing forwarded is translated.
    let targets: BTreeSet<Ipv4Addr> =
        if masquerade.is_none() { hosted.iter().filter_map(|h| h.forward_to).collect() } else { BTreeSet::new() };
    let targets = targets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    if let Some(m) = member {
        let (wg, subnet) = (plain(&m.interface), m.subnet);
        let _ = writeln!(
            out,
            "  chain guard {{\n    type filter hook prerouting priority raw; policy accept;\n    \
             iifname != {{ \"{wg}\", \"lo\" }} ip saddr {subnet} drop"
        );
        match masquerade {
            Some(masq) => {
                let _ = writeln!(out, "    iifname \"{}\" ip daddr {subnet} drop", plain(&masq.underlay));
            }
            None => {
                if !targets.is_empty() {
                    // Replies of the pods and containers a hosted service forwards to: judged by
                    // conntrack in the forward chain, where anything but a reply is dropped.
                    let _ = writeln!(
                        out,
                        "    iifname != {{ \"{wg}\", \"lo\" }} ip saddr {{ {targets} }} ip daddr {subnet} accept"
                    );
                }
                let _ = writeln!(out, "    iifname != {{ \"{wg}\", \"lo\" }} ip daddr {subnet} drop");
            }
        }
        out.push_str("  }\n");
    }
    out.push_str("  chain service_ports {\n    type filter hook input priority filter; policy accept;\n");
    if !hosted.is_empty() || member.is_some() {
        // Replies and ICMP errors (path MTU) of connections already let through are never refused.
        out.push_str("    ct state established,related accept\n");
    }
    for service in hosted {
        let ip = service.ip;
        let _ = writeln!(out, "    # {}", service.service.replace('\n', " "));
        if service.forward_to.is_none() && !service.target_ports.is_empty() {
            // Mapped to another port of this IP (the node's process): judged by the port asked
            // for, so the target port itself stays closed unless it is listed too.
            let _ = writeln!(
                out,
                "    ip daddr {ip} ct status dnat meta l4proto {{ tcp, udp }} ct original proto-dst {{ {} }} accept",
                port_list(service.target_ports.keys())
            );
        }
        if !service.ports.is_empty() {
            let ports = port_list(&service.ports);
            let _ = writeln!(out, "    ip daddr {ip} tcp dport {{ {ports} }} accept");
            let _ = writeln!(out, "    ip daddr {ip} udp dport {{ {ports} }} accept");
        }
        let _ = writeln!(out, "    ip daddr {ip} icmp type echo-request accept");
        let _ = writeln!(out, "    ip daddr {ip} meta l4proto tcp reject with tcp reset");
        let _ = writeln!(out, "    ip daddr {ip} reject");
    }
    if let Some(m) = member {
        let ip = m.node_ip;
        let _ = writeln!(
            out,
            "    # this node\n    iifname \"lo\" accept\n    ip daddr {ip} icmp type echo-request accept"
        );
        let udp: BTreeSet<u16> = m.agent_udp.union(&m.exposed).copied().collect();
        let tcp: BTreeSet<u16> = m.agent_tcp.union(&m.exposed).copied().collect();
        for (proto, ports) in [("udp", udp), ("tcp", tcp)] {
            if !ports.is_empty() {
                let _ = writeln!(out, "    ip daddr {ip} {proto} dport {{ {} }} accept", port_list(&ports));
            }
        }
        let _ = writeln!(out, "    ip daddr {ip} meta l4proto tcp reject with tcp reset");
        let _ = writeln!(out, "    ip daddr {ip} reject");
        let _ = writeln!(out, "    # nothing else of this node is reachable through the tunnel");
        let _ = writeln!(out, "    iifname \"{}\" drop", plain(&m.interface));
    }
    out.push_str("  }\n");
    let forwarded: Vec<&Hosted> = hosted.iter().filter(|h| h.forward_to.is_some() && !h.ports.is_empty()).collect();
    if let Some(m) = member {
        let wg = plain(&m.interface);
        let _ = writeln!(
            out,
            "  chain forward {{\n    type filter hook forward priority filter; policy accept;\n    \
             iifname \"{wg}\" ct state established,related accept"
        );
        for service in &forwarded {
            let _ = writeln!(out, "    # {}", service.service.replace('\n', " "));
            let _ = writeln!(
                out,
                "    iifname \"{wg}\" ct status dnat ct original ip daddr {} meta l4proto {{ tcp, udp }} ct original \
                 proto-dst {{ {} }} accept",
                service.ip,
                port_list(&service.ports)
            );
        }
        if !targets.is_empty() {
            // Without source NAT only their replies go back into the tunnel (see the guard).
            let _ = writeln!(
                out,
                "    # replies of forwarded services\n    oifname \"{wg}\" ip saddr {{ {targets} }} ct state \
                 established,related accept\n    oifname \"{wg}\" ip saddr {{ {targets} }} drop"
            );
        }
        if m.relay {
            let subnet = m.subnet;
            let _ = writeln!(
                out,
                "    # a relay carries mesh traffic between its peers (spec.relay)\n    \
                 iifname \"{wg}\" oifname \"{wg}\" ip saddr {subnet} ip daddr {subnet} accept"
            );
        }
        let _ = writeln!(out, "    # a node is not a router\n    iifname \"{wg}\" drop\n  }}");
    }
    if let Some(m) = masquerade {
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
    let translated: Vec<&Hosted> = hosted
        .iter()
        .filter(|h| !h.ports.is_empty() && (h.forward_to.is_some() || !h.target_ports.is_empty()))
        .collect();
    if !translated.is_empty() {
        // nft names priority -100 `dstnat` in prerouting only; output takes the number.
        for (chain, hook, priority) in
            [("forward_to_pods", "prerouting", "dstnat"), ("forward_to_pods_local", "output", "-100")]
        {
            let _ = writeln!(out, "  chain {chain} {{\n    type nat hook {hook} priority {priority}; policy accept;");
            for service in &translated {
                let (ip, backend) = (service.ip, service.forward_to.unwrap_or(service.ip));
                let _ = writeln!(out, "    # {}", service.service.replace('\n', " "));
                for (port, target) in &service.target_ports {
                    for proto in ["tcp", "udp"] {
                        let _ = writeln!(out, "    ip daddr {ip} {proto} dport {port} dnat ip to {backend}:{target}");
                    }
                }
                let same: Vec<&u16> = service.ports.iter().filter(|p| !service.target_ports.contains_key(p)).collect();
                if service.forward_to.is_some() && !same.is_empty() {
                    let ports = port_list(same);
                    let _ = writeln!(out, "    ip daddr {ip} tcp dport {{ {ports} }} dnat ip to {backend}");
                    let _ = writeln!(out, "    ip daddr {ip} udp dport {{ {ports} }} dnat ip to {backend}");
                }
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

    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn only_listed_ports_are_open_on_a_service_ip() {
        let hosted = [Hosted {
            ip: "10.42.7.7".parse().unwrap(),
            ports: BTreeSet::from([8020, 8000]),
            service: "default/graph-node".into(),
            forward_to: None,
            target_ports: BTreeMap::new(),
        }];
        assert_eq!(
            render(&hosted, None, None),
            "table inet harness_mesh\ndelete table inet harness_mesh\ntable inet harness_mesh {\n  chain service_ports {\n    type filter hook input priority filter; policy accept;\n    ct state established,related accept\n    # default/graph-node\n    ip daddr 10.42.7.7 tcp dport { 8000, 8020 } accept\n    ip daddr 10.42.7.7 udp dport { 8000, 8020 } accept\n    ip daddr 10.42.7.7 icmp type echo-request accept\n    ip daddr 10.42.7.7 meta l4proto tcp reject with tcp reset\n    ip daddr 10.42.7.7 reject\n  }\n}\n"
        );
    }

    #[test]
    fn nothing_hosted_gives_an_empty_chain() {
        let script = render(&[], None, None);
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
            target_ports: BTreeMap::new(),
        }];
        let script = render(&hosted, None, None);
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
            target_ports: BTreeMap::new(),
        }];
        let script = render(&hosted, None, None);
        let rule = "ip daddr 10.42.7.7 tcp dport { 8080 } dnat ip to 10.244.1.2";
        assert_eq!(script.matches(rule).count(), 2, "prerouting and output:\n{script}");
        assert!(script.contains("type nat hook prerouting priority dstnat;"));
        assert!(script.contains("type nat hook output priority -100;"));
        // Everything else sent to the mesh IP is still refused.
        assert!(script.contains("ip daddr 10.42.7.7 reject"));
    }

    #[test]
    fn a_mapped_port_goes_to_its_target_and_the_target_stays_closed() {
        // A process on the node: 8000 of the mesh IP goes to 80 of the same IP.
        let process = Hosted {
            ip: "10.42.7.7".parse().unwrap(),
            ports: BTreeSet::from([8000, 8020]),
            service: "default/web".into(),
            forward_to: None,
            target_ports: BTreeMap::from([(8000, 80)]),
        };
        let script = render(std::slice::from_ref(&process), None, None);
        for chain_name in ["forward_to_pods", "forward_to_pods_local"] {
            assert_eq!(
                chain(&script, chain_name)[1..],
                [
                    "# default/web",
                    "ip daddr 10.42.7.7 tcp dport 8000 dnat ip to 10.42.7.7:80",
                    "ip daddr 10.42.7.7 udp dport 8000 dnat ip to 10.42.7.7:80"
                ],
                "{script}"
            );
        }
        let input = chain(&script, "service_ports");
        let mapped =
            "ip daddr 10.42.7.7 ct status dnat meta l4proto { tcp, udp } ct original proto-dst { 8000 } accept";
        let listed = "ip daddr 10.42.7.7 tcp dport { 8000, 8020 } accept";
        let position = |rule: &str| input.iter().position(|l| *l == rule);
        assert!(position(mapped) < position(listed) && position(mapped).is_some(), "{script}");
        assert!(
            !script.contains("dport { 80 }") && !script.contains("dport { 80,"),
            "80 itself is not opened: {script}"
        );

        // A pod: the mapped port to the pod's target port, the others as they are.
        let pod = Hosted { forward_to: Some("10.244.1.2".parse().unwrap()), ..process };
        let script = render(&[pod], None, None);
        assert_eq!(
            chain(&script, "forward_to_pods")[1..],
            [
                "# default/web",
                "ip daddr 10.42.7.7 tcp dport 8000 dnat ip to 10.244.1.2:80",
                "ip daddr 10.42.7.7 udp dport 8000 dnat ip to 10.244.1.2:80",
                "ip daddr 10.42.7.7 tcp dport { 8020 } dnat ip to 10.244.1.2",
                "ip daddr 10.42.7.7 udp dport { 8020 } dnat ip to 10.244.1.2"
            ],
            "{script}"
        );
        assert!(!chain(&script, "service_ports").iter().any(|l| l.contains("ct status dnat")), "{script}");
    }

    #[test]
    fn no_nat_chain_without_a_pod_backed_service() {
        let hosted = [Hosted {
            ip: "10.42.7.7".parse().unwrap(),
            ports: BTreeSet::from([8080]),
            service: "default/web".into(),
            forward_to: None,
            target_ports: BTreeMap::new(),
        }];
        assert!(!render(&hosted, None, None).contains("nat"));
    }

    #[test]
    fn forwarded_traffic_enters_the_mesh_from_the_node_mesh_ip() {
        let masquerade = Masquerade {
            interface: "wg-harness".into(),
            underlay: "eth0".into(),
            subnet: "10.42.0.0/16".parse().unwrap(),
            node_ip: "10.42.0.3".parse().unwrap(),
        };
        let script = render(&[], None, Some(&masquerade));
        assert!(script.contains("type nat hook postrouting priority srcnat;"), "{script}");
        let rule = "oifname \"wg-harness\" iifname != \"eth0\" ip saddr != 10.42.0.0/16 snat ip to 10.42.0.3";
        assert!(script.contains(rule), "{script}");
        // Without it, no source NAT at all.
        assert!(!render(&[], None, None).contains("snat"));
        // A name with a quote cannot end the string early.
        let odd = Masquerade { interface: "wg\"x".into(), ..masquerade };
        assert!(render(&[], None, Some(&odd)).contains("oifname \"wgx\" iifname != \"eth0\""));
    }
    fn member() -> Member {
        Member {
            interface: "wg-harness".into(),
            subnet: "10.42.0.0/16".parse().unwrap(),
            node_ip: "10.42.0.3".parse().unwrap(),
            agent_udp: BTreeSet::from([53, 51821]),
            agent_tcp: BTreeSet::from([53]),
            exposed: BTreeSet::new(),
            relay: false,
        }
    }

    fn masquerade() -> Masquerade {
        Masquerade {
            interface: "wg-harness".into(),
            underlay: "eth0".into(),
            subnet: "10.42.0.0/16".parse().unwrap(),
            node_ip: "10.42.0.3".parse().unwrap(),
        }
    }

    fn web_on_a_pod() -> Hosted {
        Hosted {
            ip: "10.42.7.7".parse().unwrap(),
            ports: BTreeSet::from([8080, 8443]),
            service: "default/web".into(),
            forward_to: Some("10.244.1.2".parse().unwrap()),
            target_ports: BTreeMap::new(),
        }
    }

    /// The lines of `chain` in `script`, trimmed, without its header and closing brace.
    fn chain<'a>(script: &'a str, chain: &str) -> Vec<&'a str> {
        let start = format!("  chain {chain} {{");
        script.lines().skip_while(|l| *l != start).skip(1).take_while(|l| *l != "  }").map(str::trim).collect()
    }

    #[test]
    fn the_node_mesh_ip_opens_only_echo_the_agent_ports_and_the_exposed_ones_to_others() {
        let script = render(&[], Some(&member()), None);
        assert_eq!(
            chain(&script, "service_ports"),
            [
                "type filter hook input priority filter; policy accept;",
                "ct state established,related accept",
                "# this node",
                "iifname \"lo\" accept",
                "ip daddr 10.42.0.3 icmp type echo-request accept",
                "ip daddr 10.42.0.3 udp dport { 53, 51821 } accept",
                "ip daddr 10.42.0.3 tcp dport { 53 } accept",
                "ip daddr 10.42.0.3 meta l4proto tcp reject with tcp reset",
                "ip daddr 10.42.0.3 reject",
                "# nothing else of this node is reachable through the tunnel",
                "iifname \"wg-harness\" drop",
            ]
        );
        let exposed = Member { exposed: BTreeSet::from([22, 9100]), ..member() };
        let script = render(&[], Some(&exposed), None);
        assert!(script.contains("ip daddr 10.42.0.3 udp dport { 22, 53, 9100, 51821 } accept"), "{script}");
        assert!(script.contains("ip daddr 10.42.0.3 tcp dport { 22, 53, 9100 } accept"), "{script}");
        // No agent port and nothing exposed: no empty set (nft refuses `{ }`).
        let closed = Member { agent_udp: BTreeSet::new(), agent_tcp: BTreeSet::new(), ..member() };
        assert!(!render(&[], Some(&closed), None).contains("dport {  }"));
    }

    #[test]
    fn hosted_services_keep_their_rules_ahead_of_the_node_s_own() {
        let script = render(&[web_on_a_pod()], Some(&member()), None);
        let input = chain(&script, "service_ports");
        let at = |rule: &str| input.iter().position(|l| *l == rule).unwrap_or_else(|| panic!("{rule}:\n{script}"));
        // The node's own connections to an unlisted port of a hosted IP are refused as before:
        // `lo` is accepted only after the service rules.
        assert!(at("ip daddr 10.42.7.7 reject") < at("iifname \"lo\" accept"));
        assert!(at("iifname \"lo\" accept") < at("iifname \"wg-harness\" drop"));
    }

    #[test]
    fn the_tunnel_forwards_only_dnat_to_a_hosted_pod_on_a_listed_port() {
        let script = render(&[web_on_a_pod()], Some(&member()), None);
        assert_eq!(
            chain(&script, "forward"),
            [
                "type filter hook forward priority filter; policy accept;",
                "iifname \"wg-harness\" ct state established,related accept",
                "# default/web",
                "iifname \"wg-harness\" ct status dnat ct original ip daddr 10.42.7.7 meta l4proto { tcp, udp } ct \
                 original proto-dst { 8080, 8443 } accept",
                "# replies of forwarded services",
                "oifname \"wg-harness\" ip saddr { 10.244.1.2 } ct state established,related accept",
                "oifname \"wg-harness\" ip saddr { 10.244.1.2 } drop",
                "# a node is not a router",
                "iifname \"wg-harness\" drop",
            ]
        );
        // Without source NAT the pod's replies pass the guard (and only replies the forward chain).
        assert_eq!(
            chain(&script, "guard")[2],
            "iifname != { \"wg-harness\", \"lo\" } ip saddr { 10.244.1.2 } ip daddr 10.42.0.0/16 accept"
        );
        // With source NAT nothing forwarded needs the exception.
        let translated = render(&[web_on_a_pod()], Some(&member()), Some(&masquerade()));
        assert!(!translated.contains("ip saddr { 10.244.1.2 }"), "{translated}");
        // Nothing pod-backed: nothing is forwarded from the tunnel at all.
        let plain = render(&[], Some(&member()), None);
        assert_eq!(chain(&plain, "forward")[2..], ["# a node is not a router", "iifname \"wg-harness\" drop"]);
    }

    #[test]
    fn mesh_sources_come_only_from_the_tunnel_and_mesh_destinations_not_from_the_underlay() {
        // Without source NAT no pod is a mesh client: only the tunnel and lo touch mesh addresses.
        let script = render(&[], Some(&member()), None);
        assert_eq!(
            chain(&script, "guard"),
            [
                "type filter hook prerouting priority raw; policy accept;",
                "iifname != { \"wg-harness\", \"lo\" } ip saddr 10.42.0.0/16 drop",
                "iifname != { \"wg-harness\", \"lo\" } ip daddr 10.42.0.0/16 drop",
            ]
        );
        // With it, pods (on any interface but the underlay) reach mesh addresses; the underlay does not.
        let script = render(&[], Some(&member()), Some(&masquerade()));
        assert_eq!(
            chain(&script, "guard")[1..],
            [
                "iifname != { \"wg-harness\", \"lo\" } ip saddr 10.42.0.0/16 drop",
                "iifname \"eth0\" ip daddr 10.42.0.0/16 drop"
            ]
        );
        // No member (no mesh IP yet): no guard, no forward chain.
        let bare = render(&[], None, None);
        assert!(!bare.contains("chain guard") && !bare.contains("chain forward"), "{bare}");
    }

    #[test]
    fn odd_interface_names_cannot_break_out_of_their_strings() {
        let odd = Member { interface: "wg\"; flush ruleset; \"".into(), ..member() };
        let script = render(&[], Some(&odd), None);
        assert!(!script.contains("\"; flush"), "{script}");
        assert!(script.contains("iifname \"wg;flushruleset;\" drop"), "{script}");
    }
}
