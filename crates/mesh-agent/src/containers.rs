//! The node's container engine, as the agent sees it: which containers run and at which
//! address, for the MeshServices backed by a container (`spec.container`).
//!
//! The agent talks to the engine's Docker-compatible API on its Unix socket (Docker's, or
//! Podman's `podman system service`) through `bollard`. It starts looking only once a service
//! placed on this node asks for a container, then follows the engine's container events: each
//! event re-lists the containers (one request, whatever the event said), so a restart, a new
//! address, a stop or a removal reaches the plan within one round trip, with no polling. When
//! the socket is missing or the engine stops answering, the [`View`] says why and the agent
//! tries again every few seconds.
//!
//! [`report`] turns the view into the `status.containers` entries the controller makes each
//! service's Ready condition from, and [`engine_condition`] into the node's `ContainerEngine`
//! condition; both are pure.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerSummary, ContainerSummaryStateEnum};
use bollard::query_parameters::{EventsOptions, ListContainersOptionsBuilder};
use futures::StreamExt;
use mesh_api::ContainerBackend;
use mesh_api::conditions::{CONTAINER_ENGINE, Want};
use tokio::sync::watch;

/// Where engines keep their API socket, tried in this order when `--container-socket` is not
/// given: Podman's (rootful `podman.socket`), then Docker's.
pub const DEFAULT_SOCKETS: [&str; 2] = ["/run/podman/podman.sock", "/var/run/docker.sock"];

/// The API version asked for first: the newest that Docker 20.10 and Podman 4 both serve. An
/// older engine is met at its own version.
const CLIENT_VERSION: bollard::ClientVersion = bollard::ClientVersion { major_version: 1, minor_version: 41 };

/// How long to wait before looking for the engine again after it went away or never answered.
const RETRY: Duration = Duration::from_secs(3);

/// One container as the plan needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The engine's state word: `running`, `exited`, `created`, ...
    pub state: String,
    /// Its IPv4 address on its first network that gives it one (by network name), if any.
    pub ip: Option<Ipv4Addr>,
}

/// What the agent knows of the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    /// `Ok(which engine, at which socket)`, or why there is none to talk to.
    pub engine: Result<String, String>,
    /// Every container of the engine, by name.
    pub containers: BTreeMap<String, Seen>,
    /// Nothing has been asked of the engine yet (no report is made from this view).
    pub pending: bool,
}

impl Default for View {
    fn default() -> Self {
        Self {
            engine: Err("the container engine has not been asked yet".into()),
            containers: BTreeMap::new(),
            pending: true,
        }
    }
}

impl View {
    /// The running containers' addresses by name: the plan's input.
    pub fn addresses(&self) -> BTreeMap<String, Ipv4Addr> {
        self.containers
            .iter()
            .filter(|(_, seen)| seen.state == "running")
            .filter_map(|(name, seen)| Some((name.clone(), seen.ip?)))
            .collect()
    }
}

/// The engine watch: started on first use, it keeps [`View`] current.
pub struct Engine {
    socket: Option<PathBuf>,
    view: watch::Sender<View>,
    started: bool,
}

impl Engine {
    /// An engine at `socket` (`None`: the first of [`DEFAULT_SOCKETS`] that exists), not yet
    /// watched.
    pub fn new(socket: Option<PathBuf>) -> Self {
        Self { socket, view: watch::Sender::new(View::default()), started: false }
    }

    /// The current view.
    pub fn view(&self) -> View {
        self.view.borrow().clone()
    }

    /// A receiver that wakes when the view changes.
    pub fn subscribe(&self) -> watch::Receiver<View> {
        self.view.subscribe()
    }

    /// Starts watching the engine, once: the first time a service asks for a container.
    pub fn start(&mut self) {
        if self.started {
            return;
        }
        self.started = true;
        tokio::spawn(follow(self.socket.clone(), self.view.clone()));
    }
}

/// The socket to use: `configured`, else the first of [`DEFAULT_SOCKETS`] that exists.
fn socket_path(configured: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = configured {
        return if path.exists() {
            Ok(path.to_owned())
        } else {
            Err(format!(
                "no container engine socket at {} (--container-socket; the chart's agent.containerSocket): is the \
                 engine's API service running?",
                path.display()
            ))
        };
    }
    DEFAULT_SOCKETS.iter().map(PathBuf::from).find(|p| p.exists()).ok_or_else(|| {
        format!(
            "no container engine socket at {} (start Docker, or Podman's API service: systemctl enable --now \
             podman.socket; or point --container-socket, the chart's agent.containerSocket, at it)",
            DEFAULT_SOCKETS.join(" or ")
        )
    })
}

/// Connects, lists, and follows the engine's container events for as long as the agent runs.
async fn follow(socket: Option<PathBuf>, view: watch::Sender<View>) {
    loop {
        match connect(socket.as_deref()).await {
            Err(why) => {
                let changed = view.send_if_modified(|v| {
                    let next = View { engine: Err(why.clone()), containers: BTreeMap::new(), pending: false };
                    std::mem::replace(v, next) != *v
                });
                if changed {
                    tracing::warn!("container engine: {why}; looking again every {} s", RETRY.as_secs());
                }
            }
            Ok((docker, engine)) => {
                tracing::info!(%engine, "following the container engine's events");
                let why = events(&docker, &engine, &view).await;
                tracing::warn!("container engine: {why}; looking again in {} s", RETRY.as_secs());
                view.send_replace(View { engine: Err(why), containers: BTreeMap::new(), pending: false });
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// A client of the engine and a line that says which engine it is.
async fn connect(socket: Option<&Path>) -> Result<(Docker, String), String> {
    let path = socket_path(socket)?;
    let shown = path.display().to_string();
    let docker = Docker::connect_with_unix(&shown, 10, &CLIENT_VERSION)
        .map_err(|err| format!("connecting to the container engine at {shown}: {err}"))?;
    let docker = docker
        .negotiate_version()
        .await
        .map_err(|err| format!("the container engine at {shown} does not answer: {err}"))?;
    let version = docker.version().await.map_err(|err| format!("asking the engine at {shown} its version: {err}"))?;
    let name = version
        .components
        .as_ref()
        .and_then(|c| c.first())
        .map_or_else(|| "container engine".to_owned(), |c| c.name.clone());
    Ok((docker, format!("{name} {} at {shown}", version.version.unwrap_or_default())))
}

/// Follows the events until the stream fails; returns why it ended.
async fn events(docker: &Docker, engine: &str, view: &watch::Sender<View>) -> String {
    let filters = HashMap::from([("type".to_owned(), vec!["container".to_owned()])]);
    let mut stream = docker.events(Some(EventsOptions { filters: Some(filters), ..EventsOptions::default() }));
    // The stream's request goes out on its first poll: list once now, and once more shortly
    // after, so that a change between the first list and the subscription is not missed.
    let mut settle = Box::pin(tokio::time::sleep(Duration::from_secs(1)));
    let mut settled = false;
    if let Err(why) = relist(docker, engine, view).await {
        return why;
    }
    loop {
        tokio::select! {
            () = &mut settle, if !settled => {
                settled = true;
                if let Err(why) = relist(docker, engine, view).await {
                    return why;
                }
            }
            event = stream.next() => match event {
                Some(Ok(event)) => {
                    tracing::debug!(action = ?event.action, actor = ?event.actor.and_then(|a| a.attributes), "container event");
                    if let Err(why) = relist(docker, engine, view).await {
                        return why;
                    }
                }
                Some(Err(err)) => return format!("the event stream of the engine ({engine}) failed: {err}"),
                None => return format!("the engine ({engine}) closed its event stream"),
            }
        }
    }
}

/// Lists every container and publishes the view if it changed.
async fn relist(docker: &Docker, engine: &str, view: &watch::Sender<View>) -> Result<(), String> {
    let list = docker
        .list_containers(Some(ListContainersOptionsBuilder::new().all(true).build()))
        .await
        .map_err(|err| format!("listing the containers of the engine ({engine}): {err}"))?;
    let next = View { engine: Ok(engine.to_owned()), containers: containers_of(&list), pending: false };
    view.send_if_modified(|v| std::mem::replace(v, next) != *v);
    Ok(())
}

/// The containers of a listing, by name (the engine lists names with a leading `/`).
pub fn containers_of(list: &[ContainerSummary]) -> BTreeMap<String, Seen> {
    let mut containers = BTreeMap::new();
    for c in list {
        let state = c.state.unwrap_or(ContainerSummaryStateEnum::EMPTY).to_string();
        // The first network by name that gives the container an IPv4 address.
        let networks: BTreeMap<&String, Option<Ipv4Addr>> = c
            .network_settings
            .iter()
            .flat_map(|s| s.networks.iter().flatten())
            .map(|(net, endpoint)| (net, endpoint.ip_address.as_deref().and_then(|ip| ip.parse().ok())))
            .collect();
        let ip = networks.values().flatten().next().copied();
        for name in c.names.iter().flatten() {
            containers.insert(name.trim_start_matches('/').to_owned(), Seen { state: state.clone(), ip });
        }
    }
    containers
}

/// `status.containers`: for each service placed here that asks for a container (`wanted`:
/// service → container name), what the engine shows of it. `refused` holds the services whose
/// placement this node refuses, with why.
pub fn report(
    wanted: &BTreeMap<String, String>,
    view: &View,
    refused: &BTreeMap<String, String>,
) -> Vec<ContainerBackend> {
    wanted
        .iter()
        .map(|(service, container)| {
            let entry = |ready: bool, ip: Option<Ipv4Addr>, reason: &str, message: String| ContainerBackend {
                service: service.clone(),
                container: container.clone(),
                ready,
                ip: ip.map(|ip| ip.to_string()),
                reason: reason.to_owned(),
                message,
            };
            let engine = match &view.engine {
                Ok(engine) => engine,
                Err(why) => return entry(false, None, "NoEngine", why.clone()),
            };
            match view.containers.get(container) {
                None => entry(false, None, "NotFound", format!("no container named {container} in {engine}")),
                Some(seen) if seen.state != "running" => entry(
                    false,
                    None,
                    "NotRunning",
                    format!(
                        "container {container} is {} in {engine}",
                        if seen.state.is_empty() { "not running" } else { &seen.state }
                    ),
                ),
                Some(Seen { ip: None, .. }) => entry(
                    false,
                    None,
                    "NoAddress",
                    format!(
                        "container {container} runs without an IPv4 address of its own (host or no network?): give it \
                         a network, or serve it as a process on the node (spec.node without spec.container)"
                    ),
                ),
                Some(Seen { ip: Some(ip), .. }) => match refused.get(service) {
                    Some(why) => entry(false, Some(*ip), "Refused", format!("not forwarded: {why}")),
                    None => {
                        entry(true, Some(*ip), "Running", format!("container {container} runs at {ip} in {engine}"))
                    }
                },
            }
        })
        .collect()
}

/// The node's `ContainerEngine` condition while some service placed here asks for a container
/// (`None` otherwise: a node with no container service says nothing about engines).
pub fn engine_condition(wanted: &BTreeMap<String, String>, view: &View) -> Option<Want> {
    if wanted.is_empty() {
        return None;
    }
    Some(match &view.engine {
        Ok(engine) => Want::yes(CONTAINER_ENGINE, "Reachable", format!("following the containers of {engine}")),
        Err(why) => Want::no(
            CONTAINER_ENGINE,
            "NoEngine",
            format!("{why}; {} service(s) placed on this node ask for a container", wanted.len()),
        ),
    })
}

#[cfg(test)]
mod tests {
    use bollard::models::{ContainerSummaryNetworkSettings, EndpointSettings};

    use super::*;

    fn summary(name: &str, state: ContainerSummaryStateEnum, networks: &[(&str, &str)]) -> ContainerSummary {
        ContainerSummary {
            names: Some(vec![format!("/{name}")]),
            state: Some(state),
            network_settings: Some(ContainerSummaryNetworkSettings {
                networks: Some(
                    networks
                        .iter()
                        .map(|(net, ip)| {
                            (
                                net.to_string(),
                                EndpointSettings { ip_address: Some(ip.to_string()), ..Default::default() },
                            )
                        })
                        .collect(),
                ),
            }),
            ..Default::default()
        }
    }

    fn view(list: &[ContainerSummary]) -> View {
        View {
            engine: Ok("podman 4.3.1 at /run/podman/podman.sock".into()),
            containers: containers_of(list),
            pending: false,
        }
    }

    #[test]
    fn a_listing_gives_each_name_its_state_and_first_ipv4_address() {
        let list = [
            summary("web", ContainerSummaryStateEnum::RUNNING, &[("z-net", "10.89.0.2"), ("podman", "10.88.0.7")]),
            summary("gone", ContainerSummaryStateEnum::EXITED, &[("podman", "")]),
            summary("hostnet", ContainerSummaryStateEnum::RUNNING, &[("host", "")]),
        ];
        let containers = containers_of(&list);
        assert_eq!(containers["web"], Seen { state: "running".into(), ip: Some("10.88.0.7".parse().unwrap()) });
        assert_eq!(containers["gone"], Seen { state: "exited".into(), ip: None });
        assert_eq!(containers["hostnet"].ip, None);
        // Only running containers with an address are the plan's input.
        assert_eq!(view(&list).addresses(), BTreeMap::from([("web".to_owned(), "10.88.0.7".parse().unwrap())]));
    }

    #[test]
    fn each_wanted_container_is_reported_with_why_it_is_not_ready() {
        let list = [
            summary("web", ContainerSummaryStateEnum::RUNNING, &[("podman", "10.88.0.7")]),
            summary("stopped", ContainerSummaryStateEnum::EXITED, &[]),
            summary("hostnet", ContainerSummaryStateEnum::RUNNING, &[]),
            summary("odd", ContainerSummaryStateEnum::RUNNING, &[("podman", "10.42.0.3")]),
        ];
        let wanted: BTreeMap<String, String> = [
            ("a/web", "web"),
            ("a/stopped", "stopped"),
            ("a/missing", "missing"),
            ("a/hostnet", "hostnet"),
            ("a/odd", "odd"),
        ]
        .into_iter()
        .map(|(s, c)| (s.to_owned(), c.to_owned()))
        .collect();
        let refused = BTreeMap::from([(
            "a/odd".to_owned(),
            "its container's address 10.42.0.3 is inside the mesh subnet".to_owned(),
        )]);
        let reported = report(&wanted, &view(&list), &refused);
        let by: BTreeMap<&str, &ContainerBackend> = reported.iter().map(|r| (r.service.as_str(), r)).collect();
        assert!(by["a/web"].ready && by["a/web"].ip.as_deref() == Some("10.88.0.7"), "{reported:?}");
        assert_eq!(by["a/web"].reason, "Running");
        for (service, reason) in
            [("a/stopped", "NotRunning"), ("a/missing", "NotFound"), ("a/hostnet", "NoAddress"), ("a/odd", "Refused")]
        {
            assert!(!by[service].ready, "{service}");
            assert_eq!(by[service].reason, reason, "{service}");
        }
        assert!(by["a/stopped"].message.contains("stopped is exited"), "{reported:?}");
        assert!(by["a/odd"].message.contains("inside the mesh subnet"), "{reported:?}");
        // Without an engine every one says so, and so does the node's condition.
        let none = View {
            engine: Err("no container engine socket at /x.sock".into()),
            containers: BTreeMap::new(),
            pending: false,
        };
        assert!(report(&wanted, &none, &BTreeMap::new()).iter().all(|r| r.reason == "NoEngine" && !r.ready));
        let condition = engine_condition(&wanted, &none).unwrap();
        assert_eq!((condition.status, condition.reason), (false, "NoEngine"));
        assert!(condition.message.contains("/x.sock") && condition.message.contains("5 service(s)"), "{condition:?}");
        assert_eq!(engine_condition(&BTreeMap::new(), &none), None, "no container service, no condition");
    }

    #[test]
    fn a_configured_socket_that_is_missing_is_named() {
        let why = socket_path(Some(Path::new("/nonexistent/podman.sock"))).unwrap_err();
        assert!(why.contains("/nonexistent/podman.sock") && why.contains("--container-socket"), "{why}");
    }
}
