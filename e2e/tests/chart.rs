//! The Helm chart `charts/harness-mesh` on a real kube-apiserver (the lab, or the cluster
//! `HARNESS_MESH_KUBECONFIG` names):
//!
//! - `helm lint --strict` is clean with every option, the values schema refuses bad values,
//!   and the chart's CRDs are the generated ones;
//! - every rendering passes a server-side dry run, and the workloads are least-privilege;
//! - `helm install`, `upgrade` and `uninstall` create, change and remove exactly the chart's
//!   objects, and leave the CRDs (which Helm never owns) Established;
//! - RBAC and the node-restriction policy, proven with tokens of the chart's own
//!   ServiceAccounts from the TokenRequest API: an agent token (bound to a Pod on a node, or to
//!   a Node) writes its own MeshNode's status and Lease and nothing else; the controller token
//!   does all the controller does and no more; and neither is granted anything beyond that.
//!
//! Every test owns a `chart-test-*` namespace and release and removes everything it made,
//! also when it fails (see `harness_mesh_e2e::chart::Sandbox`).

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use harness_mesh_e2e::chart::{self, Grant, NEVER_SCHEDULED, Sandbox, documents, grants, kind_and_name};
use harness_mesh_e2e::{Cluster, repo_root};
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Error};
use mesh_api::{MeshNode, MeshService};
use serde_json::{Value, json};

/// Bound of each test, cleanup included.
const BOUND: Duration = Duration::from_secs(300);

async fn bounded(test: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::time::timeout(BOUND, test).await.with_context(|| format!("the test did not finish within {BOUND:?}"))?
}

/// Value sets every check runs with: the defaults, and each option switched the other way.
const VALUE_SETS: &[&[&str]] = &[
    &[],
    &[
        "agent.dns.onUnderlay=true",
        "agent.dns.service.enabled=true",
        "agent.wireguard=userspace",
        "coreDNS.stubDomain.enabled=true",
        "coreDNS.stubDomain.upstreams={192.0.2.11,192.0.2.12:53}",
        "controller.clusterCIDRs={10.244.0.0/16,10.96.0.0/12}",
        "controller.extraEnv[0].name=EXTRA",
        "controller.extraEnv[0].value=debug",
        "imagePullSecrets[0].name=regcred",
        "commonLabels.team=net",
    ],
    &[
        "agent.wireguard=kernel",
        "agent.privileged=true",
        "agent.dns.enabled=false",
        "controller.replicas=1",
        "controller.leaderElection.enabled=false",
    ],
    &["controller.deploy=false", "agent.deploy=false", "metrics.service.enabled=false"],
    &["agent.nodeRestriction.enabled=false", "controller.podDisruptionBudget.enabled=false", "agent.wireguard=off"],
    &["serviceMonitor.enabled=true", "serviceMonitor.labels.release=prometheus"],
];

#[tokio::test]
async fn chart_lints_clean_and_its_schema_refuses_bad_values() -> anyhow::Result<()> {
    bounded(async {
        let cluster = Cluster::get().await?;
        let helm = chart::Helm::new(&cluster).await?;
        let dir = chart::chart_dir().display().to_string();
        for sets in VALUE_SETS {
            let mut args = vec!["lint", "--strict", dir.as_str(), "--kube-version", &helm.kube_version];
            for set in *sets {
                args.extend(["--set", set]);
            }
            let out = helm.ok(&args)?;
            ensure!(out.contains("1 chart(s) linted, 0 chart(s) failed"), "helm lint with {sets:?}:\n{out}");
            ensure!(!out.contains("[WARNING]") && !out.contains("[ERROR]"), "helm lint with {sets:?}:\n{out}");
        }
        // The schema names the offending key; the templates explain what a setting needs.
        let refused = [
            ("controller.replicas=-1", "/controller/replicas"),
            ("agent.wireguard=kernal", "/agent/wireguard"),
            ("agent.typo=1", "'typo' not allowed"),
            ("mesh.subnet=10.42.0.0", "/mesh/subnet"),
            ("agent.mtu=99999", "/agent/mtu"),
            ("coreDNS.stubDomain.enabled=true", "needs somewhere to forward mesh.local"),
            ("agent.dns.service.enabled=true", "needs agent.deploy, agent.dns.enabled and agent.dns.onUnderlay"),
            ("coreDNS.stubDomain.upstreams={mesh.example}", "/coreDNS/stubDomain/upstreams/0"),
            ("agent.resolver=resolvd", "/agent/resolver"),
            ("agent.hostsFile=etc/hosts", "/agent/hostsFile"),
            ("mesh.zone=mesh..internal", "/mesh/zone"),
        ];
        for (set, expected) in refused {
            let err = helm.template("chart-test-lint", "chart-test-lint", &[set], false).expect_err(set).to_string();
            ensure!(err.contains(expected), "--set {set}: expected an error naming {expected:?}, got:\n{err}");
        }
        let err = helm
            .template(
                "chart-test-lint",
                "chart-test-lint",
                &["serviceMonitor.enabled=true", "metrics.service.enabled=false"],
                false,
            )
            .expect_err("ServiceMonitor without Services")
            .to_string();
        ensure!(err.contains("serviceMonitor.enabled needs metrics.service.enabled"), "{err}");
        let err = helm
            .template("chart-test-lint", "chart-test-lint", &["agent.resolver=resolved", "agent.dns.port=5353"], false)
            .expect_err("resolved without DNS on port 53")
            .to_string();
        ensure!(err.contains("agent.resolver=resolved needs agent.dns.enabled with agent.dns.port 53"), "{err}");
        Ok(())
    })
    .await
}

/// The chart ships `crds/` as generated by `make crds` (the drift check of the chart's copy).
#[test]
fn the_charts_crds_are_the_generated_ones() -> anyhow::Result<()> {
    for file in mesh_api::CRD_FILES {
        let generated = repo_root().join("crds").join(file);
        let shipped = chart::chart_dir().join("crds").join(file);
        let (a, b) =
            (std::fs::read(&generated)?, std::fs::read(&shipped).with_context(|| shipped.display().to_string())?);
        ensure!(a == b, "{} differs from {}: run `make crds`", shipped.display(), generated.display());
    }
    let shipped: BTreeSet<_> = std::fs::read_dir(chart::chart_dir().join("crds"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    let generated: BTreeSet<_> = mesh_api::CRD_FILES.iter().map(|f| (*f).to_owned()).collect();
    ensure!(shipped == generated, "the chart's crds/ holds {shipped:?}, crds/ generates {generated:?}");
    Ok(())
}

#[tokio::test]
async fn every_rendering_passes_a_server_side_dry_run() -> anyhow::Result<()> {
    bounded(async {
        let sandbox = Sandbox::new("dry").await?;
        let release = sandbox.release().to_owned();
        for sets in VALUE_SETS {
            let all: Vec<&str> = NEVER_SCHEDULED.iter().copied().chain(sets.iter().copied()).collect();
            let yaml = sandbox.helm.template(&release, &sandbox.namespace, &all, true)?;
            let docs = documents(&yaml)?;
            let mut checked = Vec::new();
            for doc in &docs {
                let (kind, name) = kind_and_name(doc);
                match doc["metadata"]["namespace"].as_str() {
                    // connect.exposeNamespaces (default: default): where connect users may expose.
                    Some("default")
                        if kind == "RoleBinding" && name.starts_with(&release) && name.ends_with("-connect-expose") => {
                    }
                    Some(ns) => ensure!(ns == sandbox.namespace, "{kind} {name} is rendered into namespace {ns}"),
                    // Cluster-scoped: named after the release, so two releases never collide.
                    None if kind != "CustomResourceDefinition" => {
                        ensure!(name.starts_with(&release), "cluster-scoped {kind} {name} is not prefixed {release}")
                    }
                    None => {}
                }
                // The lab has no Prometheus Operator CRDs; the ServiceMonitors are checked below.
                if kind != "ServiceMonitor" {
                    checked.push(doc.clone());
                }
            }
            let file = std::env::temp_dir().join(format!("{release}-dry-run.json"));
            std::fs::write(
                &file,
                serde_json::to_string(&json!({"apiVersion": "v1", "kind": "List", "items": checked}))?,
            )?;
            let path = file.display().to_string();
            let out = sandbox.cluster.kubectl(&[
                "apply",
                "--dry-run=server",
                "--server-side",
                "--field-manager=chart-test",
                "--request-timeout=60s",
                "-f",
                &path,
            ])?;
            let _ = std::fs::remove_file(&file);
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            ensure!(out.status.success(), "server-side dry run with {sets:?} failed:\n{stdout}{stderr}");
            ensure!(stderr.trim().is_empty(), "server-side dry run with {sets:?} warned:\n{stderr}");
            ensure!(
                stdout.matches("(server dry run)").count() == checked.len(),
                "dry run with {sets:?} accepted fewer than {} objects:\n{stdout}",
                checked.len()
            );
            if sets.contains(&"serviceMonitor.enabled=true") {
                check_service_monitors(&docs)?;
            }
        }
        Ok(())
    })
    .await
}

/// Each ServiceMonitor selects exactly its component's metrics Service, by its port name.
fn check_service_monitors(docs: &[Value]) -> anyhow::Result<()> {
    let monitors: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "ServiceMonitor").collect();
    ensure!(monitors.len() == 2, "expected 2 ServiceMonitors, got {}", monitors.len());
    for monitor in monitors {
        ensure!(
            monitor["apiVersion"] == "monitoring.coreos.com/v1"
                && monitor["metadata"]["labels"]["release"] == "prometheus"
        );
        let selector = monitor["spec"]["selector"]["matchLabels"].as_object().context("no selector")?;
        let matching: Vec<&Value> = docs
            .iter()
            .filter(|d| d["kind"] == "Service")
            .filter(|d| selector.iter().all(|(k, v)| d["metadata"]["labels"][k] == *v))
            .collect();
        ensure!(
            matching.len() == 1,
            "ServiceMonitor {} selects {} Services",
            monitor["metadata"]["name"],
            matching.len()
        );
        ensure!(matching[0]["spec"]["ports"][0]["name"] == monitor["spec"]["endpoints"][0]["port"]);
    }
    Ok(())
}

fn find<'a>(docs: &'a [Value], kind: &str) -> anyhow::Result<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind).with_context(|| format!("no {kind} rendered"))
}

/// The rendered object of `kind` whose name ends with `suffix`.
fn find_named<'a>(docs: &'a [Value], kind: &str, suffix: &str) -> anyhow::Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"].as_str().is_some_and(|n| n.ends_with(suffix)))
        .with_context(|| format!("no {kind} *{suffix} rendered"))
}

#[tokio::test]
async fn workloads_are_least_privilege() -> anyhow::Result<()> {
    bounded(async {
        let cluster = Cluster::get().await?;
        let helm = chart::Helm::new(&cluster).await?;
        let docs = documents(&helm.template("chart-test-w", "chart-test-w", &[], false)?)?;

        let controller = &find(&docs, "Deployment")?["spec"];
        ensure!(controller["replicas"] == 2, "two controller replicas by default");
        let pod = &controller["template"]["spec"];
        let c = &pod["containers"][0];
        ensure!(pod["securityContext"]["runAsNonRoot"] == true && pod["securityContext"]["runAsUser"] == 65532);
        ensure!(c["securityContext"]["readOnlyRootFilesystem"] == true);
        ensure!(c["securityContext"]["allowPrivilegeEscalation"] == false);
        ensure!(c["securityContext"]["capabilities"] == json!({"drop": ["ALL"]}), "{}", c["securityContext"]);
        ensure!(pod["hostNetwork"].is_null() && pod["serviceAccountName"] == "chart-test-w-harness-mesh-controller");
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            // /readyz is the leader's alone: a standby that never got Ready would stall rollouts.
            ensure!(c[probe]["httpGet"]["path"] == "/healthz", "{probe}: {}", c[probe]);
        }
        ensure!(c["resources"]["requests"].is_object() && c["resources"]["limits"]["memory"].is_string());
        let env: Vec<&str> = c["env"].as_array().context("env")?.iter().filter_map(|e| e["name"].as_str()).collect();
        for name in ["POD_NAME", "POD_NAMESPACE", "MESH_SUBNET", "MESH_LEADER_ELECT", "MESH_METRICS_ADDR"] {
            ensure!(env.contains(&name), "controller env lacks {name}: {env:?}");
        }

        let agent = &find_named(&docs, "DaemonSet", "-agent")?["spec"]["template"]["spec"];
        let a = &agent["containers"][0];
        ensure!(agent["hostNetwork"] == true && agent["dnsPolicy"] == "ClusterFirstWithHostNet");
        ensure!(agent["tolerations"] == json!([{"operator": "Exists"}]), "the agent runs on every node");
        let sc = &a["securityContext"];
        ensure!(
            sc["privileged"] == false
                && sc["allowPrivilegeEscalation"] == false
                && sc["readOnlyRootFilesystem"] == true
        );
        // NET_ADMIN for netlink and nftables; NET_BIND_SERVICE for DNS on port 53.
        let caps = json!({"drop": ["ALL"], "add": ["NET_ADMIN", "NET_BIND_SERVICE"]});
        ensure!(sc["capabilities"] == caps, "agent capabilities: {sc}");
        let env = |name: &str| a["env"].as_array().and_then(|e| e.iter().find(|e| e["name"] == name)).cloned();
        ensure!(env("MESH_DNS_PORT") == Some(json!({"name": "MESH_DNS_PORT", "value": "53"})));
        ensure!(
            env("MESH_ADVERTISE_ADDRESS").is_some_and(|e| e["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP")
        );
        // The agent adopts the device DaemonSet's wireguard-go, and tells an uninstall by its own
        // DaemonSet.
        ensure!(env("MESH_EXTERNAL_DEVICE").is_some_and(|e| e["value"] == "true"));
        ensure!(env("MESH_DAEMONSET").is_some_and(|e| e["value"] == "chart-test-w-harness-mesh-agent"));
        let node_name =
            a["env"].as_array().context("env")?.iter().find(|e| e["name"] == "NODE_NAME").context("NODE_NAME")?;
        ensure!(node_name["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName");
        let volumes = agent["volumes"].as_array().context("volumes")?;
        let host_path = |name: &str| volumes.iter().find(|v| v["name"] == name).map(|v| v["hostPath"].clone());
        ensure!(host_path("state") == Some(json!({"path": "/var/lib/harness-mesh", "type": "DirectoryOrCreate"})));
        ensure!(host_path("dev-net-tun").is_none(), "the agent needs no tun device: the device DaemonSet holds it");
        ensure!(a["readinessProbe"]["httpGet"]["path"] == "/healthz" && a["livenessProbe"]["tcpSocket"].is_object());
        check_resolver_mounts(&helm)?;
        check_container_socket_mount(&helm)?;

        // The device DaemonSet: wireguard-go on the tun device, updated only on delete (a chart
        // upgrade never restarts it), no API token, NET_ADMIN only.
        let device_set = find_named(&docs, "DaemonSet", "-agent-device")?;
        ensure!(device_set["spec"]["updateStrategy"] == json!({"type": "OnDelete"}));
        let device = &device_set["spec"]["template"]["spec"];
        let d = &device["containers"][0];
        ensure!(d["args"] == json!(["device"]) && device["hostNetwork"] == true);
        ensure!(device["automountServiceAccountToken"] == false);
        ensure!(d["securityContext"]["capabilities"] == json!({"drop": ["ALL"], "add": ["NET_ADMIN"]}));
        ensure!(device["tolerations"] == agent["tolerations"], "the device runs wherever the agent does");
        let volumes = device["volumes"].as_array().context("volumes")?;
        ensure!(volumes.iter().any(|v| v["hostPath"] == json!({"path": "/dev/net/tun", "type": "CharDevice"})));

        // DNS on an unprivileged port, or none, needs no NET_BIND_SERVICE; kernel WireGuard and
        // fallback need no device DaemonSet (the kernel's link outlives every pod).
        for sets in [
            &["agent.dns.port=5353", "agent.wireguard=kernel"][..],
            &["agent.dns.enabled=false", "agent.wireguard=off"],
        ] {
            let docs = documents(&helm.template("chart-test-w", "chart-test-w", sets, false)?)?;
            let agent = &find_named(&docs, "DaemonSet", "-agent")?["spec"]["template"]["spec"];
            let caps = &agent["containers"][0]["securityContext"]["capabilities"]["add"];
            ensure!(*caps == json!(["NET_ADMIN"]), "{sets:?}: {caps}");
            ensure!(find_named(&docs, "DaemonSet", "-agent-device").is_err(), "{sets:?}: a device DaemonSet");
            let external = agent["containers"][0]["env"]
                .as_array()
                .context("env")?
                .iter()
                .any(|e| e["name"] == "MESH_EXTERNAL_DEVICE");
            ensure!(!external, "{sets:?}: the agent waits for an external device");
        }

        // The CoreDNS stub domain forwards to the DNS Service's pinned address by default.
        let sets = [
            "agent.dns.onUnderlay=true",
            "agent.dns.service.enabled=true",
            "agent.dns.service.clusterIP=10.96.0.53",
            "coreDNS.stubDomain.enabled=true",
        ];
        let docs = documents(&helm.template("chart-test-w", "chart-test-w", &sets, false)?)?;
        let corefile = find_named(&docs, "ConfigMap", "-coredns")?["data"]["mesh.local.server"]
            .as_str()
            .context("no server block")?;
        ensure!(corefile.starts_with("mesh.local:53 {") && corefile.contains("forward . 10.96.0.53\n"), "{corefile}");
        let service =
            docs.iter().find(|d| d["metadata"]["name"] == "chart-test-w-harness-mesh-dns").context("DNS Service")?;
        ensure!(
            service["spec"]["clusterIP"] == "10.96.0.53"
                && service["spec"]["selector"]["app.kubernetes.io/component"] == "agent"
        );

        // One setting, mesh.zone, names the zone for the controller, the agents and CoreDNS.
        let zoned: Vec<&str> = sets.iter().copied().chain(["mesh.zone=mesh.internal"]).collect();
        let docs = documents(&helm.template("chart-test-w", "chart-test-w", &zoned, false)?)?;
        let corefile = find_named(&docs, "ConfigMap", "-coredns")?["data"]["mesh.internal.server"]
            .as_str()
            .context("no server block for mesh.internal")?;
        ensure!(corefile.starts_with("mesh.internal:53 {"), "{corefile}");
        for (kind, suffix) in [("Deployment", "-controller"), ("DaemonSet", "-agent")] {
            let env = &find_named(&docs, kind, suffix)?["spec"]["template"]["spec"]["containers"][0]["env"];
            let zone = env.as_array().and_then(|e| e.iter().find(|e| e["name"] == "MESH_ZONE")).map(|e| &e["value"]);
            ensure!(zone == Some(&json!("mesh.internal")), "{kind}: MESH_ZONE {zone:?}");
        }
        Ok(())
    })
    .await
}

/// `agent.containerSocket` mounts the socket's directory (read-only) and points the agent at
/// the socket inside it; unset, nothing of the node's engine is mounted.
fn check_container_socket_mount(helm: &chart::Helm) -> anyhow::Result<()> {
    for (set, want) in [(None, None), (Some("agent.containerSocket=/run/podman/podman.sock"), Some("/run/podman"))] {
        let sets: Vec<&str> = set.into_iter().collect();
        let docs = documents(&helm.template("chart-test-c", "chart-test-c", &sets, false)?)?;
        let agent = &find_named(&docs, "DaemonSet", "-agent")?["spec"]["template"]["spec"];
        let a = &agent["containers"][0];
        let env = a["env"].as_array().and_then(|e| e.iter().find(|e| e["name"] == "MESH_CONTAINER_SOCKET"));
        let volume = agent["volumes"].as_array().and_then(|v| v.iter().find(|v| v["name"] == "container-engine"));
        let mount = a["volumeMounts"].as_array().and_then(|m| m.iter().find(|m| m["name"] == "container-engine"));
        match want {
            None => {
                ensure!(env.is_none() && volume.is_none() && mount.is_none(), "no socket set, yet {env:?} {volume:?}")
            }
            Some(dir) => {
                ensure!(volume.map(|v| &v["hostPath"]["path"]) == Some(&json!(dir)), "{volume:?}");
                ensure!(mount.is_some_and(|m| m["readOnly"] == json!(true)), "{mount:?}");
                let path = mount.map(|m| m["mountPath"].as_str().unwrap_or_default().to_owned()).unwrap_or_default();
                ensure!(
                    env.map(|e| &e["value"]) == Some(&json!(format!("{path}/podman.sock"))),
                    "MESH_CONTAINER_SOCKET {env:?} is not the socket in {path}"
                );
            }
        }
    }
    Ok(())
}

/// `agent.resolver` (default auto) mounts only what its mode needs: the node's hosts file for
/// hosts, its system bus for resolved, both for auto, neither for off.
fn check_resolver_mounts(helm: &chart::Helm) -> anyhow::Result<()> {
    let hosts = json!({"path": "/etc/hosts", "type": "File"});
    let bus = json!({"path": "/run/dbus", "type": "DirectoryOrCreate"});
    for (set, mode, want_hosts, want_bus) in [
        (None, "auto", true, true),
        (Some("agent.resolver=hosts"), "hosts", true, false),
        (Some("agent.resolver=resolved"), "resolved", false, true),
        (Some("agent.resolver=off"), "off", false, false),
    ] {
        let sets: Vec<&str> = set.into_iter().collect();
        let docs = documents(&helm.template("chart-test-w", "chart-test-w", &sets, false)?)?;
        let agent = &find_named(&docs, "DaemonSet", "-agent")?["spec"]["template"]["spec"];
        let a = &agent["containers"][0];
        let env = |name: &str| {
            a["env"].as_array().and_then(|e| e.iter().find(|e| e["name"] == name)).map(|e| e["value"].clone())
        };
        ensure!(env("MESH_RESOLVER") == Some(json!(mode)), "{mode}: MESH_RESOLVER {:?}", env("MESH_RESOLVER"));
        let volumes = agent["volumes"].as_array().context("volumes")?;
        let host_path = |name: &str| volumes.iter().find(|v| v["name"] == name).map(|v| v["hostPath"].clone());
        let mounted = |name: &str, path: &str| {
            a["volumeMounts"].as_array().is_some_and(|m| m.iter().any(|m| m["name"] == name && m["mountPath"] == path))
        };
        ensure!(
            (host_path("node-hosts") == Some(hosts.clone())) == want_hosts
                && mounted("node-hosts", "/host/etc/hosts") == want_hosts
                && (env("MESH_HOSTS_FILE") == Some(json!("/host/etc/hosts"))) == want_hosts,
            "{mode}: the node's hosts file mounted: {}, expected {want_hosts}",
            !want_hosts
        );
        ensure!(
            (host_path("node-dbus") == Some(bus.clone())) == want_bus && mounted("node-dbus", "/run/dbus") == want_bus,
            "{mode}: the node's /run/dbus mounted: {}, expected {want_bus}",
            !want_bus
        );
    }
    Ok(())
}

/// `kubectl get -f FILE -o name` for the objects in `yaml`: the names that exist.
fn existing(sandbox: &Sandbox, yaml: &str) -> anyhow::Result<Vec<String>> {
    let file = std::env::temp_dir().join(format!("{}-manifest.yaml", sandbox.namespace));
    std::fs::write(&file, yaml)?;
    let out = sandbox.cluster.kubectl(&["get", "-f", &file.display().to_string(), "--ignore-not-found", "-o", "name"]);
    let _ = std::fs::remove_file(&file);
    let out = out?;
    ensure!(out.status.success(), "kubectl get -f: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?.lines().map(str::to_owned).collect())
}

fn helm_status(sandbox: &Sandbox) -> anyhow::Result<(String, u64)> {
    let out = sandbox.helm.ok(&["status", sandbox.release(), "-n", &sandbox.namespace, "-o", "json"])?;
    let status: Value = serde_json::from_str(&out)?;
    Ok((
        status["info"]["status"].as_str().unwrap_or_default().to_owned(),
        status["version"].as_u64().unwrap_or_default(),
    ))
}

#[tokio::test]
async fn install_upgrade_and_uninstall_manage_exactly_the_charts_objects() -> anyhow::Result<()> {
    bounded(async {
        let sandbox = Sandbox::new("inst").await?;
        let ns = sandbox.namespace.clone();
        let out = sandbox.install(&[])?;
        ensure!(out.contains("STATUS: deployed") && out.contains("Node restriction: ValidatingAdmissionPolicy"), "{out}");

        // Every object of the release exists.
        let manifest = sandbox.helm.ok(&["get", "manifest", sandbox.release(), "-n", &ns])?;
        let docs = documents(&manifest)?;
        let kinds: BTreeSet<String> = docs.iter().map(|d| kind_and_name(d).0).collect();
        let expected_kinds = [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "Deployment",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ];
        ensure!(kinds == expected_kinds.iter().map(|k| (*k).to_owned()).collect(), "release objects: {kinds:?}");
        let found = existing(&sandbox, &manifest)?;
        ensure!(found.len() == docs.len(), "{} objects rendered, {} exist: {found:?}", docs.len(), found.len());
        ensure!(helm_status(&sandbox)? == ("deployed".to_owned(), 1));

        // Helm skipped the CRDs that exist already (it installs crds/ only when they are missing,
        // and never owns them): still Established, and not labelled as the release's.
        for crd in ["meshnodes.mesh.harness.dev", "meshservices.mesh.harness.dev"] {
            let state = sandbox.cluster.kubectl_ok(&[
                "get",
                "crd",
                crd,
                "-o",
                r#"jsonpath={.status.conditions[?(@.type=="Established")].status}/{.metadata.labels.app\.kubernetes\.io/managed-by}"#,
            ])?;
            ensure!(state == "True/", "CRD {crd} (Established/managed-by): {state:?}");
        }

        // Upgrade: changes apply, new objects appear.
        sandbox.upgrade(&[
            "controller.replicas=3",
            "agent.dns.port=5353",
            "agent.dns.onUnderlay=true",
            "agent.dns.service.enabled=true",
            "coreDNS.stubDomain.enabled=true",
            "coreDNS.stubDomain.upstreams={192.0.2.53}",
        ])?;
        ensure!(helm_status(&sandbox)? == ("deployed".to_owned(), 2));
        let controller = format!("deployment/{}", sandbox.controller_sa());
        ensure!(sandbox.cluster.kubectl_ok(&["get", "-n", &ns, &controller, "-o", "jsonpath={.spec.replicas}"])? == "3");
        let caps = sandbox.cluster.kubectl_ok(&[
            "get",
            "-n",
            &ns,
            &format!("daemonset/{}", sandbox.agent_sa()),
            "-o",
            "jsonpath={.spec.template.spec.containers[0].securityContext.capabilities.add}",
        ])?;
        ensure!(caps == r#"["NET_ADMIN"]"#, "agent capabilities after moving DNS to port 5353: {caps}");
        let configmap = format!("configmap/{}-coredns", sandbox.fullname());
        let corefile = sandbox.cluster.kubectl_ok(&["get", "-n", &ns, &configmap, "-o", r"jsonpath={.data.mesh\.local\.server}"])?;
        ensure!(corefile.contains("mesh.local:53 {") && corefile.contains("forward . 192.0.2.53"), "{corefile}");
        let dns_service = format!("service/{}-dns", sandbox.fullname());
        let ports = sandbox.cluster.kubectl_ok(&["get", "-n", &ns, &dns_service, "-o", "jsonpath={.spec.ports[*].targetPort}"])?;
        ensure!(ports == "5353 5353", "DNS Service target ports: {ports}");

        // Upgrade again: what is switched off goes away.
        sandbox.upgrade(&[
            "agent.nodeRestriction.enabled=false",
            "controller.leaderElection.enabled=false",
            "controller.replicas=1",
        ])?;
        ensure!(helm_status(&sandbox)? == ("deployed".to_owned(), 3));
        let gone = [
            configmap.clone(),
            dns_service.clone(),
            format!("validatingadmissionpolicy/{}-node-restriction", sandbox.agent_sa()),
            format!("role.rbac.authorization.k8s.io/{}", sandbox.controller_sa()),
        ];
        for object in &gone {
            let out = sandbox.cluster.kubectl_ok(&["get", "-n", &ns, object, "--ignore-not-found", "-o", "name"])?;
            ensure!(out.trim().is_empty(), "{object} survived the upgrade that switched it off");
        }
        ensure!(sandbox.cluster.kubectl_ok(&["get", "-n", &ns, &controller, "-o", "jsonpath={.spec.replicas}"])? == "1");

        // Uninstall: nothing of the release is left; the CRDs stay (and so do their objects).
        sandbox.uninstall()?;
        let left = existing(&sandbox, &manifest)?;
        ensure!(left.is_empty(), "left after helm uninstall: {left:?}");
        let releases = sandbox.helm.ok(&["list", "-n", &ns, "-a", "-q"])?;
        ensure!(releases.trim().is_empty(), "helm still lists {releases}");
        let secrets = sandbox.cluster.kubectl_ok(&["get", "secrets", "-n", &ns, "-o", "name"])?;
        ensure!(secrets.trim().is_empty(), "helm's release records survived: {secrets}");
        for crd in ["meshnodes.mesh.harness.dev", "meshservices.mesh.harness.dev"] {
            let established = sandbox.cluster.kubectl_ok(&[
                "get",
                "crd",
                crd,
                "-o",
                r#"jsonpath={.status.conditions[?(@.type=="Established")].status}"#,
            ])?;
            ensure!(established == "True", "CRD {crd} after helm uninstall: {established:?}");
        }
        Ok(())
    })
    .await
}

/// Server-side apply of `status` to MeshNode `node`, as mesh-agent writes it.
async fn agent_apply_status(client: &Client, node: &str, status: Value) -> Result<MeshNode, Error> {
    let patch = json!({"apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode", "status": status});
    Api::<MeshNode>::all(client.clone())
        .patch_status(node, &PatchParams::apply("mesh-agent").force(), &Patch::Apply(&patch))
        .await
}

/// Server-side apply of the Lease `name` in `namespace`, as mesh-agent renews it.
async fn agent_apply_lease(client: &Client, namespace: &str, name: &str) -> Result<Lease, Error> {
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 30}});
    Api::<Lease>::namespaced(client.clone(), namespace)
        .patch(name, &PatchParams::apply("mesh-agent").force(), &Patch::Apply(&lease))
        .await
}

/// Fails unless `result` is a 403 whose message contains `needle`; returns the message.
fn forbidden<T: Debug>(what: &str, result: Result<T, Error>, needle: &str) -> anyhow::Result<String> {
    match result {
        Err(Error::Api(status)) if status.code == 403 && status.message.contains(needle) => Ok(status.message),
        Err(Error::Api(status)) if status.code == 403 => {
            bail!("{what}: forbidden, but the message lacks {needle:?}: {}", status.message)
        }
        other => bail!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

/// The agent-owned part of a MeshNode's status, with a `Connected` condition.
fn agent_status(endpoint: &str) -> Value {
    json!({
        "endpoint": endpoint, "listenPort": 51820, "backend": "none",
        "conditions": [{"type": "Connected", "status": "True", "reason": "AllPeersReachable",
                        "message": "0 of 0 peers reachable", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    })
}

/// The node the API server read from `client`'s token (userInfo.extra), via SelfSubjectReview.
async fn token_node(client: &Client) -> anyhow::Result<(Option<String>, Value)> {
    let review: SelfSubjectReview =
        serde_json::from_value(json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}))?;
    let review = Api::<SelfSubjectReview>::all(client.clone()).create(&PostParams::default(), &review).await?;
    let user = review.status.and_then(|s| s.user_info).context("SelfSubjectReview without userInfo")?;
    let extra = user.extra.unwrap_or_default();
    let node = extra.get("authentication.kubernetes.io/node-name").and_then(|v| v.first().cloned());
    Ok((node, serde_json::to_value(extra)?))
}

/// Server-side applies a MeshNode `name` with an empty spec (admin), tracked for cleanup.
async fn mesh_node(sandbox: &Sandbox, name: &str) -> anyhow::Result<()> {
    sandbox.track_mesh_node(name);
    let node =
        json!({"apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode", "metadata": {"name": name}, "spec": {}});
    Api::<MeshNode>::all(sandbox.cluster.client.clone())
        .patch(name, &PatchParams::apply("chart-test").force(), &Patch::Apply(&node))
        .await?;
    Ok(())
}

#[tokio::test]
async fn an_agent_token_writes_only_its_own_meshnode_and_lease() -> anyhow::Result<()> {
    bounded(async {
        let sandbox = Sandbox::new("agent").await?;
        sandbox.install(&[])?;
        let took = sandbox.wait_for_node_restriction(Duration::from_secs(30)).await?;
        eprintln!("the node restriction was enforced {took:?} after helm install returned");
        let ns = sandbox.namespace.clone();
        let admin = sandbox.cluster.client.clone();
        let (own, other, bound_node) = (sandbox.name("a"), sandbox.name("b"), sandbox.name("n"));
        for name in [&own, &other] {
            mesh_node(&sandbox, name).await?;
        }

        // A DaemonSet pod's token: bound to a pod on node `own`. The pod never runs.
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "agent-a", "namespace": ns},
            "spec": {"nodeName": own, "serviceAccountName": sandbox.agent_sa(), "automountServiceAccountToken": false,
                     "containers": [{"name": "mesh-agent", "image": "chart-test.invalid/never-pulled:0"}]},
        }))?;
        Api::<Pod>::namespaced(admin.clone(), &ns).create(&PostParams::default(), &pod).await?;
        let pod_token = sandbox.token(&sandbox.agent_sa(), Some(("Pod", "agent-a"))).await?;

        // A token bound to a Node object, for an agent that runs outside a pod.
        sandbox.track_node(&bound_node);
        sandbox.track_mesh_node(&bound_node); // a running mesh-controller mirrors the Node
        let node: Node = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": bound_node}}))?;
        Api::<Node>::all(admin.clone()).create(&PostParams::default(), &node).await?;
        mesh_node(&sandbox, &bound_node).await?;
        let node_token = sandbox.token(&sandbox.agent_sa(), Some(("Node", &bound_node))).await?;

        for (token, own) in [(&pod_token, &own), (&node_token, &bound_node)] {
            let agent = chart::token_client(&sandbox.cluster.kubeconfig, token).await?;
            let (node, extra) = token_node(&agent).await?;
            eprintln!("userInfo.extra of the agent token bound to {own}: {extra}");
            ensure!(node.as_deref() == Some(own.as_str()), "the token names node {node:?}, not {own}: {extra}");

            // Its own MeshNode: the agent's fields, as the agent writes them.
            let written = agent_apply_status(&agent, own, agent_status("192.0.2.10:51820")).await?;
            ensure!(written.status.and_then(|s| s.endpoint).as_deref() == Some("192.0.2.10:51820"));
            // Another node's: denied by the policy, which says why.
            let other_node = if own == &bound_node { &other } else { &bound_node };
            let message = forbidden(
                "status of another node",
                agent_apply_status(&agent, other_node, agent_status("192.0.2.66:51820")).await,
                &format!("may write only MeshNode {own}, not MeshNode {other_node}"),
            )?;
            eprintln!("denied: {message}");
            // The controller's fields of its own MeshNode: denied.
            forbidden(
                "meshIP of its own node",
                agent_apply_status(&agent, own, json!({"meshIP": "10.42.250.250"})).await,
                "belong to mesh-controller",
            )?;
            forbidden(
                "peer entry of its own node",
                agent_apply_status(
                    &agent,
                    own,
                    json!({"peer": {"publicKey": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "allowedIPs": ["10.42.0.0/16"]}}),
                )
                .await,
                "belong to mesh-controller",
            )?;
            let forged = json!({"conditions": [{"type": "Ready", "status": "True", "reason": "Forged", "message": "",
                                                "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
            forbidden("the Ready condition", agent_apply_status(&agent, own, forged).await, "belong to mesh-controller")?;

            // Its liveness Lease, and no other.
            agent_apply_lease(&agent, &ns, &format!("mesh-agent-{own}")).await?;
            forbidden(
                "another node's Lease",
                agent_apply_lease(&agent, &ns, &format!("mesh-agent-{other_node}")).await,
                &format!("may write only Lease mesh-agent-{own}"),
            )?;
            forbidden("a Lease outside its namespace", agent_apply_lease(&agent, "default", &format!("mesh-agent-{own}")).await, "cannot patch")?;

            // RBAC: read the mesh; no writes beyond status, no Secrets.
            Api::<MeshNode>::all(agent.clone()).list(&ListParams::default()).await?;
            Api::<MeshService>::all(agent.clone()).list(&ListParams::default()).await?;
            let nodes = Api::<MeshNode>::all(agent.clone());
            forbidden("MeshNode spec", nodes.patch(own, &PatchParams::default(), &Patch::Merge(json!({"spec": {"listenPort": 1}}))).await, "cannot patch")?;
            forbidden("deleting its MeshNode", nodes.delete(own, &DeleteParams::default()).await, "cannot delete")?;
            let service: MeshService = serde_json::from_value(json!({"apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshService",
                "metadata": {"name": "chart-test-x"}, "spec": {"network": {"ports": [80]}, "node": own}}))?;
            forbidden(
                "creating a MeshService",
                Api::<MeshService>::namespaced(agent.clone(), &ns).create(&PostParams::default(), &service).await,
                "cannot create",
            )?;
            forbidden("Secrets in its namespace", Api::<Secret>::namespaced(agent.clone(), &ns).list(&ListParams::default()).await, "cannot list")?;
            forbidden("Secrets anywhere", Api::<Secret>::all(agent.clone()).list(&ListParams::default()).await, "cannot list")?;
            forbidden("a Secret by name", Api::<Secret>::namespaced(agent.clone(), &ns).get("x").await, "cannot get")?;
        }

        // A token that names no node may write nothing, not even with the agents' ServiceAccount.
        let unbound = chart::token_client(&sandbox.cluster.kubeconfig, &sandbox.token(&sandbox.agent_sa(), None).await?).await?;
        let message = forbidden("an unbound agent token", agent_apply_status(&unbound, &own, agent_status("192.0.2.10:51820")).await, "names no node")?;
        eprintln!("denied: {message}");
        forbidden("an unbound agent token's Lease", agent_apply_lease(&unbound, &ns, &format!("mesh-agent-{own}")).await, "names no node")?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn the_controller_token_does_what_the_controller_does_and_no_more() -> anyhow::Result<()> {
    bounded(async {
        let sandbox = Sandbox::new("ctl").await?;
        sandbox.install(&[])?;
        let ns = sandbox.namespace.clone();
        let token = sandbox.token(&sandbox.controller_sa(), None).await?;
        let controller = chart::token_client(&sandbox.cluster.kubeconfig, &token).await?;
        let manager = PatchParams::apply("mesh-controller").force();

        // Watches (list) of everything it reconciles.
        Api::<MeshNode>::all(controller.clone()).list(&ListParams::default()).await?;
        Api::<MeshService>::all(controller.clone()).list(&ListParams::default()).await?;
        Api::<Node>::all(controller.clone()).list(&ListParams::default()).await?;
        Api::<Pod>::all(controller.clone()).list(&ListParams::default()).await?;

        // The Node mirror: create a MeshNode by server-side apply, finalizer, status, delete.
        let nodes = Api::<MeshNode>::all(controller.clone());
        let name = sandbox.name("m");
        sandbox.track_mesh_node(&name);
        let mirror = json!({"apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode", "metadata": {"name": name}, "spec": {}});
        nodes.patch(&name, &manager, &Patch::Apply(&mirror)).await.context("creating a MeshNode by SSA")?;
        let finalizer = Patch::Merge(json!({"metadata": {"finalizers": ["mesh.harness.dev/release-ip"]}}));
        nodes.patch(&name, &PatchParams::default(), &finalizer).await.context("adding the finalizer")?;
        let status = json!({"apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshNode", "status": {"meshIP": "10.42.250.1"}});
        // The node restriction binds agents only: the controller writes any node's meshIP.
        nodes.patch_status(&name, &manager, &Patch::Apply(&status)).await.context("MeshNode status")?;
        nodes.delete(&name, &DeleteParams::default()).await.context("deleting a MeshNode")?;

        // MeshServices: finalizer and status, but it neither creates nor deletes them.
        let services = Api::<MeshService>::namespaced(controller.clone(), &ns);
        let service: MeshService = serde_json::from_value(json!({"apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshService",
            "metadata": {"name": "svc"}, "spec": {"network": {"ports": [80]}, "node": "nowhere"}}))?;
        forbidden("creating a MeshService", services.create(&PostParams::default(), &service).await, "cannot create")?;
        Api::<MeshService>::namespaced(sandbox.cluster.client.clone(), &ns).create(&PostParams::default(), &service).await?;
        services.patch("svc", &PatchParams::default(), &finalizer).await.context("MeshService finalizer")?;
        let status = json!({"apiVersion": "mesh.harness.dev/v1alpha1", "kind": "MeshService", "status": {"meshIP": "10.42.250.2"}});
        services.patch_status("svc", &manager, &Patch::Apply(&status)).await.context("MeshService status")?;
        // It deletes the MeshServices a collected ephemeral member exposed (controller/src/ephemeral.rs).
        services.delete("svc", &DeleteParams::default()).await.context("deleting a MeshService")?;

        // Events (events.k8s.io), created and then patched as kube-runtime's Recorder counts repeats.
        let events = Api::<Event>::namespaced(controller.clone(), &ns);
        let event: Event = serde_json::from_value(json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "svc.chart-test"}, "eventTime": "2026-01-01T00:00:00.000000Z", "action": "AllocateMeshIP",
            "reason": "IPConflict", "note": "chart test", "type": "Warning", "reportingController": "mesh-controller",
            "reportingInstance": "chart-test", "regarding": {"kind": "MeshService", "namespace": ns, "name": "svc"}}))?;
        events.create(&PostParams::default(), &event).await.context("creating an Event")?;
        let series = json!({"series": {"count": 2, "lastObservedTime": "2026-01-01T00:00:01.000000Z"}});
        events.patch("svc.chart-test", &PatchParams::default(), &Patch::Merge(series)).await.context("patching an Event")?;

        // Leader election: its one Lease in its namespace.
        let leases = Api::<Lease>::namespaced(controller.clone(), &ns);
        let lease: Lease = serde_json::from_value(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "mesh-controller"}, "spec": {"holderIdentity": "chart-test"}}))?;
        leases.create(&PostParams::default(), &lease).await.context("creating the leader Lease")?;
        leases.get("mesh-controller").await.context("reading the leader Lease")?;
        let renew = Patch::Strategic(json!({"spec": {"leaseTransitions": 1}}));
        leases.patch("mesh-controller", &PatchParams::default(), &renew).await.context("patching the leader Lease")?;
        let other: Lease =
            serde_json::from_value(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "chart-test-other"}}))?;
        leases.create(&PostParams::default(), &other).await.context("create cannot be limited to a name")?;
        forbidden("another Lease", leases.patch("chart-test-other", &PatchParams::default(), &renew).await, "cannot patch")?;
        // It reads an ephemeral member's Lease and deletes it with the member (ephemeral.rs); RBAC
        // cannot limit that to the mesh-agent- prefix.
        leases.get("chart-test-other").await.context("reading another Lease")?;
        leases.delete("chart-test-other", &DeleteParams::default()).await.context("deleting a lapsed Lease")?;
        forbidden(
            "a Lease outside its namespace",
            Api::<Lease>::namespaced(controller.clone(), "default").create(&PostParams::default(), &lease).await,
            "cannot create",
        )?;

        // Nothing else: no Secrets, no ConfigMaps, no writes to Pods or Nodes.
        forbidden("Secrets", Api::<Secret>::all(controller.clone()).list(&ListParams::default()).await, "cannot list")?;
        forbidden("a Secret", Api::<Secret>::namespaced(controller.clone(), &ns).get("x").await, "cannot get")?;
        forbidden("ConfigMaps", Api::<ConfigMap>::all(controller.clone()).list(&ListParams::default()).await, "cannot list")?;
        forbidden("deleting Pods", Api::<Pod>::namespaced(controller.clone(), &ns).delete("x", &DeleteParams::default()).await, "cannot delete")?;
        let taint = Patch::Merge(json!({"spec": {"unschedulable": true}}));
        forbidden("patching a Node", Api::<Node>::all(controller.clone()).patch("x", &PatchParams::default(), &taint).await, "cannot patch")?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn rbac_grants_each_serviceaccount_exactly_its_verbs() -> anyhow::Result<()> {
    bounded(async {
        let sandbox = Sandbox::new("rbac").await?;
        sandbox.install(&[])?;
        let ns = sandbox.namespace.clone();
        let kubeconfig = sandbox.cluster.kubeconfig.clone();
        // What every ServiceAccount may do anyway (discovery, self reviews, the cluster's defaults).
        sandbox.cluster.kubectl_ok(&["create", "serviceaccount", "chart-test-baseline", "-n", &ns])?;
        let baseline = chart::token_client(&kubeconfig, &sandbox.token("chart-test-baseline", None).await?).await?;
        let controller =
            chart::token_client(&kubeconfig, &sandbox.token(&sandbox.controller_sa(), None).await?).await?;
        let agent = chart::token_client(&kubeconfig, &sandbox.token(&sandbox.agent_sa(), None).await?).await?;

        let mesh = "mesh.harness.dev";
        let cluster_wide_controller: Vec<Grant> = [
            grants(mesh, "meshnodes", "", &["list", "watch", "create", "patch", "delete"]),
            grants(mesh, "meshservices", "", &["list", "watch", "patch", "delete"]),
            grants(mesh, "meshnodes/status", "", &["patch"]),
            grants(mesh, "meshservices/status", "", &["patch"]),
            grants("", "nodes", "", &["list", "watch"]),
            grants("", "pods", "", &["list", "watch"]),
            grants("events.k8s.io", "events", "", &["create", "patch"]),
        ]
        .concat();
        let in_namespace_controller = [
            grants("coordination.k8s.io", "leases", "", &["create", "get", "delete"]),
            grants("coordination.k8s.io", "leases", "mesh-controller", &["get", "patch"]),
            grants("", "configmaps", &format!("{}-ip-holds", sandbox.controller_sa()), &["get", "patch"]),
        ]
        .concat();
        let cluster_wide_agent: Vec<Grant> = [
            grants(mesh, "meshnodes", "", &["list", "watch"]),
            grants(mesh, "meshservices", "", &["list", "watch"]),
            grants(mesh, "meshnodes/status", "", &["patch"]),
        ]
        .concat();
        let in_namespace_agent = [
            grants("coordination.k8s.io", "leases", "", &["create", "patch"]),
            grants("apps", "daemonsets", &sandbox.agent_sa(), &["get", "list", "watch"]),
        ]
        .concat();

        for (who, client, cluster_wide, namespaced) in [
            ("controller", &controller, &cluster_wide_controller, &in_namespace_controller),
            ("agent", &agent, &cluster_wide_agent, &in_namespace_agent),
        ] {
            for (namespace, expected) in [
                (ns.as_str(), cluster_wide.iter().chain(namespaced.iter()).cloned().collect::<BTreeSet<_>>()),
                ("default", cluster_wide.iter().cloned().collect()),
            ] {
                let base = chart::granted(&baseline, namespace).await?;
                let mine = chart::granted(client, namespace).await?;
                let extra: BTreeSet<_> = mine.difference(&base).cloned().collect();
                ensure!(
                    extra == expected,
                    "{who} in namespace {namespace}:\n  granted but not needed: {:?}\n  needed but not granted: {:?}",
                    extra.difference(&expected).collect::<Vec<_>>(),
                    expected.difference(&extra).collect::<Vec<_>>()
                );
            }
        }

        // The same through kubectl's impersonation, as an operator would check it.
        for sa in [sandbox.controller_sa(), sandbox.agent_sa()] {
            let user = format!("system:serviceaccount:{ns}:{sa}");
            for (verb, resource) in
                [("get", "secrets"), ("list", "secrets"), ("create", "pods"), ("escalate", "clusterroles")]
            {
                let out = sandbox.cluster.kubectl(&["auth", "can-i", verb, resource, "-n", &ns, "--as", &user])?;
                ensure!(String::from_utf8_lossy(&out.stdout).trim() == "no", "{user} can {verb} {resource}");
            }
            let out =
                sandbox.cluster.kubectl(&["auth", "can-i", "list", "meshnodes.mesh.harness.dev", "--as", &user])?;
            ensure!(String::from_utf8_lossy(&out.stdout).trim() == "yes", "{user} cannot list meshnodes");
        }
        Ok(())
    })
    .await
}
