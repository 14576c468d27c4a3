//! `homelab kubeconfig`: the cluster's admin kubeconfig, fetched through a server's agent.

use std::path::PathBuf;

use anyhow::Context as _;

use super::{Context, OutputFormat, client, output::print_json};
use crate::fsutil;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write it (0600). Default: ~/.kube/homelab.yaml.
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
}

pub(super) async fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let out = match args.out {
        Some(path) => path,
        None => {
            let home = std::env::var_os("HOME").context("HOME is not set; pass --out")?;
            PathBuf::from(home).join(".kube/homelab.yaml")
        }
    };
    let response = client::admin_client(ctx)
        .await?
        .get_kubeconfig(homelab_proto::v1::GetKubeconfigRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    if let Some(dir) = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        fsutil::create_private_dir(dir)?;
    }
    // Cluster-admin credentials: 0600, written atomically.
    fsutil::write_atomic(&out, response.content.as_bytes(), fsutil::PRIVATE)
        .with_context(|| format!("failed to write {}", out.display()))?;
    match ctx.output {
        OutputFormat::Json => {
            print_json(&serde_json::json!({ "path": out, "server": response.server }))?
        }
        OutputFormat::Table => println!(
            "Wrote the admin kubeconfig from {} to {} (0600). Try: KUBECONFIG={} kubectl get nodes",
            response.server,
            out.display(),
            out.display()
        ),
    }
    Ok(())
}
