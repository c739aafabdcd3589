//! The MeshNode rules: its status (mesh IP, WireGuard peer entry, conditions) and the events
//! to publish, after the arbitration of what its agent wrote (see [`crate::judge`]):
//! - a public key that another MeshNode published first gets no peer entry (`KeyConflict`);
//! - a reported endpoint that does not parse, or (for a mirrored Kubernetes Node) whose host is
//!   none of the Node's addresses, does not go into the entry: the last endpoint that passed
//!   stays, else none (`EndpointRejected`); an admin's `spec.endpoint` overrides it;
//! - a Node whose pod CIDRs overlap the mesh subnet gets no mesh IP (`PodCIDROverlap`);
//! - an enrolled machine's MeshNode is never adopted by a Kubernetes Node of the same name
//!   (`NameCollision`).
//!
//! Also the mirror's decisions: whether a Kubernetes Node gets a MeshNode, and whether a
//! mirrored MeshNode outlived its Node.

use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use mesh_api::conditions::{ALLOCATED, CONNECTED, IP_CONFLICT, POOL_EXHAUSTED, READY, Want, merge};
use mesh_api::{Backend, MeshNode, MeshNodeStatus, PeerEntry};
use mesh_core::{IpamError, Subnet};

use super::index::{Index, claimant};
use super::service::RETRY_ALLOCATION;
use super::{Emit, On, has_reason, same_conditions};
use crate::caches::ENROLLED_VIA;
use crate::conditions::{ENDPOINT_REJECTED, KEY_CONFLICT, NAME_COLLISION, POD_CIDR_OVERLAP, refused};
use crate::judge;

/// The condition types this controller owns on a MeshNode (the agent owns the others).
pub const OWNED: [&str; 8] =
    [READY, ALLOCATED, IP_CONFLICT, POOL_EXHAUSTED, KEY_CONFLICT, ENDPOINT_REJECTED, NAME_COLLISION, POD_CIDR_OVERLAP];
/// How often a node that lost a key conflict looks again (the holder may go away or change
/// its key).
pub const KEY_CONFLICT_RECHECK: Duration = Duration::from_secs(30);
/// The Ready reason of a node whose agent runs without WireGuard.
pub const NO_TUNNEL: &str = "NoTunnel";

/// What the pool answered for the node's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeAllocation {
    /// The address is the node's.
    Granted(Ipv4Addr),
    /// The request was refused; the node keeps `kept`, the address it had.
    Refused {
        /// The address the node still holds.
        kept: Option<Ipv4Addr>,
        /// Why the request was refused.
        error: IpamError,
    },
    /// None was asked for: the Kubernetes Node's pod CIDRs (these) overlap the mesh subnet
    /// ([`pod_cidr_overlap`]), and any address it had is released.
    Withheld(Vec<String>),
}

/// What the MeshNode's status should be, and what follows from it.
#[derive(Clone, Debug, PartialEq)]
pub struct NodePlan {
    /// The fields of the status this controller owns (mesh IP, peer entry, its conditions).
    pub status: MeshNodeStatus,
    /// Whether they differ from what the object has (only then is it written).
    pub changed: bool,
    /// Events to publish once the status is written.
    pub events: Vec<Emit>,
    /// When to look again though nothing changes.
    pub retry: Option<Duration>,
}

/// The Kubernetes Node's pod CIDRs that overlap `subnet` (none: the node may have an address).
pub fn pod_cidr_overlap(name: &str, subnet: &Subnet, index: &Index) -> Vec<String> {
    let spec = index.k8s_node(name).and_then(|n| n.spec.as_ref());
    spec.map(|spec| judge::overlapping_pod_cidrs(subnet, spec.pod_cidrs.iter().flatten().chain(spec.pod_cidr.as_ref())))
        .unwrap_or_default()
}

/// The plan for `node` (see [`NodePlan`]).
pub fn plan(node: &MeshNode, allocation: &NodeAllocation, subnet: &Subnet, index: &Index) -> NodePlan {
    let name = node.name_any();
    let k8s_node = index.k8s_node(&name);
    let mut wants = Vec::new();
    let (ip, refusal) = match allocation {
        NodeAllocation::Granted(ip) => {
            wants.push(Want::yes(ALLOCATED, "Allocated", format!("mesh IP {ip} is allocated")));
            (Some(*ip), None)
        }
        NodeAllocation::Refused { kept, error } => {
            let (reason, refusal) = refused(error);
            wants.extend(refusal);
            (*kept, Some((reason, error.to_string())))
        }
        NodeAllocation::Withheld(overlap) => {
            // Its pods' addresses would be routed into the tunnel on every node.
            let message = format!(
                "the Kubernetes Node {name} has the pod CIDR(s) {} inside the mesh subnet {subnet}: mesh routes would \
                 capture its pods' traffic on every node, so it gets no mesh IP. Use a mesh subnet (--subnet, the \
                 chart's mesh.subnet) that no pod CIDR overlaps",
                overlap.join(", ")
            );
            wants.push(Want::no(ALLOCATED, POD_CIDR_OVERLAP, message.clone()));
            wants.push(Want::yes(POD_CIDR_OVERLAP, POD_CIDR_OVERLAP, message.clone()));
            (None, Some((POD_CIDR_OVERLAP, message)))
        }
    };

    let status = node.status.clone().unwrap_or_default();
    let fallback = status.backend == Some(Backend::None);
    let key_holder =
        status.public_key.as_deref().filter(|_| !fallback).and_then(|key| other_key_holder(node, key, index));
    let key_conflict = key_holder.map(|holder| {
        format!(
            "its public key is already published by MeshNode {holder}, which keeps it: this node gets no peer entry \
             until its agent publishes a key of its own (remove the agent's private key from its state directory and \
             restart it) or {holder} goes away"
        )
    });
    if let Some(message) = &key_conflict {
        wants.push(Want::yes(KEY_CONFLICT, KEY_CONFLICT, message.clone()));
    }
    let (endpoint, endpoint_refusal) = endpoint_of(node, &status, k8s_node);
    if let Some(refusal) = &endpoint_refusal {
        wants.push(Want::yes(ENDPOINT_REJECTED, refusal.reason, refusal.message.clone()));
    }
    let collision = name_collision(node, k8s_node);
    if let Some(message) = &collision {
        wants.push(Want::yes(NAME_COLLISION, NAME_COLLISION, message.clone()));
    }
    let peer = match (ip, &status.public_key) {
        // A node without WireGuard gets no peer entry: no other node tries to reach it through
        // the tunnel, and nothing else degrades.
        _ if fallback => None,
        // A copier gets none: agents would drop both peers with the same key.
        _ if key_conflict.is_some() => None,
        (Some(ip), Some(key)) => {
            let mut allowed = vec![format!("{ip}/32")];
            allowed.extend(index.service_ips_on(&name).into_iter().map(|ip| format!("{ip}/32")));
            Some(PeerEntry {
                public_key: key.clone(),
                endpoint,
                allowed_ips: allowed,
                persistent_keepalive: node.spec.persistent_keepalive.filter(|k| *k > 0),
            })
        }
        _ => None,
    };
    wants.push(match (&refusal, &peer, &key_conflict) {
        (Some((reason, message)), _, _) => Want::no(READY, reason, message.clone()),
        (None, _, Some(message)) => Want::no(READY, KEY_CONFLICT, message.clone()),
        (None, _, None) if fallback => Want::no(
            READY,
            NO_TUNNEL,
            "the agent runs without WireGuard (backend none; its Connected condition says why): the node stays \
             in the directory, its host and dual services are reached at its host address in the clear, and its \
             mesh services are not offered (not Ready, no DNS name)",
        ),
        (None, None, None) => Want::no(
            READY,
            "WaitingForAgent",
            "no WireGuard public key published yet: is mesh-agent running on this node?",
        ),
        (None, Some(_), None) => Want::yes(READY, "PeerPublished", "mesh IP allocated and peer entry published"),
    });

    let ours: Vec<Condition> =
        status.conditions.iter().filter(|c| OWNED.contains(&c.type_.as_str())).cloned().collect();
    let generation = node.metadata.generation;
    let conditions = merge(&ours, &wants, generation);
    let mesh_ip = ip.map(|ip| ip.to_string());
    let changed = status.mesh_ip != mesh_ip
        || status.peer != peer
        || status.observed_generation != generation
        || !same_conditions(&ours, &conditions);

    let mut events = Vec::new();
    if changed {
        // Falling out of the tunnel is an event, not only a condition: an operator watching
        // events learns that this node's mesh services are no longer offered.
        if has_reason(&conditions, READY, NO_TUNNEL) && !has_reason(&ours, READY, NO_TUNNEL) {
            let why = status
                .conditions
                .iter()
                .find(|c| c.type_ == CONNECTED)
                .map_or_else(|| "no reason given".to_owned(), |c| c.message.clone());
            events.push(Emit::warning(
                On::Object,
                NO_TUNNEL,
                "Fallback",
                format!("this node is out of the tunnel (backend none): {why}"),
            ));
        }
        if let Some((reason, message)) = &refusal
            && !ours.iter().any(|c| c.reason == *reason)
        {
            // A pod CIDR is the Node's business: the event goes there.
            let on = if *reason == POD_CIDR_OVERLAP && k8s_node.is_some() { On::KubernetesNode } else { On::Object };
            events.push(Emit::warning(on, *reason, "AllocateMeshIP", message.clone()));
        }
        if let Some(message) = key_conflict.clone()
            && !has_reason(&ours, KEY_CONFLICT, KEY_CONFLICT)
        {
            events.push(Emit::warning(On::Object, KEY_CONFLICT, "PublishPeer", message));
        }
        if let Some(refusal) = endpoint_refusal
            && !has_reason(&ours, ENDPOINT_REJECTED, refusal.reason)
        {
            events.push(Emit::warning(On::Object, refusal.reason, "PublishPeer", refusal.message));
        }
        if let Some(message) = collision
            && k8s_node.is_some()
            && !has_reason(&ours, NAME_COLLISION, NAME_COLLISION)
        {
            events.push(Emit::warning(On::KubernetesNode, NAME_COLLISION, "MirrorNode", message));
        }
    }
    let retry = match (&refusal, &key_conflict) {
        (Some(_), _) => Some(RETRY_ALLOCATION),
        (None, Some(_)) => Some(KEY_CONFLICT_RECHECK),
        (None, None) => None,
    };
    // Only the fields this controller owns; absent ones are dropped from its ownership, so a
    // peer entry disappears when the key does.
    let status =
        MeshNodeStatus { mesh_ip, peer, observed_generation: generation, conditions, ..MeshNodeStatus::default() };
    NodePlan { status, changed, events, retry }
}

/// The other MeshNode that keeps `key` when `node` publishes it too ([`judge::key_holder`]),
/// or `None` when `node` keeps it (or nobody else claims it).
pub fn other_key_holder(node: &MeshNode, key: &str, index: &Index) -> Option<String> {
    let name = node.name_any();
    let mut claimants = index.other_claimants(key, &name);
    if claimants.is_empty() {
        return None;
    }
    claimants.push(claimant(node, key));
    judge::key_holder(&claimants).filter(|holder| holder.name != name).map(|holder| holder.name.clone())
}

/// Whether the MeshNode mirrors a Kubernetes Node (an owner reference to one).
fn mirrored(node: &MeshNode) -> bool {
    node.owner_references().iter().any(|r| r.kind == "Node" && r.api_version == "v1")
}

/// The endpoint of `node`'s peer entry, and why the one its agent reported was refused: the
/// admin's `spec.endpoint` if set; else the reported one if [`judge::judge_endpoint`] accepts
/// it; else the entry's last endpoint if it still passes, else none.
pub fn endpoint_of(
    node: &MeshNode,
    status: &MeshNodeStatus,
    k8s_node: Option<&Node>,
) -> (Option<String>, Option<judge::Refusal>) {
    if let Some(admin) = &node.spec.endpoint {
        return (Some(admin.clone()), None);
    }
    let Some(reported) = &status.endpoint else { return (None, None) };
    let addresses: Option<Vec<String>> = mirrored(node).then(|| {
        let addresses = k8s_node.and_then(|n| n.status.as_ref()).and_then(|s| s.addresses.as_ref());
        addresses.into_iter().flatten().map(|a| a.address.clone()).collect()
    });
    match judge::judge_endpoint(reported, addresses.as_deref()) {
        Ok(endpoint) => (Some(endpoint), None),
        Err(refusal) => {
            let last = status.peer.as_ref().and_then(|p| p.endpoint.as_deref());
            let last_good = last.and_then(|e| judge::judge_endpoint(e, addresses.as_deref()).ok());
            (last_good, Some(refusal))
        }
    }
}

/// Why `node`, an enrolled machine's MeshNode, collides with the Kubernetes Node of the same
/// name (which the mirror then leaves alone); `None` when it does not.
pub fn name_collision(node: &MeshNode, k8s_node: Option<&Node>) -> Option<String> {
    let via = node.annotations().get(ENROLLED_VIA)?;
    let k8s_node = k8s_node?;
    let owned_by_it =
        node.owner_references().iter().any(|r| r.kind == "Node" && k8s_node.uid().as_deref() == Some(r.uid.as_str()));
    (!owned_by_it).then(|| {
        let name = node.name_any();
        format!(
            "a Kubernetes Node is named {name} like this MeshNode of a machine enrolled via {via}: the Node is not \
             mirrored into it, so the machine's agent stays its one writer, and the Node gets no MeshNode (nor its \
             agent a peer). Rename one of them: unenroll the machine (meshctl unenroll {name}) and enroll it under \
             another name, or join the node under another name"
        )
    })
}

/// Whether `node` mirrors a Kubernetes Node (owner reference) that no longer exists, or that
/// was replaced by another of the same name (another uid): then it is deleted.
pub fn outlived_its_node(node: &MeshNode, index: &Index) -> bool {
    let Some(owner) = node.owner_references().iter().find(|r| r.kind == "Node" && r.api_version == "v1") else {
        return false;
    };
    index.k8s_node(&owner.name).is_none_or(|n| n.uid().as_deref() != Some(owner.uid.as_str()))
}

/// What the mirror does for a Kubernetes Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mirror {
    /// Nothing: it is being deleted, has no uid, or its MeshNode already carries its owner
    /// reference.
    Nothing,
    /// Nothing, and say so: an enrolled machine's MeshNode has its name (its reconcile reports
    /// the collision).
    Collision,
    /// Apply the MeshNode `{name, ownerReferences: [this Node]}` with this uid.
    Apply {
        /// The Node's uid.
        uid: String,
    },
}

/// What the mirror does for `node`, given the MeshNode of its name (`existing`).
pub fn mirror(node: &Node, existing: Option<&MeshNode>) -> Mirror {
    let Some(uid) = node.uid() else { return Mirror::Nothing };
    if node.metadata.deletion_timestamp.is_some()
        || existing.is_some_and(|mn| mn.owner_references().iter().any(|r| r.kind == "Node" && r.uid == uid))
    {
        return Mirror::Nothing;
    }
    if existing.is_some_and(|mn| mn.annotations().contains_key(ENROLLED_VIA)) {
        return Mirror::Collision;
    }
    Mirror::Apply { uid }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mesh_core::Owner;
    use serde_json::json;

    use super::*;
    use crate::judge::{INVALID_ENDPOINT, NOT_A_NODE_ADDRESS};
    use crate::rules::fixtures::{aged, agent_node, condition, k8s_node, mesh_node};
    use crate::rules::index::Hosted;

    fn subnet() -> Subnet {
        "10.42.0.0/16".parse().expect("a subnet")
    }

    fn granted(text: &str) -> NodeAllocation {
        NodeAllocation::Granted(text.parse().expect("an IPv4 address"))
    }

    fn cond(plan: &NodePlan, type_: &str) -> (String, String, String) {
        condition(&plan.status.conditions, type_).unwrap_or_else(|| panic!("no {type_} condition"))
    }

    fn host(index: &mut Index, service: &str, node: &str, ip: &str) {
        let hosted = Hosted { node: node.into(), ip: ip.parse().expect("an IPv4 address") };
        index.set_hosting(&Owner::service("default", service), Some(hosted));
    }

    #[test]
    fn the_peer_entry_allows_the_node_ip_and_the_service_ips_it_hosts_sorted() {
        let mut index = Index::new();
        let node = agent_node("n1", Some("k1"));
        index.apply_mesh_node(node.clone());
        host(&mut index, "b", "n1", "10.42.0.20");
        host(&mut index, "a", "n1", "10.42.0.3");
        host(&mut index, "elsewhere", "n2", "10.42.0.4");
        let plan = plan(&node, &granted("10.42.255.1"), &subnet(), &index);
        let peer = plan.status.peer.as_ref().expect("a peer entry");
        assert_eq!(peer.public_key, "k1");
        assert_eq!(peer.allowed_ips, ["10.42.255.1/32", "10.42.0.3/32", "10.42.0.20/32"]);
        assert_eq!(plan.status.mesh_ip.as_deref(), Some("10.42.255.1"));
        assert_eq!(
            cond(&plan, READY),
            ("True".into(), "PeerPublished".into(), "mesh IP allocated and peer entry published".into())
        );
        assert!(plan.changed && plan.events.is_empty() && plan.retry.is_none());
        // A service moving away leaves the entry.
        index.set_hosting(&Owner::service("default", "b"), None);
        let plan = super::plan(&node, &granted("10.42.255.1"), &subnet(), &index);
        assert_eq!(plan.status.peer.expect("a peer").allowed_ips, ["10.42.255.1/32", "10.42.0.3/32"]);
    }

    #[test]
    fn without_a_key_there_is_no_entry_yet() {
        let node = agent_node("n1", None);
        let plan = plan(&node, &granted("10.42.255.1"), &subnet(), &Index::new());
        assert_eq!(plan.status.peer, None);
        assert_eq!(cond(&plan, READY).1, "WaitingForAgent");
    }

    #[test]
    fn a_node_without_wireguard_gets_no_entry_and_an_event_with_the_agents_reason() {
        let status = json!({"publicKey": "k1", "backend": "none", "conditions": [{"type": CONNECTED, "status": "False",
            "reason": "NoWireGuard", "message": "wireguard module missing", "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
        let node = mesh_node("n1", 1, json!({}), json!({}), status);
        let plan = plan(&node, &granted("10.42.255.1"), &subnet(), &Index::new());
        assert_eq!(plan.status.peer, None);
        assert_eq!(cond(&plan, READY).1, NO_TUNNEL);
        assert_eq!(plan.events.len(), 1);
        assert_eq!((plan.events[0].action, plan.events[0].on), ("Fallback", On::Object));
        assert!(plan.events[0].note.contains("wireguard module missing"));
        assert!(
            condition(&plan.status.conditions, CONNECTED).is_none(),
            "the agent's conditions are not ours to write"
        );
    }

    #[test]
    fn a_copied_key_loses_to_the_older_claimant_and_rechecks() {
        let mut index = Index::new();
        let owner = mesh_node("owner", 100, json!({}), json!({}), json!({"publicKey": "k", "backend": "kernel"}));
        let copier = mesh_node("copier", 200, json!({}), json!({}), json!({"publicKey": "k", "backend": "kernel"}));
        index.apply_mesh_node(owner.clone());
        index.apply_mesh_node(copier.clone());
        let plan = plan(&copier, &granted("10.42.255.2"), &subnet(), &index);
        assert_eq!(plan.status.peer, None);
        let (status, reason, message) = cond(&plan, KEY_CONFLICT);
        assert_eq!((status.as_str(), reason.as_str()), ("True", KEY_CONFLICT));
        assert!(message.contains("MeshNode owner"), "{message}");
        assert_eq!(cond(&plan, READY).1, KEY_CONFLICT);
        assert_eq!(plan.retry, Some(KEY_CONFLICT_RECHECK));
        assert_eq!(plan.events.iter().map(|e| e.reason.as_str()).collect::<Vec<_>>(), [KEY_CONFLICT]);
        let kept = super::plan(&owner, &granted("10.42.255.1"), &subnet(), &index);
        assert!(kept.status.peer.is_some() && condition(&kept.status.conditions, KEY_CONFLICT).is_none());
        // The holder goes away: the other one gets its entry.
        index.delete_mesh_node("owner");
        assert!(super::plan(&copier, &granted("10.42.255.2"), &subnet(), &index).status.peer.is_some());
    }

    #[test]
    fn the_claimant_already_in_the_entry_keeps_the_key_even_if_younger() {
        let mut index = Index::new();
        let holder = mesh_node(
            "young",
            300,
            json!({}),
            json!({}),
            json!({"publicKey": "k", "backend": "kernel", "peer": {"publicKey": "k", "allowedIPs": ["10.42.255.1/32"]}}),
        );
        let old = mesh_node("old", 100, json!({}), json!({}), json!({"publicKey": "k", "backend": "kernel"}));
        index.apply_mesh_node(holder.clone());
        index.apply_mesh_node(old.clone());
        assert!(
            cond(&plan(&old, &granted("10.42.255.2"), &subnet(), &index), KEY_CONFLICT).2.contains("MeshNode young")
        );
        assert!(plan(&holder, &granted("10.42.255.1"), &subnet(), &index).status.peer.is_some());
        // A claimant without WireGuard claims nothing.
        let mut index = Index::new();
        index.apply_mesh_node(mesh_node("off", 1, json!({}), json!({}), json!({"publicKey": "k", "backend": "none"})));
        assert!(plan(&old, &granted("10.42.255.2"), &subnet(), &index).status.peer.is_some());
    }

    fn mirrored(name: &str, uid: &str, endpoint: &str, last: Option<&str>) -> Arc<MeshNode> {
        let owner = json!({"ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}]});
        let peer = last.map(|e| json!({"publicKey": "k1", "endpoint": e, "allowedIPs": ["10.42.255.1/32"]}));
        mesh_node(
            name,
            1,
            owner,
            json!({}),
            json!({"publicKey": "k1", "backend": "kernel", "endpoint": endpoint, "peer": peer}),
        )
    }

    #[test]
    fn an_endpoint_that_is_not_the_nodes_address_is_refused_and_the_last_good_one_stays() {
        let mut index = Index::new();
        index.apply_k8s_node(k8s_node("n1", "u1", json!({}), &[], &["192.168.7.5"]));
        let node = mirrored("n1", "u1", "203.0.113.9:51820", Some("192.168.7.5:51820"));
        let plan = plan(&node, &granted("10.42.255.1"), &subnet(), &index);
        assert_eq!(plan.status.peer.as_ref().and_then(|p| p.endpoint.as_deref()), Some("192.168.7.5:51820"));
        let (status, reason, message) = cond(&plan, ENDPOINT_REJECTED);
        assert_eq!((status.as_str(), reason.as_str()), ("True", NOT_A_NODE_ADDRESS));
        assert!(message.contains("[192.168.7.5]"), "{message}");
        assert_eq!(
            plan.events.iter().map(|e| (e.reason.as_str(), e.action)).collect::<Vec<_>>(),
            [(NOT_A_NODE_ADDRESS, "PublishPeer")]
        );
        assert_eq!(cond(&plan, READY).0, "True", "the node stays a peer");
        // A good one goes in, and the condition goes away.
        let fixed = mirrored("n1", "u1", "192.168.7.5:51821", Some("192.168.7.5:51820"));
        let plan = super::plan(&fixed, &granted("10.42.255.1"), &subnet(), &index);
        assert_eq!(plan.status.peer.and_then(|p| p.endpoint).as_deref(), Some("192.168.7.5:51821"));
        assert!(condition(&plan.status.conditions, ENDPOINT_REJECTED).is_none());
    }

    #[test]
    fn a_garbled_endpoint_is_refused_and_an_admin_endpoint_overrides_the_agent() {
        let node = mesh_node("m", 1, json!({}), json!({}), json!({"publicKey": "k1", "endpoint": "not an endpoint"}));
        let plan = plan(&node, &granted("10.42.255.1"), &subnet(), &Index::new());
        assert_eq!(cond(&plan, ENDPOINT_REJECTED).1, INVALID_ENDPOINT);
        assert_eq!(plan.status.peer.and_then(|p| p.endpoint), None);
        let admin = mesh_node(
            "m",
            1,
            json!({}),
            json!({"endpoint": "vpn.example:51820"}),
            json!({"publicKey": "k1", "endpoint": "not an endpoint"}),
        );
        let plan = super::plan(&admin, &granted("10.42.255.1"), &subnet(), &Index::new());
        assert_eq!(plan.status.peer.and_then(|p| p.endpoint).as_deref(), Some("vpn.example:51820"));
        assert!(condition(&plan.status.conditions, ENDPOINT_REJECTED).is_none());
    }

    #[test]
    fn an_enrolled_machine_named_like_a_kubernetes_node_collides_and_the_node_hears_of_it() {
        let mut index = Index::new();
        index.apply_k8s_node(k8s_node("box", "u1", json!({}), &[], &[]));
        let enrolled = mesh_node(
            "box",
            1,
            json!({"annotations": {ENROLLED_VIA: "ssh://root@box:22"}}),
            json!({}),
            json!({"publicKey": "k1"}),
        );
        let plan = plan(&enrolled, &granted("10.42.255.1"), &subnet(), &index);
        let message = cond(&plan, NAME_COLLISION).2;
        assert!(message.contains("ssh://root@box:22") && message.contains("meshctl unenroll box"), "{message}");
        assert_eq!(
            plan.events.iter().map(|e| (e.on, e.action)).collect::<Vec<_>>(),
            [(On::KubernetesNode, "MirrorNode")]
        );
        assert!(plan.status.peer.is_some(), "the machine keeps its own entry");
        assert_eq!(mirror(index.k8s_node("box").expect("a node"), Some(&enrolled)), Mirror::Collision);
        // No Kubernetes Node of that name: no collision.
        assert!(name_collision(&enrolled, None).is_none());
    }

    #[test]
    fn a_pod_cidr_inside_the_mesh_subnet_withholds_the_address_and_tells_the_node() {
        let mut index = Index::new();
        index.apply_k8s_node(k8s_node("n1", "u1", json!({}), &["10.244.1.0/24", "10.42.3.0/24"], &[]));
        index.apply_k8s_node(k8s_node("n2", "u2", json!({}), &["10.244.2.0/24"], &[]));
        assert_eq!(pod_cidr_overlap("n1", &subnet(), &index), ["10.42.3.0/24"]);
        assert!(pod_cidr_overlap("n2", &subnet(), &index).is_empty());
        assert!(pod_cidr_overlap("unknown", &subnet(), &index).is_empty());
        let node = agent_node("n1", Some("k1"));
        let plan = plan(&node, &NodeAllocation::Withheld(vec!["10.42.3.0/24".into()]), &subnet(), &index);
        assert_eq!((plan.status.mesh_ip.as_ref(), plan.status.peer.as_ref()), (None, None));
        assert_eq!(cond(&plan, ALLOCATED).1, POD_CIDR_OVERLAP);
        assert_eq!(cond(&plan, POD_CIDR_OVERLAP).0, "True");
        assert!(cond(&plan, READY).2.contains("10.42.3.0/24 inside the mesh subnet 10.42.0.0/16"));
        assert_eq!(
            plan.events.iter().map(|e| (e.on, e.reason.as_str())).collect::<Vec<_>>(),
            [(On::KubernetesNode, POD_CIDR_OVERLAP)]
        );
        assert_eq!(plan.retry, Some(RETRY_ALLOCATION));
    }

    #[test]
    fn an_exhausted_pool_is_reported_on_the_mesh_node() {
        let node = agent_node("n1", Some("k1"));
        let error = IpamError::Exhausted { subnet: subnet(), used: 65534 };
        let plan = plan(&node, &NodeAllocation::Refused { kept: None, error }, &subnet(), &Index::new());
        assert_eq!(cond(&plan, POOL_EXHAUSTED).0, "True");
        assert_eq!(plan.status.peer, None);
        assert_eq!(
            plan.events.iter().map(|e| (e.on, e.reason.as_str())).collect::<Vec<_>>(),
            [(On::Object, "PoolExhausted")]
        );
    }

    #[test]
    fn nothing_new_means_no_write_whatever_the_agent_wrote_beside() {
        let mut index = Index::new();
        let node = agent_node("n1", Some("k1"));
        host(&mut index, "a", "n1", "10.42.0.3");
        let first = plan(&node, &granted("10.42.255.1"), &subnet(), &index);
        let mut stored = (*node).clone();
        let status = stored.status.as_mut().expect("a status");
        status.mesh_ip = first.status.mesh_ip.clone();
        status.peer = first.status.peer.clone();
        status.observed_generation = first.status.observed_generation;
        status.conditions = aged(first.status.conditions.clone(), 500);
        // The agent's own condition sits among ours.
        let mut connected = status.conditions[0].clone();
        connected.type_ = CONNECTED.into();
        status.conditions.insert(0, connected);
        let again = plan(&stored, &granted("10.42.255.1"), &subnet(), &index);
        assert!(!again.changed && again.events.is_empty(), "{:?}", again.status);
        // A new hosted service changes the entry: one write.
        host(&mut index, "b", "n1", "10.42.0.4");
        assert!(plan(&stored, &granted("10.42.255.1"), &subnet(), &index).changed);
    }

    #[test]
    fn a_mirrored_mesh_node_outlives_neither_its_node_nor_a_replacement() {
        let mut index = Index::new();
        let node = mirrored("n1", "u1", "192.168.7.5:51820", None);
        assert!(outlived_its_node(&node, &index), "no Node");
        index.apply_k8s_node(k8s_node("n1", "u1", json!({}), &[], &[]));
        assert!(!outlived_its_node(&node, &index));
        index.apply_k8s_node(k8s_node("n1", "u2", json!({}), &[], &[]));
        assert!(outlived_its_node(&node, &index), "a new Node of the same name");
        assert!(!outlived_its_node(&agent_node("m", None), &index), "not mirrored");
    }

    #[test]
    fn the_mirror_applies_a_mesh_node_only_where_it_has_none_of_its_own() {
        let k8s = k8s_node("n1", "u1", json!({}), &[], &[]);
        assert_eq!(mirror(&k8s, None), Mirror::Apply { uid: "u1".into() });
        assert_eq!(mirror(&k8s, Some(&agent_node("n1", None))), Mirror::Apply { uid: "u1".into() });
        assert_eq!(mirror(&k8s, Some(&mirrored("n1", "u1", "1.2.3.4:1", None))), Mirror::Nothing);
        assert_eq!(mirror(&k8s, Some(&mirrored("n1", "old", "1.2.3.4:1", None))), Mirror::Apply { uid: "u1".into() });
        let mut going = (*k8s).clone();
        going.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(mirror(&going, None), Mirror::Nothing);
    }
}
