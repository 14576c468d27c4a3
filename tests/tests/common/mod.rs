//! Test harness: real `homelab` and `homelab-agent` processes in temporary directories, and
//! an in-process coordinator for protocol-level tests. Loopback only, ephemeral ports, every
//! wait bounded.

#![allow(dead_code, unreachable_pub)] // Reason: each test binary uses a different subset.

pub mod netns;

use std::{
    fs,
    io::Read,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use homelab::{
    core::{Coordinator, Settings},
    grpc::{self, TlsMaterial},
    state_dir::StateDir,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A built binary of the workspace, next to the test executable's directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/test-xxxx -> target/debug/NAME
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, check: impl FnMut() -> Option<T>) -> T {
    wait_for_every(Duration::from_millis(50), timeout, what, check)
}

/// [`wait_for`], polling every `interval` (longer for checks that run a command).
pub fn wait_for_every<T>(
    interval: Duration,
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(interval);
    }
}

/// A `homelab serve` process with its own state directory.
pub struct CoordinatorProcess {
    pub dir: tempfile::TempDir,
    pub state: StateDir,
    child: Option<Child>,
    pub address: Option<SocketAddr>,
    extra_args: Vec<String>,
    /// The network namespace the daemon and the CLI run in (`ip netns exec`), if any.
    netns: Option<String>,
    /// The host part of `--listen`.
    listen_host: String,
}

impl CoordinatorProcess {
    /// Runs `homelab init` in a fresh temporary state directory.
    pub fn init(extra_serve_args: &[&str]) -> Self {
        Self::init_with(&[], extra_serve_args)
    }

    /// Runs `homelab init INIT_ARGS…` (for example extra `--san`s) in a fresh temporary
    /// state directory.
    pub fn init_with(init_args: &[&str], extra_serve_args: &[&str]) -> Self {
        Self::init_netns(None, init_args, extra_serve_args)
    }

    /// Like [`Self::init_with`], but the daemon and the CLI run in the network namespace
    /// `netns` (`ip netns exec`), and `serve` listens on all of its addresses.
    pub fn init_in(netns: &str, init_args: &[&str], extra_serve_args: &[&str]) -> Self {
        Self::init_netns(Some(netns), init_args, extra_serve_args)
    }

    fn init_netns(netns: Option<&str>, init_args: &[&str], extra_serve_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        let this = Self {
            dir,
            state,
            child: None,
            address: None,
            extra_args: extra_serve_args.iter().map(|s| s.to_string()).collect(),
            netns: netns.map(str::to_owned),
            listen_host: if netns.is_some() {
                "0.0.0.0"
            } else {
                "127.0.0.1"
            }
            .to_owned(),
        };
        let mut args = vec!["init"];
        args.extend(init_args);
        let out = this.cli(&args);
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        this
    }

    /// Starts `homelab serve` on the previous port, or an ephemeral one the first time, and
    /// waits until it has recorded its address.
    pub fn start(&mut self) {
        let port = self.address.map_or(0, |addr| addr.port());
        let listen = format!("{}:{port}", self.listen_host);
        let _ = fs::remove_file(self.state.address_file());
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("coordinator.log"))
            .unwrap();
        let child = in_netns(self.netns.as_deref(), &bin("homelab"))
            .arg("--state-dir")
            .arg(self.state.root())
            .args(["serve", "--listen", &listen])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let file = self.state.address_file();
        let addr: SocketAddr = wait_for(Duration::from_secs(20), "coordinator address", || {
            fs::read_to_string(&file).ok()?.trim().parse().ok()
        });
        self.address = Some(addr);
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM, and waits (bounded) for the daemon to exit; `kill -9` if it does not.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            child.wait().unwrap();
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.address.expect("started"))
    }

    /// Runs the CLI against this coordinator.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = in_netns(self.netns.as_deref(), &bin("homelab"));
        // `init` writes an example spec into the working directory: keep it in the temp dir.
        cmd.current_dir(self.dir.path());
        cmd.arg("--state-dir").arg(self.state.root());
        if let Some(addr) = self.address {
            cmd.args(["--coordinator", &format!("https://{addr}")]);
        }
        cmd.args(args).stdin(Stdio::null()).output().unwrap()
    }

    /// Runs the CLI and parses its JSON output.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "homelab {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `homelab token create NODE`.
    pub fn token(&self, node: &str) -> String {
        let out = self.cli(&["token", "create", node]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// The coordinator's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("coordinator.log")).unwrap_or_default()
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `homelab-agent` process with its own config, state directory and host root.
pub struct AgentProcess {
    pub name: String,
    pub dir: PathBuf,
    child: Option<Child>,
    /// The network namespace the agent runs in (`ip netns exec`), if any.
    netns: Option<String>,
}

impl AgentProcess {
    /// Writes the files cloud-init would write, with `token`, and starts the agent.
    pub fn start(coordinator: &CoordinatorProcess, name: &str, token: &str) -> Self {
        Self::start_with(coordinator, name, token, "")
    }

    /// Like [`Self::start`], with extra `agent.toml` lines. The host root is `dir/root`.
    pub fn start_with(
        coordinator: &CoordinatorProcess,
        name: &str,
        token: &str,
        extra_config: &str,
    ) -> Self {
        Self::start_at(
            coordinator.dir.path(),
            &coordinator.url(),
            &coordinator.state,
            name,
            token,
            extra_config,
        )
    }

    /// An agent under `base/agents/NAME` for the coordinator at `url` of `state`.
    pub fn start_at(
        base: &Path,
        url: &str,
        state: &StateDir,
        name: &str,
        token: &str,
        extra_config: &str,
    ) -> Self {
        Self::start_in(None, base, url, state, name, token, extra_config)
    }

    /// [`Self::start_at`] in the network namespace `netns` (`ip netns exec`), if given.
    pub fn start_in(
        netns: Option<&str>,
        base: &Path,
        url: &str,
        state: &StateDir,
        name: &str,
        token: &str,
        extra_config: &str,
    ) -> Self {
        let dir = base.join("agents").join(name);
        let root = dir.join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/hostname"), name).unwrap();
        fs::write(root.join("etc/machine-id"), format!("machine-{name}")).unwrap();
        fs::copy(state.ca_cert(), dir.join("ca.pem")).unwrap();
        fs::write(dir.join("token"), token).unwrap();
        fs::write(
            dir.join("agent.toml"),
            format!(
                "coordinator_url = {:?}\nnode_name = {name:?}\nca_cert = {:?}\ntoken_file = {:?}\nstate_dir = {:?}\nhost_root = {:?}\n{extra_config}",
                url,
                dir.join("ca.pem"),
                dir.join("token"),
                dir.join("state"),
                root
            ),
        )
        .unwrap();
        let mut agent = Self {
            name: name.to_owned(),
            dir,
            child: None,
            netns: netns.map(str::to_owned),
        };
        agent.restart();
        agent
    }

    /// Starts (again) the agent process.
    pub fn restart(&mut self) {
        self.kill();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let child = in_netns(self.netns.as_deref(), &bin("homelab-agent"))
            .arg("--config")
            .arg(self.dir.join("agent.toml"))
            .env("HOMELAB_AGENT_LOG", "debug")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process has exited, with its code.
    pub fn exit_code(&mut self) -> Option<Option<i32>> {
        let child = self.child.as_mut()?;
        child.try_wait().unwrap().map(|s| s.code())
    }

    pub fn identity_file(&self) -> PathBuf {
        self.dir.join("state/identity.pem")
    }

    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(self.dir.join("agent.log")) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A command for `program`, run in the network namespace `netns` through `ip netns exec`
/// when one is given. `ip netns exec` execs the program, so the child's pid is the program's.
fn in_netns(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(netns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", netns]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// The nodes of `homelab status --output json`, keyed by name: (connected, serial).
pub fn node_summary(status: &serde_json::Value) -> Vec<(String, bool, String)> {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_owned(),
                n["connected"].as_bool().unwrap(),
                n["certificate_serial"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

// ---- in-process coordinator -----------------------------------------------------------

/// A coordinator served in this process on 127.0.0.1:0.
pub struct InProcess {
    pub dir: tempfile::TempDir,
    pub state: StateDir,
    pub core: Arc<Coordinator>,
    pub address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl InProcess {
    pub async fn start(settings: Settings) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        state.init(&[], false).unwrap();
        let core = Coordinator::new(
            state.open_store().unwrap(),
            state.load_ca().unwrap(),
            settings,
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let tls = TlsMaterial::load(&state).unwrap();
        let serve_core = core.clone();
        let task = tokio::spawn(async move {
            grpc::serve(listener, tls, serve_core, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self {
            dir,
            state,
            core,
            address,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn ca_pem(&self) -> String {
        fs::read_to_string(self.state.ca_cert()).unwrap()
    }

    /// A channel presenting `identity` (cert chain PEM, key PEM), or none.
    pub async fn channel(
        &self,
        identity: Option<(&str, &str)>,
    ) -> Result<Channel, tonic::transport::Error> {
        channel_to(self.address, &self.ca_pem(), identity).await
    }

    /// A channel with the operator certificate.
    pub async fn operator_channel(&self) -> Channel {
        let cert = fs::read_to_string(self.state.operator_cert()).unwrap();
        let key = fs::read_to_string(self.state.operator_key()).unwrap();
        self.channel(Some((&cert, &key))).await.unwrap()
    }

    /// Creates a token for `node` expiring after `ttl_secs` (negative: already expired).
    pub fn token(&self, node: &str, ttl_secs: i64) -> String {
        let token = homelab::token::EnrollmentToken::generate();
        let now = homelab::core::now_unix();
        self.core
            .store()
            .insert_token(&token.hash(), node, now - 10, now + ttl_secs)
            .unwrap();
        token.expose().to_owned()
    }

    /// Event kinds recorded for `node`, oldest first.
    pub fn event_kinds(&self, node: &str) -> Vec<String> {
        self.core
            .store()
            .events_after(0, Some(node), 10_000)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect()
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("coordinator stops within its drain grace")
                .unwrap();
        }
    }
}

/// A TLS channel to `address` trusting `ca_pem`, presenting `identity` if given.
pub async fn channel_to(
    address: SocketAddr,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{address}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// A fresh key and a CSR with subject common name `cn`: (key PEM, CSR PEM).
pub fn key_and_csr(cn: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (key.serialize_pem(), csr)
}

// ---- K3s stand-ins ---------------------------------------------------------------------

pub fn testdata(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/k3s")
        .join(name)
}

pub fn copy_executable(from: &Path, to: &Path) {
    fs::create_dir_all(to.parent().unwrap()).unwrap();
    fs::copy(from, to).unwrap();
    fs::set_permissions(to, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// Every file under `dir`, recursively.
pub fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            out.extend(files(&path));
        } else if meta.is_file() {
            out.push(path);
        }
    }
    out
}

/// Prepares a node's host root (fake installer, fake cluster) and returns its extra
/// agent.toml lines and its fake systemctl's state directory.
pub fn prepare_fake_k3s(
    coordinator: &CoordinatorProcess,
    name: &str,
    cluster: &Path,
) -> (String, std::path::PathBuf) {
    prepare_fake_k3s_at(coordinator.dir.path(), name, cluster)
}

/// [`prepare_fake_k3s`] for a node under `base/agents/NAME`.
pub fn prepare_fake_k3s_at(
    base: &Path,
    name: &str,
    cluster: &Path,
) -> (String, std::path::PathBuf) {
    let node_dir = base.join("agents").join(name);
    let root = node_dir.join("root");
    let bin = node_dir.join("bin");
    copy_executable(
        &testdata("fake-install.sh"),
        &root.join("opt/homelab-test/install.sh"),
    );
    copy_executable(&testdata("fake-systemctl"), &bin.join("systemctl"));
    fs::create_dir_all(root.join("etc/fake-k3s")).unwrap();
    fs::write(
        root.join("etc/fake-k3s/cluster-dir"),
        format!("{}\n", cluster.display()),
    )
    .unwrap();
    let extra = format!(
        "systemctl = {:?}\ncommand_path = \"{}:/usr/bin:/bin\"\nk3s_ready_timeout_seconds = 30\n",
        bin.join("systemctl"),
        bin.display()
    );
    (extra, bin.join("fake-systemctl.d"))
}

// ---- child processes -------------------------------------------------------------------

/// Waits (bounded) for `child` to exit: (success, stdout, stderr).
pub fn finish_child(mut child: Child, limit: Duration) -> (bool, String, String) {
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the process did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (
        status.success(),
        out_reader.join().unwrap(),
        err_reader.join().unwrap(),
    )
}
