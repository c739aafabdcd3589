//! `meshctl enroll USER@HOST --name NAME` and `meshctl unenroll NAME`: bring a remote Linux
//! machine into the mesh over SSH, and take it out again.
//!
//! enroll, one progress line per step, each re-checked and changed only when it differs, so
//! running it again is a no-op that succeeds:
//!
//! 1. the cluster: NAME is free (or already this machine's), the agent ServiceAccount exists, and
//!    the MeshNode passes the API server's validation (a dry run);
//! 2. SSH with the system OpenSSH client ([`ssh`]): the host key is checked against known_hosts,
//!    never skipped;
//! 3. root, or passwordless sudo;
//! 4. the machine: Linux, the agent binary's CPU, systemd or not, WireGuard, and that it is not
//!    enrolled under another name;
//! 5. the MeshNode NAME (annotated `mesh.harness.dev/enrolled-via: ssh://user@host[:port]`), the
//!    machine's own ServiceAccount `mesh-machine-NAME` bound to the chart's agent roles, and a
//!    token of it; the chart's node restriction confines that ServiceAccount to MeshNode NAME and
//!    Lease `mesh-agent-NAME` ([`api`]);
//! 6. the agent binary, at `/usr/local/bin/mesh-agent`;
//! 7. its kubeconfig (0600), environment, and a systemd unit where systemd is PID 1, else a small
//!    supervisor ([`remote`]);
//! 8. the agent (re)started; it makes its private key on the machine, and the key never leaves it;
//! 9. a bounded wait until it has published its key, has a mesh IP and reaches its peers.
//!
//! unenroll: stops and removes everything on the machine (over SSH, with the same checks), then
//! deletes the MeshNode (every other node drops the peer) and the machine's ServiceAccount (which
//! revokes the token) with its role bindings.
//! `--force` goes on with the cluster side when the machine cannot be reached.

mod api;
mod remote;
mod ssh;

use std::fmt::Display;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::Args;
use k8s_openapi::jiff::Timestamp;
use sha2::{Digest, Sha256};

use crate::cli::{ClusterArgs, parse_duration};
use api::NameState;
use remote::{Init, Machine, Record};
use ssh::{Input, Session, Target};

/// How to reach the machine over SSH (enroll and unenroll).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "SSH")]
pub struct SshArgs {
    /// The known_hosts file to check the machine's host key against [default: ssh's own,
    /// ~/.ssh/known_hosts]
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,

    /// Trust the host key of a machine seen for the first time and record it (ssh's
    /// StrictHostKeyChecking=accept-new; a changed key is still refused). Off by default: verify
    /// the key and add it to known_hosts instead
    #[arg(long)]
    pub accept_new_host_key: bool,

    /// The private key to log in with [default: ssh's own: ssh-agent, ~/.ssh/id_*, ~/.ssh/config]
    #[arg(short = 'i', long, value_name = "FILE")]
    pub identity: Option<PathBuf>,

    /// An ssh option as for `ssh -o` (repeatable), e.g. ProxyJump=bastion. Host key checking
    /// cannot be changed this way
    #[arg(long = "ssh-option", value_name = "KEY=VALUE")]
    pub ssh_options: Vec<String>,

    /// Give up connecting after this long
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
}

/// `meshctl enroll` arguments.
#[derive(Args, Debug, Clone)]
pub struct EnrollArgs {
    /// The machine, as for ssh: [USER@]HOST[:PORT] (USER root, or one with passwordless sudo)
    #[arg(value_name = "USER@HOST")]
    pub target: String,

    /// Its MeshNode name, a DNS label (lowercase letters, digits, '-'); it is reachable as
    /// NAME.node.mesh.local
    #[arg(long)]
    pub name: String,

    /// The WireGuard endpoint other nodes send to, HOST:PORT (MeshNode spec.endpoint) [default:
    /// the address the agent detects, port 51820]
    #[arg(long, value_name = "HOST:PORT")]
    pub endpoint: Option<String>,

    /// The SSH port [default: the one in USER@HOST:PORT, else ssh's (22, or your ssh config's)]
    #[arg(short = 'p', long)]
    pub port: Option<u16>,

    /// The mesh-agent binary to install (Linux, the machine's CPU) [default: mesh-agent next to
    /// meshctl]
    #[arg(long, value_name = "PATH")]
    pub agent_binary: Option<PathBuf>,

    /// How long to wait for the agent to join the mesh
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_duration)]
    pub wait: Duration,

    /// Do not wait for the agent to join the mesh
    #[arg(long)]
    pub no_wait: bool,

    #[command(flatten)]
    pub ssh: SshArgs,

    #[command(flatten)]
    pub credentials: CredentialArgs,
}

/// Where the agent's credential comes from, and how the machine reaches the API server.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Agent credentials")]
pub struct CredentialArgs {
    /// The namespace harness-mesh is installed in: the agent ServiceAccount, the machines'
    /// ServiceAccounts and the agents' Leases
    #[arg(long, default_value = "harness-mesh")]
    pub namespace: String,

    /// The chart's agent ServiceAccount: the machine's own ServiceAccount gets the roles named
    /// like it
    #[arg(long, default_value = "harness-mesh-agent")]
    pub service_account: String,

    /// How long each token of the machine is valid (10m at least). The agent renews its token
    /// by itself once half of that has passed, so a copy taken from the machine stops working
    /// within this time; a machine that stays off for longer needs enroll again
    #[arg(long, value_name = "DURATION", default_value = "168h", value_parser = parse_duration)]
    pub token_duration: Duration,

    /// The audience the machine's tokens are issued for [default: the API server's issuer, from
    /// its /.well-known/openid-configuration, which is the audience it accepts unless
    /// --api-audiences says otherwise]
    #[arg(long, value_name = "AUDIENCE")]
    pub token_audience: Option<String>,

    /// The API server URL the machine uses [default: your kubeconfig's]
    #[arg(long, value_name = "URL")]
    pub api_server: Option<String>,

    /// The CA bundle (PEM) the machine trusts for the API server [default: your kubeconfig's]
    #[arg(long, value_name = "FILE")]
    pub api_server_ca: Option<PathBuf>,
}

/// `meshctl unenroll` arguments.
#[derive(Args, Debug, Clone)]
pub struct UnenrollArgs {
    /// The MeshNode name the machine was enrolled as
    pub name: String,

    /// Remove it from the cluster even when the machine cannot be reached or cleaned (whatever
    /// runs there keeps running until removed by hand; the steps are printed)
    #[arg(long)]
    pub force: bool,

    /// The SSH port [default: the one recorded at enrollment]
    #[arg(short = 'p', long)]
    pub port: Option<u16>,

    /// The namespace harness-mesh is installed in (where the machine's ServiceAccount is)
    #[arg(long, default_value = "harness-mesh")]
    pub namespace: String,

    #[command(flatten)]
    pub ssh: SshArgs,
}

/// Help text shown after `meshctl enroll --help`.
pub const ENROLL_AFTER_HELP: &str = "\
Examples:
  meshctl enroll root@203.0.113.10 --name edge-1
  meshctl enroll admin@edge-2.example.org --name edge-2 --endpoint 198.51.100.7:51820 -i ~/.ssh/edge
  meshctl enroll root@10.1.2.3 --name lab-box --known-hosts ./known_hosts --agent-binary ./mesh-agent

Host keys are always checked. For a machine not in your known_hosts yet, verify its key first:
  ssh-keyscan 203.0.113.10 > host.keys; ssh-keygen -lf host.keys   # compare with the machine's
  cat host.keys >> ~/.ssh/known_hosts
The machine's token lasts 7 days (--token-duration) and its agent renews it at half its life;
a machine that was off for longer needs enroll again. Running enroll again changes only what
differs (and issues a new token once the one it issued has expired).
Without systemd, the agent runs under a small supervisor, which nothing starts at boot: enroll
again after a reboot. Undo everything with: meshctl unenroll NAME";

/// Help text shown after `meshctl unenroll --help`.
pub const UNENROLL_AFTER_HELP: &str = "\
Examples:
  meshctl unenroll edge-1
  meshctl unenroll edge-1 --force     # the machine is gone: clean up the cluster side";

/// Enrolls the machine; see the module docs for the steps.
pub async fn enroll(args: EnrollArgs, cluster: &ClusterArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let name = args.name.as_str();
    validate_name(name)?;
    let target = Target::parse(&args.target, args.port)?;
    let via = target.url();
    let binary = agent_binary(args.agent_binary.as_deref())?;
    let binary_arch = binary_arch(&binary)?;
    // Hashing a large binary takes a while: it runs while the cluster and the machine are checked,
    // on a thread of its own (a blocking task would hold up the runtime's shutdown on an error).
    let (sha_tx, binary_sha) = tokio::sync::oneshot::channel();
    std::thread::spawn({
        let binary = binary.clone();
        move || sha_tx.send(sha256_file(&binary))
    });
    let ca_override = match &args.credentials.api_server_ca {
        Some(path) => Some(
            std::fs::read_to_string(path).with_context(|| format!("cannot read --api-server-ca {}", path.display()))?,
        ),
        None => None,
    };
    let creds = &args.credentials;
    let account = api::machine_account(name);
    let mut progress = Progress::new(9);

    // 1. The cluster.
    progress.start(format!("checking the name {name} in the cluster"));
    let (cluster, server, ca_pem) = progress
        .run(async {
            let cluster = api::connect(cluster).await?;
            let state = api::judge_name(name, &via, cluster.meshnode(name).await?.as_ref())?;
            if let Some(other) = cluster.enrolled_elsewhere(name, &via).await? {
                bail!(
                    "{via} is already enrolled as MeshNode {other}: a machine joins the mesh once. Run enroll with \
                     --name {other}, or remove it first with `meshctl unenroll {other}`"
                );
            }
            if state == NameState::Free && cluster.kubernetes_node_exists(name).await? {
                bail!(
                    "the name {name} is taken: a Kubernetes Node is called {name}, and mesh-controller mirrors it \
                     into a MeshNode of that name. Choose another --name"
                );
            }
            let existing = cluster.machine_account(&creds.namespace, name).await?;
            api::judge_account(&account, &creds.namespace, &via, existing.as_ref())?;
            cluster.require_service_account(&creds.namespace, &creds.service_account).await?;
            let server = creds.api_server.clone().unwrap_or_else(|| cluster.server.clone());
            if !server.starts_with("https://") {
                bail!("the API server URL {server:?} is not https://: pass the one the machine uses with --api-server");
            }
            let ca_pem = ca_override.clone().or_else(|| cluster.ca_pem.clone());
            if ca_pem.is_none() && cluster.insecure {
                bail!(
                    "your kubeconfig skips TLS verification for {}, so there is no CA to give the machine: pass the \
                     API server's CA with --api-server-ca FILE",
                    cluster.target
                );
            }
            cluster.dry_run_meshnode(name, &via, args.endpoint.as_deref()).await?;
            let detail = match state {
                NameState::Free => format!("free; cluster {}", cluster.target),
                NameState::Ours => format!("already enrolled from {via}: checking every step again"),
            };
            Ok(((cluster, server, ca_pem), detail))
        })
        .await?;

    if creds.api_server.is_none() && is_loopback_url(&server) {
        progress.note(&format!(
            "note: the API server in your kubeconfig, {server}, is a loopback address: the machine will look for it \
             on its own loopback. If nothing forwards it there, pass the address it can reach with --api-server"
        ));
    }

    // 2. SSH.
    let known =
        args.ssh.known_hosts.as_ref().map_or_else(|| "~/.ssh/known_hosts".to_owned(), |p| p.display().to_string());
    progress.start(format!("connecting to {target} (host key checked against {known})"));
    let mut session = progress
        .run(async {
            let session = Session::connect(&target, &args.ssh).await?;
            Ok((session, String::new()))
        })
        .await?;

    // 3. Privileges.
    progress.start("checking privileges");
    let sudo = progress.run(privileges(&session)).await?;
    session.sudo = sudo;

    // 4. The machine.
    progress.start("looking at the machine");
    let machine = progress
        .run(async {
            let out =
                session.run_as_root("looking at the machine", remote::PROBE, &[], Input::Nothing, secs(30)).await?;
            let machine = remote::parse_probe(&out);
            check_machine(&machine, name, &target, binary_arch)?;
            let tunnel = if machine.wireguard_kernel {
                "kernel WireGuard"
            } else if machine.tunnel_problem().is_none() {
                "userspace WireGuard (wireguard-go)"
            } else {
                "no WireGuard"
            };
            let detail = format!("{} {}, {}, {tunnel}", machine.os, machine.arch, machine.init().describe());
            Ok((machine, detail))
        })
        .await?;
    if let Some(problem) = machine.tunnel_problem() {
        progress.note(&format!("warning: {problem}; the agent will run without a tunnel"));
    }
    let init = machine.init();

    // 5. MeshNode, ServiceAccount, token.
    progress.start(format!("creating MeshNode {name} and the agent's credential"));
    let (record, kubeconfig) = progress
        .run(async {
            let meshnode = cluster.apply_meshnode(name, &via, args.endpoint.as_deref()).await?;
            let (account_uid, sa) =
                cluster.apply_machine_account(&creds.namespace, name, &creds.service_account, &via).await?;
            let ca_sha256 = ca_pem.as_deref().map(|ca| sha256_hex(ca.as_bytes())).unwrap_or_default();
            let now = Timestamp::now().as_second();
            let kept = machine.record.as_ref().filter(|r| {
                r.name == name
                    && r.account_uid == account_uid
                    && r.api_server == server
                    && r.ca_sha256 == ca_sha256
                    // The agent renews the token it was given; only an expired one needs a new.
                    && r.token_expires > now
                    && machine.files.get(remote::KUBECONFIG_PATH) == Some(&r.kubeconfig_sha256)
                    // Enrolled before tokens were renewed (a token inside the kubeconfig): reissue.
                    && machine.files.contains_key(remote::TOKEN_PATH)
            });
            let summary =
                format!("MeshNode {}, ServiceAccount {}/{account} {}", meshnode.word(), creds.namespace, sa.word());
            if let Some(record) = kept {
                let record = Record { enrolled_via: via.clone(), ..record.clone() };
                let detail = format!("{summary}, token kept (valid until {})", unix_date(record.token_expires));
                return Ok(((record, None), detail));
            }
            let audience = match &creds.token_audience {
                Some(audience) => audience.clone(),
                None => cluster.issuer().await?,
            };
            let (token, expires) = cluster.issue_token(&creds.namespace, name, creds.token_duration, &audience).await?;
            let kubeconfig = api::agent_kubeconfig(&server, ca_pem.as_deref(), remote::TOKEN_PATH, name)?;
            let record = Record {
                name: name.to_owned(),
                enrolled_via: via.clone(),
                account_uid,
                token_expires: expires.as_second(),
                api_server: server.clone(),
                ca_sha256,
                kubeconfig_sha256: sha256_hex(kubeconfig.as_bytes()),
            };
            let detail = format!(
                "{summary}, token issued for audience {audience} (valid until {}, renewed by the agent)",
                unix_date(expires.as_second())
            );
            Ok(((record, Some((kubeconfig, token))), detail))
        })
        .await?;

    // 6. The binary.
    let size = std::fs::metadata(&binary).map(|m| m.len()).unwrap_or(0);
    progress.start(format!("installing mesh-agent ({}) as {}", megabytes(size), remote::AGENT_PATH));
    let binary_changed = progress
        .run(async {
            let local = binary_sha.await.context("hashing the agent binary: the thread died")??;
            if machine.files.get(remote::AGENT_PATH) == Some(&local) {
                return Ok((false, "already installed".to_owned()));
            }
            let took = Instant::now();
            let limit = secs(60) + Duration::from_secs(size / (512 * 1024));
            let out = session
                .run_as_root(
                    "uploading mesh-agent",
                    remote::WRITE_FILE,
                    &[remote::AGENT_PATH, "755"],
                    Input::File(&binary),
                    limit,
                )
                .await?;
            verify_written(&out, &local, remote::AGENT_PATH)?;
            Ok((true, format!("uploaded and verified in {:.1} s", took.elapsed().as_secs_f64())))
        })
        .await?;

    // 7. Configuration.
    progress.start("writing the agent's configuration");
    let config_changed = progress
        .run(async {
            let mut files: Vec<(&str, &str, String)> = Vec::new();
            if let Some((kubeconfig, token)) = &kubeconfig {
                files.push((remote::TOKEN_PATH, "600", token.clone()));
                files.push((remote::KUBECONFIG_PATH, "600", kubeconfig.clone()));
            }
            files.push((remote::ENV_PATH, "644", remote::agent_env(name)));
            match init {
                Init::Systemd => files.push((remote::UNIT_PATH, "644", remote::systemd_unit(&creds.namespace))),
                Init::Supervised => {
                    files.push((remote::SUPERVISOR_PATH, "755", remote::supervisor_script(&creds.namespace)));
                }
            }
            // The record last: it vouches for the kubeconfig written before it.
            files.push((remote::RECORD_PATH, "644", record.render()));
            let mut written = Vec::new();
            let mut restart = false;
            for (path, mode, content) in &files {
                let sum = sha256_hex(content.as_bytes());
                if machine.files.get(*path) == Some(&sum) {
                    continue;
                }
                let out = session
                    .run_as_root(
                        &format!("writing {path}"),
                        remote::WRITE_FILE,
                        &[path, mode],
                        Input::Bytes(content.as_bytes()),
                        secs(30),
                    )
                    .await?;
                verify_written(&out, &sum, path)?;
                written.push(*path);
                restart |= *path != remote::RECORD_PATH;
            }
            let detail =
                if written.is_empty() { "unchanged".to_owned() } else { format!("wrote {}", written.join(", ")) };
            Ok((restart, detail))
        })
        .await?;

    // 8. The agent.
    let restart = binary_changed || config_changed;
    progress.start(format!("{} the agent ({})", if restart { "starting" } else { "checking" }, init.describe()));
    progress
        .run(async {
            let mode = if restart { "restart" } else { "ensure" };
            let init_word = match init {
                Init::Systemd => "systemd",
                Init::Supervised => "supervised",
            };
            let out = session
                .run_as_root(
                    "starting mesh-agent",
                    &remote::start_script(),
                    &[mode, init_word],
                    Input::Nothing,
                    secs(60),
                )
                .await?;
            let field = |key: &str| out.lines().find_map(|l| l.strip_prefix(key)).unwrap_or("?").to_owned();
            let detail = match field("state=").as_str() {
                "running" => format!("already running, pid {}", field("agent=")),
                _ => format!("running, pid {}", field("agent=")),
            };
            Ok(((), detail))
        })
        .await?;

    // 9. The wait.
    if args.no_wait {
        progress.start(format!("waiting for {name} to join the mesh"));
        progress.skip("--no-wait");
    } else {
        progress.start(format!("waiting for {name} to join the mesh (at most {} s)", args.wait.as_secs()));
        progress.newline();
        let waited = Instant::now();
        let joined = cluster.wait_joined(name, args.wait, |text| progress.note(text)).await;
        match joined {
            Ok(joined) => {
                progress.note(&format!("connected: {}", joined.connected));
                progress.ok(format!("joined after {:.1} s", waited.elapsed().as_secs_f64()));
                say(&format!(
                    "enrolled {target} as {name} (mesh IP {}) in {:.1} s",
                    joined.mesh_ip,
                    started.elapsed().as_secs_f64()
                ));
            }
            Err(err) => {
                progress.fail();
                let log = session
                    .run_as_root("reading the agent's log", remote::LOG_TAIL, &["20"], Input::Nothing, secs(20))
                    .await
                    .unwrap_or_else(|e| format!("(could not read it: {e:#})"));
                return Err(anyhow!(
                    "{err:#}. The end of the agent's log on the machine:\n{}\n{name} is enrolled: run enroll again \
                     to keep waiting, or remove it with `meshctl unenroll {name}`",
                    ssh::last_lines(&log, 20)
                ));
            }
        }
        return Ok(());
    }
    say(&format!("enrolled {target} as {name} in {:.1} s", started.elapsed().as_secs_f64()));
    Ok(())
}

/// Unenrolls the machine: removes everything from it, then the MeshNode and the machine's
/// ServiceAccount.
pub async fn unenroll(args: UnenrollArgs, cluster: &ClusterArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let name = args.name.as_str();
    validate_name(name)?;
    let account = api::machine_account(name);
    let namespace = args.namespace.as_str();
    let mut progress = Progress::new(5);

    // 1. What the cluster says.
    progress.start(format!("looking up {name} in the cluster"));
    let (cluster, target) = progress
        .run(async {
            let cluster = api::connect(cluster).await?;
            let meshnode = cluster.meshnode(name).await?;
            let sa = cluster.machine_account(namespace, name).await?;
            let recorded =
                |annotations: &std::collections::BTreeMap<String, String>| annotations.get(api::ENROLLED_VIA).cloned();
            let via = match (&meshnode, &sa) {
                (Some(node), _) => match recorded(node.metadata.annotations.as_ref().unwrap_or(&Default::default())) {
                    Some(via) => via,
                    None => bail!(
                        "MeshNode {name} was not enrolled by meshctl (it has no {} annotation): unenroll removes only \
                         machines that meshctl enroll added. Delete it with kubectl if you mean to",
                        api::ENROLLED_VIA
                    ),
                },
                (None, Some(sa)) => match recorded(sa.metadata.annotations.as_ref().unwrap_or(&Default::default())) {
                    Some(via) => via,
                    None => {
                        bail!("no machine is enrolled as {name} (the ServiceAccount {namespace}/{account} is not meshctl's)")
                    }
                },
                (None, None) => bail!(
                    "no machine is enrolled as {name}: there is no MeshNode {name} (`meshctl status` lists the nodes)"
                ),
            };
            let mut target = Target::from_url(&via)?;
            if args.port.is_some() {
                target.port = args.port;
            }
            let detail =
                format!("enrolled from {via}{}", if meshnode.is_none() { " (MeshNode already gone)" } else { "" });
            Ok(((cluster, target), detail))
        })
        .await?;

    // 2-4. The machine.
    let cleaned = remove_from_machine(&mut progress, &target, name, &args).await;
    if let Err(err) = &cleaned {
        if !args.force {
            return Err(anyhow!(
                "{err:#}\nNothing was removed. If the machine is gone for good, remove {name} from the cluster with \
                 `meshctl unenroll {name} --force`"
            ));
        }
        progress.note(&format!("{err:#}"));
        progress.note("--force: going on with the cluster side");
    }

    // 5. The cluster.
    progress.last();
    progress.start(format!(
        "deleting MeshNode {name} and ServiceAccount {namespace}/{account} (revokes the agent's token)"
    ));
    progress
        .run(async {
            let node = cluster.delete_meshnode(name, secs(30)).await?;
            let sa = cluster.delete_machine_account(namespace, name).await?;
            let detail = match (node, sa) {
                (true, true) => "both deleted".to_owned(),
                (true, false) => "MeshNode deleted; the ServiceAccount was already gone".to_owned(),
                (false, true) => "ServiceAccount deleted; the MeshNode was already gone".to_owned(),
                (false, false) => "both were already gone".to_owned(),
            };
            Ok(((), detail))
        })
        .await?;
    if cleaned.is_err() {
        say(&format!(
            "{name} is out of the cluster (its token is revoked), but {target} may still run the agent. As root there: \
             `kill $(cat /run/harness-mesh/supervisor.pid)` (or `systemctl disable --now harness-mesh-agent`), \
             `ip link delete wg-harness`, `rm -rf /etc/harness-mesh {} {}`",
            remote::STATE_DIR,
            remote::AGENT_PATH
        ));
    } else {
        say(&format!(
            "unenrolled {name} ({target}) in {:.1} s; every other node drops it from its peers",
            started.elapsed().as_secs_f64()
        ));
    }
    Ok(())
}

/// Steps 2 to 4 of unenroll.
async fn remove_from_machine(
    progress: &mut Progress,
    target: &Target,
    name: &str,
    args: &UnenrollArgs,
) -> anyhow::Result<()> {
    let known =
        args.ssh.known_hosts.as_ref().map_or_else(|| "~/.ssh/known_hosts".to_owned(), |p| p.display().to_string());
    progress.start(format!("connecting to {target} (host key checked against {known})"));
    let mut session = progress
        .run(async {
            let session = Session::connect(target, &args.ssh).await?;
            Ok((session, String::new()))
        })
        .await?;
    progress.start("checking privileges");
    session.sudo = progress.run(privileges(&session)).await?;
    progress.start("stopping the agent and removing it from the machine");
    progress
        .run(async {
            let out = session
                .run_as_root("removing the agent", &remote::uninstall_script(), &[name], Input::Nothing, secs(60))
                .await?;
            let detail = if out.lines().any(|l| l == "removed") {
                "agent stopped; its files, state (private key), WireGuard device and port rules removed".to_owned()
            } else if let Some(other) = out.lines().find_map(|l| l.strip_prefix("enrolled-as=")) {
                format!("left alone: the machine is enrolled as {other} now")
            } else {
                "nothing was installed there".to_owned()
            };
            Ok(((), detail))
        })
        .await
}

/// Step 3: root, or passwordless sudo; returns whether commands need sudo.
async fn privileges(session: &Session) -> anyhow::Result<(bool, String)> {
    const CHECK: &str = r#"echo "uid=$(id -u)"
if [ "$(id -u)" != 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then echo sudo=missing
  elif sudo -n true >/dev/null 2>&1; then echo sudo=yes
  else echo sudo=password; fi
fi
"#;
    let out = session.run_as_login("checking privileges", CHECK, &[], Input::Nothing, secs(30)).await?;
    let value = |key: &str| out.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_default().to_owned();
    let who = session.target.user.clone().unwrap_or_else(|| "the login user".to_owned());
    if value("uid=") == "0" {
        return Ok((false, "root".to_owned()));
    }
    let host = &session.target.host;
    let fix = format!(
        "log in as root (root@{host}), or give {who} passwordless sudo on the machine (a line `{who} ALL=(ALL) \
         NOPASSWD: ALL` in /etc/sudoers.d/harness-mesh)"
    );
    match value("sudo=").as_str() {
        "yes" => Ok((true, format!("{who} with passwordless sudo"))),
        "password" => bail!("missing root: {who} on {host} is not root and sudo asks for a password; {fix}"),
        _ => bail!("missing root: {who} on {host} is not root and has no sudo; {fix}"),
    }
}

/// Step 4's checks.
fn check_machine(machine: &Machine, name: &str, target: &Target, binary_arch: &[&str]) -> anyhow::Result<()> {
    if machine.os != "Linux" {
        bail!("{target} runs {:?}, not Linux: mesh-agent runs on Linux only", machine.os);
    }
    if !binary_arch.contains(&machine.arch.as_str()) {
        bail!(
            "the agent binary is for {}, but {target} is {}: build mesh-agent for it (e.g. cargo build --release -p \
             mesh-agent --target {}-unknown-linux-gnu) and pass it with --agent-binary",
            binary_arch.first().unwrap_or(&"another CPU"),
            machine.arch,
            machine.arch
        );
    }
    if let Some(record) = &machine.record
        && record.name != name
    {
        bail!(
            "{target} is already enrolled as {} (see {} there): a machine joins the mesh once. Run enroll with --name \
             {}, or remove it first with `meshctl unenroll {}`",
            record.name,
            remote::RECORD_PATH,
            record.name,
            record.name
        );
    }
    if machine.init() == Init::Supervised && !machine.has("setsid") {
        bail!("{target} has neither systemd nor setsid (util-linux): install util-linux, then run enroll again");
    }
    if !machine.has("sha256sum") {
        bail!("{target} has no sha256sum (coreutils), which enroll uses to check what it copies: install coreutils");
    }
    Ok(())
}

/// Fails unless `name` is a DNS label (it becomes `NAME.node.mesh.local` and `mesh-agent-NAME`).
pub fn validate_name(name: &str) -> anyhow::Result<()> {
    let ok = (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        bail!(
            "{name:?} is not a valid node name: use 1-63 lowercase letters, digits and '-', starting and ending with a \
             letter or digit (it becomes {name}.node.mesh.local)"
        )
    }
}

/// Whether `url`'s host is a loopback name or address.
fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `--agent-binary`, else `mesh-agent` next to the running meshctl.
fn agent_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(path) => path.to_path_buf(),
        None => {
            let exe = std::env::current_exe().context("cannot tell where meshctl is, to find mesh-agent next to it")?;
            exe.with_file_name("mesh-agent")
        }
    };
    if !path.is_file() {
        bail!(
            "no agent binary at {}: build it (cargo build --release -p mesh-agent) and pass it with --agent-binary \
             PATH (the default is mesh-agent next to meshctl)",
            path.display()
        );
    }
    Ok(path)
}

/// The CPUs (`uname -m` names) the binary runs on.
fn binary_arch(path: &Path) -> anyhow::Result<&'static [&'static str]> {
    let mut header = [0u8; 64];
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let n = std::io::Read::read(&mut file, &mut header).with_context(|| format!("cannot read {}", path.display()))?;
    remote::elf_arch(&header[..n]).ok_or_else(|| {
        anyhow!(
            "{} is not a Linux executable (no ELF header): pass the mesh-agent binary with --agent-binary",
            path.display()
        )
    })
}

/// Checks the `sha256sum` line WRITE_FILE printed.
fn verify_written(out: &str, want: &str, path: &str) -> anyhow::Result<()> {
    let got = out.split_whitespace().next().unwrap_or_default();
    if got == want {
        Ok(())
    } else {
        bail!(
            "{path} on the machine has SHA-256 {got:?} after writing, not {want}: the copy was damaged; run enroll \
             again"
        )
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn megabytes(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / 1e6)
}

fn unix_date(seconds: i64) -> String {
    Timestamp::from_second(seconds)
        .map_or_else(|_| seconds.to_string(), |t| t.strftime("%Y-%m-%d %H:%M UTC").to_string())
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Prints a line on stdout (a closed stdout is not worth failing for).
fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

/// Numbered progress lines: `[3/9] checking privileges ... ok (root)`.
struct Progress {
    step: usize,
    total: usize,
    /// Whether the current step's line waits for its outcome.
    open: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        Self { step: 0, total, open: false }
    }

    fn write(&mut self, text: &str) {
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "{text}");
        let _ = out.flush();
    }

    /// Skips to just before the last step (the ones between were not reached).
    fn last(&mut self) {
        self.step = self.total - 1;
    }

    /// Begins the next step's line.
    fn start(&mut self, what: impl Display) {
        self.step += 1;
        let line = format!("[{}/{}] {what} ... ", self.step, self.total);
        self.write(&line);
        self.open = true;
    }

    /// Ends the current line (for a step that prints notes).
    fn newline(&mut self) {
        if self.open {
            self.write("\n");
            self.open = false;
        }
    }

    /// A line under the current step.
    fn note(&mut self, text: &str) {
        self.newline();
        self.write(&format!("      {text}\n"));
    }

    fn finish(&mut self, word: &str, detail: &str) {
        let text = if detail.is_empty() { word.to_owned() } else { format!("{word} ({detail})") };
        if self.open {
            self.write(&format!("{text}\n"));
        } else {
            self.write(&format!("      {text}\n"));
        }
        self.open = false;
    }

    fn ok(&mut self, detail: impl Display) {
        self.finish("ok", &detail.to_string());
    }

    fn skip(&mut self, why: &str) {
        self.finish("skipped", why);
    }

    fn fail(&mut self) {
        self.finish("failed", "");
    }

    /// Awaits a step; prints `ok (detail)` or `failed`.
    async fn run<T>(&mut self, step: impl Future<Output = anyhow::Result<(T, String)>>) -> anyhow::Result<T> {
        match step.await {
            Ok((value, detail)) => {
                self.ok(detail);
                Ok(value)
            }
            Err(err) => {
                self.fail();
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_dns_labels() {
        for good in ["edge-1", "a", "x1", &"a".repeat(63)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Edge", "-a", "a-", "a.b", "a_b", &"a".repeat(64)] {
            let err = validate_name(bad).unwrap_err().to_string();
            assert!(err.contains("not a valid node name"), "{bad}: {err}");
        }
    }

    #[test]
    fn loopback_api_servers_are_noticed() {
        assert!(is_loopback_url("https://127.0.0.1:16443"));
        assert!(is_loopback_url("https://localhost:6443/"));
        assert!(is_loopback_url("https://[::1]:6443"));
        assert!(!is_loopback_url("https://10.0.0.1:6443"));
        assert!(!is_loopback_url("https://k8s.example.org"));
    }

    #[test]
    fn hashes_and_sizes_read_well() {
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(megabytes(233_052_280), "233 MB");
        assert_eq!(unix_date(0), "1970-01-01 00:00 UTC");
        assert!(verify_written("ab  /x\n", "ab", "/x").is_ok());
        assert!(verify_written("", "ab", "/x").unwrap_err().to_string().contains("damaged"));
    }

    #[test]
    fn machines_that_cannot_take_the_agent_are_refused() {
        let target = Target::parse("root@h", None).unwrap();
        let machine = remote::parse_probe("os=Linux\narch=x86_64\ntool=setsid\ntool=sha256sum\n");
        assert!(check_machine(&machine, "edge-1", &target, &["x86_64"]).is_ok());
        let arm = check_machine(&machine, "edge-1", &target, &["aarch64"]).unwrap_err().to_string();
        assert!(arm.contains("for aarch64, but root@h is x86_64"), "{arm}");
        let other = remote::parse_probe("os=Linux\narch=x86_64\ntool=setsid\ntool=sha256sum\nrecord.name=old\n");
        let err = check_machine(&other, "edge-1", &target, &["x86_64"]).unwrap_err().to_string();
        assert!(err.contains("already enrolled as old"), "{err}");
        assert!(check_machine(&remote::parse_probe("os=Darwin\narch=x86_64\n"), "e", &target, &["x86_64"]).is_err());
    }
}
