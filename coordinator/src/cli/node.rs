//! `homelab node revoke|renew`.

use anyhow::Context as _;
use homelab_proto::v1::{RequestRenewalRequest, RevokeNodeRequest};
use serde::Serialize;

use super::{Context, OutputFormat, client, output::print_json};
use crate::{core::now_unix, state_dir::StateDirError};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Refuse every certificate of NODE from now on and cut its link. To let the node back,
    /// create a new token for it and enroll again.
    Revoke {
        /// The node to revoke.
        node: String,
    },
    /// Ask a connected NODE to renew its certificate now.
    Renew {
        /// The node to renew.
        node: String,
    },
    /// Take NODE out of the cluster: drain it through another server, uninstall K3s on it,
    /// delete its Node object, and drop it from the desired cluster. Remove it from the spec
    /// too, or the next `homelab apply` brings it back.
    Remove {
        /// The node to remove.
        node: String,
        /// Remove a server even if the remaining servers would lose etcd quorum.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Serialize)]
struct Revoked {
    node: String,
    certificates_revoked: u32,
    stream_cut: bool,
    via: &'static str,
}

pub(super) async fn run(ctx: &Context, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Revoke { node } => revoke(ctx, node).await,
        Command::Remove { node, force } => {
            let response = client::admin_client(ctx)
                .await?
                .remove_node(homelab_proto::v1::RemoveNodeRequest {
                    name: node.clone(),
                    force,
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            match ctx.output {
                OutputFormat::Json => print_json(&serde_json::json!({
                    "node": node,
                    "drained": response.drained,
                    "uninstalled": response.uninstalled,
                    "node_deleted": response.node_deleted,
                    "warnings": response.warnings,
                }))?,
                OutputFormat::Table => {
                    println!(
                        "Removed {node}: drained {}, K3s uninstalled {}, Node object deleted {}.",
                        yes_no(response.drained),
                        yes_no(response.uninstalled),
                        yes_no(response.node_deleted)
                    );
                    for warning in &response.warnings {
                        println!("  warning: {warning}");
                    }
                }
            }
            Ok(())
        }
        Command::Renew { node } => {
            let mut admin = client::admin_client(ctx).await?;
            let revision = admin
                .request_renewal(RequestRenewalRequest { name: node.clone() })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner()
                .revision;
            match ctx.output {
                OutputFormat::Json => {
                    print_json(&serde_json::json!({"node": node, "revision": revision}))?
                }
                OutputFormat::Table => println!(
                    "Asked {node} to renew its certificate (directive revision {revision})."
                ),
            }
            Ok(())
        }
    }
}

/// Revokes through the daemon, so the link is cut at once. When no daemon holds the state
/// directory, writes the revocation to the database directly; the daemon refuses the node's
/// certificates when it starts.
async fn revoke(ctx: &Context, node: String) -> anyhow::Result<()> {
    let offline = match ctx.state.lock_daemon() {
        Ok(lock) => Some(lock),
        Err(StateDirError::DaemonRunning(_)) => None,
        Err(e) => return Err(e.into()),
    };
    // With an explicit --coordinator the operator means that daemon, wherever it runs.
    let result = if let (Some(_lock), None) = (&offline, &ctx.coordinator) {
        let mut store = ctx.state.open_store()?;
        let revoked = store
            .revoke_node(&node, now_unix())
            .with_context(|| format!("failed to revoke {node}"))?;
        store.append_event(
            &node,
            "node.revoked",
            &format!("{revoked} certificate(s) revoked while the coordinator was stopped"),
            crate::core::now_unix_ms(),
        )?;
        Revoked {
            node,
            certificates_revoked: revoked,
            stream_cut: false,
            via: "database",
        }
    } else {
        let mut admin = client::admin_client(ctx).await?;
        let response = admin
            .revoke_node(RevokeNodeRequest { name: node.clone() })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        Revoked {
            node,
            certificates_revoked: response.certificates_revoked,
            stream_cut: response.stream_cut,
            via: "coordinator",
        }
    };
    match ctx.output {
        OutputFormat::Json => print_json(&result)?,
        OutputFormat::Table => println!(
            "Revoked {}: {} certificate(s) refused from now on; link cut: {}.",
            result.node,
            result.certificates_revoked,
            if result.stream_cut {
                "yes"
            } else {
                "no (not connected)"
            }
        ),
    }
    Ok(())
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}
