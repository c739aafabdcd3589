//! Collecting the ephemeral members that `meshctl connect` leaves behind.
//!
//! A MeshNode that carries [`CONNECT_OWNER_ANNOTATION`] (the Kubernetes user name of whoever
//! connected) is *ephemeral*: `meshctl connect` renews its Lease `mesh-agent-<name>` (in the
//! agents' Lease namespace, `--agent-lease-namespace`) every 10 s with a duration of 30 s, and
//! deletes the MeshNode, its MeshServices and the Lease when it exits. When it is killed
//! (`kill -9`, a laptop that sleeps or loses its network) nothing is deleted, so the leader
//! deletes them here:
//!
//! - the rule ([`verdict`]): the node is live while its Lease exists, is held by the node's own
//!   owner (`spec.holderIdentity` == the annotation; a Lease held by anyone else counts as
//!   absent) and `renewTime + leaseDurationSeconds + EPHEMERAL_GRACE_SECONDS` lies ahead; a new
//!   node is live without a Lease for `EPHEMERAL_GRACE_SECONDS + 30 s` from its
//!   `creationTimestamp`. A MeshNode without the annotation is never collected.
//! - the loop ([`run`]): every [`PERIOD`] the leader looks at its cached ephemeral MeshNodes,
//!   reads the Lease of each whose last known deadline has passed (one GET; a node known to be
//!   live is not read again until its deadline), and deletes an expired one: first the
//!   MeshServices placed on it (`spec.node`) that carry the same connect owner (an
//!   administrator's service placed there is left alone), then the MeshNode (both with a uid
//!   precondition, so a namesake made meanwhile is never deleted). The watches then release
//!   their addresses as for any deletion (held back, see holds.rs). A failure is logged with
//!   what failed and tried again on the next round, not sooner.
//!
//! **Bound:** a `meshctl connect` killed at time K renewed its Lease last at K or before, so its
//! MeshNode and MeshServices are deleted by K + 30 s (Lease duration) + 15 s (grace) + 5 s (one
//! loop period) + the time of a few API calls: within about 50 s. A session that never wrote
//! its Lease is gone 50 s after its MeshNode was created.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, Preconditions};
use kube::{Resource, ResourceExt};
use mesh_api::{CONNECT_OWNER_ANNOTATION, EPHEMERAL_GRACE_SECONDS, MeshNode, MeshService, agent_lease_name};

use crate::context::Ctx;
use crate::rules::service::connect_owner;

/// How often the leader looks for expired ephemeral MeshNodes.
pub const PERIOD: Duration = Duration::from_secs(5);

/// How long a new ephemeral MeshNode may go without a Lease of its owner, past the grace: the
/// Lease duration `meshctl connect` uses, so that a session that is slow to write its first
/// Lease is not collected.
pub const FIRST_LEASE_SECONDS: i64 = 30;

/// The longest Lease duration counted: a Lease asking for more lasts this long. `meshctl
/// connect` asks for 30 s; this keeps a hand-made Lease from keeping a dead member for days.
pub const MAX_LEASE_SECONDS: i64 = 300;

/// What the rule says of one MeshNode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not an ephemeral member (no connect-owner annotation): never collected.
    Permanent,
    /// Ephemeral and live until `until` (then the rule is to be asked again).
    Live {
        /// When it expires unless its Lease is renewed.
        until: Timestamp,
    },
    /// Ephemeral and expired at `since`: to be collected with its owner's services on it.
    Expired {
        /// The connect owner (the annotation's value).
        owner: String,
        /// When it expired.
        since: Timestamp,
    },
}

/// `at` plus `seconds`, saturating.
fn plus(at: Timestamp, seconds: i64) -> Timestamp {
    at.checked_add(SignedDuration::from_secs(seconds)).unwrap_or(Timestamp::MAX)
}

/// Until when `lease` keeps the ephemeral node of `owner` alive: `None` when it does not (held by
/// someone else, or never renewed).
fn lease_deadline(lease: &Lease, owner: &str) -> Option<Timestamp> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(owner) {
        return None;
    }
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?.0;
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0)).clamp(0, MAX_LEASE_SECONDS);
    Some(plus(renewed, duration + EPHEMERAL_GRACE_SECONDS))
}

/// Whether `node` (with its Lease `mesh-agent-<name>`, if there is one) is collected at `now`
/// (see the module docs).
pub fn verdict(node: &MeshNode, lease: Option<&Lease>, now: Timestamp) -> Verdict {
    let Some(owner) = connect_owner(node) else {
        return Verdict::Permanent;
    };
    let first = FIRST_LEASE_SECONDS + EPHEMERAL_GRACE_SECONDS;
    // Without a creation time (only a hand-made object in a test lacks one) it is new.
    let created = node.creation_timestamp().map_or(now, |t| t.0);
    let until = lease.and_then(|l| lease_deadline(l, owner)).into_iter().fold(plus(created, first), Timestamp::max);
    if until > now { Verdict::Live { until } } else { Verdict::Expired { owner: owner.to_owned(), since: until } }
}

/// The leader's loop (see the module docs): runs until the process ends. Leases are read in
/// `lease_namespace`.
pub async fn run(ctx: Arc<Ctx>, lease_namespace: String) {
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &lease_namespace);
    // Node uid -> when it was last known to expire: not read again before then (renewals only
    // move the deadline later).
    let mut known: HashMap<String, Timestamp> = HashMap::new();
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !*ctx.synced.borrow() {
            continue;
        }
        let now = Timestamp::now();
        let nodes: Vec<Arc<MeshNode>> = ctx
            .mesh_nodes
            .state()
            .into_iter()
            .filter(|n| connect_owner(n.as_ref()).is_some() && n.metadata.deletion_timestamp.is_none())
            .collect();
        known.retain(|uid, _| nodes.iter().any(|n| n.uid().as_deref() == Some(uid)));
        for node in nodes {
            let uid = node.uid().unwrap_or_default();
            if known.get(&uid).is_some_and(|until| *until > now) {
                continue;
            }
            let name = node.name_any();
            let lease_name = agent_lease_name(&name);
            let lease = match leases.get_opt(&lease_name).await {
                Ok(lease) => lease,
                Err(e) => {
                    tracing::warn!(
                        node = %name, lease = %lease_name, namespace = %lease_namespace,
                        "reading the Lease of an ephemeral MeshNode failed: {e}; trying again in {} s",
                        PERIOD.as_secs()
                    );
                    continue;
                }
            };
            match verdict(&node, lease.as_ref(), now) {
                Verdict::Permanent => {}
                Verdict::Live { until } => {
                    known.insert(uid, until);
                }
                Verdict::Expired { owner, since } => {
                    if collect(&ctx, &leases, &node, &owner, since, lease.as_ref()).await {
                        ctx.metrics.ephemeral_collected.inc();
                        known.remove(&uid);
                    }
                }
            }
        }
    }
}

/// Deletes the expired ephemeral `node` of `owner`, after the MeshServices of the same owner
/// placed on it, then its Lease if the owner holds it. Whether the node was deleted (or was gone
/// already).
async fn collect(
    ctx: &Ctx,
    leases: &Api<Lease>,
    node: &MeshNode,
    owner: &str,
    since: Timestamp,
    lease: Option<&Lease>,
) -> bool {
    let had_lease = lease.is_some();
    let name = node.name_any();
    let services: Vec<Arc<MeshService>> = ctx
        .mesh_services
        .state()
        .into_iter()
        .filter(|s| s.spec.node.as_deref() == Some(name.as_str()) && connect_owner(s.as_ref()) == Some(owner))
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .collect();
    let mut services_gone = true;
    for service in &services {
        let namespace = service.namespace().unwrap_or_default();
        let api: Api<MeshService> = Api::namespaced(ctx.client.clone(), &namespace);
        let service_name = service.name_any();
        match delete(&api, service.as_ref()).await {
            Ok(()) => {
                ctx.metrics.wrote("MeshService");
                tracing::info!(
                    node = %name, %owner, service = %format!("{namespace}/{service_name}"),
                    "deleted a MeshService of an expired ephemeral MeshNode"
                );
            }
            Err(e) => {
                services_gone = false;
                tracing::warn!(
                    node = %name, %owner, service = %format!("{namespace}/{service_name}"),
                    "deleting a MeshService of an expired ephemeral MeshNode failed: {e}; trying again in {} s",
                    PERIOD.as_secs()
                );
            }
        }
    }
    if !services_gone {
        // The node goes once its services are gone: without it, they could not be found.
        return false;
    }
    let nodes: Api<MeshNode> = Api::all(ctx.client.clone());
    match delete(&nodes, node).await {
        Ok(()) => {
            ctx.metrics.wrote("MeshNode");
            let why = if had_lease {
                format!("its Lease {} (held by {owner}) was not renewed", agent_lease_name(&name))
            } else {
                format!("it has no Lease {} held by {owner}", agent_lease_name(&name))
            };
            tracing::info!(
                node = %name, %owner, expired = %since, services = services.len(),
                "collected an ephemeral MeshNode ({CONNECT_OWNER_ANNOTATION}): {why}"
            );
            // Its Lease too, if the owner holds it (someone else's is not this member's).
            if let Some(lease) =
                lease.filter(|l| l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(owner))
                && let Err(e) = delete(leases, lease).await
            {
                tracing::warn!(
                    node = %name, %owner, lease = %agent_lease_name(&name),
                    "deleting the Lease of a collected ephemeral MeshNode failed: {e}; it stays (harmless: its node is gone)"
                );
            }
            true
        }
        Err(e) => {
            tracing::warn!(
                node = %name, %owner,
                "deleting an expired ephemeral MeshNode failed: {e}; trying again in {} s",
                PERIOD.as_secs()
            );
            false
        }
    }
}

/// Deletes `obj` if it is still the object seen (same uid); gone already is fine, and so is a
/// namesake made meanwhile (left alone: the precondition fails with 409).
async fn delete<K>(api: &Api<K>, obj: &K) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let params = DeleteParams {
        preconditions: Some(Preconditions { uid: obj.meta().uid.clone(), resource_version: None }),
        ..DeleteParams::default()
    };
    match api.delete(&obj.name_any(), &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::rules::fixtures::{mesh_node, time};

    /// An ephemeral MeshNode of `owner` created at second `created` (no owner: a plain one).
    fn node(owner: Option<&str>, created: i64) -> Arc<MeshNode> {
        let metadata = match owner {
            Some(owner) => json!({"annotations": {CONNECT_OWNER_ANNOTATION: owner}}),
            None => json!({}),
        };
        mesh_node("laptop", created, metadata, json!({}), json!({}))
    }

    /// Lease `mesh-agent-laptop` held by `holder`, renewed at second `renewed`, lasting `duration`.
    fn lease(holder: &str, renewed: i64, duration: i32) -> Lease {
        serde_json::from_value(json!({
            "metadata": {"name": "mesh-agent-laptop", "namespace": "harness-mesh"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration,
                "renewTime": time(renewed).replace('Z', ".000000Z")},
        }))
        .expect("a valid Lease")
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).expect("a time")
    }

    #[test]
    fn a_node_without_the_annotation_is_never_collected() {
        let plain = node(None, 0);
        assert_eq!(verdict(&plain, None, at(1_000_000)), Verdict::Permanent);
        assert_eq!(verdict(&plain, Some(&lease("alice", 0, 30)), at(1_000_000)), Verdict::Permanent);
    }

    #[test]
    fn a_renewed_lease_keeps_the_node_until_its_duration_and_the_grace_have_passed() {
        let n = node(Some("alice"), 1000);
        let l = lease("alice", 2000, 30);
        // 2000 + 30 + 15.
        assert_eq!(verdict(&n, Some(&l), at(2044)), Verdict::Live { until: at(2045) });
        assert_eq!(verdict(&n, Some(&l), at(2045)), Verdict::Expired { owner: "alice".into(), since: at(2045) });
        assert!(matches!(verdict(&n, Some(&l), at(3000)), Verdict::Expired { .. }));
    }

    #[test]
    fn a_new_node_may_wait_for_its_first_lease() {
        let n = node(Some("alice"), 1000);
        // 1000 + 30 + 15.
        assert_eq!(verdict(&n, None, at(1044)), Verdict::Live { until: at(1045) });
        assert_eq!(verdict(&n, None, at(1045)), Verdict::Expired { owner: "alice".into(), since: at(1045) });
        // A stale Lease of an earlier session of the same name does not cut the new node short.
        assert_eq!(verdict(&n, Some(&lease("alice", 10, 30)), at(1044)), Verdict::Live { until: at(1045) });
    }

    #[test]
    fn a_lease_held_by_someone_else_counts_as_absent() {
        let n = node(Some("alice"), 1000);
        let bobs = lease("bob", 5000, 30);
        assert_eq!(verdict(&n, Some(&bobs), at(5001)), Verdict::Expired { owner: "alice".into(), since: at(1045) });
        let nobodys: Lease = serde_json::from_value(json!({"metadata": {"name": "mesh-agent-laptop"},
            "spec": {"leaseDurationSeconds": 30, "renewTime": "1970-01-01T01:23:20.000000Z"}}))
        .expect("a valid Lease");
        assert!(matches!(verdict(&n, Some(&nobodys), at(5001)), Verdict::Expired { .. }));
    }

    #[test]
    fn an_unrenewed_lease_or_a_huge_duration_does_not_keep_a_node_forever() {
        let n = node(Some("alice"), 1000);
        let mut never: Lease = lease("alice", 2000, 30);
        never.spec.as_mut().expect("a spec").renew_time = None;
        assert!(matches!(verdict(&n, Some(&never), at(1045)), Verdict::Expired { .. }));
        let huge = lease("alice", 2000, i32::MAX);
        assert_eq!(
            verdict(&n, Some(&huge), at(2000)),
            Verdict::Live { until: at(2000 + MAX_LEASE_SECONDS + EPHEMERAL_GRACE_SECONDS) }
        );
    }

    #[test]
    fn the_documented_bound_holds() {
        // Killed right after a renewal at K: collected by the first loop round after K + 45 s.
        let n = node(Some("alice"), 0);
        let k = 10_000;
        let Verdict::Live { until } = verdict(&n, Some(&lease("alice", k, 30)), at(k)) else {
            panic!("live right after a renewal")
        };
        assert_eq!(until, at(k + 45));
        assert!(matches!(verdict(&n, Some(&lease("alice", k, 30)), at(k + 45)), Verdict::Expired { .. }));
    }
}
