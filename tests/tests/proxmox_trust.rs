//! Trusting the Proxmox host: with neither a CA nor a fingerprint the client refuses and
//! reports the fingerprint it saw; a wrong pin is refused the same way; the right pin passes
//! the handshake. Any TLS server will do as the far end: the coordinator's own port.

mod common;

use base64::Engine as _;
use common::InProcess;
use homelab::{
    core::Settings,
    proxmox::{Auth, Client, ClientConfig, ProxmoxError, Secret, Trust, tls::format_fingerprint},
};
use sha2::{Digest, Sha256};

fn server_fingerprint(c: &InProcess) -> [u8; 32] {
    let pem = std::fs::read_to_string(c.state.server_cert()).unwrap();
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    Sha256::digest(der).into()
}

fn client(c: &InProcess, trust: Trust) -> Client {
    let mut config = ClientConfig::new(
        format!("https://{}", c.address),
        Auth::Token {
            id: "homelab@pve!coordinator".into(),
            secret: Secret::new("not-used"),
        },
        trust,
    );
    config.retry.attempts = 1;
    Client::new(config).unwrap()
}

#[tokio::test]
async fn without_trust_the_client_refuses_and_names_the_fingerprint() {
    let c = InProcess::start(Settings::default()).await;
    let expected = format_fingerprint(&server_fingerprint(&c));
    let err = client(&c, Trust::Unconfigured).version().await.unwrap_err();
    match &err {
        ProxmoxError::Untrusted { seen } => assert_eq!(seen, &expected),
        other => panic!("expected Untrusted, got {other:?}"),
    }
    assert!(err.to_string().contains(&expected), "{err}");
    assert!(err.to_string().contains("proxmox.fingerprint"), "{err}");
    c.stop().await;
}

#[tokio::test]
async fn a_wrong_pin_is_refused_and_the_right_pin_passes_the_handshake() {
    let c = InProcess::start(Settings::default()).await;
    let right = server_fingerprint(&c);
    let mut wrong = right;
    wrong[0] ^= 0xff;
    let err = client(&c, Trust::Fingerprint(wrong))
        .version()
        .await
        .unwrap_err();
    assert!(matches!(err, ProxmoxError::Untrusted { .. }), "{err:?}");
    // The coordinator speaks gRPC, not the Proxmox API: the call fails, but after TLS.
    let err = client(&c, Trust::Fingerprint(right))
        .version()
        .await
        .unwrap_err();
    assert!(!matches!(err, ProxmoxError::Untrusted { .. }), "{err:?}");
    c.stop().await;
}

#[tokio::test]
async fn the_ca_trusts_certificates_for_the_right_name() {
    let c = InProcess::start(Settings::default()).await;
    let ca = std::fs::read_to_string(c.state.ca_cert()).unwrap();
    let err = client(&c, Trust::Ca(ca)).version().await.unwrap_err();
    assert!(!matches!(err, ProxmoxError::Untrusted { .. }), "{err:?}");
    let (foreign, _) = homelab::pki::CertificateAuthority::generate("other").unwrap();
    let err = client(&c, Trust::Ca(foreign.cert_pem().to_owned()))
        .version()
        .await
        .unwrap_err();
    assert!(matches!(err, ProxmoxError::Untrusted { .. }), "{err:?}");
    c.stop().await;
}
