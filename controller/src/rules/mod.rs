//! The controller's reconcile rules as pure functions: from an object, what the controller
//! knows of the others ([`index::Index`]) and what the pool answered, to the status it should
//! have, the hosting or peer entry it implies, and the events to publish. Nothing here knows of
//! the API client or of tokio; the reconcilers (service.rs, node.rs) read the caches, call these,
//! and write only when [`ServicePlan::changed`](service::ServicePlan) /
//! [`NodePlan::changed`](node::NodePlan) says the desired status differs from what is there.

pub mod index;
pub mod node;
pub mod service;

#[cfg(test)]
pub(crate) mod fixtures;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// Which object an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum On {
    /// The object reconciled.
    Object,
    /// The Kubernetes Node of the MeshNode reconciled.
    KubernetesNode,
}

/// A Warning event to publish after the status is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Emit {
    /// The object it is about.
    pub on: On,
    /// The CamelCase reason.
    pub reason: String,
    /// What the controller was doing.
    pub action: &'static str,
    /// What happened and what to do.
    pub note: String,
}

impl Emit {
    fn warning(on: On, reason: impl Into<String>, action: &'static str, note: impl Into<String>) -> Self {
        Self { on, reason: reason.into(), action, note: note.into() }
    }
}

/// Whether two condition lists are the same, field for field (transition times included),
/// whatever their order: the desired conditions keep each unchanged condition's
/// `lastTransitionTime` (`mesh_api::conditions::merge`), so a status with nothing new compares
/// equal and is not written again.
pub fn same_conditions(a: &[Condition], b: &[Condition]) -> bool {
    let sorted = |list: &[Condition]| {
        let mut list: Vec<Condition> = list.to_vec();
        list.sort_by(|x, y| x.type_.cmp(&y.type_));
        list
    };
    a.len() == b.len() && sorted(a) == sorted(b)
}

/// Whether the condition `type_` is `True` in `conditions`.
pub fn holds(conditions: &[Condition], type_: &str) -> bool {
    conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
}

/// Whether the condition `type_` has reason `reason` in `conditions`.
pub fn has_reason(conditions: &[Condition], type_: &str, reason: &str) -> bool {
    conditions.iter().any(|c| c.type_ == type_ && c.reason == reason)
}
