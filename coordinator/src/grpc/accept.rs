//! Accepting TCP connections for the server: the connection limit, `TCP_NODELAY`, and
//! accept errors that must not stop the daemon.
//!
//! Rules:
//! 1. A connection holds one of `max_connections` slots from accept until it closes, TLS
//!    handshake included, so connections that never finish their handshake count too. The
//!    handshake itself is bounded by the TLS handshake timeout (`grpc/mod.rs`).
//! 2. A connection accepted with every slot taken is closed at once: its client sees the
//!    connection end and retries (agents back off), while every connection already served
//!    keeps working. A warning says so, at most once per [`REFUSAL_WARNING_INTERVAL`].
//! 3. An accept error (such as running out of file descriptors) is logged and accepting
//!    resumes after [`ACCEPT_ERROR_PAUSE`]; it never ends the server.

use std::{
    convert::Infallible,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, warn};

/// How often at most the "connection limit reached" warning is logged.
const REFUSAL_WARNING_INTERVAL: Duration = Duration::from_secs(10);
/// The pause after a failed accept (`EMFILE` and the like), so a persistent error does not
/// spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Accepted connections waiting for the server to take them.
const QUEUE: usize = 64;

/// An accepted connection holding its slot until it is dropped.
pub(super) struct Admitted {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

/// Accepts connections on `listener` until the returned stream is dropped, admitting at
/// most `max_connections` at once (rules 1–3).
pub(super) fn admit(
    listener: TcpListener,
    max_connections: usize,
) -> ReceiverStream<Result<Admitted, Infallible>> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(accept_loop(listener, max_connections, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    max_connections: usize,
    tx: mpsc::Sender<Result<Admitted, Infallible>>,
) {
    let slots = Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS)));
    let mut refused: u64 = 0;
    let mut last_warning: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = tx.closed() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "failed to accept a connection; pausing");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Rule 2: dropping the stream closes it.
            refused += 1;
            debug!(peer = ?stream.peer_addr().ok(), "connection limit reached; closing a new connection");
            if last_warning.is_none_or(|at| at.elapsed() >= REFUSAL_WARNING_INTERVAL) {
                warn!(
                    limit = max_connections,
                    refused, "connection limit reached; closing new connections until some end"
                );
                last_warning = Some(Instant::now());
                refused = 0;
            }
            continue;
        };
        // Small gRPC frames must not wait for delayed ACKs (Nagle): without this, a response
        // larger than one segment can stall for 40 ms.
        let _ = stream.set_nodelay(true);
        let admitted = Admitted {
            stream,
            _slot: slot,
        };
        if tx.send(Ok(admitted)).await.is_err() {
            return;
        }
    }
}

impl Connected for Admitted {
    // The same as a bare TcpStream's, so tonic's `peer_certs` and `remote_addr` find it.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
