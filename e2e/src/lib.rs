//! The harness of harness-mesh's integration and end-to-end tests.
//!
//! Tests call [`Cluster::get`] to obtain a client for a real Kubernetes API server:
//!
//! - by default the local lab (`e2e/lab/lab.sh`): started on first use, or reused when it is
//!   already running, so `cargo test` alone works as well as `make test`;
//! - or any cluster, when `HARNESS_MESH_KUBECONFIG` names a kubeconfig (kind, for instance):
//!   the suite is cluster-agnostic and then starts nothing.
//!
//! The harness never talks to anything but that API server.

pub mod chart;
pub mod controller;
pub mod innernet;
pub mod laptop;
pub mod measure;
pub mod mesh;
pub mod nodes;
pub mod rogue;
pub mod users;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config};
use tokio::sync::OnceCell;

/// Field manager the harness uses for its server-side applies.
pub const FIELD_MANAGER: &str = "harness-mesh-e2e";

/// The repository's top directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e/ has a parent").to_path_buf()
}

/// A Kubernetes cluster under test, with the CRDs of `crds/` installed and Established.
#[derive(Clone)]
pub struct Cluster {
    /// A client with the kubeconfig's (admin) credentials.
    pub client: Client,
    /// The kubeconfig file the client was built from, for `kubectl`.
    pub kubeconfig: PathBuf,
}

/// The kubeconfig of the prepared cluster (lab started, CRDs Established), set once per test
/// binary. Only the path is shared: each test runs its own tokio runtime, and a client must
/// not outlive the runtime it was made in.
static PREPARED: OnceCell<PathBuf> = OnceCell::const_new();

impl Cluster {
    /// Returns a client for the cluster under test, starting the lab and installing the CRDs
    /// on first use.
    pub async fn get() -> anyhow::Result<Self> {
        let kubeconfig = PREPARED
            .get_or_try_init(|| async {
                let kubeconfig = match std::env::var_os("HARNESS_MESH_KUBECONFIG") {
                    Some(path) => PathBuf::from(path),
                    None => tokio::task::spawn_blocking(start_lab).await??,
                };
                Self::connect(kubeconfig.clone()).await?.install_crds().await?;
                anyhow::Ok(kubeconfig)
            })
            .await?;
        Self::connect(kubeconfig.clone()).await
    }

    async fn connect(kubeconfig: PathBuf) -> anyhow::Result<Self> {
        let config = Kubeconfig::read_from(&kubeconfig)
            .with_context(|| format!("reading kubeconfig {}", kubeconfig.display()))?;
        let config = Config::from_custom_kubeconfig(config, &KubeConfigOptions::default()).await?;
        Ok(Self { client: Client::try_from(config)?, kubeconfig })
    }

    /// Server-side applies every CRD under `crds/` (the files users install) and waits until
    /// each is Established.
    pub async fn install_crds(&self) -> anyhow::Result<()> {
        let crds: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let dir = repo_root().join("crds");
        for file in mesh_api::CRD_FILES {
            let path = dir.join(file);
            let yaml = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let crd: CustomResourceDefinition = serde_saphyr::from_str(&yaml)?;
            let name = crd.metadata.name.clone().context("CRD without a name")?;
            crds.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&crd))
                .await
                .with_context(|| format!("applying {}", path.display()))?;
            tokio::time::timeout(
                Duration::from_secs(30),
                await_condition(crds.clone(), &name, conditions::is_crd_established()),
            )
            .await
            .with_context(|| format!("CRD {name} not Established within 30 s"))??;
        }
        Ok(())
    }

    /// Runs `kubectl` against this cluster and returns its output (whatever the exit status).
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(kubectl_binary())
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .context("running kubectl")
    }

    /// Runs `kubectl` and returns its stdout, failing with its stderr when it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.kubectl(args)?;
        if !out.status.success() {
            bail!("kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }
}

/// The kubectl to use: `$KUBECTL`, else the lab's pinned one, else the one on `PATH`.
fn kubectl_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("KUBECTL") {
        return PathBuf::from(path);
    }
    let lab = repo_root().join(".lab/bin/kubectl");
    if lab.exists() { lab } else { PathBuf::from("kubectl") }
}

/// Brings the lab up (idempotent) and returns its admin kubeconfig. Several test binaries may
/// call this at once, so the start is serialized by a lock file of this checkout's (a lab of
/// another checkout, say in `e2e/lab/ns.sh`, is not waited for; `.lab` itself goes on `down`).
fn start_lab() -> anyhow::Result<PathBuf> {
    start_lab_with_nodes(0)
}

/// Brings the lab up with at least `nodes` node namespaces and their agents (idempotent: only
/// what is missing is started, including a controller or MeshNodes an earlier suite removed).
pub fn start_lab_with_nodes(nodes: usize) -> anyhow::Result<PathBuf> {
    let dir = repo_root().join("target");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let lock = File::create(dir.join("harness-mesh-lab.lock"))?;
    lock.lock().context("locking the lab start")?;
    let count = nodes.to_string();
    let args: &[&str] = if nodes > 0 { &["up", "--nodes", &count] } else { &["up"] };
    lab_sh(args)?;
    Ok(repo_root().join(".lab/kubeconfig"))
}

/// The mode of the running lab (`plain` or `kubelet`, from `.lab/config`), if there is one.
pub fn lab_mode() -> Option<String> {
    let config = std::fs::read_to_string(repo_root().join(".lab/config")).ok()?;
    config.lines().find_map(|line| line.strip_prefix("MODE=")).map(str::to_owned)
}

/// The reference of the lab's locally built image `name` (kubelet mode: `pause`, `mesh-agent`,
/// `mesh-controller`, `busybox`), from the tarballs `.lab/images.list` names
/// (`<cache>/<name>-<hash>.tar` is `harness-mesh.local/<name>:lab-<hash>`).
pub fn lab_image(name: &str) -> anyhow::Result<String> {
    let list = repo_root().join(".lab/images.list");
    let text = std::fs::read_to_string(&list)
        .with_context(|| format!("reading {} (is the lab up in kubelet mode?)", list.display()))?;
    text.lines()
        .filter_map(|line| Path::new(line).file_stem()?.to_str())
        .find_map(|stem| {
            let (image, hash) = stem.rsplit_once('-')?;
            (image == name).then(|| format!("harness-mesh.local/{image}:lab-{hash}"))
        })
        .with_context(|| format!("{} lists no {name} image", list.display()))
}

/// The meshctl binary (with mesh-agent built next to it, enroll's default agent binary): `$MESHCTL`
/// when set, else built once per test binary with `cargo build -p meshctl -p mesh-agent`.
pub fn meshctl_binary() -> anyhow::Result<PathBuf> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("MESHCTL") {
                return Ok(PathBuf::from(path));
            }
            let root = repo_root();
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let out = Command::new(cargo)
                .args(["build", "--quiet", "-p", "meshctl", "-p", "mesh-agent"])
                .current_dir(&root)
                .output()
                .map_err(|e| format!("running cargo build -p meshctl -p mesh-agent: {e}"))?;
            if !out.status.success() {
                return Err(format!("cargo build failed:\n{}", String::from_utf8_lossy(&out.stderr)));
            }
            let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
            let binary = target.join("debug/meshctl");
            if binary.exists() { Ok(binary) } else { Err(format!("{} is missing after the build", binary.display())) }
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Runs `e2e/lab/lab.sh ARGS` (the lab only) and returns its stdout; fails with its output when
/// it fails.
pub fn lab_sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(repo_root().join("e2e/lab/lab.sh"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .with_context(|| format!("running e2e/lab/lab.sh {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "e2e/lab/lab.sh {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
