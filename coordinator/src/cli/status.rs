//! `homelab status`, `homelab nodes` and `homelab watch`: read-only views through the
//! `Status` API.

use homelab_proto::v1::{self as pb, GetClusterRequest, ListNodesRequest, WatchEventsRequest};
use serde_json::json;

use super::{
    Context, OutputFormat, client,
    output::{print_json, table, timestamp},
};

pub(super) async fn status(ctx: &Context) -> anyhow::Result<()> {
    let mut status = client::status_client(ctx).await?;
    let cluster = status
        .get_cluster(GetClusterRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let nodes = status
        .list_nodes(ListNodesRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner()
        .nodes;
    match ctx.output {
        OutputFormat::Json => print_json(&json!({
            "coordinator": {
                "url": client::coordinator_url(ctx),
                "version": cluster.coordinator_version,
                "ca_fingerprint_sha256": cluster.ca_fingerprint_sha256,
                "started_at_unix": cluster.started_at_unix,
            },
            "nodes_total": cluster.nodes_total,
            "nodes_connected": cluster.nodes_connected,
            "nodes_revoked": cluster.nodes_revoked,
            "nodes": nodes.iter().map(node_json).collect::<Vec<_>>(),
        }))?,
        OutputFormat::Table => {
            println!(
                "Coordinator     {} (v{})",
                client::coordinator_url(ctx),
                cluster.coordinator_version
            );
            println!("Started         {}", timestamp(cluster.started_at_unix));
            println!("CA fingerprint  {}", cluster.ca_fingerprint_sha256);
            println!(
                "Nodes           {} total, {} connected, {} revoked",
                cluster.nodes_total, cluster.nodes_connected, cluster.nodes_revoked
            );
            if !nodes.is_empty() {
                println!();
                print!("{}", nodes_table(&nodes));
            }
        }
    }
    Ok(())
}

pub(super) async fn nodes(ctx: &Context) -> anyhow::Result<()> {
    let nodes = client::status_client(ctx)
        .await?
        .list_nodes(ListNodesRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner()
        .nodes;
    match ctx.output {
        OutputFormat::Json => print_json(&nodes.iter().map(node_json).collect::<Vec<_>>())?,
        OutputFormat::Table => print!("{}", nodes_table(&nodes)),
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// Only events of this node.
    #[arg(long)]
    node: Option<String>,
    /// Replay events after this id first (0: everything kept). Default: only new events.
    #[arg(long)]
    after: Option<i64>,
}

pub(super) async fn watch(ctx: &Context, args: WatchArgs) -> anyhow::Result<()> {
    let mut status = client::status_client(ctx).await?;
    // A negative id asks for new events only.
    let after_id = args.after.unwrap_or(-1);
    let mut stream = status
        .watch_events(WatchEventsRequest {
            after_id,
            node: args.node.unwrap_or_default(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    loop {
        let event = match stream.message().await {
            Ok(Some(event)) => event,
            Ok(None) => return Ok(()),
            Err(s) => anyhow::bail!("event stream ended: {}", s.message()),
        };
        print_event(ctx.output, &event)?;
    }
}

pub(super) fn print_event(output: OutputFormat, event: &pb::Event) -> anyhow::Result<()> {
    match output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string(&json!({
                "id": event.id, "at_unix_ms": event.at_unix_ms, "node": event.node,
                "kind": event.kind, "message": event.message,
            }))?
        ),
        OutputFormat::Table => println!(
            "{}  {:<12}  {:<26}  {}",
            timestamp(event.at_unix_ms / 1000),
            if event.node.is_empty() {
                "-"
            } else {
                &event.node
            },
            event.kind,
            event.message
        ),
    }
    Ok(())
}

fn state_name(state: i32) -> &'static str {
    match pb::NodeState::try_from(state) {
        Ok(pb::NodeState::Pending) => "pending",
        Ok(pb::NodeState::Enrolled) => "enrolled",
        Ok(pb::NodeState::Revoked) => "revoked",
        _ => "unknown",
    }
}

pub(super) fn nodes_table(nodes: &[pb::Node]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let facts = n.facts.clone().unwrap_or_default();
            let step = n.last_phase.as_ref().map_or_else(
                || "-".into(),
                |p| {
                    let outcome = match pb::StepOutcome::try_from(p.outcome) {
                        Ok(pb::StepOutcome::Started) => "running",
                        Ok(pb::StepOutcome::Succeeded) => "done",
                        Ok(pb::StepOutcome::Failed) => "FAILED",
                        _ => "?",
                    };
                    format!("{}/{} #{} {outcome}", p.phase, p.step, p.attempt)
                },
            );
            vec![
                n.name.clone(),
                if n.role.is_empty() {
                    "-".into()
                } else {
                    n.role.clone()
                },
                state_name(n.state).to_owned(),
                if n.connected { "connected" } else { "-" }.to_owned(),
                if n.ready { "Ready" } else { "-" }.to_owned(),
                facts
                    .ip_addresses
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "-".into()),
                step,
                if n.last_error.is_empty() {
                    "-".into()
                } else {
                    n.last_error.clone()
                },
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "ROLE",
            "STATE",
            "LINK",
            "READY",
            "ADDRESS",
            "STEP",
            "LAST ERROR",
        ],
        &rows,
    )
}

fn node_json(n: &pb::Node) -> serde_json::Value {
    let facts = n.facts.clone().unwrap_or_default();
    json!({
        "name": n.name,
        "role": n.role,
        "state": state_name(n.state),
        "connected": n.connected,
        "ready": n.ready,
        "last_error": n.last_error,
        "facts": {
            "hostname": facts.hostname,
            "machine_id": facts.machine_id,
            "product_uuid": facts.product_uuid,
            "ip_addresses": facts.ip_addresses,
            "os": facts.os,
            "agent_version": facts.agent_version,
        },
        "enrolled_at_unix": n.enrolled_at_unix,
        "last_seen_unix": n.last_seen_unix,
        "certificate_serial": n.certificate_serial,
        "certificate_not_after_unix": n.certificate_not_after_unix,
        "last_phase": n.last_phase.as_ref().map(|p| json!({
            "phase": p.phase, "step": p.step, "attempt": p.attempt, "message": p.message,
            "outcome": match pb::StepOutcome::try_from(p.outcome) {
                Ok(pb::StepOutcome::Started) => "started",
                Ok(pb::StepOutcome::Succeeded) => "succeeded",
                Ok(pb::StepOutcome::Failed) => "failed",
                _ => "unknown",
            },
        })),
        "last_health": n.last_health.as_ref().map(|h| json!({
            "healthy": h.healthy, "detail": h.detail, "observed_at_unix": h.observed_at_unix,
        })),
    })
}
