//! Role orchestration end to end over real mTLS against an in-process coordinator, with
//! scripted agents: who is assigned what and when (checked through the event order), the
//! token forms each role receives, no token in events or status, and the duplicate
//! machine-id refusal.

mod common;

use std::{net::Ipv4Addr, time::Duration};

use common::{InProcess, key_and_csr};
use homelab::{
    core::Settings,
    orchestrate::{ClusterSettings, DEFAULT_INSTALLER_URL, DesiredNode},
    spec::Role,
};
use homelab_proto::v1::{
    self as pb, AgentMessage, EnrollRequest, ListNodesRequest, agent_link_client::AgentLinkClient,
    agent_message::Body as Up, coordinator_message::Body as Down,
    enrollment_client::EnrollmentClient, status_client::StatusClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const WAIT: Duration = Duration::from_secs(10);

/// A scripted agent: enrolled, linked, able to report K3s health.
struct Agent {
    name: String,
    tx: mpsc::Sender<AgentMessage>,
    down: Streaming<pb::CoordinatorMessage>,
}

impl Agent {
    async fn join(c: &InProcess, name: &str, machine_id: &str) -> Result<Self, tonic::Status> {
        let token = c.token(name, 3600);
        let (key, csr) = key_and_csr(name);
        let facts = pb::NodeFacts {
            hostname: name.into(),
            machine_id: machine_id.into(),
            ..Default::default()
        };
        let chain = EnrollmentClient::new(c.channel(None).await.unwrap())
            .enroll(EnrollRequest {
                token,
                node_name: name.into(),
                csr_pem: csr,
                facts: Some(facts.clone()),
            })
            .await?
            .into_inner()
            .certificate_chain_pem;
        let channel = c.channel(Some((&chain, &key))).await.unwrap();
        let (tx, rx) = mpsc::channel(8);
        tx.send(AgentMessage {
            body: Some(Up::Hello(pb::Hello {
                facts: Some(facts),
                applied_revision: 0,
            })),
        })
        .await
        .unwrap();
        let mut down = AgentLinkClient::new(channel)
            .connect(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let welcome = tokio::time::timeout(WAIT, down.message()).await.unwrap()?;
        assert!(matches!(
            welcome.and_then(|m| m.body),
            Some(Down::Welcome(_))
        ));
        Ok(Self {
            name: name.into(),
            tx,
            down,
        })
    }

    /// The next assignment pushed to this agent: (role, plan).
    async fn assignment(&mut self) -> (String, serde_json::Value) {
        loop {
            let message = tokio::time::timeout(WAIT, self.down.message())
                .await
                .unwrap_or_else(|_| panic!("{} got no assignment in time", self.name))
                .unwrap()
                .unwrap();
            if let Some(Down::Directive(pb::Directive {
                kind: Some(pb::directive::Kind::Assignment(a)),
                ..
            })) = message.body
            {
                return (a.role, serde_json::from_str(&a.plan_json).unwrap());
            }
        }
    }

    /// The next directive that is not an assignment.
    async fn directive(&mut self) -> pb::Directive {
        loop {
            let message = tokio::time::timeout(WAIT, self.down.message())
                .await
                .unwrap_or_else(|_| panic!("{} got no directive in time", self.name))
                .unwrap()
                .unwrap();
            if let Some(Down::Directive(d)) = message.body
                && !matches!(d.kind, Some(pb::directive::Kind::Assignment(_)))
            {
                return d;
            }
        }
    }

    async fn send(&self, body: Up) {
        self.tx
            .send(AgentMessage { body: Some(body) })
            .await
            .unwrap();
    }

    async fn ack(&self, revision: u64, ok: bool, message: &str) {
        self.send(Up::Ack(pb::DirectiveAck {
            revision,
            ok,
            message: message.into(),
        }))
        .await;
    }

    /// Reports K3s health; a server also reports its view of the cluster.
    async fn report(&self, role: &str, ca_hash: &str, ready_nodes: &[&str]) {
        let k3s = pb::K3sHealth {
            role: role.into(),
            unit: if role == "server" { "k3s" } else { "k3s-agent" }.into(),
            unit_state: "active".into(),
            version: "v1.31.4+k3s1".into(),
            applied_revision: 1,
            api_ready: role == "server",
            cluster_ca_sha256: ca_hash.into(),
            nodes: ready_nodes
                .iter()
                .map(|n| pb::NodeCondition {
                    name: (*n).into(),
                    ready: true,
                    reason: "KubeletReady".into(),
                })
                .collect(),
        };
        self.tx
            .send(AgentMessage {
                body: Some(Up::Health(pb::HealthReport {
                    healthy: true,
                    detail: format!("{} active", k3s.unit),
                    k3s: Some(k3s),
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
    }
}

fn desired(nodes: &[(&str, Role, u8)]) -> Vec<DesiredNode> {
    nodes
        .iter()
        .map(|(name, role, last)| DesiredNode {
            name: (*name).into(),
            role: *role,
            ip: Ipv4Addr::new(192, 168, 0, *last),
        })
        .collect()
}

fn settings() -> ClusterSettings {
    ClusterSettings {
        version: Some("v1.31.4+k3s1".into()),
        channel: "stable".into(),
        server_flags: vec!["--disable".into(), "traefik".into()],
        install_revision: 1,
        config: Default::default(),
        installer: serde_json::json!({ "url": DEFAULT_INSTALLER_URL }),
    }
}

/// `node.assigned` and `node.ready` events in order: (node, kind).
fn order(c: &InProcess) -> Vec<(String, String)> {
    c.core
        .store()
        .events_after(0, None, 100_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "node.assigned" || e.kind == "node.ready")
        .map(|e| (e.node, e.kind))
        .collect()
}

/// Waits until `check` holds on the event log.
async fn until(c: &InProcess, what: &str, check: impl Fn(&[(String, String)]) -> bool) {
    tokio::time::timeout(WAIT, async {
        loop {
            if check(&order(c)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}: {:?}", order(c)));
}

fn assigned(events: &[(String, String)], node: &str) -> bool {
    events
        .iter()
        .any(|(n, k)| n == node && k == "node.assigned")
}

const CA: &str = "0f0e0d0c0b0a09080706050403020100f0e0d0c0b0a090807060504030201000";

#[tokio::test]
async fn one_server_two_agents_agents_join_the_ready_server_with_pinned_agent_tokens() {
    let c = InProcess::start(Settings::default()).await;
    c.core
        .set_desired_cluster(
            &desired(&[
                ("k3s-control", Role::Server, 100),
                ("k3s-node-1", Role::Agent, 101),
                ("k3s-node-2", Role::Agent, 102),
            ]),
            &settings(),
        )
        .unwrap();
    let mut server = Agent::join(&c, "k3s-control", "m-control").await.unwrap();
    let mut a1 = Agent::join(&c, "k3s-node-1", "m-node-1").await.unwrap();
    let mut a2 = Agent::join(&c, "k3s-node-2", "m-node-2").await.unwrap();

    let (role, plan) = server.assignment().await;
    assert_eq!(role, "server");
    assert!(plan["config"].get("cluster-init").is_none());
    assert_eq!(plan["config"]["disable"], serde_json::json!(["traefik"]));
    let secrets = c.core.store().cluster_secrets(|| unreachable!()).unwrap();
    assert_eq!(
        plan["token"],
        serde_json::json!(secrets.server_token),
        "short form on the first server"
    );
    // The agents are connected, but the server is not Ready: they wait.
    let events = order(&c);
    assert!(
        !assigned(&events, "k3s-node-1") && !assigned(&events, "k3s-node-2"),
        "{events:?}"
    );

    server.report("server", CA, &["k3s-control"]).await;
    for agent in [&mut a1, &mut a2] {
        let (role, plan) = agent.assignment().await;
        assert_eq!(role, "agent");
        let token = plan["token"].as_str().unwrap();
        assert!(token.starts_with(&format!("K10{CA}::node:")), "{token}");
        assert!(
            !token.contains(&secrets.server_token),
            "workers never get the server token"
        );
        assert!(plan.get("agent_token").is_none());
        assert_eq!(
            plan["config"]["server"],
            serde_json::json!("https://192.168.0.100:6443")
        );
    }

    // No token in any event, nor in what the operator API shows.
    let events = c.core.store().events_after(0, None, 100_000).unwrap();
    let status = StatusClient::new(c.operator_channel().await)
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner();
    let shown = format!("{status:?}");
    for secret in [&secrets.server_token, &secrets.agent_token] {
        assert!(
            !events.iter().any(|e| e.message.contains(secret.as_str())),
            "a token in the event log"
        );
        assert!(!shown.contains(secret.as_str()), "a token in status output");
    }
    let control = status
        .nodes
        .iter()
        .find(|n| n.name == "k3s-control")
        .unwrap();
    assert!(control.ready && control.role == "server", "{control:?}");
    c.stop().await;
}

#[tokio::test]
async fn three_servers_join_one_at_a_time_and_agents_in_parallel() {
    let c = InProcess::start(Settings::default()).await;
    c.core
        .set_desired_cluster(
            &desired(&[
                ("s1", Role::Server, 11),
                ("s2", Role::Server, 12),
                ("s3", Role::Server, 13),
                ("a1", Role::Agent, 21),
                ("a2", Role::Agent, 22),
            ]),
            &settings(),
        )
        .unwrap();
    let mut nodes = Vec::new();
    for name in ["s1", "s2", "s3", "a1", "a2"] {
        nodes.push(Agent::join(&c, name, &format!("m-{name}")).await.unwrap());
    }
    let (_, plan) = nodes[0].assignment().await;
    assert_eq!(plan["config"]["cluster-init"], serde_json::json!(true));
    let events = order(&c);
    assert!(
        !assigned(&events, "s2") && !assigned(&events, "s3"),
        "{events:?}"
    );

    // s1 Ready: s2 joins, the agents too, s3 still waits for s2.
    nodes[0].report("server", CA, &["s1"]).await;
    until(&c, "s2 and the agents assigned", |e| {
        assigned(e, "s2") && assigned(e, "a1") && assigned(e, "a2")
    })
    .await;
    assert!(!assigned(&order(&c), "s3"), "{:?}", order(&c));
    let (_, s2) = nodes[1].assignment().await;
    assert!(
        s2["token"]
            .as_str()
            .unwrap()
            .starts_with(&format!("K10{CA}::server:"))
    );
    assert_eq!(
        s2["config"]["server"],
        serde_json::json!("https://192.168.0.11:6443")
    );

    // s2 Ready (as s1 sees it): now s3.
    nodes[0].report("server", CA, &["s1", "s2"]).await;
    until(&c, "s3 assigned", |e| assigned(e, "s3")).await;
    let events = order(&c);
    let position = |node: &str, kind: &str| {
        events
            .iter()
            .position(|(n, k)| n == node && k == kind)
            .unwrap()
    };
    assert!(position("s1", "node.assigned") < position("s1", "node.ready"));
    assert!(position("s1", "node.ready") < position("s2", "node.assigned"));
    assert!(position("s2", "node.assigned") < position("s2", "node.ready"));
    assert!(
        position("s2", "node.ready") < position("s3", "node.assigned"),
        "{events:?}"
    );
    c.stop().await;
}

#[tokio::test]
async fn a_reconnecting_node_gets_its_plan_again_and_unchanged_plans_are_not_repeated() {
    let c = InProcess::start(Settings::default()).await;
    c.core
        .set_desired_cluster(&desired(&[("s1", Role::Server, 11)]), &settings())
        .unwrap();
    let mut first = Agent::join(&c, "s1", "m-s1").await.unwrap();
    let (_, plan) = first.assignment().await;
    // Health reports trigger orchestration, but an unchanged plan is not pushed again.
    first.report("server", CA, &["s1"]).await;
    until(&c, "s1 Ready", |e| {
        e.iter().any(|(n, k)| n == "s1" && k == "node.ready")
    })
    .await;
    let assignments = order(&c)
        .iter()
        .filter(|(_, k)| k == "node.assigned")
        .count();
    assert_eq!(assignments, 1);
    drop(first);
    // A new link (after a restart or a cut) gets the same plan again, as a new directive.
    let mut again = Agent::join(&c, "s1", "m-s1").await;
    let again = again.as_mut().unwrap();
    let (_, replayed) = again.assignment().await;
    assert_eq!(replayed["config"], plan["config"]);
    assert!(replayed["revision"].as_u64() > plan["revision"].as_u64());
    // A changed desired state (install_revision bump) is pushed at once.
    let mut bumped = settings();
    bumped.install_revision = 2;
    c.core
        .set_desired_cluster(&desired(&[("s1", Role::Server, 11)]), &bumped)
        .unwrap();
    let (_, newer) = again.assignment().await;
    assert_eq!(newer["install_revision"], serde_json::json!(2));
    c.stop().await;
}

#[tokio::test]
async fn a_cloned_machine_id_is_refused_by_name() {
    let c = InProcess::start(Settings::default()).await;
    let _first = Agent::join(&c, "k3s-node-1", "same-machine-id")
        .await
        .unwrap();
    let err = Agent::join(&c, "k3s-node-2", "same-machine-id")
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("machine-id same-machine-id"),
        "{err:?}"
    );
    assert!(err.message().contains("k3s-node-1"), "{err:?}");
    c.stop().await;
}

#[tokio::test]
async fn kubeconfig_comes_from_a_ready_server_pointed_at_its_address() {
    let c = InProcess::start(Settings::default()).await;
    c.core
        .set_desired_cluster(&desired(&[("s1", Role::Server, 11)]), &settings())
        .unwrap();
    let mut server = Agent::join(&c, "s1", "m-s1").await.unwrap();
    server.assignment().await;
    server.report("server", CA, &["s1"]).await;
    until(&c, "s1 Ready", |e| {
        e.iter().any(|(n, k)| n == "s1" && k == "node.ready")
    })
    .await;
    let mut admin = homelab_proto::v1::admin_client::AdminClient::new(c.operator_channel().await);
    let call = tokio::spawn(async move {
        admin
            .get_kubeconfig(pb::GetKubeconfigRequest {})
            .await
            .map(tonic::Response::into_inner)
    });
    let directive = server.directive().await;
    assert!(matches!(
        directive.kind,
        Some(pb::directive::Kind::FetchKubeconfig(_))
    ));
    server
        .send(Up::Kubeconfig(pb::KubeconfigReply {
            revision: directive.revision,
            content: "clusters:\n- cluster:\n    server: https://127.0.0.1:6443\n".into(),
        }))
        .await;
    let reply = call.await.unwrap().unwrap();
    assert_eq!(reply.server, "s1");
    assert!(
        reply.content.contains("server: https://192.168.0.11:6443"),
        "{}",
        reply.content
    );
    // The credentials are not in the event log.
    let events = c.core.store().events_after(0, None, 100_000).unwrap();
    assert!(!events.iter().any(|e| e.message.contains("clusters:")));
    c.stop().await;
}

#[tokio::test]
async fn removing_a_server_that_would_break_quorum_is_refused() {
    let c = InProcess::start(Settings::default()).await;
    c.core
        .set_desired_cluster(
            &desired(&[("s1", Role::Server, 11), ("s2", Role::Server, 12)]),
            &settings(),
        )
        .unwrap();
    let mut s1 = Agent::join(&c, "s1", "m-s1").await.unwrap();
    let _s2 = Agent::join(&c, "s2", "m-s2").await.unwrap();
    s1.assignment().await;
    s1.report("server", CA, &["s1", "s2"]).await;
    until(&c, "both Ready", |e| {
        e.iter().filter(|(_, k)| k == "node.ready").count() == 2
    })
    .await;
    let err = homelab_proto::v1::admin_client::AdminClient::new(c.operator_channel().await)
        .remove_node(pb::RemoveNodeRequest {
            name: "s2".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("quorum"), "{err:?}");
    assert_eq!(c.core.roles().unwrap().len(), 2, "nothing was removed");
    c.stop().await;
}

#[tokio::test]
async fn removing_an_agent_drains_uninstalls_and_deletes_it() {
    let c = InProcess::start(Settings::default()).await;
    c.core
        .set_desired_cluster(
            &desired(&[("s1", Role::Server, 11), ("a1", Role::Agent, 21)]),
            &settings(),
        )
        .unwrap();
    let mut s1 = Agent::join(&c, "s1", "m-s1").await.unwrap();
    let mut a1 = Agent::join(&c, "a1", "m-a1").await.unwrap();
    s1.assignment().await;
    s1.report("server", CA, &["s1", "a1"]).await;
    a1.assignment().await;
    let mut admin = homelab_proto::v1::admin_client::AdminClient::new(c.operator_channel().await);
    let call = tokio::spawn(async move {
        admin
            .remove_node(pb::RemoveNodeRequest {
                name: "a1".into(),
                force: false,
            })
            .await
            .map(tonic::Response::into_inner)
    });
    let drain = s1.directive().await;
    match &drain.kind {
        Some(pb::directive::Kind::Kubectl(k)) => {
            assert_eq!(k.action, pb::kubectl::Action::Drain as i32);
            assert_eq!(k.node, "a1");
        }
        other => panic!("expected a drain, got {other:?}"),
    }
    s1.ack(drain.revision, true, "drained").await;
    let uninstall = a1.directive().await;
    assert!(matches!(
        uninstall.kind,
        Some(pb::directive::Kind::Uninstall(_))
    ));
    a1.ack(uninstall.revision, true, "uninstalled").await;
    let delete = s1.directive().await;
    match &delete.kind {
        Some(pb::directive::Kind::Kubectl(k)) => {
            assert_eq!(k.action, pb::kubectl::Action::DeleteNode as i32)
        }
        other => panic!("expected a node delete, got {other:?}"),
    }
    s1.ack(delete.revision, true, "deleted").await;
    let removal = call.await.unwrap().unwrap();
    assert!(
        removal.drained && removal.uninstalled && removal.node_deleted,
        "{removal:?}"
    );
    assert!(removal.warnings.is_empty(), "{removal:?}");
    assert!(!c.core.roles().unwrap().contains_key("a1"));
    let kinds: Vec<_> = c
        .core
        .store()
        .events_after(0, Some("a1"), 1000)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(kinds.contains(&"node.removed".to_owned()), "{kinds:?}");
    c.stop().await;
}

#[tokio::test]
async fn without_a_cni_agents_join_a_server_whose_api_serves() {
    // flannel-backend: none (for Cilium): every Node stays NotReady until a CNI is installed
    // through the API, so joins wait for the API, not for Node Ready.
    let c = InProcess::start(Settings::default()).await;
    c.core
        .set_desired_cluster(
            &desired(&[("s1", Role::Server, 11), ("a1", Role::Agent, 21)]),
            &settings(),
        )
        .unwrap();
    let mut s1 = Agent::join(&c, "s1", "m-s1").await.unwrap();
    let mut a1 = Agent::join(&c, "a1", "m-a1").await.unwrap();
    s1.assignment().await;
    s1.send(Up::Health(pb::HealthReport {
        healthy: true,
        detail: "k3s active; waiting for CNI".into(),
        k3s: Some(pb::K3sHealth {
            role: "server".into(),
            unit: "k3s".into(),
            unit_state: "active".into(),
            version: "v1.31.4+k3s1".into(),
            applied_revision: 1,
            api_ready: true,
            cluster_ca_sha256: CA.into(),
            nodes: vec![pb::NodeCondition {
                name: "s1".into(),
                ready: false,
                reason: "KubeletNotReady".into(),
            }],
        }),
        ..Default::default()
    }))
    .await;
    let (role, _) = a1.assignment().await;
    assert_eq!(role, "agent");
    let status = StatusClient::new(c.operator_channel().await)
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner();
    let s1 = status.nodes.iter().find(|n| n.name == "s1").unwrap();
    assert!(!s1.ready, "the Node itself is still NotReady: {s1:?}");
    c.stop().await;
}
