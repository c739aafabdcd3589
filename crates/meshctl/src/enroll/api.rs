//! The cluster side of enroll and unenroll, over the connection [`crate::kubeconfig`] makes:
//! the name check, the MeshNode, the machine's own ServiceAccount and its token, the agent's
//! kubeconfig, the wait for the agent, and the deletes.
//!
//! The credential: every enrolled machine gets a ServiceAccount of its own,
//! `mesh-machine-NAME` in the chart's namespace, bound to the chart's agent roles, and a token of
//! it. The chart's node restriction reads the node from that name (as it reads a DaemonSet
//! agent's from its pod-bound token), so the agent may write only MeshNode NAME's status and
//! Lease `mesh-agent-NAME`. Deleting the ServiceAccount revokes the token. (A token bound to a
//! placeholder Pod on node NAME, the earlier design, dies when kube-controller-manager's pod
//! garbage collector deletes that Pod because no Node NAME exists.)

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use mesh_api::MeshNode;
use mesh_api::conditions::CONNECTED;
use serde_json::json;

use crate::kubeconfig::Connection;
use crate::util::chain;

/// The annotation that records where a MeshNode was enrolled from (`ssh://user@host:port`).
pub const ENROLLED_VIA: &str = "mesh.harness.dev/enrolled-via";
/// The field manager of meshctl's writes.
pub const FIELD_MANAGER: &str = "meshctl";
/// The label meshctl puts on what it makes.
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "meshctl");
/// The label that names the enrolled node on its ServiceAccount and bindings.
const ENROLLED_NODE: &str = "mesh.harness.dev/enrolled-node";
/// An enrolled machine's ServiceAccount is this plus its MeshNode name; the chart's node
/// restriction (agent-node-restriction.yaml) reads the node from it.
pub const MACHINE_ACCOUNT_PREFIX: &str = "mesh-machine-";

/// The cluster, as enroll and unenroll use it.
pub struct Cluster {
    /// A client with the user's credentials.
    pub client: Client,
    /// `https://host:port (context NAME)`, for messages ([`Connection::server_target`]).
    pub target: String,
}

/// The kubeconfig the agent gets: the API server, its CA, and the file of its token (which the
/// agent renews in place; the API client re-reads it every minute).
pub fn agent_kubeconfig(server: &str, ca_pem: Option<&str>, token_file: &str, name: &str) -> anyhow::Result<String> {
    let mut cluster = json!({"server": server});
    if let Some(ca) = ca_pem {
        cluster["certificate-authority-data"] = json!(base64::engine::general_purpose::STANDARD.encode(ca));
    }
    let user = format!("mesh-agent-{name}");
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "harness-mesh", "cluster": cluster}],
        "users": [{"name": user, "user": {"tokenFile": token_file}}],
        "contexts": [{"name": "harness-mesh", "context": {"cluster": "harness-mesh", "user": user}}],
        "current-context": "harness-mesh",
    });
    let yaml = serde_saphyr::to_string(&doc).map_err(|err| anyhow!("rendering the agent's kubeconfig: {err}"))?;
    Ok(format!(
        "# mesh-agent's kubeconfig, written by meshctl enroll: a token of ServiceAccount {}.\n{yaml}",
        machine_account(name)
    ))
}

/// Whether the name is free or already this machine's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameState {
    /// No MeshNode of that name.
    Free,
    /// A MeshNode enrolled from this same address (enroll runs again).
    Ours,
}

/// Judges an existing MeshNode of the name: free, this machine's, or taken (an error saying by
/// whom and what to do).
pub fn judge_name(name: &str, via: &str, existing: Option<&MeshNode>) -> anyhow::Result<NameState> {
    let Some(node) = existing else { return Ok(NameState::Free) };
    if let Some(owner) = node.owner_references().iter().find(|o| o.kind == "Node") {
        bail!(
            "the name {name} is taken: MeshNode {name} mirrors the Kubernetes Node {} (mesh-controller made it). \
             Choose another --name",
            owner.name
        );
    }
    match node.annotations().get(ENROLLED_VIA) {
        Some(recorded) if recorded == via => Ok(NameState::Ours),
        Some(recorded) => bail!(
            "the name {name} is taken: MeshNode {name} is another machine, enrolled from {recorded} (not {via}). \
             Choose another --name, or remove that machine first with `meshctl unenroll {name}`"
        ),
        None => {
            let managers: Vec<String> = node
                .managed_fields()
                .iter()
                .filter_map(|f| f.manager.clone())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let by = if managers.is_empty() { String::new() } else { format!(" (written by {})", managers.join(", ")) };
            bail!(
                "the name {name} is taken: MeshNode {name} already exists and was not enrolled by meshctl{by}. \
                 Choose another --name"
            )
        }
    }
}

/// Checks that the machine's ServiceAccount name is free or meshctl's own for this machine.
pub fn judge_account(
    account: &str,
    namespace: &str,
    via: &str,
    existing: Option<&ServiceAccount>,
) -> anyhow::Result<()> {
    let Some(sa) = existing else { return Ok(()) };
    match sa.annotations().get(ENROLLED_VIA) {
        Some(recorded) if recorded == via => Ok(()),
        _ => bail!(
            "the ServiceAccount {namespace}/{account}, which would be the machine's identity, already exists and is \
             not meshctl's for this machine: choose another --name (or delete that ServiceAccount if it is a \
             leftover)"
        ),
    }
}

impl Cluster {
    /// The cluster of a connection made by [`crate::kubeconfig::connect`], the loader every
    /// command shares.
    pub fn new(connection: &Connection) -> Self {
        Self { client: connection.client.clone(), target: connection.server_target() }
    }

    /// An API error as what to do about it.
    pub fn explain(&self, err: &kube::Error, action: &str) -> anyhow::Error {
        match err {
            kube::Error::Api(status) => match status.code {
                403 => anyhow!(
                    "{action}: RBAC denied at {}: {}. enroll needs to read, create and patch MeshNodes, create and \
                     delete ServiceAccounts, Roles and RoleBindings in the harness-mesh namespace and create serviceaccounts/token \
                     there (and so may grant it), and create and delete ClusterRoleBindings (a cluster admin has all of it): ask for them, or use another --context",
                    self.target,
                    status.message
                ),
                401 => anyhow!(
                    "{action}: the API server at {} rejected your credentials (401): they may have expired; log in \
                     again, or choose another --context",
                    self.target
                ),
                404 if status.message.contains("the server could not find the requested resource") => anyhow!(
                    "{action}: the harness-mesh CRDs are not installed in the cluster at {}: install harness-mesh \
                     (helm install harness-mesh charts/harness-mesh -n harness-mesh --create-namespace)",
                    self.target
                ),
                code => anyhow!("{action}: {} ({code} {})", status.message, status.reason),
            },
            _ => anyhow!(
                "{action}: cannot reach the Kubernetes API server at {}: {}. Is the cluster running, and is this the \
                 right kubeconfig and context?",
                self.target,
                chain(err)
            ),
        }
    }

    /// The MeshNode `name`, if it exists.
    pub async fn meshnode(&self, name: &str) -> anyhow::Result<Option<MeshNode>> {
        let api: Api<MeshNode> = Api::all(self.client.clone());
        api.get_opt(name).await.map_err(|err| self.explain(&err, &format!("reading MeshNode {name}")))
    }

    /// Another MeshNode enrolled from the same address, if any.
    pub async fn enrolled_elsewhere(&self, name: &str, via: &str) -> anyhow::Result<Option<String>> {
        let api: Api<MeshNode> = Api::all(self.client.clone());
        let list = api.list(&ListParams::default()).await.map_err(|err| self.explain(&err, "listing MeshNodes"))?;
        Ok(list
            .items
            .iter()
            .find(|n| n.name_any() != name && n.annotations().get(ENROLLED_VIA).map(String::as_str) == Some(via))
            .map(ResourceExt::name_any))
    }

    /// Whether a Kubernetes Node of that name exists (the controller would mirror it into a
    /// MeshNode of the same name). Unknown (no permission to read Nodes) counts as no.
    /// Whether a Kubernetes Node is called `name`. An answer that is neither yes nor no (RBAC
    /// hides Nodes, the API server is away) is an error: enrolling under a Node's name would
    /// have the machine and that Node's agent share one MeshNode.
    pub async fn kubernetes_node_exists(&self, name: &str) -> anyhow::Result<bool> {
        let api: Api<Node> = Api::all(self.client.clone());
        api.get_opt(name).await.map(|node| node.is_some()).map_err(|err| {
            self.explain(
                &err,
                &format!(
                    "checking that no Kubernetes Node is called {name} (enroll needs get on nodes to know the name is free)"
                ),
            )
        })
    }

    /// The API server's service-account token issuer (its OIDC discovery document): the
    /// audience its tokens carry by default.
    pub async fn issuer(&self) -> anyhow::Result<String> {
        let request = http::Request::get("/.well-known/openid-configuration")
            .body(Vec::new())
            .map_err(|err| anyhow!("building the discovery request: {err}"))?;
        let discovery: serde_json::Value = self.client.request(request).await.map_err(|err| {
            self.explain(
                &err,
                "reading /.well-known/openid-configuration for the token audience (or pass --token-audience)",
            )
        })?;
        discovery["issuer"].as_str().filter(|issuer| !issuer.is_empty()).map(str::to_owned).ok_or_else(|| {
            anyhow!("the API server's /.well-known/openid-configuration names no issuer: pass --token-audience")
        })
    }

    /// The machine's ServiceAccount `mesh-machine-NAME`, if it exists.
    pub async fn machine_account(&self, namespace: &str, name: &str) -> anyhow::Result<Option<ServiceAccount>> {
        let account = machine_account(name);
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        api.get_opt(&account)
            .await
            .map_err(|err| self.explain(&err, &format!("reading ServiceAccount {namespace}/{account}")))
    }

    /// Fails unless the agent ServiceAccount exists.
    pub async fn require_service_account(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        match api.get_opt(name).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => bail!(
                "the agent ServiceAccount {namespace}/{name} does not exist in the cluster at {}: install the \
                 harness-mesh chart there (helm install harness-mesh charts/harness-mesh -n harness-mesh \
                 --create-namespace), or name where it is with --namespace and --service-account",
                self.target
            ),
            Err(err) => Err(self.explain(&err, &format!("reading ServiceAccount {namespace}/{name}"))),
        }
    }

    /// Checks with the API server (a dry run) that the MeshNode enroll will write is valid and
    /// allowed, before anything is changed anywhere.
    pub async fn dry_run_meshnode(&self, name: &str, via: &str, endpoint: Option<&str>) -> anyhow::Result<()> {
        let api: Api<MeshNode> = Api::all(self.client.clone());
        api.patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force().dry_run(),
            &Patch::Apply(&meshnode(name, via, endpoint)),
        )
        .await
        .map_err(|err| self.explain(&err, &format!("checking MeshNode {name}")))?;
        Ok(())
    }

    /// Creates or updates the MeshNode (server-side apply: a re-run with the same flags changes
    /// nothing; without `--endpoint` an endpoint set by an earlier enroll goes). Returns whether
    /// it was created, changed, or left as it was.
    pub async fn apply_meshnode(&self, name: &str, via: &str, endpoint: Option<&str>) -> anyhow::Result<Change> {
        let api: Api<MeshNode> = Api::all(self.client.clone());
        let before = self.meshnode(name).await?;
        let after = api
            .patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&meshnode(name, via, endpoint)))
            .await
            .map_err(|err| self.explain(&err, &format!("writing MeshNode {name}")))?;
        Ok(match before {
            None => Change::Created,
            Some(before) if before.resource_version() != after.resource_version() => Change::Updated,
            Some(_) => Change::Unchanged,
        })
    }

    /// Creates (or finds) the machine's ServiceAccount `mesh-machine-NAME` and binds it to the
    /// chart's agent roles (the ClusterRole and the Role named like the agent ServiceAccount,
    /// `roles`); returns the ServiceAccount's uid and whether it was created.
    pub async fn apply_machine_account(
        &self,
        namespace: &str,
        name: &str,
        roles: &str,
        via: &str,
    ) -> anyhow::Result<(String, Change)> {
        let account = machine_account(name);
        let before = self.machine_account(namespace, name).await?;
        let metadata = |namespaced: bool| {
            let mut meta = json!({
                "name": if namespaced { account.clone() } else { cluster_binding_name(namespace, name) },
                "labels": {MANAGED_BY.0: MANAGED_BY.1, ENROLLED_NODE: name},
                "annotations": {ENROLLED_VIA: via},
            });
            if namespaced {
                meta["namespace"] = json!(namespace);
            }
            meta
        };
        let subject = json!([{"kind": "ServiceAccount", "name": account, "namespace": namespace}]);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata(true),
                        "automountServiceAccountToken": false});
        let after = Api::<ServiceAccount>::namespaced(self.client.clone(), namespace)
            .patch(&account, &params, &Patch::Apply(&sa))
            .await
            .map_err(|err| self.explain(&err, &format!("writing ServiceAccount {namespace}/{account}")))?;
        let role_binding = json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": metadata(true),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": roles},
            "subjects": subject,
        });
        Api::<RoleBinding>::namespaced(self.client.clone(), namespace)
            .patch(&account, &params, &Patch::Apply(&role_binding))
            .await
            .map_err(|err| self.explain(&err, &format!("writing RoleBinding {namespace}/{account}")))?;
        // The machine's agent renews its own token (mesh-agent --token-file): create on its own
        // serviceaccounts/token, by name, and nothing else. Not in the chart's agent Role: there
        // it would let every agent mint tokens of any ServiceAccount in the namespace.
        let token_role = token_role_name(name);
        let mut role_meta = metadata(true);
        role_meta["name"] = json!(token_role);
        let role = json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": role_meta,
            "rules": [{"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"],
                       "resourceNames": [account]}],
        });
        Api::<Role>::namespaced(self.client.clone(), namespace)
            .patch(&token_role, &params, &Patch::Apply(&role))
            .await
            .map_err(|err| self.explain(&err, &format!("writing Role {namespace}/{token_role}")))?;
        let token_binding = json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": role_meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": token_role},
            "subjects": subject,
        });
        Api::<RoleBinding>::namespaced(self.client.clone(), namespace)
            .patch(&token_role, &params, &Patch::Apply(&token_binding))
            .await
            .map_err(|err| self.explain(&err, &format!("writing RoleBinding {namespace}/{token_role}")))?;
        let cluster_binding = json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": metadata(false),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": roles},
            "subjects": subject,
        });
        let binding = cluster_binding_name(namespace, name);
        Api::<ClusterRoleBinding>::all(self.client.clone())
            .patch(&binding, &params, &Patch::Apply(&cluster_binding))
            .await
            .map_err(|err| self.explain(&err, &format!("writing ClusterRoleBinding {binding}")))?;
        let uid =
            after.uid().ok_or_else(|| anyhow!("the API server returned ServiceAccount {account} without a uid"))?;
        let change = match before {
            Some(before) if before.uid() == after.uid() => Change::Unchanged,
            _ => Change::Created,
        };
        Ok((uid, change))
    }

    /// A token of the machine's ServiceAccount, valid for `duration` (or the API server's
    /// maximum); returns the token and when it expires.
    pub async fn issue_token(
        &self,
        namespace: &str,
        name: &str,
        duration: Duration,
        audience: &str,
    ) -> anyhow::Result<(String, Timestamp)> {
        let account = machine_account(name);
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![audience.to_owned()],
                bound_object_ref: None,
                expiration_seconds: Some(i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)),
            },
            ..TokenRequest::default()
        };
        let issued: TokenRequest = api
            .create_subresource("token", &account, &PostParams::default(), &request)
            .await
            .map_err(|err| self.explain(&err, &format!("requesting a token of {namespace}/{account}")))?;
        let status = issued.status.ok_or_else(|| anyhow!("the API server issued no token"))?;
        Ok((status.token, status.expiration_timestamp.0))
    }

    /// Polls the MeshNode until its agent has published a key, it has a mesh IP and its
    /// Connected condition is True; `note` is told each of these as it happens. Fails after
    /// `within`, or at once when the agent reports it cannot run a tunnel.
    pub async fn wait_joined(
        &self,
        name: &str,
        within: Duration,
        mut note: impl FnMut(&str),
    ) -> anyhow::Result<Joined> {
        let deadline = Instant::now() + within;
        let (mut key_seen, mut ip_seen) = (false, false);
        loop {
            let last;
            if let Some(node) = self.meshnode(name).await? {
                let status = node.status.unwrap_or_default();
                let connected = status.conditions.iter().find(|c| c.type_ == CONNECTED);
                if let (false, Some(key)) = (key_seen, &status.public_key) {
                    key_seen = true;
                    let backend = status.backend.map_or_else(|| "backend unknown".to_owned(), |b| format!("{b:?}"));
                    note(&format!("the agent published its public key {key} ({} WireGuard)", backend.to_lowercase()));
                }
                if let (false, Some(ip)) = (ip_seen, &status.mesh_ip) {
                    ip_seen = true;
                    note(&format!("mesh-controller gave it the mesh IP {ip} ({name}.node.mesh.local)"));
                }
                if let Some(c) = connected {
                    if c.status == "True" && key_seen && ip_seen {
                        return Ok(Joined {
                            mesh_ip: status.mesh_ip.unwrap_or_default(),
                            connected: c.message.clone(),
                        });
                    }
                    if c.reason == "NoTunnel" {
                        bail!(
                            "the agent on {name} runs, but without a tunnel: {}. Install WireGuard there (the \
                             kernel module, or wireguard-go with /dev/net/tun) and run enroll again",
                            c.message
                        );
                    }
                    last = format!("Connected={} ({}: {})", c.status, c.reason, c.message);
                } else if key_seen {
                    last = "the agent has not reported Connected yet".to_owned();
                } else {
                    last = "the agent has not published a key yet".to_owned();
                }
            } else {
                last = format!("MeshNode {name} is gone");
            }
            if Instant::now() > deadline {
                bail!("{name} did not join the mesh within {} s: {last}", within.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Deletes the MeshNode and waits (at most `within`) until it is gone (mesh-controller
    /// releases its mesh IP first). Returns false if it did not exist.
    pub async fn delete_meshnode(&self, name: &str, within: Duration) -> anyhow::Result<bool> {
        let api: Api<MeshNode> = Api::all(self.client.clone());
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(false),
            Err(err) => return Err(self.explain(&err, &format!("deleting MeshNode {name}"))),
        }
        let deadline = Instant::now() + within;
        while self.meshnode(name).await?.is_some() {
            if Instant::now() > deadline {
                bail!(
                    "MeshNode {name} is still there {} s after its deletion: mesh-controller removes its finalizer \
                     once the mesh IP is released. Is mesh-controller running?",
                    within.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(true)
    }

    /// Deletes the machine's ServiceAccount, which revokes every token of it, and its two role
    /// bindings. Returns false if the ServiceAccount did not exist.
    pub async fn delete_machine_account(&self, namespace: &str, name: &str) -> anyhow::Result<bool> {
        let account = machine_account(name);
        let gone = |result: Result<(), kube::Error>, what: String| match result {
            Ok(()) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
            Err(err) => Err(self.explain(&err, &format!("deleting {what}"))),
        };
        let params = DeleteParams::default();
        let existed = gone(
            Api::<ServiceAccount>::namespaced(self.client.clone(), namespace).delete(&account, &params).await.map(drop),
            format!("ServiceAccount {namespace}/{account}"),
        )?;
        gone(
            Api::<RoleBinding>::namespaced(self.client.clone(), namespace).delete(&account, &params).await.map(drop),
            format!("RoleBinding {namespace}/{account}"),
        )?;
        let token_role = token_role_name(name);
        gone(
            Api::<RoleBinding>::namespaced(self.client.clone(), namespace).delete(&token_role, &params).await.map(drop),
            format!("RoleBinding {namespace}/{token_role}"),
        )?;
        gone(
            Api::<Role>::namespaced(self.client.clone(), namespace).delete(&token_role, &params).await.map(drop),
            format!("Role {namespace}/{token_role}"),
        )?;
        let binding = cluster_binding_name(namespace, name);
        gone(
            Api::<ClusterRoleBinding>::all(self.client.clone()).delete(&binding, &params).await.map(drop),
            format!("ClusterRoleBinding {binding}"),
        )?;
        Ok(existed)
    }
}

/// What an apply did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// It did not exist.
    Created,
    /// It existed and was changed.
    Updated,
    /// It was already as wanted.
    Unchanged,
}

impl Change {
    /// For progress lines.
    pub fn word(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Unchanged => "unchanged",
        }
    }
}

/// The agent has joined.
pub struct Joined {
    /// Its mesh IP.
    pub mesh_ip: String,
    /// Its Connected message.
    pub connected: String,
}

/// The MeshNode enroll applies: its name, meshctl's label and annotation, and the endpoint.
fn meshnode(name: &str, via: &str, endpoint: Option<&str>) -> serde_json::Value {
    let mut spec = json!({});
    if let Some(endpoint) = endpoint {
        spec["endpoint"] = json!(endpoint);
    }
    json!({
        "apiVersion": "mesh.harness.dev/v1alpha1",
        "kind": "MeshNode",
        "metadata": {
            "name": name,
            "labels": {MANAGED_BY.0: MANAGED_BY.1},
            "annotations": {ENROLLED_VIA: via},
        },
        "spec": spec,
    })
}

/// The ServiceAccount of the machine enrolled as `name`.
pub fn machine_account(name: &str) -> String {
    format!("{MACHINE_ACCOUNT_PREFIX}{name}")
}

/// The Role (and its RoleBinding) that lets machine `name`'s agent renew its own token.
pub fn token_role_name(name: &str) -> String {
    format!("{}-token", machine_account(name))
}

/// The ClusterRoleBinding of machine `name` (cluster-scoped, so the namespace is in its name).
fn cluster_binding_name(namespace: &str, name: &str) -> String {
    format!("{namespace}:{MACHINE_ACCOUNT_PREFIX}{name}")
}

/// Annotations of a MeshNode or ServiceAccount, for tests.
#[cfg(test)]
fn annotated(via: Option<&str>) -> std::collections::BTreeMap<String, String> {
    via.map(|v| std::collections::BTreeMap::from([(ENROLLED_VIA.to_owned(), v.to_owned())])).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, OwnerReference};
    use kube::config::Kubeconfig;
    use mesh_api::MeshNodeSpec;

    use super::*;
    use crate::kubeconfig::pem;

    fn node(via: Option<&str>) -> MeshNode {
        let mut node = MeshNode::new("edge-1", MeshNodeSpec::default());
        node.metadata.annotations = Some(annotated(via));
        node
    }

    #[test]
    fn a_name_is_free_ours_or_taken() {
        let via = "ssh://root@192.168.77.200";
        assert_eq!(judge_name("edge-1", via, None).unwrap(), NameState::Free);
        assert_eq!(judge_name("edge-1", via, Some(&node(Some(via)))).unwrap(), NameState::Ours);
        let other = judge_name("edge-1", via, Some(&node(Some("ssh://root@10.0.0.9")))).unwrap_err().to_string();
        assert!(other.contains("another machine, enrolled from ssh://root@10.0.0.9"), "{other}");
        assert!(other.contains("meshctl unenroll edge-1"), "{other}");
        let mut lab = node(None);
        lab.metadata.managed_fields =
            Some(vec![ManagedFieldsEntry { manager: Some("harness-mesh-lab".into()), ..Default::default() }]);
        let taken = judge_name("edge-1", via, Some(&lab)).unwrap_err().to_string();
        assert!(taken.contains("not enrolled by meshctl (written by harness-mesh-lab)"), "{taken}");
        let mut mirrored = node(None);
        mirrored.metadata.owner_references =
            Some(vec![OwnerReference { kind: "Node".into(), name: "worker-1".into(), ..Default::default() }]);
        let err = judge_name("edge-1", via, Some(&mirrored)).unwrap_err().to_string();
        assert!(err.contains("mirrors the Kubernetes Node worker-1"), "{err}");
    }

    #[test]
    fn only_our_own_service_account_is_reused() {
        let via = "ssh://root@h";
        let mut sa = ServiceAccount::default();
        assert!(judge_account("mesh-machine-x", "harness-mesh", via, None).is_ok());
        assert!(judge_account("mesh-machine-x", "harness-mesh", via, Some(&sa)).is_err());
        sa.metadata.annotations = Some(annotated(Some(via)));
        assert!(judge_account("mesh-machine-x", "harness-mesh", via, Some(&sa)).is_ok());
        assert_eq!(machine_account("x"), "mesh-machine-x");
    }

    #[test]
    fn the_agent_kubeconfig_holds_server_ca_and_token_file() {
        let ca = pem(&[vec![1, 2, 3]]);
        assert_eq!(ca, "-----BEGIN CERTIFICATE-----\nAQID\n-----END CERTIFICATE-----\n");
        let text = agent_kubeconfig("https://10.0.0.1:6443", Some(&ca), "/etc/harness-mesh/token", "edge-1").unwrap();
        let parsed = Kubeconfig::from_yaml(&text).unwrap();
        let cluster = parsed.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://10.0.0.1:6443"));
        let ca_data = cluster.certificate_authority_data.as_deref().unwrap();
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(ca_data).unwrap(), ca.as_bytes());
        let user = parsed.auth_infos[0].auth_info.as_ref().unwrap();
        assert!(user.token.is_none(), "the token is in its own file, which the agent renews");
        assert_eq!(user.token_file.as_deref(), Some("/etc/harness-mesh/token"));
        assert_eq!(parsed.current_context.as_deref(), Some("harness-mesh"));
        let without_ca = agent_kubeconfig("https://k", None, "t", "e").unwrap();
        assert!(!without_ca.contains("certificate-authority"));
    }
}
