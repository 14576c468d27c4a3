//! Injected failures: failing requests, failing tasks and the `nextid` race.
//!
//! A [`Faults`] handle changes them while the simulator runs:
//!
//! ```no_run
//! # async fn demo(sim: &pve_sim::Simulator) {
//! use pve_sim::{FaultRule, MethodFilter, TaskType};
//!
//! // The next two calls under /nodes/pve/qemu fail like a broken pveproxy → pvedaemon hop.
//! sim.faults().fail_requests(
//!     FaultRule::new(MethodFilter::Any, "/nodes/pve/qemu", 596, "tls handshake failed").times(2),
//! );
//! // The next clone ends `TASK ERROR: clone failed: out of space`.
//! sim.faults().fail_next_task(TaskType::Clone, "out of space");
//! # }
//! ```

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use crate::config::TaskType;
use crate::server::Shared;

/// Which request methods a [`FaultRule`] matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodFilter {
    /// Every method.
    Any,
    /// POST, PUT and DELETE.
    Mutating,
    /// GET only.
    Get,
    /// POST only.
    Post,
    /// PUT only.
    Put,
    /// DELETE only.
    Delete,
}

impl MethodFilter {
    pub(crate) fn matches(self, method: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Mutating => matches!(method, "POST" | "PUT" | "DELETE"),
            Self::Get => method == "GET",
            Self::Post => method == "POST",
            Self::Put => method == "PUT",
            Self::Delete => method == "DELETE",
        }
    }
}

/// "Fail the next `count` requests matching `method` and `path_prefix` with `status` and
/// `message`."
///
/// The prefix is matched against the decoded path below `/api2/json`, e.g.
/// `/nodes/pve/qemu/123/config`. The rule fires after authentication, before validation.
/// Statuses from 590 up answer like pveproxy's failed internal hop (reason phrase only, empty
/// body); the others like a handler `die` (JSON body with `message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    /// Methods it applies to.
    pub method: MethodFilter,
    /// Path prefix below `/api2/json`.
    pub path_prefix: String,
    /// HTTP status to answer with.
    pub status: u16,
    /// The error message (first line becomes the reason phrase).
    pub message: String,
    /// How many matching requests still fail.
    pub count: u32,
    /// Wait this long before answering, like a lock that times out.
    pub delay: Duration,
}

impl FaultRule {
    /// Fails the next matching request once.
    pub fn new(method: MethodFilter, path_prefix: &str, status: u16, message: &str) -> Self {
        Self {
            method,
            path_prefix: path_prefix.to_owned(),
            status,
            message: message.to_owned(),
            count: 1,
            delay: Duration::ZERO,
        }
    }

    /// Fails the next `count` matching requests.
    pub fn times(mut self, count: u32) -> Self {
        self.count = count;
        self
    }

    /// Waits `delay` before answering.
    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// The VM config lock timeout on every write to VM `vmid`:
    /// 500 `can't lock file '/var/lock/qemu-server/lock-N.conf' - got timeout`.
    pub fn config_lock_timeout(node: &str, vmid: u32) -> Self {
        Self::new(
            MethodFilter::Mutating,
            &format!("/nodes/{node}/qemu/{vmid}/"),
            500,
            &format!("can't lock file '/var/lock/qemu-server/lock-{vmid}.conf' - got timeout"),
        )
    }

    /// A failed proxy hop: 595 `Connection refused` on any call under `path_prefix`.
    pub fn connection_refused(path_prefix: &str) -> Self {
        Self::new(MethodFilter::Any, path_prefix, 595, "Connection refused")
    }

    pub(crate) fn matches(&self, method: &str, path: &str) -> bool {
        self.count > 0 && self.method.matches(method) && path.starts_with(&self.path_prefix)
    }
}

/// The fault configuration inside the simulator's state.
#[derive(Debug, Default)]
pub(crate) struct FaultState {
    rules: Vec<FaultRule>,
    task_failures: VecDeque<(TaskType, String)>,
    task_warnings: VecDeque<(TaskType, u32)>,
    pub(crate) nextid_race: bool,
    pub(crate) last_nextid: Option<u32>,
}

impl FaultState {
    /// Consumes one use of the first rule matching the request.
    pub(crate) fn take_request_fault(&mut self, method: &str, path: &str) -> Option<FaultRule> {
        let rule = self.rules.iter_mut().find(|r| r.matches(method, path))?;
        rule.count -= 1;
        let fired = rule.clone();
        self.rules.retain(|r| r.count > 0);
        Some(fired)
    }

    pub(crate) fn take_task_failure(&mut self, kind: TaskType) -> Option<String> {
        let pos = self.task_failures.iter().position(|(k, _)| *k == kind)?;
        self.task_failures.remove(pos).map(|(_, msg)| msg)
    }

    pub(crate) fn take_task_warnings(&mut self, kind: TaskType) -> Option<u32> {
        let pos = self.task_warnings.iter().position(|(k, _)| *k == kind)?;
        self.task_warnings.remove(pos).map(|(_, n)| n)
    }
}

/// Changes the faults of a running simulator. Cheap to clone.
#[derive(Clone)]
pub struct Faults {
    pub(crate) shared: Arc<Shared>,
}

impl Faults {
    /// Adds a request fault; rules are tried in the order they were added.
    pub fn fail_requests(&self, rule: FaultRule) {
        self.shared.with_state(|s| s.faults.rules.push(rule));
    }

    /// The next task of `kind` fails with `message` (for clones the task error reads
    /// `clone failed: <message>`, as PVE wraps it). Queued failures apply in order.
    pub fn fail_next_task(&self, kind: TaskType, message: &str) {
        let message = message.to_owned();
        self.shared
            .with_state(|s| s.faults.task_failures.push_back((kind, message)));
    }

    /// The next successful task of `kind` logs `count` warnings and ends `WARNINGS: count`.
    pub fn warn_next_task(&self, kind: TaskType, count: u32) {
        self.shared
            .with_state(|s| s.faults.task_warnings.push_back((kind, count)));
    }

    /// While on, `GET /cluster/nextid` without `vmid` keeps returning the id it returned last,
    /// even once a clone has taken it, as concurrent callers of a real cluster see.
    pub fn set_nextid_race(&self, on: bool) {
        self.shared.with_state(|s| {
            s.faults.nextid_race = on;
            if !on {
                s.faults.last_nextid = None;
            }
        });
    }

    /// Changes how many clones may allocate on one storage at once.
    pub fn set_clone_limit(&self, per_storage: Option<usize>) {
        self.shared
            .with_state(|s| s.knobs.clone_limit = per_storage);
    }

    /// Removes every request rule and queued task outcome, and ends the nextid race.
    pub fn clear(&self) {
        self.shared.with_state(|s| {
            s.faults = FaultState::default();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_fire_count_times_then_vanish() {
        let mut state = FaultState::default();
        state
            .rules
            .push(FaultRule::new(MethodFilter::Post, "/nodes/pve/qemu", 595, "x").times(2));
        assert!(state.take_request_fault("GET", "/nodes/pve/qemu").is_none());
        assert!(
            state
                .take_request_fault("POST", "/nodes/pve/qemu/9000/clone")
                .is_some()
        );
        assert!(
            state
                .take_request_fault("POST", "/nodes/pve/qemu/9000/clone")
                .is_some()
        );
        assert!(
            state
                .take_request_fault("POST", "/nodes/pve/qemu/9000/clone")
                .is_none()
        );
    }

    #[test]
    fn task_failures_are_per_type_and_ordered() {
        let mut state = FaultState::default();
        state
            .task_failures
            .push_back((TaskType::Clone, "first".into()));
        state
            .task_failures
            .push_back((TaskType::Start, "boot".into()));
        state
            .task_failures
            .push_back((TaskType::Clone, "second".into()));
        assert_eq!(
            state.take_task_failure(TaskType::Clone).as_deref(),
            Some("first")
        );
        assert_eq!(
            state.take_task_failure(TaskType::Clone).as_deref(),
            Some("second")
        );
        assert_eq!(state.take_task_failure(TaskType::Clone), None);
        assert_eq!(
            state.take_task_failure(TaskType::Start).as_deref(),
            Some("boot")
        );
    }
}
