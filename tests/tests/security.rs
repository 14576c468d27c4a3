//! Security negatives and bad input against an in-process coordinator over real mTLS on
//! 127.0.0.1:0: one test per refusal, each checking the precise status and that the daemon
//! keeps serving.

mod common;

use std::time::Duration;

use common::{InProcess, key_and_csr};
use homelab::{core::Settings, pki::NodeName};
use homelab_proto::v1::{
    self as pb, AgentMessage, EnrollRequest, GetNodeRequest, ListNodesRequest,
    RequestRenewalRequest, RevokeNodeRequest, admin_client::AdminClient,
    agent_link_client::AgentLinkClient, agent_message::Body as Up,
    coordinator_message::Body as Down, enrollment_client::EnrollmentClient,
    status_client::StatusClient,
};
use tokio::{io::AsyncWriteExt, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

const WAIT: Duration = Duration::from_secs(10);

/// Enrolls `node` in-process; returns (chain PEM, key PEM).
async fn enroll(c: &InProcess, node: &str) -> (String, String) {
    let token = c.token(node, 3600);
    let (key, csr) = key_and_csr(node);
    let response = EnrollmentClient::new(c.channel(None).await.unwrap())
        .enroll(EnrollRequest {
            token,
            node_name: node.into(),
            csr_pem: csr,
            facts: Some(pb::NodeFacts {
                hostname: node.into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    (response.certificate_chain_pem, key)
}

/// Opens a link as `identity`, sends Hello, and returns the downstream after the Welcome.
async fn link(
    c: &InProcess,
    identity: (&str, &str),
) -> Result<
    (
        mpsc::Sender<AgentMessage>,
        Streaming<pb::CoordinatorMessage>,
    ),
    tonic::Status,
> {
    let channel = c
        .channel(Some(identity))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (tx, rx) = mpsc::channel(4);
    tx.send(AgentMessage {
        body: Some(Up::Hello(pb::Hello::default())),
    })
    .await
    .unwrap();
    let mut down = AgentLinkClient::new(channel)
        .connect(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = tokio::time::timeout(WAIT, down.message()).await.unwrap()?;
    assert!(matches!(first.and_then(|m| m.body), Some(Down::Welcome(_))));
    Ok((tx, down))
}

async fn enroll_status(c: &InProcess, token: String, node: &str, csr: String) -> tonic::Status {
    EnrollmentClient::new(c.channel(None).await.unwrap())
        .enroll(EnrollRequest {
            token,
            node_name: node.into(),
            csr_pem: csr,
            facts: None,
        })
        .await
        .unwrap_err()
}

#[tokio::test]
async fn call_without_client_certificate_is_unauthenticated() {
    let c = InProcess::start(Settings::default()).await;
    let channel = c.channel(None).await.unwrap();
    let err = StatusClient::new(channel.clone())
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let (tx, rx) = mpsc::channel(1);
    tx.send(AgentMessage::default()).await.unwrap();
    let err = AgentLinkClient::new(channel)
        .connect(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    c.stop().await;
}

#[tokio::test]
async fn certificate_from_a_foreign_ca_fails_the_handshake() {
    let c = InProcess::start(Settings::default()).await;
    let (foreign, _) = homelab::pki::CertificateAuthority::generate("foreign").unwrap();
    let node = NodeName::parse("k3s-node-1").unwrap();
    let now = time::OffsetDateTime::now_utc();
    let cert = foreign
        .issue_node_for_testing(
            &node,
            now - time::Duration::hours(1),
            now + time::Duration::hours(1),
        )
        .unwrap();
    let result = match c.channel(Some((&cert.cert_pem, &cert.key_pem))).await {
        Err(e) => Err(e.to_string()),
        Ok(channel) => StatusClient::new(channel)
            .list_nodes(ListNodesRequest {})
            .await
            .map(|_| ())
            .map_err(|s| s.to_string()),
    };
    assert!(result.is_err(), "a foreign certificate was accepted");
    assert!(c.event_kinds("k3s-node-1").is_empty());
    // The daemon keeps serving everyone else.
    StatusClient::new(c.operator_channel().await)
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap();
    c.stop().await;
}

#[tokio::test]
async fn expired_certificate_fails_the_handshake() {
    let c = InProcess::start(Settings::default()).await;
    let node = NodeName::parse("k3s-node-1").unwrap();
    let now = time::OffsetDateTime::now_utc();
    let cert = c
        .core
        .ca()
        .issue_node_for_testing(
            &node,
            now - time::Duration::hours(2),
            now - time::Duration::hours(1),
        )
        .unwrap();
    let result = match c.channel(Some((&cert.cert_pem, &cert.key_pem))).await {
        Err(e) => Err(e.to_string()),
        Ok(channel) => {
            let (tx, rx) = mpsc::channel(1);
            tx.send(AgentMessage::default()).await.unwrap();
            AgentLinkClient::new(channel)
                .connect(ReceiverStream::new(rx))
                .await
                .map(|_| ())
                .map_err(|s| s.to_string())
        }
    };
    assert!(result.is_err(), "an expired certificate was accepted");
    c.stop().await;
}

#[tokio::test]
async fn revoked_node_is_cut_at_once_and_refused_afterwards() {
    let c = InProcess::start(Settings::default()).await;
    let (chain, key) = enroll(&c, "k3s-node-1").await;
    let (_tx, mut down) = link(&c, (&chain, &key)).await.unwrap();
    let response = AdminClient::new(c.operator_channel().await)
        .revoke_node(RevokeNodeRequest {
            name: "k3s-node-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.certificates_revoked, 1);
    assert!(response.stream_cut);
    let ended = tokio::time::timeout(WAIT, down.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(ended.code(), Code::PermissionDenied, "{ended:?}");
    let again = link(&c, (&chain, &key)).await.unwrap_err();
    assert_eq!(again.code(), Code::PermissionDenied, "{again:?}");
    assert!(again.message().contains("revoked"), "{again:?}");
    let kinds = c.event_kinds("k3s-node-1");
    assert!(kinds.contains(&"node.revoked".to_owned()), "{kinds:?}");
    assert!(kinds.contains(&"node.link_refused".to_owned()), "{kinds:?}");
    c.stop().await;
}

#[tokio::test]
async fn reused_token_is_refused_with_its_own_error_and_event() {
    let c = InProcess::start(Settings::default()).await;
    let token = c.token("k3s-node-1", 3600);
    let (_, csr) = key_and_csr("k3s-node-1");
    EnrollmentClient::new(c.channel(None).await.unwrap())
        .enroll(EnrollRequest {
            token: token.clone(),
            node_name: "k3s-node-1".into(),
            csr_pem: csr.clone(),
            facts: None,
        })
        .await
        .unwrap();
    let err = enroll_status(&c, token, "k3s-node-1", csr).await;
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("already used"), "{err:?}");
    assert!(
        c.event_kinds("k3s-node-1")
            .contains(&"enroll.token_reused".to_owned())
    );
    c.stop().await;
}

#[tokio::test]
async fn expired_token_is_refused_with_its_own_error_and_event() {
    let c = InProcess::start(Settings::default()).await;
    let token = c.token("k3s-node-1", -1);
    let (_, csr) = key_and_csr("k3s-node-1");
    let err = enroll_status(&c, token, "k3s-node-1", csr).await;
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("expired"), "{err:?}");
    assert!(
        c.event_kinds("k3s-node-1")
            .contains(&"enroll.token_expired".to_owned())
    );
    c.stop().await;
}

#[tokio::test]
async fn token_for_another_node_is_refused_with_its_own_error_and_event() {
    let c = InProcess::start(Settings::default()).await;
    let token = c.token("k3s-node-1", 3600);
    let (_, csr) = key_and_csr("k3s-node-2");
    let err = enroll_status(&c, token.clone(), "k3s-node-2", csr).await;
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("bound to node \"k3s-node-1\""),
        "{err:?}"
    );
    assert!(
        c.event_kinds("k3s-node-2")
            .contains(&"enroll.token_wrong_node".to_owned())
    );
    // The refusal did not burn the token for its rightful node.
    let (_, csr) = key_and_csr("k3s-node-1");
    EnrollmentClient::new(c.channel(None).await.unwrap())
        .enroll(EnrollRequest {
            token,
            node_name: "k3s-node-1".into(),
            csr_pem: csr,
            facts: None,
        })
        .await
        .unwrap();
    c.stop().await;
}

#[tokio::test]
async fn unknown_token_is_unauthenticated() {
    let c = InProcess::start(Settings::default()).await;
    let (_, csr) = key_and_csr("k3s-node-1");
    let err = enroll_status(&c, "hlet_not-a-token".into(), "k3s-node-1", csr).await;
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("not valid"), "{err:?}");
    c.stop().await;
}

#[tokio::test]
async fn agent_certificate_cannot_call_status_or_admin() {
    let c = InProcess::start(Settings::default()).await;
    let (chain, key) = enroll(&c, "k3s-node-1").await;
    let channel = c.channel(Some((&chain, &key))).await.unwrap();
    let err = StatusClient::new(channel.clone())
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = AdminClient::new(channel)
        .revoke_node(RevokeNodeRequest {
            name: "k3s-node-2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    c.stop().await;
}

#[tokio::test]
async fn operator_certificate_cannot_pose_as_a_node() {
    let c = InProcess::start(Settings::default()).await;
    let cert = std::fs::read_to_string(c.state.operator_cert()).unwrap();
    let key = std::fs::read_to_string(c.state.operator_key()).unwrap();
    let err = link(&c, (&cert, &key)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    c.stop().await;
}

#[tokio::test]
async fn malformed_csr_is_invalid_argument_and_does_not_burn_the_token() {
    let c = InProcess::start(Settings::default()).await;
    let token = c.token("k3s-node-1", 3600);
    let err = enroll_status(&c, token.clone(), "k3s-node-1", "garbage".into()).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("certificate signing request"),
        "{err:?}"
    );
    let (_, wrong_name) = key_and_csr("k3s-node-2");
    let err = enroll_status(&c, token.clone(), "k3s-node-1", wrong_name).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("is not the node name"), "{err:?}");
    let (_, csr) = key_and_csr("k3s-node-1");
    EnrollmentClient::new(c.channel(None).await.unwrap())
        .enroll(EnrollRequest {
            token,
            node_name: "k3s-node-1".into(),
            csr_pem: csr,
            facts: None,
        })
        .await
        .expect("the token still works after refused CSRs");
    assert!(
        c.event_kinds("k3s-node-1")
            .contains(&"enroll.bad_csr".to_owned())
    );
    c.stop().await;
}

#[tokio::test]
async fn oversized_message_is_refused_with_the_sizes_named() {
    let c = InProcess::start(Settings::default()).await;
    let token = c.token("k3s-node-1", 3600);
    let err = enroll_status(
        &c,
        token,
        "k3s-node-1",
        "x".repeat(homelab::grpc::MAX_MESSAGE_BYTES + 1),
    )
    .await;
    // tonic reports a message over the decoding limit as OUT_OF_RANGE, naming both sizes.
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(
        err.message().contains("the limit is: 65536 bytes"),
        "{err:?}"
    );
    // Nothing was consumed: the daemon still serves.
    StatusClient::new(c.operator_channel().await)
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap();
    c.stop().await;
}

#[tokio::test]
async fn garbage_bytes_on_the_port_do_not_disturb_the_daemon() {
    let c = InProcess::start(Settings::default()).await;
    for _ in 0..5 {
        let mut raw = tokio::net::TcpStream::connect(c.address).await.unwrap();
        let garbage: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let _ = raw.write_all(&garbage).await;
        let _ = raw.shutdown().await;
    }
    let nodes = StatusClient::new(c.operator_channel().await)
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap();
    assert!(nodes.into_inner().nodes.is_empty());
    assert!(c.core.store().integrity_check().unwrap().is_empty());
    c.stop().await;
}

#[tokio::test]
async fn unknown_node_is_not_found() {
    let c = InProcess::start(Settings::default()).await;
    let err = StatusClient::new(c.operator_channel().await)
        .get_node(GetNodeRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = AdminClient::new(c.operator_channel().await)
        .revoke_node(RevokeNodeRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    c.stop().await;
}

#[tokio::test]
async fn first_link_message_must_be_hello() {
    let c = InProcess::start(Settings::default()).await;
    let (chain, key) = enroll(&c, "k3s-node-1").await;
    let (tx, rx) = mpsc::channel(1);
    tx.send(AgentMessage {
        body: Some(Up::Health(pb::HealthReport::default())),
    })
    .await
    .unwrap();
    let err = AgentLinkClient::new(c.channel(Some((&chain, &key))).await.unwrap())
        .connect(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    c.stop().await;
}

#[tokio::test]
async fn directives_are_pushed_to_a_connected_agent() {
    let c = InProcess::start(Settings::default()).await;
    let (chain, key) = enroll(&c, "k3s-node-1").await;
    let (_tx, mut down) = link(&c, (&chain, &key)).await.unwrap();
    let revision = AdminClient::new(c.operator_channel().await)
        .request_renewal(RequestRenewalRequest {
            name: "k3s-node-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .revision;
    let message = tokio::time::timeout(WAIT, down.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match message.body {
        Some(Down::Directive(d)) => {
            assert_eq!(d.revision, revision);
            assert!(matches!(
                d.kind,
                Some(pb::directive::Kind::RenewCertificate(_))
            ));
        }
        other => panic!("expected a directive, got {other:?}"),
    }
    c.stop().await;
}

#[tokio::test]
async fn a_newer_link_replaces_the_older_one() {
    let c = InProcess::start(Settings::default()).await;
    let (chain, key) = enroll(&c, "k3s-node-1").await;
    let (_tx1, mut first) = link(&c, (&chain, &key)).await.unwrap();
    let (_tx2, _second) = link(&c, (&chain, &key)).await.unwrap();
    let ended = tokio::time::timeout(WAIT, first.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(ended.code(), Code::Aborted, "{ended:?}");
    assert!(c.core.is_connected("k3s-node-1"));
    c.stop().await;
}

#[tokio::test]
async fn health_service_and_reflection_answer_generic_tools() {
    let c = InProcess::start(Settings::default()).await;
    let channel = c.channel(None).await.unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "homelab.v1.AgentLink".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "homelab.v1.Enrollment",
        "homelab.v1.AgentLink",
        "homelab.v1.Status",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    c.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_ends_open_links_and_watches() {
    let c = InProcess::start(Settings::default()).await;
    let (chain, key) = enroll(&c, "k3s-node-1").await;
    let (_tx, mut down) = link(&c, (&chain, &key)).await.unwrap();
    let mut watch = StatusClient::new(c.operator_channel().await)
        .watch_events(pb::WatchEventsRequest {
            after_id: 0,
            node: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    c.stop().await;
    let ended = tokio::time::timeout(WAIT, down.message()).await.unwrap();
    assert!(
        matches!(ended, Err(ref s) if s.code() == Code::Unavailable) || matches!(ended, Ok(None)),
        "{ended:?}"
    );
    // The watch stream ends (rather than hanging) once the coordinator has stopped.
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status.code()),
            }
        }
    })
    .await
    .expect("watch stream ends after shutdown");
    assert!(matches!(end, None | Some(Code::Unavailable)), "{end:?}");
}

#[tokio::test]
async fn certificate_the_coordinator_never_recorded_is_refused() {
    // Signed by the right CA, but not issued through enrollment (for example a copy of the
    // CA key in the wrong hands, or a database restored from before the enrollment).
    let c = InProcess::start(Settings::default()).await;
    let _ = enroll(&c, "k3s-node-1").await;
    let node = NodeName::parse("k3s-node-1").unwrap();
    let now = time::OffsetDateTime::now_utc();
    let cert = c
        .core
        .ca()
        .issue_node_for_testing(
            &node,
            now - time::Duration::hours(1),
            now + time::Duration::hours(1),
        )
        .unwrap();
    let err = link(&c, (&cert.cert_pem, &cert.key_pem)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(
        err.message().contains("was not issued by this coordinator"),
        "{err:?}"
    );
    c.stop().await;
}

#[tokio::test]
async fn a_second_hello_ends_the_link_with_invalid_argument() {
    let c = InProcess::start(Settings::default()).await;
    let (chain, key) = enroll(&c, "k3s-node-1").await;
    let (tx, mut down) = link(&c, (&chain, &key)).await.unwrap();
    tx.send(AgentMessage {
        body: Some(Up::Hello(pb::Hello::default())),
    })
    .await
    .unwrap();
    let ended = tokio::time::timeout(WAIT, down.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(ended.code(), Code::InvalidArgument, "{ended:?}");
    assert!(
        c.event_kinds("k3s-node-1")
            .contains(&"node.bad_message".to_owned())
    );
    c.stop().await;
}

#[tokio::test]
async fn a_link_ends_when_its_certificate_expires() {
    let c = InProcess::start(Settings {
        node_cert_lifetime: Duration::from_secs(2),
        ..Settings::default()
    })
    .await;
    let (chain, key) = enroll(&c, "k3s-node-1").await;
    let (_tx, mut down) = link(&c, (&chain, &key)).await.unwrap();
    let ended = tokio::time::timeout(WAIT, down.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert!(ended.message().contains("expired"), "{ended:?}");
    c.stop().await;
}

#[tokio::test]
async fn a_bad_renewal_csr_ends_the_link_and_issues_nothing() {
    let c = InProcess::start(Settings::default()).await;
    let (chain, key) = enroll(&c, "k3s-node-1").await;
    let (tx, mut down) = link(&c, (&chain, &key)).await.unwrap();
    let (_, other) = key_and_csr("k3s-node-2");
    tx.send(AgentMessage {
        body: Some(Up::Renew(pb::RenewRequest { csr_pem: other })),
    })
    .await
    .unwrap();
    let ended = tokio::time::timeout(WAIT, down.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(ended.code(), Code::InvalidArgument, "{ended:?}");
    assert!(
        !c.event_kinds("k3s-node-1")
            .contains(&"node.certificate_renewed".to_owned())
    );
    c.stop().await;
}

#[tokio::test]
async fn watch_delivers_events_other_processes_wrote() {
    let c = InProcess::start(Settings::default()).await;
    let mut watch = StatusClient::new(c.operator_channel().await)
        .watch_events(pb::WatchEventsRequest {
            after_id: -1,
            node: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    // As `homelab token create` does: straight into the database, no broadcast.
    c.core
        .store()
        .append_event(
            "k3s-node-1",
            "token.created",
            "from the CLI",
            homelab::core::now_unix_ms(),
        )
        .unwrap();
    // The next event the daemon itself records reveals the gap, which is filled in order.
    c.core.event("k3s-node-2", "test.daemon", "from the daemon");
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        let event = tokio::time::timeout(WAIT, watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        kinds.push(event.kind);
    }
    assert_eq!(kinds, ["token.created", "test.daemon"]);
    c.stop().await;
}
