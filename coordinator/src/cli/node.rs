//! `homelab node revoke|renew`.

use anyhow::Context as _;
use homelab_proto::v1::{RequestRenewalRequest, RevokeNodeRequest};
use serde::Serialize;

use super::{Context, OutputFormat, client, output::print_json};
use crate::core::now_unix;

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

/// Revokes through the daemon, so the link is cut at once; when no daemon is running, writes
/// the revocation to the database directly, and the daemon refuses the node when it starts.
async fn revoke(ctx: &Context, node: String) -> anyhow::Result<()> {
    let result = match client::admin_client(ctx).await {
        Ok(mut admin) => {
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
        }
        Err(e) => {
            tracing::debug!(error = %format!("{e:#}"), "coordinator unreachable; revoking offline");
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
