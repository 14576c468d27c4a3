//! The coordinator's domain logic, free of gRPC types: enrollment, the registry of connected
//! agents, directives, revocation and the event log. The `grpc` module only converts and
//! delegates to [`Coordinator`].
//!
//! Link sessions follow these rules:
//! 1. A node has at most one session. A new one replaces the old, which is told
//!    [`CloseReason::Replaced`].
//! 2. A session is admitted only while the node is enrolled and the presented certificate is
//!    one the coordinator issued to that node and has not revoked.
//! 3. Revoking a node closes its session with [`CloseReason::Revoked`] at once.
//! 4. Every state change is written to the database before it is announced as an event.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::{
    orchestrate::{ClusterSecrets, ClusterSettings, DesiredNode, Observed, decide},
    pki::{CertificateAuthority, IssuedCert, NodeName, PeerCert, PkiError},
    spec::Role,
    store::{
        EventRecord, Facts, HealthRecord, K3sHealthRecord, NodeRecord, NodeState, PhaseRecord,
        Store, StoreError,
    },
    token::hash_token,
};

/// Tunables of a running coordinator.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Lifetime of node certificates issued by enrollment and renewal.
    pub node_cert_lifetime: Duration,
    /// How often agents send unsolicited health reports.
    pub health_interval: Duration,
    /// How long a connection has to complete its TLS handshake before the server closes it.
    pub tls_handshake_timeout: Duration,
    /// Connections served at once, TLS handshakes in progress included; connections beyond
    /// it are closed as soon as they are accepted.
    pub max_connections: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            node_cert_lifetime: crate::pki::DEFAULT_NODE_CERT_LIFETIME,
            health_interval: Duration::from_secs(30),
            tls_handshake_timeout: crate::grpc::DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            max_connections: crate::grpc::DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Why an enrollment was refused.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("the enrollment token is not valid")]
    TokenUnknown,
    #[error(
        "the enrollment token expired at {expired_at_unix} (unix time); create a new one with `homelab token create`"
    )]
    TokenExpired { expired_at_unix: i64 },
    #[error(
        "the enrollment token was already used at {used_at_unix} (unix time); tokens are single-use"
    )]
    TokenReused { used_at_unix: i64 },
    #[error("the enrollment token is bound to node {bound:?}, not {requested:?}")]
    TokenWrongNode { bound: String, requested: String },
    #[error("invalid node name")]
    NodeName(#[source] PkiError),
    #[error("invalid certificate signing request")]
    Csr(#[source] PkiError),
    #[error("state database")]
    Store(#[from] StoreError),
}

/// Why a request to a node got no answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("node {0} is not connected")]
    NotConnected(String),
    #[error("node {0} is not reading its link")]
    Busy(String),
    #[error("the link to {0} closed before it answered")]
    LinkLost(String),
    #[error("{node} did not answer within {timeout:?}")]
    Timeout { node: String, timeout: Duration },
    #[error("link")]
    Link(#[from] LinkError),
}

/// Why a link session was refused or a link request failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("node {0} is revoked")]
    Revoked(String),
    #[error("certificate {serial} was not issued by this coordinator to node {node}")]
    UnknownCertificate { node: String, serial: String },
    #[error("certificate {0} is revoked")]
    CertificateRevoked(String),
    #[error("node {0} is not enrolled")]
    NotEnrolled(String),
    #[error("no node named {0:?}")]
    UnknownNode(String),
    #[error(
        "{node} has the same {what} as enrolled node {other}; reset it on the template (`cloud-init clean --machine-id`) and rebuild the VM"
    )]
    Duplicate {
        node: String,
        other: String,
        what: String,
    },
    #[error("invalid certificate signing request")]
    Csr(#[source] PkiError),
    #[error("state database")]
    Store(#[from] StoreError),
}

/// An enrollment as the domain sees it.
pub struct Enrollment {
    /// The presented token. Never logged.
    pub token: String,
    pub node_name: String,
    pub csr_pem: String,
    pub facts: Facts,
}

/// What the coordinator sends down a link session.
#[derive(Debug, Clone)]
pub enum Outbound {
    Directive { revision: u64, directive: Directive },
    Certificate(IssuedCert),
}

/// Instructions to an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Directive {
    /// Become `role`; `plan_json` is the install plan.
    Assignment { role: String, plan_json: String },
    /// Renew the node certificate now.
    RenewCertificate,
    /// Forget the identity and stop.
    Decommission { reason: String },
    /// Servers: reply with the admin kubeconfig.
    FetchKubeconfig,
    /// Servers: act on another node through the cluster API.
    Kubectl {
        action: KubectlAction,
        node: String,
        timeout_seconds: u32,
    },
    /// Uninstall K3s on this node.
    Uninstall,
}

/// What a server does to another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubectlAction {
    Drain,
    DeleteNode,
}

/// A node's answer to a directive the coordinator waits on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ack {
        ok: bool,
        message: String,
    },
    /// Holds admin credentials: never logged.
    Kubeconfig(String),
}

/// What became of a pushed directive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// Queued on the node's open link, with this revision.
    Sent(u64),
    /// The node has no link now.
    NotConnected,
    /// The node's link is not draining its queue.
    QueueFull,
}

/// Why the coordinator ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Replaced,
    Revoked,
}

/// The coordinator's end of one agent's link.
#[derive(Debug)]
pub struct Session {
    pub node: NodeName,
    pub generation: u64,
    /// Directives and certificates to send to the agent.
    pub outbound: mpsc::Receiver<Outbound>,
    /// Resolves when the coordinator ends the session.
    pub closed: watch::Receiver<Option<CloseReason>>,
}

struct SessionEntry {
    generation: u64,
    outbound: mpsc::Sender<Outbound>,
    close: watch::Sender<Option<CloseReason>>,
}

/// Capacity of a session's outbound queue. Directives are rare; a full queue means the agent
/// stopped reading, and the push reports that instead of blocking.
const OUTBOUND_CAPACITY: usize = 32;
/// Up to this many changed nodes (or an eighth of all) are read again one by one when
/// listing; beyond it, all nodes are read in one query.
const NODE_REFETCH_ONE_BY_ONE: usize = 64;
/// Capacity of the live event fan-out; a watcher that falls further behind catches up from
/// the database.
const EVENT_FANOUT_CAPACITY: usize = 1024;

/// The coordinator.
pub struct Coordinator {
    store: Mutex<Store>,
    ca: CertificateAuthority,
    settings: Settings,
    sessions: Mutex<HashMap<NodeName, SessionEntry>>,
    next_generation: std::sync::atomic::AtomicU64,
    events: broadcast::Sender<EventRecord>,
    shutdown: watch::Sender<bool>,
    started_at_unix: i64,
    /// Directives whose answer someone awaits, by node and revision.
    pending: Mutex<HashMap<(String, u64), oneshot::Sender<Reply>>>,
    /// Parsed nodes with the row version they were read at; see [`Coordinator::nodes`].
    node_cache: Mutex<BTreeMap<String, (i64, NodeRecord)>>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("ca", &self.ca)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Coordinator {
    /// A coordinator over `store`, signing with `ca`.
    pub fn new(store: Store, ca: CertificateAuthority, settings: Settings) -> Arc<Self> {
        let (events, _) = broadcast::channel(EVENT_FANOUT_CAPACITY);
        let (shutdown, _) = watch::channel(false);
        Arc::new(Self {
            store: Mutex::new(store),
            ca,
            settings,
            sessions: Mutex::new(HashMap::new()),
            next_generation: std::sync::atomic::AtomicU64::new(1),
            events,
            shutdown,
            started_at_unix: now_unix(),
            pending: Mutex::new(HashMap::new()),
            node_cache: Mutex::new(BTreeMap::new()),
        })
    }

    /// Pushes a directive and waits for the node's answer (an ack, or a kubeconfig).
    pub async fn request(
        &self,
        node: &str,
        directive: Directive,
        timeout: Duration,
    ) -> Result<Reply, RequestError> {
        let (tx, rx) = oneshot::channel();
        let mut slot = Some(tx);
        let outcome = self.push_with(node, |revision| {
            if let Some(tx) = slot.take() {
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((node.to_owned(), revision), tx);
            }
            directive
        })?;
        let revision = match outcome {
            PushOutcome::Sent(revision) => revision,
            PushOutcome::NotConnected => return Err(RequestError::NotConnected(node.to_owned())),
            PushOutcome::QueueFull => return Err(RequestError::Busy(node.to_owned())),
        };
        let answer = tokio::time::timeout(timeout, rx).await;
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(node.to_owned(), revision));
        match answer {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(RequestError::LinkLost(node.to_owned())),
            Err(_) => Err(RequestError::Timeout {
                node: node.to_owned(),
                timeout,
            }),
        }
    }

    /// Hands a node's answer to whoever awaits it; false if nobody does.
    pub fn answer(&self, node: &NodeName, revision: u64, reply: Reply) -> bool {
        let waiter = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(node.to_string(), revision));
        waiter.is_some_and(|tx| tx.send(reply).is_ok())
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    pub fn started_at_unix(&self) -> i64 {
        self.started_at_unix
    }

    /// Locks the store. Queries are short and never cross an `.await`.
    pub fn store(&self) -> MutexGuard<'_, Store> {
        // Invariant: no code panics while holding the lock, so it is never poisoned; if it
        // were, the data is still consistent because every change is one SQL transaction.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<NodeName, SessionEntry>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- events -------------------------------------------------------------------------

    /// Records an event durably, then announces it to watchers. A failure to record is logged
    /// and does not fail the caller: the operation the event describes already happened.
    pub fn event(&self, node: &str, kind: &str, message: &str) {
        let result = self
            .store()
            .append_event(node, kind, message, now_unix_ms());
        match result {
            Ok(event) => {
                let _ = self.events.send(event);
            }
            Err(e) => warn!(error = %crate::error_chain(&e), node, kind, "failed to record event"),
        }
    }

    /// Subscribes to events recorded from now on.
    pub fn subscribe_events(&self) -> broadcast::Receiver<EventRecord> {
        self.events.subscribe()
    }

    // ---- shutdown -----------------------------------------------------------------------

    /// Tells every long-lived stream to end, so a graceful shutdown can complete.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Resolves once shutdown has begun.
    pub fn shutdown_signal(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.shutdown.subscribe();
        async move {
            let _ = rx.wait_for(|down| *down).await;
        }
    }

    // ---- enrollment ---------------------------------------------------------------------

    /// Redeems a one-time token for a node certificate. Each refusal is recorded as an event.
    pub fn enroll(&self, request: Enrollment) -> Result<IssuedCert, EnrollError> {
        let result = self.try_enroll(&request);
        match &result {
            Ok(issued) => {
                info!(node = %request.node_name, serial = %issued.serial, "node enrolled");
                self.event(
                    &request.node_name,
                    "node.enrolled",
                    &format!(
                        "enrolled (hostname {}, machine-id {}); certificate {} valid until {}",
                        request.facts.hostname,
                        request.facts.machine_id,
                        issued.serial,
                        issued.not_after_unix
                    ),
                );
            }
            Err(e) => {
                let kind = match e {
                    EnrollError::TokenUnknown => "enroll.token_unknown",
                    EnrollError::TokenExpired { .. } => "enroll.token_expired",
                    EnrollError::TokenReused { .. } => "enroll.token_reused",
                    EnrollError::TokenWrongNode { .. } => "enroll.token_wrong_node",
                    EnrollError::NodeName(_) => "enroll.bad_node_name",
                    EnrollError::Csr(_) => "enroll.bad_csr",
                    EnrollError::Store(_) => "enroll.failed",
                };
                let message = crate::error_chain(e);
                warn!(node = %request.node_name.escape_debug(), kind, error = %message, "enrollment refused");
                // The caller is unauthenticated: record under its claimed name only if that
                // is a valid node name, so the event log cannot be filled with junk keys.
                match NodeName::parse(&request.node_name) {
                    Ok(node) => self.event(node.as_str(), kind, &message),
                    Err(_) => self.event("", kind, &message),
                }
            }
        }
        result
    }

    fn try_enroll(&self, request: &Enrollment) -> Result<IssuedCert, EnrollError> {
        let now = now_unix();
        let hash = hash_token(&request.token);
        let token = self
            .store()
            .token(&hash)?
            .ok_or(EnrollError::TokenUnknown)?;
        if let Some(used_at_unix) = token.used_at_unix {
            return Err(EnrollError::TokenReused { used_at_unix });
        }
        if token.expires_at_unix <= now {
            return Err(EnrollError::TokenExpired {
                expired_at_unix: token.expires_at_unix,
            });
        }
        if token.node != request.node_name {
            return Err(EnrollError::TokenWrongNode {
                bound: token.node,
                requested: request.node_name.clone(),
            });
        }
        let node = NodeName::parse(&request.node_name).map_err(EnrollError::NodeName)?;
        // Sign before touching state: a bad CSR must not burn the token.
        let issued = self
            .ca
            .sign_node_csr(&request.csr_pem, &node, self.settings.node_cert_lifetime)
            .map_err(EnrollError::Csr)?;
        let completed = self.store().complete_enrollment(
            &hash,
            node.as_str(),
            &request.facts,
            &issued.serial,
            issued.not_after_unix,
            now,
        );
        match completed {
            Ok(()) => Ok(issued),
            Err(StoreError::TokenRaced) => Err(EnrollError::TokenReused { used_at_unix: now }),
            Err(e) => Err(e.into()),
        }
    }

    // ---- link sessions ------------------------------------------------------------------

    /// Checks that `peer` may hold a link session for its node (rule 2).
    pub fn admit(&self, node: &NodeName, peer: &PeerCert) -> Result<(), LinkError> {
        let store = self.store();
        let record = store
            .node(node.as_str())?
            .ok_or_else(|| LinkError::NotEnrolled(node.to_string()))?;
        match record.state {
            NodeState::Revoked => return Err(LinkError::Revoked(node.to_string())),
            NodeState::Pending => return Err(LinkError::NotEnrolled(node.to_string())),
            NodeState::Enrolled => {}
        }
        let cert = store
            .certificate(&peer.serial)?
            .filter(|c| c.node == node.as_str())
            .ok_or_else(|| LinkError::UnknownCertificate {
                node: node.to_string(),
                serial: peer.serial.clone(),
            })?;
        if cert.revoked_at_unix.is_some() {
            return Err(LinkError::CertificateRevoked(peer.serial.clone()));
        }
        Ok(())
    }

    /// Opens a session for an admitted node that said hello, replacing any older one.
    pub fn attach(&self, node: &NodeName, facts: &Facts) -> Result<Session, LinkError> {
        // A template cloned without a reset machine-id gives two nodes one identity: DHCP
        // leases, journald and K3s all get confused. Refuse the second one by name.
        // An indexed lookup: a scan of every node here made connecting N agents O(N²).
        let twin = self
            .store()
            .enrolled_twin(node.as_str(), &facts.machine_id, &facts.hostname)?;
        if let Some(twin) = twin {
            let what = if twin
                .facts
                .as_ref()
                .is_some_and(|f| f.machine_id == facts.machine_id)
            {
                format!("machine-id {}", facts.machine_id)
            } else {
                format!("hostname {}", facts.hostname)
            };
            let err = LinkError::Duplicate {
                node: node.to_string(),
                other: twin.name,
                what,
            };
            warn!(node = %node, error = %err, "link refused");
            self.event(node.as_str(), "node.duplicate_identity", &err.to_string());
            return Err(err);
        }
        self.store()
            .touch_node(node.as_str(), Some(facts), now_unix())?;
        let generation = self
            .next_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (outbound_tx, outbound) = mpsc::channel(OUTBOUND_CAPACITY);
        let (close, closed) = watch::channel(None);
        let previous = self.sessions().insert(
            node.clone(),
            SessionEntry {
                generation,
                outbound: outbound_tx,
                close,
            },
        );
        if let Some(previous) = previous {
            previous.close.send_replace(Some(CloseReason::Replaced));
            self.event(
                node.as_str(),
                "node.link_replaced",
                "a newer link replaced the old one",
            );
        }
        info!(node = %node, generation, "agent connected");
        self.event(node.as_str(), "node.connected", "agent link established");
        Ok(Session {
            node: node.clone(),
            generation,
            outbound,
            closed,
        })
    }

    /// Ends a session; a no-op if a newer session already replaced it.
    pub fn detach(&self, node: &NodeName, generation: u64) {
        let removed = {
            let mut sessions = self.sessions();
            match sessions.get(node) {
                Some(entry) if entry.generation == generation => sessions.remove(node).is_some(),
                _ => false,
            }
        };
        if removed {
            if let Err(e) = self.store().touch_node(node.as_str(), None, now_unix()) {
                warn!(node = %node, error = %crate::error_chain(&e), "failed to record last seen");
            }
            info!(node = %node, generation, "agent disconnected");
            self.event(node.as_str(), "node.disconnected", "agent link closed");
        }
    }

    /// Whether the node has a session now.
    pub fn is_connected(&self, node: &str) -> bool {
        self.sessions().contains_key(node)
    }

    /// For each of `names`, whether it has a session now; one lock, no copies (a listing of
    /// 10,000 nodes spent 4 ms building a set of names).
    pub fn connected_among<'a>(&self, names: impl Iterator<Item = &'a str>) -> Vec<bool> {
        let sessions = self.sessions();
        names.map(|name| sessions.contains_key(name)).collect()
    }

    /// Names of the nodes with a session now. A set: callers test membership for every node.
    pub fn connected_nodes(&self) -> HashSet<String> {
        self.sessions()
            .keys()
            .map(|n| n.as_str().to_owned())
            .collect()
    }

    /// Pushes a directive to a connected node at once. A revision is allocated only when the
    /// node is connected. Directives are not queued for absent nodes: the role orchestration
    /// keeps each node's desired state and pushes it again when the node says hello.
    pub fn push(&self, node: &str, directive: Directive) -> Result<PushOutcome, LinkError> {
        self.push_with(node, |_| directive)
    }

    /// Like [`Self::push`], for a directive that embeds its own revision.
    pub fn push_with(
        &self,
        node: &str,
        build: impl FnOnce(u64) -> Directive,
    ) -> Result<PushOutcome, LinkError> {
        let name = NodeName::parse(node).map_err(|_| LinkError::UnknownNode(node.to_owned()))?;
        if self.store().node(node)?.is_none() {
            return Err(LinkError::UnknownNode(node.to_owned()));
        }
        let sender = self.sessions().get(&name).map(|s| s.outbound.clone());
        let Some(sender) = sender else {
            return Ok(PushOutcome::NotConnected);
        };
        let permit = match sender.try_reserve() {
            Ok(permit) => permit,
            Err(mpsc::error::TrySendError::Full(())) => return Ok(PushOutcome::QueueFull),
            Err(mpsc::error::TrySendError::Closed(())) => return Ok(PushOutcome::NotConnected),
        };
        let revision = self.store().next_directive_revision(node)?;
        let directive = build(revision);
        let kind = match &directive {
            Directive::Assignment { .. } => "assignment",
            Directive::RenewCertificate => "renew_certificate",
            Directive::Decommission { .. } => "decommission",
            Directive::FetchKubeconfig => "fetch_kubeconfig",
            Directive::Kubectl {
                action: KubectlAction::Drain,
                ..
            } => "drain",
            Directive::Kubectl {
                action: KubectlAction::DeleteNode,
                ..
            } => "delete_node",
            Directive::Uninstall => "uninstall",
        };
        permit.send(Outbound::Directive {
            revision,
            directive,
        });
        self.event(
            node,
            "directive.sent",
            &format!("{kind} (revision {revision})"),
        );
        Ok(PushOutcome::Sent(revision))
    }

    /// In-band renewal: signs a CSR from a node on its open link.
    pub fn renew(&self, node: &NodeName, csr_pem: &str) -> Result<IssuedCert, LinkError> {
        let issued = self
            .ca
            .sign_node_csr(csr_pem, node, self.settings.node_cert_lifetime)
            .map_err(LinkError::Csr)?;
        self.store().insert_certificate(
            node.as_str(),
            &issued.serial,
            issued.not_after_unix,
            now_unix(),
        )?;
        info!(node = %node, serial = %issued.serial, "certificate renewed");
        self.event(
            node.as_str(),
            "node.certificate_renewed",
            &format!(
                "certificate {} valid until {}",
                issued.serial, issued.not_after_unix
            ),
        );
        Ok(issued)
    }

    /// Records a phase report.
    pub fn report_phase(&self, node: &NodeName, mut phase: PhaseRecord) -> Result<(), LinkError> {
        {
            let mut store = self.store();
            let previous = store.node(node.as_str())?.and_then(|n| n.last_phase);
            phase.last_error = match phase.outcome.as_str() {
                "failed" => Some(phase.message.clone()),
                "succeeded" => None,
                _ => previous.and_then(|p| p.last_error),
            };
            store.set_last_phase(node.as_str(), &phase)?;
        }
        let mut message = format!("{} / {}: {}", phase.phase, phase.step, phase.outcome);
        if !phase.message.is_empty() {
            message.push_str(": ");
            message.push_str(&phase.message);
        }
        self.event(node.as_str(), "node.phase", &message);
        Ok(())
    }

    /// Records a health report; an event is written only when health changes.
    pub fn report_health(&self, node: &NodeName, health: HealthRecord) -> Result<(), LinkError> {
        let changed = {
            let mut store = self.store();
            let previous = store.last_health(node.as_str())?;
            store.set_last_health(node.as_str(), &health, now_unix())?;
            previous.is_none_or(|p| p.healthy != health.healthy || p.detail != health.detail)
        };
        if let Some(k3s) = &health.k3s {
            self.observe_k3s(node, k3s)?;
        }
        if changed {
            let state = if health.healthy {
                "healthy"
            } else {
                "unhealthy"
            };
            self.event(
                node.as_str(),
                "node.health",
                &format!("{state}: {}", health.detail),
            );
        }
        Ok(())
    }

    /// Learns readiness and the cluster CA hash from a node's K3s health, then orchestrates.
    /// Readiness comes only from a server's view of the cluster: a worker is Ready when a
    /// server sees it Ready.
    fn observe_k3s(&self, node: &NodeName, k3s: &K3sHealthRecord) -> Result<(), LinkError> {
        let mut changes = Vec::new();
        {
            let mut store = self.store();
            let desired = store.desired_nodes()?;
            let first_server = desired
                .iter()
                .find(|(_, role, _)| role == "server")
                .map(|d| d.0.clone());
            let active = k3s.unit_state == "active";
            if k3s.role == "server"
                && first_server.as_deref() == Some(node.as_str())
                && !k3s.cluster_ca_sha256.is_empty()
            {
                let known = store.cluster_secrets(generate_tokens)?.ca_hash;
                if known.as_deref() != Some(k3s.cluster_ca_sha256.as_str()) {
                    store.set_ca_hash(&k3s.cluster_ca_sha256)?;
                    changes.push((
                        String::new(),
                        "cluster.ca_hash",
                        format!(
                            "first server {node} reported cluster CA {}",
                            k3s.cluster_ca_sha256
                        ),
                    ));
                }
            }
            let mut readiness: Vec<(String, bool)> = Vec::new();
            if k3s.role == "server" && active && k3s.api_ready {
                readiness.extend(
                    k3s.nodes
                        .iter()
                        .map(|(name, ready, _)| (name.clone(), *ready)),
                );
            }
            // A unit seen not active makes its node NotReady. An empty state is no
            // observation: an agent that has not read its unit since an install began (it
            // reads it again when the install ends) must not flip a Ready that a server saw.
            if !active && !k3s.unit_state.is_empty() {
                readiness.push((node.to_string(), false));
            }
            for (name, ready) in readiness {
                let Some(record) = store.node(&name)? else {
                    continue;
                };
                if record.k3s_ready != ready {
                    store.set_k3s_ready(&name, ready)?;
                    let (kind, text) = if ready {
                        ("node.ready", format!("Ready (seen by {node})"))
                    } else {
                        ("node.not_ready", format!("not Ready (seen by {node})"))
                    };
                    changes.push((name, kind, text));
                }
            }
        }
        for (name, kind, text) in changes {
            self.event(&name, kind, &text);
        }
        self.orchestrate(None);
        Ok(())
    }

    /// Assigns every node whose plan may be assigned now and differs from what it has
    /// (rules in [`crate::orchestrate`]). `hello` names a node that just (re)connected: it
    /// gets its plan again even if unchanged, since queued directives do not survive a
    /// reconnect. Failures are logged; the next trigger retries.
    pub fn orchestrate(&self, hello: Option<&NodeName>) {
        if let Err(e) = self.try_orchestrate(hello) {
            warn!(error = %crate::error_chain(&e), "orchestration failed");
        }
    }

    fn try_orchestrate(&self, hello: Option<&NodeName>) -> Result<(), LinkError> {
        let (drafts, previous) = {
            let mut store = self.store();
            let desired_rows = store.desired_nodes()?;
            if desired_rows.is_empty() {
                return Ok(());
            }
            let record = store.cluster_secrets(generate_tokens)?;
            let Some(settings) = record
                .settings_json
                .as_deref()
                .and_then(|j| serde_json::from_str::<ClusterSettings>(j).ok())
            else {
                return Ok(());
            };
            let desired: Vec<DesiredNode> = desired_rows
                .iter()
                .filter_map(|(name, role, ip)| {
                    Some(DesiredNode {
                        name: name.clone(),
                        role: Role::parse(role)?,
                        ip: ip.parse().ok()?,
                    })
                })
                .collect();
            let connected = self.connected_nodes();
            let mut observed = HashMap::new();
            for node in &desired {
                let record = store.node(&node.name)?;
                // Servers count once their API serves (rule 3 of orchestrate needs a server to
                // join, not a CNI); other nodes when a server sees them Ready.
                let ready = record.as_ref().is_some_and(|n| match node.role {
                    Role::Server => n.serves_api(),
                    Role::Agent => n.k3s_ready,
                });
                // The version the node runs, from its last K3s health report.
                let version = record
                    .and_then(|n| n.last_health)
                    .and_then(|h| h.k3s)
                    .map(|k| k.version)
                    .filter(|v| !v.is_empty());
                observed.insert(
                    node.name.clone(),
                    Observed {
                        connected: connected.contains(&node.name),
                        ready,
                        version,
                    },
                );
            }
            let secrets = ClusterSecrets {
                server_token: record.server_token,
                agent_token: record.agent_token,
                ca_hash: record.ca_hash,
            };
            let drafts = decide(&desired, &settings, &secrets, &observed);
            let previous: HashMap<String, String> = drafts
                .iter()
                .filter_map(|d| Some((d.node.clone(), store.assignment(&d.node).ok()??.1)))
                .collect();
            (drafts, previous)
        };
        for draft in drafts {
            let unchanged = previous.get(&draft.node) == Some(&draft.digest());
            let said_hello = hello.is_some_and(|h| h.as_str() == draft.node);
            if unchanged && !said_hello {
                continue;
            }
            let role = draft.role.as_str();
            let outcome = self.push_with(&draft.node, |revision| Directive::Assignment {
                role: role.to_owned(),
                plan_json: draft.to_json(revision),
            })?;
            if let PushOutcome::Sent(revision) = outcome {
                self.store().record_assignment(
                    &draft.node,
                    revision,
                    &draft.digest(),
                    role,
                    now_unix(),
                )?;
                if !unchanged {
                    info!(node = %draft.node, role, revision, "role assigned");
                    self.event(
                        &draft.node,
                        "node.assigned",
                        &format!("role {role} (revision {revision})"),
                    );
                }
            }
        }
        Ok(())
    }

    /// Records the desired cluster (from the spec) and orchestrates. The K3s tokens are
    /// generated here the first time, before any VM exists.
    pub fn set_desired_cluster(
        &self,
        nodes: &[DesiredNode],
        settings: &ClusterSettings,
    ) -> Result<(), StoreError> {
        crate::orchestrate::record_desired(&mut self.store(), nodes, settings)?;
        self.orchestrate(None);
        Ok(())
    }

    // ---- operator actions ---------------------------------------------------------------

    /// Revokes a node: its certificates are refused from now on and its session is cut.
    /// Returns how many certificates were revoked and whether a session was cut.
    pub fn revoke(&self, node: &str) -> Result<(u32, bool), LinkError> {
        let revoked = self
            .store()
            .revoke_node(node, now_unix())
            .map_err(|e| match e {
                StoreError::UnknownNode(n) => LinkError::UnknownNode(n),
                other => LinkError::Store(other),
            })?;
        // The session ends itself on this signal and detaches, which records the disconnect.
        let cut = match NodeName::parse(node) {
            Ok(name) => match self.sessions().get(&name) {
                Some(entry) => {
                    entry.close.send_replace(Some(CloseReason::Revoked));
                    true
                }
                None => false,
            },
            Err(_) => false,
        };
        warn!(
            node,
            certificates = revoked,
            stream_cut = cut,
            "node revoked"
        );
        self.event(
            node,
            "node.revoked",
            &format!("{revoked} certificate(s) revoked; link cut: {cut}"),
        );
        Ok((revoked, cut))
    }

    /// All nodes as stored, by name.
    ///
    /// Listing parses three JSON documents per node; at 10,000 nodes that was most of a
    /// `ListNodes` call. So parsed nodes are kept with their row version (moved by triggers on
    /// every change, whoever writes) and only nodes whose version moved are read again; when
    /// many moved, all are read at once.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let mut cache = self.node_cache.lock().unwrap_or_else(|e| e.into_inner());
        {
            let store = self.store();
            let versions = store.node_versions()?;
            let stale: Vec<&str> = versions
                .iter()
                .filter(|(name, version)| cache.get(name).is_none_or(|(v, _)| v != version))
                .map(|(name, _)| name.as_str())
                .collect();
            if stale.len() > NODE_REFETCH_ONE_BY_ONE.max(versions.len() / 8) {
                *cache = store
                    .nodes_versioned()?
                    .into_iter()
                    .map(|(version, node)| (node.name.clone(), (version, node)))
                    .collect();
            } else {
                for name in stale {
                    match store.node_versioned(name)? {
                        Some((version, node)) => cache.insert(name.to_owned(), (version, node)),
                        None => cache.remove(name),
                    };
                }
                if cache.len() > versions.len() {
                    let live: std::collections::HashSet<&str> =
                        versions.iter().map(|(name, _)| name.as_str()).collect();
                    cache.retain(|name, _| live.contains(name.as_str()));
                }
            }
        }
        // A BTreeMap: already in name order.
        Ok(cache.values().map(|(_, node)| node.clone()).collect())
    }

    /// Each desired node's role, by name.
    pub fn roles(&self) -> Result<HashMap<String, String>, StoreError> {
        Ok(self
            .store()
            .desired_nodes()?
            .into_iter()
            .map(|(name, role, _)| (name, role))
            .collect())
    }

    /// One node as stored.
    pub fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        self.store().node(name)
    }
}

/// New K3s tokens, for [`Store::cluster_secrets`].
pub fn generate_tokens() -> (String, String) {
    let secrets = ClusterSecrets::generate();
    (secrets.server_token, secrets.agent_token)
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
