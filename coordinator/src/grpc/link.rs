//! `AgentLink.Connect`: the long-lived stream between an agent and the coordinator.
//! The protocol's rules are in the contract (`homelab.proto`) and in [`crate::core`].

use std::{pin::Pin, sync::Arc, time::Duration};

use homelab_proto::v1::{
    self as pb, AgentMessage, CoordinatorMessage, agent_link_server::AgentLink,
    agent_message::Body as Up, coordinator_message::Body as Down,
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use super::{
    auth,
    convert::{facts_from_pb, health_from_pb, phase_from_pb},
};
use crate::{
    core::{
        CloseReason, Coordinator, Directive, KubectlAction, Outbound, Reply, Session, now_unix,
    },
    error_chain,
    pki::NodeName,
};

/// An agent that opens a stream must say hello within this time.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages buffered toward one agent.
const DOWNSTREAM_CAPACITY: usize = 16;

pub(super) struct LinkService {
    core: Arc<Coordinator>,
}

impl LinkService {
    pub(super) fn new(core: Arc<Coordinator>) -> Self {
        Self { core }
    }
}

type DownStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentLink for LinkService {
    type ConnectStream = DownStream;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let (node, peer) = auth::node(&request)?;
        if let Err(e) = self.core.admit(&node, &peer) {
            warn!(node = %node, serial = %peer.serial, error = %error_chain(&e), "link refused");
            self.core
                .event(node.as_str(), "node.link_refused", &error_chain(&e));
            return Err(e.into());
        }
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(AgentMessage {
                body: Some(Up::Hello(hello)),
            }))) => hello,
            Ok(Ok(Some(_))) => {
                return Err(Status::invalid_argument(
                    "the first message on the link must be Hello",
                ));
            }
            Ok(Ok(None)) => return Err(Status::cancelled("the agent closed the link")),
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 10 s")),
        };
        let facts = facts_from_pb(hello.facts);
        let session = self.core.attach(&node, &facts)?;
        // The node may be owed a role; directives queue until the session loop runs.
        self.core.orchestrate(Some(&node));
        debug!(node = %node, applied_revision = hello.applied_revision, "hello received");

        let (tx, rx) = mpsc::channel(DOWNSTREAM_CAPACITY);
        let welcome = CoordinatorMessage {
            body: Some(Down::Welcome(pb::Welcome {
                node_name: node.to_string(),
                health_interval_seconds: u32::try_from(
                    self.core.settings().health_interval.as_secs(),
                )
                .unwrap_or(u32::MAX),
            })),
        };
        // The channel is new and empty: this cannot fail for lack of room.
        let _ = tx.try_send(Ok(welcome));
        tokio::spawn(run_session(
            self.core.clone(),
            session,
            peer.not_after_unix,
            inbound,
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Drives one session until the agent leaves, the coordinator closes it, the certificate
/// expires, or the coordinator shuts down.
async fn run_session(
    core: Arc<Coordinator>,
    mut session: Session,
    cert_not_after_unix: i64,
    mut inbound: Streaming<AgentMessage>,
    tx: mpsc::Sender<Result<CoordinatorMessage, Status>>,
) {
    let node = session.node.clone();
    let until_expiry =
        Duration::from_secs(u64::try_from(cert_not_after_unix - now_unix()).unwrap_or(0));
    let expiry = tokio::time::sleep(until_expiry);
    tokio::pin!(expiry);
    let shutdown = core.shutdown_signal();
    tokio::pin!(shutdown);
    let end: Option<Status> = loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(message)) => match handle_upstream(&core, &session, message) {
                    Ok(None) => {}
                    Ok(Some(reply)) => {
                        if tx.send(Ok(reply)).await.is_err() {
                            break None;
                        }
                    }
                    Err(status) => {
                        // A message the coordinator cannot act on ends the link with a precise
                        // status; the agent reconnects and the cause is in the event log.
                        warn!(node = %node, %status, "link ended on a message it could not act on");
                        let kind = if status.code() == tonic::Code::Internal {
                            "node.link_error"
                        } else {
                            "node.bad_message"
                        };
                        core.event(node.as_str(), kind, status.message());
                        break Some(status);
                    }
                },
                Ok(None) => break None,
                // A message over the decoding limit: bad input like the messages above, so
                // the agent hears why (tonic says OUT_OF_RANGE, naming both sizes).
                Err(status) if status.code() == tonic::Code::OutOfRange => {
                    warn!(node = %node, %status, "link ended on a message over the size limit");
                    core.event(node.as_str(), "node.bad_message", status.message());
                    break Some(status);
                }
                Err(status) => {
                    debug!(node = %node, %status, "link read ended");
                    break None;
                }
            },
            outbound = session.outbound.recv() => match outbound {
                Some(out) => {
                    if tx.send(Ok(outbound_to_pb(out))).await.is_err() {
                        break None;
                    }
                }
                // The coordinator dropped the session: closed says why.
                None => break close_status(&node, *session.closed.borrow()),
            },
            changed = session.closed.changed() => {
                let reason = *session.closed.borrow();
                if reason.is_some() || changed.is_err() {
                    break close_status(&node, reason);
                }
            },
            () = &mut expiry => {
                info!(node = %node, "certificate expired on an open link; closing it");
                break Some(Status::unauthenticated("the node certificate expired; renew or enroll again"));
            },
            () = &mut shutdown => break Some(Status::unavailable("the coordinator is shutting down")),
        }
    };
    if let Some(status) = end {
        let _ = tx.send(Err(status)).await;
    }
    core.detach(&node, session.generation);
}

fn close_status(node: &NodeName, reason: Option<CloseReason>) -> Option<Status> {
    match reason {
        Some(CloseReason::Replaced) => Some(Status::aborted(
            "a newer link for this node replaced this one",
        )),
        Some(CloseReason::Revoked) => Some(Status::permission_denied(format!(
            "node {node} was revoked"
        ))),
        None => None,
    }
}

fn handle_upstream(
    core: &Coordinator,
    session: &Session,
    message: AgentMessage,
) -> Result<Option<CoordinatorMessage>, Status> {
    let node = &session.node;
    match message.body {
        Some(Up::Hello(_)) => Err(Status::invalid_argument(
            "Hello is only valid as the first message",
        )),
        Some(Up::Phase(p)) => core
            .report_phase(node, phase_from_pb(p, now_unix()))
            .map(|()| None)
            .map_err(Status::from),
        Some(Up::Health(h)) => core
            .report_health(node, health_from_pb(h))
            .map(|()| None)
            .map_err(Status::from),
        Some(Up::Renew(r)) => core
            .renew(node, &r.csr_pem)
            .map(|issued| {
                Some(CoordinatorMessage {
                    body: Some(Down::Certificate(pb::CertificateIssued {
                        certificate_chain_pem: issued.chain_pem,
                        not_after_unix: issued.not_after_unix,
                    })),
                })
            })
            .map_err(Status::from),
        Some(Up::Kubeconfig(reply)) => {
            // Admin credentials: handed to the waiting operator call, never logged.
            if !core.answer(node, reply.revision, Reply::Kubeconfig(reply.content)) {
                debug!(node = %node, revision = reply.revision, "kubeconfig nobody waits for");
            }
            Ok(None)
        }
        Some(Up::Ack(ack)) => {
            core.answer(
                node,
                ack.revision,
                Reply::Ack {
                    ok: ack.ok,
                    message: ack.message.clone(),
                },
            );
            let outcome = if ack.ok { "applied" } else { "failed" };
            core.event(
                node.as_str(),
                "directive.acknowledged",
                &format!("revision {} {outcome}: {}", ack.revision, ack.message),
            );
            Ok(None)
        }
        None => Err(Status::invalid_argument("empty message")),
    }
}

fn outbound_to_pb(out: Outbound) -> CoordinatorMessage {
    let body = match out {
        Outbound::Directive {
            revision,
            directive,
        } => {
            let kind = match directive {
                Directive::Assignment { role, plan_json } => {
                    pb::directive::Kind::Assignment(pb::Assignment { role, plan_json })
                }
                Directive::RenewCertificate => {
                    pb::directive::Kind::RenewCertificate(pb::RenewCertificate {})
                }
                Directive::Decommission { reason } => {
                    pb::directive::Kind::Decommission(pb::Decommission { reason })
                }
                Directive::FetchKubeconfig => {
                    pb::directive::Kind::FetchKubeconfig(pb::FetchKubeconfig {})
                }
                Directive::Kubectl {
                    action,
                    node,
                    timeout_seconds,
                } => pb::directive::Kind::Kubectl(pb::Kubectl {
                    action: match action {
                        KubectlAction::Drain => pb::kubectl::Action::Drain,
                        KubectlAction::DeleteNode => pb::kubectl::Action::DeleteNode,
                    } as i32,
                    node,
                    timeout_seconds,
                }),
                Directive::Uninstall => pb::directive::Kind::Uninstall(pb::Uninstall {}),
            };
            Down::Directive(pb::Directive {
                revision,
                kind: Some(kind),
            })
        }
        Outbound::Certificate(issued) => Down::Certificate(pb::CertificateIssued {
            certificate_chain_pem: issued.chain_pem,
            not_after_unix: issued.not_after_unix,
        }),
    };
    CoordinatorMessage { body: Some(body) }
}
