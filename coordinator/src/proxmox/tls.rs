//! Trusting the Proxmox host: its CA, or the SHA-256 fingerprint of its certificate. With
//! neither, no connection is trusted, and the fingerprint that was seen is reported so the
//! operator can check it and pin it.

use std::sync::{Arc, Mutex};

use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use sha2::{Digest, Sha256};

use super::ProxmoxError;

/// How the host's certificate is trusted.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Certificates chaining to this CA (PEM), for the host name or IP in the URL.
    Ca(String),
    /// Exactly the certificate with this SHA-256 fingerprint.
    Fingerprint([u8; 32]),
    /// Nothing: every connection fails, reporting the fingerprint seen.
    Unconfigured,
}

/// Formats a fingerprint as `AA:BB:…`.
pub fn format_fingerprint(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Where the verifier leaves the fingerprint of a certificate it rejected.
pub(super) type RejectedSlot = Arc<Mutex<Option<String>>>;

/// A rustls client configuration for `trust`, and the slot where the verifier records the
/// fingerprint of a certificate it rejected.
pub(super) fn client_config(
    trust: &Trust,
) -> Result<(rustls::ClientConfig, RejectedSlot), ProxmoxError> {
    let provider = Arc::new(ring_provider());
    let rejected = Arc::new(Mutex::new(None));
    let mode = match trust {
        Trust::Ca(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = pem_certificates(pem);
            if certs.is_empty() {
                return Err(ProxmoxError::Setup(
                    "proxmox.ca_file holds no PEM certificate".into(),
                ));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| ProxmoxError::Setup(format!("proxmox.ca_file: {e}")))?;
            }
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| ProxmoxError::Setup(format!("proxmox.ca_file: {e}")))?;
            Mode::Ca(webpki)
        }
        Trust::Fingerprint(pin) => Mode::Pin(*pin),
        Trust::Unconfigured => Mode::Refuse,
    };
    let verifier = Verifier {
        mode,
        algorithms: provider.signature_verification_algorithms,
        rejected: rejected.clone(),
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ProxmoxError::Setup(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok((config, rejected))
}

fn pem_certificates(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

#[derive(Debug)]
enum Mode {
    Ca(Arc<WebPkiServerVerifier>),
    Pin([u8; 32]),
    Refuse,
}

#[derive(Debug)]
struct Verifier {
    mode: Mode,
    algorithms: WebPkiSupportedAlgorithms,
    rejected: Arc<Mutex<Option<String>>>,
}

impl Verifier {
    fn reject(&self, fingerprint: String, error: rustls::Error) -> rustls::Error {
        *self.rejected.lock().unwrap_or_else(|e| e.into_inner()) = Some(fingerprint);
        error
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        let fingerprint = format_fingerprint(&digest);
        match &self.mode {
            Mode::Ca(webpki) => webpki
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .map_err(|e| self.reject(fingerprint, e)),
            Mode::Pin(pin) if *pin == digest => Ok(ServerCertVerified::assertion()),
            Mode::Pin(_) => Err(self.reject(
                fingerprint,
                rustls::Error::General(
                    "certificate fingerprint does not match proxmox.fingerprint".into(),
                ),
            )),
            Mode::Refuse => Err(self.reject(
                fingerprint,
                rustls::Error::General("no trust configured for the Proxmox host".into()),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The ring crypto provider: the one provider in this build (tonic's TLS uses it too), so no
/// aws-lc toolchain is needed. rustls 0.23.48 deprecates it for lacking post-quantum key
/// exchange, which a LAN management API can do without for now.
#[allow(deprecated)] // Reason: see above; revisit when tonic moves off ring.
fn ring_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}
