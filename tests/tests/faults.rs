//! Faults, healed. The coordinator and every agent run as separate hosts: the real
//! `homelab serve` in a hub network namespace, each real `homelab-agent` (with the K3s
//! fakes) in a namespace of its own, linked to the hub by a veth pair (`common::netns`).
//! Each test breaks something in the middle of a rollout or a renewal, lets it heal, then
//! checks the same things:
//!
//! - the rollout completes: every node Ready, healthy and connected in `homelab status`;
//! - no step ran twice where it must not: the fake installer ran once per node (its
//!   `fake-install.log`), the unit was enabled once (fake systemctl's `calls.log`);
//! - the state database passes `PRAGMA integrity_check` (sqlite3, read-only, daemon stopped);
//! - every event is in the log: each node enrolled once, then was assigned, then became
//!   Ready, in that order, the server Ready before any agent was assigned, and the event ids
//!   have no gap.
//!
//! The Proxmox simulator test restarts `pve-sim` (with `--state`) in the middle of a clone
//! and checks that `homelab apply` completes and no VM is duplicated.
//!
//! Installs are held at a gate: each node's `install.sh` is a wrapper that records its pid in
//! `installer.pids` and waits (at most 60 s) for a `gate` file before it runs the fake
//! installer. That is how a test knows an install is in progress and keeps it there while it
//! cuts a link or kills a process.
//!
//! Bounds come from the system's own limits: the agent's HTTP/2 keepalive notices a dead link
//! within 25 s (15 s interval, 10 s timeout), the coordinator's within 30 s (20 s + 10 s),
//! and reconnect backoff is capped at 30 s with a 10 s connect timeout.

mod common;

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::{AgentProcess, CoordinatorProcess, bin, netns::Lab, prepare_fake_k3s};
use homelab::{
    orchestrate::{ClusterSettings, DesiredNode, record_desired},
    spec::Role,
};

/// A dead link is noticed by the agent (25 s) and by the coordinator (30 s), with room.
const NOTICE: Duration = Duration::from_secs(40);
/// Reconnecting after a heal: backoff cap 30 s plus a 10 s connect timeout, plus the
/// install and the health report that follow.
const HEAL: Duration = Duration::from_secs(60);

/// Polls `check` every 200 ms (a CLI call is heavier than a file read) until it returns
/// `Some`, or panics after `timeout` naming `what`.
fn poll<T>(timeout: Duration, what: &str, check: impl FnMut() -> Option<T>) -> T {
    common::wait_for_every(Duration::from_millis(200), timeout, what, check)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The installer every node's plan names: a gate in front of the fake install.sh.
const GATE_WRAPPER: &str = r#"#!/bin/sh
# Stands in for install.sh in the fault tests: records its pid, waits (bounded) until the
# test creates the gate file, then runs the fake installer next to the real one's place.
dir=@DIR@
echo "$$" >>"$dir/installer.pids"
i=0
while [ ! -e "$dir/gate" ]; do
    i=$((i + 1))
    if [ "$i" -gt 1200 ]; then
        echo "the test never opened the gate" >&2
        exit 1
    fi
    sleep 0.05
done
exec /bin/sh "$dir/root/opt/homelab-test/fake-install.sh" "$@"
"#;

/// A coordinator in the hub namespace and one agent per node namespace. Fields drop in
/// order: agents, then the coordinator (and its temporary directory), then the namespaces.
struct Cluster {
    agents: Vec<AgentProcess>,
    coordinator: CoordinatorProcess,
    lab: Lab,
    names: Vec<String>,
}

impl Cluster {
    /// Starts `serve` with `serve_args` and one agent per node. With `desired`, the nodes
    /// form a K3s cluster whose installs wait at their gates; without, they only connect.
    fn start(nodes: &[(&str, Role)], desired: bool, serve_args: &[&str]) -> Self {
        let lab = Lab::new(nodes.len());
        let sans = lab.san_args();
        let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
        let mut coordinator = CoordinatorProcess::init_in(lab.hub.name(), &sans, serve_args);
        if desired {
            desire(&coordinator, nodes);
        }
        coordinator.start();
        let port = coordinator.address.unwrap().port();
        let fake_cluster = coordinator.dir.path().join("fake-cluster");
        fs::create_dir_all(&fake_cluster).unwrap();
        let mut agents = Vec::new();
        for (i, (name, _)) in nodes.iter().enumerate() {
            let (extra, _) = prepare_fake_k3s(&coordinator, name, &fake_cluster);
            let node_dir = coordinator.dir.path().join("agents").join(name);
            let installer = node_dir.join("root/opt/homelab-test/install.sh");
            fs::rename(&installer, installer.with_file_name("fake-install.sh")).unwrap();
            fs::write(
                &installer,
                GATE_WRAPPER.replace("@DIR@", &format!("'{}'", node_dir.display())),
            )
            .unwrap();
            let token = coordinator.token(name);
            let url = format!("https://{}:{port}", Lab::hub_address(i));
            agents.push(AgentProcess::start_in(
                Some(lab.nodes[i].name()),
                coordinator.dir.path(),
                &url,
                &coordinator.state,
                name,
                &token,
                &extra,
            ));
        }
        Self {
            agents,
            coordinator,
            lab,
            names: nodes.iter().map(|(n, _)| (*n).to_owned()).collect(),
        }
    }

    fn node_dir(&self, name: &str) -> PathBuf {
        self.coordinator.dir.path().join("agents").join(name)
    }

    fn open_gate(&self, name: &str) {
        fs::write(self.node_dir(name).join("gate"), "").unwrap();
    }

    /// Pids of the gate wrapper, one per run of the install step.
    fn installer_pids(&self, name: &str) -> Vec<String> {
        read_lines(&self.node_dir(name).join("installer.pids"))
    }

    /// How many times the fake installer itself ran.
    fn installer_runs(&self, name: &str) -> usize {
        read_lines(
            &self
                .node_dir(name)
                .join("root/opt/homelab-test/fake-install.log"),
        )
        .iter()
        .filter(|l| *l == "invocation")
        .count()
    }

    /// The fake systemctl's record of every call on this node.
    fn systemctl_calls(&self, name: &str) -> Vec<String> {
        read_lines(&self.node_dir(name).join("bin/fake-systemctl.d/calls.log"))
    }

    /// `systemctl is-active` of `unit` as the fake systemctl keeps it.
    fn unit_state(&self, name: &str, unit: &str) -> String {
        fs::read_to_string(
            self.node_dir(name)
                .join(format!("bin/fake-systemctl.d/{unit}.state")),
        )
        .unwrap_or_default()
        .trim()
        .to_owned()
    }

    fn agent(&self, name: &str) -> &AgentProcess {
        self.agents.iter().find(|a| a.name == name).unwrap()
    }

    fn agent_mut(&mut self, name: &str) -> &mut AgentProcess {
        self.agents.iter_mut().find(|a| a.name == name).unwrap()
    }

    /// `homelab status --output json`, or `None` while the daemon does not answer.
    fn status(&self) -> Option<serde_json::Value> {
        let out = self.coordinator.cli(&["status", "--output", "json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    fn node_status(&self, name: &str) -> Option<serde_json::Value> {
        self.status()?["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["name"] == name)
            .cloned()
    }

    /// Waits until every node is connected, Ready (when `ready`) and healthy.
    fn wait_all(&self, timeout: Duration, ready: bool, what: &str) -> serde_json::Value {
        poll(timeout, what, || {
            let status = self.status()?;
            let nodes = status["nodes"].as_array()?;
            let done = nodes.len() == self.names.len()
                && nodes.iter().all(|n| {
                    n["connected"] == true
                        && n["last_health"]["healthy"] == true
                        && (!ready || n["ready"] == true)
                });
            done.then_some(status)
        })
    }

    /// How often the agent has logged a lost link or a failed attempt to reach the
    /// coordinator.
    fn link_failures(&self, name: &str) -> usize {
        let log = self.agent(name).log();
        log.matches("reconnecting in").count() + log.matches("retrying in").count()
    }

    /// Waits until the agent's log shows that it gave up on its link (or on an attempt).
    fn wait_link_lost(&self, name: &str, before: usize) {
        poll(NOTICE, &format!("{name} noticing its dead link"), || {
            (self.link_failures(name) > before).then_some(())
        });
    }

    /// Stops the daemon and checks what every healed test must show (see the module docs).
    /// `installs`: whether the nodes form a K3s cluster.
    fn check_healed(&mut self, installs: bool) {
        if installs {
            // A node can be Ready (a server sees it) before its agent has acknowledged the
            // assignment re-sent when its link came back: wait for that acknowledgement.
            poll(NOTICE, "every node acknowledging its assignment", || {
                let store = self.coordinator.state.open_store().ok()?;
                let events = store.events_after(0, None, 100_000).ok()?;
                self.names
                    .iter()
                    .all(|name| {
                        events.iter().any(|e| {
                            e.node == *name
                                && e.kind == "directive.acknowledged"
                                && e.message.contains(" applied: ")
                        })
                    })
                    .then_some(())
            });
        }
        self.coordinator.stop();
        let db = self.coordinator.state.root().join("homelab.db");
        let out = Command::new("sqlite3")
            .arg("-readonly")
            .arg(&db)
            .arg("PRAGMA integrity_check;")
            .output()
            .expect("sqlite3 (scripts/setup installs it)");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "ok",
            "integrity_check: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let store = self.coordinator.state.open_store().unwrap();
        let events = store.events_after(0, None, 100_000).unwrap();
        for pair in events.windows(2) {
            assert_eq!(
                pair[1].id,
                pair[0].id + 1,
                "event ids have a gap: {} then {}",
                pair[0].id,
                pair[1].id
            );
        }
        let position = |node: &str, kind: &str| {
            events
                .iter()
                .position(|e| e.node == node && e.kind == kind)
                .unwrap_or_else(|| panic!("no {kind} event for {node}"))
        };
        for name in &self.names {
            let enrolled = events
                .iter()
                .filter(|e| e.node == *name && e.kind == "node.enrolled")
                .count();
            assert_eq!(enrolled, 1, "{name} enrolled once");
            assert!(position(name, "token.created") < position(name, "node.enrolled"));
            assert!(position(name, "node.enrolled") < position(name, "node.connected"));
            if !installs {
                continue;
            }
            assert!(
                position(name, "node.enrolled") < position(name, "node.assigned"),
                "{name}"
            );
            assert!(
                position(name, "node.assigned") < position(name, "node.ready"),
                "{name}"
            );
            assert!(
                position(&self.names[0], "node.ready") <= position(name, "node.assigned")
                    || *name == self.names[0],
                "{name} was assigned before the server was Ready"
            );
            let acks: Vec<&str> = events
                .iter()
                .filter(|e| e.node == *name && e.kind == "directive.acknowledged")
                .map(|e| e.message.as_str())
                .collect();
            assert!(
                acks.iter().any(|m| m.contains(" applied: ")),
                "{name} acknowledged its assignment: {acks:?}"
            );
            assert!(
                !acks.iter().any(|m| m.contains(" failed: ")),
                "{name} failed a directive: {acks:?}"
            );

            assert_eq!(
                self.installer_runs(name),
                1,
                "{name}: the installer ran once"
            );
            let calls = self.systemctl_calls(name);
            let enables = calls.iter().filter(|c| c.starts_with("enable ")).count();
            assert_eq!(enables, 1, "{name}: the unit was enabled once: {calls:?}");
            assert!(
                !calls.iter().any(|c| c.starts_with("restart")),
                "{name}: nothing restarted the unit: {calls:?}"
            );
            // Preflight only reads; these two write and must not repeat.
            for step in ["write-config", "fetch-installer"] {
                let started = events
                    .iter()
                    .filter(|e| {
                        e.node == *name
                            && e.kind == "node.phase"
                            && e.message == format!("install / {step}: started")
                    })
                    .count();
                assert!(started <= 1, "{name}: {step} started {started} times");
            }
        }
        assert!(store.integrity_check().unwrap().is_empty());
    }
}

fn read_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Records the desired cluster as `homelab apply` would, with the gate wrapper as the
/// installer on each node.
fn desire(coordinator: &CoordinatorProcess, nodes: &[(&str, Role)]) {
    let mut settings =
        ClusterSettings::from_spec(&homelab::spec::K3sSpec::default(), Path::new(".")).unwrap();
    settings.installer = serde_json::json!({ "file": "/opt/homelab-test/install.sh" });
    let nodes: Vec<DesiredNode> = nodes
        .iter()
        .enumerate()
        .map(|(i, (name, role))| DesiredNode {
            name: (*name).to_owned(),
            role: *role,
            ip: std::net::Ipv4Addr::new(192, 168, 0, 100 + i as u8),
        })
        .collect();
    let mut store = coordinator.state.open_store().unwrap();
    record_desired(&mut store, &nodes, &settings).unwrap();
}

const SERVER: &str = "k3s-control";
const THREE: [(&str, Role); 3] = [
    (SERVER, Role::Server),
    ("k3s-node-1", Role::Agent),
    ("k3s-node-2", Role::Agent),
];

#[test]
fn an_agent_link_cut_mid_install_heals() {
    let mut c = Cluster::start(&THREE[..2], true, &["--health-interval", "1s"]);
    let node = THREE[1].0;
    c.open_gate(SERVER);
    poll(HEAL, "the agent node in its install step", || {
        (!c.installer_pids(node).is_empty()).then_some(())
    });

    // The install goes on (and finishes) on the far side of a dead link.
    let lost_before = c.link_failures(node);
    c.lab.cut(1);
    c.open_gate(node);
    poll(
        HEAL,
        "the install finishing without the coordinator",
        || (c.unit_state(node, "k3s-agent") == "active").then_some(()),
    );
    c.wait_link_lost(node, lost_before);
    poll(NOTICE, "the coordinator noticing the dead link", || {
        (c.node_status(node)?["connected"] == false).then_some(())
    });

    c.lab.restore(1);
    let healed = Instant::now();
    c.wait_all(HEAL, true, "every node Ready after the link came back");
    eprintln!("healed {:?} after the link came back", healed.elapsed());
    c.check_healed(true);
}

#[test]
fn an_agent_link_cut_mid_renewal_heals() {
    // Renewal is due two thirds into the certificate's lifetime: 80 s after issue. The cut
    // starts just before and lasts until the agent has given up on the link, at most 25 s
    // later, which leaves 15 s before the certificate expires.
    let mut c = Cluster::start(
        &THREE[..1],
        false,
        &["--health-interval", "1s", "--node-cert-ttl", "120s"],
    );
    c.wait_all(Duration::from_secs(30), false, "the node connected");
    let identity = fs::read_to_string(c.agents[0].identity_file()).unwrap();
    let issued: u64 = identity
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("# issued-at-unix: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("issue time line");
    let serial = c.node_status(SERVER).unwrap()["certificate_serial"]
        .as_str()
        .unwrap()
        .to_owned();
    let due = issued + 80;
    poll(Duration::from_secs(90), "shortly before renewal", || {
        (now_unix() + 3 >= due).then_some(())
    });

    let lost_before = c.link_failures(SERVER);
    c.lab.cut(0);
    poll(
        NOTICE,
        "the agent asking for renewal on the cut link",
        || {
            c.agents[0]
                .log()
                .contains("reached two thirds of its lifetime; renewing")
                .then_some(())
        },
    );
    c.wait_link_lost(SERVER, lost_before);
    c.lab.restore(0);

    let renewed = poll(HEAL, "the renewed certificate in use", || {
        let node = c.node_status(SERVER)?;
        let now = node["certificate_serial"].as_str()?.to_owned();
        (node["connected"] == true && now != serial).then_some(now)
    });
    assert!(
        now_unix() < issued + 120,
        "renewal completed before the first certificate expired"
    );
    assert!(
        fs::read_to_string(c.agents[0].identity_file())
            .unwrap()
            .contains("CERTIFICATE"),
    );
    assert_eq!(c.agents[0].exit_code(), None, "the agent keeps running");
    c.check_healed(false);
    let store = c.coordinator.state.open_store().unwrap();
    let renewals = store
        .events_after(0, Some(SERVER), 10_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "node.certificate_renewed")
        .count();
    assert!(renewals >= 1, "renewed to {renewed}");
}

#[test]
fn the_coordinator_partitioned_for_60s_heals() {
    let mut c = Cluster::start(&THREE, true, &["--health-interval", "1s"]);
    for (name, _) in &THREE[1..] {
        c.open_gate(name);
    }
    poll(HEAL, "the server in its install step", || {
        (!c.installer_pids(SERVER).is_empty()).then_some(())
    });

    // 60 s without the coordinator, while the server finishes installing.
    let before: Vec<usize> = THREE.iter().map(|(n, _)| c.link_failures(n)).collect();
    c.lab.partition();
    let partitioned = Instant::now();
    c.open_gate(SERVER);
    poll(
        HEAL,
        "the server's unit active behind the partition",
        || (c.unit_state(SERVER, "k3s") == "active").then_some(()),
    );
    poll(NOTICE, "the coordinator noticing every link dead", || {
        let status = c.status()?;
        status["nodes"]
            .as_array()?
            .iter()
            .all(|n| n["connected"] == false)
            .then_some(())
    });
    for ((name, _), before) in THREE.iter().zip(before) {
        c.wait_link_lost(name, before);
    }
    poll(
        Duration::from_secs(70),
        "the end of the 60 s partition",
        || (partitioned.elapsed() >= Duration::from_secs(60)).then_some(()),
    );
    c.lab.heal();
    let healed = Instant::now();

    c.wait_all(HEAL, true, "every node Ready after the partition");
    eprintln!("healed {:?} after the partition ended", healed.elapsed());
    c.check_healed(true);
}

#[test]
fn the_coordinator_killed_mid_rollout_heals() {
    let mut c = Cluster::start(&THREE, true, &["--health-interval", "1s"]);
    for (name, _) in &THREE[1..] {
        c.open_gate(name);
    }
    poll(HEAL, "the server in its install step", || {
        (!c.installer_pids(SERVER).is_empty()).then_some(())
    });
    c.coordinator.kill();
    c.open_gate(SERVER);
    poll(
        HEAL,
        "the server's unit active without a coordinator",
        || (c.unit_state(SERVER, "k3s") == "active").then_some(()),
    );
    // The same state directory and address.
    c.coordinator.start();
    c.wait_all(HEAL, true, "every node Ready after the restart");
    c.check_healed(true);
}

#[test]
fn an_agent_killed_mid_step_resumes_at_its_checkpoint() {
    let mut c = Cluster::start(&THREE[..1], true, &["--health-interval", "1s"]);
    let pid = poll(HEAL, "the installer running", || {
        c.installer_pids(SERVER).first().cloned()
    });
    let dir = c.node_dir(SERVER);
    let config = dir.join("root/etc/rancher/k3s/config.yaml");
    let fetched = dir.join("state/install.sh");
    let inode = |p: &Path| fs::metadata(p).unwrap().ino();
    let (config_inode, fetched_inode) = (inode(&config), inode(&fetched));

    // kill -9 in the middle of run-installer. systemd would kill the unit's whole cgroup,
    // the installer with it: do the same for the one process the agent started.
    c.agent_mut(SERVER).kill();
    let _ = Command::new("kill").args(["-KILL", &pid]).status();
    c.open_gate(SERVER);
    c.agent_mut(SERVER).restart();
    c.wait_all(HEAL, true, "the node Ready after the restart");

    assert_eq!(
        c.installer_pids(SERVER).len(),
        2,
        "the interrupted step ran again"
    );
    assert_eq!(
        inode(&config),
        config_inode,
        "write-config did not run again"
    );
    assert_eq!(
        inode(&fetched),
        fetched_inode,
        "fetch-installer did not run again"
    );
    c.check_healed(true);
    let store = c.coordinator.state.open_store().unwrap();
    let phases: Vec<String> = store
        .events_after(0, Some(SERVER), 10_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "node.phase")
        .map(|e| e.message)
        .collect();
    for step in ["write-config", "fetch-installer"] {
        let started = format!("install / {step}: started");
        assert_eq!(
            phases.iter().filter(|p| **p == started).count(),
            1,
            "{phases:?}"
        );
    }
    let succeeded = "install / run-installer: succeeded";
    assert_eq!(
        phases.iter().filter(|p| p.starts_with(succeeded)).count(),
        1,
        "{phases:?}"
    );
}

// ---- the Proxmox simulator restarted mid-clone --------------------------------------------

/// A `pve-sim` process keeping its cluster in a state file.
struct SimProcess {
    child: Child,
    details: serde_json::Value,
}

impl SimProcess {
    fn start(state: &Path, listen: &str) -> Self {
        let mut child = Command::new(bin("pve-sim"))
            .args(["--listen", listen, "--clone-delay", "3s", "--state"])
            .arg(state)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("pve-sim prints its details within 20 s");
        let details = serde_json::from_str(&line).expect("pve-sim's details line");
        Self { child, details }
    }

    fn endpoint(&self) -> &str {
        self.details["endpoint"].as_str().unwrap()
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The VMs (not templates) in the simulator's state file: (vmid, config).
fn saved_vms(state: &Path) -> Vec<(u64, serde_json::Value)> {
    let Ok(text) = fs::read_to_string(state) else {
        return Vec::new();
    };
    let Ok(saved) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    saved["vms"]
        .as_object()
        .map(|vms| {
            vms.values()
                .filter(|vm| vm["config"]["template"] != "1")
                .map(|vm| (vm["vmid"].as_u64().unwrap(), vm["config"].clone()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_proxmox_simulator_restarted_mid_clone_duplicates_nothing() {
    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG4x9kQzCxT5Tn2Z2b6T7hR2JwJxWQm0c1lq0f1p2r3s ops@workstation";
    let coordinator = CoordinatorProcess::init(&[]);
    let dir = coordinator.dir.path();
    let state = dir.join("pve-sim.json");
    let mut sim = SimProcess::start(&state, "127.0.0.1:0");
    let endpoint = sim.endpoint().to_owned();
    let fingerprint = sim.details["fingerprint"].clone();
    fs::copy(
        sim.details["ca_pem_path"].as_str().unwrap(),
        dir.join("pve-root-ca.pem"),
    )
    .unwrap();
    fs::write(
        dir.join("token"),
        sim.details["token_secret"].as_str().unwrap(),
    )
    .unwrap();
    fs::write(dir.join("id.pub"), KEY).unwrap();
    fs::write(
        dir.join("homelab-agent"),
        b"\x7fELF a stand-in agent binary",
    )
    .unwrap();
    let spec = homelab::spec::EXAMPLE
        .replace("https://192.168.0.250:8006", &endpoint)
        .replace(
            "homelab@pve!coordinator",
            sim.details["token_id"].as_str().unwrap(),
        )
        .replace(
            "token_secret_env = \"HOMELAB_PROXMOX_TOKEN\"",
            "token_secret_file = \"token\"",
        )
        .replace("~/.ssh/id_ed25519.pub", "id.pub");
    fs::write(dir.join("homelab.toml"), spec).unwrap();
    let apply = || {
        Command::new(bin("homelab"))
            .current_dir(dir)
            .arg("--state-dir")
            .arg(coordinator.state.root())
            .args([
                "apply",
                "--spec",
                "homelab.toml",
                "--agent-bin",
                "homelab-agent",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    // kill -9 while a clone runs: its VM is the locked placeholder.
    let first = apply();
    let cloning = poll(Duration::from_secs(60), "a clone in progress", || {
        saved_vms(&state)
            .into_iter()
            .find(|(_, config)| config["lock"] == "clone")
            .map(|(vmid, _)| vmid)
    });
    sim.child.kill().unwrap();
    sim.child.wait().unwrap();
    let listen = endpoint.trim_start_matches("https://").to_owned();
    sim = SimProcess::start(&state, &listen);
    assert_eq!(
        sim.details["fingerprint"], fingerprint,
        "the restarted simulator presents the same certificate"
    );
    assert!(
        saved_vms(&state).iter().any(|(vmid, _)| *vmid == cloning),
        "the VM being cloned survived the restart"
    );

    // The client retries the task polls the restart refused; the clone ends on schedule.
    let (ok, stdout, stderr) = common::finish_child(first, Duration::from_secs(120));
    assert!(ok, "the interrupted apply:\n{stdout}\n{stderr}");
    let (ok, stdout, stderr) = common::finish_child(apply(), Duration::from_secs(120));
    assert!(ok, "apply after the restart:\n{stdout}\n{stderr}");

    drop(sim);
    let vms = saved_vms(&state);
    let mut names: Vec<&str> = vms
        .iter()
        .map(|(_, config)| config["name"].as_str().unwrap_or("(no name)"))
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["k3s-control", "k3s-node-1", "k3s-node-2"],
        "one VM per node, none duplicated"
    );
    for (vmid, config) in &vms {
        assert!(config.get("lock").is_none(), "VM {vmid} is still locked");
        assert!(
            config["description"]
                .as_str()
                .is_some_and(|d| d.contains("homelab-managed")),
            "VM {vmid}: {config}"
        );
    }
    let saved: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&state).unwrap()).unwrap();
    let clones = saved["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == "Clone")
        .count();
    assert_eq!(clones, 3, "one clone per VM");
    let out = Command::new("sqlite3")
        .arg("-readonly")
        .arg(coordinator.state.root().join("homelab.db"))
        .arg("PRAGMA integrity_check;")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}
