//! The mesh as meshctl shows it, built from the API objects alone (no client, no I/O).
//!
//! [`MeshView::build`] turns the MeshNodes, MeshServices and the agents' liveness Leases into:
//!
//! - one [`NodeView`] per node and one [`ServiceView`] per service;
//! - the reachability matrix as directed [`Link`]s: `from` reaches `to` according to `from`'s
//!   `Connected` condition, which names the unreachable peers (at most 5), so every other peer
//!   in the agent's set is reachable. When the agent's set differs from the directory, or more
//!   than 5 are down, the unnamed cells are "unknown", never guessed;
//! - convergence: whether each node has applied the current peer set, derived from what the API
//!   holds (mesh IP, published key, an up-to-date peer entry, the agent's peer count against the
//!   directory's, a live agent Lease) and from the applied peer set the agent reports on its
//!   Lease (`mesh_api::APPLIED_PEERS_ANNOTATION`), whose digest is compared with the digest of
//!   what the directory asks of the node. The directory's side is computed by `mesh-plan`, the
//!   very conversion and skip rules the agents run (endpoints given as DNS names cannot be
//!   resolved here and count as none).
//!
//! The renderers (`table`, `dot`, `svg`) read only this model.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use mesh_api::conditions::{CONNECTED, READY};
use mesh_api::{Backend, MeshNode, MeshService, NetworkType, PeerEntry};
use mesh_dataplane::dns::ShortNames;
use mesh_plan::{Directory, convert};
use serde::Serialize;

use crate::connected::{self, Report};

/// An agent's liveness Lease, as read from `mesh-agent-<node>`.
#[derive(Clone, Debug, PartialEq)]
pub struct Lease {
    /// When the agent last renewed it.
    pub renewed: Option<Timestamp>,
    /// How long a renewal counts (the agent renews well within it).
    pub duration_secs: Option<i32>,
    /// The peer set the agent had applied at that renewal (`mesh_api::APPLIED_PEERS_ANNOTATION`).
    pub applied: Option<mesh_api::AppliedPeers>,
}

/// Everything `meshctl status` shows.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshView {
    /// Every MeshNode, by name.
    pub nodes: Vec<NodeView>,
    /// Every MeshService (of the namespace asked for), by namespace and name.
    pub services: Vec<ServiceView>,
    /// Who reaches whom: one entry per ordered pair of distinct nodes.
    pub reachability: Vec<Link>,
    /// Which nodes have applied the current peer set.
    pub convergence: Convergence,
    /// What could not be read (e.g. Leases hidden by RBAC) and so shows as unknown.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// One node.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    /// The MeshNode's name.
    pub name: String,
    /// Its mesh IP, once allocated.
    #[serde(rename = "meshIP", skip_serializing_if = "Option::is_none")]
    pub mesh_ip: Option<String>,
    /// Its effective underlay endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The port its WireGuard listens on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<i32>,
    /// kernel, userspace or none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
    /// Its WireGuard public key, once its agent published it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// The peer entry the other nodes apply for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerEntry>,
    /// Its `Ready` condition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<ConditionView>,
    /// Its `Connected` condition, with the counts read from the message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected: Option<ConnectedView>,
    /// Whether its agent is alive (its Lease).
    pub agent: AgentView,
    /// Whether it has applied the current peer set, and if not why.
    pub convergence: NodeConvergence,
    /// It carries traffic between members with no direct path (`spec.relay`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub relay: bool,
    /// The peers its agent reaches through a relay: peer → relay (`status.relayedPeers`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub relayed: BTreeMap<String, String>,
}

impl NodeView {
    /// Whether the node runs without WireGuard (`backend: none`).
    pub fn is_fallback(&self) -> bool {
        self.backend == Some(Backend::None)
    }

    /// `Ready=True`.
    pub fn is_ready(&self) -> bool {
        self.ready.as_ref().is_some_and(|c| c.status == "True")
    }

    /// `Connected=True`.
    pub fn is_connected(&self) -> bool {
        self.connected.as_ref().is_some_and(|c| c.status == "True")
    }

    /// `kernel`, `userspace`, `none`, or `-` when not reported yet.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Some(Backend::Kernel) => "kernel",
            Some(Backend::Userspace) => "userspace",
            Some(Backend::None) => "none",
            None => "-",
        }
    }

    /// The overall state the graph colours the node by.
    pub fn health(&self) -> NodeHealth {
        if self.is_fallback() {
            NodeHealth::Fallback
        } else if self.convergence.state == ConvergenceState::Pending {
            NodeHealth::Pending
        } else if self.is_ready() && self.is_connected() {
            NodeHealth::Healthy
        } else {
            NodeHealth::Degraded
        }
    }
}

/// How a node is doing, in one word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeHealth {
    /// Ready, converged, all peers reachable.
    Healthy,
    /// Converged, but some peer is unreachable (or Ready is False).
    Degraded,
    /// Not yet converged.
    Pending,
    /// Runs without WireGuard.
    Fallback,
}

/// A condition, without its times.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConditionView {
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase reason.
    pub reason: String,
    /// What a person should know.
    pub message: String,
}

impl From<&Condition> for ConditionView {
    fn from(c: &Condition) -> Self {
        Self { status: c.status.clone(), reason: c.reason.clone(), message: c.message.clone() }
    }
}

/// The `Connected` condition and the counts in its message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectedView {
    /// `True` when every peer is reachable.
    pub status: String,
    /// AllPeersReachable, PeersUnreachable, NoPeerReachable, NoPeers or NoTunnel.
    pub reason: String,
    /// The agent's summary.
    pub message: String,
    /// Peers reachable, when the message says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reachable: Option<u32>,
    /// Peers in the agent's set, when the message says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peers: Option<u32>,
}

/// Whether a node's agent is alive, from its Lease `mesh-agent-<node>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentView {
    /// alive, stale or unknown.
    pub state: AgentState,
    /// Seconds since the last renewal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds_since_renewal: Option<i64>,
}

/// Liveness of an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum AgentState {
    /// Renewed its Lease within the Lease's duration.
    Alive,
    /// Has not renewed its Lease for longer than its duration: its status may be out of date.
    Stale,
    /// No Lease found, or Leases could not be read.
    Unknown,
}

/// A node's convergence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeConvergence {
    /// converged, pending or fallback.
    pub state: ConvergenceState,
    /// Why it is pending (or why it is in fallback).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
}

/// Whether a node has applied the current peer set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ConvergenceState {
    /// Everything the API shows agrees with the directory.
    Converged,
    /// Something is still missing or out of date (see the reasons).
    Pending,
    /// Runs without WireGuard: not part of the tunnel mesh, nothing to apply.
    Fallback,
}

/// Convergence of the whole mesh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Convergence {
    /// Nodes with WireGuard that have converged.
    pub converged: usize,
    /// Nodes with WireGuard (or not reported yet): all but the fallback ones.
    pub tunnel_nodes: usize,
    /// Nodes not converged yet.
    pub pending: Vec<String>,
    /// Nodes in fallback.
    pub fallback: Vec<String>,
}

/// One service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceView {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// mesh, host or dual.
    #[serde(rename = "type")]
    pub network_type: NetworkType,
    /// Ports reachable on its mesh IP.
    pub ports: Vec<i32>,
    /// Listed ports that go to another port behind the mesh IP: port → target.
    #[serde(rename = "targetPorts", skip_serializing_if = "BTreeMap::is_empty")]
    pub target_ports: BTreeMap<i32, i32>,
    /// Its mesh IP (none for host services).
    #[serde(rename = "meshIP", skip_serializing_if = "Option::is_none")]
    pub mesh_ip: Option<String>,
    /// The node that hosts it now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `<name>.<namespace>.mesh.local`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_name: Option<String>,
    /// Its `Ready` condition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<ConditionView>,
}

impl ServiceView {
    /// Its ports as `meshctl` prints them: `8000`, or `8000→80` for a mapped one.
    pub fn port_labels(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| match self.target_ports.get(p) {
                Some(target) if target != p => format!("{p}→{target}"),
                _ => p.to_string(),
            })
            .collect()
    }

    /// `Ready=True`.
    pub fn is_ready(&self) -> bool {
        self.ready.as_ref().is_some_and(|c| c.status == "True")
    }

    /// `mesh`, `host` or `dual`.
    pub fn type_name(&self) -> &'static str {
        match self.network_type {
            NetworkType::Mesh => "mesh",
            NetworkType::Host => "host",
            NetworkType::Dual => "dual",
        }
    }
}

/// Whether `from` reaches `to` through the tunnel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Link {
    /// The node whose agent reports.
    pub from: String,
    /// Its peer.
    pub to: String,
    /// What `from`'s agent says.
    pub state: LinkState,
    /// Why, in words (the agent's reason, or why it is unknown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The relay `from`'s agent sends through, when it has no direct path to `to`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

/// A cell of the reachability matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LinkState {
    /// Probes through the tunnel come back.
    Reachable,
    /// The agent names the peer as not reachable.
    Unreachable,
    /// The API does not say.
    Unknown,
    /// One of the two runs without WireGuard: there is no tunnel between them.
    NoTunnel,
}

/// An undirected edge of the topology: both directions of a node pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edge {
    /// One node (the smaller name).
    pub a: String,
    /// The other.
    pub b: String,
    /// Both directions combined.
    pub health: EdgeHealth,
    /// `a → b: ...; b → a: ...`.
    pub detail: String,
    /// The relay either end goes through, when the pair has no direct path.
    pub via: Option<String>,
}

/// The colour of an edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EdgeHealth {
    /// Reachable both ways: green.
    Up,
    /// At least one direction reported unreachable: red.
    Down,
    /// Not known (yet) either way: grey.
    Unknown,
    /// One end runs without WireGuard: grey, dashed.
    NoTunnel,
}

impl MeshView {
    /// Builds the view. `leases` maps node names to their agent Lease (`Err`: why Leases could
    /// not be read at all); `now` judges their age.
    pub fn build(
        nodes: &[MeshNode],
        services: &[MeshService],
        leases: Result<&BTreeMap<String, Lease>, &str>,
        now: Timestamp,
    ) -> Self {
        let mut nodes: Vec<&MeshNode> = nodes.iter().collect();
        nodes.sort_by_key(|n| n.metadata.name.clone().unwrap_or_default());
        let reports: BTreeMap<String, Option<Report>> = nodes
            .iter()
            .map(|n| {
                let report = condition(n, CONNECTED).and_then(|c| connected::parse(&c.reason, &c.message));
                (name_of(n), report)
            })
            .collect();
        let mut views: Vec<NodeView> = nodes.iter().map(|n| node_view(n, leases.ok(), now)).collect();
        // The directory as the agents derive it (the subnet is theirs to confine to: none here).
        let directory =
            Directory::build(nodes.iter().copied(), services, None, &ShortNames::Every, convert::literal_endpoint);
        let wanted: Vec<mesh_dataplane::desired::Peers> = views.iter().map(|v| wanted_peers(&directory, v)).collect();
        let expected: Vec<BTreeSet<String>> = wanted.iter().map(|w| w.names.values().cloned().collect()).collect();
        for i in 0..views.len() {
            let report = reports.get(&views[i].name).cloned().flatten();
            views[i].convergence = convergence(nodes[i], &views[i], &expected[i], report.as_ref());
            let lease = leases.ok().and_then(|l| l.get(&views[i].name));
            if let Some(why) = applied_differs(&views[i], lease, &wanted[i]) {
                views[i].convergence.reasons.push(why);
                views[i].convergence.state = ConvergenceState::Pending;
            }
        }
        let reachability = links(&views, &reports, &expected);
        let mut services: Vec<ServiceView> = services.iter().map(service_view).collect();
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let convergence = Convergence {
            converged: views.iter().filter(|n| n.convergence.state == ConvergenceState::Converged).count(),
            tunnel_nodes: views.iter().filter(|n| !n.is_fallback()).count(),
            pending: views
                .iter()
                .filter(|n| n.convergence.state == ConvergenceState::Pending)
                .map(|n| n.name.clone())
                .collect(),
            fallback: views.iter().filter(|n| n.is_fallback()).map(|n| n.name.clone()).collect(),
        };
        let notes = match leases {
            Ok(_) => Vec::new(),
            Err(why) => vec![why.to_owned()],
        };
        Self { nodes: views, services, reachability, convergence, notes }
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeView> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The matrix cell `from` → `to`.
    pub fn link(&self, from: &str, to: &str) -> Option<&Link> {
        self.reachability.iter().find(|l| l.from == from && l.to == to)
    }

    /// One edge per unordered pair of nodes, both directions combined.
    pub fn edges(&self) -> Vec<Edge> {
        let mut out = Vec::new();
        for (i, a) in self.nodes.iter().enumerate() {
            for b in &self.nodes[i + 1..] {
                let (Some(ab), Some(ba)) = (self.link(&a.name, &b.name), self.link(&b.name, &a.name)) else {
                    continue;
                };
                let health = match (ab.state, ba.state) {
                    (LinkState::NoTunnel, _) | (_, LinkState::NoTunnel) => EdgeHealth::NoTunnel,
                    (LinkState::Unreachable, _) | (_, LinkState::Unreachable) => EdgeHealth::Down,
                    (LinkState::Reachable, LinkState::Reachable) => EdgeHealth::Up,
                    _ => EdgeHealth::Unknown,
                };
                let detail = format!("{}; {}", describe(ab), describe(ba));
                let via = ab.via.clone().or_else(|| ba.via.clone());
                out.push(Edge { a: a.name.clone(), b: b.name.clone(), health, detail, via });
            }
        }
        out
    }
}

/// A duration in seconds the way kubectl shows ages: `42s`, `5m`, `3h`, `2d`.
pub fn age(secs: i64) -> String {
    match secs.max(0) {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// `a → b: reachable (detail)`.
pub fn describe(link: &Link) -> String {
    let state = match link.state {
        LinkState::Reachable => "reachable",
        LinkState::Unreachable => "not reachable",
        LinkState::Unknown => "unknown",
        LinkState::NoTunnel => "no tunnel",
    };
    let via = link.via.as_ref().map(|relay| format!(", relayed via {relay}")).unwrap_or_default();
    match &link.detail {
        Some(detail) => format!("{} → {}: {state}{via} ({detail})", link.from, link.to),
        None => format!("{} → {}: {state}{via}", link.from, link.to),
    }
}

fn name_of(node: &MeshNode) -> String {
    node.metadata.name.clone().unwrap_or_default()
}

fn condition<'a>(node: &'a MeshNode, type_: &str) -> Option<&'a Condition> {
    node.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

fn node_view(node: &MeshNode, leases: Option<&BTreeMap<String, Lease>>, now: Timestamp) -> NodeView {
    let name = name_of(node);
    let status = node.status.clone().unwrap_or_default();
    let connected = condition(node, CONNECTED).map(|c| {
        let report = connected::parse(&c.reason, &c.message);
        ConnectedView {
            status: c.status.clone(),
            reason: c.reason.clone(),
            message: c.message.clone(),
            reachable: report.as_ref().map(|r| r.reachable),
            peers: report.as_ref().map(|r| r.total),
        }
    });
    NodeView {
        mesh_ip: status.mesh_ip,
        endpoint: status.endpoint.or_else(|| node.spec.endpoint.clone()),
        listen_port: status.listen_port,
        backend: status.backend,
        public_key: status.public_key,
        peer: status.peer,
        ready: condition(node, READY).map(ConditionView::from),
        connected,
        agent: agent_view(leases.and_then(|l| l.get(&name)), now),
        convergence: NodeConvergence { state: ConvergenceState::Pending, reasons: Vec::new() },
        relay: node.spec.relay.unwrap_or(false),
        relayed: status.relayed_peers.iter().map(|r| (r.peer.clone(), r.via.clone())).collect(),
        name,
    }
}

fn agent_view(lease: Option<&Lease>, now: Timestamp) -> AgentView {
    let Some(renewed) = lease.and_then(|l| l.renewed) else {
        return AgentView { state: AgentState::Unknown, seconds_since_renewal: None };
    };
    let age = now.duration_since(renewed).as_secs();
    let duration = i64::from(lease.and_then(|l| l.duration_secs).unwrap_or(40));
    let state = if age > duration { AgentState::Stale } else { AgentState::Alive };
    AgentView { state, seconds_since_renewal: Some(age.max(0)) }
}

/// The peers the agent of `view` should have: what `mesh-plan` computes for it (every other
/// node with a usable peer entry, less entries with its own key or a key several nodes publish).
fn wanted_peers(directory: &Directory, view: &NodeView) -> mesh_dataplane::desired::Peers {
    let key = view.public_key.as_deref().and_then(|k| mesh_wireguard::Key::from_base64(k).ok());
    directory.peers(&view.name, key.as_ref())
}

/// Why the peer set `view`'s agent reports on its Lease as applied is not `wanted` (the one the
/// directory asks of it), or why it cannot be told; `None` when they agree, or when there is
/// nothing to compare (no Lease read, no key published, a node in fallback).
fn applied_differs(view: &NodeView, lease: Option<&Lease>, wanted: &mesh_dataplane::desired::Peers) -> Option<String> {
    if view.is_fallback() || view.public_key.is_none() {
        return None;
    }
    let Some(applied) = lease?.applied.as_ref() else {
        return Some(format!(
            "its agent's Lease carries no applied peer set (annotation {}): an agent older than this meshctl, or one that has not applied any peers yet",
            mesh_api::APPLIED_PEERS_ANNOTATION
        ));
    };
    let digest = &wanted.digest;
    (*digest != applied.digest).then(|| {
        format!(
            "its agent has applied {} peer{} (digest {}), the directory asks for {} (digest {digest}): it has not \
             applied the current peer set yet",
            applied.count,
            if applied.count == 1 { "" } else { "s" },
            applied.digest,
            wanted.applied
        )
    })
}

fn convergence(
    node: &MeshNode,
    view: &NodeView,
    expected: &BTreeSet<String>,
    report: Option<&Report>,
) -> NodeConvergence {
    if view.is_fallback() {
        let why = view
            .connected
            .as_ref()
            .filter(|c| c.reason == "NoTunnel")
            .map(|c| c.message.clone())
            .unwrap_or_else(|| "runs without WireGuard (backend none)".to_owned());
        return NodeConvergence { state: ConvergenceState::Fallback, reasons: vec![why] };
    }
    let mut reasons = Vec::new();
    if view.mesh_ip.is_none() {
        reasons.push("no mesh IP allocated yet: is mesh-controller running?".to_owned());
    }
    match (&view.public_key, &view.peer) {
        (None, _) => {
            reasons.push(format!("its agent has not published a public key: is mesh-agent running on {}?", view.name))
        }
        (Some(_), None) if view.mesh_ip.is_some() => {
            reasons.push("the controller has not written its peer entry yet".to_owned())
        }
        (Some(key), Some(peer)) if *key != peer.public_key => {
            reasons.push("its peer entry still carries an old public key: the controller has not caught up".to_owned())
        }
        _ => {}
    }
    if let Some(peer) = &view.peer {
        let wanted = node.spec.endpoint.clone().or_else(|| node.status.as_ref().and_then(|s| s.endpoint.clone()));
        if wanted.is_some() && peer.endpoint != wanted {
            reasons.push(format!(
                "its peer entry has endpoint {} but the node's is {}: the controller has not caught up",
                peer.endpoint.as_deref().unwrap_or("(none)"),
                wanted.as_deref().unwrap_or("(none)")
            ));
        }
    }
    if view.public_key.is_some() {
        match (&view.connected, report) {
            (None, _) => reasons.push("its agent has not reported peer health yet".to_owned()),
            (Some(c), None) => reasons.push(format!("its Connected condition cannot be read: {}", c.message)),
            (Some(_), Some(r)) if r.total as usize != expected.len() => reasons.push(format!(
                "its agent reports {} peer{}, the directory has {}: it has not applied the current peer set yet",
                r.total,
                if r.total == 1 { "" } else { "s" },
                expected.len()
            )),
            (Some(_), Some(r)) => {
                let unknown: Vec<&str> =
                    r.unreachable.iter().map(|(n, _)| n.as_str()).filter(|n| !expected.contains(*n)).collect();
                if !unknown.is_empty() {
                    reasons.push(format!(
                        "its agent still reports on {}, which {} no longer a peer: it has not applied the current peer set yet",
                        unknown.join(", "),
                        if unknown.len() == 1 { "is" } else { "are" }
                    ));
                }
            }
        }
    }
    if view.agent.state == AgentState::Stale {
        reasons.push(format!(
            "its agent has not renewed its Lease for {}: it may be down, and its status out of date",
            age(view.agent.seconds_since_renewal.unwrap_or_default())
        ));
    }
    if reasons.is_empty()
        && let Some(ready) = view.ready.as_ref().filter(|r| r.status != "True")
    {
        reasons.push(format!("Ready is {} ({}): {}", ready.status, ready.reason, ready.message));
    }
    let state = if reasons.is_empty() { ConvergenceState::Converged } else { ConvergenceState::Pending };
    NodeConvergence { state, reasons }
}

fn links(views: &[NodeView], reports: &BTreeMap<String, Option<Report>>, expected: &[BTreeSet<String>]) -> Vec<Link> {
    let mut out = Vec::new();
    for (from, expected) in views.iter().zip(expected) {
        let report = reports.get(&from.name).cloned().flatten();
        for to in views.iter().filter(|v| v.name != from.name) {
            let (state, detail) = cell(from, to, expected, report.as_ref());
            let via = from.relayed.get(&to.name).cloned();
            out.push(Link { from: from.name.clone(), to: to.name.clone(), state, detail, via });
        }
    }
    out
}

fn cell(
    from: &NodeView,
    to: &NodeView,
    expected: &BTreeSet<String>,
    report: Option<&Report>,
) -> (LinkState, Option<String>) {
    let unknown = |why: String| (LinkState::Unknown, Some(why));
    if from.is_fallback() {
        return (LinkState::NoTunnel, Some(format!("{} runs without WireGuard", from.name)));
    }
    if to.is_fallback() {
        return (LinkState::NoTunnel, Some(format!("{} runs without WireGuard", to.name)));
    }
    if !expected.contains(&to.name) {
        return unknown(format!("{} has no usable peer entry yet", to.name));
    }
    if from.agent.state == AgentState::Stale {
        return unknown(format!("{}'s agent is not renewing its Lease", from.name));
    }
    let Some(report) = report else {
        return unknown(match &from.connected {
            None => format!("{}'s agent has not reported peer health yet", from.name),
            Some(_) => format!("{}'s Connected condition cannot be read", from.name),
        });
    };
    if let Some(problem) = report.problem(&to.name) {
        return (LinkState::Unreachable, Some(problem.to_owned()));
    }
    if report.total as usize != expected.len() {
        return unknown(format!("{}'s agent has not applied the current peer set yet", from.name));
    }
    if !report.complete() {
        return unknown(format!("{} names only some of its unreachable peers", from.name));
    }
    (LinkState::Reachable, None)
}

fn service_view(service: &MeshService) -> ServiceView {
    let status = service.status.clone().unwrap_or_default();
    ServiceView {
        namespace: service.metadata.namespace.clone().unwrap_or_default(),
        name: service.metadata.name.clone().unwrap_or_default(),
        network_type: service.spec.network.type_,
        ports: service.spec.network.ports.clone(),
        target_ports: service.spec.network.target_ports.iter().map(|m| (m.port, m.target_port)).collect(),
        mesh_ip: status.mesh_ip,
        node: status.node,
        dns_name: status.dns_name,
        ready: status.conditions.iter().find(|c| c.type_ == READY).map(ConditionView::from),
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Small meshes for the renderers' tests.

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
    use k8s_openapi::jiff::Timestamp;
    use mesh_api::{
        Backend, MeshNode, MeshNodeSpec, MeshNodeStatus, MeshService, MeshServiceSpec, MeshServiceStatus, NetworkSpec,
        NetworkType, PeerEntry,
    };

    /// A condition.
    pub fn cond(type_: &str, status: bool, reason: &str, message: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: if status { "True" } else { "False" }.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: Some(1),
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
        }
    }

    /// A node with WireGuard, a key, a peer entry, Ready, and the given Connected.
    pub fn node(name: &str, i: u8, connected: Option<(bool, &str, &str)>) -> MeshNode {
        let key = format!("{:A<43}=", format!("key{i}"));
        let endpoint = format!("192.168.77.{i}:51820");
        let mut conditions = vec![cond("Ready", true, "PeerPublished", "mesh IP allocated and peer entry published")];
        if let Some((status, reason, message)) = connected {
            conditions.push(cond("Connected", status, reason, message));
        }
        let mut node = MeshNode::new(name, MeshNodeSpec::default());
        node.status = Some(MeshNodeStatus {
            mesh_ip: Some(format!("10.42.0.{i}")),
            public_key: Some(key.clone()),
            endpoint: Some(endpoint.clone()),
            listen_port: Some(51820),
            backend: Some(Backend::Userspace),
            peer: Some(PeerEntry {
                public_key: key,
                endpoint: Some(endpoint),
                allowed_ips: vec![format!("10.42.0.{i}/32")],
                persistent_keepalive: None,
            }),
            observed_generation: Some(1),
            conditions,
            ..MeshNodeStatus::default()
        });
        node
    }

    /// A node in fallback.
    pub fn fallback(name: &str, i: u8) -> MeshNode {
        let mut node = MeshNode::new(name, MeshNodeSpec::default());
        node.status = Some(MeshNodeStatus {
            mesh_ip: Some(format!("10.42.0.{i}")),
            endpoint: Some(format!("192.168.77.{i}:51820")),
            listen_port: Some(51820),
            backend: Some(Backend::None),
            conditions: vec![
                cond("Ready", false, "NoTunnel", "the agent runs without WireGuard"),
                cond(
                    "Connected",
                    false,
                    "NoTunnel",
                    "no /dev/net/tun; this node's services are reached at its host address",
                ),
            ],
            ..MeshNodeStatus::default()
        });
        node
    }

    /// A service hosted on `node`.
    pub fn service(ns: &str, name: &str, node: &str, ip: &str) -> MeshService {
        let mut s = MeshService::new(
            name,
            MeshServiceSpec {
                network: NetworkSpec { type_: NetworkType::Mesh, ports: vec![8000], target_ports: Vec::new() },
                selector: None,
                node: Some(node.into()),
                container: None,
                mesh_ip: None,
            },
        );
        s.metadata = ObjectMeta { name: Some(name.into()), namespace: Some(ns.into()), ..ObjectMeta::default() };
        s.status = Some(MeshServiceStatus {
            mesh_ip: Some(ip.into()),
            dns_name: Some(format!("{name}.{ns}.mesh.local")),
            node: Some(node.into()),
            observed_generation: Some(1),
            conditions: vec![cond("Ready", true, "Hosted", "ok")],
            ..MeshServiceStatus::default()
        });
        s
    }

    /// Three healthy nodes (n3 cannot reach n2), a fallback n4, two services.
    pub fn lab() -> (Vec<MeshNode>, Vec<MeshService>) {
        let all = (true, "AllPeersReachable", "2 of 2 peers reachable through the tunnel");
        let nodes = vec![
            node("hm-node-1", 1, Some(all)),
            node("hm-node-2", 2, Some(all)),
            node(
                "hm-node-3",
                3,
                Some((false, "PeersUnreachable", "1 of 2 peers reachable; not reachable: hm-node-2 (no handshake)")),
            ),
            fallback("hm-node-4", 4),
        ];
        let services = vec![
            service("default", "graph-node", "hm-node-2", "10.42.1.5"),
            service("web", "api", "hm-node-1", "10.42.1.6"),
        ];
        (nodes, services)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::fixtures::*;
    use super::*;

    fn view() -> MeshView {
        let (nodes, services) = lab();
        MeshView::build(&nodes, &services, Err("no leases"), Timestamp::UNIX_EPOCH)
    }

    fn state(v: &MeshView, from: &str, to: &str) -> LinkState {
        v.link(from, to).unwrap().state
    }

    #[test]
    fn the_matrix_follows_the_connected_conditions() {
        let v = view();
        assert_eq!(v.reachability.len(), 12, "every ordered pair of 4 nodes");
        assert_eq!(state(&v, "hm-node-1", "hm-node-2"), LinkState::Reachable);
        assert_eq!(state(&v, "hm-node-3", "hm-node-1"), LinkState::Reachable);
        assert_eq!(state(&v, "hm-node-3", "hm-node-2"), LinkState::Unreachable);
        assert_eq!(v.link("hm-node-3", "hm-node-2").unwrap().detail.as_deref(), Some("no handshake"));
        assert_eq!(state(&v, "hm-node-1", "hm-node-4"), LinkState::NoTunnel);
        assert_eq!(state(&v, "hm-node-4", "hm-node-1"), LinkState::NoTunnel);
        let edges = v.edges();
        assert_eq!(edges.len(), 6);
        let edge = |a: &str, b: &str| edges.iter().find(|e| e.a == a && e.b == b).unwrap().health;
        assert_eq!(edge("hm-node-1", "hm-node-2"), EdgeHealth::Up);
        assert_eq!(edge("hm-node-2", "hm-node-3"), EdgeHealth::Down);
        assert_eq!(edge("hm-node-1", "hm-node-4"), EdgeHealth::NoTunnel);
    }

    /// Alive Leases for `nodes`, each carrying `applied(name)`.
    fn leases(nodes: &[&str], applied: impl Fn(&str) -> Option<mesh_api::AppliedPeers>) -> BTreeMap<String, Lease> {
        nodes
            .iter()
            .map(|n| {
                let lease =
                    Lease { renewed: Some(Timestamp::UNIX_EPOCH), duration_secs: Some(40), applied: applied(n) };
                ((*n).to_owned(), lease)
            })
            .collect()
    }

    #[test]
    fn an_applied_peer_set_on_the_lease_that_differs_from_the_directory_is_pending() {
        let nodes = [node("n1", 1, None), node("n2", 2, None), node("n3", 3, None)];
        let names = ["n1", "n2", "n3"];
        // What each agent applies, computed as the agents do (mesh-plan, on the same objects).
        let directory = Directory::build(&nodes, &[], None, &ShortNames::Every, convert::literal_endpoint);
        let digest_of = |name: &str| {
            let status = nodes.iter().find(|n| convert::name(n) == name).unwrap().status.as_ref().unwrap();
            let key = mesh_wireguard::Key::from_base64(status.public_key.as_deref().unwrap()).unwrap();
            Directory::applied(&directory.peers(name, Some(&key)))
        };
        assert_eq!(digest_of("n1").count, 2);
        let converged = leases(&names, |n| Some(digest_of(n)));
        let v = MeshView::build(&nodes, &[], Ok(&converged), Timestamp::UNIX_EPOCH);
        for n in names {
            assert!(!v.node(n).unwrap().convergence.reasons.iter().any(|r| r.contains("digest")), "{n}: {v:?}");
        }

        let behind = leases(&names, |n| {
            if n == "n1" {
                Some(mesh_api::AppliedPeers { count: 1, digest: "0".repeat(16) })
            } else {
                Some(digest_of(n))
            }
        });
        let v = MeshView::build(&nodes, &[], Ok(&behind), Timestamp::UNIX_EPOCH);
        let n1 = &v.node("n1").unwrap().convergence;
        assert_eq!(n1.state, ConvergenceState::Pending);
        assert!(n1.reasons.iter().any(|r| r.contains("has applied 1 peer ") && r.contains("asks for 2")), "{n1:?}");
        assert!(!v.node("n2").unwrap().convergence.reasons.iter().any(|r| r.contains("digest")));

        // An old agent: a Lease without the annotation.
        let old = leases(&names, |n| (n != "n2").then(|| digest_of(n)));
        let v = MeshView::build(&nodes, &[], Ok(&old), Timestamp::UNIX_EPOCH);
        let n2 = &v.node("n2").unwrap().convergence;
        assert_eq!(n2.state, ConvergenceState::Pending);
        assert!(n2.reasons.iter().any(|r| r.contains("carries no applied peer set")), "{n2:?}");
    }

    #[test]
    fn a_fallback_node_needs_no_applied_peer_set() {
        let nodes = [node("n1", 1, None), fallback("n4", 4)];
        let v = MeshView::build(&nodes, &[], Ok(&leases(&["n1", "n4"], |_| None)), Timestamp::UNIX_EPOCH);
        assert_eq!(v.node("n4").unwrap().convergence.state, ConvergenceState::Fallback);
    }

    #[test]
    fn convergence_is_derived_from_what_the_api_holds() {
        let v = view();
        assert_eq!(v.convergence.converged, 3);
        assert_eq!(v.convergence.tunnel_nodes, 3);
        assert_eq!(v.convergence.fallback, vec!["hm-node-4"]);
        assert!(v.convergence.pending.is_empty());
        assert_eq!(v.node("hm-node-4").unwrap().convergence.state, ConvergenceState::Fallback);

        // A fifth node joins: the others still report 2 peers, so they have not applied it.
        let (mut nodes, services) = lab();
        nodes.push(node("hm-node-5", 5, None));
        let v = MeshView::build(&nodes, &services, Err("no leases"), Timestamp::UNIX_EPOCH);
        assert_eq!(v.convergence.converged, 0);
        let n1 = v.node("hm-node-1").unwrap();
        assert_eq!(n1.convergence.state, ConvergenceState::Pending);
        assert!(n1.convergence.reasons[0].contains("reports 2 peers, the directory has 3"), "{:?}", n1.convergence);
        assert_eq!(state(&v, "hm-node-1", "hm-node-5"), LinkState::Unknown);
        assert_eq!(state(&v, "hm-node-3", "hm-node-2"), LinkState::Unreachable, "a named peer stays unreachable");
        let n5 = v.node("hm-node-5").unwrap();
        assert!(n5.convergence.reasons[0].contains("not reported peer health"));

        // A node whose agent never published a key.
        let mut fresh = node("hm-node-6", 6, None);
        let status = fresh.status.as_mut().unwrap();
        status.public_key = None;
        status.peer = None;
        status.backend = None;
        let v = MeshView::build(&[fresh], &[], Err("no leases"), Timestamp::UNIX_EPOCH);
        assert!(v.nodes[0].convergence.reasons[0].contains("has not published a public key"));
    }

    #[test]
    fn a_stale_lease_makes_the_row_unknown() {
        let (nodes, services) = lab();
        let now = Timestamp::from_second(1_000).unwrap();
        let mut leases = BTreeMap::new();
        leases.insert(
            "hm-node-1".to_owned(),
            Lease { renewed: Some(Timestamp::UNIX_EPOCH), duration_secs: Some(40), applied: None },
        );
        leases.insert(
            "hm-node-2".to_owned(),
            Lease { renewed: Some(Timestamp::from_second(990).unwrap()), duration_secs: Some(40), applied: None },
        );
        let v = MeshView::build(&nodes, &services, Ok(&leases), now);
        assert_eq!(v.node("hm-node-1").unwrap().agent.state, AgentState::Stale);
        assert_eq!(v.node("hm-node-2").unwrap().agent.state, AgentState::Alive);
        assert_eq!(v.node("hm-node-2").unwrap().agent.seconds_since_renewal, Some(10));
        assert_eq!(v.node("hm-node-3").unwrap().agent.state, AgentState::Unknown);
        assert_eq!(state(&v, "hm-node-1", "hm-node-2"), LinkState::Unknown);
        assert_eq!(v.node("hm-node-1").unwrap().convergence.state, ConvergenceState::Pending);
        assert!(v.notes.is_empty());
    }

    #[test]
    fn more_than_five_down_leaves_the_unnamed_unknown() {
        let mut nodes: Vec<MeshNode> = (1..=8).map(|i| node(&format!("n{i}"), i, None)).collect();
        nodes[0].status.as_mut().unwrap().conditions.push(cond(
            "Connected",
            false,
            "NoPeerReachable",
            "0 of 7 peers reachable; not reachable: n2 (no handshake), n3 (no handshake), n4 (no handshake), \
             n5 (no handshake), n6 (no handshake) and 2 more",
        ));
        let v = MeshView::build(&nodes, &[], Err("no leases"), Timestamp::UNIX_EPOCH);
        assert_eq!(state(&v, "n1", "n2"), LinkState::Unreachable);
        assert_eq!(state(&v, "n1", "n7"), LinkState::Unknown);
        assert_eq!(v.node("n1").unwrap().convergence.state, ConvergenceState::Converged);
    }

    #[test]
    fn the_json_uses_the_api_field_names() {
        let json = serde_json::to_value(view()).unwrap();
        let n1 = &json["nodes"][0];
        assert_eq!(n1["name"], "hm-node-1");
        assert_eq!(n1["meshIP"], "10.42.0.1");
        assert_eq!(n1["backend"], "userspace");
        assert_eq!(n1["peer"]["allowedIPs"][0], "10.42.0.1/32");
        assert_eq!(n1["connected"]["peers"], 2);
        assert_eq!(n1["convergence"]["state"], "converged");
        assert_eq!(json["services"][0]["type"], "mesh");
        assert_eq!(json["reachability"][0]["state"], "reachable");
        assert_eq!(json["convergence"]["tunnelNodes"], 3);
    }
}
