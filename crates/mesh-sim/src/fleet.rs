//! Many simulated nodes in one process. The nodes are split over a few shared directories
//! (one MeshNode watch and one MeshService watch each, against the real API server): every
//! node of a group runs its own sync on every change its directory sees (debounced, as the
//! agent's loop) and on a staggered resync timer, but the group shares the reflector caches.
//! One watch per node would hold N copies of the whole directory in this process, which is
//! what a real cluster spreads over N machines. For the same reason the directory-wide
//! derivations (peer entries, placements, DNS zone: a `mesh_plan::Directory`) are computed once
//! per change per directory, not once per node. With [`Config::lease_namespace`] every node also
//! renews its Lease every 10 s, as the agent does; those writes are counted apart from the
//! status writes.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use kube::Client;
use mesh_agent::directory::Directory;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::node::{self, SimNode, Target};

/// How to run the fleet.
#[derive(Clone, Debug)]
pub struct Config {
    /// The MeshNode names, one simulated agent each (the MeshNodes must exist).
    pub nodes: Vec<String>,
    /// How many shared directories (watch pairs) the nodes are spread over.
    pub directories: usize,
    /// Quiet time after a change before a sync (the agent's is 50 ms).
    pub debounce: Duration,
    /// Time between full resyncs (the agent's default is 30 s); staggered over the nodes.
    pub resync: Duration,
    /// Where each node renews its liveness Lease every 10 s (staggered), as the agent does;
    /// `None`: no Leases.
    pub lease_namespace: Option<String>,
}

/// Time between Lease renewals (the agent's).
const LEASE_INTERVAL: Duration = Duration::from_secs(10);

/// Counters of one simulated node.
#[derive(Debug, Default)]
pub struct Stats {
    /// Syncs run.
    pub syncs: AtomicU64,
    /// Syncs that failed.
    pub errors: AtomicU64,
    /// Time spent in syncs, in microseconds.
    pub sync_micros: AtomicU64,
    /// Status writes made.
    pub writes: AtomicU64,
    /// Status writes that failed.
    pub status_errors: AtomicU64,
    /// Lease renewals made.
    pub lease_writes: AtomicU64,
    /// Peers on its recorded device.
    pub peers: AtomicU64,
    /// Services hosted, as of the last sync.
    pub hosted: AtomicU64,
    /// Records in its zone, as of the last sync.
    pub zone_records: AtomicU64,
    /// Non-empty device plans recorded.
    pub plans: AtomicU64,
    /// Peers added, removed or updated.
    pub peer_changes: AtomicU64,
    /// nftables rulesets that would have been applied.
    pub firewall_changes: AtomicU64,
    /// The id of the last target it reported applied.
    target: AtomicU64,
    /// The id of the last target it reported routed.
    routed: AtomicU64,
}

/// Sums over the fleet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Syncs run.
    pub syncs: u64,
    /// Syncs that failed.
    pub errors: u64,
    /// Time spent in syncs, microseconds.
    pub sync_micros: u64,
    /// Status writes (Leases apart).
    pub writes: u64,
    /// Status writes that failed.
    pub status_errors: u64,
    /// Lease renewals (periodic, whatever changes).
    pub lease_writes: u64,
    /// Non-empty device plans.
    pub plans: u64,
    /// Single-peer changes.
    pub peer_changes: u64,
    /// Ruleset changes.
    pub firewall_changes: u64,
    /// The fewest peers any node has.
    pub min_peers: u64,
    /// Services hosted, over all nodes.
    pub hosted: u64,
    /// The fewest zone records any node has.
    pub min_zone_records: u64,
    /// Updates of the groups' shared directories (one per change a group's nodes sync).
    pub snapshots: u64,
    /// Time spent on them, microseconds.
    pub snapshot_micros: u64,
}

/// One shared directory (the watches and the directory its nodes plan from, kept across changes
/// as the agent keeps its own: services applied as their events arrive, nodes brought up to date
/// by `Directory::update`), and its change counter.
struct Group {
    directory: Directory,
    changes: watch::Receiver<u64>,
    /// The change the directory's nodes reflect (`None`: not read yet); held while an update
    /// runs. The nodes read the directory through their syncs; an update waits for the syncs of
    /// the state before to end.
    at: tokio::sync::Mutex<Option<u64>>,
    /// Updates made, and the time spent, in microseconds.
    snapshots: AtomicU64,
    snapshot_micros: AtomicU64,
}

impl Group {
    /// The directory as of at least change `version` (brought up to date now if it is older).
    async fn snapshot(&self, version: u64) -> tokio::sync::OwnedRwLockReadGuard<mesh_plan::Directory> {
        let mut at = self.at.lock().await;
        if at.is_some_and(|at| at >= version) {
            drop(at);
            return self.directory.read().await;
        }
        // Read the counter first: the state read after it includes at least those changes.
        let changes = *self.changes.borrow();
        let started = Instant::now();
        let (directory, _) = self.directory.update(false).await;
        *at = Some(changes);
        self.snapshots.fetch_add(1, Ordering::Relaxed);
        self.snapshot_micros
            .fetch_add(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
        directory
    }
}

struct Shared {
    target: Mutex<Option<Arc<Target>>>,
    /// (node index, when) for the current target: applied (routed and named in DNS).
    applied: Mutex<Vec<(usize, Instant)>>,
    /// (node index, when) for the current target: routed by the device (the host: hosted).
    routed: Mutex<Vec<(usize, Instant)>>,
    stats: Vec<Stats>,
}

/// The running fleet; its tasks stop when it is dropped (the directory watches run on until
/// the process ends).
pub struct Fleet {
    shared: Arc<Shared>,
    groups: Vec<Arc<Group>>,
    tasks: Vec<JoinHandle<()>>,
    /// When the fleet started.
    pub started: Instant,
}

impl Fleet {
    /// Starts the directories, waits until each has listed everything once, then starts one
    /// task per node. Node `i` advertises the loopback address 127.77.x.y.
    pub async fn start(client: Client, config: Config) -> anyhow::Result<Self> {
        anyhow::ensure!(config.directories > 0, "the fleet needs at least one directory");
        anyhow::ensure!(config.nodes.len() < 65_000, "at most 65,000 simulated nodes");
        let directories: Vec<Directory> =
            (0..config.directories).map(|_| Directory::watch(client.clone(), None, node::directory())).collect();
        for directory in &directories {
            tokio::time::timeout(Duration::from_secs(120), directory.ready())
                .await
                .context("the directory did not list MeshNodes and MeshServices within 120 s")??;
        }
        let shared = Arc::new(Shared {
            target: Mutex::new(None),
            applied: Mutex::new(Vec::new()),
            routed: Mutex::new(Vec::new()),
            stats: config.nodes.iter().map(|_| Stats::default()).collect(),
        });
        let mut tasks = Vec::new();
        let mut groups = Vec::new();
        for directory in directories {
            // The directory notifies one waiter; fan each notification out to its group.
            let (tx, rx) = watch::channel(0u64);
            let changed = directory.changed.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    changed.notified().await;
                    tx.send_modify(|n| *n += 1);
                }
            }));
            groups.push(Arc::new(Group {
                directory,
                changes: rx,
                at: tokio::sync::Mutex::new(None),
                snapshots: AtomicU64::new(0),
                snapshot_micros: AtomicU64::new(0),
            }));
        }
        let started = Instant::now();
        let count = config.nodes.len() as u32;
        for (i, name) in config.nodes.iter().enumerate() {
            let group = groups[i % groups.len()].clone();
            let [hi, lo] = u16::try_from(i).unwrap_or(u16::MAX).to_be_bytes();
            let node =
                SimNode::new(name.clone(), Ipv4Addr::new(127, 77, hi, lo), client.clone(), group.directory.clone())?;
            let offset = config.resync * (i as u32) / count.max(1);
            tasks.push(tokio::spawn(run(i, node, group, shared.clone(), config.clone(), offset)));
        }
        Ok(Self { shared, groups, tasks, started })
    }

    /// Starts timing `target`: from now on every node reports the first sync that applies it.
    pub fn track(&self, target: Target) {
        self.shared.applied.lock().unwrap_or_else(PoisonError::into_inner).clear();
        self.shared.routed.lock().unwrap_or_else(PoisonError::into_inner).clear();
        *self.shared.target.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(target));
    }

    /// When each node applied the tracked target, once all `self.len()` have; fails after
    /// `within`, naming how many had.
    pub async fn wait_applied(&self, within: Duration) -> anyhow::Result<Vec<Instant>> {
        let deadline = Instant::now() + within;
        loop {
            let applied = self.shared.applied.lock().unwrap_or_else(PoisonError::into_inner).clone();
            if applied.len() >= self.len() {
                return Ok(applied.into_iter().map(|(_, at)| at).collect());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {} of {} simulated nodes applied the service within {within:?}",
                applied.len(),
                self.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// When each node's device came to route the tracked target (its host: when it hosted it),
    /// as far as reported; call after [`Fleet::wait_applied`].
    pub fn routed(&self) -> Vec<Instant> {
        self.shared.routed.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|(_, at)| *at).collect()
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.shared.stats.len()
    }

    /// Whether the fleet has no nodes.
    pub fn is_empty(&self) -> bool {
        self.shared.stats.is_empty()
    }

    /// Sums of every node's counters.
    pub fn totals(&self) -> Totals {
        let get = |f: fn(&Stats) -> &AtomicU64| self.shared.stats.iter().map(move |s| f(s).load(Ordering::Relaxed));
        Totals {
            syncs: get(|s| &s.syncs).sum(),
            errors: get(|s| &s.errors).sum(),
            sync_micros: get(|s| &s.sync_micros).sum(),
            writes: get(|s| &s.writes).sum(),
            status_errors: get(|s| &s.status_errors).sum(),
            lease_writes: get(|s| &s.lease_writes).sum(),
            plans: get(|s| &s.plans).sum(),
            peer_changes: get(|s| &s.peer_changes).sum(),
            firewall_changes: get(|s| &s.firewall_changes).sum(),
            min_peers: get(|s| &s.peers).min().unwrap_or(0),
            hosted: get(|s| &s.hosted).sum(),
            min_zone_records: get(|s| &s.zone_records).min().unwrap_or(0),
            snapshots: self.groups.iter().map(|g| g.snapshots.load(Ordering::Relaxed)).sum(),
            snapshot_micros: self.groups.iter().map(|g| g.snapshot_micros.load(Ordering::Relaxed)).sum(),
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One node's loop: sync on start, on every change (after the debounce) and on the resync timer;
/// renew the Lease on its timer.
async fn run(
    index: usize,
    mut node: SimNode,
    group: Arc<Group>,
    shared: Arc<Shared>,
    config: Config,
    offset: Duration,
) {
    let mut changes = group.changes.clone();
    let mut resync = tokio::time::interval_at(Instant::now() + offset, config.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let lease_offset = LEASE_INTERVAL.mul_f64(offset.as_secs_f64() / config.resync.as_secs_f64().max(1e-3));
    let mut lease = tokio::time::interval_at(Instant::now() + lease_offset, LEASE_INTERVAL);
    lease.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stats = &shared.stats[index];
    let mut first = true;
    loop {
        let mut version = *changes.borrow();
        let mut periodic = false;
        if !first {
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    tokio::time::sleep(config.debounce).await;
                    version = *changes.borrow_and_update();
                }
                _ = resync.tick() => periodic = true,
                _ = lease.tick(), if config.lease_namespace.is_some() => {
                    let namespace = config.lease_namespace.as_deref().unwrap_or_default();
                    match node.renew_lease(namespace).await {
                        Ok(()) => { stats.lease_writes.fetch_add(1, Ordering::Relaxed); }
                        Err(err) => tracing::debug!(node = %node.name, "simulated Lease renewal failed: {err:#}"),
                    }
                    continue;
                }
            }
        }
        first = false;
        let target = shared.target.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let snapshot = group.snapshot(version).await;
        let started = Instant::now();
        let result = node.sync(&snapshot, target.as_deref(), periodic).await;
        let now = Instant::now();
        stats.syncs.fetch_add(1, Ordering::Relaxed);
        stats.sync_micros.fetch_add(u64::try_from((now - started).as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
        match result {
            Ok(synced) => {
                stats.writes.fetch_add(u64::from(synced.writes), Ordering::Relaxed);
                stats.status_errors.fetch_add(u64::from(synced.status_failed), Ordering::Relaxed);
                let routed = synced.target_routed.or(synced.target_applied.then_some(now));
                if let Some((target, at)) = target.as_ref().zip(routed)
                    && stats.routed.swap(target.id, Ordering::Relaxed) != target.id
                {
                    shared.routed.lock().unwrap_or_else(PoisonError::into_inner).push((index, at));
                }
                if let Some(target) = target.filter(|_| synced.target_applied)
                    && stats.target.swap(target.id, Ordering::Relaxed) != target.id
                {
                    shared.applied.lock().unwrap_or_else(PoisonError::into_inner).push((index, now));
                }
            }
            Err(err) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(node = %node.name, "simulated sync failed: {err:#}");
            }
        }
        let dataplane = &node.dataplane;
        stats.peers.store(dataplane.device.get().peers.len() as u64, Ordering::Relaxed);
        stats.hosted.store(node.hosted as u64, Ordering::Relaxed);
        stats.zone_records.store(dataplane.zone_records as u64, Ordering::Relaxed);
        stats.plans.store(dataplane.device.plans, Ordering::Relaxed);
        stats.peer_changes.store(dataplane.device.peer_changes, Ordering::Relaxed);
        stats.firewall_changes.store(dataplane.firewall_changes, Ordering::Relaxed);
    }
}
