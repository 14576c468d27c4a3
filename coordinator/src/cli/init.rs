//! `homelab init`: the state directory, CA and certificates.

use std::path::PathBuf;

use super::{Context, OutputFormat, output::print_json};
use crate::fsutil;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// An extra name or IP address for the serving certificate: the address agents dial.
    /// Repeat for several. localhost, 127.0.0.1 and ::1 are always included.
    #[arg(long = "san", value_name = "NAME_OR_IP")]
    sans: Vec<String>,

    /// Replace an existing CA. Every enrolled node must then enroll again.
    #[arg(long)]
    force: bool,

    /// Where to write a commented example cluster spec, unless a file is already there.
    #[arg(long, env = "HOMELAB_SPEC", default_value = "homelab.toml")]
    spec: PathBuf,
}

pub(super) fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let report = ctx.state.init(&args.sans, args.force)?;
    let wrote_spec = !args.spec.exists();
    if wrote_spec {
        fsutil::write_atomic(&args.spec, crate::spec::EXAMPLE.as_bytes(), fsutil::PUBLIC)?;
    }
    match ctx.output {
        OutputFormat::Json => print_json(&serde_json::json!({
            "state_dir": report.state_dir,
            "ca_fingerprint_sha256": report.ca_fingerprint_sha256,
            "server_sans": report.server_sans,
            "created_ca": report.created_ca,
            "spec": args.spec,
            "wrote_example_spec": wrote_spec,
        }))?,
        OutputFormat::Table => {
            let verb = if report.created_ca {
                "created a new CA"
            } else {
                "kept the existing CA (pass --force to replace it)"
            };
            println!("Initialised {}: {verb}.", report.state_dir.display());
            println!("CA fingerprint (SHA-256): {}", report.ca_fingerprint_sha256);
            println!(
                "Serving certificate names: {}",
                report.server_sans.join(", ")
            );
            if wrote_spec {
                println!(
                    "Wrote an example cluster spec to {}: edit it, then `homelab apply --dry-run`.",
                    args.spec.display()
                );
            } else {
                println!("Kept the existing spec {}.", args.spec.display());
            }
            println!("Next: `homelab serve`, then `homelab apply`.");
        }
    }
    Ok(())
}
