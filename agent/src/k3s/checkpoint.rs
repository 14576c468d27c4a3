//! `k3s-checkpoint.json` in the agent's state directory: which plan is being applied, which
//! steps it needs, the last one completed, and what is installed.
//!
//! Rules:
//! 1. It is rewritten atomically (0600) when a step starts (to count the attempt) and after
//!    each step completes, so a crash or reboot resumes at the first step not completed and
//!    never runs a completed step again. A new plan's checkpoint is first written when its
//!    preflight passes, so a refused plan leaves the previous one in place.
//! 2. It holds no token, except while the plan still has to write its token files: then the
//!    tokens are staged here (0600, in the 0700 state directory) so a crash before
//!    `write-config` can still finish. They are dropped as soon as `write-config` completes.
//! 3. `installed` changes only when `run-installer` completes, and `restart_pending` is set by
//!    `write-config` and `run-installer` and cleared by `start`. A later plan is compared with
//!    these, not with what an interrupted plan meant to do.
//! 4. The plan it holds has a [`Checkpoint::fingerprint`], computed from `plan` and
//!    `config_hash` (no token needed), equal to [`InstallPlan::fingerprint`] of the same plan
//!    under any revision. So a plan resumed after a restart is recognised when the
//!    coordinator pushes it again under a new revision: the same work, not a newer plan.
//!
//! [`InstallPlan::fingerprint`]: crate::k3s::plan::InstallPlan::fingerprint

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    identity::write_private,
    k3s::{
        install::Step,
        plan::{self, PlanSpec, PlanTokens, Role},
    },
};

/// The checkpoint file name in the state directory.
pub const CHECKPOINT_FILE: &str = "k3s-checkpoint.json";
/// The checkpoint format.
const SCHEMA: u32 = 1;

/// What went wrong with the checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("failed to read the K3s checkpoint {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to write the K3s checkpoint {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the K3s checkpoint {path} is unreadable ({detail}); delete it to start over")]
    Corrupt { path: PathBuf, detail: String },
}

/// How the `start` step brings the unit up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartAction {
    /// `systemctl start --no-block`: the unit is not running.
    Start,
    /// `systemctl restart --no-block`: the unit runs with an old binary or config.
    Restart,
}

/// What a completed `run-installer` left on the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Installed {
    pub role: Role,
    pub install_revision: u64,
    pub version: Option<String>,
    pub channel: String,
}

/// Progress of the newest plan, and what is installed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    schema: u32,
    /// The plan being (or last) applied, tokens excluded: revision, install_revision,
    /// version, role, installer and settings.
    pub plan: PlanSpec,
    /// Hash of the plan's config.yaml and token files (see `plan::files_hash`).
    pub config_hash: String,
    /// The steps this plan needs, in order.
    pub steps: Vec<Step>,
    /// The last step completed, `None` before the first.
    pub last_completed: Option<Step>,
    /// How `start` brings the unit up.
    pub start: StartAction,
    /// Attempts so far at the next step.
    pub attempt: u32,
    /// The last failure, redacted.
    pub last_error: Option<String>,
    pub installed: Option<Installed>,
    pub restart_pending: bool,
    /// The tokens, only until `write-config` completes (rule 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged_tokens: Option<PlanTokens>,
}

impl Checkpoint {
    /// A new plan about to run `steps`, carrying over what is installed.
    pub fn new(
        plan: PlanSpec,
        config_hash: String,
        steps: Vec<Step>,
        start: StartAction,
        previous: Option<&Checkpoint>,
        staged_tokens: Option<PlanTokens>,
    ) -> Self {
        Self {
            schema: SCHEMA,
            plan,
            config_hash,
            steps,
            last_completed: None,
            start,
            attempt: 0,
            last_error: None,
            installed: previous.and_then(|p| p.installed.clone()),
            restart_pending: previous.is_some_and(|p| p.restart_pending),
            staged_tokens,
        }
    }

    /// The plan's fingerprint (rule 4).
    pub fn fingerprint(&self) -> String {
        plan::fingerprint(&self.plan, &self.config_hash)
    }

    /// The steps not completed yet.
    pub fn remaining(&self) -> &[Step] {
        let done = match self.last_completed {
            Some(last) => self
                .steps
                .iter()
                .position(|s| *s == last)
                .map_or(0, |i| i + 1),
            None => 0,
        };
        &self.steps[done..]
    }

    /// Whether every step completed.
    pub fn is_complete(&self) -> bool {
        self.remaining().is_empty()
    }

    /// Records a completed step: the next one starts at attempt 1.
    pub fn complete(&mut self, step: Step) {
        self.last_completed = Some(step);
        self.attempt = 0;
        self.last_error = None;
    }
}

/// Reads and writes the checkpoint file.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    path: PathBuf,
}

impl CheckpointStore {
    /// The checkpoint in `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(CHECKPOINT_FILE),
        }
    }

    /// Where the checkpoint lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The checkpoint, `None` when no plan was ever applied.
    pub fn load(&self) -> Result<Option<Checkpoint>, CheckpointError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CheckpointError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let checkpoint: Checkpoint =
            serde_json::from_str(&text).map_err(|e| CheckpointError::Corrupt {
                path: self.path.clone(),
                // A decode error may quote a staged token: keep only its position.
                detail: format!("error at line {} column {}", e.line(), e.column()),
            })?;
        if checkpoint.schema != SCHEMA {
            return Err(CheckpointError::Corrupt {
                path: self.path.clone(),
                detail: format!("schema {} is not {SCHEMA}", checkpoint.schema),
            });
        }
        Ok(Some(checkpoint))
    }

    /// Deletes the checkpoint; a missing one is not an error.
    pub fn remove(&self) -> Result<(), CheckpointError> {
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CheckpointError::Write {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Replaces the checkpoint atomically (0600).
    pub fn save(&self, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
        let write_error = |source| CheckpointError::Write {
            path: self.path.clone(),
            source,
        };
        let text = serde_json::to_string_pretty(checkpoint)
            .map_err(|e| write_error(io::Error::other(e)))?;
        write_private(&self.path, text.as_bytes()).map_err(write_error)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::k3s::plan::InstallPlan;

    fn plan() -> InstallPlan {
        InstallPlan::parse(
            r#"{"schema":1,"revision":3,"install_revision":1,"role":"server","token":"tok-en-value-1"}"#,
        )
        .unwrap()
    }

    #[test]
    fn round_trips_0600_and_tracks_remaining_steps() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        assert!(store.load().unwrap().is_none());
        let plan = plan();
        let mut checkpoint = Checkpoint::new(
            plan.spec.clone(),
            plan.config_hash(),
            vec![Step::Preflight, Step::WriteConfig, Step::Start],
            StartAction::Start,
            None,
            Some(plan.tokens.clone()),
        );
        assert_eq!(checkpoint.remaining().len(), 3);
        checkpoint.complete(Step::Preflight);
        assert_eq!(checkpoint.remaining(), [Step::WriteConfig, Step::Start]);
        store.save(&checkpoint).unwrap();
        assert_eq!(store.load().unwrap().unwrap(), checkpoint);
        let mode = fs::metadata(store.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        checkpoint.complete(Step::Start);
        assert!(checkpoint.is_complete());
    }

    #[test]
    fn the_fingerprint_is_the_plans_under_any_revision_and_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        let plan = plan();
        let checkpoint = Checkpoint::new(
            plan.spec.clone(),
            plan.config_hash(),
            vec![Step::Preflight, Step::Start],
            StartAction::Start,
            None,
            None,
        );
        store.save(&checkpoint).unwrap();
        let loaded = store.load().unwrap().unwrap();
        let pushed_again = InstallPlan::for_directive(
            9,
            "server",
            r#"{"schema":1,"revision":3,"install_revision":1,"role":"server","token":"tok-en-value-1"}"#,
        )
        .unwrap();
        assert_eq!(loaded.fingerprint(), pushed_again.fingerprint());
        let new_token = InstallPlan::parse(
            r#"{"schema":1,"revision":3,"install_revision":1,"role":"server","token":"tok-en-value-2"}"#,
        )
        .unwrap();
        assert_ne!(loaded.fingerprint(), new_token.fingerprint());
        // Derived, never written: the file holds neither the token nor the fingerprint.
        let text = fs::read_to_string(store.path()).unwrap();
        assert!(
            !text.contains("tok-en-value-1") && !text.contains(&loaded.fingerprint()),
            "{text}"
        );
    }

    #[test]
    fn a_corrupt_checkpoint_is_named_without_quoting_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        fs::write(
            store.path(),
            r#"{"staged_tokens": {"token": "tok-en-value-1"}, oops"#,
        )
        .unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(
            err.contains(CHECKPOINT_FILE) && !err.contains("tok-en-value-1"),
            "{err}"
        );
    }
}
