//! The gRPC surface of the coordinator: one TLS port serving `Enrollment` (no client
//! certificate), `AgentLink` (node certificates), `Status` and `Admin` (operator
//! certificates), plus `grpc.health.v1` and server reflection.
//!
//! Handlers convert protobuf to domain types ([`convert`]), check the caller ([`auth`]),
//! delegate to [`crate::core::Coordinator`], and map domain errors to a status in one place
//! ([`errors`]).

mod accept;
mod admin;
mod auth;
mod convert;
mod enrollment;
mod errors;
mod link;
mod status;

use std::{future::Future, sync::Arc, time::Duration};

use homelab_proto::v1::{
    admin_server::AdminServer, agent_link_server::AgentLinkServer,
    enrollment_server::EnrollmentServer, status_server::StatusServer,
};
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tracing::{info, warn};

use crate::{
    core::Coordinator,
    state_dir::{StateDir, StateDirError},
};

/// The largest request message the coordinator decodes. A CSR with facts is about 2 KiB;
/// anything near this limit is a mistake or an attack. tonic refuses a larger message with
/// OUT_OF_RANGE, naming both sizes.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// The default time a connection has to complete its TLS handshake before it is closed, so
/// half-open and slow connections cannot pile up. A real client needs one round trip or two.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The default number of connections served at once, handshakes in progress included:
/// room for a fleet of 10,000 agents plus operators and reconnect overlap. Each one needs a
/// file descriptor, so the daemon's `RLIMIT_NOFILE` must be above it.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
/// HTTP/2 pings keep idle links alive through NAT and detect dead peers.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// After shutdown begins, connections get this long to close before the server stops anyway.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// What went wrong serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("failed to load the serving certificate")]
    Tls(#[from] StateDirError),
    #[error("invalid TLS configuration")]
    TlsConfig(#[source] tonic::transport::Error),
    #[error("the reflection descriptors do not decode")]
    Reflection(#[source] tonic_reflection::server::Error),
    #[error("the gRPC server failed")]
    Transport(#[source] tonic::transport::Error),
}

/// The serving certificate, its key, and the CA that client certificates must chain to.
pub struct TlsMaterial {
    server_cert_pem: String,
    server_key_pem: String,
    ca_cert_pem: String,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsMaterial { .. }")
    }
}

impl TlsMaterial {
    /// Reads the material `homelab init` wrote.
    pub fn load(state: &StateDir) -> Result<Self, StateDirError> {
        Ok(Self {
            server_cert_pem: state.read(&state.server_cert())?,
            server_key_pem: state.read(&state.server_key())?,
            ca_cert_pem: state.read(&state.ca_cert())?,
        })
    }
}

/// Serves every coordinator service on `listener` until `shutdown` resolves, then ends the
/// long-lived streams and drains connections for at most [`DRAIN_GRACE`]. The connection
/// limit and the TLS handshake timeout come from the coordinator's
/// [`Settings`](crate::core::Settings); see [`accept`] for how connections are admitted.
pub async fn serve(
    listener: TcpListener,
    tls: TlsMaterial,
    core: Arc<Coordinator>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let tls_config = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            &tls.server_cert_pem,
            &tls.server_key_pem,
        ))
        .client_ca_root(Certificate::from_pem(&tls.ca_cert_pem))
        // Enrollment callers have no certificate yet; every other service demands one.
        .client_auth_optional(true)
        .timeout(core.settings().tls_handshake_timeout);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AgentLinkServer<link::LinkService>>()
        .await;
    health_reporter
        .set_serving::<EnrollmentServer<enrollment::EnrollmentService>>()
        .await;
    health_reporter
        .set_serving::<StatusServer<status::StatusService>>()
        .await;
    health_reporter
        .set_serving::<AdminServer<admin::AdminService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(homelab_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(ServeError::Reflection)?;

    let enrollment = EnrollmentServer::new(enrollment::EnrollmentService::new(core.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let link = AgentLinkServer::new(link::LinkService::new(core.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let status = InterceptedService::new(
        StatusServer::new(status::StatusService::new(core.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        auth::operator_only,
    );
    let admin = InterceptedService::new(
        AdminServer::new(admin::AdminService::new(core.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        auth::operator_only,
    );

    let local = listener.local_addr().ok();
    let max_connections = core.settings().max_connections;
    let incoming = accept::admit(listener, max_connections);
    info!(
        address = ?local,
        max_connections,
        tls_handshake_timeout = ?core.settings().tls_handshake_timeout,
        "coordinator serving"
    );
    let signal_core = core.clone();
    let signal = async move {
        shutdown.await;
        info!("shutdown requested; ending agent links and watches");
        signal_core.begin_shutdown();
    };
    let server = Server::builder()
        .tls_config(tls_config)
        .map_err(ServeError::TlsConfig)?
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(enrollment)
        .add_service(link)
        .add_service(status)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, signal);
    let drained = core.shutdown_signal();
    tokio::select! {
        result = server => result.map_err(ServeError::Transport)?,
        () = async { drained.await; tokio::time::sleep(DRAIN_GRACE).await } => {
            warn!(grace = ?DRAIN_GRACE, "connections did not close in time; stopping anyway");
        }
    }
    info!("coordinator stopped");
    Ok(())
}
