//! `homelab demo`, the README's main command: a coordinator and three agents on loopback go
//! from enrollment to Ready with their K3s roles, and the command exits 0 when asked to stop
//! there.

mod common;

use std::{
    io::Read,
    path::Path,
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

/// Runs `homelab demo` into `dir`, killing it if it outlives 90 s: (status, stdout).
fn demo(dir: &Path) -> (ExitStatus, String) {
    let mut child = Command::new(common::bin("homelab"))
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
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status, reader.join().unwrap())
}

#[test]
fn the_demo_brings_three_nodes_to_ready_with_their_roles() {
    let dir = tempfile::tempdir().unwrap();
    let demo_dir = dir.path().join("demo");
    let (status, stdout) = demo(&demo_dir);
    assert!(status.success(), "the demo failed");
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
    assert!(again.success());
}
