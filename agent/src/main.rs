//! `homelab-agent`: reads its config, starts logging, runs [`homelab_agent::run`].

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use homelab_agent::{AgentError, Stopped, chain, config::AgentConfig};

/// Exit code for "only an operator can change this" (sysexits EX_CONFIG): a refused token,
/// a bad config, a revoked or decommissioned node. The systemd unit does not restart on it.
const EXIT_NEEDS_OPERATOR: u8 = 78;

/// The homelab node agent. Enrolls with a one-time token, then keeps a mutual-TLS link to
/// the coordinator and carries out its directives. Normally started by systemd
/// (homelab-agent.service), configured by cloud-init.
#[derive(Debug, Parser)]
#[command(name = "homelab-agent", version)]
struct Args {
    /// The agent configuration file.
    #[arg(long, env = "HOMELAB_AGENT_CONFIG", default_value = homelab_agent::config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Override the state directory from the config.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Override the token file from the config.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Override the CA certificate from the config.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// Override the root the host facts are read under.
    #[arg(long)]
    host_root: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    homelab_agent::logging::init(std::env::var("HOMELAB_AGENT_LOG").ok().as_deref());
    let mut config = match AgentConfig::from_file(&args.config) {
        Ok(config) => config,
        Err(e) => {
            log::error!("{}", chain(&e));
            return ExitCode::from(EXIT_NEEDS_OPERATOR);
        }
    };
    config.state_dir = args.state_dir.unwrap_or(config.state_dir);
    config.token_file = args.token_file.unwrap_or(config.token_file);
    config.ca_cert = args.ca_cert.unwrap_or(config.ca_cert);
    config.host_root = args.host_root.unwrap_or(config.host_root);

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            log::error!("failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<Stopped, AgentError> =
        runtime.block_on(homelab_agent::run(config, shutdown_signal(), || {
            // Tell systemd (Type=notify) the agent is up; a no-op when not under systemd.
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        }));
    match result {
        Ok(Stopped::Shutdown) => ExitCode::SUCCESS,
        Ok(Stopped::Decommissioned) => {
            log::info!("decommissioned; not restarting");
            ExitCode::from(EXIT_NEEDS_OPERATOR)
        }
        Err(e) => {
            log::error!("{}", chain(&e));
            if e.needs_operator() {
                ExitCode::from(EXIT_NEEDS_OPERATOR)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
