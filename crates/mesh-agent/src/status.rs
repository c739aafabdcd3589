//! What the agent writes to the API: its part of `MeshNode.status` (public key, endpoint,
//! listen port, backend, the `Connected` condition), written with server-side apply under its
//! own field manager and only when it changed; and its liveness Lease, renewed on a timer, which
//! also carries the peer set the agent has applied (`mesh_api::APPLIED_PEERS_ANNOTATION`), so
//! status is never rewritten just to say "still alive" or "applied the new peers".
//!
//! [`Writer`] never writes what it last wrote: a sync triggered by a change compares with what
//! this agent last wrote successfully (the reflector's copy may lag behind its own write); the
//! periodic resync also compares with the reflector's copy, so that drift made by someone else
//! is repaired.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use mesh_api::conditions::{CONNECTED, CONTAINER_ENGINE, RELAYED, Want, merge, same};
use mesh_api::{AppliedPeers, Backend, ContainerBackend, MeshNode, MeshNodeStatus, RelayedPeer};
use mesh_dataplane::health::Summary;
use mesh_plan::relay::Paths;
use serde_json::json;

use crate::directory::Directory;
use crate::executor::StatusSink;

/// The field manager of everything the agent writes.
pub const FIELD_MANAGER: &str = "mesh-agent";

/// The agent's part of the MeshNode status.
#[derive(Clone, Debug, PartialEq)]
pub struct Published {
    /// Base64 public key; `None` in fallback (no tunnel, so no peer entry for this node).
    pub public_key: Option<String>,
    /// Effective endpoint, `host:port`.
    pub endpoint: Option<String>,
    /// Listen port.
    pub listen_port: u16,
    /// Which WireGuard runs.
    pub backend: Backend,
    /// Health of the peers, once probed.
    pub connected: Option<Summary>,
    /// How the node reaches the peers it has no direct path to (`None` in fallback).
    pub paths: Option<Paths>,
    /// The containers behind the services placed here (`status.containers`).
    pub containers: Vec<ContainerBackend>,
    /// The `ContainerEngine` condition, while some service placed here asks for a container.
    pub engine: Option<Want>,
}

/// How many peers a `Relayed` message names before it says "and N more".
const NAMED_IN_MESSAGE: usize = 20;

/// `items` joined by ", ", at most [`NAMED_IN_MESSAGE`] of them, then how many more.
fn bounded_list(items: impl ExactSizeIterator<Item = String>) -> String {
    // Only the named ones are formatted: a node can have 5,000 peers without a direct path.
    let more = items.len().saturating_sub(NAMED_IN_MESSAGE);
    let mut text = items.take(NAMED_IN_MESSAGE).collect::<Vec<_>>().join(", ");
    if more > 0 {
        text.push_str(&format!(" and {more} more"));
    }
    text
}

/// The `Relayed` condition of `paths`: True when some peer goes through a relay; False with
/// reason `NoRelay` when some peer has neither a direct path nor a relay, else `AllDirect`. The
/// message names peers and relays only, so it changes only when a path does.
pub fn relayed_condition(paths: &Paths) -> Want {
    let stranded = bounded_list(paths.stranded.iter().map(|(peer, why)| format!("{peer} ({why})")));
    if !paths.relayed.is_empty() {
        let relayed = bounded_list(paths.relayed.iter().map(|(peer, via)| format!("{peer} via {via}")));
        let mut message = format!(
            "reaches {} peer(s) through a relay, since no direct WireGuard handshake with them succeeds (both ends \
             behind NAT?): {relayed}; the direct path is retried every {} s and wins back once a handshake succeeds",
            paths.relayed.len(),
            mesh_plan::relay::RETRY_DIRECT_EVERY.as_secs()
        );
        if !stranded.is_empty() {
            message.push_str(&format!("; unreachable: {stranded}"));
        }
        Want::yes(RELAYED, "NoDirectPath", message)
    } else if !paths.stranded.is_empty() {
        Want::no(RELAYED, "NoRelay", format!("unreachable, directly or through a relay: {stranded}"))
    } else {
        Want::no(RELAYED, "AllDirect", "every peer is reached directly")
    }
}

/// `status.relayedPeers` of `paths`.
pub fn relayed_peers(paths: Option<&Paths>) -> Vec<RelayedPeer> {
    paths.map_or_else(Vec::new, |p| {
        p.relayed.iter().map(|(peer, via)| RelayedPeer { peer: peer.clone(), via: via.clone() }).collect()
    })
}

/// The agent's conditions (`Connected`, `Relayed`) of `current` after publishing `published`
/// (unchanged ones keep their transition time; one with nothing to say yet is kept as it is),
/// and whether they say what `current` says.
fn conditions(current: &MeshNodeStatus, published: &Published, generation: Option<i64>) -> (Vec<Condition>, bool) {
    let ours: Vec<Condition> = current
        .conditions
        .iter()
        .filter(|c| c.type_ == CONNECTED || c.type_ == RELAYED || c.type_ == CONTAINER_ENGINE)
        .cloned()
        .collect();
    let mut wants = Vec::new();
    let mut kept = Vec::new();
    match &published.connected {
        Some(summary) => wants.push(Want {
            type_: CONNECTED,
            status: summary.connected,
            reason: summary.reason,
            message: summary.message.clone(),
        }),
        None => kept.extend(ours.iter().filter(|c| c.type_ == CONNECTED).cloned()),
    }
    match &published.paths {
        Some(paths) => wants.push(relayed_condition(paths)),
        None => kept.extend(ours.iter().filter(|c| c.type_ == RELAYED).cloned()),
    }
    // Said only while some service here asks for a container; otherwise it goes.
    wants.extend(published.engine.clone());
    kept.extend(merge(&ours, &wants, generation));
    let same = same(&ours, &kept);
    (kept, same)
}

/// Whether `node`'s status already says exactly `published`.
pub fn shows(node: &MeshNode, published: &Published) -> bool {
    let current = node.status.clone().unwrap_or_default();
    let (_, same_conditions) = conditions(&current, published, node.metadata.generation);
    current.public_key == published.public_key
        && current.endpoint == published.endpoint
        && current.listen_port == Some(i32::from(published.listen_port))
        && current.backend == Some(published.backend)
        && current.relayed_peers == relayed_peers(published.paths.as_ref())
        && current.containers == published.containers
        && same_conditions
}

/// Writes `published` to the MeshNode `node` with server-side apply.
pub async fn write(client: &Client, node: &MeshNode, published: &Published) -> anyhow::Result<()> {
    let current = node.status.clone().unwrap_or_default();
    let (conditions, _) = conditions(&current, published, node.metadata.generation);
    let name = node.metadata.name.clone().unwrap_or_default();
    let status = MeshNodeStatus {
        public_key: published.public_key.clone(),
        endpoint: published.endpoint.clone(),
        listen_port: Some(i32::from(published.listen_port)),
        backend: Some(published.backend),
        relayed_peers: relayed_peers(published.paths.as_ref()),
        containers: published.containers.clone(),
        conditions,
        ..MeshNodeStatus::default()
    };
    let patch = json!({
        "apiVersion": format!("{}/{}", mesh_api::GROUP, mesh_api::VERSION),
        "kind": "MeshNode",
        "status": status,
    });
    Api::<MeshNode>::all(client.clone())
        .patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(|err| anyhow::anyhow!("writing the status of MeshNode {name}: {err}"))?;
    Ok(())
}

/// Whether `published` must be written, given what this agent last wrote successfully (`last`)
/// and the reflector's copy `node`: not when it last wrote exactly that (unless on a `resync`,
/// where the copy must show it too), nor when the copy already shows it.
pub fn needs_write(last: Option<&Published>, node: &MeshNode, published: &Published, resync: bool) -> bool {
    if last == Some(published) && !resync {
        return false;
    }
    !shows(node, published)
}

/// Writes one agent's status, never twice the same (see the module docs).
#[derive(Clone)]
pub struct Writer {
    client: Client,
    /// What this agent last wrote successfully.
    last: Option<Published>,
}

impl Writer {
    /// A writer that has written nothing yet.
    pub fn new(client: Client) -> Self {
        Self { client, last: None }
    }

    /// Writes `published` to `node` unless [`needs_write`] says no; returns whether it
    /// wrote. Remembers what it wrote only once the API accepted it.
    pub async fn publish(&mut self, node: &MeshNode, published: &Published, resync: bool) -> anyhow::Result<bool> {
        if !needs_write(self.last.as_ref(), node, published, resync) {
            // The copy shows it: a later change-triggered sync need not look again.
            self.last = Some(published.clone());
            return Ok(false);
        }
        write(&self.client, node, published).await?;
        self.last = Some(published.clone());
        Ok(true)
    }
}

/// The status of one node as the agent (and each simulated node) publishes it: its [`Writer`]
/// and the directory whose copy of the MeshNode it compares with.
pub struct NodeStatus {
    /// The node's MeshNode name.
    pub node: String,
    /// The writer.
    pub writer: Writer,
    /// The watched directory.
    pub directory: Directory,
}

impl StatusSink for NodeStatus {
    async fn publish(&mut self, published: &Published, resync: bool) -> anyhow::Result<bool> {
        let Some(me) = self.directory.node(&self.node) else {
            anyhow::bail!("MeshNode {} is not in the directory: its status cannot be written", self.node);
        };
        self.writer.publish(&me, published, resync).await
    }
}

/// The Lease that says this agent is alive: `mesh-agent-<node>`.
pub fn lease_name(node: &str) -> String {
    mesh_api::agent_lease_name(node)
}

/// Renews the liveness Lease (creating it on first use), with the applied peer set in its
/// [`mesh_api::APPLIED_PEERS_ANNOTATION`] (none yet: the annotation is left out).
pub async fn renew_lease(
    client: &Client,
    namespace: &str,
    node: &str,
    duration_secs: i32,
    applied: Option<&AppliedPeers>,
) -> anyhow::Result<()> {
    let name = lease_name(node);
    let annotations = applied.map(|a| [(mesh_api::APPLIED_PEERS_ANNOTATION.to_owned(), a.to_annotation())].into());
    let lease = Lease {
        metadata: kube::api::ObjectMeta { name: Some(name.clone()), annotations, ..Default::default() },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.to_owned()),
            lease_duration_seconds: Some(duration_secs),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..LeaseSpec::default()
        }),
    };
    let mut body = serde_json::to_value(&lease)?;
    body["apiVersion"] = json!("coordination.k8s.io/v1");
    body["kind"] = json!("Lease");
    Api::<Lease>::namespaced(client.clone(), namespace)
        .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body))
        .await
        .map_err(|err| anyhow::anyhow!("renewing Lease {namespace}/{name}: {err}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use mesh_api::MeshNodeSpec;

    use super::*;

    fn published(endpoint: &str) -> Published {
        Published {
            public_key: Some("k".into()),
            endpoint: Some(endpoint.into()),
            listen_port: 51820,
            backend: Backend::Userspace,
            connected: None,
            paths: None,
            containers: Vec::new(),
            engine: None,
        }
    }

    fn node_showing(p: Option<&Published>) -> MeshNode {
        let mut node = MeshNode::new("a", MeshNodeSpec::default());
        node.status = p.map(|p| MeshNodeStatus {
            public_key: p.public_key.clone(),
            endpoint: p.endpoint.clone(),
            listen_port: Some(i32::from(p.listen_port)),
            backend: Some(p.backend),
            ..MeshNodeStatus::default()
        });
        node
    }

    #[test]
    fn a_lagging_copy_does_not_make_a_change_triggered_sync_write_again() {
        let p = published("192.0.2.1:51820");
        let stale = node_showing(None);
        let last = Some(p.clone());
        assert!(!needs_write(last.as_ref(), &stale, &p, false), "it wrote this; the copy just has not caught up");
        assert!(needs_write(last.as_ref(), &stale, &p, true), "a resync repairs what the copy shows");
        assert!(!needs_write(last.as_ref(), &node_showing(Some(&p)), &p, true));
        let moved = published("192.0.2.2:51820");
        assert!(needs_write(last.as_ref(), &node_showing(Some(&p)), &moved, false), "a change is written");
        assert!(needs_write(None, &stale, &p, false), "nothing written yet");
        assert!(!needs_write(None, &node_showing(Some(&p)), &p, false), "the copy shows it already");
    }

    #[test]
    fn a_relayed_peer_is_published_and_the_condition_says_why() {
        let mut paths = Paths::default();
        let direct = relayed_condition(&paths);
        assert_eq!((direct.status, direct.reason), (false, "AllDirect"));
        paths.stranded.insert("nat-3".into(), "no direct handshake, and no member is a relay".into());
        let none = relayed_condition(&paths);
        assert_eq!((none.status, none.reason), (false, "NoRelay"));
        assert!(none.message.contains("nat-3 (no direct handshake, and no member is a relay)"), "{}", none.message);
        paths.stranded.clear();
        for i in 0..25 {
            paths.relayed.insert(format!("nat-{i:02}"), "relay".into());
        }
        let relayed = relayed_condition(&paths);
        assert_eq!((relayed.status, relayed.reason), (true, "NoDirectPath"));
        assert!(
            relayed.message.contains("nat-00 via relay")
                && relayed.message.ends_with("wins back once a handshake succeeds")
        );
        assert!(relayed.message.contains("and 5 more") && !relayed.message.contains("nat-24"), "{}", relayed.message);

        // Published: written when a path changes, not again after.
        let mut p = published("192.0.2.1:51820");
        p.paths = Some(paths.clone());
        let node = node_showing(Some(&published("192.0.2.1:51820")));
        assert!(!shows(&node, &p), "the relayed peers are not shown yet");
        let mut shown = node.clone();
        let status = shown.status.as_mut().unwrap();
        status.relayed_peers = relayed_peers(Some(&paths));
        status.conditions = conditions(&MeshNodeStatus::default(), &p, None).0;
        assert_eq!(status.relayed_peers.len(), 25);
        assert!(shows(&shown, &p));
    }
}
