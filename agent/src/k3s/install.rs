//! The install executor: turns an [`InstallPlan`] into a running K3s unit, one checkpointed
//! step at a time.
//!
//! Steps (phase `install`):
//! 1. `preflight`: refuses a role change on an installed node; reports (does not refuse) a
//!    `/etc/rancher/node` left over from a template on a node never installed by this agent.
//! 2. `write-config`: the token files, then `/etc/rancher/k3s/config.yaml` naming them, all
//!    0600, written atomically.
//! 3. `fetch-installer`: install.sh from the plan's URL or node file, stored as
//!    `<state>/install.sh` (0700).
//! 4. `run-installer`: `sh install.sh` with only `PATH`, `INSTALL_K3S_SKIP_START=true`,
//!    `INSTALL_K3S_EXEC=<role>`, `INSTALL_K3S_VERSION` or `INSTALL_K3S_CHANNEL`, and, when the
//!    root is not `/`, `INSTALL_K3S_BIN_DIR` and `INSTALL_K3S_SYSTEMD_DIR` under it.
//! 5. `start`: after an install `daemon-reload`; then `start --no-block` (unit not running) or
//!    `restart --no-block` (running with an old binary or config), and `is-active` polled
//!    until the deadline; on timeout the journal names a cause when it can.
//!
//! Rules (which steps a plan needs):
//! 1. A checkpoint of the same plan (the same [`InstallPlan::fingerprint`], so also the same
//!    plan pushed again under a newer revision) that is not complete resumes at its first
//!    step not completed, under the newer revision; completed steps never run again.
//! 2. Otherwise the plan is compared with the host: `write-config` when the files on disk
//!    differ from the plan's; `fetch-installer` and `run-installer` when nothing is installed or
//!    `install_revision`, `version` (or, without a version, `channel`) or role differ from what
//!    is; `start` when either of those runs, a restart is still pending, or the unit is not
//!    active. So: same plan, unit active, config unchanged → nothing runs; only the config
//!    changed → `write-config` and a restart; `install_revision` or `version` changed →
//!    reinstall and restart.
//! 3. Each step is reported when it starts and when it succeeds or fails, with its attempt
//!    number and (on failure) the error, redacted. The reporter may stop the run before any
//!    step; the next run resumes from the checkpoint.
//! 4. No token reaches argv, the environment, a log line or a report: they go only into the
//!    0600 token files.

use std::{
    fmt,
    fs::DirBuilder,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    time::Duration,
};

use log::{debug, info, warn};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::k3s::{
    checkpoint::{Checkpoint, CheckpointError, CheckpointStore, Installed, StartAction},
    fetch::{self, FetchError},
    host::{CommandOutput, Host, HostCommand, HostError, SystemctlAction, write_atomic},
    plan::{
        AGENT_TOKEN_PATH, InstallPlan, Installer, PlanError, PlanSpec, Redactor, Role,
        SERVER_TOKEN_PATH, files_hash,
    },
};

/// The phase name in `PhaseReport`s.
pub const PHASE: &str = "install";
/// The installer as stored in the state directory.
pub const INSTALLER_FILE: &str = "install.sh";
/// Node identity K3s keeps across reinstalls; from a template it means a cloned node.
pub const NODE_DIR: &str = "/etc/rancher/node";
/// Default deadline for the unit to become active: a first server with embedded etcd takes
/// about a minute on a small VM; an agent waits for its server.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Default bound on install.sh, which downloads a binary of about 70 MB.
pub const DEFAULT_INSTALL_TIMEOUT: Duration = Duration::from_secs(900);
/// Default bound on fetching install.sh (about 40 kB).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// How often `is-active` is asked while waiting.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// install.sh is about 40 kB; anything this large is not it.
const MAX_INSTALLER_BYTES: usize = 1 << 20;
/// Journal lines read to explain a unit that did not come up.
const JOURNAL_LINES: usize = 200;
/// Journal lines quoted in the error.
const JOURNAL_QUOTED: usize = 3;
/// Output lines of a failed command quoted in the error.
const OUTPUT_QUOTED: usize = 5;

/// Known K3s failure lines and what they mean (k3s.md §2 step 4, §7).
const KNOWN_CAUSES: &[(&str, &str)] = &[
    (
        "Node password rejected",
        "the server rejected this node's password: a node of this name existed before (kubectl delete node) or /etc/rancher/node was cloned",
    ),
    (
        "token CA hash does not match",
        "the token's CA hash does not match the cluster CA: wrong token or wrong server",
    ),
    (
        "critical configuration value mismatch",
        "a critical configuration value differs from the other servers",
    ),
    (
        "too many learner members",
        "another server is joining at the same time",
    ),
    (
        "Waiting to retrieve agent configuration; server is not ready",
        "the server is not ready yet",
    ),
];

/// Why applying a plan failed.
#[derive(Debug, thiserror::Error)]
pub enum K3sInstallError {
    #[error("unsupported install plan")]
    Plan(#[from] PlanError),
    #[error(
        "K3s is installed as {installed}; turning the node into a {requested} needs a rebuilt node"
    )]
    RoleChange { installed: Role, requested: Role },
    #[error("checkpoint")]
    Checkpoint(#[from] CheckpointError),
    #[error("host")]
    Host(#[from] HostError),
    #[error(
        "the checkpoint for revision {revision} must write the token files but holds no tokens; the coordinator has to send the plan again"
    )]
    TokensMissing { revision: u64 },
    #[error("failed to store the installer at {path}")]
    StoreInstaller {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to download the installer")]
    Fetch(#[from] FetchError),
    #[error("the installer node file {path} does not exist")]
    InstallerMissing { path: PathBuf },
    #[error("the installer from {from} is larger than {MAX_INSTALLER_BYTES} bytes")]
    InstallerTooLarge { from: String },
    #[error("install.sh failed with {status}: {output}")]
    Installer { status: String, output: String },
    #[error("systemctl {action} failed with {status}: {output}")]
    Systemctl {
        action: String,
        status: String,
        output: String,
    },
    #[error("{unit} did not become active within {waited:?} (last state {state}){cause}")]
    NotActive {
        unit: String,
        waited: Duration,
        state: String,
        /// `; <known cause>; journal: <last lines>`, redacted; empty without a journal.
        cause: String,
    },
    #[error("stopped before {next}: a newer directive is waiting")]
    Interrupted { next: Step },
}

impl K3sInstallError {
    /// Whether trying again later may succeed without a new plan.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Installer { .. }
                | Self::Systemctl { .. }
                | Self::NotActive { .. }
                | Self::Host(HostError::Timeout { .. })
        ) || matches!(self, Self::Fetch(e) if e.is_transient())
    }
}

/// One step of the install phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Preflight,
    WriteConfig,
    FetchInstaller,
    RunInstaller,
    Start,
}

impl Step {
    /// The step name in `PhaseReport`s and the checkpoint.
    pub fn name(self) -> &'static str {
        match self {
            Self::Preflight => "preflight",
            Self::WriteConfig => "write-config",
            Self::FetchInstaller => "fetch-installer",
            Self::RunInstaller => "run-installer",
            Self::Start => "start",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a step went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    Started,
    Succeeded,
    Failed,
}

/// A step's progress, for a `PhaseReport` (phase [`PHASE`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhaseEvent {
    /// The directive revision of the plan.
    pub revision: u64,
    pub step: Step,
    pub outcome: StepOutcome,
    /// 1 for the first attempt at this step for this plan.
    pub attempt: u32,
    /// Detail; for a failure, the error chain. Always redacted.
    pub message: String,
}

/// Receives progress, and may stop a run between steps.
pub trait Reporter: Send {
    /// A step started, succeeded or failed.
    fn report(&mut self, event: PhaseEvent);

    /// Asked before each step; `false` stops the run with
    /// [`K3sInstallError::Interrupted`], leaving the checkpoint to resume from.
    fn proceed(&mut self, _next: Step) -> bool {
        true
    }
}

/// Knobs of the executor.
#[derive(Debug, Clone)]
pub struct ExecutorSettings {
    /// How long `start` waits for the unit to become active.
    pub ready_timeout: Duration,
    /// How often `is-active` is asked meanwhile.
    pub poll_interval: Duration,
    /// Bound on install.sh.
    pub install_timeout: Duration,
    /// Bound on fetching install.sh.
    pub fetch_timeout: Duration,
    /// PEM roots trusted for an https installer URL; without them https fails.
    pub ca_bundle: Option<PathBuf>,
}

impl Default for ExecutorSettings {
    fn default() -> Self {
        Self {
            ready_timeout: DEFAULT_READY_TIMEOUT,
            poll_interval: DEFAULT_POLL_INTERVAL,
            install_timeout: DEFAULT_INSTALL_TIMEOUT,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
            ca_bundle: None,
        }
    }
}

/// What applying a plan did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub revision: u64,
    pub role: Role,
    /// The steps run now, in order; empty when nothing had to change.
    pub ran: Vec<Step>,
}

impl fmt::Display for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "k3s {} at revision {}: ", self.role, self.revision)?;
        if self.ran.is_empty() {
            return f.write_str("already in place");
        }
        let names: Vec<&str> = self.ran.iter().map(|s| s.name()).collect();
        write!(f, "ran {}", names.join(", "))
    }
}

/// Applies install plans on a [`Host`], checkpointing in the agent's state directory.
#[derive(Debug)]
pub struct Executor<H> {
    host: H,
    state_dir: PathBuf,
    store: CheckpointStore,
    settings: ExecutorSettings,
}

impl<H: Host> Executor<H> {
    /// An executor for `host` keeping its checkpoint and installer in `state_dir`.
    pub fn new(host: H, state_dir: PathBuf, settings: ExecutorSettings) -> Self {
        Self {
            host,
            store: CheckpointStore::new(&state_dir),
            state_dir,
            settings,
        }
    }

    /// The host.
    pub fn host(&self) -> &H {
        &self.host
    }

    /// The checkpoint as stored.
    pub fn checkpoint(&self) -> Result<Option<Checkpoint>, CheckpointError> {
        self.store.load()
    }

    /// Forgets every plan: the next one is a first install.
    pub fn forget_checkpoint(&self) -> Result<(), CheckpointError> {
        self.store.remove()
    }

    /// The unit's state as `systemctl is-active` prints it (`active`, `activating`, …).
    pub async fn unit_state(&self, role: Role) -> Result<String, HostError> {
        let output = self
            .host
            .systemctl(SystemctlAction::IsActive, role.unit())
            .await?;
        Ok(output
            .stdout
            .lines()
            .next()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .unwrap_or("unknown")
            .to_owned())
    }

    /// Brings the host to `plan` (rules 1 and 2 pick the steps).
    pub async fn apply(
        &self,
        plan: &InstallPlan,
        reporter: &mut dyn Reporter,
    ) -> Result<Applied, K3sInstallError> {
        let redactor = plan.tokens.redactor();
        let previous = self.store.load()?;
        let config_hash = plan.config_hash();
        if let Some(checkpoint) = previous
            .as_ref()
            .filter(|c| !c.is_complete() && c.fingerprint() == plan.fingerprint())
        {
            // Invariant: an incomplete checkpoint has a remaining step.
            info!(
                "resuming revision {} at {} (as revision {})",
                checkpoint.plan.revision,
                checkpoint.remaining()[0],
                plan.spec.revision
            );
            // The same plan, maybe pushed again under a newer revision: it goes on under that.
            let mut checkpoint = checkpoint.clone();
            checkpoint.plan.revision = plan.spec.revision;
            return self
                .run_steps(checkpoint, Some(plan), reporter, &redactor)
                .await;
        }

        let spec = &plan.spec;
        let installed = previous.as_ref().and_then(|c| c.installed.as_ref());
        let restart_pending = previous.as_ref().is_some_and(|c| c.restart_pending);
        let config_changed = self.disk_hash(plan)? != config_hash;
        let needs_install = installed.is_none_or(|i| {
            i.role != spec.role
                || i.install_revision != spec.install_revision
                || i.version != spec.version
                || (spec.version.is_none() && i.channel != spec.channel)
        });
        let unit_state = self.unit_state(spec.role).await?;
        let running = matches!(unit_state.as_str(), "active" | "activating" | "reloading");
        let mut steps = Vec::new();
        if config_changed {
            steps.push(Step::WriteConfig);
        }
        if needs_install {
            steps.extend([Step::FetchInstaller, Step::RunInstaller]);
        }
        if !steps.is_empty() || restart_pending || unit_state != "active" {
            steps.push(Step::Start);
        }
        debug!(
            "revision {}: config changed {config_changed}, install needed {needs_install}, restart pending {restart_pending}, unit {unit_state}",
            spec.revision
        );
        if steps.is_empty() {
            // Nothing to do. Record the plan as complete all the same: later plans compare
            // with it, and an interrupted older plan (and its staged tokens) must not resume.
            if previous
                .as_ref()
                .is_some_and(|c| c.plan != plan.spec || !c.is_complete())
            {
                let done = Checkpoint::new(
                    spec.clone(),
                    config_hash,
                    Vec::new(),
                    StartAction::Start,
                    previous.as_ref(),
                    None,
                );
                self.store.save(&done)?;
            }
            return Ok(Applied {
                revision: spec.revision,
                role: spec.role,
                ran: Vec::new(),
            });
        }
        steps.insert(0, Step::Preflight);
        let start = if running && (config_changed || needs_install || restart_pending) {
            StartAction::Restart
        } else {
            StartAction::Start
        };
        let staged = steps
            .contains(&Step::WriteConfig)
            .then(|| plan.tokens.clone());
        let checkpoint = Checkpoint::new(
            spec.clone(),
            config_hash,
            steps,
            start,
            previous.as_ref(),
            staged,
        );
        self.run_steps(checkpoint, Some(plan), reporter, &redactor)
            .await
    }

    /// Finishes a plan a crash or restart interrupted, from its checkpoint alone. `None` when
    /// there is nothing to resume.
    pub async fn resume(
        &self,
        reporter: &mut dyn Reporter,
    ) -> Result<Option<Applied>, K3sInstallError> {
        let Some(checkpoint) = self.store.load()?.filter(|c| !c.is_complete()) else {
            return Ok(None);
        };
        // Invariant: an incomplete checkpoint has a remaining step.
        info!(
            "resuming revision {} at {} after a restart",
            checkpoint.plan.revision,
            checkpoint.remaining()[0]
        );
        let redactor = match &checkpoint.staged_tokens {
            Some(tokens) => tokens.redactor(),
            None => self.redactor_from_token_files(),
        };
        self.run_steps(checkpoint, None, reporter, &redactor)
            .await
            .map(Some)
    }

    async fn run_steps(
        &self,
        mut checkpoint: Checkpoint,
        plan: Option<&InstallPlan>,
        reporter: &mut dyn Reporter,
        redactor: &Redactor,
    ) -> Result<Applied, K3sInstallError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.state_dir)
            .map_err(|source| CheckpointError::Write {
                path: self.state_dir.clone(),
                source,
            })?;
        let revision = checkpoint.plan.revision;
        let mut ran = Vec::new();
        while let Some(&step) = checkpoint.remaining().first() {
            // A new plan's checkpoint is first saved once its preflight passed, so a refused
            // plan leaves the previous checkpoint (and no staged token) behind.
            let persist = step != Step::Preflight;
            if !reporter.proceed(step) {
                if persist {
                    self.store.save(&checkpoint)?;
                }
                return Err(K3sInstallError::Interrupted { next: step });
            }
            checkpoint.attempt += 1;
            if persist {
                self.store.save(&checkpoint)?;
            }
            let attempt = checkpoint.attempt;
            let event = |outcome, message: String| PhaseEvent {
                revision,
                step,
                outcome,
                attempt,
                message: redactor.redact(&message).into_owned(),
            };
            info!("revision {revision}: {step} (attempt {attempt})");
            reporter.report(event(StepOutcome::Started, String::new()));
            match self.run_step(step, &mut checkpoint, plan).await {
                Ok(message) => {
                    checkpoint.complete(step);
                    if step == Step::WriteConfig {
                        checkpoint.staged_tokens = None;
                    }
                    self.store.save(&checkpoint)?;
                    let event = event(StepOutcome::Succeeded, message);
                    info!("revision {revision}: {step} done: {}", event.message);
                    reporter.report(event);
                    ran.push(step);
                }
                Err(error) => {
                    let event = event(StepOutcome::Failed, crate::chain(&error));
                    warn!("revision {revision}: {step} failed: {}", event.message);
                    checkpoint.last_error = Some(event.message.clone());
                    if persist && let Err(e) = self.store.save(&checkpoint) {
                        warn!("{}", crate::chain(&e));
                    }
                    reporter.report(event);
                    return Err(error);
                }
            }
        }
        Ok(Applied {
            revision,
            role: checkpoint.plan.role,
            ran,
        })
    }

    /// Runs one step; the message says what it did.
    async fn run_step(
        &self,
        step: Step,
        checkpoint: &mut Checkpoint,
        plan: Option<&InstallPlan>,
    ) -> Result<String, K3sInstallError> {
        let spec = checkpoint.plan.clone();
        match step {
            Step::Preflight => self.preflight(&spec, checkpoint),
            Step::WriteConfig => {
                let owned;
                let plan = match (plan, &checkpoint.staged_tokens) {
                    (Some(plan), _) => plan,
                    (None, Some(tokens)) => {
                        owned = InstallPlan {
                            spec: spec.clone(),
                            tokens: tokens.clone(),
                        };
                        &owned
                    }
                    (None, None) => {
                        return Err(K3sInstallError::TokensMissing {
                            revision: spec.revision,
                        });
                    }
                };
                let message = self.write_config(plan)?;
                checkpoint.restart_pending = true;
                Ok(message)
            }
            Step::FetchInstaller => self.fetch_installer(&spec.installer).await,
            Step::RunInstaller => {
                let message = self.run_installer(&spec).await?;
                checkpoint.installed = Some(Installed {
                    role: spec.role,
                    install_revision: spec.install_revision,
                    version: spec.version.clone(),
                    channel: spec.channel.clone(),
                });
                checkpoint.restart_pending = true;
                Ok(message)
            }
            Step::Start => {
                let reload = checkpoint.steps.contains(&Step::RunInstaller);
                let message = self.start(spec.role, checkpoint.start, reload).await?;
                checkpoint.restart_pending = false;
                Ok(message)
            }
        }
    }

    fn preflight(
        &self,
        spec: &PlanSpec,
        checkpoint: &Checkpoint,
    ) -> Result<String, K3sInstallError> {
        let mut message = format!(
            "k3s {} {}; steps: {}",
            spec.role,
            spec.version_text(),
            checkpoint
                .steps
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
        match &checkpoint.installed {
            Some(installed) if installed.role != spec.role => {
                return Err(K3sInstallError::RoleChange {
                    installed: installed.role,
                    requested: spec.role,
                });
            }
            Some(_) => {}
            None => {
                if self.host.exists(Path::new(NODE_DIR))? {
                    let warning = format!(
                        "{NODE_DIR} exists although this agent never installed K3s here: if it came from a template, nodes share a node password and replace or reject each other; delete it before the first start"
                    );
                    warn!("{warning}");
                    message.push_str("; warning: ");
                    message.push_str(&warning);
                }
            }
        }
        Ok(message)
    }

    fn write_config(&self, plan: &InstallPlan) -> Result<String, K3sInstallError> {
        let mut written = Vec::new();
        for (path, contents) in plan.files() {
            match contents {
                Some(bytes) => {
                    self.host.write(path, &bytes, 0o600)?;
                    written.push(path.display().to_string());
                }
                None => self.host.remove(path)?,
            }
        }
        Ok(format!("wrote {} (0600)", written.join(", ")))
    }

    async fn fetch_installer(&self, installer: &Installer) -> Result<String, K3sInstallError> {
        let bytes = match installer {
            Installer::Url(url) => {
                fetch::get(
                    url,
                    self.settings.ca_bundle.as_deref(),
                    self.settings.fetch_timeout,
                    MAX_INSTALLER_BYTES,
                )
                .await?
            }
            Installer::File(path) => self
                .host
                .read(path)?
                .ok_or_else(|| K3sInstallError::InstallerMissing { path: path.clone() })?,
            Installer::Inline(script) => script.as_bytes().to_vec(),
        };
        if bytes.len() > MAX_INSTALLER_BYTES {
            return Err(K3sInstallError::InstallerTooLarge {
                from: installer.to_string(),
            });
        }
        let path = self.state_dir.join(INSTALLER_FILE);
        write_atomic(&path, &bytes, 0o700)
            .map_err(|source| K3sInstallError::StoreInstaller { path, source })?;
        let digest = hex::encode(Sha256::digest(&bytes));
        Ok(format!(
            "{} bytes from {installer}, sha256 {digest}",
            bytes.len()
        ))
    }

    /// The installer's environment: k3s.md §2 step 2, nothing else.
    fn installer_env(&self, spec: &PlanSpec) -> Result<Vec<(String, String)>, K3sInstallError> {
        let mut env = vec![
            ("INSTALL_K3S_SKIP_START".to_owned(), "true".to_owned()),
            ("INSTALL_K3S_EXEC".to_owned(), spec.role.as_str().to_owned()),
        ];
        match &spec.version {
            Some(version) => env.push(("INSTALL_K3S_VERSION".into(), version.clone())),
            None => env.push(("INSTALL_K3S_CHANNEL".into(), spec.channel.clone())),
        }
        if self.host.root() != Path::new("/") {
            for (name, dir) in [
                ("INSTALL_K3S_BIN_DIR", "/usr/local/bin"),
                ("INSTALL_K3S_SYSTEMD_DIR", "/etc/systemd/system"),
            ] {
                let real = self.host.real_path(Path::new(dir))?;
                env.push((name.to_owned(), real.display().to_string()));
            }
        }
        Ok(env)
    }

    async fn run_installer(&self, spec: &PlanSpec) -> Result<String, K3sInstallError> {
        let script = self.state_dir.join(INSTALLER_FILE);
        let command = HostCommand {
            program: "sh".into(),
            args: vec![script.display().to_string()],
            env: self.installer_env(spec)?,
            cwd: Some(self.state_dir.clone()),
            timeout: self.settings.install_timeout,
        };
        let output = self.host.run(&command).await?;
        debug!("install.sh output: {}", output.tail(20));
        if !output.success() {
            return Err(K3sInstallError::Installer {
                status: output.status_text(),
                output: output.tail(OUTPUT_QUOTED),
            });
        }
        Ok(format!(
            "installed k3s {} {}",
            spec.role,
            spec.version_text()
        ))
    }

    async fn systemctl(
        &self,
        action: SystemctlAction,
        unit: &str,
    ) -> Result<CommandOutput, K3sInstallError> {
        let output = self.host.systemctl(action, unit).await?;
        if !output.success() {
            return Err(K3sInstallError::Systemctl {
                action: action.args(unit).join(" "),
                status: output.status_text(),
                output: output.tail(OUTPUT_QUOTED),
            });
        }
        Ok(output)
    }

    async fn start(
        &self,
        role: Role,
        action: StartAction,
        reload: bool,
    ) -> Result<String, K3sInstallError> {
        let unit = role.unit();
        if reload {
            self.systemctl(SystemctlAction::DaemonReload, unit).await?;
        }
        let (verb, done) = match action {
            StartAction::Start => (SystemctlAction::Start, "started"),
            StartAction::Restart => (SystemctlAction::Restart, "restarted"),
        };
        self.systemctl(verb, unit).await?;
        let began = Instant::now();
        let deadline = began + self.settings.ready_timeout;
        loop {
            // Wait before the first look: right after `restart --no-block` the old process may
            // still report `active`.
            tokio::time::sleep_until((Instant::now() + self.settings.poll_interval).min(deadline))
                .await;
            let state = self.unit_state(role).await?;
            if state == "active" {
                return Ok(format!(
                    "{unit} {done}; active after {:.1?}",
                    began.elapsed()
                ));
            }
            if Instant::now() >= deadline {
                return Err(K3sInstallError::NotActive {
                    unit: unit.to_owned(),
                    waited: self.settings.ready_timeout,
                    state,
                    cause: self.journal_cause(unit).await,
                });
            }
        }
    }

    /// `; <known cause>; journal: <last lines>` from the unit's journal, redacted.
    async fn journal_cause(&self, unit: &str) -> String {
        let Some(journal) = self.host.journal_tail(unit, JOURNAL_LINES).await else {
            return String::new();
        };
        let redactor = self.redactor_from_token_files();
        let lines: Vec<&str> = journal.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut out = String::new();
        if let Some((_, meaning)) = KNOWN_CAUSES
            .iter()
            .filter_map(|(needle, meaning)| {
                lines
                    .iter()
                    .rposition(|l| l.contains(needle))
                    .map(|at| (at, meaning))
            })
            .max_by_key(|(at, _)| *at)
        {
            out.push_str("; ");
            out.push_str(meaning);
        }
        if !lines.is_empty() {
            let quoted = lines[lines.len().saturating_sub(JOURNAL_QUOTED)..].join(" | ");
            out.push_str("; journal: ");
            out.push_str(&redactor.redact(&quoted));
        }
        out
    }

    /// Redacts the tokens in the token files, for text produced after they were written.
    fn redactor_from_token_files(&self) -> Redactor {
        token_redactor(&self.host)
    }

    /// The hash of what is on disk now, comparable with [`InstallPlan::config_hash`].
    fn disk_hash(&self, plan: &InstallPlan) -> Result<String, HostError> {
        let mut on_disk = Vec::new();
        for (path, _) in plan.files() {
            on_disk.push((path, self.host.read(path)?));
        }
        Ok(files_hash(
            on_disk
                .iter()
                .map(|(path, contents)| (*path, contents.as_deref())),
        ))
    }
}

/// Redacts the tokens in `host`'s token files, for text produced after they were written.
pub fn token_redactor<H: Host>(host: &H) -> Redactor {
    let secrets = [SERVER_TOKEN_PATH, AGENT_TOKEN_PATH]
        .iter()
        .filter_map(|path| host.read(Path::new(path)).ok().flatten())
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_owned())
        .collect();
    Redactor::new(secrets)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use serde_json::json;

    use super::*;
    use crate::k3s::fake::FakeHost;

    const TOKEN: &str = "unit-test-server-token";
    const AGENT_TOKEN: &str = "K10abcdef::node:unit-test-agent-pw";

    #[derive(Default)]
    struct Recorder {
        events: Vec<PhaseEvent>,
        stop_before: Option<Step>,
    }

    impl Reporter for Recorder {
        fn report(&mut self, event: PhaseEvent) {
            self.events.push(event);
        }
        fn proceed(&mut self, next: Step) -> bool {
            self.stop_before != Some(next)
        }
    }

    impl Recorder {
        fn steps(&self, outcome: StepOutcome) -> Vec<Step> {
            self.events
                .iter()
                .filter(|e| e.outcome == outcome)
                .map(|e| e.step)
                .collect()
        }
    }

    fn plan_json(revision: u64, install_revision: u64, version: &str, node_ip: &str) -> String {
        json!({
            "schema": 1, "revision": revision, "install_revision": install_revision,
            "role": "server", "version": version,
            "installer": {"file": "/opt/k3s/install.sh"},
            "token": TOKEN, "agent_token": AGENT_TOKEN,
            "config": {"cluster-init": true, "node-ip": node_ip, "flannel-backend": "none"}
        })
        .to_string()
    }

    fn plan(revision: u64, install_revision: u64, version: &str, node_ip: &str) -> InstallPlan {
        InstallPlan::parse(&plan_json(revision, install_revision, version, node_ip)).unwrap()
    }

    fn executor(dir: &Path) -> Executor<FakeHost> {
        let host = FakeHost::default();
        host.put("/opt/k3s/install.sh", b"#!/bin/sh\necho fake\n");
        Executor::new(
            host,
            dir.join("state"),
            ExecutorSettings {
                ready_timeout: Duration::from_secs(60),
                poll_interval: Duration::from_secs(1),
                ..ExecutorSettings::default()
            },
        )
    }

    const ALL: [Step; 5] = [
        Step::Preflight,
        Step::WriteConfig,
        Step::FetchInstaller,
        Step::RunInstaller,
        Step::Start,
    ];

    #[tokio::test(start_paused = true)]
    async fn a_first_plan_runs_every_step_and_checkpoints_after_each() {
        let dir = tempfile::tempdir().unwrap();
        let executor = executor(dir.path());
        let mut reporter = Recorder::default();
        let applied = executor
            .apply(&plan(5, 1, "v1.31.4+k3s1", "10.0.0.11"), &mut reporter)
            .await
            .unwrap();
        assert_eq!(applied.ran, ALL);
        assert_eq!(reporter.steps(StepOutcome::Started), ALL);
        assert_eq!(reporter.steps(StepOutcome::Succeeded), ALL);
        assert!(
            reporter
                .events
                .iter()
                .all(|e| e.attempt == 1 && e.revision == 5)
        );
        let host = executor.host();
        assert_eq!(
            host.mutations(),
            [
                "write /etc/rancher/k3s/server-token 600",
                "write /etc/rancher/k3s/agent-token 600",
                "write /etc/rancher/k3s/config.yaml 600",
                "run sh install.sh INSTALL_K3S_SKIP_START=true INSTALL_K3S_EXEC=server INSTALL_K3S_VERSION=v1.31.4+k3s1",
                "systemctl daemon-reload",
                "systemctl start --no-block k3s",
            ]
        );
        let checkpoint = executor.checkpoint().unwrap().unwrap();
        assert!(checkpoint.is_complete());
        assert_eq!(checkpoint.last_completed, Some(Step::Start));
        assert_eq!(
            checkpoint.staged_tokens, None,
            "tokens leave the checkpoint after write-config"
        );
        assert_eq!(
            checkpoint.installed.unwrap().version.as_deref(),
            Some("v1.31.4+k3s1")
        );
        assert!(!checkpoint.restart_pending);
        let stored = fs::read(dir.path().join("state/install.sh")).unwrap();
        assert_eq!(stored, b"#!/bin/sh\necho fake\n");
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_plan_again_runs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let executor = executor(dir.path());
        executor
            .apply(
                &plan(5, 1, "v1.31.4+k3s1", "10.0.0.11"),
                &mut Recorder::default(),
            )
            .await
            .unwrap();
        let before = executor.host().mutations().len();
        let mut reporter = Recorder::default();
        for revision in [5, 6] {
            let applied = executor
                .apply(
                    &plan(revision, 1, "v1.31.4+k3s1", "10.0.0.11"),
                    &mut reporter,
                )
                .await
                .unwrap();
            assert!(applied.ran.is_empty(), "{applied}");
        }
        assert!(reporter.events.is_empty());
        assert_eq!(executor.host().mutations().len(), before);
        assert_eq!(executor.checkpoint().unwrap().unwrap().plan.revision, 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_plan_needing_nothing_retires_an_interrupted_older_plan_and_its_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let executor = executor(dir.path());
        executor
            .apply(
                &plan(5, 1, "v1.31.4+k3s1", "10.0.0.11"),
                &mut Recorder::default(),
            )
            .await
            .unwrap();
        let mut stop = Recorder {
            stop_before: Some(Step::WriteConfig),
            ..Recorder::default()
        };
        executor
            .apply(&plan(6, 1, "v1.31.4+k3s1", "10.0.0.12"), &mut stop)
            .await
            .unwrap_err();
        assert!(
            executor
                .checkpoint()
                .unwrap()
                .unwrap()
                .staged_tokens
                .is_some()
        );
        // The coordinator goes back to what is installed.
        let applied = executor
            .apply(
                &plan(7, 1, "v1.31.4+k3s1", "10.0.0.11"),
                &mut Recorder::default(),
            )
            .await
            .unwrap();
        assert!(applied.ran.is_empty(), "{applied}");
        let checkpoint = executor.checkpoint().unwrap().unwrap();
        assert!(checkpoint.is_complete());
        assert_eq!(checkpoint.plan.revision, 7);
        assert_eq!(checkpoint.staged_tokens, None);
        assert!(
            executor
                .resume(&mut Recorder::default())
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_config_change_rewrites_the_config_and_restarts_only() {
        let dir = tempfile::tempdir().unwrap();
        let executor = executor(dir.path());
        executor
            .apply(
                &plan(5, 1, "v1.31.4+k3s1", "10.0.0.11"),
                &mut Recorder::default(),
            )
            .await
            .unwrap();
        let before = executor.host().mutations().len();
        let applied = executor
            .apply(
                &plan(6, 1, "v1.31.4+k3s1", "10.0.0.12"),
                &mut Recorder::default(),
            )
            .await
            .unwrap();
        assert_eq!(
            applied.ran,
            [Step::Preflight, Step::WriteConfig, Step::Start]
        );
        assert_eq!(
            executor.host().mutations()[before..],
            [
                "write /etc/rancher/k3s/server-token 600",
                "write /etc/rancher/k3s/agent-token 600",
                "write /etc/rancher/k3s/config.yaml 600",
                "systemctl restart --no-block k3s",
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_install_revision_or_version_bump_reinstalls_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let executor = executor(dir.path());
        executor
            .apply(
                &plan(5, 1, "v1.31.4+k3s1", "10.0.0.11"),
                &mut Recorder::default(),
            )
            .await
            .unwrap();
        for (revision, install_revision, version) in
            [(6, 2, "v1.31.4+k3s1"), (7, 2, "v1.32.1+k3s1")]
        {
            let before = executor.host().mutations().len();
            let applied = executor
                .apply(
                    &plan(revision, install_revision, version, "10.0.0.11"),
                    &mut Recorder::default(),
                )
                .await
                .unwrap();
            assert_eq!(
                applied.ran,
                [
                    Step::Preflight,
                    Step::FetchInstaller,
                    Step::RunInstaller,
                    Step::Start
                ]
            );
            let new = &executor.host().mutations()[before..];
            assert!(
                new[0].contains(&format!("INSTALL_K3S_VERSION={version}")),
                "{new:?}"
            );
            assert_eq!(
                new[1..],
                [
                    "systemctl daemon-reload",
                    "systemctl restart --no-block k3s"
                ]
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_stopped_after_write_config_resumes_at_fetch_installer() {
        let dir = tempfile::tempdir().unwrap();
        let executor = executor(dir.path());
        let mut reporter = Recorder {
            stop_before: Some(Step::FetchInstaller),
            ..Recorder::default()
        };
        let err = executor
            .apply(&plan(5, 1, "v1.31.4+k3s1", "10.0.0.11"), &mut reporter)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                K3sInstallError::Interrupted {
                    next: Step::FetchInstaller
                }
            ),
            "{err}"
        );
        let checkpoint = executor.checkpoint().unwrap().unwrap();
        assert_eq!(checkpoint.last_completed, Some(Step::WriteConfig));
        assert_eq!(checkpoint.staged_tokens, None);
        let writes = executor.host().mutations().len();

        // As after a reboot: from the checkpoint alone.
        let mut reporter = Recorder::default();
        let applied = executor.resume(&mut reporter).await.unwrap().unwrap();
        assert_eq!(
            applied.ran,
            [Step::FetchInstaller, Step::RunInstaller, Step::Start]
        );
        assert_eq!(
            executor.host().mutations().len(),
            writes + 3,
            "no file written again"
        );
        assert!(
            executor
                .resume(&mut Recorder::default())
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_crash_before_write_config_resumes_with_the_staged_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let executor = executor(dir.path());
        let mut reporter = Recorder {
            stop_before: Some(Step::WriteConfig),
            ..Recorder::default()
        };
        executor
            .apply(&plan(5, 1, "v1.31.4+k3s1", "10.0.0.11"), &mut reporter)
            .await
            .unwrap_err();
        assert!(
            executor
                .checkpoint()
                .unwrap()
                .unwrap()
                .staged_tokens
                .is_some()
        );
        let applied = executor
            .resume(&mut Recorder::default())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(applied.ran[..2], [Step::WriteConfig, Step::FetchInstaller]);
        let token = executor
            .host()
            .file("/etc/rancher/k3s/server-token")
            .unwrap();
        assert_eq!(token, format!("{TOKEN}\n").into_bytes());
        assert_eq!(executor.checkpoint().unwrap().unwrap().staged_tokens, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_step_counts_attempts_and_a_retry_continues_there() {
        let dir = tempfile::tempdir().unwrap();
        let executor = executor(dir.path());
        executor.host().set_installer_exit(1);
        let plan = plan(5, 1, "v1.31.4+k3s1", "10.0.0.11");
        let mut reporter = Recorder::default();
        let err = executor.apply(&plan, &mut reporter).await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        let failed = reporter.events.last().unwrap();
        assert_eq!(
            (failed.step, failed.outcome, failed.attempt),
            (Step::RunInstaller, StepOutcome::Failed, 1)
        );
        assert!(failed.message.contains("exit code 1"), "{}", failed.message);
        executor.apply(&plan, &mut reporter).await.unwrap_err();
        assert_eq!(reporter.events.last().unwrap().attempt, 2);
        let checkpoint = executor.checkpoint().unwrap().unwrap();
        assert!(checkpoint.last_error.unwrap().contains("exit code 1"));

        executor.host().set_installer_exit(0);
        let mut reporter = Recorder::default();
        let applied = executor.apply(&plan, &mut reporter).await.unwrap();
        assert_eq!(applied.ran, [Step::RunInstaller, Step::Start]);
        assert_eq!(reporter.events[0].attempt, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_plan_under_a_newer_revision_continues_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let executor = executor(dir.path());
        executor.host().set_installer_exit(1);
        executor
            .apply(
                &plan(5, 1, "v1.31.4+k3s1", "10.0.0.11"),
                &mut Recorder::default(),
            )
            .await
            .unwrap_err();
        let writes = executor.host().mutations().len();

        // Pushed again after a reconnect: nothing before run-installer runs again.
        executor.host().set_installer_exit(0);
        let mut reporter = Recorder::default();
        let applied = executor
            .apply(&plan(6, 1, "v1.31.4+k3s1", "10.0.0.11"), &mut reporter)
            .await
            .unwrap();
        assert_eq!(applied.ran, [Step::RunInstaller, Step::Start]);
        assert_eq!(applied.revision, 6);
        assert!(reporter.events.iter().all(|e| e.revision == 6));
        assert_eq!(reporter.events[0].attempt, 2);
        let mutations = executor.host().mutations();
        assert!(
            mutations[writes..].iter().all(|m| !m.starts_with("write ")),
            "{mutations:?}"
        );
        let checkpoint = executor.checkpoint().unwrap().unwrap();
        assert!(checkpoint.is_complete());
        assert_eq!(checkpoint.plan.revision, 6);

        // A different plan is not a continuation: it is compared with the host.
        executor.host().set_installer_exit(1);
        executor
            .apply(
                &plan(7, 2, "v1.31.4+k3s1", "10.0.0.11"),
                &mut Recorder::default(),
            )
            .await
            .unwrap_err();
        executor.host().set_installer_exit(0);
        let applied = executor
            .apply(
                &plan(8, 2, "v1.31.4+k3s1", "10.0.0.12"),
                &mut Recorder::default(),
            )
            .await
            .unwrap();
        assert_eq!(
            applied.ran,
            [
                Step::Preflight,
                Step::WriteConfig,
                Step::FetchInstaller,
                Step::RunInstaller,
                Step::Start
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_unit_that_never_comes_up_times_out_naming_the_journal_cause_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let executor = executor(dir.path());
        executor.host().set_start_result("activating");
        executor.host().set_journal(&format!(
            "starting\nlevel=error msg=\"Node password rejected, duplicate hostname\"\nretrying with {TOKEN}\n"
        ));
        let started = Instant::now();
        let err = executor
            .apply(
                &plan(5, 1, "v1.31.4+k3s1", "10.0.0.11"),
                &mut Recorder::default(),
            )
            .await
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_secs(60));
        let text = crate::chain(&err);
        assert!(
            text.contains("did not become active within 60s (last state activating)"),
            "{text}"
        );
        assert!(text.contains("rejected this node's password"), "{text}");
        assert!(!text.contains(TOKEN), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_role_change_is_refused_in_preflight() {
        let dir = tempfile::tempdir().unwrap();
        let executor = executor(dir.path());
        executor
            .apply(
                &plan(5, 1, "v1.31.4+k3s1", "10.0.0.11"),
                &mut Recorder::default(),
            )
            .await
            .unwrap();
        let agent = InstallPlan::parse(
            &json!({"schema": 1, "revision": 6, "install_revision": 1, "role": "agent",
                "version": "v1.31.4+k3s1", "token": AGENT_TOKEN,
                "config": {"server": "https://10.0.0.11:6443"}})
            .to_string(),
        )
        .unwrap();
        let before = executor.host().mutations().len();
        let mut reporter = Recorder::default();
        let err = executor.apply(&agent, &mut reporter).await.unwrap_err();
        assert!(matches!(err, K3sInstallError::RoleChange { .. }), "{err}");
        assert_eq!(reporter.steps(StepOutcome::Failed), [Step::Preflight]);
        assert_eq!(executor.host().mutations().len(), before, "nothing changed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_leftover_node_directory_is_reported_but_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let executor = executor(dir.path());
        executor.host().put("/etc/rancher/node/password", b"cloned");
        let mut reporter = Recorder::default();
        executor
            .apply(&plan(5, 1, "v1.31.4+k3s1", "10.0.0.11"), &mut reporter)
            .await
            .unwrap();
        let preflight = &reporter.events[1];
        assert_eq!(
            (preflight.step, preflight.outcome),
            (Step::Preflight, StepOutcome::Succeeded)
        );
        assert!(
            preflight
                .message
                .contains("warning: /etc/rancher/node exists"),
            "{}",
            preflight.message
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopped_unit_with_an_unchanged_plan_is_started_again() {
        let dir = tempfile::tempdir().unwrap();
        let executor = executor(dir.path());
        let plan = plan(5, 1, "v1.31.4+k3s1", "10.0.0.11");
        executor
            .apply(&plan, &mut Recorder::default())
            .await
            .unwrap();
        executor.host().set_unit_state("k3s", "failed");
        let applied = executor
            .apply(&plan, &mut Recorder::default())
            .await
            .unwrap();
        assert_eq!(applied.ran, [Step::Preflight, Step::Start]);
        assert_eq!(
            executor.host().mutations().last().unwrap(),
            "systemctl start --no-block k3s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_token_reaches_commands_reports_or_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let executor = executor(dir.path());
        let mut reporter = Recorder::default();
        executor
            .apply(&plan(5, 1, "v1.31.4+k3s1", "10.0.0.11"), &mut reporter)
            .await
            .unwrap();
        executor
            .apply(&plan(6, 2, "v1.31.4+k3s1", "10.0.0.12"), &mut reporter)
            .await
            .unwrap();
        let mut seen = executor.host().calls().join("\n");
        seen.push_str(&format!("{:?}", reporter.events));
        seen.push_str(
            &fs::read_to_string(
                dir.path()
                    .join("state")
                    .join(crate::k3s::checkpoint::CHECKPOINT_FILE),
            )
            .unwrap(),
        );
        for secret in [TOKEN, AGENT_TOKEN, "unit-test-agent-pw"] {
            assert!(!seen.contains(secret), "{secret} leaked into {seen}");
        }
        let config = String::from_utf8(
            executor
                .host()
                .file("/etc/rancher/k3s/config.yaml")
                .unwrap(),
        )
        .unwrap();
        assert!(!config.contains(TOKEN) && config.contains("token-file"));
        assert_eq!(
            executor.host().mode("/etc/rancher/k3s/agent-token"),
            Some(0o600)
        );
    }
}
