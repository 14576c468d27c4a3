//! In-band renewal with certificates that live seconds: the agent renews before expiry and
//! stays connected past the lifetime of its first certificate.

mod common;

use std::time::Duration;

use common::{AgentProcess, CoordinatorProcess, node_summary, wait_for};

#[test]
fn agent_renews_before_expiry_and_stays_connected() {
    // 6 s certificates: renewal is due after 4 s, and the coordinator cuts a link whose
    // certificate expires, so staying connected for several lifetimes proves renewal works.
    let mut coordinator = CoordinatorProcess::init(&["--node-cert-ttl", "6s"]);
    coordinator.start();
    let agent = AgentProcess::start(&coordinator, "k3s-node-1", &coordinator.token("k3s-node-1"));
    let first = wait_for(Duration::from_secs(30), "agent connected", || {
        let status = coordinator.cli_json(&["status"]);
        let nodes = node_summary(&status);
        nodes.first().filter(|n| n.1).map(|n| n.2.clone())
    });
    let renewals = |c: &CoordinatorProcess| {
        c.state
            .open_store()
            .unwrap()
            .events_after(0, Some("k3s-node-1"), 100_000)
            .unwrap()
            .iter()
            .filter(|e| e.kind == "node.certificate_renewed")
            .count()
    };
    // Three renewals take at least 12 s: well past the first certificate's expiry.
    wait_for(Duration::from_secs(40), "three renewals", || {
        (renewals(&coordinator) >= 3).then_some(())
    });
    let latest = wait_for(
        Duration::from_secs(10),
        "agent connected with a new certificate",
        || {
            let status = coordinator.cli_json(&["status"]);
            let nodes = node_summary(&status);
            nodes
                .first()
                .filter(|n| n.1 && n.2 != first)
                .map(|n| n.2.clone())
        },
    );
    assert_ne!(latest, first);
    let enrolled = coordinator
        .state
        .open_store()
        .unwrap()
        .events_after(0, Some("k3s-node-1"), 100_000)
        .unwrap()
        .iter()
        .filter(|e| e.kind == "node.enrolled")
        .count();
    assert_eq!(enrolled, 1, "renewal never re-enrolls");
    let log = agent.log();
    assert!(log.contains("certificate renewed"), "{log}");
}

#[test]
fn operator_can_ask_a_node_to_renew_now() {
    let mut coordinator = CoordinatorProcess::init(&[]);
    coordinator.start();
    let _agent = AgentProcess::start(&coordinator, "k3s-node-1", &coordinator.token("k3s-node-1"));
    let first = wait_for(Duration::from_secs(30), "agent connected", || {
        let nodes = node_summary(&coordinator.cli_json(&["status"]));
        nodes.first().filter(|n| n.1).map(|n| n.2.clone())
    });
    let out = coordinator.cli_json(&["node", "renew", "k3s-node-1"]);
    assert!(out["revision"].as_u64().unwrap() >= 1, "{out}");
    wait_for(
        Duration::from_secs(20),
        "connected with the renewed certificate",
        || {
            let nodes = node_summary(&coordinator.cli_json(&["status"]));
            nodes.first().filter(|n| n.1 && n.2 != first).map(|_| ())
        },
    );
}
