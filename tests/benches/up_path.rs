//! `homelab up` against the Proxmox simulator with realistic task durations, compared with
//! the critical path: clone + boot + server ready + join. Prints, per run, the total wall time
//! of `up` (launch to exit), the critical path, the overhead (total − critical path) and where
//! the time went, then the spread over the runs. Target (reliability issue): overhead ≤ 1 s.
//!
//! Run: `cargo bench -p homelab-tests --bench up_path`. Knobs: `HOMELAB_BENCH_RUNS` (3),
//! `HOMELAB_BENCH_BOOT_MS` (3000, the time a VM takes from its `qmstart` finishing to its agent
//! starting), `HOMELAB_BENCH_UP_EVENTS` (a file to write the last run's `up` output to).
//!
//! How one run goes:
//!
//! 1. The simulator starts with [`Timing::realistic`] (linked clone 3 s, seed upload 1 s, disk
//!    resize 1 s, `qmstart` 2 s; no limit on parallel clones), and the example spec is adapted
//!    as `tests/tests/up.rs` does (simulator URL and token, the fake K3s installer).
//! 2. `homelab --output json up --listen 127.0.0.1:0` runs in its own process: this bench
//!    executable started again with `HOMELAB_BENCH_UP_ROLE=homelab`, which runs
//!    `homelab::cli::Cli` as the `homelab` binary's `main` does, so `cargo bench` builds
//!    everything it needs. It initialises the state directory and runs its coordinator in
//!    process.
//! 3. The simulator boots nothing, so the bench stands in for the guests: it watches the
//!    simulator's VMs every 5 ms, and once a VM runs (its `qmstart` task finished) it starts
//!    that node's agent (this executable again, `HOMELAB_BENCH_UP_ROLE=agent`, with a fresh
//!    token and the K3s fakes in its host root, as the `up` tests do) the boot delay later.
//! 4. When `up` exits (it must succeed), the critical path is computed from the simulator's
//!    task durations, the boot delay, and the agents' install steps as their phase events
//!    report them (first step started to `start` succeeded):
//!
//!    ```text
//!    vm        = clone + upload + resize + start            (Proxmox tasks of one creation)
//!    server    = vm + boot + install(server)                (the first server Ready)
//!    join(w)   = max(server, vm + boot) + install(w)        (each worker installed)
//!    critical  = max(server, join(w) for every worker)
//!    ```
//!
//!    Everything else is overhead: initialising, planning, seed building, waiting on tasks
//!    longer than they ran, enrollment, assignment, readiness detection, cleanup and exit.
//!    `docs/performance.md` explains the definition.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use homelab::{spec::EXAMPLE, state_dir::StateDir};
use pve_sim::{SimConfig, TaskType, Timing, VmStatus};

/// Set in the environment of the child processes: `homelab` or `agent`.
const ROLE: &str = "HOMELAB_BENCH_UP_ROLE";
const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG4x9kQzCxT5Tn2Z2b6T7hR2JwJxWQm0c1lq0f1p2r3s ops@workstation";
/// The example spec's nodes; the first is the first server.
const NAMES: [&str; 3] = ["k3s-control", "k3s-node-1", "k3s-node-2"];
const SERVER: &str = "k3s-control";
/// Upper bound of one run; the bench fails rather than hang.
const RUN_LIMIT: Duration = Duration::from_secs(180);
/// Clones the simulator lets allocate on one storage at once: Proxmox serializes allocation
/// per storage (shared/reference/proxmox-api.md §9.3 says to allow 1–2), and the coordinator
/// runs at most 2 at a time.
const CLONE_LIMIT: usize = 2;
/// How often the bench looks at the simulator's VMs and at `up`.
const WATCH_EVERY: Duration = Duration::from_millis(5);

fn main() -> ExitCode {
    match std::env::var(ROLE).as_deref() {
        Ok("homelab") => return homelab::cli::main(),
        Ok("agent") => return run_agent(),
        _ => {}
    }
    let runs = env_u64("HOMELAB_BENCH_RUNS", 3);
    let boot = Duration::from_millis(env_u64("HOMELAB_BENCH_BOOT_MS", 3000));
    let timing = Timing::realistic();
    println!(
        "simulator: linked clone {:?}, upload {:?}, resize {:?}, start {:?}, volume delete {:?}; boot {boot:?}",
        timing.clone, timing.upload, timing.resize, timing.start, timing.volume_delete
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut results = Vec::new();
    for i in 1..=runs {
        let run = measure(&runtime, &timing, boot);
        println!("\n== run {i}");
        run.print();
        results.push(run);
    }
    println!("\n== {runs} runs");
    println!("| What | min | median | max | Target |");
    println!("|---|---|---|---|---|");
    let row = |what: &str, pick: &dyn Fn(&RunResult) -> Duration, target: &str| {
        let mut values: Vec<Duration> = results.iter().map(pick).collect();
        values.sort();
        println!(
            "| {what} | {} | {} | {} | {target} |",
            secs(values[0]),
            secs(values[values.len() / 2]),
            secs(values[values.len() - 1])
        );
    };
    row("`up` total, launch to exit", &|r| r.total, "");
    row("critical path", &|r| r.critical, "");
    row("overhead", &|r| r.total.saturating_sub(r.critical), "≤ 1 s");
    ExitCode::SUCCESS
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The child playing `homelab-agent` with the config file named by its first argument: what
/// `agent/src/main.rs` does, until the bench kills it.
fn run_agent() -> ExitCode {
    let path = PathBuf::from(std::env::args_os().nth(1).expect("agent config path"));
    homelab_agent::logging::init(std::env::var("HOMELAB_AGENT_LOG").ok().as_deref());
    let config = match homelab_agent::config::AgentConfig::from_file(&path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{}", homelab_agent::chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(homelab_agent::run(
        config,
        std::future::pending::<()>(),
        || {},
    )) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", homelab_agent::chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn this_executable(role: &str) -> Command {
    let mut command = Command::new(std::env::current_exe().expect("bench executable"));
    command.env(ROLE, role);
    command
}

fn unix_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_millis(),
    )
    .expect("milliseconds fit")
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// What one node went through, as times since `up` was launched.
#[derive(Debug, Default, Clone)]
struct NodeTimes {
    /// `up` started cloning its VM (`vm.clone`).
    clone: Option<Duration>,
    /// The simulator has its VM running (seen by the bench).
    running: Option<Duration>,
    /// Its agent process started: the "boot" ended.
    booted: Option<Duration>,
    enrolled: Option<Duration>,
    assigned: Option<Duration>,
    /// Its first install step started.
    install_started: Option<Duration>,
    /// Its last `start` step succeeded.
    installed: Option<Duration>,
    /// The last time a server saw it Ready (`node.ready`).
    ready: Option<Duration>,
    /// Intrinsic: when its boot would end and when it would be installed and Ready.
    ideal_booted: Duration,
    ideal_done: Duration,
}

impl NodeTimes {
    fn install(&self) -> Duration {
        self.installed
            .zip(self.install_started)
            .map_or(Duration::ZERO, |(end, start)| end.saturating_sub(start))
    }

    /// Done as `up` counts it: Ready, and its install no longer at a step.
    fn done(&self) -> Option<Duration> {
        self.ready.max(self.installed)
    }
}

struct RunResult {
    total: Duration,
    /// When `up` printed its summary.
    summary: Duration,
    critical: Duration,
    /// Proxmox task time of one VM's creation, without waiting for a clone slot.
    vm_chain: Duration,
    vm_tasks: Vec<(TaskType, Duration)>,
    clone: Duration,
    boot: Duration,
    nodes: BTreeMap<String, NodeTimes>,
}

impl RunResult {
    fn print(&self) {
        let overhead = self.total.saturating_sub(self.critical);
        println!(
            "total {}  critical path {}  overhead {}  ({})",
            secs(self.total),
            secs(self.critical),
            secs(overhead),
            if overhead <= Duration::from_secs(1) {
                "within 1 s"
            } else {
                "MORE than 1 s"
            }
        );
        let tasks: Vec<String> = self
            .vm_tasks
            .iter()
            .map(|(kind, d)| format!("{kind:?} {}", secs(*d)))
            .collect();
        let server = &self.nodes[SERVER];
        println!(
            "intrinsic: VM {} ({}), + one clone ({}) for a VM in the second clone wave, + boot {}; \
             {SERVER} Ready at {}",
            secs(self.vm_chain),
            tasks.join(" + "),
            secs(self.clone),
            secs(self.boot),
            secs(server.ideal_done),
        );
        println!("\nper node, seconds since launch (ideal: intrinsic boot end and done):");
        println!(
            "| node | clone | VM running | booted | enrolled | assigned | install | installed | Ready | done | ideal booted | ideal done |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
        let at = |d: Option<Duration>| {
            d.map_or_else(|| "-".into(), |d| format!("{:.2}", d.as_secs_f64()))
        };
        for (name, t) in &self.nodes {
            println!(
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} |",
                at(t.clone),
                at(t.running),
                at(t.booted),
                at(t.enrolled),
                at(t.assigned),
                at(t.install_started),
                at(t.installed),
                at(t.ready),
                at(t.done()),
                t.ideal_booted.as_secs_f64(),
                t.ideal_done.as_secs_f64(),
            );
        }
        // Along the node that was done last: where its time went beyond the intrinsic.
        let (last_name, last) = self
            .nodes
            .iter()
            .max_by_key(|(_, t)| t.done())
            .expect("nodes");
        let d = |a: Option<Duration>, b: Option<Duration>| {
            a.zip(b)
                .map_or(Duration::ZERO, |(a, b)| a.saturating_sub(b))
        };
        // A worker's install waits for the server to be done (or for its own boot).
        let could_install = if last_name == SERVER {
            last.booted
        } else {
            last.booted.max(server.done())
        };
        println!("\nthe node done last ({last_name}), actual against intrinsic:");
        println!("| segment | actual | intrinsic |");
        println!("|---|---|---|");
        let rows: Vec<(String, Duration, Duration)> = vec![
            (
                "launch → VM running (init, plan, seed, Proxmox tasks)".into(),
                last.running.unwrap_or_default(),
                last.ideal_booted.saturating_sub(self.boot),
            ),
            (
                "VM running → agent started (boot)".into(),
                d(last.booted, last.running),
                self.boot,
            ),
            (
                if last_name == SERVER {
                    "agent started → install started (enroll, connect, assign)".into()
                } else {
                    format!(
                        "agent started → install started (enroll, connect, assign; \
                         waits for {SERVER} done at {})",
                        at(server.done())
                    )
                },
                d(last.install_started, last.booted),
                d(could_install, last.booted),
            ),
            ("install".into(), last.install(), last.install()),
            (
                "installed → Ready seen".into(),
                d(last.done(), last.installed),
                Duration::ZERO,
            ),
            (
                "done → summary printed (seed removal, kubeconfig)".into(),
                self.summary.saturating_sub(last.done().unwrap_or_default()),
                Duration::ZERO,
            ),
            (
                "summary → exit (coordinator stops)".into(),
                self.total.saturating_sub(self.summary),
                Duration::ZERO,
            ),
        ];
        for (what, actual, intrinsic) in rows {
            println!("| {what} | {} | {} |", secs(actual), secs(intrinsic));
        }
    }
}

fn task_time(timing: &Timing, kind: TaskType) -> Duration {
    match kind {
        TaskType::Clone => timing.clone,
        TaskType::Start => timing.start,
        TaskType::Upload => timing.upload,
        TaskType::Resize => timing.resize,
        TaskType::Config => timing.config,
        TaskType::VolumeDelete => timing.volume_delete,
        TaskType::Stop => timing.stop,
        TaskType::Shutdown => timing.shutdown,
        TaskType::Destroy => timing.destroy,
    }
}

/// One `up` from nothing to a Ready cluster.
fn measure(runtime: &tokio::runtime::Runtime, timing: &Timing, boot: Duration) -> RunResult {
    let sim = runtime
        .block_on(pve_sim::start(SimConfig {
            timing: timing.clone(),
            clone_limit_per_storage: Some(CLONE_LIMIT),
            ..SimConfig::default()
        }))
        .expect("the simulator starts");
    let dir = tempfile::tempdir().expect("temporary directory");
    let base = dir.path().to_owned();
    fs::write(base.join("pve-root-ca.pem"), sim.ca_pem()).unwrap();
    fs::write(base.join("token"), sim.token_secret()).unwrap();
    fs::write(base.join("id.pub"), KEY).unwrap();
    let spec = EXAMPLE
        .replace(
            "https://192.168.0.250:8006",
            &format!("https://{}", sim.addr()),
        )
        .replace("homelab@pve!coordinator", sim.token_id())
        .replace(
            "token_secret_env = \"HOMELAB_PROXMOX_TOKEN\"",
            "token_secret_file = \"token\"",
        )
        .replace("~/.ssh/id_ed25519.pub", "id.pub")
        .replace("https://192.168.0.10:7443", "https://127.0.0.1:7443")
        .replace("[k3s]", "[k3s]\ninstaller_file = \"install.sh\"");
    fs::copy(common::testdata("fake-install.sh"), base.join("install.sh")).unwrap();
    let spec_path = base.join("homelab.toml");
    fs::write(&spec_path, spec).unwrap();
    let agent_bin = base.join("homelab-agent");
    fs::write(&agent_bin, b"\x7fELF a stand-in agent binary").unwrap();
    let state = StateDir::new(base.join("state"));
    let cluster = base.join("fake-cluster");
    fs::create_dir_all(&cluster).unwrap();

    let launch_ms = unix_ms();
    let launch = Instant::now();
    let mut up = this_executable("homelab")
        .current_dir(&base)
        .env("HOME", &base)
        .arg("--state-dir")
        .arg(state.root())
        .args([
            "--output",
            "json",
            "up",
            "--listen",
            "127.0.0.1:0",
            "--timeout",
            "120s",
            "--spec",
        ])
        .arg(&spec_path)
        .arg("--agent-bin")
        .arg(&agent_bin)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(base.join("up.log")).unwrap())
        .spawn()
        .expect("start up");
    let stdout = up.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .map(|l| {
                let value = serde_json::from_str::<serde_json::Value>(&l)
                    .unwrap_or_else(|e| panic!("{e}: {l}"));
                (launch.elapsed(), value)
            })
            .collect::<Vec<_>>()
    });

    // Stand in for the guests: an agent starts `boot` after its VM runs.
    let mut running: BTreeMap<String, Duration> = BTreeMap::new();
    let booted: Arc<Mutex<BTreeMap<String, Duration>>> = Arc::default();
    let agents: Arc<Mutex<Vec<Child>>> = Arc::default();
    let mut booters = Vec::new();
    let total = loop {
        let now = launch.elapsed();
        assert!(now < RUN_LIMIT, "up did not finish within {RUN_LIMIT:?}");
        for vm in sim.vms() {
            let Some(name) = vm.name.filter(|n| NAMES.contains(&n.as_str())) else {
                continue;
            };
            if vm.template || vm.status != VmStatus::Running || running.contains_key(&name) {
                continue;
            }
            running.insert(name.clone(), now);
            let (base, state, cluster) = (base.clone(), state.clone(), cluster.clone());
            let (booted, agents) = (Arc::clone(&booted), Arc::clone(&agents));
            booters.push(std::thread::spawn(move || {
                let config = prepare_agent(&base, &state, &cluster, &name);
                let at = launch + now + boot;
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                let child = this_executable("agent")
                    .arg(&config)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(fs::File::create(config.with_extension("log")).unwrap())
                    .spawn()
                    .expect("start an agent");
                booted.lock().unwrap().insert(name, launch.elapsed());
                agents.lock().unwrap().push(child);
            }));
        }
        if let Some(status) = up.try_wait().expect("wait for up") {
            assert!(
                status.success(),
                "up failed: {}",
                fs::read_to_string(base.join("up.log")).unwrap_or_default()
            );
            break launch.elapsed();
        }
        std::thread::sleep(WATCH_EVERY);
    };
    for booter in booters {
        booter.join().expect("booter thread");
    }
    for mut agent in agents.lock().unwrap().drain(..) {
        let _ = agent.kill();
        let _ = agent.wait();
    }
    let received = reader.join().expect("stdout reader");
    let summary_at = received.last().map(|(at, _)| *at).unwrap_or_default();
    let lines: Vec<serde_json::Value> = received.into_iter().map(|(_, v)| v).collect();
    if let Some(path) = std::env::var_os("HOMELAB_BENCH_UP_EVENTS") {
        let text: Vec<String> = lines.iter().map(ToString::to_string).collect();
        fs::write(path, text.join("\n") + "\n").expect("write up's output");
    }
    let events = || {
        lines
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let summary = lines.last().expect("up printed something");
    assert_eq!(summary["kind"], "summary");
    assert_eq!(summary["ok"], true, "{}", events());
    assert_eq!(summary["ready"], serde_json::json!(NAMES), "{}", events());

    // The Proxmox tasks of one creation: each kind ran once per VM, or not at all.
    let tasks = sim.tasks();
    let count = |kind: TaskType| tasks.iter().filter(|t| t.kind == kind).count();
    let vm_tasks: Vec<(TaskType, Duration)> = [
        TaskType::Clone,
        TaskType::Upload,
        TaskType::Resize,
        TaskType::Start,
    ]
    .into_iter()
    .filter(|kind| count(*kind) > 0)
    .map(|kind| {
        assert_eq!(count(kind), NAMES.len(), "{kind:?} tasks: {tasks:?}");
        (kind, task_time(timing, kind))
    })
    .collect();
    runtime.block_on(sim.shutdown());

    // The nodes' times from up's JSON lines.
    let booted = booted.lock().unwrap().clone();
    let mut nodes: BTreeMap<String, NodeTimes> = NAMES
        .iter()
        .map(|n| {
            (
                (*n).to_owned(),
                NodeTimes {
                    running: running.get(*n).copied(),
                    booted: booted.get(*n).copied(),
                    ..NodeTimes::default()
                },
            )
        })
        .collect();
    for line in &lines {
        let (Some(node), Some(kind), Some(at)) = (
            line["node"].as_str(),
            line["kind"].as_str(),
            line["at_unix_ms"].as_i64(),
        ) else {
            continue;
        };
        let Some(t) = nodes.get_mut(node) else {
            continue;
        };
        let at = Duration::from_millis(u64::try_from(at - launch_ms).unwrap_or(0));
        let message = line["message"].as_str().unwrap_or_default();
        let slot = match kind {
            "vm.clone" => &mut t.clone,
            "node.enrolled" => &mut t.enrolled,
            "node.assigned" => &mut t.assigned,
            "node.ready" => {
                t.ready = Some(at);
                continue;
            }
            "node.phase" if message.starts_with("install / ") && message.ends_with(": started") => {
                &mut t.install_started
            }
            "node.phase" if message.starts_with("install / start: succeeded") => {
                // The last one counts: a retried start ends later.
                t.installed = Some(at);
                continue;
            }
            _ => continue,
        };
        slot.get_or_insert(at);
    }

    // The intrinsic schedule: clones in waves of CLONE_LIMIT, the server in the first wave, the
    // workers in the order `up` cloned them; a worker installs once the server is done.
    let vm_chain: Duration = vm_tasks.iter().map(|(_, d)| *d).sum();
    let mut order: Vec<String> = NAMES
        .iter()
        .filter(|n| **n != SERVER)
        .map(|n| (*n).to_owned())
        .collect();
    order.sort_by_key(|n| nodes[n].clone);
    order.insert(0, SERVER.to_owned());
    let mut server_done = Duration::ZERO;
    for (k, name) in order.iter().enumerate() {
        let t = nodes.get_mut(name).expect("a node of the spec");
        let wave = u32::try_from(k / CLONE_LIMIT).expect("few nodes");
        t.ideal_booted = timing.clone * wave + vm_chain + boot;
        t.ideal_done = if name == SERVER {
            t.ideal_booted + t.install()
        } else {
            t.ideal_booted.max(server_done) + t.install()
        };
        if name == SERVER {
            server_done = t.ideal_done;
        }
    }
    let critical = nodes.values().map(|t| t.ideal_done).max().expect("nodes");
    RunResult {
        total,
        summary: summary_at,
        critical,
        vm_chain,
        vm_tasks,
        clone: timing.clone,
        boot,
        nodes,
    }
}

/// The files cloud-init would write for `name`'s agent, with a fresh token (the seed's went to
/// the simulated VM, which boots nothing), and the K3s fakes under its host root. Returns the
/// config file.
fn prepare_agent(base: &Path, state: &StateDir, cluster: &Path, name: &str) -> PathBuf {
    let token = this_executable("homelab")
        .arg("--state-dir")
        .arg(state.root())
        .args(["token", "create", name])
        .output()
        .expect("token create");
    assert!(token.status.success(), "{token:?}");
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
    let (extra, _) = common::prepare_fake_k3s_at(base, name, cluster);
    let url = fs::read_to_string(state.address_file()).expect("up's coordinator address");
    let dir = base.join("agents").join(name);
    let root = dir.join("root");
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/hostname"), name).unwrap();
    fs::write(root.join("etc/machine-id"), format!("machine-{name}")).unwrap();
    fs::copy(state.ca_cert(), dir.join("ca.pem")).unwrap();
    fs::write(dir.join("token"), token).unwrap();
    let config = dir.join("agent.toml");
    fs::write(
        &config,
        format!(
            "coordinator_url = {:?}\nnode_name = {name:?}\nca_cert = {:?}\ntoken_file = {:?}\nstate_dir = {:?}\nhost_root = {:?}\n{extra}",
            format!("https://{}", url.trim()),
            dir.join("ca.pem"),
            dir.join("token"),
            dir.join("state"),
            root
        ),
    )
    .unwrap();
    config
}
