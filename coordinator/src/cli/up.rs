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
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use super::{
    Context, OutputFormat,
    apply::{plan_table, provisioner_reporting, record_desired_cluster},
    client, parse_duration,
    progress::{Display, NodeProgress},
};
use crate::{
    core::Settings,
    orchestrate::ClusterSettings,
    provision::{Action, Plan, Progress, ProvisionError},
    spec::Spec,
    state_dir::StateDirError,
};

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
            // Agents ask K3s for its state on each health tick, and a worker is Ready only
            // once a server's report says so: a short interval while `up` watches.
            let settings = Settings {
                health_interval: UP_HEALTH_INTERVAL,
                ..Settings::default()
            };
            super::serve::serve_state_dir(&state, listener, settings, async {
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

    let desired = ClusterSettings::desired_nodes(spec);
    let wanted: BTreeSet<String> = desired.iter().map(|n| n.name.clone()).collect();
    // Without a CNI (flannel-backend none, e.g. for Cilium) Nodes stay NotReady until one is
    // installed: then a node is done once K3s is installed and started on it.
    let waits_for_cni = spec
        .k3s
        .config
        .get("flannel-backend")
        .and_then(toml::Value::as_str)
        == Some("none");
    // A node whose install is still at a step is not done even if a server already sees it
    // Ready: its own reports until the step ends can still say NotReady.
    let done = |n: &pb::Node| {
        let installing = n
            .last_phase
            .as_ref()
            .is_some_and(|p| p.phase == "install" && p.outcome == pb::StepOutcome::Started as i32);
        (n.ready && !installing)
            || (waits_for_cni
                && n.last_phase.as_ref().is_some_and(|p| {
                    p.phase == "install"
                        && p.step == "start"
                        && p.outcome == pb::StepOutcome::Succeeded as i32
                }))
    };

    let (progress_tx, mut progress) = mpsc::unbounded_channel::<Progress>();
    let provisioner = Arc::new(provisioner_reporting(
        ctx,
        &args.spec,
        args.agent_bin.clone(),
        Box::new(move |p| {
            let _ = progress_tx.send(p);
        }),
    )?);
    let plan = provisioner.plan().await?;
    match ctx.output {
        OutputFormat::Table => print!("{}", plan_table(&plan)),
        OutputFormat::Json => println!("{}", serde_json::json!({ "kind": "plan", "plan": plan })),
    }
    if !plan.conflicts().is_empty() {
        anyhow::bail!(
            "VMs {:?} conflict with VMs homelab did not create; nothing was changed",
            plan.conflicts()
        );
    }
    if ctx.output == OutputFormat::Table {
        println!();
    }
    // The K3s side follows the spec from the start, as with `apply`: a node that calls home
    // gets its role at once, without waiting for the other VMs to be created.
    record_desired_cluster(op_ctx, &args.spec).await?;

    let mut display = Display::new(ctx.output, &desired);
    if waits_for_cni {
        display.done_when_running();
    }
    display.known(&list(op_ctx).await?);
    let mut applying = if plan.is_noop() {
        None
    } else {
        let provisioner = Arc::clone(&provisioner);
        Some(tokio::spawn(async move { provisioner.apply(&plan).await }))
    };
    if applying.is_none() {
        display.applied();
    }
    // The timeout counts from when every VM runs: provisioning has its own limits.
    let mut deadline = applying
        .is_none()
        .then(|| tokio::time::Instant::now() + args.timeout);
    let mut redraw = tokio::time::interval(Duration::from_secs(1));
    redraw.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut check = true;
    // The coordinator's records decide when every node is done. The events saying so follow
    // right after: wait briefly for them, so the progress shown ends where the cluster is.
    let mut settled: Option<tokio::time::Instant> = None;
    // Removing the seeds of enrolled nodes, started as soon as every node's agent is connected
    // (its seed, which held its one-time token, is no longer needed), while the installs run.
    let mut cleanup: Option<tokio::task::JoinHandle<Result<Plan, ProvisionError>>> = None;
    let outcome: anyhow::Result<()> = loop {
        if check && applying.is_none() {
            let nodes = list(op_ctx).await?;
            if cleanup.is_none()
                && wanted.iter().all(|name| {
                    nodes.iter().any(|n| {
                        &n.name == name && n.state == pb::NodeState::Enrolled as i32 && n.connected
                    })
                })
            {
                let provisioner = Arc::clone(&provisioner);
                cleanup = Some(tokio::spawn(async move {
                    let plan = provisioner.plan().await?;
                    if !plan.is_noop() {
                        provisioner.apply(&plan).await?;
                    }
                    Ok(plan)
                }));
            }
            if wanted
                .iter()
                .all(|name| nodes.iter().any(|n| &n.name == name && done(n)))
            {
                if display.all_done() {
                    break Ok(());
                }
                settled.get_or_insert_with(|| tokio::time::Instant::now() + SETTLE);
            } else {
                settled = None;
            }
            check = false;
        }
        tokio::select! {
            () = sleep_until_some(settled) => break Ok(()),
            Some(p) = progress.recv() => display.vm(&p),
            applied = async { applying.as_mut().expect("guarded").await }, if applying.is_some() => {
                applying = None;
                match applied {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => break Err(e.into()),
                    Err(e) => break Err(anyhow::anyhow!("the provisioner task failed: {e}")),
                }
                while let Ok(p) = progress.try_recv() {
                    display.vm(&p);
                }
                display.applied();
                deadline = Some(tokio::time::Instant::now() + args.timeout);
                check = true;
            }
            event = events.message() => match event {
                Ok(Some(event)) => {
                    if wanted.contains(&event.node) || event.node.is_empty() {
                        display.event(&event);
                        check = true;
                    }
                }
                Ok(None) => break Err(anyhow::anyhow!("the coordinator ended the event stream")),
                Err(s) => break Err(anyhow::anyhow!("event stream failed: {}", s.message())),
            },
            () = sleep_until_some(deadline) => {
                display.finish();
                let nodes = list(op_ctx).await?;
                let reasons: Vec<(String, String)> = desired
                    .iter()
                    .filter_map(|d| {
                        let node = nodes.iter().find(|n| n.name == d.name);
                        (!node.is_some_and(done)).then(|| (d.name.clone(), waiting_for(node)))
                    })
                    .collect();
                summary(ctx, &display, &nodes, &reasons, None)?;
                break Err(anyhow::anyhow!(
                    "the cluster was not Ready within {:?}:\n  {}",
                    args.timeout,
                    reasons
                        .iter()
                        .map(|(name, why)| format!("{name}: {why}"))
                        .collect::<Vec<_>>()
                        .join("\n  ")
                ));
            }
            _ = redraw.tick() => display.tick(),
        }
    };
    // A seed removal under way finishes either way: stopping it halfway would leave a
    // detached seed volume behind.
    let cleaned = match cleanup {
        Some(task) => Some(
            task.await
                .map_err(|e| anyhow::anyhow!("the seed removal task failed: {e}")),
        ),
        None => None,
    };
    if outcome.is_err() {
        display.finish();
        return outcome;
    }
    display.finish();

    // Every node has enrolled: their seeds, which held their one-time tokens, can go.
    let cleanup = match cleaned {
        Some(done) => done??,
        None => {
            let plan = provisioner.plan().await?;
            if !plan.is_noop() {
                provisioner.apply(&plan).await?;
            }
            plan
        }
    };
    if !cleanup.is_noop() {
        let removed = cleanup
            .vms
            .iter()
            .filter(|vm| {
                matches!(
                    vm.action,
                    Action::Adopt {
                        remove_seed: true,
                        ..
                    }
                )
            })
            .count();
        match ctx.output {
            OutputFormat::Json => {
                while let Ok(p) = progress.try_recv() {
                    display.vm(&p);
                }
            }
            OutputFormat::Table if removed > 0 => println!(
                "\nRemoved the seeds of {removed} enrolled node(s): they held one-time tokens."
            ),
            OutputFormat::Table => {}
        }
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
    summary(ctx, &display, &nodes, &[], kubeconfig.as_deref())?;
    if ctx.output == OutputFormat::Table {
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
    Ok(())
}

/// The health interval of the coordinator `up` runs in its own process. A worker is Ready once
/// a server's report says so, and agents read K3s's state again on each tick, so the
/// interval bounds how late `up` sees a node Ready. (`homelab serve` defaults to 30 s.)
const UP_HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// How long `up` waits, once the coordinator has every node done, for the events that say so.
const SETTLE: Duration = Duration::from_secs(2);

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The end of a run: per node of the spec its role, address, phase and readiness, and for
/// the nodes in `reasons` what they wait for. A table, or one JSON object.
fn summary(
    ctx: &Context,
    display: &Display,
    nodes: &[pb::Node],
    reasons: &[(String, String)],
    kubeconfig: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let rows: Vec<SummaryRow<'_>> = display
        .board()
        .nodes
        .iter()
        .map(|p| SummaryRow {
            progress: p,
            ready: nodes.iter().any(|n| n.name == p.name && n.ready),
            waiting_for: reasons
                .iter()
                .find(|(name, _)| *name == p.name)
                .map(|(_, why)| why.as_str()),
        })
        .collect();
    match ctx.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::json!({
                "kind": "summary",
                "ok": reasons.is_empty(),
                "nodes": rows.iter().map(|r| serde_json::json!({
                    "name": r.progress.name,
                    "role": r.progress.role,
                    "ip": r.progress.ip,
                    "phase": r.phase(),
                    "ready": r.ready,
                    "waiting_for": r.waiting_for,
                })).collect::<Vec<_>>(),
                "ready": rows.iter().filter(|r| r.ready).map(|r| &r.progress.name).collect::<Vec<_>>(),
                "kubeconfig": kubeconfig,
            })
        ),
        OutputFormat::Table => {
            println!();
            print!("{}", summary_table(&rows));
        }
    }
    Ok(())
}

struct SummaryRow<'a> {
    progress: &'a NodeProgress,
    ready: bool,
    waiting_for: Option<&'a str>,
}

impl SummaryRow<'_> {
    /// The node's phase; `ready` once the coordinator has it Ready, even if the event saying
    /// so came after the last one shown.
    fn phase(&self) -> String {
        if self.ready {
            "ready".to_owned()
        } else {
            self.progress.phase.to_string()
        }
    }
}

/// NAME, ROLE, IP, PHASE, READY, and WAITING FOR when a node is not done.
fn summary_table(rows: &[SummaryRow<'_>]) -> String {
    let failed = rows.iter().any(|r| r.waiting_for.is_some());
    let mut header = vec!["NAME", "ROLE", "IP", "PHASE", "READY"];
    if failed {
        header.push("WAITING FOR");
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut row = vec![
                r.progress.name.clone(),
                r.progress.role.clone(),
                r.progress.ip.clone(),
                r.phase(),
                if r.ready { "Ready" } else { "-" }.to_owned(),
            ];
            if failed {
                row.push(r.waiting_for.unwrap_or("-").to_owned());
            }
            row
        })
        .collect();
    super::output::table(&header, &cells)
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
