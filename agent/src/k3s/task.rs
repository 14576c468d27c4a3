//! The K3s task: owns the [`Executor`] for the agent's whole life, so an install outlives any
//! one link session. The link talks to it through a [`K3sHandle`].
//!
//! Rules:
//! 1. On start, a plan a crash or reboot interrupted is resumed from its checkpoint before
//!    anything else, and its directive acknowledged when it ends.
//! 2. Assignments are applied one at a time. A newer one with a different plan stops the
//!    current one before its next step; the stopped one is acknowledged as failed
//!    ("superseded"), and the newer plan is compared with what is installed. The same plan
//!    (the same [`InstallPlan::fingerprint`]) pushed again, as the coordinator does at each
//!    reconnect, does not stop it, whether it runs for a directive or was resumed from the
//!    checkpoint; it is applied afterwards, which changes nothing. Several waiting ones
//!    collapse into the newest: the others are acknowledged as superseded, except those with
//!    the newest's plan, which are acknowledged with its outcome.
//! 3. Each step's start and end is queued as a [`K3sEvent::Phase`]; the link sends the queue
//!    on the current session, and after a reconnect resends the newest phase.
//! 4. Each directive is acknowledged once ([`K3sEvent::Applied`]): ok when applied, failed with
//!    the error (redacted) when it cannot be. Transient failures are retried first, up to
//!    [`MAX_ATTEMPTS`] times with a growing delay.
//! 5. The unit state is refreshed after each plan, whenever the link asks
//!    ([`K3sHandle::refresh`], on each health tick), and every [`UNIT_REFRESH`] while idle
//!    without asks, and published through a `watch` for health reports. Each refresh of a
//!    server whose unit is active also reads its [`ServerView`] of the cluster; otherwise
//!    the view is `None`. Asks made while a plan runs collapse into one refresh after it.
//! 6. The queue is unbounded, but only directives add to it: at most two events per step per
//!    attempt, one acknowledgement per directive, and one kubeconfig per `FetchKubeconfig`.
//! 7. Operations ([`Operation`]) are acknowledged once each, ok or failed with the reason. A
//!    kubeconfig goes out as a [`K3sEvent::Kubeconfig`] just before its acknowledgement.
//!    `kubectl` runs beside everything else (a drain may take minutes); the kubeconfig is
//!    read at once; an uninstall waits for the plan in progress, and on success the status
//!    goes back to "no role".

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use log::{error, info, warn};
use tokio::{
    sync::{Notify, mpsc, watch},
    task::{JoinHandle, JoinSet},
};

use crate::{
    backoff::Backoff,
    k3s::{
        host::Host,
        install::{Executor, K3sInstallError, PhaseEvent, Reporter, Step, StepOutcome},
        ops::{self, Kubeconfig, Operation, OperationError},
        plan::{InstallPlan, Role},
        view::{self, ServerView},
    },
};

/// Attempts at one directive before it is acknowledged as failed.
pub const MAX_ATTEMPTS: u32 = 3;
/// How often the unit state is read while nothing is being applied.
pub const UNIT_REFRESH: Duration = Duration::from_secs(15);
/// First delay before retrying a transiently failed plan; it doubles, up to [`RETRY_CAP`].
const RETRY_BASE: Duration = Duration::from_secs(20);
const RETRY_CAP: Duration = Duration::from_secs(120);

/// An `Assignment` directive as it arrived.
#[derive(Clone, PartialEq, Eq)]
pub struct Submission {
    pub revision: u64,
    pub role: String,
    /// Holds tokens: never logged.
    pub plan_json: String,
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submission")
            .field("revision", &self.revision)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// What the task tells the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum K3sEvent {
    /// Progress of a step (phase [`PHASE`](crate::k3s::install::PHASE)).
    Phase(PhaseEvent),
    /// The admin kubeconfig a `FetchKubeconfig` asked for; its acknowledgement follows.
    Kubeconfig { revision: u64, content: Kubeconfig },
    /// The directive is done: acknowledge it.
    Applied {
        revision: u64,
        ok: bool,
        message: String,
    },
}

/// What the node is doing about K3s, for health reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct K3sStatus {
    /// The role of the newest plan, `None` before any.
    pub role: Option<Role>,
    pub revision: u64,
    /// Release tag or channel.
    pub version: String,
    /// The plan revision and step being applied now.
    pub applying: Option<(u64, Step)>,
    /// `systemctl is-active` of the unit, as last read.
    pub unit_state: Option<String>,
    /// The last failure, redacted.
    pub last_error: Option<String>,
    /// `flannel-backend: none`: Nodes stay NotReady until a CNI is installed.
    pub waits_for_cni: bool,
    /// A server's view of the cluster, read while its unit is active; `None` otherwise.
    pub server_view: Option<ServerView>,
}

impl K3sStatus {
    /// Healthy: no role assigned and nothing being applied, or the unit active.
    pub fn healthy(&self) -> bool {
        match self.role {
            None => self.applying.is_none(),
            Some(_) => self.applying.is_none() && self.unit_state.as_deref() == Some("active"),
        }
    }

    /// One line for the health report.
    pub fn detail(&self) -> String {
        let Some(role) = self.role else {
            return match self.applying {
                Some((revision, step)) => format!("applying revision {revision}: {step}"),
                None => "agent running; no role assigned".into(),
            };
        };
        let mut detail = format!(
            "{}.service {} (k3s {role} {}, revision {})",
            role.unit(),
            self.unit_state.as_deref().unwrap_or("unknown"),
            self.version,
            self.revision
        );
        let active = self.unit_state.as_deref() == Some("active");
        if let Some((revision, step)) = self.applying {
            detail.push_str(&format!("; applying revision {revision}: {step}"));
        } else if self.waits_for_cni
            && active
            && !self
                .server_view
                .as_ref()
                .is_some_and(ServerView::all_nodes_ready)
        {
            // NotReady Nodes are expected until the CNI is installed: not a failure.
            detail.push_str("; flannel-backend none: waiting for CNI");
        }
        if let Some(view) = self.server_view.as_ref().filter(|_| active) {
            let ready = view.nodes.iter().filter(|n| n.ready).count();
            detail.push_str(&format!(
                "; api {}, {ready}/{} nodes Ready",
                if view.api_ready { "ready" } else { "not ready" },
                view.nodes.len()
            ));
            if let Some(problem) = &view.problem {
                detail.push_str("; cluster view: ");
                detail.push_str(problem);
            }
        }
        if let Some(error) = &self.last_error {
            detail.push_str("; last error: ");
            detail.push_str(error);
        }
        detail
    }
}

/// The newest revision handed to the task, and its plan's [`InstallPlan::fingerprint`]
/// (`None` when the plan is refused).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Newest {
    revision: u64,
    fingerprint: Option<String>,
}

/// The fingerprint of a submission's plan; `None` when it is refused.
fn fingerprint(submission: &Submission) -> Option<String> {
    InstallPlan::for_directive(submission.revision, &submission.role, &submission.plan_json)
        .ok()
        .map(|plan| plan.fingerprint())
}

/// Shared between the handle (which sets it) and the running plan's reporter.
type SharedNewest = Arc<Mutex<Newest>>;

fn newest(shared: &SharedNewest) -> Newest {
    // Nothing panics while holding this lock; a poisoned value is still a valid one.
    shared.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The link's side of the K3s task.
#[derive(Debug)]
pub struct K3sHandle {
    submissions: mpsc::UnboundedSender<Submission>,
    operations: mpsc::UnboundedSender<(u64, Operation)>,
    events: mpsc::UnboundedReceiver<K3sEvent>,
    status: watch::Receiver<K3sStatus>,
    newest_submitted: SharedNewest,
    refresh: Arc<Notify>,
    last_phase: Option<PhaseEvent>,
    /// An event a session took but could not send: first in the next backlog.
    requeued: Option<K3sEvent>,
    task: JoinHandle<()>,
}

impl K3sHandle {
    /// Starts the task (rule 1: it resumes an interrupted plan first).
    pub fn spawn<H: Host + Clone + 'static>(executor: Executor<H>) -> Self {
        let (submissions, inbox) = mpsc::unbounded_channel();
        let (operations, operation_inbox) = mpsc::unbounded_channel();
        let (outbox, events) = mpsc::unbounded_channel();
        let (status_tx, status) = watch::channel(K3sStatus::default());
        let newest_submitted = SharedNewest::default();
        let refresh = Arc::new(Notify::new());
        let task = tokio::spawn(
            Task {
                executor,
                inbox,
                operations: operation_inbox,
                running: JoinSet::new(),
                outbox,
                status: status_tx,
                newest_submitted: newest_submitted.clone(),
                refresh: refresh.clone(),
                waiting: None,
            }
            .run(),
        );
        Self {
            submissions,
            operations,
            events,
            status,
            newest_submitted,
            refresh,
            last_phase: None,
            requeued: None,
            task,
        }
    }

    /// Hands an Assignment to the task. It is acknowledged through [`K3sHandle::next_event`].
    /// `false` when the task has stopped.
    pub fn submit(&self, submission: Submission) -> bool {
        {
            let mut newest = self
                .newest_submitted
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if submission.revision > newest.revision {
                *newest = Newest {
                    revision: submission.revision,
                    fingerprint: fingerprint(&submission),
                };
            }
        }
        self.submissions.send(submission).is_ok()
    }

    /// Hands an operation to the task (rule 7). It is acknowledged through
    /// [`K3sHandle::next_event`]. `false` when the task has stopped.
    pub fn operate(&self, revision: u64, operation: Operation) -> bool {
        self.operations.send((revision, operation)).is_ok()
    }

    /// The next event; waits for ever once the task has stopped.
    pub async fn next_event(&mut self) -> K3sEvent {
        match self.events.recv().await {
            Some(event) => {
                self.note(&event);
                event
            }
            None => std::future::pending().await,
        }
    }

    /// For a new session (rule 3): the events queued while disconnected, and, when none of
    /// them is a phase, the newest phase sent before, first.
    pub fn backlog(&mut self) -> Vec<K3sEvent> {
        let resend = self.last_phase.clone();
        let mut queued: Vec<K3sEvent> = self.requeued.take().into_iter().collect();
        while let Ok(event) = self.events.try_recv() {
            self.note(&event);
            queued.push(event);
        }
        if !queued.iter().any(|e| matches!(e, K3sEvent::Phase(_)))
            && let Some(phase) = resend
        {
            queued.insert(0, K3sEvent::Phase(phase));
        }
        queued
    }

    /// Gives back an event from [`K3sHandle::next_event`] that the session failed to send, so
    /// the next session sends it first.
    pub fn requeue(&mut self, event: K3sEvent) {
        self.requeued = Some(event);
    }

    /// Asks the task to read the unit state (and a server's view of the cluster) again soon
    /// (rule 5). Asks made before the task gets to them count once.
    pub fn refresh(&self) {
        self.refresh.notify_one();
    }

    /// The newest status.
    pub fn status(&self) -> K3sStatus {
        self.status.borrow().clone()
    }

    /// A receiver of status changes.
    pub fn watch_status(&self) -> watch::Receiver<K3sStatus> {
        self.status.clone()
    }

    /// Stops the task and waits for it. A plan in progress stops where it is (a running
    /// command is killed) and resumes from its checkpoint at the next start.
    pub async fn shutdown(self) {
        self.task.abort();
        match self.task.await {
            Err(e) if e.is_panic() => error!("the K3s task panicked"),
            _ => {}
        }
    }

    fn note(&mut self, event: &K3sEvent) {
        if let K3sEvent::Phase(phase) = event {
            self.last_phase = Some(phase.clone());
        }
    }
}

/// The phase a new session reports when no step has been reported yet: waiting for a role,
/// or the role in place.
pub fn idle_phase(status: &K3sStatus) -> (String, String) {
    match status.role {
        None => ("ready".into(), "waiting for a role".into()),
        Some(role) => (
            "ready".into(),
            format!("k3s {role} at revision {}", status.revision),
        ),
    }
}

/// What the task does next.
enum Next {
    Apply(Submission),
    Operate(u64, Operation),
    Refresh,
}

struct Task<H> {
    executor: Executor<H>,
    inbox: mpsc::UnboundedReceiver<Submission>,
    operations: mpsc::UnboundedReceiver<(u64, Operation)>,
    /// kubectl calls in progress (rule 7); aborted with the task.
    running: JoinSet<()>,
    outbox: mpsc::UnboundedSender<K3sEvent>,
    status: watch::Sender<K3sStatus>,
    newest_submitted: SharedNewest,
    /// Set by [`K3sHandle::refresh`].
    refresh: Arc<Notify>,
    /// A submission taken from the inbox while waiting to retry.
    waiting: Option<Submission>,
}

impl<H: Host + Clone + 'static> Task<H> {
    async fn run(mut self) {
        self.publish_checkpoint();
        self.resume().await;
        self.refresh_unit().await;
        let mut refresh = tokio::time::interval(UNIT_REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = match self.waiting.take() {
                Some(submission) => Next::Apply(submission),
                None => tokio::select! {
                    submission = self.inbox.recv() => match submission {
                        Some(submission) => Next::Apply(submission),
                        None => return,
                    },
                    Some((revision, operation)) = self.operations.recv() => {
                        Next::Operate(revision, operation)
                    }
                    Some(_) = self.running.join_next(), if !self.running.is_empty() => continue,
                    _ = refresh.tick() => Next::Refresh,
                    () = self.refresh.notified() => {
                        // The link's ticks drive refreshes while it asks.
                        refresh.reset();
                        Next::Refresh
                    }
                },
            };
            match next {
                Next::Apply(submission) => {
                    let (submission, adopted) = self.newest(submission);
                    self.handle(submission, &adopted).await;
                }
                Next::Operate(revision, operation) => self.operate(revision, operation).await,
                Next::Refresh => {}
            }
            self.refresh_unit().await;
        }
    }

    /// Rule 7.
    async fn operate(&mut self, revision: u64, operation: Operation) {
        let role = self.status.borrow().role;
        match operation {
            Operation::FetchKubeconfig => match ops::kubeconfig(self.executor.host(), role) {
                Ok(content) => {
                    info!("revision {revision}: sending the admin kubeconfig");
                    self.send(K3sEvent::Kubeconfig { revision, content });
                    acknowledge(&self.outbox, revision, Ok("kubeconfig sent".into()));
                }
                Err(e) => acknowledge(&self.outbox, revision, Err(e)),
            },
            Operation::Kubectl(command) => {
                let host = self.executor.host().clone();
                let outbox = self.outbox.clone();
                self.running.spawn(async move {
                    let result = ops::kubectl(&host, role, &command).await;
                    acknowledge(&outbox, revision, result);
                });
            }
            Operation::Uninstall => {
                info!("revision {revision}: uninstalling K3s");
                let result = ops::uninstall(&self.executor).await;
                if result.is_ok() {
                    self.status.send_replace(K3sStatus::default());
                } else {
                    self.publish_checkpoint();
                }
                acknowledge(&self.outbox, revision, result);
            }
        }
    }

    /// Rule 2: of everything waiting, only the newest is applied. Also returns the older
    /// revisions of the same plan, in order, to acknowledge with it.
    fn newest(&mut self, mut current: Submission) -> (Submission, Vec<u64>) {
        let mut older = Vec::new();
        while let Ok(next) = self.inbox.try_recv() {
            if next.revision > current.revision {
                older.push(std::mem::replace(&mut current, next));
            } else if next.revision < current.revision {
                older.push(next);
            }
        }
        let plan = fingerprint(&current);
        let mut adopted = Vec::new();
        for submission in older {
            if plan.is_some() && fingerprint(&submission) == plan {
                adopted.push(submission.revision);
            } else {
                self.supersede(submission.revision, current.revision);
            }
        }
        adopted.sort_unstable();
        (current, adopted)
    }

    fn supersede(&self, revision: u64, by: u64) {
        info!("revision {revision} superseded by {by}");
        self.send(K3sEvent::Applied {
            revision,
            ok: false,
            message: format!("superseded by revision {by} before it was applied"),
        });
    }

    /// Rule 1: finishes a plan left incomplete by a crash or reboot. The checkpoint keeps no
    /// token, but its fingerprint is the plan's, so the same plan pushed again meanwhile does
    /// not stop it (rule 2).
    async fn resume(&mut self) {
        match self.executor.checkpoint() {
            Ok(Some(checkpoint)) if !checkpoint.is_complete() => {
                let fingerprint = checkpoint.fingerprint();
                self.apply(checkpoint.plan.revision, None, fingerprint, &[])
                    .await;
            }
            Ok(_) => {}
            Err(e) => warn!("{}", crate::chain(&e)),
        }
    }

    /// Applies `submission`, and acknowledges the `adopted` revisions (the same plan) with it.
    async fn handle(&mut self, submission: Submission, adopted: &[u64]) {
        let revision = submission.revision;
        info!("applying revision {revision} (role {})", submission.role);
        let plan =
            match InstallPlan::for_directive(revision, &submission.role, &submission.plan_json) {
                Ok(plan) => plan,
                Err(e) => {
                    // Refused before any step: report it as a failed preflight.
                    let message = crate::chain(&e);
                    for (outcome, message) in [
                        (StepOutcome::Started, String::new()),
                        (StepOutcome::Failed, message.clone()),
                    ] {
                        self.send(K3sEvent::Phase(PhaseEvent {
                            revision,
                            step: Step::Preflight,
                            outcome,
                            attempt: 1,
                            message,
                        }));
                    }
                    self.done(revision, adopted, Err(message));
                    return;
                }
            };
        self.status.send_modify(|s| {
            s.role.get_or_insert(plan.spec.role);
        });
        let fingerprint = plan.fingerprint();
        self.apply(revision, Some(&plan), fingerprint, adopted)
            .await;
    }

    /// Applies `plan`, or resumes the checkpoint when `None`, retrying transient failures
    /// (rule 4), then acknowledges `revision` and the `adopted` ones.
    async fn apply(
        &mut self,
        revision: u64,
        plan: Option<&InstallPlan>,
        fingerprint: String,
        adopted: &[u64],
    ) {
        let mut backoff = Backoff::with_jitter(RETRY_BASE, RETRY_CAP, rand::random::<f64>);
        for attempt in 1..=MAX_ATTEMPTS {
            let result = match plan {
                Some(plan) => {
                    let mut reporter = self.reporter(revision, fingerprint.clone());
                    self.executor.apply(plan, &mut reporter).await.map(Some)
                }
                None => {
                    let mut reporter = self.reporter(revision, fingerprint.clone());
                    self.executor.resume(&mut reporter).await
                }
            };
            self.publish_checkpoint();
            let error = match result {
                Ok(applied) => {
                    let message =
                        applied.map_or_else(|| "nothing left to do".into(), |a| a.to_string());
                    self.done(revision, adopted, Ok(message));
                    return;
                }
                Err(K3sInstallError::Interrupted { next }) => {
                    info!("revision {revision} stopped before {next}");
                    let by = newest(&self.newest_submitted).revision;
                    for &stopped in adopted.iter().chain([&revision]) {
                        self.supersede(stopped, by);
                    }
                    return;
                }
                Err(e) => e,
            };
            // Host output in errors is redacted by the executor; plan errors hold no token.
            let message = crate::chain(&error);
            if !error.is_transient() || attempt == MAX_ATTEMPTS {
                self.done(revision, adopted, Err(message));
                return;
            }
            let delay = backoff.next_delay();
            warn!("revision {revision} failed ({message}); retrying in {delay:.0?}");
            self.status
                .send_modify(|s| s.last_error = Some(message.clone()));
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                submission = self.inbox.recv() => {
                    // A newer directive replaces the retry (rule 2).
                    self.waiting = submission;
                    self.done(revision, adopted, Err(message));
                    return;
                }
            }
        }
    }

    /// Acknowledges `revision` with `result`, after the `adopted` revisions of the same plan.
    fn done(&self, revision: u64, adopted: &[u64], result: Result<String, String>) {
        for &older in adopted {
            let (ok, message) = match &result {
                Ok(message) => (true, message),
                Err(message) => (false, message),
            };
            info!("revision {older}: same plan as revision {revision}");
            self.send(K3sEvent::Applied {
                revision: older,
                ok,
                message: format!("same plan as revision {revision}: {message}"),
            });
        }
        let (ok, message) = match result {
            Ok(message) => {
                info!("revision {revision} applied: {message}");
                (true, message)
            }
            Err(message) => {
                warn!("revision {revision} failed: {message}");
                self.status
                    .send_modify(|s| s.last_error = Some(message.clone()));
                (false, message)
            }
        };
        if ok {
            self.status.send_modify(|s| s.last_error = None);
        }
        self.status.send_modify(|s| s.applying = None);
        self.send(K3sEvent::Applied {
            revision,
            ok,
            message,
        });
    }

    fn send(&self, event: K3sEvent) {
        // The handle is gone only at shutdown, when nobody listens any more.
        let _ = self.outbox.send(event);
    }

    fn reporter(&self, revision: u64, fingerprint: String) -> TaskReporter {
        TaskReporter {
            outbox: self.outbox.clone(),
            status: self.status.clone(),
            newest_submitted: self.newest_submitted.clone(),
            revision,
            fingerprint,
        }
    }

    /// Role, revision and version from the checkpoint.
    fn publish_checkpoint(&self) {
        match self.executor.checkpoint() {
            Ok(Some(checkpoint)) => self.status.send_modify(|s| {
                s.role = Some(checkpoint.plan.role);
                s.revision = checkpoint.plan.revision;
                // What is installed, not what is being applied: the coordinator orders
                // upgrades by the version each node actually runs.
                s.version = checkpoint
                    .installed
                    .as_ref()
                    .map(|i| match &i.version {
                        Some(version) => version.clone(),
                        None => format!("channel {}", i.channel),
                    })
                    .unwrap_or_default();
                s.waits_for_cni = checkpoint.plan.waits_for_cni();
                if checkpoint.last_error.is_some() {
                    s.last_error.clone_from(&checkpoint.last_error);
                }
            }),
            Ok(None) => {}
            Err(e) => warn!("{}", crate::chain(&e)),
        }
    }

    async fn refresh_unit(&self) {
        let Some(role) = self.status.borrow().role else {
            return;
        };
        let state = match self.executor.unit_state(role).await {
            Ok(state) => state,
            Err(e) => {
                warn!("{}", crate::chain(&e));
                "unknown".into()
            }
        };
        let server_view = if role == Role::Server && state == "active" {
            Some(view::read(self.executor.host()).await)
        } else {
            None
        };
        self.status.send_if_modified(|s| {
            let changed =
                s.unit_state.as_deref() != Some(state.as_str()) || s.server_view != server_view;
            s.unit_state = Some(state);
            s.server_view = server_view;
            changed
        });
    }
}

/// Queues the acknowledgement of an operation (rule 7).
fn acknowledge(
    outbox: &mpsc::UnboundedSender<K3sEvent>,
    revision: u64,
    result: Result<String, OperationError>,
) {
    let (ok, message) = match result {
        Ok(message) => {
            info!("revision {revision} done: {message}");
            (true, message)
        }
        Err(e) => {
            let message = crate::chain(&e);
            warn!("revision {revision} failed: {message}");
            (false, message)
        }
    };
    // The handle is gone only at shutdown, when nobody listens any more.
    let _ = outbox.send(K3sEvent::Applied {
        revision,
        ok,
        message,
    });
}

/// Queues progress, tracks the current step, and stops a plan when a newer one waits.
struct TaskReporter {
    outbox: mpsc::UnboundedSender<K3sEvent>,
    status: watch::Sender<K3sStatus>,
    newest_submitted: SharedNewest,
    revision: u64,
    /// The running plan's: a newer directive with the same plan does not stop it.
    fingerprint: String,
}

impl Reporter for TaskReporter {
    fn report(&mut self, event: PhaseEvent) {
        let applying =
            (event.outcome == StepOutcome::Started).then_some((event.revision, event.step));
        self.status.send_modify(|s| s.applying = applying);
        let _ = self.outbox.send(K3sEvent::Phase(event));
    }

    fn proceed(&mut self, _next: Step) -> bool {
        let newest = newest(&self.newest_submitted);
        newest.revision <= self.revision
            || newest.fingerprint.as_deref() == Some(self.fingerprint.as_str())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::k3s::{fake::FakeHost, install::ExecutorSettings};

    fn submission(revision: u64, node_ip: &str) -> Submission {
        Submission {
            revision,
            role: "server".into(),
            plan_json: json!({
                "schema": 1, "revision": revision, "install_revision": 1, "role": "server",
                "version": "v1.31.4+k3s1", "installer": {"file": "/opt/install.sh"},
                "token": "task-test-token", "config": {"node-ip": node_ip}
            })
            .to_string(),
        }
    }

    fn handle(dir: &std::path::Path) -> K3sHandle {
        handle_on(dir, FakeHost::default())
    }

    fn handle_on(dir: &std::path::Path, host: FakeHost) -> K3sHandle {
        host.put("/opt/install.sh", b"#!/bin/sh\n");
        K3sHandle::spawn(Executor::new(
            host,
            dir.to_owned(),
            ExecutorSettings {
                poll_interval: Duration::from_millis(100),
                ..ExecutorSettings::default()
            },
        ))
    }

    async fn until_applied(handle: &mut K3sHandle) -> (Vec<PhaseEvent>, (u64, bool, String)) {
        let mut phases = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(600), handle.next_event())
                .await
                .expect("an acknowledgement")
            {
                K3sEvent::Phase(phase) => phases.push(phase),
                K3sEvent::Applied {
                    revision,
                    ok,
                    message,
                } => return (phases, (revision, ok, message)),
                K3sEvent::Kubeconfig { .. } => panic!("no kubeconfig was asked for"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_assignment_is_reported_step_by_step_then_acknowledged_and_health_follows() {
        let dir = tempfile::tempdir().unwrap();
        let mut handle = handle(dir.path());
        assert!(handle.status().healthy());
        assert_eq!(handle.status().detail(), "agent running; no role assigned");
        assert!(handle.submit(submission(4, "10.0.0.1")));
        let (phases, (revision, ok, message)) = until_applied(&mut handle).await;
        assert_eq!((revision, ok), (4, true), "{message}");
        assert_eq!(phases.len(), 10);
        assert!(phases.iter().all(|p| p.revision == 4));
        let mut status = handle.watch_status();
        let status = status
            .wait_for(|s| s.unit_state.is_some())
            .await
            .unwrap()
            .clone();
        assert!(status.healthy(), "{status:?}");
        assert!(
            status
                .detail()
                .starts_with("k3s.service active (k3s server v1.31.4+k3s1, revision 4)"),
            "{}",
            status.detail()
        );

        // A session that starts now resends the newest phase.
        let backlog = handle.backlog();
        assert_eq!(backlog, [K3sEvent::Phase(phases.last().unwrap().clone())]);
        // An acknowledgement a dying session could not send comes first in the next one.
        let ack = K3sEvent::Applied {
            revision,
            ok,
            message,
        };
        handle.requeue(ack.clone());
        assert_eq!(handle.backlog(), [K3sEvent::Phase(phases[9].clone()), ack]);
        handle.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_plan_is_a_failed_preflight_and_a_failed_ack() {
        let dir = tempfile::tempdir().unwrap();
        let mut handle = handle(dir.path());
        let mut bad = submission(4, "10.0.0.1");
        bad.role = "agent".into();
        handle.submit(bad);
        let (phases, (revision, ok, message)) = until_applied(&mut handle).await;
        assert_eq!((revision, ok), (4, false));
        assert!(message.contains("role \"agent\""), "{message}");
        assert_eq!(phases[1].step, Step::Preflight);
        assert_eq!(phases[1].outcome, StepOutcome::Failed);
        handle.shutdown().await;
    }

    /// Submits `first`, then `second` while `first` is at run-installer.
    async fn push_mid_install(
        handle: &mut K3sHandle,
        first: Submission,
        second: Submission,
    ) -> Vec<K3sEvent> {
        handle.submit(first);
        let mut events = Vec::new();
        loop {
            let event = tokio::time::timeout(Duration::from_secs(600), handle.next_event())
                .await
                .expect("an event");
            let at_installer = matches!(&event, K3sEvent::Phase(p)
                if p.step == Step::RunInstaller && p.outcome == StepOutcome::Started);
            events.push(event);
            if at_installer {
                break;
            }
        }
        let revision = second.revision;
        handle.submit(second);
        loop {
            let event = tokio::time::timeout(Duration::from_secs(600), handle.next_event())
                .await
                .expect("an event");
            let last = matches!(&event, K3sEvent::Applied { revision: r, .. } if *r == revision);
            events.push(event);
            if last {
                return events;
            }
        }
    }

    fn acks(events: &[K3sEvent]) -> Vec<(u64, bool)> {
        events
            .iter()
            .filter_map(|e| match e {
                K3sEvent::Applied { revision, ok, .. } => Some((*revision, *ok)),
                K3sEvent::Phase(_) | K3sEvent::Kubeconfig { .. } => None,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_plan_pushed_again_mid_install_does_not_interrupt_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut handle = handle(dir.path());
        let events = push_mid_install(
            &mut handle,
            submission(4, "10.0.0.1"),
            submission(5, "10.0.0.1"),
        )
        .await;
        assert_eq!(acks(&events), [(4, true), (5, true)]);
        let started_after_push: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                K3sEvent::Phase(p) if p.revision == 5 => Some(p.step),
                _ => None,
            })
            .collect();
        assert!(
            started_after_push.is_empty(),
            "revision 5 changed nothing: {started_after_push:?}"
        );
        handle.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_different_plan_mid_install_stops_the_current_one_before_its_next_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut handle = handle(dir.path());
        let events = push_mid_install(
            &mut handle,
            submission(4, "10.0.0.1"),
            submission(5, "10.0.0.2"),
        )
        .await;
        assert_eq!(acks(&events), [(4, false), (5, true)]);
        let revision_4_steps: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                K3sEvent::Phase(p) if p.revision == 4 && p.outcome == StepOutcome::Succeeded => {
                    Some(p.step)
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            revision_4_steps,
            [
                Step::Preflight,
                Step::WriteConfig,
                Step::FetchInstaller,
                Step::RunInstaller
            ],
            "revision 4 stopped before start"
        );
        // Revision 5 finds the installer done and rewrites only the config, then starts.
        let revision_5_steps: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                K3sEvent::Phase(p) if p.revision == 5 && p.outcome == StepOutcome::Succeeded => {
                    Some(p.step)
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            revision_5_steps,
            [Step::Preflight, Step::WriteConfig, Step::Start]
        );
        handle.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_plan_resumed_after_a_crash_is_not_superseded_by_the_same_plan_pushed_again() {
        let dir = tempfile::tempdir().unwrap();
        let host = FakeHost::default();
        let mut handle = handle_on(dir.path(), host.clone());
        handle.submit(submission(4, "10.0.0.1"));
        loop {
            if let K3sEvent::Phase(p) = next(&mut handle).await
                && p.step == Step::RunInstaller
                && p.outcome == StepOutcome::Started
            {
                break;
            }
        }
        // The agent dies in the middle of run-installer.
        handle.shutdown().await;
        let executor = Executor::new(host.clone(), dir.path().to_owned(), Default::default());
        let checkpoint = executor.checkpoint().unwrap().unwrap();
        assert_eq!(
            (checkpoint.last_completed, checkpoint.attempt),
            (Some(Step::FetchInstaller), 1),
            "stopped during run-installer"
        );
        assert_eq!(checkpoint.staged_tokens, None);
        let writes = host.mutations();

        // It starts again and resumes; the coordinator pushes the same plan at the reconnect,
        // under a new revision, while the resumed run is in run-installer.
        let mut handle = handle_on(dir.path(), host.clone());
        let mut events = Vec::new();
        loop {
            let event = next(&mut handle).await;
            let at_installer = matches!(&event, K3sEvent::Phase(p)
                if p.step == Step::RunInstaller && p.outcome == StepOutcome::Started);
            events.push(event);
            if at_installer {
                break;
            }
        }
        assert!(handle.submit(submission(5, "10.0.0.1")));
        loop {
            let event = next(&mut handle).await;
            let last = matches!(&event, K3sEvent::Applied { revision: 5, .. });
            events.push(event);
            if last {
                break;
            }
        }
        assert_eq!(acks(&events), [(4, true), (5, true)], "{events:?}");
        let steps: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                K3sEvent::Phase(p) if p.outcome == StepOutcome::Succeeded => {
                    Some((p.revision, p.step, p.attempt))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            steps,
            [(4, Step::RunInstaller, 2), (4, Step::Start, 1)],
            "the remaining steps ran once, and revision 5 had nothing left to do"
        );
        let mutations = host.mutations();
        let new = &mutations[writes.len()..];
        assert_eq!(
            new.iter()
                .filter(|m| m.starts_with("run sh install.sh"))
                .count(),
            1,
            "{new:?}"
        );
        assert!(!new.iter().any(|m| m.starts_with("write ")), "{new:?}");
        let checkpoint = executor.checkpoint().unwrap().unwrap();
        assert!(checkpoint.is_complete());
        assert_eq!(checkpoint.plan.revision, 5);
        handle.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_resumed_plan_is_superseded_by_a_different_one() {
        let dir = tempfile::tempdir().unwrap();
        let host = FakeHost::default();
        let mut handle = handle_on(dir.path(), host.clone());
        handle.submit(submission(4, "10.0.0.1"));
        while !matches!(next(&mut handle).await, K3sEvent::Phase(p)
            if p.step == Step::RunInstaller && p.outcome == StepOutcome::Started)
        {}
        handle.shutdown().await;

        let mut handle = handle_on(dir.path(), host);
        handle.submit(submission(5, "10.0.0.2"));
        let mut events = Vec::new();
        while !matches!(events.last(), Some(K3sEvent::Applied { revision: 5, .. })) {
            events.push(next(&mut handle).await);
        }
        assert_eq!(acks(&events), [(4, false), (5, true)], "{events:?}");
        handle.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_copies_of_the_same_plan_are_acknowledged_with_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let mut handle = handle(dir.path());
        for (revision, ip) in [
            (4, "10.0.0.1"),
            (5, "10.0.0.2"),
            (6, "10.0.0.1"),
            (7, "10.0.0.2"),
        ] {
            handle.submit(submission(revision, ip));
        }
        let mut events = Vec::new();
        while !matches!(events.last(), Some(K3sEvent::Applied { revision: 7, .. })) {
            events.push(next(&mut handle).await);
        }
        // 4 may have started before the others arrived; 6 is superseded by 7, and 5, the same
        // plan as 7, is acknowledged with it.
        let acks = acks(&events);
        assert_eq!(
            acks[acks.len() - 3..],
            [(6, false), (5, true), (7, true)],
            "{events:?}"
        );
        assert!(
            acks.iter()
                .filter(|(_, ok)| !ok)
                .all(|(r, _)| [4, 6].contains(r))
        );
        let adopted = events.iter().find_map(|e| match e {
            K3sEvent::Applied {
                revision: 5,
                message,
                ..
            } => Some(message.clone()),
            _ => None,
        });
        assert!(
            adopted
                .as_deref()
                .is_some_and(|m| m.starts_with("same plan as revision 7: ")),
            "{adopted:?}"
        );
        handle.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_assignments_collapse_into_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let mut handle = handle(dir.path());
        for (revision, ip) in [(4, "10.0.0.1"), (5, "10.0.0.2"), (6, "10.0.0.3")] {
            handle.submit(submission(revision, ip));
        }
        let mut acks = Vec::new();
        while acks.last().is_none_or(|(r, _)| *r != 6) {
            let (_, (revision, ok, _)) = until_applied(&mut handle).await;
            acks.push((revision, ok));
        }
        assert_eq!(acks.last(), Some(&(6, true)));
        assert!(acks[..acks.len() - 1].iter().all(|(_, ok)| !ok), "{acks:?}");
        handle.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_active_server_publishes_its_view_and_refreshes_it_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let host = FakeHost::default();
        let mut handle = handle_on(dir.path(), host.clone());
        let (_, (_, ok, message)) = {
            handle.submit(submission(4, "10.0.0.1"));
            until_applied(&mut handle).await
        };
        assert!(ok, "{message}");
        let mut status = handle.watch_status();
        let view = status
            .wait_for(|s| s.server_view.is_some())
            .await
            .unwrap()
            .server_view
            .clone()
            .unwrap();
        assert!(view.api_ready, "{view:?}");
        assert_eq!(
            view.cluster_ca_sha256.as_deref(),
            Some(crate::k3s::fake::FAKE_SERVER_CA_SHA256)
        );
        assert!(view.nodes.is_empty());

        // A Node appears: the next refresh the link asks for shows it.
        host.set_nodes_json(
            &json!({"items": [{"metadata": {"name": "cp-1"}, "status": {"conditions": [
                {"type": "Ready", "status": "False", "reason": "KubeletNotReady"}]}}]})
            .to_string(),
        );
        handle.refresh();
        let status = status
            .wait_for(|s| s.server_view.as_ref().is_some_and(|v| !v.nodes.is_empty()))
            .await
            .unwrap()
            .clone();
        assert!(
            status.detail().contains("api ready, 0/1 nodes Ready"),
            "{}",
            status.detail()
        );

        // The API server hangs: not ready, and why, within the kubectl timeout.
        host.set_kubectl_hangs(true);
        handle.refresh();
        let status = handle
            .watch_status()
            .wait_for(|s| s.server_view.as_ref().is_some_and(|v| !v.api_ready))
            .await
            .unwrap()
            .clone();
        assert!(status.healthy(), "the unit is still active");
        assert!(
            status.detail().contains("api not ready") && status.detail().contains("did not answer"),
            "{}",
            status.detail()
        );

        // The unit stops: no view.
        host.set_unit_state("k3s", "failed");
        handle.refresh();
        handle
            .watch_status()
            .wait_for(|s| s.server_view.is_none())
            .await
            .unwrap();
        handle.shutdown().await;
    }

    async fn next(handle: &mut K3sHandle) -> K3sEvent {
        tokio::time::timeout(Duration::from_secs(600), handle.next_event())
            .await
            .expect("an event")
    }

    #[tokio::test(start_paused = true)]
    async fn operations_are_acknowledged_and_an_uninstall_leaves_no_role() {
        let dir = tempfile::tempdir().unwrap();
        let host = FakeHost::default();
        let mut handle = handle_on(dir.path(), host.clone());
        handle.submit(submission(4, "10.0.0.1"));
        let (_, (_, ok, message)) = until_applied(&mut handle).await;
        assert!(ok, "{message}");
        host.put(crate::k3s::view::KUBECONFIG_PATH, b"admin kubeconfig\n");
        host.add_cluster_node("wk-1");

        // The kubeconfig comes just before its acknowledgement.
        assert!(handle.operate(5, Operation::FetchKubeconfig));
        match next(&mut handle).await {
            K3sEvent::Kubeconfig { revision, content } => {
                assert_eq!((revision, content.expose()), (5, "admin kubeconfig\n"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            next(&mut handle).await,
            K3sEvent::Applied {
                revision: 5,
                ok: true,
                ..
            }
        ));

        let drain = crate::k3s::KubectlCommand::new(
            crate::k3s::KubectlAction::Drain,
            "wk-1",
            Duration::ZERO,
        )
        .unwrap();
        handle.operate(6, Operation::Kubectl(drain));
        let event = next(&mut handle).await;
        assert!(
            matches!(
                &event,
                K3sEvent::Applied {
                    revision: 6,
                    ok: true,
                    ..
                }
            ),
            "{event:?}"
        );
        assert_eq!(host.cluster_nodes().get("wk-1"), Some(&true));

        handle.operate(7, Operation::Uninstall);
        let event = next(&mut handle).await;
        assert!(
            matches!(
                &event,
                K3sEvent::Applied {
                    revision: 7,
                    ok: true,
                    ..
                }
            ),
            "{event:?}"
        );
        let status = handle.status();
        assert_eq!(status.role, None);
        assert_eq!(status.detail(), "agent running; no role assigned");

        // Without a role: no kubeconfig, and a clear reason.
        handle.operate(8, Operation::FetchKubeconfig);
        match next(&mut handle).await {
            K3sEvent::Applied {
                revision,
                ok,
                message,
            } => {
                assert_eq!((revision, ok), (8, false));
                assert_eq!(message, "this node has no K3s role");
            }
            other => panic!("{other:?}"),
        }
        handle.shutdown().await;
    }

    #[test]
    fn waiting_for_cni_lasts_until_every_node_is_ready() {
        let mut status = K3sStatus {
            role: Some(Role::Server),
            revision: 2,
            version: "v1.31.4+k3s1".into(),
            unit_state: Some("active".into()),
            waits_for_cni: true,
            server_view: Some(ServerView {
                api_ready: true,
                cluster_ca_sha256: Some("ab".repeat(32)),
                nodes: vec![crate::k3s::NodeReady {
                    name: "cp-1".into(),
                    ready: false,
                    reason: "KubeletNotReady".into(),
                }],
                problem: None,
            }),
            ..K3sStatus::default()
        };
        assert!(status.healthy());
        assert!(
            status.detail().contains("waiting for CNI"),
            "{}",
            status.detail()
        );
        if let Some(view) = status.server_view.as_mut() {
            view.nodes[0].ready = true;
        }
        assert!(
            !status.detail().contains("waiting for CNI"),
            "{}",
            status.detail()
        );
    }
}
