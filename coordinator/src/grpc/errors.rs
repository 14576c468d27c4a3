//! The one place where domain errors become gRPC statuses. Internal detail (database errors)
//! goes to the log, not to the caller.

use tonic::Status;
use tracing::error;

use crate::{
    core::{EnrollError, LinkError},
    error_chain,
    store::StoreError,
};

impl From<EnrollError> for Status {
    fn from(e: EnrollError) -> Self {
        let message = error_chain(&e);
        match e {
            EnrollError::TokenUnknown
            | EnrollError::TokenExpired { .. }
            | EnrollError::TokenReused { .. } => Status::unauthenticated(message),
            EnrollError::TokenWrongNode { .. } => Status::permission_denied(message),
            EnrollError::NodeName(_) | EnrollError::Csr(_) => Status::invalid_argument(message),
            EnrollError::Store(e) => internal(&e),
        }
    }
}

impl From<LinkError> for Status {
    fn from(e: LinkError) -> Self {
        let message = error_chain(&e);
        match e {
            LinkError::Revoked(_) | LinkError::CertificateRevoked(_) => {
                Status::permission_denied(message)
            }
            LinkError::UnknownCertificate { .. } | LinkError::NotEnrolled(_) => {
                Status::unauthenticated(message)
            }
            LinkError::UnknownNode(_) => Status::not_found(message),
            LinkError::Duplicate { .. } => Status::failed_precondition(message),
            LinkError::Csr(_) => Status::invalid_argument(message),
            LinkError::Store(e) => internal(&e),
        }
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        internal(&e)
    }
}

fn internal(e: &StoreError) -> Status {
    error!(error = %error_chain(e), "state database error");
    Status::internal("the coordinator's state database failed; see its log")
}
