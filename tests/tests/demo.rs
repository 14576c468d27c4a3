//! `homelab demo`, the README's main command: a coordinator and three agents on loopback go
//! from enrollment to Ready with their K3s roles, and the command exits 0 when asked to stop
//! there.

mod common;

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

/// Runs `homelab demo` into `dir`, killing it if it outlives 90 s: (success, stdout).
fn demo(dir: &Path) -> (bool, String) {
    let child = Command::new(common::bin("homelab"))
        .args([
            "demo",
            "--exit-when-ready",
            "--timeout",
            "60s",
            "--output",
            "json",
            "--dir",
        ])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (ok, stdout, _) = common::finish_child(child, Duration::from_secs(90));
    (ok, stdout)
}

#[test]
fn the_demo_brings_three_nodes_to_ready_with_their_roles() {
    let dir = tempfile::tempdir().unwrap();
    let demo_dir = dir.path().join("demo");
    let (status, stdout) = demo(&demo_dir);
    assert!(status, "the demo failed");
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let has = |node: &str, kind: &str| {
        events
            .iter()
            .any(|e| e["node"] == node && e["kind"] == kind)
    };
    for node in ["k3s-control", "k3s-node-1", "k3s-node-2"] {
        // Its VM was provisioned on the simulator (the seed's token), then it came up.
        let seeded = events.iter().any(|e| {
            e["node"] == node
                && e["kind"] == "token.created"
                && e["message"].as_str().is_some_and(|m| m.contains("seed"))
        });
        assert!(seeded, "{node} provisioned on the simulator");
        assert!(has(node, "node.enrolled"), "{node} enrolled");
        assert!(has(node, "node.assigned"), "{node} assigned");
        assert!(has(node, "node.ready"), "{node} Ready");
    }
    // Running it again wipes its own directory and starts over.
    let (again, _) = demo(&demo_dir);
    assert!(again);
}
