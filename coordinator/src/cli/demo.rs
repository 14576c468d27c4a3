//! `homelab demo`: a coordinator and three real `homelab-agent` processes on loopback. The
//! agents enroll with one-time tokens, connect over mutual TLS, and the operator watches it
//! happen through the same `Status` API that `homelab watch` uses.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, bail};
use homelab_proto::v1::{ListNodesRequest, WatchEventsRequest};
use tokio::{net::TcpListener, process::Child, sync::oneshot};

use super::{Context, OutputFormat, client, status};
use crate::{
    core::{Settings, now_unix, now_unix_ms},
    fsutil,
    pki::NodeName,
    state_dir::StateDir,
    token::EnrollmentToken,
};

/// Marks a directory as the demo's own, so re-running may wipe it and nothing else.
const MARKER: &str = ".homelab-demo";
/// The first user's node names.
const NODE_NAMES: &[&str] = &["k3s-control", "k3s-node-1", "k3s-node-2"];

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the demo keeps its state (wiped at each run). Default: a `homelab-demo`
    /// directory beside the normal state directory.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,

    /// The `homelab-agent` binary. Default: the one beside this `homelab`.
    #[arg(long, value_name = "PATH")]
    agent_bin: Option<PathBuf>,

    /// Stop once every agent is connected, instead of running until Ctrl-C.
    #[arg(long)]
    exit_when_ready: bool,

    /// Give up if the agents are not all connected within this time.
    #[arg(long, default_value = "60s", value_parser = super::parse_duration)]
    timeout: Duration,
}

pub(super) async fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let dir = match args.dir {
        Some(dir) => dir,
        None => StateDir::default_root()?.with_file_name("homelab-demo"),
    };
    let agent_bin = match args.agent_bin {
        Some(bin) => bin,
        None => std::env::current_exe()?.with_file_name("homelab-agent"),
    };
    if !agent_bin.is_file() {
        bail!(
            "the agent binary {} does not exist; build it with `cargo build -p homelab-agent` or pass --agent-bin",
            agent_bin.display()
        );
    }
    prepare_dir(&dir)?;
    let state = StateDir::new(dir.join("coordinator"));
    state.init(&[], false)?;

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let serve_state = state.clone();
    let server = tokio::spawn(async move {
        super::serve::serve_state_dir(&serve_state, listener, Settings::default(), async {
            let _ = stop_rx.await;
        })
        .await
    });
    let demo_ctx = Context {
        state: state.clone(),
        coordinator: Some(format!("https://{address}")),
        output: ctx.output,
    };
    say(
        ctx,
        &format!(
            "Coordinator listening on https://{address} (state in {})",
            state.root().display()
        ),
    );

    // Follow events from the start, before any agent exists.
    let mut events = client::status_client(&demo_ctx)
        .await?
        .watch_events(WatchEventsRequest {
            after_id: 0,
            node: String::new(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();

    let mut agents = Vec::new();
    for name in NODE_NAMES {
        let node_dir = dir.join("agents").join(name);
        write_agent_files(&state, &node_dir, name, &format!("https://{address}"))?;
        agents.push(spawn_agent(&agent_bin, &node_dir)?);
    }
    say(
        ctx,
        &format!(
            "Started {} agents; each enrolls with its one-time token, then connects over mTLS.\n",
            agents.len()
        ),
    );

    let mut connected = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + args.timeout;
    let outcome: anyhow::Result<()> = loop {
        if connected.len() == NODE_NAMES.len() {
            break Ok(());
        }
        let event = tokio::time::timeout_at(deadline, events.message()).await;
        match event {
            Err(_) => {
                let missing: Vec<_> = NODE_NAMES
                    .iter()
                    .filter(|n| !connected.contains(**n))
                    .collect();
                break Err(anyhow::anyhow!(
                    "agents {missing:?} did not connect within {:?}; their logs are in {}/agents/NAME/agent.log",
                    args.timeout,
                    dir.display()
                ));
            }
            Ok(Err(status)) => {
                break Err(anyhow::anyhow!("event stream failed: {}", status.message()));
            }
            Ok(Ok(None)) => break Err(anyhow::anyhow!("event stream ended")),
            Ok(Ok(Some(event))) => {
                status::print_event(ctx.output, &event)?;
                if event.kind == "node.connected" {
                    connected.insert(event.node.clone());
                }
            }
        }
    };

    if outcome.is_ok() {
        let nodes = client::status_client(&demo_ctx)
            .await?
            .list_nodes(ListNodesRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner()
            .nodes;
        if ctx.output == OutputFormat::Table {
            println!();
            print!("{}", status::nodes_table(&nodes));
            println!();
        }
        if !args.exit_when_ready {
            say(
                ctx,
                &format!(
                    "All agents connected. In another terminal:\n  homelab --state-dir {} status\n  homelab --state-dir {} watch\nPress Ctrl-C to stop.",
                    state.root().display(),
                    state.root().display()
                ),
            );
            tokio::select! {
                () = super::serve::shutdown_signal() => {}
                _ = async { while let Ok(Some(event)) = events.message().await {
                    let _ = status::print_event(ctx.output, &event);
                } } => {}
            }
        }
    }

    for agent in &mut agents {
        let _ = agent.start_kill();
    }
    for agent in &mut agents {
        let _ = tokio::time::timeout(Duration::from_secs(5), agent.wait()).await;
    }
    let _ = stop_tx.send(());
    server.await.context("coordinator task panicked")??;
    outcome
}

fn say(ctx: &Context, text: &str) {
    if ctx.output == OutputFormat::Table {
        println!("{text}");
    }
}

/// Creates the demo directory, or wipes one a previous demo made. Refuses to touch a
/// directory that is not the demo's.
fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        if !dir.join(MARKER).exists() {
            bail!(
                "{} exists and was not made by `homelab demo`; pass another --dir",
                dir.display()
            );
        }
        fs::remove_dir_all(dir).with_context(|| format!("failed to clear {}", dir.display()))?;
    }
    fsutil::create_private_dir(dir)?;
    fs::write(dir.join(MARKER), "made by `homelab demo`; safe to delete\n")?;
    Ok(())
}

/// Writes what cloud-init would give a real node: agent.toml, the CA, a token (0600), and
/// a small host root with its own machine-id and hostname.
fn write_agent_files(
    state: &StateDir,
    node_dir: &Path,
    name: &str,
    url: &str,
) -> anyhow::Result<()> {
    let node = NodeName::parse(name)?;
    let host_root = node_dir.join("root");
    fs::create_dir_all(host_root.join("etc"))?;
    fs::write(host_root.join("etc/hostname"), format!("{name}\n"))?;
    fs::write(
        host_root.join("etc/machine-id"),
        format!("{}\n", hex::encode(rand::random::<[u8; 16]>())),
    )?;
    if let Ok(os) = fs::read_to_string("/etc/os-release") {
        fs::write(host_root.join("etc/os-release"), os)?;
    }
    fs::copy(state.ca_cert(), node_dir.join("ca.pem"))?;
    let token = EnrollmentToken::generate();
    let mut store = state.open_store()?;
    let now = now_unix();
    store.insert_token(&token.hash(), node.as_str(), now, now + 3600)?;
    store.append_event(
        node.as_str(),
        "token.created",
        "enrollment token created for the demo",
        now_unix_ms(),
    )?;
    fsutil::write_atomic(
        &node_dir.join("token"),
        token.expose().as_bytes(),
        fsutil::PRIVATE,
    )?;
    let config = format!(
        "coordinator_url = {url:?}\nnode_name = {name:?}\nca_cert = {:?}\ntoken_file = {:?}\nstate_dir = {:?}\nhost_root = {:?}\n",
        node_dir.join("ca.pem"),
        node_dir.join("token"),
        node_dir.join("state"),
        host_root,
    );
    fs::write(node_dir.join("agent.toml"), config)?;
    Ok(())
}

fn spawn_agent(bin: &Path, node_dir: &Path) -> anyhow::Result<Child> {
    let log = fs::File::create(node_dir.join("agent.log"))?;
    tokio::process::Command::new(bin)
        .arg("--config")
        .arg(node_dir.join("agent.toml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("failed to start {}", bin.display()))
}
