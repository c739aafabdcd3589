//! What the agent writes to the API: its part of `MeshNode.status` (public key, endpoint,
//! listen port, backend, the `Connected` condition), written with server-side apply under its
//! own field manager and only when it changed; and its liveness Lease, renewed on a timer, so
//! status is never rewritten just to say "still alive".

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use mesh_api::conditions::{CONNECTED, Want, merge, same};
use mesh_api::{AppliedPeers, Backend, MeshNode, MeshNodeStatus};
use mesh_dataplane::health::Summary;
use serde_json::json;

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
    /// The peer set applied to the device, once applied.
    pub applied_peers: Option<AppliedPeers>,
}

/// Writes `published` to the MeshNode `node` unless its status already says exactly that.
/// Returns whether it wrote.
pub async fn publish(client: &Client, node: &MeshNode, published: &Published) -> anyhow::Result<bool> {
    let current = node.status.clone().unwrap_or_default();
    let current_connected: Vec<_> = current.conditions.iter().filter(|c| c.type_ == CONNECTED).cloned().collect();
    let conditions = match &published.connected {
        Some(summary) => {
            let want = Want {
                type_: CONNECTED,
                status: summary.connected,
                reason: summary.reason,
                message: summary.message.clone(),
            };
            merge(&current_connected, &[want], node.metadata.generation)
        }
        None => Vec::new(),
    };
    let unchanged = current.public_key == published.public_key
        && current.endpoint == published.endpoint
        && current.listen_port == Some(i32::from(published.listen_port))
        && current.backend == Some(published.backend)
        && (published.connected.is_none() || same(&current_connected, &conditions))
        && (published.applied_peers.is_none() || current.applied_peers == published.applied_peers);
    if unchanged {
        return Ok(false);
    }
    let name = node.metadata.name.clone().unwrap_or_default();
    let status = MeshNodeStatus {
        public_key: published.public_key.clone(),
        endpoint: published.endpoint.clone(),
        listen_port: Some(i32::from(published.listen_port)),
        backend: Some(published.backend),
        applied_peers: published.applied_peers.clone().or(current.applied_peers),
        conditions: if published.connected.is_some() { conditions } else { current_connected },
        ..MeshNodeStatus::default()
    };
    let patch = json!({
        "apiVersion": format!("{}/{}", mesh_api::GROUP, mesh_api::VERSION),
        "kind": "MeshNode",
        "status": status,
    });
    Api::<MeshNode>::all(client.clone())
        .patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await?;
    Ok(true)
}

/// The Lease that says this agent is alive: `mesh-agent-<node>`.
pub fn lease_name(node: &str) -> String {
    format!("mesh-agent-{node}")
}

/// Renews the liveness Lease (creating it on first use).
pub async fn renew_lease(client: &Client, namespace: &str, node: &str, duration_secs: i32) -> anyhow::Result<()> {
    let name = lease_name(node);
    let lease = Lease {
        metadata: kube::api::ObjectMeta { name: Some(name.clone()), ..Default::default() },
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
        .await?;
    Ok(())
}
