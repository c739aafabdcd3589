//! `meshctl`: see and debug a harness-mesh (also the kubectl plugin `kubectl mesh`).
//!
//! - `status`: nodes, services, who reaches whom, convergence; tables, `-o json|yaml`;
//! - `graph`: the topology as SVG (drawn here, no Graphviz) or DOT;
//! - `showconf NODE`: a node's wg-quick config, private key withheld;
//! - `enroll USER@HOST --name NAME`, `unenroll NAME`: a remote machine in and out of the mesh,
//!   over SSH;
//! - `completions SHELL`.
//!
//! [`kubeconfig`] reaches the cluster for every command. [`cluster`] makes the reads of
//! `status`, `graph` and `showconf`; [`model`] turns the objects into what is shown, and
//! [`table`], [`svg`], [`dot`] and [`wgquick`] render it, all without I/O. [`enroll`] is a
//! module tree of its own, one function per step.
//!
//! The modules and what each uses of the others (`use crate::`, `super::`, and paths in code;
//! tests aside). No module reaches back up its chain, so there is no circle:
//!
//! ```text
//! main ──> cli ──> enroll (its arg structs, re-exported from enroll::args)
//!  │        └────> kubeconfig ──> util
//!  ├─> cluster ──> kubeconfig, model, util
//!  ├─> enroll ───> kubeconfig, and its own tree:
//!  │     enroll ──> args, join, leave, local, login, progress
//!  │     join ────> api, args, local, progress, remote, ssh, crate::kubeconfig
//!  │     leave ───> api, args, local, progress, remote, ssh, crate::kubeconfig
//!  │     login ───> args, local, progress, ssh
//!  │     api ─────> crate::kubeconfig, crate::util
//!  │     args ────> crate::util
//!  │     ssh ─────> args
//!  │     local ───> remote
//!  │     progress, remote: nothing
//!  ├─> model ──> connected
//!  ├─> table ──> connected, model
//!  ├─> svg ────> dot, model, palette
//!  ├─> dot ────> model, palette
//!  └─> wgquick (pure: mesh-api types only)
//! util, connected, palette: nothing of meshctl
//! ```
//!
//! Before issue 18 it had circles: `cli -> enroll -> cli` (enroll's flags used cli's
//! `ClusterArgs` and `parse_duration`), `cli -> enroll -> enroll::api -> cluster -> cli` (the
//! second kubeconfig loader borrowed `chain` from cluster, which took `ClusterArgs` from cli),
//! and `enroll <-> enroll::ssh` (`SshArgs`).

mod cli;
mod cluster;
mod connect;
mod connected;
mod dot;
mod enroll;
mod kubeconfig;
mod model;
mod palette;
mod svg;
mod table;
mod util;
mod wgquick;

use std::io::{ErrorKind, Write};
use std::process::ExitCode;

use anyhow::Context;
use k8s_openapi::jiff::Timestamp;

use crate::cli::{Cli, Command, GraphFormat, Invocation, Output};
use crate::cluster::Cluster;
use crate::model::MeshView;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let invocation = Invocation::from_arg0(args.first());
    let cli = invocation.parse(args);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, &invocation)).and_then(|text| print(&text)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes `text` to stdout; a closed pipe (`meshctl status | head`) is not an error.
fn print(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(err) if err.kind() != ErrorKind::BrokenPipe => Err(err).context("writing to stdout"),
        _ => Ok(()),
    }
}

/// Runs the command and returns what to print.
async fn run(cli: Cli, invocation: &Invocation) -> anyhow::Result<String> {
    match cli.command {
        Command::Completions(args) => {
            let mut out = Vec::new();
            clap_complete::generate(args.shell, &mut invocation.command(), invocation.executable.clone(), &mut out);
            Ok(String::from_utf8(out).context("the completion script is not UTF-8")?)
        }
        Command::Status(args) => {
            let cluster = Cluster::connect(&cli.cluster).await?;
            let view = load(&cluster, args.namespace.as_deref()).await?;
            Ok(match args.output {
                Output::Table => table::status(&view, false),
                Output::Wide => table::status(&view, true),
                Output::Json => serde_json::to_string_pretty(&view)? + "\n",
                Output::Yaml => serde_saphyr::to_string(&view).context("rendering YAML")?,
            })
        }
        Command::Graph(args) => {
            let cluster = Cluster::connect(&cli.cluster).await?;
            let view = load(&cluster, args.namespace.as_deref()).await?;
            Ok(match args.format {
                GraphFormat::Svg => svg::render(&view, !args.no_services),
                GraphFormat::Dot => dot::render(&view, !args.no_services),
            })
        }
        Command::Enroll(args) => enroll::enroll(args, &cli.cluster).await.map(|()| String::new()),
        Command::Unenroll(args) => enroll::unenroll(args, &cli.cluster).await.map(|()| String::new()),
        Command::Connect(args) => {
            let session = connect::Session { member: args.member, forwards: Vec::new(), exposes: Vec::new() };
            connect::run(session, &cli.cluster).await.map(|()| String::new())
        }
        Command::Forward(args) => {
            let forwards = args
                .ports
                .iter()
                .map(|ports| connect::Forward { service: args.service.clone(), ports: *ports, address: args.address })
                .collect();
            let session = connect::Session { member: args.member, forwards, exposes: Vec::new() };
            connect::run(session, &cli.cluster).await.map(|()| String::new())
        }
        Command::Expose(args) => {
            let expose = connect::Expose {
                service: args.service,
                local_port: args.local_port,
                port: args.port.unwrap_or(args.local_port),
            };
            let session = connect::Session { member: args.member, forwards: Vec::new(), exposes: vec![expose] };
            connect::run(session, &cli.cluster).await.map(|()| String::new())
        }
        Command::Showconf(args) => {
            let cluster = Cluster::connect(&cli.cluster).await?;
            let (nodes, services) = tokio::try_join!(cluster.nodes(), cluster.services(None))?;
            Ok(wgquick::render(&args.node, &nodes, &services)?)
        }
    }
}

/// Reads everything `status` and `graph` show.
async fn load(cluster: &Cluster, namespace: Option<&str>) -> anyhow::Result<MeshView> {
    let (nodes, services, leases) = tokio::join!(cluster.nodes(), cluster.services(namespace), cluster.agent_leases());
    let (nodes, services) = (nodes?, services?);
    Ok(MeshView::build(&nodes, &services, leases.as_ref().map_err(String::as_str), Timestamp::now()))
}
