//! The homelab certificate authority: creates the CA, the coordinator's serving certificate,
//! operator certificates, and signs node CSRs. Also reads identities out of peer certificates.
//!
//! Identities live in a URI subject alternative name:
//! - `homelab://node/NAME` for an agent,
//! - `homelab://operator/NAME` for an operator (the CLI).
//!
//! A CSR contributes exactly two things to a node certificate: its public key and its subject
//! common name, which must equal the node name. Every other requested attribute (SANs, key
//! usages, CA flags) is ignored; the CA decides them.

use std::{fmt, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// How long the CA is valid. Rotating it means re-enrolling every node, so it is long.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long the coordinator's serving certificate and operator certificates are valid.
pub const SERVICE_CERT_LIFETIME: Duration = Duration::from_secs(825 * 24 * 3600);
/// Default lifetime of node certificates: short, because agents renew in-band.
pub const DEFAULT_NODE_CERT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// Certificates are back-dated by this much, so a node whose clock lags a little can use a
/// certificate that was just issued.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);

const URI_NODE_PREFIX: &str = "homelab://node/";
const URI_OPERATOR_PREFIX: &str = "homelab://operator/";

/// What went wrong while creating, loading or using certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("failed to generate a key pair")]
    KeyGeneration(#[source] rcgen::Error),
    #[error("failed to sign the {what} certificate")]
    Sign {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("failed to load the CA {what}")]
    LoadCa {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("the certificate signing request is not valid PEM or DER PKCS#10")]
    CsrMalformed,
    #[error("the certificate signing request's signature does not verify")]
    CsrSignature,
    #[error("the certificate signing request uses an unsupported algorithm or extension")]
    CsrUnsupported,
    #[error(
        "the certificate signing request's subject common name {found:?} is not the node name {expected:?}"
    )]
    CsrNameMismatch { expected: String, found: String },
    #[error(
        "{0:?} is not a valid node name: use 1-63 lowercase letters, digits and '-', not starting or ending with '-'"
    )]
    InvalidNodeName(String),
    #[error("the peer certificate does not parse")]
    PeerCertMalformed,
    #[error("the peer certificate carries no homelab identity")]
    PeerNoIdentity,
    #[error("invalid subject alternative name {0:?}")]
    InvalidSan(String),
}

/// A validated node name: a DNS label, because it becomes a hostname and a K3s node name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(String);

// Hash and Eq are the inner string's, so maps keyed by NodeName can be searched by `&str`.
impl std::borrow::Borrow<str> for NodeName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl NodeName {
    /// Parses a node name: 1-63 characters of `[a-z0-9-]`, not starting or ending with `-`.
    pub fn parse(name: &str) -> Result<Self, PkiError> {
        let ok = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(PkiError::InvalidNodeName(name.to_owned()))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Who a peer certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// An agent on a node.
    Node(NodeName),
    /// An operator: the CLI or another tool holding an operator certificate.
    Operator(String),
}

/// The facts about a verified peer certificate that authorization needs.
#[derive(Debug, Clone)]
pub struct PeerCert {
    pub identity: Identity,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Expiry, seconds since the Unix epoch.
    pub not_after_unix: i64,
}

/// Reads the homelab identity, serial and expiry out of a DER certificate. The caller must
/// already have verified the chain (rustls does so during the handshake).
pub fn inspect_peer(der: &[u8]) -> Result<PeerCert, PkiError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|_| PkiError::PeerCertMalformed)?;
    let serial = hex::encode(cert.raw_serial());
    let not_after_unix = cert.validity().not_after.timestamp();
    let san = cert
        .subject_alternative_name()
        .map_err(|_| PkiError::PeerCertMalformed)?
        .ok_or(PkiError::PeerNoIdentity)?;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name {
            if let Some(node) = uri.strip_prefix(URI_NODE_PREFIX) {
                let node = NodeName::parse(node).map_err(|_| PkiError::PeerNoIdentity)?;
                return Ok(PeerCert {
                    identity: Identity::Node(node),
                    serial,
                    not_after_unix,
                });
            }
            if let Some(operator) = uri.strip_prefix(URI_OPERATOR_PREFIX) {
                return Ok(PeerCert {
                    identity: Identity::Operator(operator.to_owned()),
                    serial,
                    not_after_unix,
                });
            }
        }
    }
    Err(PkiError::PeerNoIdentity)
}

/// A certificate and its private key, both PEM.
pub struct KeyedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for KeyedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A certificate issued to a node.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// The node certificate followed by the CA certificate.
    pub chain_pem: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    pub not_after_unix: i64,
}

/// The homelab CA: its certificate and signing key.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Creates a new CA with a fresh P-256 key. Returns the CA and its key PEM for storage.
    pub fn generate(common_name: &str) -> Result<(Self, String), PkiError> {
        let key = KeyPair::generate().map_err(PkiError::KeyGeneration)?;
        let key_pem = key.serialize_pem();
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_LIFETIME);
        params.serial_number = Some(random_serial());
        let cert = params
            .self_signed(&key)
            .map_err(|source| PkiError::Sign { what: "CA", source })?;
        let ca = Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        };
        Ok((ca, key_pem))
    }

    /// Loads a CA from its certificate and key, both PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|source| PkiError::LoadCa {
            what: "key",
            source,
        })?;
        let cert_der = pem_to_der(cert_pem).ok_or(PkiError::LoadCa {
            what: "certificate",
            source: rcgen::Error::CouldNotParseCertificate,
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).map_err(|source| PkiError::LoadCa {
                what: "certificate",
                source,
            })?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            issuer,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// SHA-256 of the CA certificate's DER, lowercase hex.
    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(&self.cert_der))
    }

    /// Issues the coordinator's serving certificate for `sans` (DNS names or IP addresses).
    pub fn issue_server(&self, sans: &[String]) -> Result<KeyedCert, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name("homelab coordinator");
        for san in sans {
            params.subject_alt_names.push(parse_san(san)?);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue_with_new_key(params, SERVICE_CERT_LIFETIME, "server")
    }

    /// Issues an operator client certificate.
    pub fn issue_operator(&self, name: &str) -> Result<KeyedCert, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(&format!("operator {name}"));
        params.subject_alt_names = vec![SanType::URI(
            format!("{URI_OPERATOR_PREFIX}{name}")
                .try_into()
                .map_err(|_| PkiError::InvalidSan(name.to_owned()))?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue_with_new_key(params, SERVICE_CERT_LIFETIME, "operator")
    }

    /// Signs a node's CSR. The CSR's subject common name must be `node`; only its public key
    /// is used otherwise.
    pub fn sign_node_csr(
        &self,
        csr_pem: &str,
        node: &NodeName,
        lifetime: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| match e {
            rcgen::Error::InvalidCertificationRequestSignature => PkiError::CsrSignature,
            rcgen::Error::CouldNotParseCertificationRequest => PkiError::CsrMalformed,
            _ => PkiError::CsrUnsupported,
        })?;
        let found = match csr.params.distinguished_name.get(&DnType::CommonName) {
            Some(value) => dn_value_text(value),
            None => String::new(),
        };
        if found != node.as_str() {
            return Err(PkiError::CsrNameMismatch {
                expected: node.to_string(),
                found,
            });
        }
        let mut params = node_params(node)?;
        let serial = random_serial();
        let serial_hex = hex::encode(serial.as_ref());
        params.serial_number = Some(serial);
        let not_after = set_validity(&mut params, lifetime);
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|source| PkiError::Sign {
                what: "node",
                source,
            })?;
        Ok(IssuedCert {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            serial: serial_hex,
            not_after_unix: not_after.unix_timestamp(),
        })
    }

    /// Issues a node certificate for a key the CA generates itself. Only for tests and tools
    /// that need a certificate with a chosen validity (for example an expired one); enrollment
    /// always goes through [`Self::sign_node_csr`].
    pub fn issue_node_for_testing(
        &self,
        node: &NodeName,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<KeyedCert, PkiError> {
        let mut params = node_params(node)?;
        params.serial_number = Some(random_serial());
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate().map_err(PkiError::KeyGeneration)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Sign {
                what: "node",
                source,
            })?;
        Ok(KeyedCert {
            cert_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
        })
    }

    fn issue_with_new_key(
        &self,
        mut params: CertificateParams,
        lifetime: Duration,
        what: &'static str,
    ) -> Result<KeyedCert, PkiError> {
        let key = KeyPair::generate().map_err(PkiError::KeyGeneration)?;
        params.serial_number = Some(random_serial());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, lifetime);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Sign { what, source })?;
        Ok(KeyedCert {
            cert_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
        })
    }
}

/// What every node certificate says: the node as CN and URI SAN, client auth only.
fn node_params(node: &NodeName) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(node.as_str());
    params.subject_alt_names = vec![SanType::URI(
        format!("{URI_NODE_PREFIX}{node}")
            .try_into()
            .map_err(|_| PkiError::InvalidSan(node.to_string()))?,
    )];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "homelab");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn dn_value_text(value: &DnValue) -> String {
    match value {
        DnValue::Utf8String(s) => s.clone(),
        DnValue::PrintableString(s) => s.as_str().to_owned(),
        DnValue::Ia5String(s) => s.as_str().to_owned(),
        DnValue::TeletexString(s) => s.as_str().to_owned(),
        other => format!("{other:?}"),
    }
}

/// Sets `not_before` (back-dated by the skew allowance) and `not_after`; returns `not_after`.
fn set_validity(params: &mut CertificateParams, lifetime: Duration) -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW_ALLOWANCE;
    params.not_after = now + lifetime;
    params.not_after
}

/// A random positive serial number: 16 bytes, 126 of them random.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // no leading zero byte, so the hex form is stable
    SerialNumber::from_slice(&bytes)
}

fn parse_san(san: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = san.parse::<std::net::IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !san.is_empty()
        && san.len() <= 253
        && san.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !valid {
        return Err(PkiError::InvalidSan(san.to_owned()));
    }
    san.to_owned()
        .try_into()
        .map(SanType::DnsName)
        .map_err(|_| PkiError::InvalidSan(san.to_owned()))
}

/// The DER of the first certificate in a PEM text.
fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()
        .map(|c| c.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_for(cn: &str) -> String {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(cn);
        // A CSR asking for more than it may get: these must be ignored.
        params.subject_alt_names = vec![SanType::URI(
            "homelab://operator/evil".to_string().try_into().unwrap(),
        )];
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn node_certificate_carries_node_identity_and_ignores_requested_sans() {
        let (ca, _) = CertificateAuthority::generate("test CA").unwrap();
        let node = NodeName::parse("k3s-node-1").unwrap();
        let issued = ca
            .sign_node_csr(&csr_for("k3s-node-1"), &node, Duration::from_secs(3600))
            .unwrap();
        let leaf = pem_to_der(&issued.chain_pem).unwrap();
        let peer = inspect_peer(&leaf).unwrap();
        assert_eq!(peer.identity, Identity::Node(node));
        assert_eq!(peer.serial, issued.serial);
        assert_eq!(peer.not_after_unix, issued.not_after_unix);
    }

    #[test]
    fn csr_with_another_name_is_refused() {
        let (ca, _) = CertificateAuthority::generate("test CA").unwrap();
        let node = NodeName::parse("k3s-node-1").unwrap();
        let err = ca
            .sign_node_csr(&csr_for("k3s-node-2"), &node, Duration::from_secs(60))
            .unwrap_err();
        assert!(
            matches!(err, PkiError::CsrNameMismatch { ref found, .. } if found == "k3s-node-2"),
            "{err:?}"
        );
    }

    #[test]
    fn garbage_csr_is_malformed() {
        let (ca, _) = CertificateAuthority::generate("test CA").unwrap();
        let node = NodeName::parse("a").unwrap();
        let err = ca
            .sign_node_csr("not a csr", &node, Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(err, PkiError::CsrMalformed), "{err:?}");
    }

    #[test]
    fn ca_round_trips_through_pem() {
        let (ca, key_pem) = CertificateAuthority::generate("test CA").unwrap();
        let loaded = CertificateAuthority::from_pem(ca.cert_pem(), &key_pem).unwrap();
        assert_eq!(loaded.fingerprint(), ca.fingerprint());
        let operator = loaded.issue_operator("admin").unwrap();
        let peer = inspect_peer(&pem_to_der(&operator.cert_pem).unwrap()).unwrap();
        assert_eq!(peer.identity, Identity::Operator("admin".into()));
    }

    #[test]
    fn node_names_are_dns_labels() {
        for good in ["k3s-control", "a", "node1"] {
            NodeName::parse(good).unwrap();
        }
        for bad in ["", "-a", "a-", "UPPER", "a.b", "a/b", &"x".repeat(64)] {
            assert!(NodeName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
