//! `Admin`: operator actions that must reach the running daemon.

use std::sync::Arc;

use homelab_proto::v1::{
    GetKubeconfigRequest, GetKubeconfigResponse, ReconcileRequest, ReconcileResponse,
    RemoveNodeRequest, RemoveNodeResponse, RequestRenewalRequest, RequestRenewalResponse,
    RevokeNodeRequest, RevokeNodeResponse, admin_server::Admin,
};
use tonic::{Request, Response, Status};

use crate::{
    core::{Coordinator, Directive, PushOutcome},
    nodeops::NodeOpError,
};

fn node_op_status(e: NodeOpError) -> Status {
    let message = crate::error_chain(&e);
    match e {
        NodeOpError::UnknownNode(_) => Status::not_found(message),
        NodeOpError::NoServer | NodeOpError::Request(_) => Status::unavailable(message),
        NodeOpError::Quorum { .. } => Status::failed_precondition(message),
        NodeOpError::Refused { .. } => Status::failed_precondition(message),
        NodeOpError::Store(e) => Status::from(e),
    }
}

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

    async fn get_kubeconfig(
        &self,
        _request: Request<GetKubeconfigRequest>,
    ) -> Result<Response<GetKubeconfigResponse>, Status> {
        let (content, server) = self.core.kubeconfig().await.map_err(node_op_status)?;
        Ok(Response::new(GetKubeconfigResponse { content, server }))
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<RemoveNodeResponse>, Status> {
        let request = request.into_inner();
        let removal = self
            .core
            .remove_node(&request.name, request.force)
            .await
            .map_err(node_op_status)?;
        Ok(Response::new(RemoveNodeResponse {
            drained: removal.drained,
            uninstalled: removal.uninstalled,
            node_deleted: removal.node_deleted,
            warnings: removal.warnings,
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
