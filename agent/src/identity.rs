//! The node's identity: a private key generated here (it never leaves the node) and the
//! certificate chain the coordinator signed for it.
//!
//! Both live in one file, `identity.pem` (0600) in the state directory, replaced atomically,
//! so a crash can never pair a new key with an old certificate. A first line
//! `# issued-at-unix: N` records when the certificate arrived; renewal is scheduled from it.

use std::{
    fmt, fs,
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use x509_parser::prelude::{FromDer, X509Certificate};

/// What went wrong with the node identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("failed to create the state directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds no usable certificate and key; delete it and enroll again")]
    Corrupt { path: PathBuf },
    #[error("failed to generate a key pair or CSR")]
    Generate(#[source] rcgen::Error),
    #[error("the coordinator returned a certificate that does not parse")]
    BadCertificate,
}

/// A private key that is not yet certified, with its CSR.
pub struct PendingKey {
    key_pem: String,
    /// The PKCS#10 request to send to the coordinator.
    pub csr_pem: String,
}

impl fmt::Debug for PendingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PendingKey { .. }")
    }
}

impl PendingKey {
    /// Generates a P-256 key and a CSR whose subject common name is `node`.
    pub fn generate(node: &str) -> Result<Self, IdentityError> {
        let key = KeyPair::generate().map_err(IdentityError::Generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node);
        params.distinguished_name = dn;
        let csr = params
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .map_err(IdentityError::Generate)?;
        Ok(Self {
            key_pem: key.serialize_pem(),
            csr_pem: csr,
        })
    }
}

/// A certified identity.
#[derive(Clone)]
pub struct Identity {
    /// The node certificate, then the CA.
    pub chain_pem: String,
    key_pem: String,
    /// Serial of the node certificate, lowercase hex.
    pub serial: String,
    pub not_after: SystemTime,
    /// When this identity was stored; renewal is scheduled from it.
    pub issued_at: SystemTime,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The private key, PEM, for the TLS client configuration only.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// When to renew: two thirds of the way from issuance to expiry.
    pub fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.issued_at)
            .unwrap_or(Duration::ZERO);
        self.issued_at + lifetime * 2 / 3
    }

    /// Whether the certificate has expired.
    pub fn expired(&self) -> bool {
        SystemTime::now() >= self.not_after
    }

    /// Expiry as seconds since the Unix epoch.
    pub fn not_after_unix(&self) -> i64 {
        unix(self.not_after)
    }
}

/// Where the identity is kept.
#[derive(Debug, Clone)]
pub struct IdentityStore {
    path: PathBuf,
}

impl IdentityStore {
    /// The identity file in `state_dir`, creating the directory (0700) if needed.
    pub fn open(state_dir: &Path) -> Result<Self, IdentityError> {
        fs::create_dir_all(state_dir)
            .and_then(|()| fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700)))
            .map_err(|source| IdentityError::CreateDir {
                path: state_dir.to_owned(),
                source,
            })?;
        Ok(Self {
            path: state_dir.join("identity.pem"),
        })
    }

    /// The stored identity, if the node has enrolled.
    pub fn load(&self) -> Result<Option<Identity>, IdentityError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(IdentityError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let (issued_at, chain, key) =
            split_identity(&text).ok_or_else(|| IdentityError::Corrupt {
                path: self.path.clone(),
            })?;
        let (serial, not_after) = leaf_facts(&chain).ok_or_else(|| IdentityError::Corrupt {
            path: self.path.clone(),
        })?;
        Ok(Some(Identity {
            chain_pem: chain,
            key_pem: key,
            serial,
            not_after,
            issued_at,
        }))
    }

    /// Stores a newly certified key atomically and returns the identity.
    pub fn save(&self, key: PendingKey, chain_pem: &str) -> Result<Identity, IdentityError> {
        let (serial, not_after) = leaf_facts(chain_pem).ok_or(IdentityError::BadCertificate)?;
        let issued_at = SystemTime::now();
        let contents = format!(
            "{ISSUED_AT_PREFIX}{}\n{}{}",
            unix(issued_at),
            chain_pem,
            key.key_pem
        );
        write_private(&self.path, contents.as_bytes()).map_err(|source| IdentityError::Write {
            path: self.path.clone(),
            source,
        })?;
        Ok(Identity {
            chain_pem: chain_pem.to_owned(),
            key_pem: key.key_pem,
            serial,
            not_after,
            issued_at,
        })
    }

    /// Deletes the identity (decommission).
    pub fn forget(&self) -> Result<(), IdentityError> {
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(IdentityError::Write {
                path: self.path.clone(),
                source,
            }),
        }
    }
}

const ISSUED_AT_PREFIX: &str = "# issued-at-unix: ";

/// Splits the identity file into issuance time, certificate chain and private key.
fn split_identity(text: &str) -> Option<(SystemTime, String, String)> {
    let issued: u64 = text
        .lines()
        .next()?
        .strip_prefix(ISSUED_AT_PREFIX)?
        .trim()
        .parse()
        .ok()?;
    let chain_start = text.find("-----BEGIN CERTIFICATE-----")?;
    let key_start = text.find("-----BEGIN PRIVATE KEY-----")?;
    (chain_start < key_start).then(|| {
        (
            UNIX_EPOCH + Duration::from_secs(issued),
            text[chain_start..key_start].to_owned(),
            text[key_start..].to_owned(),
        )
    })
}

/// Serial (hex) and expiry of the first certificate in a PEM chain.
fn leaf_facts(chain_pem: &str) -> Option<(String, SystemTime)> {
    use base64::Engine as _;
    let body: String = chain_pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .ok()?;
    let (_, cert) = X509Certificate::from_der(&der).ok()?;
    let not_after = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some((
        hex::encode(cert.raw_serial()),
        UNIX_EPOCH + Duration::from_secs(not_after),
    ))
}

/// Writes a 0600 file atomically: temporary file created 0600, fsync, rename.
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    file.write_all(contents)?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

/// Seconds since the Unix epoch.
pub fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed_chain(key: &PendingKey) -> String {
        let key = KeyPair::from_pem(&key.key_pem).unwrap();
        let mut params = CertificateParams::new(vec!["n".to_string()]).unwrap();
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::hours(3);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn identity_round_trips_0600_and_schedules_renewal_at_two_thirds() {
        let dir = tempfile::tempdir().unwrap();
        let store = IdentityStore::open(&dir.path().join("state")).unwrap();
        assert!(store.load().unwrap().is_none());
        let key = PendingKey::generate("n").unwrap();
        assert!(key.csr_pem.contains("CERTIFICATE REQUEST"));
        let chain = self_signed_chain(&key);
        let saved = store.save(key, &chain).unwrap();
        let loaded = store.load().unwrap().unwrap();
        assert_eq!(saved.serial, loaded.serial);
        assert_eq!(loaded.chain_pem, chain);
        let mode = fs::metadata(dir.path().join("state/identity.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let renew_in = loaded.renew_at().duration_since(loaded.issued_at).unwrap();
        let secs = renew_in.as_secs();
        assert!(
            (7190..=7210).contains(&secs),
            "renew after 2h of 3h, got {secs}s"
        );
        store.forget().unwrap();
        assert!(store.load().unwrap().is_none());
    }
}
