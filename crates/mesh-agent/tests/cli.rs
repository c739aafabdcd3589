//! The `mesh-agent` binary as the chart starts it: flags and environment together.

/// The chart's device DaemonSet sets MESH_WIREGUARD and MESH_INTERFACE, which are also the
/// agent's own flags' variables: `mesh-agent device` must still start (it once exited at once
/// with "the following required argument was not provided: node", and the kubelet lab's device
/// pods crash-looped). With `--wireguard off` it holds nothing and idles until killed.
#[test]
fn the_device_subcommand_starts_with_the_agents_environment() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(["device", "--wireguard", "off", "--interface", "hm-unit-none"])
        .env("MESH_WIREGUARD", "auto")
        .env("MESH_INTERFACE", "hm-unit-none")
        .env_remove("NODE_NAME")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("starting mesh-agent device");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let exited = child.try_wait().expect("polling mesh-agent device");
    let _ = child.kill();
    let out = child.wait_with_output().expect("reaping mesh-agent device");
    assert!(exited.is_none(), "mesh-agent device exited: {}", String::from_utf8_lossy(&out.stderr));
}
