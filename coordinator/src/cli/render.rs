//! `homelab render`: write a node's seed files and ISO, for inspection or for machines
//! outside Proxmox.

use std::path::PathBuf;

use anyhow::Context as _;

use super::{Context, OutputFormat, apply::provisioner, output::print_json};
use crate::{fsutil, seed::InterfaceMatch};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The node (a VM of the spec).
    node: String,
    /// Directory to write user-data, meta-data, network-config and seed.iso into.
    #[arg(long)]
    out: PathBuf,
    /// The cluster spec.
    #[arg(long, env = "HOMELAB_SPEC", default_value = "homelab.toml")]
    spec: PathBuf,
    /// Match the network interface by this MAC address.
    #[arg(long, conflicts_with = "interface")]
    mac: Option<String>,
    /// Match the network interface by this name (Proxmox virtio NICs are ens18 on Ubuntu).
    #[arg(long, default_value = "ens18")]
    interface: String,
    /// The `homelab-agent` binary to put on the seed. Default: the one beside `homelab`.
    #[arg(long, env = "HOMELAB_AGENT_BIN", value_name = "PATH")]
    agent_bin: Option<PathBuf>,
}

pub(super) async fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let spec = crate::spec::Spec::from_file(&args.spec)?;
    let vm = spec
        .vm(&args.node)
        .with_context(|| format!("{} has no VM named {:?}", args.spec.display(), args.node))?
        .clone();
    let agent_bin = match &args.agent_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("homelab-agent"),
    };
    let agent = std::fs::read(&agent_bin)
        .with_context(|| format!("failed to read the agent binary {}", agent_bin.display()))?;
    let provisioner = provisioner(ctx, &args.spec, Some(agent_bin))?;
    let interface = match args.mac {
        Some(mac) => InterfaceMatch::Mac(mac),
        None => InterfaceMatch::Name(args.interface),
    };
    let instance_id = format!(
        "iid-{}-{}",
        args.node,
        hex::encode(rand::random::<[u8; 4]>())
    );
    let seed = provisioner.render_seed(&vm, &instance_id, interface)?;
    fsutil::create_private_dir(&args.out)?;
    for (name, data) in seed.files() {
        // user-data holds the one-time token.
        fsutil::write_atomic(&args.out.join(name), data, fsutil::PRIVATE)?;
    }
    let iso = seed.iso(&agent)?;
    fsutil::write_atomic(&args.out.join("seed.iso"), &iso, fsutil::PRIVATE)?;
    // The seed carries a live token: a machine booted from it must also get its role, so the
    // spec's cluster becomes the desired one, as `apply` records it.
    super::apply::record_desired_cluster(ctx, &args.spec).await?;
    match ctx.output {
        OutputFormat::Json => print_json(&serde_json::json!({
            "node": args.node, "out": args.out, "instance_id": instance_id, "iso_bytes": iso.len(),
        }))?,
        OutputFormat::Table => println!(
            "Wrote user-data, meta-data, network-config and seed.iso ({} KiB) to {} (0600: user-data holds a one-time token valid 24 h).",
            iso.len() / 1024,
            args.out.display()
        ),
    }
    Ok(())
}
