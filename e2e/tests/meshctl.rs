//! `meshctl` end to end: the real binary against the cluster under test (the lab by default).
//! `status` shows every node Ready and connected, in tables and as JSON/YAML that match the API;
//! `showconf` prints one `[Peer]` per other node with a peer entry and never the private key;
//! `graph` draws well-formed SVG (and DOT) naming every node; a service shows up everywhere;
//! errors (unknown node, no cluster, unknown context, RBAC denied) say what to do and exit
//! non-zero. Read-only, except for one MeshService `meshctl-test-svc` in `default`, deleted
//! afterwards.
//!
//! The binary is `$MESHCTL`, else `<target>/debug/meshctl`, built with `cargo build -p meshctl`
//! first (a no-op when it is up to date).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use harness_mesh_e2e::controller::service;
use harness_mesh_e2e::mesh::{Mesh, eventually_async};
use harness_mesh_e2e::repo_root;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::config::Kubeconfig;
use mesh_api::{MeshNode, MeshService};
use serde_json::{Value, json};

/// The tests share the lab's nodes (and one test creates a service): one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CONVERGE: Duration = Duration::from_secs(90);
const SETTLE: Duration = Duration::from_secs(30);
const SERVICE: &str = "meshctl-test-svc";
/// The service's port: one of its own (`make demo` serves 8080 and 8081 on hm-node-2).
const SERVICE_PORT: u16 = 18600;

/// What one run of meshctl did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Its stdout, failing with stderr when it did not exit 0.
    fn ok(self) -> anyhow::Result<String> {
        ensure!(self.code == Some(0), "meshctl exited {:?}: {}", self.code, self.stderr);
        Ok(self.stdout)
    }
}

/// Runs `program args` (at most 60 s) and collects its output.
fn run_program(program: &Path, args: &[&str]) -> anyhow::Result<Run> {
    let out = Command::new("timeout")
        .arg("60")
        .arg(program)
        .args(args)
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    Ok(Run { code: out.status.code(), stdout: String::from_utf8(out.stdout)?, stderr: String::from_utf8(out.stderr)? })
}

/// Runs meshctl against the cluster whose kubeconfig is `kubeconfig`.
fn meshctl(kubeconfig: &Path, args: &[&str]) -> anyhow::Result<Run> {
    let kubeconfig = kubeconfig.to_str().context("kubeconfig path is not UTF-8")?;
    let mut all = vec!["--kubeconfig", kubeconfig, "--request-timeout", "20s"];
    all.extend_from_slice(args);
    run_program(&harness_mesh_e2e::meshctl_binary()?, &all)
}

/// Whether this is the lab (userspace WireGuard everywhere) rather than a cluster named by the
/// environment.
fn on_lab() -> bool {
    std::env::var_os("HARNESS_MESH_NODES").is_none()
}

/// The lines of one section of `meshctl status` (from its title to the next blank line).
fn section<'a>(text: &'a str, title: &str) -> Vec<&'a str> {
    text.lines().skip_while(|l| !l.starts_with(title)).skip(1).take_while(|l| !l.is_empty()).collect()
}

#[tokio::test]
async fn status_shows_every_node_ready_connected_and_converged() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let peers = mesh.nodes.names.len() - 1;
    eventually_async(SETTLE, || async {
        let info = mesh.info().await?;
        let text = meshctl(&mesh.cluster.kubeconfig, &["status"])?.ok()?;
        let nodes = section(&text, "NODES");
        ensure!(nodes.first().is_some_and(|h| h.starts_with("NAME ")), "no node table in\n{text}");
        for name in &mesh.nodes.names {
            let line = nodes
                .iter()
                .find(|l| l.split_whitespace().next() == Some(name))
                .with_context(|| format!("{name} missing in\n{text}"))?;
            let cols: Vec<&str> = line.split_whitespace().collect();
            let node = info.get(name).with_context(|| format!("{name} has no IP/key/endpoint in the API"))?;
            ensure!(cols[1] == node.mesh_ip.to_string(), "{name}: mesh IP {} in {line:?}", node.mesh_ip);
            ensure!(cols[2] == node.endpoint, "{name}: endpoint {} in {line:?}", node.endpoint);
            if on_lab() {
                ensure!(cols[3] == "userspace", "{name}: the lab runs userspace WireGuard: {line:?}");
            } else {
                ensure!(cols[3] == "kernel" || cols[3] == "userspace", "{name}: backend in {line:?}");
            }
            ensure!(cols[4] == "True", "{name} not Ready: {line:?}");
            // All its peers reachable: the suite's other nodes, and any other node that joined.
            let reached = cols.windows(2).find(|w| w[1] == "reachable").and_then(|w| w[0].split_once('/'));
            ensure!(
                reached.is_some_and(|(k, of)| k == of && of.parse::<usize>().is_ok_and(|n| n >= peers)),
                "{name} not connected to its {peers} peers: {line:?}"
            );
            ensure!(line.ends_with(" yes"), "{name} not converged: {line:?}");
            ensure!(cols.contains(&"alive"), "{name}'s agent is not alive: {line:?}");
        }
        let matrix = section(&text, "REACHABILITY");
        let header: Vec<&str> = matrix.first().context("no matrix")?.split_whitespace().skip(3).collect();
        for from in &mesh.nodes.names {
            let row: Vec<&str> = matrix
                .iter()
                .find(|l| l.split_whitespace().next() == Some(from))
                .with_context(|| format!("no matrix row for {from}"))?
                .split_whitespace()
                .skip(1)
                .collect();
            for to in mesh.nodes.names.iter().filter(|to| *to != from) {
                let column = header.iter().position(|h| h == to).with_context(|| format!("no column {to}"))?;
                ensure!(row.get(column) == Some(&"✓"), "{from} → {to} is not ✓ in\n{}", matrix.join("\n"));
            }
        }
        ensure!(text.contains("\nCONVERGENCE\n"), "no convergence section in\n{text}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn status_as_json_and_yaml_matches_the_api() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let nodes_api: Api<MeshNode> = Api::all(mesh.cluster.client.clone());
    let services_api: Api<MeshService> = Api::all(mesh.cluster.client.clone());
    eventually_async(SETTLE, || async {
        let json: Value = serde_json::from_str(&meshctl(&mesh.cluster.kubeconfig, &["status", "-o", "json"])?.ok()?)?;
        let nodes = nodes_api.list(&ListParams::default()).await?.items;
        let shown = json["nodes"].as_array().context("nodes is not a list")?;
        ensure!(shown.len() == nodes.len(), "{} nodes shown, {} in the API", shown.len(), nodes.len());
        for node in &nodes {
            let name = node.metadata.name.clone().unwrap_or_default();
            let status = node.status.clone().unwrap_or_default();
            let view =
                shown.iter().find(|n| n["name"] == name.as_str()).with_context(|| format!("{name} not shown"))?;
            let field = |v: &Value| if v.is_null() { None } else { Some(v.clone()) };
            ensure!(field(&view["meshIP"]) == status.mesh_ip.map(Value::from), "{name}: meshIP {view}");
            ensure!(field(&view["publicKey"]) == status.public_key.map(Value::from), "{name}: publicKey {view}");
            // The effective endpoint: the agent's, else (no agent has published one yet, as for a
            // node someone else added) the one the spec asks for.
            let endpoint = status.endpoint.or_else(|| node.spec.endpoint.clone());
            ensure!(field(&view["endpoint"]) == endpoint.map(Value::from), "{name}: endpoint {view}");
            ensure!(field(&view["listenPort"]) == status.listen_port.map(Value::from), "{name}: listenPort {view}");
            ensure!(field(&view["backend"]) == status.backend.map(|b| json!(b)), "{name}: backend {view}");
            ensure!(field(&view["peer"]) == status.peer.map(|p| json!(p)), "{name}: peer {view}");
        }
        for name in &mesh.nodes.names {
            let view = shown.iter().find(|n| n["name"] == name.as_str()).context("suite node not shown")?;
            ensure!(view["ready"]["status"] == "True", "{name}: {}", view["ready"]);
            ensure!(view["connected"]["status"] == "True", "{name}: {}", view["connected"]);
            ensure!(view["convergence"]["state"] == "converged", "{name}: {}", view["convergence"]);
            for to in mesh.nodes.names.iter().filter(|to| *to != name) {
                let link = json["reachability"]
                    .as_array()
                    .and_then(|l| l.iter().find(|l| l["from"] == name.as_str() && l["to"] == to.as_str()))
                    .with_context(|| format!("no reachability entry {name} → {to}"))?;
                ensure!(link["state"] == "reachable", "{name} → {to}: {link}");
            }
        }
        let n = nodes.len();
        ensure!(json["reachability"].as_array().map(Vec::len) == Some(n * (n - 1)), "one entry per ordered pair");

        let services = services_api.list(&ListParams::default()).await?.items;
        let api_services: BTreeSet<(String, String, Option<String>)> = services
            .iter()
            .map(|s| {
                let ns = s.metadata.namespace.clone().unwrap_or_default();
                (ns, s.metadata.name.clone().unwrap_or_default(), s.status.as_ref().and_then(|st| st.mesh_ip.clone()))
            })
            .collect();
        let shown_services: BTreeSet<(String, String, Option<String>)> = json["services"]
            .as_array()
            .context("services is not a list")?
            .iter()
            .map(|s| {
                let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
                (text(&s["namespace"]), text(&s["name"]), s["meshIP"].as_str().map(str::to_owned))
            })
            .collect();
        ensure!(api_services == shown_services, "services differ: API {api_services:?}, meshctl {shown_services:?}");

        let yaml: Value = serde_saphyr::from_str(&meshctl(&mesh.cluster.kubeconfig, &["status", "-o", "yaml"])?.ok()?)?;
        let names = |v: &Value| -> Vec<(Value, Value)> {
            v["nodes"].as_array().into_iter().flatten().map(|n| (n["name"].clone(), n["meshIP"].clone())).collect()
        };
        ensure!(names(&yaml) == names(&json), "YAML and JSON disagree: {:?} vs {:?}", names(&yaml), names(&json));
        ensure!(yaml["convergence"] == json["convergence"], "YAML and JSON convergence differ");
        Ok(())
    })
    .await
}

/// `[Interface]` and `[Peer]` sections of a wg-quick file: (section, key → value), comments
/// dropped.
fn sections(conf: &str) -> anyhow::Result<Vec<(String, BTreeMap<String, String>)>> {
    let mut out: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    for line in conf.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            out.push((name.to_owned(), BTreeMap::new()));
            continue;
        }
        let (key, value) = line.split_once(" = ").with_context(|| format!("not `Key = value`: {line:?}"))?;
        let (_, entries) = out.last_mut().with_context(|| format!("{line:?} outside a section"))?;
        // wg-quick accumulates repeated Address lines.
        entries.entry(key.to_owned()).and_modify(|v| *v = format!("{v}, {value}")).or_insert_with(|| value.to_owned());
    }
    Ok(out)
}

#[tokio::test]
async fn showconf_has_one_peer_per_other_node_and_no_private_key() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let me = mesh.nodes.names[0].clone();
    let api: Api<MeshNode> = Api::all(mesh.cluster.client.clone());
    eventually_async(SETTLE, || async {
        let conf = meshctl(&mesh.cluster.kubeconfig, &["showconf", &me])?.ok()?;
        let nodes = api.list(&ListParams::default()).await?.items;
        let mine = nodes.iter().find(|n| n.metadata.name.as_deref() == Some(me.as_str())).context("own node")?;
        let status = mine.status.clone().unwrap_or_default();
        let sections = sections(&conf)?;
        let interfaces: Vec<_> = sections.iter().filter(|(s, _)| s == "Interface").collect();
        ensure!(interfaces.len() == 1, "one [Interface] expected in\n{conf}");
        let interface = &interfaces[0].1;
        ensure!(
            interface.get("PrivateKey").is_some_and(|k| k.starts_with("<placeholder: the key never leaves the node")),
            "PrivateKey is not the placeholder: {interface:?}"
        );
        let address = interface.get("Address").context("no Address")?;
        let mesh_ip = status.mesh_ip.clone().context("no mesh IP")?;
        ensure!(address.split(", ").next() == Some(format!("{mesh_ip}/32").as_str()), "Address {address}");
        let port = status.listen_port.context("no listen port")?.to_string();
        ensure!(interface.get("ListenPort") == Some(&port), "ListenPort {interface:?}");

        let peers: BTreeSet<Vec<(String, String)>> = sections
            .iter()
            .filter(|(s, _)| s == "Peer")
            .map(|(_, entries)| entries.clone().into_iter().collect())
            .collect();
        ensure!(peers.len() == sections.iter().filter(|(s, _)| s == "Peer").count(), "a [Peer] is repeated");
        let expected: BTreeSet<Vec<(String, String)>> = nodes
            .iter()
            .filter(|n| n.metadata.name.as_deref() != Some(me.as_str()))
            .filter_map(|n| n.status.as_ref()?.peer.clone())
            .filter(|peer| Some(&peer.public_key) != status.public_key.as_ref())
            .map(|peer| {
                let mut entries = BTreeMap::new();
                entries.insert("PublicKey".to_owned(), peer.public_key.clone());
                if let Some(endpoint) = &peer.endpoint {
                    entries.insert("Endpoint".to_owned(), endpoint.clone());
                }
                entries.insert("AllowedIPs".to_owned(), peer.allowed_ips.join(", "));
                if let Some(keepalive) = peer.persistent_keepalive.filter(|k| *k > 0) {
                    entries.insert("PersistentKeepalive".to_owned(), keepalive.to_string());
                }
                entries.into_iter().collect()
            })
            .collect();
        ensure!(peers == expected, "peers differ from the API:\nshown {peers:#?}\nexpected {expected:#?}");
        ensure!(peers.len() >= mesh.nodes.names.len() - 1, "a suite node has no [Peer]:\n{conf}");

        // The only keys in the output are public ones.
        let public: BTreeSet<String> = nodes.iter().filter_map(|n| n.status.as_ref()?.public_key.clone()).collect();
        for word in conf.split(|c: char| c.is_whitespace() || c == ',') {
            if word.len() == 44 && word.ends_with('=') {
                ensure!(public.contains(word), "{word} is not a published public key");
            }
        }
        let key_file = repo_root().join(".lab/nodes").join(&me).join("private.key");
        if let Ok(private) = std::fs::read_to_string(&key_file) {
            ensure!(!conf.contains(private.trim()), "the private key of {me} is in the output");
        }
        Ok(())
    })
    .await
}

/// Checks that `doc` is well-formed XML (one root, balanced and matching tags, quoted attributes,
/// known entities).
fn well_formed(doc: &str) -> anyhow::Result<()> {
    fn entities(text: &str) -> anyhow::Result<()> {
        let mut rest = text;
        while let Some(at) = rest.find('&') {
            let tail = &rest[at + 1..];
            let end = tail.find(';').with_context(|| format!("unterminated entity in {text:?}"))?;
            let name = &tail[..end];
            let numeric = name.strip_prefix('#').is_some_and(|n| !n.is_empty());
            ensure!(numeric || matches!(name, "amp" | "lt" | "gt" | "quot" | "apos"), "unknown entity &{name};");
            rest = &tail[end + 1..];
        }
        Ok(())
    }
    let mut rest = doc.trim_start();
    if let Some(after) = rest.strip_prefix("<?xml") {
        rest = &after[after.find("?>").context("unterminated declaration")? + 2..];
    }
    let (mut stack, mut roots) = (Vec::<String>::new(), 0);
    while let Some(lt) = rest.find('<') {
        entities(&rest[..lt])?;
        ensure!(!stack.is_empty() || rest[..lt].trim().is_empty(), "text outside the root");
        rest = &rest[lt..];
        if let Some(after) = rest.strip_prefix("<!--") {
            rest = &after[after.find("-->").context("unterminated comment")? + 3..];
            continue;
        }
        let gt = rest.find('>').context("unterminated tag")?;
        let tag = &rest[1..gt];
        rest = &rest[gt + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            let open = stack.pop().with_context(|| format!("</{name}> closes nothing"))?;
            ensure!(open == name.trim(), "<{open}> closed by </{name}>");
            continue;
        }
        let self_closing = tag.ends_with('/');
        let tag = tag.trim_end_matches('/');
        let name_end = tag.find(char::is_whitespace).unwrap_or(tag.len());
        let name = &tag[..name_end];
        ensure!(!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_:.".contains(c)), "<{tag}>");
        let mut attrs = tag[name_end..].trim();
        while !attrs.is_empty() {
            let eq = attrs.find('=').with_context(|| format!("attribute without value in <{tag}>"))?;
            let value = attrs[eq + 1..].trim_start();
            ensure!(value.starts_with('"'), "unquoted attribute in <{name}>");
            let close = value[1..].find('"').context("unterminated attribute")?;
            ensure!(!value[1..1 + close].contains('<'), "'<' in an attribute of <{name}>");
            entities(&value[1..1 + close])?;
            attrs = value[close + 2..].trim_start();
        }
        if stack.is_empty() {
            roots += 1;
        }
        if !self_closing {
            stack.push(name.to_owned());
        }
    }
    ensure!(stack.is_empty(), "unclosed elements: {stack:?}");
    ensure!(roots == 1, "{roots} root elements");
    ensure!(rest.trim().is_empty(), "text after the root");
    Ok(())
}

#[tokio::test]
async fn graph_draws_every_node_and_healthy_edges() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let api: Api<MeshNode> = Api::all(mesh.cluster.client.clone());
    eventually_async(SETTLE, || async {
        let svg = meshctl(&mesh.cluster.kubeconfig, &["graph"])?.ok()?;
        well_formed(&svg).context("the SVG is not well-formed")?;
        ensure!(svg.contains("<svg xmlns=\"http://www.w3.org/2000/svg\""), "not an SVG document");
        let nodes = api.list(&ListParams::default()).await?.items;
        ensure!(svg.matches("<g class=\"node\"").count() == nodes.len(), "one card per MeshNode");
        let n = nodes.len();
        ensure!(svg.matches("<g class=\"edge\"").count() == n * (n - 1) / 2, "one edge per pair");
        for node in &nodes {
            let name = node.metadata.name.clone().unwrap_or_default();
            ensure!(svg.contains(&format!(">{name}</text>")), "{name} is not drawn");
            if let Some(ip) = node.status.as_ref().and_then(|s| s.mesh_ip.as_ref()) {
                ensure!(svg.contains(&format!(">{ip}</text>")), "{name}'s mesh IP {ip} is not drawn");
            }
        }
        let mut names = mesh.nodes.names.clone();
        names.sort();
        for (i, a) in names.iter().enumerate() {
            for b in &names[i + 1..] {
                let title = format!("<title>{a} → {b}: reachable; {b} → {a}: reachable</title>");
                let line =
                    svg.lines().find(|l| l.contains(&title)).with_context(|| format!("no green edge {a}–{b}"))?;
                ensure!(line.contains("stroke=\"#1a7f37\""), "{a}–{b} is not green: {line}");
            }
        }

        let dot = meshctl(&mesh.cluster.kubeconfig, &["graph", "--format", "dot"])?.ok()?;
        ensure!(dot.starts_with("graph mesh {") && dot.trim_end().ends_with('}'), "not a DOT graph:\n{dot}");
        for name in &mesh.nodes.names {
            ensure!(dot.contains(&format!("  \"{name}\" [label=\"{name}\\n")), "{name} missing in the DOT graph");
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_service_shows_up_in_status_showconf_and_graph() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let api: Api<MeshService> = Api::namespaced(mesh.cluster.client.clone(), "default");
    let host = mesh.nodes.names[1].clone();
    let other = mesh.nodes.names[0].clone();
    if api.get_opt(SERVICE).await?.is_some() {
        api.delete(SERVICE, &DeleteParams::default()).await?;
        eventually_async(SETTLE, || async {
            ensure!(api.get_opt(SERVICE).await?.is_none(), "an old {SERVICE} is still there");
            Ok(())
        })
        .await?;
    }
    api.create(
        &PostParams::default(),
        &service(SERVICE, json!({"network": {"type": "mesh", "ports": [SERVICE_PORT]}, "node": host})),
    )
    .await?;
    let result = async {
        let ip: String = eventually_async(SETTLE, || async {
            let json: Value =
                serde_json::from_str(&meshctl(&mesh.cluster.kubeconfig, &["status", "-o", "json"])?.ok()?)?;
            let shown = json["services"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["name"] == SERVICE && s["namespace"] == "default"))
                .context("the service is not shown")?
                .clone();
            ensure!(shown["node"] == host.as_str() && shown["ready"]["status"] == "True", "not hosted yet: {shown}");
            Ok(shown["meshIP"].as_str().context("no mesh IP yet")?.to_owned())
        })
        .await?;
        eventually_async(SETTLE, || async {
            let text = meshctl(&mesh.cluster.kubeconfig, &["status", "-n", "default"])?.ok()?;
            let line = section(&text, "SERVICES")
                .into_iter()
                .find(|l| l.starts_with(&format!("default/{SERVICE} ")))
                .with_context(|| format!("no row for the service in\n{text}"))?;
            let cols: Vec<&str> = line.split_whitespace().collect();
            let expected = [
                format!("default/{SERVICE}"),
                "mesh".into(),
                ip.clone(),
                host.clone(),
                format!("{SERVICE}.default.mesh.local"),
                "True".into(),
            ];
            ensure!(cols == expected, "service row {line:?}, expected {expected:?}");
            // The host's [Interface] lists its own address and those of every service it hosts
            // (other services may be hosted there too): the service is one entry of the lists.
            let own = meshctl(&mesh.cluster.kubeconfig, &["showconf", &host])?.ok()?;
            let addresses: Vec<String> = sections(&own)?
                .into_iter()
                .filter(|(s, _)| s == "Interface")
                .filter_map(|(_, e)| e.get("Address").cloned())
                .flat_map(|a| a.split(", ").map(str::to_owned).collect::<Vec<_>>())
                .collect();
            ensure!(addresses.contains(&format!("{ip}/32")), "{host}'s config does not hold {ip}:\n{own}");
            let hosted: Vec<&str> = own
                .lines()
                .filter_map(|l| l.strip_prefix("# the services hosted here: "))
                .flat_map(|names| names.split(", "))
                .collect();
            ensure!(
                hosted.contains(&format!("default/{SERVICE}").as_str()),
                "{host}'s config does not name {SERVICE}:\n{own}"
            );
            let peer_view = meshctl(&mesh.cluster.kubeconfig, &["showconf", &other])?.ok()?;
            let allowed = sections(&peer_view)?
                .into_iter()
                .filter(|(s, _)| s == "Peer")
                .filter_map(|(_, e)| e.get("AllowedIPs").cloned())
                .any(|a| a.split(", ").any(|cidr| cidr == format!("{ip}/32")));
            ensure!(allowed, "{other}'s peer for {host} does not route {ip}:\n{peer_view}");
            let svg = meshctl(&mesh.cluster.kubeconfig, &["graph"])?.ok()?;
            ensure!(svg.contains(&format!(">default/{SERVICE}</text>")), "the service is not drawn");
            ensure!(svg.contains(&format!(">{ip} :{SERVICE_PORT}</text>")), "the service's address is not drawn");
            let bare = meshctl(&mesh.cluster.kubeconfig, &["graph", "--no-services"])?.ok()?;
            ensure!(!bare.contains("class=\"service\""), "--no-services still draws services");
            Ok(())
        })
        .await
    }
    .await;
    api.delete(SERVICE, &DeleteParams::default()).await?;
    result
}

#[tokio::test]
async fn an_unknown_node_is_a_clear_error() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let run = meshctl(&mesh.cluster.kubeconfig, &["showconf", "meshctl-no-such-node"])?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stdout.is_empty(), "nothing on stdout: {run:?}");
    assert!(run.stderr.starts_with("error: MeshNode \"meshctl-no-such-node\" not found; the mesh has: "), "{run:?}");
    for name in &mesh.nodes.names {
        assert!(run.stderr.contains(name.as_str()), "the error does not list {name}: {}", run.stderr);
    }
    Ok(())
}

/// A kubeconfig file in the temporary directory, removed on drop.
struct TempKubeconfig(PathBuf);

impl TempKubeconfig {
    fn write(name: &str, config: &Kubeconfig) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("meshctl-e2e-{}-{name}.kubeconfig", std::process::id()));
        // It holds the admin's credentials: readable by its owner only.
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
        file.write_all(serde_saphyr::to_string(config)?.as_bytes())?;
        Ok(Self(path))
    }
}

impl Drop for TempKubeconfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn cluster_problems_say_what_to_do() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::get(CONVERGE).await?;
    let real = Kubeconfig::read_from(&mesh.cluster.kubeconfig)?;

    // No API server there (a closed port on loopback).
    let mut nowhere = real.clone();
    for cluster in nowhere.clusters.iter_mut().filter_map(|c| c.cluster.as_mut()) {
        cluster.server = Some("https://127.0.0.1:1".into());
    }
    let nowhere = TempKubeconfig::write("nowhere", &nowhere)?;
    let run = meshctl(&nowhere.0, &["status", "--request-timeout", "5s"])?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("cannot reach the Kubernetes API server at https://127.0.0.1:1/"), "{run:?}");
    assert!(run.stderr.contains("--kubeconfig") && run.stderr.contains("--context"), "{run:?}");

    // A context the kubeconfig does not have.
    let run = meshctl(&mesh.cluster.kubeconfig, &["--context", "meshctl-no-such-context", "status"])?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("the kubeconfig has no context \"meshctl-no-such-context\"; it has: "), "{run:?}");

    // A kubeconfig that does not exist.
    let run = meshctl(Path::new("/nonexistent/meshctl-kubeconfig"), &["status"])?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("cannot read the kubeconfig /nonexistent/meshctl-kubeconfig"), "{run:?}");

    // A user without any RBAC grant (the admin impersonates one: nothing is created).
    let mut nobody = real.clone();
    for auth in nobody.auth_infos.iter_mut().filter_map(|a| a.auth_info.as_mut()) {
        auth.impersonate = Some("meshctl-e2e-nobody".into());
        auth.impersonate_groups = Some(vec!["system:authenticated".into()]);
    }
    let nobody = TempKubeconfig::write("nobody", &nobody)?;
    let run = meshctl(&nobody.0, &["status"])?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.starts_with("error: RBAC denied at "), "{run:?}");
    assert!(run.stderr.contains("meshctl-e2e-nobody"), "the API server's reason is kept: {run:?}");
    assert!(run.stderr.contains("get and list on meshnodes and meshservices"), "{run:?}");
    Ok(())
}

#[tokio::test]
async fn completions_and_the_kubectl_plugin_name() -> anyhow::Result<()> {
    let binary = harness_mesh_e2e::meshctl_binary()?;
    for shell in ["bash", "zsh", "fish"] {
        let script = run_program(&binary, &["completions", shell])?.ok()?;
        assert!(script.contains("meshctl") && script.contains("showconf"), "{shell} completions:\n{script}");
    }
    let dir = std::env::temp_dir().join(format!("meshctl-e2e-plugin-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let plugin = dir.join("kubectl-mesh");
    let _ = std::fs::remove_file(&plugin);
    std::os::unix::fs::symlink(&binary, &plugin)?;
    let help = run_program(&plugin, &["--help"]);
    let status_help = run_program(&plugin, &["status", "--help"]);
    std::fs::remove_dir_all(&dir)?;
    let help = help?.ok()?;
    assert!(help.contains("Usage: kubectl mesh [OPTIONS] <COMMAND>"), "{help}");
    assert!(status_help?.ok()?.contains("Usage: kubectl mesh status [OPTIONS]"));
    let help = run_program(&binary, &["--help"])?.ok()?;
    for command in ["status", "graph", "showconf", "completions", "--kubeconfig", "--context"] {
        assert!(help.contains(command), "--help does not mention {command}:\n{help}");
    }
    // An unknown flag is a usage error (exit 2), as with every clap program.
    let run = run_program(&binary, &["status", "--bogus"])?;
    assert_eq!(run.code, Some(2), "{run:?}");
    Ok(())
}

#[test]
fn the_xml_checker_rejects_malformed_documents() {
    assert!(well_formed("<?xml version=\"1.0\"?>\n<a><b x=\"1\"/>t &amp; u</a>\n").is_ok());
    for bad in ["<a><b></a>", "<a>", "<a x=1/>", "<a>&nbsp;</a>", "<a/><b/>"] {
        assert!(well_formed(bad).is_err(), "{bad}");
    }
}
