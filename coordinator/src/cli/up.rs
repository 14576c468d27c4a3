//! `homelab up`: one command from the spec to a Ready cluster.
//!
//! 1. Initialise the state directory if needed (with the coordinator URL's host as a SAN).
//! 2. Use a running `homelab serve`, or start the coordinator in this process.
//! 3. Apply the spec on Proxmox (the same plan and apply as `homelab apply`).
//! 4. Record the desired cluster, so roles are assigned as agents call home.
//! 5. Follow the event log, printing each node's progress, until every node of the spec is
//!    Ready (or, without a CNI, runs K3s), then remove the seeds of the enrolled nodes, print a
//!    summary and write the kubeconfig. On timeout, name per node what it is waiting for, and
//!    exit non-zero.
//!
//! Re-running is safe: apply adopts what exists, and nodes already Ready stay as they are.

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use homelab_proto::v1::{self as pb, ListNodesRequest, WatchEventsRequest};
use tokio::{net::TcpListener, sync::oneshot};

use super::{
    Context, OutputFormat,
    apply::{plan_table, provisioner, record_desired_cluster},
    client, parse_duration, status,
};
use crate::{core::Settings, spec::Spec, state_dir::StateDirError};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The cluster spec.
    #[arg(long, env = "HOMELAB_SPEC", default_value = "homelab.toml")]
    spec: PathBuf,
    /// Give up if the cluster is not Ready within this time.
    #[arg(long, default_value = "20m", value_parser = parse_duration)]
    timeout: Duration,
    /// The `homelab-agent` binary to put on each seed. Default: the one beside `homelab`.
    #[arg(long, env = "HOMELAB_AGENT_BIN", value_name = "PATH")]
    agent_bin: Option<PathBuf>,
    /// Where an in-process coordinator listens. Default: all addresses, on the port of the
    /// spec's coordinator URL.
    #[arg(long)]
    listen: Option<SocketAddr>,
}

pub(super) async fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let spec = Spec::from_file(&args.spec)?;
    let url = spec.coordinator.url.get_ref().clone();
    let (host, port) = host_and_port(&url)?;
    if !ctx.state.ca_cert().exists() {
        let report = ctx.state.init(std::slice::from_ref(&host), false)?;
        note(
            ctx,
            &format!(
                "Initialised {} (CA {}).",
                report.state_dir.display(),
                &report.ca_fingerprint_sha256[..16]
            ),
        );
    }

    // A running daemon, or one in this process for as long as `up` runs.
    let mut local = None;
    let daemon_running = match ctx.state.lock_daemon() {
        Ok(lock) => {
            drop(lock);
            false
        }
        Err(StateDirError::DaemonRunning(_)) => true,
        Err(e) => return Err(e.into()),
    };
    let op_ctx = if daemon_running {
        note(ctx, "Using the running `homelab serve`.");
        Context {
            state: ctx.state.clone(),
            coordinator: ctx.coordinator.clone(),
            output: ctx.output,
        }
    } else {
        let listen = args
            .listen
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], port)));
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("failed to listen on {listen}"))?;
        let bound = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let state = ctx.state.clone();
        let task = tokio::spawn(async move {
            super::serve::serve_state_dir(&state, listener, Settings::default(), async {
                let _ = stopped.await;
            })
            .await
        });
        note(
            ctx,
            &format!("Coordinator listening on {bound}; the VMs reach it at {url}."),
        );
        local = Some((stop, task));
        Context {
            state: ctx.state.clone(),
            coordinator: Some(format!("https://127.0.0.1:{}", bound.port())),
            output: ctx.output,
        }
    };

    let result = bring_up(ctx, &op_ctx, &args, &spec).await;
    if let Some((stop, task)) = local {
        let _ = stop.send(());
        task.await.context("coordinator task panicked")??;
    }
    result
}

async fn bring_up(ctx: &Context, op_ctx: &Context, args: &Args, spec: &Spec) -> anyhow::Result<()> {
    // Follow events from now on, before anything happens.
    let mut events = client::status_client(op_ctx)
        .await?
        .watch_events(WatchEventsRequest {
            after_id: -1,
            node: String::new(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();

    let provisioner = Arc::new(provisioner(ctx, &args.spec, args.agent_bin.clone())?);
    let plan = provisioner.plan().await?;
    if ctx.output == OutputFormat::Table {
        print!("{}", plan_table(&plan));
    }
    if !plan.conflicts().is_empty() {
        anyhow::bail!(
            "VMs {:?} conflict with VMs homelab did not create; nothing was changed",
            plan.conflicts()
        );
    }
    if !plan.is_noop() {
        provisioner.apply(&plan).await?;
    }
    record_desired_cluster(op_ctx, &args.spec).await?;

    let wanted: BTreeSet<String> = spec.vms.iter().map(|v| v.name.get_ref().clone()).collect();
    // Without a CNI (flannel-backend none, e.g. for Cilium) Nodes stay NotReady until one is
    // installed: then a node is done once K3s is installed and started on it.
    let waits_for_cni = spec
        .k3s
        .config
        .get("flannel-backend")
        .and_then(toml::Value::as_str)
        == Some("none");
    let done = |n: &pb::Node| {
        n.ready
            || (waits_for_cni
                && n.last_phase.as_ref().is_some_and(|p| {
                    p.phase == "install"
                        && p.step == "start"
                        && p.outcome == pb::StepOutcome::Succeeded as i32
                }))
    };
    let deadline = tokio::time::Instant::now() + args.timeout;
    loop {
        let nodes = list(op_ctx).await?;
        let ready: BTreeSet<String> = nodes
            .iter()
            .filter(|n| done(n))
            .map(|n| n.name.clone())
            .collect();
        if wanted.iter().all(|n| ready.contains(n)) {
            break;
        }
        match tokio::time::timeout_at(deadline, events.message()).await {
            Err(_) => {
                let nodes = list(op_ctx).await?;
                if ctx.output == OutputFormat::Table {
                    println!();
                    print!("{}", status::nodes_table(&nodes));
                }
                let mut reasons = Vec::new();
                for name in &wanted {
                    let node = nodes.iter().find(|n| &n.name == name);
                    if node.is_some_and(done) {
                        continue;
                    }
                    reasons.push(format!("{name}: {}", waiting_for(node)));
                }
                anyhow::bail!(
                    "the cluster was not Ready within {:?}:\n  {}",
                    args.timeout,
                    reasons.join("\n  ")
                );
            }
            Ok(Ok(Some(event))) => {
                if wanted.contains(&event.node) || event.node.is_empty() {
                    status::print_event(ctx.output, &event)?;
                }
            }
            Ok(Ok(None)) => anyhow::bail!("the coordinator ended the event stream"),
            Ok(Err(s)) => anyhow::bail!("event stream failed: {}", s.message()),
        }
    }

    // Every node has enrolled: their seeds, which held their one-time tokens, can go.
    let cleanup = provisioner.plan().await?;
    if !cleanup.is_noop() {
        provisioner.apply(&cleanup).await?;
    }
    let nodes = list(op_ctx).await?;
    let kubeconfig = match std::env::var_os("HOME") {
        Some(home) => {
            let path = PathBuf::from(home).join(".kube/homelab.yaml");
            match client::admin_client(op_ctx)
                .await?
                .get_kubeconfig(pb::GetKubeconfigRequest {})
                .await
            {
                Ok(reply) => {
                    if let Some(dir) = path.parent().filter(|d| !d.exists()) {
                        crate::fsutil::create_private_dir(dir)?;
                    }
                    crate::fsutil::write_atomic(
                        &path,
                        reply.into_inner().content.as_bytes(),
                        crate::fsutil::PRIVATE,
                    )?;
                    Some(path)
                }
                Err(s) => {
                    note(
                        ctx,
                        &format!("Could not fetch the kubeconfig: {}", s.message()),
                    );
                    None
                }
            }
        }
        None => None,
    };
    match ctx.output {
        OutputFormat::Json => super::output::print_json(&serde_json::json!({
            "ready": nodes.iter().filter(|n| n.ready).map(|n| n.name.clone()).collect::<Vec<_>>(),
            "kubeconfig": kubeconfig,
        }))?,
        OutputFormat::Table => {
            println!();
            print!("{}", status::nodes_table(&nodes));
            let what = if waits_for_cni {
                "K3s runs on every node; Nodes stay NotReady until you install a CNI (flannel-backend is none)."
            } else {
                "The cluster is Ready."
            };
            match kubeconfig {
                Some(path) => println!("\n{what} KUBECONFIG={} kubectl get nodes", path.display()),
                None => println!("\n{what}"),
            }
        }
    }
    Ok(())
}

async fn list(ctx: &Context) -> anyhow::Result<Vec<pb::Node>> {
    Ok(client::status_client(ctx)
        .await?
        .list_nodes(ListNodesRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner()
        .nodes)
}

/// What a node that is not Ready is waiting for, in words.
fn waiting_for(node: Option<&pb::Node>) -> String {
    let Some(node) = node else {
        return "no VM or token yet".into();
    };
    if !node.last_error.is_empty() {
        let step = node
            .last_phase
            .as_ref()
            .map_or_else(String::new, |p| format!(" at {}/{}", p.phase, p.step));
        return format!("failed{step}: {}", node.last_error);
    }
    if node.state == pb::NodeState::Pending as i32 {
        return "its VM has not enrolled: the agent never called home (check the VM console and cloud-init, and that the VM reaches the coordinator URL)".into();
    }
    if !node.connected {
        return "enrolled, but its agent is not connected".into();
    }
    match &node.last_phase {
        Some(p) if p.phase == "install" => {
            format!("installing K3s: {} (attempt {})", p.step, p.attempt)
        }
        _ if node.role == "agent" => "waiting for the first server to be Ready".into(),
        _ => "waiting for its role".into(),
    }
}

fn host_and_port(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .strip_prefix("https://")
        .with_context(|| format!("coordinator.url {url:?} is not https"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => (
            host.trim_matches(['[', ']']).to_owned(),
            port.parse()
                .with_context(|| format!("bad port in {url:?}"))?,
        ),
        _ => (
            authority.trim_matches(['[', ']']).to_owned(),
            super::client::DEFAULT_PORT,
        ),
    };
    Ok((host, port))
}

fn note(ctx: &Context, text: &str) {
    if ctx.output == OutputFormat::Table {
        println!("{text}");
    } else {
        eprintln!("{text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_urls_give_host_and_port() {
        assert_eq!(
            host_and_port("https://192.168.0.10:7443").unwrap(),
            ("192.168.0.10".into(), 7443)
        );
        assert_eq!(
            host_and_port("https://ws.lan").unwrap(),
            ("ws.lan".into(), 7443)
        );
        assert!(host_and_port("http://x").is_err());
    }
}
