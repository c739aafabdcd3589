//! `bench-report`: the last step of `make bench`. Reads what the benchmarks wrote under
//! target/bench/ (controller.json, mesh.json, scale.json, sync.json), prints them as one
//! Markdown table (the README's performance section is a copy of it), and writes the rows to
//! target/bench/summary.json. A missing file leaves its rows out and says so.
//!
//! `bench-report --scale N...` is the last step of `make bench-scale`: one row per figure, one
//! column per size, from target/bench/scale-N.json, written to target/bench/scale-growth.json.

use std::path::Path;

use serde_json::{Value, json};

fn read(dir: &Path, file: &str) -> Option<Value> {
    let path = dir.join(file);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).ok(),
        Err(_) => {
            eprintln!("bench-report: {} is missing; its rows are left out", path.display());
            None
        }
    }
}

fn num(v: &Value, path: &str) -> f64 {
    path.split('.').fold(v, |v, key| &v[key]).as_f64().unwrap_or(f64::NAN)
}

fn list(v: &Value, path: &str) -> Vec<f64> {
    path.split('.')
        .fold(v, |v, key| &v[key])
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

/// Writes of one change: the total, and how many were MeshNode status writes (agents' and the
/// controller's peer entries).
fn writes(v: &Value, change: &str) -> String {
    let node_status = v[change]["writes"]["meshnodes/status APPLY"].as_f64().unwrap_or(0.0);
    format!("{} ({node_status} MeshNode status)", num(v, &format!("{change}.writes_without_leases")))
}

fn range(values: &[f64], scale: f64, unit: &str) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min) / scale;
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max) / scale;
    if values.is_empty() { "n/a".into() } else { format!("{min:.0}–{max:.0} {unit}") }
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// The figures of the growth table: name, and how to read it from one scale-N.json.
const GROWTH: &[(&str, &str, f64, &str)] = &[
    ("MeshServices", "services", 1.0, ""),
    ("simulated agents", "agents", 1.0, ""),
    ("API writes per service create (Leases aside)", "api_cost_create.writes_without_leases", 1.0, ""),
    ("API writes per service update (Leases aside)", "api_cost_update.writes_without_leases", 1.0, ""),
    ("MeshNode watch events per watcher per create", "meshnode_watch_events_per_watcher.create", 1.0, ""),
    ("create → routed by all simulated agents, median", "routed_all_agents_seconds.median", 1.0, " s"),
    ("create → routed by all simulated agents, p99", "routed_all_agents_seconds.p99", 1.0, " s"),
    ("simulated agent sync, mean", "sim_sync_mean_ms", 1.0, " ms"),
    ("mesh-controller RSS, steady", "controller_rss_mib.steady", 1.0, " MiB"),
    ("mesh-controller RSS, after a full resync", "controller_rss_mib.after_resync", 1.0, " MiB"),
    ("mesh-controller full resync: ready", "controller_resync_seconds.ready", 1.0, " s"),
    ("mesh-controller full resync: last reconcile", "controller_resync_seconds.last_reconcile", 1.0, " s"),
    ("mesh-controller writes during the full resync", "controller_resync_writes", 1.0, ""),
    ("one real agent (release): RSS", "real_agent.rss_mib", 1.0, " MiB"),
    ("one real agent (release): sync, mean", "real_agent.sync_mean_ms", 1.0, " ms"),
    ("one real agent (release): sync CPU, its own, mean", "real_agent.sync_cpu_mean_ms", 1.0, " ms"),
    ("one real agent (release): process CPU per sync (probes, watches too)", "real_agent.cpu_per_sync_ms", 1.0, " ms"),
    ("one real agent (release): process CPU during the tries", "real_agent.process_cpu_percent", 1.0, " %"),
    ("  of a sync: directory and plan, mean", "real_agent.sync_steps_mean_ms.plan", 1.0, " ms"),
    (
        "  of a sync: device diff (read back on a resync) and write, mean",
        "real_agent.sync_steps_mean_ms.device",
        1.0,
        " ms",
    ),
    ("  of a sync: DNS server, mean", "real_agent.sync_steps_mean_ms.dns", 1.0, " ms"),
    ("  of a sync: node resolver (hosts file), mean", "real_agent.sync_steps_mean_ms.names", 1.0, " ms"),
    ("  of a sync: link, firewall and status, mean", "real_agent.sync_steps_mean_ms.rest", 1.0, " ms"),
    (
        "  of a sync: recording it (logs, metrics, probe targets), mean",
        "real_agent.sync_steps_mean_ms.record",
        1.0,
        " ms",
    ),
    ("  of a sync's own CPU: directory and plan, mean", "real_agent.sync_steps_cpu_mean_ms.plan", 1.0, " ms"),
    ("  of a sync's own CPU: device, mean", "real_agent.sync_steps_cpu_mean_ms.device", 1.0, " ms"),
    ("  of a sync's own CPU: DNS server, mean", "real_agent.sync_steps_cpu_mean_ms.dns", 1.0, " ms"),
    ("  of a sync's own CPU: node resolver (hosts file), mean", "real_agent.sync_steps_cpu_mean_ms.names", 1.0, " ms"),
    ("  of a sync's own CPU: link, firewall and status, mean", "real_agent.sync_steps_cpu_mean_ms.rest", 1.0, " ms"),
    ("  of a sync's own CPU: recording it, mean", "real_agent.sync_steps_cpu_mean_ms.record", 1.0, " ms"),
    ("setup: create and allocate everything", "setup_seconds", 1.0, " s"),
];

/// `--scale N...`: how each figure grows with the number of MeshNodes.
fn growth(dir: &Path, sizes: &[String]) -> anyhow::Result<()> {
    let runs: Vec<(String, Option<Value>)> =
        sizes.iter().map(|n| (n.clone(), read(dir, &format!("scale-{n}.json")))).collect();
    print!("\n| MeshNodes |");
    for (n, _) in &runs {
        print!(" {n} |");
    }
    println!("\n|---|{}", "---|".repeat(runs.len()));
    let mut table = Vec::new();
    for (name, path, scale, unit) in GROWTH {
        print!("| {name} |");
        let mut values = serde_json::Map::new();
        for (n, run) in &runs {
            let value = run.as_ref().map_or(f64::NAN, |v| num(v, path) * scale);
            if value.is_nan() {
                print!(" n/a |");
            } else if value.fract() == 0.0 {
                print!(" {value:.0}{unit} |");
            } else {
                print!(" {value:.2}{unit} |");
            }
            values.insert(n.clone(), json!(value));
        }
        println!();
        table.push(json!({"figure": name, "by_nodes": values}));
    }
    std::fs::write(dir.join("scale-growth.json"), serde_json::to_string_pretty(&table)?)?;
    println!("\nwrote {}", dir.join("scale-growth.json").display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let dir = harness_mesh_e2e::repo_root().join("target/bench");
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--scale") {
        return growth(&dir, &args[1..]);
    }
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |name: &str, value: String| rows.push((name.to_owned(), value));

    if let Some(m) = read(&dir, "mesh.json") {
        row("**lab, 3 nodes, real tunnels (wireguard-go)**", String::new());
        row(
            "MeshService create → reachable over WireGuard from every other node, median / p99 (20 tries)",
            format!("{:.2} / {:.2} s", num(&m, "converge_seconds.median"), num(&m, "converge_p99_seconds")),
        );
        row(
            "MeshService create → name answered by every node's DNS, median / worst (20 tries)",
            format!("{:.2} / {:.2} s", num(&m, "dns_seconds.median"), num(&m, "dns_seconds.worst")),
        );
        row(
            "ping RTT over the mesh / over the veth underlay (median of 100)",
            format!("{:.3} / {:.3} ms", num(&m, "ping_ms.mesh_median"), num(&m, "ping_ms.underlay_median")),
        );
        row(
            "API writes per service create / update (Leases aside)",
            format!("{} / {}", writes(&m, "api_cost_create"), writes(&m, "api_cost_update")),
        );
        row(
            "mesh watch events delivered per service create / update",
            format!(
                "{} / {}",
                num(&m, "api_cost_create.mesh_watch_events"),
                num(&m, "api_cost_update.mesh_watch_events")
            ),
        );
        let wg = list(&m, "iperf3_bits_per_second.wireguard_go");
        let veth = list(&m, "iperf3_bits_per_second.underlay");
        row("iperf3 -t 5 over the mesh, wireguard-go (2 runs)", range(&wg, 1e6, "Mbit/s"));
        row(
            "iperf3 -t 5 over the mesh, boringtun-cli",
            m["iperf3_bits_per_second"]["boringtun_cli"].as_str().unwrap_or("n/a").to_owned(),
        );
        row("iperf3 -t 5 over the veth underlay (2 runs)", range(&veth, 1e6, "Mbit/s"));
        row("mesh / underlay throughput", format!("{:.1} %", 100.0 * mean(&wg) / mean(&veth)));
        let cpu = list(&m, "agent_idle.cpu_percent");
        let rss = list(&m, "agent_idle.rss_mib");
        row(
            "mesh-agent at idle: CPU over 10 s / RSS (mean of the 3 agents, debug build)",
            format!("{:.2} % of a core / {:.1} MiB", mean(&cpu), mean(&rss)),
        );
    }
    if let Some(c) = read(&dir, "controller.json") {
        row("**mesh-controller on the lab's kube-apiserver**", String::new());
        row("IPAM alone: allocations/s filling a /16", format!("{:.0}", num(&c, "ipam_allocations_per_second")));
        row(
            "allocations/s, burst of 150 services (median of 3)",
            format!("{:.1}", num(&c, "controller_allocations_per_second.median")),
        );
        row(
            "controller API writes per MeshService create (median of 3)",
            format!("{:.2}", num(&c, "api_writes_per_service_create.median")),
        );
    }
    if let Some(s) = read(&dir, "scale.json") {
        let (nodes, services) = (num(&s, "nodes"), num(&s, "services"));
        row(&format!("**simulated scale: {nodes} nodes, {services} services (recording backend)**"), String::new());
        row(
            &format!(
                "MeshService create → routed by all {nodes} agents' devices, median / p99 ({} tries)",
                num(&s, "tries")
            ),
            format!(
                "{:.2} / {:.2} s",
                num(&s, "routed_all_agents_seconds.median"),
                num(&s, "routed_all_agents_seconds.p99")
            ),
        );
        row(
            &format!(
                "MeshService create → applied (routed + DNS) by all {nodes} agents, median / p99 ({} tries)",
                num(&s, "tries")
            ),
            format!(
                "{:.2} / {:.2} s",
                num(&s, "converge_all_agents_seconds.median"),
                num(&s, "converge_all_agents_seconds.p99")
            ),
        );
        row(
            "MeshService create → applied by one agent, median / p99 (every agent, every try)",
            format!(
                "{:.2} / {:.2} s",
                num(&s, "converge_per_agent_seconds.median"),
                num(&s, "converge_per_agent_seconds.p99")
            ),
        );
        row(
            "one agent's sync steps incl. its status writes (wall) / shared directory snapshot / process CPU per sync",
            format!(
                "{:.0} / {:.0} / {:.1} ms",
                num(&s, "sim_sync_mean_ms"),
                num(&s, "sim_snapshot_mean_ms"),
                num(&s, "sim_cpu_per_sync_ms")
            ),
        );
        row(
            "API writes per service create / update",
            format!("{} / {}", writes(&s, "api_cost_create"), writes(&s, "api_cost_update")),
        );
        row(
            &format!(
                "mesh watch events delivered per service create / update ({} shared watches)",
                num(&s, "directories")
            ),
            format!(
                "{} / {}",
                num(&s, "api_cost_create.mesh_watch_events"),
                num(&s, "api_cost_update.mesh_watch_events")
            ),
        );
        row(
            "mesh-controller RSS, steady / after a full resync",
            format!(
                "{:.0} / {:.0} MiB",
                num(&s, "controller_rss_mib.steady"),
                num(&s, "controller_rss_mib.after_resync")
            ),
        );
        row(
            "mesh-controller full resync: ready / every object reconciled / last reconcile",
            format!(
                "{:.2} / {:.2} / {:.2} s",
                num(&s, "controller_resync_seconds.ready"),
                num(&s, "controller_resync_seconds.all_reconciled"),
                num(&s, "controller_resync_seconds.last_reconcile")
            ),
        );
        row(
            "mesh-controller API writes during the full resync (to MeshNodes)",
            format!("{} ({})", num(&s, "controller_resync_writes"), num(&s, "controller_resync_meshnode_writes")),
        );
        row("simulation process RSS (all simulated agents)", format!("{:.0} MiB", num(&s, "sim_process_rss_mib")));
        row(
            "MeshNode watch events per watcher per service create / update",
            format!(
                "{:.1} / {:.1}",
                num(&s, "meshnode_watch_events_per_watcher.create"),
                num(&s, "meshnode_watch_events_per_watcher.update")
            ),
        );
        row(
            "one real agent (release) at this size: RSS / sync mean / plan mean",
            format!(
                "{:.0} MiB / {:.1} ms / {:.2} ms",
                num(&s, "real_agent.rss_mib"),
                num(&s, "real_agent.sync_mean_ms"),
                num(&s, "real_agent.plan_mean_ms")
            ),
        );
        row(
            "one real agent (release) idle on the 3-node lab: CPU / RSS",
            format!(
                "{:.2} % of a core / {:.1} MiB",
                num(&s, "real_agent.idle_cpu_percent"),
                num(&s, "real_agent.idle_rss_mib")
            ),
        );
    }

    if let Some(y) = read(&dir, "sync.json") {
        let (nodes, services) = (num(&y, "nodes"), num(&y, "services"));
        row(
            &format!("**one agent's sync in CPU, {nodes} nodes, {services} services (no kernel, best of 5)**"),
            String::new(),
        );
        row(
            "shared directory afresh (first sync) / after one change (the watches' objects only) / one node's plan",
            format!(
                "{:.1} / {:.1} / {:.1} ms",
                num(&y, "directory_ms"),
                num(&y, "directory_one_change_ms"),
                num(&y, "plan_ms")
            ),
        );
        row("a whole sync after one change (directory, plan, DNS)", format!("{:.1} ms", num(&y, "sync_one_change_ms")));
        row(
            "heap held: stored MeshNodes / kept directory / DNS server (the MeshServices as objects, which no store holds)",
            format!(
                "{:.1} / {:.1} / {:.1} MiB ({:.1} MiB)",
                num(&y, "heap_mib.objects"),
                num(&y, "heap_mib.directory"),
                num(&y, "heap_mib.dns_server"),
                num(&y, "heap_mib.service_objects")
            ),
        );
        row(
            "DNS server: one name changed / every name (a new server)",
            format!("{:.1} / {:.1} ms", num(&y, "dns_one_change_ms"), num(&y, "dns_every_name_ms")),
        );
        row(
            "device: diff against the kept state / every peer read back (UAPI text parsed) and diffed",
            format!("{:.1} / {:.1} ms", num(&y, "device_diff_ms"), num(&y, "device_read_and_diff_ms")),
        );
        row(
            "hosts block: every name rendered and spliced into the file's text",
            format!("{:.1} ms", num(&y, "hosts_block_ms")),
        );
        row(
            "one node's plan when no peer is reached directly (all stranded)",
            format!("{:.1} ms", num(&y, "plan_without_direct_ms")),
        );
    }

    let width = rows.iter().map(|(n, _)| n.chars().count()).max().unwrap_or(9).max(9);
    println!("\n| {:<width$} | value |", "benchmark");
    println!("|{}|-------|", "-".repeat(width + 2));
    for (name, value) in &rows {
        println!("| {name:<width$} | {value} |");
    }
    let summary: Vec<Value> = rows.iter().map(|(n, v)| json!({"benchmark": n, "value": v})).collect();
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    println!("\nwrote {}", dir.join("summary.json").display());
    Ok(())
}
