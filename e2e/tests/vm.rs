//! The mixed mesh: namespace nodes with userspace WireGuard (wireguard-go) and VM nodes with the
//! kernel's WireGuard (Debian's cloud kernel in QEMU, `e2e/lab/lab.sh up --vm-nodes K`), the real
//! agent on each. What only a real kernel can show: the kernel backend's own tests pass there,
//! a kernel node's underlay carries nothing but WireGuard, an agent restart keeps the kernel
//! device and every packet through it, and a peer with hundreds of allowed IPs (a device whose
//! netlink dump spans several messages) reads back exactly, checked with `wg(8)`, an
//! implementation independent of the agent's.
//!
//! Runs on the lab with VM nodes (`make e2e-vm`, part of `make test`), with `HARNESS_MESH_NODES`
//! naming a mix of both kinds, e.g. `hm-node-1,hm-vm-1,hm-node-2`.

use std::fs::File;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use harness_mesh_e2e::controller::service;
use harness_mesh_e2e::mesh::{Mesh, PingStats, eventually_async};
use harness_mesh_e2e::repo_root;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use mesh_api::{Backend, MeshNode, MeshService};
use serde_json::json;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const CONVERGE: Duration = Duration::from_secs(180);
/// The port of the VM nodes' command server (`e2e/lab/vm.sh`).
const VM_EXEC_PORT: u16 = 7022;

fn is_vm(node: &str) -> bool {
    node.starts_with("hm-vm-")
}

/// The suite's nodes: (VM nodes, namespace nodes); fails unless there is at least one of each.
fn kinds(mesh: &Mesh) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let (vms, netns): (Vec<String>, Vec<String>) = mesh.nodes.names.iter().cloned().partition(|n| is_vm(n));
    if vms.is_empty() || netns.is_empty() {
        bail!(
            "the VM suite needs VM nodes and namespace nodes in HARNESS_MESH_NODES (make e2e-vm), got {:?}",
            mesh.nodes.names
        );
    }
    Ok((vms, netns))
}

/// Runs `lab.sh exec NODE -- ARGS` with `stdin` as its standard input.
fn exec_with_stdin(node: &str, args: &[&str], stdin: Stdio) -> anyhow::Result<std::process::Output> {
    Command::new(repo_root().join("e2e/lab/lab.sh"))
        .args(["exec", node, "--"])
        .args(args)
        .stdin(stdin)
        .output()
        .with_context(|| format!("running {args:?} on {node}"))
}

/// The interface index of `wg-harness` on `node`, and its kind (`wireguard` for the kernel's).
fn wg_link(mesh: &Mesh, node: &str) -> anyhow::Result<(u32, String)> {
    let out = mesh.nodes.exec_ok(node, &["ip", "-d", "-o", "link", "show", "wg-harness"])?;
    let index = out.split(':').next().unwrap_or_default().trim().parse().with_context(|| out.clone())?;
    let kind = if out.contains(" wireguard ") { "wireguard" } else { "other" };
    Ok((index, kind.to_owned()))
}

#[tokio::test]
async fn the_mesh_mixes_kernel_and_userspace_and_every_pair_pings_both_ways() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let (vms, _) = kinds(&mesh)?;
    let api: Api<MeshNode> = Api::all(mesh.cluster.client.clone());
    for node in &mesh.nodes.names {
        let backend = api.get(node).await?.status.and_then(|s| s.backend);
        let want = if is_vm(node) { Backend::Kernel } else { Backend::Userspace };
        assert_eq!(backend, Some(want), "{node} runs the wrong WireGuard backend");
    }
    for vm in &vms {
        assert_eq!(wg_link(&mesh, vm)?.1, "wireguard", "{vm}'s wg-harness is not the kernel's");
    }
    let info = mesh.info().await?;
    for from in &mesh.nodes.names {
        for (to, node) in &info {
            if from != to {
                let stats = mesh.ping(from, node.mesh_ip, 3, 0.2)?;
                assert_eq!(stats.received, 3, "{from} -> {to} ({}): {stats:?}", node.mesh_ip);
            }
        }
    }
    for node in &mesh.nodes.names {
        mesh.check_device_matches_directory(node).await?;
    }
    Ok(())
}

/// The mesh-agent unit tests' binary, stripped for the VM's memory: `$MESH_AGENT_TEST_BINARY`
/// (`make e2e-vm` builds it before the lab: cargo run from inside a test sees another
/// environment and rebuilds half the workspace), else built here with cargo.
fn agent_test_binary() -> anyhow::Result<std::path::PathBuf> {
    let stripped = repo_root().join("target/vm-mesh-agent-tests");
    if let Some(built) = std::env::var_os("MESH_AGENT_TEST_BINARY") {
        let status = Command::new("objcopy").arg("--strip-all").arg(&built).arg(&stripped).status()?;
        anyhow::ensure!(status.success(), "objcopy --strip-all {built:?} failed");
        return Ok(stripped);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["test", "--quiet", "-p", "mesh-agent", "--bin", "mesh-agent", "--no-run", "--message-format=json"])
        .current_dir(repo_root())
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run -p mesh-agent")?;
    anyhow::ensure!(out.status.success(), "building mesh-agent's tests failed");
    let built = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["profile"]["test"] == true)
        .filter(|m| m["target"]["name"] == "mesh-agent")
        .find_map(|m| m["executable"].as_str().map(std::path::PathBuf::from))
        .context("cargo reported no mesh-agent test binary")?;
    let status = Command::new("objcopy").arg("--strip-all").arg(&built).arg(&stripped).status()?;
    anyhow::ensure!(status.success(), "objcopy --strip-all {} failed", built.display());
    Ok(stripped)
}

#[tokio::test]
async fn the_kernel_backends_own_tests_pass_on_the_vm_kernel() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let (vms, _) = kinds(&mesh)?;
    let binary = tokio::task::spawn_blocking(agent_test_binary).await??;
    let vm = &vms[0];
    let copy = exec_with_stdin(
        vm,
        &["sh", "-c", "cat >/tmp/mesh-agent-tests && chmod 755 /tmp/mesh-agent-tests"],
        Stdio::from(File::open(&binary)?),
    )?;
    anyhow::ensure!(copy.status.success(), "copying the tests to {vm}: {}", String::from_utf8_lossy(&copy.stderr));
    // The VM tier sets MESH_REQUIRE_KERNEL_WG=1: "Unsupported" is then a failure there.
    let require = std::env::var("MESH_REQUIRE_KERNEL_WG").unwrap_or_else(|_| "1".into());
    let out = mesh.nodes.exec(
        vm,
        &[
            "env",
            &format!("MESH_REQUIRE_KERNEL_WG={require}"),
            "/tmp/mesh-agent-tests",
            // The tests that need a kernel; the pure ones ran on the host already.
            "backend::kernel::tests::open_in_a_fresh_network_namespace",
            "--exact",
            "--nocapture",
        ],
    )?;
    let _ = mesh.nodes.exec(vm, &["rm", "-f", "/tmp/mesh-agent-tests"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{stdout}\n{stderr}");
    assert!(out.status.success(), "the kernel backend's tests failed on {vm}'s kernel");
    assert!(
        stderr.contains("kernel-netns-result: kernel"),
        "the namespace test did not run against the kernel's WireGuard on {vm}"
    );
    let passed: u32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("test result: ok. "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .context("no test summary")?;
    assert_eq!(passed, 1, "the kernel backend's namespace test did not run on {vm}");
    Ok(())
}

#[tokio::test]
async fn a_kernel_node_sends_only_wireguard_on_the_underlay() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let (vms, netns) = kinds(&mesh)?;
    let info = mesh.info().await?;
    let (sender, target) = (&vms[0], &info[&netns[0]]);
    let underlay_ip = target.endpoint.split(':').next().unwrap_or_default().to_owned();
    // The VM's command channel (lab-vm-exec) runs on the same eth0: it carries the commands
    // below, markers included, and this capture itself, so it is left out.
    let filter = format!("not tcp port {VM_EXEC_PORT}");
    let mut capture =
        mesh.nodes.spawn(sender, &["timeout", "30", "tcpdump", "-i", "eth0", "-U", "-w", "-", "-s", "0", &filter])?;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let secret = "harness-mesh-marker-over-the-kernel-mesh";
    let plain = "harness-mesh-marker-in-the-clear";
    for _ in 0..5 {
        mesh.nodes.exec_ok(sender, &["sh", "-c", &format!("echo {secret} | socat -u - UDP:{}:9", target.mesh_ip)])?;
        mesh.nodes.exec_ok(sender, &["sh", "-c", &format!("echo {plain} | socat -u - UDP:{underlay_ip}:9")])?;
    }
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let _ = mesh.nodes.exec(sender, &["pkill", "-INT", "-x", "tcpdump"]);
    let mut pcap = Vec::new();
    capture.stdout.take().context("capture stdout")?.read_to_end(&mut pcap)?;
    let _ = capture.wait();
    let contains = |needle: &str| pcap.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(pcap.len() > 24, "the capture on {sender}/eth0 recorded nothing");
    assert!(contains(plain), "the capture missed the marker sent in the clear: it cannot prove anything");
    assert!(!contains(secret), "the marker sent over the kernel's WireGuard crossed the underlay in plaintext");
    Ok(())
}

#[tokio::test]
async fn an_agent_restart_on_a_vm_keeps_the_kernel_device_and_every_packet_through_it() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let (vms, netns) = kinds(&mesh)?;
    let vm = &vms[0];
    let info = mesh.info().await?;
    let before = wg_link(&mesh, vm)?;
    // 10 pps for 10 s to the VM, and from the VM to another node, while its agent restarts.
    let to_vm = info[vm].mesh_ip.to_string();
    let from_vm = info[netns.last().unwrap_or(&netns[0])].mesh_ip.to_string();
    let ping = ["ping", "-n", "-q", "-c", "100", "-i", "0.1", "-W", "2"];
    let mut inbound = mesh.nodes.spawn(&netns[0], &[&ping[..], &[to_vm.as_str()]].concat())?;
    let mut outbound = mesh.nodes.spawn(vm, &[&ping[..], &[from_vm.as_str()]].concat())?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let restart = Instant::now();
    mesh.nodes.restart_agent(vm)?;
    eprintln!("{vm}'s agent restarted in {:?}", restart.elapsed());
    let mut results = Vec::new();
    for (what, child) in [("to", &mut inbound), ("from", &mut outbound)] {
        let mut text = String::new();
        let _ = child.wait();
        child.stdout.take().context("ping stdout")?.read_to_string(&mut text)?;
        results.push((what, PingStats::parse(&text).with_context(|| text.clone())?));
    }
    for (what, stats) in results {
        assert_eq!(stats.received, stats.sent, "pings {what} {vm} were lost while its agent restarted: {stats:?}");
    }
    assert_eq!(wg_link(&mesh, vm)?, before, "the restart replaced {vm}'s kernel device");
    mesh.wait_connected(CONVERGE).await?;
    mesh.check_device_matches_directory(vm).await?;
    Ok(())
}

/// The most allowed IPs any peer on `node`'s device has.
fn largest_peer(mesh: &Mesh, node: &str) -> anyhow::Result<usize> {
    Ok(mesh.wg_dump(node)?.values().map(|p| p.allowed_ips.len()).max().unwrap_or(0))
}

#[tokio::test]
async fn a_peer_with_hundreds_of_allowed_ips_reads_back_exactly_on_the_kernel() -> anyhow::Result<()> {
    const SERVICES: usize = 300;
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let (vms, netns) = kinds(&mesh)?;
    let host = &netns[0];
    let api: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    let label = "e2e-vm-many";
    let cleanup = || async {
        let _ =
            api.delete_collection(&DeleteParams::default(), &ListParams::default().labels(&format!("{label}=1"))).await;
    };
    cleanup().await;
    let result = async {
        // 16 creates in flight: the point is the size of the peer, not the API's latency.
        let created: Vec<_> = futures::stream::iter(0..SERVICES)
            .map(|i| {
                let api = api.clone();
                let mut svc = service(
                    &format!("e2e-vm-many-{i}"),
                    json!({"node": host, "network": {"type": "mesh", "ports": [80]}}),
                );
                svc.metadata.labels = Some([(label.to_owned(), "1".to_owned())].into());
                async move { api.create(&PostParams::default(), &svc).await }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        for result in created {
            result?;
        }
        let start = Instant::now();
        // Every VM's kernel device has the host's peer with all its IPs, exactly as the
        // directory says, read with wg(8) rather than the agent's own netlink code.
        eventually_async(Duration::from_secs(240), || async {
            for vm in &vms {
                let most = largest_peer(&mesh, vm)?;
                if most <= SERVICES {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    bail!("{vm}'s largest peer has {most} allowed IPs so far");
                }
                mesh.check_device_matches_directory(vm).await?;
            }
            Ok(())
        })
        .await?;
        eprintln!("{SERVICES} services on {host} reached every VM's kernel device in {:?}", start.elapsed());
        let lines = mesh.nodes.exec_ok(&vms[0], &["sh", "-c", "wg show wg-harness allowed-ips | wc -w"])?;
        eprintln!("{}: {} words in `wg show allowed-ips`", vms[0], lines.trim());
        anyhow::Ok(())
    }
    .await;
    cleanup().await;
    result?;
    // And back: the services gone, the peer shrinks to the host's own IP again.
    eventually_async(Duration::from_secs(240), || async {
        for vm in &vms {
            let most = largest_peer(&mesh, vm)?;
            if most > 1 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                bail!("{vm} still has a peer with {most} allowed IPs");
            }
            mesh.check_device_matches_directory(vm).await?;
        }
        Ok(())
    })
    .await?;
    Ok(())
}
