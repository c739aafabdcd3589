//! `meshctl status` as text: kubectl-style tables of nodes and services, the reachability
//! matrix, and what is not converged yet. Pure: model in, text out.

use crate::connected;
use crate::model::{AgentState, ConvergenceState, LinkState, MeshView, NodeView, age};

/// Renders the tables; `wide` adds listen ports, public keys and service ports.
pub fn status(view: &MeshView, wide: bool) -> String {
    let mut out = String::new();
    out.push_str("NODES\n");
    if view.nodes.is_empty() {
        out.push_str("No MeshNodes: is mesh-controller running (it mirrors every Kubernetes Node)?\n");
    } else {
        out.push_str(&nodes(view, wide));
    }
    out.push_str("\nSERVICES\n");
    if view.services.is_empty() {
        out.push_str("No MeshServices.\n");
    } else {
        out.push_str(&services(view, wide));
    }
    if view.nodes.len() > 1 {
        out.push_str("\nREACHABILITY (row reaches column, as each row's agent reports)\n");
        out.push_str(&matrix(view));
    }
    out.push_str("\nCONVERGENCE\n");
    out.push_str(&convergence(view));
    for note in &view.notes {
        out.push_str(&format!("\nnote: {note}\n"));
    }
    out
}

/// Lays out `rows` under `headers`, columns separated by three spaces, no trailing blanks.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let headers: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&headers).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths.get(i).copied().unwrap_or(0).saturating_sub(cell.chars().count()) + 3;
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn dash(value: Option<&str>) -> String {
    value.unwrap_or("-").to_owned()
}

fn nodes(view: &MeshView, wide: bool) -> String {
    let mut headers = vec!["NAME", "MESH-IP", "ENDPOINT"];
    if wide {
        headers.push("LISTEN-PORT");
    }
    headers.extend(["BACKEND", "READY", "CONNECTED", "AGENT", "CONVERGED"]);
    if wide {
        headers.push("PUBLIC-KEY");
    }
    let rows: Vec<Vec<String>> = view
        .nodes
        .iter()
        .map(|n| {
            let mut row = vec![n.name.clone(), dash(n.mesh_ip.as_deref()), dash(n.endpoint.as_deref())];
            if wide {
                row.push(n.listen_port.map_or_else(|| "-".to_owned(), |p| p.to_string()));
            }
            row.push(n.backend_name().to_owned());
            row.push(match &n.ready {
                Some(r) if r.status == "True" => "True".to_owned(),
                Some(r) => format!("{} ({})", r.status, r.reason),
                None => "-".to_owned(),
            });
            row.push(connected_summary(n));
            row.push(match (n.agent.state, n.agent.seconds_since_renewal) {
                (AgentState::Alive, _) => "alive".to_owned(),
                (AgentState::Stale, Some(s)) => format!("stale ({} ago)", age(s)),
                (AgentState::Stale, None) => "stale".to_owned(),
                (AgentState::Unknown, _) => "unknown".to_owned(),
            });
            row.push(
                match n.convergence.state {
                    ConvergenceState::Converged => "yes",
                    ConvergenceState::Pending => "no",
                    ConvergenceState::Fallback => "fallback",
                }
                .to_owned(),
            );
            if wide {
                row.push(dash(n.public_key.as_deref()));
            }
            row
        })
        .collect();
    table(&headers, &rows)
}

/// The CONNECTED column: `2/2 reachable`, `1/2 reachable (down: hm-node-3)`, `no tunnel`, ...
pub fn connected_summary(node: &NodeView) -> String {
    let Some(c) = &node.connected else {
        return "not reported".to_owned();
    };
    if c.reason == "NoTunnel" {
        return "no tunnel".to_owned();
    }
    let Some(report) = connected::parse(&c.reason, &c.message) else {
        return format!("{} ({})", c.status, c.reason);
    };
    if report.total == 0 {
        return "no peers yet".to_owned();
    }
    let mut out = format!("{}/{} reachable", report.reachable, report.total);
    if !report.unreachable.is_empty() {
        let names: Vec<&str> = report.unreachable.iter().map(|(n, _)| n.as_str()).collect();
        out.push_str(&format!(" (down: {}", names.join(", ")));
        if report.unnamed > 0 {
            out.push_str(&format!(" +{}", report.unnamed));
        }
        out.push(')');
    }
    out
}

fn services(view: &MeshView, wide: bool) -> String {
    let mut headers = vec!["NAMESPACE/NAME", "TYPE", "MESH-IP", "NODE", "DNS-NAME", "READY"];
    if wide {
        headers.push("PORTS");
    }
    let rows: Vec<Vec<String>> = view
        .services
        .iter()
        .map(|s| {
            let mut row = vec![
                format!("{}/{}", s.namespace, s.name),
                s.type_name().to_owned(),
                dash(s.mesh_ip.as_deref()),
                dash(s.node.as_deref()),
                dash(s.dns_name.as_deref()),
                match &s.ready {
                    Some(r) if r.status == "True" => "True".to_owned(),
                    Some(r) => format!("{} ({})", r.status, r.reason),
                    None => "-".to_owned(),
                },
            ];
            if wide {
                let ports = s.port_labels();
                row.push(if ports.is_empty() { "-".to_owned() } else { ports.join(",") });
            }
            row
        })
        .collect();
    table(&headers, &rows)
}

/// The symbol of a matrix cell.
pub fn symbol(state: LinkState) -> &'static str {
    match state {
        LinkState::Reachable => "✓",
        LinkState::Unreachable => "✗",
        LinkState::Unknown => "?",
        LinkState::NoTunnel => "-",
    }
}

fn matrix(view: &MeshView) -> String {
    let mut headers = vec!["FROM \\ TO"];
    headers.extend(view.nodes.iter().map(|n| n.name.as_str()));
    let rows: Vec<Vec<String>> = view
        .nodes
        .iter()
        .map(|from| {
            let mut row = vec![from.name.clone()];
            row.extend(view.nodes.iter().map(|to| match view.link(&from.name, &to.name) {
                Some(link) if link.via.is_some() => format!("{}r", symbol(link.state)),
                Some(link) => symbol(link.state).to_owned(),
                None => "·".to_owned(),
            }));
            row
        })
        .collect();
    let mut out = table(&headers, &rows);
    out.push_str("✓ reachable   ✗ not reachable   ? unknown   - no tunnel (fallback node)   r relayed\n");
    for link in view.reachability.iter().filter(|l| l.state == LinkState::Unreachable || l.via.is_some()) {
        out.push_str(&format!("  {}\n", crate::model::describe(link)));
    }
    out
}

fn convergence(view: &MeshView) -> String {
    let c = &view.convergence;
    let mut out = format!(
        "{} of {} node{} with WireGuard {} applied the current peer set",
        c.converged,
        c.tunnel_nodes,
        if c.tunnel_nodes == 1 { "" } else { "s" },
        if c.converged == 1 { "has" } else { "have" },
    );
    out.push_str(if c.pending.is_empty() { ".\n" } else { "; waiting for:\n" });
    for node in view.nodes.iter().filter(|n| n.convergence.state == ConvergenceState::Pending) {
        for reason in &node.convergence.reasons {
            out.push_str(&format!("  {}: {reason}\n", node.name));
        }
    }
    for node in view.nodes.iter().filter(|n| n.convergence.state == ConvergenceState::Fallback) {
        let why = node.convergence.reasons.first().map(String::as_str).unwrap_or("no WireGuard");
        out.push_str(&format!("  {} is in fallback (no tunnel): {why}\n", node.name));
    }
    out
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::model::fixtures::lab;

    fn text() -> String {
        let (nodes, services) = lab();
        status(
            &MeshView::build(&nodes, &services, Err("agent liveness unknown: no Leases"), Timestamp::UNIX_EPOCH),
            false,
        )
    }

    #[test]
    fn a_relayed_pair_is_marked_in_the_matrix_and_named_below_it() {
        let (mut nodes, services) = lab();
        nodes[0].spec.relay = Some(true);
        for (i, peer) in [(1, "hm-node-3"), (2, "hm-node-2")] {
            nodes[i].status.as_mut().unwrap().relayed_peers =
                vec![mesh_api::RelayedPeer { peer: peer.into(), via: "hm-node-1".into() }];
        }
        let view = MeshView::build(&nodes, &services, Err("no Leases"), Timestamp::UNIX_EPOCH);
        let t = status(&view, false);
        let row = t.lines().find(|l| l.starts_with("hm-node-2 ") && l.contains('✓')).unwrap();
        assert_eq!(row.split_whitespace().collect::<Vec<_>>()[1..], ["✓", "·", "✓r", "-"], "{t}");
        assert!(t.contains("  hm-node-2 → hm-node-3: reachable, relayed via hm-node-1\n"), "{t}");
        assert!(t.contains("  hm-node-3 → hm-node-2: not reachable, relayed via hm-node-1 (no handshake)\n"), "{t}");
        let edge = view.edges().into_iter().find(|e| e.a == "hm-node-2" && e.b == "hm-node-3").unwrap();
        assert_eq!(edge.via.as_deref(), Some("hm-node-1"));
        let dot = crate::dot::render(&view, false);
        assert!(
            dot.contains("\"hm-node-2\" -- \"hm-node-3\" [color=")
                && dot.contains("style=dashed, label=\"via hm-node-1\""),
            "{dot}"
        );
    }

    #[test]
    fn a_mapped_port_shows_its_target_in_the_wide_table() {
        let (nodes, mut services) = lab();
        services[0].spec.network.target_ports = vec![mesh_api::PortMapping { port: 8000, target_port: 80 }];
        let view = MeshView::build(&nodes, &services, Err("no Leases"), Timestamp::UNIX_EPOCH);
        let t = status(&view, true);
        let row = t.lines().find(|l| l.starts_with("default/graph-node ")).unwrap();
        assert!(row.trim_end().ends_with("8000→80"), "{row}");
    }

    #[test]
    fn tables_line_up() {
        let t = table(&["A", "LONGER"], &[vec!["xxxx".into(), "y".into()], vec!["z".into(), "".into()]]);
        assert_eq!(t, "A      LONGER\nxxxx   y\nz\n");
    }

    #[test]
    fn status_has_every_section_and_node() {
        let t = text();
        for section in ["NODES\n", "\nSERVICES\n", "\nREACHABILITY", "\nCONVERGENCE\n"] {
            assert!(t.contains(section), "{section:?} missing in\n{t}");
        }
        let n1 = t.lines().find(|l| l.starts_with("hm-node-1 ")).unwrap();
        let cols: Vec<&str> = n1.split_whitespace().collect();
        assert_eq!(cols[..5], ["hm-node-1", "10.42.0.1", "192.168.77.1:51820", "userspace", "True"]);
        assert!(n1.contains("2/2 reachable"), "{n1}");
        assert!(n1.trim_end().ends_with("yes"), "{n1}");
        let n3 = t.lines().find(|l| l.starts_with("hm-node-3 ")).unwrap();
        assert!(n3.contains("1/2 reachable (down: hm-node-2)"), "{n3}");
        let n4 = t.lines().find(|l| l.starts_with("hm-node-4 ")).unwrap();
        assert!(n4.contains("none") && n4.contains("no tunnel") && n4.trim_end().ends_with("fallback"), "{n4}");
        assert!(t.contains("default/graph-node   mesh   10.42.1.5   hm-node-2   graph-node.default.mesh.local   True"));
        assert!(t.contains("3 of 3 nodes with WireGuard have applied the current peer set.\n"), "{t}");
        assert!(t.contains("hm-node-4 is in fallback"), "{t}");
        assert!(t.contains("  hm-node-3 → hm-node-2: not reachable (no handshake)\n"), "{t}");
    }

    #[test]
    fn the_matrix_has_a_row_and_a_column_per_node() {
        let t = text();
        let start = t.lines().position(|l| l.starts_with("FROM \\ TO")).unwrap();
        let header: Vec<&str> = t.lines().nth(start).unwrap().split_whitespace().collect();
        assert_eq!(header, ["FROM", "\\", "TO", "hm-node-1", "hm-node-2", "hm-node-3", "hm-node-4"]);
        let rows: Vec<Vec<&str>> = t.lines().skip(start + 1).take(4).map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows[0], ["hm-node-1", "·", "✓", "✓", "-"]);
        assert_eq!(rows[2], ["hm-node-3", "✓", "✗", "·", "-"]);
        assert_eq!(rows[3], ["hm-node-4", "-", "-", "-", "·"]);
    }

    #[test]
    fn an_empty_cluster_says_what_to_check() {
        let t =
            status(&MeshView::build(&[], &[], Err("agent liveness unknown: no Leases"), Timestamp::UNIX_EPOCH), true);
        assert!(t.contains("No MeshNodes: is mesh-controller running"), "{t}");
        assert!(t.contains("No MeshServices."));
        assert!(t.contains("note: agent liveness unknown"));
    }
}
