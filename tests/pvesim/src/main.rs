//! `pve-sim`: runs the Proxmox VE simulator for demos and manual testing.
//!
//! Prints one JSON line (`url`, `endpoint`, `fingerprint`, `ca_pem_path`, `token_id`,
//! `token_secret`) once listening, then serves until SIGINT or SIGTERM. It binds only the
//! `--listen` address. With `--state FILE` it keeps the cluster in FILE and resumes from it.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use pve_sim::{SimConfig, Timing, parse_duration};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(version, about = "A loopback Proxmox VE API simulator")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write the CA certificate here (default: a temporary file removed at exit).
    #[arg(long)]
    ca_out: Option<PathBuf>,
    /// Start from realistic task durations instead of zero.
    #[arg(long)]
    realistic: bool,
    /// Linked clone duration, e.g. `2s`.
    #[arg(long, value_parser = parse_duration)]
    clone_delay: Option<Duration>,
    /// Full clone duration.
    #[arg(long, value_parser = parse_duration)]
    full_clone_delay: Option<Duration>,
    /// `qmstart` duration.
    #[arg(long, value_parser = parse_duration)]
    start_delay: Option<Duration>,
    /// `qmstop` duration.
    #[arg(long, value_parser = parse_duration)]
    stop_delay: Option<Duration>,
    /// `qmshutdown` duration.
    #[arg(long, value_parser = parse_duration)]
    shutdown_delay: Option<Duration>,
    /// `qmdestroy` duration.
    #[arg(long, value_parser = parse_duration)]
    destroy_delay: Option<Duration>,
    /// `qmconfig` duration.
    #[arg(long, value_parser = parse_duration)]
    config_delay: Option<Duration>,
    /// `resize` duration.
    #[arg(long, value_parser = parse_duration)]
    resize_delay: Option<Duration>,
    /// `imgcopy` (upload) duration.
    #[arg(long, value_parser = parse_duration)]
    upload_delay: Option<Duration>,
    /// `imgdel` duration.
    #[arg(long, value_parser = parse_duration)]
    volume_delete_delay: Option<Duration>,
    /// Time from VM start until the guest agent answers.
    #[arg(long, value_parser = parse_duration)]
    agent_delay: Option<Duration>,
    /// Delay before every 401.
    #[arg(long, value_parser = parse_duration)]
    auth_delay: Option<Duration>,
    /// How long a clone waits for a storage slot.
    #[arg(long, value_parser = parse_duration)]
    storage_lock_timeout: Option<Duration>,
    /// Clones allowed to allocate on one storage at once.
    #[arg(long)]
    clone_limit: Option<usize>,
    /// Status and log polls of a new task that answer `no such task`.
    #[arg(long, default_value_t = 0)]
    invisible_polls: u32,
    /// Serve pre-2025 error bodies (no `message`).
    #[arg(long)]
    legacy_errors: bool,
    /// Largest non-upload body in bytes.
    #[arg(long, default_value_t = pve_sim::config::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Fail ISO uploads without `CD001` at offset 32769.
    #[arg(long)]
    check_iso_magic: bool,
    /// Resource pools that exist.
    #[arg(long = "pool")]
    pools: Vec<String>,
    /// Keep the cluster (certificate, VMs, volumes, tasks) in this file and start from it
    /// when it exists, so a restart behaves like a restarted pveproxy.
    #[arg(long)]
    state: Option<PathBuf>,
}

impl Args {
    fn config(&self) -> SimConfig {
        let mut timing = if self.realistic {
            Timing::realistic()
        } else {
            Timing::default()
        };
        let overrides = [
            (self.clone_delay, &mut timing.clone),
            (self.full_clone_delay, &mut timing.full_clone),
            (self.start_delay, &mut timing.start),
            (self.stop_delay, &mut timing.stop),
            (self.shutdown_delay, &mut timing.shutdown),
            (self.destroy_delay, &mut timing.destroy),
            (self.config_delay, &mut timing.config),
            (self.resize_delay, &mut timing.resize),
            (self.upload_delay, &mut timing.upload),
            (self.volume_delete_delay, &mut timing.volume_delete),
            (self.agent_delay, &mut timing.agent_ready),
            (self.auth_delay, &mut timing.auth_failure_delay),
            (self.storage_lock_timeout, &mut timing.storage_lock_timeout),
        ];
        for (value, slot) in overrides {
            if let Some(value) = value {
                *slot = value;
            }
        }
        SimConfig {
            timing,
            clone_limit_per_storage: self.clone_limit,
            task_invisible_polls: self.invisible_polls,
            legacy_errors: self.legacy_errors,
            max_body_bytes: self.max_body_bytes,
            check_iso_magic: self.check_iso_magic,
            pools: self.pools.clone(),
            state_file: self.state.clone(),
            ..SimConfig::default()
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("pve_sim=info")),
        )
        .init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("pve-sim: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("failed to bind {}", args.listen))?;
    let sim = pve_sim::start_with_listener(listener, args.config()).await?;

    // Keep the temporary file alive until exit; it is removed when dropped.
    let (ca_path, _ca_file) = match &args.ca_out {
        Some(path) => {
            std::fs::write(path, sim.ca_pem())
                .with_context(|| format!("failed to write {}", path.display()))?;
            (path.clone(), None)
        }
        None => {
            let mut file = tempfile::Builder::new()
                .prefix("pve-sim-ca-")
                .suffix(".pem")
                .tempfile()
                .context("failed to create the CA temp file")?;
            file.write_all(sim.ca_pem().as_bytes())
                .context("failed to write the CA temp file")?;
            (file.path().to_path_buf(), Some(file))
        }
    };
    let line = serde_json::json!({
        "url": sim.base_url(),
        "endpoint": sim.endpoint(),
        "fingerprint": sim.fingerprint(),
        "ca_pem_path": ca_path,
        "token_id": sim.token_id(),
        "token_secret": sim.token_secret(),
    });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").context("failed to write to stdout")?;
    stdout.flush().context("failed to flush stdout")?;
    drop(stdout);

    let mut term = signal(SignalKind::terminate()).context("failed to watch SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("failed to watch SIGINT")?,
        _ = term.recv() => {}
    }
    sim.shutdown().await;
    Ok(())
}
