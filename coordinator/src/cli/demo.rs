//! `homelab demo`: a coordinator and three real `homelab-agent` processes on loopback. The
//! agents enroll with one-time tokens, connect over mutual TLS, receive their K3s roles (the
//! server first, the agents once it is Ready) and install K3s, and the operator watches it
//! happen through the same `Status` API that `homelab watch` uses.
//!
//! K3s itself cannot run here, so each agent's host root holds a stand-in install.sh and
//! systemctl (the fakes the tests use, `tests/testdata/k3s/`) that honour the real interfaces
//! and share one fake cluster. Everything else is the production code path.

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

use super::{Context, OutputFormat, client, progress::Display, status};
use crate::{
    core::{Settings, now_unix, now_unix_ms},
    fsutil,
    orchestrate::{ClusterSettings, DesiredNode, record_desired},
    pki::NodeName,
    spec::Role,
    state_dir::StateDir,
    token::EnrollmentToken,
};

/// Marks a directory as the demo's own, so re-running may wipe it and nothing else.
const MARKER: &str = ".homelab-demo";
/// The first user's node names.
const NODE_NAMES: &[&str] = &["k3s-control", "k3s-node-1", "k3s-node-2"];
/// The stand-ins for install.sh and systemctl, placed in each demo node's host root.
const FAKE_INSTALLER: &str = include_str!("../../../tests/testdata/k3s/fake-install.sh");
const FAKE_SYSTEMCTL: &str = include_str!("../../../tests/testdata/k3s/fake-systemctl");
/// Where the fake installer sits on each demo node.
const INSTALLER_PATH: &str = "/opt/homelab-demo/install.sh";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the demo keeps its state (wiped at each run). Default: a `homelab-demo`
    /// directory beside the normal state directory.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,

    /// The `homelab-agent` binary. Default: the one beside this `homelab`.
    #[arg(long, value_name = "PATH")]
    agent_bin: Option<PathBuf>,

    /// The Proxmox VE simulator binary (`pve-sim`). Default: the one beside this `homelab`;
    /// without it the demo skips the Proxmox part.
    #[arg(long, value_name = "PATH")]
    sim_bin: Option<PathBuf>,

    /// Stop once every node is Ready, instead of running until Ctrl-C.
    #[arg(long)]
    exit_when_ready: bool,

    /// Give up if the nodes are not all Ready within this time.
    #[arg(long, default_value = "90s", value_parser = super::parse_duration)]
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
    // The desired cluster, as `homelab apply` records it: one server, two agents.
    let nodes: Vec<DesiredNode> = NODE_NAMES
        .iter()
        .zip(10u8..)
        .map(|(name, last)| DesiredNode {
            name: (*name).to_owned(),
            role: if last == 10 {
                Role::Server
            } else {
                Role::Agent
            },
            ip: std::net::Ipv4Addr::new(127, 0, 0, last),
        })
        .collect();
    {
        let mut settings =
            ClusterSettings::from_spec(&crate::spec::K3sSpec::default(), Path::new("."))?;
        settings.installer = serde_json::json!({ "file": INSTALLER_PATH });
        record_desired(&mut state.open_store()?, &nodes, &settings)?;
    }

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let serve_state = state.clone();
    let server = tokio::spawn(async move {
        let settings = Settings {
            health_interval: Duration::from_secs(2),
            ..Settings::default()
        };
        super::serve::serve_state_dir(&serve_state, listener, settings, async {
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

    // The same per-node progress as `homelab up`.
    let mut display = Display::new(ctx.output, &nodes);

    // The Proxmox part, against the simulator: clone, seed, configure and start three VMs.
    let sim_bin = match args.sim_bin {
        Some(bin) => bin,
        None => std::env::current_exe()?.with_file_name("pve-sim"),
    };
    let _sim = if sim_bin.is_file() {
        Some(
            provision_on_simulator(&mut display, &dir, &state, &sim_bin, &address.to_string())
                .await?,
        )
    } else {
        display.note(&format!(
            "No Proxmox simulator at {}: skipping the VM part.",
            sim_bin.display()
        ));
        None
    };

    // The simulator boots nothing: local agent processes stand in for the VMs.
    let mut agents = Vec::new();
    for name in NODE_NAMES {
        let node_dir = dir.join("agents").join(name);
        write_agent_files(&state, &node_dir, name, &format!("https://{address}"))?;
        agents.push(spawn_agent(&agent_bin, &node_dir)?);
    }
    display.note(&format!(
        "Started {} agents: each enrolls with its one-time token, connects over mTLS, gets its K3s role and installs it.\n",
        agents.len()
    ));

    // A node is done when it is Ready and has acknowledged its role as applied.
    let mut ready = BTreeSet::new();
    let mut applied = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + args.timeout;
    let mut redraw = tokio::time::interval(Duration::from_secs(1));
    redraw.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let outcome: anyhow::Result<()> = loop {
        if NODE_NAMES
            .iter()
            .all(|n| ready.contains(*n) && applied.contains(*n))
        {
            break Ok(());
        }
        let event = tokio::select! {
            event = tokio::time::timeout_at(deadline, events.message()) => event,
            _ = redraw.tick() => {
                display.tick();
                continue;
            }
        };
        match event {
            Err(_) => {
                let missing: Vec<_> = NODE_NAMES
                    .iter()
                    .filter(|n| !(ready.contains(**n) && applied.contains(**n)))
                    .collect();
                break Err(anyhow::anyhow!(
                    "nodes {missing:?} were not Ready with their role applied within {:?}; their logs are in {}/agents/NAME/agent.log",
                    args.timeout,
                    dir.display()
                ));
            }
            Ok(Err(status)) => {
                break Err(anyhow::anyhow!("event stream failed: {}", status.message()));
            }
            Ok(Ok(None)) => break Err(anyhow::anyhow!("event stream ended")),
            Ok(Ok(Some(event))) => {
                display.event(&event);
                if event.kind == "directive.acknowledged" && event.message.contains(" applied: k3s")
                {
                    applied.insert(event.node.clone());
                }
                if event.kind == "node.not_ready" {
                    ready.remove(&event.node);
                }
                if event.kind == "node.ready" {
                    ready.insert(event.node.clone());
                }
            }
        }
    };

    display.finish();
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
                    "All nodes are Ready with their K3s roles. In another terminal:\n  homelab --state-dir {} status\n  homelab --state-dir {} watch\nPress Ctrl-C to stop.",
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

/// Starts `pve-sim`, writes a spec for it, and applies it: the same plan and apply as
/// `homelab apply`. Returns the simulator process, which stops when dropped.
async fn provision_on_simulator(
    display: &mut Display,
    dir: &Path,
    state: &StateDir,
    sim_bin: &Path,
    coordinator: &str,
) -> anyhow::Result<Child> {
    use tokio::io::AsyncBufReadExt;
    let ca = dir.join("pve-root-ca.pem");
    let mut sim = tokio::process::Command::new(sim_bin)
        .args([
            "--clone-delay",
            "1s",
            "--start-delay",
            "500ms",
            "--upload-delay",
            "300ms",
            "--ca-out",
        ])
        .arg(&ca)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("failed to start {}", sim_bin.display()))?;
    let stdout = sim.stdout.take().context("simulator stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .context("the simulator did not start within 10 s")??
        .context("the simulator exited")?;
    let info: serde_json::Value = serde_json::from_str(&line)?;
    let field = |name: &str| {
        info[name]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("simulator did not report {name}"))
    };
    fs::write(dir.join("pve-token"), field("token_secret")?)?;
    // A placeholder key: nobody logs in to the simulated VMs.
    fs::write(
        dir.join("id_ed25519.pub"),
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG4x9kQzCxT5Tn2Z2b6T7hR2JwJxWQm0c1lq0f1p2r3s demo@homelab\n",
    )?;
    // The simulated VMs do not boot, so the seed carries a small stand-in for the agent.
    fs::write(
        dir.join("seed-agent"),
        b"homelab demo: the simulated VMs do not run this\n",
    )?;
    let spec = crate::spec::EXAMPLE
        .replace("https://192.168.0.250:8006", &field("endpoint")?)
        .replace("homelab@pve!coordinator", &field("token_id")?)
        .replace(
            "token_secret_env = \"HOMELAB_PROXMOX_TOKEN\"",
            "token_secret_file = \"pve-token\"",
        )
        .replace("~/.ssh/id_ed25519.pub", "id_ed25519.pub")
        .replace(
            "https://192.168.0.10:7443",
            &format!("https://{coordinator}"),
        );
    let spec_path = dir.join("homelab.toml");
    fs::write(&spec_path, spec)?;
    display.note(&format!(
        "Proxmox simulator at {}; applying {}:",
        field("endpoint")?,
        spec_path.display()
    ));
    let demo_ctx = Context {
        state: state.clone(),
        coordinator: None,
        output: OutputFormat::Table,
    };
    let (progress_tx, mut progress) = tokio::sync::mpsc::unbounded_channel();
    let provisioner = std::sync::Arc::new(super::apply::provisioner_reporting(
        &demo_ctx,
        &spec_path,
        Some(dir.join("seed-agent")),
        Box::new(move |p| {
            let _ = progress_tx.send(p);
        }),
    )?);
    let plan = provisioner.plan().await?;
    let mut applying = tokio::spawn({
        let provisioner = std::sync::Arc::clone(&provisioner);
        async move { provisioner.apply(&plan).await }
    });
    // The provisioner (and with it the channel's sender) lives on in this function.
    loop {
        tokio::select! {
            Some(p) = progress.recv() => display.vm(&p),
            applied = &mut applying => {
                applied.context("the provisioner task failed")??;
                break;
            }
        }
    }
    while let Ok(p) = progress.try_recv() {
        display.vm(&p);
    }
    display.applied();
    display.note("Three VMs created, seeded and started.\n");
    // Keep the simulator running for the rest of the demo.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(sim)
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
    // K3s stand-ins: the installer in the host root, systemctl beside the agent, one shared
    // fake cluster for all nodes.
    let installer = host_root.join(INSTALLER_PATH.trim_start_matches('/'));
    write_executable(&installer, FAKE_INSTALLER)?;
    let bin = node_dir.join("bin");
    write_executable(&bin.join("systemctl"), FAKE_SYSTEMCTL)?;
    let cluster = node_dir
        .parent()
        .map_or_else(|| node_dir.to_path_buf(), |p| p.join("fake-cluster"));
    fs::create_dir_all(&cluster)?;
    fs::create_dir_all(host_root.join("etc/fake-k3s"))?;
    fs::write(
        host_root.join("etc/fake-k3s/cluster-dir"),
        format!("{}\n", cluster.display()),
    )?;
    let config = format!(
        "{config}systemctl = {:?}\ncommand_path = \"{}:/usr/bin:/bin\"\nk3s_ready_timeout_seconds = 60\n",
        bin.join("systemctl"),
        bin.display()
    );
    fs::write(node_dir.join("agent.toml"), config)?;
    Ok(())
}

fn write_executable(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(path, contents)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
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
