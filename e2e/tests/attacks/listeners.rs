//! Attacks on the agent's own listeners, with the chart as installed (kubelet lab only: the
//! plain lab starts its agents with an explicit `--metrics-addr`).
//!
//! The agent runs in the host network. Its `/metrics` and `/healthz` used to bind 0.0.0.0, so
//! any peer of the mesh read them on the node's mesh IP (and anything else that reached any of
//! the node's interfaces). Now they bind the node IP: the kubelet's probes and Prometheus reach
//! them there, peers through the tunnel do not.

use std::time::Duration;

use anyhow::{Context, ensure};
use harness_mesh_e2e::mesh::Mesh;

/// The chart's agent.metricsPort.
const METRICS_PORT: u16 = 9464;

/// `curl` on `node`, bounded to 3 s: the body, or `None` when nothing answered.
fn fetch(mesh: &Mesh, node: &str, url: &str) -> anyhow::Result<Option<String>> {
    let out = mesh.nodes.exec(node, &["curl", "-sS", "--max-time", "3", url])?;
    Ok(out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
}

#[tokio::test]
async fn a_peer_cannot_read_an_agents_metrics_through_the_tunnel() -> anyhow::Result<()> {
    let _serial = super::SERIAL.lock().await;
    let mesh = Mesh::get_kubelet(Duration::from_secs(90)).await?;
    let info = mesh.info().await?;
    let (attacker, victim) = (&mesh.nodes.names[0], &mesh.nodes.names[1]);
    let target = info.get(victim).with_context(|| format!("{victim} has no mesh IP yet"))?;
    let node_ip = target.endpoint.rsplit_once(':').map(|(host, _)| host).context("endpoint without a port")?;

    let on_node_ip = fetch(&mesh, attacker, &format!("http://{node_ip}:{METRICS_PORT}/healthz"))?;
    ensure!(
        on_node_ip.as_deref().map(str::trim) == Some("ok"),
        "{victim}'s /healthz does not answer on its node IP {node_ip} (the kubelet probes it there): {on_node_ip:?}"
    );
    let url = format!("http://{}:{METRICS_PORT}/metrics", target.mesh_ip);
    let through_tunnel = fetch(&mesh, attacker, &url)?;
    ensure!(
        through_tunnel.is_none(),
        "{attacker} read {victim}'s metrics through the tunnel at {url}: {} bytes",
        through_tunnel.map_or(0, |body| body.len())
    );
    Ok(())
}
