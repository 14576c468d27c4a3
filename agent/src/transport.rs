//! TLS channels to the coordinator. The agent trusts only the homelab CA it was given: the
//! coordinator's certificate is pinned to that CA, never to the system trust store.

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity};

use crate::identity::Identity;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings notice a dead coordinator or a cut path without waiting for TCP.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("coordinator URL {0:?} is not valid")]
    BadUrl(String),
    #[error("cannot reach the coordinator at {url}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Connects to `url`, verifying the server against `ca_pem`, presenting `identity` if given.
pub async fn connect(
    url: &str,
    ca_pem: &str,
    identity: Option<&Identity>,
) -> Result<Channel, TransportError> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|_| TransportError::BadUrl(url.to_owned()))?;
    let host = endpoint
        .uri()
        .host()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
        .ok_or_else(|| TransportError::BadUrl(url.to_owned()))?;
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(host);
    if let Some(identity) = identity {
        tls = tls.identity(TlsIdentity::from_pem(
            &identity.chain_pem,
            identity.key_pem(),
        ));
    }
    let connect_err = |source| TransportError::Connect {
        url: url.to_owned(),
        source,
    };
    endpoint
        .tls_config(tls)
        .map_err(connect_err)?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(connect_err)
}
