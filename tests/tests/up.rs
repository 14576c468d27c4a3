//! `homelab up` against the Proxmox simulator. The simulator creates VMs but boots nothing, so
//! first `up` must time out naming what each node waits for; then, with local agents standing
//! in for the booted VMs (K3s fakes in their host roots), `up` ends with every node Ready and
//! writes a kubeconfig. Re-running never duplicates a VM. Its plain-text progress output is
//! compared with golden files in `tests/testdata/up/` (see [`canonical`] for what exactly).

mod common;

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{AgentProcess, bin, files, finish_child, prepare_fake_k3s_at, wait_for};
use homelab::{spec::EXAMPLE, state_dir::StateDir};
use pve_sim::SimConfig;

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG4x9kQzCxT5Tn2Z2b6T7hR2JwJxWQm0c1lq0f1p2r3s ops@workstation";
const NAMES: [&str; 3] = ["k3s-control", "k3s-node-1", "k3s-node-2"];

struct Setup {
    dir: tempfile::TempDir,
    state: StateDir,
    spec: PathBuf,
    agent_bin: PathBuf,
}

fn setup(sim: &pve_sim::Simulator) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pve-root-ca.pem"), sim.ca_pem()).unwrap();
    std::fs::write(dir.path().join("token"), sim.token_secret()).unwrap();
    std::fs::write(dir.path().join("id.pub"), KEY).unwrap();
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
        // The coordinator sends the (fake) installer itself: no download anywhere.
        .replace("[k3s]", "[k3s]\ninstaller_file = \"install.sh\"");
    std::fs::copy(
        common::testdata("fake-install.sh"),
        dir.path().join("install.sh"),
    )
    .unwrap();
    let spec_path = dir.path().join("homelab.toml");
    std::fs::write(&spec_path, spec).unwrap();
    let agent_bin = dir.path().join("homelab-agent");
    std::fs::write(&agent_bin, b"\x7fELF a stand-in agent binary").unwrap();
    let state = StateDir::new(dir.path().join("state"));
    Setup {
        dir,
        state,
        spec: spec_path,
        agent_bin,
    }
}

fn up(s: &Setup, timeout: &str) -> Child {
    Command::new(bin("homelab"))
        .current_dir(s.dir.path())
        .env("HOME", s.dir.path())
        .arg("--state-dir")
        .arg(s.state.root())
        .args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--timeout",
            timeout,
            "--spec",
        ])
        .arg(&s.spec)
        .arg("--agent-bin")
        .arg(&s.agent_bin)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn vms(sim: &pve_sim::Simulator) -> usize {
    sim.vms().iter().filter(|v| !v.template).count()
}

/// Local agents standing in for the booted VMs, with fresh tokens (the seeds' tokens went to
/// the simulated VMs, which never boot), reaching the coordinator at `url`.
fn start_agents(s: &Setup, url: &str) -> Vec<AgentProcess> {
    let cluster = s.dir.path().join("fake-cluster");
    std::fs::create_dir_all(&cluster).unwrap();
    let mut agents = Vec::new();
    for name in NAMES {
        let token = Command::new(bin("homelab"))
            .arg("--state-dir")
            .arg(s.state.root())
            .args(["token", "create", name])
            .output()
            .unwrap();
        assert!(token.status.success());
        let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
        let (extra, _) = prepare_fake_k3s_at(s.dir.path(), name, &cluster);
        agents.push(AgentProcess::start_at(
            s.dir.path(),
            url,
            &s.state,
            name,
            &token,
            &extra,
        ));
    }
    agents
}

/// How many times an installer ran on any node under `base`.
fn installer_runs(base: &Path) -> usize {
    files(base)
        .iter()
        .filter(|f| f.file_name().is_some_and(|n| n == "fake-install.log"))
        .map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .filter(|l| *l == "invocation")
                .count()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_names_what_each_node_waits_for_then_finishes_when_nodes_call_home() {
    let sim = pve_sim::start(SimConfig::default()).await.unwrap();
    let s = setup(&sim);

    // 1. Nothing boots: up creates the VMs, then times out naming each node's wait.
    let (ok, stdout, stderr) = tokio::task::spawn_blocking({
        let child = up(&s, "3s");
        move || finish_child(child, Duration::from_secs(60))
    })
    .await
    .unwrap();
    assert!(!ok, "up must fail when the cluster is not Ready");
    // The error names, per node, what it waits for...
    let never = "its VM has not enrolled: the agent never called home (check the VM console and cloud-init, and that the VM reaches the coordinator URL)";
    let mut expected = vec!["error: the cluster was not Ready within 3s:".to_owned()];
    expected.extend(NAMES.iter().map(|name| format!("  {name}: {never}")));
    let error: Vec<&str> = stderr
        .lines()
        .skip_while(|l| !l.starts_with("error: "))
        .collect();
    assert_eq!(error, expected, "{stderr}");
    // ...and so does the summary table, after each node's progress: its VM booted.
    let summary: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("NAME         ROLE "))
        .collect();
    let ips = ["192.168.0.100", "192.168.0.101", "192.168.0.102"];
    let roles = ["server", "agent", "agent"];
    let mut table =
        vec!["NAME         ROLE    IP             PHASE    READY  WAITING FOR".to_owned()];
    for ((name, role), ip) in NAMES.iter().zip(roles).zip(ips) {
        table.push(format!(
            "{name:<11}  {role:<6}  {ip}  booting  -      {never}"
        ));
    }
    assert_eq!(summary, table, "{stdout}");
    for name in NAMES {
        assert!(
            stdout.lines().any(|l| l.contains(&format!(
                "{name:<11}  booting       VM started; waiting for its agent to enroll"
            ))),
            "{stdout}"
        );
    }
    assert_eq!(vms(&sim), 3);

    // 2. Again, and this time the "VMs" boot: local agents with fresh tokens call home.
    let _ = std::fs::remove_file(s.state.address_file());
    let child = up(&s, "60s");
    let address = wait_for(
        Duration::from_secs(30),
        "the in-process coordinator",
        || std::fs::read_to_string(s.state.address_file()).ok(),
    );
    let agents = start_agents(&s, &format!("https://{}", address.trim()));
    let (ok, stdout, stderr) =
        tokio::task::spawn_blocking(move || finish_child(child, Duration::from_secs(90)))
            .await
            .unwrap();
    assert!(ok, "up failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("The cluster is Ready"), "{stdout}");
    assert_eq!(vms(&sim), 3, "re-running never duplicates a VM");
    // The seeds held one-time tokens: once the nodes enrolled, up removed them.
    assert!(
        !sim.storage_contents()
            .iter()
            .any(|v| v.volid.contains("seed-")),
        "{:?}",
        sim.storage_contents()
    );
    for vm in sim.vms().iter().filter(|v| !v.template) {
        assert!(
            !vm.config.values().any(|v| v.contains("seed-")),
            "{:?}",
            vm.config
        );
    }
    let kubeconfig = s.dir.path().join(".kube/homelab.yaml");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&kubeconfig).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        std::fs::read_to_string(&kubeconfig)
            .unwrap()
            .contains("192.168.0.100:6443")
    );
    drop(agents);
    sim.shutdown().await;
}

// ---- the progress output -----------------------------------------------------------------

/// A running `homelab up` whose stdout lines are collected as they come.
struct Watched {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: std::thread::JoinHandle<()>,
}

impl Watched {
    fn start(mut child: Child) -> Self {
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let reader = std::thread::spawn({
            let lines = Arc::clone(&lines);
            move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().unwrap().push(line);
                }
            }
        });
        Self {
            child,
            lines,
            reader,
        }
    }

    fn has(&self, wanted: impl Fn(&str) -> bool) -> bool {
        self.lines.lock().unwrap().iter().any(|l| wanted(l))
    }

    /// Waits (bounded) for the exit: (success, stdout, stderr).
    fn finish(mut self, limit: Duration) -> (bool, String, String) {
        let mut stderr = self.child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
            text
        });
        let status = wait_for(limit, "up to exit", || self.child.try_wait().unwrap());
        self.reader.join().unwrap();
        let stdout = self.lines.lock().unwrap().join("\n") + "\n";
        (status.success(), stdout, stderr.join().unwrap())
    }
}

/// The plain output of `up` in a form that is the same at every run, for the golden files:
///
/// - the temporary directory becomes `<dir>`, VMIDs (100 to 199, which the simulator hands
///   out in whatever order the clones run) become `<vmid>`, and each progress line's time
///   (`+12.3s`) becomes `+T`;
/// - the lines before the progress lines (the plan table) and after them (cleanup, summary
///   table, kubeconfig) are kept in order;
/// - the progress lines are grouped by node, in the order of the spec, each node's lines in
///   the order they came: nodes run concurrently, so how their lines interleave varies.
///   Each node's lines are kept up to its first `ready` line, without `running` lines:
///   whether a node shows "K3s started" before Ready depends on whether its own report or
///   the server's view of it arrives first. After its first `ready` line a node may flap
///   (its own health report can briefly say NotReady): [`canonical`] checks that those
///   later lines are only `running` or `ready`, and leaves them out.
fn canonical(raw: &str, dir: &Path) -> String {
    let text = raw.replace(&dir.display().to_string(), "<dir>");
    let mut head = Vec::new();
    let mut tail = Vec::new();
    let mut per_node: Vec<(String, Vec<String>, bool)> = NAMES
        .iter()
        .map(|n| (n.to_string(), Vec::new(), false))
        .collect();
    let mut seen_progress = false;
    for line in text.lines() {
        let line = normalise_vmids(line);
        let trimmed = line.trim_start();
        let Some(rest) = trimmed.strip_prefix('+') else {
            if seen_progress {
                tail.push(line);
            } else {
                head.push(line);
            }
            continue;
        };
        assert!(tail.is_empty(), "a progress line after the summary: {line}");
        seen_progress = true;
        let (time, rest) = rest.split_once("  ").expect("+TIME  NODE  PHASE ...");
        assert!(
            time.ends_with('s') && time[..time.len() - 1].parse::<f64>().is_ok(),
            "{line}"
        );
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (node, phase) = (fields[0], fields[1]);
        let entry = per_node
            .iter_mut()
            .find(|(n, _, _)| n == node)
            .unwrap_or_else(|| panic!("a line of a node outside the spec: {line}"));
        if entry.2 {
            assert!(
                matches!(phase, "running" | "ready"),
                "{node} after Ready: {line}"
            );
            continue;
        }
        if phase == "running" {
            continue;
        }
        entry.1.push(format!("+T  {rest}"));
        entry.2 = phase == "ready";
    }
    let mut out = String::new();
    for line in head {
        out.push_str(&line);
        out.push('\n');
    }
    for (node, lines, _) in per_node {
        out.push_str(&format!("== {node}\n"));
        for line in lines {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out.push_str("==\n");
    for line in tail {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// `seed-101.iso`, `VMID 101` and a table's `101` become `<vmid>`; numbers within dotted
/// ones (`192.168.0.101`, `+10.1s`) stay.
fn normalise_vmids(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_ascii_digit() {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && chars[i].is_ascii_digit() {
            i += 1;
        }
        let run: String = chars[start..i].iter().collect();
        let before = start.checked_sub(1).map(|j| chars[j]);
        let after: String = chars[i..].iter().take(4).collect();
        let dotted = before == Some('.') || (after.starts_with('.') && after != ".iso");
        let vmid = run.len() == 3
            && run.starts_with('1')
            && !dotted
            && !before.is_some_and(|c| c.is_ascii_alphanumeric());
        out.push_str(if vmid { "<vmid>" } else { &run });
    }
    out
}

/// Compares `text` with `tests/testdata/up/NAME`; `UPDATE_GOLDEN=1` rewrites it.
fn golden(name: &str, text: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/up")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    assert_eq!(
        text,
        expected,
        "the output differs from {}; if the change is intended, rerun with UPDATE_GOLDEN=1",
        path.display()
    );
}

/// A full `up` through a running `homelab serve`, the agents starting once `up` shows their VMs
/// booting: its plain output against `first-run.txt`. Then `up` again: `rerun.txt`, and
/// nothing changes, no request that changes anything reaches Proxmox, no VM is added, no
/// installer runs again and no role is sent. And once more with `--output json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_prints_per_node_progress_and_a_rerun_changes_nothing() {
    let sim = pve_sim::start(SimConfig::default()).await.unwrap();
    let s = setup(&sim);
    let init = Command::new(bin("homelab"))
        // `init` writes an example spec into the working directory: keep it in the temp dir.
        .current_dir(s.dir.path())
        .arg("--state-dir")
        .arg(s.state.root())
        .args(["init", "--san", "127.0.0.1"])
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    let log = std::fs::File::create(s.dir.path().join("serve.log")).unwrap();
    let mut serve = Command::new(bin("homelab"))
        .arg("--state-dir")
        .arg(s.state.root())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let address = wait_for(Duration::from_secs(20), "homelab serve", || {
        std::fs::read_to_string(s.state.address_file()).ok()
    });

    let run = Watched::start(up(&s, "60s"));
    wait_for(Duration::from_secs(60), "up to start every VM", || {
        NAMES
            .iter()
            .all(|n| run.has(|l| l.contains(n) && l.contains(" booting ")))
            .then_some(())
    });
    let agents = start_agents(&s, &format!("https://{}", address.trim()));
    let (ok, stdout, stderr) =
        tokio::task::spawn_blocking(move || run.finish(Duration::from_secs(90)))
            .await
            .unwrap();
    assert!(ok, "up failed:\n{stdout}\n{stderr}");
    golden("first-run.txt", &canonical(&stdout, s.dir.path()));

    // Again, with every node Ready.
    let runs = installer_runs(s.dir.path());
    assert_eq!(runs, 3, "one installer run per node");
    let directives = |state: &StateDir| {
        state
            .open_store()
            .unwrap()
            .events_after(0, None, 100_000)
            .unwrap()
            .into_iter()
            .filter(|e| {
                e.kind == "node.assigned"
                    || (e.kind == "directive.sent" && e.message.starts_with("assignment"))
            })
            .count()
    };
    let sent = directives(&s.state);
    sim.clear_request_log();
    let (ok, stdout, stderr) = tokio::task::spawn_blocking({
        let child = up(&s, "60s");
        move || finish_child(child, Duration::from_secs(60))
    })
    .await
    .unwrap();
    assert!(ok, "the re-run failed:\n{stdout}\n{stderr}");
    golden("rerun.txt", &canonical(&stdout, s.dir.path()));
    assert_eq!(
        sim.request_log().mutating_count(),
        0,
        "{:?}",
        sim.request_log()
    );
    assert_eq!(vms(&sim), 3);
    assert_eq!(installer_runs(s.dir.path()), runs, "no installer ran again");
    assert_eq!(directives(&s.state), sent, "no role was sent again");

    // For scripts: one JSON object per line, the plan first and the summary last.
    let child = Command::new(bin("homelab"))
        .current_dir(s.dir.path())
        .env("HOME", s.dir.path())
        .arg("--state-dir")
        .arg(s.state.root())
        .args(["--output", "json", "up", "--timeout", "60s", "--spec"])
        .arg(&s.spec)
        .arg("--agent-bin")
        .arg(&s.agent_bin)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (ok, stdout, stderr) =
        tokio::task::spawn_blocking(move || finish_child(child, Duration::from_secs(60)))
            .await
            .unwrap();
    assert!(ok, "{stdout}\n{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.first().unwrap()["kind"], "plan", "{stdout}");
    let summary = lines.last().unwrap();
    assert_eq!(summary["kind"], "summary", "{stdout}");
    assert_eq!(summary["ok"], true);
    assert_eq!(summary["ready"], serde_json::json!(NAMES));
    assert_eq!(summary["nodes"][1]["ip"], "192.168.0.101");
    assert_eq!(summary["nodes"][1]["role"], "agent");
    assert_eq!(summary["nodes"][1]["phase"], "ready");
    assert!(
        summary["kubeconfig"]
            .as_str()
            .is_some_and(|p| p.ends_with(".kube/homelab.yaml"))
    );
    assert_eq!(sim.request_log().mutating_count(), 0);

    drop(agents);
    let _ = serve.kill();
    let _ = serve.wait();
    sim.shutdown().await;
}
