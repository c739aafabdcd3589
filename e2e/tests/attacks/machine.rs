//! Attacks through meshctl's reads and an enrolled machine's name: a tenant fakes an agent's
//! liveness, and an enroll that cannot see the Nodes takes a Node's name.
//!
//! The enrolled machine's credential (days long, audience set, renewed by its agent) is
//! attacked in `tests/enroll.rs`, which has the lab's SSH machine: the copy of the token the test
//! takes there stops working when the ServiceAccount goes, and the file is replaced within its
//! renewal time. The hardening of the systemd unit is rated in meshctl's unit tests
//! (`the_systemd_unit_is_hardened`).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use harness_mesh_e2e::chart::write_token_kubeconfig;
use harness_mesh_e2e::{Cluster, meshctl_binary};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use mesh_api::MeshNode;
use serde_json::json;

const MANAGER: &str = "e2e-attacks-machine";

/// Runs meshctl with `kubeconfig`, bounded to 60 s; returns (exit code, stdout, stderr).
fn meshctl(kubeconfig: &Path, args: &[&str]) -> anyhow::Result<(Option<i32>, String, String)> {
    let out = Command::new("timeout")
        .arg("60")
        .arg(meshctl_binary()?)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--request-timeout", "20s"])
        .args(args)
        .output()
        .context("running meshctl")?;
    Ok((out.status.code(), String::from_utf8(out.stdout)?, String::from_utf8(out.stderr)?))
}

/// A tenant who can write Leases in their own namespace names one `mesh-agent-<node>` and renews
/// it: meshctl used to read such Leases from every namespace (the newest won), so a node whose
/// agent is dead showed as alive. It reads the mesh's namespace only.
#[tokio::test]
async fn a_lease_in_a_tenant_namespace_does_not_make_a_dead_agent_look_alive() -> anyhow::Result<()> {
    let _serial = super::SERIAL.lock().await;
    const NODE: &str = "atk-lease-ghost";
    const TENANT: &str = "atk-lease-tenant";
    let cluster = Cluster::get().await?;
    let apply = PatchParams::apply(MANAGER).force();
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    namespaces
        .patch(
            TENANT,
            &apply,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": TENANT}})),
        )
        .await?;
    // A MeshNode with no agent behind it at all: nothing ever renews its real Lease.
    let nodes: Api<MeshNode> = Api::all(cluster.client.clone());
    let node =
        json!({"apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode", "metadata": {"name": NODE}, "spec": {}});
    nodes.patch(NODE, &apply, &Patch::Apply(&node)).await?;
    let now = serde_json::to_value(MicroTime(k8s_openapi::jiff::Timestamp::now()))?;
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": format!("mesh-agent-{NODE}"), "namespace": TENANT},
                       "spec": {"holderIdentity": NODE, "leaseDurationSeconds": 3600, "renewTime": now,
                                "acquireTime": now}});
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), TENANT);
    leases.patch(&format!("mesh-agent-{NODE}"), &apply, &Patch::Apply(&lease)).await?;

    let result = async {
        let (code, stdout, stderr) = meshctl(&cluster.kubeconfig, &["status", "-o", "json"])?;
        ensure!(code == Some(0), "meshctl status failed: {stderr}");
        let view: serde_json::Value = serde_json::from_str(&stdout).context("meshctl status -o json")?;
        let row = view["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["name"] == NODE))
            .with_context(|| format!("no row for {NODE} in {stdout}"))?;
        ensure!(
            row["agent"]["state"] != "alive",
            "a Lease in tenant namespace {TENANT} made {NODE}'s missing agent look alive: {}",
            row["agent"]
        );
        Ok(())
    }
    .await;
    let _ = nodes.delete(NODE, &DeleteParams::default()).await;
    let _ = namespaces.delete(TENANT, &DeleteParams::background()).await;
    result
}

/// `meshctl enroll` checks that no Kubernetes Node has the machine's name (the machine and that
/// Node's agent would then write one MeshNode). Run by someone RBAC does not let read Nodes,
/// the check used to pass as "no such Node"; it fails instead, naming what it could not check.
/// The SSH target is a closed loopback port: had the check passed, enroll would stop there.
#[tokio::test]
async fn enroll_refuses_a_name_it_cannot_check_against_the_nodes() -> anyhow::Result<()> {
    let _serial = super::SERIAL.lock().await;
    const NAMESPACE: &str = "harness-mesh";
    const ACCOUNT: &str = "atk-enroll-no-nodes";
    const NAME: &str = "atk-enroll-blind";
    let cluster = Cluster::get().await?;
    let apply = PatchParams::apply(MANAGER).force();
    let accounts: Api<ServiceAccount> = Api::namespaced(cluster.client.clone(), NAMESPACE);
    let account =
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": ACCOUNT, "namespace": NAMESPACE}});
    accounts.patch(ACCOUNT, &apply, &Patch::Apply(&account)).await?;
    // Everything enroll's first step reads and dry-runs, but not Nodes.
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": ACCOUNT},
    "rules": [
        {"apiGroups": ["mesh.harness.dev"], "resources": ["meshnodes"], "verbs": ["get", "list", "create", "patch"]},
        {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get"]},
    ]});
    let roles: Api<ClusterRole> = Api::all(cluster.client.clone());
    roles.patch(ACCOUNT, &apply, &Patch::Apply(&role)).await?;
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": ACCOUNT},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": ACCOUNT},
        "subjects": [{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": NAMESPACE}]});
    let bindings: Api<ClusterRoleBinding> = Api::all(cluster.client.clone());
    bindings.patch(ACCOUNT, &apply, &Patch::Apply(&binding)).await?;
    let request = TokenRequest {
        spec: TokenRequestSpec { audiences: vec![], expiration_seconds: Some(600), bound_object_ref: None },
        ..TokenRequest::default()
    };
    let token = accounts
        .create_token_request(ACCOUNT, &PostParams::default(), &request)
        .await?
        .status
        .context("TokenRequest without a status")?
        .token;
    let kubeconfig = std::env::temp_dir().join(format!("atk-enroll-no-nodes-{}.kubeconfig", std::process::id()));
    write_token_kubeconfig(&cluster.kubeconfig, &token, &kubeconfig)?;

    let result = async {
        // RBAC changes reach the authorizer at once, but give a fresh binding a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (code, stdout, stderr) = meshctl(
            &kubeconfig,
            &["enroll", "root@127.0.0.1", "--name", NAME, "-p", "1", "--wait", "10s", "--known-hosts", "/dev/null"],
        )?;
        ensure!(code != Some(0), "enroll succeeded without being able to read Nodes:\n{stdout}{stderr}");
        let output = format!("{stdout}{stderr}");
        ensure!(
            output.contains(&format!("checking that no Kubernetes Node is called {NAME}")),
            "enroll went on without knowing whether a Kubernetes Node is called {NAME}:\n{output}"
        );
        Ok(())
    }
    .await;
    let _ = std::fs::remove_file(&kubeconfig);
    let _ = bindings.delete(ACCOUNT, &DeleteParams::default()).await;
    let _ = roles.delete(ACCOUNT, &DeleteParams::default()).await;
    let _ = accounts.delete(ACCOUNT, &DeleteParams::default()).await;
    result
}
