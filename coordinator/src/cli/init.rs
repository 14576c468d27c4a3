//! `homelab init`: the state directory, CA and certificates.

use super::{Context, OutputFormat, output::print_json};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// An extra name or IP address for the serving certificate: the address agents dial.
    /// Repeat for several. localhost, 127.0.0.1 and ::1 are always included.
    #[arg(long = "san", value_name = "NAME_OR_IP")]
    sans: Vec<String>,

    /// Replace an existing CA. Every enrolled node must then enroll again.
    #[arg(long)]
    force: bool,
}

pub(super) fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let report = ctx.state.init(&args.sans, args.force)?;
    match ctx.output {
        OutputFormat::Json => print_json(&report)?,
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
            println!("Next: `homelab serve`, then `homelab token create NODE` for each node.");
        }
    }
    Ok(())
}
