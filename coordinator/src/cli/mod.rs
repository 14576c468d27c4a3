//! The `homelab` command line: one file per subcommand, each with its `Args` and `run`.

mod apply;
mod client;
mod demo;
mod destroy;
mod init;
mod kubeconfig;
mod node;
mod output;
mod progress;
mod render;
mod serve;
mod status;
mod token;
mod up;

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};

pub use output::OutputFormat;

use crate::state_dir::StateDir;

/// Turn a Proxmox VE host into a Ready K3s cluster.
///
/// The coordinator keeps its CA, certificates and state database in a state directory
/// (default ~/.local/share/homelab). Agents on the nodes enroll with a one-time token and
/// call home over mutual TLS; the operator commands below talk to the running daemon with
/// the operator certificate that `homelab init` created.
///
/// Getting started on one machine:
///   homelab init --san 192.168.0.10        # CA, certificates, database
///   homelab serve &                         # the daemon
///   homelab token create k3s-control       # a one-time token for a node's agent
///   homelab status                          # what the coordinator knows
///
/// Or watch the whole flow locally: `homelab demo`.
#[derive(Debug, Parser)]
#[command(name = "homelab", version, verbatim_doc_comment)]
pub struct Cli {
    /// The state directory.
    #[arg(long, global = true, env = "HOMELAB_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// The coordinator to talk to, for example https://192.168.0.10:7443. Default: the address
    /// the local `homelab serve` recorded in the state directory.
    #[arg(long, global = true, env = "HOMELAB_COORDINATOR", value_name = "URL")]
    pub coordinator: Option<String>,

    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,

    /// More log output (-v: debug, -vv: trace). HOMELAB_LOG takes a full filter.
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the state directory, the CA, the serving and the operator certificates.
    Init(init::Args),
    /// Run the coordinator daemon.
    Serve(serve::Args),
    /// Enrollment tokens.
    #[command(subcommand)]
    Token(token::Command),
    /// Act on one node.
    #[command(subcommand)]
    Node(node::Command),
    /// Show the cluster: coordinator, CA fingerprint, node counts.
    Status,
    /// List the nodes with their state, link and certificate.
    Nodes,
    /// Follow the event log live.
    Watch(status::WatchArgs),
    /// One command from the spec to a Ready cluster: init if needed, coordinator, apply,
    /// roles, progress, kubeconfig.
    Up(up::Args),
    /// Make Proxmox match the spec: create missing VMs, adopt existing ones, report drift.
    Apply(apply::Args),
    /// Delete the spec's VMs (or the named ones) and their seeds.
    Destroy(destroy::Args),
    /// Write a node's NoCloud seed files and ISO to a directory.
    Render(render::Args),
    /// Fetch the cluster's admin kubeconfig through a server's agent.
    Kubeconfig(kubeconfig::Args),
    /// A coordinator and three agents on loopback: watch them enroll and connect.
    Demo(demo::Args),
}

impl Cli {
    /// Whether the command draws a live progress board: `up` and `demo` with table output
    /// on a terminal.
    pub fn draws_live_progress(&self) -> bool {
        matches!(self.command, Command::Up(_) | Command::Demo(_))
            && self.output == OutputFormat::Table
            && std::io::IsTerminal::is_terminal(&std::io::stdout())
    }

    /// Runs the chosen subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        let state = StateDir::new(match &self.state_dir {
            Some(dir) => dir.clone(),
            None => StateDir::default_root()?,
        });
        let ctx = Context {
            state,
            coordinator: self.coordinator,
            output: self.output,
        };
        match self.command {
            Command::Init(args) => init::run(&ctx, args),
            Command::Serve(args) => serve::run(&ctx, args).await,
            Command::Token(cmd) => token::run(&ctx, cmd),
            Command::Node(cmd) => node::run(&ctx, cmd).await,
            Command::Status => status::status(&ctx).await,
            Command::Nodes => status::nodes(&ctx).await,
            Command::Watch(args) => status::watch(&ctx, args).await,
            Command::Up(args) => up::run(&ctx, args).await,
            Command::Apply(args) => apply::run(&ctx, args).await,
            Command::Destroy(args) => destroy::run(&ctx, args).await,
            Command::Render(args) => render::run(&ctx, args).await,
            Command::Kubeconfig(args) => kubeconfig::run(&ctx, args).await,
            Command::Demo(args) => demo::run(&ctx, args).await,
        }
    }
}

/// What every subcommand gets.
#[derive(Debug)]
pub struct Context {
    pub state: StateDir,
    pub coordinator: Option<String>,
    pub output: OutputFormat,
}

/// The whole `homelab` program: parse the arguments, start logging and the async runtime, run
/// the command, and turn its error into a message and an exit code. `main.rs` calls only this;
/// the benchmarks call it too when they run a copy of themselves as `homelab`.
pub fn main() -> std::process::ExitCode {
    use clap::Parser as _;
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.draws_live_progress());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: failed to start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli.run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Starts logging to stderr. `HOMELAB_LOG` overrides the level chosen by `-v`. `quiet`
/// (a live progress board owns the terminal) lowers the default to warnings.
pub fn init_logging(verbose: u8, quiet: bool) {
    let default = match verbose {
        0 if quiet => "warn",
        0 => "info,h2=warn,hyper=warn,tower=warn,rustls=warn",
        1 => "debug,h2=info,hyper=info,tower=info,rustls=info",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOMELAB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Parses a duration such as `90s`, `15m`, `1h` or `7d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit; use s, m, h or d (for example 1h)"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}; use s, m, h or d"
            ));
        }
    };
    if number == 0 {
        return Err(format!("{text:?} must be longer than zero"));
    }
    number
        .checked_mul(seconds)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("10").unwrap_err().contains("no unit"));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5y").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
