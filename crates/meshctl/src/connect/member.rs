//! The Kubernetes side of an ephemeral member: who the user is, its MeshNode (marked with
//! [`CONNECT_OWNER_ANNOTATION`]), the agent fields of its status, its liveness Lease, the
//! MeshServices it exposes, and their removal on exit. What a killed process leaves behind,
//! mesh-controller collects once the Lease lapses (`controller/src/ephemeral.rs`).

use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use mesh_api::{AppliedPeers, CONNECT_OWNER_ANNOTATION, MeshNode, MeshService};
use serde_json::json;

use super::args::QualifiedName;

/// How long the Lease lasts without renewal, as the agents' do.
pub const LEASE_SECONDS: i32 = 30;
/// How often the Lease is renewed.
pub const RENEW_EVERY: Duration = Duration::from_secs(10);
/// The field manager of every write.
const MANAGER: &str = "meshctl-connect";

/// The cluster objects of one ephemeral member.
pub struct Member {
    /// The MeshNode name.
    pub name: String,
    /// The Kubernetes user name, the objects' owner.
    pub owner: String,
    nodes: Api<MeshNode>,
    leases: Api<Lease>,
    client: Client,
}

/// The user name the API server sees for this client (a SelfSubjectReview).
pub async fn whoami(client: &Client) -> anyhow::Result<String> {
    let review: SelfSubjectReview = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview", "metadata": {}
    }))?;
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    let answer = api
        .create(&PostParams::default(), &review)
        .await
        .context("asking the API server who this kubeconfig's user is (SelfSubjectReview)")?;
    answer
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .filter(|u| !u.is_empty())
        .context("the API server's SelfSubjectReview names no user: is this kubeconfig anonymous?")
}

impl Member {
    /// Creates the MeshNode `name`, owned by `owner`, accepting services of `namespaces`.
    /// Refuses a name that is taken, saying by whom.
    pub async fn create(
        client: &Client,
        mesh_namespace: &str,
        name: &str,
        owner: &str,
        namespaces: &[String],
    ) -> anyhow::Result<Self> {
        let nodes: Api<MeshNode> = Api::all(client.clone());
        let node: MeshNode = serde_json::from_value(json!({
            "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode",
            "metadata": {"name": name, "annotations": {CONNECT_OWNER_ANNOTATION: owner},
                         "labels": {"app.kubernetes.io/managed-by": "meshctl"}},
            "spec": {"serviceNamespaces": namespaces},
        }))?;
        match nodes.create(&PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let holder = nodes.get_opt(name).await.ok().flatten();
                let owner_of = holder.as_ref().and_then(|n| n.annotations().get(CONNECT_OWNER_ANNOTATION).cloned());
                match owner_of {
                    Some(o) => bail!(
                        "MeshNode {name} exists, made by meshctl connect for {o}: another session uses the name, \
                         or a killed one has not been collected yet (within {} s); choose another --name",
                        LEASE_SECONDS + mesh_api::EPHEMERAL_GRACE_SECONDS as i32 + 10
                    ),
                    None => bail!("MeshNode {name} exists and is a node of the mesh: choose another --name"),
                }
            }
            Err(err) => return Err(err).with_context(|| format!("creating MeshNode {name} as {owner}")),
        }
        Ok(Self {
            name: name.to_owned(),
            owner: owner.to_owned(),
            nodes,
            leases: Api::namespaced(client.clone(), mesh_namespace),
            client: client.clone(),
        })
    }

    /// Publishes the agent's fields of the status: public key, endpoint, port, backend.
    pub async fn publish(&self, public_key: &str, endpoint: Option<&str>, listen_port: u16) -> anyhow::Result<()> {
        let status = json!({"status": {
            "publicKey": public_key, "endpoint": endpoint, "listenPort": listen_port, "backend": "userspace"
        }});
        self.nodes
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .with_context(|| format!("publishing the public key and endpoint of MeshNode {}", self.name))?;
        Ok(())
    }

    /// Creates or renews the Lease `mesh-agent-<name>`, held by the owner, with the applied
    /// peer set in its annotation (what `meshctl status` shows as convergence).
    pub async fn renew(&self, applied: Option<&AppliedPeers>) -> anyhow::Result<()> {
        let lease_name = mesh_api::agent_lease_name(&self.name);
        let now = Timestamp::now();
        let annotations = applied.map(|a| json!({mesh_api::APPLIED_PEERS_ANNOTATION: a.to_annotation()}));
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": lease_name, "annotations": annotations},
            "spec": {"holderIdentity": self.owner, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": MicroTime(now)},
        });
        let params = PatchParams::apply(MANAGER).force();
        self.leases
            .patch(&lease_name, &params, &Patch::Apply(&lease))
            .await
            .with_context(|| format!("renewing Lease {lease_name}"))?;
        Ok(())
    }

    /// The MeshNode as it is now.
    pub async fn node(&self) -> anyhow::Result<MeshNode> {
        self.nodes.get(&self.name).await.with_context(|| format!("reading MeshNode {}", self.name))
    }

    /// Waits until the controller has given the node a mesh IP and a peer entry.
    pub async fn wait_joined(&self, within: Duration) -> anyhow::Result<std::net::Ipv4Addr> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let node = self.node().await?;
            let status = node.status.as_ref();
            let ip = status.and_then(|s| s.mesh_ip.as_deref()).and_then(|ip| ip.parse().ok());
            if let (Some(ip), Some(_)) = (ip, status.and_then(|s| s.peer.as_ref())) {
                return Ok(ip);
            }
            if tokio::time::Instant::now() >= deadline {
                let why = status
                    .into_iter()
                    .flat_map(|s| &s.conditions)
                    .filter(|c| c.status != "True" || c.type_ == "Ready")
                    .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                bail!(
                    "MeshNode {} has no mesh IP and peer entry after {}s: is mesh-controller running? {}",
                    self.name,
                    within.as_secs(),
                    if why.is_empty() { "(no conditions)".to_owned() } else { why }
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Creates (or takes back) the MeshService `service`, placed on this node, on `port`.
    pub async fn expose(&self, service: &QualifiedName, port: u16) -> anyhow::Result<()> {
        let api: Api<MeshService> = Api::namespaced(self.client.clone(), &service.namespace);
        let object = json!({
            "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshService",
            "metadata": {"name": service.name, "annotations": {CONNECT_OWNER_ANNOTATION: self.owner},
                         "labels": {"app.kubernetes.io/managed-by": "meshctl"}},
            "spec": {"node": self.name, "network": {"type": "mesh", "ports": [port]}},
        });
        let object: MeshService = serde_json::from_value(object)?;
        match api.create(&PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &object).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => bail!(
                "MeshService {service} exists already: choose another name with --as NAME[.NAMESPACE], or delete it"
            ),
            Err(kube::Error::Api(e)) if e.code == 403 => bail!(
                "not allowed to create MeshService {service} as {}: {} (exposing needs the chart's \
                 <release>-connect-expose role in namespace {})",
                self.owner,
                e.message,
                service.namespace
            ),
            Err(err) => Err(err).with_context(|| format!("creating MeshService {service}")),
        }
    }

    /// Deletes the exposed services, the MeshNode and the Lease; reports what it could not.
    pub async fn leave(&self, exposed: &[QualifiedName]) -> anyhow::Result<()> {
        let mut failed = Vec::new();
        for service in exposed {
            let api: Api<MeshService> = Api::namespaced(self.client.clone(), &service.namespace);
            if let Err(err) = gone(api.delete(&service.name, &DeleteParams::default()).await) {
                failed.push(format!("MeshService {service}: {err}"));
            }
        }
        if let Err(err) = gone(self.nodes.delete(&self.name, &DeleteParams::default()).await) {
            failed.push(format!("MeshNode {}: {err}", self.name));
        }
        let lease = mesh_api::agent_lease_name(&self.name);
        if let Err(err) = gone(self.leases.delete(&lease, &DeleteParams::default()).await) {
            failed.push(format!("Lease {lease}: {err}"));
        }
        if failed.is_empty() {
            Ok(())
        } else {
            bail!("could not delete {} (mesh-controller collects them once the Lease lapses)", failed.join("; "))
        }
    }
}

/// A delete's result, with "already gone" as success.
fn gone<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(err) => Err(err),
    }
}
