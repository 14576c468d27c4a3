//! `Enrollment.Enroll`: a one-time token and a CSR in, a certificate chain out.

use std::sync::Arc;

use homelab_proto::v1::{EnrollRequest, EnrollResponse, enrollment_server::Enrollment};
use tonic::{Request, Response, Status};

use super::convert::facts_from_pb;
use crate::core::{self, Coordinator};

pub(super) struct EnrollmentService {
    core: Arc<Coordinator>,
}

impl EnrollmentService {
    pub(super) fn new(core: Arc<Coordinator>) -> Self {
        Self { core }
    }
}

#[tonic::async_trait]
impl Enrollment for EnrollmentService {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let r = request.into_inner();
        let enrollment = core::Enrollment {
            token: r.token,
            node_name: r.node_name,
            csr_pem: r.csr_pem,
            facts: facts_from_pb(r.facts),
        };
        let issued = self.core.enroll(enrollment)?;
        Ok(Response::new(EnrollResponse {
            certificate_chain_pem: issued.chain_pem,
            not_after_unix: issued.not_after_unix,
        }))
    }
}
