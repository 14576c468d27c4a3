//! The simulator's PKI: a throw-away cluster CA and a node certificate, made at start.
//!
//! Like a fresh PVE install, the CA is named `PVE Cluster Manager CA` and the node certificate
//! carries the SANs `127.0.0.1`, `::1`, `localhost`, the node name and the listening address.
//! Clients either trust [`TlsIdentity::ca_pem`] or pin [`TlsIdentity::fingerprint`].

use std::net::IpAddr;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};
use sha2::{Digest, Sha256};

/// Generating or installing the certificates failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// rcgen refused the parameters or could not sign.
    #[error("failed to generate the {what} certificate")]
    Generate {
        /// `CA` or `node`.
        what: &'static str,
        /// The rcgen failure.
        #[source]
        source: rcgen::Error,
    },
    /// rustls rejected the generated key or protocol set.
    #[error("failed to build the TLS server configuration")]
    ServerConfig(#[source] rustls::Error),
    /// A saved certificate or key (state file) is not PEM.
    #[error("the saved {what} is not valid PEM")]
    SavedPem {
        /// `certificate` or `key`.
        what: &'static str,
    },
}

/// The certificates one simulator serves.
pub(crate) struct TlsIdentity {
    pub(crate) ca_pem: String,
    pub(crate) cert_pem: String,
    /// The node key, kept for the state file.
    pub(crate) key_pem: String,
    pub(crate) fingerprint: String,
    pub(crate) server_config: Arc<rustls::ServerConfig>,
}

impl TlsIdentity {
    /// Issues a CA and a node certificate for `node`, valid for `listen_ip` too.
    pub(crate) fn generate(node: &str, listen_ip: IpAddr) -> Result<Self, TlsSetupError> {
        let ca_err = |source| TlsSetupError::Generate { what: "CA", source };
        let ca_key = KeyPair::generate().map_err(ca_err)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(ca_err)?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Proxmox Virtual Environment");
        ca_params
            .distinguished_name
            .push(DnType::OrganizationName, "PVE Cluster Manager CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).map_err(ca_err)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_err = |source| TlsSetupError::Generate {
            what: "node",
            source,
        };
        let leaf_key = KeyPair::generate().map_err(leaf_err)?;
        let mut names = vec![
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
            "localhost".to_owned(),
            node.to_owned(),
        ];
        if !listen_ip.is_loopback() && !listen_ip.is_unspecified() {
            names.push(listen_ip.to_string());
        }
        let mut leaf_params = CertificateParams::new(Vec::<String>::new()).map_err(leaf_err)?;
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.try_into().map_err(leaf_err)?),
            };
            leaf_params.subject_alt_names.push(san);
        }
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, format!("{node}.pve-sim.invalid"));
        leaf_params
            .distinguished_name
            .push(DnType::OrganizationName, "PVE Cluster Node");
        leaf_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_cert = leaf_params
            .signed_by(&leaf_key, &issuer)
            .map_err(leaf_err)?;

        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        Self::serve(
            ca_cert.pem(),
            leaf_cert.pem(),
            leaf_key.serialize_pem(),
            CertificateDer::from(leaf_cert.der().to_vec()),
            key_der,
        )
    }

    /// The identity a state file kept: the same certificate and fingerprint as before.
    pub(crate) fn from_saved(saved: &crate::persist::SavedTls) -> Result<Self, TlsSetupError> {
        let cert = CertificateDer::from_pem_slice(saved.cert_pem.as_bytes()).map_err(|_| {
            TlsSetupError::SavedPem {
                what: "certificate",
            }
        })?;
        let key = PrivateKeyDer::from_pem_slice(saved.key_pem.as_bytes())
            .map_err(|_| TlsSetupError::SavedPem { what: "key" })?;
        Self::serve(
            saved.ca_pem.clone(),
            saved.cert_pem.clone(),
            saved.key_pem.clone(),
            cert,
            key,
        )
    }

    /// The identity as a state file keeps it.
    pub(crate) fn saved(&self) -> crate::persist::SavedTls {
        crate::persist::SavedTls {
            ca_pem: self.ca_pem.clone(),
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
        }
    }

    fn serve(
        ca_pem: String,
        cert_pem: String,
        key_pem: String,
        cert: CertificateDer<'static>,
        key_der: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsSetupError> {
        let fingerprint = fingerprint_of(&cert);
        #[expect(
            deprecated,
            reason = "ring is the workspace's one provider; it lacks post-quantum key exchange"
        )]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server_config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsSetupError::ServerConfig)?
            .with_no_client_auth()
            // PVE serves the node certificate alone; clients bring the CA.
            .with_single_cert(vec![cert], key_der)
            .map_err(TlsSetupError::ServerConfig)?;
        server_config.alpn_protocols = vec![b"http/1.1".to_vec()];

        Ok(Self {
            ca_pem,
            cert_pem,
            key_pem,
            fingerprint,
            server_config: Arc::new(server_config),
        })
    }
}

/// `AA:BB:…`: the upper-case, colon-separated SHA-256 of a DER certificate.
pub(crate) fn fingerprint_of(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_32_colon_separated_upper_hex_bytes() {
        let id = TlsIdentity::generate("pve", "127.0.0.1".parse().unwrap()).unwrap();
        let parts: Vec<&str> = id.fingerprint.split(':').collect();
        assert_eq!(parts.len(), 32);
        assert!(parts.iter().all(|p| {
            p.len() == 2
                && p.chars()
                    .all(|c| c.is_ascii_digit() || ('A'..='F').contains(&c))
        }));
        assert!(id.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    }
}
