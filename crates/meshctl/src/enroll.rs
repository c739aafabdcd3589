//! `meshctl enroll USER@HOST --name NAME` and `meshctl unenroll NAME`: bring a remote Linux
//! machine into the mesh over SSH, and take it out again.
//!
//! enroll, one progress line per step, each re-checked and changed only when it differs, so
//! running it again is a no-op that succeeds. Each step is a function of its own ([`join`],
//! [`login`]) whose doc says what it leaves behind when it fails:
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
//! unenroll ([`leave`]): 1. finds where NAME was enrolled from; 2 and 3. SSH and root as above;
//! 4. stops and removes everything on the machine; 5. deletes the MeshNode (every other node
//! drops the peer) and the machine's ServiceAccount (which revokes the token) with its role
//! bindings. `--force` goes on with the cluster side when the machine cannot be reached.
//!
//! The tree: [`args`] (the flags, which [`crate::cli`] names) and [`progress`] depend on nothing
//! here; [`ssh`] on [`args`]; [`login`] on [`ssh`]; [`join`] and [`leave`] on those, [`api`],
//! [`remote`] and [`local`]. Outside it, only [`crate::kubeconfig`] (the shared loader) and
//! [`crate::util`].

mod api;
mod args;
mod join;
mod leave;
mod local;
mod login;
mod progress;
mod remote;
mod ssh;

use std::time::Instant;

pub use args::{ENROLL_AFTER_HELP, EnrollArgs, UNENROLL_AFTER_HELP, UnenrollArgs};
use progress::{Progress, say};

use crate::kubeconfig::ClusterArgs;

/// Enrolls the machine: the steps of the module docs, in order; the first that fails ends it.
pub async fn enroll(args: EnrollArgs, cluster: &ClusterArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let (plan, binary) = join::prepare(&args)?;
    let mut progress = Progress::new(9);
    let side = join::check_cluster(&mut progress, &args, &plan, cluster).await?;
    let mut session = login::connect(&mut progress, &plan.target, &args.ssh).await?;
    login::check_privileges(&mut progress, &mut session).await?;
    let machine = join::inspect_machine(&mut progress, &session, &plan, binary.arch).await?;
    let credential = join::issue_credential(&mut progress, &args, &plan, &side, &machine).await?;
    let binary_changed = join::install_binary(&mut progress, &session, binary, &machine).await?;
    let namespace = &args.credentials.namespace;
    let config_changed =
        join::write_configuration(&mut progress, &session, &plan, namespace, &machine, &credential).await?;
    join::start_agent(&mut progress, &session, machine.init(), binary_changed || config_changed).await?;
    let joined = join::wait_until_joined(&mut progress, &session, &side.cluster, &plan.name, &args).await?;
    say(&join::summary(&plan, joined.as_ref(), started.elapsed()));
    Ok(())
}

/// Unenrolls the machine: removes everything from it, then the MeshNode and the machine's
/// ServiceAccount (with `--force`, the cluster side also when the machine cannot be cleaned).
pub async fn unenroll(args: UnenrollArgs, cluster: &ClusterArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    local::validate_name(&args.name)?;
    let mut progress = Progress::new(5);
    let (cluster, target) = leave::find_enrollment(&mut progress, &args, cluster).await?;
    let cleaned = async {
        let mut session = login::connect(&mut progress, &target, &args.ssh).await?;
        login::check_privileges(&mut progress, &mut session).await?;
        leave::remove_agent(&mut progress, &session, &args.name).await
    }
    .await;
    if let Err(err) = &cleaned {
        leave::go_on_without_machine(&mut progress, err, &args)?;
    }
    leave::delete_from_cluster(&mut progress, &cluster, &args).await?;
    say(&leave::summary(&args.name, &target, cleaned.is_ok(), started.elapsed()));
    Ok(())
}
