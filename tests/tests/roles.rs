//! K3s roles end to end with the real binaries: `homelab serve` and three `homelab-agent`
//! processes, each in its own temporary host root with the fake install.sh and the fake
//! systemctl, sharing one fake cluster. The coordinator assigns the server first and the
//! agents once the server is Ready; all three end Ready; no token leaks anywhere.

mod common;

use std::{fs, os::unix::fs::PermissionsExt, path::Path, time::Duration};

use common::{AgentProcess, CoordinatorProcess, files, prepare_fake_k3s, wait_for};
use homelab::orchestrate::{ClusterSettings, DesiredNode, record_desired};

const NODES: [(&str, homelab::spec::Role, u8); 3] = [
    ("k3s-control", homelab::spec::Role::Server, 100),
    ("k3s-node-1", homelab::spec::Role::Agent, 101),
    ("k3s-node-2", homelab::spec::Role::Agent, 102),
];

/// Records the desired cluster as `homelab apply` would, with the installer as a file on
/// each node.
fn desire(coordinator: &CoordinatorProcess, nodes: &[(&str, homelab::spec::Role, u8)]) {
    let mut settings =
        ClusterSettings::from_spec(&homelab::spec::K3sSpec::default(), Path::new(".")).unwrap();
    settings.installer = serde_json::json!({ "file": "/opt/homelab-test/install.sh" });
    let nodes: Vec<DesiredNode> = nodes
        .iter()
        .map(|(name, role, last)| DesiredNode {
            name: (*name).to_owned(),
            role: *role,
            ip: std::net::Ipv4Addr::new(192, 168, 0, *last),
        })
        .collect();
    let mut store = coordinator.state.open_store().unwrap();
    record_desired(&mut store, &nodes, &settings).unwrap();
}

/// How many times an installer ran on this node.
fn installer_runs(node_dir: &Path) -> usize {
    files(node_dir)
        .iter()
        .filter(|f| f.file_name().is_some_and(|n| n == "fake-install.log"))
        .map(|f| {
            fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .filter(|l| *l == "invocation")
                .count()
        })
        .sum()
}

#[test]
fn an_agent_killed_mid_install_resumes_at_the_step_it_was_in() {
    let mut coordinator = CoordinatorProcess::init(&["--health-interval", "1s"]);
    desire(
        &coordinator,
        &[("k3s-control", homelab::spec::Role::Server, 100)],
    );
    coordinator.start();
    let cluster = coordinator.dir.path().join("fake-cluster");
    fs::create_dir_all(&cluster).unwrap();
    let (extra, systemctl_state) = prepare_fake_k3s(&coordinator, "k3s-control", &cluster);
    // The unit will not come up: the agent stays in its last step, waiting.
    fs::create_dir_all(&systemctl_state).unwrap();
    fs::write(systemctl_state.join("k3s.start-result"), "activating").unwrap();
    let token = coordinator.token("k3s-control");
    let mut agent = AgentProcess::start_with(&coordinator, "k3s-control", &token, &extra);
    wait_for(
        Duration::from_secs(30),
        "the agent waiting in its start step",
        || {
            let status = coordinator.cli_json(&["status"]);
            let phase = &status["nodes"][0]["last_phase"];
            (phase["step"] == "start" && phase["outcome"] == "started").then_some(())
        },
    );
    let config = agent.dir.join("root/etc/rancher/k3s/config.yaml");
    let config_inode = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&config).unwrap());
    assert_eq!(installer_runs(&agent.dir), 1);

    // kill -9 between two steps' worth of work, let the unit come up, restart the agent.
    agent.kill();
    fs::write(systemctl_state.join("k3s.start-result"), "active").unwrap();
    agent.restart();
    wait_for(
        Duration::from_secs(30),
        "the node Ready after the restart",
        || {
            let status = coordinator.cli_json(&["status"]);
            (status["nodes"][0]["ready"] == true
                && status["nodes"][0]["last_health"]["healthy"] == true)
                .then_some(())
        },
    );
    assert_eq!(
        installer_runs(&agent.dir),
        1,
        "the completed installer step did not run again"
    );
    let inode = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&config).unwrap());
    assert_eq!(inode, config_inode, "config.yaml was not rewritten");
}

#[test]
fn the_server_comes_first_the_agents_follow_and_all_end_ready() {
    let mut coordinator = CoordinatorProcess::init(&["--health-interval", "1s"]);
    desire(&coordinator, &NODES);
    coordinator.start();
    let cluster = coordinator.dir.path().join("fake-cluster");
    fs::create_dir_all(&cluster).unwrap();
    let mut agents = Vec::new();
    for (name, _, _) in NODES {
        let (extra, _) = prepare_fake_k3s(&coordinator, name, &cluster);
        let token = coordinator.token(name);
        agents.push(AgentProcess::start_with(&coordinator, name, &token, &extra));
    }

    let status = wait_for(
        Duration::from_secs(60),
        "all three nodes Ready and healthy",
        || {
            let out = coordinator.cli(&["status", "--output", "json"]);
            let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let nodes = status["nodes"].as_array()?;
            let done = nodes.len() == 3
                && nodes
                    .iter()
                    .all(|n| n["ready"] == true && n["last_health"]["healthy"] == true);
            done.then_some(status)
        },
    );
    for node in status["nodes"].as_array().unwrap() {
        let expected = if node["name"] == "k3s-control" {
            "server"
        } else {
            "agent"
        };
        assert_eq!(node["role"], expected, "{node}");
        assert_eq!(node["last_error"], "", "{node}");
    }

    // The order: the server was assigned and became Ready before any agent was assigned.
    let mut store = coordinator.state.open_store().unwrap();
    let events = store.events_after(0, None, 100_000).unwrap();
    let position = |node: &str, kind: &str| {
        events
            .iter()
            .position(|e| e.node == node && e.kind == kind)
            .unwrap_or_else(|| panic!("no {kind} for {node}"))
    };
    assert!(position("k3s-control", "node.assigned") < position("k3s-control", "node.ready"));
    for agent in ["k3s-node-1", "k3s-node-2"] {
        assert!(
            position("k3s-control", "node.ready") < position(agent, "node.assigned"),
            "{agent}"
        );
    }

    // No token anywhere but the 0600 token files: not in the events, the status output, the
    // agents' and the coordinator's logs, any file of the node roots (unit, env file,
    // config.yaml, the fake installer's record of its argv and environment), the fakes' call logs.
    let secrets = store.cluster_secrets(|| unreachable!()).unwrap();
    drop(store);
    let status_text =
        String::from_utf8(coordinator.cli(&["status", "--output", "json"]).stdout).unwrap();
    let mut haystacks: Vec<(String, String)> = vec![
        ("status".into(), status_text),
        ("coordinator log".into(), coordinator.log()),
        (
            "events".into(),
            events
                .iter()
                .map(|e| e.message.clone())
                .collect::<Vec<_>>()
                .join("\n"),
        ),
    ];
    for agent in &agents {
        haystacks.push((format!("{} log", agent.name), agent.log()));
        for file in files(&agent.dir) {
            let name = file.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with("-token") || name == "k3s-checkpoint.json" {
                let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
                assert_eq!(
                    mode,
                    0o600,
                    "{} holds a secret and must be 0600",
                    file.display()
                );
                continue;
            }
            let bytes = fs::read(&file).unwrap_or_default();
            haystacks.push((
                file.display().to_string(),
                String::from_utf8_lossy(&bytes).into_owned(),
            ));
        }
    }
    for (what, text) in &haystacks {
        for secret in [&secrets.server_token, &secrets.agent_token] {
            assert!(
                !text.contains(secret.as_str()),
                "a K3s token appears in {what}"
            );
        }
    }
}
