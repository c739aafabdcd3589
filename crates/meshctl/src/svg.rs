//! `meshctl graph` (the default, SVG): the topology drawn without Graphviz. Nodes sit on a
//! circle as cards (name, mesh IP, backend and endpoint) bordered by their health; an edge joins
//! every pair, green when both report the other reachable, red when one does not (a ✕ marks the
//! end whose agent reports it), grey when unknown and grey dashed when one end has no tunnel;
//! services hang off their node as pills. Hovering anything shows the details (`<title>`).
//! Pure: model in, text out.

use std::f64::consts::PI;
use std::fmt::Write as _;

use crate::dot::node_tooltip;
use crate::model::{EdgeHealth, LinkState, MeshView, NodeHealth, NodeView, ServiceView, describe};
use crate::palette;

const SANS: &str = "Inter, 'Segoe UI', Helvetica, Arial, sans-serif";
const MONO: &str = "ui-monospace, 'SF Mono', Menlo, Consolas, 'DejaVu Sans Mono', monospace";
const MARGIN: f64 = 32.0;
const HEADER: f64 = 72.0;
const CARD_H: f64 = 74.0;
const PILL_H: f64 = 34.0;
const PILL_GAP: f64 = 8.0;

/// Renders the view as a standalone SVG document; `services` adds the services.
pub fn render(view: &MeshView, services: bool) -> String {
    let layout = Layout::new(view, services);
    let mut svg = String::new();
    let (width, height) = (layout.width, layout.height);
    let _ = writeln!(svg, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="{SANS}" role="img">"#,
        w = num(width),
        h = num(height),
    );
    let _ = writeln!(svg, "<title>{}</title>", esc(&summary(view)));
    svg.push_str(concat!(
        r##"<defs><filter id="shadow" x="-20%" y="-20%" width="140%" height="160%">"##,
        r##"<feGaussianBlur in="SourceAlpha" stdDeviation="3"/><feOffset dy="2" result="blur"/>"##,
        r##"<feFlood flood-color="#1f2328" flood-opacity="0.14"/><feComposite in2="blur" operator="in"/>"##,
        r##"<feMerge><feMergeNode/><feMergeNode in="SourceGraphic"/></feMerge>"##,
        "</filter></defs>\n"
    ));
    let _ = writeln!(svg, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    let _ = writeln!(
        svg,
        r#"<text x="{x}" y="36" font-size="20" font-weight="700" fill="{}">harness-mesh</text>"#,
        palette::TEXT,
        x = num(MARGIN)
    );
    let _ = writeln!(
        svg,
        r#"<text x="{x}" y="56" font-size="12" fill="{}">{}</text>"#,
        palette::MUTED,
        esc(&summary(view)),
        x = num(MARGIN)
    );
    let _ = writeln!(svg, r#"<g transform="translate({} {})">"#, num(layout.offset.0), num(layout.offset.1));
    edges(&mut svg, view, &layout);
    if services {
        service_links(&mut svg, &layout);
    }
    markers(&mut svg, view, &layout);
    cards(&mut svg, view, &layout);
    if services {
        pills(&mut svg, &layout);
    }
    svg.push_str("</g>\n");
    legend(&mut svg, &layout, services);
    svg.push_str("</svg>\n");
    svg
}

/// `4 nodes · 2 services · 3 of 3 converged · 1 in fallback`.
fn summary(view: &MeshView) -> String {
    let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    let c = &view.convergence;
    let mut parts = vec![plural(view.nodes.len(), "node"), plural(view.services.len(), "service")];
    parts.push(format!("{} of {} with WireGuard converged", c.converged, c.tunnel_nodes));
    if !c.fallback.is_empty() {
        parts.push(format!("{} in fallback", c.fallback.len()));
    }
    let down = view.reachability.iter().filter(|l| l.state == LinkState::Unreachable).count();
    if down > 0 {
        parts.push(format!("{down} unreachable link{}", if down == 1 { "" } else { "s" }));
    }
    parts.join(" · ")
}

/// Where everything goes, in the coordinates of the translated group (circle centred on 0,0).
struct Layout {
    card_w: f64,
    centres: Vec<(f64, f64)>,
    pills: Vec<Pill>,
    unhosted: Vec<String>,
    offset: (f64, f64),
    width: f64,
    height: f64,
    legend_y: f64,
}

struct Pill {
    node: usize,
    centre: (f64, f64),
    width: f64,
    service: ServiceView,
}

impl Layout {
    fn new(view: &MeshView, services: bool) -> Self {
        let n = view.nodes.len();
        let card_w = view
            .nodes
            .iter()
            .map(|node| {
                let lines = card_lines(node);
                text_w(&lines[0], 14.0, Font::Bold).max(text_w(&lines[1], 12.0, Font::Mono)).max(text_w(
                    &lines[2],
                    11.0,
                    Font::Sans,
                ))
            })
            .fold(0.0, f64::max)
            + 44.0;
        let card_w = card_w.clamp(180.0, 360.0);
        let radius = match n {
            0 | 1 => 0.0,
            _ => ((card_w + 60.0) / (2.0 * (PI / n as f64).sin())).max(150.0 + 30.0 * n as f64),
        };
        let angles: Vec<f64> =
            (0..n).map(|i| if n == 1 { 0.0 } else { -PI / 2.0 + 2.0 * PI * i as f64 / n as f64 }).collect();
        let centres: Vec<(f64, f64)> = angles.iter().map(|a| (radius * a.cos(), radius * a.sin())).collect();

        let mut pills = Vec::new();
        let mut unhosted = Vec::new();
        if services {
            for service in &view.services {
                match service.node.as_deref().and_then(|name| view.nodes.iter().position(|n| n.name == name)) {
                    Some(i) => pills.push(Pill {
                        node: i,
                        centre: (0.0, 0.0),
                        width: pill_w(service),
                        service: service.clone(),
                    }),
                    None => unhosted.push(format!(
                        "{}/{}{}",
                        service.namespace,
                        service.name,
                        service.ready.as_ref().map(|r| format!(" ({})", r.reason)).unwrap_or_default()
                    )),
                }
            }
            for (i, angle) in angles.iter().enumerate() {
                let mine: Vec<usize> = pills.iter().enumerate().filter(|(_, p)| p.node == i).map(|(j, _)| j).collect();
                if mine.is_empty() {
                    continue;
                }
                let widest = mine.iter().map(|&j| pills[j].width).fold(0.0, f64::max);
                let stack = mine.len() as f64 * PILL_H + (mine.len() as f64 - 1.0) * PILL_GAP;
                let (cos, sin) = (angle.cos(), angle.sin());
                let reach =
                    cos.abs() * (card_w / 2.0 + 40.0 + widest / 2.0) + sin.abs() * (CARD_H / 2.0 + 36.0 + stack / 2.0);
                let anchor = (centres[i].0 + reach * cos, centres[i].1 + reach * sin);
                for (k, &j) in mine.iter().enumerate() {
                    let dy = (k as f64 - (mine.len() as f64 - 1.0) / 2.0) * (PILL_H + PILL_GAP);
                    pills[j].centre = (anchor.0, anchor.1 + dy);
                }
            }
        }

        let (mut min_x, mut min_y, mut max_x, mut max_y) = (0.0_f64, 0.0_f64, 0.0_f64, 0.0_f64);
        for &(x, y) in &centres {
            min_x = min_x.min(x - card_w / 2.0);
            max_x = max_x.max(x + card_w / 2.0);
            min_y = min_y.min(y - CARD_H / 2.0);
            max_y = max_y.max(y + CARD_H / 2.0);
        }
        for pill in &pills {
            min_x = min_x.min(pill.centre.0 - pill.width / 2.0);
            max_x = max_x.max(pill.centre.0 + pill.width / 2.0);
            min_y = min_y.min(pill.centre.1 - PILL_H / 2.0);
            max_y = max_y.max(pill.centre.1 + PILL_H / 2.0);
        }
        let content_w = max_x - min_x;
        let width = (content_w + 2.0 * MARGIN).max(720.0).ceil();
        let offset = ((width - content_w) / 2.0 - min_x, HEADER + 12.0 - min_y);
        let legend_y = HEADER + 12.0 + (max_y - min_y) + 36.0;
        let height =
            (legend_y + legend_rows(width, services) as f64 * 24.0 + unhosted.len() as f64 * 18.0 + 24.0).ceil();
        Self { card_w, centres, pills, unhosted, offset, width, height, legend_y }
    }

    /// How far from a card's centre, along the unit vector `(dx, dy)`, the line leaves the card.
    fn exit(&self, dx: f64, dy: f64) -> f64 {
        let tx = if dx.abs() > 1e-9 { self.card_w / 2.0 / dx.abs() } else { f64::INFINITY };
        let ty = if dy.abs() > 1e-9 { CARD_H / 2.0 / dy.abs() } else { f64::INFINITY };
        tx.min(ty)
    }
}

fn card_lines(node: &NodeView) -> [String; 3] {
    let backend = if node.is_fallback() { "none (fallback)" } else { node.backend_name() };
    let third = match &node.endpoint {
        Some(endpoint) => format!("{backend} · {endpoint}"),
        None => backend.to_owned(),
    };
    [node.name.clone(), node.mesh_ip.clone().unwrap_or_else(|| "no mesh IP yet".to_owned()), third]
}

fn pill_lines(service: &ServiceView) -> [String; 2] {
    let ports = service.port_labels();
    let address = service.mesh_ip.clone().unwrap_or_else(|| format!("{} (host address)", service.type_name()));
    let second = if ports.is_empty() { address } else { format!("{address} :{}", ports.join(",")) };
    [format!("{}/{}", service.namespace, service.name), second]
}

fn pill_w(service: &ServiceView) -> f64 {
    let lines = pill_lines(service);
    (text_w(&lines[0], 11.0, Font::Bold).max(text_w(&lines[1], 10.0, Font::Mono)) + 32.0).clamp(120.0, 320.0)
}

#[derive(Clone, Copy)]
enum Font {
    Sans,
    Bold,
    Mono,
}

/// An estimate of a text's width in pixels (no font metrics at hand; errs on the wide side).
fn text_w(text: &str, size: f64, font: Font) -> f64 {
    let per_char = match font {
        Font::Sans => 0.56,
        Font::Bold => 0.62,
        Font::Mono => 0.62,
    };
    text.chars().count() as f64 * per_char * size
}

fn edges(svg: &mut String, view: &MeshView, layout: &Layout) {
    svg.push_str("<g id=\"edges\" stroke-linecap=\"round\">\n");
    // Problems last, so they are drawn on top; healthy edges fade a little in a dense mesh.
    let mut all = view.edges();
    all.sort_by_key(|e| match e.health {
        EdgeHealth::Up => 0,
        EdgeHealth::NoTunnel => 1,
        EdgeHealth::Unknown => 2,
        EdgeHealth::Down => 3,
    });
    let faded = if view.nodes.len() > 5 { r#" stroke-opacity="0.6""# } else { "" };
    for edge in all {
        let (Some(a), Some(b)) = (index(view, &edge.a), index(view, &edge.b)) else { continue };
        let (colour, dash, width) = match edge.health {
            EdgeHealth::Up => (palette::UP, faded, 3.0),
            EdgeHealth::Down => (palette::DOWN, "", 3.0),
            EdgeHealth::Unknown => (palette::UNKNOWN, "", 2.0),
            EdgeHealth::NoTunnel => (palette::UNKNOWN, r#" stroke-dasharray="7 6""#, 1.6),
        };
        // A relayed pair: short dashes (its title names the relay).
        let dash =
            if edge.via.is_some() && edge.health != EdgeHealth::NoTunnel { r#" stroke-dasharray="3 5""# } else { dash };
        let ((x1, y1), (x2, y2)) = (layout.centres[a], layout.centres[b]);
        let _ = writeln!(
            svg,
            r#"<g class="edge"><title>{}</title><line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{colour}" stroke-width="{}"{dash}/></g>"#,
            esc(&edge.detail),
            num(x1),
            num(y1),
            num(x2),
            num(y2),
            num(width),
        );
    }
    svg.push_str("</g>\n");
}

/// One dotted line from each node to its stack of services, and a spine along the stack.
fn service_links(svg: &mut String, layout: &Layout) {
    svg.push_str("<g id=\"service-links\">\n");
    let line = |svg: &mut String, (x1, y1): (f64, f64), (x2, y2): (f64, f64)| {
        let _ = writeln!(
            svg,
            r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{}" stroke-width="1.4" stroke-dasharray="2 3"/>"#,
            num(x1),
            num(y1),
            num(x2),
            num(y2),
            palette::SERVICE_STROKE
        );
    };
    for (node, &centre) in layout.centres.iter().enumerate() {
        let stack: Vec<(f64, f64)> = layout.pills.iter().filter(|p| p.node == node).map(|p| p.centre).collect();
        let (Some(first), Some(last)) = (stack.first(), stack.last()) else { continue };
        line(svg, centre, (first.0, (first.1 + last.1) / 2.0));
        if stack.len() > 1 {
            line(svg, *first, *last);
        }
    }
    svg.push_str("</g>\n");
}

/// A ✕ on each unreachable direction, just outside the card of the node that reports it.
fn markers(svg: &mut String, view: &MeshView, layout: &Layout) {
    svg.push_str("<g id=\"markers\">\n");
    for link in view.reachability.iter().filter(|l| l.state == LinkState::Unreachable) {
        let (Some(from), Some(to)) = (index(view, &link.from), index(view, &link.to)) else { continue };
        let ((x1, y1), (x2, y2)) = (layout.centres[from], layout.centres[to]);
        let length = ((x2 - x1).powi(2) + (y2 - y1).powi(2)).sqrt();
        if length < 1.0 {
            continue;
        }
        let (dx, dy) = ((x2 - x1) / length, (y2 - y1) / length);
        let t = (layout.exit(dx, dy) + 16.0).min(length / 2.0);
        let (x, y) = (x1 + dx * t, y1 + dy * t);
        let _ = writeln!(
            svg,
            concat!(
                r#"<g class="marker" transform="translate({} {})"><title>{}</title>"#,
                r##"<circle r="9" fill="#ffffff" stroke="{}" stroke-width="2"/>"##,
                r#"<path d="M-3.5,-3.5 L3.5,3.5 M3.5,-3.5 L-3.5,3.5" stroke="{}" stroke-width="2.2" stroke-linecap="round"/></g>"#
            ),
            num(x),
            num(y),
            esc(&describe(link)),
            palette::DOWN,
            palette::DOWN
        );
    }
    svg.push_str("</g>\n");
}

fn cards(svg: &mut String, view: &MeshView, layout: &Layout) {
    svg.push_str("<g id=\"nodes\">\n");
    for (node, &(cx, cy)) in view.nodes.iter().zip(&layout.centres) {
        let (fill, stroke, dash) = match node.health() {
            NodeHealth::Healthy => (palette::NODE_FILL, palette::UP, ""),
            NodeHealth::Degraded => (palette::NODE_FILL_BAD, palette::DOWN, ""),
            NodeHealth::Pending => (palette::NODE_FILL_PENDING, palette::PENDING, ""),
            NodeHealth::Fallback => (palette::NODE_FILL_FALLBACK, palette::UNKNOWN, r#" stroke-dasharray="6 4""#),
        };
        let (w, h) = (layout.card_w, CARD_H);
        let (left, top) = (cx - w / 2.0, cy - h / 2.0);
        let lines = card_lines(node);
        let _ = writeln!(svg, r#"<g class="node" id="node-{}">"#, esc(&node.name));
        let _ = writeln!(svg, "<title>{}</title>", esc(&node_tooltip(view, &node.name)));
        let _ = writeln!(
            svg,
            r#"<rect x="{}" y="{}" width="{}" height="{}" rx="10" fill="{fill}" stroke="{stroke}" stroke-width="2.5"{dash} filter="url(#shadow)"/>"#,
            num(left),
            num(top),
            num(w),
            num(h)
        );
        let _ =
            writeln!(svg, r#"<circle cx="{}" cy="{}" r="5" fill="{stroke}"/>"#, num(left + w - 16.0), num(top + 18.0));
        let x = num(left + 16.0);
        let _ = writeln!(
            svg,
            r#"<text x="{x}" y="{}" font-size="14" font-weight="700" fill="{}">{}</text>"#,
            num(top + 24.0),
            palette::TEXT,
            esc(&lines[0])
        );
        let _ = writeln!(
            svg,
            r#"<text x="{x}" y="{}" font-size="12" font-family="{MONO}" fill="{}">{}</text>"#,
            num(top + 44.0),
            palette::ADDRESS,
            esc(&lines[1])
        );
        let _ = writeln!(
            svg,
            r#"<text x="{x}" y="{}" font-size="11" fill="{}">{}</text>"#,
            num(top + 62.0),
            palette::MUTED,
            esc(&lines[2])
        );
        svg.push_str("</g>\n");
    }
    svg.push_str("</g>\n");
}

fn pills(svg: &mut String, layout: &Layout) {
    svg.push_str("<g id=\"services\">\n");
    for pill in &layout.pills {
        let s = &pill.service;
        let (fill, stroke) = if s.is_ready() {
            (palette::SERVICE_READY, palette::SERVICE_STROKE)
        } else {
            (palette::SERVICE_NOT_READY, palette::DOWN)
        };
        let lines = pill_lines(s);
        let (cx, cy) = pill.centre;
        let mut tip = format!("{}/{} ({})", s.namespace, s.name, s.type_name());
        if let Some(dns) = &s.dns_name {
            tip.push_str(&format!("\n{dns}"));
        }
        if let Some(ready) = &s.ready {
            tip.push_str(&format!("\nReady={} {}: {}", ready.status, ready.reason, ready.message));
        }
        let _ = writeln!(svg, r#"<g class="service"><title>{}</title>"#, esc(&tip));
        let _ = writeln!(
            svg,
            r#"<rect x="{}" y="{}" width="{}" height="{}" rx="{}" fill="{fill}" stroke="{stroke}" stroke-width="1.5"/>"#,
            num(cx - pill.width / 2.0),
            num(cy - PILL_H / 2.0),
            num(pill.width),
            num(PILL_H),
            num(PILL_H / 2.0)
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" font-size="11" font-weight="600" text-anchor="middle" fill="{}">{}</text>"#,
            num(cx),
            num(cy - 3.0),
            palette::TEXT,
            esc(&lines[0])
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" font-size="10" font-family="{MONO}" text-anchor="middle" fill="{}">{}</text>"#,
            num(cx),
            num(cy + 11.0),
            palette::MUTED,
            esc(&lines[1])
        );
        svg.push_str("</g>\n");
    }
    svg.push_str("</g>\n");
}

/// The legend's entries: (sample kind, label).
fn legend_items(services: bool) -> Vec<(&'static str, &'static str)> {
    let mut items = vec![
        ("up", "reachable both ways"),
        ("down", "not reachable (✕ at the node that reports it)"),
        ("unknown", "unknown"),
        ("notunnel", "no tunnel (fallback node)"),
    ];
    if services {
        items.push(("service", "service: mesh IP and ports"));
    }
    items
}

/// The legend laid out in rows that fit `width`: (kind, label, x, row) for each entry.
fn legend_layout(width: f64, services: bool) -> Vec<(&'static str, &'static str, f64, usize)> {
    let mut out = Vec::new();
    let (mut x, mut row) = (MARGIN, 0);
    for (kind, label) in legend_items(services) {
        let item_w = 38.0 + text_w(label, 12.0, Font::Sans);
        if x > MARGIN && x + item_w > width - MARGIN {
            x = MARGIN;
            row += 1;
        }
        out.push((kind, label, x, row));
        x += item_w + 28.0;
    }
    out
}

fn legend_rows(width: f64, services: bool) -> usize {
    legend_layout(width, services).last().map_or(0, |(_, _, _, row)| row + 1)
}

fn legend(svg: &mut String, layout: &Layout, services: bool) {
    let _ = writeln!(svg, r#"<g id="legend" font-size="12" fill="{}">"#, palette::MUTED);
    for (kind, label, x, row) in legend_layout(layout.width, services) {
        let y = layout.legend_y + row as f64 * 24.0;
        let sample = match kind {
            "up" => line_sample(x, y, palette::UP, ""),
            "down" => line_sample(x, y, palette::DOWN, ""),
            "unknown" => line_sample(x, y, palette::UNKNOWN, ""),
            "notunnel" => line_sample(x, y, palette::UNKNOWN, r#" stroke-dasharray="7 6""#),
            _ => format!(
                r#"<rect x="{}" y="{}" width="28" height="14" rx="7" fill="{}" stroke="{}" stroke-width="1.5"/>"#,
                num(x),
                num(y - 7.0),
                palette::SERVICE_READY,
                palette::SERVICE_STROKE
            ),
        };
        svg.push_str(&sample);
        let _ = writeln!(svg, r#"<text x="{}" y="{}">{}</text>"#, num(x + 38.0), num(y + 4.0), esc(label));
    }
    let mut y = layout.legend_y + legend_rows(layout.width, services) as f64 * 24.0 + 4.0;
    for service in &layout.unhosted {
        let _ =
            writeln!(svg, r#"<text x="{}" y="{}">not hosted anywhere: {}</text>"#, num(MARGIN), num(y), esc(service));
        y += 18.0;
    }
    svg.push_str("</g>\n");
}

fn line_sample(x: f64, y: f64, colour: &str, dash: &str) -> String {
    format!(
        r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{colour}" stroke-width="3" stroke-linecap="round"{dash}/>"#,
        num(x),
        num(y),
        num(x + 28.0),
        num(y)
    )
}

fn index(view: &MeshView, name: &str) -> Option<usize> {
    view.nodes.iter().position(|n| n.name == name)
}

/// A coordinate with one decimal, `-0.0` as `0`.
fn num(value: f64) -> String {
    let rounded = (value * 10.0).round() / 10.0;
    if rounded == 0.0 { "0".to_owned() } else { format!("{rounded}") }
}

/// Escapes text for XML content and attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::model::fixtures::{lab, node, service};

    /// Checks that `doc` is well-formed XML (one root, balanced and matching tags, quoted
    /// attributes, known entities, no stray `<`); returns the element names in document order.
    pub(crate) fn well_formed(doc: &str) -> Result<Vec<String>, String> {
        fn entities(text: &str) -> Result<(), String> {
            let mut rest = text;
            while let Some(at) = rest.find('&') {
                let tail = &rest[at + 1..];
                let end = tail.find(';').ok_or_else(|| format!("unterminated entity in {text:?}"))?;
                let name = &tail[..end];
                let known = matches!(name, "amp" | "lt" | "gt" | "quot" | "apos")
                    || name
                        .strip_prefix("#x")
                        .is_some_and(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()))
                    || name.strip_prefix('#').is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()));
                if !known {
                    return Err(format!("unknown entity &{name}; in {text:?}"));
                }
                rest = &tail[end + 1..];
            }
            Ok(())
        }
        let mut rest = doc.trim_start();
        if let Some(after) = rest.strip_prefix("<?xml") {
            rest = &after[after.find("?>").ok_or("unterminated XML declaration")? + 2..];
        }
        let (mut stack, mut names, mut roots) = (Vec::<String>::new(), Vec::new(), 0);
        loop {
            let Some(lt) = rest.find('<') else {
                entities(rest)?;
                if !rest.trim().is_empty() && stack.is_empty() {
                    return Err(format!("text after the root: {rest:?}"));
                }
                break;
            };
            let text = &rest[..lt];
            entities(text)?;
            if stack.is_empty() && !text.trim().is_empty() {
                return Err(format!("text outside the root: {text:?}"));
            }
            rest = &rest[lt..];
            if let Some(after) = rest.strip_prefix("<!--") {
                rest = &after[after.find("-->").ok_or("unterminated comment")? + 3..];
                continue;
            }
            let gt = rest.find('>').ok_or("unterminated tag")?;
            let tag = &rest[1..gt];
            rest = &rest[gt + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                let open = stack.pop().ok_or_else(|| format!("</{name}> closes nothing"))?;
                if open != name.trim() {
                    return Err(format!("<{open}> closed by </{name}>"));
                }
                continue;
            }
            let self_closing = tag.ends_with('/');
            let tag = tag.trim_end_matches('/');
            let name_end = tag.find(char::is_whitespace).unwrap_or(tag.len());
            let name = &tag[..name_end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_:.".contains(c)) {
                return Err(format!("bad element name in <{tag}>"));
            }
            let mut attrs = tag[name_end..].trim();
            let mut seen = Vec::new();
            while !attrs.is_empty() {
                let eq = attrs.find('=').ok_or_else(|| format!("attribute without value in <{tag}>"))?;
                let attr = attrs[..eq].trim();
                if seen.contains(&attr) {
                    return Err(format!("duplicate attribute {attr} in <{name}>"));
                }
                seen.push(attr);
                let value = attrs[eq + 1..].trim_start();
                let quote = value.chars().next().filter(|q| *q == '"' || *q == '\'');
                let quote = quote.ok_or_else(|| format!("unquoted attribute {attr} in <{name}>"))?;
                let close = value[1..].find(quote).ok_or_else(|| format!("unterminated attribute {attr}"))?;
                let inner = &value[1..1 + close];
                if inner.contains('<') {
                    return Err(format!("'<' in attribute {attr}"));
                }
                entities(inner)?;
                attrs = value[close + 2..].trim_start();
            }
            if stack.is_empty() {
                roots += 1;
            }
            names.push(name.to_owned());
            if !self_closing {
                stack.push(name.to_owned());
            }
        }
        if let Some(open) = stack.pop() {
            return Err(format!("<{open}> never closed"));
        }
        if roots != 1 {
            return Err(format!("{roots} root elements"));
        }
        Ok(names)
    }

    #[test]
    fn the_checker_catches_malformed_documents() {
        assert!(well_formed("<a><b x=\"1\"/>t &amp; u</a>").is_ok());
        for bad in
            ["<a><b></a>", "<a>", "<a x=1/>", "<a>&nbsp;</a>", "<a/><b/>", "<a x=\"<\"/>", "<a x=\"1\" x=\"2\"/>"]
        {
            assert!(well_formed(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_lab_renders_as_well_formed_svg_with_everything() {
        let (nodes, services) = lab();
        let view = MeshView::build(&nodes, &services, Err("agent liveness unknown: no Leases"), Timestamp::UNIX_EPOCH);
        let svg = render(&view, true);
        let names = well_formed(&svg).unwrap_or_else(|e| panic!("{e}\n{svg}"));
        assert_eq!(names[0], "svg");
        assert_eq!(svg.matches("<g class=\"node\"").count(), 4);
        assert_eq!(svg.matches("<g class=\"edge\"").count(), 6);
        assert_eq!(svg.matches("<g class=\"service\"").count(), 2);
        assert_eq!(svg.matches("<g class=\"marker\"").count(), 1, "hm-node-3 reports hm-node-2 unreachable");
        for i in 1..=4 {
            assert!(svg.contains(&format!(">hm-node-{i}</text>")));
            assert!(svg.contains(&format!(">10.42.0.{i}</text>")));
        }
        assert!(svg.contains(">userspace · 192.168.77.1:51820</text>"));
        assert!(svg.contains(">none (fallback) · 192.168.77.4:51820</text>"));
        assert!(svg.contains(">default/graph-node</text>") && svg.contains(">10.42.1.5 :8000</text>"));
        let edge = |a: &str, b: &str| {
            let start = svg.find(&format!("<title>{a} → {b}:")).unwrap();
            svg[start..].lines().next().unwrap().to_owned()
        };
        assert!(edge("hm-node-1", "hm-node-2").contains(palette::UP));
        assert!(edge("hm-node-2", "hm-node-3").contains(palette::DOWN));
        assert!(edge("hm-node-1", "hm-node-4").contains("stroke-dasharray"));
        assert!(
            svg.contains("4 nodes · 2 services · 3 of 3 with WireGuard converged · 1 in fallback · 1 unreachable link")
        );
        assert!(!render(&view, false).contains("class=\"service\""));
    }

    #[test]
    fn cards_do_not_overlap_whatever_the_size() {
        for n in [0usize, 1, 2, 3, 5, 8, 16, 40] {
            let nodes: Vec<_> = (0..n).map(|i| node(&format!("node-{i}"), (i % 250) as u8, None)).collect();
            let services: Vec<_> =
                (0..n).map(|i| service("ns", &format!("s{i}"), &format!("node-{}", i % 3), "10.42.9.9")).collect();
            let view =
                MeshView::build(&nodes, &services, Err("agent liveness unknown: no Leases"), Timestamp::UNIX_EPOCH);
            let layout = Layout::new(&view, true);
            for (i, a) in layout.centres.iter().enumerate() {
                for b in &layout.centres[i + 1..] {
                    let apart = (a.0 - b.0).abs() >= layout.card_w || (a.1 - b.1).abs() >= CARD_H;
                    assert!(apart, "{n} nodes: cards at {a:?} and {b:?} overlap");
                }
            }
            // Everything lies inside the canvas.
            for &(x, y) in &layout.centres {
                let (x, y) = (x + layout.offset.0, y + layout.offset.1);
                assert!(x - layout.card_w / 2.0 >= 0.0 && x + layout.card_w / 2.0 <= layout.width, "{n}: x {x}");
                assert!(y - CARD_H / 2.0 >= HEADER && y + CARD_H / 2.0 <= layout.legend_y, "{n}: y {y}");
            }
            well_formed(&render(&view, true)).unwrap();
        }
    }

    #[test]
    fn names_are_escaped() {
        assert_eq!(esc("a<b & \"c\" 'd'>"), "a&lt;b &amp; &quot;c&quot; &apos;d&apos;&gt;");
    }
}
