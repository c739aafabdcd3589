//! `meshctl enroll` and `meshctl unenroll` end to end, over real SSH, on the lab.
//!
//! The remote machine is the lab's SSH node `hm-node-200` (`e2e/lab/lab.sh ssh-node 200`): Debian's
//! sshd on 192.168.77.200:22, no agent and no MeshNode of its own, its own /run (no systemd, so the
//! agent runs under enroll's supervisor: that is the path tested here; the systemd unit is not)
//! and copy-on-write /etc, /usr/local and /var. meshctl runs on `hm-node-1` (the root namespace
//! cannot reach 192.168.77.x) with the admin kubeconfig, the lab's client key and known_hosts.
//!
//! - enroll: the machine joins (key published, mesh IP, Connected), pings every node over the
//!   mesh and back, resolves a service on hm-node-2 by name through its own agent and reaches it;
//!   in kubelet mode a pod on the pod network reaches a service on the machine;
//!   its kubeconfig is 0600 and its private key stays there; the supervisor restarts a killed
//!   agent; a second enroll changes nothing; unenroll leaves nothing on the machine, drops it from
//!   every peer list, deletes the MeshNode and the machine's ServiceAccount (with its role
//!   bindings), and the agent's token stops working; while enrolled, the machine's token may not
//!   write another node's MeshNode (the chart's node restriction);
//! - each failure has its message: unknown and changed host keys, failed authentication, an
//!   unreachable host, a user without root, a taken name; unenroll refuses a node meshctl did not
//!   enroll, and without `--force` a machine it cannot reach.
//!
//! Lab only. The binary is `$MESHCTL`, else `<target>/debug/meshctl` (built here with mesh-agent,
//! which enroll installs from next to it). Everything is bounded in time and cleaned up, also on
//! failure.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use harness_mesh_e2e::controller::service;
use harness_mesh_e2e::mesh::{Mesh, eventually, eventually_async, wait_mesh_ip};
use harness_mesh_e2e::repo_root;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use mesh_api::MeshNode;
use mesh_api::MeshService;
use serde_json::json;

/// The tests share the SSH node and the lab's nodes: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CONVERGE: Duration = Duration::from_secs(90);
/// The lab node number of the SSH node, its namespace and address.
const SSH_NODE_NUMBER: &str = "200";
const SSH_NODE: &str = "hm-node-200";
const SSH_ADDR: &str = "192.168.77.200";
/// Where meshctl runs (it must be inside the lab's network to reach the SSH node).
const RUNNER: &str = "hm-node-1";
/// An address inside the lab subnet where nothing is.
const NOWHERE: &str = "192.168.77.250";
/// The name the machine is enrolled as.
const NAME: &str = "e2e-enrolled";
/// The namespace of the chart (the machines' ServiceAccounts).
const NAMESPACE: &str = "harness-mesh";
const SERVICE: &str = "e2e-enroll-web";
const SERVICE_PORT: u16 = 18400;

/// A service on the enrolled machine, for a pod to reach (kubelet mode).
const MACHINE_SERVICE: &str = "e2e-enroll-machine-web";
const MACHINE_SERVICE_PORT: u16 = 18401;
const CLIENT_POD: &str = "e2e-enroll-client";
/// A service backed by a container on the enrolled machine.
const CONTAINER_SERVICE: &str = "e2e-enroll-container";

/// A MeshService backed by a Podman container on the enrolled machine (its engine started by
/// the lab, its socket given to enroll with --container-socket): `RUNNER` reaches the container
/// through the service's mesh IP, on the mapped port. Returns the time from `podman run` to the
/// first answer; removes the service and the container again.
async fn a_container_on_the_machine_is_reached(mesh: &Mesh) -> anyhow::Result<Duration> {
    let container = "e2e-enroll-ct";
    harness_mesh_e2e::lab_sh(&["podman", "start", SSH_NODE])?;
    let podman = |args: &[&str]| {
        let mut all = vec!["podman", SSH_NODE, "--"];
        all.extend_from_slice(args);
        harness_mesh_e2e::lab_sh(&all)
    };
    podman(&["rm", "-f", "--ignore", container])?;
    let services: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    let _ = services.delete(CONTAINER_SERVICE, &DeleteParams::default()).await;
    let result = async {
        services
            .create(
                &PostParams::default(),
                &service(
                    CONTAINER_SERVICE,
                    json!({"node": NAME, "container": {"name": container}, "network": {"type": "mesh",
                        "ports": [MACHINE_SERVICE_PORT], "targetPorts": [{"port": MACHINE_SERVICE_PORT, "targetPort": 80}]}}),
                ),
            )
            .await?;
        let ip = wait_mesh_ip(&services, CONTAINER_SERVICE).await?;
        let started = Instant::now();
        podman(&[
            "run",
            "-d",
            "--name",
            container,
            "localhost/hm-busybox:lab",
            "sh",
            "-c",
            "echo enrolled-container > /www/index.html; exec httpd -f -p 80 -h /www",
        ])?;
        let url = format!("http://{ip}:{MACHINE_SERVICE_PORT}/");
        eventually(Duration::from_secs(60), || {
            let body = mesh.nodes.exec_ok(RUNNER, &["curl", "-sS", "--noproxy", "*", "--max-time", "3", &url])?;
            ensure!(body.trim() == "enrolled-container", "{url} answered {body:?}");
            Ok(())
        })
        .await?;
        let took = started.elapsed();
        let ready = services.get(CONTAINER_SERVICE).await?.status.map(|s| s.conditions).unwrap_or_default();
        ensure!(
            ready.iter().any(|c| c.type_ == "Ready" && c.status == "True" && c.message.contains(container)),
            "{ready:?}"
        );
        anyhow::Ok(took)
    }
    .await;
    let _ = services.delete(CONTAINER_SERVICE, &DeleteParams::default()).await;
    let _ = podman(&["rm", "-f", "--ignore", container]);
    result
}

/// A MeshService on the machine, served there by socat, and a busybox pod on `RUNNER`'s pod
/// network that must reach it over the mesh (its traffic leaves the node from the node's mesh
/// IP). Returns how long the first answer took; removes all of it again.
async fn a_pod_reaches_a_service_on_the_machine(mesh: &Mesh) -> anyhow::Result<Duration> {
    let services: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(mesh.cluster.client.clone(), "default");
    let mut server = mesh.serve_tcp(SSH_NODE, MACHINE_SERVICE_PORT, "machine-hello")?;
    let result = async {
        let _ = services.delete(MACHINE_SERVICE, &DeleteParams::default()).await;
        let _ = pods.delete(CLIENT_POD, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await;
        eventually_async(Duration::from_secs(60), || async {
            ensure!(services.get_opt(MACHINE_SERVICE).await?.is_none(), "old {MACHINE_SERVICE} still exists");
            ensure!(pods.get_opt(CLIENT_POD).await?.is_none(), "old pod {CLIENT_POD} still exists");
            Ok(())
        })
        .await?;
        services
            .create(
                &PostParams::default(),
                &service(
                    MACHINE_SERVICE,
                    json!({"node": NAME, "network": {"type": "mesh", "ports": [MACHINE_SERVICE_PORT]}}),
                ),
            )
            .await?;
        let ip = wait_mesh_ip(&services, MACHINE_SERVICE).await?;
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": CLIENT_POD, "namespace": "default"},
            "spec": {
                "nodeName": RUNNER, "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "client", "image": harness_mesh_e2e::lab_image("busybox")?,
                                "imagePullPolicy": "Never", "command": ["/bin/busybox", "sleep", "3600"]}],
            },
        }))?;
        pods.create(&PostParams::default(), &pod).await?;
        eventually_async(Duration::from_secs(90), || async {
            let status = pods.get(CLIENT_POD).await?.status.unwrap_or_default();
            ensure!(status.phase.as_deref() == Some("Running"), "pod {CLIENT_POD} is {:?}", status.phase);
            Ok(())
        })
        .await?;
        let script = format!("timeout 5 nc {ip} {MACHINE_SERVICE_PORT} </dev/null");
        eventually(Duration::from_secs(60), || {
            let out = mesh.cluster.kubectl(&["exec", CLIENT_POD, "--", "/bin/busybox", "sh", "-c", &script])?;
            let text = String::from_utf8_lossy(&out.stdout);
            ensure!(
                text.trim() == "machine-hello",
                "pod {CLIENT_POD} on {RUNNER} -> {MACHINE_SERVICE} on {NAME} ({ip}:{MACHINE_SERVICE_PORT}): {text:?} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        })
        .await
    }
    .await;
    let _ = server.kill();
    let _ = server.wait();
    let _ = services.delete(MACHINE_SERVICE, &DeleteParams::default()).await;
    let _ = pods.delete(CLIENT_POD, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await;
    result
}

fn lab_sh() -> PathBuf {
    repo_root().join("e2e/lab/lab.sh")
}

fn ssh_dir() -> PathBuf {
    repo_root().join(".lab/ssh")
}

/// Fails unless the suite runs on the lab.
fn require_lab() -> anyhow::Result<()> {
    ensure!(
        std::env::var_os("HARNESS_MESH_NODES").is_none() && std::env::var_os("HARNESS_MESH_KUBECONFIG").is_none(),
        "the enroll tests need the lab (its SSH node plays the remote machine); unset HARNESS_MESH_NODES and \
         HARNESS_MESH_KUBECONFIG"
    );
    Ok(())
}

/// Starts (or repairs) the SSH node; a no-op when it runs.
fn ssh_node_up() -> anyhow::Result<()> {
    let out = Command::new(lab_sh()).args(["ssh-node", SSH_NODE_NUMBER]).current_dir(repo_root()).output()?;
    ensure!(out.status.success(), "lab.sh ssh-node {SSH_NODE_NUMBER} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// What one meshctl run printed.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Run {
    fn ok(self) -> anyhow::Result<Self> {
        ensure!(self.code == Some(0), "meshctl exited {:?}:\n{}{}", self.code, self.stdout, self.stderr);
        Ok(self)
    }

    /// Its failure message; fails if it succeeded.
    fn failed(self) -> anyhow::Result<String> {
        ensure!(self.code != Some(0), "meshctl succeeded where it must fail:\n{}", self.stdout);
        Ok(format!("{}{}", self.stdout, self.stderr))
    }
}

/// Runs meshctl on the runner node with the lab's admin kubeconfig (at most `limit`).
fn meshctl(args: &[&str], limit: Duration) -> anyhow::Result<Run> {
    let binary = harness_mesh_e2e::meshctl_binary()?;
    let kubeconfig = repo_root().join(".lab/kubeconfig");
    let secs = limit.as_secs().to_string();
    let start = Instant::now();
    let out = Command::new(lab_sh())
        .args(["exec", RUNNER, "--", "timeout", "-k", "5", &secs])
        .arg(&binary)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--request-timeout", "20s"])
        .args(args)
        .current_dir(repo_root())
        .stdin(std::process::Stdio::null())
        .output()
        .context("running meshctl on the runner node")?;
    let run = Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: start.elapsed(),
    };
    if run.stderr.contains("unrecognized subcommand") {
        bail!(
            "{} has no enroll/unenroll subcommands: wire crates/meshctl/src/enroll.rs into main.rs:\n{}",
            binary.display(),
            run.stderr
        );
    }
    Ok(run)
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("path is not UTF-8")
}

/// The flags that let meshctl log in to the SSH node: the lab's client key and known_hosts.
fn lab_ssh_flags() -> anyhow::Result<[String; 4]> {
    Ok([
        "--known-hosts".to_owned(),
        path(&ssh_dir().join("known_hosts"))?.to_owned(),
        "-i".to_owned(),
        path(&ssh_dir().join("client_ed25519"))?.to_owned(),
    ])
}

fn enroll_args<'a>(target: &'a str, name: &'a str, ssh: &'a [String]) -> Vec<&'a str> {
    let mut args = vec!["enroll", target, "--name", name, "--wait", "90s"];
    args.extend(ssh.iter().map(String::as_str));
    args
}

/// Runs `args` on the SSH node (the "remote machine"), whatever the exit status.
fn on_machine(mesh: &Mesh, args: &[&str]) -> anyhow::Result<std::process::Output> {
    mesh.nodes.exec(SSH_NODE, args)
}

/// Removes the enrolled machine (and the test's service) however the test ends.
struct Cleanup {
    names: Vec<&'static str>,
    armed: bool,
}

impl Cleanup {
    fn run(&mut self) {
        if !self.armed {
            return;
        }
        self.armed = false;
        let ssh = lab_ssh_flags().unwrap_or_default();
        for name in &self.names {
            let mut args = vec!["unenroll", name, "--force"];
            args.extend(ssh.iter().map(String::as_str));
            match meshctl(&args, Duration::from_secs(120)) {
                Ok(run) if run.code == Some(0) => {}
                Ok(run) if run.stderr.contains("no machine is enrolled") => {}
                Ok(run) => eprintln!("cleanup: unenroll {name} --force: {}{}", run.stdout, run.stderr),
                Err(err) => eprintln!("cleanup: unenroll {name}: {err:#}"),
            }
        }
        let kubectl = repo_root().join(".lab/bin/kubectl");
        let _ = Command::new(kubectl)
            .args(["--kubeconfig", ".lab/kubeconfig", "--request-timeout=10s", "-n", "default", "delete"])
            .args(["meshservice", SERVICE, "--ignore-not-found", "--wait=false"])
            .current_dir(repo_root())
            .output();
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.run();
    }
}

/// Prints whatever enroll installed or started that is still on the machine (nothing, after
/// unenroll): files, the WireGuard device, agent and wireguard-go processes in its namespace.
const LEFTOVERS: &str = r#"
for f in /etc/harness-mesh /var/lib/harness-mesh /usr/local/bin/mesh-agent /usr/local/lib/harness-mesh \
  /run/harness-mesh /var/log/harness-mesh-agent.log /run/wireguard/wg-harness.sock; do
  [ ! -e "$f" ] || echo "$f"
done
ip link show wg-harness 2>/dev/null | head -n 1
for p in /proc/[0-9]*; do
  [ "$(readlink "$p/ns/net")" = "$(readlink /proc/self/ns/net)" ] || continue
  c="$(cat "$p/comm" 2>/dev/null)"
  case "$c" in mesh-agent* | wireguard-go) echo "$c (pid ${p#/proc/})" ;; esac
done
"#;

/// The machine's API token, which its kubeconfig names and its agent renews.
const TOKEN_FILE: &str = "/etc/harness-mesh/token";

/// The lab API server's issuer, the audience enroll asks for by default.
const LAB_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The claims of a JWT (not verified: the API server does that).
fn token_claims(token: &str) -> anyhow::Result<serde_json::Value> {
    use base64::Engine as _;
    let payload = token.trim().split('.').nth(1).context("the token is not a JWT")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// Replaces `path` on the machine with `content`.
fn write_on_machine(mesh: &Mesh, path: &str, content: &str) -> anyhow::Result<()> {
    let script = format!("cat > {path}.e2e <<'EOF'\n{content}EOF\nmv {path}.e2e {path}");
    mesh.nodes.exec_ok(SSH_NODE, &["sh", "-c", &script]).map(drop)
}

/// The pid in a pid file on the machine, if it names a live mesh-agent.
fn machine_agent_pid(mesh: &Mesh) -> anyhow::Result<u32> {
    let script = "p=$(cat /run/harness-mesh/agent.pid) && [ \"$(cat /proc/$p/comm)\" = mesh-agent ] && echo $p";
    let out = on_machine(mesh, &["sh", "-c", script])?;
    String::from_utf8_lossy(&out.stdout).trim().parse().context("no live mesh-agent on the machine")
}

#[tokio::test]
async fn enroll_joins_the_mesh_and_unenroll_removes_it_everywhere() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    require_lab()?;
    let ssh = lab_ssh_flags()?;
    // A machine left enrolled by an earlier, interrupted run (its agent perhaps no longer running,
    // so that no node reports all its peers reachable) goes first: the guard's cleanup runs first, too.
    let cleanup = tokio::task::spawn_blocking(|| {
        ssh_node_up()?;
        let mut cleanup = Cleanup { names: vec![NAME], armed: true };
        cleanup.run();
        cleanup.armed = true;
        anyhow::Ok(cleanup)
    })
    .await??;
    let mesh = Mesh::get(CONVERGE).await?;
    let nodes: Api<MeshNode> = Api::all(mesh.cluster.client.clone());
    let pods: Api<Pod> = Api::namespaced(mesh.cluster.client.clone(), NAMESPACE);
    let accounts: Api<ServiceAccount> = Api::namespaced(mesh.cluster.client.clone(), NAMESPACE);
    let role_bindings: Api<RoleBinding> = Api::namespaced(mesh.cluster.client.clone(), NAMESPACE);
    let cluster_bindings: Api<ClusterRoleBinding> = Api::all(mesh.cluster.client.clone());
    let account = format!("mesh-machine-{NAME}");
    let cluster_binding = format!("{NAMESPACE}:{account}");
    let services: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    let host = mesh.nodes.names[1].clone();
    let mut server = mesh.serve_tcp(&host, SERVICE_PORT, "enrolled-hello")?;
    let result = async {
        services
            .create(
                &PostParams::default(),
                &service(SERVICE, json!({"node": host, "network": {"type": "mesh", "ports": [SERVICE_PORT]}})),
            )
            .await?;

        // Enroll.
        let target = format!("root@{SSH_ADDR}");
        let endpoint = format!("{SSH_ADDR}:51820");
        let mut args = enroll_args(&target, NAME, &ssh);
        // The shortest token the API server issues, so that the agent's renewal shows here.
        args.extend(["--endpoint", &endpoint, "--token-duration", "10m"]);
        // The machine's container engine (started below, in plain mode) has its socket where
        // the lab keeps it, not where the agent looks by default.
        let engine_socket = repo_root().join(format!(".lab/nodes/{SSH_NODE}/podman/podman.sock"));
        let engine_socket = path(&engine_socket)?.to_owned();
        args.extend(["--container-socket", &engine_socket]);
        let first = meshctl(&args, Duration::from_secs(180))?.ok()?;
        eprintln!("first enroll took {:.1} s:\n{}", first.took.as_secs_f64(), first.stdout);
        for step in 1..=9 {
            ensure!(first.stdout.contains(&format!("[{step}/9] ")), "no step {step} in\n{}", first.stdout);
        }
        ensure!(first.stdout.contains("token issued"), "{}", first.stdout);
        ensure!(first.stdout.contains(&format!("enrolled {target} as {NAME}")), "{}", first.stdout);

        let node = nodes.get(NAME).await?;
        let annotation = node.metadata.annotations.clone().unwrap_or_default();
        ensure!(
            annotation.get("mesh.harness.dev/enrolled-via").map(String::as_str) == Some(&format!("ssh://{target}")),
            "annotations: {annotation:?}"
        );
        ensure!(node.spec.endpoint.as_deref() == Some(endpoint.as_str()), "spec: {:?}", node.spec);
        let status = node.status.clone().context("no status")?;
        let key = status.public_key.clone().context("no public key")?;
        let mesh_ip: Ipv4Addr = status.mesh_ip.clone().context("no mesh IP")?.parse()?;
        // The machine's identity is a ServiceAccount of its own, bound to the agent roles; no
        // Pod anchors it (kube-controller-manager's pod GC would delete a Pod on a node that no
        // Kubernetes Node backs, and the token with it).
        ensure!(accounts.get_opt(&account).await?.is_some(), "no ServiceAccount {NAMESPACE}/{account}");
        ensure!(role_bindings.get_opt(&account).await?.is_some(), "no RoleBinding {NAMESPACE}/{account}");
        ensure!(cluster_bindings.get_opt(&cluster_binding).await?.is_some(), "no ClusterRoleBinding {cluster_binding}");
        ensure!(pods.get_opt(&format!("mesh-agent-{NAME}")).await?.is_none(), "enroll made a placeholder Pod");

        // On the machine: the key was made there, the kubeconfig is private, the device is up.
        let device_key = mesh.nodes.exec_ok(SSH_NODE, &["wg", "show", "wg-harness", "public-key"])?;
        ensure!(device_key.trim() == key, "device key {device_key:?} is not the published {key}");
        let modes = mesh.nodes.exec_ok(
            SSH_NODE,
            &["stat", "-c", "%a %n", "/etc/harness-mesh/kubeconfig", TOKEN_FILE, "/var/lib/harness-mesh/private.key"],
        )?;
        ensure!(
            [
                "600 /etc/harness-mesh/kubeconfig",
                "600 /etc/harness-mesh/token",
                "600 /var/lib/harness-mesh/private.key"
            ]
            .iter()
            .all(|m| modes.contains(m)),
            "{modes}"
        );
        // The credential: 10 minutes, for the API server's audience, and the kubeconfig only
        // names its file (which the agent renews).
        let first_token = mesh.nodes.exec_ok(SSH_NODE, &["cat", TOKEN_FILE])?;
        let claims = token_claims(&first_token)?;
        ensure!(claims["exp"].as_i64().zip(claims["iat"].as_i64()).map(|(e, i)| e - i) == Some(600), "{claims}");
        ensure!(claims["aud"] == json!([LAB_ISSUER]), "the token's audience: {}", claims["aud"]);
        let file_kubeconfig = mesh.nodes.exec_ok(SSH_NODE, &["cat", "/etc/harness-mesh/kubeconfig"])?;
        ensure!(
            file_kubeconfig.contains(&format!("tokenFile: {TOKEN_FILE}"))
                && !file_kubeconfig.contains(first_token.trim()),
            "{file_kubeconfig}"
        );
        // The same credential as a kubeconfig this test can use, the token inline.
        let token_kubeconfig =
            file_kubeconfig.replace(&format!("tokenFile: {TOKEN_FILE}"), &format!("token: {}", first_token.trim()));
        let copy = std::env::temp_dir().join(format!("hm-enroll-token-{}.kubeconfig", std::process::id()));
        std::fs::write(&copy, &token_kubeconfig)?;
        let machine_kubectl = |args: &[&str]| {
            let mut all = vec!["--kubeconfig", path(&copy)?];
            all.extend(args);
            mesh.cluster.kubectl(&all)
        };

        // The node restriction: the machine's token may not touch another node's MeshNode (a
        // server-side apply of its status, as the agent writes its own).
        let machine = kube::Client::try_from(
            kube::Config::from_custom_kubeconfig(
                kube::config::Kubeconfig::from_yaml(&token_kubeconfig)?,
                &kube::config::KubeConfigOptions::default(),
            )
            .await?,
        )?;
        let other = &mesh.nodes.names[0];
        let patch = json!({"apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode",
                           "status": {"endpoint": "192.168.77.250:51820"}});
        let denied = Api::<MeshNode>::all(machine)
            .patch_status(other, &PatchParams::apply("e2e-enroll").force(), &Patch::Apply(&patch))
            .await
            .err()
            .map(|err| err.to_string())
            .unwrap_or_default();
        ensure!(
            denied.contains(&format!("may write only MeshNode {NAME}")),
            "the machine's token was not stopped by the node restriction when writing MeshNode {other}: {denied:?}"
        );

        // Over the mesh, both ways.
        let info = mesh.info().await?;
        for (name, peer) in &info {
            let there = mesh.ping(SSH_NODE, peer.mesh_ip, 3, 0.2)?;
            ensure!(there.received == 3, "{NAME} -> {name} ({}) over the mesh: {there:?}", peer.mesh_ip);
            let back = mesh.ping(name, mesh_ip, 3, 0.2)?;
            ensure!(back.received == 3, "{name} -> {NAME} ({mesh_ip}) over the mesh: {back:?}");
        }

        // A service by name, through the machine's own agent.
        let fqdn = format!("{SERVICE}.default.mesh.local");
        let mut service_ip = None;
        eventually(Duration::from_secs(30), || {
            let answer = mesh.dig(SSH_NODE, mesh_ip, &fqdn, false)?;
            service_ip = Some(*answer.addresses.first().with_context(|| format!("{fqdn}: {answer:?}"))?);
            Ok(())
        })
        .await?;
        let service_ip = service_ip.context("no address")?;
        let took = eventually(Duration::from_secs(30), || {
            let got = mesh.fetch(SSH_NODE, service_ip, SERVICE_PORT)?;
            ensure!(got.as_deref() == Some("enrolled-hello"), "{fqdn} ({service_ip}:{SERVICE_PORT}) answered {got:?}");
            Ok(())
        })
        .await?;
        eprintln!("{NAME} resolved {fqdn} to {service_ip} and reached it after {took:?}");

        // A container on the machine gets its own mesh IP: the seed's remote-host case.
        if harness_mesh_e2e::lab_mode().as_deref() != Some("kubelet") {
            let took = a_container_on_the_machine_is_reached(&mesh).await?;
            eprintln!("a container on {NAME} was reached from {RUNNER} {took:?} after podman run");
        }

        // With real pods (kubelet mode), a pod on the pod network reaches a service on the machine.
        if harness_mesh_e2e::lab_mode().as_deref() == Some("kubelet") {
            let took = a_pod_reaches_a_service_on_the_machine(&mesh).await?;
            eprintln!("a pod on {RUNNER} reached a service on {NAME} after {took:?}");
        }

        // The supervisor starts a killed agent again, with the same key.
        let pid = machine_agent_pid(&mesh)?;
        mesh.nodes.exec_ok(SSH_NODE, &["kill", "-KILL", &pid.to_string()])?;
        let mut new_pid = pid;
        eventually(Duration::from_secs(20), || {
            new_pid = machine_agent_pid(&mesh)?;
            ensure!(new_pid != pid, "still the killed agent {pid}");
            Ok(())
        })
        .await?;
        eprintln!("the supervisor restarted the agent: pid {pid} -> {new_pid}");

        // The agent renews its token by itself: told to renew after 5 % of its life (30 s of
        // 10 min), it replaces the file with a token of the same account, audience and
        // lifetime, issued later, and carries on with it.
        let env = mesh.nodes.exec_ok(SSH_NODE, &["cat", "/etc/harness-mesh/agent.env"])?;
        let renewing = format!("{env}MESH_TOKEN_RENEW_AT=0.05\n");
        write_on_machine(&mesh, "/etc/harness-mesh/agent.env", &renewing)?;
        mesh.nodes.exec_ok(SSH_NODE, &["kill", "-KILL", &new_pid.to_string()])?;
        let renewed = eventually(Duration::from_secs(90), || {
            let token = mesh.nodes.exec_ok(SSH_NODE, &["cat", TOKEN_FILE])?;
            let renewed = token_claims(&token)?;
            ensure!(renewed["iat"].as_i64() > claims["iat"].as_i64(), "the token was not renewed yet");
            ensure!(
                renewed["sub"] == claims["sub"] && renewed["aud"] == claims["aud"],
                "renewed for another account or audience: {renewed}"
            );
            ensure!(renewed["exp"].as_i64().zip(renewed["iat"].as_i64()).map(|(e, i)| e - i) == Some(600), "{renewed}");
            Ok(())
        })
        .await?;
        eprintln!("the agent renewed its token within {renewed:?}");
        write_on_machine(&mesh, "/etc/harness-mesh/agent.env", &env)?;
        let renewing_pid = machine_agent_pid(&mesh)?;
        mesh.nodes.exec_ok(SSH_NODE, &["kill", "-KILL", &renewing_pid.to_string()])?;
        eventually(Duration::from_secs(20), || {
            new_pid = machine_agent_pid(&mesh)?;
            ensure!(new_pid != renewing_pid, "still the killed agent {renewing_pid}");
            Ok(())
        })
        .await?;
        mesh.wait_connected(Duration::from_secs(60)).await?;

        // Again: nothing changes.
        let version = nodes.get(NAME).await?.metadata.resource_version;
        let again = meshctl(&args, Duration::from_secs(180))?.ok()?;
        eprintln!("second enroll took {:.1} s:\n{}", again.took.as_secs_f64(), again.stdout);
        for unchanged in ["MeshNode unchanged", "token kept", "already installed", "(unchanged)", "already running"] {
            ensure!(
                again.stdout.contains(unchanged),
                "the re-run changed something ({unchanged:?} missing):\n{}",
                again.stdout
            );
        }
        ensure!(nodes.get(NAME).await?.metadata.resource_version == version, "the re-run changed MeshNode {NAME}");
        ensure!(machine_agent_pid(&mesh)? == new_pid, "the re-run restarted the agent");

        // Unenroll.
        let mut args = vec!["unenroll", NAME];
        args.extend(ssh.iter().map(String::as_str));
        let gone = meshctl(&args, Duration::from_secs(120))?.ok()?;
        eprintln!("unenroll took {:.1} s:\n{}", gone.took.as_secs_f64(), gone.stdout);
        ensure!(nodes.get_opt(NAME).await?.is_none(), "MeshNode {NAME} is still there");
        ensure!(accounts.get_opt(&account).await?.is_none(), "ServiceAccount {account} is still there");
        ensure!(role_bindings.get_opt(&account).await?.is_none(), "RoleBinding {account} is still there");
        ensure!(cluster_bindings.get_opt(&cluster_binding).await?.is_none(), "{cluster_binding} is still there");
        let left = eventually(Duration::from_secs(30), || {
            for node in &mesh.nodes.names {
                ensure!(!mesh.wg_peers(node)?.contains(&key), "{node} still has {NAME} as a peer");
            }
            Ok(())
        })
        .await?;
        eprintln!("every node dropped {NAME} from its peers {left:?} after unenroll");
        let leftovers = mesh.nodes.exec_ok(SSH_NODE, &["sh", "-c", LEFTOVERS])?;
        ensure!(leftovers.trim().is_empty(), "unenroll left behind on the machine:\n{leftovers}");

        // The token died with its ServiceAccount. The API server caches a token's successful
        // authentication for a few seconds, so give it that long.
        let revoked = eventually(Duration::from_secs(30), || {
            let denied = machine_kubectl(&["get", "--raw", "/api"])?;
            ensure!(
                !denied.status.success() && String::from_utf8_lossy(&denied.stderr).contains("Unauthorized"),
                "the unenrolled machine's token still works: {}",
                String::from_utf8_lossy(&denied.stderr)
            );
            Ok(())
        })
        .await;
        let _ = std::fs::remove_file(&copy);
        let revoked = revoked?;
        eprintln!("the machine's token was refused {revoked:?} after unenroll");

        // The lab's nodes are back to each other only.
        mesh.wait_connected(Duration::from_secs(60)).await?;
        let [first, again, gone] = [first.took, again.took, gone.took].map(|t| t.as_secs_f64());
        eprintln!("enroll {first:.1} s, re-run {again:.1} s, unenroll {gone:.1} s");
        anyhow::Ok(())
    }
    .await;
    let _ = server.kill();
    let _ = server.wait();
    let _ = services.delete(SERVICE, &DeleteParams::default()).await;
    tokio::task::spawn_blocking(move || {
        let mut cleanup = cleanup;
        cleanup.run();
    })
    .await?;
    result
}

#[tokio::test]
async fn enroll_and_unenroll_fail_clearly() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    require_lab()?;
    tokio::task::spawn_blocking(ssh_node_up).await??;
    let mesh = Mesh::get(CONVERGE).await?;
    let nodes: Api<MeshNode> = Api::all(mesh.cluster.client.clone());
    let ssh = lab_ssh_flags()?;
    let scratch = std::env::temp_dir().join(format!("hm-enroll-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let gone = "e2e-enroll-unreachable";
    let mut cleanup = Cleanup { names: vec![], armed: true };
    let result = async {
        let target = format!("root@{SSH_ADDR}");
        let key = path(&ssh_dir().join("client_ed25519"))?.to_owned();
        let known = path(&ssh_dir().join("known_hosts"))?.to_owned();

        // Unknown host key: an empty known_hosts.
        let empty = scratch.join("empty_known_hosts");
        std::fs::write(&empty, "")?;
        let flags = ["--known-hosts".to_owned(), path(&empty)?.to_owned(), "-i".to_owned(), key.clone()];
        let text = meshctl(&enroll_args(&target, NAME, &flags), Duration::from_secs(60))?.failed()?;
        let wants =
            ["unknown host key", "has no key for 192.168.77.200", "ssh-keyscan -p 22 192.168.77.200", "ssh-keygen -lf"];
        for want in wants {
            ensure!(text.contains(want), "{want:?} not in:\n{text}");
        }
        ensure!(std::fs::read_to_string(&empty)?.is_empty(), "the host key was recorded without --accept-new-host-key");

        // Changed host key: known_hosts names another key for the address.
        let other = scratch.join("other_host_key");
        let made = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f", path(&other)?]).output()?;
        ensure!(made.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&made.stderr));
        let public = std::fs::read_to_string(other.with_extension("pub"))?;
        let changed = scratch.join("changed_known_hosts");
        let fields: Vec<&str> = public.split_whitespace().take(2).collect();
        std::fs::write(&changed, format!("{SSH_ADDR} {}\n", fields.join(" ")))?;
        let flags = ["--known-hosts".to_owned(), path(&changed)?.to_owned(), "-i".to_owned(), key.clone()];
        let text = meshctl(&enroll_args(&target, NAME, &flags), Duration::from_secs(60))?.failed()?;
        ensure!(text.contains("has CHANGED") && text.contains("ssh-keygen -R"), "{text}");

        // Failed authentication: a key the machine does not know.
        let wrong = scratch.join("wrong_key");
        let made = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f", path(&wrong)?]).output()?;
        ensure!(made.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&made.stderr));
        let flags = ["--known-hosts".to_owned(), known.clone(), "-i".to_owned(), path(&wrong)?.to_owned()];
        let text = meshctl(&enroll_args(&target, NAME, &flags), Duration::from_secs(60))?.failed()?;
        for want in ["SSH authentication as root@192.168.77.200 failed", "Permission denied", "--identity"] {
            ensure!(text.contains(want), "{want:?} not in:\n{text}");
        }

        // Unreachable: nothing is at that address.
        let run = meshctl(&enroll_args(&format!("root@{NOWHERE}"), NAME, &ssh), Duration::from_secs(60))?;
        let took = run.took;
        let text = run.failed()?;
        ensure!(text.contains(&format!("cannot reach root@{NOWHERE} over SSH")), "{text}");
        ensure!(took < Duration::from_secs(30), "an unreachable host took {took:?} to report");

        // Missing root: the machine's unprivileged user (no sudo). With --accept-new-host-key and a
        // fresh known_hosts, which records the host key on first sight.
        let fresh = scratch.join("fresh_known_hosts");
        std::fs::write(&fresh, "")?;
        let flags = [
            "--known-hosts".to_owned(),
            path(&fresh)?.to_owned(),
            "-i".to_owned(),
            key.clone(),
            "--accept-new-host-key".to_owned(),
        ];
        let text =
            meshctl(&enroll_args(&format!("hm-user@{SSH_ADDR}"), NAME, &flags), Duration::from_secs(60))?.failed()?;
        for want in ["missing root", "hm-user", "passwordless sudo", "log in as root"] {
            ensure!(text.contains(want), "{want:?} not in:\n{text}");
        }
        let lab_key = std::fs::read_to_string(&known)?
            .lines()
            .find(|l| l.starts_with(&format!("{SSH_ADDR} ")))
            .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
            .context("the lab's known_hosts has no key for the SSH node")?;
        ensure!(
            std::fs::read_to_string(&fresh)?.contains(&lab_key),
            "--accept-new-host-key did not record the host key {lab_key}"
        );

        // A taken name: a lab node's MeshNode.
        let text = meshctl(&enroll_args(&target, "hm-node-1", &ssh), Duration::from_secs(60))?.failed()?;
        // Plain lab: the lab wrote it; kubelet mode: mesh-controller mirrors the Node hm-node-1.
        ensure!(
            text.contains("the name hm-node-1 is taken")
                && (text.contains("not enrolled by meshctl") || text.contains("mirrors the Kubernetes Node hm-node-1")),
            "{text}"
        );

        // None of these left anything in the cluster or on the machine.
        ensure!(nodes.get_opt(NAME).await?.is_none(), "a failed enroll left MeshNode {NAME}");
        let installed = mesh.nodes.exec(SSH_NODE, &["test", "-e", "/etc/harness-mesh"])?;
        ensure!(!installed.status.success(), "a failed enroll left /etc/harness-mesh on the machine");

        // unenroll: not for a node meshctl did not enroll.
        let mut args = vec!["unenroll", "hm-node-1"];
        args.extend(ssh.iter().map(String::as_str));
        let text = meshctl(&args, Duration::from_secs(60))?.failed()?;
        ensure!(text.contains("was not enrolled by meshctl"), "{text}");
        ensure!(nodes.get_opt("hm-node-1").await?.is_some(), "unenroll removed a lab node");

        // unenroll: a machine that cannot be reached needs --force.
        let _ = nodes.delete(gone, &DeleteParams::default()).await;
        let object: MeshNode = serde_json::from_value(json!({
            "apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode",
            "metadata": {
                "name": gone,
                "annotations": {"mesh.harness.dev/enrolled-via": format!("ssh://root@{NOWHERE}")},
            },
            "spec": {},
        }))?;
        nodes.create(&PostParams::default(), &object).await?;
        cleanup.names.push("e2e-enroll-unreachable");
        let mut args = vec!["unenroll", gone];
        args.extend(ssh.iter().map(String::as_str));
        let text = meshctl(&args, Duration::from_secs(60))?.failed()?;
        ensure!(text.contains(&format!("cannot reach root@{NOWHERE}")) && text.contains("--force"), "{text}");
        ensure!(nodes.get_opt(gone).await?.is_some(), "unenroll without --force removed {gone}");
        args.push("--force");
        let forced = meshctl(&args, Duration::from_secs(60))?.ok()?;
        ensure!(forced.stdout.contains("may still run the agent"), "{}", forced.stdout);
        ensure!(nodes.get_opt(gone).await?.is_none(), "unenroll --force left MeshNode {gone}");
        anyhow::Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&scratch);
    tokio::task::spawn_blocking(move || cleanup.run()).await?;
    result
}
