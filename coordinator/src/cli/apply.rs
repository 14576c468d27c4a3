//! `homelab apply`: make Proxmox match the spec.

use std::{path::PathBuf, sync::Arc};

use serde_json::json;

use super::{
    Context, OutputFormat,
    output::{print_json, table},
};
use crate::{
    orchestrate::ClusterSettings,
    provision::{Action, Plan, PowerChange, Provisioner},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The cluster spec.
    #[arg(long, env = "HOMELAB_SPEC", default_value = "homelab.toml")]
    pub spec: PathBuf,
    /// Print the plan and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// The `homelab-agent` binary to put on each seed. Default: the one beside `homelab`.
    #[arg(long, env = "HOMELAB_AGENT_BIN", value_name = "PATH")]
    pub agent_bin: Option<PathBuf>,
}

pub(super) async fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let provisioner = Arc::new(provisioner(ctx, &args.spec, args.agent_bin.clone())?);
    let plan = provisioner.plan().await?;
    if ctx.output == OutputFormat::Table {
        print!("{}", plan_table(&plan));
    }
    if !plan.conflicts().is_empty() {
        if ctx.output == OutputFormat::Json {
            print_json(&json!({ "plan": plan, "applied": [] }))?;
        }
        anyhow::bail!(
            "VMs {:?} conflict with VMs homelab did not create; nothing was changed",
            plan.conflicts()
        );
    }
    if args.dry_run {
        if ctx.output == OutputFormat::Json {
            print_json(&json!({ "plan": plan, "applied": [] }))?;
        } else {
            println!("Dry run: nothing changed.");
        }
        return Ok(());
    }
    // The K3s side follows the spec even when no VM changes (an install_revision bump).
    record_desired_cluster(ctx, &args.spec).await?;
    if plan.is_noop() {
        if ctx.output == OutputFormat::Json {
            print_json(&json!({ "plan": plan, "applied": [] }))?;
        } else {
            println!("Proxmox matches the spec: nothing to do.");
        }
        return Ok(());
    }
    let applied = provisioner.apply(&plan).await?;
    match ctx.output {
        OutputFormat::Json => print_json(&json!({ "plan": plan, "applied": applied }))?,
        OutputFormat::Table => {
            let created = applied.iter().filter(|a| a.created).count();
            println!(
                "Applied: {created} created, {} adopted. Agents enroll and call home as their VMs boot; follow with `homelab watch`.",
                applied.len() - created
            );
        }
    }
    Ok(())
}

/// Records the spec's nodes, roles and K3s settings as the desired cluster (generating the
/// cluster's K3s tokens the first time), and asks a running daemon to act on it.
pub(super) async fn record_desired_cluster(
    ctx: &Context,
    spec_path: &std::path::Path,
) -> anyhow::Result<()> {
    let spec = crate::spec::Spec::from_file(spec_path)?;
    let nodes = ClusterSettings::desired_nodes(&spec);
    let spec_dir = spec_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let settings = ClusterSettings::from_spec(&spec.k3s, spec_dir).map_err(|e| {
        anyhow::anyhow!(
            "failed to read k3s.installer_file {:?}: {e}",
            spec.k3s
                .installer_file
                .as_deref()
                .unwrap_or(std::path::Path::new(""))
        )
    })?;
    crate::orchestrate::record_desired(&mut ctx.state.open_store()?, &nodes, &settings)?;
    match ctx.state.lock_daemon() {
        // No daemon: it orchestrates from the database when it starts and agents call in.
        Ok(_lock) => {}
        Err(crate::state_dir::StateDirError::DaemonRunning(_)) => {
            let mut admin = super::client::admin_client(ctx).await?;
            admin
                .reconcile(homelab_proto::v1::ReconcileRequest {})
                .await
                .map_err(|s| {
                    anyhow::anyhow!("the coordinator refused to reconcile: {}", s.message())
                })?;
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// A provisioner for the spec at `spec_path`, printing progress to stderr.
pub(super) fn provisioner(
    ctx: &Context,
    spec_path: &std::path::Path,
    agent_bin: Option<PathBuf>,
) -> anyhow::Result<Provisioner> {
    let json = ctx.output == OutputFormat::Json;
    provisioner_reporting(
        ctx,
        spec_path,
        agent_bin,
        Box::new(move |p| {
            if json {
                eprintln!("{}", serde_json::to_string(&p).unwrap_or_default());
            } else {
                eprintln!("{:<12}  {:<9}  {}", p.vm, p.step, p.message);
            }
        }),
    )
}

/// A provisioner for the spec at `spec_path` that hands its progress to `progress`.
pub(super) fn provisioner_reporting(
    ctx: &Context,
    spec_path: &std::path::Path,
    agent_bin: Option<PathBuf>,
    progress: Box<dyn Fn(crate::provision::Progress) + Send + Sync>,
) -> anyhow::Result<Provisioner> {
    let spec = crate::spec::Spec::from_file(spec_path)?;
    let spec_dir = spec_path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(std::path::Path::new("."))
        .to_path_buf();
    let config = crate::provision::client_for(&spec, &spec_dir)?;
    let client = crate::proxmox::Client::new(config)?;
    let agent_bin = match agent_bin {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("homelab-agent"),
    };
    Ok(Provisioner::new(
        spec,
        spec_dir,
        client,
        ctx.state.clone(),
        agent_bin,
        progress,
    )?)
}

pub(super) fn plan_table(plan: &Plan) -> String {
    let rows: Vec<Vec<String>> = plan
        .vms
        .iter()
        .map(|vm| match &vm.action {
            Action::Create => vec![
                vm.name.clone(),
                "create".into(),
                "-".into(),
                format!("clone template {}", plan.template_vmid),
            ],
            Action::Adopt {
                vmid,
                status,
                drift,
                power,
                remove_seed,
                reseed,
                ..
            } => {
                let mut notes = Vec::new();
                for d in drift {
                    notes.push(format!(
                        "drift {}: spec {}, VM {}",
                        d.field, d.spec, d.actual
                    ));
                }
                match power {
                    Some(PowerChange::Start) => notes.push("start".into()),
                    Some(PowerChange::Stop) => notes.push("shut down".into()),
                    None => {}
                }
                if *remove_seed {
                    notes.push("remove the seed (node enrolled)".into());
                }
                if *reseed {
                    notes.push("seed and configure (an earlier apply stopped before)".into());
                }
                if notes.is_empty() {
                    notes.push("up to date".into());
                }
                vec![
                    vm.name.clone(),
                    "adopt".into(),
                    format!("{vmid} ({status})"),
                    notes.join("; "),
                ]
            }
            Action::Conflict { vmid, reason } => vec![
                vm.name.clone(),
                "CONFLICT".into(),
                vmid.to_string(),
                reason.clone(),
            ],
        })
        .collect();
    table(&["NAME", "ACTION", "VMID", "DETAILS"], &rows)
}
