//! The agent's K3s executor, through its library API, against a temporary root with the fake
//! install.sh and the fake systemctl of `tests/testdata/k3s`. Both honour the real interfaces
//! (k3s.md §1): the installer reads the same `INSTALL_K3S_*` variables and writes the same
//! files, and systemctl keeps unit state and refuses a blocking start. The last test runs the
//! whole agent against an in-process coordinator and pushes an Assignment down the link.
//! The fakes also stand in for a server's cluster: the fake k3s answers `kubectl get
//! --raw=/readyz` and `get nodes -o json` from a cluster directory that several roots share,
//! so a server's health shows the CA hash, API readiness and each Node's Ready condition.
//! Loopback only (the installer URL is served on 127.0.0.1:0), every wait bounded, no sleeps
//! used to synchronise.

mod common;

use std::{
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use homelab::core::{Directive, PushOutcome, Settings};
use homelab_agent::{
    Stopped,
    config::AgentConfig,
    k3s::{
        Executor, ExecutorSettings, InstallPlan, K3sEvent, K3sHandle, K3sStatus, KubectlAction,
        KubectlCommand, Operation, PhaseEvent, Reporter, Step, StepOutcome, Submission, SystemHost,
        checkpoint::CHECKPOINT_FILE, fetch::FetchError, install::K3sInstallError,
        view::SERVER_CA_PATH,
    },
    link::k3s_health,
};
use homelab_proto::v1::NodeCondition;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::oneshot,
};

const ALL_STEPS: [Step; 5] = [
    Step::Preflight,
    Step::WriteConfig,
    Step::FetchInstaller,
    Step::RunInstaller,
    Step::Start,
];

/// Every log line of the test binary, to prove no token is logged.
static LOGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct CaptureLog;

impl log::Log for CaptureLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let line = format!("{} {}: {}", record.level(), record.target(), record.args());
        LOGS.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }
    fn flush(&self) {}
}

fn capture_logs() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        log::set_logger(&CaptureLog).expect("no other logger in this test binary");
        log::set_max_level(log::LevelFilter::Trace);
    });
}

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/k3s")
        .join(name)
}

fn copy_executable(from: &Path, to: &Path) {
    fs::create_dir_all(to.parent().unwrap()).unwrap();
    fs::copy(from, to).unwrap();
    fs::set_permissions(to, fs::Permissions::from_mode(0o755)).unwrap();
}

/// Records progress; can stop the run before a step, as a crash between two steps would.
#[derive(Default)]
struct Recorder {
    events: Vec<PhaseEvent>,
    stop_before: Option<Step>,
}

impl Reporter for Recorder {
    fn report(&mut self, event: PhaseEvent) {
        self.events.push(event);
    }
    fn proceed(&mut self, next: Step) -> bool {
        self.stop_before != Some(next)
    }
}

impl Recorder {
    fn succeeded(&self) -> Vec<Step> {
        self.events
            .iter()
            .filter(|e| e.outcome == StepOutcome::Succeeded)
            .map(|e| e.step)
            .collect()
    }
}

/// A node: a root the executor maps host paths under, its state directory, and a bin
/// directory with the fake systemctl first in `PATH`.
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Self {
        capture_logs();
        let node = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        copy_executable(&testdata("fake-systemctl"), &node.bin().join("systemctl"));
        copy_executable(
            &testdata("fake-install.sh"),
            &node.root().join("opt/k3s/install.sh"),
        );
        node
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    fn bin(&self) -> PathBuf {
        self.dir.path().join("bin")
    }
    fn host_file(&self, path: &str) -> PathBuf {
        self.root().join(path.trim_start_matches('/'))
    }

    /// A fresh executor, as after an agent restart.
    fn executor(&self, ready_timeout: Duration) -> Executor<SystemHost> {
        let host = SystemHost {
            root: self.root(),
            systemctl: self.bin().join("systemctl"),
            journalctl: None,
            path_env: format!("{}:/usr/bin:/bin", self.bin().display()),
        };
        Executor::new(
            host,
            self.state(),
            ExecutorSettings {
                ready_timeout,
                poll_interval: Duration::from_millis(10),
                install_timeout: Duration::from_secs(30),
                fetch_timeout: Duration::from_secs(10),
                ca_bundle: None,
            },
        )
    }

    /// The environment of each install.sh run, as the fake recorded it.
    fn installer_runs(&self) -> Vec<Vec<String>> {
        let log = fs::read_to_string(self.state().join("fake-install.log")).unwrap_or_default();
        let mut runs: Vec<Vec<String>> = Vec::new();
        for line in log.lines() {
            if line == "invocation" {
                runs.push(Vec::new());
            } else if let (Some(run), Some(var)) = (runs.last_mut(), line.strip_prefix("env ")) {
                run.push(var.to_owned());
            }
        }
        runs
    }

    /// systemctl calls that change something (everything but `is-active`).
    fn systemctl_mutations(&self) -> Vec<String> {
        fs::read_to_string(self.bin().join("fake-systemctl.d/calls.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.starts_with("is-active"))
            .map(str::to_owned)
            .collect()
    }

    fn unit_state(&self, unit: &str) -> String {
        fs::read_to_string(self.bin().join(format!("fake-systemctl.d/{unit}.state")))
            .unwrap_or_else(|_| "inactive".into())
            .trim()
            .to_owned()
    }

    /// Makes this node's fake K3s part of the fake cluster in `cluster`.
    fn join_fake_cluster(&self, cluster: &Path) {
        let file = self.host_file("/etc/fake-k3s/cluster-dir");
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        fs::write(file, format!("{}\n", cluster.display())).unwrap();
    }

    /// Runs the node's fake systemctl as the agent would: cleared environment, its `PATH`.
    fn systemctl(&self, args: &[&str]) {
        let status = std::process::Command::new(self.bin().join("systemctl"))
            .args(args)
            .env_clear()
            .env("PATH", format!("{}:/usr/bin:/bin", self.bin().display()))
            .status()
            .unwrap();
        assert!(status.success(), "systemctl {args:?}");
    }

    fn mode(&self, path: &str) -> u32 {
        fs::metadata(self.host_file(path))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    }
}

/// Tokens unique to each test, so a scan finds only its own.
struct Tokens {
    server: String,
    agent: String,
}

impl Tokens {
    fn new(test: &str) -> Self {
        Self {
            server: format!("srvTok3n-{test}-d41d8cd98f00b204"),
            agent: format!(
                "K10{}::node:agTok3n-{test}-e9800998ecf8427e",
                "ab12".repeat(16)
            ),
        }
    }
}

fn server_plan_json(
    revision: u64,
    install_revision: u64,
    node_ip: &str,
    installer: Value,
    tokens: &Tokens,
) -> String {
    json!({
        "schema": 1,
        "revision": revision,
        "install_revision": install_revision,
        "role": "server",
        "version": "v1.31.4+k3s1",
        "channel": "stable",
        "installer": installer,
        "token": tokens.server,
        "agent_token": tokens.agent,
        "config": {
            "cluster-init": true,
            "node-name": "cp-1",
            "node-ip": node_ip,
            "tls-san": ["k8s-api.home.internal", "10.0.0.10"],
            "disable": ["traefik"],
            "write-kubeconfig-mode": "0600"
        }
    })
    .to_string()
}

fn server_plan(
    revision: u64,
    install_revision: u64,
    node_ip: &str,
    installer: Value,
    tokens: &Tokens,
) -> InstallPlan {
    let text = server_plan_json(revision, install_revision, node_ip, installer, tokens);
    InstallPlan::for_directive(revision, "server", &text).unwrap()
}

fn agent_plan(revision: u64, tokens: &Tokens) -> InstallPlan {
    InstallPlan::for_directive(revision, "agent", &agent_plan_json(revision, tokens)).unwrap()
}

fn agent_plan_json(revision: u64, tokens: &Tokens) -> String {
    json!({
        "schema": 1,
        "revision": revision,
        "install_revision": 1,
        "role": "agent",
        "version": "v1.31.4+k3s1",
        "channel": "stable",
        "installer": {"file": "/opt/k3s/install.sh"},
        "token": tokens.agent,
        "config": {"server": "https://10.0.0.11:6443", "node-name": "wk-1", "node-label": ["tier=worker"]}
    })
    .to_string()
}

fn file_installer() -> Value {
    json!({"file": "/opt/k3s/install.sh"})
}

/// Serves `body` for every request on 127.0.0.1:0; counts requests.
async fn serve_installer(status: &'static str, body: Vec<u8>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/install.sh", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&body).await;
        }
    });
    (url, requests)
}

const ALLOWED_INSTALLER_VARS: &[&str] = &[
    "PATH",
    "INSTALL_K3S_SKIP_START",
    "INSTALL_K3S_EXEC",
    "INSTALL_K3S_VERSION",
    "INSTALL_K3S_CHANNEL",
    "INSTALL_K3S_BIN_DIR",
    "INSTALL_K3S_SYSTEMD_DIR",
    // Set by sh itself.
    "PWD",
    "OLDPWD",
    "SHLVL",
    "_",
];

#[tokio::test]
async fn a_first_install_from_a_url_runs_every_step_and_a_rerun_changes_nothing() {
    let node = Node::new();
    let tokens = Tokens::new("first");
    let (url, requests) =
        serve_installer("200 OK", fs::read(testdata("fake-install.sh")).unwrap()).await;
    let plan = server_plan(5, 1, "10.0.0.11", json!({ "url": url }), &tokens);
    let executor = node.executor(Duration::from_secs(10));

    let mut reporter = Recorder::default();
    let applied = executor.apply(&plan, &mut reporter).await.unwrap();
    assert_eq!(applied.ran, ALL_STEPS);
    assert_eq!(reporter.succeeded(), ALL_STEPS);
    assert_eq!(requests.load(Ordering::SeqCst), 1);

    // config.yaml and the token files: 0600, tokens only in their files.
    let config = fs::read_to_string(node.host_file("/etc/rancher/k3s/config.yaml")).unwrap();
    let body: Value = serde_json::from_str(config.split_once('\n').unwrap().1).unwrap();
    assert_eq!(body["token-file"], "/etc/rancher/k3s/server-token");
    assert_eq!(body["agent-token-file"], "/etc/rancher/k3s/agent-token");
    assert_eq!(body["cluster-init"], true);
    assert_eq!(
        body["tls-san"],
        json!(["k8s-api.home.internal", "10.0.0.10"])
    );
    for path in [
        "/etc/rancher/k3s/config.yaml",
        "/etc/rancher/k3s/server-token",
        "/etc/rancher/k3s/agent-token",
    ] {
        assert_eq!(node.mode(path), 0o600, "{path}");
    }
    assert_eq!(
        fs::read_to_string(node.host_file("/etc/rancher/k3s/server-token")).unwrap(),
        format!("{}\n", tokens.server)
    );

    // install.sh ran once, with exactly the documented environment and SKIP_START.
    let runs = node.installer_runs();
    assert_eq!(runs.len(), 1);
    let env = &runs[0];
    for var in env {
        let name = var.split_once('=').map_or(var.as_str(), |(k, _)| k);
        assert!(
            ALLOWED_INSTALLER_VARS.contains(&name),
            "unexpected {var} in {env:?}"
        );
    }
    for expected in [
        "INSTALL_K3S_SKIP_START=true".to_owned(),
        "INSTALL_K3S_EXEC=server".to_owned(),
        "INSTALL_K3S_VERSION=v1.31.4+k3s1".to_owned(),
        format!(
            "INSTALL_K3S_BIN_DIR={}",
            node.host_file("/usr/local/bin").display()
        ),
        format!(
            "INSTALL_K3S_SYSTEMD_DIR={}",
            node.host_file("/etc/systemd/system").display()
        ),
    ] {
        assert!(env.contains(&expected), "{expected} missing from {env:?}");
    }
    let log = fs::read_to_string(node.state().join("fake-install.log")).unwrap();
    assert!(log.contains("result skip-start"), "{log}");
    assert_eq!(node.mode("/etc/systemd/system/k3s.service.env"), 0o600);
    assert_eq!(
        fs::read_to_string(node.host_file("/etc/systemd/system/k3s.service.env")).unwrap(),
        "",
        "no K3S_* variable reached the installer"
    );
    let unit = fs::read_to_string(node.host_file("/etc/systemd/system/k3s.service")).unwrap();
    assert!(
        unit.contains("Type=notify") && unit.contains("Restart=always"),
        "{unit}"
    );
    assert!(node.host_file("/usr/local/bin/k3s-uninstall.sh").exists());
    let stored = node.state().join("install.sh");
    assert_eq!(
        fs::metadata(&stored).unwrap().permissions().mode() & 0o777,
        0o700
    );

    // The unit was started without blocking and is active.
    assert_eq!(
        node.systemctl_mutations(),
        [
            format!(
                "enable {}",
                node.host_file("/etc/systemd/system/k3s.service").display()
            ),
            "daemon-reload".to_owned(),
            "daemon-reload".to_owned(),
            "start --no-block k3s".to_owned(),
        ]
    );
    assert_eq!(node.unit_state("k3s"), "active");
    let checkpoint = executor.checkpoint().unwrap().unwrap();
    assert_eq!(checkpoint.last_completed, Some(Step::Start));
    assert_eq!(checkpoint.plan.revision, 5);

    // The same plan again, even from a restarted agent: nothing runs.
    let mutations = node.systemctl_mutations();
    let mut reporter = Recorder::default();
    let applied = node
        .executor(Duration::from_secs(10))
        .apply(&plan, &mut reporter)
        .await
        .unwrap();
    assert!(applied.ran.is_empty(), "{applied}");
    assert!(reporter.events.is_empty());
    assert_eq!(node.installer_runs().len(), 1);
    assert_eq!(node.systemctl_mutations(), mutations);
    assert_eq!(
        requests.load(Ordering::SeqCst),
        1,
        "the installer is not fetched again"
    );
}

#[tokio::test]
async fn a_revision_bump_reinstalls_and_a_config_change_only_restarts() {
    let node = Node::new();
    let tokens = Tokens::new("bump");
    let executor = node.executor(Duration::from_secs(10));
    executor
        .apply(
            &server_plan(5, 1, "10.0.0.11", file_installer(), &tokens),
            &mut Recorder::default(),
        )
        .await
        .unwrap();
    assert_eq!(node.installer_runs().len(), 1);

    // install_revision bumped: fetch, install, restart; the config is untouched.
    let before = node.systemctl_mutations().len();
    let mut reporter = Recorder::default();
    let applied = executor
        .apply(
            &server_plan(6, 2, "10.0.0.11", file_installer(), &tokens),
            &mut reporter,
        )
        .await
        .unwrap();
    assert_eq!(
        applied.ran,
        [
            Step::Preflight,
            Step::FetchInstaller,
            Step::RunInstaller,
            Step::Start
        ]
    );
    assert_eq!(node.installer_runs().len(), 2);
    let new: Vec<String> = node.systemctl_mutations()[before..].to_vec();
    assert_eq!(new.last().unwrap(), "restart --no-block k3s", "{new:?}");
    assert!(!new.iter().any(|c| c.starts_with("start")), "{new:?}");

    // Only the config changed: rewrite it and restart, nothing else.
    let before = node.systemctl_mutations().len();
    let applied = executor
        .apply(
            &server_plan(7, 2, "10.0.0.12", file_installer(), &tokens),
            &mut Recorder::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        applied.ran,
        [Step::Preflight, Step::WriteConfig, Step::Start]
    );
    assert_eq!(node.installer_runs().len(), 2);
    assert_eq!(
        node.systemctl_mutations()[before..],
        ["restart --no-block k3s"]
    );
    let config = fs::read_to_string(node.host_file("/etc/rancher/k3s/config.yaml")).unwrap();
    assert!(config.contains("10.0.0.12"), "{config}");
    assert_eq!(node.unit_state("k3s"), "active");
}

#[tokio::test]
async fn an_install_stopped_after_write_config_resumes_at_the_installer_without_repeating() {
    let node = Node::new();
    let tokens = Tokens::new("crash");
    let plan = agent_plan(3, &tokens);

    // The first agent process stops between write-config and fetch-installer.
    let mut reporter = Recorder {
        stop_before: Some(Step::FetchInstaller),
        ..Recorder::default()
    };
    let err = node
        .executor(Duration::from_secs(10))
        .apply(&plan, &mut reporter)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            K3sInstallError::Interrupted {
                next: Step::FetchInstaller
            }
        ),
        "{err}"
    );
    assert_eq!(reporter.succeeded(), [Step::Preflight, Step::WriteConfig]);
    let config = node.host_file("/etc/rancher/k3s/config.yaml");
    let written = fs::metadata(&config).unwrap().ino();
    assert!(node.installer_runs().is_empty());
    assert!(node.systemctl_mutations().is_empty());

    // A new process resumes from the checkpoint alone.
    let executor = node.executor(Duration::from_secs(10));
    let mut reporter = Recorder::default();
    let applied = executor.resume(&mut reporter).await.unwrap().unwrap();
    assert_eq!(
        applied.ran,
        [Step::FetchInstaller, Step::RunInstaller, Step::Start]
    );
    assert!(
        reporter
            .events
            .iter()
            .all(|e| e.step != Step::WriteConfig && e.step != Step::Preflight)
    );
    assert_eq!(
        fs::metadata(&config).unwrap().ino(),
        written,
        "config.yaml was not written again (atomic writes replace the inode)"
    );
    assert_eq!(node.installer_runs().len(), 1);
    assert!(node.installer_runs()[0].contains(&"INSTALL_K3S_EXEC=agent".to_owned()));
    assert_eq!(node.unit_state("k3s-agent"), "active");
    assert!(
        node.host_file("/usr/local/bin/k3s-agent-uninstall.sh")
            .exists()
    );

    // The directive arriving again after the restart finds nothing to do.
    let applied = executor
        .apply(&plan, &mut Recorder::default())
        .await
        .unwrap();
    assert!(applied.ran.is_empty(), "{applied}");
    assert!(
        executor
            .resume(&mut Recorder::default())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(node.installer_runs().len(), 1);
}

#[tokio::test]
async fn a_unit_that_never_becomes_active_fails_the_start_step_at_its_deadline() {
    let node = Node::new();
    let tokens = Tokens::new("stuck");
    // Restart=always keeps a failing K3s in `activating`.
    fs::create_dir_all(node.bin().join("fake-systemctl.d")).unwrap();
    fs::write(
        node.bin().join("fake-systemctl.d/k3s.start-result"),
        "activating\n",
    )
    .unwrap();
    let mut reporter = Recorder::default();
    let err = node
        .executor(Duration::from_millis(300))
        .apply(
            &server_plan(5, 1, "10.0.0.11", file_installer(), &tokens),
            &mut reporter,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, K3sInstallError::NotActive { state, .. } if state == "activating"),
        "{err:?}"
    );
    let failed = reporter.events.last().unwrap();
    assert_eq!(
        (failed.step, failed.outcome, failed.attempt),
        (Step::Start, StepOutcome::Failed, 1)
    );
    assert!(
        failed.message.contains("k3s did not become active"),
        "{}",
        failed.message
    );
}

#[tokio::test]
async fn an_installer_url_that_fails_fails_the_fetch_step() {
    let node = Node::new();
    let tokens = Tokens::new("fetch");
    let (url, _) = serve_installer("404 Not Found", b"no".to_vec()).await;
    let mut reporter = Recorder::default();
    let err = node
        .executor(Duration::from_secs(10))
        .apply(
            &server_plan(5, 1, "10.0.0.11", json!({ "url": url }), &tokens),
            &mut reporter,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            K3sInstallError::Fetch(FetchError::Status { status: 404, .. })
        ),
        "{err}"
    );
    assert!(err.is_transient());
    assert!(node.installer_runs().is_empty());
}

#[tokio::test]
async fn tokens_appear_only_in_their_0600_token_files() {
    let node = Node::new();
    let tokens = Tokens::new("scan");
    let mut reporter = Recorder::default();
    let executor = node.executor(Duration::from_secs(10));
    let (url, _) = serve_installer("200 OK", fs::read(testdata("fake-install.sh")).unwrap()).await;
    for plan in [
        server_plan(5, 1, "10.0.0.11", json!({ "url": url }), &tokens),
        server_plan(5, 1, "10.0.0.11", file_installer(), &tokens),
        server_plan(6, 2, "10.0.0.11", file_installer(), &tokens),
        server_plan(7, 2, "10.0.0.12", file_installer(), &tokens),
    ] {
        executor.apply(&plan, &mut reporter).await.unwrap();
    }
    // A failure too: its error text must be clean as well.
    fs::write(
        node.bin().join("fake-systemctl.d/k3s.start-result"),
        "activating\n",
    )
    .unwrap();
    let err = node
        .executor(Duration::from_millis(100))
        .apply(
            &server_plan(8, 2, "10.0.0.13", file_installer(), &tokens),
            &mut reporter,
        )
        .await
        .unwrap_err();
    // And an agent node, whose token is the agent token.
    let agent = Node::new();
    agent
        .executor(Duration::from_secs(10))
        .apply(&agent_plan(2, &tokens), &mut reporter)
        .await
        .unwrap();

    let secrets = [
        tokens.server.as_str(),
        tokens.agent.as_str(),
        tokens.agent.split_once("::").unwrap().1,
    ];
    let allowed: Vec<PathBuf> = [&node, &agent]
        .iter()
        .flat_map(|n| {
            [
                n.host_file("/etc/rancher/k3s/server-token"),
                n.host_file("/etc/rancher/k3s/agent-token"),
            ]
        })
        .collect();
    let mut scanned = 0;
    let mut holders = Vec::new();
    for dir in [node.dir.path(), agent.dir.path()] {
        for file in walk(dir) {
            scanned += 1;
            let bytes = fs::read(&file).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            if secrets.iter().any(|s| text.contains(s)) {
                assert!(
                    allowed.contains(&file),
                    "a token leaked into {}",
                    file.display()
                );
                let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", file.display());
                holders.push(file);
            }
        }
    }
    assert!(
        scanned > 20,
        "the scan saw the installer log, unit files, checkpoint: {scanned}"
    );
    assert_eq!(
        holders.len(),
        3,
        "server-token and agent-token on the server, agent-token on the agent: {holders:?}"
    );

    let mut reported = format!("{:?}\n{}\n", reporter.events, homelab_agent::chain(&err));
    reported.push_str(&format!(
        "{:?}",
        server_plan(5, 1, "10.0.0.11", file_installer(), &tokens)
    ));
    reported.push_str(&LOGS.lock().unwrap_or_else(|e| e.into_inner()).join("\n"));
    assert!(
        reported.contains("revision 6: run-installer"),
        "logs were captured"
    );
    for secret in secrets {
        assert!(
            !reported.contains(secret),
            "a token leaked into a report, an error or the log"
        );
    }
}

/// The first event of `node` that `matches`, polling the coordinator's event log for at most
/// 30 s.
async fn event(
    c: &common::InProcess,
    node: &str,
    what: &str,
    matches: impl Fn(&str, &str) -> bool,
) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let found = c
            .core
            .store()
            .events_after(0, Some(node), 10_000)
            .unwrap()
            .into_iter()
            .find(|e| matches(&e.kind, &e.message));
        if let Some(event) = found {
            return event.message;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assignment_over_the_link_is_installed_reported_step_by_step_and_acknowledged() {
    let c = common::InProcess::start(Settings::default()).await;
    let node = Node::new();
    let name = "k3s-server-1";
    let tokens = Tokens::new("link");
    // What cloud-init would write.
    fs::create_dir_all(node.root().join("etc")).unwrap();
    fs::write(node.root().join("etc/hostname"), name).unwrap();
    fs::write(node.root().join("etc/machine-id"), "machine-k3s-server-1").unwrap();
    let ca = node.dir.path().join("ca.pem");
    fs::write(&ca, c.ca_pem()).unwrap();
    let token_file = node.dir.path().join("token");
    fs::write(&token_file, c.token(name, 600)).unwrap();
    let config = AgentConfig {
        coordinator_url: format!("https://{}", c.address),
        node_name: name.into(),
        ca_cert: ca,
        token_file,
        state_dir: node.state(),
        host_root: node.root(),
        systemctl: node.bin().join("systemctl"),
        journalctl: node.dir.path().join("no-journalctl"),
        command_path: format!("{}:/usr/bin:/bin", node.bin().display()),
        k3s_ready_timeout_seconds: 30,
        k3s_install_timeout_seconds: 60,
        installer_ca_bundle: node.dir.path().join("no-ca-bundle.pem"),
    };
    let (ready_tx, ready) = oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let (stop, stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(homelab_agent::run(
        config,
        async {
            let _ = stopped.await;
        },
        move || {
            if let Some(tx) = ready_tx.take() {
                let _ = tx.send(());
            }
        },
    ));
    tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .expect("the agent connects within 30 s")
        .unwrap();

    // The coordinator builds the plan before push() allocates the revision: the plan's
    // revision may be lower than the directive's.
    let plan_json = server_plan_json(1, 1, "10.0.0.11", file_installer(), &tokens);
    let PushOutcome::Sent(revision) = c
        .core
        .push(
            name,
            Directive::Assignment {
                role: "server".into(),
                plan_json,
            },
        )
        .unwrap()
    else {
        panic!("the agent is connected");
    };
    let ack = event(&c, name, "the acknowledgement", |kind, message| {
        kind == "directive.acknowledged" && message.starts_with(&format!("revision {revision} "))
    })
    .await;
    assert!(
        ack.contains("applied") && ack.contains("ran preflight, write-config"),
        "{ack}"
    );

    // Every step was reported, in order, before the acknowledgement.
    let phases: Vec<String> = c
        .core
        .store()
        .events_after(0, Some(name), 10_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "node.phase" && e.message.starts_with("install /"))
        .map(|e| e.message.split(": ").take(2).collect::<Vec<_>>().join(": "))
        .collect();
    let expected: Vec<String> = ALL_STEPS
        .iter()
        .flat_map(|step| {
            ["started", "succeeded"].map(|outcome| format!("install / {step}: {outcome}"))
        })
        .collect();
    assert_eq!(phases, expected);
    let record = c.core.node(name).unwrap().unwrap();
    let last = record.last_phase.unwrap();
    assert_eq!(
        (last.phase.as_str(), last.step.as_str()),
        ("install", "start")
    );
    assert_eq!(last.outcome, "succeeded");

    // Health follows the unit at once, without waiting for the 30 s tick.
    let health = event(&c, name, "a healthy report", |kind, message| {
        kind == "node.health" && message.contains("k3s.service active")
    })
    .await;
    assert!(health.starts_with("healthy: "), "{health}");
    // And so does the server's view of its (fake) cluster.
    event(&c, name, "the cluster view", |kind, message| {
        kind == "node.health" && message.contains("api ready, 1/1 nodes Ready")
    })
    .await;
    assert_eq!(
        fs::read_to_string(node.state().join("applied-revision")).unwrap(),
        revision.to_string()
    );
    assert_eq!(node.unit_state("k3s"), "active");

    stop.send(()).unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(30), agent)
        .await
        .expect("the agent stops within 30 s")
        .unwrap()
        .unwrap();
    assert_eq!(stopped, Stopped::Shutdown);
    let events = c.core.store().events_after(0, Some(name), 10_000).unwrap();
    for e in &events {
        assert!(
            !e.message.contains(&tokens.server) && !e.message.contains(&tokens.agent),
            "a token reached the coordinator: {}",
            e.kind
        );
    }
    c.stop().await;
}

/// Waits at most 30 s for the K3s task's status to satisfy `done`.
async fn status_until(
    handle: &K3sHandle,
    what: &str,
    done: impl FnMut(&K3sStatus) -> bool,
) -> K3sStatus {
    let mut status = handle.watch_status();
    tokio::time::timeout(Duration::from_secs(30), status.wait_for(done))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}: {:?}", handle.status()))
        .expect("the K3s task runs")
        .clone()
}

fn condition(name: &str, ready: bool, reason: &str) -> NodeCondition {
    NodeCondition {
        name: name.into(),
        ready,
        reason: reason.into(),
    }
}

#[tokio::test]
async fn a_server_reports_its_ca_hash_api_readiness_and_every_node_of_its_cluster() {
    let cluster = tempfile::tempdir().unwrap();
    let server = Node::new();
    let worker = Node::new();
    server.join_fake_cluster(cluster.path());
    worker.join_fake_cluster(cluster.path());
    let tokens = Tokens::new("view");

    let mut handle = K3sHandle::spawn(server.executor(Duration::from_secs(10)));
    assert!(handle.submit(Submission {
        revision: 5,
        role: "server".into(),
        plan_json: server_plan_json(5, 1, "10.0.0.11", file_installer(), &tokens),
    }));
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), handle.next_event())
            .await
            .expect("the plan is acknowledged within 30 s");
        if let K3sEvent::Applied { ok, message, .. } = event {
            assert!(ok, "{message}");
            break;
        }
    }

    // The unit is active: the view follows without waiting for a health tick.
    let status = status_until(&handle, "the server's own Node", |s| {
        s.server_view.as_ref().is_some_and(|v| !v.nodes.is_empty())
    })
    .await;
    let health = k3s_health(&status).unwrap();
    let stored = fs::read(server.host_file(SERVER_CA_PATH)).unwrap();
    let expected: String = Sha256::digest(&stored)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(health.cluster_ca_sha256, expected);
    assert!(health.api_ready, "{}", status.detail());
    assert_eq!(health.nodes, [condition("cp-1", true, "KubeletReady")]);
    assert_eq!(
        (health.role.as_str(), health.unit_state.as_str()),
        ("server", "active")
    );
    assert!(
        status.detail().contains("api ready, 1/1 nodes Ready"),
        "{}",
        status.detail()
    );
    assert!(
        fs::read_to_string(cluster.path().join("nodes/cp-1"))
            .unwrap()
            .starts_with("True"),
        "the fake cluster is the shared directory"
    );

    // A worker on another root joins the same fake cluster: the next refresh shows it.
    worker
        .executor(Duration::from_secs(10))
        .apply(&agent_plan(2, &tokens), &mut Recorder::default())
        .await
        .unwrap();
    handle.refresh();
    let status = status_until(&handle, "the worker's Node", |s| {
        s.server_view.as_ref().is_some_and(|v| v.nodes.len() == 2)
    })
    .await;
    assert_eq!(
        k3s_health(&status).unwrap().nodes,
        [
            condition("cp-1", true, "KubeletReady"),
            condition("wk-1", true, "KubeletReady")
        ]
    );

    // The worker's K3s stops: the server sees its Node go unknown.
    worker.systemctl(&["stop", "k3s-agent"]);
    handle.refresh();
    let status = status_until(&handle, "the worker's Node not Ready", |s| {
        s.server_view
            .as_ref()
            .is_some_and(|v| v.nodes.iter().any(|n| n.name == "wk-1" && !n.ready))
    })
    .await;
    assert!(k3s_health(&status).unwrap().nodes.contains(&condition(
        "wk-1",
        false,
        "NodeStatusUnknown"
    )));

    // The server's own K3s stops: no view, so the report says the API is not ready.
    server.systemctl(&["stop", "k3s"]);
    handle.refresh();
    let status = status_until(&handle, "the server's unit inactive", |s| {
        s.unit_state.as_deref() == Some("inactive")
    })
    .await;
    let health = k3s_health(&status).unwrap();
    assert!(!health.api_ready);
    assert!(health.nodes.is_empty() && health.cluster_ca_sha256.is_empty());
    handle.shutdown().await;
}

#[tokio::test]
async fn a_server_without_a_cni_reports_its_node_not_ready_and_waits_for_cni() {
    let server = Node::new();
    let tokens = Tokens::new("cni");
    let mut plan: Value = serde_json::from_str(&server_plan_json(
        3,
        1,
        "10.0.0.11",
        file_installer(),
        &tokens,
    ))
    .unwrap();
    plan["config"]["flannel-backend"] = json!("none");
    plan["config"]["disable-network-policy"] = json!(true);
    let handle = K3sHandle::spawn(server.executor(Duration::from_secs(10)));
    handle.submit(Submission {
        revision: 3,
        role: "server".into(),
        plan_json: plan.to_string(),
    });
    let status = status_until(&handle, "the server's own Node", |s| {
        s.server_view.as_ref().is_some_and(|v| !v.nodes.is_empty())
    })
    .await;
    let health = k3s_health(&status).unwrap();
    assert!(health.api_ready);
    assert_eq!(health.nodes, [condition("cp-1", false, "KubeletNotReady")]);
    assert!(status.healthy(), "waiting for a CNI is not a failure");
    assert!(
        status.detail().contains("waiting for CNI"),
        "{}",
        status.detail()
    );
    handle.shutdown().await;
}

/// The events of `handle` up to and including the acknowledgement of `revision`, waiting at
/// most 30 s for each.
async fn until_acknowledged(
    handle: &mut K3sHandle,
    revision: u64,
) -> (Vec<K3sEvent>, bool, String) {
    let mut events = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), handle.next_event())
            .await
            .unwrap_or_else(|_| panic!("revision {revision} is acknowledged within 30 s"));
        if let K3sEvent::Applied {
            revision: r,
            ok,
            message,
        } = &event
            && *r == revision
        {
            let (ok, message) = (*ok, message.clone());
            return (events, ok, message);
        }
        events.push(event);
    }
}

fn kubectl(action: KubectlAction, node: &str) -> Operation {
    Operation::Kubectl(KubectlCommand::new(action, node, Duration::from_secs(30)).unwrap())
}

#[tokio::test]
async fn a_server_hands_over_its_kubeconfig_drains_and_deletes_a_node_that_then_uninstalls() {
    let cluster = tempfile::tempdir().unwrap();
    let server = Node::new();
    let worker = Node::new();
    server.join_fake_cluster(cluster.path());
    worker.join_fake_cluster(cluster.path());
    let tokens = Tokens::new("ops");
    let mut server_k3s = K3sHandle::spawn(server.executor(Duration::from_secs(10)));
    let mut worker_k3s = K3sHandle::spawn(worker.executor(Duration::from_secs(10)));
    server_k3s.submit(Submission {
        revision: 2,
        role: "server".into(),
        plan_json: server_plan_json(2, 1, "10.0.0.11", file_installer(), &tokens),
    });
    worker_k3s.submit(Submission {
        revision: 3,
        role: "agent".into(),
        plan_json: agent_plan_json(3, &tokens),
    });
    for (handle, revision) in [(&mut server_k3s, 2), (&mut worker_k3s, 3)] {
        let (_, ok, message) = until_acknowledged(handle, revision).await;
        assert!(ok, "{message}");
    }
    assert!(cluster.path().join("nodes/wk-1").exists());
    assert!(worker.host_file("/etc/rancher/node/password").exists());

    // The server's kubeconfig, exactly as stored, then its acknowledgement.
    let stored = fs::read_to_string(server.host_file("/etc/rancher/k3s/k3s.yaml")).unwrap();
    assert!(server_k3s.operate(10, Operation::FetchKubeconfig));
    let (events, ok, message) = until_acknowledged(&mut server_k3s, 10).await;
    assert!(ok, "{message}");
    let replies: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            K3sEvent::Kubeconfig {
                revision: 10,
                content,
            } => Some(content.expose().to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(replies, std::slice::from_ref(&stored));
    // An agent has none: a clear refusal and no reply.
    worker_k3s.operate(11, Operation::FetchKubeconfig);
    let (events, ok, message) = until_acknowledged(&mut worker_k3s, 11).await;
    assert!(
        !ok && message.contains("K3s agent; only a server"),
        "{message}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, K3sEvent::Kubeconfig { .. }))
    );

    // Drain, then delete, the worker's Node through the server.
    server_k3s.operate(12, kubectl(KubectlAction::Drain, "wk-1"));
    let (_, ok, message) = until_acknowledged(&mut server_k3s, 12).await;
    assert!(ok && message.contains("node/wk-1 drained"), "{message}");
    assert!(cluster.path().join("cordoned/wk-1").exists());
    server_k3s.operate(13, kubectl(KubectlAction::DeleteNode, "wk-1"));
    let (_, ok, message) = until_acknowledged(&mut server_k3s, 13).await;
    assert!(ok, "{message}");
    assert!(!cluster.path().join("nodes/wk-1").exists());
    assert!(cluster.path().join("nodes/cp-1").exists());
    // A Node the cluster does not know cannot be drained: the error says why.
    server_k3s.operate(14, kubectl(KubectlAction::Drain, "wk-9"));
    let (_, ok, message) = until_acknowledged(&mut server_k3s, 14).await;
    assert!(
        !ok && message.contains("k3s kubectl drain wk-9 ended with exit code 1")
            && message.contains(r#"nodes "wk-9" not found"#),
        "{message}"
    );

    // Uninstall on the worker: K3s files, /etc/rancher/node and the checkpoint go.
    worker_k3s.operate(15, Operation::Uninstall);
    let (_, ok, message) = until_acknowledged(&mut worker_k3s, 15).await;
    assert!(
        ok && message.contains("/usr/local/bin/k3s-agent-uninstall.sh"),
        "{message}"
    );
    for gone in [
        "/usr/local/bin/k3s",
        "/usr/local/bin/k3s-agent-uninstall.sh",
        "/etc/systemd/system/k3s-agent.service",
        "/etc/systemd/system/k3s-agent.service.env",
        "/etc/rancher/k3s",
        "/var/lib/rancher/k3s",
        "/etc/rancher/node",
    ] {
        assert!(!worker.host_file(gone).exists(), "{gone} is left");
    }
    assert!(!worker.state().join(CHECKPOINT_FILE).exists());
    assert_eq!(worker.unit_state("k3s-agent"), "inactive");
    assert!(
        worker
            .systemctl_mutations()
            .ends_with(&["stop k3s-agent".into(), "disable k3s-agent".into()]),
        "{:?}",
        worker.systemctl_mutations()
    );
    let status = status_until(&worker_k3s, "no role", |s| s.role.is_none()).await;
    assert_eq!(status.detail(), "agent running; no role assigned");
    // The script ran with a cleared environment.
    let log = fs::read_to_string(worker.state().join("fake-install.log")).unwrap();
    assert!(log.contains("uninstall k3s-agent"), "{log}");
    let env: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("uninstall-env "))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    assert!(env.contains(&"PATH"), "{env:?}");
    assert!(
        env.iter()
            .all(|k| ["PATH", "PWD", "SHLVL", "_", "OLDPWD"].contains(k)),
        "{env:?}"
    );
    // The deleted Node stays deleted; the server's does not change.
    assert!(!cluster.path().join("nodes/wk-1").exists());
    assert_eq!(server.unit_state("k3s"), "active");

    // A second uninstall has nothing to do.
    worker_k3s.operate(16, Operation::Uninstall);
    let (_, ok, message) = until_acknowledged(&mut worker_k3s, 16).await;
    assert!(ok, "{message}");
    assert_eq!(message, "nothing to uninstall");

    // Neither the kubeconfig nor a token was logged.
    let logs = LOGS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for line in &logs {
        assert!(
            !line.contains(stored.trim())
                && !line.contains(&tokens.server)
                && !line.contains(&tokens.agent),
            "a secret was logged: {line}"
        );
    }
    server_k3s.shutdown().await;
    worker_k3s.shutdown().await;
}

/// Every regular file under `dir`, symlinks not followed.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                files.push(entry.path());
            }
        }
    }
    files
}
