//! Downloads install.sh over HTTP(S) with the hyper and rustls the agent already carries for
//! gRPC. A general HTTP client (reqwest) would add about 1.5 MB to a binary that ships in
//! every seed ISO, for one GET.
//!
//! Rules:
//! 1. One `GET` per URL, HTTP/1.1 with `Connection: close`; up to [`MAX_REDIRECTS`] redirects
//!    are followed, never from https to http.
//! 2. https verifies the server, by the URL's host name, against the PEM roots of the
//!    configured bundle only (ring provider, as for the coordinator link).
//! 3. The whole download, redirects included, is bounded by one timeout, and the body by a
//!    size limit.

use std::{path::Path, sync::Arc, time::Duration};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::{
    StatusCode, Uri,
    body::{Bytes, Incoming},
    header,
};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

/// Redirects followed before giving up.
pub const MAX_REDIRECTS: usize = 5;

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url} is not an http or https URL with a host")]
    BadUrl { url: String },
    #[error("no CA bundle to verify {url} with; set installer_ca_bundle")]
    NoRoots {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA bundle {path} holds no usable certificate")]
    BadRoots { path: String },
    #[error("failed to connect to {url}")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS setup for {url} failed")]
    Tls {
        url: String,
        #[source]
        source: rustls::Error,
    },
    #[error("HTTP exchange with {url} failed")]
    Http {
        url: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url} redirects to {location:?}, which is not followed")]
    BadRedirect { url: String, location: String },
    #[error("{url} redirected more than {MAX_REDIRECTS} times")]
    TooManyRedirects { url: String },
    #[error("the body from {url} is larger than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("reading the body from {url} failed: {detail}")]
    Body { url: String, detail: String },
    #[error("downloading {url} took longer than {timeout:?}")]
    Timeout { url: String, timeout: Duration },
}

impl FetchError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. }
                | Self::Http { .. }
                | Self::Status { .. }
                | Self::Body { .. }
                | Self::Timeout { .. }
        )
    }
}

/// `GET url`: the body, at most `limit` bytes, within `timeout`. https trusts the roots in
/// `ca_bundle`.
pub async fn get(
    url: &str,
    ca_bundle: Option<&Path>,
    timeout: Duration,
    limit: usize,
) -> Result<Vec<u8>, FetchError> {
    tokio::time::timeout(timeout, follow(url, ca_bundle, limit))
        .await
        .map_err(|_| FetchError::Timeout {
            url: url.to_owned(),
            timeout,
        })?
}

async fn follow(url: &str, ca_bundle: Option<&Path>, limit: usize) -> Result<Vec<u8>, FetchError> {
    let mut current = url.to_owned();
    for _ in 0..=MAX_REDIRECTS {
        let uri = parse(&current)?;
        let response = request(&current, &uri, ca_bundle).await?;
        let status = response.status();
        if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
            let location = response
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            current = redirect(&current, &uri, &location)?;
            continue;
        }
        if !status.is_success() {
            return Err(FetchError::Status {
                url: current,
                status: status.as_u16(),
            });
        }
        return match Limited::new(response.into_body(), limit).collect().await {
            Ok(body) => Ok(body.to_bytes().to_vec()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(FetchError::TooLarge {
                url: current,
                limit,
            }),
            Err(e) => Err(FetchError::Body {
                url: current,
                detail: e.to_string(),
            }),
        };
    }
    Err(FetchError::TooManyRedirects {
        url: url.to_owned(),
    })
}

fn parse(url: &str) -> Result<Uri, FetchError> {
    let bad = || FetchError::BadUrl {
        url: url.to_owned(),
    };
    let uri: Uri = url.parse().map_err(|_| bad())?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(host)) if !host.is_empty() => Ok(uri),
        _ => Err(bad()),
    }
}

/// The absolute URL a `Location` points to; https is never downgraded.
fn redirect(from: &str, uri: &Uri, location: &str) -> Result<String, FetchError> {
    let refused = || FetchError::BadRedirect {
        url: from.to_owned(),
        location: location.to_owned(),
    };
    let target = if location.starts_with('/') && !location.starts_with("//") {
        let authority = uri.authority().ok_or_else(refused)?;
        format!(
            "{}://{authority}{location}",
            uri.scheme_str().unwrap_or("http")
        )
    } else {
        location.to_owned()
    };
    let next = parse(&target).map_err(|_| refused())?;
    if uri.scheme_str() == Some("https") && next.scheme_str() != Some("https") {
        return Err(refused());
    }
    Ok(target)
}

async fn request(
    url: &str,
    uri: &Uri,
    ca_bundle: Option<&Path>,
) -> Result<hyper::Response<Incoming>, FetchError> {
    let https = uri.scheme_str() == Some("https");
    // Invariant: `parse` accepted only URIs with a host.
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tls = if https {
        let name = ServerName::try_from(host.clone()).map_err(|_| FetchError::BadUrl {
            url: url.to_owned(),
        })?;
        Some((tls_config(url, ca_bundle)?, name))
    } else {
        None
    };
    let connect_error = |source| FetchError::Connect {
        url: url.to_owned(),
        source,
    };
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(connect_error)?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = hyper::Request::get(path)
        .header(
            header::HOST,
            uri.authority().map_or(host.as_str(), |a| a.as_str()),
        )
        .header(
            header::USER_AGENT,
            concat!("homelab-agent/", env!("CARGO_PKG_VERSION")),
        )
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|_| FetchError::BadUrl {
            url: url.to_owned(),
        })?;
    // One stream type for both schemes, so hyper's HTTP/1 client is compiled once.
    let stream: Box<dyn Stream> = match tls {
        None => Box::new(tcp),
        Some((config, name)) => Box::new(
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(connect_error)?,
        ),
    };
    exchange(url, TokioIo::new(stream), request).await
}

/// A plain or TLS connection.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn exchange(
    url: &str,
    io: TokioIo<Box<dyn Stream>>,
    request: hyper::Request<Empty<Bytes>>,
) -> Result<hyper::Response<Incoming>, FetchError> {
    let http_error = |source| FetchError::Http {
        url: url.to_owned(),
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(http_error)?;
    // The connection ends with the response (Connection: close), or when `get` times out and
    // drops the body, which closes it.
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            log::debug!("installer download connection: {e}");
        }
    });
    sender.send_request(request).await.map_err(http_error)
}

fn tls_config(url: &str, ca_bundle: Option<&Path>) -> Result<rustls::ClientConfig, FetchError> {
    let path = ca_bundle.ok_or_else(|| FetchError::NoRoots {
        url: url.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no CA bundle configured"),
    })?;
    let pem = std::fs::read(path).map_err(|source| FetchError::NoRoots {
        url: url.to_owned(),
        source,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots
        .add_parsable_certificates(CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok));
    if added == 0 {
        return Err(FetchError::BadRoots {
            path: path.display().to_string(),
        });
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(Arc::new(ring_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|source| FetchError::Tls {
                url: url.to_owned(),
                source,
            })?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// The ring provider, the one tonic's TLS (the coordinator link) uses, so the binary carries
/// one crypto provider. rustls 0.23.48 deprecates it for lacking post-quantum key exchange,
/// which fetching a public shell script can do without.
#[expect(deprecated, reason = "see above; revisit when tonic moves off ring")]
fn ring_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// Answers each connection with the next canned response (`{addr}` is replaced).
    async fn serve(responses: Vec<String>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let base = format!("http://{addr}");
        tokio::spawn(async move {
            for response in responses {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&request);
                assert!(text.starts_with("GET /"), "{text}");
                assert!(text.contains("connection: close"), "{text}");
                let response = response.replace("{addr}", &addr);
                stream.write_all(response.as_bytes()).await.unwrap();
            }
        });
        base
    }

    const TIMEOUT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn a_body_is_fetched_through_a_redirect_and_chunked_encoding() {
        let base = serve(vec![
            "HTTP/1.1 302 Found\r\nLocation: /real.sh\r\nContent-Length: 0\r\n\r\n".into(),
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n#!/bi\r\n3\r\nn/s\r\n1\r\nh\r\n0\r\n\r\n".into(),
        ])
        .await;
        let body = get(&format!("{base}/install.sh"), None, TIMEOUT, 1024)
            .await
            .unwrap();
        assert_eq!(body, b"#!/bin/sh");
    }

    #[tokio::test]
    async fn errors_name_the_status_the_size_and_the_url() {
        let base = serve(vec![
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".into(),
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: 2048\r\n\r\n{}",
                "x".repeat(2048)
            ),
        ])
        .await;
        let url = format!("{base}/install.sh");
        let err = get(&url, None, TIMEOUT, 1024).await.unwrap_err();
        assert!(
            matches!(err, FetchError::Status { status: 404, .. }),
            "{err}"
        );
        assert!(err.to_string().contains(&url), "{err}");
        let err = get(&url, None, TIMEOUT, 1024).await.unwrap_err();
        assert!(
            matches!(err, FetchError::TooLarge { limit: 1024, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/install.sh", listener.local_addr().unwrap());
        let err = get(&url, None, Duration::from_millis(100), 1024)
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Timeout { .. }), "{err}");
        drop(listener);
    }

    #[test]
    fn redirects_never_leave_https_for_http() {
        let uri: Uri = "https://get.k3s.io/".parse().unwrap();
        assert!(redirect("https://get.k3s.io/", &uri, "http://evil.example/x").is_err());
        assert_eq!(
            redirect("https://get.k3s.io/", &uri, "/install.sh").unwrap(),
            "https://get.k3s.io/install.sh"
        );
        assert!(parse("ftp://x/y").is_err() && parse("https:///y").is_err());
    }

    #[tokio::test]
    async fn https_verifies_the_server_against_the_bundle() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

        // A CA, and a server certificate for 127.0.0.1 signed by it.
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate().unwrap();
        let server_cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(ring_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![server_cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}/install.sh", listener.local_addr().unwrap());
        tokio::spawn(async move {
            // Two connections: the trusted fetch, then the one refused by an unrelated CA.
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut stream) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n#!/bin/sh")
                    .await;
                let _ = stream.shutdown().await;
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("ca.pem");
        std::fs::write(&bundle, ca_cert.pem()).unwrap();
        let body = get(&url, Some(&bundle), TIMEOUT, 1024).await.unwrap();
        assert_eq!(body, b"#!/bin/sh");

        let other_key = KeyPair::generate().unwrap();
        let mut other = CertificateParams::new(Vec::new()).unwrap();
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        std::fs::write(&bundle, other.self_signed(&other_key).unwrap().pem()).unwrap();
        let err = get(&url, Some(&bundle), TIMEOUT, 1024).await.unwrap_err();
        assert!(matches!(err, FetchError::Connect { .. }), "{err}");
        let chain = crate::chain(&err);
        assert!(chain.contains("certificate"), "{chain}");
    }

    #[tokio::test]
    async fn https_without_a_usable_bundle_is_refused_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("ca.pem");
        std::fs::write(&bundle, "not a certificate").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}/install.sh", listener.local_addr().unwrap());
        let err = get(&url, Some(&bundle), TIMEOUT, 1024).await.unwrap_err();
        assert!(matches!(err, FetchError::BadRoots { .. }), "{err}");
    }
}
