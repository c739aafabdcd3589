//! The reads `status`, `graph` and `showconf` make (MeshNodes, MeshServices, the agents'
//! Leases), and their errors turned into what a person should do (no cluster, CRDs not
//! installed, RBAC denied, bad credentials). The connection itself is [`crate::kubeconfig`]'s.

use std::collections::BTreeMap;

use anyhow::anyhow;
use k8s_openapi::api::coordination::v1::Lease as KubeLease;
use kube::Client;
use kube::api::{Api, ListParams};
use mesh_api::{MeshNode, MeshService};

use crate::kubeconfig::{self, ClusterArgs};
use crate::model::Lease;
use crate::util::chain;

/// The prefix of the agents' liveness Leases: `mesh-agent-<node>`.
const LEASE_PREFIX: &str = "mesh-agent-";

/// A connection to the cluster.
pub struct Cluster {
    client: Client,
    /// `https://host:port (context NAME)`, for messages.
    target: String,
    /// The namespace harness-mesh is installed in, where the agents' Leases are.
    mesh_namespace: String,
}

impl Cluster {
    /// Connects with [`crate::kubeconfig::connect`] (the kubeconfig read as kubectl reads it);
    /// the agents' Leases are read in `--mesh-namespace`.
    pub async fn connect(args: &ClusterArgs) -> anyhow::Result<Self> {
        let connection = kubeconfig::connect(args).await?;
        let target = connection.target();
        Ok(Self { client: connection.client, target, mesh_namespace: args.mesh_namespace.clone() })
    }

    /// Every MeshNode.
    pub async fn nodes(&self) -> anyhow::Result<Vec<MeshNode>> {
        let api: Api<MeshNode> = Api::all(self.client.clone());
        api.list(&ListParams::default())
            .await
            .map(|list| list.items)
            .map_err(|err| explain(&self.target, &err, "meshnodes"))
    }

    /// Every MeshService, or those of `namespace`.
    pub async fn services(&self, namespace: Option<&str>) -> anyhow::Result<Vec<MeshService>> {
        let api: Api<MeshService> = match namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        api.list(&ListParams::default())
            .await
            .map(|list| list.items)
            .map_err(|err| explain(&self.target, &err, "meshservices"))
    }

    /// The agents' liveness Leases (`mesh-agent-<node>` in the mesh namespace, nowhere else: a
    /// Lease of that name in a tenant's namespace says nothing about an agent), by node; `Err`
    /// says why they could not be read (their absence is not an error).
    pub async fn agent_leases(&self) -> Result<BTreeMap<String, Lease>, String> {
        let namespace = &self.mesh_namespace;
        let api: Api<KubeLease> = Api::namespaced(self.client.clone(), namespace);
        let list = api.list(&ListParams::default()).await.map_err(|err| match &err {
            kube::Error::Api(status) if status.code == 403 => {
                format!(
                    "agent liveness unknown: not allowed to list leases.coordination.k8s.io in namespace {namespace}"
                )
            }
            _ => format!("agent liveness unknown: cannot list Leases in namespace {namespace}: {}", chain(&err)),
        })?;
        let mut out: BTreeMap<String, Lease> = BTreeMap::new();
        for lease in list.items {
            let Some(node) = lease.metadata.name.as_deref().and_then(|n| n.strip_prefix(LEASE_PREFIX)) else {
                continue;
            };
            let spec = lease.spec.unwrap_or_default();
            let found = Lease {
                renewed: spec.renew_time.map(|t| t.0).or(spec.acquire_time.map(|t| t.0)),
                duration_secs: spec.lease_duration_seconds,
                applied: lease
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(mesh_api::APPLIED_PEERS_ANNOTATION))
                    .and_then(|v| mesh_api::AppliedPeers::from_annotation(v)),
            };
            out.insert(node.to_owned(), found);
        }
        Ok(out)
    }
}

/// What to do about a failed read of `resource` from the API server at `target`.
fn explain(target: &str, err: &kube::Error, resource: &str) -> anyhow::Error {
    match err {
        kube::Error::Api(status) => match status.code {
            404 => anyhow!(
                "the harness-mesh CRDs are not installed in the cluster at {target}: it does not serve \
                 {resource}.mesh.harness.dev. Install harness-mesh (helm install harness-mesh \
                 charts/harness-mesh, or kubectl apply -f crds/), or choose another cluster with --context"
            ),
            403 => anyhow!(
                "RBAC denied at {target}: {}. meshctl needs get and list on meshnodes and meshservices \
                 (group mesh.harness.dev): ask a cluster admin for a ClusterRole granting them, or use \
                 another --context",
                status.message
            ),
            401 => anyhow!(
                "the API server at {target} rejected your credentials (401 Unauthorized): they may have \
                 expired. Log in again, or choose another --context"
            ),
            code => anyhow!(
                "the API server at {target} refused to list {resource}: {} ({code} {})",
                status.message,
                status.reason
            ),
        },
        kube::Error::Auth(_) => anyhow!(
            "cannot authenticate to {target}: {}. Check the user of this context in your kubeconfig",
            chain(err)
        ),
        _ => anyhow!(
            "cannot reach the Kubernetes API server at {target}: {}. Is the cluster running, and is this \
             the right kubeconfig and context? (--kubeconfig, --context)",
            chain(err)
        ),
    }
}

#[cfg(test)]
mod tests {
    use kube::core::Status;

    use super::*;

    fn api(code: u16, reason: &str, message: &str) -> kube::Error {
        let mut status = Status::failure(message, reason);
        status.code = code;
        kube::Error::Api(Box::new(status))
    }

    #[test]
    fn api_errors_say_what_to_do() {
        let target = "https://127.0.0.1:6443/ (context lab)";
        let missing =
            explain(target, &api(404, "NotFound", "the server could not find the requested resource"), "meshnodes");
        assert!(missing.to_string().starts_with(
            "the harness-mesh CRDs are not installed in the cluster at https://127.0.0.1:6443/ (context lab)"
        ));
        assert!(missing.to_string().contains("kubectl apply -f crds/"));
        let denied = explain(
            target,
            &api(403, "Forbidden", "meshnodes.mesh.harness.dev is forbidden: User \"bob\" cannot list resource"),
            "meshnodes",
        )
        .to_string();
        assert!(denied.starts_with("RBAC denied at"), "{denied}");
        assert!(
            denied.contains("User \"bob\" cannot list") && denied.contains("get and list on meshnodes"),
            "{denied}"
        );
        assert!(explain(target, &api(401, "Unauthorized", ""), "meshnodes").to_string().contains("Log in again"));
        let other = explain(target, &api(500, "InternalError", "etcd is down"), "meshservices").to_string();
        assert_eq!(
            other,
            format!("the API server at {target} refused to list meshservices: etcd is down (500 InternalError)")
        );
    }
}
