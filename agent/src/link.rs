//! The agent's end of `AgentLink.Connect`: one session on one stream.
//!
//! Rules, as the agent keeps them:
//! 1. Say Hello first, with the facts and the highest directive revision applied.
//! 2. Expect a Welcome; it sets the health report interval.
//! 3. Report health at once, then every interval.
//! 4. At two thirds of the certificate's lifetime, or when told to, generate a fresh key and
//!    send its CSR on the stream (again every 10 s until answered). When the certificate
//!    arrives, store it and end the session, so the next one presents the new certificate.
//! 5. Acknowledge every directive acted on, and remember the highest revision applied.
//! 6. Hand an Assignment to the K3s task, which outlives the session; acknowledge it when the
//!    task reports it applied or failed, not on arrival. Send the task's phase reports as
//!    they come (one that could not be sent goes back to the task's queue); at the start of a
//!    session, send those queued while disconnected, or resend the newest one. Health reports
//!    carry the K3s unit state and, on a server, its view of the cluster; they go out at once
//!    when either changes. Each health tick asks the K3s task to read both again.
//! 7. Hand FetchKubeconfig, Kubectl and Uninstall to the K3s task too, and acknowledge each
//!    when the task reports it done; a kubeconfig goes out as a KubeconfigReply just before
//!    its acknowledgement. The kubeconfig is never logged.

use std::{
    fs,
    path::Path,
    time::{Duration, SystemTime},
};

use homelab_proto::v1::{
    self as pb, AgentMessage, CoordinatorMessage, agent_link_client::AgentLinkClient,
    agent_message::Body as Up, coordinator_message::Body as Down,
};
use log::{info, warn};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    config::AgentConfig,
    facts,
    identity::{Identity, IdentityError, IdentityStore, PendingKey, unix, write_private},
    k3s::{
        K3sEvent, K3sHandle, K3sStatus, KubectlAction, KubectlCommand, Operation, PhaseEvent,
        StepOutcome, Submission, install::PHASE, ops::OperationError, task::idle_phase,
    },
    transport::{self, TransportError},
};

/// How long the coordinator has to answer Hello with Welcome.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(15);
/// How long to wait for a renewed certificate before asking again.
const RENEW_RETRY: Duration = Duration::from_secs(10);
/// Messages buffered toward the coordinator.
const UPSTREAM_CAPACITY: usize = 16;

/// Why a session failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("transport")]
    Transport(#[from] TransportError),
    #[error("the coordinator refused the link ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("the link ended ({code:?}): {message}")]
    Ended { code: tonic::Code, message: String },
    #[error("the coordinator closed the link")]
    Closed,
    #[error("the coordinator sent no Welcome in time")]
    NoWelcome,
    #[error("node identity")]
    Identity(#[from] IdentityError),
    #[error("failed to write {path}")]
    State {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl LinkError {
    /// Whether the coordinator said this node is revoked.
    pub fn is_revoked(&self) -> bool {
        matches!(
            self,
            Self::Refused {
                code: tonic::Code::PermissionDenied,
                ..
            } | Self::Ended {
                code: tonic::Code::PermissionDenied,
                ..
            }
        )
    }

    fn from_status(status: &tonic::Status) -> Self {
        Self::Ended {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// How a session that was established ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// A new certificate is stored; reconnect with it now.
    Renewed(Identity),
    /// The coordinator decommissioned this node; the identity is gone.
    Decommissioned,
    /// The link broke after working; reconnect with backoff from its first step.
    Lost(LinkError),
}

/// Runs one session: connect, hello, then serve until it ends. An error before the Welcome
/// means the link never came up.
pub async fn run_session(
    config: &AgentConfig,
    ca_pem: &str,
    identity: &Identity,
    store: &IdentityStore,
    k3s: &mut K3sHandle,
    on_established: impl FnOnce(),
) -> Result<SessionEnd, LinkError> {
    let channel = transport::connect(&config.coordinator_url, ca_pem, Some(identity)).await?;
    let (tx, rx) = mpsc::channel(UPSTREAM_CAPACITY);
    let applied_revision = read_applied_revision(&config.state_dir);
    send(
        &tx,
        Up::Hello(pb::Hello {
            facts: Some(facts::collect(&config.host_root)),
            applied_revision,
        }),
    )
    .await?;
    let mut inbound = AgentLinkClient::new(channel)
        .connect(ReceiverStream::new(rx))
        .await
        .map_err(|status| LinkError::Refused {
            code: status.code(),
            message: status.message().to_owned(),
        })?
        .into_inner();
    let welcome = match tokio::time::timeout(WELCOME_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(CoordinatorMessage {
            body: Some(Down::Welcome(welcome)),
        }))) => welcome,
        Ok(Ok(_)) => return Err(LinkError::Closed),
        Ok(Err(status)) => {
            return Err(LinkError::Refused {
                code: status.code(),
                message: status.message().to_owned(),
            });
        }
        Err(_) => return Err(LinkError::NoWelcome),
    };
    info!(
        "connected to {} as {}",
        config.coordinator_url, welcome.node_name
    );
    on_established();
    let end = serve(config, identity, store, k3s, &tx, &mut inbound, &welcome).await;
    Ok(end.unwrap_or_else(SessionEnd::Lost))
}

async fn serve(
    config: &AgentConfig,
    identity: &Identity,
    store: &IdentityStore,
    k3s: &mut K3sHandle,
    tx: &mpsc::Sender<AgentMessage>,
    inbound: &mut tonic::Streaming<CoordinatorMessage>,
    welcome: &pb::Welcome,
) -> Result<SessionEnd, LinkError> {
    let backlog = k3s.backlog();
    if !backlog.iter().any(|e| matches!(e, K3sEvent::Phase(_))) {
        let (phase, step) = idle_phase(&k3s.status());
        send(
            tx,
            Up::Phase(pb::PhaseReport {
                phase,
                step,
                outcome: pb::StepOutcome::Succeeded as i32,
                attempt: 1,
                message: String::new(),
            }),
        )
        .await?;
    }
    for event in backlog {
        forward(tx, &config.state_dir, event).await?;
    }
    // Health goes out on every tick, and at once when K3s health or the unit state changes.
    let mut k3s_status = k3s.watch_status();
    let mut reported = health_key(&k3s_status.borrow_and_update());
    let mut k3s_running = true;
    send(tx, Up::Health(health(identity, &k3s.status()))).await?;
    let interval = Duration::from_secs(u64::from(welcome.health_interval_seconds.max(1)));
    let mut health_tick =
        tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let renew_in = identity
        .renew_at()
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    let renew_timer = tokio::time::sleep(renew_in);
    tokio::pin!(renew_timer);
    let mut pending: Option<PendingKey> = None;

    loop {
        tokio::select! {
            message = inbound.message() => {
                let message = match message {
                    Ok(Some(message)) => message,
                    Ok(None) => return Err(LinkError::Closed),
                    Err(status) => return Err(LinkError::from_status(&status)),
                };
                match message.body {
                    Some(Down::Certificate(issued)) => {
                        let Some(key) = pending.take() else {
                            warn!("ignoring a certificate that was not asked for");
                            continue;
                        };
                        let renewed = store.save(key, &issued.certificate_chain_pem)?;
                        info!("certificate renewed: {} valid until {}", renewed.serial, issued.not_after_unix);
                        return Ok(SessionEnd::Renewed(renewed));
                    }
                    Some(Down::Directive(directive)) => {
                        let (revision, request) = read_directive(directive);
                        match request {
                            Request::RenewCertificate => {
                                info!("coordinator asked for renewal (revision {revision})");
                                if pending.is_none() {
                                    let key = PendingKey::generate(&config.node_name)?;
                                    send(tx, Up::Renew(pb::RenewRequest { csr_pem: key.csr_pem.clone() })).await?;
                                    pending = Some(key);
                                    // Ask again after a while if no certificate arrives.
                                    renew_timer.as_mut().reset(tokio::time::Instant::now() + RENEW_RETRY);
                                }
                                ack(tx, &config.state_dir, revision, true, "renewal requested").await?;
                            }
                            Request::Assign(submission) => {
                                info!("assigned role {:?} (revision {revision})", submission.role);
                                // Acknowledged when the K3s task has applied it (rule 6).
                                if !k3s.submit(submission) {
                                    ack(tx, &config.state_dir, revision, false, "the K3s task has stopped; restart the agent").await?;
                                }
                            }
                            Request::FetchKubeconfig => {
                                info!("asked for the admin kubeconfig (revision {revision})");
                                operate(k3s, tx, &config.state_dir, revision, Ok(Operation::FetchKubeconfig)).await?;
                            }
                            Request::Kubectl { node, command } => {
                                info!("asked to run kubectl on {node:?} (revision {revision})");
                                operate(k3s, tx, &config.state_dir, revision, command.map(Operation::Kubectl)).await?;
                            }
                            Request::Uninstall => {
                                warn!("asked to uninstall K3s (revision {revision})");
                                operate(k3s, tx, &config.state_dir, revision, Ok(Operation::Uninstall)).await?;
                            }
                            Request::Decommission { reason } => {
                                warn!("decommissioned by the coordinator: {reason}");
                                ack(tx, &config.state_dir, revision, true, "decommissioned").await?;
                                store.forget()?;
                                return Ok(SessionEnd::Decommissioned);
                            }
                            Request::Unknown => {
                                warn!("directive {revision} has no kind this agent knows; upgrade the agent");
                                ack(tx, &config.state_dir, revision, false, "unknown directive").await?;
                            }
                        }
                    }
                    Some(Down::Welcome(_)) | None => {}
                }
            }
            () = &mut renew_timer => {
                // The first time: a fresh key. Later (no certificate came): the same CSR again.
                let key = match pending.take() {
                    Some(key) => key,
                    None => {
                        info!("certificate {} reached two thirds of its lifetime; renewing", identity.serial);
                        PendingKey::generate(&config.node_name)?
                    }
                };
                send(tx, Up::Renew(pb::RenewRequest { csr_pem: key.csr_pem.clone() })).await?;
                pending = Some(key);
                renew_timer.as_mut().reset(tokio::time::Instant::now() + RENEW_RETRY);
            }
            event = k3s.next_event() => {
                if let Err(e) = forward(tx, &config.state_dir, event.clone()).await {
                    k3s.requeue(event);
                    return Err(e);
                }
            }
            changed = k3s_status.changed(), if k3s_running => {
                if changed.is_err() {
                    warn!("the K3s task has stopped");
                    k3s_running = false;
                    continue;
                }
                let status = k3s_status.borrow_and_update().clone();
                let key = health_key(&status);
                if key != reported {
                    reported = key;
                    send(tx, Up::Health(health(identity, &status))).await?;
                }
            }
            _ = health_tick.tick() => {
                // What the refresh finds goes out at once if it changed (the arm above).
                k3s.refresh();
                send(tx, Up::Health(health(identity, &k3s.status()))).await?;
            }
        }
    }
}

/// A directive as this agent reads it, before the session acts on it.
#[derive(Debug)]
pub enum Request {
    /// Renew the certificate now (rule 4).
    RenewCertificate,
    /// A K3s role and its install plan, for the K3s task (rule 6). The plan is parsed there,
    /// with [`crate::k3s::InstallPlan::for_directive`].
    Assign(Submission),
    /// Hand over the admin kubeconfig (rule 7).
    FetchKubeconfig,
    /// Run kubectl against `node` (rule 7), or why the directive cannot be run.
    Kubectl {
        node: String,
        command: Result<KubectlCommand, OperationError>,
    },
    /// Uninstall K3s (rule 7).
    Uninstall,
    /// Forget the identity and stop.
    Decommission { reason: String },
    /// A kind this agent does not know; it is acknowledged as failed.
    Unknown,
}

/// Reads a directive from the coordinator: its revision and what it asks for. Touches
/// nothing, so any directive, however malformed, can be read (the fuzz target
/// `agent_directive` feeds it arbitrary bytes).
pub fn read_directive(directive: pb::Directive) -> (u64, Request) {
    use pb::directive::Kind;
    let revision = directive.revision;
    let request = match directive.kind {
        Some(Kind::RenewCertificate(_)) => Request::RenewCertificate,
        Some(Kind::Assignment(assignment)) => Request::Assign(Submission {
            revision,
            role: assignment.role,
            plan_json: assignment.plan_json,
        }),
        Some(Kind::FetchKubeconfig(_)) => Request::FetchKubeconfig,
        Some(Kind::Kubectl(kubectl)) => Request::Kubectl {
            command: kubectl_command(&kubectl),
            node: kubectl.node,
        },
        Some(Kind::Uninstall(_)) => Request::Uninstall,
        Some(Kind::Decommission(d)) => Request::Decommission { reason: d.reason },
        None => Request::Unknown,
    };
    (revision, request)
}

/// Hands an operation to the K3s task, which acknowledges it when done (rule 7); one that
/// could not be read, or a stopped task, is acknowledged as failed at once.
async fn operate(
    k3s: &K3sHandle,
    tx: &mpsc::Sender<AgentMessage>,
    state_dir: &Path,
    revision: u64,
    operation: Result<Operation, OperationError>,
) -> Result<(), LinkError> {
    match operation {
        Ok(operation) => {
            if !k3s.operate(revision, operation) {
                ack(
                    tx,
                    state_dir,
                    revision,
                    false,
                    "the K3s task has stopped; restart the agent",
                )
                .await?;
            }
            Ok(())
        }
        Err(e) => ack(tx, state_dir, revision, false, &crate::chain(&e)).await,
    }
}

/// The `Kubectl` directive as the K3s task takes it.
fn kubectl_command(kubectl: &pb::Kubectl) -> Result<KubectlCommand, OperationError> {
    let action = match pb::kubectl::Action::try_from(kubectl.action) {
        Ok(pb::kubectl::Action::Drain) => KubectlAction::Drain,
        Ok(pb::kubectl::Action::DeleteNode) => KubectlAction::DeleteNode,
        Ok(pb::kubectl::Action::Unspecified) | Err(_) => {
            return Err(OperationError::UnknownAction {
                action: kubectl.action,
            });
        }
    };
    KubectlCommand::new(
        action,
        &kubectl.node,
        Duration::from_secs(u64::from(kubectl.timeout_seconds)),
    )
}

/// Sends a K3s task event: a phase report, a kubeconfig, or the acknowledgement of a
/// directive.
async fn forward(
    tx: &mpsc::Sender<AgentMessage>,
    state_dir: &Path,
    event: K3sEvent,
) -> Result<(), LinkError> {
    match event {
        K3sEvent::Phase(phase) => send(tx, Up::Phase(phase_report(phase))).await,
        K3sEvent::Kubeconfig { revision, content } => {
            send(
                tx,
                Up::Kubeconfig(pb::KubeconfigReply {
                    revision,
                    content: content.into_inner(),
                }),
            )
            .await
        }
        K3sEvent::Applied {
            revision,
            ok,
            message,
        } => ack(tx, state_dir, revision, ok, &message).await,
    }
}

fn phase_report(event: PhaseEvent) -> pb::PhaseReport {
    let outcome = match event.outcome {
        StepOutcome::Started => pb::StepOutcome::Started,
        StepOutcome::Succeeded => pb::StepOutcome::Succeeded,
        StepOutcome::Failed => pb::StepOutcome::Failed,
    };
    pb::PhaseReport {
        phase: PHASE.into(),
        step: event.step.name().into(),
        outcome: outcome as i32,
        attempt: event.attempt,
        message: event.message,
    }
}

/// What makes a health report worth sending before the next tick: health, and the K3s fields
/// the coordinator orchestrates on (role, unit state, API readiness, CA hash, Node Ready).
fn health_key(status: &K3sStatus) -> (bool, Option<pb::K3sHealth>) {
    (status.healthy(), k3s_health(status))
}

fn health(identity: &Identity, k3s: &K3sStatus) -> pb::HealthReport {
    pb::HealthReport {
        observed_at_unix: unix(SystemTime::now()),
        healthy: k3s.healthy(),
        detail: k3s.detail(),
        certificate_not_after_unix: identity.not_after_unix(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        k3s: k3s_health(k3s),
    }
}

/// The `k3s` part of a health report: absent until the node has a role. A server's view of
/// the cluster fills `api_ready`, `cluster_ca_sha256` and `nodes`; without one (an agent, a
/// unit not active) they stay empty and `api_ready` false, which the coordinator reads as
/// "not Ready". Why a view is incomplete is in the report's `detail`.
pub fn k3s_health(k3s: &K3sStatus) -> Option<pb::K3sHealth> {
    let role = k3s.role?;
    let view = k3s.server_view.clone().unwrap_or_default();
    Some(pb::K3sHealth {
        role: role.to_string(),
        unit: role.unit().to_owned(),
        unit_state: k3s.unit_state.clone().unwrap_or_default(),
        version: k3s.version.clone(),
        applied_revision: k3s.revision,
        api_ready: view.api_ready,
        cluster_ca_sha256: view.cluster_ca_sha256.unwrap_or_default(),
        nodes: view
            .nodes
            .into_iter()
            .map(|n| pb::NodeCondition {
                name: n.name,
                ready: n.ready,
                reason: n.reason,
            })
            .collect(),
    })
}

async fn send(tx: &mpsc::Sender<AgentMessage>, body: Up) -> Result<(), LinkError> {
    tx.send(AgentMessage { body: Some(body) })
        .await
        .map_err(|_| LinkError::Closed)
}

async fn ack(
    tx: &mpsc::Sender<AgentMessage>,
    state_dir: &Path,
    revision: u64,
    ok: bool,
    message: &str,
) -> Result<(), LinkError> {
    // Assignments are acknowledged when applied, so acknowledgements can arrive out of
    // order: keep the highest.
    if ok && revision > read_applied_revision(state_dir) {
        let path = state_dir.join("applied-revision");
        write_private(&path, revision.to_string().as_bytes()).map_err(|source| {
            LinkError::State {
                path: path.display().to_string(),
                source,
            }
        })?;
    }
    send(
        tx,
        Up::Ack(pb::DirectiveAck {
            revision,
            ok,
            message: message.to_owned(),
        }),
    )
    .await
}

fn read_applied_revision(state_dir: &Path) -> u64 {
    fs::read_to_string(state_dir.join("applied-revision"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(revision: u64, kind: pb::directive::Kind) -> (u64, Request) {
        read_directive(pb::Directive {
            revision,
            kind: Some(kind),
        })
    }

    #[test]
    fn an_assignment_keeps_its_revision_role_and_plan() {
        let (revision, request) = read(
            7,
            pb::directive::Kind::Assignment(pb::Assignment {
                role: "server".into(),
                plan_json: "{}".into(),
            }),
        );
        assert_eq!(revision, 7);
        let Request::Assign(submission) = request else {
            panic!("{request:?}");
        };
        assert_eq!(
            (
                submission.revision,
                submission.role.as_str(),
                submission.plan_json.as_str()
            ),
            (7, "server", "{}")
        );
    }

    #[test]
    fn a_kubectl_directive_this_agent_cannot_run_is_read_as_an_error() {
        let (_, request) = read(
            3,
            pb::directive::Kind::Kubectl(pb::Kubectl {
                action: 99,
                node: "k3s-node-1".into(),
                timeout_seconds: 0,
            }),
        );
        let Request::Kubectl { node, command } = request else {
            panic!("{request:?}");
        };
        assert_eq!(node, "k3s-node-1");
        assert!(matches!(
            command,
            Err(OperationError::UnknownAction { action: 99 })
        ));

        let (_, request) = read(
            4,
            pb::directive::Kind::Kubectl(pb::Kubectl {
                action: pb::kubectl::Action::Drain as i32,
                node: "Not A Name".into(),
                timeout_seconds: 0,
            }),
        );
        assert!(matches!(
            request,
            Request::Kubectl {
                command: Err(OperationError::BadNodeName { .. }),
                ..
            }
        ));
    }

    #[test]
    fn a_directive_without_a_kind_is_unknown() {
        let (revision, request) = read_directive(pb::Directive {
            revision: 5,
            kind: None,
        });
        assert_eq!(revision, 5);
        assert!(matches!(request, Request::Unknown));
    }
}
