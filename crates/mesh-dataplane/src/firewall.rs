//! The nftables ruleset that enforces service ports: on the IP of a service hosted here, only
//! its listed TCP and UDP ports are open; everything else sent to that IP is dropped. The node's
//! own mesh IP and all other traffic are left alone.
//!
//! A service backed by a pod on the pod network is forwarded: its listed ports on the mesh IP
//! are DNATed to the pod's IP, both for traffic arriving through the tunnel (prerouting) and
//! for the node's own connections (output). Conntrack turns the replies back into the mesh
//! IP's, so peers see the mesh IP they connected to. Unlisted ports still reach the input
//! chain and are dropped there.
//!
//! The ruleset lives in its own table, `inet harness_mesh`, and [`render`] produces a script
//! that replaces the whole table in one `nft -f` transaction, so there is never a moment with
//! half a ruleset.

use std::fmt::Write as _;

use crate::desired::Hosted;

/// The nftables table the agent owns.
pub const TABLE: &str = "harness_mesh";

/// The `nft -f -` script that makes the table enforce `hosted`.
pub fn render(hosted: &[Hosted]) -> String {
    let mut out = String::new();
    // Create-then-delete makes the delete succeed whether or not the table existed.
    let _ = writeln!(out, "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{");
    out.push_str("  chain service_ports {\n    type filter hook input priority filter; policy accept;\n");
    for service in hosted {
        let ip = service.ip;
        let _ = writeln!(out, "    # {}", service.service.replace('\n', " "));
        if !service.ports.is_empty() {
            let ports: Vec<String> = service.ports.iter().map(u16::to_string).collect();
            let ports = ports.join(", ");
            let _ = writeln!(out, "    ip daddr {ip} tcp dport {{ {ports} }} accept");
            let _ = writeln!(out, "    ip daddr {ip} udp dport {{ {ports} }} accept");
        }
        let _ = writeln!(out, "    ip daddr {ip} drop");
    }
    out.push_str("  }\n");
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

/// The script that removes the table (agent shutdown with `--cleanup`, or nothing hosted).
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
            render(&hosted),
            "table inet harness_mesh\ndelete table inet harness_mesh\ntable inet harness_mesh {\n  chain service_ports {\n    type filter hook input priority filter; policy accept;\n    # default/graph-node\n    ip daddr 10.42.7.7 tcp dport { 8000, 8020 } accept\n    ip daddr 10.42.7.7 udp dport { 8000, 8020 } accept\n    ip daddr 10.42.7.7 drop\n  }\n}\n"
        );
    }

    #[test]
    fn nothing_hosted_gives_an_empty_chain() {
        let script = render(&[]);
        assert!(script.contains("policy accept;\n  }\n}"));
        assert!(!script.contains("drop"));
    }

    #[test]
    fn a_service_name_cannot_break_out_of_its_comment() {
        let hosted = [Hosted {
            ip: "10.42.7.7".parse().unwrap(),
            ports: BTreeSet::new(),
            service: "a\nflush ruleset".into(),
            forward_to: None,
        }];
        let script = render(&hosted);
        assert!(!script.lines().any(|l| l.trim_start().starts_with("flush")));
        assert!(script.contains("ip daddr 10.42.7.7 drop"));
    }

    #[test]
    fn a_pod_backed_service_has_its_listed_ports_forwarded_to_the_pod() {
        let hosted = [Hosted {
            ip: "10.42.7.7".parse().unwrap(),
            ports: BTreeSet::from([8080]),
            service: "default/web".into(),
            forward_to: Some("10.244.1.2".parse().unwrap()),
        }];
        let script = render(&hosted);
        let rule = "ip daddr 10.42.7.7 tcp dport { 8080 } dnat ip to 10.244.1.2";
        assert_eq!(script.matches(rule).count(), 2, "prerouting and output:\n{script}");
        assert!(script.contains("type nat hook prerouting priority dstnat;"));
        assert!(script.contains("type nat hook output priority -100;"));
        // Everything else sent to the mesh IP is still dropped.
        assert!(script.contains("ip daddr 10.42.7.7 drop"));
    }

    #[test]
    fn no_nat_chain_without_a_pod_backed_service() {
        let hosted = [Hosted {
            ip: "10.42.7.7".parse().unwrap(),
            ports: BTreeSet::from([8080]),
            service: "default/web".into(),
            forward_to: None,
        }];
        assert!(!render(&hosted).contains("nat"));
    }
}
