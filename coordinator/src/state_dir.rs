//! The coordinator's state directory: CA, serving and operator certificates, the database,
//! and the address the daemon listens on.
//!
//! ```text
//! ~/.local/share/homelab/        (0700; --state-dir or HOMELAB_STATE_DIR)
//!   ca.pem  ca-key.pem           the homelab CA (key 0600)
//!   server.pem  server-key.pem   the coordinator's serving certificate (key 0600)
//!   operator.pem  operator-key.pem  the CLI's client certificate (key 0600)
//!   homelab.db                   the state database (0600)
//!   coordinator.addr             where `homelab serve` listens, written at start
//! ```

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use crate::{
    fsutil,
    pki::{CertificateAuthority, PkiError},
    store::{Store, StoreError},
};

/// What went wrong with the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("the state directory {0} is not initialised; run `homelab init` first")]
    NotInitialized(PathBuf),
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
    #[error("certificate authority")]
    Pki(#[from] PkiError),
    #[error("state database")]
    Store(#[from] StoreError),
    #[error("cannot find a home directory for the default state directory; pass --state-dir")]
    NoHome,
    #[error("another `homelab serve` is running on {0}")]
    DaemonRunning(PathBuf),
}

/// Proof that this process is the only daemon on a state directory.
#[derive(Debug)]
pub struct DaemonLock {
    _file: fs::File,
}

/// What `init` created.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InitReport {
    pub state_dir: PathBuf,
    pub ca_fingerprint_sha256: String,
    pub server_sans: Vec<String>,
    pub created_ca: bool,
}

/// Paths inside a state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// A state directory at `root` (which need not exist yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `$XDG_DATA_HOME/homelab`, else `~/.local/share/homelab`.
    pub fn default_root() -> Result<PathBuf, StateDirError> {
        if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            return Ok(PathBuf::from(xdg).join("homelab"));
        }
        let home = std::env::var_os("HOME")
            .filter(|v| !v.is_empty())
            .ok_or(StateDirError::NoHome)?;
        Ok(PathBuf::from(home).join(".local/share/homelab"))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca-key.pem")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.root.join("server-key.pem")
    }
    pub fn operator_cert(&self) -> PathBuf {
        self.root.join("operator.pem")
    }
    pub fn operator_key(&self) -> PathBuf {
        self.root.join("operator-key.pem")
    }
    pub fn database(&self) -> PathBuf {
        self.root.join("homelab.db")
    }
    pub fn address_file(&self) -> PathBuf {
        self.root.join("coordinator.addr")
    }
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("serve.lock")
    }

    /// Takes the daemon lock: one `homelab serve` per state directory. The lock is held
    /// until the returned file is dropped (or the process dies). Offline commands take it
    /// too, to learn that no daemon is running.
    pub fn lock_daemon(&self) -> Result<DaemonLock, StateDirError> {
        if !self.root.is_dir() {
            return Err(StateDirError::NotInitialized(self.root.clone()));
        }
        let path = self.lock_file();
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| StateDirError::Write {
                path: path.clone(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => Ok(DaemonLock { _file: file }),
            Err(fs::TryLockError::WouldBlock) => {
                Err(StateDirError::DaemonRunning(self.root.clone()))
            }
            Err(fs::TryLockError::Error(source)) => Err(StateDirError::Write { path, source }),
        }
    }

    /// Creates the directory, the CA (unless one exists and `force` is false), the serving
    /// certificate for `sans` plus loopback names, the operator certificate and the database.
    /// Re-running without `force` keeps the CA and re-issues the serving and operator
    /// certificates, so new `--san`s can be added safely.
    pub fn init(&self, extra_sans: &[String], force: bool) -> Result<InitReport, StateDirError> {
        fsutil::create_private_dir(&self.root).map_err(|source| StateDirError::Write {
            path: self.root.clone(),
            source,
        })?;
        let ca_exists = self.ca_cert().exists() && self.ca_key().exists();
        let (ca, created_ca) = if ca_exists && !force {
            (self.load_ca()?, false)
        } else {
            let (ca, key_pem) = CertificateAuthority::generate("homelab CA")?;
            self.write(&self.ca_key(), key_pem.as_bytes(), fsutil::PRIVATE)?;
            self.write(&self.ca_cert(), ca.cert_pem().as_bytes(), fsutil::PUBLIC)?;
            (ca, true)
        };
        let mut sans = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        for san in extra_sans {
            if !sans.contains(san) {
                sans.push(san.clone());
            }
        }
        let server = ca.issue_server(&sans)?;
        self.write(
            &self.server_key(),
            server.key_pem.as_bytes(),
            fsutil::PRIVATE,
        )?;
        self.write(
            &self.server_cert(),
            server.cert_pem.as_bytes(),
            fsutil::PUBLIC,
        )?;
        let operator = ca.issue_operator("admin")?;
        self.write(
            &self.operator_key(),
            operator.key_pem.as_bytes(),
            fsutil::PRIVATE,
        )?;
        self.write(
            &self.operator_cert(),
            operator.cert_pem.as_bytes(),
            fsutil::PUBLIC,
        )?;
        drop(self.open_store()?);
        Ok(InitReport {
            state_dir: self.root.clone(),
            ca_fingerprint_sha256: ca.fingerprint(),
            server_sans: sans,
            created_ca,
        })
    }

    /// Loads the CA, or explains that `init` has not run.
    pub fn load_ca(&self) -> Result<CertificateAuthority, StateDirError> {
        let cert = self.read(&self.ca_cert())?;
        let key = self.read(&self.ca_key())?;
        Ok(CertificateAuthority::from_pem(&cert, &key)?)
    }

    /// Opens the state database (0600), creating it if needed.
    pub fn open_store(&self) -> Result<Store, StateDirError> {
        if !self.root.is_dir() {
            return Err(StateDirError::NotInitialized(self.root.clone()));
        }
        let path = self.database();
        let store = Store::open(&path)?;
        set_mode(&path, fsutil::PRIVATE).map_err(|source| StateDirError::Write {
            path: path.clone(),
            source,
        })?;
        Ok(store)
    }

    /// Reads a file of the state directory as text.
    pub fn read(&self, path: &Path) -> Result<String, StateDirError> {
        fs::read_to_string(path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                StateDirError::NotInitialized(self.root.clone())
            } else {
                StateDirError::Read {
                    path: path.to_owned(),
                    source,
                }
            }
        })
    }

    fn write(&self, path: &Path, contents: &[u8], mode: u32) -> Result<(), StateDirError> {
        fsutil::write_atomic(path, contents, mode).map_err(|source| StateDirError::Write {
            path: path.to_owned(),
            source,
        })
    }
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn init_creates_private_keys_and_keeps_the_ca_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        let first = state.init(&["192.168.0.10".into()], false).unwrap();
        assert!(first.created_ca);
        for key in [
            state.ca_key(),
            state.server_key(),
            state.operator_key(),
            state.database(),
        ] {
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let second = state.init(&[], false).unwrap();
        assert!(!second.created_ca);
        assert_eq!(first.ca_fingerprint_sha256, second.ca_fingerprint_sha256);
        let forced = state.init(&[], true).unwrap();
        assert_ne!(first.ca_fingerprint_sha256, forced.ca_fingerprint_sha256);
    }

    #[test]
    fn only_one_daemon_lock_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        state.init(&[], false).unwrap();
        let lock = state.lock_daemon().unwrap();
        assert!(matches!(
            state.lock_daemon(),
            Err(StateDirError::DaemonRunning(_))
        ));
        drop(lock);
        state.lock_daemon().unwrap();
    }

    #[test]
    fn using_an_uninitialised_directory_says_to_run_init() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("missing"));
        let err = state.load_ca().unwrap_err();
        assert!(err.to_string().contains("homelab init"), "{err}");
    }
}
