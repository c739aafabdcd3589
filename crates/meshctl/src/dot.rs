//! `meshctl graph --format dot`: the topology as a Graphviz graph (lay it out with `circo` or
//! `dot`). Nodes are boxes labelled with name, mesh IP and backend; an edge joins every pair
//! of nodes, coloured by health both ways; services hang off their node. Pure: model in, text
//! out.

use crate::model::{EdgeHealth, MeshView, NodeHealth};
use crate::palette;

/// Renders the view as an undirected DOT graph; `services` adds the services.
pub fn render(view: &MeshView, services: bool) -> String {
    let mut out = String::new();
    out.push_str("graph mesh {\n");
    out.push_str("  layout=circo;\n  overlap=false;\n  bgcolor=\"white\";\n");
    out.push_str(&format!(
        "  label={};\n  labelloc=t;\n  fontname=\"Helvetica\";\n",
        quote(&format!(
            "harness-mesh: {} nodes, {} services, {} of {} converged",
            view.nodes.len(),
            view.services.len(),
            view.convergence.converged,
            view.convergence.tunnel_nodes
        ))
    ));
    out.push_str(
        "  node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\", fontsize=11, penwidth=2];\n  \
         edge [penwidth=2.5];\n",
    );
    for node in &view.nodes {
        let label =
            format!("{}\n{}\n{}", node.name, node.mesh_ip.as_deref().unwrap_or("no mesh IP"), node.backend_name());
        let (fill, stroke) = node_colours(node.health());
        out.push_str(&format!(
            "  {} [label={}, fillcolor=\"{fill}\", color=\"{stroke}\", tooltip={}];\n",
            quote(&node.name),
            quote(&label),
            quote(&node_tooltip(view, &node.name)),
        ));
    }
    for edge in view.edges() {
        let (colour, style) = edge_style(edge.health);
        // A relayed pair: dashed, labelled with its relay.
        let (style, label) = match &edge.via {
            Some(relay) => ("dashed", format!(", label={}, fontsize=9", quote(&format!("via {relay}")))),
            None => (style, String::new()),
        };
        out.push_str(&format!(
            "  {} -- {} [color=\"{colour}\", style={style}{label}, tooltip={}];\n",
            quote(&edge.a),
            quote(&edge.b),
            quote(&edge.detail)
        ));
    }
    if services {
        for service in &view.services {
            let Some(node) = service.node.as_deref().filter(|n| view.node(n).is_some()) else {
                continue;
            };
            let id = format!("svc/{}/{}", service.namespace, service.name);
            let label = format!(
                "{}/{}\n{}",
                service.namespace,
                service.name,
                service.mesh_ip.as_deref().unwrap_or(service.type_name())
            );
            let fill = if service.is_ready() { palette::SERVICE_READY } else { palette::SERVICE_NOT_READY };
            out.push_str(&format!(
                "  {} [label={}, shape=box, style=\"rounded,filled\", fillcolor=\"{fill}\", color=\"{}\", fontsize=9, penwidth=1];\n",
                quote(&id),
                quote(&label),
                palette::SERVICE_STROKE
            ));
            out.push_str(&format!(
                "  {} -- {} [color=\"{}\", style=dotted, penwidth=1];\n",
                quote(node),
                quote(&id),
                palette::SERVICE_STROKE
            ));
        }
    }
    out.push_str("}\n");
    out
}

/// A DOT string literal: `\` and `"` escaped, newlines as `\n` (centred lines).
pub fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for ch in text.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => {}
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn node_colours(health: NodeHealth) -> (&'static str, &'static str) {
    match health {
        NodeHealth::Healthy => (palette::NODE_FILL, palette::UP),
        NodeHealth::Degraded => (palette::NODE_FILL_BAD, palette::DOWN),
        NodeHealth::Pending => (palette::NODE_FILL_PENDING, palette::PENDING),
        NodeHealth::Fallback => (palette::NODE_FILL_FALLBACK, palette::UNKNOWN),
    }
}

fn edge_style(health: EdgeHealth) -> (&'static str, &'static str) {
    match health {
        EdgeHealth::Up => (palette::UP, "solid"),
        EdgeHealth::Down => (palette::DOWN, "solid"),
        EdgeHealth::Unknown => (palette::UNKNOWN, "solid"),
        EdgeHealth::NoTunnel => (palette::UNKNOWN, "dashed"),
    }
}

/// The hover text of a node: its endpoint, conditions and convergence.
pub fn node_tooltip(view: &MeshView, name: &str) -> String {
    let Some(node) = view.node(name) else { return String::new() };
    let mut lines = vec![format!("{} ({})", node.name, node.endpoint.as_deref().unwrap_or("no endpoint"))];
    if let Some(ready) = &node.ready {
        lines.push(format!("Ready={} {}: {}", ready.status, ready.reason, ready.message));
    }
    if let Some(connected) = &node.connected {
        lines.push(format!("Connected={} {}: {}", connected.status, connected.reason, connected.message));
    }
    lines.extend(node.convergence.reasons.iter().cloned());
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::model::fixtures::lab;

    fn dot() -> String {
        let (nodes, services) = lab();
        render(
            &MeshView::build(&nodes, &services, Err("agent liveness unknown: no Leases"), Timestamp::UNIX_EPOCH),
            true,
        )
    }

    #[test]
    fn quoting_escapes_what_dot_needs() {
        assert_eq!(quote("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
    }

    #[test]
    fn every_node_edge_and_service_is_there() {
        let d = dot();
        assert!(d.starts_with("graph mesh {\n") && d.ends_with("}\n"));
        assert_eq!(d.matches('{').count(), d.matches('}').count());
        for i in 1..=4 {
            assert!(d.contains(&format!("  \"hm-node-{i}\" [label=\"hm-node-{i}\\n10.42.0.{i}\\n")), "{d}");
        }
        assert_eq!(d.lines().filter(|l| l.contains(" -- ") && !l.contains("svc/")).count(), 6);
        let edge = |a: &str, b: &str| d.lines().find(|l| l.starts_with(&format!("  \"{a}\" -- \"{b}\""))).unwrap();
        assert!(edge("hm-node-1", "hm-node-2").contains(palette::UP));
        assert!(edge("hm-node-2", "hm-node-3").contains(palette::DOWN));
        assert!(edge("hm-node-1", "hm-node-4").contains("style=dashed"));
        assert!(d.contains("\"hm-node-2\" -- \"svc/default/graph-node\""));
        assert!(d.contains("label=\"default/graph-node\\n10.42.1.5\""));
        // Every statement line ends with `;` (or opens/closes the graph).
        for line in d.lines() {
            assert!(line.ends_with(';') || line.ends_with('{') || line == "}", "{line:?}");
        }
    }
}
