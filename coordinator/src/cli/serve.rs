//! `homelab serve`: the coordinator daemon.

use std::{future::Future, net::SocketAddr, time::Duration};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tracing::info;

use super::{Context, client::DEFAULT_PORT, parse_duration};
use crate::{
    core::{Coordinator, Settings},
    fsutil,
    grpc::{self, TlsMaterial},
    state_dir::StateDir,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on. Agents on the LAN must reach it; port 0 picks a free port.
    #[arg(long, env = "HOMELAB_LISTEN", default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)))]
    listen: SocketAddr,

    /// Lifetime of node certificates; agents renew at two thirds of it.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    node_cert_ttl: Duration,

    /// How often agents send unsolicited health reports.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    health_interval: Duration,

    /// How long a connection has to complete its TLS handshake before it is closed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    tls_handshake_timeout: Duration,

    /// Connections served at once, TLS handshakes included; more are closed on accept. Each
    /// takes a file descriptor: keep the open-files limit above it.
    #[arg(long, default_value_t = grpc::DEFAULT_MAX_CONNECTIONS, value_parser = parse_max_connections)]
    max_connections: usize,
}

pub(super) async fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("failed to listen on {}", args.listen))?;
    let settings = Settings {
        node_cert_lifetime: args.node_cert_ttl,
        health_interval: args.health_interval,
        tls_handshake_timeout: args.tls_handshake_timeout,
        max_connections: args.max_connections,
    };
    serve_state_dir(&ctx.state, listener, settings, shutdown_signal()).await
}

fn parse_max_connections(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) | Err(_) => Err(format!("{text:?} is not a positive number of connections")),
        Ok(n) => Ok(n),
    }
}

/// Serves the coordinator of `state` on `listener` until `shutdown`, recording the address
/// in the state directory so local CLI commands find it.
pub(super) async fn serve_state_dir(
    state: &StateDir,
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let _lock = state.lock_daemon()?;
    let ca = state.load_ca()?;
    let tls = TlsMaterial::load(state)?;
    let store = state.open_store()?;
    let core = Coordinator::new(store, ca, settings);
    let mut local = listener.local_addr().context("listener has no address")?;
    if local.ip().is_unspecified() {
        local.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    fsutil::write_atomic(
        &state.address_file(),
        local.to_string().as_bytes(),
        fsutil::PUBLIC,
    )
    .with_context(|| format!("failed to write {}", state.address_file().display()))?;
    core.event("", "coordinator.started", &format!("listening on {local}"));
    grpc::serve(listener, tls, core.clone(), shutdown).await?;
    core.event("", "coordinator.stopped", "graceful shutdown");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub(super) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!(signal = "SIGINT", "stopping"),
        _ = term.recv() => info!(signal = "SIGTERM", "stopping"),
    }
}
