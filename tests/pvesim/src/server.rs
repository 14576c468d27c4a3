//! The listener: TLS, HTTP/1.1 connections, and the [`Simulator`] handle tests hold.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::auth::Credentials;
use crate::config::{SimConfig, Timing};
use crate::faults::Faults;
use crate::observe::{self, RequestLog, RequestRecord, TaskSnapshot, VmSnapshot, VolumeSnapshot};
use crate::persist::{SavedTls, StateFile, StateFileError};
use crate::state::{InvalidConfigError, State};
use crate::tls::{TlsIdentity, TlsSetupError};

/// How long a client may take to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Starting the simulator failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// Binding the listener failed.
    #[error("failed to bind the simulator listener on {addr}")]
    Bind {
        /// Requested address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The bound listener has no local address.
    #[error("failed to read the listener address")]
    LocalAddr(#[source] std::io::Error),
    /// The configuration cannot describe a cluster.
    #[error("invalid simulator configuration")]
    InvalidConfig(#[from] InvalidConfigError),
    /// Certificate generation failed.
    #[error("failed to set up TLS")]
    Tls(#[from] TlsSetupError),
    /// The state file could not be read or first written.
    #[error("simulator state file")]
    StateFile(#[from] StateFileError),
}

/// Everything the connection tasks share.
pub(crate) struct Shared {
    state: Mutex<State>,
    log: Mutex<Vec<RequestRecord>>,
    legacy_errors: AtomicBool,
    /// How far tests moved the simulator's clock ahead of tokio's.
    clock_offset: Mutex<Duration>,
    pub(crate) credentials: Credentials,
    pub(crate) version: String,
    pub(crate) fingerprint: String,
    pub(crate) max_body_bytes: usize,
    pub(crate) max_upload_bytes: usize,
    pub(crate) started: Instant,
    /// Where the cluster is kept across restarts, with the TLS identity it saves.
    state_file: Option<(StateFile, SavedTls)>,
}

impl Shared {
    /// Locks the state. A panic while holding the lock only happens in a test that is failing
    /// anyway, so a poisoned lock is used as is.
    pub(crate) fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The simulator's time: tokio's clock plus whatever tests skipped ahead.
    pub(crate) fn now(&self) -> Instant {
        Instant::now()
            + *self
                .clock_offset
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the state after finishing due tasks.
    pub(crate) fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let now = self.now();
        let mut state = self.lock_state();
        state.advance(now);
        f(&mut state)
    }

    pub(crate) fn push_record(&self, record: RequestRecord) {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(record);
    }

    pub(crate) fn legacy_errors(&self) -> bool {
        self.legacy_errors.load(Ordering::Relaxed)
    }

    /// Writes the state file, if there is one (see [`crate::persist`]).
    pub(crate) fn persist(&self) -> Result<(), StateFileError> {
        let Some((file, tls)) = &self.state_file else {
            return Ok(());
        };
        file.save(tls, &self.credentials.key, || {
            let now = self.now();
            let mut state = self.lock_state();
            state.advance(now);
            (state, now)
        })
    }
}

/// A running simulator. Dropping it stops the listener; [`Simulator::shutdown`] also waits
/// for the connections to close.
pub struct Simulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    ca_pem: String,
    cert_pem: String,
    token_id: String,
    token_secret: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("addr", &self.addr)
            .field("token_id", &self.token_id)
            .finish_non_exhaustive()
    }
}

/// Starts a simulator on `127.0.0.1` with an OS-assigned port.
pub async fn start(config: SimConfig) -> Result<Simulator, SimError> {
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| SimError::Bind { addr, source })?;
    start_with_listener(listener, config).await
}

/// Starts a simulator on a listener the caller bound.
pub async fn start_with_listener(
    listener: TcpListener,
    config: SimConfig,
) -> Result<Simulator, SimError> {
    let addr = listener.local_addr().map_err(SimError::LocalAddr)?;
    let node = config.nodes.first().cloned().unwrap_or_default();
    let state_file = config.state_file.as_deref().map(StateFile::new);
    let saved = match &state_file {
        Some(file) => file.load(Instant::now())?,
        None => None,
    };
    let tls = match &saved {
        Some(saved) => TlsIdentity::from_saved(&saved.tls)?,
        None => TlsIdentity::generate(&node, addr.ip())?,
    };
    let mut state = State::new(&config)?;
    let key = saved
        .as_ref()
        .and_then(|s| s.ticket_key())
        .unwrap_or_else(rand::random);
    if let Some(saved) = saved {
        info!(path = ?config.state_file, "state restored");
        saved.restore(&mut state);
    }
    let (token_id, token_secret) = config
        .tokens
        .first()
        .map(|t| (t.token_id.clone(), t.secret.expose().to_owned()))
        .unwrap_or_default();
    let shared = Arc::new(Shared {
        state: Mutex::new(state),
        log: Mutex::new(Vec::new()),
        legacy_errors: AtomicBool::new(config.legacy_errors),
        clock_offset: Mutex::new(Duration::ZERO),
        credentials: Credentials {
            tokens: config.tokens.clone(),
            users: config.users.clone(),
            key,
        },
        version: config.version.clone(),
        fingerprint: tls.fingerprint.clone(),
        max_body_bytes: config.max_body_bytes,
        max_upload_bytes: config.max_upload_bytes,
        started: Instant::now(),
        state_file: state_file.map(|file| (file, tls.saved())),
    });
    shared.persist()?;
    let acceptor = TlsAcceptor::from(tls.server_config.clone());
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(accept_loop(listener, acceptor, shared.clone(), rx));
    info!(%addr, fingerprint = %tls.fingerprint, "PVE simulator listening");
    Ok(Simulator {
        shared,
        addr,
        ca_pem: tls.ca_pem,
        cert_pem: tls.cert_pem,
        token_id,
        token_secret,
        shutdown: Some(tx),
        task: Some(task),
    })
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(serve_connection(stream, peer, acceptor.clone(), shared.clone()));
                }
                Err(err) => {
                    warn!(%err, "accept failed");
                    // Back off briefly so a full file table does not spin the loop.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
    debug!("simulator stopped");
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
) {
    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            debug!(%peer, %err, "TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let service = service_fn(move |req| crate::http::handle(shared.clone(), req));
    if let Err(err) = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(tls), service)
        .await
    {
        debug!(%peer, %err, "connection ended with an error");
    }
}

impl Simulator {
    /// `https://127.0.0.1:<port>/api2/json`: the API base, to which paths like `/version`
    /// are appended.
    pub fn base_url(&self) -> String {
        format!("{}/api2/json", self.endpoint())
    }

    /// `https://127.0.0.1:<port>`: the server origin, for clients that append `/api2/json`
    /// themselves (as `https://HOST:8006` is configured for a real node).
    pub fn endpoint(&self) -> String {
        let ip = if self.addr.ip().is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            self.addr.ip()
        };
        format!("https://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The cluster CA (`pve-root-ca.pem`) to trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The node certificate (`pve-ssl.pem`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// SHA-256 of the node certificate, `AA:BB:…`.
    pub fn fingerprint(&self) -> &str {
        &self.shared.fingerprint
    }

    /// The first configured token, `user@realm!tokenid`.
    pub fn token_id(&self) -> &str {
        &self.token_id
    }

    /// The first configured token's secret.
    pub fn token_secret(&self) -> &str {
        &self.token_secret
    }

    /// The `Authorization` header value for the first token.
    pub fn authorization(&self) -> String {
        format!("PVEAPIToken={}={}", self.token_id, self.token_secret)
    }

    /// The fault injection handle.
    pub fn faults(&self) -> Faults {
        Faults {
            shared: self.shared.clone(),
        }
    }

    /// A copy of the request log.
    pub fn request_log(&self) -> RequestLog {
        RequestLog {
            records: self
                .shared
                .log
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    /// Empties the request log.
    pub fn clear_request_log(&self) {
        self.shared
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Every VM, ordered by id.
    pub fn vms(&self) -> Vec<VmSnapshot> {
        self.shared.with_state(|s| observe::vms(s))
    }

    /// One VM.
    pub fn vm(&self, vmid: u32) -> Option<VmSnapshot> {
        self.shared
            .with_state(|s| s.vms.get(&vmid).map(VmSnapshot::of))
    }

    /// Every volume on every storage.
    pub fn storage_contents(&self) -> Vec<VolumeSnapshot> {
        self.shared.with_state(|s| observe::volumes(s))
    }

    /// The bytes of an uploaded volume, e.g. `local:iso/seed-123.iso`.
    pub fn volume_bytes(&self, volid: &str) -> Option<Vec<u8>> {
        self.shared.with_state(|s| {
            s.storages
                .values()
                .find_map(|st| st.volumes.get(volid))
                .and_then(|v| v.data.as_ref().map(|d| d.to_vec()))
        })
    }

    /// Every task since start.
    pub fn tasks(&self) -> Vec<TaskSnapshot> {
        self.shared.with_state(|s| observe::tasks(s))
    }

    /// Changes task durations and delays from now on.
    pub fn set_timing(&self, timing: Timing) {
        self.shared.with_state(|s| s.knobs.timing = timing);
    }

    /// Moves the simulator's clock forward: tasks due within `by` finish and the guest agent
    /// wakes as if that much time had passed. Lets tests skip long task durations without
    /// sleeping or pausing tokio's clock.
    pub fn advance_clock(&self, by: Duration) {
        *self
            .shared
            .clock_offset
            .lock()
            .unwrap_or_else(PoisonError::into_inner) += by;
        self.shared.with_state(|_| ());
    }

    /// Switches between current and pre-2025 error bodies.
    pub fn set_legacy_errors(&self, legacy: bool) {
        self.shared.legacy_errors.store(legacy, Ordering::Relaxed);
    }

    /// Makes the guest agent of `vmid` report these addresses on `eth0` instead of the
    /// `ipconfig0` or DHCP address.
    pub fn set_guest_addresses(&self, vmid: u32, addresses: Vec<IpAddr>) {
        self.shared
            .with_state(|s| s.guest_addresses.insert(vmid, addresses));
    }

    /// Stops accepting, closes open connections, and waits for the listener task.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            // The receiver is gone only if the loop already ended.
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take()
            && let Err(err) = task.await
        {
            warn!(%err, "simulator task failed");
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
