//! Bad input on the gRPC port of an in-process coordinator (127.0.0.1:0): random bytes
//! instead of or before a TLS ClientHello, garbage after a completed handshake, oversized
//! HTTP/2 frames and gRPC messages, half-open and slow connections, and the connection
//! limit. Each test checks what the server does with the bad connection and that a good
//! client is still served afterwards. Random input comes from a seeded generator, so a
//! failure names the seed that reproduces it.

mod common;

use std::{sync::Arc, time::Duration};

use common::InProcess;
use homelab::core::Settings;
use homelab_proto::v1::{
    self as pb, AgentMessage, EnrollRequest, ListNodesRequest, agent_link_client::AgentLinkClient,
    agent_message::Body as Up, coordinator_message::Body as Down,
    enrollment_client::EnrollmentClient, status_client::StatusClient,
};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
    task::JoinSet,
    time::{Instant, timeout},
};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(10);
/// The HTTP/2 connection preface every client sends first.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A small seeded generator (SplitMix64): the same seed gives the same bytes everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> usize {
        usize::try_from(self.next() % n).unwrap()
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// A TLS client configuration trusting the homelab CA, with no client certificate.
fn client_config(c: &InProcess) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(c.ca_pem().as_bytes()).unwrap())
        .unwrap();
    rustls::ClientConfig::builder_with_provider(Arc::new(ring_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// ring, the one provider in this build, as in `coordinator/src/proxmox/tls.rs`.
#[allow(deprecated)] // Reason: rustls 0.23.48 deprecates it for lacking post-quantum key exchange.
fn ring_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// A raw TLS client trusting the homelab CA, offering `h2` as gRPC clients do, with no
/// client certificate.
fn tls_connector(c: &InProcess) -> TlsConnector {
    let mut config = client_config(c);
    config.alpn_protocols = vec![b"h2".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// A completed TLS handshake with the coordinator.
async fn tls(c: &InProcess) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(c.address).await.unwrap();
    timeout(
        WAIT,
        tls_connector(c).connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .expect("handshake in time")
    .expect("handshake succeeds")
}

/// The bytes of a real ClientHello for the coordinator.
fn client_hello(c: &InProcess) -> Vec<u8> {
    let config = client_config(c);
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    assert_eq!(hello[0], 0x16, "a TLS handshake record");
    hello
}

/// Reads until the server closes the connection (end of stream or reset) and returns what
/// it sent; panics naming `what` if that takes longer than `limit`.
async fn read_until_closed(
    stream: &mut (impl AsyncRead + Unpin),
    limit: Duration,
    what: &str,
) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: the server kept the connection open past {limit:?}"));
    seen
}

/// A fresh operator connection completes a call within [`WAIT`].
async fn assert_serving(c: &InProcess) {
    let channel = timeout(WAIT, c.operator_channel())
        .await
        .expect("a good client connects in time");
    timeout(
        WAIT,
        StatusClient::new(channel).list_nodes(ListNodesRequest {}),
    )
    .await
    .expect("a good client is answered in time")
    .expect("a good client is served");
}

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

/// Splits bytes a server sent into HTTP/2 frames: (type, flags, stream, payload). The first
/// bytes must be frames; a cut-off last frame is dropped.
fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= 9 {
        let len = usize::try_from(u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]])).unwrap();
        if bytes.len() < 9 + len {
            break;
        }
        let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff;
        out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
        bytes = &bytes[9 + len..];
    }
    out
}

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

/// A HEADERS block for a gRPC call to `path`: literal fields, no Huffman, no indexing.
fn grpc_headers(path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "https"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        block.push(0x00);
        block.push(u8::try_from(name.len()).unwrap());
        block.extend(name.as_bytes());
        block.push(u8::try_from(value.len()).unwrap());
        block.extend(value.as_bytes());
    }
    block
}

#[tokio::test]
async fn random_bytes_instead_of_a_client_hello_are_dropped() {
    let c = InProcess::start(Settings {
        tls_handshake_timeout: Duration::from_secs(1),
        ..Settings::default()
    })
    .await;
    // All at once: the ones that look like a record wait out the handshake timeout.
    let mut closed = JoinSet::new();
    for seed in 0..32u64 {
        let mut rng = Rng(seed);
        let len = 1 + rng.below(8192);
        let mut garbage = rng.bytes(len);
        if seed % 2 == 0 {
            // Half of them look like the start of a TLS handshake record, to get past the
            // first check into the record and handshake parsers.
            let declared = u16::try_from(rng.below(1 << 14)).unwrap();
            let header = [0x16, 0x03, 0x01, (declared >> 8) as u8, declared as u8];
            garbage.splice(0..0, header);
        }
        let mut raw = TcpStream::connect(c.address).await.unwrap();
        closed.spawn(async move {
            let _ = raw.write_all(&garbage).await;
            read_until_closed(&mut raw, WAIT, &format!("seed {seed}")).await;
        });
    }
    while let Some(done) = closed.join_next().await {
        done.unwrap();
    }
    assert_serving(&c).await;
    assert!(c.core.store().integrity_check().unwrap().is_empty());
    c.stop().await;
}

#[tokio::test]
async fn random_bytes_before_a_client_hello_fail_the_handshake() {
    let c = InProcess::start(Settings {
        tls_handshake_timeout: Duration::from_secs(1),
        ..Settings::default()
    })
    .await;
    let connector = tls_connector(&c);
    let mut failed = JoinSet::new();
    for seed in 100..116u64 {
        let mut rng = Rng(seed);
        let len = 1 + rng.below(512);
        let mut raw = TcpStream::connect(c.address).await.unwrap();
        let connector = connector.clone();
        failed.spawn(async move {
            raw.write_all(&rng.bytes(len)).await.unwrap();
            let handshake = timeout(
                WAIT,
                connector.connect(ServerName::try_from("localhost").unwrap(), raw),
            )
            .await
            .unwrap_or_else(|_| panic!("seed {seed}: the handshake neither failed nor completed"));
            assert!(
                handshake.is_err(),
                "seed {seed}: a handshake after garbage must fail"
            );
        });
    }
    while let Some(done) = failed.join_next().await {
        done.unwrap();
    }
    assert_serving(&c).await;
    c.stop().await;
}

#[tokio::test]
async fn garbage_after_the_handshake_closes_the_connection() {
    let c = InProcess::start(Settings::default()).await;
    for seed in 200..216u64 {
        let mut rng = Rng(seed);
        let mut stream = tls(&c).await;
        let len = 1 + rng.below(4096);
        let mut garbage = rng.bytes(len);
        if seed % 2 == 0 {
            // A valid preface, then garbage where frames should be.
            garbage.splice(0..0, PREFACE.iter().copied());
        }
        let _ = stream.write_all(&garbage).await;
        let _ = stream.flush().await;
        read_until_closed(&mut stream, WAIT, &format!("seed {seed}")).await;
    }
    assert_serving(&c).await;
    c.stop().await;
}

#[tokio::test]
async fn an_oversized_http2_frame_ends_the_connection_with_frame_size_error() {
    let c = InProcess::start(Settings::default()).await;
    let mut stream = tls(&c).await;
    stream.write_all(PREFACE).await.unwrap();
    stream.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    stream
        .write_all(&frame(
            HEADERS,
            END_HEADERS,
            1,
            &grpc_headers("/homelab.v1.Enrollment/Enroll"),
        ))
        .await
        .unwrap();
    // A DATA frame far over the default SETTINGS_MAX_FRAME_SIZE (16 KiB).
    let payload = Rng(300).bytes(1 << 20);
    let _ = stream.write_all(&frame(DATA, 0, 1, &payload)).await;
    let _ = stream.flush().await;
    let seen = read_until_closed(&mut stream, WAIT, "oversized frame").await;
    let goaway = frames(&seen)
        .into_iter()
        .find(|f| f.0 == GOAWAY)
        .expect("the server sends GOAWAY before closing");
    // Error code FRAME_SIZE_ERROR (0x6), after the last stream id.
    assert_eq!(goaway.3[4..8], [0, 0, 0, 6], "{goaway:?}");
    assert_serving(&c).await;
    c.stop().await;
}

#[tokio::test]
async fn a_grpc_message_declaring_4_gib_is_refused_without_waiting_for_it() {
    let c = InProcess::start(Settings::default()).await;
    let mut stream = tls(&c).await;
    stream.write_all(PREFACE).await.unwrap();
    stream.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    stream
        .write_all(&frame(
            HEADERS,
            END_HEADERS,
            1,
            &grpc_headers("/homelab.v1.Enrollment/Enroll"),
        ))
        .await
        .unwrap();
    // Uncompressed, length 0xFFFFFFFF, followed by a few bytes of the promised 4 GiB.
    let mut message = vec![0, 0xff, 0xff, 0xff, 0xff];
    message.extend(Rng(400).bytes(64));
    stream
        .write_all(&frame(DATA, 0, 1, &message))
        .await
        .unwrap();
    stream.flush().await.unwrap();
    // The server ends the call on the declared length alone; then it answers a ping, so the
    // connection is still good.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let mut pinged = false;
    timeout(WAIT, async {
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "the server closed the connection");
            seen.extend_from_slice(&buf[..n]);
            let parsed = frames(&seen);
            let ended = parsed.iter().any(|(kind, flags, id, _)| {
                *id == 1 && (*kind == RST_STREAM || (*kind == HEADERS && flags & END_STREAM != 0))
            });
            if ended && !pinged {
                stream
                    .write_all(&frame(PING, 0, 0, b"homelab!"))
                    .await
                    .unwrap();
                pinged = true;
            }
            if parsed.iter().any(|(kind, flags, _, payload)| {
                *kind == PING && flags & ACK != 0 && payload == b"homelab!"
            }) {
                break;
            }
        }
    })
    .await
    .expect("the call ends and the connection answers a ping in time");
    drop(stream);
    assert_serving(&c).await;
    c.stop().await;
}

#[tokio::test]
async fn an_oversized_message_on_an_open_link_ends_only_that_link() {
    let c = InProcess::start(Settings::default()).await;
    let token = c.token("k3s-node-1", 3600);
    let (key, csr) = common::key_and_csr("k3s-node-1");
    let chain = EnrollmentClient::new(c.channel(None).await.unwrap())
        .enroll(EnrollRequest {
            token,
            node_name: "k3s-node-1".into(),
            csr_pem: csr,
            facts: None,
        })
        .await
        .unwrap()
        .into_inner()
        .certificate_chain_pem;
    let open = || async {
        let channel = c.channel(Some((&chain, &key))).await.unwrap();
        let (tx, rx) = mpsc::channel(4);
        tx.send(AgentMessage {
            body: Some(Up::Hello(pb::Hello::default())),
        })
        .await
        .unwrap();
        let mut down = AgentLinkClient::new(channel)
            .connect(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let first = timeout(WAIT, down.message()).await.unwrap().unwrap();
        assert!(matches!(first.and_then(|m| m.body), Some(Down::Welcome(_))));
        (tx, down)
    };
    let (tx, mut down) = open().await;
    tx.send(AgentMessage {
        body: Some(Up::Renew(pb::RenewRequest {
            csr_pem: "x".repeat(homelab::grpc::MAX_MESSAGE_BYTES + 1),
        })),
    })
    .await
    .unwrap();
    let ended = timeout(WAIT, async {
        loop {
            match down.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await
    .expect("the link ends in time")
    .expect("the link ends with a status");
    // tonic reports a message over the decoding limit as OUT_OF_RANGE (gRPC's own
    // implementations say RESOURCE_EXHAUSTED); the link handler passes it on and records it.
    assert_eq!(ended.code(), Code::OutOfRange, "{ended:?}");
    assert!(ended.message().contains("65536"), "{ended:?}");
    assert!(
        c.event_kinds("k3s-node-1")
            .contains(&"node.bad_message".to_owned())
    );
    // The node links again at once, and everyone else is served.
    let _again = open().await;
    assert_serving(&c).await;
    c.stop().await;
}

#[tokio::test]
async fn half_open_connections_do_not_starve_good_clients() {
    let c = InProcess::start(Settings::default()).await;
    let hello = client_hello(&c);
    let mut idle = Vec::new();
    for i in 0..200 {
        let mut raw = TcpStream::connect(c.address).await.unwrap();
        if i % 2 == 1 {
            // Half a ClientHello, then nothing: a slow or stalled client.
            raw.write_all(&hello[..hello.len() / 2]).await.unwrap();
        }
        idle.push(raw);
    }
    let started = Instant::now();
    for _ in 0..5 {
        assert_serving(&c).await;
    }
    // Five fresh connections and calls well inside the 10 s handshake timeout: the stalled
    // handshakes did not hold anyone up.
    assert!(
        started.elapsed() < WAIT,
        "good clients took {:?}",
        started.elapsed()
    );
    drop(idle);
    c.stop().await;
}

#[tokio::test]
async fn stalled_handshakes_are_closed_after_the_handshake_timeout() {
    let timeout_setting = Duration::from_millis(200);
    let c = InProcess::start(Settings {
        tls_handshake_timeout: timeout_setting,
        ..Settings::default()
    })
    .await;
    let hello = client_hello(&c);
    let mut waits = JoinSet::new();
    for i in 0..100 {
        let connected = Instant::now();
        let mut raw = TcpStream::connect(c.address).await.unwrap();
        if i % 2 == 1 {
            raw.write_all(&hello[..hello.len() / 2]).await.unwrap();
        }
        waits.spawn(async move {
            read_until_closed(&mut raw, WAIT, &format!("stalled connection {i}")).await;
            connected.elapsed()
        });
    }
    while let Some(waited) = waits.join_next().await {
        let waited = waited.unwrap();
        assert!(
            waited >= timeout_setting,
            "closed after {waited:?}, before the {timeout_setting:?} handshake timeout"
        );
    }
    assert_serving(&c).await;
    c.stop().await;
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_until_slots_free_up() {
    let limit = 8;
    let c = InProcess::start(Settings {
        max_connections: limit,
        // Far beyond every wait below: a connection closed here was refused, not timed out.
        tls_handshake_timeout: Duration::from_secs(120),
        ..Settings::default()
    })
    .await;
    // One good client holds a slot with an established connection.
    let operator = StatusClient::new(c.operator_channel().await);
    // The other slots are taken by connections that never say anything.
    let mut idle = Vec::new();
    for _ in 1..limit {
        idle.push(TcpStream::connect(c.address).await.unwrap());
    }
    // Connections are accepted in order, so this one comes after every slot is taken.
    let mut excess = TcpStream::connect(c.address).await.unwrap();
    let started = Instant::now();
    read_until_closed(&mut excess, WAIT, "a connection over the limit").await;
    assert!(started.elapsed() < WAIT);
    // A new client is refused, quickly.
    let refused = timeout(WAIT, c.channel(None))
        .await
        .expect("a refused client fails in time");
    assert!(refused.is_err(), "a client over the limit must not connect");
    // The established connection keeps working.
    let mut operator_again = operator.clone();
    timeout(WAIT, operator_again.list_nodes(ListNodesRequest {}))
        .await
        .unwrap()
        .unwrap();
    // Once the idle connections go, new clients are served again.
    drop(idle);
    let deadline = Instant::now() + WAIT;
    loop {
        let attempt = timeout(Duration::from_secs(2), async {
            let channel = c.channel(None).await.ok()?;
            StatusClient::new(channel)
                .list_nodes(ListNodesRequest {})
                .await
                .err()
        })
        .await;
        // Without a client certificate the call is refused as UNAUTHENTICATED: that answer
        // proves the connection was admitted and served.
        if let Ok(Some(status)) = attempt {
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new client was admitted after the slots were freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_serving(&c).await;
    c.stop().await;
}
