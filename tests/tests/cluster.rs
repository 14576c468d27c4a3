//! The real binaries: one `homelab serve` and three `homelab-agent` processes on 127.0.0.1
//! with ephemeral ports and temporary state directories.

mod common;

use std::{fs, os::unix::fs::PermissionsExt, time::Duration};

use common::{AgentProcess, CoordinatorProcess, node_summary, wait_for};

const NODES: [&str; 3] = ["k3s-control", "k3s-node-1", "k3s-node-2"];

fn all_connected(c: &CoordinatorProcess) -> Option<Vec<(String, bool, String)>> {
    let out = c.cli(&["status", "--output", "json"]);
    if !out.status.success() {
        return None;
    }
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let nodes = node_summary(&status);
    (nodes.len() == NODES.len() && nodes.iter().all(|(_, connected, _)| *connected))
        .then_some(nodes)
}

fn enrolled_events(c: &CoordinatorProcess) -> usize {
    let store = c.state.open_store().unwrap();
    store
        .events_after(0, None, 100_000)
        .unwrap()
        .iter()
        .filter(|e| e.kind == "node.enrolled")
        .count()
}

#[test]
fn three_agents_enroll_stay_connected_and_survive_restarts() {
    let mut coordinator = CoordinatorProcess::init(&[]);
    coordinator.start();
    let mut agents: Vec<AgentProcess> = NODES
        .iter()
        .map(|name| AgentProcess::start(&coordinator, name, &coordinator.token(name)))
        .collect();

    let before = wait_for(Duration::from_secs(30), "three agents connected", || {
        all_connected(&coordinator)
    });
    for agent in &agents {
        assert!(
            !agent.dir.join("token").exists(),
            "{}: used token deleted",
            agent.name
        );
        let mode = fs::metadata(agent.identity_file())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{}: identity is private", agent.name);
    }
    let status = coordinator.cli_json(&["status"]);
    assert_eq!(status["nodes_connected"], 3);
    let node = &status["nodes"][0];
    assert_eq!(
        node["facts"]["hostname"], node["name"],
        "facts reported: {node}"
    );
    assert_eq!(enrolled_events(&coordinator), 3);

    // kill -9 the coordinator and bring it back on the same port: every agent reconnects
    // within 35 s (the backoff cap is 30 s), with the same certificate and no re-enrollment.
    coordinator.kill();
    coordinator.start();
    let after = wait_for(
        Duration::from_secs(35),
        "agents reconnected after a coordinator restart",
        || all_connected(&coordinator),
    );
    assert_eq!(before, after, "same nodes, same certificates");
    assert_eq!(enrolled_events(&coordinator), 3, "nobody enrolled again");

    // Restart one agent: it comes back with the same identity.
    let identity = fs::read(agents[1].identity_file()).unwrap();
    agents[1].restart();
    let again = wait_for(
        Duration::from_secs(35),
        "agent reconnected after its restart",
        || {
            let nodes = all_connected(&coordinator)?;
            let store = coordinator.state.open_store().ok()?;
            let connects = store
                .events_after(0, Some("k3s-node-1"), 10_000)
                .ok()?
                .iter()
                .filter(|e| e.kind == "node.connected")
                .count();
            (connects >= 3).then_some(nodes)
        },
    );
    assert_eq!(before, again);
    assert_eq!(fs::read(agents[1].identity_file()).unwrap(), identity);
    assert_eq!(enrolled_events(&coordinator), 3);

    // The text views work too.
    let nodes = coordinator.cli(&["nodes"]);
    let table = String::from_utf8(nodes.stdout).unwrap();
    assert!(table.starts_with("NAME"), "{table}");
    for name in NODES {
        assert!(table.contains(name), "{table}");
    }
    let store = coordinator.state.open_store().unwrap();
    assert!(store.integrity_check().unwrap().is_empty());
}

#[test]
fn revoke_cuts_a_live_agent_and_a_new_token_readmits_it() {
    let mut coordinator = CoordinatorProcess::init(&[]);
    coordinator.start();
    let mut agent =
        AgentProcess::start(&coordinator, "k3s-node-1", &coordinator.token("k3s-node-1"));
    wait_for(Duration::from_secs(30), "agent connected", || {
        (coordinator.cli_json(&["status"])["nodes_connected"] == 1).then_some(())
    });
    let revoked = coordinator.cli_json(&["node", "revoke", "k3s-node-1"]);
    assert_eq!(revoked["stream_cut"], true, "{revoked}");
    assert_eq!(revoked["via"], "coordinator");
    // The agent learns it is revoked, drops its useless identity and stops for the operator.
    let code = wait_for(Duration::from_secs(20), "revoked agent exit", || {
        agent.exit_code()
    });
    assert_eq!(code, Some(78), "{}", agent.log());
    assert!(agent.log().contains("revoked"), "{}", agent.log());
    assert!(!agent.identity_file().exists());
    let status = coordinator.cli_json(&["status"]);
    assert_eq!(status["nodes_connected"], 0);
    assert_eq!(status["nodes_revoked"], 1);

    // A new token and a restart re-admit the node with a new identity.
    fs::write(agent.dir.join("token"), coordinator.token("k3s-node-1")).unwrap();
    agent.restart();
    wait_for(
        Duration::from_secs(30),
        "re-admitted agent connected",
        || {
            let status = coordinator.cli_json(&["status"]);
            (status["nodes_connected"] == 1 && status["nodes_revoked"] == 0).then_some(())
        },
    );
}

#[test]
fn offline_revoke_is_refused_at_the_next_start() {
    let mut coordinator = CoordinatorProcess::init(&[]);
    coordinator.start();
    let mut agent =
        AgentProcess::start(&coordinator, "k3s-node-1", &coordinator.token("k3s-node-1"));
    wait_for(Duration::from_secs(30), "agent connected", || {
        (coordinator.cli_json(&["status"])["nodes_connected"] == 1).then_some(())
    });
    coordinator.kill();
    // No daemon holds the state directory: the CLI revokes in the database.
    let mut cmd = std::process::Command::new(common::bin("homelab"));
    let out = cmd
        .arg("--state-dir")
        .arg(coordinator.state.root())
        .args(["node", "revoke", "k3s-node-1", "--output", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(revoked["via"], "database", "{revoked}");
    coordinator.start();
    let code = wait_for(Duration::from_secs(40), "revoked agent exit", || {
        agent.exit_code()
    });
    assert_eq!(code, Some(78), "{}", agent.log());
}

#[test]
fn a_second_daemon_on_the_same_state_directory_is_refused() {
    let mut coordinator = CoordinatorProcess::init(&[]);
    coordinator.start();
    let out = std::process::Command::new(common::bin("homelab"))
        .arg("--state-dir")
        .arg(coordinator.state.root())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another `homelab serve` is running"), "{err}");
}

#[test]
fn agent_with_a_used_token_exits_for_the_operator() {
    let mut coordinator = CoordinatorProcess::init(&[]);
    coordinator.start();
    let token = coordinator.token("k3s-node-1");
    let _first = AgentProcess::start(&coordinator, "k3s-node-1", &token);
    wait_for(Duration::from_secs(30), "first agent connected", || {
        (coordinator.cli_json(&["status"])["nodes_connected"] == 1).then_some(())
    });
    // A cloned VM with the same token: refused, exit 78, a clear line in its log.
    let mut clone = AgentProcess::start(&coordinator, "k3s-node-1-clone", &token);
    let code = wait_for(Duration::from_secs(30), "clone agent exit", || {
        clone.exit_code()
    });
    assert_eq!(code, Some(78));
    let log = clone.log();
    assert!(
        log.contains("already used") || log.contains("bound to node"),
        "{log}"
    );
}
