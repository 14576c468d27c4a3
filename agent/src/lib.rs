//! The homelab node agent: enrolls once with a one-time token, then keeps a mutually
//! authenticated gRPC link to the coordinator for ever, acting on its directives.
//!
//! # Layout
//! - [`config`]: `agent.toml`, parsed strictly.
//! - [`identity`]: the node key (generated here, never sent) and its certificate.
//! - [`enroll`]: token plus CSR for a certificate, once.
//! - [`link`]: one session on the `AgentLink.Connect` stream.
//! - [`k3s`]: the install plan, the checkpointed executor and the task that applies
//!   assignments across sessions.
//! - [`backoff`]: capped, jittered reconnect delays.
//! - [`transport`]: TLS channels pinned to the homelab CA.
//! - [`facts`]: what the agent reports about its machine.
//! - [`logging`]: journald or stderr.

pub mod backoff;
pub mod config;
pub mod enroll;
pub mod facts;
pub mod identity;
pub mod k3s;
pub mod link;
pub mod logging;
pub mod transport;

use std::{future::Future, time::Duration};

use log::{error, info, warn};

use crate::{
    backoff::Backoff,
    config::AgentConfig,
    enroll::EnrollError,
    identity::{IdentityError, IdentityStore},
    k3s::K3sHandle,
    link::SessionEnd,
};

/// A session that lasted this long counts as healthy: the next reconnect starts from the
/// first backoff step again.
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("enrollment")]
    Enroll(#[from] EnrollError),
    #[error("node identity")]
    Identity(#[from] IdentityError),
    #[error(
        "the node certificate expired and there is no enrollment token at {path}; create one with `homelab token create` to enroll again"
    )]
    ExpiredWithoutToken { path: std::path::PathBuf },
    #[error(
        "this node was revoked and there is no enrollment token at {path}; to re-admit it, create one with `homelab token create` and restart the agent"
    )]
    RevokedWithoutToken { path: std::path::PathBuf },
}

/// How the agent stopped without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// SIGTERM or SIGINT.
    Shutdown,
    /// The coordinator decommissioned the node; its identity is gone.
    Decommissioned,
}

impl AgentError {
    /// Whether only an operator can fix this (exit code 78, which the systemd unit does not
    /// restart on), as opposed to a failure that a restart may cure.
    pub fn needs_operator(&self) -> bool {
        match self {
            Self::Enroll(e) => !e.is_transient(),
            Self::Identity(_)
            | Self::ExpiredWithoutToken { .. }
            | Self::RevokedWithoutToken { .. } => true,
        }
    }
}

/// Runs the agent until `shutdown` resolves or the node is decommissioned.
/// `on_ready` is called once, when the first link session is established.
///
/// The K3s task starts first and lives as long as this function: it resumes an install a
/// crash interrupted even while the coordinator is unreachable, and link sessions come and go
/// around it. It is stopped and awaited before this returns.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
    on_ready: impl FnMut(),
) -> Result<Stopped, AgentError> {
    let mut k3s = K3sHandle::spawn(k3s::executor(&config));
    let result = tokio::select! {
        result = run_forever(&config, &mut k3s, on_ready) => result,
        () = shutdown => {
            info!("stopping");
            Ok(Stopped::Shutdown)
        }
    };
    k3s.shutdown().await;
    result
}

async fn run_forever(
    config: &AgentConfig,
    k3s: &mut K3sHandle,
    mut on_ready: impl FnMut(),
) -> Result<Stopped, AgentError> {
    let ca_pem = enroll::read_ca(config)?;
    let store = IdentityStore::open(&config.state_dir)?;
    let mut backoff = Backoff::new();
    let mut ready_sent = false;
    loop {
        let identity = match store.load()? {
            Some(identity) if !identity.expired() => identity,
            existing => {
                if existing.is_some() && !config.token_file.exists() {
                    return Err(AgentError::ExpiredWithoutToken {
                        path: config.token_file.clone(),
                    });
                }
                match enroll::enroll(config, &ca_pem, &store).await {
                    Ok(identity) => identity,
                    Err(e) if e.is_transient() => {
                        let delay = backoff.next_delay();
                        warn!("{}; retrying in {delay:.1?}", chain(&e));
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let started = tokio::time::Instant::now();
        let result = link::run_session(config, &ca_pem, &identity, &store, k3s, || {
            if !ready_sent {
                ready_sent = true;
                on_ready();
            }
        })
        .await;
        match result {
            Ok(SessionEnd::Renewed(_)) => {
                backoff.reset();
                continue;
            }
            Ok(SessionEnd::Decommissioned) => {
                info!("identity removed; exiting");
                return Ok(Stopped::Decommissioned);
            }
            Ok(SessionEnd::Lost(e)) | Err(e) if e.is_revoked() => {
                // The identity is worthless now. A new token re-admits the node.
                error!("{}", chain(&e));
                store.forget()?;
                if !config.token_file.exists() {
                    return Err(AgentError::RevokedWithoutToken {
                        path: config.token_file.clone(),
                    });
                }
                info!("found a new enrollment token; enrolling again");
            }
            Ok(SessionEnd::Lost(e)) => {
                if started.elapsed() >= STABLE_SESSION {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                warn!("link lost: {}; reconnecting in {delay:.1?}", chain(&e));
                tokio::time::sleep(delay).await;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                let text = chain(&e);
                if matches!(
                    e,
                    link::LinkError::Refused {
                        code: tonic::Code::PermissionDenied,
                        ..
                    }
                ) {
                    error!("{text}; retrying in {delay:.1?}");
                } else {
                    warn!("{text}; retrying in {delay:.1?}");
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// An error and its causes on one line.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
