//! Load generator: N simulated agents, each with its own key and certificate, against one
//! coordinator process over loopback mTLS. Every agent enrolls for real over its own TLS
//! connection, then holds an `AgentLink.Connect` stream on its own mTLS connection and sends
//! health reports on it. Prints a table of measured figures against the targets of the
//! reliability issue.
//!
//! Run: `cargo bench -p homelab-tests --bench load`. Knobs: `HOMELAB_BENCH_AGENTS` (10000),
//! `HOMELAB_BENCH_HEALTH_RATE` (offered health reports per second, 30000),
//! `HOMELAB_BENCH_HEALTH_SECS` (10), `HOMELAB_BENCH_LIST_CALLS` (100),
//! `HOMELAB_BENCH_CONCURRENCY` (TLS handshakes in flight, 64).
//!
//! The coordinator is this same executable started again with `HOMELAB_BENCH_COORDINATOR` set:
//! it then runs `homelab::cli::Cli` exactly as the `homelab` binary's `main` does, as
//! `homelab serve --listen 127.0.0.1:0`, in its own process, so its resident memory is
//! measured apart from the load generator's and `cargo bench` builds everything it needs.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, ExitCode, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::{channel_to, key_and_csr, wait_for};
use homelab::{state_dir::StateDir, store::Store};
use homelab_proto::v1::{
    self as pb, AgentMessage, CoordinatorMessage, EnrollRequest, GetClusterRequest,
    ListNodesRequest, agent_link_client::AgentLinkClient, agent_message::Body as Up,
    coordinator_message::Body as Down, enrollment_client::EnrollmentClient,
    status_client::StatusClient,
};
use prost::Message as _;
use tokio::{sync::mpsc, task::JoinSet};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Streaming, transport::Channel};

/// Set in the environment of the child process that plays the coordinator.
const COORDINATOR_ROLE: &str = "HOMELAB_BENCH_COORDINATOR";
/// TLS handshakes the generator keeps in flight while enrolling and connecting, unless
/// `HOMELAB_BENCH_CONCURRENCY` says otherwise.
const HANDSHAKE_CONCURRENCY: u64 = 64;
/// Upper bounds of each phase; the bench fails rather than hang.
const SETUP_LIMIT: Duration = Duration::from_secs(120);
const ENROLL_LIMIT: Duration = Duration::from_secs(300);
const CONNECT_LIMIT: Duration = Duration::from_secs(300);
const DRAIN_LIMIT: Duration = Duration::from_secs(120);
const LIST_LIMIT: Duration = Duration::from_secs(120);
/// ListNodes at 10,000 nodes is several MiB; the generator accepts up to this.
const MAX_LIST_BYTES: usize = 256 * 1024 * 1024;

fn main() -> ExitCode {
    if std::env::var_os(COORDINATOR_ROLE).is_some() {
        return homelab::cli::main();
    }
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(generate_load());
    ExitCode::SUCCESS
}

/// Each agent holds two sockets at most (enrollment, then its link) and the coordinator one
/// per agent: raise the soft limit on open files to the hard one. The coordinator inherits it.
fn raise_fd_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    )
    .expect("raise RLIMIT_NOFILE to its hard limit");
}

fn open_files_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// CPU time (user + system) of process `pid` ("self" for this one) so far.
fn cpu_time(pid: &str) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_secs_f64(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// CPU time the whole machine spent busy so far (every core; `/proc/stat`).
fn machine_busy() -> Duration {
    let stat = fs::read_to_string("/proc/stat").expect("/proc/stat");
    let ticks: u64 = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|v| v.parse::<u64>().ok())
                .enumerate()
                // user nice system idle iowait irq softirq steal: all but idle and iowait.
                .filter(|(i, _)| !matches!(i, 3 | 4) && *i < 8)
                .map(|(_, v)| v)
                .sum()
        })
        .expect("cpu line in /proc/stat");
    Duration::from_secs_f64(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// Wall and CPU time of both processes, and of everything else, since a phase began.
struct Usage {
    coordinator: String,
    wall: Instant,
    coordinator_cpu: Duration,
    generator_cpu: Duration,
    machine: Duration,
}

impl Usage {
    fn start(coordinator: &CoordinatorChild) -> Self {
        let pid = coordinator.child.id().to_string();
        Self {
            wall: Instant::now(),
            coordinator_cpu: cpu_time(&pid),
            generator_cpu: cpu_time("self"),
            machine: machine_busy(),
            coordinator: pid,
        }
    }

    /// The coordinator's CPU time since the phase began.
    fn coordinator_cpu(&self) -> Duration {
        cpu_time(&self.coordinator) - self.coordinator_cpu
    }

    /// "N s; CPU: coordinator X % of a core, load generator Y %, other processes Z %". Other
    /// processes compete for the same cores: a busy machine lowers every figure.
    fn report(&self) -> String {
        let wall = self.wall.elapsed().as_secs_f64();
        let coordinator = (cpu_time(&self.coordinator) - self.coordinator_cpu).as_secs_f64();
        let generator = (cpu_time("self") - self.generator_cpu).as_secs_f64();
        let others =
            (machine_busy().saturating_sub(self.machine)).as_secs_f64() - coordinator - generator;
        format!(
            "{wall:.1} s; CPU: coordinator {:.0} % of a core, load generator {:.0} %, other processes {:.0} %",
            100.0 * coordinator / wall,
            100.0 * generator / wall,
            100.0 * others.max(0.0) / wall,
        )
    }
}

fn knob(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

async fn within<T>(limit: Duration, phase: &str, work: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| panic!("{phase} did not finish within {limit:?}"))
}

/// The coordinator child; killed when dropped, so a failing bench leaves nothing behind.
struct CoordinatorChild {
    child: Child,
    log: PathBuf,
}

impl CoordinatorChild {
    fn start(state: &StateDir, log: PathBuf) -> Self {
        let out = fs::File::create(&log).expect("coordinator log");
        let child = Command::new(std::env::current_exe().expect("bench executable"))
            .env(COORDINATOR_ROLE, "1")
            .env_remove("HOMELAB_LOG")
            .arg("--state-dir")
            .arg(state.root())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("coordinator log"))
            .stderr(out)
            .spawn()
            .expect("start the coordinator");
        Self { child, log }
    }

    /// Resident set size in KiB, from `/proc/PID/status`.
    fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("coordinator status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().expect("coordinator status").is_none()
    }

    /// Lines of the log at WARN or ERROR.
    fn warnings(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for CoordinatorChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One simulated agent before it has a link.
struct Agent {
    name: String,
    machine_id: String,
    key_pem: String,
    csr_pem: String,
    token: String,
    chain_pem: String,
    not_after_unix: i64,
}

impl Agent {
    fn facts(&self) -> pb::NodeFacts {
        pb::NodeFacts {
            hostname: self.name.clone(),
            machine_id: self.machine_id.clone(),
            product_uuid: String::new(),
            ip_addresses: vec!["127.0.0.1".into()],
            os: "bench".into(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn health(&self, detail: &str) -> AgentMessage {
        AgentMessage {
            body: Some(Up::Health(pb::HealthReport {
                observed_at_unix: unix_ms() / 1000,
                healthy: true,
                detail: detail.into(),
                certificate_not_after_unix: self.not_after_unix,
                agent_version: env!("CARGO_PKG_VERSION").into(),
                k3s: None,
            })),
        }
    }
}

/// An agent's open link: its own mTLS connection and `Connect` stream.
struct Link {
    _client: AgentLinkClient<Channel>,
    up: mpsc::Sender<AgentMessage>,
    _down: Streaming<CoordinatorMessage>,
}

/// One row of the printed table.
struct Row {
    what: String,
    measured: String,
    target: &'static str,
    verdict: &'static str,
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

async fn generate_load() {
    let agents = usize::try_from(knob("HOMELAB_BENCH_AGENTS", 10_000)).expect("agent count");
    let offered_rate = knob("HOMELAB_BENCH_HEALTH_RATE", 30_000).max(1);
    let health_secs = knob("HOMELAB_BENCH_HEALTH_SECS", 10).max(1);
    let list_calls = usize::try_from(knob("HOMELAB_BENCH_LIST_CALLS", 100).max(1)).unwrap_or(100);
    let fd_limit = open_files_limit();
    if let Some(limit) = fd_limit {
        assert!(
            limit >= agents as u64 + 256,
            "{agents} agents need more than {limit} open files; raise `ulimit -Hn`"
        );
    }
    let mut rows: Vec<Row> = Vec::new();
    println!(
        "load: {agents} agents, health offered at {offered_rate}/s for {health_secs} s, open-file limit {fd_limit:?}"
    );

    // ---- setup: state directory, one token and one key per agent -------------------------
    let dir = tempfile::tempdir().expect("temporary directory");
    let state = StateDir::new(dir.path().join("state"));
    let agent_list = within(SETUP_LIMIT, "setup", async {
        let state = state.clone();
        tokio::task::spawn_blocking(move || prepare_agents(&state, agents))
            .await
            .expect("setup task")
    })
    .await;
    let ca_pem = fs::read_to_string(state.ca_cert()).expect("CA certificate");

    let mut coordinator = CoordinatorChild::start(&state, dir.path().join("coordinator.log"));
    let address_file = state.address_file();
    let address: std::net::SocketAddr =
        wait_for(Duration::from_secs(20), "coordinator address", || {
            fs::read_to_string(&address_file).ok()?.trim().parse().ok()
        });
    let operator = {
        let cert = fs::read_to_string(state.operator_cert()).expect("operator certificate");
        let key = fs::read_to_string(state.operator_key()).expect("operator key");
        channel_to(address, &ca_pem, Some((&cert, &key)))
            .await
            .expect("operator channel")
    };
    let mut status = StatusClient::new(operator).max_decoding_message_size(MAX_LIST_BYTES);
    let rss_idle = coordinator.rss_kib();
    println!(
        "coordinator pid {}, idle RSS {rss_idle} KiB",
        coordinator.child.id()
    );

    // ---- enrollment: each agent over its own TLS connection, as a booting VM does --------
    let usage = Usage::start(&coordinator);
    let started = Instant::now();
    let agent_list = within(
        ENROLL_LIMIT,
        "enrollment",
        enroll_all(address, &ca_pem, agent_list),
    )
    .await;
    let elapsed = started.elapsed();
    let enroll_rate = agents as f64 / elapsed.as_secs_f64();
    println!("enrolled {agents}: {}", usage.report());
    let enroll_cpu = usage.coordinator_cpu() / u32::try_from(agents).unwrap_or(u32::MAX);
    rows.push(Row {
        what: format!(
            "Enrollments ({agents}, each on a new TLS connection, {} concurrent)",
            concurrency()
        ),
        measured: format!("{enroll_rate:.0} per second (coordinator CPU {enroll_cpu:.2?} each)"),
        target: "≥ 500 per second",
        verdict: verdict(enroll_rate >= 500.0),
    });

    // ---- links: every agent holds its own mTLS connection and Connect stream --------------
    let usage = Usage::start(&coordinator);
    let started = Instant::now();
    let links = within(
        CONNECT_LIMIT,
        "connecting",
        connect_all(address, &ca_pem, &agent_list),
    )
    .await;
    let elapsed = started.elapsed();
    let cluster = status
        .get_cluster(GetClusterRequest {})
        .await
        .expect("GetCluster")
        .into_inner();
    println!(
        "connected {} links: {}; the coordinator counts {} connected",
        links.len(),
        usage.report(),
        cluster.nodes_connected
    );
    let rss_connected = coordinator.rss_kib();
    let per_agent = (rss_connected.saturating_sub(rss_idle)) as f64 / agents as f64;

    // ---- health reports: paced offered load; the coordinator's rate from its event log ----
    let usage = Usage::start(&coordinator);
    let (processed, window, offered) = within(
        Duration::from_secs(health_secs) + DRAIN_LIMIT * 2,
        "health reports",
        health_phase(&state, &agent_list, &links, offered_rate, health_secs),
    )
    .await;
    let health_rate = processed as f64 / window.as_secs_f64();
    println!("health reports: {}", usage.report());
    let health_cpu = usage.coordinator_cpu().as_secs_f64() / processed as f64;
    let rss_after_health = coordinator.rss_kib();

    // ---- ListNodes with every node enrolled and connected ---------------------------------
    let usage = Usage::start(&coordinator);
    let (first, latencies, listed, bytes) = within(LIST_LIMIT, "ListNodes", async {
        // The first call after the health phase finds every node changed since the
        // coordinator last listed (it reads and parses all of them); the calls after it read
        // only what changed. Both are reported.
        let t0 = Instant::now();
        status
            .list_nodes(ListNodesRequest {})
            .await
            .expect("ListNodes");
        let first = t0.elapsed();
        let mut latencies = Vec::with_capacity(list_calls);
        let mut listed = 0;
        let mut bytes = 0;
        for _ in 0..list_calls {
            let t0 = Instant::now();
            let response = status
                .list_nodes(ListNodesRequest {})
                .await
                .expect("ListNodes")
                .into_inner();
            latencies.push(t0.elapsed());
            listed = response.nodes.len();
            bytes = response.encoded_len();
        }
        latencies.sort();
        (first, latencies, listed, bytes)
    })
    .await;
    println!("ListNodes: {}", usage.report());
    assert_eq!(listed, agents, "ListNodes lists every node");
    let p99 = percentile(&latencies, 0.99);

    // Still everyone connected after the load?
    let after = status
        .get_cluster(GetClusterRequest {})
        .await
        .expect("GetCluster")
        .into_inner();
    assert!(coordinator.alive(), "the coordinator survived the load");

    rows.push(Row {
        what: "Agents connected at once (GetCluster.nodes_connected)".into(),
        measured: format!(
            "{} of {agents} after connecting ({:.0} links/s), {} after the load",
            cluster.nodes_connected,
            agents as f64 / elapsed.as_secs_f64(),
            after.nodes_connected
        ),
        target: "10,000",
        verdict: verdict(
            after.nodes_connected as usize == agents
                && cluster.nodes_connected as usize == agents
                && agents >= 10_000,
        ),
    });
    rows.push(Row {
        what: format!(
            "Health reports processed ({processed} in {window:.2?}; offered {offered:.0}/s)"
        ),
        measured: format!(
            "{health_rate:.0} per second (coordinator CPU {:.1} µs each)",
            health_cpu * 1e6
        ),
        target: "≥ 20,000 per second",
        verdict: verdict(health_rate >= 20_000.0),
    });
    rows.push(Row {
        what: format!(
            "Coordinator memory per connected agent (RSS {rss_idle} KiB idle, {rss_connected} KiB connected)"
        ),
        measured: format!(
            "{per_agent:.1} KiB per agent ({rss_after_health} KiB after the health phase)"
        ),
        target: "≤ 64 KiB per agent",
        verdict: verdict(per_agent <= 64.0),
    });
    rows.push(Row {
        what: format!(
            "ListNodes at {listed} nodes, all connected ({list_calls} calls after a first, {:.1} MiB each)",
            bytes as f64 / (1024.0 * 1024.0)
        ),
        measured: format!(
            "p50 {:.1?}, p99 {p99:.1?}, max {:.1?}; first call after every node changed {first:.1?}",
            percentile(&latencies, 0.5),
            latencies[latencies.len() - 1]
        ),
        target: "p99 ≤ 50 ms at 10,000",
        verdict: verdict(p99 <= Duration::from_millis(50) && listed >= 10_000),
    });

    let warnings = coordinator.warnings();
    drop(links);
    drop(coordinator);

    let what = rows
        .iter()
        .map(|r| r.what.chars().count())
        .max()
        .unwrap_or(0);
    let measured = rows
        .iter()
        .map(|r| r.measured.chars().count())
        .max()
        .unwrap_or(0);
    let target = rows
        .iter()
        .map(|r| r.target.chars().count())
        .max()
        .unwrap_or(0);
    println!();
    println!(
        "{:<what$}  {:<measured$}  {:<target$}  Verdict",
        "What", "Measured", "Target"
    );
    for r in &rows {
        println!(
            "{:<what$}  {:<measured$}  {:<target$}  {}",
            r.what, r.measured, r.target, r.verdict
        );
    }
    println!("coordinator log lines at WARN or ERROR: {}", warnings.len());
    for line in warnings.iter().take(5) {
        println!("  {line}");
    }
}

/// Initialises the state directory and makes, per agent, a token (stored as the CLI would)
/// and a key with its CSR, as each agent makes its own.
fn prepare_agents(state: &StateDir, agents: usize) -> Vec<Agent> {
    state.init(&[], false).expect("state directory");
    let mut store = state.open_store().expect("state database");
    let now = homelab::core::now_unix();
    (0..agents)
        .map(|i| {
            let name = format!("load-{i:05}");
            let token = homelab::token::EnrollmentToken::generate();
            store
                .insert_token(&token.hash(), &name, now - 10, now + 3600)
                .expect("token");
            let (key_pem, csr_pem) = key_and_csr(&name);
            Agent {
                machine_id: format!("{:032x}", i + 1),
                name,
                key_pem,
                csr_pem,
                token: token.expose().to_owned(),
                chain_pem: String::new(),
                not_after_unix: 0,
            }
        })
        .collect()
}

fn concurrency() -> u64 {
    knob("HOMELAB_BENCH_CONCURRENCY", HANDSHAKE_CONCURRENCY).max(1)
}

/// Runs `work` on every item with [`concurrency`] workers; results in item order.
async fn for_each_concurrently<T, R, F, Fut>(items: Arc<Vec<T>>, work: F) -> Vec<R>
where
    T: Send + Sync + 'static,
    R: Send + 'static,
    F: Fn(Arc<Vec<T>>, usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = R> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency() {
        let (items, next, work) = (items.clone(), next.clone(), work.clone());
        workers.spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= items.len() {
                    return done;
                }
                done.push((i, work(items.clone(), i).await));
            }
        });
    }
    let mut all = Vec::with_capacity(items.len());
    while let Some(done) = workers.join_next().await {
        all.extend(done.expect("worker"));
    }
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, r)| r).collect()
}

async fn enroll_all(address: std::net::SocketAddr, ca_pem: &str, agents: Vec<Agent>) -> Vec<Agent> {
    let ca = Arc::new(ca_pem.to_owned());
    let agents = Arc::new(agents);
    let issued = for_each_concurrently(agents.clone(), move |agents, i| {
        let ca = ca.clone();
        async move {
            let agent = &agents[i];
            let channel = channel_to(address, &ca, None)
                .await
                .expect("enrollment connection");
            let response = EnrollmentClient::new(channel)
                .enroll(EnrollRequest {
                    token: agent.token.clone(),
                    node_name: agent.name.clone(),
                    csr_pem: agent.csr_pem.clone(),
                    facts: Some(agent.facts()),
                })
                .await
                .unwrap_or_else(|e| panic!("enrolling {}: {e}", agent.name))
                .into_inner();
            (response.certificate_chain_pem, response.not_after_unix)
        }
    })
    .await;
    let agents = Arc::into_inner(agents).expect("workers done");
    agents
        .into_iter()
        .zip(issued)
        .map(|(agent, (chain_pem, not_after_unix))| Agent {
            chain_pem,
            not_after_unix,
            ..agent
        })
        .collect()
}

async fn connect_all(address: std::net::SocketAddr, ca_pem: &str, agents: &[Agent]) -> Vec<Link> {
    // The workers need owned data; identities are copied once.
    let identities: Vec<(String, String, pb::NodeFacts)> = agents
        .iter()
        .map(|a| (a.chain_pem.clone(), a.key_pem.clone(), a.facts()))
        .collect();
    let ca = Arc::new(ca_pem.to_owned());
    for_each_concurrently(Arc::new(identities), move |identities, i| {
        let ca = ca.clone();
        async move {
            let (chain, key, facts) = &identities[i];
            let channel = channel_to(address, &ca, Some((chain, key)))
                .await
                .expect("link connection");
            let mut client = AgentLinkClient::new(channel);
            let (up, rx) = mpsc::channel(8);
            up.send(AgentMessage {
                body: Some(Up::Hello(pb::Hello {
                    facts: Some(facts.clone()),
                    applied_revision: 0,
                })),
            })
            .await
            .expect("queue hello");
            let mut down = client
                .connect(ReceiverStream::new(rx))
                .await
                .expect("AgentLink.Connect")
                .into_inner();
            let first = down.message().await.expect("link stream");
            assert!(
                matches!(first.and_then(|m| m.body), Some(Down::Welcome(_))),
                "the first message is Welcome"
            );
            Link {
                _client: client,
                up,
                _down: down,
            }
        }
    })
    .await
}

/// Waits (bounded) until `count` health events whose message is `healthy: DETAIL`, with an id
/// above `after_id`, are in the coordinator's event log; returns the newest one's time (ms).
fn wait_for_health_events(store: &Store, after_id: i64, detail: &str, count: usize) -> i64 {
    let wanted = format!("healthy: {detail}");
    let mut seen = 0;
    let mut newest_ms = 0;
    let mut last_id = after_id;
    let deadline = Instant::now() + DRAIN_LIMIT;
    loop {
        let batch = store
            .events_after(last_id, None, 10_000)
            .expect("read events");
        for event in &batch {
            last_id = event.id;
            if event.kind == "node.health" && event.message == wanted {
                seen += 1;
                newest_ms = newest_ms.max(event.at_unix_ms);
            }
        }
        if seen >= count {
            return newest_ms;
        }
        assert!(
            Instant::now() < deadline,
            "only {seen} of {count} health reports {detail:?} processed within {DRAIN_LIMIT:?}"
        );
        if batch.len() < 10_000 {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Every agent sends one report first (the coordinator records the first health of a node as
/// an event; those events mark the warm-up done). Then, for `secs`, reports at `rate` in
/// total, evenly spread, with an unchanged detail (no event), and a last one with a new
/// detail: the coordinator handles each link's messages in order, so when every agent's last
/// report is in the event log, every report before it was processed. Returns (reports
/// processed in the window, from the window's start to the newest last-report event, the
/// rate the generator actually offered).
async fn health_phase(
    state: &StateDir,
    agents: &[Agent],
    links: &[Link],
    rate: u64,
    secs: u64,
) -> (u64, Duration, f64) {
    let store = state.open_store().expect("state database");
    let mark = store.newest_event_id().expect("newest event");
    for (agent, link) in agents.iter().zip(links) {
        link.up
            .send(agent.health("ok"))
            .await
            .expect("warm-up report");
    }
    let count = agents.len();
    let store = tokio::task::spawn_blocking(move || {
        wait_for_health_events(&store, mark, "ok", count);
        store
    });
    let store = store.await.expect("warm-up");
    let mark = store.newest_event_id().expect("newest event");

    let sent = Arc::new(AtomicU64::new(0));
    let period = Duration::from_secs_f64(agents.len() as f64 / rate as f64);
    let window = Duration::from_secs(secs);
    let start_ms = unix_ms();
    let start = tokio::time::Instant::now();
    let mut senders = JoinSet::new();
    for (i, (agent, link)) in agents.iter().zip(links).enumerate() {
        let up = link.up.clone();
        let ok = agent.health("ok");
        let done = agent.health("done");
        let sent = sent.clone();
        let offset = period.mul_f64(i as f64 / agents.len() as f64);
        senders.spawn(async move {
            let mut tick = tokio::time::interval_at(start + offset, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                if start.elapsed() >= window {
                    break;
                }
                if up.send(ok.clone()).await.is_err() {
                    return;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            if up.send(done).await.is_ok() {
                sent.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while let Some(done) = senders.join_next().await {
        done.expect("sender");
    }
    let offered = sent.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    let newest_ms =
        tokio::task::spawn_blocking(move || wait_for_health_events(&store, mark, "done", count))
            .await
            .expect("drain");
    let processed = sent.load(Ordering::Relaxed);
    let window = Duration::from_millis(u64::try_from(newest_ms - start_ms).unwrap_or(1).max(1));
    (processed, window, offered)
}
