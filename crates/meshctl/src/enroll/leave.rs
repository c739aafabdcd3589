//! unenroll's steps, one function each, in the order [`super::unenroll`] runs them (steps 2 and
//! 3 are [`super::login`]'s, shared with enroll). The machine is cleaned first, so a machine
//! that cannot be reached keeps its MeshNode unless `--force` says to go on.

use std::io::Write;
use std::time::Duration;

use anyhow::{anyhow, bail};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::ResourceExt;
use mesh_api::MeshNode;

use super::api;
use super::args::UnenrollArgs;
use super::local::secs;
use super::progress::Progress;
use super::remote;
use super::ssh::{Input, Session, Target};
use crate::kubeconfig::{self, ClusterArgs};

/// Step 1: connects with the user's kubeconfig ([`crate::kubeconfig`]) and finds where machine
/// NAME was enrolled from, on its MeshNode (or, when that is gone, on its ServiceAccount);
/// `--port` overrides the recorded port. Refuses a MeshNode meshctl did not enroll.
///
/// Only reads: on failure nothing has been changed anywhere.
pub async fn find_enrollment(
    progress: &mut Progress,
    args: &UnenrollArgs,
    cluster_args: &ClusterArgs,
) -> anyhow::Result<(api::Cluster, Target)> {
    let (name, namespace) = (args.name.as_str(), args.namespace.as_str());
    progress.start(format!("looking up {name} in the cluster"));
    progress
        .run(async {
            let cluster = api::Cluster::new(&kubeconfig::connect(cluster_args).await?);
            let meshnode = cluster.meshnode(name).await?;
            let sa = cluster.machine_account(namespace, name).await?;
            let via = recorded_via(name, namespace, meshnode.as_ref(), sa.as_ref())?;
            let mut target = Target::from_url(&via)?;
            if args.port.is_some() {
                target.port = args.port;
            }
            let detail =
                format!("enrolled from {via}{}", if meshnode.is_none() { " (MeshNode already gone)" } else { "" });
            Ok(((cluster, target), detail))
        })
        .await
}

/// Where machine `name` was enrolled from (`ssh://...`), as its MeshNode records it, else its
/// ServiceAccount; an error when neither exists or the one found is not meshctl's.
fn recorded_via(
    name: &str,
    namespace: &str,
    meshnode: Option<&MeshNode>,
    sa: Option<&ServiceAccount>,
) -> anyhow::Result<String> {
    match (meshnode, sa) {
        (Some(node), _) => match node.annotations().get(api::ENROLLED_VIA) {
            Some(via) => Ok(via.clone()),
            None => bail!(
                "MeshNode {name} was not enrolled by meshctl (it has no {} annotation): unenroll removes only \
                 machines that meshctl enroll added. Delete it with kubectl if you mean to",
                api::ENROLLED_VIA
            ),
        },
        (None, Some(sa)) => match sa.annotations().get(api::ENROLLED_VIA) {
            Some(via) => Ok(via.clone()),
            None => bail!(
                "no machine is enrolled as {name} (the ServiceAccount {namespace}/{} is not meshctl's)",
                api::machine_account(name)
            ),
        },
        (None, None) => {
            bail!("no machine is enrolled as {name}: there is no MeshNode {name} (`meshctl status` lists the nodes)")
        }
    }
}

/// Step 4: stops the agent and removes everything enroll installed on the machine, and what the
/// agent leaves behind by design (its WireGuard device and daemon, its port rules), unless the
/// machine is enrolled under another name now.
///
/// The script stops the agent before it removes anything; on failure part of the files may be
/// gone, and running unenroll again removes the rest. The cluster is not touched.
pub async fn remove_agent(progress: &mut Progress, session: &Session, name: &str) -> anyhow::Result<()> {
    progress.start("stopping the agent and removing it from the machine");
    progress
        .run(async {
            let out = session
                .run_as_root("removing the agent", &remote::uninstall_script(), &[name], Input::Nothing, secs(60))
                .await?;
            Ok(((), removal_detail(&out)))
        })
        .await
}

/// Step 4's progress detail, from the uninstall script's last line.
fn removal_detail(out: &str) -> String {
    if out.lines().any(|l| l == "removed") {
        "agent stopped; its files, state (private key), WireGuard device and port rules removed".to_owned()
    } else if let Some(other) = out.lines().find_map(|l| l.strip_prefix("enrolled-as=")) {
        format!("left alone: the machine is enrolled as {other} now")
    } else {
        "nothing was installed there".to_owned()
    }
}

/// Between steps 4 and 5: when the machine could not be cleaned, stops unenroll (nothing was
/// removed from the cluster) unless `--force`, which notes the error and goes on.
pub fn go_on_without_machine<W: Write>(
    progress: &mut Progress<W>,
    err: &anyhow::Error,
    args: &UnenrollArgs,
) -> anyhow::Result<()> {
    let name = &args.name;
    if !args.force {
        return Err(anyhow!(
            "{err:#}\nNothing was removed. If the machine is gone for good, remove {name} from the cluster with \
             `meshctl unenroll {name} --force`"
        ));
    }
    progress.note(&format!("{err:#}"));
    progress.note("--force: going on with the cluster side");
    Ok(())
}

/// Step 5 (always the last line, also when steps 2 to 4 were cut short): deletes the MeshNode
/// and waits until mesh-controller has released its mesh IP (every other node drops the peer),
/// then the machine's ServiceAccount (which revokes its token) with its Role and bindings.
///
/// Each delete tolerates what is already gone; on failure some of it may remain, and running
/// unenroll again deletes the rest.
pub async fn delete_from_cluster(
    progress: &mut Progress,
    cluster: &api::Cluster,
    args: &UnenrollArgs,
) -> anyhow::Result<()> {
    let (name, namespace) = (args.name.as_str(), args.namespace.as_str());
    progress.last();
    progress.start(format!(
        "deleting MeshNode {name} and ServiceAccount {namespace}/{} (revokes the agent's token)",
        api::machine_account(name)
    ));
    progress
        .run(async {
            let node = cluster.delete_meshnode(name, secs(30)).await?;
            let sa = cluster.delete_machine_account(namespace, name).await?;
            Ok(((), deletion_detail(node, sa)))
        })
        .await
}

/// Step 5's progress detail: which of the two existed.
fn deletion_detail(meshnode: bool, service_account: bool) -> String {
    match (meshnode, service_account) {
        (true, true) => "both deleted",
        (true, false) => "MeshNode deleted; the ServiceAccount was already gone",
        (false, true) => "ServiceAccount deleted; the MeshNode was already gone",
        (false, false) => "both were already gone",
    }
    .to_owned()
}

/// unenroll's last line: done, or (after `--force`) what to remove by hand on the machine.
pub fn summary(name: &str, target: &Target, cleaned: bool, took: Duration) -> String {
    if cleaned {
        format!("unenrolled {name} ({target}) in {:.1} s; every other node drops it from its peers", took.as_secs_f64())
    } else {
        format!(
            "{name} is out of the cluster (its token is revoked), but {target} may still run the agent. As root there: \
             `kill $(cat /run/harness-mesh/supervisor.pid)` (or `systemctl disable --now harness-mesh-agent`), \
             `ip link delete wg-harness`, `rm -rf /etc/harness-mesh {} {}`",
            remote::STATE_DIR,
            remote::AGENT_PATH
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mesh_api::MeshNodeSpec;

    use super::*;

    fn annotated(via: Option<&str>) -> Option<BTreeMap<String, String>> {
        Some(via.map(|v| BTreeMap::from([(api::ENROLLED_VIA.to_owned(), v.to_owned())])).unwrap_or_default())
    }

    #[test]
    fn the_machine_is_found_where_enroll_recorded_it() {
        let mut node = MeshNode::new("edge-1", MeshNodeSpec::default());
        node.metadata.annotations = annotated(Some("ssh://root@h:2222"));
        let mut sa = ServiceAccount::default();
        sa.metadata.annotations = annotated(Some("ssh://admin@h"));
        assert_eq!(recorded_via("edge-1", "mesh", Some(&node), Some(&sa)).unwrap(), "ssh://root@h:2222");
        assert_eq!(recorded_via("edge-1", "mesh", None, Some(&sa)).unwrap(), "ssh://admin@h", "MeshNode gone");
        node.metadata.annotations = annotated(None);
        let foreign = recorded_via("edge-1", "mesh", Some(&node), Some(&sa)).unwrap_err().to_string();
        assert!(foreign.contains("MeshNode edge-1 was not enrolled by meshctl"), "{foreign}");
        sa.metadata.annotations = None;
        let err = recorded_via("edge-1", "mesh", None, Some(&sa)).unwrap_err().to_string();
        assert!(err.contains("the ServiceAccount mesh/mesh-machine-edge-1 is not meshctl's"), "{err}");
        let none = recorded_via("edge-1", "mesh", None, None).unwrap_err().to_string();
        assert!(none.contains("there is no MeshNode edge-1"), "{none}");
    }

    #[test]
    fn progress_details_say_what_was_there() {
        assert!(removal_detail("removed\n").starts_with("agent stopped"));
        assert_eq!(removal_detail("enrolled-as=edge-2\n"), "left alone: the machine is enrolled as edge-2 now");
        assert_eq!(removal_detail("not-enrolled\n"), "nothing was installed there");
        assert_eq!(deletion_detail(true, true), "both deleted");
        assert_eq!(deletion_detail(false, true), "ServiceAccount deleted; the MeshNode was already gone");
        assert_eq!(deletion_detail(true, false), "MeshNode deleted; the ServiceAccount was already gone");
        assert_eq!(deletion_detail(false, false), "both were already gone");
    }

    fn args(force: bool) -> UnenrollArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            args: UnenrollArgs,
        }
        let mut argv = vec!["unenroll", "edge-1"];
        if force {
            argv.push("--force");
        }
        Wrap::parse_from(argv).args
    }

    #[test]
    fn an_unreachable_machine_stops_unenroll_unless_forced() {
        let mut progress = Progress::to(5, Vec::new());
        let err = anyhow!("cannot reach root@h over SSH");
        let stopped = go_on_without_machine(&mut progress, &err, &args(false)).unwrap_err().to_string();
        assert!(stopped.starts_with("cannot reach root@h over SSH\nNothing was removed."), "{stopped}");
        assert!(stopped.contains("`meshctl unenroll edge-1 --force`"), "{stopped}");
        assert!(go_on_without_machine(&mut progress, &err, &args(true)).is_ok());
    }

    #[test]
    fn the_last_line_says_what_is_left() {
        let target = Target::parse("root@h", None).unwrap();
        assert_eq!(
            summary("edge-1", &target, true, Duration::from_millis(4_240)),
            "unenrolled edge-1 (root@h) in 4.2 s; every other node drops it from its peers"
        );
        let left = summary("edge-1", &target, false, Duration::ZERO);
        assert!(left.starts_with("edge-1 is out of the cluster (its token is revoked), but root@h may still run"));
        assert!(left.ends_with("`rm -rf /etc/harness-mesh /var/lib/harness-mesh /usr/local/bin/mesh-agent`"), "{left}");
    }
}
