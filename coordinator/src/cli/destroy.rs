//! `homelab destroy`: delete the spec's VMs and their seeds.

use std::{io::IsTerminal, path::PathBuf};

use super::{Context, OutputFormat, apply::provisioner, output::print_json};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only these VMs; default: every VM of the spec.
    nodes: Vec<String>,
    /// The cluster spec.
    #[arg(long, env = "HOMELAB_SPEC", default_value = "homelab.toml")]
    spec: PathBuf,
    /// Do not ask for confirmation (needed when stdin is not a terminal).
    #[arg(long, short)]
    yes: bool,
}

pub(super) async fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let provisioner = provisioner(ctx, &args.spec, None)?;
    if !args.yes {
        let what = if args.nodes.is_empty() {
            "every VM of the spec".to_owned()
        } else {
            args.nodes.join(", ")
        };
        if !std::io::stdin().is_terminal() {
            anyhow::bail!("refusing to destroy {what} without --yes: stdin is not a terminal");
        }
        eprint!("Destroy {what}, with their disks? This cannot be undone. Type 'yes': ");
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if answer.trim() != "yes" {
            anyhow::bail!("not confirmed; nothing was destroyed");
        }
    }
    let destroyed = provisioner.destroy(&args.nodes).await?;
    // A rebuilt VM starts K3s from scratch: forget what the old one had.
    {
        let mut store = ctx.state.open_store()?;
        for vm in destroyed.iter().filter(|d| d.vmid.is_some()) {
            store.forget_k3s_node(&vm.name)?;
        }
    }
    match ctx.output {
        OutputFormat::Json => print_json(&destroyed)?,
        OutputFormat::Table => {
            for vm in &destroyed {
                match vm.vmid {
                    Some(vmid) => println!("{}: VMID {vmid} destroyed", vm.name),
                    None => println!("{}: already absent", vm.name),
                }
            }
        }
    }
    Ok(())
}
