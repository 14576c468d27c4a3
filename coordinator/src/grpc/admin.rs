//! `Admin`: operator actions that must reach the running daemon.

use std::sync::Arc;

use homelab_proto::v1::{
    ReconcileRequest, ReconcileResponse, RequestRenewalRequest, RequestRenewalResponse,
    RevokeNodeRequest, RevokeNodeResponse, admin_server::Admin,
};
use tonic::{Request, Response, Status};

use crate::core::{Coordinator, Directive, PushOutcome};

pub(super) struct AdminService {
    core: Arc<Coordinator>,
}

impl AdminService {
    pub(super) fn new(core: Arc<Coordinator>) -> Self {
        Self { core }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn revoke_node(
        &self,
        request: Request<RevokeNodeRequest>,
    ) -> Result<Response<RevokeNodeResponse>, Status> {
        let name = request.into_inner().name;
        let (certificates_revoked, stream_cut) = self.core.revoke(&name)?;
        Ok(Response::new(RevokeNodeResponse {
            certificates_revoked,
            stream_cut,
        }))
    }

    async fn reconcile(
        &self,
        _request: Request<ReconcileRequest>,
    ) -> Result<Response<ReconcileResponse>, Status> {
        self.core.orchestrate(None);
        Ok(Response::new(ReconcileResponse {}))
    }

    async fn request_renewal(
        &self,
        request: Request<RequestRenewalRequest>,
    ) -> Result<Response<RequestRenewalResponse>, Status> {
        let name = request.into_inner().name;
        match self.core.push(&name, Directive::RenewCertificate)? {
            PushOutcome::Sent(revision) => Ok(Response::new(RequestRenewalResponse { revision })),
            PushOutcome::NotConnected => Err(Status::failed_precondition(format!(
                "node {name} is not connected"
            ))),
            PushOutcome::QueueFull => Err(Status::unavailable(format!(
                "node {name} is not reading its link; try again later"
            ))),
        }
    }
}
