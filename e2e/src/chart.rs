//! The Helm chart `charts/harness-mesh` under test: the pinned `helm`, a throwaway namespace and
//! release that clean up after themselves (also when a test fails), tokens of the chart's own
//! ServiceAccounts from the TokenRequest API, API clients that authenticate with such a token,
//! and what RBAC grants a client.
//!
//! Everything a [`Sandbox`] makes is named `chart-test-*` (namespace, release, MeshNodes,
//! Nodes), and the chart prefixes its cluster-scoped objects with the release name, so tests
//! never touch anything else on the cluster. Test installs pin every workload to a node label
//! no node has ([`NEVER_SCHEDULED`]): on the lab nothing runs pods anyway, and on a real cluster
//! (kind) a test release must not start a second agent next to the real one.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::authorization::v1::{SelfSubjectRulesReview, SelfSubjectRulesReviewSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::json;

use crate::{Cluster, repo_root};

/// `helm --set` values that keep a test release's pods off every node: the lab has no
/// scheduler, but a real cluster must not get a second controller or agent from a test.
pub const NEVER_SCHEDULED: [&str; 2] = [
    "controller.nodeSelector.chart-test\\.harness-mesh\\.dev/never=scheduled",
    "agent.nodeSelector.chart-test\\.harness-mesh\\.dev/never=scheduled",
];

/// Bound on every helm and kubectl call the sandbox makes.
const CALL_TIMEOUT: &str = "60s";

/// The chart's directory.
pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/harness-mesh")
}

/// The pinned helm: `$HELM`, else the lab's `.lab/bin/helm`, else the one
/// `e2e/lab/build-binaries.sh helm` cached in `~/.cache/harness-mesh/helm-<version>/`, which is
/// built first (a few minutes, once per machine) when it is not there yet.
pub fn helm_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("HELM") {
        return Ok(PathBuf::from(path));
    }
    let lab = repo_root().join(".lab/bin/helm");
    if lab.exists() {
        return Ok(lab);
    }
    let cached = cache_dir().join(format!("helm-{}", pinned_version("HELM_VERSION")?)).join("helm");
    if cached.exists() {
        return Ok(cached);
    }
    // Several test binaries may get here at once: one builds, the others wait and reuse it.
    let lock = File::create(std::env::temp_dir().join("harness-mesh-helm-build.lock"))?;
    lock.lock().context("locking the helm build")?;
    if !cached.exists() {
        let out = Command::new(repo_root().join("e2e/lab/build-binaries.sh"))
            .arg("helm")
            .stdin(Stdio::null())
            .output()
            .context("running e2e/lab/build-binaries.sh helm")?;
        if !out.status.success() {
            bail!(
                "building the pinned helm failed ({}); run `e2e/lab/build-binaries.sh helm` (needs Go and the Go \
                 module proxy) or point $HELM at a helm binary:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    anyhow::ensure!(cached.exists(), "e2e/lab/build-binaries.sh helm did not produce {}", cached.display());
    Ok(cached)
}

fn cache_dir() -> PathBuf {
    match std::env::var_os("HARNESS_MESH_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/harness-mesh"),
    }
}

/// A version pinned in `e2e/lab/versions.env`.
fn pinned_version(key: &str) -> anyhow::Result<String> {
    let path = repo_root().join("e2e/lab/versions.env");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('=').map(|v| v.trim().to_owned()))
        .with_context(|| format!("{} pins no {key}", path.display()))
}

/// A unique suffix for names made by this process (time and a counter, base 36).
fn unique() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    let mut n = (nanos / 1000) as u64
        ^ (u64::from(std::process::id()) << 20)
        ^ u64::from(COUNTER.fetch_add(1, Ordering::Relaxed));
    let mut s = String::new();
    for _ in 0..5 {
        s.push(char::from_digit((n % 36) as u32, 36).unwrap_or('0'));
        n /= 36;
    }
    s
}

/// helm, pointed at the cluster under test, with its own state directories under `target/`.
#[derive(Clone, Debug)]
pub struct Helm {
    binary: PathBuf,
    kubeconfig: PathBuf,
    /// The cluster's version (`v1.37.2`), for `helm template` and `helm lint`, which otherwise
    /// assume an old Kubernetes and refuse the chart's `kubeVersion`.
    pub kube_version: String,
}

impl Helm {
    /// helm for `cluster`.
    pub async fn new(cluster: &Cluster) -> anyhow::Result<Self> {
        let binary = tokio::task::spawn_blocking(helm_binary).await??;
        let kube_version = cluster.client.apiserver_version().await?.git_version;
        Ok(Self { binary, kubeconfig: cluster.kubeconfig.clone(), kube_version })
    }

    /// Runs helm with `args` (after `--kubeconfig`), whatever its exit status.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        let home = repo_root().join("target/chart-test-helm");
        let mut command = Command::new(&self.binary);
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .stdin(Stdio::null());
        // The cluster is on loopback (the lab) or named by the kubeconfig: never via a proxy.
        for proxy in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"] {
            command.env_remove(proxy);
        }
        command.output().with_context(|| format!("running {} {}", self.binary.display(), args.join(" ")))
    }

    /// Runs helm and returns its stdout; fails with its output when it fails.
    pub fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.run(args)?;
        if !out.status.success() {
            bail!(
                "helm {} failed ({}):\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `helm template` of the chart as release `release` in `namespace` with `--set` values.
    pub fn template(
        &self,
        release: &str,
        namespace: &str,
        sets: &[&str],
        include_crds: bool,
    ) -> anyhow::Result<String> {
        let chart = chart_dir().display().to_string();
        let mut args =
            vec!["template", release, chart.as_str(), "--namespace", namespace, "--kube-version", &self.kube_version];
        if include_crds {
            args.push("--include-crds");
        }
        for set in sets {
            args.extend(["--set", set]);
        }
        self.ok(&args)
    }
}

/// The objects of a multi-document YAML stream (comments and empty documents dropped).
pub fn documents(yaml: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml).context("parsing rendered YAML")?;
    Ok(docs.into_iter().filter(|d| d.is_object()).collect())
}

/// `(kind, name)` of an object.
pub fn kind_and_name(object: &serde_json::Value) -> (String, String) {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    (s(&object["kind"]), s(&object["metadata"]["name"]))
}

/// A namespace (also the release name) that a test owns, and the cluster-scoped objects it
/// made. Dropping it removes all of it: the release, the MeshNodes and Nodes it tracked, every
/// object left in the namespace, and the namespace itself (finalized by hand where, as on the
/// lab, no namespace controller runs).
pub struct Sandbox {
    /// The cluster (admin client).
    pub cluster: Cluster,
    /// helm for that cluster.
    pub helm: Helm,
    /// The namespace, `chart-test-<tag>-<unique>`; also the release name.
    pub namespace: String,
    installed: Mutex<bool>,
    mesh_nodes: Mutex<Vec<String>>,
    nodes: Mutex<Vec<String>>,
}

impl Sandbox {
    /// Creates the namespace `chart-test-<tag>-<unique>` (tag: at most 8 characters, so the
    /// chart's object names keep the whole release name).
    pub async fn new(tag: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(tag.len() <= 8, "sandbox tag {tag:?} is longer than 8 characters");
        let cluster = Cluster::get().await?;
        let helm = Helm::new(&cluster).await?;
        let namespace = format!("chart-test-{tag}-{}", unique());
        cluster.kubectl_ok(&["create", "namespace", &namespace, "--request-timeout", CALL_TIMEOUT])?;
        Ok(Self {
            cluster,
            helm,
            namespace,
            installed: Mutex::new(false),
            mesh_nodes: Mutex::new(Vec::new()),
            nodes: Mutex::new(Vec::new()),
        })
    }

    /// The release name (the namespace's name).
    pub fn release(&self) -> &str {
        &self.namespace
    }

    /// A name for a cluster-scoped object of this test: `<namespace>-<suffix>`.
    pub fn name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.namespace)
    }

    /// The chart's object name prefix for this release (`<release>-harness-mesh`).
    pub fn fullname(&self) -> String {
        format!("{}-harness-mesh", self.release())
    }

    /// The controller's ServiceAccount name.
    pub fn controller_sa(&self) -> String {
        format!("{}-controller", self.fullname())
    }

    /// The agents' ServiceAccount name.
    pub fn agent_sa(&self) -> String {
        format!("{}-agent", self.fullname())
    }

    fn helm_release(&self, verb: &str, sets: &[&str]) -> anyhow::Result<String> {
        let chart = chart_dir().display().to_string();
        let mut args =
            vec![verb, self.release(), chart.as_str(), "--namespace", &self.namespace, "--timeout", CALL_TIMEOUT];
        for set in NEVER_SCHEDULED.iter().chain(sets) {
            args.extend(["--set", set]);
        }
        self.helm.ok(&args)
    }

    /// `helm install` with `--set` values (on top of [`NEVER_SCHEDULED`]).
    pub fn install(&self, sets: &[&str]) -> anyhow::Result<String> {
        // Marked first: a failed install may still have created objects.
        *self.installed.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.helm_release("install", sets)
    }

    /// `helm upgrade` with `--set` values (on top of [`NEVER_SCHEDULED`]; others reset to the
    /// chart's defaults).
    pub fn upgrade(&self, sets: &[&str]) -> anyhow::Result<String> {
        self.helm_release("upgrade", sets)
    }

    /// `helm uninstall`.
    pub fn uninstall(&self) -> anyhow::Result<String> {
        let out =
            self.helm.ok(&["uninstall", self.release(), "--namespace", &self.namespace, "--timeout", CALL_TIMEOUT])?;
        *self.installed.lock().unwrap_or_else(|e| e.into_inner()) = false;
        Ok(out)
    }

    /// Remembers a MeshNode this test made (or made someone make), to delete it on drop.
    pub fn track_mesh_node(&self, name: &str) {
        self.mesh_nodes.lock().unwrap_or_else(|e| e.into_inner()).push(name.to_owned());
    }

    /// Remembers a Node this test made, to delete it on drop.
    pub fn track_node(&self, name: &str) {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner()).push(name.to_owned());
    }

    /// Admin kubectl, bounded in time; output whatever the exit status.
    fn kubectl(&self, args: &[&str]) -> Option<Output> {
        let mut all = vec!["--request-timeout", "20s"];
        all.extend_from_slice(args);
        match self.cluster.kubectl(&all) {
            Ok(out) => Some(out),
            Err(err) => {
                eprintln!("[chart-test cleanup] kubectl {}: {err:#}", args.join(" "));
                None
            }
        }
    }

    /// Deletes `resource` objects (cluster-scoped or in the namespace) and strips their
    /// finalizers, so that they go even when no controller is left to remove them.
    fn delete_with_finalizers(&self, resource: &str, names: &[String], namespaced: bool) {
        for name in names {
            let mut delete = vec!["delete", resource, name.as_str(), "--ignore-not-found", "--wait=false"];
            let mut patch =
                vec!["patch", resource, name.as_str(), "--type=merge", "-p", r#"{"metadata":{"finalizers":null}}"#];
            if namespaced {
                delete.extend(["-n", &self.namespace]);
                patch.extend(["-n", &self.namespace]);
            }
            self.kubectl(&delete);
            // Deleting first: nobody can add a finalizer to an object that is being deleted.
            self.kubectl(&patch);
        }
    }

    fn names_in_namespace(&self, resource: &str) -> Vec<String> {
        self.kubectl(&["get", resource, "-n", &self.namespace, "-o", "name"])
            .map(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| l.rsplit('/').next().map(str::to_owned))
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Removes everything this sandbox made. Best effort: every step runs, failures are printed.
    pub fn cleanup(&self) {
        if std::mem::take(&mut *self.installed.lock().unwrap_or_else(|e| e.into_inner())) {
            let args = ["uninstall", self.release(), "--namespace", &self.namespace, "--timeout", CALL_TIMEOUT];
            match self.helm.run(&args) {
                Ok(out) if out.status.success() || String::from_utf8_lossy(&out.stderr).contains("not found") => {}
                Ok(out) => eprintln!("[chart-test cleanup] helm uninstall: {}", String::from_utf8_lossy(&out.stderr)),
                Err(err) => eprintln!("[chart-test cleanup] helm uninstall: {err:#}"),
            }
        }
        // Whatever a failed install or uninstall left of the chart's cluster-scoped objects.
        let instance = format!("app.kubernetes.io/instance={}", self.release());
        self.kubectl(&[
            "delete",
            "clusterroles,clusterrolebindings,validatingadmissionpolicies,validatingadmissionpolicybindings",
            "-l",
            &instance,
            "--ignore-not-found",
        ]);
        let nodes = std::mem::take(&mut *self.nodes.lock().unwrap_or_else(|e| e.into_inner()));
        for node in &nodes {
            self.kubectl(&["delete", "node", node, "--ignore-not-found", "--wait=false"]);
        }
        let mesh_nodes = std::mem::take(&mut *self.mesh_nodes.lock().unwrap_or_else(|e| e.into_inner()));
        self.delete_with_finalizers("meshnodes.mesh.harness.dev", &mesh_nodes, false);
        let services = self.names_in_namespace("meshservices.mesh.harness.dev");
        self.delete_with_finalizers("meshservices.mesh.harness.dev", &services, true);
        // Pods bound to nodes wait for a kubelet to confirm their deletion: force it.
        self.kubectl(&["delete", "pods", "--all", "-n", &self.namespace, "--grace-period=0", "--force"]);
        self.kubectl(&[
            "delete",
            "leases.coordination.k8s.io,events.events.k8s.io,configmaps,secrets,serviceaccounts,services,\
             deployments.apps,daemonsets.apps,poddisruptionbudgets.policy,roles.rbac.authorization.k8s.io,\
             rolebindings.rbac.authorization.k8s.io",
            "--all",
            "-n",
            &self.namespace,
            "--ignore-not-found",
        ]);
        self.delete_namespace();
    }

    /// Deletes the namespace. Without a namespace controller (the lab runs none) it would stay
    /// Terminating for ever, so once it is empty its finalizer is removed by hand, as the
    /// namespace controller would.
    fn delete_namespace(&self) {
        self.kubectl(&["delete", "namespace", &self.namespace, "--ignore-not-found", "--wait=false"]);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let gone = self
                .kubectl(&["get", "namespace", &self.namespace, "--ignore-not-found", "-o", "name"])
                .is_some_and(|out| out.status.success() && out.stdout.is_empty());
            if gone {
                return;
            }
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}, "spec": {"finalizers": []}});
        let file = std::env::temp_dir().join(format!("{}-finalize.json", self.namespace));
        if std::fs::write(&file, body.to_string()).is_ok() {
            let path = format!("/api/v1/namespaces/{}/finalize", self.namespace);
            if let Some(out) = self.kubectl(&["replace", "--raw", &path, "-f", &file.display().to_string()])
                && !out.status.success()
            {
                eprintln!(
                    "[chart-test cleanup] finalizing namespace {}: {}",
                    self.namespace,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let _ = std::fs::remove_file(file);
        }
    }

    /// A token of ServiceAccount `sa` in this namespace from the TokenRequest API, valid for 10
    /// minutes, bound to an object (`("Pod", name)` or `("Node", name)`) or to nothing.
    pub async fn token(&self, sa: &str, bound: Option<(&str, &str)>) -> anyhow::Result<String> {
        let api: Api<ServiceAccount> = Api::namespaced(self.cluster.client.clone(), &self.namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![],
                expiration_seconds: Some(600),
                bound_object_ref: bound.map(|(kind, name)| BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some(kind.into()),
                    name: Some(name.into()),
                    uid: None,
                }),
            },
            ..TokenRequest::default()
        };
        let issued = api
            .create_token_request(sa, &PostParams::default(), &request)
            .await
            .with_context(|| format!("TokenRequest for {}/{sa} bound to {bound:?}", self.namespace))?;
        Ok(issued.status.context("TokenRequest without a status")?.token)
    }
}

impl Sandbox {
    /// Waits until the API server enforces the release's node restriction. A new
    /// ValidatingAdmissionPolicy takes effect only once the API server has loaded it, which
    /// takes a moment after `helm install` returns; until then agents' writes pass unchecked.
    /// Probes with dry-run writes of a token that names no node, which the policy refuses.
    pub async fn wait_for_node_restriction(&self, within: Duration) -> anyhow::Result<Duration> {
        let client = token_client(&self.cluster.kubeconfig, &self.token(&self.agent_sa(), None).await?).await?;
        let leases: Api<Lease> = Api::namespaced(client, &self.namespace);
        let lease =
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "mesh-agent-probe"}});
        let params = PatchParams { dry_run: true, ..PatchParams::apply("mesh-agent").force() };
        let start = Instant::now();
        loop {
            match leases.patch("mesh-agent-probe", &params, &Patch::Apply(&lease)).await {
                Err(kube::Error::Api(status)) if status.code == 403 && status.message.contains("node-restriction") => {
                    return Ok(start.elapsed());
                }
                other if start.elapsed() > within => {
                    bail!("the node restriction was not enforced within {within:?}; last probe: {other:?}")
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// A client for the cluster in `kubeconfig` that authenticates with `token` alone (the
/// kubeconfig's own credentials are dropped).
pub async fn token_client(kubeconfig: &Path, token: &str) -> anyhow::Result<Client> {
    let file = Kubeconfig::read_from(kubeconfig).with_context(|| format!("reading {}", kubeconfig.display()))?;
    let mut config = Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await?;
    config.auth_info = serde_json::from_value::<AuthInfo>(json!({ "token": token }))?;
    Ok(Client::try_from(config)?)
}

/// Writes to `out` a kubeconfig for the cluster in `kubeconfig` that authenticates with `token`
/// alone, for a program (meshctl, kubectl) to act as that token's ServiceAccount.
pub fn write_token_kubeconfig(kubeconfig: &Path, token: &str, out: &Path) -> anyhow::Result<()> {
    let mut file = Kubeconfig::read_from(kubeconfig).with_context(|| format!("reading {}", kubeconfig.display()))?;
    for named in &mut file.auth_infos {
        named.auth_info = Some(serde_json::from_value::<AuthInfo>(json!({ "token": token }))?);
    }
    // JSON is YAML: kubectl and kube read it as a kubeconfig.
    std::fs::write(out, serde_json::to_string(&file)?).with_context(|| format!("writing {}", out.display()))
}

/// One permission: (API group, resource, resource name or "", verb).
pub type Grant = (String, String, String, String);

/// What RBAC grants `client` in `namespace` (cluster-wide grants included), as the API server
/// reports it to `kubectl auth can-i --list` (a SelfSubjectRulesReview), one [`Grant`] per
/// group/resource/name/verb. Non-resource URLs are left out.
pub async fn granted(client: &Client, namespace: &str) -> anyhow::Result<BTreeSet<Grant>> {
    let review = SelfSubjectRulesReview {
        spec: SelfSubjectRulesReviewSpec { namespace: Some(namespace.to_owned()) },
        ..SelfSubjectRulesReview::default()
    };
    let api: Api<SelfSubjectRulesReview> = Api::all(client.clone());
    let status = api.create(&PostParams::default(), &review).await?.status.context("review without status")?;
    anyhow::ensure!(!status.incomplete, "the rules review is incomplete: {:?}", status.evaluation_error);
    let mut out = BTreeSet::new();
    for rule in status.resource_rules {
        let names = rule.resource_names.filter(|n| !n.is_empty()).unwrap_or_else(|| vec![String::new()]);
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for name in &names {
                    for verb in &rule.verbs {
                        out.insert((group.clone(), resource.clone(), name.clone(), verb.clone()));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Shorthand for building expected [`Grant`]s: `grants("mesh.harness.dev", "meshnodes", "", &["list", "watch"])`.
pub fn grants(group: &str, resource: &str, name: &str, verbs: &[&str]) -> Vec<Grant> {
    verbs.iter().map(|v| (group.to_owned(), resource.to_owned(), name.to_owned(), (*v).to_owned())).collect()
}
