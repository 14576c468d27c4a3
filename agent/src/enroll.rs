//! Enrollment: trade the one-time token and a CSR for a certificate, once.

use std::{fs, io, path::PathBuf};

use homelab_proto::v1::{EnrollRequest, enrollment_client::EnrollmentClient};
use log::{info, warn};

use crate::{
    config::AgentConfig,
    facts,
    identity::{Identity, IdentityError, IdentityStore, PendingKey},
    transport::{self, TransportError},
};

/// Why enrollment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(
        "no enrollment token at {path}; create one with `homelab token create NODE` and put it there"
    )]
    NoToken { path: PathBuf },
    #[error("failed to read the enrollment token {path}")]
    ReadToken {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to read the CA certificate {path}")]
    ReadCa {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the coordinator refused the enrollment ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("enrollment failed for now ({code:?}): {message}")]
    Failed { code: tonic::Code, message: String },
    #[error("transport")]
    Transport(#[from] TransportError),
    #[error("node identity")]
    Identity(#[from] IdentityError),
}

impl EnrollError {
    /// Whether retrying later can succeed without an operator's help.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Failed { .. } | Self::Transport(_))
    }
}

/// Enrolls: generates a key, sends the CSR with the token and facts, stores the identity and
/// then deletes the token file.
pub async fn enroll(
    config: &AgentConfig,
    ca_pem: &str,
    store: &IdentityStore,
) -> Result<Identity, EnrollError> {
    let token = match fs::read_to_string(&config.token_file) {
        Ok(token) => token.trim().to_owned(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(EnrollError::NoToken {
                path: config.token_file.clone(),
            });
        }
        Err(source) => {
            return Err(EnrollError::ReadToken {
                path: config.token_file.clone(),
                source,
            });
        }
    };
    let key = PendingKey::generate(&config.node_name)?;
    let channel = transport::connect(&config.coordinator_url, ca_pem, None).await?;
    let request = EnrollRequest {
        token,
        node_name: config.node_name.clone(),
        csr_pem: key.csr_pem.clone(),
        facts: Some(facts::collect(&config.host_root)),
    };
    let response = EnrollmentClient::new(channel)
        .enroll(request)
        .await
        .map_err(|status| {
            let code = status.code();
            let message = status.message().to_owned();
            match code {
                tonic::Code::Unauthenticated
                | tonic::Code::PermissionDenied
                | tonic::Code::InvalidArgument
                | tonic::Code::OutOfRange => EnrollError::Refused { code, message },
                _ => EnrollError::Failed { code, message },
            }
        })?
        .into_inner();
    let identity = store.save(key, &response.certificate_chain_pem)?;
    info!(
        "enrolled as {} (certificate {} valid until {})",
        config.node_name, identity.serial, response.not_after_unix
    );
    if let Err(e) = fs::remove_file(&config.token_file) {
        warn!(
            "enrolled, but failed to delete the used token {}: {e}",
            config.token_file.display()
        );
    }
    Ok(identity)
}

/// Reads the pinned CA certificate.
pub fn read_ca(config: &AgentConfig) -> Result<String, EnrollError> {
    fs::read_to_string(&config.ca_cert).map_err(|source| EnrollError::ReadCa {
        path: config.ca_cert.clone(),
        source,
    })
}
