//! Who is calling: the identity in the verified client certificate, and what it may call.

use tonic::{Request, Status};
use tracing::warn;

use crate::pki::{Identity, NodeName, PeerCert, inspect_peer};

/// The caller's verified certificate; UNAUTHENTICATED without one.
pub(super) fn peer<T>(request: &Request<T>) -> Result<PeerCert, Status> {
    let certs = request.peer_certs().ok_or_else(|| {
        warn!(remote = ?request.remote_addr(), "call without a client certificate refused");
        Status::unauthenticated("this service needs a client certificate signed by the homelab CA")
    })?;
    // rustls verified the chain; the leaf comes first.
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate presented"))?;
    inspect_peer(leaf).map_err(|e| {
        warn!(remote = ?request.remote_addr(), error = %e, "client certificate without identity");
        Status::unauthenticated(format!("client certificate refused: {e}"))
    })
}

/// Interceptor for the operator services: only operator certificates pass.
pub(super) fn operator_only(request: Request<()>) -> Result<Request<()>, Status> {
    let peer = peer(&request)?;
    match peer.identity {
        Identity::Operator(_) => Ok(request),
        Identity::Node(node) => {
            warn!(node = %node, "node certificate used on the operator API");
            Err(Status::permission_denied(format!(
                "a node certificate ({node}) may not call the operator API"
            )))
        }
    }
}

/// The node a link caller is; PERMISSION_DENIED for an operator certificate.
pub(super) fn node<T>(request: &Request<T>) -> Result<(NodeName, PeerCert), Status> {
    let peer = peer(request)?;
    match &peer.identity {
        Identity::Node(node) => Ok((node.clone(), peer.clone())),
        Identity::Operator(name) => {
            warn!(operator = %name, "operator certificate used on the agent link");
            Err(Status::permission_denied(
                "an operator certificate may not pose as a node",
            ))
        }
    }
}
