//! K3s on this node: the agent's side of the "K3s roles" work.
//!
//! An `Assignment` directive carries an install plan ([`plan`], the JSON contract with the
//! coordinator). The [`task`] applies it with the [`install`] executor, which touches the
//! machine only through the [`host`] seam and records its progress in a [`checkpoint`], so
//! that a crash or a reboot resumes where it stopped and a repeated plan changes nothing.
//!
//! # Layout
//! - [`plan`]: `InstallPlan`, parsed strictly from `plan_json`; tokens redacted in `Debug`.
//! - [`host`]: `trait Host` (files under a root, commands with a cleared environment,
//!   systemctl, journal) and `SystemHost`, the real machine.
//! - [`install`]: `Executor`, the five steps and the rules that pick them.
//! - [`checkpoint`]: `k3s-checkpoint.json` in the state directory.
//! - [`fetch`]: the installer download, on the hyper and rustls the gRPC link already uses.
//! - [`task`]: the task that owns the executor across link sessions, and its `K3sHandle`.
//! - [`view`]: a server's view of the cluster (CA hash, API readiness, Node conditions).
//! - [`ops`]: operations the coordinator asks for on an installed node: the admin
//!   kubeconfig, `kubectl drain` and `delete node`, uninstall.

pub mod checkpoint;
#[cfg(test)]
mod fake;
pub mod fetch;
pub mod host;
pub mod install;
pub mod ops;
pub mod plan;
pub mod task;
pub mod view;

use std::time::Duration;

pub use self::{
    host::{Host, SystemHost},
    install::{Executor, ExecutorSettings, PhaseEvent, Reporter, Step, StepOutcome},
    ops::{Kubeconfig, KubectlAction, KubectlCommand, Operation},
    plan::{InstallPlan, Role},
    task::{K3sEvent, K3sHandle, K3sStatus, Submission},
    view::{NodeReady, ServerView},
};
use crate::config::AgentConfig;

/// The production executor for `config`: the real host under `host_root`.
pub fn executor(config: &AgentConfig) -> Executor<SystemHost> {
    let host = SystemHost {
        root: config.host_root.clone(),
        systemctl: config.systemctl.clone(),
        journalctl: Some(config.journalctl.clone()),
        path_env: config.command_path.clone(),
    };
    Executor::new(
        host,
        config.state_dir.clone(),
        ExecutorSettings {
            ready_timeout: Duration::from_secs(config.k3s_ready_timeout_seconds),
            install_timeout: Duration::from_secs(config.k3s_install_timeout_seconds),
            ca_bundle: Some(config.installer_ca_bundle.clone()),
            ..ExecutorSettings::default()
        },
    )
}
