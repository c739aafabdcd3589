//! The IP hold-back, persisted: the addresses released recently (see `mesh_core::ipam`) are kept
//! in a ConfigMap of the controller's namespace, so that a restarted controller (an upgrade, a
//! crash, a new leader) goes on holding them back instead of handing them out at once.
//!
//! - The ConfigMap (`--ip-hold-configmap`, one key [`DATA_KEY`], JSON) is written by server-side
//!   apply, only when a hold appears that it does not list yet, at most once per
//!   [`MIN_WRITE_INTERVAL`], and once more when the controller stops. A controller killed
//!   outright may lose the holds of its last second.
//! - Times are stored as Unix seconds (the pool counts seconds since the controller started);
//!   a hold that has expired by the time it is read back is dropped.
//! - It is read once at start, before anything is allocated. A missing ConfigMap is an empty
//!   hold-back; one that cannot be read stops the start (the holds would be lost silently); one
//!   that does not parse is logged and ignored (nothing but this controller writes it).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use mesh_core::Owner;
use serde::{Deserialize, Serialize};

use crate::context::{Ctx, FIELD_MANAGER};

/// The ConfigMap key that holds the JSON document.
pub const DATA_KEY: &str = "holds.json";
/// The shortest time between two writes of the ConfigMap.
pub const MIN_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// One held-back address, as stored.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredHold {
    /// The address.
    pub ip: Ipv4Addr,
    /// Who released it (`node/NAME` or `service/NAMESPACE/NAME`): it may take it back at once.
    pub previous: String,
    /// When the hold ends, in Unix seconds.
    pub until_unix: u64,
}

/// The stored document.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Document {
    holds: Vec<StoredHold>,
}

/// The current Unix time in seconds.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The pool's holds (its clock: seconds since `started_unix`) as they are stored, sorted.
pub fn to_stored(holds: impl IntoIterator<Item = (Ipv4Addr, Owner, u64)>, started_unix: u64) -> Vec<StoredHold> {
    let mut out: Vec<StoredHold> = holds
        .into_iter()
        .map(|(ip, previous, until)| StoredHold {
            ip,
            previous: previous.key(),
            until_unix: started_unix.saturating_add(until),
        })
        .collect();
    out.sort();
    out
}

/// The stored holds still running at `now_unix`, on the clock of a pool started at
/// `started_unix`; entries whose owner does not parse are dropped.
pub fn from_stored(stored: &[StoredHold], started_unix: u64, now_unix: u64) -> Vec<(Ipv4Addr, Owner, u64)> {
    stored
        .iter()
        .filter(|h| h.until_unix > now_unix)
        .filter_map(|h| Some((h.ip, Owner::parse_key(&h.previous)?, h.until_unix.saturating_sub(started_unix))))
        .collect()
}

/// The document's JSON text.
pub fn encode(holds: &[StoredHold]) -> String {
    serde_json::to_string(&Document { holds: holds.to_vec() }).unwrap_or_else(|_| "{\"holds\":[]}".into())
}

/// Parses the document's JSON text.
pub fn decode(text: &str) -> Result<Vec<StoredHold>, serde_json::Error> {
    serde_json::from_str::<Document>(text).map(|d| d.holds)
}

/// Whether `current` lists a hold that `written` lacks: then the ConfigMap must be written.
/// Expired holds dropping out need no write (they are ignored when read back).
pub fn needs_write(current: &[StoredHold], written: &[StoredHold]) -> bool {
    let written: BTreeSet<&StoredHold> = written.iter().collect();
    current.iter().any(|h| !written.contains(h))
}

/// Where the holds are kept.
#[derive(Clone)]
pub struct HoldStore {
    api: Api<ConfigMap>,
    name: String,
    namespace: String,
}

impl HoldStore {
    /// The ConfigMap `name` in `namespace`.
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        Self { api: Api::namespaced(client, namespace), name: name.to_owned(), namespace: namespace.to_owned() }
    }

    /// Reads the stored holds (none when the ConfigMap does not exist).
    pub async fn load(&self) -> anyhow::Result<Vec<StoredHold>> {
        let cm = self.api.get_opt(&self.name).await.with_context(|| {
            format!(
                "reading the IP hold-back ConfigMap {}/{} (the controller's role needs get on it; see \
                 --ip-hold-configmap)",
                self.namespace, self.name
            )
        })?;
        let Some(text) = cm.and_then(|cm| cm.data).and_then(|mut d| d.remove(DATA_KEY)) else { return Ok(Vec::new()) };
        Ok(decode(&text).unwrap_or_else(|err| {
            tracing::warn!(configmap = %self.name, "the stored IP hold-back does not parse ({err}); starting without it");
            Vec::new()
        }))
    }

    /// Writes `holds` (server-side apply of the whole ConfigMap).
    pub async fn save(&self, holds: &[StoredHold]) -> Result<(), kube::Error> {
        let cm = serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": self.name, "labels": {"app.kubernetes.io/managed-by": "mesh-controller"}},
            "data": {DATA_KEY: encode(holds)},
        });
        self.api.patch(&self.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&cm)).await.map(drop)
    }
}

/// The pool's current holds, as stored.
fn current(ctx: &Ctx) -> Vec<StoredHold> {
    let now = ctx.now();
    let holds: Vec<(Ipv4Addr, Owner, u64)> =
        ctx.pool().holds(now).map(|(ip, owner, until)| (ip, owner.clone(), until)).collect();
    to_stored(holds, ctx.started_unix)
}

/// Writes the holds when a new one appears, at most once per [`MIN_WRITE_INTERVAL`]; runs until
/// the controller stops. `written` is what the ConfigMap holds (as read at start).
pub async fn persist(ctx: std::sync::Arc<Ctx>, store: HoldStore, mut written: Vec<StoredHold>) {
    let mut tick = tokio::time::interval(MIN_WRITE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        flush(&ctx, &store, &mut written).await;
    }
}

/// Writes the holds if the ConfigMap lacks one of them; a failure is logged and retried on the
/// next call.
pub async fn flush(ctx: &Ctx, store: &HoldStore, written: &mut Vec<StoredHold>) {
    let now = current(ctx);
    if !needs_write(&now, written) {
        return;
    }
    match store.save(&now).await {
        Ok(()) => {
            ctx.metrics.wrote("ConfigMap");
            *written = now;
        }
        Err(err) => tracing::warn!(
            configmap = %store.name,
            "could not persist the IP hold-back: {err}; retrying (until it succeeds, a restart would free these addresses at once)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(ip: &str, previous: &str, until_unix: u64) -> StoredHold {
        StoredHold { ip: ip.parse().unwrap(), previous: previous.into(), until_unix }
    }

    #[test]
    fn holds_survive_a_restart_on_the_new_pools_clock() {
        // Released at t=10 s of a controller started at Unix 1000, held 300 s.
        let stored = to_stored([("10.42.0.9".parse().unwrap(), Owner::service("ns", "web"), 310)], 1000);
        assert_eq!(stored, [hold("10.42.0.9", "service/ns/web", 1310)]);
        let text = encode(&stored);
        assert_eq!(decode(&text).unwrap(), stored);
        // A controller started at Unix 1100 holds it until t=210 s of its own clock.
        assert_eq!(
            from_stored(&decode(&text).unwrap(), 1100, 1100),
            [("10.42.0.9".parse().unwrap(), Owner::service("ns", "web"), 210)]
        );
        // Read after it expired: gone.
        assert!(from_stored(&stored, 1400, 1400).is_empty());
    }

    #[test]
    fn unreadable_owners_are_dropped_and_garbage_is_an_error() {
        let stored = [hold("10.42.0.9", "bogus", 2000), hold("10.42.0.8", "node/a", 2000)];
        assert_eq!(from_stored(&stored, 1000, 1000), [("10.42.0.8".parse().unwrap(), Owner::node("a"), 1000)]);
        assert!(decode("not json").is_err());
    }

    #[test]
    fn only_a_new_hold_needs_a_write() {
        let a = hold("10.42.0.9", "node/a", 2000);
        let b = hold("10.42.0.8", "node/b", 2000);
        assert!(!needs_write(&[], &[]));
        assert!(needs_write(std::slice::from_ref(&a), &[]));
        assert!(!needs_write(std::slice::from_ref(&a), &[a.clone(), b.clone()]), "an expired hold needs no write");
        assert!(needs_write(&[a.clone(), b], &[a]));
    }
}
