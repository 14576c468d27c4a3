//! The operator's connection to a running coordinator, authenticated with the operator
//! certificate from the state directory.

use std::time::Duration;

use anyhow::Context as _;
use homelab_proto::v1::{admin_client::AdminClient, status_client::StatusClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::Context;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The port `homelab serve` listens on by default.
pub(super) const DEFAULT_PORT: u16 = 7443;

/// The coordinator URL: `--coordinator`, else the address the local daemon recorded, else
/// the default port on loopback.
pub(super) fn coordinator_url(ctx: &Context) -> String {
    if let Some(url) = &ctx.coordinator {
        return url.clone();
    }
    match std::fs::read_to_string(ctx.state.address_file()) {
        Ok(addr) => format!("https://{}", addr.trim()),
        Err(_) => format!("https://127.0.0.1:{DEFAULT_PORT}"),
    }
}

/// An mTLS channel to the coordinator as the operator.
pub(super) async fn channel(ctx: &Context) -> anyhow::Result<Channel> {
    let url = coordinator_url(ctx);
    let ca = ctx.state.read(&ctx.state.ca_cert())?;
    let cert = ctx.state.read(&ctx.state.operator_cert())?;
    let key = ctx.state.read(&ctx.state.operator_key())?;
    let endpoint = Endpoint::from_shared(url.clone())
        .with_context(|| format!("{url:?} is not a valid coordinator URL"))?;
    let host = endpoint
        .uri()
        .host()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
        .with_context(|| format!("{url:?} has no host"))?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name(host);
    endpoint
        .tls_config(tls)
        .context("invalid TLS settings")?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .with_context(|| {
            format!("cannot reach the coordinator at {url}; is `homelab serve` running?")
        })
}

pub(super) async fn status_client(ctx: &Context) -> anyhow::Result<StatusClient<Channel>> {
    Ok(StatusClient::new(channel(ctx).await?))
}

pub(super) async fn admin_client(ctx: &Context) -> anyhow::Result<AdminClient<Channel>> {
    Ok(AdminClient::new(channel(ctx).await?))
}
