//! What the benchmarks read from outside the code under test: the API server's own request and
//! watch counters (its `/metrics`, read with the admin kubeconfig), and a process's memory and
//! CPU time (`/proc/<pid>/status` and `/proc/<pid>/stat`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::Cluster;

/// The request verbs that change something.
const WRITE_VERBS: [&str; 6] = ["POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION"];

/// Counters of the API server at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ApiCounters {
    /// Write requests (`apiserver_request_total` with a write verb) by `resource[/subresource] VERB`.
    pub writes: BTreeMap<String, f64>,
    /// Watch events sent to watchers (`apiserver_watch_events_total`), by resource (or kind).
    pub watch_events: BTreeMap<String, f64>,
    /// Open watches (`apiserver_longrunning_requests{verb="WATCH"}`), by resource.
    pub watchers: BTreeMap<String, f64>,
}

impl ApiCounters {
    /// Reads the API server's `/metrics`.
    pub fn read(cluster: &Cluster) -> anyhow::Result<Self> {
        let text = cluster.kubectl_ok(&["get", "--raw", "/metrics"]).context("reading the API server's /metrics")?;
        Ok(Self::parse(&text))
    }

    /// Parses Prometheus text.
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for (name, labels, value) in text.lines().filter_map(sample) {
            let get = |key: &str| labels.get(key).map(String::as_str).unwrap_or_default();
            let resource = if get("resource").is_empty() { get("kind") } else { get("resource") };
            match name {
                "apiserver_request_total" if WRITE_VERBS.contains(&get("verb")) => {
                    let sub = get("subresource");
                    let key = if sub.is_empty() {
                        format!("{resource} {}", get("verb"))
                    } else {
                        format!("{resource}/{sub} {}", get("verb"))
                    };
                    *out.writes.entry(key).or_default() += value;
                }
                "apiserver_watch_events_total" => {
                    *out.watch_events.entry(resource.to_lowercase()).or_default() += value
                }
                "apiserver_longrunning_requests" if get("verb") == "WATCH" => {
                    *out.watchers.entry(resource.to_owned()).or_default() += value;
                }
                _ => {}
            }
        }
        out
    }

    /// What happened between `before` and `self` (counters only; watchers are as of `self`).
    pub fn since(&self, before: &Self) -> Self {
        let diff = |now: &BTreeMap<String, f64>, then: &BTreeMap<String, f64>| {
            now.iter()
                .map(|(k, v)| (k.clone(), v - then.get(k).copied().unwrap_or_default()))
                .filter(|(_, v)| *v > 0.0)
                .collect()
        };
        Self {
            writes: diff(&self.writes, &before.writes),
            watch_events: diff(&self.watch_events, &before.watch_events),
            watchers: self.watchers.clone(),
        }
    }

    /// Writes, without the Lease renewals (liveness and leader election run on their own clock).
    pub fn writes_without_leases(&self) -> f64 {
        self.writes.iter().filter(|(k, _)| !k.starts_with("leases")).map(|(_, v)| v).sum()
    }

    /// Watch events of the mesh kinds (MeshNodes and MeshServices).
    pub fn mesh_watch_events(&self) -> f64 {
        self.watch_events.iter().filter(|(k, _)| k.starts_with("mesh")).map(|(_, v)| v).sum()
    }

    /// Total of the write counters (for "has anything been written lately").
    pub fn total_writes(&self) -> f64 {
        self.writes.values().sum()
    }
}

/// One sample line: name, labels, value.
fn sample(line: &str) -> Option<(&str, BTreeMap<String, String>, f64)> {
    if line.starts_with('#') || line.is_empty() {
        return None;
    }
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        Some((name, rest)) => (name, rest.strip_suffix('}')?),
        None => (head, ""),
    };
    let mut map = BTreeMap::new();
    // Label values here hold no `",` sequence, so splitting on it is enough.
    for pair in labels.split("\",").filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once("=\"")?;
        map.insert(key.to_owned(), value.trim_end_matches('"').to_owned());
    }
    Some((name, map, value))
}

/// Waits until the API server has seen no write (Leases aside) for `quiet`, at most `within`;
/// returns the counters then, and whether it got quiet.
pub async fn settle(cluster: &Cluster, quiet: Duration, within: Duration) -> anyhow::Result<(ApiCounters, bool)> {
    let deadline = Instant::now() + within;
    let mut last = ApiCounters::read(cluster)?;
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = ApiCounters::read(cluster)?;
        if now.writes_without_leases() != last.writes_without_leases() {
            since = Instant::now();
            last = now;
        } else if since.elapsed() >= quiet {
            return Ok((now, true));
        }
        if Instant::now() >= deadline {
            return Ok((last, false));
        }
    }
}

/// Memory of a process, from `/proc/<pid>/status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// Resident set size now, KiB.
    pub rss_kib: u64,
    /// Peak resident set size, KiB.
    pub peak_kib: u64,
}

/// Reads the memory of process `pid`.
pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_default()
    };
    Ok(Memory { rss_kib: field("VmRSS:"), peak_kib: field("VmHWM:") })
}

/// CPU time (user + system) process `pid` has used, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis are
    // state, ppid, ... with utime and stime the 12th and 13th.
    let rest = text.rsplit_once(')').map(|(_, r)| r).context("unexpected /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).context("unexpected /proc/<pid>/stat");
    let total = ticks(11)? + ticks(12)?;
    // USER_HZ is 100 on every Linux architecture the lab runs on.
    Ok(Duration::from_millis(total * 10))
}

/// The value at percentile `p` (nearest rank) of `values`; NaN when there are none.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of `values` (the upper one of an even count); NaN when there are none.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_write_and_watch_counters() {
        let text = r#"# HELP apiserver_request_total x
apiserver_request_total{code="201",component="apiserver",dry_run="",group="mesh.harness.dev",resource="meshservices",scope="resource",subresource="",verb="POST",version="v1alpha1"} 3
apiserver_request_total{code="200",component="apiserver",dry_run="",group="mesh.harness.dev",resource="meshservices",scope="resource",subresource="status",verb="APPLY",version="v1alpha1"} 2
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="pods",scope="cluster",subresource="",verb="LIST",version="v1"} 9
apiserver_watch_events_total{group="mesh.harness.dev",resource="meshnodes",version="v1alpha1"} 7
apiserver_longrunning_requests{component="apiserver",group="mesh.harness.dev",resource="meshnodes",scope="cluster",subresource="",verb="WATCH",version="v1alpha1"} 4
"#;
        let c = ApiCounters::parse(text);
        assert_eq!(c.writes.get("meshservices POST"), Some(&3.0));
        assert_eq!(c.writes.get("meshservices/status APPLY"), Some(&2.0));
        assert_eq!(c.writes.len(), 2);
        assert_eq!(c.watch_events.get("meshnodes"), Some(&7.0));
        assert_eq!(c.watchers.get("meshnodes"), Some(&4.0));
        assert_eq!(c.since(&ApiCounters::default()).writes_without_leases(), 5.0);
    }

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(memory(pid).expect("own status").rss_kib > 0);
        assert!(cpu_time(pid).is_ok());
    }
}
