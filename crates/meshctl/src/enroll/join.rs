//! enroll's steps, one function each, in the order [`super::enroll`] runs them (steps 2 and 3
//! are [`super::login`]'s, shared with unenroll). Each step prints its progress line, checks
//! before it changes, and changes only what differs, so running enroll again is a no-op that
//! succeeds. What a step decides without I/O is a function of its own, tested here.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use k8s_openapi::jiff::Timestamp;
use tokio::sync::oneshot;

use super::api::{self, Joined, NameState};
use super::args::{CredentialArgs, EnrollArgs, Resolver};
use super::local::{
    agent_binary, binary_arch, is_loopback_url, megabytes, secs, sha256_file, sha256_hex, unix_date, validate_name,
    verify_written,
};
use super::progress::Progress;
use super::remote::{self, Init, Machine, Record};
use super::ssh::{self, Input, Session, Target};
use crate::kubeconfig::{self, ClusterArgs, Connection};

/// What enroll works out before it contacts anything, from its flags and local files.
pub struct Plan {
    /// The MeshNode name, a valid DNS label.
    pub name: String,
    /// The machine.
    pub target: Target,
    /// `ssh://[user@]host[:port]`: recorded on the MeshNode and the ServiceAccount.
    pub via: String,
    /// The CA bundle of `--api-server-ca`, read.
    pub ca_override: Option<String>,
    /// The agent's `--resolver`.
    pub resolver: Resolver,
    /// The agent's `--zone`.
    pub zone: String,
    /// The agent's `--container-socket`, when given.
    pub container_socket: Option<String>,
}

/// The agent binary enroll installs.
pub struct AgentBinary {
    /// Where it is here.
    pub path: PathBuf,
    /// The CPUs (`uname -m`) it runs on.
    pub arch: &'static [&'static str],
    /// Its SHA-256, computed on a thread of its own while steps 1 to 5 run.
    sha: oneshot::Receiver<anyhow::Result<String>>,
}

/// Before step 1: checks the name, the `USER@HOST` and the agent binary (an ELF file for a CPU),
/// reads `--api-server-ca`, and starts hashing the binary.
///
/// Touches nothing but local files: on failure nothing has been contacted or changed.
pub fn prepare(args: &EnrollArgs) -> anyhow::Result<(Plan, AgentBinary)> {
    validate_name(&args.name)?;
    let target = Target::parse(&args.target, args.port)?;
    let via = target.url();
    let path = agent_binary(args.agent_binary.as_deref())?;
    let arch = binary_arch(&path)?;
    // Hashing a large binary takes a while: it runs while the cluster and the machine are checked,
    // on a thread of its own (a blocking task would hold up the runtime's shutdown on an error).
    let (sha_tx, sha) = oneshot::channel();
    std::thread::spawn({
        let path = path.clone();
        move || sha_tx.send(sha256_file(&path))
    });
    let ca_override = match &args.credentials.api_server_ca {
        Some(path) => Some(
            std::fs::read_to_string(path).with_context(|| format!("cannot read --api-server-ca {}", path.display()))?,
        ),
        None => None,
    };
    Ok((
        Plan {
            name: args.name.clone(),
            target,
            via,
            ca_override,
            resolver: args.resolver,
            zone: args.zone.clone(),
            container_socket: args.container_socket.clone(),
        },
        AgentBinary { path, arch, sha },
    ))
}

/// The cluster as step 1 found it, and what the machine gets to reach it.
pub struct ClusterSide {
    /// The cluster, with the user's credentials.
    pub cluster: api::Cluster,
    /// The API server URL the machine uses.
    pub server: String,
    /// The CA bundle the machine trusts for it, if any.
    pub ca_pem: Option<String>,
}

/// Step 1: connects with the user's kubeconfig ([`crate::kubeconfig`]) and checks that the name
/// is free (or already this machine's: enroll runs again), that no other MeshNode was enrolled
/// from this address and no Kubernetes Node has the name, that the machine's ServiceAccount is
/// free or meshctl's for this machine, that the chart's agent ServiceAccount exists, that the
/// machine gets an https:// API server and a CA, and (a dry run) that the API server accepts the
/// MeshNode. Notes a loopback API server, which the machine would look for on its own loopback.
///
/// Only reads and dry-runs: on failure nothing has been changed anywhere.
pub async fn check_cluster(
    progress: &mut Progress,
    args: &EnrollArgs,
    plan: &Plan,
    cluster_args: &ClusterArgs,
) -> anyhow::Result<ClusterSide> {
    let (name, via, creds) = (plan.name.as_str(), plan.via.as_str(), &args.credentials);
    progress.start(format!("checking the name {name} in the cluster"));
    let side = progress
        .run(async {
            let connection = kubeconfig::connect(cluster_args).await?;
            let cluster = api::Cluster::new(&connection);
            let state = api::judge_name(name, via, cluster.meshnode(name).await?.as_ref())?;
            if let Some(other) = cluster.enrolled_elsewhere(name, via).await? {
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
            api::judge_account(&api::machine_account(name), &creds.namespace, via, existing.as_ref())?;
            cluster.require_service_account(&creds.namespace, &creds.service_account).await?;
            let (server, ca_pem) = machine_api_server(creds, plan.ca_override.as_deref(), &connection)?;
            cluster.dry_run_meshnode(name, via, args.endpoint.as_deref()).await?;
            let detail = match state {
                NameState::Free => format!("free; cluster {}", cluster.target),
                NameState::Ours => format!("already enrolled from {via}: checking every step again"),
            };
            Ok((ClusterSide { cluster, server, ca_pem }, detail))
        })
        .await?;
    if creds.api_server.is_none() && is_loopback_url(&side.server) {
        progress.note(&format!(
            "note: the API server in your kubeconfig, {}, is a loopback address: the machine will look for it on \
             its own loopback. If nothing forwards it there, pass the address it can reach with --api-server",
            side.server
        ));
    }
    Ok(side)
}

/// The API server URL and CA the machine gets: `--api-server` and `--api-server-ca`, else the
/// kubeconfig's. Refused: a URL that is not https://, and no CA where the kubeconfig skips TLS
/// verification.
fn machine_api_server(
    creds: &CredentialArgs,
    ca_override: Option<&str>,
    connection: &Connection,
) -> anyhow::Result<(String, Option<String>)> {
    let server = creds.api_server.clone().unwrap_or_else(|| connection.server.clone());
    if !server.starts_with("https://") {
        bail!("the API server URL {server:?} is not https://: pass the one the machine uses with --api-server");
    }
    let ca_pem = ca_override.map(str::to_owned).or_else(|| connection.ca_pem.clone());
    if ca_pem.is_none() && connection.insecure {
        bail!(
            "your kubeconfig skips TLS verification for {}, so there is no CA to give the machine: pass the API \
             server's CA with --api-server-ca FILE",
            connection.server_target()
        );
    }
    Ok((server, ca_pem))
}

/// Step 4: looks at the machine as root (its OS, CPU, init, WireGuard, tools, the files enroll
/// manages and their checksums, meshctl's record of an earlier enrollment, a running agent), and
/// refuses one that cannot take the agent or is enrolled under another name. Warns when the
/// agent would run without a tunnel.
///
/// Only looks: on failure nothing has been changed anywhere.
pub async fn inspect_machine(
    progress: &mut Progress,
    session: &Session,
    plan: &Plan,
    binary_arch: &[&str],
) -> anyhow::Result<Machine> {
    progress.start("looking at the machine");
    let machine = progress
        .run(async {
            let out =
                session.run_as_root("looking at the machine", remote::PROBE, &[], Input::Nothing, secs(30)).await?;
            let machine = remote::parse_probe(&out);
            check_machine(&machine, &plan.name, &plan.target, binary_arch)?;
            let detail = describe_machine(&machine);
            Ok((machine, detail))
        })
        .await?;
    if let Some(problem) = machine.tunnel_problem() {
        progress.note(&format!("warning: {problem}; the agent will run without a tunnel"));
    }
    Ok(machine)
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

/// Step 4's progress detail: `Linux x86_64, supervised process (no systemd), kernel WireGuard`.
fn describe_machine(machine: &Machine) -> String {
    let tunnel = if machine.wireguard_kernel {
        "kernel WireGuard"
    } else if machine.tunnel_problem().is_none() {
        "userspace WireGuard (wireguard-go)"
    } else {
        "no WireGuard"
    };
    format!("{} {}, {}, {tunnel}", machine.os, machine.arch, machine.init().describe())
}

/// The machine's credential as step 5 left it.
pub struct Credential {
    /// meshctl's record for the machine ([`remote::RECORD_PATH`]).
    pub record: Record,
    /// A new kubeconfig and token to write; `None`: the ones on the machine are kept.
    pub fresh: Option<(String, String)>,
}

/// Step 5: applies the MeshNode NAME (annotated with where it was enrolled from) and the
/// machine's ServiceAccount `mesh-machine-NAME` with its role bindings, and issues a token of it
/// unless the machine's current one can be kept (same ServiceAccount, API server and CA, not
/// expired, its kubeconfig unchanged).
///
/// On failure the cluster may hold the MeshNode (no key, so no peer uses it) and the
/// ServiceAccount; nothing on the machine has changed. Running enroll again finishes the job;
/// `meshctl unenroll NAME` removes them.
pub async fn issue_credential(
    progress: &mut Progress,
    args: &EnrollArgs,
    plan: &Plan,
    side: &ClusterSide,
    machine: &Machine,
) -> anyhow::Result<Credential> {
    let (name, via, creds, cluster) = (plan.name.as_str(), plan.via.as_str(), &args.credentials, &side.cluster);
    progress.start(format!("creating MeshNode {name} and the agent's credential"));
    progress
        .run(async {
            let meshnode = cluster.apply_meshnode(name, via, args.endpoint.as_deref()).await?;
            let (account_uid, sa) =
                cluster.apply_machine_account(&creds.namespace, name, &creds.service_account, via).await?;
            let ca_sha256 = side.ca_pem.as_deref().map(|ca| sha256_hex(ca.as_bytes())).unwrap_or_default();
            let summary = format!(
                "MeshNode {}, ServiceAccount {}/{} {}",
                meshnode.word(),
                creds.namespace,
                api::machine_account(name),
                sa.word()
            );
            let now = Timestamp::now().as_second();
            if let Some(record) = kept_record(machine, name, &account_uid, &side.server, &ca_sha256, now) {
                let record = Record { enrolled_via: via.to_owned(), ..record.clone() };
                let detail = format!("{summary}, token kept (valid until {})", unix_date(record.token_expires));
                return Ok((Credential { record, fresh: None }, detail));
            }
            let audience = match &creds.token_audience {
                Some(audience) => audience.clone(),
                None => cluster.issuer().await?,
            };
            let (token, expires) = cluster.issue_token(&creds.namespace, name, creds.token_duration, &audience).await?;
            let kubeconfig = api::agent_kubeconfig(&side.server, side.ca_pem.as_deref(), remote::TOKEN_PATH, name)?;
            let record = Record {
                name: name.to_owned(),
                enrolled_via: via.to_owned(),
                account_uid,
                token_expires: expires.as_second(),
                api_server: side.server.clone(),
                ca_sha256,
                kubeconfig_sha256: sha256_hex(kubeconfig.as_bytes()),
            };
            let detail = format!(
                "{summary}, token issued for audience {audience} (valid until {}, renewed by the agent)",
                unix_date(expires.as_second())
            );
            Ok((Credential { record, fresh: Some((kubeconfig, token)) }, detail))
        })
        .await
}

/// The machine's record of an earlier enrollment, if the token it names can be kept: the same
/// name, ServiceAccount (uid), API server and CA, a token not yet expired at `now` (the agent
/// renews the token it was given; only an expired one needs a new), the kubeconfig as written
/// with it, and the token in a file of its own.
fn kept_record<'m>(
    machine: &'m Machine,
    name: &str,
    account_uid: &str,
    server: &str,
    ca_sha256: &str,
    now: i64,
) -> Option<&'m Record> {
    machine.record.as_ref().filter(|r| {
        r.name == name
            && r.account_uid == account_uid
            && r.api_server == server
            && r.ca_sha256 == ca_sha256
            && r.token_expires > now
            && machine.files.get(remote::KUBECONFIG_PATH) == Some(&r.kubeconfig_sha256)
            // Enrolled before tokens were renewed (a token inside the kubeconfig): reissue.
            && machine.files.contains_key(remote::TOKEN_PATH)
    })
}

/// Step 6: copies the agent binary to [`remote::AGENT_PATH`] (written to a temporary file, then
/// moved into place) unless the machine has it already, and checks its SHA-256 there. Returns
/// whether it changed.
///
/// On failure the machine keeps the binary it had (or none), and the cluster holds what step 5
/// made; running enroll again goes on from here.
pub async fn install_binary(
    progress: &mut Progress,
    session: &Session,
    binary: AgentBinary,
    machine: &Machine,
) -> anyhow::Result<bool> {
    let size = std::fs::metadata(&binary.path).map(|m| m.len()).unwrap_or(0);
    progress.start(format!("installing mesh-agent ({}) as {}", megabytes(size), remote::AGENT_PATH));
    progress
        .run(async {
            let local = binary.sha.await.context("hashing the agent binary: the thread died")??;
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
                    Input::File(&binary.path),
                    limit,
                )
                .await?;
            verify_written(&out, &local, remote::AGENT_PATH)?;
            Ok((true, format!("uploaded and verified in {:.1} s", took.elapsed().as_secs_f64())))
        })
        .await
}

/// A file enroll writes on the machine.
#[derive(Debug, PartialEq, Eq)]
struct RemoteFile {
    path: &'static str,
    /// Its mode, for `chmod`.
    mode: &'static str,
    content: String,
}

/// Step 7: writes the agent's token and kubeconfig (0600, when step 5 issued new ones), its
/// environment, its systemd unit or supervisor, and last meshctl's record, each only when its
/// checksum differs, and checks each after writing. Returns whether anything but the record
/// changed (then the agent restarts).
///
/// Each file is replaced whole (a temporary file, then `mv`), so on failure every file is the
/// old one or the new one; the record, written last, vouches only for a complete set. Running
/// enroll again writes what still differs.
pub async fn write_configuration(
    progress: &mut Progress,
    session: &Session,
    plan: &Plan,
    namespace: &str,
    machine: &Machine,
    credential: &Credential,
) -> anyhow::Result<bool> {
    progress.start("writing the agent's configuration");
    progress
        .run(async {
            let files = agent_files(plan, namespace, machine.init(), credential);
            let mut written = Vec::new();
            for file in files_to_write(files, machine) {
                let out = session
                    .run_as_root(
                        &format!("writing {}", file.path),
                        remote::WRITE_FILE,
                        &[file.path, file.mode],
                        Input::Bytes(file.content.as_bytes()),
                        secs(30),
                    )
                    .await?;
                verify_written(&out, &sha256_hex(file.content.as_bytes()), file.path)?;
                written.push(file.path);
            }
            let restart = written.iter().any(|path| *path != remote::RECORD_PATH);
            let detail =
                if written.is_empty() { "unchanged".to_owned() } else { format!("wrote {}", written.join(", ")) };
            Ok((restart, detail))
        })
        .await
}

/// Every file of step 7, in the order written: the token and kubeconfig when new, the
/// environment, the unit or the supervisor, and the record last.
fn agent_files(plan: &Plan, namespace: &str, init: Init, credential: &Credential) -> Vec<RemoteFile> {
    let (name, resolver, zone) = (&plan.name, plan.resolver, &plan.zone);
    let file = |path, mode, content| RemoteFile { path, mode, content };
    let mut files = Vec::new();
    if let Some((kubeconfig, token)) = &credential.fresh {
        files.push(file(remote::TOKEN_PATH, "600", token.clone()));
        files.push(file(remote::KUBECONFIG_PATH, "600", kubeconfig.clone()));
    }
    files.push(file(
        remote::ENV_PATH,
        "644",
        remote::agent_env(name, resolver, zone, plan.container_socket.as_deref()),
    ));
    match init {
        Init::Systemd => files.push(file(remote::UNIT_PATH, "644", remote::systemd_unit(namespace, resolver))),
        Init::Supervised => files.push(file(remote::SUPERVISOR_PATH, "755", remote::supervisor_script(namespace))),
    }
    // The record last: it vouches for the kubeconfig written before it.
    files.push(file(remote::RECORD_PATH, "644", credential.record.render()));
    files
}

/// The files whose checksum on the machine differs from what enroll would write.
fn files_to_write(files: Vec<RemoteFile>, machine: &Machine) -> Vec<RemoteFile> {
    files.into_iter().filter(|f| machine.files.get(f.path) != Some(&sha256_hex(f.content.as_bytes()))).collect()
}

/// Step 8: starts the agent (systemd service, or the supervisor under `setsid`), restarting it
/// when `restart` (its binary or configuration changed), else only making sure it runs; fails
/// with the end of its log when it does not stay up for a second.
///
/// On failure everything is installed but the agent does not run; the error shows why (its
/// log). Fix that and run enroll again, or `meshctl unenroll NAME`.
pub async fn start_agent(progress: &mut Progress, session: &Session, init: Init, restart: bool) -> anyhow::Result<()> {
    progress.start(format!("{} the agent ({})", if restart { "starting" } else { "checking" }, init.describe()));
    progress
        .run(async {
            let mode = if restart { "restart" } else { "ensure" };
            let out = session
                .run_as_root(
                    "starting mesh-agent",
                    &remote::start_script(),
                    &[mode, init_word(init)],
                    Input::Nothing,
                    secs(60),
                )
                .await?;
            Ok(((), started_detail(&out)))
        })
        .await
}

/// The start script's name for `init`.
fn init_word(init: Init) -> &'static str {
    match init {
        Init::Systemd => "systemd",
        Init::Supervised => "supervised",
    }
}

/// Step 8's progress detail, from the start script's `agent=PID` and `state=` lines.
fn started_detail(out: &str) -> String {
    let field = |key: &str| out.lines().find_map(|l| l.strip_prefix(key)).unwrap_or("?").to_owned();
    match field("state=").as_str() {
        "running" => format!("already running, pid {}", field("agent=")),
        _ => format!("running, pid {}", field("agent=")),
    }
}

/// Step 9: waits (at most `--wait`; skipped with `--no-wait`) until the agent has published
/// its key, mesh-controller has given it a mesh IP, and it reports Connected, with a note as
/// each happens. Returns how it joined, `None` when skipped.
///
/// Changes nothing. On failure the machine stays enrolled (its agent keeps trying); the error
/// ends with the agent's log, and says to run enroll again to keep waiting or unenroll.
pub async fn wait_until_joined(
    progress: &mut Progress,
    session: &Session,
    cluster: &api::Cluster,
    name: &str,
    args: &EnrollArgs,
) -> anyhow::Result<Option<Joined>> {
    if args.no_wait {
        progress.start(format!("waiting for {name} to join the mesh"));
        progress.skip("--no-wait");
        return Ok(None);
    }
    progress.start(format!("waiting for {name} to join the mesh (at most {} s)", args.wait.as_secs()));
    progress.newline();
    let waited = Instant::now();
    match cluster.wait_joined(name, args.wait, |text| progress.note(text)).await {
        Ok(joined) => {
            progress.note(&format!("connected: {}", joined.connected));
            progress.ok(format!("joined after {:.1} s", waited.elapsed().as_secs_f64()));
            Ok(Some(joined))
        }
        Err(err) => {
            progress.fail();
            let log = session
                .run_as_root("reading the agent's log", remote::LOG_TAIL, &["20"], Input::Nothing, secs(20))
                .await
                .unwrap_or_else(|e| format!("(could not read it: {e:#})"));
            Err(anyhow!(
                "{err:#}. The end of the agent's log on the machine:\n{}\n{name} is enrolled: run enroll again to \
                 keep waiting, or remove it with `meshctl unenroll {name}`",
                ssh::last_lines(&log, 20)
            ))
        }
    }
}

/// enroll's last line: `enrolled root@h as edge-1 (mesh IP 10.42.0.9) in 12.3 s`.
pub fn summary(plan: &Plan, joined: Option<&Joined>, took: Duration) -> String {
    let (target, name, seconds) = (&plan.target, &plan.name, took.as_secs_f64());
    match joined {
        Some(joined) => format!("enrolled {target} as {name} (mesh IP {}) in {seconds:.1} s", joined.mesh_ip),
        None => format!("enrolled {target} as {name} in {seconds:.1} s"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn probe(output: &str) -> Machine {
        remote::parse_probe(output)
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
        let no_setsid = check_machine(&probe("os=Linux\narch=x86_64\ntool=sha256sum\n"), "e", &target, &["x86_64"]);
        assert!(no_setsid.unwrap_err().to_string().contains("neither systemd nor setsid"));
        let systemd = probe("os=Linux\narch=x86_64\nsystemd=yes\ntool=sha256sum\n");
        assert!(check_machine(&systemd, "e", &target, &["x86_64"]).is_ok(), "systemd needs no setsid");
        let no_sum = check_machine(&probe("os=Linux\narch=x86_64\nsystemd=yes\n"), "e", &target, &["x86_64"]);
        assert!(no_sum.unwrap_err().to_string().contains("no sha256sum"));
    }

    #[test]
    fn the_machine_is_described_by_its_tunnel() {
        assert_eq!(
            describe_machine(&probe("os=Linux\narch=x86_64\nwireguard_kernel=yes\nsystemd=yes\n")),
            "Linux x86_64, systemd service harness-mesh-agent, kernel WireGuard"
        );
        assert_eq!(
            describe_machine(&probe("os=Linux\narch=aarch64\ntool=wireguard-go\ntun=yes\n")),
            "Linux aarch64, supervised process (no systemd), userspace WireGuard (wireguard-go)"
        );
        assert_eq!(
            describe_machine(&probe("os=Linux\narch=x86_64\n")),
            "Linux x86_64, supervised process (no systemd), no WireGuard"
        );
    }

    fn connection(server: &str, ca: Option<&str>, insecure: bool) -> Connection {
        let config = kube::Config::new(server.parse().unwrap());
        Connection {
            client: kube::Client::try_from(config).unwrap(),
            url: format!("{server}/"),
            server: server.to_owned(),
            context: Some("lab".to_owned()),
            ca_pem: ca.map(str::to_owned),
            insecure,
        }
    }

    fn creds(api_server: Option<&str>) -> CredentialArgs {
        CredentialArgs {
            namespace: "harness-mesh".into(),
            service_account: "harness-mesh-agent".into(),
            token_duration: Duration::from_secs(3600),
            token_audience: None,
            api_server: api_server.map(str::to_owned),
            api_server_ca: None,
        }
    }

    #[tokio::test]
    async fn the_machine_gets_an_https_server_and_a_ca() {
        let lab = connection("https://127.0.0.1:6443", Some("CA"), false);
        assert_eq!(
            machine_api_server(&creds(None), None, &lab).unwrap(),
            ("https://127.0.0.1:6443".to_owned(), Some("CA".to_owned()))
        );
        assert_eq!(
            machine_api_server(&creds(Some("https://10.0.0.1:6443")), Some("MINE"), &lab).unwrap(),
            ("https://10.0.0.1:6443".to_owned(), Some("MINE".to_owned())),
            "the flags win over the kubeconfig"
        );
        let plain = machine_api_server(&creds(Some("http://10.0.0.1:8080")), None, &lab).unwrap_err().to_string();
        assert!(plain.contains("\"http://10.0.0.1:8080\" is not https://"), "{plain}");
        let open = connection("https://10.0.0.1:6443", None, true);
        let err = machine_api_server(&creds(None), None, &open).unwrap_err().to_string();
        assert!(err.contains("skips TLS verification for https://10.0.0.1:6443 (context lab)"), "{err}");
        assert!(err.contains("--api-server-ca FILE"), "{err}");
        assert!(machine_api_server(&creds(None), Some("CA"), &open).is_ok(), "--api-server-ca makes up for it");
        let no_ca = connection("https://10.0.0.1:6443", None, false);
        assert_eq!(machine_api_server(&creds(None), None, &no_ca).unwrap().1, None, "the system's roots then");
    }

    fn enrolled(kubeconfig_on_machine: Option<&str>, token_file: bool) -> Machine {
        let record = Record {
            name: "edge-1".into(),
            enrolled_via: "ssh://root@h".into(),
            account_uid: "uid-1".into(),
            token_expires: 2_000,
            api_server: "https://k:6443".into(),
            ca_sha256: "ca".into(),
            kubeconfig_sha256: "kc".into(),
        };
        let mut files = BTreeMap::new();
        if let Some(sum) = kubeconfig_on_machine {
            files.insert(remote::KUBECONFIG_PATH.to_owned(), sum.to_owned());
        }
        if token_file {
            files.insert(remote::TOKEN_PATH.to_owned(), "t".to_owned());
        }
        Machine { record: Some(record), files, ..Machine::default() }
    }

    #[test]
    fn a_token_is_kept_only_while_everything_it_was_issued_for_holds() {
        let ok = enrolled(Some("kc"), true);
        assert!(kept_record(&ok, "edge-1", "uid-1", "https://k:6443", "ca", 1_000).is_some());
        assert!(kept_record(&ok, "edge-1", "uid-1", "https://k:6443", "ca", 2_000).is_none(), "expired");
        assert!(kept_record(&ok, "edge-2", "uid-1", "https://k:6443", "ca", 1_000).is_none(), "another name");
        assert!(kept_record(&ok, "edge-1", "uid-2", "https://k:6443", "ca", 1_000).is_none(), "a new account");
        assert!(kept_record(&ok, "edge-1", "uid-1", "https://j:6443", "ca", 1_000).is_none(), "another server");
        assert!(kept_record(&ok, "edge-1", "uid-1", "https://k:6443", "", 1_000).is_none(), "another CA");
        let edited = enrolled(Some("changed"), true);
        assert!(kept_record(&edited, "edge-1", "uid-1", "https://k:6443", "ca", 1_000).is_none());
        let old_style = enrolled(Some("kc"), false);
        assert!(kept_record(&old_style, "edge-1", "uid-1", "https://k:6443", "ca", 1_000).is_none());
        assert!(kept_record(&Machine::default(), "edge-1", "uid-1", "https://k:6443", "ca", 1_000).is_none());
    }

    /// A plan for `edge-1` at `root@h:2222`, with the defaults.
    fn plan() -> Plan {
        Plan {
            name: "edge-1".into(),
            target: Target::parse("root@h:2222", None).unwrap(),
            via: "ssh://root@h:2222".into(),
            ca_override: None,
            resolver: Resolver::Auto,
            zone: "mesh.local".into(),
            container_socket: None,
        }
    }

    #[test]
    fn the_configuration_is_written_record_last_and_only_where_it_differs() {
        let record = enrolled(None, false).record.unwrap();
        let fresh = Credential { record: record.clone(), fresh: Some(("KUBECONFIG".into(), "TOKEN".into())) };
        let plan = plan();
        let files = agent_files(&plan, "mesh", Init::Supervised, &fresh);
        let order: Vec<(&str, &str)> = files.iter().map(|f| (f.path, f.mode)).collect();
        assert_eq!(
            order,
            [
                (remote::TOKEN_PATH, "600"),
                (remote::KUBECONFIG_PATH, "600"),
                (remote::ENV_PATH, "644"),
                (remote::SUPERVISOR_PATH, "755"),
                (remote::RECORD_PATH, "644"),
            ]
        );
        assert_eq!(files[0].content, "TOKEN");
        assert_eq!(files[4].content, record.render());
        let kept = Credential { record, fresh: None };
        let files = agent_files(&plan, "mesh", Init::Systemd, &kept);
        let paths: Vec<&str> = files.iter().map(|f| f.path).collect();
        assert_eq!(paths, [remote::ENV_PATH, remote::UNIT_PATH, remote::RECORD_PATH]);
        assert!(files[1].content.contains("--lease-namespace mesh "));

        let mut machine = Machine::default();
        for file in &files {
            machine.files.insert(file.path.to_owned(), sha256_hex(file.content.as_bytes()));
        }
        assert!(files_to_write(agent_files(&plan, "mesh", Init::Systemd, &kept), &machine).is_empty());
        machine.files.insert(remote::ENV_PATH.to_owned(), "edited".to_owned());
        let again = files_to_write(agent_files(&plan, "mesh", Init::Systemd, &kept), &machine);
        assert_eq!(again.iter().map(|f| f.path).collect::<Vec<_>>(), [remote::ENV_PATH]);
    }

    #[test]
    fn the_start_script_is_read_back() {
        assert_eq!(init_word(Init::Systemd), "systemd");
        assert_eq!(init_word(Init::Supervised), "supervised");
        assert_eq!(started_detail("agent=4242\nstate=started\n"), "running, pid 4242");
        assert_eq!(started_detail("agent=77\nstate=running\n"), "already running, pid 77");
        assert_eq!(started_detail(""), "running, pid ?");
    }

    #[test]
    fn the_last_line_names_the_mesh_ip_when_it_waited() {
        let plan = plan();
        let joined = Joined { mesh_ip: "10.42.0.9".into(), connected: "all 3 peers reachable".into() };
        assert_eq!(
            summary(&plan, Some(&joined), Duration::from_millis(12_340)),
            "enrolled root@h:2222 as edge-1 (mesh IP 10.42.0.9) in 12.3 s"
        );
        assert_eq!(summary(&plan, None, Duration::from_secs(3)), "enrolled root@h:2222 as edge-1 in 3.0 s");
    }
}
